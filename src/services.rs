//! The generated Services: what each should look like, and whether an existing one has
//! drifted from that. Pure; the reconciler applies and deletes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec as K8sServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::crd::{ServiceSpec, ServiceType, VaultCluster};
use crate::labels::{LabelNames, OWNER_LABEL};

pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "vault-registrar");
/// Label naming the owning VaultCluster, to find its Services by selector.
pub const CLUSTER_LABEL: &str = "vault-registrar.dev/cluster";
/// Label naming which of the generated Services this is.
pub const ROLE_LABEL: &str = "vault-registrar.dev/service";

/// Which generated Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Active,
    Standby,
    PerfStandby,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Active, Kind::Standby, Kind::PerfStandby];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Active => "active",
            Kind::Standby => "standby",
            Kind::PerfStandby => "perf-standby",
        }
    }

    /// The field of `spec.services` that configures this Service.
    pub fn field(self) -> &'static str {
        match self {
            Kind::Active => "active",
            Kind::Standby => "standby",
            Kind::PerfStandby => "perfStandby",
        }
    }

    fn spec(self, vc: &VaultCluster) -> &ServiceSpec {
        let s = &vc.spec.services;
        match self {
            Kind::Active => &s.active,
            Kind::Standby => &s.standby,
            Kind::PerfStandby => &s.perf_standby,
        }
    }

    /// The Service's pod selector: the cluster's matchLabels, our ownership label (a
    /// Service selector cannot express matchExpressions, so only ownership keeps two
    /// clusters with the same matchLabels apart) and our role labels.
    fn selector(self, vc: &VaultCluster) -> BTreeMap<String, String> {
        let names = LabelNames::new(&vc.spec.label_prefix);
        let mut selector = vc.spec.selector.match_labels.clone();
        selector.insert(OWNER_LABEL.into(), vc.name_any());
        let extra: Vec<(&String, &str)> = match self {
            Kind::Active => vec![(&names.active, "true")],
            Kind::Standby => vec![(&names.active, "false"), (&names.sealed, "false")],
            Kind::PerfStandby => vec![(&names.perf_standby, "true"), (&names.sealed, "false")],
        };
        selector.extend(extra.into_iter().map(|(k, v)| (k.clone(), v.to_string())));
        selector
    }
}

/// The name of a generated Service.
pub fn name(vc: &VaultCluster, kind: Kind) -> String {
    kind.spec(vc)
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{}", vc.name_any(), kind.as_str()))
}

/// The Services that should exist, by kind; disabled kinds are absent.
pub fn desired(vc: &VaultCluster) -> Vec<(Kind, Service)> {
    Kind::ALL
        .into_iter()
        .filter(|kind| kind.spec(vc).enabled)
        .map(|kind| (kind, build(vc, kind)))
        .collect()
}

/// Names given twice among the enabled Services: a spec problem the schema cannot see.
pub fn name_clash(vc: &VaultCluster) -> Option<String> {
    let names: Vec<String> = desired(vc).iter().map(|(k, _)| name(vc, *k)).collect();
    let clash = names
        .iter()
        .find(|n| names.iter().filter(|m| m == n).count() > 1)?;
    Some(format!(
        "spec.services: two enabled Services are both named {clash}"
    ))
}

/// A Service type the operator was not started to allow (`--allowed-service-types`, which
/// the chart sets from `allowedServiceTypes`).
#[derive(Debug, thiserror::Error)]
#[error("unknown Service type {0:?}: expected ClusterIP, NodePort or LoadBalancer")]
pub struct UnknownServiceType(String);

impl std::str::FromStr for ServiceType {
    type Err = UnknownServiceType;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        [
            ServiceType::ClusterIP,
            ServiceType::NodePort,
            ServiceType::LoadBalancer,
        ]
        .into_iter()
        .find(|t| t.as_str() == text)
        .ok_or_else(|| UnknownServiceType(text.into()))
    }
}

/// What the VaultClusters' Services may ask for here (`--allowed-service-types`,
/// `--allowed-service-annotations`, which the chart sets from the values the admission
/// policy enforces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    pub types: Vec<ServiceType>,
    /// Annotation keys; an entry ending in `*` allows every key it begins.
    pub annotations: Vec<String>,
}

impl Allowed {
    /// The first setting of an enabled Service the operator may not write: a spec problem
    /// naming the field.
    pub fn problem(&self, vc: &VaultCluster) -> Option<String> {
        disallowed_type(vc, &self.types).or_else(|| self.disallowed_annotation(vc))
    }

    fn allows_annotation(&self, key: &str) -> bool {
        self.annotations.iter().any(|a| match a.strip_suffix('*') {
            Some(prefix) => key.starts_with(prefix),
            None => key == a,
        })
    }

    /// An annotation another controller acts upon (external-dns publishing a name, a cloud
    /// load balancer's scheme) is as much an exposure as the type.
    fn disallowed_annotation(&self, vc: &VaultCluster) -> Option<String> {
        Kind::ALL.into_iter().find_map(|k| {
            let spec = k.spec(vc);
            let key = spec
                .annotations
                .keys()
                .find(|key| spec.enabled && !self.allows_annotation(key))?;
            Some(format!(
                "spec.services.{}.annotations: {key} is not allowed by the operator (allowed: {}; chart value allowedServiceAnnotations)",
                k.field(),
                if self.annotations.is_empty() {
                    "none".to_string()
                } else {
                    self.annotations.join(", ")
                }
            ))
        })
    }
}

/// An enabled Service of a type the operator may not create here: a spec problem naming
/// the field. The operator refuses it itself, so a VaultCluster author whose own RBAC
/// forbids a LoadBalancer cannot have the operator create one; the admission policy would
/// refuse the write anyway, but only as a failed write with no word on the spec.
pub fn disallowed_type(vc: &VaultCluster, allowed: &[ServiceType]) -> Option<String> {
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.spec(vc).enabled && !allowed.contains(&k.spec(vc).type_))?;
    let allowed: Vec<&str> = allowed.iter().map(|t| t.as_str()).collect();
    Some(format!(
        "spec.services.{}.type: {} is not allowed by the operator (allowed: {}; chart value allowedServiceTypes)",
        kind.field(),
        kind.spec(vc).type_.as_str(),
        allowed.join(", ")
    ))
}

fn build(vc: &VaultCluster, kind: Kind) -> Service {
    let spec = kind.spec(vc);
    let mut labels = spec.labels.clone();
    labels.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
    labels.insert(CLUSTER_LABEL.into(), vc.name_any());
    labels.insert(ROLE_LABEL.into(), kind.as_str().into());
    let ports = vc
        .spec
        .services
        .ports
        .iter()
        .map(|p| ServicePort {
            name: Some(p.name.clone()),
            port: p.port,
            target_port: Some(IntOrString::Int(p.target_port.unwrap_or(p.port))),
            protocol: Some("TCP".into()),
            ..Default::default()
        })
        .collect();
    Service {
        metadata: ObjectMeta {
            name: Some(name(vc, kind)),
            namespace: vc.namespace(),
            labels: Some(labels),
            annotations: (!spec.annotations.is_empty()).then(|| spec.annotations.clone()),
            owner_references: vc.controller_owner_ref(&()).map(|r| vec![r]),
            ..Default::default()
        },
        spec: Some(K8sServiceSpec {
            type_: Some(spec.type_.as_str().into()),
            selector: Some(kind.selector(vc)),
            ports: Some(ports),
            publish_not_ready_addresses: Some(false),
            external_traffic_policy: spec.external_traffic_policy.map(|p| p.as_str()),
            internal_traffic_policy: spec.internal_traffic_policy.map(|p| p.as_str()),
            load_balancer_class: spec.load_balancer_class.clone(),
            load_balancer_source_ranges: non_empty(&spec.load_balancer_source_ranges),
            ip_family_policy: spec.ip_family_policy.map(|p| p.as_str()),
            ip_families: non_empty(&spec.ip_families)
                .map(|f| f.into_iter().map(|f| f.as_str()).collect()),
            session_affinity: spec.session_affinity.map(|a| a.as_str()),
            ..Default::default()
        }),
        status: None,
    }
}

fn non_empty<T: Clone>(items: &[T]) -> Option<Vec<T>> {
    (!items.is_empty()).then(|| items.to_vec())
}

/// How long every pod must have carried the ownership label before a Service selects on it:
/// the EndpointSlice controller matches a new selector against its own cache of pods, which
/// can lag behind the label writes by a moment under load, and would empty the Service.
pub const OWNER_SETTLE: Duration = Duration::from_secs(2);

/// Whether every pod has carried the ownership label for `OWNER_SETTLE`; `since` remembers
/// from when, across rounds.
pub fn owned_long_enough(since: &mut Option<Instant>, owned: bool, now: Instant) -> bool {
    if !owned {
        *since = None;
        return false;
    }
    now.saturating_duration_since(*since.get_or_insert(now)) >= OWNER_SETTLE
}

/// Upgrading from a version whose Services did not select on the ownership label: keeps it
/// out of `want` until every selected pod has carried it for a while (`pods_owned`, as
/// observed before this round's writes), so the Service is never empty for a moment. New
/// Services get it at once.
pub fn defer_owner_selector(want: &mut Service, existing: &Service, pods_owned: bool) {
    let legacy = existing
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .is_some_and(|s| !s.contains_key(OWNER_LABEL));
    if legacy
        && !pods_owned
        && let Some(selector) = want.spec.as_mut().and_then(|s| s.selector.as_mut())
    {
        selector.remove(OWNER_LABEL);
    }
}

/// Whether `existing` is controlled by this VaultCluster.
pub fn owned_by(existing: &Service, vc: &VaultCluster) -> bool {
    let uid = vc.meta().uid.as_deref();
    existing
        .owner_references()
        .iter()
        .any(|r: &OwnerReference| Some(r.uid.as_str()) == uid && r.controller == Some(true))
}

/// Whether any field we set differs in `existing`, or another writer added one we never
/// set (see `foreign_fields`): the write is skipped otherwise.
pub fn drifted(existing: &Service, want: &Service) -> bool {
    differs(existing, want) || foreign_fields(existing, want).is_some()
}

/// What another writer added that the operator never sets, as a JSON merge patch removing
/// it: the fields that send traffic elsewhere or open the Service to more sources
/// (externalIPs, externalName, loadBalancerIP, loadBalancerSourceRanges, an
/// internalTrafficPolicy of Local) and annotations `want` lacks (they steer load balancers
/// and kube-proxy). Server-side apply cannot remove a field another manager owns, hence a
/// patch of its own. None when there is nothing to remove.
pub fn foreign_fields(existing: &Service, want: &Service) -> Option<serde_json::Value> {
    let spec = existing.spec.clone().unwrap_or_default();
    let mut fields = serde_json::Map::new();
    let mut drop_if = |set: bool, field: &str| {
        if set {
            fields.insert(field.into(), serde_json::Value::Null);
        }
    };
    drop_if(
        spec.external_ips.is_some_and(|v| !v.is_empty()),
        "externalIPs",
    );
    drop_if(
        spec.external_name.is_some_and(|v| !v.is_empty()),
        "externalName",
    );
    drop_if(
        spec.load_balancer_ip.is_some_and(|v| !v.is_empty()),
        "loadBalancerIP",
    );
    let wanted_spec = want.spec.clone().unwrap_or_default();
    drop_if(
        spec.load_balancer_source_ranges
            .is_some_and(|v| !v.is_empty())
            && wanted_spec.load_balancer_source_ranges.is_none(),
        "loadBalancerSourceRanges",
    );
    drop_if(
        spec.internal_traffic_policy.as_deref() == Some("Local")
            && wanted_spec.internal_traffic_policy.as_deref() != Some("Local"),
        "internalTrafficPolicy",
    );
    let wanted = want.metadata.annotations.clone().unwrap_or_default();
    let annotations: serde_json::Map<String, serde_json::Value> = existing
        .annotations()
        .keys()
        .filter(|k| !wanted.contains_key(*k))
        .map(|k| (k.clone(), serde_json::Value::Null))
        .collect();
    if fields.is_empty() && annotations.is_empty() {
        return None;
    }
    let mut patch = serde_json::json!({});
    if !fields.is_empty() {
        patch["spec"] = fields.into();
    }
    if !annotations.is_empty() {
        patch["metadata"] = serde_json::json!({ "annotations": annotations });
    }
    Some(patch)
}

/// The write that must come before the apply when another writer added fields we never
/// set: the admission policy judges each write by the object it leaves, so the apply,
/// which cannot remove them, would be refused while they remain. Removes them and, in the
/// same write, puts back the type and the managed-by label, which the policy checks too;
/// the selector may stay as it is for this write. None when nothing foreign is there.
pub fn repair_first(existing: &Service, want: &Service) -> Option<serde_json::Value> {
    let mut patch = foreign_fields(existing, want)?;
    if let Some(kind) = want.spec.as_ref().and_then(|s| s.type_.clone()) {
        patch["spec"]["type"] = kind.into();
    }
    patch["metadata"]["labels"] = serde_json::json!({ MANAGED_BY.0: MANAGED_BY.1 });
    Some(patch)
}

/// Whether any field we set differs in `existing`.
fn differs(existing: &Service, want: &Service) -> bool {
    let (e, w) = (
        existing.spec.clone().unwrap_or_default(),
        want.spec.clone().unwrap_or_default(),
    );
    let port_key = |p: &ServicePort| {
        (
            p.name.clone(),
            p.port,
            p.target_port.clone(),
            p.protocol.clone().unwrap_or_else(|| "TCP".into()),
        )
    };
    let ports = |s: &K8sServiceSpec| s.ports.iter().flatten().map(port_key).collect::<Vec<_>>();
    let contains = |have: &Option<BTreeMap<String, String>>,
                    need: &Option<BTreeMap<String, String>>| {
        need.iter()
            .flatten()
            .all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    e.selector != w.selector
        || ports(&e) != ports(&w)
        || settings_differ(&e, &w)
        || e.type_.as_deref().unwrap_or("ClusterIP") != w.type_.as_deref().unwrap_or("ClusterIP")
        || e.publish_not_ready_addresses.unwrap_or(false)
        || !contains(&existing.metadata.labels, &want.metadata.labels)
        || !contains(&existing.metadata.annotations, &want.metadata.annotations)
        || existing.metadata.owner_references != want.metadata.owner_references
}

/// The settings a VaultCluster may give its Services, each compared with what the API server
/// defaults it to when we leave it unset, so that removing a setting from the spec is a
/// change too. The address families are compared only when asked for: their default is the
/// cluster's, which the operator does not know.
fn settings_differ(e: &K8sServiceSpec, w: &K8sServiceSpec) -> bool {
    let or = |v: &Option<String>, default: &str| v.clone().unwrap_or_else(|| default.into());
    let external_default = match w.type_.as_deref() {
        Some("NodePort" | "LoadBalancer") => "Cluster",
        _ => "",
    };
    or(&e.external_traffic_policy, external_default)
        != or(&w.external_traffic_policy, external_default)
        || or(&e.internal_traffic_policy, "Cluster") != or(&w.internal_traffic_policy, "Cluster")
        || e.load_balancer_class != w.load_balancer_class
        || e.load_balancer_source_ranges.clone().unwrap_or_default()
            != w.load_balancer_source_ranges.clone().unwrap_or_default()
        || or(&e.session_affinity, "None") != or(&w.session_affinity, "None")
        || w.ip_family_policy.is_some() && e.ip_family_policy != w.ip_family_policy
        || w.ip_families.is_some() && e.ip_families != w.ip_families
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::VaultClusterSpec;

    fn cluster(yaml: &str) -> VaultCluster {
        let spec: VaultClusterSpec = serde_yaml::from_str(yaml).unwrap();
        let mut vc = VaultCluster::new("vault", spec);
        vc.metadata.namespace = Some("ns".into());
        vc.metadata.uid = Some("uid-1".into());
        vc
    }

    const BASIC: &str = "selector: {matchLabels: {app.kubernetes.io/name: vault}}";

    fn selector(s: &Service) -> Vec<(String, String)> {
        s.spec
            .as_ref()
            .unwrap()
            .selector
            .clone()
            .unwrap()
            .into_iter()
            .collect()
    }

    #[test]
    fn default_services_select_by_role() {
        let vc = cluster(BASIC);
        let services = desired(&vc);
        let got: Vec<(Kind, String, Vec<(String, String)>)> = services
            .iter()
            .map(|(k, s)| (*k, s.metadata.name.clone().unwrap(), selector(s)))
            .collect();
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            got,
            vec![
                (
                    Kind::Active,
                    "vault-active".into(),
                    vec![
                        pair("app.kubernetes.io/name", "vault"),
                        pair("vault-active", "true"),
                        pair(OWNER_LABEL, "vault"),
                    ]
                ),
                (
                    Kind::Standby,
                    "vault-standby".into(),
                    vec![
                        pair("app.kubernetes.io/name", "vault"),
                        pair("vault-active", "false"),
                        pair(OWNER_LABEL, "vault"),
                        pair("vault-sealed", "false"),
                    ]
                ),
            ]
        );
        for (_, s) in &services {
            let spec = s.spec.as_ref().unwrap();
            assert_eq!(spec.publish_not_ready_addresses, Some(false));
            assert_eq!(
                spec.ports
                    .as_ref()
                    .unwrap()
                    .iter()
                    .map(|p| p.port)
                    .collect::<Vec<_>>(),
                vec![8200, 8201]
            );
            assert_eq!(
                s.labels()
                    .get("app.kubernetes.io/managed-by")
                    .map(String::as_str),
                Some("vault-registrar")
            );
            assert_eq!(s.owner_references()[0].uid, "uid-1");
        }
    }

    #[test]
    fn configured_services() {
        let vc = cluster(&format!(
            "{BASIC}\nlabelPrefix: openbao\nservices:\n  ports: [{{name: https, port: 443, targetPort: 8200}}]\n  active: {{enabled: true, name: bao, type: NodePort, labels: {{team: a}}, annotations: {{note: x}}}}\n  standby: {{enabled: false}}\n  perfStandby: {{enabled: true}}"
        ));
        let services = desired(&vc);
        assert_eq!(
            services.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            vec![Kind::Active, Kind::PerfStandby]
        );
        let active = &services[0].1;
        assert_eq!(active.metadata.name.as_deref(), Some("bao"));
        assert_eq!(
            active.spec.as_ref().unwrap().type_.as_deref(),
            Some("NodePort")
        );
        assert_eq!(active.labels().get("team").map(String::as_str), Some("a"));
        assert_eq!(
            active.annotations().get("note").map(String::as_str),
            Some("x")
        );
        let port = &active.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.port, port.target_port.clone()),
            (443, Some(IntOrString::Int(8200)))
        );
        assert!(selector(&services[1].1).contains(&("openbao-perf-standby".into(), "true".into())));
        assert_eq!(
            services[1].1.metadata.name.as_deref(),
            Some("vault-perf-standby")
        );
    }

    const SETTINGS: &str = "services:\n  active:\n    enabled: true\n    type: LoadBalancer\n    externalTrafficPolicy: Local\n    internalTrafficPolicy: Local\n    loadBalancerClass: example.com/internal\n    loadBalancerSourceRanges: [10.0.0.0/8, 'fd00::/8']\n    ipFamilyPolicy: PreferDualStack\n    ipFamilies: [IPv6, IPv4]\n    sessionAffinity: ClientIP";

    #[test]
    fn service_settings_are_carried() {
        let vc = cluster(&format!("{BASIC}\n{SETTINGS}"));
        let active = desired(&vc).remove(0).1;
        let spec = active.spec.unwrap();
        let strings = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(
            spec.load_balancer_class.as_deref(),
            Some("example.com/internal")
        );
        assert_eq!(
            spec.load_balancer_source_ranges,
            strings(&["10.0.0.0/8", "fd00::/8"])
        );
        assert_eq!(spec.ip_family_policy.as_deref(), Some("PreferDualStack"));
        assert_eq!(spec.ip_families, strings(&["IPv6", "IPv4"]));
        assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
        // Unset, they are left to the API server's defaults.
        let plain = desired(&cluster(BASIC)).remove(0).1.spec.unwrap();
        assert_eq!(
            (
                plain.external_traffic_policy,
                plain.session_affinity,
                plain.ip_families
            ),
            (None, None, None)
        );
    }

    #[test]
    fn settings_drift_against_what_the_api_server_defaults() {
        let set = |s: &mut Service, f: &dyn Fn(&mut K8sServiceSpec)| f(s.spec.as_mut().unwrap());
        // A plain Service as the API server stores it: its defaults are not drift.
        let plain = desired(&cluster(BASIC)).remove(0).1;
        let mut stored = plain.clone();
        set(&mut stored, &|s| {
            s.session_affinity = Some("None".into());
            s.internal_traffic_policy = Some("Cluster".into());
            s.ip_family_policy = Some("SingleStack".into());
            s.ip_families = Some(vec!["IPv4".into()]);
        });
        assert!(!drifted(&stored, &plain));
        // A setting removed from the spec is a change, as is one another writer altered.
        let mut affinity = stored.clone();
        set(&mut affinity, &|s| {
            s.session_affinity = Some("ClientIP".into())
        });
        assert!(drifted(&affinity, &plain), "sessionAffinity left behind");
        let asked = desired(&cluster(&format!("{BASIC}\n{SETTINGS}")))
            .remove(0)
            .1;
        assert!(!drifted(&asked, &asked));
        type Edit = Box<dyn Fn(&mut K8sServiceSpec)>;
        let edits: Vec<(&str, Edit)> = vec![
            (
                "externalTrafficPolicy",
                Box::new(|s| s.external_traffic_policy = Some("Cluster".into())),
            ),
            (
                "internalTrafficPolicy",
                Box::new(|s| s.internal_traffic_policy = None),
            ),
            (
                "loadBalancerClass",
                Box::new(|s| s.load_balancer_class = None),
            ),
            (
                "loadBalancerSourceRanges",
                Box::new(|s| s.load_balancer_source_ranges = Some(vec!["0.0.0.0/0".into()])),
            ),
            (
                "ipFamilyPolicy",
                Box::new(|s| s.ip_family_policy = Some("SingleStack".into())),
            ),
            (
                "ipFamilies",
                Box::new(|s| s.ip_families = Some(vec!["IPv6".into()])),
            ),
            (
                "sessionAffinity",
                Box::new(|s| s.session_affinity = Some("None".into())),
            ),
        ];
        for (field, edit) in edits {
            let mut changed = asked.clone();
            set(&mut changed, &*edit);
            assert!(drifted(&changed, &asked), "{field}");
        }
        // Asked for, they are not another writer's fields to remove.
        assert_eq!(foreign_fields(&asked, &asked), None);
        let mut opened = stored.clone();
        set(&mut opened, &|s| {
            s.load_balancer_source_ranges = Some(vec!["0.0.0.0/0".into()]);
            s.internal_traffic_policy = Some("Local".into());
        });
        let patch = foreign_fields(&opened, &plain).expect("foreign fields");
        assert_eq!(
            patch["spec"]["loadBalancerSourceRanges"],
            serde_json::Value::Null
        );
        assert!(patch["spec"].get("internalTrafficPolicy").is_some());
    }

    #[test]
    fn drift_is_detected_field_by_field() {
        let vc = cluster(BASIC);
        let want = desired(&vc).remove(0).1;
        let mut same = want.clone();
        // What the API server adds must not count as drift.
        same.spec.as_mut().unwrap().cluster_ip = Some("10.0.0.7".into());
        same.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("added-by-someone".into(), "x".into());
        assert!(!drifted(&same, &want));
        type Edit = Box<dyn Fn(&mut Service)>;
        let edits: Vec<(&str, Edit)> = vec![
            (
                "selector",
                Box::new(|s| {
                    s.spec
                        .as_mut()
                        .unwrap()
                        .selector
                        .as_mut()
                        .unwrap()
                        .insert("vault-active".into(), "false".into());
                }),
            ),
            (
                "publishNotReadyAddresses",
                Box::new(|s| s.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true)),
            ),
            (
                "ports",
                Box::new(|s| {
                    s.spec
                        .as_mut()
                        .unwrap()
                        .ports
                        .as_mut()
                        .unwrap()
                        .pop()
                        .map(|_| ())
                        .unwrap()
                }),
            ),
            (
                "type",
                Box::new(|s| s.spec.as_mut().unwrap().type_ = Some("NodePort".into())),
            ),
            (
                "managed-by label",
                Box::new(|s| {
                    s.metadata
                        .labels
                        .as_mut()
                        .unwrap()
                        .remove("app.kubernetes.io/managed-by");
                }),
            ),
            (
                "cluster label's value",
                Box::new(|s| {
                    s.metadata
                        .labels
                        .as_mut()
                        .unwrap()
                        .insert(CLUSTER_LABEL.into(), "other".into());
                }),
            ),
            (
                "owner reference",
                Box::new(|s| s.metadata.owner_references = None),
            ),
            (
                "selector without the ownership label",
                Box::new(|s| {
                    s.spec
                        .as_mut()
                        .unwrap()
                        .selector
                        .as_mut()
                        .unwrap()
                        .remove(OWNER_LABEL);
                }),
            ),
            (
                "port's target",
                Box::new(|s| {
                    s.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].target_port =
                        Some(IntOrString::Int(1))
                }),
            ),
        ];
        for (name, edit) in edits {
            let mut changed = want.clone();
            edit(&mut changed);
            assert!(drifted(&changed, &want), "{name}");
        }
    }

    /// What another writer adds that we never set: each is drift, and the repair patch
    /// removes exactly it; what the API server fills in is neither.
    #[test]
    fn foreign_fields_are_drift_and_removed() {
        let vc = cluster(&format!(
            "{BASIC}\nservices: {{active: {{enabled: true, annotations: {{ours: x}}}}}}"
        ));
        let want = desired(&vc).remove(0).1;
        let mut server = want.clone();
        let spec = server.spec.as_mut().unwrap();
        spec.cluster_ip = Some("10.0.0.7".into());
        spec.internal_traffic_policy = Some("Cluster".into());
        spec.session_affinity = Some("None".into());
        spec.external_ips = Some(vec![]);
        assert!(!drifted(&server, &want));
        assert_eq!(foreign_fields(&server, &want), None);
        type Edit = fn(&mut Service);
        // (what was added, the edit, the patch that removes it)
        let cases: [(&str, Edit, serde_json::Value); 6] = [
            (
                "externalIPs",
                |s| s.spec.as_mut().unwrap().external_ips = Some(vec!["192.0.2.1".into()]),
                serde_json::json!({"spec": {"externalIPs": null}}),
            ),
            (
                "externalName",
                |s| s.spec.as_mut().unwrap().external_name = Some("evil.example".into()),
                serde_json::json!({"spec": {"externalName": null}}),
            ),
            (
                "loadBalancerIP",
                |s| s.spec.as_mut().unwrap().load_balancer_ip = Some("192.0.2.2".into()),
                serde_json::json!({"spec": {"loadBalancerIP": null}}),
            ),
            (
                "loadBalancerSourceRanges",
                |s| {
                    s.spec.as_mut().unwrap().load_balancer_source_ranges =
                        Some(vec!["0.0.0.0/0".into()])
                },
                serde_json::json!({"spec": {"loadBalancerSourceRanges": null}}),
            ),
            (
                "internalTrafficPolicy Local",
                |s| s.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into()),
                serde_json::json!({"spec": {"internalTrafficPolicy": null}}),
            ),
            (
                "an extra annotation",
                |s| {
                    s.metadata
                        .annotations
                        .as_mut()
                        .unwrap()
                        .insert("service.kubernetes.io/topology-mode".into(), "Auto".into());
                },
                serde_json::json!({"metadata": {"annotations": {"service.kubernetes.io/topology-mode": null}}}),
            ),
        ];
        for (what, edit, patch) in cases {
            let mut changed = server.clone();
            edit(&mut changed);
            assert!(drifted(&changed, &want), "{what}");
            assert_eq!(foreign_fields(&changed, &want), Some(patch), "{what}");
        }
    }

    /// The write before the apply also restores what the policy checks on every write, so
    /// it is admitted even when another writer changed the type too.
    #[test]
    fn the_first_repair_leaves_an_object_the_policy_admits() {
        let vc = cluster(BASIC);
        let want = desired(&vc).remove(0).1;
        assert_eq!(repair_first(&want, &want), None, "nothing foreign");
        let mut changed = want.clone();
        changed.spec.as_mut().unwrap().type_ = Some("LoadBalancer".into());
        assert_eq!(
            repair_first(&changed, &want),
            None,
            "the apply repairs the type alone"
        );
        changed.spec.as_mut().unwrap().external_ips = Some(vec!["192.0.2.1".into()]);
        changed
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .remove(MANAGED_BY.0);
        assert_eq!(
            repair_first(&changed, &want),
            Some(serde_json::json!({
                "metadata": {"labels": {"app.kubernetes.io/managed-by": "vault-registrar"}},
                "spec": {"externalIPs": null, "type": "ClusterIP"},
            }))
        );
    }

    #[test]
    fn service_types_the_operator_was_not_allowed_are_a_spec_problem() {
        let only_cluster_ip = [ServiceType::ClusterIP];
        // (spec.services, allowed, problem)
        let cases: [(&str, &[ServiceType], Option<&str>); 4] = [
            ("{}", &only_cluster_ip, None),
            (
                "{active: {enabled: true, type: LoadBalancer}}",
                &only_cluster_ip,
                Some(
                    "spec.services.active.type: LoadBalancer is not allowed by the operator (allowed: ClusterIP; chart value allowedServiceTypes)",
                ),
            ),
            (
                "{perfStandby: {enabled: true, type: NodePort}}",
                &[ServiceType::ClusterIP, ServiceType::LoadBalancer],
                Some(
                    "spec.services.perfStandby.type: NodePort is not allowed by the operator (allowed: ClusterIP, LoadBalancer; chart value allowedServiceTypes)",
                ),
            ),
            (
                "{standby: {enabled: false, type: NodePort}}",
                &only_cluster_ip,
                None,
            ),
        ];
        for (services, allowed, want) in cases {
            let vc = cluster(&format!("{BASIC}\nservices: {services}"));
            assert_eq!(disallowed_type(&vc, allowed).as_deref(), want, "{services}");
        }
        let allowed = Allowed {
            types: vec![ServiceType::ClusterIP],
            annotations: vec!["example.com/team".into(), "prometheus.io/*".into()],
        };
        // (annotations of the active Service, problem)
        let cases = [
            ("{}", None),
            ("{example.com/team: a, prometheus.io/scrape: 'true'}", None),
            (
                "{external-dns.alpha.kubernetes.io/hostname: vault.example.com}",
                Some(
                    "spec.services.active.annotations: external-dns.alpha.kubernetes.io/hostname is not allowed by the operator (allowed: example.com/team, prometheus.io/*; chart value allowedServiceAnnotations)",
                ),
            ),
            (
                "{example.com/team-x: a}",
                Some(
                    "spec.services.active.annotations: example.com/team-x is not allowed by the operator (allowed: example.com/team, prometheus.io/*; chart value allowedServiceAnnotations)",
                ),
            ),
        ];
        for (annotations, want) in cases {
            let vc = cluster(&format!(
                "{BASIC}\nservices: {{active: {{enabled: true, annotations: {annotations}}}}}"
            ));
            assert_eq!(allowed.problem(&vc).as_deref(), want, "{annotations}");
        }
        let none = Allowed {
            annotations: vec![],
            ..allowed
        };
        let vc = cluster(&format!(
            "{BASIC}\nservices: {{standby: {{enabled: true, annotations: {{a: b}}}}}}"
        ));
        assert_eq!(
            none.problem(&vc).as_deref(),
            Some(
                "spec.services.standby.annotations: a is not allowed by the operator (allowed: none; chart value allowedServiceAnnotations)"
            )
        );
        assert_eq!(
            "NodePort".parse::<ServiceType>().ok(),
            Some(ServiceType::NodePort)
        );
        assert!("nodeport".parse::<ServiceType>().is_err());
    }

    #[test]
    fn owner_selector_waits_for_the_pods_only_on_upgrade() {
        let vc = cluster(BASIC);
        let want = desired(&vc).remove(0).1;
        let mut legacy = want.clone();
        let selector = |s: &Service| s.spec.as_ref().unwrap().selector.clone().unwrap();
        legacy
            .spec
            .as_mut()
            .unwrap()
            .selector
            .as_mut()
            .unwrap()
            .remove(OWNER_LABEL);
        // (existing Service, every pod owned, owner label in the selector afterwards)
        let cases = [
            (
                "legacy Service, pods not yet owned: wait",
                &legacy,
                false,
                false,
            ),
            ("legacy Service, pods owned: switch", &legacy, true, true),
            ("current Service: keep it", &want, false, true),
        ];
        for (name, existing, owned, expect) in cases {
            let mut got = want.clone();
            defer_owner_selector(&mut got, existing, owned);
            assert_eq!(selector(&got).contains_key(OWNER_LABEL), expect, "{name}");
            assert_eq!(
                drifted(existing, &got),
                existing != &got && expect,
                "{name}"
            );
        }
    }

    #[test]
    fn selectors_switch_only_after_the_pods_carried_the_label_a_while() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // (ms, every pod owned now, switch)
        let cases = [
            (0, false, false),
            (100, true, false),
            (2000, true, false),
            (2100, true, true),
            (2200, false, false),
            (2300, true, false),
            (4299, true, false),
            (4300, true, true),
        ];
        let mut since = None;
        for (ms, owned, want) in cases {
            assert_eq!(
                owned_long_enough(&mut since, owned, at(ms)),
                want,
                "{ms} ms"
            );
        }
    }

    #[test]
    fn ownership_and_clashes() {
        let vc = cluster(BASIC);
        let mut foreign = desired(&vc).remove(0).1;
        assert!(owned_by(&foreign, &vc));
        foreign.metadata.owner_references = None;
        assert!(!owned_by(&foreign, &vc));
        assert_eq!(name_clash(&vc), None);
        let clash = cluster(&format!(
            "{BASIC}\nservices: {{active: {{enabled: true, name: x}}, standby: {{enabled: true, name: x}}}}"
        ));
        assert_eq!(
            name_clash(&clash).as_deref(),
            Some("spec.services: two enabled Services are both named x")
        );
    }
}
