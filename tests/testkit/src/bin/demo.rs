//! `make demo`: the operator at work on a local control plane, acting out a failover and a
//! crash of the active Vault pod, then cleaning up.

use std::time::Duration;

use vault_registrar_testkit::cluster::wait_endpoints;
use vault_registrar_testkit::stage::Stage;
use vault_registrar_testkit::vault_sim::{Behavior, Role};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!(
        "== starting etcd, kube-apiserver and kube-controller-manager; helm install of the chart (CRD,"
    );
    println!(
        "   ServiceAccount, RBAC); the operator with that ServiceAccount's token and leader election;"
    );
    println!("   a VaultCluster over three simulated Vault pods");
    let stage = Stage::start("demo", &[Role::Active, Role::Standby, Role::Standby], "1s").await?;
    println!("kubeconfig: {}", stage.plane.kubeconfig.display());
    stage.wait_ready().await?;
    show(&stage, "converged")?;
    let lease = [
        "get",
        "lease",
        "vault-registrar",
        "-o",
        "custom-columns=LEASE:.metadata.name,HOLDER:.spec.holderIdentity",
    ];
    print!("{}", stage.kubectl_in("vault-registrar", &lease)?);

    println!("\n== failover: vault-0 steps down, vault-1 becomes active");
    stage.vault.sim(0).update(|s| s.role = Role::Standby).await;
    stage.vault.sim(1).update(|s| s.role = Role::Active).await;
    wait_endpoints(
        &stage.client,
        "demo",
        "vault-active",
        &[stage.vault.ip(1)],
        LIMIT,
    )
    .await?;
    show(&stage, "after failover")?;

    println!(
        "\n== crash: the active vault-1 stops answering (as after an OOM kill), vault-2 takes over"
    );
    stage
        .vault
        .sim(1)
        .update(|s| s.behavior = Behavior::Crash)
        .await;
    stage.vault.sim(2).update(|s| s.role = Role::Active).await;
    wait_endpoints(
        &stage.client,
        "demo",
        "vault-active",
        &[stage.vault.ip(2)],
        LIMIT,
    )
    .await?;
    stage
        .vault
        .wait_labels(
            "vault-sealed",
            &[Some("false"), Some("true"), Some("false")],
            LIMIT,
        )
        .await?;
    show(&stage, "after the crash")?;
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

fn show(stage: &Stage, title: &str) -> anyhow::Result<()> {
    println!("-- {title}");
    print!("{}", stage.kubectl(&["get", "vc"])?);
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
    let eps = stage.kubectl(&[
        "get",
        "endpointslices",
        "-l",
        "kubernetes.io/service-name=vault-active",
        "-o",
        "jsonpath={.items[*].endpoints[*].addresses[*]}",
    ])?;
    println!("vault-active endpoints: {eps}");
    Ok(())
}
