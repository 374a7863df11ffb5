//! Draining: a worker about to stop (SIGTERM, or `ferry worker drain`)
//! takes no new work and finishes what is in flight before it exits.
//!
//! Draining starts once ([`Drain::start`]); the session then says so in
//! every heartbeat (one at once), and the leader plans no new pulls to
//! this worker and takes chunks from it only when no one else holds them.
//! [`Drain::finished`] resolves when no pull or upload has been in flight
//! for a moment (after the leader has had a heartbeat's time to hear), or
//! when `drain_timeout` has passed; the daemon exits then.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::WorkerMetrics;

/// How long in-flight work must stay at zero before the drain is done.
const QUIET: Duration = Duration::from_millis(300);

/// The drain switch and what it waits on.
#[derive(Clone)]
pub struct Drain {
    started: watch::Sender<Option<Instant>>,
    timeout: Duration,
    heartbeat: Duration,
    metrics: Arc<WorkerMetrics>,
}

impl Drain {
    /// A drain that would wait at most `timeout` for work in flight.
    pub fn new(timeout: Duration, heartbeat: Duration, metrics: Arc<WorkerMetrics>) -> Self {
        Self { started: watch::channel(None).0, timeout, heartbeat, metrics }
    }

    /// Starts draining (again: nothing).
    pub fn start(&self, why: &str) {
        self.started.send_if_modified(|s| {
            if s.is_some() {
                return false;
            }
            tracing::info!(why, timeout = ?self.timeout, "draining: no new pulls or uploads; finishing those in flight");
            *s = Some(Instant::now());
            true
        });
    }

    /// Whether draining has started, and a way to hear when it does.
    pub fn watch(&self) -> watch::Receiver<Option<Instant>> {
        self.started.subscribe()
    }

    fn in_flight(&self) -> i64 {
        self.metrics.uploads_in_flight.get() + self.metrics.downloads_in_flight.get()
    }

    /// Resolves once a drain has started and finished: nothing in flight
    /// for [`QUIET`], or its timeout passed (then it says how much was
    /// left). Pending until a drain starts.
    pub async fn finished(&self) {
        let mut rx = self.started.subscribe();
        let Ok(started) = rx.wait_for(Option::is_some).await.map(|s| s.unwrap_or_else(Instant::now)) else {
            return std::future::pending().await;
        };
        let deadline = started + self.timeout;
        // The leader hears of the drain within a heartbeat; work it sent
        // before that may still arrive.
        tokio::time::sleep_until((started + 2 * self.heartbeat).min(deadline)).await;
        let mut quiet_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(in_flight = self.in_flight(), "drain timeout: stopping with work in flight");
                return;
            }
            if self.in_flight() > 0 {
                quiet_since = None;
            } else if now.duration_since(*quiet_since.get_or_insert(now)) >= QUIET {
                tracing::info!(took = ?started.elapsed(), "drained");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
