//! Distribution profiles: the embedded policy for each Kubernetes distribution the port
//! table covers (kubeadm, EKS, GKE, AKS, k3s), written from the table's per-distribution
//! defaults and the providers' documentation (each profile file names its sources), and
//! how `run --profile auto` picks one from the local Node object.
//!
//! The kubeadm profile *is* the embedded default policy; the others are full policies of
//! their own (`k8s-ebpf/policy/profiles/*.yaml`), so `k8s-ebpf profiles NAME` prints
//! exactly what runs and a policy file can start from one with `extends: NAME`.

use std::{collections::BTreeMap, fmt, str::FromStr};

use crate::{
    identity::{ApiConfig, ApiMode},
    ports::{BindScope, Exposure, WatchedPort, PORTS},
};

/// One distribution's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Profile {
    Kubeadm,
    Eks,
    Gke,
    Aks,
    K3s,
}

impl Profile {
    pub const ALL: [Profile; 5] = [
        Profile::Kubeadm,
        Profile::Eks,
        Profile::Gke,
        Profile::Aks,
        Profile::K3s,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Kubeadm => "kubeadm",
            Self::Eks => "eks",
            Self::Gke => "gke",
            Self::Aks => "aks",
            Self::K3s => "k3s",
        }
    }

    /// One line for `k8s-ebpf profiles`.
    pub fn summary(self) -> &'static str {
        match self {
            Self::Kubeadm => {
                "self-managed (kubeadm): control plane on the nodes; the embedded default policy"
            }
            Self::Eks => {
                "Amazon EKS: managed control plane reaching kubelets from the `kubernetes` \
                 EndpointSlice's ENIs; health checks from your VPC (extends: eks)"
            }
            Self::Gke => {
                "Google GKE: managed control plane via konnectivity; load-balancer health \
                 checks from 35.191.0.0/16 and 130.211.0.0/22; read-only kubelet on older pools"
            }
            Self::Aks => {
                "Azure AKS: managed control plane via konnectivity; health probes from \
                 168.63.129.16"
            }
            Self::K3s => {
                "k3s: kubelet, API server and embedded etcd in one process (/usr/local/bin/k3s)"
            }
        }
    }

    /// The profile's policy text (a complete version-1 policy, no `extends`).
    pub fn yaml(self) -> &'static str {
        match self {
            Self::Kubeadm => super::EMBEDDED_DEFAULT_YAML,
            Self::Eks => include_str!("../../policy/profiles/eks.yaml"),
            Self::Gke => include_str!("../../policy/profiles/gke.yaml"),
            Self::Aks => include_str!("../../policy/profiles/aks.yaml"),
            Self::K3s => include_str!("../../policy/profiles/k3s.yaml"),
        }
    }

    /// The port table's default exposure of `port` on this distribution.
    pub fn defaults(self, port: &WatchedPort) -> Exposure {
        let d = &port.defaults;
        match self {
            Self::Kubeadm => d.kubeadm,
            Self::Eks => d.eks,
            Self::Gke => d.gke,
            Self::Aks => d.aks,
            Self::K3s => d.k3s,
        }
    }

    /// Ports the distribution ships on all interfaces where the hardened bind is loopback:
    /// a node as installed alerts there (`exposed-listener`, naming the profile).
    pub fn shipped_exposures(self) -> Vec<u16> {
        PORTS
            .iter()
            .filter(|p| {
                p.allowed_bind == BindScope::Loopback
                    && self.defaults(p).bind.starts_with("all interfaces")
            })
            .map(|p| p.port)
            .collect()
    }

    /// How errors name the profile's text.
    pub fn origin(self) -> String {
        format!("<profile {}>", self.name())
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The profile names, for messages.
pub fn names() -> String {
    Profile::ALL
        .iter()
        .map(|p| p.name())
        .collect::<Vec<_>>()
        .join(", ")
}

impl FromStr for Profile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Profile::ALL
            .into_iter()
            .find(|p| p.name() == s.trim())
            .ok_or_else(|| format!("unknown profile `{s}` (profiles: {})", names()))
    }
}

/// `--profile`: a profile, or `auto` (detected from the local Node at start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileChoice {
    Named(Profile),
    Auto,
}

impl FromStr for ProfileChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "auto" {
            return Ok(Self::Auto);
        }
        s.parse()
            .map(Self::Named)
            .map_err(|e: String| format!("{e}, or `auto`"))
    }
}

/// Label key prefixes each managed distribution puts on its nodes.
const LABEL_PREFIXES: [(&str, Profile); 3] = [
    // EKS managed node groups and Karpenter/EKS Auto Mode nodes.
    ("eks.amazonaws.com/", Profile::Eks),
    // `cloud.google.com/gke-nodepool`, `…/gke-os-distribution`, …
    ("cloud.google.com/gke-", Profile::Gke),
    // `kubernetes.azure.com/cluster`, `…/agentpool`, …
    ("kubernetes.azure.com/", Profile::Aks),
];

/// The profile for a node with these labels and `spec.providerID`, and why. k3s sets the
/// providerID `k3s://NODE` (its embedded cloud controller); the managed services label
/// their nodes. Anything else is taken for kubeadm.
pub fn detect(labels: &BTreeMap<String, String>, provider_id: Option<&str>) -> (Profile, String) {
    if let Some(id) = provider_id.filter(|id| id.starts_with("k3s://")) {
        return (Profile::K3s, format!("providerID `{id}`"));
    }
    for (prefix, profile) in LABEL_PREFIXES {
        if let Some(key) = labels.keys().find(|k| k.starts_with(prefix)) {
            return (profile, format!("node label `{key}`"));
        }
    }
    (
        Profile::Kubeadm,
        format!(
            "no label starting with {} and providerID {}: taken for kubeadm",
            LABEL_PREFIXES
                .iter()
                .map(|(p, _)| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", "),
            provider_id.map_or_else(|| "unset".to_owned(), |p| format!("`{p}`")),
        ),
    )
}

/// `--profile auto`: the profile for the node named `node`, from its labels and
/// providerID as identity reads them from the API, and why; kubeadm (with the reason)
/// when the Node cannot be read.
pub async fn detect_profile(config: &ApiConfig, node: &str) -> (Profile, String) {
    if *config.mode() == ApiMode::Off {
        return (
            Profile::Kubeadm,
            "--no-kubernetes: no node to inspect, taken for kubeadm".to_owned(),
        );
    }
    #[cfg(feature = "kubernetes")]
    {
        match crate::identity::local_node(config, node).await {
            Ok((labels, provider_id)) => {
                let (profile, why) = detect(&labels, provider_id.as_deref());
                (profile, format!("Node `{node}`: {why}"))
            }
            Err(e) => (Profile::Kubeadm, format!("{e}: taken for kubeadm")),
        }
    }
    #[cfg(not(feature = "kubernetes"))]
    {
        let _ = node;
        (
            Profile::Kubeadm,
            "built without Kubernetes support: taken for kubeadm".to_owned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(keys: &[&str]) -> BTreeMap<String, String> {
        keys.iter()
            .map(|k| ((*k).to_owned(), "x".to_owned()))
            .collect()
    }

    #[test]
    fn names_round_trip() {
        for p in Profile::ALL {
            assert_eq!(p.name().parse::<Profile>(), Ok(p));
            assert_eq!(
                p.name().parse::<ProfileChoice>(),
                Ok(ProfileChoice::Named(p))
            );
        }
        assert_eq!("auto".parse::<ProfileChoice>(), Ok(ProfileChoice::Auto));
        let err = "openshift".parse::<Profile>().unwrap_err();
        assert!(err.contains("kubeadm, eks, gke, aks, k3s"), "{err}");
        assert!("auto".parse::<Profile>().is_err());
    }

    #[test]
    fn shipped_exposures_come_from_the_port_table() {
        assert_eq!(Profile::Eks.shipped_exposures(), [10249]);
        assert_eq!(Profile::Aks.shipped_exposures(), [10249]);
        for p in [Profile::Kubeadm, Profile::Gke, Profile::K3s] {
            assert!(p.shipped_exposures().is_empty(), "{p}");
        }
        // And the profile's policy does alert there: its bind stays loopback.
        for p in Profile::ALL {
            let policy = crate::policy::Policy::from_profile(p);
            for port in p.shipped_exposures() {
                assert_eq!(
                    policy.rule(port).map(|r| r.bind),
                    Some(BindScope::Loopback),
                    "{p} {port}"
                );
            }
        }
    }

    #[test]
    fn detection_by_labels_and_provider_id() {
        let (p, why) = detect(
            &labels(&["eks.amazonaws.com/nodegroup"]),
            Some("aws:///x/i-1"),
        );
        assert_eq!(p, Profile::Eks);
        assert!(why.contains("eks.amazonaws.com/nodegroup"), "{why}");
        assert_eq!(
            detect(&labels(&["cloud.google.com/gke-nodepool"]), None).0,
            Profile::Gke
        );
        assert_eq!(
            detect(&labels(&["kubernetes.azure.com/cluster"]), None).0,
            Profile::Aks
        );
        let (p, why) = detect(&labels(&[]), Some("k3s://node-a"));
        assert_eq!(p, Profile::K3s);
        assert!(why.contains("k3s://node-a"));
        // Look-alikes are not enough: GKE's prefix is `gke-`, not any cloud.google.com key.
        let (p, why) = detect(
            &labels(&[
                "cloud.google.com/machine-family",
                "node-role.kubernetes.io/control-plane",
            ]),
            Some("gce://project/zone/vm"),
        );
        assert_eq!(p, Profile::Kubeadm);
        assert!(why.contains("gce://project/zone/vm"), "{why}");
    }
}
