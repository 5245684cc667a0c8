//! Per-pod probe history: consecutive failures against the threshold, and the last good
//! answer. Kept in memory only; after a restart the first probe decides again, and until a
//! pod has a result nothing is written for it, so labels do not flap.

use std::collections::HashMap;

use crate::health::Health;

/// What one probe gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Healthy(Health),
    Failed(Failure),
}

/// A probe that gave no usable health report, and whose fault that was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

/// Tells "Vault answered" from "we could not ask": only the first is evidence about Vault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Something answered, but not with a coherent Vault health report.
    Answer,
    /// No answer reached us: refused, reset, timed out, or the TLS handshake failed. The pod
    /// may be down, or the path to it may be cut.
    Transport,
    /// Our own process could not send the probe (out of file descriptors, buffers, ports,
    /// or probe slots). Never held against the pod.
    Local,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// Whether the failure says nothing about Vault, only about the way to it.
    pub fn unanswered(&self) -> bool {
        matches!(self.kind, FailureKind::Transport | FailureKind::Local)
    }
}

/// What the operator believes about a pod now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Healthy(Health),
    /// Failing fewer than threshold times in a row: labels stay as they are.
    Failing {
        last: Option<Health>,
        error: String,
    },
    /// Cannot serve: unreachable after the threshold, not Running, no IP, or terminating.
    Down {
        reason: String,
        last: Option<Health>,
    },
}

#[derive(Clone, Debug, Default)]
struct Record {
    failures: u32,
    last: Option<Health>,
}

/// Probe histories keyed by pod UID.
#[derive(Debug, Default)]
pub struct Tracker {
    pods: HashMap<String, Record>,
}

impl Tracker {
    /// Records a probe outcome and returns the verdict it leads to.
    pub fn record(&mut self, pod_uid: &str, outcome: Outcome, threshold: u32) -> Verdict {
        let record = self.pods.entry(pod_uid.to_string()).or_default();
        match outcome {
            Outcome::Healthy(health) => {
                record.failures = 0;
                record.last = Some(health.clone());
                Verdict::Healthy(health)
            }
            // Our own shortage is no evidence about the pod: it does not count.
            Outcome::Failed(failure) if failure.kind == FailureKind::Local => Verdict::Failing {
                last: record.last.clone(),
                error: failure.message,
            },
            Outcome::Failed(failure) => {
                record.failures = record.failures.saturating_add(1);
                if record.failures >= threshold.max(1) {
                    Verdict::Down {
                        reason: failure.message,
                        last: record.last.clone(),
                    }
                } else {
                    Verdict::Failing {
                        last: record.last.clone(),
                        error: failure.message,
                    }
                }
            }
        }
    }

    /// A pod that cannot be probed (not Running, no IP, terminating) is down at once; its
    /// history restarts when it comes back.
    pub fn down(&mut self, pod_uid: &str, reason: &str) -> Verdict {
        self.pods.remove(pod_uid);
        Verdict::Down {
            reason: reason.to_string(),
            last: None,
        }
    }

    /// The pod's last answer, while its probes are not failing.
    pub fn healthy(&self, pod_uid: &str) -> Option<&Health> {
        self.pods
            .get(pod_uid)
            .filter(|r| r.failures == 0)
            .and_then(|r| r.last.as_ref())
    }

    /// Forgets pods no longer present.
    pub fn retain(&mut self, live: &[&str]) {
        self.pods.retain(|uid, _| live.contains(&uid.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Role;

    fn healthy() -> Outcome {
        Outcome::Healthy(Health {
            role: Role::Active,
            initialized: true,
            sealed: false,
            version: "1.17.2".into(),
        })
    }
    fn failed() -> Outcome {
        Outcome::Failed(Failure::new(FailureKind::Transport, "connection refused"))
    }
    fn local() -> Outcome {
        Outcome::Failed(Failure::new(
            FailureKind::Local,
            "connect: too many open files",
        ))
    }

    #[test]
    fn threshold_counts_consecutive_failures() {
        let cases: Vec<(&str, Vec<Outcome>, u32, &str)> = vec![
            (
                "first failure below threshold is no result",
                vec![failed()],
                2,
                "failing-unknown",
            ),
            (
                "second failure reaches threshold",
                vec![failed(), failed()],
                2,
                "down",
            ),
            ("threshold one is immediate", vec![failed()], 1, "down"),
            (
                "success resets the count",
                vec![failed(), healthy(), failed()],
                2,
                "failing-known",
            ),
            (
                "failure after success keeps last",
                vec![healthy(), failed()],
                3,
                "failing-known",
            ),
            (
                "our own shortage never counts",
                vec![local(), local(), local()],
                1,
                "failing-unknown",
            ),
            (
                "our own shortage between failures does not reset or add",
                vec![healthy(), failed(), local(), failed()],
                3,
                "failing-known",
            ),
            (
                "recovery after down",
                vec![failed(), failed(), healthy()],
                2,
                "healthy",
            ),
        ];
        for (name, outcomes, threshold, expected) in cases {
            let mut tracker = Tracker::default();
            let verdict = outcomes
                .into_iter()
                .map(|o| tracker.record("uid", o, threshold))
                .last()
                .unwrap();
            let kind = match verdict {
                Verdict::Healthy(_) => "healthy",
                Verdict::Failing { last: None, .. } => "failing-unknown",
                Verdict::Failing { last: Some(_), .. } => "failing-known",
                Verdict::Down { .. } => "down",
            };
            assert_eq!(kind, expected, "{name}");
        }
    }

    #[test]
    fn pods_are_independent_and_forgotten() {
        let mut tracker = Tracker::default();
        tracker.record("a", failed(), 2);
        assert!(matches!(
            tracker.record("b", failed(), 2),
            Verdict::Failing { .. }
        ));
        tracker.retain(&["b"]);
        assert!(
            matches!(tracker.record("a", failed(), 2), Verdict::Failing { .. }),
            "a starts over"
        );
    }
}
