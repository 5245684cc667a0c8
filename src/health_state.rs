//! What /readyz and /healthz answer. Ready: the API server answered recently and, on the
//! leader, the caches are synced. Alive: the loops that must keep turning did, and the API
//! server answered at all within the start-up bound, so a replica hung at start-up is
//! restarted by the kubelet instead of reporting ok forever.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Bounds that turn the observed times into verdicts.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The API server must have answered within this for readiness.
    pub api_fresh: Duration,
    /// The election or ping loop must have turned within this for liveness.
    pub stall: Duration,
    /// The API server must have answered once within this after start, for liveness.
    pub startup: Duration,
}

/// The times and flags the verdicts depend on, at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    pub started: Instant,
    pub api_answered: Option<Instant>,
    pub heartbeat: Instant,
    pub leading: bool,
    pub synced: bool,
}

/// Readiness: Err says why not.
pub fn readiness(s: &Snapshot, limits: &Limits, now: Instant) -> Result<(), String> {
    match s.api_answered {
        None => return Err("API server has not answered yet".into()),
        Some(at) if now.saturating_duration_since(at) > limits.api_fresh => {
            return Err(format!(
                "API server has not answered for {:?}",
                now.saturating_duration_since(at)
            ));
        }
        Some(_) => {}
    }
    if s.leading && !s.synced {
        return Err("leading, caches not synced yet".into());
    }
    Ok(())
}

/// Liveness: Err says what is stuck.
pub fn liveness(s: &Snapshot, limits: &Limits, now: Instant) -> Result<(), String> {
    let waited = now.saturating_duration_since(s.started);
    if s.api_answered.is_none() && waited > limits.startup {
        return Err(format!(
            "stuck in start-up: the API server has not answered in {waited:?}"
        ));
    }
    let quiet = now.saturating_duration_since(s.heartbeat);
    if quiet > limits.stall {
        return Err(format!("control loop stalled for {quiet:?}"));
    }
    Ok(())
}

/// The live state behind the probes, updated by the loops.
pub struct HealthState {
    limits: Limits,
    started: Instant,
    api_answered: Mutex<Option<Instant>>,
    heartbeat: Mutex<Instant>,
    synced: AtomicBool,
    leading: std::sync::Arc<AtomicBool>,
}

impl HealthState {
    pub fn new(limits: Limits, leading: std::sync::Arc<AtomicBool>) -> Self {
        let now = Instant::now();
        Self {
            limits,
            started: now,
            api_answered: Mutex::new(None),
            heartbeat: Mutex::new(now),
            synced: AtomicBool::new(false),
            leading,
        }
    }

    pub fn api_answered(&self) {
        *self.api_answered.lock().unwrap() = Some(Instant::now());
    }

    pub fn has_answered(&self) -> bool {
        self.api_answered.lock().unwrap().is_some()
    }

    /// A loop that must keep turning turned.
    pub fn beat(&self) {
        *self.heartbeat.lock().unwrap() = Instant::now();
    }

    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::SeqCst);
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            started: self.started,
            api_answered: *self.api_answered.lock().unwrap(),
            heartbeat: *self.heartbeat.lock().unwrap(),
            leading: self.leading.load(Ordering::SeqCst),
            synced: self.synced.load(Ordering::SeqCst),
        }
    }

    pub fn ready(&self) -> Result<(), String> {
        readiness(&self.snapshot(), &self.limits, Instant::now())
    }

    pub fn live(&self) -> Result<(), String> {
        liveness(&self.snapshot(), &self.limits, Instant::now())
    }
}

/// Asks the API server for its version every `period`, each ask bounded by `period`, and
/// records answers and turns. Runs until the process ends.
pub async fn ping_api(client: kube::Client, state: std::sync::Arc<HealthState>, period: Duration) {
    loop {
        crate::fault::stall_if_fired().await;
        let asked = tokio::time::timeout(period, client.apiserver_version()).await;
        match asked {
            Ok(Ok(_)) => state.api_answered(),
            Ok(Err(e)) => tracing::debug!(error = %e, "API server version request failed"),
            Err(_) => tracing::debug!(?period, "API server did not answer the version request"),
        }
        state.beat();
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        api_fresh: Duration::from_secs(15),
        stall: Duration::from_secs(30),
        startup: Duration::from_secs(60),
    };

    fn snap(
        t0: Instant,
        answered: Option<u64>,
        beat: u64,
        leading: bool,
        synced: bool,
    ) -> Snapshot {
        Snapshot {
            started: t0,
            api_answered: answered.map(|s| t0 + Duration::from_secs(s)),
            heartbeat: t0 + Duration::from_secs(beat),
            leading,
            synced,
        }
    }

    #[test]
    fn readiness_needs_a_recent_answer_and_synced_caches_when_leading() {
        let t0 = Instant::now();
        let cases = [
            ("never answered", snap(t0, None, 0, false, false), 1, false),
            (
                "follower, fresh answer",
                snap(t0, Some(10), 10, false, false),
                20,
                true,
            ),
            (
                "answer too old",
                snap(t0, Some(10), 30, false, false),
                30,
                false,
            ),
            (
                "leader not synced",
                snap(t0, Some(10), 10, true, false),
                11,
                false,
            ),
            (
                "leader synced",
                snap(t0, Some(10), 10, true, true),
                11,
                true,
            ),
        ];
        for (name, s, now, want) in cases {
            let got = readiness(&s, &LIMITS, t0 + Duration::from_secs(now));
            assert_eq!(got.is_ok(), want, "{name}: {got:?}");
        }
    }

    #[test]
    fn liveness_fails_when_stuck_in_start_up_or_stalled() {
        let t0 = Instant::now();
        let cases = [
            (
                "starting, within bound",
                snap(t0, None, 50, false, false),
                59,
                true,
            ),
            (
                "API silent since start",
                snap(t0, None, 61, false, false),
                61,
                false,
            ),
            (
                "running, loop turning",
                snap(t0, Some(5), 100, true, true),
                120,
                true,
            ),
            (
                "loop stalled",
                snap(t0, Some(5), 100, true, true),
                131,
                false,
            ),
            (
                "API silent later: not a liveness matter",
                snap(t0, Some(5), 300, false, false),
                300,
                true,
            ),
        ];
        for (name, s, now, want) in cases {
            let got = liveness(&s, &LIMITS, t0 + Duration::from_secs(now));
            assert_eq!(got.is_ok(), want, "{name}: {got:?}");
        }
    }
}
