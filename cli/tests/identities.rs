//! Identities that must not be shared, over real processes: a worker name
//! held by a live worker, and a registry instance id held by a live lease.

mod common;

use std::process::{Child, Stdio};
use std::time::Duration;

use common::{exit_code_within, workers_up, Schedulers, WorkerProc};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_with_a_taken_name_exits_and_the_first_keeps_its_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let c = sched.client(&[3, 1, 2]);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let _first = WorkerProc::start(&a, "twin", &sched.addrs, &["--labels", "zone=a"]);
    workers_up(&c, &["twin"]).await;

    let mut second = WorkerProc::start(&b, "twin", &sched.addrs, &["--labels", "zone=b"]);
    let child = second.proc.child.as_mut().expect("second worker");
    let code = exit_code_within(child, Duration::from_secs(20));
    second.proc.child = None;
    let log = second.proc.log_text();
    assert_eq!(code, Some(Some(1)), "the second worker exits 1\n{log}");
    assert!(log.contains("already connected"), "and says why:\n{log}");
    assert!(sched.logs().contains("refused a second session"), "the leader logs it:\n{}", sched.logs());

    // The first keeps its session and its record, read from another member.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let workers = c.list_workers().await.expect("list workers");
    let twin = workers.iter().find(|w| w.info.as_ref().is_some_and(|i| i.name == "twin")).expect("twin listed");
    assert_eq!(twin.state, "up");
    let labels = &twin.info.as_ref().expect("info").labels;
    assert_eq!(labels.get("zone").map(String::as_str), Some("a"), "the impostor's labels never landed");
}

/// `ferry registry register bidder --id b1 --addr ADDR` against `endpoint`.
fn register(endpoint: &str, addr: &str, extra: &[&str]) -> Child {
    common::command()
        .args(["--endpoints", endpoint, "registry", "register", "bidder", "--id", "b1", "--addr", addr])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn registry register")
}

/// What `child` wrote to stderr, once it is stopped (killed if it still runs).
fn stderr_of(mut child: Child) -> String {
    use std::io::Read;
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_id_belongs_to_the_lease_that_registered_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let c = sched.client(&[3, 2, 1]);
    let address = |c: &ferry_sdk::Client| {
        let c = c.clone();
        async move {
            let list = c.instances("bidder").await.expect("list");
            list.instances.iter().map(|i| format!("{}:{}", i.address, i.port)).collect::<Vec<_>>()
        }
    };

    let mut first = register(&sched.addr(1), "127.0.0.1:8080", &[]);
    common::wait_for("b1 registered", Duration::from_secs(20), || async {
        (address(&c).await == ["127.0.0.1:8080"]).then_some(())
    })
    .await;

    // The same id from another process: refused, and the first stays.
    let mut second = register(&sched.addr(2), "127.0.0.1:9090", &[]);
    let code = exit_code_within(&mut second, Duration::from_secs(20));
    let err = stderr_of(second);
    assert_eq!(code, Some(Some(1)), "{err}");
    assert!(err.contains("held by lease"), "{err}");
    assert_eq!(address(&c).await, ["127.0.0.1:8080"]);

    // Taken over on purpose: the first owner learns it and exits 1.
    let mut third = register(&sched.addr(2), "127.0.0.1:9191", &["--replace"]);
    let code = exit_code_within(&mut first, Duration::from_secs(30));
    let err = stderr_of(first);
    assert_eq!(code, Some(Some(1)), "the replaced registration ends: {err}");
    assert!(err.contains("lease ended"), "{err}");
    assert_eq!(address(&c).await, ["127.0.0.1:9191"]);
    assert!(third.try_wait().expect("try_wait").is_none(), "the replacement keeps running");
    let _ = third.kill();
    let _ = third.wait();

    // Through the SDK: a replaced owner's deregistration removes nothing.
    let instance = |port: u32| ferry_sdk::pb::Instance {
        service: "pay".into(),
        id: "p1".into(),
        address: "10.0.0.1".into(),
        port,
        ..Default::default()
    };
    let owner = c.register_kept(instance(1), Duration::from_secs(30)).await.expect("register p1");
    let refused = c.register_kept(instance(2), Duration::from_secs(30)).await.expect_err("p1 is held");
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused}");
    let _replacement = c.register_kept_replacing(instance(3), Duration::from_secs(30)).await.expect("take p1 over");
    assert!(!owner.deregister().await.expect("deregister"), "the replaced owner removes nothing");
    let listed = c.instances("pay").await.expect("list pay");
    assert_eq!(listed.instances.iter().map(|i| i.port).collect::<Vec<_>>(), [3]);
}
