//! The running Raft node and what every service needs from it: proposing a
//! command, a linearizable read barrier, and where the leader is.

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::pb;
use ferry_proto::pb::raft_service_client::RaftServiceClient;
use ferry_storage::{Command, CommandResult, LogStore, NodeId, StateReader, TypeConfig};
use openraft::error::{CheckIsLeaderError, ForwardToLeader, RaftError};
use openraft::{BasicNode, Raft, ServerState};

use crate::config::SchedulerConfig;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::raft::peers::Peers;
use crate::raft::proposer::{Outcome, Proposer};

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
    /// The cluster this node belongs to ([`crate::raft::identity`]).
    pub cluster: std::sync::Arc<crate::raft::identity::ClusterId>,
    /// Set once the leader said this node is no longer a member
    /// ([`crate::raft::removal`]): it serves no client call then.
    pub removed: std::sync::atomic::AtomicBool,
    /// The members' versions, while this node leads ([`crate::raft::versions`]).
    pub versions: crate::raft::versions::Versions,
    /// True while leadership is being handed over
    /// ([`crate::raft::transfer`]): writes and read barriers wait.
    pub held: tokio::sync::watch::Sender<bool>,
}

/// Writes and read barriers wait while this lives ([`Node::hold`]).
pub struct Held<'a>(&'a tokio::sync::watch::Sender<bool>);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.send_replace(false);
    }
}

impl Node {
    /// Holds writes and read barriers until the guard drops (a leader
    /// transfer); `None` if they are held already.
    pub fn hold(&self) -> Option<Held<'_>> {
        let was = self.held.send_replace(true);
        (!was).then_some(Held(&self.held))
    }

    /// Waits while calls are held (at most a write's deadline).
    async fn unheld(&self) {
        let mut rx = self.held.subscribe();
        let _ = tokio::time::timeout(self.op_timeout(), rx.wait_for(|held| !*held)).await;
    }

    /// How long a write or a read barrier may wait for the cluster.
    pub fn op_timeout(&self) -> Duration {
        self.config.rpc_timeout * 5
    }

    /// The leader as this node knows it.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
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
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let bound = 2 * self.config.election_timeout_max.as_millis() as u64;
        m.current_leader == Some(self.id) && m.millis_since_quorum_ack.is_some_and(|ms| ms < bound)
    }

    /// True if this node is the leader as far as it knows.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// "Not leader", naming the leader this node knows of.
    pub fn not_leader(&self) -> Error {
        let leader = self.leader();
        Error::NotLeader { leader_id: leader.as_ref().map(|l| l.0), leader_addr: leader.map(|l| l.1) }
    }

    fn forward_to(&self, f: &ForwardToLeader<NodeId, BasicNode>) -> Error {
        Error::NotLeader { leader_id: f.leader_id, leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()) }
    }

    /// Proposes `cmd` (batched with concurrent writes by the [`Proposer`])
    /// and waits until it is applied. On a follower: "not leader", naming
    /// the leader (calls reach it through [`crate::grpc::forward`]).
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, Error> {
        let bytes = ferry_storage::codec::encoded_len("command", &cmd).map_err(|e| Error::Internal(e.to_string()))?;
        if bytes > crate::raft::proposer::MAX_COMMAND_BYTES {
            return Err(Error::InvalidArgument(format!(
                "request: takes {} KiB in the log, more than the {} KiB one entry may hold",
                bytes >> 10,
                crate::raft::proposer::MAX_COMMAND_BYTES >> 10
            )));
        }
        self.unheld().await;
        let outcome = tokio::time::timeout(self.op_timeout(), self.proposer.propose(cmd))
            .await
            .map_err(|_| Error::Timeout("the write was not committed in time (is a quorum up?)".into()))?;
        match outcome {
            Outcome::Applied(result) => Ok(result),
            Outcome::NotLeader(f) => Err(self.forward_to(&f)),
            Outcome::Failed(reason) => Err(Error::Stopped(reason)),
            Outcome::TimedOut => Err(Error::Timeout("the write was not committed in time (is a quorum up?)".into())),
        }
    }

    /// Waits until this node has applied everything committed before the call
    /// (read index): asks the leader for its commit point, confirmed by a
    /// quorum, then waits for the local state machine to reach it.
    pub async fn read_barrier(&self, serializable: bool) -> Result<(), Error> {
        if serializable {
            return Ok(());
        }
        self.unheld().await;
        let index = match self.raft.get_read_log_id().await {
            Ok((read, _)) => read.map(|l| l.index),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                let addr = match &f.leader_node {
                    Some(n) => n.addr.clone(),
                    None => return Err(self.forward_to(&f)),
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
        self.unheld().await;
        match self.raft.get_read_log_id().await {
            Ok((read, _)) => Ok(read.map(|l| l.index).unwrap_or(0)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(self.forward_to(&f)),
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                Err(Error::Unreachable { addr: "quorum".into(), reason: e.to_string() })
            }
            Err(RaftError::Fatal(f)) => Err(Error::Stopped(f.to_string())),
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
