//! The daemon's view of the listeners on watched ports.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use tracing::{info, warn};

use crate::{capture::Observation, inventory, metrics::Metrics};
use k8s_ebpf_common::EventKind;

/// The listeners on watched ports, from a sock_diag scan at start, kept current by the
/// kernel's listen / listen-close records; published as the `listeners` gauge. The scan
/// also finds the connections already established at start (made while the daemon was
/// not running): they are judged like new ones, marked `hook: sock-diag-scan`.
#[derive(Default)]
pub(super) struct Inventory {
    listeners: BTreeSet<SocketAddr>,
    /// When a listener on each port last closed, for [`Inventory::listening`].
    closed_at: std::collections::HashMap<u16, std::time::Instant>,
    /// The kernel's listener table: the truth where a record was folded.
    pub(super) kernel: Option<crate::capture::ListenerTable>,
    /// Sockets per listening address found at start, for the kernel's listener table.
    pub(super) sockets: Vec<(SocketAddr, u64)>,
    at_start: Vec<Observation>,
}

impl Inventory {
    /// Runs before capabilities are dropped: reading other processes' fds needs them.
    pub(super) fn rescan(&mut self, ports: &BTreeSet<u16>) {
        match inventory::scan_listeners(ports) {
            Ok(found) => {
                for l in found {
                    self.listeners.insert(l.address);
                    self.sockets.push((l.address, l.sockets));
                    self.at_start.push(l.to_observation());
                }
            }
            Err(e) => warn!(error = %e, "cannot list the listeners at start (sock_diag)"),
        }
        match inventory::established(ports) {
            Ok(found) => {
                if !found.is_empty() {
                    info!(
                        connections = found.len(),
                        "connections on watched ports already established at start"
                    );
                }
                self.at_start.extend(found);
            }
            Err(e) => {
                warn!(error = %e, "cannot list the established connections at start (sock_diag)")
            }
        }
    }

    /// The listeners and established connections on `ports` (a reload added them), as
    /// records to judge; the listeners join the inventory. After the capability drop:
    /// owners this process may not inspect stay unnamed (said in the record).
    pub(super) fn scan_added(&mut self, ports: &BTreeSet<u16>) -> Vec<Observation> {
        let mut found = Vec::new();
        match inventory::scan_listeners(ports) {
            Ok(listeners) => {
                for l in listeners {
                    self.listeners.insert(l.address);
                    found.push(l.to_observation());
                }
            }
            Err(e) => warn!(error = %e, "cannot list the listeners on the added ports (sock_diag)"),
        }
        match inventory::established(ports) {
            Ok(connections) => found.extend(connections),
            Err(e) => warn!(
                error = %e,
                "cannot list the established connections on the added ports (sock_diag)"
            ),
        }
        for obs in &mut found {
            obs.hook = k8s_ebpf_common::HookKind::Rescan;
        }
        let unnamed = found.iter().filter(|o| o.process.is_none()).count();
        info!(
            ports = ?ports,
            found = found.len(),
            unnamed,
            "scanned the ports the reload added"
        );
        found
    }

    /// How long after a close the kernel's table is asked as well: the kernel reports a
    /// listener that reopens within its fold interval (1 s) only through the table, which
    /// the reader's sweep reads back a moment later.
    const RECENT_CLOSE: Duration = Duration::from_secs(3);

    /// Whether something listens on `local` in namespace `netns`: the inventory's answer,
    /// or, for an address that closed in the last [`Inventory::RECENT_CLOSE`], the
    /// kernel's listener table's (a restarted server is not taken for a closed port).
    pub(super) fn listening(&self, netns: u32, local: SocketAddr) -> bool {
        if self.listening_known(local) {
            return true;
        }
        let recently_closed = self
            .closed_at
            .get(&local.port())
            .is_some_and(|at| at.elapsed() < Self::RECENT_CLOSE);
        recently_closed
            && self
                .kernel
                .as_ref()
                .is_some_and(|k| k.listening(netns, local))
    }

    /// Whether the inventory lists `local` (its address, or the wildcard of its family; an
    /// IPv6 wildcard also takes IPv4 unless it is v6-only, which the scan cannot tell).
    fn listening_known(&self, local: SocketAddr) -> bool {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let port = local.port();
        self.listeners.contains(&local)
            || self
                .listeners
                .contains(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port))
            || (local.is_ipv4()
                && self
                    .listeners
                    .contains(&SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)))
    }

    /// What the scan at start found, for the policy to judge.
    pub(super) fn start_observations(&mut self) -> Vec<Observation> {
        std::mem::take(&mut self.at_start)
    }

    pub(super) fn track(&mut self, obs: &Observation, m: &Metrics) {
        match obs.kind {
            EventKind::Listen => {
                self.listeners.insert(obs.local);
            }
            EventKind::ListenClose => {
                self.listeners.remove(&obs.local);
                self.closed_at
                    .insert(obs.local.port(), std::time::Instant::now());
            }
            _ => return,
        }
        self.publish(m);
    }

    pub(super) fn publish(&self, m: &Metrics) {
        m.listeners.reset();
        for addr in &self.listeners {
            let component = crate::ports::lookup(addr.port()).map_or("unknown", |p| p.component);
            let scope = if crate::policy::is_loopback(addr.ip()) {
                "loopback"
            } else {
                "any"
            };
            m.listeners
                .with_label_values(&[&addr.port().to_string(), component, scope])
                .inc();
        }
    }
}
