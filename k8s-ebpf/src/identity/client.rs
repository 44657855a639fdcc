//! Reaching the API: where its address and credentials come from (in-cluster, a
//! kubeconfig), the client, and the one read of the local Node (`--profile auto`).

use std::path::Path;

use k8s_openapi::api::core::v1::Node;
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client, Config,
};
use tracing::info;

use super::{ApiConfig, ApiMode};

/// Where the API's address and credentials come from.
#[derive(Clone)]
pub enum ApiSource {
    /// `--kubeconfig FILE`, already read ([`read_kubeconfig`]).
    Kubeconfig(std::path::PathBuf, Box<Kubeconfig>),
    /// In-cluster service account, else `$KUBECONFIG` / `~/.kube/config`.
    Infer,
}

/// Reads a kubeconfig and, into it, the files it names (certificate authority, client
/// certificate and key, token file), so that nothing is left to read after the
/// capability drop. A named file that cannot be read now is left as a path (kube reports
/// it if the context in use needs it). A token file read here is not re-read when it
/// rotates: a kubeconfig with rotating tokens belongs in-cluster (the service account).
pub fn read_kubeconfig(path: &Path) -> Result<Kubeconfig, String> {
    use base64::Engine as _;
    let mut kc =
        Kubeconfig::read_from(path).map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?;
    let b64 = |bytes: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(bytes);
    let read = |file: &Option<String>| file.as_deref().and_then(|f| std::fs::read(f).ok());
    for cluster in kc.clusters.iter_mut().filter_map(|c| c.cluster.as_mut()) {
        if cluster.certificate_authority_data.is_none() {
            if let Some(ca) = read(&cluster.certificate_authority) {
                cluster.certificate_authority_data = Some(b64(ca));
                cluster.certificate_authority = None;
            }
        }
    }
    for user in kc
        .auth_infos
        .iter_mut()
        .filter_map(|a| a.auth_info.as_mut())
    {
        if user.client_certificate_data.is_none() {
            if let Some(crt) = read(&user.client_certificate) {
                user.client_certificate_data = Some(b64(crt));
                user.client_certificate = None;
            }
        }
        if user.client_key_data.is_none() {
            if let Some(key) = read(&user.client_key) {
                user.client_key_data = Some(secrecy::SecretString::from(b64(key)));
                user.client_key = None;
            }
        }
        if user.token.is_none() {
            if let Some(token) = read(&user.token_file) {
                let token = String::from_utf8_lossy(&token).trim().to_owned();
                user.token = Some(secrecy::SecretString::from(token));
                user.token_file = None;
            }
        }
    }
    Ok(kc)
}

/// Whether anything points at a cluster: in-cluster environment, `$KUBECONFIG` or
/// `~/.kube/config`. Without any, the daemon runs on the policy's static lists.
pub fn cluster_configured() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
        || std::env::var_os("HOME").is_some_and(|h| Path::new(&h).join(".kube/config").is_file())
}

/// Builds a client for `source`.
pub async fn client(source: &ApiSource) -> anyhow::Result<Client> {
    let config = match source {
        ApiSource::Kubeconfig(path, kc) => {
            Config::from_custom_kubeconfig((**kc).clone(), &KubeConfigOptions::default())
                .await
                .map_err(|e| anyhow::anyhow!("kubeconfig {}: {e}", path.display()))?
        }
        ApiSource::Infer => Config::infer()
            .await
            .map_err(|e| anyhow::anyhow!("no usable Kubernetes configuration: {e}"))?,
    };
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config)
        .map_err(|e| anyhow::anyhow!("cannot build a client for {server}: {e}"))?;
    info!(%server, "Kubernetes API configured");
    Ok(client)
}

/// Where the API is, when `config` names or finds one.
pub(super) fn source(config: &ApiConfig) -> Option<ApiSource> {
    match (&config.mode, &config.kubeconfig) {
        (ApiMode::Kubeconfig(path), Some(kc)) => {
            Some(ApiSource::Kubeconfig(path.clone(), Box::new(kc.clone())))
        }
        (ApiMode::Auto, _) if cluster_configured() => Some(ApiSource::Infer),
        _ => None,
    }
}

/// How long `--profile auto` waits for the local Node before falling back to kubeadm.
const NODE_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The local Node's labels and `spec.providerID` (`--profile auto`), or why not.
pub async fn local_node(
    config: &ApiConfig,
    name: &str,
) -> Result<(std::collections::BTreeMap<String, String>, Option<String>), String> {
    let Some(source) = source(config) else {
        return Err("no Kubernetes API configured".to_owned());
    };
    let client = client(&source).await.map_err(|e| format!("{e:#}"))?;
    let node = tokio::time::timeout(NODE_LOOKUP_TIMEOUT, Api::<Node>::all(client).get(name))
        .await
        .map_err(|_| format!("no answer for Node `{name}` within {NODE_LOOKUP_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot read Node `{name}` (needs `get` on nodes): {e}"))?;
    Ok((
        node.metadata.labels.unwrap_or_default(),
        node.spec.and_then(|s| s.provider_id),
    ))
}
