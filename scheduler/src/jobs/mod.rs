//! File distribution jobs on the leader.
//!
//! - [`spec`] — a job request, checked against the registered workers.
//! - [`submission`] — submit (check, index on the source, log), wait, cancel.
//! - [`report`] — a job as users see it (gRPC, callbacks, `--json`).
//! - [`worker`] — commands to workers and their typed outcomes.
//! - [`sessions`] — worker sessions: liveness, command queues, index waiters.
//! - [`batcher`] — workers' progress into few log entries.
//! - [`planner`] — pure: which target pulls which chunk from whom, and when
//!   to prepare, pack, clean up, fail and call back.
//! - [`driver`] — runs the planner on the leader and carries out its actions.
//! - [`history`] — the leader forgets the oldest finished jobs.

pub mod batcher;
pub mod driver;
pub mod history;
pub mod planner;
pub mod report;
pub mod sessions;
pub mod spec;
pub mod submission;
pub mod worker;
