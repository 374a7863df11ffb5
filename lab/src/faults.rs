//! Faults a test drives inside a running `ferry` process, in builds with
//! the `failpoints` feature only (the `ferry` the tests and the chaos
//! harness run; never a release that ships).
//!
//! - [`FaultLayer`] sits in front of every gRPC server of the process (the
//!   scheduler's: Raft, clients, worker sessions; the worker's: chunks) and
//!   passes each call through two fail points: `rpc-delay`, whose
//!   `return(MS)` holds the call MS milliseconds (200 without an argument)
//!   before serving it, and `rpc-drop`, whose `return` answers
//!   `Unavailable` without serving it, or, with `return(PREFIX)`, only calls
//!   whose path starts with PREFIX (e.g. `/ferry.v1.RaftService`). Their
//!   actions take the `fail` crate's forms: `30%return(500)`, `off`.
//! - [`router`] is mounted on the process's admin HTTP port and sets any
//!   fail point of the process at run time: `PUT /failpoints/NAME` with the
//!   actions as body, `DELETE /failpoints/NAME`, `GET /failpoints`.
//!
//! The kernel here has no `netem`, so this is how the chaos harness delays
//! and drops messages (see docs/operations/chaos.md).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::Router;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tower::{Layer, Service};

/// The layer: wraps the router of a gRPC server.
#[derive(Clone, Copy, Default)]
pub struct FaultLayer;

impl<S> Layer<S> for FaultLayer {
    type Service = Faulty<S>;

    fn layer(&self, inner: S) -> Faulty<S> {
        Faulty { inner }
    }
}

/// The service [`FaultLayer`] builds.
#[derive(Clone)]
pub struct Faulty<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<Request<Body>> for Faulty<S>
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

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let path = req.uri().path().to_string();
        let dropped = fail::eval("rpc-drop", |prefix| prefix.is_none_or(|p| path.starts_with(&p))).unwrap_or(false);
        let delay = fail::eval("rpc-delay", |ms| ms.and_then(|ms| ms.parse().ok()).unwrap_or(200));
        // The clone is ready: take it, leave the fresh one for next time.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            if let Some(ms) = delay {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if dropped {
                return Ok(
                    tonic::Status::unavailable(format!("{path}: dropped by the rpc-drop fail point")).into_http()
                );
            }
            inner.call(req).await
        })
    }
}

/// The admin routes that set fail points at run time.
pub fn router() -> Router {
    Router::new().route("/failpoints", get(list)).route("/failpoints/{name}", put(set).delete(remove))
}

async fn list() -> String {
    fail::list().into_iter().map(|(name, actions)| format!("{name}={actions}\n")).collect()
}

async fn set(Path(name): Path<String>, actions: String) -> (StatusCode, String) {
    match fail::cfg(name.clone(), actions.trim()) {
        Ok(()) => (StatusCode::OK, format!("{name}={}\n", actions.trim())),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{name}: {e}\n")),
    }
}

async fn remove(Path(name): Path<String>) -> &'static str {
    fail::remove(name);
    "removed\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one inner service: answers OK and counts the calls it served.
    #[derive(Clone, Default)]
    struct Count(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl Service<Request<Body>> for Count {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::ready(Ok(Response::new(Body::empty())))
        }
    }

    async fn call(svc: &mut Faulty<Count>, path: &str) -> Option<tonic::Code> {
        let req = Request::builder().uri(path).body(Body::empty()).unwrap();
        let resp = svc.call(req).await.unwrap();
        tonic::Status::from_header_map(resp.headers()).map(|s| s.code())
    }

    // One test: the fail points are global to the process.
    #[tokio::test]
    async fn drop_answers_unavailable_for_matching_paths_and_delay_holds_calls() {
        let count = Count::default();
        let mut svc = FaultLayer.layer(count.clone());
        assert_eq!(call(&mut svc, "/ferry.v1.RaftService/Append").await, None);

        fail::cfg("rpc-drop", "return(/ferry.v1.RaftService)").unwrap();
        assert_eq!(call(&mut svc, "/ferry.v1.RaftService/Append").await, Some(tonic::Code::Unavailable));
        assert_eq!(call(&mut svc, "/ferry.v1.ConfigService/Put").await, None);
        fail::cfg("rpc-drop", "return").unwrap();
        assert_eq!(call(&mut svc, "/ferry.v1.ConfigService/Put").await, Some(tonic::Code::Unavailable));
        fail::remove("rpc-drop");
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 2, "dropped calls never reach the service");

        fail::cfg("rpc-delay", "return(300)").unwrap();
        let started = std::time::Instant::now();
        assert_eq!(call(&mut svc, "/x/y").await, None);
        assert!(started.elapsed() >= Duration::from_millis(300), "held for the delay");
        fail::remove("rpc-delay");
    }

    #[tokio::test]
    async fn the_router_sets_lists_and_removes_points_and_refuses_bad_actions() {
        use tower::ServiceExt;
        let send = |method: &str, body: &str| {
            let uri = if method == "GET" { "/failpoints" } else { "/failpoints/router-test" };
            let req =
                axum::http::Request::builder().method(method).uri(uri).body(axum::body::Body::from(body.to_string()));
            router().oneshot(req.unwrap())
        };
        let text = |resp: axum::response::Response| async move {
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
            String::from_utf8(bytes.to_vec()).unwrap()
        };
        let bad = send("PUT", "now%please").await.unwrap();
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
        assert!(!text(send("GET", "").await.unwrap()).await.contains("router-test"), "nothing set");
        assert_eq!(send("PUT", "50%return(7)").await.unwrap().status(), StatusCode::OK);
        assert!(text(send("GET", "").await.unwrap()).await.contains("router-test=50%return(7)"));
        assert_eq!(send("DELETE", "").await.unwrap().status(), StatusCode::OK);
        assert!(!text(send("GET", "").await.unwrap()).await.contains("router-test"));
    }
}
