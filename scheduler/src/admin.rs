//! The admin HTTP port: `/metrics` (Prometheus text), `/healthz` (the process
//! and its Raft node run) and `/readyz` (knows a leader and has applied up to
//! the commit index it knew at start).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::raft::node::Node;

/// The admin router.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(node)
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], node.metrics.render(&node))
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
