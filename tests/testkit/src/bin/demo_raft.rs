//! `make demo-raft`: the operator at work on a local control plane over a real Vault raft cluster
//! (three Vault 1.21.4 processes, one per pod): init, unseal, the labels, a step-down and a
//! kill of the active node, then cleaning up.

use std::time::Duration;

use vault_registrar_testkit::cluster::wait_endpoints;
use vault_registrar_testkit::real_vault::RaftCluster;
use vault_registrar_testkit::stage::Stage;

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!(
        "== starting etcd, kube-apiserver and kube-controller-manager; helm install of the chart (CRD,"
    );
    println!(
        "   ServiceAccount, RBAC); the operator with that ServiceAccount's token and leader election;"
    );
    println!("   a VaultCluster probing every second");
    let stage = Stage::start("demo", &[], "1s").await?;
    println!("kubeconfig: {}", stage.plane.kubeconfig.display());

    println!(
        "\n== three real Vault servers (raft storage, retry_join), one per pod; not initialised"
    );
    let mut vault = RaftCluster::launch(&stage.client, "demo", "vault", 3).await?;
    labelled(&vault, "vault-initialized", &["false"; 3]).await?;
    show(&stage, "before init")?;

    println!("\n== vault operator init -key-shares=1 -key-threshold=1 on vault-0; unseal vault-0");
    vault.init().await?;
    vault.unseal(0).await?;
    vault.wait_code(0, 200, LIMIT).await?;
    wait_active(&stage, &vault, 0).await?;
    show(&stage, "vault-0 active, the others not yet joined")?;

    println!("\n== unseal vault-1 and vault-2 (they join over raft and become standbys)");
    for i in 1..3 {
        vault.unseal(i).await?;
    }
    for i in 1..3 {
        vault.wait_code(i, 429, LIMIT).await?;
    }
    vault.wait_voters(3, LIMIT).await?;
    labelled(&vault, "vault-sealed", &["false"; 3]).await?;
    show(&stage, "all unsealed")?;

    println!("\n== vault operator step-down on vault-0");
    vault.step_down(0).await?;
    let b = next_active(&stage, &vault, 0).await?;
    show(
        &stage,
        &format!("after the step-down: {} active", vault.pod_name(b)),
    )?;

    println!(
        "\n== SIGKILL of the active {} (as an OOM kill); raft elects another",
        vault.pod_name(b)
    );
    vault.kill(b);
    let c = next_active(&stage, &vault, b).await?;
    let mut sealed = ["false"; 3];
    sealed[b] = "true";
    labelled(&vault, "vault-sealed", &sealed).await?;
    show(
        &stage,
        &format!("after the kill: {} active", vault.pod_name(c)),
    )?;
    println!(
        "\n{}",
        stage.kubectl(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.kind=VaultCluster",
            "-o",
            "custom-columns=REASON:.reason,MESSAGE:.message"
        ])?
    );
    println!("== done; stopping everything");
    Ok(())
}

/// Waits for the node Vault makes active after `old`, and for the operator to route to it.
async fn next_active(stage: &Stage, vault: &RaftCluster, old: usize) -> anyhow::Result<usize> {
    let start = std::time::Instant::now();
    let now = loop {
        match vault.wait_active(LIMIT).await? {
            i if i != old => break i,
            _ => anyhow::ensure!(start.elapsed() < LIMIT, "no new active node"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    wait_active(stage, vault, now).await?;
    Ok(now)
}

async fn wait_active(stage: &Stage, vault: &RaftCluster, i: usize) -> anyhow::Result<()> {
    wait_endpoints(&stage.client, "demo", "vault-active", &[vault.ip(i)], LIMIT).await
}

/// Waits until label `key` on pod `vault-i` is `want[i]`.
async fn labelled(vault: &RaftCluster, key: &str, want: &[&str]) -> anyhow::Result<()> {
    vault_registrar_testkit::wait::until(&format!("{key} = {want:?}"), LIMIT, || async {
        for (i, w) in want.iter().enumerate() {
            if vault.labels(i).await?.get(key).map(String::as_str) != Some(*w) {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
}

fn show(stage: &Stage, title: &str) -> anyhow::Result<()> {
    println!("-- {title}");
    print!("{}", stage.kubectl(&["get", "vaultcluster", "-o", "wide"])?);
    print!(
        "{}",
        stage.kubectl(&[
            "get",
            "vaultcluster",
            "-o",
            "jsonpath={range .items[*].status.conditions[*]}{.type}={.status} {.reason}: {.message}{\"\\n\"}{end}",
        ])?
    );
    print!(
        "{}",
        stage.kubectl(&[
            "get",
            "pods",
            "-o",
            "wide",
            "-L",
            "vault-active,vault-sealed,vault-initialized,vault-version"
        ])?
    );
    for service in ["vault-active", "vault-standby"] {
        let eps = stage.kubectl(&[
            "get",
            "endpointslices",
            "-l",
            &format!("kubernetes.io/service-name={service}"),
            "-o",
            "jsonpath={.items[*].endpoints[*].addresses[*]}",
        ])?;
        println!("{service} endpoints: {eps}");
    }
    Ok(())
}
