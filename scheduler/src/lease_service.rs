//! `ferry.v1.LeaseService` and the lease clock.
//!
//! The replicated state holds each lease's TTL and keys; when a lease runs
//! out is leader soft state on the leader's monotonic clock. A node that
//! becomes leader starts every lease afresh with its full TTL (a failover
//! never ends a lease early), renews on keep-alive, and revokes expired
//! leases through the log in batches of at most [`EXPIRE_BATCH`] per tick,
//! oldest deadline first, so a mass expiry is spread rather than a storm.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::pb::{self, lease_service_client::LeaseServiceClient, lease_service_server::LeaseService};
use ferry_storage::{kv, Command, CommandResult, Op};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::node::{forwarded, is_forwarded, new_request_id, Node, Proposal};

/// Expired leases revoked per tick at most.
pub const EXPIRE_BATCH: usize = 500;
/// How often the leader looks for expired leases.
pub const TICK: Duration = Duration::from_millis(100);
/// A revoke proposed but not yet applied is proposed again after this long.
const RETRY: Duration = Duration::from_secs(3);

/// Deadlines of leases on this node while it leads.
#[derive(Default)]
pub struct LeaseClock {
    deadlines: Mutex<HashMap<u64, Instant>>,
}

impl LeaseClock {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.deadlines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Restarts `id`'s TTL now.
    pub fn renew(&self, id: u64, ttl_ms: u64) {
        self.lock().insert(id, Instant::now() + Duration::from_millis(ttl_ms));
    }

    /// Time left on `id`, if this node tracks it.
    pub fn remaining(&self, id: u64) -> Option<Duration> {
        self.lock().get(&id).map(|d| d.saturating_duration_since(Instant::now()))
    }
}

/// Runs the expiry loop until `shutdown` turns true.
pub async fn run_expiry(node: Arc<Node>, clock: Arc<LeaseClock>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading = false;
    let mut proposed: HashMap<u64, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        if node.leader().map(|l| l.0) != Some(node.id) {
            if leading {
                clock.lock().clear();
                proposed.clear();
                leading = false;
            }
            continue;
        }
        let leases = match node.reader.leases() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read leases");
                continue;
            }
        };
        let now = Instant::now();
        let mut expired: Vec<(Instant, u64)> = Vec::new();
        {
            let mut deadlines = clock.lock();
            if !leading {
                // A new leader: every lease gets its full TTL from now.
                deadlines.clear();
                leading = true;
            }
            let live: std::collections::HashSet<u64> = leases.iter().map(|l| l.id).collect();
            deadlines.retain(|id, _| live.contains(id));
            proposed.retain(|id, at| live.contains(id) && at.elapsed() < RETRY);
            for l in &leases {
                let deadline = *deadlines.entry(l.id).or_insert_with(|| now + Duration::from_millis(l.ttl_ms));
                if deadline <= now && !proposed.contains_key(&l.id) {
                    expired.push((deadline, l.id));
                }
            }
        }
        if expired.is_empty() {
            continue;
        }
        expired.sort();
        let ids: Vec<u64> = expired.into_iter().take(EXPIRE_BATCH).map(|(_, id)| id).collect();
        for id in &ids {
            proposed.insert(*id, now);
        }
        tracing::info!(count = ids.len(), "leases expired; revoking");
        let node = node.clone();
        tokio::spawn(async move {
            let cmd = Command { request_id: new_request_id(), op: Op::LeaseRevoke { ids } };
            if let Err(e) = node.propose(cmd, true).await {
                tracing::warn!(error = %e, "could not revoke expired leases; will try again");
            }
        });
    }
}

/// The LeaseService implementation.
pub struct LeaseServiceImpl {
    pub(crate) node: Arc<Node>,
    pub(crate) clock: Arc<LeaseClock>,
}

fn invalid(reason: String) -> Status {
    Error::InvalidArgument(reason).into()
}

impl LeaseServiceImpl {
    fn client(&self, addr: &str) -> Result<LeaseServiceClient<tonic::transport::Channel>, Status> {
        Ok(LeaseServiceClient::new(self.node.peers.channel(addr)?))
    }

    fn is_leader(&self) -> bool {
        self.node.leader().map(|l| l.0) == Some(self.node.id)
    }

    fn not_leader(&self) -> Status {
        let leader = self.node.leader();
        Error::NotLeader { leader_id: leader.as_ref().map(|l| l.0), leader_addr: leader.map(|l| l.1) }.into()
    }
}

/// A lease id: random, never 0 (a retried grant keeps its request id, so
/// it gets the first answer, id included).
fn new_lease_id() -> u64 {
    (rand::random::<u64>() >> 1).max(1)
}

#[tonic::async_trait]
impl LeaseService for LeaseServiceImpl {
    async fn grant(&self, request: Request<pb::LeaseGrantRequest>) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let was_forwarded = is_forwarded(&request);
        let mut req = request.into_inner();
        kv::validate_ttl(req.ttl_ms).map_err(invalid)?;
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        let id = new_lease_id();
        let cmd = Command { request_id: req.request_id.clone(), op: Op::LeaseGrant { id, ttl_ms: req.ttl_ms } };
        match self.node.propose(cmd, was_forwarded).await? {
            Proposal::Forward(addr) => self.client(&addr)?.grant(forwarded(req, self.node.op_timeout())).await,
            Proposal::Applied(CommandResult::LeaseGranted { id, ttl_ms }) => {
                self.clock.renew(id, ttl_ms);
                Ok(Response::new(pb::LeaseGrantResponse { header: Some(self.node.header()), id, ttl_ms }))
            }
            Proposal::Applied(CommandResult::Rejected { reason }) => Err(invalid(reason)),
            Proposal::Applied(other) => Err(Status::internal(format!("unexpected result for grant: {other:?}"))),
        }
    }

    async fn revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let was_forwarded = is_forwarded(&request);
        let mut req = request.into_inner();
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        let cmd = Command { request_id: req.request_id.clone(), op: Op::LeaseRevoke { ids: vec![req.id] } };
        match self.node.propose(cmd, was_forwarded).await? {
            Proposal::Forward(addr) => self.client(&addr)?.revoke(forwarded(req, self.node.op_timeout())).await,
            Proposal::Applied(CommandResult::LeasesRevoked { revision, revoked }) => {
                if revoked.is_empty() {
                    return Err(Status::not_found(format!("id: unknown lease id {}", req.id)));
                }
                let mut header = self.node.header();
                header.revision = revision;
                Ok(Response::new(pb::LeaseRevokeResponse { header: Some(header) }))
            }
            Proposal::Applied(CommandResult::Rejected { reason }) => Err(invalid(reason)),
            Proposal::Applied(other) => Err(Status::internal(format!("unexpected result for revoke: {other:?}"))),
        }
    }

    type KeepAliveStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let (node, clock) = (self.node.clone(), self.clock.clone());
        tokio::spawn(async move {
            while let Ok(Some(req)) = incoming.message().await {
                // Leadership may move while the stream is open: then end it,
                // and the client goes to the new leader.
                if node.leader().map(|l| l.0) != Some(node.id) {
                    let leader = node.leader();
                    let status: Status =
                        Error::NotLeader { leader_id: leader.as_ref().map(|l| l.0), leader_addr: leader.map(|l| l.1) }
                            .into();
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                let ttl_ms = match node.reader.lease(req.id) {
                    Ok(Some(lease)) => {
                        clock.renew(req.id, lease.ttl_ms);
                        lease.ttl_ms
                    }
                    Ok(None) => 0,
                    Err(e) => {
                        let _ = tx.send(Err(Error::from(e).into())).await;
                        return;
                    }
                };
                if tx.send(Ok(pb::LeaseKeepAliveResponse { id: req.id, ttl_ms })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        if !self.is_leader() {
            if is_forwarded(&request) {
                return Err(self.not_leader());
            }
            let Some((_, addr)) = self.node.leader() else { return Err(self.not_leader()) };
            return self.client(&addr)?.time_to_live(forwarded(request.into_inner(), self.node.op_timeout())).await;
        }
        let id = request.into_inner().id;
        let lease = self
            .node
            .reader
            .lease(id)
            .map_err(Error::from)?
            .ok_or_else(|| Status::not_found(format!("id: unknown lease id {id}")))?;
        let remaining = self.clock.remaining(id).unwrap_or(Duration::from_millis(lease.ttl_ms));
        Ok(Response::new(pb::LeaseTimeToLiveResponse {
            header: Some(self.node.header()),
            id,
            ttl_ms: lease.ttl_ms,
            remaining_ms: remaining.as_millis() as u64,
            keys: lease.keys,
        }))
    }
}
