//! What an operator does before upgrading a leader, and what a release's
//! gated features do, on real processes: `ferry cluster transfer-leader` as
//! the docs show it (bad input first), a leader stopping with SIGTERM that
//! hands over, each member's version and the cluster version in `cluster
//! status`, and a short job history forgetting the oldest jobs on every
//! member.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_on_request_and_when_the_leader_stops_while_writes_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sched = Schedulers::start(dir.path(), &[]);
    let leader = sched.agreed_leader(&[1, 2, 3]).await;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let all = sched.addrs.join(",");

    // The versions, as an operator checks them before an upgrade.
    let status = wait_for("the cluster version", Duration::from_secs(20), || async {
        let (code, text) = ferry_at(&all, &["cluster", "status"]);
        (code == 0 && text.contains("cluster version: ")).then_some(text)
    })
    .await;
    let version = env!("CARGO_PKG_VERSION");
    assert!(status.contains(&format!("cluster version: {version}")), "{status}");
    assert_eq!(status.lines().filter(|l| l.split_whitespace().any(|w| w == version)).count(), 4, "{status}");

    // Bad input first: nothing moves.
    let one = sched.addr(followers[0]);
    let (code, text) = ferry_at(&one, &["cluster", "transfer-leader", "--to", "9"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("to: node 9 is not a voter"), "{text}");
    let (code, text) = ferry_at(&one, &["cluster", "transfer-leader", "--to", &leader.to_string()]);
    assert_eq!((code, text.contains("already leads")), (2, true), "{text}");
    let (code, text) = ferry_at(&one, &["cluster", "transfer-leader", "--to", "0"]);
    assert_eq!(code, 2, "{text}");
    assert_eq!(sched.agreed_leader(&[1, 2, 3]).await, leader, "a refused transfer moved nothing");

    // Writes go on all along, with the SDK's own deadlines: none may fail.
    let c = sched.client(&[1, 2, 3]);
    let (written, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (c, written, failed, stop) = (c.clone(), written.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match c.put("k", written.load(Ordering::Relaxed).to_string().into_bytes()).await {
                    Ok(_) => written.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.push(e.to_string());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            errors
        })
    };

    // Asked at a follower (forwarded to the leader), as the docs show it.
    let to = followers[1];
    let (code, text) = ferry_at(&one, &["cluster", "transfer-leader", "--to", &to.to_string()]);
    assert_eq!(code, 0, "{text}\n{}", sched.logs());
    assert!(text.starts_with(&format!("leader: {to} ")), "{text}");
    // Read from a member that took no part in the call.
    assert_eq!(sched.client(&[leader]).status_of(&sched.addr(leader)).await.expect("status").leader_id, to);
    assert_eq!(sched.agreed_leader(&[1, 2, 3]).await, to);

    // The new leader stops as an operator stops it: it hands over first.
    let exit = sched.terminate(to, Duration::from_secs(20)).expect("stopped within 20 s");
    assert!(exit.success(), "{exit}");
    let log = sched.procs[(to - 1) as usize].log_text();
    assert!(log.contains("handed leadership over"), "{log}");
    let rest: Vec<u64> = (1..=3).filter(|id| *id != to).collect();
    sched.agreed_leader(&rest).await;
    let before = written.load(Ordering::Relaxed);
    wait_for("writes after the stop", Duration::from_secs(20), || async {
        (written.load(Ordering::Relaxed) > before + 10).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let errors = writer.await.expect("writer");
    assert!(errors.is_empty(), "{} writes failed: {errors:?}", errors.len());
    assert!(written.load(Ordering::Relaxed) > 20, "the writer wrote");
    assert_eq!(failed.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_job_history_forgets_the_oldest_finished_jobs_on_every_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = ferry(&["scheduler", "--job-history", "-1"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let sched = Schedulers::start(dir.path(), &["--job-history", "2"]);
    let c = sched.client(&[1, 2, 3]);
    let src = WorkerProc::start(dir.path(), "src", &sched.addrs, &[]);
    let _t = WorkerProc::start(dir.path(), "t", &sched.addrs, &[]);
    workers_up(&c, &["src", "t"]).await;
    let leader = sched.agreed_leader(&[1, 2, 3]).await;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let mut ids = Vec::new();
    for i in 0..4 {
        std::fs::write(src.root.join("f.bin"), random_bytes(64 * 1024, i)).expect("write");
        let file = src.root.join("f.bin").display().to_string();
        let (code, text) = ferry_at(
            &sched.addr(leader),
            &["--json", "job", "submit", "--source", "src", "--file", &file, "--to", "t", "--dest", "d/", "--wait"],
        );
        assert_eq!(code, 0, "{text}");
        let first = text.lines().next().unwrap_or_default();
        let report: serde_json::Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {text}"));
        ids.push(report["job_id"].as_str().expect("job_id").to_string());
    }
    // Read at a follower: only the newest two are left.
    let listed = wait_for("the oldest jobs forgotten", Duration::from_secs(30), || async {
        let listed: Vec<String> =
            sched.client(&[follower]).list_jobs().await.ok()?.into_iter().map(|j| j.job_id).collect();
        (listed.len() == 2).then_some(listed)
    })
    .await;
    for id in &ids[2..] {
        assert!(listed.contains(id), "{id} kept: {listed:?}");
    }
    let (code, text) = ferry_at(&sched.addr(follower), &["job", "status", &ids[0]]);
    assert_eq!(code, 1, "{text}");
}
