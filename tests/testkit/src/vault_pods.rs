//! Real Vault as users run it on the node: a StatefulSet of three raft nodes laid out as
//! the official Helm chart lays it out (pods `vault-0..2`, its labels and ports,
//! `updateStrategy: OnDelete`, `podManagementPolicy: Parallel`, the readiness probe that
//! counts sealed and uninitialized pods as ready), from an image of the Vault binary the
//! tests build. The test inits and unseals through the pod IPs, as an operator does with
//! `kubectl exec vault operator ...`.
//!
//! Where this departs from the chart, and why:
//! - No cluster DNS runs on the node, so the chart's `retry_join` by the headless Service's
//!   names cannot resolve. Each node joins with `auto_join` by Vault's built-in Kubernetes
//!   discovery (`provider=k8s`: the pods of the label selector, by pod IP, through the
//!   `kubernetes` Service with the pod's ServiceAccount), which the pod network reaches.
//! - Storage is an emptyDir, not a PersistentVolumeClaim (no volume provisioner): a
//!   replaced pod starts empty and uninitialized, joins the cluster again under the same
//!   raft node ID (the pod name), and waits for its unseal key, as a new pod does.
//! - `api_addr` and `cluster_addr` are the pod IP (downward API), not DNS names.
//! - TLS is off on the listener; no preStop hook (the image has no shell), so the pod's
//!   SIGTERM goes straight to Vault, which steps down.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::image::{self, VAULT_IMAGE};
use crate::node::NodePlane;
use crate::release::apply;
use crate::wait;

pub const REPLICAS: usize = 3;
pub const API_PORT: u16 = 8200;
/// The official chart's server pods carry these.
pub const SELECTOR: &str = "app.kubernetes.io/name=vault,component=server";
/// The pod-template annotation whose change makes a new StatefulSet revision.
pub const REVISION_ANNOTATION: &str = "example.com/revision";
const LIMIT: Duration = Duration::from_secs(90);

/// Builds the Vault image from `vault_bin` (once per process) and loads it into the
/// node's containerd. The running node holds the machine lock the build needs.
pub fn import_image(node: &NodePlane, vault_bin: &Path) -> anyhow::Result<()> {
    node.import(image::vault_built(vault_bin)?)
}

/// The HCL every node reads: raft storage joined by Kubernetes discovery.
fn server_config(namespace: &str) -> String {
    format!(
        r#"disable_mlock = true
ui = false
listener "tcp" {{
  address = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_disable = 1
}}
storage "raft" {{
  path = "/vault/data"
  performance_multiplier = 1
  retry_join {{
    auto_join = "provider=k8s namespace={namespace} label_selector=\"{SELECTOR}\""
    auto_join_scheme = "http"
    auto_join_port = 8200
  }}
}}
"#
    )
}

/// Everything the StatefulSet needs in `namespace`: the ServiceAccount discovery reads pods
/// with, the config, the headless Service, the StatefulSet at revision `revision`.
pub fn manifests(namespace: &str, revision: &str) -> String {
    let labels = json!({
        "app.kubernetes.io/name": "vault",
        "app.kubernetes.io/instance": "vault",
        "component": "server",
    });
    let objects = [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "vault", "namespace": namespace}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "vault-discovery", "namespace": namespace},
               "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "vault-discovery", "namespace": namespace},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "vault-discovery"},
               "subjects": [{"kind": "ServiceAccount", "name": "vault", "namespace": namespace}]}),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "vault-config", "namespace": namespace},
               "data": {"extraconfig-from-values.hcl": server_config(namespace)}}),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "vault-internal", "namespace": namespace, "labels": labels},
               "spec": {"clusterIP": "None", "publishNotReadyAddresses": true, "selector": labels,
                        "ports": [{"name": "http", "port": 8200}, {"name": "https-internal", "port": 8201}]}}),
        statefulset(namespace, &labels, revision),
    ];
    objects
        .iter()
        .map(|o| serde_json::to_string(o).expect("JSON"))
        .collect::<Vec<_>>()
        .join("\n---\n")
}

fn statefulset(namespace: &str, labels: &Value, revision: &str) -> Value {
    let field_env = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let health = "/v1/sys/health?standbyok=true&sealedcode=204&uninitcode=204";
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "vault", "namespace": namespace, "labels": labels},
        "spec": {
            "serviceName": "vault-internal",
            "podManagementPolicy": "Parallel",
            "replicas": REPLICAS,
            "updateStrategy": {"type": "OnDelete"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": {REVISION_ANNOTATION: revision}},
                "spec": {
                    "serviceAccountName": "vault",
                    "terminationGracePeriodSeconds": 10,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532},
                    "volumes": [
                        {"name": "config", "configMap": {"name": "vault-config"}},
                        {"name": "data", "emptyDir": {}},
                    ],
                    "containers": [{
                        "name": "vault",
                        "image": VAULT_IMAGE,
                        "imagePullPolicy": "Never",
                        "args": ["server", "-config=/vault/config"],
                        "env": [
                            field_env("POD_IP", "status.podIP"),
                            field_env("VAULT_RAFT_NODE_ID", "metadata.name"),
                            {"name": "VAULT_ADDR", "value": "http://127.0.0.1:8200"},
                            {"name": "VAULT_API_ADDR", "value": "http://$(POD_IP):8200"},
                            {"name": "VAULT_CLUSTER_ADDR", "value": "https://$(POD_IP):8201"},
                        ],
                        "ports": [
                            {"name": "http", "containerPort": 8200},
                            {"name": "https-internal", "containerPort": 8201},
                        ],
                        "readinessProbe": {
                            "httpGet": {"path": health, "port": 8200, "scheme": "HTTP"},
                            "periodSeconds": 2, "failureThreshold": 2, "timeoutSeconds": 3,
                        },
                        "volumeMounts": [
                            {"name": "config", "mountPath": "/vault/config"},
                            {"name": "data", "mountPath": "/vault/data"},
                        ],
                    }],
                },
            },
        },
    })
}

/// The unseal key and root token `sys/init` gave.
#[derive(Clone, Debug)]
pub struct Keys {
    pub unseal: String,
    pub root_token: String,
}

/// The StatefulSet's pods seen from the test: by name, through the API server for their
/// current address and straight to Vault on it.
pub struct VaultPods {
    pub namespace: String,
    client: kube::Client,
    keys: Option<Keys>,
}

impl VaultPods {
    /// Applies the manifests and waits until the three pods answer (uninitialized).
    pub async fn deploy(
        node: &NodePlane,
        client: &kube::Client,
        namespace: &str,
    ) -> anyhow::Result<Self> {
        apply(node, &manifests(namespace, "1")).await?;
        let pods = Self {
            namespace: namespace.into(),
            client: client.clone(),
            keys: None,
        };
        for i in 0..REPLICAS {
            pods.wait_health(&pod_name(i), "uninitialized", |h| h.0 == 501)
                .await?;
        }
        Ok(pods)
    }

    pub fn keys(&self) -> anyhow::Result<&Keys> {
        self.keys.as_ref().context("Vault is not initialized yet")
    }

    /// The current address of pod `name`, when it runs and is not being deleted.
    pub async fn ip(&self, name: &str) -> anyhow::Result<Option<Ipv4Addr>> {
        let pod = Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .get_opt(name)
            .await?;
        Ok(pod
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .and_then(|p| p.status?.pod_ip)
            .and_then(|ip| ip.parse().ok()))
    }

    /// The StatefulSet's running pods, by name, with their addresses.
    pub async fn ips(&self) -> anyhow::Result<Vec<(String, Ipv4Addr)>> {
        let list = Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .list(&ListParams::default().labels(SELECTOR))
            .await?;
        let mut out: Vec<(String, Ipv4Addr)> = list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| {
                let ip = p.status?.pod_ip?.parse().ok()?;
                Some((p.metadata.name?, ip))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Calls Vault's HTTP API on pod `name`, with the root token once there is one.
    pub async fn call(
        &self,
        name: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let ip = self
            .ip(name)
            .await?
            .with_context(|| format!("{name} has no address"))?;
        let token = self.keys.as_ref().map(|k| k.root_token.as_str());
        vault_api(
            SocketAddr::new(ip.into(), API_PORT),
            method,
            path,
            token,
            body,
        )
        .await
    }

    /// `sys/health` of pod `name`: the status code and the body.
    pub async fn health(&self, name: &str) -> anyhow::Result<(u16, Value)> {
        self.call(name, "GET", "/v1/sys/health", None).await
    }

    /// Waits until pod `name`'s health answer satisfies `ok`.
    pub async fn wait_health(
        &self,
        name: &str,
        what: &str,
        ok: impl Fn(&(u16, Value)) -> bool,
    ) -> anyhow::Result<()> {
        wait::until(&format!("{name} {what}"), LIMIT, || async {
            Ok(self.health(name).await.ok().filter(&ok).map(|_| ()))
        })
        .await
    }

    /// `vault operator init -key-shares=1 -key-threshold=1` on pod `name`.
    pub async fn init(&mut self, name: &str) -> anyhow::Result<()> {
        let body = json!({"secret_shares": 1, "secret_threshold": 1});
        let (code, answer) = self.call(name, "PUT", "/v1/sys/init", Some(body)).await?;
        anyhow::ensure!(code == 200, "init on {name}: {code} {answer}");
        let field = |k: &str, v: &Value| v.as_str().map(str::to_owned).context(k.to_owned());
        self.keys = Some(Keys {
            unseal: field("keys_base64", &answer["keys_base64"][0])?,
            root_token: field("root_token", &answer["root_token"])?,
        });
        Ok(())
    }

    /// Sends the unseal key to pod `name` until it is accepted once, then waits until it
    /// answers unsealed. A pod still joining refuses the key until its next auto_join
    /// attempt has fetched the leader's challenge; an accepted key is never sent again.
    pub async fn unseal(&self, name: &str) -> anyhow::Result<()> {
        let key = json!({"key": self.keys()?.unseal});
        wait::until(&format!("{name} to take the unseal key"), LIMIT, || async {
            match self
                .call(name, "PUT", "/v1/sys/unseal", Some(key.clone()))
                .await
            {
                Ok((200, _)) => Ok(Some(())),
                Ok((_, answer)) => {
                    tracing::debug!(%name, %answer, "unseal key refused; retrying");
                    Ok(None)
                }
                Err(e) => {
                    tracing::debug!(%name, error = %e, "unseal not answered; retrying");
                    Ok(None)
                }
            }
        })
        .await?;
        self.wait_health(name, "unsealed", |(code, _)| matches!(code, 200 | 429))
            .await
    }

    /// Init on vault-0, unseal it, then unseal the others (they join it): one active pod,
    /// two standbys.
    pub async fn bootstrap(&mut self) -> anyhow::Result<()> {
        let first = pod_name(0);
        self.init(&first).await?;
        self.unseal(&first).await?;
        self.wait_health(&first, "active", |(code, _)| *code == 200)
            .await?;
        for i in 1..REPLICAS {
            self.unseal(&pod_name(i)).await?;
        }
        self.wait_voters().await
    }

    /// Waits until every pod is a raft voter: a joiner starts as a non-voter that
    /// autopilot promotes once stable, and only voters can take over after a step-down.
    pub async fn wait_voters(&self) -> anyhow::Result<()> {
        let all: Vec<String> = (0..REPLICAS).map(pod_name).collect();
        wait::until("every pod a raft voter", LIMIT, || async {
            Ok(self.voters().await.ok().filter(|v| *v == all).map(|_| ()))
        })
        .await
    }

    /// The pod that answers active now, asked directly.
    pub async fn active(&self) -> anyhow::Result<Option<String>> {
        for (name, _) in self.ips().await? {
            if matches!(self.health(&name).await, Ok((200, _))) {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// Waits for an active pod other than `not` (any when None).
    pub async fn wait_active(&self, not: Option<&str>) -> anyhow::Result<String> {
        wait::until("an active Vault pod", LIMIT, || async {
            Ok(self.active().await?.filter(|a| Some(a.as_str()) != not))
        })
        .await
    }

    /// `vault operator step-down` on pod `name`.
    pub async fn step_down(&self, name: &str) -> anyhow::Result<()> {
        let (code, answer) = self.call(name, "PUT", "/v1/sys/step-down", None).await?;
        anyhow::ensure!(code == 204, "step-down on {name}: {code} {answer}");
        Ok(())
    }

    /// The raft voters the active pod lists, by node ID.
    pub async fn voters(&self) -> anyhow::Result<Vec<String>> {
        let active = self.wait_active(None).await?;
        let (code, answer) = self
            .call(&active, "GET", "/v1/sys/storage/raft/configuration", None)
            .await?;
        anyhow::ensure!(code == 200, "raft configuration: {code} {answer}");
        let mut voters: Vec<String> = answer["data"]["config"]["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["voter"] == true)
            .filter_map(|s| s["node_id"].as_str().map(str::to_owned))
            .collect();
        voters.sort();
        Ok(voters)
    }
}

/// A VaultCluster `vault` over the StatefulSet's pods, `extra` appended to its spec (the
/// CRD's default probing otherwise).
pub fn vault_cluster(namespace: &str, extra: &str) -> String {
    format!(
        "apiVersion: vault-registrar.dev/v1alpha1\nkind: VaultCluster\nmetadata: {{name: vault, namespace: {namespace}}}\nspec:\n  selector: {{matchLabels: {{app.kubernetes.io/name: vault, component: server}}}}\n  {extra}\n"
    )
}

/// The upgrade as the StatefulSet and the VaultCluster show it.
impl VaultPods {
    pub async fn update_revision(&self) -> anyhow::Result<String> {
        let set = Api::<StatefulSet>::namespaced(self.client.clone(), &self.namespace)
            .get("vault")
            .await?;
        Ok(set
            .status
            .and_then(|s| s.update_revision)
            .unwrap_or_default())
    }

    /// Changes the pod template's annotation: a new StatefulSet revision.
    pub async fn new_revision(&self, value: &str) -> anyhow::Result<()> {
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {REVISION_ANNOTATION: value}}}}});
        Api::<StatefulSet>::namespaced(self.client.clone(), &self.namespace)
            .patch("vault", &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        Ok(())
    }

    /// The VaultCluster's Upgrading condition now: status, reason, message (empty when
    /// absent).
    pub async fn upgrading(&self) -> anyhow::Result<(String, String, String)> {
        let gvk = GroupVersionKind::gvk("vault-registrar.dev", "v1alpha1", "VaultCluster");
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &self.namespace,
            &ApiResource::from_gvk(&gvk),
        );
        let vc = api.get("vault").await?;
        let field = |c: &Value, k: &str| c[k].as_str().unwrap_or_default().to_string();
        Ok(vc.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Upgrading")
            .map(|c| (field(c, "status"), field(c, "reason"), field(c, "message")))
            .unwrap_or_default())
    }

    /// Waits for the Upgrading condition with this status and reason; its message.
    pub async fn wait_upgrading(&self, status: &str, reason: &str) -> anyhow::Result<String> {
        let last = Mutex::new(Default::default());
        let got = wait::until(&format!("Upgrading={status} ({reason})"), LIMIT, || async {
            let (s, r, m) = self.upgrading().await?;
            let found = (s == status && r == reason).then(|| m.clone());
            *last.lock().expect("last lock") = (s, r, m);
            Ok(found)
        })
        .await;
        got.with_context(|| format!("last seen: {:?}", last.lock().expect("last lock")))
    }

    /// Until the upgrade is done (UpToDate after at least one step): whenever the condition
    /// names a replacement waiting for its unseal (`WaitingForUnseal`), unseals it, once.
    /// The pods so named, in order; the last is the pod active before, whose replacement
    /// the upgrade waits for as for the others.
    pub async fn unseal_each_replacement(&self) -> anyhow::Result<Vec<String>> {
        self.unseal_each_replacement_after(async |_| Ok(())).await
    }

    /// `unseal_each_replacement`, with `before` run on each replacement's name first, while
    /// the step that made it is still in flight.
    pub async fn unseal_each_replacement_after(
        &self,
        mut before: impl AsyncFnMut(&str) -> anyhow::Result<()>,
    ) -> anyhow::Result<Vec<String>> {
        let mut unsealed: Vec<String> = Vec::new();
        let start = std::time::Instant::now();
        loop {
            anyhow::ensure!(
                start.elapsed() < LIMIT * 4,
                "the upgrade did not end; unsealed {unsealed:?}"
            );
            let (status, reason, message) = self.upgrading().await?;
            if status == "False" && reason == "UpToDate" && !unsealed.is_empty() {
                return Ok(unsealed);
            }
            let named = message.split_whitespace().next().unwrap_or_default();
            if reason == "WaitingForUnseal" && !unsealed.iter().any(|u| u == named) {
                println!("Upgrading={status} {reason}: {message}");
                before(named).await?;
                self.unseal(named).await?;
                unsealed.push(named.to_string());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Watches the StatefulSet's pods and counts, at every change the API server sends, how
/// many of `vault-0..2` are away: missing, terminating or not Running. What Vault answers
/// (sealed, joining) and readiness (a probe timing out on a loaded machine) do not count:
/// this is about the pods an eviction takes away.
pub struct AwayWatch {
    most: Arc<Mutex<(usize, String)>>,
    /// Each change of the pods away, with the pod event that made it.
    changes: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl AwayWatch {
    pub fn start(client: &kube::Client, namespace: &str) -> Self {
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let most = Arc::new(Mutex::new((0, String::new())));
        let changes = Arc::new(Mutex::new(Vec::new()));
        let (record, log) = (most.clone(), changes.clone());
        let task = tokio::spawn(async move {
            let config = watcher::Config::default().labels(SELECTOR);
            let mut seen: BTreeMap<String, Pod> = BTreeMap::new();
            let mut events = std::pin::pin!(watcher(pods, config).applied_objects());
            let mut before = Vec::new();
            while let Some(Ok(pod)) = events.next().await {
                let what = format!(
                    "{} {} rv {}",
                    pod.name_any(),
                    pod.status
                        .as_ref()
                        .and_then(|s| s.phase.clone())
                        .unwrap_or_default(),
                    pod.resource_version().unwrap_or_default()
                );
                seen.insert(pod.name_any(), pod);
                // The first list arrives one pod at a time: nothing is away before all
                // three were seen once.
                if seen.len() < REPLICAS {
                    continue;
                }
                let away: Vec<String> = (0..REPLICAS)
                    .map(pod_name)
                    .filter(|n| seen.get(n).is_none_or(|p| !present(p)))
                    .collect();
                if away != before {
                    log.lock()
                        .expect("away lock")
                        .push(format!("{what}: away {away:?}"));
                    before = away.clone();
                }
                let mut most = record.lock().expect("away lock");
                if away.len() > most.0 {
                    *most = (away.len(), away.join(","));
                }
            }
        });
        Self {
            most,
            changes,
            task,
        }
    }

    /// The most pods away at one moment, and which.
    pub fn most(&self) -> (usize, String) {
        self.most.lock().expect("away lock").clone()
    }

    /// Each change of the pods away, in the order the watch saw them.
    pub fn changes(&self) -> Vec<String> {
        self.changes.lock().expect("away lock").clone()
    }
}

impl Drop for AwayWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn present(pod: &Pod) -> bool {
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    running && pod.metadata.deletion_timestamp.is_none()
}

pub fn pod_name(i: usize) -> String {
    format!("vault-{i}")
}

/// One HTTP/1.0 exchange with Vault's API over a fresh connection (no chunked answers, no
/// pooling that would hide a pod gone): the status code and the JSON body (Null when empty).
pub async fn vault_api(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let token = token
        .map(|t| format!("X-Vault-Token: {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{token}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let raw = tokio::time::timeout(Duration::from_secs(5), async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    })
    .await
    .with_context(|| format!("{method} {path} at {addr}: no answer within 5s"))??;
    parse_answer(&raw).with_context(|| format!("{method} {path} at {addr}"))
}

fn parse_answer(raw: &[u8]) -> anyhow::Result<(u16, Value)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {text:?}"))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let body = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).with_context(|| format!("body {body:?}"))?
    };
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed_with_or_without_a_body() {
        let raw = b"HTTP/1.0 429 Too Many Requests\r\nContent-Type: application/json\r\n\r\n{\"standby\":true}";
        let (code, body) = parse_answer(raw).unwrap();
        assert_eq!(code, 429);
        assert_eq!(body["standby"], true);
        assert_eq!(
            parse_answer(b"HTTP/1.0 204 No Content\r\n\r\n").unwrap(),
            (204, Value::Null)
        );
        assert!(parse_answer(b"HTTP/1.0 200 OK\r\n").is_err());
    }

    #[test]
    fn the_statefulset_has_the_charts_layout() {
        let yaml = manifests("vault", "1");
        let set: Value = yaml
            .split("\n---\n")
            .map(|o| serde_json::from_str::<Value>(o).unwrap())
            .find(|o| o["kind"] == "StatefulSet")
            .unwrap();
        assert_eq!(set["spec"]["updateStrategy"]["type"], "OnDelete");
        let pod = &set["spec"]["template"]["spec"];
        assert_eq!(
            pod["containers"][0]["readinessProbe"]["httpGet"]["path"],
            "/v1/sys/health?standbyok=true&sealedcode=204&uninitcode=204"
        );
        let config = server_config("vault");
        assert!(config.contains("performance_multiplier = 1"), "{config}");
        assert!(config.contains("provider=k8s namespace=vault"), "{config}");
    }
}
