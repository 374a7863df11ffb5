//! The replicated state machine (`RaftStateMachine`), and the read side the
//! scheduler serves from ([`StateReader`]).
//!
//! The state lives in memory ([`state::State`]): apply is a handful of
//! ordered-map operations per command, no I/O. It is made durable by the
//! log and by snapshot files: the log (in the data directory's database) holds every entry after the
//! current snapshot, openraft purges only entries a snapshot covers, and on
//! start the store loads the current snapshot file and openraft applies the
//! committed log after it again. So a restart or crash loses nothing that
//! was acknowledged, and a crash mid-apply leaves nothing half-applied.
//!
//! Apply never reads clocks or randomness: its result depends only on the
//! entries and the prior state. A snapshot is a copy of the state taken
//! while openraft runs no apply (one point in time; the maps are persistent,
//! so the copy shares them and costs O(1), and later applies copy only the
//! nodes they change), written off the apply
//! path as `*.tmp`, fsynced, renamed, and then recorded as current in the
//! node's state file ([`crate::state_file`], synced) before older snapshot
//! files are deleted. A build
//! that finishes after a newer snapshot was installed is not recorded.

mod listing;
mod state;

pub use listing::{Page, PageError, PageLimits};

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{BasicNode, Entry, LogId, OptionalSend, SnapshotMeta, StorageIOError, StoredMembership};

use crate::codec;
use crate::command::CommandResult;
use crate::db::DataDir;
use crate::error::Error;
use crate::jobs::{Job, WorkerRecord};
use crate::kv::{self, Event, KeyValue, StoredValue};
use crate::probes;
use crate::snapshot::{self, Header, Record};
use crate::{NodeId, RaftStorageError, TypeConfig};
use state::State;

/// A request id is remembered for this many log entries after it was applied
/// (one entry may carry many commands)...
pub const DEDUP_WINDOW: u64 = 100_000;
/// ...but no more than about this many ids are remembered: the oldest
/// entries' ids go first. At 5,000 writes/s that is still 100 s, well past
/// a client's retry budget (the SDK's default is 15 s); it bounds the memory
/// (about 150 bytes an id) and the snapshot size under sustained load.
pub const DEDUP_MAX_IDS: usize = 500_000;

type Membership = StoredMembership<NodeId, BasicNode>;

/// Called with the time each `apply` batch took (for the latency histogram).
pub type ApplyObserver = Arc<dyn Fn(Duration, usize) + Send + Sync>;

/// One change in the history window, with the key's state just before it
/// (`None`: absent). The first change after a revision R therefore says
/// what the key was at R, so reads inside the window need nothing else once
/// older changes are compacted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Change {
    pub(crate) event: Event,
    pub(crate) prev: Option<StoredValue>,
}

struct Inner {
    dir: DataDir,
    /// Readers hold it shared, `apply` and `install` exclusively, so a
    /// listing or digest is one point-in-time view.
    state: RwLock<State>,
    applied: AtomicU64,
    revision: AtomicU64,
    snapshots_built: AtomicU64,
    snapshots_installed: AtomicU64,
    /// The last log id of the snapshot recorded as current.
    current_snapshot: Mutex<Option<LogId<NodeId>>>,
    /// Bumped (to the applied index) after every apply or install, so job
    /// watchers wake up.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Inner {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; apply cannot leave
        // the state half-changed (it does not fail), so it is still whole.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// The state machine openraft drives. Clones share state.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<Inner>,
    observer: Option<ApplyObserver>,
}

impl std::fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore").field("path", &self.inner.dir.path).finish_non_exhaustive()
    }
}

/// Read access to the applied state, shared with the scheduler's services.
#[derive(Clone)]
pub struct StateReader {
    inner: Arc<Inner>,
}

/// A fingerprint of the applied state, for comparing replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// Log index the state reflects.
    pub applied_index: u64,
    /// Cluster revision.
    pub revision: u64,
    /// Number of keys.
    pub keys: u64,
    /// Hex BLAKE3 over revision and every key, value and revision field.
    pub hex: String,
}

/// Reads a snapshot file into a state. `meta` (openraft's, on install)
/// overrides the header's log id and membership.
fn load(path: &std::path::Path, meta: Option<&SnapshotMeta<NodeId, BasicNode>>) -> Result<State, Error> {
    let file = std::fs::File::open(path).map_err(|source| Error::Snapshot { op: "open", source })?;
    let (mut reader, header) = snapshot::Reader::new(file)?;
    let meta = meta.unwrap_or(&header.meta);
    let mut state = State {
        last_applied: meta.last_log_id,
        membership: meta.last_membership.clone(),
        revision: header.revision,
        ..State::default()
    };
    while let Some(record) = reader.next_record()? {
        match record {
            Record::Kv { key, value } => {
                state.kv.insert(key, value);
            }
            Record::Dedup { request_id, index, result } => state.dedup.insert(&request_id, index, result),
            Record::Worker(w) => {
                state.workers.insert(w.name.clone(), w);
            }
            Record::Job(j) => {
                state.jobs.insert(j.id.clone(), *j);
            }
            Record::Change { revision, change } => state.keep(revision, change),
            Record::Lease(lease) => {
                for key in &lease.keys {
                    state.key_lease.insert(key.clone(), lease.id);
                }
                state.leases.insert(lease.id, lease);
            }
            Record::Gray { key, variants } => {
                state.gray.insert(key, variants);
            }
            Record::ProbeDef(def) => {
                state.probe_defs.insert(def.name.clone(), def);
            }
            Record::ProbeResults { probe, state: results } => {
                state.probe_results.entry(probe).or_default().insert(results.worker.clone(), results);
            }
            Record::OldEvent | Record::OldBase => {
                return Err(Error::Corrupt {
                    path: path.into(),
                    reason: "a snapshot of data format 1 (before this version's key history); \
                             upgrade every scheduler before installing snapshots"
                        .into(),
                })
            }
            Record::End { .. } => {}
        }
    }
    state.dedup.sort();
    if let Some(last) = state.last_applied {
        state.dedup.expire(last.index);
    }
    Ok(state)
}

/// Writes `state` as a snapshot file to `out`.
fn write_records<W: std::io::Write>(state: &State, header: &Header, out: W) -> Result<W, Error> {
    let mut w = snapshot::Writer::new(out, header)?;
    for (key, value) in &state.kv {
        w.record(&Record::Kv { key: key.clone(), value: value.clone() })?;
    }
    for (id, (index, result)) in state.dedup.iter() {
        w.record(&Record::Dedup { request_id: id.to_owned(), index: *index, result: result.clone() })?;
    }
    for worker in state.workers.values() {
        w.record(&Record::Worker(worker.clone()))?;
    }
    for job in state.jobs.values() {
        w.record(&Record::Job(Box::new(job.clone())))?;
    }
    for lease in state.leases.values() {
        w.record(&Record::Lease(lease.clone()))?;
    }
    for (key, variants) in &state.gray {
        w.record(&Record::Gray { key: key.clone(), variants: variants.clone() })?;
    }
    for def in state.probe_defs.values() {
        w.record(&Record::ProbeDef(def.clone()))?;
    }
    for (probe, workers) in &state.probe_results {
        for results in workers.values() {
            w.record(&Record::ProbeResults { probe: probe.clone(), state: results.clone() })?;
        }
    }
    for (revision, change) in &state.events {
        w.record(&Record::Change { revision: *revision, change: change.clone() })?;
    }
    w.finish()
}

impl StateMachineStore {
    pub(crate) fn new(dir: DataDir) -> Result<Self, Error> {
        let pointer = dir.node_state().snapshot;
        let state = match &pointer {
            Some((meta, name)) => load(&dir.snapshot_dir().join(name), Some(meta))?,
            None => State::default(),
        };
        // Leftovers of a build or a copy that a crash interrupted.
        if let Ok(listing) = std::fs::read_dir(dir.snapshot_dir()) {
            for item in listing.flatten() {
                if item.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_file(item.path());
                }
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                applied: AtomicU64::new(state.last_applied.map(|l| l.index).unwrap_or(0)),
                revision: AtomicU64::new(state.revision),
                state: RwLock::new(state),
                snapshots_built: AtomicU64::new(0),
                snapshots_installed: AtomicU64::new(0),
                current_snapshot: Mutex::new(pointer.and_then(|(meta, _)| meta.last_log_id)),
                changed: tokio::sync::watch::channel(0).0,
            }),
            observer: None,
        })
    }

    /// Reports every apply batch's duration to `observer`.
    pub fn with_observer(mut self, observer: ApplyObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// A reader of the applied state.
    pub fn reader(&self) -> StateReader {
        StateReader { inner: self.inner.clone() }
    }

    fn apply_batch(&self, entries: &[Entry<TypeConfig>]) -> Vec<CommandResult> {
        let mut state = self.inner.state.write().unwrap_or_else(|e| e.into_inner());
        let results = state.apply(entries);
        if let Some(last) = entries.last() {
            self.inner.applied.store(last.log_id.index, Ordering::Release);
            self.inner.revision.store(state.revision, Ordering::Release);
            drop(state);
            self.inner.changed.send_replace(last.log_id.index);
        }
        results
    }

    /// Writes `state` (a copy taken at one applied log id) as a snapshot
    /// file and records it as current, unless a newer one is by now.
    fn write_snapshot(&self, state: &State) -> Result<Snapshot<TypeConfig>, Error> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let snapshot_id = match state.last_applied {
            Some(l) => format!("{}-{}-{nanos}", l.leader_id.term, l.index),
            None => format!("0-0-{nanos}"),
        };
        let meta =
            SnapshotMeta { last_log_id: state.last_applied, last_membership: state.membership.clone(), snapshot_id };
        let header = Header { meta: meta.clone(), revision: state.revision };

        let dir = self.inner.dir.snapshot_dir();
        let tmp = dir.join(format!("snap-{}.tmp", meta.snapshot_id));
        let started = Instant::now();
        let file = std::fs::File::create(&tmp).map_err(|source| Error::Snapshot { op: "create", source })?;
        let file = write_records(state, &header, file)?;
        crate::crash_point!("snapshot-build");
        file.sync_all().map_err(|source| Error::Snapshot { op: "fsync", source })?;
        drop(file);
        tracing::info!(ms = started.elapsed().as_millis() as u64, "wrote a snapshot file");
        // Opened before it is renamed (or dropped as stale), so openraft can
        // read it either way.
        let file = std::fs::File::open(&tmp).map_err(|source| Error::Snapshot { op: "open", source })?;
        if self.set_current_snapshot(&meta, &tmp)? {
            self.inner.snapshots_built.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) })
    }

    /// Renames the written file `tmp` into place as the current snapshot,
    /// records it (flushed) and deletes the other finished snapshot files.
    /// `false`, and `tmp` deleted, if the current snapshot is newer (a build
    /// that finished after an install; openraft ignores a built snapshot
    /// older than its own). One at a time, so a finished file is never
    /// deleted before it is recorded.
    fn set_current_snapshot(&self, meta: &SnapshotMeta<NodeId, BasicNode>, tmp: &Path) -> Result<bool, Error> {
        let mut current = self.inner.current_snapshot.lock().unwrap_or_else(|e| e.into_inner());
        let dir = self.inner.dir.snapshot_dir();
        if meta.last_log_id < *current {
            let _ = std::fs::remove_file(tmp);
            return Ok(false);
        }
        let name = format!("snap-{}.bin", meta.snapshot_id);
        std::fs::rename(tmp, dir.join(&name)).map_err(|source| Error::Snapshot { op: "rename", source })?;
        snapshot::sync_dir(&dir)?;
        let pointer = (meta.clone(), name.clone());
        let recorded = self.inner.dir.update_state_blocking(|s| s.snapshot = Some(pointer));
        recorded.map_err(|source| Error::Snapshot { op: "record the current snapshot", source })?;
        *current = meta.last_log_id;
        if let Ok(listing) = std::fs::read_dir(&dir) {
            for item in listing.flatten() {
                let file = item.file_name().to_string_lossy().into_owned();
                // `*.tmp` may be a build or a copy still being written.
                if file != name && file.ends_with(".bin") {
                    let _ = std::fs::remove_file(item.path());
                }
            }
        }
        Ok(true)
    }

    /// Copies a received snapshot beside the others, loads it, records it
    /// as current and only then replaces the state.
    fn install(&self, meta: &SnapshotMeta<NodeId, BasicNode>, mut received: std::fs::File) -> Result<(), Error> {
        use std::io::Seek;
        let dir = self.inner.dir.snapshot_dir();
        let tmp = dir.join(format!("snap-{}.tmp", meta.snapshot_id));
        received.seek(std::io::SeekFrom::Start(0)).map_err(|source| Error::Snapshot { op: "seek", source })?;
        {
            let mut out = std::fs::File::create(&tmp).map_err(|source| Error::Snapshot { op: "create", source })?;
            std::io::copy(&mut received, &mut out).map_err(|source| Error::Snapshot { op: "copy", source })?;
            out.sync_all().map_err(|source| Error::Snapshot { op: "fsync", source })?;
        }
        crate::crash_point!("snapshot-install");
        let next = load(&tmp, Some(meta))?;
        let (applied, revision) = (next.last_applied.map(|l| l.index).unwrap_or(0), next.revision);

        let mut state = self.inner.state.write().unwrap_or_else(|e| e.into_inner());
        // openraft installs only snapshots newer than what this node
        // applied, so this one is never older than a snapshot built here.
        self.set_current_snapshot(meta, &tmp)?;
        *state = next;
        self.inner.applied.store(applied, Ordering::Release);
        self.inner.revision.store(revision, Ordering::Release);
        drop(state);
        self.inner.changed.send_replace(applied);
        self.inner.snapshots_installed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn current_snapshot(&self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        let Some((meta, name)) = self.inner.dir.node_state().snapshot else {
            return Ok(None);
        };
        let path = self.inner.dir.snapshot_dir().join(name);
        let file = std::fs::File::open(&path).map_err(|source| Error::Snapshot { op: "open", source })?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) }))
    }
}

fn to_raft(e: Error) -> RaftStorageError {
    match e {
        Error::Snapshot { .. } => StorageIOError::write_snapshot(None, &e).into(),
        _ => StorageIOError::write_state_machine(&e).into(),
    }
}

/// Writes the copy of the state [`StateMachineStore::get_snapshot_builder`]
/// took, while applies go on.
pub struct SnapshotBuilder {
    store: StateMachineStore,
    state: Option<State>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let failed =
            |e: String| -> RaftStorageError { StorageIOError::write_snapshot(None, &std::io::Error::other(e)).into() };
        let Some(state) = self.state.take() else { return Err(failed("snapshot builder used twice".into())) };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.write_snapshot(&state).map_err(to_raft))
            .await
            .unwrap_or_else(|e| Err(failed(e.to_string())))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), RaftStorageError> {
        let state = self.inner.read();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        // The leader may have counted its own copy towards the commit before
        // syncing it (`log_sync.rs`): nothing is applied before it is.
        if let (Some(_), Some(last)) = (self.inner.dir.node_id, entries.last()) {
            self.inner
                .dir
                .log_sync
                .wait_for(last.log_id.index)
                .await
                .map_err(|e| StorageIOError::apply(last.log_id, &e))?;
        }
        let started = Instant::now();
        let results = self.apply_batch(&entries);
        if let Some(observer) = &self.observer {
            observer(started.elapsed(), entries.len());
        }
        Ok(results)
    }

    /// Copies the state (openraft runs no apply meanwhile); the file is
    /// written by [`SnapshotBuilder::build_snapshot`] while applies go on.
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let started = Instant::now();
        // O(1): the copy shares the persistent maps with the live state.
        let state = self.inner.read().clone();
        let copy_us = started.elapsed().as_micros() as u64;
        tracing::info!(copy_us, keys = state.kv.len(), "copied the state for a snapshot; applies waited");
        SnapshotBuilder { store: self.clone(), state: Some(state) }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, RaftStorageError> {
        // An anonymous file: created, opened, unlinked. It vanishes on its own
        // if the transfer is abandoned.
        let dir = self.inner.dir.snapshot_dir();
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let path = dir.join(format!("recv-{nanos}.part"));
        let io = |e: std::io::Error| RaftStorageError::from(StorageIOError::write_snapshot(None, &e));
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(io)?;
        std::fs::remove_file(&path).map_err(io)?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), RaftStorageError> {
        let file = snapshot.into_std().await;
        let this = self.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || this.install(&meta, file).map_err(to_raft))
            .await
            .unwrap_or_else(|e| Err(StorageIOError::write_snapshot(None, &std::io::Error::other(e.to_string())).into()))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        self.current_snapshot().map_err(|e| StorageIOError::read_snapshot(None, &e).into())
    }
}

impl StateReader {
    /// Index of the last applied log entry (0 before any).
    pub fn applied_index(&self) -> u64 {
        self.inner.applied.load(Ordering::Acquire)
    }

    /// Current cluster revision.
    pub fn revision(&self) -> u64 {
        self.inner.revision.load(Ordering::Acquire)
    }

    /// Snapshots this node has built since it started.
    pub fn snapshots_built(&self) -> u64 {
        self.inner.snapshots_built.load(Ordering::Relaxed)
    }

    /// Snapshots this node has installed from a leader since it started.
    pub fn snapshots_installed(&self) -> u64 {
        self.inner.snapshots_installed.load(Ordering::Relaxed)
    }

    /// A receiver that changes after every apply (value: applied index).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Every registered worker, by name.
    pub fn workers(&self) -> Result<Vec<WorkerRecord>, Error> {
        Ok(self.inner.read().workers.values().cloned().collect())
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<Option<Job>, Error> {
        Ok(self.inner.read().jobs.get(id).cloned())
    }

    /// Every job, by id.
    pub fn jobs(&self) -> Result<Vec<Job>, Error> {
        Ok(self.inner.read().jobs.values().cloned().collect())
    }

    /// Ids of the jobs no longer running, oldest finish first.
    pub fn finished_jobs(&self) -> Vec<String> {
        let state = self.inner.read();
        let mut done: Vec<(u64, &String)> = state
            .jobs
            .iter()
            .filter(|(_, j)| j.phase != crate::jobs::JobPhase::Running)
            .map(|(id, j)| (j.finished_ms, id))
            .collect();
        done.sort();
        done.into_iter().map(|(_, id)| id.clone()).collect()
    }

    /// One key, if present.
    pub fn get(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        Ok(self.inner.read().kv.get(key).map(|v| v.clone().with_key(key.to_owned())))
    }

    /// Keys starting with `prefix`, in order; at most `limit` (0 = all). The
    /// flag says whether more keys matched. One point-in-time view: no apply
    /// runs while it reads.
    pub fn list(&self, prefix: &str, limit: usize) -> Result<(Vec<KeyValue>, bool), Error> {
        let state = self.inner.read();
        let mut out = Vec::new();
        for (key, value) in with_prefix(&state.kv, prefix) {
            if limit != 0 && out.len() == limit {
                return Ok((out, true));
            }
            out.push(value.clone().with_key(key.clone()));
        }
        Ok((out, false))
    }

    /// One page of the keys starting with `prefix`: those after `after`
    /// (empty: from the first), as they were at `revision` (0: now). Pages
    /// read at one revision agree with each other ([`listing`]).
    pub fn list_page(
        &self,
        prefix: &str,
        after: &str,
        revision: u64,
        limits: PageLimits,
    ) -> Result<Result<Page, PageError>, Error> {
        Ok(listing::page(&self.inner.read(), prefix, after, revision, limits))
    }

    /// Keys starting with `prefix` and the revision they are at, read at one
    /// point in time.
    pub fn list_at_revision(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), Error> {
        let state = self.inner.read();
        let out = with_prefix(&state.kv, prefix).map(|(key, value)| value.clone().with_key(key.clone())).collect();
        Ok((out, state.revision))
    }

    /// Every lease, by id.
    pub fn leases(&self) -> Result<Vec<kv::Lease>, Error> {
        Ok(self.inner.read().leases.values().cloned().collect())
    }

    /// The gray variants of `key`.
    pub fn variants(&self, key: &str) -> Result<Vec<kv::Variant>, Error> {
        Ok(self.inner.read().gray.get(key).cloned().unwrap_or_default())
    }

    /// `key` as a reader with `labels` sees it: the matching gray variant's
    /// value if there is one (and its selector), else the main value.
    pub fn get_for(&self, key: &str, labels: &kv::Selector) -> Result<Option<(KeyValue, Option<kv::Selector>)>, Error> {
        let state = self.inner.read();
        let Some(main) = state.kv.get(key) else { return Ok(None) };
        let variants = state.gray.get(key).map(Vec::as_slice).unwrap_or_default();
        let mut kv = main.clone().with_key(key.to_owned());
        match kv::pick_variant(variants, labels) {
            Some(v) => {
                kv.value = v.value.clone();
                Ok(Some((kv, Some(v.selector.clone()))))
            }
            None => Ok(Some((kv, None))),
        }
    }

    /// Every probe definition, by name.
    pub fn probes(&self) -> Result<Vec<probes::ProbeDef>, Error> {
        Ok(self.inner.read().probe_defs.values().cloned().collect())
    }

    /// One probe definition.
    pub fn probe(&self, name: &str) -> Result<Option<probes::ProbeDef>, Error> {
        Ok(self.inner.read().probe_defs.get(name).cloned())
    }

    /// What each worker last reported for probe `name`, by worker name.
    pub fn probe_results(&self, name: &str) -> Result<Vec<probes::WorkerProbe>, Error> {
        Ok(self.inner.read().probe_results.get(name).map(|w| w.values().cloned().collect()).unwrap_or_default())
    }

    /// One lease.
    pub fn lease(&self, id: u64) -> Result<Option<kv::Lease>, Error> {
        Ok(self.inner.read().leases.get(&id).cloned())
    }

    /// `key` and the lease it is bound to (0: none), read together.
    pub fn get_with_lease(&self, key: &str) -> Result<Option<(KeyValue, u64)>, Error> {
        let state = self.inner.read();
        let lease = state.key_lease.get(key).copied().unwrap_or(0);
        Ok(state.kv.get(key).map(|v| (v.clone().with_key(key.to_owned()), lease)))
    }

    /// The newest revision whose change is no longer in the history: reads
    /// before it, and watches from it or before, are compacted.
    pub fn compacted(&self) -> Result<u64, Error> {
        Ok(self.inner.read().compacted())
    }

    /// `key` as it was at `revision` (`Ok(None)`: absent then), or
    /// `Err(compacted)` when the history no longer tells (`revision` is
    /// below the compacted revision).
    pub fn get_at(&self, key: &str, revision: u64) -> Result<Result<Option<KeyValue>, u64>, Error> {
        let state = self.inner.read();
        let compacted = state.compacted();
        if revision < compacted {
            return Ok(Err(compacted));
        }
        // Every change after `compacted` is in the window: the key's first
        // change after `revision` knows its state then; with none, its
        // current state is that state.
        let after = (key.to_owned(), revision.saturating_add(1))..=(key.to_owned(), u64::MAX);
        if let Some((_, rev)) = state.history.range(after).next() {
            let change = state
                .events
                .get(rev)
                .ok_or_else(|| Error::Corrupt { path: "history".into(), reason: format!("no change at {rev}") })?;
            return Ok(Ok(change.prev.clone().map(|v| v.with_key(key.to_owned()))));
        }
        Ok(Ok(state.kv.get(key).map(|v| v.clone().with_key(key.to_owned()))))
    }

    /// Changes to `key` still in the history, oldest first: the newest
    /// `limit` (0 = all).
    pub fn history(&self, key: &str, limit: usize) -> Result<Vec<(u64, Event)>, Error> {
        let state = self.inner.read();
        let mut out = Vec::new();
        for (_, rev) in state.history.range((key.to_owned(), 0)..=(key.to_owned(), u64::MAX)).rev() {
            if limit != 0 && out.len() == limit {
                break;
            }
            if let Some(change) = state.events.get(rev) {
                out.push((*rev, change.event.clone()));
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Changes to keys starting with `prefix` at revisions `from..=` (at
    /// most `max`, and keys and values of about `max_bytes`: the change
    /// that reaches it is the last), and the last revision looked at. The
    /// caller checks `from` against [`StateReader::compacted`] first.
    pub fn events(
        &self,
        from: u64,
        prefix: &str,
        max: usize,
        max_bytes: usize,
    ) -> Result<(Vec<(u64, Event)>, u64), Error> {
        let state = self.inner.read();
        let mut last = state.revision;
        let mut out = Vec::new();
        let mut bytes = 0;
        for (rev, change) in state.events.range(from..) {
            if out.len() == max || bytes >= max_bytes {
                last = rev - 1;
                break;
            }
            if change.event.kv.key.starts_with(prefix) {
                bytes += change.event.kv.bytes();
                out.push((*rev, change.event.clone()));
            }
        }
        Ok((out, last.max(from.saturating_sub(1))))
    }

    /// A digest of the whole state at one applied index (no apply runs
    /// while it reads).
    pub fn digest(&self) -> Result<Digest, Error> {
        let state = self.inner.read();
        let applied_index = state.last_applied.map(|l| l.index).unwrap_or(0);
        let mut hasher = blake3::Hasher::new();
        let mut part = |bytes: &[u8]| {
            hasher.update(&(bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        };
        part(&state.revision.to_be_bytes());
        for (key, v) in &state.kv {
            part(key.as_bytes());
            part(&v.value);
            for n in [v.create_revision, v.mod_revision, v.version] {
                part(&n.to_be_bytes());
            }
        }
        // The other replicated maps too, as encoded (dedup aside: it only
        // remembers answers to retried requests).
        part(&codec::encode("digest", &state.workers)?);
        part(&codec::encode("digest", &state.jobs)?);
        part(&codec::encode("digest", &state.events)?);
        part(&codec::encode("digest", &state.leases)?);
        part(&codec::encode("digest", &state.key_lease)?);
        part(&codec::encode("digest", &state.gray)?);
        part(&codec::encode("digest", &state.probe_defs)?);
        part(&codec::encode("digest", &state.probe_results)?);
        let keys = state.kv.len() as u64;
        Ok(Digest { applied_index, revision: state.revision, keys, hex: hasher.finalize().to_hex().to_string() })
    }
}

/// The entries of `map` whose keys start with `prefix`, in order.
fn with_prefix<'a, V>(
    map: &'a imbl::OrdMap<String, V>,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a String, &'a V)> + 'a {
    map.range::<_, str>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
        .take_while(move |(key, _)| key.starts_with(prefix))
}

#[cfg(test)]
mod tests;
