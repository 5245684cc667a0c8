//! What a node changes on the machine outside its own directory, and putting it back.
//!
//! The kubelet, containerd, the CNI plugins and kube-proxy write to fixed places whatever
//! their settings say, set kernel parameters and create cgroups. `Machine` records how the
//! machine looked before a node started and restores it; `MachineLock` keeps a second node
//! off the machine while one runs, since the bridge and the cgroups are machine-wide.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Kernel parameters the kubelet sets at start (`vm.overcommit_memory=1`, `kernel.panic=10`,
/// `kernel.panic_on_oops=1`, ...) and kube-proxy's conntrack tuning: all put back.
pub const TOUCHED_SYSCTLS: [&str; 9] = [
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
];

/// Places outside the node's directory that its components create regardless of their
/// settings: the kubelet's device-plugin directory and container log links, containerd's
/// shim sockets, the CNI result cache and lock, buildah's storage defaults. (Pods' network
/// namespaces, in /run/netns, are handled one by one: other tests keep one there.)
pub const FIXED_PATHS: [&str; 7] = [
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/run/containerd",
    "/var/lib/cni",
    "/var/lib/containers",
    "/run/containers",
];

/// The cgroup the kubelet creates for pods, in each v1 hierarchy.
pub const KUBEPODS: &str = "kubepods";

/// A machine-wide exclusive lock: one node per machine. Released when dropped (or when the
/// process dies, as flock locks are).
pub struct MachineLock {
    _file: std::fs::File,
}

impl MachineLock {
    pub fn acquire() -> anyhow::Result<Self> {
        let path = "/run/lock/vault-registrar-node.lock";
        std::fs::create_dir_all("/run/lock")?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {path}"))?;
        // SAFETY: flock on a descriptor we own; blocks until the other node is gone.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context("locking the node lock");
        }
        Ok(Self { _file: file })
    }
}

/// How the machine looked: compared after teardown and used to restore it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    pub sysctls: BTreeMap<String, String>,
    pub links: BTreeSet<String>,
    pub mounts: BTreeSet<String>,
    pub cgroups: BTreeSet<String>,
    /// `FIXED_PATHS` that exist and everything below them (shim sockets, CNI results, log
    /// links accumulate in directories that may have been there before).
    pub paths: BTreeSet<String>,
    pub nft_tables: BTreeSet<String>,
}

impl Machine {
    pub fn observe() -> anyhow::Result<Self> {
        Ok(Self {
            sysctls: sysctls()?,
            links: links()?,
            mounts: mounts()?,
            cgroups: kubepods_cgroups(),
            paths: fixed_path_entries(),
            nft_tables: nft_tables(),
        })
    }

    /// Writes back every kernel parameter of `TOUCHED_SYSCTLS` that differs now. Reads only
    /// those, so it is cheap enough to call while waiting for the kubelet.
    pub fn restore_sysctls(&self) {
        for key in TOUCHED_SYSCTLS {
            let Some(before) = self.sysctls.get(key) else {
                continue;
            };
            let path = sysctl_path(key);
            let now = std::fs::read_to_string(&path).unwrap_or_default();
            // /proc/sys separates values with tabs where `sysctl -a` shows spaces.
            if now.split_whitespace().ne(before.split_whitespace()) {
                let _ = std::fs::write(&path, before);
            }
        }
    }

    /// What differs from `before`, one line each; empty when the machine is as it was.
    /// Kernel parameters that appeared (a module loaded) are not counted, nor parameters of
    /// links that came and went.
    pub fn differences(&self, before: &Machine) -> Vec<String> {
        let mut out = Vec::new();
        for (key, value) in &before.sysctls {
            match self.sysctls.get(key) {
                Some(now) if now != value => {
                    out.push(format!("sysctl {key}: {value} before, {now} now"))
                }
                _ => {}
            }
        }
        let sets = [
            ("link", &before.links, &self.links),
            ("mount", &before.mounts, &self.mounts),
            ("cgroup", &before.cgroups, &self.cgroups),
            ("path", &before.paths, &self.paths),
            ("nft table", &before.nft_tables, &self.nft_tables),
        ];
        for (what, was, now) in sets {
            for gone in was.difference(now) {
                out.push(format!("{what} {gone} gone"));
            }
            for new in now.difference(was) {
                out.push(format!("{what} {new} left behind"));
            }
        }
        out
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

/// Every readable kernel parameter except counters and per-link ones (links are compared
/// as links), as `sysctl -a` shows them.
fn sysctls() -> anyhow::Result<BTreeMap<String, String>> {
    let out = Command::new("sysctl")
        .arg("-a")
        .output()
        .context("running sysctl -a (procps)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(" = "))
        .filter(|(k, _)| !volatile_sysctl(k))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// Parameters that change by themselves (counters, random values) or belong to one link
/// (links are compared as links); `all` and `default` are kept.
fn volatile_sysctl(key: &str) -> bool {
    const PER_LINK: [&str; 4] = [
        "net.ipv4.conf.",
        "net.ipv6.conf.",
        "net.ipv4.neigh.",
        "net.ipv6.neigh.",
    ];
    const KEYS: [&str; 6] = [
        "kernel.ns_last_pid",
        "kernel.pty.nr",
        "net.netfilter.nf_conntrack_count",
        "kernel.tainted",
        "net.ipv4.route.gc_timeout",
        "kernel.sched_domain",
    ];
    let per_link = PER_LINK.iter().any(|p| {
        key.strip_prefix(p)
            .is_some_and(|rest| !rest.starts_with("all.") && !rest.starts_with("default."))
    });
    per_link
        || key.starts_with("fs.")
        || key.starts_with("kernel.random.")
        || key.starts_with("dev.")
        || KEYS.contains(&key)
}

fn links() -> anyhow::Result<BTreeSet<String>> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .context("running ip link")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .collect())
}

/// Mount points, from this process's mount table.
pub fn mounts() -> anyhow::Result<BTreeSet<String>> {
    Ok(mount_points()?.into_iter().collect())
}

fn mount_points() -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount)
        .collect())
}

fn unescape_mount(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Unmounts everything mounted at or below `dir`, innermost first (lazily, so a busy mount
/// does not stop the rest). Returns how many were unmounted.
pub fn unmount_below(dir: &Path) -> usize {
    let mut points: Vec<String> = mount_points()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.reverse();
    let mut done = 0;
    for point in points {
        let Ok(c) = std::ffi::CString::new(point) else {
            continue;
        };
        // SAFETY: umount2 with a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            done += 1;
        }
    }
    done
}

/// `kubepods` cgroups present, as `hierarchy/kubepods`.
fn kubepods_cgroups() -> BTreeSet<String> {
    hierarchies()
        .into_iter()
        .filter(|h| h.join(KUBEPODS).is_dir())
        .map(|h| h.join(KUBEPODS).display().to_string())
        .collect()
}

/// The mounted cgroup hierarchies under /sys/fs/cgroup (v1: one per controller set).
fn hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    if out.is_empty() || Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        out.push(PathBuf::from("/sys/fs/cgroup"));
    }
    out
}

/// Every process in the `kubepods` cgroups (the containers the kubelet started).
pub fn kubepods_pids() -> BTreeSet<i32> {
    let mut pids = BTreeSet::new();
    for hierarchy in hierarchies() {
        collect_pids(&hierarchy.join(KUBEPODS), &mut pids);
    }
    pids
}

fn collect_pids(dir: &Path, pids: &mut BTreeSet<i32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    for child in subdirs(dir) {
        collect_pids(&child, pids);
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the `kubepods` cgroups, deepest first; they must be empty of processes.
pub fn remove_kubepods_cgroups() -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for hierarchy in hierarchies() {
        remove_cgroup_tree(&hierarchy.join(KUBEPODS), &mut failed);
    }
    if !failed.is_empty() {
        bail!("could not remove cgroups: {}", failed.join(", "));
    }
    Ok(())
}

fn remove_cgroup_tree(dir: &Path, failed: &mut Vec<String>) {
    if !dir.is_dir() {
        return;
    }
    for child in subdirs(dir) {
        remove_cgroup_tree(&child, failed);
    }
    // A cgroup is removed with rmdir, its control files with it; a few retries cover the
    // moment the kernel takes to let go of exited processes.
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    failed.push(dir.display().to_string());
}

/// containerd's shims (`containerd-shim-runc-v2`) whose command line contains `needle` (the
/// socket of the containerd that started them). Only shims: nothing else is matched by name.
pub fn shim_pids(needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<String> = c
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                let program = args.first().map(|a| a.rsplit('/').next().unwrap_or(a));
                program.is_some_and(|p| p.starts_with("containerd-shim"))
                    && args.iter().any(|a| a.contains(needle))
            })
        })
        .collect()
}

/// SIGKILLs each pid and waits (up to a few seconds) until each is gone.
pub fn kill_all(pids: impl IntoIterator<Item = i32>) {
    let pids: Vec<i32> = pids.into_iter().collect();
    for pid in &pids {
        // SAFETY: sending a signal; a pid that already exited gets ESRCH.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Alive and not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

fn nft_tables() -> BTreeSet<String> {
    Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// Every existing path at or below `FIXED_PATHS`, symlinks not followed.
fn fixed_path_entries() -> BTreeSet<String> {
    let mounts = mounts().unwrap_or_default();
    let mut out = BTreeSet::new();
    for path in FIXED_PATHS {
        walk(Path::new(path), &mounts, &mut out);
    }
    out
}

fn walk(path: &Path, mounts: &BTreeSet<String>, out: &mut BTreeSet<String>) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    let name = path.display().to_string();
    // Mount points (a container's rootfs, say) are not descended.
    let descend = meta.is_dir() && !mounts.contains(&name);
    out.insert(name);
    if descend {
        for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
            walk(&entry.path(), mounts, out);
        }
    }
}

/// Removes what is at or below `FIXED_PATHS` and was not in `before` (unmounting first what
/// is mounted there), outermost first.
pub fn remove_new_paths(before: &BTreeSet<String>) {
    for path in fixed_path_entries() {
        if before.contains(&path) {
            continue;
        }
        let path = Path::new(&path);
        unmount_below(path);
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => {
                let _ = std::fs::remove_dir_all(path);
            }
            Ok(_) => {
                let _ = std::fs::remove_file(path);
            }
            Err(_) => {}
        }
    }
}

/// Where a node keeps, while it runs, the record of the fixed paths before it started: a
/// run killed outright leaves it for the next start to clean up against.
const PATHS_RECORD: &str = "/run/lock/vault-registrar-node.paths";

/// Saves `paths` as the running node's record.
pub fn save_paths_record(paths: &BTreeSet<String>) -> anyhow::Result<()> {
    let text: String = paths.iter().map(|p| format!("{p}\n")).collect();
    std::fs::write(PATHS_RECORD, text).with_context(|| format!("writing {PATHS_RECORD}"))
}

/// The record a node that was not torn down left, removed; None when every node was.
pub fn take_paths_record() -> Option<BTreeSet<String>> {
    let text = std::fs::read_to_string(PATHS_RECORD).ok()?;
    let _ = std::fs::remove_file(PATHS_RECORD);
    Some(text.lines().map(str::to_string).collect())
}

/// Pods' network namespaces (containerd names them `cni-<uuid>` in /run/netns) that were
/// not there before: unmounted and removed, which also deletes their ends of the veths.
pub fn remove_new_netns(before: &BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = entry.file_name().to_string_lossy().starts_with("cni-");
        if !ours || before.contains(&path.display().to_string()) {
            continue;
        }
        unmount_below(&path);
        let _ = std::fs::remove_file(&path);
    }
}

/// The entries of /run/netns now.
pub fn netns_entries() -> BTreeSet<String> {
    std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path().display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes an nftables table if it exists, e.g. `ip kube-proxy`.
pub fn delete_nft_table(family: &str, name: &str) {
    let _ = Command::new("nft")
        .args(["delete", "table", family, name])
        .output();
}

/// Deletes the veths that were not there before. Deleting the host end deletes the pair,
/// whatever still holds the pod's end: a pod network namespace can outlive its removal
/// from /run/netns while a process or a mount of it lingers, and keep its veth with it.
pub fn remove_new_veths(before: &BTreeSet<String>) {
    let Ok(now) = links() else {
        return;
    };
    for link in now.difference(before).filter(|l| l.starts_with("veth")) {
        delete_link(link);
    }
}

/// Deletes a link if it exists.
pub fn delete_link(name: &str) {
    let _ = Command::new("ip").args(["link", "del", name]).output();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(sysctls: &[(&str, &str)], links: &[&str]) -> Machine {
        Machine {
            sysctls: sysctls
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            links: links.iter().map(|l| l.to_string()).collect(),
            mounts: BTreeSet::new(),
            cgroups: BTreeSet::new(),
            paths: BTreeSet::new(),
            nft_tables: BTreeSet::new(),
        }
    }

    #[test]
    fn differences_name_changed_parameters_and_leftover_links() {
        let before = machine(
            &[("kernel.panic", "1"), ("vm.overcommit_memory", "0")],
            &["lo"],
        );
        let cases = [
            (
                "same",
                machine(
                    &[("kernel.panic", "1"), ("vm.overcommit_memory", "0")],
                    &["lo"],
                ),
                vec![],
            ),
            (
                "kubelet's values left",
                machine(
                    &[("kernel.panic", "10"), ("vm.overcommit_memory", "0")],
                    &["lo"],
                ),
                vec!["sysctl kernel.panic: 1 before, 10 now"],
            ),
            (
                "a parameter that appeared is not counted",
                machine(
                    &[
                        ("kernel.panic", "1"),
                        ("vm.overcommit_memory", "0"),
                        ("net.netfilter.x", "1"),
                    ],
                    &["lo"],
                ),
                vec![],
            ),
            (
                "bridge left",
                machine(
                    &[("kernel.panic", "1"), ("vm.overcommit_memory", "0")],
                    &["lo", "cni0"],
                ),
                vec!["link cni0 left behind"],
            ),
        ];
        for (name, now, want) in cases {
            assert_eq!(now.differences(&before), want, "{name}");
        }
    }

    #[test]
    fn per_link_and_counting_parameters_are_not_compared() {
        for (key, volatile) in [
            ("net.ipv4.conf.cni0.forwarding", true),
            ("net.ipv4.conf.all.forwarding", false),
            ("net.ipv6.conf.default.forwarding", false),
            ("kernel.random.uuid", true),
            ("fs.dentry-state", true),
            ("kernel.panic_on_oops", false),
            ("net.netfilter.nf_conntrack_count", true),
        ] {
            assert_eq!(volatile_sysctl(key), volatile, "{key}");
        }
    }
}
