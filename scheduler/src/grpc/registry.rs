//! `ferry.v1.RegistryService`: decode, call [`crate::registry`] (and
//! [`crate::leases`] for a registration's own lease), encode.

use std::pin::Pin;
use std::sync::Arc;

use ferry_proto::pb::{self, registry_service_server::RegistryService};
use ferry_storage::registry::Instance;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::grpc::header_at;
use crate::leases::{self, LeaseClock};
use crate::raft::node::{new_request_id, Node};
use crate::registry::{self, Listing};
use crate::stream::inline_stream;

/// The RegistryService implementation.
pub struct RegistryServiceImpl {
    pub(crate) node: Arc<Node>,
    pub(crate) clock: Arc<LeaseClock>,
}

crate::grpc::mirror!(pub fn from_pb(pb::Instance) -> Instance; pub fn to_pb;
    service, id, address, port, version, methods, weight, gray, labels, metadata, consumer, suspect, deregistered);

fn listing_to_pb(node: &Node, l: Listing) -> pb::ListInstancesResponse {
    pb::ListInstancesResponse {
        header: Some(header_at(node, l.revision)),
        instances: l.instances.into_iter().map(to_pb).collect(),
        deregistered: l.deregistered,
    }
}

#[tonic::async_trait]
impl RegistryService for RegistryServiceImpl {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = request.into_inner();
        let instance = from_pb(req.instance.ok_or_else(|| Error::InvalidArgument("instance: missing".into()))?);
        registry::validate(&instance)?;
        let request_id = if req.request_id.is_empty() { new_request_id() } else { req.request_id };
        let mut lease = req.lease;
        if lease == 0 {
            // Refused before a lease is granted for it (checked again, with
            // the write, in `register`).
            self.node.read_barrier(false).await?;
            registry::may_register(&self.node, &instance.key(), 0, req.replace)?;
            // A retried registration (same request id) gets the lease the
            // first attempt granted: the grant has its own derived id.
            let ttl_ms = if req.ttl_ms == 0 { registry::DEFAULT_TTL_MS } else { req.ttl_ms };
            lease = leases::grant(&self.node, &self.clock, ttl_ms, format!("{request_id}-lease")).await?.0;
        }
        let (revision, took_from) =
            registry::register(&self.node, instance, lease, request_id.clone(), req.replace).await?;
        // A takeover revokes the lease it took the id from when that lease
        // holds nothing else now: the replaced owner's next renewal says its
        // lease is gone, and it stops.
        if let Some(old) = took_from {
            if self.node.reader.lease(old).map_err(Error::from)?.is_some_and(|l| l.keys.is_empty()) {
                if let Err(e) = leases::revoke(&self.node, old, format!("{request_id}-revoke")).await {
                    tracing::warn!(lease = old, error = %e, "could not revoke a replaced registration's lease");
                }
            }
        }
        Ok(Response::new(pb::RegisterResponse { header: Some(header_at(&self.node, revision)), lease }))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let req = request.into_inner();
        let request_id = if req.request_id.is_empty() { new_request_id() } else { req.request_id };
        let (revision, deregistered) =
            registry::deregister(&self.node, &req.service, &req.id, req.lease, request_id).await?;
        Ok(Response::new(pb::DeregisterResponse { header: Some(header_at(&self.node, revision)), deregistered }))
    }

    async fn list(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let req = request.into_inner();
        registry::check_name(&req.service, "service")?;
        self.node.read_barrier(false).await?;
        Ok(Response::new(listing_to_pb(&self.node, registry::listing(&self.node, &req.service)?)))
    }

    type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ListInstancesResponse, Status>> + Send>>;

    async fn watch(&self, request: Request<pb::WatchInstancesRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        registry::check_name(&req.service, "service")?;
        let node = self.node.clone();
        let lists = inline_stream(16, |tx| async move {
            let mut changed = node.reader.subscribe();
            let mut next = 0u64;
            loop {
                // The full list after every change under the prefix.
                let listing = match registry::listing(&node, &req.service) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                next = next.max(listing.revision + 1);
                if tx.send(Ok(listing_to_pb(&node, listing))).await.is_err() {
                    return;
                }
                loop {
                    if changed.changed().await.is_err() {
                        return;
                    }
                    match registry::changed_since(&node, &req.service, next) {
                        Ok(Err(upto)) => next = upto + 1,
                        Ok(Ok(())) | Err(_) => break,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(lists)))
    }
}
