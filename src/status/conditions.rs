//! The conditions: Ready (can the operator do its work), Available (is a pod labelled
//! active), Degraded (what needs attention), SelectorOverlap. Each says why in its reason.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use super::{CONDITIONS, Observation};
use crate::crd::VaultClusterStatus;
use crate::text::{self, shorten};

pub(super) fn conditions(o: &Observation, s: &VaultClusterStatus) -> Vec<Condition> {
    let (available, available_reason, available_message) = availability(o);
    let ready = if let Some(problem) = &o.spec_problem {
        (false, "InvalidSpec", problem.clone())
    } else if let Some(problem) = &o.write_problem {
        (false, "WriteFailed", problem.clone())
    } else if !o.service_problems.is_empty() {
        (false, "ServiceConflict", o.service_problems.join("; "))
    } else if !available {
        (false, available_reason, available_message.clone())
    } else {
        (
            true,
            "Ready",
            format!("Services in place; {available_message}"),
        )
    };
    let degraded = if !o.held.is_empty() {
        Some(("ProbesFailing", held_message(&o.held, s)))
    } else if let Some(message) = contest(s) {
        Some(("MultipleActive", message))
    } else {
        degradation(s).map(|message| ("PodsUnhealthy", message))
    };
    let (degraded_reason, degraded_message) = degraded.clone().unwrap_or((
        "AllPodsHealthy",
        "every selected pod answers and is unsealed".into(),
    ));
    let overlap = if o.overlaps.is_empty() {
        (
            false,
            "NoOverlap",
            "no selected pod is left to an older VaultCluster".into(),
        )
    } else {
        (
            true,
            "SelectorOverlap",
            format!("left to older VaultClusters: {}", o.overlaps.join(", ")),
        )
    };
    let wanted = [
        ("Ready", ready),
        (
            "Available",
            (available, available_reason, available_message),
        ),
        (
            "Degraded",
            (degraded.is_some(), degraded_reason, degraded_message),
        ),
        ("SelectorOverlap", overlap),
    ];
    debug_assert!(wanted.iter().map(|w| w.0).eq(CONDITIONS));
    wanted
        .into_iter()
        .map(|(kind, (status, reason, message))| condition(o, kind, status, reason, message))
        .collect()
}

fn availability(o: &Observation) -> (bool, &'static str, String) {
    let claimants = &o.decision.claimants;
    if claimants.len() > 1 && o.written.active.is_none() {
        return (
            false,
            "MultipleActive",
            format!(
                "pods {} all claim to be active; none is labelled active",
                claimants.join(", ")
            ),
        );
    }
    match &o.written.active {
        Some(pod) if o.held.contains(pod) => (
            true,
            "ActiveHeld",
            format!(
                "{pod} keeps the active label: it gives no Vault answer, Kubernetes reports it Ready and no other pod answers active"
            ),
        ),
        Some(pod) => (true, "ActivePod", format!("{pod} is active")),
        None if o.members.is_empty() => (false, "NoPods", "no pod matches the selector".into()),
        None if claimants.len() == 1 => (
            false,
            "ActiveUnlabelled",
            format!(
                "{} answers as active; its active label is not written yet",
                claimants[0]
            ),
        ),
        None => (false, "NoActivePod", "no pod answers as active".into()),
    }
}

/// Names the pods that answer active beside the one keeping the label, if any. Read from
/// the status (a member that answered this round has no probe error), so that a restarted
/// operator finds the same contest and does not repeat its event.
pub(super) fn contest(s: &VaultClusterStatus) -> Option<String> {
    let keeper = s.active_pod.as_deref()?;
    let newcomers: Vec<&str> = s
        .members
        .iter()
        .filter(|m| m.role == "active" && m.last_probe_error.is_empty() && m.name != keeper)
        .map(|m| m.name.as_str())
        .collect();
    let newcomers = newcomers.join(", ");
    (!newcomers.is_empty()).then(|| {
        format!(
            "{keeper} and {newcomers} answer active; {keeper} was labelled active first and keeps the label; not labelled: {newcomers}"
        )
    })
}

fn held_message(held: &[String], s: &VaultClusterStatus) -> String {
    let example = s
        .members
        .iter()
        .find(|m| held.contains(&m.name) && !m.last_probe_error.is_empty())
        .map(|m| format!(" ({}: {})", m.name, m.last_probe_error))
        .unwrap_or_default();
    format!(
        "no Vault answer from {}{example}; Kubernetes reports them Ready, so their labels are held until another pod answers active or Kubernetes marks them not Ready",
        held.join(", ")
    )
}

/// Names the pods that need attention, with why.
fn degradation(s: &VaultClusterStatus) -> Option<String> {
    let troubled: Vec<String> = s
        .members
        .iter()
        .filter(|m| {
            matches!(
                m.role.as_str(),
                "unreachable" | "sealed" | "uninitialized" | "removed" | "pending"
            ) || !m.last_probe_error.is_empty()
        })
        .map(|m| match m.last_probe_error.as_str() {
            "" => format!("{}: {}", m.name, m.role),
            error => format!("{}: {} ({error})", m.name, m.role),
        })
        .collect();
    (!troubled.is_empty()).then(|| troubled.join("; "))
}

/// A condition whose transition time moves only when its status does.
fn condition(
    o: &Observation,
    kind: &str,
    status: bool,
    reason: &str,
    message: String,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let previous = o
        .previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == kind));
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => o.now.clone(),
    };
    Condition {
        type_: kind.into(),
        status,
        reason: reason.into(),
        message: shorten(message, text::CONDITION),
        observed_generation: o.generation,
        last_transition_time,
    }
}
