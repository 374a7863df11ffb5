//! The admin HTTP port: `/metrics` (Prometheus text), `/healthz` (the process
//! and its Raft node run) and `/readyz` (knows a leader and has applied up to
//! the commit index it knew at start).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::Readings;
use crate::raft::node::Node;

/// The admin router.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(node)
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

/// The node's figures for the metrics, read now.
fn readings(node: &Node) -> Readings {
    let m = node.raft.metrics().borrow().clone();
    Readings {
        term: m.current_term,
        leader_id: m.current_leader.unwrap_or(0),
        is_leader: m.current_leader == Some(node.id),
        commit_index: node.log.committed_index().load(std::sync::atomic::Ordering::Relaxed),
        applied_index: node.reader.applied_index(),
        last_log_index: m.last_log_index.unwrap_or(0),
        log_entries: node.log.entry_count() as u64,
        snapshot_index: m.snapshot.map(|s| s.index).unwrap_or(0),
        revision: node.reader.revision(),
        snapshots_built: node.reader.snapshots_built(),
        snapshots_installed: node.reader.snapshots_installed(),
        log_flushes: node.log.append_flushes(),
        tls_not_after: node.peers.security().not_after_unix(),
        probes: crate::probes::statuses(node)
            .map(|all| all.into_iter().map(|(_, s)| (s.name, s.stale)).collect())
            .unwrap_or_default(),
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let text = node.metrics.render(&readings(&node));
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
}

async fn healthz(State(node): State<Arc<Node>>) -> impl IntoResponse {
    match node.role() {
        "shutdown" => (StatusCode::SERVICE_UNAVAILABLE, "raft stopped\n".to_string()),
        _ => (StatusCode::OK, "ok\n".to_string()),
    }
}

/// Ready: a leader is known and the state machine has caught up with what
/// was committed when this process started.
pub fn readiness(node: &Node) -> Result<(), String> {
    if node.leader().is_none() {
        return Err("no leader known".into());
    }
    let applied = node.reader.applied_index();
    if applied < node.start_commit {
        return Err(format!("applied index {applied} is behind the commit index {} known at start", node.start_commit));
    }
    Ok(())
}

async fn readyz(State(node): State<Arc<Node>>) -> impl IntoResponse {
    match readiness(&node) {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}
