//! The event batcher: workers' acks, prepared reports and fins from every
//! session go into few log entries.

use std::sync::Arc;

use ferry_storage::{Command, JobEvent, Op};
use tokio::sync::mpsc;

use crate::raft::node::Node;

/// Most job events in one log entry.
pub const EVENTS_PER_ENTRY: usize = 1024;

/// Packs job events from all sessions into few log entries: it takes what
/// queued up while the previous entry was being committed.
pub async fn run_event_batcher(node: Arc<Node>, mut rx: mpsc::Receiver<JobEvent>) {
    while let Some(first) = rx.recv().await {
        let mut events = vec![first];
        while events.len() < EVENTS_PER_ENTRY {
            match rx.try_recv() {
                Ok(e) => events.push(e),
                Err(_) => break,
            }
        }
        // Events are idempotent, so a failed proposal (a leader change
        // under load) is simply made again while this node leads.
        let cmd = Command { request_id: String::new(), op: Op::JobEvents(events) };
        for attempt in 1..=5u32 {
            match node.propose(cmd.clone()).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "recording worker progress failed");
                    if !node.is_leader() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100 * attempt as u64)).await;
                }
            }
        }
    }
}

/// A job event as a command (no request id: applying an event twice is a no-op).
pub fn event(e: JobEvent) -> Command {
    Command { request_id: String::new(), op: Op::JobEvents(vec![e]) }
}
