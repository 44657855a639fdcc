//! Library face of the kernel-program crate; the programs live in main.rs and only
//! build for the bpf target. This empty lib lets `k8s-ebpf/build.rs` depend on the crate
//! so that cargo rebuilds the daemon when the programs change.
#![no_std]
