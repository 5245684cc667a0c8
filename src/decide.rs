//! The cluster-wide label decision: each pod's verdict gives its labels, then the invariant
//! that at most one pod carries `<prefix>-active: "true"` is enforced over all of them.

use std::collections::BTreeMap;

use crate::health::Role;
use crate::labels::{AFTER_SHUTDOWN, LabelNames, OWNER_LABEL, desired, diff, flag, flags_for};
use crate::tracker::Verdict;

/// One selected pod as observed, with the verdict of its latest probe.
#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    pub ip: String,
    pub labels: BTreeMap<String, String>,
    pub verdict: Verdict,
    /// What this round's probe learnt: whether Vault answered at all.
    pub reach: Reach,
    /// Kubernetes reports the pod Running, Ready and not terminating.
    pub serving: bool,
}

/// Whether this round's probe of a pod got an answer from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Something answered, usable or not.
    Answered,
    /// No answer reached us (transport failure or our own shortage).
    Unanswered,
    /// Not probed: the pod is not Running, has no IP, or is terminating.
    NotProbed,
}

/// Label writes for one pod: a value to set, or None to remove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelPlan {
    pub pod: String,
    pub change: BTreeMap<String, Option<String>>,
    /// Whether this write makes the pod active.
    pub promotes: bool,
}

/// The labels meant for a whole cluster: only an intention until `act` writes them, so it
/// names no active pod (see `Written`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Ordered so that every demotion precedes any promotion: the active Service never
    /// selects two pods because of our writes.
    pub plans: Vec<LabelPlan>,
    /// Pods whose health says active. Of several, only the one already labelled active (the
    /// incumbent) keeps the label; without an incumbent none is labelled active.
    pub claimants: Vec<String>,
}

/// What a round's writes did. A write can be refused, time out or find its pod gone, so
/// status and the rhythm go by this and never by the `Decision`: neither may name a pod
/// active before its label is written, or the next round would trust a label that is not
/// there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// The pod that carries the active label after the writes, if exactly one does.
    pub active: Option<String>,
    /// Every write the decision called for was made.
    pub complete: bool,
}

impl Written {
    /// The labels after `made`, the plans whose writes the API server accepted, over the
    /// labels the round observed; `complete` when `made` is every write the round wanted.
    pub fn after(
        names: &LabelNames,
        members: &[Member],
        made: &[&LabelPlan],
        complete: bool,
    ) -> Self {
        let mut active = members.iter().filter(|member| {
            let plan = made.iter().find(|p| p.pod == member.name);
            let value = match plan.and_then(|p| p.change.get(&names.active)) {
                Some(written) => written.as_deref(),
                None => member.labels.get(&names.active).map(String::as_str),
            };
            value == Some("true")
        });
        let sole = match (active.next(), active.next()) {
            (Some(only), None) => Some(only.name.clone()),
            _ => None,
        };
        Self {
            active: sole,
            complete,
        }
    }
}

/// The labels of every member, `owner` being the VaultCluster whose ownership label they get.
pub fn decide(names: &LabelNames, owner: &str, members: &[Member]) -> Decision {
    let claimants: Vec<&Member> = members.iter().filter(|m| answers_active(m)).collect();
    let chosen = choose(names, &claimants);
    let mut plans: Vec<LabelPlan> = Vec::new();
    for member in members {
        let mut want = wanted(names, member, chosen, !claimants.is_empty());
        want.insert(OWNER_LABEL.to_string(), Some(owner.to_string()));
        let change = diff(&member.labels, &want);
        if !change.is_empty() {
            let promotes = flag(&member.labels, &names.active) != Some(true)
                && change.get(&names.active).cloned().flatten().as_deref() == Some("true");
            plans.push(LabelPlan {
                pod: member.name.clone(),
                change,
                promotes,
            });
        }
    }
    plans.sort_by_key(|plan| plan.promotes);
    Decision {
        plans,
        claimants: claimants.iter().map(|m| m.name.clone()).collect(),
    }
}

/// Whether Vault's own answer from this pod, this round, says active.
pub fn answers_active(member: &Member) -> bool {
    matches!(&member.verdict, Verdict::Healthy(h) if h.role == Role::Active)
}

/// The claimant to label active: the only one, or among several the one that already
/// carries the label. Anyone who can run a pod with the selected labels can answer 200, so
/// a newcomer must not take the label from, or share it with, an incumbent that still
/// answers active; without an incumbent no claimant can be told apart, and none gets it.
fn choose<'a>(names: &LabelNames, claimants: &[&'a Member]) -> Option<&'a str> {
    if let [only] = claimants {
        return Some(only.name.as_str());
    }
    let mut incumbents = claimants
        .iter()
        .filter(|m| flag(&m.labels, &names.active) == Some(true));
    match (incumbents.next(), incumbents.next()) {
        (Some(incumbent), None) => Some(incumbent.name.as_str()),
        _ => None,
    }
}

/// The labels one pod should carry. A pod without a fresh result keeps its labels, except
/// that a confirmed active pod elsewhere demotes it at once. A claimant that is not chosen
/// is not labelled either: its role labels stay as they were, only an active label goes.
fn wanted(
    names: &LabelNames,
    member: &Member,
    chosen: Option<&str>,
    someone_claims: bool,
) -> BTreeMap<String, Option<String>> {
    match &member.verdict {
        Verdict::Healthy(_) if answers_active(member) && chosen != Some(member.name.as_str()) => {
            demoted(names, member)
        }
        Verdict::Healthy(health) => {
            let mut flags = flags_for(health);
            flags.active = chosen == Some(member.name.as_str());
            desired(names, flags, &health.version)
        }
        Verdict::Down { .. } => desired(names, AFTER_SHUTDOWN, ""),
        Verdict::Failing { .. } if someone_claims => demoted(names, member),
        Verdict::Failing { .. } => BTreeMap::new(),
    }
}

/// Only the active label, and only if the pod carries it: the pod leaves the active
/// Service and nothing else is said about it.
fn demoted(names: &LabelNames, member: &Member) -> BTreeMap<String, Option<String>> {
    if flag(&member.labels, &names.active) == Some(true) {
        BTreeMap::from([(names.active.clone(), Some("false".to_string()))])
    } else {
        BTreeMap::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Health;

    fn health(role: Role) -> Verdict {
        Verdict::Healthy(Health {
            role,
            initialized: role != Role::Uninitialized,
            sealed: matches!(role, Role::Sealed | Role::Uninitialized),
            version: "1.17.2".into(),
        })
    }
    fn failing() -> Verdict {
        Verdict::Failing {
            last: None,
            error: "timed out".into(),
        }
    }
    fn down() -> Verdict {
        Verdict::Down {
            reason: "connection refused".into(),
            last: None,
        }
    }

    /// A pod carrying the labels of the given role, as after an earlier convergence.
    fn member(name: &str, labelled: Option<&str>, verdict: Verdict) -> Member {
        let mut labels = BTreeMap::from([("app".to_string(), "vault".to_string())]);
        if let Some(state) = labelled {
            let (a, i, p, s) = match state {
                "active" => ("true", "true", "false", "false"),
                "standby" => ("false", "true", "false", "false"),
                _ => ("false", "false", "false", "true"),
            };
            for (k, v) in [
                (OWNER_LABEL, "vault"),
                ("vault-active", a),
                ("vault-initialized", i),
                ("vault-perf-standby", p),
                ("vault-sealed", s),
                ("vault-version", "1.17.2"),
            ] {
                labels.insert(k.into(), v.into());
            }
        }
        Member {
            name: name.into(),
            ip: String::new(),
            labels,
            verdict,
            reach: Reach::Answered,
            serving: true,
        }
    }

    fn active_after(decision: &Decision, members: &[Member]) -> Vec<String> {
        members
            .iter()
            .filter(|m| {
                let change = decision
                    .plans
                    .iter()
                    .find(|p| p.pod == m.name)
                    .map(|p| p.change.clone())
                    .unwrap_or_default();
                let value = change
                    .get("vault-active")
                    .cloned()
                    .flatten()
                    .or_else(|| m.labels.get("vault-active").cloned());
                value.as_deref() == Some("true")
            })
            .map(|m| m.name.clone())
            .collect()
    }

    #[test]
    fn invariants_over_scenarios() {
        // (scenario, members, pods labelled active afterwards, claimants, pods written)
        let cases: Vec<(&str, Vec<Member>, Vec<&str>, usize, Vec<&str>)> = vec![
            (
                "first convergence",
                vec![
                    member("v0", None, health(Role::Active)),
                    member("v1", None, health(Role::Standby)),
                    member("v2", None, health(Role::Standby)),
                ],
                vec!["v0"],
                1,
                vec!["v0", "v1", "v2"],
            ),
            (
                "steady state writes nothing",
                vec![
                    member("v0", Some("active"), health(Role::Active)),
                    member("v1", Some("standby"), health(Role::Standby)),
                ],
                vec!["v0"],
                1,
                vec![],
            ),
            (
                "failover",
                vec![
                    member("v0", Some("active"), health(Role::Standby)),
                    member("v1", Some("standby"), health(Role::Active)),
                ],
                vec!["v1"],
                1,
                vec!["v0", "v1"],
            ),
            (
                "crashed active below threshold is demoted by new active",
                vec![
                    member("v0", Some("active"), failing()),
                    member("v1", Some("standby"), health(Role::Active)),
                ],
                vec!["v1"],
                1,
                vec!["v0", "v1"],
            ),
            (
                "crashed active below threshold, no new active, keeps label",
                vec![
                    member("v0", Some("active"), failing()),
                    member("v1", Some("standby"), health(Role::Standby)),
                ],
                vec!["v0"],
                0,
                vec![],
            ),
            (
                "crashed active past threshold",
                vec![
                    member("v0", Some("active"), down()),
                    member("v1", Some("standby"), health(Role::Standby)),
                ],
                vec![],
                0,
                vec!["v0"],
            ),
            (
                "two claim active: the incumbent keeps the label",
                vec![
                    member("v0", Some("active"), health(Role::Active)),
                    member("v1", Some("standby"), health(Role::Active)),
                ],
                vec!["v0"],
                2,
                vec![],
            ),
            (
                "an unlabelled newcomer claims beside the incumbent",
                vec![
                    member("v0", Some("active"), health(Role::Active)),
                    member("imp", None, health(Role::Active)),
                ],
                vec!["v0"],
                2,
                vec!["imp"],
            ),
            (
                "two claim active, no incumbent: neither labelled",
                vec![
                    member("v0", Some("standby"), health(Role::Active)),
                    member("v1", Some("standby"), health(Role::Active)),
                ],
                vec![],
                2,
                vec![],
            ),
            (
                "two claim active, both labelled active: neither keeps it",
                vec![
                    member("v0", Some("active"), health(Role::Active)),
                    member("v1", Some("active"), health(Role::Active)),
                ],
                vec![],
                2,
                vec!["v0", "v1"],
            ),
            (
                "the incumbent stops claiming: the newcomer takes over",
                vec![
                    member("v0", Some("active"), health(Role::Standby)),
                    member("v1", None, health(Role::Active)),
                ],
                vec!["v1"],
                1,
                vec!["v0", "v1"],
            ),
            (
                "the incumbent stops answering: the newcomer takes over",
                vec![
                    member("v0", Some("active"), failing()),
                    member("v1", Some("standby"), health(Role::Active)),
                    member("v2", Some("standby"), health(Role::Standby)),
                ],
                vec!["v1"],
                1,
                vec!["v0", "v1"],
            ),
            (
                "unprobed pod only gets the ownership label",
                vec![member("v0", None, failing())],
                vec![],
                0,
                vec!["v0"],
            ),
            (
                "sealed active",
                vec![member("v0", Some("active"), health(Role::Sealed))],
                vec![],
                0,
                vec!["v0"],
            ),
        ];
        for (name, members, active, claimants, written) in cases {
            let decision = decide(&LabelNames::new("vault"), "vault", &members);
            assert_eq!(active_after(&decision, &members), active, "{name}: active");
            assert_eq!(decision.claimants.len(), claimants, "{name}: claimants");
            let mut pods: Vec<&str> = decision.plans.iter().map(|p| p.pod.as_str()).collect();
            pods.sort();
            assert_eq!(pods, written, "{name}: written");
            let all: Vec<&LabelPlan> = decision.plans.iter().collect();
            let written = Written::after(&LabelNames::new("vault"), &members, &all, true);
            assert_eq!(
                written.active.as_deref(),
                active.first().copied().filter(|_| active.len() == 1),
                "{name}"
            );
        }
    }

    #[test]
    fn demotions_are_written_before_the_promotion() {
        let members = vec![
            member("a-new", Some("standby"), health(Role::Active)),
            member("b-old", Some("active"), health(Role::Standby)),
            member("c-stale", Some("active"), failing()),
        ];
        let plans = decide(&LabelNames::new("vault"), "vault", &members).plans;
        let order: Vec<&str> = plans.iter().map(|p| p.pod.as_str()).collect();
        assert_eq!(order.last(), Some(&"a-new"), "{order:?}");
        assert_eq!(
            plans[2].change.get("vault-active"),
            Some(&Some("true".into()))
        );
    }

    #[test]
    fn pods_labelled_before_the_ownership_label_get_it_and_nothing_else() {
        let mut old = member("v0", Some("active"), health(Role::Active));
        old.labels.remove(OWNER_LABEL);
        let decision = decide(&LabelNames::new("vault"), "vault", &[old]);
        assert_eq!(decision.plans.len(), 1);
        assert_eq!(
            decision.plans[0].change,
            BTreeMap::from([(OWNER_LABEL.to_string(), Some("vault".to_string()))])
        );
        assert!(!decision.plans[0].promotes);
    }

    #[test]
    fn a_claimant_beside_the_incumbent_gets_no_role_label() {
        let members = vec![
            member("v0", Some("active"), health(Role::Active)),
            member("imp", None, health(Role::Active)),
            member("v2", Some("standby"), health(Role::Standby)),
        ];
        let names = LabelNames::new("vault");
        let decision = decide(&names, "vault", &members);
        let all: Vec<&LabelPlan> = decision.plans.iter().collect();
        let written = Written::after(&names, &members, &all, true);
        assert_eq!(written.active.as_deref(), Some("v0"));
        assert_eq!(decision.claimants, ["v0", "imp"]);
        let plan = decision.plans.iter().find(|p| p.pod == "imp").unwrap();
        assert_eq!(
            plan.change,
            BTreeMap::from([(OWNER_LABEL.to_string(), Some("vault".to_string()))]),
            "not in the standby Service either"
        );
        assert!(!plan.promotes);
    }

    #[test]
    fn demoting_a_failing_pod_touches_only_the_active_label() {
        let members = vec![
            member("v0", Some("active"), failing()),
            member("v1", Some("standby"), health(Role::Active)),
        ];
        let decision = decide(&LabelNames::new("vault"), "vault", &members);
        let plan = decision.plans.iter().find(|p| p.pod == "v0").unwrap();
        assert_eq!(
            plan.change,
            BTreeMap::from([("vault-active".to_string(), Some("false".to_string()))])
        );
    }

    #[test]
    fn only_writes_made_move_the_active_label() {
        let names = LabelNames::new("vault");
        let failover = vec![
            member("v0", Some("active"), health(Role::Standby)),
            member("v1", Some("standby"), health(Role::Active)),
        ];
        let plans = decide(&names, "vault", &failover).plans;
        let (demote, promote) = (&plans[0], &plans[1]);
        let removes = LabelPlan {
            pod: "v0".into(),
            change: BTreeMap::from([("vault-active".to_string(), None)]),
            promotes: false,
        };
        // (case, plans written, active afterwards)
        let cases: Vec<(&str, Vec<&LabelPlan>, Option<&str>)> = vec![
            ("nothing written", vec![], Some("v0")),
            ("demotion written, promotion refused", vec![demote], None),
            ("both written", vec![demote, promote], Some("v1")),
            ("promotion alone: two labelled", vec![promote], None),
            ("a removed label is not active", vec![&removes], None),
        ];
        for (case, made, active) in cases {
            let written = Written::after(&names, &failover, &made, false);
            assert_eq!(written.active.as_deref(), active, "{case}");
        }
    }
}
