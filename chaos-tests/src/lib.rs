//! `ferry-chaos`: Ferry's fault-injection harness. It runs a real cluster
//! (the built `ferry` binary), breaks it on purpose while workloads record
//! what they did, and lets independent checkers decide what still held.
//!
//! Layout:
//! - [`cluster`] — the schedulers and workers under test, as processes to kill,
//!   freeze, restart and cut off.
//! - [`nemesis`] — the faults, on a schedule drawn from the seed.
//! - [`workload`] — clients that record every operation in a [`history`].
//! - [`linearizable`] — the linearizability checker for config keys.
//! - [`watches`] — watchers beside the workload, and their checker.
//! - [`leases`] — leases kept and let go beside it, and their checker.
//! - [`jobs`] — file distribution jobs beside it, and their checker.
//! - [`lazyfs`] — a power-loss filesystem for data directories: unsynced
//!   writes live in memory until a power cut throws them away.
//! - [`upgrade`] — rolling upgrades from an older release under load.
//! - [`scenario`] — the named scenarios, their runs and reports.

pub mod cluster;
pub mod history;
pub mod jobs;
pub mod lazyfs;
pub mod leases;
pub mod linearizable;
pub mod nemesis;
pub mod registry;
pub mod scenario;
pub mod soak;
pub mod upgrade;
pub mod watches;
pub mod workload;
