//! Every Prometheus metric the daemon exports, defined once here with its help text and
//! labels (prefix `k8s_ebpf_`; never a peer address as a label: label values come from
//! the policy and fixed vocabularies, so cardinality stays bounded), plus the HTTP
//! server that exposes them ([`server`]).

pub mod server;

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use self::server::{MetricsServer, MetricsServerError, Readiness, DEFAULT_METRICS_ADDR};

/// `k8s_ebpf_out_of_scope_total{reason}` values, created at 0 (the verdict's
/// `OutOfScope::as_str`; a test in verdict.rs keeps the two the same).
pub const OUT_OF_SCOPE_REASONS: [&str; 3] = ["pod_inbound", "pod_listener", "pod_outbound"];

/// The daemon's metrics and the registry they live in.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Observations judged, by watched port, direction and verdict.
    pub connections: IntCounterVec,
    /// Alerts raised, by rule and action: first sightings and port-scan declarations
    /// (window summaries report counts of the same alert and are not counted again).
    pub alerts: IntCounterVec,
    /// Kernel outcome counters (set absolutely with [`Metrics::set_kernel_counter`]).
    pub kernel_events: IntCounterVec,
    /// Records the output dropped, by kind (`alert` / `event`).
    pub output_dropped: IntCounterVec,
    pub output_write_errors: IntCounter,
    /// Policy loads and reloads, by result (`ok` / `error`).
    pub policy_reloads: IntCounterVec,
    /// 1 for the inbound attach mechanism in use.
    pub attach_info: IntGaugeVec,
    /// 1, labelled with the daemon's version.
    pub build_info: IntGaugeVec,
    /// Current listeners on watched ports, by port, component and scope (`loopback`/`any`).
    pub listeners: IntGaugeVec,
    /// Ring-buffer records that could not be decoded.
    pub decode_errors: IntCounter,
    /// Correlation state dropped to stay within bounds, by table (`windows` / `scan_peers`).
    pub correlation_evictions: IntCounterVec,
    /// Kubernetes objects in the identity cache, by resource.
    pub kubernetes_objects: IntGaugeVec,
    /// 1 while a resource's cache is current (listed, no error since), by resource.
    pub kubernetes_synced: IntGaugeVec,
    /// Full lists applied (the first sync and every re-list), by resource.
    pub kubernetes_lists: IntCounterVec,
    /// Objects the API sent in full lists (paginated or streamed), by resource and `mode`
    /// (`paginated`, `streaming`).
    pub kubernetes_listed_objects: IntCounterVec,
    /// Which pods the cache holds: 1 for the current `coverage` (`all`, `selected`,
    /// `ranges`), 0 for the others.
    pub kubernetes_pod_coverage: IntGaugeVec,
    /// On-demand lookups of an alert's unknown peer (`fieldSelector=status.podIP`), by
    /// `outcome`: `found`, `not_found`, `cached`, `outside_ranges` (not asked: in no pod
    /// range), `skipped` (over the rate or queue bound), `error`.
    pub kubernetes_pod_lookups: IntCounterVec,
    /// SYNs to watched ports by what became of them (`completed`, `half_open`,
    /// `refused`), set from the daemon's attempt tracker.
    pub syn_attempts: IntCounterVec,
    /// SYNs to listening watched ports still waiting for their handshake.
    pub syn_pending: IntGauge,
    /// Records the reader took from the ring buffer (equals the kernel's `emitted` once
    /// the reader has caught up).
    pub ring_records: IntCounter,
    /// Kubernetes API errors, by resource and reason (`forbidden`, `unauthorized`,
    /// `unreachable`, `gone`, `not-found`, `server-error`, `protocol`, `config`).
    pub kubernetes_api_errors: IntCounterVec,
    /// Records from pods' network namespaces (`--netns all`) that no rule judges, by
    /// reason (`pod_inbound`, `pod_listener`, `pod_outbound`).
    pub out_of_scope: IntCounterVec,
    /// Connections from a pod to this node seen from both ends, by what the client's
    /// record became (`joined`, `client_alone`, `client_folded`).
    pub connection_pairs: IntCounterVec,
    /// Records held at start until the Kubernetes feeds synced, by outcome (`held`; then
    /// `synced`, `timeout` or `shutdown` as they went out; `overflow`: judged at once, the
    /// hold being full).
    pub sync_hold: IntCounterVec,
    /// Under `--netns all`: the addresses in the kernel's pod scope; -1 while the kernel
    /// filter is off.
    pub pod_scope_addresses: IntGauge,
    /// 1 when the policy's executables resolve in the host's root, 0 in the daemon's own.
    pub executables_host_root: IntGauge,
    /// Conntrack NEW events read, by outcome ([`CONNTRACK_OUTCOMES`]).
    pub conntrack_events: IntCounterVec,
    /// 1 for whether conntrack events reach the daemon (`state`: events, no_conntrack,
    /// events_off, no_socket).
    pub conntrack_info: IntGaugeVec,
}

/// `k8s_ebpf_conntrack_events_total{outcome}` values, created at 0: new (TCP NEW events
/// read), forwarded (of those, DNAT-ed from a watched port of a node address: judged),
/// decode_errors, overflows (ENOBUFS: the socket's buffer overflowed and the kernel
/// dropped events), read_errors.
pub const CONNTRACK_OUTCOMES: [&str; 5] = [
    "new",
    "forwarded",
    "decode_errors",
    "overflows",
    "read_errors",
];

/// `k8s_ebpf_sync_hold_records_total{outcome}` values, created at 0.
pub const SYNC_HOLD_OUTCOMES: [&str; 5] = ["held", "synced", "timeout", "shutdown", "overflow"];

/// One metric's name, help text and label names: the table below defines each once.
struct Definition {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
}

fn counter_vec(r: &Registry, d: &Definition) -> IntCounterVec {
    let c =
        IntCounterVec::new(Opts::new(d.name, d.help), d.labels).expect("valid metric definition");
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn gauge_vec(r: &Registry, d: &Definition) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(d.name, d.help), d.labels).expect("valid metric definition");
    r.register(Box::new(g.clone()))
        .expect("metric names are unique");
    g
}

fn counter(r: &Registry, d: &Definition) -> IntCounter {
    let c = IntCounter::new(d.name, d.help).expect("valid metric definition");
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn gauge(r: &Registry, d: &Definition) -> IntGauge {
    let g = IntGauge::new(d.name, d.help).expect("valid metric definition");
    r.register(Box::new(g.clone()))
        .expect("metric names are unique");
    g
}

const CONNECTIONS: Definition = Definition {
    name: "k8s_ebpf_connections_total",
    help: "Observations on watched ports, by port, direction and policy verdict.",
    labels: &["port", "direction", "verdict"],
};

const ALERTS: Definition = Definition {
    name: "k8s_ebpf_alerts_total",
    help: "Alerts raised (first sightings and scan declarations; window summaries are not counted), by rule and action.",
    labels: &["rule", "action"],
};

const KERNEL_EVENTS: Definition = Definition {
    name: "k8s_ebpf_kernel_events_total",
    help: "Kernel-side outcome counters, summed over CPUs.",
    labels: &["outcome"],
};

const OUTPUT_DROPPED: Definition = Definition {
    name: "k8s_ebpf_output_dropped_total",
    help: "Records dropped because the output queue was full, by record kind.",
    labels: &["kind"],
};

const OUTPUT_WRITE_ERRORS: Definition = Definition {
    name: "k8s_ebpf_output_write_errors_total",
    help: "Records that could not be written to the output and went to stderr instead.",
    labels: &[],
};

const POLICY_RELOADS: Definition = Definition {
    name: "k8s_ebpf_policy_reloads_total",
    help: "Policy loads and reloads, by result.",
    labels: &["result"],
};

const ATTACH_INFO: Definition = Definition {
    name: "k8s_ebpf_attach_info",
    help: "1 for the inbound hook mechanism attached.",
    labels: &["mechanism"],
};

const BUILD_INFO: Definition = Definition {
    name: "k8s_ebpf_build_info",
    help: "1, labelled with the k8s-ebpf version.",
    labels: &["version"],
};

const LISTENERS: Definition = Definition {
    name: "k8s_ebpf_listeners",
    help: "Listening sockets on watched ports, by port, component and bind scope.",
    labels: &["port", "component", "scope"],
};

const DECODE_ERRORS: Definition = Definition {
    name: "k8s_ebpf_decode_errors_total",
    help: "Ring-buffer records that could not be decoded.",
    labels: &[],
};

const CORRELATION_EVICTIONS: Definition = Definition {
    name: "k8s_ebpf_correlation_evictions_total",
    help: "Correlation entries evicted to stay within their bound, by table.",
    labels: &["table"],
};

const KUBERNETES_OBJECTS: Definition = Definition {
    name: "k8s_ebpf_kubernetes_objects",
    help: "Kubernetes objects in the identity cache, by resource.",
    labels: &["resource"],
};

const KUBERNETES_SYNCED: Definition = Definition {
    name: "k8s_ebpf_kubernetes_synced",
    help: "1 while the resource's identity cache is current (listed, no error since).",
    labels: &["resource"],
};

const KUBERNETES_LISTS: Definition = Definition {
    name: "k8s_ebpf_kubernetes_lists_total",
    help: "Full lists applied to the identity cache (first sync and re-lists), by resource.",
    labels: &["resource"],
};

const KUBERNETES_LISTED_OBJECTS: Definition = Definition {
    name: "k8s_ebpf_kubernetes_listed_objects_total",
    help: "Objects received in full lists (paginated or streamed), by resource and mode.",
    labels: &["resource", "mode"],
};

const KUBERNETES_POD_COVERAGE: Definition = Definition {
    name: "k8s_ebpf_kubernetes_pod_coverage",
    help: "1 for which pods the identity cache holds: all, selected (the policy's selectors and this node's), ranges (selected, and any address in a node's podCIDRs counts as a pod).",
    labels: &["coverage"],
};

const KUBERNETES_POD_LOOKUPS: Definition = Definition {
    name: "k8s_ebpf_kubernetes_pod_lookups_total",
    help: "On-demand lookups of an alert's peer not in the identity cache, by outcome.",
    labels: &["outcome"],
};

const SYN_ATTEMPTS: Definition = Definition {
    name: "k8s_ebpf_syn_attempts_total",
    help: "SYNs to watched ports, by resolution: completed (the handshake finished: an inbound connection), half_open (a listener, no handshake), refused (nothing listens).",
    labels: &["resolution"],
};

const SYN_PENDING: Definition = Definition {
    name: "k8s_ebpf_syn_pending",
    help: "SYNs to listening watched ports waiting for their handshake to complete.",
    labels: &[],
};

const RING_RECORDS: Definition = Definition {
    name: "k8s_ebpf_ring_records_total",
    help: "Records the daemon read from the kernel's ring buffer (equals the kernel's emitted count once caught up).",
    labels: &[],
};

const KUBERNETES_API_ERRORS: Definition = Definition {
    name: "k8s_ebpf_kubernetes_api_errors_total",
    help: "Kubernetes API errors, by resource and reason.",
    labels: &["resource", "reason"],
};

const OUT_OF_SCOPE: Definition = Definition {
    name: "k8s_ebpf_out_of_scope_total",
    help: "Records from pods' network namespaces (--netns all) that no rule judges, by reason: pod_inbound (a connection into a pod), pod_listener (a pod listening), pod_outbound (a pod reaching neither a node nor the control plane).",
    labels: &["reason"],
};

const CONNECTION_PAIRS: Definition = Definition {
    name: "k8s_ebpf_connection_pairs_total",
    help: "Outbound records from a pod to this node's own addresses, by outcome: joined (one record with the node's side of the same connection), client_alone (no node side within the hold: judged alone), client_folded (the node's side was folded in the kernel's dedup window).",
    labels: &["outcome"],
};

const SYNC_HOLD: Definition = Definition {
    name: "k8s_ebpf_sync_hold_records_total",
    help: "Records held at start while the Kubernetes feeds the policy's selectors need had not synced, by outcome: held (entered the hold), synced, timeout or shutdown (judged when the feeds synced, when the wait ran out: judged by address, or at shutdown), overflow (the hold full: judged at once).",
    labels: &["outcome"],
};

const POD_SCOPE_ADDRESSES: Definition = Definition {
    name: "k8s_ebpf_pod_scope_addresses",
    help: "Under --netns all: addresses (this node's, the kubernetes Service's, the nodes' and API servers') a pod's outbound connection must reach to be judged; the kernel drops the rest as out of scope. -1 while that filter is off (before the Kubernetes feeds synced, or too many addresses).",
    labels: &[],
};

const EXECUTABLES_HOST_ROOT: Definition = Definition {
    name: "k8s_ebpf_executables_host_root",
    help: "1 when the policy's expected_clients executables resolve in the host's filesystem (--host-root opened at start); 0 when they resolve in the daemon's own, where a container has none of the host's binaries and every client expected by executable alone is unexpected.",
    labels: &[],
};

const CONNTRACK_EVENTS: Definition = Definition {
    name: "k8s_ebpf_conntrack_events_total",
    help: "Conntrack NEW events (TCP) read from the netfilter netlink socket, by outcome: new (read), forwarded (DNAT-ed from a watched port of a node address: judged), decode_errors, overflows (ENOBUFS: events the kernel dropped), read_errors.",
    labels: &["outcome"],
};

const CONNTRACK_INFO: Definition = Definition {
    name: "k8s_ebpf_conntrack_info",
    help: "1 for whether conntrack events reach the daemon: events, no_conntrack (not loaded), events_off (net.netfilter.nf_conntrack_events=0), no_socket (CAP_NET_ADMIN missing at start).",
    labels: &["state"],
};

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `k8s_ebpf_kernel_events_total{outcome}`: the kernel programs' counters (but `calls`,
/// the cost of every hook run, kept for the bench), the kernel's own accounting of missed
/// kretprobes and skipped runs, and the listener changes userspace read back from the
/// kernel's listener table. All exported from the start.
pub fn kernel_outcomes() -> impl Iterator<Item = &'static str> {
    use k8s_ebpf_common::counter;
    counter::NAMES
        .iter()
        .copied()
        .filter(|n| *n != "calls")
        .chain([
            counter::KRETPROBE_MISSED,
            counter::RECURSION_MISSES,
            "listeners_reconciled",
        ])
}

impl Metrics {
    /// Defines every metric in a fresh registry. The definitions are constants, so the
    /// `expect`s here can only fire on a programming error (covered by the unit tests).
    pub fn new() -> Self {
        let r = Registry::new();
        let m = Self {
            connections: counter_vec(&r, &CONNECTIONS),
            alerts: counter_vec(&r, &ALERTS),
            kernel_events: counter_vec(&r, &KERNEL_EVENTS),
            output_dropped: counter_vec(&r, &OUTPUT_DROPPED),
            output_write_errors: counter(&r, &OUTPUT_WRITE_ERRORS),
            policy_reloads: counter_vec(&r, &POLICY_RELOADS),
            attach_info: gauge_vec(&r, &ATTACH_INFO),
            build_info: gauge_vec(&r, &BUILD_INFO),
            listeners: gauge_vec(&r, &LISTENERS),
            decode_errors: counter(&r, &DECODE_ERRORS),
            correlation_evictions: counter_vec(&r, &CORRELATION_EVICTIONS),
            kubernetes_objects: gauge_vec(&r, &KUBERNETES_OBJECTS),
            kubernetes_synced: gauge_vec(&r, &KUBERNETES_SYNCED),
            kubernetes_lists: counter_vec(&r, &KUBERNETES_LISTS),
            kubernetes_listed_objects: counter_vec(&r, &KUBERNETES_LISTED_OBJECTS),
            kubernetes_pod_coverage: gauge_vec(&r, &KUBERNETES_POD_COVERAGE),
            kubernetes_pod_lookups: counter_vec(&r, &KUBERNETES_POD_LOOKUPS),
            syn_attempts: counter_vec(&r, &SYN_ATTEMPTS),
            syn_pending: gauge(&r, &SYN_PENDING),
            ring_records: counter(&r, &RING_RECORDS),
            kubernetes_api_errors: counter_vec(&r, &KUBERNETES_API_ERRORS),
            out_of_scope: counter_vec(&r, &OUT_OF_SCOPE),
            connection_pairs: counter_vec(&r, &CONNECTION_PAIRS),
            sync_hold: counter_vec(&r, &SYNC_HOLD),
            pod_scope_addresses: gauge(&r, &POD_SCOPE_ADDRESSES),
            executables_host_root: gauge(&r, &EXECUTABLES_HOST_ROOT),
            conntrack_events: counter_vec(&r, &CONNTRACK_EVENTS),
            conntrack_info: gauge_vec(&r, &CONNTRACK_INFO),
            registry: r,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m.create_known_series();
        m.pod_scope_addresses.set(-1);
        m
    }

    /// Counters whose label values are known up front exist from the start at 0: a
    /// series that appears only at its first increment is invisible to `increase()`,
    /// so the alert rules (deploy/prometheusrule.yaml) would miss the first drops.
    fn create_known_series(&self) {
        for kind in ["alert", "event"] {
            self.output_dropped.with_label_values(&[kind]);
        }
        for table in [
            "windows",
            "scan_peers",
            "pairs",
            "forwards",
            "flood_prefixes",
            "flood_sources",
            "scan_sources",
        ] {
            self.correlation_evictions.with_label_values(&[table]);
        }
        for result in ["ok", "error"] {
            self.policy_reloads.with_label_values(&[result]);
        }
        for reason in OUT_OF_SCOPE_REASONS {
            self.out_of_scope.with_label_values(&[reason]);
        }
        for outcome in ["joined", "client_alone", "client_folded"] {
            self.connection_pairs.with_label_values(&[outcome]);
        }
        for outcome in SYNC_HOLD_OUTCOMES {
            self.sync_hold.with_label_values(&[outcome]);
        }
        for outcome in CONNTRACK_OUTCOMES {
            self.conntrack_events.with_label_values(&[outcome]);
        }
        // The kernel's per-CPU outcome counters, as `k8s_ebpf_kernel_events_total{outcome}`.
        for outcome in kernel_outcomes() {
            self.kernel_events.with_label_values(&[outcome]).reset();
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Sets a kernel outcome counter to `total` (the sum of the per-CPU values). The
    /// counter only moves up by the difference; if the kernel's count went backwards
    /// (maps recreated) it restarts from `total`, which Prometheus reads as a reset.
    pub fn set_kernel_counter(&self, outcome: &str, total: u64) {
        let c = self.kernel_events.with_label_values(&[outcome]);
        let current = c.get();
        if total >= current {
            c.inc_by(total - current);
        } else {
            c.reset();
            c.inc_by(total);
        }
    }

    /// The attempt tracker's totals.
    /// The attempt tracker's totals, by resolution (plain labels: see
    /// `AttemptStats::by_resolution`), and the SYNs waiting now.
    pub fn set_attempts(&self, by_resolution: &[(&str, u64)], pending: usize) {
        for (resolution, total) in by_resolution {
            let c = self.syn_attempts.with_label_values(&[resolution]);
            c.inc_by(total.saturating_sub(c.get()));
        }
        self.syn_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    /// Marks `state` as whether conntrack events reach the daemon (and no other).
    pub fn set_conntrack_state(&self, state: &str) {
        self.conntrack_info.reset();
        self.conntrack_info.with_label_values(&[state]).set(1);
    }

    /// Marks `mechanism` as the attached inbound hook (and no other).
    pub fn set_attach_mechanism(&self, mechanism: &str) {
        self.attach_info.reset();
        self.attach_info.with_label_values(&[mechanism]).set(1);
    }

    pub fn record_connection(&self, port: u16, direction: &str, verdict: &str) {
        self.connections
            .with_label_values(&[&port.to_string(), direction, verdict])
            .inc();
    }

    pub fn record_alert(&self, rule: &str, action: &str) {
        self.alerts.with_label_values(&[rule, action]).inc();
    }

    pub fn record_policy_reload(&self, ok: bool) {
        self.policy_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    pub fn set_listeners(&self, port: u16, component: &str, scope: &str, count: i64) {
        self.listeners
            .with_label_values(&[&port.to_string(), component, scope])
            .set(count);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode_text(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_prefixed_and_encodes() {
        let m = Metrics::new();
        m.record_connection(10250, "ingress", "unexpected");
        m.record_alert("kubelet", "unexpected-inbound");
        m.output_dropped.with_label_values(&["event"]).inc();
        m.output_write_errors.inc();
        m.record_policy_reload(true);
        m.set_attach_mechanism("tracepoint");
        m.set_listeners(2381, "etcd", "any", 1);
        m.decode_errors.inc();
        m.correlation_evictions
            .with_label_values(&["windows"])
            .inc();
        let text = m.encode_text();
        for family in m.registry().gather() {
            assert!(family.name().starts_with("k8s_ebpf_"), "{}", family.name());
        }
        for name in [
            "k8s_ebpf_connections_total{direction=\"ingress\",port=\"10250\",verdict=\"unexpected\"} 1",
            "k8s_ebpf_alerts_total{action=\"unexpected-inbound\",rule=\"kubelet\"} 1",
            "k8s_ebpf_kernel_events_total{outcome=\"ringbuf_full\"} 0",
            "k8s_ebpf_output_dropped_total{kind=\"event\"} 1",
            "k8s_ebpf_output_write_errors_total 1",
            "k8s_ebpf_policy_reloads_total{result=\"ok\"} 1",
            "k8s_ebpf_attach_info{mechanism=\"tracepoint\"} 1",
            "k8s_ebpf_build_info{version=\"",
            "k8s_ebpf_listeners{component=\"etcd\",port=\"2381\",scope=\"any\"} 1",
            "k8s_ebpf_decode_errors_total 1",
            "k8s_ebpf_correlation_evictions_total{table=\"windows\"} 1",
            // Known label values exist before their first increment.
            "k8s_ebpf_correlation_evictions_total{table=\"scan_peers\"} 0",
            "k8s_ebpf_output_dropped_total{kind=\"alert\"} 0",
            "k8s_ebpf_policy_reloads_total{result=\"error\"} 0",
            "k8s_ebpf_out_of_scope_total{reason=\"pod_outbound\"} 0",
            "k8s_ebpf_connection_pairs_total{outcome=\"joined\"} 0",
            "k8s_ebpf_correlation_evictions_total{table=\"pairs\"} 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn kernel_counters_are_set_absolutely() {
        let m = Metrics::new();
        m.set_kernel_counter("emitted", 10);
        m.set_kernel_counter("emitted", 25);
        assert_eq!(m.kernel_events.with_label_values(&["emitted"]).get(), 25);
        m.set_kernel_counter("emitted", 3);
        assert_eq!(m.kernel_events.with_label_values(&["emitted"]).get(), 3);
    }

    #[test]
    fn attach_mechanism_is_exclusive() {
        let m = Metrics::new();
        m.set_attach_mechanism("fentry");
        m.set_attach_mechanism("tracepoint");
        let text = m.encode_text();
        assert!(!text.contains("mechanism=\"fentry\""));
        assert!(text.contains("mechanism=\"tracepoint\"} 1"));
    }
}
