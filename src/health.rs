//! Classifying one answer of Vault's `/v1/sys/health`. Pure: the prober hands in the status
//! code and body bytes, this decides what the pod is. The body decides the role, and the
//! status code must agree with it, so that nothing but a coherent Vault answer can make a
//! pod active.

use serde::Deserialize;

use crate::text::{EXCERPT, excerpt, label_version};

/// A pod's HA role as its health endpoint reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Active,
    Standby,
    PerfStandby,
    Sealed,
    Uninitialized,
    /// Removed from the raft cluster (Vault 1.19+): it can no longer serve.
    Removed,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Standby => "standby",
            Self::PerfStandby => "perf-standby",
            Self::Sealed => "sealed",
            Self::Uninitialized => "uninitialized",
            Self::Removed => "removed",
        }
    }
}

/// What one successful probe says about a pod. Its version is already a label value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub role: Role,
    pub initialized: bool,
    pub sealed: bool,
    /// As reported; empty when the listener redacts it.
    pub version: String,
}

/// Why an answer is not a usable health report.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HealthError {
    #[error("status {status}: body is not Vault health JSON: {reason}")]
    Body { status: u16, reason: String },
    #[error("status {status} contradicts the body, which says {role}")]
    Inconsistent { status: u16, role: &'static str },
}

/// The fields the decision needs; unknown fields are ignored because new Vault versions add
/// them.
#[derive(Deserialize)]
struct Body {
    initialized: bool,
    sealed: bool,
    standby: bool,
    #[serde(default)]
    performance_standby: bool,
    #[serde(default)]
    removed_from_cluster: bool,
    #[serde(default)]
    replication_dr_mode: String,
    #[serde(default)]
    version: String,
}

/// Classifies an answer. Only Vault's default status codes are accepted, since the prober
/// sends no override parameters.
pub fn classify(status: u16, body: &[u8]) -> Result<Health, HealthError> {
    // serde reads a struct from a JSON array too: `[true,false,false]` would make a pod
    // active (found by fuzzing). Vault answers an object.
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err(HealthError::Body {
            status,
            reason: "not a JSON object".into(),
        });
    }
    // serde's error quotes the offending value, which the pod chose: only an excerpt stays.
    let parsed: Body = serde_json::from_slice(body).map_err(|e| HealthError::Body {
        status,
        reason: excerpt(&e.to_string(), EXCERPT),
    })?;
    let role = role_of(&parsed);
    if !status_matches(role, is_dr_secondary(&parsed), status) {
        return Err(HealthError::Inconsistent {
            status,
            role: role.as_str(),
        });
    }
    Ok(Health {
        role,
        initialized: parsed.initialized,
        sealed: parsed.sealed,
        version: label_version(&parsed.version),
    })
}

/// Same precedence as Vault's own status code: uninitialised, removed, sealed, standby kinds.
fn role_of(body: &Body) -> Role {
    if !body.initialized {
        Role::Uninitialized
    } else if body.removed_from_cluster {
        Role::Removed
    } else if body.sealed {
        Role::Sealed
    } else if is_dr_secondary(body) {
        // A DR secondary answers 472 on every node. Vault's own service registration still
        // labels the secondary cluster's HA leader active, so the body's `standby` decides,
        // as it does for Vault.
        if body.standby {
            Role::Standby
        } else {
            Role::Active
        }
    } else if body.performance_standby {
        Role::PerfStandby
    } else if body.standby {
        Role::Standby
    } else {
        Role::Active
    }
}

fn is_dr_secondary(body: &Body) -> bool {
    body.replication_dr_mode == "secondary"
}

/// Whether the status code is the one Vault sends for that role. An unsealed DR secondary
/// answers 472 and nothing else, and 472 means a DR secondary: a body that disagrees is not
/// Vault's.
fn status_matches(role: Role, dr_secondary: bool, status: u16) -> bool {
    match role {
        Role::Uninitialized => status == 501,
        Role::Removed => status == 530,
        Role::Sealed => status == 503,
        Role::Active | Role::Standby if dr_secondary => status == 472,
        Role::PerfStandby => status == 473,
        // 474: a standby whose heartbeat to the active fails.
        Role::Standby => matches!(status, 429 | 474),
        Role::Active => status == 200,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    fn vault(initialized: bool, sealed: bool, standby: bool, perf: bool) -> serde_json::Value {
        json!({
            "initialized": initialized, "sealed": sealed, "standby": standby,
            "performance_standby": perf, "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled", "server_time_utc": 1732700000,
            "version": "1.17.2", "cluster_name": "vault-cluster-1", "cluster_id": "abc",
            "enterprise": false, "echo_duration_ms": 0, "clock_skew_ms": 0,
            "replication_primary_canary_age_ms": 0, "removed_from_cluster": false,
        })
    }

    #[test]
    fn every_vault_answer_is_classified() {
        let removed = {
            let mut v = vault(true, true, true, false);
            v["removed_from_cluster"] = json!(true);
            v
        };
        let dr_secondary = |standby: bool| {
            let mut v = vault(true, false, standby, false);
            v["replication_dr_mode"] = json!("secondary");
            v
        };
        let cases: Vec<(&str, u16, serde_json::Value, Role)> = vec![
            (
                "active",
                200,
                vault(true, false, false, false),
                Role::Active,
            ),
            (
                "standby",
                429,
                vault(true, false, true, false),
                Role::Standby,
            ),
            (
                "ha unhealthy standby",
                474,
                vault(true, false, true, false),
                Role::Standby,
            ),
            (
                "dr secondary's active",
                472,
                dr_secondary(false),
                Role::Active,
            ),
            (
                "dr secondary's standby",
                472,
                dr_secondary(true),
                Role::Standby,
            ),
            (
                "perf standby",
                473,
                vault(true, false, true, true),
                Role::PerfStandby,
            ),
            ("sealed", 503, vault(true, true, true, false), Role::Sealed),
            (
                "uninitialized",
                501,
                vault(false, true, true, false),
                Role::Uninitialized,
            ),
            ("removed", 530, removed, Role::Removed),
        ];
        for (name, status, answer, role) in cases {
            let health = classify(status, &body(answer)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(health.role, role, "{name}");
        }
    }

    #[test]
    fn openbao_body_without_enterprise_fields_is_understood() {
        let answer = json!({"initialized": true, "sealed": false, "standby": true,
            "replication_performance_mode": "disabled", "replication_dr_mode": "disabled",
            "server_time_utc": 1, "version": "2.1.0", "cluster_name": "bao", "cluster_id": "x"});
        assert_eq!(classify(429, &body(answer)).unwrap().role, Role::Standby);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut answer = vault(true, false, false, false);
        answer["some_field_from_vault_2_0"] = json!({"nested": [1, 2]});
        assert_eq!(classify(200, &body(answer)).unwrap().role, Role::Active);
    }

    #[test]
    fn garbage_never_classifies() {
        let cases: Vec<(&str, u16, Vec<u8>)> = vec![
            ("html", 200, b"<html>not vault</html>".to_vec()),
            ("empty", 200, Vec::new()),
            (
                "truncated",
                200,
                body(vault(true, false, false, false))[..40].to_vec(),
            ),
            ("json without fields", 200, b"{}".to_vec()),
            (
                "wrong types",
                200,
                br#"{"initialized":"yes","sealed":false,"standby":false}"#.to_vec(),
            ),
            ("array", 200, b"[true]".to_vec()),
            (
                "array of the fields, in order",
                200,
                b"[true, false, false, false, false, \"\", \"1.21.4\"]".to_vec(),
            ),
            (
                "array of flags, found by fuzzing",
                200,
                b"[true,true,true,true]".to_vec(),
            ),
            ("null", 200, b"null".to_vec()),
            ("huge garbage", 200, vec![b'x'; 1 << 20]),
        ];
        for (name, status, answer) in cases {
            assert!(
                matches!(classify(status, &answer), Err(HealthError::Body { .. })),
                "{name} must be a failed probe"
            );
        }
    }

    #[test]
    fn status_code_must_agree_with_body() {
        let cases = [
            (
                "active body, standby code",
                429,
                vault(true, false, false, false),
            ),
            ("active body, 500", 500, vault(true, false, false, false)),
            (
                "standby body, 200 (standbyok)",
                200,
                vault(true, false, true, false),
            ),
            ("sealed body, 200", 200, vault(true, true, true, false)),
            ("active body, 299", 299, vault(true, false, false, false)),
            ("standby body, 472", 472, vault(true, false, true, false)),
            ("active body, 472", 472, vault(true, false, false, false)),
            ("dr secondary's active body, 200", 200, {
                let mut v = vault(true, false, false, false);
                v["replication_dr_mode"] = json!("secondary");
                v
            }),
            ("dr secondary's standby body, 429", 429, {
                let mut v = vault(true, false, true, false);
                v["replication_dr_mode"] = json!("secondary");
                v
            }),
        ];
        for (name, status, answer) in cases {
            assert!(
                matches!(
                    classify(status, &body(answer)),
                    Err(HealthError::Inconsistent { .. })
                ),
                "{name}"
            );
        }
    }

    #[test]
    fn fields_are_carried() {
        let mut answer = vault(true, false, true, false);
        answer["version"] = json!("1.15.2+ent");
        let health = classify(429, &body(answer)).unwrap();
        assert_eq!(
            health,
            Health {
                role: Role::Standby,
                initialized: true,
                sealed: false,
                version: "1.15.2-ent".into()
            }
        );
    }

    #[test]
    fn version_becomes_a_bounded_label_value_like_vaults() {
        let huge = "v".repeat(60_000);
        for (raw, label) in [
            ("1.15.2+ent", "1.15.2-ent"),
            ("1.17.2", "1.17.2"),
            ("1.16.0-rc1", "1.16.0-rc1"),
            ("v1 beta/2", "v1-beta-2"),
            ("", ""),
            (huge.as_str(), &huge[..63]),
        ] {
            let mut answer = vault(true, false, false, false);
            answer["version"] = json!(raw);
            assert_eq!(classify(200, &body(answer)).unwrap().version, label);
        }
    }

    #[test]
    fn errors_quote_only_a_short_escaped_excerpt_of_the_answer() {
        let bad = format!(r#"{{"initialized": "\n\u001b[2J{}"}}"#, "A".repeat(60_000));
        let Err(HealthError::Body { reason, .. }) = classify(200, bad.as_bytes()) else {
            panic!("a string is not a boolean");
        };
        assert!(reason.len() <= crate::text::EXCERPT, "{reason}");
        assert!(
            !reason.contains('\u{1b}') && !reason.contains('\n'),
            "{reason}"
        );
    }
}
