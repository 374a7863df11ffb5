//! The worker's admin HTTP port (`--admin-listen`): `/metrics` (Prometheus
//! text, names `ferry_worker_*`), `/healthz` (the process runs) and `/readyz`
//! (a control session with the leader is open).

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Count = Counter<u64, AtomicU64>;
type Level = Gauge<i64, AtomicI64>;

/// Every metric a worker exports. Cheap to share (`Arc`).
pub struct WorkerMetrics {
    registry: Registry,
    /// Chunk bytes sent to peers.
    pub bytes_uploaded: Count,
    /// Chunk bytes received from peers (verified or not).
    pub bytes_downloaded: Count,
    /// Chunks pulled and verified.
    pub chunks_pulled: Count,
    /// Chunks found locally at prepare (not transferred).
    pub chunks_reused: Count,
    /// Pulls that failed (peer error, bad length, bad hash).
    pub pull_failures: Count,
    /// Chunks that failed their BLAKE3 check.
    pub bad_chunks: Count,
    /// Files moved into place.
    pub files_installed: Count,
    /// Hooks that exited non-zero or could not run.
    pub hook_failures: Count,
    /// Uploads being served now.
    pub uploads_in_flight: Level,
    /// Pulls running now.
    pub downloads_in_flight: Level,
    /// 1 while a control session with the leader is open.
    pub connected: Level,
    /// Bytes of replaced file versions kept for reuse.
    pub retained_bytes: Level,
    /// Config files created or replaced (content changed).
    pub config_files_written: Count,
    /// Config file hooks that exited non-zero or could not run.
    pub config_hook_failures: Count,
    /// Config file renders that failed (cluster unreachable, a value the
    /// format cannot carry, a write error); the file stayed as it was.
    pub config_errors: Count,
    /// Newest cluster revision a config file was rendered at.
    pub config_revision: Level,
    /// Probe downloads made.
    pub probe_downloads: Count,
    /// Probe downloads that failed (error, timeout, non-2xx status).
    pub probe_failures: Count,
    /// Probe output files created or replaced (the ranking changed).
    pub probe_outputs_written: Count,
    /// When this worker's certificate expires (Unix seconds; 0: plaintext),
    /// read from its credentials at each scrape.
    tls_not_after: Level,
    security: std::sync::OnceLock<ferry_tls::Security>,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("ferry_worker"),
            tls_not_after: Level::default(),
            security: std::sync::OnceLock::new(),
            bytes_uploaded: Count::default(),
            bytes_downloaded: Count::default(),
            chunks_pulled: Count::default(),
            chunks_reused: Count::default(),
            pull_failures: Count::default(),
            bad_chunks: Count::default(),
            files_installed: Count::default(),
            hook_failures: Count::default(),
            uploads_in_flight: Level::default(),
            downloads_in_flight: Level::default(),
            connected: Level::default(),
            retained_bytes: Level::default(),
            config_files_written: Count::default(),
            config_hook_failures: Count::default(),
            config_errors: Count::default(),
            config_revision: Level::default(),
            probe_downloads: Count::default(),
            probe_failures: Count::default(),
            probe_outputs_written: Count::default(),
        };
        let r = &mut m.registry;
        r.register("uploaded_bytes", "Chunk bytes sent to peers", m.bytes_uploaded.clone());
        r.register("downloaded_bytes", "Chunk bytes received from peers", m.bytes_downloaded.clone());
        r.register("chunks_pulled", "Chunks pulled from peers and verified", m.chunks_pulled.clone());
        r.register("chunks_reused", "Chunks found locally instead of transferred", m.chunks_reused.clone());
        r.register("pull_failures", "Pulls that failed", m.pull_failures.clone());
        r.register("bad_chunks", "Chunks that failed their BLAKE3 check", m.bad_chunks.clone());
        r.register("files_installed", "Files moved into place", m.files_installed.clone());
        r.register("hook_failures", "Hooks that failed", m.hook_failures.clone());
        r.register("uploads_in_flight", "Uploads being served", m.uploads_in_flight.clone());
        r.register("downloads_in_flight", "Pulls running", m.downloads_in_flight.clone());
        r.register("session_connected", "1 while a session with the leader is open", m.connected.clone());
        r.register("retained_bytes", "Bytes of replaced file versions kept for reuse", m.retained_bytes.clone());
        r.register("config_files_written", "Config files created or replaced", m.config_files_written.clone());
        r.register("config_hook_failures", "Config file hooks that failed", m.config_hook_failures.clone());
        r.register("config_errors", "Config file renders that failed (file kept)", m.config_errors.clone());
        r.register("config_revision", "Newest revision a config file was rendered at", m.config_revision.clone());
        r.register("probe_downloads", "Probe downloads made", m.probe_downloads.clone());
        r.register("probe_failures", "Probe downloads that failed", m.probe_failures.clone());
        r.register("probe_outputs_written", "Probe output files written", m.probe_outputs_written.clone());
        r.register(
            "tls_cert_not_after_seconds",
            "When this worker's TLS certificate expires, Unix time (0: plaintext)",
            m.tls_not_after.clone(),
        );
        m
    }
}

impl WorkerMetrics {
    /// Reports the expiry of `security`'s certificate from now on.
    pub fn watch_certificate(&self, security: &ferry_tls::Security) {
        let _ = self.security.set(security.clone());
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        if let Some(security) = self.security.get() {
            self.tls_not_after.set(security.not_after_unix());
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The admin router.
pub fn router(metrics: Arc<WorkerMetrics>) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(metrics)
        .merge(fault_routes())
}

/// `/failpoints`, in builds with the `failpoints` feature (see
/// `ferry_lab::faults`).
#[cfg(feature = "failpoints")]
fn fault_routes() -> Router {
    ferry_lab::faults::router()
}

#[cfg(not(feature = "failpoints"))]
fn fault_routes() -> Router {
    Router::new()
}

async fn render(State(m): State<Arc<WorkerMetrics>>) -> impl IntoResponse {
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.render())
}

async fn readyz(State(m): State<Arc<WorkerMetrics>>) -> impl IntoResponse {
    if m.connected.get() == 1 {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: no session with the leader\n")
    }
}
