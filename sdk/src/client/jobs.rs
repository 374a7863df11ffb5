//! The job API: submitting a distribution job (optionally waiting for its
//! final report, under a deadline long enough for the job), reading and
//! listing reports, following a job's progress and cancelling it.

use std::time::Duration;

use ferry_proto::pb;
use ferry_proto::pb::job_service_client::JobServiceClient;

use super::{request_id, Call, Client, ClientOptions};
use crate::error::Error;

impl Client {
    /// Submits a job. Without `wait` it returns once the job is logged; with
    /// `wait` it returns the final report (the call may take as long as the
    /// job: up to its timeout). Retries reuse the request id, so a job is
    /// created once.
    pub async fn submit_job(&self, spec: pb::JobSpec, wait: bool) -> Result<pb::SubmitJobResponse, Error> {
        let job_timeout = Duration::from_millis(if spec.timeout_ms == 0 { 600_000 } else { spec.timeout_ms });
        let msg = pb::SubmitJobRequest { spec: Some(spec), wait, request_id: request_id() };
        let per_call = if wait {
            job_timeout + Duration::from_secs(60)
        } else {
            self.options.request_timeout.max(Duration::from_secs(320))
        };
        // One attempt may take `per_call`, the whole call that much more
        // than the usual budget: on a clone, which shares the endpoints.
        let this = Self {
            options: ClientOptions { total_timeout: per_call + self.options.total_timeout, ..self.options.clone() },
            ..self.clone()
        };
        this.call(Call::new("submit-job").attempt_timeout(per_call), msg, JobServiceClient::submit_job).await
    }

    /// The report of one job.
    pub async fn get_job(&self, job_id: &str) -> Result<pb::JobReport, Error> {
        let msg = pb::GetJobRequest { job_id: job_id.to_string() };
        self.call("get-job", msg, JobServiceClient::get_job).await
    }

    /// Every job's report, oldest first.
    pub async fn list_jobs(&self) -> Result<Vec<pb::JobReport>, Error> {
        self.call("list-jobs", pb::ListJobsRequest {}, JobServiceClient::list_jobs).await.map(|r| r.jobs)
    }

    /// A stream of progress events; the last has `done` set.
    pub async fn watch_job(&self, job_id: &str) -> Result<tonic::Streaming<pb::JobEvent>, Error> {
        let msg = pb::WatchJobRequest { job_id: job_id.to_string() };
        self.call(Call::stream("watch-job"), msg, JobServiceClient::watch_job).await
    }

    /// Cancels a job; installed files stay as they were.
    pub async fn cancel_job(&self, job_id: &str) -> Result<pb::JobReport, Error> {
        let msg = pb::CancelJobRequest { job_id: job_id.to_string() };
        self.call("cancel-job", msg, JobServiceClient::cancel_job).await
    }
}
