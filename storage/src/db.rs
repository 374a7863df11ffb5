//! Opening a scheduler's data directory.
//!
//! One sled database holds the `log` tree (big-endian u64 keys) and the
//! `meta` tree (vote, committed, last purged, `data_version`, current
//! snapshot). The log's journal (file `journal`, see `journal.rs`) and
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

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    pub(crate) db: sled::Db,
    pub(crate) meta: sled::Tree,
    files: Arc<SledFiles>,
    /// [`OpenOptions::sync_appends_inline`].
    pub(crate) sync_appends_inline: bool,
    /// [`OpenOptions::node_id`].
    pub(crate) node_id: Option<NodeId>,
    /// How far the log is durable (set by the log store when it opens).
    pub(crate) log_sync: LogSync,
}

/// sled's own files, for [`DataDir::sync`].
#[derive(Debug)]
struct SledFiles {
    /// sled's log file (`sled/db`).
    log: File,
    /// Where sled puts values and tree nodes too large for its log
    /// (`sled/blobs`), one file each, named by log sequence number.
    blobs: PathBuf,
    state: Mutex<BlobState>,
}

#[derive(Debug)]
struct BlobState {
    /// inotify on `blobs` for files closed after writing: the blobs to sync
    /// next. `None` if inotify is unavailable: then every sync lists the
    /// directory.
    watch: Option<OwnedFd>,
    /// Without a watch: the highest blob already synced.
    synced_lsn: u64,
    /// The first sync lists the directory: blobs left by an earlier run may
    /// not be on disk yet if that run crashed before syncing them.
    listed: bool,
    /// Blob files synced since open (for tests and curiosity).
    synced: u64,
}

/// Size of one `struct inotify_event` without its name.
const EVENT_HEADER: usize = 16;

fn watch_blobs(dir: &Path) -> Option<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: plain system calls; the returned descriptor is owned below.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just returned by inotify_init1 and is owned by no one else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `path` is a valid NUL-terminated string for the call's duration.
    let wd =
        unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO) };
    (wd >= 0).then_some(fd)
}

/// What a watch reported since it was last read.
enum Drained {
    /// The files closed after writing (or moved in), by name.
    Names(Vec<std::ffi::OsString>),
    /// Events were lost (queue overflow): list the directory.
    Lost,
    /// The watch ended (the directory went away): list from now on.
    Gone,
}

fn drain_watch(fd: &OwnedFd) -> std::io::Result<Drained> {
    use std::os::unix::ffi::OsStrExt;
    let mut names = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => return Ok(Drained::Names(names)),
                std::io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Ok(Drained::Names(names));
        }
        let mut at = 0;
        while at + EVENT_HEADER <= n as usize {
            let field = |i: usize| u32::from_ne_bytes([buf[at + i], buf[at + i + 1], buf[at + i + 2], buf[at + i + 3]]);
            let (mask, len) = (field(4), field(12) as usize);
            if mask & libc::IN_IGNORED != 0 {
                return Ok(Drained::Gone);
            }
            if mask & libc::IN_Q_OVERFLOW != 0 {
                return Ok(Drained::Lost);
            }
            let name = buf.get(at + EVENT_HEADER..at + EVENT_HEADER + len).unwrap_or_default();
            let name = name.split(|b| *b == 0).next().unwrap_or_default();
            if !name.is_empty() {
                names.push(std::ffi::OsStr::from_bytes(name).to_owned());
            }
            at += EVENT_HEADER + len;
        }
    }
}

impl SledFiles {
    fn open(sled_dir: &Path) -> std::io::Result<Self> {
        let blobs = sled_dir.join("blobs");
        std::fs::create_dir_all(&blobs)?;
        let state = BlobState { watch: watch_blobs(&blobs), synced_lsn: 0, listed: false, synced: 0 };
        Ok(Self { log: File::open(sled_dir.join("db"))?, blobs, state: Mutex::new(state) })
    }

    /// `fdatasync` of the log file, and of every blob written since the last
    /// call (then of their directory). Call after sled's flush: by then every
    /// blob its log points to is written and closed, so the watch has seen it.
    fn sync(&self) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let reported = match state.watch.as_ref().map(drain_watch).transpose()? {
            Some(Drained::Names(names)) if state.listed => Some(names),
            Some(Drained::Gone) => {
                state.watch = None;
                None
            }
            _ => None,
        };
        let mut synced = 0;
        let mut sync_blob = |path: &Path| -> std::io::Result<()> {
            // sled removes blobs it no longer needs: one gone is fine.
            match File::open(path) {
                Ok(blob) => blob.sync_data().map(|()| synced += 1),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        };
        match reported {
            Some(names) => {
                for name in names {
                    sync_blob(&self.blobs.join(name))?;
                }
            }
            None => {
                // No watch, or it lost events: list the directory.
                let watched = state.watch.is_some();
                let mut newest = state.synced_lsn;
                for item in std::fs::read_dir(&self.blobs)? {
                    let item = item?;
                    let Some(lsn) = item.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else { continue };
                    if watched || lsn > state.synced_lsn {
                        sync_blob(&item.path())?;
                        newest = newest.max(lsn);
                    }
                }
                state.synced_lsn = newest;
                state.listed = true;
            }
        }
        if synced > 0 {
            File::open(&self.blobs)?.sync_all()?;
            state.synced += synced;
        }
        self.log.sync_data()
    }
}

impl DataDir {
    /// The directory this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn snapshot_dir(&self) -> PathBuf {
        self.path.join("snapshots")
    }

    pub(crate) fn tree(&self, name: &str) -> Result<sled::Tree, Error> {
        self.db.open_tree(name).map_err(|source| Error::Sled { op: "open tree", source })
    }

    /// Makes everything written to sled so far durable, also across a power
    /// loss. sled 0.34's own flush writes its log buffers and calls
    /// `sync_file_range` on them, which survives a crash of the process but
    /// flushes neither the disk's write cache nor the file's metadata, and it
    /// never syncs the separate files of large values (blobs). This adds an
    /// `fdatasync` of the log file and of new blob files, as etcd does for
    /// its WAL. Blocking: use [`DataDir::sync`] from async code.
    pub(crate) fn sync_blocking(&self) -> std::io::Result<()> {
        self.db.flush().map_err(std::io::Error::other)?;
        self.files.sync()
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

fn open_dir(path: &Path, options: &OpenOptions) -> Result<DataDir, Error> {
    std::fs::create_dir_all(path).map_err(|source| Error::Open { path: path.into(), source })?;
    std::fs::create_dir_all(path.join("snapshots")).map_err(|source| Error::Open { path: path.into(), source })?;
    let db = sled::Config::new()
        .path(path.join("sled"))
        .cache_capacity(options.cache_bytes)
        .flush_every_ms(options.flush_every.map(|d| d.as_millis().max(1) as u64))
        .open()
        .map_err(|e| open_error(path, e))?;
    let meta = db.open_tree("meta").map_err(|e| open_error(path, e))?;
    match meta.get(KEY_DATA_VERSION).map_err(|e| open_error(path, e))? {
        Some(raw) => {
            let bytes: [u8; 4] = raw.as_ref().try_into().map_err(|_| Error::Corrupt {
                path: path.into(),
                reason: format!("data_version has {} bytes, expected 4", raw.len()),
            })?;
            let found = u32::from_be_bytes(bytes);
            if !(OLDEST_UPGRADED..=DATA_VERSION).contains(&found) {
                return Err(Error::UnknownVersion { path: path.into(), found, supported: DATA_VERSION });
            }
            if found == 2 {
                for name in db.tree_names() {
                    if name.starts_with(b"sm") {
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
            let has_data =
                db.tree_names().iter().filter_map(|name| db.open_tree(name).ok()).any(|tree| !tree.is_empty());
            if has_data {
                return Err(Error::Corrupt {
                    path: path.into(),
                    reason: "it holds data but no data_version key (not written by ferry?)".into(),
                });
            }
            meta.insert(KEY_DATA_VERSION, &DATA_VERSION.to_be_bytes()).map_err(|e| open_error(path, e))?;
        }
    }
    let files = SledFiles::open(&path.join("sled")).map_err(|source| Error::Open { path: path.into(), source })?;
    let dir = DataDir {
        path: path.into(),
        db,
        meta,
        files: Arc::new(files),
        sync_appends_inline: options.sync_appends_inline,
        node_id: options.node_id,
        log_sync: LogSync::new(None),
    };
    // Durable: the format mark written above, and whatever an earlier run
    // that crashed had not synced yet.
    dir.sync_blocking().map_err(|source| Error::Open { path: path.into(), source })?;
    Ok(dir)
}

fn open_error(path: &Path, e: sled::Error) -> Error {
    match e {
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock") => {
            Error::Locked { path: path.into() }
        }
        sled::Error::Io(source) => Error::Open { path: path.into(), source },
        sled::Error::Corruption { .. } => Error::Corrupt { path: path.into(), reason: e.to_string() },
        other => Error::Sled { op: "open", source: other },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs_synced(dir: &DataDir) -> u64 {
        dir.files.state.lock().unwrap().synced
    }

    #[tokio::test]
    async fn sync_covers_the_files_of_large_values() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = open_dir(tmp.path(), &OpenOptions::default()).unwrap();
        assert!(dir.files.state.lock().unwrap().watch.is_some(), "inotify is unavailable here");
        let log = dir.tree("log").unwrap();
        log.insert(b"small", vec![1u8; 100]).unwrap();
        dir.sync().await.unwrap();
        assert_eq!(blobs_synced(&dir), 0, "no blob yet");
        // Far above sled's inline limit: it goes to a file of its own.
        log.insert(b"large", vec![2u8; 600 * 1024]).unwrap();
        dir.sync().await.unwrap();
        let blobs = std::fs::read_dir(tmp.path().join("sled").join("blobs")).unwrap().count();
        assert!(blobs >= 1, "sled wrote no blob file");
        let synced = blobs_synced(&dir);
        assert!(synced >= 1, "the blob was not synced");
        // A second sync has nothing new to sync and still succeeds.
        dir.sync().await.unwrap();
        assert_eq!(blobs_synced(&dir), synced);
        drop((log, dir));
        let dir = open_dir(tmp.path(), &OpenOptions::default()).unwrap();
        assert_eq!(dir.tree("log").unwrap().get(b"large").unwrap().unwrap().len(), 600 * 1024);
    }

    #[test]
    fn without_a_watch_the_listing_finds_new_blobs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = open_dir(tmp.path(), &OpenOptions::default()).unwrap();
        dir.files.state.lock().unwrap().watch = None;
        dir.tree("log").unwrap().insert(b"large", vec![2u8; 600 * 1024]).unwrap();
        dir.sync_blocking().unwrap();
        let synced = blobs_synced(&dir);
        assert!(synced >= 1, "the blob was not synced");
        dir.sync_blocking().unwrap();
        assert_eq!(blobs_synced(&dir), synced, "an old blob was synced again");
    }

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
            db.open_tree("sm0_kv").unwrap().insert(b"k", b"v").unwrap();
            log.dir().meta.insert(KEY_DATA_VERSION, &2u32.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let (log, _sm) = open(tmp.path(), &OpenOptions::default()).unwrap();
        let db = &log.dir().db;
        assert!(!db.tree_names().iter().any(|n| n.starts_with(b"sm")));
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
            let db = sled::open(tmp.path().join("sled")).unwrap();
            db.open_tree("log").unwrap().insert(b"x", b"y").unwrap();
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
