//! The running Raft node and what every service needs from it: proposing a
//! command, a linearizable read barrier, and where the leader is.

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::pb::raft_service_client::RaftServiceClient;
use ferry_proto::pb::{self, ResponseHeader};
use ferry_storage::{Command, CommandResult, LogStore, NodeId, StateReader, TypeConfig};
use openraft::error::{CheckIsLeaderError, ForwardToLeader, RaftError};
use openraft::{BasicNode, Raft, ServerState};

use crate::config::SchedulerConfig;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::raft::peers::Peers;
use crate::raft::proposer::{Outcome, Proposer};

/// Where a write went.
pub enum Proposal {
    /// Applied here (this node is the leader).
    Applied(CommandResult),
    /// This node is not the leader; the leader is at this address.
    Forward(String),
}

/// Shared state of one scheduler node.
pub struct Node {
    /// This node's id.
    pub id: NodeId,
    /// The address peers and clients reach this node at.
    pub addr: String,
    /// The openraft handle.
    pub raft: Raft<TypeConfig>,
    /// Read side of the state machine.
    pub reader: StateReader,
    /// The log store (for counters).
    pub log: LogStore,
    /// gRPC channels to peers.
    pub peers: Peers,
    /// The configuration it runs with.
    pub config: SchedulerConfig,
    /// Commit index known at start; ready once applied reaches it.
    pub start_commit: u64,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Packs concurrent writes into shared log entries.
    pub proposer: Proposer,
}

impl Node {
    /// How long a write or a read barrier may wait for the cluster.
    pub fn op_timeout(&self) -> Duration {
        self.config.rpc_timeout * 5
    }

    /// The leader as this node knows it.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id).map(|n| n.addr.clone())?;
        Some((id, addr))
    }

    /// True if this node leads and a quorum acknowledged it within two
    /// maximum election timeouts: a leader cut off from the majority stops
    /// answering soon after a new one can have been elected (and the new
    /// one starts every lease afresh), well within any lease TTL (1 s+),
    /// while a loaded but healthy leader is not turned away.
    pub fn leads_with_quorum(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        let bound = 2 * self.config.election_timeout_max.as_millis() as u64;
        m.current_leader == Some(self.id) && m.millis_since_quorum_ack.is_some_and(|ms| ms < bound)
    }

    fn not_leader(&self, f: &ForwardToLeader<NodeId, BasicNode>) -> Error {
        Error::NotLeader { leader_id: f.leader_id, leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()) }
    }

    /// Where to send a call this node cannot do itself, or the error to
    /// return when the call was forwarded already or no leader is known.
    pub fn forward_target(&self, f: &ForwardToLeader<NodeId, BasicNode>, forwarded: bool) -> Result<String, Error> {
        match (&f.leader_node, forwarded) {
            (Some(n), false) if n.addr != self.addr => Ok(n.addr.clone()),
            _ => Err(self.not_leader(f)),
        }
    }

    /// Proposes `cmd` (batched with concurrent writes by the [`Proposer`])
    /// and waits until it is applied, or says where the leader is.
    pub async fn propose(&self, cmd: Command, forwarded: bool) -> Result<Proposal, Error> {
        let outcome = tokio::time::timeout(self.op_timeout(), self.proposer.propose(cmd))
            .await
            .map_err(|_| Error::Timeout("the write was not committed in time (is a quorum up?)".into()))?;
        match outcome {
            Outcome::Applied(result) => Ok(Proposal::Applied(result)),
            Outcome::NotLeader(f) => Ok(Proposal::Forward(self.forward_target(&f, forwarded)?)),
            Outcome::Failed(reason) => Err(Error::Stopped(reason)),
        }
    }

    /// Waits until this node has applied everything committed before the call
    /// (read index): asks the leader for its commit point, confirmed by a
    /// quorum, then waits for the local state machine to reach it.
    pub async fn read_barrier(&self, serializable: bool) -> Result<(), Error> {
        if serializable {
            return Ok(());
        }
        let index = match self.raft.get_read_log_id().await {
            Ok((read, _)) => read.map(|l| l.index),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                let addr = match &f.leader_node {
                    Some(n) => n.addr.clone(),
                    None => return Err(self.not_leader(&f)),
                };
                let mut client = RaftServiceClient::new(self.peers.channel(&addr)?);
                let mut req = tonic::Request::new(pb::ReadIndexRequest {});
                req.set_timeout(self.config.rpc_timeout);
                let reply = client
                    .read_index(req)
                    .await
                    .map_err(|s| Error::Unreachable { addr: addr.clone(), reason: s.message().to_string() })?;
                Some(reply.into_inner().read_index)
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                return Err(Error::Unreachable { addr: "quorum".into(), reason: e.to_string() })
            }
            Err(RaftError::Fatal(f)) => return Err(Error::Stopped(f.to_string())),
        };
        self.wait_applied(index.unwrap_or(0)).await
    }

    /// Waits until the local state machine has applied `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<(), Error> {
        if self.reader.applied_index() >= index {
            return Ok(());
        }
        self.raft
            .wait(Some(self.op_timeout()))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map(|_| ())
            .map_err(|e| Error::Timeout(format!("waiting to apply index {index}: {e}")))
    }

    /// The leader's read index, for a follower's barrier. Leader only.
    pub async fn read_index(&self) -> Result<u64, Error> {
        match self.raft.get_read_log_id().await {
            Ok((read, _)) => Ok(read.map(|l| l.index).unwrap_or(0)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(self.not_leader(&f)),
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                Err(Error::Unreachable { addr: "quorum".into(), reason: e.to_string() })
            }
            Err(RaftError::Fatal(f)) => Err(Error::Stopped(f.to_string())),
        }
    }

    /// The header for a response produced now.
    pub fn header(&self) -> ResponseHeader {
        let m = self.raft.metrics().borrow().clone();
        ResponseHeader {
            revision: self.reader.revision(),
            raft_term: m.current_term,
            member_id: self.id,
            applied_index: self.reader.applied_index(),
        }
    }

    /// This node's role as a word.
    pub fn role(&self) -> &'static str {
        match self.raft.metrics().borrow().state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        }
    }
}

/// A fresh request id for a write whose client sent none.
pub fn new_request_id() -> String {
    format!("srv-{:032x}", rand::random::<u128>())
}

/// True when a follower forwarded this call already.
pub fn is_forwarded<T>(req: &tonic::Request<T>) -> bool {
    req.metadata().contains_key(crate::error::FORWARDED_HEADER)
}

/// Marks a request as forwarded, with a deadline.
pub fn forwarded<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(crate::error::FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
    req.set_timeout(timeout);
    req
}
