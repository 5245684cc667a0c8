//! Probing one pod's health endpoint over HTTP or HTTPS. Deliberately small: one request,
//! no redirects followed, no credentials sent, a cap on the body, a deadline on the whole
//! exchange, and a global bound on probes in flight.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::health::classify;
use crate::tracker::Outcome;

/// The largest body accepted; Vault's health answer is well under 2 KiB.
pub const MAX_BODY: usize = 64 * 1024;

/// Where and how to probe one pod.
#[derive(Clone)]
pub struct Target {
    pub ip: IpAddr,
    pub port: u16,
    pub path: String,
    pub timeout: Duration,
    /// TLS settings and the name to verify; None for plain HTTP.
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

/// Runs probes with a bound on how many are in flight at once.
#[derive(Clone)]
pub struct Prober {
    permits: Arc<Semaphore>,
}

impl Prober {
    pub fn new(concurrency: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    /// Probes once; the outcome and how long the exchange took.
    pub async fn probe(&self, target: &Target) -> (Outcome, Duration) {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("semaphore never closed");
        let start = Instant::now();
        let outcome = match tokio::time::timeout(target.timeout, exchange(target)).await {
            Err(_) => Outcome::Failed(format!("no answer within {:?}", target.timeout)),
            Ok(Err(error)) => Outcome::Failed(error),
            Ok(Ok((status, body))) => match classify(status, &body) {
                Ok(health) => Outcome::Healthy(health),
                Err(e) => Outcome::Failed(e.to_string()),
            },
        };
        (outcome, start.elapsed())
    }
}

async fn exchange(target: &Target) -> Result<(u16, Bytes), String> {
    let tcp = TcpStream::connect((target.ip, target.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    match &target.tls {
        None => request(tcp, target).await,
        Some((config, name)) => {
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            request(tls, target).await
        }
    }
}

async fn request<S>(stream: S, target: &Target) -> Result<(u16, Bytes), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http: {e}"))?;
    let driver = tokio::spawn(connection);
    let host = match target.ip {
        IpAddr::V6(ip) => format!("[{ip}]:{}", target.port),
        IpAddr::V4(ip) => format!("{ip}:{}", target.port),
    };
    let req = http::Request::get(target.path.as_str())
        .header(http::header::HOST, host)
        .header(http::header::ACCEPT, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("vault-registrar/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let result = async {
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| format!("http: {e}"))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                format!("status {status}: body unreadable or larger than {MAX_BODY} bytes: {e}")
            })?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    result
}

/// TLS client settings for a cluster: its CA bundle, or the built-in trust roots, or no
/// verification at all when the user asked for that.
pub fn tls_config(
    ca_pem: Option<&[u8]>,
    insecure: bool,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match ca_pem {
            Some(pem) => {
                let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("CA bundle is not PEM: {e}"))?;
                if certs.is_empty() {
                    return Err("CA bundle holds no certificate".into());
                }
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| format!("CA certificate rejected: {e}"))?;
                }
            }
            None => {
                return Err(
                    "https without tls.caSecretRef needs tls.insecureSkipVerify or a CA".into(),
                );
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// Accepts any certificate: only for `insecureSkipVerify`.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The name to verify: the template with {pod} and {namespace} filled in, or the pod IP.
pub fn server_name(
    template: &str,
    pod: &str,
    namespace: &str,
    ip: IpAddr,
) -> Result<ServerName<'static>, String> {
    if template.is_empty() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    let name = template
        .replace("{pod}", pod)
        .replace("{namespace}", namespace);
    ServerName::try_from(name.clone())
        .map_err(|_| format!("spec.health.tls.serverName: {name:?} is not a valid DNS name or IP"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_template() {
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        assert_eq!(
            server_name("", "vault-0", "ns", ip).unwrap(),
            ServerName::IpAddress(ip.into())
        );
        assert_eq!(
            server_name("{pod}.vault-internal.{namespace}.svc", "vault-0", "ns", ip).unwrap(),
            ServerName::try_from("vault-0.vault-internal.ns.svc").unwrap()
        );
        assert!(server_name("bad name!", "vault-0", "ns", ip).is_err());
    }

    #[test]
    fn tls_config_needs_a_usable_ca() {
        assert!(tls_config(Some(b"not pem"), false).is_err());
        assert!(tls_config(None, false).is_err());
        assert!(tls_config(None, true).is_ok());
    }
}
