//! How a round probes its cluster's pods, from the spec and the CA it references; what
//! cannot be used is told apart as the spec's problem or a transient API error.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use tracing::warn;

use super::{Context, cluster_name};
use crate::crd::{Scheme, VaultCluster, parse_duration};
use crate::error::Error;
use crate::probe::{check_server_name, tls_config};

/// Why a round cannot probe: the spec (reported in the status, labels held) or a transient
/// API error (retried with backoff, status untouched).
pub enum Unusable {
    Spec(String),
    Api(Error),
}

/// How to probe this cluster's pods: port, path, timeout, TLS.
pub struct ProbeSettings {
    pub port: u16,
    pub path: String,
    pub timeout: Duration,
    /// How often the settled active pod alone is probed.
    pub active_interval: Duration,
    pub threshold: u32,
    /// The TLS client settings, their identity (for connection reuse), the name template.
    pub tls: Option<(Arc<rustls::ClientConfig>, u64, String)>,
}

pub async fn probe_settings(vc: &VaultCluster, ctx: &Context) -> Result<ProbeSettings, Unusable> {
    let h = &vc.spec.health;
    let spec = |message: String| Unusable::Spec(message);
    let duration = |field: &str, text: &str| {
        parse_duration(text).map_err(|e| spec(format!("spec.health.{field}: {e}")))
    };
    let timeout = duration("timeout", &h.timeout)?;
    let interval = duration("interval", &h.interval)?;
    let active_interval = duration("activeInterval", &h.active_interval)?;
    if timeout >= interval {
        return Err(spec(
            "spec.health.timeout must be less than spec.health.interval".into(),
        ));
    }
    let tls = match h.scheme {
        Scheme::Http => None,
        Scheme::Https => {
            let tls = h.tls.clone().unwrap_or_default();
            check_server_name(&tls.server_name).map_err(spec)?;
            let ca = match &tls.ca_secret_ref {
                Some(r) => Some(ca(vc, ctx, &r.name, &r.key).await?),
                None => None,
            };
            let config = tls_config(ca.as_deref(), tls.insecure_skip_verify)
                .map_err(|e| spec(format!("spec.health.tls: {e}")))?;
            let pem = String::from_utf8_lossy(ca.as_deref().unwrap_or_default());
            let insecure = if tls.insecure_skip_verify {
                "insecure"
            } else {
                "verify"
            };
            let id = crate::rhythm::signature([pem.as_ref(), insecure].into_iter());
            Some((config, id, tls.server_name))
        }
    };
    Ok(ProbeSettings {
        port: h.port as u16,
        path: h.path.clone(),
        timeout,
        active_interval,
        threshold: h.failure_threshold.max(1) as u32,
        tls,
    })
}

/// The CA bundle, from the cache when it is still good. When reading it again fails for a
/// reason that is not the spec's, the bundle read before keeps the probes going.
async fn ca(vc: &VaultCluster, ctx: &Context, name: &str, key: &str) -> Result<Vec<u8>, Unusable> {
    let ns = vc.namespace().unwrap_or_default();
    let cache_key = (ns, name.to_string(), key.to_string());
    let generation = vc.metadata.generation;
    if let Some(pem) = ctx
        .caches
        .ca(&cache_key, generation, handshakes_failing(vc))
    {
        return Ok(pem);
    }
    match read_ca(vc, ctx, name, key).await {
        Ok(pem) => {
            ctx.caches.remember_ca(cache_key, generation, pem.clone());
            Ok(pem)
        }
        Err(Unusable::Api(error)) => match ctx.caches.last_ca(&cache_key) {
            Some(pem) => {
                warn!(cluster = %cluster_name(vc), %error, "using the CA bundle read before");
                Ok(pem)
            }
            None => Err(Unusable::Api(error)),
        },
        Err(spec) => Err(spec),
    }
}

/// Whether every pod's last probe failed its TLS handshake: the CA may have been rotated.
fn handshakes_failing(vc: &VaultCluster) -> bool {
    let members = vc
        .status
        .as_ref()
        .map(|s| s.members.as_slice())
        .unwrap_or_default();
    !members.is_empty()
        && members
            .iter()
            .all(|m| m.last_probe_error.starts_with("tls:"))
}

/// Reads the CA bundle. A missing Secret or key is the spec's problem; any other error
/// reading it is transient and says nothing about the spec.
async fn read_ca(
    vc: &VaultCluster,
    ctx: &Context,
    name: &str,
    key: &str,
) -> Result<Vec<u8>, Unusable> {
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &vc.namespace().unwrap_or_default());
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|source| {
            Unusable::Api(Error::ReadSecret {
                cluster: cluster_name(vc),
                secret: name.into(),
                source,
            })
        })?
        .ok_or_else(|| {
            Unusable::Spec(format!(
                "spec.health.tls.caSecretRef: Secret {name} not found"
            ))
        })?;
    secret
        .data
        .and_then(|d| d.get(key).map(|b| b.0.clone()))
        .ok_or_else(|| {
            Unusable::Spec(format!(
                "spec.health.tls.caSecretRef: Secret {name} has no key {key}"
            ))
        })
}
