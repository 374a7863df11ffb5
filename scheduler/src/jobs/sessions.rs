//! Worker sessions on the leader (soft state): who is connected, in which
//! session (epoch), when each worker was last heard from, the queue of
//! commands to each, and index requests waiting for their answer.
//!
//! Liveness (up/down, last seen) lives here, on the leader: a new leader
//! learns it again within a heartbeat as workers reconnect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_storage::JobEvent;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::clock::now_ms;
use crate::error::Error;
use crate::jobs::planner::Report;
use crate::jobs::worker::{Answer, Indexed, ToWorker};

/// A worker that sent nothing for this long counts as down.
pub const SILENCE_IS_DOWN: Duration = Duration::from_secs(5);

/// Commands queued for one worker's session, at most.
pub const QUEUE: usize = 1024;

struct Session {
    tx: mpsc::Sender<ToWorker>,
    epoch: u64,
    /// The chunk service address the worker gave: what tells a worker
    /// reconnecting from one that only shares its name.
    addr: String,
    last_seen: Instant,
    last_seen_ms: u64,
    /// The worker said it drains: no new pulls to it, and chunks from it
    /// only when no one else holds them.
    draining: bool,
}

/// The leader's live sessions.
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    /// When a worker was last seen, kept after its session ends.
    seen: Mutex<HashMap<String, u64>>,
    next_epoch: AtomicU64,
    next_request: AtomicU64,
    /// Requests waiting for their worker's answer: (worker, reply).
    waiters: Mutex<HashMap<u64, (String, oneshot::Sender<Answer>)>>,
    /// Woken when a session opens or closes.
    pub changed: Notify,
    events: mpsc::Sender<Report>,
    progress: mpsc::Sender<JobEvent>,
}

impl Sessions {
    /// A registry whose planner events go to `events` and whose job events
    /// go to `progress` (the event batcher).
    pub fn new(events: mpsc::Sender<Report>, progress: mpsc::Sender<JobEvent>) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            next_epoch: AtomicU64::new(1),
            next_request: AtomicU64::new(1),
            waiters: Mutex::new(HashMap::new()),
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

    /// Waits up to `timeout` for `worker` to be connected (a new leader's
    /// workers reconnect within [`SILENCE_IS_DOWN`]); its epoch then.
    pub async fn wait_connected(&self, worker: &str, timeout: Duration) -> Option<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let opened = self.changed.notified();
            tokio::pin!(opened);
            // Registered before the look, so an open in between still wakes us.
            opened.as_mut().enable();
            if let Some(epoch) = self.epoch(worker) {
                return Some(epoch);
            }
            tokio::time::timeout_at(deadline, opened).await.ok()?;
        }
    }

    /// Queues a command for `worker`; false if it is not connected or its
    /// queue is full (the planner tries again next round).
    pub fn send(&self, worker: &str, msg: ToWorker) -> bool {
        match self.lock().get(worker) {
            Some(s) => s.tx.try_send(msg).is_ok(),
            None => false,
        }
    }

    /// Every connected worker heard from lately, with its session epoch.
    pub fn live(&self) -> HashMap<String, u64> {
        self.lock()
            .iter()
            .filter(|(_, s)| s.last_seen.elapsed() < SILENCE_IS_DOWN)
            .map(|(name, s)| (name.clone(), s.epoch))
            .collect()
    }

    /// Notes that `name` drains, in session `epoch`.
    pub(crate) fn set_draining(&self, name: &str, epoch: u64) {
        if let Some(s) = self.lock().get_mut(name).filter(|s| s.epoch == epoch && !s.draining) {
            s.draining = true;
            tracing::info!(worker = %name, "worker draining");
        }
    }

    /// Whether `worker`'s current session drains.
    pub fn is_draining(&self, worker: &str) -> bool {
        self.lock().get(worker).is_some_and(|s| s.draining)
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
    pub async fn index(&self, worker: &str, paths: Vec<String>, timeout: Duration) -> Result<Indexed, Error> {
        let not_connected = || Error::FailedPrecondition(format!("source: worker {worker} is not connected"));
        match self.ask(worker, |request| ToWorker::Index { request, paths }, timeout).await {
            Ok(Some(Answer::Indexed(r))) => Ok(r),
            Ok(Some(other)) => Err(Error::Unexpected { op: "index", result: format!("{other:?}") }),
            Ok(None) => Err(not_connected()),
            Err(()) => Err(Error::Timeout(format!("source {worker} did not index the files in {timeout:?}"))),
        }
    }

    /// Asks `worker` whether it could write `destinations`: `Ok(None)` when
    /// it is not connected or did not answer within `timeout` (it checks
    /// again when it prepares), else its answer.
    pub async fn check(
        &self,
        worker: &str,
        destinations: Vec<String>,
        timeout: Duration,
    ) -> Result<Option<Result<(), String>>, Error> {
        match self.ask(worker, |request| ToWorker::Check { request, destinations }, timeout).await {
            Ok(Some(Answer::Checked(r))) => Ok(Some(r)),
            Ok(Some(other)) => Err(Error::Unexpected { op: "check", result: format!("{other:?}") }),
            Ok(None) | Err(()) => Ok(None),
        }
    }

    /// Sends `worker` the command `make` builds around a new request id and
    /// waits for the answer: `Ok(None)` if it could not be sent, `Err` if no
    /// answer came within `timeout`.
    async fn ask(
        &self,
        worker: &str,
        make: impl FnOnce(u64) -> ToWorker,
        timeout: Duration,
    ) -> Result<Option<Answer>, ()> {
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let waiters = || self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        waiters().insert(request, (worker.to_string(), tx));
        if !self.send(worker, make(request)) {
            waiters().remove(&request);
            return Ok(None);
        }
        let result = tokio::time::timeout(timeout, rx).await;
        waiters().remove(&request);
        match result {
            Ok(Ok(answer)) => Ok(Some(answer)),
            Ok(Err(_)) | Err(_) => Err(()),
        }
    }

    /// Opens a session for worker `name` at `addr`; returns its epoch. A
    /// live session of `name` from another address keeps the name: the
    /// answer is then `Err` with that address. One from the same address
    /// is the worker itself reconnecting, and is replaced.
    pub(crate) fn open(&self, name: &str, addr: &str, tx: mpsc::Sender<ToWorker>) -> Result<u64, String> {
        let mut map = self.lock();
        if let Some(held) = map.get(name).filter(|s| s.addr != addr && s.last_seen.elapsed() < SILENCE_IS_DOWN) {
            return Err(held.addr.clone());
        }
        let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
        let session = Session {
            tx,
            epoch,
            addr: addr.to_string(),
            last_seen: Instant::now(),
            last_seen_ms: now_ms(),
            draining: false,
        };
        map.insert(name.to_string(), session);
        drop(map);
        self.touch(name, epoch);
        self.changed.notify_waiters();
        Ok(epoch)
    }

    /// Notes that `name` was heard from in session `epoch`.
    pub(crate) fn touch(&self, name: &str, epoch: u64) {
        if let Some(s) = self.lock().get_mut(name).filter(|s| s.epoch == epoch) {
            s.last_seen = Instant::now();
            s.last_seen_ms = now_ms();
        }
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), now_ms());
    }

    /// Ends session `epoch` of `name` (if it is still the current one).
    pub(crate) fn close(&self, name: &str, epoch: u64) {
        let mut map = self.lock();
        if map.get(name).is_some_and(|s| s.epoch == epoch) {
            map.remove(name);
        }
        drop(map);
        self.changed.notify_waiters();
    }

    /// Hands the answer to request `request` to its waiter, if `worker` is
    /// the one that was asked.
    pub(crate) fn answered(&self, worker: &str, request: u64, answer: Answer) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if waiters.get(&request).is_some_and(|(w, _)| w == worker) {
            if let Some((_, tx)) = waiters.remove(&request) {
                let _ = tx.send(answer);
            }
        }
    }

    /// Tells the planner about a worker's report (dropped if it lags; it
    /// plans again from the log).
    pub(crate) fn report(&self, event: Report) {
        let _ = self.events.try_send(event);
    }

    /// Queues a job event for the log (the event batcher).
    pub(crate) fn record(&self, e: JobEvent) {
        if self.progress.try_send(e).is_err() {
            tracing::warn!("job event queue full; the planner will ask again");
        }
    }
}
