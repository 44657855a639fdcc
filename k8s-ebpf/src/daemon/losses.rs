//! The kernel's loss counters, watched.

use std::sync::atomic::Ordering;

use tracing::warn;

use crate::{
    capture::{reader::ReaderStats, KernelCounters},
    metrics::Metrics,
};
use k8s_ebpf_common::counter;

/// Turns growth of the kernel's loss counters into metrics and a warning line.
#[derive(Default)]
pub(super) struct DropWatch {
    ringbuf_full: u64,
    decode_errors: u64,
    inbound_lost: u64,
}

impl DropWatch {
    /// Returns whether the kernel lost completed inbound connections since the last call
    /// (then a SYN seen meanwhile may have completed unseen).
    pub(super) fn update(&mut self, c: &KernelCounters, reader: &ReaderStats, m: &Metrics) -> bool {
        for (name, value) in c.named() {
            m.set_kernel_counter(name, value);
        }
        let full = c.get(counter::RINGBUF_FULL);
        if full > self.ringbuf_full {
            warn!(
                lost = full - self.ringbuf_full,
                total = full,
                "ring buffer full: kernel records were dropped (raise --ring-bytes)"
            );
            self.ringbuf_full = full;
        }
        m.set_kernel_counter(
            "listeners_reconciled",
            reader.listeners_reconciled.load(Ordering::Relaxed),
        );
        let records = reader.records.load(Ordering::Relaxed);
        m.ring_records
            .inc_by(records.saturating_sub(m.ring_records.get()));
        let decode = reader.decode_errors.load(Ordering::Relaxed);
        if decode > self.decode_errors {
            m.decode_errors.inc_by(decode - self.decode_errors);
            self.decode_errors = decode;
        }
        // A completed connection lost to a full ring, or an accept the kretprobe missed
        // (its instance pool exhausted by threads parked in accept()).
        let inbound_lost = c.get(counter::INBOUND_LOST) + c.kretprobe_missed;
        let grew = inbound_lost > self.inbound_lost;
        self.inbound_lost = inbound_lost;
        grew
    }
}
