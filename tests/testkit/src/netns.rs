//! Simulated pods need IPs that Kubernetes accepts in EndpointSlices, and the API server
//! rejects loopback addresses there. So the pods' addresses live in a network namespace of
//! our own: 198.18.0.0/17 (a benchmarking range, RFC 2544) is routed from this host over a
//! veth pair into namespace `vault-registrar-pods`, where the whole range is local. Vault
//! simulators create their sockets inside that namespace; the operator reaches them as it
//! would reach pods. Nothing leaves the machine. Needs root, as CI and sessions here have.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};

pub const NAMESPACE: &str = "vault-registrar-pods";
const HOST_LINK: &str = "vrpods-h";
const POD_LINK: &str = "vrpods-p";
const HOST_ADDR: &str = "198.18.255.254/16";
const GATEWAY: &str = "198.18.255.253";
const POD_RANGE: &str = "198.18.0.0/17";

/// Whether an address belongs to the simulated pod range.
pub fn is_pod_ip(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 198 && v4.octets()[1] == 18 && v4.octets()[2] < 128)
}

/// The pod address with index `n` for this process.
pub fn pod_ip(n: u32) -> Ipv4Addr {
    let base = std::process::id() % 100;
    Ipv4Addr::new(198, 18, (base + n / 250) as u8 % 128, (n % 250 + 1) as u8)
}

/// The pod address with index `n` for the scale benchmark: blocks 104 to 127 of the range,
/// which test processes (blocks from their PID modulo 100, a few each) do not reach. Room
/// for 6,000 pods.
pub fn bench_pod_ip(n: u32) -> Ipv4Addr {
    assert!(n < 6000, "the benchmark's block holds 6,000 pods");
    Ipv4Addr::new(198, 18, (104 + n / 250) as u8, (n % 250 + 1) as u8)
}

/// Creates the namespace, the veth pair and the routes, once; a later call, or another
/// process finding them in place, does nothing.
pub fn ensure() -> anyhow::Result<()> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| set_up().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn set_up() -> anyhow::Result<()> {
    let exists = Command::new("ip")
        .args(["link", "show", HOST_LINK])
        .output()
        .is_ok_and(|o| o.status.success());
    if exists {
        return Ok(());
    }
    let _ = Command::new("ip")
        .args(["netns", "del", NAMESPACE])
        .output();
    let steps: [&[&str]; 10] = [
        &["ip", "netns", "add", NAMESPACE],
        &[
            "ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", POD_LINK, "netns",
            NAMESPACE,
        ],
        &["ip", "addr", "add", HOST_ADDR, "dev", HOST_LINK],
        &["ip", "link", "set", HOST_LINK, "up"],
        &[
            "ip", "netns", "exec", NAMESPACE, "ip", "link", "set", "lo", "up",
        ],
        &[
            "ip",
            "netns",
            "exec",
            NAMESPACE,
            "ip",
            "addr",
            "add",
            &format!("{GATEWAY}/16"),
            "dev",
            POD_LINK,
        ],
        &[
            "ip", "netns", "exec", NAMESPACE, "ip", "link", "set", POD_LINK, "up",
        ],
        &[
            "ip", "netns", "exec", NAMESPACE, "ip", "route", "add", "local", POD_RANGE, "dev", "lo",
        ],
        &[
            "ip", "route", "replace", POD_RANGE, "via", GATEWAY, "dev", HOST_LINK,
        ],
        &[
            "ip",
            "netns",
            "exec",
            NAMESPACE,
            "sysctl",
            "-qw",
            "net.ipv4.ip_nonlocal_bind=1",
        ],
    ];
    for step in steps {
        let out = Command::new(step[0])
            .args(&step[1..])
            .output()
            .with_context(|| format!("running {step:?}"))?;
        if !out.status.success() {
            bail!(
                "{step:?} failed: {} (the simulated pod network needs root and iproute2)",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// A next hop on the host link that nobody answers for: packets routed to it are dropped
/// silently, as a NetworkPolicy or a failed node network drops them.
const DEAD_HOP: &str = "198.18.255.1";

/// The host's path to some pod addresses, cut: routed to a next hop that never answers, so
/// connections to them time out while the pods stay Running and Ready in the API. Only those
/// addresses are affected, so tests running beside it keep their network. The routes are
/// removed when this is dropped, also when a test panics.
pub struct PathCut {
    ips: Vec<Ipv4Addr>,
}

impl PathCut {
    pub fn new(ips: &[Ipv4Addr]) -> anyhow::Result<Self> {
        ensure()?;
        let mut cut = Self { ips: Vec::new() };
        for ip in ips {
            ip_route(&[
                "replace",
                &format!("{ip}/32"),
                "via",
                DEAD_HOP,
                "dev",
                HOST_LINK,
            ])?;
            cut.ips.push(*ip);
        }
        Ok(cut)
    }
}

impl Drop for PathCut {
    fn drop(&mut self) {
        for ip in &self.ips {
            let _ = ip_route(&[
                "del",
                &format!("{ip}/32"),
                "via",
                DEAD_HOP,
                "dev",
                HOST_LINK,
            ]);
        }
    }
}

fn ip_route(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .arg("route")
        .args(args)
        .output()
        .context("running ip route")?;
    if !out.status.success() {
        bail!(
            "ip route {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A TCP socket for `addr`: made inside the pod namespace for pod addresses, here otherwise.
/// A socket stays in the namespace it was made in, so only its creation needs the switch.
pub fn socket_for(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    if !is_pod_ip(addr.ip()) {
        return if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        };
    }
    ensure().map_err(std::io::Error::other)?;
    let fd = std::thread::spawn(|| -> std::io::Result<OwnedFd> {
        let ns = std::fs::File::open(format!("/var/run/netns/{NAMESPACE}"))?;
        // SAFETY: setns on this short-lived thread only; socket() returns a new descriptor we own.
        unsafe {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(OwnedFd::from_raw_fd(fd))
        }
    })
    .join()
    .map_err(|_| std::io::Error::other("netns thread panicked"))??;
    Ok(tokio::net::TcpSocket::from_std_stream(
        std::net::TcpStream::from(fd),
    ))
}
