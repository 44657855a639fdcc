//! The policy file as written: serde structs that mirror the YAML one to one, every
//! value that can be wrong kept with its position for the validator.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::RuleNetns;
use crate::ports::{BindScope, Severity};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub version: Spanned<i64>,
    /// A profile this file starts from (see [`super::merge`]).
    #[serde(default)]
    pub extends: Option<Spanned<String>>,
    /// The distribution the policy is written for, named in alerts (`k8s_ebpf.profile`).
    #[serde(default)]
    pub profile: Option<Spanned<String>>,
    #[serde(default)]
    pub defaults: Option<RawDefaults>,
    /// Named peer groups: name → CIDRs / addresses / `loopback` / selectors.
    #[serde(default)]
    pub peers: Option<Spanned<BTreeMap<String, Vec<Spanned<RawPeer>>>>>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    #[serde(default)]
    pub window: Option<Spanned<String>>,
    #[serde(default)]
    pub scan: Option<RawScan>,
    #[serde(default)]
    pub flood: Option<RawFlood>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFlood {
    #[serde(default)]
    pub sources: Option<Spanned<i64>>,
    #[serde(default)]
    pub lines: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawScan {
    #[serde(default)]
    pub ports: Option<Spanned<i64>>,
    #[serde(default)]
    pub window: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub name: Spanned<String>,
    pub port: Spanned<i64>,
    #[serde(default)]
    pub component: Option<String>,
    #[serde(default)]
    pub severity: Option<Severity>,
    #[serde(default)]
    pub bind: Option<BindScope>,
    /// Which network namespaces the rule judges (`--netns all`): `node` or `all`.
    #[serde(default)]
    pub netns: Option<RuleNetns>,
    #[serde(default)]
    pub expected_peers: Vec<Spanned<RawPeer>>,
    #[serde(default)]
    pub expected_clients: RawClients,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClients {
    /// Absolute paths of executables (matched by the file the kernel ran), each alone or
    /// with the systemd units it must run in.
    #[serde(default)]
    pub executables: Vec<Spanned<RawExecutable>>,
    /// The local process's pod (through its container id).
    #[serde(default)]
    pub pods: Vec<Spanned<RawPods>>,
    /// systemd units (`kubelet.service`), through the process's cgroup path.
    #[serde(default)]
    pub units: Vec<Spanned<String>>,
    #[serde(default)]
    pub processes: Vec<Spanned<String>>,
    #[serde(default)]
    pub cgroups: Vec<Spanned<RawCgroup>>,
    #[serde(default)]
    pub containers: Vec<Spanned<String>>,
}

/// An executable as written: its path, or `{path, units}` (a multi-call binary expected
/// only as the system units that run it).
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "an executable: an absolute path, or a map `{path: /usr/local/bin/k3s, units: [k3s.service]}`"
)]
pub(super) enum RawExecutable {
    Path(String),
    InUnits(RawExecutableInUnits),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExecutableInUnits {
    pub path: String,
    pub units: Vec<String>,
}

/// A cgroup as written: a cgroup v2 id (number) or a cgroup path prefix (string).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawCgroup {
    Id(u64),
    Path(String),
}

/// One `expected_peers` entry as written: a word (`loopback`, `apiserver`, `@group`, an
/// address or CIDR) or a one-key Kubernetes selector map.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a peer: `loopback`, `apiserver`, `@group`, an address or CIDR, or a map with one of `nodes`, `pods`, `serviceAccounts`"
)]
pub(super) enum RawPeer {
    Text(String),
    Selector(RawSelector),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawSelector {
    /// `control-plane` or `all`.
    #[serde(default)]
    pub nodes: Option<String>,
    #[serde(default)]
    pub pods: Option<RawPods>,
    /// `namespace/name` entries.
    #[serde(default)]
    pub service_accounts: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPods {
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}
