//! Drains the ring buffer (woken by epoll through tokio's `AsyncFd`, no polling) and turns
//! closed dedup windows into summary observations.
//!
//! The kernel writes a record for the first event of a (kind, port, peer) window and only
//! counts the rest. A window's total reaches userspace in one of two ways, whichever comes
//! first: the sweep here finds the window expired in the dedup map, or the kernel opens the
//! next window for the same key and carries the old total in the new record
//! (`prev_count`). `reported` makes sure each window is reported once.

use std::{
    collections::HashMap as StdHashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use aya::maps::{HashMap, MapData, RingBuf};
use k8s_ebpf_common::{ConnRecord, DedupKey, DedupWindow, EventKind, HookKind};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::mpsc,
};
use tracing::warn;

use super::{
    decode::{self, monotonic_ns, Clock},
    CaptureStreams, Observation,
};

/// Userspace-side outcomes of reading, for metrics.
#[derive(Debug, Default)]
pub struct ReaderStats {
    pub records: AtomicU64,
    pub decode_errors: AtomicU64,
    pub window_summaries: AtomicU64,
}

/// Extra time after a window's end before the sweep reads its count, so that an increment
/// racing with the end of the window has landed.
const SWEEP_GRACE: Duration = Duration::from_millis(200);

/// Upper bound on tracked keys, matching the kernel's LRU map size.
const MAX_TRACKED: usize = 16384;

pub struct Reader {
    ring: AsyncFd<RingBuf<MapData>>,
    dedup: HashMap<MapData, DedupKey, DedupWindow>,
    window: Duration,
    clock: Clock,
    /// The first record of each key's current window, to give summaries their context.
    first: StdHashMap<DedupKey, Observation>,
    /// Start of the last window reported per key.
    reported: StdHashMap<DedupKey, u64>,
    stats: Arc<ReaderStats>,
}

impl Reader {
    pub fn new(streams: CaptureStreams, stats: Arc<ReaderStats>) -> std::io::Result<Self> {
        Ok(Self {
            // SAFETY: the RingBuf owns its map fd, which stays open and unchanged for as
            // long as the RingBuf lives, and the AsyncFd owns the RingBuf.
            ring: unsafe { AsyncFd::register_with_interest(streams.ring, Interest::READABLE) }?,
            dedup: streams.dedup,
            window: streams.window,
            clock: Clock::now(),
            first: StdHashMap::new(),
            reported: StdHashMap::new(),
            stats,
        })
    }

    /// Runs until `tx` is closed or `shutdown` fires; drains what is ready before returning.
    pub async fn run(
        mut self,
        tx: mpsc::Sender<Observation>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let sweep_every =
            (self.window / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    let mut guard = guard?;
                    drain(guard.get_inner_mut(), &mut batch);
                    guard.clear_ready();
                }
                _ = sweep.tick(), if !self.window.is_zero() => {
                    let summaries = self.sweep(self.window + SWEEP_GRACE);
                    for o in summaries {
                        if tx.send(o).await.is_err() { return Ok(()); }
                    }
                    continue;
                }
                _ = shutdown.changed() => {
                    drain(self.ring.get_mut(), &mut batch);
                    let mut out = self.process(&mut batch);
                    // Windows still open would otherwise never be reported.
                    out.extend(self.sweep(Duration::ZERO));
                    for o in out {
                        if tx.send(o).await.is_err() { break; }
                    }
                    return Ok(());
                }
            }
            for o in self.process(&mut batch) {
                if tx.send(o).await.is_err() {
                    return Ok(());
                }
            }
        }
    }

    fn process(&mut self, batch: &mut Vec<ConnRecord>) -> Vec<Observation> {
        let mut out = Vec::with_capacity(batch.len());
        for record in batch.drain(..) {
            self.stats.records.fetch_add(1, Ordering::Relaxed);
            let observation = match decode::decode(&record, &self.clock) {
                Ok(o) => o,
                Err(e) => {
                    self.stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, "undecodable record from the kernel");
                    continue;
                }
            };
            if folds(observation.kind) {
                let key = key_of(&record);
                if record.prev_count > 1 {
                    if let Some(summary) = self.summary(
                        &key,
                        record.prev_window_start_ns,
                        u64::from(record.prev_count),
                    ) {
                        out.push(summary);
                    }
                }
                if self.first.len() >= MAX_TRACKED && !self.first.contains_key(&key) {
                    self.first.clear();
                }
                self.first.insert(key, observation.clone());
            }
            out.push(observation);
        }
        out
    }

    /// A summary for the window of `key` that started at `start`, unless already reported.
    fn summary(&mut self, key: &DedupKey, start: u64, count: u64) -> Option<Observation> {
        if self.reported.get(key).is_some_and(|last| *last >= start) {
            return None;
        }
        if self.reported.len() >= MAX_TRACKED && !self.reported.contains_key(key) {
            self.reported.clear();
        }
        self.reported.insert(*key, start);
        self.stats.window_summaries.fetch_add(1, Ordering::Relaxed);
        let mut summary = match self.first.get(key) {
            Some(first) => first.clone(),
            // The first record was lost (ring buffer full); say what the key says.
            None => synthesise(key, self.clock.wall(start)),
        };
        summary.count = count;
        summary.window_summary = true;
        Some(summary)
    }

    /// Reports windows at least `min_age` old that have not been reported yet.
    fn sweep(&mut self, min_age: Duration) -> Vec<Observation> {
        let now = monotonic_ns();
        let window_ns = u64::try_from(min_age.as_nanos()).unwrap_or(u64::MAX);
        let mut closed = Vec::new();
        for entry in self.dedup.iter() {
            match entry {
                Ok((key, w)) if w.count > 1 && now.saturating_sub(w.start_ns) >= window_ns => {
                    closed.push((key, w))
                }
                Ok(_) => {}
                // The map changes under the iterator; a vanished key is not an error.
                Err(_) => break,
            }
        }
        closed
            .into_iter()
            .filter_map(|(key, w)| self.summary(&key, w.start_ns, w.count))
            .collect()
    }
}

fn drain(ring: &mut RingBuf<MapData>, batch: &mut Vec<ConnRecord>) {
    // Bounded per wake-up so a flood cannot starve the sweep or shutdown.
    for _ in 0..4096 {
        let Some(item) = ring.next() else { break };
        match decode::record_from_bytes(&item) {
            Ok(r) => batch.push(r),
            Err(e) => warn!(error = %e, "malformed record from the kernel"),
        }
    }
}

fn folds(kind: EventKind) -> bool {
    !matches!(kind, EventKind::Listen | EventKind::ListenClose)
}

/// The kernel's dedup key for a record (the record's family and addresses are already
/// normalised, as they were when the kernel built the key).
fn key_of(r: &ConnRecord) -> DedupKey {
    let port = if r.kind == EventKind::Outbound as u32 {
        r.remote_port
    } else {
        r.local_port
    };
    DedupKey {
        kind: r.kind,
        port,
        family: r.family,
        peer: r.remote_addr,
    }
}

fn synthesise(key: &DedupKey, at: std::time::SystemTime) -> Observation {
    let kind = EventKind::from_u32(key.kind).unwrap_or(EventKind::Inbound);
    let peer = decode::ip(key.family, &key.peer).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let unspecified = match peer {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let (local, remote) = match kind {
        EventKind::Outbound => (
            SocketAddr::new(unspecified, 0),
            SocketAddr::new(peer, key.port),
        ),
        _ => (
            SocketAddr::new(unspecified, key.port),
            SocketAddr::new(peer, 0),
        ),
    };
    Observation {
        kind,
        hook: HookKind::Tracepoint,
        at,
        local,
        remote,
        process: None,
        netns: 0,
        count: 0,
        window_summary: true,
    }
}
