//! Configuration keys over real scheduler processes: watches across leader
//! kills, history, reads at a past revision, compare-and-set.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::{ferry, marked_deregistered, Schedulers};

/// `ferry --endpoints ENDPOINTS ARGS`: exit code, trimmed stdout, stderr.
fn run_at(endpoints: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["--endpoints", endpoints];
    all.extend_from_slice(args);
    let out = ferry(&all);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_sees_every_revision_once_and_in_order_across_two_leader_kills() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    let leader = sched.agreed_leader(&[1, 2, 3]).await;
    let start = c.put("w/start", b"0".to_vec()).await.expect("first put").revision;

    // The watcher talks to the leader first, so killing it cuts the stream.
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    let watcher = sched.client(&[leader, others[0], others[1]]);
    let mut watch = watcher.watch("w/", start);
    let collector = tokio::spawn(async move {
        let mut seen: Vec<(u64, String)> = Vec::new();
        while let Some(msg) = watch.next().await {
            let Ok(msg) = msg else { continue };
            assert!(!msg.snapshot, "nothing was compacted, so no snapshot is due");
            for e in msg.events {
                let kv = e.kv.expect("event kv");
                seen.push((kv.mod_revision, kv.key.clone()));
                if kv.key == "w/end" {
                    return seen;
                }
            }
        }
        seen
    });

    let mut expected = vec![(start, "w/start".to_string())];
    let mut killed = leader;
    for i in 0..240 {
        if i == 80 {
            sched.kill9(killed);
        }
        if i == 160 {
            // Bring the first one back, then kill whoever leads now.
            sched.restart(killed);
            killed = sched.agreed_leader(&[1, 2, 3]).await;
            sched.kill9(killed);
        }
        // Keys outside the prefix take revisions the watcher must skip.
        if i % 3 == 0 {
            c.put(&format!("other/{i}"), b"x".to_vec()).await.expect("put other");
        }
        let key = format!("w/{i}");
        let p = c.put(&key, i.to_string().into_bytes()).await.expect("put during failovers");
        expected.push((p.revision, key));
    }
    let end = c.put("w/end", b"end".to_vec()).await.expect("last put");
    expected.push((end.revision, "w/end".into()));

    let seen = tokio::time::timeout(Duration::from_secs(60), collector)
        .await
        .expect("the watch delivered w/end within 60 s")
        .expect("collector");
    assert_eq!(seen, expected, "every revision once, in order\n{}", sched.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_past_reads_and_compare_and_set_from_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let endpoints = sched.addrs.join(",");
    let run = |args: &[&str]| {
        let mut all = vec!["--endpoints", &endpoints, "--json"];
        all.extend_from_slice(args);
        let out = ferry(&all);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code(), stdout, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let rev = |stdout: &str| -> u64 {
        serde_json::from_str::<serde_json::Value>(stdout).expect("json")["revision"].as_u64().expect("revision")
    };

    // A `watch --json` process started before the writes prints each change.
    let mut watcher = common::command()
        .args(["--endpoints", &endpoints, "--json", "config", "watch", "color"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn watch");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (code, out, _) = run(&["config", "put", "color", "red"]);
    assert_eq!(code, Some(0));
    let r1 = rev(&out);
    let (_, out, _) = run(&["config", "put", "color", "blue"]);
    let r2 = rev(&out);

    // Compare-and-set: a stale revision and "must be absent" both refuse.
    let (code, _, err) = run(&["config", "put", "color", "green", "--if-mod-rev", &r1.to_string()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("key color has mod revision {r2}, not {r1}")), "{err}");
    let (code, _, err) = run(&["config", "put", "color", "green", "--if-mod-rev", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("key color exists"), "{err}");
    let (code, out, _) = run(&["config", "put", "color", "green", "--if-mod-rev", &r2.to_string()]);
    assert_eq!(code, Some(0));
    let r3 = rev(&out);
    let (code, _, err) = run(&["config", "put", "fresh", "1", "--if-mod-rev", "5"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("key fresh does not exist"), "{err}");

    // Past reads and history.
    let (code, out, _) = run(&["config", "get", "color", "--rev", &r1.to_string()]);
    assert_eq!(code, Some(0));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).expect("json")["value"], "red");
    let (code, out, _) = run(&["config", "history", "color"]);
    assert_eq!(code, Some(0));
    let values: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json line")["value"].as_str().unwrap_or("").into()
        })
        .collect();
    assert_eq!(values, ["red", "blue", "green"]);
    let (code, _, err) = run(&["config", "get", "color", "--rev", "999999"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("in the future"), "{err}");

    // The watcher printed the three changes, one JSON object per line.
    let stdout = watcher.stdout.take().expect("stdout");
    let lines = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().take(3).map(|l| l.expect("line")).collect::<Vec<_>>()
    });
    let lines = tokio::time::timeout(Duration::from_secs(20), lines).await.expect("three watch lines").expect("reader");
    let _ = watcher.kill();
    let _ = watcher.wait();
    let got: Vec<(String, String, u64)> = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            (
                v["type"].as_str().unwrap_or("").into(),
                v["value"].as_str().unwrap_or("").into(),
                v["revision"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let want: Vec<(String, String, u64)> =
        [("red", r1), ("blue", r2), ("green", r3)].iter().map(|(v, r)| ("PUT".into(), v.to_string(), *r)).collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_lease_survives_two_leader_kills_and_an_abandoned_one_expires() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    let mut leader = sched.agreed_leader(&[1, 2, 3]).await;
    let ttl = Duration::from_secs(2);
    let kept = c.grant(ttl).await.expect("grant");
    let abandoned = c.grant(ttl).await.expect("grant");
    c.put_with_lease("svc/kept", b"a".to_vec(), kept).await.expect("put kept");
    c.put_with_lease("svc/abandoned", b"b".to_vec(), abandoned).await.expect("put abandoned");
    let mut keeper = c.keep_alive(kept);
    let renewals = tokio::spawn(async move {
        let mut n = 0u32;
        while let Some(answer) = keeper.next().await {
            match answer {
                // Gone: only after the revoke below (the key checks prove
                // it lived through the kills).
                Ok(r) if r.ttl_ms == 0 => return n,
                Ok(_) => n += 1,
                Err(_) => {}
            }
        }
        n
    });

    for round in 0..2 {
        sched.kill9(leader);
        // Longer than the TTL without this leader.
        tokio::time::sleep(Duration::from_secs(3)).await;
        sched.restart(leader);
        leader = sched.agreed_leader(&[1, 2, 3]).await;
        assert!(c.get("svc/kept").await.expect("get").is_some(), "kept lease ended after kill {}", round + 1);
    }
    // Each new leader gave it a full TTL again; it ends within a TTL after
    // the last election.
    common::wait_for("the abandoned lease to expire", Duration::from_secs(10), || async {
        c.get("svc/abandoned").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(c.get("svc/kept").await.expect("get").is_some());
    let ttl_left = c.time_to_live(kept).await.expect("ttl");
    assert_eq!(ttl_left.keys, vec!["svc/kept".to_string()]);
    assert!(ttl_left.remaining_ms <= 2000);

    // Bad input changes nothing.
    let e = c.grant(Duration::from_millis(500)).await.expect_err("ttl below 1s");
    assert!(e.is_invalid_argument() && e.to_string().contains("ttl:"), "{e}");
    let e = c.put_with_lease("svc/x", b"x".to_vec(), 12345).await.expect_err("unknown lease");
    assert!(e.is_invalid_argument() && e.to_string().contains("lease: unknown lease id 12345"), "{e}");
    assert!(c.get("svc/x").await.expect("get").is_none());
    let out = ferry(&["--endpoints", &sched.addrs.join(","), "lease", "grant", "25h"]);
    assert_eq!(out.status.code(), Some(2));
    let out = ferry(&["--endpoints", &sched.addrs.join(","), "lease", "revoke", "777"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown lease id 777"));

    // Revoking ends it at once, with its key.
    c.revoke(kept).await.expect("revoke");
    assert!(c.get("svc/kept").await.expect("get").is_none());
    let renewed = tokio::time::timeout(Duration::from_secs(10), renewals).await.expect("keeper ends").expect("task");
    // The key outlived its 2 s TTL many times over, so renewals went
    // through; the keeper saw the lease end with the revoke.
    assert!(renewed > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_instance_outlives_a_leader_kill_and_goes_when_its_process_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    let leader = sched.agreed_leader(&[1, 2, 3]).await;
    let endpoints = sched.addrs.join(",");
    let register = |id: &str, addr: &str, extra: &[&str]| {
        let mut args: Vec<String> =
            ["--endpoints", &endpoints, "registry", "register", "bidder", "--id", id, "--addr", addr]
                .iter()
                .map(|s| s.to_string())
                .collect();
        args.extend(["--ttl", "2s"].iter().chain(extra).map(|s| s.to_string()));
        common::Proc::spawn(&args, &dir.path().join(format!("{id}.log")))
    };
    let mut b1 = register("b1", "10.0.0.1:8080", &[]);
    let _b2 = register("b2", "10.0.0.2:8080", &["--weight", "50", "--gray", "--meta", "dc=east"]);
    let ids = |r: &ferry_sdk::pb::ListInstancesResponse| r.instances.iter().map(|i| i.id.clone()).collect::<Vec<_>>();
    common::wait_for("both instances", Duration::from_secs(20), || async {
        (ids(&c.instances("bidder").await.ok()?) == ["b1", "b2"]).then_some(())
    })
    .await;
    let r = c.instances("bidder").await.expect("list");
    let b2 = &r.instances[1];
    assert_eq!((b2.address.as_str(), b2.port, b2.weight, b2.gray), ("10.0.0.2", 8080, 50, true));
    assert_eq!(b2.metadata.get("dc").map(String::as_str), Some("east"));

    // The registrars keep their leases alive through a failover.
    sched.kill9(leader);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ids(&c.instances("bidder").await.expect("list")), ["b1", "b2"]);

    // Killed without deregistering: gone within the TTL plus an election.
    let mut watch = c.watch_instances("bidder").await.expect("watch");
    b1.kill9();
    common::wait_for("b1 to drop out", Duration::from_secs(10), || async {
        (ids(&c.instances("bidder").await.ok()?) == ["b2"]).then_some(())
    })
    .await;
    // The watcher saw the lists in order, ending with b2 alone.
    let mut last = Vec::new();
    while let Ok(Ok(Some(r))) = tokio::time::timeout(Duration::from_millis(500), watch.message()).await {
        last = ids(&r);
    }
    assert_eq!(last, ["b2"]);

    // Explicit deregistration removes at once; bad input is refused.
    let out = ferry(&["--endpoints", &endpoints, "registry", "deregister", "bidder", "--id", "b2"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(c.instances("bidder").await.expect("list").instances.is_empty());
    let out = ferry(&["--endpoints", &endpoints, "registry", "register", "bidder", "--id", "bad", "--addr", "h:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no valid port"), "{}", String::from_utf8_lossy(&out.stderr));
    let bad = ferry_sdk::pb::Instance {
        service: "bidder".into(),
        id: "bad".into(),
        address: "h".into(),
        ..Default::default()
    };
    let e = c.register(bad, Duration::from_secs(2)).await.expect_err("port 0");
    assert!(e.is_invalid_argument() && e.to_string().contains("port: must be 1 to 65535"), "{e}");
    assert!(c.instances("bidder").await.expect("list").instances.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_expiry_trips_the_protect_threshold_and_keeps_instances_as_suspect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let mut keepers = Vec::new();
    for i in 0..4 {
        let instance = ferry_sdk::pb::Instance {
            service: "relay".into(),
            id: format!("r{i}"),
            address: format!("10.0.1.{i}"),
            port: 443,
            ..Default::default()
        };
        let lease = c.register(instance, Duration::from_secs(2)).await.expect("register");
        let mut keep = c.keep_alive(lease);
        keepers.push(tokio::spawn(async move { while keep.next().await.is_some() {} }));
    }
    let state = |r: &ferry_sdk::pb::ListInstancesResponse| {
        r.instances.iter().map(|i| (i.id.clone(), i.suspect)).collect::<Vec<_>>()
    };
    let all_up: Vec<(String, bool)> = (0..4).map(|i| (format!("r{i}"), false)).collect();
    assert_eq!(state(&c.instances("relay").await.expect("list")), all_up);

    // One of four stops renewing: under the threshold, so it goes.
    keepers[0].abort();
    common::wait_for("r0 to expire", Duration::from_secs(15), || async {
        (state(&c.instances("relay").await.ok()?).len() == 3).then_some(())
    })
    .await;

    // Two of the remaining three stop together: a mass expiry. They stay,
    // flagged suspect, and the service never drops under them.
    keepers[1].abort();
    keepers[2].abort();
    let flagged = vec![("r1".to_string(), true), ("r2".to_string(), true), ("r3".to_string(), false)];
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = state(&c.instances("relay").await.expect("list"));
        if now == flagged {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "r1 and r2 not flagged suspect: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(state(&c.instances("relay").await.expect("list")), flagged, "suspects are kept");

    // Deregistering always removes. With r1 gone, one expired of two is no
    // longer over the threshold, so r2's lease is revoked too.
    assert!(c.deregister("relay", "r1").await.expect("deregister"));
    assert!(!state(&c.instances("relay").await.expect("list")).iter().any(|(id, _)| id == "r1"));
    common::wait_for("r2 to go once under the threshold", Duration::from_secs(10), || async {
        (state(&c.instances("relay").await.ok()?) == [("r3".to_string(), false)]).then_some(())
    })
    .await;
    keepers[3].abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gray_variants_from_the_cli_set_read_promote_drop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let endpoints = sched.addrs.join(",");
    let run = |args: &[&str]| run_at(&endpoints, args);
    assert_eq!(run(&["config", "put", "rate", "100"]).0, Some(0));
    assert_eq!(run(&["config", "gray", "set", "rate", "150", "--selector", "zone=a"]).0, Some(0));
    assert_eq!(run(&["config", "gray", "set", "rate", "200", "--selector", "zone=a,role=canary"]).0, Some(0));
    let get = |labels: &str| run(&["config", "get", "rate", "--labels", labels]).1;
    assert_eq!(run(&["config", "get", "rate"]).1, "100");
    assert_eq!(get("zone=b"), "100");
    assert_eq!(get("zone=a"), "150");
    assert_eq!(get("zone=a,role=canary"), "200");
    let (_, json, _) = run(&["--json", "config", "get", "rate", "--labels", "zone=a"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&json).expect("json")["variant"], "zone=a");

    // Bad selectors and ambiguous promotes are refused and change nothing.
    let (code, _, err) = run(&["config", "gray", "set", "rate", "1", "--selector", "zone"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("selector:"), "{err}");
    let (code, _, err) = run(&["config", "gray", "promote", "rate"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("2 variants; name one"), "{err}");
    assert_eq!(run(&["config", "get", "rate"]).1, "100");

    // Promote one (it becomes the main value), drop the rest.
    assert_eq!(run(&["config", "gray", "promote", "rate", "--selector", "zone=a"]).0, Some(0));
    assert_eq!(run(&["config", "get", "rate"]).1, "150");
    assert_eq!(run(&["config", "gray", "list", "rate"]).1, "role=canary,zone=a 200");
    assert_eq!(run(&["config", "gray", "drop", "rate"]).0, Some(0));
    assert_eq!(get("zone=a,role=canary"), "150");
    assert_eq!(run(&["config", "gray", "list", "rate"]).1, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_txn_from_the_cli_applies_one_branch_atomically_and_exits_by_outcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let endpoints = sched.addrs.join(",");
    let run = |args: &[&str]| run_at(&endpoints, args);
    let json = |s: &str| serde_json::from_str::<serde_json::Value>(s).expect("json");
    let get = |key: &str| run(&["config", "get", key]);

    let (code, out, _) = run(&["--json", "config", "put", "stock", "10"]);
    assert_eq!(code, Some(0));
    let r1 = json(&out)["revision"].as_u64().expect("revision");

    // The compares hold: both puts and the delete apply, exit 0.
    assert_eq!(run(&["config", "put", "stale", "x"]).0, Some(0));
    let (code, out, err) = run(&[
        "--json",
        "config",
        "txn",
        "--if-mod-rev",
        &format!("stock={r1}"),
        "--if-absent",
        "order/1",
        "--put",
        "stock=9",
        "--put",
        "order/1=a=1",
        "--delete",
        "stale",
        "--else-put",
        "conflicts=1",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let r2 = json(&out)["revision"].as_u64().expect("revision");
    assert_eq!(json(&out)["succeeded"], true);
    assert!(r2 > r1);
    assert_eq!(get("stock").1, "9");
    assert_eq!(get("order/1").1, "a=1", "the value is split at the first '='");
    assert_eq!(get("stale").0, Some(1), "deleted");
    assert_eq!(get("conflicts").0, Some(1), "the else branch did not apply");

    // A stale revision: exit 1 with what differed; only the else branch applies.
    let (code, out, err) = run(&[
        "config",
        "txn",
        "--if-mod-rev",
        &format!("stock={r1}"),
        "--put",
        "stock=8",
        "--else-put",
        "conflicts=1",
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(err.contains("not applied: key stock has mod revision"), "{err}");
    assert!(out.starts_with("else writes applied"), "{out}");
    assert_eq!(get("stock").1, "9");
    assert_eq!(get("conflicts").1, "1");

    // A key that must be absent exists: nothing applies, and --json says why.
    let (code, out, _) = run(&["--json", "config", "txn", "--if-absent", "order/1", "--put", "order/1=b"]);
    assert_eq!(code, Some(1));
    assert_eq!(json(&out)["succeeded"], false);
    assert!(json(&out)["failed"].as_str().unwrap_or("").contains("key order/1 exists"), "{out}");
    assert_eq!(get("order/1").1, "a=1");

    // --if-mod-rev KEY=0 means "absent", as for `config put`.
    let (code, _, err) = run(&["config", "txn", "--if-mod-rev", "lock=0", "--put", "lock=me"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(get("lock").1, "me");

    // Bad input: exit 2, the message names the flag or field, nothing changes.
    let before = run(&["--json", "config", "history", "stock"]).1;
    let (code, _, err) = run(&["config", "txn", "--put", "stock"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--put"), "{err}");
    let (code, _, err) = run(&["config", "txn", "--put", "stock=1", "--delete", "stock"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--put/--delete: key stock is written twice"), "{err}");
    let (code, _, err) = run(&["config", "txn", "--put", "stock=1", "--else-delete", "stock"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("need a compare"), "{err}");
    let long = format!("{}=v", "k".repeat(5000));
    let (code, _, err) = run(&["config", "txn", "--put", "stock=1", "--put", &long]);
    assert_eq!(code, Some(2));
    assert!(err.contains("key: must be at most 4096 bytes"), "{err}");
    assert_eq!(run(&["--json", "config", "history", "stock"]).1, before, "bad input changed nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_listing_names_deregistered_instances_not_expired_ones_and_a_balancer_empties_on_it() {
    use ferry_sdk::pb;
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let instance = |id: &str| pb::Instance {
        service: "pay".into(),
        id: id.into(),
        address: "10.0.2.1".into(),
        port: 443,
        ..Default::default()
    };
    let ids = |r: &pb::ListInstancesResponse| r.instances.iter().map(|i| i.id.clone()).collect::<Vec<_>>();

    // a is kept alive and deregistered; b's lease is left to end.
    let lease = c.register(instance("a"), Duration::from_secs(5)).await.expect("register a");
    let keep_a = c.keep_alive(lease);
    c.register(instance("b"), Duration::from_secs(1)).await.expect("register b");
    let balancer = ferry_sdk::Balancer::new(ferry_sdk::BalancerOptions::default());
    balancer.follow(c.clone(), "pay");
    tokio::time::timeout(Duration::from_secs(20), balancer.ready()).await.expect("balancer ready");

    assert!(c.deregister("pay", "a").await.expect("deregister a"));
    drop(keep_a);
    common::wait_for("b's lease to end", Duration::from_secs(20), || async {
        c.instances("pay").await.ok()?.instances.is_empty().then_some(())
    })
    .await;
    let listing = c.instances("pay").await.expect("list");
    assert_eq!(listing.deregistered, ["a"], "b expired: it is not named");
    assert!(!c.deregister("pay", "a").await.expect("deregister again"), "already gone");

    // The key's history keeps why a went: a marked write, then the delete.
    let h = c.history("registry/pay/a", 0).await.expect("history");
    let kinds: Vec<(i32, bool)> = h
        .events
        .iter()
        .map(|e| {
            let value = e.kv.as_ref().map(|kv| kv.value.clone()).unwrap_or_default();
            (e.r#type, marked_deregistered(&value))
        })
        .collect();
    let (put, delete) = (pb::event::Type::Put as i32, pb::event::Type::Delete as i32);
    assert_eq!(kinds, [(put, false), (put, true), (delete, false)]);

    // A new instance, deregistered: the balancer holding only it empties,
    // and a watch says who was deregistered.
    let lease = c.register(instance("c"), Duration::from_secs(5)).await.expect("register c");
    let _keep_c = c.keep_alive(lease);
    common::wait_for("the balancer to hold c only", Duration::from_secs(20), || async {
        let held: Vec<String> = balancer.instances().iter().map(|i| i.id.clone()).collect();
        (held == ["c"]).then_some(())
    })
    .await;
    let mut watch = c.watch_instances("pay").await.expect("watch");
    let first = watch.message().await.expect("watch message").expect("a list");
    assert_eq!((ids(&first), first.deregistered.len()), (vec!["c".to_string()], 0));
    assert!(c.deregister("pay", "c").await.expect("deregister c"));
    let next = watch.message().await.expect("watch message").expect("a list");
    assert!(next.instances.is_empty());
    assert_eq!(next.deregistered, ["a", "c"]);
    common::wait_for("the balancer to empty", Duration::from_secs(20), || async {
        balancer.instances().is_empty().then_some(())
    })
    .await;

    // Registered again: no longer named.
    c.register(instance("a"), Duration::from_secs(5)).await.expect("register a again");
    let relisted = watch.message().await.expect("watch message").expect("a list");
    assert_eq!((ids(&relisted), relisted.deregistered.len()), (vec!["a".to_string()], 0));
}
