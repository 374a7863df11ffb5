//! `ferry.v1.WorkerService`: the leader's end of worker sessions, and the
//! worker list.
//!
//! Each connected worker holds one bidirectional stream. Its hello registers
//! it in the replicated state (only when something changed); its acks,
//! prepared reports and fins become job events in the Raft log, batched by
//! the proposer (see [`crate::jobs::batcher`]), and reports for the planner.
//! This is the protocol edge: worker messages are converted to the jobs
//! domain's types here, and its commands ([`ToWorker`]) to protobuf.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use ferry_proto::pb::{self, control_message::Msg as Ctl, worker_message::Msg, worker_service_server::WorkerService};
use ferry_storage::{Chunk, Command, FileEntry, JobEvent, Op, WorkerRecord};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::clock::now_ms;
use crate::error::Error;
use crate::jobs::planner::Report;
use crate::jobs::sessions::{Sessions, QUEUE};
use crate::jobs::worker::{Answer, Indexed, PullFailure, ToWorker};
use crate::raft::node::Node;

/// The WorkerService implementation.
pub struct WorkerServiceImpl {
    pub(crate) node: Arc<Node>,
    pub(crate) sessions: Arc<Sessions>,
}

fn record(info: &pb::WorkerInfo, at_ms: u64) -> WorkerRecord {
    WorkerRecord {
        name: info.name.clone(),
        addr: info.addr.clone(),
        labels: info.labels.clone().into_iter().collect::<BTreeMap<_, _>>(),
        roots: info.roots.clone(),
        hooks: info.hooks.clone(),
        version: info.version.clone(),
        registered_ms: at_ms,
    }
}

fn hash(bytes: &[u8]) -> Result<[u8; 32], String> {
    bytes.try_into().map_err(|_| format!("a BLAKE3 hash has 32 bytes, not {}", bytes.len()))
}

fn to_manifest(f: &FileEntry) -> pb::FileManifest {
    pb::FileManifest {
        path: f.path.clone(),
        size: f.size,
        mode: f.mode,
        blake3: f.blake3.to_vec(),
        chunks: f.chunks.iter().map(|c| pb::ChunkRef { offset: c.offset, len: c.len, hash: c.hash.to_vec() }).collect(),
    }
}

fn from_manifest(m: pb::FileManifest) -> Result<FileEntry, String> {
    let chunks = m
        .chunks
        .iter()
        .map(|c| Ok(Chunk { offset: c.offset, len: c.len, hash: hash(&c.hash)? }))
        .collect::<Result<_, String>>()?;
    Ok(FileEntry { blake3: hash(&m.blake3)?, path: m.path, size: m.size, mode: m.mode, chunks })
}

/// Checks a worker's hello; the error names the field. Everything in it
/// goes into the replicated worker record, so each part is bounded.
fn check_hello(hello: &pb::WorkerInfo) -> Result<(), Error> {
    let invalid = |m: String| Err(Error::InvalidArgument(m));
    if hello.name.is_empty() || hello.name.len() > 128 {
        return invalid("name: must be 1 to 128 bytes".into());
    }
    if hello.addr.is_empty() || hello.addr.len() > 261 {
        return invalid("addr: the worker must give its chunk service address (host:port)".into());
    }
    if hello.version.len() > 128 {
        return invalid("version: at most 128 bytes".into());
    }
    let pairs = ferry_storage::kv::MAX_SELECTOR_PAIRS;
    if hello.labels.len() > pairs || hello.labels.iter().any(|(k, v)| k.len() > 128 || v.len() > 128) {
        return invalid(format!("labels: at most {pairs} pairs, keys and values of at most 128 bytes"));
    }
    if hello.roots.len() > 64 || hello.roots.iter().any(|r| r.len() > 4096) {
        return invalid("roots: at most 64 paths of at most 4096 bytes".into());
    }
    if hello.hooks.len() > 256 || hello.hooks.iter().any(|h| h.len() > 128) {
        return invalid("hooks: at most 256 names of at most 128 bytes".into());
    }
    Ok(())
}

/// A source's index answer.
fn indexed(r: pb::IndexResult) -> Indexed {
    if !r.error.is_empty() {
        return Err(r.error);
    }
    r.files.into_iter().map(from_manifest).collect()
}

/// The wire form of a command.
fn to_control(cmd: ToWorker) -> pb::ControlMessage {
    let msg = match cmd {
        ToWorker::Index { request, paths } => Ctl::Index(pb::IndexCommand { request, paths }),
        ToWorker::Prepare { job, files } => Ctl::Prepare(pb::PrepareCommand {
            job_id: job,
            files: files
                .iter()
                .map(|(f, destination)| pb::TargetFile {
                    manifest: Some(to_manifest(f)),
                    destination: destination.clone(),
                })
                .collect(),
        }),
        ToWorker::Pull { job, file, chunk, from_worker, from_addr } => {
            Ctl::Pull(pb::PullCommand { job_id: job, file, chunk, from_worker, from_addr })
        }
        ToWorker::Pack { job, hook } => Ctl::Pack(pb::PackCommand { job_id: job, hook }),
        ToWorker::Cancel { job } => Ctl::Cancel(pb::CancelCommand { job_id: job }),
        ToWorker::Check { request, destinations } => Ctl::Check(pb::CheckCommand { request, destinations }),
        ToWorker::Drain => Ctl::Drain(pb::DrainCommand {}),
    };
    pb::ControlMessage { msg: Some(msg) }
}

/// Why a pull failed; `None`: it did not.
fn failure(code: i32) -> Option<PullFailure> {
    use pb::PullFailure as F;
    match F::try_from(code).unwrap_or(F::Local) {
        F::None => None,
        F::AlreadyPulling => Some(PullFailure::AlreadyPulling),
        F::HolderBusy => Some(PullFailure::HolderBusy),
        F::NotPrepared => Some(PullFailure::NotPrepared),
        F::AlreadyInstalled => Some(PullFailure::AlreadyInstalled),
        F::BadChunk => Some(PullFailure::BadChunk),
        F::Stalled => Some(PullFailure::Stalled),
        F::Holder => Some(PullFailure::Holder),
        F::Local => Some(PullFailure::Local),
        F::Gone => Some(PullFailure::Gone),
    }
}

impl WorkerServiceImpl {
    /// Records the worker in the replicated state, if anything changed.
    async fn register(&self, hello: &pb::WorkerInfo) -> Result<(), Error> {
        let known = self.node.reader.workers()?.into_iter().find(|w| w.name == hello.name);
        let fresh = record(hello, now_ms());
        if known.map(|k| WorkerRecord { registered_ms: 0, ..k })
            != Some(WorkerRecord { registered_ms: 0, ..fresh.clone() })
        {
            let cmd = Command { request_id: String::new(), op: Op::RegisterWorker(fresh) };
            self.node.propose(cmd).await?;
        }
        Ok(())
    }

    fn record(&self, e: JobEvent) {
        self.sessions.record(e);
    }

    fn handle(&self, worker: &str, epoch: u64, msg: Msg) {
        let at_ms = now_ms();
        match msg {
            Msg::Heartbeat(h) if h.draining => self.sessions.set_draining(worker, epoch),
            Msg::Hello(_) | Msg::Heartbeat(_) => {}
            // Only the worker that was asked may answer.
            Msg::Indexed(r) => self.sessions.answered(worker, r.request, Answer::Indexed(indexed(r))),
            Msg::Checked(r) => {
                let result = if r.error.is_empty() { Ok(()) } else { Err(r.error) };
                self.sessions.answered(worker, r.request, Answer::Checked(result))
            }
            Msg::Ack(a) => match failure(a.failure) {
                Some(failure) => {
                    tracing::debug!(%worker, job = %a.job_id, file = a.file, chunk = a.chunk, from = %a.from,
                        ?failure, error = %a.error, "pull failed; planning it elsewhere");
                    self.sessions.report(Report::PullFailed {
                        job: a.job_id,
                        target: worker.to_string(),
                        file: a.file,
                        chunk: a.chunk,
                        from: a.from,
                        failure,
                    });
                }
                None => self.acked(worker, a, at_ms),
            },
            Msg::Prepared(p) if !p.error.is_empty() => self.record(JobEvent::FailTarget {
                job: p.job_id,
                target: worker.into(),
                reason: format!("prepare: {}", p.error),
                at_ms,
            }),
            Msg::Prepared(p) => {
                self.sessions.report(Report::Prepared { job: p.job_id.clone(), target: worker.to_string(), epoch });
                self.record(JobEvent::Prepared {
                    job: p.job_id,
                    target: worker.into(),
                    unchanged: p.unchanged,
                    local: p.local.iter().map(|v| ((v >> 32) as u32, *v as u32)).collect(),
                    at_ms,
                })
            }
            Msg::Fin(f) => self.record(JobEvent::Fin {
                job: f.job_id,
                target: worker.into(),
                ok: f.ok,
                reason: f.reason,
                hook_exit: f.hook_exit,
                at_ms,
            }),
        }
    }

    fn acked(&self, worker: &str, a: pb::ChunkAck, at_ms: u64) {
        let target = worker.to_string();
        self.sessions.report(Report::Pulled {
            job: a.job_id.clone(),
            target: target.clone(),
            file: a.file,
            chunk: a.chunk,
        });
        self.record(JobEvent::Ack { job: a.job_id, target, file: a.file, chunk: a.chunk, from: a.from, at_ms })
    }
}

/// Under TLS, a worker holds a session only as the worker its certificate
/// names: another worker's name, a user's or a scheduler's certificate is
/// refused.
fn session_holder(caller: Option<&ferry_tls::Identity>, name: &str) -> Result<(), Status> {
    match caller {
        Some(ferry_tls::Identity::Worker(holder)) if holder == name => Ok(()),
        Some(other) => {
            tracing::warn!(caller = %other, name, "refused a worker session under a name the certificate does not name");
            Err(Status::permission_denied(format!(
                "name: this connection's certificate names {other}, not worker {name}; a worker holds a session only under its own name"
            )))
        }
        None => Err(Status::unauthenticated("name: the caller is not known by a certificate")),
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerServiceImpl {
    type SessionStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ControlMessage, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        if !self.node.is_leader() {
            return Err(self.node.not_leader().into());
        }
        let caller = ferry_tls::Peer::of(&request).and_then(|p| p.identity.clone());
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(pb::WorkerMessage { msg: Some(Msg::Hello(h)) }) => h,
            _ => {
                return Err(Error::InvalidArgument("hello: the first message of a session must be hello".into()).into())
            }
        };
        check_hello(&hello)?;
        if !self.node.peers.security().is_insecure() {
            session_holder(caller.as_ref(), &hello.name)?;
        }
        if hello.protocol != ferry_proto::PROTOCOL {
            return Err(Error::FailedPrecondition(format!(
                "protocol: worker {} speaks worker protocol {}, this scheduler {} ({}); run the same ferry version on both",
                hello.name,
                hello.protocol,
                ferry_proto::PROTOCOL,
                env!("CARGO_PKG_VERSION")
            ))
            .into());
        }
        // One live session per name: a second worker of the same name (a
        // copied config, a cloned machine) is refused before it can change
        // the first one's record, and told why.
        let (tx, rx) = mpsc::channel(QUEUE);
        let epoch = self.sessions.open(&hello.name, &hello.addr, tx).map_err(|holder| {
            tracing::warn!(worker = %hello.name, from = %hello.addr, holder = %holder,
                "refused a second session for a worker name that a live worker holds");
            Status::already_exists(format!(
                "name: a worker named {} is already connected from {holder}; this one (at {}) needs a name of its own",
                hello.name, hello.addr
            ))
        })?;
        // Register only when something changed, so reconnects cost no log entry.
        if let Err(e) = self.register(&hello).await {
            self.sessions.close(&hello.name, epoch);
            return Err(e.into());
        }
        tracing::info!(worker = %hello.name, addr = %hello.addr, epoch, "worker session open");
        let this = WorkerServiceImpl { node: self.node.clone(), sessions: self.sessions.clone() };
        let name = hello.name.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(pb::WorkerMessage { msg: Some(msg) })) => {
                        this.sessions.touch(&name, epoch);
                        this.handle(&name, epoch, msg);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            this.sessions.close(&name, epoch);
            tracing::info!(worker = %name, epoch, "worker session closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|cmd| Ok(to_control(cmd))))))
    }

    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        // Liveness is known on the leader only: a follower forwards this
        // call (see `forward`), or, knowing no leader, reports every worker down.
        let is_leader = self.node.is_leader();
        let workers = self.node.reader.workers().map_err(Error::from)?;
        let out = workers
            .into_iter()
            .map(|w| {
                let up = is_leader && self.sessions.epoch(&w.name).is_some();
                let state = match (up, self.sessions.is_draining(&w.name)) {
                    (false, _) => "down",
                    (true, false) => "up",
                    (true, true) => "draining",
                };
                pb::WorkerStatus {
                    state: state.into(),
                    last_seen_unix_ms: self.sessions.last_seen_ms(&w.name).unwrap_or(0),
                    info: Some(pb::WorkerInfo {
                        name: w.name,
                        addr: w.addr,
                        labels: w.labels.into_iter().collect(),
                        roots: w.roots,
                        hooks: w.hooks,
                        version: w.version,
                        // Registered workers speak this leader's protocol.
                        protocol: ferry_proto::PROTOCOL,
                    }),
                }
            })
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers: out }))
    }

    async fn drain_worker(
        &self,
        request: Request<pb::DrainWorkerRequest>,
    ) -> Result<Response<pb::DrainWorkerResponse>, Status> {
        let name = request.into_inner().name;
        if !self.node.is_leader() {
            return Err(self.node.not_leader().into());
        }
        let workers = self.node.reader.workers().map_err(Error::from)?;
        let Some(w) = workers.iter().find(|w| w.name == name) else {
            return Err(Error::InvalidArgument(format!("name: no worker {name} is registered")).into());
        };
        // An older worker would ignore the drain command.
        use crate::raft::versions::{Version, WORKER_DRAIN};
        if !w.version.parse::<Version>().is_ok_and(|v| v >= WORKER_DRAIN) {
            return Err(Error::FailedPrecondition(format!(
                "name: worker {name} runs ferry {}, which cannot drain on request ({WORKER_DRAIN} or later can); stop \
                 it with SIGTERM",
                w.version
            ))
            .into());
        }
        if !self.sessions.send(&name, ToWorker::Drain) {
            return Err(Error::FailedPrecondition(format!("name: worker {name} is not connected")).into());
        }
        tracing::info!(worker = %name, "asked to drain");
        Ok(Response::new(pb::DrainWorkerResponse {}))
    }
}
