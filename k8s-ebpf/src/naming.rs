//! The last step before output: a record about a peer the identity cache does not hold
//! gets the peer's pod from the API first ([`PodLookups`]), so that an alert names the
//! pod that connected even though the cache keeps only the pods the policy's selectors
//! can match.
//!
//! Records keep their order: each goes into a queue of pending answers
//! (`FuturesOrdered`) and leaves when every record before it has. Lookups are bounded
//! (rate, waiting requests, a 2 s timeout; see `PodLookups`), so a spray of unknown
//! sources delays nothing for long; a record that finds the queue full (1,024 waiting)
//! goes out at once, unnamed and ahead of those (counted as a `skipped` lookup).

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::{alert::AlertEvent, metrics::Metrics, output::AlertSender};
#[cfg(feature = "kubernetes")]
use crate::{alert::KubernetesFields, identity::PodLookups};

/// Records waiting for their turn (a lookup, or one before them).
const QUEUE: usize = 1024;
/// Records in the ordered queue at once.
const IN_FLIGHT: usize = 256;

/// Where the pipeline sends records: to the output, through the naming step when the
/// Kubernetes API is in use.
pub struct RecordSender {
    direct: AlertSender,
    named: Option<mpsc::Sender<AlertEvent>>,
    metrics: Arc<Metrics>,
}

impl RecordSender {
    /// Straight to the output.
    pub fn direct(out: AlertSender, metrics: Arc<Metrics>) -> Self {
        Self {
            direct: out,
            named: None,
            metrics,
        }
    }

    /// Through a naming task using `lookups`; await the task after dropping the sender.
    #[cfg(feature = "kubernetes")]
    pub fn naming(
        out: AlertSender,
        lookups: Arc<PodLookups>,
        metrics: Arc<Metrics>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(name_records(rx, out.clone(), lookups));
        (
            Self {
                direct: out,
                named: Some(tx),
                metrics,
            },
            task,
        )
    }

    pub async fn send(&self, record: AlertEvent) {
        let Some(tx) = &self.named else {
            self.direct.send(record).await;
            return;
        };
        match tx.try_send(record) {
            Ok(()) => {}
            Err(
                mpsc::error::TrySendError::Full(record) | mpsc::error::TrySendError::Closed(record),
            ) => {
                if needs_name(&record) {
                    self.metrics
                        .kubernetes_pod_lookups
                        .with_label_values(&["skipped"])
                        .inc();
                }
                self.direct.send(record).await;
            }
        }
    }
}

/// An alert about a remote peer (`source`) the cache cannot name. Allowed records
/// (`--log-allowed`) are not looked up: they would spend the budget real alerts need; nor
/// are refused and half-open attempts, whose source a spoofer chooses: SYNs spoofed from
/// a pod range would otherwise spend the budget, and the real intruder's completed
/// connection would go out unnamed.
fn needs_name(record: &AlertEvent) -> bool {
    use crate::alert::Action;
    record.kind() == crate::alert::RecordKind::Alert
        && !matches!(
            record.event.action,
            Action::RefusedAttempt | Action::HalfOpenAttempt
        )
        && record.source.is_some()
        && record
            .kubernetes
            .as_ref()
            .is_some_and(|k| matches!(k.identity, "unknown" | "unsynced" | "pod-range"))
}

#[cfg(feature = "kubernetes")]
async fn name_records(
    mut rx: mpsc::Receiver<AlertEvent>,
    out: AlertSender,
    lookups: Arc<PodLookups>,
) {
    use futures_util::StreamExt as _;
    let mut pending = futures_util::stream::FuturesOrdered::new();
    let mut open = true;
    while open || !pending.is_empty() {
        tokio::select! {
            biased;
            Some(record) = pending.next() => {
                out.send(record).await;
            }
            next = rx.recv(), if open && pending.len() < IN_FLIGHT => match next {
                Some(record) => pending.push_back(name(record, Arc::clone(&lookups))),
                None => open = false,
            },
        }
    }
}

#[cfg(feature = "kubernetes")]
async fn name(mut record: AlertEvent, lookups: Arc<PodLookups>) -> AlertEvent {
    if !needs_name(&record) {
        return record;
    }
    let Some(ip) = record.source.as_ref().map(|s| s.ip) else {
        return record;
    };
    if let Some(pod) = lookups.pod_at(ip).await {
        if let Some(k) = record.kubernetes.as_mut() {
            let before = k.peer_label();
            *k = KubernetesFields::from_pod(&pod);
            record.message = record.message.replacen(&before, &k.peer_label(), 1);
        }
    }
    record
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::SystemTime};

    use super::needs_name;
    use crate::{
        alert::{Action, AlertEvent, KubernetesFields, Subject},
        capture::{EventKind, HookKind, Observation},
        identity::PeerIdentity,
        ports::Severity,
    };

    /// A record about an unknown peer, as the pipeline makes it.
    fn record(action: Action, kind: EventKind) -> AlertEvent {
        let obs = Observation {
            kind,
            hook: HookKind::SkLookup,
            at: SystemTime::UNIX_EPOCH,
            local: "192.0.2.10:10250".parse::<SocketAddr>().unwrap(),
            remote: "10.244.9.7:40000".parse::<SocketAddr>().unwrap(),
            process: None,
            netns: 1,
            count: 1,
            window_summary: false,
            forward: None,
        };
        let unknown = KubernetesFields::from_peer(&PeerIdentity::default());
        let subject = Subject {
            rule_name: "kubelet",
            component: "kubelet",
            severity: Severity::Critical,
            ruleset: None,
            hostname: "node-a",
            container_id: None,
            kubernetes: Some(&unknown),
        };
        AlertEvent::for_observation(&obs, action, &subject)
    }

    /// Issue 25, item 6: a spoofer chooses the source of a SYN; only what completed a
    /// handshake (whose source had to answer) spends the API's lookup budget.
    #[test]
    fn only_records_with_a_real_source_are_looked_up() {
        assert!(needs_name(&record(
            Action::UnexpectedInbound,
            EventKind::Inbound
        )));
        assert!(!needs_name(&record(
            Action::HalfOpenAttempt,
            EventKind::HalfOpen
        )));
        assert!(!needs_name(&record(
            Action::RefusedAttempt,
            EventKind::Refused
        )));
    }
}
