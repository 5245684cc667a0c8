//! Transitions on the real control plane: the moments around the steady state, where an
//! operator acts on a partial view or on a cache that missed what happened. A restart of
//! kube-apiserver (SIGKILL), a pod LIST answered slowly at the start of a term (through
//! `ApiRelay`), a VaultCluster deleted while the operator was down, and overlapping
//! clusters when the older one goes.
//!
//! Every test here runs alone (`SERIAL`): one of them kills the shared API server.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::Mutex;
use vault_registrar::crd::VaultCluster;
use vault_registrar_testkit::api_relay::{ApiRelay, list_of, pod_list};
use vault_registrar_testkit::cluster::{APP_LABEL, endpoint_ips};
use vault_registrar_testkit::pods::{SimPod, next_pod_ip, start_pod};
use vault_registrar_testkit::vault_sim::{Role, SimState, VaultSim};
use vault_registrar_testkit::{shared, wait};

static SERIAL: Mutex<()> = Mutex::const_new(());

const OWNER: &str = "vault-registrar.dev/cluster";

/// A new simulator and a Running, Ready pod for it, named `name`.
async fn add_pod(f: &Fixture, name: &str, role: Role) -> anyhow::Result<(VaultSim, SimPod)> {
    let ip = next_pod_ip();
    let sim = VaultSim::start(SocketAddr::new(ip.into(), 8200), None, SimState::new(role)).await?;
    let pod = SimPod {
        name: name.into(),
        labels: BTreeMap::from([(APP_LABEL.0.to_string(), APP_LABEL.1.to_string())]),
        ip,
    };
    start_pod(&f.client, &f.ns, &pod).await?;
    Ok((sim, pod))
}

fn pods(f: &Fixture) -> Api<Pod> {
    Api::namespaced(f.client.clone(), &f.ns)
}

fn services(f: &Fixture) -> Api<Service> {
    Api::namespaced(f.client.clone(), &f.ns)
}

/// Waits until the Service `name` is gone.
async fn service_gone(f: &Fixture, name: &str, limit: Duration) -> anyhow::Result<()> {
    wait::until(&format!("Service {name} gone"), limit, || async {
        Ok(services(f).get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

/// Waits until the VaultCluster `name` is gone (its finalizer done).
async fn cluster_gone(f: &Fixture, name: &str) -> anyhow::Result<()> {
    wait::until(&format!("VaultCluster {name} gone"), LIMIT, || async {
        Ok(f.clusters().get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

/// Waits until pod `name` (of uid `uid` when given) carries the label `key=value`.
async fn wait_label(
    f: &Fixture,
    name: &str,
    uid: Option<&str>,
    key: &str,
    value: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let what = format!("{name} labelled {key}={value}");
    wait::until(&what, limit, || async {
        let pod = pods(f).get(name).await?;
        let labels = pod.metadata.labels.unwrap_or_default();
        let right_pod = uid.is_none_or(|u| pod.metadata.uid.as_deref() == Some(u));
        Ok((right_pod && labels.get(key).map(String::as_str) == Some(value)).then_some(()))
    })
    .await
}

/// The kube-apiserver is SIGKILLed and restarted on the same etcd; straight after, a
/// standby is deleted and recreated under its name with a new IP, a pod joins, the
/// VaultCluster is edited and a generated Service is changed by someone else. Every cache
/// must follow within a few seconds: kube's controller used to pause every watch for up
/// to 30 s after watch errors, so the old pod stayed in the cache, was PATCHed with its old
/// UID every round, and neither new pod was labelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cache_follows_the_api_server_after_a_restart() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let f = converged_trio("tr-restart").await?;
    shared().kill_apiserver();
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::spawn_blocking(|| shared().restart_apiserver()).await??;
    let back = Instant::now();

    pods(&f)
        .delete(
            f.vault.pod_name(2),
            &DeleteParams::default().grace_period(0),
        )
        .await?;
    wait::until("vault-2 gone", LIMIT, || async {
        Ok(pods(&f).get_opt("vault-2").await?.is_none().then_some(()))
    })
    .await?;
    let (_sim2, _) = add_pod(&f, "vault-2", Role::Standby).await?;
    let (_sim3, _) = add_pod(&f, "vault-3", Role::Standby).await?;
    let new_uid = pods(&f).get("vault-2").await?.metadata.uid.unwrap();
    // The VaultCluster edited: the standby Service disabled.
    f.clusters()
        .patch(
            "vault",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"services": {"standby": {"enabled": false}}}})),
        )
        .await?;
    // Someone else's change to the active Service: a selector that selects nothing.
    services(&f)
        .patch(
            "vault-active",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"selector": {"intruder": "yes"}}})),
        )
        .await?;
    let changed = back.elapsed();

    // Bound: one watch backoff step (2 s) plus a relist and a round, with room for a
    // loaded machine, measured from the last change.
    let bound = Duration::from_secs(8);
    wait_label(&f, "vault-2", Some(&new_uid), OWNER, "vault", bound).await?;
    wait_label(
        &f,
        "vault-2",
        Some(&new_uid),
        "vault-active",
        "false",
        bound,
    )
    .await?;
    wait_label(&f, "vault-3", None, "vault-active", "false", bound).await?;
    service_gone(&f, "vault-standby", bound).await?;
    wait::until("vault-active's selector repaired", bound, || async {
        let svc = services(&f).get("vault-active").await?;
        let selector = svc.spec.and_then(|s| s.selector).unwrap_or_default();
        Ok((!selector.contains_key("intruder")).then_some(()))
    })
    .await?;
    f.endpoints("vault-active", &[0]).await?;
    println!(
        "changes done {changed:?} after the API server was back; all followed {:?} after it",
        back.elapsed()
    );
    let log = f.operator.log_text();
    let stale = log.matches("pod gone or replaced").count();
    assert!(
        stale <= 2,
        "{stale} writes to a replaced pod: the cache kept it"
    );
    Ok(())
}

/// A VaultCluster deleted while its operator was down, and the new operator's first pod
/// LIST answered 3 s late: the deletion must wait for the pods, then strip them. Acting on
/// the VaultCluster list alone would finalize it with nothing stripped, leaving
/// `vault-active=true` and the ownership label on the pods for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_deleted_while_the_operator_was_down_is_stripped() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut f = converged_trio("tr-deleted").await?;
    f.operator.kill();
    f.clusters()
        .delete("vault", &DeleteParams::default())
        .await?;
    let relay = ApiRelay::start(shared()).await?;
    relay.hold(pod_list, Duration::from_secs(3), 1);
    let kubeconfig = relay.kubeconfig("deleted")?;
    let _operator = operator(&f.ns, Some(&kubeconfig), &[])?;
    cluster_gone(&f, "vault").await?;
    assert_eq!(relay.held(), 1, "the pod LIST was not held");
    for i in 0..3 {
        let labels = f.vault.labels(i).await?;
        let ours: Vec<&String> = labels.keys().filter(|k| k.starts_with("vault-")).collect();
        assert!(ours.is_empty(), "vault-{i} kept {ours:?}");
    }
    Ok(())
}

/// The operator restarts over a converged cluster and its first pod LIST is answered 3 s
/// late: no round may run on the VaultCluster list alone. Every status version the API
/// server stored is checked (a watch, in resourceVersion order) for `NoPods`, and the
/// active Service's endpoints are polled for a moment with none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pod_list_at_start_writes_nothing_from_a_partial_view() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut f = converged_trio("tr-slowlist").await?;
    f.condition("vault", "Ready", "True", "Ready").await?;
    f.operator.kill();
    let statuses = record_statuses(f.clusters());
    tokio::time::sleep(Duration::from_secs(1)).await; // the watch has listed
    let relay = ApiRelay::start(shared()).await?;
    relay.hold(pod_list, Duration::from_secs(3), 1);
    let kubeconfig = relay.kubeconfig("slowlist")?;
    let start = Instant::now();
    let _operator = operator(&f.ns, Some(&kubeconfig), &[])?;
    let mut empty = 0;
    while start.elapsed() < Duration::from_secs(6) {
        if endpoint_ips(&f.client, &f.ns, "vault-active")
            .await?
            .is_empty()
        {
            empty += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(relay.held(), 1, "the pod LIST was not held");
    f.converged().await?;
    let seen = statuses.finish().await;
    let no_pods: Vec<&String> = seen.iter().filter(|r| r.contains("NoPods")).collect();
    assert!(
        no_pods.is_empty(),
        "statuses written from a partial view: {no_pods:?}"
    );
    assert_eq!(empty, 0, "the active Service had no endpoint {empty} times");
    Ok(())
}

/// What a watch saw of every version the API server stored, in resourceVersion order, as
/// `seen` tells of each.
struct Record<T> {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<T>>,
}

fn record<K, T>(api: Api<K>, seen: impl Fn(K) -> Vec<T> + Send + 'static) -> Record<T>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
    T: Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let done = stop.clone();
    let task = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()).applied_objects());
        while !done.load(Ordering::SeqCst) {
            let next = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
            let Ok(Some(Ok(object))) = next else { continue };
            out.extend(seen(object));
        }
        out
    });
    Record { stop, task }
}

impl<T> Record<T> {
    async fn finish(self) -> Vec<T> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap_or_default()
    }
}

/// Every version of the VaultClusters' conditions, as "type=status reason: message".
fn record_statuses(api: Api<VaultCluster>) -> Record<String> {
    record(api, |vc: VaultCluster| {
        let conditions = vc.status.unwrap_or_default().conditions;
        conditions
            .into_iter()
            .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
            .collect()
    })
}

/// Two VaultClusters select the same pods. The older one is deleted while the operator is
/// down, and the younger's claim (its ownership label, written here as the operator writes
/// it) is already on the pods when the operator starts: the older one's cleanup must strip
/// only what names it, never the younger's labels. Every version of the pods' labels the
/// API server stored is checked (a watch, in resourceVersion order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_older_of_two_overlapping_clusters_leaves_the_younger_its_pods()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut f = converged_trio("tr-overlap").await?;
    f.create("younger", FAST).await?;
    f.operator.kill();
    f.clusters()
        .delete("vault", &DeleteParams::default())
        .await?;
    for i in 0..3 {
        pods(&f)
            .patch(
                f.vault.pod_name(i),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {OWNER: "younger"}}})),
            )
            .await?;
    }
    let record = record_owners(pods(&f));
    tokio::time::sleep(Duration::from_secs(1)).await; // the watch has listed
    // The VaultCluster LIST answered late, so the pods are listed by the time the first
    // round runs: a cleanup that strips what it selects would strip the younger's pods.
    let relay = ApiRelay::start(shared()).await?;
    relay.hold(list_of("vaultclusters"), Duration::from_secs(2), 1);
    let kubeconfig = relay.kubeconfig("overlap")?;
    let _operator = operator(&f.ns, Some(&kubeconfig), &[])?;
    cluster_gone(&f, "vault").await?;
    wait::until("younger-active routes to vault-0", LIMIT, || async {
        let ips = endpoint_ips(&f.client, &f.ns, "younger-active").await?;
        Ok((ips == [f.vault.ip(0)]).then_some(()))
    })
    .await?;
    let versions = record.finish().await;
    assert!(versions.len() >= 3, "the watch saw {versions:?}");
    let lost: Vec<&(String, Option<String>)> = versions
        .iter()
        .filter(|(_, owner)| owner.as_deref() != Some("younger"))
        .collect();
    assert!(
        lost.is_empty(),
        "the younger cluster's pods were stripped: {lost:?}"
    );
    Ok(())
}

/// Every version of the pods' ownership label: (pod, owner).
fn record_owners(api: Api<Pod>) -> Record<(String, Option<String>)> {
    record(api, |pod: Pod| {
        let owner = pod.metadata.labels.unwrap_or_default().get(OWNER).cloned();
        vec![(pod.metadata.name.unwrap_or_default(), owner)]
    })
}

/// One edit of a live VaultCluster: the label prefix changed, the selector narrowed so one
/// pod leaves, and the standby Service renamed. The pods keep only the new prefix's labels
/// (a stale `vault-active=true` would still route anything selecting on it), the pod that
/// left keeps none of ours, and the old Service goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_edit_cleans_up_after_itself() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let f = converged_trio("tr-edit").await?;
    for i in 0..2 {
        pods(&f)
            .patch(
                f.vault.pod_name(i),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"tier": "a"}}})),
            )
            .await?;
    }
    f.clusters()
        .patch(
            "vault",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "labelPrefix": "openbao",
                "selector": {"matchLabels": {"app.kubernetes.io/name": "vault", "tier": "a"}},
                "services": {"standby": {"name": "vault-readers"}},
            }})),
        )
        .await?;
    f.vault
        .wait_labels(
            "openbao-active",
            &[Some("true"), Some("false"), None],
            LIMIT,
        )
        .await?;
    let ours = |k: &String| {
        k.starts_with("vault-")
            || k.starts_with("openbao-")
            || k.starts_with("vault-registrar.dev/")
    };
    wait::until("every old label gone", LIMIT, || async {
        let mut left = Vec::new();
        for i in 0..3 {
            let labels = f.vault.labels(i).await?;
            let stale = labels.keys().filter(|k| {
                k.starts_with("vault-") && !k.starts_with("vault-registrar.dev/")
                    || (i == 2 && ours(k))
            });
            left.extend(stale.map(|k| format!("vault-{i}: {k}")));
        }
        Ok(left.is_empty().then_some(()))
    })
    .await?;
    service_gone(&f, "vault-standby", LIMIT).await?;
    f.endpoints("vault-active", &[0]).await?;
    f.endpoints("vault-readers", &[1]).await
}

/// SIGTERM, with and without leader election, while rounds run: the process drains its
/// reconciles and exits 0, not with "the controller stopped unexpectedly" (the controller
/// saw the signal first) and a backtrace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_after_the_drain() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut f = converged_trio("tr-sigterm").await?;
    for round in 0..3 {
        wait::until("caches synced", LIMIT, || async {
            Ok(f.operator
                .log_text()
                .contains("caches synced")
                .then_some(()))
        })
        .await?;
        f.operator.terminate();
        let status = tokio::task::block_in_place(|| f.operator.wait_exit(Duration::from_secs(10)));
        let log = f.operator.log_text();
        assert!(
            status.is_some_and(|s| s.success()),
            "unelected, stop {round}: {status:?}\n{}",
            tail(&log)
        );
        assert!(!log.contains("stopped unexpectedly"), "{}", tail(&log));
        f.operator = operator(&f.ns, None, &[])?;
        f.converged().await?;
    }
    f.operator.kill();
    let args = ["--leader-elect", "--lease-namespace", f.ns.as_str()];
    let mut elected = operator(&f.ns, None, &args)?;
    wait::until("the elected replica leads", LIMIT, || async {
        Ok(elected.log_text().contains("became leader").then_some(()))
    })
    .await?;
    f.converged().await?;
    elected.terminate();
    let status = tokio::task::block_in_place(|| elected.wait_exit(Duration::from_secs(10)));
    assert!(
        status.is_some_and(|s| s.success()),
        "elected: {status:?}\n{}",
        tail(&elected.log_text())
    );
    Ok(())
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A selector edit onto a label key no VaultCluster read before: the pod cache had dropped
/// that label, so until the pods are listed again it cannot tell which pods the new
/// selector takes. The cluster's rounds wait for that list: its pods, which all carry the
/// key, are never taken for pods that left (which would strip them and empty the active
/// Service), and after the list a failover is followed as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_onto_a_new_label_key_waits_for_the_pods_to_be_listed_again()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let f = converged_trio("tr-newkey").await?;
    for i in 0..3 {
        pods(&f)
            .patch(
                f.vault.pod_name(i),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"zone": "z1"}}})),
            )
            .await?;
    }
    let owners = record_owners(pods(&f));
    f.clusters()
        .patch(
            "vault",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "selector": {"matchLabels": {"app.kubernetes.io/name": "vault", "zone": "z1"}},
            }})),
        )
        .await?;
    f.active_holds(0, Duration::from_secs(4)).await?;
    let lost: Vec<_> = owners
        .finish()
        .await
        .into_iter()
        .filter(|(_, owner)| owner.is_none())
        .collect();
    assert!(lost.is_empty(), "pods stripped after the edit: {lost:?}");
    f.fail_over_to(1).await?;
    f.endpoints("vault-active", &[1]).await
}

/// The operator's memory against pods it does not care about: 100 pods that no selector
/// takes, each with about 200 KB of labels, arriving while it runs. The pod cache keeps
/// only the label keys VaultClusters read, so the resident memory grows by less than half
/// of those 20 MB: what remains is the allocator's from parsing the events, which arrive
/// as whole pods (a cache that kept every label grew by more than twice the labels' size:
/// the pods and the index each hold them). An operator started beside them, which lists
/// them all in one page, stays within the same bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_pods_with_big_labels_do_not_grow_the_operator() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut f = converged_trio("tr-memory").await?;
    let rss = |pid: u32| -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .ok_or_else(|| anyhow::anyhow!("no VmRSS"))?;
        let kib: u64 = line.split_whitespace().nth(1).unwrap_or("0").parse()?;
        Ok(kib * 1024)
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = rss(f.operator.pid())?;
    // 1,600 labels of 63-character keys and values: about 200 KB of labels a pod.
    let labels: serde_json::Map<String, serde_json::Value> = (0..1600)
        .map(|i| (format!("k{i:04}-{}", "x".repeat(57)), json!("v".repeat(63))))
        .collect();
    let per_pod: usize = labels
        .iter()
        .map(|(k, v)| k.len() + v.as_str().unwrap().len())
        .sum();
    for i in 0..100 {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("big-{i}"), "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "unused"}]},
        }))?;
        pods(&f).create(&Default::default(), &pod).await?;
    }
    // A pod the cluster selects, created after them: once it is labelled, the operator's
    // pod watch has taken in every big pod before it.
    let (_sim, late) = add_pod(&f, "vault-late", Role::Standby).await?;
    wait_label(&f, &late.name, None, "vault-active", "false", LIMIT).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss(f.operator.pid())?;
    let total = per_pod * 100;
    let grew = after.saturating_sub(before);
    println!(
        "operator RSS {:.1} MiB before, {:.1} MiB after 100 pods of {:.0} KB labels ({:.1} MB in all): grew {:.1} MiB",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        per_pod as f64 / 1000.0,
        total as f64 / 1e6,
        grew as f64 / 1048576.0,
    );
    assert!(
        grew < total as u64 / 2,
        "RSS grew by {grew} bytes for {total} bytes of labels no one reads"
    );
    // A start beside them lists them all at once (one page of 20 MB).
    f.operator.kill();
    f.operator = operator(&f.ns, None, &[])?;
    f.fail_over_to(1).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fresh = rss(f.operator.pid())?;
    println!(
        "a new operator started beside them: RSS {:.1} MiB",
        fresh as f64 / 1048576.0
    );
    assert!(
        fresh.saturating_sub(before) < total as u64 / 2,
        "a start beside them: RSS {fresh} bytes, against {before} without them"
    );
    Ok(())
}
