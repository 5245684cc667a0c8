//! One row of `status.members` per pod: its role as last seen, and the error that began a
//! streak of failures; at most `MAX_MEMBERS` rows, those that need a reader's eye first.

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
/// status every round. An error naming the spec setting to fix replaces one that does not:
/// a streak begun by "connection refused" while Vault started must not hide, for as long as
/// it lasts, that the listener wants `clientCertSecretRef`.
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
        let kept = |p: &&MemberStatus| {
            p.role == m.role
                && !p.last_probe_error.is_empty()
                && (names_a_setting(&p.last_probe_error) || !names_a_setting(&m.last_probe_error))
        };
        if let Some(p) = before.filter(kept) {
            m.last_probe_error.clone_from(&p.last_probe_error);
        }
    }
}

/// Whether a probe error says which spec setting to fix (see `probe::tls_hint`).
fn names_a_setting(error: &str) -> bool {
    error.contains("spec.")
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

/// Most rows `status.members` holds, however many pods the selector takes in: a status is
/// written on every change and read by every `kubectl get`, so it must stay small. The
/// counts (`pods`, `sealed`, ...) still cover every pod.
pub const MAX_MEMBERS: usize = 25;

/// Which rows a reader needs first: the active pod, then pods that cannot serve (no
/// answer, sealed, not initialised, removed, not yet probed), then pods whose probes are
/// failing, then the serving standbys.
fn rank(m: &MemberStatus) -> u8 {
    match m.role.as_str() {
        "active" => 0,
        "unreachable" => 1,
        "sealed" | "uninitialized" | "removed" | "pending" => 2,
        _ if m.sealed || !m.last_probe_error.is_empty() => 3,
        _ => 4,
    }
}

/// The rows to publish, in their original (pod name) order, and how many were left out:
/// the `MAX_MEMBERS` of lowest rank, ties broken by name so that the same pods give the
/// same rows every round.
pub(super) fn capped(members: Vec<MemberStatus>) -> (Vec<MemberStatus>, usize) {
    if members.len() <= MAX_MEMBERS {
        return (members, 0);
    }
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by(|&a, &b| {
        (rank(&members[a]), &members[a].name).cmp(&(rank(&members[b]), &members[b].name))
    });
    let mut keep = vec![false; members.len()];
    for &i in order.iter().take(MAX_MEMBERS) {
        keep[i] = true;
    }
    let omitted = members.len() - MAX_MEMBERS;
    let shown = members
        .into_iter()
        .zip(keep)
        .filter_map(|(m, kept)| kept.then_some(m))
        .collect();
    (shown, omitted)
}
