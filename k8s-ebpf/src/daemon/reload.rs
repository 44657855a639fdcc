//! Policy changes: a poll of the file, or SIGHUP.

use std::{path::PathBuf, sync::Arc};

use tracing::{info, warn};

use crate::{
    capture::Capture,
    correlate::Engine,
    identity::{Identities, LabelKeys, PodPlan},
    metrics::Metrics,
    policy::{Policy, Profile},
};

/// After a reload: the pod labels the new policy's selectors name. Naming one the cache
/// dropped lists the pods again (readiness waits for that list, as for the first).
pub(super) fn keep_policy_labels(identities: &Identities, policy: &Policy) {
    if identities.keep_labels(LabelKeys::for_selectors(policy.pod_label_keys())) {
        info!("the reloaded policy names pod labels not cached: listing pods again");
    }
    if identities.set_pod_plan(PodPlan::Policy(policy.pod_queries()))
        && identities.pod_plan() != PodPlan::All
    {
        info!("the reloaded policy selects other pods: watching them instead");
    }
}

/// Notices policy changes: a poll of the file's contents, or SIGHUP. A policy that does
/// not parse, or a file that disappeared, keeps the last good policy running.
pub(super) struct PolicyWatch {
    path: Option<PathBuf>,
    /// The profile the file is layered on (`--profile`, after auto-detection).
    base: Option<Profile>,
    last_text: Option<String>,
    /// The last failure reported, so a broken file warns once, not every poll.
    last_error: Option<String>,
}

impl PolicyWatch {
    pub(super) fn new(path: Option<PathBuf>, base: Option<Profile>) -> Self {
        let last_text = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
        Self {
            path,
            base,
            last_text,
            last_error: None,
        }
    }

    /// Returns whether a new policy took effect.
    pub(super) fn check(
        &mut self,
        forced: bool,
        capture: &mut Capture,
        engine: &mut Engine,
        m: &Metrics,
    ) -> bool {
        let Some(path) = &self.path else {
            if forced {
                info!("no policy file: the embedded policy stays");
            }
            return false;
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                let msg = format!("cannot read {}: {e}", path.display());
                if forced || self.last_error.as_deref() != Some(msg.as_str()) {
                    warn!("{msg}; keeping the last good policy");
                    m.record_policy_reload(false);
                    self.last_error = Some(msg);
                }
                return false;
            }
        };
        if !forced && self.last_text.as_deref() == Some(text.as_str()) {
            return false;
        }
        self.last_text = Some(text.clone());
        match Policy::parse_on(&text, &path.display().to_string(), self.base) {
            Ok(policy) => {
                let old_window = engine.policy().window();
                let ports = policy.watched_ports();
                if let Err(e) = capture.set_watched_ports(&ports, &policy.pod_scoped_ports()) {
                    warn!(error = %e, "cannot update the kernel's watched ports; keeping the last good policy");
                    m.record_policy_reload(false);
                    return false;
                }
                if policy.window() != old_window {
                    warn!(
                        old = ?old_window, new = ?policy.window(),
                        "the in-kernel dedup window is fixed at load; the new window applies to alerts now and to the kernel after a restart"
                    );
                }
                info!(ports = ?ports, "policy reloaded from {}", path.display());
                engine.set_policy(Arc::new(policy));
                m.record_policy_reload(true);
                self.last_error = None;
                true
            }
            Err(errors) => {
                let msg = errors.to_string();
                if forced || self.last_error.as_deref() != Some(msg.as_str()) {
                    warn!("policy reload failed; keeping the last good policy:\n{msg}");
                    m.record_policy_reload(false);
                    self.last_error = Some(msg);
                }
                false
            }
        }
    }
}
