//! Moving leadership to another voter (`ferry cluster transfer-leader`, and a
//! leader's clean stop).
//!
//! openraft 0.9 has no leader transfer, and a voter refuses to vote while
//! its leader's lease (`election_timeout_max` since it last heard from the
//! leader) runs. So the leader hands over in four steps:
//!
//! 1. it holds every write and linearizable read ([`Node::hold`]) and stops
//!    its heartbeats, so nothing refreshes the voters' leases;
//! 2. it waits until the chosen voter holds its whole log;
//! 3. it lets the lease run out, then asks that voter to start an election
//!    at once (`RaftService/TimeoutNow`), which it wins: its log is the
//!    longest, and no other voter has timed out yet (their own elections
//!    wait the lease plus an election timeout);
//! 4. the new leader's first message makes the old one step down; the held
//!    calls then go on and reach the new leader (a follower forwards them).
//!
//! Calls wait, they do not fail: the window is about the lease. If the
//! chosen voter does not win within a few election timeouts, the old
//! leader takes its heartbeats back up and stays leader. `TimeoutNow` is
//! new in 0.2.0, so a transfer waits until every member runs it
//! ([`Feature::TransferLeader`]).

use std::time::{Duration, Instant};

use ferry_proto::pb::{self, raft_service_client::RaftServiceClient};
use ferry_storage::NodeId;

use crate::error::Error;
use crate::raft::node::Node;
use crate::raft::versions::Feature;

/// Where leadership went.
#[derive(Debug, Clone)]
pub struct Moved {
    pub leader_id: NodeId,
    pub leader_addr: String,
    pub term: u64,
    /// From holding calls to the new leader known.
    pub took: Duration,
}

/// Moves leadership from this node (the leader) to voter `to`, or to the
/// most caught-up voter.
pub async fn transfer(node: &Node, to: Option<NodeId>) -> Result<Moved, Error> {
    if !node.is_leader() {
        return Err(node.not_leader());
    }
    if !node.versions.allows(Feature::TransferLeader) {
        crate::raft::census::refresh(node).await;
    }
    if !node.versions.allows(Feature::TransferLeader) {
        return Err(Error::FailedPrecondition(node.versions.refusal(Feature::TransferLeader)));
    }
    let (target, addr) = choose(node, to)?;
    let Some(_held) = node.hold() else {
        return Err(Error::FailedPrecondition("a leader transfer is already under way".into()));
    };
    let started = Instant::now();
    node.raft.runtime_config().heartbeat(false);
    let moved = hand_over(node, target, &addr, started).await;
    node.raft.runtime_config().heartbeat(true);
    match &moved {
        Ok(m) => {
            tracing::info!(to = m.leader_id, term = m.term, took_ms = m.took.as_millis() as u64, "leadership moved")
        }
        Err(e) => tracing::warn!(to = target, error = %e, "leadership did not move; this node goes on leading"),
    }
    moved
}

/// The voter to hand over to, and its address.
fn choose(node: &Node, to: Option<NodeId>) -> Result<(NodeId, String), Error> {
    let m = node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: Vec<NodeId> = membership.voter_ids().filter(|id| *id != node.id).collect();
    let matched = |id: &NodeId| m.replication.as_ref().and_then(|r| r.get(id).cloned()).flatten().map(|l| l.index);
    let target = match to {
        Some(id) if id == node.id => {
            return Err(Error::InvalidArgument(format!("to: node {id} already leads")));
        }
        Some(id) if !voters.contains(&id) => {
            return Err(Error::InvalidArgument(format!("to: node {id} is not a voter of this cluster")));
        }
        Some(id) => id,
        None => voters
            .iter()
            .copied()
            .max_by_key(|id| matched(id))
            .ok_or_else(|| Error::FailedPrecondition("no other voter to lead".into()))?,
    };
    let addr = membership.get_node(&target).map(|n| n.addr.clone()).unwrap_or_default();
    Ok((target, addr))
}

async fn hand_over(node: &Node, target: NodeId, addr: &str, started: Instant) -> Result<Moved, Error> {
    let lease = node.config.election_timeout_max;
    // 2. The target holds the whole log (nothing new is appended now).
    let mut metrics = node.raft.metrics();
    let caught_up = async {
        loop {
            let done = {
                let m = metrics.borrow_and_update();
                let matched = m.replication.as_ref().and_then(|r| r.get(&target).cloned()).flatten();
                matched.map(|l| l.index) >= m.last_log_index
            };
            if done || metrics.changed().await.is_err() {
                return done;
            }
        }
    };
    if !tokio::time::timeout(lease * 4, caught_up).await.unwrap_or(false) {
        return Err(Error::FailedPrecondition(format!("to: node {target} did not catch up with the log in time")));
    }
    // 3. The voters' leases run out (counted from now: the last message
    // went out no later), then the target campaigns.
    tokio::time::sleep(lease + Duration::from_millis(20)).await;
    let term = node.raft.metrics().borrow().current_term;
    let mut client = RaftServiceClient::new(node.peers.channel(addr)?);
    let mut req = tonic::Request::new(pb::TimeoutNowRequest { from: node.id, term });
    req.set_timeout(node.config.rpc_timeout);
    client.timeout_now(req).await.map_err(|s| Error::Unreachable { addr: addr.into(), reason: s.message().into() })?;
    // 4. The new leader is known here once its first message arrives.
    let deadline = lease * 6;
    let elected = node
        .raft
        .wait(Some(deadline))
        .metrics(|m| m.current_leader.is_some_and(|l| l != node.id) && m.current_term > term, "a new leader")
        .await
        .map_err(|e| Error::Timeout(format!("node {target} did not win its election: {e}")))?;
    let leader_id = elected.current_leader.unwrap_or(target);
    let leader_addr =
        elected.membership_config.membership().get_node(&leader_id).map(|n| n.addr.clone()).unwrap_or_default();
    Ok(Moved { leader_id, leader_addr, term: elected.current_term, took: started.elapsed() })
}

/// On the voter asked to take over: starts an election now, if the request
/// comes from the leader this node follows, in its term.
pub async fn timeout_now(node: &Node, req: pb::TimeoutNowRequest) -> Result<(), Error> {
    let (leader, term, voter) = {
        let m = node.raft.metrics().borrow().clone();
        (m.current_leader, m.current_term, m.membership_config.membership().voter_ids().any(|v| v == node.id))
    };
    if leader != Some(req.from) || term != req.term || !voter {
        return Err(Error::FailedPrecondition(format!(
            "term: node {} asks in term {} to take over, but this node follows {leader:?} in term {term}{}",
            req.from,
            req.term,
            if voter { "" } else { " and is not a voter" }
        )));
    }
    tracing::info!(from = req.from, term, "asked to take over leadership: starting an election");
    node.raft.trigger().elect().await.map_err(|e| Error::Stopped(e.to_string()))
}
