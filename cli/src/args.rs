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
    /// Give up on a call after this long, retries included (e.g. 15s).
    #[arg(long, global = true, default_value = "15s", value_parser = duration)]
    pub timeout: Duration,
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
}

impl Command {
    /// Daemons log at info by default, client commands at warn.
    pub fn is_daemon(&self) -> bool {
        matches!(self, Command::Scheduler(_) | Command::Dev(_))
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
    /// Build a snapshot every this many log entries.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_every: Option<u64>,
    /// Log entries kept behind a snapshot for lagging followers.
    #[arg(long)]
    pub logs_to_keep: Option<u64>,
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
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Create or replace KEY.
    Put {
        /// The key: 1 to 4096 bytes.
        key: String,
        /// The value: up to 1 MiB.
        value: String,
    },
    /// Print KEY's value (exit 1 and "not found" on stderr if missing).
    Get {
        /// The key to read.
        key: String,
        /// Read this node's replica without a read-index round trip.
        #[arg(long)]
        serializable: bool,
    },
    /// Delete KEY (exit 1 if it did not exist).
    Delete {
        /// The key to delete.
        key: String,
    },
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

fn host_port(s: &str) -> Result<String, String> {
    ferry_scheduler::config::parse_host_port(s.trim())?;
    Ok(s.trim().to_string())
}

fn initial_cluster(s: &str) -> Result<String, String> {
    ferry_scheduler::config::parse_initial_cluster(s)?;
    Ok(s.to_string())
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration like 500ms or 2s: {e}"))
}
