//! Ferry's wire protocol, package `ferry.v1`.
//!
//! Every `.proto` lives in `proto/ferry/v1/`; this crate compiles them with
//! `protox` (no system `protoc`) and exports the generated messages, clients and
//! servers, plus [`FILE_DESCRIPTOR_SET`] for gRPC server reflection. Domain code
//! converts to and from these types at the edge and does not pass them around.

#![allow(clippy::all, missing_docs)]

/// Generated code for `ferry.v1`.
pub mod v1 {
    tonic::include_proto!("ferry.v1");
}

pub use v1 as pb;

pub mod codec;

/// Encoded `FileDescriptorSet` of every Ferry service, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry_descriptor.bin"));

/// The worker protocol this build speaks: what `WorkerInfo.protocol` says.
/// 2: hashes as bytes, typed pull failures.
pub const PROTOCOL: u32 = 2;

/// Metadata key on "not leader" answers: the leader's `host:port`, for
/// clients and workers to follow.
pub const LEADER_ADDR_HEADER: &str = "x-ferry-leader-addr";

/// Metadata key a scheduler sets on a call it forwards to the leader; such a
/// call is never forwarded again.
pub const FORWARDED_HEADER: &str = "x-ferry-forwarded";

/// The leader a "not leader" status names, if any.
pub fn leader_hint(status: &tonic::Status) -> Option<&str> {
    status.metadata().get(LEADER_ADDR_HEADER).and_then(|v| v.to_str().ok())
}
