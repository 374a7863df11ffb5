//! The control session with the leader: connect to a scheduler, say hello,
//! send heartbeats, run the commands that arrive. A follower answers with the
//! leader's address and the worker goes there; a broken session is retried
//! with backoff over every configured scheduler.
//!
//! This is the worker's protocol edge: commands arrive as protobuf and are
//! converted to [`Command`]s here (a malformed one is answered with a
//! failure report), and [`Report`]s leave as protobuf.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::pb::{
    self, control_message::Msg as Ctl, worker_message::Msg, worker_service_client::WorkerServiceClient,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::command::{ChunkRef, Command, Manifest, Pull, PullFailure, Report, TargetFile};
use crate::executor::Executor;

/// The current session's outbound queue (none while disconnected). A
/// report made after its session ended goes to the next one.
#[derive(Clone, Default)]
pub struct Outbox(Arc<Mutex<Option<mpsc::Sender<pb::WorkerMessage>>>>);

impl Outbox {
    /// Replaces the queue (on connect) or clears it (on disconnect).
    fn set(&self, tx: Option<mpsc::Sender<pb::WorkerMessage>>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = tx;
    }

    /// Sends a report to the leader if a session is up; otherwise it is
    /// dropped (the leader re-plans after a reconnect).
    async fn send(&self, report: Report) {
        let tx = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(tx) = tx {
            let _ = tx.send(pb::WorkerMessage { msg: Some(encode(report)) }).await;
        }
    }
}

fn hash(bytes: &[u8], what: &str) -> Result<[u8; 32], String> {
    bytes.try_into().map_err(|_| format!("{what}: a BLAKE3 hash has 32 bytes, not {}", bytes.len()))
}

fn manifest(m: pb::FileManifest) -> Result<Manifest, String> {
    let chunks = m
        .chunks
        .iter()
        .map(|c| Ok(ChunkRef { offset: c.offset, len: c.len, hash: hash(&c.hash, "chunk hash")? }))
        .collect::<Result<_, String>>()?;
    Ok(Manifest { blake3: hash(&m.blake3, "file hash")?, path: m.path, size: m.size, mode: m.mode, chunks })
}

/// The command a leader's message stands for; a malformed one is answered
/// with the failure report it gets instead.
pub fn decode(msg: Ctl) -> Result<Command, Report> {
    Ok(match msg {
        Ctl::Index(c) => Command::Index { request: c.request, paths: c.paths },
        Ctl::Prepare(c) => {
            let files = c
                .files
                .into_iter()
                .map(|f| {
                    let m = f.manifest.ok_or("a file without manifest")?;
                    Ok(TargetFile { manifest: manifest(m)?, destination: f.destination })
                })
                .collect::<Result<Vec<_>, String>>();
            match files {
                Ok(files) => Command::Prepare { job: c.job_id, files },
                Err(e) => return Err(Report::Prepared { job: c.job_id, result: Err(e) }),
            }
        }
        Ctl::Pull(c) => Command::Pull(Pull {
            job: c.job_id,
            file: c.file,
            chunk: c.chunk,
            from_worker: c.from_worker,
            from_addr: c.from_addr,
        }),
        Ctl::Pack(c) => Command::Pack { job: c.job_id, hook: c.hook },
        Ctl::Cancel(c) => Command::Cancel { job: c.job_id },
        Ctl::Check(c) => Command::Check { request: c.request, destinations: c.destinations },
        Ctl::Drain(_) => Command::Drain,
    })
}

fn to_pb_manifest(m: Manifest) -> pb::FileManifest {
    pb::FileManifest {
        path: m.path,
        size: m.size,
        mode: m.mode,
        blake3: m.blake3.to_vec(),
        chunks: m.chunks.iter().map(|c| pb::ChunkRef { offset: c.offset, len: c.len, hash: c.hash.to_vec() }).collect(),
    }
}

fn failure(f: PullFailure) -> pb::PullFailure {
    match f {
        PullFailure::AlreadyPulling => pb::PullFailure::AlreadyPulling,
        PullFailure::HolderBusy => pb::PullFailure::HolderBusy,
        PullFailure::NotPrepared => pb::PullFailure::NotPrepared,
        PullFailure::AlreadyInstalled => pb::PullFailure::AlreadyInstalled,
        PullFailure::BadChunk => pb::PullFailure::BadChunk,
        PullFailure::Stalled => pb::PullFailure::Stalled,
        PullFailure::Holder => pb::PullFailure::Holder,
        PullFailure::Local => pb::PullFailure::Local,
        PullFailure::Gone => pb::PullFailure::Gone,
    }
}

/// The message a report leaves as.
pub fn encode(report: Report) -> Msg {
    match report {
        Report::Indexed { request, result: Ok(files) } => Msg::Indexed(pb::IndexResult {
            request,
            files: files.into_iter().map(to_pb_manifest).collect(),
            error: String::new(),
        }),
        Report::Indexed { request, result: Err(error) } => {
            Msg::Indexed(pb::IndexResult { request, files: vec![], error })
        }
        Report::Prepared { job, result: Ok(held) } => Msg::Prepared(pb::Prepared {
            job_id: job,
            unchanged: held.unchanged,
            error: String::new(),
            local: held.local.iter().map(|(f, c)| ((*f as u64) << 32) | *c as u64).collect(),
        }),
        Report::Prepared { job, result: Err(error) } => {
            Msg::Prepared(pb::Prepared { job_id: job, unchanged: vec![], error, local: vec![] })
        }
        Report::Pulled { job, file, chunk, from } => Msg::Ack(pb::ChunkAck {
            job_id: job,
            file,
            chunk,
            from,
            error: String::new(),
            failure: pb::PullFailure::None as i32,
        }),
        Report::PullFailed { job, file, chunk, from, error } => Msg::Ack(pb::ChunkAck {
            job_id: job,
            file,
            chunk,
            from,
            failure: failure(error.failure) as i32,
            error: error.detail,
        }),
        Report::Fin(f) => Msg::Fin(pb::TargetFin { job_id: f.job, ok: f.ok, reason: f.reason, hook_exit: f.hook_exit }),
        Report::Checked { request, result } => {
            Msg::Checked(pb::CheckResult { request, error: result.err().unwrap_or_default() })
        }
    }
}

enum Ended {
    /// Go to this address next.
    Redirect(String),
    /// Try again after a pause.
    Failed(String),
    /// The scheduler refused this worker for good (its name is taken).
    Refused(String),
    /// Shutting down.
    Stop,
}

/// Runs sessions until `shutdown` turns true, or until a scheduler refuses
/// this worker for good: then the reason goes to `refused`.
pub async fn run(
    exec: Arc<Executor>,
    hello: pb::WorkerInfo,
    schedulers: Vec<String>,
    heartbeat: Duration,
    mut shutdown: watch::Receiver<bool>,
    refused: watch::Sender<Option<String>>,
) {
    let outbox = Outbox::default();
    let mut next: Option<String> = None;
    let mut turn = 0usize;
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let addr = next.take().unwrap_or_else(|| {
            turn += 1;
            schedulers[turn % schedulers.len()].clone()
        });
        match serve(&exec, &outbox, &addr, &hello, heartbeat, &mut shutdown).await {
            Ended::Stop => return,
            Ended::Refused(why) => {
                tracing::error!(scheduler = %addr, %why, "the scheduler refused this worker");
                let _ = refused.send(Some(why));
                return;
            }
            Ended::Redirect(leader) => {
                tracing::debug!(from = %addr, to = %leader, "following the leader");
                next = Some(leader);
            }
            Ended::Failed(why) => {
                tracing::info!(scheduler = %addr, %why, "session ended; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        }
        backoff = Duration::from_millis(100);
    }
}

async fn serve(
    exec: &Arc<Executor>,
    outbox: &Outbox,
    addr: &str,
    hello: &pb::WorkerInfo,
    heartbeat: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    let endpoint = match Endpoint::from_shared(format!("http://{addr}")) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(1))
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true),
        Err(e) => return Ended::Failed(format!("bad scheduler address: {e}")),
    };
    let channel = match ferry_tls::client::connect(endpoint, &exec.security, ferry_tls::Role::Scheduler).await {
        Ok(c) => c,
        Err(e) => return Ended::Failed(format!("connect: {e}")),
    };
    let (tx, rx) = mpsc::channel(1024);
    if tx.send(pb::WorkerMessage { msg: Some(Msg::Hello(hello.clone())) }).await.is_err() {
        return Ended::Failed("session queue closed".into());
    }
    let mut client = WorkerServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut stream = match client.session(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            if let Some(leader) = ferry_proto::leader_hint(&status) {
                if leader != addr {
                    return Ended::Redirect(leader.to_string());
                }
            }
            // Its name is taken, or its hello is refused (its own config):
            // asking again would get the same answer.
            if matches!(status.code(), tonic::Code::AlreadyExists | tonic::Code::InvalidArgument) {
                return Ended::Refused(status.message().to_string());
            }
            return Ended::Failed(status.message().to_string());
        }
    };
    tracing::info!(scheduler = %addr, worker = %hello.name, "session open");
    outbox.set(Some(tx.clone()));
    exec.metrics.connected.set(1);
    let beat = {
        let tx = tx.clone();
        let mut draining = exec.drain.watch();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(heartbeat);
            loop {
                // A drain is told at once, then in every heartbeat.
                tokio::select! {
                    _ = tick.tick() => {}
                    Ok(()) = draining.changed() => {}
                }
                let beat = pb::Heartbeat { draining: draining.borrow().is_some() };
                if tx.send(pb::WorkerMessage { msg: Some(Msg::Heartbeat(beat)) }).await.is_err() {
                    return;
                }
            }
        })
    };
    let ended = loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(pb::ControlMessage { msg: Some(msg) })) => {
                    let (exec, outbox) = (exec.clone(), outbox.clone());
                    tokio::spawn(async move {
                        let report = match decode(msg) {
                            Ok(cmd) => exec.handle(cmd).await,
                            Err(refused) => Some(refused),
                        };
                        if let Some(report) = report {
                            outbox.send(report).await;
                        }
                    });
                }
                Ok(Some(_)) => {}
                Ok(None) => break Ended::Failed("the scheduler closed the session".into()),
                Err(status) => break Ended::Failed(status.message().to_string()),
            },
            _ = shutdown.changed() => break Ended::Stop,
        }
    };
    outbox.set(None);
    exec.metrics.connected.set(0);
    beat.abort();
    ended
}
