//! What the leader tells workers, and the typed outcomes it hears back, as
//! the jobs domain sees them. The worker session ([`crate::grpc::workers`])
//! converts them from and to protobuf.

use ferry_storage::FileEntry;

/// A command for one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToWorker {
    /// As a source: chunk and hash these files.
    Index {
        /// Echoed in the answer.
        request: u64,
        /// Absolute paths under the source's roots.
        paths: Vec<String>,
    },
    /// As a target: look at what is held already for the job's files.
    Prepare {
        /// The job.
        job: String,
        /// Each file's manifest and its destination on this target.
        files: Vec<(FileEntry, String)>,
    },
    /// As a target: fetch one chunk from a holder.
    Pull {
        /// The job.
        job: String,
        /// The file's index.
        file: u32,
        /// The chunk's index.
        chunk: u32,
        /// The holder.
        from_worker: String,
        /// The holder's chunk service.
        from_addr: String,
    },
    /// As a target holding every chunk: install, run the hook, report.
    Pack {
        /// The job.
        job: String,
        /// The job's hook (empty: none).
        hook: String,
    },
    /// Drop the job's staged data.
    Cancel {
        /// The job.
        job: String,
    },
    /// As a future target: could these destinations be written?
    Check {
        /// Echoed in the answer.
        request: u64,
        /// Absolute paths on the worker.
        destinations: Vec<String>,
    },
    /// Stop taking work, finish what is in flight, exit (0.2.0 workers).
    Drain,
}

/// A worker's answer to a request the leader waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// To [`ToWorker::Index`].
    Indexed(Indexed),
    /// To [`ToWorker::Check`]: `Err` names a destination it may not write.
    Checked(Result<(), String>),
}

/// Why a target's pull failed (see `ferry.v1.PullFailure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullFailure {
    /// Another pull of this chunk runs on the target; its answer will come.
    AlreadyPulling,
    /// The holder is at its upload limit.
    HolderBusy,
    /// The target does not know the job (it restarted).
    NotPrepared,
    /// The target has packed the job already.
    AlreadyInstalled,
    /// The bytes failed their BLAKE3 check.
    BadChunk,
    /// The holder sent nothing for the target's stall timeout.
    Stalled,
    /// The holder could not be reached, refused, or sent the wrong length.
    Holder,
    /// The target itself failed.
    Local,
    /// The holder no longer has the chunk: its file changed or was deleted.
    Gone,
}

/// What a source found when asked to index: one manifest per path, or why
/// not (shown to the user as the `files` field's problem).
pub type Indexed = Result<Vec<FileEntry>, String>;
