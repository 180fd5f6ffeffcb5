//! The gRPC protocol between the fedsb coordinator and its clients, generated from
//! `proto/fedsb/v1/federation.proto`. Only the binaries' transport layers use these types; the library
//! (`fedsb-common`) never sees them.
#![allow(missing_docs, clippy::all)]

/// Version 1 of the protocol.
pub mod v1 {
    tonic::include_proto!("fedsb.v1");
}
