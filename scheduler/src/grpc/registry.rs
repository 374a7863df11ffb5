//! `ferry.v1.RegistryService`: service instances in the replicated key
//! space, under `registry/<service>/<id>`, each bound to a lease. A worker
//! or client that stops renewing its lease disappears when the lease ends
//! (within its TTL plus an election, as leases are); deregistering removes
//! it at once. Built on the config keys, so instances have revisions,
//! history and watches like any key.
//!
//! Deregistering writes the instance once more, marked `deregistered`, and
//! deletes it in the same log entry; a lease that ends only deletes. An
//! empty listing names the instances that were deregistered explicitly, so
//! clients can tell a service emptied on purpose from one whose instances
//! expired (and keep the latter).

use std::pin::Pin;
use std::sync::Arc;

use ferry_proto::pb::{self, registry_service_server::RegistryService};
use ferry_storage::{kv, Command, CommandResult, Op};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::grpc::leases::LeaseClock;
use crate::grpc::stream::inline_stream;
use crate::raft::node::{new_request_id, Node};

/// TTL of the lease granted for a registration that names none.
pub const DEFAULT_TTL_MS: u64 = 10_000;
/// Weight of an instance that names none.
pub const DEFAULT_WEIGHT: u32 = 100;

/// The key prefix of a service's instances.
pub fn prefix(service: &str) -> String {
    format!("registry/{service}/")
}

fn invalid(reason: String) -> Status {
    Error::InvalidArgument(reason).into()
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Checks an instance; the error names the field.
fn validate(i: &pb::Instance) -> Result<(), Status> {
    if !valid_name(&i.service) {
        return Err(invalid("service: must be 1 to 128 of letters, digits, '.', '_' or '-'".into()));
    }
    if !valid_name(&i.id) {
        return Err(invalid("id: must be 1 to 128 of letters, digits, '.', '_' or '-'".into()));
    }
    if i.address.is_empty() || i.address.len() > 253 {
        return Err(invalid("address: must be a host name or IP address".into()));
    }
    if !(1..=65535).contains(&i.port) {
        return Err(invalid(format!("port: must be 1 to 65535, got {}", i.port)));
    }
    if i.weight > 10_000 {
        return Err(invalid(format!("weight: must be at most 10000, got {}", i.weight)));
    }
    Ok(())
}

/// Decodes the instances of one listing, skipping values that are not
/// instances (written there by hand).
fn decode(kvs: Vec<ferry_storage::KeyValue>) -> Vec<pb::Instance> {
    kvs.into_iter().filter_map(|kv| pb::Instance::decode(kv.value.as_slice()).ok()).collect()
}

/// Ids of the instances under `prefix` whose last change in the history is
/// an explicit deregistration: a write marked `deregistered` followed by the
/// delete (see [`RegistryService::deregister`]). A key deleted without that
/// write (its lease ended, or a plain delete) or written again since does
/// not count. Reads the whole history window (at most
/// [`kv::HISTORY_REVISIONS`] changes), so it runs only for empty listings.
fn deregistered(node: &Node, prefix: &str) -> Result<Vec<String>, Error> {
    let from = node.reader.compacted()? + 1;
    let (events, _) = node.reader.events(from, prefix, usize::MAX)?;
    // Per id: whether its last write was the marked one.
    let mut marked: std::collections::HashMap<&str, bool> = std::collections::HashMap::new();
    let mut gone = std::collections::BTreeSet::new();
    for (_, event) in &events {
        let Some(id) = event.kv.key.strip_prefix(prefix) else { continue };
        match event.kind {
            kv::EventKind::Put => {
                gone.remove(id);
                let explicit = pb::Instance::decode(event.kv.value.as_slice()).is_ok_and(|i| i.deregistered);
                marked.insert(id, explicit);
            }
            kv::EventKind::Delete => {
                if marked.remove(id) == Some(true) {
                    gone.insert(id);
                } else {
                    gone.remove(id);
                }
            }
        }
    }
    Ok(gone.into_iter().map(str::to_string).collect())
}

/// The instances of a service now; when there are none, with the ids that
/// were deregistered explicitly.
fn listing(node: &Node, service: &str) -> Result<pb::ListInstancesResponse, Error> {
    let prefix = prefix(service);
    let (kvs, revision) = node.reader.list_at_revision(&prefix)?;
    let mut header = node.header();
    header.revision = revision;
    let instances = decode(kvs);
    let deregistered = if instances.is_empty() { deregistered(node, &prefix)? } else { Vec::new() };
    Ok(pb::ListInstancesResponse { header: Some(header), instances, deregistered })
}

/// The RegistryService implementation.
pub struct RegistryServiceImpl {
    pub(crate) node: Arc<Node>,
    pub(crate) clock: Arc<LeaseClock>,
}

#[tonic::async_trait]
impl RegistryService for RegistryServiceImpl {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let mut req = request.into_inner();
        let mut instance = req.instance.clone().ok_or_else(|| invalid("instance: missing".into()))?;
        validate(&instance)?;
        if instance.weight == 0 {
            instance.weight = DEFAULT_WEIGHT;
        }
        // Only the cluster flags instances.
        instance.suspect = false;
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        let mut lease = req.lease;
        if lease == 0 {
            let ttl_ms = if req.ttl_ms == 0 { DEFAULT_TTL_MS } else { req.ttl_ms };
            kv::validate_ttl(ttl_ms).map_err(invalid)?;
            let id = (rand::random::<u64>() >> 1).max(1);
            let cmd = Command { request_id: format!("{}-lease", req.request_id), op: Op::LeaseGrant { id, ttl_ms } };
            match self.node.propose(cmd).await? {
                CommandResult::LeaseGranted { id, ttl_ms } => {
                    self.clock.renew(id, ttl_ms);
                    lease = id;
                }
                CommandResult::Rejected { reason } => return Err(invalid(reason)),
                other => return Err(Status::internal(format!("unexpected result for lease grant: {other:?}"))),
            }
        }
        let key = format!("{}{}", prefix(&instance.service), instance.id);
        let cmd = Command {
            request_id: req.request_id.clone(),
            op: Op::PutLeased { key, value: instance.encode_to_vec(), lease },
        };
        match self.node.propose(cmd).await? {
            CommandResult::Put { revision, .. } => {
                let mut header = self.node.header();
                header.revision = revision;
                Ok(Response::new(pb::RegisterResponse { header: Some(header), lease }))
            }
            CommandResult::Rejected { reason } => Err(invalid(reason)),
            other => Err(Status::internal(format!("unexpected result for register: {other:?}"))),
        }
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let mut req = request.into_inner();
        if !valid_name(&req.service) || !valid_name(&req.id) {
            return Err(invalid("service, id: must be 1 to 128 of letters, digits, '.', '_' or '-'".into()));
        }
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        let key = format!("{}{}", prefix(&req.service), req.id);
        // The instance is written once more, marked `deregistered`, and
        // deleted, in one log entry: watchers see one change (the instance
        // gone) and the key's history keeps why it went, which a lease that
        // ends does not write (see `deregistered`). Read after a read
        // barrier so the marked value is the instance's latest; an instance
        // that changed meanwhile is still removed.
        self.node.read_barrier(false).await?;
        let op = match self.node.reader.get(&key).map_err(Error::from)? {
            // Nothing to mark; a retried id that did apply gets its first
            // answer (the transaction's) all the same.
            None => Op::Delete { key },
            Some(current) => {
                let mut marked = pb::Instance::decode(current.value.as_slice()).unwrap_or_default();
                marked.service = req.service.clone();
                marked.id = req.id.clone();
                marked.deregistered = true;
                Op::Txn(Box::new(kv::Txn {
                    compares: vec![],
                    success: vec![
                        kv::TxnOp::Put { key: key.clone(), value: marked.encode_to_vec() },
                        kv::TxnOp::Delete { key },
                    ],
                    failure: vec![],
                }))
            }
        };
        let cmd = Command { request_id: req.request_id.clone(), op };
        match self.node.propose(cmd).await? {
            CommandResult::Delete { revision, deleted } => {
                let mut header = self.node.header();
                header.revision = revision;
                Ok(Response::new(pb::DeregisterResponse { header: Some(header), deregistered: deleted }))
            }
            CommandResult::Txn { revision, succeeded, .. } => {
                let mut header = self.node.header();
                header.revision = revision;
                Ok(Response::new(pb::DeregisterResponse { header: Some(header), deregistered: succeeded }))
            }
            CommandResult::Rejected { reason } => Err(invalid(reason)),
            other => Err(Status::internal(format!("unexpected result for deregister: {other:?}"))),
        }
    }

    async fn list(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let req = request.into_inner();
        if !valid_name(&req.service) {
            return Err(invalid("service: must be 1 to 128 of letters, digits, '.', '_' or '-'".into()));
        }
        self.node.read_barrier(false).await?;
        Ok(Response::new(listing(&self.node, &req.service)?))
    }

    type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ListInstancesResponse, Status>> + Send>>;

    async fn watch(&self, request: Request<pb::WatchInstancesRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        if !valid_name(&req.service) {
            return Err(invalid("service: must be 1 to 128 of letters, digits, '.', '_' or '-'".into()));
        }
        let node = self.node.clone();
        let lists = inline_stream(16, |tx| async move {
            let prefix = prefix(&req.service);
            let mut changed = node.reader.subscribe();
            let mut next = 0u64;
            loop {
                // The full list after every change under the prefix.
                let msg = match listing(&node, &req.service) {
                    Ok(msg) => msg,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let revision = msg.header.as_ref().map_or(0, |h| h.revision);
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
                next = next.max(revision + 1);
                loop {
                    if changed.changed().await.is_err() {
                        return;
                    }
                    match node.reader.events(next, &prefix, 1) {
                        Ok((events, upto)) if events.is_empty() => next = upto + 1,
                        Ok(_) => break,
                        Err(_) => break,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(lists)))
    }
}
