//! `ferry job ...`: submit, status, list, watch, cancel.

use std::time::Duration;

use ferry_scheduler::grpc::jobs::from_pb;
use ferry_sdk::pb;
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{ClientArgs, JobCmd, SubmitArgs};
use crate::client_cmd::{client, fail};
use crate::output::escape;

/// Bytes as a short human string.
pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// 0 only when every target installed or was unchanged.
fn exit_code(r: &pb::JobReport) -> u8 {
    if r.state == "succeeded" {
        0
    } else {
        1
    }
}

/// Prints a report as text.
pub fn print_report(r: &pb::JobReport) {
    println!("job {}: {} ({} files, {})", r.job_id, r.state, r.files.len(), human(r.total_bytes));
    for f in &r.files {
        println!("  file {} -> {} ({}, {} chunks)", escape(&f.path), escape(&f.destination), human(f.size), f.chunks);
    }
    println!(
        "  {:<14} {:<12} {:>10} {:>12} {:>11} {:>10} {:>8} {:>5}  REASON",
        "TARGET", "STATE", "BYTES", "FROM SOURCE", "FROM PEERS", "REUSED", "TIME", "HOOK"
    );
    for t in &r.targets {
        println!(
            "  {:<14} {:<12} {:>10} {:>12} {:>11} {:>10} {:>7.1}s {:>5}  {}",
            escape(&t.worker),
            t.state,
            human(t.bytes_done),
            human(t.bytes_from_source),
            human(t.bytes_from_peers),
            human(t.bytes_reused),
            t.duration_ms as f64 / 1000.0,
            t.hook_exit.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            escape(&t.reason)
        );
    }
}

fn output(args: &ClientArgs, r: &pb::JobReport) -> u8 {
    if args.json {
        println!("{}", from_pb(r.clone()).to_json());
    } else {
        print_report(r);
    }
    exit_code(r)
}

/// Follows a job with a progress bar (drawn only on a terminal) until it
/// ends; returns the final report.
pub(crate) async fn follow(c: &ferry_sdk::Client, id: &str) -> Result<pb::JobReport, ferry_sdk::Error> {
    let mut stream = c.watch_job(id).await?;
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut reported = std::collections::HashSet::new();
    let mut last = None;
    loop {
        match stream.message().await {
            Ok(Some(ev)) => {
                let Some(r) = ev.report else { continue };
                let total = r.total_bytes * r.targets.len() as u64;
                bar.set_length(total.max(1));
                bar.set_position(r.targets.iter().map(|t| t.bytes_done).sum());
                let done = r.targets.iter().filter(|t| matches!(t.state.as_str(), "installed" | "unchanged")).count();
                bar.set_message(format!("{done}/{} targets done", r.targets.len()));
                for t in r.targets.iter().filter(|t| t.state == "failed") {
                    if reported.insert(t.worker.clone()) {
                        bar.println(format!("target {} failed: {}", t.worker, t.reason));
                    }
                }
                let finished = ev.done;
                last = Some(r);
                if finished {
                    break;
                }
            }
            Ok(None) => break,
            Err(status) => {
                bar.abandon();
                return Err(ferry_sdk::Error::Unavailable { last: status });
            }
        }
    }
    bar.finish_and_clear();
    match last {
        Some(r) if r.state != "running" => Ok(r),
        // The stream broke before the end (leader change): read the job.
        _ => loop {
            let r = c.get_job(id).await?;
            if r.state != "running" {
                return Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        },
    }
}

async fn submit(args: &ClientArgs, a: SubmitArgs) -> u8 {
    let c = match client(args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let spec = pb::JobSpec {
        source: a.source,
        files: a.files,
        targets: a.to,
        selector: a.selector,
        destination: a.dest,
        hook: a.hook,
        callback_url: a.callback,
        timeout_ms: a.job_timeout.as_millis() as u64,
        grace_ms: a.grace.as_millis() as u64,
    };
    let resp = match c.submit_job(spec, false).await {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if !a.wait {
        if args.json {
            println!("{}", serde_json::json!({ "job_id": resp.job_id }));
        } else {
            println!("{}", resp.job_id);
        }
        return 0;
    }
    match follow(&c, &resp.job_id).await {
        Ok(r) => output(args, &r),
        Err(e) => fail(e),
    }
}

/// `ferry job ...`.
pub async fn run(args: &ClientArgs, cmd: JobCmd) -> u8 {
    let c = match client(args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match cmd {
        JobCmd::Submit(a) => submit(args, *a).await,
        JobCmd::Status { id } => match c.get_job(&id).await {
            Ok(r) => output(args, &r),
            Err(e) => fail(e),
        },
        JobCmd::Watch { id } => match follow(&c, &id).await {
            Ok(r) => output(args, &r),
            Err(e) => fail(e),
        },
        JobCmd::Cancel { id } => match c.cancel_job(&id).await {
            Ok(r) => output(args, &r),
            Err(e) => fail(e),
        },
        JobCmd::List => match c.list_jobs().await {
            Ok(jobs) => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::Value::Array(jobs.iter().map(|j| from_pb(j.clone()).to_json()).collect())
                    );
                } else {
                    println!("{:<20} {:<10} {:>10} {:>8}  SOURCE", "JOB", "STATE", "SIZE", "TARGETS");
                    for j in jobs {
                        let source = j.spec.as_ref().map(|s| s.source.clone()).unwrap_or_default();
                        println!(
                            "{:<20} {:<10} {:>10} {:>8}  {source}",
                            j.job_id,
                            j.state,
                            human(j.total_bytes),
                            j.targets.len()
                        );
                    }
                }
                0
            }
            Err(e) => fail(e),
        },
    }
}
