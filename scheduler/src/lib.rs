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
//! - [`snapshots`] — when each node builds a snapshot (staggered).
//! - [`proposer`] — group commit of concurrent writes into one log entry.
//! - [`network`] / [`peers`] — outbound Raft RPCs and the channel cache.
//! - [`raft_service`], [`config_service`], [`cluster_service`] — inbound gRPC.
//! - [`sessions`] — worker sessions on the leader and `WorkerService`.
//! - [`job_service`], [`job_spec`], [`job_report`] — file distribution jobs.
//! - [`planner`] — leader-only transfer planning; [`callback`] — job callbacks.
//! - [`lease_service`] — leases and their clock on the leader.
//! - [`probe_service`] — probe definitions, results, rankings, stale alerts.
//! - [`registry_service`] — service instances bound to leases.
//! - [`admin`], [`metrics`] — `/metrics`, `/healthz`, `/readyz`.
//! - [`local`] — several nodes in one process (`ferry dev`, benches, tests).
//! - [`error`] — the crate's error and its conversion to `tonic::Status`.
//! - [`inline_stream`] — server streams whose producer runs in the stream.

pub mod admin;
pub mod callback;
pub mod cluster_service;
pub mod config;
pub mod config_service;
pub mod error;
pub mod inline_stream;
pub mod job_report;
pub mod job_service;
pub mod job_spec;
pub mod lease_service;
pub mod local;
pub mod metrics;
pub mod network;
pub mod node;
pub mod peers;
pub mod planner;
pub mod probe_service;
pub mod proposer;
pub mod raft_service;
pub mod registry_service;
pub mod server;
pub mod sessions;
pub mod snapshots;

pub use config::SchedulerConfig;
pub use error::Error;
pub use local::LocalCluster;
pub use server::Scheduler;
