//! Who a local process is by its place in the cgroup v2 hierarchy, where only the system
//! manager and the container runtime can put it: a systemd system unit (`/system.slice/…`)
//! or a container of a pod (`/kubepods…/pod<uid>/<container>`). A name an unprivileged
//! user can choose proves nothing: `systemd-run --user --unit=kubelet` runs a process in
//! `/user.slice/user-1000.slice/user@1000.service/app.slice/kubelet.service`, and a user
//! scope can carry any container id (ids are readable in every `/proc/PID/cgroup`). So a
//! unit is the unit directly under `system.slice` (a full path from the root, never a last
//! component), and a container id counts only in its place under the runtime's pod
//! hierarchy, together with the pod uid beside it (the caller checks that the API names
//! that container in that pod).
//!
//! The path comes from `/proc/PID/cgroup` (the `0::` line), relative to the reader's
//! cgroup namespace root. A pod on cgroup v2 has its own cgroup namespace: the daemon sees
//! a host unit as `/../../../../system.slice/kubelet.service` (one `..` a level of its own
//! root's depth) and another pod's container as `/../../kubepods-besteffort-pod….slice/…`
//! (up to the ancestor both share, then down). [`CgroupView`] learns the depth of its
//! namespace root from the host's init (`/proc/1/cgroup` under hostPID: `/init.scope` or
//! `/`), so a path that climbs exactly that far is absolute; one that climbs less stays
//! under the daemon's own top-level cgroup (`kubepods` for a pod), where no unprivileged
//! user can create a cgroup.

use super::PodIdentity;

/// How the daemon's cgroup namespace places other processes' cgroup paths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupView {
    /// Levels between the hierarchy's root and the daemon's cgroup namespace root (0: the
    /// host's namespace, every path is absolute).
    depth: usize,
}

/// A local process's cgroup, as far as it names the process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupPlace {
    /// The path as `/proc/PID/cgroup` gives it (the alert's, and `cgroups:` prefixes when
    /// no absolute form is known).
    pub path: String,
    /// The path from the hierarchy's root, when the daemon can tell it.
    pub absolute: Option<String>,
    /// The systemd system unit (`kubelet.service`): the first component under
    /// `/system.slice` that is not a slice.
    pub unit: Option<String>,
    /// The container and its pod, from their places under the runtime's pod hierarchy.
    pub container: Option<PodContainer>,
}

/// A container id in its pod's cgroup, as the runtime placed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodContainer {
    /// The pod's uid, hyphenated (systemd's `_` turned back into `-`).
    pub pod_uid: String,
    /// The container id (64 hexadecimal digits).
    pub id: String,
}

impl PodContainer {
    /// The API's pod is the one whose cgroup holds this container: its uid is the one
    /// the path names (the caller found the pod by the container id the API lists).
    pub fn is_in(&self, pod: &PodIdentity) -> bool {
        pod.uid
            .as_ref()
            .is_some_and(|uid| uid.to_string().eq_ignore_ascii_case(&self.pod_uid))
    }
}

/// The top-level cgroups and QoS levels of the kubelet's pod hierarchy, with the systemd
/// and the cgroupfs drivers.
const POD_ANCESTORS: &[&str] = &[
    "kubepods",
    "kubepods.slice",
    "besteffort",
    "burstable",
    "kubepods-besteffort.slice",
    "kubepods-burstable.slice",
];

impl CgroupPlace {
    /// The path from the hierarchy's root when known, else as read.
    pub fn root_path(&self) -> &str {
        self.absolute.as_deref().unwrap_or(&self.path)
    }
}

impl CgroupView {
    /// The view from the daemon's own cgroup namespace: the depth read from the host's
    /// init (`/proc/1/cgroup`); the host's view (every path absolute) when it cannot be
    /// read or is not climbing (no cgroup namespace, or no hostPID).
    pub fn detect() -> Self {
        std::fs::read_to_string("/proc/1/cgroup")
            .ok()
            .and_then(|text| unified_path(&text).map(Self::of_init))
            .unwrap_or_default()
    }

    /// From the cgroup path the host's init shows: it sits at the root or one level below
    /// (`/init.scope`), so its leading `..` count is this namespace's depth.
    pub fn of_init(init_path: &str) -> Self {
        Self {
            depth: climb(init_path).0,
        }
    }

    /// The daemon's view, detected once.
    pub fn daemon() -> &'static Self {
        static VIEW: std::sync::OnceLock<CgroupView> = std::sync::OnceLock::new();
        VIEW.get_or_init(Self::detect)
    }

    /// The view from the host's cgroup namespace.
    pub fn host() -> Self {
        Self::default()
    }

    /// The cgroup of process `pid` (`None`: gone, or no cgroup v2 line).
    pub fn of_pid(&self, pid: u32) -> Option<CgroupPlace> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        unified_path(&text).map(|p| self.place(p))
    }

    /// What the cgroup path `path` (as `/proc/PID/cgroup` gives it) says of its process.
    pub fn place(&self, path: &str) -> CgroupPlace {
        let (up, rest) = climb(path);
        let absolute = (up == self.depth).then(|| format!("/{}", rest.join("/")));
        let unit = absolute
            .is_some()
            .then(|| system_unit(&rest))
            .flatten()
            .map(str::to_owned);
        // Climbing less than the namespace's depth stays under the daemon's own top-level
        // cgroup (the pod hierarchy when it runs as a pod); more is not a path it can place.
        let container = if absolute.is_some() {
            rest.first()
                .is_some_and(|top| top.starts_with("kubepods"))
                .then(|| pod_container(&rest))
                .flatten()
        } else if up < self.depth {
            pod_container(&rest)
        } else {
            None
        };
        CgroupPlace {
            path: path.to_owned(),
            absolute,
            unit,
            container,
        }
    }
}

/// The `0::` line's path (cgroup v2).
fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// How many leading `..` components `path` has, and the components after them.
fn climb(path: &str) -> (usize, Vec<&str>) {
    let mut up = 0;
    let mut rest = Vec::new();
    for c in path.split('/').filter(|c| !c.is_empty()) {
        if c == ".." && rest.is_empty() {
            up += 1;
        } else {
            rest.push(c);
        }
    }
    (up, rest)
}

/// `system.slice[/system-*.slice…]/UNIT[/…]` → `UNIT`.
fn system_unit<'a>(components: &[&'a str]) -> Option<&'a str> {
    let (first, below) = components.split_first()?;
    if *first != "system.slice" {
        return None;
    }
    below
        .iter()
        .find(|c| !c.ends_with(".slice"))
        .copied()
        .filter(|unit| unit.contains('.'))
}

/// `[kubepods…/QoS…/]POD/CONTAINER[/…]`: every component before the pod's is one of the
/// pod hierarchy's own, the pod's names its uid, the next one is the container's.
fn pod_container(components: &[&str]) -> Option<PodContainer> {
    let at = components.iter().position(|c| !POD_ANCESTORS.contains(c))?;
    let pod_uid = pod_uid(components[at])?;
    let id = container_id(components.get(at + 1)?)?;
    Some(PodContainer {
        pod_uid,
        id: id.to_owned(),
    })
}

/// `pod<uid>` (cgroupfs driver) or `kubepods[-QOS]-pod<uid with _>.slice` (systemd).
fn pod_uid(component: &str) -> Option<String> {
    let uid = match component.strip_suffix(".slice") {
        Some(slice) => slice
            .strip_prefix("kubepods-")?
            .trim_start_matches("besteffort-")
            .trim_start_matches("burstable-")
            .strip_prefix("pod")?,
        None => component.strip_prefix("pod")?,
    };
    let uid = uid.replace('_', "-");
    (!uid.is_empty() && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')).then_some(uid)
}

/// The container id a runtime names a container's cgroup with: `cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `docker-<id>.scope` (systemd driver) or `<id>` (cgroupfs).
fn container_id(component: &str) -> Option<&str> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    let id = name.rsplit('-').next()?;
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "8f1c2d3e-4a5b-4c6d-9e7f-0a1b2c3d4e5f";

    fn systemd_pod(uid: &str) -> String {
        format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope",
            uid.replace('-', "_")
        )
    }

    #[test]
    fn units_only_directly_under_the_system_slice() {
        let host = CgroupView::host();
        let unit = |p: &str| host.place(p).unit;
        assert_eq!(
            unit("/system.slice/kubelet.service").as_deref(),
            Some("kubelet.service")
        );
        assert_eq!(
            unit("/system.slice/system-getty.slice/getty@tty1.service").as_deref(),
            Some("getty@tty1.service")
        );
        assert_eq!(
            unit("/system.slice/k3s.service/sub").as_deref(),
            Some("k3s.service"),
            "a unit's own (delegated) subtree is the unit's"
        );
        for impostor in [
            "/user.slice/user-1000.slice/user@1000.service/app.slice/kubelet.service",
            "/user.slice/user-1000.slice/user@1000.service/system.slice/kubelet.service",
            "/user.slice/user-1000.slice/session-3.scope",
            "/kubelet.service",
            "/machine.slice/system.slice/kubelet.service",
            "/system.slice",
        ] {
            assert_eq!(unit(impostor), None, "{impostor}");
        }
    }

    #[test]
    fn containers_only_in_the_pod_hierarchy() {
        let host = CgroupView::host();
        let container = |p: &str| host.place(p).container;
        let expected = Some(PodContainer {
            pod_uid: UID.to_owned(),
            id: ID.to_owned(),
        });
        assert_eq!(container(&systemd_pod(UID)), expected);
        assert_eq!(
            container(&format!("/kubepods/besteffort/pod{UID}/{ID}")),
            expected
        );
        assert_eq!(container(&format!("/kubepods/pod{UID}/{ID}")), expected);
        assert_eq!(
            container(&format!(
                "/kubepods.slice/kubepods-pod{}.slice/crio-{ID}.scope",
                UID.replace('-', "_")
            )),
            expected
        );
        for impostor in [
            format!(
                "/user.slice/user-1000.slice/user@1000.service/app.slice/cri-containerd-{ID}.scope"
            ),
            format!(
                "/user.slice/user-1000.slice/user@1000.service{}",
                systemd_pod(UID)
            ),
            format!("/docker/{ID}"),
            format!("/k8s-ebpf-test/cri-containerd-{ID}.scope"),
            // Another container's id in a cgroup nested under a pod's container.
            format!("/kubepods/besteffort/pod{UID}/cri-containerd-x.scope/{ID}"),
        ] {
            assert_eq!(container(&impostor), None, "{impostor}");
        }
    }

    #[test]
    fn a_cgroup_namespace_climbs_to_the_root_or_stays_in_the_daemons_hierarchy() {
        // The daemon in a pod's container, four levels down (systemd driver).
        let view = CgroupView::of_init("/../../../../init.scope");
        let unit = view.place("/../../../../system.slice/kubelet.service");
        assert_eq!(unit.unit.as_deref(), Some("kubelet.service"));
        assert_eq!(
            unit.absolute.as_deref(),
            Some("/system.slice/kubelet.service")
        );
        // A user unit climbs to the root too, and is still no system unit.
        let user = view.place(
            "/../../../../user.slice/user-1000.slice/user@1000.service/app.slice/kubelet.service",
        );
        assert_eq!(user.unit, None);
        // Another pod's container: up to the QoS slice both share, then down.
        let other = view.place(&format!(
            "/../../kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        ));
        assert_eq!(other.container.map(|c| c.id).as_deref(), Some(ID));
        assert_eq!(other.absolute, None);
        // A system.slice that does not start at the root is no system unit.
        assert_eq!(view.place("/../system.slice/kubelet.service").unit, None);
        // From the host's namespace, the root's own system.slice.
        assert_eq!(CgroupView::of_init("/init.scope"), CgroupView::host());
        assert_eq!(CgroupView::of_init("/"), CgroupView::host());
    }
}
