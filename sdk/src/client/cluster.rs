//! The cluster API: the schedulers' status (whichever answers, or one
//! named scheduler without failover), state digests for comparing
//! replicas, membership changes (retried only when surely unsent, since a
//! timed-out change may have committed) and the workers' list.

use std::time::Duration;

use ferry_proto::pb;
use ferry_proto::pb::cluster_service_client::ClusterServiceClient;
use ferry_proto::pb::worker_service_client::WorkerServiceClient;

use super::{channel, request, Call, Client};
use crate::error::Error;

/// One scheduler's view of the cluster.
pub type Status = pb::StatusResponse;

impl Client {
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

    /// Moves leadership to voter `to` (or the most caught-up voter): writes
    /// wait, not fail, while it moves. Not retried once sent.
    pub async fn transfer_leader(&self, to: Option<u64>) -> Result<pb::TransferLeaderResponse, Error> {
        let msg = pb::TransferLeaderRequest { to: to.unwrap_or(0) };
        self.call(Call::new("transfer-leader").only_unsent(), msg, ClusterServiceClient::transfer_leader).await
    }

    /// Asks worker `name` to drain and stop (a worker of 0.2.0 or later).
    pub async fn drain_worker(&self, name: &str) -> Result<(), Error> {
        let msg = pb::DrainWorkerRequest { name: name.to_string() };
        self.call("drain-worker", msg, WorkerServiceClient::drain_worker).await.map(|_| ())
    }

    /// Every registered worker with its state (as the leader sees it).
    pub async fn list_workers(&self) -> Result<Vec<pb::WorkerStatus>, Error> {
        self.call("list-workers", pb::ListWorkersRequest {}, WorkerServiceClient::list_workers).await.map(|r| r.workers)
    }
}
