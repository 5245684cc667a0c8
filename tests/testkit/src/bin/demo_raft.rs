//! `make demo-raft`: real Vault as users run it, on a local node — a raft StatefulSet of
//! three Vault pods in the official chart's layout (`vault_pods`), the operator installed
//! from its chart — through init and unseal, a step-down, the active pod deleted, and an
//! upgrade by role (`spec.upgrade`), showing what users read with kubectl after each.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use vault_registrar_testkit::cluster::wait_endpoints;
use vault_registrar_testkit::node::NodePlane;
use vault_registrar_testkit::real_vault::vault_binary;
use vault_registrar_testkit::release::{self, apply};
use vault_registrar_testkit::stage::run;
use vault_registrar_testkit::vault_pods::{self, VaultPods, vault_cluster};
use vault_registrar_testkit::wait;

const NS: &str = "vault";
const LIMIT: Duration = Duration::from_secs(90);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bin = PathBuf::from(
        std::env::var_os("VAULT_REGISTRAR_BIN")
            .ok_or_else(|| anyhow::anyhow!("VAULT_REGISTRAR_BIN must name the operator binary"))?,
    );
    let vault_bin = vault_binary()?;
    println!("== a node (kubelet, containerd, bridge CNI, kube-proxy) beside the control plane;");
    println!("   the operator's and Vault's images built with buildah from the binaries here");
    let t = Instant::now();
    let node = tokio::task::spawn_blocking(move || {
        let node = NodePlane::start(&bin)?;
        vault_pods::import_image(&node, &vault_bin)?;
        Ok::<_, anyhow::Error>(node)
    })
    .await??;
    println!(
        "ready after {:?}; kubeconfig: {}",
        t.elapsed(),
        node.plane.kubeconfig.display()
    );
    let client = node.plane.client().await?;
    let kubectl = |args: &[&str]| run(node.plane.kubectl().args(args));

    println!(
        "\n== helm install vault-registrar charts/vault-registrar -n vault-registrar --create-namespace --wait"
    );
    release::install_chart(&node).await?;

    println!(
        "\n== Vault: a StatefulSet of 3 raft pods (OnDelete), and a VaultCluster with spec.upgrade"
    );
    let mut vault = VaultPods::deploy(&node, &client, NS).await?;
    let upgrade = "upgrade: {strategy: RoleOrdered, maxUnavailable: 1}";
    apply(&node, &vault_cluster(NS, upgrade)).await?;
    println!("{}", kubectl(&["get", "statefulset,svc", "-n", NS])?);

    println!(
        "== PUT /v1/sys/init on vault-0; PUT /v1/sys/unseal on each pod (they join by auto_join)"
    );
    vault.bootstrap().await?;
    let active = routed(&client, &vault, None).await?;
    show(&kubectl, &format!("{active} active"))?;

    println!("\n== vault operator step-down (PUT /v1/sys/step-down) on {active}");
    vault.step_down(&active).await?;
    let next = routed(&client, &vault, Some(&active)).await?;
    show(&kubectl, &format!("after the step-down: {next} active"))?;

    println!(
        "\n== kubectl delete pod {next} (the active one); its replacement starts empty and is unsealed"
    );
    let t = Instant::now();
    Api::<Pod>::namespaced(client.clone(), NS)
        .delete(&next, &DeleteParams::default())
        .await?;
    let after = routed(&client, &vault, Some(&next)).await?;
    println!(
        "{after} active and routed {:?} after the delete",
        t.elapsed()
    );
    vault
        .wait_health(&next, "back, not yet unsealed", |(c, _)| {
            matches!(c, 501 | 503)
        })
        .await?;
    vault.unseal(&next).await?;
    vault.wait_voters().await?;
    unsealed_labels(&client).await?;
    show(&kubectl, "the replacement unsealed")?;

    println!(
        "\n== a new pod-template revision (an annotation); the operator replaces the pods by role"
    );
    vault.new_revision("2").await?;
    let t = Instant::now();
    let order = vault.unseal_each_replacement().await?;
    println!(
        "Upgrading=False UpToDate {:?} after the change; each replacement waited, named, until unsealed: {order:?}",
        t.elapsed()
    );
    vault.wait_voters().await?;
    routed(&client, &vault, None).await?;
    unsealed_labels(&client).await?;
    show(&kubectl, "after the upgrade")?;
    println!(
        "{}",
        kubectl(&[
            "get",
            "events",
            "-n",
            NS,
            "--field-selector",
            "involvedObject.kind=VaultCluster",
            "-o",
            "custom-columns=REASON:.reason,MESSAGE:.message",
        ])?
    );

    println!("== done; tearing the node down");
    let diffs = tokio::task::spawn_blocking(move || node.stop()).await?;
    println!("left on the machine: {diffs:?}");
    Ok(())
}

/// Waits for Vault's active pod (not `not`) and for the active Service to hold it alone.
async fn routed(
    client: &kube::Client,
    vault: &VaultPods,
    not: Option<&str>,
) -> anyhow::Result<String> {
    let active = vault.wait_active(not).await?;
    let ip = vault
        .ip(&active)
        .await?
        .ok_or_else(|| anyhow::anyhow!("{active} has no address"))?;
    wait_endpoints(client, NS, "vault-active", &[ip.to_string()], LIMIT).await?;
    Ok(active)
}

/// Waits until the operator labels all three pods unsealed.
async fn unsealed_labels(client: &kube::Client) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let params = kube::api::ListParams::default().labels("vault-sealed=false");
    wait::until("three pods labelled unsealed", LIMIT, || async {
        let list = pods.list(&params).await?;
        Ok((list.items.len() == vault_pods::REPLICAS).then_some(()))
    })
    .await
}

fn show(kubectl: &dyn Fn(&[&str]) -> anyhow::Result<String>, title: &str) -> anyhow::Result<()> {
    println!("-- {title}");
    print!(
        "{}",
        kubectl(&[
            "get",
            "pods",
            "-n",
            NS,
            "-o",
            "wide",
            "-L",
            "vault-active,vault-sealed,vault-initialized,controller-revision-hash",
        ])?
    );
    print!(
        "{}",
        kubectl(&["get", "vaultcluster", "-n", NS, "-o", "wide"])?
    );
    print!(
        "{}",
        kubectl(&["get", "vaultcluster", "-n", NS, "-o", release::CONDITIONS])?
    );
    Ok(())
}
