//! Opening a scheduler's data directory.
//!
//! One database (`ferry_db`: sled today, in `<data>/sled`) holds the `log`
//! tree (big-endian u64 keys) and the `meta` tree (vote, committed, last
//! purged, `data_version`, current snapshot). The log's journal (file `journal`, see `journal.rs`) and
//! snapshot files (`snapshots/`) live beside it; the state
//! machine itself is in memory, rebuilt from the current snapshot and the log
//! on start. A directory from an unknown format version, a corrupt one, or one
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

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_db::{Db, Store, Tree};

use crate::error::Error;
use crate::log_store::LogStore;
use crate::log_sync::LogSync;
use crate::state_machine::StateMachineStore;
use crate::NodeId;

/// The data format version this binary writes and reads.
pub const DATA_VERSION: u32 = 4;
/// The oldest format this binary upgrades.
const OLDEST_UPGRADED: u32 = 2;
pub(crate) const KEY_DATA_VERSION: &[u8] = b"data_version";
/// The node id the directory was first opened as.
pub(crate) const KEY_NODE_ID: &[u8] = b"node_id";
/// The id of the cluster the directory's log belongs to, once known.
pub(crate) const KEY_CLUSTER_ID: &[u8] = b"cluster_id";

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
}

impl DataDir {
    /// The directory this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id of the cluster this directory's log belongs to, if known.
    pub fn cluster_id(&self) -> Result<Option<String>, Error> {
        let raw = self.meta.get(KEY_CLUSTER_ID).map_err(|source| Error::Store { op: "read cluster id", source })?;
        Ok(raw.map(|r| String::from_utf8_lossy(r.as_ref()).into_owned()))
    }

    /// Records the cluster id (durably: the directory is synced).
    pub fn set_cluster_id(&self, id: &str) -> Result<(), Error> {
        self.meta
            .insert(KEY_CLUSTER_ID, id.as_bytes())
            .map_err(|source| Error::Store { op: "write cluster id", source })?;
        self.sync_blocking().map_err(|source| Error::Open { path: self.path.clone(), source })
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
        if self.sync_failed.load(Ordering::SeqCst) {
            return Err(std::io::Error::other(format!(
                "an earlier sync of {} failed; restart the node (its journals hold what may be lost)",
                self.path.display()
            )));
        }
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
    match meta.get(KEY_DATA_VERSION).map_err(|e| open_error(path, e))? {
        Some(raw) => {
            let found = u32::from_be_bytes(fixed(path, "data_version", raw.as_ref())?);
            if !(OLDEST_UPGRADED..=DATA_VERSION).contains(&found) {
                return Err(Error::UnknownVersion { path: path.into(), found, supported: DATA_VERSION });
            }
            if found == 2 {
                for name in db.tree_names() {
                    if name.starts_with("sm") {
                        db.drop_tree(&name).map_err(|e| open_error(path, e))?;
                    }
                }
            }
            if found < DATA_VERSION {
                tracing::info!(path = %path.display(), from = found, to = DATA_VERSION, "upgrading the data directory");
                meta.insert(KEY_DATA_VERSION, &DATA_VERSION.to_be_bytes()).map_err(|e| open_error(path, e))?;
            }
        }
        None => {
            let has_data = db.tree_names().iter().filter_map(|name| db.tree(name).ok()).any(|tree| !tree.is_empty());
            if has_data {
                return Err(Error::Corrupt {
                    path: path.into(),
                    reason: "it holds data but no data_version key (not written by ferry?)".into(),
                });
            }
            meta.insert(KEY_DATA_VERSION, &DATA_VERSION.to_be_bytes()).map_err(|e| open_error(path, e))?;
        }
    }
    // A directory serves the node it was first opened as, and no other: a
    // copy of node 2's data started as node 4 would carry node 2's vote
    // and log under another name. (A directory from before node ids were
    // kept takes the id it is opened with.)
    if let Some(expected) = options.node_id {
        match meta.get(KEY_NODE_ID).map_err(|e| open_error(path, e))? {
            Some(raw) => {
                let found = u64::from_be_bytes(fixed(path, "node_id", raw.as_ref())?);
                if found != expected {
                    return Err(Error::WrongNode { path: path.into(), found, expected });
                }
            }
            None => meta.insert(KEY_NODE_ID, &expected.to_be_bytes()).map_err(|e| open_error(path, e))?,
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
    };
    // Durable: the format mark written above, and whatever an earlier run
    // that crashed had not synced yet.
    dir.sync_blocking().map_err(|source| Error::Open { path: path.into(), source })?;
    Ok(dir)
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
