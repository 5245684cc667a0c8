//! Per-pod probe history: consecutive failures against the threshold, and the last good
//! answer. Kept in memory only; after a restart the first probe decides again, and until a
//! pod has a result nothing is written for it, so labels do not flap.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::health::Health;
use crate::text::{PROBE_ERROR, excerpt};

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
    /// The message is bounded and escaped: TLS and parser errors can quote what the pod
    /// sent.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: excerpt(&message.into(), PROBE_ERROR),
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
    /// Failing fewer than threshold times in a row, or held past it by `fail_static`:
    /// labels stay as they are.
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
    /// When the version last changed: a pod answering a new version every probe must not
    /// make every round write.
    version_since: Option<Instant>,
}

/// Probe histories keyed by pod UID.
#[derive(Debug, Default)]
pub struct Tracker {
    pods: HashMap<String, Record>,
}

impl Tracker {
    /// Records a probe outcome at `now` and returns the verdict it leads to. A version
    /// changes at most once per `hold`; the role always follows the answer at once.
    pub fn record(
        &mut self,
        pod_uid: &str,
        outcome: Outcome,
        threshold: u32,
        now: Instant,
        hold: Duration,
    ) -> Verdict {
        let record = self.pods.entry(pod_uid.to_string()).or_default();
        match outcome {
            Outcome::Healthy(mut health) => {
                hold_version(record, &mut health, now, hold);
                record.failures = 0;
                // Kept, not replaced, while the answer is the same: a record lives for the
                // pod's life, and a fresh copy every probe would scatter these small
                // long-lived strings among the probe's short-lived ones, which pins whole
                // allocator pages (see README, "Scale").
                if record.last.as_ref() != Some(&health) {
                    record.last = Some(health.clone());
                }
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

/// Keeps the version of the last answer when the one before changed it less than `hold`
/// ago.
fn hold_version(record: &mut Record, health: &mut Health, now: Instant, hold: Duration) {
    let Some(last) = &record.last else {
        record.version_since = Some(now);
        return;
    };
    if last.version == health.version {
        return;
    }
    match record.version_since {
        Some(since) if now.saturating_duration_since(since) < hold => {
            health.version.clone_from(&last.version);
        }
        _ => record.version_since = Some(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Role;

    const HOLD: Duration = Duration::from_secs(2);

    fn healthy() -> Outcome {
        answer(Role::Active, "1.17.2")
    }
    fn answer(role: Role, version: &str) -> Outcome {
        Outcome::Healthy(Health {
            role,
            initialized: true,
            sealed: role == Role::Sealed,
            version: version.into(),
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
                .map(|o| tracker.record("uid", o, threshold, Instant::now(), HOLD))
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
        tracker.record("a", failed(), 2, Instant::now(), HOLD);
        assert!(matches!(
            tracker.record("b", failed(), 2, Instant::now(), HOLD),
            Verdict::Failing { .. }
        ));
        tracker.retain(&["b"]);
        assert!(
            matches!(
                tracker.record("a", failed(), 2, Instant::now(), HOLD),
                Verdict::Failing { .. }
            ),
            "a starts over"
        );
    }

    #[test]
    fn a_version_changes_at_most_once_per_hold_and_the_role_at_once() {
        // (ms after the first answer, answered role and version, expected role and version)
        let cases = [
            (0, Role::Active, "1.17.2", Role::Active, "1.17.2"),
            (100, Role::Active, "garbage-1", Role::Active, "1.17.2"),
            (300, Role::Sealed, "garbage-2", Role::Sealed, "1.17.2"),
            (1999, Role::Active, "garbage-3", Role::Active, "1.17.2"),
            (2000, Role::Active, "garbage-4", Role::Active, "garbage-4"),
            (2100, Role::Standby, "garbage-5", Role::Standby, "garbage-4"),
            (4000, Role::Standby, "1.17.2", Role::Standby, "1.17.2"),
            (4100, Role::Standby, "1.17.2", Role::Standby, "1.17.2"),
        ];
        let start = Instant::now();
        let mut tracker = Tracker::default();
        for (ms, role, version, want_role, want_version) in cases {
            let now = start + Duration::from_millis(ms);
            let verdict = tracker.record("uid", answer(role, version), 2, now, HOLD);
            let Verdict::Healthy(h) = verdict else {
                panic!("{ms}: {verdict:?}")
            };
            assert_eq!(
                (h.role, h.version.as_str()),
                (want_role, want_version),
                "{ms} ms"
            );
        }
    }
}
