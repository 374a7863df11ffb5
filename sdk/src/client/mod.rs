//! The client: endpoints, failover, leader hints, retries, and the one way
//! every typed call goes out.
//!
//! This file owns [`Client`] and [`ClientOptions`], the endpoint list (which
//! endpoint to try next, and the leader a "not leader" answer names), the
//! retry policy (`Client::call_with`, with its `Retry` rules) and the one
//! generic helper every call of the APIs goes through (`Client::call`: a
//! request with its deadline, a clone of the message per attempt, the typed
//! stub, the answer unwrapped). The APIs are a file each, every one an
//! `impl Client` block of short methods: `kv` (keys and values), `leases`,
//! `registry` (service instances), `probes`, `jobs`, `cluster` (status,
//! membership, workers) and `watch` (a resuming watch on a prefix).

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::pb::cluster_service_client::ClusterServiceClient;
use ferry_proto::pb::config_service_client::ConfigServiceClient;
use ferry_proto::pb::job_service_client::JobServiceClient;
use ferry_proto::pb::lease_service_client::LeaseServiceClient;
use ferry_proto::pb::probe_service_client::ProbeServiceClient;
use ferry_proto::pb::registry_service_client::RegistryServiceClient;
use ferry_proto::pb::worker_service_client::WorkerServiceClient;
use ferry_tls::{Role, Security};
use tonic::transport::Endpoint;

use crate::cache::Cache;
use crate::error::Error;
use crate::transport::Transport;

mod cluster;
mod jobs;
mod kv;
mod leases;
mod probes;
mod registry;
mod watch;

pub use cluster::Status;
pub use kv::{KeyValue, Put, MAX_KEY_BYTES, MAX_VALUE_BYTES};
pub use leases::{KeepAlive, KEEP_ALIVE_BUFFER};
pub(crate) use registry::{load_instances, store_instances};
pub use watch::Watch;

/// Largest message the config and job stubs send or accept (a listing of
/// many keys, a job's reports); the other stubs keep tonic's 4 MiB.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Tuning for a [`Client`]: deadlines, the retry budget and the local cache.
///
/// Start from the defaults and set what you need; struct update syntax is
/// the builder:
///
/// ```
/// use std::time::Duration;
/// let options = ferry_sdk::ClientOptions {
///     request_timeout: Duration::from_secs(2),
///     total_timeout: Duration::from_secs(10),
///     ..Default::default()
/// };
/// assert_eq!(options.connect_timeout, Duration::from_millis(800));
/// ```
///
/// **Retry budget.** A call may take up to `total_timeout`. Within it the
/// client tries the endpoints in turn, starting with the one that answered
/// last and jumping to the leader a "not leader" answer names, each attempt
/// bounded by `request_timeout`; after a round in which every endpoint
/// failed it pauses for `backoff` (doubling each round, at most 1 s). Reads
/// and writes are retried on `Unavailable`, `DeadlineExceeded`, `Cancelled`,
/// `Unknown` and `Aborted`: writes keep their request id across attempts,
/// so one that applied before its answer was lost is answered from the
/// cluster's record instead of applying again. Membership changes
/// ([`Client::add_node`], [`Client::remove_node`]) are retried only when
/// the call surely did not reach a node. When the budget runs out the call
/// fails with [`Error::Unavailable`] and the last failure.
///
/// **Connections** are HTTP/2 over mutual TLS ([`Security::Tls`]: the
/// cluster's CA, a user certificate and its key), opened lazily, with TCP
/// no-delay and HTTP/2 keepalive pings every 10 s (5 s to answer) so a
/// paused node is noticed. The client checks that each endpoint holds a
/// scheduler certificate of the cluster's CA. Plaintext
/// ([`Security::Insecure`]) only when asked for; with neither, the client
/// is not made ([`Error::NoSecurity`]).
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Deadline of one attempt against one endpoint (default 5 s). Streams
    /// (watches, keep-alives, job progress) are not bounded by it once open.
    pub request_timeout: Duration,
    /// Deadline of a whole call, retries included: the retry budget
    /// (default 15 s). [`Client::submit_job`] with `wait` adds the job's
    /// own timeout to it.
    pub total_timeout: Duration,
    /// TCP connect timeout per attempt (default 800 ms): what a down
    /// endpoint costs before the next one is tried.
    pub connect_timeout: Duration,
    /// First pause after a round in which every endpoint failed (default
    /// 50 ms); it doubles each round, up to 1 s.
    pub backoff: Duration,
    /// Directory of the local cache ([`crate::cache`]): the `*_or_cached`
    /// calls and [`crate::Balancer::follow`] keep their last views there and
    /// serve them, marked stale, while the cluster is unreachable. `None`
    /// (the default): no cache.
    pub cache_dir: Option<PathBuf>,
    /// How connections are secured; [`Client::connect`] sets it. `None`
    /// (the default) refuses to make a client: plaintext is never implied.
    pub security: Option<Security>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_millis(800),
            backoff: Duration::from_millis(50),
            cache_dir: None,
            security: None,
        }
    }
}

/// An endpoint (configured, or a leader learnt of) and its channel.
struct Target {
    addr: String,
    channel: Transport,
}

/// A client of a Ferry cluster: keys and values, leases, the service
/// registry, probes, jobs and the cluster itself, every call with failover
/// and retries under a deadline ([`ClientOptions`]). Cheap to clone; clones
/// share connections.
#[derive(Clone)]
pub struct Client {
    targets: Arc<Mutex<Vec<Target>>>,
    /// Index of the endpoint that answered last; calls start there.
    preferred: Arc<AtomicUsize>,
    options: ClientOptions,
    /// Present when `options.cache_dir` is set.
    cache: Option<Cache>,
}

/// A channel to `addr` (`host:port`) as [`ClientOptions`] describes
/// connections; it connects on first use.
fn channel(addr: &str, options: &ClientOptions) -> Result<Transport, Error> {
    let (host, port) =
        addr.rsplit_once(':').ok_or_else(|| Error::InvalidEndpoint(format!("'{addr}' is not HOST:PORT")))?;
    if host.is_empty() || port.parse::<u16>().map(|p| p == 0).unwrap_or(true) {
        return Err(Error::InvalidEndpoint(format!("'{addr}' is not HOST:PORT")));
    }
    let security = options.security.as_ref().ok_or(Error::NoSecurity)?;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Error::InvalidEndpoint(format!("'{addr}': {e}")))?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    Ok(Transport::new(ferry_tls::client::channel(endpoint, security, Role::Scheduler)))
}

/// Whether a failed attempt may be repeated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// Reads, and writes with a request id the cluster deduplicates: any
    /// transient failure, including a deadline, is retried.
    Idempotent,
    /// Membership changes: retried only when the call surely did not run
    /// (no connection), since a deadline may hide a change that committed.
    OnlyUnsent,
}

/// Codes worth another attempt (elsewhere).
fn retryable(code: tonic::Code, retry: Retry) -> bool {
    match retry {
        Retry::Idempotent => matches!(
            code,
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Aborted
        ),
        Retry::OnlyUnsent => code == tonic::Code::Unavailable,
    }
}

/// How one typed call goes out: its name, which failures are retried, and
/// the deadline each attempt's request carries (see [`Client::call`]).
#[derive(Clone, Copy, Debug)]
struct Call<'a> {
    /// Names the call in the logs and in a budget-ran-out error.
    what: &'a str,
    retry: Retry,
    deadline: Deadline,
}

/// The deadline a request carries (the server gives up past it, and so does
/// the client).
#[derive(Clone, Copy, Debug)]
enum Deadline {
    /// `request_timeout`, cut to what is left of the call's budget.
    Attempt,
    /// The same for every attempt, whatever is left of the budget: for
    /// calls that may take longer than an attempt usually does.
    Fixed(Duration),
    /// None: the call opens a stream, which such a deadline would end.
    None,
}

impl<'a> Call<'a> {
    /// A call retried on any transient failure ([`Retry::Idempotent`]: a
    /// read, or a write with a request id), each attempt bounded by
    /// `request_timeout`. A plain name converts to this.
    const fn new(what: &'a str) -> Self {
        Self { what, retry: Retry::Idempotent, deadline: Deadline::Attempt }
    }

    /// A call that opens a server stream: retried like [`Call::new`] until
    /// the stream is open, with no deadline on the request.
    const fn stream(what: &'a str) -> Self {
        Self { what, retry: Retry::Idempotent, deadline: Deadline::None }
    }

    /// Retried only when the call surely did not reach a node.
    const fn only_unsent(self) -> Self {
        Self { retry: Retry::OnlyUnsent, ..self }
    }

    /// Gives every attempt `timeout`, however much of the budget is left.
    const fn attempt_timeout(self, timeout: Duration) -> Self {
        Self { deadline: Deadline::Fixed(timeout), ..self }
    }
}

impl<'a> From<&'a str> for Call<'a> {
    fn from(what: &'a str) -> Self {
        Self::new(what)
    }
}

/// A generated gRPC stub the client can make over an endpoint's channel.
trait Stub {
    /// The stub over `channel`, with the message size limits its service needs.
    fn over(channel: Transport) -> Self;
}

/// Implements [`Stub`] for generated clients; `large` ones accept messages
/// up to [`MAX_RESPONSE_BYTES`] (listings, job reports) both ways.
macro_rules! stubs {
    ($($client:ident),* ; large: $($large:ident),*) => {
        $(impl Stub for $client<Transport> {
            fn over(channel: Transport) -> Self {
                $client::new(channel)
            }
        })*
        $(impl Stub for $large<Transport> {
            fn over(channel: Transport) -> Self {
                $large::new(channel)
                    .max_decoding_message_size(MAX_RESPONSE_BYTES)
                    .max_encoding_message_size(MAX_RESPONSE_BYTES)
            }
        })*
    };
}

stubs!(ClusterServiceClient, LeaseServiceClient, ProbeServiceClient, RegistryServiceClient, WorkerServiceClient;
    large: ConfigServiceClient, JobServiceClient);

/// `msg` as a request that gives up after `timeout`.
fn request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(timeout);
    req
}

/// Runs cache I/O off the runtime; `None` if the blocking task panicked.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

/// A fresh idempotency id for a write.
pub fn request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Client {
    /// A client for `endpoints` (`host:port` each) with default options,
    /// its connections secured as `security` says. Connections are made
    /// lazily, on first use.
    pub fn connect<I, S>(endpoints: I, security: Security) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::with_options(endpoints, ClientOptions { security: Some(security), ..Default::default() })
    }

    /// Like [`Client::connect`], with explicit options (which must say how
    /// connections are secured).
    pub fn with_options<I, S>(endpoints: I, options: ClientOptions) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut targets = Vec::new();
        for e in endpoints {
            let addr = e.as_ref().trim().to_string();
            if addr.is_empty() {
                continue;
            }
            targets.push(Target { channel: channel(&addr, &options)?, addr });
        }
        if targets.is_empty() {
            return Err(Error::InvalidEndpoint("at least one HOST:PORT is needed".into()));
        }
        let cache = options.cache_dir.clone().map(Cache::new);
        Ok(Self { targets: Arc::new(Mutex::new(targets)), preferred: Arc::new(AtomicUsize::new(0)), options, cache })
    }

    /// The endpoints this client knows (the configured ones and leaders it
    /// learnt of).
    pub fn endpoints(&self) -> Vec<String> {
        self.targets.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|t| t.addr.clone()).collect()
    }

    /// The local cache, when `cache_dir` is set.
    pub fn cache(&self) -> Option<&Cache> {
        self.cache.as_ref()
    }

    /// The channel to try for attempt `n`, and its index.
    fn pick(&self, n: usize) -> (usize, String, Transport) {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        let i = (self.preferred.load(Ordering::Relaxed) + n) % targets.len();
        (i, targets[i].addr.clone(), targets[i].channel.clone())
    }

    /// Makes `addr` the preferred endpoint, adding it if new.
    fn prefer(&self, addr: &str) {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        let i = match targets.iter().position(|t| t.addr == addr) {
            Some(i) => i,
            None => match channel(addr, &self.options) {
                Ok(ch) => {
                    targets.push(Target { addr: addr.to_string(), channel: ch });
                    targets.len() - 1
                }
                Err(_) => return,
            },
        };
        self.preferred.store(i, Ordering::Relaxed);
    }

    /// Sends `msg` through `method` of the typed stub `S`, under the retry
    /// policy of [`Client::call_with`]: the one way every typed call goes out.
    ///
    /// Each attempt gets its own clone of `msg` (so a write's request id is
    /// the same in every attempt, and the cluster applies it once), a request
    /// carrying the deadline `call` asks for, and a fresh stub over the
    /// attempt's endpoint. The answer is unwrapped from its
    /// [`tonic::Response`]; a failure that retrying cannot fix is
    /// [`Error::Rejected`], a budget that ran out [`Error::Unavailable`].
    /// `call` is a [`Call`] or, for the usual case, just the call's name.
    ///
    /// `method` is the stub's generated method, named as a path:
    /// `self.call("lease revoke", msg, LeaseServiceClient::revoke)`. Each
    /// attempt's future owns its stub, request and copy of `method`, and
    /// borrows nothing from the call, so a call can run in a spawned task.
    async fn call<'a, S, Req, Resp, M>(&self, call: impl Into<Call<'a>>, msg: Req, method: M) -> Result<Resp, Error>
    where
        S: Stub,
        Req: Clone,
        M: AsyncFnMut(&mut S, tonic::Request<Req>) -> Result<tonic::Response<Resp>, tonic::Status> + Clone,
    {
        let Call { what, retry, deadline } = call.into();
        self.call_with(what, retry, |channel, per_attempt| {
            let req = match deadline {
                Deadline::Attempt => request(msg.clone(), per_attempt),
                Deadline::Fixed(timeout) => request(msg.clone(), timeout),
                Deadline::None => tonic::Request::new(msg.clone()),
            };
            let mut method = method.clone();
            async move { method(&mut S::over(channel), req).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Runs `call` against the endpoints until it succeeds, fails for a
    /// reason retrying cannot fix, or the total deadline passes: the retry
    /// policy under every call (see [`ClientOptions`]).
    ///
    /// Each attempt is handed the endpoint's channel and the per-attempt
    /// deadline (`request_timeout`, cut to what is left of the budget).
    /// Endpoints are tried in turn from the preferred one; a "not leader"
    /// answer naming the leader makes it the next one tried; a round in
    /// which every endpoint failed is followed by a backoff. `retry` says
    /// which failures are worth another attempt. `what` names the call in
    /// the logs.
    async fn call_with<T, F, Fut>(&self, what: &str, retry: Retry, mut call: F) -> Result<T, Error>
    where
        F: FnMut(Transport, Duration) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + self.options.total_timeout;
        let mut backoff = self.options.backoff;
        let mut attempt = 0usize;
        // The last failure of any round: the caller hears of it, not of the
        // budget running out during a pause.
        let mut last = None;
        loop {
            let n = self.targets.lock().unwrap_or_else(|e| e.into_inner()).len();
            for _ in 0..n {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let (i, addr, ch) = self.pick(attempt);
                attempt += 1;
                match call(ch, self.options.request_timeout.min(left)).await {
                    Ok(v) => {
                        self.preferred.store(i, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Err(status) if retryable(status.code(), retry) => {
                        tracing::debug!(%addr, what, error = %status.message(), "attempt failed; trying the next endpoint");
                        if let Some(leader) = ferry_proto::leader_hint(&status) {
                            self.prefer(leader);
                            attempt = 0;
                        }
                        last = Some(status);
                    }
                    Err(status) => return Err(Error::Rejected(status)),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Unavailable {
                    last: last
                        .take()
                        .unwrap_or_else(|| tonic::Status::deadline_exceeded(format!("{what}: deadline passed"))),
                });
            }
            tokio::time::sleep(backoff.min(left)).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use ferry_proto::pb;

    use super::*;

    #[tokio::test]
    async fn a_client_is_not_made_without_being_told_how_to_secure_it() {
        let err = Client::with_options(["127.0.0.1:7001"], ClientOptions::default()).err().expect("refused");
        assert!(matches!(err, Error::NoSecurity), "{err}");
        assert!(err.is_invalid_argument(), "{err}");
        assert!(Client::connect(["127.0.0.1:7001"], Security::Insecure).is_ok(), "plaintext when asked for");
    }

    #[tokio::test]
    async fn a_call_nobody_answers_tries_every_endpoint_with_one_request_id_until_the_budget_ends() {
        // Two ports nobody listens on (both held while the second is taken,
        // so they differ).
        let (a, b) = (TcpListener::bind("127.0.0.1:0").unwrap(), TcpListener::bind("127.0.0.1:0").unwrap());
        let endpoints = [a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string()];
        drop((a, b));
        let options = ClientOptions {
            request_timeout: Duration::from_millis(200),
            total_timeout: Duration::from_millis(400),
            connect_timeout: Duration::from_millis(100),
            security: Some(Security::Insecure),
            ..Default::default()
        };
        let client = Client::with_options(&endpoints, options).unwrap();
        let msg = pb::LeaseRevokeRequest { id: 7, request_id: request_id() };
        // What each attempt sent: its request id and its deadline.
        let sent = Mutex::new(Vec::new());
        let started = Instant::now();
        let revoke = async |stub: &mut LeaseServiceClient<Transport>, req: tonic::Request<pb::LeaseRevokeRequest>| {
            let deadline = req.metadata().get("grpc-timeout").cloned();
            sent.lock().unwrap().push((req.get_ref().request_id.clone(), deadline));
            stub.revoke(req).await
        };
        let err = client.call("lease revoke", msg.clone(), revoke).await.unwrap_err();
        let took = started.elapsed();

        // The last real failure (nothing listening), not "deadline passed".
        assert!(matches!(&err, Error::Unavailable { last } if last.code() == tonic::Code::Unavailable), "{err:?}");
        assert!(took >= Duration::from_millis(400), "gave up after {took:?}, before its budget");
        let sent = sent.into_inner().unwrap();
        // Attempts go round the endpoints, so two or more tried both.
        assert!(sent.len() >= endpoints.len(), "{} attempts", sent.len());
        assert!(sent.iter().all(|(id, _)| *id == msg.request_id), "every attempt keeps the request id");
        assert!(sent.iter().all(|(_, deadline)| deadline.is_some()), "every attempt carries a deadline");
    }
}
