//! A bounded job history: the leader forgets the oldest finished jobs.
//!
//! Every job stays in the replicated state until it is forgotten, so without
//! a bound the state, its snapshots and every digest grow with each push
//! (ten-minute refreshes make 50,000 jobs a year). The leader keeps the
//! newest `job_history` finished jobs and proposes `Op::ForgetJobs` for the
//! rest, in batches; a running job is never forgotten (the apply checks it
//! again). The op is new in 0.2.0, so it waits until every member runs
//! 0.2.0 or later ([`crate::raft::versions::Feature::ForgetJobs`]).

use std::sync::Arc;
use std::time::Duration;

use ferry_storage::command::MAX_FORGET;
use ferry_storage::{Command, Op};
use tokio::sync::watch;

use crate::raft::node::Node;
use crate::raft::versions::Feature;

/// How often the leader looks.
const EVERY: Duration = Duration::from_secs(5);

/// Forgets finished jobs beyond `job_history` while this node leads, until
/// `shutdown`.
pub async fn run(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let keep = node.config.job_history as usize;
    if keep == 0 {
        return;
    }
    let mut gated = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if !node.is_leader() {
            continue;
        }
        let finished = node.reader.finished_jobs();
        if finished.len() <= keep {
            continue;
        }
        if !node.versions.allows(Feature::ForgetJobs) {
            if !gated {
                tracing::info!(
                    finished = finished.len(),
                    keep,
                    reason = %node.versions.refusal(Feature::ForgetJobs),
                    "keeping every finished job until every scheduler can forget them"
                );
                gated = true;
            }
            continue;
        }
        gated = false;
        let excess = finished.len() - keep;
        for ids in finished[..excess].chunks(MAX_FORGET) {
            let n = ids.len();
            let cmd = Command { request_id: String::new(), op: Op::ForgetJobs { ids: ids.to_vec() } };
            match node.propose(cmd).await {
                Ok(_) => tracing::info!(jobs = n, keep, "forgot the oldest finished jobs"),
                Err(e) => {
                    tracing::warn!(error = %e, "forgetting finished jobs");
                    break;
                }
            }
        }
    }
}
