//! k8s-ebpf: who actually reaches etcd, the API server and the kubelets on this node.
//!
//! Data flows one way: the kernel programs → [`capture`] (ring buffer, decode) →
//! [`identity`] (who the peer and the local process are) → [`policy`] (what is expected) →
//! [`verdict`] → [`correlate`] (windows, counts, port scans) → [`output`] (the [`alert`]
//! records, written one a line), with [`metrics`] alongside.
//!
//! Imports follow the same order: a module uses only those before it in
//! ports, terminal, privilege (foundations) · metrics (plain labels, no stage) · capture ·
//! inventory · identity · policy · verdict · learn · firewall · alert · correlate · output · naming ·
//! daemon · main. When a stage needs a type from a later one, the type is in the wrong
//! place (identity owns the pod queries the policy fills in; profile detection lives with
//! the profiles). `tests/layering.rs` reads the `crate::` paths and fails on an edge
//! against the order.
//!
//! See docs/architecture.md.
pub mod alert;
pub mod capture;
pub mod correlate;
pub mod daemon;
pub mod firewall;
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
