//! The events a change of status calls for, derived from the stored status so that a
//! restarted operator does not repeat them.

use std::collections::BTreeMap;

use super::conditions::contest;
use crate::crd::VaultClusterStatus;

/// An event to publish on the VaultCluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
    /// The pod the event is about, if one: events are grouped by it, so that each new
    /// active pod gets its own event rather than a repeat count on the first.
    pub pod: Option<String>,
}

/// The events that the change from `old` to `new` calls for. Derived from the stored
/// status, so a restarted operator does not repeat them.
pub fn notices(old: Option<&VaultClusterStatus>, new: &VaultClusterStatus) -> Vec<Notice> {
    let empty = VaultClusterStatus::default();
    let old = old.unwrap_or(&empty);
    let mut out = Vec::new();
    if old.active_pod != new.active_pod {
        let name = |p: &Option<String>| p.clone().unwrap_or_else(|| "none".into());
        out.push(Notice {
            warning: new.active_pod.is_none(),
            reason: "ActiveChanged",
            message: format!(
                "active pod changed from {} to {}",
                name(&old.active_pod),
                name(&new.active_pod)
            ),
            pod: new.active_pod.clone().or_else(|| old.active_pod.clone()),
        });
    }
    for (kind, reason) in [
        ("Available", "MultipleActive"),
        ("Ready", "ServiceConflict"),
        ("Ready", "InvalidSpec"),
        ("Ready", "WriteFailed"),
        ("Degraded", "ProbesFailing"),
        ("SelectorOverlap", "SelectorOverlap"),
    ] {
        if let Some(message) = newly(old, new, kind, reason) {
            out.push(Notice {
                warning: true,
                reason,
                message,
                pod: None,
            });
        }
    }
    // From the status, not the condition: ProbesFailing may hide a contest in Degraded.
    if let Some(message) = contest(new).filter(|m| contest(old).as_ref() != Some(m)) {
        out.push(Notice {
            warning: true,
            reason: "MultipleActive",
            message,
            pod: None,
        });
    }
    if reason_of(old, "Degraded") == Some("ProbesFailing")
        && reason_of(new, "Degraded") != Some("ProbesFailing")
    {
        out.push(Notice {
            warning: false,
            reason: "ProbesAnswered",
            message: "a selected pod answers its health probe again; labels follow Vault".into(),
            pod: None,
        });
    }
    let old_roles: BTreeMap<&str, &str> = old
        .members
        .iter()
        .map(|m| (m.name.as_str(), m.role.as_str()))
        .collect();
    for m in new.members.iter().filter(|m| m.role == "unreachable") {
        if old_roles.get(m.name.as_str()) != Some(&"unreachable") {
            out.push(Notice {
                warning: true,
                reason: "PodUnreachable",
                message: format!("{} is unreachable: {}", m.name, m.last_probe_error),
                pod: Some(m.name.clone()),
            });
        }
    }
    out
}

fn reason_of<'a>(s: &'a VaultClusterStatus, kind: &str) -> Option<&'a str> {
    s.conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.reason.as_str())
}

/// The message of a condition that now has `reason` and did not have it with that message.
fn newly(
    old: &VaultClusterStatus,
    new: &VaultClusterStatus,
    kind: &str,
    reason: &str,
) -> Option<String> {
    let find = |s: &VaultClusterStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == kind && c.reason == reason)
            .map(|c| c.message.clone())
    };
    let now = find(new)?;
    (find(old).as_ref() != Some(&now)).then_some(now)
}
