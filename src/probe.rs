//! Probing one pod's health endpoint over HTTP or HTTPS. Deliberately small: one request,
//! no redirects followed, no credentials sent, a cap on the body, a deadline on the whole
//! exchange (and a shorter one on the connect), a global bound on probes in flight shared
//! fairly between namespaces (`fair`) and a bounded share of it per cluster, so that one
//! tenant's slow pods cannot starve the others.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::fair::FairPool;

use crate::health::classify;
use crate::http1::{self, Answer, ExchangeError, Stream};
use crate::keepalive::{IDLE_EXPIRY, Key, Pool};
use crate::tracker::{Failure, FailureKind, Outcome};

/// The largest body accepted; Vault's health answer is well under 2 KiB.
pub const MAX_BODY: usize = 64 * 1024;

/// TCP keepalive of probe sockets: a pod whose node vanished sends no FIN, so without it a
/// kept connection to it looks open until the next probe waits out its whole timeout on it.
/// Only an idle connection sends these (a probed one carries traffic every interval); three
/// unanswered, 5s apart after 15s of silence, and the kernel closes it, well within the
/// pool's idle expiry.
const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(15))
    .with_interval(Duration::from_secs(5))
    .with_retries(3);

/// Where and how to probe one pod.
#[derive(Clone)]
pub struct Target {
    pub ip: IpAddr,
    pub port: u16,
    pub path: String,
    pub timeout: Duration,
    /// TLS settings, their identity (for connection reuse) and the name to verify; None
    /// for plain HTTP.
    pub tls: Option<(Arc<rustls::ClientConfig>, u64, ServerName<'static>)>,
}

impl Target {
    fn key(&self) -> Key {
        Key {
            ip: self.ip,
            port: self.port,
            tls: self
                .tls
                .as_ref()
                .map(|(_, id, name)| (*id, name.to_str().into_owned())),
        }
    }
}

/// Longest wait for a TCP connection, whatever the probe's timeout: a pod network answers
/// a SYN in milliseconds, and a pod whose SYNs go unanswered must not hold a slot for a
/// whole 30 s timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The connect's own deadline: half the probe's timeout, at most `CONNECT_TIMEOUT`, so
/// that an answer still has time to come over a connection made late.
pub fn connect_timeout(timeout: Duration) -> Duration {
    (timeout / 2).min(CONNECT_TIMEOUT)
}

/// Runs probes with a bound on how many are in flight at once, over all clusters.
#[derive(Clone)]
pub struct Prober {
    slots: FairPool,
    share: usize,
    pool: Pool,
}

impl Prober {
    pub fn new(concurrency: usize) -> Self {
        Self::with_idle_expiry(concurrency, IDLE_EXPIRY)
    }

    /// A prober whose kept connections are closed after `expiry` unused (tests shorten it).
    pub fn with_idle_expiry(concurrency: usize, expiry: Duration) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            slots: FairPool::new(concurrency),
            // A quarter of the pool: at least four clusters can always probe side by side.
            share: (concurrency / 4).clamp(1, 16),
            pool: Pool::new(expiry),
        }
    }

    /// Keeps at most `limit` idle connections; past it, a connection is closed after its
    /// answer (see `fdlimit::kept_connections`).
    pub fn keeping_at_most(self, limit: usize) -> Self {
        self.pool.limit_to(limit);
        self
    }

    /// Reports the number of kept connections to `gauge`.
    pub fn reporting_to(self, gauge: prometheus::IntGauge) -> Self {
        self.pool.report_to(gauge);
        self
    }

    /// The bound on one cluster's probes in flight, and the namespace whose fair share
    /// of the pool they take; one per probe round.
    pub fn cluster_share(&self, namespace: &str) -> Share {
        Share {
            cluster: Semaphore::new(self.share),
            namespace: namespace.to_string(),
        }
    }

    /// Probes once; the outcome and how long it took. The deadline covers the wait for a
    /// slot, so a probe never outlives its timeout; a slot that never came is our shortage,
    /// not the pod's failure.
    pub async fn probe(&self, target: &Target, share: &Share) -> (Outcome, Duration) {
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + target.timeout;
        let slots = async {
            let cluster = share
                .cluster
                .acquire()
                .await
                .expect("semaphore never closed");
            let global = self.slots.acquire(&share.namespace).await;
            (cluster, global)
        };
        let Ok(_slots) = tokio::time::timeout_at(deadline, slots).await else {
            let message = format!("no probe slot free within {:?}", target.timeout);
            return (
                Outcome::Failed(Failure::new(FailureKind::Local, message)),
                start.elapsed(),
            );
        };
        let outcome = match tokio::time::timeout_at(deadline, self.exchange(target)).await {
            Err(_) => Outcome::Failed(Failure::new(
                FailureKind::Transport,
                format!("no answer within {:?}", target.timeout),
            )),
            Ok(Err(failure)) => Outcome::Failed(failure),
            Ok(Ok((status, body))) => match classify(status, &body) {
                Ok(health) => Outcome::Healthy(health),
                Err(e) => Outcome::Failed(Failure::new(FailureKind::Answer, e.to_string())),
            },
        };
        (outcome, start.elapsed())
    }
}

/// One probe round's share of the pool: its cluster's bound, and its namespace.
pub struct Share {
    cluster: Semaphore,
    namespace: String,
}

/// Errors of our own process: the pod is not to blame for them.
fn is_local(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// A socket-level error: ours when the process ran short, the path's otherwise.
fn io_failure(what: &str, error: std::io::Error) -> Failure {
    let kind = if is_local(&error) {
        FailureKind::Local
    } else {
        FailureKind::Transport
    };
    Failure::new(kind, format!("{what}: {error}"))
}

impl Prober {
    /// One request and its answer, on an idle connection to the pod if there is one, else
    /// (or when the idle one turns out dead) on a new one. Both share the probe's deadline.
    async fn exchange(&self, target: &Target) -> Result<(u16, Vec<u8>), Failure> {
        let request = http1::request(&target.path, target.ip, target.port)
            .map_err(|e| Failure::new(FailureKind::Local, format!("request: {e}")))?;
        let key = target.key();
        if let Some(mut stream) = self.pool.take(&key) {
            match stream.exchange(&request, MAX_BODY).await {
                Ok(answer) => return Ok(self.keep(key, stream, answer)),
                // A kept connection that breaks was most likely closed or forgotten by the
                // other end while idle (a restarted Vault, or a new pod at the old address
                // answering with a reset): it says nothing of the pod, the fresh one will.
                Err(ExchangeError::Broken(_)) => {}
                Err(ExchangeError::Malformed(message)) => return Err(malformed(message)),
            }
        }
        let mut stream = connect(target).await?;
        match stream.exchange(&request, MAX_BODY).await {
            Ok(answer) => Ok(self.keep(key, stream, answer)),
            // A TLS alert the listener sent after the handshake (TLS 1.3 listeners that
            // require a client certificate do) is in the read's error.
            Err(ExchangeError::Broken(message)) => Err(hinted(Failure::new(
                FailureKind::Transport,
                format!("http: {message}"),
            ))),
            Err(ExchangeError::Malformed(message)) => Err(malformed(message)),
        }
    }

    /// Keeps the connection for the pod's next probe if the answer allows it; dropping it
    /// closes it. Every pod's is kept: an idle one holds a socket and a few hundred bytes,
    /// less than a handshake every interval costs in CPU.
    fn keep(&self, key: Key, stream: Stream, answer: Answer) -> (u16, Vec<u8>) {
        if answer.reusable {
            self.pool.put(key, stream);
        }
        (answer.status, answer.body)
    }

    /// Idle connections kept for reuse: about one per kept pod probed within the idle
    /// expiry.
    pub fn idle_connections(&self) -> usize {
        self.pool.len()
    }
}

/// Something answered, but not an HTTP answer a health report can come from.
fn malformed(message: String) -> Failure {
    Failure::new(FailureKind::Answer, message)
}

/// A new connection, TLS included, ready to send on.
async fn connect(target: &Target) -> Result<Stream, Failure> {
    let within = connect_timeout(target.timeout);
    let tcp = tokio::time::timeout(within, TcpStream::connect((target.ip, target.port)))
        .await
        .map_err(|_| {
            Failure::new(
                FailureKind::Transport,
                format!("connect: no connection within {within:?}"),
            )
        })?
        .map_err(|e| io_failure("connect", e))?;
    let _ = tcp.set_nodelay(true);
    // Without it the probe still works; only a dead peer is found later.
    let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&KEEPALIVE);
    match &target.tls {
        None => Ok(Stream::Plain(tcp)),
        Some((config, _, name)) => {
            // A failed handshake, verification included, tells nothing of Vault's state.
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| hinted(io_failure("tls", e)))?;
            Ok(Stream::Tls(Box::new(tls)))
        }
    }
}

/// TLS client settings for a cluster: its CA bundle, or no verification at all when the
/// user asked for that; with a client certificate (PEM certificates and key) when the
/// listener requires one.
pub fn tls_config(
    ca_pem: Option<&[u8]>,
    insecure: bool,
    client_pem: Option<&[u8]>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match ca_pem {
            Some(pem) => {
                let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
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
                    "https needs a CA bundle (tls.caConfigMapRef or tls.caSecretRef) or tls.insecureSkipVerify".into(),
                );
            }
        }
        builder.with_root_certificates(roots)
    };
    let config = match client_pem {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let (certs, key) = client_identity(pem)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("client certificate and key do not match: {e}"))?
        }
    };
    Ok(Arc::new(config))
}

type ClientIdentity = (
    Vec<CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// The certificates and the private key of a client identity, both PEM in one bundle.
fn client_identity(pem: &[u8]) -> Result<ClientIdentity, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("client certificate is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no client certificate in tls.crt".into());
    }
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| format!("no private key in tls.key: {e}"))?;
    Ok((certs, key))
}

/// The failure with the spec setting its TLS alert points at, put first so that bounding
/// the message keeps it.
fn hinted(failure: Failure) -> Failure {
    match tls_hint(&failure.message) {
        Some(hint) if !failure.message.starts_with(hint) => {
            Failure::new(failure.kind, format!("{hint}: {}", failure.message))
        }
        _ => failure,
    }
}

/// What a TLS alert from the listener means for the spec: a refused or missing client
/// certificate is named after the setting that provides it.
pub fn tls_hint(message: &str) -> Option<&'static str> {
    if message.contains("CertificateRequired") {
        Some("the listener requires a client certificate: set spec.health.tls.clientCertSecretRef")
    } else if message.contains("BadCertificate")
        || message.contains("UnknownCA")
        || message.contains("CertificateExpired")
        || message.contains("CertificateUnknown")
    {
        Some("the listener refused the client certificate of spec.health.tls.clientCertSecretRef")
    } else {
        None
    }
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

/// The placeholders a `serverName` template may use.
const PLACEHOLDERS: [&str; 2] = ["{pod}", "{namespace}"];

/// Checks a `serverName` template before any pod is probed: only the documented
/// placeholders, and what remains a lower-case DNS name. A typo here is a spec problem,
/// never a reason to call the pods unreachable.
pub fn check_server_name(template: &str) -> Result<(), String> {
    if template.is_empty() {
        return Ok(());
    }
    // Placeholders stand for a DNS label ("p"); pod names, being subdomains, stay valid.
    let filled = PLACEHOLDERS
        .iter()
        .fold(template.to_string(), |t, p| t.replace(p, "p"));
    if filled.contains(['{', '}']) {
        return Err(format!(
            "spec.health.tls.serverName: {template:?} uses a placeholder other than {{pod}} and {{namespace}}"
        ));
    }
    if !is_dns_name(&filled) {
        return Err(format!(
            "spec.health.tls.serverName: {template:?} does not give a lower-case DNS name"
        ));
    }
    Ok(())
}

/// RFC 1123 subdomain, as Kubernetes validates names: lower case, at most 253 characters.
fn is_dns_name(name: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    name.len() <= 253 && name.split('.').all(label_ok)
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
    fn server_name_templates_are_checked_before_probing() {
        let cases = [
            ("", true),
            ("{pod}.vault-internal", true),
            ("{pod}.vault-internal.{namespace}.svc", true),
            ("vault.example.com", true),
            ("{pod_name}.vault-internal", false),
            ("{Pod}.vault-internal", false),
            ("{pod}.vault-internal}", false),
            ("{pod}..vault", false),
            ("Vault.example", false),
            ("-vault.example", false),
            ("vault_internal", false),
            ("bad name!", false),
        ];
        for (template, ok) in cases {
            let got = check_server_name(template);
            assert_eq!(got.is_ok(), ok, "{template:?}: {got:?}");
            if let Err(message) = got {
                assert!(
                    message.starts_with("spec.health.tls.serverName"),
                    "{message}"
                );
            }
        }
        let long = format!("{}.example", "a".repeat(64));
        assert!(check_server_name(&long).is_err(), "label over 63");
    }

    #[test]
    fn our_own_shortages_are_never_the_pods_failure() {
        let cases = [
            (libc::EMFILE, FailureKind::Local),
            (libc::ENFILE, FailureKind::Local),
            (libc::ENOBUFS, FailureKind::Local),
            (libc::ENOMEM, FailureKind::Local),
            (libc::EADDRNOTAVAIL, FailureKind::Local),
            (libc::ECONNREFUSED, FailureKind::Transport),
            (libc::ECONNRESET, FailureKind::Transport),
            (libc::EHOSTUNREACH, FailureKind::Transport),
            (libc::ETIMEDOUT, FailureKind::Transport),
        ];
        for (errno, kind) in cases {
            let failure = io_failure("connect", std::io::Error::from_raw_os_error(errno));
            assert_eq!(failure.kind, kind, "errno {errno}: {}", failure.message);
            assert!(failure.unanswered());
        }
    }

    #[tokio::test]
    async fn a_probe_that_finds_no_slot_in_time_is_our_shortage() {
        let prober = Prober::new(1);
        let share = prober.cluster_share("ns");
        let _held = share.cluster.acquire().await.unwrap();
        let target = Target {
            ip: "127.0.0.1".parse().unwrap(),
            port: 9,
            path: "/v1/sys/health".into(),
            timeout: Duration::from_millis(50),
            tls: None,
        };
        let (outcome, took) = prober.probe(&target, &share).await;
        match outcome {
            Outcome::Failed(f) => assert_eq!(f.kind, FailureKind::Local, "{}", f.message),
            other => panic!("{other:?}"),
        }
        assert!(
            took < Duration::from_secs(1),
            "the wait counts in the deadline: {took:?}"
        );
    }

    #[test]
    fn one_cluster_gets_a_quarter_of_the_pool() {
        for (pool, share) in [(1, 1), (8, 2), (64, 16), (1000, 16)] {
            assert_eq!(Prober::new(pool).share, share, "pool {pool}");
        }
    }

    #[test]
    fn the_connect_gives_up_before_the_probe() {
        // (probe timeout, connect timeout)
        for (timeout, connect) in [(300, 150), (1000, 500), (4000, 2000), (30000, 2000)] {
            let got = connect_timeout(Duration::from_millis(timeout));
            assert_eq!(got, Duration::from_millis(connect), "timeout {timeout} ms");
        }
    }

    #[test]
    fn tls_config_needs_a_usable_ca() {
        assert!(tls_config(Some(b"not pem"), false, None).is_err());
        assert!(tls_config(None, false, None).is_err());
        assert!(tls_config(None, true, None).is_ok());
        let missing_key = tls_config(None, true, Some(b"not pem")).unwrap_err();
        assert!(missing_key.contains("client certificate"), "{missing_key}");
    }
}

#[cfg(test)]
mod reuse_tests {
    use super::*;
    use vault_registrar_testkit::vault_sim::{Behavior, Role, SimState, VaultSim};

    fn target(addr: std::net::SocketAddr) -> Target {
        Target {
            ip: addr.ip(),
            port: addr.port(),
            path: "/v1/sys/health".into(),
            timeout: Duration::from_secs(2),
            tls: None,
        }
    }

    #[tokio::test]
    async fn steady_probes_reuse_one_connection_and_survive_its_loss() {
        let sim = VaultSim::start(
            "127.0.0.1:0".parse().unwrap(),
            None,
            SimState::new(Role::Active),
        )
        .await
        .unwrap();
        let prober = Prober::new(4);
        let share = prober.cluster_share("ns");
        let target = target(sim.addr());
        for _ in 0..3 {
            let (outcome, _) = prober.probe(&target, &share).await;
            assert!(matches!(outcome, Outcome::Healthy(_)), "{outcome:?}");
        }
        assert_eq!(sim.health_requests(), 3);
        assert_eq!(prober.idle_connections(), 1, "one connection kept");
        // The pod restarts: the kept connection dies; the next probe still gets an answer.
        sim.update(|s| s.behavior = Behavior::Crash).await;
        sim.update(|s| s.behavior = Behavior::Serve).await;
        let (outcome, _) = prober.probe(&target, &share).await;
        assert!(matches!(outcome, Outcome::Healthy(_)), "{outcome:?}");
        assert_eq!(sim.health_requests(), 4);
    }
}
