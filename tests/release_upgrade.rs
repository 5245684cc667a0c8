//! The upgrade from the previous release to this tree, as a user runs it: the chart of tag
//! `v0.1.0` (before the ownership label `vault-registrar.dev/cluster`) installed with that
//! release's operator binary, then `helm upgrade` to this chart and the Deployment's rolling
//! update to this binary, the operator running throughout. A watch on the active Service's
//! EndpointSlices sees every state the API server stored: never empty, never two pods.
//!
//! The tagged release is built by `tests/release/build.sh` (once, cached by commit);
//! `make test` builds it first and passes its directory in `VAULT_REGISTRAR_RELEASE_DIR`.
//! Its own test binary, so its own control plane: Helm owns the CRD here.

mod chart;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};

use chart::{chart, deployed_args, helm, kubectl, values};
use vault_registrar_testkit::cluster::{Operator, SimCluster, wait_endpoints};
use vault_registrar_testkit::election::http_get;
use vault_registrar_testkit::history::LabelHistory;
use vault_registrar_testkit::pods::create_namespace;
use vault_registrar_testkit::vault_sim::Role;
use vault_registrar_testkit::{shared, wait};

const LIMIT: Duration = Duration::from_secs(60);
const OPS: &str = "release-ops";
const APPS: &str = "release-apps";
const RELEASE: &str = "vr";
/// The release's resources, ServiceAccount and Lease: "<release>-vault-registrar" in both
/// charts.
const FULLNAME: &str = "vr-vault-registrar";
const OWNER_LABEL: &str = "vault-registrar.dev/cluster";

/// The previous release: its directory from `tests/release/build.sh` (binary and chart).
/// Fails, with the script's reason, when the tag or its commit is not in the clone.
fn previous_release() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("VAULT_REGISTRAR_RELEASE_DIR") {
        return Ok(dir.into());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/release/build.sh");
    let out = std::process::Command::new(&script).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().into())
}

async fn lease_holder(client: &kube::Client) -> anyhow::Result<Option<String>> {
    let lease = Api::<Lease>::namespaced(client.clone(), OPS)
        .get_opt(FULLNAME)
        .await?;
    Ok(lease
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

/// Every state of a Service's ready endpoints the API server stored, from a watch on its
/// EndpointSlices (a relist, which may skip states, is counted).
struct Endpoints {
    states: Arc<Mutex<Vec<Vec<String>>>>,
    relists: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoints {
    async fn watch(client: &kube::Client, ns: &str, service: &str) -> anyhow::Result<Self> {
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
        let config =
            watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
        let stream = watcher(slices, config).default_backoff();
        let states = Arc::new(Mutex::new(Vec::new()));
        let relists = Arc::new(Mutex::new(0));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (st, rl) = (states.clone(), relists.clone());
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut current: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut listing: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let Ok(event) = event else { continue };
                // The state of a listing counts once it is complete.
                let in_listing =
                    matches!(event, watcher::Event::Init | watcher::Event::InitApply(_));
                match event {
                    watcher::Event::Init => listing.clear(),
                    watcher::Event::InitApply(s) => {
                        listing.insert(s.metadata.name.clone().unwrap_or_default(), ready_of(&s));
                    }
                    watcher::Event::InitDone => {
                        current = std::mem::take(&mut listing);
                        if ready.take().map(|tx| tx.send(())).is_none() {
                            *rl.lock().unwrap() += 1;
                        }
                    }
                    watcher::Event::Apply(s) => {
                        current.insert(s.metadata.name.clone().unwrap_or_default(), ready_of(&s));
                    }
                    watcher::Event::Delete(s) => {
                        current.remove(&s.metadata.name.clone().unwrap_or_default());
                    }
                }
                if in_listing {
                    continue;
                }
                let mut now: Vec<String> = current.values().flatten().cloned().collect();
                now.sort();
                now.dedup();
                let mut states = st.lock().unwrap();
                if states.last() != Some(&now) {
                    states.push(now);
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), ready_rx).await??;
        Ok(Self {
            states,
            relists,
            task,
        })
    }

    /// Each distinct state so far, in order.
    fn states(&self) -> Vec<Vec<String>> {
        self.states.lock().unwrap().clone()
    }

    /// Stops and returns each distinct state in order, and the relists.
    fn finish(self) -> (Vec<Vec<String>>, usize) {
        self.task.abort();
        let states = self.states.lock().unwrap().clone();
        let relists = *self.relists.lock().unwrap();
        (states, relists)
    }
}

/// Ready addresses of one EndpointSlice.
fn ready_of(slice: &EndpointSlice) -> Vec<String> {
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect()
}

/// The operator replicas of one chart version, as the Deployment's pods would run them.
fn replica(bin: &Path, kubeconfig: &Path, args: &[String], pod: &str) -> anyhow::Result<Operator> {
    let log = shared().dir().join(format!("operator-{pod}.log"));
    Operator::start_deployed(bin, kubeconfig, args, (pod, OPS), &log)
}

/// Waits until a replica of this release answers its readiness probe, as a rolling update
/// waits for the new pod to be Ready before it removes an old one. The port is the one the
/// replica logged (it listens on any free one here).
async fn ready(op: &Operator, name: &str) -> anyhow::Result<()> {
    wait::until(&format!("{name} ready"), LIMIT, || async {
        let text = op.log_text();
        let Some(port) = text
            .lines()
            .find(|l| l.contains("serving /healthz and /readyz"))
            .and_then(|l| l.split("\"addr\":\"127.0.0.1:").nth(1))
            .and_then(|rest| rest.split('"').next())
            .and_then(|p| p.parse::<u16>().ok())
        else {
            return Ok(None);
        };
        let (status, _) = http_get(port, "/readyz", Duration::from_secs(2)).await?;
        Ok((status == 200).then_some(()))
    })
    .await
}

/// Sends SIGTERM, as the kubelet does to a pod the rollout removes, and waits for the exit.
fn terminate(op: &mut Operator, name: &str) -> anyhow::Result<()> {
    op.terminate();
    anyhow::ensure!(
        op.wait_exit(Duration::from_secs(30)).is_some(),
        "{name} did not exit on SIGTERM"
    );
    Ok(())
}

#[tokio::test]
async fn upgrade_from_the_previous_release_keeps_one_active_endpoint() -> anyhow::Result<()> {
    let previous = previous_release()?;
    let old_bin = previous.join("vault-registrar");
    let old_chart = previous.join("chart");
    anyhow::ensure!(
        old_bin.is_file() && old_chart.join("Chart.yaml").is_file(),
        "{} holds no release built by tests/release/build.sh",
        previous.display()
    );
    let client = shared().client().await?;
    create_namespace(&client, OPS).await?;
    create_namespace(&client, APPS).await?;

    // The previous release, as its README installed it (its CRD from the chart's crds/).
    let mut install = vec!["install", RELEASE, old_chart.to_str().unwrap(), "-n", OPS];
    install.extend(values("defaults"));
    helm(&install).await?;
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/vaultclusters.vault-registrar.dev",
        "--timeout=60s",
    ])
    .await?;
    let vault = SimCluster::start(
        &client,
        APPS,
        "vault",
        &[Role::Active, Role::Standby, Role::Standby],
        None,
    )
    .await?;
    let vc: serde_json::Value = serde_json::json!({
        "apiVersion": "vault-registrar.dev/v1alpha1", "kind": "VaultCluster",
        "metadata": {"name": "vault", "namespace": APPS},
        "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": "vault"}},
                 "health": {"interval": "500ms", "timeout": "300ms"}}});
    let vc: vault_registrar::crd::VaultCluster = serde_json::from_value(vc)?;
    Api::namespaced(client.clone(), APPS)
        .create(&PostParams::default(), &vc)
        .await?;

    let token = kubectl(&["create", "token", FULLNAME, "-n", OPS, "--duration=2h"]).await?;
    let kubeconfig = shared().token_kubeconfig("release-operator", token.trim())?;
    let old_args = deployed_args(OPS, FULLNAME).await?;
    let mut old = [
        replica(&old_bin, &kubeconfig, &old_args, "vr-old-a")?,
        replica(&old_bin, &kubeconfig, &old_args, "vr-old-b")?,
    ];
    vault
        .wait_labels(
            "vault-active",
            &[Some("true"), Some("false"), Some("false")],
            LIMIT,
        )
        .await?;
    wait_endpoints(&client, APPS, "vault-active", &[vault.ip(0)], LIMIT).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), APPS);
    let selector = |s: Service| s.spec.and_then(|s| s.selector).unwrap_or_default();
    assert!(
        !selector(services.get("vault-active").await?).contains_key(OWNER_LABEL),
        "the previous release has no ownership label"
    );

    let endpoints = Endpoints::watch(&client, APPS, "vault-active").await?;
    let labels = LabelHistory::start(client.clone(), APPS, "vault-active", "true").await?;

    // The upgrade: the chart README's adoption of the CRD 0.1.0 installed from crds/, then
    // helm upgrade to this chart (CRD, RBAC, admission policies, Deployment).
    kubectl(&[
        "label",
        "crd",
        "vaultclusters.vault-registrar.dev",
        "app.kubernetes.io/managed-by=Helm",
    ])
    .await?;
    kubectl(&[
        "annotate",
        "crd",
        "vaultclusters.vault-registrar.dev",
        &format!("meta.helm.sh/release-name={RELEASE}"),
        &format!("meta.helm.sh/release-namespace={OPS}"),
    ])
    .await?;
    let current = chart();
    let mut upgrade = vec!["upgrade", RELEASE, current.to_str().unwrap(), "-n", OPS];
    upgrade.extend(values("defaults"));
    helm(&upgrade).await?;
    let new_args = deployed_args(OPS, FULLNAME).await?;
    assert_ne!(old_args, new_args, "the Deployment changed");

    // The rolling update of two replicas (maxSurge 1, maxUnavailable 0): a new replica
    // starts, then an old one gets SIGTERM; twice. The leader goes first, so the Lease
    // passes between the versions.
    // This build's operator, or the one VAULT_REGISTRAR_OPERATOR_BIN names (see README, "How
    // the tests work": how a test is shown to fail on a broken operator).
    let new_bin: PathBuf = std::env::var_os("VAULT_REGISTRAR_OPERATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_vault-registrar").into());
    let new_bin = new_bin.as_path();
    let mut new = vec![replica(new_bin, &kubeconfig, &new_args, "vr-new-a")?];
    ready(&new[0], "vr-new-a").await?;
    let leader = lease_holder(&client).await?.unwrap_or_default();
    let first = usize::from(leader == "vr-old-b");
    terminate(&mut old[first], "the old leader")?;
    new.push(replica(new_bin, &kubeconfig, &new_args, "vr-new-b")?);
    ready(&new[1], "vr-new-b").await?;
    terminate(&mut old[1 - first], "the other old replica")?;
    wait::until("a new replica holds the Lease", LIMIT, || async {
        Ok(lease_holder(&client)
            .await?
            .filter(|h| h.starts_with("vr-new-"))
            .map(|_| ()))
    })
    .await?;

    // This release takes the pods and the Services over: the ownership label on each pod,
    // then in the active Service's selector.
    wait::until("the ownership label in the selector", LIMIT, || async {
        let svc = services.get("vault-active").await?;
        Ok(selector(svc).contains_key(OWNER_LABEL).then_some(()))
    })
    .await?;
    for i in 0..3 {
        let labels = vault.labels(i).await?;
        assert_eq!(
            labels.get(OWNER_LABEL).map(String::as_str),
            Some("vault"),
            "{labels:?}"
        );
    }
    // Through the upgrade the active pod never changed: its one endpoint never left.
    let upgrade = endpoints.states();
    println!("active Service endpoints through the upgrade: {upgrade:?}");
    assert_eq!(
        upgrade,
        vec![vec![vault.ip(0)]],
        "the active Service's endpoints changed during the upgrade"
    );

    // A failover inside Vault, under this release. The demoted pod leaves the Service
    // before the promoted one joins (see "Probing"), so here a moment without an endpoint
    // is expected; two never.
    vault.sim(0).update(|s| s.role = Role::Standby).await;
    vault.sim(1).update(|s| s.role = Role::Active).await;
    wait_endpoints(&client, APPS, "vault-active", &[vault.ip(1)], LIMIT).await?;

    let history = labels.finish().await?;
    let (states, relists) = endpoints.finish();
    println!("active Service endpoints to the failover's end: {states:?}");
    history.check(None, 0)?;
    assert_eq!(
        relists, 0,
        "the EndpointSlice watch relisted: states may be missing"
    );
    assert!(
        states.iter().all(|s| s.len() <= 1),
        "two active endpoints at one moment: {states:?}"
    );
    assert_eq!(
        states.last(),
        Some(&vec![vault.ip(1)]),
        "last state: {states:?}"
    );
    for op in &new {
        let text = op.log_text();
        assert!(!text.contains("forbidden"), "{text}");
    }
    Ok(())
}
