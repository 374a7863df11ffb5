use openraft::storage::{RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

use crate::command::{Command, CommandResult, Op};
use crate::db::{open, OpenOptions};
use crate::kv::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
use crate::TypeConfig;

fn entry(index: u64, request_id: &str, op: Op) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command { request_id: request_id.into(), op }),
    }
}

fn put(key: &str, value: &str) -> Op {
    Op::Put { key: key.into(), value: value.as_bytes().to_vec() }
}

#[tokio::test]
async fn revisions_and_versions_follow_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
    let reader = sm.reader();
    let r = sm
        .apply(vec![
            entry(1, "a", put("k", "v1")),
            entry(2, "b", put("k", "v2")),
            entry(3, "c", put("other", "x")),
            entry(4, "d", Op::Delete { key: "k".into() }),
            entry(5, "e", Op::Delete { key: "k".into() }),
            entry(6, "f", put("k", "v3")),
        ])
        .await
        .unwrap();
    assert_eq!(r[0], CommandResult::Put { revision: 1, create_revision: 1, version: 1 });
    assert_eq!(r[1], CommandResult::Put { revision: 2, create_revision: 1, version: 2 });
    assert_eq!(r[3], CommandResult::Delete { revision: 4, deleted: true });
    // Deleting a missing key changes nothing, not even the revision.
    assert_eq!(r[4], CommandResult::Delete { revision: 4, deleted: false });
    // Re-created: a new create revision, version starts over.
    assert_eq!(r[5], CommandResult::Put { revision: 5, create_revision: 5, version: 1 });
    let kv = reader.get("k").unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.create_revision, kv.mod_revision, kv.version), (&b"v3"[..], 5, 5, 1));
    assert_eq!(reader.revision(), 5);
    assert_eq!(reader.applied_index(), 6);
}

#[tokio::test]
async fn a_retried_request_id_gets_the_first_answer_and_applies_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
    let reader = sm.reader();
    let first = sm.apply(vec![entry(1, "req-1", put("k", "v1"))]).await.unwrap();
    let _ = sm.apply(vec![entry(2, "req-2", put("k", "v2"))]).await.unwrap();
    // A client retries req-1 after the leader changed: same id, same command.
    let retried = sm.apply(vec![entry(3, "req-1", put("k", "v1"))]).await.unwrap();
    assert_eq!(first, retried);
    let kv = reader.get("k").unwrap().unwrap();
    assert_eq!(kv.value, b"v2", "the retry must not apply again");
    assert_eq!(kv.version, 2);
    assert_eq!(reader.revision(), 2);
}

#[tokio::test]
async fn over_limit_commands_are_rejected_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
    let reader = sm.reader();
    let long_key = "k".repeat(MAX_KEY_BYTES + 1);
    let big = Op::Put { key: "big".into(), value: vec![0; MAX_VALUE_BYTES + 1] };
    let r =
        sm.apply(vec![entry(1, "", put("", "v")), entry(2, "", put(&long_key, "v")), entry(3, "", big)]).await.unwrap();
    for (res, field) in r.iter().zip(["key", "key", "value"]) {
        match res {
            CommandResult::Rejected { reason } => assert!(reason.starts_with(field), "{reason}"),
            other => panic!("expected rejection, got {other:?}"),
        }
    }
    assert_eq!(reader.revision(), 0);
    assert!(reader.list("", 0).unwrap().0.is_empty());
    // Exactly at the limits is fine.
    let ok = Op::Put { key: "k".repeat(MAX_KEY_BYTES), value: vec![1; MAX_VALUE_BYTES] };
    let r = sm.apply(vec![entry(4, "", ok)]).await.unwrap();
    assert!(matches!(r[0], CommandResult::Put { revision: 1, .. }));
}

#[tokio::test]
async fn list_by_prefix_in_key_order_with_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
    let reader = sm.reader();
    let ops: Vec<_> = ["app/b", "app/a", "other", "app/c"]
        .iter()
        .enumerate()
        .map(|(i, k)| entry(i as u64 + 1, "", put(k, k)))
        .collect();
    sm.apply(ops).await.unwrap();
    let (all, more) = reader.list("app/", 0).unwrap();
    assert_eq!(all.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), ["app/a", "app/b", "app/c"]);
    assert!(!more);
    let (two, more) = reader.list("app/", 2).unwrap();
    assert_eq!(two.len(), 2);
    assert!(more);
}

#[tokio::test]
async fn pages_of_one_listing_agree_however_the_keys_change_between_them() {
    use crate::{PageError, PageLimits};
    let tmp = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
    let reader = sm.reader();
    let ops: Vec<_> = (1..=10u64)
        .map(|i| entry(i, "", put(&format!("app/{i:02}"), &format!("v{i}"))))
        .chain([entry(11, "", put("other", "x"))])
        .collect();
    sm.apply(ops).await.unwrap();
    let limits = PageLimits { keys: 4, bytes: usize::MAX };
    let first = reader.list_page("app/", "", 0, limits).unwrap().unwrap();
    assert_eq!(first.revision, 11);
    assert!(first.more);
    let keys = |p: &crate::Page| p.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&first), ["app/01", "app/02", "app/03", "app/04"]);
    // Between pages: a key of the next page changes, one is deleted, one is
    // added before the cursor and one after it.
    sm.apply(vec![
        entry(12, "", put("app/05", "changed")),
        entry(13, "", Op::Delete { key: "app/06".into() }),
        entry(14, "", put("app/00", "new")),
        entry(15, "", put("app/99", "new")),
    ])
    .await
    .unwrap();
    let mut all = keys(&first);
    let mut after = first.kvs.last().unwrap().key.clone();
    loop {
        let page = reader.list_page("app/", &after, first.revision, limits).unwrap().unwrap();
        assert_eq!(page.revision, 11);
        all.extend(keys(&page));
        if let Some(kv) = page.kvs.iter().find(|kv| kv.key == "app/05") {
            assert_eq!(kv.value, b"v5", "as it was at the listing's revision");
        }
        if !page.more {
            break;
        }
        after = page.kvs.last().unwrap().key.clone();
    }
    let want: Vec<_> = (1..=10).map(|i| format!("app/{i:02}")).collect();
    assert_eq!(all, want);
    // Now: the changes show.
    let now = reader.list_page("app/", "", 0, PageLimits { keys: 0, bytes: usize::MAX }).unwrap().unwrap();
    assert_eq!(now.kvs.len(), 11);
    assert!(!now.more);
    assert_eq!(now.kvs[0].key, "app/00");
    // A revision after the newest, or before the history, is refused.
    assert_eq!(reader.list_page("app/", "", 16, limits).unwrap(), Err(PageError::Future(15)));
}

#[tokio::test]
async fn a_page_stops_at_its_byte_budget_but_always_holds_one_key() {
    use crate::PageLimits;
    let tmp = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
    let reader = sm.reader();
    let big = "x".repeat(1000);
    sm.apply((1..=5u64).map(|i| entry(i, "", put(&format!("k{i}"), &big))).collect::<Vec<_>>()).await.unwrap();
    let page = reader.list_page("", "", 0, PageLimits { keys: 0, bytes: 2500 }).unwrap().unwrap();
    assert_eq!(page.kvs.len(), 3, "stops after the key that reaches the budget");
    assert!(page.more);
    let page = reader.list_page("", "k4", 0, PageLimits { keys: 0, bytes: 1 }).unwrap().unwrap();
    assert_eq!(page.kvs.len(), 1);
    assert_eq!(page.kvs[0].key, "k5");
    assert!(!page.more);
}

#[tokio::test]
async fn snapshot_installs_into_an_identical_replica_and_survives_reopen() {
    let leader_dir = tempfile::tempdir().unwrap();
    let follower_dir = tempfile::tempdir().unwrap();
    let (_l, mut leader) = open(leader_dir.path(), &OpenOptions::default()).unwrap();
    let ops: Vec<_> = (1..=500u64)
        .map(|i| entry(i, &format!("r{i}"), put(&format!("key/{i:04}"), &"v".repeat(i as usize))))
        .collect();
    leader.apply(ops).await.unwrap();
    let snap = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(500));
    let want = leader.reader().digest().unwrap();

    {
        let (mut f, mut follower) = open(follower_dir.path(), &OpenOptions::default()).unwrap();
        // A follower has the leader's vote before it installs its snapshot.
        f.save_vote(&openraft::Vote::new_committed(1, 1)).await.unwrap();
        follower.apply(vec![entry(1, "stale", put("stale", "x"))]).await.unwrap();
        let current = leader.get_current_snapshot().await.unwrap().unwrap();
        follower.install_snapshot(&current.meta, current.snapshot).await.unwrap();
        assert_eq!(follower.reader().digest().unwrap(), want);
        assert!(follower.reader().get("stale").unwrap().is_none());
        // A retried request from before the snapshot is still recognised.
        let again = follower.apply(vec![entry(501, "r7", put("key/0007", "changed"))]).await.unwrap();
        assert!(matches!(again[0], CommandResult::Put { revision: 7, .. }));
    }
    let (_f, mut reopened) = open(follower_dir.path(), &OpenOptions::default()).unwrap();
    // A restart starts from the current snapshot (entry 501 comes back
    // from the log, which openraft applies again).
    let (applied, _) = reopened.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(500));
    assert_eq!(reopened.reader().digest().unwrap(), want);
    assert_eq!(reopened.reader().get("key/0007").unwrap().unwrap().value, b"v".repeat(7));
    assert_eq!(reopened.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);
}

#[tokio::test]
async fn a_batch_applies_each_command_with_its_own_result_and_dedup() {
    let tmp = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
    let reader = sm.reader();
    sm.apply(vec![entry(1, "first", put("a", "1"))]).await.unwrap();
    let batch = Op::Batch(vec![
        Command { request_id: "first".into(), op: put("a", "ignored retry") },
        Command { request_id: "b1".into(), op: put("b", "2") },
        Command { request_id: "b2".into(), op: put("", "bad key") },
        Command { request_id: "b3".into(), op: Op::Delete { key: "a".into() } },
    ]);
    let r = sm.apply(vec![entry(2, "", batch)]).await.unwrap();
    let CommandResult::Batch(results) = &r[0] else { panic!("expected batch result, got {r:?}") };
    assert_eq!(
        results[0],
        CommandResult::Put { revision: 1, create_revision: 1, version: 1 },
        "retry answered from dedup"
    );
    assert_eq!(results[1], CommandResult::Put { revision: 2, create_revision: 2, version: 1 });
    assert!(matches!(&results[2], CommandResult::Rejected { reason } if reason.starts_with("key")));
    assert_eq!(results[3], CommandResult::Delete { revision: 3, deleted: true });
    assert!(reader.get("a").unwrap().is_none());
    assert_eq!(reader.get("b").unwrap().unwrap().value, b"2");
    assert_eq!(reader.revision(), 3);
}

#[tokio::test]
async fn history_reads_at_past_revisions_and_transactions_compare_first() {
    use crate::kv::{Compare, EventKind, Txn, TxnOp, HISTORY_REVISIONS};
    let tmp = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
    let reader = sm.reader();
    sm.apply(vec![
        entry(1, "", put("k", "v1")),
        entry(2, "", put("other", "x")),
        entry(3, "", put("k", "v2")),
        entry(4, "", Op::Delete { key: "k".into() }),
    ])
    .await
    .unwrap();
    let at = |rev| reader.get_at("k", rev).unwrap().unwrap().map(|kv| kv.value);
    assert_eq!((at(1), at(2), at(3), at(4)), (Some(b"v1".to_vec()), Some(b"v1".to_vec()), Some(b"v2".to_vec()), None));
    let h = reader.history("k", 0).unwrap();
    let kinds: Vec<(u64, EventKind)> = h.iter().map(|(r, e)| (*r, e.kind)).collect();
    assert_eq!(kinds, vec![(1, EventKind::Put), (3, EventKind::Put), (4, EventKind::Delete)]);
    let (events, last) = reader.events(2, "k", 100, usize::MAX).unwrap();
    assert_eq!((events.iter().map(|(r, _)| *r).collect::<Vec<_>>(), last), (vec![3, 4], 4));

    // Compare-and-set: absent holds now; a stale mod revision does not.
    let txn = |compares, success| Op::Txn(Box::new(Txn { compares, success, failure: vec![] }));
    let set = |v: &str| vec![TxnOp::Put { key: "k".into(), value: v.as_bytes().to_vec() }];
    let r = sm
        .apply(vec![
            entry(5, "", txn(vec![Compare::Absent { key: "k".into() }], set("v3"))),
            entry(6, "", txn(vec![Compare::ModRevision { key: "k".into(), revision: 3 }], set("v4"))),
            entry(7, "", txn(vec![Compare::ModRevision { key: "k".into(), revision: 5 }], set("v5"))),
        ])
        .await
        .unwrap();
    assert_eq!(r[0], CommandResult::Txn { succeeded: true, revision: 5, failed: String::new() });
    assert_eq!(
        r[1],
        CommandResult::Txn { succeeded: false, revision: 5, failed: "key k has mod revision 5, not 3".into() }
    );
    assert_eq!(r[2], CommandResult::Txn { succeeded: true, revision: 6, failed: String::new() });
    assert_eq!(reader.get("k").unwrap().unwrap().value, b"v5");

    // One in, one out: the history keeps the last HISTORY_REVISIONS changes.
    let mut index = 8;
    for batch in 0..(HISTORY_REVISIONS / 1000 + 1) {
        let entries: Vec<_> = (0..1000)
            .map(|i| {
                index += 1;
                entry(index, "", put(&format!("fill/{batch}/{i}"), "x"))
            })
            .collect();
        sm.apply(entries).await.unwrap();
    }
    let compacted = reader.compacted().unwrap();
    assert_eq!(compacted, reader.revision() - HISTORY_REVISIONS);
    assert!(reader.get_at("k", 3).unwrap().is_err(), "revision 3 is compacted");
    assert_eq!(reader.get_at("k", compacted - 1).unwrap(), Err(compacted), "below the window");
    assert_eq!(reader.get_at("k", compacted).unwrap().unwrap().unwrap().value, b"v5", "the window's first revision");
    assert_eq!(reader.history("k", 0).unwrap().len(), 0);
    // Unchanged since the window began: its current value answers.
    assert_eq!(reader.get_at("k", compacted + 1).unwrap().unwrap().unwrap().value, b"v5");
    // Changed again now: the window's early revisions still read v5 (the
    // new change's prior state), the new one reads v6.
    index += 1;
    sm.apply(vec![entry(index, "", put("k", "v6"))]).await.unwrap();
    let now = reader.revision();
    let early = reader.compacted().unwrap() + 1;
    assert_eq!(reader.get_at("k", early).unwrap().unwrap().unwrap().value, b"v5");
    assert_eq!(reader.get_at("k", now).unwrap().unwrap().unwrap().value, b"v6");
    // A key created inside the window was absent before it.
    assert_eq!(reader.get_at("fill/10/999", early).unwrap(), Ok(None));
    // A snapshot carries the history: a fresh replica answers the same.
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let tmp2 = tempfile::tempdir().unwrap();
    let (_log2, mut sm2) = open(tmp2.path(), &OpenOptions::default()).unwrap();
    sm2.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    let r2 = sm2.reader();
    assert_eq!(r2.compacted().unwrap(), reader.compacted().unwrap());
    let last = reader.revision();
    assert_eq!(r2.events(last, "", 10, usize::MAX).unwrap(), reader.events(last, "", 10, usize::MAX).unwrap());
    assert_eq!(r2.get_at("fill/10/999", last - 1).unwrap().unwrap().map(|kv| kv.mod_revision), Some(last - 1));
    assert_eq!(r2.get_at("k", early).unwrap().unwrap().unwrap().value, b"v5", "the history travels in snapshots");
}

#[tokio::test]
async fn revoking_a_lease_deletes_its_keys_and_a_plain_put_unbinds_a_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
    let reader = sm.reader();
    let leased = |key: &str, lease| Op::PutLeased { key: key.into(), value: b"v".to_vec(), lease };
    let r = sm
        .apply(vec![
            entry(1, "", Op::LeaseGrant { id: 7, ttl_ms: 5000 }),
            entry(2, "", Op::LeaseGrant { id: 7, ttl_ms: 5000 }),
            entry(3, "", leased("a", 7)),
            entry(4, "", leased("b", 7)),
            entry(5, "", leased("c", 8)),
            entry(6, "", put("b", "kept")),
            entry(7, "", Op::LeaseGrant { id: 9, ttl_ms: 500 }),
        ])
        .await
        .unwrap();
    assert_eq!(r[0], CommandResult::LeaseGranted { id: 7, ttl_ms: 5000 });
    assert!(matches!(&r[1], CommandResult::Rejected { reason } if reason.contains("exists")));
    assert!(matches!(&r[4], CommandResult::Rejected { reason } if reason == "lease: unknown lease id 8"));
    assert!(matches!(&r[6], CommandResult::Rejected { reason } if reason.starts_with("ttl:")));
    assert_eq!(reader.lease(7).unwrap().unwrap().keys, vec!["a".to_string()]);
    let r = sm.apply(vec![entry(8, "", Op::LeaseRevoke { ids: vec![7, 99] })]).await.unwrap();
    assert_eq!(r[0], CommandResult::LeasesRevoked { revision: 4, revoked: vec![7] });
    assert!(reader.get("a").unwrap().is_none());
    assert_eq!(reader.get("b").unwrap().unwrap().value, b"kept", "a plain put unbound b");
    assert!(reader.leases().unwrap().is_empty());
    let (events, _) = reader.events(4, "", 10, usize::MAX).unwrap();
    assert_eq!(events[0].1.kind, crate::kv::EventKind::Delete);
}

#[tokio::test]
async fn gray_variants_serve_matching_readers_and_promote_or_drop_in_one_step() {
    use crate::kv::parse_selector;
    let tmp = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
    let reader = sm.reader();
    let sel = |s: &str| parse_selector(s).unwrap();
    let gray = |s: &str, v: &str| Op::GraySet { key: "k".into(), selector: sel(s), value: v.as_bytes().to_vec() };
    let r = sm
        .apply(vec![
            entry(1, "", put("k", "main")),
            entry(2, "", gray("zone=a", "for-a")),
            entry(3, "", gray("zone=a,role=bidder", "for-a-bidders")),
            entry(4, "", Op::GraySet { key: "k".into(), selector: sel(""), value: b"x".to_vec() }),
        ])
        .await
        .unwrap();
    assert!(matches!(&r[3], CommandResult::Rejected { reason } if reason.starts_with("selector:")));
    let seen = |labels: &str| reader.get_for("k", &sel(labels)).unwrap().map(|(kv, _)| kv.value);
    assert_eq!(seen(""), Some(b"main".to_vec()));
    assert_eq!(seen("zone=b"), Some(b"main".to_vec()));
    assert_eq!(seen("zone=a"), Some(b"for-a".to_vec()));
    assert_eq!(seen("zone=a,role=bidder,host=h1"), Some(b"for-a-bidders".to_vec()), "the most specific wins");
    assert_eq!(reader.revision(), 1, "variants do not move the revision");

    let r = sm
        .apply(vec![
            entry(5, "", Op::GrayPromote { key: "k".into(), selector: sel("") }),
            entry(6, "", Op::GrayPromote { key: "k".into(), selector: sel("zone=a") }),
            entry(7, "", Op::GrayDrop { key: "k".into(), selector: sel("zone=z") }),
        ])
        .await
        .unwrap();
    assert!(matches!(&r[0], CommandResult::Rejected { reason } if reason.contains("2 variants; name one")));
    assert!(matches!(r[1], CommandResult::Put { revision: 2, version: 2, .. }));
    assert!(matches!(&r[2], CommandResult::Rejected { reason } if reason.contains("no variant for 'zone=z'")));
    assert_eq!(reader.get("k").unwrap().unwrap().value, b"for-a");
    assert_eq!(reader.variants("k").unwrap().len(), 1);
    sm.apply(vec![entry(8, "", Op::GrayDrop { key: "k".into(), selector: sel("") })]).await.unwrap();
    assert!(reader.variants("k").unwrap().is_empty());
    assert_eq!(seen("zone=a,role=bidder"), Some(b"for-a".to_vec()));
}

#[tokio::test]
async fn probe_results_replace_per_worker_travel_in_snapshots_and_go_with_their_probe() {
    use crate::probes::{ProbeDef, ProbeResult, ProbeTarget, WorkerProbe};
    let tmp = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
    let reader = sm.reader();
    let def = ProbeDef {
        name: "relays".into(),
        targets: vec![ProbeTarget { url: "http://10.0.0.1/2M".into(), host: "cdn.example".into() }],
        interval_ms: 60_000,
        timeout_ms: 10_000,
        selector: Default::default(),
        output: None,
        stale_after_ms: 180_000,
        output_stale_after_ms: 0,
        alert_url: String::new(),
        defined_unix_ms: 0,
    };
    let report = |worker: &str, total_us: u64| Op::ProbeReport {
        probe: "relays".into(),
        state: WorkerProbe {
            worker: worker.into(),
            results: vec![ProbeResult {
                target: 0,
                ttfb_us: 1,
                total_us,
                bytes: 2,
                error: String::new(),
                measured_unix_ms: 5,
            }],
            output_digest: String::new(),
            output_changed_unix_ms: 0,
            output_error: String::new(),
        },
    };
    let r = sm.apply(vec![entry(1, "", report("w1", 10))]).await.unwrap();
    assert!(matches!(&r[0], CommandResult::Rejected { reason } if reason.starts_with("probe:")), "{r:?}");
    sm.apply(vec![
        entry(2, "", Op::ProbeDefine(Box::new(def.clone()))),
        entry(3, "", report("w1", 10)),
        entry(4, "", report("w2", 20)),
        entry(5, "", report("w1", 30)),
    ])
    .await
    .unwrap();
    assert_eq!(reader.probes().unwrap(), vec![def.clone()]);
    let totals: Vec<(String, u64)> =
        reader.probe_results("relays").unwrap().into_iter().map(|w| (w.worker, w.results[0].total_us)).collect();
    assert_eq!(totals, vec![("w1".into(), 30), ("w2".into(), 20)]);

    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let tmp2 = tempfile::tempdir().unwrap();
    let (_log2, mut sm2) = open(tmp2.path(), &OpenOptions::default()).unwrap();
    sm2.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    assert_eq!(sm2.reader().probe_results("relays").unwrap(), reader.probe_results("relays").unwrap());

    // Redefined with the same targets (a new interval): results stay; with
    // other targets they would describe the wrong URLs, so they go.
    let slower = ProbeDef { interval_ms: 120_000, ..def.clone() };
    sm2.apply(vec![entry(6, "", Op::ProbeDefine(Box::new(slower.clone())))]).await.unwrap();
    assert_eq!(sm2.reader().probe_results("relays").unwrap().len(), 2);
    let moved =
        ProbeDef { targets: vec![ProbeTarget { url: "http://10.0.0.9/2M".into(), host: String::new() }], ..slower };
    sm2.apply(vec![entry(7, "", Op::ProbeDefine(Box::new(moved)))]).await.unwrap();
    assert!(sm2.reader().probe_results("relays").unwrap().is_empty());

    // Deleting the probe takes its results along (on the replica too).
    for (s, index) in [(&mut sm, 6), (&mut sm2, 8)] {
        s.apply(vec![entry(index, "", Op::ProbeDelete { name: "relays".into() })]).await.unwrap();
        let r = s.reader();
        assert!(r.probe("relays").unwrap().is_none());
        assert!(r.probe_results("relays").unwrap().is_empty());
    }
}

#[tokio::test]
async fn a_snapshot_is_the_state_when_it_was_asked_for_and_a_stale_build_is_not_recorded() {
    let leader_dir = tempfile::tempdir().unwrap();
    let follower_dir = tempfile::tempdir().unwrap();
    let (_l, mut leader) = open(leader_dir.path(), &OpenOptions::default()).unwrap();
    leader
        .apply((1..=10).map(|i| entry(i, &format!("r{i}"), put(&format!("k{i}"), "v"))).collect::<Vec<_>>())
        .await
        .unwrap();
    let at_ten = leader.reader().digest().unwrap();
    let mut builder = leader.get_snapshot_builder().await;
    // Applies go on while the file is written; the snapshot is still of entry 10.
    leader.apply(vec![entry(11, "r11", put("k11", "v"))]).await.unwrap();
    let snap = builder.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(10));

    {
        let (mut f, mut follower) = open(follower_dir.path(), &OpenOptions::default()).unwrap();
        // A follower has the leader's vote before it installs its snapshot.
        f.save_vote(&openraft::Vote::new_committed(1, 1)).await.unwrap();
        follower.apply(vec![entry(1, "f1", put("mine", "v"))]).await.unwrap();
        let mut stale = follower.get_snapshot_builder().await;
        let current = leader.get_current_snapshot().await.unwrap().unwrap();
        follower.install_snapshot(&current.meta, current.snapshot).await.unwrap();
        assert_eq!(follower.reader().digest().unwrap(), at_ten);
        // The follower's own build (of entry 1) finishes after the install:
        // the installed snapshot stays current.
        stale.build_snapshot().await.unwrap();
        assert_eq!(follower.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);
    }
    let (_f, reopened) = open(follower_dir.path(), &OpenOptions::default()).unwrap();
    assert_eq!(reopened.reader().digest().unwrap(), at_ten);
}

#[tokio::test]
async fn forgetting_jobs_drops_finished_ones_oldest_first_and_never_a_running_one() {
    use crate::jobs::{Job, JobEvent, JobPhase};
    let tmp = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
    let reader = sm.reader();
    let job = |id: &str| Job {
        id: id.into(),
        source: "src".into(),
        targets: vec![crate::jobs::Target::new("a".into(), vec!["/r/a".into()], &[])],
        files: vec![],
        hook: String::new(),
        callback_url: String::new(),
        timeout_ms: 1000,
        grace_ms: 1000,
        requested_targets: vec!["a".into()],
        selector: String::new(),
        destination: String::new(),
        phase: JobPhase::Running,
        created_ms: 1,
        finished_ms: 0,
    };
    let cancel = |id: &str, at_ms: u64| JobEvent::Cancel { job: id.into(), at_ms };
    sm.apply(vec![
        entry(1, "", Op::CreateJob(Box::new(job("old")))),
        entry(2, "", Op::CreateJob(Box::new(job("new")))),
        entry(3, "", Op::CreateJob(Box::new(job("running")))),
        // "new" finishes first, "old" after it.
        entry(4, "", Op::JobEvents(vec![cancel("new", 10), cancel("old", 20)])),
    ])
    .await
    .unwrap();
    assert_eq!(reader.finished_jobs(), ["new", "old"], "oldest finish first; the running job is not finished");
    let r = sm
        .apply(vec![entry(5, "", Op::ForgetJobs { ids: vec!["new".into(), "running".into(), "unknown".into()] })])
        .await
        .unwrap();
    assert_eq!(r[0], CommandResult::Done);
    let left: Vec<String> = reader.jobs().unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(left, ["old", "running"], "a running job is kept even when named");
    let too_many = Command {
        request_id: String::new(),
        op: Op::ForgetJobs { ids: vec![String::new(); crate::command::MAX_FORGET + 1] },
    };
    assert!(too_many.validate().unwrap_err().starts_with("ids: "));
}
