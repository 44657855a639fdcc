//! k8s-ebpf: who actually reaches etcd, the API server and the kubelets on this node.
//!
//! Data flows one way: [`capture`] (kernel programs, ring buffer, decode) → [`verdict`]
//! under the [`policy`] (built on the [`ports`] table, peers named by [`identity`]) → [`correlate`] (windows, counts,
//! port scans) → [`alert`] records written by [`output`], with [`metrics`] alongside.
//! See docs/architecture.md.

pub mod alert;
pub mod capture;
pub mod correlate;
pub mod daemon;
pub mod identity;
pub mod inventory;
pub mod learn;
pub mod metrics;
pub mod naming;
pub mod output;
pub mod policy;
pub mod ports;
pub mod privilege;
pub mod terminal;
pub mod verdict;
