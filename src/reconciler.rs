//! The VaultCluster reconciler: observe (pods, probes, Services), decide (pure functions in
//! `decide`, `services`, `status`), act (only the writes that change something).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalized, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::crd::{FINALIZER, Scheme, VaultCluster, VaultClusterStatus};
use crate::decide::{LabelPlan, Member, Reach, decide};
use crate::error::Error;
use crate::labels::{LEGACY_OWNER_ANNOTATION, LabelNames, OWNER_LABEL, diff, removal};
use crate::metrics::Metrics;
use crate::probe::{Prober, Target, check_server_name, server_name, tls_config};
use crate::services::{self, Kind};
use crate::status::{Notice, Observation, build, invalid_spec, merge_patch, notices};
use crate::tracker::{Failure, FailureKind, Outcome, Tracker};
use crate::{duration, fail_static, selector};

/// Field manager for every write, so `managedFields` shows what we own.
pub const MANAGER: &str = "vault-registrar";

/// Shared state of the reconciler.
pub struct Context {
    pub client: Client,
    pub prober: Prober,
    pub metrics: Metrics,
    recorder: Recorder,
    trackers: Mutex<HashMap<String, Tracker>>,
    /// Consecutive failed reconciles per VaultCluster UID, for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// One store per watched namespace (the key; None: all), each filled by that
    /// namespace's controller and all consulted together, so no namespace hides another's.
    clusters: Mutex<HashMap<Option<String>, Store<VaultCluster>>>,
    /// Cleared the moment leadership is lost, before the controller is stopped.
    leading: Arc<AtomicBool>,
}

impl Context {
    pub fn new(
        client: Client,
        prober: Prober,
        metrics: Metrics,
        leading: Arc<AtomicBool>,
    ) -> Arc<Self> {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            prober,
            metrics,
            trackers: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            clusters: Mutex::new(HashMap::new()),
            leading,
        })
    }

    fn guard(&self, what: &str) -> Result<(), Error> {
        if self.leading.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Error::NotLeader(what.into()))
        }
    }

    fn other_clusters(&self) -> Vec<VaultCluster> {
        let stores = self.clusters.lock().unwrap();
        stores
            .values()
            .flat_map(|s| s.state())
            .map(|c| (*c).clone())
            .collect()
    }

    /// Drops the stores of a previous term, so `clusters_synced` waits for fresh ones.
    pub fn forget_clusters(&self) {
        self.clusters.lock().unwrap().clear();
    }

    /// Resolves once every one of `namespaces` has a store that finished its first list.
    pub async fn clusters_synced(&self, namespaces: &[Option<String>]) {
        loop {
            let stores: Vec<Store<VaultCluster>> = {
                let map = self.clusters.lock().unwrap();
                namespaces
                    .iter()
                    .filter_map(|ns| map.get(ns).cloned())
                    .collect()
            };
            if stores.len() == namespaces.len() {
                for store in stores {
                    let _ = store.wait_until_ready().await;
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs the controller for one namespace, or all of them, until the stream ends.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    let (clusters, services, pods): (Api<VaultCluster>, Api<Service>, Api<Pod>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client),
        ),
    };
    let controller = Controller::new(clusters, crate::apiclient::watch_config());
    let store = controller.store();
    ctx.clusters
        .lock()
        .unwrap()
        .insert(namespace.clone(), store.clone());
    let owned = crate::apiclient::watch_config().labels(&format!(
        "{}={}",
        services::MANAGED_BY.0,
        services::MANAGED_BY.1
    ));
    controller
        .owns(services, owned)
        .watches(pods, crate::apiclient::watch_config(), move |pod: Pod| {
            clusters_of(&store, &pod)
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            // Reconciler failures are logged by error_policy; the rest (a watch the API
            // server refuses, say) would otherwise go unseen.
            match result {
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) | Ok(_) => {}
                Err(e) => warn!(error = %e, "controller error"),
            }
        })
        .await;
}

/// The VaultClusters a pod change concerns: those selecting it and the one that labelled it.
fn clusters_of(store: &Store<VaultCluster>, pod: &Pod) -> Vec<ObjectRef<VaultCluster>> {
    let labels = pod.labels();
    let labelled_by = owner_of(pod);
    store
        .state()
        .iter()
        .filter(|vc| vc.namespace() == pod.namespace())
        .filter(|vc| {
            selector::matches(&vc.spec.selector, labels) || labelled_by == Some(&vc.name_any())
        })
        .map(|vc| ObjectRef::from_obj(vc.as_ref()))
        .collect()
}

/// The VaultCluster that labelled a pod: the ownership label, or the annotation that
/// versions before it wrote.
fn owner_of(pod: &Pod) -> Option<&String> {
    pod.labels()
        .get(OWNER_LABEL)
        .or_else(|| pod.annotations().get(LEGACY_OWNER_ANNOTATION))
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
    let count = failures.entry(vc.uid().unwrap_or_default()).or_default();
    *count = count.saturating_add(1);
    Action::requeue(retry_after(*count))
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
    }
    result
}

fn interval(vc: &VaultCluster) -> Duration {
    duration::parse(&vc.spec.health.interval).unwrap_or(Duration::from_secs(2))
}

fn cluster_name(vc: &VaultCluster) -> String {
    format!("{}/{}", vc.namespace().unwrap_or_default(), vc.name_any())
}

/// Observe, decide, act for one VaultCluster.
async fn apply(vc: &VaultCluster, ctx: &Context) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = vc.namespace().unwrap_or_default();
    let names = LabelNames::new(&vc.spec.label_prefix);
    let probe_settings = match probe_settings(vc, ctx).await {
        Ok(settings) => settings,
        Err(Unusable::Spec(problem)) => return report_invalid(vc, ctx, problem).await,
        Err(Unusable::Api(error)) => return Err(error),
    };
    if let Some(problem) = services::name_clash(vc) {
        return report_invalid(vc, ctx, problem).await;
    }
    let pods = observe_pods(vc, ctx).await?;
    let Selection {
        candidates,
        overlaps,
        strays,
    } = select(vc, &ctx.other_clusters(), pods);
    let pods_owned = candidates
        .iter()
        .all(|p| p.labels().get(OWNER_LABEL) == Some(&vc.name_any()));
    let mut members = probe_all(vc, ctx, &probe_settings, &candidates).await;
    let held = fail_static::hold(&mut members);
    let decision = decide(&names, &vc.name_any(), &members);
    let (service_problems, failed) = match act(
        vc,
        ctx,
        &ns,
        &names,
        &decision,
        &members,
        &candidates,
        &strays,
        pods_owned,
    )
    .await
    {
        Ok(problems) => (problems, None),
        Err(error) => (Vec::new(), Some(error)),
    };
    let observation = Observation {
        generation: vc.metadata.generation,
        members: &members,
        decision: &decision,
        spec_problem: None,
        service_problems,
        overlaps,
        held,
        write_problem: failed.as_ref().map(|e| e.to_string()),
        previous: vc.status.as_ref(),
        now: Time(k8s_openapi::jiff::Timestamp::now()),
    };
    let status = build(&observation);
    let wait = next_probe(interval(vc), started.elapsed(), status.active_pod.is_some());
    record_gauges(vc, ctx, &status);
    // A failed write still gets its status published, so Ready never stays True over it.
    let published = publish_status(vc, ctx, status).await;
    match failed {
        Some(error) => Err(error),
        None => published.map(|_| Action::requeue(wait)),
    }
}

/// Writes what the decision calls for: labels (every demotion before a promotion), strays,
/// Services. Stops at the first failed write, so a promotion never follows a failed
/// demotion. Returns why any Service could not be put in place.
#[allow(clippy::too_many_arguments)]
async fn act(
    vc: &VaultCluster,
    ctx: &Context,
    ns: &str,
    names: &LabelNames,
    decision: &crate::decide::Decision,
    members: &[Member],
    candidates: &[Pod],
    strays: &[Pod],
    pods_owned: bool,
) -> Result<Vec<String>, Error> {
    for plan in &decision.plans {
        if plan.promotes {
            let ip = members
                .iter()
                .find(|m| m.name == plan.pod)
                .map(|m| m.ip.as_str())
                .unwrap_or_default();
            await_active_endpoints_drained(vc, ctx, ip).await?;
        }
        write_labels(vc, ctx, ns, plan, candidates).await?;
    }
    for pod in strays {
        strip_labels(vc, ctx, names, pod).await?;
    }
    converge_services(vc, ctx, pods_owned).await
}

/// The pods a round works on, sorted by what the round does with them.
struct Selection {
    /// Selected by this VaultCluster and by no older one: probed and labelled.
    candidates: Vec<Pod>,
    /// Selected, but left to an older VaultCluster: "pod (cluster)".
    overlaps: Vec<String>,
    /// Labelled by this VaultCluster and no longer selected: their labels go.
    strays: Vec<Pod>,
}

fn select(vc: &VaultCluster, others: &[VaultCluster], pods: Vec<Pod>) -> Selection {
    let mut selection = Selection {
        candidates: Vec::new(),
        overlaps: Vec::new(),
        strays: Vec::new(),
    };
    for pod in pods {
        let selected = selector::matches(&vc.spec.selector, pod.labels());
        match (
            selected,
            selector::claimed_by_older(vc, others, pod.labels()),
        ) {
            (true, None) => selection.candidates.push(pod),
            (true, Some(older)) => {
                selection
                    .overlaps
                    .push(format!("{} ({})", pod.name_any(), older.name_any()))
            }
            (false, _) if owner_of(&pod) == Some(&vc.name_any()) => selection.strays.push(pod),
            (false, _) => {}
        }
    }
    selection
}

/// Time until the next probe round. Rounds start every interval, however long one took.
/// While no pod is active the cluster is mid-failover, so the new active pod is looked
/// for four times as often: that wait is what clients of the active Service feel.
fn next_probe(interval: Duration, took: Duration, has_active: bool) -> Duration {
    let period = if has_active {
        interval
    } else {
        (interval / 4).max(Duration::from_millis(200))
    };
    period.saturating_sub(took).max(Duration::from_millis(50))
}

/// Why a round cannot probe: the spec (reported in the status, labels held) or a transient
/// API error (retried with backoff, status untouched).
enum Unusable {
    Spec(String),
    Api(Error),
}

/// How to probe this cluster's pods: port, path, timeout, TLS.
struct ProbeSettings {
    port: u16,
    path: String,
    timeout: Duration,
    threshold: u32,
    tls: Option<(Arc<rustls::ClientConfig>, String)>,
}

async fn probe_settings(vc: &VaultCluster, ctx: &Context) -> Result<ProbeSettings, Unusable> {
    let h = &vc.spec.health;
    let spec = |message: String| Unusable::Spec(message);
    let timeout =
        duration::parse(&h.timeout).map_err(|e| spec(format!("spec.health.timeout: {e}")))?;
    let interval =
        duration::parse(&h.interval).map_err(|e| spec(format!("spec.health.interval: {e}")))?;
    if timeout >= interval {
        return Err(spec(
            "spec.health.timeout must be less than spec.health.interval".into(),
        ));
    }
    let tls = match h.scheme {
        Scheme::Http => None,
        Scheme::Https => {
            let tls = h.tls.clone().unwrap_or_default();
            check_server_name(&tls.server_name).map_err(spec)?;
            let ca = match &tls.ca_secret_ref {
                Some(r) => Some(read_ca(vc, ctx, &r.name, &r.key).await?),
                None => None,
            };
            let config = tls_config(ca.as_deref(), tls.insecure_skip_verify)
                .map_err(|e| spec(format!("spec.health.tls: {e}")))?;
            Some((config, tls.server_name))
        }
    };
    Ok(ProbeSettings {
        port: h.port as u16,
        path: h.path.clone(),
        timeout,
        threshold: h.failure_threshold.max(1) as u32,
        tls,
    })
}

/// The CA bundle. A missing Secret or key is the spec's problem; any other error reading it
/// is transient and says nothing about the spec.
async fn read_ca(
    vc: &VaultCluster,
    ctx: &Context,
    name: &str,
    key: &str,
) -> Result<Vec<u8>, Unusable> {
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &vc.namespace().unwrap_or_default());
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|source| {
            Unusable::Api(Error::ReadSecret {
                cluster: cluster_name(vc),
                secret: name.into(),
                source,
            })
        })?
        .ok_or_else(|| {
            Unusable::Spec(format!(
                "spec.health.tls.caSecretRef: Secret {name} not found"
            ))
        })?;
    secret
        .data
        .and_then(|d| d.get(key).map(|b| b.0.clone()))
        .ok_or_else(|| {
            Unusable::Spec(format!(
                "spec.health.tls.caSecretRef: Secret {name} has no key {key}"
            ))
        })
}

/// The selected pods plus the pods carrying this VaultCluster's ownership label.
async fn observe_pods(vc: &VaultCluster, ctx: &Context) -> Result<Vec<Pod>, Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &vc.namespace().unwrap_or_default());
    let list = |selector: String| {
        let api = api.clone();
        async move {
            api.list(&ListParams::default().labels(&selector))
                .await
                .map_err(|source| Error::ListPods {
                    cluster: cluster_name(vc),
                    source,
                })
        }
    };
    let match_labels = vc
        .spec
        .selector
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let owned = format!("{OWNER_LABEL}={}", vc.name_any());
    let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
    for pod in list(match_labels)
        .await?
        .items
        .into_iter()
        .chain(list(owned).await?.items)
    {
        pods.insert(pod.name_any(), pod);
    }
    Ok(pods.into_values().collect())
}

async fn probe_all(
    vc: &VaultCluster,
    ctx: &Context,
    settings: &ProbeSettings,
    pods: &[Pod],
) -> Vec<Member> {
    let ns = vc.namespace().unwrap_or_default();
    let share = ctx.prober.cluster_share();
    let outcomes = futures::future::join_all(
        pods.iter()
            .map(|pod| probe_pod(ctx, settings, &share, &ns, pod)),
    )
    .await;
    let key = vc.uid().unwrap_or_default();
    let mut trackers = ctx.trackers.lock().unwrap();
    let tracker = trackers.entry(key).or_default();
    let uids: Vec<String> = pods.iter().map(|p| p.uid().unwrap_or_default()).collect();
    tracker.retain(&uids.iter().map(String::as_str).collect::<Vec<_>>());
    pods.iter()
        .zip(outcomes)
        .zip(&uids)
        .map(|((pod, outcome), uid)| {
            let reach = match &outcome {
                Err(_) => Reach::NotProbed,
                Ok(Outcome::Failed(f)) if f.unanswered() => Reach::Unanswered,
                Ok(_) => Reach::Answered,
            };
            let verdict = match outcome {
                Err(reason) => tracker.down(uid, &reason),
                Ok(outcome) => tracker.record(uid, outcome, settings.threshold),
            };
            Member {
                name: pod.name_any(),
                ip: pod_ip(pod).map(|ip| ip.to_string()).unwrap_or_default(),
                labels: pod.labels().clone(),
                verdict,
                reach,
                serving: serving(pod),
            }
        })
        .collect()
}

/// Kubernetes reports the pod Running, Ready and not terminating.
fn serving(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    running && ready && pod.metadata.deletion_timestamp.is_none()
}

/// Probes a pod that can be probed; Err names why a pod cannot serve at all.
async fn probe_pod(
    ctx: &Context,
    settings: &ProbeSettings,
    share: &tokio::sync::Semaphore,
    ns: &str,
    pod: &Pod,
) -> Result<Outcome, String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Err("pod is terminating".into());
    }
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    if phase != "Running" {
        return Err(format!(
            "pod phase is {}",
            if phase.is_empty() { "unknown" } else { &phase }
        ));
    }
    let ip = pod_ip(pod).ok_or("pod has no IP")?;
    let tls = match &settings.tls {
        None => None,
        Some((config, template)) => match server_name(template, &pod.name_any(), ns, ip) {
            Ok(name) => Some((config.clone(), name)),
            // The template was checked; a name it still cannot make is not the pod's fault.
            Err(e) => return Ok(Outcome::Failed(Failure::new(FailureKind::Local, e))),
        },
    };
    let target = Target {
        ip,
        port: settings.port,
        path: settings.path.clone(),
        timeout: settings.timeout,
        tls,
    };
    let (outcome, took) = ctx.prober.probe(&target, share).await;
    let label = match &outcome {
        Outcome::Healthy(h) => h.role.as_str(),
        Outcome::Failed(_) => "failed",
    };
    ctx.metrics.probes.with_label_values(&[label]).inc();
    let result = if label == "failed" { "failed" } else { "ok" };
    ctx.metrics
        .probe_latency
        .with_label_values(&[result])
        .observe(took.as_secs_f64());
    Ok(outcome)
}

fn pod_ip(pod: &Pod) -> Option<IpAddr> {
    pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
}

/// Before promoting a pod, waits (bounded) until the active Service's EndpointSlices hold
/// no other pod. The demotions were written just before; writing the promotion while the
/// EndpointSlice controller still digests them makes its next sync hit its own stale cache
/// and back off for a second. Waiting also means clients never see two active endpoints.
async fn await_active_endpoints_drained(
    vc: &VaultCluster,
    ctx: &Context,
    promoted_ip: &str,
) -> Result<(), Error> {
    if !vc.spec.services.active.enabled {
        return Ok(());
    }
    let service = services::name(vc, Kind::Active);
    let api: Api<EndpointSlice> =
        Api::namespaced(ctx.client.clone(), &vc.namespace().unwrap_or_default());
    let params = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    let deadline = Instant::now() + (interval(vc) / 2).min(Duration::from_millis(500));
    loop {
        let slices = api
            .list(&params)
            .await
            .map_err(|source| Error::ReadEndpoints {
                cluster: cluster_name(vc),
                service: service.clone(),
                source,
            })?;
        let others = slices
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .flat_map(|e| e.addresses.iter())
            .any(|address| address != promoted_ip);
        if !others || Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn write_labels(
    vc: &VaultCluster,
    ctx: &Context,
    ns: &str,
    plan: &LabelPlan,
    pods: &[Pod],
) -> Result<(), Error> {
    let Some(pod) = pods.iter().find(|p| p.name_any() == plan.pod) else {
        return Ok(());
    };
    let mut meta = json!({"labels": plan.change});
    if pod.annotations().contains_key(LEGACY_OWNER_ANNOTATION) {
        meta["annotations"] = json!({LEGACY_OWNER_ANNOTATION: null});
    }
    patch_pod(vc, ctx, ns, pod, meta).await
}

async fn strip_labels(
    vc: &VaultCluster,
    ctx: &Context,
    names: &LabelNames,
    pod: &Pod,
) -> Result<(), Error> {
    let change = diff(pod.labels(), &removal(names));
    let meta = json!({"labels": change, "annotations": {LEGACY_OWNER_ANNOTATION: null}});
    patch_pod(vc, ctx, &pod.namespace().unwrap_or_default(), pod, meta).await
}

/// Patches a pod's metadata, on condition that it is still the pod observed: the UID in the
/// patch makes the API server refuse it if the pod was replaced under the same name. A pod
/// gone or replaced ends the write quietly; the next round sees the new one.
async fn patch_pod(
    vc: &VaultCluster,
    ctx: &Context,
    ns: &str,
    pod: &Pod,
    mut meta: serde_json::Value,
) -> Result<(), Error> {
    let name = pod.name_any();
    ctx.guard(&format!("pod {ns}/{name}"))?;
    meta["uid"] = json!(pod.uid());
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    match api
        .patch(
            &name,
            &write_params(),
            &Patch::Merge(json!({"metadata": meta})),
        )
        .await
    {
        Ok(_) => {
            ctx.metrics.label_writes.inc();
            info!(cluster = %cluster_name(vc), pod = %name, "labels written");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 || replaced(&e) => {
            info!(cluster = %cluster_name(vc), pod = %name, reason = %e.message, "pod gone or replaced; labels not written");
            Ok(())
        }
        Err(source) => Err(Error::PatchPod {
            cluster: cluster_name(vc),
            pod: name,
            source,
        }),
    }
}

/// Whether a refused patch was refused because the pod's UID is not the one in the patch:
/// the API server says the immutable `metadata.uid` would change.
fn replaced(status: &kube::core::Status) -> bool {
    status.code == 409
        || (status.code == 422
            && status
                .details
                .iter()
                .flat_map(|d| d.causes.iter())
                .any(|c| c.field == "metadata.uid"))
}

/// Every merge patch carries our field manager, so `managedFields` names us.
fn write_params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    }
}

/// Creates, repairs and deletes the generated Services; returns why any could not be put in
/// place (a foreign Service with the name).
async fn converge_services(
    vc: &VaultCluster,
    ctx: &Context,
    pods_owned: bool,
) -> Result<Vec<String>, Error> {
    let api: Api<Service> =
        Api::namespaced(ctx.client.clone(), &vc.namespace().unwrap_or_default());
    let mut problems = Vec::new();
    let desired = services::desired(vc);
    for (_, want) in &desired {
        let mut want = want.clone();
        let name = want.name_any();
        let existing = api
            .get_opt(&name)
            .await
            .map_err(|source| Error::ReadService {
                cluster: cluster_name(vc),
                service: name.clone(),
                source,
            })?;
        if let Some(have) = &existing {
            if !services::owned_by(have, vc) {
                problems.push(format!(
                    "Service {name} exists and is not owned by this VaultCluster; left alone"
                ));
                continue;
            }
            services::defer_owner_selector(&mut want, have, pods_owned);
            if !services::drifted(have, &want) {
                continue;
            }
        }
        ctx.guard(&format!("Service {name}"))?;
        let params = PatchParams::apply(MANAGER).force();
        api.patch(&name, &params, &Patch::Apply(&want))
            .await
            .map_err(service_write_failed(vc, &name))?;
        service_written(vc, ctx, &name, "applied");
    }
    remove_unwanted_services(vc, ctx, &api, &desired).await?;
    Ok(problems)
}

/// Deletes Services this VaultCluster owns that are no longer wanted (disabled or renamed).
async fn remove_unwanted_services(
    vc: &VaultCluster,
    ctx: &Context,
    api: &Api<Service>,
    desired: &[(Kind, Service)],
) -> Result<(), Error> {
    let selector = format!("{}={}", services::CLUSTER_LABEL, vc.name_any());
    let owned = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::ReadService {
            cluster: cluster_name(vc),
            service: selector.clone(),
            source,
        })?;
    for svc in owned.items.iter().filter(|s| services::owned_by(s, vc)) {
        let name = svc.name_any();
        if desired.iter().any(|(_, want)| want.name_any() == name) {
            continue;
        }
        ctx.guard(&format!("Service {name}"))?;
        api.delete(&name, &DeleteParams::default())
            .await
            .map_err(service_write_failed(vc, &name))?;
        service_written(vc, ctx, &name, "removed");
    }
    Ok(())
}

fn service_write_failed(vc: &VaultCluster, name: &str) -> impl FnOnce(kube::Error) -> Error {
    let (cluster, service) = (cluster_name(vc), name.to_string());
    move |source| Error::WriteService {
        cluster,
        service,
        source,
    }
}

fn service_written(vc: &VaultCluster, ctx: &Context, name: &str, what: &str) {
    ctx.metrics.service_writes.inc();
    info!(cluster = %cluster_name(vc), service = %name, "Service {what}");
}

/// Reports a spec the operator cannot act on, touching nothing else: the labels are held
/// and the last observation stays in the status.
async fn report_invalid(
    vc: &VaultCluster,
    ctx: &Context,
    problem: String,
) -> Result<Action, Error> {
    warn!(cluster = %cluster_name(vc), %problem, "VaultCluster spec cannot be acted on");
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = invalid_spec(vc.status.as_ref(), vc.metadata.generation, problem, now);
    publish_status(vc, ctx, status).await?;
    Ok(Action::requeue(interval(vc)))
}

/// Writes the status and its events, only if the status changed. The patch clears what the
/// new status leaves out, so a stale field cannot keep every round writing.
async fn publish_status(
    vc: &VaultCluster,
    ctx: &Context,
    status: VaultClusterStatus,
) -> Result<(), Error> {
    if vc.status.as_ref() == Some(&status) {
        return Ok(());
    }
    ctx.guard(&format!("VaultCluster {} status", cluster_name(vc)))?;
    let api: Api<VaultCluster> =
        Api::namespaced(ctx.client.clone(), &vc.namespace().unwrap_or_default());
    let patch = merge_patch(vc.status.as_ref(), &status);
    api.patch_status(&vc.name_any(), &write_params(), &Patch::Merge(patch))
        .await
        .map_err(|source| Error::UpdateStatus {
            cluster: cluster_name(vc),
            source,
        })?;
    ctx.metrics.status_writes.inc();
    for notice in notices(vc.status.as_ref(), &status) {
        if notice.reason == "ActiveChanged" {
            let labels = [vc.namespace().unwrap_or_default(), vc.name_any()];
            ctx.metrics
                .active_changes
                .with_label_values(&[labels[0].as_str(), labels[1].as_str()])
                .inc();
        }
        publish_event(vc, ctx, notice).await;
    }
    Ok(())
}

async fn publish_event(vc: &VaultCluster, ctx: &Context, notice: Notice) {
    info!(cluster = %cluster_name(vc), reason = notice.reason, message = %notice.message, "event");
    let event = KubeEvent {
        type_: if notice.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: notice.reason.into(),
        note: Some(notice.message),
        action: "Reconcile".into(),
        secondary: notice.pod.map(|pod| ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod),
            namespace: vc.namespace(),
            ..Default::default()
        }),
    };
    if let Err(e) = ctx.recorder.publish(&event, &vc.object_ref(&())).await {
        warn!(cluster = %cluster_name(vc), error = %e, "publishing event failed");
    }
}

fn record_gauges(vc: &VaultCluster, ctx: &Context, s: &VaultClusterStatus) {
    let (ns, name) = (vc.namespace().unwrap_or_default(), vc.name_any());
    for (role, n) in [
        ("all", s.pods),
        ("active", s.active),
        ("standby", s.standby),
        ("perf-standby", s.perf_standby),
        ("sealed", s.sealed),
        ("uninitialized", s.uninitialized),
        ("unreachable", s.unreachable),
    ] {
        ctx.metrics
            .cluster_pods
            .with_label_values(&[ns.as_str(), name.as_str(), role])
            .set(n as i64);
    }
    let ready = s
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    ctx.metrics
        .cluster_ready
        .with_label_values(&[ns.as_str(), name.as_str()])
        .set(ready as i64);
}

/// Removes our labels from every pod this VaultCluster labelled, then lets it go.
async fn cleanup(vc: &VaultCluster, ctx: &Context) -> Result<Action, Error> {
    let names = LabelNames::new(&vc.spec.label_prefix);
    let pods = observe_pods(vc, ctx).await?;
    let others = ctx.other_clusters();
    for pod in &pods {
        let ours = owner_of(pod) == Some(&vc.name_any())
            || (selector::matches(&vc.spec.selector, pod.labels())
                && selector::claimed_by_older(vc, &others, pod.labels()).is_none());
        if ours && !diff(pod.labels(), &removal(&names)).is_empty() {
            strip_labels(vc, ctx, &names, pod).await?;
        }
    }
    ctx.trackers
        .lock()
        .unwrap()
        .remove(&vc.uid().unwrap_or_default());
    info!(cluster = %cluster_name(vc), "labels removed; VaultCluster may go");
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_rounds_keep_their_period() {
        let ms = Duration::from_millis;
        let cases = [
            ("steady", ms(2000), ms(30), true, ms(1970)),
            (
                "slow round still starts on time",
                ms(2000),
                ms(1500),
                true,
                ms(500),
            ),
            (
                "round longer than interval",
                ms(1000),
                ms(1200),
                true,
                ms(50),
            ),
            (
                "no active pod: four times as often",
                ms(2000),
                ms(0),
                false,
                ms(500),
            ),
            (
                "no active pod, short interval: floor",
                ms(400),
                ms(0),
                false,
                ms(200),
            ),
        ];
        for (name, interval, took, active, want) in cases {
            assert_eq!(next_probe(interval, took, active), want, "{name}");
        }
    }

    #[test]
    fn failed_reconciles_back_off() {
        let got: Vec<u128> = (1..=9).map(|n| retry_after(n).as_millis()).collect();
        assert_eq!(got, [250, 500, 1000, 2000, 4000, 8000, 10000, 10000, 10000]);
    }

    #[test]
    fn only_a_changed_uid_counts_as_replaced() {
        let status = |code: u16, field: &str| -> kube::core::Status {
            serde_json::from_value(json!({
                "status": "Failure", "code": code, "message": "refused", "reason": "Invalid",
                "details": {"name": "p", "group": "", "kind": "pods", "causes": [{"field": field}]},
            }))
            .unwrap()
        };
        assert!(replaced(&status(422, "metadata.uid")));
        assert!(replaced(&status(409, "")));
        assert!(
            !replaced(&status(422, "metadata.labels")),
            "a refused write is an error"
        );
        assert!(!replaced(&status(403, "metadata.uid")));
    }

    fn pod(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Pod {
        let map = |pairs: &[(&str, &str)]| {
            Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let mut pod = Pod::default();
        pod.metadata.name = Some(format!("p{}", labels.len() * 10 + annotations.len()));
        pod.metadata.labels = map(labels);
        pod.metadata.annotations = map(annotations);
        pod
    }

    #[test]
    fn strays_are_found_by_label_or_legacy_annotation() {
        let spec = serde_yaml::from_str("selector: {matchLabels: {app: vault}}").unwrap();
        let vc = VaultCluster::new("vault", spec);
        let pods = vec![
            pod(&[("app", "vault")], &[]),
            pod(&[("app", "retired"), (OWNER_LABEL, "vault")], &[]),
            pod(&[], &[(LEGACY_OWNER_ANNOTATION, "vault")]),
            pod(
                &[("other", "x"), ("more", "y"), (OWNER_LABEL, "another")],
                &[],
            ),
        ];
        let selection = select(&vc, &[], pods);
        let names = |p: &[Pod]| p.iter().map(|p| p.name_any()).collect::<Vec<_>>();
        assert_eq!(names(&selection.candidates), ["p10"]);
        assert_eq!(names(&selection.strays), ["p20", "p1"]);
    }
}
