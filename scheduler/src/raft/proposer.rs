//! Group commit above openraft: writes that arrive while earlier ones are
//! being committed are packed into one log entry (`Op::Batch`).
//!
//! openraft 0.9 appends (and fsyncs) once per `client_write`, so N concurrent
//! puts would cost N fsyncs on every node. The proposer keeps at most
//! [`IN_FLIGHT`] entries in flight; everything that queues up meanwhile goes
//! into the next entry, up to [`MAX_BATCH`] commands or [`MAX_BATCH_BYTES`].
//! A lone write is proposed as itself, so an idle cluster adds no delay:
//! when nothing is queued and a slot is free, the caller's own task proposes
//! it, without the two task hops through the proposer.
//!
//! An entry holds its slot at most the write deadline: openraft 0.9 may
//! never answer a write proposed by a leader that lost its leadership with
//! it in flight (frozen, say), and two such writes would otherwise hold both
//! slots for good, leaving that node unable to write whenever it led again
//! (the chaos harness's `leader-freeze-cas` found it). Its callers get
//! [`Outcome::TimedOut`]: the write may still have been committed.

use std::sync::Arc;
use std::time::Duration;

use ferry_storage::{Command, CommandResult, NodeId, Op, TypeConfig};
use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};
use openraft::{BasicNode, Raft};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Most commands in one entry.
pub const MAX_BATCH: usize = 1024;
/// Most key and value bytes in one batched entry. A single command larger
/// than this (values go up to 1 MiB) is its own entry. Together with
/// `max_batch_entries` this bounds an AppendEntries message, which openraft
/// 0.9 must deliver within one heartbeat interval.
pub const MAX_BATCH_BYTES: usize = 512 * 1024;
/// Most bytes one command may take in the log (encoded): a little over the
/// largest transaction ([`ferry_storage::kv::MAX_TXN_BYTES`]). openraft 0.9
/// gives an AppendEntries one heartbeat interval; an entry several times
/// this size could miss it again and again, and the followers, hearing no
/// heartbeat, would elect a new leader over and over. Requests are bounded
/// field by field before they get here; this is the last line.
pub const MAX_COMMAND_BYTES: usize = 2 * 1024 * 1024;
/// Entries proposed but not yet applied.
pub const IN_FLIGHT: usize = 2;

/// What became of one proposed command.
#[derive(Debug)]
pub enum Outcome {
    /// Applied; the state machine's answer.
    Applied(CommandResult),
    /// This node is not the leader.
    NotLeader(ForwardToLeader<NodeId, BasicNode>),
    /// openraft refused the write or stopped.
    Failed(String),
    /// No answer within the write deadline: it may or may not be committed.
    TimedOut,
}

struct Pending {
    cmd: Command,
    reply: oneshot::Sender<Outcome>,
}

/// Handle to the proposer task. Dropping every handle stops the task.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
    /// Entries in flight, shared with the proposer task.
    slots: Arc<Semaphore>,
    raft: Raft<TypeConfig>,
    /// How long an entry may hold its slot.
    deadline: Duration,
}

impl Proposer {
    /// Starts the proposer task for `raft` on the current runtime; an
    /// entry waits for openraft's answer at most `deadline`.
    pub fn start(raft: Raft<TypeConfig>, deadline: Duration) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        tokio::spawn(run(raft.clone(), rx, slots.clone(), deadline));
        Self { tx, slots, raft, deadline }
    }

    /// Proposes `cmd` and waits for its outcome.
    pub async fn propose(&self, cmd: Command) -> Outcome {
        // Nothing waits before it and a slot is free: propose it from here.
        // Writes that come in meanwhile queue for the proposer task as before.
        if self.tx.capacity() == self.tx.max_capacity() {
            if let Ok(_permit) = self.slots.clone().try_acquire_owned() {
                return write_one(&self.raft, cmd, self.deadline).await;
            }
        }
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Pending { cmd, reply }).await.is_err() {
            return Outcome::Failed("the proposer stopped".into());
        }
        rx.await.unwrap_or_else(|_| Outcome::Failed("the proposer stopped".into()))
    }
}

async fn run(raft: Raft<TypeConfig>, mut rx: mpsc::Receiver<Pending>, slots: Arc<Semaphore>, deadline: Duration) {
    let mut carry: Option<Pending> = None;
    loop {
        // Wait for a slot first, so writes queue up while entries are in flight.
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut bytes = first.cmd.size_hint();
        // A batch goes alone: a batch must not contain a batch.
        let alone = |p: &Pending| matches!(p.cmd.op, Op::Batch(_));
        let single = alone(&first);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && !single {
            match rx.try_recv() {
                Ok(p) => {
                    let w = p.cmd.size_hint();
                    if bytes + w > MAX_BATCH_BYTES || alone(&p) {
                        carry = Some(p);
                        break;
                    }
                    bytes += w;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            commit(&raft, batch, deadline).await;
            drop(permit);
        });
    }
}

/// Proposes one command as its own entry.
async fn write_one(raft: &Raft<TypeConfig>, cmd: Command, deadline: Duration) -> Outcome {
    match tokio::time::timeout(deadline, raft.client_write(cmd)).await {
        Ok(Ok(resp)) => Outcome::Applied(resp.data),
        Ok(Err(e)) => failure(&e),
        Err(_) => Outcome::TimedOut,
    }
}

async fn commit(raft: &Raft<TypeConfig>, mut batch: Vec<Pending>, deadline: Duration) {
    if batch.len() == 1 {
        let Some(p) = batch.pop() else { return };
        let _ = p.reply.send(write_one(raft, p.cmd, deadline).await);
        return;
    }
    let (cmds, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    let n = cmds.len();
    let entry = Command { request_id: String::new(), op: Op::Batch(cmds) };
    let Ok(written) = tokio::time::timeout(deadline, raft.client_write(entry)).await else {
        for reply in replies {
            let _ = reply.send(Outcome::TimedOut);
        }
        return;
    };
    match written {
        Ok(resp) => match resp.data {
            CommandResult::Batch(results) if results.len() == n => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Outcome::Applied(result));
                }
            }
            other => {
                for reply in replies {
                    let _ = reply.send(Outcome::Failed(format!("batch of {n} answered with {other:?}")));
                }
            }
        },
        Err(e) => {
            for reply in replies {
                let _ = reply.send(failure(&e));
            }
        }
    }
}

fn failure(e: &RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Outcome {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Outcome::NotLeader(f.clone()),
        other => Outcome::Failed(other.to_string()),
    }
}
