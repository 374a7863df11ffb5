use openraft::storage::RaftLogStorageExt;
use openraft::{CommittedLeaderId, EntryPayload};

use super::*;
use crate::db::{open, OpenOptions};

fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
    Entry { log_id: LogId::new(CommittedLeaderId::new(term, 1), index), payload: EntryPayload::Blank }
}

/// (term, index) of every entry in the log after the cluster's first
/// (index 0, see [`init`]).
async fn contents(log: &mut LogStore) -> Vec<(u64, u64)> {
    let entries = log.try_get_log_entries(1..).await.unwrap();
    entries.iter().map(|e| (e.log_id.leader_id.term, e.log_id.index)).collect()
}

/// What every real log starts with: a vote, and the cluster's first
/// entry at index 0 (openraft's `initialize`).
async fn init(log: &mut LogStore) {
    log.save_vote(&Vote::new_committed(9, 1)).await.unwrap();
    log.blocking_append([entry(0, 0)]).await.unwrap();
}

/// Opens `path`, waiting while a store dropped just before still holds
/// sled's lock (sled's I/O threads finish their last writes first).
fn reopen(path: &std::path::Path) -> LogStore {
    try_reopen(path).unwrap().0
}

/// [`reopen`], with the state machine, or why the directory is refused.
fn try_reopen(path: &std::path::Path) -> Result<(LogStore, crate::StateMachineStore), Error> {
    for _ in 0..250 {
        match open(path, &OpenOptions::default()) {
            Err(Error::Locked { .. }) => std::thread::sleep(std::time::Duration::from_millis(20)),
            opened => return opened,
        }
    }
    panic!("{} stayed locked for 5 s", path.display());
}

#[tokio::test]
async fn entries_that_sled_lost_come_back_from_the_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = reopen(tmp.path());
    init(&mut log).await;
    log.blocking_append((1..=5).map(|i| entry(1, i))).await.unwrap();
    // What a crash does to entries still in sled's unflushed buffers:
    // here 3 to 5 are removed and sled synced without them.
    for i in 3..=5 {
        log.log.remove(&index_key(i)).unwrap();
    }
    log.dir.sync_blocking().unwrap();
    drop(log);
    let mut log = reopen(tmp.path());
    assert_eq!(contents(&mut log).await, [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]);
    // The journal started over at open: a second reopen finds the same.
    drop(log);
    let mut log = reopen(tmp.path());
    assert_eq!(contents(&mut log).await.len(), 5);
}

#[tokio::test]
async fn a_log_that_lost_what_was_durable_is_refused_at_every_start() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = reopen(tmp.path());
    init(&mut log).await;
    log.blocking_append((1..=5).map(|i| entry(1, i))).await.unwrap();
    // A full sled sync: the journals start over, sled alone holds 1-5.
    log.checkpoint().await.unwrap();
    // What sled 0.34 does with a damaged older segment: the entries
    // after it are skipped, without an error.
    for i in 3..=5 {
        log.log.remove(&index_key(i)).unwrap();
    }
    log.dir.sync_blocking().unwrap();
    drop(log);
    for _ in 0..2 {
        let err = try_reopen(tmp.path()).unwrap_err();
        assert!(matches!(err, Error::Damaged { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("sled holds the log through index 2 (term 1) but it was durable through index 5"),
            "{text}"
        );
        assert!(text.contains("under a new --id"), "{text}");
    }
}

#[tokio::test]
async fn entries_a_snapshot_holds_may_be_left_with_holes() {
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = try_reopen(tmp.path()).unwrap();
    init(&mut log).await;
    log.blocking_append((1..=5).map(|i| entry(1, i))).await.unwrap();
    sm.apply(log.try_get_log_entries(..=5).await.unwrap()).await.unwrap();
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    log.purge(LogId::new(CommittedLeaderId::new(1, 1), 5)).await.unwrap();
    log.purged().await;
    // What a crash in the middle of a purge (or a follower's log before an
    // installed snapshot) leaves: old entries, then a hole, then the log.
    for i in 1..=2 {
        let raw = codec::encode("log entry", &entry(1, i)).unwrap();
        log.log.insert(&index_key(i), &raw).unwrap();
    }
    log.blocking_append((6..=7).map(|i| entry(1, i))).await.unwrap();
    log.checkpoint().await.unwrap();
    drop((log, sm));
    let mut log = reopen(tmp.path());
    assert_eq!(contents(&mut log).await, [(1, 6), (1, 7)]);
}

#[tokio::test]
async fn a_hole_in_the_log_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = reopen(tmp.path());
    init(&mut log).await;
    log.blocking_append((1..=5).map(|i| entry(1, i))).await.unwrap();
    log.checkpoint().await.unwrap();
    log.log.remove(&index_key(3)).unwrap();
    log.dir.sync_blocking().unwrap();
    drop(log);
    let err = try_reopen(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("the log has a hole: entries 3 to 3 are missing"), "{err}");
}

#[tokio::test]
async fn a_failed_sync_is_final_and_the_journal_keeps_what_sled_may_have_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("fail-sync");
    let mut log = reopen(&path);
    init(&mut log).await;
    log.blocking_append((1..=3).map(|i| entry(1, i))).await.unwrap();
    // One failed sync (a writeback error), as the kernel reports it once.
    fail::cfg("data-dir-sync", "return").unwrap();
    assert!(log.checkpoint().await.is_err());
    fail::remove("data-dir-sync");
    // The next sync would "succeed" over pages marked clean: it is refused,
    // and the journals are not reset.
    assert!(log.checkpoint().await.is_err(), "a sync after a failed one must fail too");
    // What sled lost comes back from the journal at the restart.
    for i in 2..=3 {
        log.log.remove(&index_key(i)).unwrap();
    }
    drop(log);
    let mut log = reopen(&path);
    assert_eq!(contents(&mut log).await, [(1, 1), (1, 2), (1, 3)]);
}

#[tokio::test]
async fn truncated_and_purged_entries_stay_gone_after_a_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = reopen(tmp.path());
    init(&mut log).await;
    log.blocking_append((1..=5).map(|i| entry(1, i))).await.unwrap();
    log.truncate(LogId::new(CommittedLeaderId::new(1, 1), 3)).await.unwrap();
    log.blocking_append([entry(2, 3)]).await.unwrap();
    drop(log);
    let (mut log, mut sm) = try_reopen(tmp.path()).unwrap();
    assert_eq!(contents(&mut log).await, [(1, 1), (1, 2), (2, 3)]);
    // openraft purges only what a snapshot holds.
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    sm.apply(log.try_get_log_entries(..=2).await.unwrap()).await.unwrap();
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    log.purge(LogId::new(CommittedLeaderId::new(1, 1), 2)).await.unwrap();
    // Purged at once for readers, deleted in the background.
    assert_eq!(contents(&mut log).await, [(2, 3)]);
    log.purged().await;
    assert_eq!(log.log.len(), 1);
    drop((log, sm));
    let mut log = reopen(tmp.path());
    assert_eq!(contents(&mut log).await, [(2, 3)]);
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(2));
}

#[tokio::test]
async fn a_purge_past_the_current_snapshot_stops_at_it_and_the_node_restarts() {
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = try_reopen(tmp.path()).unwrap();
    init(&mut log).await;
    log.blocking_append((1..=6).map(|i| entry(1, i))).await.unwrap();
    sm.apply(log.try_get_log_entries(..=2).await.unwrap()).await.unwrap();
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    // openraft purges up to a snapshot (through 5) it is still installing;
    // the node dies before the state machine has it.
    log.purge(LogId::new(CommittedLeaderId::new(1, 1), 5)).await.unwrap();
    log.purged().await;
    drop((log, sm));
    // It restarts on the snapshot through 2, with the entries after it.
    let (mut log, _sm) = try_reopen(tmp.path()).expect("not refused as damaged");
    assert_eq!(contents(&mut log).await, [(1, 3), (1, 4), (1, 5), (1, 6)]);
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(2));
}

#[tokio::test]
async fn after_a_restart_the_log_starts_after_the_current_snapshot() {
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = try_reopen(tmp.path()).unwrap();
    init(&mut log).await;
    log.blocking_append((1..=6).map(|i| entry(1, i))).await.unwrap();
    sm.apply(log.try_get_log_entries(..=5).await.unwrap()).await.unwrap();
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    // A hole below the snapshot, as a truncation before an installed
    // snapshot leaves it; nothing was purged.
    log.log.remove(&index_key(3)).unwrap();
    log.checkpoint().await.unwrap();
    drop((log, sm));
    let (mut log, _sm) = try_reopen(tmp.path()).unwrap();
    // openraft reads from after the last purged id: it must not meet the hole.
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(5));
    assert_eq!(contents(&mut log).await, [(1, 6)]);
}

#[tokio::test]
async fn a_full_journal_checkpoints_and_keeps_every_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = reopen(tmp.path());
    init(&mut log).await;
    let big = |index: u64| Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(crate::Command {
            request_id: format!("r{index}"),
            op: crate::Op::Put { key: format!("k{index}"), value: vec![7u8; 1 << 20] },
        }),
    };
    let turns = |log: &mut LogStore, last: &mut u64| {
        let len = log.journal().active().len();
        let turned = len < *last;
        *last = len;
        usize::from(turned)
    };
    // 20 MiB: the 16 MiB journal is full and the other takes over.
    let (mut turned, mut last) = (0, 0);
    for i in 1..=20 {
        log.blocking_append([big(i)]).await.unwrap();
        turned += turns(&mut log, &mut last);
    }
    assert_eq!(turned, 1);
    // What a crash does to entries still in sled's buffers: both
    // journals bring theirs back.
    for i in 10..=20 {
        log.log.remove(&index_key(i)).unwrap();
    }
    log.dir.sync_blocking().unwrap();
    drop(log);
    let mut log = reopen(tmp.path());
    assert_eq!(contents(&mut log).await.len(), 20);
    // 35 MiB more: they take turns twice, the second time after the
    // first background checkpoint.
    let (mut turned, mut last) = (0, 0);
    for i in 21..=55 {
        log.blocking_append([big(i)]).await.unwrap();
        turned += turns(&mut log, &mut last);
    }
    assert_eq!(turned, 2);
    drop(log);
    let mut log = reopen(tmp.path());
    assert_eq!(contents(&mut log).await.len(), 55);
}

#[tokio::test]
async fn the_leaders_own_appends_sync_in_the_background_and_applies_wait_for_them() {
    use openraft::storage::RaftStateMachine;

    let tmp = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(tmp.path(), &OpenOptions { node_id: Some(1), ..OpenOptions::default() }).unwrap();
    let sync = log.log_sync();
    let by = |leader: u64, term: u64, index: u64| Entry::<TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(term, leader), index),
        payload: EntryPayload::Blank,
    };
    let in_background = |log: &LogStore| log.background().written;

    // A follower of node 2: synced before the append returns.
    log.save_vote(&Vote::new_committed(1, 2)).await.unwrap();
    log.blocking_append([by(2, 0, 0), by(2, 1, 1)]).await.unwrap();
    assert_eq!(sync.synced(), Some(by(2, 1, 1).log_id));
    // A candidate's entry (vote not granted yet) is not one of a leader.
    log.save_vote(&Vote::new(2, 1)).await.unwrap();
    log.blocking_append([by(1, 2, 2)]).await.unwrap();
    assert_eq!((sync.synced(), in_background(&log)), (Some(by(1, 2, 2).log_id), None));

    // Leader of term 2: its entries are saved once written, synced after.
    log.save_vote(&Vote::new_committed(2, 1)).await.unwrap();
    log.blocking_append([by(1, 2, 3)]).await.unwrap();
    assert_eq!(in_background(&log), Some(by(1, 2, 3).log_id));
    sync.wait_for(3).await.unwrap();

    // The state machine applies no entry the log has not synced.
    let applying = sm.apply([by(1, 2, 4)]);
    assert!(tokio::time::timeout(std::time::Duration::from_millis(100), applying).await.is_err());
    log.blocking_append([by(1, 2, 4)]).await.unwrap();
    assert_eq!(sm.apply([by(1, 2, 4)]).await.unwrap().len(), 1);
    assert_eq!(sync.synced(), Some(by(1, 2, 4).log_id));

    // A checkpoint waits for the background; reopened, all is there.
    log.blocking_append([by(1, 2, 5)]).await.unwrap();
    log.checkpoint().await.unwrap();
    assert_eq!(sync.synced(), Some(by(1, 2, 5).log_id));
    drop((log, sm));
    let mut log = reopen(tmp.path());
    assert_eq!(contents(&mut log).await, [(1, 1), (2, 2), (2, 3), (2, 4), (2, 5)]);
    assert_eq!(log.log_sync().synced(), Some(by(1, 2, 5).log_id));
}

#[tokio::test]
async fn a_node_that_led_starts_again_as_a_follower_bound_to_its_vote() {
    let tmp = tempfile::tempdir().unwrap();
    let options = OpenOptions { node_id: Some(1), ..OpenOptions::default() };
    let (mut log, _sm) = open(tmp.path(), &options).unwrap();
    log.save_vote(&Vote::new_committed(4, 1)).await.unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new_committed(4, 1)));
    drop((log, _sm));
    let (mut log, _sm) = open(tmp.path(), &options).unwrap();
    // Still its own vote in term 4 (it grants no other in that term), but
    // not a leader's: it leads again only by winning an election.
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(4, 1)));
    // Another leader's committed vote is read back as it was.
    log.save_vote(&Vote::new_committed(5, 2)).await.unwrap();
    drop((log, _sm));
    let (mut log, _sm) = open(tmp.path(), &options).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new_committed(5, 2)));
}
