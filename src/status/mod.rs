//! The VaultCluster status and the events that its changes imply, built from what a round
//! observed and what its writes did (never from what it meant to write). Pure: the status
//! holds no probe timestamps, so an unchanged cluster yields an identical status and no
//! write. `members` makes the per-pod rows, `conditions` the conditions, `events` the events
//! a change calls for, `routing` which changes are written at once, `written` which of the
//! cache's status and this term's last write a round starts from.

mod conditions;
mod events;
mod members;
mod routing;
pub mod written;

pub use events::{Notice, notices};
pub use routing::can_wait;

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{MemberStatus, VaultClusterStatus};
use crate::decide::{Decision, Member, Written};
use crate::text::{self, shorten};

use conditions::conditions;
pub use members::MAX_MEMBERS;
use members::{capped, keep_first_errors, last_health, member_status};

/// The conditions every built status carries, in this order. A condition that stops
/// applying turns False rather than going, so `kubectl wait --for=condition=X=false` and
/// alerts on it see the change.
pub const CONDITIONS: [&str; 4] = ["Ready", "Available", "Degraded", "SelectorOverlap"];

/// Longest `status.version`: the distinct versions of the pods, joined.
const VERSIONS: usize = 256;

/// Everything the status is built from.
pub struct Observation<'a> {
    pub generation: Option<i64>,
    pub members: &'a [Member],
    /// Only for the claimants: what was meant is not what the labels say.
    pub decision: &'a Decision,
    /// What the round's writes did: the active pod named is the one labelled so.
    pub written: &'a Written,
    /// Why the spec cannot be acted on, if it cannot (what the schema could not reject).
    pub spec_problem: Option<String>,
    /// Services that could not be put in place, and why.
    pub service_problems: Vec<String>,
    /// Pods left alone because an older VaultCluster selects them: "pod (cluster)".
    pub overlaps: Vec<String>,
    /// Pods whose labels are held: no Vault answer, Kubernetes reports them Ready, and no
    /// other pod answers active (see `fail_static`).
    pub held: Vec<String>,
    /// The write that failed this round, if one did: the status must not claim Ready.
    pub write_problem: Option<String>,
    pub previous: Option<&'a VaultClusterStatus>,
    pub now: Time,
}

pub fn build(o: &Observation) -> VaultClusterStatus {
    let mut members: Vec<MemberStatus> = o.members.iter().map(member_status).collect();
    keep_first_errors(&mut members, o.previous);
    let count = |roles: &[&str]| {
        members
            .iter()
            .filter(|m| roles.contains(&m.role.as_str()))
            .count() as i32
    };
    let versions: BTreeSet<String> = o
        .members
        .iter()
        .filter_map(|m| last_health(&m.verdict).map(|h| h.version.clone()))
        .filter(|v| !v.is_empty())
        .collect();
    let mut status = VaultClusterStatus {
        observed_generation: o.generation,
        conditions: Vec::new(),
        active_pod: o.written.active.clone(),
        pods: members.len() as i32,
        active: o.decision.claimants.len() as i32,
        standby: count(&["standby"]),
        perf_standby: count(&["perf-standby"]),
        unsealed: count(&["active", "standby", "perf-standby"]),
        sealed: count(&["sealed"]),
        uninitialized: count(&["uninitialized"]),
        unreachable: count(&["unreachable"]),
        version: shorten(versions.into_iter().collect::<Vec<_>>().join(","), VERSIONS),
        members: Vec::new(),
        members_omitted: 0,
    };
    // The counts above cover every pod; the rows are capped.
    let (shown, omitted) = capped(members);
    status.members = shown;
    status.members_omitted = omitted as i32;
    status.conditions = conditions(o, &status);
    status
}

/// The status to publish when the spec cannot be acted on: the last observation stays as it
/// was (the labels are held, so it is still what the pods carry), and Ready says why.
pub fn invalid_spec(
    previous: Option<&VaultClusterStatus>,
    generation: Option<i64>,
    problem: String,
    now: Time,
) -> VaultClusterStatus {
    let mut status = previous.cloned().unwrap_or_default();
    status.observed_generation = generation;
    let old = status.conditions.iter().find(|c| c.type_ == "Ready");
    let last_transition_time = match old {
        Some(c) if c.status == "False" => c.last_transition_time.clone(),
        _ => now,
    };
    let ready = Condition {
        type_: "Ready".into(),
        status: "False".into(),
        reason: "InvalidSpec".into(),
        message: shorten(problem, text::CONDITION),
        observed_generation: generation,
        last_transition_time,
    };
    status.conditions.retain(|c| c.type_ != "Ready");
    status.conditions.insert(0, ready);
    status
}

/// A JSON merge patch that turns `old` into `new`: a field `new` leaves out is sent as null,
/// so that it is cleared rather than left as it was.
pub fn merge_patch(
    old: Option<&VaultClusterStatus>,
    new: &VaultClusterStatus,
) -> serde_json::Value {
    let mut patch = serde_json::to_value(new).expect("status serializes");
    let old = old.map(|o| serde_json::to_value(o).expect("status serializes"));
    if let (Some(serde_json::Value::Object(old)), serde_json::Value::Object(fields)) =
        (old, &mut patch)
    {
        for key in old.keys() {
            fields.entry(key.clone()).or_insert(serde_json::Value::Null);
        }
    }
    serde_json::json!({ "status": patch })
}

#[cfg(test)]
mod tests;
