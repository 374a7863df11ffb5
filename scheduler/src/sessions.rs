//! Worker sessions on the leader (soft state) and `ferry.v1.WorkerService`.
//!
//! Each connected worker holds one bidirectional stream. Its hello registers
//! it in the replicated state (only when something changed); its acks,
//! prepared reports and fins become job events in the Raft log, batched by
//! the proposer. Liveness (up/down, last seen) lives here, on the leader: a
//! new leader learns it again within a heartbeat as workers reconnect.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_proto::pb::{self, control_message::Msg as Ctl, worker_message::Msg, worker_service_server::WorkerService};
use ferry_storage::{Command, JobEvent, Op, WorkerRecord};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::node::Node;

/// A worker that sent nothing for this long counts as down.
pub const SILENCE_IS_DOWN: Duration = Duration::from_secs(5);

/// Leader time in milliseconds since the Unix epoch (goes into commands).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

struct Session {
    tx: mpsc::Sender<Result<pb::ControlMessage, Status>>,
    epoch: u64,
    last_seen: Instant,
    last_seen_ms: u64,
}

/// What the planner hears about besides state changes.
#[derive(Debug)]
pub enum PlannerEvent {
    /// A pull failed; plan it elsewhere.
    PullFailed { job: String, target: String, file: u32, chunk: u32, from: String, error: String },
    /// A target answered prepare in its current session.
    Prepared { job: String, target: String, epoch: u64 },
    /// A target holds a chunk (its ack is on the way into the log).
    Acked { job: String, target: String, file: u32, chunk: u32 },
}

/// Most job events in one log entry.
pub const EVENTS_PER_ENTRY: usize = 1024;

/// Packs job events from all sessions into few log entries: it takes what
/// queued up while the previous entry was being committed.
pub async fn run_event_batcher(node: Arc<Node>, mut rx: mpsc::Receiver<JobEvent>) {
    while let Some(first) = rx.recv().await {
        let mut events = vec![first];
        while events.len() < EVENTS_PER_ENTRY {
            match rx.try_recv() {
                Ok(e) => events.push(e),
                Err(_) => break,
            }
        }
        // Events are idempotent, so a failed proposal (a leader change
        // under load) is simply made again while this node leads.
        let cmd = Command { request_id: String::new(), op: Op::JobEvents(events) };
        for attempt in 1..=5u32 {
            match node.propose(cmd.clone(), true).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "recording worker progress failed");
                    if node.leader().map(|l| l.0) != Some(node.id) {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100 * attempt as u64)).await;
                }
            }
        }
    }
}

/// The leader's live sessions.
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    /// When a worker was last seen, kept after its session ends.
    seen: Mutex<HashMap<String, u64>>,
    next_epoch: AtomicU64,
    next_request: AtomicU64,
    /// Index requests waiting for their worker's answer: (worker, reply).
    index_waiters: Mutex<HashMap<u64, (String, oneshot::Sender<pb::IndexResult>)>>,
    /// Woken when a session opens or closes.
    pub changed: Notify,
    events: mpsc::Sender<PlannerEvent>,
    progress: mpsc::Sender<JobEvent>,
}

impl Sessions {
    /// A registry whose planner events go to `events` and whose job events
    /// go to `progress` (the event batcher).
    pub fn new(events: mpsc::Sender<PlannerEvent>, progress: mpsc::Sender<JobEvent>) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            next_epoch: AtomicU64::new(1),
            next_request: AtomicU64::new(1),
            index_waiters: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            events,
            progress,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current session epoch of a live worker (changes on reconnect).
    pub fn epoch(&self, worker: &str) -> Option<u64> {
        self.lock().get(worker).filter(|s| s.last_seen.elapsed() < SILENCE_IS_DOWN).map(|s| s.epoch)
    }

    /// Queues a command for `worker`; false if it is not connected or its
    /// queue is full (the planner tries again next round).
    pub fn send(&self, worker: &str, msg: Ctl) -> bool {
        match self.lock().get(worker) {
            Some(s) => s.tx.try_send(Ok(pb::ControlMessage { msg: Some(msg) })).is_ok(),
            None => false,
        }
    }

    /// Last time anything was heard from `worker` (ms since epoch), if ever.
    pub fn last_seen_ms(&self, worker: &str) -> Option<u64> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).get(worker).copied()
    }

    /// Forgets all sessions (this node stopped leading).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Asks `worker` to index `paths` and waits for the manifest.
    pub async fn index(&self, worker: &str, paths: Vec<String>, timeout: Duration) -> Result<pb::IndexResult, Error> {
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.index_waiters.lock().unwrap_or_else(|e| e.into_inner()).insert(request, (worker.to_string(), tx));
        if !self.send(worker, Ctl::Index(pb::IndexCommand { request, paths })) {
            self.index_waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(&request);
            return Err(Error::FailedPrecondition(format!("source: worker {worker} is not connected")));
        }
        let result = tokio::time::timeout(timeout, rx).await;
        self.index_waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(&request);
        match result {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) | Err(_) => {
                Err(Error::Timeout(format!("source {worker} did not index the files in {timeout:?}")))
            }
        }
    }

    fn open(&self, name: &str, tx: mpsc::Sender<Result<pb::ControlMessage, Status>>) -> u64 {
        let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(name.to_string(), Session { tx, epoch, last_seen: Instant::now(), last_seen_ms: now_ms() });
        self.touch(name, epoch);
        self.changed.notify_waiters();
        epoch
    }

    fn touch(&self, name: &str, epoch: u64) {
        if let Some(s) = self.lock().get_mut(name).filter(|s| s.epoch == epoch) {
            s.last_seen = Instant::now();
            s.last_seen_ms = now_ms();
        }
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), now_ms());
    }

    fn close(&self, name: &str, epoch: u64) {
        let mut map = self.lock();
        if map.get(name).is_some_and(|s| s.epoch == epoch) {
            map.remove(name);
        }
        drop(map);
        self.changed.notify_waiters();
    }
}

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

/// A job event as a command (no request id: applying an event twice is a no-op).
pub fn event(e: JobEvent) -> Command {
    Command { request_id: String::new(), op: Op::JobEvents(vec![e]) }
}

impl WorkerServiceImpl {
    fn record(&self, e: JobEvent) {
        if self.sessions.progress.try_send(e).is_err() {
            tracing::warn!("job event queue full; the planner will ask again");
        }
    }

    fn handle(&self, worker: &str, epoch: u64, msg: Msg) {
        let at_ms = now_ms();
        match msg {
            Msg::Hello(_) | Msg::Heartbeat(_) => {}
            Msg::Indexed(r) => {
                let mut waiters = self.sessions.index_waiters.lock().unwrap_or_else(|e| e.into_inner());
                // Only the worker that was asked may answer.
                if waiters.get(&r.request).is_some_and(|(w, _)| w == worker) {
                    if let Some((_, tx)) = waiters.remove(&r.request) {
                        let _ = tx.send(r);
                    }
                }
            }
            Msg::Ack(a) if !a.error.is_empty() => {
                let _ = self.sessions.events.try_send(PlannerEvent::PullFailed {
                    job: a.job_id,
                    target: worker.to_string(),
                    file: a.file,
                    chunk: a.chunk,
                    from: a.from,
                    error: a.error,
                });
            }
            Msg::Ack(a) => {
                let _ = self.sessions.events.try_send(PlannerEvent::Acked {
                    job: a.job_id.clone(),
                    target: worker.to_string(),
                    file: a.file,
                    chunk: a.chunk,
                });
                self.record(JobEvent::Ack {
                    job: a.job_id,
                    target: worker.into(),
                    file: a.file,
                    chunk: a.chunk,
                    from: a.from,
                    at_ms,
                })
            }
            Msg::Prepared(p) if !p.error.is_empty() => self.record(JobEvent::FailTarget {
                job: p.job_id,
                target: worker.into(),
                reason: format!("prepare: {}", p.error),
                at_ms,
            }),
            Msg::Prepared(p) => {
                let _ = self.sessions.events.try_send(PlannerEvent::Prepared {
                    job: p.job_id.clone(),
                    target: worker.to_string(),
                    epoch,
                });
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
}

#[tonic::async_trait]
impl WorkerService for WorkerServiceImpl {
    type SessionStream = ReceiverStream<Result<pb::ControlMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let leader = self.node.leader();
        if leader.as_ref().map(|l| l.0) != Some(self.node.id) {
            return Err(
                Error::NotLeader { leader_id: leader.as_ref().map(|l| l.0), leader_addr: leader.map(|l| l.1) }.into()
            );
        }
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(pb::WorkerMessage { msg: Some(Msg::Hello(h)) }) => h,
            _ => return Err(Status::invalid_argument("hello: the first message of a session must be hello")),
        };
        if hello.name.is_empty() || hello.name.len() > 128 {
            return Err(Status::invalid_argument("name: must be 1 to 128 bytes"));
        }
        if hello.addr.is_empty() {
            return Err(Status::invalid_argument("addr: the worker must give its chunk service address"));
        }
        // Register only when something changed, so reconnects cost no log entry.
        let known = self.node.reader.workers().map_err(Error::from)?.into_iter().find(|w| w.name == hello.name);
        let fresh = record(&hello, now_ms());
        if known.map(|k| WorkerRecord { registered_ms: 0, ..k })
            != Some(WorkerRecord { registered_ms: 0, ..fresh.clone() })
        {
            let cmd = Command { request_id: String::new(), op: Op::RegisterWorker(fresh) };
            self.node.propose(cmd, true).await?;
        }
        let (tx, rx) = mpsc::channel(1024);
        let epoch = self.sessions.open(&hello.name, tx);
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
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        // Liveness is known on the leader only: a follower asks it.
        let is_leader = self.node.leader().map(|l| l.0) == Some(self.node.id);
        if !is_leader && !crate::node::is_forwarded(&request) {
            if let Some((_, addr)) = self.node.leader() {
                let mut client =
                    ferry_proto::pb::worker_service_client::WorkerServiceClient::new(self.node.peers.channel(&addr)?);
                return client
                    .list_workers(crate::node::forwarded(pb::ListWorkersRequest {}, self.node.config.rpc_timeout))
                    .await;
            }
        }
        let workers = self.node.reader.workers().map_err(Error::from)?;
        let out = workers
            .into_iter()
            .map(|w| {
                let up = is_leader && self.sessions.epoch(&w.name).is_some();
                pb::WorkerStatus {
                    state: if up { "up" } else { "down" }.into(),
                    last_seen_unix_ms: self.sessions.last_seen_ms(&w.name).unwrap_or(0),
                    info: Some(pb::WorkerInfo {
                        name: w.name,
                        addr: w.addr,
                        labels: w.labels.into_iter().collect(),
                        roots: w.roots,
                        hooks: w.hooks,
                        version: w.version,
                    }),
                }
            })
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers: out }))
    }
}
