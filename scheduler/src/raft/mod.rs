//! The Raft node: openraft on the storage crate, its outbound network and
//! peer channels, group commit of writes, and when snapshots are built.
//!
//! - [`node`] — the shared node: propose, read barrier, leader hints.
//! - [`proposer`] — group commit of concurrent writes into one log entry.
//! - [`network`] / [`peers`] — outbound Raft RPCs and the channel cache.
//! - [`snapshots`] — when each node builds a snapshot (staggered).
//! - [`removal`] — a removed node notices, stops Raft and turns clients away.
//! - [`identity`] — the cluster id, and refusing another cluster's messages.
//! - [`versions`] — the members' versions and the features they allow.
//! - [`census`] — the leader asking every member for its version.
//! - [`transfer`] — handing leadership to another voter.

pub mod census;
pub mod identity;
pub mod network;
pub mod node;
pub mod peers;
pub mod proposer;
pub mod removal;
pub mod snapshots;
pub mod transfer;
pub mod versions;
