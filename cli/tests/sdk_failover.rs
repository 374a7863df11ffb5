//! The SDK against three real scheduler processes, as an application sees
//! it: writes keep completing through a leader kill and none applies twice;
//! with every scheduler down a caching client serves its last reads, marked
//! stale, and fresh ones once the cluster is back.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{wait_for, Schedulers};
use ferry_sdk::{pb, Balancer, BalancerOptions, Client, ClientOptions, Error};

/// Writers running at once.
const WRITERS: usize = 4;
/// Acknowledged increments each writer needs before the kill, and again after it.
const ROUNDS_EACH_SIDE: u64 = 15;

/// What one writer saw.
#[derive(Default, Debug)]
struct Tally {
    /// Unique keys whose plain put was acknowledged.
    acked_puts: Vec<String>,
    /// Unique keys whose put failed with a retryable error (may or may not have applied).
    unsure_puts: Vec<String>,
    /// Compare-and-set increments of the writer's counter acknowledged.
    acked_increments: u64,
    /// Increments that failed with a retryable error.
    unsure_increments: u64,
    /// Anything else: a write refused or failed for a reason a retry cannot
    /// explain (a compare that fails on a counter only this writer touches
    /// means an earlier increment applied twice or was lost).
    wrong: Vec<String>,
}

/// Writes `u/<w>/<i>` keys and increments `c/<w>` by compare-and-set until
/// `killed` is set and it has `ROUNDS_EACH_SIDE` more acknowledged increments.
async fn writer(c: Client, w: usize, acked: Arc<AtomicU64>, killed: Arc<AtomicBool>) -> Tally {
    let mut t = Tally::default();
    let counter = format!("c/{w}");
    let mut after_kill = 0;
    for i in 0u64.. {
        if after_kill >= ROUNDS_EACH_SIDE {
            break;
        }
        let was_killed = killed.load(Ordering::SeqCst);
        let key = format!("u/{w}/{i}");
        match c.put(&key, i.to_string().into_bytes()).await {
            Ok(_) => t.acked_puts.push(key),
            Err(Error::Unavailable { .. }) => t.unsure_puts.push(key),
            Err(e) => t.wrong.push(format!("put {key}: {e:?}")),
        }
        let current = match c.get(&counter).await {
            Ok(kv) => kv,
            Err(Error::Unavailable { .. }) => continue,
            Err(e) => {
                t.wrong.push(format!("get {counter}: {e:?}"));
                continue;
            }
        };
        let (n, rev) = match current {
            Some(kv) => (String::from_utf8_lossy(&kv.value).parse::<u64>().unwrap_or(u64::MAX), kv.mod_revision),
            None => (0, 0),
        };
        match c.put_if(&counter, (n + 1).to_string().into_bytes(), rev).await {
            Ok(_) => {
                t.acked_increments += 1;
                acked.fetch_add(1, Ordering::SeqCst);
                if was_killed {
                    after_kill += 1;
                }
            }
            Err(Error::Unavailable { .. }) => t.unsure_increments += 1,
            Err(e) => t.wrong.push(format!("increment {counter} from {n} at revision {rev}: {e:?}")),
        }
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_a_leader_kill_complete_or_fail_retryably_and_none_applies_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sched = Schedulers::start(dir.path(), &[]);
    let leader = sched.agreed_leader(&[1, 2, 3]).await;
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    // The leader first: the writers talk to it when it dies.
    let c = sched.client(&[leader, survivors[0], survivors[1]]);

    let killed = Arc::new(AtomicBool::new(false));
    let acked: Vec<Arc<AtomicU64>> = (0..WRITERS).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let writers: Vec<_> =
        (0..WRITERS).map(|w| tokio::spawn(writer(c.clone(), w, acked[w].clone(), killed.clone()))).collect();

    wait_for("every writer to get going", Duration::from_secs(60), || async {
        acked.iter().all(|a| a.load(Ordering::SeqCst) >= ROUNDS_EACH_SIDE).then_some(())
    })
    .await;
    sched.kill9(leader);
    killed.store(true, Ordering::SeqCst);

    let mut tallies = Vec::new();
    for (w, task) in writers.into_iter().enumerate() {
        // Only a guard against a hang: each writer needs a handful of
        // writes after an election of about a second.
        let t = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .unwrap_or_else(|_| panic!("writer {w} stopped completing writes after the leader kill\n{}", sched.logs()))
            .expect("writer task");
        tallies.push(t);
    }
    let new_leader = sched.agreed_leader(&survivors).await;
    assert_ne!(new_leader, leader);

    let check = sched.client(&survivors);
    for (w, t) in tallies.iter().enumerate() {
        assert!(t.wrong.is_empty(), "writer {w}: every failure is retryable (Unavailable): {:?}", t.wrong);
        assert!(t.acked_increments >= 2 * ROUNDS_EACH_SIDE, "writer {w}: {t:?}");

        // A put applied twice would show two revisions of its key.
        for key in &t.acked_puts {
            let h = check.history(key, 0).await.expect("history");
            assert_eq!(h.events.len(), 1, "acknowledged put of {key} applied once: {:?}", h.events);
        }
        for key in &t.unsure_puts {
            let h = check.history(key, 0).await.expect("history");
            assert!(h.events.len() <= 1, "a failed put of {key} applied at most once: {:?}", h.events);
        }

        // The counter holds every acknowledged increment, and of the failed
        // ones at most those that applied; its history counts 1, 2, 3, ...
        let value: u64 = check
            .get(&format!("c/{w}"))
            .await
            .expect("get counter")
            .map(|kv| String::from_utf8_lossy(&kv.value).parse().expect("a number"))
            .expect("counter exists");
        assert!(
            (t.acked_increments..=t.acked_increments + t.unsure_increments).contains(&value),
            "writer {w}: counter {value}, {} acknowledged, {} unsure",
            t.acked_increments,
            t.unsure_increments
        );
        let h = check.history(&format!("c/{w}"), 0).await.expect("history");
        let values: Vec<String> =
            h.events.iter().map(|e| String::from_utf8_lossy(&e.kv.as_ref().expect("kv").value).into_owned()).collect();
        let want: Vec<String> = (1..=value).map(|n| n.to_string()).collect();
        assert_eq!(values, want, "writer {w}: one revision per increment");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_scheduler_down_a_caching_client_serves_stale_reads_then_catches_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache_dir = dir.path().join("cache");
    let mut sched = Schedulers::start(dir.path(), &[]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let addrs = sched.addrs.clone();
    let caching = |total: Duration| {
        let options = ClientOptions {
            request_timeout: Duration::from_millis(500),
            total_timeout: total,
            connect_timeout: Duration::from_millis(200),
            cache_dir: Some(cache_dir.clone()),
            security: Some(common::security()),
            ..Default::default()
        };
        Client::with_options(&addrs, options).expect("client")
    };
    let c = caching(Duration::from_secs(20));

    c.put("app/flag", b"on".to_vec()).await.expect("put");
    let instance = pb::Instance {
        service: "bidder".into(),
        id: "b1".into(),
        address: "127.0.0.1".into(),
        port: 9000,
        ..Default::default()
    };
    c.register(instance, Duration::from_secs(60)).await.expect("register");
    let flag = c.get_or_cached("app/flag").await.expect("fresh read");
    assert!(!flag.stale);
    let bidders = c.instances_or_cached("bidder").await.expect("fresh list");
    assert!(!bidders.stale);

    for id in [1, 2, 3] {
        sched.kill9(id);
    }
    // Every endpoint is down: the last reads come back, marked stale.
    let c = caching(Duration::from_secs(2));
    let got = c.get_or_cached("app/flag").await.expect("stale read");
    assert!(got.stale);
    assert_eq!((got.value.map(|kv| kv.value), got.revision), (Some(b"on".to_vec()), flag.revision));
    let got = c.instances_or_cached("bidder").await.expect("stale list");
    assert!(got.stale);
    let ids: Vec<&str> = got.value.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["b1"]);
    // A key never read before has nothing cached: the error says so.
    assert!(matches!(c.get_or_cached("app/other").await, Err(Error::Unavailable { .. })));
    // A balancer started now serves the cached instances.
    let balancer = Balancer::new(BalancerOptions::default());
    balancer.follow(c.clone(), "bidder");
    tokio::time::timeout(Duration::from_secs(30), balancer.ready()).await.expect("seeded from the cache");
    assert_eq!(balancer.instances().iter().map(|i| i.authority()).collect::<Vec<_>>(), ["127.0.0.1:9000"]);

    // Back: fresh reads again, and they see changes made since.
    for id in [1, 2, 3] {
        sched.restart(id);
    }
    let writer = sched.client(&[1, 2, 3]);
    writer.put("app/flag", b"off".to_vec()).await.expect("put after restart");
    wait_for("a fresh read of the new value", Duration::from_secs(30), || async {
        let got = c.get_or_cached("app/flag").await.ok()?;
        (!got.stale && got.value.map(|kv| kv.value) == Some(b"off".to_vec())).then_some(())
    })
    .await;
    let got = c.get_or_cached("app/flag").await.expect("fresh read");
    assert!(got.revision > flag.revision);
}
