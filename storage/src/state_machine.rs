//! The replicated state machine on sled (`RaftStateMachine`), and the read
//! side the scheduler serves from ([`StateReader`]).
//!
//! State lives in one *generation* of sled trees (`sm<N>_meta`, `sm<N>_kv`,
//! `sm<N>_dedup`). `apply` changes a generation in one sled transaction, so the
//! last applied log id, the revision and the keys never disagree. Installing a
//! snapshot loads it into generation N+1 and then flips the `sm_generation`
//! pointer, so a crash mid-install leaves the old state intact.
//!
//! Apply never reads clocks or randomness: its result depends only on the
//! entries and the prior state. Applied state is not flushed on every apply:
//! the log is durable, and after a crash openraft re-applies entries past the
//! last applied id that reached disk. `purge` flushes the whole database before
//! deleting entries, so the state covering a purged prefix is always on disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{BasicNode, Entry, EntryPayload, LogId, OptionalSend, SnapshotMeta, StorageIOError, StoredMembership};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;

use crate::codec;
use crate::command::{Command, CommandResult, Op};
use crate::db::DataDir;
use crate::error::Error;
use crate::jobs::{Job, WorkerRecord};
use crate::kv::{self, Compare, Event, EventKind, KeyValue, StoredValue, TxnOp};
use crate::probes;
use crate::snapshot::{self, Header, Record};
use crate::{NodeId, RaftStorageError, TypeConfig};

/// A request id is remembered for this many log entries after it was applied.
pub const DEDUP_WINDOW: u64 = 100_000;
const PRUNE_EVERY: u64 = 10_000;

const KEY_GENERATION: &[u8] = b"sm_generation";
const KEY_SNAPSHOT: &[u8] = b"snapshot";
const KEY_LAST_APPLIED: &[u8] = b"last_applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
const KEY_REVISION: &[u8] = b"revision";

type Membership = StoredMembership<NodeId, BasicNode>;

/// Called with the time each `apply` batch took (for the latency histogram).
pub type ApplyObserver = Arc<dyn Fn(Duration, usize) + Send + Sync>;

#[derive(Clone, Debug)]
struct Trees {
    generation: u64,
    meta: sled::Tree,
    kv: sled::Tree,
    dedup: sled::Tree,
    workers: sled::Tree,
    jobs: sled::Tree,
    /// revision (big-endian) -> [`Change`]: the change made at it and the
    /// key's state before it.
    events: sled::Tree,
    /// [`kv::history_key`] (key, revision) -> nothing: each key's changes.
    history: sled::Tree,
    /// lease id (big-endian) -> [`kv::Lease`].
    leases: sled::Tree,
    /// key -> the lease (big-endian id) it is bound to.
    key_lease: sled::Tree,
    /// key -> its gray variants (`Vec<kv::Variant>`).
    gray: sled::Tree,
    /// Probe definitions and results (see [`crate::probes`]).
    probes: sled::Tree,
}

const TREE_NAMES: [&str; 11] =
    ["meta", "kv", "dedup", "workers", "jobs", "events", "history", "leases", "key_lease", "gray", "probes"];

/// One change in the history window, with the key's state just before it
/// (`None`: absent). The first change after a revision R therefore says
/// what the key was at R, so reads inside the window need nothing else once
/// older changes are compacted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Change {
    pub(crate) event: Event,
    pub(crate) prev: Option<StoredValue>,
}

impl Trees {
    fn open(dir: &DataDir, generation: u64) -> Result<Self, Error> {
        Ok(Self {
            generation,
            meta: dir.tree(&format!("sm{generation}_meta"))?,
            kv: dir.tree(&format!("sm{generation}_kv"))?,
            dedup: dir.tree(&format!("sm{generation}_dedup"))?,
            workers: dir.tree(&format!("sm{generation}_workers"))?,
            jobs: dir.tree(&format!("sm{generation}_jobs"))?,
            events: dir.tree(&format!("sm{generation}_events"))?,
            history: dir.tree(&format!("sm{generation}_history"))?,
            leases: dir.tree(&format!("sm{generation}_leases"))?,
            key_lease: dir.tree(&format!("sm{generation}_key_lease"))?,
            gray: dir.tree(&format!("sm{generation}_gray"))?,
            probes: dir.tree(&format!("sm{generation}_probes"))?,
        })
    }

    fn drop_from(self, dir: &DataDir) {
        for name in TREE_NAMES {
            let _ = dir.db.drop_tree(format!("sm{}_{name}", self.generation));
        }
    }
}

struct Inner {
    dir: DataDir,
    trees: RwLock<Trees>,
    /// Readers hold it shared, `apply` and `install` exclusively, so a listing
    /// or digest is one point-in-time view and never meets a dropped tree.
    view: RwLock<()>,
    applied: AtomicU64,
    revision: AtomicU64,
    snapshots_built: AtomicU64,
    snapshots_installed: AtomicU64,
    /// Bumped (to the applied index) after every apply or install, so job
    /// watchers wake up.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Inner {
    fn trees(&self) -> Trees {
        // A poisoned lock only means a panic elsewhere; the trees are still valid.
        self.trees.read().unwrap_or_else(|e| e.into_inner()).clone()
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

fn sled_err(op: &'static str) -> impl Fn(sled::Error) -> Error {
    move |source| Error::Sled { op, source }
}

fn read_value<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    key: &[u8],
    what: &'static str,
) -> Result<Option<T>, Error> {
    match tree.get(key).map_err(sled_err("read"))? {
        Some(raw) => Ok(Some(codec::decode(what, &raw)?)),
        None => Ok(None),
    }
}

impl StateMachineStore {
    pub(crate) fn new(dir: DataDir) -> Result<Self, Error> {
        let generation: u64 = read_value(&dir.meta, KEY_GENERATION, "sm generation")?.unwrap_or(0);
        let trees = Trees::open(&dir, generation)?;
        let last_applied: Option<LogId<NodeId>> = read_value(&trees.meta, KEY_LAST_APPLIED, "last applied")?.flatten();
        let revision: u64 = read_value(&trees.meta, KEY_REVISION, "revision")?.unwrap_or(0);
        // Leftovers of an install that crashed before the pointer flipped.
        for name in dir.db.tree_names() {
            let name = String::from_utf8_lossy(&name).into_owned();
            if let Some(rest) = name.strip_prefix("sm") {
                let gen = rest.split('_').next().and_then(|g| g.parse::<u64>().ok());
                if gen.is_some_and(|g| g != generation) {
                    let _ = dir.db.drop_tree(name.as_bytes());
                }
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                trees: RwLock::new(trees),
                view: RwLock::new(()),
                applied: AtomicU64::new(last_applied.map(|l| l.index).unwrap_or(0)),
                revision: AtomicU64::new(revision),
                snapshots_built: AtomicU64::new(0),
                snapshots_installed: AtomicU64::new(0),
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

    fn apply_batch(&self, entries: &[Entry<TypeConfig>]) -> Result<Vec<CommandResult>, Error> {
        let _exclusive = self.inner.view.write().unwrap_or_else(|e| e.into_inner());
        let trees = self.inner.trees();
        let all = (
            &trees.meta,
            &trees.kv,
            &trees.dedup,
            &trees.workers,
            &trees.jobs,
            &trees.events,
            &trees.history,
            &trees.leases,
            &trees.key_lease,
            &trees.gray,
            &trees.probes,
        );
        let result =
            all.transaction(|(meta, kv, dedup, workers, jobs, events, history, leases, key_lease, gray, probes)| {
                let tx = Tx { kv, dedup, workers, jobs, events, history, leases, key_lease, gray, probes };
                let mut revision: u64 = tx_read(meta, KEY_REVISION, "revision")?.unwrap_or(0);
                let mut results = Vec::with_capacity(entries.len());
                let mut membership = None;
                for entry in entries {
                    match &entry.payload {
                        EntryPayload::Blank => results.push(CommandResult::None),
                        EntryPayload::Membership(m) => {
                            membership = Some(StoredMembership::new(Some(entry.log_id), m.clone()));
                            results.push(CommandResult::None);
                        }
                        EntryPayload::Normal(cmd) => {
                            results.push(apply_command(&tx, &mut revision, entry.log_id.index, cmd)?)
                        }
                    }
                }
                if let Some(last) = entries.last() {
                    tx_write(meta, KEY_LAST_APPLIED, &Some(last.log_id), "last applied")?;
                }
                if let Some(m) = membership {
                    tx_write(meta, KEY_MEMBERSHIP, &m, "membership")?;
                }
                tx_write(meta, KEY_REVISION, &revision, "revision")?;
                Ok((results, revision))
            });
        let (results, revision) = result.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(source) => Error::Sled { op: "apply", source },
        })?;
        if let Some(last) = entries.last() {
            self.inner.applied.store(last.log_id.index, Ordering::Release);
            self.inner.revision.store(revision, Ordering::Release);
            let (first, now) = (entries[0].log_id.index, last.log_id.index);
            if now / PRUNE_EVERY != first.saturating_sub(1) / PRUNE_EVERY {
                prune_dedup(&trees.dedup, now)?;
            }
            self.inner.changed.send_replace(now);
        }
        Ok(results)
    }

    /// Writes a snapshot file of the current state. Runs while openraft holds
    /// the state machine (no apply in between), which makes it point-in-time.
    fn write_snapshot(&self) -> Result<Snapshot<TypeConfig>, Error> {
        let trees = self.inner.trees();
        let last_log_id: Option<LogId<NodeId>> = read_value(&trees.meta, KEY_LAST_APPLIED, "last applied")?.flatten();
        let last_membership: Membership = read_value(&trees.meta, KEY_MEMBERSHIP, "membership")?.unwrap_or_default();
        let revision: u64 = read_value(&trees.meta, KEY_REVISION, "revision")?.unwrap_or(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}-{nanos}", l.leader_id.term, l.index),
            None => format!("0-0-{nanos}"),
        };
        let meta = SnapshotMeta { last_log_id, last_membership, snapshot_id };
        let header = Header { meta: meta.clone(), revision };

        let dir = self.inner.dir.snapshot_dir();
        let tmp = dir.join(format!("snap-{}.tmp", meta.snapshot_id));
        let file = std::fs::File::create(&tmp).map_err(|source| Error::Snapshot { op: "create", source })?;
        let mut w = snapshot::Writer::new(file, &header)?;
        for item in trees.kv.iter() {
            let (key, raw) = item.map_err(sled_err("read kv"))?;
            let key = String::from_utf8_lossy(&key).into_owned();
            w.record(&Record::Kv { key, value: codec::decode("kv value", &raw)? })?;
        }
        for item in trees.dedup.iter() {
            let (id, raw) = item.map_err(sled_err("read dedup"))?;
            let (index, result): (u64, CommandResult) = codec::decode("dedup entry", &raw)?;
            w.record(&Record::Dedup { request_id: String::from_utf8_lossy(&id).into_owned(), index, result })?;
        }
        for item in trees.workers.iter() {
            let (_, raw) = item.map_err(sled_err("read workers"))?;
            w.record(&Record::Worker(codec::decode("worker", &raw)?))?;
        }
        for item in trees.jobs.iter() {
            let (_, raw) = item.map_err(sled_err("read jobs"))?;
            w.record(&Record::Job(Box::new(codec::decode("job", &raw)?)))?;
        }
        for item in trees.leases.iter() {
            let (_, raw) = item.map_err(sled_err("read leases"))?;
            w.record(&Record::Lease(codec::decode("lease", &raw)?))?;
        }
        for item in trees.gray.iter() {
            let (key, raw) = item.map_err(sled_err("read gray"))?;
            let key = String::from_utf8_lossy(&key).into_owned();
            w.record(&Record::Gray { key, variants: codec::decode("gray variants", &raw)? })?;
        }
        for item in trees.probes.scan_prefix(b"d/") {
            let (_, raw) = item.map_err(sled_err("read probes"))?;
            w.record(&Record::ProbeDef(codec::decode("probe", &raw)?))?;
        }
        for item in trees.probes.scan_prefix(b"r/") {
            let (key, raw) = item.map_err(sled_err("read probes"))?;
            let probe = key[2..].split(|b| *b == 0).next().unwrap_or_default();
            let probe = String::from_utf8_lossy(probe).into_owned();
            w.record(&Record::ProbeResults { probe, state: codec::decode("probe results", &raw)? })?;
        }
        for item in trees.events.iter() {
            let (rev, raw) = item.map_err(sled_err("read events"))?;
            let revision = rev_of(&rev)?;
            w.record(&Record::Change { revision, change: codec::decode("change", &raw)? })?;
        }
        let file = w.finish()?;
        file.sync_all().map_err(|source| Error::Snapshot { op: "fsync", source })?;
        drop(file);
        let name = format!("snap-{}.bin", meta.snapshot_id);
        std::fs::rename(&tmp, dir.join(&name)).map_err(|source| Error::Snapshot { op: "rename", source })?;
        snapshot::sync_dir(&dir)?;
        self.set_current_snapshot(&meta, &name, None)?;
        self.inner.snapshots_built.fetch_add(1, Ordering::Relaxed);
        let file = std::fs::File::open(dir.join(&name)).map_err(|source| Error::Snapshot { op: "open", source })?;
        Ok(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) })
    }

    /// Records `name` as the current snapshot (and, after an install, the
    /// new state generation, in the same flushed batch), then deletes every
    /// other snapshot file.
    fn set_current_snapshot(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        name: &str,
        generation: Option<u64>,
    ) -> Result<(), Error> {
        let mut batch = sled::Batch::default();
        batch.insert(KEY_SNAPSHOT, codec::encode("snapshot pointer", &(meta, name))?);
        if let Some(g) = generation {
            batch.insert(KEY_GENERATION, codec::encode("sm generation", &g)?);
        }
        self.inner.dir.meta.apply_batch(batch).map_err(sled_err("record snapshot"))?;
        self.inner.dir.db.flush().map_err(sled_err("flush"))?;
        let dir = self.inner.dir.snapshot_dir();
        if let Ok(listing) = std::fs::read_dir(&dir) {
            for item in listing.flatten() {
                if item.file_name().to_string_lossy() != name {
                    let _ = std::fs::remove_file(item.path());
                }
            }
        }
        Ok(())
    }

    /// Copies a received snapshot into place, loads it into a fresh generation
    /// and flips the generation pointer.
    fn install(&self, meta: &SnapshotMeta<NodeId, BasicNode>, mut received: std::fs::File) -> Result<(), Error> {
        use std::io::Seek;
        let dir = self.inner.dir.snapshot_dir();
        let name = format!("snap-{}.bin", meta.snapshot_id);
        let tmp = dir.join(format!("snap-{}.tmp", meta.snapshot_id));
        received.seek(std::io::SeekFrom::Start(0)).map_err(|source| Error::Snapshot { op: "seek", source })?;
        {
            let mut out = std::fs::File::create(&tmp).map_err(|source| Error::Snapshot { op: "create", source })?;
            std::io::copy(&mut received, &mut out).map_err(|source| Error::Snapshot { op: "copy", source })?;
            out.sync_all().map_err(|source| Error::Snapshot { op: "fsync", source })?;
        }
        std::fs::rename(&tmp, dir.join(&name)).map_err(|source| Error::Snapshot { op: "rename", source })?;
        snapshot::sync_dir(&dir)?;

        let file = std::fs::File::open(dir.join(&name)).map_err(|source| Error::Snapshot { op: "open", source })?;
        let (mut reader, header) = snapshot::Reader::new(file)?;
        let old = self.inner.trees();
        let next = Trees::open(&self.inner.dir, old.generation + 1)?;
        for tree in [
            &next.meta,
            &next.kv,
            &next.dedup,
            &next.workers,
            &next.jobs,
            &next.events,
            &next.history,
            &next.leases,
            &next.key_lease,
            &next.gray,
            &next.probes,
        ] {
            tree.clear().map_err(sled_err("clear"))?;
        }
        let mut batch_kv = sled::Batch::default();
        let mut batch_dedup = sled::Batch::default();
        // Loaded in batches bounded by count and bytes, so memory stays flat.
        let (mut pending, mut pending_bytes) = (0usize, 0usize);
        while let Some(record) = reader.next_record()? {
            match record {
                Record::Kv { key, value } => {
                    let raw = codec::encode("kv value", &value)?;
                    pending_bytes += key.len() + raw.len();
                    batch_kv.insert(key.as_bytes(), raw);
                }
                Record::Dedup { request_id, index, result } => {
                    pending_bytes += request_id.len() + 64;
                    batch_dedup.insert(request_id.as_bytes(), codec::encode("dedup entry", &(index, result))?);
                }
                Record::Worker(w) => {
                    let raw = codec::encode("worker", &w)?;
                    pending_bytes += raw.len();
                    next.workers.insert(w.name.as_bytes(), raw).map_err(sled_err("load workers"))?;
                }
                Record::Job(j) => {
                    let raw = codec::encode("job", &j)?;
                    pending_bytes += raw.len();
                    next.jobs.insert(j.id.as_bytes(), raw).map_err(sled_err("load jobs"))?;
                }
                Record::Change { revision, change } => {
                    let raw = codec::encode("change", &change)?;
                    pending_bytes += raw.len();
                    next.events.insert(revision.to_be_bytes(), raw).map_err(sled_err("load events"))?;
                    next.history
                        .insert(kv::history_key(&change.event.kv.key, revision), &[])
                        .map_err(sled_err("load history"))?;
                }
                Record::Lease(lease) => {
                    let raw = codec::encode("lease", &lease)?;
                    pending_bytes += raw.len();
                    for key in &lease.keys {
                        next.key_lease
                            .insert(key.as_bytes(), &lease.id.to_be_bytes())
                            .map_err(sled_err("load leases"))?;
                    }
                    next.leases.insert(lease.id.to_be_bytes(), raw).map_err(sled_err("load leases"))?;
                }
                Record::Gray { key, variants } => {
                    let raw = codec::encode("gray variants", &variants)?;
                    pending_bytes += raw.len();
                    next.gray.insert(key.as_bytes(), raw).map_err(sled_err("load gray"))?;
                }
                Record::ProbeDef(def) => {
                    let raw = codec::encode("probe", &def)?;
                    pending_bytes += raw.len();
                    next.probes.insert(probes::def_key(&def.name), raw).map_err(sled_err("load probes"))?;
                }
                Record::ProbeResults { probe, state } => {
                    let raw = codec::encode("probe results", &state)?;
                    pending_bytes += raw.len();
                    let key = probes::workers_key(&probe);
                    let mut workers: Vec<String> = read_value(&next.probes, &key, "probe workers")?.unwrap_or_default();
                    if let Err(at) = workers.binary_search(&state.worker) {
                        workers.insert(at, state.worker.clone());
                    }
                    next.probes
                        .insert(key, codec::encode("probe workers", &workers)?)
                        .map_err(sled_err("load probes"))?;
                    let key = probes::results_key(&probe, &state.worker);
                    next.probes.insert(key, raw).map_err(sled_err("load probes"))?;
                }
                Record::OldEvent | Record::OldBase => {
                    return Err(Error::Corrupt {
                        path: dir.join(&name),
                        reason: "a snapshot of data format 1 (before this version's key history); \
                                 upgrade every scheduler before installing snapshots"
                            .into(),
                    })
                }
                Record::End { .. } => {}
            }
            pending += 1;
            if pending == 1000 || pending_bytes >= 16 * 1024 * 1024 {
                next.kv.apply_batch(std::mem::take(&mut batch_kv)).map_err(sled_err("load kv"))?;
                next.dedup.apply_batch(std::mem::take(&mut batch_dedup)).map_err(sled_err("load dedup"))?;
                (pending, pending_bytes) = (0, 0);
            }
        }
        next.kv.apply_batch(batch_kv).map_err(sled_err("load kv"))?;
        next.dedup.apply_batch(batch_dedup).map_err(sled_err("load dedup"))?;
        // The meta openraft hands us is authoritative for log id and membership.
        let put = |key: &[u8], raw: Vec<u8>| next.meta.insert(key, raw).map(|_| ()).map_err(sled_err("load meta"));
        put(KEY_LAST_APPLIED, codec::encode("last applied", &meta.last_log_id)?)?;
        put(KEY_MEMBERSHIP, codec::encode("membership", &meta.last_membership)?)?;
        put(KEY_REVISION, codec::encode("revision", &header.revision)?)?;
        self.inner.dir.db.flush().map_err(sled_err("flush"))?;

        // The switch: generation and snapshot pointers in one flushed batch,
        // so a restart never pairs the new state with an older snapshot.
        let _exclusive = self.inner.view.write().unwrap_or_else(|e| e.into_inner());
        let generation = next.generation;
        self.set_current_snapshot(meta, &name, Some(generation))?;
        *self.inner.trees.write().unwrap_or_else(|e| e.into_inner()) = next;
        old.drop_from(&self.inner.dir);
        self.inner.applied.store(meta.last_log_id.map(|l| l.index).unwrap_or(0), Ordering::Release);
        self.inner.revision.store(header.revision, Ordering::Release);
        self.inner.changed.send_replace(meta.last_log_id.map(|l| l.index).unwrap_or(0));
        self.inner.snapshots_installed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn current_snapshot(&self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        let Some((meta, name)): Option<(SnapshotMeta<NodeId, BasicNode>, String)> =
            read_value(&self.inner.dir.meta, KEY_SNAPSHOT, "snapshot pointer")?
        else {
            return Ok(None);
        };
        let path = self.inner.dir.snapshot_dir().join(name);
        let file = std::fs::File::open(&path).map_err(|source| Error::Snapshot { op: "open", source })?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) }))
    }
}

fn abort(e: Error) -> ConflictableTransactionError<Error> {
    ConflictableTransactionError::Abort(e)
}

fn tx_read<T: serde::de::DeserializeOwned>(
    tree: &TransactionalTree,
    key: &[u8],
    what: &'static str,
) -> Result<Option<T>, ConflictableTransactionError<Error>> {
    match tree.get(key)? {
        Some(raw) => Ok(Some(codec::decode(what, &raw).map_err(|e| abort(e.into()))?)),
        None => Ok(None),
    }
}

fn tx_write<T: serde::Serialize>(
    tree: &TransactionalTree,
    key: &[u8],
    value: &T,
    what: &'static str,
) -> Result<(), ConflictableTransactionError<Error>> {
    tree.insert(key, codec::encode(what, value).map_err(|e| abort(e.into()))?)?;
    Ok(())
}

/// The trees one apply transaction works on.
struct Tx<'a> {
    kv: &'a TransactionalTree,
    dedup: &'a TransactionalTree,
    workers: &'a TransactionalTree,
    jobs: &'a TransactionalTree,
    events: &'a TransactionalTree,
    history: &'a TransactionalTree,
    leases: &'a TransactionalTree,
    key_lease: &'a TransactionalTree,
    gray: &'a TransactionalTree,
    probes: &'a TransactionalTree,
}

type TxResult<T> = Result<T, ConflictableTransactionError<Error>>;

fn rev_of(raw: &[u8]) -> Result<u64, Error> {
    raw.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| Error::Corrupt { path: "events".into(), reason: "an event key is not 8 bytes".into() })
}

impl Tx<'_> {
    /// Records the change made at `revision` (and the key's state before
    /// it), and compacts the change that falls out of the history window
    /// (one in, one out).
    fn record(&self, revision: u64, event: Event, prev: Option<StoredValue>) -> TxResult<()> {
        self.history.insert(kv::history_key(&event.kv.key, revision), &[])?;
        tx_write(self.events, &revision.to_be_bytes(), &Change { event, prev }, "change")?;
        if revision > kv::HISTORY_REVISIONS {
            let old = revision - kv::HISTORY_REVISIONS;
            if let Some(raw) = self.events.remove(&old.to_be_bytes())? {
                let gone: Change = codec::decode("change", &raw).map_err(|e| abort(e.into()))?;
                self.history.remove(kv::history_key(&gone.event.kv.key, old))?;
            }
        }
        Ok(())
    }

    /// Binds `key` to `lease` (0: to none), unbinding it from any other.
    fn bind(&self, key: &str, lease: u64) -> TxResult<()> {
        let old =
            self.key_lease.get(key.as_bytes())?.and_then(|raw| raw.as_ref().try_into().ok().map(u64::from_be_bytes));
        if old == Some(lease) || (old.is_none() && lease == 0) {
            return Ok(());
        }
        if let Some(old) = old {
            if let Some(mut l) = tx_read::<kv::Lease>(self.leases, &old.to_be_bytes(), "lease")? {
                l.keys.retain(|k| k != key);
                tx_write(self.leases, &old.to_be_bytes(), &l, "lease")?;
            }
            self.key_lease.remove(key.as_bytes())?;
        }
        if lease != 0 {
            if let Some(mut l) = tx_read::<kv::Lease>(self.leases, &lease.to_be_bytes(), "lease")? {
                l.keys.push(key.to_owned());
                tx_write(self.leases, &lease.to_be_bytes(), &l, "lease")?;
                self.key_lease.insert(key.as_bytes(), &lease.to_be_bytes())?;
            }
        }
        Ok(())
    }

    fn put(&self, revision: &mut u64, key: &str, value: &[u8]) -> TxResult<StoredValue> {
        // A plain put unbinds the key from its lease, as in etcd.
        self.bind(key, 0)?;
        self.put_value(revision, key, value)
    }

    fn put_value(&self, revision: &mut u64, key: &str, value: &[u8]) -> TxResult<StoredValue> {
        let prev: Option<StoredValue> = tx_read(self.kv, key.as_bytes(), "kv value")?;
        *revision += 1;
        let stored = StoredValue {
            value: value.to_vec(),
            create_revision: prev.as_ref().map(|p| p.create_revision).unwrap_or(*revision),
            mod_revision: *revision,
            version: prev.as_ref().map(|p| p.version + 1).unwrap_or(1),
        };
        tx_write(self.kv, key.as_bytes(), &stored, "kv value")?;
        self.record(*revision, Event { kind: EventKind::Put, kv: stored.clone().with_key(key.to_owned()) }, prev)?;
        Ok(stored)
    }

    fn delete(&self, revision: &mut u64, key: &str) -> TxResult<bool> {
        let Some(raw) = self.kv.remove(key.as_bytes())? else {
            return Ok(false);
        };
        let prev: StoredValue = codec::decode("kv value", &raw).map_err(|e| abort(e.into()))?;
        self.bind(key, 0)?;
        // A deleted key's gray variants go with it.
        self.gray.remove(key.as_bytes())?;
        *revision += 1;
        let kv =
            KeyValue { key: key.to_owned(), value: vec![], create_revision: 0, mod_revision: *revision, version: 0 };
        self.record(*revision, Event { kind: EventKind::Delete, kv }, Some(prev))?;
        Ok(true)
    }

    /// The first compare that does not hold, in words.
    fn failed_compare(&self, compares: &[Compare]) -> TxResult<Option<String>> {
        for c in compares {
            match c {
                Compare::ModRevision { key, revision } => {
                    match tx_read::<StoredValue>(self.kv, key.as_bytes(), "kv value")? {
                        None => return Ok(Some(format!("key {key} does not exist"))),
                        Some(v) if v.mod_revision != *revision => {
                            return Ok(Some(format!("key {key} has mod revision {}, not {revision}", v.mod_revision)))
                        }
                        Some(_) => {}
                    }
                }
                Compare::Absent { key } => {
                    if let Some(v) = tx_read::<StoredValue>(self.kv, key.as_bytes(), "kv value")? {
                        return Ok(Some(format!("key {key} exists (mod revision {})", v.mod_revision)));
                    }
                }
            }
        }
        Ok(None)
    }
}

/// Applies one command. Deterministic: depends only on the command, the index
/// and the state.
fn apply_command(
    tx: &Tx<'_>,
    revision: &mut u64,
    index: u64,
    cmd: &Command,
) -> Result<CommandResult, ConflictableTransactionError<Error>> {
    let dedup = tx.dedup;
    if !cmd.request_id.is_empty() {
        if let Some((seen_at, result)) =
            tx_read::<(u64, CommandResult)>(dedup, cmd.request_id.as_bytes(), "dedup entry")?
        {
            if seen_at + DEDUP_WINDOW >= index {
                return Ok(result);
            }
        }
    }
    if let Op::Batch(commands) = &cmd.op {
        // Each member is deduplicated and validated on its own, so one bad
        // command rejects only itself.
        let mut results = Vec::with_capacity(commands.len());
        for c in commands {
            results.push(match c.op {
                Op::Batch(_) => CommandResult::Rejected { reason: "op: a batch must not contain a batch".into() },
                _ => apply_command(tx, revision, index, c)?,
            });
        }
        return Ok(CommandResult::Batch(results));
    }
    let result = match cmd.validate() {
        Err(reason) => CommandResult::Rejected { reason },
        Ok(()) => match &cmd.op {
            Op::Put { key, value } => {
                let stored = tx.put(revision, key, value)?;
                CommandResult::Put {
                    revision: *revision,
                    create_revision: stored.create_revision,
                    version: stored.version,
                }
            }
            Op::Delete { key } => {
                let deleted = tx.delete(revision, key)?;
                CommandResult::Delete { revision: *revision, deleted }
            }
            Op::LeaseGrant { id, ttl_ms } => {
                if tx.leases.get(id.to_be_bytes())?.is_some() {
                    CommandResult::Rejected { reason: format!("id: lease {id} exists already") }
                } else {
                    let lease = kv::Lease { id: *id, ttl_ms: *ttl_ms, keys: vec![] };
                    tx_write(tx.leases, &id.to_be_bytes(), &lease, "lease")?;
                    CommandResult::LeaseGranted { id: *id, ttl_ms: *ttl_ms }
                }
            }
            Op::LeaseRevoke { ids } => {
                let mut revoked = Vec::new();
                for id in ids {
                    let Some(lease) = tx_read::<kv::Lease>(tx.leases, &id.to_be_bytes(), "lease")? else { continue };
                    for key in &lease.keys {
                        tx.key_lease.remove(key.as_bytes())?;
                        tx.delete(revision, key)?;
                    }
                    tx.leases.remove(&id.to_be_bytes())?;
                    revoked.push(*id);
                }
                CommandResult::LeasesRevoked { revision: *revision, revoked }
            }
            Op::GraySet { key, selector, value } => {
                let mut variants: Vec<kv::Variant> =
                    tx_read(tx.gray, key.as_bytes(), "gray variants")?.unwrap_or_default();
                let variant = kv::Variant { selector: selector.clone(), value: value.clone(), revision: *revision };
                let at = variants.iter().position(|v| v.selector == *selector);
                if at.is_none() && variants.len() >= kv::MAX_VARIANTS {
                    CommandResult::Rejected {
                        reason: format!("selector: key {key} has {} variants already", kv::MAX_VARIANTS),
                    }
                } else {
                    match at {
                        Some(i) => variants[i] = variant,
                        None => variants.push(variant),
                    }
                    tx_write(tx.gray, key.as_bytes(), &variants, "gray variants")?;
                    CommandResult::Done
                }
            }
            Op::GrayPromote { key, selector } => {
                let mut variants: Vec<kv::Variant> =
                    tx_read(tx.gray, key.as_bytes(), "gray variants")?.unwrap_or_default();
                let at = if selector.is_empty() && variants.len() == 1 {
                    Some(0)
                } else {
                    variants.iter().position(|v| v.selector == *selector)
                };
                match at {
                    None => CommandResult::Rejected {
                        reason: if selector.is_empty() && variants.len() > 1 {
                            format!("selector: key {key} has {} variants; name one", variants.len())
                        } else {
                            format!("selector: key {key} has no variant for '{}'", kv::selector_text(selector))
                        },
                    },
                    Some(i) => {
                        let variant = variants.remove(i);
                        tx.bind(key, 0)?;
                        let stored = tx.put_value(revision, key, &variant.value)?;
                        if variants.is_empty() {
                            tx.gray.remove(key.as_bytes())?;
                        } else {
                            tx_write(tx.gray, key.as_bytes(), &variants, "gray variants")?;
                        }
                        CommandResult::Put {
                            revision: *revision,
                            create_revision: stored.create_revision,
                            version: stored.version,
                        }
                    }
                }
            }
            Op::GrayDrop { key, selector } => {
                let mut variants: Vec<kv::Variant> =
                    tx_read(tx.gray, key.as_bytes(), "gray variants")?.unwrap_or_default();
                let before = variants.len();
                variants.retain(|v| !selector.is_empty() && v.selector != *selector);
                if variants.len() == before {
                    CommandResult::Rejected {
                        reason: format!("selector: key {key} has no variant for '{}'", kv::selector_text(selector)),
                    }
                } else {
                    if variants.is_empty() {
                        tx.gray.remove(key.as_bytes())?;
                    } else {
                        tx_write(tx.gray, key.as_bytes(), &variants, "gray variants")?;
                    }
                    CommandResult::Done
                }
            }
            Op::ProbeDefine(def) => {
                // Results are per target index and selected worker: with
                // other targets or workers they would describe the wrong ones.
                let old: Option<probes::ProbeDef> = tx_read(tx.probes, &probes::def_key(&def.name), "probe")?;
                if old.is_some_and(|o| o.targets != def.targets || o.selector != def.selector) {
                    let workers: Vec<String> =
                        tx_read(tx.probes, &probes::workers_key(&def.name), "probe workers")?.unwrap_or_default();
                    for w in workers {
                        tx.probes.remove(probes::results_key(&def.name, &w))?;
                    }
                    tx.probes.remove(probes::workers_key(&def.name))?;
                }
                tx_write(tx.probes, &probes::def_key(&def.name), def, "probe")?;
                CommandResult::Done
            }
            Op::ProbeDelete { name } => {
                if tx.probes.remove(probes::def_key(name))?.is_none() {
                    CommandResult::Rejected { reason: format!("name: no probe named {name}") }
                } else {
                    let workers: Vec<String> =
                        tx_read(tx.probes, &probes::workers_key(name), "probe workers")?.unwrap_or_default();
                    for w in workers {
                        tx.probes.remove(probes::results_key(name, &w))?;
                    }
                    tx.probes.remove(probes::workers_key(name))?;
                    CommandResult::Done
                }
            }
            Op::ProbeReport { probe, state } => {
                if tx.probes.get(probes::def_key(probe))?.is_none() {
                    CommandResult::Rejected { reason: format!("probe: no probe named {probe}") }
                } else {
                    let results = probes::results_key(probe, &state.worker);
                    // Only a worker's first report touches the (sorted) list.
                    if tx.probes.get(&results)?.is_none() {
                        let key = probes::workers_key(probe);
                        let mut workers: Vec<String> = tx_read(tx.probes, &key, "probe workers")?.unwrap_or_default();
                        if let Err(at) = workers.binary_search(&state.worker) {
                            workers.insert(at, state.worker.clone());
                            tx_write(tx.probes, &key, &workers, "probe workers")?;
                        }
                    }
                    tx_write(tx.probes, &results, state, "probe results")?;
                    CommandResult::Done
                }
            }
            Op::PutLeased { key, value, lease } => {
                if tx.leases.get(lease.to_be_bytes())?.is_none() {
                    CommandResult::Rejected { reason: format!("lease: unknown lease id {lease}") }
                } else {
                    tx.bind(key, *lease)?;
                    let stored = tx.put_value(revision, key, value)?;
                    CommandResult::Put {
                        revision: *revision,
                        create_revision: stored.create_revision,
                        version: stored.version,
                    }
                }
            }
            Op::Txn(txn) => {
                let failed = tx.failed_compare(&txn.compares)?;
                let ops = if failed.is_none() { &txn.success } else { &txn.failure };
                for op in ops {
                    match op {
                        TxnOp::Put { key, value } => {
                            tx.put(revision, key, value)?;
                        }
                        TxnOp::Delete { key } => {
                            tx.delete(revision, key)?;
                        }
                        TxnOp::PutLeased { key, value, lease } => {
                            if tx.leases.get(lease.to_be_bytes())?.is_some() {
                                tx.bind(key, *lease)?;
                                tx.put_value(revision, key, value)?;
                            }
                        }
                    }
                }
                CommandResult::Txn {
                    succeeded: failed.is_none(),
                    revision: *revision,
                    failed: failed.unwrap_or_default(),
                }
            }
            Op::Batch(_) => CommandResult::Rejected { reason: "op: nested batch".into() },
            Op::RegisterWorker(w) => {
                tx_write(tx.workers, w.name.as_bytes(), w, "worker")?;
                CommandResult::Done
            }
            Op::CreateJob(job) => {
                if tx.jobs.get(job.id.as_bytes())?.is_some() {
                    CommandResult::Rejected { reason: format!("job id: {} exists already", job.id) }
                } else {
                    tx_write(tx.jobs, job.id.as_bytes(), job, "job")?;
                    CommandResult::Done
                }
            }
            Op::JobEvents(events) => {
                // Each touched job is decoded once and written once.
                let mut touched: std::collections::BTreeMap<&str, Job> = std::collections::BTreeMap::new();
                for event in events {
                    let id = event.job();
                    if !touched.contains_key(id) {
                        match tx_read::<Job>(tx.jobs, id.as_bytes(), "job")? {
                            Some(job) => {
                                touched.insert(id, job);
                            }
                            None => continue,
                        }
                    }
                    if let Some(job) = touched.get_mut(id) {
                        job.apply(event);
                    }
                }
                for (id, job) in &touched {
                    tx_write(tx.jobs, id.as_bytes(), job, "job")?;
                }
                CommandResult::Done
            }
        },
    };
    if !cmd.request_id.is_empty() {
        tx_write(dedup, cmd.request_id.as_bytes(), &(index, &result), "dedup entry")?;
    }
    Ok(result)
}

/// Drops request ids older than the window. Lookups check the window too, so
/// when this runs does not change any result.
fn prune_dedup(dedup: &sled::Tree, now: u64) -> Result<(), Error> {
    let mut batch = sled::Batch::default();
    for item in dedup.iter() {
        let (id, raw) = item.map_err(sled_err("prune"))?;
        let (index, _): (u64, CommandResult) = codec::decode("dedup entry", &raw)?;
        if index + DEDUP_WINDOW < now {
            batch.remove(id);
        }
    }
    dedup.apply_batch(batch).map_err(sled_err("prune"))
}

fn to_raft(e: Error) -> RaftStorageError {
    match e {
        Error::Snapshot { .. } => StorageIOError::write_snapshot(None, &e).into(),
        _ => StorageIOError::write_state_machine(&e).into(),
    }
}

/// Hands a snapshot written by [`StateMachineStore::get_snapshot_builder`] to openraft.
pub struct SnapshotBuilder {
    built: Option<Result<Snapshot<TypeConfig>, RaftStorageError>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        self.built.take().unwrap_or_else(|| {
            Err(StorageIOError::write_snapshot(None, &std::io::Error::other("snapshot builder used twice")).into())
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), RaftStorageError> {
        let trees = self.inner.trees();
        let last: Option<LogId<NodeId>> = read_value(&trees.meta, KEY_LAST_APPLIED, "last applied")
            .map_err(|e| StorageIOError::read_state_machine(&e))?
            .flatten();
        let membership: Membership = read_value(&trees.meta, KEY_MEMBERSHIP, "membership")
            .map_err(|e| StorageIOError::read_state_machine(&e))?
            .unwrap_or_default();
        Ok((last, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let started = Instant::now();
        let results = self.apply_batch(&entries).map_err(|e| {
            let log_id = entries.last().map(|e| e.log_id).unwrap_or_default();
            RaftStorageError::from(StorageIOError::apply(log_id, &e))
        })?;
        if let Some(observer) = &self.observer {
            observer(started.elapsed(), entries.len());
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let this = self.clone();
        let built =
            tokio::task::spawn_blocking(move || this.write_snapshot().map_err(to_raft)).await.unwrap_or_else(|e| {
                Err(StorageIOError::write_snapshot(None, &std::io::Error::other(e.to_string())).into())
            });
        SnapshotBuilder { built: Some(built) }
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
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        let trees = self.inner.trees();
        let mut out = Vec::new();
        for item in trees.workers.iter() {
            let (_, raw) = item.map_err(sled_err("list workers"))?;
            out.push(codec::decode("worker", &raw)?);
        }
        Ok(out)
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<Option<Job>, Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        read_value(&self.inner.trees().jobs, id.as_bytes(), "job")
    }

    /// Every job, by id.
    pub fn jobs(&self) -> Result<Vec<Job>, Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        let trees = self.inner.trees();
        let mut out = Vec::new();
        for item in trees.jobs.iter() {
            let (_, raw) = item.map_err(sled_err("list jobs"))?;
            out.push(codec::decode("job", &raw)?);
        }
        Ok(out)
    }

    /// One key, if present.
    pub fn get(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        let trees = self.inner.trees();
        let value: Option<StoredValue> = read_value(&trees.kv, key.as_bytes(), "kv value")?;
        Ok(value.map(|v| v.with_key(key.to_owned())))
    }

    /// Keys starting with `prefix`, in order; at most `limit` (0 = all). The
    /// flag says whether more keys matched. One point-in-time view: no apply
    /// runs while it reads.
    pub fn list(&self, prefix: &str, limit: usize) -> Result<(Vec<KeyValue>, bool), Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        let trees = self.inner.trees();
        let mut out = Vec::new();
        for item in trees.kv.scan_prefix(prefix.as_bytes()) {
            if limit != 0 && out.len() == limit {
                return Ok((out, true));
            }
            let (key, raw) = item.map_err(sled_err("list"))?;
            let value: StoredValue = codec::decode("kv value", &raw)?;
            out.push(value.with_key(String::from_utf8_lossy(&key).into_owned()));
        }
        Ok((out, false))
    }

    /// Keys starting with `prefix` and the revision they are at, read at one
    /// point in time.
    pub fn list_at_revision(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        let revision = self.revision();
        let trees = self.inner.trees();
        let mut out = Vec::new();
        for item in trees.kv.scan_prefix(prefix.as_bytes()) {
            let (key, raw) = item.map_err(sled_err("list"))?;
            let value: StoredValue = codec::decode("kv value", &raw)?;
            out.push(value.with_key(String::from_utf8_lossy(&key).into_owned()));
        }
        Ok((out, revision))
    }

    /// Every lease, by id.
    pub fn leases(&self) -> Result<Vec<kv::Lease>, Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        let trees = self.inner.trees();
        let mut out = Vec::new();
        for item in trees.leases.iter() {
            let (_, raw) = item.map_err(sled_err("leases"))?;
            out.push(codec::decode("lease", &raw)?);
        }
        Ok(out)
    }

    /// The gray variants of `key`.
    pub fn variants(&self, key: &str) -> Result<Vec<kv::Variant>, Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        Ok(read_value(&self.inner.trees().gray, key.as_bytes(), "gray variants")?.unwrap_or_default())
    }

    /// `key` as a reader with `labels` sees it: the matching gray variant's
    /// value if there is one (and its selector), else the main value.
    pub fn get_for(&self, key: &str, labels: &kv::Selector) -> Result<Option<(KeyValue, Option<kv::Selector>)>, Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        let trees = self.inner.trees();
        let main: Option<StoredValue> = read_value(&trees.kv, key.as_bytes(), "kv value")?;
        let variants: Vec<kv::Variant> = read_value(&trees.gray, key.as_bytes(), "gray variants")?.unwrap_or_default();
        let Some(main) = main else { return Ok(None) };
        let mut kv = main.with_key(key.to_owned());
        match kv::pick_variant(&variants, labels) {
            Some(v) => {
                kv.value = v.value.clone();
                Ok(Some((kv, Some(v.selector.clone()))))
            }
            None => Ok(Some((kv, None))),
        }
    }

    /// Every probe definition, by name.
    pub fn probes(&self) -> Result<Vec<probes::ProbeDef>, Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for item in self.inner.trees().probes.scan_prefix(b"d/") {
            let (_, raw) = item.map_err(sled_err("probes"))?;
            out.push(codec::decode("probe", &raw)?);
        }
        Ok(out)
    }

    /// One probe definition.
    pub fn probe(&self, name: &str) -> Result<Option<probes::ProbeDef>, Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        read_value(&self.inner.trees().probes, &probes::def_key(name), "probe")
    }

    /// What each worker last reported for probe `name`, by worker name.
    pub fn probe_results(&self, name: &str) -> Result<Vec<probes::WorkerProbe>, Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for item in self.inner.trees().probes.scan_prefix(probes::results_prefix(name)) {
            let (_, raw) = item.map_err(sled_err("probe results"))?;
            out.push(codec::decode("probe results", &raw)?);
        }
        Ok(out)
    }

    /// One lease.
    pub fn lease(&self, id: u64) -> Result<Option<kv::Lease>, Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        read_value(&self.inner.trees().leases, &id.to_be_bytes(), "lease")
    }

    /// The newest revision whose change is no longer in the history: reads
    /// before it, and watches from it or before, are compacted.
    pub fn compacted(&self) -> Result<u64, Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        let trees = self.inner.trees();
        match trees.events.first().map_err(sled_err("events"))? {
            Some((rev, _)) => Ok(rev_of(&rev)?.saturating_sub(1)),
            None => Ok(self.revision()),
        }
    }

    /// `key` as it was at `revision` (`Ok(None)`: absent then), or
    /// `Err(compacted)` when the history no longer tells (`revision` is
    /// below the compacted revision).
    pub fn get_at(&self, key: &str, revision: u64) -> Result<Result<Option<KeyValue>, u64>, Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        let trees = self.inner.trees();
        let compacted = match trees.events.first().map_err(sled_err("events"))? {
            Some((rev, _)) => rev_of(&rev)?.saturating_sub(1),
            None => self.revision(),
        };
        if revision < compacted {
            return Ok(Err(compacted));
        }
        // Every change after `compacted` is in the window: the key's first
        // change after `revision` knows its state then; with none, its
        // current state is that state.
        let after = kv::history_key(key, revision.saturating_add(1))..=kv::history_key(key, u64::MAX);
        if let Some(item) = trees.history.range(after).next() {
            let (k, _) = item.map_err(sled_err("history"))?;
            let rev = rev_of(k.get(k.len().saturating_sub(8)..).unwrap_or_default())?;
            let change: Change = read_value(&trees.events, &rev.to_be_bytes(), "change")?
                .ok_or_else(|| Error::Corrupt { path: "history".into(), reason: format!("no change at {rev}") })?;
            return Ok(Ok(change.prev.map(|v| v.with_key(key.to_owned()))));
        }
        let value: Option<StoredValue> = read_value(&trees.kv, key.as_bytes(), "kv value")?;
        Ok(Ok(value.map(|v| v.with_key(key.to_owned()))))
    }

    /// Changes to `key` still in the history, oldest first: the newest
    /// `limit` (0 = all).
    pub fn history(&self, key: &str, limit: usize) -> Result<Vec<(u64, Event)>, Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        let trees = self.inner.trees();
        let mut out = Vec::new();
        for item in trees.history.range(kv::history_key(key, 0)..=kv::history_key(key, u64::MAX)).rev() {
            if limit != 0 && out.len() == limit {
                break;
            }
            let (k, _) = item.map_err(sled_err("history"))?;
            let rev = rev_of(k.get(k.len().saturating_sub(8)..).unwrap_or_default())?;
            if let Some(change) = read_value::<Change>(&trees.events, &rev.to_be_bytes(), "change")? {
                out.push((rev, change.event));
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Changes to keys starting with `prefix` at revisions `from..=` (at
    /// most `max`), and the last revision looked at. The caller checks
    /// `from` against [`StateReader::compacted`] first.
    pub fn events(&self, from: u64, prefix: &str, max: usize) -> Result<(Vec<(u64, Event)>, u64), Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        let trees = self.inner.trees();
        let mut last = self.revision();
        let mut out = Vec::new();
        for item in trees.events.range(from.to_be_bytes()..) {
            let (k, raw) = item.map_err(sled_err("events"))?;
            let rev = rev_of(&k)?;
            if out.len() == max {
                last = rev - 1;
                break;
            }
            let change: Change = codec::decode("change", &raw)?;
            if change.event.kv.key.starts_with(prefix) {
                out.push((rev, change.event));
            }
        }
        Ok((out, last.max(from.saturating_sub(1))))
    }

    /// A digest of the whole state at one applied index (no apply runs
    /// while it reads).
    pub fn digest(&self) -> Result<Digest, Error> {
        let _shared = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        let trees = self.inner.trees();
        let applied_index = self.applied_index();
        let revision = self.revision();
        let mut hasher = blake3::Hasher::new();
        hasher.update(&revision.to_be_bytes());
        let mut keys = 0u64;
        for item in trees.kv.iter() {
            let (key, raw) = item.map_err(sled_err("digest"))?;
            let v: StoredValue = codec::decode("kv value", &raw)?;
            for part in [&key[..], &v.value[..]] {
                hasher.update(&(part.len() as u64).to_be_bytes());
                hasher.update(part);
            }
            for n in [v.create_revision, v.mod_revision, v.version] {
                hasher.update(&n.to_be_bytes());
            }
            keys += 1;
        }
        // The other replicated trees too, as encoded (dedup aside: it only
        // remembers answers to retried requests).
        let others = [
            &trees.workers,
            &trees.jobs,
            &trees.events,
            &trees.history,
            &trees.leases,
            &trees.key_lease,
            &trees.gray,
            &trees.probes,
        ];
        for tree in others {
            for item in tree.iter() {
                let (key, raw) = item.map_err(sled_err("digest"))?;
                for part in [&key[..], &raw[..]] {
                    hasher.update(&(part.len() as u64).to_be_bytes());
                    hasher.update(part);
                }
            }
        }
        Ok(Digest { applied_index, revision, keys, hex: hasher.finalize().to_hex().to_string() })
    }
}

#[cfg(test)]
mod tests;
