//! File distribution jobs on the leader.
//!
//! - [`spec`] — checking a job request against the registered workers.
//! - [`report`] — a job as users see it (reports, manifests, callback JSON).
//! - [`sessions`] — worker sessions: liveness, command queues, index waiters.
//! - [`batcher`] — workers' progress into few log entries.
//! - [`planner`] — which target pulls which chunk from whom, and when to
//!   prepare, pack, cancel, fail and call back.

pub mod batcher;
pub mod planner;
pub mod report;
pub mod sessions;
pub mod spec;
