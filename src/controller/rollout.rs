//! Upgrades by role in a round: observe the StatefulSet (from its cache) and the pods'
//! answers (from this round's probes), decide with `upgrade::plan`, act by one eviction,
//! and report the `Upgrading` condition, an event per step and the steps metric.
//!
//! What is remembered between rounds belongs to the term, like the caches: the pods this
//! term evicted (until the pod cache shows them leaving) and a refused eviction's backoff. A
//! new leader starts with neither and decides from what the cluster shows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::Eviction;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{DeleteOptions, Preconditions};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::reflector::ObjectRef;
use tracing::{info, warn};

use super::{Context, cluster_name, vc_ns};
use crate::crd::{VaultCluster, VaultClusterStatus};
use crate::decide::Member;
use crate::index::SlimPod;
use crate::status::Notice;
use crate::text::{self, shorten};
use crate::upgrade::{self, Answer, Input, Plan, PodView, Reason, SetView};

/// What a term remembers of each cluster's upgrade (by VaultCluster UID).
#[derive(Default)]
pub struct Memory(Mutex<HashMap<String, Remembered>>);

#[derive(Default, Clone)]
struct Remembered {
    /// UIDs of the pods of this term's last step.
    evicted: Vec<String>,
    blocked: Option<Blocked>,
}

/// A refused eviction: of which pod, why, how many times in a row, when to try again.
#[derive(Clone)]
struct Blocked {
    pod: String,
    refusal: String,
    reason: Reason,
    attempts: u32,
    retry_at: Instant,
}

impl Memory {
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    pub fn forget(&self, uid: &str) {
        self.0.lock().unwrap().remove(uid);
    }

    fn get(&self, uid: &str) -> Remembered {
        self.0.lock().unwrap().get(uid).cloned().unwrap_or_default()
    }

    fn put(&self, uid: &str, remembered: Remembered) {
        self.0.lock().unwrap().insert(uid.to_string(), remembered);
    }
}

/// A refused eviction is tried again after 1 s, doubling up to 30 s.
fn retry_after(attempts: u32) -> Duration {
    Duration::from_secs(1)
        .saturating_mul(1 << attempts.saturating_sub(1).min(5))
        .min(Duration::from_secs(30))
}

/// One round's upgrade: the plan after its eviction, if any, was tried.
pub struct Outcome {
    pub plan: Plan,
    /// How soon the round should come back (a refused eviction's retry).
    pub retry: Option<Duration>,
}

/// Decides and acts on the upgrade of `vc`, whose pods this round are `pods` with the
/// answers in `members`. None when the VaultCluster does not opt in.
pub async fn round(
    vc: &VaultCluster,
    ctx: &Context,
    members: &[Member],
    pods: &[Arc<SlimPod>],
) -> Option<Outcome> {
    let uid = vc.uid().unwrap_or_default();
    vc.spec.upgrade.as_ref()?;
    let views = views(members, pods);
    let mut memory = ctx.rollouts.get(&uid);
    // Our own eviction is over for the decision once the cache shows the pod leaving.
    memory
        .evicted
        .retain(|evicted| views.iter().any(|p| &p.uid == evicted && !p.terminating));
    let now = Instant::now();
    let blocked = memory.blocked.as_ref().filter(|b| b.retry_at > now);
    let most = vc
        .spec
        .upgrade
        .as_ref()
        .map_or(1, |u| usize::try_from(u.max_unavailable).unwrap_or(1));
    let mut plan = decide(
        ctx,
        &vc_ns(vc),
        &views,
        (&memory.evicted, most, finishing(vc)),
        blocked.map(|b| (b.pod.as_str(), b.refusal.as_str())),
    );
    if let (Reason::DisruptionBlocked, Some(b)) = (plan.reason, blocked) {
        // Keep the reason the refusal had (a PDB, or another failure).
        plan.reason = b.reason;
    }
    for (pod, pod_uid) in std::mem::take(&mut plan.evict) {
        // A refusal stops the step: the pods evicted so far are its whole.
        if !evict(vc, ctx, &mut memory, &mut plan, &pod, &pod_uid).await {
            break;
        }
    }
    let retry = memory
        .blocked
        .as_ref()
        .map(|b| b.retry_at.saturating_duration_since(Instant::now()));
    ctx.rollouts.put(&uid, memory);
    Some(Outcome { plan, retry })
}

/// The plan, from the StatefulSets of the cache.
fn decide(
    ctx: &Context,
    ns: &str,
    pods: &[PodView],
    (evicted, max_unavailable, finishing): (&[String], usize, bool),
    blocked: Option<(&str, &str)>,
) -> Plan {
    let sets = ctx.caches.sets.read().unwrap();
    let lookup = |name: &str| sets.get(ns, name).map(|s| SetView::from(s.as_ref()));
    upgrade::plan(&Input {
        set: &lookup,
        pods,
        evicted,
        blocked,
        max_unavailable,
        finishing,
    })
}

/// Whether the Upgrading condition last written says an upgrade is under way. Read from
/// the status, so a new leader finishes the last step as the old one would have.
fn finishing(vc: &VaultCluster) -> bool {
    vc.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == upgrade::CONDITION))
        .is_some_and(|c| {
            c.reason != Reason::UpToDate.as_str()
                && c.reason != Reason::InvalidSpec.as_str()
                && c.reason != Reason::NoPods.as_str()
        })
}

/// Each selected pod with this round's answer.
fn views(members: &[Member], pods: &[Arc<SlimPod>]) -> Vec<PodView> {
    pods.iter()
        .map(|pod| {
            let answer = members
                .iter()
                .find(|m| m.name == pod.name)
                .map(|m| Answer::of(&m.verdict))
                .unwrap_or_else(|| Answer::Silent("not probed".into()));
            PodView {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                labels: pod.labels.as_ref().clone(),
                stateful_set: pod.stateful_set.clone(),
                terminating: pod.terminating,
                answer,
            }
        })
        .collect()
}

/// Evicts one pod through the Eviction API, so PodDisruptionBudgets apply; the UID
/// precondition makes sure it is the pod the round saw, not a replacement of the same name.
/// What was done goes to `plan.evict` and `memory`; false when the step stops here.
async fn evict(
    vc: &VaultCluster,
    ctx: &Context,
    memory: &mut Remembered,
    plan: &mut Plan,
    pod: &str,
    uid: &str,
) -> bool {
    if ctx.guard(&format!("eviction of {pod}")).is_err() {
        return false;
    }
    let client = ctx.evictions.get().unwrap_or(&ctx.client).clone();
    let api: Api<Pod> = Api::namespaced(client, &vc_ns(vc));
    let result = api
        .create_subresource::<_, serde_json::Value>(
            "eviction",
            pod,
            &PostParams::default(),
            &eviction(pod, uid),
        )
        .await;
    let (ns, name) = (vc_ns(vc), vc.name_any());
    let count = |result: &'static str| {
        ctx.metrics.clusters.count_upgrade_step(&ns, &name, result);
    };
    match result {
        Ok(_) => {
            info!(cluster = %cluster_name(vc), %pod, "evicted for the upgrade");
            count("evicted");
            if plan.evict.is_empty() {
                memory.evicted.clear();
            }
            memory.evicted.push(uid.to_string());
            memory.blocked = None;
            plan.evict.push((pod.to_string(), uid.to_string()));
            let notice = Notice {
                warning: false,
                reason: "UpgradeStep",
                message: format!("evicted {pod}: {}", plan.message),
                pod: Some(pod.to_string()),
            };
            super::report::event(vc, ctx, notice).await;
            true
        }
        // Gone, or replaced since the cache saw it: the step is in flight already.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {
            if plan.evict.is_empty() {
                plan.reason = Reason::WaitingForReplacement;
            }
            true
        }
        Err(error) => {
            let (reason, refusal, result) = match &error {
                kube::Error::Api(e) if e.code == 429 => {
                    (Reason::DisruptionBlocked, e.message.clone(), "blocked")
                }
                kube::Error::Api(e) => (Reason::EvictionFailed, e.message.clone(), "failed"),
                other => (Reason::EvictionFailed, other.to_string(), "failed"),
            };
            warn!(cluster = %cluster_name(vc), %pod, %refusal, "eviction refused");
            count(result);
            let attempts = match &memory.blocked {
                Some(b) if b.pod == pod => b.attempts.saturating_add(1),
                _ => 1,
            };
            memory.blocked = Some(Blocked {
                pod: pod.to_string(),
                refusal: shorten(refusal.clone(), text::CONDITION / 2),
                reason,
                attempts,
                retry_at: Instant::now() + retry_after(attempts),
            });
            let progress = progress(&plan.message).to_string();
            if plan.evict.is_empty() {
                plan.reason = reason;
                // "evicting <pods>; <progress>", as `upgrade::plan` words a refusal.
                let step = plan.message.split("; ").next().unwrap_or_default();
                plan.message = format!("{step} was refused: {refusal}; retrying; {progress}");
            } else {
                // Part of the step is under way: the rest is retried after it.
                let done: Vec<&str> = plan.evict.iter().map(|(n, _)| n.as_str()).collect();
                plan.message = format!(
                    "evicted {}; evicting {pod} was refused: {refusal}; retrying after them; {progress}",
                    done.join(", ")
                );
            }
            false
        }
    }
}

/// The Eviction of `pod`, only if its UID is still `uid`. Written out here rather than with
/// kube's `Api::evict`, whose body names the field `delete_options`: the API server ignores
/// it, and the precondition with it (found by tests/admission.rs).
pub fn eviction(pod: &str, uid: &str) -> Eviction {
    Eviction {
        metadata: kube::api::ObjectMeta {
            name: Some(pod.to_string()),
            ..Default::default()
        },
        delete_options: Some(DeleteOptions {
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..Default::default()
        }),
    }
}

/// The progress part of a plan's message ("2/3 pods at revision …").
fn progress(message: &str) -> &str {
    message.rsplit("; ").next().unwrap_or(message)
}

/// Puts the `Upgrading` condition in the status (none without `spec.upgrade`), publishes
/// an event when its reason changes into one that needs attention or into UpToDate, and
/// keeps full rounds coming while the upgrade is under way.
pub async fn report(
    vc: &VaultCluster,
    ctx: &Context,
    outcome: Option<&Outcome>,
    status: &mut VaultClusterStatus,
) {
    status.conditions.retain(|c| c.type_ != upgrade::CONDITION);
    let Some(outcome) = outcome else {
        return;
    };
    let previous = vc
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == upgrade::CONDITION));
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let condition = condition(&outcome.plan, previous, vc.metadata.generation, now);
    if let Some(notice) = transition(previous, &condition, &outcome.plan) {
        super::report::event(vc, ctx, notice).await;
    }
    status.conditions.push(condition);
    if outcome.plan.reason.in_progress() {
        // A settled cluster gets only sentinel rounds; a step waits on every pod.
        ctx.mark_dirty(&vc.uid().unwrap_or_default());
    }
}

/// The condition for a plan; its transition time moves only when its status does.
pub fn condition(
    plan: &Plan,
    previous: Option<&Condition>,
    generation: Option<i64>,
    now: Time,
) -> Condition {
    let status = if plan.reason.upgrading() {
        "True"
    } else {
        "False"
    };
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now,
    };
    Condition {
        type_: upgrade::CONDITION.into(),
        status: status.into(),
        reason: plan.reason.as_str().into(),
        message: shorten(plan.message.clone(), text::CONDITION),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The event a change of the condition calls for: a pause or a spec problem (a warning),
/// or the end of an upgrade.
fn transition(previous: Option<&Condition>, new: &Condition, plan: &Plan) -> Option<Notice> {
    let (reason, warning) = match plan.reason {
        Reason::WaitingForUnseal => ("UpgradeWaitingForUnseal", true),
        Reason::DisruptionBlocked => ("UpgradeDisruptionBlocked", true),
        Reason::EvictionFailed => ("UpgradeEvictionFailed", true),
        Reason::InvalidSpec => ("UpgradeInvalidSpec", true),
        Reason::PodUnhealthy => ("UpgradePaused", true),
        Reason::NoActivePod => ("UpgradePaused", true),
        // Only the end of an upgrade this operator saw under way, not every first round.
        Reason::UpToDate if previous.is_some_and(|p| p.reason != "UpToDate") => {
            ("UpgradeComplete", false)
        }
        _ => return None,
    };
    let same = previous.is_some_and(|p| p.reason == new.reason);
    (!same).then(|| Notice {
        warning,
        reason,
        message: new.message.clone(),
        pod: plan.pod.clone(),
    })
}

/// The wait until the next round, no later than a refused eviction's retry.
pub fn sooner(wait: Duration, outcome: Option<&Outcome>) -> Duration {
    match outcome.and_then(|o| o.retry) {
        Some(retry) => wait.min(retry.max(Duration::from_millis(100))),
        None => wait,
    }
}

/// The VaultClusters whose pods a StatefulSet's template makes; their next round is a full
/// one.
pub fn concerned(ctx: &Context, set: &StatefulSet) -> Vec<ObjectRef<VaultCluster>> {
    let ns = set.namespace().unwrap_or_default();
    let labels = set
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let clusters = ctx.caches.clusters.read().unwrap().selecting(&ns, &labels);
    clusters
        .iter()
        .filter(|vc| vc.spec.upgrade.is_some())
        .map(|vc| {
            ctx.mark_dirty(&vc.uid().unwrap_or_default());
            ObjectRef::from_obj(vc.as_ref())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(reason: Reason) -> Plan {
        Plan {
            reason,
            pod: Some("vault-2".into()),
            message: "m; 1/3 pods at revision r".into(),
            evict: Vec::new(),
            revision: Some("r".into()),
        }
    }

    fn at(second: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(second).unwrap())
    }

    #[test]
    fn the_condition_moves_its_time_only_with_its_status() {
        let first = condition(&plan(Reason::Evicting), None, Some(1), at(10));
        assert_eq!(first.status, "True");
        let waiting = condition(
            &plan(Reason::WaitingForReplacement),
            Some(&first),
            Some(1),
            at(20),
        );
        assert_eq!(waiting.last_transition_time, at(10));
        let paused = condition(
            &plan(Reason::WaitingForUnseal),
            Some(&waiting),
            Some(1),
            at(30),
        );
        assert_eq!(
            (paused.status.as_str(), paused.reason.as_str()),
            ("False", "WaitingForUnseal")
        );
        assert_eq!(paused.last_transition_time, at(30));
    }

    #[test]
    fn events_mark_pauses_and_the_end_once() {
        let p = plan(Reason::WaitingForUnseal);
        let new = condition(&p, None, None, at(1));
        let notice = transition(None, &new, &p).expect("a pause is told");
        assert_eq!(notice.reason, "UpgradeWaitingForUnseal");
        assert!(notice.warning);
        assert_eq!(transition(Some(&new), &new, &p), None, "told once");
        let done = plan(Reason::UpToDate);
        let complete = condition(&done, Some(&new), None, at(2));
        assert_eq!(
            transition(Some(&new), &complete, &done).map(|n| n.reason),
            Some("UpgradeComplete")
        );
        assert_eq!(
            transition(None, &complete, &done),
            None,
            "not on a first round"
        );
    }

    #[test]
    fn refused_evictions_back_off_to_thirty_seconds() {
        let got: Vec<u64> = (1..=8).map(|n| retry_after(n).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn the_progress_is_the_last_part_of_a_message() {
        assert_eq!(
            progress("evicting vault-2 (standby); 0/3 pods at revision r"),
            "0/3 pods at revision r"
        );
    }
}
