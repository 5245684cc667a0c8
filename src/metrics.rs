//! Prometheus metrics of the operator: what it does (reconciles, probes, writes), what it
//! sees of each VaultCluster (`cluster_metrics`), its build and its process. A VaultCluster's
//! series live while this process leads and the VaultCluster exists: `forget_cluster`
//! deletes them when it goes, `forget_clusters` all of them when leadership is lost, so a
//! follower or a deleted cluster never shows a stale value.
//!
//! The per-cluster label is `namespace`, the VaultCluster's. Scraped with honor_labels (the
//! chart's ServiceMonitor default) it stays `namespace`; otherwise Prometheus renames it to
//! `exported_namespace` and sets `namespace` to the operator's.

use std::collections::BTreeMap;

use crate::api_metrics::ApiMetrics;
use crate::cluster_metrics::ClusterMetrics;
use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: Histogram,
    pub probe_latency: HistogramVec,
    pub label_writes: IntCounter,
    pub status_writes: IntCounter,
    pub service_writes: IntCounter,
    /// Probes, active changes, upgrade steps and gauges of each VaultCluster.
    pub clusters: ClusterMetrics,
    pub leader: IntGauge,
    pub probe_connections: IntGauge,
    /// Every request of this process's Kubernetes clients.
    pub api: ApiMetrics,
    build_info: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge")
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            registry: Registry::new(),
            reconciles: counter(
                "vault_registrar_reconciles_total",
                "Reconciles of VaultClusters, by result (ok, error).",
                &["result"],
            ),
            reconcile_errors: counter(
                "vault_registrar_reconcile_errors_total",
                "Failed reconciles, by the kind of error (list_pods, patch_pod, write_service, read_service, read_endpoints, update_status, read_secret, finalizer, not_leader).",
                &["kind"],
            ),
            reconcile_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "vault_registrar_reconcile_duration_seconds",
                    "Time one reconcile takes, probes included.",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )
            .expect("valid histogram"),
            probe_latency: HistogramVec::new(
                HistogramOpts::new(
                    "vault_registrar_probe_duration_seconds",
                    "Health probe latency over all VaultClusters, by result (ok, failed).",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
                &["result"],
            )
            .expect("valid histogram"),
            label_writes: IntCounter::new(
                "vault_registrar_pod_label_writes_total",
                "Pod label patches sent.",
            )
            .expect("valid counter"),
            status_writes: IntCounter::new(
                "vault_registrar_status_writes_total",
                "VaultCluster status patches sent.",
            )
            .expect("valid counter"),
            service_writes: IntCounter::new(
                "vault_registrar_service_writes_total",
                "Service creates, applies and deletes sent.",
            )
            .expect("valid counter"),
            clusters: ClusterMetrics::default(),
            leader: IntGauge::new(
                "vault_registrar_leader",
                "1 while this process holds the leader lease (or runs without election), else 0.",
            )
            .expect("valid gauge"),
            probe_connections: IntGauge::new(
                "vault_registrar_probe_connections",
                "Idle connections to pods kept for their next probe; closed after a minute unused.",
            )
            .expect("valid gauge"),
            api: ApiMetrics {
                requests: counter(
                    "vault_registrar_rest_client_requests_total",
                    "Requests to the Kubernetes API server, by verb (get, list, watch, create, update, patch, delete), resource (with its subresource) and status code (error when no answer came).",
                    &["verb", "resource", "code"],
                ),
                latency: HistogramVec::new(
                    HistogramOpts::new(
                        "vault_registrar_rest_client_request_duration_seconds",
                        "Time from sending a request to the Kubernetes API server to its answer's headers, by verb and resource.",
                    )
                    .buckets(vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ]),
                    &["verb", "resource"],
                )
                .expect("valid histogram"),
            },
            build_info: gauge(
                "vault_registrar_build_info",
                "Always 1; the labels tell the operator's version.",
                &["version"],
            ),
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m.register();
        m
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.reconciles.clone()),
            Box::new(self.reconcile_errors.clone()),
            Box::new(self.reconcile_duration.clone()),
            Box::new(self.probe_latency.clone()),
            Box::new(self.label_writes.clone()),
            Box::new(self.status_writes.clone()),
            Box::new(self.service_writes.clone()),
            Box::new(self.clusters.clone()),
            Box::new(self.leader.clone()),
            Box::new(self.probe_connections.clone()),
            Box::new(self.api.requests.clone()),
            Box::new(self.api.latency.clone()),
            Box::new(self.build_info.clone()),
            Box::new(process_collector()),
        ]
    }

    fn register(&self) {
        for c in self.collectors() {
            self.registry.register(c).expect("metric names are unique");
        }
    }

    /// Every metric this process can export, whether it has a series yet or not, with its
    /// label names.
    pub fn exported(&self) -> BTreeMap<String, Vec<String>> {
        self.collectors()
            .iter()
            .flat_map(|c| {
                c.desc().into_iter().map(|d| {
                    let constant = d.const_label_pairs.iter().map(|l| l.name().to_string());
                    let labels = d.variable_labels.iter().cloned().chain(constant);
                    (d.fq_name.clone(), labels.collect())
                })
            })
            .collect()
    }

    /// Whether the cluster's gauges are set: after losing and regaining the lead they are
    /// not, however unchanged its status.
    pub fn shows(&self, ns: &str, cluster: &str) -> bool {
        self.clusters.shows(ns, cluster)
    }

    /// Deletes every series of one VaultCluster: it is gone.
    pub fn forget_cluster(&self, ns: &str, cluster: &str) {
        self.clusters.forget(ns, cluster);
    }

    /// Deletes the series of every VaultCluster: this process no longer leads, so what it
    /// last saw is no longer watched.
    pub fn forget_clusters(&self) {
        self.clusters.forget_all();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

/// CPU, memory, open files and start time of this process, as `process_*`.
fn process_collector() -> prometheus::process_collector::ProcessCollector {
    prometheus::process_collector::ProcessCollector::for_self()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster_metrics::Gauges;

    fn series(m: &Metrics, needle: &str) -> Vec<String> {
        m.render()
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(needle))
            .map(String::from)
            .collect()
    }

    fn of(m: &Metrics, ns: &str, cluster: &str) -> usize {
        let (ns, cluster) = (
            format!("namespace=\"{ns}\""),
            format!("cluster=\"{cluster}\""),
        );
        series(m, &ns)
            .iter()
            .filter(|l| l.contains(&cluster))
            .count()
    }

    fn gauges(active_pod: Option<&str>) -> Gauges {
        Gauges {
            pods: vec![("all", 3)],
            conditions: vec![("Ready", true)],
            active_pod: active_pod.map(String::from),
        }
    }

    fn observe(m: &Metrics, ns: &str, cluster: &str) {
        m.clusters.count_probe(ns, cluster, "active");
        m.clusters.count_probe(ns, cluster, "failed");
        m.clusters.count_active_change(ns, cluster);
        let pod = format!("{cluster}-0");
        m.clusters.show(ns, cluster, gauges(Some(&pod)));
    }

    #[test]
    fn a_deleted_cluster_loses_its_series_and_only_its() {
        let m = Metrics::new();
        observe(&m, "a", "vault");
        observe(&m, "b", "vault");
        observe(&m, "a", "vault-b");
        assert_eq!(of(&m, "a", "vault"), 6);
        m.forget_cluster("a", "vault");
        assert_eq!(of(&m, "a", "vault"), 0, "{}", m.render());
        assert_eq!(of(&m, "b", "vault"), 6);
        assert_eq!(of(&m, "a", "vault-b"), 6);
    }

    #[test]
    fn losing_leadership_forgets_every_cluster() {
        let m = Metrics::new();
        observe(&m, "a", "vault");
        observe(&m, "b", "vault");
        m.forget_clusters();
        assert!(series(&m, "cluster=").is_empty(), "{}", m.render());
        assert!(
            !m.shows("a", "vault"),
            "the next term sets the gauges again"
        );
        observe(&m, "a", "vault");
        assert!(m.shows("a", "vault"));
        assert_eq!(series(&m, "cluster=").len(), 6, "series come back");
    }

    #[test]
    fn the_active_pod_series_follows_the_active_pod() {
        let m = Metrics::new();
        m.clusters.show("a", "vault", gauges(Some("vault-0")));
        m.clusters.show("a", "vault", gauges(Some("vault-1")));
        assert_eq!(
            series(&m, "vault_registrar_cluster_active_pod"),
            [
                "vault_registrar_cluster_active_pod{cluster=\"vault\",namespace=\"a\",pod=\"vault-1\"} 1"
            ]
        );
        m.clusters.show("a", "vault", gauges(None));
        assert!(series(&m, "vault_registrar_cluster_active_pod").is_empty());
    }

    #[test]
    fn readme_documents_each_metric_with_its_type_and_labels() {
        let readme = include_str!("../README.md");
        let m = Metrics::new();
        let exported = m.exported();
        for family in m.collectors().iter().flat_map(|c| c.collect()) {
            let name = family.name();
            if name.starts_with("process_") {
                continue;
            }
            let kind = match family.get_field_type() {
                prometheus::proto::MetricType::COUNTER => "counter",
                prometheus::proto::MetricType::GAUGE => "gauge",
                prometheus::proto::MetricType::HISTOGRAM => "histogram",
                other => panic!("{name}: {other:?}"),
            };
            let labels: Vec<String> = exported[name].iter().map(|l| format!("`{l}`")).collect();
            let labels = match labels.is_empty() {
                true => " ".to_string(),
                false => format!(" {} ", labels.join(", ")),
            };
            let row = format!("| `{name}` | {kind} |{labels}|");
            assert!(readme.contains(&row), "README lacks the row {row}");
        }
        assert!(readme.contains("| `process_*` |"));
    }

    #[test]
    fn build_info_process_metrics_and_help_are_exported() {
        let m = Metrics::new();
        let text = m.render();
        assert!(
            text.contains(&format!(
                "vault_registrar_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        assert!(text.contains("process_start_time_seconds"), "{text}");
        for name in m.exported().keys() {
            assert!(
                text.contains(&format!("# HELP {name} ")) || !text.contains(&format!("\n{name}")),
                "{name} has no HELP"
            );
        }
        assert_eq!(
            m.exported()["vault_registrar_probes_total"],
            ["namespace", "cluster", "outcome"]
        );
    }
}
