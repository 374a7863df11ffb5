//! Ferry's worker daemon: one per machine.
//!
//! [`Worker::start`] opens the chunk store in the data directory, serves
//! `ChunkService` to peers (with gRPC health and reflection v1 + v1alpha on
//! the same listener, so grpcurl can inspect it), and keeps a control session with the scheduler
//! leader, executing its index, prepare, pull, pack and cancel commands, and
//! keeps the config files its rules name in step with the cluster's config.
//! Everything it reads or writes stays under its allowed roots; it runs only
//! hooks named in its own config.
//!
//! Layout:
//! - [`config`] — `WorkerConfig` and its validation.
//! - [`roots`] — path checks against the allowed roots.
//! - [`index`] — FastCDC chunking and BLAKE3 hashing.
//! - [`file_tree`] — the whole-file BLAKE3 of a file that arrives out of order.
//! - [`store`] — where each known chunk's bytes are.
//! - [`chunk_server`] — serving chunks to peers.
//! - [`command`] — the leader's commands and the worker's reports.
//! - [`executor`] — index, prepare, pull, pack, cancel.
//! - [`hooks`] — running named hooks.
//! - [`limiter`] — upload and download bandwidth caps.
//! - [`net`] — pull connections and socket priorities of chunk traffic.
//! - [`session`] — the control session with the leader; converts commands
//!   and reports from and to protobuf.
//! - [`materializer`] — config keys into local files, then a hook.
//! - [`probes`] — the probe runner: timed downloads, rankings, output files.
//! - [`render`] — the file formats (`raw`, `json`, `properties`).
//! - [`atomic_file`] — replace a file atomically, only when it changes.
//! - [`metrics`] — the admin port: metrics, health, readiness.
//! - [`drain`] — finishing the work in flight before a stop.
//!
//! Test faults are fail points (the `fail` crate), compiled only with the
//! `failpoints` feature, which the tests turn on and release builds do not;
//! a worker built with it arms the points named in `FAILPOINTS` at start
//! (see [`chunk_server`] for the points).

pub mod atomic_file;
pub mod chunk_server;
pub mod command;
pub mod config;
pub mod drain;
pub mod executor;
pub mod file_tree;
pub mod hooks;
pub mod index;
pub mod limiter;
pub mod materializer;
pub mod metrics;
pub mod net;
pub mod probes;
pub mod render;
pub mod roots;
pub mod sample;
pub mod session;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::pb::{self, chunk_service_server::ChunkServiceServer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tonic_reflection::server::{v1, v1alpha};

pub use config::WorkerConfig;

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The data directory or a root could not be used.
    #[error("{0}")]
    Storage(String),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    /// The reflection service could not be built from the descriptor sets.
    #[error("building the reflection service: {0}")]
    Reflection(String),
}

/// A running worker.
pub struct Worker {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    refused: watch::Receiver<Option<String>>,
    drain: drain::Drain,
    tasks: Vec<JoinHandle<()>>,
}

impl Worker {
    /// Binds `config.listen` and starts.
    pub async fn start(config: WorkerConfig) -> Result<Self, Error> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind { addr: config.listen.to_string(), source })?;
        Self::start_with(config, listener).await
    }

    /// Starts on a listener bound by the caller (`config.listen` is taken from it).
    pub async fn start_with(mut config: WorkerConfig, listener: TcpListener) -> Result<Self, Error> {
        arm_failpoints();
        let addr = listener.local_addr().map_err(|source| Error::Bind { addr: config.listen.to_string(), source })?;
        config.listen = addr;
        config.validate()?;
        let security = config.security()?;
        if security.is_insecure() {
            tracing::warn!("plaintext gRPC (insecure): anyone who reaches {addr} can fetch this worker's chunks");
        }
        let roots = roots::Roots::new(&config.roots).map_err(|e| Error::Storage(format!("allowed roots: {e}")))?;
        materializer::check_paths(&config.config_files, &roots)?;
        let config_client = if config.config_files.is_empty() {
            None
        } else {
            Some(materializer::client(&config.schedulers, &security)?)
        };
        std::fs::create_dir_all(&config.data).map_err(|e| Error::Storage(format!("{}: {e}", config.data.display())))?;
        let store = store::ChunkStore::open_or_rebuild(&config.data).map_err(|e| Error::Storage(e.to_string()))?;
        let retained = store::Retained::open(&config.data, config.store_limit, &store)
            .map_err(|e| Error::Storage(format!("{}: {e}", config.data.display())))?;
        let metrics = Arc::new(metrics::WorkerMetrics::default());
        metrics.retained_bytes.set(retained.bytes() as i64);
        metrics.watch_certificate(&security);
        let admin = match config.admin_listen {
            Some(a) => Some(TcpListener::bind(a).await.map_err(|source| Error::Bind { addr: a.to_string(), source })?),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());

        let exec = Arc::new(executor::Executor::new(
            &config,
            roots.clone(),
            store.clone(),
            metrics.clone(),
            retained,
            security.clone(),
        ));
        let chunks = ChunkServerImpl::new(chunk_server::ChunkServer {
            store,
            uploads: Arc::new(Semaphore::new(config.max_uploads)),
            frame: chunk_server::frame_size(config.upload_limit, config.max_uploads),
            bandwidth: limiter::Bandwidth::new(config.upload_limit),
            metrics: metrics.clone(),
        });
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<ChunkServerImpl>().await;
        let (reflection_v1, reflection_v1alpha) = reflection()?;
        let socket_priority = config.socket_priority;
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut stop = rx.clone();
        let tls = security.clone();
        // Only workers of this cluster fetch chunks.
        let chunks = tonic::service::interceptor::InterceptedService::new(
            chunks,
            ferry_tls::server::Admit::new(ferry_tls::Role::Worker, &security),
        );
        tasks.push(tokio::spawn(async move {
            // Set here: the builder's `tcp_nodelay` covers only listeners it binds.
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            // Uploads go after the host's other traffic (see `net`).
            let incoming = tokio_stream::StreamExt::map(incoming, move |conn| {
                if let (Ok(stream), true) = (&conn, socket_priority) {
                    if let Err(e) = net::set_priority(stream, net::BULK) {
                        tracing::debug!(error = %e, "could not set an upload connection's priority");
                    }
                }
                conn
            });
            let incoming = ferry_tls::incoming(incoming, tls);
            let result = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .http2_keepalive_interval(Some(Duration::from_secs(10)))
                .initial_stream_window_size(Some(4 * 1024 * 1024))
                .initial_connection_window_size(Some(16 * 1024 * 1024))
                .layer(fault_layer())
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(chunks)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "chunk server failed");
            }
        }));
        if let Some(listener) = admin {
            let mut stop = rx.clone();
            let app = metrics::router(metrics.clone());
            tasks.push(tokio::spawn(async move {
                let stop = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                    tracing::error!(error = %e, "admin HTTP server failed");
                }
            }));
        }
        let hello = pb::WorkerInfo {
            name: config.name.clone(),
            addr: config.advertised(),
            labels: config.labels.clone().into_iter().collect(),
            roots: roots.list().iter().map(|r| r.display().to_string()).collect(),
            hooks: config.hooks.keys().cloned().collect(),
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: ferry_proto::PROTOCOL,
        };
        if let Some(client) = config_client {
            let m = Arc::new(materializer::Materializer::new(&config, client, roots.clone(), metrics.clone()));
            tasks.extend(m.spawn(&config.config_files, rx.clone()));
        }
        let probes = probes::ProbeRunner::new(
            &config.name,
            materializer::client(&config.schedulers, &security)?,
            roots.clone(),
            config.hooks.clone(),
            config.fetch_hosts(),
            metrics.clone(),
        );
        tasks.push(Arc::new(probes).spawn(rx.clone()));
        let mut stop = rx.clone();
        tasks.push(tokio::spawn(security.clone().watch(async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
        let (refused_tx, refused) = watch::channel(None);
        let drain = exec.drain.clone();
        let sessions = session::run(exec, hello, config.schedulers.clone(), config.heartbeat, rx, refused_tx);
        tasks.push(tokio::spawn(sessions));
        tracing::info!(name = %config.name, %addr, admin = ?admin_addr, "worker started");
        Ok(Self { addr, admin_addr, shutdown, refused, drain, tasks })
    }

    /// The chunk service address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin HTTP address, if `admin_listen` was set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Waits until the cluster refuses this worker for good (another
    /// live worker holds its name) and returns why; pending forever
    /// otherwise. The worker has stopped asking for a session then: stop it.
    pub async fn refused(&self) -> String {
        let mut refused = self.refused.clone();
        let why = match refused.wait_for(Option::is_some).await {
            Ok(why) => why.as_deref().unwrap_or_default().to_string(),
            Err(_) => return std::future::pending().await,
        };
        why
    }

    /// Starts draining ([`drain`]): no new pulls or uploads; `why` is logged.
    pub fn drain(&self, why: &str) {
        self.drain.start(why);
    }

    /// Resolves once a drain (started here or by the leader's drain
    /// command) has finished: stop the worker then.
    pub async fn drained(&self) {
        self.drain.finished().await
    }

    /// Stops the session and the chunk server.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

type ChunkServerImpl = ChunkServiceServer<chunk_server::ChunkServer>;

/// Arms the fail points named in `FAILPOINTS` (`name=action;...`), once
/// per process. Only in builds with the `failpoints` feature (tests).
fn arm_failpoints() {
    #[cfg(feature = "failpoints")]
    {
        static ARMED: std::sync::Once = std::sync::Once::new();
        // The scenario lives as long as the process: kept, not torn down.
        ARMED.call_once(|| std::mem::forget(fail::FailScenario::setup()));
    }
}

/// Dies at crash point `point` (see `FAILPOINTS` above): no unwinding, no
/// destructor, nothing flushed, with the same status as the schedulers'
/// crash points (`ferry_storage::crash`). The worker's points:
/// `install-before-rename` (a staged file checked, not yet renamed into
/// place) and `hook-running` (a job's hook started, not yet waited for).
#[cfg(feature = "failpoints")]
pub(crate) fn crash(point: &str) -> ! {
    eprintln!("crash point {point}: exiting with status 70");
    std::process::exit(70)
}

/// The reflection services (v1, and v1alpha for grpcurl 1.8) over Ferry's
/// and the health service's descriptors. They advertise only what this
/// listener serves: the descriptor set also holds the schedulers' services.
fn reflection() -> Result<
    (
        v1::ServerReflectionServer<impl v1::ServerReflection>,
        v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
    ),
    Error,
> {
    use tonic::server::NamedService;
    let builder = |reflection_name: &str| {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ferry_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(ChunkServerImpl::NAME)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name(reflection_name)
    };
    let v1 = builder("grpc.reflection.v1.ServerReflection").build_v1().map_err(|e| Error::Reflection(e.to_string()))?;
    let v1alpha = builder("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()
        .map_err(|e| Error::Reflection(e.to_string()))?;
    Ok((v1, v1alpha))
}

/// The gRPC fault layer a test drives at run time (`ferry_lab::faults`), in
/// builds with the `failpoints` feature; nothing in others.
#[cfg(feature = "failpoints")]
fn fault_layer() -> ferry_lab::faults::FaultLayer {
    ferry_lab::faults::FaultLayer
}

#[cfg(not(feature = "failpoints"))]
fn fault_layer() -> tower::layer::util::Identity {
    tower::layer::util::Identity::new()
}
