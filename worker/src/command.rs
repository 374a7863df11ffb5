//! The leader's commands to a worker and the worker's reports, as the
//! worker handles them. They travel as protobuf (`ferry.v1.ControlMessage`
//! and `WorkerMessage`); the session converts at its edge
//! ([`crate::session`]), so the executor never sees a wire type, and the
//! leader plans by typed outcomes ([`PullFailure`]), never by message text.

pub use crate::index::{ChunkRef, IndexedFile as Manifest};

/// What the leader asks a worker to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// As a source: chunk and hash these files (under the roots).
    Index {
        /// Echoed in the answer.
        request: u64,
        /// Absolute paths.
        paths: Vec<String>,
    },
    /// As a target: look at what is held already for this job's files.
    Prepare {
        /// The job.
        job: String,
        /// Each file's manifest and where it goes here.
        files: Vec<TargetFile>,
    },
    /// As a target: fetch one chunk from a peer.
    Pull(Pull),
    /// As a target holding every chunk: check, install, run the hook.
    Pack {
        /// The job.
        job: String,
        /// A hook named in this worker's config, or empty.
        hook: String,
    },
    /// Drop the job's staged data.
    Cancel {
        /// The job.
        job: String,
    },
    /// As a future target: could these destinations be written? Nothing
    /// is created.
    Check {
        /// Echoed in the answer.
        request: u64,
        /// Absolute paths.
        destinations: Vec<String>,
    },
    /// Take no new work, finish what is in flight, then stop ([`crate::drain`]).
    Drain,
}

/// One file of a job on this target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetFile {
    /// The source's manifest (path, size, mode, hashes, chunks).
    pub manifest: Manifest,
    /// Where the file goes on this worker.
    pub destination: String,
}

/// One chunk to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pull {
    /// The job.
    pub job: String,
    /// The file's index in the job.
    pub file: u32,
    /// The chunk's index in the file.
    pub chunk: u32,
    /// The peer to fetch it from.
    pub from_worker: String,
    /// That peer's chunk service.
    pub from_addr: String,
}

/// What a worker tells the leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Answer to [`Command::Index`]: the manifests, or why not.
    Indexed {
        /// The request answered.
        request: u64,
        /// One manifest per path, in order.
        result: Result<Vec<Manifest>, String>,
    },
    /// Answer to [`Command::Prepare`].
    Prepared {
        /// The job.
        job: String,
        /// What is held already, or why the job cannot run here.
        result: Result<Held, String>,
    },
    /// A pull's chunk is written and verified.
    Pulled {
        /// The job.
        job: String,
        /// The file's index.
        file: u32,
        /// The chunk's index.
        chunk: u32,
        /// Where it came from.
        from: String,
    },
    /// A pull failed.
    PullFailed {
        /// The job.
        job: String,
        /// The file's index.
        file: u32,
        /// The chunk's index.
        chunk: u32,
        /// The peer asked.
        from: String,
        /// Why.
        error: PullError,
    },
    /// Answer to [`Command::Pack`].
    Fin(Fin),
    /// Answer to [`Command::Check`]: fine, or why a destination is not.
    Checked {
        /// The request answered.
        request: u64,
        /// `Err`: the first destination that may not be written, and why.
        result: Result<(), String>,
    },
}

/// What a target holds for a job after prepare.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// Files already identical at their destination.
    pub unchanged: Vec<u32>,
    /// Chunks found locally and in staging: (file, chunk).
    pub local: Vec<(u32, u32)>,
}

/// How a pack ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fin {
    /// The job.
    pub job: String,
    /// Installed (and the hook, if any, exited 0).
    pub ok: bool,
    /// Why not, in words.
    pub reason: String,
    /// The hook's exit code, if it ran to an end.
    pub hook_exit: Option<i32>,
}

/// Why a pull failed: what the leader plans by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullFailure {
    /// Another pull of this chunk runs here; its answer will come.
    AlreadyPulling,
    /// The holder is at its upload limit.
    HolderBusy,
    /// This worker does not know the job (it restarted).
    NotPrepared,
    /// This worker has packed the job already.
    AlreadyInstalled,
    /// The bytes failed their BLAKE3 check.
    BadChunk,
    /// The holder sent nothing for the stall timeout.
    Stalled,
    /// The holder could not be reached, refused, or sent the wrong length.
    Holder,
    /// This worker failed (its disk, a bad command, stopping).
    Local,
    /// The holder no longer has the chunk: its file changed or was deleted.
    Gone,
}

/// A failed pull: the kind, and what happened in words (for logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullError {
    /// The kind.
    pub failure: PullFailure,
    /// What happened.
    pub detail: String,
}

impl PullError {
    /// A failure of `failure` kind, described by `detail`.
    pub fn new(failure: PullFailure, detail: impl Into<String>) -> Self {
        Self { failure, detail: detail.into() }
    }
}

impl std::fmt::Display for PullError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}
