//! sdlm-proto: the generated code of `proto/sdlm/v1` and of the etcd v3 subset in
//! `proto/etcd`, nothing else.

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("sdlm.v1");
}

/// etcd's v3 API (the calls sdlm makes), wire-compatible with etcd 3.4+.
pub mod etcd {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod v3electionpb {
        tonic::include_proto!("v3electionpb");
    }
}

/// The encoded descriptor set of every sdlm.v1 file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sdlm_descriptor.bin"));
