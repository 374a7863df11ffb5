//! Ferry's replicated storage: the openraft log store on sled and the state
//! machine in memory, made durable by that log and snapshot files.
//!
//! openraft (storage-v2) drives two objects built by [`open`]:
//! [`LogStore`] keeps the vote and the log, [`StateMachineStore`] applies
//! committed [`Command`]s and builds and installs snapshots (files). Readers in
//! the scheduler share the applied state through [`StateReader`].
//!
//! Layout:
//! - [`db`] — opening the data directory, `data_version`, sled errors.
//! - [`codec`] — the versioned binary encoding of log entries and RPC payloads.
//! - [`command`] — the commands in the log and their results.
//! - [`kv`] — configuration keys, their limits and revisions.
//! - [`jobs`] — workers and file distribution jobs.
//! - [`log_store`] — `RaftLogStorage`, and its journal (`journal.rs`).
//! - [`log_sync`] — how far the log is durable: the leader's early appends.
//! - `state_file` — the vote and the other facts kept outside sled;
//!   `start_check` — what a start compares against them.
//! - [`state_machine`] — `RaftStateMachine`, reads, digests.
//! - [`snapshot`] — the snapshot file format.
//! - [`registry`] — service registry instances as stored.
//! - [`upgrade`] — conversions of what older format versions wrote.

// openraft's `StorageError` is large (it carries ids and a backtrace-capable
// source); its trait methods fix that return type, so boxing is not an option.
#![allow(clippy::result_large_err)]

pub mod codec;
pub mod command;
pub mod crash;
pub mod db;
pub mod error;
pub mod jobs;
pub(crate) mod journal;
pub mod kv;
pub mod log_store;
pub mod log_sync;
pub mod probes;
pub mod registry;
pub mod snapshot;
pub(crate) mod start_check;
pub(crate) mod state_file;
pub mod state_machine;
pub mod upgrade;

pub use command::{Command, CommandResult, Op};
pub use db::{open, DataDir, OpenOptions};
pub use error::Error;
pub use jobs::{Chunk, FileEntry, Job, JobEvent, JobPhase, Target, TargetPhase, Via, WorkerRecord};
pub use kv::{KeyValue, MAX_KEY_BYTES, MAX_VALUE_BYTES};
pub use log_store::LogStore;
pub use log_sync::LogSync;
pub use state_machine::{Digest, Page, PageError, PageLimits, StateMachineStore, StateReader};

/// Node ids are small integers chosen by the operator (`--id`).
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// openraft types for Ferry's scheduler group.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        SnapshotData = tokio::fs::File,
);

/// openraft's storage error for this type config.
pub type RaftStorageError = openraft::StorageError<NodeId>;
