//! The chart run for real: a node (kubelet, containerd, CNI, kube-proxy) beside the control
//! plane runs the operator from the image built here, installed as README says, with Vault
//! simulator pods as real pods beside it.
//!
//! One node per machine: the tests take turns (the machine lock), each with a node of its
//! own that it tears down.

use std::path::Path;

use anyhow::Context;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use vault_registrar_testkit::cluster::{endpoint_ips, wait_endpoints};
use vault_registrar_testkit::election::http_get_at;
use vault_registrar_testkit::image::{self, operator_image};
use vault_registrar_testkit::machine::{Machine, MachineLock};
use vault_registrar_testkit::node::{NODE_NAME, NodePlane, machine_before_a_node};
use vault_registrar_testkit::release::{self, NAMESPACE, Replica, VAULT_PORT};
use vault_registrar_testkit::stage::run;
use vault_registrar_testkit::wait;

const LIMIT: Duration = Duration::from_secs(60);
/// The chart's default leaseDuration and retryPeriod.
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RETRY_PERIOD: Duration = Duration::from_secs(2);
/// A handover through the release path: SIGTERM, the Lease released, the follower's watch.
const RELEASED_HANDOVER: Duration = Duration::from_secs(3);

/// The operator binary the image is built from: this build's, or the one
/// `VAULT_REGISTRAR_OPERATOR_BIN` names (a mutated or older build).
fn bin() -> &'static Path {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var_os("VAULT_REGISTRAR_OPERATOR_BIN")
            .map(Into::into)
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_vault-registrar").into())
    })
}

/// Tests of this binary take turns on the node (the machine lock does so across processes;
/// this also keeps a test's before/after record of the machine free of another's node).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn start_node() -> anyhow::Result<NodePlane> {
    let started = Instant::now();
    let node = NodePlane::start(bin())?;
    println!(
        "node Ready {:?} after the kubelet started; {:?} in all (images built once per process in {:?}); RSS MiB: kubelet {:?}, containerd {:?}",
        node.ready_after,
        started.elapsed(),
        node.images.took,
        node.rss_mib("kubelet"),
        node.rss_mib("containerd"),
    );
    Ok(node)
}

#[test]
fn the_image_has_the_dockerfile_layout_user_entrypoint_and_no_shell() -> anyhow::Result<()> {
    let _turn = TURN.blocking_lock();
    let images = {
        let _lock = MachineLock::acquire()?;
        image::built(bin())?
    };
    let dockerfile = std::fs::read_to_string(image::dockerfile())?;
    let base = image::runtime_base(&dockerfile).expect("the Dockerfile has a FROM line");
    image::check_debian_release(&base)?;
    let stage = image::runtime_stage(&dockerfile).unwrap();
    let directive = |name: &str| {
        stage
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(str::trim)
            .unwrap_or_else(|| panic!("the Dockerfile's runtime stage has no {name}"))
            .to_string()
    };
    let config = &images.operator.config;
    println!("{}: {config}", images.operator.name);
    assert_eq!(config["User"], directive("USER"), "user");
    assert_eq!(config["User"], "65532:65532");
    let entrypoint: serde_json::Value = serde_json::from_str(&directive("ENTRYPOINT"))?;
    assert_eq!(config["Entrypoint"], entrypoint, "entrypoint");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/vault-registrar"])
    );
    let cmd: serde_json::Value = serde_json::from_str(&directive("CMD"))?;
    assert_eq!(config["Cmd"], cmd, "cmd");
    let port = format!("{}/tcp", directive("EXPOSE"));
    assert!(
        config["ExposedPorts"].get(&port).is_some(),
        "port {port} not exposed"
    );
    let files = &images.operator.files;
    assert!(files.contains("/vault-registrar"), "no binary in {files:?}");
    for shell in ["/bin/sh", "/bin/bash", "/usr/bin/sh", "/bin/busybox"] {
        assert!(!files.contains(shell), "the image holds a shell: {shell}");
    }
    assert!(
        files.contains("/etc/passwd") && files.contains("/home/nonroot"),
        "no nonroot user in {files:?}"
    );
    println!(
        "{} files: {:?}",
        files.len(),
        files.iter().take(40).collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn a_panicking_test_leaves_the_machine_as_it_found_it() -> anyhow::Result<()> {
    let _turn = TURN.blocking_lock();
    let before = machine_before_a_node(bin())?;
    let dir = std::sync::Mutex::new(None);
    let outcome = std::panic::catch_unwind(|| {
        let node = start_node().expect("node");
        *dir.lock().unwrap() = Some(node.dir().to_path_buf());
        run(node.plane.kubectl().args([
            "run",
            "sim",
            "--image",
            image::SIM_IMAGE,
            "--image-pull-policy=Never",
            "--",
            "--role",
            "active",
        ]))
        .expect("kubectl run");
        let t = Instant::now();
        run(node.plane.kubectl().args([
            "wait",
            "--for=condition=Ready",
            "pod/sim",
            "--timeout=60s",
        ]))
        .expect("pod Ready");
        println!("a pod Ready {:?} after kubectl run", t.elapsed());
        let during = Machine::observe().expect("observe");
        let changed: Vec<String> = during.differences(&before);
        assert!(
            changed.iter().any(|d| d.contains("cni0")),
            "the running node shows no bridge: {changed:?}"
        );
        assert!(
            !changed.iter().any(|d| d.starts_with("sysctl")),
            "kernel parameters not restored while the node runs: {changed:?}"
        );
        panic!("a failing test, with the node running");
    });
    assert!(outcome.is_err(), "the node's closure was meant to panic");
    let after = Machine::observe()?;
    let diffs = after.differences(&before);
    assert!(
        diffs.is_empty(),
        "the machine differs after the node's teardown:\n{}",
        diffs.join("\n")
    );
    let dir = dir.into_inner().unwrap().expect("the node started");
    assert!(!dir.exists(), "{} left behind", dir.display());
    Ok(())
}

#[test]
fn a_run_killed_outright_is_cleaned_up_by_the_next_start() -> anyhow::Result<()> {
    let _turn = TURN.blocking_lock();
    let before = machine_before_a_node(bin())?;
    let marker = std::env::temp_dir().join(format!("vault-registrar-held-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let hold = image::testkit_bins()?.join("node-hold");
    let mut child = std::process::Command::new(&hold)
        .arg(bin())
        .arg(&marker)
        .spawn()?;
    let start = Instant::now();
    while !marker.exists() {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(180),
            "node-hold did not start its node"
        );
        anyhow::ensure!(child.try_wait()?.is_none(), "node-hold exited");
        std::thread::sleep(Duration::from_millis(200));
    }
    let held_dir = std::fs::read_to_string(&marker)?;
    let child_pid = child.id();
    child.kill()?;
    child.wait()?;
    std::fs::remove_file(&marker)?;
    let left = Machine::observe()?.differences(&before);
    println!("left by the killed run: {left:?}");
    assert!(
        left.iter().any(|d| d.contains("cni0")),
        "the killed run left no bridge: {left:?}"
    );
    let node = start_node()?;
    let diffs = node.stop();
    assert!(
        diffs.is_empty(),
        "after the next node's teardown:\n{}",
        diffs.join("\n")
    );
    assert!(!Path::new(&held_dir).exists(), "{held_dir} left behind");
    let files_left: Vec<String> = std::fs::read_dir(std::env::temp_dir())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("vault-registrar-") && n.contains(&format!("-{child_pid}-")))
        .collect();
    assert!(
        files_left.is_empty(),
        "the killed run's files: {files_left:?}"
    );
    Ok(())
}

/// Two replicas, both Ready, one leading; what each says; Vault simulator pods labelled
/// and reachable through the generated Services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_two_ready_replicas_that_label_simulator_pods() -> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let node = tokio::task::block_in_place(start_node)?;
    let client = node.plane.client().await?;
    let t = Instant::now();
    release::install_chart(&node).await?;
    println!("helm install --wait: {:?}", t.elapsed());
    let replicas = release::replicas(&client).await?;
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    assert!(
        replicas.iter().all(|r| r.ready),
        "not all Ready: {replicas:?}"
    );

    let leader = wait::until("a Lease holder", LIMIT, || async {
        release::leader(&client).await
    })
    .await?;
    let (lead, follow) = split(&replicas, &leader)?;
    wait::until(
        "leader gauge 1 on the leader, 0 on the follower",
        LIMIT,
        || async {
            let gauges = (
                release::leader_gauge(&lead.ip).await?,
                release::leader_gauge(&follow.ip).await?,
            );
            Ok((gauges == (Some(1.0), Some(0.0))).then_some(()))
        },
    )
    .await?;
    let (status, body) = release::readiness(&follow.ip)
        .await
        .context("the follower's readiness")?;
    assert_eq!(status, 200, "the follower is ready to take over: {body}");

    // In-cluster configuration: no kubeconfig in the pod, so the Lease writes that name the
    // chart's ServiceAccount came through the mounted token and the `kubernetes` Service.
    let account = format!("system:serviceaccount:{NAMESPACE}:vault-registrar");
    // The audit log is read off the runtime's worker threads.
    let lease_writes: Vec<_> = tokio::task::block_in_place(|| node.plane.writes_by(&account))
        .into_iter()
        .filter(|(_, resource, _)| resource == "leases")
        .collect();
    assert!(!lease_writes.is_empty(), "no Lease writes by {account}");
    let env = run(node.plane.kubectl().args([
        "get",
        "deploy",
        "vault-registrar",
        "-n",
        NAMESPACE,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].env[*].name} {.spec.template.spec.containers[0].image}",
    ]))?;
    assert!(!env.contains("KUBECONFIG"), "{env}");
    assert!(env.contains(&operator_image()), "{env}");

    // Vault simulator pods, labelled by the operator and routed through the Services.
    let ns = "vault";
    let ips = release::start_vault(&node, &client, ns, &["active", "standby", "standby"]).await?;
    wait_endpoints(&client, ns, "vault-active", &ips[..1], LIMIT).await?;
    wait_endpoints(&client, ns, "vault-standby", &ips[1..], LIMIT).await?;
    let labels = run(node.plane.kubectl().args([
        "get",
        "pods",
        "-n",
        ns,
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.metadata.labels.vault-active} {end}",
    ]))?;
    assert_eq!(labels.trim(), "vault-0=true vault-1=false vault-2=false");
    // kube-proxy programs a Service's endpoints a moment after they change: each check
    // waits for the wanted answer through the Service's cluster IP.
    let via_service = |service: &'static str, want: u16| {
        let client = client.clone();
        async move {
            let svc = Api::<Service>::namespaced(client, ns).get(service).await?;
            let spec = svc.spec.unwrap_or_default();
            let ip = spec.cluster_ip.unwrap_or_default();
            let port = spec
                .ports
                .unwrap_or_default()
                .iter()
                .map(|p| p.port)
                .find(|p| *p == i32::from(VAULT_PORT))
                .ok_or_else(|| anyhow::anyhow!("{service} has no port {VAULT_PORT}"))?;
            let addr = format!("{ip}:{port}").parse()?;
            wait::until(
                &format!("{want} through {service} ({addr})"),
                LIMIT,
                || async {
                    let (code, _) =
                        http_get_at(addr, "/v1/sys/health", Duration::from_secs(2)).await?;
                    Ok((code == want).then_some(()))
                },
            )
            .await
        }
    };
    // Vault answers 200 on the active node, 429 on a standby.
    via_service("vault-active", 200).await?;
    via_service("vault-standby", 429).await?;

    // A failover inside the pods: the Services follow.
    let t = Instant::now();
    release::set_role(&ips[0], "standby").await?;
    release::set_role(&ips[1], "active").await?;
    wait_endpoints(&client, ns, "vault-active", &ips[1..2], LIMIT).await?;
    println!(
        "active Service moved {:?} after the roles switched",
        t.elapsed()
    );
    via_service("vault-active", 200).await?;
    let mut standby = vec![ips[0].clone(), ips[2].clone()];
    standby.sort();
    assert_eq!(endpoint_ips(&client, ns, "vault-standby").await?, standby);
    println!(
        "with 5 pods: RSS MiB kubelet {:?}, containerd {:?}, kube-proxy {:?}",
        node.rss_mib("kubelet"),
        node.rss_mib("containerd"),
        node.rss_mib("kube-proxy")
    );
    let diffs = tokio::task::block_in_place(|| node.stop());
    assert!(diffs.is_empty(), "after teardown:\n{}", diffs.join("\n"));
    Ok(())
}

/// The leader's pod deleted, a follower's control loops stalled, both pods evicted at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_hand_over_restart_when_stuck_and_survive_evictions() -> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let node = tokio::task::block_in_place(start_node)?;
    let client = node.plane.client().await?;
    release::install_chart_with(&node, &release::STALL_FAULT_VALUES).await?;
    let leader = wait::until("a Lease holder", LIMIT, || async {
        release::leader(&client).await
    })
    .await?;

    // Deleting the leader's pod: the kubelet sends SIGTERM, the leader releases the Lease and
    // the other replica, watching it, takes it at once (0.1 to 1.6 s measured). Waiting out
    // the lease (LEASE_DURATION + RETRY_PERIOD, 17 s) would mean the release is broken.
    let (next, handover) = release::delete_leader(&client, &leader).await?;
    println!("leader pod {leader} deleted; {next} leads after {handover:?}");
    assert!(
        handover <= RELEASED_HANDOVER,
        "handover took {handover:?}: the Lease was not released on SIGTERM (waiting it out takes {:?})",
        LEASE_DURATION + RETRY_PERIOD
    );

    let all = ready_pair(&client).await?;
    // The PodDisruptionBudget (minAvailable 1): evicting both at once leaves one.
    wait::until("the budget allowing one disruption", LIMIT, || async {
        let allowed = run(node.plane.kubectl().args([
            "get",
            "pdb",
            "vault-registrar",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.status.disruptionsAllowed}",
        ]))?;
        Ok((allowed.trim() == "1").then_some(()))
    })
    .await?;
    // As `kubectl drain` does: cordon the node, then evict. Nowhere to schedule the first
    // pod's replacement, the budget must refuse the second eviction.
    run(node.plane.kubectl().args(["cordon", NODE_NAME]))?;
    // kubectl, not the kube client: the client retries a 429 until the budget allows it.
    let t = Instant::now();
    let asks: Vec<_> = all
        .iter()
        .map(|r| {
            let body = format!(
                "{{\"apiVersion\":\"policy/v1\",\"kind\":\"Eviction\",\"metadata\":{{\"name\":\"{}\",\"namespace\":\"{NAMESPACE}\"}}}}",
                r.name
            );
            let file = node.dir().join(format!("eviction-{}.json", r.name));
            std::fs::write(&file, body)?;
            let path = format!("/api/v1/namespaces/{NAMESPACE}/pods/{}/eviction", r.name);
            Ok(node
                .plane
                .kubectl()
                .args(["create", "--raw", &path, "-f"])
                .arg(&file)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()?)
        })
        .collect::<anyhow::Result<_>>()?;
    let outcomes: Vec<u16> = asks
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            Ok(match out.status.success() {
                true => 201,
                false if err.contains("disruption budget") => 429,
                false => anyhow::bail!("eviction failed otherwise: {err}"),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    println!("evictions answered after {:?}", t.elapsed());
    println!(
        "evictions of {:?}: {outcomes:?}",
        all.iter().map(|r| &r.name).collect::<Vec<_>>()
    );
    if outcomes.iter().filter(|c| **c == 201).count() != 1 {
        println!(
            "{}",
            run(node
                .plane
                .kubectl()
                .args(["get", "pods,pdb", "-n", NAMESPACE, "-o", "yaml"]))?
        );
    }
    assert_eq!(
        outcomes.iter().filter(|c| **c == 201).count(),
        1,
        "exactly one eviction allowed: {outcomes:?}"
    );
    assert!(outcomes.contains(&429), "the other blocked: {outcomes:?}");
    run(node.plane.kubectl().args(["uncordon", NODE_NAME]))?;
    let all = ready_pair(&client).await?;
    let next = release::leader(&client).await?.unwrap_or_default();

    // Liveness: a replica whose control loops are stuck (the test-only fault armed by the
    // values) is restarted.
    let stalled = all.iter().find(|r| r.name != next).unwrap().clone();
    let pid = node.container_pid(&stalled.container_id)?;
    // The test-only fault: the replica's control loops stop turning, its probe server keeps
    // answering, so /healthz says 503 and the kubelet restarts it.
    // SAFETY: signalling the container's main process, which this node started.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let t = Instant::now();
    wait::until(
        "the stalled replica restarted and Ready",
        Duration::from_secs(180),
        || {
            let client = client.clone();
            let name = stalled.name.clone();
            async move {
                let r = release::replicas(&client).await?;
                Ok(r.iter()
                    .find(|r| r.name == name)
                    .filter(|r| r.restarts > stalled.restarts && r.ready)
                    .map(|_| ()))
            }
        },
    )
    .await?;
    println!(
        "stalled replica {} restarted and Ready after {:?}",
        stalled.name,
        t.elapsed()
    );
    // Restarted because it said so, not because it stopped answering: the probe got a 503.
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), NAMESPACE)
        .list(&Default::default())
        .await?;
    let said: Vec<String> = events
        .items
        .iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(stalled.name.as_str()))
        .filter_map(|e| e.message.clone())
        .filter(|m| m.starts_with("Liveness probe failed"))
        .collect();
    assert!(
        said.iter().any(|m| m.contains("statuscode: 503")),
        "liveness failures of {}: {said:?}",
        stalled.name
    );

    let t = Instant::now();
    let diffs = tokio::task::block_in_place(|| node.stop());
    println!("teardown: {:?}", t.elapsed());
    assert!(diffs.is_empty(), "after teardown:\n{}", diffs.join("\n"));
    Ok(())
}

/// Two Ready replicas, not being deleted.
async fn ready_pair(client: &kube::Client) -> anyhow::Result<Vec<Replica>> {
    wait::until("two Ready replicas", LIMIT, || async {
        let r: Vec<Replica> = release::replicas(client)
            .await?
            .into_iter()
            .filter(|r| !r.deleting)
            .collect();
        Ok((r.len() == 2 && r.iter().all(|r| r.ready)).then_some(r))
    })
    .await
}

/// The leader and the follower among the replicas, by the Lease holder.
fn split<'a>(replicas: &'a [Replica], leader: &str) -> anyhow::Result<(&'a Replica, &'a Replica)> {
    let lead = replicas
        .iter()
        .find(|r| r.name == leader)
        .ok_or_else(|| anyhow::anyhow!("Lease holder {leader} is none of {replicas:?}"))?;
    let follow = replicas.iter().find(|r| r.name != leader).unwrap();
    Ok((lead, follow))
}
