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

/// Encoded `FileDescriptorSet` of every Ferry service, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry_descriptor.bin"));
