//! `make demo`: the chart installed for real on a local node — the operator's two replicas
//! run from the image built here — labelling three Vault simulator pods and routing the
//! active Service; a failover inside Vault, then the leading replica's pod deleted.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vault_registrar_testkit::cluster::wait_endpoints;
use vault_registrar_testkit::node::NodePlane;
use vault_registrar_testkit::release::{self, NAMESPACE};
use vault_registrar_testkit::stage::run;
use vault_registrar_testkit::wait;

const LIMIT: Duration = Duration::from_secs(60);
const VAULT_NS: &str = "vault";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bin = PathBuf::from(
        std::env::var_os("VAULT_REGISTRAR_BIN")
            .ok_or_else(|| anyhow::anyhow!("VAULT_REGISTRAR_BIN must name the operator binary"))?,
    );
    println!(
        "== a node: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd,"
    );
    println!(
        "   kubelet, bridge CNI, kube-proxy (nftables); the operator's image built with buildah"
    );
    let t = Instant::now();
    let node = tokio::task::spawn_blocking(move || NodePlane::start(&bin)).await??;
    println!(
        "node Ready {:?} after the kubelet started ({:?} in all)",
        node.ready_after,
        t.elapsed()
    );
    println!("kubeconfig: {}", node.plane.kubeconfig.display());
    let client = node.plane.client().await?;
    let kubectl = |args: &[&str]| run(node.plane.kubectl().args(args));

    println!(
        "\n== helm install vault-registrar charts/vault-registrar -n vault-registrar --create-namespace"
    );
    println!(
        "   --set image.repository=localhost/vault-registrar,image.tag=test,image.pullPolicy=Never --wait"
    );
    release::install_chart(&node).await?;
    let leader = wait::until("a Lease holder", LIMIT, || release::leader(&client)).await?;
    print!(
        "{}",
        kubectl(&["get", "pods", "-n", NAMESPACE, "-o", "wide"])?
    );
    println!("Lease {NAMESPACE}/vault-registrar held by {leader}");

    println!("\n== three Vault simulator pods (one active) and a VaultCluster selecting them");
    let ips =
        release::start_vault(&node, &client, VAULT_NS, &["active", "standby", "standby"]).await?;
    wait_endpoints(&client, VAULT_NS, "vault-active", &ips[..1], LIMIT).await?;
    show(&kubectl)?;

    println!("\n== failover inside Vault: vault-0 steps down, vault-1 becomes active");
    let t = Instant::now();
    release::set_role(&ips[0], "standby").await?;
    release::set_role(&ips[1], "active").await?;
    wait_endpoints(&client, VAULT_NS, "vault-active", &ips[1..2], LIMIT).await?;
    println!("the active Service moved after {:?}", t.elapsed());
    show(&kubectl)?;

    println!("\n== kubectl delete pod {leader} (the leading replica)");
    let (next, took) = release::delete_leader(&client, &leader).await?;
    println!("{next} leads after {took:?}");
    print!(
        "{}",
        kubectl(&["get", "pods", "-n", NAMESPACE, "-o", "wide"])?
    );

    println!("\n== done; tearing the node down");
    let diffs = tokio::task::spawn_blocking(move || node.stop()).await?;
    anyhow::ensure!(
        diffs.is_empty(),
        "the machine differs after teardown: {diffs:?}"
    );
    println!("machine restored (links, mounts, cgroups, kernel parameters)");
    Ok(())
}

fn show(kubectl: &dyn Fn(&[&str]) -> anyhow::Result<String>) -> anyhow::Result<()> {
    print!(
        "{}",
        kubectl(&[
            "get",
            "pods",
            "-n",
            VAULT_NS,
            "-o",
            "wide",
            "-L",
            "vault-active,vault-sealed,vault-version"
        ])?
    );
    print!("{}", kubectl(&["get", "endpointslices", "-n", VAULT_NS])?);
    // What users read: the VaultCluster, wide, and its conditions.
    print!(
        "{}",
        kubectl(&["get", "vaultcluster", "-n", VAULT_NS, "-o", "wide"])?
    );
    print!(
        "{}",
        kubectl(&[
            "get",
            "vaultcluster",
            "-n",
            VAULT_NS,
            "-o",
            release::CONDITIONS
        ])?
    );
    Ok(())
}
