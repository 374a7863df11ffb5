//! The gRPC edge: one file per service. Each decodes a request, calls the
//! domain, and encodes the answer; wire types stay here.
//!
//! - [`raft`] — inbound Raft RPCs from peers.
//! - [`config`], [`cluster`] — configuration keys; status and membership.
//! - [`jobs`], [`workers`] — file distribution jobs; worker sessions.
//! - [`leases`], [`registry`], [`probes`] — coordination services.
//! - [`forward`] — leader forwarding: one tower layer for every service.

pub mod cluster;
pub mod config;
pub mod forward;
pub mod jobs;
pub mod leases;
pub mod probes;
pub mod raft;
pub mod registry;
pub mod workers;

use ferry_proto::pb;

use crate::raft::node::Node;

/// The header of a response produced now on `node`.
pub fn header(node: &Node) -> pb::ResponseHeader {
    pb::ResponseHeader {
        revision: node.reader.revision(),
        raft_term: node.raft.metrics().borrow().current_term,
        member_id: node.id,
        applied_index: node.reader.applied_index(),
    }
}

/// The header of a response about `revision` (a write's, or a read's at a
/// past revision).
pub fn header_at(node: &Node, revision: u64) -> pb::ResponseHeader {
    pb::ResponseHeader { revision, ..header(node) }
}
