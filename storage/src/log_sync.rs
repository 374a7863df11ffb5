//! How far this node's log is durable, for the leader's early appends.
//!
//! openraft 0.9 waits for the leader's own log flush before it sends an
//! entry to the followers, so a write paid two disk syncs one after the
//! other: the leader's, then the followers'. etcd's leader sends first and
//! syncs while the followers do. Ferry gets the same overlap without
//! changing openraft: the log store reports an entry that this node wrote
//! as leader of the current term saved once it is written, and syncs it in
//! the background (`log_store.rs`). openraft may then count the leader's
//! copy towards a commit before it is durable, so two places hold back what
//! such a commit would make visible until the leader's copy is synced:
//!
//! - the state machine applies no entry beyond [`LogSync::synced`], so no
//!   client hears of a write, and no watcher sees it, before the leader and
//!   one follower (a majority of three) hold it durably;
//! - the Raft network tells followers of no commit beyond it, so a follower
//!   does not apply what the leader could still lose ([`LogSync::announceable`]
//!   lets the message announcing a commit wait briefly for the sync).
//!
//! A node that crashes before its background sync finished may lose those
//! entries, but no node has applied them and no client was answered, as
//! with any uncommitted entry. Entries a node appends as follower are synced
//! before openraft hears of them, as always: a follower's acknowledgement
//! means the entry is on its disk.

use std::sync::Arc;
use std::time::Duration;

use openraft::LogId;
use tokio::sync::watch;

use crate::NodeId;

/// The last log entry known durable on this node; cheap to clone, every
/// clone sees the same state.
#[derive(Clone, Debug)]
pub struct LogSync {
    state: Arc<watch::Sender<Synced>>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Synced {
    upto: Option<LogId<NodeId>>,
    /// A background sync failed: nothing more is durable, applies stop.
    failed: bool,
}

/// A background log sync failed; the node must stop.
#[derive(Debug, thiserror::Error)]
#[error("a background sync of the Raft log failed; this node stops applying")]
pub struct SyncFailed;

impl LogSync {
    /// Durable up to `upto`, as a log store sets it when it opens.
    pub fn new(upto: Option<LogId<NodeId>>) -> Self {
        Self { state: Arc::new(watch::Sender::new(Synced { upto, failed: false })) }
    }

    /// The last entry known durable here (`None`: none, or a failed sync).
    pub fn synced(&self) -> Option<LogId<NodeId>> {
        let state = self.state.borrow();
        if state.failed {
            None
        } else {
            state.upto
        }
    }

    /// Everything up to `id` is durable (a later entry may already be).
    pub(crate) fn advance(&self, id: LogId<NodeId>) {
        self.state.send_if_modified(|s| {
            let newer = s.upto < Some(id);
            if newer {
                s.upto = Some(id);
            }
            newer
        });
    }

    /// The log now ends at `last` (after a truncation), all of it durable.
    pub(crate) fn reset(&self, last: Option<LogId<NodeId>>) {
        self.state.send_modify(|s| s.upto = last);
    }

    pub(crate) fn fail(&self) {
        self.state.send_modify(|s| s.failed = true);
    }

    pub(crate) fn failed(&self) -> bool {
        self.state.borrow().failed
    }

    /// Waits until the entry at `index` is durable here.
    pub(crate) async fn wait_for(&self, index: u64) -> Result<(), SyncFailed> {
        let mut rx = self.state.subscribe();
        let state =
            rx.wait_for(|s| s.failed || s.upto.is_some_and(|u| u.index >= index)).await.map_err(|_| SyncFailed)?;
        if state.failed {
            Err(SyncFailed)
        } else {
            Ok(())
        }
    }
}

impl LogSync {
    /// The commit index a follower may hear of: `commit` once this node has
    /// synced up to it, else the last entry it has synced. A sync in
    /// progress gets up to `patience` to reach `commit`, so that a follower
    /// hears of a commit now rather than with the next message, a heartbeat
    /// later.
    pub async fn announceable(&self, commit: Option<LogId<NodeId>>, patience: Duration) -> Option<LogId<NodeId>> {
        let c = commit?;
        if self.synced() < commit && !patience.is_zero() {
            let _ = tokio::time::timeout(patience, self.wait_for(c.index)).await;
        }
        commit.min(self.synced())
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;

    fn id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    #[tokio::test]
    async fn a_wait_ends_when_the_entry_is_synced_and_fails_after_a_failed_sync() {
        let sync = LogSync::new(Some(id(1, 3)));
        sync.wait_for(3).await.unwrap();
        let waiting = tokio::spawn({
            let sync = sync.clone();
            async move { sync.wait_for(5).await }
        });
        sync.advance(id(1, 4));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "entry 5 is not synced yet");
        sync.advance(id(1, 6));
        waiting.await.unwrap().unwrap();
        // An older sync finishing late does not move it back.
        sync.advance(id(1, 5));
        assert_eq!(sync.synced(), Some(id(1, 6)));

        sync.reset(Some(id(1, 4)));
        assert_eq!(sync.synced(), Some(id(1, 4)));
        let waiting = tokio::spawn({
            let sync = sync.clone();
            async move { sync.wait_for(5).await }
        });
        sync.fail();
        assert!(waiting.await.unwrap().is_err());
        assert_eq!(sync.synced(), None);
    }

    #[tokio::test]
    async fn a_follower_hears_of_a_commit_once_synced_waiting_a_little_for_a_sync_in_progress() {
        let sync = LogSync::new(Some(id(1, 3)));
        let long = Duration::from_secs(10);
        // Already synced, or nothing to announce: at once.
        assert_eq!(sync.announceable(Some(id(1, 2)), long).await, Some(id(1, 2)));
        assert_eq!(sync.announceable(None, long).await, None);
        // No patience: what is synced.
        assert_eq!(sync.announceable(Some(id(1, 5)), Duration::ZERO).await, Some(id(1, 3)));
        // A sync that ends within the patience: the commit itself.
        let syncing = tokio::spawn({
            let sync = sync.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                sync.advance(id(1, 6));
            }
        });
        assert_eq!(sync.announceable(Some(id(1, 5)), long).await, Some(id(1, 5)));
        syncing.await.unwrap();
        // One that does not: what is synced by then.
        assert_eq!(sync.announceable(Some(id(1, 9)), Duration::from_millis(20)).await, Some(id(1, 6)));
        // After a failed sync: nothing.
        sync.fail();
        assert_eq!(sync.announceable(Some(id(1, 2)), long).await, None);
    }
}
