//! `helm upgrade` keeps the CRD current: a release of a chart whose CRD lacks a field is
//! upgraded to this chart, and the API server then accepts the field. Its own test binary,
//! so its own control plane: here Helm owns the CRD, where the other tests apply it with
//! kubectl.

mod chart;

use std::path::Path;
use std::time::Duration;

use chart::{chart, helm, kubectl, values};
use serde_yaml::Value;

use vault_registrar_testkit::{shared, wait};

/// Copies a directory tree.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// This chart as an older release would have it: version 0.1.9, and a CRD whose health
/// section does not know activeInterval.
fn older_chart(dir: &Path) -> anyhow::Result<()> {
    copy_tree(&chart(), dir)?;
    let chart_yaml = dir.join("Chart.yaml");
    let text = std::fs::read_to_string(&chart_yaml)?;
    let version = text
        .lines()
        .find(|l| l.starts_with("version: "))
        .expect("Chart.yaml has a version");
    std::fs::write(&chart_yaml, text.replace(version, "version: 0.1.9"))?;
    let mut crd: Value = serde_yaml::from_str(&vault_registrar::crd_yaml())?;
    let health = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["health"];
    let removed = health["properties"]
        .as_mapping_mut()
        .and_then(|p| p.remove("activeInterval"));
    assert!(removed.is_some(), "the CRD has activeInterval to take away");
    health["default"]
        .as_mapping_mut()
        .and_then(|d| d.remove("activeInterval"));
    let old = serde_yaml::to_string(&crd)?;
    std::fs::write(
        dir.join("templates/crd.yaml"),
        vault_registrar::crd_chart_template(&old),
    )?;
    Ok(())
}

async fn established() -> anyhow::Result<String> {
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/vaultclusters.vault-registrar.dev",
        "--timeout=60s",
    ])
    .await
}

const VAULT_CLUSTER: &str = "apiVersion: vault-registrar.dev/v1alpha1
kind: VaultCluster
metadata: {name: vault, namespace: upgrade-apps}
spec:
  selector: {matchLabels: {app.kubernetes.io/name: vault}}
  health: {activeInterval: 300ms}
";

#[tokio::test]
async fn upgrade_updates_the_crd_and_keeps_it_on_uninstall() -> anyhow::Result<()> {
    let plane = shared();
    let old = plane.dir().join("chart-0.1.9");
    older_chart(&old)?;
    let manifest = plane.dir().join("vault-cluster.yaml");
    std::fs::write(&manifest, VAULT_CLUSTER)?;
    let manifest = manifest.to_str().unwrap();
    kubectl(&["create", "namespace", "upgrade-apps"]).await?;

    let mut install = vec![
        "install",
        "vr",
        old.to_str().unwrap(),
        "-n",
        "upgrade-ops",
        "--create-namespace",
    ];
    install.extend(values("defaults"));
    helm(&install).await?;
    established().await?;
    let refused = kubectl(&["apply", "--validate=strict", "-f", manifest])
        .await
        .expect_err("the old schema has no activeInterval");
    assert!(refused.to_string().contains("activeInterval"), "{refused}");

    let current = chart();
    let mut upgrade = vec![
        "upgrade",
        "vr",
        current.to_str().unwrap(),
        "-n",
        "upgrade-ops",
    ];
    upgrade.extend(values("defaults"));
    helm(&upgrade).await?;
    // The API server takes the new schema in within moments of the update.
    wait::until(
        "the new field accepted",
        Duration::from_secs(30),
        || async {
            Ok(kubectl(&["apply", "--validate=strict", "-f", manifest])
                .await
                .ok())
        },
    )
    .await?;
    let stored = kubectl(&[
        "get",
        "vc",
        "vault",
        "-n",
        "upgrade-apps",
        "-o",
        "jsonpath={.spec.health.activeInterval}",
    ])
    .await?;
    assert_eq!(stored, "300ms", "the upgraded CRD keeps the new field");

    helm(&["uninstall", "vr", "-n", "upgrade-ops"]).await?;
    let policy = kubectl(&[
        "get",
        "crd",
        "vaultclusters.vault-registrar.dev",
        "-o",
        "jsonpath={.metadata.annotations.helm\\.sh/resource-policy}",
    ])
    .await?;
    assert_eq!(policy, "keep");
    let left = kubectl(&["get", "vc", "-n", "upgrade-apps", "-o", "name"]).await?;
    assert_eq!(
        left.trim(),
        "vaultcluster.vault-registrar.dev/vault",
        "the VaultCluster survives"
    );
    Ok(())
}
