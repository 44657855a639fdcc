//! The stand-in Kubernetes API (tests/fixtures/fakeapi.py) in a test namespace: started
//! with a CA and server certificate of its own, a kubeconfig for the daemon written next
//! to them, and its control API driven over curl.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::{certificate, NetNs, Proc};

/// The bearer token the fake API accepts (and the kubeconfig carries).
pub const TOKEN: &str = "test-token-k8s-ebpf";

/// The fake API server in the node's namespace, and its control API (via curl).
pub struct FakeApi {
    _proc: Proc,
    ns: String,
    port: u16,
    log: PathBuf,
}

impl FakeApi {
    pub fn start(node: &NetNs, dir: &Path) -> Self {
        Self::start_with(node, dir, &[])
    }

    /// With more command-line flags (`--no-watch-list`: a server without streaming lists).
    pub fn start_with(node: &NetNs, dir: &Path, flags: &[&str]) -> Self {
        // A CA and a server certificate it signs (webpki refuses a CA certificate as the
        // server's own, so a self-signed one will not do).
        let (ca_crt, ca_key) = certificate(dir, "fake-ca", "DNS:fake-ca", None);
        let (crt, key) = certificate(
            dir,
            "fakeapi",
            "IP:127.0.0.1,DNS:localhost",
            Some((Path::new(&ca_crt), Path::new(&ca_key))),
        );
        let port_file = dir.join("fakeapi.port");
        let log = dir.join("fakeapi.log");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/fakeapi.py");
        let proc = Proc::spawn(
            "fakeapi",
            node.command("python3")
                .arg(&script)
                .args([
                    "--cert",
                    &crt,
                    "--key",
                    &key,
                    "--token",
                    TOKEN,
                    "--port-file",
                ])
                .arg(&port_file)
                .args(flags),
            &log,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break p;
            }
            assert!(
                Instant::now() < deadline,
                "fake API did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {ca_crt}\nusers:\n- name: k8s-ebpf\n  user:\n    token: {TOKEN}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: k8s-ebpf}}\ncurrent-context: fake\n"
        );
        std::fs::write(dir.join("kubeconfig"), kubeconfig).expect("write kubeconfig");
        Self {
            _proc: proc,
            ns: node.name.clone(),
            port,
            log,
        }
    }

    /// A control call: POST `body` to /fake/PATH (GET without a body); the reply as JSON.
    pub fn call(&self, path: &str, body: Option<Value>) -> Value {
        let url = format!("https://127.0.0.1:{}/fake/{path}", self.port);
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.ns,
            "curl",
            "-sk",
            "--max-time",
            "5",
            "-f",
        ]);
        if let Some(b) = &body {
            cmd.args([
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "--data",
            ])
            .arg(b.to_string());
        }
        let out = cmd.arg(&url).output().expect("curl");
        assert!(
            out.status.success(),
            "fake API {path} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Single-object GETs served for `resource` (`nodes`).
    pub fn gets(&self, resource: &str) -> u64 {
        self.call("stats", None)["gets"][resource]
            .as_u64()
            .unwrap_or(0)
    }

    /// List requests (pages) served for `resource`.
    pub fn lists(&self, resource: &str) -> u64 {
        self.stat("lists", resource)
    }

    /// List requests (pages) and streaming lists served for `resource`: grows with
    /// every full list, whichever way it is served.
    pub fn list_calls(&self, resource: &str) -> u64 {
        self.stat("lists", resource) + self.stat("streams", resource)
    }

    /// A counter of /fake/stats: `group` (`lists`, `streams`, `listed_objects`,
    /// `streamed_objects`, …) for `resource`.
    pub fn stat(&self, group: &str, resource: &str) -> u64 {
        self.call("stats", None)[group][resource]
            .as_u64()
            .unwrap_or(0)
    }

    /// The last requests served (resource, namespace, watch, labelSelector,
    /// fieldSelector, sendInitialEvents, limit).
    pub fn requests(&self) -> Vec<Value> {
        self.call("stats", None)["requests"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl FakeApi {
    /// The kubeconfig [`FakeApi::start`] wrote into its directory.
    pub fn kubeconfig(dir: &Path) -> PathBuf {
        dir.join("kubeconfig")
    }

    /// The CA certificate (PEM) that signed the server's, in its directory: a pod's
    /// `ca.crt`.
    pub fn ca_cert(dir: &Path) -> PathBuf {
        dir.join("fake-ca.crt")
    }

    /// The port it serves on 127.0.0.1 of the node's namespace.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// The `kubernetes` Service's EndpointSlice as kube-apiserver writes it: the API
/// servers at `addresses` (IPv4).
pub fn apiserver_slice(addresses: &[&str]) -> Value {
    json!({
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4",
        "endpoints": addresses.iter().map(|a| json!({"addresses": [a]})).collect::<Vec<_>>(),
        "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]
    })
}

/// `monitoring/prometheus-0` at `ip`: the pod the default policy's monitoring selector
/// expects.
pub fn prometheus_pod(ip: &str) -> Value {
    pod(
        "monitoring",
        "prometheus-0",
        ip,
        json!({"app.kubernetes.io/name": "prometheus"}),
        "prometheus",
    )
}

/// A running Pod object on node `node-a` with one container, `ip` its pod IP.
pub fn pod(namespace: &str, name: &str, ip: &str, labels: Value, sa: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": "node-a", "serviceAccountName": sa,
                 "containers": [{"name": "main", "image": "registry.example/main:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}
