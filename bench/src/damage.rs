//! `ferry-bench damage`: what a start makes of a damaged data directory.
//!
//! A one-node cluster (`ferry scheduler --initial-cluster 1=ADDR`) takes
//! `--keys` puts, each its own log entry, and stops cleanly (SIGTERM), so
//! its log is all in sled. Then, per trial, a copy of its data directory
//! gets one byte flipped at a random offset of `--file` (default
//! `sled/db`, the case), and the binary starts on the copy with the
//! same flags. A trial ends one of three ways:
//! - **refused**: the node exits non-zero (the time from spawn to its exit
//!   is the refusal time);
//! - **whole**: it serves every key (the byte hit nothing that matters, or
//!   sled repaired it);
//! - **lost**: it serves fewer keys. This is the outcome the start checks
//!   exist to prevent: a node that lost acknowledged writes and says
//!   nothing;
//! - **stuck**: it runs but serves nothing within 10 s (or exits 0).
//!
//! Prints the count of each and the median refusal time. Run it against
//! the build before a change (`--ferry`) for the contrast. With `--crash`
//! the node is killed instead (its journal then holds the writes), and
//! `--within N` puts the byte among the file's first N (the records of a
//! journal, say).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::procs::{ferry_beside_bench, free_ports, log_tail, spawn_logged};
use crate::stats::median;

/// Flags of `ferry-bench damage`.
#[derive(clap::Args)]
pub struct Args {
    /// Keys written before the damage (one log entry each).
    #[arg(long, default_value_t = 200)]
    keys: usize,
    /// Trials (one flipped byte each).
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// The file to damage, relative to the data directory.
    #[arg(long, default_value = "sled/db")]
    file: PathBuf,
    /// Flip a byte among the first this many of the file only (0: the
    /// whole file): for a journal, the records written.
    #[arg(long, default_value_t = 0)]
    within: u64,
    /// Stop the node with SIGKILL instead of SIGTERM, so the journal still
    /// holds the records of the writes (a clean stop checkpoints them).
    #[arg(long)]
    crash: bool,
    /// Seed of the offsets (the same seed damages the same bytes).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The `ferry` binary (default: the one beside this bench).
    #[arg(long)]
    ferry: Option<PathBuf>,
}

/// How one trial ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Refused(Duration),
    Whole,
    Lost(usize),
    Stuck,
}

/// xorshift64*: offsets that a seed repeats.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// A one-node scheduler on `data`, in plaintext: what is measured here is
/// the data directory, not the transport.
fn scheduler(bin: &Path, data: &Path, addr: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(["scheduler", "--id", "1", "--insecure", "--listen", addr])
        .arg("--data")
        .arg(data)
        .args(["--initial-cluster", &format!("1={addr}")])
        .env("RUST_LOG", "warn");
    cmd
}

/// Keys under `k/` the node at `addr` serves, once it has a leader.
async fn served(addr: &str) -> Option<usize> {
    let client = ferry_sdk::Client::connect(&[addr.to_string()], ferry_sdk::Security::Insecure).ok()?;
    client.status().await.ok().filter(|s| !s.leader_addr.is_empty())?;
    client.list("k/", false).await.ok().map(|keys| keys.len())
}

/// Writes the keys and stops the node cleanly: the pristine directory.
async fn prepare(bin: &Path, dir: &Path, keys: usize, crash: bool) -> anyhow::Result<PathBuf> {
    let data = dir.join("pristine");
    let addr = format!("127.0.0.1:{}", free_ports(1)?[0]);
    let log = dir.join("pristine.log");
    let mut child = spawn_logged(scheduler(bin, &data, &addr), &log)?;
    let client = ferry_sdk::Client::connect(std::slice::from_ref(&addr), ferry_sdk::Security::Insecure)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.put("k/0", b"v".to_vec()).await.is_err() {
        if Instant::now() > deadline {
            bail!("the node took no write within 20 s:\n{}", log_tail(&log));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 1..keys {
        client.put(&format!("k/{i}"), b"v".to_vec()).await.context("put")?;
    }
    let signal = if crash { libc::SIGKILL } else { libc::SIGTERM };
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    child.wait()?;
    Ok(data)
}

async fn trial(
    bin: &Path,
    pristine: &Path,
    dir: &Path,
    args: &Args,
    rng: &mut u64,
    n: usize,
) -> anyhow::Result<Outcome> {
    let data = dir.join(format!("t{n}"));
    let copied = Command::new("cp").arg("-a").arg(pristine).arg(&data).status()?;
    anyhow::ensure!(copied.success(), "cp -a {}", pristine.display());
    let target = data.join(&args.file);
    let mut bytes = std::fs::read(&target).with_context(|| format!("reading {}", target.display()))?;
    anyhow::ensure!(!bytes.is_empty(), "{} is empty", target.display());
    let span = match args.within {
        0 => bytes.len() as u64,
        within => within.min(bytes.len() as u64),
    };
    let at = (next(rng) % span) as usize;
    bytes[at] ^= 1 << (next(rng) % 8);
    std::fs::write(&target, &bytes)?;

    let addr = format!("127.0.0.1:{}", free_ports(1)?[0]);
    let started = Instant::now();
    let mut child = spawn_logged(scheduler(bin, &data, &addr), &dir.join(format!("t{n}.log")))?;
    // A refusal comes within a second or so: watched closely first, so its
    // time is exact to a few milliseconds.
    while child.try_wait()?.is_none() && started.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let outcome = loop {
        if let Some(status) = child.try_wait()? {
            break if status.success() { Outcome::Stuck } else { Outcome::Refused(started.elapsed()) };
        }
        // The SDK retries a node that does not answer: ask briefly.
        if let Ok(Some(count)) = tokio::time::timeout(Duration::from_millis(200), served(&addr)).await {
            break if count == args.keys { Outcome::Whole } else { Outcome::Lost(count) };
        }
        if started.elapsed() > Duration::from_secs(10) {
            break Outcome::Stuck;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    child.kill().ok();
    child.wait().ok();
    std::fs::remove_dir_all(&data).ok();
    println!("trial {n}: byte {at} of {}: {outcome:?}", args.file.display());
    let log = log_tail(&dir.join(format!("t{n}.log")));
    match outcome {
        Outcome::Stuck => println!("{log}"),
        Outcome::Refused(_) => {
            let reason = log.lines().rev().find(|l| l.contains("error")).unwrap_or_default();
            println!("  {}", reason.chars().take(160).collect::<String>());
        }
        _ => {}
    }
    Ok(outcome)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let bin = match &args.ferry {
        Some(path) => path.clone(),
        None => ferry_beside_bench().context("no ferry binary beside the bench; pass --ferry")?,
    };
    let tmp = tempfile::tempdir()?;
    let pristine = prepare(&bin, tmp.path(), args.keys, args.crash).await?;
    let mut rng = args.seed.max(1);
    let mut outcomes = Vec::new();
    for n in 0..args.trials {
        outcomes.push(trial(&bin, &pristine, tmp.path(), &args, &mut rng, n).await?);
    }
    let refusals: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Refused(took) => Some(took.as_secs_f64() * 1000.0),
            _ => None,
        })
        .collect();
    let whole = outcomes.iter().filter(|o| **o == Outcome::Whole).count();
    let lost = outcomes.iter().filter(|o| matches!(o, Outcome::Lost(_))).count();
    let stuck = outcomes.iter().filter(|o| **o == Outcome::Stuck).count();
    println!("\nferry: {}", bin.display());
    println!("{} keys, {} trials, one flipped byte of {} each", args.keys, args.trials, args.file.display());
    println!("| refused | whole | lost (silently) | stuck | median ms from start to refusal |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    let refusal = if refusals.is_empty() { "-".into() } else { format!("{:.0}", median(refusals.clone())) };
    println!("| {} | {whole} | {lost} | {stuck} | {refusal} |", refusals.len());
    Ok(())
}
