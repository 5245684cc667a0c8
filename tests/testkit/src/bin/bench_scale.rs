//! `make bench-scale [N=1000] [U=10000]`: N VaultClusters × 3 simulated Vault pods in one
//! namespace beside U unrelated pods, interval 2s, one operator replica (release build), on
//! a real API server. Prints, from measurements: cold convergence next to the time a plain
//! client takes for the same number of label PATCHes; API reads per second and writes over
//! 30 s at steady state (the API server's own metrics); the operator's RSS, peak RSS and CPU
//! (from /proc); probes per second sent against configured; the same over a longer soak
//! (third argument, seconds; default 300), where a slow leak shows as RSS growth; and one
//! failover's latency under that load. Asserts nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use serde_json::json;
use vault_registrar_testkit::cluster::{Operator, endpoint_ips};
use vault_registrar_testkit::controlplane::ControlPlane;
use vault_registrar_testkit::netns::bench_pod_ip;
use vault_registrar_testkit::pods::{SimPod, create_namespace, start_pod};
use vault_registrar_testkit::stage::{install_crd, run};
use vault_registrar_testkit::vault_sim::{Role, SimState, VaultSim};

const NS: &str = "scale";
/// The operator's probe slots in this benchmark: its default, which the targets are set at.
const PROBE_CONCURRENCY: &str = "64";
/// Requests in flight from this client while setting up, and for the plain-client baseline.
const PARALLEL: usize = 32;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let u: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let soak = Duration::from_secs(args.next().map(|a| a.parse()).transpose()?.unwrap_or(300));
    let bin = std::env::var("VAULT_REGISTRAR_BIN")?;
    println!(
        "bench-scale: {n} VaultClusters x 3 pods, {u} other pods, interval 2s, activeInterval 500ms, --probe-concurrency {PROBE_CONCURRENCY}"
    );

    let plane = ControlPlane::start()?;
    let client = plane.client().await?;
    let crd = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../crds/vaultclusters.vault-registrar.dev.yaml");
    install_crd(&plane, &crd).await?;
    create_namespace(&client, NS).await?;

    let started = Instant::now();
    other_pods(&client, u).await?;
    let (sims, pods) = vault_pods(&client, n).await?;
    println!(
        "set-up: {u} other pods and {} Vault pods in {:?}",
        pods.len(),
        started.elapsed()
    );

    let writes = |from: &BTreeMap<_, _>| -> anyhow::Result<f64> {
        let now = plane.requests()?;
        Ok(delta(from, &now, &["POST", "PUT", "PATCH", "DELETE", "APPLY"]) as f64 / n as f64)
    };
    let before = plane.requests()?;
    let bare = baseline(&client, &pods, n).await?;
    println!(
        "a plain client's writes for {n} clusters ({PARALLEL} clusters in flight), to full convergence: {bare:?}; writes per cluster (the API server's count, all clients): {:.2}",
        writes(&before)?
    );
    undo_baseline(&client, &pods, n).await?;
    let kubeconfig = operator_identity(&plane)?;
    let mut operator = Operator::start(
        bin.as_ref(),
        &kubeconfig,
        &["--namespace", NS, "--probe-concurrency", PROBE_CONCURRENCY],
        &plane.dir().join("operator-scale.log"),
    )?;
    let pid = operator.pid();
    let before = plane.requests()?;
    let cold = converge(&client, &pods, n).await?;
    println!(
        "  writes per cluster during cold convergence (the API server's count, all clients): {:.2}",
        writes(&before)?
    );
    let failed = operator.log_text().matches("reconcile failed").count();
    println!("  failed reconciles during cold convergence (the operator's log): {failed}");
    println!(
        "cold convergence of {n} clusters (every pod labelled, both Services' endpoints, every status Ready): {cold:?}; the plain client's: {bare:?}; ratio {:.2}",
        cold.as_secs_f64() / bare.as_secs_f64()
    );

    let slices = caught_up(&client, n).await?;
    println!("kube-controller-manager's EndpointSlices for every Service after another {slices:?}");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let probes = || sims.iter().map(|s| s.health_requests()).sum::<u64>();
    let ours = || plane.reads_by(OPERATOR).len();
    let (reads0, cpu0, probes0, ours0) = (plane.requests()?, cpu_ticks(pid)?, probes(), ours());
    let window = Duration::from_secs(30);
    tokio::time::sleep(window).await;
    let (reads1, cpu1, probes1, ours1) = (plane.requests()?, cpu_ticks(pid)?, probes(), ours());
    let secs = window.as_secs_f64();
    let reads = delta(&reads0, &reads1, &["GET", "LIST"]);
    let writes = delta(
        &reads0,
        &reads1,
        &["POST", "PUT", "PATCH", "DELETE", "APPLY"],
    );
    println!("steady state over {secs} s:");
    println!(
        "  API reads (GET, LIST) per second: {:.2}",
        reads as f64 / secs
    );
    println!("  API writes: {writes}");
    println!(
        "  the operator's own reads (GET, LIST; from the audit log) per second: {:.2}",
        (ours1 - ours0) as f64 / secs
    );
    let ticks = 100.0; // USER_HZ
    println!(
        "  operator CPU: {:.3} cores",
        (cpu1 - cpu0) as f64 / ticks / secs
    );
    let (rss_kib, peak_kib) = memory_kib(pid)?;
    println!(
        "  operator RSS: {} MiB, peak {} MiB",
        rss_kib / 1024,
        peak_kib / 1024
    );
    // Each settled cluster: a full round of 3 probes every 2 s, and its active pod alone
    // every 500 ms between them (3 more).
    let configured = pods.len() as f64 / 2.0 * 2.0;
    let sent = (probes1 - probes0) as f64 / secs;
    println!(
        "  probes per second: {sent:.1} sent of {configured:.1} configured (full rounds every 2s, the active pod every 500ms) ({:.1} %)",
        100.0 * sent / configured
    );

    soak_figures(
        &plane,
        pid,
        soak,
        (rss_kib, reads1, probes1),
        probes,
        configured,
    )
    .await?;

    let (label, endpoint) = failover(&client, &sims, &pods).await?;
    println!(
        "one failover under load: new active labelled after {label:?}, the only endpoint after {endpoint:?}"
    );
    // A clean stop, so that an operator built with `--features dhat-heap` writes its profile.
    operator.terminate();
    if operator.wait_exit(Duration::from_secs(60)).is_none() {
        operator.kill();
    }
    Ok(())
}

/// A longer hold at steady state: what grows with time alone (a leak of a few bytes a probe
/// is megabytes an hour at this scale) and any write the 30 s window was too short to see.
async fn soak_figures(
    plane: &ControlPlane,
    pid: u32,
    soak: Duration,
    (rss0, requests0, probes0): (u64, BTreeMap<(String, String), f64>, u64),
    probes: impl Fn() -> u64,
    configured: f64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    tokio::time::sleep(soak).await;
    let secs = started.elapsed().as_secs_f64();
    let (rss1, peak) = memory_kib(pid)?;
    let sent = (probes() - probes0) as f64 / secs;
    println!("soak over another {secs:.0} s at steady state:");
    let writes = delta(
        &requests0,
        &plane.requests()?,
        &["POST", "PUT", "PATCH", "DELETE", "APPLY"],
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    let growth = (mib(rss1) - mib(rss0)) / secs * 3600.0;
    println!(
        "  operator RSS: {:.1} MiB at its start, {:.1} MiB at its end ({growth:+.1} MiB/h), peak {:.0} MiB",
        mib(rss0),
        mib(rss1),
        mib(peak)
    );
    println!("  API writes: {writes}");
    println!(
        "  probes per second: {sent:.1} ({:.1} % of configured)",
        100.0 * sent / configured
    );
    Ok(())
}

/// The operator's identity in the audit log.
const OPERATOR: &str = "system:serviceaccount:scale:scale-operator";

/// A ServiceAccount bound to cluster-admin for the operator, so that its requests can be
/// told from everyone else's; a kubeconfig with its token.
fn operator_identity(plane: &ControlPlane) -> anyhow::Result<std::path::PathBuf> {
    let yaml = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: scale-operator, namespace: {NS}}}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: scale-operator}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}}\nsubjects: [{{kind: ServiceAccount, name: scale-operator, namespace: {NS}}}]\n"
    );
    let file = plane.dir().join("scale-operator.yaml");
    std::fs::write(&file, yaml)?;
    run(plane.kubectl().args(["apply", "-f"]).arg(&file))?;
    let token = run(plane.kubectl().args([
        "create",
        "token",
        "scale-operator",
        "-n",
        NS,
        "--duration=2h",
    ]))?;
    plane.token_kubeconfig("scale-operator", token.trim())
}

/// Unrelated pods of a realistic size: a few containers, env, annotations.
async fn other_pods(client: &kube::Client, u: usize) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), NS);
    futures::stream::iter(0..u)
        .map(|i| {
            let api = api.clone();
            async move {
                let env: Vec<_> = (0..20)
                    .map(|e| json!({"name": format!("SETTING_{e}"), "value": format!("value-{i}-{e}-{}", "x".repeat(40))}))
                    .collect();
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("app-{i}"),
                        "labels": {"app.kubernetes.io/name": "web", "app.kubernetes.io/instance": format!("web-{}", i % 100), "pod-template-hash": "5d8f7c9b6"},
                        "annotations": {"checksum/config": "0123456789abcdef".repeat(4), "prometheus.io/scrape": "true"}},
                    "spec": {"nodeName": "sim-node-0", "automountServiceAccountToken": false, "containers": [
                        {"name": "app", "image": "registry.example/web:1.2.3", "env": env, "ports": [{"containerPort": 8080}],
                         "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
                        {"name": "sidecar", "image": "registry.example/proxy:4.5.6", "args": ["--listen", ":15001", "--upstream", "127.0.0.1:8080"]}
                    ]}
                }))?;
                api.create(&PostParams::default(), &pod).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// N clusters of three pods, each answered by its own simulator in this process.
async fn vault_pods(
    client: &kube::Client,
    n: usize,
) -> anyhow::Result<(Vec<VaultSim>, Vec<SimPod>)> {
    vault_registrar_testkit::pods::ensure_node(client).await?;
    let mut sims = Vec::new();
    let mut pods = Vec::new();
    for c in 0..n {
        for (i, role) in [Role::Active, Role::Standby, Role::Standby]
            .into_iter()
            .enumerate()
        {
            let ip = bench_pod_ip(sims.len() as u32);
            sims.push(VaultSim::start((ip, 8200).into(), None, SimState::new(role)).await?);
            let labels = BTreeMap::from([
                ("app.kubernetes.io/name".to_string(), "vault".to_string()),
                ("app.kubernetes.io/instance".to_string(), format!("vc-{c}")),
            ]);
            pods.push(SimPod {
                name: format!("vc-{c}-{i}"),
                labels,
                ip,
            });
        }
    }
    futures::stream::iter(pods.clone())
        .map(|pod| async move { start_pod(client, NS, &pod).await })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    Ok((sims, pods))
}

/// What a converged cluster looks like to a reader, for the operator or the baseline.
struct Converged {
    /// The VaultClusters' name prefix (`vc-N` for the operator).
    clusters: &'static str,
    /// The role label's prefix on the pods.
    labels: &'static str,
    /// Selects the EndpointSlices of the Services written.
    slices: &'static str,
}

const OPERATOR_WRITES: Converged = Converged {
    clusters: "vc-",
    labels: "vault",
    slices: "app.kubernetes.io/managed-by=vault-registrar",
};

const BASELINE_WRITES: Converged = Converged {
    clusters: "base-",
    labels: "base",
    slices: "bench=baseline",
};

fn vault_cluster(resource: &ApiResource, name: &str, c: usize) -> DynamicObject {
    let mut vc = DynamicObject::new(name, resource).within(NS);
    vc.data = json!({"spec": {
        "selector": {"matchLabels": {"app.kubernetes.io/name": "vault", "app.kubernetes.io/instance": format!("vc-{c}")}},
        "health": {"interval": "2s", "timeout": "1s"},
    }});
    vc
}

fn cluster_api(client: &kube::Client) -> (Api<DynamicObject>, ApiResource) {
    let gvk = GroupVersionKind::gvk("vault-registrar.dev", "v1alpha1", "VaultCluster");
    let resource = ApiResource::from_gvk(&gvk);
    (
        Api::namespaced_with(client.clone(), NS, &resource),
        resource,
    )
}

/// A plain client sending the writes the operator needs for each cluster, PARALLEL clusters
/// in flight: create the VaultCluster, one label PATCH per pod, the active and standby
/// Services (server-side apply), one status PATCH. Timed until everything has converged as
/// `converged` sees it (`undo_baseline` takes it away again).
async fn baseline(client: &kube::Client, pods: &[SimPod], n: usize) -> anyhow::Result<Duration> {
    let (clusters, resource) = cluster_api(client);
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), NS);
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|c| {
            let (clusters, pod_api, services) = (clusters.clone(), pod_api.clone(), services.clone());
            let resource = resource.clone();
            async move {
                let name = format!("base-{c}");
                clusters
                    .create(&PostParams::default(), &vault_cluster(&resource, &name, c))
                    .await?;
                for (i, pod) in pods[3 * c..3 * c + 3].iter().enumerate() {
                    let patch = json!({"metadata": {"labels": role_labels("base", i == 0, &name)}});
                    pod_api
                        .patch(&pod.name, &PatchParams::default(), &Patch::Merge(patch))
                        .await?;
                }
                for (role, active) in [("active", "true"), ("standby", "false")] {
                    let service = format!("{name}-{role}");
                    let body = json!({"apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": service, "labels": {"bench": "baseline"}},
                        "spec": {"selector": {"app.kubernetes.io/instance": format!("vc-{c}"), "base-active": active},
                            "ports": [{"name": "http", "port": 8200}, {"name": "https-internal", "port": 8201}]}});
                    services
                        .patch(&service, &PatchParams::apply("bench").force(), &Patch::Apply(body))
                        .await?;
                }
                let status = json!({"status": {"observedGeneration": 1, "pods": 3, "active": 1, "standby": 2, "unsealed": 3,
                    "activePod": pods[3 * c].name,
                    "conditions": [{"type": "Ready", "status": "True", "reason": "Converged", "message": "",
                        "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string()}]}});
                clusters
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    converged(client, pods, n, &BASELINE_WRITES, start).await
}

/// The labels the operator writes on a pod, under another prefix.
fn role_labels(prefix: &str, active: bool, owner: &str) -> serde_json::Value {
    json!({
        format!("{prefix}-active"): active.to_string(),
        format!("{prefix}-initialized"): "true",
        format!("{prefix}-perf-standby"): "false",
        format!("{prefix}-sealed"): "false",
        format!("{prefix}-version"): "1.17.0",
        format!("bench.{prefix}/cluster"): owner,
    })
}

/// Takes the baseline's objects and labels away again, and waits until its EndpointSlices
/// are gone, so the operator starts on the same state.
async fn undo_baseline(client: &kube::Client, pods: &[SimPod], n: usize) -> anyhow::Result<()> {
    let (clusters, _) = cluster_api(client);
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), NS);
    let ours = ListParams::default().labels("bench=baseline");
    services
        .delete_collection(&Default::default(), &ours)
        .await?;
    futures::stream::iter(0..n)
        .map(|c| {
            let clusters = clusters.clone();
            async move {
                clusters
                    .delete(&format!("base-{c}"), &Default::default())
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    let mut removal = role_labels("base", false, "");
    for value in removal
        .as_object_mut()
        .into_iter()
        .flat_map(|m| m.values_mut())
    {
        *value = serde_json::Value::Null;
    }
    futures::stream::iter(pods)
        .map(|pod| {
            let (pod_api, patch) = (
                pod_api.clone(),
                json!({"metadata": {"labels": removal.clone()}}),
            );
            async move {
                pod_api
                    .patch(&pod.name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let start = Instant::now();
    while !slices.list_metadata(&ours).await?.items.is_empty() {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(300),
            "baseline slices left"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// Creates the VaultClusters and waits until the operator has converged them all.
async fn converge(client: &kube::Client, pods: &[SimPod], n: usize) -> anyhow::Result<Duration> {
    let (clusters, resource) = cluster_api(client);
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|c| {
            let (clusters, resource) = (clusters.clone(), resource.clone());
            async move {
                let vc = vault_cluster(&resource, &format!("vc-{c}"), c);
                clusters.create(&PostParams::default(), &vc).await
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    converged(client, pods, n, &OPERATOR_WRITES, start).await
}

/// Waits for full convergence and returns the time since `start`: every pod carries its
/// role label, each cluster's active Service has exactly its active pod as ready endpoint
/// and its standby Service exactly the two standbys, and every VaultCluster's status says
/// Ready. Polled every 200 ms. After 15 minutes it says what is missing and returns the
/// time so far, so that the other figures are still taken.
async fn converged(
    client: &kube::Client,
    pods: &[SimPod],
    n: usize,
    what: &Converged,
    start: Instant,
) -> anyhow::Result<Duration> {
    loop {
        let missing = not_converged(client, pods, n, what).await?;
        if missing.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= Duration::from_secs(900) {
            println!(
                "NOT CONVERGED within 15 min ({}): {missing:?}",
                what.clusters
            );
            return Ok(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What is not converged yet: counts of pods, Services and statuses still wrong.
async fn not_converged(
    client: &kube::Client,
    pods: &[SimPod],
    n: usize,
    what: &Converged,
) -> anyhow::Result<Vec<String>> {
    let mut missing = Vec::new();
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), NS);
    let vault = ListParams::default().labels("app.kubernetes.io/name=vault");
    let labels: BTreeMap<String, String> = pod_api
        .list_metadata(&vault)
        .await?
        .items
        .into_iter()
        .map(|p| {
            let value = p.labels().get(&format!("{}-active", what.labels)).cloned();
            (p.name_any(), value.unwrap_or_default())
        })
        .collect();
    let unlabelled = (0..3 * n)
        .filter(|i| {
            labels.get(&pods[*i].name).map(String::as_str)
                != Some(if i % 3 == 0 { "true" } else { "false" })
        })
        .count();
    if unlabelled > 0 {
        missing.push(format!("{unlabelled} pods unlabelled"));
    }
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let mut endpoints: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for slice in slices
        .list(&ListParams::default().labels(what.slices))
        .await?
        .items
    {
        let service = slice
            .labels()
            .get("kubernetes.io/service-name")
            .cloned()
            .unwrap_or_default();
        let ready = slice
            .endpoints
            .iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
            .flat_map(|e| e.addresses.iter().cloned());
        endpoints.entry(service).or_default().extend(ready);
    }
    let wrong = (0..n)
        .filter(|c| {
            let ips = |i: &[usize]| {
                let mut ips: Vec<String> =
                    i.iter().map(|i| pods[3 * c + i].ip.to_string()).collect();
                ips.sort();
                ips
            };
            let got = |role: &str| {
                let mut ips = endpoints
                    .get(&format!("{}{c}-{role}", what.clusters))
                    .cloned()
                    .unwrap_or_default();
                ips.sort();
                ips
            };
            got("active") != ips(&[0]) || got("standby") != ips(&[1, 2])
        })
        .count();
    if wrong > 0 {
        missing.push(format!(
            "{wrong} clusters' Services without their endpoints"
        ));
    }
    let (clusters, _) = cluster_api(client);
    let ready = clusters
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|vc| vc.name_any().starts_with(what.clusters))
        .filter(|vc| {
            vc.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .count();
    if ready < n {
        missing.push(format!("{} statuses not Ready", n - ready));
    }
    Ok(missing)
}

/// Requests of these verbs between two readings; each resource with any is printed.
fn delta(
    before: &BTreeMap<(String, String), f64>,
    after: &BTreeMap<(String, String), f64>,
    verbs: &[&str],
) -> u64 {
    let mut total = 0.0;
    for ((verb, resource), n) in after
        .iter()
        .filter(|((v, _), _)| verbs.contains(&v.as_str()))
    {
        let d = n - before
            .get(&(verb.clone(), resource.clone()))
            .copied()
            .unwrap_or(0.0);
        if d > 0.0 {
            println!("    {verb} {resource}: {d}");
            total += d;
        }
    }
    total as u64
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// VmRSS and VmHWM, in KiB.
fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((kib("VmRSS:"), kib("VmHWM:")))
}

/// Waits until kube-controller-manager has an EndpointSlice for each generated Service:
/// it catches up on 2N new Services at its own pace, and a failover measured before that
/// would measure its backlog.
async fn caught_up(client: &kube::Client, n: usize) -> anyhow::Result<Duration> {
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(client.clone(), NS);
    let ours = ListParams::default().labels("app.kubernetes.io/managed-by=vault-registrar");
    let start = Instant::now();
    while slices.list_metadata(&ours).await?.items.len() < 2 * n {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "EndpointSlices not caught up in 10 min"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(start.elapsed())
}

/// Cluster vc-0 fails over from pod 0 to pod 1: until the new pod is labelled active, and
/// until it is the only endpoint of the active Service.
async fn failover(
    client: &kube::Client,
    sims: &[VaultSim],
    pods: &[SimPod],
) -> anyhow::Result<(Duration, Duration)> {
    let api: Api<Pod> = Api::namespaced(client.clone(), NS);
    let start = Instant::now();
    sims[0].update(|s| s.role = Role::Standby).await;
    sims[1].update(|s| s.role = Role::Active).await;
    let want = vec![pods[1].ip.to_string()];
    let mut labelled = None;
    while endpoint_ips(client, NS, "vc-0-active").await? != want {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "no failover within 60 s"
        );
        if labelled.is_none() {
            let labels = api.get_metadata(&pods[1].name).await?.metadata.labels;
            if labels
                .unwrap_or_default()
                .get("vault-active")
                .map(String::as_str)
                == Some("true")
            {
                labelled = Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let endpoint = start.elapsed();
    Ok((labelled.unwrap_or(endpoint), endpoint))
}
