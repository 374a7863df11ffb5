//! A job as users see it: its state, files and targets, with byte counts.
//! The same report goes over gRPC (converted in `grpc::jobs`), as the JSON
//! body of a callback, and out of `ferry job ... --json` ([`Report::to_json`]
//! is that JSON, defined once).

use ferry_storage::Job;
use serde::{Deserialize, Serialize};

use crate::jobs::spec::JobRequest;

/// A job's report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The job.
    pub job_id: String,
    /// `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// What was asked for (not part of the JSON form).
    #[serde(skip)]
    pub spec: JobRequest,
    /// Bytes of one copy of every file.
    pub total_bytes: u64,
    /// When the job was submitted.
    pub created_unix_ms: u64,
    /// When it ended (0: running).
    pub finished_unix_ms: u64,
    /// The files.
    pub files: Vec<FileReport>,
    /// The targets.
    pub targets: Vec<TargetReport>,
}

/// One file of a job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReport {
    /// Path on the source.
    pub path: String,
    /// Where it goes (on the first target; the same for every target
    /// unless it is relative to each target's root).
    pub destination: String,
    /// Size in bytes.
    pub size: u64,
    /// Chunks.
    pub chunks: u64,
    /// Hex BLAKE3 of the whole file.
    pub blake3: String,
}

/// One target of a job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetReport {
    /// The worker.
    pub worker: String,
    /// `pending`, `transferring`, `installed`, `unchanged`, `failed` or `cancelled`.
    pub state: String,
    /// Bytes held.
    pub bytes_done: u64,
    /// Chunks held.
    pub chunks_done: u64,
    /// Bytes pulled from the source.
    pub bytes_from_source: u64,
    /// Bytes pulled from other targets.
    pub bytes_from_peers: u64,
    /// Bytes it held already (delta).
    pub bytes_reused: u64,
    /// From submission to its end (0: not ended).
    pub duration_ms: u64,
    /// The hook's exit code, if it ran.
    pub hook_exit: Option<i32>,
    /// Why it failed.
    pub reason: String,
}

fn hex(h: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*h).to_hex().to_string()
}

impl Report {
    /// The report of `job` as the log has it.
    pub fn of(job: &Job) -> Self {
        let dest_of = |i: usize| job.targets.first().and_then(|t| t.destinations.get(i)).cloned().unwrap_or_default();
        Report {
            job_id: job.id.clone(),
            state: job.phase.as_str().into(),
            spec: JobRequest {
                source: job.source.clone(),
                files: job.files.iter().map(|f| f.path.clone()).collect(),
                targets: job.requested_targets.clone(),
                selector: job.selector.clone(),
                destination: job.destination.clone(),
                hook: job.hook.clone(),
                callback_url: job.callback_url.clone(),
                timeout_ms: job.timeout_ms,
                grace_ms: job.grace_ms,
            },
            total_bytes: job.total_bytes(),
            created_unix_ms: job.created_ms,
            finished_unix_ms: job.finished_ms,
            files: job
                .files
                .iter()
                .enumerate()
                .map(|(i, f)| FileReport {
                    path: f.path.clone(),
                    destination: dest_of(i),
                    size: f.size,
                    chunks: f.chunks.len() as u64,
                    blake3: hex(&f.blake3),
                })
                .collect(),
            targets: job
                .targets
                .iter()
                .map(|t| TargetReport {
                    worker: t.worker.clone(),
                    state: t.phase.as_str().into(),
                    bytes_done: t.bytes_done,
                    chunks_done: t.chunks_done,
                    bytes_from_source: t.bytes_from_source,
                    bytes_from_peers: t.bytes_from_peers,
                    bytes_reused: t.bytes_reused,
                    duration_ms: if t.finished_ms > 0 { t.finished_ms.saturating_sub(job.created_ms) } else { 0 },
                    hook_exit: t.hook_exit,
                    reason: t.reason.clone(),
                })
                .collect(),
        }
    }

    /// The report as JSON: a callback's body, `ferry job ... --json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_form_has_the_documented_fields() {
        let r = Report {
            job_id: "j-1".into(),
            state: "succeeded".into(),
            total_bytes: 3,
            files: vec![FileReport { path: "/a".into(), size: 3, chunks: 1, ..Default::default() }],
            targets: vec![TargetReport { worker: "t".into(), hook_exit: Some(0), ..Default::default() }],
            ..Default::default()
        };
        let v = r.to_json();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["created_unix_ms", "files", "finished_unix_ms", "job_id", "state", "targets", "total_bytes"]);
        assert_eq!(v["targets"][0]["hook_exit"], 0);
        assert_eq!(v["files"][0]["path"], "/a");
    }
}
