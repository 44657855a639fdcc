//! Whether and how the Kubernetes API is reached (`--kubeconfig`, `--no-kubernetes`), and
//! starting the feeds from it.

use super::Identities;

/// Where peer identities come from (`--kubeconfig`, `--no-kubernetes`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ApiMode {
    /// The in-cluster service account, else `$KUBECONFIG` / `~/.kube/config` when one
    /// exists; with none of them, no Kubernetes API (static lists only).
    #[default]
    Auto,
    Kubeconfig(std::path::PathBuf),
    Off,
}

/// The API settings with a `--kubeconfig` already read, built before the daemon drops its
/// capabilities: the kubeconfig and the files it names (certificate authority, client
/// certificate and key, token file) may be readable by root only with
/// CAP_DAC_READ_SEARCH (e.g. mode 0600 owned by another user), which the daemon no longer
/// has when the watchers start.
#[derive(Clone)]
pub struct ApiConfig {
    pub(super) mode: ApiMode,
    #[cfg(feature = "kubernetes")]
    pub(super) kubeconfig: Option<kube::config::Kubeconfig>,
}

impl ApiConfig {
    pub fn mode(&self) -> &ApiMode {
        &self.mode
    }
}

/// Reads what `mode` names from disk (a bad kubeconfig is an error for the user).
pub fn load(mode: &ApiMode) -> Result<ApiConfig, String> {
    match mode {
        #[cfg(feature = "kubernetes")]
        ApiMode::Kubeconfig(path) => Ok(ApiConfig {
            mode: mode.clone(),
            kubeconfig: Some(super::client::read_kubeconfig(path)?),
        }),
        #[cfg(not(feature = "kubernetes"))]
        ApiMode::Kubeconfig(_) => {
            Err("--kubeconfig: this build has no Kubernetes support (feature `kubernetes`)".into())
        }
        ApiMode::Auto | ApiMode::Off => Ok(ApiConfig {
            mode: mode.clone(),
            #[cfg(feature = "kubernetes")]
            kubeconfig: None,
        }),
    }
}

/// Starts the watchers `config` asks for (none without an API) and returns their tasks.
pub async fn start(
    config: &ApiConfig,
    identities: &Identities,
    metrics: &std::sync::Arc<crate::metrics::Metrics>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    if config.mode == ApiMode::Off {
        tracing::info!(
            "Kubernetes identities off (--no-kubernetes): peers are judged by address only"
        );
        return Vec::new();
    }
    #[cfg(feature = "kubernetes")]
    {
        super::watch::start(config, identities, metrics, stop).await
    }
    #[cfg(not(feature = "kubernetes"))]
    {
        let _ = (identities, metrics, stop);
        tracing::info!("built without Kubernetes support: peers are judged by address only");
        Vec::new()
    }
}
