//! Ferry's scheduler: one member of the three-node Raft group that is the
//! source of truth for the fleet.
//!
//! [`Scheduler::start`] opens the data directory (`ferry-storage`), starts
//! openraft, serves gRPC on one listener (Raft traffic, client services,
//! health, reflection) and the admin HTTP port, and initializes a fresh
//! cluster exactly once.
//!
//! Layout:
//! - [`config`] — `SchedulerConfig` (TOML + flags) and its validation.
//! - [`server`] — start, bootstrap, serve, shut down.
//! - [`node`] — the shared node: propose, read barrier, leader hints.
//! - [`proposer`] — group commit of concurrent writes into one log entry.
//! - [`network`] / [`peers`] — outbound Raft RPCs and the channel cache.
//! - [`raft_service`], [`config_service`], [`cluster_service`] — inbound gRPC.
//! - [`admin`], [`metrics`] — `/metrics`, `/healthz`, `/readyz`.
//! - [`local`] — several nodes in one process (`ferry dev`, benches, tests).
//! - [`error`] — the crate's error and its conversion to `tonic::Status`.

pub mod admin;
pub mod cluster_service;
pub mod config;
pub mod config_service;
pub mod error;
pub mod local;
pub mod metrics;
pub mod network;
pub mod node;
pub mod peers;
pub mod proposer;
pub mod raft_service;
pub mod server;

pub use config::SchedulerConfig;
pub use error::Error;
pub use local::LocalCluster;
pub use server::Scheduler;
