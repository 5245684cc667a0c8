//! A fake Vault (or OpenBao) node for end-to-end tests.
//!
//! It serves the unauthenticated endpoints the operator reads — `sys/health` and `sys/leader` —
//! with Vault's status codes, query overrides and JSON bodies, over plain HTTP or TLS, and can be
//! switched while running into the failure modes a real node shows: refusing connections,
//! hanging, or answering with something that is not Vault (an HTML page, a 404).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

const HEALTH_PATH: &str = "/v1/sys/health";
const LEADER_PATH: &str = "/v1/sys/leader";
/// Go's zero `time.Time`, which Vault reports as `active_time` on nodes that are not active.
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// The HA role the simulated node reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Active,
    Standby,
    PerfStandby,
    Sealed,
    Uninitialized,
    /// Removed from the raft cluster (Vault 1.19+).
    Removed,
    /// A standby whose request-forwarding heartbeat to the active node fails (Vault 1.19+).
    HaUnhealthyStandby,
    /// The HA leader of a DR secondary cluster (Enterprise): 472, `standby: false`.
    DrSecondary,
    /// A standby of a DR secondary cluster: 472 too, `standby: true`.
    DrSecondaryStandby,
}

/// How the node's HTTP listener behaves, independent of its role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Behavior {
    Serve,
    /// Not listening: connections are refused. Leaving it rebinds the same address.
    Crash,
    /// Accepts and reads requests but never answers; the connection closes when the behaviour
    /// changes or the simulator stops.
    Hang,
    /// `200` with an HTML body, as a proxy or wrong service in front of the port would answer.
    Garbage,
    /// `200` whose body is the first half of the JSON Vault would send.
    Truncated,
    /// `404` with a plain-text page, as another HTTP server reached at the pod's address
    /// answers (traffic leaving through another route, an ingress default backend).
    NotFound,
}

/// Everything that decides what the simulator answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimState {
    pub role: Role,
    /// Passed through verbatim; empty models a listener with `redact_version`.
    pub version: String,
    pub behavior: Behavior,
    pub cluster_name: String,
    /// OpenBao flavour: only 200/429/501/503 and `standbyok`, no `performance_standby` and no
    /// fields Vault added in 1.16 or later.
    pub openbao: bool,
}

impl SimState {
    pub fn new(role: Role) -> Self {
        SimState {
            role,
            version: "1.17.2".to_owned(),
            behavior: Behavior::Serve,
            cluster_name: "vault-cluster-sim".to_owned(),
            openbao: false,
        }
    }

    pub fn with_role(mut self, role: Role) -> Self {
        self.role = role;
        self
    }

    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    pub fn with_behavior(mut self, behavior: Behavior) -> Self {
        self.behavior = behavior;
        self
    }

    pub fn with_cluster_name(mut self, name: impl Into<String>) -> Self {
        self.cluster_name = name.into();
        self
    }

    pub fn with_openbao(mut self, openbao: bool) -> Self {
        self.openbao = openbao;
        self
    }
}

/// PEM certificate chain and private key the simulator serves TLS with.
#[derive(Clone, Debug)]
pub struct SimTls {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A running simulated node. Dropping it aborts every task it started.
pub struct VaultSim {
    inner: Arc<Inner>,
    /// Also serialises state changes, so a listener is never started or stopped twice.
    listening: Mutex<Option<Listening>>,
}

impl VaultSim {
    /// Binds `addr` (port 0 picks a free port) and starts serving `state`.
    pub async fn start(
        addr: SocketAddr,
        tls: Option<SimTls>,
        state: SimState,
    ) -> io::Result<VaultSim> {
        let acceptor = tls.as_ref().map(tls_acceptor).transpose()?;
        // Bind even when starting crashed, so that port 0 resolves to a real address.
        let listener = bind(addr)?;
        let inner = Arc::new(Inner::new(listener.local_addr()?, acceptor, state.clone()));
        let listening =
            (state.behavior != Behavior::Crash).then(|| Listening::spawn(listener, inner.clone()));
        Ok(VaultSim {
            inner,
            listening: Mutex::new(listening),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Base URL of the node, `http://` or `https://` depending on TLS.
    pub fn url(&self) -> String {
        self.inner.url()
    }

    /// Replaces the whole state; see [`VaultSim::update`].
    pub async fn set(&self, state: SimState) {
        self.update(|current| *current = state).await;
    }

    /// Changes the state in place. Entering `Crash` returns once the listener is closed and its
    /// connections dropped; leaving it returns once the address is bound again.
    ///
    /// # Panics
    /// If the address cannot be bound again within a few seconds.
    pub async fn update(&self, f: impl FnOnce(&mut SimState)) {
        let mut slot = self.listening.lock().await;
        let mut next = self.state();
        f(&mut next);
        self.inner.note_role(next.role);
        let crash = next.behavior == Behavior::Crash;
        self.inner.state.send_replace(next);
        match (crash, slot.take()) {
            (true, Some(running)) => running.stop().await,
            (false, None) => *slot = Some(self.rebind().await),
            (_, unchanged) => *slot = unchanged,
        }
    }

    pub fn state(&self) -> SimState {
        self.inner.state.borrow().clone()
    }

    /// Requests to `/v1/sys/health` received so far, whatever the behaviour made of them.
    pub fn health_requests(&self) -> u64 {
        self.inner.health_requests.load(Ordering::SeqCst)
    }

    /// What standbys report as the active node in `sys/leader` (empty until set, as when a
    /// standby has not yet found its leader).
    pub fn set_leader(&self, api_addr: impl Into<String>, cluster_addr: impl Into<String>) {
        *lock(&self.inner.leader) = (api_addr.into(), cluster_addr.into());
    }

    /// Closes the listener and every connection, and waits until they are gone.
    pub async fn stop(mut self) {
        if let Some(running) = self.listening.get_mut().take() {
            running.stop().await;
        }
    }

    async fn rebind(&self) -> Listening {
        let listener = bind_with_retry(self.inner.addr).await;
        Listening::spawn(listener, self.inner.clone())
    }
}

impl Drop for VaultSim {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        if let Some(running) = self.listening.get_mut().take() {
            running.task.abort();
        }
    }
}

/// State shared with the accept loop and every connection.
struct Inner {
    addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    state: watch::Sender<SimState>,
    health_requests: AtomicU64,
    started: Instant,
    /// Unix seconds when the node last became active, for `sys/leader`'s `active_time`.
    active_since: AtomicU64,
    leader: StdMutex<(String, String)>,
}

impl Inner {
    fn new(addr: SocketAddr, tls: Option<TlsAcceptor>, state: SimState) -> Self {
        let active_since = if leads(state.role) { unix_now() } else { 0 };
        Inner {
            addr,
            tls,
            state: watch::Sender::new(state),
            health_requests: AtomicU64::new(0),
            started: Instant::now(),
            active_since: AtomicU64::new(active_since),
            leader: StdMutex::new((String::new(), String::new())),
        }
    }

    fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    fn note_role(&self, next: Role) {
        if leads(next) && !leads(self.state.borrow().role) {
            self.active_since.store(unix_now(), Ordering::SeqCst);
        }
    }
}

/// Whether the role holds its cluster's HA lock (a DR secondary has a leader too).
fn leads(role: Role) -> bool {
    matches!(role, Role::Active | Role::DrSecondary)
}

/// A bound listener and the task accepting on it.
struct Listening {
    stop_tx: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Listening {
    fn spawn(listener: TcpListener, inner: Arc<Inner>) -> Self {
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, inner, stop_rx));
        Listening { stop_tx, task }
    }

    async fn stop(self) {
        let _ = self.stop_tx.send(());
        let _ = self.task.await;
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>, mut stop: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(serve_conn(stream, inner.clone()));
                }
                // Usually fd exhaustion: back off instead of spinning or dying.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
            // Reap finished connections so a long test does not accumulate them.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    stop_listening(&listener);
    drop(listener);
    conns.shutdown().await;
}

/// Stops the socket listening before its descriptor is closed. A process the test spawns at that
/// moment holds a copy of every descriptor until its exec, and closing ours alone would leave
/// the port accepting through that copy; shutting the socket down acts on the socket itself.
fn stop_listening(listener: &TcpListener) {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown on a descriptor we own and keep open for the whole call.
    unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RD) };
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = crate::netns::socket_for(addr)?;
    // Lets a crashed node come back on its port while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn bind_with_retry(addr: SocketAddr) -> TcpListener {
    let mut last_err = None;
    for _ in 0..50 {
        match bind(addr) {
            Ok(listener) => return listener,
            Err(err) => last_err = Some(err),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("VaultSim could not bind {addr} again: {last_err:?}");
}

fn tls_acceptor(tls: &SimTls) -> io::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid_input)?;
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).map_err(invalid_input)?;
    // An explicit provider keeps working however many providers the test binary links.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(invalid_input)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(invalid_input)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn invalid_input(err: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, err.to_string())
}

async fn serve_conn(stream: TcpStream, inner: Arc<Inner>) {
    let _ = stream.set_nodelay(true);
    match inner.tls.clone() {
        Some(acceptor) => {
            if let Ok(tls) = acceptor.accept(stream).await {
                serve_http(tls, inner).await;
            }
        }
        None => serve_http(stream, inner).await,
    }
}

async fn serve_http<I>(io: I, inner: Arc<Inner>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| handle(req, inner.clone()));
    // Errors are clients hanging up or connections dropped on purpose: nothing to report.
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await;
}

type HttpResponse = Response<Full<Bytes>>;

/// Answers one request. An `Err` makes hyper close the connection without answering.
async fn handle(req: http::Request<Incoming>, inner: Arc<Inner>) -> io::Result<HttpResponse> {
    if req.uri().path() == HEALTH_PATH {
        inner.health_requests.fetch_add(1, Ordering::SeqCst);
    }
    let state = inner.state.borrow().clone();
    let head = req.method() == Method::HEAD;
    match state.behavior {
        Behavior::Hang => Err(hang_until_changed(&inner).await),
        // Only reachable in the instant between the state change and the listener closing.
        Behavior::Crash => Err(io::Error::other("simulated crash")),
        Behavior::Garbage => Ok(garbage(head)),
        Behavior::NotFound => Ok(not_found(head)),
        Behavior::Serve => route(&inner, &state, &req).into_response(head),
        Behavior::Truncated => route(&inner, &state, &req).truncated().into_response(head),
    }
}

async fn hang_until_changed(inner: &Inner) -> io::Error {
    let mut rx = inner.state.subscribe();
    // Closing rather than answering afterwards: a wedged process is restarted, not resumed.
    let _ = rx.wait_for(|s| s.behavior != Behavior::Hang).await;
    io::Error::other("simulated hang ended")
}

fn garbage(head: bool) -> HttpResponse {
    let body = if head { "" } else { "<html>not vault</html>" };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/html")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response is valid")
}

fn not_found(head: bool) -> HttpResponse {
    let body = if head { "" } else { "404 page not found\n" };
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response is valid")
}

/// A JSON answer before it becomes an HTTP response.
#[derive(Debug)]
struct Reply {
    /// Any integer a query asked for; Vault does not check it until it writes the header.
    status: i64,
    json: Vec<u8>,
}

impl Reply {
    fn new(status: i64, body: &impl Serialize) -> Self {
        let json = serde_json::to_vec(body).expect("response bodies serialise");
        Reply { status, json }
    }

    fn errors(status: i64, errors: &[String]) -> Self {
        Reply::new(status, &serde_json::json!({ "errors": errors }))
    }

    fn truncated(mut self) -> Self {
        self.json.truncate(self.json.len() / 2);
        self.status = 200;
        self
    }

    /// Vault writes whatever code a query asked for; Go's net/http panics on codes outside
    /// 100..=999 and the connection is dropped unanswered, so that is what happens here too.
    fn into_response(self, head: bool) -> io::Result<HttpResponse> {
        let status = u16::try_from(self.status)
            .ok()
            .and_then(|code| StatusCode::from_u16(code).ok())
            .ok_or_else(|| io::Error::other(format!("invalid status code {}", self.status)))?;
        let body = if head {
            Bytes::new()
        } else {
            Bytes::from(self.json)
        };
        Ok(Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CACHE_CONTROL, "no-store")
            .body(Full::new(body))
            .expect("status and headers are valid"))
    }
}

fn route(inner: &Inner, state: &SimState, req: &http::Request<Incoming>) -> Reply {
    let method = req.method();
    match req.uri().path() {
        HEALTH_PATH if method == Method::GET || method == Method::HEAD => {
            health_reply(state, req.uri().query().unwrap_or(""), unix_now())
        }
        LEADER_PATH if method == Method::GET => leader_reply(inner, state),
        HEALTH_PATH | LEADER_PATH => Reply::errors(405, &[]),
        _ => Reply::errors(404, &[]),
    }
}

/// What a role means in terms of the flags Vault's health handler looks at.
#[derive(Clone, Copy, Debug, Default)]
struct Facts {
    initialized: bool,
    sealed: bool,
    standby: bool,
    perf_standby: bool,
    removed: bool,
    dr_secondary: bool,
    /// Only standbys have a forwarding connection whose health is reported.
    ha_healthy: Option<bool>,
}

impl Facts {
    fn of(state: &SimState) -> Facts {
        let standby = Facts {
            initialized: true,
            standby: true,
            ha_healthy: Some(true),
            ..Facts::default()
        };
        match flavour_role(state) {
            Role::Active => Facts {
                initialized: true,
                ..Facts::default()
            },
            Role::Standby => standby,
            Role::PerfStandby => Facts {
                perf_standby: true,
                ..standby
            },
            Role::HaUnhealthyStandby => Facts {
                ha_healthy: Some(false),
                ..standby
            },
            // Real Vault seals a node that raft removed; its answer is the sealed one plus
            // the removed flag, with no forwarding link to report.
            Role::Removed => Facts {
                initialized: true,
                sealed: true,
                standby: true,
                removed: true,
                ..Facts::default()
            },
            Role::DrSecondary => Facts {
                initialized: true,
                dr_secondary: true,
                ..Facts::default()
            },
            Role::DrSecondaryStandby => Facts {
                dr_secondary: true,
                ..standby
            },
            Role::Sealed => Facts {
                initialized: true,
                sealed: true,
                standby: true,
                ..Facts::default()
            },
            Role::Uninitialized => Facts {
                sealed: true,
                standby: true,
                ..Facts::default()
            },
        }
    }

    fn unsealed(&self) -> bool {
        self.initialized && !self.sealed
    }
}

/// OpenBao has none of the Enterprise or 1.19 states; the nearest thing it reports is a plain
/// standby.
fn flavour_role(state: &SimState) -> Role {
    match state.role {
        Role::PerfStandby
        | Role::HaUnhealthyStandby
        | Role::Removed
        | Role::DrSecondary
        | Role::DrSecondaryStandby
            if state.openbao =>
        {
            Role::Standby
        }
        role => role,
    }
}

/// The codes a health request resolves to, after its query overrides.
#[derive(Debug, PartialEq, Eq)]
struct Codes {
    standby_ok: bool,
    perf_standby_ok: bool,
    uninit: i64,
    removed: i64,
    sealed: i64,
    ha_unhealthy: i64,
    dr_secondary: i64,
    perf_standby: i64,
    standby: i64,
    active: i64,
}

impl Codes {
    /// Parses the overrides the flavour knows; the other flavour's parameters are ignored like
    /// any unknown query parameter. `Err` carries the 400 body's error list.
    fn parse(query: &str, openbao: bool) -> Result<Codes, Vec<String>> {
        let vault_code = |name, default| {
            if openbao {
                Ok(default)
            } else {
                query_code(query, name, default)
            }
        };
        Ok(Codes {
            standby_ok: query_flag(query, "standbyok")?,
            perf_standby_ok: !openbao && query_flag(query, "perfstandbyok")?,
            uninit: query_code(query, "uninitcode", 501)?,
            removed: vault_code("removedcode", 530)?,
            sealed: query_code(query, "sealedcode", 503)?,
            ha_unhealthy: vault_code("haunhealthycode", 474)?,
            dr_secondary: vault_code("drsecondarycode", 472)?,
            perf_standby: vault_code("performancestandbycode", 473)?,
            standby: query_code(query, "standbycode", 429)?,
            active: query_code(query, "activecode", 200)?,
        })
    }

    /// Vault's precedence; the `ok` flags fall through to the active code, not to 200.
    fn pick(&self, f: &Facts) -> i64 {
        if !f.initialized {
            self.uninit
        } else if f.removed {
            self.removed
        } else if f.sealed {
            self.sealed
        } else if f.ha_healthy == Some(false) {
            self.ha_unhealthy
        } else if f.dr_secondary {
            self.dr_secondary
        } else if f.perf_standby {
            if self.perf_standby_ok {
                self.active
            } else {
                self.perf_standby
            }
        } else if f.standby && !self.standby_ok {
            self.standby
        } else {
            self.active
        }
    }
}

/// The first value of `name`, as Go's `Query()[name][0]`. Values here are digits and words, so
/// percent-decoding is not needed.
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Vault answers a malformed code with a bare 400 and an empty error list.
fn query_code(query: &str, name: &str, default: i64) -> Result<i64, Vec<String>> {
    match query_param(query, name) {
        None => Ok(default),
        Some(value) => value.parse().map_err(|_| Vec::new()),
    }
}

/// Go's `strconv.ParseBool`, which Vault uses for the `*ok` flags.
fn query_flag(query: &str, name: &str) -> Result<bool, Vec<String>> {
    match query_param(query, name) {
        None => Ok(false),
        Some("1" | "t" | "T" | "TRUE" | "true" | "True") => Ok(true),
        Some("0" | "f" | "F" | "FALSE" | "false" | "False") => Ok(false),
        Some(bad) => Err(vec![format!(
            "bad value for {name} parameter: strconv.ParseBool: parsing {bad:?}: invalid syntax"
        )]),
    }
}

/// `sys/health` body, fields in Vault's order; `None` fields are left out.
#[derive(Debug, Serialize)]
struct HealthBody {
    initialized: bool,
    sealed: bool,
    standby: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    performance_standby: Option<bool>,
    replication_performance_mode: &'static str,
    replication_dr_mode: &'static str,
    server_time_utc: u64,
    version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    enterprise: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    echo_duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    clock_skew_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replication_primary_canary_age_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    removed_from_cluster: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ha_connection_healthy: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_request_forwarding_heartbeat_ms: Option<u64>,
}

impl HealthBody {
    fn of(state: &SimState, f: &Facts, now: u64) -> Self {
        let (name, id) = if f.unsealed() {
            (
                Some(state.cluster_name.clone()),
                Some(cluster_id(&state.cluster_name)),
            )
        } else {
            (None, None)
        };
        let body = HealthBody {
            initialized: f.initialized,
            sealed: f.sealed,
            standby: f.standby,
            performance_standby: Some(f.perf_standby),
            replication_performance_mode: replication_mode(f, "disabled"),
            replication_dr_mode: replication_mode(
                f,
                if f.dr_secondary {
                    "secondary"
                } else {
                    "disabled"
                },
            ),
            server_time_utc: now,
            version: state.version.clone(),
            enterprise: Some(false),
            cluster_name: name,
            cluster_id: id,
            echo_duration_ms: Some(0),
            clock_skew_ms: Some(0),
            replication_primary_canary_age_ms: Some(0),
            removed_from_cluster: Some(f.removed),
            ha_connection_healthy: f.ha_healthy,
            // Figures of the kind Vault 1.21 reports: a heartbeat about a second old while
            // the link is fine; past its 10 s deadline when the link has failed.
            last_request_forwarding_heartbeat_ms: f
                .ha_healthy
                .map(|ok| if ok { 1_172 } else { 10_034 }),
        };
        if state.openbao { body.openbao() } else { body }
    }

    /// OpenBao forked before performance standbys went open source and before 1.16; real
    /// OpenBao 2.7.2 reports its unsealed nodes' performance replication mode as "primary"
    /// (`tests/testkit/openbao-2.7.2-health.json`).
    fn openbao(self) -> Self {
        let performance_mode = match self.replication_performance_mode {
            "disabled" => "primary",
            other => other,
        };
        HealthBody {
            replication_performance_mode: performance_mode,
            replication_primary_canary_age_ms: None,
            performance_standby: None,
            enterprise: None,
            echo_duration_ms: None,
            clock_skew_ms: None,
            removed_from_cluster: None,
            ha_connection_healthy: None,
            last_request_forwarding_heartbeat_ms: None,
            ..self
        }
    }
}

/// A sealed (or never initialized) node has not loaded its replication state, and Vault 1.21
/// says so with "unknown" whatever the mode will be once unsealed.
fn replication_mode(f: &Facts, unsealed_mode: &'static str) -> &'static str {
    if f.unsealed() {
        unsealed_mode
    } else {
        "unknown"
    }
}

fn health_reply(state: &SimState, query: &str, now: u64) -> Reply {
    match Codes::parse(query, state.openbao) {
        Ok(codes) => {
            let facts = Facts::of(state);
            Reply::new(codes.pick(&facts), &HealthBody::of(state, &facts, now))
        }
        Err(errors) => Reply::errors(400, &errors),
    }
}

/// `sys/leader` body, fields in Vault's order.
#[derive(Debug, Serialize)]
struct LeaderBody {
    ha_enabled: bool,
    is_self: bool,
    active_time: String,
    leader_address: String,
    leader_cluster_address: String,
    performance_standby: bool,
    performance_standby_last_remote_wal: u64,
    raft_committed_index: u64,
    raft_applied_index: u64,
}

fn leader_reply(inner: &Inner, state: &SimState) -> Reply {
    let facts = Facts::of(state);
    if !facts.unsealed() {
        return Reply::errors(503, &["Vault is sealed".to_owned()]);
    }
    let is_self = leads(flavour_role(state));
    let (leader_address, leader_cluster_address) = if is_self {
        (inner.url(), cluster_url(inner.addr))
    } else {
        lock(&inner.leader).clone()
    };
    // Grows like a live raft log, so pollers comparing indexes see progress.
    let index = 100 + inner.started.elapsed().as_secs();
    let active_time = if is_self {
        rfc3339(inner.active_since.load(Ordering::SeqCst))
    } else {
        GO_ZERO_TIME.to_owned()
    };
    let body = LeaderBody {
        ha_enabled: true,
        is_self,
        active_time,
        leader_address,
        leader_cluster_address,
        performance_standby: facts.perf_standby,
        performance_standby_last_remote_wal: 0,
        raft_committed_index: index,
        raft_applied_index: index,
    };
    Reply::new(200, &body)
}

/// Vault's cluster port defaults to the API port plus one.
fn cluster_url(addr: SocketAddr) -> String {
    let mut cluster = addr;
    cluster.set_port(addr.port().wrapping_add(1));
    format!("https://{cluster}")
}

/// A UUID-shaped id that stays the same for a cluster name, like a real cluster's id.
fn cluster_id(name: &str) -> String {
    let high = fnv1a(name.as_bytes(), 0xcbf2_9ce4_8422_2325);
    let low = fnv1a(name.as_bytes(), high);
    let hex = format!("{:032x}", (u128::from(high) << 64) | u128::from(low));
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    bytes.iter().fold(seed, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Formats unix seconds as RFC 3339 UTC, without pulling in a date crate.
fn rfc3339(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let (year, month, day) = civil_from_days(days);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date, counting in 400-year eras that start
/// on March 1st so that the leap day falls at the end of each year.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A poisoned lock only means another test thread panicked; the data is still usable.
fn lock<T>(mutex: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const WAIT: Duration = Duration::from_secs(5);

    #[derive(Debug)]
    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Resp {
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap_or_else(|err| {
                panic!(
                    "body is not JSON ({err}): {}",
                    String::from_utf8_lossy(&self.body)
                )
            })
        }

        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }
    }

    fn parse_response(raw: &[u8]) -> io::Result<Resp> {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| io::Error::other(format!("no header end in {raw:?}")))?;
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let body = raw[split + 4..].to_vec();
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    async fn request_on<S>(mut io: S, method: &str, target: &str) -> io::Result<Resp>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let request =
            format!("{method} {target} HTTP/1.1\r\nHost: vault\r\nConnection: close\r\n\r\n");
        io.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        // A TLS peer may close without close_notify; what arrived before is still the answer.
        if let Err(err) = io.read_to_end(&mut raw).await
            && raw.is_empty()
        {
            return Err(err);
        }
        parse_response(&raw)
    }

    async fn send(addr: SocketAddr, method: &str, target: &str) -> io::Result<Resp> {
        let stream = TcpStream::connect(addr).await?;
        tokio::time::timeout(WAIT, request_on(stream, method, target))
            .await
            .map_err(|_| io::Error::other("request timed out"))?
    }

    async fn get(addr: SocketAddr, target: &str) -> Resp {
        send(addr, "GET", target).await.expect("request succeeds")
    }

    async fn sim(state: SimState) -> VaultSim {
        sim_on("127.0.0.1", state).await
    }

    /// A sim on a loopback address of its own. A test that lets the port go and then expects a
    /// refusal needs one: the tests run in parallel, and another test's bind to port 0 on
    /// 127.0.0.1 may be handed the port just freed.
    async fn sim_on(ip: &str, state: SimState) -> VaultSim {
        VaultSim::start(format!("{ip}:0").parse().unwrap(), None, state)
            .await
            .expect("sim starts")
    }

    async fn health_of(state: SimState, query: &str) -> Resp {
        let node = sim(state).await;
        get(node.addr(), &format!("{HEALTH_PATH}{query}")).await
    }

    #[tokio::test]
    async fn vault_status_codes_per_role() {
        let expected = [
            (Role::Active, 200),
            (Role::Standby, 429),
            (Role::PerfStandby, 473),
            (Role::Sealed, 503),
            (Role::Uninitialized, 501),
            (Role::Removed, 530),
            (Role::HaUnhealthyStandby, 474),
            (Role::DrSecondary, 472),
            (Role::DrSecondaryStandby, 472),
        ];
        for (role, code) in expected {
            let resp = health_of(SimState::new(role), "").await;
            assert_eq!(resp.status, code, "{role:?}");
            assert_eq!(resp.header("content-type"), Some("application/json"));
            let body = resp.json();
            assert_eq!(body["version"], "1.17.2", "{role:?}");
            assert_eq!(body["enterprise"], false);
            assert_eq!(
                body["removed_from_cluster"],
                role == Role::Removed,
                "{role:?}"
            );
            assert!(body["server_time_utc"].as_u64().unwrap() > 1_600_000_000);
        }
    }

    #[tokio::test]
    async fn body_flags_match_role() {
        // (role, initialized, sealed, standby, performance_standby, replication modes)
        let expected = [
            (Role::Active, true, false, false, false, "disabled"),
            (Role::Standby, true, false, true, false, "disabled"),
            (Role::PerfStandby, true, false, true, true, "disabled"),
            (
                Role::HaUnhealthyStandby,
                true,
                false,
                true,
                false,
                "disabled",
            ),
            (Role::Sealed, true, true, true, false, "unknown"),
            (Role::Uninitialized, false, true, true, false, "unknown"),
            (Role::Removed, true, true, true, false, "unknown"),
        ];
        for (role, init, sealed, standby, perf, mode) in expected {
            let body = health_of(SimState::new(role), "").await.json();
            assert_eq!(body["initialized"], init, "{role:?}");
            assert_eq!(body["sealed"], sealed, "{role:?}");
            assert_eq!(body["standby"], standby, "{role:?}");
            assert_eq!(body["performance_standby"], perf, "{role:?}");
            assert_eq!(body["replication_dr_mode"], mode, "{role:?}");
            assert_eq!(body["replication_performance_mode"], mode, "{role:?}");
        }
    }

    #[tokio::test]
    async fn cluster_identity_only_while_unsealed() {
        for role in [Role::Sealed, Role::Uninitialized, Role::Removed] {
            let body = health_of(SimState::new(role), "").await.json();
            assert!(body.get("cluster_name").is_none(), "{role:?}: {body}");
            assert!(body.get("cluster_id").is_none(), "{role:?}: {body}");
        }
        let state = SimState::new(Role::Active).with_cluster_name("prod");
        let body = health_of(state, "").await.json();
        assert_eq!(body["cluster_name"], "prod");
        let id = body["cluster_id"].as_str().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(id, cluster_id("prod"));
        assert_ne!(id, cluster_id("other"));
    }

    #[tokio::test]
    async fn standby_only_fields() {
        let active = health_of(SimState::new(Role::Active), "").await.json();
        assert!(active.get("ha_connection_healthy").is_none());
        assert!(active.get("last_request_forwarding_heartbeat_ms").is_none());
        let standby = health_of(SimState::new(Role::Standby), "").await.json();
        assert_eq!(standby["ha_connection_healthy"], true);
        assert!(standby["last_request_forwarding_heartbeat_ms"].is_u64());
        let unhealthy = health_of(SimState::new(Role::HaUnhealthyStandby), "")
            .await
            .json();
        assert_eq!(unhealthy["ha_connection_healthy"], false);
        assert_eq!(unhealthy["standby"], true);
        assert!(unhealthy["last_request_forwarding_heartbeat_ms"].as_u64() > Some(10_000));
        // Neither a sealed node nor one that raft removed has a forwarding link to report.
        for role in [Role::Sealed, Role::Removed, Role::Uninitialized] {
            let body = health_of(SimState::new(role), "").await.json();
            assert!(body.get("ha_connection_healthy").is_none(), "{role:?}");
            assert!(
                body.get("last_request_forwarding_heartbeat_ms").is_none(),
                "{role:?}"
            );
        }
        for (role, standby) in [(Role::DrSecondary, false), (Role::DrSecondaryStandby, true)] {
            let dr = health_of(SimState::new(role), "").await.json();
            assert_eq!(dr["replication_dr_mode"], "secondary", "{role:?}");
            assert_eq!(dr["standby"], standby, "{role:?}");
        }
    }

    #[tokio::test]
    async fn query_overrides() {
        let cases = [
            (Role::Standby, "?standbyok=true", 200),
            (Role::Standby, "?standbyok=false", 429),
            // Not 204: no server may send a body with it, Vault included.
            (Role::Standby, "?standbyok=true&activecode=203", 203),
            (Role::Standby, "?standbycode=299", 299),
            (Role::PerfStandby, "?perfstandbyok=true", 200),
            (Role::PerfStandby, "?standbyok=true", 473),
            (Role::PerfStandby, "?performancestandbycode=298", 298),
            (Role::Active, "?activecode=299", 299),
            (Role::Sealed, "?sealedcode=299&standbyok=true", 299),
            (Role::Uninitialized, "?uninitcode=299&sealedcode=298", 299),
            (Role::Removed, "?removedcode=297", 297),
            (
                Role::HaUnhealthyStandby,
                "?haunhealthycode=296&standbyok=true",
                296,
            ),
            (Role::DrSecondary, "?drsecondarycode=295", 295),
        ];
        for (role, query, code) in cases {
            let resp = health_of(SimState::new(role), query).await;
            assert_eq!(resp.status, code, "{role:?} {query}");
            assert_eq!(resp.json()["initialized"], role != Role::Uninitialized);
        }
    }

    #[tokio::test]
    async fn malformed_parameters_give_400() {
        for query in ["?standbycode=abc", "?activecode=", "?sealedcode=5xx"] {
            let resp = health_of(SimState::new(Role::Active), query).await;
            assert_eq!(resp.status, 400, "{query}");
            assert_eq!(resp.json(), serde_json::json!({ "errors": [] }));
        }
        let resp = health_of(SimState::new(Role::Standby), "?standbyok=maybe").await;
        assert_eq!(resp.status, 400);
        let errors = resp.json()["errors"].clone();
        assert!(
            errors[0].as_str().unwrap().contains("standbyok"),
            "{errors}"
        );
    }

    #[tokio::test]
    async fn out_of_range_code_drops_connection() {
        let node = sim(SimState::new(Role::Active)).await;
        let result = send(node.addr(), "GET", "/v1/sys/health?activecode=1000").await;
        assert!(result.is_err(), "{result:?}");
    }

    #[tokio::test]
    async fn head_has_code_but_no_body() {
        let node = sim(SimState::new(Role::Standby)).await;
        let resp = send(node.addr(), "HEAD", HEALTH_PATH).await.unwrap();
        assert_eq!(resp.status, 429);
        assert!(resp.body.is_empty(), "{:?}", resp.body);
        let resp = send(node.addr(), "HEAD", "/v1/sys/health?standbyok=true")
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
        assert!(resp.body.is_empty());
    }

    #[tokio::test]
    async fn other_paths_and_methods() {
        let node = sim(SimState::new(Role::Active)).await;
        let resp = get(node.addr(), "/v1/secret/data/x").await;
        assert_eq!(resp.status, 404);
        assert_eq!(resp.json(), serde_json::json!({ "errors": [] }));
        let resp = send(node.addr(), "POST", HEALTH_PATH).await.unwrap();
        assert_eq!(resp.status, 405);
        let resp = send(node.addr(), "DELETE", LEADER_PATH).await.unwrap();
        assert_eq!(resp.status, 405);
        assert_eq!(node.health_requests(), 1);
    }

    #[tokio::test]
    async fn version_passes_through_even_empty() {
        let body = health_of(SimState::new(Role::Active).with_version(""), "")
            .await
            .json();
        assert_eq!(body["version"], "");
        let state = SimState::new(Role::Active).with_version("1.15.2+ent");
        assert_eq!(health_of(state, "").await.json()["version"], "1.15.2+ent");
    }

    /// The OpenBao flavour answers what real OpenBao 2.7.2 was seen to answer: the same
    /// code and the same fields with the same values, but for the varying ones.
    #[tokio::test]
    async fn openbao_flavour_answers_as_real_openbao_did() {
        let observed: Value = serde_json::from_str(include_str!("../openbao-2.7.2-health.json"))
            .expect("the recorded answers");
        let cases = [
            ("active", Role::Active),
            ("standby", Role::Standby),
            ("sealed", Role::Sealed),
            ("uninitialized", Role::Uninitialized),
        ];
        for (state, role) in cases {
            let want = &observed["answers"][state];
            let sim = SimState::new(role)
                .with_openbao(true)
                .with_version("2.7.2")
                .with_cluster_name("vault-registrar-test");
            let resp = health_of(sim, "").await;
            assert_eq!(i64::from(resp.status), want["code"], "{state}");
            let mut body = resp.json();
            let fields = body.as_object_mut().unwrap();
            fields.remove("server_time_utc");
            fields.remove("cluster_id");
            assert_eq!(&body, &want["body"], "{state}");
        }
    }

    #[tokio::test]
    async fn openbao_flavour() {
        let bao = |role| SimState::new(role).with_openbao(true);
        let cases = [
            (Role::Active, 200),
            (Role::Standby, 429),
            (Role::PerfStandby, 429),
            (Role::HaUnhealthyStandby, 429),
            (Role::Removed, 429),
            (Role::Sealed, 503),
            (Role::Uninitialized, 501),
        ];
        for (role, code) in cases {
            let resp = health_of(bao(role), "").await;
            assert_eq!(resp.status, code, "{role:?}");
            let body = resp.json();
            for absent in [
                "performance_standby",
                "enterprise",
                "echo_duration_ms",
                "clock_skew_ms",
                "removed_from_cluster",
                "ha_connection_healthy",
            ] {
                assert!(body.get(absent).is_none(), "{role:?} has {absent}: {body}");
            }
            assert!(body["initialized"].is_boolean());
        }
        assert_eq!(
            health_of(bao(Role::Standby), "?standbyok=true")
                .await
                .status,
            200
        );
        assert_eq!(
            health_of(bao(Role::PerfStandby), "?perfstandbyok=true")
                .await
                .status,
            429
        );
    }

    #[tokio::test]
    async fn leader_endpoint() {
        let node = sim(SimState::new(Role::Active)).await;
        let body = get(node.addr(), LEADER_PATH).await.json();
        assert_eq!(body["ha_enabled"], true);
        assert_eq!(body["is_self"], true);
        assert_eq!(body["leader_address"], node.url());
        assert_ne!(body["active_time"], GO_ZERO_TIME);
        assert!(body["raft_committed_index"].as_u64().unwrap() >= 100);

        node.set(SimState::new(Role::PerfStandby)).await;
        node.set_leader("https://vault-0:8200", "https://vault-0:8201");
        let resp = get(node.addr(), LEADER_PATH).await;
        assert_eq!(resp.status, 200);
        let body = resp.json();
        assert_eq!(body["is_self"], false);
        assert_eq!(body["performance_standby"], true);
        assert_eq!(body["leader_address"], "https://vault-0:8200");
        assert_eq!(body["active_time"], GO_ZERO_TIME);

        node.set(SimState::new(Role::Sealed)).await;
        let resp = get(node.addr(), LEADER_PATH).await;
        assert_eq!(resp.status, 503);
        assert_eq!(
            resp.json(),
            serde_json::json!({ "errors": ["Vault is sealed"] })
        );
        assert_eq!(node.health_requests(), 0);
    }

    #[tokio::test]
    async fn switching_roles_and_counting() {
        let node = sim(SimState::new(Role::Standby)).await;
        assert_eq!(get(node.addr(), HEALTH_PATH).await.status, 429);
        node.update(|s| s.role = Role::Active).await;
        assert_eq!(node.state().role, Role::Active);
        assert_eq!(get(node.addr(), HEALTH_PATH).await.status, 200);
        assert_eq!(node.health_requests(), 2);
    }

    #[tokio::test]
    async fn crash_refuses_and_recovery_rebinds() {
        let node = sim_on("127.0.0.2", SimState::new(Role::Active)).await;
        let addr = node.addr();
        let idle = TcpStream::connect(addr).await.unwrap();
        assert_eq!(get(addr, HEALTH_PATH).await.status, 200);

        node.update(|s| s.behavior = Behavior::Crash).await;
        let refused = TcpStream::connect(addr).await;
        assert_eq!(
            refused.unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        assert_closed(idle).await;

        node.update(|s| s.behavior = Behavior::Serve).await;
        assert_eq!(node.addr(), addr);
        assert_eq!(get(addr, HEALTH_PATH).await.status, 200);
    }

    async fn assert_closed(mut stream: TcpStream) {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(WAIT, stream.read(&mut buf)).await;
        // A reset is as good as a close; only data or silence would be wrong.
        if let Ok(n) = read.expect("connection closes promptly") {
            assert_eq!(n, 0, "unexpected data");
        }
    }

    #[tokio::test]
    async fn starting_crashed_then_serving() {
        let node = sim_on(
            "127.0.0.3",
            SimState::new(Role::Standby).with_behavior(Behavior::Crash),
        )
        .await;
        assert!(TcpStream::connect(node.addr()).await.is_err());
        node.update(|s| s.behavior = Behavior::Serve).await;
        assert_eq!(get(node.addr(), HEALTH_PATH).await.status, 429);
    }

    #[tokio::test]
    async fn hang_never_answers_until_behaviour_changes() {
        let node = sim(SimState::new(Role::Active).with_behavior(Behavior::Hang)).await;
        let mut stream = TcpStream::connect(node.addr()).await.unwrap();
        stream
            .write_all(b"GET /v1/sys/health HTTP/1.1\r\nHost: vault\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let waited = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await;
        assert!(waited.is_err(), "hanging node answered: {waited:?}");
        assert_eq!(node.health_requests(), 1, "the request was read");

        node.update(|s| s.behavior = Behavior::Serve).await;
        assert_closed(stream).await;
        assert_eq!(get(node.addr(), HEALTH_PATH).await.status, 200);
    }

    #[tokio::test]
    async fn garbage_is_not_json() {
        let resp = health_of(
            SimState::new(Role::Sealed).with_behavior(Behavior::Garbage),
            "",
        )
        .await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-type"), Some("text/html"));
        assert!(serde_json::from_slice::<Value>(&resp.body).is_err());
        assert!(!resp.body.is_empty());
    }

    #[tokio::test]
    async fn not_found_is_a_404_that_is_not_vault() {
        let node = sim(SimState::new(Role::Active).with_behavior(Behavior::NotFound)).await;
        let resp = get(node.addr(), HEALTH_PATH).await;
        assert_eq!(resp.status, 404);
        assert_eq!(
            resp.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
        assert!(serde_json::from_slice::<Value>(&resp.body).is_err());
        assert_eq!(node.health_requests(), 1, "counted like any health request");
    }

    #[tokio::test]
    async fn truncated_is_half_of_the_real_body() {
        let node = sim(SimState::new(Role::Sealed)).await;
        let full = get(node.addr(), HEALTH_PATH).await;
        node.update(|s| s.behavior = Behavior::Truncated).await;
        let cut = get(node.addr(), HEALTH_PATH).await;
        assert_eq!(cut.status, 200);
        assert!(serde_json::from_slice::<Value>(&cut.body).is_err());
        assert_eq!(cut.body.len(), full.body.len() / 2);
        assert!(full.body.starts_with(&cut.body[..20]));
    }

    #[tokio::test]
    async fn stop_and_drop_close_the_listener() {
        let node = sim_on("127.0.0.4", SimState::new(Role::Active)).await;
        let addr = node.addr();
        node.stop().await;
        assert!(TcpStream::connect(addr).await.is_err());

        let node = sim_on("127.0.0.5", SimState::new(Role::Active)).await;
        let addr = node.addr();
        drop(node);
        // Abort takes effect when the runtime next polls the task.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn tls_with_self_signed_cert() {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let tls = SimTls {
            cert_pem: generated.cert.pem(),
            key_pem: generated.signing_key.serialize_pem(),
        };
        let state = SimState::new(Role::Standby);
        let node = VaultSim::start("127.0.0.1:0".parse().unwrap(), Some(tls), state)
            .await
            .unwrap();
        assert!(node.url().starts_with("https://"));

        let mut roots = rustls::RootCertStore::empty();
        roots.add(generated.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(node.addr()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream = connector.connect(name, tcp).await.unwrap();
        let resp = request_on(stream, "GET", HEALTH_PATH).await.unwrap();
        assert_eq!(resp.status, 429);
        assert_eq!(resp.json()["standby"], true);

        // Plain HTTP on the TLS port gets no HTTP answer.
        assert!(send(node.addr(), "GET", HEALTH_PATH).await.is_err());
    }

    #[tokio::test]
    async fn bad_pem_is_an_error() {
        let tls = SimTls {
            cert_pem: "not a cert".to_owned(),
            key_pem: "not a key".to_owned(),
        };
        let state = SimState::new(Role::Active);
        let result = VaultSim::start("127.0.0.1:0".parse().unwrap(), Some(tls), state).await;
        assert_eq!(
            result.err().map(|e| e.kind()),
            Some(io::ErrorKind::InvalidInput)
        );
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn query_params_take_the_first_value() {
        assert_eq!(query_param("a=1&a=2", "a"), Some("1"));
        assert_eq!(query_param("standbyok", "standbyok"), Some(""));
        assert_eq!(query_param("xstandbyok=1", "standbyok"), None);
    }
}
