//! Act: the few writes a decision calls for, pod labels (every demotion before a
//! promotion) and the generated Services, each guarded by leadership and the pod's UID.
//! What a write returns goes into the cache at once, so the next round does not repeat it.
//! What was written, not what was meant, is what `act` hands on (`Written`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use tracing::info;

use super::observe::Selection;
use super::{Context, MANAGER, cache, cluster_name, interval};
use crate::crd::VaultCluster;
use crate::decide::{Decision, LabelPlan, Member, Written};
use crate::error::Error;
use crate::index::SlimPod;
use crate::labels::{
    LEGACY_OWNER_ANNOTATION, LabelNames, OWNER_LABEL, diff, full_removal, retire_prefix,
};
use crate::pod_view::PodView;
use crate::services::{self, Kind};

/// What `act` did.
pub struct Acted {
    /// The labels as the writes left them.
    pub written: Written,
    /// Why any Service could not be put in place; or the write that failed, after which
    /// nothing more was written.
    pub result: Result<Vec<String>, Error>,
}

/// Writes what the decision calls for: labels, strays, Services. Stops at the first failed
/// write, so a promotion never follows a failed demotion.
pub async fn act(
    vc: &VaultCluster,
    ctx: &Context,
    names: &LabelNames,
    decision: &Decision,
    members: &[Member],
    selection: &Selection,
) -> Acted {
    let (made, labelled) = write_plans(vc, ctx, decision, members, &selection.candidates).await;
    let result = match labelled {
        Ok(()) => match retire_old_prefix(vc, ctx, decision, &selection.candidates).await {
            Ok(()) => strays_and_services(vc, ctx, names, selection).await,
            Err(error) => Err(error),
        },
        Err(error) => Err(error),
    };
    let complete = result.is_ok() && made.len() == decision.plans.len();
    Acted {
        written: Written::after(names, members, &made, complete),
        result,
    }
}

/// Writes the label plans in their order (demotions first) and stops at the first that
/// fails; returns the plans that were written. A pod gone or replaced is no failure, but its
/// plan was not written either.
async fn write_plans<'d>(
    vc: &VaultCluster,
    ctx: &Context,
    decision: &'d Decision,
    members: &[Member],
    pods: &[Arc<SlimPod>],
) -> (Vec<&'d LabelPlan>, Result<(), Error>) {
    let mut made = Vec::new();
    for plan in &decision.plans {
        if plan.promotes {
            let ip = members
                .iter()
                .find(|m| m.name == plan.pod)
                .map(|m| m.ip.as_str())
                .unwrap_or_default();
            await_active_endpoints_drained(vc, ctx, ip).await;
        }
        match write_labels(vc, ctx, plan, pods).await {
            Ok(Patched::Written) => made.push(plan),
            Ok(Patched::Gone) => {}
            Err(error) => return (made, Err(error)),
        }
    }
    (made, Ok(()))
}

async fn strays_and_services(
    vc: &VaultCluster,
    ctx: &Context,
    names: &LabelNames,
    selection: &Selection,
) -> Result<Vec<String>, Error> {
    for pod in &selection.strays {
        strip_labels(vc, ctx, names, pod).await?;
    }
    // No pods is not "every pod owned": switching the selectors then would empty the
    // Services the moment the pods are seen.
    let owned = !selection.candidates.is_empty()
        && selection
            .candidates
            .iter()
            .all(|p| p.labels.get(OWNER_LABEL) == Some(&vc.name_any()));
    let pods_owned = {
        let mut since = ctx.owned_since.lock().unwrap();
        let entry = since.entry(vc.uid().unwrap_or_default()).or_default();
        services::owned_long_enough(entry, owned, Instant::now())
    };
    converge_services(vc, ctx, pods_owned).await
}

/// Before promoting a pod, waits (bounded) until the active Service's EndpointSlices hold
/// no other pod. The demotions were written just before; writing the promotion while the
/// EndpointSlice controller still digests them makes its next sync hit its own stale cache
/// and back off for a second. Waiting also means clients never see two active endpoints.
/// Reads the EndpointSlice cache, never the API.
async fn await_active_endpoints_drained(vc: &VaultCluster, ctx: &Context, promoted_ip: &str) {
    if !vc.spec.services.active.enabled {
        return;
    }
    let ns = vc.namespace().unwrap_or_default();
    let service = services::name(vc, Kind::Active);
    let deadline = Instant::now() + (interval(vc) / 2).min(Duration::from_millis(500));
    loop {
        let others = {
            let slices = ctx.caches.slices.read().unwrap();
            slices
                .labelled(&ns, "kubernetes.io/service-name", &service)
                .iter()
                .flat_map(|s| s.endpoints.iter())
                .flat_map(|e| e.addresses.iter())
                .any(|address| address != promoted_ip)
        };
        if !others || Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether a pod's labels were written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Patched {
    Written,
    /// The pod was gone or replaced under its name: nothing written, nothing to retry.
    Gone,
}

async fn write_labels(
    vc: &VaultCluster,
    ctx: &Context,
    plan: &LabelPlan,
    pods: &[Arc<SlimPod>],
) -> Result<Patched, Error> {
    let Some(pod) = pods.iter().find(|p| p.name == plan.pod) else {
        return Ok(Patched::Gone);
    };
    let mut change = plan.change.clone();
    change.extend(retire_prefix(&vc.spec.label_prefix, &pod.labels));
    let mut meta = json!({"labels": change});
    if pod.legacy_owner.is_some() {
        meta["annotations"] = json!({LEGACY_OWNER_ANNOTATION: null});
    }
    patch_pod(vc, ctx, pod, meta).await
}

/// Records the label prefix on the candidates no plan wrote to this round, removing the
/// labels of a prefix written before (see `labels::PREFIX_LABEL`).
async fn retire_old_prefix(
    vc: &VaultCluster,
    ctx: &Context,
    decision: &Decision,
    pods: &[Arc<SlimPod>],
) -> Result<(), Error> {
    let unplanned = pods
        .iter()
        .filter(|p| !decision.plans.iter().any(|plan| plan.pod == p.name))
        .filter(|p| p.labels.get(OWNER_LABEL) == Some(&vc.name_any()));
    for pod in unplanned {
        let change = retire_prefix(&vc.spec.label_prefix, &pod.labels);
        if !change.is_empty() {
            patch_pod(vc, ctx, pod, json!({"labels": change})).await?;
            // A pod gone meanwhile is the next round's to see.
        }
    }
    Ok(())
}

pub async fn strip_labels(
    vc: &VaultCluster,
    ctx: &Context,
    names: &LabelNames,
    pod: &SlimPod,
) -> Result<Patched, Error> {
    let change = diff(&pod.labels, &full_removal(names, &pod.labels));
    // Only the version that was read: if the labels changed since (another VaultCluster
    // claimed the pod, say), the API server refuses and the next round reads them again.
    let meta = json!({
        "labels": change,
        "annotations": {LEGACY_OWNER_ANNOTATION: null},
        "resourceVersion": pod.resource_version,
    });
    patch_pod(vc, ctx, pod, meta).await
}

/// Patches a pod's metadata, on condition that it is still the pod observed: the UID in the
/// patch makes the API server refuse it if the pod was replaced under the same name. A pod
/// gone or replaced ends the write quietly; the next round sees the new one.
async fn patch_pod(
    vc: &VaultCluster,
    ctx: &Context,
    pod: &SlimPod,
    mut meta: serde_json::Value,
) -> Result<Patched, Error> {
    let (ns, name) = (&pod.namespace, &pod.name);
    ctx.guard(&format!("pod {ns}/{name}"))?;
    meta["uid"] = json!(pod.uid);
    let api: Api<PodView> = Api::namespaced(ctx.client.clone(), ns);
    match api
        .patch(
            name,
            &write_params(),
            &Patch::Merge(json!({"metadata": meta})),
        )
        .await
    {
        Ok(written) => {
            let slim = super::cache::slim_pod(&ctx.caches, &written);
            ctx.caches.pods.write().unwrap().apply_written(slim);
            ctx.metrics.label_writes.inc();
            info!(cluster = %cluster_name(vc), pod = %name, "labels written");
            Ok(Patched::Written)
        }
        Err(kube::Error::Api(e)) if e.code == 404 || replaced(&e) => {
            info!(cluster = %cluster_name(vc), pod = %name, reason = %e.message, "pod gone or replaced; labels not written");
            Ok(Patched::Gone)
        }
        Err(source) => Err(Error::PatchPod {
            cluster: cluster_name(vc),
            pod: name.clone(),
            source,
        }),
    }
}

/// Whether a refused patch was refused because the pod's UID is not the one in the patch:
/// the API server says the immutable `metadata.uid` would change. A conflict on the
/// resourceVersion a strip carries is not that: the pod changed since it was read, and the
/// write is an error to retry, so a VaultCluster is never let go with its labels left.
fn replaced(status: &kube::core::Status) -> bool {
    (status.code == 409 && !status.message.contains("has been modified"))
        || (status.code == 422
            && status
                .details
                .iter()
                .flat_map(|d| d.causes.iter())
                .any(|c| c.field == "metadata.uid"))
}

/// Every merge patch carries our field manager, so `managedFields` names us.
pub fn write_params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    }
}

/// Creates, repairs and deletes the generated Services, reading them from the cache;
/// returns why any could not be put in place (a foreign Service with the name).
async fn converge_services(
    vc: &VaultCluster,
    ctx: &Context,
    pods_owned: bool,
) -> Result<Vec<String>, Error> {
    let ns = vc.namespace().unwrap_or_default();
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let mut problems = Vec::new();
    let desired = services::desired(vc);
    for (_, want) in &desired {
        let mut want = want.clone();
        let name = want.name_any();
        let cached = ctx.caches.services.read().unwrap().get(&ns, &name);
        let existing = match cached {
            Some(ours) => Some(ours),
            None => unlabelled_service(vc, &api, &name).await?,
        };
        if let Some(have) = &existing {
            if !services::owned_by(have, vc) {
                problems.push(format!(
                    "Service {name} exists and is not owned by this VaultCluster; left alone"
                ));
                continue;
            }
            services::defer_owner_selector(&mut want, have, pods_owned);
            if !services::drifted(have, &want) {
                continue;
            }
            ctx.guard(&format!("Service {name}"))?;
            remove_foreign_fields(vc, &api, have, &want).await?;
        }
        ctx.guard(&format!("Service {name}"))?;
        let params = PatchParams::apply(MANAGER).force();
        let written = api
            .patch(&name, &params, &Patch::Apply(&want))
            .await
            .map_err(service_write_failed(vc, &name))?;
        ctx.caches
            .services
            .write()
            .unwrap()
            .apply(cache::trimmed(&written));
        service_written(vc, ctx, &name, "applied");
    }
    remove_unwanted_services(vc, ctx, &api, &desired).await?;
    Ok(problems)
}

/// Removes what another writer added to a Service that the apply cannot take away, before
/// the apply (see `services::repair_first`).
async fn remove_foreign_fields(
    vc: &VaultCluster,
    api: &Api<Service>,
    have: &Service,
    want: &Service,
) -> Result<(), Error> {
    let Some(patch) = services::repair_first(have, want) else {
        return Ok(());
    };
    let name = have.name_any();
    api.patch(&name, &write_params(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(service_write_failed(vc, &name))
}

/// The cache holds only Services with our label: before creating one, make sure no one
/// else's has the name. Read only while a wanted Service is missing from the cache.
async fn unlabelled_service(
    vc: &VaultCluster,
    api: &Api<Service>,
    name: &str,
) -> Result<Option<Arc<Service>>, Error> {
    let found = api
        .get_opt(name)
        .await
        .map_err(|source| Error::ReadService {
            cluster: cluster_name(vc),
            service: name.into(),
            source,
        })?;
    Ok(found.map(Arc::new))
}

/// Deletes Services this VaultCluster owns that are no longer wanted (disabled or renamed).
async fn remove_unwanted_services(
    vc: &VaultCluster,
    ctx: &Context,
    api: &Api<Service>,
    desired: &[(Kind, Service)],
) -> Result<(), Error> {
    let ns = vc.namespace().unwrap_or_default();
    let owned =
        ctx.caches
            .services
            .read()
            .unwrap()
            .labelled(&ns, services::CLUSTER_LABEL, &vc.name_any());
    for svc in owned.iter().filter(|s| services::owned_by(s, vc)) {
        let name = svc.name_any();
        if desired.iter().any(|(_, want)| want.name_any() == name) {
            continue;
        }
        ctx.guard(&format!("Service {name}"))?;
        api.delete(&name, &DeleteParams::default())
            .await
            .map_err(service_write_failed(vc, &name))?;
        ctx.caches.services.write().unwrap().delete(&ns, &name);
        service_written(vc, ctx, &name, "removed");
    }
    Ok(())
}

fn service_write_failed(vc: &VaultCluster, name: &str) -> impl FnOnce(kube::Error) -> Error {
    let (cluster, service) = (cluster_name(vc), name.to_string());
    move |source| Error::WriteService {
        cluster,
        service,
        source,
    }
}

fn service_written(vc: &VaultCluster, ctx: &Context, name: &str, what: &str) {
    ctx.metrics.service_writes.inc();
    info!(cluster = %cluster_name(vc), service = %name, "Service {what}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_changed_uid_counts_as_replaced() {
        let status = |code: u16, field: &str| -> kube::core::Status {
            serde_json::from_value(json!({
                "status": "Failure", "code": code, "message": "refused", "reason": "Invalid",
                "details": {"name": "p", "group": "", "kind": "pods", "causes": [{"field": field}]},
            }))
            .unwrap()
        };
        assert!(replaced(&status(422, "metadata.uid")));
        assert!(replaced(&status(409, "")));
        let mut modified = status(409, "");
        modified.message = "Operation cannot be fulfilled on pods \"p\": the object has been \
            modified; please apply your changes to the latest version and try again"
            .into();
        assert!(!replaced(&modified), "a stale read is retried");
        assert!(
            !replaced(&status(422, "metadata.labels")),
            "a refused write is an error"
        );
        assert!(!replaced(&status(403, "metadata.uid")));
    }
}
