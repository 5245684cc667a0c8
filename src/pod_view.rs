//! What the operator reads of a Pod, decoded straight from the API server's answers: the
//! metadata a round needs and three status fields. The spec, managed fields and condition
//! messages are skipped as the JSON is read instead of being built and dropped: decoded in
//! full, the pods of a large namespace were most of what the operator allocated at a start
//! (10,000 unrelated pods of 20 environment variables each at `bench-scale`), and what was
//! freed around the pods the caches kept stayed in the RSS.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Resource;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::labels::LEGACY_OWNER_ANNOTATION;

/// A Pod as the watch caches and label writes read it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodView {
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    pub status: Option<StatusView>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct StatusView {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    pub conditions: Option<Vec<ConditionView>>,
}

/// A pod condition without its message, reason and times.
#[derive(Clone, Debug, Deserialize)]
pub struct ConditionView {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

/// The metadata fields read of a pod; serde skips the rest (managed fields, above all).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "legacy_owner_only")]
    annotations: Option<BTreeMap<String, String>>,
    owner_references: Option<Vec<OwnerReference>>,
    deletion_timestamp: Option<Time>,
}

fn lean_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = LeanMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: m.labels,
        annotations: m.annotations,
        owner_references: m.owner_references,
        deletion_timestamp: m.deletion_timestamp,
        ..ObjectMeta::default()
    })
}

/// Of the annotations, only the legacy ownership one, the one the operator reads: the
/// others can be large (`kubectl.kubernetes.io/last-applied-configuration`).
fn legacy_owner_only<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Keep;
    impl<'de> Visitor<'de> for Keep {
        type Value = Option<BTreeMap<String, String>>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of annotations")
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut kept = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                if key == LEGACY_OWNER_ANNOTATION {
                    kept.insert(key, map.next_value::<String>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(Some(kept))
        }
    }
    d.deserialize_any(Keep)
}

impl Resource for PodView {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    fn full() -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "vault-0", "namespace": "ns", "uid": "u1", "resourceVersion": "42",
                "labels": {"app": "vault", "vault-active": "true"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"huge\": true}",
                    LEGACY_OWNER_ANNOTATION: "vault",
                    "other": "x"
                },
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "vault", "uid": "s1", "controller": true}],
                "deletionTimestamp": "2026-12-02T10:00:00Z",
                "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]
            },
            "spec": {"containers": [{"name": "vault", "image": "vault:1.21", "env": [{"name": "A", "value": "b"}]}]},
            "status": {
                "phase": "Running", "podIP": "10.1.2.3",
                "conditions": [{"type": "Ready", "status": "True", "message": "m", "lastTransitionTime": "2026-12-02T10:00:00Z"}],
                "containerStatuses": [{"name": "vault", "ready": true, "restartCount": 0, "image": "vault:1.21", "imageID": "", "state": {}}]
            }
        })
    }

    #[test]
    fn the_fields_a_round_reads_are_kept_and_the_rest_skipped() {
        let view: PodView = serde_json::from_value(full()).unwrap();
        let pod: Pod = serde_json::from_value(full()).unwrap();
        let (m, p) = (&view.metadata, &pod.metadata);
        assert_eq!(
            (&m.name, &m.namespace, &m.uid, &m.resource_version),
            (&p.name, &p.namespace, &p.uid, &p.resource_version)
        );
        assert_eq!(m.labels, p.labels);
        assert_eq!(m.owner_references, p.owner_references);
        assert_eq!(m.deletion_timestamp, p.deletion_timestamp);
        assert_eq!(m.managed_fields, None, "managed fields are skipped");
        assert_eq!(
            m.annotations,
            Some(BTreeMap::from([(
                LEGACY_OWNER_ANNOTATION.to_string(),
                "vault".to_string()
            )])),
            "only the annotation the operator reads"
        );
        let status = view.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.1.2.3"));
        let ready = &status.conditions.unwrap()[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str()),
            ("Ready", "True")
        );
    }

    #[test]
    fn a_pod_without_status_labels_or_annotations_decodes() {
        let view: PodView = serde_json::from_value(json!({
            "metadata": {"name": "p", "annotations": null, "labels": null}
        }))
        .unwrap();
        assert_eq!(view.metadata.name.as_deref(), Some("p"));
        assert!(view.status.is_none() && view.metadata.annotations.is_none());
        let bare: PodView = serde_json::from_value(json!({})).unwrap();
        assert!(bare.metadata.name.is_none());
    }

    #[test]
    fn the_api_path_is_the_pods() {
        assert_eq!(
            PodView::url_path(&(), Some("ns")),
            "/api/v1/namespaces/ns/pods"
        );
        assert_eq!(PodView::api_version(&()), "v1");
    }
}
