//! The VaultCluster status and the events that its changes imply. Pure: the status holds no
//! probe timestamps, so an unchanged cluster yields an identical status and no write.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{MemberStatus, VaultClusterStatus};
use crate::decide::{Decision, Member, Written};
use crate::text::{self, shorten};
use crate::tracker::Verdict;

/// The conditions every built status carries, in this order. A condition that stops
/// applying turns False rather than going, so `kubectl wait --for=condition=X=false` and
/// alerts on it see the change.
pub const CONDITIONS: [&str; 4] = ["Ready", "Available", "Degraded", "SelectorOverlap"];

/// Longest `status.version`: the distinct versions of the pods, joined.
const VERSIONS: usize = 256;

/// Everything the status is built from.
pub struct Observation<'a> {
    pub generation: Option<i64>,
    pub members: &'a [Member],
    /// Only for the claimants: what was meant is not what the labels say.
    pub decision: &'a Decision,
    /// What the round's writes did: the active pod named is the one labelled so.
    pub written: &'a Written,
    /// Why the spec cannot be acted on, if it cannot (what the schema could not reject).
    pub spec_problem: Option<String>,
    /// Services that could not be put in place, and why.
    pub service_problems: Vec<String>,
    /// Pods left alone because an older VaultCluster selects them: "pod (cluster)".
    pub overlaps: Vec<String>,
    /// Pods whose labels are held: no Vault answer, Kubernetes reports them Ready, and no
    /// other pod answers active (see `fail_static`).
    pub held: Vec<String>,
    /// The write that failed this round, if one did: the status must not claim Ready.
    pub write_problem: Option<String>,
    pub previous: Option<&'a VaultClusterStatus>,
    pub now: Time,
}

pub fn build(o: &Observation) -> VaultClusterStatus {
    let mut members: Vec<MemberStatus> = o.members.iter().map(member_status).collect();
    keep_first_errors(&mut members, o.previous);
    let count = |roles: &[&str]| {
        members
            .iter()
            .filter(|m| roles.contains(&m.role.as_str()))
            .count() as i32
    };
    let versions: BTreeSet<String> = o
        .members
        .iter()
        .filter_map(|m| last_health(&m.verdict).map(|h| h.version.clone()))
        .filter(|v| !v.is_empty())
        .collect();
    let mut status = VaultClusterStatus {
        observed_generation: o.generation,
        conditions: Vec::new(),
        active_pod: o.written.active.clone(),
        pods: members.len() as i32,
        active: o.decision.claimants.len() as i32,
        standby: count(&["standby"]),
        perf_standby: count(&["perf-standby"]),
        unsealed: count(&["active", "standby", "perf-standby"]),
        sealed: count(&["sealed"]),
        uninitialized: count(&["uninitialized"]),
        unreachable: count(&["unreachable"]),
        version: shorten(versions.into_iter().collect::<Vec<_>>().join(","), VERSIONS),
        members,
    };
    status.conditions = conditions(o, &status);
    status
}

fn last_health(verdict: &Verdict) -> Option<&crate::health::Health> {
    match verdict {
        Verdict::Healthy(h) | Verdict::Failing { last: Some(h), .. } => Some(h),
        _ => None,
    }
}

/// A pod failing the same way round after round keeps the error that began the streak, so
/// that an error text that varies (a timeout, then "no route to host") does not rewrite the
/// status every round.
fn keep_first_errors(members: &mut [MemberStatus], previous: Option<&VaultClusterStatus>) {
    let Some(previous) = previous else { return };
    for m in members
        .iter_mut()
        .filter(|m| !m.last_probe_error.is_empty())
    {
        let before = previous.members.iter().find(|p| p.name == m.name);
        if let Some(p) = before.filter(|p| p.role == m.role && !p.last_probe_error.is_empty()) {
            m.last_probe_error.clone_from(&p.last_probe_error);
        }
    }
}

fn member_status(m: &Member) -> MemberStatus {
    let (role, error) = match &m.verdict {
        Verdict::Healthy(h) => (h.role.as_str(), String::new()),
        Verdict::Failing {
            last: Some(h),
            error,
        } => (h.role.as_str(), error.clone()),
        Verdict::Failing { last: None, error } => ("pending", error.clone()),
        Verdict::Down { reason, .. } => ("unreachable", reason.clone()),
    };
    let health = last_health(&m.verdict);
    MemberStatus {
        name: m.name.clone(),
        ip: m.ip.clone(),
        role: role.into(),
        sealed: health.is_some_and(|h| h.sealed),
        version: health.map(|h| h.version.clone()).unwrap_or_default(),
        last_probe_error: error,
    }
}

fn conditions(o: &Observation, s: &VaultClusterStatus) -> Vec<Condition> {
    let (available, available_reason, available_message) = availability(o);
    let ready = if let Some(problem) = &o.spec_problem {
        (false, "InvalidSpec", problem.clone())
    } else if let Some(problem) = &o.write_problem {
        (false, "WriteFailed", problem.clone())
    } else if !o.service_problems.is_empty() {
        (false, "ServiceConflict", o.service_problems.join("; "))
    } else if !available {
        (false, available_reason, available_message.clone())
    } else {
        (
            true,
            "Ready",
            format!("Services in place; {available_message}"),
        )
    };
    let degraded = if !o.held.is_empty() {
        Some(("ProbesFailing", held_message(&o.held, s)))
    } else if let Some(message) = contest(s) {
        Some(("MultipleActive", message))
    } else {
        degradation(s).map(|message| ("PodsUnhealthy", message))
    };
    let (degraded_reason, degraded_message) = degraded.clone().unwrap_or((
        "AllPodsHealthy",
        "every selected pod answers and is unsealed".into(),
    ));
    let overlap = if o.overlaps.is_empty() {
        (
            false,
            "NoOverlap",
            "no selected pod is left to an older VaultCluster".into(),
        )
    } else {
        (
            true,
            "SelectorOverlap",
            format!("left to older VaultClusters: {}", o.overlaps.join(", ")),
        )
    };
    let wanted = [
        ("Ready", ready),
        (
            "Available",
            (available, available_reason, available_message),
        ),
        (
            "Degraded",
            (degraded.is_some(), degraded_reason, degraded_message),
        ),
        ("SelectorOverlap", overlap),
    ];
    debug_assert!(wanted.iter().map(|w| w.0).eq(CONDITIONS));
    wanted
        .into_iter()
        .map(|(kind, (status, reason, message))| condition(o, kind, status, reason, message))
        .collect()
}

fn availability(o: &Observation) -> (bool, &'static str, String) {
    let claimants = &o.decision.claimants;
    if claimants.len() > 1 && o.written.active.is_none() {
        return (
            false,
            "MultipleActive",
            format!(
                "pods {} all claim to be active; none is labelled active",
                claimants.join(", ")
            ),
        );
    }
    match &o.written.active {
        Some(pod) if o.held.contains(pod) => (
            true,
            "ActiveHeld",
            format!(
                "{pod} keeps the active label: it gives no Vault answer, Kubernetes reports it Ready and no other pod answers active"
            ),
        ),
        Some(pod) => (true, "ActivePod", format!("{pod} is active")),
        None if o.members.is_empty() => (false, "NoPods", "no pod matches the selector".into()),
        None if claimants.len() == 1 => (
            false,
            "ActiveUnlabelled",
            format!(
                "{} answers as active; its active label is not written yet",
                claimants[0]
            ),
        ),
        None => (false, "NoActivePod", "no pod answers as active".into()),
    }
}

/// Names the pods that answer active beside the one keeping the label, if any. Read from
/// the status (a member that answered this round has no probe error), so that a restarted
/// operator finds the same contest and does not repeat its event.
fn contest(s: &VaultClusterStatus) -> Option<String> {
    let keeper = s.active_pod.as_deref()?;
    let newcomers: Vec<&str> = s
        .members
        .iter()
        .filter(|m| m.role == "active" && m.last_probe_error.is_empty() && m.name != keeper)
        .map(|m| m.name.as_str())
        .collect();
    let newcomers = newcomers.join(", ");
    (!newcomers.is_empty()).then(|| {
        format!(
            "{keeper} and {newcomers} answer active; {keeper} was labelled active first and keeps the label; not labelled: {newcomers}"
        )
    })
}

fn held_message(held: &[String], s: &VaultClusterStatus) -> String {
    let example = s
        .members
        .iter()
        .find(|m| held.contains(&m.name) && !m.last_probe_error.is_empty())
        .map(|m| format!(" ({}: {})", m.name, m.last_probe_error))
        .unwrap_or_default();
    format!(
        "no Vault answer from {}{example}; Kubernetes reports them Ready, so their labels are held until another pod answers active or Kubernetes marks them not Ready",
        held.join(", ")
    )
}

/// Names the pods that need attention, with why.
fn degradation(s: &VaultClusterStatus) -> Option<String> {
    let troubled: Vec<String> = s
        .members
        .iter()
        .filter(|m| {
            matches!(
                m.role.as_str(),
                "unreachable" | "sealed" | "uninitialized" | "removed" | "pending"
            ) || !m.last_probe_error.is_empty()
        })
        .map(|m| match m.last_probe_error.as_str() {
            "" => format!("{}: {}", m.name, m.role),
            error => format!("{}: {} ({error})", m.name, m.role),
        })
        .collect();
    (!troubled.is_empty()).then(|| troubled.join("; "))
}

/// A condition whose transition time moves only when its status does.
fn condition(
    o: &Observation,
    kind: &str,
    status: bool,
    reason: &str,
    message: String,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let previous = o
        .previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == kind));
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => o.now.clone(),
    };
    Condition {
        type_: kind.into(),
        status,
        reason: reason.into(),
        message: shorten(message, text::CONDITION),
        observed_generation: o.generation,
        last_transition_time,
    }
}

/// An event to publish on the VaultCluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
    /// The pod the event is about, if one: events are grouped by it, so that each new
    /// active pod gets its own event rather than a repeat count on the first.
    pub pod: Option<String>,
}

/// The events that the change from `old` to `new` calls for. Derived from the stored
/// status, so a restarted operator does not repeat them.
pub fn notices(old: Option<&VaultClusterStatus>, new: &VaultClusterStatus) -> Vec<Notice> {
    let empty = VaultClusterStatus::default();
    let old = old.unwrap_or(&empty);
    let mut out = Vec::new();
    if old.active_pod != new.active_pod {
        let name = |p: &Option<String>| p.clone().unwrap_or_else(|| "none".into());
        out.push(Notice {
            warning: new.active_pod.is_none(),
            reason: "ActiveChanged",
            message: format!(
                "active pod changed from {} to {}",
                name(&old.active_pod),
                name(&new.active_pod)
            ),
            pod: new.active_pod.clone().or_else(|| old.active_pod.clone()),
        });
    }
    for (kind, reason) in [
        ("Available", "MultipleActive"),
        ("Ready", "ServiceConflict"),
        ("Ready", "InvalidSpec"),
        ("Ready", "WriteFailed"),
        ("Degraded", "ProbesFailing"),
        ("SelectorOverlap", "SelectorOverlap"),
    ] {
        if let Some(message) = newly(old, new, kind, reason) {
            out.push(Notice {
                warning: true,
                reason,
                message,
                pod: None,
            });
        }
    }
    // From the status, not the condition: ProbesFailing may hide a contest in Degraded.
    if let Some(message) = contest(new).filter(|m| contest(old).as_ref() != Some(m)) {
        out.push(Notice {
            warning: true,
            reason: "MultipleActive",
            message,
            pod: None,
        });
    }
    if reason_of(old, "Degraded") == Some("ProbesFailing")
        && reason_of(new, "Degraded") != Some("ProbesFailing")
    {
        out.push(Notice {
            warning: false,
            reason: "ProbesAnswered",
            message: "a selected pod answers its health probe again; labels follow Vault".into(),
            pod: None,
        });
    }
    let old_roles: BTreeMap<&str, &str> = old
        .members
        .iter()
        .map(|m| (m.name.as_str(), m.role.as_str()))
        .collect();
    for m in new.members.iter().filter(|m| m.role == "unreachable") {
        if old_roles.get(m.name.as_str()) != Some(&"unreachable") {
            out.push(Notice {
                warning: true,
                reason: "PodUnreachable",
                message: format!("{} is unreachable: {}", m.name, m.last_probe_error),
                pod: Some(m.name.clone()),
            });
        }
    }
    out
}

fn reason_of<'a>(s: &'a VaultClusterStatus, kind: &str) -> Option<&'a str> {
    s.conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.reason.as_str())
}

/// The status to publish when the spec cannot be acted on: the last observation stays as it
/// was (the labels are held, so it is still what the pods carry), and Ready says why.
pub fn invalid_spec(
    previous: Option<&VaultClusterStatus>,
    generation: Option<i64>,
    problem: String,
    now: Time,
) -> VaultClusterStatus {
    let mut status = previous.cloned().unwrap_or_default();
    status.observed_generation = generation;
    let old = status.conditions.iter().find(|c| c.type_ == "Ready");
    let last_transition_time = match old {
        Some(c) if c.status == "False" => c.last_transition_time.clone(),
        _ => now,
    };
    let ready = Condition {
        type_: "Ready".into(),
        status: "False".into(),
        reason: "InvalidSpec".into(),
        message: shorten(problem, text::CONDITION),
        observed_generation: generation,
        last_transition_time,
    };
    status.conditions.retain(|c| c.type_ != "Ready");
    status.conditions.insert(0, ready);
    status
}

/// Whether `new` differs from `old` only in what can wait: probe errors, versions, the
/// Degraded condition, messages. Such a change is written at most once per interval, so a
/// pod whose answer changes every probe cannot make every round write; anything that says
/// where traffic goes is written at once.
pub fn can_wait(old: Option<&VaultClusterStatus>, new: &VaultClusterStatus) -> bool {
    old.is_some_and(|old| old != new && routing(old) == routing(new))
}

type RoutingView<'a> = (
    Option<i64>,
    &'a Option<String>,
    [i32; 8],
    Vec<(&'a str, &'a str, &'a str, bool)>,
    Vec<(&'a str, &'a str, &'a str)>,
);

fn routing(s: &VaultClusterStatus) -> RoutingView<'_> {
    let counts = [
        s.pods,
        s.active,
        s.standby,
        s.perf_standby,
        s.unsealed,
        s.sealed,
        s.uninitialized,
        s.unreachable,
    ];
    let members = s
        .members
        .iter()
        .map(|m| (m.name.as_str(), m.ip.as_str(), m.role.as_str(), m.sealed));
    let conditions = s
        .conditions
        .iter()
        .filter(|c| c.type_ != "Degraded")
        .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()));
    (
        s.observed_generation,
        &s.active_pod,
        counts,
        members.collect(),
        conditions.collect(),
    )
}

/// A JSON merge patch that turns `old` into `new`: a field `new` leaves out is sent as null,
/// so that it is cleared rather than left as it was.
pub fn merge_patch(
    old: Option<&VaultClusterStatus>,
    new: &VaultClusterStatus,
) -> serde_json::Value {
    let mut patch = serde_json::to_value(new).expect("status serializes");
    let old = old.map(|o| serde_json::to_value(o).expect("status serializes"));
    if let (Some(serde_json::Value::Object(old)), serde_json::Value::Object(fields)) =
        (old, &mut patch)
    {
        for key in old.keys() {
            fields.entry(key.clone()).or_insert(serde_json::Value::Null);
        }
    }
    serde_json::json!({ "status": patch })
}

/// The message of a condition that now has `reason` and did not have it with that message.
fn newly(
    old: &VaultClusterStatus,
    new: &VaultClusterStatus,
    kind: &str,
    reason: &str,
) -> Option<String> {
    let find = |s: &VaultClusterStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == kind && c.reason == reason)
            .map(|c| c.message.clone())
    };
    let now = find(new)?;
    (find(old).as_ref() != Some(&now)).then_some(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::decide;
    use crate::health::{Health, Role};
    use crate::labels::LabelNames;

    fn healthy(name: &str, role: Role) -> Member {
        let h = Health {
            role,
            initialized: true,
            sealed: role == Role::Sealed,
            version: "1.17.2".into(),
        };
        Member {
            name: name.into(),
            ip: "127.0.0.1".into(),
            labels: BTreeMap::new(),
            verdict: Verdict::Healthy(h),
            reach: crate::decide::Reach::Answered,
            serving: true,
        }
    }

    /// What the writes did when every one the decision called for was accepted.
    fn all_written(decision: &Decision, members: &[Member]) -> Written {
        let plans: Vec<_> = decision.plans.iter().collect();
        Written::after(&LabelNames::new("vault"), members, &plans, true)
    }

    fn status_of(
        members: Vec<Member>,
        previous: Option<&VaultClusterStatus>,
        services: Vec<String>,
        at: i64,
    ) -> VaultClusterStatus {
        let decision = decide(&LabelNames::new("vault"), "vault", &members);
        build(&Observation {
            generation: Some(3),
            members: &members,
            decision: &decision,
            written: &all_written(&decision, &members),
            spec_problem: None,
            service_problems: services,
            overlaps: vec![],
            held: vec![],
            write_problem: None,
            previous,
            now: Time(k8s_openapi::jiff::Timestamp::from_second(at).unwrap()),
        })
    }

    fn cond<'a>(s: &'a VaultClusterStatus, kind: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == kind).unwrap()
    }

    #[test]
    fn conditions_per_scenario() {
        let down = Member {
            verdict: Verdict::Down {
                reason: "connection refused".into(),
                last: None,
            },
            ..healthy("v2", Role::Standby)
        };
        // (scenario, members, service problems, Ready, Available, Degraded, Ready reason)
        let cases: Vec<(&str, Vec<Member>, Vec<String>, &str, &str, &str, &str)> = vec![
            (
                "healthy",
                vec![healthy("v0", Role::Active), healthy("v1", Role::Standby)],
                vec![],
                "True",
                "True",
                "False",
                "Ready",
            ),
            (
                "no active",
                vec![healthy("v1", Role::Standby)],
                vec![],
                "False",
                "False",
                "False",
                "NoActivePod",
            ),
            (
                "two active",
                vec![healthy("v0", Role::Active), healthy("v1", Role::Active)],
                vec![],
                "False",
                "False",
                "False",
                "MultipleActive",
            ),
            (
                "one down",
                vec![healthy("v0", Role::Active), down.clone()],
                vec![],
                "True",
                "True",
                "True",
                "Ready",
            ),
            (
                "sealed",
                vec![healthy("v0", Role::Active), healthy("v1", Role::Sealed)],
                vec![],
                "True",
                "True",
                "True",
                "Ready",
            ),
            (
                "service conflict",
                vec![healthy("v0", Role::Active)],
                vec!["x-active exists and is not ours".into()],
                "False",
                "True",
                "False",
                "ServiceConflict",
            ),
            (
                "no pods",
                vec![],
                vec![],
                "False",
                "False",
                "False",
                "NoPods",
            ),
        ];
        for (name, members, services, ready, available, degraded, reason) in cases {
            let s = status_of(members, None, services, 100);
            assert_eq!(cond(&s, "Ready").status, ready, "{name}");
            assert_eq!(cond(&s, "Available").status, available, "{name}");
            assert_eq!(cond(&s, "Degraded").status, degraded, "{name}");
            assert_eq!(cond(&s, "Ready").reason, reason, "{name}");
        }
    }

    #[test]
    fn degraded_message_names_the_pods() {
        let down = Member {
            verdict: Verdict::Down {
                reason: "connection refused".into(),
                last: None,
            },
            ..healthy("vault-2", Role::Standby)
        };
        let s = status_of(
            vec![
                healthy("vault-0", Role::Active),
                healthy("vault-1", Role::Sealed),
                down,
            ],
            None,
            vec![],
            1,
        );
        assert_eq!(
            cond(&s, "Degraded").message,
            "vault-1: sealed; vault-2: unreachable (connection refused)"
        );
        assert_eq!(
            (s.pods, s.active, s.unsealed, s.sealed, s.unreachable),
            (3, 1, 1, 1, 1)
        );
    }

    #[test]
    fn unchanged_cluster_gives_identical_status() {
        let members = || vec![healthy("v0", Role::Active), healthy("v1", Role::Standby)];
        let first = status_of(members(), None, vec![], 100);
        let second = status_of(members(), Some(&first), vec![], 200);
        assert_eq!(
            first, second,
            "a later probe of the same cluster must not change the status"
        );
    }

    #[test]
    fn transition_time_moves_with_status_only() {
        let first = status_of(vec![healthy("v0", Role::Active)], None, vec![], 100);
        let second = status_of(
            vec![healthy("v0", Role::Standby)],
            Some(&first),
            vec![],
            200,
        );
        assert_eq!(
            cond(&second, "Available")
                .last_transition_time
                .0
                .as_second(),
            200
        );
        assert_eq!(
            cond(&second, "Degraded").last_transition_time.0.as_second(),
            100
        );
    }

    #[test]
    fn events_follow_changes() {
        let before = status_of(
            vec![healthy("v0", Role::Active), healthy("v1", Role::Standby)],
            None,
            vec![],
            1,
        );
        let after = status_of(
            vec![healthy("v0", Role::Standby), healthy("v1", Role::Active)],
            Some(&before),
            vec![],
            2,
        );
        let reasons = |n: Vec<Notice>| {
            n.into_iter()
                .map(|n| (n.reason, n.message))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            reasons(notices(Some(&before), &after)),
            vec![(
                "ActiveChanged",
                "active pod changed from v0 to v1".to_string()
            )]
        );
        assert!(
            notices(Some(&after), &after).is_empty(),
            "no change, no event"
        );
        let multiple = status_of(
            vec![healthy("v0", Role::Active), healthy("v1", Role::Active)],
            Some(&after),
            vec![],
            3,
        );
        let got: Vec<&str> = notices(Some(&after), &multiple)
            .iter()
            .map(|n| n.reason)
            .collect();
        assert_eq!(got, vec!["ActiveChanged", "MultipleActive"]);
        assert!(notices(Some(&multiple), &multiple).is_empty());
        let down = Member {
            verdict: Verdict::Down {
                reason: "timed out".into(),
                last: None,
            },
            ..healthy("v1", Role::Standby)
        };
        let unreachable = status_of(
            vec![healthy("v0", Role::Active), down],
            Some(&before),
            vec![],
            4,
        );
        let got: Vec<&str> = notices(Some(&before), &unreachable)
            .iter()
            .map(|n| n.reason)
            .collect();
        assert_eq!(got, vec!["PodUnreachable"]);
    }

    /// RFC 7386, enough for the test: objects merge, null removes, the rest replaces.
    fn apply_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        match (target, patch) {
            (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        apply_merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                    }
                }
            }
            (t, p) => *t = p.clone(),
        }
    }

    #[test]
    fn merge_patch_clears_what_the_new_status_leaves_out() {
        let active = status_of(
            vec![healthy("v0", Role::Active), healthy("v1", Role::Standby)],
            None,
            vec![],
            1,
        );
        let sealed = status_of(
            vec![healthy("v0", Role::Sealed), healthy("v1", Role::Sealed)],
            Some(&active),
            vec![],
            2,
        );
        assert!(active.active_pod.is_some() && sealed.active_pod.is_none());
        let none = VaultClusterStatus::default();
        for (old, new) in [(&active, &sealed), (&sealed, &active), (&active, &none)] {
            let patch = merge_patch(Some(old), new);
            let mut stored = serde_json::json!({ "status": old });
            apply_merge(&mut stored, &patch);
            let got: VaultClusterStatus = serde_json::from_value(stored["status"].clone()).unwrap();
            assert_eq!(&got, new);
        }
        assert!(merge_patch(Some(&active), &sealed)["status"]["activePod"].is_null());
    }

    #[test]
    fn invalid_spec_keeps_the_observation_and_goes_quiet() {
        let before = status_of(
            vec![healthy("v0", Role::Active), healthy("v1", Role::Standby)],
            None,
            vec![],
            1,
        );
        let at = |t| Time(k8s_openapi::jiff::Timestamp::from_second(t).unwrap());
        let problem = "spec.health.tls.caSecretRef: Secret vault-ca not found".to_string();
        let first = invalid_spec(Some(&before), Some(4), problem.clone(), at(10));
        let second = invalid_spec(Some(&first), Some(4), problem.clone(), at(20));
        assert_eq!(first, second, "a second round writes nothing");
        assert_eq!(first.active_pod.as_deref(), Some("v0"), "labels are held");
        assert_eq!(first.members, before.members);
        let ready = cond(&first, "Ready");
        assert_eq!(
            (
                ready.status.as_str(),
                ready.reason.as_str(),
                ready.message.as_str()
            ),
            ("False", "InvalidSpec", problem.as_str())
        );
        let reasons: Vec<&str> = notices(Some(&before), &first)
            .iter()
            .map(|n| n.reason)
            .collect();
        assert_eq!(reasons, vec!["InvalidSpec"], "no ActiveChanged to none");
        assert!(notices(Some(&first), &second).is_empty());
    }

    #[test]
    fn a_streak_of_failures_keeps_its_first_error() {
        let failing = |error: &str| Member {
            verdict: Verdict::Failing {
                last: None,
                error: error.into(),
            },
            ..healthy("v1", Role::Standby)
        };
        let first = status_of(vec![failing("no answer within 300ms")], None, vec![], 1);
        let second = status_of(
            vec![failing("connect: No route to host (os error 113)")],
            Some(&first),
            vec![],
            2,
        );
        assert_eq!(first, second, "a varying error text writes nothing");
        assert_eq!(second.members[0].last_probe_error, "no answer within 300ms");
        let answered = status_of(vec![healthy("v1", Role::Standby)], Some(&second), vec![], 3);
        let again = status_of(
            vec![failing("connect: refused")],
            Some(&answered),
            vec![],
            4,
        );
        assert_eq!(
            again.members[0].last_probe_error, "connect: refused",
            "a new streak"
        );
    }

    #[test]
    fn only_changes_of_routing_are_written_at_once() {
        let with_version = |name: &str, role: Role, version: &str| {
            let mut m = healthy(name, role);
            if let Verdict::Healthy(h) = &mut m.verdict {
                h.version = version.into();
            }
            m
        };
        let failing = |name: &str, role: Role, error: &str| Member {
            verdict: Verdict::Failing {
                last: Some(Health {
                    role,
                    initialized: true,
                    sealed: false,
                    version: "1.17.2".into(),
                }),
                error: error.into(),
            },
            ..healthy(name, role)
        };
        let base = || vec![healthy("v0", Role::Active), healthy("v1", Role::Standby)];
        // (change, members after it, may wait)
        let cases: Vec<(&str, Vec<Member>, bool)> = vec![
            ("nothing", base(), false),
            (
                "a version",
                vec![
                    with_version("v0", Role::Active, "x1"),
                    healthy("v1", Role::Standby),
                ],
                true,
            ),
            (
                "a probe error below the threshold (Degraded flips)",
                vec![
                    healthy("v0", Role::Active),
                    failing("v1", Role::Standby, "status 200: garbage"),
                ],
                true,
            ),
            (
                "a role",
                vec![healthy("v0", Role::Active), healthy("v1", Role::Sealed)],
                false,
            ),
            (
                "the active pod",
                vec![healthy("v0", Role::Standby), healthy("v1", Role::Active)],
                false,
            ),
            ("a pod gone", vec![healthy("v0", Role::Active)], false),
        ];
        let before = status_of(base(), None, vec![], 1);
        for (change, members, wait) in cases {
            let after = status_of(members, Some(&before), vec![], 2);
            assert_eq!(can_wait(Some(&before), &after), wait, "{change}");
        }
        assert!(
            !can_wait(None, &before),
            "a first status is written at once"
        );
    }

    #[test]
    fn a_newcomer_answering_active_is_reported_beside_the_incumbent() {
        let mut incumbent = healthy("v0", Role::Active);
        incumbent
            .labels
            .insert("vault-active".into(), "true".into());
        let before = status_of(
            vec![incumbent.clone(), healthy("v1", Role::Standby)],
            None,
            vec![],
            1,
        );
        let contested = status_of(
            vec![incumbent, healthy("imp", Role::Active)],
            Some(&before),
            vec![],
            2,
        );
        assert_eq!(contested.active_pod.as_deref(), Some("v0"));
        let available = cond(&contested, "Available");
        assert_eq!(
            (available.status.as_str(), available.reason.as_str()),
            ("True", "ActivePod")
        );
        let degraded = cond(&contested, "Degraded");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "MultipleActive")
        );
        assert_eq!(
            degraded.message,
            "v0 and imp answer active; v0 was labelled active first and keeps the label; not labelled: imp"
        );
        let got: Vec<(&str, bool, String)> = notices(Some(&before), &contested)
            .into_iter()
            .map(|n| (n.reason, n.warning, n.message))
            .collect();
        assert_eq!(
            got,
            vec![("MultipleActive", true, degraded.message.clone())]
        );
        assert!(notices(Some(&contested), &contested).is_empty());
    }

    /// The status of one active pod, with overlaps, held labels or a failed write.
    fn one_active(
        overlaps: Vec<String>,
        held: bool,
        write: Option<&str>,
        previous: Option<&VaultClusterStatus>,
        at: i64,
    ) -> VaultClusterStatus {
        let mut v0 = healthy("v0", Role::Active);
        v0.labels.insert("vault-active".into(), "true".into());
        if held {
            let Verdict::Healthy(last) = v0.verdict else {
                unreachable!()
            };
            v0.verdict = Verdict::Failing {
                last: Some(last),
                error: "no answer within 300ms".into(),
            };
        }
        let members = vec![v0];
        let decision = decide(&LabelNames::new("vault"), "vault", &members);
        build(&Observation {
            generation: Some(1),
            members: &members,
            decision: &decision,
            written: &all_written(&decision, &members),
            spec_problem: None,
            service_problems: vec![],
            overlaps,
            held: if held { vec!["v0".into()] } else { vec![] },
            write_problem: write.map(String::from),
            previous,
            now: Time(k8s_openapi::jiff::Timestamp::from_second(at).unwrap()),
        })
    }

    #[test]
    fn selector_overlap_turns_false_rather_than_going() {
        let observe = |overlaps, previous, at| one_active(overlaps, false, None, previous, at);
        let clear = observe(vec![], None, 1);
        let kinds: Vec<&str> = clear.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(kinds, CONDITIONS);
        assert_eq!(
            (
                cond(&clear, "SelectorOverlap").status.as_str(),
                cond(&clear, "SelectorOverlap").reason.as_str()
            ),
            ("False", "NoOverlap")
        );
        let overlapping = observe(vec!["v0 (older)".into()], Some(&clear), 2);
        let c = cond(&overlapping, "SelectorOverlap");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "SelectorOverlap")
        );
        assert_eq!(c.last_transition_time.0.as_second(), 2);
        let reasons: Vec<&str> = notices(Some(&clear), &overlapping)
            .iter()
            .map(|n| n.reason)
            .collect();
        assert_eq!(reasons, ["SelectorOverlap"]);
        let resolved = observe(vec![], Some(&overlapping), 3);
        let c = cond(&resolved, "SelectorOverlap");
        assert_eq!(
            (c.status.as_str(), c.last_transition_time.0.as_second()),
            ("False", 3)
        );
        assert!(notices(Some(&overlapping), &resolved).is_empty());
    }

    #[test]
    fn held_labels_and_failed_writes_are_said() {
        let observe = |held, write, previous| one_active(vec![], held, write, previous, 5);
        let normal = observe(false, None, None);
        let held = observe(true, None, Some(&normal));
        assert_eq!(cond(&held, "Degraded").reason, "ProbesFailing");
        assert_eq!(cond(&held, "Degraded").status, "True");
        assert_eq!(cond(&held, "Available").reason, "ActiveHeld");
        assert_eq!(
            cond(&held, "Degraded").message,
            "no Vault answer from v0 (v0: no answer within 300ms); Kubernetes reports them Ready, so their labels are held until another pod answers active or Kubernetes marks them not Ready"
        );
        let got: Vec<(&str, bool)> = notices(Some(&normal), &held)
            .iter()
            .map(|n| (n.reason, n.warning))
            .collect();
        assert_eq!(got, vec![("ProbesFailing", true)]);
        let again = observe(true, None, Some(&held));
        assert!(notices(Some(&held), &again).is_empty());
        let recovered = observe(false, None, Some(&held));
        let got: Vec<&str> = notices(Some(&held), &recovered)
            .iter()
            .map(|n| n.reason)
            .collect();
        assert_eq!(got, vec!["ProbesAnswered"]);
        let failed = observe(
            false,
            Some("patching labels of pod v0: connection reset"),
            None,
        );
        assert_eq!(cond(&failed, "Ready").status, "False");
        assert_eq!(cond(&failed, "Ready").reason, "WriteFailed");
    }

    #[test]
    fn a_refused_promotion_names_no_active_pod() {
        let members = vec![healthy("v0", Role::Active), healthy("v1", Role::Standby)];
        let decision = decide(&LabelNames::new("vault"), "vault", &members);
        let standby = decision
            .plans
            .iter()
            .filter(|p| !p.promotes)
            .collect::<Vec<_>>();
        let written = Written::after(&LabelNames::new("vault"), &members, &standby, false);
        let status = build(&Observation {
            generation: Some(1),
            members: &members,
            decision: &decision,
            written: &written,
            spec_problem: None,
            service_problems: vec![],
            overlaps: vec![],
            held: vec![],
            write_problem: Some("patching labels of pod v0: refused".into()),
            previous: None,
            now: Time(k8s_openapi::jiff::Timestamp::from_second(1).unwrap()),
        });
        assert_eq!((status.active_pod.as_deref(), status.active), (None, 1));
        let available = cond(&status, "Available");
        assert_eq!(
            (available.status.as_str(), available.reason.as_str()),
            ("False", "ActiveUnlabelled")
        );
        assert!(available.message.starts_with("v0 answers as active"));
        assert_eq!(cond(&status, "Ready").reason, "WriteFailed");
    }
}
