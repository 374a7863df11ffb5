//! Starting and stopping a scheduler: open storage, start openraft, serve
//! gRPC (Raft, config, cluster, health, reflection v1 + v1alpha) and admin
//! HTTP, bootstrap a fresh cluster once, and shut down gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::pb::{
    cluster_service_server::ClusterServiceServer, config_service_server::ConfigServiceServer,
    job_service_server::JobServiceServer, raft_service_server::RaftServiceServer,
    worker_service_server::WorkerServiceServer,
};
use ferry_storage::{OpenOptions, TypeConfig};
use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, Raft, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use crate::config::SchedulerConfig;
use crate::error::Error;
use crate::grpc::cluster::ClusterServiceImpl;
use crate::grpc::config::ConfigServiceImpl;
use crate::grpc::jobs::JobServiceImpl;
use crate::grpc::leases::LeaseServiceImpl;
use crate::grpc::probes::ProbeServiceImpl;
use crate::grpc::raft::RaftServiceImpl;
use crate::grpc::registry::RegistryServiceImpl;
use crate::grpc::workers::WorkerServiceImpl;
use crate::jobs::sessions::Sessions;
use crate::metrics::Metrics;
use crate::raft::identity::{self, ClusterId};
use crate::raft::network::NetworkFactory;
use crate::raft::node::Node;
use crate::raft::peers::{Peers, MAX_MESSAGE_BYTES};
use crate::raft::proposer::Proposer;
use ferry_proto::pb::lease_service_server::LeaseServiceServer;
use ferry_proto::pb::probe_service_server::ProbeServiceServer;
use ferry_proto::pb::registry_service_server::RegistryServiceServer;

/// A running scheduler node.
pub struct Scheduler {
    node: Arc<Node>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn raft_config(c: &SchedulerConfig) -> Result<openraft::Config, Error> {
    let ms = |d: Duration| d.as_millis().max(1) as u64;
    openraft::Config {
        cluster_name: "ferry".into(),
        heartbeat_interval: ms(c.heartbeat_interval),
        election_timeout_min: ms(c.election_timeout_min),
        election_timeout_max: ms(c.election_timeout_max),
        install_snapshot_timeout: ms(c.snapshot_timeout),
        max_payload_entries: c.max_batch_entries,
        // Built by `snapshots::run`, staggered across the nodes.
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: c.logs_to_keep,
        purge_batch_size: 256,
        ..Default::default()
    }
    .validate()
    .map_err(|e| Error::Raft { op: "configure", reason: e.to_string() })
}

impl Scheduler {
    /// Binds the configured listeners and starts.
    pub async fn start(config: SchedulerConfig) -> Result<Self, Error> {
        let grpc = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind { addr: config.listen.to_string(), source })?;
        let admin = match config.admin_listen {
            Some(a) => Some(TcpListener::bind(a).await.map_err(|source| Error::Bind { addr: a.to_string(), source })?),
            None => None,
        };
        Self::start_with(config, grpc, admin).await
    }

    /// Starts on listeners bound by the caller (ephemeral ports in tests and
    /// `ferry dev`). `config.listen` is taken from `grpc`.
    pub async fn start_with(
        mut config: SchedulerConfig,
        grpc: TcpListener,
        admin: Option<TcpListener>,
    ) -> Result<Self, Error> {
        let addr = grpc.local_addr().map_err(|source| Error::Bind { addr: config.listen.to_string(), source })?;
        config.listen = addr;
        ferry_storage::crash::arm();
        config.validate()?;
        let security = config.security()?;
        if security.is_insecure() {
            tracing::warn!("plaintext gRPC (insecure): anyone who reaches {addr} can read and change everything");
        }
        let members = config.members()?;
        let raft_config = Arc::new(raft_config(&config)?);

        let metrics = Arc::new(Metrics::default());
        let (log, sm) = ferry_storage::open(
            &config.data,
            &OpenOptions {
                sync_appends_inline: !config.shares_runtime,
                node_id: Some(config.id),
                ..OpenOptions::default()
            },
        )?;
        let cluster = ClusterId::load(log.dir().clone())?;
        let observed = metrics.clone();
        let sm = sm.with_observer(Arc::new(move |took, n| observed.observe_apply(took, n)));
        let reader = sm.reader();
        let start_commit = log.committed_index().load(std::sync::atomic::Ordering::Relaxed);
        let peers = Peers::new(security);
        let network = NetworkFactory {
            peers: peers.clone(),
            snapshot_timeout: config.snapshot_timeout,
            log_sync: log.log_sync(),
            cluster: cluster.clone(),
        };
        let raft = Raft::<TypeConfig>::new(config.id, raft_config, network, log.clone(), sm)
            .await
            .map_err(|e| Error::Raft { op: "start", reason: e.to_string() })?;

        let node = Arc::new(Node {
            id: config.id,
            addr: config.advertised(),
            raft: raft.clone(),
            reader,
            log,
            peers,
            config: config.clone(),
            start_commit,
            metrics,
            // The deadline of a write (`Node::op_timeout`).
            proposer: Proposer::start(raft.clone(), config.rpc_timeout * 5),
            removed: Default::default(),
            cluster,
            versions: Default::default(),
            held: tokio::sync::watch::channel(false).0,
        });

        let (shutdown, shutdown_rx) = watch::channel(false);
        let (planner_tx, planner_rx) = tokio::sync::mpsc::channel(16 * 1024);
        let (progress_tx, progress_rx) = tokio::sync::mpsc::channel(64 * 1024);
        let sessions = Arc::new(Sessions::new(planner_tx, progress_tx));
        tokio::spawn(crate::jobs::batcher::run_event_batcher(node.clone(), progress_rx));
        let mut tasks = Vec::new();
        let clock = Arc::new(crate::leases::LeaseClock::default());
        tasks.push(tokio::spawn(serve_grpc(node.clone(), sessions.clone(), clock.clone(), grpc, shutdown_rx.clone())));
        tasks.push(tokio::spawn(crate::leases::run_expiry(node.clone(), clock, shutdown_rx.clone())));
        tasks.push(tokio::spawn(crate::probes::run_alerts(node.clone(), shutdown_rx.clone())));
        tasks.push(tokio::spawn(crate::raft::removal::run(node.clone(), shutdown_rx.clone())));
        tasks.push(tokio::spawn(crate::raft::census::run(node.clone(), shutdown_rx.clone())));
        let mut stop = shutdown_rx.clone();
        tasks.push(tokio::spawn(node.peers.security().clone().watch(async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
        tasks.push(tokio::spawn(crate::jobs::history::run(node.clone(), shutdown_rx.clone())));
        tasks.push(tokio::spawn(crate::jobs::driver::run(node.clone(), sessions, planner_rx, shutdown_rx.clone())));
        tasks.push(tokio::spawn(crate::raft::snapshots::run(
            raft.clone(),
            config.snapshot_every,
            config.id,
            shutdown_rx.clone(),
        )));
        let admin_addr = match admin {
            Some(listener) => {
                let a = listener.local_addr().ok();
                let app = crate::admin::router(node.clone());
                let mut rx = shutdown_rx.clone();
                tasks.push(tokio::spawn(async move {
                    let stop = async move {
                        let _ = rx.wait_for(|s| *s).await;
                    };
                    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                        tracing::error!(error = %e, "admin HTTP server failed");
                    }
                }));
                a
            }
            None => None,
        };

        let initialized =
            raft.is_initialized().await.map_err(|e| Error::Raft { op: "start", reason: e.to_string() })?;
        let made = (!members.is_empty()).then(|| identity::derive(&members, &config.initial_cluster_token));
        if let (Some(made), Some(known)) = (&made, node.cluster.get()) {
            if made != known {
                return Err(Error::WrongCluster(format!(
                    "data directory {} belongs to cluster {known}, but --initial-cluster (and its token) make \
                     cluster {made}: this is another cluster's data, or the flag was edited since the cluster was \
                     bootstrapped (it is read only on an empty directory: drop it, or restore it as it was)",
                    config.data.display()
                )));
            }
        }
        if !initialized && !members.is_empty() && peers_have_leader(&node, &members).await {
            // A node whose data directory is empty but whose cluster already
            // runs must not write its own first log: it waits for the leader.
            tracing::info!(
                "the cluster already runs; joining it without initializing \
                 (a node that lost its data must be removed and added back under a new id)"
            );
        } else if !initialized && !members.is_empty() {
            let nodes: std::collections::BTreeMap<u64, BasicNode> =
                members.iter().map(|(id, a)| (*id, BasicNode::new(a))).collect();
            // The id first: the first message to a peer carries it.
            if let Some(made) = &made {
                node.cluster.learn(made)?;
            }
            match raft.initialize(nodes).await {
                Ok(()) => tracing::info!(members = ?members, cluster = ?made, "initialized a new cluster"),
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                    tracing::info!("cluster already initialized by a peer")
                }
                Err(e) => return Err(Error::Raft { op: "initialize", reason: e.to_string() }),
            }
        } else if initialized {
            tracing::info!("restarting on existing data; --initial-cluster is ignored");
        }
        tracing::info!(id = config.id, %addr, admin = ?admin_addr, data = %config.data.display(), "scheduler started");
        Ok(Self { node, addr, admin_addr, shutdown, tasks })
    }

    /// The gRPC address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin HTTP address, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The node's shared state (for in-process tools and tests).
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Resolves when Raft has stopped on an error: a storage error (a full
    /// disk, a failed sync) is fatal to openraft, and a node left serving
    /// "stopping" to every call would never come back. The daemon exits
    /// then, so its supervisor restarts it on the journals once the cause
    /// is gone. Returns why it stopped. Raft stopped on purpose (a node
    /// removed from the cluster, which goes on turning clients away) never
    /// resolves it.
    pub async fn failed(&self) -> String {
        let mut metrics = self.node.raft.metrics();
        let mut open = true;
        loop {
            let stopped = metrics.borrow().running_state.clone().err();
            match stopped {
                Some(openraft::error::Fatal::Stopped) => std::future::pending::<()>().await,
                Some(fatal) => return fatal.to_string(),
                None if !open => std::future::pending::<()>().await,
                None => {}
            }
            // Closed: the core is gone, and its last word is in the value.
            open = metrics.changed().await.is_ok();
        }
    }

    /// A leader about to stop hands leadership to another voter first
    /// ([`crate::raft::transfer`]), so that calls wait the lease out
    /// instead of an election timeout after it is gone; when the cluster
    /// cannot take a transfer yet (a member older than 0.2.0), or it fails,
    /// the node stops as before.
    pub async fn step_down(&self) {
        use crate::raft::versions::Feature;
        if !self.node.is_leader() {
            return;
        }
        if !self.node.versions.allows(Feature::TransferLeader) {
            crate::raft::census::refresh(&self.node).await;
        }
        if !self.node.versions.allows(Feature::TransferLeader) {
            tracing::info!(reason = %self.node.versions.refusal(Feature::TransferLeader), "stopping as leader");
            return;
        }
        match crate::raft::transfer::transfer(&self.node, None).await {
            Ok(m) => tracing::info!(to = m.leader_id, took_ms = m.took.as_millis() as u64, "handed leadership over"),
            Err(e) => tracing::warn!(error = %e, "could not hand leadership over; stopping as leader"),
        }
    }

    /// Stops serving, then stops Raft. In-flight calls finish first.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        // In-flight calls finish in this time; long streams (watches,
        // keep-alives, worker sessions) are cut then, and their clients
        // resume on another member.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
        if let Err(e) = self.node.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        if let Err(e) = self.node.log.checkpoint().await {
            tracing::warn!(error = %e, "final checkpoint of the log");
        }
        tracing::info!(id = self.node.id, "scheduler stopped");
    }
}

/// How long a stopping scheduler lets in-flight calls finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// True if any other member of `members` answers and knows a leader.
async fn peers_have_leader(node: &Node, members: &std::collections::BTreeMap<u64, String>) -> bool {
    use ferry_proto::pb::cluster_service_client::ClusterServiceClient;
    for (id, addr) in members {
        if *id == node.id {
            continue;
        }
        let Ok(channel) = node.peers.channel(addr) else { continue };
        let mut req = tonic::Request::new(ferry_proto::pb::StatusRequest {});
        req.set_timeout(Duration::from_millis(500));
        if let Ok(resp) = ClusterServiceClient::new(channel).status(req).await {
            if resp.into_inner().leader_id != 0 {
                return true;
            }
        }
    }
    false
}

async fn serve_grpc(
    node: Arc<Node>,
    sessions: Arc<Sessions>,
    clock: Arc<crate::leases::LeaseClock>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ConfigServiceServer<ConfigServiceImpl>>().await;
    health.set_serving::<ClusterServiceServer<ClusterServiceImpl>>().await;
    health.set_serving::<RaftServiceServer<RaftServiceImpl>>().await;
    health.set_serving::<JobServiceServer<JobServiceImpl>>().await;
    health.set_serving::<WorkerServiceServer<WorkerServiceImpl>>().await;
    health.set_serving::<LeaseServiceServer<LeaseServiceImpl>>().await;
    health.set_serving::<RegistryServiceServer<RegistryServiceImpl>>().await;
    health.set_serving::<ProbeServiceServer<ProbeServiceImpl>>().await;

    // Reflection advertises only what this listener serves: the descriptor
    // set also holds the workers' ChunkService.
    let reflection = |reflection_name: &str| {
        use ferry_proto::pb::*;
        [
            raft_service_server::SERVICE_NAME,
            config_service_server::SERVICE_NAME,
            cluster_service_server::SERVICE_NAME,
            job_service_server::SERVICE_NAME,
            worker_service_server::SERVICE_NAME,
            lease_service_server::SERVICE_NAME,
            registry_service_server::SERVICE_NAME,
            probe_service_server::SERVICE_NAME,
            "grpc.health.v1.Health",
            reflection_name,
        ]
        .into_iter()
        .fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(ferry_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |b, name| b.with_service_name(name),
        )
    };
    let (v1, v1alpha) = match (
        reflection("grpc.reflection.v1.ServerReflection").build_v1(),
        reflection("grpc.reflection.v1alpha.ServerReflection").build_v1alpha(),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "building reflection service failed");
            return;
        }
    };
    let raft = RaftServiceServer::new(RaftServiceImpl { node: node.clone(), shutdown: shutdown.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Another cluster's messages are refused before they reach openraft.
    let empty = {
        let node = node.clone();
        move || node.raft.metrics().borrow().last_log_index.is_none()
    };
    let check = identity::Check {
        cluster: node.cluster.clone(),
        empty: Arc::new(empty),
        checked: !node.peers.security().is_insecure(),
    };
    let raft = tonic::service::interceptor::InterceptedService::new(raft, check);
    let config =
        ConfigServiceServer::new(ConfigServiceImpl { node: node.clone() }).max_decoding_message_size(8 * 1024 * 1024);
    let cluster = ClusterServiceServer::new(ClusterServiceImpl { node: node.clone() });
    let leases = LeaseServiceServer::new(LeaseServiceImpl { node: node.clone(), clock: clock.clone() });
    let registry = RegistryServiceServer::new(RegistryServiceImpl { node: node.clone(), clock });
    let probes = ProbeServiceServer::new(ProbeServiceImpl { node: node.clone() });
    let jobs = JobServiceServer::new(JobServiceImpl { node: node.clone(), sessions: sessions.clone() })
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    let workers = WorkerServiceServer::new(WorkerServiceImpl { node: node.clone(), sessions })
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);

    // The builder's `tcp_nodelay` applies only to listeners tonic binds
    // itself; without it Nagle holds small replies (a Raft ack, a put's
    // trailers) behind the peer's delayed ACK for up to 40 ms.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let incoming = ferry_tls::incoming(incoming, node.peers.security().clone());
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .layer(fault_layer())
        .layer(crate::grpc::forward::ForwardLayer::new(node.clone()))
        .add_service(health_service)
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(raft)
        .add_service(config)
        .add_service(cluster)
        .add_service(jobs)
        .add_service(workers)
        .add_service(leases)
        .add_service(registry)
        .add_service(probes)
        .serve_with_incoming_shutdown(incoming, stop)
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
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
