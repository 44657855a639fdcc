//! Any bytes as a ring-buffer record: malformed, truncated and unknown records are errors,
//! never panics; a decoded observation serialises.
#![no_main]

use k8s_ebpf::capture::decode::{decode, record_from_bytes, Clock};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let clock = Clock::now();
    if let Ok(record) = record_from_bytes(data) {
        if let Ok(obs) = decode(&record, &clock) {
            let _ = obs.to_json();
            let _ = obs.watched_port();
        }
    }
});
