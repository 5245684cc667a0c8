//! One row of `status.members` per pod: its role as last seen, and the error that began a
//! streak of failures.

use crate::crd::{MemberStatus, VaultClusterStatus};
use crate::decide::Member;
use crate::health::Health;
use crate::tracker::Verdict;

pub(super) fn last_health(verdict: &Verdict) -> Option<&Health> {
    match verdict {
        Verdict::Healthy(h) | Verdict::Failing { last: Some(h), .. } => Some(h),
        _ => None,
    }
}

/// A pod failing the same way round after round keeps the error that began the streak, so
/// that an error text that varies (a timeout, then "no route to host") does not rewrite the
/// status every round.
pub(super) fn keep_first_errors(
    members: &mut [MemberStatus],
    previous: Option<&VaultClusterStatus>,
) {
    let Some(previous) = previous else { return };
    for m in members
        .iter_mut()
        .filter(|m| !m.last_probe_error.is_empty())
    {
        let before = previous.members.iter().find(|p| p.name == m.name);
        if let Some(p) = before.filter(|p| p.role == m.role && !p.last_probe_error.is_empty()) {
            m.last_probe_error.clone_from(&p.last_probe_error);
        }
    }
}

pub(super) fn member_status(m: &Member) -> MemberStatus {
    let (role, error) = match &m.verdict {
        Verdict::Healthy(h) => (h.role.as_str(), String::new()),
        Verdict::Failing {
            last: Some(h),
            error,
        } => (h.role.as_str(), error.clone()),
        Verdict::Failing { last: None, error } => ("pending", error.clone()),
        Verdict::Down { reason, .. } => ("unreachable", reason.clone()),
    };
    let health = last_health(&m.verdict);
    MemberStatus {
        name: m.name.clone(),
        ip: m.ip.clone(),
        role: role.into(),
        sealed: health.is_some_and(|h| h.sealed),
        version: health.map(|h| h.version.clone()).unwrap_or_default(),
        last_probe_error: error,
    }
}
