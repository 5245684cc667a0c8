//! Fail safe, end to end: faults of the operator's surroundings injected on the real control
//! plane (a cut network path, a refused write, a refused read, a replaced pod, a starving
//! neighbour) must never empty or misroute the active Service, and the status must tell the
//! truth and then go quiet. Writes are counted from the API server's audit log.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use vault_registrar::crd::VaultCluster;
use vault_registrar_testkit::api_relay::{ApiRelay, pod_list};
use vault_registrar_testkit::cluster::{SimCluster, endpoint_ips, wait_endpoints};
use vault_registrar_testkit::netns::PathCut;
use vault_registrar_testkit::pods::{set_running, start_pod};
use vault_registrar_testkit::stage::run_blocking;
use vault_registrar_testkit::vault_sim::{Behavior, Role};
use vault_registrar_testkit::{shared, wait};

/// Write requests to the namespace's objects during `window`, from the audit log.
async fn writes_during(ns: &str, window: Duration) -> Vec<(String, String, String, String, i64)> {
    let before = shared().writes_in_async(ns).await.len();
    tokio::time::sleep(window).await;
    shared().writes_in_async(ns).await.split_off(before)
}

async fn events(f: &Fixture, reason: &str) -> anyhow::Result<Vec<Event>> {
    let api: Api<Event> = Api::namespaced(f.client.clone(), &f.ns);
    let list = api.list(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect())
}

async fn create_vc(client: &kube::Client, ns: &str, name: &str, spec: &str) -> anyhow::Result<()> {
    let yaml = format!(
        "apiVersion: vault-registrar.dev/v1alpha1\nkind: VaultCluster\nmetadata: {{name: {name}}}\nspec:\n  {}\n",
        spec.replace('\n', "\n  ")
    );
    let vc: VaultCluster = serde_yaml::from_str(&yaml)?;
    let api: Api<VaultCluster> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &vc).await?;
    Ok(())
}

/// Case 1: every pod sealed, as after a full restart. The active pod is cleared from the
/// status, one event says so, and then the operator sends nothing at all.
#[tokio::test]
async fn all_sealed_clears_the_active_pod_and_goes_quiet() -> anyhow::Result<()> {
    let f = converged_trio("fs-sealed").await?;
    f.condition("vault", "Ready", "True", "Ready").await?;
    for i in 0..3 {
        f.set(i, Role::Sealed).await;
    }
    f.labels("vault-sealed", &[Some("true"); 3]).await?;
    f.endpoints("vault-active", &[]).await?;
    wait::until("status without an active pod", LIMIT, || async {
        let status = f.clusters().get("vault").await?.status.unwrap_or_default();
        Ok((status.active_pod.is_none() && status.sealed == 3).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = writes_during(&f.ns, Duration::from_secs(10)).await;
    assert!(
        writes.is_empty(),
        "writes with every pod sealed: {writes:?}"
    );
    let to_none: Vec<Event> = events(&f, "ActiveChanged")
        .await?
        .into_iter()
        .filter(|e| e.note.as_deref() == Some("active pod changed from vault-0 to none"))
        .collect();
    assert_eq!(to_none.len(), 1, "{to_none:?}");
    assert!(
        to_none[0].series.as_ref().is_none_or(|s| s.count <= 1),
        "repeated: {:?}",
        to_none[0].series
    );
    Ok(())
}

/// Case 2: configuration errors are spec problems. The schema refuses a serverName typo; a
/// CA bundle that is not PEM (which no schema can see) sets Ready=False/InvalidSpec naming
/// the field, and no label moves while it lasts.
#[tokio::test]
async fn configuration_errors_hold_labels_and_say_invalid_spec() -> anyhow::Result<()> {
    let (ca, tls) = tls_for(&TRIO_NAMES)?;
    let f = fixture("fs-spec", &TRIO, Some(tls)).await?;
    let secrets = f.ca_secret(&ca).await?;
    f.create("vault", HTTPS).await?;
    f.converged().await?;
    f.condition("vault", "Ready", "True", "Ready").await?;

    let typo = json!({"spec": {"health": {"tls": {"serverName": "{pod_name}.vault-internal"}}}});
    let refused = f
        .clusters()
        .patch("vault", &PatchParams::default(), &Patch::Merge(typo))
        .await
        .expect_err("the schema must refuse an unknown placeholder");
    assert!(
        refused
            .to_string()
            .contains("serverName must be a lower-case DNS name"),
        "{refused}"
    );

    // A CA Secret holding no certificate, which no schema can see. The CA is read again
    // when the spec changes: point the VaultCluster at it.
    let broken: Secret = serde_json::from_value(
        json!({"metadata": {"name": "vault-ca-broken"}, "stringData": {"ca.crt": "not a certificate"}}),
    )?;
    secrets.create(&PostParams::default(), &broken).await?;
    let point = |secret: &str| {
        Patch::Merge(json!({"spec": {"health": {"tls": {"caSecretRef": {"name": secret}}}}}))
    };
    f.clusters()
        .patch("vault", &PatchParams::default(), &point("vault-ca-broken"))
        .await?;
    let message = f
        .condition("vault", "Ready", "False", "InvalidSpec")
        .await?;
    assert!(message.starts_with("spec.health.tls"), "{message}");
    f.active_holds(0, Duration::from_secs(3)).await?;
    f.labels(
        "vault-active",
        &[Some("true"), Some("false"), Some("false")],
    )
    .await?;
    f.condition("vault", "Available", "True", "ActivePod")
        .await?;
    assert!(
        events(&f, "ActiveChanged").await?.iter().all(|e| !e
            .note
            .as_deref()
            .unwrap_or_default()
            .ends_with("to none")),
        "a spec problem is not a lost active pod"
    );
    let writes = writes_during(&f.ns, Duration::from_secs(3)).await;
    assert!(
        writes.is_empty(),
        "writes while the spec is invalid: {writes:?}"
    );

    f.clusters()
        .patch("vault", &PatchParams::default(), &point("vault-ca"))
        .await?;
    f.condition("vault", "Ready", "True", "Ready").await?;
    Ok(())
}

/// A selector requirement with an operator kube's Selector cannot read (the schema of
/// LabelSelectorRequirement leaves it a free string) is a spec problem naming the field:
/// the labels are held, not dropped as if the selector selected nothing.
#[tokio::test]
async fn unknown_selector_operator_is_a_spec_problem() -> anyhow::Result<()> {
    let f = converged_trio("fs-operator").await?;
    let expressions = |operator: &str| {
        Patch::Merge(json!({"spec": {"selector": {"matchExpressions": [
            {"key": "app.kubernetes.io/name", "operator": operator, "values": ["vault"]}
        ]}}}))
    };
    f.clusters()
        .patch("vault", &PatchParams::default(), &expressions("Gt"))
        .await?;
    let message = f
        .condition("vault", "Ready", "False", "InvalidSpec")
        .await?;
    assert!(
        message.starts_with("spec.selector.matchExpressions[0].operator: \"Gt\""),
        "{message}"
    );
    f.active_holds(0, Duration::from_secs(2)).await?;
    f.labels(
        "vault-active",
        &[Some("true"), Some("false"), Some("false")],
    )
    .await?;
    f.clusters()
        .patch("vault", &PatchParams::default(), &expressions("In"))
        .await?;
    f.condition("vault", "Ready", "True", "Ready").await?;
    Ok(())
}

/// Case 3: the operator loses its path to every pod while Kubernetes reports them Ready.
/// It holds the labels and says so; a pod Kubernetes reports not Ready is still shut down.
#[tokio::test]
async fn cut_off_operator_holds_labels() -> anyhow::Result<()> {
    let f = converged_trio("fs-cut").await?;
    let ips: Vec<Ipv4Addr> = f.vault.members.iter().map(|m| m.pod.ip).collect();
    let cut = PathCut::new(&ips)?;
    // Three times failureThreshold × interval (2 × 500ms), and more.
    f.active_holds(0, Duration::from_secs(4)).await?;
    let message = f
        .condition("vault", "Degraded", "True", "ProbesFailing")
        .await?;
    assert!(message.contains("no answer within"), "{message}");
    f.event("ProbesFailing").await?;
    f.condition("vault", "Available", "True", "ActiveHeld")
        .await?;

    set_running(&f.client, &f.ns, &f.vault.members[2].pod, false).await?;
    f.labels(
        "vault-sealed",
        &[Some("false"), Some("false"), Some("true")],
    )
    .await?;
    f.active_holds(0, Duration::from_secs(1)).await?;

    drop(cut);
    f.event("ProbesAnswered").await?;
    f.condition("vault", "Available", "True", "ActivePod")
        .await?;
    f.labels(
        "vault-sealed",
        &[Some("false"), Some("false"), Some("false")],
    )
    .await?;
    Ok(())
}

/// Case 4: two clusters with the same matchLabels, split by matchExpressions. Each active
/// Service reaches only its own cluster's active pod.
#[tokio::test]
async fn clusters_split_by_expressions_route_only_their_own_pods() -> anyhow::Result<()> {
    let ns = "fs-split";
    let client = namespace(ns).await?;
    let mut clusters = Vec::new();
    for name in ["a", "b"] {
        let vault =
            SimCluster::start_labelled(&client, ns, name, &TRIO, None, &[("instance", name)])
                .await?;
        clusters.push(vault);
    }
    let _operator = operator(ns, None, &[])?;
    for name in ["a", "b"] {
        let spec = format!(
            "selector: {{matchLabels: {{app.kubernetes.io/name: vault}}, matchExpressions: [{{key: instance, operator: In, values: [{name}]}}]}}\n{FAST}"
        );
        create_vc(&client, ns, name, &spec).await?;
    }
    for (name, vault) in ["a", "b"].iter().zip(&clusters) {
        let active = [vault.ip(0)];
        let standby = [vault.ip(1), vault.ip(2)];
        wait_endpoints(&client, ns, &format!("{name}-active"), &active, LIMIT).await?;
        wait_endpoints(&client, ns, &format!("{name}-standby"), &standby, LIMIT).await?;
        let labels = vault.labels(0).await?;
        assert_eq!(
            labels
                .get("vault-registrar.dev/cluster")
                .map(String::as_str),
            Some(*name)
        );
    }
    // Stable, not a moment's luck.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (name, vault) in ["a", "b"].iter().zip(&clusters) {
        let got = endpoint_ips(&client, ns, &format!("{name}-active")).await?;
        assert_eq!(got, [vault.ip(0)], "{name}-active");
    }
    Ok(())
}

/// Case 5: a round whose write is refused publishes a status that says so, never a stale
/// Ready=True, and never promotes after a demotion that did not land.
#[tokio::test]
async fn refused_write_is_reported_and_nothing_is_promoted() -> anyhow::Result<()> {
    let f = converged_trio("fs-refused").await?;
    f.condition("vault", "Ready", "True", "Ready").await?;
    let policy = format!("fs-refuse-labels-{}", f.ns);
    let yaml = format!(
        "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicy\nmetadata: {{name: {policy}}}\nspec:\n  failurePolicy: Fail\n  matchConstraints:\n    namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}\n    resourceRules: [{{apiGroups: [''], apiVersions: [v1], operations: [UPDATE], resources: [pods]}}]\n  validations:\n  - expression: \"object.metadata.labels == oldObject.metadata.labels\"\n    message: label writes refused by the test\n---\napiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicyBinding\nmetadata: {{name: {policy}}}\nspec: {{policyName: {policy}, validationActions: [Deny]}}\n",
        ns = f.ns
    );
    let file = shared().dir().join(format!("{policy}.yaml"));
    std::fs::write(&file, yaml)?;
    let mut apply = shared().kubectl();
    apply.args(["apply", "-f"]).arg(&file);
    run_blocking(apply).await?;
    // The policy takes effect once the API server has loaded it: probe with a test label.
    let pods: Api<Pod> = Api::namespaced(f.client.clone(), &f.ns);
    let attempt = std::sync::atomic::AtomicU32::new(0);
    wait::until("label writes refused", LIMIT, || async {
        // A new value each time: a write that changes nothing is not refused.
        let n = attempt.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let probe = json!({"metadata": {"labels": {"fs-probe": n.to_string()}}});
        let refused = pods
            .patch(
                f.vault.pod_name(2),
                &PatchParams::default(),
                &Patch::Merge(probe),
            )
            .await
            .is_err();
        Ok(refused.then_some(()))
    })
    .await?;

    f.set(0, Role::Standby).await;
    f.set(1, Role::Active).await;
    let message = f
        .condition("vault", "Ready", "False", "WriteFailed")
        .await?;
    assert!(
        message.contains("vault-0") && message.contains("refused by the test"),
        "{message}"
    );
    // The demotion of vault-0 was refused, so vault-1 must not be promoted beside it.
    f.labels(
        "vault-active",
        &[Some("true"), Some("false"), Some("false")],
    )
    .await?;
    f.endpoints("vault-active", &[0]).await?;

    let mut delete = shared().kubectl();
    delete.args(["delete", "-f"]).arg(&file);
    run_blocking(delete).await?;
    f.labels(
        "vault-active",
        &[Some("false"), Some("true"), Some("false")],
    )
    .await?;
    f.condition("vault", "Ready", "True", "Ready").await?;
    Ok(())
}

/// Case 6: a cluster whose every pod hangs cannot starve another cluster's probes.
#[tokio::test]
async fn a_hanging_cluster_cannot_starve_the_others() -> anyhow::Result<()> {
    let ns = "fs-fair";
    let client = namespace(ns).await?;
    let slow = SimCluster::start_labelled(
        &client,
        ns,
        "slow",
        &[Role::Standby; 12],
        None,
        &[("tier", "slow")],
    )
    .await?;
    for i in 0..12 {
        slow.sim(i).update(|s| s.behavior = Behavior::Hang).await;
    }
    let fast =
        SimCluster::start_labelled(&client, ns, "fast", &TRIO, None, &[("tier", "fast")]).await?;
    // A pool of 8: one cluster may hold at most 2 of them.
    let _operator = operator(ns, None, &["--probe-concurrency", "8"])?;
    create_vc(
        &client,
        ns,
        "slow",
        "selector: {matchLabels: {tier: slow}}\nhealth: {interval: 2s, timeout: 1500ms}",
    )
    .await?;
    create_vc(
        &client,
        ns,
        "fast",
        &format!("selector: {{matchLabels: {{tier: fast}}}}\n{FAST}"),
    )
    .await?;
    wait_endpoints(&client, ns, "fast-active", &[fast.ip(0)], LIMIT).await?;
    let count = || (0..3).map(|i| fast.sim(i).health_requests()).sum::<u64>();
    let before = count();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let probes = count() - before;
    // Interval 500ms over 4 s is 8 rounds of 3 probes; starved, it is a handful.
    assert!(probes >= 15, "the fast cluster got {probes} probes in 4 s");
    assert!(
        slow.sim(0).health_requests() > 0,
        "the slow cluster is probed too"
    );
    Ok(())
}

/// Case 6b: a tenant's namespace of many VaultClusters whose every pod accepts the
/// connection and never answers, for the longest timeout the schema allows (30 s), does
/// not delay another namespace's failover: the probe slots are shared between namespaces,
/// not only between clusters. Without that, eight such clusters hold all eight slots
/// (two each) and the queue behind them, and the other namespace's probes find no slot
/// within their 300 ms for half a minute at a time.
#[tokio::test]
async fn a_hanging_namespace_cannot_delay_another_namespaces_failover() -> anyhow::Result<()> {
    let (hog, ns) = ("fs-fair-hog", "fs-fair-calm");
    let hog_client = namespace(hog).await?;
    let client = namespace(ns).await?;
    let vault = SimCluster::start(&client, ns, "vault", &TRIO, None).await?;
    let operator = operator(&format!("{hog},{ns}"), None, &["--probe-concurrency", "8"])?;
    let f = Fixture {
        client,
        ns: ns.into(),
        vault,
        operator,
    };
    f.create("vault", FAST).await?;
    f.converged().await?;
    let mut hung = Vec::new();
    for c in 0..8 {
        let name = format!("h{c}");
        let pods = SimCluster::start_labelled(
            &hog_client,
            hog,
            &name,
            &[Role::Standby; 3],
            None,
            &[("tier", name.as_str())],
        )
        .await?;
        for i in 0..3 {
            pods.sim(i).update(|s| s.behavior = Behavior::Hang).await;
        }
        let spec = format!(
            "selector: {{matchLabels: {{tier: {name}}}}}\nhealth: {{interval: 40s, timeout: 30s}}"
        );
        create_vc(&hog_client, hog, &name, &spec).await?;
        hung.push(pods);
    }
    let in_flight = || {
        hung.iter()
            .flat_map(|c| (0..3).map(move |i| c.sim(i).health_requests()))
            .sum::<u64>()
    };
    wait::until("the hog's probes hanging", LIMIT, || async {
        Ok((in_flight() >= 4).then_some(()))
    })
    .await?;
    // Let the hog's clusters all come round and queue for slots.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    f.set(0, Role::Standby).await;
    f.set(1, Role::Active).await;
    let bound = Duration::from_secs(10);
    let routed = wait_endpoints(&f.client, ns, "vault-active", &[f.vault.ip(1)], bound).await;
    let took = started.elapsed();
    println!(
        "failover routed after {took:?} beside {} hung probes of {hog}",
        in_flight()
    );
    routed?;
    f.labels(
        "vault-active",
        &[Some("false"), Some("true"), Some("false")],
    )
    .await?;
    Ok(())
}

/// Case 7: a pod replaced under the same name between a round's observation and its write
/// does not receive the labels meant for the pod it replaced.
#[tokio::test]
async fn replaced_pod_does_not_inherit_labels() -> anyhow::Result<()> {
    let f = fixture("fs-uid", &TRIO, None).await?;
    // vault-2 will hang for the whole timeout, holding the round between observe and act.
    f.create(
        "vault",
        "health: {interval: 5s, timeout: 4s, failureThreshold: 2}",
    )
    .await?;
    f.converged().await?;
    f.set(1, Role::Sealed).await;
    let before = f.vault.sim(2).health_requests();
    f.behave(2, Behavior::Hang).await;
    wait::until("a round probing the hanging pod", LIMIT, || async {
        Ok((f.vault.sim(2).health_requests() > before).then_some(()))
    })
    .await?;
    let started = Instant::now();
    let pods: Api<Pod> = Api::namespaced(f.client.clone(), &f.ns);
    let old_uid = f.vault.pod(1).await?.metadata.uid;
    pods.delete(
        f.vault.pod_name(1),
        &DeleteParams::default().grace_period(0),
    )
    .await?;
    wait::until("old vault-1 gone", LIMIT, || async {
        Ok(pods
            .get_opt(f.vault.pod_name(1))
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    start_pod(&f.client, &f.ns, &f.vault.members[1].pod).await?;
    assert_ne!(f.vault.pod(1).await?.metadata.uid, old_uid);
    // The round acts when the hang times out (4 s after it started); the next round acts 4 s
    // after that. Until then the new pod must carry none of our labels.
    while started.elapsed() < Duration::from_secs(6) {
        let labels = f.vault.labels(1).await?;
        assert!(
            !labels.contains_key("vault-sealed"),
            "the replacement got the old pod's labels: {labels:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused: Vec<_> = shared()
        .writes_in_async(&f.ns)
        .await
        .into_iter()
        // The API server refuses a patch whose UID differs: metadata.uid is immutable.
        .filter(|w| w.2 == "pods" && w.3 == "vault-1" && w.1 == "patch" && w.4 == 422)
        .collect();
    assert!(!refused.is_empty(), "the stale write was sent and refused");
    f.behave(2, Behavior::Serve).await;
    f.labels(
        "vault-sealed",
        &[Some("false"), Some("true"), Some("false")],
    )
    .await?;
    Ok(())
}

/// Case 8: an API error reading the CA Secret (here: the permission revoked for a while)
/// is not a spec problem: Ready does not flap, no label moves, and the bundle read before
/// keeps the probes going.
#[tokio::test]
async fn secret_read_error_is_retried_without_touching_the_status() -> anyhow::Result<()> {
    let plane = shared();
    let ns = "fs-secret";
    let client = namespace(ns).await?;
    let (ca, tls) = tls_for(&["vault.example"])?;
    let vault = SimCluster::start(&client, ns, "vault", &TRIO, Some(tls)).await?;
    let all = "[{apiGroups: ['*'], resources: ['*'], verbs: ['*']}]";
    let no_secrets = "[{apiGroups: ['', events.k8s.io, discovery.k8s.io, vault-registrar.dev], resources: [pods, services, events, endpointslices, vaultclusters, vaultclusters/status, vaultclusters/finalizers], verbs: ['*']}]";
    let role = |rules: &str| {
        format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: operator, namespace: {ns}}}\nrules: {rules}\n"
        )
    };
    let apply = |yaml: String, file: &str| {
        let path = plane.dir().join(file);
        let mut cmd = plane.kubectl();
        cmd.args(["apply", "-f"]).arg(&path);
        async move {
            std::fs::write(&path, yaml)?;
            run_blocking(cmd).await
        }
    };
    apply(
        format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: operator, namespace: {ns}}}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: operator, namespace: {ns}}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: operator}}\nsubjects: [{{kind: ServiceAccount, name: operator, namespace: {ns}}}]\n---\n{}",
            role(all)
        ),
        "fs-secret-rbac.yaml",
    )
    .await?;
    let mut token = plane.kubectl();
    token.args(["create", "token", "operator", "-n", ns, "--duration=1h"]);
    let kubeconfig =
        plane.token_kubeconfig("fs-secret-operator", run_blocking(token).await?.trim())?;
    let operator = operator(ns, Some(&kubeconfig), &[])?;
    let f = Fixture {
        client: client.clone(),
        ns: ns.into(),
        vault,
        operator,
    };
    f.ca_secret(&ca).await?;
    f.create("vault", "health: {scheme: https, interval: 500ms, timeout: 300ms, tls: {caSecretRef: {name: vault-ca}, serverName: vault.example}}").await?;
    f.converged().await?;
    f.condition("vault", "Ready", "True", "Ready").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    apply(role(no_secrets), "fs-secret-role.yaml").await?;
    // A spec change makes the operator read the CA again.
    let threshold = json!({"spec": {"health": {"failureThreshold": 3}}});
    f.clusters()
        .patch("vault", &PatchParams::default(), &Patch::Merge(threshold))
        .await?;
    wait::until("the operator refused the Secret", LIMIT, || async {
        Ok(f.operator
            .log_text()
            .contains(r#"secrets "vault-ca" is forbidden"#)
            .then_some(()))
    })
    .await?;
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        let status = f.clusters().get("vault").await?.status.unwrap_or_default();
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
        assert_eq!(ready.map(|c| c.reason.as_str()), Some("Ready"), "{ready:?}");
        assert_eq!(status.active_pod.as_deref(), Some("vault-0"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f.active_holds(0, Duration::from_millis(500)).await?;
    assert!(events(&f, "InvalidSpec").await?.is_empty());
    // The bundle read before still verifies the pods: the new spec took effect.
    wait::until("status of the new generation", LIMIT, || async {
        let vc = f.clusters().get("vault").await?;
        let observed = vc.status.and_then(|s| s.observed_generation);
        Ok((observed == vc.metadata.generation).then_some(()))
    })
    .await?;

    apply(role(all), "fs-secret-role.yaml").await?;
    f.fail_over_to(1).await
}

/// Upgrading from the version that marked ownership with an annotation: the pods get the
/// ownership label first, the Service selectors only afterwards, so the active Service never
/// stands empty for a moment.
#[tokio::test]
async fn upgrade_to_the_ownership_label_never_empties_the_active_service() -> anyhow::Result<()> {
    let ns = "fs-upgrade";
    let client = namespace(ns).await?;
    let vault = SimCluster::start(&client, ns, "vault", &TRIO, None).await?;
    create_vc(
        &client,
        ns,
        "vault",
        &format!("selector: {{matchLabels: {{app.kubernetes.io/name: vault}}}}\n{FAST}"),
    )
    .await?;
    let vcs: Api<VaultCluster> = Api::namespaced(client.clone(), ns);
    let uid = vcs.get("vault").await?.metadata.uid.unwrap();
    // What the previous version left: role labels, the ownership annotation, and Services
    // selecting on matchLabels and roles only.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    for i in 0..3 {
        let active = if i == 0 { "true" } else { "false" };
        let patch = json!({"metadata": {
            "labels": {"vault-active": active, "vault-initialized": "true", "vault-perf-standby": "false", "vault-sealed": "false", "vault-version": "1.17.2"},
            "annotations": {"vault-registrar.dev/cluster": "vault"},
        }});
        pods.patch(
            vault.pod_name(i),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await?;
    }
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), ns);
    for (name, roles) in [
        ("vault-active", json!({"vault-active": "true"})),
        (
            "vault-standby",
            json!({"vault-active": "false", "vault-sealed": "false"}),
        ),
    ] {
        let mut selector = roles;
        selector["app.kubernetes.io/name"] = json!("vault");
        let svc = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "vault-registrar", "vault-registrar.dev/cluster": "vault"},
                "ownerReferences": [{"apiVersion": "vault-registrar.dev/v1alpha1", "kind": "VaultCluster", "name": "vault", "uid": uid, "controller": true}]},
            "spec": {"selector": selector, "publishNotReadyAddresses": false,
                "ports": [{"name": "http", "port": 8200, "targetPort": 8200}, {"name": "internal", "port": 8201, "targetPort": 8201}]},
        }))?;
        services.create(&PostParams::default(), &svc).await?;
    }
    wait_endpoints(&client, ns, "vault-active", &[vault.ip(0)], LIMIT).await?;

    // The new operator's first pod LIST answered 3 s late: a round on the VaultCluster
    // list alone saw "every pod owned" over no pods and switched the selectors at once.
    let relay = ApiRelay::start(shared()).await?;
    relay.hold(pod_list, Duration::from_secs(3), 1);
    let _operator = operator(ns, Some(&relay.kubeconfig("upgrade")?), &[])?;
    let owner = "vault-registrar.dev/cluster";
    let mut migrated = None;
    let start = Instant::now();
    // Watched 5 s past the switch: the EndpointSlice controller can lag that long under
    // load.
    while migrated.is_none_or(|at: Instant| at.elapsed() < Duration::from_secs(5)) {
        anyhow::ensure!(start.elapsed() < LIMIT, "no migration within {LIMIT:?}");
        let endpoints = endpoint_ips(&client, ns, "vault-active").await?;
        assert_eq!(
            endpoints,
            [vault.ip(0)],
            "active Service during the upgrade"
        );
        if migrated.is_none() {
            let selector = services
                .get("vault-active")
                .await?
                .spec
                .unwrap()
                .selector
                .unwrap();
            let pod = pods.get(vault.pod_name(0)).await?;
            let labelled = pod
                .metadata
                .labels
                .unwrap_or_default()
                .get(owner)
                .map(String::as_str)
                == Some("vault");
            let annotated = pod
                .metadata
                .annotations
                .unwrap_or_default()
                .contains_key(owner);
            if selector.contains_key(owner) && labelled && !annotated {
                migrated = Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(relay.held(), 1, "the pod LIST was not held");
    Ok(())
}
