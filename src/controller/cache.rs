//! The watch caches a round reads instead of the API server: pods (slimmed), the generated
//! Services, their EndpointSlices and the VaultClusters, each kept in an index by the watch
//! streams that also trigger reconciles. A CA bundle is read once per VaultCluster
//! generation and again only when every probe of the cluster failed its TLS handshake, so
//! that a rotated CA is picked up without a read every round.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::runtime::watcher;

use super::settings::CaSource;
use crate::crd::VaultCluster;
use crate::index::{ClusterIndex, LabelledIndex, PodIndex, SlimPod};

/// The kinds whose first list readiness waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Pods,
    Services,
    Slices,
    Clusters,
}

/// What every round reads, for all watched namespaces.
#[derive(Default)]
pub struct Caches {
    pub pods: RwLock<PodIndex>,
    pub clusters: RwLock<ClusterIndex>,
    pub services: RwLock<LabelledIndex<Service>>,
    pub slices: RwLock<LabelledIndex<EndpointSlice>>,
    synced: Mutex<HashSet<(Kind, Option<String>)>>,
    ca: Mutex<HashMap<CaKey, CaEntry>>,
}

/// (namespace, where the bundle is)
type CaKey = (String, CaSource);

struct CaEntry {
    pem: Vec<u8>,
    generation: Option<i64>,
    read: Instant,
}

/// A CA bundle older than this is read again when every probe failed its TLS handshake.
const CA_RETRY: Duration = Duration::from_secs(30);

impl Caches {
    /// Forgets everything, for a new term of leadership.
    pub fn reset(&self) {
        self.synced.lock().unwrap().clear();
        self.ca.lock().unwrap().clear();
    }

    /// Whether each kind finished its first list in each scope.
    pub fn synced(&self, scopes: &[Option<String>]) -> bool {
        let synced = self.synced.lock().unwrap();
        scopes.iter().all(|scope| {
            [Kind::Pods, Kind::Services, Kind::Slices, Kind::Clusters]
                .iter()
                .all(|kind| synced.contains(&(*kind, scope.clone())))
        })
    }

    fn mark_synced(&self, kind: Kind, scope: &Option<String>) {
        self.synced.lock().unwrap().insert((kind, scope.clone()));
    }

    /// The cached CA bundle, unless the VaultCluster changed since it was read, or the
    /// cluster's probes all failed verification and it was read a while ago.
    pub fn ca(&self, key: &CaKey, generation: Option<i64>, tls_failing: bool) -> Option<Vec<u8>> {
        let cache = self.ca.lock().unwrap();
        let entry = cache.get(key)?;
        let stale =
            entry.generation != generation || (tls_failing && entry.read.elapsed() >= CA_RETRY);
        (!stale).then(|| entry.pem.clone())
    }

    /// The bundle last read, however old.
    pub fn last_ca(&self, key: &CaKey) -> Option<Vec<u8>> {
        self.ca.lock().unwrap().get(key).map(|e| e.pem.clone())
    }

    pub fn remember_ca(&self, key: CaKey, generation: Option<i64>, pem: Vec<u8>) {
        let entry = CaEntry {
            pem,
            generation,
            read: Instant::now(),
        };
        self.ca.lock().unwrap().insert(key, entry);
    }
}

/// Keeps one index current from a watch stream of one scope, and passes the events on.
/// The index is updated before the event reaches the controller, so the reconcile an
/// event triggers already reads it.
pub fn feed<K, T>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    caches: std::sync::Arc<Caches>,
    kind: Kind,
    scope: Option<String>,
    mut update: impl FnMut(&Caches, Update<T>) + Send + 'static,
    slim: impl Fn(&K) -> T + Send + 'static,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send
where
    K: ResourceExt + Send + 'static,
    T: Send + 'static,
{
    let mut listing: Vec<T> = Vec::new();
    stream.map(move |event| {
        match &event {
            Ok(watcher::Event::Init) => listing.clear(),
            Ok(watcher::Event::InitApply(object)) => listing.push(slim(object)),
            Ok(watcher::Event::InitDone) => {
                update(
                    &caches,
                    Update::Relisted(&scope, std::mem::take(&mut listing)),
                );
                caches.mark_synced(kind, &scope);
            }
            Ok(watcher::Event::Apply(object)) => update(&caches, Update::Applied(slim(object))),
            Ok(watcher::Event::Delete(object)) => update(
                &caches,
                Update::Deleted(object.namespace().unwrap_or_default(), object.name_any()),
            ),
            Err(_) => {}
        }
        event
    })
}

/// One change to an index.
pub enum Update<'a, T> {
    /// A fresh list of a scope: everything else in the scope is gone.
    Relisted(&'a Option<String>, Vec<T>),
    Applied(T),
    Deleted(String, String),
}

/// Applies updates to the pod index.
pub fn pods(caches: &Caches, update: Update<SlimPod>) {
    let mut index = caches.pods.write().unwrap();
    match update {
        Update::Relisted(scope, pods) => {
            index.clear_scope(scope.as_deref());
            pods.into_iter().for_each(|p| index.apply(p));
        }
        Update::Applied(pod) => index.apply(pod),
        Update::Deleted(ns, name) => index.delete(&ns, &name),
    }
}

/// Applies updates to the VaultCluster index.
pub fn clusters(caches: &Caches, update: Update<VaultCluster>) {
    let mut index = caches.clusters.write().unwrap();
    match update {
        Update::Relisted(scope, all) => {
            index.clear_scope(scope.as_deref());
            all.into_iter().for_each(|vc| index.apply(vc));
        }
        Update::Applied(vc) => index.apply(vc),
        Update::Deleted(ns, name) => index.delete(&ns, &name),
    }
}

/// Applies updates to the Service index.
pub fn services(caches: &Caches, update: Update<Service>) {
    labelled(&mut caches.services.write().unwrap(), update);
}

/// Applies updates to the EndpointSlice index.
pub fn slices(caches: &Caches, update: Update<EndpointSlice>) {
    labelled(&mut caches.slices.write().unwrap(), update);
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

/// What the caches keep of a pod.
pub fn slim_pod(pod: &Pod) -> SlimPod {
    SlimPod::from(pod)
}

/// What the caches keep of a Service or EndpointSlice: no managed fields, which are most
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
    fn the_ca_is_read_again_on_a_new_generation_or_a_failing_handshake() {
        let caches = Caches::default();
        let source = CaSource {
            kind: CaKind::ConfigMap,
            name: "ca".into(),
            key: "ca.crt".into(),
        };
        let key = ("ns".to_string(), source);
        assert_eq!(caches.ca(&key, Some(1), false), None, "never read");
        caches.remember_ca(key.clone(), Some(1), b"pem".to_vec());
        assert_eq!(
            caches.ca(&key, Some(1), false).as_deref(),
            Some(&b"pem"[..])
        );
        assert_eq!(
            caches.ca(&key, Some(1), true).as_deref(),
            Some(&b"pem"[..]),
            "read just now"
        );
        assert_eq!(caches.ca(&key, Some(2), false), None, "spec changed");
        caches.reset();
        assert_eq!(
            caches.ca(&key, Some(1), false),
            None,
            "a new term reads again"
        );
    }
}
