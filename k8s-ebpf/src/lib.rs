//! k8s-ebpf: who actually reaches etcd, the API server and the kubelets on this node.
//!
//! Data flows one way: [`capture`] (kernel programs, ring buffer, decode) → policy and
//! verdicts → correlation → outputs and metrics. See the README's architecture section.

pub mod capture;
