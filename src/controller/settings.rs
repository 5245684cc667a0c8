//! How a round probes its cluster's pods, from the spec and the CA it references; what
//! cannot be used is told apart as the spec's problem or a transient API error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use kube::api::Api;
use tracing::warn;

use super::{Context, cluster_name};
use crate::crd::{Scheme, TlsSpec, VaultCluster, parse_duration};
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
    /// How often every pod is probed.
    pub interval: Duration,
    /// How often the settled active pod alone is probed.
    pub active_interval: Duration,
    pub threshold: u32,
    /// The TLS client settings, their identity (for connection reuse), the name template.
    pub tls: Option<(Arc<rustls::ClientConfig>, u64, String)>,
    /// A problem of the spec that does not stop the probes: a CA source gone or emptied
    /// after a good read, whose last bundle keeps failovers followed meanwhile.
    pub warning: Option<String>,
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
    let mut warning = None;
    let tls = match h.scheme {
        Scheme::Http => None,
        Scheme::Https => {
            let tls = h.tls.clone().unwrap_or_default();
            check_server_name(&tls.server_name).map_err(spec)?;
            let source = CaSource::of(&tls);
            let bundle = read_pem(vc, ctx, source.as_ref(), &mut warning).await?;
            let client_source = CaSource::client(&tls);
            let client = read_pem(vc, ctx, client_source.as_ref(), &mut warning).await?;
            let config = built_config(
                bundle.as_deref(),
                tls.insecure_skip_verify,
                client.as_deref(),
            )
            .map_err(|e| {
                let secret = match (&client_source, &source) {
                    (Some(client), _) if e.contains("client") || e.contains("key") => Some(client),
                    (_, Some(ca)) if ca.kind == CaKind::Secret => Some(ca),
                    _ => None,
                };
                spec(match secret {
                    Some(secret) => secret_unusable(secret),
                    None => format!("spec.health.tls: {e}"),
                })
            })?;
            let pem = String::from_utf8_lossy(bundle.as_deref().unwrap_or_default());
            let client_pem = String::from_utf8_lossy(client.as_deref().unwrap_or_default());
            let insecure = if tls.insecure_skip_verify {
                "insecure"
            } else {
                "verify"
            };
            // A new bundle or client certificate makes new connections; old ones are not reused.
            let id =
                crate::rhythm::signature([pem.as_ref(), client_pem.as_ref(), insecure].into_iter());
            Some((config, id, tls.server_name))
        }
    };
    Ok(ProbeSettings {
        port: h.port as u16,
        path: h.path.clone(),
        timeout,
        interval,
        active_interval,
        threshold: h.failure_threshold.max(1) as u32,
        tls,
        warning,
    })
}

/// What a TLS client configuration was built from: the CA bundle, the client certificate
/// and key, whether verification is off.
type Inputs = (Vec<u8>, Vec<u8>, bool);

/// Configurations built before, with when each was last asked for.
type Built = HashMap<Inputs, (Arc<rustls::ClientConfig>, Instant)>;

/// A configuration nobody asked for in this long is dropped.
const UNUSED_TTL: Duration = Duration::from_secs(600);

/// The TLS client configuration for these inputs, built once and shared: building it
/// parses every certificate and the key, which every TLS cluster would otherwise pay for
/// every round. Keyed by the inputs themselves, so a changed bundle always builds anew.
fn built_config(
    bundle: Option<&[u8]>,
    insecure: bool,
    client: Option<&[u8]>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    static BUILT: Mutex<Option<Built>> = Mutex::new(None);
    let inputs = (
        bundle.unwrap_or_default().to_vec(),
        client.unwrap_or_default().to_vec(),
        insecure,
    );
    let now = Instant::now();
    let mut built = BUILT.lock().unwrap();
    let built = built.get_or_insert_with(HashMap::new);
    if let Some((config, used)) = built.get_mut(&inputs) {
        *used = now;
        return Ok(config.clone());
    }
    let config = tls_config(bundle, insecure, client)?;
    prune(built, now);
    built.insert(inputs, (config.clone(), now));
    Ok(config)
}

/// Forgets the configurations unused for `UNUSED_TTL`.
fn prune(built: &mut Built, now: Instant) {
    built.retain(|_, (_, used)| now.saturating_duration_since(*used) < UNUSED_TTL);
}

/// The PEM a source holds, when the spec names one; a problem read with it (a source gone
/// while the copy read before stands in) goes to `warning`, the first one kept.
async fn read_pem(
    vc: &VaultCluster,
    ctx: &Context,
    source: Option<&CaSource>,
    warning: &mut Option<String>,
) -> Result<Option<Vec<u8>>, Unusable> {
    let Some(source) = source else {
        return Ok(None);
    };
    let (pem, problem) = ca(vc, ctx, source).await?;
    if warning.is_none() {
        *warning = problem;
    }
    Ok(Some(pem))
}

/// Where a cluster's CA bundle lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CaSource {
    pub kind: CaKind,
    pub name: String,
    pub key: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CaKind {
    ConfigMap,
    Secret,
    /// A kubernetes.io/tls Secret: the probe's client certificate and key, read as one PEM
    /// bundle (tls.crt then tls.key).
    ClientCert,
}

impl CaSource {
    fn of(tls: &TlsSpec) -> Option<Self> {
        let (kind, r) = match (&tls.ca_config_map_ref, &tls.ca_secret_ref) {
            (Some(r), _) => (CaKind::ConfigMap, r),
            (None, Some(r)) => (CaKind::Secret, r),
            (None, None) => return None,
        };
        Some(Self {
            kind,
            name: r.name.clone(),
            key: r.key.clone(),
        })
    }

    /// Where the client certificate lives, when the listener asks for one.
    fn client(tls: &TlsSpec) -> Option<Self> {
        tls.client_cert_secret_ref.as_ref().map(|r| Self {
            kind: CaKind::ClientCert,
            name: r.name.clone(),
            key: "tls.crt".into(),
        })
    }

    /// The spec field that names it, for messages.
    fn field(&self) -> &'static str {
        match self.kind {
            CaKind::ConfigMap => "spec.health.tls.caConfigMapRef",
            CaKind::Secret => "spec.health.tls.caSecretRef",
            CaKind::ClientCert => "spec.health.tls.clientCertSecretRef",
        }
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            CaKind::ConfigMap => "ConfigMap",
            CaKind::Secret | CaKind::ClientCert => "Secret",
        }
    }
}

/// The CA bundle, from the cache when it is still good. When reading it again fails, the
/// bundle read before keeps the probes going, so failovers are still followed; if the
/// spec is to blame (the object or key gone), that is returned beside it to report. With
/// none read before, a refusal (403) is reported as the spec's problem, since it lasts
/// until someone grants access or changes the reference.
async fn ca(
    vc: &VaultCluster,
    ctx: &Context,
    source: &CaSource,
) -> Result<(Vec<u8>, Option<String>), Unusable> {
    let ns = vc.namespace().unwrap_or_default();
    let cache_key = (ns.clone(), source.clone());
    let generation = vc.metadata.generation;
    let uid = vc.uid().unwrap_or_default();
    if let Some(cached) = ctx
        .caches
        .ca(&cache_key, &uid, generation, handshakes_failing(vc))
    {
        return Ok(cached);
    }
    match read_ca(vc, ctx, source).await {
        Ok(pem) => {
            ctx.caches
                .remember_ca(cache_key, &uid, generation, pem.clone());
            Ok((pem, None))
        }
        Err(Unusable::Api(error)) => match ctx.caches.last_ca(&cache_key) {
            Some(pem) => {
                warn!(cluster = %cluster_name(vc), %error, "using the CA bundle read before");
                Ok((pem, None))
            }
            None if forbidden(&error) => Err(Unusable::Spec(match source.kind {
                CaKind::Secret | CaKind::ClientCert => secret_unusable(source),
                CaKind::ConfigMap => format!(
                    "{}: {error}; the operator needs get on configmaps",
                    source.field()
                ),
            })),
            None => Err(Unusable::Api(error)),
        },
        Err(Unusable::Spec(problem)) => {
            let standing_in = format!("{problem}; probing with the bundle read before");
            match ctx
                .caches
                .ca_failed(&cache_key, &uid, generation, standing_in.clone())
            {
                Some(pem) => Ok((pem, Some(standing_in))),
                None => Err(Unusable::Spec(problem)),
            }
        }
    }
}

/// Why a CA Secret gives no bundle, the same words whatever the cause (missing, without
/// the key, holding no certificate, or one the operator may not read): the VaultCluster's
/// author learns nothing of Secrets they may not read themselves.
fn secret_unusable(source: &CaSource) -> String {
    if source.kind == CaKind::ClientCert {
        return format!(
            "spec.health.tls.clientCertSecretRef: Secret {} gives no client certificate and key \
             the operator can use (missing, without tls.crt or tls.key, not PEM, or forbidden \
             to it): list the namespace in the chart's tls.secretNamespaces (and the name in \
             tls.secretNames when set)",
            source.name
        );
    }
    format!(
        "spec.health.tls.caSecretRef: Secret {} key {} gives no CA bundle the operator can use \
         (missing, without the key or a certificate, or forbidden to it): use caConfigMapRef, \
         or list the namespace in the chart's tls.secretNamespaces (and the name in \
         tls.secretNames when set)",
        source.name, source.key
    )
}

fn forbidden(error: &Error) -> bool {
    matches!(error, Error::ReadCa { source: kube::Error::Api(s), .. } if s.code == 403)
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

/// Reads the CA bundle. A missing object or key is the spec's problem; any other error
/// reading it is transient and says nothing about the spec.
async fn read_ca(vc: &VaultCluster, ctx: &Context, source: &CaSource) -> Result<Vec<u8>, Unusable> {
    let ns = vc.namespace().unwrap_or_default();
    let api_error = |source_error| {
        Unusable::Api(Error::ReadCa {
            cluster: cluster_name(vc),
            object: format!("{} {}", source.kind_name(), source.name),
            source: source_error,
        })
    };
    let data = match source.kind {
        CaKind::ConfigMap => {
            let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
            api.get_opt(&source.name)
                .await
                .map_err(api_error)?
                .map(|cm| {
                    let text = cm
                        .data
                        .and_then(|d| d.get(&source.key).map(|t| t.clone().into_bytes()));
                    text.or_else(|| {
                        cm.binary_data
                            .and_then(|d| d.get(&source.key).map(|b| b.0.clone()))
                    })
                })
        }
        CaKind::Secret => {
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            api.get_opt(&source.name)
                .await
                .map_err(api_error)?
                .map(|secret| {
                    secret
                        .data
                        .and_then(|d| d.get(&source.key).map(|b| b.0.clone()))
                })
        }
        CaKind::ClientCert => {
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            api.get_opt(&source.name)
                .await
                .map_err(api_error)?
                .map(|secret| {
                    let data = secret.data.unwrap_or_default();
                    let (cert, key) = (data.get("tls.crt")?, data.get("tls.key")?);
                    Some([cert.0.as_slice(), b"\n", key.0.as_slice()].concat())
                })
        }
    };
    let (field, kind, name, key) = (
        source.field(),
        source.kind_name(),
        &source.name,
        &source.key,
    );
    match data {
        Some(Some(pem)) => Ok(pem),
        _ if source.kind != CaKind::ConfigMap => Err(Unusable::Spec(secret_unusable(source))),
        None => Err(Unusable::Spec(format!("{field}: {kind} {name} not found"))),
        Some(None) => Err(Unusable::Spec(format!(
            "{field}: {kind} {name} has no key {key}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> Vec<u8> {
        let made = rcgen::generate_simple_self_signed(vec!["vault".to_owned()]).unwrap();
        made.cert.pem().into_bytes()
    }

    #[test]
    fn one_configuration_per_distinct_input() {
        let (a, b) = (ca(), ca());
        let first = built_config(Some(&a), false, None).unwrap();
        let again = built_config(Some(&a), false, None).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "built twice from the same CA");
        let other = built_config(Some(&b), false, None).unwrap();
        assert!(
            !Arc::ptr_eq(&first, &other),
            "another CA shares a configuration"
        );
        let insecure = built_config(Some(&a), true, None).unwrap();
        assert!(
            !Arc::ptr_eq(&first, &insecure),
            "verification off shares one"
        );
        // A failure is not remembered: the same bad input fails again.
        assert!(built_config(Some(b"not pem"), false, None).is_err());
        assert!(built_config(Some(b"not pem"), false, None).is_err());
    }

    #[test]
    fn configurations_unused_for_a_while_are_dropped() {
        let config = tls_config(None, true, None).unwrap();
        let now = Instant::now();
        let mut built: Built = HashMap::new();
        built.insert((b"old".to_vec(), vec![], false), (config.clone(), now));
        built.insert((b"new".to_vec(), vec![], false), (config, now + UNUSED_TTL));
        prune(&mut built, now + UNUSED_TTL + Duration::from_secs(1));
        let left: Vec<&[u8]> = built.keys().map(|(ca, ..)| ca.as_slice()).collect();
        assert_eq!(left, [b"new".as_slice()]);
    }
}
