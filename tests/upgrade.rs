//! Upgrades by role (`spec.upgrade`) on the real control plane: kube-controller-manager's
//! StatefulSet controller makes the pods of a 3-replica StatefulSet (updateStrategy
//! OnDelete) and replaces each one evicted; its disruption controller keeps the
//! PodDisruptionBudgets. No kubelet runs, so the test plays one (`Kubelet`): it binds each
//! new pod, gives it an IP answered by a Vault simulator and marks it Running, finishes
//! the termination of each evicted pod, and moves the active role to a standby when the
//! active pod is stopped, as Vault steps down on SIGTERM.
//!
//! What the tests hold the operator to comes from the API server's audit log (the order of
//! evictions and of the StatefulSet controller's pod creations) and from the kubelet's
//! record (never two pods away at once), not from the operator's own word.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{LIMIT, namespace, operator};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use vault_registrar::crd::VaultCluster;
use vault_registrar_testkit::cluster::Operator;
use vault_registrar_testkit::evictions::{away_at_evictions, evicted, one_at_a_time, pod_history};
use vault_registrar_testkit::pods::{NODE_NAME, SimPod, ensure_node, next_pod_ip, set_running};
use vault_registrar_testkit::vault_sim::{Role, SimState, VaultSim};
use vault_registrar_testkit::{shared, wait};

const APP: &str = "app.kubernetes.io/name=vault";
const UPGRADE: &str = "upgrade: {strategy: RoleOrdered, maxUnavailable: 1}";

/// What the test's kubelet knows and saw.
#[derive(Default)]
struct Node {
    /// The simulator of each running pod, by pod name, with the pod's UID.
    sims: HashMap<String, (String, VaultSim)>,
    /// Pod names whose next replacement starts sealed.
    sealed_next: BTreeSet<String>,
    /// Names the StatefulSet made before: a pod of such a name is a replacement.
    seen: BTreeSet<String>,
    /// Pods terminating, or gone and not yet running again.
    away: BTreeSet<String>,
    /// Each time a pod went away while another was away.
    overlaps: Vec<String>,
    /// The pods that went away, in order, with the role each had.
    stopped: Vec<(String, Role)>,
    /// While set, evicted pods stay terminating (the kubelet does not confirm).
    hold: bool,
    /// UIDs already handled, as created or as terminating.
    started: BTreeSet<String>,
    terminated: BTreeSet<String>,
}

struct Kubelet {
    node: Arc<tokio::sync::Mutex<Node>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Kubelet {
    fn start(client: &Client, ns: &str) -> Self {
        let node = Arc::new(tokio::sync::Mutex::new(Node::default()));
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let shared_node = node.clone();
        let task = tokio::spawn(async move {
            let config = watcher::Config::default().labels(APP);
            let mut events = std::pin::pin!(watcher(pods.clone(), config));
            while let Some(event) = events.next().await {
                let pod = match event {
                    Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
                    _ => continue,
                };
                if let Err(e) = handle(&pods, &shared_node, pod).await {
                    eprintln!("kubelet: {e:#}");
                }
            }
        });
        Self { node, task }
    }

    async fn seal_next(&self, pod: &str) {
        self.node.lock().await.sealed_next.insert(pod.into());
    }

    async fn hold(&self, hold: bool) {
        self.node.lock().await.hold = hold;
    }

    async fn set_role(&self, pod: &str, role: Role) {
        let node = self.node.lock().await;
        node.sims[pod].1.update(|s| s.role = role).await;
    }
}

/// One pod event, as a kubelet would take it.
async fn handle(pods: &Api<Pod>, node: &tokio::sync::Mutex<Node>, pod: Pod) -> anyhow::Result<()> {
    let (name, uid) = (pod.name_any(), pod.uid().unwrap_or_default());
    let mut n = node.lock().await;
    if pod.metadata.deletion_timestamp.is_some() {
        if !n.terminated.insert(uid.clone()) {
            return Ok(());
        }
        if !n.away.is_empty() && !n.away.contains(&name) {
            let others = n.away.iter().cloned().collect::<Vec<_>>().join(", ");
            n.overlaps
                .push(format!("{name} went away while {others} was away"));
        }
        n.away.insert(name.clone());
        let role = match n.sims.get(&name) {
            Some((_, sim)) => sim.state().role,
            None => Role::Standby,
        };
        n.stopped.push((name.clone(), role));
        if role == Role::Active {
            // SIGTERM: the active node steps down and a standby takes over.
            n.sims[&name].1.update(|s| s.role = Role::Standby).await;
            let heir = n
                .sims
                .iter()
                .find(|(other, (_, sim))| **other != name && sim.state().role == Role::Standby)
                .map(|(other, _)| other.clone());
            if let Some(heir) = heir {
                n.sims[&heir].1.update(|s| s.role = Role::Active).await;
            }
        }
        let sim = n.sims.remove(&name);
        drop(n);
        // The container takes a moment to stop; then the kubelet confirms the deletion.
        tokio::time::sleep(Duration::from_millis(300)).await;
        while node.lock().await.hold {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some((_, sim)) = sim {
            sim.stop().await;
        }
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..Default::default()
        };
        let _ = pods.delete(&name, &params).await;
        return Ok(());
    }
    if !n.started.insert(uid.clone()) {
        return Ok(());
    }
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_none()
    {
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME},
        });
        let _: serde_json::Value = pods
            .create_subresource("binding", &name, &PostParams::default(), &binding)
            .await?;
    }
    let replacement = !n.seen.insert(name.clone());
    let role = if n.sealed_next.remove(&name) {
        Role::Sealed
    } else if !replacement && name.ends_with("-0") {
        Role::Active
    } else {
        Role::Standby
    };
    let ip = next_pod_ip();
    let sim = VaultSim::start(SocketAddr::new(ip.into(), 8200), None, SimState::new(role)).await?;
    let sim_pod = SimPod {
        name: name.clone(),
        labels: BTreeMap::new(),
        ip,
    };
    let client: Client = pods.clone().into();
    set_running(
        &client,
        &pod.namespace().unwrap_or_default(),
        &sim_pod,
        true,
    )
    .await?;
    n.sims.insert(name.clone(), (uid, sim));
    n.away.remove(&name);
    Ok(())
}

/// A namespace with a StatefulSet `vault` of `strategy` (3 pods unless said), the kubelet,
/// and the operator.
struct Plane {
    client: Client,
    ns: String,
    replicas: usize,
    kubelet: Kubelet,
    operator: Operator,
}

async fn plane(name: &str, strategy: &str) -> anyhow::Result<Plane> {
    plane_with(name, strategy, None, 3).await
}

/// As `plane`, the operator running as a ServiceAccount bound to `rules` when given.
async fn plane_with(
    name: &str,
    strategy: &str,
    rules: Option<Vec<serde_json::Value>>,
    replicas: usize,
) -> anyhow::Result<Plane> {
    let ns = format!("upgrade-{name}");
    let client = namespace(&ns).await?;
    let kubeconfig = match rules {
        Some(rules) => Some(account(&client, &ns, rules).await?),
        None => None,
    };
    ensure_node(&client).await?;
    let kubelet = Kubelet::start(&client, &ns);
    let set: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "vault"},
        "spec": {
            "replicas": replicas,
            "serviceName": "vault-internal",
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": strategy},
            "selector": {"matchLabels": {"app.kubernetes.io/name": "vault"}},
            "template": {
                "metadata": {
                    "labels": {"app.kubernetes.io/name": "vault"},
                    "annotations": {"example.com/revision": "1"},
                },
                "spec": {
                    "automountServiceAccountToken": false,
                    "containers": [{
                        "name": "vault",
                        "image": "hashicorp/vault:1.17",
                        "ports": [{"name": "http", "containerPort": 8200}],
                    }],
                },
            },
        },
    }))?;
    Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &set)
        .await?;
    let operator = operator(&ns, kubeconfig.as_deref(), &[])?;
    Ok(Plane {
        client,
        ns,
        replicas,
        kubelet,
        operator,
    })
}

impl Plane {
    async fn create_cluster(&self, extra: &str) -> anyhow::Result<()> {
        let yaml = format!(
            "apiVersion: vault-registrar.dev/v1alpha1\nkind: VaultCluster\nmetadata: {{name: vault}}\nspec:\n  selector: {{matchLabels: {{app.kubernetes.io/name: vault}}}}\n  health: {{interval: 500ms, timeout: 300ms, failureThreshold: 2}}\n  {extra}\n"
        );
        let vc: VaultCluster = serde_yaml::from_str(&yaml)?;
        Api::<VaultCluster>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &vc)
            .await?;
        Ok(())
    }

    /// Waits for the Upgrading condition with this status and reason; its message.
    async fn upgrading(&self, status: &str, reason: &str) -> anyhow::Result<String> {
        let api: Api<VaultCluster> = Api::namespaced(self.client.clone(), &self.ns);
        let last = Mutex::new(String::new());
        let got = wait::until(&format!("Upgrading={status} ({reason})"), LIMIT, || async {
            let vc = api.get("vault").await?;
            let found = vc
                .status
                .unwrap_or_default()
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Upgrading");
            *last.lock().unwrap() = format!("{found:?}");
            Ok(found
                .filter(|c| c.status == status && c.reason == reason)
                .map(|c| c.message))
        })
        .await;
        got.map_err(|e| anyhow::anyhow!("{e}; last seen: {}", last.lock().unwrap()))
    }

    /// Waits until the pods run and answer, vault-0 labelled active, the others standby.
    async fn converged(&self) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let want: Vec<&str> = (0..self.replicas)
            .map(|i| if i == 0 { "true" } else { "false" })
            .collect();
        wait::until("vault-0 active, the other pods standby", LIMIT, || async {
            let mut roles = Vec::new();
            for i in 0..self.replicas {
                let labels = match pods.get_opt(&format!("vault-{i}")).await? {
                    Some(pod) => pod.labels().clone(),
                    None => return Ok(None),
                };
                roles.push(labels.get("vault-active").cloned().unwrap_or_default());
            }
            Ok((roles == want).then_some(()))
        })
        .await
    }

    /// Waits until `evictions` pods were evicted and the condition says UpToDate.
    async fn upgraded(&self, evictions: usize) -> anyhow::Result<()> {
        wait::until("the upgrade to end", LIMIT * 2, || async {
            Ok(if self.evictions().await.len() == evictions {
                self.upgrading("False", "UpToDate").await.ok()
            } else {
                None
            })
        })
        .await?;
        Ok(())
    }

    /// Changes the pod template: a new revision of the StatefulSet.
    async fn new_revision(&self, value: &str) -> anyhow::Result<()> {
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {"example.com/revision": value}}}}});
        Api::<StatefulSet>::namespaced(self.client.clone(), &self.ns)
            .patch("vault", &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        Ok(())
    }

    async fn update_revision(&self) -> anyhow::Result<String> {
        let api: Api<StatefulSet> = Api::namespaced(self.client.clone(), &self.ns);
        let set = api.get("vault").await?;
        Ok(set
            .status
            .and_then(|s| s.update_revision)
            .unwrap_or_default())
    }

    /// The successful evictions in this namespace, in the order the API server took them,
    /// and every pod creation, as (verb or "evict", pod).
    async fn history(&self) -> Vec<(String, String)> {
        pod_history(shared().writes_in_async(&self.ns).await)
    }

    async fn evictions(&self) -> Vec<String> {
        evicted(&self.history().await)
    }

    async fn event(&self, reason: &str) -> anyhow::Result<String> {
        let events: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.ns);
        wait::until(&format!("event {reason}"), LIMIT, || async {
            let list = events.list(&Default::default()).await?;
            Ok(list
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some(reason))
                .and_then(|e| e.note))
        })
        .await
    }
}

/// A ServiceAccount `operator` in `ns` bound to a ClusterRole of `rules`; a kubeconfig
/// with its token.
async fn account(
    client: &Client,
    ns: &str,
    rules: Vec<serde_json::Value>,
) -> anyhow::Result<std::path::PathBuf> {
    let name = format!("{ns}-operator");
    let role: ClusterRole =
        serde_json::from_value(json!({"metadata": {"name": name}, "rules": rules}))?;
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &role)
        .await?;
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "operator"}}))?;
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &account)
        .await?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": ns}],
    }))?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    let out = shared()
        .kubectl()
        .args(["create", "token", "operator", "-n", ns, "--duration=1h"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    shared().token_kubeconfig(&name, String::from_utf8(out.stdout)?.trim())
}

/// The rules of the chart's ClusterRole, as `helm template` renders them.
fn chart_rules() -> anyhow::Result<Vec<serde_json::Value>> {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/vault-registrar");
    let out = shared()
        .helm()
        .args(["template", "t", chart, "--kube-version=1.35.0"])
        .args(["--show-only", "templates/clusterrole.yaml"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let role: serde_json::Value = serde_yaml::from_slice(&out.stdout)?;
    Ok(serde_json::from_value(role["rules"].clone())?)
}

/// An annotation change of the pod template: the operator replaces the standbys first,
/// then the active pod, one at a time, and reports it done.
#[tokio::test]
async fn standbys_first_then_the_active_pod_one_at_a_time() -> anyhow::Result<()> {
    let p = plane("order", "OnDelete").await?;
    p.create_cluster(UPGRADE).await?;
    p.converged().await?;
    let first = p.update_revision().await?;
    let message = p.upgrading("False", "UpToDate").await?;
    assert_eq!(message, format!("3/3 pods at revision {first}"));
    p.new_revision("2").await?;
    let done = wait::until("a new update revision", LIMIT, || async {
        let r = p.update_revision().await?;
        Ok((r != first).then_some(r))
    })
    .await?;
    let upgrading = p.upgrading("True", "WaitingForReplacement").await?;
    assert!(
        upgrading.contains(&format!("pods at revision {done}")),
        "{upgrading}"
    );
    let limit = LIMIT * 2;
    let message = wait::until("the upgrade to end", limit, || async {
        let m = p.upgrading("False", "UpToDate").await;
        Ok(m.ok().filter(|m| m.contains(&done)))
    })
    .await?;
    // Never two pods away at once, by the API server's audit log and by the kubelet.
    one_at_a_time(&p.history().await).map_err(anyhow::Error::msg)?;
    {
        let node = p.kubelet.node.lock().await;
        assert!(node.overlaps.is_empty(), "{:?}", node.overlaps);
    }
    assert_eq!(message, format!("3/3 pods at revision {done}"));
    // `kubectl wait` on the condition, as the README tells users.
    let out = shared()
        .kubectl()
        .args(["wait", "-n", &p.ns, "vaultcluster/vault"])
        .args(["--for=condition=Upgrading=false", "--timeout=10s"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(p.evictions().await, ["vault-2", "vault-1", "vault-0"]);
    let node = p.kubelet.node.lock().await;
    let roles: Vec<(&str, Role)> = node.stopped.iter().map(|(n, r)| (n.as_str(), *r)).collect();
    assert_eq!(
        roles,
        [
            ("vault-2", Role::Standby),
            ("vault-1", Role::Standby),
            ("vault-0", Role::Active)
        ]
    );
    drop(node);
    let step = p.event("UpgradeStep").await?;
    assert!(step.starts_with("evicted vault-"), "{step}");
    p.event("UpgradeComplete").await?;
    Ok(())
}

/// A PodDisruptionBudget that allows no disruption blocks the first eviction; once it is
/// gone, a replacement left sealed pauses the upgrade, through an operator restart, until
/// it is unsealed.
#[tokio::test]
async fn a_budget_blocks_and_a_sealed_replacement_pauses() -> anyhow::Result<()> {
    let mut p = plane("pause", "OnDelete").await?;
    p.create_cluster(UPGRADE).await?;
    p.converged().await?;
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(p.client.clone(), &p.ns);
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "vault"},
        "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app.kubernetes.io/name": "vault"}}},
    }))?;
    budgets.create(&PostParams::default(), &pdb).await?;
    p.upgrading("False", "UpToDate").await?;
    p.kubelet.seal_next("vault-2").await;
    p.new_revision("2").await?;
    let blocked = p.upgrading("False", "DisruptionBlocked").await?;
    assert!(blocked.contains("vault-2"), "{blocked}");
    p.event("UpgradeDisruptionBlocked").await?;
    // Blocked and retried: nothing evicted, the budget still in place.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(p.evictions().await, Vec::<String>::new());
    budgets.delete("vault", &DeleteParams::default()).await?;
    let paused = p.upgrading("False", "WaitingForUnseal").await?;
    assert!(paused.starts_with("vault-2 "), "{paused}");
    p.event("UpgradeWaitingForUnseal").await?;
    // A new operator (a new term, nothing remembered) finds the pause in the cluster.
    p.operator.kill();
    p.operator = operator(&p.ns, None, &[])?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    p.upgrading("False", "WaitingForUnseal").await?;
    assert_eq!(p.evictions().await, ["vault-2"]);
    p.kubelet.set_role("vault-2", Role::Standby).await;
    let limit = LIMIT * 2;
    wait::until("the upgrade to end", limit, || async {
        Ok(p.upgrading("False", "UpToDate").await.ok())
    })
    .await?;
    assert_eq!(p.evictions().await, ["vault-2", "vault-1", "vault-0"]);
    one_at_a_time(&p.history().await).map_err(anyhow::Error::msg)?;
    let node = p.kubelet.node.lock().await;
    assert!(node.overlaps.is_empty(), "{:?}", node.overlaps);
    Ok(())
}

/// Pods of a RollingUpdate StatefulSet, or of no StatefulSet, are a spec problem: the
/// condition says why and nothing is evicted.
#[tokio::test]
async fn other_controllers_are_a_spec_problem() -> anyhow::Result<()> {
    let p = plane("rolling", "RollingUpdate").await?;
    p.create_cluster(UPGRADE).await?;
    let problem = p.upgrading("False", "InvalidSpec").await?;
    assert!(
        problem.contains("updateStrategy RollingUpdate"),
        "{problem}"
    );
    p.event("UpgradeInvalidSpec").await?;
    // Labels go on as ever.
    p.converged().await?;

    // Pods no StatefulSet controls, as a Deployment's: the same, named.
    let f = common::fixture("upgrade-bare", &common::TRIO, None).await?;
    f.create("vault", &format!("{}\n{UPGRADE}", common::FAST))
        .await?;
    f.converged().await?;
    let problem = f
        .condition("vault", "Upgrading", "False", "InvalidSpec")
        .await?;
    assert!(
        problem.contains("not controlled by a StatefulSet"),
        "{problem}"
    );
    let evictions = shared()
        .writes_in_async(&p.ns)
        .await
        .into_iter()
        .chain(shared().writes_in_async(&f.ns).await)
        .filter(|w| w.2 == "pods/eviction")
        .count();
    assert_eq!(evictions, 0);
    Ok(())
}

/// Without spec.upgrade nothing is evicted and no Upgrading condition appears.
#[tokio::test]
async fn without_the_opt_in_nothing_is_evicted() -> anyhow::Result<()> {
    let p = plane("off", "OnDelete").await?;
    p.create_cluster("").await?;
    p.converged().await?;
    p.new_revision("2").await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let vc = Api::<VaultCluster>::namespaced(p.client.clone(), &p.ns)
        .get("vault")
        .await?;
    let conditions = vc.status.unwrap_or_default().conditions;
    assert!(
        conditions.iter().all(|c| c.type_ != "Upgrading"),
        "{conditions:?}"
    );
    assert_eq!(p.evictions().await, Vec::<String>::new());
    Ok(())
}

/// The chart's ClusterRole is all an upgrade needs (the StatefulSet watch, the evictions),
/// and without its `pods/eviction` rule the upgrade stops at the refusal, reported.
#[tokio::test]
async fn the_charts_rules_upgrade_and_evictions_need_their_rule() -> anyhow::Result<()> {
    let rules = chart_rules()?;
    let p = plane_with("rbac", "OnDelete", Some(rules.clone()), 3).await?;
    p.create_cluster(UPGRADE).await?;
    p.converged().await?;
    p.new_revision("2").await?;
    p.upgraded(3).await?;

    let without: Vec<serde_json::Value> = rules
        .into_iter()
        .filter(|r| !r["resources"].to_string().contains("pods/eviction"))
        .collect();
    let p = plane_with("rbac-without", "OnDelete", Some(without), 3).await?;
    p.create_cluster(UPGRADE).await?;
    p.converged().await?;
    p.new_revision("2").await?;
    let refused = p.upgrading("False", "EvictionFailed").await?;
    assert!(refused.contains("forbidden"), "{refused}");
    assert!(
        refused.starts_with("evicting vault-2 (standby) was refused: "),
        "{refused}"
    );
    Ok(())
}

/// A new operator (a new leader) while the step it did not take is still in flight, the
/// evicted pod terminating: it waits for the replacement, evicts nothing more, then goes on.
#[tokio::test]
async fn a_new_operator_mid_step_waits_for_the_step_in_flight() -> anyhow::Result<()> {
    let mut p = plane("takeover", "OnDelete").await?;
    p.create_cluster(UPGRADE).await?;
    p.converged().await?;
    p.upgrading("False", "UpToDate").await?;
    p.kubelet.hold(true).await;
    p.new_revision("2").await?;
    let first = wait::until("the first eviction", LIMIT, || async {
        let evicted = p.evictions().await;
        Ok((!evicted.is_empty()).then_some(evicted))
    })
    .await?;
    assert_eq!(first, ["vault-2"]);
    p.operator.kill();
    p.operator = operator(&p.ns, None, &[])?;
    let waiting = p.upgrading("True", "WaitingForReplacement").await?;
    assert!(
        waiting.starts_with("vault-2 is being replaced"),
        "{waiting}"
    );
    // Long enough for several full rounds of the new operator.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(p.evictions().await, ["vault-2"]);
    p.kubelet.hold(false).await;
    p.upgraded(3).await?;
    assert_eq!(p.evictions().await, ["vault-2", "vault-1", "vault-0"]);
    one_at_a_time(&p.history().await).map_err(anyhow::Error::msg)?;
    let node = p.kubelet.node.lock().await;
    assert!(node.overlaps.is_empty(), "{:?}", node.overlaps);
    Ok(())
}

/// Five voters with maxUnavailable 2: standbys two at a time, the active pod last and
/// alone; never more than two pods away, by the API server's audit log.
#[tokio::test]
async fn five_voters_go_two_standbys_at_a_time_and_the_active_pod_alone() -> anyhow::Result<()> {
    let p = plane_with("pairs", "OnDelete", None, 5).await?;
    p.create_cluster("upgrade: {strategy: RoleOrdered, maxUnavailable: 2}")
        .await?;
    p.converged().await?;
    p.upgrading("False", "UpToDate").await?;
    p.new_revision("2").await?;
    p.upgraded(5).await?;
    let history = p.history().await;
    let away = away_at_evictions(&history);
    println!("evictions, with the pods away at each: {away:?}");
    assert_eq!(
        away.iter().map(|(_, n)| *n).max(),
        Some(2),
        "steps of two, never three: {history:?}"
    );
    assert_eq!(
        away.last(),
        Some(&("vault-0".to_string(), 1)),
        "the active pod last and alone: {history:?}"
    );
    let mut standbys: Vec<&str> = away[..4].iter().map(|(pod, _)| pod.as_str()).collect();
    standbys.sort();
    assert_eq!(standbys, ["vault-1", "vault-2", "vault-3", "vault-4"]);
    let node = p.kubelet.node.lock().await;
    assert_eq!(node.stopped.last().map(|(_, r)| *r), Some(Role::Active));
    Ok(())
}

/// Two of three voters away would cost raft its quorum: a spec problem, nothing evicted.
#[tokio::test]
async fn more_pods_per_step_than_the_quorum_allows_is_a_spec_problem() -> anyhow::Result<()> {
    let p = plane("quorum", "OnDelete").await?;
    p.create_cluster("upgrade: {strategy: RoleOrdered, maxUnavailable: 2}")
        .await?;
    p.converged().await?;
    p.new_revision("2").await?;
    let message = p.upgrading("False", "InvalidSpec").await?;
    assert!(
        message
            .contains("spec.upgrade.maxUnavailable is 2, but raft keeps its quorum with at most 1"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(p.evictions().await, Vec::<String>::new());
    Ok(())
}

/// The last step too is over only when its replacement serves: the active pod's
/// replacement left sealed holds the upgrade at WaitingForUnseal, not UpToDate, until it
/// is unsealed.
#[tokio::test]
async fn the_active_pods_replacement_left_sealed_holds_the_end() -> anyhow::Result<()> {
    let p = plane("last", "OnDelete").await?;
    p.create_cluster(UPGRADE).await?;
    p.converged().await?;
    p.upgrading("False", "UpToDate").await?;
    p.kubelet.seal_next("vault-0").await;
    p.new_revision("2").await?;
    wait::until("three evictions", LIMIT * 2, || async {
        Ok((p.evictions().await.len() == 3).then_some(()))
    })
    .await?;
    let waiting = p.upgrading("False", "WaitingForUnseal").await?;
    assert!(
        waiting.starts_with("vault-0 runs the new revision but is sealed"),
        "{waiting}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.upgrading("False", "WaitingForUnseal").await?;
    p.kubelet.set_role("vault-0", Role::Standby).await;
    p.upgrading("False", "UpToDate").await?;
    assert_eq!(p.evictions().await, ["vault-2", "vault-1", "vault-0"]);
    Ok(())
}
