//! Fail static per pod: a pod that stops giving Vault's answer (a timeout, a reset, or an
//! answer that is not Vault's: a 404, an HTML page, anything but a coherent health report)
//! may be down, or the operator's path to it may be cut or lead somewhere else; the probe
//! cannot tell which. So its labels are not moved on that guess while Kubernetes reports it
//! Running, Ready and not terminating, until something corroborates the move: another pod
//! answers active (only one pod can be, so this one is not), or Kubernetes marks it not
//! Ready (the kubelet, on the pod's node, sees the container gone or failing its probe).
//! Holding costs no availability: until Vault elects a new active pod, none other can serve.
//! Vault's own answers (sealed, uninitialized, standby, removed) are never held: they say
//! what the pod is, and the labels follow them at once.

use crate::decide::{Member, Reach, answers_active};
use crate::tracker::Verdict;

/// Keeps the labels of every serving pod that gave no Vault answer past the failure
/// threshold, unless another pod answers active; returns the names of the pods held.
pub fn hold(members: &mut [Member]) -> Vec<String> {
    if members.iter().any(answers_active) {
        return Vec::new();
    }
    members
        .iter_mut()
        .filter(|m| m.serving && m.reach != Reach::NotProbed)
        .filter_map(|member| {
            let Verdict::Down { reason, last } = &member.verdict else {
                return None;
            };
            member.verdict = Verdict::Failing {
                last: last.clone(),
                error: reason.clone(),
            };
            Some(member.name.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::decide::decide;
    use crate::health::{Health, Role};
    use crate::labels::LabelNames;

    fn standby() -> Health {
        Health {
            role: Role::Standby,
            initialized: true,
            sealed: false,
            version: "1.21.4".into(),
        }
    }

    fn down(reason: &str) -> Verdict {
        Verdict::Down {
            reason: reason.into(),
            last: Some(standby()),
        }
    }

    fn member(name: &str, verdict: Verdict, reach: Reach, serving: bool) -> Member {
        let labels = [
            ("vault-registrar.dev/cluster", "vault"),
            ("vault-active", if name == "v0" { "true" } else { "false" }),
        ];
        Member {
            name: name.into(),
            ip: String::new(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            verdict,
            reach,
            serving,
        }
    }

    fn answer(role: Role) -> Verdict {
        Verdict::Healthy(Health {
            role,
            sealed: role == Role::Sealed,
            ..standby()
        })
    }

    #[test]
    fn hold_until_corroborated() {
        use Reach::*;
        let timeout = || down("no answer within 300ms");
        let not_vault = || down("status 404: body is not Vault health JSON: not a JSON object");
        // (scenario, members (v0 labelled active), pods held, pods given sealed=true, active after)
        let cases: Vec<(&str, Vec<Member>, Vec<&str>, Vec<&str>, Option<&str>)> = vec![
            (
                "all cut off, all Ready: nothing changes",
                vec![
                    member("v0", timeout(), Unanswered, true),
                    member("v1", timeout(), Unanswered, true),
                ],
                vec!["v0", "v1"],
                vec![],
                Some("v0"),
            ),
            (
                "every pod answers 404 with a non-Vault body: nothing changes",
                vec![
                    member("v0", not_vault(), Answered, true),
                    member("v1", not_vault(), Answered, true),
                ],
                vec!["v0", "v1"],
                vec![],
                Some("v0"),
            ),
            (
                "all cut off, one not Ready: only that one is shut down",
                vec![
                    member("v0", timeout(), Unanswered, true),
                    member("v1", timeout(), Unanswered, false),
                ],
                vec!["v0"],
                vec!["v1"],
                Some("v0"),
            ),
            (
                "a standby answers, the Ready active does not: a guess, held",
                vec![
                    member("v0", timeout(), Unanswered, true),
                    member("v1", answer(Role::Standby), Answered, true),
                ],
                vec!["v0"],
                vec![],
                Some("v0"),
            ),
            (
                "partial partition, a restarted pod answers sealed: labelled sealed, the rest held",
                vec![
                    member("v0", timeout(), Unanswered, true),
                    member("v1", timeout(), Unanswered, true),
                    member("v2", answer(Role::Sealed), Answered, true),
                ],
                vec!["v0", "v1"],
                vec!["v2"],
                Some("v0"),
            ),
            (
                "another pod answers active: corroborated, shut down",
                vec![
                    member("v0", timeout(), Unanswered, true),
                    member("v1", answer(Role::Active), Answered, true),
                ],
                vec![],
                vec!["v0"],
                Some("v1"),
            ),
            (
                "crashed active marked not Ready by the kubelet: shut down",
                vec![
                    member("v0", down("connection refused"), Unanswered, false),
                    member("v1", answer(Role::Standby), Answered, true),
                ],
                vec![],
                vec!["v0"],
                None,
            ),
            (
                "terminating pods are not probed and not held",
                vec![
                    member("v0", down("pod is terminating"), NotProbed, false),
                    member("v1", timeout(), Unanswered, true),
                ],
                vec!["v1"],
                vec!["v0"],
                None,
            ),
            (
                "nothing probed: no hold",
                vec![member("v0", down("pod phase is Pending"), NotProbed, false)],
                vec![],
                vec!["v0"],
                None,
            ),
        ];
        for (name, mut members, held, sealed, active) in cases {
            assert_eq!(hold(&mut members), held, "{name}: held");
            let decision = decide(&LabelNames::new("vault"), "vault", &members);
            let shut: Vec<&str> = decision
                .plans
                .iter()
                .filter(|p| p.change.get("vault-sealed") == Some(&Some("true".into())))
                .map(|p| p.pod.as_str())
                .collect();
            assert_eq!(shut, sealed, "{name}: sealed");
            assert_eq!(
                all_written(&members, &decision).as_deref(),
                active,
                "{name}: active"
            );
        }
    }

    #[test]
    fn below_the_threshold_nothing_is_held_or_moved() {
        let failing = Verdict::Failing {
            last: Some(standby()),
            error: "no answer within 300ms".into(),
        };
        let mut members = vec![member("v0", failing, Reach::Unanswered, true)];
        assert!(hold(&mut members).is_empty());
        let decision = decide(&LabelNames::new("vault"), "vault", &members);
        assert_eq!(all_written(&members, &decision), Some("v0".into()));
    }

    /// The pod labelled active once every plan is written.
    fn all_written(members: &[Member], decision: &crate::decide::Decision) -> Option<String> {
        let all: Vec<_> = decision.plans.iter().collect();
        crate::decide::Written::after(&LabelNames::new("vault"), members, &all, true).active
    }
}
