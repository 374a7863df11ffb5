//! `ferry.v1.JobService`: decode, call [`crate::jobs::submission`], encode.
//! Submit and cancel run on the leader (see [`crate::grpc::forward`]); reads
//! are served by any member after a read barrier, so a job submitted
//! through another member is found at once.

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::pb::{self, job_service_server::JobService};
use ferry_storage::JobPhase;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::jobs::report::{FileReport, Report, TargetReport};
use crate::jobs::sessions::Sessions;
use crate::jobs::spec::JobRequest;
use crate::jobs::submission;
use crate::raft::node::{new_request_id, Node};

/// The JobService implementation.
pub struct JobServiceImpl {
    pub(crate) node: Arc<Node>,
    pub(crate) sessions: Arc<Sessions>,
}

crate::grpc::mirror!(fn from_spec(pb::JobSpec) -> JobRequest; fn to_spec;
    source, files, targets, selector, destination, hook, callback_url, timeout_ms, grace_ms);
crate::grpc::mirror!(fn from_file(pb::FileReport) -> FileReport; fn to_file; path, destination, size, chunks, blake3);
crate::grpc::mirror!(fn from_target(pb::TargetReport) -> TargetReport; fn to_target;
    worker, state, bytes_done, chunks_done, bytes_from_source, bytes_from_peers, bytes_reused, duration_ms,
    hook_exit, reason);

/// The wire form of a report.
pub fn to_pb(r: Report) -> pb::JobReport {
    pb::JobReport {
        job_id: r.job_id,
        state: r.state,
        spec: Some(to_spec(r.spec)),
        files: r.files.into_iter().map(to_file).collect(),
        targets: r.targets.into_iter().map(to_target).collect(),
        total_bytes: r.total_bytes,
        created_unix_ms: r.created_unix_ms,
        finished_unix_ms: r.finished_unix_ms,
    }
}

/// A report received over the wire (`ferry job --json` prints its JSON).
pub fn from_pb(r: pb::JobReport) -> Report {
    Report {
        job_id: r.job_id,
        state: r.state,
        spec: r.spec.map(from_spec).unwrap_or_default(),
        total_bytes: r.total_bytes,
        created_unix_ms: r.created_unix_ms,
        finished_unix_ms: r.finished_unix_ms,
        files: r.files.into_iter().map(from_file).collect(),
        targets: r.targets.into_iter().map(from_target).collect(),
    }
}

fn report(job: &ferry_storage::Job) -> pb::JobReport {
    to_pb(Report::of(job))
}

#[tonic::async_trait]
impl JobService for JobServiceImpl {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let req = request.into_inner();
        let spec = from_spec(req.spec.ok_or_else(|| Error::InvalidArgument("spec: missing".into()))?);
        if !spec.callback_url.is_empty() {
            let hosts = self.node.config.callback_hosts();
            crate::webhook::check_allowed(&spec.callback_url, "callback_url", &hosts)
                .map_err(Error::InvalidArgument)?;
        }
        let request_id = if req.request_id.is_empty() { new_request_id() } else { req.request_id };
        let job = submission::submit(&self.node, &self.sessions, spec, request_id).await?;
        let report = if req.wait {
            let deadline = Duration::from_millis(job.timeout_ms + 30_000);
            Some(report(&submission::wait_done(&self.node, &job.id, deadline).await?))
        } else {
            None
        };
        Ok(Response::new(pb::SubmitJobResponse { job_id: job.id, report }))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::JobReport>, Status> {
        let id = request.into_inner().job_id;
        self.node.read_barrier(false).await?;
        Ok(Response::new(report(&submission::get(&self.node, &id)?)))
    }

    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.node.read_barrier(false).await?;
        let mut jobs = self.node.reader.jobs().map_err(crate::error::Error::from)?;
        jobs.sort_by_key(|j| j.created_ms);
        Ok(Response::new(pb::ListJobsResponse { jobs: jobs.iter().map(report).collect() }))
    }

    type WatchJobStream = ReceiverStream<Result<pb::JobEvent, Status>>;

    async fn watch_job(&self, request: Request<pb::WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = request.into_inner().job_id;
        // A job just submitted through another member must be found here.
        self.node.read_barrier(false).await?;
        submission::get(&self.node, &id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let node = self.node.clone();
        tokio::spawn(async move {
            let mut changes = node.reader.subscribe();
            let mut last: Option<pb::JobReport> = None;
            let mut keepalive = tokio::time::interval(Duration::from_secs(5));
            loop {
                let Ok(job) = submission::get(&node, &id) else { return };
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
        let id = request.into_inner().job_id;
        Ok(Response::new(report(&submission::cancel(&self.node, &id).await?)))
    }
}
