//! The watch caches a round reads instead of the API server: pods (slimmed), the generated
//! Services, their EndpointSlices and the VaultClusters, each kept in an index by a watch
//! task of its own (see `drive`), which also sends the reconciles its events call for. A
//! CA bundle is read once per VaultCluster generation and again only when every probe of
//! the cluster failed its TLS handshake, so that a rotated CA is picked up without a read
//! every round.
//!
//! The pod cache keeps only the label keys some VaultCluster reads (its selector's and its
//! role labels') and the operator's own: a namespace may hold pods with hundreds of
//! kilobytes of labels that no one here reads. When a VaultCluster starts reading a key
//! the cache dropped, the pods are listed again, and that cluster's rounds wait until a
//! list started after the key was wanted is whole (`learned`): a round must never take a
//! pod for unselected because the cache had not kept the label that selects it.
//!
//! Everything here belongs to one term of leadership: `new_term` empties the indexes and
//! the sync marks, and a watch task of an older term can no longer write into them. A
//! round reads the caches only once every kind has listed in the current term.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use futures::{SinkExt, Stream, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::settings::{CaKind, CaSource};
use crate::crd::VaultCluster;
use crate::index::{ClusterIndex, LabelledIndex, PodIndex, SlimPod};
use crate::pod_view::PodView;

/// The kinds whose first list in a term a round waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Pods,
    Services,
    Slices,
    Clusters,
    /// StatefulSets, for `spec.upgrade`.
    Sets,
}

/// What every round reads, for all watched namespaces.
pub struct Caches {
    pub pods: RwLock<PodIndex>,
    pub clusters: RwLock<ClusterIndex>,
    pub services: RwLock<LabelledIndex<Service>>,
    pub slices: RwLock<LabelledIndex<EndpointSlice>>,
    /// StatefulSets without their pod templates (see `slim_set`), for `spec.upgrade`.
    pub sets: RwLock<LabelledIndex<StatefulSet>>,
    /// The term of leadership the indexes belong to.
    term: AtomicU64,
    synced: Mutex<HashSet<(Kind, Option<String>)>>,
    /// Per scope, the key epoch (`ClusterIndex::epoch`) at which the last whole pod list
    /// began: the cache holds every label key wanted by then.
    learned: Mutex<HashMap<Option<String>, u64>>,
    /// The key epoch, sent each time a VaultCluster starts reading a new label key.
    keys: watch::Sender<u64>,
    ca: Mutex<HashMap<CaKey, CaEntry>>,
    /// Per scope, the controller's store of VaultClusters (kube's reflector). The index
    /// takes a cluster from there when it is the same version, so the two share one
    /// object instead of keeping a copy each (4.3 MB at 1,000 clusters in a heap profile).
    stores: Mutex<HashMap<Option<String>, Store<VaultCluster>>>,
}

impl Default for Caches {
    fn default() -> Self {
        Self {
            pods: RwLock::default(),
            clusters: RwLock::default(),
            services: RwLock::default(),
            slices: RwLock::default(),
            sets: RwLock::default(),
            term: AtomicU64::default(),
            synced: Mutex::default(),
            learned: Mutex::default(),
            keys: watch::Sender::new(0),
            ca: Mutex::default(),
            stores: Mutex::default(),
        }
    }
}

/// Least time between the starts of two pod lists that learn new label keys, so that
/// VaultCluster edits cannot make the operator list every pod back to back.
const RELEARN_GAP: Duration = Duration::from_secs(1);

/// (namespace, where the bundle is)
type CaKey = (String, CaSource);

/// One bundle, shared by every VaultCluster that names its source.
struct CaEntry {
    pem: Vec<u8>,
    /// The generation of each VaultCluster (by UID) when it last took this bundle: a
    /// cluster's own edit reads it again, another cluster's generation does not.
    seen: HashMap<String, Option<i64>>,
    read: Instant,
    /// Why the last read failed, when the spec is to blame (the source gone): reported
    /// for as long as the bundle read before stands in.
    problem: Option<String>,
}

/// A CA bundle older than this is read again when every probe failed its TLS handshake.
const CA_RETRY: Duration = Duration::from_secs(30);
/// A client certificate is read again this often: it is renewed (cert-manager, Vault PKI)
/// well before it expires, and the listener refuses the old one only once it has.
const CLIENT_CERT_AGE: Duration = Duration::from_secs(300);

impl Caches {
    /// Starts a new term of leadership: forgets every object, sync mark and CA bundle of
    /// the previous one, so nothing it saw decides in this one. Returns the term, which
    /// the new term's watch tasks carry.
    pub fn new_term(&self) -> u64 {
        // The term moves first: a watch task of the old term that takes an index lock
        // after this sees that it is stale, and one that held the lock before is undone
        // by the clearing below.
        let term = self.term.fetch_add(1, Ordering::SeqCst) + 1;
        self.synced.lock().unwrap().clear();
        self.learned.lock().unwrap().clear();
        self.ca.lock().unwrap().clear();
        *self.pods.write().unwrap() = PodIndex::default();
        let mut clusters = self.clusters.write().unwrap();
        *clusters = ClusterIndex::starting_at(clusters.epoch());
        drop(clusters);
        *self.services.write().unwrap() = LabelledIndex::default();
        *self.slices.write().unwrap() = LabelledIndex::default();
        *self.sets.write().unwrap() = LabelledIndex::default();
        term
    }

    /// Shares the controller's store of a scope's VaultClusters with the index (`shared`).
    pub fn share_store(&self, scope: &Option<String>, store: Store<VaultCluster>) {
        self.stores.lock().unwrap().insert(scope.clone(), store);
    }

    /// `vc` as a controller's store holds it, if that is the same version: the reflector
    /// applied the event before passing it on, so after an update or a whole list it has
    /// it. Otherwise (a status write's answer, a store of an older term) a copy of its own.
    fn shared(&self, vc: VaultCluster) -> Arc<VaultCluster> {
        let key = ObjectRef::from_obj(&vc);
        let same = |held: &Arc<VaultCluster>| {
            let (a, b) = (&held.metadata, &vc.metadata);
            a.uid.is_some() && a.uid == b.uid && a.resource_version == b.resource_version
        };
        let stores = self.stores.lock().unwrap();
        let held = stores.values().filter_map(|s| s.get(&key)).find(same);
        held.unwrap_or_else(|| Arc::new(vc))
    }

    pub fn term(&self) -> u64 {
        self.term.load(Ordering::SeqCst)
    }

    /// Whether each kind finished a list in each scope during the current term.
    pub fn synced(&self, scopes: &[Option<String>]) -> bool {
        let synced = self.synced.lock().unwrap();
        scopes.iter().all(|scope| {
            [
                Kind::Pods,
                Kind::Services,
                Kind::Slices,
                Kind::Clusters,
                Kind::Sets,
            ]
            .iter()
            .all(|kind| synced.contains(&(*kind, scope.clone())))
        })
    }

    fn mark_synced(&self, term: u64, kind: Kind, scope: &Option<String>) {
        let mut synced = self.synced.lock().unwrap();
        if self.term() == term {
            synced.insert((kind, scope.clone()));
        }
    }

    fn listed(&self, kind: Kind, scope: &Option<String>) -> bool {
        self.synced.lock().unwrap().contains(&(kind, scope.clone()))
    }

    /// The current key epoch.
    fn key_epoch(&self) -> u64 {
        self.clusters.read().unwrap().epoch()
    }

    fn mark_learned(&self, term: u64, scope: &Option<String>, epoch: u64) {
        let mut learned = self.learned.lock().unwrap();
        if self.term() == term {
            learned.insert(scope.clone(), epoch);
        }
    }

    /// Whether the pod cache of `scope` holds every label `vc` reads: a pod list begun
    /// after the cluster index wanted them all is whole.
    pub fn learned(&self, scope: &Option<String>, vc: &VaultCluster) -> bool {
        let Some(needed) = self.clusters.read().unwrap().keys_epoch(vc) else {
            return false;
        };
        let learned = self.learned.lock().unwrap().get(scope).copied();
        learned.is_some_and(|epoch| epoch >= needed)
    }

    /// The cached CA bundle, unless this VaultCluster (`uid`) changed since it took it,
    /// or the cluster's probes all failed verification and it was read a while ago. With
    /// it, the spec's problem with the source, if the last read failed.
    pub fn ca(
        &self,
        key: &CaKey,
        uid: &str,
        generation: Option<i64>,
        tls_failing: bool,
    ) -> Option<(Vec<u8>, Option<String>)> {
        let cache = self.ca.lock().unwrap();
        let entry = cache.get(key)?;
        let stale = entry.seen.get(uid) != Some(&generation)
            || (tls_failing && entry.read.elapsed() >= CA_RETRY)
            || (key.1.kind == CaKind::ClientCert && entry.read.elapsed() >= CLIENT_CERT_AGE);
        (!stale).then(|| (entry.pem.clone(), entry.problem.clone()))
    }

    /// Records that reading the source failed for the spec's reason; returns the bundle
    /// read before, which stands in (and is not read again before the next edit).
    pub fn ca_failed(
        &self,
        key: &CaKey,
        uid: &str,
        generation: Option<i64>,
        problem: String,
    ) -> Option<Vec<u8>> {
        let mut cache = self.ca.lock().unwrap();
        let entry = cache.get_mut(key)?;
        entry.seen.insert(uid.to_string(), generation);
        entry.read = Instant::now();
        entry.problem = Some(problem);
        Some(entry.pem.clone())
    }

    /// The bundle last read, however old: what keeps the probes going when the source
    /// cannot be read again.
    pub fn last_ca(&self, key: &CaKey) -> Option<Vec<u8>> {
        self.ca.lock().unwrap().get(key).map(|e| e.pem.clone())
    }

    /// Keeps a bundle just read for `uid` at `generation`; the other clusters sharing the
    /// source take the new bundle too.
    pub fn remember_ca(&self, key: CaKey, uid: &str, generation: Option<i64>, pem: Vec<u8>) {
        let mut cache = self.ca.lock().unwrap();
        let entry = cache.entry(key).or_insert_with(|| CaEntry {
            pem: Vec::new(),
            seen: HashMap::new(),
            read: Instant::now(),
            problem: None,
        });
        entry.pem = pem;
        entry.problem = None;
        entry.read = Instant::now();
        entry.seen.insert(uid.to_string(), generation);
    }
}

/// Changes one index, unless the caller's term is over.
fn within_term<I>(caches: &Caches, lock: &RwLock<I>, term: u64, change: impl FnOnce(&mut I)) {
    let mut index = lock.write().unwrap();
    if caches.term() == term {
        change(&mut index);
    }
}

/// Where one watch task sends the VaultClusters whose reconcile its events call for.
pub type Triggers = mpsc::Sender<ObjectRef<VaultCluster>>;

/// One watch of one kind in one scope, for one term.
pub struct Feed<T, K> {
    pub caches: std::sync::Arc<Caches>,
    pub term: u64,
    pub kind: Kind,
    pub scope: Option<String>,
    /// Applies a change to the kind's index.
    pub update: fn(&Caches, u64, Update<T>),
    /// What the index keeps of an object.
    pub slim: fn(&Caches, &K) -> T,
}

/// What every watch of one scope and term shares.
pub struct Feeds {
    pub caches: std::sync::Arc<Caches>,
    pub term: u64,
    pub scope: Option<String>,
}

impl Feeds {
    pub fn of<T, K>(
        &self,
        kind: Kind,
        update: fn(&Caches, u64, Update<T>),
        slim: fn(&Caches, &K) -> T,
    ) -> Feed<T, K> {
        Feed {
            caches: self.caches.clone(),
            term: self.term,
            kind,
            scope: self.scope.clone(),
            update,
            slim,
        }
    }
}

/// Drives one watch for as long as its term lasts: every event goes into the index first,
/// then the reconciles it calls for (`triggered`) go to the controller, so a reconcile
/// already reads what triggered it. A failing watch waits `backoff` and goes on by itself:
/// it never pauses the other watches or the controller, and after the API server comes
/// back it resumes (or, on 410 Gone, relists) within one backoff step.
///
/// The pod watch starts once the VaultClusters of its scope have listed, so that its first
/// list keeps the labels they read, and starts over (`watch` again: a new list) when they
/// read a label key it has not kept.
pub async fn drive<K, T, S>(
    mut watch: impl FnMut() -> S,
    feed: Feed<T, K>,
    mut triggered: impl FnMut(&K) -> Vec<ObjectRef<VaultCluster>>,
    mut triggers: Triggers,
) where
    K: ResourceExt,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let pods = feed.kind == Kind::Pods;
    let mut keys = feed.caches.keys.subscribe();
    let mut failures = 0u32;
    loop {
        if pods && !clusters_listed(&feed).await {
            return; // the term is over
        }
        let started = tokio::time::Instant::now();
        let mut stream = std::pin::pin!(watch());
        let mut list = List {
            objects: Vec::new(),
            began: None,
            learned: None,
            listing: true,
        };
        loop {
            let event = tokio::select! {
                event = stream.next() => event,
                // While the watch follows, a new key: list again.
                Ok(()) = keys.changed(), if pods && list.whole() => {
                    if feed.caches.key_epoch() > list.learned.unwrap_or(0) {
                        break;
                    }
                    continue;
                }
            };
            let Some(event) = event else { return };
            let event = match event {
                Ok(event) => {
                    failures = 0;
                    event
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures);
                    if failures == 1 {
                        warn!(kind = ?feed.kind, scope = ?feed.scope, %error, "watch failed; retrying");
                    } else {
                        debug!(kind = ?feed.kind, scope = ?feed.scope, %error, ?wait, "watch still failing");
                    }
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            list.follow(&feed, &event);
            let object = apply(&feed, &mut list.objects, &event);
            for cluster in object.map(&mut triggered).unwrap_or_default() {
                if triggers.send(cluster).await.is_err() {
                    return; // the controller is gone: so is the term
                }
            }
            // A list just whole, begun before keys were added: list again.
            if pods
                && matches!(event, watcher::Event::InitDone)
                && feed.caches.key_epoch() > list.learned.unwrap_or(0)
            {
                break;
            }
        }
        debug!(scope = ?feed.scope, "pods listed again for new label keys");
        tokio::time::sleep_until(started + RELEARN_GAP).await;
    }
}

/// Waits until the VaultClusters of the feed's scope have listed; false if the term ended.
async fn clusters_listed<T, K>(feed: &Feed<T, K>) -> bool {
    while !feed.caches.listed(Kind::Clusters, &feed.scope) {
        if feed.caches.term() != feed.term {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// One watch's list in progress, and what the last whole one learned.
struct List<T> {
    objects: Vec<T>,
    /// The key epoch when the list in progress began.
    began: Option<u64>,
    /// The key epoch when the last whole list began.
    learned: Option<u64>,
    listing: bool,
}

impl<T> List<T> {
    fn whole(&self) -> bool {
        self.learned.is_some() && !self.listing
    }

    /// Notes a list's start and end; a whole pod list tells the caches what it learned.
    fn follow<K>(&mut self, feed: &Feed<T, K>, event: &watcher::Event<K>) {
        match event {
            watcher::Event::Init => {
                self.listing = true;
                self.began = Some(feed.caches.key_epoch());
            }
            watcher::Event::InitDone => {
                self.listing = false;
                self.learned = self.began;
                if let (Kind::Pods, Some(epoch)) = (feed.kind, self.began) {
                    feed.caches.mark_learned(feed.term, &feed.scope, epoch);
                }
            }
            _ => {}
        }
    }
}

/// Applies one watch event to the feed's index; returns the object it touched, if any.
fn apply<'e, K: ResourceExt, T>(
    feed: &Feed<T, K>,
    listing: &mut Vec<T>,
    event: &'e watcher::Event<K>,
) -> Option<&'e K> {
    let update = |u| (feed.update)(&feed.caches, feed.term, u);
    match event {
        watcher::Event::Init => listing.clear(),
        watcher::Event::InitApply(object) => {
            listing.push((feed.slim)(&feed.caches, object));
            return Some(object);
        }
        watcher::Event::InitDone => {
            update(Update::Relisted(&feed.scope, std::mem::take(listing)));
            feed.caches.mark_synced(feed.term, feed.kind, &feed.scope);
        }
        watcher::Event::Apply(object) => {
            update(Update::Applied((feed.slim)(&feed.caches, object)));
            return Some(object);
        }
        watcher::Event::Delete(object) => {
            let (ns, name) = (object.namespace().unwrap_or_default(), object.name_any());
            update(Update::Deleted(ns, name));
            return Some(object);
        }
    }
    None
}

/// How long a watch waits after its `failures`-th error in a row: 100 ms doubling to 2 s.
/// Short, because every cache must follow the API server soon after it comes back; each
/// watch backs off alone, so the API server sees at most one request per watch per step.
pub fn backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(100);
    base.saturating_mul(1 << failures.saturating_sub(1).min(5))
        .min(Duration::from_secs(2))
}

/// One change to an index.
pub enum Update<'a, T> {
    /// A fresh list of a scope: everything else in the scope is gone.
    Relisted(&'a Option<String>, Vec<T>),
    Applied(T),
    Deleted(String, String),
}

/// Applies updates to the pod index.
pub fn pods(caches: &Caches, term: u64, update: Update<SlimPod>) {
    within_term(caches, &caches.pods, term, |index| match update {
        Update::Relisted(scope, pods) => {
            index.clear_scope(scope.as_deref());
            pods.into_iter().for_each(|p| index.apply(p));
        }
        Update::Applied(pod) => index.apply(pod),
        Update::Deleted(ns, name) => index.delete(&ns, &name),
    });
}

/// Applies updates to the VaultCluster index; when they read a label key no cluster read
/// before, the pod watches list again to learn it.
pub fn clusters(caches: &Caches, term: u64, update: Update<VaultCluster>) {
    let mut grew = None;
    within_term(caches, &caches.clusters, term, |index| {
        match update {
            Update::Relisted(scope, all) => {
                index.clear_scope(scope.as_deref());
                all.into_iter()
                    .for_each(|vc| index.apply(caches.shared(vc)));
            }
            Update::Applied(vc) => index.apply(caches.shared(vc)),
            Update::Deleted(ns, name) => index.delete(&ns, &name),
        }
        grew = index.settle().then(|| index.epoch());
    });
    if let Some(epoch) = grew {
        caches.keys.send_replace(epoch);
    }
}

/// What the VaultCluster index keeps: all but the managed fields (see `run`).
pub fn cluster(_: &Caches, vc: &VaultCluster) -> VaultCluster {
    vc.clone()
}

/// Applies updates to the Service index.
pub fn services(caches: &Caches, term: u64, update: Update<Service>) {
    within_term(caches, &caches.services, term, |index| {
        labelled(index, update)
    });
}

/// Applies updates to the EndpointSlice index.
pub fn slices(caches: &Caches, term: u64, update: Update<EndpointSlice>) {
    within_term(caches, &caches.slices, term, |index| {
        labelled(index, update)
    });
}

/// Applies updates to the StatefulSet index.
pub fn sets(caches: &Caches, term: u64, update: Update<StatefulSet>) {
    within_term(caches, &caches.sets, term, |index| labelled(index, update));
}

fn labelled<K: ResourceExt>(index: &mut LabelledIndex<K>, update: Update<K>) {
    match update {
        Update::Relisted(scope, all) => {
            index.clear_scope(scope.as_deref());
            all.into_iter().for_each(|o| index.apply(o));
        }
        Update::Applied(object) => index.apply(object),
        Update::Deleted(ns, name) => index.delete(&ns, &name),
    }
}

/// What the caches keep of a pod: the labels some VaultCluster reads, and ours.
pub fn slim_pod(caches: &Caches, pod: &PodView) -> SlimPod {
    let clusters = caches.clusters.read().unwrap();
    SlimPod::trimmed(pod, |key| clusters.wants(key))
}

/// What the caches keep of a StatefulSet: what `upgrade::SetView` reads, not the pod
/// template, which can be most of its size.
pub fn slim_set(set: &StatefulSet) -> StatefulSet {
    let mut slim = trimmed(set);
    if let Some(spec) = slim.spec.as_mut() {
        spec.template = Default::default();
        spec.volume_claim_templates = None;
    }
    slim
}

/// What the caches keep of an EndpointSlice: its names, labels and endpoint addresses, all
/// that a round reads (`act::await_active_endpoints_drained`). Targets, conditions, ports and
/// owners were most of it: 8.5 MB for 2,000 slices in a heap profile at 1,000 clusters.
pub fn slim_slice(slice: &EndpointSlice) -> EndpointSlice {
    let meta = &slice.metadata;
    EndpointSlice {
        metadata: ObjectMeta {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            labels: meta.labels.clone(),
            ..ObjectMeta::default()
        },
        address_type: slice.address_type.clone(),
        endpoints: slice
            .endpoints
            .iter()
            .map(|e| Endpoint {
                addresses: e.addresses.clone(),
                ..Endpoint::default()
            })
            .collect(),
        ports: None,
    }
}

/// What the caches keep of a Service: no managed fields, which are most
/// of an object's size and never read.
pub fn trimmed<K: ResourceExt + Clone>(object: &K) -> K {
    let mut object = object.clone();
    object.managed_fields_mut().clear();
    object
}

#[cfg(test)]
mod tests {
    use super::super::settings::CaKind;
    use super::*;

    #[test]
    fn a_slim_slice_keeps_names_labels_and_addresses_only() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "vault-active-x", "namespace": "ns", "uid": "u", "resourceVersion": "9",
                "labels": {"kubernetes.io/service-name": "vault-active"},
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-02T10:00:00Z"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "vault-active", "uid": "s"}]},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.7"], "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "name": "vault-0", "namespace": "ns", "uid": "p"}, "nodeName": "n1"}],
            "ports": [{"name": "http", "port": 8200, "protocol": "TCP"}]
        }))
        .unwrap();
        let slim = slim_slice(&slice);
        assert_eq!(slim.metadata.name, slice.metadata.name);
        assert_eq!(slim.metadata.namespace, slice.metadata.namespace);
        assert_eq!(slim.metadata.labels, slice.metadata.labels);
        assert_eq!(
            slim.metadata.resource_version,
            slice.metadata.resource_version
        );
        assert_eq!(slim.endpoints.len(), 1);
        assert_eq!(slim.endpoints[0].addresses, ["10.0.0.7"]);
        assert!(slim.endpoints[0].target_ref.is_none() && slim.endpoints[0].conditions.is_none());
        assert!(slim.metadata.annotations.is_none() && slim.metadata.owner_references.is_none());
        assert!(slim.ports.is_none());
    }

    #[test]
    fn the_ca_is_read_again_on_a_new_generation_or_a_failing_handshake() {
        let caches = Caches::default();
        let source = CaSource {
            kind: CaKind::ConfigMap,
            name: "ca".into(),
            key: "ca.crt".into(),
        };
        let key = ("ns".to_string(), source);
        let pem = |uid, generation, failing| {
            caches
                .ca(&key, uid, generation, failing)
                .map(|(pem, _)| String::from_utf8(pem).unwrap())
        };
        assert_eq!(pem("a", Some(1), false), None, "never read");
        caches.remember_ca(key.clone(), "a", Some(1), b"pem".to_vec());
        assert_eq!(pem("a", Some(1), false).as_deref(), Some("pem"));
        assert_eq!(
            pem("a", Some(1), true).as_deref(),
            Some("pem"),
            "read just now"
        );
        assert_eq!(pem("a", Some(2), false), None, "spec changed");
        // A second cluster on the same source, at another generation: one read each, then
        // neither makes the other read again.
        assert_eq!(pem("b", Some(7), false), None);
        caches.remember_ca(key.clone(), "b", Some(7), b"pem2".to_vec());
        for _ in 0..3 {
            assert_eq!(pem("a", Some(1), false).as_deref(), Some("pem2"));
            assert_eq!(pem("b", Some(7), false).as_deref(), Some("pem2"));
        }
        // The source deleted, found on an edit of "a": the bundle stands in, and the
        // problem is told every round until a read succeeds.
        let kept = caches.ca_failed(&key, "a", Some(2), "gone".into());
        assert_eq!(kept.as_deref(), Some(&b"pem2"[..]));
        for _ in 0..2 {
            let problem = caches.ca(&key, "a", Some(2), false).unwrap().1;
            assert_eq!(problem.as_deref(), Some("gone"));
        }
        caches.remember_ca(key.clone(), "a", Some(2), b"pem3".to_vec());
        assert_eq!(caches.ca(&key, "a", Some(2), false).unwrap().1, None);
        caches.new_term();
        assert_eq!(pem("a", Some(2), false), None, "a new term reads again");
    }

    fn pod(name: &str) -> SlimPod {
        let pod: PodView = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "uid": name, "resourceVersion": "1"},
        }))
        .unwrap();
        SlimPod::from(&pod)
    }

    #[test]
    fn a_new_term_starts_empty_and_unsynced_and_an_old_term_cannot_write() {
        let caches = Caches::default();
        let old = caches.new_term();
        let scope = None;
        pods(&caches, old, Update::Relisted(&scope, vec![pod("a")]));
        caches.mark_synced(old, Kind::Pods, &scope);
        let new = caches.new_term();
        assert!(
            caches.pods.read().unwrap().is_empty(),
            "nothing of the old term"
        );
        assert!(!caches.synced(&[None]));
        // A watch task of the old term still running: nothing it does counts.
        pods(&caches, old, Update::Applied(pod("b")));
        caches.mark_synced(old, Kind::Pods, &scope);
        assert!(caches.pods.read().unwrap().is_empty());
        assert!(caches.synced.lock().unwrap().is_empty());
        pods(&caches, new, Update::Applied(pod("c")));
        assert_eq!(caches.pods.read().unwrap().len(), 1);
        for kind in [Kind::Pods, Kind::Services, Kind::Slices, Kind::Sets] {
            caches.mark_synced(new, kind, &scope);
            assert!(
                !caches.synced(&[None]),
                "{kind:?}: not every kind listed yet"
            );
        }
        caches.mark_synced(new, Kind::Clusters, &scope);
        assert!(caches.synced(&[None]));
    }

    #[test]
    fn a_relist_replaces_the_scope_only_when_it_is_complete() {
        let caches = std::sync::Arc::new(Caches::default());
        let term = caches.new_term();
        let feed = Feed {
            caches,
            term,
            kind: Kind::Pods,
            scope: None,
            update: pods,
            slim: slim_pod,
        };
        let full = |name: &str| -> PodView {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "ns", "uid": name, "resourceVersion": "1"},
            }))
            .unwrap()
        };
        let mut listing = Vec::new();
        let index = |feed: &Feed<SlimPod, PodView>| {
            let index = feed.caches.pods.read().unwrap();
            let mut names: Vec<String> = ["a", "b", "c"]
                .iter()
                .filter(|n| index.get("ns", n).is_some())
                .map(|n| n.to_string())
                .collect();
            names.sort();
            names
        };
        let (a, b, c) = (full("a"), full("b"), full("c"));
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(a.clone()),
            watcher::Event::InitApply(b.clone()),
            watcher::Event::InitDone,
        ] {
            apply(&feed, &mut listing, &event);
        }
        assert_eq!(index(&feed), ["a", "b"]);
        assert!(
            feed.caches
                .synced
                .lock()
                .unwrap()
                .contains(&(Kind::Pods, None))
        );
        // A 410 relist: "a" was deleted and "c" created while the watch was down.
        apply(&feed, &mut listing, &watcher::Event::Init);
        apply(&feed, &mut listing, &watcher::Event::InitApply(b));
        apply(&feed, &mut listing, &watcher::Event::InitApply(c));
        assert_eq!(
            index(&feed),
            ["a", "b"],
            "the old view until the list is whole"
        );
        apply(&feed, &mut listing, &watcher::Event::InitDone);
        assert_eq!(index(&feed), ["b", "c"]);
        apply(&feed, &mut listing, &watcher::Event::Delete(full("b")));
        assert_eq!(index(&feed), ["c"]);
    }

    #[test]
    fn the_index_shares_the_controllers_copy_of_the_same_version_only() {
        let caches = Caches::default();
        let term = caches.new_term();
        let scope = Some("ns".to_string());
        let version = |rv: &str| {
            let spec = serde_yaml::from_str("selector: {matchLabels: {app: vault}}").unwrap();
            let mut vc = VaultCluster::new("vault", spec);
            vc.metadata.namespace = Some("ns".into());
            vc.metadata.uid = Some("u".into());
            vc.metadata.resource_version = Some(rv.into());
            vc
        };
        let (store, mut writer) = kube::runtime::reflector::store();
        caches.share_store(&scope, store.clone());
        let held = || store.get(&ObjectRef::from_obj(&version("1"))).unwrap();
        let indexed = || caches.clusters.read().unwrap().get("ns", "vault").unwrap();
        // A whole list: the store swaps it in before the index hears of it.
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(version("1")),
            watcher::Event::InitDone,
        ] {
            writer.apply_watcher_event(&event);
        }
        clusters(&caches, term, Update::Relisted(&scope, vec![version("1")]));
        assert!(Arc::ptr_eq(&indexed(), &held()), "one object for both");
        // A status write's answer is newer than the store: the index keeps its own.
        clusters(&caches, term, Update::Applied(version("2")));
        assert!(!Arc::ptr_eq(&indexed(), &held()));
        assert_eq!(indexed().metadata.resource_version.as_deref(), Some("2"));
        // The watch's update of the same version: shared again.
        writer.apply_watcher_event(&watcher::Event::Apply(version("2")));
        clusters(&caches, term, Update::Applied(version("2")));
        assert!(Arc::ptr_eq(&indexed(), &held()));
        // Another object of the same name (deleted and created again) is not taken for it.
        let mut other = version("2");
        other.metadata.uid = Some("v".into());
        clusters(&caches, term, Update::Applied(other));
        assert_eq!(indexed().metadata.uid.as_deref(), Some("v"));
        assert!(!Arc::ptr_eq(&indexed(), &held()));
    }

    #[tokio::test]
    async fn a_cluster_reading_a_new_key_waits_until_the_pods_are_listed_again() {
        let caches = std::sync::Arc::new(Caches::default());
        let term = caches.new_term();
        let scope = None;
        let vc = |name: &str, selector: &str| -> VaultCluster {
            let spec = serde_yaml::from_str(&format!("selector: {selector}")).unwrap();
            let mut vc = VaultCluster::new(name, spec);
            vc.metadata.namespace = Some("ns".into());
            vc
        };
        let old = vc("old", "{matchLabels: {app: vault}}");
        clusters(&caches, term, Update::Relisted(&scope, vec![old.clone()]));
        caches.mark_synced(term, Kind::Clusters, &scope);
        let pod: PodView = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "p", "resourceVersion": "1",
                "labels": {"app": "vault", "tier": "t", "junk": "x".repeat(60)}},
        }))
        .unwrap();
        // Each start of the watch is a new list, sent by the test.
        let (starts, mut lists) = mpsc::unbounded();
        let watch = move || {
            let (tx, rx) = mpsc::unbounded::<Result<watcher::Event<PodView>, watcher::Error>>();
            starts.unbounded_send(tx).unwrap();
            rx
        };
        let (triggers, _reconciles) = mpsc::channel(16);
        let feed = Feed {
            caches: caches.clone(),
            term,
            kind: Kind::Pods,
            scope: None,
            update: pods,
            slim: slim_pod,
        };
        let task = tokio::spawn(drive(watch, feed, |_| Vec::new(), triggers));
        let list = |tx: &mpsc::UnboundedSender<_>| {
            for event in [
                watcher::Event::Init,
                watcher::Event::InitApply(pod.clone()),
                watcher::Event::InitDone,
            ] {
                tx.unbounded_send(Ok(event)).unwrap();
            }
        };
        let labels = || {
            let index = caches.pods.read().unwrap();
            let p = index.get("ns", "p").unwrap();
            p.labels.keys().cloned().collect::<Vec<_>>()
        };
        let settle = || tokio::time::sleep(Duration::from_millis(50));
        let first = lists.next().await.unwrap();
        list(&first);
        settle().await;
        assert_eq!(labels(), ["app"], "only what a selector reads");
        assert!(caches.learned(&scope, &old));
        // A cluster that selects on `tier`: the pods are listed again, and it waits.
        let new = vc("new", "{matchLabels: {tier: t}}");
        clusters(&caches, term, Update::Applied(new.clone()));
        assert!(!caches.learned(&scope, &new), "tier was dropped");
        assert!(caches.learned(&scope, &old), "the old cluster goes on");
        let second = tokio::time::timeout(Duration::from_secs(3), lists.next())
            .await
            .expect("a new list")
            .unwrap();
        second.unbounded_send(Ok(watcher::Event::Init)).unwrap();
        second
            .unbounded_send(Ok(watcher::Event::InitApply(pod.clone())))
            .unwrap();
        settle().await;
        assert!(
            !caches.learned(&scope, &new),
            "not before the list is whole"
        );
        second.unbounded_send(Ok(watcher::Event::InitDone)).unwrap();
        settle().await;
        assert!(caches.learned(&scope, &new));
        assert_eq!(labels(), ["app", "tier"]);
        // A status write of a cluster reads no new key: no list.
        let mut written = new.clone();
        written.metadata.resource_version = Some("2".into());
        clusters(&caches, term, Update::Applied(written));
        settle().await;
        assert!(lists.try_recv().is_err(), "no third list");
        task.abort();
    }

    #[test]
    fn a_failing_watch_retries_within_two_seconds() {
        let got: Vec<u128> = (1..=8).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
    }
}
