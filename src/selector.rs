//! Which pods a VaultCluster selects, and which VaultCluster wins a pod that several select.

use std::collections::BTreeMap;

use kube::ResourceExt;

use crate::crd::{PodSelector, VaultCluster};

/// Whether labels satisfy the selector: every matchLabels entry and every expression.
pub fn matches(selector: &PodSelector, labels: &BTreeMap<String, String>) -> bool {
    selector
        .match_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
        && selector.match_expressions.iter().all(|e| {
            let value = labels.get(&e.key);
            let listed = |v: &String| e.values.iter().flatten().any(|x| x == v);
            match e.operator.as_str() {
                "In" => value.is_some_and(listed),
                "NotIn" => !value.is_some_and(listed),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// Orders VaultClusters by age, oldest first; the name breaks ties so the order is total.
fn seniority(vc: &VaultCluster) -> (Option<k8s_openapi::jiff::Timestamp>, String) {
    (
        vc.metadata.creation_timestamp.as_ref().map(|t| t.0),
        vc.name_any(),
    )
}

/// The oldest other VaultCluster in the same namespace that also selects these labels and is
/// older than `vc`: it keeps the pod.
pub fn claimed_by_older<'a, C: std::borrow::Borrow<VaultCluster>>(
    vc: &VaultCluster,
    others: &'a [C],
    labels: &BTreeMap<String, String>,
) -> Option<&'a VaultCluster> {
    others
        .iter()
        .map(|o| o.borrow())
        .filter(|o| o.namespace() == vc.namespace() && o.name_any() != vc.name_any())
        .filter(|o| o.metadata.deletion_timestamp.is_none())
        .filter(|o| seniority(o) < seniority(vc) && matches(&o.spec.selector, labels))
        .min_by_key(|o| seniority(o))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::VaultClusterSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, Time};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn selector_table() {
        let base = labels(&[("app", "vault")]);
        let pod = labels(&[("app", "vault"), ("tier", "a")]);
        let other = labels(&[("app", "other")]);
        let cases = vec![
            ("matchLabels", vec![], &pod, true),
            ("missing label", vec![], &other, false),
            ("In", vec![req("tier", "In", &["a", "b"])], &pod, true),
            ("In, absent", vec![req("zone", "In", &["a"])], &pod, false),
            ("NotIn", vec![req("tier", "NotIn", &["a"])], &pod, false),
            (
                "NotIn, absent",
                vec![req("zone", "NotIn", &["a"])],
                &pod,
                true,
            ),
            ("Exists", vec![req("tier", "Exists", &[])], &pod, true),
            (
                "DoesNotExist",
                vec![req("tier", "DoesNotExist", &[])],
                &pod,
                false,
            ),
            (
                "unknown operator",
                vec![req("tier", "Gt", &["1"])],
                &pod,
                false,
            ),
        ];
        for (name, expressions, pod_labels, expected) in cases {
            let selector = PodSelector {
                match_labels: base.clone(),
                match_expressions: expressions,
            };
            assert_eq!(matches(&selector, pod_labels), expected, "{name}");
        }
    }

    fn cluster(name: &str, created: i64, app: &str) -> VaultCluster {
        let spec: VaultClusterSpec =
            serde_yaml::from_str(&format!("selector: {{matchLabels: {{app: {app}}}}}")).unwrap();
        let mut vc = VaultCluster::new(name, spec);
        vc.metadata.namespace = Some("ns".into());
        vc.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
        ));
        vc
    }

    #[test]
    fn older_cluster_keeps_the_pod() {
        let old = cluster("old", 10, "vault");
        let new = cluster("new", 20, "vault");
        let other = cluster("other", 5, "consul");
        let all = vec![old.clone(), new.clone(), other];
        let pod = labels(&[("app", "vault")]);
        assert_eq!(
            claimed_by_older(&new, &all, &pod).map(|v| v.name_any()),
            Some("old".into())
        );
        assert!(claimed_by_older(&old, &all, &pod).is_none());
        let twin = cluster("a-twin", 10, "vault");
        assert!(
            claimed_by_older(&old, std::slice::from_ref(&twin), &pod).is_some(),
            "same age: name decides"
        );
        assert!(claimed_by_older(&twin, &[old], &pod).is_none());
    }
}
