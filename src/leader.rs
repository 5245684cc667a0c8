//! Leader election on a coordination.k8s.io Lease, so that of several replicas only one
//! writes. A follower only reads the Lease; a leader that cannot renew in time stops writing
//! at once, before anyone else may take over.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// How long a Lease holds without renewal.
    pub duration: Duration,
}

impl LeaseSettings {
    /// A leader that has not renewed for this long stops writing: well inside `duration`.
    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }
    fn retry_period(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(200))
    }
}

/// What the Lease says, reduced to what the decision needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Holder {
    pub identity: Option<String>,
    pub renewed: Option<Timestamp>,
    pub duration: Duration,
}

/// Whether `me` may write the Lease now: it is free, ours, or expired.
pub fn may_take(holder: &Holder, me: &str, now: Timestamp) -> bool {
    match (&holder.identity, holder.renewed) {
        (None, _) => true,
        (Some(id), _) if id == me || id.is_empty() => true,
        (Some(_), None) => true,
        (Some(_), Some(renewed)) => {
            let expires = renewed
                + k8s_openapi::jiff::SignedDuration::try_from(holder.duration).unwrap_or_default();
            now >= expires
        }
    }
}

fn holder_of(lease: &Lease) -> Holder {
    let spec = lease.spec.clone().unwrap_or_default();
    Holder {
        identity: spec.holder_identity,
        renewed: spec.renew_time.map(|t| t.0),
        duration: Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64),
    }
}

/// Campaigns forever. While this process holds the Lease, `leading` is true and `work`
/// runs; losing it clears `leading` first and then aborts `work`.
pub async fn run<F, Fut>(
    client: kube::Client,
    settings: LeaseSettings,
    leading: Arc<AtomicBool>,
    gauge: prometheus::IntGauge,
    work: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let mut task: Option<tokio::task::JoinHandle<()>> = None;
    let mut last_renew = Instant::now();
    loop {
        let held = task.is_some();
        match try_acquire_or_renew(&api, &settings).await {
            Ok(true) => {
                last_renew = Instant::now();
                if !held {
                    info!(identity = %settings.identity, lease = %settings.name, "became leader");
                    leading.store(true, Ordering::SeqCst);
                    gauge.set(1);
                    task = Some(tokio::spawn(work()));
                }
            }
            Ok(false) if held => {
                step_down(&leading, &gauge, &mut task, "another holder has the lease")
            }
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, "lease request failed");
                if held && last_renew.elapsed() >= settings.renew_deadline() {
                    step_down(
                        &leading,
                        &gauge,
                        &mut task,
                        "could not renew within the deadline",
                    );
                }
            }
        }
        tokio::time::sleep(settings.retry_period()).await;
    }
}

fn step_down(
    leading: &AtomicBool,
    gauge: &prometheus::IntGauge,
    task: &mut Option<tokio::task::JoinHandle<()>>,
    why: &str,
) {
    leading.store(false, Ordering::SeqCst);
    gauge.set(0);
    if let Some(t) = task.take() {
        t.abort();
    }
    warn!(why, "stopped leading");
}

/// One round: read the Lease and write it only when we hold it or may take it.
async fn try_acquire_or_renew(api: &Api<Lease>, s: &LeaseSettings) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(s.identity.clone()),
        lease_duration_seconds: Some(s.duration.as_secs().max(1) as i32),
        acquire_time: acquired.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let Some(mut lease) = api.get_opt(&s.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(s.name.clone()),
                ..Default::default()
            },
            spec: Some(spec(0, None)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let holder = holder_of(&lease);
    if !may_take(&holder, &s.identity, now) {
        return Ok(false);
    }
    let current = lease.spec.clone().unwrap_or_default();
    let ours = holder.identity.as_deref() == Some(s.identity.as_str());
    let transitions = current.lease_transitions.unwrap_or(0) + if ours { 0 } else { 1 };
    lease.spec = Some(spec(
        transitions,
        if ours { current.acquire_time } else { None },
    ));
    // The resourceVersion from the read makes this a compare-and-swap: of two contenders
    // for an expired Lease, one gets 409 Conflict.
    match api.replace(&s.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up on shutdown so a successor need not wait for it to expire.
pub async fn release(client: kube::Client, settings: &LeaseSettings) {
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    if let Ok(Some(mut lease)) = api.get_opt(&settings.name).await {
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() == Some(settings.identity.as_str()) {
            spec.holder_identity = None;
            spec.renew_time = None;
            let _ = api
                .replace(&settings.name, &PostParams::default(), &lease)
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_may_take_the_lease() {
        let t = |s: i64| Timestamp::from_second(s).unwrap();
        let held = |id: &str, at: i64| Holder {
            identity: Some(id.into()),
            renewed: Some(t(at)),
            duration: Duration::from_secs(10),
        };
        let cases = [
            (
                "free",
                Holder {
                    identity: None,
                    renewed: None,
                    duration: Duration::from_secs(10),
                },
                100,
                true,
            ),
            ("ours", held("me", 95), 100, true),
            ("other, fresh", held("other", 95), 100, false),
            ("other, just expired", held("other", 90), 100, true),
            (
                "other, one second before expiry",
                held("other", 91),
                100,
                false,
            ),
            ("released", held("", 99), 100, true),
        ];
        for (name, holder, now, expected) in cases {
            assert_eq!(may_take(&holder, "me", t(now)), expected, "{name}");
        }
    }
}
