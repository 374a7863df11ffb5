//! The commands that travel through the Raft log, and what applying them
//! returns.
//!
//! Compatibility rule: variants are only ever appended, never reordered or
//! removed, so older entries keep decoding (see [`crate::codec`]).

use serde::{Deserialize, Serialize};

use crate::jobs::{Job, JobEvent, WorkerRecord};
use crate::kv::Txn;

/// Most job ids in one [`Op::ForgetJobs`].
pub const MAX_FORGET: usize = 1024;

/// One write to the replicated state, as logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Client-chosen idempotency id. A command whose id was applied before
    /// (within the dedup window) is not applied again: it gets the first result.
    /// Empty: no deduplication.
    pub request_id: String,
    /// What to do.
    pub op: Op,
}

/// The operation a [`Command`] performs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create or replace a configuration key.
    Put {
        /// The key (validated: 1..=4096 bytes).
        key: String,
        /// The value (validated: up to 1 MiB). Encoded as one byte string
        /// (same postcard bytes as a `u8` sequence, much faster).
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Remove a configuration key.
    Delete {
        /// The key.
        key: String,
    },
    /// Several commands, applied in order as if logged one after another
    /// (each with its own request id and result). The scheduler packs writes
    /// that arrive together into one entry so they share one fsync.
    Batch(Vec<Command>),
    /// Register (or re-register) a worker.
    RegisterWorker(WorkerRecord),
    /// Start a file distribution job (validated and indexed by the leader).
    CreateJob(Box<Job>),
    /// Progress of jobs, batched.
    JobEvents(Vec<JobEvent>),
    /// Compare-and-write on configuration keys, atomically.
    Txn(Box<Txn>),
    /// Create a lease (its id chosen by the proposer; an existing id is refused).
    LeaseGrant {
        /// Lease id, not 0.
        id: u64,
        /// Time to live.
        ttl_ms: u64,
    },
    /// End leases and delete every key bound to them (explicit revokes and
    /// the leader's expiries, batched).
    LeaseRevoke {
        /// The leases; unknown ids are skipped.
        ids: Vec<u64>,
    },
    /// Create or replace a key bound to a lease (it goes when the lease ends).
    PutLeased {
        /// The key.
        key: String,
        /// The value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// A live lease.
        lease: u64,
    },
    /// Add or replace the gray variant of `key` for `selector`.
    GraySet {
        /// The key.
        key: String,
        /// Who sees the variant (not empty).
        selector: crate::kv::Selector,
        /// The variant's value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Make a variant the key's main value (a put) and remove it.
    GrayPromote {
        /// The key.
        key: String,
        /// Which variant; empty: the only one.
        selector: crate::kv::Selector,
    },
    /// Remove a variant of `key`; an empty selector removes them all.
    GrayDrop {
        /// The key.
        key: String,
        /// Which variant.
        selector: crate::kv::Selector,
    },
    /// Add or replace a probe definition.
    ProbeDefine(Box<crate::probes::ProbeDef>),
    /// Remove a probe and its results.
    ProbeDelete {
        /// The probe.
        name: String,
    },
    /// A worker's latest results for a probe (replacing its earlier ones).
    ProbeReport {
        /// The probe.
        probe: String,
        /// The worker's results and output state.
        state: crate::probes::WorkerProbe,
    },
    /// Drop finished jobs from the state (the leader keeps the newest
    /// `job_history`). A job still running is kept. Added in 0.2.0: the
    /// leader proposes it only once every member runs 0.2.0 or later.
    ForgetJobs {
        /// Job ids; unknown ones are skipped.
        ids: Vec<String>,
    },
}

/// The result of applying one log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CommandResult {
    /// A blank or membership entry: nothing to report.
    #[default]
    None,
    /// A put took effect at `revision`.
    Put {
        /// Cluster revision after the put (the key's new modify revision).
        revision: u64,
        /// Revision at which the key was created.
        create_revision: u64,
        /// The key's version after the put (1 for a new key).
        version: u64,
    },
    /// A delete was applied.
    Delete {
        /// Cluster revision after the delete (unchanged if nothing was deleted).
        revision: u64,
        /// Whether the key existed.
        deleted: bool,
    },
    /// The results of an [`Op::Batch`], one per command, in order.
    Batch(Vec<CommandResult>),
    /// A worker, job or job-progress command took effect.
    Done,
    /// The command was refused by the state machine (it changed nothing).
    Rejected {
        /// Why, naming the field.
        reason: String,
    },
    /// A lease was granted.
    LeaseGranted {
        /// Its id.
        id: u64,
        /// Its TTL.
        ttl_ms: u64,
    },
    /// Leases ended.
    LeasesRevoked {
        /// Cluster revision after their keys were deleted.
        revision: u64,
        /// The ids that existed.
        revoked: Vec<u64>,
    },
    /// A transaction ran.
    Txn {
        /// Whether every compare held (so `success` was applied).
        succeeded: bool,
        /// Cluster revision after it.
        revision: u64,
        /// The first compare that did not hold, in words (empty if none).
        failed: String,
    },
}

impl Command {
    /// Roughly how many bytes the command takes in the log (keys and values).
    pub fn size_hint(&self) -> usize {
        self.request_id.len()
            + match &self.op {
                Op::Put { key, value } => key.len() + value.len(),
                Op::Delete { key } => key.len(),
                Op::Batch(commands) => commands.iter().map(Command::size_hint).sum(),
                Op::RegisterWorker(w) => 256 + w.name.len() + w.roots.iter().map(String::len).sum::<usize>(),
                Op::CreateJob(job) => 512 + job.files.iter().map(|f| 64 + f.chunks.len() * 48).sum::<usize>(),
                Op::JobEvents(events) => events.len() * 64,
                Op::LeaseGrant { .. } => 16,
                Op::LeaseRevoke { ids } => ids.len() * 8,
                Op::PutLeased { key, value, .. } => key.len() + value.len() + 8,
                Op::GraySet { key, value, .. } => key.len() + value.len() + 64,
                Op::GrayPromote { key, .. } | Op::GrayDrop { key, .. } => key.len() + 64,
                Op::ProbeDefine(def) => 256 + def.targets.iter().map(|t| t.url.len() + t.host.len()).sum::<usize>(),
                Op::ProbeDelete { name } => name.len(),
                Op::ProbeReport { probe, state } => probe.len() + state.worker.len() + 64 + state.results.len() * 64,
                Op::ForgetJobs { ids } => ids.iter().map(|id| id.len() + 8).sum(),
                Op::Txn(t) => {
                    let op_size = |o: &crate::kv::TxnOp| match o {
                        crate::kv::TxnOp::Put { key, value } => key.len() + value.len(),
                        crate::kv::TxnOp::Delete { key } => key.len(),
                        crate::kv::TxnOp::PutLeased { key, value, .. } => key.len() + value.len() + 8,
                    };
                    t.compares.len() * 64 + t.success.iter().chain(&t.failure).map(op_size).sum::<usize>()
                }
            }
    }

    /// Checks the limits of every field; the error names the field and rule.
    pub fn validate(&self) -> Result<(), String> {
        if self.request_id.len() > 128 {
            return Err("request_id: must be at most 128 bytes".into());
        }
        match &self.op {
            Op::Put { key, value } => {
                crate::kv::validate_key(key)?;
                crate::kv::validate_value(value)
            }
            Op::Delete { key } => crate::kv::validate_key(key),
            Op::RegisterWorker(w) => {
                if w.name.is_empty() || w.name.len() > 128 {
                    return Err("name: must be 1 to 128 bytes".into());
                }
                Ok(())
            }
            Op::CreateJob(job) => {
                if job.id.is_empty() {
                    return Err("job id: must not be empty".into());
                }
                if job.targets.is_empty() {
                    return Err("targets: the job has no targets".into());
                }
                Ok(())
            }
            Op::JobEvents(_) => Ok(()),
            Op::ForgetJobs { ids } => {
                if ids.len() > MAX_FORGET {
                    return Err(format!("ids: at most {MAX_FORGET} jobs in one command"));
                }
                Ok(())
            }
            Op::Txn(t) => t.validate(),
            Op::LeaseGrant { id, ttl_ms } => {
                if *id == 0 {
                    return Err("id: a lease id is never 0".into());
                }
                crate::kv::validate_ttl(*ttl_ms)
            }
            Op::LeaseRevoke { .. } => Ok(()),
            Op::GraySet { key, selector, value } => {
                crate::kv::validate_key(key)?;
                crate::kv::validate_value(value)?;
                if selector.is_empty() {
                    return Err("selector: a gray variant needs at least one key=value".into());
                }
                Ok(())
            }
            Op::GrayPromote { key, .. } | Op::GrayDrop { key, .. } => crate::kv::validate_key(key),
            Op::PutLeased { key, value, lease } => {
                crate::kv::validate_key(key)?;
                crate::kv::validate_value(value)?;
                if *lease == 0 {
                    return Err("lease: 0 is not a lease id".into());
                }
                Ok(())
            }
            Op::ProbeDefine(def) => crate::probes::validate_def(def),
            Op::ProbeDelete { name } => crate::probes::validate_name(name),
            Op::ProbeReport { probe, state } => {
                crate::probes::validate_name(probe)?;
                if state.worker.is_empty() || state.worker.len() > 128 || state.worker.contains('\0') {
                    return Err("worker: must be 1 to 128 bytes".into());
                }
                if state.results.len() > crate::probes::MAX_TARGETS {
                    return Err(format!("results: at most {} per report", crate::probes::MAX_TARGETS));
                }
                Ok(())
            }
            Op::Batch(commands) => {
                for c in commands {
                    if matches!(c.op, Op::Batch(_)) {
                        return Err("op: a batch must not contain a batch".into());
                    }
                    c.validate()?;
                }
                Ok(())
            }
        }
    }
}
