//! File distribution over real processes: three schedulers, several workers.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use ferry_sdk::pb;

fn hash(path: &Path) -> [u8; 32] {
    *blake3::hash(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).as_bytes()
}

fn spec(source: &str, files: Vec<String>, f: impl FnOnce(&mut pb::JobSpec)) -> pb::JobSpec {
    let mut s = pb::JobSpec { source: source.into(), files, ..Default::default() };
    f(&mut s);
    s
}

async fn finished(c: &ferry_sdk::Client, id: &str, timeout: Duration) -> pb::JobReport {
    wait_for("the job to end", timeout, || async {
        let r = c.get_job(id).await.ok()?;
        (r.state != "running").then_some(r)
    })
    .await
}

/// A plain HTTP/1.0 GET: (status, body).
async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to the admin port");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Pushes `files` from `src` to every `role=t` worker's `in/`, waiting for
/// the report.
async fn push_to_targets(c: &ferry_sdk::Client, files: Vec<String>) -> pb::JobReport {
    let spec = spec("src", files, |s| {
        s.selector = "role=t".into();
        s.destination = "in/".into();
    });
    c.submit_job(spec, true).await.expect("submit").report.expect("report with wait")
}

/// Submits a job (no wait) that pushes `file` from `src`'s root to worker
/// `t`'s `in/`; returns its id.
async fn push_to_t(c: &ferry_sdk::Client, src: &WorkerProc, file: &str) -> String {
    let spec = spec("src", vec![src.root.join(file).display().to_string()], |s| {
        s.targets = vec!["t".into()];
        s.destination = "in/".into();
    });
    c.submit_job(spec, false).await.expect("submit").job_id
}

fn moved(t: &pb::TargetReport) -> u64 {
    t.bytes_from_source + t.bytes_from_peers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_four_targets_several_files_then_delta_then_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let mut workers = vec![WorkerProc::start(dir.path(), "src", &sched.addrs, &["--labels", "role=source"])];
    // t0 serves its admin port; t3 keeps no replaced versions.
    let admin = format!("127.0.0.1:{}", free_port());
    for (i, zone) in ["a", "a", "b", "b"].iter().enumerate() {
        let labels = format!("role=t,zone={zone}");
        let mut extra = vec!["--labels", &labels];
        match i {
            0 => extra.extend(["--admin-listen", &admin]),
            3 => extra.extend(["--store-limit", "0"]),
            _ => {}
        }
        workers.push(WorkerProc::start(dir.path(), &format!("t{i}"), &sched.addrs, &extra));
    }
    workers_up(&c, &["src", "t0", "t1", "t2", "t3"]).await;

    // Odd size, empty, smaller than a chunk, several chunks.
    let root = workers[0].root.clone();
    let files = [("odd.bin", 3 * 1024 * 1024 + 7), ("empty", 0), ("tiny.txt", 100), ("big.bin", 12 * 1024 * 1024)];
    for (i, (name, len)) in files.iter().enumerate() {
        std::fs::write(root.join(name), random_bytes(*len, i as u64 + 1)).expect("write source file");
    }
    let paths: Vec<String> = files.iter().map(|(n, _)| root.join(n).display().to_string()).collect();
    let total: u64 = files.iter().map(|(_, l)| *l as u64).sum();
    let resp = c
        .submit_job(
            spec("src", paths.clone(), |s| {
                s.selector = "role=t".into();
                s.destination = "in/".into();
                s.hook = "reload".into();
            }),
            true,
        )
        .await
        .expect("submit");
    let r = resp.report.expect("report with wait");
    assert_eq!(r.state, "succeeded", "{r:?}\n{}", sched.logs());
    assert_eq!(r.total_bytes, total);
    assert_eq!(r.files.len(), 4);
    assert_eq!(r.targets.len(), 4);
    for t in &r.targets {
        assert_eq!(t.state, "installed", "{t:?}");
        assert_eq!(t.bytes_done, total);
        assert_eq!(t.bytes_from_source + t.bytes_from_peers + t.bytes_reused, total);
        assert_eq!(t.hook_exit, Some(0));
        let w = workers.iter().find(|w| w.name == t.worker).expect("worker");
        for (name, _) in &files {
            assert_eq!(hash(&w.root.join("in").join(name)), hash(&root.join(name)), "{name} on {}", t.worker);
        }
        let hook_log = std::fs::read_to_string(dir.path().join(&t.worker).join("hook.log")).unwrap_or_default();
        assert!(hook_log.contains(&resp.job_id), "hook ran with the job id");
    }
    let from_source: u64 = r.targets.iter().map(|t| t.bytes_from_source).sum();
    assert!(from_source < 4 * total, "peers must serve part of the data ({from_source} of {})", 4 * total);

    // Change 1 MiB in the middle of the big file: only changed chunks move.
    let big = root.join("big.bin");
    let original = std::fs::read(&big).expect("read");
    let mut data = original.clone();
    for b in &mut data[6 * 1024 * 1024..7 * 1024 * 1024] {
        *b = b.wrapping_add(1);
    }
    std::fs::write(&big, &data).expect("write");
    let big_path = vec![big.display().to_string()];
    let r = push_to_targets(&c, big_path.clone()).await;
    assert_eq!(r.state, "succeeded");
    for t in &r.targets {
        let w = workers.iter().find(|w| w.name == t.worker).expect("worker");
        assert_eq!(hash(&w.root.join("in/big.bin")), hash(&big));
        assert!(moved(t) <= 8 * 1024 * 1024, "{} moved {} bytes for a 1 MiB change", t.worker, moved(t));
        assert!(t.bytes_reused >= 4 * 1024 * 1024, "{} reused only {}", t.worker, t.bytes_reused);
    }

    // The same again: every target already has it.
    let r = push_to_targets(&c, big_path.clone()).await;
    assert_eq!(r.state, "succeeded");
    for t in &r.targets {
        assert_eq!((t.state.as_str(), moved(t)), ("unchanged", 0), "{t:?}");
    }

    // Roll back to the first version: targets kept it when it was replaced
    // and move nothing, except t3, which keeps no replaced versions.
    std::fs::write(&big, &original).expect("write");
    let r = push_to_targets(&c, big_path).await;
    assert_eq!(r.state, "succeeded");
    for t in &r.targets {
        let w = workers.iter().find(|w| w.name == t.worker).expect("worker");
        assert_eq!(hash(&w.root.join("in/big.bin")), hash(&big));
        if t.worker == "t3" {
            assert!(moved(t) > 0, "t3 keeps nothing, yet moved nothing: {t:?}");
        } else {
            assert_eq!((moved(t), t.bytes_reused), (0, original.len() as u64), "{t:?}");
        }
    }

    // t0's admin port: ready, and its metrics saw the work.
    let (status, _) = http_get(&admin, "/readyz").await;
    assert_eq!(status, 200);
    let (status, metrics) = http_get(&admin, "/metrics").await;
    assert_eq!(status, 200);
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in\n{metrics}"))
    };
    assert!(value("ferry_worker_files_installed_total") >= 6.0, "{metrics}");
    assert!(value("ferry_worker_chunks_reused_total") > 0.0, "{metrics}");
    assert!(value("ferry_worker_downloaded_bytes_total") >= total as f64, "{metrics}");
    assert_eq!(value("ferry_worker_session_connected"), 1.0);

    // The CLI reads the same report; exit 0 for success.
    let out = ferry(&["--endpoints", &sched.addrs.join(","), "--json", "job", "status", &resp.job_id]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["state"], "succeeded");
    assert_eq!(v["targets"].as_array().map(|a| a.len()), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jobs_are_rejected_at_submit_and_move_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    let src = WorkerProc::start(dir.path(), "src", &sched.addrs, &[]);
    let t = WorkerProc::start(dir.path(), "t", &sched.addrs, &["--labels", "role=t"]);
    workers_up(&c, &["src", "t"]).await;
    std::fs::write(src.root.join("a.bin"), b"payload").expect("write");
    let a = src.root.join("a.bin").display().to_string();
    let cases: Vec<(pb::JobSpec, &str)> = vec![
        (spec("src", vec![a.clone()], |s| s.targets = vec!["ghost".into()]), "targets: unknown worker ghost"),
        (spec("src", vec![a.clone()], |s| s.selector = "role=nobody".into()), "targets: no worker"),
        (spec("src", vec![a.clone()], |_| {}), "targets:"),
        (spec("src", vec!["/etc/passwd".into()], |s| s.targets = vec!["t".into()]), "files:"),
        (
            spec("src", vec![a.clone()], |s| {
                s.targets = vec!["t".into()];
                s.destination = "/etc/evil".into();
            }),
            "destination:",
        ),
        (
            spec("src", vec![a.clone()], |s| {
                s.targets = vec!["t".into()];
                s.destination = "../../escape/".into();
            }),
            "destination:",
        ),
        (
            spec("src", vec![a.clone()], |s| {
                s.targets = vec!["t".into()];
                s.destination = "in/".into();
                s.hook = "rm-everything".into();
            }),
            "hook: worker t has no hook",
        ),
        (
            spec("src", vec![format!("{}/missing.bin", src.root.display())], |s| {
                s.targets = vec!["t".into()];
                s.destination = "in/".into();
            }),
            "files:",
        ),
        (spec("nobody", vec![a.clone()], |s| s.targets = vec!["t".into()]), "source: unknown worker"),
    ];
    for (s, want) in cases {
        let err = c.submit_job(s, true).await.expect_err(want);
        assert!(err.is_invalid_argument(), "{want}: {err}");
        assert!(err.to_string().contains(want), "expected '{want}' in '{err}'");
    }
    assert!(c.list_jobs().await.expect("list").is_empty(), "nothing was logged");
    let entries: Vec<_> = std::fs::read_dir(&t.root).expect("read root").collect();
    assert!(entries.is_empty(), "nothing was written on the target");
    let out = ferry(&[
        "--endpoints",
        &sched.addrs.join(","),
        "job",
        "submit",
        "--source",
        "src",
        "--file",
        &a,
        "--to",
        "ghost",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("targets: unknown worker ghost"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_a_leader_kill_and_a_dead_target_fails_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    let src = WorkerProc::start(dir.path(), "src", &sched.addrs, &[]);
    // Capped downloads make the job last a few seconds.
    let slow = ["--labels", "role=t", "--download-limit", "3MiB/s"];
    let mut targets: Vec<WorkerProc> =
        (0..3).map(|i| WorkerProc::start(dir.path(), &format!("t{i}"), &sched.addrs, &slow)).collect();
    workers_up(&c, &["src", "t0", "t1", "t2"]).await;
    let size = 9 * 1024 * 1024;
    std::fs::write(src.root.join("data.bin"), random_bytes(size, 42)).expect("write");
    let file = src.root.join("data.bin").display().to_string();
    let resp = c
        .submit_job(
            spec("src", vec![file], |s| {
                s.selector = "role=t".into();
                s.destination = "in/".into();
                s.grace_ms = 2000;
            }),
            false,
        )
        .await
        .expect("submit");

    // Mid-job: kill the scheduler leader, and kill target t2 for good.
    wait_for("transfer under way", Duration::from_secs(20), || async {
        let r = c.get_job(&resp.job_id).await.ok()?;
        r.targets.iter().any(|t| t.bytes_done > 0).then_some(())
    })
    .await;
    let leader = sched.agreed_leader(&[1, 2, 3]).await;
    sched.kill9(leader);
    targets[2].proc.kill9();

    let rest: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let survivors = sched.client(&rest);
    let r = finished(&survivors, &resp.job_id, Duration::from_secs(90)).await;
    assert_eq!(r.state, "failed", "one target died: {r:?}");
    for t in &r.targets {
        if t.worker == "t2" {
            assert_eq!(t.state, "failed");
            assert!(t.reason.contains("disconnected"), "{}", t.reason);
        } else {
            assert_eq!(t.state, "installed", "{t:?}\n{}", sched.logs());
            let w = targets.iter().find(|w| w.name == t.worker).expect("worker");
            assert_eq!(hash(&w.root.join("in/data.bin")), hash(&src.root.join("data.bin")));
        }
    }
    // Never a partial file under the final name on the dead target.
    let partial = targets[2].root.join("in/data.bin");
    assert!(!partial.exists() || hash(&partial) == hash(&src.root.join("data.bin")));
    let out = ferry(&["--endpoints", &sched.addrs.join(","), "job", "status", &resp.job_id]);
    assert_eq!(out.status.code(), Some(1), "a failed job exits 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_source_dies_peers_share_what_they_hold_and_the_report_names_missing_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    // A slow source: the job cannot finish before it is killed.
    let mut src = WorkerProc::start(dir.path(), "src", &sched.addrs, &["--upload-limit", "2MiB/s"]);
    let targets: Vec<WorkerProc> = (0..2)
        .map(|i| WorkerProc::start(dir.path(), &format!("t{i}"), &sched.addrs, &["--labels", "role=t"]))
        .collect();
    workers_up(&c, &["src", "t0", "t1"]).await;
    std::fs::write(src.root.join("big.bin"), random_bytes(24 * 1024 * 1024, 9)).expect("write");
    std::fs::write(src.root.join("small.txt"), b"hello").expect("write");
    let files = ["big.bin", "small.txt"].map(|n| src.root.join(n).display().to_string()).to_vec();
    let resp = c
        .submit_job(
            spec("src", files, |s| {
                s.selector = "role=t".into();
                s.destination = "in/".into();
                s.timeout_ms = 12_000;
            }),
            false,
        )
        .await
        .expect("submit");
    let held_at_kill = wait_for("a first chunk on a target", Duration::from_secs(20), || async {
        let r = c.get_job(&resp.job_id).await.ok()?;
        let most = r.targets.iter().map(|t| t.bytes_done).max()?;
        (most > 0).then_some(most)
    })
    .await;
    src.proc.kill9();

    let r = finished(&c, &resp.job_id, Duration::from_secs(60)).await;
    assert_eq!(r.state, "failed", "{r:?}");
    for t in &r.targets {
        assert_eq!(t.state, "failed", "{t:?}");
        assert!(t.reason.contains("not delivered") && t.reason.contains("big.bin"), "{}", t.reason);
        // What one target held when the source died reached the other.
        assert!(t.bytes_done >= held_at_kill, "{} has {} of the {held_at_kill} a peer held", t.worker, t.bytes_done);
        let w = targets.iter().find(|w| w.name == t.worker).expect("worker");
        assert!(!w.root.join("in/big.bin").exists(), "no partial file under the final name");
    }
}

/// What [`push_beside_a_faulty_holder`] leaves: the running cluster and
/// workers, and the second job's report.
struct FaultyHolder {
    _sched: Schedulers,
    src: WorkerProc,
    good: WorkerProc,
    report: pb::JobReport,
}

/// A push beside a misbehaving holder: the peer `bad` (started with the
/// fail point `fault` armed) first gets a 16 MiB file alone, so it holds every
/// chunk and the planner prefers it over the source; then the file goes to
/// `bad` and to `good` (started with `good_flags`, its download capped so
/// chunks are planned over time) in a job with `timeout_ms` (0: default).
async fn push_beside_a_faulty_holder(dir: &Path, fault: &str, good_flags: &[&str], timeout_ms: u64) -> FaultyHolder {
    let sched = Schedulers::start(dir, &[]);
    let c = sched.client(&[1, 2, 3]);
    let src = WorkerProc::start(dir, "src", &sched.addrs, &[]);
    let _bad = WorkerProc::start_with_env(dir, "bad", &sched.addrs, &[], &[("FAILPOINTS", &format!("{fault}=return"))]);
    let good = WorkerProc::start(dir, "good", &sched.addrs, &[&["--download-limit", "8MiB/s"], good_flags].concat());
    workers_up(&c, &["src", "bad", "good"]).await;
    std::fs::write(src.root.join("f.bin"), random_bytes(16 * 1024 * 1024, 7)).expect("write");
    let file = vec![src.root.join("f.bin").display().to_string()];
    // `bad` gets the file first (its downloads are fine; its uploads are not).
    let r = c
        .submit_job(
            spec("src", file.clone(), |s| {
                s.targets = vec!["bad".into()];
                s.destination = "in/".into();
            }),
            true,
        )
        .await
        .expect("first job")
        .report
        .expect("report");
    assert_eq!(r.state, "succeeded");
    let report = c
        .submit_job(
            spec("src", file, |s| {
                s.targets = vec!["bad".into(), "good".into()];
                s.destination = "in/".into();
                s.timeout_ms = timeout_ms;
            }),
            true,
        )
        .await
        .expect("second job")
        .report
        .expect("report");
    FaultyHolder { _sched: sched, src, good, report }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_peer_is_detected_and_the_chunk_comes_from_elsewhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let FaultyHolder { src, good, report: r, .. } =
        push_beside_a_faulty_holder(dir.path(), "chunk-server-corrupt", &[], 0).await;
    assert_eq!(r.state, "succeeded", "{r:?}");
    let g = r.targets.iter().find(|t| t.worker == "good").expect("good");
    assert_eq!(g.bytes_from_peers, 0, "no corrupt byte was accepted from the peer");
    assert_eq!(hash(&good.root.join("in/f.bin")), hash(&src.root.join("f.bin")));
    assert!(
        good.proc.log_text().contains("failed its BLAKE3 check"),
        "the corrupt chunk was detected:\n{}",
        good.proc.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_sending_is_given_up_and_the_chunks_come_from_elsewhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 30 s: shorter than the 60 s after which the leader plans an unanswered
    // pull again (and the stalled call's own deadline), so the job succeeds
    // only if `good` gives up on `bad` by itself.
    let FaultyHolder { src, good, report: r, .. } =
        push_beside_a_faulty_holder(dir.path(), "chunk-server-stall", &["--pull-stall-timeout", "1s"], 30_000).await;
    assert_eq!(r.state, "succeeded", "{r:?}");
    let g = r.targets.iter().find(|t| t.worker == "good").expect("good");
    assert_eq!(g.bytes_from_peers, 0, "nothing came from the stalled peer");
    assert_eq!(hash(&good.root.join("in/f.bin")), hash(&src.root.join("f.bin")));
    assert!(
        good.proc.log_text().contains("bad sent nothing for 1s"),
        "the stalled pull was given up:\n{}",
        good.proc.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_back_within_grace_resumes_and_cancel_leaves_no_final_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    let src = WorkerProc::start(dir.path(), "src", &sched.addrs, &[]);
    let mut t = WorkerProc::start(dir.path(), "t", &sched.addrs, &["--download-limit", "3MiB/s"]);
    workers_up(&c, &["src", "t"]).await;
    std::fs::write(src.root.join("r.bin"), random_bytes(8 * 1024 * 1024, 3)).expect("write");
    let file = vec![src.root.join("r.bin").display().to_string()];
    let id = c
        .submit_job(
            spec("src", file.clone(), |s| {
                s.targets = vec!["t".into()];
                s.destination = "in/".into();
                s.grace_ms = 30_000;
            }),
            false,
        )
        .await
        .expect("submit")
        .job_id;
    wait_for("some chunks", Duration::from_secs(20), || async {
        (c.get_job(&id).await.ok()?.targets[0].chunks_done > 0).then_some(())
    })
    .await;
    t.proc.kill9();
    t.restart();
    let r = finished(&c, &id, Duration::from_secs(60)).await;
    assert_eq!(r.state, "succeeded", "{r:?}");
    assert_eq!(hash(&t.root.join("in/r.bin")), hash(&src.root.join("r.bin")));

    // Cancel a slow job midway: it ends cancelled, nothing is installed and
    // the staging file goes away.
    std::fs::write(src.root.join("c.bin"), random_bytes(12 * 1024 * 1024, 4)).expect("write");
    let id = push_to_t(&c, &src, "c.bin").await;
    wait_for("some chunks", Duration::from_secs(20), || async {
        (c.get_job(&id).await.ok()?.targets[0].chunks_done > 0).then_some(())
    })
    .await;
    let r = c.cancel_job(&id).await.expect("cancel");
    assert_eq!(r.state, "cancelled");
    assert_eq!(r.targets[0].state, "cancelled");
    let in_dir = t.root.join("in");
    wait_for("staging removed", Duration::from_secs(10), || async {
        let left: Vec<_> =
            std::fs::read_dir(&in_dir).ok()?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        (!left.iter().any(|n| n.contains(".ferry-"))).then_some(())
    })
    .await;
    assert!(!in_dir.join("c.bin").exists(), "a cancelled job installs nothing");
    let out = ferry(&["--endpoints", &sched.addrs.join(","), "job", "status", &id]);
    assert_eq!(out.status.code(), Some(1), "a cancelled job is not a success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callback_url_gets_the_final_report() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &["--callback-host", "127.0.0.1"]);
    let c = sched.client(&[1, 2, 3]);
    let src = WorkerProc::start(dir.path(), "src", &sched.addrs, &[]);
    let _t = WorkerProc::start(dir.path(), "t", &sched.addrs, &[]);
    workers_up(&c, &["src", "t"]).await;
    std::fs::write(src.root.join("cb.bin"), b"callback payload").expect("write");
    // A one-shot HTTP server that records the POST body.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/done", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.expect("accept");
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = sock.read(&mut buf).await.expect("read");
            req.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&req);
            if let Some(head_end) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if req.len() >= head_end + 4 + len || n == 0 {
                    break;
                }
            }
        }
        sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.expect("respond");
        String::from_utf8_lossy(&req).into_owned()
    });
    // A host the schedulers do not list is refused at submit.
    let err = c
        .submit_job(
            spec("src", vec![src.root.join("cb.bin").display().to_string()], |s| {
                s.targets = vec!["t".into()];
                s.destination = "in/".into();
                s.callback_url = "http://169.254.169.254/latest/meta-data".into();
            }),
            false,
        )
        .await
        .expect_err("not an allowed host");
    assert!(err.is_invalid_argument() && err.to_string().contains("callback_url: host '169.254.169.254'"), "{err}");
    assert!(c.list_jobs().await.expect("list").is_empty(), "nothing was submitted");
    let id = c
        .submit_job(
            spec("src", vec![src.root.join("cb.bin").display().to_string()], |s| {
                s.targets = vec!["t".into()];
                s.destination = "in/".into();
                s.callback_url = url;
            }),
            false,
        )
        .await
        .expect("submit")
        .job_id;
    let request =
        tokio::time::timeout(Duration::from_secs(30), server).await.expect("callback in time").expect("server");
    assert!(request.starts_with("POST /done"), "{request}");
    let body = &request[request.find("\r\n\r\n").expect("body") + 4..];
    let v: serde_json::Value = serde_json::from_str(body).expect("json body");
    assert_eq!(v["job_id"], id);
    assert_eq!(v["state"], "succeeded");
    assert_eq!(v["targets"][0]["state"], "installed");
}

/// `ferry job watch` on a terminal (a pseudo-terminal from util-linux's
/// `script`): the progress bar is drawn while the job runs, then the report
/// is printed and the exit code says the job succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_watch_on_a_terminal_draws_progress_then_the_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    let src = WorkerProc::start(dir.path(), "src", &sched.addrs, &[]);
    // A capped download keeps the job running for a few seconds.
    let t = WorkerProc::start(dir.path(), "t", &sched.addrs, &["--download-limit", "4MiB/s"]);
    workers_up(&c, &["src", "t"]).await;
    std::fs::write(src.root.join("tty.bin"), random_bytes(12 * 1024 * 1024, 5)).expect("write");
    let id = push_to_t(&c, &src, "tty.bin").await;
    let command = format!("{FERRY} --endpoints {} job watch {id}", sched.addrs.join(","));
    let out = tokio::process::Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env("TERM", "xterm")
        .envs(common::user_env())
        .output()
        .await
        .expect("run script (util-linux)");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "job watch on a tty exited {}:\n{screen}", out.status);
    assert!(screen.contains("0/1 targets done"), "no progress bar while the job ran:\n{screen}");
    assert!(screen.contains("succeeded") && screen.contains("installed"), "no final report:\n{screen}");
    assert_eq!(hash(&t.root.join("in/tty.bin")), hash(&src.root.join("tty.bin")));
}

/// `ferry job submit --wait` as the README shows it, with no deadline flag,
/// for a push that takes longer than a client call's 15 s deadline: the job
/// runs to the end (its own deadline is 10 minutes by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_job_submit_waits_for_a_push_longer_than_a_calls_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    let src = WorkerProc::start(dir.path(), "src", &sched.addrs, &[]);
    // 20 MiB at 1 MiB/s: about 20 s.
    let t = WorkerProc::start(dir.path(), "t", &sched.addrs, &["--download-limit", "1MiB/s"]);
    workers_up(&c, &["src", "t"]).await;
    std::fs::write(src.root.join("slow.bin"), random_bytes(20 * 1024 * 1024, 9)).expect("write");
    let file = src.root.join("slow.bin").display().to_string();
    let started = std::time::Instant::now();
    let out = ferry(&[
        "--endpoints",
        &sched.addrs.join(","),
        "job",
        "submit",
        "--source",
        "src",
        "--file",
        &file,
        "--to",
        "t",
        "--dest",
        "in/",
        "--wait",
    ]);
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}\n{}", sched.logs());
    assert!(took > Duration::from_secs(15), "the push took {took:?}: it does not test a long push");
    assert!(stdout.contains("succeeded") && stdout.contains("installed"), "{stdout}");
    assert_eq!(hash(&t.root.join("in/slow.bin")), hash(&src.root.join("slow.bin")));
}

/// Job reads see a job the moment its submission returned, whichever member
/// took the submission and whichever answers the read: submit through each
/// scheduler in turn (the follow of `--wait` reads from the same one), then
/// read the job's status from the next one and list every job from a third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitted_job_is_found_at_once_on_every_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    let src = WorkerProc::start(dir.path(), "src", &sched.addrs, &[]);
    let _t = WorkerProc::start(dir.path(), "t", &sched.addrs, &[]);
    workers_up(&c, &["src", "t"]).await;
    std::fs::write(src.root.join("small.bin"), random_bytes(300 * 1024, 4)).expect("write");
    let file = src.root.join("small.bin").display().to_string();
    let mut ids = Vec::new();
    for round in 0..30 {
        let (at, then) = (&sched.addrs[round % 3], &sched.addrs[(round + 1) % 3]);
        let submit = [
            "--endpoints",
            at,
            "job",
            "submit",
            "--source",
            "src",
            "--file",
            &file,
            "--to",
            "t",
            "--dest",
            "in/",
            "--wait",
        ];
        let out = ferry(&submit);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(
            out.status.code(),
            Some(0),
            "round {round} through {at}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = stdout.split_whitespace().nth(1).expect("job id").trim_end_matches(':').to_string();
        let out = ferry(&["--endpoints", then, "--json", "job", "status", &id]);
        assert_eq!(out.status.code(), Some(0), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(report["state"], "succeeded", "round {round}: {report}");
        ids.push(id);
    }
    let out = ferry(&["--endpoints", &sched.addrs[2], "--json", "job", "list"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let listed: Vec<&str> = listed.as_array().expect("array").iter().filter_map(|j| j["job_id"].as_str()).collect();
    for id in &ids {
        assert!(listed.contains(&id.as_str()), "{id} missing from the list on another member");
    }
}
