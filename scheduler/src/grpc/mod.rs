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

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use ferry_proto::pb;

use crate::raft::node::Node;

/// One field's conversion between a wire message and its domain type: the
/// same type, or a map of the other kind (protobuf maps are hash maps).
pub trait Conv<T> {
    /// The field in the other type.
    fn conv(self) -> T;
}

impl<T> Conv<T> for T {
    fn conv(self) -> T {
        self
    }
}

impl<K: Ord + Hash + Eq, V> Conv<BTreeMap<K, V>> for HashMap<K, V> {
    fn conv(self) -> BTreeMap<K, V> {
        self.into_iter().collect()
    }
}

impl<K: Ord + Hash + Eq, V> Conv<HashMap<K, V>> for BTreeMap<K, V> {
    fn conv(self) -> HashMap<K, V> {
        self.into_iter().collect()
    }
}

/// Two functions converting between a wire message and a domain type with
/// the same fields, each converted by [`Conv`]:
/// `mirror!(pub fn from_pb(pb::X) -> Y; pub fn to_pb; a, b, c);`
macro_rules! mirror {
    ($vis:vis fn $from:ident($wire:path) -> $domain:path; $vis2:vis fn $to:ident; $($field:ident),+ $(,)?) => {
        /// The domain form of the wire message.
        $vis fn $from(w: $wire) -> $domain {
            use $domain as D;
            D { $($field: $crate::grpc::Conv::conv(w.$field)),+ }
        }
        /// The wire form of the domain value.
        $vis2 fn $to(d: $domain) -> $wire {
            use $wire as W;
            W { $($field: $crate::grpc::Conv::conv(d.$field)),+ }
        }
    };
}
pub(crate) use mirror;

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
