//! Report: the status (written only when it changed), the events its changes imply, and
//! the per-cluster gauges.

use std::borrow::Cow;
use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch};
use kube::runtime::controller::Action;
use tracing::{info, warn};

use super::act::write_params;
use super::{Context, cluster_name, interval};
use crate::cluster_metrics::Gauges;
use crate::crd::{VaultCluster, VaultClusterStatus};
use crate::error::Error;
use crate::status::written::{StatusWrite, newer};
use crate::status::{CONDITIONS, Notice, can_wait, invalid_spec, merge_patch, notices};

/// Reports a spec the operator cannot act on, touching nothing else: the labels are held
/// and the last observation stays in the status.
pub async fn invalid(vc: &VaultCluster, ctx: &Context, problem: String) -> Result<Action, Error> {
    warn!(cluster = %cluster_name(vc), %problem, "VaultCluster spec cannot be acted on");
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = invalid_spec(vc.status.as_ref(), vc.metadata.generation, problem, now);
    publish(vc, ctx, status).await?;
    Ok(Action::requeue(interval(vc)))
}

/// Writes the status and its events, only if the status changed. The patch clears what the
/// new status leaves out, so a stale field cannot keep every round writing.
pub async fn publish(
    vc: &VaultCluster,
    ctx: &Context,
    status: VaultClusterStatus,
) -> Result<(), Error> {
    if vc.status.as_ref() == Some(&status) || waits(vc, ctx, &status) {
        return Ok(());
    }
    ctx.guard(&format!("VaultCluster {} status", cluster_name(vc)))?;
    let api: Api<VaultCluster> =
        Api::namespaced(ctx.client.clone(), &vc.namespace().unwrap_or_default());
    let patch = merge_patch(vc.status.as_ref(), &status);
    let written = api
        .patch_status(&vc.name_any(), &write_params(), &Patch::Merge(patch))
        .await
        .map_err(|source| Error::UpdateStatus {
            cluster: cluster_name(vc),
            source,
        })?;
    ctx.metrics.status_writes.inc();
    ctx.status_written.lock().unwrap().insert(
        vc.uid().unwrap_or_default(),
        StatusWrite {
            at: Instant::now(),
            resource_version: written.resource_version(),
            status: Some(status.clone()),
        },
    );
    for notice in notices(vc.status.as_ref(), &status) {
        if notice.reason == "ActiveChanged" {
            let ns = vc.namespace().unwrap_or_default();
            ctx.metrics
                .clusters
                .count_active_change(&ns, &vc.name_any());
        }
        event(vc, ctx, notice).await;
    }
    Ok(())
}

/// The cluster with the newest status this term knows: its last write, while the cache
/// does not show it yet (see `status::written`).
pub fn with_newest_status<'a>(vc: &'a VaultCluster, ctx: &Context) -> Cow<'a, VaultCluster> {
    let uid = vc.uid().unwrap_or_default();
    let mut written = ctx.status_written.lock().unwrap();
    let Some(write) = written.get_mut(&uid) else {
        return Cow::Borrowed(vc);
    };
    let version = vc.resource_version();
    match newer(
        version.as_deref(),
        vc.status.as_ref(),
        write,
        Instant::now(),
    ) {
        Some(status) => {
            let mut vc = vc.clone();
            vc.status = Some(status.clone());
            Cow::Owned(vc)
        }
        None => {
            write.status = None;
            Cow::Borrowed(vc)
        }
    }
}

/// Whether this change can wait because the status was written less than an interval ago.
fn waits(vc: &VaultCluster, ctx: &Context, status: &VaultClusterStatus) -> bool {
    let written = ctx.status_written.lock().unwrap();
    can_wait(vc.status.as_ref(), status)
        && written
            .get(&vc.uid().unwrap_or_default())
            .is_some_and(|w| w.at.elapsed() < interval(vc))
}

pub(super) async fn event(vc: &VaultCluster, ctx: &Context, notice: Notice) {
    info!(cluster = %cluster_name(vc), reason = notice.reason, message = %notice.message, "event");
    if let Err(e) = ctx.recorder.publish(vc, &notice).await {
        warn!(cluster = %cluster_name(vc), error = %e, "publishing event failed");
    }
}

/// The cluster's gauges from its status. A follower sets none: losing leadership deleted
/// them, and they must not come back from a round that was still running.
pub fn gauges(vc: &VaultCluster, ctx: &Context, s: &VaultClusterStatus) {
    if ctx.guard("gauges").is_err() {
        return;
    }
    let pods = [
        ("all", s.pods),
        ("active", s.active),
        ("standby", s.standby),
        ("perf-standby", s.perf_standby),
        ("sealed", s.sealed),
        ("uninitialized", s.uninitialized),
        ("unreachable", s.unreachable),
    ];
    let conditions = CONDITIONS.map(|condition| {
        let on = s
            .conditions
            .iter()
            .any(|c| c.type_ == condition && c.status == "True");
        (condition, on)
    });
    let gauges = Gauges {
        pods: pods.map(|(role, n)| (role, n as i64)).to_vec(),
        conditions: conditions.to_vec(),
        active_pod: s.active_pod.clone(),
    };
    let (ns, name) = (vc.namespace().unwrap_or_default(), vc.name_any());
    ctx.metrics.clusters.show(&ns, &name, gauges);
}
