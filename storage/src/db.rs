//! Opening a scheduler's data directory.
//!
//! One database (`ferry_db`: sled today, in `<data>/sled`) holds the `log`
//! tree (big-endian u64 keys) and the `meta` tree (`data_version`, the
//! commit index). The node's own state file (`state`, see
//! [`crate::state_file`]: vote, last purged id, current snapshot, node and
//! cluster ids, how far sled is durable), the log's journals (`journal`,
//! `journal.1`, see `journal.rs`) and snapshot files (`snapshots/`) live
//! beside it; the state machine itself is in memory, rebuilt from the
//! current snapshot and the log on start. A directory from an unknown format
//! version, a corrupt or damaged one (see [`crate::start_check`]), or one
//! locked by another process is refused with a clear [`Error`].
//!
//! Older formats are upgraded on open, and the directory marked with this
//! version, so a binary of an older format refuses it by its version
//! instead of misreading it:
//! - Format 2 also kept the state machine in sled trees (`sm<N>_*`): they
//!   are dropped (the snapshot and the log after it hold the same state).
//! - Format 3 held log entries and snapshots of encoding format 1, which
//!   stored registry instances as protobuf: nothing is rewritten; those
//!   entries and snapshot records are converted as they are read
//!   ([`crate::upgrade`]), and new ones are written in today's encoding.
//! - Format 4 kept the vote, last purged id, snapshot pointer, node id and
//!   cluster id in the `meta` tree: they move to the state file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_db::{Db, Store, Tree};

use crate::error::Error;
use crate::log_store::LogStore;
use crate::log_sync::LogSync;
use crate::state_file::{NodeState, StateFile};
use crate::state_machine::StateMachineStore;
use crate::NodeId;

/// The data format version this binary writes and reads.
pub const DATA_VERSION: u32 = 5;
/// The oldest format this binary upgrades.
const OLDEST_UPGRADED: u32 = 2;
pub(crate) const KEY_DATA_VERSION: &[u8] = b"data_version";
/// Where format 4 kept what the state file holds now.
const KEY_NODE_ID: &[u8] = b"node_id";
const KEY_CLUSTER_ID: &[u8] = b"cluster_id";
const KEY_VOTE: &[u8] = b"vote";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_SNAPSHOT: &[u8] = b"snapshot";

/// Tuning for [`open`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// sled's page cache, in bytes.
    pub cache_bytes: u64,
    /// Background flush interval. Durability of the log and vote does not
    /// depend on it: those are flushed before openraft is told they are saved.
    pub flush_every: Option<Duration>,
    /// Sync each log append on the thread that appends (openraft's core,
    /// which waits for it anyway) instead of the blocking pool: two thread
    /// hops less per write. Turn it off when several nodes share one
    /// runtime, so that one node's slow disk does not hold a runtime thread
    /// the others need.
    pub sync_appends_inline: bool,
    /// The Raft node this store belongs to. When set, the entries it
    /// appends as leader are reported saved once written and synced in the
    /// background, while they are sent to the followers; the state machine
    /// applies nothing its log has not synced yet (see
    /// [`LogSync`](crate::log_sync::LogSync)). `None`: every append is
    /// synced before openraft hears of it.
    pub node_id: Option<NodeId>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self { cache_bytes: 64 * 1024 * 1024, flush_every: None, sync_appends_inline: true, node_id: None }
    }
}

/// An open data directory, shared by the log store and the state machine.
#[derive(Clone, Debug)]
pub struct DataDir {
    pub(crate) path: PathBuf,
    pub(crate) db: Db,
    pub(crate) meta: <Db as Store>::Tree,
    /// [`OpenOptions::sync_appends_inline`].
    pub(crate) sync_appends_inline: bool,
    /// [`OpenOptions::node_id`].
    pub(crate) node_id: Option<NodeId>,
    /// How far the log is durable (set by the log store when it opens).
    pub(crate) log_sync: LogSync,
    /// Set by the first failed sync, for good (see [`DataDir::sync_blocking`]).
    pub(crate) sync_failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The node's state file.
    state: std::sync::Arc<std::sync::Mutex<StateFile>>,
}

impl DataDir {
    /// The directory this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id of the cluster this directory's log belongs to, if known.
    pub fn cluster_id(&self) -> Result<Option<String>, Error> {
        Ok(self.node_state().cluster_id)
    }

    /// Records the cluster id (durably).
    pub fn set_cluster_id(&self, id: &str) -> Result<(), Error> {
        self.update_state_blocking(|s| s.cluster_id = Some(id.to_owned()))
            .map_err(|source| Error::Open { path: self.path.clone(), source })
    }

    /// What the state file holds now.
    pub(crate) fn node_state(&self) -> NodeState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).state().clone()
    }

    /// Changes the state file and syncs it. A failure is final, as for
    /// [`DataDir::sync_blocking`]. Blocking: use [`DataDir::update_state`]
    /// from async code.
    pub(crate) fn update_state_blocking(&self, change: impl FnOnce(&mut NodeState)) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        self.refuse_after_failed_sync()?;
        let mut file = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = file.state().clone();
        change(&mut next);
        if &next == file.state() {
            return Ok(());
        }
        file.write(next).map_err(std::io::Error::other).inspect_err(|e| {
            tracing::error!(path = %self.path.display(), error = %e, "writing the state file failed; this node stops");
            self.sync_failed.store(true, Ordering::SeqCst);
        })
    }

    /// [`DataDir::update_state_blocking`] on a blocking thread.
    pub(crate) async fn update_state(
        &self,
        change: impl FnOnce(&mut NodeState) + Send + 'static,
    ) -> std::io::Result<()> {
        let dir = self.clone();
        tokio::task::spawn_blocking(move || dir.update_state_blocking(change)).await.map_err(std::io::Error::other)?
    }

    fn refuse_after_failed_sync(&self) -> std::io::Result<()> {
        if self.sync_failed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other(format!(
                "an earlier sync of {} failed; restart the node (its journals hold what may be lost)",
                self.path.display()
            )));
        }
        Ok(())
    }

    pub(crate) fn snapshot_dir(&self) -> PathBuf {
        self.path.join("snapshots")
    }

    pub(crate) fn tree(&self, name: &str) -> Result<<Db as Store>::Tree, Error> {
        self.db.tree(name).map_err(|source| Error::Store { op: "open tree", source })
    }

    /// Makes everything written so far durable, also across a power loss
    /// (see [`ferry_db::Store::sync`]). Blocking: use [`DataDir::sync`]
    /// from async code.
    ///
    /// A failure is final: after a writeback error Linux marks the pages
    /// clean, so a second sync would "succeed" over data that never reached
    /// the disk, and the journals (the only durable copy) would then be
    /// reset. Every later sync fails too; the node stops, and its restart
    /// replays the journals.
    pub(crate) fn sync_blocking(&self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        self.refuse_after_failed_sync()?;
        // Only directories named `fail-sync`: tests run side by side.
        #[cfg(test)]
        fail::fail_point!("data-dir-sync", self.path.ends_with("fail-sync"), |_| {
            self.sync_failed.store(true, Ordering::SeqCst);
            Err(std::io::Error::other("injected sync failure"))
        });
        // sled renames its own files (snapshots of its page table) without
        // syncing their directory: this sync point covers that too.
        let synced = self.db.sync().and_then(|()| fsync_dir(&self.path.join("sled")));
        synced.inspect_err(|e| {
            tracing::error!(path = %self.path.display(), error = %e, "syncing the data directory failed; this node stops");
            self.sync_failed.store(true, Ordering::SeqCst);
        })
    }

    /// [`DataDir::sync_blocking`] on a blocking thread.
    pub(crate) async fn sync(&self) -> std::io::Result<()> {
        let dir = self.clone();
        tokio::task::spawn_blocking(move || dir.sync_blocking()).await.map_err(std::io::Error::other)?
    }
}

/// Opens (creating if needed) the data directory at `path` and returns the
/// log store and state machine that openraft needs.
pub fn open(path: &Path, options: &OpenOptions) -> Result<(LogStore, StateMachineStore), Error> {
    let dir = open_dir(path, options)?;
    let log = LogStore::new(dir.clone())?;
    let sm = StateMachineStore::new(dir)?;
    Ok((log, sm))
}

/// A meta value of `N` bytes, or the directory is corrupt.
fn fixed<const N: usize>(path: &Path, name: &str, raw: &[u8]) -> Result<[u8; N], Error> {
    raw.try_into().map_err(|_| Error::Corrupt {
        path: path.into(),
        reason: format!("{name} has {} bytes, expected {N}", raw.len()),
    })
}

/// `fsync` of a directory: the names created, renamed or removed in it are
/// durable once it returns.
pub(crate) fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn open_dir(path: &Path, options: &OpenOptions) -> Result<DataDir, Error> {
    std::fs::create_dir_all(path).map_err(|source| Error::Open { path: path.into(), source })?;
    std::fs::create_dir_all(path.join("snapshots")).map_err(|source| Error::Open { path: path.into(), source })?;
    let db_options = ferry_db::Options { cache_bytes: options.cache_bytes, flush_every: options.flush_every };
    let db = Db::open(&path.join("sled"), &db_options).map_err(|e| open_error(path, e))?;
    // The directories just made (or found) are durable entries of their
    // parents: a power cut cannot take `<data>`, `sled` or `snapshots`
    // away after the node has acknowledged anything.
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    for dir in [parent, path, &path.join("sled")] {
        fsync_dir(dir).map_err(|source| Error::Open { path: dir.into(), source })?;
    }
    let meta = db.tree("meta").map_err(|e| open_error(path, e))?;
    let found = match meta.get(KEY_DATA_VERSION).map_err(|e| open_error(path, e))? {
        Some(raw) => Some(u32::from_be_bytes(fixed(path, "data_version", raw.as_ref())?)),
        None => None,
    };
    let state = match (found, StateFile::open(path, found.is_none())?) {
        (Some(found), _) if !(OLDEST_UPGRADED..=DATA_VERSION).contains(&found) => {
            return Err(Error::UnknownVersion { path: path.into(), found, supported: DATA_VERSION });
        }
        (_, Some(state)) => state,
        (Some(found), None) if found < DATA_VERSION => StateFile::create(path, legacy_state(path, &meta)?)?,
        (Some(_), None) => {
            // Written after the state file: that file was lost, and what it
            // said cannot be checked.
            return Err(Error::Corrupt { path: path.into(), reason: "its state file (`state`) is missing".into() });
        }
        (None, None) => {
            let has_data = db.tree_names().iter().filter_map(|name| db.tree(name).ok()).any(|tree| !tree.is_empty());
            if has_data {
                return Err(Error::Corrupt {
                    path: path.into(),
                    reason: "it holds data but no data_version key (not written by ferry?)".into(),
                });
            }
            StateFile::create(path, NodeState { node_id: options.node_id, ..NodeState::default() })?
        }
    };
    if found == Some(2) {
        for name in db.tree_names() {
            if name.starts_with("sm") {
                db.drop_tree(&name).map_err(|e| open_error(path, e))?;
            }
        }
    }
    if found != Some(DATA_VERSION) {
        if let Some(from) = found {
            tracing::info!(path = %path.display(), from, to = DATA_VERSION, "upgrading the data directory");
        }
        meta.insert(KEY_DATA_VERSION, &DATA_VERSION.to_be_bytes()).map_err(|e| open_error(path, e))?;
        // Now in the state file.
        for key in [KEY_NODE_ID, KEY_CLUSTER_ID, KEY_VOTE, KEY_LAST_PURGED, KEY_SNAPSHOT] {
            meta.remove(key).map_err(|e| open_error(path, e))?;
        }
    }
    // A directory serves the node it was first opened as, and no other: a
    // copy of node 2's data started as node 4 would carry node 2's vote
    // and log under another name. (A directory from before node ids were
    // kept takes the id it is opened with.)
    let mut state = state;
    if let Some(expected) = options.node_id {
        match state.state().node_id {
            Some(found) if found != expected => return Err(Error::WrongNode { path: path.into(), found, expected }),
            Some(_) => {}
            None => {
                let next = NodeState { node_id: Some(expected), ..state.state().clone() };
                state.write(next)?;
            }
        }
    }
    let dir = DataDir {
        path: path.into(),
        db,
        meta,
        sync_appends_inline: options.sync_appends_inline,
        node_id: options.node_id,
        log_sync: LogSync::new(None),
        sync_failed: Default::default(),
        state: std::sync::Arc::new(std::sync::Mutex::new(state)),
    };
    // Durable: the format mark written above, and whatever an earlier run
    // that crashed had not synced yet.
    dir.sync_blocking().map_err(|source| Error::Open { path: path.into(), source })?;
    Ok(dir)
}

/// What a format-4 directory kept in its `meta` tree, for its new state
/// file. How far sled is durable was not recorded: the log store records it
/// once it has synced sled at open.
fn legacy_state(path: &Path, meta: &<Db as Store>::Tree) -> Result<NodeState, Error> {
    let node_id = match meta.get(KEY_NODE_ID).map_err(|e| open_error(path, e))? {
        Some(raw) => Some(u64::from_be_bytes(fixed(path, "node_id", raw.as_ref())?)),
        None => None,
    };
    let cluster_id = meta.get(KEY_CLUSTER_ID).map_err(|e| open_error(path, e))?;
    Ok(NodeState {
        node_id,
        cluster_id: cluster_id.map(|r| String::from_utf8_lossy(r.as_ref()).into_owned()),
        vote: read_meta(meta, KEY_VOTE, "vote")?,
        last_purged: read_meta(meta, KEY_LAST_PURGED, "last_purged")?,
        durable_through: None,
        snapshot: read_meta(meta, KEY_SNAPSHOT, "snapshot pointer")?,
    })
}

/// A value of the `meta` tree, decoded.
pub(crate) fn read_meta<T: serde::de::DeserializeOwned>(
    tree: &<Db as Store>::Tree,
    key: &[u8],
    what: &'static str,
) -> Result<Option<T>, Error> {
    match tree.get(key).map_err(|source| Error::Store { op: "read meta", source })? {
        Some(raw) => Ok(Some(crate::codec::decode(what, raw.as_ref())?)),
        None => Ok(None),
    }
}

fn open_error(path: &Path, e: ferry_db::Error) -> Error {
    match e {
        ferry_db::Error::Locked => Error::Locked { path: path.into() },
        ferry_db::Error::Corrupt(reason) => Error::Corrupt { path: path.into(), reason },
        ferry_db::Error::Io(source) => Error::Open { path: path.into(), source },
        other => Error::Store { op: "open", source: other },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_open_of_a_locked_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let _first = open(tmp.path(), &OpenOptions::default()).unwrap();
        let err = open(tmp.path(), &OpenOptions::default()).unwrap_err();
        assert!(matches!(err, Error::Locked { .. }), "{err}");
        assert!(err.to_string().contains("in use by another running process"));
    }

    #[tokio::test]
    async fn unknown_data_version_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (log, _sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
            log.dir().meta.insert(KEY_DATA_VERSION, &9u32.to_be_bytes()).unwrap();
            log.dir().db.flush().unwrap();
        }
        let err = open(tmp.path(), &OpenOptions::default()).unwrap_err();
        assert!(matches!(err, Error::UnknownVersion { found: 9, .. }), "{err}");
    }

    #[tokio::test]
    async fn format_2_directory_is_upgraded_and_its_state_trees_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (log, _sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
            let db = &log.dir().db;
            db.tree("sm0_kv").unwrap().insert(b"k", b"v").unwrap();
            log.dir().meta.insert(KEY_DATA_VERSION, &2u32.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let (log, _sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
        let db = &log.dir().db;
        assert!(!db.tree_names().iter().any(|n| n.starts_with("sm")));
        let version = log.dir().meta.get(KEY_DATA_VERSION).unwrap().unwrap();
        assert_eq!(version.as_ref(), &DATA_VERSION.to_be_bytes());
    }

    #[tokio::test]
    async fn format_3_directory_is_marked_with_todays_version_and_keeps_its_trees() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (log, _sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
            log.dir().tree("other").unwrap().insert(b"entry", b"kept").unwrap();
            log.dir().meta.insert(KEY_DATA_VERSION, &3u32.to_be_bytes()).unwrap();
            log.dir().db.flush().unwrap();
        }
        let (log, _sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
        let version = log.dir().meta.get(KEY_DATA_VERSION).unwrap().unwrap();
        assert_eq!(version.as_ref(), &DATA_VERSION.to_be_bytes());
        assert_eq!(log.dir().tree("other").unwrap().get(b"entry").unwrap().unwrap().as_ref(), b"kept");
    }

    #[tokio::test]
    async fn a_format_4_directory_moves_its_vote_and_ids_into_the_state_file() {
        use openraft::storage::RaftLogStorage;
        use openraft::Vote;
        let tmp = tempfile::tempdir().unwrap();
        let vote = Vote::new_committed(7, 3);
        {
            let (log, _sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
            // What format 4 wrote, and no state file.
            let meta = &log.dir().meta;
            meta.insert(KEY_VOTE, &crate::codec::encode("vote", &vote).unwrap()).unwrap();
            meta.insert(KEY_NODE_ID, &2u64.to_be_bytes()).unwrap();
            meta.insert(KEY_CLUSTER_ID, b"c-1").unwrap();
            meta.insert(KEY_DATA_VERSION, &4u32.to_be_bytes()).unwrap();
            log.dir().sync_blocking().unwrap();
            std::fs::remove_file(tmp.path().join(crate::state_file::FILE_NAME)).unwrap();
        }
        let (mut log, _sm) = open(tmp.path(), &OpenOptions { node_id: Some(2), ..OpenOptions::default() }).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        assert_eq!(log.dir().cluster_id().unwrap().as_deref(), Some("c-1"));
        let version = log.dir().meta.get(KEY_DATA_VERSION).unwrap().unwrap();
        assert_eq!(version.as_ref(), &DATA_VERSION.to_be_bytes());
        assert!(log.dir().meta.get(KEY_VOTE).unwrap().is_none(), "the state file holds it now");
        drop((log, _sm));
        let err = open(tmp.path(), &OpenOptions { node_id: Some(3), ..OpenOptions::default() }).unwrap_err();
        assert!(matches!(err, Error::WrongNode { found: 2, expected: 3, .. }), "{err}");
    }

    #[tokio::test]
    async fn a_directory_whose_state_file_is_gone_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        drop(open(tmp.path(), &OpenOptions::default()).unwrap());
        std::fs::remove_file(tmp.path().join(crate::state_file::FILE_NAME)).unwrap();
        let err = open(tmp.path(), &OpenOptions::default()).unwrap_err();
        assert!(err.to_string().contains("its state file (`state`) is missing"), "{err}");
    }

    #[tokio::test]
    async fn data_without_version_is_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let db = Db::open(&tmp.path().join("sled"), &ferry_db::Options::default()).unwrap();
            db.tree("log").unwrap().insert(b"x", b"y").unwrap();
            db.flush().unwrap();
        }
        // sled's background thread may hold the file lock a moment after
        // the handle is dropped.
        let mut err = open(tmp.path(), &OpenOptions::default()).unwrap_err();
        for _ in 0..50 {
            if !matches!(err, Error::Locked { .. }) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            err = open(tmp.path(), &OpenOptions::default()).unwrap_err();
        }
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    }
}
