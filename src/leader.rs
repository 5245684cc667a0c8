//! Leader election on a coordination.k8s.io Lease, so that of several replicas only one
//! writes. A follower only reads the Lease. A leader that has not renewed within the renew
//! deadline stops writing at once, whatever its requests in flight are doing: a watchdog
//! clears `leading` and aborts the work, well before anyone else may take over. The
//! decisions themselves are pure, in `lease`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::health_state::HealthState;
use crate::lease::{Observed, Record, Timing, may_take, next_try, observe, overdue};
use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub timing: Timing,
}

/// The longest a leader on its way out waits for the work in flight to finish.
const DRAIN_BOUND: Duration = Duration::from_secs(5);

/// How often the watchdog looks at the renew deadline.
const WATCHDOG_TICK: Duration = Duration::from_millis(50);

/// Why the election stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("the controller stopped while this replica was leading")]
    WorkEnded,
}

/// This replica's term as leader: what the rest of the process sees (`leading`, the metrics)
/// and what the watchdog needs to end it (the last renewal, the work).
pub struct Leadership {
    leading: Arc<AtomicBool>,
    metrics: Metrics,
    renew_deadline: Duration,
    term: Mutex<Term>,
}

#[derive(Default)]
struct Term {
    /// When the last successful renewal was *sent*.
    renewed: Option<Instant>,
    work: Option<JoinHandle<()>>,
}

impl Leadership {
    pub fn new(leading: Arc<AtomicBool>, metrics: Metrics, renew_deadline: Duration) -> Arc<Self> {
        Arc::new(Self {
            leading,
            metrics,
            renew_deadline,
            term: Mutex::new(Term::default()),
        })
    }

    pub fn is_leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// The moment this term ends unless renewed.
    fn deadline(&self) -> Option<Instant> {
        self.term
            .lock()
            .unwrap()
            .renewed
            .map(|at| at + self.renew_deadline)
    }

    /// Records a successful round sent at `sent`; starts the work when not yet leading.
    /// A success that comes back after its own deadline does not count.
    fn held<F: FnOnce() -> JoinHandle<()>>(&self, sent: Instant, start: F) {
        if overdue(Some(sent), self.renew_deadline, Instant::now()) {
            return;
        }
        let mut term = self.term.lock().unwrap();
        term.renewed = Some(sent);
        if !self.leading.load(Ordering::SeqCst) {
            info!("became leader");
            self.leading.store(true, Ordering::SeqCst);
            self.metrics.leader.set(1);
            term.work = Some(start());
        }
    }

    /// Stops writing first, then aborts the work.
    pub fn step_down(&self, why: &str) {
        let was = self.leading.swap(false, Ordering::SeqCst);
        let mut term = self.term.lock().unwrap();
        term.renewed = None;
        if let Some(work) = term.work.take() {
            work.abort();
        }
        // What this term saw of the clusters is no longer watched: a follower shows none,
        // by the time its gauge says it follows.
        self.metrics.forget_clusters();
        self.metrics.leader.set(0);
        if was {
            warn!(why, "stopped leading");
        }
    }

    /// Steps down when the renew deadline has passed; true when it did.
    fn enforce_deadline(&self, now: Instant) -> bool {
        let renewed = self.term.lock().unwrap().renewed;
        if self.is_leading() && overdue(renewed, self.renew_deadline, now) {
            self.step_down("could not renew the lease within the renew deadline");
            return true;
        }
        false
    }

    fn work_ended(&self) -> bool {
        let term = self.term.lock().unwrap();
        term.work.as_ref().is_some_and(|w| w.is_finished())
    }

    /// Waits, bounded, for the work to finish on its own (the controller drains on SIGTERM).
    async fn drain(&self, bound: Duration) {
        let until = Instant::now() + bound;
        while self.is_leading() && !self.work_ended() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Ends a term at its renew deadline even while the election loop waits on a request.
pub async fn watchdog(leadership: Arc<Leadership>) {
    loop {
        tokio::time::sleep(WATCHDOG_TICK).await;
        leadership.enforce_deadline(Instant::now());
    }
}

/// The clients the election uses: `lease` has timeouts shorter than the renew deadline;
/// `watch` serves the long-lived watch of the Lease.
pub struct Clients {
    pub lease: kube::Client,
    pub watch: kube::Client,
}

/// Campaigns until `shutdown` resolves. While this replica leads, `work` runs. On shutdown
/// the leader lets the work drain (bounded), stops leading and releases the Lease
/// (bounded), so a follower can take over at once.
pub async fn run<F, Fut>(
    clients: Clients,
    settings: LeaseSettings,
    leadership: Arc<Leadership>,
    health: Arc<HealthState>,
    work: F,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ElectionError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let api: Api<Lease> = Api::namespaced(clients.lease, &settings.namespace);
    let changed = Arc::new(Notify::new());
    let watch = tokio::spawn(watch_lease(
        Api::namespaced(clients.watch, &settings.namespace),
        settings.name.clone(),
        changed.clone(),
    ));
    let dog = tokio::spawn(watchdog(leadership.clone()));
    let mut campaign = Campaign {
        api,
        settings,
        leadership,
        health,
        seen: None,
    };
    let outcome = campaign.until(&work, shutdown, &changed).await;
    watch.abort();
    campaign.finish().await;
    dog.abort();
    outcome
}

struct Campaign {
    api: Api<Lease>,
    settings: LeaseSettings,
    leadership: Arc<Leadership>,
    health: Arc<HealthState>,
    seen: Option<Observed>,
}

impl Campaign {
    async fn until<F, Fut>(
        &mut self,
        work: &F,
        shutdown: impl Future<Output = ()>,
        changed: &Notify,
    ) -> Result<(), ElectionError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut shutdown = std::pin::pin!(shutdown);
        let timing = self.settings.timing;
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => return Ok(()),
                _ = self.round(work) => {}
            }
            crate::fault::stall_if_fired().await;
            self.health.beat();
            if self.leadership.is_leading() && self.leadership.work_ended() {
                return Err(ElectionError::WorkEnded);
            }
            let leading = self.leadership.is_leading();
            let wake = if leading {
                Instant::now() + timing.retry_period
            } else {
                next_try(self.seen.as_ref(), timing.retry_period, Instant::now())
            };
            tokio::select! {
                biased;
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep_until(wake.into()) => {}
                // A follower looks at once when the Lease changes, e.g. when it is released.
                _ = changed.notified(), if !leading => {}
            }
        }
    }

    /// One bounded round: read the Lease, write it when we hold it or may take it.
    async fn round<F, Fut>(&mut self, work: &F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // Taken before anything is sent: the renewal counts from here, never later.
        let sent = Instant::now();
        let wall = Timestamp::now();
        let deadline = self
            .leadership
            .deadline()
            .unwrap_or(sent + self.settings.timing.renew_deadline);
        let result = tokio::time::timeout_at(deadline.into(), self.acquire_or_renew(wall)).await;
        match result {
            Ok(Ok(held)) => {
                self.health.api_answered();
                if held {
                    self.leadership.held(sent, || tokio::spawn(work()));
                } else if self.leadership.is_leading() {
                    self.leadership.step_down("another replica holds the lease");
                }
            }
            Ok(Err(e)) => warn!(error = %e, lease = %self.settings.name, "lease request failed"),
            Err(_) => warn!(lease = %self.settings.name, "lease request did not answer in time"),
        }
        self.leadership.enforce_deadline(Instant::now());
    }

    async fn acquire_or_renew(&mut self, wall: Timestamp) -> Result<bool, kube::Error> {
        let s = &self.settings;
        let Some(mut lease) = self.api.get_opt(&s.name).await? else {
            return self.create(wall).await;
        };
        let current = lease.spec.clone().unwrap_or_default();
        let seen = observe(self.seen.as_ref(), record_of(&current), Instant::now());
        let allowed = may_take(&seen, &s.identity, Instant::now());
        let ours = seen.record.holder == s.identity;
        self.seen = Some(seen);
        if !allowed {
            return Ok(false);
        }
        let transitions = current.lease_transitions.unwrap_or(0) + if ours { 0 } else { 1 };
        let acquired = if ours { current.acquire_time } else { None };
        lease.spec = Some(self.spec(wall, transitions, acquired));
        // The resourceVersion from the read makes this a compare-and-swap: of two contenders
        // for an expired Lease, one gets 409 Conflict.
        match self
            .api
            .replace(&s.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn create(&self, wall: Timestamp) -> Result<bool, kube::Error> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.settings.name.clone()),
                ..Default::default()
            },
            spec: Some(self.spec(wall, 0, None)),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn spec(&self, wall: Timestamp, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(self.settings.timing.lease_seconds()),
            acquire_time: acquired.or(Some(MicroTime(wall))),
            renew_time: Some(MicroTime(wall)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// On the way out: drain, stop leading, release.
    async fn finish(&self) {
        if self.leadership.is_leading() {
            info!("shutting down: letting the work in flight finish");
            let left = self
                .leadership
                .deadline()
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or_default();
            self.leadership.drain(left.min(DRAIN_BOUND)).await;
        }
        self.leadership.step_down("shutting down");
        let bound = self
            .settings
            .timing
            .retry_period
            .max(Duration::from_secs(1));
        match tokio::time::timeout(bound, release(&self.api, &self.settings)).await {
            Ok(Ok(true)) => info!(lease = %self.settings.name, "lease released"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warn!(error = %e, "releasing the lease failed"),
            Err(_) => warn!(?bound, "releasing the lease did not finish in time"),
        }
    }
}

fn record_of(spec: &LeaseSpec) -> Record {
    Record {
        holder: spec.holder_identity.clone().unwrap_or_default(),
        renew_time: spec.renew_time.as_ref().map(|t| t.0),
        transitions: spec.lease_transitions.unwrap_or(0),
        duration: Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64),
    }
}

/// Gives the Lease up so a successor need not wait for it to expire; true when released.
async fn release(api: &Api<Lease>, settings: &LeaseSettings) -> Result<bool, kube::Error> {
    let Some(mut lease) = api.get_opt(&settings.name).await? else {
        return Ok(false);
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
        return Ok(false);
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    api.replace(&settings.name, &PostParams::default(), &lease)
        .await?;
    Ok(true)
}

/// Wakes the campaign whenever the Lease changes. Without the right to watch, followers
/// still poll every retry period.
async fn watch_lease(api: Api<Lease>, name: String, changed: Arc<Notify>) {
    let config = crate::apiclient::watch_config().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    let mut warned = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(_) => changed.notify_one(),
            Err(e) if !warned => {
                warned = true;
                warn!(error = %e, "watching the lease failed; followers poll meanwhile");
            }
            Err(e) => debug!(error = %e, "watching the lease failed"),
        }
    }
}
