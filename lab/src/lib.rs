//! Test hosts for `ferry-bench` and `ferry-chaos`: real processes of the
//! built `ferry` binary ([`procs`]) and, when run as root, a small network
//! of namespaces on a bridge ([`netns`]) so one host's links can be capped
//! or cut.

pub mod netns;
pub mod procs;
