//! `ferry.v1.ClusterService`: status, membership changes and state digests.
//!
//! Membership changes run on the leader (a follower forwards them). Adding a
//! node makes it a learner first and promotes it once it has caught up.
//! Removing a node is refused when the voters left would not have a reachable
//! quorum, since the change could then never commit.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::pb::{self, cluster_service_client::ClusterServiceClient, cluster_service_server::ClusterService};
use ferry_storage::NodeId;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use tonic::{Request, Response, Status};

use crate::config::parse_host_port;
use crate::error::Error;
use crate::raft::node::Node;

/// How long a node being added may take to take its first entries.
const FIRST_CONTACT: Duration = Duration::from_secs(10);

/// The ClusterService implementation.
pub struct ClusterServiceImpl {
    pub(crate) node: Arc<Node>,
}

fn members(node: &Node) -> Vec<pb::Member> {
    let m = node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, n)| pb::Member {
            id: *id,
            addr: n.addr.clone(),
            kind: if voters.contains(id) { "voter" } else { "learner" }.into(),
        })
        .collect()
}

impl ClusterServiceImpl {
    fn client(&self, addr: &str) -> Result<ClusterServiceClient<tonic::transport::Channel>, Status> {
        Ok(ClusterServiceClient::new(self.node.peers.channel(addr)?))
    }

    /// Runs a membership change; the log index it committed at.
    async fn change(&self, change: ChangeMembers<NodeId, BasicNode>) -> Result<u64, Status> {
        match self.node.raft.change_membership(change, false).await {
            Ok(resp) => Ok(resp.log_id.index),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(self.node.not_leader().into()),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(Error::FailedPrecondition(e.to_string()).into())
            }
            Err(RaftError::Fatal(f)) => Err(Error::Stopped(f.to_string()).into()),
        }
    }

    /// Waits until learner `id` holds the log up to `index` (the entry that
    /// added it). Fails if it has received nothing after [`FIRST_CONTACT`]
    /// (nothing runs at `addr`, or not as that node), or has not caught up
    /// within the snapshot timeout.
    async fn caught_up(&self, id: NodeId, addr: &str, index: u64) -> Result<(), Error> {
        let started = tokio::time::Instant::now();
        let mut metrics = self.node.raft.metrics();
        loop {
            let matched = {
                let m = metrics.borrow_and_update();
                if m.current_leader != Some(self.node.id) {
                    return Err(self.node.not_leader());
                }
                m.replication.as_ref().and_then(|r| r.get(&id).cloned()).flatten().map(|l| l.index)
            };
            if matched.is_some_and(|m| m >= index) {
                return Ok(());
            }
            let waited = started.elapsed();
            let deadline = if matched.is_none() { FIRST_CONTACT } else { self.node.config.snapshot_timeout };
            if waited >= deadline {
                let how_far = match matched {
                    None => "received nothing".to_string(),
                    Some(m) => format!("reached log index {m} of {index}"),
                };
                return Err(Error::FailedPrecondition(format!(
                    "addr: node {id} at {addr} {how_far} in {}s; is `ferry scheduler --id {id}` running there, \
                     with an empty data directory? It was not added",
                    waited.as_secs()
                )));
            }
            if let Ok(Err(_)) = tokio::time::timeout(deadline - waited, metrics.changed()).await {
                return Err(Error::Stopped("raft stopped while adding a node".into()));
            }
        }
    }

    /// Counts which of `ids` answer a status call within a short deadline.
    async fn reachable(&self, ids: &BTreeSet<NodeId>, addrs: &BTreeMap<NodeId, String>) -> usize {
        let mut up = 0;
        for id in ids {
            if *id == self.node.id {
                up += 1;
                continue;
            }
            let Some(addr) = addrs.get(id) else { continue };
            let Ok(mut client) = self.client(addr) else { continue };
            let mut req = Request::new(pb::StatusRequest {});
            req.set_timeout(Duration::from_millis(800));
            if client.status(req).await.is_ok() {
                up += 1;
            }
        }
        up
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterServiceImpl {
    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let node = &self.node;
        let m = node.raft.metrics().borrow().clone();
        let leader = node.leader();
        Ok(Response::new(pb::StatusResponse {
            id: node.id,
            addr: node.addr.clone(),
            role: node.role().into(),
            term: m.current_term,
            leader_id: leader.as_ref().map(|l| l.0).unwrap_or(0),
            leader_addr: leader.map(|l| l.1).unwrap_or_default(),
            applied_index: node.reader.applied_index(),
            commit_index: node.log.committed_index().load(std::sync::atomic::Ordering::Relaxed),
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: m.snapshot.map(|s| s.index).unwrap_or(0),
            purged_index: m.purged.map(|p| p.index).unwrap_or(0),
            revision: node.reader.revision(),
            members: members(node),
            version: crate::raft::versions::Version::this().to_string(),
            log_flushes: node.log.append_flushes(),
            cluster_version: node.versions.cluster().map(|v| v.to_string()).unwrap_or_default(),
            tls_not_after: node.peers.security().not_after_unix(),
        }))
    }

    async fn add_node(&self, request: Request<pb::AddNodeRequest>) -> Result<Response<pb::MembershipResponse>, Status> {
        let req = request.into_inner();
        if req.id == 0 {
            return Err(Error::InvalidArgument("id: must be at least 1".into()).into());
        }
        parse_host_port(&req.addr).map_err(|r| Error::InvalidArgument(format!("addr: {r}")))?;
        {
            let m = self.node.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            if let Some(existing) = membership.get_node(&req.id) {
                let is_voter = membership.voter_ids().any(|v| v == req.id);
                if existing.addr != req.addr || is_voter || req.learner_only {
                    return Err(Error::InvalidArgument(format!(
                        "id: node {} is already a member at {}",
                        req.id, existing.addr
                    ))
                    .into());
                }
            }
            if let Some((other, _)) = membership.nodes().find(|(id, n)| n.addr == req.addr && **id != req.id) {
                return Err(
                    Error::InvalidArgument(format!("addr: {} is already used by node {other}", req.addr)).into()
                );
            };
        }
        // Learner first, then promoted once it has caught up. (openraft's
        // own blocking wait gives up after half a second and reports
        // success all the same: a node nothing listens for would become a
        // voter at once.)
        let learner = self.node.raft.add_learner(req.id, BasicNode::new(&req.addr), false).await;
        let index = match learner {
            Ok(resp) => resp.log_id.index,
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                return Err(self.node.not_leader().into())
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                return Err(Error::FailedPrecondition(e.to_string()).into())
            }
            Err(RaftError::Fatal(f)) => return Err(Error::Stopped(f.to_string()).into()),
        };
        if let Err(e) = self.caught_up(req.id, &req.addr, index).await {
            // Not left half-added: a learner nothing answers for costs
            // the leader a replication stream and confuses `cluster status`.
            if let Err(undo) = self.change(ChangeMembers::RemoveNodes(BTreeSet::from([req.id]))).await {
                tracing::warn!(id = req.id, error = %undo, "could not remove a learner that did not catch up");
            }
            return Err(e.into());
        }
        let index = if req.learner_only {
            index
        } else {
            // A voter that cannot be reached would raise the quorum without
            // adding to it.
            let m = self.node.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            let mut voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            voters.insert(req.id);
            let addrs: BTreeMap<NodeId, String> = membership.nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
            let up = self.reachable(&voters, &addrs).await;
            let quorum = voters.len() / 2 + 1;
            if up < quorum {
                return Err(Error::FailedPrecondition(format!(
                    "id: promoting node {} makes voters {voters:?}, of which {up} are reachable; a quorum needs \
                     {quorum}. It stays a learner",
                    req.id
                ))
                .into());
            }
            self.change(ChangeMembers::AddVoterIds(BTreeSet::from([req.id]))).await?
        };
        tracing::info!(id = req.id, addr = %req.addr, learner_only = req.learner_only, "node added");
        Ok(Response::new(pb::MembershipResponse { log_index: index, members: members(&self.node) }))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let req = request.into_inner();
        let m = self.node.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        if membership.get_node(&req.id).is_none() {
            return Err(Error::InvalidArgument(format!("id: there is no node {} in the cluster", req.id)).into());
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let change = if voters.contains(&req.id) {
            let remaining: BTreeSet<NodeId> = voters.iter().copied().filter(|v| *v != req.id).collect();
            if remaining.is_empty() {
                return Err(Error::FailedPrecondition(format!("id: node {} is the last voter", req.id)).into());
            }
            if self.node.is_leader() {
                let addrs: BTreeMap<NodeId, String> = membership.nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
                let up = self.reachable(&remaining, &addrs).await;
                let quorum = remaining.len() / 2 + 1;
                if up < quorum {
                    return Err(Error::FailedPrecondition(format!(
                        "id: removing node {} leaves voters {remaining:?}, of which {up} are reachable; a quorum needs {quorum}",
                        req.id
                    ))
                    .into());
                }
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([req.id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([req.id]))
        };
        let index = self.change(change).await?;
        tracing::info!(id = req.id, "node removed");
        Ok(Response::new(pb::MembershipResponse { log_index: index, members: members(&self.node) }))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let to = Some(request.into_inner().to).filter(|to| *to != 0);
        let moved = crate::raft::transfer::transfer(&self.node, to).await?;
        Ok(Response::new(pb::TransferLeaderResponse {
            leader_id: moved.leader_id,
            leader_addr: moved.leader_addr,
            term: moved.term,
            took_ms: moved.took.as_millis() as u64,
        }))
    }

    async fn state_digest(
        &self,
        _request: Request<pb::StateDigestRequest>,
    ) -> Result<Response<pb::StateDigestResponse>, Status> {
        let d = self.node.reader.digest().map_err(Error::from)?;
        Ok(Response::new(pb::StateDigestResponse {
            applied_index: d.applied_index,
            revision: d.revision,
            keys: d.keys,
            digest: d.hex,
        }))
    }
}
