//! A node plane: the control plane plus a real node — kube-scheduler, containerd, the
//! kubelet, the bridge CNI plugins and kube-proxy (nftables) — that runs pods from images
//! built here (see `image`).
//!
//! Everything lives under one directory of ours except what the components write to fixed
//! places; `machine` records the machine before the start and teardown restores it, also
//! after a panic (`Drop`), and a start finding the leftovers of a killed run removes them
//! first. One node per machine: the bridge and the cgroups are machine-wide, so a start
//! waits for the machine lock.
//!
//! The network: a bridge `cni0` holding 198.19.0.1/24, created before anything binds to it;
//! pods get addresses on it from `host-local` and a route to the service range only, no
//! gateway and no masquerading, so the machine forwards nothing. The API server listens on
//! the bridge address, which the `kubernetes` Service points at.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::controlplane::{
    ControlPlane, Layout, SERVICE_RANGE, free_port, register_for_exit, spawn_tied_to_process,
};
use crate::image::{self, Images};
use crate::machine::{self, Machine, MachineLock};
use crate::stage::run;

pub const BRIDGE: &str = "cni0";
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const POD_SUBNET: &str = "198.19.0.0/24";
pub const NODE_NAME: &str = "vault-registrar-node";
/// Every node directory starts so; a start finding processes that name one cleans them up.
const DIR_PREFIX: &str = "vault-registrar-node-";

/// A running node plane. Dropping it tears everything down and restores the machine.
pub struct NodePlane {
    pub plane: ControlPlane,
    pub images: &'static Images,
    dir: PathBuf,
    before: Machine,
    procs: Vec<(&'static str, Child)>,
    /// From the kubelet's start until the node was Ready.
    pub ready_after: Duration,
    _lock: MachineLock,
}

/// What exists before the control plane does: the lock, the record of the machine and the
/// bridge. Tearing it down restores the machine, so a failed start cleans up too.
struct Ground {
    dir: tempfile::TempDir,
    before: Machine,
    procs: Vec<(&'static str, Child)>,
    lock: MachineLock,
}

impl NodePlane {
    /// Starts the plane and the node, imports the images into containerd, and waits until
    /// the node is Ready. `operator_bin` is the operator binary its image is built from.
    pub fn start(operator_bin: &Path) -> anyhow::Result<Self> {
        let lock = MachineLock::acquire()?;
        let (images, before) = clean_and_observe(operator_bin)?;
        machine::save_paths_record(&before.paths)?;
        let dir = tempfile::Builder::new().prefix(DIR_PREFIX).tempdir()?;
        let mut ground = Ground {
            dir,
            before,
            procs: Vec::new(),
            lock,
        };
        match ground.bring_up(images) {
            Ok((plane, ready_after)) => {
                let Ground {
                    dir,
                    before,
                    procs,
                    lock,
                } = ground;
                Ok(Self {
                    plane,
                    images,
                    dir: dir.keep(),
                    before,
                    procs,
                    ready_after,
                    _lock: lock,
                })
            }
            Err(e) => {
                let logs = ground.log_tails();
                teardown(ground.dir.path(), &mut ground.procs, &ground.before);
                Err(e.context(logs))
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's client, for this node's containerd, in the CRI namespace.
    pub fn ctr(&self) -> Command {
        ctr(&self.dir)
    }

    /// Loads an image built after the start (as the Vault image) into the node's containerd.
    pub fn import(&self, img: &image::Image) -> anyhow::Result<()> {
        run(self.ctr().args(["images", "import"]).arg(&img.archive))
            .with_context(|| format!("importing {}", img.name))
            .map(|_| ())
    }

    /// The host PID of a container, from its status's `containerd://<id>`.
    pub fn container_pid(&self, container_id: &str) -> anyhow::Result<i32> {
        let id = container_id.trim_start_matches("containerd://");
        let out = run(self.ctr().args(["tasks", "ls"]))?;
        out.lines()
            .find(|l| l.starts_with(id))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("no task for container {id} in:\n{out}"))
    }

    /// Resident memory of a node process (kubelet, containerd, kube-proxy, kube-scheduler)
    /// in MiB, from /proc.
    pub fn rss_mib(&self, name: &str) -> Option<u64> {
        let (_, child) = self.procs.iter().find(|(n, _)| *n == name)?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kb / 1024)
    }

    /// The last lines of a node component's log (kubelet, containerd, kube-proxy,
    /// kube-scheduler).
    pub fn log_tail(&self, name: &str) -> String {
        tail(&self.dir.join(format!("{name}.log")))
    }

    /// Stops everything and restores the machine; what differs afterwards from the machine
    /// before the start, one line each (empty when restored).
    pub fn stop(self) -> Vec<String> {
        let before = self.before.clone();
        drop(self);
        Machine::observe()
            .map(|now| now.differences(&before))
            .unwrap_or_else(|e| vec![format!("observing the machine: {e:#}")])
    }
}

impl Drop for NodePlane {
    fn drop(&mut self) {
        // The node first: the API server must outlive nothing that still writes to it, and
        // the plane's own Drop (after this) stops etcd, the API server and the controllers.
        teardown(&self.dir, &mut self.procs, &self.before);
    }
}

impl Ground {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn bring_up(&mut self, images: &Images) -> anyhow::Result<(ControlPlane, Duration)> {
        create_bridge()?;
        let plane = ControlPlane::start_with(&Layout {
            bridge_ip: Some(BRIDGE_IP),
        })?;
        self.start_containerd()?;
        for img in [&images.pause, &images.operator, &images.sim] {
            run(ctr(self.dir.path())
                .args(["images", "import"])
                .arg(&img.archive))
            .with_context(|| format!("importing {}", img.name))?;
        }
        let kubelet_started = Instant::now();
        self.start_kubelet(&plane)?;
        self.start_scheduler(&plane)?;
        self.start_kube_proxy(&plane)?;
        // The kubelet sets vm.overcommit_memory, kernel.panic and kernel.panic_on_oops while
        // starting; a kernel oops must not reboot the machine, so they go back at once, on
        // every poll until the node is Ready and once more after.
        let before = self.before.clone();
        self.wait("node Ready", Duration::from_secs(60), || {
            before.restore_sysctls();
            node_ready(&plane)
        })?;
        let ready_after = kubelet_started.elapsed();
        self.before.restore_sysctls();
        self.wait(
            "kube-proxy's nftables table",
            Duration::from_secs(30),
            || Ok(run(Command::new("nft").args(["list", "table", "ip", "kube-proxy"])).is_ok()),
        )?;
        Ok((plane, ready_after))
    }

    fn spawn(&mut self, name: &'static str, mut cmd: Command) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.path(&format!("{name}.log")))?;
        cmd.stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null());
        let child = spawn_tied_to_process(cmd).with_context(|| format!("starting {name}"))?;
        register_for_exit(child.id());
        self.procs.push((name, child));
        Ok(())
    }

    /// Polls `ready` until it holds; fails early when a node process exited.
    fn wait(
        &mut self,
        what: &str,
        limit: Duration,
        mut ready: impl FnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if ready()? {
                return Ok(());
            }
            for (name, child) in &mut self.procs {
                if !matches!(child.try_wait(), Ok(None)) {
                    bail!("{name} exited while waiting for {what}");
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("{what} not reached after {limit:?}")
    }

    fn log_tails(&self) -> String {
        self.procs
            .iter()
            .map(|(name, _)| format!("--- {name}:\n{}", tail(&self.path(&format!("{name}.log")))))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn start_containerd(&mut self) -> anyhow::Result<()> {
        let root = self.dir.path().to_path_buf();
        let cni = root.join("cni");
        std::fs::create_dir_all(cni.join("net.d"))?;
        std::fs::write(
            cni.join("net.d/10-vault-registrar.conflist"),
            cni_config(&cni.join("networks")),
        )?;
        let config = root.join("containerd.toml");
        std::fs::write(&config, containerd_config(&root))?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        self.spawn("containerd", cmd)?;
        let dir = root;
        self.wait("containerd", Duration::from_secs(30), || {
            Ok(ctr(&dir)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()))
        })
    }

    fn start_kubelet(&mut self, plane: &ControlPlane) -> anyhow::Result<()> {
        let root = self.dir.path().to_path_buf();
        std::fs::write(root.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
        let config = root.join("kubelet.yaml");
        std::fs::write(
            &config,
            kubelet_config(&root, &plane.dir().join("pki/client-ca.crt"), free_port()?),
        )?;
        let bin = plane.bins.dir.join("kubelet");
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("--config={}", config.display()))
            .arg(format!("--kubeconfig={}", plane.kubeconfig.display()))
            .arg(format!("--root-dir={}", root.join("kubelet").display()))
            .arg(format!("--cert-dir={}", root.join("kubelet-pki").display()))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={BRIDGE_IP}"))
            .arg("--v=1")
            // Without iptables on its PATH the kubelet adds no host firewall rules.
            .env("PATH", "/usr/bin:/bin");
        self.spawn("kubelet", cmd)
    }

    fn start_scheduler(&mut self, plane: &ControlPlane) -> anyhow::Result<()> {
        let mut cmd = Command::new(plane.bins.dir.join("kube-scheduler"));
        cmd.arg(format!("--kubeconfig={}", plane.kubeconfig.display()))
            .arg("--leader-elect=false")
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", free_port()?))
            .arg("--v=1");
        self.spawn("kube-scheduler", cmd)
    }

    fn start_kube_proxy(&mut self, plane: &ControlPlane) -> anyhow::Result<()> {
        let config = self.path("kube-proxy.yaml");
        std::fs::write(
            &config,
            kube_proxy_config(&plane.kubeconfig, free_port()?, free_port()?),
        )?;
        let mut cmd = Command::new(plane.bins.dir.join("kube-proxy"));
        cmd.arg(format!("--config={}", config.display()))
            .arg("--v=1");
        self.spawn("kube-proxy", cmd)
    }
}

fn ctr(dir: &Path) -> Command {
    let mut cmd = Command::new("ctr");
    cmd.arg("--address")
        .arg(dir.join("containerd/containerd.sock"))
        .args(["--namespace", "k8s.io"]);
    cmd
}

fn node_ready(plane: &ControlPlane) -> anyhow::Result<bool> {
    let out = plane
        .kubectl()
        .args([
            "get",
            "node",
            NODE_NAME,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])
        .output()?;
    Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "True")
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

fn create_bridge() -> anyhow::Result<()> {
    let steps: [&[&str]; 3] = [
        &["link", "add", BRIDGE, "type", "bridge"],
        &["addr", "add", &format!("{BRIDGE_IP}/24"), "dev", BRIDGE],
        &["link", "set", BRIDGE, "up"],
    ];
    for step in steps {
        run(Command::new("ip").args(step))
            .with_context(|| format!("ip {step:?} (the node needs root and iproute2)"))?;
    }
    Ok(())
}

/// Stops the node's processes, the containers and their shims, and removes what they
/// left: mounts, cgroups, network namespaces, kube-proxy's tables, the bridge, files in
/// fixed places; then puts the kernel parameters back.
fn teardown(dir: &Path, procs: &mut Vec<(&'static str, Child)>, before: &Machine) {
    slow_step("stopping the node's processes", || {
        for (_, child) in procs.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    });
    procs.clear();
    remove_node_state(
        &dir.join("containerd/containerd.sock").display().to_string(),
        dir,
    );
    slow_step("removing the pods' veths", || {
        machine::remove_new_veths(&before.links)
    });
    slow_step("removing files in fixed places", || {
        machine::remove_new_paths(&before.paths)
    });
    let _ = machine::take_paths_record();
    before.restore_sysctls();
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs a teardown step, saying so when it took long (a stuck step shows in the log).
fn slow_step<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    if start.elapsed() > Duration::from_secs(2) {
        eprintln!("node teardown: {what} took {:?}", start.elapsed());
    }
    out
}

/// Everything but the node's own processes (already gone) and the files in fixed places:
/// shared by the teardown and the clean-up of a killed run's leftovers (`shim_needle`
/// names that run's containerd socket, or only the directory prefix).
fn remove_node_state(shim_needle: &str, dir: &Path) {
    // Containers die first so that no shim restarts or reports them, then the shims.
    slow_step("killing the containers", || {
        for _ in 0..3 {
            let pids = machine::kubepods_pids();
            if pids.is_empty() {
                break;
            }
            machine::kill_all(pids);
        }
    });
    slow_step("killing the shims", || {
        machine::kill_all(machine::shim_pids(shim_needle))
    });
    slow_step("removing network namespaces", || {
        machine::remove_new_netns(&BTreeSet::new())
    });
    slow_step("unmounting", || machine::unmount_below(dir));
    if let Err(e) = slow_step("removing cgroups", machine::remove_kubepods_cgroups) {
        eprintln!("node teardown: {e:#}");
    }
    machine::delete_nft_table("ip", "kube-proxy");
    machine::delete_nft_table("ip6", "kube-proxy");
    machine::delete_link(BRIDGE);
}

/// The machine as a node would find it: a dead run's leftovers removed first (a test that
/// compares the machine before and after would otherwise count their removal by the next
/// start as a difference), the images built (their build cleans up after itself), then
/// observed, all under the machine lock.
pub fn machine_before_a_node(operator_bin: &Path) -> anyhow::Result<Machine> {
    let _lock = MachineLock::acquire()?;
    Ok(clean_and_observe(operator_bin)?.1)
}

/// With the machine lock held: a dead run's leftovers removed, the images built, the
/// machine recorded.
fn clean_and_observe(operator_bin: &Path) -> anyhow::Result<(&'static Images, Machine)> {
    clean_leftovers();
    let images = image::built(operator_bin)?;
    Ok((images, Machine::observe()?))
}

/// A run killed outright (SIGKILL of the test binary) leaves shims, containers, cgroups and
/// the bridge. With the machine lock held no node runs, so whatever of a node is found
/// belongs to a dead run.
fn clean_leftovers() {
    let bridge_left = Path::new("/sys/class/net").join(BRIDGE).exists();
    let shims = machine::shim_pids(DIR_PREFIX);
    let record = machine::take_paths_record();
    if !bridge_left && shims.is_empty() && machine::kubepods_pids().is_empty() && record.is_none() {
        return;
    }
    eprintln!("removing the leftovers of a node that was not torn down");
    let tmp = std::env::temp_dir();
    for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            remove_node_state(DIR_PREFIX, &entry.path());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    remove_node_state(DIR_PREFIX, &tmp.join(DIR_PREFIX));
    if let Some(paths) = record {
        machine::remove_new_paths(&paths);
    }
    remove_dead_processes_dirs(&tmp);
}

/// The control-plane and image directories of processes that are gone (their names hold
/// the PID): a killed run never removed them.
fn remove_dead_processes_dirs(tmp: &Path) {
    for entry in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let pid = ["vault-registrar-cp-", "vault-registrar-images-"]
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            machine::unmount_below(&entry.path());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn cni_config(data_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "vault-registrar",
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": false,
            "ipMasq": false,
            "hairpinMode": false,
            "ipam": {
                "type": "host-local",
                "dataDir": data_dir,
                "ranges": [[{"subnet": POD_SUBNET, "rangeStart": "198.19.0.10", "rangeEnd": "198.19.0.250"}]],
                "routes": [{"dst": SERVICE_RANGE, "gw": BRIDGE_IP.to_string()}]
            }
        }]
    })
    .to_string()
}

fn containerd_config(root: &Path) -> String {
    let d = |rel: &str| root.join(rel).display().to_string();
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails to start.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
        root = d("containerd/root"),
        state = d("containerd/state"),
        sock = d("containerd/containerd.sock"),
        opt = d("containerd/opt"),
        runc = d("containerd/runc"),
        cni = d("cni/net.d"),
        pause = image::PAUSE_IMAGE,
    )
}

fn kubelet_config(root: &Path, client_ca: &Path, port: u16) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {BRIDGE_IP}
port: {port}
readOnlyPort: 0
healthzPort: 0
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://{sock}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {client_ca}}}
authorization: {{mode: Webhook}}
makeIPTablesUtilChains: false
podLogsDir: {logs}
resolvConf: {resolv}
evictionHard: {{"memory.available": "50Mi", "nodefs.available": "1%", "nodefs.inodesFree": "1%", "imagefs.available": "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
localStorageCapacityIsolation: false
maxPods: 50
"#,
        sock = root.join("containerd/containerd.sock").display(),
        client_ca = client_ca.display(),
        logs = root.join("pod-logs").display(),
        resolv = root.join("resolv.conf").display(),
    )
}

/// kube-proxy as users run it: `minSyncPeriod` is its default, 1 s, written out because a
/// 0 here means "unset" and is defaulted to 1 s too. It bounds how soon a Service's rules
/// follow an EndpointSlice change that comes within a second of another sync (any Service's),
/// which is most of what a client loses beyond Vault's own gap at a step-down
/// (`tests/vault_pods.rs`; with 1 ms the second went).
fn kube_proxy_config(kubeconfig: &Path, healthz: u16, metrics: u16) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {NODE_NAME}
bindAddress: {BRIDGE_IP}
clusterCIDR: {POD_SUBNET}
healthzBindAddress: 127.0.0.1:{healthz}
metricsBindAddress: 127.0.0.1:{metrics}
nodePortAddresses: ["{BRIDGE_IP}/32"]
nftables:
  minSyncPeriod: 1s
  syncPeriod: 30s
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
        kubeconfig = kubeconfig.display(),
    )
}
