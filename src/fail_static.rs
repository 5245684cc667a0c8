//! Fail static: when no selected pod answers, the operator is more likely the one cut off
//! than every Vault pod at once. Pods that Kubernetes still reports Running and Ready keep
//! their labels until one answers again or Kubernetes says otherwise, the way
//! kube-controller-manager's node lifecycle controller stops evicting when a whole zone
//! looks down. A pod Kubernetes reports not Ready, not Running or terminating is not
//! shielded: it follows the after-shutdown labels after the failure threshold as usual.

use crate::decide::{Member, Reach};
use crate::tracker::Verdict;

/// Holds the labels of serving pods when no probed pod answered this round; false when at
/// least one pod answered (or none was probed).
pub fn hold(members: &mut [Member]) -> bool {
    let probed = members.iter().filter(|m| m.reach != Reach::NotProbed);
    if probed.clone().next().is_none() || probed.clone().any(|m| m.reach == Reach::Answered) {
        return false;
    }
    for member in members.iter_mut().filter(|m| m.serving) {
        if let Verdict::Down { reason, last } = &member.verdict {
            member.verdict = Verdict::Failing {
                last: last.clone(),
                error: reason.clone(),
            };
        }
    }
    true
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

    /// (scenario, members, held, pods given the after-shutdown labels)
    #[test]
    fn hold_only_when_nobody_answered() {
        use Reach::*;
        let timeout = || down("no answer within 300ms");
        let cases: Vec<(&str, Vec<Member>, bool, Vec<&str>)> = vec![
            (
                "all cut off, all Ready: nothing changes",
                vec![
                    member("v0", timeout(), Unanswered, true),
                    member("v1", timeout(), Unanswered, true),
                ],
                true,
                vec![],
            ),
            (
                "all cut off, one not Ready: only that one is shut down",
                vec![
                    member("v0", timeout(), Unanswered, true),
                    member("v1", timeout(), Unanswered, false),
                ],
                true,
                vec!["v1"],
            ),
            (
                "one answers: the crashed active is shut down",
                vec![
                    member("v0", timeout(), Unanswered, true),
                    member("v1", Verdict::Healthy(standby()), Answered, true),
                ],
                false,
                vec!["v0"],
            ),
            (
                "garbage is an answer",
                vec![
                    member(
                        "v0",
                        down("status 200: not Vault health JSON"),
                        Answered,
                        true,
                    ),
                    member("v1", timeout(), Unanswered, true),
                ],
                false,
                vec!["v0", "v1"],
            ),
            (
                "terminating pods are not probed and not held",
                vec![
                    member("v0", down("pod is terminating"), NotProbed, false),
                    member("v1", timeout(), Unanswered, true),
                ],
                true,
                vec!["v0"],
            ),
            (
                "nothing probed: no hold",
                vec![member("v0", down("pod phase is Pending"), NotProbed, false)],
                false,
                vec!["v0"],
            ),
        ];
        for (name, mut members, held, changed) in cases {
            assert_eq!(hold(&mut members), held, "{name}");
            let decision = decide(&LabelNames::new("vault"), "vault", &members);
            let shut: Vec<&str> = decision
                .plans
                .iter()
                .filter(|p| p.change.get("vault-sealed") == Some(&Some("true".into())))
                .map(|p| p.pod.as_str())
                .collect();
            assert_eq!(shut, changed, "{name}");
        }
    }
}
