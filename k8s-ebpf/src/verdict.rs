//! Judges one observation against the policy: was this contact expected or not, and if
//! not, what kind of finding it is. No state, no time: windows and counts are
//! [`crate::correlate`]'s job.

use std::{fmt, net::IpAddr};

use crate::{
    capture::{EventKind, Observation},
    identity::{PeerIdentity, PodIdentity},
    policy::{is_loopback, ClientMatch, ExpectedClients, Policy, Rule, RuleNetns},
    ports::BindScope,
};

/// What is known about the local task beyond the observation itself, resolved by the
/// caller from its cgroup ([`crate::identity::CgroupView`]). Empty by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientContext<'a> {
    /// The cgroup path from the hierarchy's root where known (else as read).
    pub cgroup_path: Option<&'a str>,
    /// The systemd system unit (under `/system.slice`) the task runs in.
    pub unit: Option<&'a str>,
    /// The container id, only from its place in the runtime's pod hierarchy.
    pub container_id: Option<&'a str>,
    /// The remote address is one of this node's own addresses (seen from the node's own
    /// network namespace): the connection never leaves the node. Outbound, it is no pivot
    /// (its inbound side is judged on its own); inbound, it counts as `loopback`.
    pub peer_is_node: bool,
    /// The remote peer's Kubernetes identity (`None`: no Kubernetes API configured, so
    /// selectors cannot match; an unknown identity is `Some` with nothing in it).
    pub peer: Option<&'a PeerIdentity>,
    /// Outbound: the pod of the local process's container, when known.
    pub pod: Option<&'a PodIdentity>,
    /// The policy executable whose file (device, inode) the local process runs, as the
    /// caller's [`crate::policy::executables::ExecutableIndex`] resolved it.
    pub executable: Option<&'a std::path::Path>,
    /// The local process's executable path as `/proc/PID/exe` named it when the record
    /// was judged (for the alert; never for a verdict: paths can be renamed).
    pub executable_path: Option<&'a str>,
    /// The record comes from a pod's network namespace: the daemon watches every
    /// namespace (`--netns all`) and this one is not the node's.
    pub in_pod_netns: bool,
    /// Outbound: the destination is the node or the control plane — one of this node's
    /// own addresses, another node's, an API server endpoint, or the `kubernetes`
    /// Service address.
    pub to_control_plane: bool,
    /// Outbound from a pod's namespace: the Kubernetes identity of the local address
    /// (the pod itself), so a pod the rule expects as a peer is an expected client.
    pub local_peer: Option<&'a PeerIdentity>,
    /// The other end of the same connection, when both are on this node and both were
    /// seen: the client's outbound record, joined to this (the node's) side.
    pub client_side: Option<&'a ClientSide<'a>>,
}

/// The client's end of a connection whose server end is the record being judged: what
/// the client's own (outbound) record said, and what was resolved about its process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientSide<'a> {
    pub obs: &'a Observation,
    pub container_id: Option<&'a str>,
    pub executable_path: Option<&'a str>,
    /// How the client process matched the rule's `expected_clients`, if it did.
    pub client_match: Option<ClientMatch>,
}

/// Why a record from a pod's network namespace is not judged under a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutOfScope {
    /// A connection into a pod (or an attempt on a pod's port).
    PodInbound,
    /// A pod listening on the port.
    PodListener,
    /// A pod connecting to neither a node nor the control plane (pod to pod, or out of
    /// the cluster).
    PodOutbound,
}

impl OutOfScope {
    pub const ALL: [Self; 3] = [Self::PodInbound, Self::PodListener, Self::PodOutbound];

    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PodInbound => "pod_inbound",
            Self::PodListener => "pod_listener",
            Self::PodOutbound => "pod_outbound",
        }
    }
}

/// Whether `rule` leaves `obs` unjudged: under `--netns all`, a pod's own inbound
/// connections and listeners, and its outbound connections that reach neither a node
/// nor the control plane, are not control-plane events unless the rule says
/// `netns: all`. A port number alone does not make a pod's etcd the cluster's.
pub fn out_of_scope(
    rule: &Rule,
    obs: &Observation,
    client: &ClientContext<'_>,
) -> Option<OutOfScope> {
    if !client.in_pod_netns || rule.netns == RuleNetns::All {
        return None;
    }
    match obs.kind {
        EventKind::Outbound if client.to_control_plane => None,
        EventKind::Outbound => Some(OutOfScope::PodOutbound),
        EventKind::Listen | EventKind::ListenClose => Some(OutOfScope::PodListener),
        EventKind::Inbound | EventKind::Refused | EventKind::Syn | EventKind::HalfOpen => {
            Some(OutOfScope::PodInbound)
        }
    }
}

/// Why an observation is unexpected; each maps to one alert `event.action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Finding {
    /// A peer not in the rule's expected peers connected in.
    UnexpectedInbound,
    /// A local process not in the rule's expected clients connected out.
    UnexpectedOutbound,
    /// A loopback-only port is listening on a wildcard or non-loopback address.
    ExposedListener,
    /// An unexpected peer reached the port and nothing listened (RST).
    RefusedAttempt,
    /// An unexpected peer sent a SYN to a listening port and never completed the
    /// handshake (a SYN scan, a SYN flood).
    HalfOpenAttempt,
}

impl Finding {
    /// The alert's `event.action`.
    pub fn action(self) -> &'static str {
        match self {
            Self::UnexpectedInbound => "unexpected-inbound",
            Self::UnexpectedOutbound => "unexpected-outbound",
            Self::ExposedListener => "exposed-listener",
            Self::RefusedAttempt => "refused-attempt",
            Self::HalfOpenAttempt => "half-open-attempt",
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.action())
    }
}

/// The judgement on one observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed by the policy, or nothing to judge (a listener closing).
    Expected,
    Unexpected {
        reason: Finding,
    },
}

impl Verdict {
    pub fn is_expected(self) -> bool {
        matches!(self, Self::Expected)
    }

    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expected => "expected",
            Self::Unexpected { .. } => "unexpected",
        }
    }
}

/// A verdict and the rule it was reached under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judgement<'p> {
    pub rule: &'p Rule,
    pub verdict: Verdict,
    /// Outbound: how the local process was recognised as an expected client.
    pub client_match: Option<ClientMatch>,
}

/// Judges `obs` under the policy's rule for its watched port; `None` when the policy no
/// longer watches that port (a record in flight across a policy reload).
pub fn judge<'p>(
    policy: &'p Policy,
    obs: &Observation,
    client: &ClientContext<'_>,
) -> Option<Judgement<'p>> {
    let rule = policy.rule(obs.watched_port())?;
    Some(Judgement {
        rule,
        verdict: judge_rule(rule, obs, client),
        client_match: (obs.kind == EventKind::Outbound)
            .then(|| client_match(&rule.expected_clients, obs, client))
            .flatten(),
    })
}

/// Judges `obs` under `rule` (the caller matched the port).
pub fn judge_rule(rule: &Rule, obs: &Observation, client: &ClientContext<'_>) -> Verdict {
    let unexpected = |reason| Verdict::Unexpected { reason };
    let peer_expected = rule.expected_peers.admits(obs.remote.ip(), client.peer)
        || (client.peer_is_node && rule.expected_peers.includes_loopback());
    match obs.kind {
        EventKind::Inbound if peer_expected => Verdict::Expected,
        EventKind::Inbound => unexpected(Finding::UnexpectedInbound),
        EventKind::Refused if peer_expected => Verdict::Expected,
        EventKind::Refused => unexpected(Finding::RefusedAttempt),
        // A raw SYN record only reaches a verdict where no tracker resolved it (`learn`);
        // it is an attempt either way.
        EventKind::Syn | EventKind::HalfOpen if peer_expected => Verdict::Expected,
        EventKind::Syn | EventKind::HalfOpen => unexpected(Finding::HalfOpenAttempt),
        EventKind::Outbound if client_expected(rule, obs, client) => Verdict::Expected,
        EventKind::Outbound => unexpected(Finding::UnexpectedOutbound),
        // A Kubernetes object publishing the node's port elsewhere takes it from whatever
        // listens there, whatever the rule's `bind` allows: a finding on any watched port.
        EventKind::Listen if obs.forwarded_by().is_some() => unexpected(Finding::ExposedListener),
        EventKind::Listen if bind_allowed(rule.bind, obs.local.ip()) => Verdict::Expected,
        EventKind::Listen => unexpected(Finding::ExposedListener),
        EventKind::ListenClose => Verdict::Expected,
    }
}

fn bind_allowed(scope: BindScope, bound: IpAddr) -> bool {
    match scope {
        BindScope::Any => true,
        // The wildcard (0.0.0.0 / ::) is not loopback: it exposes the port everywhere.
        BindScope::Loopback => is_loopback(bound),
        BindScope::None => false,
    }
}

fn client_expected(rule: &Rule, obs: &Observation, client: &ClientContext<'_>) -> bool {
    // A connection to this node's own loopback or addresses never leaves it.
    is_loopback(obs.remote.ip())
        || client.peer_is_node
        || client_match(&rule.expected_clients, obs, client).is_some()
        // From a pod's own namespace the client is the pod: one the rule expects as a
        // peer (by its address or identity) is expected wherever it connects to.
        || (client.in_pod_netns && rule.expected_peers.admits(obs.local.ip(), client.local_peer))
}

/// The strongest identity by which the local process is an expected client, if any.
pub fn client_match(
    clients: &ExpectedClients,
    obs: &Observation,
    client: &ClientContext<'_>,
) -> Option<ClientMatch> {
    let process = obs.process.as_ref();
    if client
        .executable
        .is_some_and(|path| clients.allows_executable(path, client.unit))
    {
        return Some(ClientMatch::Executable);
    }
    if client.pod.is_some_and(|pod| clients.allows_pod(pod)) {
        return Some(ClientMatch::Pod);
    }
    if process.is_some_and(|p| p.cgroup_id != 0 && clients.allows_cgroup_id(p.cgroup_id))
        || client
            .cgroup_path
            .is_some_and(|path| clients.allows_cgroup_path(path))
        || client.unit.is_some_and(|unit| clients.allows_unit(unit))
    {
        return Some(ClientMatch::Cgroup);
    }
    if client
        .container_id
        .is_some_and(|id| clients.allows_container(id))
    {
        return Some(ClientMatch::Container);
    }
    if process.is_some_and(|p| clients.allows_process(&p.name)) {
        return Some(ClientMatch::Comm);
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{net::SocketAddr, time::SystemTime};

    use super::*;

    #[test]
    fn out_of_scope_labels_are_the_ones_metrics_create() {
        assert_eq!(
            OutOfScope::ALL.map(OutOfScope::as_str),
            crate::metrics::OUT_OF_SCOPE_REASONS
        );
    }
    use crate::capture::{HookKind, ProcessInfo};

    pub(crate) const POLICY: &str = "\
version: 1
peers:
  cp: [10.0.0.10]
rules:
  - name: kubelet
    port: 10250
    expected_peers: [loopback, \"@cp\"]
    expected_clients:
      processes: [kube-apiserver]
      cgroups: [77, /system.slice/apiserver.service]
      containers: [abc123]
  - name: etcd-metrics
    port: 2381
    bind: loopback
    expected_peers: [loopback]
";

    pub(crate) fn obs(
        kind: EventKind,
        local: &str,
        remote: &str,
        comm: Option<&str>,
    ) -> Observation {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("test socket address");
        Observation {
            kind,
            hook: HookKind::Tracepoint,
            at: SystemTime::UNIX_EPOCH,
            local: addr(local),
            remote: addr(remote),
            process: comm.map(|name| ProcessInfo {
                pid: 4242,
                tid: 4243,
                name: name.to_owned(),
                cgroup_id: 9,
                exe: None,
            }),
            netns: 4026531840,
            count: 1,
            window_summary: false,
            forward: None,
        }
    }

    fn policy() -> Policy {
        Policy::parse(POLICY, "t").expect("test policy")
    }

    fn verdict(o: &Observation) -> Verdict {
        verdict_with(o, &ClientContext::default())
    }

    fn verdict_with(o: &Observation, c: &ClientContext<'_>) -> Verdict {
        let p = policy();
        judge(&p, o, c).expect("watched").verdict
    }

    const UNEXPECTED_IN: Verdict = Verdict::Unexpected {
        reason: Finding::UnexpectedInbound,
    };

    #[test]
    fn inbound_peers() {
        let v = |remote| verdict(&obs(EventKind::Inbound, "10.0.0.2:10250", remote, None));
        assert_eq!(v("10.0.0.10:40000"), Verdict::Expected);
        assert_eq!(v("127.0.0.1:40000"), Verdict::Expected);
        assert_eq!(v("[::1]:40000"), Verdict::Expected);
        assert_eq!(v("10.0.0.11:40000"), UNEXPECTED_IN);
        assert_eq!(v("[2001:db8::1]:40000"), UNEXPECTED_IN);
        // The node's own address counts as loopback.
        let own = obs(EventKind::Inbound, "10.0.0.2:10250", "10.0.0.2:40000", None);
        let node = ClientContext {
            peer_is_node: true,
            ..Default::default()
        };
        assert_eq!(verdict_with(&own, &node), Verdict::Expected);
    }

    #[test]
    fn refused_is_an_alert_unless_the_peer_is_expected() {
        let v = |remote| verdict(&obs(EventKind::Refused, "10.0.0.2:10250", remote, None));
        assert_eq!(v("10.0.0.10:1"), Verdict::Expected);
        assert_eq!(
            v("192.0.2.1:1"),
            Verdict::Unexpected {
                reason: Finding::RefusedAttempt
            }
        );
    }

    #[test]
    fn outbound_clients() {
        let out = Verdict::Unexpected {
            reason: Finding::UnexpectedOutbound,
        };
        let o = |remote, comm| obs(EventKind::Outbound, "10.0.0.2:50000", remote, comm);
        assert_eq!(
            verdict(&o("10.0.0.3:10250", Some("kube-apiserver"))),
            Verdict::Expected
        );
        assert_eq!(verdict(&o("10.0.0.3:10250", Some("curl"))), out);
        assert_eq!(verdict(&o("10.0.0.3:10250", None)), out);
        // Loopback destinations never leave the node.
        assert_eq!(
            verdict(&o("127.0.0.1:10250", Some("curl"))),
            Verdict::Expected
        );
        // By cgroup id, cgroup path, container id.
        let mut by_id = o("10.0.0.3:10250", Some("curl"));
        if let Some(p) = by_id.process.as_mut() {
            p.cgroup_id = 77;
        }
        assert_eq!(verdict(&by_id), Verdict::Expected);
        let curl = o("10.0.0.3:10250", Some("curl"));
        let path = ClientContext {
            cgroup_path: Some("/system.slice/apiserver.service"),
            ..Default::default()
        };
        assert_eq!(verdict_with(&curl, &path), Verdict::Expected);
        let container = ClientContext {
            container_id: Some("abc123def456"),
            ..Default::default()
        };
        assert_eq!(verdict_with(&curl, &container), Verdict::Expected);
        let other = ClientContext {
            cgroup_path: Some("/kubepods/x"),
            container_id: Some("ffff"),
            ..Default::default()
        };
        assert_eq!(verdict_with(&curl, &other), out);
        // To one of the node's own addresses: it never leaves the node.
        let local = ClientContext {
            peer_is_node: true,
            ..Default::default()
        };
        assert_eq!(verdict_with(&curl, &local), Verdict::Expected);
    }

    #[test]
    fn listen_scope() {
        let exposed = Verdict::Unexpected {
            reason: Finding::ExposedListener,
        };
        let l = |local| verdict(&obs(EventKind::Listen, local, "0.0.0.0:0", Some("etcd")));
        assert_eq!(l("127.0.0.1:2381"), Verdict::Expected);
        assert_eq!(l("[::1]:2381"), Verdict::Expected);
        assert_eq!(l("0.0.0.0:2381"), exposed);
        assert_eq!(l("[::]:2381"), exposed);
        assert_eq!(l("10.0.0.2:2381"), exposed);
        // `bind: any` ports may listen anywhere.
        assert_eq!(l("0.0.0.0:10250"), Verdict::Expected);
    }

    #[test]
    fn listen_close_never_alerts() {
        let o = obs(EventKind::ListenClose, "0.0.0.0:2381", "0.0.0.0:0", None);
        assert_eq!(verdict(&o), Verdict::Expected);
    }

    #[test]
    fn unwatched_port_has_no_judgement() {
        let p = policy();
        let o = obs(EventKind::Inbound, "10.0.0.2:22", "10.9.9.9:1", None);
        assert!(judge(&p, &o, &ClientContext::default()).is_none());
    }

    #[test]
    fn actions() {
        assert_eq!(Finding::ExposedListener.action(), "exposed-listener");
        assert_eq!(Finding::RefusedAttempt.to_string(), "refused-attempt");
        assert_eq!(UNEXPECTED_IN.as_str(), "unexpected");
    }

    #[test]
    fn clients_match_by_the_strongest_identity_and_say_which() {
        let text = "version: 1\nrules:\n  - name: kubelet\n    port: 10250\n    expected_clients:\n      executables: [/usr/local/bin/kube-apiserver]\n      pods: [{namespace: kube-system, labels: {component: kube-apiserver}}]\n      units: [kube-apiserver.service]\n      processes: [kube-apiserver]\n";
        let p = Policy::parse(text, "t.yaml").expect("policy");
        let named = obs(
            EventKind::Outbound,
            "10.0.0.2:0",
            "10.0.0.3:10250",
            Some("kube-apiserver"),
        );
        let matched = |c: &ClientContext<'_>| judge(&p, &named, c).unwrap().client_match;
        let exe = std::path::Path::new("/usr/local/bin/kube-apiserver");
        let by_exe = ClientContext {
            executable: Some(exe),
            ..Default::default()
        };
        assert_eq!(matched(&by_exe), Some(ClientMatch::Executable));
        let mut pod = PodIdentity {
            namespace: "kube-system".into(),
            ..Default::default()
        };
        pod.labels.insert("component", "kube-apiserver");
        let by_pod = ClientContext {
            pod: Some(&pod),
            ..Default::default()
        };
        assert_eq!(matched(&by_pod), Some(ClientMatch::Pod));
        let by_unit = ClientContext {
            unit: Some("kube-apiserver.service"),
            ..Default::default()
        };
        assert_eq!(matched(&by_unit), Some(ClientMatch::Cgroup));
        // A user's cgroup whose last component is the unit's name: no unit (the caller's
        // cgroup view gave none), only the task name.
        let user_unit = ClientContext {
            cgroup_path: Some(
                "/user.slice/user-1000.slice/user@1000.service/app.slice/kube-apiserver.service",
            ),
            ..Default::default()
        };
        assert_eq!(matched(&user_unit), Some(ClientMatch::Comm));
        // Only the task name: still expected here (the policy lists it), and visible.
        assert_eq!(matched(&ClientContext::default()), Some(ClientMatch::Comm));
        // A copy of an interpreter under another path: not the listed file.
        let other = ClientContext {
            executable: Some(std::path::Path::new("/tmp/kube-apiserver")),
            ..Default::default()
        };
        assert_eq!(matched(&other), Some(ClientMatch::Comm));
        let renamed = obs(
            EventKind::Outbound,
            "10.0.0.2:0",
            "10.0.0.3:10250",
            Some("python3"),
        );
        assert_eq!(
            judge(&p, &renamed, &other).unwrap().verdict,
            Verdict::Unexpected {
                reason: Finding::UnexpectedOutbound
            }
        );
    }

    #[test]
    fn a_multi_call_binary_is_expected_only_in_its_units() {
        let text = "version: 1\nrules:\n  - name: etcd\n    port: 2379\n    expected_clients:\n      executables: [{path: /usr/local/bin/k3s, units: [k3s.service, k3s-agent.service]}]\n";
        let p = Policy::parse(text, "t.yaml").expect("policy");
        let kubectl = obs(
            EventKind::Outbound,
            "10.0.0.2:0",
            "10.0.0.3:2379",
            Some("kubectl"),
        );
        let k3s = std::path::Path::new("/usr/local/bin/k3s");
        let in_unit = |unit| ClientContext {
            executable: Some(k3s),
            unit,
            ..Default::default()
        };
        let j = |c: &ClientContext<'_>| judge(&p, &kubectl, c).unwrap();
        assert_eq!(j(&in_unit(Some("k3s.service"))).verdict, Verdict::Expected);
        assert_eq!(
            j(&in_unit(Some("k3s.service"))).client_match,
            Some(ClientMatch::Executable)
        );
        assert_eq!(
            j(&in_unit(Some("k3s-agent.service"))).verdict,
            Verdict::Expected
        );
        for unit in [None, Some("ssh.service")] {
            assert_eq!(
                j(&in_unit(unit)).verdict,
                Verdict::Unexpected {
                    reason: Finding::UnexpectedOutbound
                },
                "{unit:?}"
            );
        }
    }

    #[test]
    fn executables_must_be_absolute_and_units_unit_names() {
        for bad in [
            "executables: [kube-apiserver]",
            "units: [/system.slice]",
            "executables: [{path: /usr/local/bin/k3s, units: []}]",
            "executables: [{path: /usr/local/bin/k3s, units: [system.slice/k3s]}]",
            "executables: [{path: k3s, units: [k3s.service]}]",
            "executables: [{path: /usr/local/bin/k3s, unit: k3s.service}]",
        ] {
            let text = format!(
                "version: 1\nrules:\n  - name: kubelet\n    port: 10250\n    expected_clients: {{{bad}}}\n"
            );
            let err = Policy::parse(&text, "t.yaml").expect_err(bad).to_string();
            assert!(err.contains("t.yaml:"), "{err}");
        }
    }

    #[test]
    fn pods_own_traffic_is_out_of_scope_unless_the_rule_opts_in() {
        let text = "version: 1\nrules:\n  - {name: etcd, port: 2379, expected_peers: [198.51.100.2]}\n  - {name: app, port: 10250, netns: all}\n";
        let p = Policy::parse(text, "t.yaml").expect("policy");
        let etcd = p.rule(2379).expect("rule");
        let app = p.rule(10250).expect("rule");
        let pod = ClientContext {
            in_pod_netns: true,
            ..Default::default()
        };
        let to_node = ClientContext {
            to_control_plane: true,
            ..pod
        };
        let inbound = obs(
            EventKind::Inbound,
            "203.0.113.2:2379",
            "198.51.100.9:1",
            None,
        );
        let listen = obs(EventKind::Listen, "0.0.0.0:2379", "0.0.0.0:0", Some("etcd"));
        let outbound = obs(
            EventKind::Outbound,
            "198.51.100.9:0",
            "203.0.113.2:2379",
            Some("etcd"),
        );
        assert_eq!(
            out_of_scope(etcd, &inbound, &pod),
            Some(OutOfScope::PodInbound)
        );
        assert_eq!(
            out_of_scope(etcd, &listen, &pod),
            Some(OutOfScope::PodListener)
        );
        assert_eq!(
            out_of_scope(etcd, &outbound, &pod),
            Some(OutOfScope::PodOutbound)
        );
        // To the node or the control plane, a pod's outbound connection is judged.
        assert_eq!(out_of_scope(etcd, &outbound, &to_node), None);
        // The node's namespace: everything is judged.
        for o in [&inbound, &listen, &outbound] {
            assert_eq!(out_of_scope(etcd, o, &ClientContext::default()), None);
        }
        // `netns: all`: pods too.
        let mut on_app = inbound.clone();
        on_app.local.set_port(10250);
        assert_eq!(out_of_scope(app, &on_app, &pod), None);
        // From its own namespace, a pod the rule expects as a peer is an expected client.
        let from_expected = obs(
            EventKind::Outbound,
            "198.51.100.2:0",
            "192.0.2.1:2379",
            Some("curl"),
        );
        assert_eq!(
            judge_rule(etcd, &from_expected, &to_node),
            Verdict::Expected
        );
        assert_eq!(
            judge_rule(etcd, &from_expected, &ClientContext::default()),
            Verdict::Unexpected {
                reason: Finding::UnexpectedOutbound
            },
            "only from a pod's namespace is the local address the pod's"
        );
        assert_eq!(
            judge_rule(etcd, &outbound, &to_node),
            Verdict::Unexpected {
                reason: Finding::UnexpectedOutbound
            }
        );
        let bad = "version: 1\nrules:\n  - {name: etcd, port: 2379, netns: pods}\n";
        let err = Policy::parse(bad, "t.yaml")
            .expect_err("unknown netns")
            .to_string();
        assert!(err.contains("t.yaml:3:"), "{err}");
    }

    #[test]
    fn bind_none_makes_every_listener_an_exposure() {
        let text = "version: 1\nrules:\n  - {name: kubelet-readonly, port: 10255, bind: none}\n";
        let p = Policy::parse(text, "t.yaml").expect("policy");
        for local in ["127.0.0.1:10255", "0.0.0.0:10255", "[::1]:10255"] {
            let o = obs(EventKind::Listen, local, "0.0.0.0:0", Some("kubelet"));
            assert_eq!(
                judge(&p, &o, &ClientContext::default()).unwrap().verdict,
                Verdict::Unexpected {
                    reason: Finding::ExposedListener
                },
                "{local}"
            );
        }
    }
}
