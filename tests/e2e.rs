//! End-to-end tests of the reconciler: the real operator binary against the real local
//! control plane, with simulated Vault pods answering from the simulated pod network.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use vault_registrar::labels::{OWNER_LABEL, PREFIX_LABEL};
use vault_registrar_testkit::certs::Authority;
use vault_registrar_testkit::pods::create_namespace;
use vault_registrar_testkit::stage::run_blocking;
use vault_registrar_testkit::vault_sim::{Behavior, Role, SimTls};
use vault_registrar_testkit::{shared, wait};

#[tokio::test]
async fn first_convergence_labels_pods_and_fills_services() -> anyhow::Result<()> {
    let f = converged_trio("first").await?;
    let labels = f.vault.labels(0).await?;
    for (k, v) in [
        ("vault-initialized", "true"),
        ("vault-sealed", "false"),
        ("vault-perf-standby", "false"),
        ("vault-version", "1.17.2"),
    ] {
        assert_eq!(labels.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert_eq!(
        labels.get("app.kubernetes.io/name").map(String::as_str),
        Some("vault"),
        "other labels untouched"
    );
    f.condition("vault", "Ready", "True", "Ready").await?;
    let status = f.clusters().get("vault").await?.status.unwrap();
    assert_eq!(
        (status.active_pod.as_deref(), status.pods, status.unsealed),
        (Some("vault-0"), 3, 3)
    );
    let svc: Api<Service> = Api::namespaced(f.client.clone(), &f.ns);
    let active = svc.get("vault-active").await?;
    assert_ne!(active.spec.unwrap().publish_not_ready_addresses, Some(true));
    Ok(())
}

/// At steady state the operator sends no write at all: not a no-op PATCH or apply (which
/// leaves resourceVersions alone), not an Event, and nothing that makes the EndpointSlice
/// controller write. Counted from the API server's audit log: every write to the namespace,
/// by anyone, over 20 probe intervals.
#[tokio::test]
async fn steady_state_sends_no_writes() -> anyhow::Result<()> {
    const WINDOW: Duration = Duration::from_secs(10);
    let f = converged_trio("steady").await?;
    f.condition("vault", "Ready", "True", "Ready").await?;
    // The convergence's own writes (status, events, EndpointSlices) land first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = shared().writes_in_async(&f.ns).await.len();
    let probes_before: u64 = (0..3).map(|i| f.vault.sim(i).health_requests()).sum();
    tokio::time::sleep(WINDOW).await;
    let probes_after: u64 = (0..3).map(|i| f.vault.sim(i).health_requests()).sum();
    let writes = shared().writes_in_async(&f.ns).await.split_off(before);
    // 20 intervals of 500 ms; at least half of the probes of each of the three pods.
    assert!(
        probes_after >= probes_before + 3 * 10,
        "probing continues: {probes_before} -> {probes_after}"
    );
    assert_eq!(
        writes,
        vec![],
        "writes to the namespace during {WINDOW:?} of steady state (user, verb, resource, name, code)"
    );
    Ok(())
}

#[tokio::test]
async fn failover_moves_the_active_label_and_service() -> anyhow::Result<()> {
    let f = converged_trio("failover").await?;
    f.fail_over_to(1).await?;
    f.endpoints("vault-active", &[1]).await?;
    f.endpoints("vault-standby", &[0, 2]).await?;
    let events: Api<Event> = Api::namespaced(f.client.clone(), &f.ns);
    wait::until("ActiveChanged from vault-0 to vault-1", LIMIT, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|e| e.note.as_deref() == Some("active pod changed from vault-0 to vault-1"))
            .then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn crashed_active_is_demoted() -> anyhow::Result<()> {
    let f = converged_trio("crash").await?;
    f.behave(0, Behavior::Crash).await;
    // Kubernetes still reports it Ready and no other pod answers active: refused connections
    // alone are a guess, so the labels are held.
    f.condition("vault", "Degraded", "True", "ProbesFailing")
        .await?;
    f.labels(
        "vault-active",
        &[Some("true"), Some("false"), Some("false")],
    )
    .await?;
    // A new active pod corroborates it: the crashed pod is shut down, the new one promoted.
    f.set(2, Role::Active).await;
    f.labels(
        "vault-sealed",
        &[Some("true"), Some("false"), Some("false")],
    )
    .await?;
    assert_eq!(
        f.vault
            .labels(0)
            .await?
            .get("vault-initialized")
            .map(String::as_str),
        Some("false")
    );
    f.condition("vault", "Degraded", "True", "PodsUnhealthy")
        .await?;
    f.event("PodUnreachable").await?;
    f.labels(
        "vault-active",
        &[Some("false"), Some("false"), Some("true")],
    )
    .await?;
    f.endpoints("vault-active", &[2]).await
}

#[tokio::test]
async fn seal_and_uninitialised_leave_the_pools() -> anyhow::Result<()> {
    let f = converged_trio("seal").await?;
    f.set(1, Role::Sealed).await;
    f.set(2, Role::Uninitialized).await;
    f.labels("vault-sealed", &[Some("false"), Some("true"), Some("true")])
        .await?;
    f.labels(
        "vault-initialized",
        &[Some("true"), Some("true"), Some("false")],
    )
    .await?;
    f.endpoints("vault-standby", &[]).await?;
    let message = f
        .condition("vault", "Degraded", "True", "PodsUnhealthy")
        .await?;
    assert!(
        message.contains("vault-1: sealed") && message.contains("vault-2: uninitialized"),
        "{message}"
    );
    Ok(())
}

#[tokio::test]
async fn perf_standby_gets_its_label_and_service() -> anyhow::Result<()> {
    let f = fixture(
        "perf",
        &[Role::Active, Role::Standby, Role::PerfStandby],
        None,
    )
    .await?;
    f.create(
        "vault",
        &format!("{FAST}\nservices: {{perfStandby: {{enabled: true}}}}"),
    )
    .await?;
    f.labels(
        "vault-perf-standby",
        &[Some("false"), Some("false"), Some("true")],
    )
    .await?;
    f.endpoints("vault-perf-standby", &[2]).await?;
    f.endpoints("vault-active", &[0]).await
}

/// A DR secondary cluster (Enterprise; simulator only) answers 472 on every node. Vault's own
/// registration labels its HA leader active, and so do we: the body's `standby` tells the
/// leader apart, and the leader moves with a failover inside the secondary cluster.
#[tokio::test]
async fn dr_secondary_leader_is_labelled_active_as_vault_does() -> anyhow::Result<()> {
    let standby = Role::DrSecondaryStandby;
    let f = fixture("dr", &[Role::DrSecondary, standby, standby], None).await?;
    f.create("vault", FAST).await?;
    f.converged().await?;
    f.condition("vault", "Available", "True", "ActivePod")
        .await?;
    f.set(0, standby).await;
    f.set(1, Role::DrSecondary).await;
    f.labels(
        "vault-active",
        &[Some("false"), Some("true"), Some("false")],
    )
    .await?;
    f.endpoints("vault-active", &[1]).await?;
    f.endpoints("vault-standby", &[0, 2]).await
}

/// Pods whose only address is IPv6 (an IPv6-only cluster) are probed at that address
/// (`http://[fd00:…]:8200`) and labelled; a failover moves the label. The control plane here
/// is IPv4 single-stack, so the generated Services get no IPv6 endpoints: only the labels are
/// checked (see README).
#[tokio::test]
async fn ipv6_pods_are_probed_and_labelled() -> anyhow::Result<()> {
    use std::net::SocketAddr;
    use vault_registrar_testkit::netns::pod_ip6;
    use vault_registrar_testkit::pods::{NODE_NAME, ensure_node, pod_labels};
    use vault_registrar_testkit::vault_sim::{SimState, VaultSim};

    let ns = "e2e-ipv6";
    let client = namespace(ns).await?;
    ensure_node(&client).await?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    let mut sims = Vec::new();
    for (i, role) in [Role::Active, Role::Standby, Role::Standby]
        .into_iter()
        .enumerate()
    {
        let ip = pod_ip6(900 + i as u32);
        sims.push(
            VaultSim::start(SocketAddr::new(ip.into(), 8200), None, SimState::new(role)).await?,
        );
        let pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("vault-{i}"), "labels": {"app.kubernetes.io/name": "vault"}},
            "spec": {"nodeName": NODE_NAME, "containers": [{"name": "vault", "image": "vault",
                "ports": [{"name": "http", "containerPort": 8200}]}]},
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
        let status = json!({"status": {"phase": "Running", "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
            "conditions": [{"type": "Ready", "status": "True"}]}});
        pods.patch_status(
            &format!("vault-{i}"),
            &PatchParams::default(),
            &Patch::Strategic(status),
        )
        .await?;
    }
    let _operator = operator(ns, None, &[])?;
    let vc = format!(
        "apiVersion: vault-registrar.dev/v1alpha1\nkind: VaultCluster\nmetadata: {{name: vault}}\nspec:\n  selector: {{matchLabels: {{app.kubernetes.io/name: vault}}}}\n  {FAST}\n"
    );
    let vc: vault_registrar::crd::VaultCluster = serde_yaml::from_str(&vc)?;
    Api::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &vc)
        .await?;
    let active_is = |want: [&'static str; 3]| {
        let client = client.clone();
        async move {
            wait::until(&format!("vault-active {want:?}"), LIMIT, || async {
                let mut got = Vec::new();
                for i in 0..3 {
                    let labels = pod_labels(&client, ns, &format!("vault-{i}")).await?;
                    got.push(labels.get("vault-active").cloned().unwrap_or_default());
                }
                Ok((got == want).then_some(()))
            })
            .await
        }
    };
    active_is(["true", "false", "false"]).await?;
    sims[0].update(|s| s.role = Role::Standby).await;
    sims[2].update(|s| s.role = Role::Active).await;
    active_is(["false", "false", "true"]).await
}

/// Without an incumbent (none was labelled active before) two claimants cannot be told
/// apart: neither is labelled. With one, it keeps the label (`tests/corroboration.rs`).
#[tokio::test]
async fn two_pods_claiming_active_get_neither() -> anyhow::Result<()> {
    let f = fixture("split", &[Role::Active, Role::Active, Role::Standby], None).await?;
    f.create("vault", FAST).await?;
    let message = f
        .condition("vault", "Available", "False", "MultipleActive")
        .await?;
    assert!(
        message.contains("vault-0") && message.contains("vault-1"),
        "{message}"
    );
    f.event("MultipleActive").await?;
    f.labels("vault-active", &[None, None, Some("false")])
        .await?;
    f.endpoints("vault-active", &[]).await
}

#[tokio::test]
async fn garbage_answer_is_never_labelled_active() -> anyhow::Result<()> {
    let f = fixture("garbage", &TRIO, None).await?;
    f.behave(0, Behavior::Garbage).await;
    f.create("vault", FAST).await?;
    // Not Vault's answer, from a pod Kubernetes reports Ready: no role label at all.
    f.condition("vault", "Degraded", "True", "ProbesFailing")
        .await?;
    f.labels("vault-active", &[None, Some("false"), Some("false")])
        .await?;
    f.labels("vault-sealed", &[None, Some("false"), Some("false")])
        .await?;
    let error = f.probe_error("vault-0").await?;
    assert!(error.contains("not Vault health JSON"), "{error}");
    Ok(())
}

#[tokio::test]
async fn hanging_server_times_out() -> anyhow::Result<()> {
    let f = converged_trio("hang").await?;
    f.behave(0, Behavior::Hang).await;
    let message = f
        .condition("vault", "Degraded", "True", "ProbesFailing")
        .await?;
    assert!(message.contains("no answer within"), "{message}");
    let error = f.probe_error("vault-0").await?;
    assert!(error.contains("no answer within"), "{error}");
    // Held while Kubernetes reports it Ready; a new active pod demotes it.
    f.set(1, Role::Active).await;
    f.labels(
        "vault-active",
        &[Some("false"), Some("true"), Some("false")],
    )
    .await
}

#[tokio::test]
async fn https_with_ca_secret_and_server_name() -> anyhow::Result<()> {
    let (ca, tls) = tls_for(&TRIO_NAMES)?;
    let f = fixture("https", &TRIO, Some(tls)).await?;
    f.ca_secret(&ca).await?;
    f.create("vault", HTTPS).await?;
    f.converged().await?;
    f.condition("vault", "Ready", "True", "Ready").await?;
    Ok(())
}

/// A certificate that does not name the pod must never yield an active label. A failed
/// handshake tells nothing of Vault's state, and when it fails on every pod the operator
/// cannot tell what Vault says: it holds the labels (none here) and says so.
#[tokio::test]
async fn https_verification_failures_never_label_active() -> anyhow::Result<()> {
    let (ca, tls) = tls_for(&["vault.example"])?;
    let f = fixture("https-wrong", &TRIO, Some(tls)).await?;
    f.ca_secret(&ca).await?;
    f.create("vault", HTTPS).await?;
    let message = f
        .condition("vault", "Degraded", "True", "ProbesFailing")
        .await?;
    assert!(message.contains("tls:"), "{message}");
    // Several intervals later still nobody is active, and every probe failed verification.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..3 {
        let labels = f.vault.labels(i).await?;
        assert_ne!(labels.get("vault-active").map(String::as_str), Some("true"));
    }
    f.endpoints("vault-active", &[]).await?;
    let status = f.clusters().get("vault").await?.status.unwrap();
    assert!(
        status
            .members
            .iter()
            .all(|m| m.last_probe_error.starts_with("tls:")),
        "{:?}",
        status.members
    );
    f.condition("vault", "Available", "False", "NoActivePod")
        .await?;
    Ok(())
}

#[tokio::test]
async fn https_insecure_skip_verify_accepts_any_certificate() -> anyhow::Result<()> {
    let cert = Authority::new("unknown-ca")?.serving(&["vault.example"])?;
    let f = fixture(
        "https-insecure",
        &TRIO,
        Some(SimTls {
            cert_pem: cert.cert,
            key_pem: cert.key,
        }),
    )
    .await?;
    f.create(
        "vault",
        "health: {scheme: https, interval: 500ms, timeout: 300ms, tls: {insecureSkipVerify: true}}",
    )
    .await?;
    f.converged().await
}

#[tokio::test]
async fn openbao_prefix() -> anyhow::Result<()> {
    let f = fixture("openbao", &TRIO, None).await?;
    for i in 0..3 {
        f.vault.sim(i).update(|s| s.openbao = true).await;
    }
    f.create("bao", &format!("{FAST}\nlabelPrefix: openbao"))
        .await?;
    f.labels(
        "openbao-active",
        &[Some("true"), Some("false"), Some("false")],
    )
    .await?;
    f.endpoints("bao-active", &[0]).await?;
    assert!(!f.vault.labels(0).await?.contains_key("vault-active"));
    Ok(())
}

/// OpenBao's answers beyond 200 and 429: 503 (sealed) and 501 (uninitialised) take a pod
/// out of the `-standby` Service, and a failover inside OpenBao moves the `-active` one.
#[tokio::test]
async fn openbao_sealed_and_uninitialised_leave_the_pools() -> anyhow::Result<()> {
    let f = fixture("openbao-codes", &TRIO, None).await?;
    for i in 0..3 {
        f.vault.sim(i).update(|s| s.openbao = true).await;
    }
    f.create("bao", &format!("{FAST}\nlabelPrefix: openbao"))
        .await?;
    f.endpoints("bao-active", &[0]).await?;
    f.endpoints("bao-standby", &[1, 2]).await?;
    f.set(1, Role::Sealed).await;
    f.set(2, Role::Uninitialized).await;
    f.labels(
        "openbao-sealed",
        &[Some("false"), Some("true"), Some("true")],
    )
    .await?;
    f.labels(
        "openbao-initialized",
        &[Some("true"), Some("true"), Some("false")],
    )
    .await?;
    f.endpoints("bao-standby", &[]).await?;
    f.endpoints("bao-active", &[0]).await?;
    // Unsealed again, and then the active role moves inside OpenBao.
    f.set(1, Role::Standby).await;
    f.set(2, Role::Standby).await;
    f.endpoints("bao-standby", &[1, 2]).await?;
    f.set(0, Role::Standby).await;
    f.set(1, Role::Active).await;
    f.labels(
        "openbao-active",
        &[Some("false"), Some("true"), Some("false")],
    )
    .await?;
    f.endpoints("bao-active", &[1]).await?;
    f.endpoints("bao-standby", &[0, 2]).await?;
    for i in 0..3 {
        let labels = f.vault.labels(i).await?;
        assert!(
            !labels
                .keys()
                .any(|k| k.starts_with("vault-") && !k.starts_with("vault-registrar.dev/")),
            "vault-{i} got vault- labels under the openbao prefix: {labels:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn service_drift_is_repaired() -> anyhow::Result<()> {
    let f = converged_trio("drift").await?;
    let svc: Api<Service> = Api::namespaced(f.client.clone(), &f.ns);
    let patch =
        json!({"spec": {"selector": {"vault-active": "false"}, "publishNotReadyAddresses": true}});
    svc.patch(
        "vault-active",
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await?;
    wait::until("selector repaired", LIMIT, || async {
        let spec = svc.get("vault-active").await?.spec.unwrap();
        let selector = spec.selector.unwrap_or_default();
        Ok(
            (selector.get("vault-active").map(String::as_str) == Some("true")
                && spec.publish_not_ready_addresses != Some(true))
            .then_some(()),
        )
    })
    .await?;
    f.endpoints("vault-active", &[0]).await
}

/// The Service settings users ask for reach the Services, and one removed from the spec is
/// removed from its Service (the API server's default comes back).
#[tokio::test]
async fn service_settings_reach_the_services_and_leave_with_the_spec() -> anyhow::Result<()> {
    let ns = "e2e-svc-settings";
    let client = namespace(ns).await?;
    let vault =
        vault_registrar_testkit::cluster::SimCluster::start(&client, ns, "vault", &TRIO, None)
            .await?;
    let _operator = operator(
        ns,
        None,
        &["--allowed-service-types=ClusterIP,NodePort,LoadBalancer"],
    )?;
    let f = Fixture {
        client: client.clone(),
        ns: ns.into(),
        vault,
        operator: _operator,
    };
    f.create(
        "vault",
        &format!(
            "{FAST}\nservices:\n  active: {{enabled: true, type: LoadBalancer, externalTrafficPolicy: Local, loadBalancerClass: example.com/internal, loadBalancerSourceRanges: [10.0.0.0/8], sessionAffinity: ClientIP}}\n  standby: {{enabled: true, type: NodePort, externalTrafficPolicy: Local, internalTrafficPolicy: Local, ipFamilyPolicy: PreferDualStack, ipFamilies: [IPv4]}}"
        ),
    )
    .await?;
    f.converged().await?;
    let svc: Api<Service> = Api::namespaced(client.clone(), ns);
    let active = svc.get("vault-active").await?.spec.unwrap_or_default();
    assert_eq!(active.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(active.external_traffic_policy.as_deref(), Some("Local"));
    assert_eq!(
        active.load_balancer_class.as_deref(),
        Some("example.com/internal")
    );
    assert_eq!(
        active.load_balancer_source_ranges,
        Some(vec!["10.0.0.0/8".to_string()])
    );
    assert_eq!(active.session_affinity.as_deref(), Some("ClientIP"));
    let standby = svc.get("vault-standby").await?.spec.unwrap_or_default();
    assert_eq!(standby.type_.as_deref(), Some("NodePort"));
    assert_eq!(standby.external_traffic_policy.as_deref(), Some("Local"));
    assert_eq!(standby.internal_traffic_policy.as_deref(), Some("Local"));
    assert_eq!(standby.ip_family_policy.as_deref(), Some("PreferDualStack"));
    // Taken out of the spec, the affinity goes back to the API server's default.
    let patch = json!({"spec": {"services": {"active": {"sessionAffinity": null}}}});
    f.clusters()
        .patch("vault", &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    wait::until("sessionAffinity back to None", LIMIT, || async {
        let spec = svc.get("vault-active").await?.spec.unwrap_or_default();
        Ok((spec.session_affinity.as_deref() == Some("None")).then_some(()))
    })
    .await?;
    f.endpoints("vault-active", &[0]).await
}

#[tokio::test]
async fn foreign_service_is_left_alone() -> anyhow::Result<()> {
    let f = fixture("foreign", &TRIO, None).await?;
    let svc: Api<Service> = Api::namespaced(f.client.clone(), &f.ns);
    let foreign: Service = serde_json::from_value(
        json!({"metadata": {"name": "vault-active", "labels": {"owner": "someone"}},
        "spec": {"selector": {"app": "other"}, "ports": [{"port": 80}]}}),
    )?;
    svc.create(&PostParams::default(), &foreign).await?;
    f.create("vault", FAST).await?;
    let message = f
        .condition("vault", "Ready", "False", "ServiceConflict")
        .await?;
    assert!(message.contains("vault-active"), "{message}");
    f.event("ServiceConflict").await?;
    let after = svc.get("vault-active").await?;
    assert_eq!(
        after.spec.unwrap().selector.unwrap(),
        BTreeMap::from([("app".to_string(), "other".to_string())])
    );
    f.endpoints("vault-standby", &[1, 2]).await
}

#[tokio::test]
async fn overlapping_selector_is_left_to_the_older_cluster() -> anyhow::Result<()> {
    let f = fixture("overlap", &TRIO, None).await?;
    f.create("first", FAST).await?;
    f.converged_as("first").await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    f.create("second", &format!("{FAST}\nlabelPrefix: other"))
        .await?;
    let message = f
        .condition("second", "SelectorOverlap", "True", "SelectorOverlap")
        .await?;
    assert!(message.contains("vault-0 (first)"), "{message}");
    f.event("SelectorOverlap").await?;
    assert!(
        !f.vault.labels(0).await?.contains_key("other-active"),
        "newer cluster leaves the pod alone"
    );
    // The older cluster goes: the overlap ends, and the condition says so rather than going.
    f.clusters()
        .delete("first", &DeleteParams::default())
        .await?;
    let message = f
        .condition("second", "SelectorOverlap", "False", "NoOverlap")
        .await?;
    assert!(message.contains("no selected pod"), "{message}");
    f.labels(
        "other-active",
        &[Some("true"), Some("false"), Some("false")],
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn deletion_and_unselected_pods_lose_our_labels_only() -> anyhow::Result<()> {
    let f = converged_trio("cleanup").await?;
    let ours = |k: &str| k.starts_with("vault-") || k.starts_with("vault-registrar.dev/");
    // Every label the test expects to go is there first.
    let mine = [
        "vault-active",
        "vault-sealed",
        "vault-initialized",
        "vault-perf-standby",
        "vault-version",
        OWNER_LABEL,
        PREFIX_LABEL,
    ];
    wait::until("vault-2 carrying all of our labels", LIMIT, || async {
        let labels = f.vault.labels(2).await?;
        Ok(mine.iter().all(|k| labels.contains_key(*k)).then_some(()))
    })
    .await?;
    // A pod that stops matching the selector loses every label of ours (the role labels and
    // the ownership labels) while the VaultCluster still exists, and keeps the others.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(f.client.clone(), &f.ns);
    let patch = json!({"metadata": {"labels": {"app.kubernetes.io/name": "retired"}}});
    pods.patch(
        f.vault.pod_name(2),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await?;
    let left = wait::until("vault-2 stripped of our labels", LIMIT, || async {
        let labels = f.vault.labels(2).await?;
        Ok((!labels.keys().any(|k| ours(k))).then_some(labels))
    })
    .await;
    let left = match left {
        Ok(labels) => labels,
        Err(e) => anyhow::bail!("{e}: vault-2 has {:?}", f.vault.labels(2).await?),
    };
    assert_eq!(
        left.get("app.kubernetes.io/name").map(String::as_str),
        Some("retired"),
        "{left:?}"
    );
    assert!(
        f.clusters().get_opt("vault").await?.is_some(),
        "the VaultCluster still exists"
    );
    // The pods still selected keep theirs.
    for i in 0..2 {
        let labels = f.vault.labels(i).await?;
        assert!(
            labels.contains_key(OWNER_LABEL) && labels.contains_key("vault-active"),
            "vault-{i}: {labels:?}"
        );
    }
    f.clusters()
        .delete("vault", &DeleteParams::default())
        .await?;
    f.labels("vault-active", &[None, None, None]).await?;
    for i in 0..3 {
        let labels = f.vault.labels(i).await?;
        assert!(
            labels.keys().all(|k| !k.starts_with("vault-")),
            "{labels:?}"
        );
        assert!(labels.contains_key("app.kubernetes.io/name"));
    }
    let svc: Api<Service> = Api::namespaced(f.client.clone(), &f.ns);
    // The garbage collector learns of a new CRD on its discovery resync (30 s).
    wait::until("Services collected", Duration::from_secs(100), || async {
        Ok(svc.get_opt("vault-active").await?.is_none().then_some(()))
    })
    .await?;
    wait::until("VaultCluster gone", LIMIT, || async {
        Ok(f.clusters().get_opt("vault").await?.is_none().then_some(()))
    })
    .await
}

#[tokio::test]
async fn kubectl_wait_for_ready() -> anyhow::Result<()> {
    let f = fixture("wait", &TRIO, None).await?;
    f.create("vault", FAST).await?;
    // The simulators share this test's runtime: a blocking wait would starve them.
    let mut wait_cmd = shared().kubectl();
    wait_cmd.args([
        "wait",
        "--for=condition=Ready",
        "vc/vault",
        "-n",
        &f.ns,
        "--timeout=60s",
    ]);
    run_blocking(wait_cmd).await?;
    let mut get = shared().kubectl();
    get.args(["get", "vc", "-n", &f.ns]);
    let table = run_blocking(get).await?;
    assert!(
        table.contains("ACTIVE") && table.contains("vault-0") && table.contains("True"),
        "{table}"
    );
    assert!(!table.contains("REASON"), "Reason is for -o wide: {table}");
    let mut get_wide = shared().kubectl();
    get_wide.args(["get", "vc", "-n", &f.ns, "-o", "wide"]);
    let wide = run_blocking(get_wide).await?;
    let header: Vec<&str> = wide
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert!(
        header
            .windows(3)
            .any(|w| w == ["READY", "REASON", "MESSAGE"]),
        "{wide}"
    );
    assert!(
        wide.contains("Ready") && wide.contains("Services in place; vault-0 is active"),
        "{wide}"
    );
    Ok(())
}

#[tokio::test]
async fn invalid_specs_are_rejected_by_the_api_server() -> anyhow::Result<()> {
    install_crd().await?;
    let client = shared().client().await?;
    create_namespace(&client, "e2e-invalid").await?;
    let cases = [
        (
            "empty matchLabels",
            "selector: {matchLabels: {}}",
            "matchLabels must name at least one label",
        ),
        (
            "bad duration",
            "selector: {matchLabels: {a: b}}\nhealth: {interval: soon}",
            "spec.health.interval",
        ),
        (
            "interval too short",
            "selector: {matchLabels: {a: b}}\nhealth: {interval: 100ms, timeout: 50ms}",
            "interval must be at least 200ms",
        ),
        (
            "timeout not below interval",
            "selector: {matchLabels: {a: b}}\nhealth: {interval: 1s, timeout: 1s}",
            "timeout must be less than interval",
        ),
        (
            "port out of range",
            "selector: {matchLabels: {a: b}}\nhealth: {port: 70000}",
            "spec.health.port",
        ),
        (
            "service port out of range",
            "selector: {matchLabels: {a: b}}\nservices: {ports: [{name: x, port: 0}]}",
            "spec.services.ports[0].port",
        ),
        (
            "duplicate port names",
            "selector: {matchLabels: {a: b}}\nservices: {ports: [{name: x, port: 1}, {name: x, port: 2}]}",
            "Duplicate value",
        ),
        (
            "unknown scheme",
            "selector: {matchLabels: {a: b}}\nhealth: {scheme: ftp}",
            "spec.health.scheme",
        ),
        ("missing selector", "labelPrefix: vault", "spec.selector"),
        (
            "interval too long",
            "selector: {matchLabels: {a: b}}\nhealth: {interval: 6m}",
            "interval must be at most 5m",
        ),
        (
            "timeout too long",
            "selector: {matchLabels: {a: b}}\nhealth: {interval: 2m, timeout: 31s}",
            "timeout must be at most 30s",
        ),
        (
            "unknown serverName placeholder",
            "selector: {matchLabels: {a: b}}\nhealth: {scheme: https, tls: {serverName: '{pod_name}.vault-internal'}}",
            "serverName must be a lower-case DNS name",
        ),
        (
            "CA bundle named twice",
            "selector: {matchLabels: {a: b}}\nhealth: {scheme: https, tls: {caConfigMapRef: {name: ca}, caSecretRef: {name: ca}}}",
            "set caConfigMapRef or caSecretRef, not both",
        ),
        (
            "serverName not a DNS name",
            "selector: {matchLabels: {a: b}}\nhealth: {scheme: https, tls: {serverName: 'Vault_0'}}",
            "serverName must be a lower-case DNS name",
        ),
        (
            "externalTrafficPolicy on a ClusterIP Service",
            "selector: {matchLabels: {a: b}}\nservices: {active: {enabled: true, externalTrafficPolicy: Local}}",
            "externalTrafficPolicy applies to NodePort and LoadBalancer Services only",
        ),
        (
            "loadBalancerSourceRanges on a NodePort Service",
            "selector: {matchLabels: {a: b}}\nservices: {active: {enabled: true, type: NodePort, loadBalancerSourceRanges: [10.0.0.0/8]}}",
            "loadBalancerSourceRanges applies to LoadBalancer Services only",
        ),
        (
            "a source range that is not a CIDR",
            "selector: {matchLabels: {a: b}}\nservices: {active: {enabled: true, type: LoadBalancer, loadBalancerSourceRanges: [everywhere]}}",
            "spec.services.active.loadBalancerSourceRanges[0]",
        ),
        (
            "an address family twice",
            "selector: {matchLabels: {a: b}}\nservices: {active: {enabled: true, ipFamilies: [IPv4, IPv4]}}",
            "ipFamilies may not name a family twice",
        ),
        (
            "unknown sessionAffinity",
            "selector: {matchLabels: {a: b}}\nservices: {standby: {enabled: true, sessionAffinity: Sticky}}",
            "spec.services.standby.sessionAffinity",
        ),
        (
            "more pods per upgrade step than raft clusters allow",
            "selector: {matchLabels: {a: b}}\nupgrade: {strategy: RoleOrdered, maxUnavailable: 4}",
            "spec.upgrade.maxUnavailable",
        ),
        (
            "name with a dot",
            "name=vault.prod\nselector: {matchLabels: {a: b}}",
            "metadata.name must be a DNS label of at most 50 characters",
        ),
        (
            "name too long for the Services",
            "name=vault-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\nselector: {matchLabels: {a: b}}",
            "metadata.name must be a DNS label of at most 50 characters",
        ),
    ];
    for (name, spec, expected) in cases {
        // A first line "name=..." sets metadata.name; "bad" otherwise.
        let (object, spec) = match spec.split_once('\n') {
            Some((first, rest)) if first.starts_with("name=") => (&first[5..], rest),
            _ => ("bad", spec),
        };
        let yaml = format!(
            "apiVersion: vault-registrar.dev/v1alpha1\nkind: VaultCluster\nmetadata: {{name: {object}, namespace: e2e-invalid}}\nspec:\n  {}\n",
            spec.replace('\n', "\n  ")
        );
        let file = shared().dir().join("invalid.yaml");
        std::fs::write(&file, yaml)?;
        let out = shared()
            .kubectl()
            .args(["create", "--dry-run=server", "-f"])
            .arg(&file)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: accepted");
        assert!(stderr.contains(expected), "{name}: server said {stderr}");
    }
    Ok(())
}

/// The operator's event recorder on the real API server: a repeat is the first event's
/// series (the events.k8s.io validation takes the patch), another note is another event,
/// and a repeat of an event that is gone is created again.
#[tokio::test]
async fn a_repeated_event_is_counted_on_the_first_and_a_lost_one_is_created_again()
-> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use vault_registrar::recorder::Recorder;
    use vault_registrar::status::Notice;
    let client = shared().client().await?;
    let ns = "e2e-events";
    create_namespace(&client, ns).await?;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let mut map = ConfigMap::default();
    map.metadata.name = Some("regarded".into());
    let map = maps.create(&PostParams::default(), &map).await?;
    let recorder = Recorder::new(client.clone(), "vault-registrar", None);
    let notice = |note: &str| Notice {
        warning: false,
        reason: "ActiveChanged",
        message: note.into(),
        pod: Some("vault-1".into()),
    };
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let listed = || async {
        let mut items = events.list(&ListParams::default()).await?.items;
        // Named by the time in nanoseconds, in hexadecimal of one length: oldest first.
        items.sort_by_key(|e| e.metadata.name.clone());
        anyhow::Ok(items)
    };
    recorder
        .publish(&map, &notice("from vault-0 to vault-1"))
        .await?;
    recorder
        .publish(&map, &notice("from vault-0 to vault-1"))
        .await?;
    let list = listed().await?;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].series.as_ref().map(|s| s.count), Some(2));
    assert_eq!(
        list[0].regarding.as_ref().and_then(|r| r.uid.clone()),
        map.metadata.uid
    );
    assert_eq!(
        list[0].related.as_ref().and_then(|r| r.name.as_deref()),
        Some("vault-1")
    );
    recorder
        .publish(&map, &notice("from vault-2 to vault-1"))
        .await?;
    let list = listed().await?;
    assert_eq!(list.len(), 2, "another note is another event: {list:?}");
    let first = list[0].metadata.name.clone().unwrap_or_default();
    events.delete(&first, &DeleteParams::default()).await?;
    recorder
        .publish(&map, &notice("from vault-0 to vault-1"))
        .await?;
    let list = listed().await?;
    let notes: Vec<_> = list
        .iter()
        .map(|e| (e.note.clone(), e.series.is_some()))
        .collect();
    assert_eq!(list.len(), 2, "{notes:?}");
    assert!(
        list.iter()
            .any(|e| e.note.as_deref() == Some("from vault-0 to vault-1") && e.series.is_none()),
        "the lost event is created again, as a new one: {notes:?}"
    );
    Ok(())
}
