//! Table tests of the status: built from observations, its events and what can wait.

use std::collections::BTreeMap;

use super::*;
use crate::decide::decide;
use crate::health::{Health, Role};
use crate::labels::LabelNames;
use crate::tracker::Verdict;

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
    let hint = "the listener requires a client certificate: set spec.health.tls.clientCertSecretRef: http: connection closed before an answer";
    let named = status_of(vec![failing(hint)], Some(&again), vec![], 5);
    assert_eq!(
        named.members[0].last_probe_error, hint,
        "an error naming the setting to fix replaces one that does not"
    );
    let later = status_of(vec![failing("connect: refused")], Some(&named), vec![], 6);
    assert_eq!(later.members[0].last_probe_error, hint, "and is kept");
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

#[test]
fn members_are_capped_with_the_pods_that_need_an_eye_first() {
    let down = |name: &str| Member {
        verdict: Verdict::Down {
            reason: "connection refused".into(),
            last: None,
        },
        ..healthy(name, Role::Standby)
    };
    let standbys = |n: usize| -> Vec<Member> {
        (0..n)
            .map(|i| healthy(&format!("s{i:03}"), Role::Standby))
            .collect()
    };
    // (scenario, members, rows shown: (name, role) that must be among them, omitted)
    let cases: Vec<(&str, Vec<Member>, Vec<&str>, i32)> = vec![
        (
            "under the cap",
            standbys(3),
            vec!["s000", "s001", "s002"],
            0,
        ),
        ("at the cap", standbys(MAX_MEMBERS), vec!["s000", "s024"], 0),
        (
            "one over: the last by name goes",
            standbys(26),
            vec!["s024"],
            1,
        ),
        (
            "the active pod, sealed and unreachable pods come first",
            standbys(200)
                .into_iter()
                .chain([
                    healthy("zz-active", Role::Active),
                    healthy("zz-sealed", Role::Sealed),
                    down("zz-down"),
                ])
                .collect(),
            vec!["zz-active", "zz-sealed", "zz-down", "s000", "s021"],
            178,
        ),
    ];
    for (scenario, mut members, must, omitted) in cases {
        // As a round lists them: by pod name.
        members.sort_by(|a, b| a.name.cmp(&b.name));
        let total = members.len() as i32;
        let s = status_of(members, None, vec![], 100);
        assert!(s.members.len() <= MAX_MEMBERS, "{scenario}");
        assert_eq!(s.members_omitted, omitted, "{scenario}");
        assert_eq!(s.members.len() as i32 + omitted, total, "{scenario}");
        assert_eq!(s.pods, total, "{scenario}: the counts cover every pod");
        let names: Vec<&str> = s.members.iter().map(|m| m.name.as_str()).collect();
        for name in must {
            assert!(names.contains(&name), "{scenario}: {name} missing");
        }
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "{scenario}: rows keep the pods' order");
    }
    // Many pods that cannot serve: the active pod keeps its row, and the counts say the rest.
    let mut members: Vec<Member> = (0..60).map(|i| down(&format!("d{i:02}"))).collect();
    members.push(healthy("v-active", Role::Active));
    let s = status_of(members.clone(), None, vec![], 100);
    assert_eq!(s.members[0].name, "d00");
    assert!(s.members.iter().any(|m| m.name == "v-active"));
    assert_eq!((s.unreachable, s.members_omitted), (60, 36));
    // The same pods give the same status: no write from the cap alone.
    assert_eq!(status_of(members, Some(&s), vec![], 200), s);
}

#[test]
fn the_schema_caps_members_as_the_status_does() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(crate::crd::VaultCluster::crd()).unwrap();
    let status = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"];
    assert_eq!(
        status["properties"]["members"]["maxItems"],
        serde_json::json!(MAX_MEMBERS)
    );
    assert_eq!(
        status["properties"]["membersOmitted"]["type"],
        serde_json::json!("integer")
    );
}
