//! Command-line flags of `ferry worker` and `ferry job`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::args::*;

/// `ferry worker`: run the daemon, or a subcommand.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct WorkerCmd {
    #[command(subcommand)]
    pub sub: Option<WorkerSub>,
    #[command(flatten)]
    pub run: Box<WorkerArgs>,
}

#[derive(Subcommand, Debug)]
pub enum WorkerSub {
    /// Every registered worker: labels, state (up/down/draining), last seen, version.
    List,
    /// Drain a worker before stopping it (an upgrade): it takes no new pulls
    /// or uploads, finishes those in flight, and exits; waits until it has.
    Drain {
        /// The worker's name.
        name: String,
    },
}

/// Flags of the worker daemon; each overrides the same key of `--config`.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// TOML file with the same settings (keys use underscores); flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Unique name of this worker.
    #[arg(long)]
    pub name: Option<String>,
    /// Chunk service listen address (peers pull from here).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Admin HTTP listen address: /metrics, /healthz, /readyz.
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// HOST:PORT peers use to reach --listen (default: --listen).
    #[arg(long, value_parser = host_port)]
    pub advertise: Option<String>,
    /// Schedulers, comma-separated HOST:PORT (the worker follows the leader).
    #[arg(long, value_delimiter = ',', value_parser = host_port)]
    pub schedulers: Vec<String>,
    /// Data directory (chunk index).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// A directory this worker may read from and write to (repeatable).
    #[arg(long = "allow-root")]
    pub allow_root: Vec<PathBuf>,
    /// A host this worker may download probe targets from: a name,
    /// `*.domain`, an IP address or network (repeatable; replaces
    /// `fetch_hosts`).
    #[arg(long = "fetch-host", value_name = "HOST")]
    pub fetch_hosts: Vec<String>,
    /// Labels for selectors: k=v,k2=v2.
    #[arg(long, value_parser = labels)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    /// A named hook: NAME='command args' (repeatable). Jobs can run only these.
    #[arg(long = "hook", value_parser = hook)]
    pub hooks: Vec<(String, String)>,
    /// Most chunks served to peers at once.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_uploads: Option<u64>,
    /// Most chunks pulled at once.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_downloads: Option<u64>,
    /// Upload bandwidth cap, e.g. 100MiB/s.
    #[arg(long, value_parser = ferry_worker::config::parse_rate)]
    pub upload_limit: Option<u64>,
    /// Download bandwidth cap, e.g. 100MiB/s.
    #[arg(long, value_parser = ferry_worker::config::parse_rate)]
    pub download_limit: Option<u64>,
    /// A pull that receives nothing for this long fails and is planned from
    /// another holder (default 10s, at most 60s).
    #[arg(long, value_parser = duration)]
    pub pull_stall_timeout: Option<Duration>,
    /// On SIGTERM or `ferry worker drain`: how long to wait for pulls and
    /// uploads in flight before exiting (default 30s, at most 1h).
    #[arg(long, value_parser = duration)]
    pub drain_timeout: Option<Duration>,
    /// Leave chunk sockets at the host's default priority (by default pulls
    /// go first in the host's queue and uploads last).
    #[arg(long)]
    pub no_socket_priority: bool,
    /// Bytes of replaced file versions kept for reuse, e.g. 2GiB (0: none; default 1GiB).
    #[arg(long, value_parser = ferry_worker::config::parse_rate)]
    pub store_limit: Option<u64>,
    /// Write config into a file: KEY=PATH[:raw[:HOOK]] writes one key's
    /// value; PREFIX=PATH:json|properties[:HOOK] every key under a prefix
    /// (names without the prefix). Repeatable; adds to the TOML's
    /// [[config_files]]. PATH must be under an allowed root, HOOK a --hook.
    #[arg(long = "config-file", value_name = "KEY_OR_PREFIX=PATH[:FORMAT[:HOOK]]",
          value_parser = ferry_worker::config::ConfigFileRule::from_spec)]
    pub config_files: Vec<ferry_worker::config::ConfigFileRule>,
    /// How often config files are read again without a change event
    /// (picks up gray variants), e.g. 30s.
    #[arg(long, value_parser = duration)]
    pub config_resync: Option<Duration>,
}

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// Push files from a source worker to targets. Exit 0 only when every
    /// target installed its files or already had them.
    Submit(Box<SubmitArgs>),
    /// The report of a job.
    Status {
        /// Job id.
        id: String,
    },
    /// Every job, one line each.
    List,
    /// Follow a job's progress until it ends.
    Watch {
        /// Job id.
        id: String,
    },
    /// Stop a job: transfers stop, installed files stay, staged data goes.
    Cancel {
        /// Job id.
        id: String,
    },
}

/// Flags of `ferry job submit`.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The worker that has the files.
    #[arg(long)]
    pub source: String,
    /// Absolute path of a file on the source (repeatable).
    #[arg(long = "file", required = true)]
    pub files: Vec<String>,
    /// Target workers, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub to: Vec<String>,
    /// Targets by label selector: k=v,k2=v2 (all must match).
    #[arg(long, default_value = "")]
    pub selector: String,
    /// Destination: absolute path, or relative to each target's first root;
    /// ending in / means a directory. Default: the same path as the source.
    #[arg(long, default_value = "")]
    pub dest: String,
    /// A hook named in each target's config, run after install.
    #[arg(long, default_value = "")]
    pub hook: String,
    /// http:// or https:// URL that gets the final report as a JSON POST.
    #[arg(long, default_value = "")]
    pub callback: String,
    /// Deadline of the whole job, from submission to the last install
    /// (at most 7 days); targets not done by then fail with a reason.
    #[arg(long, default_value = "10m", value_parser = positive_duration)]
    pub job_timeout: Duration,
    /// A target disconnected longer than this fails; back sooner, it resumes.
    #[arg(long, default_value = "30s", value_parser = positive_duration)]
    pub grace: Duration,
    /// Wait for the job to end, showing progress, and print the report.
    #[arg(long)]
    pub wait: bool,
}

pub(crate) fn labels(s: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| format!("'{part}' is not key=value"))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

pub(crate) fn hook(s: &str) -> Result<(String, String), String> {
    let (name, cmd) = s.split_once('=').ok_or_else(|| format!("'{s}' is not NAME=COMMAND"))?;
    Ok((name.trim().to_string(), cmd.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_subcommand_is_well_formed() {
        // Catches clashing flag names (such as --version) in any subcommand.
        super::Cli::command().debug_assert();
    }

    #[test]
    fn a_calls_deadline_and_a_jobs_deadline_are_separate_flags_with_shown_defaults() {
        use clap::Parser;
        let submit = ["job", "submit", "--source", "s", "--file", "/a", "--to", "t"];
        let parse = |pre: &[&str], post: &[&str]| {
            let argv = ["ferry"].iter().chain(pre).chain(&submit).chain(post).copied();
            let cli = super::Cli::try_parse_from(argv).expect("parses");
            let super::Command::Job(super::JobCmd::Submit(a)) = cli.command else { panic!("not job submit") };
            (cli.client.timeout, a.job_timeout, a.grace)
        };
        let (call, job, grace) = parse(&[], &[]);
        assert_eq!(call, std::time::Duration::from_secs(15));
        assert_eq!(job, std::time::Duration::from_secs(600), "the job service's documented default");
        assert_eq!(grace, std::time::Duration::from_secs(30));
        let (call, job, _) = parse(&["--timeout", "3s"], &[]);
        assert_eq!((call, job), (std::time::Duration::from_secs(3), std::time::Duration::from_secs(600)));
        let (call, job, _) = parse(&[], &["--job-timeout", "2h", "--timeout", "4s"]);
        assert_eq!((call, job), (std::time::Duration::from_secs(4), std::time::Duration::from_secs(7200)));
        let err = super::Cli::try_parse_from(["ferry"].iter().chain(&submit).chain(&["--job-timeout", "0s"]))
            .expect_err("a zero deadline");
        assert!(err.to_string().contains("--job-timeout"), "{err}");
        let mut cmd = super::Cli::command();
        // Global flags reach subcommands when the command is built.
        cmd.build();
        let help = cmd
            .find_subcommand_mut("job")
            .and_then(|j| j.find_subcommand_mut("submit"))
            .expect("job submit")
            .render_long_help()
            .to_string();
        for shown in ["--job-timeout <JOB_TIMEOUT>", "[default: 10m]", "[default: 30s]", "[default: 15s]"] {
            assert!(help.contains(shown), "'{shown}' not in job submit --help:\n{help}");
        }
    }

    #[test]
    fn completions_take_bash_zsh_or_fish_only() {
        use clap::Parser;
        for (name, shell) in [("bash", super::Shell::Bash), ("zsh", super::Shell::Zsh), ("fish", super::Shell::Fish)] {
            let cli = super::Cli::try_parse_from(["ferry", "completions", name]).expect(name);
            assert!(matches!(cli.command, super::Command::Completions { shell: s } if s == shell), "{name}");
        }
        let err = super::Cli::try_parse_from(["ferry", "completions", "tcsh"]).expect_err("tcsh is not supported");
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
    }
}
