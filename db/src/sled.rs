//! sled 0.34 as Ferry's [`Store`]: a `sled::Db` and its trees, plus what
//! sled does not do itself for durability.
//!
//! sled's own flush writes its log buffers and calls `sync_file_range` on
//! them, which survives a crash of the process but flushes neither the
//! disk's write cache nor the file's metadata, and it never syncs the
//! separate files of large values (blobs). [`Store::sync`] adds an
//! `fdatasync` of the log file and of new blob files, as etcd does for its
//! WAL; new blobs are found through inotify (or by listing the directory).

use std::fs::File;
use std::ops::Bound;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::{Batch, Error, KeyValue, Options, Store, Tree};

/// A sled database and the files it writes.
#[derive(Clone, Debug)]
pub struct SledDb {
    db: sled::Db,
    files: Arc<SledFiles>,
}

/// One sled tree.
#[derive(Clone, Debug)]
pub struct SledTree(sled::Tree);

fn error(e: sled::Error) -> Error {
    match e {
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock") => {
            Error::Locked
        }
        sled::Error::Io(io) => Error::Io(io),
        sled::Error::Corruption { .. } => Error::Corrupt(e.to_string()),
        other => Error::Other(other.to_string()),
    }
}

impl Store for SledDb {
    type Tree = SledTree;

    fn open(path: &Path, options: &Options) -> Result<Self, Error> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(options.cache_bytes)
            .flush_every_ms(options.flush_every.map(|d| d.as_millis().max(1) as u64))
            .open()
            .map_err(error)?;
        let files = SledFiles::open(path)?;
        Ok(Self { db, files: Arc::new(files) })
    }

    fn tree(&self, name: &str) -> Result<SledTree, Error> {
        self.db.open_tree(name).map(SledTree).map_err(error)
    }

    fn tree_names(&self) -> Vec<String> {
        self.db.tree_names().iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect()
    }

    fn drop_tree(&self, name: &str) -> Result<(), Error> {
        self.db.drop_tree(name).map(|_| ()).map_err(error)
    }

    fn flush(&self) -> Result<(), Error> {
        self.db.flush().map(|_| ()).map_err(error)
    }

    fn sync(&self) -> std::io::Result<()> {
        self.db.flush().map_err(std::io::Error::other)?;
        self.files.sync()
    }
}

impl SledDb {
    /// Blob files synced since open (for tests).
    pub fn blobs_synced(&self) -> u64 {
        self.files.state.lock().unwrap_or_else(|e| e.into_inner()).synced
    }

    /// Whether new blobs are found by inotify (for tests).
    pub fn watches_blobs(&self) -> bool {
        self.files.state.lock().unwrap_or_else(|e| e.into_inner()).watch.is_some()
    }

    /// Finds new blobs by listing their directory from now on (for tests).
    pub fn stop_watching_blobs(&self) {
        self.files.state.lock().unwrap_or_else(|e| e.into_inner()).watch = None;
    }
}

impl Tree for SledTree {
    type Bytes = sled::IVec;

    fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, Error> {
        self.0.get(key).map_err(error)
    }

    fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        self.0.insert(key, value).map(|_| ()).map_err(error)
    }

    fn remove(&self, key: &[u8]) -> Result<(), Error> {
        self.0.remove(key).map(|_| ()).map_err(error)
    }

    fn apply(&self, batch: Batch) -> Result<(), Error> {
        let mut b = sled::Batch::default();
        for (key, value) in batch.ops {
            match value {
                Some(v) => b.insert(key, v),
                None => b.remove(key),
            }
        }
        self.0.apply_batch(b).map_err(error)
    }

    fn first(&self) -> Result<Option<KeyValue<sled::IVec>>, Error> {
        self.0.first().map_err(error)
    }

    fn last(&self) -> Result<Option<KeyValue<sled::IVec>>, Error> {
        self.0.last().map_err(error)
    }

    fn range(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
    ) -> impl Iterator<Item = Result<KeyValue<sled::IVec>, Error>> + Send {
        self.0.range::<&[u8], _>((start, end)).map(|r| r.map_err(error))
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// sled's own files, for [`SledDb`]'s `sync`.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> SledDb {
        SledDb::open(path, &Options::default()).expect("open")
    }

    #[test]
    fn sync_covers_the_files_of_large_values() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let db = open(tmp.path());
        assert!(db.watches_blobs(), "inotify is unavailable here");
        let tree = db.tree("log").expect("tree");
        tree.insert(b"small", &[1u8; 100]).expect("insert");
        db.sync().expect("sync");
        assert_eq!(db.blobs_synced(), 0, "no blob yet");
        // Far above sled's inline limit: it goes to a file of its own.
        tree.insert(b"large", &vec![2u8; 600 * 1024]).expect("insert");
        db.sync().expect("sync");
        let blobs = std::fs::read_dir(tmp.path().join("blobs")).expect("blobs").count();
        assert!(blobs >= 1, "sled wrote no blob file");
        let synced = db.blobs_synced();
        assert!(synced >= 1, "the blob was not synced");
        // A second sync has nothing new to sync and still succeeds.
        db.sync().expect("sync");
        assert_eq!(db.blobs_synced(), synced);
        drop((tree, db));
        let mut reopened = SledDb::open(tmp.path(), &Options::default());
        for _ in 0..250 {
            // sled's threads may hold the lock a moment after the drop.
            if !matches!(reopened, Err(Error::Locked)) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            reopened = SledDb::open(tmp.path(), &Options::default());
        }
        let tree = reopened.expect("reopen").tree("log").expect("tree");
        assert_eq!(tree.get(b"large").expect("get").expect("kept").len(), 600 * 1024);
    }

    #[test]
    fn without_a_watch_the_listing_finds_new_blobs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let db = open(tmp.path());
        db.stop_watching_blobs();
        db.tree("log").expect("tree").insert(b"large", &vec![2u8; 600 * 1024]).expect("insert");
        db.sync().expect("sync");
        let synced = db.blobs_synced();
        assert!(synced >= 1, "the blob was not synced");
        db.sync().expect("sync");
        assert_eq!(db.blobs_synced(), synced, "an old blob was synced again");
    }

    #[test]
    fn a_second_open_is_refused_as_locked_and_trees_keep_order() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let db = open(tmp.path());
        assert!(matches!(SledDb::open(tmp.path(), &Options::default()), Err(Error::Locked)));
        let t = db.tree("t").expect("tree");
        let mut batch = Batch::default();
        for k in [3u8, 1, 2] {
            batch.insert(vec![k], vec![k * 10]);
        }
        t.apply(batch).expect("batch");
        let keys: Vec<u8> = t.iter().map(|r| r.expect("entry").0[0]).collect();
        assert_eq!(keys, [1, 2, 3]);
        let from_2: Vec<u8> =
            t.range(Bound::Included(&[2u8][..]), Bound::Unbounded).map(|r| r.expect("entry").0[0]).collect();
        assert_eq!(from_2, [2, 3]);
        assert_eq!(t.last().expect("last").map(|(k, _)| k[0]), Some(3));
        assert!(db.tree_names().contains(&"t".to_string()));
    }
}
