//! The admission policies against a stolen operator token, on the real API server: the
//! operator does its work under them with its ServiceAccount's token, then the same token
//! tries what an attacker would, and every try must be refused by the policy meant to
//! refuse it (not by RBAC, which allows most of them), while the operator's own kinds of
//! writes are still admitted. Once through the chart, once through config/default.
//!
//! A test binary of its own, so a control plane of its own: the "-ownership-label" policy
//! binds everyone but its operator cluster-wide, so it cannot share an API server with the
//! other tests' releases and their operators (tests/ship.rs lets them all write the label).

mod chart;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use vault_registrar::crd::VaultCluster;
use vault_registrar_testkit::cluster::{Operator, SimCluster};
use vault_registrar_testkit::pods::{SimPod, create_namespace, create_pod, next_pod_ip};
use vault_registrar_testkit::stage::install_crd;
use vault_registrar_testkit::vault_sim::Role;
use vault_registrar_testkit::{shared, wait};

use chart::{chart, converged, helm, kubectl, values};

const LIMIT: Duration = Duration::from_secs(30);
const OWNER: &str = "vault-registrar.dev/cluster";

/// The policies of an install, by the suffix of their names.
const POLICIES: [&str; 5] = [
    "limits",
    "ownership",
    "services",
    "vaultclusters",
    "ownership-label",
];

/// One install at a time: each one's "-ownership-label" policy refuses the other's operator.
static ONE_INSTALL: Mutex<()> = Mutex::const_new(());

fn bin() -> &'static Path {
    env!("CARGO_BIN_EXE_vault-registrar").as_ref()
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where the policies come from and whose token they fence.
struct Install {
    /// The policies' names are `<prefix>-limits`, `<prefix>-services`, ...
    prefix: &'static str,
    account_namespace: &'static str,
    account: &'static str,
    /// Where the VaultCluster and its pods live.
    ns: &'static str,
}

#[tokio::test]
async fn the_charts_policies_fence_the_operators_token() -> anyhow::Result<()> {
    let _one = ONE_INSTALL.lock().await;
    install_crd(
        shared(),
        &root().join("crds/vaultclusters.vault-registrar.dev.yaml"),
    )
    .await?;
    let admin = shared().client().await?;
    create_namespace(&admin, "fence-ops").await?;
    let chart = chart();
    let mut args = vec!["install", "ap", chart.to_str().unwrap(), "-n", "fence-ops"];
    args.extend(values("shared-crd-fenced"));
    helm(&args).await?;
    let install = Install {
        prefix: "ap-vault-registrar",
        account_namespace: "fence-ops",
        account: "ap-vault-registrar",
        ns: "fence-chart",
    };
    let result = fence(&admin, &install).await;
    helm(&["uninstall", "ap", "-n", "fence-ops"]).await?;
    report(&install, result?)
}

#[tokio::test]
async fn the_kustomize_policies_fence_the_operators_token() -> anyhow::Result<()> {
    let install = Install {
        prefix: "vault-registrar",
        account_namespace: "vault-registrar",
        account: "vault-registrar",
        ns: "fence-kustomize",
    };
    kustomized(&root().join("config/default"), &install).await
}

/// An overlay with another namespace and a name prefix: the policies follow the
/// ServiceAccount (config/default/operator-user.yaml, which the overlay repeats).
#[tokio::test]
async fn an_overlays_policies_fence_its_operators_token() -> anyhow::Result<()> {
    let overlay = root().join("tests/kustomize/overlay");
    assert_eq!(
        std::fs::read_to_string(overlay.join("operator-user.yaml"))?,
        std::fs::read_to_string(root().join("config/default/operator-user.yaml"))?,
        "the overlay's copy of operator-user.yaml is config/default's"
    );
    let install = Install {
        prefix: "kz-vault-registrar",
        account_namespace: "fence-overlay",
        account: "kz-vault-registrar",
        ns: "fence-overlay-vault",
    };
    kustomized(&overlay, &install).await
}

/// Applies a kustomization (its Deployment's pods never run: no kubelet here), runs the
/// attacks against its policies, and removes the policies.
async fn kustomized(dir: &Path, install: &Install) -> anyhow::Result<()> {
    let _one = ONE_INSTALL.lock().await;
    install_crd(
        shared(),
        &root().join("crds/vaultclusters.vault-registrar.dev.yaml"),
    )
    .await?;
    let admin = shared().client().await?;
    kubectl(&["apply", "--server-side", "-k", dir.to_str().unwrap()]).await?;
    let result = fence(&admin, install).await;
    for policy in POLICIES {
        let name = format!("{}-{policy}", install.prefix);
        kubectl(&["delete", "validatingadmissionpolicybinding", &name]).await?;
        kubectl(&["delete", "validatingadmissionpolicy", &name]).await?;
    }
    report(install, result?)
}

/// Prints what was tried (run with --nocapture to read it) and fails on every try whose
/// outcome is not the one wanted.
fn report(install: &Install, tries: Tries) -> anyhow::Result<()> {
    println!("{}:\n{}", install.prefix, tries.table());
    let problems = tries.problems();
    anyhow::ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// What a try must come to.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// Denied by the policy `<prefix>-<this>`.
    Refused(&'static str),
    /// Refused by RBAC, which the chart's role does not grant; the policies would refuse
    /// it too if a wider role did.
    Rbac,
    /// Admitted: the operator's own kind of write, or what the policies cannot refuse.
    Admitted,
}

struct Try {
    what: String,
    want: Want,
    got: Result<(), String>,
}

/// The tries of one install, and their outcomes.
struct Tries {
    prefix: &'static str,
    rows: Vec<Try>,
}

impl Tries {
    fn record<T>(&mut self, what: &str, want: Want, got: Result<T, kube::Error>) {
        self.rows.push(Try {
            what: what.into(),
            want,
            got: got.map(|_| ()).map_err(|e| e.to_string()),
        });
    }

    fn ok(&self, row: &Try) -> bool {
        match (&row.want, &row.got) {
            (Want::Admitted, got) => got.is_ok(),
            (Want::Refused(policy), Err(e)) => {
                e.contains(&format!("'{}-{policy}'", self.prefix)) && e.contains("denied")
            }
            (Want::Rbac, Err(e)) => e.contains("forbidden") && !e.contains("denied request"),
            (Want::Refused(_) | Want::Rbac, Ok(())) => false,
        }
    }

    fn problems(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter(|row| !self.ok(row))
            .map(|row| format!("{}: wanted {:?}, got {:?}", row.what, row.want, row.got))
            .collect()
    }

    fn table(&self) -> String {
        self.rows
            .iter()
            .map(|row| {
                let got = match &row.got {
                    Ok(()) => "admitted".to_string(),
                    Err(_) => "refused".to_string(),
                };
                let want = match row.want {
                    Want::Refused(policy) => format!("refused by {}-{policy}", self.prefix),
                    Want::Rbac => "refused by RBAC".into(),
                    Want::Admitted => "admitted".into(),
                };
                let mark = if self.ok(row) { "ok" } else { "WRONG" };
                format!("  [{mark}] {}: {got} (want {want})\n", row.what)
            })
            .collect()
    }
}

/// The API clients of one run: the cluster admin, the operator's token, a tenant's token.
struct Clients {
    admin: kube::Client,
    operator: kube::Client,
    operator_kubeconfig: PathBuf,
    tenant: kube::Client,
}

/// The whole run against one install: the operator under the policies, every attack, the
/// operator again (it repairs and cleans up under them).
async fn fence(admin: &kube::Client, at: &Install) -> anyhow::Result<Tries> {
    let ns = at.ns;
    create_namespace(admin, ns).await?;
    let vault = SimCluster::start(
        admin,
        ns,
        "vault",
        &[Role::Active, Role::Standby, Role::Standby],
        None,
    )
    .await?;
    create_vc(
        admin,
        ns,
        "vault",
        json!({"matchLabels": {"app.kubernetes.io/name": "vault"}}),
    )
    .await?;
    kubectl(&[
        "create",
        "service",
        "clusterip",
        "foreign",
        "--tcp=80:80",
        "-n",
        ns,
    ])
    .await?;
    let clients = clients(admin, at).await?;
    let log = shared().dir().join(format!("operator-{ns}.log"));
    let operator = Operator::start(
        bin(),
        &clients.operator_kubeconfig,
        &["--namespace", ns],
        &log,
    )?;
    converged(admin, &vault, ns).await?;
    refuses_what_the_chart_does_not_allow(admin, ns).await?;
    drop(operator);
    no_denials(&log)?;

    let world = World::build(admin, ns).await?;
    let mut tries = Tries {
        prefix: at.prefix,
        rows: Vec::new(),
    };
    service_tries(&mut tries, &clients, ns, &world).await?;
    pod_tries(&mut tries, &clients, ns).await;
    vault_cluster_tries(&mut tries, &clients, ns).await;
    other_principal_tries(&mut tries, &clients, ns).await;
    operator_still_works(&mut tries, &clients, &vault, ns).await;
    type_checked(at.prefix).await?;
    Ok(tries)
}

/// The API server type-checks each policy's expressions against the kinds it matches and
/// its paramKind's schema, into the policy's status: a misspelt field would otherwise show
/// only as a runtime error on the path that reaches it. kube-controller-manager checks with
/// what its discovery knew when the policy was written, and it rereads discovery every
/// 30 s: the CRD is new here, so an unbound copy of each policy is checked now, late enough.
async fn type_checked(prefix: &str) -> anyhow::Result<()> {
    for policy in [
        "limits",
        "ownership",
        "services",
        "vaultclusters",
        "evictions",
        "ownership-label",
    ] {
        let name = format!("{prefix}-{policy}");
        let mut copy: Value = serde_json::from_str(
            &kubectl(&["get", "validatingadmissionpolicy", &name, "-o", "json"]).await?,
        )?;
        let copy_name = format!("{name}-typecheck");
        copy["metadata"] = json!({"name": copy_name});
        copy.as_object_mut().map(|o| o.remove("status"));
        let file = shared().dir().join(format!("{copy_name}.json"));
        std::fs::write(&file, serde_json::to_vec(&copy)?)?;
        kubectl(&["create", "-f", file.to_str().unwrap()]).await?;
        let checked = wait::until(&format!("{name} type-checked"), LIMIT, || async {
            let status = kubectl(&[
                "get",
                "validatingadmissionpolicy",
                &copy_name,
                "-o",
                "jsonpath={.status.observedGeneration} {.status.typeChecking}",
            ])
            .await?;
            Ok((!status.trim().is_empty()).then_some(status))
        })
        .await?;
        kubectl(&["delete", "validatingadmissionpolicy", &copy_name]).await?;
        anyhow::ensure!(
            !checked.contains("expressionWarnings"),
            "{name}'s expressions type-check: {checked}"
        );
    }
    Ok(())
}

/// VaultClusters asking for what the chart's defaults do not allow, a LoadBalancer or an
/// annotation external-dns would act upon: the operator says so in the status, naming the
/// field, and writes no Service for them (the policy would refuse it, but only as a failed
/// write); deleting them still lets the finalizer go.
async fn refuses_what_the_chart_does_not_allow(
    admin: &kube::Client,
    ns: &str,
) -> anyhow::Result<()> {
    let cases = [
        (
            "exposed",
            json!({"active": {"enabled": true, "type": "LoadBalancer"}}),
            "spec.services.active.type: LoadBalancer is not allowed",
        ),
        (
            "announced",
            json!({"standby": {"enabled": true, "annotations": {"external-dns.alpha.kubernetes.io/hostname": "vault.example.com"}}}),
            "spec.services.standby.annotations: external-dns.alpha.kubernetes.io/hostname is not allowed",
        ),
    ];
    for (name, services, want) in cases {
        refused_spec(admin, ns, name, services, want).await?;
    }
    Ok(())
}

async fn refused_spec(
    admin: &kube::Client,
    ns: &str,
    name: &str,
    services: Value,
    want: &str,
) -> anyhow::Result<()> {
    let vc: VaultCluster = serde_json::from_value(json!({
        "apiVersion": "vault-registrar.dev/v1alpha1", "kind": "VaultCluster",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"matchLabels": {"app": name}}, "services": services},
    }))?;
    let api: Api<VaultCluster> = Api::namespaced(admin.clone(), ns);
    api.create(&PostParams::default(), &vc).await?;
    let message = wait::until(
        &format!("{name}: Ready=False, InvalidSpec"),
        LIMIT,
        || async {
            let vc = api.get(name).await?;
            let ready = vc
                .status
                .iter()
                .flat_map(|s| s.conditions.iter())
                .find(|c| c.type_ == "Ready");
            Ok(ready
                .filter(|c| c.status == "False" && c.reason == "InvalidSpec")
                .map(|c| c.message.clone()))
        },
    )
    .await?;
    anyhow::ensure!(message.contains(want), "{name}: {message}");
    let services: Api<Service> = Api::namespaced(admin.clone(), ns);
    let written = services
        .list(&kube::api::ListParams::default().labels(&format!("{OWNER}={name}")))
        .await?;
    anyhow::ensure!(written.items.is_empty(), "{name}: Services written");
    api.delete(name, &DeleteParams::default()).await?;
    wait::until(&format!("{name} is gone"), LIMIT, || async {
        Ok(api.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

/// Fails if the operator's log shows a write any policy refused.
fn no_denials(log: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(log)?;
    anyhow::ensure!(
        !text.contains("denied") && !text.contains("forbidden"),
        "the operator's own writes must be admitted:\n{text}"
    );
    Ok(())
}

async fn create_vc(
    client: &kube::Client,
    ns: &str,
    name: &str,
    selector: Value,
) -> anyhow::Result<VaultCluster> {
    let vc: VaultCluster = serde_json::from_value(json!({
        "apiVersion": "vault-registrar.dev/v1alpha1", "kind": "VaultCluster",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": selector, "health": {"interval": "500ms", "timeout": "300ms"}},
    }))?;
    Ok(Api::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &vc)
        .await?)
}

async fn token_client(namespace: &str, account: &str) -> anyhow::Result<(kube::Client, PathBuf)> {
    let token = kubectl(&["create", "token", account, "-n", namespace, "--duration=1h"]).await?;
    let kubeconfig = shared().token_kubeconfig(&format!("{namespace}-{account}"), token.trim())?;
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig)?,
        &Default::default(),
    )
    .await?;
    Ok((kube::Client::try_from(config)?, kubeconfig))
}

/// The operator's token, and a tenant: a ServiceAccount of the VaultCluster's namespace that
/// may create and change pods there, as a CI job or a compromised pod might.
async fn clients(admin: &kube::Client, at: &Install) -> anyhow::Result<Clients> {
    let ns = at.ns;
    kubectl(&["create", "serviceaccount", "tenant", "-n", ns]).await?;
    kubectl(&[
        "create",
        "role",
        "tenant",
        "-n",
        ns,
        "--verb=get,create,update,patch",
        "--resource=pods,pods/status",
    ])
    .await?;
    kubectl(&[
        "create",
        "rolebinding",
        "tenant",
        "-n",
        ns,
        "--role=tenant",
        &format!("--serviceaccount={ns}:tenant"),
    ])
    .await?;
    let (operator, operator_kubeconfig) = token_client(at.account_namespace, at.account).await?;
    let (tenant, _) = token_client(ns, "tenant").await?;
    Ok(Clients {
        admin: admin.clone(),
        operator,
        operator_kubeconfig,
        tenant,
    })
}

/// What the attacks aim at, made by the admin once the operator has stopped: another
/// application's pod, a Vault pod a second VaultCluster's matchExpressions exclude, a
/// namespace without VaultClusters.
struct World {
    vault_uid: String,
}

impl World {
    async fn build(admin: &kube::Client, ns: &str) -> anyhow::Result<Self> {
        let pod = |name: &str, labels: &[(&str, &str)]| SimPod {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ip: next_pod_ip(),
        };
        create_pod(admin, ns, &pod("db-0", &[("app", "db")])).await?;
        create_pod(
            admin,
            ns,
            &pod(
                "canary-0",
                &[("app.kubernetes.io/name", "vault"), ("tier", "canary")],
            ),
        )
        .await?;
        create_vc(
            admin,
            ns,
            "narrow",
            json!({"matchLabels": {"app.kubernetes.io/name": "vault"},
                   "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["canary"]}]}),
        )
        .await?;
        let empty = format!("{ns}-empty");
        create_namespace(admin, &empty).await?;
        create_pod(
            admin,
            &empty,
            &pod("stray-0", &[("app.kubernetes.io/name", "vault")]),
        )
        .await?;
        let vc: VaultCluster = Api::namespaced(admin.clone(), ns).get("vault").await?;
        Ok(Self {
            vault_uid: vc.metadata.uid.unwrap_or_default(),
        })
    }
}

/// A Service as the operator writes one for VaultCluster `vault` (controller ownerReference,
/// managed-by label, ClusterIP), with `selector`, then `patch` merged over it (RFC 7386).
fn service(name: &str, uid: &str, selector: Value, patch: Value) -> anyhow::Result<Service> {
    let mut object = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "vault-registrar", OWNER: "vault"},
            "ownerReferences": [{"apiVersion": "vault-registrar.dev/v1alpha1", "kind": "VaultCluster",
                                 "name": "vault", "uid": uid, "controller": true}],
        },
        "spec": {"type": "ClusterIP", "selector": selector, "ports": [{"name": "http", "port": 8200}]},
    });
    merge(&mut object, patch);
    Ok(serde_json::from_value(object)?)
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: Value) {
    let Value::Object(patch) = patch else {
        *target = patch;
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().expect("an object");
    for (key, value) in patch {
        if value.is_null() {
            map.remove(&key);
        } else {
            merge(map.entry(key).or_insert(Value::Null), value);
        }
    }
}

fn ours() -> Value {
    json!({"app.kubernetes.io/name": "vault", OWNER: "vault", "vault-active": "true"})
}

async fn service_tries(t: &mut Tries, c: &Clients, ns: &str, world: &World) -> anyhow::Result<()> {
    let api: Api<Service> = Api::namespaced(c.operator.clone(), ns);
    let uid = world.vault_uid.as_str();
    let refused = Want::Refused("services");
    let pp = PostParams::default();
    let creates: Vec<(&str, Want, Service)> = vec![
        (
            "create a Service just like the operator's",
            Want::Admitted,
            service("like-ours", uid, ours(), json!({}))?,
        ),
        (
            "create a LoadBalancer Service",
            refused,
            service("lb", uid, ours(), json!({"spec": {"type": "LoadBalancer"}}))?,
        ),
        (
            "create a NodePort Service",
            refused,
            service("np", uid, ours(), json!({"spec": {"type": "NodePort"}}))?,
        ),
        (
            "create a Service with externalIPs",
            refused,
            service(
                "eip",
                uid,
                ours(),
                json!({"spec": {"externalIPs": ["192.0.2.10"]}}),
            )?,
        ),
        (
            "create an ExternalName Service",
            refused,
            service(
                "ext",
                uid,
                ours(),
                json!({"spec": {"type": "ExternalName", "externalName": "evil.example", "ports": null}}),
            )?,
        ),
        (
            "create a Service with loadBalancerIP",
            refused,
            service(
                "lbip",
                uid,
                ours(),
                json!({"spec": {"loadBalancerIP": "192.0.2.11"}}),
            )?,
        ),
        (
            "create a Service announcing a DNS name (external-dns annotation)",
            refused,
            service(
                "dns",
                uid,
                ours(),
                json!({"metadata": {"annotations": {"external-dns.alpha.kubernetes.io/hostname": "vault.example.com"}}}),
            )?,
        ),
        (
            "create a Service with no selector",
            refused,
            service("nosel", uid, Value::Null, json!({}))?,
        ),
        (
            "create a Service selecting another application's pods",
            refused,
            service("db", uid, json!({"app": "db"}), json!({}))?,
        ),
        (
            "create a Service selecting our role label without the ownership label",
            refused,
            service("roleonly", uid, json!({"vault-active": "true"}), json!({}))?,
        ),
        (
            "create a Service whose ownership label names another VaultCluster than its controller",
            refused,
            service(
                "other",
                uid,
                json!({OWNER: "narrow", "vault-active": "true"}),
                json!({}),
            )?,
        ),
        (
            "create a Service selecting every pod of the cluster (no role label)",
            refused,
            service(
                "all",
                uid,
                json!({"app.kubernetes.io/name": "vault", OWNER: "vault"}),
                json!({}),
            )?,
        ),
        (
            "create a Service with no ownerReference (managed-by label only)",
            refused,
            service(
                "noowner",
                uid,
                ours(),
                json!({"metadata": {"ownerReferences": null}}),
            )?,
        ),
        (
            "create a Service whose VaultCluster ownerReference is not the controller",
            refused,
            service(
                "notctl",
                uid,
                ours(),
                json!({"metadata": {"ownerReferences": [{"apiVersion": "vault-registrar.dev/v1alpha1", "kind": "VaultCluster", "name": "vault", "uid": uid}]}}),
            )?,
        ),
        (
            "create a Service controlled by another kind",
            refused,
            service(
                "cm",
                uid,
                ours(),
                json!({"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "vault", "uid": uid, "controller": true}]}}),
            )?,
        ),
        (
            "create a Service without the managed-by label",
            refused,
            service(
                "unlabelled",
                uid,
                ours(),
                json!({"metadata": {"labels": null}}),
            )?,
        ),
    ];
    for (what, want, svc) in creates {
        t.record(what, want, api.create(&pp, &svc).await);
    }
    t.record(
        "delete the Service just like the operator's",
        Want::Admitted,
        api.delete("like-ours", &DeleteParams::default()).await,
    );
    service_update_tries(t, &api).await;
    ghost_owner(t, c, &api, ns).await?;
    Ok(())
}

async fn service_update_tries(t: &mut Tries, api: &Api<Service>) {
    let refused = Want::Refused("services");
    let patches: Vec<(&str, &str, Value)> = vec![
        (
            "point the active Service at another application's pods",
            "vault-active",
            json!({"spec": {"selector": {"app.kubernetes.io/name": null, OWNER: null, "vault-active": null, "app": "db"}}}),
        ),
        (
            "drop the ownership label from the active Service's selector",
            "vault-active",
            json!({"spec": {"selector": {OWNER: null}}}),
        ),
        (
            "drop the role label from the active Service's selector",
            "vault-active",
            json!({"spec": {"selector": {"vault-active": null}}}),
        ),
        (
            "make the active Service a LoadBalancer",
            "vault-active",
            json!({"spec": {"type": "LoadBalancer"}}),
        ),
        (
            "add externalIPs to the active Service",
            "vault-active",
            json!({"spec": {"externalIPs": ["192.0.2.12"]}}),
        ),
        (
            "hand the active Service to another owner",
            "vault-active",
            json!({"metadata": {"ownerReferences": [{"apiVersion": "vault-registrar.dev/v1alpha1", "kind": "VaultCluster", "name": "vault", "uid": "00000000-0000-0000-0000-000000000001", "controller": true}]}}),
        ),
        (
            "remove the active Service's ownerReference",
            "vault-active",
            json!({"metadata": {"ownerReferences": null}}),
        ),
        (
            "label a foreign Service as ours",
            "foreign",
            json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": "vault-registrar"}}}),
        ),
    ];
    for (what, name, patch) in patches {
        t.record(
            what,
            refused,
            api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await,
        );
    }
    let takeover = json!({
        "metadata": {"labels": {"app.kubernetes.io/managed-by": "vault-registrar"},
                     "ownerReferences": [{"apiVersion": "vault-registrar.dev/v1alpha1", "kind": "VaultCluster", "name": "vault", "uid": "00000000-0000-0000-0000-000000000002", "controller": true}]},
        "spec": {"selector": ours()},
    });
    t.record(
        "take over a foreign Service by making it look like ours",
        refused,
        api.patch("foreign", &PatchParams::default(), &Patch::Merge(takeover))
            .await,
    );
    t.record(
        "delete a foreign Service",
        refused,
        api.delete("foreign", &DeleteParams::default()).await,
    );
    t.record(
        "delete the standby Service (the operator recreates it)",
        Want::Admitted,
        api.delete("vault-standby", &DeleteParams::default()).await,
    );
}

/// Not refused, and why that is bearable: a policy sees one VaultCluster at a time, so it
/// cannot ask whether the one named exists. The token labels another application's pod
/// with the name of no VaultCluster and creates a Service "controlled" by that name; the
/// garbage collector deletes the Service once it finds the owner missing.
async fn ghost_owner(
    t: &mut Tries,
    c: &Clients,
    api: &Api<Service>,
    ns: &str,
) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(c.operator.clone(), ns);
    let label = json!({"metadata": {"labels": {OWNER: "ghost", "vault-active": "true"}}});
    t.record(
        "label another application's pod for a VaultCluster that does not exist",
        Want::Admitted,
        pods.patch("db-0", &PatchParams::default(), &Patch::Merge(label))
            .await,
    );
    let ghost = service(
        "ghost",
        "00000000-0000-0000-0000-000000000003",
        json!({OWNER: "ghost", "vault-active": "true"}),
        json!({"metadata": {"ownerReferences": [{"apiVersion": "vault-registrar.dev/v1alpha1", "kind": "VaultCluster", "name": "ghost", "uid": "00000000-0000-0000-0000-000000000003", "controller": true}]}}),
    )?;
    let created = api.create(&PostParams::default(), &ghost).await;
    let admitted = created.is_ok();
    t.record(
        "create a Service controlled by a VaultCluster that does not exist",
        Want::Admitted,
        created,
    );
    if admitted {
        let start = Instant::now();
        let admin: Api<Service> = Api::namespaced(c.admin.clone(), ns);
        // The garbage collector learns a new kind (the CRD, installed moments ago) from
        // discovery, which it reads every 30 s; in a cluster where the CRD is older it
        // deletes the Service within a second.
        wait::until(
            "the garbage collector deletes the ghost's Service",
            Duration::from_secs(90),
            || async { Ok(admin.get_opt("ghost").await?.is_none().then_some(())) },
        )
        .await?;
        println!("the ghost's Service lived {:?}", start.elapsed());
    }
    let strip = json!({"metadata": {"labels": {OWNER: null, "vault-active": null}}});
    t.record(
        "remove our labels from another application's pod",
        Want::Admitted,
        pods.patch("db-0", &PatchParams::default(), &Patch::Merge(strip))
            .await,
    );
    Ok(())
}

async fn pod_tries(t: &mut Tries, c: &Clients, ns: &str) {
    let pods: Api<Pod> = Api::namespaced(c.operator.clone(), ns);
    let limits = Want::Refused("limits");
    let ownership = Want::Refused("ownership");
    let patches: Vec<(&str, Want, &str, Value)> = vec![
        (
            "set another label on a Vault pod",
            limits,
            "vault-0",
            json!({"metadata": {"labels": {"team": "blue"}}}),
        ),
        (
            "change the selector's label of a Vault pod",
            limits,
            "vault-0",
            json!({"metadata": {"labels": {"app.kubernetes.io/name": "other"}}}),
        ),
        (
            "annotate a Vault pod",
            limits,
            "vault-0",
            json!({"metadata": {"annotations": {"note": "x"}}}),
        ),
        (
            "change a Vault pod's spec",
            limits,
            "vault-0",
            json!({"spec": {"activeDeadlineSeconds": 100000}}),
        ),
        (
            "name another prefix in a Vault pod's prefix label",
            limits,
            "vault-0",
            json!({"metadata": {"labels": {"vault-registrar.dev/label-prefix": "app"}}}),
        ),
        (
            "set a role label on a pod without the ownership label",
            limits,
            "db-0",
            json!({"metadata": {"labels": {"vault-active": "true"}}}),
        ),
        (
            "pull another application's pod into the cluster",
            ownership,
            "db-0",
            json!({"metadata": {"labels": {OWNER: "vault"}}}),
        ),
        (
            "pull another application's pod into the active Service",
            ownership,
            "db-0",
            json!({"metadata": {"labels": {OWNER: "vault", "vault-active": "true", "app.kubernetes.io/name": null}}}),
        ),
        (
            "claim a pod the VaultCluster's matchExpressions exclude",
            ownership,
            "canary-0",
            json!({"metadata": {"labels": {OWNER: "narrow"}}}),
        ),
        (
            "change a Vault pod's role labels (the operator's own write)",
            Want::Admitted,
            "vault-2",
            json!({"metadata": {"labels": {"vault-sealed": "true"}}}),
        ),
        (
            "hand a Vault pod to another VaultCluster that selects it too",
            Want::Admitted,
            "vault-1",
            json!({"metadata": {"labels": {OWNER: "narrow"}}}),
        ),
        (
            "give it back",
            Want::Admitted,
            "vault-1",
            json!({"metadata": {"labels": {OWNER: "vault"}}}),
        ),
    ];
    for (what, want, pod, patch) in patches {
        t.record(
            what,
            want,
            pods.patch(pod, &PatchParams::default(), &Patch::Merge(patch))
                .await,
        );
    }
    let stray: Api<Pod> = Api::namespaced(c.operator.clone(), &format!("{ns}-empty"));
    t.record(
        "label a pod where no VaultCluster is",
        ownership,
        stray
            .patch(
                "stray-0",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {OWNER: "vault"}}})),
            )
            .await,
    );
    let new_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "mine"},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }))
    .expect("a pod");
    t.record(
        "create a pod",
        Want::Rbac,
        pods.create(&PostParams::default(), &new_pod).await,
    );
    t.record(
        "delete a pod",
        Want::Rbac,
        pods.delete("db-0", &DeleteParams::default()).await,
    );
    eviction_tries(t, c, ns).await;
}

/// Evictions (the chart grants pods/eviction for spec.upgrade), all as dry runs, which
/// admission judges as it would the real ones. The body is written out: kube's
/// `Api::evict` names the field `delete_options`, which the API server ignores.
async fn eviction_tries(t: &mut Tries, c: &Clients, ns: &str) {
    let evictions = Want::Refused("evictions");
    let evict = |ns: String, pod: &'static str, with_uid: bool| {
        let (admin, operator) = (c.admin.clone(), c.operator.clone());
        async move {
            let uid = Api::<Pod>::namespaced(admin, &ns)
                .get(pod)
                .await
                .ok()
                .and_then(|p| p.metadata.uid)
                .filter(|_| with_uid);
            let body = json!({
                "apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": pod},
                "deleteOptions": {"preconditions": {"uid": uid}},
            });
            let dry = PostParams {
                dry_run: true,
                ..Default::default()
            };
            Api::<Pod>::namespaced(operator, &ns)
                .create_subresource::<_, Value>("eviction", pod, &dry, &body)
                .await
        }
    };
    t.record(
        "evict a pod of a VaultCluster without spec.upgrade",
        evictions,
        evict(ns.to_string(), "vault-0", true).await,
    );
    t.record(
        "evict a pod without a UID precondition",
        evictions,
        evict(ns.to_string(), "db-0", false).await,
    );
    // What the policy cannot refuse: where no VaultCluster is, it has no param and must
    // allow (a missing param denies before the match conditions, so everyone's evictions
    // would be refused); an Eviction shows no labels of its pod.
    t.record(
        "evict a pod where no VaultCluster is (the policy cannot act)",
        Want::Admitted,
        evict(format!("{ns}-empty"), "stray-0", false).await,
    );
    t.record(
        "evict a pod no VaultCluster lists (the policy cannot tell)",
        Want::Admitted,
        evict(ns.to_string(), "db-0", true).await,
    );
}

async fn vault_cluster_tries(t: &mut Tries, c: &Clients, ns: &str) {
    let api: Api<VaultCluster> = Api::namespaced(c.operator.clone(), ns);
    let refused = Want::Refused("vaultclusters");
    let patches: Vec<(&str, Want, Value)> = vec![
        (
            "widen a VaultCluster's selector",
            refused,
            json!({"spec": {"selector": {"matchLabels": {"app": "db"}}}}),
        ),
        (
            "change a VaultCluster's label prefix",
            refused,
            json!({"spec": {"labelPrefix": "other"}}),
        ),
        (
            "label a VaultCluster",
            refused,
            json!({"metadata": {"labels": {"team": "blue"}}}),
        ),
        (
            "add another finalizer to a VaultCluster",
            refused,
            json!({"metadata": {"finalizers": ["vault-registrar.dev/cleanup", "example.com/hold"]}}),
        ),
        (
            "remove our finalizer (the operator's own write)",
            Want::Admitted,
            json!({"metadata": {"finalizers": null}}),
        ),
        (
            "add our finalizer (the operator's own write)",
            Want::Admitted,
            json!({"metadata": {"finalizers": ["vault-registrar.dev/cleanup"]}}),
        ),
    ];
    for (what, want, patch) in patches {
        t.record(
            what,
            want,
            api.patch("vault", &PatchParams::default(), &Patch::Merge(patch))
                .await,
        );
    }
    t.record(
        "write a VaultCluster's status (the operator's own write)",
        Want::Admitted,
        api.patch_status(
            "vault",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"pods": 3}})),
        )
        .await,
    );
}

/// Anyone but the operator: neither a tenant's ServiceAccount nor the cluster admin sets
/// or changes the ownership label, through the pod or its status.
async fn other_principal_tries(t: &mut Tries, c: &Clients, ns: &str) {
    let tenant: Api<Pod> = Api::namespaced(c.tenant.clone(), ns);
    let admin: Api<Pod> = Api::namespaced(c.admin.clone(), ns);
    let refused = Want::Refused("ownership-label");
    let own = |value: &str| json!({"metadata": {"labels": {OWNER: value}}});
    let smuggler: Pod = serde_json::from_value(json!({
        "metadata": {"name": "smuggler", "labels": {"app.kubernetes.io/name": "vault", OWNER: "vault", "vault-active": "true"}},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }))
    .expect("a pod");
    let pp = PatchParams::default();
    t.record(
        "tenant: create a pod carrying the ownership label",
        refused,
        tenant.create(&PostParams::default(), &smuggler).await,
    );
    t.record(
        "tenant: add the ownership label to a pod",
        refused,
        tenant
            .patch("canary-0", &pp, &Patch::Merge(own("vault")))
            .await,
    );
    t.record(
        "tenant: change a Vault pod's ownership label",
        refused,
        tenant
            .patch("vault-0", &pp, &Patch::Merge(own("narrow")))
            .await,
    );
    t.record(
        "tenant: add the ownership label through pods/status",
        refused,
        tenant
            .patch_status("canary-0", &pp, &Patch::Merge(own("vault")))
            .await,
    );
    t.record(
        "cluster admin: add the ownership label to a pod",
        refused,
        admin
            .patch("canary-0", &pp, &Patch::Merge(own("vault")))
            .await,
    );
    t.record(
        "tenant: label a pod otherwise (not the policies' business)",
        Want::Admitted,
        tenant
            .patch(
                "canary-0",
                &pp,
                &Patch::Merge(json!({"metadata": {"labels": {"team": "blue"}}})),
            )
            .await,
    );
    t.record(
        "tenant: remove a Vault pod's ownership label (takes it out of the Services, as deleting it would)",
        Want::Admitted,
        tenant.patch("vault-1", &pp, &Patch::Merge(json!({"metadata": {"labels": {OWNER: null}}}))).await,
    );
}

/// After all that, the operator repairs under the policies (the deleted standby Service,
/// the pod whose ownership label a tenant removed) and cleans up when its VaultCluster is
/// deleted (labels stripped, finalizer removed), with no write refused.
async fn operator_still_works(t: &mut Tries, c: &Clients, vault: &SimCluster, ns: &str) {
    let got = repairs_and_cleans_up(c, vault, ns).await;
    t.rows.push(Try {
        what: "the operator again: repair, then clean up on deletion".into(),
        want: Want::Admitted,
        got: got.map_err(|e| format!("{e:#}")),
    });
}

async fn repairs_and_cleans_up(c: &Clients, vault: &SimCluster, ns: &str) -> anyhow::Result<()> {
    let admin_vcs: Api<VaultCluster> = Api::namespaced(c.admin.clone(), ns);
    // The second VaultCluster only served the attacks; it would share the pods.
    admin_vcs.delete("narrow", &DeleteParams::default()).await?;
    // Another writer (the admin, whom no policy limits here) adds what the operator never
    // sets and changes the type: the operator puts it back, though the policy judges each
    // of its writes by the object it leaves.
    let services: Api<Service> = Api::namespaced(c.admin.clone(), ns);
    let added = json!({"metadata": {"annotations": {"example.com/steer": "x"}},
                       "spec": {"externalIPs": ["192.0.2.20"], "type": "LoadBalancer"}});
    services
        .patch(
            "vault-active",
            &PatchParams::default(),
            &Patch::Merge(added),
        )
        .await?;
    let log = shared().dir().join(format!("operator-{ns}-again.log"));
    let operator = Operator::start(bin(), &c.operator_kubeconfig, &["--namespace", ns], &log)?;
    converged(&c.admin, vault, ns).await?;
    wait::until("the standby Service is back", LIMIT, || async {
        Ok(services.get_opt("vault-standby").await?.map(|_| ()))
    })
    .await?;
    wait::until(
        "the active Service is as the operator writes it",
        LIMIT,
        || async {
            let active = services.get("vault-active").await?;
            let spec = active.spec.unwrap_or_default();
            let clean = spec.external_ips.unwrap_or_default().is_empty()
                && spec.type_.as_deref() == Some("ClusterIP")
                && !active
                    .metadata
                    .annotations
                    .unwrap_or_default()
                    .contains_key("example.com/steer");
            Ok(clean.then_some(()))
        },
    )
    .await?;
    admin_vcs.delete("vault", &DeleteParams::default()).await?;
    vault.wait_labels(OWNER, &[None, None, None], LIMIT).await?;
    wait::until("the VaultCluster is gone", LIMIT, || async {
        Ok(admin_vcs.get_opt("vault").await?.is_none().then_some(()))
    })
    .await?;
    drop(operator);
    no_denials(&log)
}

/// A release that watches some namespaces guards the ownership label in those only, so
/// releases watching other namespaces are not refused theirs; a cluster-wide one guards it
/// everywhere.
#[tokio::test]
async fn a_namespaced_release_guards_the_label_only_where_it_watches() -> anyhow::Result<()> {
    let chart = chart();
    let selector = |set: &'static str| {
        let chart = chart.clone();
        async move {
            let mut args = vec![
                "template",
                "vr",
                chart.to_str().unwrap(),
                chart::KUBE_VERSION,
                "--show-only",
                "templates/admission-policy.yaml",
            ];
            args.extend(values(set));
            let rendered = helm(&args).await?;
            let binding = serde_yaml::Deserializer::from_str(&rendered)
                .map(serde_json::Value::deserialize)
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .find(|d| {
                    d["kind"] == "ValidatingAdmissionPolicyBinding"
                        && d["metadata"]["name"] == "vr-vault-registrar-ownership-label"
                })
                .ok_or_else(|| anyhow::anyhow!("no ownership-label binding in {rendered}"))?;
            anyhow::Ok(binding["spec"]["matchResources"]["namespaceSelector"].clone())
        }
    };
    assert_eq!(
        selector("namespaces").await?,
        json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["a", "b"]}]})
    );
    assert_eq!(selector("defaults").await?, Value::Null);
    Ok(())
}
