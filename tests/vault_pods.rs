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

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use vault_registrar_testkit::cluster::{endpoint_ips, wait_endpoints};
use vault_registrar_testkit::downtime::{
    DirectPoller, Report, ServiceClient, active_runs, timeline,
};
use vault_registrar_testkit::evictions::{evicted, one_at_a_time, pod_history};
use vault_registrar_testkit::node::NodePlane;
use vault_registrar_testkit::real_vault::vault_binary;
use vault_registrar_testkit::release::{self, apply};
use vault_registrar_testkit::vault_pods::{
    self, AwayWatch, REPLICAS, SELECTOR, VaultPods, pod_name, vault_cluster,
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
    println!(
        "three Vault pods answering {:?} after the apply",
        t.elapsed()
    );
    apply(&node, &vault_cluster(NS, extra)).await?;
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
/// What kube-controller-manager's EndpointSlice controller logs when it finds its own last
/// write not yet in its cache, and retries the Service after a back-off.
const STALE_SLICES: &str = "informer cache is out of date";

async fn measure<F, T>(s: &Setup, what: &str, during: F) -> anyhow::Result<(T, Report)>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    let service = active_service(&s.client).await?;
    let started = k8s_openapi::jiff::Timestamp::now();
    let client = ServiceClient::start(service, EVERY);
    let poller = DirectPoller::start(&s.client, NS, SELECTOR, EVERY);
    let stale = || {
        s.node
            .plane
            .log_count("kube-controller-manager", STALE_SLICES)
    };
    let stale_before = stale();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let out = during.await?;
    // Settled: every pod's labels right, the Service on the active pod, and the client
    // answered active for half a second in a row.
    converged(s).await?;
    let settled = wait::until(
        "the client answered active 50 times in a row",
        LIMIT,
        || async { Ok(client.settled(50).then_some(())) },
    )
    .await;
    let samples = client.finish().await;
    let actives = poller.finish().await;
    let report = Report::new(&samples, &actives);
    println!("{}", report.line(what));
    println!(
        "  kube-controller-manager retried a Service's EndpointSlices on a stale cache (1 s back-off) {} times meanwhile",
        stale() - stale_before
    );
    println!("  the client's answers: {}", timeline(&samples));
    if let Some(first) = samples.first() {
        println!(
            "  active, asked directly: {}",
            active_runs(&actives, first.sent)
        );
    }
    println!("  the writes meanwhile: {}", writes_since(s, started));
    settled?;
    Ok((out, report))
}

/// The writes to pods' labels and to EndpointSlices in the namespace since `started` (ms
/// after it, the API server's completion time, who wrote), to see where time went between
/// Vault's change and the client's: the operator's label, the EndpointSlice controller's
/// slice, then kube-proxy (not in the log).
fn writes_since(s: &Setup, started: k8s_openapi::jiff::Timestamp) -> String {
    let writes = tokio::task::block_in_place(|| s.node.plane.timed_writes_in(NS));
    writes
        .into_iter()
        .filter(|(at, _)| *at >= started)
        .filter(|(_, [_, _, resource, _])| resource == "pods" || resource == "endpointslices")
        .map(|(at, [user, verb, resource, name])| {
            let ms = at.duration_since(started).as_millis();
            let who = user.rsplit(':').next().unwrap_or_default().to_string();
            format!("{ms} {who} {verb} {resource} {name}")
        })
        .collect::<Vec<_>>()
        .join("; ")
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
        // Under its name again, and promoted to voter.
        s.vault.wait_voters().await?;
        Ok(next)
    })
    .await?;
    // The node goes first, so that a verdict against the client leaves nothing behind.
    teardown(s)?;
    sane(&step_down)?;
    sane(&deletion)
}

/// What a client may rely on whatever the timing: it ends on the active pod, and the active
/// Service was never moved to a sealed pod. The active pod itself may answer sealed for a
/// moment as it steps down (seen once in CI: one 503 between two 200s of the same pod);
/// the meter tells those apart by their following an active answer at once.
fn sane(report: &Report) -> anyhow::Result<()> {
    anyhow::ensure!(
        report.ends_active,
        "the client did not end on 200: {report:?}"
    );
    anyhow::ensure!(
        report.sealed == 0,
        "the active Service routed to a sealed pod: {report:?}"
    );
    Ok(())
}

/// A RoleOrdered upgrade of real Vault pods: a budget of no disruption blocks it; without
/// the budget the standbys go first, the active pod last, one at a time, each replacement
/// waiting (named in the condition) until the test unseals it. The operator's leading
/// replica is deleted while the first step waits: the other one finishes the upgrade from
/// what it lists, without a second eviction in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_ordered_upgrade_of_real_vault_pods() -> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let s = setup(UPGRADE).await?;
    let active = converged(&s).await?;
    let first = s.vault.update_revision().await?;
    let up_to_date = s.vault.wait_upgrading("False", "UpToDate").await?;
    assert_eq!(up_to_date, format!("3/3 pods at revision {first}"));

    apply(&s.node, &budget()).await?;
    s.vault.new_revision("2").await?;
    let blocked = s.vault.wait_upgrading("False", "DisruptionBlocked").await?;
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
        let mut handed_over = false;
        s.vault
            .unseal_each_replacement_after(async |named| {
                if !handed_over {
                    handed_over = true;
                    hand_over(&s.client, named).await?;
                }
                Ok(())
            })
            .await
    })
    .await?;
    let done = s.vault.update_revision().await?;
    assert_ne!(done, first);
    let message = s.vault.wait_upgrading("False", "UpToDate").await?;
    assert_eq!(message, format!("3/3 pods at revision {done}"));

    // The order, as the API server recorded it: standbys first, the active pod last.
    let history = history(&s).await;
    one_at_a_time(&history).map_err(anyhow::Error::msg)?;
    let order = evicted(&history);
    println!(
        "evictions: {order:?} (active before: {active}); most away at once: {:?}",
        away.most()
    );
    assert_eq!(order.len(), REPLICAS, "{order:?}");
    assert_eq!(
        order.last(),
        Some(&active),
        "the active pod last: {order:?}"
    );
    assert_eq!(
        paused, order,
        "each replacement waited, named, the last (the pod active before) too"
    );
    println!("pods away, as a pod watch saw them: {:?}", away.changes());
    assert!(
        away.most().0 <= 1,
        "two pods away at once: {:?}",
        away.changes()
    );
    // Vault at the end: one active pod, every pod unsealed, three voters.
    s.vault.wait_active(None).await?;
    for i in 0..REPLICAS {
        let (code, _) = s.vault.health(&pod_name(i)).await?;
        assert!(matches!(code, 200 | 429), "vault-{i} answers {code}");
    }
    s.vault.wait_voters().await?;
    teardown(s)?;
    sane(&report)
}

/// Deletes the operator's leading replica while `waiting` (a replacement) is named in the
/// condition, and waits until the other replica leads.
async fn hand_over(client: &kube::Client, waiting: &str) -> anyhow::Result<()> {
    let holder = release::leader(client)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no replica leads the operator"))?;
    let (next, after) = release::delete_leader(client, &holder).await?;
    println!("while {waiting} waits: leader {holder} deleted, {next} leads after {after:?}");
    Ok(())
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

/// Stops the node and fails on what it left on the machine. A pod's veth still there is
/// given 30 seconds to go; one that vanished is not ours to restore (a veth a run before
/// left, going while the machine was observed). Known open: after the upgrade a pod's
/// network namespace has outlived the teardown, its veth with it (not explained yet).
fn teardown(s: Setup) -> anyhow::Result<()> {
    let diffs: Vec<String> = tokio::task::block_in_place(|| s.node.stop())
        .into_iter()
        .filter(|d| !(d.starts_with("link veth") && d.ends_with(" gone")))
        .filter(|d| !veth_goes(d))
        .collect();
    anyhow::ensure!(diffs.is_empty(), "after teardown:\n{}", diffs.join("\n"));
    Ok(())
}

/// Whether a "link vethX left behind" difference disappears within 30 seconds.
fn veth_goes(difference: &str) -> bool {
    let Some(name) = difference
        .strip_prefix("link ")
        .and_then(|d| d.strip_suffix(" left behind"))
        .filter(|n| n.starts_with("veth"))
    else {
        return false;
    };
    let path = Path::new("/sys/class/net").join(name);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if !path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}
