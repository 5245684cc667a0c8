//! End-to-end tests against real Vault: a 3-node raft HA cluster of Vault 1.21.4 processes
//! whose nodes are pods of the test plane, probed by the real operator binary. They drive
//! Vault the way an operator of Vault would (init, unseal, step-down, seal, kill, restart,
//! raft remove-peer) and assert the labels and the Services' EndpointSlices that follow,
//! and that no moment shows two pods, or a pod that is not Vault's active node, labelled
//! active.
//!
//! One real cluster runs at a time: raft with `performance_multiplier = 1` has tight
//! timeouts, and several clusters on two cores would hold spurious elections.

mod common;

use anyhow::Context;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{namespace, operator};
use kube::api::{Api, PostParams};
use tokio::sync::{Mutex, MutexGuard};
use vault_registrar::crd::VaultCluster;
use vault_registrar_testkit::cluster::{Operator, endpoint_ips, wait_endpoints};
use vault_registrar_testkit::history::LabelHistory;
use vault_registrar_testkit::pods::set_running;
use vault_registrar_testkit::real_vault::{HealthLog, RaftCluster, VAULT_VERSION};
use vault_registrar_testkit::wait;

/// Raft elections and joins take seconds; this bounds every wait.
const LIMIT: Duration = Duration::from_secs(60);
const SPEC: &str = "health: {interval: 1s, timeout: 800ms, failureThreshold: 2}";

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::const_new(());

struct Rig {
    _turn: MutexGuard<'static, ()>,
    client: kube::Client,
    ns: String,
    vault: RaftCluster,
    _operator: Operator,
}

/// A namespace with a real 3-node cluster initialised and unsealed, the operator, and
/// VaultCluster `vault` over the pods.
async fn rig(name: &str) -> anyhow::Result<Rig> {
    let turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let ns = format!("rv-{name}");
    let client = namespace(&ns).await?;
    let vault = RaftCluster::start(&client, &ns, "vault", 3).await?;
    let op = operator(&ns, None, &[])?;
    let yaml = format!(
        "apiVersion: vault-registrar.dev/v1alpha1\nkind: VaultCluster\nmetadata: {{name: vault}}\nspec:\n  selector: {{matchLabels: {{app.kubernetes.io/name: vault}}}}\n  {SPEC}\n"
    );
    let vc: VaultCluster = serde_yaml::from_str(&yaml)?;
    Api::<VaultCluster>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &vc)
        .await?;
    Ok(Rig {
        _turn: turn,
        client,
        ns,
        vault,
        _operator: op,
    })
}

impl Rig {
    async fn endpoints(&self, service: &str, pods: &[usize]) -> anyhow::Result<()> {
        let ips: Vec<String> = pods.iter().map(|i| self.vault.ip(*i)).collect();
        wait_endpoints(&self.client, &self.ns, service, &ips, LIMIT).await
    }

    /// Pod `active` labelled active, the pods in `standbys` labelled unsealed standbys, and
    /// the two Services routing to exactly those.
    async fn routed(&self, active: usize, standbys: &[usize]) -> anyhow::Result<()> {
        let n = self.vault.len();
        let role = |i: usize| {
            if i == active {
                Some("true")
            } else if standbys.contains(&i) {
                Some("false")
            } else {
                None
            }
        };
        wait::until("active and standby labels", LIMIT, || async {
            for i in (0..n).filter(|i| role(*i).is_some()) {
                let labels = self.vault.labels(i).await?;
                let get = |k: &str| labels.get(k).map(String::as_str);
                if get("vault-active") != role(i) || get("vault-sealed") != Some("false") {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
        .await?;
        self.endpoints("vault-active", &[active]).await?;
        self.endpoints("vault-standby", standbys).await
    }

    /// The labels the operator gives a pod that cannot serve: the after-shutdown ones.
    async fn shut_down(&self, i: usize) -> anyhow::Result<()> {
        self.pod_labels_are(i, "false", "false", "true").await
    }

    async fn pod_labels_are(
        &self,
        i: usize,
        active: &str,
        initialized: &str,
        sealed: &str,
    ) -> anyhow::Result<()> {
        let want = [
            ("vault-active", active),
            ("vault-initialized", initialized),
            ("vault-sealed", sealed),
        ];
        wait::until(&format!("vault-{i} labels {want:?}"), LIMIT, || async {
            let labels = self.vault.labels(i).await?;
            let ok = want
                .iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v));
            Ok(ok.then_some(()))
        })
        .await
    }

    /// Watches every stored version of the pods' `vault-active` label until finished.
    async fn watch_active_labels(&self) -> anyhow::Result<ActiveWatch> {
        let history =
            LabelHistory::start(self.client.clone(), &self.ns, "vault-active", "true").await?;
        Ok(ActiveWatch(history))
    }
}

/// The pods labelled `vault-active=true` at every version of the pods the API server stored
/// while it ran (a pod watch, `testkit::history`).
struct ActiveWatch(LabelHistory);

impl ActiveWatch {
    /// Stops watching; fails if two pods were labelled active at any stored version, if a
    /// pod outside `allowed` was labelled active at all, or if the watch missed versions;
    /// every distinct set of pods labelled active, in order.
    async fn finish(self, allowed: &[&str]) -> anyhow::Result<Vec<BTreeSet<String>>> {
        let history = self.0.finish().await?;
        history.check(Some(allowed), 0)?;
        Ok(history.sets)
    }
}

/// Prints what each node answered while `health` ran, for the test log.
fn report(vault: &RaftCluster, health: &HealthLog, when: &str) {
    for i in 0..vault.len() {
        let node = health.node(i);
        eprintln!(
            "{} {when}: codes {:?}, no answer {}, slowest answer {:?}",
            vault.pod_name(i),
            node.codes,
            node.failures,
            node.slowest_answer
        );
    }
}

fn others(n: usize, except: &[usize]) -> Vec<usize> {
    (0..n).filter(|i| !except.contains(i)).collect()
}

/// The node that answers 200, once it is not `old`.
async fn new_active(vault: &RaftCluster, old: usize) -> anyhow::Result<usize> {
    let start = Instant::now();
    loop {
        let now = vault.wait_active(LIMIT).await?;
        if now != old {
            return Ok(now);
        }
        anyhow::ensure!(start.elapsed() < LIMIT, "{old} stayed active");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn real_vault_init_step_down_and_seal_move_the_active_label() -> anyhow::Result<()> {
    let rig = rig("stepdown").await?;
    let a = rig.vault.wait_active(LIMIT).await?;
    rig.routed(a, &others(3, &[a])).await?;
    let labels = rig.vault.labels(a).await?;
    assert_eq!(
        labels.get("vault-version").map(String::as_str),
        Some(VAULT_VERSION)
    );
    assert_eq!(
        labels.get("vault-initialized").map(String::as_str),
        Some("true")
    );

    // Step-down: the old active holds its answer ~0.5 s, then answers 429 as a standby.
    let ips: Vec<_> = rig.vault.nodes.iter().map(|n| n.ip()).collect();
    let health = HealthLog::start(&ips, Duration::from_millis(10));
    let watch = rig.watch_active_labels().await?;
    rig.vault.step_down(a).await?;
    let b = new_active(&rig.vault, a).await?;
    rig.routed(b, &others(3, &[b])).await?;
    watch
        .finish(&[rig.vault.pod_name(a), rig.vault.pod_name(b)])
        .await?;
    report(&rig.vault, &health, "around the step-down");
    drop(health);

    // Seal of the active: it answers 503 at once and another node takes over.
    let watch = rig.watch_active_labels().await?;
    rig.vault.seal(b).await?;
    let c = new_active(&rig.vault, b).await?;
    rig.routed(c, &others(3, &[b, c])).await?;
    rig.pod_labels_are(b, "false", "true", "true").await?;
    watch
        .finish(&[rig.vault.pod_name(b), rig.vault.pod_name(c)])
        .await?;

    // The sealed node, unsealed, rejoins the standby pool.
    rig.vault.unseal(b).await?;
    rig.routed(c, &others(3, &[c])).await?;
    Ok(())
}

#[tokio::test]
async fn real_vault_sigkill_of_active_then_restart_sealed_and_unseal() -> anyhow::Result<()> {
    let mut rig = rig("sigkill").await?;
    let a = rig.vault.wait_active(LIMIT).await?;
    rig.routed(a, &others(3, &[a])).await?;
    let ips: Vec<_> = rig.vault.nodes.iter().map(|n| n.ip()).collect();
    let health = HealthLog::start(&ips, Duration::from_millis(10));
    let watch = rig.watch_active_labels().await?;
    rig.vault.kill(a);
    let b = new_active(&rig.vault, a).await?;
    rig.routed(b, &others(3, &[a, b])).await?;
    // Nothing answers on the dead pod: after failureThreshold probes, after-shutdown labels.
    rig.shut_down(a).await?;
    let answered_200: Vec<&str> = (0..3)
        .filter(|i| health.node(*i).became_active.is_some())
        .map(|i| rig.vault.pod_name(i))
        .collect();
    let mut allowed = answered_200.clone();
    allowed.push(rig.vault.pod_name(a));
    let seen = watch.finish(&allowed).await?;
    report(&rig.vault, &health, "during the election");
    eprintln!("pods labelled active, in order: {seen:?}");
    drop(health);

    // Restarted, the node is sealed: labelled sealed, in neither Service.
    rig.vault.restart(a).await?;
    rig.pod_labels_are(a, "false", "true", "true").await?;
    rig.routed(b, &others(3, &[a, b])).await?;
    rig.vault.unseal(a).await?;
    rig.vault.wait_code(a, 429, LIMIT).await?;
    rig.routed(b, &others(3, &[b])).await?;
    Ok(())
}

#[tokio::test]
async fn real_vault_standby_answering_474_is_never_labelled_active() -> anyhow::Result<()> {
    let mut rig = rig("quorum").await?;
    let a = rig.vault.wait_active(LIMIT).await?;
    rig.routed(a, &others(3, &[a])).await?;
    let (s, t) = (others(3, &[a])[0], others(3, &[a])[1]);
    // Killing the active and one standby leaves the third without a quorum to elect a
    // leader: it stays a standby whose link to the active is gone, answering 474 for as
    // long as this lasts, which makes Vault's 474 phase last on demand.
    let watch = rig.watch_active_labels().await?;
    rig.vault.kill(a);
    rig.vault.kill(s);
    // No kubelet runs here: mark the dead pods not Ready as it would. Nobody answers active,
    // so without it their labels would rightly be held.
    for i in [a, s] {
        set_running(&rig.client, &rig.ns, &rig.vault.nodes[i].pod, false).await?;
    }
    rig.vault.wait_code(t, 474, LIMIT).await?;
    let body = rig.vault.health(t).await?;
    assert_eq!(
        body.flag("ha_connection_healthy"),
        Some(false),
        "{:?}",
        body.body
    );
    rig.shut_down(a).await?;
    rig.shut_down(s).await?;
    // Several probe rounds of 474 answers.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        rig.vault.health(t).await?.code,
        474,
        "still without a leader"
    );
    rig.pod_labels_are(t, "false", "true", "false").await?;
    assert_eq!(
        endpoint_ips(&rig.client, &rig.ns, "vault-active").await?,
        Vec::<String>::new()
    );
    let seen = watch.finish(&[rig.vault.pod_name(a)]).await?;
    assert!(
        seen.iter().all(|set| !set.contains(rig.vault.pod_name(t))),
        "the 474 standby was labelled active: {seen:?}"
    );

    // Quorum back: the restarted nodes, unsealed, elect a leader and labels follow.
    for i in [a, s] {
        rig.vault.restart(i).await?;
        rig.vault.unseal(i).await?;
        set_running(&rig.client, &rig.ns, &rig.vault.nodes[i].pod, true).await?;
    }
    let watch = rig.watch_active_labels().await?;
    let b = rig.vault.wait_active(LIMIT).await?;
    for i in others(3, &[b]) {
        rig.vault.wait_code(i, 429, LIMIT).await?;
    }
    rig.routed(b, &others(3, &[b])).await?;
    watch.finish(&[rig.vault.pod_name(b)]).await?;
    Ok(())
}

#[tokio::test]
async fn real_vault_uninitialized_and_removed_nodes_leave_the_services() -> anyhow::Result<()> {
    let mut rig = rig("removed").await?;
    let a = rig.vault.wait_active(LIMIT).await?;
    let u = rig.vault.add_uninitialized().await?;
    let standbys = others(3, &[a]);
    rig.routed(a, &standbys).await?;
    // Never initialised (501): initialized=false, sealed, in neither Service.
    rig.pod_labels_are(u, "false", "false", "true").await?;

    // Removed from raft, the node seals itself and answers 530 for good.
    let r = standbys[0];
    rig.vault.remove_peer(r, a).await?;
    rig.vault.wait_code(r, 530, LIMIT).await?;
    let answer = rig.vault.health(r).await?;
    assert_eq!(
        answer.flag("removed_from_cluster"),
        Some(true),
        "{:?}",
        answer.body
    );
    rig.shut_down(r).await?;
    rig.routed(a, &standbys[1..]).await?;
    rig.pod_labels_are(u, "false", "false", "true").await?;
    Ok(())
}

/// Listeners with `tls_require_and_verify_client_cert = true`, where Vault's own health
/// checks break: without `clientCertSecretRef` every probe fails with an error that names the
/// setting and no pod is labelled; with it, the labels follow a step-down.
#[tokio::test]
async fn real_vault_listeners_requiring_client_certificates() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use kube::api::{Patch, PatchParams};

    let turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let ns = "rv-mtls".to_string();
    let client = namespace(&ns).await?;
    let vault = RaftCluster::start_mutual_tls(&client, &ns, "vault", 3).await?;
    let tls = vault.tls.as_ref().expect("mutual TLS");
    let objects: Vec<serde_json::Value> = vec![
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "vault-ca"},
            "data": {"ca.crt": tls.ca_pem}}),
        serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vault-probe"},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": tls.client.cert, "tls.key": tls.client.key}}),
    ];
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(objects[0].clone())?,
    )
    .await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(objects[1].clone())?,
        )
        .await?;
    let op = operator(&ns, None, &[])?;
    let yaml = "apiVersion: vault-registrar.dev/v1alpha1\nkind: VaultCluster\nmetadata: {name: vault}\nspec:\n  selector: {matchLabels: {app.kubernetes.io/name: vault}}\n  health: {scheme: https, interval: 1s, timeout: 800ms, failureThreshold: 2, tls: {caConfigMapRef: {name: vault-ca}}}\n";
    let vc: VaultCluster = serde_yaml::from_str(yaml)?;
    let clusters = Api::<VaultCluster>::namespaced(client.clone(), &ns);
    clusters.create(&PostParams::default(), &vc).await?;
    let rig = Rig {
        _turn: turn,
        client: client.clone(),
        ns: ns.clone(),
        vault,
        _operator: op,
    };

    // Without the certificate: the listener refuses the probe, the error names the setting.
    let a = rig.vault.wait_active(LIMIT).await?;
    let errors = || async {
        let status = clusters.get("vault").await?.status.unwrap_or_default();
        anyhow::Ok(
            status
                .members
                .into_iter()
                .map(|m| m.last_probe_error)
                .collect::<Vec<_>>(),
        )
    };
    let named = |errors: &[String]| {
        errors.len() == 3 && errors.iter().all(|e| e.contains("clientCertSecretRef"))
    };
    let last = std::sync::Mutex::new(Vec::new());
    let error = wait::until(
        "every probe error naming clientCertSecretRef",
        LIMIT,
        || async {
            let errors = errors().await?;
            let found = named(&errors).then(|| errors[0].clone());
            *last.lock().unwrap() = errors;
            Ok(found)
        },
    )
    .await
    .with_context(|| format!("the errors last seen: {:?}", last.lock().unwrap()))?;
    // And it keeps naming it: every refused probe says why, not only some.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let errors = errors().await?;
        anyhow::ensure!(
            named(&errors),
            "a probe error without the setting: {errors:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("probe without a client certificate: {error}");
    for i in 0..3 {
        let labels = rig.vault.labels(i).await?;
        assert!(
            !labels.contains_key("vault-active"),
            "vault-{i}: {labels:?}"
        );
    }

    // With it: labelled and routed, and a step-down is followed.
    let patch = serde_json::json!({"spec": {"health": {"tls": {"clientCertSecretRef": {"name": "vault-probe"}}}}});
    clusters
        .patch("vault", &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    if let Err(e) = rig.routed(a, &others(3, &[a])).await {
        let status = clusters.get("vault").await?.status.unwrap_or_default();
        anyhow::bail!(
            "{e}: conditions {:?}, members {:?}",
            status.conditions,
            status.members
        );
    }
    rig.vault.step_down(a).await?;
    let b = new_active(&rig.vault, a).await?;
    rig.routed(b, &others(3, &[b])).await
}
