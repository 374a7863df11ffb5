//! The ordered key-value store under Ferry's data directories: the Raft
//! log and metadata of a scheduler (`ferry-storage`), the chunk index of a
//! worker (`ferry-worker`). Both reach it only through the traits here,
//! [`Store`] and [`Tree`]: what they need of a database (named trees of
//! byte keys in order, batches, a flush that survives a crash of the
//! process, a sync that survives a power loss) and nothing more.
//!
//! Layout: the traits and [`Error`] here; sled 0.34, today's backend, in
//! [`sled`]. Another backend is one more module beside it, and [`Db`] names
//! the one in use.

#![warn(missing_docs)]

pub mod sled;

use std::fmt::Debug;
use std::ops::Bound;
use std::path::Path;
use std::time::Duration;

/// The backend Ferry uses.
pub type Db = sled::SledDb;

/// Why a store could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process holds the store's lock.
    #[error("in use by another running process")]
    Locked,
    /// The store's files are damaged.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// Reading or writing its files failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Anything else the backend reported.
    #[error("{0}")]
    Other(String),
}

/// A key and its value, as a tree hands them out.
pub type KeyValue<B> = (B, B);

/// Tuning for [`Store::open`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Page cache, in bytes.
    pub cache_bytes: u64,
    /// Flush in the background this often (`None`: only when asked).
    pub flush_every: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Self { cache_bytes: 64 * 1024 * 1024, flush_every: None }
    }
}

/// Writes applied together: every one or none.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// (key, new value or `None` to remove), in order.
    pub ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    /// Sets `key` to `value`.
    pub fn insert(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), Some(value.into())));
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), None));
    }
}

/// A database of named trees in one directory. Cheap to clone; clones
/// share it.
pub trait Store: Clone + Send + Sync + Debug + 'static {
    /// One tree of this store.
    type Tree: Tree;

    /// Opens (creating if needed) the store in directory `path`.
    fn open(path: &Path, options: &Options) -> Result<Self, Error>;

    /// The tree `name`, created empty if new.
    fn tree(&self, name: &str) -> Result<Self::Tree, Error>;

    /// The names of the trees in the store.
    fn tree_names(&self) -> Vec<String>;

    /// Removes tree `name` and everything in it.
    fn drop_tree(&self, name: &str) -> Result<(), Error>;

    /// Makes every write so far reach the store's files: it survives a
    /// crash of the process (not a power loss). Blocking.
    fn flush(&self) -> Result<(), Error>;

    /// Makes every write so far durable, also across a power loss: a
    /// [`Store::flush`], then `fdatasync` of every file it wrote. Blocking.
    fn sync(&self) -> std::io::Result<()>;
}

/// An ordered map of byte keys to byte values. Cheap to clone.
pub trait Tree: Clone + Send + Sync + Debug + 'static {
    /// A value (or key) as the backend hands it out, without a copy.
    type Bytes: AsRef<[u8]> + Clone + Send + Sync + Debug;

    /// The value of `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Self::Bytes>, Error>;

    /// Sets `key` to `value`.
    fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), Error>;

    /// Removes `key` (nothing if absent).
    fn remove(&self, key: &[u8]) -> Result<(), Error>;

    /// Applies every write of `batch`, atomically.
    fn apply(&self, batch: Batch) -> Result<(), Error>;

    /// The first entry in key order.
    fn first(&self) -> Result<Option<KeyValue<Self::Bytes>>, Error>;

    /// The last entry in key order.
    fn last(&self) -> Result<Option<KeyValue<Self::Bytes>>, Error>;

    /// The entries between `start` and `end`, in key order.
    fn range(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
    ) -> impl Iterator<Item = Result<KeyValue<Self::Bytes>, Error>> + Send;

    /// Every entry, in key order.
    fn iter(&self) -> impl Iterator<Item = Result<KeyValue<Self::Bytes>, Error>> + Send {
        self.range(Bound::Unbounded, Bound::Unbounded)
    }

    /// The number of entries (may walk the tree).
    fn len(&self) -> usize;

    /// True if it holds nothing.
    fn is_empty(&self) -> bool;
}
