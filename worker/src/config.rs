//! The worker's configuration: a TOML file, overridden by flags, checked by
//! [`WorkerConfig::validate`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything one worker needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Unique worker name in the fleet.
    pub name: String,
    /// Chunk service listener (peers pull from here).
    pub listen: SocketAddr,
    /// Admin HTTP listener: `/metrics`, `/healthz`, `/readyz` (none if unset).
    pub admin_listen: Option<SocketAddr>,
    /// `host:port` peers use to reach `listen` (default: `listen`).
    pub advertise: Option<String>,
    /// Schedulers to connect to (`host:port`); the worker follows the leader.
    pub schedulers: Vec<String>,
    /// Data directory: chunk index and staging files.
    pub data: PathBuf,
    /// Directories this worker may read from and write to.
    pub roots: Vec<PathBuf>,
    /// Labels for selectors (`zone=a`, `role=bidder`).
    pub labels: BTreeMap<String, String>,
    /// Named reload hooks: name to shell command. Jobs may name only these.
    pub hooks: BTreeMap<String, String>,
    /// Most chunks served to peers at once.
    pub max_uploads: usize,
    /// Most chunks pulled at once.
    pub max_downloads: usize,
    /// Upload bandwidth cap in bytes per second (none if unset).
    pub upload_limit: Option<u64>,
    /// Download bandwidth cap in bytes per second (none if unset).
    pub download_limit: Option<u64>,
    /// Bytes of replaced file versions kept for chunk reuse (0: keep none).
    pub store_limit: u64,
    /// Heartbeat to the leader.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Test fault: serve corrupted chunks to peers.
    #[serde(skip)]
    pub fault_corrupt_uploads: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7101)),
            admin_listen: None,
            advertise: None,
            schedulers: vec!["127.0.0.1:7001".into(), "127.0.0.1:7002".into(), "127.0.0.1:7003".into()],
            data: PathBuf::from("./data/worker"),
            roots: Vec::new(),
            labels: BTreeMap::new(),
            hooks: BTreeMap::new(),
            max_uploads: 8,
            max_downloads: 8,
            upload_limit: None,
            download_limit: None,
            store_limit: 1 << 30,
            heartbeat: Duration::from_secs(1),
            fault_corrupt_uploads: false,
        }
    }
}

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// The field or flag.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError { field, reason: reason.into() }
}

/// Parses a rate like `100MiB/s`, `50MB`, `1048576` into bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("/s");
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a rate like 100MiB/s"))?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KB" => 1e3,
        "KiB" => 1024.0,
        "M" | "MB" => 1e6,
        "MiB" => 1024.0 * 1024.0,
        "G" | "GB" => 1e9,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("'{other}' is not a unit (B, KB, KiB, MB, MiB, GB, GiB)")),
    };
    Ok((n * mult) as u64)
}

/// Checks a name: 1..=128 of `[A-Za-z0-9._-]`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl WorkerConfig {
    /// Reads a TOML file.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| bad("config", format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| bad("config", format!("{}: {e}", path.display())))
    }

    /// The address peers use.
    pub fn advertised(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !valid_name(&self.name) {
            return Err(bad("name", "must be 1 to 128 characters of letters, digits, '.', '_' or '-'"));
        }
        if self.roots.is_empty() {
            return Err(bad("allow-root", "at least one allowed root is needed"));
        }
        if let Some(r) = self.roots.iter().find(|r| !r.is_absolute()) {
            return Err(bad("allow-root", format!("{} is not an absolute path", r.display())));
        }
        if self.schedulers.is_empty() {
            return Err(bad("schedulers", "at least one scheduler HOST:PORT is needed"));
        }
        for (name, cmd) in &self.hooks {
            if !valid_name(name) {
                return Err(bad("hook", format!("'{name}' is not a valid hook name")));
            }
            if cmd.trim().is_empty() {
                return Err(bad("hook", format!("hook '{name}' has an empty command")));
            }
        }
        for (k, v) in &self.labels {
            if !valid_name(k) || v.is_empty() || v.contains([',', '=']) {
                return Err(bad("labels", format!("'{k}={v}' is not a valid label")));
            }
        }
        if self.max_uploads == 0 || self.max_downloads == 0 {
            return Err(bad("max-uploads", "must be at least 1"));
        }
        for (field, limit) in [("upload-limit", self.upload_limit), ("download-limit", self.download_limit)] {
            if limit.is_some_and(|l| !(4096..=u32::MAX as u64).contains(&l)) {
                return Err(bad(field, "must be between 4KiB/s and 4GiB/s"));
            }
        }
        Ok(())
    }
}
