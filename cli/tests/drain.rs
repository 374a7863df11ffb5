//! Draining a worker before it stops (an upgrade), on real processes: asked
//! with `ferry worker drain` as the docs show it (bad input first), and on
//! SIGTERM. A target drained in the middle of a job finishes the pulls in
//! flight, exits, and once started again the job completes byte-identical.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_drained_mid_job_stops_cleanly_and_the_job_completes_after_its_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    let src = WorkerProc::start(dir.path(), "src", &sched.addrs, &[]);
    // Slow, so the job is under way when the drain comes.
    let mut t = WorkerProc::start(dir.path(), "t", &sched.addrs, &["--download-limit", "2MiB/s"]);
    workers_up(&c, &["src", "t"]).await;
    let leader = sched.agreed_leader(&[1, 2, 3]).await;
    let follower = sched.addr((1..=3).find(|id| *id != leader).expect("a follower"));

    let (code, text) = ferry_at(&follower, &["worker", "drain", "nosuch"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("name: no worker nosuch"), "{text}");

    let data = random_bytes(12 << 20, 3);
    std::fs::write(src.root.join("big.bin"), &data).expect("write");
    let file = src.root.join("big.bin").display().to_string();
    let (code, id) =
        ferry_at(&follower, &["job", "submit", "--source", "src", "--file", &file, "--to", "t", "--dest", "d/"]);
    assert_eq!(code, 0, "{id}");
    let id = id.trim().to_string();
    wait_for("the job under way", Duration::from_secs(20), || async {
        let job = c.get_job(&id).await.ok()?;
        (job.targets.first()?.chunks_done > 0).then_some(())
    })
    .await;

    let (code, text) = ferry_at(&follower, &["worker", "drain", "t"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("worker t drained and stopped"), "{text}");
    let child = t.proc.child.as_mut().expect("t ran");
    assert_eq!(exit_code_within(child, Duration::from_secs(10)), Some(Some(0)), "t exits 0 after draining");
    let log = t.proc.log_text();
    assert!(log.contains("draining") && log.contains("drained"), "{log}");
    let job = c.get_job(&id).await.expect("job");
    assert_eq!(job.state, "running", "the drain failed nothing: {job:?}");

    t.restart();
    let done = wait_for("the job to finish", Duration::from_secs(60), || async {
        let job = c.get_job(&id).await.ok()?;
        (job.state != "running").then_some(job)
    })
    .await;
    assert_eq!(done.state, "succeeded", "{done:?}");
    assert_eq!(std::fs::read(t.root.join("d/big.bin")).expect("installed"), data);

    // SIGTERM drains too (nothing in flight: it stops at once) and exits 0.
    let child = t.proc.child.as_mut().expect("t runs");
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    assert_eq!(exit_code_within(child, Duration::from_secs(15)), Some(Some(0)));
    // The restarted worker's own log (a restart starts it afresh).
    let log = t.proc.log_text();
    assert!(log.contains("draining: no new pulls") && log.contains("drained"), "{log}");
}
