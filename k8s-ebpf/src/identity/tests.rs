use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn pod(ns: &str, name: &str, addr: &str) -> PodIdentity {
    PodIdentity {
        namespace: ns.into(),
        name: name.into(),
        ips: vec![ip(addr)].into(),
        node_name: Some("node-a".into()),
        container_ids: vec![format!("{name:0>64}").into()].into(),
        ..PodIdentity::default()
    }
}

#[test]
fn pods_nodes_and_apiserver_resolve_and_leave() {
    let mut c = IdentityCache::new("node-a");
    c.apply_pod(pod("monitoring", "prom", "198.51.100.20"));
    c.apply_node(NodeIdentity {
        name: "cp-1".into(),
        roles: ["control-plane".to_owned()].into(),
        addresses: vec![ip("192.0.2.10")],
        pod_cidrs: vec![],
    });
    c.apply_slice(
        ("default".into(), "kubernetes".into()),
        vec![ip("192.0.2.10")],
    );

    let p = c.lookup(ip("198.51.100.20"));
    assert_eq!(p.kind(), "pod");
    assert_eq!(p.pod.as_ref().map(|p| &*p.name), Some("prom"));
    let n = c.lookup(ip("::ffff:192.0.2.10"));
    assert_eq!(n.kind(), "node");
    assert!(n.apiserver && n.node.as_ref().is_some_and(|n| n.is_control_plane()));
    assert_eq!(c.lookup(ip("203.0.113.1")).kind(), "unknown");

    let id = format!("{:0>64}", "prom");
    assert_eq!(
        c.pod_for_container(&id).map(|p| p.name.clone()),
        Some("prom".into())
    );
    assert!(c.pod_for_container(&id[..12]).is_some());

    c.delete_pod("monitoring", "prom", None);
    assert_eq!(c.lookup(ip("198.51.100.20")).kind(), "unknown");
    assert!(c.pod_for_container(&id).is_none());
    c.delete_slice(&("default".into(), "kubernetes".into()));
    assert!(!c.lookup(ip("192.0.2.10")).apiserver);
}

#[test]
fn a_reused_address_keeps_its_new_owner() {
    let mut c = IdentityCache::new("node-a");
    c.apply_pod(pod("a", "old", "198.51.100.5"));
    c.apply_pod(pod("b", "new", "198.51.100.5"));
    // The old pod's deletion arrives late: the address stays with the new one.
    c.delete_pod("a", "old", None);
    let p = c.lookup(ip("198.51.100.5"));
    assert_eq!(p.pod.map(|p| p.name.clone()), Some("new".into()));
}

fn versioned(mut p: PodIdentity, uid: &str, rv: u64) -> PodIdentity {
    p.uid = Some(uid.into());
    p.resource_version = std::num::NonZeroU64::new(rv);
    p
}

fn owner(c: &IdentityCache, addr: &str) -> Option<String> {
    c.lookup(ip(addr)).pod.map(|p| p.name.to_string())
}

/// A terminating pod's last updates still list the address the network has already
/// given to a new pod: they must not take it back, and the old pod's deletion must not
/// leave it unmapped.
#[test]
fn a_stale_pod_does_not_take_back_its_old_address() {
    let mut c = IdentityCache::new("node-a");
    let old = versioned(pod("a", "old", "198.51.100.5"), "uid-old", 100);
    c.apply_pod(old.clone());
    c.apply_pod(versioned(pod("b", "new", "198.51.100.5"), "uid-new", 200));
    assert_eq!(owner(&c, "198.51.100.5").as_deref(), Some("new"));

    // old′: a late MODIFIED of the old pod (newer than the new pod's ADDED, as a
    // terminating pod's status updates are), still listing the address.
    let mut late = versioned(old.clone(), "uid-old", 300);
    late.labels.insert("phase", "terminating");
    c.apply_pod(late);
    assert_eq!(owner(&c, "198.51.100.5").as_deref(), Some("new"));

    c.delete_pod("a", "old", Some("uid-old"));
    assert_eq!(owner(&c, "198.51.100.5").as_deref(), Some("new"));
    // An update of the deleted pod arriving after its DELETE does not bring it back.
    c.apply_pod(versioned(old, "uid-old", 400));
    assert_eq!(owner(&c, "198.51.100.5").as_deref(), Some("new"));
    assert_eq!(c.len(Resource::Pods), 1);
}

/// A re-list that holds both the terminating old pod and the new one (in any order)
/// leaves the address with the pod that owned it.
#[test]
fn a_relist_keeps_an_address_with_its_owner() {
    let mut c = IdentityCache::new("node-a");
    let old = versioned(pod("a", "old", "198.51.100.5"), "uid-old", 100);
    let new = versioned(pod("b", "new", "198.51.100.5"), "uid-new", 200);
    c.apply_pod(old.clone());
    c.apply_pod(new.clone());
    c.replace_pods(vec![new, versioned(old, "uid-old", 300)]);
    assert_eq!(owner(&c, "198.51.100.5").as_deref(), Some("new"));
    assert_eq!(c.len(Resource::Pods), 2);
}

/// Updates of one pod applied out of order: the older one is ignored.
#[test]
fn an_older_version_of_a_pod_is_ignored() {
    let mut c = IdentityCache::new("node-a");
    let mut v2 = versioned(pod("a", "web", "198.51.100.6"), "uid-web", 20);
    v2.labels.insert("version", "2");
    let mut v1 = versioned(pod("a", "web", "198.51.100.6"), "uid-web", 10);
    v1.labels.insert("version", "1");
    c.apply_pod(v2);
    c.apply_pod(v1);
    let p = c.lookup(ip("198.51.100.6")).pod.expect("indexed");
    assert_eq!(p.labels.get("version"), Some("2"));
    // A pod recreated under the same name (a StatefulSet) is a newer object: applied.
    let mut again = versioned(pod("a", "web", "198.51.100.7"), "uid-web-2", 30);
    again.labels.insert("version", "3");
    c.delete_pod("a", "web", Some("uid-web"));
    c.apply_pod(again);
    assert_eq!(owner(&c, "198.51.100.7").as_deref(), Some("web"));
    assert_eq!(owner(&c, "198.51.100.6"), None);
}

#[test]
fn host_network_and_finished_pods_do_not_own_addresses() {
    let mut c = IdentityCache::new("node-a");
    let mut h = pod("kube-system", "proxy", "192.0.2.10");
    h.host_network = true;
    c.apply_pod(h);
    let mut f = pod("jobs", "done", "198.51.100.9");
    f.finished = true;
    c.apply_pod(f);
    assert_eq!(c.lookup(ip("192.0.2.10")).kind(), "unknown");
    assert_eq!(c.lookup(ip("198.51.100.9")).kind(), "unknown");
    assert_eq!(c.len(Resource::Pods), 2);
}

#[test]
fn a_relist_drops_what_is_gone() {
    let mut c = IdentityCache::new("node-a");
    c.apply_pod(pod("a", "one", "198.51.100.1"));
    c.replace_pods(vec![pod("a", "two", "198.51.100.2")]);
    assert_eq!(c.lookup(ip("198.51.100.1")).kind(), "unknown");
    assert_eq!(c.lookup(ip("198.51.100.2")).kind(), "pod");
    assert_eq!(c.len(Resource::Pods), 1);
}

#[test]
fn uids_round_trip_and_other_spellings_stay_as_written() {
    let canonical = "0f8fad5b-d9cb-469f-a165-70867728950e";
    let u = PodUid::new(canonical);
    assert!(matches!(u, PodUid::Uuid(_)));
    assert_eq!(u.to_string(), canonical);
    // Upper case parses as the same UUID but is another string: kept as written, so
    // it is not equal to the lower-case uid (the API compares uids as strings).
    let upper = PodUid::new(&canonical.to_uppercase());
    assert!(matches!(upper, PodUid::Other(_)));
    assert_ne!(upper, u);
    assert_eq!(PodUid::new("uid-old").to_string(), "uid-old");
}

#[test]
fn label_keys_decide_when_to_list_again() {
    let default = LabelKeys::for_selectors(["team".to_owned()]);
    assert!(default.keeps("team") && default.keeps("app.kubernetes.io/name"));
    assert!(!default.keeps("pod-template-hash"));
    let more = LabelKeys::for_selectors(["team".to_owned(), "tier2".to_owned()]);
    assert!(!more.covered_by(&default), "a new key needs a new list");
    assert!(default.covered_by(&more), "fewer keys need none");
    assert!(more.covered_by(&LabelKeys::All));
    assert!(!LabelKeys::All.covered_by(&more));

    let h = Identities::new("n");
    assert!(
        !h.keep_labels(default.clone()),
        "All → a subset: nothing to list"
    );
    assert_eq!(*h.label_keys(), default);
    assert!(h.keep_labels(more), "a key the cache dropped: list again");
}

#[test]
fn labels_are_sorted_shared_and_looked_up_by_key() {
    let l: Labels = [("b", "2"), ("a", "1"), ("b", "3")].into();
    assert_eq!(l.iter().collect::<Vec<_>>(), [("a", "1"), ("b", "2")]);
    assert_eq!(l.get("a"), Some("1"));
    assert_eq!(l.get("c"), None);
    let mut sets = LabelSets::default();
    let one = sets.intern(l.clone());
    let two = sets.intern([("a", "1"), ("b", "2")].into());
    assert!(Arc::ptr_eq(&one.0, &two.0));
    drop((l, one, two));
    sets.prune();
    assert!(sets.0.is_empty());
}

/// Kubernetes allows one address per family; a third is not kept (and not indexed).
#[test]
fn a_pod_holds_at_most_two_addresses() {
    let ips: PodIps = vec![ip("198.51.100.1"), ip("2001:db8::1"), ip("198.51.100.2")].into();
    assert_eq!(ips.len(), 2);
    let mut c = IdentityCache::new("node-a");
    let mut p = pod("a", "dual", "198.51.100.1");
    p.ips = ips;
    c.apply_pod(p);
    assert_eq!(owner(&c, "2001:db8::1").as_deref(), Some("dual"));
    assert_eq!(owner(&c, "198.51.100.2"), None);
}

#[test]
fn disabled_handle_resolves_nothing() {
    let h = Identities::new("n");
    h.update(|c| c.apply_pod(pod("a", "p", "198.51.100.1")));
    assert!(h.lookup(ip("198.51.100.1")).is_none());
    h.enable();
    assert_eq!(h.lookup(ip("198.51.100.1")).map(|p| p.kind()), Some("pod"));
    assert!(!h.all_synced());
    let synced = SyncState {
        synced: true,
        failing: None,
    };
    for r in [Resource::Nodes, Resource::EndpointSlices] {
        h.set_sync(r, synced);
    }
    assert!(!h.all_synced(), "synced without a pod watch");
    h.begin_pod_feeds(&[LOCAL_PODS, 2], &[], Coverage::Ranges, false);
    h.set_feed_sync(LOCAL_PODS, synced);
    h.set_feed_sync(2, synced);
    assert!(!h.all_synced(), "synced before the coverage was decided");
    h.decide_coverage(Coverage::Ranges);
    assert!(h.all_synced());
    h.set_feed_sync(
        2,
        SyncState {
            synced: false,
            failing: Some("forbidden"),
        },
    );
    assert!(!h.all_synced(), "one pod watch failing");
    assert_eq!(h.sync(Resource::Pods).failing, Some("forbidden"));
}

fn node_with_range(name: &str, addr: &str, range: &str) -> NodeIdentity {
    NodeIdentity {
        name: name.into(),
        roles: BTreeSet::new(),
        addresses: vec![ip(addr)],
        pod_cidrs: vec![range.parse().expect("range")],
    }
}

/// `pods: {}` by range: an address in a node's podCIDRs is a pod (name unknown), not
/// a node's own address nor one outside; a pod outside every range, or a node without
/// one, contradicts it (the watchers then list every pod).
#[test]
fn pod_ranges_stand_for_unlisted_pods_until_contradicted() {
    let h = Identities::new("node-a");
    h.enable();
    h.update(|c| {
        c.apply_node(node_with_range("node-a", "192.0.2.1", "10.244.1.0/24"));
        c.apply_node(node_with_range("node-b", "192.0.2.2", "2001:db8:1::/64"));
    });
    h.begin_pod_feeds(&[LOCAL_PODS], &[], Coverage::Ranges, true);
    let range = |a: &str| h.lookup(ip(a)).is_some_and(|p| p.pod_range);
    assert!(range("10.244.1.77") && range("2001:db8:1::9") && range("::ffff:10.244.1.5"));
    assert!(!range("10.244.2.1") && !range("192.0.2.1") && !range("198.51.100.1"));
    // Selected only: the range means nothing.
    h.update(|c| c.set_coverage(Coverage::Selected));
    assert!(!range("10.244.1.77"));
    h.update(|c| c.set_coverage(Coverage::Ranges));
    let changed = h.pod_watch_changed();
    assert_eq!(h.pod_plan(), PodPlan::All, "the default plan is every pod");
    h.set_pod_plan(PodPlan::Policy(PodQueries::default()));
    assert!(matches!(h.pod_plan(), PodPlan::Policy(_)));
    // A pod of this node with an address outside every range (a VPC CNI).
    let mut p = pod("kube-system", "aws-node-x", "198.51.100.9");
    p.node_name = Some("node-a".into());
    h.update(|c| c.apply_pod_from(LOCAL_PODS, Arc::new(p)));
    assert_eq!(h.pod_plan(), PodPlan::All, "no fall back to every pod");
    use futures_util::FutureExt as _;
    assert!(
        changed.notified().now_or_never().is_some(),
        "watchers not told"
    );
    // A node without ranges contradicts it as well.
    let g = Identities::new("node-a");
    g.enable();
    g.set_pod_plan(PodPlan::Policy(PodQueries::default()));
    g.update(|c| c.apply_node(node_with_range("node-a", "192.0.2.1", "10.244.1.0/24")));
    g.begin_pod_feeds(&[LOCAL_PODS], &[], Coverage::Ranges, true);
    assert!(matches!(g.pod_plan(), PodPlan::Policy(_)));
    // A node that just joined has no ranges yet: not a contradiction.
    g.update(|c| {
        c.apply_node(NodeIdentity {
            pod_cidrs: vec![],
            ..node_with_range("node-c", "192.0.2.3", "10.0.0.0/8")
        })
    });
    assert!(matches!(g.pod_plan(), PodPlan::Policy(_)));
    // A range wider than a node's share would make every address a pod's.
    g.update(|c| c.apply_node(node_with_range("node-d", "192.0.2.4", "0.0.0.0/0")));
    assert_eq!(g.pod_plan(), PodPlan::All);
    assert!(!g.lookup(ip("203.0.113.9")).is_some_and(|p| p.pod_range));
    // No node with ranges at all (a VPC CNI): every pod from the start.
    let v = Identities::new("node-a");
    v.enable();
    v.set_pod_plan(PodPlan::Policy(PodQueries::default()));
    v.update(|c| {
        c.apply_node(NodeIdentity {
            pod_cidrs: vec![],
            ..node_with_range("node-a", "192.0.2.1", "10.0.0.0/8")
        })
    });
    v.begin_pod_feeds(&[LOCAL_PODS], &[], Coverage::Ranges, true);
    assert_eq!(v.pod_plan(), PodPlan::All);
}

/// Several watches hold one pod: it leaves when the last lets it go; a selector's
/// watch letting go (the pod left its selection) is not a deletion.
#[test]
fn a_pod_stays_while_any_watch_holds_it() {
    let mut c = IdentityCache::new("node-a");
    c.set_coverage(Coverage::Selected);
    let mut p = pod("monitoring", "prom-0", "198.51.100.20");
    p.uid = Some(PodUid::new("7c4f8a6e-2b1d-4e0a-9f3c-5d6e7f8a9b0c"));
    let p = Arc::new(p);
    c.apply_pod_from(LOCAL_PODS, Arc::clone(&p));
    c.apply_pod_from(2, Arc::clone(&p));
    c.delete_pod_from(
        2,
        "monitoring",
        "prom-0",
        Some("7c4f8a6e-2b1d-4e0a-9f3c-5d6e7f8a9b0c"),
    );
    assert_eq!(owner(&c, "198.51.100.20").as_deref(), Some("prom-0"));
    // A re-list of the selector's watch without it, then the node's watch lets go.
    c.apply_pod_from(2, Arc::clone(&p));
    c.replace_pods_from(2, vec![]);
    assert_eq!(owner(&c, "198.51.100.20").as_deref(), Some("prom-0"));
    c.replace_pods_from(LOCAL_PODS, vec![]);
    assert_eq!(owner(&c, "198.51.100.20"), None);
    // Left a selection (not deleted): it comes back when selected again.
    c.apply_pod_from(2, Arc::clone(&p));
    c.delete_pod_from(
        2,
        "monitoring",
        "prom-0",
        Some("7c4f8a6e-2b1d-4e0a-9f3c-5d6e7f8a9b0c"),
    );
    assert_eq!(owner(&c, "198.51.100.20"), None);
    c.apply_pod_from(2, Arc::clone(&p));
    assert_eq!(owner(&c, "198.51.100.20").as_deref(), Some("prom-0"));
    // A watch dropped from the plan takes its pods along.
    c.retain_feeds(1 << LOCAL_PODS);
    assert_eq!(owner(&c, "198.51.100.20"), None);
    // This node's watch deleting a pod is a deletion, whoever else holds it.
    c.apply_pod_from(LOCAL_PODS, Arc::clone(&p));
    c.apply_pod_from(2, Arc::clone(&p));
    c.delete_pod_from(
        LOCAL_PODS,
        "monitoring",
        "prom-0",
        Some("7c4f8a6e-2b1d-4e0a-9f3c-5d6e7f8a9b0c"),
    );
    assert_eq!(owner(&c, "198.51.100.20"), None);
    // Pods the cluster-wide watch held (no holders) go when it is no longer run.
    c.apply_pod(Arc::new(pod("team-a", "web-0", "198.51.100.30")));
    c.retain_feeds(1 << LOCAL_PODS);
    assert_eq!(owner(&c, "198.51.100.30"), None);
}

/// What a pod's outbound connection must reach to be judged (the kernel's pod scope):
/// exactly the addresses a lookup names as a node or an API server, with a generation
/// that moves whenever they may have changed, and not when only pods do.
#[test]
fn control_plane_addresses_are_what_lookups_call_nodes_and_apiservers() {
    let mut c = IdentityCache::new("node-a");
    let addresses = |c: &IdentityCache| {
        let (generation, all) = c.control_plane_addresses();
        (generation, all.collect::<BTreeSet<IpAddr>>())
    };
    let (g0, none) = addresses(&c);
    assert!(none.is_empty());
    c.apply_node(NodeIdentity {
        name: "node-b".into(),
        roles: BTreeSet::new(),
        addresses: vec![ip("192.0.2.20"), ip("2001:db8::20")],
        pod_cidrs: vec![],
    });
    c.apply_slice(
        ("default".into(), "kubernetes".into()),
        vec![ip("198.51.100.9")],
    );
    let (g1, some) = addresses(&c);
    assert!(g1 > g0);
    assert_eq!(
        some,
        ["192.0.2.20", "2001:db8::20", "198.51.100.9"]
            .map(ip)
            .into()
    );
    for a in &some {
        let id = c.lookup(*a);
        assert!(id.node.is_some() || id.apiserver, "{a}");
    }
    c.apply_pod(pod("monitoring", "prom", "198.51.100.20"));
    assert_eq!(addresses(&c).0, g1, "a pod is not a control-plane change");
    c.delete_node("node-b");
    let (g2, left) = addresses(&c);
    assert!(g2 > g1);
    assert_eq!(left, [ip("198.51.100.9")].into());
}
