//! Which pods a VaultCluster selects, and which VaultCluster wins a pod that several select.
//! Matching is kube's `Selector`; this module reads the spec into one and names the field
//! of a requirement it cannot read.

use std::collections::BTreeMap;

use kube::ResourceExt;
use kube::core::{Expression, Selector, SelectorExt};

use crate::crd::{PodSelector, VaultCluster};

const OPERATORS: [&str; 4] = ["In", "NotIn", "Exists", "DoesNotExist"];

/// The spec's selector as kube's `Selector`, or the problem with it, naming the field.
pub fn parse(selector: &PodSelector) -> Result<Selector, String> {
    let mut parsed: Selector = selector
        .match_labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (i, requirement) in selector.match_expressions.iter().enumerate() {
        let operator = &requirement.operator;
        let values = requirement.values.as_deref().unwrap_or_default();
        // As the API server's own selectors: kube accepts In and NotIn with an empty list
        // (found by fuzzing), and Exists with values it ignores.
        match operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(format!(
                    "spec.selector.matchExpressions[{i}].values: {operator} needs values"
                ));
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(format!(
                    "spec.selector.matchExpressions[{i}].values: {operator} takes no values"
                ));
            }
            _ => {}
        }
        let expression = Expression::try_from(requirement.clone()).map_err(|e| {
            if OPERATORS.contains(&operator.as_str()) {
                format!("spec.selector.matchExpressions[{i}]: {e}")
            } else {
                format!(
                    "spec.selector.matchExpressions[{i}].operator: {operator:?} is not one of {}",
                    OPERATORS.join(", ")
                )
            }
        })?;
        parsed.extend(expression);
    }
    Ok(parsed)
}

/// Whether labels satisfy the selector. A selector that cannot be read selects nothing;
/// the round reports it as a spec problem.
pub fn matches(selector: &PodSelector, labels: &BTreeMap<String, String>) -> bool {
    parse(selector).is_ok_and(|s| s.matches(labels))
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

    fn selector(expressions: Vec<LabelSelectorRequirement>) -> PodSelector {
        PodSelector {
            match_labels: labels(&[("app", "vault")]),
            match_expressions: expressions,
        }
    }

    #[test]
    fn selector_table() {
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
                "unknown operator selects nothing",
                vec![req("tier", "Gt", &["1"])],
                &pod,
                false,
            ),
        ];
        for (name, expressions, pod_labels, expected) in cases {
            assert_eq!(
                matches(&selector(expressions), pod_labels),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn unreadable_requirements_name_their_field() {
        let cases = [
            (
                vec![req("tier", "Exists", &[]), req("tier", "Gt", &["1"])],
                "spec.selector.matchExpressions[1].operator: \"Gt\" is not one of In, NotIn, Exists, DoesNotExist",
            ),
            (
                vec![req("tier", "in", &["a"])],
                "spec.selector.matchExpressions[0].operator: \"in\" is not one of",
            ),
            (
                vec![req("tier", "NotIn", &[])],
                "spec.selector.matchExpressions[0].values: NotIn needs values",
            ),
            (
                vec![LabelSelectorRequirement {
                    values: Some(vec![]),
                    ..req("tier", "In", &[])
                }],
                "spec.selector.matchExpressions[0].values: In needs values",
            ),
            (
                vec![req("tier", "Exists", &["a"])],
                "spec.selector.matchExpressions[0].values: Exists takes no values",
            ),
        ];
        for (expressions, want) in cases {
            let got = parse(&selector(expressions)).unwrap_err();
            assert!(got.starts_with(want), "{got}");
        }
        assert!(parse(&selector(vec![req("tier", "In", &["a"])])).is_ok());
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
