//! The SDK's lease handles against three real scheduler processes: a
//! `KeepAlive` renews whether or not its answers are read, and says when the
//! lease is gone; a `Registration` keeps its instance listed, lets it expire
//! when dropped, and deregisters it on request (as `ferry registry register`
//! does on SIGTERM).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{marked_deregistered, wait_for, Schedulers};
use ferry_sdk::pb;

fn instance(service: &str, id: &str, port: u32) -> pb::Instance {
    pb::Instance { service: service.into(), id: id.into(), address: "10.0.3.1".into(), port, ..Default::default() }
}

fn ids(r: &pb::ListInstancesResponse) -> Vec<String> {
    r.instances.iter().map(|i| i.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_lease_stays_alive_when_nobody_reads_the_answers_and_its_end_is_still_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    sched.agreed_leader(&[1, 2, 3]).await;

    // A 1 s lease is renewed every third of a second: 8 s is about 24
    // renewals, past the 16 answers the handle buffers for its reader.
    let lease = c.grant(Duration::from_secs(1)).await.expect("grant");
    c.put_with_lease("svc/unread", b"x".to_vec(), lease).await.expect("put");
    let mut keeper = c.keep_alive(lease);
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let left = c
            .time_to_live(lease)
            .await
            .unwrap_or_else(|e| panic!("the lease ended while its answers went unread: {e}\n{}", sched.logs()));
        assert!(left.ttl_ms > 0);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(c.get("svc/unread").await.expect("get").is_some(), "the lease's key is still there");

    // Revoked: the handle still reports the end after its buffer of unread
    // answers, then closes.
    c.revoke(lease).await.expect("revoke");
    let gone = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(answer) = keeper.next().await {
            if let Ok(r) = answer {
                if r.ttl_ms == 0 {
                    return true;
                }
            }
        }
        false
    })
    .await
    .expect("the end is reported");
    assert!(gone, "an answer with ttl 0 came before the handle closed");
    let after = tokio::time::timeout(Duration::from_secs(5), keeper.next()).await.expect("closes");
    assert!(after.is_none(), "the renewal task ended with the lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_stays_listed_while_held_expires_when_dropped_and_deregisters_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let ttl = Duration::from_secs(1);

    // Two instances (fewer than three: the protect threshold never keeps
    // them), held without reading their answers.
    let dropped = c.register_kept(instance("web", "a", 8001), ttl).await.expect("register a");
    let kept = c.register_kept(instance("web", "b", 8002), ttl).await.expect("register b");
    assert_eq!((kept.instance().id.as_str(), kept.instance().port), ("b", 8002));
    let bound = c.time_to_live(kept.lease()).await.expect("ttl of b's lease");
    assert_eq!(bound.keys, ["registry/web/b"]);

    // Listed through several TTLs.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let listed = ids(&c.instances("web").await.expect("list"));
        assert_eq!(listed, ["a", "b"], "both stay while their handles live\n{}", sched.logs());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Dropped: a expires (about a TTL later; the deadline is only a guard),
    // and nothing names it deregistered.
    drop(dropped);
    wait_for("a to expire after its handle was dropped", Duration::from_secs(15), || async {
        (ids(&c.instances("web").await.ok()?) == ["b"]).then_some(())
    })
    .await;
    let history = c.history("registry/web/a", 0).await.expect("history");
    let marked = history.events.iter().filter_map(|e| e.kv.as_ref()).any(|kv| marked_deregistered(&kv.value));
    assert!(!marked, "an expiry is not a deregistration");

    // Deregistered: gone at once, named as deregistered, lease revoked.
    let lease = kept.lease();
    assert!(kept.deregister().await.expect("deregister b"), "b was registered");
    let listing = c.instances("web").await.expect("list");
    assert!(listing.instances.is_empty());
    assert_eq!(listing.deregistered, ["b"], "a expired, b was deregistered");
    let e = c.time_to_live(lease).await.expect_err("b's lease is revoked");
    assert!(e.to_string().contains("unknown lease id"), "{e}");

    // The CLI's registrar deregisters on SIGTERM.
    let endpoints = sched.addrs.join(",");
    let args: Vec<String> = [
        "--endpoints",
        &endpoints,
        "registry",
        "register",
        "cli",
        "--id",
        "c1",
        "--addr",
        "10.0.3.2:9000",
        "--ttl",
        "1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut registrar = common::Proc::spawn(&args, &dir.path().join("registrar.log"));
    wait_for("the CLI's instance", Duration::from_secs(20), || async {
        (ids(&c.instances("cli").await.ok()?) == ["c1"]).then_some(())
    })
    .await;
    let mut child = registrar.child.take().expect("registrar running");
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let status = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
    assert!(status.success(), "registrar exits 0 after deregistering: {}", registrar.log_text());
    let listing = c.instances("cli").await.expect("list");
    assert!(listing.instances.is_empty());
    assert_eq!(listing.deregistered, ["c1"]);
}
