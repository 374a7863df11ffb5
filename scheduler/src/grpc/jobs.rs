//! `ferry.v1.JobService`: submit (validate, index on the source, log the
//! job), get, list, watch and cancel. Writes run on the leader (a follower
//! forwards them); reads are served by any member from its replica.

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::pb::{self, job_service_server::JobService};
use ferry_storage::{Chunk, Command, CommandResult, FileEntry, Job, JobEvent, JobPhase, Op, Target};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::clock::now_ms;
use crate::error::Error;
use crate::jobs::batcher::event;
use crate::jobs::report::report;
use crate::jobs::sessions::Sessions;
use crate::raft::node::{new_request_id, Node};

/// How long the source may take to index.
pub const INDEX_TIMEOUT: Duration = Duration::from_secs(300);

/// The JobService implementation.
pub struct JobServiceImpl {
    pub(crate) node: Arc<Node>,
    pub(crate) sessions: Arc<Sessions>,
}

fn parse_hash(s: &str) -> Result<[u8; 32], Status> {
    blake3::Hash::from_hex(s)
        .map(|h| *h.as_bytes())
        .map_err(|_| Status::internal(format!("source sent a bad hash {s}")))
}

fn job_id_for(request_id: &str) -> String {
    // A retried submission (same request id) maps to the same job id.
    let h = blake3::hash(request_id.as_bytes()).to_hex();
    format!("j-{}", &h.as_str()[..16])
}

impl JobServiceImpl {
    async fn wait_done(&self, id: &str, deadline: Duration) -> Result<Job, Status> {
        let mut changes = self.node.reader.subscribe();
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let job = self
                .node
                .reader
                .job(id)
                .map_err(Error::from)?
                .ok_or_else(|| Status::not_found(format!("job {id} not found")))?;
            if job.phase != JobPhase::Running {
                return Ok(job);
            }
            match tokio::time::timeout_at(until, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Status::unavailable("scheduler stopping")),
                Err(_) => return Err(Status::deadline_exceeded(format!("job {id} still running"))),
            }
        }
    }
}

#[tonic::async_trait]
impl JobService for JobServiceImpl {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let mut req = request.into_inner();
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        if !self.node.is_leader() {
            return Err(self.node.not_leader().into());
        }
        let spec = req.spec.clone().ok_or_else(|| Status::invalid_argument("spec: missing"))?;
        let workers = self.node.reader.workers().map_err(Error::from)?;
        let checked = crate::jobs::spec::check(&spec, &workers).map_err(Error::InvalidArgument)?;
        if self.sessions.epoch(&checked.source.name).is_none() {
            return Err(
                Error::FailedPrecondition(format!("source: worker {} is not connected", checked.source.name)).into()
            );
        }
        // Index on the source: the manifest goes into the log with the job.
        let indexed = self.sessions.index(&checked.source.name, spec.files.clone(), INDEX_TIMEOUT).await?;
        if !indexed.error.is_empty() {
            return Err(Error::InvalidArgument(format!("files: {}", indexed.error)).into());
        }
        crate::jobs::spec::check_manifest(&spec.files, &indexed.files).map_err(Status::internal)?;
        let mut files = Vec::new();
        for m in &indexed.files {
            let mut chunks = Vec::new();
            for c in &m.chunks {
                chunks.push(Chunk { offset: c.offset, len: c.len, hash: parse_hash(&c.hash)? });
            }
            files.push(FileEntry {
                path: m.path.clone(),
                size: m.size,
                mode: m.mode,
                blake3: parse_hash(&m.blake3)?,
                chunks,
            });
        }
        let id = job_id_for(&req.request_id);
        let targets: Vec<Target> =
            checked.targets.into_iter().map(|(name, dests)| Target::new(name, dests, &files)).collect();
        let job = Job {
            id: id.clone(),
            source: checked.source.name.clone(),
            files,
            hook: spec.hook.clone(),
            callback_url: spec.callback_url.clone(),
            timeout_ms: checked.timeout_ms,
            grace_ms: checked.grace_ms,
            requested_targets: spec.targets.clone(),
            selector: spec.selector.clone(),
            destination: spec.destination.clone(),
            targets,
            phase: JobPhase::Running,
            created_ms: now_ms(),
            finished_ms: 0,
        };
        let cmd = Command { request_id: req.request_id.clone(), op: Op::CreateJob(Box::new(job)) };
        match self.node.propose(cmd).await? {
            CommandResult::Done => {}
            CommandResult::Rejected { reason } => return Err(Error::InvalidArgument(reason).into()),
            other => return Err(Status::internal(format!("unexpected result {other:?}"))),
        }
        tracing::info!(job = %id, source = %checked.source.name, "job submitted");
        let report = if req.wait {
            let job = self.wait_done(&id, Duration::from_millis(checked.timeout_ms + 30_000)).await?;
            Some(report(&job))
        } else {
            None
        };
        Ok(Response::new(pb::SubmitJobResponse { job_id: id, report }))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::JobReport>, Status> {
        let id = request.into_inner().job_id;
        self.node.read_barrier(false).await?;
        let job = self
            .node
            .reader
            .job(&id)
            .map_err(Error::from)?
            .ok_or_else(|| Status::not_found(format!("job_id: no job {id}")))?;
        Ok(Response::new(report(&job)))
    }

    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.node.read_barrier(false).await?;
        let mut jobs: Vec<Job> = self.node.reader.jobs().map_err(Error::from)?;
        jobs.sort_by_key(|j| j.created_ms);
        Ok(Response::new(pb::ListJobsResponse { jobs: jobs.iter().map(report).collect() }))
    }

    type WatchJobStream = ReceiverStream<Result<pb::JobEvent, Status>>;

    async fn watch_job(&self, request: Request<pb::WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = request.into_inner().job_id;
        // A job just submitted through another member must be found here.
        self.node.read_barrier(false).await?;
        if self.node.reader.job(&id).map_err(Error::from)?.is_none() {
            return Err(Status::not_found(format!("job_id: no job {id}")));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let node = self.node.clone();
        tokio::spawn(async move {
            let mut changes = node.reader.subscribe();
            let mut last: Option<pb::JobReport> = None;
            let mut keepalive = tokio::time::interval(Duration::from_secs(5));
            loop {
                let job = match node.reader.job(&id) {
                    Ok(Some(j)) => j,
                    _ => return,
                };
                let r = report(&job);
                let done = job.phase != JobPhase::Running;
                if last.as_ref() != Some(&r) || done {
                    if tx.send(Ok(pb::JobEvent { report: Some(r.clone()), done })).await.is_err() {
                        return;
                    }
                    last = Some(r);
                }
                if done {
                    return;
                }
                // At most ten updates a second; a periodic one keeps idle
                // streams alive through proxies.
                tokio::time::sleep(Duration::from_millis(100)).await;
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = keepalive.tick() => { last = None; }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel_job(&self, request: Request<pb::CancelJobRequest>) -> Result<Response<pb::JobReport>, Status> {
        let req = request.into_inner();
        if !self.node.is_leader() {
            return Err(self.node.not_leader().into());
        }
        let id = req.job_id;
        if self.node.reader.job(&id).map_err(Error::from)?.is_none() {
            return Err(Status::not_found(format!("job_id: no job {id}")));
        }
        self.node.propose(event(JobEvent::Cancel { job: id.clone(), at_ms: now_ms() })).await?;
        let job = self.node.reader.job(&id).map_err(Error::from)?.ok_or_else(|| Status::not_found("job vanished"))?;
        Ok(Response::new(report(&job)))
    }
}
