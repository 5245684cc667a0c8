//! A real Kubernetes control plane on loopback: etcd, kube-apiserver and
//! kube-controller-manager, built from Kubernetes' own Go modules by
//! `tests/controlplane/build.sh`.
//!
//! Every process is started with a parent-death signal from a thread that lives as long as
//! the test binary, so no process outlives it, even when a test panics or the binary is
//! killed; `Drop` stops them too, for owners such as the demo that do drop the plane.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use k8s_openapi::jiff::Timestamp;

use crate::certs::{Authority, signing_key};

/// Index of kube-apiserver among the plane's processes (etcd, kube-apiserver, kcm).
const APISERVER: usize = 1;

/// Where the binaries come from: `KUBEBUILDER_ASSETS` for etcd and kube-apiserver when set
/// (the envtest convention); `VAULT_REGISTRAR_KUBE_DIR` for kube-apiserver and
/// kube-controller-manager of another release (the compatibility pass of `make test` runs the
/// oldest release the chart admits, built by tests/controlplane/oldest/build.sh); the build
/// cache for the rest.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    /// The build cache directory, which also holds the node's binaries.
    pub dir: PathBuf,
}

impl Binaries {
    /// Finds the binaries, building them first if the cache lacks them.
    pub fn locate() -> anyhow::Result<Self> {
        static BUILT: OnceLock<PathBuf> = OnceLock::new();
        let dir = crate::tools::from_env_or_script(
            "VAULT_REGISTRAR_BIN_DIR",
            "controlplane/build.sh",
            &BUILT,
        )?;
        let kube =
            std::env::var_os("VAULT_REGISTRAR_KUBE_DIR").map_or_else(|| dir.clone(), PathBuf::from);
        let assets = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from);
        let from_assets = |name: &str, otherwise: &Path| match &assets {
            Some(a) if a.join(name).is_file() => a.join(name),
            _ => otherwise.join(name),
        };
        let bins = Self {
            etcd: from_assets("etcd", &dir),
            kube_apiserver: from_assets("kube-apiserver", &kube),
            kube_controller_manager: kube.join("kube-controller-manager"),
            kubectl: dir.join("kubectl"),
            helm: dir.join("helm"),
            dir: dir.clone(),
        };
        for path in [
            &bins.etcd,
            &bins.kube_apiserver,
            &bins.kube_controller_manager,
            &bins.kubectl,
            &bins.helm,
        ] {
            if !path.is_file() {
                bail!(
                    "control-plane binary {} is missing; run tests/controlplane/build.sh",
                    path.display()
                );
            }
        }
        Ok(bins)
    }
}

/// A running control plane. Dropping it stops every process and removes its files.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    pub bins: Binaries,
    pub kubeconfig: PathBuf,
    pub server: String,
    pub etcd_url: String,
    procs: Mutex<Vec<Child>>,
    /// The API server's arguments, to start it again after `kill_apiserver`.
    apiserver_args: Vec<std::ffi::OsString>,
}

/// Where the API server listens and what runs beside it: on loopback with no node (the
/// default), or on a node's bridge address, reachable from pods.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    /// The API server's address on the node's bridge; loopback when absent.
    pub bridge_ip: Option<std::net::Ipv4Addr>,
}

impl Layout {
    fn address(&self) -> String {
        self.bridge_ip
            .map_or_else(|| "127.0.0.1".to_string(), |ip| ip.to_string())
    }
}

/// The `kubernetes` Service's address in the service range the API server is given.
pub const KUBERNETES_SERVICE_IP: &str = "10.0.0.1";
/// The service range.
pub const SERVICE_RANGE: &str = "10.0.0.0/16";

/// Controllers a plane with a node needs beside the default ones: Deployments, the
/// PodDisruptionBudget's status, the CA bundle pods read, pod garbage collection, and the node's not-ready taint lifted.
const NODE_CONTROLLERS: &str = ",deployment-controller,replicaset-controller,disruption-controller,root-ca-certificate-publisher-controller,pod-garbage-collector-controller,node-lifecycle-controller";

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager and waits until the API
    /// server is ready and the controller manager has created the `default` ServiceAccount.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&Layout::default())
    }

    /// As `start`, laid out as `layout` says.
    pub fn start_with(layout: &Layout) -> anyhow::Result<Self> {
        let bins = Binaries::locate()?;
        // The PID in the name lets a later node start remove the files of a killed run.
        let dir = tempfile::Builder::new()
            .prefix(&format!("vault-registrar-cp-{}-", std::process::id()))
            .tempdir()?;
        let files = PkiFiles::write(dir.path(), layout)?;
        let mut plane = Self {
            kubeconfig: dir.path().join("kubeconfig"),
            server: String::new(),
            etcd_url: String::new(),
            dir,
            bins,
            procs: Mutex::new(Vec::new()),
            apiserver_args: Vec::new(),
        };
        plane.start_etcd()?;
        plane.start_apiserver(&files, layout)?;
        plane.start_controller_manager(&files, layout)?;
        plane.wait_for_default_service_account()?;
        Ok(plane)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn start_etcd(&mut self) -> anyhow::Result<()> {
        let (client, peer) = (free_port()?, free_port()?);
        self.etcd_url = format!("http://127.0.0.1:{client}");
        let data = self.dir().join("etcd");
        let mut cmd = Command::new(&self.bins.etcd);
        cmd.arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={}", self.etcd_url))
            .arg(format!("--advertise-client-urls={}", self.etcd_url))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer}"))
            .arg("--unsafe-no-fsync=true")
            .arg("--quota-backend-bytes=4294967296");
        self.spawn("etcd", cmd)?;
        self.wait_until("etcd", Duration::from_secs(30), |p| {
            Ok(std::net::TcpStream::connect(("127.0.0.1", client)).is_ok() && p.alive("etcd"))
        })
    }

    fn start_apiserver(&mut self, f: &PkiFiles, layout: &Layout) -> anyhow::Result<()> {
        let port = free_port()?;
        let address = layout.address();
        self.server = format!("https://{address}:{port}");
        let mut cmd = Command::new(&self.bins.kube_apiserver);
        cmd.arg(format!("--etcd-servers={}", self.etcd_url))
            .arg(format!(
                "--cert-dir={}",
                self.dir().join("apiserver-certs").display()
            ))
            .arg(format!("--tls-cert-file={}", f.serving_cert.display()))
            .arg(format!(
                "--tls-private-key-file={}",
                f.serving_key.display()
            ))
            .arg(format!("--client-ca-file={}", f.client_ca.display()))
            .arg(format!("--secure-port={port}"))
            .arg(format!("--bind-address={address}"))
            .arg("--authorization-mode=RBAC")
            .arg(format!("--service-cluster-ip-range={SERVICE_RANGE}"))
            .arg("--allow-privileged=true")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", f.sa_pub.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                f.sa_key.display()
            ))
            .arg(format!("--audit-policy-file={}", f.audit_policy.display()))
            .arg(format!("--audit-log-path={}", self.audit_log().display()))
            .arg("--profiling=false")
            .arg("--v=1");
        if layout.bridge_ip.is_some() {
            // The `kubernetes` Service then points at this address, so pods' in-cluster
            // configuration reaches it through kube-proxy; logs and exec reach the kubelet.
            cmd.arg(format!("--advertise-address={address}"))
                .arg("--endpoint-reconciler-type=lease")
                .arg(format!(
                    "--kubelet-client-certificate={}",
                    f.admin_cert.display()
                ))
                .arg(format!("--kubelet-client-key={}", f.admin_key.display()));
        } else {
            cmd.arg("--endpoint-reconciler-type=none");
        }
        self.apiserver_args = cmd.get_args().map(|a| a.to_owned()).collect();
        self.spawn("kube-apiserver", cmd)?;
        write_kubeconfig(&self.kubeconfig, &self.server, f)?;
        self.wait_until("kube-apiserver", Duration::from_secs(90), |p| {
            Ok(p.alive("kube-apiserver") && p.kubectl_ok(&["get", "--raw", "/readyz"]))
        })
    }

    fn start_controller_manager(&mut self, f: &PkiFiles, layout: &Layout) -> anyhow::Result<()> {
        let port = free_port()?;
        // validatingadmissionpolicy-status-controller type-checks the admission policies
        // into their status, which tests/admission.rs reads; clusterrole-aggregation merges
        // the chart's aggregated roles into view, edit and admin (tests/ship.rs). The
        // StatefulSet and disruption controllers make the pods and PodDisruptionBudget
        // status that tests/upgrade.rs upgrades through.
        let mut controllers = "endpointslice-controller,endpointslice-mirroring-controller,namespace-controller,garbage-collector-controller,serviceaccount-controller,serviceaccount-token-controller,validatingadmissionpolicy-status-controller,clusterrole-aggregation-controller,statefulset-controller".to_string();
        if layout.bridge_ip.is_some() {
            controllers.push_str(NODE_CONTROLLERS);
        } else {
            controllers.push_str(",disruption-controller");
        }
        let mut cmd = Command::new(&self.bins.kube_controller_manager);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg("--leader-elect=false")
            .arg(format!("--controllers={controllers}"))
            .arg(format!("--root-ca-file={}", f.serving_ca.display()))
            .arg(format!(
                "--service-account-private-key-file={}",
                f.sa_key.display()
            ))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg("--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics")
            .arg("--endpointslice-updates-batch-period=0s")
            .arg("--v=1");
        self.spawn("kube-controller-manager", cmd)
    }

    fn wait_for_default_service_account(&self) -> anyhow::Result<()> {
        self.wait_until("kube-controller-manager", Duration::from_secs(90), |p| {
            Ok(p.alive("kube-controller-manager")
                && p.kubectl_ok(&["get", "serviceaccount", "default", "-n", "default"]))
        })
    }

    /// Kills kube-apiserver at once (SIGKILL), as a crash or an OOM kill would.
    pub fn kill_apiserver(&self) {
        let mut procs = self.procs.lock().unwrap();
        if let Some(child) = procs.get_mut(APISERVER) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts kube-apiserver again on the same port and state, and waits until it is ready.
    /// Blocking: call it off the async runtime.
    pub fn restart_apiserver(&self) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.bins.kube_apiserver);
        cmd.args(&self.apiserver_args);
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.log_path("kube-apiserver"))?;
        cmd.stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null());
        let child = spawn_tied_to_process(cmd).context("restarting kube-apiserver")?;
        register_for_exit(child.id());
        self.procs.lock().unwrap()[APISERVER] = child;
        self.wait_until("kube-apiserver", Duration::from_secs(90), |p| {
            Ok(p.alive("kube-apiserver") && p.kubectl_ok(&["get", "--raw", "/readyz"]))
        })
    }

    /// A kube client for the admin identity.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&self.kubeconfig)?,
            &Default::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// The real kubectl, pointed at this plane.
    /// A kubeconfig for a bearer token (a ServiceAccount's), next to the admin one.
    pub fn token_kubeconfig(&self, name: &str, token: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir().join(format!("kubeconfig-{name}"));
        let ca = self.dir().join("pki/serving-ca.crt");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: local\n  context: {{cluster: local, user: {name}}}\ncurrent-context: local\n",
            self.server,
            ca.display()
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// The API server's own count of requests (`apiserver_request_total`), by verb and
    /// resource.
    pub fn requests(&self) -> anyhow::Result<BTreeMap<(String, String), f64>> {
        let out = self.kubectl().args(["get", "--raw", "/metrics"]).output()?;
        anyhow::ensure!(
            out.status.success(),
            "reading the API server's metrics failed"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut counts = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| l.starts_with("apiserver_request_total{"))
        {
            let field = |name: &str| {
                line.split(&format!("{name}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("")
                    .to_string()
            };
            let value: f64 = line
                .rsplit(' ')
                .next()
                .unwrap_or("0")
                .parse()
                .unwrap_or(0.0);
            *counts
                .entry((field("verb"), field("resource")))
                .or_insert(0.0) += value;
        }
        Ok(counts)
    }

    /// Completed write requests in the audit log (it holds reads too).
    fn audited_writes(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.audit_log()).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["stage"] == "ResponseComplete")
            .filter(|e| WRITE_VERBS.contains(&e["verb"].as_str().unwrap_or_default()))
            .collect()
    }

    /// Read requests (get, list; watches are not logged) by `user`, as (verb, resource).
    pub fn reads_by(&self, user: &str) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(self.audit_log()).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["stage"] == "ResponseComplete" && e["user"]["username"] == user)
            .filter(|e| matches!(e["verb"].as_str(), Some("get" | "list")))
            .map(|e| {
                let resource = e["objectRef"]["resource"]
                    .as_str()
                    .unwrap_or("(non-resource)");
                (
                    e["verb"].as_str().unwrap_or_default().to_string(),
                    resource.to_string(),
                )
            })
            .collect()
    }

    /// Write requests in the audit log by `user` with the time the API server received each,
    /// in the order of the log.
    pub fn timed_writes_by(&self, user: &str) -> Vec<(Timestamp, String, String, String)> {
        self.audited_writes()
            .into_iter()
            .filter(|e| e["user"]["username"] == user)
            .filter_map(|e| timed(&e, "requestReceivedTimestamp"))
            .collect()
    }

    /// Write requests to objects in `namespace`, by anyone, with the time the API server
    /// completed each (its stageTimestamp), as (at, verb, resource, name).
    pub fn completed_writes_in(&self, namespace: &str) -> Vec<(Timestamp, String, String, String)> {
        self.audited_writes()
            .into_iter()
            .filter(|e| e["objectRef"]["namespace"] == namespace)
            .filter_map(|e| timed(&e, "stageTimestamp"))
            .collect()
    }

    /// Write requests in the audit log by `user`, as (verb, resource, name) triples.
    pub fn writes_by(&self, user: &str) -> Vec<(String, String, String)> {
        self.audited_writes()
            .into_iter()
            .filter(|e| e["user"]["username"] == user)
            .map(|e| {
                let [_, verb, resource, name] = described(&e);
                (verb, resource, name)
            })
            .collect()
    }

    /// Write requests to objects in `namespace`, by anyone, in the order the audit log has
    /// them, as (user, verb, resource, name, response code).
    pub fn writes_in(&self, namespace: &str) -> Vec<(String, String, String, String, i64)> {
        self.audited_writes()
            .into_iter()
            .filter(|e| e["objectRef"]["namespace"] == namespace)
            .map(|e| {
                let [user, verb, resource, name] = described(&e);
                let code = e["responseStatus"]["code"].as_i64().unwrap_or_default();
                (user, verb, resource, name, code)
            })
            .collect()
    }

    /// Write requests to objects in `namespace` with the time the API server completed each
    /// (its stageTimestamp), as (at, [user, verb, resource, name]).
    pub fn timed_writes_in(&self, namespace: &str) -> Vec<(Timestamp, [String; 4])> {
        self.audited_writes()
            .into_iter()
            .filter(|e| e["objectRef"]["namespace"] == namespace)
            .filter_map(|e| Some((e["stageTimestamp"].as_str()?.parse().ok()?, described(&e))))
            .collect()
    }

    /// `writes_in`, read off the async runtime: the audit log grows to megabytes and parsing
    /// it on a runtime thread stalls whatever else that runtime serves (the Vault simulators).
    pub async fn writes_in_async(
        &'static self,
        namespace: &str,
    ) -> Vec<(String, String, String, String, i64)> {
        let namespace = namespace.to_string();
        tokio::task::spawn_blocking(move || self.writes_in(&namespace))
            .await
            .expect("reading the audit log")
    }

    /// `writes_by`, read off the async runtime.
    pub async fn writes_by_async(&'static self, user: &str) -> Vec<(String, String, String)> {
        let user = user.to_string();
        tokio::task::spawn_blocking(move || self.writes_by(&user))
            .await
            .expect("reading the audit log")
    }

    /// Requests by `user` that the API server refused as forbidden (403), any verb, as the
    /// request's verb and the refusal's message: the message names the verb authorization
    /// checked, which for a server-side apply that would create the object is `create`, not
    /// the request's `patch`.
    pub fn refusals_by(&self, user: &str) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(self.audit_log()).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["stage"] == "ResponseComplete" && e["user"]["username"] == user)
            .filter(|e| e["responseStatus"]["code"] == 403)
            .map(|e| {
                let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
                (text(&e["verb"]), text(&e["responseStatus"]["message"]))
            })
            .collect()
    }

    /// `refusals_by`, read off the async runtime.
    pub async fn refusals_by_async(&'static self, user: &str) -> Vec<(String, String)> {
        let user = user.to_string();
        tokio::task::spawn_blocking(move || self.refusals_by(&user))
            .await
            .expect("reading the audit log")
    }

    /// `timed_writes_by`, read off the async runtime.
    pub async fn timed_writes_by_async(
        &'static self,
        user: &str,
    ) -> Vec<(Timestamp, String, String, String)> {
        let user = user.to_string();
        tokio::task::spawn_blocking(move || self.timed_writes_by(&user))
            .await
            .expect("reading the audit log")
    }

    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.bins.kubectl);
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// The real helm, pointed at this plane, with its state kept in the plane's directory.
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(&self.bins.helm);
        let home = self.dir().join("helm");
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        cmd
    }

    fn kubectl_ok(&self, args: &[&str]) -> bool {
        self.kubectl()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn spawn(&self, name: &str, mut cmd: Command) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.log_path(name))?;
        cmd.stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null());
        let child = spawn_tied_to_process(cmd).with_context(|| format!("starting {name}"))?;
        register_for_exit(child.id());
        self.procs.lock().unwrap().push(child);
        Ok(())
    }

    /// The API server's audit log: one JSON line per write request, naming the user.
    pub fn audit_log(&self) -> PathBuf {
        self.dir().join("audit.log")
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir().join(format!("{name}.log"))
    }

    /// How many lines of a component's log contain `needle` so far.
    pub fn log_count(&self, name: &str, needle: &str) -> usize {
        let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        text.lines().filter(|l| l.contains(needle)).count()
    }

    /// The last lines of a component's log, for error messages.
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn alive(&self, name: &str) -> bool {
        let mut procs = self.procs.lock().unwrap();
        let index = ["etcd", "kube-apiserver", "kube-controller-manager"]
            .iter()
            .position(|n| *n == name);
        match index.and_then(|i| procs.get_mut(i)) {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn wait_until(
        &self,
        name: &str,
        limit: Duration,
        mut ready: impl FnMut(&Self) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if ready(self)? {
                return Ok(());
            }
            if !self.alive(name) {
                bail!("{name} exited during start-up:\n{}", self.log_tail(name));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("{name} not ready after {limit:?}:\n{}", self.log_tail(name))
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let mut procs = self.procs.lock().unwrap();
        // Reverse order: controllers first, etcd last, so nothing logs a storm of errors.
        for child in procs.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::env::var_os("VAULT_REGISTRAR_KEEP_PLANE").is_some() {
            let kept = self.dir().with_extension("kept");
            if std::fs::rename(self.dir(), &kept).is_ok() {
                eprintln!("control-plane files kept in {}", kept.display());
            }
        }
    }
}

/// One control plane per test binary, started on first use. Statics are never dropped, so
/// the processes end through their parent-death signal and an exit hook removes the files.
pub fn shared() -> &'static ControlPlane {
    static PLANE: OnceLock<ControlPlane> = OnceLock::new();
    PLANE.get_or_init(|| {
        let plane = ControlPlane::start().expect("starting the local control plane");
        register_dir_for_exit(plane.dir().to_path_buf());
        plane
    })
}

struct PkiFiles {
    serving_ca: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    client_ca: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
    audit_policy: PathBuf,
}

impl PkiFiles {
    fn write(dir: &Path, layout: &Layout) -> anyhow::Result<Self> {
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki)?;
        let serving_ca = Authority::new("vault-registrar-test-serving-ca")?;
        let client_ca = Authority::new("vault-registrar-test-client-ca")?;
        let address = layout.address();
        let mut names = vec!["localhost", "127.0.0.1", "kubernetes.default.svc"];
        if layout.bridge_ip.is_some() {
            names.extend([address.as_str(), KUBERNETES_SERVICE_IP]);
        }
        let serving = serving_ca.serving(&names)?;
        let admin = client_ca.client("admin", &["system:masters"])?;
        let (sa_private, sa_public) = signing_key()?;
        let put = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
            let path = pki.join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        };
        Ok(Self {
            serving_ca: put("serving-ca.crt", &serving_ca.cert_pem())?,
            serving_cert: put("apiserver.crt", &serving.cert)?,
            serving_key: put("apiserver.key", &serving.key)?,
            client_ca: put("client-ca.crt", &client_ca.cert_pem())?,
            admin_cert: put("admin.crt", &admin.cert)?,
            admin_key: put("admin.key", &admin.key)?,
            sa_key: put("service-account.key", &sa_private)?,
            sa_pub: put("service-account.pub", &sa_public)?,
            audit_policy: put("audit-policy.yaml", AUDIT_POLICY)?,
        })
    }
}

/// Records who wrote what, so tests can prove which process sent writes; and the watches
/// of ServiceAccounts (the operators under test), so that a refused watch shows too
/// (tests/ship.rs proves each verb the chart grants is needed by its 403).
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n  verbs: [create, update, patch, delete, deletecollection, get, list]\n- level: Metadata\n  verbs: [watch]\n  userGroups: [system:serviceaccounts]\n- level: None\n";

/// An audit event as (the time in its field `stamp`, verb, resource, name).
fn timed(e: &serde_json::Value, stamp: &str) -> Option<(Timestamp, String, String, String)> {
    let at: Timestamp = e[stamp].as_str()?.parse().ok()?;
    let field = |k: &str| e["objectRef"][k].as_str().unwrap_or_default().to_string();
    let verb = e["verb"].as_str().unwrap_or_default().to_string();
    Some((at, verb, field("resource"), field("name")))
}

/// An audit event's user, verb, resource (`pods/status` for a subresource) and name.
fn described(e: &serde_json::Value) -> [String; 4] {
    let field = |k: &str| e["objectRef"][k].as_str().unwrap_or_default().to_string();
    let resource = match field("subresource").as_str() {
        "" => field("resource"),
        sub => format!("{}/{sub}", field("resource")),
    };
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    [
        text(&e["user"]["username"]),
        text(&e["verb"]),
        resource,
        field("name"),
    ]
}

/// The verbs of the audit log that change something.
const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

fn write_kubeconfig(path: &Path, server: &str, f: &PkiFiles) -> anyhow::Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    client-certificate: {cert}\n    client-key: {key}\ncontexts:\n- name: local\n  context:\n    cluster: local\n    user: admin\n    namespace: default\ncurrent-context: local\n",
        ca = f.serving_ca.display(),
        cert = f.admin_cert.display(),
        key = f.admin_key.display(),
    );
    let mut file = std::fs::File::create(path)?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// A port no socket holds, below the kernel's ephemeral range. A port the kernel handed
/// out as free is itself ephemeral, and an outgoing connection can take it as its source
/// port before the component meant to listen on it binds it (a kubelet failed so, "bind:
/// address already in use"); below the range only listeners compete. Each process starts
/// at its own offset, so test processes side by side rarely try the same ports.
pub fn free_port() -> anyhow::Result<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const LOW: u32 = 20_000;
    let high = ephemeral_start().clamp(LOW + 1_000, 32_768);
    let span = high - LOW;
    let offset = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (LOW + offset.wrapping_add(n) % span) as u16;
        // The wildcard address: free only if no address of the host holds the port.
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port in {LOW}..{high}")
}

/// The first port of the kernel's ephemeral range (32768 unless configured).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns a process that dies with this one. It is spawned from one thread that lives as long as the process: Linux sends the parent-death
/// signal when the spawning *thread* ends, and test threads end after each test.
pub fn spawn_tied_to_process(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("controlplane-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawner thread");
        Mutex::new(tx)
    });
    // SAFETY: prctl is async-signal-safe and touches only the child's own process state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap()
        .send((cmd, tx))
        .expect("spawner thread alive");
    rx.recv().expect("spawner thread replies")
}

static EXIT_PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static EXIT_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

pub(crate) fn register_for_exit(pid: u32) {
    EXIT_PIDS.lock().unwrap().push(pid);
    install_exit_hook();
}

pub(crate) fn register_dir_for_exit(dir: PathBuf) {
    EXIT_DIRS.lock().unwrap().push(dir);
    install_exit_hook();
}

fn install_exit_hook() {
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        // SAFETY: registering a plain extern "C" function with no captured state.
        unsafe { libc::atexit(on_exit) };
    });
}

extern "C" fn on_exit() {
    if let Ok(pids) = EXIT_PIDS.lock() {
        for pid in pids.iter() {
            // SAFETY: sending a signal to a child we started; a stale pid is harmless here.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
    }
    // VAULT_REGISTRAR_KEEP_PLANE=1 keeps the logs and certificates for a post-mortem.
    if std::env::var_os("VAULT_REGISTRAR_KEEP_PLANE").is_some() {
        return;
    }
    if let Ok(dirs) = EXIT_DIRS.lock() {
        for dir in dirs.iter() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
