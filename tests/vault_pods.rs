//! Vault as users run it, on the node: real Vault pods of a raft StatefulSet in the official
//! chart's layout (`vault_registrar_testkit::vault_pods`), the operator installed from the
//! chart with its image, a VaultCluster with the CRD's default probing. The labels and the
//! active Service follow Vault through a step-down, the active pod's deletion and a
//! RoleOrdered upgrade; a client polling the active Service's ClusterIP every 10 ms measures
//! what users see, beside Vault's own gap (its pods asked directly). Figures are printed.
//!
//! One node per machine: the tests take turns (the machine lock, and `TURN` here).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use vault_registrar::crd::VaultCluster;
use vault_registrar_testkit::cluster::{endpoint_ips, wait_endpoints};
use vault_registrar_testkit::downtime::{DirectPoller, Report, ServiceClient};
use vault_registrar_testkit::evictions::{evicted, one_at_a_time, pod_history};
use vault_registrar_testkit::node::NodePlane;
use vault_registrar_testkit::real_vault::vault_binary;
use vault_registrar_testkit::release::{self, apply};
use vault_registrar_testkit::vault_pods::{
    self, AwayWatch, REPLICAS, REVISION_ANNOTATION, SELECTOR, VaultPods, pod_name,
};
use vault_registrar_testkit::wait;

const NS: &str = "vault";
const LIMIT: Duration = Duration::from_secs(90);
/// The client's and the direct poller's period.
const EVERY: Duration = Duration::from_millis(10);
const UPGRADE: &str = "upgrade: {strategy: RoleOrdered, maxUnavailable: 1}";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_vault-registrar"))
}

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The node, the chart, the Vault image and the StatefulSet, initialized and unsealed, with
/// a VaultCluster over it (`extra` appended to its spec).
struct Setup {
    node: NodePlane,
    client: kube::Client,
    vault: VaultPods,
}

async fn setup(extra: &str) -> anyhow::Result<Setup> {
    let vault_bin = vault_binary()?;
    let t = Instant::now();
    let node = tokio::task::block_in_place(|| NodePlane::start(bin()))?;
    tokio::task::block_in_place(|| vault_pods::import_image(&node, &vault_bin))?;
    println!(
        "node Ready {:?} after the kubelet started; node and Vault image {:?}",
        node.ready_after,
        t.elapsed()
    );
    let client = node.plane.client().await?;
    release::install_chart(&node).await?;
    let t = Instant::now();
    let mut vault = VaultPods::deploy(&node, &client, NS).await?;
    println!("three Vault pods answering {:?} after the apply", t.elapsed());
    apply(&node, &vault_cluster(extra)).await?;
    labels_are(&client, "vault-initialized", "false", &[0, 1, 2]).await?;
    let t = Instant::now();
    vault.bootstrap().await?;
    println!("init and unseal through the pod IPs: {:?}", t.elapsed());
    Ok(Setup {
        node,
        client,
        vault,
    })
}

fn vault_cluster(extra: &str) -> String {
    format!(
        "apiVersion: vault-registrar.dev/v1alpha1\nkind: VaultCluster\nmetadata: {{name: vault, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{app.kubernetes.io/name: vault, component: server}}}}\n  {extra}\n"
    )
}

/// Waits until label `key` is `value` on the pods of these ordinals.
async fn labels_are(
    client: &kube::Client,
    key: &str,
    value: &str,
    ordinals: &[usize],
) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    wait::until(&format!("{key}={value} on {ordinals:?}"), LIMIT, || async {
        for i in ordinals {
            let pod = pods.get_opt(&pod_name(*i)).await?;
            if pod.and_then(|p| p.labels().get(key).cloned()).as_deref() != Some(value) {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
}

/// Waits until the labels say what Vault says: the active pod (asked directly) is the only
/// one labelled active, every pod unsealed and initialized, and the active Service's
/// endpoints hold the active pod alone. The active pod's name.
async fn converged(s: &Setup) -> anyhow::Result<String> {
    let active = s.vault.wait_active(None).await?;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), NS);
    let want: BTreeMap<String, [String; 3]> = (0..REPLICAS)
        .map(pod_name)
        .map(|n| {
            let a = (n == active).to_string();
            (n, [a, "false".into(), "true".into()])
        })
        .collect();
    wait::until(&format!("labels: {want:?}"), LIMIT, || async {
        let list = pods.list(&ListParams::default().labels(SELECTOR)).await?;
        let got: BTreeMap<String, [String; 3]> = list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| {
                let l = |k: &str| p.labels().get(k).cloned().unwrap_or_default();
                (
                    p.name_any(),
                    [l("vault-active"), l("vault-sealed"), l("vault-initialized")],
                )
            })
            .collect();
        Ok((got == want).then_some(()))
    })
    .await?;
    let ip = s.vault.ip(&active).await?.expect("the active pod runs");
    wait_endpoints(&s.client, NS, "vault-active", &[ip.to_string()], LIMIT).await?;
    Ok(active)
}

/// The active Service's ClusterIP and port.
async fn active_service(client: &kube::Client) -> anyhow::Result<SocketAddr> {
    let svc = Api::<Service>::namespaced(client.clone(), NS)
        .get("vault-active")
        .await?;
    let spec = svc.spec.unwrap_or_default();
    let port = spec
        .ports
        .unwrap_or_default()
        .first()
        .map(|p| p.port)
        .unwrap_or(8200);
    Ok(format!("{}:{port}", spec.cluster_ip.unwrap_or_default()).parse()?)
}

/// The client and the direct poller, running while `during` runs and until the client has
/// had a second of active answers after it (so the window closes on the new active pod).
async fn measure<F, T>(s: &Setup, what: &str, during: F) -> anyhow::Result<(T, Report)>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    let service = active_service(&s.client).await?;
    let client = ServiceClient::start(service, EVERY);
    let poller = DirectPoller::start(&s.client, NS, SELECTOR, EVERY);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let out = during.await?;
    // Settled: every pod's labels right and the Service on the active pod, then a second.
    converged(s).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let samples = client.finish().await;
    let report = Report::new(&samples, &poller.finish().await);
    println!("{}", report.line(what));
    Ok((out, report))
}

/// Labels on real Vault pods, then a step-down and the active pod deleted, measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vault_pods_are_labelled_and_routed_through_a_step_down_and_a_deletion()
-> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let s = setup("").await?;
    let active = converged(&s).await?;
    println!("labels converged: {active} active");
    let standbys = endpoint_ips(&s.client, NS, "vault-standby").await?;
    assert_eq!(standbys.len(), 2, "{standbys:?}");

    let (new, step_down) = measure(&s, "vault operator step-down", async {
        s.vault.step_down(&active).await?;
        s.vault.wait_active(Some(&active)).await
    })
    .await?;
    assert_ne!(new, active);
    sane(&step_down)?;

    let deleted = new.clone();
    let (_, deletion) = measure(&s, "kubectl delete pod (the active one)", async {
        Api::<Pod>::namespaced(s.client.clone(), NS)
            .delete(&deleted, &DeleteParams::default())
            .await?;
        let next = s.vault.wait_active(Some(&deleted)).await?;
        // The StatefulSet makes the pod again, empty: it joins and waits for its key.
        s.vault
            .wait_health(&deleted, "back, uninitialized or sealed", |(c, _)| {
                matches!(c, 501 | 503)
            })
            .await?;
        s.vault.unseal(&deleted).await?;
        Ok(next)
    })
    .await?;
    sane(&deletion)?;
    assert_eq!(
        s.vault.voters().await?,
        ["vault-0", "vault-1", "vault-2"],
        "the replacement rejoined as a voter"
    );
    let diffs = tokio::task::block_in_place(|| s.node.stop());
    assert!(diffs.is_empty(), "after teardown:\n{}", diffs.join("\n"));
    Ok(())
}

/// What a client may rely on whatever the timing: it ends on the active pod, and the active
/// Service never routed a request to a sealed pod.
fn sane(report: &Report) -> anyhow::Result<()> {
    anyhow::ensure!(report.ends_active, "the client did not end on 200: {report:?}");
    anyhow::ensure!(
        report.sealed == 0,
        "the active Service routed to a sealed pod: {report:?}"
    );
    Ok(())
}

/// A RoleOrdered upgrade of real Vault pods: a budget of no disruption blocks it; without
/// the budget the standbys go first, the active pod last, one at a time, each replacement
/// waiting (named in the condition) until the test unseals it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_ordered_upgrade_of_real_vault_pods() -> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let s = setup(UPGRADE).await?;
    let active = converged(&s).await?;
    let first = update_revision(&s.client).await?;
    let up_to_date = condition(&s.client, "False", "UpToDate").await?;
    assert_eq!(up_to_date, format!("3/3 pods at revision {first}"));

    apply(&s.node, &budget()).await?;
    new_revision(&s.client, "2").await?;
    let blocked = condition(&s.client, "False", "DisruptionBlocked").await?;
    assert!(
        blocked.contains("vault-") && !blocked.contains(&active),
        "a standby first: {blocked}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(evicted(&history(&s).await), Vec::<String>::new());

    let away = AwayWatch::start(&s.client, NS);
    let (paused, report) = measure(&s, "RoleOrdered upgrade", async {
        s.node
            .plane
            .kubectl()
            .args(["delete", "pdb", "vault", "-n", NS])
            .output()?;
        unseal_each_replacement(&s).await
    })
    .await?;
    let done = update_revision(&s.client).await?;
    assert_ne!(done, first);
    let message = condition(&s.client, "False", "UpToDate").await?;
    assert_eq!(message, format!("3/3 pods at revision {done}"));

    // The order, as the API server recorded it: standbys first, the active pod last.
    let history = history(&s).await;
    one_at_a_time(&history).map_err(anyhow::Error::msg)?;
    let order = evicted(&history);
    println!("evictions: {order:?} (active before: {active}); most away at once: {:?}", away.most());
    assert_eq!(order.len(), REPLICAS, "{order:?}");
    assert_eq!(order.last(), Some(&active), "the active pod last: {order:?}");
    assert_eq!(paused, order, "each replacement waited for its unseal, named");
    assert!(away.most().0 <= 1, "two pods away at once: {:?}", away.most());
    // Vault at the end: one active pod, every pod unsealed, three voters.
    s.vault.wait_active(None).await?;
    for i in 0..REPLICAS {
        let (code, _) = s.vault.health(&pod_name(i)).await?;
        assert!(matches!(code, 200 | 429), "vault-{i} answers {code}");
    }
    assert_eq!(s.vault.voters().await?, ["vault-0", "vault-1", "vault-2"]);
    sane(&report)?;
    let diffs = tokio::task::block_in_place(|| s.node.stop());
    assert!(diffs.is_empty(), "after teardown:\n{}", diffs.join("\n"));
    Ok(())
}

/// Until the upgrade is done: whenever the condition names a replacement waiting for its
/// unseal, unseals it (once). The pods named, in order.
async fn unseal_each_replacement(s: &Setup) -> anyhow::Result<Vec<String>> {
    let mut unsealed = Vec::new();
    let start = Instant::now();
    loop {
        anyhow::ensure!(start.elapsed() < LIMIT * 3, "upgrade not done; unsealed {unsealed:?}");
        let (status, reason, message) = upgrading(&s.client).await?;
        if status == "False" && reason == "UpToDate" && !unsealed.is_empty() {
            return Ok(unsealed);
        }
        let named = message.split_whitespace().next().unwrap_or_default().to_string();
        if reason == "WaitingForUnseal" && !unsealed.contains(&named) {
            println!("Upgrading={status} {reason}: {message}");
            s.vault.unseal(&named).await?;
            unsealed.push(named);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn budget() -> String {
    format!(
        "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {{name: vault, namespace: {NS}}}\nspec:\n  maxUnavailable: 0\n  selector: {{matchLabels: {{app.kubernetes.io/name: vault}}}}\n"
    )
}

async fn history(s: &Setup) -> Vec<(String, String)> {
    let plane = &s.node.plane;
    pod_history(tokio::task::block_in_place(|| plane.writes_in(NS)))
}

async fn update_revision(client: &kube::Client) -> anyhow::Result<String> {
    let set = Api::<StatefulSet>::namespaced(client.clone(), NS)
        .get("vault")
        .await?;
    Ok(set
        .status
        .and_then(|s| s.update_revision)
        .unwrap_or_default())
}

async fn new_revision(client: &kube::Client, value: &str) -> anyhow::Result<()> {
    let patch =
        json!({"spec": {"template": {"metadata": {"annotations": {REVISION_ANNOTATION: value}}}}});
    Api::<StatefulSet>::namespaced(client.clone(), NS)
        .patch("vault", &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(())
}

/// The Upgrading condition now: status, reason, message (empty when absent).
async fn upgrading(client: &kube::Client) -> anyhow::Result<(String, String, String)> {
    let vc = Api::<VaultCluster>::namespaced(client.clone(), NS)
        .get("vault")
        .await?;
    Ok(vc
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Upgrading")
        .map(|c| (c.status, c.reason, c.message))
        .unwrap_or_default())
}

/// Waits for the Upgrading condition with this status and reason; its message.
async fn condition(client: &kube::Client, status: &str, reason: &str) -> anyhow::Result<String> {
    wait::until(&format!("Upgrading={status} ({reason})"), LIMIT, || async {
        let (s, r, m) = upgrading(client).await?;
        Ok((s == status && r == reason).then_some(m))
    })
    .await
}
