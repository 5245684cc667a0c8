//! Selector matching against Kubernetes' rules written out by hand: whatever selector the
//! spec holds, a pod is selected exactly when the API server would select it, and a
//! selector that cannot be read names the field and selects nothing.
#![no_main]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vault_registrar::crd::PodSelector;
use vault_registrar::selector::{matches, parse};

/// Few distinct keys and values, so that selectors and pods meet often.
#[derive(Arbitrary, Debug)]
struct Input {
    match_labels: Vec<(u8, u8)>,
    expressions: Vec<(u8, u8, Vec<u8>)>,
    pod: Vec<(u8, u8)>,
}

const OPERATORS: [&str; 6] = ["In", "NotIn", "Exists", "DoesNotExist", "in", "Gt"];

fn key(k: u8) -> String {
    format!("k{}", k % 4)
}
fn value(v: u8) -> String {
    format!("v{}", v % 4)
}

/// Kubernetes' meaning of one requirement (labels.Requirement.Matches).
fn holds(op: &str, values: &[String], got: Option<&String>) -> bool {
    match op {
        "In" => got.is_some_and(|v| values.contains(v)),
        "NotIn" => got.is_none_or(|v| !values.contains(v)),
        "Exists" => got.is_some(),
        "DoesNotExist" => got.is_none(),
        _ => unreachable!(),
    }
}

fuzz_target!(|input: Input| {
    let selector = PodSelector {
        match_labels: input.match_labels.iter().map(|(k, v)| (key(*k), value(*v))).collect(),
        match_expressions: input
            .expressions
            .iter()
            .map(|(k, op, values)| LabelSelectorRequirement {
                key: key(*k),
                operator: OPERATORS[*op as usize % OPERATORS.len()].to_string(),
                values: Some(values.iter().map(|v| value(*v)).collect()),
            })
            .collect(),
    };
    let pod: BTreeMap<String, String> =
        input.pod.iter().map(|(k, v)| (key(*k), value(*v))).collect();
    let readable = selector.match_expressions.iter().all(|r| {
        let values = r.values.as_deref().unwrap_or_default();
        match r.operator.as_str() {
            "In" | "NotIn" => !values.is_empty(),
            "Exists" | "DoesNotExist" => values.is_empty(),
            _ => false,
        }
    });
    match parse(&selector) {
        Ok(_) => assert!(readable, "{selector:?} should be refused"),
        Err(e) => {
            assert!(!readable, "{selector:?}: {e}");
            assert!(e.starts_with("spec.selector.matchExpressions["), "{e}");
        }
    }
    let expected = readable
        && selector.match_labels.iter().all(|(k, v)| pod.get(k) == Some(v))
        && selector.match_expressions.iter().all(|r| {
            holds(&r.operator, r.values.as_deref().unwrap_or_default(), pod.get(&r.key))
        });
    assert_eq!(matches(&selector, &pod), expected, "{selector:?} on {pod:?}");
});
