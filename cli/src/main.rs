//! `ferry`: the one binary. Parses flags and calls a library; exit codes are
//! 0 for success, 1 for a failure or a missing key, 2 for bad input.

/// The crate's `println!`: through [`output::line`], so a closed stdout
/// ends a client command quietly instead of panicking. Defined before the
/// modules, so it is the one they see.
macro_rules! println {
    () => {
        $crate::output::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}

mod args;
mod certs_cmd;
mod client_cmd;
mod cluster_cmd;
mod completions_cmd;
mod daemon_cmd;
mod demo_cmd;
mod job_cmd;
mod output;
mod txn_cmd;
mod worker_args;
mod worker_cmd;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

/// Most open files a daemon asks for when its hard limit is unlimited.
const OPEN_FILES_CAP: libc::rlim_t = 1 << 20;

/// A daemon holds a descriptor per peer connection, per watch and client,
/// and per destination directory of a running job, so it lifts its soft
/// limit on open files to the hard one (as Go programs and most daemons
/// do). A failure leaves the limit as it was, with a warning.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid pointer to a live rlimit, which the call fills in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open files limit");
        return;
    }
    let want = limit.rlim_max.min(OPEN_FILES_CAP);
    if limit.rlim_cur >= want {
        return;
    }
    let before = limit.rlim_cur;
    limit.rlim_cur = want;
    // SAFETY: a valid pointer to a live rlimit; the call only reads it.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), before, want, "cannot raise the open files limit");
        return;
    }
    tracing::info!(before, now = want, "raised the open files limit");
}

fn main() -> ExitCode {
    let matches = args::Cli::command().get_matches();
    let mut cli = args::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if cli.command.is_daemon() {
        // The FERRY_TLS_* and FERRY_INSECURE variables are the CLI's (a
        // user's certificate): a daemon takes its own from flags or TOML.
        cli.client.tls.forget_env(&matches);
    }
    // The demo shares two cores between three schedulers and six workers;
    // openraft's retry chatter under that load would drown its output.
    let default_level = match &cli.command {
        args::Command::Demo(_) => "warn,openraft=off",
        // Three nodes starting in one process: openraft's chatter while
        // they find each other would bury what `ferry dev` prints.
        args::Command::Dev(_) => "info,openraft=off",
        c if c.is_daemon() => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colours only on a terminal: the journal and `docker logs` get plain lines.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    if cli.command.is_daemon() {
        output::set_daemon();
        raise_open_files_limit();
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            args::Command::Scheduler(a) => daemon_cmd::scheduler(*a, &cli.client.tls).await,
            args::Command::Dev(a) => daemon_cmd::dev(a, &cli.client.tls).await,
            args::Command::Cluster(c) => cluster_cmd::cluster(&cli.client, c).await,
            args::Command::Config(c) => client_cmd::config(&cli.client, c).await,
            args::Command::Lease(c) => client_cmd::lease(&cli.client, c).await,
            args::Command::Registry(c) => client_cmd::registry(&cli.client, c).await,
            args::Command::Probe(c) => client_cmd::probe(&cli.client, c).await,
            args::Command::Worker(w) => match w.sub {
                Some(args::WorkerSub::List) => worker_cmd::list(&cli.client).await,
                Some(args::WorkerSub::Drain { name }) => worker_cmd::drain(&cli.client, &name).await,
                None => worker_cmd::run(*w.run, &cli.client.tls).await,
            },
            args::Command::Job(j) => job_cmd::run(&cli.client, j).await,
            args::Command::Demo(d) => demo_cmd::run(d).await,
            args::Command::Certs(c) => certs_cmd::run(c),
            args::Command::Completions { shell } => completions_cmd::run(shell),
        }
    });
    ExitCode::from(code)
}
