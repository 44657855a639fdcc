//! Drains the ring buffer (woken by epoll through tokio's `AsyncFd`, no polling) and turns
//! closed dedup windows into summary observations.
//!
//! The kernel writes a record for the first event of a (kind, port, peer) window and only
//! counts the rest. A window's total reaches userspace in one of two ways, whichever comes
//! first: the sweep here finds the window expired in the dedup map, or the kernel opens the
//! next window for the same key and carries the old total in the new record
//! (`prev_count`). `reported` makes sure each window is reported once.
//!
//! The reader never stalls: a wake-up reads a bounded batch (so a flood cannot starve the
//! sweep or shutdown) and, when the batch was full, keeps the descriptor marked ready so
//! the next turn of the loop reads on. The ring buffer's epoll only wakes a reader that
//! has caught up, so clearing readiness with records left would wait forever. Shutdown
//! reads until the ring is empty.
//!
//! Listener records are the kernel's reports of a (namespace, address, port) going from no
//! listening socket to some and back, at most one a second per key (a churning listener is
//! folded in the kernel). The sweep reconciles the rest: a key whose last change was
//! folded, and whose state in the kernel's listener table differs from the last record,
//! becomes a listen or listen-close observation of its own, so the inventory ends exact.
//!
//! The bookkeeping maps are bounded by the kernel's dedup map: an entry lives only while
//! the kernel still holds a window with that start (each sweep prunes the rest), so
//! nothing is cleared wholesale and no summary loses its first record's context.

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
use k8s_ebpf_common::{
    ConnRecord, DedupKey, DedupWindow, EventKind, HookKind, ListenKey, ListenState, AF_INET,
    AF_INET6,
};
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
    /// Listener changes the kernel folded, reported by the sweep from its listener table.
    pub listeners_reconciled: AtomicU64,
}

/// Extra time after a window's end before the sweep reads its count, so that an increment
/// racing with the end of the window has landed.
const SWEEP_GRACE: Duration = Duration::from_millis(200);

/// `bpf_map_update_elem` flag: only if the key is new.
const BPF_NOEXIST: u64 = 1;

/// Records read per wake-up before the sweep and shutdown get a turn.
const BATCH: usize = 4096;

/// Records read at shutdown at most: the ring's capacity many times over (a producer that
/// never stops must not hold the exit forever).
const SHUTDOWN_MAX: usize = 1 << 22;

pub struct Reader {
    ring: AsyncFd<RingBuf<MapData>>,
    dedup: HashMap<MapData, DedupKey, DedupWindow>,
    window: Duration,
    clock: Clock,
    /// The first record of each key's current window (and that window's start), to give
    /// summaries their context.
    first: StdHashMap<DedupKey, (u64, Observation)>,
    /// Start of the last window reported per key.
    reported: StdHashMap<DedupKey, u64>,
    listeners: HashMap<MapData, ListenKey, ListenState>,
    /// Per listener key: whether the last observation said it listens, and the last
    /// listen observation (its process, for a reconciled one).
    listen_known: StdHashMap<ListenKey, (bool, Option<Observation>)>,
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
            listeners: streams.listeners,
            listen_known: StdHashMap::new(),
            stats,
        })
    }

    /// Tells the kernel's listener table about the sockets already listening in namespace
    /// `netns` when the daemon started (from a sock_diag scan), so that closing one of
    /// several `SO_REUSEPORT` listeners is not taken for the port closing.
    pub fn seed_listeners(
        &mut self,
        netns: u32,
        sockets: impl IntoIterator<Item = (SocketAddr, u64)>,
    ) {
        for (address, count) in sockets {
            let key = listen_key(netns, address);
            let state = ListenState {
                sockets: i64::try_from(count).unwrap_or(i64::MAX),
                ..ListenState::default()
            };
            // Only where the kernel has not seen the key yet: its own counts are exact.
            match self.listeners.insert(key, state, BPF_NOEXIST) {
                Ok(()) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => warn!(error = %e, %address, "cannot seed the kernel's listener table"),
            }
            self.listen_known.insert(key, (true, None));
        }
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
                    if drain(guard.get_inner_mut(), &mut batch, BATCH) < BATCH {
                        // Caught up: the next record will wake us.
                        guard.clear_ready();
                    }
                }
                _ = sweep.tick() => {
                    let mut summaries = self.reconcile_listeners();
                    if !self.window.is_zero() {
                        summaries.extend(self.sweep(self.window + SWEEP_GRACE));
                    }
                    for o in summaries {
                        if tx.send(o).await.is_err() { return Ok(()); }
                    }
                    continue;
                }
                _ = shutdown.changed() => {
                    drain(self.ring.get_mut(), &mut batch, SHUTDOWN_MAX);
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
        // Per batch, so that a step of the wall clock (NTP) shows in the next records.
        self.clock = Clock::now();
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
            if !folds(observation.kind) {
                let key = ListenKey {
                    netns: record.netns,
                    port: record.local_port,
                    family: record.family,
                    addr: record.local_addr,
                };
                let listening = observation.kind == EventKind::Listen;
                self.listen_known
                    .insert(key, (listening, listening.then(|| observation.clone())));
            } else {
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
                self.first.insert(key, (record.ts_ns, observation.clone()));
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
        self.reported.insert(*key, start);
        self.stats.window_summaries.fetch_add(1, Ordering::Relaxed);
        let mut summary = match self.first.get(key) {
            Some((first_start, first)) if *first_start == start => first.clone(),
            // The first record was lost (ring buffer full); say what the key says.
            _ => synthesise(key, self.clock.wall(start)),
        };
        summary.count = count;
        summary.window_summary = true;
        Some(summary)
    }

    /// Listener changes the kernel folded: every key whose state in the kernel's table
    /// differs from what the last observation said, once its last change is
    /// [`SWEEP_GRACE`] old (a record it did write has been read by then).
    fn reconcile_listeners(&mut self) -> Vec<Observation> {
        let now = monotonic_ns();
        let grace = u64::try_from(SWEEP_GRACE.as_nanos()).unwrap_or(u64::MAX);
        let mut changed = Vec::new();
        let mut live = std::collections::HashSet::new();
        let mut complete = true;
        for entry in self.listeners.iter() {
            let Ok((key, state)) = entry else {
                complete = false;
                break;
            };
            live.insert(key);
            let known = self.listen_known.get(&key).map(|(l, _)| *l);
            if now.saturating_sub(state.changed_ns) < grace
                || known.unwrap_or(false) == state.listening()
            {
                continue;
            }
            changed.push((key, state));
        }
        if complete {
            self.listen_known.retain(|key, _| live.contains(key));
        }
        let mut out = Vec::with_capacity(changed.len());
        for (key, state) in changed {
            let listening = state.listening();
            let at = self.clock.wall(state.changed_ns);
            let last = self.listen_known.remove(&key).and_then(|(_, obs)| obs);
            let mut obs = last.unwrap_or_else(|| listener_observation(&key, at));
            obs.kind = if listening {
                EventKind::Listen
            } else {
                EventKind::ListenClose
            };
            obs.at = at;
            self.listen_known
                .insert(key, (listening, listening.then(|| obs.clone())));
            self.stats
                .listeners_reconciled
                .fetch_add(1, Ordering::Relaxed);
            out.push(obs);
        }
        out
    }

    /// Reports windows at least `min_age` old that have not been reported yet.
    fn sweep(&mut self, min_age: Duration) -> Vec<Observation> {
        let now = monotonic_ns();
        let window_ns = u64::try_from(min_age.as_nanos()).unwrap_or(u64::MAX);
        let mut closed = Vec::new();
        let mut live = StdHashMap::with_capacity(self.first.len().max(self.reported.len()));
        let mut complete = true;
        for entry in self.dedup.iter() {
            match entry {
                Ok((key, w)) => {
                    live.insert(key, w.start_ns);
                    if w.count > 1 && now.saturating_sub(w.start_ns) >= window_ns {
                        closed.push((key, w));
                    }
                }
                // The map changes under the iterator; a vanished key is not an error.
                Err(_) => {
                    complete = false;
                    break;
                }
            }
        }
        let out = closed
            .into_iter()
            .filter_map(|(key, w)| self.summary(&key, w.start_ns, w.count))
            .collect();
        if complete {
            // Keep only what a window the kernel still holds can need: its first record
            // (until its summary is out) and the start of the last window reported.
            let reported = &self.reported;
            self.first.retain(|key, (start, _)| {
                live.get(key) == Some(start) && reported.get(key) != Some(start)
            });
            self.reported
                .retain(|key, start| live.get(key) == Some(start));
        }
        out
    }
}

/// Reads at most `max` records; returns how many it read.
fn drain(ring: &mut RingBuf<MapData>, batch: &mut Vec<ConnRecord>, max: usize) -> usize {
    let mut read = 0;
    while read < max {
        let Some(item) = ring.next() else { break };
        read += 1;
        match decode::record_from_bytes(&item) {
            Ok(r) => batch.push(r),
            Err(e) => warn!(error = %e, "malformed record from the kernel"),
        }
    }
    read
}

fn folds(kind: EventKind) -> bool {
    !matches!(kind, EventKind::Listen | EventKind::ListenClose)
}

/// The kernel's dedup key for a record (the record's family and addresses are already
/// normalised, as they were when the kernel built the key).
fn key_of(r: &ConnRecord) -> DedupKey {
    let outbound = r.kind == EventKind::Outbound as u32;
    DedupKey {
        kind: r.kind,
        port: if outbound {
            r.remote_port
        } else {
            r.local_port
        },
        family: r.family,
        netns: r.netns,
        tgid: if outbound { r.tgid } else { 0 },
        cgroup_id: if outbound { r.cgroup_id } else { 0 },
        peer: r.remote_addr,
    }
}

/// The kernel's listener-table key for a listening address.
pub(super) fn listen_key(netns: u32, address: SocketAddr) -> ListenKey {
    let mut addr = [0u8; 16];
    let family = match address.ip() {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            AF_INET
        }
        IpAddr::V6(v6) => {
            addr = v6.octets();
            AF_INET6
        }
    };
    ListenKey {
        netns,
        port: address.port(),
        family,
        addr,
    }
}

/// A listener observation for a key no record described.
fn listener_observation(key: &ListenKey, at: std::time::SystemTime) -> Observation {
    let ip = decode::ip(key.family, &key.addr).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let unspecified = match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    Observation {
        kind: EventKind::Listen,
        hook: HookKind::Tracepoint,
        at,
        local: SocketAddr::new(ip, key.port),
        remote: SocketAddr::new(unspecified, 0),
        process: None,
        netns: key.netns,
        count: 1,
        window_summary: false,
        forward: None,
    }
}

fn synthesise(key: &DedupKey, at: std::time::SystemTime) -> Observation {
    let kind = EventKind::from_u32(key.kind).unwrap_or(EventKind::Inbound);
    let hook = match kind {
        EventKind::Syn => HookKind::SkLookup,
        _ => HookKind::Tracepoint,
    };
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
        hook,
        at,
        local,
        remote,
        process: None,
        netns: key.netns,
        count: 0,
        window_summary: true,
        forward: None,
    }
}
