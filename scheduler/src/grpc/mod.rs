//! The gRPC edge: one file per service. Each decodes a request, calls the
//! domain, and encodes the answer; wire types stay here.
//!
//! - [`raft`] — inbound Raft RPCs from peers.
//! - [`config`], [`cluster`] — configuration keys; status and membership.
//! - [`jobs`], [`workers`] — file distribution jobs; worker sessions.
//! - [`leases`], [`registry`], [`probes`] — coordination services.
//! - [`forward`] — leader forwarding: one tower layer for every service.
//! - [`stream`] — server streams whose producer runs in the stream.

pub mod cluster;
pub mod config;
pub mod forward;
pub mod jobs;
pub mod leases;
pub mod probes;
pub mod raft;
pub mod registry;
pub mod stream;
pub mod workers;
