//! When a cluster is probed, and how much of it. A full round probes every pod once per
//! interval. Between full rounds, a settled cluster has only its active pod probed, every
//! `activeInterval`: a step-down or seal makes the active pod stop answering 200 about
//! 0.6 s before another pod starts, so the change is seen while it happens. Once a round
//! sees a change and the cluster is not settled, full rounds follow each other quickly (a
//! burst) until it settles again, so the new active pod is labelled within a round of its
//! first 200. A cluster still without a settled active pod after the burst keeps full
//! rounds every `activeInterval`: Vault's election has no bound we know (14.4 s after a
//! SIGKILL under raft), and the label should follow it within a fast round whenever it
//! ends. A first round is no change: a thousand clusters starting together do not all
//! burst.
//!
//! Settled means what was written, not what was meant: a pod whose promotion was refused
//! is not the settled active pod, so the round after a failed write is a full one.

use std::time::{Duration, Instant};

use crate::decide::Written;

/// Full rounds this far apart while a change is under way.
pub const BURST_PERIOD: Duration = Duration::from_millis(100);
/// How long a burst lasts after the last change.
pub const BURST_LENGTH: Duration = Duration::from_secs(10);

/// What the rhythm remembers of a cluster between rounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rhythm {
    /// When the next full round is due.
    pub full_due: Instant,
    /// When a round last saw a change.
    pub changed_at: Option<Instant>,
    /// The pod that answers active and is labelled so, when it is the only one.
    pub active: Option<String>,
    /// The VaultCluster's generation at the last full round.
    pub generation: Option<i64>,
    /// The roles the last full round found (a signature).
    pub roles: u64,
}

/// What the next round is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Round {
    /// Probe every pod, decide, act, report.
    Full,
    /// Probe only this pod, the settled active one; anything but the same answer calls for
    /// a full round at once.
    Sentinel(String),
}

/// The round to run now. `dirty`: a watch reported a change of the cluster's pods or
/// Services since the last round.
pub fn round(rhythm: Option<&Rhythm>, now: Instant, generation: Option<i64>, dirty: bool) -> Round {
    match rhythm {
        Some(r) if !dirty && now < r.full_due && r.generation == generation => match &r.active {
            Some(pod) => Round::Sentinel(pod.clone()),
            None => Round::Full,
        },
        _ => Round::Full,
    }
}

/// What a full round found, for the rhythm.
#[derive(Clone, Debug)]
pub struct Found {
    /// The pod that answers active and is labelled so, when it is the only one (see
    /// `settled_active`).
    pub active: Option<String>,
    /// A signature of every pod's role.
    pub roles: u64,
    pub generation: Option<i64>,
}

/// The rhythm after a full round, and how long until the next round.
pub fn after_full(
    previous: Option<&Rhythm>,
    now: Instant,
    found: Found,
    interval: Duration,
    active_interval: Duration,
) -> (Rhythm, Duration) {
    let changed = previous.is_some_and(|r| r.roles != found.roles);
    let changed_at = if changed {
        Some(now)
    } else {
        previous.and_then(|r| r.changed_at)
    };
    let bursting = changed_at.is_some_and(|at| now.duration_since(at) < BURST_LENGTH);
    // Settled or not, never slower than the active interval: without an active pod the
    // next full round is what finds the new one.
    let wait = if bursting && found.active.is_none() {
        BURST_PERIOD
    } else {
        active_interval.min(interval)
    };
    let rhythm = Rhythm {
        full_due: now + interval,
        changed_at,
        active: found.active,
        generation: found.generation,
        roles: found.roles,
    };
    (rhythm, wait)
}

/// The pod a sentinel round may probe alone: the only pod answering active, labelled so by
/// a write that was made, with no write of the round left undone. After a refused or lost
/// write there is none, so the next round is a full one that retries it.
pub fn settled_active(written: &Written, claimants: &[String]) -> Option<String> {
    match claimants {
        [only] if written.complete && written.active.as_ref() == Some(only) => Some(only.clone()),
        _ => None,
    }
}

/// How long until the next round after a sentinel that found the active pod unchanged.
pub fn after_sentinel(rhythm: &Rhythm, now: Instant, active_interval: Duration) -> Duration {
    active_interval.min(rhythm.full_due.saturating_duration_since(now))
}

/// A cheap, stable signature of a sequence of strings.
pub fn signature<'a>(fields: impl Iterator<Item = &'a str>) -> u64 {
    // FNV-1a over the fields, each closed by a separator byte.
    fields.fold(0xcbf29ce484222325_u64, |h, field| {
        field
            .bytes()
            .chain(std::iter::once(0xff))
            .fold(h, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(2);
    const ACTIVE: Duration = Duration::from_millis(500);

    fn rhythm(full_due: Instant, settled: bool) -> Rhythm {
        Rhythm {
            full_due,
            changed_at: None,
            active: settled.then(|| "v0".to_string()),
            generation: Some(3),
            roles: 1,
        }
    }

    #[test]
    fn rounds_between_full_rounds_probe_the_settled_active_pod() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let settled = rhythm(ms(2000), true);
        let unsettled = rhythm(ms(2000), false);
        let sentinel = Round::Sentinel("v0".into());
        // (case, rhythm, now, generation, dirty, round)
        let cases = [
            ("first round", None, ms(0), Some(3), false, Round::Full),
            (
                "settled, full not due",
                Some(&settled),
                ms(500),
                Some(3),
                false,
                sentinel,
            ),
            (
                "full round due",
                Some(&settled),
                ms(2000),
                Some(3),
                false,
                Round::Full,
            ),
            (
                "pods or Services changed",
                Some(&settled),
                ms(500),
                Some(3),
                true,
                Round::Full,
            ),
            (
                "spec changed",
                Some(&settled),
                ms(500),
                Some(4),
                false,
                Round::Full,
            ),
            (
                "not settled",
                Some(&unsettled),
                ms(500),
                Some(3),
                false,
                Round::Full,
            ),
        ];
        for (case, rhythm, now, generation, dirty, want) in cases {
            assert_eq!(round(rhythm, now, generation, dirty), want, "{case}");
        }
    }

    #[test]
    fn a_change_brings_a_burst_until_settled_or_too_long() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let found = |settled: bool, roles| Found {
            active: settled.then(|| "v0".to_string()),
            roles,
            generation: Some(1),
        };
        let (r, wait) = after_full(None, t0, found(true, 1), INTERVAL, ACTIVE);
        assert_eq!((r.changed_at, wait), (None, ACTIVE), "settled: sentinels");
        let (first, wait) = after_full(None, t0, found(false, 1), INTERVAL, ACTIVE);
        assert_eq!(
            wait,
            Duration::from_millis(500),
            "a first round is no change"
        );
        assert_eq!(first.changed_at, None);
        let (r, wait) = after_full(Some(&r), t0 + s(1), found(false, 2), INTERVAL, ACTIVE);
        assert_eq!(
            (r.changed_at, wait),
            (Some(t0 + s(1)), BURST_PERIOD),
            "step-down seen"
        );
        let (r, wait) = after_full(Some(&r), t0 + s(5), found(false, 2), INTERVAL, ACTIVE);
        assert_eq!(wait, BURST_PERIOD, "the burst goes on while unsettled");
        let (r2, wait) = after_full(Some(&r), t0 + s(12), found(false, 2), INTERVAL, ACTIVE);
        assert_eq!(wait, ACTIVE, "after the burst: the active interval");
        let (r, wait) = after_full(Some(&r2), t0 + s(13), found(true, 3), INTERVAL, ACTIVE);
        assert_eq!(
            (r.active.is_some(), wait, r.full_due),
            (true, ACTIVE, t0 + s(15)),
            "settled again"
        );
        let (_, wait) = after_full(None, t0, found(true, 1), Duration::from_millis(300), ACTIVE);
        assert_eq!(
            wait,
            Duration::from_millis(300),
            "never slower than the interval"
        );
    }

    #[test]
    fn without_an_active_pod_rounds_stay_fast_after_the_burst() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let long = s(10);
        let found = |active: Option<&str>, roles| Found {
            active: active.map(String::from),
            roles,
            generation: Some(1),
        };
        let (quiet, _) = after_full(None, t0, found(None, 1), long, ACTIVE);
        let (changed, _) = after_full(Some(&quiet), t0 + s(1), found(None, 2), long, ACTIVE);
        // (case, rhythm before, seconds after t0, found, wait)
        let cases = [
            ("first round, none active", None, 0, found(None, 1), ACTIVE),
            ("change seen", Some(&quiet), 1, found(None, 2), BURST_PERIOD),
            (
                "burst goes on",
                Some(&changed),
                9,
                found(None, 2),
                BURST_PERIOD,
            ),
            (
                "burst over, none active",
                Some(&changed),
                12,
                found(None, 2),
                ACTIVE,
            ),
            (
                "a minute on, none active",
                Some(&changed),
                61,
                found(None, 2),
                ACTIVE,
            ),
            ("settled", Some(&changed), 12, found(Some("v0"), 3), ACTIVE),
        ];
        for (case, before, at, found, want) in cases {
            let (_, wait) = after_full(before, t0 + s(at), found, long, ACTIVE);
            assert_eq!(wait, want, "{case}");
        }
    }

    #[test]
    fn only_a_written_sole_active_pod_is_settled() {
        let written = |active: Option<&str>, complete| Written {
            active: active.map(String::from),
            complete,
        };
        let one = vec!["v0".to_string()];
        let two = vec!["v0".to_string(), "v1".to_string()];
        // (case, written, claimants, settled)
        let cases = [
            (
                "labelled and answering",
                written(Some("v0"), true),
                &one,
                Some("v0"),
            ),
            ("promotion refused", written(None, false), &one, None),
            (
                "promotion written, a later write failed",
                written(Some("v0"), false),
                &one,
                None,
            ),
            (
                "label left on a pod no longer active",
                written(Some("v1"), true),
                &one,
                None,
            ),
            ("two claimants", written(Some("v0"), true), &two, None),
            ("no claimant", written(Some("v0"), true), &vec![], None),
        ];
        for (case, written, claimants, want) in cases {
            assert_eq!(
                settled_active(&written, claimants).as_deref(),
                want,
                "{case}"
            );
        }
    }

    #[test]
    fn sentinels_stop_at_the_full_round() {
        let t0 = Instant::now();
        let r = rhythm(t0 + Duration::from_millis(1800), true);
        assert_eq!(after_sentinel(&r, t0, ACTIVE), ACTIVE);
        let late = t0 + Duration::from_millis(1600);
        assert_eq!(after_sentinel(&r, late, ACTIVE), Duration::from_millis(200));
    }

    #[test]
    fn signatures_tell_fields_apart() {
        let sig = |f: &[&str]| signature(f.iter().copied());
        assert_eq!(sig(&["a", "b"]), sig(&["a", "b"]));
        assert_ne!(sig(&["a", "b"]), sig(&["ab", ""]));
        assert_ne!(sig(&["a", "b"]), sig(&["b", "a"]));
    }
}
