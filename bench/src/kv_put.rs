//! `kv-put`: puts of 8-byte keys and 256-byte values with 1, 16 and 256
//! concurrent clients against a three-node cluster (started in this process
//! unless `--endpoints` names a running one). Prints throughput, p50/p99
//! latency and puts per log fsync on the leader, and compares throughput
//! with the baseline of one fsync per write on the same disk.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_scheduler::LocalCluster;
use ferry_sdk::{Client, ClientOptions};

use crate::stats::{median, Latencies};

struct Run {
    ops_per_sec: f64,
    /// Seconds.
    p50: f64,
    /// Seconds.
    p99: f64,
    /// Puts (warm-up included) per log fsync on the leader.
    puts_per_flush: f64,
}

/// One fsync per 264-byte append, on the same file system: what a store that
/// does not batch concurrent writes could reach at best.
fn fsync_baseline(dir: &Path, duration: Duration) -> anyhow::Result<f64> {
    let path = dir.join("fsync-baseline.bin");
    let mut f = std::fs::File::create(&path).context("baseline file")?;
    let record = [7u8; 264];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        f.write_all(&record)?;
        f.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_file(&path).ok();
    Ok(rate)
}

async fn leader_first(endpoints: &[String]) -> anyhow::Result<(Vec<String>, String)> {
    let probe = Client::connect(endpoints)?;
    let status = probe.status().await.context("cluster status")?;
    if status.leader_addr.is_empty() {
        bail!("the cluster has no leader");
    }
    let mut ordered = vec![status.leader_addr.clone()];
    ordered.extend(endpoints.iter().filter(|e| **e != status.leader_addr).cloned());
    Ok((ordered, status.leader_addr))
}

async fn one_run(endpoints: &[String], leader: &str, clients: usize, duration: Duration) -> anyhow::Result<Run> {
    let probe = Client::connect(endpoints)?;
    let options = ClientOptions { request_timeout: Duration::from_secs(10), ..Default::default() };
    let warmup = Duration::from_millis(500);
    let before = probe.status_of(leader).await?;
    let start = Instant::now();
    let measure_from = start + warmup;
    let stop_at = measure_from + duration;
    let mut tasks = Vec::new();
    let value = Arc::new(vec![b'v'; 256]);
    for c in 0..clients {
        let client = Client::with_options(endpoints, options.clone())?;
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0u64;
            let mut done = 0u64;
            loop {
                let now = Instant::now();
                if now >= stop_at {
                    break;
                }
                // 8-byte keys: 'k' + 7 digits, spread over a million keys.
                let key = format!("k{:07}", (c as u64 * 7919 + i * 104_729) % 1_000_000);
                client.put(&key, value.to_vec()).await?;
                done += 1;
                if now >= measure_from {
                    latencies.push(now.elapsed());
                }
                i += 1;
            }
            anyhow::Ok((latencies, done))
        }));
    }
    let mut latencies = Vec::new();
    let mut puts = 0u64;
    for t in tasks {
        let (l, done) = t.await??;
        latencies.extend(l);
        puts += done;
    }
    let after = probe.status_of(leader).await?;
    let latencies = Latencies::new(latencies);
    if latencies.len() == 0 {
        bail!("no put completed");
    }
    let flushes = after.log_flushes.saturating_sub(before.log_flushes).max(1);
    Ok(Run {
        ops_per_sec: latencies.len() as f64 / duration.as_secs_f64(),
        p50: latencies.quantile(0.50),
        p99: latencies.quantile(0.99),
        puts_per_flush: puts as f64 / flushes as f64,
    })
}

pub async fn run(
    endpoints: Vec<String>,
    clients: Vec<usize>,
    duration: Duration,
    repeat: usize,
    data: Option<PathBuf>,
) -> anyhow::Result<()> {
    let root = data.unwrap_or_else(|| std::env::temp_dir().join(format!("ferry-bench-{}", std::process::id())));
    std::fs::create_dir_all(&root)?;
    let (cluster, endpoints) = if endpoints.is_empty() {
        let cluster = LocalCluster::start(&root, 3, 0, None, |_| {}).await?;
        cluster.wait_leader(Duration::from_secs(10)).await.context("no leader elected")?;
        let e = cluster.endpoints();
        (Some(cluster), e)
    } else {
        (None, endpoints)
    };
    let (endpoints, leader) = leader_first(&endpoints).await?;
    let baseline = fsync_baseline(&root, Duration::from_secs(2))?;
    println!("kv-put: 8-byte keys, 256-byte values, leader {leader}, {repeat} runs of {duration:?} each, medians");
    println!("baseline: one fsync per write on this disk = {baseline:.0} writes/s");
    println!("{:>8} {:>12} {:>10} {:>10} {:>14} {:>12}", "clients", "puts/s", "p50", "p99", "puts/fsync", "x baseline");
    for &c in &clients {
        let mut runs = Vec::new();
        for _ in 0..repeat {
            runs.push(one_run(&endpoints, &leader, c, duration).await?);
        }
        let ops = median(runs.iter().map(|r| r.ops_per_sec).collect());
        let p50 = median(runs.iter().map(|r| r.p50).collect());
        let p99 = median(runs.iter().map(|r| r.p99).collect());
        let epf = median(runs.iter().map(|r| r.puts_per_flush).collect());
        println!("{c:>8} {ops:>12.0} {:>9.2}ms {:>9.2}ms {epf:>14.1} {:>12.2}", p50 * 1e3, p99 * 1e3, ops / baseline);
    }
    if let Some(cluster) = cluster {
        cluster.shutdown().await;
        std::fs::remove_dir_all(&root).ok();
    }
    Ok(())
}
