//! Requests at and over the limits, against three real schedulers: every
//! oversized request is refused naming its field, and the largest legal
//! ones replicate without stalling other writes or changing the term.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{workers_up, Schedulers, WorkerProc};
use ferry_sdk::pb;

fn put_op(key: &str, value: Vec<u8>) -> pb::TxnOp {
    let put = pb::PutRequest { key: key.into(), value, ..Default::default() };
    pb::TxnOp { op: Some(pb::txn_op::Op::Put(put)) }
}

fn refused(result: Result<impl std::fmt::Debug, ferry_sdk::Error>, field: &str) {
    let e = result.expect_err("an oversized request is refused");
    assert!(e.is_invalid_argument(), "{e}");
    assert!(e.to_string().starts_with(&format!("{field}:")), "the error names {field}: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_and_the_largest_legal_ones_leave_the_leader_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let leader = sched.agreed_leader(&[1, 2, 3]).await;
    let c = sched.client(&[1, 2, 3]);
    let _src = WorkerProc::start(dir.path(), "src", &sched.addrs, &[]);
    workers_up(&c, &["src"]).await;
    let term = c.status().await.expect("status").term;

    // Small writes all along, through another member: none may fail.
    let writer = sched.client(&[leader % 3 + 1]);
    let stop = Arc::new(AtomicBool::new(false));
    let small = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut n, mut slowest) = (0u64, Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                writer.put("small", n.to_string().into_bytes()).await.expect("a small write during big ones");
                slowest = slowest.max(started.elapsed());
                n += 1;
            }
            (n, slowest)
        }
    });

    // Over the limits: refused, naming the field.
    let labels: String = (0..600_000).map(|i| format!("l{i}=v,")).collect();
    assert!(labels.len() > 5_000_000);
    refused(c.gray(pb::gray_request::Action::Set, "g", &labels, b"x".to_vec()).await, "selector");
    let three = (0..3).map(|i| put_op(&format!("t{i}"), vec![b't'; 1024 * 1024])).collect();
    refused(c.txn(pb::TxnRequest { success: three, ..Default::default() }).await, "txn");
    let files: Vec<String> = (0..100_000).map(|i| format!("/nowhere/{i}")).collect();
    let job = pb::JobSpec { source: "src".into(), files, selector: "role=none".into(), ..Default::default() };
    refused(c.submit_job(job, false).await, "files");
    let instance = pb::Instance {
        service: "big".into(),
        id: "i1".into(),
        address: "10.0.0.1".into(),
        port: 80,
        labels: (0..100_000).map(|i| (format!("k{i}"), "v".to_string())).collect(),
        ..Default::default()
    };
    refused(c.register(instance, Duration::from_secs(10)).await, "labels");

    // The largest legal requests, again and again.
    for round in 0..5 {
        c.put(&format!("max/{round}"), vec![b'm'; 1024 * 1024]).await.expect("a 1 MiB value");
        let ops = vec![put_op("tx/a", vec![b'a'; 1024 * 1024]), put_op("tx/b", vec![b'b'; 512 * 1024 - 8])];
        let r = c.txn(pb::TxnRequest { success: ops, ..Default::default() }).await.expect("a 1.5 MiB txn");
        assert!(r.succeeded);
        let selector: String = (0..64).map(|i| format!("label{i}={}", "v".repeat(100))).collect::<Vec<_>>().join(",");
        c.gray(pb::gray_request::Action::Set, "g", &selector, vec![b'g'; 1024 * 1024]).await.expect("a full selector");
    }
    stop.store(true, Ordering::Relaxed);
    let (writes, slowest) = small.await.expect("small writer");
    let after = c.status().await.expect("status");
    assert_eq!(after.term, term, "no election: the leader stayed\n{}", sched.logs());
    assert!(writes > 0);
    // For the record (not asserted: timing belongs to the benchmarks).
    eprintln!("small writes during the large ones: {writes}, slowest {slowest:?}");
}
