//! Errors of the storage crate, each naming the operation that failed.

use std::path::PathBuf;

/// What went wrong while opening or using a data directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process holds the sled lock on this directory.
    #[error(
        "data directory {path} is in use by another running process (sled lock held); stop it or pick another --data"
    )]
    Locked { path: PathBuf },
    /// The directory was written by a format this binary does not know.
    #[error("data directory {path} has data format version {found}; this ferry supports version {supported}. Use a matching ferry binary")]
    UnknownVersion { path: PathBuf, found: u32, supported: u32 },
    /// The directory holds data but no (readable) format version, or sled found corruption.
    #[error("data directory {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The directory lost something its node had promised the others (see
    /// [`crate::start_check`]): the node must not vote again under its id.
    #[error(
        "data directory {path} is damaged: {reason}. This node may have lost a vote or entries it acknowledged, \
             so it will not start under its id again. Remove it from the cluster (cluster remove-node), move the \
             directory aside for inspection, and add an empty one under a new --id (cluster add-node); see \
             docs/operations/safety.md"
    )]
    Damaged { path: PathBuf, reason: String },
    /// The directory is another node's.
    #[error(
        "data directory {path} belongs to node {found}, not node {expected} (--id): a node's data cannot serve \
             another id. Start node {found} on it, or give node {expected} its own directory (an empty one joins \
             as a new member with cluster add-node)"
    )]
    WrongNode { path: PathBuf, found: u64, expected: u64 },
    /// An I/O error while opening.
    #[error("cannot open data directory {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    /// The database under the data directory failed.
    #[error("storage {op} failed: {source}")]
    Store { op: &'static str, source: ferry_db::Error },
    /// A value could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    /// A snapshot file could not be written or read.
    #[error("snapshot {op} failed: {source}")]
    Snapshot { op: &'static str, source: std::io::Error },
}
