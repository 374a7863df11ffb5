//! The scheduler's configuration: a TOML file, overridden by flags, checked
//! by [`SchedulerConfig::validate`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ferry_tls::{Identity, Security, TlsConfig};
use serde::{Deserialize, Serialize};

/// Everything one scheduler node needs. Every field has a default, so a TOML
/// file only names what it changes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// This node's id in the Raft group; unique, at least 1, never reused.
    pub id: u64,
    /// gRPC listener: Raft traffic, client services, health and reflection.
    pub listen: SocketAddr,
    /// The `host:port` peers and clients use to reach `listen`
    /// (default: `listen`). Must match this node's entry in `initial_cluster`.
    pub advertise: Option<String>,
    /// Admin HTTP listener (`/metrics`, `/healthz`, `/readyz`); none if unset.
    pub admin_listen: Option<SocketAddr>,
    /// Data directory (sled database and snapshot files).
    pub data: PathBuf,
    /// `ID=HOST:PORT,...` for a fresh cluster. A node with an empty data
    /// directory initializes the cluster with these voters; a node that has
    /// data never re-initializes, but refuses to start if its cluster was
    /// bootstrapped with other members or token. Empty: wait to be added
    /// with `ferry cluster add-node`.
    pub initial_cluster: String,
    /// Mixed into the cluster id made at bootstrap (with the initial
    /// members): give each cluster its own when several are bootstrapped
    /// with the same member addresses.
    pub initial_cluster_token: String,
    /// How often the leader sends heartbeats.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A follower that hears no leader for a random time in
    /// [`election_timeout_min`, `election_timeout_max`] starts an election.
    #[serde(with = "humantime_serde")]
    pub election_timeout_min: Duration,
    /// Upper bound of the election timeout.
    #[serde(with = "humantime_serde")]
    pub election_timeout_max: Duration,
    /// Deadline of one Raft RPC (and of a follower's read-index call).
    #[serde(with = "humantime_serde")]
    pub rpc_timeout: Duration,
    /// Deadline for streaming one whole snapshot to a follower.
    #[serde(with = "humantime_serde")]
    pub snapshot_timeout: Duration,
    /// Build a snapshot after this many new log entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the last snapshot, so briefly lagging
    /// followers catch up from the log instead of a snapshot.
    pub logs_to_keep: u64,
    /// Most entries in one AppendEntries message. openraft 0.9 times an
    /// AppendEntries out after one heartbeat interval, so keep this times the
    /// largest entry (about 1 MiB) well under what the network moves in
    /// `heartbeat_interval`.
    pub max_batch_entries: u64,
    /// Service registry protect threshold: when more than this share of a
    /// service's instances would expire at once, they are flagged `suspect`
    /// and kept instead of removed (1.0: never protect).
    pub registry_protect_threshold: f64,
    /// Finished jobs kept in the state (succeeded, failed or cancelled);
    /// the leader forgets older ones, oldest finish first, once every
    /// scheduler runs 0.2.0 or later. 0 keeps every job.
    pub job_history: u64,
    /// Mutual TLS (`[tls]`: `ca`, `cert`, `key`): the cluster's CA, this
    /// node's certificate, which must name `scheduler <id>`, and its key.
    /// Required unless `insecure`. Reloaded when the files change.
    pub tls: TlsConfig,
    /// Plaintext gRPC with no one checked, only when asked for (a warning
    /// at start). For a trusted network, or a cluster upgraded from 0.2.
    pub insecure: bool,
    /// Hosts job callbacks and probe alerts may be sent to: names,
    /// `*.domain`, IP addresses or networks (`10.0.0.0/8`). Empty: none,
    /// and a job or probe naming a URL is refused. Give every scheduler
    /// the same list.
    pub callback_hosts: Vec<String>,
    /// Set by [`crate::LocalCluster`], never read from a file: several nodes
    /// share this process's runtime, so log syncs go to the blocking pool
    /// (see `ferry_storage::OpenOptions::sync_appends_inline`).
    #[serde(skip)]
    pub shares_runtime: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            id: 1,
            listen: SocketAddr::from(([127, 0, 0, 1], 7001)),
            advertise: None,
            admin_listen: None,
            data: PathBuf::from("./data/s1"),
            initial_cluster: String::new(),
            initial_cluster_token: String::new(),
            heartbeat_interval: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(300),
            election_timeout_max: Duration::from_millis(600),
            rpc_timeout: Duration::from_secs(2),
            snapshot_timeout: Duration::from_secs(60),
            snapshot_every: 10_000,
            logs_to_keep: 1_000,
            max_batch_entries: 4,
            registry_protect_threshold: 0.5,
            job_history: 1000,
            tls: TlsConfig::default(),
            insecure: false,
            callback_hosts: Vec::new(),
            shares_runtime: false,
        }
    }
}

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// The field or flag at fault.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError { field, reason: reason.into() }
}

/// Checks `HOST:PORT` (a name or an IP, and a non-zero port).
pub fn parse_host_port(s: &str) -> Result<(), String> {
    let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("'{s}' is not HOST:PORT"))?;
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err(format!("'{s}' has no valid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("'{s}' has no valid port (1-65535)")),
    }
}

/// Parses `ID=HOST:PORT,ID=HOST:PORT,...`.
pub fn parse_initial_cluster(s: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| format!("'{part}' is not ID=HOST:PORT"))?;
        let id: u64 = id.trim().parse().map_err(|_| format!("'{id}' is not a node id (a positive integer)"))?;
        if id == 0 {
            return Err("node id 0 is reserved; ids start at 1".into());
        }
        parse_host_port(addr.trim())?;
        if out.insert(id, addr.trim().to_string()).is_some() {
            return Err(format!("node id {id} appears twice"));
        }
    }
    let mut addrs: Vec<_> = out.values().collect();
    addrs.sort();
    if addrs.windows(2).any(|w| w[0] == w[1]) {
        return Err("two nodes share one address".into());
    }
    Ok(out)
}

impl SchedulerConfig {
    /// Reads a TOML file.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| bad("config", format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| bad("config", format!("{}: {e}", path.display())))
    }

    /// The address this node is known by.
    pub fn advertised(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }

    /// How this node's connections are secured, its credentials loaded
    /// and checked to name this node.
    pub fn security(&self) -> Result<Security, ConfigError> {
        self.tls.security_of(self.insecure, &Identity::Scheduler(self.id)).map_err(|(field, reason)| bad(field, reason))
    }

    /// The parsed `callback_hosts` (checked by [`SchedulerConfig::validate`]).
    pub fn callback_hosts(&self) -> ferry_tls::allow::Hosts {
        ferry_tls::allow::Hosts::parse(&self.callback_hosts).unwrap_or_default()
    }

    /// The parsed `initial_cluster`.
    pub fn members(&self) -> Result<BTreeMap<u64, String>, ConfigError> {
        parse_initial_cluster(&self.initial_cluster).map_err(|r| bad("initial-cluster", r))
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(bad("id", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.registry_protect_threshold) {
            return Err(bad("registry-protect-threshold", "must be between 0 and 1"));
        }
        if let Some(a) = &self.advertise {
            parse_host_port(a).map_err(|r| bad("advertise", r))?;
        }
        ferry_tls::allow::Hosts::parse(&self.callback_hosts).map_err(|r| bad("callback-host", r))?;
        let members = self.members()?;
        if !members.is_empty() {
            match members.get(&self.id) {
                None => return Err(bad("initial-cluster", format!("does not list this node (id {})", self.id))),
                Some(addr) if *addr != self.advertised() => {
                    return Err(bad(
                        "initial-cluster",
                        format!("lists node {} at {addr}, but it listens/advertises {}", self.id, self.advertised()),
                    ))
                }
                Some(_) => {}
            }
        }
        if self.heartbeat_interval.is_zero() {
            return Err(bad("heartbeat-interval", "must be positive"));
        }
        if self.election_timeout_min <= self.heartbeat_interval * 2 {
            return Err(bad("election-timeout-min", "must be more than twice the heartbeat interval"));
        }
        if self.election_timeout_max <= self.election_timeout_min {
            return Err(bad("election-timeout-max", "must be greater than election-timeout-min"));
        }
        if self.rpc_timeout.is_zero() || self.snapshot_timeout.is_zero() {
            return Err(bad("rpc-timeout", "timeouts must be positive"));
        }
        if self.snapshot_every == 0 {
            return Err(bad("snapshot-every", "must be at least 1"));
        }
        if self.max_batch_entries == 0 {
            return Err(bad("max-batch-entries", "must be at least 1"));
        }
        Ok(())
    }

    /// A valid single-node config on ephemeral ports in `data`, for tests
    /// (nodes in the test's own runtime, so `shares_runtime` is set).
    pub fn for_test(id: u64, data: PathBuf) -> Self {
        Self { id, listen: SocketAddr::from(([127, 0, 0, 1], 0)), data, shares_runtime: true, ..Self::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_cluster_parses_and_rejects_bad_members() {
        let m = parse_initial_cluster("1=127.0.0.1:7001, 2=127.0.0.1:7002,3=host:7003").unwrap();
        assert_eq!(m.len(), 3);
        assert!(parse_initial_cluster("1=127.0.0.1:7001,1=127.0.0.1:7002").unwrap_err().contains("twice"));
        assert!(parse_initial_cluster("0=127.0.0.1:7001").is_err());
        assert!(parse_initial_cluster("1=127.0.0.1").is_err());
        assert!(parse_initial_cluster("1=127.0.0.1:0").is_err());
        assert!(parse_initial_cluster("x=127.0.0.1:7001").is_err());
        assert!(parse_initial_cluster("1=a:1,2=a:1").unwrap_err().contains("share"));
    }

    #[test]
    fn validate_names_the_field() {
        let mut c = SchedulerConfig { initial_cluster: "2=127.0.0.1:7002".into(), ..Default::default() };
        assert_eq!(c.validate().unwrap_err().field, "initial-cluster");
        c.initial_cluster = "1=127.0.0.1:7001".into();
        c.validate().unwrap();
        c.election_timeout_max = c.election_timeout_min;
        assert_eq!(c.validate().unwrap_err().field, "election-timeout-max");
    }

    #[test]
    fn the_deploy_example_is_valid() {
        let c: SchedulerConfig = toml::from_str(include_str!("../../deploy/scheduler.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.members().unwrap().len(), 3);
    }

    #[test]
    fn toml_durations_are_human_strings() {
        let c: SchedulerConfig =
            toml::from_str("id = 3\nheartbeat_interval = \"20ms\"\nlisten = \"127.0.0.1:9000\"").unwrap();
        assert_eq!(c.id, 3);
        assert_eq!(c.heartbeat_interval, Duration::from_millis(20));
        assert!(toml::from_str::<SchedulerConfig>("nope = 1").is_err());
    }
}
