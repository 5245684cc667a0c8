//! A real Vault HA cluster on integrated storage (raft), whose nodes are pods of the test
//! plane: one Vault process per pod, listening on the pod's IP inside the pod network
//! namespace (see `netns`), so the operator probes it exactly as it would probe a pod.
//!
//! The binary is real Vault built from its Go module by `tests/vault/build.sh`, or, in the
//! OpenBao flavour, OpenBao's official `bao` fetched by `tests/openbao/build.sh`. Every process
//! is tied to the test process by a parent-death signal and killed on drop, and the data
//! directories live in a temporary directory removed on drop, so a panicking test leaves
//! nothing running and nothing on disk.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::APP_LABEL;
use crate::controlplane::spawn_tied_to_process;
use crate::pods::{SimPod, next_pod_ip, pod_labels, start_pod};

/// The Vault release the tests run; `tests/vault/go.mod` pins the same one.
pub const VAULT_VERSION: &str = "1.21.4";
const API_PORT: u16 = 8200;
const CLUSTER_PORT: u16 = 8201;
/// Long enough for a raft election on a loaded 2-core machine, which takes up to ~6 s.
const START_LIMIT: Duration = Duration::from_secs(90);

/// The OpenBao release the OpenBao flavour runs; `tests/openbao/build.sh` fetches the same.
pub const OPENBAO_VERSION: &str = "2.7.2";

/// Which server the raft cluster runs: the same commands, configuration and API, under
/// another binary and environment prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Vault,
    OpenBao,
}

impl Flavour {
    fn binary(self) -> Result<PathBuf> {
        match self {
            Flavour::Vault => vault_binary(),
            Flavour::OpenBao => openbao_binary(),
        }
    }

    /// The CLI's environment: `VAULT_ADDR`/`VAULT_TOKEN` or `BAO_ADDR`/`BAO_TOKEN`.
    fn env(self, name: &str) -> String {
        match self {
            Flavour::Vault => format!("VAULT_{name}"),
            Flavour::OpenBao => format!("BAO_{name}"),
        }
    }
}

/// What can go wrong driving real Vault, apart from the Kubernetes side.
#[derive(Debug, thiserror::Error)]
pub enum RealVaultError {
    #[error("building Vault with {script}: {detail}")]
    Build { script: PathBuf, detail: String },
    #[error("starting Vault node {node}: {source}")]
    Spawn {
        node: String,
        source: std::io::Error,
    },
    #[error("vault {args:?} against {node} failed: {stderr}")]
    Cli {
        node: String,
        args: Vec<String>,
        stderr: String,
    },
    #[error("health of {addr}: {detail}")]
    Health { addr: SocketAddr, detail: String },
    #[error("timed out after {limit:?} waiting for {what}; last seen: {last}")]
    Timeout {
        what: String,
        limit: Duration,
        last: String,
    },
    #[error("node {node} exited:\n{log_tail}")]
    Exited { node: String, log_tail: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

type Result<T, E = RealVaultError> = std::result::Result<T, E>;

/// The path of the Vault binary: `VAULT_REGISTRAR_VAULT_BIN` when set, else the cached
/// build, built first when missing.
pub fn vault_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("VAULT_REGISTRAR_VAULT_BIN") {
        return Ok(PathBuf::from(path));
    }
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    if let Some(path) = BUILT.get() {
        return Ok(path.clone());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vault/build.sh");
    let path = run_build_script(&script)?;
    Ok(BUILT.get_or_init(|| path).clone())
}

/// The path of OpenBao's `bao`: `VAULT_REGISTRAR_BAO_BIN` when set, else the cached copy,
/// fetched first when missing.
pub fn openbao_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("VAULT_REGISTRAR_BAO_BIN") {
        return Ok(PathBuf::from(path));
    }
    static FETCHED: OnceLock<PathBuf> = OnceLock::new();
    if let Some(path) = FETCHED.get() {
        return Ok(path.clone());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../openbao/build.sh");
    let path = run_build_script(&script)?;
    Ok(FETCHED.get_or_init(|| path).clone())
}

fn run_build_script(script: &Path) -> Result<PathBuf> {
    let build_error = |detail: String| RealVaultError::Build {
        script: script.to_path_buf(),
        detail,
    };
    let out = Command::new("bash")
        .arg(script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| build_error(e.to_string()))?;
    if !out.status.success() {
        return Err(build_error(format!("exited with {}", out.status)));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = PathBuf::from(stdout.trim().lines().last().unwrap_or_default());
    if !path.is_file() {
        return Err(build_error(format!("no binary at {}", path.display())));
    }
    Ok(path)
}

/// One `sys/health` answer: the status code and the JSON body.
#[derive(Clone, Debug)]
pub struct HealthAnswer {
    pub code: u16,
    pub body: Value,
}

impl HealthAnswer {
    pub fn flag(&self, name: &str) -> Option<bool> {
        self.body.get(name).and_then(Value::as_bool)
    }
}

/// Asks `sys/health` at `ip:8200` once, within `timeout`. Plain HTTP/1.1 over a fresh
/// connection, as a probe does, so that nothing pooled hides a dead node.
pub async fn health_at(ip: Ipv4Addr, timeout: Duration) -> Result<HealthAnswer> {
    health_over(ip, timeout, None).await
}

/// As `health_at`, over TLS when given a connector (with the client certificate a listener
/// that requires one asks for).
async fn health_over(
    ip: Ipv4Addr,
    timeout: Duration,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<HealthAnswer> {
    let addr = SocketAddr::new(ip.into(), API_PORT);
    let failed = |detail: String| RealVaultError::Health { addr, detail };
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        match tls {
            None => ask_health(tcp, addr).await,
            Some(connector) => {
                let name = rustls::pki_types::ServerName::IpAddress(ip.into());
                ask_health(connector.connect(name, tcp).await?, addr).await
            }
        }
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| failed(format!("no answer within {timeout:?}")))?
        .map_err(|e| failed(e.to_string()))?;
    parse_health(&raw).map_err(failed)
}

async fn ask_health<S>(mut stream: S, addr: SocketAddr) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request =
        format!("GET /v1/sys/health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    // A TLS peer that closes without close_notify ends the read with an error after the
    // whole answer; what was read is the answer.
    match stream.read_to_end(&mut raw).await {
        Ok(_) => Ok(raw),
        Err(_) if !raw.is_empty() => Ok(raw),
        Err(e) => Err(e),
    }
}

/// Mutual TLS on every node's listener, as `tls_require_and_verify_client_cert = true`
/// sets it up: a CA of the test's own signs each node's serving certificate (for its IP) and
/// one client certificate, which the nodes' joins, the CLI and the test's health checks
/// present.
pub struct MutualTls {
    authority: crate::certs::Authority,
    pub ca_pem: String,
    /// The client certificate and key that the listeners accept.
    pub client: crate::certs::Pem,
    ca_file: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    connector: tokio_rustls::TlsConnector,
}

impl MutualTls {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let authority = crate::certs::Authority::new("vault-registrar-test-ca")?;
        let ca_pem = authority.cert_pem();
        let client = authority.client("vault-registrar-probe", &[])?;
        let (ca_file, client_cert, client_key) = (
            dir.join("ca.pem"),
            dir.join("client.pem"),
            dir.join("client-key.pem"),
        );
        std::fs::write(&ca_file, &ca_pem)?;
        std::fs::write(&client_cert, &client.cert)?;
        std::fs::write(&client_key, &client.key)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert?)?;
        }
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(client.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(client.key.as_bytes())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)?;
        Ok(Self {
            authority,
            ca_pem,
            client,
            ca_file,
            client_cert,
            client_key,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// The node's serving certificate and key files, for its IP.
    fn serving(&self, dir: &Path, name: &str, ip: Ipv4Addr) -> anyhow::Result<(PathBuf, PathBuf)> {
        let pem = self.authority.serving(&[&ip.to_string()])?;
        let (cert, key) = (
            dir.join(format!("{name}-cert.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&cert, pem.cert)?;
        std::fs::write(&key, pem.key)?;
        Ok((cert, key))
    }
}

fn parse_health(raw: &[u8]) -> Result<HealthAnswer, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {text:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status code in {head:?}"))?;
    // Go's server sends small bodies whole with a Content-Length; the JSON object is the
    // span between the first and the last brace either way.
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(start), Some(end)) if start < end => &body[start..=end],
        _ => body,
    };
    let body = serde_json::from_str(json).map_err(|e| format!("{e}: {body:?}"))?;
    Ok(HealthAnswer { code, body })
}

/// One Vault node: its pod, its configuration and, while it runs, its process.
pub struct VaultNode {
    pub pod: SimPod,
    config: PathBuf,
    log: PathBuf,
    process: Option<Child>,
}

impl VaultNode {
    pub fn name(&self) -> &str {
        &self.pod.name
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.pod.ip
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// The keys from `vault operator init` with one share.
#[derive(Clone, Debug)]
struct InitKeys {
    unseal: String,
    root_token: String,
}

/// A raft HA cluster of real Vault nodes on pods `<prefix>-0..n` of a namespace.
pub struct RaftCluster {
    pub client: kube::Client,
    pub namespace: String,
    prefix: String,
    binary: PathBuf,
    flavour: Flavour,
    /// Mutual TLS on the listeners; plain HTTP without.
    pub tls: Option<MutualTls>,
    dir: tempfile::TempDir,
    pub nodes: Vec<VaultNode>,
    keys: Option<InitKeys>,
}

impl RaftCluster {
    /// Starts `n` nodes that join each other, initialises the first with one key share,
    /// unseals every node once, and waits until one answers 200, the others 429, and every
    /// node is a raft voter (only voters can take over after a step-down).
    pub async fn start(
        client: &kube::Client,
        namespace: &str,
        prefix: &str,
        n: usize,
    ) -> anyhow::Result<Self> {
        Self::start_flavour(client, namespace, prefix, n, Flavour::Vault).await
    }

    /// As `start`, with real OpenBao or real Vault.
    pub async fn start_flavour(
        client: &kube::Client,
        namespace: &str,
        prefix: &str,
        n: usize,
        flavour: Flavour,
    ) -> anyhow::Result<Self> {
        Self::start_with(client, namespace, prefix, n, flavour, false).await
    }

    /// As `start`, every listener requiring a client certificate signed by the cluster's
    /// own CA (`tls_require_and_verify_client_cert`); see `MutualTls`.
    pub async fn start_mutual_tls(
        client: &kube::Client,
        namespace: &str,
        prefix: &str,
        n: usize,
    ) -> anyhow::Result<Self> {
        Self::start_with(client, namespace, prefix, n, Flavour::Vault, true).await
    }

    async fn start_with(
        client: &kube::Client,
        namespace: &str,
        prefix: &str,
        n: usize,
        flavour: Flavour,
        mutual_tls: bool,
    ) -> anyhow::Result<Self> {
        let mut cluster =
            Self::launch_flavour(client, namespace, prefix, n, flavour, mutual_tls).await?;
        cluster.init().await?;
        cluster.unseal(0).await?;
        cluster.wait_code(0, 200, START_LIMIT).await?;
        for i in 1..n {
            cluster.unseal(i).await?;
        }
        for i in 1..n {
            cluster.wait_code(i, 429, START_LIMIT).await?;
        }
        cluster.wait_voters(n, START_LIMIT).await?;
        Ok(cluster)
    }

    /// The nodes started and answering (501, not initialised), with their pods Running and
    /// Ready; nothing initialised. `start` does the rest; the demo shows it step by step.
    pub async fn launch(
        client: &kube::Client,
        namespace: &str,
        prefix: &str,
        n: usize,
    ) -> anyhow::Result<Self> {
        Self::launch_flavour(client, namespace, prefix, n, Flavour::Vault, false).await
    }

    async fn launch_flavour(
        client: &kube::Client,
        namespace: &str,
        prefix: &str,
        n: usize,
        flavour: Flavour,
        mutual_tls: bool,
    ) -> anyhow::Result<Self> {
        crate::netns::ensure()?;
        let binary = tokio::task::spawn_blocking(move || flavour.binary()).await??;
        let dir = tempfile::Builder::new()
            .prefix("vault-registrar-raft-")
            .tempdir()?;
        let mut cluster = Self {
            client: client.clone(),
            namespace: namespace.into(),
            prefix: prefix.into(),
            binary,
            flavour,
            tls: None,
            dir,
            nodes: Vec::new(),
            keys: None,
        };
        if mutual_tls {
            cluster.tls = Some(MutualTls::new(cluster.dir.path())?);
        }
        let ips: Vec<Ipv4Addr> = (0..n).map(|_| next_pod_ip()).collect();
        for (i, ip) in ips.iter().enumerate() {
            let peers: Vec<Ipv4Addr> = ips.iter().copied().filter(|p| p != ip).collect();
            cluster.add_node(i, *ip, &peers).await?;
        }
        for i in 0..n {
            cluster.wait_code(i, 501, START_LIMIT).await?;
        }
        Ok(cluster)
    }

    /// Adds a node that never joins nor is initialised: it answers 501 for good.
    pub async fn add_uninitialized(&mut self) -> anyhow::Result<usize> {
        let i = self.nodes.len();
        self.add_node(i, next_pod_ip(), &[]).await?;
        self.wait_code(i, 501, START_LIMIT).await?;
        Ok(i)
    }

    async fn add_node(&mut self, i: usize, ip: Ipv4Addr, peers: &[Ipv4Addr]) -> anyhow::Result<()> {
        let name = format!("{}-{i}", self.prefix);
        let data = self.dir.path().join(&name);
        std::fs::create_dir_all(&data)?;
        let config = self.dir.path().join(format!("{name}.hcl"));
        let tls = match &self.tls {
            Some(tls) => {
                let (cert, key) = tls.serving(self.dir.path(), &name, ip)?;
                Some(ListenerTls {
                    cert,
                    key,
                    ca: tls.ca_file.clone(),
                    client_cert: tls.client_cert.clone(),
                    client_key: tls.client_key.clone(),
                })
            }
            None => None,
        };
        let text = node_config(&name, ip, &data, peers, self.flavour, tls.as_ref());
        std::fs::write(&config, text)?;
        let labels = BTreeMap::from([(APP_LABEL.0.to_string(), APP_LABEL.1.to_string())]);
        let pod = SimPod { name, labels, ip };
        start_pod(&self.client, &self.namespace, &pod).await?;
        let log = self.dir.path().join(format!("{}.log", pod.name));
        self.nodes.push(VaultNode {
            pod,
            config,
            log,
            process: None,
        });
        self.spawn(i)?;
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        // `ip netns exec` execs Vault in place, so the child's pid is Vault's own and the
        // parent-death signal set before exec still applies.
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", crate::netns::NAMESPACE])
            .arg(&self.binary)
            .arg("server")
            .arg(format!("-config={}", node.config.display()))
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = spawn_tied_to_process(cmd).map_err(|source| RealVaultError::Spawn {
            node: node.pod.name.clone(),
            source,
        })?;
        node.process = Some(child);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn ip(&self, i: usize) -> String {
        self.nodes[i].ip().to_string()
    }

    pub fn pod_name(&self, i: usize) -> &str {
        self.nodes[i].name()
    }

    pub async fn labels(&self, i: usize) -> anyhow::Result<BTreeMap<String, String>> {
        pod_labels(&self.client, &self.namespace, self.pod_name(i)).await
    }

    /// One health answer from node `i`.
    pub async fn health(&self, i: usize) -> Result<HealthAnswer> {
        let tls = self.tls.as_ref().map(|t| &t.connector);
        health_over(self.nodes[i].ip(), Duration::from_secs(2), tls).await
    }

    /// The node answering 200 right now, if exactly one does.
    pub async fn active(&self) -> Option<usize> {
        let mut active = Vec::new();
        for i in 0..self.len() {
            if let Ok(answer) = self.health(i).await
                && answer.code == 200
            {
                active.push(i);
            }
        }
        (active.len() == 1).then(|| active[0])
    }

    /// Waits until node `i` answers `code`.
    pub async fn wait_code(&mut self, i: usize, code: u16, limit: Duration) -> Result<()> {
        let start = Instant::now();
        let mut last = String::from("nothing");
        while start.elapsed() < limit {
            match self.health(i).await {
                Ok(answer) if answer.code == code => return Ok(()),
                Ok(answer) => last = format!("{} {}", answer.code, answer.body),
                Err(e) => last = e.to_string(),
            }
            self.check_running(i)?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(RealVaultError::Timeout {
            what: format!("{} to answer {code}", self.pod_name(i)),
            limit,
            last,
        })
    }

    /// Waits until some node answers 200 and returns it.
    pub async fn wait_active(&self, limit: Duration) -> Result<usize> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(i) = self.active().await {
                return Ok(i);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(RealVaultError::Timeout {
            what: "a node answering 200".into(),
            limit,
            last: "no single active node".into(),
        })
    }

    fn check_running(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        let exited = match node.process.as_mut() {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            // Not started, or killed on purpose: nothing to report.
            None => false,
        };
        if exited {
            node.process = None;
            return Err(RealVaultError::Exited {
                node: node.name().into(),
                log_tail: node.log_tail(),
            });
        }
        Ok(())
    }

    /// `vault operator init` on node 0 with one key share; keeps the key and root token.
    pub async fn init(&mut self) -> Result<()> {
        let out = self
            .cli(
                0,
                &[
                    "operator",
                    "init",
                    "-key-shares=1",
                    "-key-threshold=1",
                    "-format=json",
                ],
            )
            .await?;
        let parsed: Value = serde_json::from_str(&out).map_err(|e| self.init_error(0, &e))?;
        let field = |v: &Value| v.as_str().map(str::to_owned);
        let unseal = field(&parsed["unseal_keys_b64"][0]);
        let root_token = field(&parsed["root_token"]);
        match (unseal, root_token) {
            (Some(unseal), Some(root_token)) => {
                self.keys = Some(InitKeys { unseal, root_token });
                Ok(())
            }
            _ => Err(self.init_error(0, &"init printed no key or token")),
        }
    }

    fn init_error(&self, i: usize, detail: &dyn std::fmt::Display) -> RealVaultError {
        RealVaultError::Cli {
            node: self.pod_name(i).into(),
            args: vec!["operator".into(), "init".into()],
            stderr: detail.to_string(),
        }
    }

    /// Sends the unseal key to node `i` until it is accepted once. A joiner refuses it as
    /// "not initialized" until its next retry_join (every 2 s) has fetched the leader's
    /// challenge. Sending it again once accepted, while the node is still joining, makes
    /// later step-downs silently do nothing, so an accepted key is never resent.
    pub async fn unseal(&self, i: usize) -> Result<()> {
        let key = self.keys().unseal.clone();
        let start = Instant::now();
        loop {
            match self.cli(i, &["operator", "unseal", &key]).await {
                Err(RealVaultError::Cli { stderr, .. })
                    if stderr.contains("not initialized") && start.elapsed() < START_LIMIT =>
                {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => return other.map(|_| ()),
            }
        }
    }

    /// `vault operator step-down` on node `i` (the active node, for it to step down).
    pub async fn step_down(&self, i: usize) -> Result<()> {
        self.cli(i, &["operator", "step-down"]).await.map(|_| ())
    }

    /// `vault operator seal` on node `i`; Vault refuses it on a standby.
    pub async fn seal(&self, i: usize) -> Result<()> {
        self.cli(i, &["operator", "seal"]).await.map(|_| ())
    }

    /// `vault operator raft remove-peer` of node `i`, sent to node `via` (the active one).
    pub async fn remove_peer(&self, i: usize, via: usize) -> Result<()> {
        let name = self.pod_name(i).to_owned();
        self.cli(via, &["operator", "raft", "remove-peer", &name])
            .await
            .map(|_| ())
    }

    /// SIGKILL of node `i`'s process, as an OOM kill does; returns once it is reaped.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again on its data; it comes up sealed (503).
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_code(i, 503, START_LIMIT).await
    }

    /// Waits until the raft configuration has `n` voters.
    pub async fn wait_voters(&self, n: usize, limit: Duration) -> Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < limit {
            if let Some(active) = self.active().await {
                let args = ["operator", "raft", "list-peers", "-format=json"];
                match self.cli(active, &args).await {
                    Ok(out) if voters(&out) == n => return Ok(()),
                    Ok(out) => last = out,
                    Err(e) => last = e.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(RealVaultError::Timeout {
            what: format!("{n} raft voters"),
            limit,
            last,
        })
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn keys(&self) -> &InitKeys {
        self.keys.as_ref().expect("the cluster is initialised")
    }

    /// Runs the real `vault` command against node `i`, with the root token once there is one.
    async fn cli(&self, i: usize, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(args)
            .env(
                self.flavour.env("ADDR"),
                format!("{}://{}:{API_PORT}", self.scheme(), self.ip(i)),
            )
            // The CLI keeps a token file under HOME; this keeps it out of the real one.
            .env("HOME", self.dir.path())
            .env_remove("VAULT_TOKEN")
            .env_remove("BAO_TOKEN")
            .stdin(Stdio::null());
        if let Some(keys) = &self.keys {
            cmd.env(self.flavour.env("TOKEN"), &keys.root_token);
        }
        if let Some(tls) = &self.tls {
            cmd.env(self.flavour.env("CACERT"), &tls.ca_file)
                .env(self.flavour.env("CLIENT_CERT"), &tls.client_cert)
                .env(self.flavour.env("CLIENT_KEY"), &tls.client_key);
        }
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .map_err(std::io::Error::other)??;
        if !out.status.success() {
            return Err(RealVaultError::Cli {
                node: self.pod_name(i).into(),
                args: args.iter().map(|a| a.to_string()).collect(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Each time node `i` logged "post-unseal setup complete", by its own clock: the last
    /// step before a node taking over as active serves clients (it answers 200 from then).
    pub fn became_active_at(&self, i: usize) -> Vec<k8s_openapi::jiff::Timestamp> {
        let text = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        active_times(&text)
    }

    /// The last lines of node `i`'s log, for failure messages.
    pub fn log_tail(&self, i: usize) -> String {
        self.nodes[i].log_tail()
    }
}

impl Drop for RaftCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        if std::env::var_os("VAULT_REGISTRAR_KEEP_PLANE").is_some() {
            let kept = self.dir.path().with_extension("kept");
            if std::fs::rename(self.dir.path(), &kept).is_ok() {
                eprintln!("Vault data and logs kept in {}", kept.display());
            }
        }
    }
}

fn voters(list_peers: &str) -> usize {
    let parsed: Value = serde_json::from_str(list_peers).unwrap_or_default();
    parsed["data"]["config"]["servers"]
        .as_array()
        .map_or(0, |servers| {
            servers.iter().filter(|s| s["voter"] == true).count()
        })
}

/// A listener's TLS files, when it requires client certificates.
struct ListenerTls {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// One node's configuration. `performance_multiplier = 1` makes raft elect a new leader in
/// seconds instead of tens of seconds after the active node dies, which keeps tests short;
/// `disable_mlock` because the tests run without the memory-lock capability being granted
/// per process; plain HTTP unless the cluster runs mutual TLS (`MutualTls`), the operator's
/// other TLS settings being tested against the simulator.
/// OpenBao has no memory locking to disable and warns about the key.
fn node_config(
    name: &str,
    ip: Ipv4Addr,
    data: &Path,
    peers: &[Ipv4Addr],
    flavour: Flavour,
    tls: Option<&ListenerTls>,
) -> String {
    let scheme = if tls.is_some() { "https" } else { "http" };
    // A join is a request to the leader's API: through a listener that requires client
    // certificates, it needs one too.
    let join_tls = tls
        .map(|t| {
            format!(
                "    leader_ca_cert_file = \"{}\"\n    leader_client_cert_file = \"{}\"\n    leader_client_key_file = \"{}\"\n",
                t.ca.display(),
                t.client_cert.display(),
                t.client_key.display()
            )
        })
        .unwrap_or_default();
    let joins: String = peers
        .iter()
        .map(|p| {
            format!(
                "  retry_join {{\n    leader_api_addr = \"{scheme}://{p}:{API_PORT}\"\n{join_tls}  }}\n"
            )
        })
        .collect();
    let listener_tls = match tls {
        None => "  tls_disable = true\n".to_string(),
        Some(t) => format!(
            "  tls_cert_file = \"{}\"\n  tls_key_file = \"{}\"\n  tls_client_ca_file = \"{}\"\n  tls_require_and_verify_client_cert = true\n",
            t.cert.display(),
            t.key.display(),
            t.ca.display()
        ),
    };
    let mlock = match flavour {
        Flavour::Vault => "disable_mlock = true\n",
        Flavour::OpenBao => "",
    };
    format!(
        r#"ui = false
{mlock}log_level = "info"
cluster_name = "vault-registrar-test"
api_addr = "{scheme}://{ip}:{API_PORT}"
cluster_addr = "https://{ip}:{CLUSTER_PORT}"

storage "raft" {{
  path = "{data}"
  node_id = "{name}"
  performance_multiplier = 1
{joins}}}

listener "tcp" {{
  address = "{ip}:{API_PORT}"
  cluster_address = "{ip}:{CLUSTER_PORT}"
{listener_tls}}}
"#,
        data = data.display(),
    )
}

/// What one node answered while a `HealthLog` ran.
#[derive(Clone, Debug, Default)]
pub struct NodeLog {
    /// How many answers came with each status code.
    pub codes: BTreeMap<u16, u32>,
    /// Polls that got no answer (refused, reset, timed out).
    pub failures: u32,
    /// When the node last started answering 200 after answering anything else (or nothing).
    pub became_active: Option<Instant>,
    /// The last body seen for each status code.
    pub bodies: BTreeMap<u16, Value>,
    /// The longest a poll waited for an answer: a probe with a shorter timeout would have
    /// counted that moment as a failure.
    pub slowest_answer: Duration,
}

/// Polls every node's `sys/health` from the test side, each node on its own task so that a
/// node holding its answer (as one stepping down does for ~0.5 s) delays no other. Stops on
/// drop.
pub struct HealthLog {
    nodes: Arc<Vec<Mutex<NodeLog>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl HealthLog {
    pub fn start(ips: &[Ipv4Addr], every: Duration) -> Self {
        let nodes = Arc::new(ips.iter().map(|_| Mutex::default()).collect::<Vec<_>>());
        let tasks = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| tokio::spawn(poll_node(*ip, every, nodes.clone(), i)))
            .collect();
        Self { nodes, tasks }
    }

    /// What node `i` answered so far.
    pub fn node(&self, i: usize) -> NodeLog {
        self.nodes[i].lock().expect("health log lock").clone()
    }
}

impl Drop for HealthLog {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn poll_node(ip: Ipv4Addr, every: Duration, nodes: Arc<Vec<Mutex<NodeLog>>>, i: usize) {
    let mut was_active = false;
    loop {
        let asked = Instant::now();
        let answer = health_at(ip, Duration::from_secs(2)).await;
        let now = Instant::now();
        {
            let mut log = nodes[i].lock().expect("health log lock");
            log.slowest_answer = log.slowest_answer.max(now - asked);
            match answer {
                Ok(answer) => {
                    *log.codes.entry(answer.code).or_default() += 1;
                    if answer.code == 200 && !was_active {
                        log.became_active = Some(now);
                    }
                    was_active = answer.code == 200;
                    log.bodies.insert(answer.code, answer.body);
                }
                Err(_) => {
                    log.failures += 1;
                    was_active = false;
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// The times of the "post-unseal setup complete" lines of a Vault log, whose lines start
/// with an RFC 3339 timestamp.
pub fn active_times(log: &str) -> Vec<k8s_openapi::jiff::Timestamp> {
    log.lines()
        .filter(|l| l.contains("post-unseal setup complete"))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_answer_with_content_length() {
        let raw = b"HTTP/1.1 474 status code 474\r\nContent-Type: application/json\r\nContent-Length: 44\r\n\r\n{\"standby\":true,\"ha_connection_healthy\":false}";
        let answer = parse_health(raw).unwrap();
        assert_eq!(answer.code, 474);
        assert_eq!(answer.flag("ha_connection_healthy"), Some(false));
    }

    #[test]
    fn reads_the_times_vault_took_over_from_its_log() {
        let log = "2026-12-02T03:40:01.123Z [INFO]  core: acquired lock, enabling active operation\n\
                   2026-12-02T03:40:01.180Z [INFO]  core: post-unseal setup complete\n\
                   garbage post-unseal setup complete\n\
                   2026-12-02T03:41:00.004Z [INFO]  core: post-unseal setup complete\n";
        let times: Vec<String> = active_times(log).iter().map(ToString::to_string).collect();
        assert_eq!(
            times,
            ["2026-12-02T03:40:01.18Z", "2026-12-02T03:41:00.004Z"]
        );
    }

    #[test]
    fn refuses_an_answer_without_headers_end() {
        assert!(parse_health(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn counts_voters_only() {
        let out =
            r#"{"data":{"config":{"servers":[{"voter":true},{"voter":false},{"voter":true}]}}}"#;
        assert_eq!(voters(out), 2);
        assert_eq!(voters("not json"), 0);
    }

    #[test]
    fn config_joins_every_peer_but_itself() {
        let ip = Ipv4Addr::new(198, 18, 0, 1);
        let peers = [Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 3)];
        let text = node_config("vault-0", ip, Path::new("/d"), &peers, Flavour::Vault, None);
        assert_eq!(text.matches("retry_join").count(), 2);
        assert!(text.contains("leader_api_addr = \"http://198.18.0.2:8200\""));
        assert!(!text.contains("http://198.18.0.1:8200\"\n  }"));
        assert!(text.contains("performance_multiplier = 1"));
        assert!(text.contains("tls_disable = true"));
    }
}
