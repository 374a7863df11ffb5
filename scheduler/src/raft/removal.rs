//! Noticing that this node was removed from the cluster.
//!
//! A node removed by `cluster remove-node` often never hears of it: the
//! leader stops replicating to it as soon as the change commits, so its
//! own log still names it a member. It would run on as a candidate,
//! asking for votes in ever higher terms, and answer clients from a state
//! that no longer moves. So a node that was a member and has known no
//! leader for a while asks the members it knows who leads, and that leader
//! whether it is still a member. Once the leader says no, it stops Raft
//! and refuses every client call with `UNAVAILABLE` naming the reason
//! (clients move on to another endpoint); `cluster status` still answers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::pb::{self, cluster_service_client::ClusterServiceClient};
use tokio::sync::watch;

use crate::raft::node::Node;

/// How often the node looks.
const EVERY: Duration = Duration::from_secs(1);
/// How long without a leader before it asks.
const LEADERLESS: Duration = Duration::from_secs(3);

/// Watches until `shutdown` or until the node learns it was removed.
pub async fn run(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let mut was_member = false;
    let mut leaderless = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let (member, leader) = {
            let m = node.raft.metrics().borrow().clone();
            (m.membership_config.membership().get_node(&node.id).is_some(), m.current_leader)
        };
        was_member |= member;
        leaderless = if leader.is_some() { Duration::ZERO } else { leaderless + EVERY };
        // A node never added yet waits quietly; one that leads or follows
        // is a member as far as anyone knows.
        if !was_member || (member && leaderless < LEADERLESS) {
            continue;
        }
        if still_member(&node).await == Some(false) {
            tracing::warn!(
                id = node.id,
                "the leader no longer counts this node as a member: it was removed from \
                the cluster; stopping Raft here. Stop this process; to add the machine back, start it with an \
                empty data directory and a new id, then `ferry cluster add-node`"
            );
            node.removed.store(true, Ordering::Relaxed);
            if let Err(e) = node.raft.shutdown().await {
                tracing::warn!(error = %e, "stopping raft after removal");
            }
            return;
        }
    }
}

/// Asks the members this node knows which one leads, then that leader
/// whether this node is in its membership. `None`: no leader answered.
async fn still_member(node: &Node) -> Option<bool> {
    let addrs: Vec<String> = {
        let m = node.raft.metrics().borrow().clone();
        m.membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != node.id)
            .map(|(_, n)| n.addr.clone())
            .collect()
    };
    for addr in addrs {
        let Some(status) = status(node, &addr).await else { continue };
        let leader = match status.role.as_str() {
            "leader" => status,
            _ if !status.leader_addr.is_empty() => match status_of_leader(node, &status.leader_addr).await {
                Some(s) => s,
                None => continue,
            },
            _ => continue,
        };
        return Some(leader.members.iter().any(|m| m.id == node.id));
    }
    None
}

async fn status_of_leader(node: &Node, addr: &str) -> Option<pb::StatusResponse> {
    status(node, addr).await.filter(|s| s.role == "leader")
}

async fn status(node: &Node, addr: &str) -> Option<pb::StatusResponse> {
    let mut client = ClusterServiceClient::new(node.peers.channel(addr).ok()?);
    let mut req = tonic::Request::new(pb::StatusRequest {});
    req.set_timeout(Duration::from_millis(800));
    client.status(req).await.ok().map(tonic::Response::into_inner)
}
