//! What the workloads did, as the checkers read it: every operation with
//! its call, its outcome and the times around it.
//!
//! An outcome is `ok` (it happened, with this result), `fail` (it surely
//! did not happen: the cluster refused it) or `unknown` (it may have
//! happened: the client gave up, the connection broke). Times are
//! nanoseconds since the run started, taken on this machine's monotonic
//! clock before the call and after its answer. The history is written as
//! JSONL, two lines an operation (`invoke`, then `ok`/`fail`/`unknown`), in
//! time order.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "f", rename_all = "snake_case")]
pub enum Call {
    /// A linearizable read.
    Read,
    /// A plain put.
    Write { value: String },
    /// A put if the key's modify revision is `expect` (0: absent).
    Cas { expect: u64, value: String },
}

/// What it got.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// A read's answer: the value and its modify revision, or absent.
    Read { value: Option<(String, u64)> },
    /// A write or a CAS happened at this revision.
    Written { revision: u64 },
    /// The CAS was refused: the revision differed (it surely did not happen).
    Mismatch,
    /// Refused or failed in a way that surely did not change anything.
    Fail { reason: String },
    /// May or may not have happened.
    Unknown { reason: String },
}

/// One operation of one client.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Op {
    /// Which client (a client does one operation at a time).
    pub process: usize,
    pub key: String,
    pub call: Call,
    pub outcome: Outcome,
    /// Nanoseconds since the run started, before the call.
    pub invoke: u64,
    /// After the answer (for `Unknown`: when the client gave up; the
    /// operation may take effect any time after `invoke`).
    pub complete: u64,
}

impl Op {
    /// Whether the operation surely took no effect (the checkers drop it).
    pub fn surely_not_done(&self) -> bool {
        matches!((&self.call, &self.outcome), (_, Outcome::Fail { .. }) | (Call::Read, Outcome::Unknown { .. }))
    }
}

/// The shared record of a run.
#[derive(Debug, Clone)]
pub struct History {
    started: Instant,
    ops: Arc<Mutex<Vec<Op>>>,
}

impl History {
    pub fn new(started: Instant) -> Self {
        Self { started, ops: Arc::default() }
    }

    /// Nanoseconds since the run started.
    pub fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    pub fn record(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    /// Every operation so far, in the order they completed.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The history as JSONL: an `invoke` line and an outcome line per
/// operation, in time order.
pub fn to_jsonl(ops: &[Op]) -> String {
    let mut lines: Vec<(u64, u8, serde_json::Value)> = Vec::with_capacity(ops.len() * 2);
    for op in ops {
        let invoke = serde_json::json!({
            "time_ns": op.invoke, "process": op.process, "type": "invoke", "key": op.key, "call": op.call,
        });
        let kind = match op.outcome {
            Outcome::Unknown { .. } => "unknown",
            Outcome::Fail { .. } | Outcome::Mismatch => "fail",
            _ => "ok",
        };
        let done = serde_json::json!({
            "time_ns": op.complete, "process": op.process, "type": kind, "key": op.key, "call": op.call,
            "result": op.outcome,
        });
        lines.push((op.invoke, 0, invoke));
        lines.push((op.complete, 1, done));
    }
    lines.sort_by_key(|(time, order, _)| (*time, *order));
    lines.into_iter().map(|(_, _, line)| line.to_string() + "\n").collect()
}
