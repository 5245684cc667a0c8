//! The probe connection pool against real servers on loopback: a kept connection the server
//! broke is replaced without a failure, kept connections expire so the pool follows the pods
//! still probed and stay within the pool's limit, and probe sockets carry TCP keepalive; and, over a cut path on the pod
//! network, a connect that is never answered gives up before the probe's timeout.
//!
//! The servers speak just enough HTTP/1.1 by hand to break a connection at a chosen moment
//! (after reading a request, with a reset or a FIN), which a full server does not offer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use vault_registrar::probe::{Prober, Target};
use vault_registrar::tracker::{FailureKind, Outcome};

const ACTIVE: &str = r#"{"initialized":true,"sealed":false,"standby":false,"performance_standby":false,"version":"1.17.2"}"#;

/// What a pod does with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Answers as an active Vault and keeps the connection open.
    Serve,
    /// Answers a connection's first request and resets the connection on the next one, as a
    /// new pod at a reused address does to a connection it never had.
    ResetReused,
    /// Like `ResetReused`, with a FIN: a restarted server closing its idle connections.
    CloseReused,
    /// Like `ResetReused`, after the head and half the body of an answer.
    CutReused,
    /// Resets every connection on its first request.
    ResetAll,
}

const MODES: [Mode; 5] = [
    Mode::Serve,
    Mode::ResetReused,
    Mode::CloseReused,
    Mode::CutReused,
    Mode::ResetAll,
];

#[derive(Default)]
struct Counts {
    mode: AtomicU8,
    accepted: AtomicUsize,
    /// Connections the prober closed.
    hung_up: AtomicUsize,
}

/// A Vault pod on loopback. Its connections outlive it: a pod dropped without closing them
/// is a node gone without a FIN.
struct Pod {
    addr: SocketAddr,
    counts: Arc<Counts>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Pod {
    async fn start(mode: Mode) -> Pod {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let accepting = tokio::spawn(accept(listener, counts.clone()));
        let pod = Pod {
            addr,
            counts,
            accepting,
        };
        pod.set(mode);
        pod
    }

    fn set(&self, mode: Mode) {
        let index = MODES.iter().position(|m| *m == mode).unwrap();
        self.counts.mode.store(index as u8, Ordering::SeqCst);
    }

    fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    fn hung_up(&self) -> usize {
        self.counts.hung_up.load(Ordering::SeqCst)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

async fn accept(listener: TcpListener, counts: Arc<Counts>) {
    while let Ok((stream, _)) = listener.accept().await {
        counts.accepted.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(serve(stream, counts.clone()));
    }
}

async fn serve(mut stream: TcpStream, counts: Arc<Counts>) {
    let mut buf = Vec::new();
    for served in 0.. {
        if !read_request(&mut stream, &mut buf).await {
            counts.hung_up.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{ACTIVE}",
            ACTIVE.len()
        );
        let mode = MODES[counts.mode.load(Ordering::SeqCst) as usize];
        match (mode, served) {
            (Mode::ResetAll, _) | (Mode::ResetReused, 1..) => {
                stream.set_zero_linger().unwrap();
                return;
            }
            (Mode::CloseReused, 1..) => return,
            (Mode::CutReused, 1..) => {
                let half = answer.len() - ACTIVE.len() / 2;
                let _ = stream.write_all(&answer.as_bytes()[..half]).await;
                let _ = stream.flush().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                stream.set_zero_linger().unwrap();
                return;
            }
            _ => {}
        }
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Reads up to the end of one request's head (a GET has no body); false at EOF.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            return true;
        }
        let mut chunk = [0; 1024];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn probe(prober: &Prober, addr: SocketAddr) -> Outcome {
    let target = Target {
        ip: addr.ip(),
        port: addr.port(),
        path: "/v1/sys/health".into(),
        timeout: Duration::from_secs(2),
        tls: None,
    };
    prober.probe(&target, &prober.cluster_share("ns")).await.0
}

async fn assert_healthy(prober: &Prober, addr: SocketAddr, what: &str) {
    let outcome = probe(prober, addr).await;
    assert!(
        matches!(outcome, Outcome::Healthy(_)),
        "{what}: {outcome:?}"
    );
}

#[tokio::test]
async fn a_kept_connection_the_server_broke_is_replaced_not_counted() {
    for mode in [Mode::ResetReused, Mode::CloseReused, Mode::CutReused] {
        let pod = Pod::start(mode).await;
        let prober = Prober::new(4);
        for round in 0..3 {
            assert_healthy(&prober, pod.addr, &format!("{mode:?}, probe {round}")).await;
        }
        // Every probe after the first found its kept connection broken and opened another.
        assert_eq!(pod.accepted(), 3, "{mode:?}");
        assert_eq!(prober.idle_connections(), 1, "{mode:?}");
    }
}

#[tokio::test]
async fn a_failure_on_a_fresh_connection_counts_after_one_retry() {
    let pod = Pod::start(Mode::Serve).await;
    let prober = Prober::new(4);
    assert_healthy(&prober, pod.addr, "first probe").await;
    pod.set(Mode::ResetAll);
    match probe(&prober, pod.addr).await {
        Outcome::Failed(f) => assert_eq!(f.kind, FailureKind::Transport, "{}", f.message),
        other => panic!("a reset on a fresh connection is a failure: {other:?}"),
    }
    assert_eq!(pod.accepted(), 2, "the kept connection, then one fresh one");
    assert_eq!(prober.idle_connections(), 0);
}

#[tokio::test]
async fn the_pool_shrinks_to_the_pods_still_probed() {
    const EXPIRY: Duration = Duration::from_millis(400);
    let gauge = IntGauge::new("probe_connections", "kept").unwrap();
    let prober = Prober::with_idle_expiry(8, EXPIRY).reporting_to(gauge.clone());
    let pods = futures::future::join_all((0..4).map(|_| Pod::start(Mode::Serve))).await;
    for pod in &pods {
        assert_healthy(&prober, pod.addr, "first round").await;
    }
    assert_eq!((prober.idle_connections(), gauge.get()), (4, 4));
    // Three pods' node is gone: no FIN came, their sockets stay open; only one is probed on.
    let (live, gone) = pods.split_first().unwrap();
    let start = Instant::now();
    while prober.idle_connections() > 1 {
        // Swept every quarter expiry, a connection goes within 1.25 expiries unused; the
        // margin is for a loaded machine.
        assert!(
            start.elapsed() < EXPIRY * 5,
            "vanished pods' connections still kept"
        );
        assert_healthy(&prober, live.addr, "the pod still there").await;
        tokio::time::sleep(EXPIRY / 8).await;
    }
    let took = start.elapsed();
    assert!(
        took >= EXPIRY * 3 / 4,
        "expired before their time: {took:?}"
    );
    assert_eq!((prober.idle_connections(), gauge.get()), (1, 1));
    assert_eq!(live.accepted(), 1, "a connection in use is kept");
    for pod in gone {
        wait_for("the expired connection's socket closed", || {
            pod.hung_up() == 1
        })
        .await;
    }
}

#[tokio::test]
async fn kept_connections_stay_within_the_limit_and_the_probes_past_it_still_answer() {
    let prober = Prober::new(8).keeping_at_most(2);
    let pods = futures::future::join_all((0..4).map(|_| Pod::start(Mode::Serve))).await;
    for round in 0..2 {
        for pod in &pods {
            assert_healthy(&prober, pod.addr, &format!("round {round}")).await;
        }
        assert_eq!(prober.idle_connections(), 2, "round {round}");
    }
    let accepted: Vec<usize> = pods.iter().map(Pod::accepted).collect();
    // The first two kept theirs; the other two paid a handshake each round.
    assert_eq!(accepted, [1, 1, 2, 2]);
}

#[tokio::test]
async fn probe_sockets_have_tcp_keepalive() {
    let pod = Pod::start(Mode::Serve).await;
    let prober = Prober::new(4);
    assert_healthy(&prober, pod.addr, "probe").await;
    let (keepalive, idle) = keepalive_of_socket_to(pod.addr).expect("the kept connection's socket");
    assert!(keepalive, "SO_KEEPALIVE is off");
    assert_eq!(idle, Duration::from_secs(15), "TCP_KEEPIDLE");
}

async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(2);
    while !done() {
        assert!(Instant::now() < until, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// SO_KEEPALIVE and TCP_KEEPIDLE of this process's socket connected to `peer`: the prober's
/// kept connection, found among the open descriptors since the prober does not hand it out.
fn keepalive_of_socket_to(peer: SocketAddr) -> Option<(bool, Duration)> {
    use std::os::fd::{BorrowedFd, RawFd};
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: only read with getsockopt/getpeername while borrowed; a descriptor closed
        // meanwhile makes them fail (or name another peer), and is then skipped.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        if socket.peer_addr().ok().and_then(|a| a.as_socket()) != Some(peer) {
            continue;
        }
        return Some((socket.keepalive().ok()?, socket.tcp_keepalive_time().ok()?));
    }
    None
}

/// A pod whose SYNs go unanswered (its path cut, as on a vanished node) holds a probe slot
/// for the connect timeout, half the probe's timeout and at most 2 s, not for the whole
/// timeout: with 10 s, the kernel's own verdict (no route to host, after about 3 s of
/// unanswered neighbour probes) would come first, and the slot would be held until then.
#[tokio::test]
async fn an_unanswered_connect_gives_up_before_the_probe() {
    let ip = vault_registrar_testkit::pods::next_pod_ip();
    let _cut = vault_registrar_testkit::netns::PathCut::new(&[ip]).unwrap();
    let prober = Prober::new(4);
    let target = Target {
        ip: ip.into(),
        port: 8200,
        path: "/v1/sys/health".into(),
        timeout: Duration::from_secs(10),
        tls: None,
    };
    let (outcome, took) = prober.probe(&target, &prober.cluster_share("ns")).await;
    match outcome {
        Outcome::Failed(f) => {
            assert_eq!(f.kind, FailureKind::Transport, "{}", f.message);
            assert!(
                f.message.contains("no connection within 2s"),
                "{}",
                f.message
            );
        }
        other => panic!("a cut path answered: {other:?}"),
    }
    println!("an unanswered connect gave up after {took:?}");
    assert!(took < Duration::from_secs(8), "{took:?}");
}
