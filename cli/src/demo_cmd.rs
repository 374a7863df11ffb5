//! `ferry demo`: the main job on loopback, end to end, in one process.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_scheduler::LocalCluster;
use ferry_sdk::tls::Identity;
use ferry_sdk::{pb, Client};
use ferry_worker::{Worker, WorkerConfig};

use crate::args::DemoArgs;
use crate::job_cmd::{follow, human};

fn file_hash(path: &Path) -> anyhow::Result<blake3::Hash> {
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

fn print_sources(r: &pb::JobReport, took: Duration) {
    let (src, peers, reused): (u64, u64, u64) = r
        .targets
        .iter()
        .fold((0, 0, 0), |acc, t| (acc.0 + t.bytes_from_source, acc.1 + t.bytes_from_peers, acc.2 + t.bytes_reused));
    println!(
        "  {} to {} workers in {:.2}s: {} from the source, {} from peers, {} reused locally",
        human(r.total_bytes),
        r.targets.len(),
        took.as_secs_f64(),
        human(src),
        human(peers),
        human(reused)
    );
}

async fn push(c: &Client, source_file: &Path, targets: &[String]) -> anyhow::Result<(pb::JobReport, Duration)> {
    let spec = pb::JobSpec {
        source: "w1".into(),
        files: vec![source_file.display().to_string()],
        targets: targets.to_vec(),
        destination: "pushed/".into(),
        ..Default::default()
    };
    let start = Instant::now();
    let resp = c.submit_job(spec, false).await?;
    let report = follow(c, &resp.job_id).await?;
    let took = start.elapsed();
    if report.state != "succeeded" {
        crate::job_cmd::print_report(&report);
        bail!("job {} ended {}", report.job_id, report.state);
    }
    Ok((report, took))
}

async fn demo(a: DemoArgs, root: &Path) -> anyhow::Result<()> {
    println!("ferry demo: 3 schedulers and {} workers on 127.0.0.1, data in {}", a.workers, root.display());
    let cluster = LocalCluster::start(&root.join("schedulers"), 3, 0, None, |_| {}).await?;
    cluster.wait_leader(Duration::from_secs(10)).await.context("no leader elected")?;
    let endpoints = cluster.endpoints();
    let mut workers = Vec::new();
    for i in 1..=a.workers {
        let name = format!("w{i}");
        let config = WorkerConfig {
            name: name.clone(),
            listen: "127.0.0.1:0".parse()?,
            schedulers: endpoints.clone(),
            data: root.join(&name).join("data"),
            roots: vec![root.join(&name).join("root")],
            labels: [("zone".to_string(), if i % 2 == 0 { "a" } else { "b" }.to_string())].into(),
            tls: cluster.files(&Identity::Worker(name.clone()))?.into(),
            ..WorkerConfig::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        workers.push(Worker::start_with(config, listener).await?);
    }
    let c = Client::connect(&endpoints, cluster.credentials(&Identity::User("demo".into()))?)?;
    let names: Vec<String> = (2..=a.workers).map(|i| format!("w{i}")).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = c.list_workers().await?.iter().filter(|w| w.state == "up").count() as u64;
        if up == a.workers {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {up} of {} workers connected", a.workers);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let src_root = root.join("w1").join("root").canonicalize()?;
    let file = src_root.join("model.bin");
    println!("writing {} of random data to {} on w1", human(a.size), file.display());
    ferry_worker::sample::write_random(&file, a.size, 0x5eed)?;

    println!("push 1: the whole file from w1 to {}", names.join(", "));
    let (r1, t1) = push(&c, &file, &names).await?;
    let want = file_hash(&file)?;
    for n in &names {
        let copy = root.join(n).join("root").join("pushed/model.bin");
        if file_hash(&copy)? != want {
            bail!("{} differs from the source", copy.display());
        }
    }
    println!("  every copy verified (BLAKE3 {})", &want.to_hex()[..16]);
    print_sources(&r1, t1);

    println!("push 2: 1 MiB changed in the middle of the file");
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&file)?;
        f.seek(SeekFrom::Start(a.size / 2))?;
        let patch: Vec<u8> =
            (0..(1u32 << 20).min(a.size as u32)).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
        f.write_all(&patch)?;
    }
    let (r2, t2) = push(&c, &file, &names).await?;
    let want = file_hash(&file)?;
    for n in &names {
        if file_hash(&root.join(n).join("root").join("pushed/model.bin"))? != want {
            bail!("{n} differs after the update");
        }
    }
    println!("  every copy verified again");
    print_sources(&r2, t2);
    let moved: u64 = r2.targets.iter().map(|t| t.bytes_from_source + t.bytes_from_peers).sum();
    println!(
        "  the update moved {} per worker on average ({:.1}% of the file)",
        human(moved / r2.targets.len().max(1) as u64),
        100.0 * moved as f64 / (r2.total_bytes.max(1) * r2.targets.len() as u64) as f64
    );

    for w in workers {
        w.shutdown().await;
    }
    cluster.shutdown().await;
    Ok(())
}

/// Runs the demo; exit 0 on success.
pub async fn run(a: DemoArgs) -> u8 {
    let (root, temporary) = match &a.dir {
        Some(d) => (d.clone(), false),
        None => (std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id())), true),
    };
    if let Err(e) = std::fs::create_dir_all(&root) {
        eprintln!("error: {}: {e}", root.display());
        return 1;
    }
    let result = demo(a, &root).await;
    if temporary {
        let _ = std::fs::remove_dir_all(&root);
    }
    match result {
        Ok(()) => {
            println!("demo finished");
            0
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}
