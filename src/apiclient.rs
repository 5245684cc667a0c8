//! Kubernetes clients with timeouts on every request. Without a read timeout a request on a
//! connection that went silent (a blackholed route, a hung API server) waits forever.

use std::path::Path;
use std::time::Duration;

use kube::runtime::watcher;

use crate::api_metrics::{ApiMetrics, CountRequests};
use crate::write_limit::{LimitWrites, WRITES_IN_FLIGHT};

/// How long the API server keeps one watch open. Watches end well before the controller
/// client's read timeout, so a quiet but healthy watch is never mistaken for a dead one.
pub const WATCH_SECONDS: u32 = 50;

/// Read timeout of the controller's client: longer than a watch stays open.
pub const CONTROLLER_READ_TIMEOUT: Duration = Duration::from_secs(60);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("loading the client configuration: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("building a Kubernetes client: {0}")]
    Build(#[from] kube::Error),
}

/// The configuration from a kubeconfig file, or inferred (KUBECONFIG, ~/.kube/config,
/// in-cluster).
pub async fn load_config(kubeconfig: Option<&Path>) -> Result<kube::Config, ClientError> {
    match kubeconfig {
        Some(path) => {
            let wrap = |source| ClientError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(wrap)?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(wrap)
        }
        None => Ok(kube::Config::infer().await?),
    }
}

/// A client whose requests fail once no byte arrived for `read` (counted from when the
/// request was written, not from when its pooled connection went idle).
/// Every request it sends is counted and timed in `api`.
pub fn client_with(
    config: &kube::Config,
    connect: Duration,
    read: Duration,
    api: &ApiMetrics,
) -> Result<kube::Client, ClientError> {
    Ok(
        kube::client::ClientBuilder::try_from(timed(config, connect, read))?
            .with_layer(&CountRequests(api.clone()))
            .build(),
    )
}

fn timed(config: &kube::Config, connect: Duration, read: Duration) -> kube::Config {
    let mut config = config.clone();
    config.connect_timeout = Some(connect);
    config.read_timeout = Some(read);
    config.write_timeout = Some(WRITE_TIMEOUT.min(read));
    config.reset_reader_on_write = true;
    config
}

/// The controller's client: watches, lists and writes, at most `WRITES_IN_FLIGHT` writes
/// at a time. The Lease has a client of its own, so a queue of writes never delays a
/// renewal.
pub fn controller_client(
    config: &kube::Config,
    api: &ApiMetrics,
) -> Result<kube::Client, ClientError> {
    let config = timed(config, CONNECT_TIMEOUT, CONTROLLER_READ_TIMEOUT);
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&CountRequests(api.clone()))
        .with_layer(&LimitWrites::new(WRITES_IN_FLIGHT))
        .build())
}

/// The client of `spec.upgrade`'s evictions: without kube's retries, which would repeat a
/// PodDisruptionBudget's 429 for minutes inside one request and stall the round; the
/// upgrade retries a refusal itself, with backoff, and reports it meanwhile.
pub fn eviction_client(
    config: &kube::Config,
    api: &ApiMetrics,
) -> Result<kube::Client, ClientError> {
    let mut config = config.clone();
    config.default_retry = false;
    client_with(&config, CONNECT_TIMEOUT, WRITE_TIMEOUT, api)
}

/// Every watch asks the API server to end it after `WATCH_SECONDS`; the watcher then
/// resumes from the last resourceVersion.
pub fn watch_config() -> watcher::Config {
    watcher::Config::default().timeout(WATCH_SECONDS)
}
