//! Observe: the cluster's pods from the caches, sorted by what the round does with them,
//! and one probe of each that can be probed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use kube::ResourceExt;
use kube::core::SelectorExt;

use super::Context;
use super::settings::ProbeSettings;
use crate::crd::VaultCluster;
use crate::decide::{Member, Reach};
use crate::health::Health;
use crate::index::SlimPod;
use crate::probe::{Share, Target, server_name};
use crate::selector;
use crate::tracker::{Failure, FailureKind, Outcome};

/// The pods a round works on, sorted by what the round does with them.
pub struct Selection {
    /// Selected by this VaultCluster and by no older one: probed and labelled.
    pub candidates: Vec<Arc<SlimPod>>,
    /// Selected, but left to an older VaultCluster: "pod (cluster)".
    pub overlaps: Vec<String>,
    /// Labelled by this VaultCluster and no longer selected: their labels go.
    pub strays: Vec<Arc<SlimPod>>,
}

/// The selected pods plus the pods carrying this VaultCluster's ownership, from the cache:
/// what they cost is what this cluster has, whatever else the namespace holds.
pub fn pods_of(vc: &VaultCluster, ctx: &Context) -> Vec<Arc<SlimPod>> {
    let ns = vc.namespace().unwrap_or_default();
    let index = ctx.caches.pods.read().unwrap();
    let mut pods: BTreeMap<String, Arc<SlimPod>> = BTreeMap::new();
    for pod in index
        .selected(&ns, &vc.spec.selector)
        .into_iter()
        .chain(index.owned_by(&ns, &vc.name_any()))
    {
        pods.insert(pod.name.clone(), pod);
    }
    pods.into_values().collect()
}

pub fn select(vc: &VaultCluster, ctx: &Context) -> Selection {
    let ns = vc.namespace().unwrap_or_default();
    let pods = pods_of(vc, ctx);
    let clusters = ctx.caches.clusters.read().unwrap();
    sort(vc, pods, |labels| clusters.selecting(&ns, labels))
}

/// Sorts pods into candidates, overlaps and strays; `selecting` gives the VaultClusters
/// that select a set of labels.
fn sort(
    vc: &VaultCluster,
    pods: Vec<Arc<SlimPod>>,
    selecting: impl Fn(&BTreeMap<String, String>) -> Vec<Arc<VaultCluster>>,
) -> Selection {
    let mut selection = Selection {
        candidates: Vec::new(),
        overlaps: Vec::new(),
        strays: Vec::new(),
    };
    let parsed = selector::parse(&vc.spec.selector);
    for pod in pods {
        let selected = parsed.as_ref().is_ok_and(|s| s.matches(&pod.labels));
        let others = if selected {
            selecting(&pod.labels)
        } else {
            Vec::new()
        };
        match (
            selected,
            selector::claimed_by_older(vc, &others, &pod.labels),
        ) {
            (true, None) => selection.candidates.push(pod),
            (true, Some(older)) => {
                selection
                    .overlaps
                    .push(format!("{} ({})", pod.name, older.name_any()))
            }
            (false, _) if pod.owner() == Some(&vc.name_any()) => selection.strays.push(pod),
            (false, _) => {}
        }
    }
    selection
}

/// Probes the settled active pod alone: true when it answered exactly as before, so the
/// round has nothing else to do.
pub async fn sentinel(
    vc: &VaultCluster,
    ctx: &Context,
    settings: &ProbeSettings,
    pod: &SlimPod,
) -> bool {
    let share = ctx
        .prober
        .cluster_share(&vc.namespace().unwrap_or_default());
    let Ok(Outcome::Healthy(health)) = probe_pod(ctx, &vc.name_any(), settings, &share, pod).await
    else {
        return false;
    };
    let trackers = ctx.trackers.lock().unwrap();
    // Only the role and the seal count here: a new version waits for the next full round,
    // which holds it to one change per interval.
    let seen = |h: &Health| (h.role, h.initialized, h.sealed);
    trackers
        .get(&vc.uid().unwrap_or_default())
        .and_then(|t| t.healthy(&pod.uid))
        .is_some_and(|h| seen(h) == seen(&health))
}

pub async fn probe_all(
    vc: &VaultCluster,
    ctx: &Context,
    settings: &ProbeSettings,
    pods: &[Arc<SlimPod>],
) -> Vec<Member> {
    let share = ctx
        .prober
        .cluster_share(&vc.namespace().unwrap_or_default());
    let cluster = vc.name_any();
    let outcomes = futures::future::join_all(
        pods.iter()
            .map(|pod| probe_pod(ctx, &cluster, settings, &share, pod)),
    )
    .await;
    let key = vc.uid().unwrap_or_default();
    let now = Instant::now();
    let mut trackers = ctx.trackers.lock().unwrap();
    let tracker = trackers.entry(key).or_default();
    let uids: Vec<&str> = pods.iter().map(|p| p.uid.as_str()).collect();
    tracker.retain(&uids);
    pods.iter()
        .zip(outcomes)
        .map(|(pod, outcome)| {
            let reach = match &outcome {
                Err(_) => Reach::NotProbed,
                Ok(Outcome::Failed(f)) if f.unanswered() => Reach::Unanswered,
                Ok(_) => Reach::Answered,
            };
            let verdict = match outcome {
                Err(reason) => tracker.down(&pod.uid, &reason),
                Ok(outcome) => tracker.record(
                    &pod.uid,
                    outcome,
                    settings.threshold,
                    now,
                    settings.interval,
                ),
            };
            Member {
                name: pod.name.clone(),
                ip: pod.ip.map(|ip| ip.to_string()).unwrap_or_default(),
                labels: pod.labels.as_ref().clone(),
                verdict,
                reach,
                serving: pod.serving(),
            }
        })
        .collect()
}

/// Probes a pod of `cluster` that can be probed; Err names why a pod cannot serve at all.
async fn probe_pod(
    ctx: &Context,
    cluster: &str,
    settings: &ProbeSettings,
    share: &Share,
    pod: &SlimPod,
) -> Result<Outcome, String> {
    if pod.terminating {
        return Err("pod is terminating".into());
    }
    if pod.phase != "Running" {
        let phase = if pod.phase.is_empty() {
            "unknown"
        } else {
            &pod.phase
        };
        return Err(format!("pod phase is {phase}"));
    }
    let ip = pod.ip.ok_or("pod has no IP")?;
    let tls = match &settings.tls {
        None => None,
        Some((config, id, template)) => {
            match server_name(template, &pod.name, &pod.namespace, ip) {
                Ok(name) => Some((config.clone(), *id, name)),
                // The template was checked; a name it still cannot make is not the pod's fault.
                Err(e) => return Ok(Outcome::Failed(Failure::new(FailureKind::Local, e))),
            }
        }
    };
    let target = Target {
        ip,
        port: settings.port,
        path: settings.path.clone(),
        timeout: settings.timeout,
        tls,
    };
    let (outcome, took) = ctx.prober.probe(&target, share).await;
    let label = match &outcome {
        Outcome::Healthy(h) => h.role.as_str(),
        Outcome::Failed(_) => "failed",
    };
    ctx.metrics
        .clusters
        .count_probe(&pod.namespace, cluster, label);
    let result = if label == "failed" { "failed" } else { "ok" };
    ctx.metrics
        .probe_latency
        .with_label_values(&[result])
        .observe(took.as_secs_f64());
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::VaultClusterSpec;
    use crate::labels::OWNER_LABEL;

    fn pod(name: &str, labels: &[(&str, &str)], legacy: Option<&str>) -> Arc<SlimPod> {
        Arc::new(SlimPod {
            name: name.into(),
            namespace: "ns".into(),
            uid: name.into(),
            resource_version: "1".into(),
            labels: Arc::new(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            legacy_owner: legacy.map(String::from),
            terminating: false,
            phase: "Running".into(),
            ip: None,
            ready: true,
            stateful_set: None,
        })
    }

    fn cluster(name: &str, age: i64) -> VaultCluster {
        let spec: VaultClusterSpec =
            serde_yaml::from_str("selector: {matchLabels: {app: vault}}").unwrap();
        let mut vc = VaultCluster::new(name, spec);
        vc.metadata.namespace = Some("ns".into());
        vc.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(age).unwrap(),
            ));
        vc
    }

    #[test]
    fn pods_sort_into_candidates_overlaps_and_strays() {
        let vc = cluster("vault", 10);
        let older = Arc::new(cluster("older", 5));
        let pods = vec![
            pod("mine", &[("app", "vault")], None),
            pod("contested", &[("app", "vault"), ("shared", "yes")], None),
            pod(
                "retired",
                &[("app", "retired"), (OWNER_LABEL, "vault")],
                None,
            ),
            pod(
                "retired-before-the-label",
                &[("app", "retired")],
                Some("vault"),
            ),
            pod(
                "someone-elses",
                &[("app", "web"), (OWNER_LABEL, "other")],
                None,
            ),
        ];
        let selecting = |labels: &BTreeMap<String, String>| {
            if labels.contains_key("shared") {
                vec![older.clone()]
            } else {
                vec![]
            }
        };
        let s = sort(&vc, pods, selecting);
        let names = |pods: &[Arc<SlimPod>]| pods.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&s.candidates), ["mine"]);
        assert_eq!(s.overlaps, ["contested (older)"]);
        assert_eq!(names(&s.strays), ["retired", "retired-before-the-label"]);
    }
}
