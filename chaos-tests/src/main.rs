//! `ferry-chaos`: list the scenarios, run one or all, print the report.
//! Exit 0 when every run passed, 1 when a checker found something, 2 on
//! bad flags.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_chaos::scenario::{self, Options, SCENARIOS};

#[derive(Parser)]
#[command(name = "ferry-chaos", about = "Break a real Ferry cluster on purpose and check what still holds")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The scenarios, one a line.
    List,
    /// Runs a scenario (or `--all`) and prints the checkers' verdict.
    Run {
        /// The scenario (see `list`).
        #[arg(required_unless_present = "all")]
        scenario: Option<String>,
        /// Every scenario, one after another.
        #[arg(long)]
        all: bool,
        /// How long the workload and the faults run.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Seed of every random choice (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Mean time between two faults (default: 5s; the soak's 2m).
        #[arg(long, value_parser = humantime::parse_duration)]
        every: Option<Duration>,
        /// The `ferry` binary (default: the one beside this one).
        #[arg(long)]
        ferry: Option<PathBuf>,
        /// An older `ferry` for the scenarios that start on one
        /// (`rolling-upgrade`, `mixed-*`); `--all` skips them without it.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Keep the data, logs and history even if the run passes.
        #[arg(long)]
        keep: bool,
        /// Read without a read barrier: stale reads the API allows, which
        /// the checker must report (a self-test of the harness: expect FAIL).
        #[arg(long)]
        serializable_reads: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let Command::Run { scenario, all, duration, seed, every, ferry, from, keep, serializable_reads } = cli.command
    else {
        for (name, about) in SCENARIOS {
            println!("{name:<24} {about}");
        }
        return Ok(());
    };
    let ferry = match ferry {
        Some(path) => path,
        None => std::env::current_exe()?.parent().context("no directory of ferry-chaos")?.join("ferry"),
    };
    anyhow::ensure!(ferry.is_file(), "no ferry binary at {} (build it, or pass --ferry)", ferry.display());
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    println!("seed {seed} (replay with --seed {seed})");
    let names: Vec<String> = match scenario {
        Some(name) if !all => vec![name],
        _ => SCENARIOS.iter().map(|(name, _)| name.to_string()).filter(|name| name != "soak").collect(),
    };
    if let Some(from) = &from {
        anyhow::ensure!(from.is_file(), "--from: no ferry binary at {}", from.display());
    }
    let options =
        Options { ferry, duration, seed, every, dir: None, keep, serializable: serializable_reads, base: from.clone() };
    let mut failed = false;
    for name in names {
        let plan = scenario::plan_of(&name)?;
        let kind = plan.kind;
        if all && !plan.base.is_empty() && from.is_none() {
            println!("scenario {name}: skipped, it starts on an older ferry (--from)");
            continue;
        }
        if let (true, Some(why)) = (all && (kind.network() || kind.small_disks()), ferry_lab::netns::Lab::unavailable())
        {
            println!("scenario {name}: skipped, it needs network namespaces ({why})");
            continue;
        }
        if let (true, Some(why)) = (all && kind.power_loss(), ferry_chaos::lazyfs::LazyFs::unsupported()) {
            println!("scenario {name}: skipped, it needs a FUSE mount ({why})");
            continue;
        }
        let report = scenario::run(&name, &options).await?;
        print!("{}", report.text());
        failed |= !report.passed();
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
