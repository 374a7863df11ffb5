//! Where this worker holds each chunk it knows, by hash: a source file, a
//! staging file of a running job, or an installed file. Kept in a small
//! database in the worker's data directory (`ferry_db`; sled today, in
//! `chunks.sled`) so a restarted worker resumes; every use re-checks the
//! bytes against the hash, so a stale entry costs a miss, never a wrong byte.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ferry_db::{Db, Store, Tree};
use serde::{Deserialize, Serialize};

/// The format of the store's entries, marked in its `meta` tree. (Stores
/// made before the mark moved there, from sled's default tree, hold the
/// same format and are marked on open.)
const FORMAT: u8 = 1;
const KEY_FORMAT: &[u8] = b"format";

/// A place where a chunk's bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// The file.
    pub path: PathBuf,
    /// Offset in it.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (or the directory is locked by another worker).
    #[error("worker data directory {path}: {source}")]
    Open { path: PathBuf, source: ferry_db::Error },
    /// A format this binary does not know.
    #[error("worker data directory {path} has format {found}; this ferry supports {FORMAT}")]
    Format { path: PathBuf, found: u8 },
    /// The database failed while running.
    #[error("chunk store: {0}")]
    Db(#[from] ferry_db::Error),
    /// The blocking task running a flush failed.
    #[error("chunk store flush task: {0}")]
    Task(String),
}

/// The chunk location index. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ChunkStore {
    db: Db,
    chunks: <Db as Store>::Tree,
    /// path -> (stamp, index) of files indexed before.
    files: <Db as Store>::Tree,
}

/// What identifies one state of a file: if any of these changed, so may
/// have its bytes (a write always moves ctime, which users cannot set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        })
    }
}

impl ChunkStore {
    /// [`ChunkStore::open`]; a store that cannot be opened (damaged, or of
    /// a format this binary does not know) is only a cache of where chunks
    /// are: it is moved aside (`chunks.sled.damaged-<unix seconds>`) and
    /// started afresh, with a warning. Chunk locations come back as files
    /// are indexed and installed again. A store locked by another running
    /// worker is never touched.
    pub fn open_or_rebuild(dir: &Path) -> Result<Self, StoreError> {
        match Self::open(dir) {
            Err(StoreError::Open { source: ferry_db::Error::Locked, .. }) => Self::open(dir),
            Err(damaged) => {
                let path = dir.join("chunks.sled");
                let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                let aside = dir.join(format!("chunks.sled.damaged-{}", secs.as_secs()));
                tracing::warn!(error = %damaged, aside = %aside.display(),
                    "the chunk index cannot be opened; it is only a cache: moving it aside and starting a new one");
                std::fs::rename(&path, &aside)
                    .map_err(|e| StoreError::Open { path: path.clone(), source: e.into() })?;
                Self::open(dir)
            }
            ok => ok,
        }
    }

    /// Opens (or creates) the store under `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("chunks.sled");
        // sled's own defaults, which the worker has always run with: a large
        // cache it rarely fills, and a background flush every 500 ms beside
        // the flush before each acknowledgement.
        let options = ferry_db::Options {
            cache_bytes: 1024 * 1024 * 1024,
            flush_every: Some(std::time::Duration::from_millis(500)),
        };
        let db = Db::open(&path, &options).map_err(|source| StoreError::Open { path: path.clone(), source })?;
        let meta = db.tree("meta")?;
        match meta.get(KEY_FORMAT)? {
            Some(v) if v.as_ref() != [FORMAT] => {
                return Err(StoreError::Format { path, found: v.as_ref().first().copied().unwrap_or(0) })
            }
            Some(_) => {}
            None => meta.insert(KEY_FORMAT, &[FORMAT])?,
        }
        let chunks = db.tree("chunks")?;
        let files = db.tree("files")?;
        Ok(Self { db, chunks, files })
    }

    /// Records that `hash` can be read at `loc`.
    pub fn put(&self, hash: &[u8; 32], loc: &Location) -> Result<(), StoreError> {
        if let Ok(raw) = postcard::to_stdvec(loc) {
            self.chunks.insert(hash, &raw)?;
        }
        Ok(())
    }

    /// Makes every recorded location durable (before a chunk is acknowledged).
    pub async fn flush(&self) -> Result<(), StoreError> {
        // On a blocking thread of tokio's, not an async flush of sled's:
        // that waits on a thread of sled's own small I/O pool, whose
        // threads also write the buffers being waited for. With many
        // flushes at once (six workers in one `ferry demo` process, four
        // pulls each) every pool thread waited and nothing wrote.
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush()).await.map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(())
    }

    /// Where `hash` is, if known.
    pub fn get(&self, hash: &[u8; 32]) -> Option<Location> {
        let raw = self.chunks.get(hash).ok()??;
        postcard::from_bytes(raw.as_ref()).ok()
    }

    /// Forgets `hash` (its location proved stale).
    pub fn forget(&self, hash: &[u8; 32]) {
        let _ = self.chunks.remove(hash);
    }

    /// Blocking. The index of the file at `path`: remembered from an earlier
    /// call if the file has not changed since (same inode, size, mtime and
    /// ctime), else computed and remembered. Re-hashing a 200 MB file on
    /// every update would cost seconds of CPU per job.
    pub fn index(&self, path: &Path) -> std::io::Result<crate::index::IndexedFile> {
        let key = path.as_os_str().as_encoded_bytes();
        let before = Stamp::of(path);
        if let (Some(now), Ok(Some(raw))) = (before, self.files.get(key)) {
            if let Ok((stamp, file)) = postcard::from_bytes::<(Stamp, crate::index::IndexedFile)>(raw.as_ref()) {
                if stamp == now {
                    return Ok(file);
                }
            }
        }
        let file = crate::index::index_file(path)?;
        // Remembered only if nothing moved while it was read.
        if before.is_some() && before == Stamp::of(path) {
            self.remember(path, before, &file);
        }
        Ok(file)
    }

    /// Blocking. Records that the file at `path`, as it is now, has `file`'s
    /// content (after an install that checked it).
    pub fn remember_installed(&self, path: &Path, file: &crate::index::IndexedFile) {
        self.remember(path, Stamp::of(path), file);
    }

    fn remember(&self, path: &Path, stamp: Option<Stamp>, file: &crate::index::IndexedFile) {
        let key = path.as_os_str().as_encoded_bytes();
        match stamp.and_then(|s| postcard::to_stdvec(&(s, file)).ok()) {
            Some(raw) => {
                let _ = self.files.insert(key, &raw);
            }
            None => {
                let _ = self.files.remove(key);
            }
        }
    }

    /// Forgets every chunk recorded in `path`.
    fn forget_file(&self, path: &Path) {
        for (key, raw) in self.chunks.iter().flatten() {
            if postcard::from_bytes::<Location>(raw.as_ref()).is_ok_and(|l| l.path == path) {
                let _ = self.chunks.remove(key.as_ref());
            }
        }
    }
}

/// Replaced versions of installed files, kept so their chunks stay
/// reusable (an update that reverts, or moves data around, transfers
/// nothing it had before). Each is a hard link under `retained/` in the data
/// directory, so keeping one costs no copy; a destination on another file
/// system is not kept. The oldest go first once the total passes the
/// configured bound (`--store-limit`; 0 keeps none).
#[derive(Clone, Debug)]
pub struct Retained {
    dir: PathBuf,
    limit: u64,
    bytes: Arc<AtomicU64>,
    seq: Arc<AtomicU64>,
}

impl Retained {
    /// The retained versions under `data_dir`, bounded to `limit` bytes
    /// (trimmed now if the bound shrank).
    pub fn open(data_dir: &Path, limit: u64, store: &ChunkStore) -> std::io::Result<Self> {
        let dir = data_dir.join("retained");
        std::fs::create_dir_all(&dir)?;
        let r = Self { dir, limit, bytes: Arc::default(), seq: Arc::default() };
        let last = r.list().last().and_then(|(name, _)| name.split('-').next()?.parse::<u64>().ok()).unwrap_or(0);
        r.seq.store(last + 1, Ordering::Relaxed);
        r.trim(store);
        Ok(r)
    }

    /// Bytes kept now.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Blocking. Keeps the file at `path` (a regular file about to be
    /// replaced) and records `chunks` (its content) there; then trims.
    pub fn keep(&self, store: &ChunkStore, path: &Path, chunks: &[crate::index::ChunkRef]) {
        if self.limit == 0 {
            return;
        }
        let Ok(meta) = std::fs::symlink_metadata(path) else { return };
        if !meta.is_file() || meta.len() > self.limit {
            return;
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let kept = self.dir.join(format!("{:020}-{name}", self.seq.fetch_add(1, Ordering::Relaxed)));
        if let Err(e) = std::fs::hard_link(path, &kept) {
            tracing::debug!(path = %path.display(), error = %e, "previous version not kept");
            return;
        }
        for c in chunks {
            let _ = store.put(&c.hash, &Location { path: kept.clone(), offset: c.offset, len: c.len });
        }
        self.trim(store);
    }

    /// (name, size) of every kept file, oldest first.
    fn list(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Some((e.file_name().into_string().ok()?, e.metadata().ok()?.len())))
            .collect();
        out.sort();
        out
    }

    /// Removes the oldest kept files until the total fits the bound.
    fn trim(&self, store: &ChunkStore) {
        let kept = self.list();
        let mut total: u64 = kept.iter().map(|(_, len)| len).sum();
        for (name, len) in kept {
            if total <= self.limit {
                break;
            }
            let path = self.dir.join(&name);
            store.forget_file(&path);
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
        self.bytes.store(total, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::ChunkRef;

    #[test]
    fn a_file_is_indexed_again_only_when_it_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open(dir.path()).expect("store");
        let file = dir.path().join("f");
        std::fs::write(&file, vec![7u8; 3 << 20]).expect("write");
        let first = store.index(&file).expect("index");
        assert_eq!(store.index(&file).expect("again"), first);
        // Same size, new bytes: the stamp moved, so the index is new.
        std::fs::write(&file, vec![8u8; 3 << 20]).expect("rewrite");
        let second = store.index(&file).expect("index changed");
        assert_ne!(second.blake3, first.blake3);
        assert_eq!(second, crate::index::index_file(&file).expect("fresh index"));
    }

    #[test]
    fn retained_versions_stay_within_the_bound_oldest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open(dir.path()).expect("store");
        let kept = Retained::open(dir.path(), 25, &store).expect("retained");
        let mut hashes = Vec::new();
        for i in 0..3u8 {
            let file = dir.path().join(format!("f{i}"));
            std::fs::write(&file, [i; 10]).expect("write");
            let hash = *blake3::hash(&[i; 10]).as_bytes();
            kept.keep(&store, &file, &[ChunkRef { offset: 0, len: 10, hash }]);
            // The file is replaced afterwards; the kept link still holds it.
            std::fs::remove_file(&file).expect("remove");
            hashes.push(hash);
        }
        assert_eq!(kept.bytes(), 20);
        assert!(store.get(&hashes[0]).is_none(), "the oldest version went, and its chunks with it");
        for h in &hashes[1..] {
            let loc = store.get(h).expect("kept chunk");
            assert_eq!(std::fs::read(&loc.path).expect("kept file").len(), 10);
        }
        // Reopened with a smaller bound, it trims at once; 0 keeps nothing.
        let kept = Retained::open(dir.path(), 10, &store).expect("reopen");
        assert_eq!(kept.bytes(), 10);
        let none = Retained::open(dir.path(), 0, &store).expect("reopen");
        assert_eq!(none.bytes(), 0);
        assert!(hashes.iter().all(|h| store.get(h).is_none()));
    }

    #[test]
    fn a_damaged_index_is_moved_aside_and_started_afresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open_or_rebuild(dir.path()).expect("store");
        store.put(&[1; 32], &Location { path: "/x".into(), offset: 0, len: 1 }).expect("put");
        drop(store);
        // A format byte this binary does not know, as a damaged page would
        // read: the plain open refuses it.
        {
            let db = Db::open(&dir.path().join("chunks.sled"), &ferry_db::Options::default()).expect("db");
            db.tree("meta").expect("meta").insert(KEY_FORMAT, &[0xee]).expect("insert");
        }
        assert!(ChunkStore::open(dir.path()).is_err());
        let store = ChunkStore::open_or_rebuild(dir.path()).expect("rebuilt");
        assert!(store.get(&[1; 32]).is_none(), "a fresh index");
        let aside = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("chunks.sled.damaged-"));
        assert_eq!(aside.count(), 1, "the damaged one is kept aside");
    }
}
