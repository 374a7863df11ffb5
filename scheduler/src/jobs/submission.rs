//! Submitting, following and cancelling jobs, on the leader: a submission
//! is checked against the registered workers, indexed on its source (the
//! manifest goes into the log with the job), then logged; the planner
//! takes it from there.

use std::time::Duration;

use ferry_storage::{Command, CommandResult, Job, JobEvent, JobPhase, Op, Target};

use crate::clock::now_ms;
use crate::error::Error;
use crate::jobs::batcher::event;
use crate::jobs::sessions::{Sessions, SILENCE_IS_DOWN};
use crate::jobs::spec::{self, JobRequest};
use crate::raft::node::Node;
use crate::raft::proposer::MAX_COMMAND_BYTES;

/// How long a target may take to say whether it could write a job's
/// destinations before the job goes ahead without its answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the source may take to index.
pub const INDEX_TIMEOUT: Duration = Duration::from_secs(300);

/// The id of the job a request id creates: a retried submission (same
/// request id) maps to the same job.
fn job_id_for(request_id: &str) -> String {
    let h = blake3::hash(request_id.as_bytes()).to_hex();
    format!("j-{}", &h.as_str()[..16])
}

/// Asks every connected target, at once, whether it could write its
/// destinations (a path inside a root may still lead outside it through a
/// symlink there, which only the worker sees). A refusal refuses the job,
/// naming the worker and the path; a target that is down or slow to answer
/// checks again when it prepares.
async fn check_destinations(sessions: &Sessions, targets: &[(String, Vec<String>)]) -> Result<(), Error> {
    let asks = targets
        .iter()
        .map(|(name, dests)| async move { (name, sessions.check(name, dests.clone(), CHECK_TIMEOUT).await) });
    for (name, answer) in futures::future::join_all(asks).await {
        if let Some(Err(reason)) = answer? {
            return Err(Error::InvalidArgument(format!("dest: on worker {name}, {reason}")));
        }
    }
    Ok(())
}

/// Checks, indexes and logs a job; the job as logged.
pub async fn submit(node: &Node, sessions: &Sessions, req: JobRequest, request_id: String) -> Result<Job, Error> {
    if !node.is_leader() {
        return Err(node.not_leader());
    }
    let workers = node.reader.workers()?;
    let checked = spec::check(&req, &workers).map_err(Error::InvalidArgument)?;
    // Right after an election no worker has reconnected yet: give the
    // source the time a live worker takes to find the new leader.
    if sessions.wait_connected(&checked.source.name, SILENCE_IS_DOWN).await.is_none() {
        return Err(Error::FailedPrecondition(format!(
            "source: worker {} is not connected (waited {SILENCE_IS_DOWN:?})",
            checked.source.name
        )));
    }
    // Index on the source: the manifest goes into the log with the job.
    let files = sessions
        .index(&checked.source.name, req.files.clone(), INDEX_TIMEOUT)
        .await?
        .map_err(|e| Error::InvalidArgument(format!("files: {e}")))?;
    spec::check_manifest(&req.files, &files)
        .map_err(|e| Error::Unexpected { op: "index", result: format!("the source answered wrongly: {e}") })?;
    check_destinations(sessions, &checked.targets).await?;
    let id = job_id_for(&request_id);
    let targets: Vec<Target> =
        checked.targets.into_iter().map(|(name, dests)| Target::new(name, dests, &files)).collect();
    let job = Job {
        id: id.clone(),
        source: checked.source.name.clone(),
        files,
        hook: req.hook,
        callback_url: req.callback_url,
        timeout_ms: checked.timeout_ms,
        grace_ms: checked.grace_ms,
        requested_targets: req.targets,
        selector: req.selector,
        destination: req.destination,
        targets,
        phase: JobPhase::Running,
        created_ms: now_ms(),
        finished_ms: 0,
    };
    let cmd = Command { request_id, op: Op::CreateJob(Box::new(job.clone())) };
    let bytes = ferry_storage::codec::encoded_len("job", &cmd).map_err(|e| Error::Internal(e.to_string()))?;
    if bytes > MAX_COMMAND_BYTES {
        return Err(Error::InvalidArgument(format!(
            "files: the job's manifests and targets take {} KiB in the log, more than the {} KiB one entry may \
             hold; split it into several jobs",
            bytes >> 10,
            MAX_COMMAND_BYTES >> 10
        )));
    }
    match node.propose(cmd).await? {
        CommandResult::Done => {}
        CommandResult::Rejected { reason } => return Err(Error::InvalidArgument(reason)),
        other => return Err(Error::unexpected("submit job", &other)),
    }
    tracing::info!(job = %id, source = %job.source, "job submitted");
    Ok(job)
}

/// Job `id` as the log has it here (the error names the field `job_id`).
pub fn get(node: &Node, id: &str) -> Result<Job, Error> {
    node.reader.job(id)?.ok_or_else(|| Error::NotFound(format!("job_id: no job {id}")))
}

/// Waits up to `deadline` for job `id` to end; the job then.
pub async fn wait_done(node: &Node, id: &str, deadline: Duration) -> Result<Job, Error> {
    let mut changes = node.reader.subscribe();
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let job = get(node, id)?;
        if job.phase != JobPhase::Running {
            return Ok(job);
        }
        match tokio::time::timeout_at(until, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Error::Stopped("the scheduler is stopping".into())),
            Err(_) => return Err(Error::Timeout(format!("job {id} still running"))),
        }
    }
}

/// Cancels job `id`: transfers stop, installed files stay.
pub async fn cancel(node: &Node, id: &str) -> Result<Job, Error> {
    if !node.is_leader() {
        return Err(node.not_leader());
    }
    get(node, id)?;
    node.propose(event(JobEvent::Cancel { job: id.to_string(), at_ms: now_ms() })).await?;
    get(node, id)
}
