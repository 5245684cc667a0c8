//! The `VaultCluster` custom resource: which pods are Vault, how to reach their health
//! endpoint, and which Services to generate. The schema is the first line of validation:
//! whatever the API server can reject, it rejects, with the field and the reason.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelectorRequirement};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Finalizer that removes this operator's labels from the pods before a VaultCluster goes.
pub const FINALIZER: &str = "vault-registrar.dev/cleanup";

/// Kubernetes duration strings ("2s", "1m30s", "250ms"): unsigned, every number with a
/// unit. kube's parser reads more (a sign, a bare "0", ".5s", "μs" with the Greek mu); the
/// schema keeps to this subset, so every stored duration parses and none is negative.
const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// The longest duration read, in seconds (some thirty million years): far beyond any use,
/// far below what overflows kube's arithmetic.
const MAX_SECONDS: f64 = 1e15;

/// An upper bound of a duration's length in seconds, from its digits and units alone: each
/// number counts as the next power of ten above it, an unknown unit as hours.
fn upper_bound_seconds(text: &str) -> f64 {
    let mut total = 0.0;
    let mut rest = text.trim_start_matches(['+', '-']);
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let whole = rest[..number_end].split('.').next().unwrap_or_default();
        let whole = whole.trim_start_matches('0');
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            _ => 3600.0,
        };
        rest = &rest[unit_end..];
        total += 10f64.powi(whole.len().min(400) as i32) * scale;
    }
    total
}

/// Reads a duration with kube's parser (Go's `time.ParseDuration` syntax), refusing what
/// the schema refuses and kube would take: an empty string and a negative duration.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    if text.is_empty() {
        return Err("empty duration".into());
    }
    // kube's parser panics on a sign after the first piece ("1h-8h") and on a number too
    // big for a Duration ("0888…8s"); both found by fuzzing (fuzz/regressions/duration).
    if text.get(1..).is_some_and(|rest| rest.contains(['+', '-'])) {
        return Err(format!(
            "{text:?} is not a duration: a sign may only lead it"
        ));
    }
    if upper_bound_seconds(text) > MAX_SECONDS {
        return Err(format!("{text:?} is too long a duration"));
    }
    let parsed: kube::core::Duration = text
        .parse()
        .map_err(|e| format!("{text:?} is not a duration: {e}"))?;
    if parsed.is_negative() {
        return Err(format!("{text:?} is negative"));
    }
    Ok(parsed.into())
}

/// Selects the Vault pods of one cluster and decides how the operator labels them, probes
/// them and which Services it generates for them.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vault-registrar.dev",
    version = "v1alpha1",
    kind = "VaultCluster",
    namespaced,
    shortname = "vc",
    category = "vault",
    doc = "A Vault or OpenBao cluster whose pods vault-registrar probes and labels with their HA role, and for which it keeps active and standby Services.",
    status = "VaultClusterStatus",
    validation = Rule::new("size(self.metadata.name) <= 50 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be a DNS label of at most 50 characters starting with a letter: it names the generated Services (<name>-perf-standby is at most 63) and is the value of the vault-registrar.dev/cluster pod label"),
    printcolumn = r#"{"name":"Active","type":"string","jsonPath":".status.activePod"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.pods"}"#,
    printcolumn = r#"{"name":"Unsealed","type":"integer","jsonPath":".status.unsealed"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.version"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VaultClusterSpec {
    /// Which pods in this namespace belong to the Vault cluster. matchLabels is required
    /// because the generated Services select with it; matchExpressions may narrow the pods
    /// that are probed and labelled.
    pub selector: PodSelector,

    /// Prefix of the labels written on each pod: "<prefix>-active", "-initialized",
    /// "-perf-standby", "-sealed" and "-version". "vault" matches Vault's own labels,
    /// "openbao" OpenBao's.
    #[serde(default = "default_label_prefix")]
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub label_prefix: String,

    /// How each pod's health endpoint is probed.
    #[serde(default)]
    pub health: HealthSpec,

    /// The Services generated for the cluster.
    #[serde(default)]
    pub services: ServicesSpec,

    /// Opt-in: replace the pods of an outdated StatefulSet revision by role, standbys
    /// first and the active pod last. Without it the operator never deletes or evicts a
    /// pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<UpgradeSpec>,
}

/// How the operator replaces the pods of an outdated StatefulSet revision. The pods'
/// controller must be a StatefulSet with updateStrategy OnDelete, so that the StatefulSet
/// controller does not replace them itself.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeSpec {
    /// RoleOrdered: evict outdated standbys one at a time, each only once the pod before
    /// it answers as an unsealed standby at the new revision, and the active pod last.
    pub strategy: UpgradeStrategy,

    /// The most pods one step evicts (standbys only; the active pod always goes alone).
    /// Above 1 only where raft keeps its quorum: at most (n-1)/2 of the StatefulSet's n
    /// replicas, e.g. 2 of 5, 3 of 7; otherwise the Upgrading condition reports InvalidSpec.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 1, max = 3))]
    pub max_unavailable: i32,
}

fn default_max_unavailable() -> i32 {
    1
}

/// The order in which outdated pods are replaced.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpgradeStrategy {
    /// Standbys first, the active pod last.
    RoleOrdered,
}

fn default_label_prefix() -> String {
    "vault".into()
}

/// A label selector whose matchLabels is required and not empty.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodSelector {
    /// Labels every Vault pod carries, for example app.kubernetes.io/name: vault. Also the
    /// base of every generated Service's selector. Must not be empty.
    #[x_kube(validation = Rule::new("size(self) > 0").message("matchLabels must name at least one label"))]
    pub match_labels: BTreeMap<String, String>,

    /// Further requirements a pod must meet to be probed and labelled. They do not reach the
    /// Services, whose selectors cannot express them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// Where and how often to ask each pod for GET /v1/sys/health.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(self.timeout) < duration(self.interval)").message("timeout must be less than interval"))]
pub struct HealthSpec {
    /// http or https.
    #[serde(default)]
    pub scheme: Scheme,

    /// Port of Vault's API listener on the pod IP.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Path of the health endpoint.
    #[serde(default = "default_path")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/[^\s?#]*$"))]
    pub path: String,

    /// Time between probes of each pod, a Kubernetes duration from 200ms to 5m.
    #[serde(default = "default_interval")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('200ms')").message("interval must be at least 200ms"))]
    #[x_kube(validation = Rule::new("duration(self) <= duration('5m')").message("interval must be at most 5m: a longer one leaves failovers unseen for too long"))]
    pub interval: String,

    /// How often the active pod alone is probed between full rounds, so that a step-down
    /// or seal is seen while it happens and the new active pod is labelled within a round
    /// of answering. At least 100ms; an activeInterval longer than interval acts as interval.
    #[serde(default = "default_active_interval")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('100ms')").message("activeInterval must be at least 100ms"))]
    pub active_interval: String,

    /// How long one probe may take, a Kubernetes duration less than interval and at most
    /// 30s. The wait for a free probe slot counts in it.
    #[serde(default = "default_timeout")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("timeout must be positive"))]
    #[x_kube(validation = Rule::new("duration(self) <= duration('30s')").message("timeout must be at most 30s: a probe holds a slot shared with other clusters"))]
    pub timeout: String,

    /// Consecutive failed probes before a pod counts as unreachable and gets the
    /// after-shutdown labels.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: i32,

    /// TLS settings, used when scheme is https.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

impl Default for HealthSpec {
    fn default() -> Self {
        Self {
            scheme: Scheme::default(),
            port: default_port(),
            path: default_path(),
            interval: default_interval(),
            active_interval: default_active_interval(),
            timeout: default_timeout(),
            failure_threshold: default_failure_threshold(),
            tls: None,
        }
    }
}

fn default_port() -> i32 {
    8200
}
fn default_path() -> String {
    "/v1/sys/health".into()
}
fn default_interval() -> String {
    "2s".into()
}
fn default_active_interval() -> String {
    "500ms".into()
}
fn default_timeout() -> String {
    "1s".into()
}
fn default_failure_threshold() -> i32 {
    2
}

/// The health endpoint's scheme.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    #[default]
    Http,
    Https,
}

/// How the probe verifies Vault's serving certificate.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.caConfigMapRef) && has(self.caSecretRef))").message("set caConfigMapRef or caSecretRef, not both"))]
pub struct TlsSpec {
    /// ConfigMap in this namespace holding the CA bundle (PEM) that signed Vault's
    /// certificate, in data or binaryData: the usual home of public CA bundles (what
    /// trust-manager distributes, say), and readable without access to Secrets. With
    /// neither this nor caSecretRef, https needs insecureSkipVerify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_config_map_ref: Option<KeyRef>,

    /// Secret in this namespace holding the CA bundle (PEM). The operator may read Secrets
    /// only in the namespaces its Helm chart lists in tls.secretNamespaces; prefer
    /// caConfigMapRef.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<KeyRef>,

    /// Name to verify in the certificate instead of the pod IP, also sent as SNI. May use
    /// {pod} and {namespace}, e.g. "{pod}.vault-internal"; with them filled in it must be a
    /// lower-case DNS name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.replace('{pod}', 'p').replace('{namespace}', 'n').matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("serverName must be a lower-case DNS name; the only placeholders are {pod} and {namespace}"))]
    pub server_name: String,

    /// Skip certificate verification. Only for tests: anyone on the path can then answer.
    #[serde(default)]
    pub insecure_skip_verify: bool,

    /// Secret in this namespace (kubernetes.io/tls: tls.crt and tls.key) with the client
    /// certificate the probe presents, for listeners with tls_require_and_verify_client_cert.
    /// Same rules as caSecretRef: readable only in the namespaces the chart lists in
    /// tls.secretNamespaces. Read again at most 5 minutes after a change, and at once when
    /// every probe fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<SecretRef>,
}

/// A Secret in the VaultCluster's namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// A key of a ConfigMap or Secret in the VaultCluster's namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    /// Name of the ConfigMap or Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key holding the PEM bundle.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".into()
}

/// The generated Services and their shared ports.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServicesSpec {
    /// Ports of every generated Service. Names must be unique.
    #[serde(default = "default_ports")]
    #[schemars(length(min = 1, max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub ports: Vec<ServicePortSpec>,

    /// Selects the one active pod. Default name <metadata.name>-active.
    #[serde(default = "ServiceSpec::enabled")]
    pub active: ServiceSpec,

    /// Selects unsealed standby pods. Default name <metadata.name>-standby.
    #[serde(default = "ServiceSpec::enabled")]
    pub standby: ServiceSpec,

    /// Selects unsealed performance standby pods (Vault Enterprise). Default name
    /// <metadata.name>-perf-standby. Disabled by default.
    #[serde(default = "ServiceSpec::disabled")]
    pub perf_standby: ServiceSpec,
}

impl Default for ServicesSpec {
    fn default() -> Self {
        Self {
            ports: default_ports(),
            active: ServiceSpec::enabled(),
            standby: ServiceSpec::enabled(),
            perf_standby: ServiceSpec::disabled(),
        }
    }
}

fn default_ports() -> Vec<ServicePortSpec> {
    vec![
        ServicePortSpec {
            name: "http".into(),
            port: 8200,
            target_port: Some(8200),
        },
        ServicePortSpec {
            name: "internal".into(),
            port: 8201,
            target_port: Some(8201),
        },
    ]
}

/// One port of the generated Services.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortSpec {
    /// Port name, unique among the ports.
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Port the Service exposes.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Port on the pod. Defaults to port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub target_port: Option<i32>,
}

/// One generated Service.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.externalTrafficPolicy) || (has(self.type) && self.type != 'ClusterIP')").message("externalTrafficPolicy applies to NodePort and LoadBalancer Services only"))]
#[x_kube(validation = Rule::new("!has(self.loadBalancerClass) || (has(self.type) && self.type == 'LoadBalancer')").message("loadBalancerClass applies to LoadBalancer Services only"))]
#[x_kube(validation = Rule::new("!has(self.loadBalancerSourceRanges) || size(self.loadBalancerSourceRanges) == 0 || (has(self.type) && self.type == 'LoadBalancer')").message("loadBalancerSourceRanges applies to LoadBalancer Services only"))]
#[x_kube(validation = Rule::new("!has(self.ipFamilies) || size(self.ipFamilies) < 2 || self.ipFamilies[0] != self.ipFamilies[1]").message("ipFamilies may not name a family twice"))]
pub struct ServiceSpec {
    /// Whether the Service exists. Disabling it deletes the Service.
    #[serde(default)]
    pub enabled: bool,
    /// Service name; the default is <metadata.name>-active, -standby or -perf-standby.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: Option<String>,
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Extra labels on the Service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on the Service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Whether a NodePort or LoadBalancer Service routes external traffic to pods on the
    /// receiving node only (Local, keeping the client's address) or cluster-wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<TrafficPolicy>,
    /// Whether traffic from inside the cluster goes only to pods on the sending node (Local).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<TrafficPolicy>,
    /// The load balancer implementation of a LoadBalancer Service; the API server refuses to
    /// change it once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 316),
        regex(
            pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
        )
    )]
    pub load_balancer_class: Option<String>,
    /// Client CIDRs a LoadBalancer Service accepts, where the provider supports it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(regex(
            pattern = r"^([0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}|[0-9a-fA-F:]+/[0-9]{1,3})$"
        ))
    )]
    pub load_balancer_source_ranges: Vec<String>,
    /// SingleStack, PreferDualStack or RequireDualStack; the cluster's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_family_policy: Option<IpFamilyPolicy>,
    /// The address families of the Service, first the primary; the cluster's default when
    /// empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2))]
    pub ip_families: Vec<IpFamily>,
    /// None, or ClientIP to send a client to the same pod each time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinity>,
}

/// externalTrafficPolicy and internalTrafficPolicy values.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpFamilyPolicy {
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionAffinity {
    None,
    ClientIP,
}

/// The names Kubernetes uses, for the Service object.
macro_rules! api_names {
    ($($ty:ty),*) => {$(
        impl $ty {
            pub fn as_str(self) -> String {
                serde_json::to_value(self)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .expect("a unit variant serializes as its name")
            }
        }
    )*};
}
api_names!(TrafficPolicy, IpFamilyPolicy, IpFamily, SessionAffinity);

impl ServiceSpec {
    fn enabled() -> Self {
        Self {
            enabled: true,
            ..Self::disabled()
        }
    }
    fn disabled() -> Self {
        Self {
            enabled: false,
            name: None,
            type_: ServiceType::ClusterIP,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            external_traffic_policy: None,
            internal_traffic_policy: None,
            load_balancer_class: None,
            load_balancer_source_ranges: Vec::new(),
            ip_family_policy: None,
            ip_families: Vec::new(),
            session_affinity: None,
        }
    }
}

/// Kubernetes Service type of a generated Service.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// What the operator last observed. Changes only when something observable changed, so an
/// unchanged cluster causes no status writes.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VaultClusterStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Available, Degraded and SelectorOverlap, one of each.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The pod labelled active, if exactly one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_pod: Option<String>,
    /// Selected pods.
    #[serde(default)]
    pub pods: i32,
    /// Pods answering as active.
    #[serde(default)]
    pub active: i32,
    /// Pods answering as standby.
    #[serde(default)]
    pub standby: i32,
    /// Pods answering as performance standby.
    #[serde(default)]
    pub perf_standby: i32,
    /// Pods that are initialized and unsealed.
    #[serde(default)]
    pub unsealed: i32,
    /// Pods answering as sealed.
    #[serde(default)]
    pub sealed: i32,
    /// Pods answering as not initialized.
    #[serde(default)]
    pub uninitialized: i32,
    /// Pods not answering, or answering something that is not Vault's health.
    #[serde(default)]
    pub unreachable: i32,
    /// Vault versions reported, comma-separated.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Selected pods as last probed: at most 25, the active pod first, then pods that
    /// cannot serve or whose probes fail, then standbys (by name); the counts above cover
    /// every pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 25))]
    pub members: Vec<MemberStatus>,
    /// Selected pods left out of `members` by its cap.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub members_omitted: i32,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// One pod as last probed.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Pod name.
    pub name: String,
    /// Pod IP probed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ip: String,
    /// active, standby, perf-standby, sealed, uninitialized, removed, unreachable, pending
    /// (not yet probed) or ignored (claimed by an older VaultCluster).
    pub role: String,
    /// Whether the pod reported itself sealed.
    #[serde(default)]
    pub sealed: bool,
    /// Version the pod reported.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Why the probes of this pod are failing, if they are: the error that began the
    /// current run of failures.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_probe_error: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_read_with_kube() {
        for (text, millis) in [
            ("2s", 2000),
            ("200ms", 200),
            ("1m30s", 90_000),
            ("1.5s", 1500),
            ("1h", 3_600_000),
            ("500000us", 500),
            ("0s", 0),
            ("00ns0ns5000000000000ns", 5_000_000),
        ] {
            assert_eq!(
                parse_duration(text).unwrap(),
                Duration::from_millis(millis),
                "{text}"
            );
        }
        let huge = format!("0{}s", "8".repeat(29));
        let many = "99999999999999h".repeat(3);
        for text in [
            "",
            "2",
            "s",
            "2x",
            "two seconds",
            "1..5s",
            "-1s",
            "1h-8h",
            "1s+1s",
            &huge,
            &many,
        ] {
            assert!(parse_duration(text).is_err(), "{text}");
        }
    }

    /// The schema's pattern admits only durations the parser reads; what the parser reads
    /// beyond it (documented at DURATION_PATTERN) the API server refuses.
    #[test]
    fn schema_pattern_is_a_subset_of_the_parser() {
        let pattern = regex::Regex::new(DURATION_PATTERN).unwrap();
        for text in [
            "2s", "1m30s", "1.5s", "250ms", "10us", "10µs", "3ns", "1h2m3s", "0s",
        ] {
            assert!(pattern.is_match(text), "{text}");
            assert!(parse_duration(text).is_ok(), "{text}");
        }
        for text in ["+1s", "0", ".5s", "1.s", "10μs"] {
            assert!(!pattern.is_match(text), "{text}: schema refuses");
            assert!(parse_duration(text).is_ok(), "{text}: kube reads it");
        }
        for text in ["-1s", "", "1", "1d", "1 s", "s"] {
            assert!(!pattern.is_match(text), "{text}");
            assert!(parse_duration(text).is_err(), "{text}");
        }
    }
}
