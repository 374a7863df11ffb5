//! `ferry-bench big`: what the largest legal requests cost everyone else.
//!
//! Three `ferry scheduler` processes; one client puts small values one
//! after another (through a follower, so every write is forwarded) for a
//! phase without other load (the baseline), then for a phase while another
//! client sends the largest requests the cluster accepts, back to back: 1
//! MiB values, 1.5 MiB transactions, gray variants with a 64-pair selector
//! and a 1 MiB value. Prints the small writes' latency in both phases, the
//! longest gap between two completed small writes, whether any failed, and
//! whether the Raft term moved (an election: the leader looked dead).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_sdk::pb;

use crate::procs::{ferry_beside_bench, FerryProcs};
use crate::stats::{median, Latencies};

/// Flags of `ferry-bench big`.
#[derive(clap::Args)]
pub struct Args {
    /// Length of each phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Runs (each: a fresh cluster, a baseline phase, a loaded phase).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The `ferry` binary (default: the one beside this bench).
    #[arg(long)]
    ferry: Option<PathBuf>,
    /// Pause between two large requests (0: back to back, the worst case;
    /// 1s: what one large request at a time costs).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    every: Duration,
}

/// One phase's small writes.
struct Phase {
    latencies: Latencies,
    /// Longest time between two completed small writes.
    gap: Duration,
    failed: usize,
}

fn put(key: &str, value: Vec<u8>) -> pb::TxnOp {
    pb::TxnOp { op: Some(pb::txn_op::Op::Put(pb::PutRequest { key: key.into(), value, ..Default::default() })) }
}

/// Small puts for `duration`, one after another.
async fn small_writes(client: ferry_sdk::Client, duration: Duration) -> Phase {
    let (mut samples, mut gap, mut failed) = (Vec::new(), Duration::ZERO, 0);
    let end = Instant::now() + duration;
    let mut last = Instant::now();
    let mut n = 0u64;
    while Instant::now() < end {
        let started = Instant::now();
        match client.put("small", n.to_string().into_bytes()).await {
            Ok(_) => samples.push(started.elapsed()),
            Err(_) => failed += 1,
        }
        gap = gap.max(last.elapsed());
        last = Instant::now();
        n += 1;
    }
    Phase { latencies: Latencies::new(samples), gap, failed }
}

/// The largest legal requests, `every` apart, until `stop`; how many.
async fn big_requests(client: ferry_sdk::Client, stop: Arc<AtomicBool>, every: Duration) -> anyhow::Result<u64> {
    let selector: String = (0..64).map(|i| format!("label{i}={}", "v".repeat(100))).collect::<Vec<_>>().join(",");
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match n % 3 {
            0 => client
                .put(&format!("big/{}", n % 16), vec![b'm'; 1024 * 1024])
                .await
                .map(|_| ())
                .context("a 1 MiB put")?,
            1 => {
                let ops = vec![put("tx/a", vec![b'a'; 1024 * 1024]), put("tx/b", vec![b'b'; 512 * 1024 - 8])];
                client.txn(pb::TxnRequest { success: ops, ..Default::default() }).await.context("a 1.5 MiB txn")?;
            }
            _ => {
                let value = vec![b'g'; 1024 * 1024];
                let set = client.gray(pb::gray_request::Action::Set, "gray", &selector, value);
                set.await.context("a full gray variant")?;
            }
        }
        n += 1;
        tokio::time::sleep(every).await;
    }
    Ok(n)
}

fn ms(s: f64) -> String {
    format!("{:.1} ms", s * 1000.0)
}

/// Runs the bench.
pub async fn run(a: Args) -> anyhow::Result<()> {
    let bin = a.ferry.clone().or_else(ferry_beside_bench).context("no ferry binary: build it or pass --ferry")?;
    println!(
        "small writes alone, then beside the largest legal requests ({:?} apart); {} runs of 2 x {:?}",
        a.every, a.runs, a.duration
    );
    let (mut p99_ratio, mut max_ratio) = (Vec::new(), Vec::new());
    let mut elections = 0;
    for run in 1..=a.runs {
        let dir = tempfile::tempdir()?;
        let procs = FerryProcs::start(&bin, dir.path(), false).await?;
        let endpoints = procs.endpoints();
        let all = ferry_sdk::Client::connect(&endpoints, procs.security())?;
        let leader = all.status().await?.leader_addr;
        let follower = endpoints.iter().find(|e| **e != leader).cloned().context("a follower")?;
        let small = ferry_sdk::Client::connect([follower], procs.security())?;
        // A fresh cluster settles first (its first heartbeats, connections).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let term = all.status().await?.term;
        let alone = small_writes(small.clone(), a.duration).await;
        let term_alone = all.status().await?.term;
        let stop = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn(big_requests(all.clone(), stop.clone(), a.every));
        let beside = small_writes(small, a.duration).await;
        stop.store(true, Ordering::Relaxed);
        let sent = load.await??;
        let moved = all.status().await?.term != term_alone;
        if term_alone != term {
            println!("run {run}: the term moved during the phase without large requests (noise of this machine)");
        }
        elections += usize::from(moved);
        for (name, p) in [("alone", &alone), ("beside", &beside)] {
            println!(
                "run {run} {name:>6}: {} small writes, p50 {}, p99 {}, max {}, longest gap {}, failed {}",
                p.latencies.len(),
                ms(p.latencies.quantile(0.5)),
                ms(p.latencies.quantile(0.99)),
                ms(p.latencies.quantile(1.0)),
                ms(p.gap.as_secs_f64()),
                p.failed
            );
        }
        // Each round of three carries 1 + 1.5 + 1 MiB.
        let mib = sent as f64 * 3.5 / 3.0;
        println!(
            "run {run}: {sent} large requests (about {mib:.0} MiB); term during them {}",
            if moved { "MOVED" } else { "unchanged" }
        );
        p99_ratio.push(beside.latencies.quantile(0.99) / alone.latencies.quantile(0.99));
        max_ratio.push(beside.latencies.quantile(1.0) / alone.latencies.quantile(1.0));
    }
    println!(
        "median over runs: small-write p99 beside / alone {:.2}, max beside / alone {:.2}; \
         runs with an election during the large requests: {elections}",
        median(p99_ratio),
        median(max_ratio)
    );
    Ok(())
}
