//! Retries and rhythm, end to end: a refused write is retried by a full round within the
//! error backoff, not after an interval of probing the pod that was meant to be active, and
//! the status never names a pod active before its label is written; a cluster with no
//! active pod keeps looking fast, however long Vault's election takes.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use vault_registrar::crd::VaultCluster;
use vault_registrar_testkit::vault_sim::Role;
use vault_registrar_testkit::wait;

/// An interval long enough that a promotion left to the next full round fails the bounds.
const SLOW: &str = "health: {interval: 5s, timeout: 300ms}";

/// How often the timing loops look.
const TICK: Duration = Duration::from_millis(20);

/// A ValidatingAdmissionPolicy and its binding refusing any update of pod `pod` in `ns`
/// that gives it `vault-active=true`, while its parameter (ConfigMap `refusal`) says so;
/// other writes pass. The refusal is lifted through the parameter, which the API server
/// reads at each request: a deleted or changed policy takes effect only at its next
/// refresh, up to a second later.
struct Refusal {
    policies: Api<ValidatingAdmissionPolicy>,
    bindings: Api<ValidatingAdmissionPolicyBinding>,
    params: Api<ConfigMap>,
    name: String,
}

impl Refusal {
    async fn install(client: &kube::Client, ns: &str, pod: &str) -> anyhow::Result<Self> {
        let name = format!("refuse-promotion-{ns}");
        let refusal = Self {
            policies: Api::all(client.clone()),
            bindings: Api::all(client.clone()),
            params: Api::namespaced(client.clone(), ns),
            name,
        };
        let param: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "refusal"}, "data": {"refuse": "true"},
        }))?;
        refusal
            .params
            .create(&PostParams::default(), &param)
            .await?;
        let policy = refusal.policy(ns, pod)?;
        refusal
            .policies
            .create(&PostParams::default(), &policy)
            .await?;
        let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
            "metadata": {"name": refusal.name},
            "spec": {
                "policyName": refusal.name,
                "validationActions": ["Deny"],
                "paramRef": {"name": "refusal", "namespace": ns, "parameterNotFoundAction": "Deny"},
            },
        }))?;
        refusal
            .bindings
            .create(&PostParams::default(), &binding)
            .await?;
        Ok(refusal)
    }

    fn policy(&self, ns: &str, pod: &str) -> anyhow::Result<ValidatingAdmissionPolicy> {
        let active = |object: &str| {
            format!(
                "has({object}.metadata.labels) && 'vault-active' in {object}.metadata.labels && {object}.metadata.labels['vault-active'] == 'true'"
            )
        };
        let (promotes, was) = (active("object"), active("oldObject"));
        Ok(serde_json::from_value(json!({
            "metadata": {"name": self.name},
            "spec": {
                "failurePolicy": "Fail",
                "paramKind": {"apiVersion": "v1", "kind": "ConfigMap"},
                "matchConstraints": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                    "resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                        "operations": ["UPDATE"], "resources": ["pods"]}],
                },
                "validations": [{
                    "expression": format!("params.data.refuse != 'true' || object.metadata.name != '{pod}' || !({promotes}) || ({was})"),
                    "message": "promotion refused by the test",
                }],
            },
        }))?)
    }

    /// Waits until the API server applies the policy: a dry-run promotion is refused.
    async fn in_force(&self, pods: &Api<Pod>, pod: &str) -> anyhow::Result<()> {
        let dry = PatchParams {
            dry_run: true,
            ..Default::default()
        };
        let promote = json!({"metadata": {"labels": {"vault-active": "true"}}});
        wait::until("the promotion refused", LIMIT, || async {
            let refused = pods
                .patch(pod, &dry, &Patch::Merge(&promote))
                .await
                .is_err();
            Ok(refused.then_some(()))
        })
        .await
    }

    async fn lift(&self) -> anyhow::Result<()> {
        let allow = json!({"data": {"refuse": "false"}});
        self.params
            .patch("refusal", &PatchParams::default(), &Patch::Merge(&allow))
            .await?;
        Ok(())
    }

    async fn remove(&self) -> anyhow::Result<()> {
        self.bindings
            .delete(&self.name, &DeleteParams::default())
            .await?;
        self.policies
            .delete(&self.name, &DeleteParams::default())
            .await?;
        Ok(())
    }
}

/// Every resourceVersion at which the watched object met a condition, or did not.
type Seen = Arc<Mutex<Vec<(u64, bool)>>>;

/// Records, for every version of the objects `api` watches with `fields`, whether `check`
/// held. resourceVersions are etcd revisions on this control plane, so versions of two
/// objects order their writes.
fn record<K>(
    api: Api<K>,
    fields: &str,
    check: impl Fn(&K) -> bool + Send + Sync + 'static,
) -> (Seen, tokio::task::JoinHandle<()>)
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let seen: Seen = Arc::default();
    let sink = seen.clone();
    let config = watcher::Config::default().fields(fields);
    let task = tokio::spawn(async move {
        // The watcher retries after an error on the next poll: stopping at the first one
        // would end the record early and make the check below see less.
        let events = watcher(api, config).for_each(|event| {
            if let Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) = event {
                let version = obj.meta().resource_version.as_deref().unwrap_or("0");
                let version = version.parse().unwrap_or_default();
                sink.lock().unwrap().push((version, check(&obj)));
            }
            futures::future::ready(())
        });
        events.await;
    });
    (seen, task)
}

fn pod_active(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("vault-active"))
        .is_some_and(|v| v == "true")
}

/// The operator's log lines about writes and failed rounds, to tell a late label's story.
fn writes_and_failures(log: &str) -> String {
    let lines = log.lines();
    let told = lines.filter(|l| l.contains("labels written") || l.contains("reconcile failed"));
    told.collect::<Vec<_>>().join("\n")
}

/// Polls until pod `i` carries `vault-active=true`; how long that took from `since`.
async fn labelled_active(f: &Fixture, i: usize, since: Instant) -> anyhow::Result<Duration> {
    loop {
        if f.vault
            .labels(i)
            .await?
            .get("vault-active")
            .map(String::as_str)
            == Some("true")
        {
            return Ok(since.elapsed());
        }
        anyhow::ensure!(since.elapsed() < LIMIT, "vault-{i} never labelled active");
        tokio::time::sleep(TICK).await;
    }
}

/// A refused promotion is retried by a full round at the error backoff: once the refusal
/// is lifted, the label lands within a second, not at the next full round five seconds on;
/// and the status names the new active pod only after its label is written.
#[tokio::test]
async fn a_refused_promotion_is_retried_at_once() -> anyhow::Result<()> {
    let f = fixture("retry-refused", &TRIO, None).await?;
    f.create("vault", SLOW).await?;
    f.converged().await?;
    let pods: Api<Pod> = Api::namespaced(f.client.clone(), &f.ns);
    let refusal = Refusal::install(&f.client, &f.ns, "vault-1").await?;
    refusal.in_force(&pods, "vault-1").await?;
    let (statuses, watching_status) =
        record(f.clusters(), "metadata.name=vault", |vc: &VaultCluster| {
            vc.status.as_ref().and_then(|s| s.active_pod.as_deref()) == Some("vault-1")
        });
    let (labels, watching_pod) = record(pods.clone(), "metadata.name=vault-1", pod_active);

    f.set(0, Role::Standby).await;
    f.set(1, Role::Active).await;
    wait::until("the operator's promotion refused", LIMIT, || async {
        let log = f.operator.log_text();
        let refused = log.lines().any(|l| {
            l.contains("patching labels of pod vault-1") && l.contains("refused by the test")
        });
        Ok(refused.then_some(()))
    })
    .await?;
    refusal.lift().await?;
    let lifted = Instant::now();
    let took = labelled_active(&f, 1, lifted).await?;
    assert!(
        took < Duration::from_secs(1),
        "vault-1 labelled {took:?} after the refusal was lifted; the operator's rounds:\n{}",
        writes_and_failures(&f.operator.log_text())
    );

    f.condition("vault", "Ready", "True", "Ready").await?;
    refusal.remove().await?;
    watching_status.abort();
    watching_pod.abort();
    let labelled_at = labels
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, active)| *active)
        .map(|(version, _)| *version)
        .min();
    let named_at = statuses
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, names)| *names)
        .map(|(version, _)| *version)
        .min();
    let (Some(labelled_at), Some(named_at)) = (labelled_at, named_at) else {
        anyhow::bail!("not seen: label at {labelled_at:?}, status at {named_at:?}");
    };
    assert!(
        labelled_at < named_at,
        "status named vault-1 at resourceVersion {named_at}, its label came at {labelled_at}"
    );
    Ok(())
}

/// With no active pod for longer than a burst, full rounds still come every
/// `activeInterval`: the pod that wins a long election is labelled within about that, not
/// a quarter of the interval later.
#[tokio::test]
async fn a_long_election_is_followed_within_a_fast_round() -> anyhow::Result<()> {
    let f = fixture("retry-election", &TRIO, None).await?;
    f.create("vault", "health: {interval: 10s, timeout: 300ms}")
        .await?;
    f.converged().await?;
    f.set(0, Role::Standby).await;
    f.labels(
        "vault-active",
        &[Some("false"), Some("false"), Some("false")],
    )
    .await?;
    // Longer than the 10 s burst that follows a change.
    tokio::time::sleep(Duration::from_secs(15)).await;

    // Just after a round has probed the pod, so the next round is a whole gap away.
    let probes = f.vault.sim(2).health_requests();
    while f.vault.sim(2).health_requests() == probes {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let elected = Instant::now();
    f.set(2, Role::Active).await;
    let took = labelled_active(&f, 2, elected).await?;
    assert!(
        took < Duration::from_millis(1500),
        "vault-2 labelled {took:?} after it answered active"
    );
    Ok(())
}
