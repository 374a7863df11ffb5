//! `ferry.v1.RegistryService`: service instances in the replicated key
//! space, under `registry/<service>/<id>`, each bound to a lease. A worker
//! or client that stops renewing its lease disappears when the lease ends
//! (within its TTL plus an election, as leases are); deregistering removes
//! it at once. Built on the config keys, so instances have revisions,
//! history and watches like any key.

use std::pin::Pin;
use std::sync::Arc;

use ferry_proto::pb::{self, registry_service_client::RegistryServiceClient, registry_service_server::RegistryService};
use ferry_storage::{kv, Command, CommandResult, Op};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::lease_service::LeaseClock;
use crate::node::{forwarded, is_forwarded, new_request_id, Node, Proposal};

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

/// The RegistryService implementation.
pub struct RegistryServiceImpl {
    pub(crate) node: Arc<Node>,
    pub(crate) clock: Arc<LeaseClock>,
}

impl RegistryServiceImpl {
    fn client(&self, addr: &str) -> Result<RegistryServiceClient<tonic::transport::Channel>, Status> {
        Ok(RegistryServiceClient::new(self.node.peers.channel(addr)?))
    }
}

#[tonic::async_trait]
impl RegistryService for RegistryServiceImpl {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let was_forwarded = is_forwarded(&request);
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
            match self.node.propose(cmd, was_forwarded).await? {
                Proposal::Forward(addr) => {
                    return self.client(&addr)?.register(forwarded(req, self.node.op_timeout())).await
                }
                Proposal::Applied(CommandResult::LeaseGranted { id, ttl_ms }) => {
                    self.clock.renew(id, ttl_ms);
                    lease = id;
                }
                Proposal::Applied(CommandResult::Rejected { reason }) => return Err(invalid(reason)),
                Proposal::Applied(other) => {
                    return Err(Status::internal(format!("unexpected result for lease grant: {other:?}")))
                }
            }
        }
        let key = format!("{}{}", prefix(&instance.service), instance.id);
        let cmd = Command {
            request_id: req.request_id.clone(),
            op: Op::PutLeased { key, value: instance.encode_to_vec(), lease },
        };
        match self.node.propose(cmd, was_forwarded).await? {
            Proposal::Forward(addr) => {
                // Leadership moved between the two writes: the new leader
                // binds to the lease granted here.
                req.lease = lease;
                self.client(&addr)?.register(forwarded(req, self.node.op_timeout())).await
            }
            Proposal::Applied(CommandResult::Put { revision, .. }) => {
                let mut header = self.node.header();
                header.revision = revision;
                Ok(Response::new(pb::RegisterResponse { header: Some(header), lease }))
            }
            Proposal::Applied(CommandResult::Rejected { reason }) => Err(invalid(reason)),
            Proposal::Applied(other) => Err(Status::internal(format!("unexpected result for register: {other:?}"))),
        }
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let was_forwarded = is_forwarded(&request);
        let mut req = request.into_inner();
        if !valid_name(&req.service) || !valid_name(&req.id) {
            return Err(invalid("service, id: must be 1 to 128 of letters, digits, '.', '_' or '-'".into()));
        }
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        let key = format!("{}{}", prefix(&req.service), req.id);
        let cmd = Command { request_id: req.request_id.clone(), op: Op::Delete { key } };
        match self.node.propose(cmd, was_forwarded).await? {
            Proposal::Forward(addr) => self.client(&addr)?.deregister(forwarded(req, self.node.op_timeout())).await,
            Proposal::Applied(CommandResult::Delete { revision, deleted }) => {
                let mut header = self.node.header();
                header.revision = revision;
                Ok(Response::new(pb::DeregisterResponse { header: Some(header), deregistered: deleted }))
            }
            Proposal::Applied(CommandResult::Rejected { reason }) => Err(invalid(reason)),
            Proposal::Applied(other) => Err(Status::internal(format!("unexpected result for deregister: {other:?}"))),
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
        let (kvs, revision) = self.node.reader.list_at_revision(&prefix(&req.service)).map_err(Error::from)?;
        let mut header = self.node.header();
        header.revision = revision;
        Ok(Response::new(pb::ListInstancesResponse { header: Some(header), instances: decode(kvs) }))
    }

    type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ListInstancesResponse, Status>> + Send>>;

    async fn watch(&self, request: Request<pb::WatchInstancesRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        if !valid_name(&req.service) {
            return Err(invalid("service: must be 1 to 128 of letters, digits, '.', '_' or '-'".into()));
        }
        let (tx, rx) = mpsc::channel(16);
        let node = self.node.clone();
        tokio::spawn(async move {
            let prefix = prefix(&req.service);
            let mut changed = node.reader.subscribe();
            let mut next = 0u64;
            loop {
                // The full list after every change under the prefix.
                let (kvs, revision) = match node.reader.list_at_revision(&prefix) {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = tx.send(Err(Error::from(e).into())).await;
                        return;
                    }
                };
                let mut header = node.header();
                header.revision = revision;
                let msg = pb::ListInstancesResponse { header: Some(header), instances: decode(kvs) };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
                next = next.max(revision + 1);
                loop {
                    tokio::select! {
                        r = changed.changed() => if r.is_err() { return },
                        _ = tx.closed() => return,
                    }
                    match node.reader.events(next, &prefix, 1) {
                        Ok((events, upto)) if events.is_empty() => next = upto + 1,
                        Ok(_) => break,
                        Err(_) => break,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
