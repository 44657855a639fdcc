//! `k8s-ebpf learn`: watch for a while, then write a policy that expects what was seen.
//!
//! The output starts from a base policy (the embedded default, or `--policy`) and widens
//! each rule by what the base would have alerted on: inbound and refused peers become
//! expected peers (single-address CIDRs), outbound processes become expected clients, a
//! wide listener on a loopback-only port makes that rule's `bind: any`. Kubernetes
//! identities (selectors instead of addresses) are not learned yet.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::Serialize;

use crate::{
    capture::{EventKind, Observation},
    policy::{Policy, Rule},
    ports::{BindScope, Severity},
    verdict::{judge, ClientContext, Verdict},
};

/// What the base policy did not expect, per watched port.
#[derive(Debug, Default)]
pub struct Learned {
    peers: BTreeMap<u16, BTreeSet<IpAddr>>,
    clients: BTreeMap<u16, BTreeSet<String>>,
    wide_binds: BTreeSet<u16>,
    /// Observations the base already expected, and those it did not.
    pub expected: u64,
    pub learned: u64,
}

impl Learned {
    /// Records `obs` if `base` would not have expected it.
    pub fn observe(&mut self, base: &Policy, obs: &Observation) {
        let Some(j) = judge(base, obs, &ClientContext::default()) else {
            return;
        };
        if j.verdict == Verdict::Expected {
            self.expected += 1;
            return;
        }
        self.learned += 1;
        let port = j.rule.port;
        match obs.kind {
            EventKind::Inbound | EventKind::Refused => {
                self.peers.entry(port).or_default().insert(obs.remote.ip());
            }
            EventKind::Outbound => {
                if let Some(p) = &obs.process {
                    self.clients.entry(port).or_default().insert(p.name.clone());
                }
            }
            EventKind::Listen => {
                self.wide_binds.insert(port);
            }
            EventKind::ListenClose => {}
        }
    }

    /// The base policy widened by what was learned, as YAML `check-config` accepts.
    pub fn to_policy_yaml(&self, base: &Policy) -> Result<String, serde_saphyr::ser::Error> {
        let scan = base.scan();
        let out = OutPolicy {
            version: 1,
            defaults: OutDefaults {
                window: humantime::format_duration(base.window()).to_string(),
                scan: OutScan {
                    ports: scan.ports,
                    window: humantime::format_duration(scan.window).to_string(),
                },
            },
            rules: base.rules().map(|r| self.rule(r)).collect(),
        };
        let yaml = serde_saphyr::to_string(&out)?;
        Ok(format!(
            "# Written by `k8s-ebpf learn` from {}: {} observations were already expected, {} \
             were learned.\n# Review it before use: everything seen while learning is now \
             expected.\n{yaml}",
            base.origin(),
            self.expected,
            self.learned
        ))
    }

    fn rule(&self, r: &Rule) -> OutRule {
        let mut peers: Vec<String> = Vec::new();
        if r.expected_peers.includes_loopback() {
            peers.push("loopback".to_owned());
        }
        peers.extend(r.expected_peers.networks().iter().map(ToString::to_string));
        for ip in self.peers.get(&r.port).into_iter().flatten() {
            let net = ipnet::IpNet::from(*ip).to_string();
            if !peers.contains(&net) {
                peers.push(net);
            }
        }
        let c = &r.expected_clients;
        let mut processes = c.processes.clone();
        for name in self.clients.get(&r.port).into_iter().flatten() {
            if !processes.contains(name) {
                processes.push(name.clone());
            }
        }
        let mut cgroups: Vec<OutCgroup> =
            c.cgroup_ids.iter().map(|&id| OutCgroup::Id(id)).collect();
        cgroups.extend(c.cgroup_paths.iter().cloned().map(OutCgroup::Path));
        OutRule {
            name: r.name.clone(),
            port: r.port,
            component: r.component.clone(),
            severity: r.severity,
            bind: if self.wide_binds.contains(&r.port) {
                BindScope::Any
            } else {
                r.bind
            },
            expected_peers: peers,
            expected_clients: OutClients {
                processes,
                cgroups,
                containers: c.containers.clone(),
            },
        }
    }
}

#[derive(Serialize)]
struct OutPolicy {
    version: u32,
    defaults: OutDefaults,
    rules: Vec<OutRule>,
}

#[derive(Serialize)]
struct OutDefaults {
    window: String,
    scan: OutScan,
}

#[derive(Serialize)]
struct OutScan {
    ports: usize,
    window: String,
}

#[derive(Serialize)]
struct OutRule {
    name: String,
    port: u16,
    component: String,
    severity: Severity,
    bind: BindScope,
    expected_peers: Vec<String>,
    expected_clients: OutClients,
}

#[derive(Serialize)]
struct OutClients {
    processes: Vec<String>,
    cgroups: Vec<OutCgroup>,
    containers: Vec<String>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutCgroup {
    Id(u64),
    Path(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{HookKind, ProcessInfo};

    fn obs(kind: EventKind, local: &str, remote: &str, comm: Option<&str>) -> Observation {
        Observation {
            kind,
            hook: HookKind::Tracepoint,
            at: std::time::SystemTime::now(),
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            process: comm.map(|c| ProcessInfo {
                pid: 7,
                tid: 7,
                name: c.to_owned(),
                cgroup_id: 1,
            }),
            netns: 0,
            count: 1,
            window_summary: false,
        }
    }

    #[test]
    fn learned_policy_parses_and_expects_what_was_seen() {
        let base = Policy::embedded_default();
        let seen = [
            obs(
                EventKind::Inbound,
                "10.0.0.1:10250",
                "198.51.100.20:40000",
                None,
            ),
            obs(
                EventKind::Inbound,
                "10.0.0.1:6443",
                "[2001:db8::7]:40000",
                None,
            ),
            obs(
                EventKind::Outbound,
                "10.0.0.1:0",
                "10.0.0.2:10250",
                Some("curl"),
            ),
            obs(EventKind::Listen, "0.0.0.0:10257", "0.0.0.0:0", Some("kcm")),
            obs(
                EventKind::Inbound,
                "10.0.0.1:10250",
                "127.0.0.1:40000",
                None,
            ),
        ];
        let mut learned = Learned::default();
        for o in &seen {
            learned.observe(&base, o);
        }
        assert_eq!((learned.expected, learned.learned), (1, 4));
        let yaml = learned.to_policy_yaml(&base).unwrap();
        let policy = Policy::parse(&yaml, "learned.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(policy.watched_ports(), base.watched_ports());
        for o in &seen {
            let j = judge(&policy, o, &ClientContext::default()).unwrap();
            assert_eq!(j.verdict, Verdict::Expected, "{o:?}\n{yaml}");
        }
        let other = obs(EventKind::Inbound, "10.0.0.1:10250", "203.0.113.9:1", None);
        assert_ne!(
            judge(&policy, &other, &ClientContext::default())
                .unwrap()
                .verdict,
            Verdict::Expected
        );
    }
}
