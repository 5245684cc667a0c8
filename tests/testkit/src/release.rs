//! The chart installed on a node plane as README says, with the image built here, and
//! Vault simulator pods running as real pods beside it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tokio::io::AsyncWriteExt;

use crate::election::{http_get_at, lease_holder, metric};
use crate::image::SIM_IMAGE;
use crate::node::NodePlane;
use crate::stage::run_blocking;

/// README's release name and namespace; the chart names the Lease after the release.
pub const RELEASE: &str = "vault-registrar";
pub const NAMESPACE: &str = "vault-registrar";
pub const METRICS_PORT: u16 = 8080;
pub const HEALTH_PORT: u16 = 8081;
pub const VAULT_PORT: u16 = 8200;
/// The simulator's port for switching its role.
pub const CONTROL_PORT: u16 = 8201;

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../charts/vault-registrar")
}

/// The values that point the chart at the image built here (`crate::image`); listed with
/// the value sets tests/ops.rs lints.
pub const LOCAL_IMAGE_VALUES: [&str; 2] = [
    "--set",
    "image.repository=localhost/vault-registrar,image.tag=test,image.pullPolicy=Never",
];

/// The local image, with the test-only fault armed: SIGUSR1 stalls a replica's control
/// loops while its probe server keeps answering (`vault_registrar::fault`).
pub const STALL_FAULT_VALUES: [&str; 4] = [
    "--set",
    "image.repository=localhost/vault-registrar,image.tag=test,image.pullPolicy=Never",
    "--set",
    "extraArgs={--fault-stall-on-sigusr1}",
];

/// `helm install vault-registrar charts/vault-registrar -n vault-registrar --create-namespace`
/// with the local image (`imagePullPolicy: Never`), waiting until the Deployment is ready.
pub async fn install_chart(node: &NodePlane) -> anyhow::Result<String> {
    install_chart_with(node, &LOCAL_IMAGE_VALUES).await
}

/// The same install with other values (one of the linted sets in tests/chart/mod.rs).
pub async fn install_chart_with(node: &NodePlane, values: &[&str]) -> anyhow::Result<String> {
    let mut cmd = node.plane.helm();
    cmd.args(["install", RELEASE])
        .arg(chart())
        .args(["-n", NAMESPACE, "--create-namespace"])
        .args(values)
        .args(["--wait", "--timeout", "120s"]);
    run_blocking(cmd).await
}

/// An operator replica as its pod shows it.
#[derive(Clone, Debug)]
pub struct Replica {
    pub name: String,
    pub ip: String,
    pub ready: bool,
    pub restarts: i32,
    /// `containerd://<id>` of the operator's container.
    pub container_id: String,
    pub deleting: bool,
}

/// The operator's pods, by name.
pub async fn replicas(client: &kube::Client) -> anyhow::Result<Vec<Replica>> {
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/name=vault-registrar,app.kubernetes.io/instance={RELEASE}"
        )))
        .await?;
    let mut out: Vec<Replica> = pods.items.iter().map(replica).collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn replica(pod: &Pod) -> Replica {
    let status = pod.status.clone().unwrap_or_default();
    let container = status
        .container_statuses
        .as_ref()
        .and_then(|c| c.first().cloned());
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    Replica {
        name: pod.metadata.name.clone().unwrap_or_default(),
        ip: status.pod_ip.unwrap_or_default(),
        ready,
        restarts: container.as_ref().map_or(0, |c| c.restart_count),
        container_id: container.and_then(|c| c.container_id).unwrap_or_default(),
        deleting: pod.metadata.deletion_timestamp.is_some(),
    }
}

/// `kubectl get vaultcluster -o` this: each condition on a line, `type=status reason: message`.
pub const CONDITIONS: &str = "jsonpath={range .items[*].status.conditions[*]}{.type}={.status} {.reason}: {.message}{\"\\n\"}{end}";

/// Who holds the release's Lease.
pub async fn leader(client: &kube::Client) -> anyhow::Result<Option<String>> {
    lease_holder(client, NAMESPACE, RELEASE).await
}

/// The replica's `vault_registrar_leader` gauge, read from its pod's metrics port.
pub async fn leader_gauge(ip: &str) -> anyhow::Result<Option<f64>> {
    let addr: SocketAddr = format!("{ip}:{METRICS_PORT}").parse()?;
    let (_, body) = http_get_at(addr, "/metrics", Duration::from_secs(2)).await?;
    Ok(metric(&body, "vault_registrar_leader"))
}

/// The answer of the replica's readiness endpoint.
pub async fn readiness(ip: &str) -> anyhow::Result<(u16, String)> {
    let addr: SocketAddr = format!("{ip}:{HEALTH_PORT}").parse()?;
    http_get_at(addr, "/readyz", Duration::from_secs(2)).await
}

/// Pods `vault-0`, `vault-1`, ... in `namespace` running the simulator image with the
/// official Vault chart's label, one per role (active, standby, ...).
pub fn vault_pods_yaml(namespace: &str, roles: &[&str]) -> String {
    roles
        .iter()
        .enumerate()
        .map(|(i, role)| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: vault-{i}\n  namespace: {namespace}\n  labels: {{app.kubernetes.io/name: vault}}\nspec:\n  containers:\n  - name: vault\n    image: {SIM_IMAGE}\n    imagePullPolicy: Never\n    args: [--role, {role}, --port, '{VAULT_PORT}', --control-port, '{CONTROL_PORT}']\n    ports: [{{containerPort: {VAULT_PORT}, name: http}}]\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// A VaultCluster over the simulator pods, probing every `interval`.
pub fn vault_cluster_yaml(namespace: &str, interval: &str) -> String {
    format!(
        "apiVersion: vault-registrar.dev/v1alpha1\nkind: VaultCluster\nmetadata: {{name: vault, namespace: {namespace}}}\nspec:\n  selector: {{matchLabels: {{app.kubernetes.io/name: vault}}}}\n  health: {{interval: {interval}, timeout: 500ms}}\n"
    )
}

/// Switches a simulator pod's role through its control port.
pub async fn set_role(ip: &str, role: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = format!("{ip}:{CONTROL_PORT}").parse()?;
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(format!("PUT /role/{role} HTTP/1.1\r\nHost: sim\r\n\r\n").as_bytes())
        .await?;
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut conn, &mut answer).await?;
    anyhow::ensure!(
        answer.starts_with("HTTP/1.1 204"),
        "setting role {role} on {ip}: {answer}"
    );
    Ok(())
}

/// `kubectl apply -f -` of `yaml` on the node plane.
pub async fn apply(node: &NodePlane, yaml: &str) -> anyhow::Result<()> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let file = node.dir().join(format!("apply-{n}.yaml"));
    std::fs::write(&file, yaml)?;
    let mut cmd = node.plane.kubectl();
    cmd.args(["apply", "-f"]).arg(&file);
    run_blocking(cmd).await.map(|_| ())
}

/// The addresses of simulator pods `vault-0` .. `vault-{n-1}`, once they all have one.
pub async fn vault_pod_ips(
    client: &kube::Client,
    namespace: &str,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    crate::wait::until(
        "simulator pods with addresses",
        Duration::from_secs(60),
        || async {
            let mut ips = Vec::new();
            for i in 0..n {
                match pods
                    .get(&format!("vault-{i}"))
                    .await?
                    .status
                    .and_then(|s| s.pod_ip)
                {
                    Some(ip) => ips.push(ip),
                    None => return Ok(None),
                }
            }
            Ok(Some(ips))
        },
    )
    .await
}

/// Namespace `namespace` with simulator pods in `roles` and a VaultCluster probing them every
/// second; their addresses once they have them.
pub async fn start_vault(
    node: &NodePlane,
    client: &kube::Client,
    namespace: &str,
    roles: &[&str],
) -> anyhow::Result<Vec<String>> {
    apply(
        node,
        &format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}}}\n"),
    )
    .await?;
    apply(node, &vault_pods_yaml(namespace, roles)).await?;
    apply(node, &vault_cluster_yaml(namespace, "1s")).await?;
    vault_pod_ips(client, namespace, roles.len()).await
}

/// Deletes the leading replica's pod (`holder`) and waits for another to hold the Lease:
/// who, and how long after the delete.
pub async fn delete_leader(
    client: &kube::Client,
    holder: &str,
) -> anyhow::Result<(String, std::time::Duration)> {
    let t = std::time::Instant::now();
    Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .delete(holder, &kube::api::DeleteParams::default())
        .await?;
    let next = crate::wait::until("another Lease holder", Duration::from_secs(60), || async {
        Ok(leader(client).await?.filter(|h| h != holder))
    })
    .await?;
    Ok((next, t.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{OPERATOR_REPOSITORY, TAG};

    #[test]
    fn the_local_image_values_name_the_image_built_here() {
        let set = LOCAL_IMAGE_VALUES[1];
        assert!(
            set.contains(&format!("image.repository={OPERATOR_REPOSITORY},")),
            "{set}"
        );
        assert!(set.contains(&format!("image.tag={TAG},")), "{set}");
        assert!(set.ends_with("image.pullPolicy=Never"), "{set}");
    }
}
