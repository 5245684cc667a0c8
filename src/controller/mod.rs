//! The VaultCluster controller, along the pipeline of one round: `settings` (read the
//! references, validate), `observe` (pods from the caches, probes), decide (pure, in
//! `decide`, `fail_static`, `services`, `status`), `act` (pod labels, Services) and `report`
//! (status, events, metrics). `cache` keeps what a round reads, so a round reads no API.

mod act;
pub mod cache;
mod observe;
mod report;
mod rollout;
mod settings;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalized, finalizer};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};

use kube::{Client, ResourceExt};
use tracing::{info, warn};

use crate::crd::{FINALIZER, VaultCluster};
use crate::decide::decide;
use crate::error::Error;
use crate::fail_static;
use crate::labels::{LabelNames, diff, full_removal};
use crate::metrics::Metrics;
use crate::pod_view::PodView;
use crate::probe::Prober;
use crate::recorder::Recorder;
use crate::rhythm::{self, Rhythm, Round};
use crate::services;
use crate::status::written::StatusWrite;
use crate::status::{Observation, build};
use crate::tracker::Tracker;

use cache::{Caches, Kind};

/// Field manager for every write, so `managedFields` shows what we own.
pub const MANAGER: &str = "vault-registrar";

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    pub prober: Prober,
    pub metrics: Metrics,
    pub caches: Arc<Caches>,
    recorder: Recorder,
    trackers: Mutex<HashMap<String, Tracker>>,
    /// When each cluster (by UID) is probed next, and how much of it.
    rhythms: Mutex<HashMap<String, Rhythm>>,
    /// Clusters (by UID) whose pods or Services a watch reported changed since their last
    /// round: their next round is a full one.
    dirty: Mutex<std::collections::HashSet<String>>,
    /// Since when every pod of each cluster (by UID) has carried the ownership label, for
    /// the upgrade of Service selectors (see `services::owned_long_enough`).
    owned_since: Mutex<HashMap<String, Option<Instant>>>,
    /// Each cluster's (by UID) last status write: changes that can wait are written at
    /// most once per interval, and a round starts from it while the cache does not show it
    /// (see `status::written`).
    status_written: Mutex<HashMap<String, StatusWrite>>,
    /// Failed reconciles in a row per VaultCluster UID, and when the retry is due, for the
    /// backoff (see `Streak`).
    failures: Mutex<HashMap<String, Streak>>,
    /// VaultClusters (by UID) this term gave our finalizer: a reconcile that starts before
    /// the watch brings the patched object back must not add it again, which fails (422:
    /// the patch tests the finalizers it read) and retries.
    finalized: Mutex<std::collections::HashSet<String>>,
    /// Cleared the moment leadership is lost, before the controller is stopped.
    leading: Arc<AtomicBool>,
    /// Every watched scope (a namespace, or all): a round waits until each has listed.
    scopes: Vec<Option<String>>,
    /// What a VaultCluster's Services may ask for (`--allowed-service-types`,
    /// `--allowed-service-annotations`).
    allowed: services::Allowed,
    /// What this term remembers of each cluster's upgrade (see `rollout`).
    rollouts: rollout::Memory,
    /// The client that evicts (see `apiclient::eviction_client`); `client` when unset.
    evictions: std::sync::OnceLock<Client>,
}

impl Context {
    pub fn new(
        client: Client,
        prober: Prober,
        metrics: Metrics,
        leading: Arc<AtomicBool>,
        scopes: Vec<Option<String>>,
        allowed: services::Allowed,
    ) -> Arc<Self> {
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), MANAGER, std::env::var("POD_NAME").ok()),
            client,
            prober,
            metrics,
            caches: Arc::new(Caches::default()),
            trackers: Mutex::new(HashMap::new()),
            rhythms: Mutex::new(HashMap::new()),
            dirty: Mutex::new(std::collections::HashSet::new()),
            status_written: Mutex::new(HashMap::new()),
            owned_since: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            finalized: Mutex::default(),
            leading,
            scopes,
            allowed,
            rollouts: rollout::Memory::default(),
            evictions: std::sync::OnceLock::new(),
        })
    }

    /// Sets the client that evicts pods for `spec.upgrade`, once.
    pub fn set_eviction_client(&self, client: Client) {
        let _ = self.evictions.set(client);
    }

    fn guard(&self, what: &str) -> Result<(), Error> {
        if self.leading.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Error::NotLeader(what.into()))
        }
    }

    fn mark_dirty(&self, uid: &str) {
        self.dirty.lock().unwrap().insert(uid.to_string());
    }

    /// Starts a term: forgets every cache and every per-cluster memory of the previous
    /// one (trackers, rhythms, dirty marks, ownership clocks, written statuses, failure
    /// counts, metric series), so nothing a previous term saw decides in this one.
    pub fn new_term(&self) {
        self.caches.new_term();
        self.trackers.lock().unwrap().clear();
        self.rhythms.lock().unwrap().clear();
        self.dirty.lock().unwrap().clear();
        self.owned_since.lock().unwrap().clear();
        self.status_written.lock().unwrap().clear();
        self.failures.lock().unwrap().clear();
        self.finalized.lock().unwrap().clear();
        self.rollouts.clear();
        self.metrics.forget_clusters();
    }

    /// The watched scope a namespace's objects come from.
    fn scope_of(&self, ns: &str) -> Option<String> {
        if self.scopes.contains(&None) {
            None
        } else {
            Some(ns.to_string())
        }
    }

    /// Whether every cache has listed in every watched scope during this term.
    pub fn synced(&self) -> bool {
        self.caches.synced(&self.scopes)
    }

    /// Resolves once every cache has listed in every watched scope during this term.
    pub async fn clusters_synced(&self) {
        while !self.synced() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn api<K>(client: &Client, scope: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// How soon a reconcile that found the caches still listing comes back.
const UNSYNCED_RETRY: Duration = Duration::from_millis(100);

/// Buffer of reconcile triggers between the watch tasks and the controller; a full buffer
/// holds the watches back rather than growing.
const TRIGGER_BUFFER: usize = 1024;

/// Runs the controller for one namespace, or all of them, for the current term, until
/// `stop` resolves and the reconciles drained. Each watch runs in a task of its own that
/// keeps its cache current and sends the reconciles its events call for: a failing watch
/// backs off alone and never pauses the others (kube's controller would pause every
/// trigger stream, and so every cache, for up to 30 s after one error).
pub async fn run(
    ctx: Arc<Context>,
    scope: Option<String>,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let term = ctx.caches.term();
    let (triggers, reconciles) = futures::channel::mpsc::channel(TRIGGER_BUFFER);
    let (reader, writer) = reflector::store();
    ctx.caches.share_store(&scope, reader.clone());
    let mut watches = tokio::task::JoinSet::new();
    spawn_watches(&mut watches, &ctx, &scope, term, writer, triggers);
    let controller = Controller::for_stream(futures::stream::pending(), reader)
        .reconcile_on(reconciles)
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) | Ok(_) => {}
                Err(e) => warn!(error = %e, "controller error"),
            }
        });
    tokio::select! {
        _ = controller => {}
        Some(ended) = watches.join_next() => {
            // A watch stream never ends by itself: only a panic gets here.
            warn!(?ended, "a watch task ended; the controller stops");
        }
    }
    // Dropping the set aborts the watch tasks with the term.
}

/// One task per watched kind: VaultClusters (also feeding the controller's store), pods,
/// and our Services and EndpointSlices.
fn spawn_watches(
    tasks: &mut tokio::task::JoinSet<()>,
    ctx: &Arc<Context>,
    scope: &Option<String>,
    term: u64,
    writer: reflector::store::Writer<VaultCluster>,
    triggers: cache::Triggers,
) {
    let client = &ctx.client;
    let config = crate::apiclient::watch_config();
    let ours = config.clone().labels(&format!(
        "{}={}",
        services::MANAGED_BY.0,
        services::MANAGED_BY.1
    ));
    let feed = cache::Feeds {
        caches: ctx.caches.clone(),
        term,
        scope: scope.clone(),
    };
    // Managed fields are most of a VaultCluster in memory (a JSON tree per writer) and
    // never read: a thousand of them cost a hundred megabytes.
    let clusters = watcher(api::<VaultCluster>(client, scope), config.clone())
        .modify(|vc| vc.managed_fields_mut().clear());
    let mut clusters = Some(reflector::reflector(writer, clusters));
    tasks.spawn(cache::drive(
        move || {
            clusters
                .take()
                .expect("the VaultCluster watch never starts over")
        },
        feed.of(Kind::Clusters, cache::clusters, cache::cluster),
        |vc: &VaultCluster| vec![ObjectRef::from_obj(vc)],
        triggers.clone(),
    ));
    let marks = ctx.clone();
    let (pods, pod_config) = (api::<PodView>(client, scope), config.clone());
    tasks.spawn(cache::drive(
        move || watcher(pods.clone(), pod_config.clone()),
        feed.of(Kind::Pods, cache::pods, cache::slim_pod),
        move |pod: &PodView| concerned(&marks, pod),
        triggers.clone(),
    ));
    let marks = ctx.clone();
    let mut services = Some(watcher(api::<Service>(client, scope), ours.clone()));
    tasks.spawn(cache::drive(
        move || {
            services
                .take()
                .expect("the Service watch never starts over")
        },
        feed.of(Kind::Services, cache::services, |_, s| cache::trimmed(s)),
        move |svc: &Service| owners(&marks, svc),
        triggers.clone(),
    ));
    let marks = ctx.clone();
    let mut sets = Some(watcher(api::<StatefulSet>(client, scope), config.clone()));
    tasks.spawn(cache::drive(
        move || {
            sets.take()
                .expect("the StatefulSet watch never starts over")
        },
        feed.of(Kind::Sets, cache::sets, |_, s| cache::slim_set(s)),
        move |set: &StatefulSet| rollout::concerned(&marks, set),
        triggers.clone(),
    ));
    // EndpointSlices carry the labels of their Service, so ours are found by the same
    // label. They trigger nothing: a round only waits on them.
    let mut slices = Some(watcher(api::<EndpointSlice>(client, scope), ours));
    tasks.spawn(cache::drive(
        move || {
            slices
                .take()
                .expect("the EndpointSlice watch never starts over")
        },
        feed.of(Kind::Slices, cache::slices, |_, s| cache::slim_slice(s)),
        |_: &EndpointSlice| Vec::new(),
        triggers,
    ));
}

/// The VaultClusters controlling a changed Service of ours; their next round is a full one.
fn owners(ctx: &Context, svc: &Service) -> Vec<ObjectRef<VaultCluster>> {
    let ns = svc.namespace().unwrap_or_default();
    svc.owner_references()
        .iter()
        .filter(|o| o.kind == "VaultCluster")
        .map(|o| {
            ctx.mark_dirty(&o.uid);
            ObjectRef::new(&o.name).within(&ns)
        })
        .collect()
}

/// The VaultClusters a pod change concerns: those selecting it and the one that labelled
/// it. Their next round is a full one.
fn concerned(ctx: &Context, pod: &PodView) -> Vec<ObjectRef<VaultCluster>> {
    let slim = cache::slim_pod(&ctx.caches, pod);
    let index = ctx.caches.clusters.read().unwrap();
    let clusters = index.concerned(&slim);
    for vc in &clusters {
        ctx.mark_dirty(&vc.uid().unwrap_or_default());
    }
    clusters
        .iter()
        .map(|vc| ObjectRef::from_obj(vc.as_ref()))
        .collect()
}

fn error_policy(
    vc: Arc<VaultCluster>,
    error: &kube::runtime::finalizer::Error<Error>,
    ctx: Arc<Context>,
) -> Action {
    warn!(cluster = %vc.name_any(), namespace = ?vc.namespace(), %error, "reconcile failed");
    let kind = match error {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e.kind(),
        _ => "finalizer",
    };
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[kind])
        .inc();
    let mut failures = ctx.failures.lock().unwrap();
    let streak = failures.entry(vc.uid().unwrap_or_default()).or_default();
    Action::requeue(streak.failed(Instant::now()))
}

/// A run of failed reconciles of one cluster. Only a failure at or after the retry's time
/// lengthens the backoff: rounds that watch events start in between (a pod changing every
/// second) and fail too say nothing new, and counting them would push a failed write's
/// retry towards 10 s when the API server is back in one.
#[derive(Debug, Default)]
struct Streak {
    failures: u32,
    due: Option<Instant>,
}

impl Streak {
    /// Records a failure at `now`; the wait before the retry, which a failure before the
    /// retry's time leaves where it was.
    fn failed(&mut self, now: Instant) -> Duration {
        match self.due {
            Some(due) if now < due => due - now,
            _ => {
                self.failures = self.failures.saturating_add(1);
                let wait = retry_after(self.failures);
                self.due = Some(now + wait);
                wait
            }
        }
    }
}

/// Exponential backoff for failed reconciles: 250ms doubling up to 10s. A watch event still
/// triggers a reconcile at once, so recovery of the API server is not delayed by it.
fn retry_after(failures: u32) -> Duration {
    let base = Duration::from_millis(250);
    base.saturating_mul(1 << failures.saturating_sub(1).min(6))
        .min(Duration::from_secs(10))
}

async fn reconcile(
    vc: Arc<VaultCluster>,
    ctx: Arc<Context>,
) -> Result<Action, kube::runtime::finalizer::Error<Error>> {
    let start = Instant::now();
    let uid = vc.uid().unwrap_or_default();
    let api: Api<VaultCluster> =
        Api::namespaced(ctx.client.clone(), &vc.namespace().unwrap_or_default());
    if ctx.guard("VaultCluster finalizer").is_err() {
        return Ok(Action::requeue(interval(&vc)));
    }
    // Neither apply nor cleanup on a partial view: a pod cache still listing shows a
    // cluster with no pods, and its deletion would strip nothing.
    if !ctx.synced() {
        return Ok(Action::requeue(UNSYNCED_RETRY));
    }
    // Nor before the pod cache holds the labels this cluster reads (a new selector key).
    if !ctx.caches.learned(&ctx.scope_of(&vc_ns(&vc)), &vc) {
        return Ok(Action::requeue(UNSYNCED_RETRY));
    }
    let adds_finalizer =
        vc.metadata.deletion_timestamp.is_none() && !vc.finalizers().iter().any(|f| f == FINALIZER);
    // Once the cache shows the finalizer, its absence again means someone removed it.
    let added = {
        let mut finalized = ctx.finalized.lock().unwrap();
        if !adds_finalizer {
            finalized.remove(&uid);
        }
        adds_finalizer && finalized.contains(&uid)
    };
    let vc = if added { with_finalizer(&vc) } else { vc };
    let result = finalizer(&api, FINALIZER, vc, |event| async {
        match event {
            Finalized::Apply(vc) => apply(&vc, &ctx).await,
            Finalized::Cleanup(vc) => cleanup(&vc, &ctx).await,
        }
    })
    .await;
    ctx.metrics
        .reconcile_duration
        .observe(start.elapsed().as_secs_f64());
    ctx.metrics
        .reconciles
        .with_label_values(&[if result.is_ok() { "ok" } else { "error" }])
        .inc();
    if result.is_ok() {
        ctx.failures.lock().unwrap().remove(&uid);
        if adds_finalizer {
            ctx.finalized.lock().unwrap().insert(uid);
        }
    }
    result
}

/// The cluster as it is since we gave it our finalizer, when the cache is not there yet.
fn with_finalizer(vc: &VaultCluster) -> Arc<VaultCluster> {
    let mut vc = vc.clone();
    vc.finalizers_mut().push(FINALIZER.into());
    Arc::new(vc)
}

fn interval(vc: &VaultCluster) -> Duration {
    crate::crd::parse_duration(&vc.spec.health.interval).unwrap_or(Duration::from_secs(2))
}

fn cluster_name(vc: &VaultCluster) -> String {
    format!("{}/{}", vc.namespace().unwrap_or_default(), vc.name_any())
}

/// One round for one VaultCluster, in the order it reads: check the spec; between full
/// rounds of a settled cluster, only a probe of its active pod (see `rhythm`); otherwise
/// observe (pods from the caches, probes), decide (pure), act (writes), record what the
/// writes did, report it (status, events, gauges), and only then remember the rhythm, so
/// a round whose status could not be published is followed by a full one.
async fn apply(vc: &VaultCluster, ctx: &Context) -> Result<Action, Error> {
    let started = Instant::now();
    let newest = report::with_newest_status(vc, ctx);
    let vc = &*newest;
    // The phases that talk to the API server are boxed: a future is as large as its
    // largest state, and a round spends its time waiting for probe slots, not in them. At
    // 1,000 clusters hundreds of rounds wait at once, each a spawned task of that size.
    let settings = match Box::pin(usable(vc, ctx)).await? {
        Ok(settings) => settings,
        Err(problem) => return Box::pin(report::invalid(vc, ctx, problem)).await,
    };
    let uid = vc.uid().unwrap_or_default();
    let previous = ctx.rhythms.lock().unwrap().get(&uid).cloned();
    if let Some(wait) = sentinel_round(vc, ctx, &settings, previous.as_ref(), started).await {
        return Ok(Action::requeue(wait));
    }
    // Observe.
    let selection = observe::select(vc, ctx);
    let mut members = observe::probe_all(vc, ctx, &settings, &selection.candidates).await;
    // Decide.
    let names = LabelNames::new(&vc.spec.label_prefix);
    let held = fail_static::hold(&mut members);
    let decision = decide(&names, &vc.name_any(), &members);
    // Act, and record what was written.
    let acted = Box::pin(act::act(vc, ctx, &names, &decision, &members, &selection)).await;
    let upgrade = Box::pin(rollout::round(vc, ctx, &members, &selection.candidates)).await;
    let (service_problems, failed) = match acted.result {
        Ok(problems) => (problems, None),
        Err(error) => (Vec::new(), Some(error)),
    };
    let mut status = build(&Observation {
        generation: vc.metadata.generation,
        members: &members,
        decision: &decision,
        written: &acted.written,
        spec_problem: settings.warning.clone(),
        service_problems,
        overlaps: selection.overlaps,
        held,
        write_problem: failed.as_ref().map(|e| e.to_string()),
        previous: vc.status.as_ref(),
        now: Time(k8s_openapi::jiff::Timestamp::now()),
    });
    Box::pin(rollout::report(vc, ctx, upgrade.as_ref(), &mut status)).await;
    // Report. A failed write still gets its status published, so Ready never stays True
    // over it.
    let first = previous.is_none();
    if first
        || vc.status.as_ref() != Some(&status)
        || !ctx.metrics.shows(&vc_ns(vc), &vc.name_any())
    {
        report::gauges(vc, ctx, &status);
    }
    let mut found = rhythm::Found {
        active: rhythm::settled_active(&acted.written, &decision.claimants),
        roles: roles_signature(&status),
        generation: vc.metadata.generation,
    };
    let published = Box::pin(report::publish(vc, ctx, status)).await;
    // Only a round whose writes (`settled_active`) and report both landed may be followed
    // by a sentinel round.
    if published.is_err() {
        found.active = None;
    }
    let wait = remember_rhythm(vc, ctx, &settings, previous.as_ref(), started, found);
    let wait = rollout::sooner(wait, upgrade.as_ref());
    match (failed, published) {
        (Some(error), _) | (None, Err(error)) => Err(error),
        (None, Ok(())) => Ok(Action::requeue(wait)),
    }
}

/// The probe settings, or the spec's problem to report; an API error is the round's.
async fn usable(
    vc: &VaultCluster,
    ctx: &Context,
) -> Result<Result<settings::ProbeSettings, String>, Error> {
    let settings = match settings::probe_settings(vc, ctx).await {
        Ok(settings) => settings,
        Err(settings::Unusable::Spec(problem)) => return Ok(Err(problem)),
        Err(settings::Unusable::Api(error)) => return Err(error),
    };
    if let Err(problem) = crate::selector::parse(&vc.spec.selector) {
        return Ok(Err(problem));
    }
    if let Some(problem) = services::name_clash(vc).or_else(|| ctx.allowed.problem(vc)) {
        return Ok(Err(problem));
    }
    Ok(Ok(settings))
}

/// Between full rounds of a settled cluster, probes only its active pod; the wait until the
/// next round when that pod answered exactly as before, or None for a full round now. A
/// change a watch reported (the dirty mark) always makes the round a full one.
async fn sentinel_round(
    vc: &VaultCluster,
    ctx: &Context,
    settings: &settings::ProbeSettings,
    previous: Option<&Rhythm>,
    started: Instant,
) -> Option<Duration> {
    let uid = vc.uid().unwrap_or_default();
    // Taken before the pods are read: a change reported from now on marks it again.
    let dirty = ctx.dirty.lock().unwrap().remove(&uid);
    let r = previous?;
    let Round::Sentinel(pod) = rhythm::round(Some(r), started, vc.metadata.generation, dirty)
    else {
        return None;
    };
    let pod = ctx.caches.pods.read().unwrap().get(&vc_ns(vc), &pod)?;
    observe::sentinel(vc, ctx, settings, &pod)
        .await
        .then(|| rhythm::after_sentinel(r, Instant::now(), settings.active_interval))
}

/// Records the rhythm after a full round; the wait until the next round.
fn remember_rhythm(
    vc: &VaultCluster,
    ctx: &Context,
    settings: &settings::ProbeSettings,
    previous: Option<&Rhythm>,
    started: Instant,
    found: rhythm::Found,
) -> Duration {
    let uid = vc.uid().unwrap_or_default();
    let (next, mut wait) = rhythm::after_full(
        previous,
        started,
        found,
        interval(vc),
        settings.active_interval,
    );
    ctx.rhythms.lock().unwrap().insert(uid.clone(), next);
    if previous.is_none() {
        wait += spread(&uid, interval(vc));
    }
    wait
}

fn vc_ns(vc: &VaultCluster) -> String {
    vc.namespace().unwrap_or_default()
}

/// The role of every pod shown, the counts (which also cover the pods the capped
/// `members` leaves out) and the active pod, as a signature: what a change of the cluster is.
fn roles_signature(status: &crate::crd::VaultClusterStatus) -> u64 {
    let roles = status
        .members
        .iter()
        .flat_map(|m| [m.name.clone(), m.role.clone()]);
    let counts = [
        status.pods,
        status.active,
        status.standby,
        status.perf_standby,
        status.sealed,
        status.uninitialized,
        status.unreachable,
    ]
    .map(|n| n.to_string());
    let all: Vec<String> = roles
        .chain(counts)
        .chain(status.active_pod.clone())
        .collect();
    rhythm::signature(all.iter().map(String::as_str))
}

/// A fixed offset within the interval for each cluster, added once after its first round:
/// clusters created or resynced together then probe spread over the interval, not in
/// bursts.
fn spread(uid: &str, interval: Duration) -> Duration {
    // FNV-1a: stable across processes, unlike the std hasher.
    let hash = uid.bytes().fold(0xcbf29ce484222325_u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    interval.mul_f64((hash % 1000) as f64 / 1000.0)
}

/// Removes our labels from every pod this VaultCluster labelled, then lets it go.
async fn cleanup(vc: &VaultCluster, ctx: &Context) -> Result<Action, Error> {
    let names = LabelNames::new(&vc.spec.label_prefix);
    let ns = vc.namespace().unwrap_or_default();
    for pod in observe::pods_of(vc, ctx) {
        // Only what names this cluster: a selected pod that another VaultCluster claimed
        // (once this one got its deletionTimestamp) is that cluster's now.
        if pod.owner() == Some(&vc.name_any())
            && !diff(&pod.labels, &full_removal(&names, &pod.labels)).is_empty()
        {
            act::strip_labels(vc, ctx, &names, &pod).await?;
        }
    }
    let uid = vc.uid().unwrap_or_default();
    ctx.trackers.lock().unwrap().remove(&uid);
    ctx.rhythms.lock().unwrap().remove(&uid);
    ctx.metrics.forget_cluster(&ns, &vc.name_any());
    ctx.status_written.lock().unwrap().remove(&uid);
    ctx.owned_since.lock().unwrap().remove(&uid);
    ctx.rollouts.forget(&uid);
    ctx.finalized.lock().unwrap().remove(&uid);
    info!(cluster = %cluster_name(vc), "labels removed; VaultCluster may go");
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reconcile is a spawned task as large as its future's largest state, and at 1,000
    /// clusters hundreds of them wait for probe slots at once: with its API phases inline it
    /// was 9,424 bytes; boxed, 5,024 (rustc 1.95).
    #[tokio::test]
    async fn a_round_waiting_for_its_probes_is_a_small_task() {
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let ctx = Context::new(
            Client::try_from(config).unwrap(),
            Prober::new(4),
            Metrics::new(),
            Arc::new(AtomicBool::new(true)),
            vec![None],
            services::Allowed {
                types: vec![],
                annotations: vec![],
            },
        );
        let vc: VaultCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "vault-registrar.dev/v1alpha1", "kind": "VaultCluster",
            "metadata": {"name": "v", "namespace": "n"},
            "spec": {"selector": {"matchLabels": {"a": "b"}}}
        }))
        .unwrap();
        let round = reconcile(Arc::new(vc), ctx);
        let size = std::mem::size_of_val(&round);
        assert!(size <= 6 * 1024, "a reconcile's future is {size} bytes");
    }

    #[test]
    fn clusters_are_spread_over_the_interval() {
        let interval = Duration::from_secs(2);
        let offsets: Vec<Duration> = (0..1000)
            .map(|i| spread(&format!("uid-{i}"), interval))
            .collect();
        assert!(offsets.iter().all(|o| *o < interval));
        // Each tenth of the interval gets some of them: no burst at one phase.
        for tenth in 0..10 {
            let n = offsets
                .iter()
                .filter(|o| (o.as_millis() / 200) as usize == tenth)
                .count();
            assert!((50..=150).contains(&n), "tenth {tenth}: {n}");
        }
        assert_eq!(spread("uid-1", interval), spread("uid-1", interval));
    }

    #[test]
    fn only_failed_retries_lengthen_the_backoff() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut streak = Streak::default();
        // (when a round fails, the wait it is given)
        for (at, wait) in [
            (0, 250),
            // Event-triggered rounds failing before the retry is due: it stays due then.
            (100, 150),
            (200, 50),
            // The retry fails: doubled.
            (250, 500),
            (400, 350),
            (800, 1000),
            (900, 900),
            (1800, 2000),
        ] {
            assert_eq!(
                streak.failed(ms(at)),
                Duration::from_millis(wait),
                "at {at} ms"
            );
        }
    }

    #[test]
    fn failed_reconciles_back_off() {
        let got: Vec<u128> = (1..=9).map(|n| retry_after(n).as_millis()).collect();
        assert_eq!(got, [250, 500, 1000, 2000, 4000, 8000, 10000, 10000, 10000]);
    }
}
