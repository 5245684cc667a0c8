//! Upgrades by role (`spec.upgrade`, opt-in): which pod of an outdated StatefulSet
//! revision to evict next, if any, and what the `Upgrading` condition says. Pure: decided
//! from what the cluster shows this round (the StatefulSet, its pods, their Vault answers),
//! so an operator that takes over mid-upgrade resumes where the cluster is, and a pod
//! evicted but not yet replaced counts as the step in flight.
//!
//! The order is HashiCorp's: standbys first, the active pod last (Vault steps down on
//! SIGTERM). A step evicts at most `maxUnavailable` standbys together, or the active pod
//! alone, and starts only when no pod is away, every pod answers unsealed and one answers
//! active. More than one at a time only where raft keeps its quorum without them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::ResourceExt;

use crate::health::Role;
use crate::tracker::Verdict;

/// The label the StatefulSet controller gives each pod: the revision it was made from.
pub const REVISION_LABEL: &str = "controller-revision-hash";

/// The condition type.
pub const CONDITION: &str = "Upgrading";

/// What the decision needs of a StatefulSet.
#[derive(Clone, Debug, PartialEq)]
pub struct SetView {
    pub name: String,
    /// `spec.updateStrategy.type`; RollingUpdate when unset, as the API server defaults it.
    pub strategy: String,
    pub replicas: i32,
    pub update_revision: Option<String>,
}

impl From<&StatefulSet> for SetView {
    fn from(set: &StatefulSet) -> Self {
        let spec = set.spec.as_ref();
        Self {
            name: set.name_any(),
            strategy: spec
                .and_then(|s| s.update_strategy.as_ref())
                .and_then(|u| u.type_.clone())
                .unwrap_or_else(|| "RollingUpdate".into()),
            replicas: spec.and_then(|s| s.replicas).unwrap_or(1),
            update_revision: set
                .status
                .as_ref()
                .and_then(|s| s.update_revision.clone())
                .filter(|r| !r.is_empty()),
        }
    }
}

/// The name of the StatefulSet that would own a pod so named: "vault-2" → "vault".
pub fn set_name_of(pod: &str) -> Option<&str> {
    let (set, ordinal) = pod.rsplit_once('-')?;
    (!set.is_empty() && !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit()))
        .then_some(set)
}

/// Whether `set` controls a pod: the StatefulSet controller names its pods
/// `<set>-<ordinal>` and, adopting one, makes itself the pod's controller ownerReference.
/// The selector is not matched: the pod cache keeps only the labels VaultClusters read,
/// and the official chart's StatefulSet selects on `app.kubernetes.io/instance` too.
pub fn controls(set: &SetView, pod: &str, controller: Option<&str>) -> bool {
    set_name_of(pod) == Some(set.name.as_str()) && controller == Some(set.name.as_str())
}

/// What Vault answered for a pod, as far as an upgrade cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Active,
    Standby,
    Sealed,
    Uninitialized,
    /// No usable answer now (failing, unreachable, not running): why.
    Silent(String),
}

impl Answer {
    pub fn of(verdict: &Verdict) -> Self {
        match verdict {
            Verdict::Healthy(h) => match h.role {
                Role::Active => Self::Active,
                Role::Standby | Role::PerfStandby => Self::Standby,
                Role::Sealed => Self::Sealed,
                Role::Uninitialized => Self::Uninitialized,
                Role::Removed => Self::Silent("removed from the raft cluster".into()),
            },
            Verdict::Failing { error, .. } => Self::Silent(error.clone()),
            Verdict::Down { reason, .. } => Self::Silent(reason.clone()),
        }
    }

    fn unsealed(&self) -> bool {
        matches!(self, Self::Active | Self::Standby)
    }

    fn describe(&self) -> String {
        match self {
            Self::Active => "active".into(),
            Self::Standby => "standby".into(),
            Self::Sealed => "sealed".into(),
            Self::Uninitialized => "uninitialized".into(),
            Self::Silent(why) => format!("not answering ({why})"),
        }
    }
}

/// One selected pod as this round sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    /// The StatefulSet its controller ownerReference names.
    pub stateful_set: Option<String>,
    pub terminating: bool,
    pub answer: Answer,
}

impl PodView {
    fn revision(&self) -> Option<&str> {
        self.labels.get(REVISION_LABEL).map(String::as_str)
    }
}

/// Everything one decision reads.
pub struct Input<'a> {
    /// The StatefulSets of the namespace, looked up by name.
    pub set: &'a dyn Fn(&str) -> Option<SetView>,
    pub pods: &'a [PodView],
    /// The UIDs of pods this operator evicted that the pod cache still shows as they were:
    /// those evictions are in flight even though the cache has not caught up.
    pub evicted: &'a [String],
    /// `spec.upgrade.maxUnavailable`: the most pods one step evicts.
    pub max_unavailable: usize,
    /// Whether the condition last written says an upgrade is under way: then its last step
    /// is over only when the last replacement serves, as every other step.
    pub finishing: bool,
    /// A refused eviction of this pod whose retry is not due yet, and the refusal.
    pub blocked: Option<(&'a str, &'a str)>,
}

/// Why the condition is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Every pod runs the StatefulSet's update revision.
    UpToDate,
    /// A pod is being evicted this round.
    Evicting,
    /// A pod is gone, terminating or starting at the new revision.
    WaitingForReplacement,
    /// A pod at the new revision answers sealed or uninitialized.
    WaitingForUnseal,
    /// A pod at the old revision is sealed, uninitialized or silent: no step starts.
    PodUnhealthy,
    /// No pod answers active: no step starts.
    NoActivePod,
    /// A PodDisruptionBudget refused the eviction; retried with backoff.
    DisruptionBlocked,
    /// The eviction failed for another reason; retried with backoff.
    EvictionFailed,
    /// The StatefulSet has not reported its update revision, or a pod has no revision label.
    RevisionUnknown,
    /// The pods' controller is not a StatefulSet with updateStrategy OnDelete.
    InvalidSpec,
    /// No pod is selected.
    NoPods,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UpToDate => "UpToDate",
            Self::Evicting => "Evicting",
            Self::WaitingForReplacement => "WaitingForReplacement",
            Self::WaitingForUnseal => "WaitingForUnseal",
            Self::PodUnhealthy => "PodUnhealthy",
            Self::NoActivePod => "NoActivePod",
            Self::DisruptionBlocked => "DisruptionBlocked",
            Self::EvictionFailed => "EvictionFailed",
            Self::RevisionUnknown => "RevisionUnknown",
            Self::InvalidSpec => "InvalidSpec",
            Self::NoPods => "NoPods",
        }
    }

    /// The condition's status: True only while pods are being replaced; a pause or a
    /// finished upgrade is False, so `kubectl wait --for=condition=Upgrading=false` returns
    /// at either and the reason says which.
    pub fn upgrading(self) -> bool {
        matches!(self, Self::Evicting | Self::WaitingForReplacement)
    }

    /// Whether the operator goes on trying by itself (full rounds, retries) in this state.
    pub fn in_progress(self) -> bool {
        !matches!(self, Self::UpToDate | Self::InvalidSpec | Self::NoPods)
    }
}

/// The decision of one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub reason: Reason,
    /// The pod the condition is about, if one.
    pub pod: Option<String>,
    pub message: String,
    /// Evict these pods (by name, with each UID as precondition) now, in this order.
    pub evict: Vec<(String, String)>,
    /// The revision the pods are moving to, when known.
    pub revision: Option<String>,
}

impl Plan {
    fn new(reason: Reason, pod: Option<&str>, message: String) -> Self {
        Self {
            reason,
            pod: pod.map(String::from),
            message,
            evict: Vec::new(),
            revision: None,
        }
    }
}

/// The next step of the upgrade, or why there is none.
pub fn plan(input: &Input) -> Plan {
    let pods = input.pods;
    if pods.is_empty() {
        return Plan::new(Reason::NoPods, None, "no pod matches the selector".into());
    }
    let set = match controller(input).and_then(|set| within_quorum(set, input.max_unavailable)) {
        Ok(set) => set,
        Err(problem) => return Plan::new(Reason::InvalidSpec, None, problem),
    };
    let Some(revision) = set.update_revision.clone() else {
        return Plan::new(
            Reason::RevisionUnknown,
            None,
            format!(
                "StatefulSet {} reports no updateRevision yet; nothing is evicted",
                set.name
            ),
        );
    };
    if let Some(pod) = pods.iter().find(|p| p.revision().is_none()) {
        return Plan::new(
            Reason::RevisionUnknown,
            Some(&pod.name),
            format!(
                "pod {} has no {REVISION_LABEL} label; nothing is evicted",
                pod.name
            ),
        );
    }
    let mut plan = step(input, &set, &revision);
    plan.revision = Some(revision);
    plan
}

/// The one StatefulSet controlling every selected pod, with updateStrategy OnDelete.
fn controller(input: &Input) -> Result<SetView, String> {
    let mut found: Option<SetView> = None;
    for pod in input.pods {
        let set = set_name_of(&pod.name)
            .and_then(|name| (input.set)(name))
            .filter(|set| controls(set, &pod.name, pod.stateful_set.as_deref()))
            .ok_or_else(|| {
                format!(
                    "pod {} is not controlled by a StatefulSet; spec.upgrade needs the pods of one StatefulSet with updateStrategy OnDelete",
                    pod.name
                )
            })?;
        match &found {
            Some(first) if first.name != set.name => {
                return Err(format!(
                    "the selected pods belong to StatefulSets {} and {}; spec.upgrade needs exactly one",
                    first.name, set.name
                ));
            }
            Some(_) => {}
            None => found = Some(set),
        }
    }
    let set = found.expect("pods is not empty");
    if set.strategy != "OnDelete" {
        return Err(format!(
            "StatefulSet {} has updateStrategy {}; spec.upgrade needs OnDelete, or the StatefulSet controller replaces the pods itself in no order of roles",
            set.name, set.strategy
        ));
    }
    Ok(set)
}

/// Raft keeps its quorum with at most (n-1)/2 of n voters away: more than one pod per step
/// only within that. One is always allowed, or a cluster of one or two could never upgrade.
fn within_quorum(set: SetView, max_unavailable: usize) -> Result<SetView, String> {
    let replicas = usize::try_from(set.replicas).unwrap_or(0);
    let tolerated = replicas.saturating_sub(1) / 2;
    if max_unavailable > 1 && max_unavailable > tolerated {
        return Err(format!(
            "spec.upgrade.maxUnavailable is {max_unavailable}, but raft keeps its quorum with at most {tolerated} of StatefulSet {}'s {replicas} voters away",
            set.name
        ));
    }
    Ok(set)
}

/// The step, the pods being those of `set` and `revision` its update revision.
fn step(input: &Input, set: &SetView, revision: &str) -> Plan {
    let pods = input.pods;
    let by_name: BTreeMap<&str, &PodView> = pods.iter().map(|p| (p.name.as_str(), p)).collect();
    let expected: Vec<String> = (0..set.replicas.max(0))
        .map(|i| format!("{}-{i}", set.name))
        .collect();
    let current = |p: &&PodView| !p.terminating && p.revision() == Some(revision);
    let done = expected
        .iter()
        .filter(|name| by_name.get(name.as_str()).is_some_and(current))
        .count();
    let progress = format!("{done}/{} pods at revision {revision}", expected.len());
    let missing = expected.iter().find(|n| !by_name.contains_key(n.as_str()));
    let leaving = pods
        .iter()
        .find(|p| p.terminating || input.evicted.contains(&p.uid));
    if let Some(pod) = leaving {
        return Plan::new(
            Reason::WaitingForReplacement,
            Some(&pod.name),
            format!("{} is being replaced; {progress}", pod.name),
        );
    }
    if let Some(name) = missing {
        return Plan::new(
            Reason::WaitingForReplacement,
            Some(name),
            format!("{name} is being replaced; {progress}"),
        );
    }
    let outdated: Vec<&PodView> = pods
        .iter()
        .filter(|p| p.revision() != Some(revision))
        .collect();
    // The replacements first: a step is over only when its pods answer unsealed and one
    // pod answers active, the last step too. Once done, a pod sealed later is not the
    // upgrade's business.
    if (!outdated.is_empty() || input.finishing)
        && let Some(plan) = unsettled(pods, revision, &progress)
    {
        return plan;
    }
    if outdated.is_empty() {
        if input.finishing && !pods.iter().any(|p| p.answer == Answer::Active) {
            return Plan::new(
                Reason::NoActivePod,
                None,
                format!("the upgrade ends once a pod answers active; {progress}"),
            );
        }
        return Plan::new(Reason::UpToDate, None, progress);
    }
    if let Some(pod) = pods.iter().find(|p| !p.answer.unsealed()) {
        return Plan::new(
            Reason::PodUnhealthy,
            Some(&pod.name),
            format!(
                "no pod is evicted while {} is {}; {progress}",
                pod.name,
                pod.answer.describe()
            ),
        );
    }
    if !pods.iter().any(|p| p.answer == Answer::Active) {
        return Plan::new(
            Reason::NoActivePod,
            None,
            format!("no pod is evicted while no pod answers active; {progress}"),
        );
    }
    let batch = next_batch(&outdated, input.max_unavailable.max(1));
    let named: Vec<String> = batch
        .iter()
        .map(|p| format!("{} ({})", p.name, p.answer.describe()))
        .collect();
    let named = named.join(", ");
    if let Some((pod, refusal)) = input.blocked
        && batch.iter().any(|p| p.name == pod)
    {
        return Plan::new(
            Reason::DisruptionBlocked,
            Some(pod),
            format!("evicting {named} was refused: {refusal}; retrying; {progress}"),
        );
    }
    let mut plan = Plan::new(
        Reason::Evicting,
        Some(&batch[0].name),
        format!("evicting {named}; {progress}"),
    );
    plan.evict = batch
        .iter()
        .map(|p| (p.name.clone(), p.uid.clone()))
        .collect();
    plan
}

/// Up to `most` outdated standbys, highest ordinal first as the StatefulSet controller
/// would; the active pod alone once it is the last outdated pod.
fn next_batch<'p>(outdated: &[&'p PodView], most: usize) -> Vec<&'p PodView> {
    let mut standbys: Vec<&PodView> = outdated
        .iter()
        .copied()
        .filter(|p| p.answer == Answer::Standby)
        .collect();
    standbys.sort_by_key(|p| std::cmp::Reverse(ordinal(&p.name)));
    standbys.truncate(most);
    if standbys.is_empty() {
        outdated.iter().copied().take(1).collect()
    } else {
        standbys
    }
}

/// A pod at the update revision that does not yet serve: why the step is not over.
fn unsettled(pods: &[PodView], revision: &str, progress: &str) -> Option<Plan> {
    let pod = pods
        .iter()
        .filter(|p| p.revision() == Some(revision))
        .find(|p| !p.answer.unsealed())?;
    Some(match &pod.answer {
        Answer::Silent(_) => Plan::new(
            Reason::WaitingForReplacement,
            Some(&pod.name),
            format!("{} is {}; {progress}", pod.name, pod.answer.describe()),
        ),
        _ => Plan::new(
            Reason::WaitingForUnseal,
            Some(&pod.name),
            format!(
                "{} runs the new revision but is {}; the upgrade resumes once it is unsealed; {progress}",
                pod.name,
                pod.answer.describe()
            ),
        ),
    })
}

fn ordinal(pod: &str) -> u64 {
    pod.rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "vault-old";
    const NEW: &str = "vault-new";

    fn set(strategy: &str, replicas: i32) -> SetView {
        SetView {
            name: "vault".into(),
            strategy: strategy.into(),
            replicas,
            update_revision: Some(NEW.into()),
        }
    }

    fn pod(i: usize, revision: &str, answer: Answer) -> PodView {
        PodView {
            name: format!("vault-{i}"),
            uid: format!("uid-{i}-{revision}"),
            labels: BTreeMap::from([
                ("app".into(), "vault".into()),
                (REVISION_LABEL.into(), revision.into()),
            ]),
            stateful_set: Some("vault".into()),
            terminating: false,
            answer,
        }
    }

    fn run(sets: &[SetView], pods: &[PodView]) -> Plan {
        run_with(sets, pods, &[], None)
    }

    fn run_with(
        sets: &[SetView],
        pods: &[PodView],
        evicted: &[String],
        blocked: Option<(&str, &str)>,
    ) -> Plan {
        run_batch(sets, pods, evicted, blocked, 1)
    }

    fn run_batch(
        sets: &[SetView],
        pods: &[PodView],
        evicted: &[String],
        blocked: Option<(&str, &str)>,
        max_unavailable: usize,
    ) -> Plan {
        let lookup = |name: &str| sets.iter().find(|s| s.name == name).cloned();
        plan(&Input {
            set: &lookup,
            pods,
            evicted,
            blocked,
            max_unavailable,
            finishing: false,
        })
    }

    use Answer::{Active, Sealed, Standby, Uninitialized};

    fn silent() -> Answer {
        Answer::Silent("connection refused".into())
    }

    /// (case, pods, reason, pod named, pod evicted)
    #[test]
    fn the_next_step_table() {
        let s = [set("OnDelete", 3)];
        let cases: Vec<(&str, Vec<PodView>, Reason, Option<&str>, Option<&str>)> = vec![
            (
                "all current",
                vec![
                    pod(0, NEW, Active),
                    pod(1, NEW, Standby),
                    pod(2, NEW, Standby),
                ],
                Reason::UpToDate,
                None,
                None,
            ),
            (
                "all current, one sealed: nothing to do",
                vec![
                    pod(0, NEW, Active),
                    pod(1, NEW, Standby),
                    pod(2, NEW, Sealed),
                ],
                Reason::UpToDate,
                None,
                None,
            ),
            (
                "all outdated: the highest standby first",
                vec![
                    pod(0, OLD, Active),
                    pod(1, OLD, Standby),
                    pod(2, OLD, Standby),
                ],
                Reason::Evicting,
                Some("vault-2"),
                Some("vault-2"),
            ),
            (
                "active is vault-2: a standby first",
                vec![
                    pod(0, OLD, Standby),
                    pod(1, OLD, Standby),
                    pod(2, OLD, Active),
                ],
                Reason::Evicting,
                Some("vault-1"),
                Some("vault-1"),
            ),
            (
                "one standby left",
                vec![
                    pod(0, OLD, Active),
                    pod(1, OLD, Standby),
                    pod(2, NEW, Standby),
                ],
                Reason::Evicting,
                Some("vault-1"),
                Some("vault-1"),
            ),
            (
                "the active pod last",
                vec![
                    pod(0, OLD, Active),
                    pod(1, NEW, Standby),
                    pod(2, NEW, Standby),
                ],
                Reason::Evicting,
                Some("vault-0"),
                Some("vault-0"),
            ),
            (
                "a pod missing: in flight",
                vec![pod(0, OLD, Active), pod(1, OLD, Standby)],
                Reason::WaitingForReplacement,
                Some("vault-2"),
                None,
            ),
            (
                "a replacement not answering yet",
                vec![
                    pod(0, OLD, Active),
                    pod(1, OLD, Standby),
                    pod(2, NEW, silent()),
                ],
                Reason::WaitingForReplacement,
                Some("vault-2"),
                None,
            ),
            (
                "a replacement sealed pauses",
                vec![
                    pod(0, OLD, Active),
                    pod(1, OLD, Standby),
                    pod(2, NEW, Sealed),
                ],
                Reason::WaitingForUnseal,
                Some("vault-2"),
                None,
            ),
            (
                "a replacement uninitialized pauses",
                vec![
                    pod(0, OLD, Active),
                    pod(1, OLD, Standby),
                    pod(2, NEW, Uninitialized),
                ],
                Reason::WaitingForUnseal,
                Some("vault-2"),
                None,
            ),
            (
                "an old pod sealed: no step",
                vec![
                    pod(0, OLD, Active),
                    pod(1, OLD, Sealed),
                    pod(2, OLD, Standby),
                ],
                Reason::PodUnhealthy,
                Some("vault-1"),
                None,
            ),
            (
                "an old pod silent: no step",
                vec![
                    pod(0, OLD, Active),
                    pod(1, OLD, Standby),
                    pod(2, OLD, silent()),
                ],
                Reason::PodUnhealthy,
                Some("vault-2"),
                None,
            ),
            (
                "no active pod: no step",
                vec![
                    pod(0, OLD, Standby),
                    pod(1, OLD, Standby),
                    pod(2, NEW, Standby),
                ],
                Reason::NoActivePod,
                None,
                None,
            ),
        ];
        for (case, pods, reason, named, evicted) in cases {
            let got = run(&s, &pods);
            assert_eq!(got.reason, reason, "{case}: {got:?}");
            assert_eq!(got.pod.as_deref(), named, "{case}: {got:?}");
            let names: Vec<&str> = got.evict.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, Vec::from_iter(evicted), "{case}: {got:?}");
        }
    }

    #[test]
    fn a_pod_evicted_or_terminating_is_the_step_in_flight() {
        let s = [set("OnDelete", 3)];
        let mut pods = vec![
            pod(0, OLD, Active),
            pod(1, OLD, Standby),
            pod(2, OLD, Standby),
        ];
        // The cache has not caught up with our own eviction of vault-2.
        let got = run_with(&s, &pods, &["uid-2-vault-old".into()], None);
        assert_eq!(got.reason, Reason::WaitingForReplacement);
        assert_eq!(got.pod.as_deref(), Some("vault-2"));
        assert!(got.evict.is_empty(), "{got:?}");
        // A new leader sees it terminating: the same, without any memory.
        pods[2].terminating = true;
        let got = run(&s, &pods);
        assert_eq!(got.reason, Reason::WaitingForReplacement);
        assert!(got.evict.is_empty(), "{got:?}");
        assert!(got.reason.upgrading());
        assert_eq!(
            got.message,
            "vault-2 is being replaced; 0/3 pods at revision vault-new"
        );
    }

    #[test]
    fn progress_counts_pods_at_the_update_revision() {
        let s = [set("OnDelete", 3)];
        let pods = [
            pod(0, OLD, Active),
            pod(1, NEW, Standby),
            pod(2, NEW, Standby),
        ];
        let got = run(&s, &pods);
        assert!(
            got.message.ends_with("2/3 pods at revision vault-new"),
            "{got:?}"
        );
        assert_eq!(got.revision.as_deref(), Some(NEW));
        let pods = [
            pod(0, NEW, Active),
            pod(1, NEW, Standby),
            pod(2, NEW, Standby),
        ];
        let got = run(&s, &pods);
        assert_eq!(got.message, "3/3 pods at revision vault-new");
        assert!(!got.reason.upgrading());
    }

    #[test]
    fn a_refused_eviction_is_not_repeated_before_its_retry() {
        let s = [set("OnDelete", 3)];
        let pods = [
            pod(0, OLD, Active),
            pod(1, OLD, Standby),
            pod(2, OLD, Standby),
        ];
        let got = run_with(&s, &pods, &[], Some(("vault-2", "PDB vault allows 0")));
        assert_eq!(got.reason, Reason::DisruptionBlocked);
        assert!(got.evict.is_empty(), "{got:?}");
        assert!(!got.reason.upgrading());
        assert!(got.message.contains("PDB vault allows 0"), "{got:?}");
        // A refusal about another pod does not hold this one.
        let got = run_with(&s, &pods, &[], Some(("vault-1", "x")));
        assert_eq!(got.reason, Reason::Evicting);
    }

    #[test]
    fn only_the_pods_of_one_on_delete_statefulset_are_upgraded() {
        let pods = [
            pod(0, OLD, Active),
            pod(1, OLD, Standby),
            pod(2, OLD, Standby),
        ];
        let got = run(&[set("RollingUpdate", 3)], &pods);
        assert_eq!(got.reason, Reason::InvalidSpec);
        assert!(got.message.contains("RollingUpdate"), "{got:?}");
        assert!(got.evict.is_empty(), "{got:?}");
        // No StatefulSet of that name (a Deployment's pods, say).
        let got = run(&[], &pods);
        assert_eq!(got.reason, Reason::InvalidSpec);
        assert!(
            got.message.contains("not controlled by a StatefulSet"),
            "{got:?}"
        );
        // A StatefulSet of the name that is not the pods' controller (pods adopted by
        // none, or by another StatefulSet).
        for owner in [None, Some("web")] {
            let mut orphans = pods.to_vec();
            orphans[1].stateful_set = owner.map(String::from);
            assert_eq!(
                run(&[set("OnDelete", 3)], &orphans).reason,
                Reason::InvalidSpec
            );
        }
        // Pods of two StatefulSets.
        let mut mixed = pods.to_vec();
        mixed[2].name = "other-0".into();
        mixed[2].stateful_set = Some("other".into());
        let mut second = set("OnDelete", 1);
        second.name = "other".into();
        let got = run(&[set("OnDelete", 3), second], &mixed);
        assert_eq!(got.reason, Reason::InvalidSpec);
        assert!(got.message.contains("vault and other"), "{got:?}");
    }

    #[test]
    fn nothing_is_evicted_without_a_known_revision() {
        let mut unknown = set("OnDelete", 3);
        unknown.update_revision = None;
        let pods = [
            pod(0, OLD, Active),
            pod(1, OLD, Standby),
            pod(2, OLD, Standby),
        ];
        assert_eq!(run(&[unknown], &pods).reason, Reason::RevisionUnknown);
        let mut unlabelled = pods.to_vec();
        unlabelled[1].labels.remove(REVISION_LABEL);
        let got = run(&[set("OnDelete", 3)], &unlabelled);
        assert_eq!(got.reason, Reason::RevisionUnknown);
        assert!(got.evict.is_empty(), "{got:?}");
        assert_eq!(run(&[set("OnDelete", 3)], &[]).reason, Reason::NoPods);
    }

    /// Five voters with maxUnavailable 2: two standbys per step, the active pod alone, and
    /// nothing while any pod of the step is away.
    #[test]
    fn steps_of_two_standbys_then_the_active_pod_alone() {
        let s = [set("OnDelete", 5)];
        let evicted =
            |plan: &Plan| -> Vec<String> { plan.evict.iter().map(|(n, _)| n.clone()).collect() };
        let mut pods = vec![
            pod(0, OLD, Standby),
            pod(1, OLD, Active),
            pod(2, OLD, Standby),
            pod(3, OLD, Standby),
            pod(4, OLD, Standby),
        ];
        let got = run_batch(&s, &pods, &[], None, 2);
        assert_eq!(got.reason, Reason::Evicting);
        assert_eq!(evicted(&got), ["vault-4", "vault-3"]);
        assert_eq!(
            got.message,
            "evicting vault-4 (standby), vault-3 (standby); 0/5 pods at revision vault-new"
        );
        // One of the two still in flight: no next step.
        pods[3].terminating = true;
        pods[4] = pod(4, NEW, Standby);
        let got = run_batch(&s, &pods, &[], None, 2);
        assert_eq!(got.reason, Reason::WaitingForReplacement);
        assert!(got.evict.is_empty());
        // One standby left beside the active pod: it goes alone, then the active pod.
        pods[3] = pod(3, NEW, Standby);
        pods[2] = pod(2, NEW, Standby);
        let got = run_batch(&s, &pods, &[], None, 2);
        assert_eq!(evicted(&got), ["vault-0"]);
        pods[0] = pod(0, NEW, Standby);
        let got = run_batch(&s, &pods, &[], None, 2);
        assert_eq!(evicted(&got), ["vault-1"]);
        // A refusal of either pod of a step holds the whole step.
        let pods = [
            pod(0, OLD, Active),
            pod(1, OLD, Standby),
            pod(2, OLD, Standby),
            pod(3, OLD, Standby),
            pod(4, OLD, Standby),
        ];
        let got = run_batch(&s, &pods, &[], Some(("vault-3", "PDB")), 2);
        assert_eq!(got.reason, Reason::DisruptionBlocked);
        assert!(got.evict.is_empty());
        // Our own evictions the cache has not shown yet hold the next step.
        let got = run_batch(&s, &pods, &["uid-3-vault-old".into()], None, 2);
        assert_eq!(got.reason, Reason::WaitingForReplacement);
        assert_eq!(got.pod.as_deref(), Some("vault-3"));
    }

    /// The last step is over, as every other, only when its replacement serves and a pod
    /// answers active; after an upgrade that was over, a sealed pod is not its business.
    #[test]
    fn the_last_step_waits_for_its_replacement_too() {
        let s = [set("OnDelete", 3)];
        let lookup = |name: &str| s.iter().find(|s| s.name == name).cloned();
        let finish = |pods: &[PodView], finishing: bool| {
            plan(&Input {
                set: &lookup,
                pods,
                evicted: &[],
                blocked: None,
                max_unavailable: 1,
                finishing,
            })
        };
        let mut pods = vec![
            pod(0, NEW, Sealed),
            pod(1, NEW, Active),
            pod(2, NEW, Standby),
        ];
        let got = finish(&pods, true);
        assert_eq!(got.reason, Reason::WaitingForUnseal, "{got:?}");
        assert_eq!(got.pod.as_deref(), Some("vault-0"));
        assert_eq!(finish(&pods, false).reason, Reason::UpToDate);
        pods[0].answer = silent();
        assert_eq!(finish(&pods, true).reason, Reason::WaitingForReplacement);
        pods[0].answer = Standby;
        pods[1].answer = Standby;
        assert_eq!(finish(&pods, true).reason, Reason::NoActivePod);
        pods[1].answer = Active;
        let got = finish(&pods, true);
        assert_eq!(got.reason, Reason::UpToDate);
        assert_eq!(got.message, "3/3 pods at revision vault-new");
    }

    #[test]
    fn more_than_one_pod_per_step_only_within_raft_quorum() {
        let pods = |n: usize| -> Vec<PodView> {
            (0..n)
                .map(|i| pod(i, OLD, if i == 0 { Active } else { Standby }))
                .collect()
        };
        let got = run_batch(&[set("OnDelete", 3)], &pods(3), &[], None, 2);
        assert_eq!(got.reason, Reason::InvalidSpec);
        assert_eq!(
            got.message,
            "spec.upgrade.maxUnavailable is 2, but raft keeps its quorum with at most 1 of StatefulSet vault's 3 voters away"
        );
        assert!(got.evict.is_empty());
        assert_eq!(
            run_batch(&[set("OnDelete", 4)], &pods(4), &[], None, 2).reason,
            Reason::InvalidSpec
        );
        assert_eq!(
            run_batch(&[set("OnDelete", 5)], &pods(5), &[], None, 3).reason,
            Reason::InvalidSpec
        );
        let got = run_batch(&[set("OnDelete", 7)], &pods(7), &[], None, 3);
        assert_eq!(got.evict.len(), 3, "{got:?}");
        // One at a time is always allowed, however few the voters.
        for n in 1..=2 {
            let got = run_batch(&[set("OnDelete", n as i32)], &pods(n), &[], None, 1);
            assert_eq!(got.evict.len(), 1, "{n} voters: {got:?}");
        }
        // Fewer outdated standbys than allowed: those there are, without the active pod.
        let mut few = pods(7);
        for p in &mut few[1..6] {
            *p = pod(ordinal(&p.name) as usize, NEW, Standby);
        }
        let got = run_batch(&[set("OnDelete", 7)], &few, &[], None, 3);
        let names: Vec<&str> = got.evict.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["vault-6"]);
    }

    #[test]
    fn pod_names_give_their_statefulset() {
        assert_eq!(set_name_of("vault-0"), Some("vault"));
        assert_eq!(set_name_of("my-vault-12"), Some("my-vault"));
        assert_eq!(set_name_of("vault-7d9f8-abcde"), None);
        assert_eq!(set_name_of("vault"), None);
        assert_eq!(set_name_of("-1"), None);
    }
}
