//! Leader forwarding, written once: a tower layer in front of every gRPC
//! service that sends calls only the leader can serve (writes, lease
//! keep-alives and their clock, worker liveness, membership changes) to the
//! leader, as they are (an HTTP/2 proxy: streams and deadlines included).
//!
//! A follower that knows the leader passes such a call on, marked with
//! [`FORWARDED_HEADER`] so it is never passed on twice; the leader's answer
//! comes back unchanged. Everything else (reads, which pass a read barrier
//! where they are linearizable, Raft traffic, worker sessions) is served
//! where it arrives. When no leader is known, or a forwarded call reaches a
//! node that is not (or no longer) the leader, the service itself answers
//! "not leader" with the leader's address when it knows one
//! ([`crate::error::Error::NotLeader`]), and clients follow it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ferry_proto::pb;
use ferry_proto::FORWARDED_HEADER;
use tonic::body::Body;
use tonic::codegen::http::{HeaderValue, Request, Response};
use tower::{Layer, Service};

use crate::raft::node::Node;

/// The methods only the leader serves, as `(service, method)`.
const LEADER_ONLY: &[(&str, &[&str])] = &[
    (pb::config_service_server::SERVICE_NAME, &["Put", "Delete", "Txn", "Gray"]),
    (pb::lease_service_server::SERVICE_NAME, &["Grant", "Revoke", "KeepAlive", "TimeToLive"]),
    (pb::registry_service_server::SERVICE_NAME, &["Register", "Deregister"]),
    (pb::probe_service_server::SERVICE_NAME, &["DefineProbe", "DeleteProbe", "Report"]),
    (pb::job_service_server::SERVICE_NAME, &["SubmitJob", "CancelJob"]),
    (pb::worker_service_server::SERVICE_NAME, &["ListWorkers", "DrainWorker"]),
    (pb::cluster_service_server::SERVICE_NAME, &["AddNode", "RemoveNode", "TransferLeader"]),
];

/// True if the call at `path` (`/package.Service/Method`) runs on the leader.
pub fn leader_only(path: &str) -> bool {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else { return false };
    LEADER_ONLY.iter().any(|(s, methods)| *s == service && methods.contains(&method))
}

/// True if a removed node turns the call at `path` away: every Ferry call
/// but `ClusterService/Status`, which tells an operator what happened.
fn refused_once_removed(path: &str) -> bool {
    path.starts_with("/ferry.v1.") && path != "/ferry.v1.ClusterService/Status"
}

/// The layer: wraps the router of the gRPC server.
#[derive(Clone)]
pub struct ForwardLayer {
    node: Arc<Node>,
}

impl ForwardLayer {
    /// Forwards leader-only calls arriving at `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

impl<S> Layer<S> for ForwardLayer {
    type Service = Forward<S>;

    fn layer(&self, inner: S) -> Forward<S> {
        Forward { inner, node: self.node.clone() }
    }
}

/// The service [`ForwardLayer`] builds.
#[derive(Clone)]
pub struct Forward<S> {
    inner: S,
    node: Arc<Node>,
}

impl<S> Forward<S> {
    /// The leader's address if this call goes there.
    fn target(&self, req: &Request<Body>) -> Option<String> {
        // Cheapest first: most calls a leader gets end at the second test.
        if !leader_only(req.uri().path()) || self.node.is_leader() || req.headers().contains_key(FORWARDED_HEADER) {
            return None;
        }
        self.node.leader().filter(|(id, _)| *id != self.node.id).map(|(_, addr)| addr)
    }
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<Request<Body>> for Forward<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Response<Body>, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        if self.node.removed.load(std::sync::atomic::Ordering::Relaxed) && refused_once_removed(req.uri().path()) {
            let msg = format!("node {} was removed from the cluster; ask another member", self.node.id);
            return Box::pin(async move { Ok(tonic::Status::unavailable(msg).into_http()) });
        }
        let Some(leader) = self.target(&req) else {
            // The clone is ready: take it, leave the fresh one for next time.
            let clone = self.inner.clone();
            let mut inner = std::mem::replace(&mut self.inner, clone);
            return Box::pin(async move { inner.call(req).await });
        };
        let channel = self.node.peers.channel(&leader);
        Box::pin(async move {
            let mut channel = match channel {
                Ok(c) => c,
                Err(e) => return Ok(tonic::Status::from(e).into_http()),
            };
            req.headers_mut().insert(FORWARDED_HEADER, HeaderValue::from_static("1"));
            tracing::trace!(path = %req.uri().path(), %leader, "forwarding to the leader");
            match tower::ServiceExt::oneshot(&mut channel, req).await {
                Ok(resp) => Ok(resp),
                Err(e) => {
                    Ok(tonic::Status::unavailable(format!("forwarding to the leader at {leader}: {e}")).into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_leader_state_go_to_the_leader_reads_stay() {
        for path in [
            "/ferry.v1.ConfigService/Put",
            "/ferry.v1.ConfigService/Txn",
            "/ferry.v1.LeaseService/KeepAlive",
            "/ferry.v1.JobService/SubmitJob",
            "/ferry.v1.WorkerService/ListWorkers",
            "/ferry.v1.ClusterService/AddNode",
        ] {
            assert!(leader_only(path), "{path}");
        }
        for path in [
            "/ferry.v1.ConfigService/Get",
            "/ferry.v1.ConfigService/Watch",
            "/ferry.v1.JobService/GetJob",
            "/ferry.v1.WorkerService/Session",
            "/ferry.v1.RaftService/AppendEntries",
            "/ferry.v1.ClusterService/Status",
            "/grpc.health.v1.Health/Check",
            "no-slash",
            "/ferry.v1.ConfigService",
        ] {
            assert!(!leader_only(path), "{path}");
        }
    }
}
