//! The questions identity asks the API about pods: which to cache ([`PodPlan`]) and, for
//! the policy's selectors, the list-and-watch queries that select them ([`PodQuery`]).
//! Identity owns these types; the policy hands over its selectors in them.

use std::collections::BTreeSet;

/// Which pods the daemon asks the API for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PodPlan {
    /// Every pod (`learn`, which writes selectors from what it sees).
    #[default]
    All,
    /// This node's pods and the pods the policy's expected peers can be.
    Policy(PodQueries),
}

/// The pods one peer selector can match, as the Kubernetes API selects them: a list and
/// watch of `namespace` (all when `None`) with `labelSelector=labels` and
/// `fieldSelector=fields` (either empty: none).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodQuery {
    pub namespace: Option<String>,
    pub labels: String,
    pub fields: String,
}

impl std::fmt::Display for PodQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "namespace={}", self.namespace.as_deref().unwrap_or("*"))?;
        if !self.labels.is_empty() {
            write!(f, " labelSelector={}", self.labels)?;
        }
        if !self.fields.is_empty() {
            write!(f, " fieldSelector={}", self.fields)?;
        }
        Ok(())
    }
}

/// Which pods the policy's expected peers can be: the policy fills it from its selectors
/// (`Policy::pod_queries`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodQueries {
    /// Some selector is `pods: {}`: any pod.
    pub any_pod: bool,
    /// One per distinct selector.
    pub queries: BTreeSet<PodQuery>,
}
