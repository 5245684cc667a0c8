//! Prometheus metrics of the operator.

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
    pub probes: IntCounterVec,
    pub probe_latency: HistogramVec,
    pub label_writes: IntCounter,
    pub status_writes: IntCounter,
    pub service_writes: IntCounter,
    pub active_changes: IntCounterVec,
    pub cluster_pods: IntGaugeVec,
    pub cluster_ready: IntGaugeVec,
    pub leader: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Self {
            reconciles: IntCounterVec::new(Opts::new("vault_registrar_reconciles_total", "Reconciles of VaultClusters, by result"), &["result"]).unwrap(),
            reconcile_errors: IntCounterVec::new(Opts::new("vault_registrar_reconcile_errors_total", "Failed reconciles, by error kind"), &["kind"]).unwrap(),
            reconcile_duration: Histogram::with_opts(HistogramOpts::new("vault_registrar_reconcile_duration_seconds", "Time one reconcile takes, probes included")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])).unwrap(),
            probes: IntCounterVec::new(Opts::new("vault_registrar_probes_total", "Health probes, by outcome (active, standby, perf-standby, sealed, uninitialized, removed, failed)"), &["outcome"]).unwrap(),
            probe_latency: HistogramVec::new(HistogramOpts::new("vault_registrar_probe_duration_seconds", "Health probe latency")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]), &["result"]).unwrap(),
            label_writes: IntCounter::new("vault_registrar_pod_label_writes_total", "Pod label patches sent").unwrap(),
            status_writes: IntCounter::new("vault_registrar_status_writes_total", "VaultCluster status patches sent").unwrap(),
            service_writes: IntCounter::new("vault_registrar_service_writes_total", "Service creates, applies and deletes sent").unwrap(),
            active_changes: IntCounterVec::new(Opts::new("vault_registrar_active_changes_total", "Changes of the active pod, by VaultCluster"), &["namespace", "cluster"]).unwrap(),
            cluster_pods: IntGaugeVec::new(Opts::new("vault_registrar_cluster_pods", "Selected pods per VaultCluster, by role"), &["namespace", "cluster", "role"]).unwrap(),
            cluster_ready: IntGaugeVec::new(Opts::new("vault_registrar_cluster_ready", "1 when the VaultCluster's Ready condition is True"), &["namespace", "cluster"]).unwrap(),
            leader: IntGauge::new("vault_registrar_leader", "1 while this process holds the leader lease (or runs without election)").unwrap(),
            registry,
        };
        m.register();
        m
    }

    fn register(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.reconciles.clone()),
            Box::new(self.reconcile_errors.clone()),
            Box::new(self.reconcile_duration.clone()),
            Box::new(self.probes.clone()),
            Box::new(self.probe_latency.clone()),
            Box::new(self.label_writes.clone()),
            Box::new(self.status_writes.clone()),
            Box::new(self.service_writes.clone()),
            Box::new(self.active_changes.clone()),
            Box::new(self.cluster_pods.clone()),
            Box::new(self.cluster_ready.clone()),
            Box::new(self.leader.clone()),
        ];
        for c in collectors {
            self.registry.register(c).expect("metric names are unique");
        }
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
