//! `--metrics-secure`: `/metrics` over HTTPS, answered only to a bearer token that the API
//! server authenticates (TokenReview) and authorises for `get` on the non-resource URL
//! `/metrics` (SubjectAccessReview), as controller-runtime operators serve it. Verdicts are
//! cached briefly, so a scrape every few seconds costs the API server two reviews a minute.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// How long an allowed token stays allowed without asking again; a revoked binding takes
/// effect within it.
const ALLOWED_FOR: Duration = Duration::from_secs(60);
/// Refusals are remembered for less, so a fixed binding takes effect soon.
const REFUSED_FOR: Duration = Duration::from_secs(10);
/// Tokens remembered at most; past it the cache starts over (many tokens means a client
/// trying them, and each costs it a review).
const REMEMBERED: usize = 1024;

/// What the reviews say about one token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// No token, or one the API server does not know: 401.
    Unauthenticated,
    /// A known identity without `get` on `/metrics`: 403.
    Forbidden,
}

#[derive(Debug, thiserror::Error)]
pub enum SecureMetricsError {
    #[error("reviewing a /metrics token with the API server: {0}")]
    Review(#[from] kube::Error),
    #[error("reading the metrics certificate {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("making a self-signed metrics certificate: {0}")]
    SelfSigned(String),
}

/// Asks the API server about scrapers' tokens and remembers its answers.
pub struct Gate {
    client: kube::Client,
    verdicts: Mutex<HashMap<String, (Verdict, Instant)>>,
}

impl Gate {
    pub fn new(client: kube::Client) -> Arc<Self> {
        Arc::new(Self {
            client,
            verdicts: Mutex::default(),
        })
    }

    /// The verdict on a request's Authorization header.
    pub async fn check(&self, authorization: Option<&str>) -> Result<Verdict, SecureMetricsError> {
        let Some(token) = bearer(authorization) else {
            return Ok(Verdict::Unauthenticated);
        };
        let now = Instant::now();
        if let Some(verdict) = self.remembered(token, now) {
            return Ok(verdict);
        }
        let verdict = self.review(token).await?;
        let mut verdicts = self.verdicts.lock().unwrap();
        if verdicts.len() >= REMEMBERED {
            verdicts.clear();
        }
        verdicts.insert(token.to_string(), (verdict, now));
        Ok(verdict)
    }

    fn remembered(&self, token: &str, now: Instant) -> Option<Verdict> {
        let verdicts = self.verdicts.lock().unwrap();
        let (verdict, at) = verdicts.get(token)?;
        still_valid(*verdict, *at, now).then_some(*verdict)
    }

    async fn review(&self, token: &str) -> Result<Verdict, SecureMetricsError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let status = answer.status.unwrap_or_default();
        let Some(user) = status.user.filter(|_| status.authenticated == Some(true)) else {
            return Ok(Verdict::Unauthenticated);
        };
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some("/metrics".into()),
                    verb: Some("get".into()),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &access)
            .await?;
        let allowed = answer.status.is_some_and(|s| s.allowed);
        Ok(if allowed {
            Verdict::Allowed
        } else {
            Verdict::Forbidden
        })
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let (scheme, token) = header?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn still_valid(verdict: Verdict, at: Instant, now: Instant) -> bool {
    let kept = match verdict {
        Verdict::Allowed => ALLOWED_FOR,
        Verdict::Unauthenticated | Verdict::Forbidden => REFUSED_FOR,
    };
    now.saturating_duration_since(at) < kept
}

/// The TLS side of the metrics server: `tls.crt` and `tls.key` from `cert_dir` (a mounted
/// Secret, e.g. from cert-manager), or a self-signed certificate made at start, which a
/// scraper accepts with `insecureSkipVerify` as for controller-runtime's.
pub fn acceptor(cert_dir: Option<&Path>) -> Result<TlsAcceptor, SecureMetricsError> {
    let (certs, key) = match cert_dir {
        Some(dir) => from_dir(dir)?,
        None => self_signed()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| SecureMetricsError::Certificate {
            path: cert_dir
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            reason: e.to_string(),
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn from_dir(dir: &Path) -> Result<Identity, SecureMetricsError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|e| SecureMetricsError::Certificate {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    };
    let bad = |name: &str, reason: String| SecureMetricsError::Certificate {
        path: dir.join(name).display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&read("tls.crt")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("tls.crt", e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("tls.crt", "no PEM certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&read("tls.key")?)
        .map_err(|e| bad("tls.key", e.to_string()))?;
    Ok((certs, key))
}

fn self_signed() -> Result<Identity, SecureMetricsError> {
    let names = vec![
        "vault-registrar-metrics".to_string(),
        "localhost".to_string(),
    ];
    let made = rcgen::generate_simple_self_signed(names)
        .map_err(|e| SecureMetricsError::SelfSigned(e.to_string()))?;
    let key = PrivateKeyDer::try_from(made.signing_key.serialize_der())
        .map_err(|e| SecureMetricsError::SelfSigned(e.to_string()))?;
    Ok((vec![made.cert.der().clone()], key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bearer_token_is_read() {
        for (header, want) in [
            (Some("Bearer abc.def"), Some("abc.def")),
            (Some("bearer  abc "), Some("abc")),
            (Some("Basic dXNlcjpwdw=="), None),
            (Some("Bearer "), None),
            (Some("Bearer"), None),
            (None, None),
        ] {
            assert_eq!(bearer(header), want, "{header:?}");
        }
    }

    #[test]
    fn refusals_are_remembered_for_less_than_permissions() {
        let at = Instant::now();
        let later = |s| at + Duration::from_secs(s);
        assert!(still_valid(Verdict::Allowed, at, later(59)));
        assert!(!still_valid(Verdict::Allowed, at, later(60)));
        assert!(still_valid(Verdict::Forbidden, at, later(9)));
        assert!(!still_valid(Verdict::Forbidden, at, later(10)));
        assert!(!still_valid(Verdict::Unauthenticated, at, later(10)));
    }

    #[test]
    fn a_self_signed_certificate_serves() {
        assert!(acceptor(None).is_ok());
        let missing = acceptor(Some(Path::new("/nonexistent"))).err().unwrap();
        assert!(
            missing.to_string().contains("/nonexistent/tls.crt"),
            "{missing}"
        );
    }
}
