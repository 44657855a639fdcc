//! The Kubernetes port knowledge base: what listens on each control-plane and node port,
//! how each distribution binds and protects it, what an attacker gains there, and how to
//! harden it. A static table in code, rendered by `k8s-ebpf ports [--json]` and used as the
//! source of the embedded default policy's component names, severities and bind scopes.

use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};

/// How bad an unexpected contact with a port is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }

    /// One level down (`low` stays `low`).
    pub fn lower(self) -> Self {
        match self {
            Self::Critical => Self::High,
            Self::High => Self::Medium,
            Self::Medium | Self::Low => Self::Low,
        }
    }

    /// ECS `event.severity`: the numbers Elastic's detection rules use for the four
    /// levels, so alerts sort alongside theirs.
    pub fn ecs_severity(self) -> u8 {
        match self {
            Self::Low => 21,
            Self::Medium => 47,
            Self::High => 73,
            Self::Critical => 99,
        }
    }

    /// ECS `event.risk_score` (0–100); the same scale as [`Severity::ecs_severity`].
    pub fn risk_score(self) -> f64 {
        f64::from(self.ecs_severity())
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a listener on a port may bind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BindScope {
    /// Only 127.0.0.0/8 or ::1: anything else exposes the port to the network.
    Loopback,
    /// Any address, including the wildcard.
    Any,
    /// Nowhere: the port should be off (the read-only kubelet), so any listener, even on
    /// loopback, is an exposure.
    None,
}

impl BindScope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Any => "any",
            Self::None => "none",
        }
    }
}

impl fmt::Display for BindScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one distribution binds and protects a port by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Exposure {
    /// Default bind address, in words ("all interfaces", "127.0.0.1", "not on nodes").
    pub bind: &'static str,
    /// Default authentication and authorization.
    pub auth: &'static str,
}

/// The default exposure on each distribution the table covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DistributionDefaults {
    pub kubeadm: Exposure,
    pub aks: Exposure,
    pub eks: Exposure,
    pub gke: Exposure,
    /// k3s: one `k3s server` process runs the API server, controller manager, scheduler,
    /// kubelet and (with `--cluster-init`) embedded etcd; agents run `k3s agent`.
    pub k3s: Exposure,
}

/// One well-known Kubernetes port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct WatchedPort {
    pub port: u16,
    /// Short, stable name used as the default policy rule name (`etcd-client`).
    pub name: &'static str,
    /// The component that listens there (`etcd`, `kubelet`, …).
    pub component: &'static str,
    pub purpose: &'static str,
    pub defaults: DistributionDefaults,
    pub attacker_gains: &'static str,
    pub hardening: &'static str,
    pub severity: Severity,
    /// Where a listener may bind without exposing the port.
    pub allowed_bind: BindScope,
}

/// Managed control planes run etcd, the API server, the controller manager and the
/// scheduler off the customer's nodes.
const MANAGED_CONTROL_PLANE: Exposure = Exposure {
    bind: "not on customer nodes (managed control plane)",
    auth: "provider-managed",
};

/// The table, in port order.
pub static PORTS: &[WatchedPort] = &[
    WatchedPort {
        port: 2379,
        name: "etcd-client",
        component: "etcd",
        purpose: "etcd client API: the cluster's entire state, read and written by kube-apiserver",
        defaults: DistributionDefaults {
            kubeadm: Exposure {
                bind: "all interfaces (127.0.0.1 and the node IP)",
                auth: "TLS client certificates (--client-cert-auth)",
            },
            aks: MANAGED_CONTROL_PLANE,
            eks: MANAGED_CONTROL_PLANE,
            gke: MANAGED_CONTROL_PLANE,
            k3s: Exposure {
                bind: "127.0.0.1 and the node IP (embedded etcd with --cluster-init; SQLite otherwise)",
                auth: "TLS client certificates",
            },
        },
        attacker_gains: "every Secret and service-account token in the cluster; writing etcd \
                         bypasses all API-server admission and RBAC",
        hardening: "allow only the API servers (and etcd peers) by firewall; keep client-cert \
                    auth on; encrypt Secrets at rest",
        severity: Severity::Critical,
        allowed_bind: BindScope::Any,
    },
    WatchedPort {
        port: 2380,
        name: "etcd-peer",
        component: "etcd",
        purpose: "etcd peer replication between members",
        defaults: DistributionDefaults {
            kubeadm: Exposure {
                bind: "node IP",
                auth: "TLS peer certificates (--peer-client-cert-auth)",
            },
            aks: MANAGED_CONTROL_PLANE,
            eks: MANAGED_CONTROL_PLANE,
            gke: MANAGED_CONTROL_PLANE,
            k3s: Exposure {
                bind: "node IP (embedded etcd)",
                auth: "TLS peer certificates",
            },
        },
        attacker_gains: "with a peer certificate, membership in the etcd cluster and a copy of \
                         all cluster state",
        hardening: "allow only the other etcd members; keep peer certificate auth on",
        severity: Severity::High,
        allowed_bind: BindScope::Any,
    },
    WatchedPort {
        port: 2381,
        name: "etcd-metrics",
        component: "etcd",
        purpose: "etcd metrics and health over plain HTTP",
        defaults: DistributionDefaults {
            kubeadm: Exposure {
                bind: "127.0.0.1",
                auth: "none",
            },
            aks: MANAGED_CONTROL_PLANE,
            eks: MANAGED_CONTROL_PLANE,
            gke: MANAGED_CONTROL_PLANE,
            k3s: Exposure {
                bind: "127.0.0.1 (all interfaces with --etcd-expose-metrics)",
                auth: "none",
            },
        },
        attacker_gains: "etcd topology, key counts and request rates; a health endpoint to probe",
        hardening: "keep it on 127.0.0.1; scrape it from the node (or through an \
                    authenticating proxy)",
        severity: Severity::Medium,
        allowed_bind: BindScope::Loopback,
    },
    WatchedPort {
        port: 6443,
        name: "kube-apiserver",
        component: "kube-apiserver",
        purpose: "the Kubernetes API",
        defaults: DistributionDefaults {
            kubeadm: Exposure {
                bind: "all interfaces",
                auth: "x509, tokens, OIDC; anonymous allowed for /version, /healthz, /livez, \
                       /readyz",
            },
            aks: MANAGED_CONTROL_PLANE,
            eks: MANAGED_CONTROL_PLANE,
            gke: MANAGED_CONTROL_PLANE,
            k3s: Exposure {
                bind: "all interfaces (the k3s supervisor in front of the API server)",
                auth: "x509, tokens; the supervisor also serves join endpoints with the node token",
            },
        },
        attacker_gains: "with any stolen credential, whatever RBAC grants it; anonymously, the \
                         exact version to match exploits against",
        hardening: "restrict the source ranges that reach it; disable anonymous auth where \
                    probes allow; audit-log and keep RBAC tight",
        severity: Severity::Critical,
        allowed_bind: BindScope::Any,
    },
    WatchedPort {
        port: 10248,
        name: "kubelet-healthz",
        component: "kubelet",
        purpose: "kubelet health check",
        defaults: DistributionDefaults {
            kubeadm: Exposure {
                bind: "127.0.0.1",
                auth: "none",
            },
            aks: Exposure {
                bind: "127.0.0.1",
                auth: "none",
            },
            eks: Exposure {
                bind: "127.0.0.1",
                auth: "none",
            },
            gke: Exposure {
                bind: "127.0.0.1",
                auth: "none",
            },
            k3s: Exposure {
                bind: "127.0.0.1",
                auth: "none",
            },
        },
        attacker_gains: "little: kubelet liveness",
        hardening: "keep healthzBindAddress on 127.0.0.1",
        severity: Severity::Low,
        allowed_bind: BindScope::Loopback,
    },
    WatchedPort {
        port: 10249,
        name: "kube-proxy-metrics",
        component: "kube-proxy",
        purpose: "kube-proxy metrics over plain HTTP",
        defaults: DistributionDefaults {
            kubeadm: Exposure {
                bind: "127.0.0.1",
                auth: "none",
            },
            aks: Exposure {
                bind: "all interfaces",
                auth: "none",
            },
            eks: Exposure {
                bind: "all interfaces",
                auth: "none",
            },
            gke: Exposure {
                bind: "127.0.0.1 (no kube-proxy with GKE Dataplane V2)",
                auth: "none",
            },
            k3s: Exposure {
                bind: "127.0.0.1",
                auth: "none",
            },
        },
        attacker_gains: "service and endpoint counts, sync timings and the proxy mode: a map \
                         of the cluster's services",
        hardening: "set metricsBindAddress to 127.0.0.1 or firewall it to the monitoring hosts",
        severity: Severity::Medium,
        allowed_bind: BindScope::Loopback,
    },
    WatchedPort {
        port: 10250,
        name: "kubelet",
        component: "kubelet",
        purpose: "kubelet API: exec, attach, port-forward, logs, pod list, metrics",
        defaults: DistributionDefaults {
            kubeadm: Exposure {
                bind: "all interfaces",
                auth: "webhook authn/authz on every API path (anonymous off); the bare root \
                       answers 404",
            },
            aks: Exposure {
                bind: "all interfaces",
                auth: "webhook authn/authz (anonymous off)",
            },
            eks: Exposure {
                bind: "all interfaces",
                auth: "webhook authn/authz (anonymous off)",
            },
            gke: Exposure {
                bind: "all interfaces",
                auth: "webhook authn/authz (anonymous off)",
            },
            k3s: Exposure {
                bind: "all interfaces",
                auth: "webhook authn/authz (anonymous off)",
            },
        },
        attacker_gains: "with a credential the API server would accept: command execution in \
                         every pod on the node and their secrets; the usual pivot from a pod",
        hardening: "keep anonymous auth off and authorization mode Webhook; allow only the API \
                    servers and metrics scrapers by firewall",
        severity: Severity::Critical,
        allowed_bind: BindScope::Any,
    },
    WatchedPort {
        port: 10255,
        name: "kubelet-readonly",
        component: "kubelet",
        purpose: "deprecated read-only kubelet API",
        defaults: DistributionDefaults {
            kubeadm: Exposure {
                bind: "off (readOnlyPort: 0)",
                auth: "none when enabled",
            },
            aks: Exposure {
                bind: "off on current versions",
                auth: "none when enabled",
            },
            eks: Exposure {
                bind: "off (readOnlyPort: 0)",
                auth: "none when enabled",
            },
            gke: Exposure {
                bind: "historically all interfaces; off when insecureKubeletReadonlyPortEnabled \
                       is false",
                auth: "none",
            },
            k3s: Exposure {
                bind: "off (readOnlyPort: 0)",
                auth: "none when enabled",
            },
        },
        attacker_gains: "unauthenticated pod specs, environment variables, images and node \
                         details",
        hardening: "turn it off (readOnlyPort: 0); nothing should ever connect",
        severity: Severity::High,
        allowed_bind: BindScope::None,
    },
    WatchedPort {
        port: 10256,
        name: "kube-proxy-healthz",
        component: "kube-proxy",
        purpose: "kube-proxy health check, used by cloud load balancers",
        defaults: DistributionDefaults {
            kubeadm: Exposure {
                bind: "all interfaces",
                auth: "none",
            },
            aks: Exposure {
                bind: "all interfaces",
                auth: "none",
            },
            eks: Exposure {
                bind: "all interfaces",
                auth: "none",
            },
            gke: Exposure {
                bind: "all interfaces",
                auth: "none",
            },
            k3s: Exposure {
                bind: "all interfaces",
                auth: "none",
            },
        },
        attacker_gains: "little: proxy liveness and last sync time",
        hardening: "allow the load balancers' health-check ranges only",
        severity: Severity::Low,
        allowed_bind: BindScope::Any,
    },
    WatchedPort {
        port: 10257,
        name: "kube-controller-manager",
        component: "kube-controller-manager",
        purpose: "kube-controller-manager health, metrics and debug endpoints (HTTPS)",
        defaults: DistributionDefaults {
            kubeadm: Exposure {
                bind: "127.0.0.1",
                auth: "authn/authz on all paths except /healthz",
            },
            aks: MANAGED_CONTROL_PLANE,
            eks: MANAGED_CONTROL_PLANE,
            gke: MANAGED_CONTROL_PLANE,
            k3s: Exposure {
                bind: "127.0.0.1",
                auth: "authn/authz on all paths except /healthz",
            },
        },
        attacker_gains: "with credentials, metrics and profiling of the component that holds \
                         the service-account signing key",
        hardening: "keep --bind-address=127.0.0.1; scrape through an authenticating proxy",
        severity: Severity::High,
        allowed_bind: BindScope::Loopback,
    },
    WatchedPort {
        port: 10259,
        name: "kube-scheduler",
        component: "kube-scheduler",
        purpose: "kube-scheduler health, metrics and debug endpoints (HTTPS)",
        defaults: DistributionDefaults {
            kubeadm: Exposure {
                bind: "127.0.0.1",
                auth: "authn/authz on all paths except /healthz",
            },
            aks: MANAGED_CONTROL_PLANE,
            eks: MANAGED_CONTROL_PLANE,
            gke: MANAGED_CONTROL_PLANE,
            k3s: Exposure {
                bind: "127.0.0.1",
                auth: "authn/authz on all paths except /healthz",
            },
        },
        attacker_gains: "with credentials, scheduler metrics and profiling data",
        hardening: "keep --bind-address=127.0.0.1; scrape through an authenticating proxy",
        severity: Severity::Medium,
        allowed_bind: BindScope::Loopback,
    },
];

/// The table entry for `port`, if it is a well-known Kubernetes port.
pub fn lookup(port: u16) -> Option<&'static WatchedPort> {
    PORTS.iter().find(|p| p.port == port)
}

/// The table as a JSON array, for `k8s-ebpf ports --json`.
pub fn to_json() -> serde_json::Value {
    // Serializing &'static str fields into a Value cannot fail.
    serde_json::to_value(PORTS).unwrap_or(serde_json::Value::Null)
}

/// The table for a terminal: one summary line per port, then the details of each.
pub fn render_table() -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} {:<24} {:<20} {:<9} {:<8} kubeadm bind / auth",
        "PORT", "COMPONENT", "NAME", "SEVERITY", "BIND"
    );
    for p in PORTS {
        let _ = writeln!(
            out,
            "{:<6} {:<24} {:<20} {:<9} {:<8} {} / {}",
            p.port,
            p.component,
            p.name,
            p.severity,
            p.allowed_bind,
            p.defaults.kubeadm.bind,
            p.defaults.kubeadm.auth
        );
    }
    for p in PORTS {
        let _ = writeln!(
            out,
            "\n{} {} ({}): {}",
            p.port, p.name, p.component, p.purpose
        );
        for (dist, e) in [
            ("kubeadm", p.defaults.kubeadm),
            ("AKS", p.defaults.aks),
            ("EKS", p.defaults.eks),
            ("GKE", p.defaults.gke),
            ("k3s", p.defaults.k3s),
        ] {
            let _ = writeln!(out, "  {dist:<8} bind: {}; auth: {}", e.bind, e.auth);
        }
        let _ = writeln!(out, "  attacker gains: {}", p.attacker_gains);
        let _ = writeln!(out, "  hardening:      {}", p.hardening);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn table_is_sorted_and_unique() {
        let ports: Vec<u16> = PORTS.iter().map(|p| p.port).collect();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(ports, sorted);
        let names: BTreeSet<&str> = PORTS.iter().map(|p| p.name).collect();
        assert_eq!(names.len(), PORTS.len());
    }

    #[test]
    fn covers_the_control_plane_ports() {
        for port in [
            2379, 2380, 2381, 6443, 10248, 10249, 10250, 10255, 10256, 10257, 10259,
        ] {
            assert!(lookup(port).is_some(), "{port} missing");
        }
        assert!(lookup(22).is_none());
    }

    #[test]
    fn loopback_only_ports() {
        let loopback: BTreeSet<u16> = PORTS
            .iter()
            .filter(|p| p.allowed_bind == BindScope::Loopback)
            .map(|p| p.port)
            .collect();
        assert_eq!(loopback, BTreeSet::from([2381, 10248, 10249, 10257, 10259]));
    }

    #[test]
    fn json_has_every_port_and_field() {
        let v = to_json();
        let arr = v.as_array().expect("array");
        assert_eq!(arr.len(), PORTS.len());
        let kubelet = arr.iter().find(|p| p["port"] == 10250).expect("10250");
        assert_eq!(kubelet["severity"], "critical");
        assert_eq!(kubelet["allowed_bind"], "any");
        assert_eq!(kubelet["defaults"]["gke"]["bind"], "all interfaces");
        assert_eq!(kubelet["defaults"]["k3s"]["bind"], "all interfaces");
        assert!(kubelet["attacker_gains"]
            .as_str()
            .is_some_and(|s| !s.is_empty()));
    }

    #[test]
    fn table_names_every_port() {
        let t = render_table();
        for p in PORTS {
            assert!(t.contains(&p.port.to_string()));
            assert!(t.contains(p.hardening));
        }
    }

    #[test]
    fn severity_orders_and_maps_to_ecs() {
        assert!(Severity::Critical > Severity::High);
        assert_eq!(Severity::Critical.ecs_severity(), 99);
        assert_eq!(Severity::Low.risk_score(), 21.0);
    }
}
