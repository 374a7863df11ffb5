//! Converting jobs between the replicated model and the wire: reports,
//! manifests, and the JSON body of callbacks.

use ferry_proto::pb;
use ferry_storage::{FileEntry, Job};

fn hex(h: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*h).to_hex().to_string()
}

/// A file's manifest as sent to workers.
pub fn manifest(f: &FileEntry) -> pb::FileManifest {
    pb::FileManifest {
        path: f.path.clone(),
        size: f.size,
        mode: f.mode,
        blake3: hex(&f.blake3),
        chunks: f.chunks.iter().map(|c| pb::ChunkRef { offset: c.offset, len: c.len, hash: hex(&c.hash) }).collect(),
    }
}

/// The report users see.
pub fn report(job: &Job) -> pb::JobReport {
    let dest_of = |i: usize| job.targets.first().and_then(|t| t.destinations.get(i)).cloned().unwrap_or_default();
    pb::JobReport {
        job_id: job.id.clone(),
        state: job.phase.as_str().into(),
        spec: Some(pb::JobSpec {
            source: job.source.clone(),
            files: job.files.iter().map(|f| f.path.clone()).collect(),
            targets: job.requested_targets.clone(),
            selector: job.selector.clone(),
            destination: job.destination.clone(),
            hook: job.hook.clone(),
            callback_url: job.callback_url.clone(),
            timeout_ms: job.timeout_ms,
            grace_ms: job.grace_ms,
        }),
        files: job
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| pb::FileReport {
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
            .map(|t| pb::TargetReport {
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
        total_bytes: job.total_bytes(),
        created_unix_ms: job.created_ms,
        finished_unix_ms: job.finished_ms,
    }
}

/// The report as JSON (callbacks, `--json`).
pub fn report_json(job: &Job) -> String {
    report_to_json(&report(job)).to_string()
}

/// A wire report as a JSON value.
pub fn report_to_json(r: &pb::JobReport) -> serde_json::Value {
    serde_json::json!({
        "job_id": r.job_id,
        "state": r.state,
        "total_bytes": r.total_bytes,
        "created_unix_ms": r.created_unix_ms,
        "finished_unix_ms": r.finished_unix_ms,
        "files": r.files.iter().map(|f| serde_json::json!({
            "path": f.path, "destination": f.destination, "size": f.size, "chunks": f.chunks, "blake3": f.blake3,
        })).collect::<Vec<_>>(),
        "targets": r.targets.iter().map(|t| serde_json::json!({
            "worker": t.worker, "state": t.state, "bytes_done": t.bytes_done, "chunks_done": t.chunks_done,
            "bytes_from_source": t.bytes_from_source, "bytes_from_peers": t.bytes_from_peers,
            "bytes_reused": t.bytes_reused, "duration_ms": t.duration_ms, "hook_exit": t.hook_exit, "reason": t.reason,
        })).collect::<Vec<_>>(),
    })
}
