//! Simulated pods: no kubelet runs, so the kit binds pods to a Node object it created and
//! writes their status (IP, phase, Ready) through the status subresource itself.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

/// The Node every simulated pod is bound to.
pub const NODE_NAME: &str = "sim-node-0";

/// An address no other simulated pod of this process has, in the simulated pod network
/// (see `netns`). Each Vault simulator binds its own address, so every pod listens on the
/// same port, as in a real cluster.
pub fn next_pod_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    crate::netns::pod_ip(NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Creates the Node if it is missing.
pub async fn ensure_node(client: &kube::Client) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}},
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates a namespace and waits for its `default` ServiceAccount, without which the
/// ServiceAccount admission plugin refuses pods.
pub async fn create_namespace(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    create_namespace_with_labels(client, name, BTreeMap::new()).await
}

pub async fn create_namespace_with_labels(
    client: &kube::Client,
    name: &str,
    labels: BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels),
            ..Default::default()
        },
        ..Default::default()
    };
    namespaces.create(&PostParams::default(), &ns).await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    for _ in 0..300 {
        if accounts.get_opt("default").await?.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("namespace {name}: default ServiceAccount never appeared")
}

/// What a simulated pod looks like before its status is set.
#[derive(Clone, Debug)]
pub struct SimPod {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ip: Ipv4Addr,
}

/// Creates a pod bound to the simulated node, with Vault's container ports.
pub async fn create_pod(
    client: &kube::Client,
    namespace: &str,
    pod: &SimPod,
) -> anyhow::Result<Pod> {
    ensure_node(client).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let object: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "labels": pod.labels},
        "spec": {
            "nodeName": NODE_NAME,
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "vault",
                "image": "hashicorp/vault:1.17",
                "ports": [
                    {"name": "http", "containerPort": 8200},
                    {"name": "https-internal", "containerPort": 8201}
                ]
            }]
        }
    }))?;
    Ok(pods.create(&PostParams::default(), &object).await?)
}

/// Marks a pod Running with its IP, Ready or not, as a kubelet would.
pub async fn set_running(
    client: &kube::Client,
    namespace: &str,
    pod: &SimPod,
    ready: bool,
) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let status = if ready { "True" } else { "False" };
    let patch = json!({"status": {
        "phase": "Running",
        "hostIP": "198.18.255.254",
        "podIP": pod.ip.to_string(),
        "podIPs": [{"ip": pod.ip.to_string()}],
        "conditions": [
            {"type": "Ready", "status": status},
            {"type": "ContainersReady", "status": status},
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"}
        ]
    }});
    pods.patch_status(&pod.name, &PatchParams::default(), &Patch::Strategic(patch))
        .await?;
    Ok(())
}

/// Creates the pod and marks it Running and Ready.
pub async fn start_pod(client: &kube::Client, namespace: &str, pod: &SimPod) -> anyhow::Result<()> {
    create_pod(client, namespace, pod).await?;
    set_running(client, namespace, pod, true).await
}

/// The pod's current labels.
pub async fn pod_labels(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    Ok(pods.get(name).await?.metadata.labels.unwrap_or_default())
}
