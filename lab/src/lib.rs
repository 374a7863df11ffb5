//! Test hosts for `ferry-bench` and `ferry-chaos`: real processes of the
//! built `ferry` binary ([`procs`]) and, when run as root, a small network
//! of namespaces on a bridge ([`netns`]) so one host's links can be capped
//! or cut. With the `faults` feature, [`faults`]: fail points a test sets
//! at run time inside a `ferry` process, and a gRPC layer that delays and
//! drops calls.

#[cfg(feature = "faults")]
pub mod faults;
pub mod netns;
pub mod procs;
