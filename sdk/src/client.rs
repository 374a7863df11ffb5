//! The client: endpoint failover, leader hints, retries and typed calls.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::pb;
use ferry_proto::pb::cluster_service_client::ClusterServiceClient;
use ferry_proto::pb::config_service_client::ConfigServiceClient;
use ferry_proto::pb::job_service_client::JobServiceClient;
use ferry_proto::pb::lease_service_client::LeaseServiceClient;
use ferry_proto::pb::probe_service_client::ProbeServiceClient;
use ferry_proto::pb::registry_service_client::RegistryServiceClient;
use ferry_proto::pb::worker_service_client::WorkerServiceClient;
use tonic::transport::Endpoint;

use crate::transport::Transport;

use crate::cache::{Cache, Cached};
use crate::error::Error;

/// Unread answers a [`KeepAlive`] keeps (see [`Client::keep_alive`]).
pub const KEEP_ALIVE_BUFFER: usize = 16;
/// Largest response the client accepts (a listing of many keys).
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
/// **Connections** are plain HTTP/2 (`http://`), opened lazily, with TCP
/// no-delay and HTTP/2 keepalive pings every 10 s (5 s to answer) so a
/// paused node is noticed. **TLS is not supported yet**: it is planned for
/// later; until then run the client on a trusted network (or through a
/// tunnel).
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
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_millis(800),
            backoff: Duration::from_millis(50),
            cache_dir: None,
        }
    }
}

/// A key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Revision at which the key was created.
    pub create_revision: u64,
    /// Revision of its last change.
    pub mod_revision: u64,
    /// Writes since creation.
    pub version: u64,
}

/// The result of a put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    /// Cluster revision of the write (the key's modify revision).
    pub revision: u64,
    /// Revision at which the key was created.
    pub create_revision: u64,
    /// The key's version after the write.
    pub version: u64,
    /// The node that applied it.
    pub member_id: u64,
}

/// One scheduler's view of the cluster.
pub type Status = pb::StatusResponse;

impl From<pb::KeyValue> for KeyValue {
    fn from(kv: pb::KeyValue) -> Self {
        Self {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
        }
    }
}

struct Target {
    addr: String,
    channel: Transport,
}

/// A client of a Ferry cluster. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    targets: Arc<Mutex<Vec<Target>>>,
    /// Index of the endpoint that answered last; calls start there.
    preferred: Arc<AtomicUsize>,
    options: ClientOptions,
    /// Present when `options.cache_dir` is set.
    cache: Option<Cache>,
}

fn channel(addr: &str, options: &ClientOptions) -> Result<Transport, Error> {
    let (host, port) =
        addr.rsplit_once(':').ok_or_else(|| Error::InvalidEndpoint(format!("'{addr}' is not HOST:PORT")))?;
    if host.is_empty() || port.parse::<u16>().map(|p| p == 0).unwrap_or(true) {
        return Err(Error::InvalidEndpoint(format!("'{addr}' is not HOST:PORT")));
    }
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Error::InvalidEndpoint(format!("'{addr}': {e}")))?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    Ok(Transport::new(endpoint.connect_lazy()))
}

/// Longest key, in bytes (the cluster's limit, checked before sending).
pub const MAX_KEY_BYTES: usize = 4096;
/// Largest value, in bytes (1 MiB).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

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

fn check_key(key: &str) -> Result<(), Error> {
    // Same rules and words as the cluster's own check.
    let reason = if key.is_empty() {
        "key: must not be empty".to_string()
    } else if key.len() > MAX_KEY_BYTES {
        format!("key: must be at most {MAX_KEY_BYTES} bytes, got {}", key.len())
    } else {
        return Ok(());
    };
    Err(Error::Rejected(tonic::Status::invalid_argument(reason)))
}

/// Runs cache I/O off the runtime; `None` if the blocking task panicked.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

/// Stores `list` as the cached instances of `service`; a failure is logged
/// (the cache is an aid, never a reason to fail a read).
pub(crate) async fn store_instances(cache: Cache, service: String, list: pb::ListInstancesResponse) {
    blocking(move || {
        if let Err(e) = cache.store_instances(&service, &list) {
            tracing::debug!(%service, error = %e, "cannot write the registry cache");
        }
    })
    .await;
}

/// The cached instances of `service` and their revision, if any.
pub(crate) async fn load_instances(cache: Cache, service: String) -> Option<(u64, pb::ListInstancesResponse)> {
    blocking(move || cache.load_instances(&service)).await.flatten()
}

/// A fresh idempotency id for a write.
pub fn request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Client {
    /// A client for `endpoints` (`host:port` each) with default options.
    /// Connections are made lazily, on first use.
    pub fn connect<I, S>(endpoints: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::with_options(endpoints, ClientOptions::default())
    }

    /// Like [`Client::connect`], with explicit options.
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
            let mut request = tonic::Request::new(msg.clone());
            match deadline {
                Deadline::Attempt => request.set_timeout(per_attempt),
                Deadline::Fixed(timeout) => request.set_timeout(timeout),
                Deadline::None => {}
            }
            let mut method = method.clone();
            async move { method(&mut S::over(channel), request).await.map(tonic::Response::into_inner) }
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
        loop {
            let n = self.targets.lock().unwrap_or_else(|e| e.into_inner()).len();
            let mut last = None;
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
                    last: last.unwrap_or_else(|| tonic::Status::deadline_exceeded(format!("{what}: deadline passed"))),
                });
            }
            tokio::time::sleep(backoff.min(left)).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Creates or replaces `key`. Retried safely: the request id stays the same.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<Put, Error> {
        check_key(key)?;
        let msg =
            pb::PutRequest { key: key.to_string(), value, request_id: request_id(), if_mod_revision: None, lease: 0 };
        self.put_request(msg).await
    }

    /// Creates or replaces `key` bound to `lease`: it is deleted when the
    /// lease ends.
    pub async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: u64) -> Result<Put, Error> {
        check_key(key)?;
        let msg =
            pb::PutRequest { key: key.to_string(), value, request_id: request_id(), if_mod_revision: None, lease };
        self.put_request(msg).await
    }

    /// A new lease with `ttl` (1 s to 1 day); returns its id.
    pub async fn grant(&self, ttl: Duration) -> Result<u64, Error> {
        let msg = pb::LeaseGrantRequest { ttl_ms: ttl.as_millis() as u64, request_id: request_id() };
        self.call("lease grant", msg, LeaseServiceClient::grant).await.map(|r| r.id)
    }

    /// Ends a lease now; its keys are deleted.
    pub async fn revoke(&self, id: u64) -> Result<(), Error> {
        let msg = pb::LeaseRevokeRequest { id, request_id: request_id() };
        self.call("lease revoke", msg, LeaseServiceClient::revoke).await.map(|_| ())
    }

    /// A lease's TTL, time left on the leader's clock, and keys.
    pub async fn time_to_live(&self, id: u64) -> Result<pb::LeaseTimeToLiveResponse, Error> {
        self.call("lease ttl", pb::LeaseTimeToLiveRequest { id }, LeaseServiceClient::time_to_live).await
    }

    /// Registers (or replaces) a service instance bound to a new lease of
    /// `ttl`; returns the lease, which the caller keeps alive
    /// ([`Client::keep_alive`]) to stay registered.
    /// [`Client::register_kept`] does both and returns one handle.
    pub async fn register(&self, instance: pb::Instance, ttl: Duration) -> Result<u64, Error> {
        let msg = pb::RegisterRequest {
            instance: Some(instance),
            lease: 0,
            ttl_ms: ttl.as_millis() as u64,
            request_id: request_id(),
        };
        self.call("register", msg, RegistryServiceClient::register).await.map(|r| r.lease)
    }

    /// Removes an instance now; returns whether it was registered.
    pub async fn deregister(&self, service: &str, id: &str) -> Result<bool, Error> {
        let msg = pb::DeregisterRequest { service: service.into(), id: id.into(), request_id: request_id() };
        self.call("deregister", msg, RegistryServiceClient::deregister).await.map(|r| r.deregistered)
    }

    /// The instances of `service` (linearizable).
    pub async fn instances(&self, service: &str) -> Result<pb::ListInstancesResponse, Error> {
        let msg = pb::ListInstancesRequest { service: service.into() };
        self.call("list instances", msg, RegistryServiceClient::list).await
    }

    /// The instances of `service` (linearizable) through the local cache:
    /// a successful list is stored and returned with `stale: false`; when
    /// the cluster cannot be reached ([`Error::Unavailable`]) the cached list
    /// is returned with `stale: true`, if there is one. Otherwise the call's
    /// error. Without `cache_dir` it is [`Client::instances`].
    pub async fn instances_or_cached(&self, service: &str) -> Result<Cached<pb::ListInstancesResponse>, Error> {
        let list = self.instances(service).await;
        let Some(cache) = self.cache.clone() else {
            return list.map(|l| Cached {
                revision: l.header.as_ref().map_or(0, |h| h.revision),
                value: l,
                stale: false,
            });
        };
        let service = service.to_string();
        match list {
            Ok(list) => {
                let revision = list.header.as_ref().map_or(0, |h| h.revision);
                store_instances(cache, service, list.clone()).await;
                Ok(Cached { value: list, revision, stale: false })
            }
            Err(err @ Error::Unavailable { .. }) => match load_instances(cache, service).await {
                Some((revision, list)) => {
                    tracing::debug!(error = %err, revision, "cluster unreachable; serving the cached instances");
                    Ok(Cached { value: list, revision, stale: true })
                }
                None => Err(err),
            },
            Err(err) => Err(err),
        }
    }

    /// The local cache, when `cache_dir` is set.
    pub fn cache(&self) -> Option<&Cache> {
        self.cache.as_ref()
    }

    /// Adds or replaces a probe definition.
    pub async fn define_probe(&self, spec: pb::ProbeSpec) -> Result<pb::DefineProbeResponse, Error> {
        let msg = pb::DefineProbeRequest { spec: Some(spec), request_id: request_id() };
        self.call("define probe", msg, ProbeServiceClient::define_probe).await
    }

    /// Removes a probe and its results; `false` if there was none.
    pub async fn delete_probe(&self, name: &str) -> Result<bool, Error> {
        let msg = pb::DeleteProbeRequest { name: name.into(), request_id: request_id() };
        self.call("delete probe", msg, ProbeServiceClient::delete_probe).await.map(|r| r.deleted)
    }

    /// Every probe definition, or (with `worker`) those that worker runs.
    pub async fn probes(&self, worker: Option<&str>) -> Result<Vec<pb::ProbeSpec>, Error> {
        let msg = pb::ListProbesRequest { worker: worker.unwrap_or_default().into() };
        self.call("list probes", msg, ProbeServiceClient::list_probes).await.map(|r| r.probes)
    }

    /// Reports one round of a probe (what workers call). Retried safely.
    pub async fn report_probe(&self, mut report: pb::ReportRequest) -> Result<(), Error> {
        report.request_id = request_id();
        self.call("report probe", report, ProbeServiceClient::report).await.map(|_| ())
    }

    /// The latest result per worker and target (`worker`: only its).
    pub async fn probe_results(&self, probe: &str, worker: Option<&str>) -> Result<Vec<pb::ProbeResult>, Error> {
        let msg = pb::GetResultsRequest { probe: probe.into(), worker: worker.unwrap_or_default().into() };
        self.call("probe results", msg, ProbeServiceClient::get_results).await.map(|r| r.results)
    }

    /// The probe's targets ranked by total time, errors last: as `worker`
    /// measured them, or by the median over every worker.
    pub async fn probe_best(&self, probe: &str, worker: Option<&str>) -> Result<Vec<pb::RankedTarget>, Error> {
        let msg = pb::BestRequest { probe: probe.into(), worker: worker.unwrap_or_default().into() };
        self.call("best", msg, ProbeServiceClient::best).await.map(|r| r.ranking)
    }

    /// The ranking, again whenever it changes order.
    pub async fn watch_probe_best(
        &self,
        probe: &str,
        worker: Option<&str>,
    ) -> Result<tonic::Streaming<pb::BestResponse>, Error> {
        let msg = pb::BestRequest { probe: probe.into(), worker: worker.unwrap_or_default().into() };
        self.call(Call::stream("watch best"), msg, ProbeServiceClient::watch_best).await
    }

    /// Every probe's freshness.
    pub async fn probe_status(&self) -> Result<Vec<pb::ProbeState>, Error> {
        self.call("probe status", pb::ProbeStatusRequest {}, ProbeServiceClient::status).await.map(|r| r.probes)
    }

    /// The full instance list of `service`, again after every change.
    pub async fn watch_instances(&self, service: &str) -> Result<tonic::Streaming<pb::ListInstancesResponse>, Error> {
        let msg = pb::WatchInstancesRequest { service: service.into() };
        self.call(Call::stream("watch instances"), msg, RegistryServiceClient::watch).await
    }

    /// Keeps lease `id` alive from a background task until the returned
    /// handle is dropped: a keep-alive every third of the TTL, on a stream
    /// to the leader that follows leader changes. Each answer is passed on
    /// (`ttl_ms == 0`: the lease is gone, and the task stops).
    ///
    /// Reading the answers ([`KeepAlive::next`]) is optional: the renewals
    /// never wait for the reader. At most [`KEEP_ALIVE_BUFFER`] unread
    /// answers are kept; newer ones are dropped until the reader catches up,
    /// except the last (the lease is gone), which waits for room.
    pub fn keep_alive(&self, id: u64) -> KeepAlive {
        let (out, rx) = tokio::sync::mpsc::channel(KEEP_ALIVE_BUFFER);
        // Passes an answer on unless the reader is behind; false when the
        // handle is gone (its drop aborts this task, so that is brief).
        let report = |out: &tokio::sync::mpsc::Sender<_>, answer| {
            !matches!(out.try_send(answer), Err(tokio::sync::mpsc::error::TrySendError::Closed(_)))
        };
        let client = self.clone();
        let task = tokio::spawn(async move {
            let mut every = Duration::from_millis(300);
            loop {
                let opened = client
                    .call_with("lease keep-alive", Retry::Idempotent, |ch, _| async move {
                        let (tx, requests) = tokio::sync::mpsc::channel(4);
                        let _ = tx.send(pb::LeaseKeepAliveRequest { id }).await;
                        let stream = LeaseServiceClient::new(ch)
                            .keep_alive(tokio_stream::wrappers::ReceiverStream::new(requests))
                            .await?
                            .into_inner();
                        Ok((tx, stream))
                    })
                    .await;
                let (tx, mut stream) = match opened {
                    Ok(s) => s,
                    Err(e) => {
                        if !report(&out, Err(e)) {
                            return;
                        }
                        tokio::time::sleep(every).await;
                        continue;
                    }
                };
                // A leader that vanished without a reset must not hold the
                // renewals up past the TTL: wait at most a third of it.
                while let Ok(Ok(Some(resp))) =
                    tokio::time::timeout(every.max(Duration::from_millis(500)), stream.message()).await
                {
                    if resp.ttl_ms == 0 {
                        // Nothing is left to renew, so waiting for room
                        // costs nothing, and the reader learns the end.
                        let _ = out.send(Ok(resp)).await;
                        return;
                    }
                    every = Duration::from_millis((resp.ttl_ms / 3).max(100));
                    if !report(&out, Ok(resp)) {
                        return;
                    }
                    tokio::time::sleep(every).await;
                    if tx.send(pb::LeaseKeepAliveRequest { id }).await.is_err() {
                        break;
                    }
                }
                tracing::debug!(id, "keep-alive stream ended; reconnecting");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        KeepAlive { rx, task }
    }

    /// Compare-and-set: writes `key` only if its modify revision is
    /// `if_mod_revision` (0: only if it does not exist). Otherwise
    /// [`Error::Rejected`] with `FailedPrecondition`, naming what differed.
    pub async fn put_if(&self, key: &str, value: Vec<u8>, if_mod_revision: u64) -> Result<Put, Error> {
        check_key(key)?;
        let msg = pb::PutRequest {
            key: key.to_string(),
            value,
            request_id: request_id(),
            if_mod_revision: Some(if_mod_revision),
            lease: 0,
        };
        self.put_request(msg).await
    }

    async fn put_request(&self, msg: pb::PutRequest) -> Result<Put, Error> {
        if msg.value.len() > MAX_VALUE_BYTES {
            return Err(Error::Rejected(tonic::Status::invalid_argument(format!(
                "value: must be at most {MAX_VALUE_BYTES} bytes (1 MiB), got {}",
                msg.value.len()
            ))));
        }
        let resp = self.call("put", msg, ConfigServiceClient::put).await?;
        let header = resp.header.unwrap_or_default();
        Ok(Put {
            revision: header.revision,
            create_revision: resp.create_revision,
            version: resp.version,
            member_id: header.member_id,
        })
    }

    /// Reads `key` (linearizable). `None` if it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        self.get_with(key, false).await
    }

    /// Reads `key`; `serializable` reads the answering node's replica
    /// without a read-index round trip (may be stale).
    pub async fn get_with(&self, key: &str, serializable: bool) -> Result<Option<KeyValue>, Error> {
        let msg = pb::GetRequest { key: key.to_string(), serializable, ..Default::default() };
        let resp = self.call("get", msg, ConfigServiceClient::get).await?;
        Ok(resp.kv.map(KeyValue::from))
    }

    /// Reads `key` (linearizable) through the local cache: a successful read
    /// (the key's absence included) is stored and returned with
    /// `stale: false`. When the cluster cannot be reached
    /// ([`Error::Unavailable`]) and the cache holds a read of `key`, that
    /// read is returned with `stale: true` and the revision it was read at.
    /// Otherwise the call's error. Without `cache_dir` it is [`Client::get`]
    /// with a revision.
    pub async fn get_or_cached(&self, key: &str) -> Result<Cached<Option<KeyValue>>, Error> {
        check_key(key)?;
        let msg = pb::GetRequest { key: key.to_string(), ..Default::default() };
        let read = self.call("get", msg, ConfigServiceClient::get).await;
        let to_cached = |revision: u64, read: pb::GetResponse, stale: bool| Cached {
            value: read.kv.map(KeyValue::from),
            revision,
            stale,
        };
        let Some(cache) = self.cache.clone() else {
            return read.map(|r| to_cached(r.header.as_ref().map_or(0, |h| h.revision), r, false));
        };
        let key = key.to_string();
        match read {
            Ok(read) => {
                let revision = read.header.as_ref().map_or(0, |h| h.revision);
                let stored = read.clone();
                blocking(move || {
                    if let Err(e) = cache.store_config(&key, &stored) {
                        tracing::debug!(%key, error = %e, "cannot write the config cache");
                    }
                })
                .await;
                Ok(to_cached(revision, read, false))
            }
            Err(err @ Error::Unavailable { .. }) => match blocking(move || cache.load_config(&key)).await.flatten() {
                Some((revision, read)) => {
                    tracing::debug!(error = %err, revision, "cluster unreachable; serving the cached read");
                    Ok(to_cached(revision, read, true))
                }
                None => Err(err),
            },
            Err(err) => Err(err),
        }
    }

    /// `key` as it was at `revision`; `OutOfRange` if that is compacted.
    pub async fn get_at(&self, key: &str, revision: u64) -> Result<Option<KeyValue>, Error> {
        let msg = pb::GetRequest { key: key.to_string(), revision, ..Default::default() };
        let resp = self.call("get", msg, ConfigServiceClient::get).await?;
        Ok(resp.kv.map(KeyValue::from))
    }

    /// `key` as a reader with `labels` sees it: a matching gray variant's
    /// value, else the main value; with the variant's selector (empty: the
    /// main value).
    pub async fn get_with_labels(
        &self,
        key: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<(KeyValue, String)>, Error> {
        let msg = pb::GetRequest {
            key: key.to_string(),
            labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            ..Default::default()
        };
        let resp = self.call("get", msg, ConfigServiceClient::get).await?;
        Ok(resp.kv.map(|kv| (KeyValue::from(kv), resp.variant)))
    }

    /// Gray variants of `key`: list, set (`selector` required), promote
    /// (empty selector: the only variant) or drop (empty: all). Returns the
    /// variants after the action.
    pub async fn gray(
        &self,
        action: pb::gray_request::Action,
        key: &str,
        selector: &str,
        value: Vec<u8>,
    ) -> Result<Vec<pb::Variant>, Error> {
        let msg = pb::GrayRequest {
            action: action as i32,
            key: key.to_string(),
            selector: selector.to_string(),
            value,
            request_id: request_id(),
        };
        self.call("gray", msg, ConfigServiceClient::gray).await.map(|r| r.variants)
    }

    /// The changes to `key` still in the history, oldest first (the newest
    /// `limit`; 0 = all).
    pub async fn history(&self, key: &str, limit: u32) -> Result<pb::HistoryResponse, Error> {
        let msg = pb::HistoryRequest { key: key.to_string(), limit, serializable: false };
        self.call("history", msg, ConfigServiceClient::history).await
    }

    /// Compare, then write, atomically. A request id is set if missing, so
    /// retries apply once.
    pub async fn txn(&self, mut msg: pb::TxnRequest) -> Result<pb::TxnResponse, Error> {
        if msg.request_id.is_empty() {
            msg.request_id = request_id();
        }
        self.call("txn", msg, ConfigServiceClient::txn).await
    }

    /// Watches keys under `prefix` from `start_revision` (0: from now). The
    /// returned [`Watch`] reconnects on its own (to any scheduler) and
    /// resumes after the last revision it delivered, so it sees every
    /// change once and in order across leader changes.
    pub fn watch(&self, prefix: &str, start_revision: u64) -> Watch {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let client = self.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let mut next = start_revision;
            loop {
                let msg = pb::WatchRequest { prefix: prefix.clone(), start_revision: next, progress_interval_ms: 0 };
                let mut stream = match client.call(Call::stream("watch"), msg, ConfigServiceClient::watch).await {
                    Ok(s) => s,
                    Err(e) => {
                        if tx.send(Err(e)).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                while let Ok(Some(resp)) = stream.message().await {
                    let revision = resp.header.as_ref().map(|h| h.revision).unwrap_or(0);
                    // Past a snapshot only after its last part.
                    if revision + 1 > next && !(resp.snapshot && resp.more) {
                        next = revision + 1;
                    }
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
                tracing::debug!(next, "watch stream ended; resuming");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Watch { rx }
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, Error> {
        check_key(key)?;
        let msg = pb::DeleteRequest { key: key.to_string(), request_id: request_id(), if_mod_revision: None };
        self.delete_request(msg).await
    }

    /// Compare-and-delete: only if `key`'s modify revision is `if_mod_revision`.
    pub async fn delete_if(&self, key: &str, if_mod_revision: u64) -> Result<bool, Error> {
        check_key(key)?;
        let msg = pb::DeleteRequest {
            key: key.to_string(),
            request_id: request_id(),
            if_mod_revision: Some(if_mod_revision),
        };
        self.delete_request(msg).await
    }

    async fn delete_request(&self, msg: pb::DeleteRequest) -> Result<bool, Error> {
        let resp = self.call("delete", msg, ConfigServiceClient::delete).await?;
        Ok(resp.deleted)
    }

    /// Every key starting with `prefix`, in key order (linearizable).
    pub async fn list(&self, prefix: &str, serializable: bool) -> Result<Vec<KeyValue>, Error> {
        let msg = pb::ListRequest { prefix: prefix.to_string(), serializable, limit: 0 };
        let resp = self.call("list", msg, ConfigServiceClient::list).await?;
        Ok(resp.kvs.into_iter().map(KeyValue::from).collect())
    }

    /// The status of whichever scheduler answers first.
    pub async fn status(&self) -> Result<Status, Error> {
        self.call("status", pb::StatusRequest {}, ClusterServiceClient::status).await
    }

    /// The status of the scheduler at `addr` only (no failover).
    pub async fn status_of(&self, addr: &str) -> Result<Status, Error> {
        let ch = channel(addr, &self.options)?;
        let mut client = ClusterServiceClient::new(ch);
        client
            .status(request(pb::StatusRequest {}, self.options.request_timeout.min(Duration::from_secs(2))))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|last| Error::Unavailable { last })
    }

    /// A digest of the state at `addr` (no failover), for comparing replicas.
    pub async fn state_digest_of(&self, addr: &str) -> Result<pb::StateDigestResponse, Error> {
        let mut client = ClusterServiceClient::new(channel(addr, &self.options)?);
        client
            .state_digest(request(pb::StateDigestRequest {}, self.options.request_timeout))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|last| Error::Unavailable { last })
    }

    /// Adds a scheduler (learner, then voter unless `learner_only`).
    pub async fn add_node(&self, id: u64, addr: &str, learner_only: bool) -> Result<pb::MembershipResponse, Error> {
        let msg = pb::AddNodeRequest { id, addr: addr.to_string(), learner_only };
        let timeout = self.options.total_timeout.max(Duration::from_secs(60));
        let call = Call::new("add-node").only_unsent().attempt_timeout(timeout);
        self.call(call, msg, ClusterServiceClient::add_node).await
    }

    /// Removes a scheduler from the cluster.
    pub async fn remove_node(&self, id: u64) -> Result<pb::MembershipResponse, Error> {
        let msg = pb::RemoveNodeRequest { id };
        self.call(Call::new("remove-node").only_unsent(), msg, ClusterServiceClient::remove_node).await
    }

    /// Submits a job. Without `wait` it returns once the job is logged; with
    /// `wait` it returns the final report (the call may take as long as the
    /// job: up to its timeout). Retries reuse the request id, so a job is
    /// created once.
    pub async fn submit_job(&self, spec: pb::JobSpec, wait: bool) -> Result<pb::SubmitJobResponse, Error> {
        let job_timeout = Duration::from_millis(if spec.timeout_ms == 0 { 600_000 } else { spec.timeout_ms });
        let msg = pb::SubmitJobRequest { spec: Some(spec), wait, request_id: request_id() };
        let per_call = if wait {
            job_timeout + Duration::from_secs(60)
        } else {
            self.options.request_timeout.max(Duration::from_secs(320))
        };
        let this = Self {
            options: ClientOptions { total_timeout: per_call + self.options.total_timeout, ..self.options.clone() },
            ..self.clone()
        };
        this.call(Call::new("submit-job").attempt_timeout(per_call), msg, JobServiceClient::submit_job).await
    }

    /// The report of one job.
    pub async fn get_job(&self, job_id: &str) -> Result<pb::JobReport, Error> {
        let msg = pb::GetJobRequest { job_id: job_id.to_string() };
        self.call("get-job", msg, JobServiceClient::get_job).await
    }

    /// Every job's report, oldest first.
    pub async fn list_jobs(&self) -> Result<Vec<pb::JobReport>, Error> {
        self.call("list-jobs", pb::ListJobsRequest {}, JobServiceClient::list_jobs).await.map(|r| r.jobs)
    }

    /// A stream of progress events; the last has `done` set.
    pub async fn watch_job(&self, job_id: &str) -> Result<tonic::Streaming<pb::JobEvent>, Error> {
        let msg = pb::WatchJobRequest { job_id: job_id.to_string() };
        self.call(Call::stream("watch-job"), msg, JobServiceClient::watch_job).await
    }

    /// Cancels a job; installed files stay as they were.
    pub async fn cancel_job(&self, job_id: &str) -> Result<pb::JobReport, Error> {
        let msg = pb::CancelJobRequest { job_id: job_id.to_string() };
        self.call("cancel-job", msg, JobServiceClient::cancel_job).await
    }

    /// Every registered worker with its state (as the leader sees it).
    pub async fn list_workers(&self) -> Result<Vec<pb::WorkerStatus>, Error> {
        self.call("list-workers", pb::ListWorkersRequest {}, WorkerServiceClient::list_workers).await.map(|r| r.workers)
    }
}

/// A watch on keys under a prefix (see [`Client::watch`]). Dropping it stops
/// the watch.
pub struct Watch {
    rx: tokio::sync::mpsc::Receiver<Result<pb::WatchResponse, Error>>,
}

impl Watch {
    /// The next message: changes (in revision order), a snapshot of the
    /// current values (when the start revision was compacted), or progress.
    /// An `Err` reports a failed reconnect; the watch keeps trying, so
    /// `None` does not come while the `Watch` lives.
    pub async fn next(&mut self) -> Option<Result<pb::WatchResponse, Error>> {
        self.rx.recv().await
    }
}

/// Keeps a lease alive while it lives (see [`Client::keep_alive`]).
///
/// Dropping it stops the renewals; it does not revoke the lease, which then
/// ends one TTL after the last renewal, taking its keys and registry
/// instances with it (a new leader first gives every lease its full TTL
/// again). To remove them at once, call [`Client::revoke`] (or
/// [`Client::deregister`] for an instance) before dropping it.
pub struct KeepAlive {
    rx: tokio::sync::mpsc::Receiver<Result<pb::LeaseKeepAliveResponse, Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl KeepAlive {
    /// The next answer (or a failed reconnect; the task keeps trying).
    /// Answers that arrived while [`KEEP_ALIVE_BUFFER`] were waiting unread
    /// were dropped; `None` once the task ended (after the lease was gone).
    pub async fn next(&mut self) -> Option<Result<pb::LeaseKeepAliveResponse, Error>> {
        self.rx.recv().await
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}
