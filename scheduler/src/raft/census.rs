//! The leader's census: every member asked for its version, every
//! [`EVERY`], into [`crate::raft::versions::Versions`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::pb::{self, cluster_service_client::ClusterServiceClient};
use ferry_storage::NodeId;
use tokio::sync::watch;

use crate::raft::node::Node;
use crate::raft::versions::Version;

/// How often the leader asks the members.
const EVERY: Duration = Duration::from_secs(2);
/// How long one member may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_millis(800);

/// Asks every member for its version while this node leads, until `shutdown`.
pub async fn run(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let mut led_term = None;
    loop {
        let (leads, term, members) = {
            let m = node.raft.metrics().borrow().clone();
            let members: Vec<(NodeId, String)> =
                m.membership_config.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
            (m.current_leader == Some(node.id), m.current_term, members)
        };
        if !leads {
            node.versions.clear();
            led_term = None;
        } else {
            if led_term != Some(term) {
                // A new term starts from nothing heard: the gates open
                // only on answers this leader got itself.
                node.versions.clear();
                led_term = Some(term);
            }
            let heard = ask(&node, &members).await;
            let ids: Vec<NodeId> = members.iter().map(|(id, _)| *id).collect();
            node.versions.update(&ids, heard);
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Asks every member now (a leader that needs a gate before the next poll,
/// e.g. a transfer just after an election).
pub async fn refresh(node: &Node) {
    let members: Vec<(NodeId, String)> = {
        let m = node.raft.metrics().borrow().clone();
        m.membership_config.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect()
    };
    let heard = ask(node, &members).await;
    let ids: Vec<NodeId> = members.iter().map(|(id, _)| *id).collect();
    node.versions.update(&ids, heard);
}

/// The versions the members report, at most [`ASK_TIMEOUT`] each, all at once.
async fn ask(node: &Node, members: &[(NodeId, String)]) -> BTreeMap<NodeId, Version> {
    let asks = members.iter().map(|(id, addr)| async move {
        if *id == node.id {
            return Some((*id, Version::this()));
        }
        let channel = node.peers.channel(addr).ok()?;
        let mut req = tonic::Request::new(pb::StatusRequest {});
        req.set_timeout(ASK_TIMEOUT);
        let status = ClusterServiceClient::new(channel).status(req).await.ok()?.into_inner();
        // A node answers for itself only: one restarted elsewhere under
        // another id is not this member.
        (status.id == *id).then_some(())?;
        match status.version.parse() {
            Ok(v) => Some((*id, v)),
            Err(e) => {
                tracing::warn!(id, error = %e, "a member reports a version this node cannot read");
                None
            }
        }
    });
    futures::future::join_all(asks).await.into_iter().flatten().collect()
}
