//! The pure part of leader election: the timing settings and their validation, and the
//! decisions a replica makes from what it observed of the Lease. Time here is always this
//! process's monotonic clock; another replica's wall clock (the Lease's `renewTime`) is only
//! ever compared for equality, never subtracted, so skewed clocks cannot cause a takeover.

use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;

/// How long a Lease holds, how long a leader keeps writing without a renewal, and how often
/// replicas try. The names and defaults are those of Kubernetes' own components.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimingError {
    #[error(
        "--leader-elect-lease-duration ({0:?}) must be at least 1s: the Lease stores whole seconds"
    )]
    LeaseTooShort(Duration),
    #[error(
        "--leader-elect-renew-deadline ({renew:?}) must be less than --leader-elect-lease-duration ({lease:?}), so a leader stops writing before anyone may take over"
    )]
    RenewNotBelowLease { renew: Duration, lease: Duration },
    #[error(
        "--leader-elect-retry-period ({retry:?}) must be less than --leader-elect-renew-deadline ({renew:?}), so a leader gets more than one try to renew"
    )]
    RetryNotBelowRenew { retry: Duration, renew: Duration },
    #[error("--leader-elect-retry-period must be greater than zero")]
    ZeroRetry,
}

impl Timing {
    /// Validates the three settings. A renew deadline or retry period left out defaults to
    /// 2/3 and 2/15 of the lease duration: 10s and 2s for the default 15s, as in Kubernetes.
    pub fn new(
        lease_duration: Duration,
        renew_deadline: Option<Duration>,
        retry_period: Option<Duration>,
    ) -> Result<Self, TimingError> {
        let renew = renew_deadline.unwrap_or(lease_duration * 2 / 3);
        let retry = retry_period.unwrap_or(lease_duration * 2 / 15);
        if lease_duration < Duration::from_secs(1) {
            return Err(TimingError::LeaseTooShort(lease_duration));
        }
        if renew >= lease_duration {
            return Err(TimingError::RenewNotBelowLease {
                renew,
                lease: lease_duration,
            });
        }
        if retry.is_zero() {
            return Err(TimingError::ZeroRetry);
        }
        if retry >= renew {
            return Err(TimingError::RetryNotBelowRenew { retry, renew });
        }
        Ok(Self {
            lease_duration,
            renew_deadline: renew,
            retry_period: retry,
        })
    }

    /// The Lease's `leaseDurationSeconds`, rounded up so others never wait too little.
    pub fn lease_seconds(&self) -> i32 {
        self.lease_duration.as_secs_f64().ceil() as i32
    }
}

/// The parts of a Lease whose change proves its holder alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Empty when nobody holds the Lease.
    pub holder: String,
    pub renew_time: Option<Timestamp>,
    pub transitions: i32,
    /// How long the holder asked others to wait after its last renewal.
    pub duration: Duration,
}

/// A record together with when this process first saw it in this form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub record: Record,
    pub since: Instant,
}

/// Folds a fresh read of the Lease into what was observed: the clock restarts only when the
/// record changed, as client-go's leader election does.
pub fn observe(previous: Option<&Observed>, record: Record, now: Instant) -> Observed {
    match previous {
        Some(p) if p.record == record => Observed {
            record,
            since: p.since,
        },
        _ => Observed { record, since: now },
    }
}

/// Whether `me` may write the Lease: it is free, ours, or unchanged for a whole lease
/// duration of our own clock.
pub fn may_take(seen: &Observed, me: &str, now: Instant) -> bool {
    let r = &seen.record;
    r.holder.is_empty() || r.holder == me || now >= seen.since + r.duration
}

/// When a follower should look again: after the retry period, or when the Lease would
/// expire, whichever comes first.
pub fn next_try(seen: Option<&Observed>, retry: Duration, now: Instant) -> Instant {
    let regular = now + retry;
    match seen {
        Some(s) if !s.record.holder.is_empty() => {
            regular.min((s.since + s.record.duration).max(now))
        }
        _ => regular,
    }
}

/// Whether a leader last renewed (by the time it *sent* the renewal) too long ago to write.
pub fn overdue(last_renewal: Option<Instant>, renew_deadline: Duration, now: Instant) -> bool {
    last_renewal.is_some_and(|at| now.saturating_duration_since(at) >= renew_deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn timing_is_validated_with_the_flag_names() {
        let ms = Duration::from_millis;
        let cases = [
            ("defaults", S(15), None, None, Ok((S(10), S(2)))),
            ("derived from 4s", S(4), None, None, Ok((ms(2666), ms(533)))),
            ("explicit", S(6), Some(S(4)), Some(S(1)), Ok((S(4), S(1)))),
            (
                "renew equal to lease",
                S(10),
                Some(S(10)),
                Some(S(1)),
                Err("--leader-elect-renew-deadline"),
            ),
            (
                "retry above renew",
                S(15),
                Some(S(3)),
                Some(S(5)),
                Err("--leader-elect-retry-period"),
            ),
            (
                "zero retry",
                S(15),
                None,
                Some(S(0)),
                Err("greater than zero"),
            ),
            ("too short", ms(500), None, None, Err("at least 1s")),
        ];
        for (name, lease, renew, retry, want) in cases {
            let got = Timing::new(lease, renew, retry);
            match (got, want) {
                (Ok(t), Ok((r, p))) => {
                    assert_eq!(t.renew_deadline.as_millis(), r.as_millis(), "{name}");
                    assert_eq!(t.retry_period.as_millis(), p.as_millis(), "{name}");
                }
                (Err(e), Err(text)) => assert!(e.to_string().contains(text), "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    fn record(holder: &str, renewed: i64) -> Record {
        Record {
            holder: holder.into(),
            renew_time: Some(Timestamp::from_second(renewed).unwrap()),
            transitions: 1,
            duration: S(10),
        }
    }

    #[test]
    fn expiry_is_timed_from_our_own_observation() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + S(s);
        // (name, previous observation, fresh record, now, may take)
        let cases = [
            (
                "first sight of a held lease",
                None,
                record("other", 0),
                at(100),
                false,
            ),
            (
                "holder's clock far behind: still fresh to us",
                None,
                record("other", -1_000_000),
                at(0),
                false,
            ),
            (
                "unchanged for less than the duration",
                Some((record("other", 5), at(0))),
                record("other", 5),
                at(9),
                false,
            ),
            (
                "unchanged for the whole duration",
                Some((record("other", 5), at(0))),
                record("other", 5),
                at(10),
                true,
            ),
            (
                "renewed just now: clock restarts",
                Some((record("other", 5), at(0))),
                record("other", 7),
                at(12),
                false,
            ),
            (
                "holder's clock runs far ahead but stopped renewing",
                Some((record("other", 1_000_000), at(0))),
                record("other", 1_000_000),
                at(11),
                true,
            ),
            ("free", None, record("", 5), at(0), true),
            ("ours", None, record("me", 5), at(0), true),
        ];
        for (name, previous, fresh, now, want) in cases {
            let previous = previous.map(|(record, since)| Observed { record, since });
            let seen = observe(previous.as_ref(), fresh, now);
            assert_eq!(may_take(&seen, "me", now), want, "{name}");
        }
    }

    #[test]
    fn transitions_count_as_a_change() {
        let t0 = Instant::now();
        let mut changed = record("other", 5);
        changed.transitions = 2;
        let first = observe(None, record("other", 5), t0);
        let second = observe(Some(&first), changed, t0 + S(8));
        assert_eq!(second.since, t0 + S(8));
        assert!(!may_take(&second, "me", t0 + S(12)));
    }

    #[test]
    fn followers_wake_at_expiry_or_retry() {
        let t0 = Instant::now();
        let seen = Observed {
            record: record("other", 0),
            since: t0,
        };
        let free = Observed {
            record: record("", 0),
            since: t0,
        };
        let cases = [
            ("far from expiry", Some(&seen), t0 + S(1), t0 + S(3)),
            ("expiry before retry", Some(&seen), t0 + S(9), t0 + S(10)),
            ("already expired", Some(&seen), t0 + S(11), t0 + S(11)),
            ("free lease", Some(&free), t0 + S(9), t0 + S(11)),
            ("nothing seen", None, t0, t0 + S(2)),
        ];
        for (name, seen, now, want) in cases {
            assert_eq!(next_try(seen, S(2), now), want, "{name}");
        }
    }

    #[test]
    fn a_leader_is_overdue_at_the_renew_deadline() {
        let t0 = Instant::now();
        let cases = [
            ("never renewed", None, t0 + S(100), false),
            ("renewed recently", Some(t0), t0 + S(9), false),
            ("deadline reached", Some(t0), t0 + S(10), true),
            ("long ago", Some(t0), t0 + S(60), true),
        ];
        for (name, last, now, want) in cases {
            assert_eq!(overdue(last, S(10), now), want, "{name}");
        }
    }
}
