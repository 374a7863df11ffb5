//! Workers and file distribution jobs as replicated state.
//!
//! A job holds its manifest (every file's chunks and hashes) and, per target,
//! which chunks it holds, byte counters and its phase. Workers report progress
//! as [`JobEvent`]s, batched by the leader into few log entries; applying them
//! is deterministic: every time in here came from the leader in a command.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A worker as registered (replicated; liveness is leader soft state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Unique name (`--name`).
    pub name: String,
    /// `host:port` of its chunk service.
    pub addr: String,
    /// Labels for selectors, e.g. `zone=a`.
    pub labels: BTreeMap<String, String>,
    /// Directories it may read from and write to.
    pub roots: Vec<String>,
    /// Names of the hooks in its own config.
    pub hooks: Vec<String>,
    /// Its ferry version.
    pub version: String,
    /// Leader time of the (last) registration.
    pub registered_ms: u64,
}

/// One content-defined chunk of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// BLAKE3 of the chunk's bytes.
    pub hash: [u8; 32],
}

/// One file of a job's manifest, as indexed on the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path on the source.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Unix permission bits, kept on install.
    pub mode: u32,
    /// BLAKE3 of the whole file.
    pub blake3: [u8; 32],
    /// The chunks, in order, covering the file.
    pub chunks: Vec<Chunk>,
}

/// Where one target stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetPhase {
    /// Nothing received yet.
    Pending,
    /// Chunks are arriving.
    Transferring,
    /// Every file installed (and the hook ran).
    Installed,
    /// Every file was identical already; nothing moved.
    Unchanged,
    /// Gave up, with a reason.
    Failed,
    /// The job was cancelled first.
    Cancelled,
}

impl TargetPhase {
    /// Installed, unchanged, failed or cancelled.
    pub fn is_terminal(self) -> bool {
        !matches!(self, TargetPhase::Pending | TargetPhase::Transferring)
    }

    /// Lower-case name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetPhase::Pending => "pending",
            TargetPhase::Transferring => "transferring",
            TargetPhase::Installed => "installed",
            TargetPhase::Unchanged => "unchanged",
            TargetPhase::Failed => "failed",
            TargetPhase::Cancelled => "cancelled",
        }
    }
}

/// Where a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Via {
    /// The target held it already (delta transfer): no bytes moved.
    Local,
    /// Pulled from the source worker.
    Source,
    /// Pulled from another target.
    Peer,
}

/// One target of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Worker name.
    pub worker: String,
    /// Where each file goes on this worker (same order as the manifest).
    pub destinations: Vec<String>,
    /// Phase.
    pub phase: TargetPhase,
    /// Per file, per chunk: held?
    pub held: Vec<Vec<bool>>,
    /// Per file: identical at its destination already.
    pub unchanged: Vec<bool>,
    /// The target has reported what it already holds.
    pub prepared: bool,
    /// Bytes of chunks held.
    pub bytes_done: u64,
    /// Chunks held.
    pub chunks_done: u64,
    /// Bytes pulled from the source.
    pub bytes_from_source: u64,
    /// Bytes pulled from other targets.
    pub bytes_from_peers: u64,
    /// Bytes it already had.
    pub bytes_reused: u64,
    /// Leader time of the first progress.
    pub started_ms: u64,
    /// Leader time it finished.
    pub finished_ms: u64,
    /// Exit status of the hook, if one ran.
    pub hook_exit: Option<i32>,
    /// Why it failed.
    pub reason: String,
}

impl Target {
    /// A fresh target for `files`.
    pub fn new(worker: String, destinations: Vec<String>, files: &[FileEntry]) -> Self {
        Self {
            worker,
            destinations,
            phase: TargetPhase::Pending,
            held: files.iter().map(|f| vec![false; f.chunks.len()]).collect(),
            unchanged: vec![false; files.len()],
            prepared: false,
            bytes_done: 0,
            chunks_done: 0,
            bytes_from_source: 0,
            bytes_from_peers: 0,
            bytes_reused: 0,
            started_ms: 0,
            finished_ms: 0,
            hook_exit: None,
            reason: String::new(),
        }
    }

    /// Holds every chunk of every file.
    pub fn complete(&self) -> bool {
        self.held.iter().all(|f| f.iter().all(|h| *h))
    }
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobPhase {
    /// Targets are still working.
    Running,
    /// Every target installed or was unchanged.
    Succeeded,
    /// At least one target failed.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl JobPhase {
    /// Lower-case name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Running => "running",
            JobPhase::Succeeded => "succeeded",
            JobPhase::Failed => "failed",
            JobPhase::Cancelled => "cancelled",
        }
    }
}

/// A file distribution job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Id chosen by the leader.
    pub id: String,
    /// Source worker name.
    pub source: String,
    /// Manifest.
    pub files: Vec<FileEntry>,
    /// Hook to run on each target after install (empty: none).
    pub hook: String,
    /// URL that gets the final report.
    pub callback_url: String,
    /// Whole-job deadline.
    pub timeout_ms: u64,
    /// How long a target may stay disconnected before it fails.
    pub grace_ms: u64,
    /// Target names as requested.
    pub requested_targets: Vec<String>,
    /// Selector as requested.
    pub selector: String,
    /// Destination as requested.
    pub destination: String,
    /// Resolved targets, sorted by name.
    pub targets: Vec<Target>,
    /// Phase.
    pub phase: JobPhase,
    /// Leader time of submission.
    pub created_ms: u64,
    /// Leader time it ended.
    pub finished_ms: u64,
}

impl Job {
    /// Total bytes of the manifest.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    fn target_mut(&mut self, worker: &str) -> Option<&mut Target> {
        self.targets.iter_mut().find(|t| t.worker == worker)
    }

    /// Ends the job once every target is terminal.
    fn settle(&mut self, at_ms: u64) {
        if self.phase == JobPhase::Running && self.targets.iter().all(|t| t.phase.is_terminal()) {
            let ok = self.targets.iter().all(|t| matches!(t.phase, TargetPhase::Installed | TargetPhase::Unchanged));
            self.phase = if ok { JobPhase::Succeeded } else { JobPhase::Failed };
            self.finished_ms = at_ms;
        }
    }

    /// Applies one event. Events for a finished job or target change
    /// nothing, so late or repeated reports are harmless.
    pub fn apply(&mut self, event: &JobEvent) {
        if self.phase != JobPhase::Running {
            return;
        }
        match event {
            JobEvent::Ack { target, file, chunk, from, at_ms, .. } => {
                let via = if *from == self.source { Via::Source } else { Via::Peer };
                let (f, c) = (*file as usize, *chunk as usize);
                let Some(len) = self.files.get(f).and_then(|fe| fe.chunks.get(c)).map(|ch| ch.len) else { return };
                let Some(t) = self.target_mut(target) else { return };
                if t.phase.is_terminal() || t.held[f][c] {
                    return;
                }
                t.held[f][c] = true;
                t.chunks_done += 1;
                t.bytes_done += len;
                match via {
                    Via::Local => t.bytes_reused += len,
                    Via::Source => t.bytes_from_source += len,
                    Via::Peer => t.bytes_from_peers += len,
                }
                if t.phase == TargetPhase::Pending {
                    t.phase = TargetPhase::Transferring;
                    t.started_ms = *at_ms;
                }
            }
            JobEvent::Prepared { target, unchanged, local, at_ms, .. } => {
                // At the start of a session the worker's report is the truth:
                // what it holds replaces what the log said (a restarted worker
                // may have lost chunks it had acknowledged; those are pulled
                // again). Bytes already moved stay counted as moved.
                let lens: Vec<Vec<u64>> = self.files.iter().map(|f| f.chunks.iter().map(|c| c.len).collect()).collect();
                let mut now: Vec<Vec<bool>> = lens.iter().map(|f| vec![false; f.len()]).collect();
                let mut same = vec![false; lens.len()];
                for &f in unchanged {
                    if let Some(file) = now.get_mut(f as usize) {
                        file.iter_mut().for_each(|h| *h = true);
                        same[f as usize] = true;
                    }
                }
                for &(f, c) in local {
                    if let Some(h) = now.get_mut(f as usize).and_then(|file| file.get_mut(c as usize)) {
                        *h = true;
                    }
                }
                let Some(t) = self.target_mut(target) else { return };
                if t.phase.is_terminal() {
                    return;
                }
                for (f, file) in lens.iter().enumerate() {
                    for (c, &len) in file.iter().enumerate() {
                        match (t.held[f][c], now[f][c]) {
                            (false, true) => {
                                t.chunks_done += 1;
                                t.bytes_done += len;
                                t.bytes_reused += len;
                            }
                            (true, false) => {
                                t.chunks_done -= 1;
                                t.bytes_done -= len;
                            }
                            _ => {}
                        }
                    }
                }
                t.held = now;
                t.unchanged = same;
                t.prepared = true;
                if t.started_ms == 0 {
                    t.started_ms = *at_ms;
                }
            }
            JobEvent::Fin { target, ok, reason, hook_exit, at_ms, .. } => {
                let Some(t) = self.target_mut(target) else { return };
                if t.phase.is_terminal() {
                    return;
                }
                t.hook_exit = *hook_exit;
                t.finished_ms = *at_ms;
                if *ok && !t.complete() {
                    // Installed without holding every chunk: not believable.
                    t.phase = TargetPhase::Failed;
                    t.reason = "reported installed before holding every chunk".into();
                } else if *ok {
                    t.phase =
                        if t.unchanged.iter().all(|u| *u) { TargetPhase::Unchanged } else { TargetPhase::Installed };
                } else {
                    t.phase = TargetPhase::Failed;
                    t.reason = reason.clone();
                }
            }
            JobEvent::FailTarget { target, reason, at_ms, .. } => {
                let Some(t) = self.target_mut(target) else { return };
                if !t.phase.is_terminal() {
                    t.phase = TargetPhase::Failed;
                    t.reason = reason.clone();
                    t.finished_ms = *at_ms;
                }
            }
            JobEvent::Cancel { at_ms, .. } => {
                for t in &mut self.targets {
                    if !t.phase.is_terminal() {
                        t.phase = TargetPhase::Cancelled;
                        t.finished_ms = *at_ms;
                    }
                }
                self.phase = JobPhase::Cancelled;
                self.finished_ms = *at_ms;
                return;
            }
        }
        self.settle(event.at_ms());
    }
}

/// Progress of a job, reported by workers or decided by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobEvent {
    /// A target holds a chunk.
    Ack {
        /// Job id.
        job: String,
        /// Target worker.
        target: String,
        /// File index.
        file: u32,
        /// Chunk index.
        chunk: u32,
        /// The worker it was pulled from (the source or a peer).
        from: String,
        /// Leader time.
        at_ms: u64,
    },
    /// A target reported, at the start of a session, which files are
    /// identical already and which chunks it holds; this replaces what the
    /// log said it held.
    Prepared {
        /// Job id.
        job: String,
        /// Target worker.
        target: String,
        /// Indexes of unchanged files.
        unchanged: Vec<u32>,
        /// `(file, chunk)` found locally and copied into staging.
        local: Vec<(u32, u32)>,
        /// Leader time.
        at_ms: u64,
    },
    /// A target installed its files and ran its hook, or failed.
    Fin {
        /// Job id.
        job: String,
        /// Target worker.
        target: String,
        /// Installed?
        ok: bool,
        /// Why not.
        reason: String,
        /// Hook exit status.
        hook_exit: Option<i32>,
        /// Leader time.
        at_ms: u64,
    },
    /// The leader gave up on a target (timeout, worker gone).
    FailTarget {
        /// Job id.
        job: String,
        /// Target worker.
        target: String,
        /// Why.
        reason: String,
        /// Leader time.
        at_ms: u64,
    },
    /// The job was cancelled.
    Cancel {
        /// Job id.
        job: String,
        /// Leader time.
        at_ms: u64,
    },
}

impl JobEvent {
    /// The job the event belongs to.
    pub fn job(&self) -> &str {
        match self {
            JobEvent::Ack { job, .. }
            | JobEvent::Prepared { job, .. }
            | JobEvent::Fin { job, .. }
            | JobEvent::FailTarget { job, .. }
            | JobEvent::Cancel { job, .. } => job,
        }
    }

    /// The leader time in the event.
    pub fn at_ms(&self) -> u64 {
        match self {
            JobEvent::Ack { at_ms, .. }
            | JobEvent::Prepared { at_ms, .. }
            | JobEvent::Fin { at_ms, .. }
            | JobEvent::FailTarget { at_ms, .. }
            | JobEvent::Cancel { at_ms, .. } => *at_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        let files = vec![FileEntry {
            path: "/r/a".into(),
            size: 30,
            mode: 0o644,
            blake3: [0; 32],
            chunks: vec![Chunk { offset: 0, len: 10, hash: [1; 32] }, Chunk { offset: 10, len: 20, hash: [2; 32] }],
        }];
        Job {
            id: "j1".into(),
            source: "src".into(),
            targets: vec![
                Target::new("a".into(), vec!["/r/a".into()], &files),
                Target::new("b".into(), vec!["/r/a".into()], &files),
            ],
            files,
            hook: String::new(),
            callback_url: String::new(),
            timeout_ms: 1000,
            grace_ms: 1000,
            requested_targets: vec!["a".into(), "b".into()],
            selector: String::new(),
            destination: String::new(),
            phase: JobPhase::Running,
            created_ms: 1,
            finished_ms: 0,
        }
    }

    fn ack(target: &str, chunk: u32, from: &str) -> JobEvent {
        JobEvent::Ack { job: "j1".into(), target: target.into(), file: 0, chunk, from: from.into(), at_ms: 5 }
    }

    #[test]
    fn acks_count_once_and_fins_settle_the_job() {
        let mut j = job();
        j.apply(&ack("a", 0, "src"));
        j.apply(&ack("a", 0, "src"));
        j.apply(&ack("a", 1, "b"));
        let a = &j.targets[0];
        assert_eq!((a.chunks_done, a.bytes_done, a.bytes_from_source, a.bytes_from_peers), (2, 30, 10, 20));
        assert!(a.complete());
        assert_eq!(a.phase, TargetPhase::Transferring);
        j.apply(&JobEvent::Prepared {
            job: "j1".into(),
            target: "b".into(),
            unchanged: vec![0],
            local: vec![],
            at_ms: 6,
        });
        assert_eq!(j.targets[1].bytes_reused, 30);
        // A restarted target that lost chunk 1 says so: it is pulled again.
        let lost = JobEvent::Prepared {
            job: "j1".into(),
            target: "a".into(),
            unchanged: vec![],
            local: vec![(0, 0)],
            at_ms: 7,
        };
        j.apply(&lost);
        assert!(!j.targets[0].complete());
        assert_eq!((j.targets[0].chunks_done, j.targets[0].bytes_done), (1, 10));
        j.apply(&ack("a", 1, "b"));
        for t in ["a", "b"] {
            let fin = JobEvent::Fin {
                job: "j1".into(),
                target: t.into(),
                ok: true,
                reason: String::new(),
                hook_exit: Some(0),
                at_ms: 9,
            };
            j.apply(&fin);
        }
        assert_eq!(j.targets[0].phase, TargetPhase::Installed);
        assert_eq!(j.targets[1].phase, TargetPhase::Unchanged);
        assert_eq!((j.phase, j.finished_ms), (JobPhase::Succeeded, 9));
    }

    #[test]
    fn one_failed_target_fails_the_job_and_cancel_stops_the_rest() {
        let mut j = job();
        j.apply(&JobEvent::FailTarget { job: "j1".into(), target: "a".into(), reason: "gone".into(), at_ms: 3 });
        assert_eq!(j.phase, JobPhase::Running);
        j.apply(&JobEvent::Cancel { job: "j1".into(), at_ms: 4 });
        assert_eq!(j.phase, JobPhase::Cancelled);
        assert_eq!(j.targets[0].phase, TargetPhase::Failed);
        assert_eq!(j.targets[1].phase, TargetPhase::Cancelled);
        // Late events change nothing.
        j.apply(&ack("b", 0, "src"));
        assert_eq!(j.targets[1].chunks_done, 0);
    }
}
