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
//! - [`clock`] — the leader's time.
//! - [`raft`] — the Raft node, its network, group commit, snapshots.
//! - [`grpc`] — the gRPC edge: one thin file per service.
//! - [`jobs`] — file distribution: spec checks, sessions, planner.
//! - [`leases`] — leases and their clock on the leader.
//! - [`probes`] — probe definitions, results, rankings, staleness, alerts.
//! - [`registry`] — service instances bound to leases, the protect threshold.
//! - [`stream`] — server streams whose producer runs in the stream.
//! - [`watch`] — config watches from a revision, through compaction.
//! - [`webhook`] — job callbacks and probe alerts over HTTP(S).
//! - [`admin`], [`metrics`] — `/metrics`, `/healthz`, `/readyz`.
//! - [`local`] — several nodes in one process (`ferry dev`, benches, tests).
//! - [`error`] — the crate's error and its conversion to `tonic::Status`.

pub mod admin;
pub mod clock;
pub mod config;
pub mod error;
pub mod grpc;
pub mod jobs;
pub mod leases;
pub mod local;
pub mod metrics;
pub mod probes;
pub mod raft;
pub mod registry;
pub mod server;
pub mod stream;
pub mod watch;
pub mod webhook;

pub use config::SchedulerConfig;
pub use error::Error;
pub use local::LocalCluster;
pub use server::Scheduler;
