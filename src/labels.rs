//! The pod labels: names, the values each verdict implies, and the smallest change that
//! takes a pod's current labels to the desired ones.

use std::collections::BTreeMap;

use crate::health::{Health, Role};

/// Label naming the VaultCluster that owns a pod's role labels. Every generated Service
/// selects on it, so a Service never reaches another cluster's pod even when two clusters'
/// matchLabels are the same; it also finds the pods whose labels to remove when a pod stops
/// matching or a VaultCluster goes.
pub const OWNER_LABEL: &str = "vault-registrar.dev/cluster";

/// Label naming the prefix of the role labels written on a pod, beside the ownership
/// label: when `spec.labelPrefix` changes, the labels of the prefix written before are
/// found and removed, and nothing routes on a stale `<old>-active=true`.
pub const PREFIX_LABEL: &str = "vault-registrar.dev/label-prefix";

/// What versions before the ownership label used instead: an annotation of the same name.
/// Removed with the first label write on a pod.
pub const LEGACY_OWNER_ANNOTATION: &str = "vault-registrar.dev/cluster";

/// The label names for one prefix ("vault" gives vault-active, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelNames {
    pub active: String,
    pub initialized: String,
    pub perf_standby: String,
    pub sealed: String,
    pub version: String,
}

impl LabelNames {
    pub fn new(prefix: &str) -> Self {
        Self {
            active: format!("{prefix}-active"),
            initialized: format!("{prefix}-initialized"),
            perf_standby: format!("{prefix}-perf-standby"),
            sealed: format!("{prefix}-sealed"),
            version: format!("{prefix}-version"),
        }
    }

    pub fn all(&self) -> [&str; 5] {
        [
            &self.active,
            &self.initialized,
            &self.perf_standby,
            &self.sealed,
            &self.version,
        ]
    }
}

/// The four boolean labels of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flags {
    pub active: bool,
    pub initialized: bool,
    pub perf_standby: bool,
    pub sealed: bool,
}

/// What Vault writes on start and what the seed calls the after-shutdown labels: a pod that
/// cannot serve leaves every Service that selects on them.
pub const AFTER_SHUTDOWN: Flags = Flags {
    active: false,
    initialized: false,
    perf_standby: false,
    sealed: true,
};

/// The flags a health report implies, before the cluster-wide rule on a single active pod.
pub fn flags_for(health: &Health) -> Flags {
    match health.role {
        Role::Active => Flags {
            active: true,
            initialized: true,
            perf_standby: false,
            sealed: false,
        },
        Role::Standby => Flags {
            active: false,
            initialized: true,
            perf_standby: false,
            sealed: false,
        },
        Role::PerfStandby => Flags {
            active: false,
            initialized: true,
            perf_standby: true,
            sealed: false,
        },
        Role::Sealed => Flags {
            active: false,
            initialized: true,
            perf_standby: false,
            sealed: true,
        },
        Role::Uninitialized => Flags {
            active: false,
            initialized: false,
            perf_standby: false,
            sealed: true,
        },
        // A removed node must not stay in the standby pool, whatever it says of its seal.
        Role::Removed => AFTER_SHUTDOWN,
    }
}

/// The labels to hold: the flags, and the version when one is known and valid as a label
/// value (`health::classify` makes it one). An empty (redacted) version keeps whatever
/// label the pod had.
pub fn desired(
    names: &LabelNames,
    flags: Flags,
    version: &str,
) -> BTreeMap<String, Option<String>> {
    let text = |b: bool| Some(if b { "true" } else { "false" }.to_string());
    let mut labels = BTreeMap::from([
        (names.active.clone(), text(flags.active)),
        (names.initialized.clone(), text(flags.initialized)),
        (names.perf_standby.clone(), text(flags.perf_standby)),
        (names.sealed.clone(), text(flags.sealed)),
    ]);
    if is_label_value(version) && !version.is_empty() {
        labels.insert(names.version.clone(), Some(version.to_string()));
    }
    labels
}

/// Labels to remove: every label of the prefix, and the ownership label.
pub fn removal(names: &LabelNames) -> BTreeMap<String, Option<String>> {
    names
        .all()
        .iter()
        .chain(&[OWNER_LABEL, PREFIX_LABEL])
        .map(|n| (n.to_string(), None))
        .collect()
}

/// The prefix a pod's role labels were written with, when the pod says and it is one a
/// VaultCluster could have named (the schema's pattern): anything else names no labels.
pub fn written_prefix(current: &BTreeMap<String, String>) -> Option<&str> {
    let prefix = current.get(PREFIX_LABEL)?.as_str();
    let valid = !prefix.is_empty()
        && prefix.len() <= 40
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !prefix.starts_with('-')
        && !prefix.ends_with('-');
    valid.then_some(prefix)
}

/// Everything to remove from a pod when it leaves a cluster: the labels of the current
/// prefix and of the prefix the pod says its labels were written with.
pub fn full_removal(
    names: &LabelNames,
    current: &BTreeMap<String, String>,
) -> BTreeMap<String, Option<String>> {
    let mut all = removal(names);
    if let Some(old) = written_prefix(current) {
        all.extend(removal(&LabelNames::new(old)));
    }
    all
}

/// The change that records `prefix` on a pod and removes the labels of the prefix written
/// before, if another; empty when the pod already says `prefix`.
pub fn retire_prefix(
    prefix: &str,
    current: &BTreeMap<String, String>,
) -> BTreeMap<String, Option<String>> {
    if current.get(PREFIX_LABEL).map(String::as_str) == Some(prefix) {
        return BTreeMap::new();
    }
    let mut change = BTreeMap::from([(PREFIX_LABEL.to_string(), Some(prefix.to_string()))]);
    if let Some(old) = written_prefix(current).filter(|old| *old != prefix) {
        for name in LabelNames::new(old).all() {
            change.insert(name.to_string(), None);
        }
    }
    diff(current, &change)
}

/// The entries of `want` that differ from `current`: a value to set, or None to remove a
/// label that is present. Labels not named in `want` are never touched.
pub fn diff(
    current: &BTreeMap<String, String>,
    want: &BTreeMap<String, Option<String>>,
) -> BTreeMap<String, Option<String>> {
    want.iter()
        .filter(|(k, v)| current.get(*k) != v.as_ref())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Reads a boolean label as written by Vault or by us.
pub fn flag(current: &BTreeMap<String, String>, name: &str) -> Option<bool> {
    match current.get(name).map(String::as_str) {
        Some("true") => Some(true),
        Some("false") => Some(false),
        _ => None,
    }
}

/// Kubernetes label value rules: at most 63 characters, alphanumeric at both ends.
fn is_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && v.chars().next().is_none_or(|c| c.is_ascii_alphanumeric())
        && v.chars().last().is_none_or(|c| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(role: Role, version: &str) -> Health {
        Health {
            role,
            initialized: role != Role::Uninitialized,
            sealed: false,
            version: version.into(),
        }
    }

    fn strs(pairs: &[(&str, &str)]) -> BTreeMap<String, Option<String>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Some(v.to_string())))
            .collect()
    }

    #[test]
    fn flags_per_role_match_vault() {
        let names = LabelNames::new("vault");
        let cases = [
            (
                Role::Active,
                [
                    ("vault-active", "true"),
                    ("vault-initialized", "true"),
                    ("vault-perf-standby", "false"),
                    ("vault-sealed", "false"),
                ],
            ),
            (
                Role::Standby,
                [
                    ("vault-active", "false"),
                    ("vault-initialized", "true"),
                    ("vault-perf-standby", "false"),
                    ("vault-sealed", "false"),
                ],
            ),
            (
                Role::PerfStandby,
                [
                    ("vault-active", "false"),
                    ("vault-initialized", "true"),
                    ("vault-perf-standby", "true"),
                    ("vault-sealed", "false"),
                ],
            ),
            (
                Role::Sealed,
                [
                    ("vault-active", "false"),
                    ("vault-initialized", "true"),
                    ("vault-perf-standby", "false"),
                    ("vault-sealed", "true"),
                ],
            ),
            (
                Role::Uninitialized,
                [
                    ("vault-active", "false"),
                    ("vault-initialized", "false"),
                    ("vault-perf-standby", "false"),
                    ("vault-sealed", "true"),
                ],
            ),
            (
                Role::Removed,
                [
                    ("vault-active", "false"),
                    ("vault-initialized", "false"),
                    ("vault-perf-standby", "false"),
                    ("vault-sealed", "true"),
                ],
            ),
        ];
        for (role, expected) in cases {
            let mut want = strs(&expected);
            want.insert("vault-version".into(), Some("1.15.2-ent".into()));
            assert_eq!(
                desired(&names, flags_for(&health(role, "1.15.2-ent")), "1.15.2-ent"),
                want,
                "{role:?}"
            );
        }
    }

    #[test]
    fn prefix_names_every_label() {
        let names = LabelNames::new("openbao");
        assert_eq!(
            names.all(),
            [
                "openbao-active",
                "openbao-initialized",
                "openbao-perf-standby",
                "openbao-sealed",
                "openbao-version"
            ]
        );
    }

    #[test]
    fn redacted_or_invalid_version_keeps_previous_label() {
        let names = LabelNames::new("vault");
        for version in ["", "-leading", &"9".repeat(64)] {
            let want = desired(&names, AFTER_SHUTDOWN, version);
            assert!(!want.contains_key("vault-version"), "{version:?}");
            let current = BTreeMap::from([("vault-version".to_string(), "1.14.0".to_string())]);
            assert!(!diff(&current, &want).contains_key("vault-version"));
        }
    }

    #[test]
    fn diff_writes_only_what_changed_and_nothing_else() {
        let current: BTreeMap<String, String> = [
            ("app", "vault"),
            ("vault-active", "true"),
            ("vault-sealed", "false"),
            ("vault-version", "1.17.2"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut want = desired(
            &LabelNames::new("vault"),
            Flags {
                active: false,
                initialized: true,
                perf_standby: false,
                sealed: false,
            },
            "1.17.2",
        );
        let change = diff(&current, &want);
        assert_eq!(
            change,
            strs(&[
                ("vault-active", "false"),
                ("vault-initialized", "true"),
                ("vault-perf-standby", "false")
            ])
        );
        want.extend(change.clone());
        let settled: BTreeMap<String, String> = current
            .into_iter()
            .chain(change.into_iter().map(|(k, v)| (k, v.unwrap())))
            .collect();
        assert!(
            diff(&settled, &want).is_empty(),
            "second pass writes nothing"
        );
    }

    #[test]
    fn removal_only_removes_present_labels() {
        let names = LabelNames::new("vault");
        let current: BTreeMap<String, String> = [("app", "vault"), ("vault-active", "false")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let change = diff(&current, &removal(&names));
        assert_eq!(change, BTreeMap::from([("vault-active".to_string(), None)]));
    }

    #[test]
    fn a_changed_prefix_retires_the_labels_written_before() {
        let pod = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let gone =
            |names: &[&str]| -> Vec<String> { names.iter().map(|n| n.to_string()).collect() };
        // (labels, new prefix, set, removed)
        let cases = [
            (pod(&[]), "vault", Some("vault"), gone(&[])),
            (pod(&[(PREFIX_LABEL, "vault")]), "vault", None, gone(&[])),
            (
                pod(&[
                    (PREFIX_LABEL, "vault"),
                    ("vault-active", "true"),
                    ("vault-sealed", "false"),
                ]),
                "openbao",
                Some("openbao"),
                gone(&["vault-active", "vault-sealed"]),
            ),
            // A value no VaultCluster could have named removes nothing.
            (
                pod(&[(PREFIX_LABEL, "-x"), ("-x-active", "true")]),
                "vault",
                Some("vault"),
                gone(&[]),
            ),
        ];
        for (labels, prefix, set, removed) in cases {
            let change = retire_prefix(prefix, &labels);
            assert_eq!(
                change.get(PREFIX_LABEL).cloned().flatten().as_deref(),
                set,
                "{labels:?}"
            );
            let got: Vec<String> = change
                .iter()
                .filter(|(_, v)| v.is_none())
                .map(|(k, _)| k.clone())
                .collect();
            assert_eq!(got, removed, "{labels:?}");
        }
        let leaving = pod(&[
            (PREFIX_LABEL, "vault"),
            ("vault-active", "true"),
            (OWNER_LABEL, "x"),
        ]);
        let all = full_removal(&LabelNames::new("openbao"), &leaving);
        for key in ["vault-active", "openbao-active", OWNER_LABEL, PREFIX_LABEL] {
            assert_eq!(all.get(key), Some(&None), "{key}");
        }
    }
}
