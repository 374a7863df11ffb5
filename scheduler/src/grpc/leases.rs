//! `ferry.v1.LeaseService` and the lease clock.
//!
//! The replicated state holds each lease's TTL and keys; when a lease runs
//! out is leader soft state on the leader's monotonic clock. A node that
//! becomes leader starts every lease afresh with its full TTL (a failover
//! never ends a lease early), renews on keep-alive, and revokes expired
//! leases through the log in batches of at most [`EXPIRE_BATCH`] per tick,
//! oldest deadline first, so a mass expiry is spread rather than a storm.
//!
//! Registry protection: before revoking, the leader counts, per service,
//! the instances whose leases have run out or are within half a TTL of it
//! (live holders renew every third of a TTL) or that are flagged `suspect`
//! already. If that is more than the protect threshold's share of the
//! service, those leases are kept and their instances flagged `suspect`
//! instead (consumers never see a service emptied by a mass expiry). A
//! renewed lease clears the flag; once the share falls back under the
//! threshold, the remaining expired leases are revoked.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::pb::{self, lease_service_server::LeaseService};
use ferry_storage::{kv, Command, CommandResult, Op};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::raft::node::{new_request_id, Node};

/// Expired leases revoked per tick at most.
pub const EXPIRE_BATCH: usize = 500;
/// Services with fewer instances than this are never protected: a lone
/// instance that dies must go.
pub const PROTECT_MIN_INSTANCES: usize = 3;
/// A protected lease is revoked anyway once it has lapsed this many TTLs
/// ago (at least [`PROTECT_MIN_HOLD`]): protection bridges an outage, it
/// does not keep dead instances forever.
pub const PROTECT_MAX_TTLS: u32 = 10;
/// See [`PROTECT_MAX_TTLS`].
pub const PROTECT_MIN_HOLD: Duration = Duration::from_secs(60);
/// How often the leader looks for expired leases.
pub const TICK: Duration = Duration::from_millis(100);
/// A revoke proposed but not yet applied is proposed again after this long.
const RETRY: Duration = Duration::from_secs(3);

/// Deadlines of leases on this node while it leads.
#[derive(Default)]
pub struct LeaseClock {
    deadlines: Mutex<HashMap<u64, Instant>>,
    /// Leases renewed by a keep-alive since the expiry loop last looked.
    renewed: Mutex<std::collections::HashSet<u64>>,
}

impl LeaseClock {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.deadlines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Restarts `id`'s TTL now.
    pub fn renew(&self, id: u64, ttl_ms: u64) {
        self.lock().insert(id, Instant::now() + Duration::from_millis(ttl_ms));
        self.renewed.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
    }

    /// The leases renewed since the last call.
    fn take_renewed(&self) -> std::collections::HashSet<u64> {
        std::mem::take(&mut *self.renewed.lock().unwrap_or_else(|e| e.into_inner()))
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
    // Leases kept by the protect threshold (their instances are suspect).
    let mut protected: std::collections::HashSet<u64> = std::collections::HashSet::new();
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
                protected.clear();
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
        // Every lease whose deadline passed.
        let mut lapsed: std::collections::HashSet<u64> = std::collections::HashSet::new();
        // Leases past or within half a TTL of their deadline: a live holder
        // renews every third of a TTL, so its deadline stays further off;
        // holders that died together all fall in here together (one window).
        let mut failing: std::collections::HashSet<u64> = std::collections::HashSet::new();
        {
            let mut deadlines = clock.lock();
            if !leading {
                // A new leader: every lease gets its full TTL from now.
                deadlines.clear();
                leading = true;
                protected = leases.iter().filter(|l| has_suspect(&node, l)).map(|l| l.id).collect();
            }
            let live: std::collections::HashSet<u64> = leases.iter().map(|l| l.id).collect();
            deadlines.retain(|id, _| live.contains(id));
            proposed.retain(|id, at| live.contains(id) && at.elapsed() < RETRY);
            for l in &leases {
                let deadline = *deadlines.entry(l.id).or_insert_with(|| now + Duration::from_millis(l.ttl_ms));
                if deadline <= now {
                    lapsed.insert(l.id);
                }
                if deadline <= now + Duration::from_millis(l.ttl_ms / 2) {
                    failing.insert(l.id);
                }
                if deadline <= now && !proposed.contains_key(&l.id) {
                    expired.push((deadline, l.id));
                }
            }
        }
        // Protected leases a keep-alive renewed since: clear their flag. (A
        // new leader's fresh deadlines are not renewals: suspects stay
        // suspect until their holders come back.)
        let renewed_now = clock.take_renewed();
        let renewed: Vec<u64> =
            protected.iter().copied().filter(|id| renewed_now.contains(id) && !lapsed.contains(id)).collect();
        for id in renewed {
            protected.remove(&id);
            if let Some(lease) = leases.iter().find(|l| l.id == id) {
                flag(&node, lease, false);
            }
        }
        if expired.is_empty() {
            continue;
        }
        expired.sort();
        let candidates: Vec<u64> = expired.into_iter().take(EXPIRE_BATCH).map(|(_, id)| id).collect();
        let mut keep = protect(&node, &leases, &candidates, &failing);
        // Protection ends: leases lapsed too long ago go regardless.
        {
            let deadlines = clock.lock();
            keep.retain(|id| {
                let hold = leases
                    .iter()
                    .find(|l| l.id == *id)
                    .map(|l| (Duration::from_millis(l.ttl_ms) * PROTECT_MAX_TTLS).max(PROTECT_MIN_HOLD))
                    .unwrap_or(PROTECT_MIN_HOLD);
                deadlines.get(id).is_some_and(|d| now.saturating_duration_since(*d) < hold)
            });
        }
        for lease in leases.iter().filter(|l| keep.contains(&l.id)) {
            if protected.insert(lease.id) {
                tracing::warn!(lease = lease.id, "mass expiry: keeping the lease's instances as suspect");
                flag(&node, lease, true);
            }
        }
        let ids: Vec<u64> = candidates.into_iter().filter(|id| !keep.contains(id)).collect();
        protected.retain(|id| !ids.contains(id));
        if ids.is_empty() {
            continue;
        }
        for id in &ids {
            proposed.insert(*id, now);
        }
        tracing::info!(count = ids.len(), "leases expired; revoking");
        let node = node.clone();
        tokio::spawn(async move {
            let cmd = Command { request_id: new_request_id(), op: Op::LeaseRevoke { ids } };
            if let Err(e) = node.propose(cmd).await {
                tracing::warn!(error = %e, "could not revoke expired leases; will try again");
            }
        });
    }
}

/// The service of a registry key (`registry/<service>/<id>`).
fn service_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("registry/")?;
    let (service, id) = rest.split_once('/')?;
    (!id.is_empty()).then_some(service)
}

fn instance(node: &Node, key: &str) -> Option<pb::Instance> {
    let kv = node.reader.get(key).ok()??;
    pb::Instance::decode(kv.value.as_slice()).ok()
}

fn has_suspect(node: &Node, lease: &kv::Lease) -> bool {
    lease.keys.iter().any(|k| service_of(k).is_some() && instance(node, k).is_some_and(|i| i.suspect))
}

/// Of the expiring leases `candidates`, those to keep: leases with an
/// instance of a service where the instances whose leases are failing
/// (lapsed, or within half a TTL of it) or that are suspect already are more
/// than the threshold's share.
fn protect(
    node: &Node,
    leases: &[kv::Lease],
    candidates: &[u64],
    failing: &std::collections::HashSet<u64>,
) -> std::collections::HashSet<u64> {
    let threshold = node.config.registry_protect_threshold;
    let mut keep = std::collections::HashSet::new();
    if threshold >= 1.0 {
        return keep;
    }
    let mut by_service: HashMap<&str, Vec<(u64, &str)>> = HashMap::new();
    for lease in leases.iter().filter(|l| candidates.contains(&l.id)) {
        for key in &lease.keys {
            if let Some(service) = service_of(key) {
                by_service.entry(service).or_default().push((lease.id, key));
            }
        }
    }
    let failing_keys: std::collections::HashSet<&str> =
        leases.iter().filter(|l| failing.contains(&l.id)).flat_map(|l| l.keys.iter().map(String::as_str)).collect();
    for (service, expiring) in by_service {
        let Ok((kvs, _)) = node.reader.list_at_revision(&crate::grpc::registry::prefix(service)) else { continue };
        let total = kvs.len();
        let gone = kvs
            .iter()
            .filter(|kv| {
                failing_keys.contains(kv.key.as_str())
                    || pb::Instance::decode(kv.value.as_slice()).is_ok_and(|i| i.suspect)
            })
            .count();
        if total >= PROTECT_MIN_INSTANCES && gone as f64 > threshold * total as f64 {
            keep.extend(expiring.iter().map(|(id, _)| *id));
        }
    }
    keep
}

/// Sets or clears `suspect` on the registry instances bound to `lease`
/// (only those that differ and have not changed since read).
fn flag(node: &Arc<Node>, lease: &kv::Lease, suspect: bool) {
    let commands: Vec<Command> = lease
        .keys
        .iter()
        .filter(|k| service_of(k).is_some())
        .filter_map(|k| {
            let kv = node.reader.get(k).ok()??;
            let mut i = pb::Instance::decode(kv.value.as_slice()).ok()?;
            if i.suspect == suspect {
                return None;
            }
            i.suspect = suspect;
            // Only if unchanged since read: an instance that re-registered
            // meanwhile (a new lease) must not be bound back to this one.
            let op = Op::Txn(Box::new(kv::Txn {
                compares: vec![kv::Compare::ModRevision { key: k.clone(), revision: kv.mod_revision }],
                success: vec![kv::TxnOp::PutLeased { key: k.clone(), value: i.encode_to_vec(), lease: lease.id }],
                failure: vec![],
            }));
            Some(Command { request_id: new_request_id(), op })
        })
        .collect();
    if commands.is_empty() {
        return;
    }
    // One proposal each: the proposer packs concurrent proposals into a
    // batch itself, and a batch must not contain a batch.
    for cmd in commands {
        let node = node.clone();
        tokio::spawn(async move {
            match node.propose(cmd).await {
                Ok(CommandResult::Txn { succeeded: true, .. }) | Err(Error::NotLeader { .. }) => {}
                Ok(other) => tracing::debug!(result = ?other, "registry instance not flagged"),
                Err(e) => tracing::warn!(error = %e, "could not flag a registry instance"),
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
    fn not_leader(&self) -> Status {
        self.node.not_leader().into()
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
        let mut req = request.into_inner();
        kv::validate_ttl(req.ttl_ms).map_err(invalid)?;
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        let id = new_lease_id();
        let cmd = Command { request_id: req.request_id.clone(), op: Op::LeaseGrant { id, ttl_ms: req.ttl_ms } };
        match self.node.propose(cmd).await? {
            CommandResult::LeaseGranted { id, ttl_ms } => {
                self.clock.renew(id, ttl_ms);
                Ok(Response::new(pb::LeaseGrantResponse { header: Some(self.node.header()), id, ttl_ms }))
            }
            CommandResult::Rejected { reason } => Err(invalid(reason)),
            other => Err(Status::internal(format!("unexpected result for grant: {other:?}"))),
        }
    }

    async fn revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let mut req = request.into_inner();
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        let cmd = Command { request_id: req.request_id.clone(), op: Op::LeaseRevoke { ids: vec![req.id] } };
        match self.node.propose(cmd).await? {
            CommandResult::LeasesRevoked { revision, revoked } => {
                if revoked.is_empty() {
                    return Err(Status::not_found(format!("id: unknown lease id {}", req.id)));
                }
                let mut header = self.node.header();
                header.revision = revision;
                Ok(Response::new(pb::LeaseRevokeResponse { header: Some(header) }))
            }
            CommandResult::Rejected { reason } => Err(invalid(reason)),
            other => Err(Status::internal(format!("unexpected result for revoke: {other:?}"))),
        }
    }

    type KeepAliveStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        if !self.node.is_leader() {
            return Err(self.not_leader());
        }
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let (node, clock) = (self.node.clone(), self.clock.clone());
        tokio::spawn(async move {
            while let Ok(Some(req)) = incoming.message().await {
                // Leadership may move (or this leader may be cut off from
                // the majority) while the stream is open: then end it, and
                // the client goes to the new leader.
                if !node.leads_with_quorum() {
                    let _ = tx.send(Err(node.not_leader().into())).await;
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
        if !self.node.is_leader() {
            return Err(self.not_leader());
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
