//! `--format ocsf`: the record translated, at the output edge, from its ECS form into the
//! Open Cybersecurity Schema Framework (OCSF). The ECS record stays the one the pipeline
//! builds; this module reads its serialized JSON and writes the OCSF event for it, so
//! nothing upstream knows OCSF exists.
//!
//! Classes (docs/ocsf.md says why): every connection, attempt and listener record, alert
//! or `--log-allowed` event, first sighting, window summary or flood record, is a Network
//! Activity event (4001) with the security-control profile's verdict attached
//! (`is_alert`, `disposition`, `policy`, `risk_score`); a port scan, a conclusion drawn
//! over many connections with no single endpoint pair, is a Detection Finding (2004).
//! What OCSF has no attribute for is kept under `unmapped`, so nothing of the ECS record
//! is lost.

use serde_json::{json, Map, Value};

/// The OCSF release the events follow (`metadata.version`): the newest one the PyPI
/// package `ocsf-json-schema` (pinned in tests/ocsf/requirements.txt) ships, which the
/// tests validate every record kind against.
pub const OCSF_VERSION: &str = "1.8.0";

/// OCSF profiles the events use (`metadata.profiles`): `container` for the pod and
/// container on endpoints and processes, `host` for `device` and `actor`,
/// `security_control` for the verdict.
const PROFILES: [&str; 3] = ["container", "host", "security_control"];

const PRODUCT: &str = "k8s-ebpf";

/// OCSF `severity_id` for an ECS `event.severity` (21/47/73/99 for low … critical) of an
/// alert; expected connections (`event.kind: event`) are Informational (1).
fn severity_id(kind: &str, ecs_severity: u64) -> (u64, &'static str) {
    if kind != "alert" {
        return (1, "Informational");
    }
    match ecs_severity {
        0..=21 => (2, "Low"),
        22..=47 => (3, "Medium"),
        48..=73 => (4, "High"),
        _ => (5, "Critical"),
    }
}

/// Network Activity's `activity_id` for an ECS `event.action`, and whether the attempt
/// failed (`status_id` 2).
fn network_activity(action: &str) -> (u64, &'static str, bool) {
    match action {
        "exposed-listener" => (7, "Listen", false),
        "refused-attempt" => (5, "Refuse", true),
        // A SYN whose handshake never completed: the connection failed to open.
        "half-open-attempt" => (4, "Fail", true),
        // unexpected-inbound, unexpected-outbound, allowed-inbound, allowed-outbound
        _ => (1, "Open", false),
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

/// RFC 3339 (as the ECS record writes it) to OCSF's `timestamp_t`: milliseconds since
/// the epoch.
fn millis(rfc3339: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(rfc3339).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(d.as_millis()).ok()
}

fn time_at(v: &Value, path: &[&str]) -> Option<Value> {
    str_at(v, path).and_then(millis).map(Value::from)
}

/// ECS `source`/`destination` to an OCSF `network_endpoint` (`ip`, `port`).
fn endpoint(v: Option<&Value>) -> Option<Map<String, Value>> {
    let v = v?;
    let mut e = Map::new();
    if let Some(ip) = v.get("ip") {
        e.insert("ip".into(), ip.clone());
    }
    if let Some(port) = v.get("port") {
        e.insert("port".into(), port.clone());
    }
    (!e.is_empty()).then_some(e)
}

/// The ECS `kubernetes` object in OCSF's own terms, on the endpoint it is about: the
/// endpoint's `name` (`NAMESPACE/POD`, or the node's name), `type`/`type_id`, its
/// `owner` (the service account as Kubernetes names the user,
/// `system:serviceaccount:NS:NAME`) and a `container` object with `orchestrator`,
/// `pod_uuid` and `labels`.
fn kubernetes_on(endpoint: &mut Map<String, Value>, k: &Value, container_id: Option<&str>) {
    let identity = str_at(k, &["identity"]).unwrap_or("unknown");
    let pod = str_at(k, &["pod", "name"]);
    let namespace = str_at(k, &["namespace"]);
    let node = str_at(k, &["node", "name"]);
    let (type_id, type_name) = match identity {
        "pod" => (99, "Kubernetes Pod"),
        "node" => (1, "Server"),
        "apiserver" => (1, "Kubernetes API server"),
        "pod-range" => (99, "Kubernetes Pod (by podCIDR)"),
        _ => (0, "Unknown"),
    };
    endpoint.insert("type_id".into(), type_id.into());
    endpoint.insert("type".into(), type_name.into());
    match (pod, namespace) {
        (Some(pod), Some(ns)) => {
            endpoint.insert("name".into(), format!("{ns}/{pod}").into());
        }
        _ => {
            if let Some(node) = node {
                endpoint.insert("name".into(), node.into());
                endpoint.insert("hostname".into(), node.into());
            }
        }
    }
    if let (Some(sa), Some(ns)) = (str_at(k, &["service_account", "name"]), namespace) {
        endpoint.insert(
            "owner".into(),
            json!({
                "name": format!("system:serviceaccount:{ns}:{sa}"),
                "type_id": 4,
                "type": "Service",
            }),
        );
    }
    if let Some(pod) = pod {
        let mut c = Map::new();
        c.insert("name".into(), pod.into());
        if let Some(id) = container_id {
            c.insert("uid".into(), id.into());
        }
        c.insert("orchestrator".into(), "Kubernetes".into());
        if let Some(uid) = str_at(k, &["pod", "uid"]) {
            c.insert("pod_uuid".into(), uid.into());
        }
        if let Some(labels) = k.get("labels").and_then(Value::as_object) {
            if !labels.is_empty() {
                let l: Vec<Value> = labels
                    .iter()
                    .map(|(key, v)| format!("{key}={}", v.as_str().unwrap_or_default()).into())
                    .collect();
                c.insert("labels".into(), l.into());
            }
        }
        endpoint.insert("container".into(), c.into());
    }
}

/// What OCSF has no attribute for: the whole `k8s_ebpf` object, and what of
/// `kubernetes` the endpoint could not hold.
fn unmapped(ecs: &Value) -> Value {
    let mut u = Map::new();
    if let Some(x) = ecs.get("k8s_ebpf") {
        u.insert("k8s_ebpf".into(), x.clone());
    }
    if let Some(k) = ecs.get("kubernetes") {
        let mut rest = Map::new();
        for key in ["identity", "apiserver", "namespace"] {
            if let Some(v) = k.get(key) {
                rest.insert(key.into(), v.clone());
            }
        }
        if let Some(roles) = at(k, &["node", "roles"]) {
            rest.insert("node".into(), json!({ "roles": roles }));
        }
        u.insert("kubernetes".into(), rest.into());
    }
    if let Some(ruleset) = str_at(ecs, &["rule", "ruleset"]) {
        u.insert("rule".into(), json!({ "ruleset": ruleset }));
    }
    u.into()
}

/// The local process (ECS `process.*`, `container.id`) as OCSF `actor.process`.
fn actor(ecs: &Value) -> Option<Value> {
    let p = ecs.get("process")?;
    let mut process = Map::new();
    if let Some(pid) = p.get("pid") {
        process.insert("pid".into(), pid.clone());
    }
    if let Some(name) = p.get("name") {
        process.insert("name".into(), name.clone());
    }
    if let Some(path) = str_at(p, &["executable"]) {
        let name = path.rsplit('/').next().unwrap_or(path);
        process.insert(
            "file".into(),
            json!({ "path": path, "name": name, "type_id": 1, "type": "Regular File" }),
        );
    }
    if let Some(id) = str_at(ecs, &["container", "id"]) {
        process.insert("container".into(), json!({ "uid": id }));
    }
    Some(json!({ "process": process }))
}

/// The OCSF event for one ECS record (as [`crate::alert::AlertEvent`] serializes it).
pub fn from_ecs(ecs: &Value) -> Value {
    let action = str_at(ecs, &["event", "action"]).unwrap_or_default();
    let kind = str_at(ecs, &["event", "kind"]).unwrap_or("alert");
    let hostname = str_at(ecs, &["host", "hostname"]).unwrap_or_default();

    let mut o = base_event(ecs, kind, hostname);
    security_control(ecs, kind, &mut o);
    let (src, dst) = endpoints(ecs, action);
    if action == "port-scan" {
        detection_finding(ecs, &mut o, src);
    } else {
        network_activity_event(ecs, &mut o, action, src, dst, hostname);
    }
    o.insert("unmapped".into(), unmapped(ecs));
    o.into()
}

/// The attributes every event carries: metadata, time, severity, message, count, the
/// window's start and end, the device (this node) and the actor (the local process).
fn base_event(ecs: &Value, kind: &str, hostname: &str) -> Map<String, Value> {
    let ecs_severity = at(ecs, &["event", "severity"])
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let (sev_id, sev) = severity_id(kind, ecs_severity);
    let time = time_at(ecs, &["@timestamp"]).unwrap_or(Value::from(0));

    let mut o = Map::new();
    o.insert(
        "metadata".into(),
        json!({
            "version": OCSF_VERSION,
            "product": {
                "name": PRODUCT,
                "vendor_name": PRODUCT,
                "version": env!("CARGO_PKG_VERSION"),
            },
            "profiles": PROFILES,
            "log_name": "alerts",
            "original_time": str_at(ecs, &["@timestamp"]).unwrap_or_default(),
        }),
    );
    o.insert("time".into(), time.clone());
    o.insert("severity_id".into(), sev_id.into());
    o.insert("severity".into(), sev.into());
    if let Some(m) = ecs.get("message") {
        o.insert("message".into(), m.clone());
    }
    if let Some(c) = at(ecs, &["k8s_ebpf", "count"]) {
        o.insert("count".into(), c.clone());
    }
    if let Some(t) = time_at(ecs, &["event", "start"]) {
        o.insert("start_time".into(), t);
    }
    if let Some(t) = time_at(ecs, &["event", "end"]) {
        o.insert("end_time".into(), t);
    }
    o.insert(
        "device".into(),
        json!({ "hostname": hostname, "name": hostname, "type_id": 1, "type": "Server" }),
    );
    if let Some(a) = actor(ecs) {
        o.insert("actor".into(), a);
    }
    o
}

/// The security_control profile: the verdict. The daemon observes, it never blocks.
fn security_control(ecs: &Value, kind: &str, o: &mut Map<String, Value>) {
    let alert = kind == "alert";
    o.insert("is_alert".into(), alert.into());
    o.insert("action_id".into(), 3.into());
    o.insert("action".into(), "Observed".into());
    let (disposition_id, disposition) = if alert { (19, "Alert") } else { (1, "Allowed") };
    o.insert("disposition_id".into(), disposition_id.into());
    o.insert("disposition".into(), disposition.into());
    if let Some(name) = str_at(ecs, &["rule", "name"]) {
        let mut policy = Map::new();
        policy.insert("name".into(), name.into());
        policy.insert("is_applied".into(), true.into());
        if let Some(ruleset) = str_at(ecs, &["rule", "ruleset"]) {
            policy.insert("desc".into(), format!("rule {name} of {ruleset}").into());
        }
        o.insert("policy".into(), policy.into());
    }
    if let Some(r) = at(ecs, &["event", "risk_score"]).and_then(Value::as_f64) {
        // OCSF's risk_score is an integer; the ECS one is a whole number too.
        o.insert("risk_score".into(), (r.round() as u64).into());
    }
}

type Endpoint = Option<Map<String, Value>>;

/// The source and destination endpoints, the Kubernetes identity on the side it is about.
fn endpoints(ecs: &Value, action: &str) -> (Endpoint, Endpoint) {
    let mut src = endpoint(ecs.get("source"));
    let mut dst = endpoint(ecs.get("destination"));
    // The ECS `kubernetes` object is about the source (the remote peer of an inbound
    // record, the local pod of an outbound one) or, for a listener, the destination.
    if let Some(k) = ecs.get("kubernetes") {
        let container_id = str_at(ecs, &["container", "id"]);
        match (src.as_mut(), dst.as_mut()) {
            (Some(s), _) => kubernetes_on(s, k, container_id),
            (None, Some(d)) if action == "exposed-listener" => kubernetes_on(d, k, container_id),
            _ => {}
        }
    }
    (src, dst)
}

/// Every record but a port scan as Network Activity (4001): its activity and status,
/// the connection, and the endpoints.
fn network_activity_event(
    ecs: &Value,
    o: &mut Map<String, Value>,
    action: &str,
    src: Endpoint,
    dst: Endpoint,
    hostname: &str,
) {
    let (activity_id, activity, failed) = network_activity(action);
    o.insert("category_uid".into(), 4.into());
    o.insert("category_name".into(), "Network Activity".into());
    o.insert("class_uid".into(), 4001.into());
    o.insert("class_name".into(), "Network Activity".into());
    o.insert("activity_id".into(), activity_id.into());
    o.insert("activity_name".into(), activity.into());
    o.insert("type_uid".into(), (4001 * 100 + activity_id).into());
    o.insert(
        "type_name".into(),
        format!("Network Activity: {activity}").into(),
    );
    let (status_id, status) = if failed {
        (2, "Failure")
    } else {
        (1, "Success")
    };
    o.insert("status_id".into(), status_id.into());
    o.insert("status".into(), status.into());
    o.insert("connection_info".into(), connection_info(ecs));
    if let Some(s) = src {
        o.insert("src_endpoint".into(), s.into());
    }
    match dst {
        Some(d) => {
            o.insert("dst_endpoint".into(), d.into());
        }
        // A Network Activity event needs an endpoint; a flood record has no source
        // address and every record has a destination, but never emit an invalid one.
        None if !o.contains_key("src_endpoint") => {
            o.insert("dst_endpoint".into(), json!({ "hostname": hostname }));
        }
        None => {}
    }
}

/// TCP, the IP version and the direction of the connection.
fn connection_info(ecs: &Value) -> Value {
    let (direction_id, direction) = match str_at(ecs, &["network", "direction"]) {
        Some("ingress") => (1, "Inbound"),
        Some("egress") => (2, "Outbound"),
        _ => (0, "Unknown"),
    };
    let version_id = match str_at(ecs, &["network", "type"]) {
        Some("ipv6") => 6,
        _ => 4,
    };
    json!({
        "protocol_name": "tcp",
        "protocol_num": 6,
        "protocol_ver_id": version_id,
        "direction_id": direction_id,
        "direction": direction,
    })
}

/// A port scan as a Detection Finding (2004, activity Create): the scanner in the
/// evidence's `src_endpoint`, the watched ports it touched in the evidence's `data`.
fn detection_finding(ecs: &Value, o: &mut Map<String, Value>, src: Option<Map<String, Value>>) {
    o.insert("category_uid".into(), 2.into());
    o.insert("category_name".into(), "Findings".into());
    o.insert("class_uid".into(), 2004.into());
    o.insert("class_name".into(), "Detection Finding".into());
    o.insert("activity_id".into(), 1.into());
    o.insert("activity_name".into(), "Create".into());
    o.insert("type_uid".into(), 200_401.into());
    o.insert("type_name".into(), "Detection Finding: Create".into());
    o.insert("status_id".into(), 1.into());
    o.insert("status".into(), "New".into());
    let hostname = str_at(ecs, &["host", "hostname"]).unwrap_or_default();
    let scanner = str_at(ecs, &["source", "ip"])
        .or_else(|| str_at(ecs, &["k8s_ebpf", "prefix"]))
        .unwrap_or("unknown");
    let time = str_at(ecs, &["@timestamp"]).unwrap_or_default();
    let mut finding = Map::new();
    // Stable for one record: the node, the scanner and the time.
    finding.insert(
        "uid".into(),
        format!("{PRODUCT}:{hostname}:port-scan:{scanner}:{time}").into(),
    );
    finding.insert("title".into(), format!("port scan from {scanner}").into());
    if let Some(m) = ecs.get("message") {
        finding.insert("desc".into(), m.clone());
    }
    finding.insert("types".into(), json!(["port-scan"]));
    finding.insert(
        "analytic".into(),
        json!({
            "name": str_at(ecs, &["rule", "name"]).unwrap_or("port-scan"),
            "type_id": 1,
            "type": "Rule",
        }),
    );
    if let Some(t) = time_at(ecs, &["event", "start"]) {
        finding.insert("first_seen_time".into(), t);
    }
    if let Some(t) = time_at(ecs, &["event", "end"]) {
        finding.insert("last_seen_time".into(), t);
    }
    o.insert("finding_info".into(), finding.into());
    let mut evidence = Map::new();
    if let Some(s) = src {
        evidence.insert("src_endpoint".into(), s.into());
    }
    let mut data = Map::new();
    if let Some(p) = at(ecs, &["k8s_ebpf", "ports"]) {
        data.insert("ports".into(), p.clone());
    }
    if let Some(p) = at(ecs, &["k8s_ebpf", "prefix"]) {
        data.insert("prefix".into(), p.clone());
    }
    evidence.insert("data".into(), data.into());
    o.insert("evidences".into(), json!([evidence]));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound() -> Value {
        serde_json::from_str(
            r#"{"@timestamp":"2026-11-24T19:20:30.953Z","ecs":{"version":"9.4.0"},
            "event":{"kind":"alert","category":["network"],"type":["connection","start"],
            "action":"unexpected-inbound","module":"k8s_ebpf","severity":99,"risk_score":99.0},
            "source":{"ip":"198.51.100.7","port":39382},"destination":{"ip":"192.0.2.1","port":10250},
            "network":{"transport":"tcp","type":"ipv4","direction":"ingress"},
            "host":{"hostname":"node-1"},"rule":{"name":"kubelet"},
            "kubernetes":{"identity":"pod","pod":{"name":"p","uid":"5f0c1a2e-0000-4000-8000-000000000001"},
              "namespace":"ns","labels":{"app":"x"},"service_account":{"name":"sa"}},
            "message":"m","k8s_ebpf":{"count":1,"component":"kubelet"}}"#,
        )
        .expect("json")
    }

    #[test]
    fn an_inbound_alert_is_network_activity_open() {
        let o = from_ecs(&inbound());
        assert_eq!(o["class_uid"], 4001);
        assert_eq!(o["activity_id"], 1);
        assert_eq!(o["type_uid"], 400_101);
        assert_eq!(o["severity_id"], 5);
        assert_eq!(o["time"], 1_795_548_030_953_u64);
        assert_eq!(o["src_endpoint"]["ip"], "198.51.100.7");
        assert_eq!(o["src_endpoint"]["name"], "ns/p");
        assert_eq!(
            o["src_endpoint"]["owner"]["name"],
            "system:serviceaccount:ns:sa"
        );
        assert_eq!(o["src_endpoint"]["container"]["labels"][0], "app=x");
        assert_eq!(o["dst_endpoint"]["port"], 10250);
        assert_eq!(o["metadata"]["product"]["name"], "k8s-ebpf");
        assert_eq!(o["is_alert"], true);
        assert_eq!(o["unmapped"]["k8s_ebpf"]["component"], "kubelet");
    }

    #[test]
    fn a_port_scan_is_a_detection_finding() {
        let mut e = inbound();
        e["event"]["action"] = "port-scan".into();
        e["event"]["severity"] = 47.into();
        let o = from_ecs(&e);
        assert_eq!(o["class_uid"], 2004);
        assert_eq!(o["severity_id"], 3);
        assert_eq!(o["evidences"][0]["src_endpoint"]["ip"], "198.51.100.7");
    }

    #[test]
    fn an_allowed_event_is_informational() {
        let mut e = inbound();
        e["event"]["kind"] = "event".into();
        let o = from_ecs(&e);
        assert_eq!(o["severity_id"], 1);
        assert_eq!(o["is_alert"], false);
        assert_eq!(o["disposition_id"], 1);
    }

    /// docs/siem.md shows one record in both formats: the OCSF line is what this module
    /// makes of the ECS line.
    #[test]
    fn the_docs_show_the_translation() {
        let page = include_str!("../../../docs/siem.md");
        let after = page
            .split("**One event, both formats.**")
            .nth(1)
            .expect("docs/siem.md has the example");
        let blocks: Vec<&str> = after
            .split("```json\n")
            .skip(1)
            .take(2)
            .map(|b| b.split("\n```").next().expect("closed block"))
            .collect();
        let ecs: Value = serde_json::from_str(blocks[0]).expect("the ECS line is JSON");
        let want = serde_json::to_string(&from_ecs(&ecs)).expect("serializes");
        assert_eq!(blocks[1], want, "docs/siem.md's OCSF line must be:\n{want}");
    }
}
