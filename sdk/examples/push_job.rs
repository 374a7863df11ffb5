//! Push files and follow the job: submit without waiting, stream its
//! progress events, print the final report. Against a running cluster with
//! workers (see "Pushing files" in the README).
//!
//! ```text
//! cargo run -p ferry-sdk --example push_job -- SOURCE FILE TARGET[,TARGET...] DEST [ENDPOINT...]
//! cargo run -p ferry-sdk --example push_job -- w1 /srv/ferry/model.bin w2,w3 in/ 127.0.0.1:7001
//! ```
//!
//! DEST is where the file goes on each target: an absolute path, or one
//! relative to the target's first allowed root; ending in `/`, a directory.
//!
//! Exits 0 when every target installed the file (or already had it), 1
//! otherwise.

use std::time::Duration;

use anyhow::{bail, Context};
use ferry_sdk::{pb, Client};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [source, file, targets, destination, endpoints @ ..] = args.as_slice() else {
        bail!("usage: push_job SOURCE FILE TARGET[,TARGET...] DEST [ENDPOINT...]");
    };
    let endpoints = if endpoints.is_empty() { vec!["127.0.0.1:7001".to_string()] } else { endpoints.to_vec() };
    let client = Client::connect(&endpoints, ferry_sdk::Security::from_env()?)?;

    let spec = pb::JobSpec {
        source: source.clone(),
        files: vec![file.clone()],
        targets: targets.split(',').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect(),
        destination: destination.clone(),
        timeout_ms: Duration::from_secs(600).as_millis() as u64,
        ..Default::default()
    };
    // Not `wait`: the call returns once the job is in the log. A retried
    // submission reuses its request id, so the job is created once.
    let job_id = client.submit_job(spec, false).await.context("submit")?.job_id;
    println!("job {job_id} submitted");

    // Progress events until the last one (`done`). The stream is served by
    // one scheduler; if it breaks (that scheduler died), open it again on
    // any other: each event carries the whole report, so nothing is lost.
    // (A follower that has not applied the job yet answers NotFound: also
    // worth another try, a few times.)
    let mut failures = 0;
    let report = loop {
        let mut events = match client.watch_job(&job_id).await {
            Ok(events) => events,
            Err(e) if failures < 30 => {
                failures += 1;
                eprintln!("cannot watch the job ({e}); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e).context("watch job"),
        };
        failures = 0;
        let mut last = None;
        loop {
            match events.message().await {
                Ok(Some(event)) => {
                    if let Some(report) = &event.report {
                        print_progress(report);
                    }
                    if event.done {
                        last = event.report;
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    eprintln!("progress stream broke ({}); reopening", status.message());
                    break;
                }
            }
        }
        if let Some(report) = last {
            break report;
        }
    };

    println!("\njob {} {}: {} bytes per target", report.job_id, report.state, report.total_bytes);
    for t in &report.targets {
        println!(
            "  {:<12} {:<12} {} from source, {} from peers, {} reused, {} ms",
            t.worker, t.state, t.bytes_from_source, t.bytes_from_peers, t.bytes_reused, t.duration_ms
        );
        if !t.reason.is_empty() {
            println!("  {:<12} reason: {}", "", t.reason);
        }
    }
    if report.state == "succeeded" {
        Ok(())
    } else {
        std::process::exit(1)
    }
}

/// One line per event: how far each target is.
fn print_progress(report: &pb::JobReport) {
    let targets: Vec<String> = report
        .targets
        .iter()
        .map(|t| {
            let pct = (t.bytes_done * 100).checked_div(report.total_bytes).unwrap_or(100);
            format!("{} {} {pct}%", t.worker, t.state)
        })
        .collect();
    println!("{}: {}", report.state, targets.join(", "));
}
