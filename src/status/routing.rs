//! Which status changes are written at once: anything that says where traffic goes. The
//! rest (probe errors, versions, Degraded, messages) waits, at most one write per interval.

use crate::crd::VaultClusterStatus;

/// Whether `new` differs from `old` only in what can wait: probe errors, versions, the
/// Degraded condition, messages. Such a change is written at most once per interval, so a
/// pod whose answer changes every probe cannot make every round write; anything that says
/// where traffic goes is written at once.
pub fn can_wait(old: Option<&VaultClusterStatus>, new: &VaultClusterStatus) -> bool {
    old.is_some_and(|old| old != new && Routing::of(old) == Routing::of(new))
}

/// What of a status says where traffic goes.
#[derive(PartialEq)]
struct Routing<'a> {
    generation: Option<i64>,
    active_pod: &'a Option<String>,
    /// pods, active, standby, perf standby, unsealed, sealed, uninitialized, unreachable
    counts: [i32; 8],
    /// (name, IP, role, sealed) of each pod
    members: Vec<(&'a str, &'a str, &'a str, bool)>,
    /// (type, status, reason) of each condition but Degraded
    conditions: Vec<(&'a str, &'a str, &'a str)>,
}

impl<'a> Routing<'a> {
    fn of(s: &'a VaultClusterStatus) -> Self {
        let counts = [
            s.pods,
            s.active,
            s.standby,
            s.perf_standby,
            s.unsealed,
            s.sealed,
            s.uninitialized,
            s.unreachable,
        ];
        let members = s
            .members
            .iter()
            .map(|m| (m.name.as_str(), m.ip.as_str(), m.role.as_str(), m.sealed));
        let conditions = s
            .conditions
            .iter()
            .filter(|c| c.type_ != "Degraded")
            .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()));
        Self {
            generation: s.observed_generation,
            active_pod: &s.active_pod,
            counts,
            members: members.collect(),
            conditions: conditions.collect(),
        }
    }
}
