//! The per-VaultCluster series, kept as plain numbers and turned into Prometheus series only
//! when scraped. A series of the prometheus crate's vectors carries its own copy of its
//! family's help text and of its label pairs: at 1,000 clusters a heap profile found 8.5 MB
//! in them, an eighth of the operator's live heap. Here a cluster costs its two names and a
//! few numbers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

/// Label names of the per-cluster series.
pub const CLUSTER_LABELS: [&str; 2] = ["namespace", "cluster"];

/// The per-cluster families; `Inner::descs` describes them in this order.
const FAMILIES: [Family; 6] = [
    Family {
        name: "vault_registrar_probes_total",
        help: "Health probes of a VaultCluster's pods, by outcome (active, standby, perf-standby, sealed, uninitialized, removed, failed).",
        extra: Some("outcome"),
        kind: MetricType::COUNTER,
        values: |s| counts(&s.probes),
    },
    Family {
        name: "vault_registrar_active_changes_total",
        help: "Changes of a VaultCluster's active pod (failovers, and losing or finding one).",
        extra: None,
        kind: MetricType::COUNTER,
        values: |s| match s.active_changes {
            0 => Vec::new(),
            n => vec![(None, n as f64)],
        },
    },
    Family {
        name: "vault_registrar_upgrade_steps_total",
        help: "Evictions of spec.upgrade, by result (evicted, blocked by a PodDisruptionBudget, failed).",
        extra: Some("result"),
        kind: MetricType::COUNTER,
        values: |s| counts(&s.upgrade_steps),
    },
    Family {
        name: "vault_registrar_cluster_pods",
        help: "A VaultCluster's selected pods, by role (all, active, standby, perf-standby, sealed, uninitialized, unreachable).",
        extra: Some("role"),
        kind: MetricType::GAUGE,
        values: |s| {
            gauges(s, |g| {
                g.pods.iter().map(|(r, n)| (Some(*r), *n as f64)).collect()
            })
        },
    },
    Family {
        name: "vault_registrar_cluster_condition",
        help: "1 when the VaultCluster's condition (Ready, Available, Degraded, SelectorOverlap) is True, else 0.",
        extra: Some("condition"),
        kind: MetricType::GAUGE,
        values: |s| {
            gauges(s, |g| {
                let on = |on: bool| f64::from(u8::from(on));
                g.conditions
                    .iter()
                    .map(|(c, o)| (Some(*c), on(*o)))
                    .collect()
            })
        },
    },
    Family {
        name: "vault_registrar_cluster_active_pod",
        help: "1 for the pod labelled active in a VaultCluster; no series while it has none.",
        extra: Some("pod"),
        kind: MetricType::GAUGE,
        values: |s| {
            gauges(s, |g| {
                g.active_pod
                    .as_deref()
                    .map(|pod| (Some(pod), 1.0))
                    .into_iter()
                    .collect()
            })
        },
    },
];

struct Family {
    name: &'static str,
    help: &'static str,
    /// The label beside namespace and cluster, if any.
    extra: Option<&'static str>,
    kind: MetricType,
    /// A cluster's series of this family, as (its own label's value, value).
    values: fn(&Series) -> Vec<(Option<&str>, f64)>,
}

/// What a round last reported of a cluster: the gauges exist only once it has.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gauges {
    /// Pods by role.
    pub pods: Vec<(&'static str, i64)>,
    /// Whether each condition is True.
    pub conditions: Vec<(&'static str, bool)>,
    pub active_pod: Option<String>,
}

/// One cluster's series.
#[derive(Default)]
struct Series {
    probes: Vec<(&'static str, u64)>,
    /// No series while 0: a counter's series appears with its first change.
    active_changes: u64,
    upgrade_steps: Vec<(&'static str, u64)>,
    gauges: Option<Gauges>,
}

/// Series by namespace, then cluster: a lookup by two `&str` allocates nothing.
type ByCluster = HashMap<String, HashMap<String, Series>>;

/// The per-cluster series of this process; clones share them.
#[derive(Clone)]
pub struct ClusterMetrics(Arc<Inner>);

struct Inner {
    descs: Vec<Desc>,
    series: Mutex<ByCluster>,
}

impl Default for ClusterMetrics {
    fn default() -> Self {
        let descs = FAMILIES
            .iter()
            .map(|f| {
                let labels = CLUSTER_LABELS.iter().chain(&f.extra).map(|l| l.to_string());
                Desc::new(
                    f.name.into(),
                    f.help.into(),
                    labels.collect(),
                    HashMap::new(),
                )
                .expect("valid descriptor")
            })
            .collect();
        Self(Arc::new(Inner {
            descs,
            series: Mutex::default(),
        }))
    }
}

fn add(counts: &mut Vec<(&'static str, u64)>, key: &'static str) {
    match counts.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n += 1,
        None => counts.push((key, 1)),
    }
}

impl ClusterMetrics {
    fn with(&self, ns: &str, cluster: &str, f: impl FnOnce(&mut Series)) {
        let mut series = self.0.series.lock().unwrap();
        let clusters = match series.get_mut(ns) {
            Some(clusters) => clusters,
            None => series.entry(ns.to_string()).or_default(),
        };
        match clusters.get_mut(cluster) {
            Some(s) => f(s),
            None => f(clusters.entry(cluster.to_string()).or_default()),
        }
    }

    pub fn count_probe(&self, ns: &str, cluster: &str, outcome: &'static str) {
        self.with(ns, cluster, |s| add(&mut s.probes, outcome));
    }

    pub fn count_active_change(&self, ns: &str, cluster: &str) {
        self.with(ns, cluster, |s| s.active_changes += 1);
    }

    pub fn count_upgrade_step(&self, ns: &str, cluster: &str, result: &'static str) {
        self.with(ns, cluster, |s| add(&mut s.upgrade_steps, result));
    }

    /// Sets the cluster's gauges, replacing what it showed before (the pod it named active
    /// among them).
    pub fn show(&self, ns: &str, cluster: &str, gauges: Gauges) {
        self.with(ns, cluster, |s| s.gauges = Some(gauges));
    }

    /// Whether the cluster's gauges are set: after losing and regaining the lead they are
    /// not, however unchanged its status.
    pub fn shows(&self, ns: &str, cluster: &str) -> bool {
        let series = self.0.series.lock().unwrap();
        series
            .get(ns)
            .and_then(|c| c.get(cluster))
            .is_some_and(|s| s.gauges.is_some())
    }

    /// Deletes every series of one VaultCluster: it is gone.
    pub fn forget(&self, ns: &str, cluster: &str) {
        let mut series = self.0.series.lock().unwrap();
        if let Some(clusters) = series.get_mut(ns) {
            clusters.remove(cluster);
            if clusters.is_empty() {
                series.remove(ns);
            }
        }
    }

    /// Deletes the series of every VaultCluster.
    pub fn forget_all(&self) {
        self.0.series.lock().unwrap().clear();
    }
}

/// One series: the cluster's labels and the family's own, sorted by name as the prometheus
/// crate sorts them.
fn metric(
    ns: &str,
    cluster: &str,
    extra: Option<(&str, &str)>,
    value: f64,
    kind: MetricType,
) -> Metric {
    let mut labels: Vec<LabelPair> = [(CLUSTER_LABELS[0], ns), (CLUSTER_LABELS[1], cluster)]
        .into_iter()
        .chain(extra)
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name(name.to_string());
            pair.set_value(value.to_string());
            pair
        })
        .collect();
    labels.sort_by(|a, b| a.name().cmp(b.name()));
    let mut m = Metric::from_label(labels);
    match kind {
        MetricType::COUNTER => {
            let mut c = Counter::default();
            c.set_value(value);
            m.set_counter(c);
        }
        _ => {
            let mut g = Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
    }
    m
}

fn counts(counts: &[(&'static str, u64)]) -> Vec<(Option<&'static str>, f64)> {
    counts.iter().map(|(k, n)| (Some(*k), *n as f64)).collect()
}

/// The gauges' series: none until a round has reported the cluster.
fn gauges<'a>(
    s: &'a Series,
    series: impl Fn(&'a Gauges) -> Vec<(Option<&'a str>, f64)>,
) -> Vec<(Option<&'a str>, f64)> {
    s.gauges.as_ref().map(series).unwrap_or_default()
}

impl Collector for ClusterMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.0.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let series = self.0.series.lock().unwrap();
        FAMILIES
            .iter()
            .map(|f| {
                let mut family = MetricFamily::default();
                family.set_name(f.name.to_string());
                family.set_help(f.help.to_string());
                family.set_field_type(f.kind);
                let all = series.iter().flat_map(|(ns, clusters)| {
                    clusters.iter().flat_map(move |(cluster, s)| {
                        (f.values)(s).into_iter().map(move |(extra, value)| {
                            let extra = f.extra.zip(extra);
                            metric(ns, cluster, extra, value, f.kind)
                        })
                    })
                });
                family.set_metric(all.collect());
                family
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, Registry, TextEncoder};

    fn text(m: &ClusterMetrics) -> Vec<String> {
        let registry = Registry::new();
        registry.register(Box::new(m.clone())).unwrap();
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        let out = String::from_utf8(out).unwrap();
        out.lines()
            .filter(|l| !l.starts_with("# HELP"))
            .map(String::from)
            .collect()
    }

    fn gauges(active_pod: Option<&str>) -> Gauges {
        Gauges {
            pods: vec![("all", 3), ("active", 1)],
            conditions: vec![("Ready", true), ("Degraded", false)],
            active_pod: active_pod.map(String::from),
        }
    }

    #[test]
    fn series_are_rendered_with_their_type_and_sorted_labels() {
        let m = ClusterMetrics::default();
        m.count_probe("a", "v", "active");
        m.count_probe("a", "v", "active");
        m.count_probe("a", "v", "failed");
        m.count_active_change("a", "v");
        m.count_upgrade_step("a", "v", "evicted");
        m.show("a", "v", gauges(Some("v-0")));
        assert_eq!(
            text(&m),
            [
                "# TYPE vault_registrar_active_changes_total counter",
                "vault_registrar_active_changes_total{cluster=\"v\",namespace=\"a\"} 1",
                "# TYPE vault_registrar_cluster_active_pod gauge",
                "vault_registrar_cluster_active_pod{cluster=\"v\",namespace=\"a\",pod=\"v-0\"} 1",
                "# TYPE vault_registrar_cluster_condition gauge",
                "vault_registrar_cluster_condition{cluster=\"v\",condition=\"Degraded\",namespace=\"a\"} 0",
                "vault_registrar_cluster_condition{cluster=\"v\",condition=\"Ready\",namespace=\"a\"} 1",
                "# TYPE vault_registrar_cluster_pods gauge",
                "vault_registrar_cluster_pods{cluster=\"v\",namespace=\"a\",role=\"active\"} 1",
                "vault_registrar_cluster_pods{cluster=\"v\",namespace=\"a\",role=\"all\"} 3",
                "# TYPE vault_registrar_probes_total counter",
                "vault_registrar_probes_total{cluster=\"v\",namespace=\"a\",outcome=\"active\"} 2",
                "vault_registrar_probes_total{cluster=\"v\",namespace=\"a\",outcome=\"failed\"} 1",
                "# TYPE vault_registrar_upgrade_steps_total counter",
                "vault_registrar_upgrade_steps_total{cluster=\"v\",namespace=\"a\",result=\"evicted\"} 1",
            ]
        );
    }

    #[test]
    fn counting_alone_shows_no_gauges_and_forgetting_takes_only_that_cluster() {
        let m = ClusterMetrics::default();
        m.count_probe("a", "v", "standby");
        assert!(!m.shows("a", "v"), "a probe does not set the gauges");
        assert!(text(&m).iter().all(|l| !l.contains("cluster_pods")));
        m.show("a", "v", gauges(None));
        m.show("b", "v", gauges(Some("v-1")));
        assert!(m.shows("a", "v") && m.shows("b", "v"));
        assert!(text(&m).iter().all(|l| !l.contains("namespace=\"a\",pod=")));
        m.forget("a", "v");
        assert!(!m.shows("a", "v"));
        let left = text(&m);
        assert!(
            left.iter().all(|l| !l.contains("namespace=\"a\"")),
            "{left:?}"
        );
        assert!(
            left.iter().any(|l| l.contains("namespace=\"b\"")),
            "{left:?}"
        );
        m.forget_all();
        assert!(text(&m).iter().all(|l| !l.contains("cluster=")));
    }

    #[test]
    fn every_family_is_described_even_without_series() {
        let m = ClusterMetrics::default();
        let names: Vec<_> = m.collect().iter().map(|f| f.name().to_string()).collect();
        let described: Vec<_> = m.desc().iter().map(|d| d.fq_name.clone()).collect();
        assert_eq!(names, described);
        assert_eq!(names.len(), FAMILIES.len());
    }
}
