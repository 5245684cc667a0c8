//! When a cluster is probed, and how much of it. A full round probes every pod once per
//! interval. Between full rounds, a settled cluster has only its active pod probed, every
//! `activeInterval`: a step-down or seal makes the active pod stop answering 200 about
//! 0.6 s before another pod starts, so the change is seen while it happens. Once anything
//! changes, full rounds follow each other quickly (a burst) until the cluster settles
//! again, so the new active pod is labelled within a round of its first 200. A cluster
//! that stays unsettled (all sealed, say) falls back to the slower pace after the burst.

use std::time::{Duration, Instant};

/// Full rounds this far apart while a change is under way.
pub const BURST_PERIOD: Duration = Duration::from_millis(100);
/// How long a burst lasts after the last change.
pub const BURST_LENGTH: Duration = Duration::from_secs(10);

/// What the rhythm remembers of a cluster between rounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rhythm {
    /// When the next full round is due.
    pub full_due: Instant,
    /// When the cluster last changed; None while it is settled.
    pub changed_at: Option<Instant>,
    /// What the pods looked like in the cache at the last full round.
    pub pods: u64,
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

/// The round to run now. `active` is the pod labelled active whose last answer was
/// active; `pods` the signature of the cluster's pods in the cache.
pub fn round(rhythm: Option<&Rhythm>, now: Instant, active: Option<&str>, pods: u64) -> Round {
    match (rhythm, active) {
        (Some(r), Some(pod)) if r.changed_at.is_none() && now < r.full_due && r.pods == pods => {
            Round::Sentinel(pod.to_string())
        }
        _ => Round::Full,
    }
}

/// The rhythm after a full round, and how long until the next round. `settled`: exactly
/// one pod is active and labelled so, and nothing changed since the previous round.
pub fn after_full(
    previous: Option<&Rhythm>,
    now: Instant,
    settled: bool,
    pods: u64,
    interval: Duration,
    active_interval: Duration,
) -> (Rhythm, Duration) {
    let changed_at = match (settled, previous.and_then(|r| r.changed_at)) {
        (true, _) => None,
        (false, Some(at)) => Some(at),
        (false, None) => Some(now),
    };
    let wait = match changed_at {
        None => active_interval.min(interval),
        Some(at) if now.duration_since(at) < BURST_LENGTH => BURST_PERIOD,
        Some(_) => (interval / 4).max(Duration::from_millis(200)),
    };
    let rhythm = Rhythm {
        full_due: now + interval,
        changed_at,
        pods,
    };
    (rhythm, wait)
}

/// How long until the next round after a sentinel that found the active pod unchanged.
pub fn after_sentinel(rhythm: &Rhythm, now: Instant, active_interval: Duration) -> Duration {
    active_interval.min(rhythm.full_due.saturating_duration_since(now))
}

/// A cheap signature of what a round reads of the pods: a change means a full round.
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

    #[test]
    fn rounds_between_full_rounds_probe_the_settled_active_pod() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let settled = Rhythm {
            full_due: ms(2000),
            changed_at: None,
            pods: 7,
        };
        let changing = Rhythm {
            changed_at: Some(t0),
            ..settled.clone()
        };
        let sentinel = Round::Sentinel("v0".into());
        // (case, rhythm, now, labelled active, pods signature, round)
        let cases = [
            ("first round", None, ms(0), Some("v0"), 7, Round::Full),
            (
                "settled, full not due",
                Some(&settled),
                ms(500),
                Some("v0"),
                7,
                sentinel.clone(),
            ),
            (
                "full round due",
                Some(&settled),
                ms(2000),
                Some("v0"),
                7,
                Round::Full,
            ),
            (
                "no active pod",
                Some(&settled),
                ms(500),
                None,
                7,
                Round::Full,
            ),
            (
                "pods changed in the cache",
                Some(&settled),
                ms(500),
                Some("v0"),
                8,
                Round::Full,
            ),
            (
                "a change under way",
                Some(&changing),
                ms(500),
                Some("v0"),
                7,
                Round::Full,
            ),
        ];
        for (case, rhythm, now, active, pods, want) in cases {
            assert_eq!(round(rhythm, now, active, pods), want, "{case}");
        }
    }

    #[test]
    fn a_change_brings_a_burst_that_ends() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let (r, wait) = after_full(None, t0, true, 1, INTERVAL, ACTIVE);
        assert_eq!((r.changed_at, wait), (None, ACTIVE), "settled: sentinels");
        let (r, wait) = after_full(Some(&r), t0 + s(1), false, 1, INTERVAL, ACTIVE);
        assert_eq!((r.changed_at, wait), (Some(t0 + s(1)), BURST_PERIOD));
        let (r, wait) = after_full(Some(&r), t0 + s(5), false, 1, INTERVAL, ACTIVE);
        assert_eq!(
            (r.changed_at, wait),
            (Some(t0 + s(1)), BURST_PERIOD),
            "burst goes on"
        );
        let (r, wait) = after_full(Some(&r), t0 + s(12), false, 1, INTERVAL, ACTIVE);
        assert_eq!(
            wait,
            Duration::from_millis(500),
            "after the burst: interval / 4"
        );
        let (r, wait) = after_full(Some(&r), t0 + s(13), true, 1, INTERVAL, ACTIVE);
        assert_eq!((r.changed_at, wait, r.full_due), (None, ACTIVE, t0 + s(15)));
        let (_, wait) = after_full(None, t0, true, 1, Duration::from_millis(300), ACTIVE);
        assert_eq!(
            wait,
            Duration::from_millis(300),
            "never slower than the interval"
        );
    }

    #[test]
    fn sentinels_stop_at_the_full_round() {
        let t0 = Instant::now();
        let r = Rhythm {
            full_due: t0 + Duration::from_millis(1800),
            changed_at: None,
            pods: 1,
        };
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
