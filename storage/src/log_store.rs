//! The Raft log and vote on sled (`RaftLogStorage`).
//!
//! Durability: `save_vote` and `append` flush sled and `fdatasync` its files
//! ([`DataDir::sync`](crate::db::DataDir)) before they report success, so a
//! vote or an entry openraft believes saved survives a crash or a power loss.
//! openraft 0.9 waits for each append to be flushed before it issues the
//! next, so batching concurrent writes into few fsyncs happens one level up,
//! in the scheduler's proposer (many commands per entry). `purge` records the
//! last purged id (flushed) before it deletes entries, so a crash mid-purge
//! never leaves a hole.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogId, StorageIOError, Vote};

use crate::codec;
use crate::db::DataDir;
use crate::error::Error;
use crate::{NodeId, RaftStorageError, TypeConfig};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// The log store: cheap to clone, every clone sees the same sled trees.
#[derive(Clone, Debug)]
pub struct LogStore {
    dir: DataDir,
    log: sled::Tree,
    /// Last committed index openraft reported, for metrics (0 = none).
    committed: Arc<AtomicU64>,
    /// fsyncs of appended entries since start (batching shows as entries/flush).
    flushes: Arc<AtomicU64>,
}

impl LogStore {
    pub(crate) fn new(dir: DataDir) -> Result<Self, Error> {
        let log = dir.tree("log")?;
        let committed: Option<LogId<NodeId>> = read_meta(&dir.meta, KEY_COMMITTED, "committed")?;
        let committed = Arc::new(AtomicU64::new(committed.map(|c| c.index).unwrap_or(0)));
        Ok(Self { dir, log, committed, flushes: Arc::new(AtomicU64::new(0)) })
    }

    /// The data directory behind this store.
    pub fn dir(&self) -> &DataDir {
        &self.dir
    }

    /// Commit index as last saved by openraft; shared, updated live.
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    /// Appends flushed to disk since this node started.
    pub fn append_flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Number of entries currently in the log (after purges).
    pub fn entry_count(&self) -> usize {
        self.log.len()
    }

    fn last_purged(&self) -> Result<Option<LogId<NodeId>>, RaftStorageError> {
        read_meta(&self.dir.meta, KEY_LAST_PURGED, "last_purged").map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

fn read_meta<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    key: &[u8],
    what: &'static str,
) -> Result<Option<T>, Error> {
    match tree.get(key).map_err(|source| Error::Sled { op: "read meta", source })? {
        Some(raw) => Ok(Some(codec::decode(what, &raw)?)),
        None => Ok(None),
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode_entry(raw: &[u8]) -> Result<Entry<TypeConfig>, RaftStorageError> {
    codec::decode("log entry", raw).map_err(|e| StorageIOError::read_logs(&e).into())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, RaftStorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => Bound::Included(index_key(i)),
            Bound::Excluded(&i) => Bound::Excluded(index_key(i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => Bound::Included(index_key(i)),
            Bound::Excluded(&i) => Bound::Excluded(index_key(i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.log.range::<[u8; 8], _>((start, end)) {
            let (_, raw) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            out.push(decode_entry(&raw)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        let last_purged_log_id = self.last_purged()?;
        let last = self.log.last().map_err(|e| StorageIOError::read_logs(&e))?;
        let last_log_id = match last {
            Some((_, raw)) => Some(*decode_entry(&raw)?.get_log_id()),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), RaftStorageError> {
        let raw = codec::encode("vote", vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.dir.meta.insert(KEY_VOTE, raw).map_err(|e| StorageIOError::write_vote(&e))?;
        self.dir.sync().await.map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, RaftStorageError> {
        read_meta(&self.dir.meta, KEY_VOTE, "vote").map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), RaftStorageError> {
        // Not flushed: openraft re-derives the commit index after a crash.
        match committed {
            Some(log_id) => {
                let raw = codec::encode("committed", &log_id).map_err(|e| StorageIOError::write(&e))?;
                self.dir.meta.insert(KEY_COMMITTED, raw).map_err(|e| StorageIOError::write(&e))?;
            }
            None => {
                self.dir.meta.remove(KEY_COMMITTED).map_err(|e| StorageIOError::write(&e))?;
            }
        }
        self.committed.store(committed.map(|c| c.index).unwrap_or(0), Ordering::Relaxed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, RaftStorageError> {
        read_meta(&self.dir.meta, KEY_COMMITTED, "committed").map_err(|e| StorageIOError::read(&e).into())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            let raw = codec::encode("log entry", &entry).map_err(|e| StorageIOError::write_logs(&e))?;
            encoded.push((index_key(entry.log_id.index), raw));
        }
        // One entry (the common case when idle) goes in as a plain insert: a
        // batch costs sled an extra log record, written and synced on its own.
        match <[_; 1]>::try_from(encoded) {
            Ok([(key, raw)]) => self.log.insert(key, raw).map(|_| ()),
            Err(encoded) => {
                let mut batch = sled::Batch::default();
                for (key, raw) in encoded {
                    batch.insert(&key, raw);
                }
                self.log.apply_batch(batch)
            }
        }
        .map_err(|e| StorageIOError::write_logs(&e))?;
        let flushed = self.dir.sync().await;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        callback.log_io_completed(flushed);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftStorageError> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(index_key(log_id.index)..) {
            let (key, _) = item.map_err(|e| StorageIOError::write_logs(&e))?;
            batch.remove(key);
        }
        self.log.apply_batch(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        self.dir.sync().await.map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftStorageError> {
        // Record first: a crash after this line leaves extra entries, never a hole.
        let raw = codec::encode("last_purged", &log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        self.dir.meta.insert(KEY_LAST_PURGED, raw).map_err(|e| StorageIOError::write_logs(&e))?;
        self.dir.sync().await.map_err(|e| StorageIOError::write_logs(&e))?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=index_key(log_id.index)) {
            let (key, _) = item.map_err(|e| StorageIOError::write_logs(&e))?;
            batch.remove(key);
        }
        self.log.apply_batch(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
