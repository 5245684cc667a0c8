//! In-memory indexes over the watch caches, so that a round reads no API and costs what its
//! own pods cost: pods by label (a selector's rarest `matchLabels` pair finds its pods) and
//! VaultClusters by one required pair (a pod's labels find the clusters selecting it).
//! Pure data structures, fed by the watchers in `cache`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use kube::ResourceExt;
use kube::core::SelectorExt;

use crate::crd::{PodSelector, VaultCluster};
use crate::labels::{
    LEGACY_OWNER_ANNOTATION, LabelNames, OWNER_LABEL, PREFIX_LABEL, written_prefix,
};
use crate::pod_view::PodView;
use crate::selector;
use crate::upgrade::REVISION_LABEL;

/// A pod's kept labels.
pub type Labels = Arc<BTreeMap<String, String>>;

/// What a round needs of a pod, and nothing else: a full Pod is tens of kilobytes, and a
/// namespace may hold thousands that are not Vault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlimPod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// The version the cache holds, so an older write response never replaces a newer
    /// watch event.
    pub resource_version: String,
    /// Shared with every other cached pod whose kept labels are the same (see `PodIndex`).
    pub labels: Labels,
    /// The ownership annotation of versions before the ownership label.
    pub legacy_owner: Option<String>,
    pub terminating: bool,
    pub phase: String,
    pub ip: Option<IpAddr>,
    pub ready: bool,
    /// The StatefulSet its controller ownerReference names, if that is its controller:
    /// which StatefulSet `spec.upgrade` replaces it through. Not the StatefulSet's
    /// selector, whose keys the trimmed labels may lack.
    pub stateful_set: Option<String>,
}

impl From<&PodView> for SlimPod {
    fn from(pod: &PodView) -> Self {
        Self::trimmed(pod, |_| true)
    }
}

/// The label keys the operator itself reads on any pod: the ownership label, the prefix
/// label, the role labels of the prefix the pod says they were written with (they are
/// removed when the prefix changes or the pod leaves its cluster), and the StatefulSet
/// revision a `spec.upgrade` compares (a short hash, on StatefulSet pods only).
fn ours(key: &str, prefix: Option<&str>) -> bool {
    key == OWNER_LABEL
        || key == PREFIX_LABEL
        || key == REVISION_LABEL
        || prefix.is_some_and(|p| LabelNames::new(p).all().contains(&key))
}

/// The labels a cache keeps of a pod: those `wanted` (the keys some VaultCluster's selector
/// or label prefix uses) and the operator's own. Nothing reads the others, and a pod may
/// carry hundreds of kilobytes of them.
pub fn trim_labels<'a>(
    labels: impl Iterator<Item = (&'a String, &'a String)> + Clone,
    wanted: impl Fn(&str) -> bool,
) -> BTreeMap<String, String> {
    let prefix = labels
        .clone()
        .find(|(k, _)| *k == PREFIX_LABEL)
        .map(|(k, v)| BTreeMap::from([(k.clone(), v.clone())]));
    let prefix = prefix.as_ref().and_then(written_prefix);
    labels
        .filter(|(k, _)| wanted(k) || ours(k, prefix))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Every label key a VaultCluster reads on pods: its selector's and its role labels'.
pub fn keys_of(vc: &VaultCluster) -> BTreeSet<String> {
    let selector = &vc.spec.selector;
    let names = LabelNames::new(&vc.spec.label_prefix);
    selector
        .match_labels
        .keys()
        .cloned()
        .chain(selector.match_expressions.iter().map(|e| e.key.clone()))
        .chain(names.all().iter().map(|n| n.to_string()))
        .collect()
}

impl SlimPod {
    /// What a round needs of `pod`, keeping only the labels `wanted` and the operator's own
    /// (see `trim_labels`).
    pub fn trimmed(pod: &PodView, wanted: impl Fn(&str) -> bool) -> Self {
        let status = pod.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        Self {
            name: pod.name_any(),
            namespace: pod.namespace().unwrap_or_default(),
            uid: pod.uid().unwrap_or_default(),
            resource_version: pod.resource_version().unwrap_or_default(),
            labels: Arc::new(trim_labels(pod.labels().iter(), wanted)),
            legacy_owner: pod.annotations().get(LEGACY_OWNER_ANNOTATION).cloned(),
            terminating: pod.metadata.deletion_timestamp.is_some(),
            phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
            ip: status.and_then(|s| s.pod_ip.as_deref()?.parse().ok()),
            ready,
            stateful_set: controlling_set(pod),
        }
    }
}

/// The name of the StatefulSet a pod's controller ownerReference names.
fn controlling_set(pod: &PodView) -> Option<String> {
    pod.owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "StatefulSet")
        .filter(|o| o.api_version.starts_with("apps/"))
        .map(|o| o.name.clone())
}

impl SlimPod {
    /// The VaultCluster that labelled the pod: the ownership label, or the legacy annotation.
    pub fn owner(&self) -> Option<&String> {
        self.labels.get(OWNER_LABEL).or(self.legacy_owner.as_ref())
    }

    /// Whether this is a later version of the same pod than `other`: the API server's
    /// resourceVersions are etcd revisions, ordered as numbers. One that does not parse
    /// counts as newer, as it did before versions were compared.
    pub fn newer_than(&self, other: &SlimPod) -> bool {
        match (
            self.resource_version.parse::<u64>(),
            other.resource_version.parse::<u64>(),
        ) {
            (Ok(mine), Ok(theirs)) => self.uid == other.uid && mine > theirs,
            _ => true,
        }
    }

    /// Kubernetes reports the pod Running, Ready and not terminating.
    pub fn serving(&self) -> bool {
        self.phase == "Running" && self.ready && !self.terminating
    }
}

/// A posting key: namespace, label key, label value.
type Pair = (String, String, String);

/// Objects by namespace and name, with postings from (namespace, key, value) to names.
#[derive(Debug)]
struct Postings<T> {
    objects: HashMap<(String, String), Arc<T>>,
    postings: HashMap<Pair, BTreeSet<String>>,
    keys: fn(&T) -> Vec<(String, String)>,
}

impl<T> Postings<T> {
    fn new(keys: fn(&T) -> Vec<(String, String)>) -> Self {
        Self {
            objects: HashMap::new(),
            postings: HashMap::new(),
            keys,
        }
    }

    fn insert(&mut self, ns: &str, name: &str, object: impl Into<Arc<T>>) {
        let object = object.into();
        self.remove(ns, name);
        for (k, v) in (self.keys)(&object) {
            let pair = (ns.to_string(), k, v);
            self.postings
                .entry(pair)
                .or_default()
                .insert(name.to_string());
        }
        self.objects
            .insert((ns.to_string(), name.to_string()), object);
    }

    fn remove(&mut self, ns: &str, name: &str) {
        let Some(old) = self.objects.remove(&(ns.to_string(), name.to_string())) else {
            return;
        };
        for (k, v) in (self.keys)(&old) {
            let pair = (ns.to_string(), k, v);
            if let Some(names) = self.postings.get_mut(&pair) {
                names.remove(name);
                if names.is_empty() {
                    self.postings.remove(&pair);
                }
            }
        }
    }

    /// Drops every object of a watch's scope (a namespace, or all), for a fresh list.
    fn clear_scope(&mut self, scope: Option<&str>) {
        for (ns, name) in self.names_in(scope) {
            self.remove(&ns, &name);
        }
    }

    /// The (namespace, name) of every object in a watch's scope.
    fn names_in(&self, scope: Option<&str>) -> Vec<(String, String)> {
        self.objects
            .keys()
            .filter(|(ns, _)| scope.is_none_or(|s| s == ns))
            .cloned()
            .collect()
    }

    fn posting(&self, ns: &str, k: &str, v: &str) -> Option<&BTreeSet<String>> {
        self.postings
            .get(&(ns.to_string(), k.to_string(), v.to_string()))
    }

    fn get(&self, ns: &str, name: &str) -> Option<Arc<T>> {
        self.objects
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    fn len(&self) -> usize {
        self.objects.len()
    }
}

/// Stands for the legacy annotation in the postings; ':' cannot occur in a label key.
const LEGACY_KEY: &str = "annotation:vault-registrar.dev/cluster";

fn pod_keys(pod: &SlimPod) -> Vec<(String, String)> {
    let labels = pod.labels.iter().map(|(k, v)| (k.clone(), v.clone()));
    let legacy = pod
        .legacy_owner
        .iter()
        .map(|o| (LEGACY_KEY.to_string(), o.clone()));
    labels.chain(legacy).collect()
}

/// Pods by namespace and label.
#[derive(Debug)]
pub struct PodIndex(Postings<SlimPod>, SharedLabels);

impl Default for PodIndex {
    fn default() -> Self {
        Self(Postings::new(pod_keys), SharedLabels::default())
    }
}

/// One copy of each distinct set of kept labels. The replicas of a Deployment carry the same
/// labels but for their template hash, which no selector reads and the cache does not keep:
/// at `bench-scale`, 10,000 unrelated pods share 100 sets, where each held its own map of at
/// least half a kilobyte.
#[derive(Debug, Default)]
struct SharedLabels {
    sets: HashSet<Labels>,
    /// How many sets the last sweep left.
    swept: usize,
}

impl SharedLabels {
    fn share(&mut self, labels: Labels) -> Labels {
        if let Some(held) = self.sets.get(&*labels) {
            return held.clone();
        }
        self.sets.insert(labels.clone());
        self.sweep();
        labels
    }

    /// Forgets the sets no pod holds any more, each time the count has doubled since the
    /// last sweep, so that sweeping costs a constant share of the insertions.
    fn sweep(&mut self) {
        if self.sets.len() > 2 * self.swept.max(64) {
            self.sets.retain(|l| Arc::strong_count(l) > 1);
            self.swept = self.sets.len();
        }
    }
}

impl PodIndex {
    pub fn apply(&mut self, mut pod: SlimPod) {
        pod.labels = self.1.share(pod.labels);
        let (ns, name) = (pod.namespace.clone(), pod.name.clone());
        self.0.insert(&ns, &name, pod);
    }

    pub fn delete(&mut self, ns: &str, name: &str) {
        self.0.remove(ns, name);
    }

    /// Takes a write's response: only over an older version of the same pod, so a watch
    /// event that came first (a deletion, a newer change) is never undone by it.
    pub fn apply_written(&mut self, pod: SlimPod) -> bool {
        let newer = self
            .0
            .get(&pod.namespace, &pod.name)
            .is_some_and(|held| pod.newer_than(&held));
        if newer {
            self.apply(pod);
        }
        newer
    }

    pub fn clear_scope(&mut self, scope: Option<&str>) {
        self.0.clear_scope(scope);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.len() == 0
    }

    /// The pods in `ns` that the selector selects, found from its rarest matchLabels pair.
    pub fn selected(&self, ns: &str, selector: &PodSelector) -> Vec<Arc<SlimPod>> {
        let rarest = selector
            .match_labels
            .iter()
            .map(|(k, v)| self.0.posting(ns, k, v))
            .min_by_key(|p| p.map_or(0, |names| names.len()));
        let (Some(Some(names)), Ok(parsed)) = (rarest, selector::parse(selector)) else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(|name| self.0.get(ns, name))
            .filter(|pod| parsed.matches(&pod.labels))
            .collect()
    }

    /// The pods in `ns` that carry `owner`'s ownership label or legacy annotation.
    pub fn owned_by(&self, ns: &str, owner: &str) -> Vec<Arc<SlimPod>> {
        [OWNER_LABEL, LEGACY_KEY]
            .iter()
            .filter_map(|k| self.0.posting(ns, k, owner))
            .flatten()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|name| self.0.get(ns, name))
            .collect()
    }

    pub fn get(&self, ns: &str, name: &str) -> Option<Arc<SlimPod>> {
        self.0.get(ns, name)
    }
}

fn labels_of<K: ResourceExt>(object: &K) -> Vec<(String, String)> {
    object
        .labels()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Objects of one kind (Services, EndpointSlices) by namespace, name and label.
#[derive(Debug)]
pub struct LabelledIndex<K>(Postings<K>);

impl<K: ResourceExt> Default for LabelledIndex<K> {
    fn default() -> Self {
        Self(Postings::new(labels_of::<K>))
    }
}

impl<K: ResourceExt> LabelledIndex<K> {
    pub fn apply(&mut self, object: K) {
        let (ns, name) = (object.namespace().unwrap_or_default(), object.name_any());
        self.0.insert(&ns, &name, object);
    }

    pub fn delete(&mut self, ns: &str, name: &str) {
        self.0.remove(ns, name);
    }

    pub fn clear_scope(&mut self, scope: Option<&str>) {
        self.0.clear_scope(scope);
    }

    pub fn get(&self, ns: &str, name: &str) -> Option<Arc<K>> {
        self.0.get(ns, name)
    }

    /// The objects in `ns` labelled `key=value`.
    pub fn labelled(&self, ns: &str, key: &str, value: &str) -> Vec<Arc<K>> {
        self.0
            .posting(ns, key, value)
            .into_iter()
            .flatten()
            .filter_map(|name| self.0.get(ns, name))
            .collect()
    }
}

/// The one required pair a VaultCluster is found by: the one that most likely names this
/// installation rather than every Vault in the namespace, so that a pod's lookup meets only
/// its own clusters. The official chart selects on `app.kubernetes.io/name: vault` (the same
/// for every release) and `app.kubernetes.io/instance` (the release); posting every cluster
/// under the first made each lookup scan every cluster of the namespace (a tenth of the
/// operator's CPU at 1,000 clusters was that scan).
fn cluster_keys(vc: &VaultCluster) -> Vec<(String, String)> {
    vc.spec
        .selector
        .match_labels
        .iter()
        .min_by_key(|(k, _)| specificity(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .into_iter()
        .collect()
}

/// How broadly a label key is shared, lower for keys that name one installation. Ties go
/// to the first key in order, so the choice is always the same for the same selector.
fn specificity(key: &str) -> u8 {
    match key {
        "app.kubernetes.io/instance" | "release" | "helm.sh/release" => 0,
        "app.kubernetes.io/name"
        | "app"
        | "app.kubernetes.io/component"
        | "component"
        | "app.kubernetes.io/part-of"
        | "app.kubernetes.io/managed-by" => 2,
        _ => 1,
    }
}

/// VaultClusters by namespace and one required pair, and the pod label keys they read.
#[derive(Debug)]
pub struct ClusterIndex {
    clusters: Postings<VaultCluster>,
    /// How many VaultClusters read each label key (`keys_of`).
    counts: HashMap<String, usize>,
    /// The keys some VaultCluster reads, each with the epoch it was last added at: the pod
    /// cache keeps these labels, and a list of pods started at a later epoch has them all.
    wanted: HashMap<String, u64>,
    /// Grows each time a key joins `wanted`.
    epoch: u64,
}

impl Default for ClusterIndex {
    fn default() -> Self {
        Self::starting_at(0)
    }
}

impl ClusterIndex {
    /// An empty index whose epochs continue from `epoch`, so that they only ever grow.
    pub fn starting_at(epoch: u64) -> Self {
        Self {
            clusters: Postings::new(cluster_keys),
            counts: HashMap::new(),
            wanted: HashMap::new(),
            epoch,
        }
    }

    pub fn apply(&mut self, vc: impl Into<Arc<VaultCluster>>) {
        let vc = vc.into();
        let (ns, name) = (vc.namespace().unwrap_or_default(), vc.name_any());
        // The new keys are counted before the old ones are let go, so that a key both
        // read never looks unread.
        self.count(&keys_of(&vc), 1);
        self.delete(&ns, &name);
        self.clusters.insert(&ns, &name, vc);
    }

    pub fn delete(&mut self, ns: &str, name: &str) {
        if let Some(old) = self.clusters.get(ns, name) {
            self.count(&keys_of(&old), -1);
        }
        self.clusters.remove(ns, name);
    }

    pub fn clear_scope(&mut self, scope: Option<&str>) {
        // Through `delete`, so the key counts follow.
        for (ns, name) in self.clusters.names_in(scope) {
            self.delete(&ns, &name);
        }
    }

    fn count(&mut self, keys: &BTreeSet<String>, by: isize) {
        for key in keys {
            let n = self.counts.entry(key.clone()).or_default();
            *n = n.saturating_add_signed(by);
        }
    }

    /// Brings `wanted` in line with the counts after a change (one event, or a whole
    /// relist): a key read again within the change was never unread, so it keeps its
    /// epoch; keys read for the first time get a new one. Returns whether keys were added.
    pub fn settle(&mut self) -> bool {
        self.counts.retain(|_, n| *n > 0);
        self.wanted.retain(|k, _| self.counts.contains_key(k));
        let new: Vec<String> = self
            .counts
            .keys()
            .filter(|k| !self.wanted.contains_key(*k))
            .cloned()
            .collect();
        if new.is_empty() {
            return false;
        }
        self.epoch += 1;
        for key in new {
            self.wanted.insert(key, self.epoch);
        }
        true
    }

    /// Whether some VaultCluster reads this pod label key.
    pub fn wants(&self, key: &str) -> bool {
        self.wanted.contains_key(key)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The epoch from which a list of pods holds every label `vc` reads; None while one of
    /// them is not yet wanted (the index has not seen this version of `vc`).
    pub fn keys_epoch(&self, vc: &VaultCluster) -> Option<u64> {
        keys_of(vc)
            .iter()
            .map(|k| self.wanted.get(k).copied())
            .try_fold(0, |max, e| Some(max.max(e?)))
    }

    pub fn get(&self, ns: &str, name: &str) -> Option<Arc<VaultCluster>> {
        self.clusters.get(ns, name)
    }

    /// The VaultClusters in `ns` whose selector selects these labels.
    pub fn selecting(&self, ns: &str, labels: &BTreeMap<String, String>) -> Vec<Arc<VaultCluster>> {
        labels
            .iter()
            .filter_map(|(k, v)| self.clusters.posting(ns, k, v))
            .flatten()
            .filter_map(|name| self.clusters.get(ns, name))
            .filter(|vc| selector::matches(&vc.spec.selector, labels))
            .collect()
    }

    /// The VaultClusters a pod change concerns: those selecting it and the one owning it.
    pub fn concerned(&self, pod: &SlimPod) -> Vec<Arc<VaultCluster>> {
        let mut found = self.selecting(&pod.namespace, &pod.labels);
        if let Some(owner) = pod.owner().and_then(|o| self.get(&pod.namespace, o))
            && !found.iter().any(|vc| vc.name_any() == owner.name_any())
        {
            found.push(owner);
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::VaultClusterSpec;

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> SlimPod {
        SlimPod {
            name: name.into(),
            namespace: ns.into(),
            uid: format!("uid-{name}"),
            resource_version: "1".into(),
            labels: Arc::new(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            legacy_owner: None,
            terminating: false,
            phase: "Running".into(),
            ip: None,
            ready: true,
            stateful_set: None,
        }
    }

    fn cluster(ns: &str, name: &str, selector: &str) -> VaultCluster {
        let spec: VaultClusterSpec =
            serde_yaml::from_str(&format!("selector: {selector}")).unwrap();
        let mut vc = VaultCluster::new(name, spec);
        vc.metadata.namespace = Some(ns.into());
        vc
    }

    fn names<T>(found: &[Arc<T>], name: impl Fn(&T) -> String) -> Vec<String> {
        let mut out: Vec<String> = found.iter().map(|o| name(o)).collect();
        out.sort();
        out
    }

    fn index() -> PodIndex {
        let mut index = PodIndex::default();
        for (ns, name, labels) in [
            ("a", "v0", vec![("app", "vault"), ("instance", "x")]),
            (
                "a",
                "v1",
                vec![("app", "vault"), ("instance", "x"), ("tier", "1")],
            ),
            ("a", "w0", vec![("app", "vault"), ("instance", "y")]),
            ("a", "web", vec![("app", "web")]),
            ("b", "v0", vec![("app", "vault"), ("instance", "x")]),
            ("a", "old", vec![("app", "retired"), (OWNER_LABEL, "x")]),
        ] {
            index.apply(pod(ns, name, &labels));
        }
        let mut legacy = pod("a", "older", &[("app", "retired")]);
        legacy.legacy_owner = Some("x".into());
        index.apply(legacy);
        index
    }

    #[test]
    fn selectors_find_their_pods_in_their_namespace() {
        let index = index();
        // (selector, namespace, pods)
        let cases = [
            (
                "{matchLabels: {app: vault, instance: x}}",
                "a",
                vec!["v0", "v1"],
            ),
            ("{matchLabels: {app: vault}}", "a", vec!["v0", "v1", "w0"]),
            ("{matchLabels: {app: vault, instance: x}}", "b", vec!["v0"]),
            ("{matchLabels: {app: vault, instance: z}}", "a", vec![]),
            (
                "{matchLabels: {app: vault}, matchExpressions: [{key: tier, operator: Exists}]}",
                "a",
                vec!["v1"],
            ),
            ("{matchLabels: {app: vault}}", "c", vec![]),
        ];
        for (selector, ns, want) in cases {
            let vc = cluster(ns, "c", selector);
            let got = names(&index.selected(ns, &vc.spec.selector), |p| p.name.clone());
            assert_eq!(got, want, "{selector} in {ns}");
        }
        assert_eq!(
            names(&index.owned_by("a", "x"), |p| p.name.clone()),
            ["old", "older"]
        );
    }

    #[test]
    fn updates_and_deletes_move_pods_between_postings() {
        let mut index = index();
        let vc = cluster("a", "c", "{matchLabels: {instance: x}}");
        index.apply(pod("a", "v0", &[("app", "vault"), ("instance", "y")]));
        index.delete("a", "v1");
        assert!(index.selected("a", &vc.spec.selector).is_empty());
        assert_eq!(index.len(), 6);
        index.clear_scope(Some("a"));
        assert_eq!(index.len(), 1, "only namespace b is left");
        index.clear_scope(None);
        assert!(index.is_empty());
        assert!(index.0.postings.is_empty(), "no empty postings left behind");
    }

    #[test]
    fn pods_find_the_clusters_that_select_or_own_them() {
        let mut clusters = ClusterIndex::default();
        for (name, selector) in [
            ("x", "{matchLabels: {app: vault, instance: x}}"),
            ("y", "{matchLabels: {app: vault, instance: y}}"),
            ("all", "{matchLabels: {app: vault}}"),
            (
                "split",
                "{matchLabels: {app: vault}, matchExpressions: [{key: instance, operator: In, values: [y]}]}",
            ),
        ] {
            clusters.apply(cluster("a", name, selector));
        }
        clusters.apply(cluster("b", "x", "{matchLabels: {app: vault}}"));
        let vc_names = |found: Vec<Arc<VaultCluster>>| names(&found, |vc| vc.name_any());
        let cases = [
            (
                pod("a", "p", &[("app", "vault"), ("instance", "x")]),
                vec!["all", "x"],
            ),
            (
                pod("a", "p", &[("app", "vault"), ("instance", "y")]),
                vec!["all", "split", "y"],
            ),
            (pod("a", "p", &[("app", "web")]), vec![]),
            (
                pod("a", "p", &[("app", "gone"), (OWNER_LABEL, "y")]),
                vec!["y"],
            ),
        ];
        for (pod, want) in cases {
            assert_eq!(vc_names(clusters.concerned(&pod)), want, "{:?}", pod.labels);
        }
        clusters.delete("a", "all");
        let got =
            vc_names(clusters.concerned(&pod("a", "p", &[("app", "vault"), ("instance", "x")])));
        assert_eq!(got, ["x"]);
    }

    #[test]
    fn a_cluster_is_posted_under_the_pair_naming_its_installation() {
        // (selector, the pair it is posted under)
        let cases = [
            (
                "{matchLabels: {app.kubernetes.io/name: vault, app.kubernetes.io/instance: v1}}",
                ("app.kubernetes.io/instance", "v1"),
            ),
            (
                "{matchLabels: {app: vault, component: server, team: a}}",
                ("team", "a"),
            ),
            (
                "{matchLabels: {app: vault, component: server}}",
                ("app", "vault"),
            ),
            ("{matchLabels: {b: x, a: y}}", ("a", "y")),
        ];
        for (selector, (k, v)) in cases {
            let keys = cluster_keys(&cluster("a", "c", selector));
            assert_eq!(keys, vec![(k.to_string(), v.to_string())], "{selector}");
        }
    }

    #[test]
    fn a_pods_lookup_meets_only_its_own_clusters() {
        let mut index = ClusterIndex::default();
        for i in 0..100 {
            index.apply(cluster(
                "a",
                &format!("vc-{i}"),
                &format!("{{matchLabels: {{app.kubernetes.io/name: vault, app.kubernetes.io/instance: vc-{i}}}}}"),
            ));
        }
        let widest = index.clusters.postings.values().map(BTreeSet::len).max();
        assert_eq!(widest, Some(1), "no posting holds every cluster");
        let labels = BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), "vault".to_string()),
            ("app.kubernetes.io/instance".to_string(), "vc-7".to_string()),
        ]);
        let found = index.selecting("a", &labels);
        assert_eq!(names(&found, |vc| vc.name_any()), vec!["vc-7"]);
    }

    #[test]
    fn pods_with_the_same_kept_labels_share_one_copy_until_none_holds_it() {
        let mut index = PodIndex::default();
        let web = [("app", "web")];
        index.apply(pod("a", "web-1", &web));
        index.apply(pod("a", "web-2", &web));
        index.apply(pod("b", "web-3", &web));
        index.apply(pod("a", "db-1", &[("app", "db")]));
        let held = |name: &str, ns: &str| index.get(ns, name).unwrap().labels.clone();
        assert!(Arc::ptr_eq(&held("web-1", "a"), &held("web-2", "a")));
        assert!(Arc::ptr_eq(&held("web-1", "a"), &held("web-3", "b")));
        assert!(!Arc::ptr_eq(&held("web-1", "a"), &held("db-1", "a")));
        assert_eq!(index.1.sets.len(), 2);
        // Sharing changes nothing a round reads.
        let selector = PodSelector {
            match_labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
            ..Default::default()
        };
        assert_eq!(index.selected("a", &selector).len(), 2);

        // Sets no pod holds are forgotten once the count has doubled since the last sweep.
        for i in 0..200 {
            let value = format!("v{i}");
            index.apply(pod("a", "churn", &[("app", value.as_str())]));
        }
        index.delete("a", "churn");
        assert!(index.1.sets.len() <= 2 * 64 + 1, "{}", index.1.sets.len());
        assert!(
            index
                .1
                .sets
                .iter()
                .any(|l| l.get("app").map(String::as_str) == Some("web"))
        );
    }

    #[test]
    fn a_slim_pod_keeps_what_rounds_read() {
        let pod: PodView = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "v0", "namespace": "a", "uid": "u", "labels": {"app": "vault"},
                "annotations": {"vault-registrar.dev/cluster": "x", "big": "y"}},
            "spec": {"containers": [{"name": "vault", "image": "vault"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.7",
                "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap();
        let slim = SlimPod::from(&pod);
        assert_eq!(slim.legacy_owner.as_deref(), Some("x"));
        assert_eq!(slim.ip, Some("10.0.0.7".parse().unwrap()));
        assert!(slim.serving());
        assert_eq!(slim.owner().map(String::as_str), Some("x"));
    }

    #[test]
    fn a_cached_pod_keeps_exactly_the_labels_someone_reads() {
        let wanted = ["app", "instance", "tier", "vault-active", "vault-sealed"];
        let wants = |k: &str| wanted.contains(&k);
        // (scenario, labels, kept)
        let cases: Vec<(&str, Vec<(&str, &str)>, Vec<&str>)> = vec![
            (
                "selector keys and our own; the rest goes",
                vec![
                    ("app", "vault"),
                    ("instance", "x"),
                    ("vault-active", "true"),
                    ("team", "a"),
                    ("x".repeat(60).leak(), "y"),
                    (OWNER_LABEL, "x"),
                    (REVISION_LABEL, "vault-5d9c8b7f6"),
                ],
                vec![
                    "app",
                    "instance",
                    "vault-active",
                    OWNER_LABEL,
                    REVISION_LABEL,
                ],
            ),
            (
                "the role labels of the prefix the pod says, read by no selector",
                vec![
                    ("app", "vault"),
                    (PREFIX_LABEL, "old"),
                    ("old-active", "true"),
                    ("old-version", "1.17.2"),
                    ("older-active", "true"),
                ],
                vec!["app", PREFIX_LABEL, "old-active", "old-version"],
            ),
            (
                "a prefix label no VaultCluster could have written names nothing",
                vec![(PREFIX_LABEL, "Bad_Prefix"), ("Bad_Prefix-active", "true")],
                vec![PREFIX_LABEL],
            ),
            (
                "an unrelated pod keeps nothing",
                vec![("web", "x"), ("big", "y")],
                vec![],
            ),
        ];
        for (scenario, labels, want) in cases {
            let labels: BTreeMap<String, String> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let kept = trim_labels(labels.iter(), wants);
            let mut want: Vec<&str> = want;
            want.sort();
            assert_eq!(kept.keys().collect::<Vec<_>>(), want, "{scenario}");
            assert!(
                kept.iter().all(|(k, v)| labels.get(k) == Some(v)),
                "{scenario}"
            );
        }
    }

    #[test]
    fn the_keys_clusters_read_are_counted_and_new_ones_start_an_epoch() {
        let mut index = ClusterIndex::default();
        let epoch_of = |index: &ClusterIndex, selector: &str, prefix: &str| {
            let mut vc = cluster("a", "probe", selector);
            vc.spec.label_prefix = prefix.into();
            index.keys_epoch(&vc)
        };
        index.apply(cluster(
            "a",
            "x",
            "{matchLabels: {app: vault, instance: x}}",
        ));
        assert!(index.settle(), "keys read for the first time");
        assert_eq!(index.epoch(), 1);
        for key in ["app", "instance", "vault-active", "vault-version"] {
            assert!(index.wants(key), "{key}");
        }
        assert!(!index.wants("tier"));
        // An update reading the same keys (a status write) starts no epoch.
        index.apply(cluster(
            "a",
            "x",
            "{matchLabels: {app: vault, instance: x}}",
        ));
        assert!(!index.settle());
        // A second cluster on a new key: a new epoch, which only it waits for.
        index.apply(cluster(
            "b",
            "y",
            "{matchLabels: {app: vault}, matchExpressions: [{key: tier, operator: Exists}]}",
        ));
        assert!(index.settle());
        assert_eq!(
            epoch_of(&index, "{matchLabels: {app: vault, instance: x}}", "vault"),
            Some(1)
        );
        assert_eq!(
            epoch_of(
                &index,
                "{matchLabels: {app: vault}, matchExpressions: [{key: tier, operator: Exists}]}",
                "vault"
            ),
            Some(2)
        );
        assert_eq!(
            epoch_of(&index, "{matchLabels: {zone: z}}", "vault"),
            None,
            "not wanted yet"
        );
        assert_eq!(
            epoch_of(&index, "{matchLabels: {app: vault}}", "openbao"),
            None
        );
        // A relist that brings the same clusters back keeps the keys and their epochs.
        let all = [
            cluster("a", "x", "{matchLabels: {app: vault, instance: x}}"),
            cluster(
                "b",
                "y",
                "{matchLabels: {app: vault}, matchExpressions: [{key: tier, operator: Exists}]}",
            ),
        ];
        index.clear_scope(None);
        all.into_iter().for_each(|vc| index.apply(vc));
        assert!(!index.settle());
        assert_eq!(index.epoch(), 2);
        // The key let go, then read again: pods updated meanwhile lost it, so a new epoch.
        index.delete("b", "y");
        assert!(!index.settle());
        assert!(!index.wants("tier"));
        index.apply(cluster("b", "y", "{matchLabels: {tier: t}}"));
        assert!(index.settle());
        assert_eq!(
            epoch_of(&index, "{matchLabels: {tier: t}}", "vault"),
            Some(3)
        );
    }

    #[test]
    fn a_write_response_never_undoes_a_newer_watch_event() {
        let version = |rv: &str, uid: &str| SlimPod {
            resource_version: rv.into(),
            uid: uid.into(),
            ..pod("a", "v0", &[("app", "vault")])
        };
        // (held by the cache, written response, taken)
        let cases = [
            (Some(version("5", "u")), version("7", "u"), true),
            (Some(version("7", "u")), version("5", "u"), false),
            (Some(version("7", "u")), version("7", "u"), false),
            (None, version("7", "u"), false), // deleted by the watch meanwhile
            (Some(version("5", "old")), version("7", "u"), false), // replaced under its name
            (Some(version("5", "u")), version("x", "u"), true),
        ];
        for (held, written, taken) in cases {
            let mut index = PodIndex::default();
            if let Some(held) = held.clone() {
                index.apply(held);
            }
            let rv = written.resource_version.clone();
            assert_eq!(index.apply_written(written), taken, "{held:?} then {rv}");
            let now = index.get("a", "v0").map(|p| p.resource_version.clone());
            let want = if taken {
                Some(rv)
            } else {
                held.map(|h| h.resource_version)
            };
            assert_eq!(now, want);
        }
    }
}
