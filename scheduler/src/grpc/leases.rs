//! `ferry.v1.LeaseService`: decode, call [`crate::leases`], encode. Every
//! call runs on the leader (see [`crate::grpc::forward`]).

use std::pin::Pin;
use std::sync::Arc;

use ferry_proto::pb::{self, lease_service_server::LeaseService};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::grpc::{header, header_at};
use crate::leases::{self, LeaseClock};
use crate::raft::node::Node;

/// The LeaseService implementation.
pub struct LeaseServiceImpl {
    pub(crate) node: Arc<Node>,
    pub(crate) clock: Arc<LeaseClock>,
}

#[tonic::async_trait]
impl LeaseService for LeaseServiceImpl {
    async fn grant(&self, request: Request<pb::LeaseGrantRequest>) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let req = request.into_inner();
        let (id, ttl_ms) = leases::grant(&self.node, &self.clock, req.ttl_ms, req.request_id).await?;
        Ok(Response::new(pb::LeaseGrantResponse { header: Some(header(&self.node)), id, ttl_ms }))
    }

    async fn revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let req = request.into_inner();
        let revision = leases::revoke(&self.node, req.id, req.request_id).await?;
        Ok(Response::new(pb::LeaseRevokeResponse { header: Some(header_at(&self.node, revision)) }))
    }

    type KeepAliveStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        if !self.node.is_leader() {
            return Err(self.node.not_leader().into());
        }
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let (node, clock) = (self.node.clone(), self.clock.clone());
        tokio::spawn(async move {
            while let Ok(Some(req)) = incoming.message().await {
                // Leadership may move (or this leader may be cut off from
                // the majority) while the stream is open: then it ends with
                // "not leader", and the client goes to the new leader.
                let answer = leases::keep_alive(&node, &clock, req.id)
                    .map(|ttl_ms| pb::LeaseKeepAliveResponse { id: req.id, ttl_ms })
                    .map_err(Status::from);
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
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
        let id = request.into_inner().id;
        let (lease, remaining) = leases::time_to_live(&self.node, &self.clock, id)?;
        Ok(Response::new(pb::LeaseTimeToLiveResponse {
            header: Some(header(&self.node)),
            id,
            ttl_ms: lease.ttl_ms,
            remaining_ms: remaining.as_millis() as u64,
            keys: lease.keys,
        }))
    }
}
