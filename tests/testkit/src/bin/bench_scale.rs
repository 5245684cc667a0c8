//! `make bench-scale [N=1000] [U=10000]`: N VaultClusters × 3 simulated Vault pods in one
//! namespace beside U unrelated pods, interval 2s, one operator replica (release build), on
//! a real API server. Prints, from measurements: cold convergence next to the time a plain
//! client takes for the same number of label PATCHes; API reads per second and writes over
//! 30 s at steady state (the API server's own metrics); the operator's RSS, peak RSS and CPU
//! (from /proc); probes per second sent against configured; and one failover's latency
//! under that load. Asserts nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
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
/// The operator's probe slots in this benchmark (its default is 64).
const PROBE_CONCURRENCY: &str = "256";
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

    let bare = bare_patches(&client, &pods).await?;
    let kubeconfig = operator_identity(&plane)?;
    let mut operator = Operator::start(
        bin.as_ref(),
        &kubeconfig,
        &["--namespace", NS, "--probe-concurrency", PROBE_CONCURRENCY],
        &plane.dir().join("operator-scale.log"),
    )?;
    let pid = operator.pid();
    let cold = converge(&client, n).await?;
    println!(
        "cold convergence of {n} clusters: {cold:?}; a plain client's {} label PATCHes ({PARALLEL} in flight): {bare:?}; ratio {:.2}",
        pods.len(),
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
    let (rss, peak) = memory(pid)?;
    println!("  operator RSS: {rss} MiB, peak {peak} MiB");
    // Each settled cluster: a full round of 3 probes every 2 s, and its active pod alone
    // every 500 ms between them (3 more).
    let configured = pods.len() as f64 / 2.0 * 2.0;
    let sent = (probes1 - probes0) as f64 / secs;
    println!(
        "  probes per second: {sent:.1} sent of {configured:.1} configured (full rounds every 2s, the active pod every 500ms) ({:.1} %)",
        100.0 * sent / configured
    );

    let (label, endpoint) = failover(&client, &sims, &pods).await?;
    println!(
        "one failover under load: new active labelled after {label:?}, the only endpoint after {endpoint:?}"
    );
    operator.kill();
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

/// What a plain client takes to PATCH one label on every Vault pod, then take it off again
/// (timed: the first pass).
async fn bare_patches(client: &kube::Client, pods: &[SimPod]) -> anyhow::Result<Duration> {
    let api: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pass = |value: serde_json::Value| {
        let api = api.clone();
        async move {
            futures::stream::iter(pods)
                .map(|pod| {
                    let (api, value) = (api.clone(), value.clone());
                    async move {
                        let patch = json!({"metadata": {"labels": {"bench-bare": value}}});
                        api.patch(&pod.name, &PatchParams::default(), &Patch::Merge(patch))
                            .await
                    }
                })
                .buffer_unordered(PARALLEL)
                .try_collect::<Vec<_>>()
                .await
        }
    };
    let start = Instant::now();
    pass(json!("x")).await?;
    let took = start.elapsed();
    pass(serde_json::Value::Null).await?;
    Ok(took)
}

/// Creates the VaultClusters and waits until every cluster has its one active pod labelled.
async fn converge(client: &kube::Client, n: usize) -> anyhow::Result<Duration> {
    let gvk = GroupVersionKind::gvk("vault-registrar.dev", "v1alpha1", "VaultCluster");
    let resource = ApiResource::from_gvk(&gvk);
    let clusters: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &resource);
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|c| {
            let (clusters, resource) = (clusters.clone(), resource.clone());
            async move {
                let mut vc = DynamicObject::new(&format!("vc-{c}"), &resource).within(NS);
                vc.data = json!({"spec": {
                    "selector": {"matchLabels": {"app.kubernetes.io/name": "vault", "app.kubernetes.io/instance": format!("vc-{c}")}},
                    "health": {"interval": "2s", "timeout": "1s"},
                }});
                clusters.create(&PostParams::default(), &vc).await
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    loop {
        let active = pods
            .list_metadata(&ListParams::default().labels("vault-active=true"))
            .await?
            .items
            .len();
        if active >= n {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(900),
            "{active} of {n} converged in 15 min"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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

/// VmRSS and VmHWM, in MiB.
fn memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((kib("VmRSS:") / 1024, kib("VmHWM:") / 1024))
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
