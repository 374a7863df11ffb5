//! `kv`: the same key-value workloads against Ferry and, in the same run,
//! against etcd (three members on loopback, feature `etcd`), with the
//! Ferry/etcd ratio. Puts of 8-byte keys and 256-byte values at several
//! concurrencies (throughput, p50/p99, puts per log fsync on the leader), and
//! watch delivery latency: a writer puts at a steady rate and one prefix
//! watcher measures from the start of each put call to the event's arrival,
//! on an otherwise idle store and under a closed-loop put load.
//!
//! Ferry runs as three `ferry scheduler` processes (the `ferry` binary beside
//! the bench, or `--ferry`; in this process if there is none, or on a
//! running cluster with `--endpoints`); etcd runs as three processes. Both keep their data on the same
//! file system and both fsync their logs; clients of both talk to the leader.
//! The machine is shared, so ratios within one run matter, not absolute
//! figures: each workload runs on both sides back to back, alternating which
//! goes first.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_scheduler::LocalCluster;
use tokio::task::JoinSet;

use crate::kv_target::{Conn, Ferry, Target, Watch};
use crate::procs::FerryProcs;
use crate::stats::{median, Latencies};

/// Flags of `kv`.
#[derive(clap::Args)]
pub struct Args {
    /// A running Ferry cluster (HOST:PORT,...); default: start three nodes here.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Concurrent put clients, one workload each.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    clients: Vec<usize>,
    /// Measured time per workload and run (after a 0.5 s warm-up).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Repeat every workload this many times and report medians.
    #[arg(long, alias = "repeat", default_value_t = 3)]
    runs: usize,
    /// Puts per second of the watch workloads' writer.
    #[arg(long, default_value_t = 100)]
    watch_rate: u32,
    /// Closed-loop put clients running beside the writer in the second watch
    /// workload (0: only the idle one).
    #[arg(long, default_value_t = 64)]
    watch_load: usize,
    /// The `ferry` binary to run the three nodes as processes (default: the
    /// one beside this bench, if built; else the nodes run in this process,
    /// sharing its runtime with the clients).
    #[arg(long)]
    ferry: Option<PathBuf>,
    /// The etcd binary (default: `etcd` on PATH).
    #[arg(long)]
    etcd: Option<PathBuf>,
    /// Ferry only: do not start etcd.
    #[arg(long)]
    no_etcd: bool,
    /// Run Ferry's nodes in plaintext (default: mutual TLS under a CA of
    /// the run's own; a running cluster's credentials come from the
    /// `FERRY_TLS_*` variables, as the CLI's do).
    #[arg(long)]
    insecure: bool,
    /// Instead of etcd, compare with the same Ferry in plaintext (3 more
    /// processes): what mutual TLS costs.
    #[arg(long)]
    vs_plaintext: bool,
    /// Directory under which both stores keep their data (a fresh
    /// subdirectory, removed at the end); default: the system temp dir.
    #[arg(long)]
    data: Option<PathBuf>,
}

const WARMUP: Duration = Duration::from_millis(500);
/// Keys of the put workloads: `k` and 7 digits. Watch keys use `w`, so the
/// watcher on `w` sees only the writer's puts.
const PUT_PREFIX: char = 'k';
const WATCH_PREFIX: char = 'w';
const VALUE_BYTES: usize = 256;
/// How long a watcher may lag behind the writer's last put before the
/// missing events count as undelivered.
const DELIVERY_GRACE: Duration = Duration::from_secs(10);

/// An 8-byte key.
fn key(prefix: char, n: u64) -> String {
    format!("{prefix}{:07}", n % 10_000_000)
}

/// One side of the comparison at one workload in one run.
struct Sample {
    ops_per_sec: f64,
    p50: f64,
    p99: f64,
    /// Puts workloads: puts per log fsync on the leader. Watch workloads:
    /// events delivered / puts made.
    extra: Option<f64>,
}

impl Sample {
    /// From the operations timed over `duration`; `None` if there were none.
    fn new(latencies: &Latencies, duration: Duration, extra: Option<f64>) -> Option<Self> {
        (latencies.len() > 0).then(|| Sample {
            ops_per_sec: latencies.len() as f64 / duration.as_secs_f64(),
            p50: latencies.quantile(0.50),
            p99: latencies.quantile(0.99),
            extra,
        })
    }
}

/// Closed loop: every connection puts back to back until `stop_at`; puts
/// that start from `measure_from` on are timed. Returns their latencies and
/// the count of all puts (warm-up included).
async fn put_load<C: Conn>(conns: Vec<C>, measure_from: Instant, stop_at: Instant) -> anyhow::Result<(Latencies, u64)> {
    let mut tasks = JoinSet::new();
    let value = vec![b'v'; VALUE_BYTES];
    for (c, conn) in conns.into_iter().enumerate() {
        let value = value.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0u64;
            loop {
                let now = Instant::now();
                if now >= stop_at {
                    break;
                }
                // Spread over a million keys, different per client.
                conn.put(key(PUT_PREFIX, (c as u64 * 7919 + i * 104_729) % 1_000_000), value.clone()).await?;
                if now >= measure_from {
                    latencies.push(now.elapsed());
                }
                i += 1;
            }
            anyhow::Ok((latencies, i))
        });
    }
    let mut latencies = Vec::new();
    let mut puts = 0;
    while let Some(done) = tasks.join_next().await {
        let (l, n) = done??;
        latencies.extend(l);
        puts += n;
    }
    Ok((Latencies::new(latencies), puts))
}

async fn connect_all<T: Target>(target: &T, n: usize) -> anyhow::Result<Vec<T::Conn>> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(target.connect().await?);
    }
    Ok(conns)
}

/// `clients` closed-loop clients for `duration`.
async fn puts<T: Target>(target: &T, clients: usize, duration: Duration) -> anyhow::Result<Sample> {
    let conns = connect_all(target, clients).await?;
    let before = target.log_fsyncs().await?;
    let start = Instant::now();
    let (latencies, puts) = put_load(conns, start + WARMUP, start + WARMUP + duration).await?;
    let after = target.log_fsyncs().await?;
    let per_fsync = before.zip(after).map(|(b, a)| puts as f64 / a.saturating_sub(b).max(1) as f64);
    Sample::new(&latencies, duration, per_fsync).context("no put completed")
}

/// A value that carries when its put started, as nanoseconds since `t0`.
fn stamped_value(t0: Instant) -> Vec<u8> {
    let mut value = vec![b'v'; VALUE_BYTES];
    value[..8].copy_from_slice(&(t0.elapsed().as_nanos() as u64).to_le_bytes());
    value
}

fn delivery_latency(t0: Instant, value: &[u8]) -> Option<Duration> {
    let stamp = u64::from_le_bytes(value.get(..8)?.try_into().ok()?);
    Some(t0.elapsed().saturating_sub(Duration::from_nanos(stamp)))
}

/// Open loop: one put every `1/rate` from `from` to `until`, each in its own
/// task so a slow put does not lower the rate. Returns how many were made.
async fn steady_writer<C: Conn>(conn: C, rate: u32, t0: Instant, from: Instant, until: Instant) -> anyhow::Result<u64> {
    let mut tick = tokio::time::interval_at(from.into(), Duration::from_secs(1) / rate.max(1));
    let mut puts = JoinSet::new();
    let mut n = 0u64;
    while tick.tick().await.into_std() < until {
        let conn = conn.clone();
        let key = key(WATCH_PREFIX, n);
        puts.spawn(async move { conn.put(key, stamped_value(t0)).await });
        n += 1;
    }
    while let Some(done) = puts.join_next().await {
        done??;
    }
    Ok(n)
}

/// Watch delivery latency: a steady writer, one watcher on its prefix, and
/// `load` closed-loop put clients beside them (0: none).
async fn watch<T: Target>(target: &T, rate: u32, load: usize, duration: Duration) -> anyhow::Result<Sample> {
    let mut watch = target.watch(&WATCH_PREFIX.to_string()).await?;
    let writer_conn = target.connect().await?;
    let load_conns = connect_all(target, load).await?;
    let t0 = Instant::now();
    let (from, until) = (t0 + WARMUP, t0 + WARMUP + duration);
    let load = tokio::spawn(put_load(load_conns, from, until));
    let mut writer = tokio::spawn(steady_writer(writer_conn, rate, t0, from, until));
    let mut sent = None;
    let mut latencies = Vec::new();
    let mut give_up = tokio::time::Instant::now() + WARMUP + duration + DELIVERY_GRACE;
    loop {
        if sent.is_some_and(|n| latencies.len() as u64 >= n) {
            break;
        }
        tokio::select! {
            done = &mut writer, if sent.is_none() => {
                sent = Some(done.context("writer")??);
                give_up = tokio::time::Instant::now() + DELIVERY_GRACE;
            }
            values = watch.next_values() => {
                let Some(values) = values? else { bail!("the watch ended") };
                latencies.extend(values.iter().filter_map(|v| delivery_latency(t0, v)));
            }
            _ = tokio::time::sleep_until(give_up) => break,
        }
    }
    load.await.context("put load")??;
    let Some(sent) = sent else { bail!("the writer did not finish") };
    let delivered = latencies.len() as f64 / sent.max(1) as f64;
    Sample::new(&Latencies::new(latencies), duration, Some(delivered)).context("no watch event arrived")
}

/// The workloads, in the order they run and print.
#[derive(Clone, Copy)]
enum Workload {
    Puts(usize),
    Watch { load: usize },
}

impl Workload {
    async fn run<T: Target>(self, target: &T, a: &Args) -> anyhow::Result<Sample> {
        match self {
            Workload::Puts(clients) => puts(target, clients, a.duration).await,
            Workload::Watch { load } => watch(target, a.watch_rate, load, a.duration).await,
        }
    }

    fn label(self) -> String {
        match self {
            Workload::Puts(clients) => format!("{clients} clients"),
            Workload::Watch { load: 0 } => "idle".into(),
            Workload::Watch { load } => format!("{load} put clients"),
        }
    }
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

#[cfg(feature = "etcd")]
type Etcd = crate::etcd::Etcd;
#[cfg(not(feature = "etcd"))]
type Etcd = crate::kv_target::Absent;

/// The etcd side, or why there is none (printed; Ferry runs regardless).
#[cfg(feature = "etcd")]
async fn start_etcd(a: &Args, dir: &Path) -> Result<Etcd, String> {
    if a.no_etcd {
        return Err("etcd: skipped (--no-etcd)".into());
    }
    let Some(bin) = a.etcd.clone().or_else(crate::etcd::find_on_path) else {
        return Err(
            "etcd: not found on PATH; install it (Debian: apt-get install etcd-server) or pass --etcd PATH".into()
        );
    };
    match Etcd::start(&bin, dir).await {
        Ok(etcd) => {
            println!(
                "etcd {}: 3 members of {} on loopback, leader {}",
                etcd.version(),
                bin.display(),
                etcd.leader_url()
            );
            Ok(etcd)
        }
        Err(e) => Err(format!("etcd: failed to start {}: {e:#}", bin.display())),
    }
}

#[cfg(not(feature = "etcd"))]
async fn start_etcd(a: &Args, _dir: &Path) -> Result<Etcd, String> {
    Err(if a.no_etcd {
        "etcd: skipped (--no-etcd)".into()
    } else {
        "etcd: this ferry-bench was built without the `etcd` feature. For the comparison, run\n  \
         apt-get install -y etcd-server protobuf-compiler\n  \
         cargo run --release -p ferry-bench --features etcd -- kv"
            .into()
    })
}

fn ms(seconds: f64) -> String {
    if seconds.is_nan() {
        "-".into()
    } else {
        format!("{:.2}ms", seconds * 1e3)
    }
}

fn num(x: Option<f64>, decimals: usize) -> String {
    x.filter(|x| x.is_finite()).map_or_else(|| "-".into(), |x| format!("{x:.decimals$}"))
}

/// Medians of one side's samples at one workload: ops/s, p50, p99, extra.
fn medians(samples: &[Sample]) -> Option<(f64, f64, f64, Option<f64>)> {
    if samples.is_empty() {
        return None;
    }
    let m = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    let extra = samples.iter().map(|s| s.extra).collect::<Option<Vec<_>>>().map(median);
    Some((m(|s| s.ops_per_sec), m(|s| s.p50), m(|s| s.p99), extra))
}

/// A workload's samples on each side, run by run.
type Rows = Vec<(Workload, Vec<Sample>, Vec<Sample>)>;

/// The two sides of a comparison as the tables name them: a word and a
/// letter each.
#[derive(Clone, Copy)]
struct Sides {
    a: (&'static str, char),
    b: (&'static str, char),
}

/// Ferry against etcd.
const VS_ETCD: Sides = Sides { a: ("Ferry", 'F'), b: ("etcd", 'e') };
/// Ferry with mutual TLS against Ferry in plaintext (`--vs-plaintext`).
const VS_PLAIN: Sides = Sides { a: ("TLS", 'T'), b: ("plain", 'p') };

/// Runs every workload `a.runs` times on `ferry` and on `other` (if any),
/// alternating which goes first, so neither side always meets a disk or a
/// page cache the other just stirred up.
async fn compare<B: Target>(
    ferry: &Ferry,
    other: Option<&B>,
    a: &Args,
    workloads: &[Workload],
) -> anyhow::Result<Rows> {
    let mut rows: Rows = workloads.iter().map(|&w| (w, Vec::new(), Vec::new())).collect();
    for run in 0..a.runs.max(1) {
        for (w, ferry_samples, other_samples) in &mut rows {
            if run % 2 == 1 {
                if let Some(other) = other {
                    other_samples.push(w.run(other, a).await.context("the other side")?);
                }
            }
            ferry_samples.push(w.run(ferry, a).await.context("Ferry")?);
            if run % 2 == 0 {
                if let Some(other) = other {
                    other_samples.push(w.run(other, a).await.context("the other side")?);
                }
            }
        }
        eprintln!("kv: run {}/{} done", run + 1, a.runs.max(1));
    }
    Ok(rows)
}

fn print_table(sides: Sides, title: &str, extra: &str, rows: &[(Workload, Vec<Sample>, Vec<Sample>)], watch: bool) {
    println!("\n{title}");
    let ((an, al), (bn, bl)) = (sides.a, sides.b);
    let ratio_head = format!("{} {al}/{bl}", if watch { "p99" } else { "ops" });
    let unit = if watch { "ev/s" } else { "op/s" };
    println!(
        "{:>16} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "",
        format!("{an} {unit}"),
        format!("{bn} {unit}"),
        ratio_head,
        format!("{an} p50"),
        format!("{an} p99"),
        format!("{bn} p50"),
        format!("{bn} p99"),
        format!("{al} {extra}"),
        format!("{bl} {extra}"),
    );
    for (w, ferry, etcd) in rows {
        let (f, e) = (medians(ferry), medians(etcd));
        let ratio = match (f, e) {
            (Some(f), Some(e)) if watch => Some(f.2 / e.2),
            (Some(f), Some(e)) => Some(f.0 / e.0),
            _ => None,
        };
        let col = |s: Option<(f64, f64, f64, Option<f64>)>| {
            s.map_or_else(
                || ["-".to_string(), "-".into(), "-".into(), "-".into()],
                |s| [num(Some(s.0), 0), ms(s.1), ms(s.2), num(s.3, if watch { 3 } else { 1 })],
            )
        };
        let (fc, ec) = (col(f), col(e));
        println!(
            "{:>16} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            w.label(),
            fc[0],
            ec[0],
            num(ratio, 2),
            fc[1],
            fc[2],
            ec[1],
            ec[2],
            fc[3],
            ec[3]
        );
    }
    // The medians hide how far single runs spread; a watch p99 rests on a
    // few slow events per run, so show every run's ratio too.
    for (w, ferry, etcd) in rows.iter().filter(|(_, f, e)| watch && f.len() > 1 && !e.is_empty()) {
        let ratios = paired_ratios(ferry, etcd, |s| s.p99);
        let at_or_below = ratios.iter().filter(|r| **r <= 1.0).count();
        let list: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "{:>16} p99 {al}/{bl} by run: {} ({an} at or below {bn} in {at_or_below} of {})",
            w.label(),
            list.join(" "),
            ratios.len()
        );
    }
}

/// `f(ferry) / f(etcd)` for the samples of each run both sides have, in
/// run order.
fn paired_ratios(ferry: &[Sample], etcd: &[Sample], f: fn(&Sample) -> f64) -> Vec<f64> {
    ferry.iter().zip(etcd).map(|(a, b)| f(a) / f(b)).collect()
}

async fn bench(a: Args) -> anyhow::Result<()> {
    let parent = a.data.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    // Dropped last: after the clusters that write into it.
    let root = tempfile::Builder::new().prefix("ferry-bench-kv-").tempdir_in(&parent).context("data directory")?;
    let bin = a.ferry.clone().or_else(crate::procs::ferry_beside_bench);
    let (mut procs, mut in_process) = (None, None);
    let (endpoints, security, where_) = if !a.endpoints.is_empty() {
        let security = if a.insecure { ferry_sdk::Security::Insecure } else { ferry_sdk::Security::from_env()? };
        (a.endpoints.clone(), security, "running cluster".to_string())
    } else if let Some(bin) = &bin {
        let p = FerryProcs::start(bin, &root.path().join("ferry"), a.insecure).await?;
        let (endpoints, security) = (p.endpoints(), p.security());
        procs = Some(p);
        (endpoints, security, format!("3 processes of {}", bin.display()))
    } else {
        let insecure = a.insecure;
        let cluster = LocalCluster::start(&root.path().join("ferry"), 3, 0, None, |c| c.insecure = insecure).await?;
        cluster.wait_leader(Duration::from_secs(10)).await.context("no Ferry leader elected")?;
        let endpoints = cluster.endpoints();
        let security = cluster.credentials(&ferry_sdk::tls::Identity::User("bench".into()))?;
        in_process = Some(cluster);
        let note = "3 nodes in this process, sharing its runtime with the clients (`cargo build --release -p ferry` \
                    to run them as processes, as etcd's are)";
        (endpoints, security, note.to_string())
    };
    let ferry = Ferry::new(&endpoints, security).await?;
    println!("Ferry: {where_}, leader {}", ferry.leader());
    if a.vs_plaintext && a.insecure {
        bail!("--vs-plaintext compares TLS with plaintext: leave out --insecure");
    }
    let etcd = if a.vs_plaintext {
        None
    } else {
        match start_etcd(&a, &root.path().join("etcd")).await {
            Ok(etcd) => Some(etcd),
            Err(why) => {
                println!("{why}");
                None
            }
        }
    };
    let baseline = fsync_baseline(root.path(), Duration::from_secs(2))?;
    println!(
        "8-byte keys, 256-byte values; clients talk to the leader; data in {}; \
         one fsync per write on this disk = {baseline:.0} writes/s",
        parent.display()
    );
    println!(
        "{} runs of {:?} per workload and side (after {WARMUP:?} warm-up), medians; \
         a shared machine: compare the ratios, not absolute figures",
        a.runs, a.duration
    );

    let mut workloads: Vec<Workload> = a.clients.iter().map(|&c| Workload::Puts(c)).collect();
    workloads.push(Workload::Watch { load: 0 });
    if a.watch_load > 0 {
        workloads.push(Workload::Watch { load: a.watch_load });
    }
    let (rows, sides, _plain) = if a.vs_plaintext {
        // The same binary in plaintext, as the baseline of what TLS costs.
        let bin = bin.as_ref().context("--vs-plaintext runs the nodes as processes: build ferry first")?;
        let p = FerryProcs::start(bin, &root.path().join("plain"), true).await?;
        let plain = Ferry::new(&p.endpoints(), p.security()).await?;
        println!("plaintext Ferry: 3 more processes of {}, leader {}", bin.display(), plain.leader());
        (compare(&ferry, Some(&plain), &a, &workloads).await?, VS_PLAIN, Some(p))
    } else {
        (compare(&ferry, etcd.as_ref(), &a, &workloads).await?, VS_ETCD, None)
    };
    let (puts, watches): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| matches!(r.0, Workload::Puts(_)));
    let (ah, bh) = (sides.a.0, sides.b.0);
    let ratio = format!("{}/{}", sides.a.1, sides.b.1);
    print_table(
        sides,
        &format!("puts (closed loop; {ratio} = {ah}/{bh} throughput, higher is better for {ah})"),
        "put/fsync",
        &puts,
        false,
    );
    print_table(
        sides,
        &format!(
            "watch delivery: put call start -> event at one prefix watcher; writer at {} puts/s; \
             {ratio} = {ah}/{bh} p99 (lower is better for {ah})",
            a.watch_rate
        ),
        "delivered",
        &watches,
        true,
    );
    if let Some(cluster) = in_process {
        cluster.shutdown().await;
    }
    drop(procs);
    Ok(())
}

/// Runs `kv`. Ctrl-C or SIGTERM drops the run, which stops etcd's members
/// and removes the data directory before the error is returned.
pub async fn run(a: Args) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = bench(a) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        _ = term.recv() => bail!("terminated"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_eight_bytes_and_values_256() {
        for n in [0, 7, 999_999, 10_000_000 + 3, u64::MAX] {
            assert_eq!(key(PUT_PREFIX, n).len(), 8);
            assert_eq!(key(WATCH_PREFIX, n).len(), 8);
        }
        assert_eq!(stamped_value(Instant::now()).len(), 256);
    }

    #[test]
    fn a_stamped_value_gives_the_time_since_its_put_started() {
        let t0 = Instant::now() - Duration::from_secs(1);
        let value = stamped_value(t0);
        let latency = delivery_latency(t0, &value).expect("stamped");
        assert!(latency < Duration::from_secs(1), "{latency:?}");
        assert_eq!(delivery_latency(t0, b"short"), None);
    }

    #[test]
    fn run_ratios_pair_the_samples_of_each_run() {
        let p99 = |p99| Sample { ops_per_sec: 1.0, p50: 1.0, p99, extra: None };
        let (ferry, etcd) = ([p99(2.0), p99(3.0), p99(9.0)], [p99(4.0), p99(2.0)]);
        assert_eq!(paired_ratios(&ferry, &etcd, |s| s.p99), [0.5, 1.5]);
    }
}
