//! `distribute`: one file of S bytes from a source worker to N targets, every
//! worker capped at B bytes/s up and down, against the naive way in the same
//! run: the source sending the file to each target over its one capped link.
//!
//! Bandwidth is capped, when run as root, with `tc tbf` on a network
//! namespace per worker (see `ferry_lab::netns`; the naive copy then runs over
//! the same capped links); otherwise with the workers' own `--upload-limit`
//! and `--download-limit` (the naive copy uses the same limiter on the
//! source's link). The output says which. Workers are real `ferry worker`
//! processes, so their peak RSS
//! (`VmHWM`) is measured too. Prints the time T, T/(S/B), source egress / S,
//! when the targets finished, the naive time, what a 1 MiB update moved, and
//! how busy the host's CPU was during the push (with the share the hypervisor
//! took), so a slow run on a shared machine can be told apart. `--runs N`
//! repeats it with fresh workers and prints the medians.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_scheduler::LocalCluster;
use ferry_sdk::{pb, Client};
use ferry_worker::limiter::Bandwidth;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Flags of `distribute`.
#[derive(clap::Args)]
pub struct Args {
    /// File size S.
    #[arg(long, default_value = "200MB", value_parser = ferry_worker::config::parse_rate)]
    size: u64,
    /// Targets N.
    #[arg(long, default_value_t = 20)]
    workers: usize,
    /// Per-worker bandwidth B, up and down.
    #[arg(long, default_value = "10MiB/s", value_parser = ferry_worker::config::parse_rate)]
    bandwidth: u64,
    /// The `ferry` binary (default: next to this one).
    #[arg(long)]
    ferry: Option<PathBuf>,
    /// Skip the naive baseline (it takes N times S/B).
    #[arg(long)]
    no_naive: bool,
    /// Scratch directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Runs, each with fresh workers; more than one prints the medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Print aggregate progress every second during the first push.
    #[arg(long)]
    timeline: bool,
    /// How links are capped: `tc` (network namespaces and tbf; needs root),
    /// `limiter` (the workers' own rate limits), or `auto` (tc when root).
    #[arg(long, default_value = "auto", value_parser = ["auto", "tc", "limiter"])]
    link: String,
    /// With tc: the queue of each worker host's uplink, `pfifo_fast` (the
    /// kernel's built-in default for a NIC: pulls' small packets go before
    /// bulk uploads) or `fifo` (one queue for everything).
    #[arg(long, default_value = "pfifo_fast", value_parser = ["pfifo_fast", "fifo"])]
    host_queue: String,
    /// Start the workers with `--no-socket-priority` (their chunk sockets at
    /// the host's default priority), to compare.
    #[arg(long)]
    no_socket_priority: bool,
    /// With tc: also give every worker its own upload and download limit at
    /// this fraction of B (0: none), as an operator keeps a NIC's queue short.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    worker_limit: f64,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("'{s}' is not a fraction from 0 to 1")),
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn push(
    c: &Client,
    file: &Path,
    targets: &[String],
    timeline: bool,
) -> anyhow::Result<(pb::JobReport, Duration)> {
    let spec = pb::JobSpec {
        source: "w0".into(),
        files: vec![file.display().to_string()],
        targets: targets.to_vec(),
        destination: "in/".into(),
        timeout_ms: 3_600_000,
        ..Default::default()
    };
    let start = Instant::now();
    let id = c.submit_job(spec, false).await?.job_id;
    let mut next_print = Instant::now();
    let mut last_bytes = 0u64;
    loop {
        let r = c.get_job(&id).await?;
        if timeline && Instant::now() >= next_print {
            let bytes: u64 = r.targets.iter().map(|t| t.bytes_done).sum();
            let done = r.targets.iter().filter(|t| t.state == "installed").count();
            println!(
                "  t={:>5.1}s  received {:>7.1} MiB/s  targets done {done:>2}/{}",
                start.elapsed().as_secs_f64(),
                (bytes - last_bytes) as f64 / (1024.0 * 1024.0),
                r.targets.len()
            );
            last_bytes = bytes;
            next_print += Duration::from_secs(1);
        }
        if r.state != "running" {
            if r.state != "succeeded" {
                bail!(
                    "job ended {}: {:?}",
                    r.state,
                    r.targets.iter().map(|t| (&t.worker, &t.reason)).collect::<Vec<_>>()
                );
            }
            return Ok((r, start.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The source sends the whole file to every target at once through one
/// link capped at B: the source's tbf-capped link in the lab, else a
/// limiter shared by the source's connections on loopback.
async fn naive(
    file: &Path,
    dir: &Path,
    targets: usize,
    bandwidth: u64,
    lab: Option<&ferry_lab::netns::Lab>,
) -> anyhow::Result<Duration> {
    let link = Bandwidth::new(if lab.is_some() { None } else { Some(bandwidth) });
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..targets {
        let (listener, sock) = match lab {
            Some(lab) => {
                let ip = lab.ip(i + 1);
                let l = lab.inside(i + 1, move || {
                    let l = std::net::TcpListener::bind((ip, 0))?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                })?;
                let addr = l.local_addr()?;
                let s = lab.inside(0, move || {
                    let s = std::net::TcpStream::connect(addr)?;
                    s.set_nonblocking(true)?;
                    Ok(s)
                })?;
                (tokio::net::TcpListener::from_std(l)?, Some(tokio::net::TcpStream::from_std(s)?))
            }
            None => (tokio::net::TcpListener::bind("127.0.0.1:0").await?, None),
        };
        let addr = listener.local_addr()?;
        let out = dir.join(format!("naive-{i}.bin"));
        let receiver = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await?;
            let mut f = tokio::fs::File::create(out).await?;
            tokio::io::copy(&mut sock, &mut f).await?;
            f.sync_all().await?;
            anyhow::Ok(())
        });
        let (file, link) = (file.to_path_buf(), link.clone());
        let sender = tokio::spawn(async move {
            let mut sock = match sock {
                Some(s) => s,
                None => tokio::net::TcpStream::connect(addr).await?,
            };
            let mut f = tokio::fs::File::open(file).await?;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = f.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                link.take(n).await;
                sock.write_all(&buf[..n]).await?;
            }
            sock.shutdown().await?;
            anyhow::Ok(())
        });
        tasks.push((sender, receiver));
    }
    for (s, r) in tasks {
        s.await??;
        r.await??;
    }
    Ok(start.elapsed())
}

/// CPU time of the whole machine from `/proc/stat` (all cores, in clock
/// ticks): busy, stolen by the hypervisor, and the total.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct CpuTicks {
    busy: u64,
    steal: u64,
    total: u64,
}

impl CpuTicks {
    fn now() -> Self {
        std::fs::read_to_string("/proc/stat").ok().and_then(|s| Self::parse(&s)).unwrap_or_default()
    }

    /// The `cpu` line: user nice system idle iowait irq softirq steal.
    fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line.split_whitespace().skip(1).take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
        if v.len() < 8 {
            return None;
        }
        Some(Self { busy: v[0] + v[1] + v[2] + v[5] + v[6], steal: v[7], total: v.iter().sum() })
    }

    /// Percent of the machine's CPU time between `self` and `later` that was
    /// busy and that the hypervisor took; `None` without `/proc/stat`.
    fn shares(self, later: Self) -> Option<(f64, f64)> {
        let total = later.total.checked_sub(self.total).filter(|t| *t > 0)? as f64;
        let busy = later.busy.saturating_sub(self.busy) as f64;
        let steal = later.steal.saturating_sub(self.steal) as f64;
        Some((100.0 * busy / total, 100.0 * steal / total))
    }
}

/// What one run measured.
struct Outcome {
    ratio: f64,
    egress: f64,
    update_share: f64,
    rss_mib: f64,
}

/// Runs the benchmark `--runs` times (fresh workers and lab each time) and
/// prints the medians; the naive baseline runs once, after the last.
pub async fn run(a: Args) -> anyhow::Result<()> {
    let ferry = match &a.ferry {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("ferry"),
    };
    if !ferry.exists() {
        bail!("{} not found: build it (cargo build --release -p ferry) or pass --ferry", ferry.display());
    }
    let mut outcomes = Vec::new();
    for i in 0..a.runs {
        if a.runs > 1 {
            println!("run {} of {}:", i + 1, a.runs);
        }
        outcomes.push(once(&a, &ferry, i + 1 == a.runs && !a.no_naive).await?);
    }
    if a.runs > 1 {
        let by_run: Vec<String> = outcomes.iter().map(|o| format!("{:.2}", o.ratio)).collect();
        let median = |f: fn(&Outcome) -> f64| crate::stats::median(outcomes.iter().map(f).collect());
        println!(
            "medians of {} runs: T/(S/B) = {:.2} (by run: {}; {} of {} at or below 1.3)   source egress / S = {:.2}   \
             update moved {:.1}% of S   peak RSS {:.1} MiB",
            a.runs,
            median(|o| o.ratio),
            by_run.join(" "),
            outcomes.iter().filter(|o| o.ratio <= 1.3).count(),
            a.runs,
            median(|o| o.egress),
            median(|o| o.update_share),
            median(|o| o.rss_mib),
        );
    }
    Ok(())
}

/// One run: lab, cluster and workers from scratch, the push, the update and,
/// if asked, the naive baseline.
async fn once(a: &Args, ferry: &Path, with_naive: bool) -> anyhow::Result<Outcome> {
    let root = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("ferry-bench-dist-{}", std::process::id())),
    };
    std::fs::create_dir_all(&root)?;
    let lab = match (a.link.as_str(), ferry_lab::netns::Lab::unavailable()) {
        ("tc", Some(why)) => bail!("--link tc: {why}"),
        ("limiter", _) | ("auto", Some(_)) => None,
        _ => {
            let lab = ferry_lab::netns::Lab::create(a.workers + 1)?;
            for i in 0..=a.workers {
                lab.cap(i, a.bandwidth, a.host_queue == "fifo")?;
            }
            Some(lab)
        }
    };
    let mut how = match (&lab, ferry_lab::netns::Lab::unavailable()) {
        (Some(_), _) => {
            let queue = if a.host_queue == "fifo" { "FIFO" } else { "pfifo_fast" };
            let mut h = format!("capped by tc tbf on one network namespace per worker; hosts' queues {queue}");
            if a.worker_limit > 0.0 {
                h.push_str(&format!("; and by the workers' own limits at {} B", a.worker_limit));
            }
            h
        }
        (None, Some(why)) => format!("capped by the workers' own rate limits; tc needs root: {why}"),
        (None, None) => "capped by the workers' own rate limits".to_string(),
    };
    if a.no_socket_priority {
        how.push_str("; workers with --no-socket-priority");
    }
    let ip = lab.as_ref().map(|l| std::net::IpAddr::V4(l.host_ip())).unwrap_or([127, 0, 0, 1].into());
    let cluster = LocalCluster::start_on(ip, &root.join("schedulers"), 3, 0, None, |_| {}).await?;
    cluster.wait_leader(Duration::from_secs(10)).await.context("no leader")?;
    let endpoints = cluster.endpoints().join(",");
    let rate = a.bandwidth.to_string();
    let mut procs = Vec::new();
    for i in 0..=a.workers {
        let name = format!("w{i}");
        std::fs::create_dir_all(root.join(&name).join("root"))?;
        let mut cmd = match &lab {
            Some(lab) => {
                let mut c = lab.command(i, ferry);
                c.args(["worker", "--listen", &format!("{}:7100", lab.ip(i))]);
                if a.worker_limit > 0.0 {
                    let own = ((a.bandwidth as f64 * a.worker_limit) as u64).to_string();
                    c.args(["--upload-limit", &own, "--download-limit", &own]);
                }
                c
            }
            None => {
                let mut c = Command::new(ferry);
                c.args(["worker", "--listen", "127.0.0.1:0", "--upload-limit", &rate, "--download-limit", &rate]);
                c
            }
        };
        if a.no_socket_priority {
            cmd.arg("--no-socket-priority");
        }
        let files = cluster.files(&ferry_sdk::tls::Identity::Worker(name.clone()))?;
        cmd.args(files.flags());
        let child = cmd
            .args(["--name", &name, "--schedulers", &endpoints])
            .arg("--data")
            .arg(root.join(&name).join("data"))
            .arg("--allow-root")
            .arg(root.join(&name).join("root"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn worker")?;
        procs.push(Proc(child));
    }
    let c =
        Client::connect(cluster.endpoints(), cluster.credentials(&ferry_sdk::tls::Identity::User("bench".into()))?)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.list_workers().await?.iter().filter(|w| w.state == "up").count() <= a.workers {
        if Instant::now() > deadline {
            bail!("workers did not all connect");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let file = root.join("w0").join("root").canonicalize()?.join("data.bin");
    ferry_worker::sample::write_random(&file, a.size, 7)?;
    let targets: Vec<String> = (1..=a.workers).map(|i| format!("w{i}")).collect();
    let (s, b) = (a.size as f64, a.bandwidth as f64);
    let ideal = s / b;

    let cpu = CpuTicks::now();
    let (r, t) = push(&c, &file, &targets, a.timeline).await?;
    let host = cpu.shares(CpuTicks::now());
    let egress: u64 = r.targets.iter().map(|t| t.bytes_from_source).sum();
    let rss = procs.iter().map(|p| peak_rss_kib(p.0.id())).max().unwrap_or(0);

    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&file)?;
        f.seek(SeekFrom::Start(a.size / 2))?;
        f.write_all(&vec![0x5a; (1 << 20).min(a.size as usize)])?;
    }
    let (r2, t2) = push(&c, &file, &targets, false).await?;
    let moved = r2.targets.iter().map(|t| t.bytes_from_source + t.bytes_from_peers).max().unwrap_or(0);
    let rss = rss.max(procs.iter().map(|p| peak_rss_kib(p.0.id())).max().unwrap_or(0));

    println!(
        "distribute: S = {:.0} MB to N = {} workers, B = {:.1} MiB/s per worker ({how})",
        s / 1e6,
        a.workers,
        b / (1024.0 * 1024.0)
    );
    println!(
        "  ferry:  T = {:.1}s   T/(S/B) = {:.2}   source egress / S = {:.2}",
        t.as_secs_f64(),
        t.as_secs_f64() / ideal,
        egress as f64 / s
    );
    let mut done: Vec<f64> = r.targets.iter().map(|t| t.duration_ms as f64 / 1000.0).collect();
    done.sort_by(f64::total_cmp);
    if let (Some(first), Some(last)) = (done.first(), done.last()) {
        println!(
            "          targets installed after {first:.1}-{last:.1}s (median {:.1}s, T/(S/B) of the median target {:.2})",
            done[done.len() / 2],
            done[done.len() / 2] / ideal
        );
    }
    println!(
        "  update: 1 MiB changed: {:.1}s, at most {:.1} MB moved to a target ({:.1}% of S)",
        t2.as_secs_f64(),
        moved as f64 / 1e6,
        100.0 * moved as f64 / s
    );
    println!("  worker peak RSS (VmHWM, max over {} workers): {:.1} MiB", a.workers + 1, rss as f64 / 1024.0);
    if let Some((busy, steal)) = host {
        println!("  host CPU during the push: {busy:.0}% busy, {steal:.1}% taken by the hypervisor (steal)");
    }
    if with_naive {
        let naive_dir = root.join("naive");
        std::fs::create_dir_all(&naive_dir)?;
        let tn = naive(&file, &naive_dir, a.workers, a.bandwidth, lab.as_ref()).await?;
        println!(
            "  naive:  source copies to every target over its capped link: {:.1}s ({:.1}x ferry's time)",
            tn.as_secs_f64(),
            tn.as_secs_f64() / t.as_secs_f64()
        );
    }
    drop(procs);
    cluster.shutdown().await;
    drop(lab);
    std::fs::remove_dir_all(&root).ok();
    Ok(Outcome {
        ratio: t.as_secs_f64() / ideal,
        egress: egress as f64 / s,
        update_share: 100.0 * moved as f64 / s,
        rss_mib: rss as f64 / 1024.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_shares_come_from_the_cpu_line_of_proc_stat() {
        let before = "cpu  100 0 50 800 10 0 20 20 0 0\ncpu0 50 0 25 400 5 0 10 10 0 0\n";
        let after = "cpu  200 0 150 900 10 0 20 120 0 0\n";
        let (b, a) = (CpuTicks::parse(before).unwrap(), CpuTicks::parse(after).unwrap());
        assert_eq!(b, CpuTicks { busy: 170, steal: 20, total: 1000 });
        // 400 ticks passed: 200 busy, 100 stolen, 100 idle.
        assert_eq!(b.shares(a), Some((50.0, 25.0)));
        assert_eq!(a.shares(a), None);
        assert_eq!(CpuTicks::parse("intr 1 2 3\n"), None);
        assert_eq!(CpuTicks::parse("cpu  1 2 3\n"), None);
    }
}
