//! The operations endpoints: /metrics on the metrics address, /healthz and /readyz on the
//! health-probe address. Each server bounds what a client can hold: a request's headers must
//! arrive within `HEADER_READ_TIMEOUT`, one request per connection (no keep-alive), at most
//! `MAX_CONNECTIONS` are served at once and at most `MAX_CONNECTIONS_PER_PEER` from one
//! address, and a failing accept (out of file descriptors) backs off instead of spinning.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::warn;

use crate::health_state::HealthState;
use crate::metrics::Metrics;
use crate::secure_metrics::{Gate, Verdict};

/// A client that has not sent its request headers by then is dropped.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// Connections one address may hold at once; more are closed as soon as accepted. The
/// kubelet probes from the node's address, so another pod holding idle connections cannot
/// take the slots its probes need.
pub const MAX_CONNECTIONS_PER_PEER: usize = 32;
/// No connection lives longer, whatever the client does.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// How many connections each peer address holds.
#[derive(Default)]
struct Peers(Mutex<HashMap<IpAddr, usize>>);

/// One connection's place in its peer's count, given back on drop.
struct PeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Peers {
    /// A slot for a new connection from `ip`, unless it holds its share already.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let mut held = self.0.lock().unwrap();
        let count = held.entry(ip).or_default();
        if *count >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut held = self.peers.0.lock().unwrap();
        if let Some(count) = held.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// What one server answers.
#[derive(Clone)]
pub enum Endpoints {
    /// With a gate, only to scrapers the API server authorises (`--metrics-secure`).
    Metrics(Metrics, Option<Arc<Gate>>),
    Health(Arc<HealthState>),
}

/// Serves until the process ends; over TLS when given an acceptor.
pub async fn serve(listener: TcpListener, endpoints: Endpoints, tls: Option<TlsAcceptor>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let peers = Arc::new(Peers::default());
    let mut failures = 0u32;
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let (stream, slot) = match listener.accept().await {
            Ok((stream, peer)) => {
                failures = 0;
                // Over its share: closed at once (dropped), the slot not taken.
                let Some(slot) = peers.take(peer.ip()) else {
                    continue;
                };
                (stream, slot)
            }
            Err(e) => {
                failures += 1;
                let pause = accept_backoff(failures);
                warn!(error = %e, ?pause, "accepting a connection failed");
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let endpoints = endpoints.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                // The handshake is bounded like the headers: a client that starts one and
                // stalls holds its slot no longer.
                Some(tls) => {
                    if let Ok(Ok(stream)) =
                        tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream)).await
                    {
                        serve_connection(stream, endpoints).await;
                    }
                }
                None => serve_connection(stream, endpoints).await,
            }
            drop((permit, slot));
        });
    }
}

/// One request on one connection, then it closes.
async fn serve_connection<S>(stream: S, endpoints: Endpoints)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let endpoints = endpoints.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(&req, &endpoints).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
}

/// The pause after the n-th accept failure in a row: 10 ms doubling to 100 ms, so an
/// exhausted descriptor table is retried soon but never in a busy loop.
pub fn accept_backoff(failures: u32) -> Duration {
    let ms = 10u64.saturating_mul(1 << failures.saturating_sub(1).min(4));
    Duration::from_millis(ms.min(100))
}

/// Connections the kernel completes before the accept loop takes them (capped by
/// `net.core.somaxconn`). Tokio's default of 1,024 is smaller than a burst of idle
/// connections: past it the kernel drops the handshake's last ACK, the client believes it
/// is connected, and the server meets the connection only seconds later, at a SYN-ACK
/// retransmission, so the per-peer limit would act late.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr`. Every interface (`[::]`, what `:port` means) is bound dual-stack, so the
/// kubelet's probes reach the server on IPv4, IPv6 and dual-stack clusters alike; on a host
/// without IPv6 it falls back to IPv4's `0.0.0.0`.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        return match listen(addr, true) {
            Err(e) if no_ipv6(&e) => {
                warn!(error = %e, "no IPv6 on this host: listening on IPv4 only");
                listen((Ipv4Addr::UNSPECIFIED, addr.port()).into(), false)
            }
            bound => bound,
        };
    }
    listen(addr, false)
}

fn listen(addr: SocketAddr, dual_stack: bool) -> std::io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if dual_stack {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG as i32)?;
    TcpListener::from_std(socket.into())
}

/// The errors of a kernel without IPv6 (`ipv6.disable=1`) or of an interface-less one.
fn no_ipv6(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

/// Reads a bind address in the form controller-runtime operators take: `:8081` (every
/// interface, IPv4 and IPv6), `127.0.0.1:8081`, `[::1]:8081` or `localhost:8081`.
pub fn parse_bind_address(text: &str) -> Result<SocketAddr, String> {
    let full = match text.strip_prefix(':') {
        Some(port) => format!("[::]:{port}"),
        None => text.to_string(),
    };
    full.to_socket_addrs()
        .map_err(|e| format!("{text:?} is not a host:port address: {e}"))?
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

async fn answer<B>(req: &Request<B>, endpoints: &Endpoints) -> Response<Full<Bytes>> {
    let verdict = |v: Result<(), String>| match v {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    };
    let (status, body) = match (endpoints, req.uri().path()) {
        (Endpoints::Metrics(m, None), "/metrics") => (StatusCode::OK, m.render()),
        (Endpoints::Metrics(m, Some(gate)), "/metrics") => gated(req, gate, m).await,
        (Endpoints::Health(h), "/healthz" | "/livez") => verdict(h.live()),
        (Endpoints::Health(h), "/readyz") => verdict(h.ready()),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}

/// `/metrics` behind the gate: 401 without a token the API server knows, 403 for an identity
/// that may not get `/metrics`, 503 when the API server cannot be asked.
async fn gated<B>(req: &Request<B>, gate: &Gate, metrics: &Metrics) -> (StatusCode, String) {
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match gate.check(header).await {
        Ok(Verdict::Allowed) => (StatusCode::OK, metrics.render()),
        Ok(Verdict::Unauthenticated) => (
            StatusCode::UNAUTHORIZED,
            "a bearer token the API server authenticates is required\n".into(),
        ),
        Ok(Verdict::Forbidden) => (
            StatusCode::FORBIDDEN,
            "this identity may not get the non-resource URL /metrics\n".into(),
        ),
        Err(e) => {
            warn!(error = %e, "could not review a scraper's token");
            (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_holds_at_most_its_share_and_gets_it_back() {
        let peers = Arc::new(Peers::default());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut held: Vec<PeerSlot> = (0..MAX_CONNECTIONS_PER_PEER)
            .map(|_| peers.take(a).expect("within the share"))
            .collect();
        assert!(peers.take(a).is_none(), "over the share");
        assert!(peers.take(b).is_some(), "another peer is not affected");
        held.pop();
        assert!(
            peers.take(a).is_some(),
            "a closed connection gives its slot back"
        );
        held.clear();
        assert!(
            !peers.0.lock().unwrap().contains_key(&a),
            "no count kept for a gone peer"
        );
    }

    #[test]
    fn accept_failures_back_off_between_10_and_100_ms() {
        let ms = Duration::from_millis;
        for (n, want) in [
            (1, ms(10)),
            (2, ms(20)),
            (3, ms(40)),
            (4, ms(80)),
            (5, ms(100)),
            (50, ms(100)),
        ] {
            assert_eq!(accept_backoff(n), want, "failure {n}");
        }
    }

    #[test]
    fn bind_addresses_in_the_controller_runtime_form() {
        let cases = [
            (":8081", Some("[::]:8081")),
            ("127.0.0.1:0", Some("127.0.0.1:0")),
            ("[::1]:9000", Some("[::1]:9000")),
            ("0.0.0.0:8080", Some("0.0.0.0:8080")),
            ("8081", None),
            (":http", None),
        ];
        for (text, want) in cases {
            let got = parse_bind_address(text).ok().map(|a| a.to_string());
            assert_eq!(got.as_deref(), want, "{text}");
        }
    }

    /// `:port` serves IPv4 and IPv6 clients from one socket, as an IPv6-only or dual-stack
    /// cluster's kubelet needs. Skipped parts: none; this machine has IPv6 on loopback.
    #[tokio::test]
    async fn every_interface_is_served_on_both_families() {
        let listener = bind(parse_bind_address(":0").unwrap()).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepting = tokio::spawn(async move {
            for _ in 0..2 {
                listener.accept().await.unwrap();
            }
        });
        for ip in ["127.0.0.1", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            tokio::net::TcpStream::connect((ip, port))
                .await
                .unwrap_or_else(|e| panic!("{ip}: {e}"));
        }
        accepting.await.unwrap();
    }
}
