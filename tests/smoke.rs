//! Smoke tests proving that the local control plane is the real thing: each would fail
//! against a fake API server or a missing controller manager.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use serde_json::json;
use vault_registrar_testkit::cluster::wait_endpoints;
use vault_registrar_testkit::pods::{
    SimPod, create_namespace, next_pod_ip, set_running, start_pod,
};
use vault_registrar_testkit::{shared, wait};

const LIMIT: Duration = Duration::from_secs(60);

async fn namespace(name: &str) -> anyhow::Result<(kube::Client, String)> {
    let client = shared().client().await?;
    let ns = format!("smoke-{name}");
    create_namespace(&client, &ns).await?;
    Ok((client, ns))
}

/// The Kubernetes release the plane must run: the one `VAULT_REGISTRAR_KUBE_RELEASE` names;
/// else, with a release directory (`VAULT_REGISTRAR_KUBE_DIR`, the compatibility pass), the
/// oldest release the chart admits (tests/controlplane/oldest/go.mod); else the main pin
/// (tests/controlplane/go.mod). Exactly one: a pass meant for 1.30 that runs 1.35 fails.
fn expected_release() -> String {
    if let Ok(release) = std::env::var("VAULT_REGISTRAR_KUBE_RELEASE") {
        return release;
    }
    let go_mod = if std::env::var_os("VAULT_REGISTRAR_KUBE_DIR").is_some() {
        "controlplane/oldest/go.mod"
    } else {
        "controlplane/go.mod"
    };
    vault_registrar_testkit::tools::pinned_kubernetes(go_mod)
        .unwrap_or_else(|e| panic!("{go_mod}: {e}"))
}

/// What `<binary> --version` prints.
fn binary_version(path: &std::path::Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(path).arg("--version").output()?;
    anyhow::ensure!(out.status.success(), "{} --version failed", path.display());
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[tokio::test]
async fn api_server_reports_its_real_version() -> anyhow::Result<()> {
    let client = shared().client().await?;
    let version = client.apiserver_version().await?.git_version;
    let expected = expected_release();
    assert_eq!(
        version, expected,
        "the API server says {version}; this run must be against {expected}"
    );
    let bins = &shared().bins;
    assert_eq!(
        binary_version(&bins.kube_apiserver)?,
        format!("Kubernetes {expected}"),
        "{}",
        bins.kube_apiserver.display()
    );
    // The controller manager the plane started is of the same release.
    assert_eq!(
        binary_version(&bins.kube_controller_manager)?,
        format!("Kubernetes {expected}"),
        "{}",
        bins.kube_controller_manager.display()
    );
    Ok(())
}

#[tokio::test]
async fn structural_crd_is_enforced_by_the_server() -> anyhow::Result<()> {
    let (client, ns) = namespace("crd").await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.smoke.vault-registrar.dev"},
        "spec": {"group": "smoke.vault-registrar.dev", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                "type": "object", "properties": {"spec": {"type": "object", "required": ["size"],
                    "properties": {"size": {"type": "integer", "minimum": 1, "maximum": 10}}}}}}}]}
    }))?;
    crds.create(&PostParams::default(), &crd).await?;
    wait::until("Widget CRD Established", LIMIT, || async {
        let crd = crds.get("widgets.smoke.vault-registrar.dev").await?;
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        Ok(conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(()))
    })
    .await?;
    let gvk = GroupVersionKind::gvk("smoke.vault-registrar.dev", "v1", "Widget");
    let widgets: Api<DynamicObject> =
        Api::namespaced_with(client, &ns, &ApiResource::from_gvk(&gvk));
    let object = |size: i64| -> anyhow::Result<DynamicObject> {
        Ok(serde_json::from_value(
            json!({"apiVersion": "smoke.vault-registrar.dev/v1", "kind": "Widget",
            "metadata": {"name": format!("w{size}")}, "spec": {"size": size}}),
        )?)
    };
    wait::until("Widget accepted", LIMIT, || async {
        Ok(widgets
            .create(&PostParams::default(), &object(3)?)
            .await
            .ok())
    })
    .await?;
    let err = widgets
        .create(&PostParams::default(), &object(42)?)
        .await
        .expect_err("size 42 violates maximum 10");
    let message = err.to_string();
    assert!(
        message.contains("spec.size") && message.contains("10"),
        "server message: {message}"
    );
    Ok(())
}

#[tokio::test]
async fn server_side_apply_records_the_field_manager() -> anyhow::Result<()> {
    let (client, ns) = namespace("ssa").await?;
    let maps: Api<ConfigMap> = Api::namespaced(client, &ns);
    let cm: ConfigMap = serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "applied"}, "data": {"k": "v"}}))?;
    let applied = maps
        .patch(
            "applied",
            &PatchParams::apply("vault-registrar-smoke"),
            &Patch::Apply(&cm),
        )
        .await?;
    let managers: Vec<String> = applied
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.contains(&"vault-registrar-smoke".to_string()),
        "managers: {managers:?}"
    );
    Ok(())
}

#[tokio::test]
async fn endpoint_slices_follow_pod_readiness() -> anyhow::Result<()> {
    let (client, ns) = namespace("eps").await?;
    let labels = BTreeMap::from([("app".to_string(), "smoke".to_string())]);
    let pod = SimPod {
        name: "p0".into(),
        labels,
        ip: next_pod_ip(),
    };
    start_pod(&client, &ns, &pod).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let svc: Service = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "smoke"}, "spec": {"selector": {"app": "smoke"}, "publishNotReadyAddresses": false,
        "ports": [{"name": "http", "port": 8200, "targetPort": 8200}]}}))?;
    services.create(&PostParams::default(), &svc).await?;
    wait_endpoints(&client, &ns, "smoke", &[pod.ip.to_string()], LIMIT).await?;
    set_running(&client, &ns, &pod, false).await?;
    wait_endpoints(&client, &ns, "smoke", &[], LIMIT).await?;
    Ok(())
}

#[tokio::test]
async fn deleting_an_owner_collects_its_child() -> anyhow::Result<()> {
    let (client, ns) = namespace("gc").await?;
    let maps: Api<ConfigMap> = Api::namespaced(client, &ns);
    let owner = maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "owner"}}))?,
        )
        .await?;
    let child: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "child", "ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}]}}))?;
    maps.create(&PostParams::default(), &child).await?;
    maps.delete("owner", &DeleteParams::background()).await?;
    wait::until("child ConfigMap collected", LIMIT, || async {
        Ok(maps.get_opt("child").await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn kubectl_and_helm_talk_to_the_plane() -> anyhow::Result<()> {
    let (_, ns) = namespace("tools").await?;
    let plane = shared();
    let out = plane
        .kubectl()
        .args(["get", "namespace", &ns, "-o", "jsonpath={.status.phase}"])
        .output()?;
    assert!(
        out.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Active");

    let out = plane.helm().args(["version", "--short"]).output()?;
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("v3."),
        "helm version: {:?}",
        out
    );

    let chart = plane.dir().join("smoke-chart");
    std::fs::create_dir_all(chart.join("templates"))?;
    std::fs::write(
        chart.join("Chart.yaml"),
        "apiVersion: v2\nname: smoke\nversion: 0.1.0\n",
    )?;
    std::fs::write(chart.join("values.yaml"), "greeting: hello\n")?;
    std::fs::write(
        chart.join("templates/cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: smoke\ndata:\n  greeting: {{ .Values.greeting | quote }}\n",
    )?;
    let out = plane
        .helm()
        .args(["template", "smoke"])
        .arg(&chart)
        .args(["--validate", "-n", &ns, "--set", "greeting=hi"])
        .output()?;
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("greeting: \"hi\""));
    let out = plane
        .helm()
        .args(["install", "smoke"])
        .arg(&chart)
        .args(["-n", &ns, "--wait", "--timeout", "60s"])
        .output()?;
    assert!(
        out.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = plane
        .kubectl()
        .args([
            "get",
            "configmap",
            "smoke",
            "-n",
            &ns,
            "-o",
            "jsonpath={.data.greeting}",
        ])
        .output()?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello");
    Ok(())
}
