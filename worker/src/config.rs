//! The worker's configuration: a TOML file, overridden by flags, checked by
//! [`WorkerConfig::validate`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
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
    /// A pull that receives nothing from its peer for this long fails (and
    /// the leader plans the chunk from another holder) instead of holding
    /// one of the target's pull slots until the call's 60 s deadline. A
    /// peer with an upload cap sends frames of about a second of one
    /// upload's share of it (16 to 256 KiB), so only caps below about
    /// 16 KiB × `max_uploads` per timeout (13 KiB/s at the defaults) need a
    /// longer one.
    #[serde(with = "humantime_serde")]
    pub pull_stall_timeout: Duration,
    /// How long a draining worker (SIGTERM, `ferry worker drain`) waits for
    /// its pulls and uploads in flight before it exits anyway.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Pull connections ask to go first in the host's queue and upload
    /// connections to go last (`SO_PRIORITY`; see [`crate::net`]). Off
    /// leaves the sockets at the host's default.
    pub socket_priority: bool,
    /// Bytes of replaced file versions kept for chunk reuse (0: keep none).
    pub store_limit: u64,
    /// Heartbeat to the leader.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Config keys written into local files (`[[config_files]]` tables).
    pub config_files: Vec<ConfigFileRule>,
    /// How often every config file is read again even without a watch
    /// event: gray variants change without one, and a file edited by hand
    /// is put back.
    #[serde(with = "humantime_serde")]
    pub config_resync: Duration,
    /// Mutual TLS (`[tls]`: `ca`, `cert`, `key`): the cluster's CA, this
    /// worker's certificate, which must name `worker <name>`, and its key.
    /// Required unless `insecure`. Reloaded when the files change.
    pub tls: ferry_tls::TlsConfig,
    /// Plaintext gRPC with no one checked, only when asked for (a warning
    /// at start).
    pub insecure: bool,
    /// Hosts this worker may download from (probe targets): names,
    /// `*.domain`, IP addresses or networks (`10.0.0.0/8`). Empty: none; a
    /// probe target elsewhere gets an error result, and no request.
    pub fetch_hosts: Vec<String>,
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
            pull_stall_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            socket_priority: true,
            store_limit: 1 << 30,
            heartbeat: Duration::from_secs(1),
            config_files: Vec::new(),
            config_resync: Duration::from_secs(30),
            tls: ferry_tls::TlsConfig::default(),
            insecure: false,
            fetch_hosts: Vec::new(),
        }
    }
}

/// How a config file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// The value of one key, byte for byte.
    Raw,
    /// A JSON object of names to string values, names in key order.
    Json,
    /// `name=value` lines, in key order.
    Properties,
}

impl std::str::FromStr for FileFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(Self::Raw),
            "json" => Ok(Self::Json),
            "properties" => Ok(Self::Properties),
            other => Err(format!("'{other}' is not a format (raw, json, properties)")),
        }
    }
}

/// One `[[config_files]]` rule: a key or a prefix of the replicated config,
/// rendered into a local file under the allowed roots, then a named hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFileRule {
    /// One key (exclusive with `prefix`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Every key under this prefix (exclusive with `key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The file to write: absolute, below an allowed root.
    pub path: PathBuf,
    /// Default: `raw` for a key, `json` for a prefix. `raw` needs `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<FileFormat>,
    /// A hook named in `hooks`, run after the file changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    /// Prefix rules only: names in the file leave out the prefix
    /// (default true). Key rules always use the whole key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strip_prefix: Option<bool>,
}

impl ConfigFileRule {
    /// Parses the `--config-file` flag: `KEY=PATH[:FORMAT[:HOOK]]`. With
    /// `raw` (the default) the left side is a key; with `json` or
    /// `properties` it is a prefix, stripped from the names.
    pub fn from_spec(spec: &str) -> Result<Self, String> {
        let (target, rest) =
            spec.split_once('=').ok_or_else(|| format!("'{spec}' is not KEY_OR_PREFIX=PATH[:FORMAT[:HOOK]]"))?;
        let mut parts = rest.splitn(3, ':');
        let path = PathBuf::from(parts.next().unwrap_or_default());
        let format: FileFormat = parts.next().filter(|f| !f.is_empty()).unwrap_or("raw").parse()?;
        let hook = parts.next().filter(|h| !h.is_empty()).map(str::to_string);
        let (key, prefix) = match format {
            FileFormat::Raw => (Some(target.to_string()), None),
            _ => (None, Some(target.to_string())),
        };
        Ok(Self { key, prefix, path, format: Some(format), hook, strip_prefix: None })
    }

    /// The format, with its default applied.
    pub fn format(&self) -> FileFormat {
        self.format.unwrap_or(if self.key.is_some() { FileFormat::Raw } else { FileFormat::Json })
    }

    /// What the watch covers: the key, or the prefix.
    pub fn watched(&self) -> &str {
        self.key.as_deref().or(self.prefix.as_deref()).unwrap_or_default()
    }

    /// How the rule is named in logs and errors: `key "a/b"` or `prefix "a/"`.
    pub fn describe(&self) -> String {
        match (&self.key, &self.prefix) {
            (Some(k), _) => format!("key {k:?}"),
            (None, Some(p)) => format!("prefix {p:?}"),
            (None, None) => "no key or prefix".into(),
        }
    }

    /// Checks the rule against the worker's roots and hooks, without
    /// touching the disk (the worker checks symlinks when it starts).
    fn validate(&self, roots: &[PathBuf], hooks: &BTreeMap<String, String>) -> Result<(), String> {
        match (&self.key, &self.prefix) {
            (Some(_), Some(_)) => return Err("key, prefix: set one, not both".into()),
            (None, None) => return Err("key, prefix: set one of them".into()),
            (Some(k), None) if k.is_empty() => return Err("key: must not be empty".into()),
            (None, Some(p)) if p.is_empty() => return Err("prefix: must not be empty".into()),
            _ => {}
        }
        if self.format() == FileFormat::Raw && self.key.is_none() {
            return Err("format: raw writes the value of one key; use key, or format json or properties".into());
        }
        if self.strip_prefix.is_some() && self.prefix.is_none() {
            return Err("strip_prefix: only with prefix".into());
        }
        let p = &self.path;
        if !p.is_absolute() {
            return Err(format!("path: {} is not an absolute path", p.display()));
        }
        if p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
            return Err(format!("path: {} contains . or ..", p.display()));
        }
        if !roots.iter().any(|r| p.starts_with(r) && p != r) {
            return Err(format!("path: {} is outside the allowed roots", p.display()));
        }
        if let Some(h) = &self.hook {
            if !hooks.contains_key(h) {
                let names: Vec<&str> = hooks.keys().map(String::as_str).collect();
                return Err(format!("hook: {h:?} is not a hook of this worker (hooks: [{}])", names.join(", ")));
            }
        }
        Ok(())
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

    /// How this worker's connections are secured, its credentials loaded
    /// and checked to name this worker.
    pub fn security(&self) -> Result<ferry_tls::Security, ConfigError> {
        self.tls
            .security_of(self.insecure, &ferry_tls::Identity::Worker(self.name.clone()))
            .map_err(|(field, reason)| bad(field, reason))
    }

    /// The parsed `fetch_hosts` (checked by [`WorkerConfig::validate`]).
    pub fn fetch_hosts(&self) -> ferry_tls::allow::Hosts {
        ferry_tls::allow::Hosts::parse(&self.fetch_hosts).unwrap_or_default()
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !valid_name(&self.name) {
            return Err(bad("name", "must be 1 to 128 characters of letters, digits, '.', '_' or '-'"));
        }
        if self.roots.is_empty() {
            return Err(bad("allow-root", "at least one allowed root is needed"));
        }
        ferry_tls::allow::Hosts::parse(&self.fetch_hosts).map_err(|r| bad("fetch-host", r))?;
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
        if self.drain_timeout > Duration::from_secs(3600) {
            return Err(bad("drain-timeout", "must be at most 1h"));
        }
        // Past 60 s the call's own deadline ends a pull first.
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&self.pull_stall_timeout) {
            return Err(bad("pull-stall-timeout", "must be between 100ms and 60s"));
        }
        self.validate_config_files()
    }

    fn validate_config_files(&self) -> Result<(), ConfigError> {
        if self.config_resync < Duration::from_millis(100) {
            return Err(bad("config-resync", "must be at least 100ms"));
        }
        let mut paths: BTreeMap<&Path, usize> = BTreeMap::new();
        for (i, rule) in self.config_files.iter().enumerate() {
            let at = |reason: String| bad(CONFIG_FILE_FIELD, format!("rule {} ({}): {reason}", i + 1, rule.describe()));
            rule.validate(&self.roots, &self.hooks).map_err(at)?;
            if let Some(first) = paths.insert(&rule.path, i + 1) {
                return Err(at(format!("path: {} is written by rule {first} already", rule.path.display())));
            }
        }
        Ok(())
    }
}

/// The field named by errors in `config_files` rules (`--config-file`
/// on the command line); the reason names the rule and its bad part.
pub const CONFIG_FILE_FIELD: &str = "config-file";

#[cfg(test)]
mod tests {
    use super::*;

    fn worker_with(rules: &str) -> Result<WorkerConfig, String> {
        // Top-level keys in `rules` come before any table.
        let text = format!("name = \"w1\"\nroots = [\"/srv/ferry\"]\n{rules}\n[hooks]\nreload = \"true\"\n");
        toml::from_str::<WorkerConfig>(&text).map_err(|e| e.to_string())
    }

    fn problem(rules: &str) -> String {
        let c = worker_with(rules).expect("parses");
        let err = c.validate().expect_err("must be refused");
        assert_eq!(err.field, CONFIG_FILE_FIELD);
        err.reason
    }

    #[test]
    fn config_file_rules_parse_with_defaults() {
        let c = worker_with(
            r#"
            config_resync = "2s"
            [[config_files]]
            key = "app/motd"
            path = "/srv/ferry/motd"
            hook = "reload"
            [[config_files]]
            prefix = "app/db/"
            path = "/srv/ferry/db.json"
            [[config_files]]
            prefix = "app/env/"
            path = "/srv/ferry/app.env"
            format = "properties"
            strip_prefix = false
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.config_resync, Duration::from_secs(2));
        let f: Vec<FileFormat> = c.config_files.iter().map(|r| r.format()).collect();
        assert_eq!(f, [FileFormat::Raw, FileFormat::Json, FileFormat::Properties]);
        assert_eq!(c.config_files[0].hook.as_deref(), Some("reload"));
        assert_eq!(c.config_files[2].strip_prefix, Some(false));
        assert!(worker_with("[[config_files]]\nkey = \"k\"\npath = \"/srv/ferry/x\"\nmode = 1\n").is_err());
        assert!(worker_with("[[config_files]]\nkey = \"k\"\npath = \"/srv/ferry/x\"\nformat = \"yaml\"\n").is_err());
    }

    #[test]
    fn bad_config_file_rules_name_the_rule_and_the_field() {
        let r = problem("[[config_files]]\nkey = \"k\"\npath = \"/etc/passwd\"\n");
        assert!(r.starts_with("rule 1 (key \"k\"): path: /etc/passwd is outside the allowed roots"), "{r}");
        let r = problem("[[config_files]]\nkey = \"k\"\npath = \"/srv/ferry/../x\"\n");
        assert!(r.contains("path: /srv/ferry/../x contains . or .."), "{r}");
        let r = problem("[[config_files]]\nkey = \"k\"\npath = \"x.conf\"\n");
        assert!(r.contains("path: x.conf is not an absolute path"), "{r}");
        let r = problem("[[config_files]]\nkey = \"k\"\npath = \"/srv/ferry\"\n");
        assert!(r.contains("outside the allowed roots"), "the root itself is not a file: {r}");
        let r = problem("[[config_files]]\nkey = \"k\"\npath = \"/srv/ferry/x\"\nhook = \"restart\"\n");
        assert!(r.contains("hook: \"restart\" is not a hook of this worker (hooks: [reload])"), "{r}");
        let r = problem("[[config_files]]\nprefix = \"p/\"\npath = \"/srv/ferry/x\"\nformat = \"raw\"\n");
        assert!(r.contains("format: raw writes the value of one key"), "{r}");
        let r = problem("[[config_files]]\nkey = \"k\"\nprefix = \"p/\"\npath = \"/srv/ferry/x\"\n");
        assert!(r.contains("key, prefix: set one, not both"), "{r}");
        let r = problem("[[config_files]]\npath = \"/srv/ferry/x\"\n");
        assert!(r.contains("key, prefix: set one of them"), "{r}");
        let r = problem("[[config_files]]\nkey = \"k\"\npath = \"/srv/ferry/x\"\nstrip_prefix = true\n");
        assert!(r.contains("strip_prefix: only with prefix"), "{r}");
        let r = problem(
            "[[config_files]]\nkey = \"a\"\npath = \"/srv/ferry/x\"\n[[config_files]]\nkey = \"b\"\npath = \"/srv/ferry/x\"\n",
        );
        assert!(r.starts_with("rule 2 (key \"b\"): path: /srv/ferry/x is written by rule 1 already"), "{r}");
        let c = worker_with("config_resync = \"1ms\"").unwrap();
        assert_eq!(c.validate().unwrap_err().field, "config-resync");
    }

    #[test]
    fn the_pull_stall_timeout_reads_as_a_duration_within_bounds() {
        let c = worker_with("pull_stall_timeout = \"3s\"").unwrap();
        c.validate().unwrap();
        assert_eq!(c.pull_stall_timeout, Duration::from_secs(3));
        for bad in ["10ms", "61s"] {
            let c = worker_with(&format!("pull_stall_timeout = \"{bad}\"")).unwrap();
            assert_eq!(c.validate().unwrap_err().field, "pull-stall-timeout", "{bad}");
        }
    }

    #[test]
    fn socket_priority_is_on_by_default_and_can_be_turned_off() {
        assert!(WorkerConfig::default().socket_priority);
        assert!(!worker_with("socket_priority = false").unwrap().socket_priority);
    }

    #[test]
    fn the_flag_form_reads_key_path_format_and_hook() {
        let r = ConfigFileRule::from_spec("app/motd=/srv/ferry/motd").unwrap();
        assert_eq!((r.key.as_deref(), r.format(), r.hook.as_deref()), (Some("app/motd"), FileFormat::Raw, None));
        let r = ConfigFileRule::from_spec("app/db/=/srv/ferry/db.json:json:reload").unwrap();
        assert_eq!(r.prefix.as_deref(), Some("app/db/"));
        assert_eq!(r.key, None);
        assert_eq!((r.format(), r.hook.as_deref()), (FileFormat::Json, Some("reload")));
        let r = ConfigFileRule::from_spec("app/env/=/srv/ferry/app.env:properties").unwrap();
        assert_eq!((r.prefix.as_deref(), r.format()), (Some("app/env/"), FileFormat::Properties));
        let r = ConfigFileRule::from_spec("k=/srv/ferry/k::reload").unwrap();
        assert_eq!((r.format(), r.hook.as_deref()), (FileFormat::Raw, Some("reload")));
        assert!(ConfigFileRule::from_spec("/srv/ferry/k").unwrap_err().contains("KEY_OR_PREFIX=PATH"));
        assert!(ConfigFileRule::from_spec("k=/srv/ferry/k:yaml").unwrap_err().contains("'yaml' is not a format"));
    }
}
