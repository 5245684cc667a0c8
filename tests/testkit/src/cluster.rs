//! A simulated Vault cluster (pods plus one health simulator per pod IP) and the operator
//! process under test, for end-to-end tests and the demo.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};

use crate::controlplane::spawn_tied_to_process;
use crate::pods::{SimPod, next_pod_ip, pod_labels, start_pod};
use crate::vault_sim::{Role, SimState, SimTls, VaultSim};
use crate::wait;

/// The label every simulated Vault pod carries, as the official chart's pods do.
pub const APP_LABEL: (&str, &str) = ("app.kubernetes.io/name", "vault");

pub struct Member {
    pub pod: SimPod,
    pub sim: VaultSim,
}

/// Pods `<prefix>-0..n` in a namespace, each answered by its own Vault simulator.
pub struct SimCluster {
    pub client: kube::Client,
    pub namespace: String,
    pub members: Vec<Member>,
}

impl SimCluster {
    /// Starts one simulator per role on a fresh loopback IP, then creates the pods Running
    /// and Ready with those IPs.
    pub async fn start(
        client: &kube::Client,
        namespace: &str,
        prefix: &str,
        roles: &[Role],
        tls: Option<SimTls>,
    ) -> anyhow::Result<Self> {
        Self::start_labelled(client, namespace, prefix, roles, tls, &[]).await
    }

    /// As `start`, with more labels on every pod besides the app label.
    pub async fn start_labelled(
        client: &kube::Client,
        namespace: &str,
        prefix: &str,
        roles: &[Role],
        tls: Option<SimTls>,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut members = Vec::new();
        for (i, role) in roles.iter().enumerate() {
            let ip = next_pod_ip();
            let sim = VaultSim::start(
                SocketAddr::new(ip.into(), 8200),
                tls.clone(),
                SimState::new(*role),
            )
            .await?;
            let mut labels = BTreeMap::from([(APP_LABEL.0.to_string(), APP_LABEL.1.to_string())]);
            labels.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            let pod = SimPod {
                name: format!("{prefix}-{i}"),
                labels,
                ip,
            };
            start_pod(client, namespace, &pod).await?;
            members.push(Member { pod, sim });
        }
        Ok(Self {
            client: client.clone(),
            namespace: namespace.into(),
            members,
        })
    }

    pub fn sim(&self, i: usize) -> &VaultSim {
        &self.members[i].sim
    }

    pub fn pod_name(&self, i: usize) -> &str {
        &self.members[i].pod.name
    }

    pub async fn labels(&self, i: usize) -> anyhow::Result<BTreeMap<String, String>> {
        pod_labels(&self.client, &self.namespace, self.pod_name(i)).await
    }

    /// Waits until the given label has the given value on each listed pod (None: absent).
    pub async fn wait_labels(
        &self,
        key: &str,
        want: &[Option<&str>],
        limit: Duration,
    ) -> anyhow::Result<()> {
        let what = format!("{key} = {want:?} on {} pods", want.len());
        wait::until(&what, limit, || async {
            let mut got = Vec::new();
            for i in 0..want.len() {
                got.push(self.labels(i).await?.get(key).cloned());
            }
            let matches = got.iter().zip(want).all(|(g, w)| g.as_deref() == *w);
            Ok(matches.then_some(()))
        })
        .await
    }

    /// The pod IPs in the EndpointSlices of a Service, ready endpoints only, sorted.
    pub async fn endpoint_ips(&self, service: &str) -> anyhow::Result<Vec<String>> {
        endpoint_ips(&self.client, &self.namespace, service).await
    }

    pub fn ip(&self, i: usize) -> String {
        self.members[i].pod.ip.to_string()
    }

    pub async fn pod(&self, i: usize) -> anyhow::Result<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        Ok(pods.get(self.pod_name(i)).await?)
    }
}

/// Ready endpoint addresses of a Service's EndpointSlices, sorted.
pub async fn endpoint_ips(
    client: &kube::Client,
    namespace: &str,
    service: &str,
) -> anyhow::Result<Vec<String>> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let list = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await?;
    let mut ips: Vec<String> = list
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect();
    ips.sort();
    Ok(ips)
}

/// Waits until a Service's ready endpoints are exactly `want` (sorted).
pub async fn wait_endpoints(
    client: &kube::Client,
    namespace: &str,
    service: &str,
    want: &[String],
    limit: Duration,
) -> anyhow::Result<()> {
    let mut want = want.to_vec();
    want.sort();
    let what = format!("Service {service} endpoints = {want:?}");
    wait::until(&what, limit, || async {
        let got = endpoint_ips(client, namespace, service).await?;
        Ok((got == want).then_some(()))
    })
    .await
}

/// The operator, run as its real binary. Killed on drop.
pub struct Operator {
    child: Child,
    pub log: std::path::PathBuf,
}

impl Operator {
    pub fn start(bin: &Path, kubeconfig: &Path, args: &[&str], log: &Path) -> anyhow::Result<Self> {
        Self::start_limited(bin, kubeconfig, args, log, None)
    }

    /// As `start`; with `nofile`, the process may open at most that many files (soft and
    /// hard limit), to play descriptor exhaustion.
    pub fn start_limited(
        bin: &Path,
        kubeconfig: &Path,
        args: &[&str],
        log: &Path,
        nofile: Option<u64>,
    ) -> anyhow::Result<Self> {
        let file = std::fs::File::create(log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg(format!("--kubeconfig={}", kubeconfig.display()));
        // Any free port unless given: several operators run side by side in one test binary.
        let given = |names: &[&str]| args.iter().any(|a| names.iter().any(|n| a.starts_with(n)));
        if !given(&["--metrics-bind-address", "--metrics-addr"]) {
            cmd.arg("--metrics-bind-address=127.0.0.1:0");
        }
        if !given(&["--health-probe-bind-address"]) {
            cmd.arg("--health-probe-bind-address=127.0.0.1:0");
        }
        cmd.args(args)
            .env("RUST_LOG", "info,kube=warn")
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        if let Some(limit) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and changes only the child's limits.
            unsafe {
                cmd.pre_exec(move || {
                    let rl = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        Ok(Self {
            child: spawn_tied_to_process(cmd)?,
            log: log.to_path_buf(),
        })
    }

    /// The operator as a Deployment's container runs it: exactly the container's `args`
    /// (`run` included, as the API server holds them), with the pod's `POD_NAME` and
    /// `POD_NAMESPACE`. What a pod has and a process beside others does not is given here:
    /// a kubeconfig instead of the in-cluster one, and any free loopback port for the
    /// listening addresses (each pod has its own network namespace; these processes share
    /// the host's).
    pub fn start_deployed(
        bin: &Path,
        kubeconfig: &Path,
        args: &[String],
        pod: (&str, &str),
        log: &Path,
    ) -> anyhow::Result<Self> {
        const LISTENERS: [&str; 3] = [
            "--metrics-bind-address=",
            "--health-probe-bind-address=",
            "--metrics-addr=",
        ];
        let file = std::fs::File::create(log)?;
        let mut cmd = Command::new(bin);
        for arg in args {
            match LISTENERS.iter().find(|l| arg.starts_with(*l)) {
                Some(flag) => cmd.arg(format!("{flag}127.0.0.1:0")),
                None => cmd.arg(arg),
            };
        }
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .env("POD_NAME", pod.0)
            .env("POD_NAMESPACE", pod.1)
            .env("RUST_LOG", "info,kube=warn")
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        Ok(Self {
            child: spawn_tied_to_process(cmd)?,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM, as the kubelet does when a pod is deleted.
    pub fn terminate(&self) {
        // SAFETY: signalling a child this kit started and has not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    /// Waits up to `limit` for the process to exit; its status, or None if still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process at once, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}
