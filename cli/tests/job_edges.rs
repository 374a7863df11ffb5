//! Jobs at their edges, over real processes: a hook that hangs, a source
//! file that changes or goes away during a push, a destination that leaves
//! its root through a symlink.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferry_sdk::pb;

/// Whether a process whose command line contains `marker` runs.
fn running(marker: &str) -> bool {
    std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(marker))
    })
}

async fn finished(c: &ferry_sdk::Client, id: &str, timeout: Duration) -> pb::JobReport {
    wait_for("the job to end", timeout, || async {
        let r = c.get_job(id).await.ok()?;
        (r.state != "running").then_some(r)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_still_running_at_the_deadline_is_killed_with_what_it_started() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    // The marker is the sleep's own command line, which the worker's
    // (holding the hook's text) does not contain.
    let marker = format!("sleep 613.{}", std::process::id());
    let src = WorkerProc::start(dir.path(), "src", &sched.addrs, &[]);
    let hook = format!("hang=n=613; sleep $n.{}; true", std::process::id());
    let _t = WorkerProc::start(dir.path(), "t", &sched.addrs, &["--hook", &hook]);
    workers_up(&c, &["src", "t"]).await;
    std::fs::write(src.root.join("f.bin"), random_bytes(64 * 1024, 3)).expect("write");
    let file = src.root.join("f.bin").display().to_string();
    let endpoints = sched.addrs.join(",");
    let args = ["--endpoints", &endpoints, "job", "submit", "--source", "src", "--file", &file, "--to", "t"];
    let out = ferry(&[&args[..], &["--dest", "in/", "--hook", "hang", "--job-timeout", "4s", "--wait"]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "the job fails: {stdout}");
    assert!(stdout.contains("timed out"), "{stdout}");
    // The deadline failed the target; its hook, and the sleep the hook's
    // shell started, are gone soon after (not after the hook's own 120 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    while running(&marker) {
        assert!(Instant::now() < deadline, "{marker} still runs 10 s after the job failed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_file_changed_or_deleted_during_a_push_fails_at_once_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    let src = WorkerProc::start(dir.path(), "src", &sched.addrs, &[]);
    // 16 MiB at 1 MiB/s: the push runs long enough to change its source.
    let _t = WorkerProc::start(dir.path(), "t", &sched.addrs, &["--download-limit", "1MiB/s"]);
    workers_up(&c, &["src", "t"]).await;
    let size = 16 * 1024 * 1024;
    for (round, change) in ["rewrite", "delete"].into_iter().enumerate() {
        let path = src.root.join(format!("{change}.bin"));
        std::fs::write(&path, random_bytes(size, round as u64)).expect("write");
        let spec = pb::JobSpec {
            source: "src".into(),
            files: vec![path.display().to_string()],
            targets: vec!["t".into()],
            destination: format!("{change}/"),
            timeout_ms: 300_000,
            ..Default::default()
        };
        let id = c.submit_job(spec, false).await.expect("submit").job_id;
        wait_for("the push to move bytes", Duration::from_secs(20), || async {
            let r = c.get_job(&id).await.ok()?;
            r.targets.iter().any(|t| t.bytes_done > 0).then_some(())
        })
        .await;
        match change {
            "rewrite" => std::fs::write(&path, random_bytes(size, 99)).expect("rewrite"),
            _ => std::fs::remove_file(&path).expect("delete"),
        }
        // Within seconds, not at the five-minute deadline.
        let report = finished(&c, &id, Duration::from_secs(30)).await;
        assert_eq!(report.state, "failed", "{report:?}");
        let reason = &report.targets[0].reason;
        assert!(reason.starts_with("source changed:") && reason.contains(&format!("{change}.bin")), "{reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_leading_out_of_a_root_through_a_symlink_is_refused_at_submit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    let src = WorkerProc::start(dir.path(), "src", &sched.addrs, &[]);
    let t = WorkerProc::start(dir.path(), "t", &sched.addrs, &[]);
    workers_up(&c, &["src", "t"]).await;
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).expect("outside dir");
    std::os::unix::fs::symlink(&outside, t.root.join("link")).expect("symlink in t's root");
    std::fs::write(src.root.join("f.bin"), random_bytes(1024, 5)).expect("write");
    let file = src.root.join("f.bin").display().to_string();
    let submit = |dest: &str| {
        let endpoints = sched.addrs.join(",");
        let args = ["--endpoints", &endpoints, "job", "submit", "--source", "src", "--file", &file, "--to", "t"];
        ferry(&[&args[..], &["--dest", dest, "--wait"]].concat())
    };
    let out = submit("link/");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "refused as bad input: {stderr}");
    assert!(stderr.contains("dest") && stderr.contains("worker t") && stderr.contains("outside"), "{stderr}");
    assert!(c.list_jobs().await.expect("list jobs").is_empty(), "no job was created");
    assert_eq!(std::fs::read_dir(&outside).expect("outside").count(), 0, "nothing written outside the root");
    // The same push to a plain directory goes through.
    let out = submit("in/");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(t.root.join("in/f.bin").is_file());
}

/// Sends `signal` (`-STOP`, `-CONT`) to `proc`.
fn signal(proc: &Proc, signal: &str) {
    let pid = proc.child.as_ref().expect("running").id().to_string();
    assert!(std::process::Command::new("kill").args([signal, &pid]).status().expect("kill").success());
}

/// `ferry job submit` as the README shows it, sent to a leader elected a
/// moment ago that the source has not reconnected to yet (held back here
/// by freezing it across the election, thawed a second after the submit):
/// the new leader waits for the source's session instead of refusing with
/// "source: worker src is not connected", which the chaos soak saw twice
/// in 60 jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_submitted_before_the_source_found_a_new_leader_is_taken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    let src = WorkerProc::start(dir.path(), "src", &sched.addrs, &[]);
    let t = WorkerProc::start(dir.path(), "t", &sched.addrs, &[]);
    workers_up(&c, &["src", "t"]).await;
    std::fs::write(src.root.join("f.bin"), random_bytes(100 * 1024, 5)).expect("write");
    let file = src.root.join("f.bin").display().to_string();
    for round in 0..2 {
        let leader = sched.agreed_leader(&[1, 2, 3]).await;
        signal(&src.proc, "-STOP");
        sched.kill9(leader);
        let rest: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
        sched.agreed_leader(&rest).await;
        let pid = src.proc.child.as_ref().expect("running").id().to_string();
        let thaw = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            std::process::Command::new("kill").args(["-CONT", &pid]).status()
        });
        let dest = format!("r{round}/");
        let submit =
            ["--endpoints", &sched.addrs.join(","), "job", "submit", "--source", "src", "--file", &file, "--to", "t"];
        let out = ferry(&[&submit[..], &["--dest", &dest, "--wait"]].concat());
        assert!(thaw.join().expect("thaw").expect("kill -CONT").success());
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(0), "round {round}:\n{stdout}\n{stderr}\n{}", sched.logs());
        let installed = std::fs::read(t.root.join(&dest).join("f.bin")).expect("installed");
        assert_eq!(installed, std::fs::read(src.root.join("f.bin")).expect("source"));
        sched.restart(leader);
    }
}
