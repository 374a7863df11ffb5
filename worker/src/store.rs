//! Where this worker holds each chunk it knows, by hash: a source file, a
//! staging file of a running job, or an installed file. Kept in a small sled
//! database in the worker's data directory so a restarted worker resumes;
//! every use re-checks the bytes against the hash, so a stale entry costs a
//! miss, never a wrong byte.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
    /// sled failed (or the directory is locked by another worker).
    #[error("worker data directory {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    /// A format this binary does not know.
    #[error("worker data directory {path} has format {found}; this ferry supports {FORMAT}")]
    Format { path: PathBuf, found: u8 },
    /// sled failed while running.
    #[error("chunk store: {0}")]
    Sled(#[from] sled::Error),
}

/// The chunk location index. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ChunkStore {
    db: sled::Db,
    chunks: sled::Tree,
}

impl ChunkStore {
    /// Opens (or creates) the store under `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("chunks.sled");
        let db = sled::open(&path).map_err(|source| StoreError::Open { path: path.clone(), source })?;
        match db.get(KEY_FORMAT)? {
            Some(v) if v.as_ref() != [FORMAT] => {
                return Err(StoreError::Format { path, found: v.first().copied().unwrap_or(0) })
            }
            Some(_) => {}
            None => {
                db.insert(KEY_FORMAT, &[FORMAT])?;
            }
        }
        let chunks = db.open_tree("chunks")?;
        Ok(Self { db, chunks })
    }

    /// Records that `hash` can be read at `loc`.
    pub fn put(&self, hash: &[u8; 32], loc: &Location) -> Result<(), StoreError> {
        if let Ok(raw) = postcard::to_stdvec(loc) {
            self.chunks.insert(hash, raw)?;
        }
        Ok(())
    }

    /// Makes every recorded location durable (before a chunk is acknowledged).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Where `hash` is, if known.
    pub fn get(&self, hash: &[u8; 32]) -> Option<Location> {
        let raw = self.chunks.get(hash).ok()??;
        postcard::from_bytes(&raw).ok()
    }

    /// Forgets `hash` (its location proved stale).
    pub fn forget(&self, hash: &[u8; 32]) {
        let _ = self.chunks.remove(hash);
    }
}
