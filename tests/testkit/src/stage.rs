//! The stage the demo and the benchmark share: a control plane, the CRD, the operator
//! binary, and a VaultCluster over simulated Vault pods.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cluster::{Operator, SimCluster};
use crate::controlplane::ControlPlane;
use crate::pods::create_namespace;
use crate::vault_sim::Role;

pub struct Stage {
    pub plane: ControlPlane,
    pub client: kube::Client,
    pub namespace: String,
    pub vault: SimCluster,
    pub operator: Operator,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl Stage {
    /// `interval` is the VaultCluster's probe interval, e.g. "1s".
    pub async fn start(namespace: &str, roles: &[Role], interval: &str) -> anyhow::Result<Self> {
        let plane = ControlPlane::start()?;
        let client = plane.client().await?;
        // Installed as a user would: the chart brings the CRD, the ServiceAccount and RBAC.
        create_namespace(&client, OPERATOR_NAMESPACE).await?;
        let chart = repo_root().join("charts/vault-registrar");
        run(plane
            .helm()
            .args(["install", "vault-registrar"])
            .arg(&chart)
            .args(["-n", OPERATOR_NAMESPACE]))?;
        run(plane.kubectl().args([
            "wait",
            "--for=condition=Established",
            "crd/vaultclusters.vault-registrar.dev",
        ]))?;
        create_namespace(&client, namespace).await?;
        let vault = SimCluster::start(&client, namespace, "vault", roles, None).await?;
        let log = plane.dir().join("operator.log");
        let operator = start_operator_as_chart_account(&plane, namespace, true, &log)?;
        let timeout = if interval.ends_with("ms") {
            "100ms"
        } else {
            "500ms"
        };
        let vc = format!(
            "apiVersion: vault-registrar.dev/v1alpha1\nkind: VaultCluster\nmetadata: {{name: vault, namespace: {namespace}}}\nspec:\n  selector: {{matchLabels: {{app.kubernetes.io/name: vault}}}}\n  health: {{interval: {interval}, timeout: {timeout}}}\n"
        );
        let file = plane.dir().join("vaultcluster.yaml");
        std::fs::write(&file, vc)?;
        run(plane.kubectl().args(["apply", "-f"]).arg(&file))?;
        Ok(Self {
            plane,
            client,
            namespace: namespace.into(),
            vault,
            operator,
        })
    }

    /// Output of a kubectl command in the stage's namespace.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.kubectl_in(&self.namespace, args)
    }

    pub fn kubectl_in(&self, namespace: &str, args: &[&str]) -> anyhow::Result<String> {
        run(self.plane.kubectl().args(args).args(["-n", namespace]))
    }

    /// Another namespace on the stage's plane, watched by an operator of its own (the
    /// chart's ServiceAccount, `--namespace`, no election), with VaultCluster `vault` probing
    /// at `interval`. The pods are the caller's to create.
    pub async fn watched_namespace(
        &self,
        namespace: &str,
        interval: &str,
    ) -> anyhow::Result<Operator> {
        create_namespace(&self.client, namespace).await?;
        let log = self.plane.dir().join(format!("operator-{namespace}.log"));
        let operator = start_operator_as_chart_account(&self.plane, namespace, false, &log)?;
        let vc = format!(
            "apiVersion: vault-registrar.dev/v1alpha1\nkind: VaultCluster\nmetadata: {{name: vault, namespace: {namespace}}}\nspec:\n  selector: {{matchLabels: {{app.kubernetes.io/name: vault}}}}\n  health: {{interval: {interval}, timeout: 1s}}\n"
        );
        let file = self
            .plane
            .dir()
            .join(format!("vaultcluster-{namespace}.yaml"));
        std::fs::write(&file, vc)?;
        run(self.plane.kubectl().args(["apply", "-f"]).arg(&file))?;
        Ok(operator)
    }

    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let mut cmd = self.plane.kubectl();
        cmd.args([
            "wait",
            "--for=condition=Ready",
            "vc/vault",
            "-n",
            &self.namespace,
            "--timeout=60s",
        ]);
        tokio::task::spawn_blocking(move || run(&mut cmd)).await??;
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }
}

/// Where the chart is installed; its ServiceAccount, Role and Lease live here.
pub const OPERATOR_NAMESPACE: &str = "vault-registrar";

/// The operator binary, run with a token of the chart's ServiceAccount and the chart's
/// leader-election settings, as the chart's Deployment would run it.
/// The operator with the chart's ServiceAccount token, as the admission policies expect of
/// whoever writes the labels, watching `namespace`; with leader election on the chart's
/// Lease when `elect`.
fn start_operator_as_chart_account(
    plane: &ControlPlane,
    namespace: &str,
    elect: bool,
    log: &Path,
) -> anyhow::Result<Operator> {
    let token = run(plane.kubectl().args([
        "create",
        "token",
        "vault-registrar",
        "-n",
        OPERATOR_NAMESPACE,
    ]))?;
    let kubeconfig = plane.token_kubeconfig("vault-registrar", token.trim())?;
    let bin = operator_bin();
    let lease_namespace = format!("--lease-namespace={OPERATOR_NAMESPACE}");
    let election = [
        "--leader-elect",
        "--lease-name=vault-registrar",
        &lease_namespace,
    ];
    let mut args = vec!["--namespace", namespace];
    if elect {
        args.extend(election);
    }
    Operator::start(&bin, &kubeconfig, &args, log)
}

/// The operator binary: `VAULT_REGISTRAR_BIN` (the Makefile sets it), else the debug build.
fn operator_bin() -> PathBuf {
    std::env::var_os("VAULT_REGISTRAR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug/vault-registrar"))
}

/// Runs a command off the async runtime, whose Vault simulators must keep answering.
pub async fn run_blocking(mut cmd: std::process::Command) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || run(&mut cmd)).await?
}

/// Applies a CRD file and waits until the API server serves it.
pub async fn install_crd(plane: &ControlPlane, path: &std::path::Path) -> anyhow::Result<()> {
    let mut apply = plane.kubectl();
    apply.args(["apply", "--server-side", "-f"]).arg(path);
    run_blocking(apply).await?;
    let mut wait = plane.kubectl();
    wait.args(["wait", "--for=condition=Established", "--timeout=60s", "-f"])
        .arg(path);
    run_blocking(wait).await.map(|_| ())
}

pub fn run(cmd: &mut std::process::Command) -> anyhow::Result<String> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
