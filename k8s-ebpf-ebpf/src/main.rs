//! k8s-ebpf kernel programs.
//!
//! Every program funnels into [`observe`]: drop events on unwatched ports (one array
//! lookup) or other network namespaces, fold repeats of the same (kind, port, peer,
//! namespace, and for outbound the process) into the dedup window, and write one
//! [`ConnRecord`] per first sighting into the ring buffer. Every event on a watched port
//! ends in exactly one counter: emitted, deduplicated or ringbuf_full. A window only opens
//! once its record has room in the ring buffer, so a full ring never hides a peer: the
//! lost event is counted, and the peer's next event tries again.
//!
//! Hooks: `sk_lookup` on the watched namespace sees every segment that looks for a
//! listener (each SYN, open port or closed: half-open scans and refused attempts);
//! `tp_btf` (or the classic tracepoint) on `inet_sock_set_state` sees connects, listens
//! and completed handshakes; `fexit`/`kretprobe` on `inet_csk_accept` name the accepting
//! process where the kernel allows them.
//!
//! Kernel struct and tracepoint field offsets are not compiled in: userspace reads them
//! from the running kernel's BTF and tracepoint format files and passes them in
//! [`OFFSETS`].
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Rust's bpf target has no compare-and-swap, so `AtomicU64::fetch_add` is not offered;
// the intrinsic lowers to the BPF atomic add instruction that kernels have had since 3.18.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod programs {
    use core::intrinsics::{atomic_xadd, AtomicOrdering};

    use aya_ebpf::{
        bindings::BPF_NOEXIST,
        helpers::{
            bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
            bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
        },
        macros::{btf_tracepoint, fexit, kretprobe, map, sk_lookup, tracepoint},
        maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
        programs::{
            BtfTracePointContext, FExitContext, RetProbeContext, SkLookupContext, TracePointContext,
        },
        Global,
    };
    use k8s_ebpf_common::{
        counter, inbound_source, port_flag, setting, ConnRecord, DedupKey, DedupWindow, EventKind,
        HookKind, KernelOffsets, ListenKey, ListenState, AF_INET, AF_INET6, COMM_LEN,
        SCOPE_PEERS_MAX,
    };

    /// Offsets into kernel structs and tracepoint records, from the running kernel.
    #[unsafe(no_mangle)]
    static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
        skc_daddr: 0,
        skc_rcv_saddr: 0,
        skc_dport: 0,
        skc_num: 0,
        skc_family: 0,
        skc_net: 0,
        skc_v6_daddr: 0,
        skc_v6_rcv_saddr: 0,
        net_ns_inum: 0,
        tp_skaddr: 0,
        tp_oldstate: 0,
        tp_newstate: 0,
        tp_sport: 0,
        tp_dport: 0,
        tp_family: 0,
        tp_protocol: 0,
        tp_saddr: 0,
        tp_daddr: 0,
        tp_saddr_v6: 0,
        tp_daddr_v6: 0,
        sk_protocol: 0,
        task_mm: 0,
        mm_exe_file: 0,
        file_f_inode: 0,
        inode_i_ino: 0,
        inode_i_sb: 0,
        sb_s_dev: 0,
    });

    /// Network-namespace inode to watch; 0 watches every namespace.
    #[unsafe(no_mangle)]
    static TARGET_NETNS: Global<u32> = Global::new(0);

    /// Inode of the namespace the `sk_lookup` program is attached to (its context does
    /// not say).
    #[unsafe(no_mangle)]
    static SYN_NETNS: Global<u32> = Global::new(0);

    /// Under `--netns all` (`TARGET_NETNS` 0): the node's own namespace. Records from any
    /// other are a pod's, and only some of them can matter (see [`in_scope`]).
    #[unsafe(no_mangle)]
    static HOST_NETNS: Global<u32> = Global::new(0);

    /// Length of the dedup window in nanoseconds; 0 disables folding.
    #[unsafe(no_mangle)]
    static DEDUP_WINDOW_NS: Global<u64> = Global::new(0);

    /// At most one listener record per (namespace, address, port) in this long; changes
    /// in between are folded and reconciled by userspace from `LISTENERS`.
    #[unsafe(no_mangle)]
    static LISTEN_FOLD_NS: Global<u64> = Global::new(1_000_000_000);

    /// The ring buffer's size in bytes (set by the loader with the map's size).
    #[unsafe(no_mangle)]
    static RING_BYTES: Global<u64> = Global::new(256 * 1024);

    /// Records for userspace. Size set by the loader.
    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

    /// A listener-table entry before its first event.
    static NO_LISTENER: ListenState = ListenState {
        sockets: 0,
        changed_ns: 0,
        emitted_ns: 0,
    };

    /// How many sockets listen on each (namespace, address, port): only the changes
    /// between none and some become records, so listener churn costs the ring at most one
    /// record per key and fold interval. LRU: an evicted key comes back with a count of
    /// zero, and a close on it still reads as "none left".
    #[map]
    static LISTENERS: LruHashMap<ListenKey, ListenState> = LruHashMap::with_max_entries(16384, 0);

    /// Indexed by port: non-zero when the port is watched. An array lookup is the cheapest
    /// filter the kernel offers, and it is the only work unwatched traffic costs.
    #[map]
    static WATCHED_PORTS: Array<u8> = Array::with_max_entries(65536, 0);

    #[map]
    static DEDUP: LruHashMap<DedupKey, DedupWindow> = LruHashMap::with_max_entries(16384, 0);

    #[map]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

    #[map]
    static SETTINGS: Array<u32> = Array::with_max_entries(setting::COUNT, 0);

    /// Under `--netns all`: the addresses (16 bytes, IPv4 in the first four) whose
    /// connections from a pod are judged — nodes, API servers, the `kubernetes` Service.
    /// Filled by userspace; used once `setting::POD_OUTBOUND_SCOPE` says it is complete.
    #[map]
    static SCOPE_PEERS: HashMap<[u8; 16], u8> = HashMap::with_max_entries(SCOPE_PEERS_MAX, 0);

    // include/net/tcp_states.h
    const TCP_ESTABLISHED: i32 = 1;
    const TCP_SYN_SENT: i32 = 2;
    const TCP_SYN_RECV: i32 = 3;
    const TCP_CLOSE: i32 = 7;
    const TCP_LISTEN: i32 = 10;
    const IPPROTO_TCP: u16 = 6;

    #[inline(always)]
    fn count(index: u32) {
        if let Some(slot) = COUNTERS.get_ptr_mut(index) {
            // Per-CPU slot, but a program of another type (sk_lookup in softirq) can
            // interrupt a tracing program on the same CPU between its load and store: an
            // atomic add keeps the count exact.
            add_atomic(unsafe { &mut *slot });
        }
    }

    #[inline(always)]
    fn is_watched(port: u16) -> bool {
        matches!(WATCHED_PORTS.get(u32::from(port)), Some(v) if *v & port_flag::WATCHED != 0)
    }

    /// Under `--netns all`, whether a record from `ev`'s namespace can matter to the
    /// verdict. A pod's listeners and the connections into a pod are judged only on
    /// ports whose rule says `netns: all`; everything else a pod does on its own loopback
    /// or network would only be dropped by userspace, after costing the node's ring.
    /// A pod's outbound connections stay when they reach an address in `SCOPE_PEERS` (a
    /// node, an API server), or while userspace has not filled it.
    #[inline(always)]
    // The address by reference on purpose: a copy would be one more 16-byte stack slot
    // for the verifier's combined limit (see `open_window`).
    #[allow(clippy::needless_borrows_for_generic_args)]
    fn in_scope(ev: &Event) -> bool {
        let host = HOST_NETNS.load();
        if host == 0 || ev.netns == host || ev.netns == 0 {
            return true;
        }
        let pod_scope = |port: u16| {
            matches!(
                WATCHED_PORTS.get(u32::from(port)),
                Some(v) if *v & port_flag::POD_SCOPE != 0
            )
        };
        match ev.kind {
            EventKind::Listen | EventKind::ListenClose | EventKind::Inbound => {
                pod_scope(ev.local_port)
            }
            EventKind::Outbound => {
                pod_scope(ev.remote_port)
                    || !matches!(SETTINGS.get(setting::POD_OUTBOUND_SCOPE), Some(v) if *v != 0)
                    || unsafe { SCOPE_PEERS.get(&ev.remote_addr) }.is_some()
            }
            _ => true,
        }
    }

    // `bpf_ringbuf_query` flags (uapi).
    const BPF_RB_AVAIL_DATA: u64 = 0;

    /// Whether the ring has room for a record of this kind without eating into the
    /// headroom kept for what an attacker cannot make cheaply: listener records stop at
    /// half full, SYNs (spoofable) and pods' outbound records at three quarters; completed
    /// inbound connections and the node's own outbound ones may use it all.
    #[inline(always)]
    fn within_headroom(ev: &Event) -> bool {
        let size = RING_BYTES.load();
        let limit = match ev.kind {
            EventKind::Listen | EventKind::ListenClose => size / 2,
            EventKind::Syn => size / 4 * 3,
            EventKind::Outbound if ev.netns != HOST_NETNS.load() && HOST_NETNS.load() != 0 => {
                size / 4 * 3
            }
            _ => return true,
        };
        EVENTS.query(BPF_RB_AVAIL_DATA) < limit
    }

    /// Counts a listen or listen-close event on its (namespace, address, port); returns
    /// whether it is a change between none and some that may be reported now. A change
    /// inside the fold interval is left for userspace to reconcile; an event that changes
    /// nothing (a second `SO_REUSEPORT` listener, or closing one of two) never is one.
    #[inline(always)]
    // By reference on purpose, as in `open_window`: fewer stack copies for the verifier.
    #[allow(clippy::needless_borrows_for_generic_args)]
    fn listener_change(ev: &Event, now: u64) -> bool {
        let key = ListenKey {
            netns: ev.netns,
            port: ev.local_port,
            family: ev.family,
            addr: ev.local_addr,
        };
        let slot = match LISTENERS.get_ptr_mut(&key) {
            Some(slot) => slot,
            None => {
                // From read-only global data, not the stack: [`observe`]'s frame has to fit
                // the verifier's 512-byte limit with the `tp_btf` program's on 5.10 and 6.1.
                // Only if still absent: another CPU's first event on the key may have
                // inserted it a moment ago, and replacing that entry would lose its count.
                let inserted = LISTENERS.insert(&key, &NO_LISTENER, u64::from(BPF_NOEXIST));
                match LISTENERS.get_ptr_mut(&key) {
                    Some(slot) => slot,
                    None => {
                        if inserted.is_err() {
                            count(counter::DEDUP_UPDATE_ERRORS);
                        }
                        return true;
                    }
                }
            }
        };
        let state = unsafe { &mut *slot };
        // One counter, changed only by atomic adds and read once after this event's own
        // add: every value it takes is the number of sockets counted so far, never below
        // zero while each close follows its own listen. Two counters read one after the
        // other could be caught between another CPU's listen and close, and a correction
        // written back over a concurrent add would leave a closed port listening forever.
        if ev.kind == EventKind::Listen {
            add_signed(&mut state.sockets, 1);
            if read_count(&state.sockets) != 1 {
                return false;
            }
        } else {
            add_signed(&mut state.sockets, -1);
            let left = read_count(&state.sockets);
            if left < 0 {
                // A listener the table never counted (open before the daemon seeded the
                // key, or an evicted key): undo this close's own decrement, so the count
                // stays what the table knows, and report the port closed.
                add_signed(&mut state.sockets, 1);
            } else if left != 0 {
                return false;
            }
        }
        state.changed_ns = now;
        if state.emitted_ns != 0 && now.wrapping_sub(state.emitted_ns) < LISTEN_FOLD_NS.load() {
            return false;
        }
        state.emitted_ns = now;
        true
    }

    /// What a hook saw, before filtering.
    struct Event {
        kind: EventKind,
        hook: HookKind,
        family: u16,
        local_port: u16,
        remote_port: u16,
        local_addr: [u8; 16],
        remote_addr: [u8; 16],
        netns: u32,
        /// Whether the hook runs in the context of the process that owns the socket.
        process_context: bool,
    }

    impl Event {
        fn watched_port(&self) -> u16 {
            match self.kind {
                EventKind::Outbound => self.remote_port,
                _ => self.local_port,
            }
        }
    }

    /// `::ffff:a.b.c.d` → `a.b.c.d` (in place); returns whether the address was mapped.
    #[inline(always)]
    fn unmap_v4(addr: &mut [u8; 16]) -> bool {
        let mapped = addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff;
        if mapped {
            addr.copy_within(12..16, 0);
            addr[4..].fill(0);
        }
        mapped
    }

    fn normalise(ev: &mut Event) {
        if ev.family == AF_INET6 {
            let mut local = ev.local_addr;
            let mut remote = ev.remote_addr;
            // A v4 peer on a dual-stack socket has both ends v4-mapped.
            if unmap_v4(&mut remote) && unmap_v4(&mut local) {
                ev.family = AF_INET;
                ev.local_addr = local;
                ev.remote_addr = remote;
            }
        }
    }

    /// One more event in a window another CPU may be counting at the same time.
    #[inline(always)]
    fn add_atomic(count: &mut u64) {
        // SAFETY: `count` is a valid, aligned u64 in map memory for this program run.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, 1) };
    }

    /// A listener count moved by `delta` while other CPUs may move it too.
    #[inline(always)]
    fn add_signed(count: &mut i64, delta: i64) {
        // SAFETY: `count` is a valid, aligned i64 in map memory for this program run.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(count, delta) };
    }

    /// One load of a counter other CPUs add to (not merged with or split from other loads).
    #[inline(always)]
    fn read_count(count: &i64) -> i64 {
        // SAFETY: `count` is a valid, aligned i64 in map memory for this program run.
        unsafe { core::ptr::read_volatile(count) }
    }

    /// The dedup key of an event: everything its verdict depends on.
    #[inline(always)]
    fn dedup_key(ev: &Event, tgid: u32, cgroup_id: u64) -> DedupKey {
        let outbound = ev.kind == EventKind::Outbound;
        DedupKey {
            kind: ev.kind as u32,
            port: ev.watched_port(),
            family: ev.family,
            netns: ev.netns,
            tgid: if outbound { tgid } else { 0 },
            cgroup_id: if outbound { cgroup_id } else { 0 },
            peer: ev.remote_addr,
        }
    }

    /// Whether the event falls into an open window (and is counted there).
    #[inline(always)]
    /// A SYN from one of the peer's last four remote ports is that attempt's connection
    /// looked up again (the final ACK of a SYN-cookie handshake, or a retransmitted SYN): folded,
    /// not counted as an attempt.
    fn fold_into_open_window(key: &DedupKey, now: u64, window: u64, remote_port: u16) -> bool {
        if let Some(slot) = DEDUP.get_ptr_mut(key) {
            let slot = unsafe { &mut *slot };
            if now.wrapping_sub(slot.start_ns) < window {
                count(counter::DEDUPLICATED);
                if key.kind == EventKind::Syn as u32 {
                    let p = &mut slot.recent_ports;
                    if p[0] == remote_port
                        || p[1] == remote_port
                        || p[2] == remote_port
                        || p[3] == remote_port
                    {
                        count(counter::REPEATED);
                        return true;
                    }
                    *p = [remote_port, p[0], p[1], p[2]];
                }
                add_atomic(&mut slot.count);
                return true;
            }
        }
        false
    }

    /// Opens the window whose first record is already reserved. Returns `None` when
    /// another CPU opened it first (the event folds into that one), else the previous
    /// window's (count, start) for the record (zeros when there was none).
    #[inline(always)]
    fn open_window(key: &DedupKey, now: u64, window: u64, remote_port: u16) -> Option<(u32, u64)> {
        if let Some(slot) = DEDUP.get_ptr_mut(key) {
            let slot = unsafe { &mut *slot };
            if now.wrapping_sub(slot.start_ns) < window {
                add_atomic(&mut slot.count);
                return None;
            }
            // The window closed: open a new one, and tell userspace what the old one held
            // in case it has not swept it yet.
            let prev = (slot.count.min(u64::from(u32::MAX)) as u32, slot.start_ns);
            slot.start_ns = now;
            slot.count = 1;
            slot.recent_ports = [remote_port, 0, 0, 0];
            return Some(prev);
        }
        let fresh = DedupWindow {
            start_ns: now,
            count: 1,
            recent_ports: [remote_port, 0, 0, 0],
        };
        // By reference on purpose: passing the value makes LLVM keep another copy on the
        // stack, and the verifier's combined limit (512 bytes over the call chain) is then
        // exceeded (544) on 5.10 and 6.1.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let inserted = DEDUP.insert(key, &fresh, u64::from(BPF_NOEXIST));
        if inserted.is_err() {
            // Lost a race with another CPU that opened the same window: fold into it.
            if let Some(slot) = DEDUP.get_ptr_mut(key) {
                add_atomic(unsafe { &mut (*slot).count });
                return None;
            }
            count(counter::DEDUP_UPDATE_ERRORS);
        }
        Some((0, 0))
    }

    /// Everything after the port filter, which each hook applies first because it is the
    /// cheapest way out for unwatched traffic: for the tracing programs, whose events may
    /// come in process context.
    fn observe(ev: &mut Event) {
        observe_in::<true>(ev)
    }

    /// [`observe`] for the `sk_lookup` program, inlined into it: no process-context helper
    /// call is in its code at all (5.10 and 6.1 refuse one in an `sk_lookup` program, even
    /// unreachable), and no subprogram call (5.10 cannot type its pointer argument).
    #[inline(always)]
    fn observe_softirq(ev: &mut Event) {
        observe_in::<false>(ev)
    }

    /// `PROCESS`: whether the program may call the helpers that read the current task.
    #[inline(always)]
    /// By reference: the caller's event is not copied into this frame (the verifier's
    /// 512-byte limit over the call chain is near on 5.10 and 6.1).
    fn observe_in<const PROCESS: bool>(ev: &mut Event) {
        let target = TARGET_NETNS.load();
        if target != 0 && ev.netns != target {
            count(counter::FILTERED);
            return;
        }
        // Before the scope check: a pod's IPv4 peer on a dual-stack socket is looked up
        // in `SCOPE_PEERS` as IPv4.
        normalise(ev);
        if target == 0 && !in_scope(ev) {
            count(counter::OUT_OF_SCOPE);
            return;
        }
        count(counter::SEEN);
        let now = unsafe { bpf_ktime_get_ns() };
        let listener = matches!(ev.kind, EventKind::Listen | EventKind::ListenClose);
        if listener && !listener_change(ev, now) {
            count(counter::DEDUPLICATED);
            return;
        }
        let (pid, tgid, cgroup_id) = if PROCESS && ev.process_context {
            let id = bpf_get_current_pid_tgid();
            (id as u32, (id >> 32) as u32, unsafe {
                bpf_get_current_cgroup_id()
            })
        } else {
            (0, 0, 0)
        };
        let window = DEDUP_WINDOW_NS.load();
        let folds = window != 0 && !listener;
        let key = dedup_key(ev, tgid, cgroup_id);
        if folds && fold_into_open_window(&key, now, window, ev.remote_port) {
            return;
        }
        if !within_headroom(ev) {
            count(counter::RINGBUF_FULL);
            count(counter::RINGBUF_SHED);
            return;
        }
        // Reserve before opening a window: a window whose first record was lost would hide
        // the peer until it closed.
        let Some(mut entry) = EVENTS.reserve::<ConnRecord>(0) else {
            count(counter::RINGBUF_FULL);
            if ev.kind == EventKind::Inbound {
                count(counter::INBOUND_LOST);
            }
            return;
        };
        let (prev_count, prev_window_start_ns) = if folds {
            match open_window(&key, now, window, ev.remote_port) {
                Some(prev) => prev,
                None => {
                    entry.discard(0);
                    count(counter::DEDUPLICATED);
                    return;
                }
            }
        } else {
            (0, 0)
        };
        // The task name as two words: a zeroed byte array would be a `memset` call.
        let (comm, (exe_dev, exe_ino)) = if PROCESS && ev.process_context {
            let comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
            // SAFETY: 16 bytes read as two u64 (unaligned: a byte array's alignment is 1).
            let words = unsafe { core::ptr::read_unaligned(comm.as_ptr() as *const [u64; 2]) };
            (words, unsafe { current_executable() })
        } else {
            ([0u64; 2], (0, 0))
        };
        // Field by field, volatile: where the fields are constant zeros (the `sk_lookup`
        // program's), LLVM would otherwise merge their stores into a call to `memset`, a
        // subprogram with a pointer argument that Linux 5.10's verifier refuses.
        let r = entry.as_mut_ptr();
        // SAFETY: `r` points at the reserved, writable record; every field is written.
        unsafe {
            use core::ptr::{addr_of_mut, write_volatile as put};
            put(addr_of_mut!((*r).kind), ev.kind as u32);
            put(addr_of_mut!((*r).hook), ev.hook as u32);
            put(addr_of_mut!((*r).ts_ns), now);
            put(addr_of_mut!((*r).pid), pid);
            put(addr_of_mut!((*r).tgid), tgid);
            put(addr_of_mut!((*r).cgroup_id), cgroup_id);
            put(addr_of_mut!((*r).netns), ev.netns);
            put(addr_of_mut!((*r).family), ev.family);
            put(addr_of_mut!((*r).local_port), ev.local_port);
            put(addr_of_mut!((*r).remote_port), ev.remote_port);
            put(addr_of_mut!((*r)._pad), 0);
            put(addr_of_mut!((*r).prev_count), prev_count);
            put(
                addr_of_mut!((*r).prev_window_start_ns),
                prev_window_start_ns,
            );
            put(addr_of_mut!((*r).local_addr), ev.local_addr);
            put(addr_of_mut!((*r).remote_addr), ev.remote_addr);
            // `comm` is at offset 88 of a ring record (8-aligned): two aligned words.
            let comm_words = addr_of_mut!((*r).comm) as *mut u64;
            put(comm_words, comm[0]);
            put(comm_words.add(1), comm[1]);
            put(addr_of_mut!((*r).exe_ino), exe_ino);
            put(addr_of_mut!((*r).exe_dev), exe_dev);
            put(addr_of_mut!((*r)._pad2), 0);
        }
        entry.submit(0);
        count(counter::EMITTED);
    }

    /// A field of a kernel struct at `base + offset`. `DIRECT` is for pointers the
    /// verifier knows by their BTF type (tp_btf and fexit arguments): a plain load, which
    /// the verifier checks against the type and guards against faults — no helper call.
    /// The offsets are constants to the verifier (they come from the frozen read-only
    /// `OFFSETS`). Other pointers go through `bpf_probe_read_kernel`.
    #[inline(always)]
    unsafe fn read_at<T: Copy, const DIRECT: bool>(base: *const u8, offset: u32) -> Result<T, i64> {
        let at = base.wrapping_add(offset as usize) as *const T;
        if DIRECT {
            Ok(core::ptr::read_volatile(at))
        } else {
            bpf_probe_read_kernel(at).map_err(i64::from)
        }
    }

    /// (device, inode) of the current task's executable; zeros for a kernel thread or when
    /// a read fails. Only for records that are written (a first sighting), so folded
    /// events never pay for it.
    #[inline(always)]
    unsafe fn current_executable() -> (u32, u64) {
        let o = OFFSETS.load();
        let task = bpf_get_current_task() as *const u8;
        let read = || -> Result<(u32, u64), i64> {
            let mm: *const u8 = read_at::<_, false>(task, o.task_mm)?;
            if mm.is_null() {
                return Ok((0, 0));
            }
            let file: *const u8 = read_at::<_, false>(mm, o.mm_exe_file)?;
            if file.is_null() {
                return Ok((0, 0));
            }
            let inode: *const u8 = read_at::<_, false>(file, o.file_f_inode)?;
            let ino: u64 = read_at::<_, false>(inode, o.inode_i_ino)?;
            let sb: *const u8 = read_at::<_, false>(inode, o.inode_i_sb)?;
            let dev: u32 = read_at::<_, false>(sb, o.sb_s_dev)?;
            Ok((dev, ino))
        };
        read().unwrap_or((0, 0))
    }

    /// Inode of the network namespace behind a `possible_net_t` at `holder + offset`.
    #[inline(always)]
    unsafe fn netns_inum<const DIRECT: bool>(holder: *const u8, net_offset: u32) -> u32 {
        let offsets = OFFSETS.load();
        match read_at::<*const u8, DIRECT>(holder, net_offset) {
            Ok(net) if !net.is_null() => {
                read_at::<u32, DIRECT>(net, offsets.net_ns_inum).unwrap_or(0)
            }
            _ => 0,
        }
    }

    #[tracepoint(category = "sock", name = "inet_sock_set_state")]
    pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
        match unsafe { try_inet_sock_set_state(&ctx) } {
            Ok(()) => 0,
            Err(_) => {
                count(counter::READ_ERRORS);
                0
            }
        }
    }

    /// The TCP state transitions that matter, and what each means.
    #[inline(always)]
    fn classify(old: i32, new: i32) -> Option<EventKind> {
        match (old, new) {
            (TCP_SYN_RECV, TCP_ESTABLISHED) => {
                let source = SETTINGS.get(setting::INBOUND_SOURCE).copied().unwrap_or(0);
                (source == inbound_source::TRACEPOINT).then_some(EventKind::Inbound)
            }
            (TCP_CLOSE, TCP_SYN_SENT) => Some(EventKind::Outbound),
            (TCP_CLOSE, TCP_LISTEN) => Some(EventKind::Listen),
            (TCP_LISTEN, TCP_CLOSE) => Some(EventKind::ListenClose),
            _ => None,
        }
    }

    /// The same transitions through the BTF-typed raw tracepoint: the kernel calls the
    /// program directly with (sk, oldstate, newstate), without first copying a trace
    /// record, which makes every state change on the node cheaper. Used when the kernel
    /// allows it (tracing programs, Linux 5.5+); the classic tracepoint otherwise.
    #[btf_tracepoint(function = "inet_sock_set_state")]
    pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
        let sk: *const u8 = ctx.arg(0);
        let old: i32 = ctx.arg(1);
        let new: i32 = ctx.arg(2);
        let Some(kind) = classify(old, new) else {
            return 0;
        };
        if unsafe { state_from_sock::<true>(sk, kind) }.is_err() {
            count(counter::READ_ERRORS);
        }
        0
    }

    unsafe fn state_from_sock<const DIRECT: bool>(
        sk: *const u8,
        kind: EventKind,
    ) -> Result<(), i64> {
        let o = OFFSETS.load();
        let protocol: u16 = read_at::<_, DIRECT>(sk, o.sk_protocol)?;
        if protocol != IPPROTO_TCP {
            return Ok(());
        }
        let local_port: u16 = read_at::<_, DIRECT>(sk, o.skc_num)?;
        let remote_port = u16::from_be(read_at::<u16, DIRECT>(sk, o.skc_dport)?);
        let watched = if kind == EventKind::Outbound {
            remote_port
        } else {
            local_port
        };
        if !is_watched(watched) {
            count(counter::FILTERED);
            return Ok(());
        }
        let Some((family, local_addr, remote_addr)) = sock_addresses::<DIRECT>(sk)? else {
            return Ok(());
        };
        observe(&mut Event {
            kind,
            hook: HookKind::Tracepoint,
            family,
            // As the classic tracepoint reports it: an outbound socket's own port is not
            // chosen yet at SYN_SENT.
            local_port: if kind == EventKind::Outbound {
                0
            } else {
                local_port
            },
            remote_port,
            local_addr,
            remote_addr,
            netns: netns_inum::<DIRECT>(sk, o.skc_net),
            process_context: kind != EventKind::Inbound,
        });
        Ok(())
    }

    /// (family, local address, remote address).
    type Addresses = (u16, [u8; 16], [u8; 16]);

    /// The addresses of an IPv4 or IPv6 socket; `None` for other families.
    #[inline(always)]
    unsafe fn sock_addresses<const DIRECT: bool>(sk: *const u8) -> Result<Option<Addresses>, i64> {
        let o = OFFSETS.load();
        let family: u16 = read_at::<_, DIRECT>(sk, o.skc_family)?;
        if family == AF_INET6 {
            Ok(Some((
                family,
                read_at::<[u8; 16], DIRECT>(sk, o.skc_v6_rcv_saddr)?,
                read_at::<[u8; 16], DIRECT>(sk, o.skc_v6_daddr)?,
            )))
        } else if family == AF_INET {
            let mut l = [0u8; 16];
            let mut r = [0u8; 16];
            l[..4].copy_from_slice(&read_at::<[u8; 4], DIRECT>(sk, o.skc_rcv_saddr)?);
            r[..4].copy_from_slice(&read_at::<[u8; 4], DIRECT>(sk, o.skc_daddr)?);
            Ok(Some((family, l, r)))
        } else {
            Ok(None)
        }
    }

    unsafe fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
        let o = OFFSETS.load();
        let protocol: u16 = ctx.read_at(o.tp_protocol as usize)?;
        if protocol != IPPROTO_TCP {
            return Ok(());
        }
        let old: i32 = ctx.read_at(o.tp_oldstate as usize)?;
        let new: i32 = ctx.read_at(o.tp_newstate as usize)?;
        let Some(kind) = classify(old, new) else {
            return Ok(());
        };
        // The tracepoint reports ports in host order; sport is always our side.
        let sport: u16 = ctx.read_at(o.tp_sport as usize)?;
        let dport: u16 = ctx.read_at(o.tp_dport as usize)?;
        let watched = if kind == EventKind::Outbound {
            dport
        } else {
            sport
        };
        if !is_watched(watched) {
            count(counter::FILTERED);
            return Ok(());
        }
        let family: u16 = ctx.read_at(o.tp_family as usize)?;
        let (local_addr, remote_addr) = if family == AF_INET6 {
            (
                ctx.read_at::<[u8; 16]>(o.tp_saddr_v6 as usize)?,
                ctx.read_at::<[u8; 16]>(o.tp_daddr_v6 as usize)?,
            )
        } else {
            let mut l = [0u8; 16];
            let mut r = [0u8; 16];
            l[..4].copy_from_slice(&ctx.read_at::<[u8; 4]>(o.tp_saddr as usize)?);
            r[..4].copy_from_slice(&ctx.read_at::<[u8; 4]>(o.tp_daddr as usize)?);
            (l, r)
        };
        let sk: *const u8 = ctx.read_at(o.tp_skaddr as usize)?;
        let netns = netns_inum::<false>(sk, o.skc_net);
        observe(&mut Event {
            kind,
            hook: HookKind::Tracepoint,
            family,
            local_port: sport,
            remote_port: dport,
            local_addr,
            remote_addr,
            netns,
            // Connect and listen run in the syscall of the owning process; the SYN_RECV →
            // ESTABLISHED step runs in softirq, where "current" is whoever was on the CPU.
            process_context: kind != EventKind::Inbound,
        });
        Ok(())
    }

    /// Inbound from the socket `inet_csk_accept` returns, in the accepting process.
    unsafe fn accepted<const DIRECT: bool>(sk: *const u8, hook: HookKind) -> Result<(), i64> {
        if sk.is_null() {
            return Ok(());
        }
        let o = OFFSETS.load();
        let local_port: u16 = read_at::<_, DIRECT>(sk, o.skc_num)?;
        if !is_watched(local_port) {
            count(counter::FILTERED);
            return Ok(());
        }
        // Userspace moves inbound records to the state tracepoint when the kretprobe's
        // instance pool runs out (an accept entered then is never probed); from then on
        // this hook would only repeat the tracepoint's record.
        if SETTINGS.get(setting::INBOUND_SOURCE).copied().unwrap_or(0)
            != inbound_source::ACCEPT_HOOK
        {
            return Ok(());
        }
        let remote_port = u16::from_be(read_at::<u16, DIRECT>(sk, o.skc_dport)?);
        let Some((family, local_addr, remote_addr)) = sock_addresses::<DIRECT>(sk)? else {
            return Ok(());
        };
        observe(&mut Event {
            kind: EventKind::Inbound,
            hook,
            family,
            local_port,
            remote_port,
            local_addr,
            remote_addr,
            netns: netns_inum::<DIRECT>(sk, o.skc_net),
            process_context: true,
        });
        Ok(())
    }

    #[kretprobe]
    pub fn inet_csk_accept_kretprobe(ctx: RetProbeContext) -> u32 {
        let sk: *const u8 = ctx.ret();
        if unsafe { accepted::<false>(sk, HookKind::Kretprobe) }.is_err() {
            count(counter::READ_ERRORS);
        }
        0
    }

    /// `bpf_get_func_ret` (5.17+) reads the return value wherever the kernel's signature
    /// puts it, so one program serves both `inet_csk_accept(sk, flags, err, kern)` and the
    /// 6.10+ `inet_csk_accept(sk, arg)`.
    #[fexit(function = "inet_csk_accept")]
    pub fn inet_csk_accept_fexit(ctx: FExitContext) -> u32 {
        let sk: *const u8 = match ctx.ret() {
            Ok(sk) => sk,
            Err(_) => {
                count(counter::READ_ERRORS);
                return 0;
            }
        };
        if unsafe { accepted::<false>(sk, HookKind::Fexit) }.is_err() {
            count(counter::READ_ERRORS);
        }
        0
    }

    const SK_PASS: u32 = 1;

    /// Every segment that looks for a listener in the watched namespace: each SYN (open
    /// port or closed), and stray FIN/NULL/Xmas probes to closed ports. The program only
    /// watches; it never steers the lookup.
    #[sk_lookup]
    pub fn syn_lookup(ctx: SkLookupContext) -> u32 {
        if unsafe { try_syn_lookup(&ctx) }.is_err() {
            count(counter::READ_ERRORS);
        }
        SK_PASS
    }

    /// One 4-byte context load (the only width every kernel since 5.9 accepts for each
    /// field of `struct bpf_sk_lookup`).
    #[inline(always)]
    unsafe fn lookup_u32(ctx: &SkLookupContext, offset: usize) -> u32 {
        core::ptr::read_volatile((ctx.lookup as *const u8).add(offset) as *const u32)
    }

    unsafe fn try_syn_lookup(ctx: &SkLookupContext) -> Result<(), i64> {
        // struct bpf_sk_lookup (uapi): sk/cookie 0, family 8, protocol 12, remote_ip4 16,
        // remote_ip6 20, remote_port 36 (network order in its first two bytes), local_ip4
        // 40, local_ip6 44, local_port 60 (host order).
        if lookup_u32(ctx, 12) != u32::from(IPPROTO_TCP) {
            return Ok(());
        }
        let local_port = lookup_u32(ctx, 60) as u16;
        if !is_watched(local_port) {
            count(counter::FILTERED);
            return Ok(());
        }
        let family = lookup_u32(ctx, 8) as u16;
        let remote_port = u16::from_be(lookup_u32(ctx, 36) as u16);
        let mut local_addr = [0u8; 16];
        let mut remote_addr = [0u8; 16];
        if family == AF_INET6 {
            for i in 0..4 {
                let l = lookup_u32(ctx, 44 + 4 * i).to_ne_bytes();
                let r = lookup_u32(ctx, 20 + 4 * i).to_ne_bytes();
                local_addr[4 * i..4 * i + 4].copy_from_slice(&l);
                remote_addr[4 * i..4 * i + 4].copy_from_slice(&r);
            }
        } else if family == AF_INET {
            local_addr[..4].copy_from_slice(&lookup_u32(ctx, 40).to_ne_bytes());
            remote_addr[..4].copy_from_slice(&lookup_u32(ctx, 16).to_ne_bytes());
        } else {
            return Ok(());
        }
        observe_softirq(&mut Event {
            kind: EventKind::Syn,
            hook: HookKind::SkLookup,
            family,
            local_port,
            remote_port,
            local_addr,
            remote_addr,
            netns: SYN_NETNS.load(),
            // Softirq: "current" is whoever happened to be on the CPU.
            process_context: false,
        });
        Ok(())
    }

    #[cfg(not(test))]
    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

/// The crate only means something for the bpf target; on the host it is an empty binary so
/// that workspace-wide `cargo` commands (clippy, fmt) work.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
