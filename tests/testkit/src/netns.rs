//! Simulated pods need IPs that Kubernetes accepts in EndpointSlices, and the API server
//! rejects loopback addresses there. So the pods' addresses live in a network namespace of
//! our own: 198.18.0.0/17 (a benchmarking range, RFC 2544) is routed from this host over a
//! veth pair into namespace `vault-registrar-pods`, where the whole range is local. Vault
//! simulators create their sockets inside that namespace; the operator reaches them as it
//! would reach pods. Nothing leaves the machine. Needs root, as CI and sessions here have.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
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
/// The IPv6 side of the same network, for IPv6 pods: a unique-local /64 for the pods and
/// another for the link. Added beside the IPv4 set-up, never instead of it, so a network
/// other runs are using is extended in place.
const POD_RANGE_V6: &str = "fd00:198:18::/64";
const HOST_ADDR_V6: &str = "fd00:198:18:ffff::fe/64";
const GATEWAY_V6: &str = "fd00:198:18:ffff::fd";

/// Whether an address belongs to the simulated pod range.
pub fn is_pod_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 198 && v4.octets()[1] == 18 && v4.octets()[2] < 128,
        IpAddr::V6(v6) => v6.segments()[..4] == [0xfd00, 0x198, 0x18, 0],
    }
}

/// The IPv6 pod address with index `n` for this process, in its block (as `pod_ip`).
pub fn pod_ip6(n: u32) -> Ipv6Addr {
    ensure_v6().expect("the IPv6 pod network");
    Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, block() as u16, n as u16 + 1)
}

/// The pod address with index `n` for this process: in the block of 250 addresses this
/// process holds (see `block`).
pub fn pod_ip(n: u32) -> Ipv4Addr {
    let base = block();
    Ipv4Addr::new(198, 18, (base + n / 250) as u8 % 128, (n % 250 + 1) as u8)
}

/// What the test processes of this machine share about the pod network: one lock file per
/// address block (`block-<n>`, held with flock by the process using the block, released by
/// the kernel when it dies, however it dies) and one file per process listing the addresses
/// it cut (`cut-<pid>`, see `PathCut`).
const STATE_DIR: &str = "/run/lock/vault-registrar-pods";

/// Test processes take blocks 0 to 99 (the benchmark's are 104 to 127).
const TEST_BLOCKS: u32 = 100;

/// The address block this process holds: the first free one from its PID modulo 100. A
/// block held by a live process is never shared, so two runs side by side never bind the
/// same address; a killed run's block is free again, and its cut routes are gone (`ensure`
/// removes them) before any address is handed out.
fn block() -> u32 {
    static BLOCK: OnceLock<u32> = OnceLock::new();
    *BLOCK.get_or_init(|| {
        let _ = ensure();
        let start = std::process::id() % TEST_BLOCKS;
        if std::fs::create_dir_all(STATE_DIR).is_ok() {
            for i in 0..TEST_BLOCKS {
                let b = (start + i) % TEST_BLOCKS;
                let Ok(file) = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(format!("{STATE_DIR}/block-{b}"))
                else {
                    continue;
                };
                // SAFETY: flock on a descriptor we own; kept open (leaked) for the process's life.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                    std::mem::forget(file);
                    // The block is ours: any cut route left in it is a leftover.
                    let _ = remove_stale_cuts(Some(b));
                    return b;
                }
            }
        }
        start
    })
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
    if !in_place() {
        // Half a network (a link without its namespace or routes, as a killed set-up or a
        // manual clean-up leaves): start over.
        let _ = Command::new("ip").args(["link", "del", HOST_LINK]).output();
        let _ = Command::new("ip")
            .args(["netns", "del", NAMESPACE])
            .output();
        create()?;
    }
    remove_stale_cuts(None)
}

/// Adds the IPv6 addresses and routes to the network, once; idempotent, so a network another
/// run set up without them gains them without being rebuilt.
pub fn ensure_v6() -> anyhow::Result<()> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            ensure().map_err(|e| format!("{e:#}"))?;
            set_up_v6().map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

fn set_up_v6() -> anyhow::Result<()> {
    let host_route = output(&["ip", "-6", "route", "show", POD_RANGE_V6]);
    if host_route.contains(&format!("via {GATEWAY_V6} dev {HOST_LINK}")) {
        return Ok(());
    }
    let in_ns = |args: &[&str]| -> Vec<String> {
        ["ip", "netns", "exec", NAMESPACE]
            .iter()
            .chain(args)
            .map(|s| s.to_string())
            .collect()
    };
    // `nodad`: the addresses are usable at once, not after duplicate address detection.
    let steps = [
        svec(&[
            "ip",
            "-6",
            "addr",
            "replace",
            HOST_ADDR_V6,
            "dev",
            HOST_LINK,
            "nodad",
        ]),
        in_ns(&[
            "ip",
            "-6",
            "addr",
            "replace",
            &format!("{GATEWAY_V6}/64"),
            "dev",
            POD_LINK,
            "nodad",
        ]),
        in_ns(&[
            "ip",
            "-6",
            "route",
            "replace",
            "local",
            POD_RANGE_V6,
            "dev",
            "lo",
        ]),
        in_ns(&["sysctl", "-qw", "net.ipv6.ip_nonlocal_bind=1"]),
        svec(&[
            "ip",
            "-6",
            "route",
            "replace",
            POD_RANGE_V6,
            "via",
            GATEWAY_V6,
            "dev",
            HOST_LINK,
        ]),
    ];
    for step in steps {
        run(&step.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    Ok(())
}

fn svec(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn run(step: &[&str]) -> anyhow::Result<()> {
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
    Ok(())
}

/// Output of a command, empty when it fails.
fn output(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Whether the link, the namespace and both routes are there.
fn in_place() -> bool {
    let host_route = output(&["ip", "route", "show", POD_RANGE]);
    let pod_route = output(&[
        "ip", "netns", "exec", NAMESPACE, "ip", "route", "show", "table", "local", POD_RANGE,
    ]);
    !output(&["ip", "link", "show", HOST_LINK]).is_empty()
        && host_route.contains(&format!("via {GATEWAY} dev {HOST_LINK}"))
        && pod_route.contains("dev lo")
}

/// Removes the cut routes (`PathCut`) of killed runs, which would otherwise blackhole an
/// address a later run's pod gets: those recorded by a process that is gone, and, in
/// `block` (one this process now holds), those nobody recorded (left by a run from before
/// the records).
fn remove_stale_cuts(block: Option<u32>) -> anyhow::Result<()> {
    let _guard = CUTS.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all(STATE_DIR)?;
    let mut held = std::collections::BTreeSet::new();
    let mut dead = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(STATE_DIR)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("cut-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            held.extend(text.lines().map(str::to_string));
        } else {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            dead.extend(text.lines().map(str::to_string));
            let _ = std::fs::remove_file(entry.path());
        }
    }
    for line in output(&["ip", "route", "show", "via", DEAD_HOP]).lines() {
        let Some(ip) = line.split_whitespace().next() else {
            continue;
        };
        let ip = ip.trim_end_matches("/32");
        let in_block = block.is_some_and(|b| {
            ip.parse::<Ipv4Addr>()
                .is_ok_and(|a| a.octets()[..3] == [198, 18, b as u8])
        });
        if !held.contains(ip) && (dead.contains(ip) || in_block) {
            let _ = cut_route("del", &ip);
        }
    }
    Ok(())
}

/// Serialises this process's changes to its `cut-<pid>` file and the clean-up.
static CUTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Adds or removes addresses in this process's `cut-<pid>` file.
fn record_cuts(add: &[Ipv4Addr], remove: &[Ipv4Addr]) -> anyhow::Result<()> {
    let _guard = CUTS.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all(STATE_DIR)?;
    let path = format!("{STATE_DIR}/cut-{}", std::process::id());
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut ips: Vec<String> = text
        .lines()
        .filter(|l| !remove.iter().any(|r| r.to_string() == *l))
        .map(str::to_string)
        .collect();
    ips.extend(add.iter().map(Ipv4Addr::to_string));
    std::fs::write(&path, ips.join("\n") + "\n")?;
    Ok(())
}

fn create() -> anyhow::Result<()> {
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
        run(step)?;
    }
    Ok(())
}

/// A next hop on the host link that nobody answers for: packets routed to it are dropped
/// silently, as a NetworkPolicy or a failed node network drops them.
const DEAD_HOP: &str = "198.18.255.1";

/// Adds (`replace`) or removes (`del`) the route that cuts the host's path to `ip`: a /32
/// via a next hop that never answers.
fn cut_route(verb: &str, ip: &impl std::fmt::Display) -> anyhow::Result<()> {
    ip_route(&[verb, &format!("{ip}/32"), "via", DEAD_HOP, "dev", HOST_LINK])
}

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
        // Recorded first, so that another process's clean-up never takes a live cut for a
        // leftover.
        record_cuts(ips, &[])?;
        let mut cut = Self { ips: Vec::new() };
        for ip in ips {
            cut_route("replace", &ip)?;
            cut.ips.push(*ip);
        }
        Ok(cut)
    }
}

impl Drop for PathCut {
    fn drop(&mut self) {
        for ip in &self.ips {
            let _ = cut_route("del", &ip);
        }
        let _ = record_cuts(&[], &self.ips);
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
    let v4 = addr.is_ipv4();
    if v4 { ensure() } else { ensure_v6() }.map_err(std::io::Error::other)?;
    let fd = std::thread::spawn(move || -> std::io::Result<OwnedFd> {
        let ns = std::fs::File::open(format!("/var/run/netns/{NAMESPACE}"))?;
        // SAFETY: setns on this short-lived thread only; socket() returns a new descriptor we own.
        unsafe {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let family = if v4 { libc::AF_INET } else { libc::AF_INET6 };
            let fd = libc::socket(
                family,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A cut route recorded by a process that is gone (a PID above any pid_max) is removed by
    /// the next clean-up; one of a live process (this one) is kept.
    #[test]
    fn cut_routes_of_dead_processes_are_removed() -> anyhow::Result<()> {
        ensure()?;
        // Block 127 belongs to the scale benchmark's range, which this test never runs beside.
        let (dead_ip, live_ip) = (
            Ipv4Addr::new(198, 18, 127, 249),
            Ipv4Addr::new(198, 18, 127, 248),
        );
        let dead_file = format!("{STATE_DIR}/cut-4194999");
        std::fs::write(&dead_file, format!("{dead_ip}\n"))?;
        cut_route("replace", &dead_ip)?;
        let live = PathCut::new(&[live_ip])?;
        remove_stale_cuts(None)?;
        let routes = output(&["ip", "route", "show", "via", DEAD_HOP]);
        let dead_left = routes
            .lines()
            .any(|l| l.starts_with(&format!("{dead_ip} ")));
        let live_left = routes
            .lines()
            .any(|l| l.starts_with(&format!("{live_ip} ")));
        drop(live);
        assert!(!dead_left, "the dead process's cut route stayed: {routes}");
        assert!(live_left, "a live cut route was removed: {routes}");
        assert!(!std::path::Path::new(&dead_file).exists());
        let after = output(&["ip", "route", "show", "via", DEAD_HOP]);
        assert!(!after.contains(&format!("{live_ip} ")), "{after}");
        Ok(())
    }
}
