//! Command-line flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Ferry pushes files to fleets of machines and keeps their shared
/// configuration, coordinated by a three-node Raft group.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags shared by client commands.
#[derive(Args, Debug)]
pub struct ClientArgs {
    /// Schedulers to talk to, comma-separated HOST:PORT; the client tries
    /// the next one when one is down.
    #[arg(
        long,
        global = true,
        env = "FERRY_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003",
        value_parser = host_port
    )]
    pub endpoints: Vec<String>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Deadline of one client call, retries included. It is not a job's
    /// deadline: that is `job submit --job-timeout`.
    #[arg(long, global = true, default_value = "15s", value_parser = positive_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// `ferry certs ...`: files are read from and written to `--dir`.
#[derive(Subcommand, Debug)]
pub enum CertsCmd {
    /// Make a new CA: `ca.pem` (give it to every holder) and `ca-key.pem`
    /// (keep it where certificates are issued, nowhere else).
    Ca {
        #[command(flatten)]
        out: CertsOut,
        /// A name for the CA (shown in its certificate).
        #[arg(long, default_value = "ferry")]
        name: String,
    },
    /// A scheduler's certificate, naming its node id.
    Scheduler {
        #[command(flatten)]
        out: CertsOut,
        /// The node's id (`--id` of `ferry scheduler`).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
        #[command(flatten)]
        issue: CertsIssue,
    },
    /// A worker's certificate, naming the worker.
    Worker {
        #[command(flatten)]
        out: CertsOut,
        /// The worker's name (`--name` of `ferry worker`).
        #[arg(long)]
        name: String,
        #[command(flatten)]
        issue: CertsIssue,
    },
    /// A user's certificate, for the CLI, the SDK or grpcurl.
    User {
        #[command(flatten)]
        out: CertsOut,
        /// The user's name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        issue: CertsIssue,
    },
}

/// Where `ferry certs` keeps the CA and writes certificates.
#[derive(Args, Debug)]
pub struct CertsOut {
    /// The directory of `ca.pem` and `ca-key.pem`, where certificates are
    /// written (`scheduler-1.pem`, `scheduler-1-key.pem`, ...).
    #[arg(long, default_value = "tls")]
    pub dir: PathBuf,
}

/// How a certificate is issued.
#[derive(Args, Debug)]
pub struct CertsIssue {
    /// A host name or IP address clients may also check the certificate
    /// against (grpcurl does); repeat for several.
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// How long the certificate is valid, in days.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub days: u32,
}

/// Transport security, for client commands and daemons alike (a daemon's
/// flags override its `[tls]` and `insecure` keys). The environment
/// variables are read by client commands only: a daemon ignores them.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// The cluster CA's certificate (PEM): whom to trust. (The variable is
    /// read by client commands only, never by a daemon.)
    #[arg(long, global = true, env = "FERRY_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This holder's certificate (PEM, from `ferry certs`): a user's for
    /// client commands, the node's own for a daemon.
    #[arg(long, global = true, env = "FERRY_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, global = true, env = "FERRY_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Plaintext, with no one checked: only for a trusted network (a
    /// daemon warns at start).
    #[arg(long, global = true, env = "FERRY_INSECURE", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    pub insecure: bool,
}

impl TlsArgs {
    /// The `[tls]` settings these flags name.
    pub fn config(&self) -> ferry_sdk::tls::TlsConfig {
        ferry_sdk::tls::TlsConfig { ca: self.tls_ca.clone(), cert: self.tls_cert.clone(), key: self.tls_key.clone() }
    }

    /// Drops what came from the environment rather than the command line.
    pub fn forget_env(&mut self, matches: &clap::ArgMatches) {
        let from_env = |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::EnvVariable);
        for (id, value) in
            [("tls_ca", &mut self.tls_ca), ("tls_cert", &mut self.tls_cert), ("tls_key", &mut self.tls_key)]
        {
            if from_env(id) {
                *value = None;
            }
        }
        if from_env("insecure") {
            self.insecure = false;
        }
    }

    /// Overrides a daemon's `[tls]` and `insecure` with the flags given.
    pub fn apply(&self, tls: &mut ferry_sdk::tls::TlsConfig, insecure: &mut bool) {
        let given = self.config();
        for (mine, flag) in [(&mut tls.ca, given.ca), (&mut tls.cert, given.cert), (&mut tls.key, given.key)] {
            if flag.is_some() {
                *mine = flag;
            }
        }
        if self.insecure {
            *insecure = true;
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run one scheduler node (a member of the Raft group).
    Scheduler(Box<SchedulerArgs>),
    /// Run a three-node cluster in this process, for trying Ferry out.
    Dev(DevArgs),
    /// Inspect and change the scheduler group.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Read and write replicated configuration keys.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Leases: a TTL keys can be bound to.
    #[command(subcommand)]
    Lease(LeaseCmd),
    /// The service registry: instances bound to leases.
    #[command(subcommand)]
    Registry(RegistryCmd),
    /// Probes: workers time downloads from several targets and rank them.
    #[command(subcommand)]
    Probe(ProbeCmd),
    /// Run a worker daemon (with flags), or list workers (`ferry worker list`).
    Worker(WorkerCmd),
    /// Push files to workers and follow the jobs.
    #[command(subcommand)]
    Job(JobCmd),
    /// Ferry's main job on loopback: 3 schedulers and 6 workers in this
    /// process push a 200 MB file to every worker, then push a 1 MB change.
    Demo(DemoArgs),
    /// Make the cluster's CA and issue scheduler, worker and user
    /// certificates (docs/operations/security.md).
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Print a shell completion script, e.g.
    /// `ferry completions bash > /etc/bash_completion.d/ferry`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
    },
}

/// Shells `ferry completions` writes scripts for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shell {
    /// Bash: source it, or put it in `/etc/bash_completion.d/ferry`.
    Bash,
    /// Zsh: save it as `_ferry` in a directory on `$fpath`.
    Zsh,
    /// Fish: save it as `~/.config/fish/completions/ferry.fish`.
    Fish,
}

/// Flags of `ferry demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size of the file to push (e.g. 200MB, 1GiB).
    #[arg(long, default_value = "200MB", value_parser = ferry_worker::config::parse_rate)]
    pub size: u64,
    /// Number of workers (one is the source).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(2..=64))]
    pub workers: u64,
    /// Keep data here (default: a temporary directory removed at the end).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

impl Command {
    /// Daemons log at info by default, client commands at warn.
    pub fn is_daemon(&self) -> bool {
        matches!(self, Command::Scheduler(_) | Command::Dev(_) | Command::Demo(_))
            || matches!(self, Command::Worker(w) if w.sub.is_none())
    }
}

/// Flags of `ferry scheduler`; each overrides the same key of `--config`.
#[derive(Args, Debug)]
pub struct SchedulerArgs {
    /// TOML file with the same settings (keys use underscores); flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This node's id (1, 2, 3, ...), unique and never reused.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub id: Option<u64>,
    /// gRPC listen address (Raft, clients, health, reflection).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// HOST:PORT that peers and clients use to reach this node (default: --listen).
    #[arg(long, value_parser = host_port)]
    pub advertise: Option<String>,
    /// Admin HTTP listen address: /metrics, /healthz, /readyz.
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// Data directory (created if missing).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// ID=HOST:PORT,... of a new cluster. Used only when the data directory
    /// is empty; a restarted node keeps its membership.
    #[arg(long, value_parser = initial_cluster)]
    pub initial_cluster: Option<String>,
    /// Mixed into the cluster id made at bootstrap: give each cluster its
    /// own when several are bootstrapped with the same member addresses.
    #[arg(long)]
    pub initial_cluster_token: Option<String>,
    /// Leader heartbeat interval (e.g. 50ms).
    #[arg(long, value_parser = duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Minimum election timeout (e.g. 300ms).
    #[arg(long, value_parser = duration)]
    pub election_timeout_min: Option<Duration>,
    /// Maximum election timeout (e.g. 600ms).
    #[arg(long, value_parser = duration)]
    pub election_timeout_max: Option<Duration>,
    /// Deadline of one Raft RPC (e.g. 2s).
    #[arg(long, value_parser = duration)]
    pub rpc_timeout: Option<Duration>,
    /// Deadline to stream one snapshot to a follower (e.g. 60s).
    #[arg(long, value_parser = duration)]
    pub snapshot_timeout: Option<Duration>,
    /// Build a snapshot every this many log entries (the nodes a third of
    /// it apart).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_every: Option<u64>,
    /// Log entries kept behind a snapshot for lagging followers.
    #[arg(long)]
    pub logs_to_keep: Option<u64>,
    /// Registry protect threshold: when more than this share of a service's
    /// instances would expire at once, keep them as suspect (default 0.5).
    #[arg(long)]
    pub registry_protect_threshold: Option<f64>,
    /// Finished jobs kept; older ones are forgotten (0: keep all; default 1000).
    #[arg(long)]
    pub job_history: Option<u64>,
    /// A host job callbacks and probe alerts may go to: a name, `*.domain`,
    /// an IP address or network (repeatable; replaces `callback_hosts`).
    #[arg(long = "callback-host", value_name = "HOST")]
    pub callback_hosts: Vec<String>,
}

/// Flags of `ferry dev`.
#[derive(Args, Debug)]
pub struct DevArgs {
    /// gRPC port of node 1; nodes 2 and 3 take the next two. 0 picks free ports.
    #[arg(long, default_value_t = 7001)]
    pub base_port: u16,
    /// Admin HTTP port of node 1 (next two for nodes 2 and 3); 0 picks free ports.
    #[arg(long, default_value_t = 8001)]
    pub admin_base_port: u16,
    /// Keep data here (default: a temporary directory removed on exit).
    #[arg(long)]
    pub data: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Leader, term and every member with its role and applied index.
    Status,
    /// Add a scheduler: it joins as a learner, catches up, then votes.
    AddNode {
        /// The new node's id.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
        /// The new node's HOST:PORT (its --listen/--advertise).
        #[arg(long, value_parser = host_port)]
        addr: String,
        /// Keep it a non-voting learner.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a scheduler from the group.
    RemoveNode {
        /// The node's id.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Move leadership to another voter (before stopping the leader, e.g. to
    /// upgrade it): writes and reads wait, not fail, for about
    /// `election_timeout_max`.
    TransferLeader {
        /// The voter to lead next (default: the most caught-up one).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        to: Option<u64>,
    },
    /// Every member's state digest: replicas at the same applied index must
    /// show the same digest (exit 1 if a member does not answer).
    Digest,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Create or replace KEY.
    Put {
        /// The key: 1 to 4096 bytes.
        key: String,
        /// The value: up to 1 MiB; `-` reads it from stdin (as bytes).
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        value: Option<String>,
        /// Read the value from file F (as bytes, up to 1 MiB).
        #[arg(long, value_name = "F")]
        file: Option<std::path::PathBuf>,
        /// Only if KEY's modify revision is N (0: only if KEY does not exist).
        #[arg(long = "if-mod-rev", value_name = "N", conflicts_with = "lease")]
        if_mod_rev: Option<u64>,
        /// Bind KEY to lease ID: it is deleted when the lease ends.
        #[arg(long, value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
        lease: Option<u64>,
    },
    /// Print KEY's value (exit 1 and "not found" on stderr if missing).
    Get {
        /// The key to read.
        key: String,
        /// Read this node's replica without a read-index round trip.
        #[arg(long)]
        serializable: bool,
        /// KEY as it was at revision N.
        #[arg(long = "rev", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        rev: Option<u64>,
        /// Read as a reader with these labels (k=v,k2=v2) sees it: a
        /// matching gray variant, else the main value.
        #[arg(long, conflicts_with = "rev", value_parser = labels)]
        labels: Option<std::collections::BTreeMap<String, String>>,
    },
    /// Gray variants: values that only readers matching a selector see.
    #[command(subcommand)]
    Gray(GrayCmd),
    /// Delete KEY (exit 1 if it did not exist).
    Delete {
        /// The key to delete.
        key: String,
        /// Only if KEY's modify revision is N.
        #[arg(long = "if-mod-rev", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        if_mod_rev: Option<u64>,
    },
    /// KEY's changes still kept, oldest first: revision, type, value.
    History {
        /// The key.
        key: String,
        /// Only the newest N changes.
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Print changes under PREFIX as they happen, one per line, until
    /// interrupted (--json: one object per line with type, key, value,
    /// revision).
    Watch {
        /// Key prefix; empty watches every key.
        #[arg(default_value = "")]
        prefix: String,
        /// Start at revision N (earlier changes included); default: now.
        #[arg(long = "rev", value_name = "N", default_value_t = 0)]
        rev: u64,
    },
    /// Compare, then write, atomically (one log entry): when every --if-*
    /// holds, the --put/--delete writes apply, else the --else-* ones.
    /// Exit 0 when the compares held, 1 when one did not (why on stderr;
    /// only --else-* writes applied), 2 for bad input.
    Txn(Box<TxnArgs>),
    /// Every key starting with PREFIX, in order.
    List {
        /// Key prefix; empty lists every key.
        #[arg(default_value = "")]
        prefix: String,
        /// Read this node's replica without a read-index round trip.
        #[arg(long)]
        serializable: bool,
    },
}

/// Flags of `ferry config txn`. Each is repeatable; a key may be written
/// once per branch, so the order of the flags does not matter.
#[derive(Args, Debug)]
pub struct TxnArgs {
    /// Compare: KEY exists and was last changed at revision N (0: KEY does
    /// not exist, as with `config put --if-mod-rev 0`).
    #[arg(long = "if-mod-rev", value_name = "KEY=N", value_parser = key_revision)]
    pub if_mod_rev: Vec<(String, u64)>,
    /// Compare: KEY does not exist.
    #[arg(long = "if-absent", value_name = "KEY", value_parser = txn_key)]
    pub if_absent: Vec<String>,
    /// When the compares hold: create or replace KEY (split at the first '=').
    #[arg(long, value_name = "KEY=VALUE", value_parser = key_value)]
    pub put: Vec<(String, String)>,
    /// When the compares hold: delete KEY (nothing happens if it is absent).
    #[arg(long, value_name = "KEY", value_parser = txn_key)]
    pub delete: Vec<String>,
    /// When a compare does not hold: create or replace KEY.
    #[arg(long = "else-put", value_name = "KEY=VALUE", value_parser = key_value)]
    pub else_put: Vec<(String, String)>,
    /// When a compare does not hold: delete KEY.
    #[arg(long = "else-delete", value_name = "KEY", value_parser = txn_key)]
    pub else_delete: Vec<String>,
}

pub(crate) fn txn_key(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the key must not be empty".into());
    }
    Ok(s.to_string())
}

/// `KEY=VALUE`, split at the first '=' (the value may contain '=').
pub(crate) fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        Some(_) => Err(format!("'{s}' has an empty key")),
        None => Err(format!("'{s}' is not KEY=VALUE")),
    }
}

/// `KEY=N`, split at the last '=' (the key may contain '=').
pub(crate) fn key_revision(s: &str) -> Result<(String, u64), String> {
    let (k, n) = s.rsplit_once('=').ok_or_else(|| format!("'{s}' is not KEY=N"))?;
    if k.is_empty() {
        return Err(format!("'{s}' has an empty key"));
    }
    let n = n.trim().parse::<u64>().map_err(|_| format!("'{s}': N must be a revision (a whole number), got '{n}'"))?;
    Ok((k.to_string(), n))
}

pub(crate) fn host_port(s: &str) -> Result<String, String> {
    ferry_scheduler::config::parse_host_port(s.trim())?;
    Ok(s.trim().to_string())
}

pub(crate) fn initial_cluster(s: &str) -> Result<String, String> {
    ferry_scheduler::config::parse_initial_cluster(s)?;
    Ok(s.to_string())
}

/// `ferry config gray ...`.
#[derive(Subcommand, Debug)]
pub enum GrayCmd {
    /// Give readers matching SELECTOR the value VALUE for KEY.
    Set {
        /// The key.
        key: String,
        /// The variant's value.
        value: String,
        /// Who sees it: k=v,k2=v2 (all must match).
        #[arg(long)]
        selector: String,
    },
    /// Make a variant KEY's main value (the only one, or --selector's).
    Promote {
        /// The key.
        key: String,
        /// Which variant.
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Remove a variant of KEY (--selector's, or all).
    Drop {
        /// The key.
        key: String,
        /// Which variant; default: all.
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// KEY's variants.
    List {
        /// The key.
        key: String,
    },
}

/// `ferry lease ...`.
#[derive(Subcommand, Debug)]
pub enum LeaseCmd {
    /// A new lease; prints its id.
    Grant {
        /// Time to live: 1s to 24h (e.g. 10s).
        #[arg(value_parser = lease_ttl)]
        ttl: Duration,
    },
    /// Keep lease ID alive until interrupted (prints each renewal).
    Keepalive {
        /// The lease.
        id: u64,
    },
    /// End lease ID now; its keys are deleted.
    Revoke {
        /// The lease.
        id: u64,
    },
    /// Lease ID's TTL, time left and keys.
    Ttl {
        /// The lease.
        id: u64,
    },
}

/// `ferry registry ...`.
#[derive(Subcommand, Debug)]
pub enum RegistryCmd {
    /// Register an instance and keep it registered until interrupted
    /// (Ctrl-C deregisters it; a killed process drops out after --ttl).
    #[command(disable_version_flag = true)]
    Register {
        /// The service.
        service: String,
        /// Instance id, unique in the service.
        #[arg(long)]
        id: String,
        /// HOST:PORT clients reach it at.
        #[arg(long, value_parser = host_port)]
        addr: String,
        /// Relative share of traffic (default 100).
        #[arg(long, default_value_t = 100)]
        weight: u32,
        /// Version of the instance.
        #[arg(long, default_value = "")]
        version: String,
        /// Gray (canary) instance.
        #[arg(long)]
        gray: bool,
        /// A consumer of the service, not a provider.
        #[arg(long)]
        consumer: bool,
        /// Metadata: k=v,k2=v2.
        #[arg(long, value_parser = labels)]
        meta: Option<std::collections::BTreeMap<String, String>>,
        /// Labels: k=v,k2=v2.
        #[arg(long, value_parser = labels)]
        labels: Option<std::collections::BTreeMap<String, String>>,
        /// Lease TTL: the instance goes this long after the last renewal.
        #[arg(long, default_value = "10s", value_parser = lease_ttl)]
        ttl: Duration,
        /// Take ID over from the registration that holds it (which then
        /// exits 1); without it, a live holder makes this one exit 1.
        #[arg(long)]
        replace: bool,
    },
    /// The instances of SERVICE.
    List {
        /// The service.
        service: String,
    },
    /// Print SERVICE's instance list after every change until interrupted.
    Watch {
        /// The service.
        service: String,
    },
    /// Remove an instance now.
    Deregister {
        /// The service.
        service: String,
        /// Instance id.
        #[arg(long)]
        id: String,
    },
}

/// `ferry probe ...`.
#[derive(Subcommand, Debug)]
pub enum ProbeCmd {
    /// Add or replace a probe.
    Define {
        /// The probe's name.
        name: String,
        /// URL to download, optionally @HOST to send as the Host header
        /// (http://10.0.0.1:8081/2M.dat@cdn.example.com); repeat per target.
        #[arg(long = "target", required = true, value_parser = probe_target)]
        targets: Vec<(String, String)>,
        /// Time between rounds (1s to 1 day).
        #[arg(long, default_value = "60s", value_parser = duration)]
        interval: Duration,
        /// Time limit of one download (default: the interval shared by the
        /// targets, which are downloaded one by one).
        #[arg(long, value_parser = duration)]
        download_timeout: Option<Duration>,
        /// Which workers run it: k=v,k2=v2 (default: every worker).
        #[arg(long, default_value = "")]
        selector: String,
        /// File each running worker renders its ranking into (absolute,
        /// under the worker's allowed roots).
        #[arg(long)]
        output: Option<String>,
        /// Line template of the output: {rank} {url} {host} {ip} {total_ms}
        /// {ttfb_ms} {bytes} {error} (default "{url}").
        #[arg(long, default_value = "", requires = "output")]
        template: String,
        /// Only the best N targets in the output (0: all).
        #[arg(long, default_value_t = 0, requires = "output")]
        top: u32,
        /// Hook (named in the workers' config) run after the output changes.
        #[arg(long, default_value = "", requires = "output")]
        hook: String,
        /// Stale when no result arrived for this long (default 3 intervals).
        #[arg(long, value_parser = duration)]
        stale_after: Option<Duration>,
        /// Stale when a worker's output has not changed for this long.
        #[arg(long, value_parser = duration, requires = "output")]
        output_stale_after: Option<Duration>,
        /// http:// or https:// URL that gets a JSON POST when the probe turns stale.
        #[arg(long, default_value = "")]
        alert: String,
    },
    /// Every probe definition.
    List,
    /// The latest result per worker and target.
    Results {
        /// The probe.
        name: String,
        /// Only this worker's.
        #[arg(long)]
        worker: Option<String>,
    },
    /// Targets ranked by total time, errors last (median over workers, or
    /// one worker's own).
    Best {
        /// The probe.
        name: String,
        /// This worker's ranking.
        #[arg(long)]
        worker: Option<String>,
        /// Print the ranking again whenever it changes, until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Freshness of every probe (stale ones, and why).
    Status,
    /// Remove a probe and its results.
    Delete {
        /// The probe.
        name: String,
    },
}

/// `URL[@HOST]`: the Host part is split at the last '@' after the path begins.
pub(crate) fn probe_target(s: &str) -> Result<(String, String), String> {
    let s = s.trim();
    let after_scheme = s.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = s[after_scheme..].find('/').map(|i| i + after_scheme).unwrap_or(s.len());
    match s[path_start..].rfind('@') {
        Some(i) => Ok((s[..path_start + i].to_string(), s[path_start + i + 1..].to_string())),
        None => Ok((s.to_string(), String::new())),
    }
}

pub(crate) fn lease_ttl(s: &str) -> Result<Duration, String> {
    let d = duration(s)?;
    if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&d) {
        return Err(format!("'{s}' is out of range: a lease TTL is 1s to 24h"));
    }
    Ok(d)
}

pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration like 500ms or 2s: {e}"))
}

/// A duration of at least a millisecond (what the job service counts in).
pub(crate) fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = duration(s)?;
    if d < Duration::from_millis(1) {
        return Err(format!("'{s}' must be at least 1ms"));
    }
    Ok(d)
}

pub use crate::worker_args::*;
