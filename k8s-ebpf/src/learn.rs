//! `k8s-ebpf learn`: watch for a while, then write a policy that expects what was seen.
//!
//! The output starts from a base policy (the embedded default, or `--policy`) and widens
//! each rule by what the base would have alerted on: inbound and refused peers become
//! expected peers (single-address CIDRs), outbound processes become expected clients (by
//! executable path; by task name only when the path cannot be read), a wide listener on
//! a loopback-only port makes that rule's `bind: any`.
//!
//! With a Kubernetes API, a peer whose identity is known is learned as a selector rather
//! than an address (addresses of pods and nodes change, identities less so): a pod as its
//! service account (unless `default`), else as its namespace and stable labels (without
//! per-pod ones such as `pod-template-hash`); a node as `nodes: control-plane` or
//! `nodes: all`; an API server endpoint as `apiserver`. Unknown peers stay addresses.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::Serialize;

use crate::{
    capture::{EventKind, Observation},
    identity::PeerIdentity,
    policy::{NodeScope, PeerSelector, Policy, Rule, RuleNetns},
    ports::{BindScope, Severity},
    verdict::{judge, ClientContext, Verdict},
};

/// Labels that differ between pods of one workload: never part of a learned selector.
const PER_POD_LABELS: [&str; 6] = [
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
];

/// A learned peer: by identity where known, else by address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum LearnedPeer {
    Selector(PeerSelector),
    Address(IpAddr),
}

impl LearnedPeer {
    fn new(ip: IpAddr, id: Option<&PeerIdentity>) -> Self {
        let Some(id) = id else {
            return Self::Address(ip);
        };
        if let Some(pod) = &id.pod {
            return Self::Selector(match pod.service_account.as_deref() {
                Some(sa) if sa != "default" => {
                    PeerSelector::ServiceAccounts(vec![(pod.namespace.to_string(), sa.to_owned())])
                }
                _ => PeerSelector::Pods {
                    namespace: Some(pod.namespace.to_string()),
                    labels: pod
                        .labels
                        .iter()
                        .filter(|(k, _)| !PER_POD_LABELS.contains(k))
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect(),
                },
            });
        }
        if let Some(node) = &id.node {
            return Self::Selector(PeerSelector::Nodes(if node.is_control_plane() {
                NodeScope::ControlPlane
            } else {
                NodeScope::All
            }));
        }
        if id.apiserver {
            return Self::Selector(PeerSelector::Apiserver);
        }
        Self::Address(ip)
    }
}

/// What the base policy did not expect, per watched port.
#[derive(Debug, Default)]
pub struct Learned {
    peers: BTreeMap<u16, BTreeSet<LearnedPeer>>,
    clients: BTreeMap<u16, BTreeSet<LearnedClient>>,
    wide_binds: BTreeSet<u16>,
    /// Observations the base already expected, and those it did not.
    pub expected: u64,
    pub learned: u64,
}

impl Learned {
    /// Records `obs` if `base` would not have expected it; `peer` is the remote peer's
    /// Kubernetes identity when an API is in use.
    pub fn observe(&mut self, base: &Policy, obs: &Observation, peer: Option<&PeerIdentity>) {
        let context = ClientContext {
            peer,
            ..ClientContext::default()
        };
        let Some(j) = judge(base, obs, &context) else {
            return;
        };
        if j.verdict == Verdict::Expected {
            self.expected += 1;
            return;
        }
        self.learned += 1;
        let port = j.rule.port;
        match obs.kind {
            EventKind::Inbound | EventKind::Refused | EventKind::Syn | EventKind::HalfOpen => {
                self.peers
                    .entry(port)
                    .or_default()
                    .insert(LearnedPeer::new(obs.remote.ip(), peer));
            }
            EventKind::Outbound => {
                if let Some(p) = &obs.process {
                    // The executable by path where it can still be read (learn keeps its
                    // privileges): a path is matched by file identity, a name is not.
                    let client = std::fs::read_link(format!("/proc/{}/exe", p.pid))
                        .ok()
                        .filter(|path| path.is_absolute())
                        .map_or_else(
                            || LearnedClient::Name(p.name.clone()),
                            |path| LearnedClient::Executable(path.display().to_string()),
                        );
                    self.clients.entry(port).or_default().insert(client);
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
                flood: OutFlood {
                    sources: base.flood_sources(),
                    lines: base.flood_lines(),
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
            netns: r.netns,
            expected_peers: self.expected_peers(r),
            expected_clients: self.expected_clients(r),
        }
    }

    /// The rule's expected peers, then the ones learned for its port.
    fn expected_peers(&self, r: &Rule) -> Vec<OutPeer> {
        let mut peers: Vec<OutPeer> = Vec::new();
        if r.expected_peers.includes_loopback() {
            peers.push(OutPeer::Text("loopback".to_owned()));
        }
        peers.extend(
            r.expected_peers
                .networks()
                .iter()
                .map(|n| OutPeer::Text(n.to_string())),
        );
        peers.extend(r.expected_peers.selectors().iter().map(OutPeer::from));
        for learned in self.peers.get(&r.port).into_iter().flatten() {
            let out = match learned {
                LearnedPeer::Address(ip) => OutPeer::Text(ipnet::IpNet::from(*ip).to_string()),
                LearnedPeer::Selector(s) => OutPeer::from(s),
            };
            if !peers.contains(&out) {
                peers.push(out);
            }
        }
        peers
    }

    /// The rule's expected clients, with the executables and names learned for its port.
    fn expected_clients(&self, r: &Rule) -> OutClients {
        let c = &r.expected_clients;
        let mut processes = c.processes.clone();
        let mut executables: Vec<OutExecutable> = c
            .executables
            .iter()
            .map(|e| {
                let path = e.path.display().to_string();
                if e.units.is_empty() {
                    OutExecutable::Path(path)
                } else {
                    OutExecutable::InUnits {
                        path,
                        units: e.units.clone(),
                    }
                }
            })
            .collect();
        for client in self.clients.get(&r.port).into_iter().flatten() {
            match client {
                LearnedClient::Executable(path) => {
                    let path = OutExecutable::Path(path.clone());
                    if !executables.contains(&path) {
                        executables.push(path);
                    }
                }
                LearnedClient::Name(name) => {
                    if !processes.contains(name) {
                        processes.push(name.clone());
                    }
                }
            }
        }
        let mut cgroups: Vec<OutCgroup> =
            c.cgroup_ids.iter().map(|&id| OutCgroup::Id(id)).collect();
        cgroups.extend(c.cgroup_paths.iter().cloned().map(OutCgroup::Path));
        OutClients {
            executables,
            pods: c
                .pods
                .iter()
                .map(|(namespace, labels)| OutPods {
                    namespace: namespace.clone(),
                    labels: labels.clone(),
                })
                .collect(),
            units: c.units.clone(),
            processes,
            cgroups,
            containers: c.containers.clone(),
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
    flood: OutFlood,
}

#[derive(Serialize)]
struct OutFlood {
    sources: usize,
    lines: usize,
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
    #[serde(skip_serializing_if = "is_node_netns")]
    netns: RuleNetns,
    expected_peers: Vec<OutPeer>,
    expected_clients: OutClients,
}

fn is_node_netns(n: &RuleNetns) -> bool {
    *n == RuleNetns::Node
}

/// An `expected_peers` entry as the policy format writes it.
#[derive(Debug, PartialEq, Serialize)]
#[serde(untagged)]
enum OutPeer {
    Text(String),
    Nodes {
        nodes: &'static str,
    },
    Pods {
        pods: OutPods,
    },
    ServiceAccounts {
        #[serde(rename = "serviceAccounts")]
        service_accounts: Vec<String>,
    },
}

#[derive(Debug, PartialEq, Serialize)]
struct OutPods {
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
}

impl From<&PeerSelector> for OutPeer {
    fn from(s: &PeerSelector) -> Self {
        match s {
            PeerSelector::Nodes(scope) => Self::Nodes {
                nodes: scope.as_str(),
            },
            PeerSelector::Pods { namespace, labels } => Self::Pods {
                pods: OutPods {
                    namespace: namespace.clone(),
                    labels: labels.clone(),
                },
            },
            PeerSelector::ServiceAccounts(accounts) => Self::ServiceAccounts {
                service_accounts: accounts.iter().map(|(ns, n)| format!("{ns}/{n}")).collect(),
            },
            PeerSelector::Apiserver => Self::Text("apiserver".to_owned()),
        }
    }
}

#[derive(Serialize)]
struct OutClients {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    executables: Vec<OutExecutable>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pods: Vec<OutPods>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    units: Vec<String>,
    processes: Vec<String>,
    cgroups: Vec<OutCgroup>,
    containers: Vec<String>,
}

/// An outbound client seen while learning: its executable's path, or only its task name
/// when the path could not be read.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum LearnedClient {
    Executable(String),
    Name(String),
}

/// An executable as the policy file writes it: a path, or a path with its units.
#[derive(Serialize, PartialEq, Eq)]
#[serde(untagged)]
enum OutExecutable {
    Path(String),
    InUnits { path: String, units: Vec<String> },
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
                exe: None,
            }),
            netns: 0,
            count: 1,
            window_summary: false,
            forward: None,
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
            learned.observe(&base, o, None);
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

    #[test]
    fn known_identities_are_learned_as_selectors() {
        use crate::identity::{NodeIdentity, PodIdentity};
        use std::sync::Arc;
        let base = Policy::embedded_default();
        let pod = |sa: &str| PeerIdentity {
            pod: Some(Arc::new(PodIdentity {
                namespace: "tools".into(),
                name: "scraper-7d9f-abcde".into(),
                service_account: Some(sa.into()),
                labels: [
                    ("app".to_owned(), "scraper".to_owned()),
                    ("pod-template-hash".to_owned(), "7d9f".to_owned()),
                ]
                .into(),
                ..PodIdentity::default()
            })),
            ..PeerIdentity::default()
        };
        let worker = PeerIdentity {
            node: Some(Arc::new(NodeIdentity {
                name: "worker-1".into(),
                roles: BTreeSet::new(),
                addresses: vec![],
                pod_cidrs: vec![],
            })),
            ..PeerIdentity::default()
        };
        let by_sa = pod("scraper");
        let by_labels = pod("default");
        let inbound = |port: u16, ip: &str| {
            obs(
                EventKind::Inbound,
                &format!("10.0.0.1:{port}"),
                &format!("{ip}:40000"),
                None,
            )
        };
        let seen = [
            (inbound(10250, "198.51.100.30"), &by_sa),
            (inbound(10249, "198.51.100.31"), &by_labels),
            (inbound(2379, "192.0.2.40"), &worker),
        ];
        let mut learned = Learned::default();
        for (o, id) in &seen {
            learned.observe(&base, o, Some(id));
        }
        let yaml = learned.to_policy_yaml(&base).unwrap();
        assert!(yaml.contains("tools/scraper"), "{yaml}");
        assert!(!yaml.contains("pod-template-hash"), "{yaml}");
        assert!(
            !yaml.contains("198.51.100.3"),
            "addresses of known peers: {yaml}"
        );
        let policy = Policy::parse(&yaml, "learned.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        for (o, id) in &seen {
            let c = ClientContext {
                peer: Some(id),
                ..ClientContext::default()
            };
            assert_eq!(
                judge(&policy, o, &c).unwrap().verdict,
                Verdict::Expected,
                "{yaml}"
            );
            // The same address without that identity is not expected.
            let unknown = PeerIdentity::default();
            let c = ClientContext {
                peer: Some(&unknown),
                ..ClientContext::default()
            };
            assert_ne!(judge(&policy, o, &c).unwrap().verdict, Verdict::Expected);
        }
    }
}
