//! Leadership and the process under API-server faults: replicas reach the API server through
//! TCP relays that can blackhole or reset their connections; who wrote what is read from
//! the API server's audit log. The tests run one at a time (one of them restarts the API
//! server) on this binary's own control plane.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures::StreamExt;
use kube::runtime::WatchStreamExt;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, OnceCell};
use vault_registrar::crd::VaultCluster;
use vault_registrar_testkit::api_relay::{ApiRelay, pod_list};
use vault_registrar_testkit::cluster::{Operator, SimCluster, wait_endpoints};
use vault_registrar_testkit::election::{Replica, http_get, lease_holder, wait_gauge, wait_holder};
use vault_registrar_testkit::history::{History, LabelHistory};
use vault_registrar_testkit::pods::create_namespace;
use vault_registrar_testkit::relay::{Relay, server_addr};
use vault_registrar_testkit::stage::{install_crd as install_crd_file, run_blocking};
use vault_registrar_testkit::vault_sim::Role;
use vault_registrar_testkit::{shared, wait};

const LIMIT: Duration = Duration::from_secs(30);
const TRIO: [Role; 3] = [Role::Active, Role::Standby, Role::Standby];
/// The short lease most tests use, and what follows from it (2/3 and 2/15 of it).
const LEASE: Duration = Duration::from_secs(4);
const RETRY: Duration = Duration::from_millis(533);
const LEASE_NAME: &str = "vault-registrar";

/// One test at a time: timings are asserted, and one test restarts the API server.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// The operator binary under test: this build's, or the one `VAULT_REGISTRAR_OPERATOR_BIN`
/// names (a mutated or older build, to show that a test fails on it).
fn bin() -> &'static Path {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var_os("VAULT_REGISTRAR_OPERATOR_BIN")
            .map(Into::into)
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_vault-registrar").into())
    })
}

async fn install_crd() -> anyhow::Result<()> {
    static DONE: OnceCell<()> = OnceCell::const_new();
    let crd =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/vaultclusters.vault-registrar.dev.yaml");
    DONE.get_or_try_init(|| install_crd_file(shared(), &crd))
        .await
        .map(|_| ())
}

/// A ServiceAccount bound to cluster-admin and a kubeconfig with its token, so each replica
/// has its own name in the audit log.
async fn account(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{ns}-{name}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]
    }))?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    let mut cmd = shared().kubectl();
    cmd.args(["create", "token", name, "-n", ns, "--duration=2h"]);
    let token = run_blocking(cmd).await?;
    shared().token_kubeconfig(&format!("{ns}-{name}"), token.trim())
}

fn user(ns: &str, name: &str) -> String {
    format!("system:serviceaccount:{ns}:{name}")
}

async fn create_vc(client: &kube::Client, ns: &str, name: &str, extra: &str) -> anyhow::Result<()> {
    let yaml = format!(
        "apiVersion: vault-registrar.dev/v1alpha1\nkind: VaultCluster\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  selector: {{matchLabels: {{app.kubernetes.io/name: vault}}}}\n  health: {{interval: 500ms, timeout: 300ms}}\n{extra}"
    );
    let vc: VaultCluster = serde_yaml::from_str(&yaml)?;
    Api::<VaultCluster>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &vc)
        .await?;
    Ok(())
}

/// Two replicas "a" and "b" electing in `ns`, watching `ns`, where three Vault pods run;
/// "a" leads and the labels are converged when this returns.
struct Pair {
    client: kube::Client,
    ns: String,
    vault: SimCluster,
    a: Replica,
    b: Replica,
}

async fn pair(ns: &str, lease: &str) -> anyhow::Result<Pair> {
    pair_with(ns, lease, None).await
}

/// As `pair`, "a" reaching the API server through `api` (behind its own TCP relay) when
/// given, so that the test can hold a's requests; a then acts with the relay's rights.
async fn pair_with(ns: &str, lease: &str, api: Option<&ApiRelay>) -> anyhow::Result<Pair> {
    install_crd().await?;
    let client = shared().client().await?;
    create_namespace(&client, ns).await?;
    let vault = SimCluster::start(&client, ns, "vault", &TRIO, None).await?;
    create_vc(&client, ns, "vault", "").await?;
    let lease_arg = format!("--leader-elect-lease-duration={lease}");
    let args = [
        "--leader-elect",
        &lease_arg,
        "--lease-namespace",
        ns,
        "--namespace",
        ns,
    ];
    let a = match api {
        None => {
            Replica::start(
                shared(),
                bin(),
                &account(&client, ns, "a").await?,
                "a",
                &args,
            )
            .await?
        }
        Some(api) => Replica::start_via(
            shared(),
            bin(),
            (&api.kubeconfig(&format!("{ns}-a"))?, &api.server()),
            "a",
            &args,
            Relay::start(server_addr(&api.server())?).await?,
        )?,
    };
    wait_holder(&client, ns, LEASE_NAME, "a", LIMIT).await?;
    vault
        .wait_labels(
            "vault-active",
            &[Some("true"), Some("false"), Some("false")],
            LIMIT,
        )
        .await?;
    let b = Replica::start(
        shared(),
        bin(),
        &account(&client, ns, "b").await?,
        "b",
        &args,
    )
    .await?;
    wait::until("b ready as a follower", LIMIT, || async {
        Ok(
            (b.health("/readyz").await == Some(200) && b.leader_gauge().await == Some(0.0))
                .then_some(()),
        )
    })
    .await?;
    Ok(Pair {
        client,
        ns: ns.into(),
        vault,
        a,
        b,
    })
}

impl Pair {
    /// Moves the active role from pod `from` to pod `to`.
    async fn fail_over(&self, from: usize, to: usize) {
        self.vault
            .sim(from)
            .update(|s| s.role = Role::Standby)
            .await;
        self.vault.sim(to).update(|s| s.role = Role::Active).await;
    }

    async fn wait_active(&self, i: usize, limit: Duration) -> anyhow::Result<()> {
        let want: Vec<Option<&str>> = (0..3)
            .map(|j| Some(if j == i { "true" } else { "false" }))
            .collect();
        self.vault.wait_labels("vault-active", &want, limit).await
    }

    /// When the API server received b's first write: b writes nothing before it takes
    /// the Lease, so this is the takeover on the API server's own clock.
    async fn takeover_at(&self) -> Option<Timestamp> {
        let writes = shared().timed_writes_by_async(&user(&self.ns, "b")).await;
        writes.first().map(|(at, ..)| *at)
    }

    /// a's writes the API server received at or after `at`.
    async fn writes_of_a_since(&self, at: Timestamp) -> Vec<String> {
        shared()
            .timed_writes_by_async(&user(&self.ns, "a"))
            .await
            .into_iter()
            .filter(|(t, ..)| *t >= at)
            .map(|(t, verb, resource, name)| format!("{t} {verb} {resource}/{name}"))
            .collect()
    }
}

/// Every stored version of the pods' `vault-active` label, from a pod watch (see
/// `testkit::history`), and, sampled every 50 ms, whether both replicas report leading.
struct Watcher {
    history: LabelHistory,
    stop: Arc<AtomicBool>,
    both_leading: Arc<AtomicUsize>,
    samples: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

async fn watch_pods(pair: &Pair) -> anyhow::Result<Watcher> {
    let history =
        LabelHistory::start(pair.client.clone(), &pair.ns, "vault-active", "true").await?;
    let stop = Arc::new(AtomicBool::new(false));
    let both_leading = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(AtomicUsize::new(0));
    let (ports_a, ports_b) = (pair.a.metrics_port, pair.b.metrics_port);
    let (s, b, n) = (stop.clone(), both_leading.clone(), samples.clone());
    let task = tokio::spawn(async move {
        while !s.load(Ordering::SeqCst) {
            let gauge = |port| async move {
                let text = http_get(port, "/metrics", Duration::from_millis(500))
                    .await
                    .ok()?;
                vault_registrar_testkit::election::metric(&text.1, "vault_registrar_leader")
            };
            if gauge(ports_a).await == Some(1.0) && gauge(ports_b).await == Some(1.0) {
                b.fetch_add(1, Ordering::SeqCst);
            }
            n.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    Ok(Watcher {
        history,
        stop,
        both_leading,
        samples,
        task,
    })
}

impl Watcher {
    /// Stops; fails if the pod history shows two pods labelled active at any stored version
    /// (or has gaps beyond `gaps_allowed`); (the history, gauge samples where both led,
    /// gauge samples taken).
    async fn finish(self, gaps_allowed: usize) -> anyhow::Result<(History, usize, usize)> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        let history = self.history.finish().await?;
        history.check(None, gaps_allowed)?;
        println!(
            "pod history: {} versions, {} relists; pods labelled active, in order: {:?}",
            history.versions.len(),
            history.gaps,
            history.sets
        );
        Ok((
            history,
            self.both_leading.load(Ordering::SeqCst),
            self.samples.load(Ordering::SeqCst),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_leader_steps_down_and_never_writes_after_the_takeover() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let p = pair("lead-blackhole", "4s").await?;
    let watcher = watch_pods(&p).await?;
    assert!(
        p.a.cluster_series().await.unwrap_or(0) > 0,
        "the leader shows its clusters"
    );
    let cut = Instant::now();
    p.a.relay.blackhole();
    wait_gauge(&p.a, 0.0, LIMIT).await?;
    let stepped_down = cut.elapsed();
    assert_eq!(
        p.a.cluster_series().await,
        Some(0),
        "a replica that lost the lead shows no cluster series"
    );
    wait_holder(&p.client, &p.ns, LEASE_NAME, "b", LIMIT).await?;
    let took_over = cut.elapsed();
    println!(
        "blackholed leader stepped down after {stepped_down:?}; b took over after {took_over:?}"
    );
    assert!(
        stepped_down <= LEASE + RETRY,
        "a reported leading for {stepped_down:?} with its API connection blackholed"
    );
    assert!(stepped_down < took_over, "a still led when b took over");
    // Work for the new leader, while a is still cut off.
    p.fail_over(0, 1).await;
    p.wait_active(1, LIMIT).await?;
    // a's connection comes back: it must find b holding the Lease and stay a follower.
    let restore_at = cut + LEASE * 2;
    tokio::time::sleep_until(restore_at.into()).await;
    p.a.relay.restore();
    wait::until("a ready again as a follower", LIMIT, || async {
        Ok((p.a.health("/readyz").await == Some(200)).then_some(()))
    })
    .await?;
    p.fail_over(1, 2).await;
    p.wait_active(2, LIMIT).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(p.a.leader_gauge().await, Some(0.0), "a leads again");
    let (history, both_leading, samples) = watcher.finish(0).await?;
    assert!(samples > 20, "only {samples} samples of the gauges");
    assert_eq!(history.most, 1, "a pod was labelled active");
    assert_eq!(both_leading, 0, "both replicas reported leading at once");
    let takeover = p.takeover_at().await.expect("b wrote");
    assert!(
        !shared()
            .timed_writes_by_async(&user(&p.ns, "a"))
            .await
            .is_empty(),
        "a never wrote: the test proves nothing"
    );
    assert_eq!(
        p.writes_of_a_since(takeover).await,
        Vec::<String>::new(),
        "a wrote after b took over at {takeover}"
    );
    Ok(())
}

/// One process loses the Lease and later wins it again: its second term decides only from
/// caches listed in that term, not from what its first term saw. While it follows, the
/// cluster fails over twice: once under the other leader, once with no leader at all; and
/// the second term's pod list is held for 3 s. Deciding from the first term's pods would
/// leave the pod the other leader promoted labelled active beside the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_the_lease_leads_again_from_what_it_lists_anew() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let api = ApiRelay::start(shared()).await?;
    let mut p = pair_with("lead-regain", "4s", Some(&api)).await?;
    let watcher = watch_pods(&p).await?;
    let pid = p.a.operator.pid();
    p.a.relay.blackhole();
    wait_gauge(&p.a, 0.0, LIMIT).await?;
    wait_holder(&p.client, &p.ns, LEASE_NAME, "b", LIMIT).await?;
    p.fail_over(0, 1).await;
    p.wait_active(1, LIMIT).await?;
    p.a.relay.restore();
    wait::until("a ready again as a follower", LIMIT, || async {
        Ok((p.a.health("/readyz").await == Some(200)).then_some(()))
    })
    .await?;
    api.hold(pod_list, Duration::from_secs(3), 1);
    p.b.operator.kill();
    // With no leader the labels hold: pod 1 stays labelled active while Vault moved on.
    p.fail_over(1, 2).await;
    let lost = Instant::now();
    tokio::time::sleep(LEASE / 2).await;
    assert_eq!(
        p.vault
            .labels(1)
            .await?
            .get("vault-active")
            .map(String::as_str),
        Some("true"),
        "a follower wrote the labels"
    );
    wait_holder(&p.client, &p.ns, LEASE_NAME, "a", LIMIT).await?;
    p.wait_active(2, LIMIT).await?;
    let regained = lost.elapsed();
    assert_eq!(api.held(), 1, "the second term's pod list was not held");
    assert!(p.a.operator.running(), "a exited instead of leading again");
    assert_eq!(p.a.operator.pid(), pid, "a was restarted");
    assert_eq!(p.a.leader_gauge().await, Some(1.0));
    assert!(
        p.a.cluster_series().await.unwrap_or(0) > 0,
        "a's second term shows no cluster series"
    );
    wait_endpoints(&p.client, &p.ns, "vault-active", &[p.vault.ip(2)], LIMIT).await?;
    println!("a led again and routed pod 2 {regained:?} after b's kill");
    let (history, ..) = watcher.finish(0).await?;
    assert_eq!(history.most, 1, "two pods were labelled active at once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_connections_do_not_cost_the_leader_its_lease() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let p = pair("lead-reset", "4s").await?;
    let watcher = watch_pods(&p).await?;
    let connections = p.a.relay.accepted();
    for _ in 0..6 {
        p.a.relay.reset();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let holder = lease_holder(&p.client, &p.ns, LEASE_NAME).await?;
        assert_eq!(
            holder.as_deref(),
            Some("a"),
            "the lease moved after a reset"
        );
    }
    let last_reset = Instant::now();
    assert!(
        p.a.relay.accepted() >= connections + 6,
        "the leader did not reconnect after each reset"
    );
    // Had the resets cost a its renewals, the lease would have run out by now and b, which
    // tries every retry period, would hold it.
    tokio::time::sleep_until((last_reset + LEASE + RETRY * 2).into()).await;
    let holder = lease_holder(&p.client, &p.ns, LEASE_NAME).await?;
    assert_eq!(
        holder.as_deref(),
        Some("a"),
        "the lease moved within a lease duration and a retry after the last reset"
    );
    assert_eq!(p.b.leader_gauge().await, Some(0.0), "b leads");
    // The leader's watches and requests reconnected: it still does its work.
    p.fail_over(0, 1).await;
    p.wait_active(1, LIMIT).await?;
    assert_eq!(p.a.leader_gauge().await, Some(1.0));
    let (history, both_leading, _) = watcher.finish(0).await?;
    assert_eq!(history.most, 1, "a pod was labelled active");
    assert_eq!(both_leading, 0, "both replicas reported leading at once");
    assert_eq!(
        shared().timed_writes_by_async(&user(&p.ns, "b")).await,
        vec![],
        "the follower wrote"
    );
    Ok(())
}

/// The leader is SIGKILLed after it demoted the old active pod and before it promoted the
/// new one: the kill is sent the moment a watch shows the demotion stored, while the leader
/// waits for the active Service's endpoints to drain before promoting. The audit log then
/// proves where the kill landed (a demoted, never promoted; b promoted); an attempt where
/// the promotion slipped in first is repeated in a fresh namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_failover_leaves_one_active_pod() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    for attempt in 0..3 {
        if kill_between_demotion_and_promotion(&format!("lead-kill-{attempt}")).await? {
            return Ok(());
        }
        println!("attempt {attempt}: the kill did not land between the writes; again");
    }
    anyhow::bail!("in 3 attempts the kill never landed between the demotion and the promotion")
}

/// One attempt; false when the kill did not land between the demotion and the promotion.
async fn kill_between_demotion_and_promotion(ns: &str) -> anyhow::Result<bool> {
    let mut p = pair(ns, "4s").await?;
    let watcher = watch_pods(&p).await?;
    let pods: Api<Pod> = Api::namespaced(p.client.clone(), &p.ns);
    let config = kube::runtime::watcher::Config::default().fields("metadata.name=vault-0");
    let mut vault_0 = std::pin::pin!(kube::runtime::watcher(pods, config).default_backoff());
    let writes_before = shared().writes_in_async(&p.ns).await.len();
    p.fail_over(0, 1).await;
    // The first stored version of vault-0 without vault-active=true is the demotion.
    tokio::time::timeout(LIMIT, async {
        while let Some(event) = vault_0.next().await {
            if let Ok(kube::runtime::watcher::Event::Apply(pod)) = event {
                let labels = pod.metadata.labels.unwrap_or_default();
                if labels.get("vault-active").map(String::as_str) != Some("true") {
                    return;
                }
            }
        }
    })
    .await?;
    let killed = Instant::now();
    p.a.operator.kill();
    let took_over = wait_holder(&p.client, &p.ns, LEASE_NAME, "b", LIMIT).await?;
    println!("leader SIGKILLed mid-failover: b took over after {took_over:?}");
    p.wait_active(1, LIMIT).await?;
    let (history, both_leading, samples) = watcher.finish(0).await?;
    assert!(samples > 20, "only {samples} samples of the gauges");
    assert_eq!(history.most, 1, "a pod was labelled active");
    assert_eq!(both_leading, 0);
    assert!(
        took_over <= LEASE + RETRY * 2 + Duration::from_millis(500),
        "takeover after SIGKILL took {:?}",
        killed.elapsed()
    );
    // Where the kill landed, from the audit log: a's pod writes since the failover.
    let writes = shared()
        .writes_in_async(&p.ns)
        .await
        .split_off(writes_before);
    let pod_writes = |who: &str| -> Vec<(String, i64)> {
        writes
            .iter()
            .filter(|w| w.0 == user(&p.ns, who) && w.2 == "pods" && w.1 == "patch")
            .map(|w| (w.3.clone(), w.4))
            .collect()
    };
    let (of_a, of_b) = (pod_writes("a"), pod_writes("b"));
    println!("pod label writes since the failover: a {of_a:?}, b {of_b:?}");
    let demoted_by_a = of_a.contains(&("vault-0".to_string(), 200));
    let promoted_by_a = of_a.iter().any(|(pod, _)| pod == "vault-1");
    if !demoted_by_a || promoted_by_a {
        return Ok(false);
    }
    assert!(
        of_b.contains(&("vault-1".to_string(), 200)),
        "b did not promote vault-1: {of_b:?}"
    );
    // And the moment between them was seen: vault-0, nobody, vault-1.
    let sets: Vec<Vec<&str>> = history
        .sets
        .iter()
        .map(|s| s.iter().map(String::as_str).collect())
        .collect();
    assert!(
        sets.windows(3)
            .any(|w| w == [vec!["vault-0"], vec![], vec!["vault-1"]]),
        "{sets:?}"
    );
    Ok(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_killed_and_restarted_mid_failover() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let p = pair("lead-apiserver", "4s").await?;
    let watcher = watch_pods(&p).await?;
    p.fail_over(0, 1).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    shared().kill_apiserver();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::spawn_blocking(|| shared().restart_apiserver()).await??;
    p.wait_active(1, Duration::from_secs(60)).await?;
    // After the outage exactly one replica leads, and it does its work.
    let leaders = wait::until("exactly one leader", LIMIT, || async {
        let (a, b) = (p.a.leader_gauge().await, p.b.leader_gauge().await);
        Ok(matches!((a, b), (Some(1.0), Some(0.0)) | (Some(0.0), Some(1.0))).then_some((a, b)))
    })
    .await?;
    p.fail_over(1, 2).await;
    p.wait_active(2, LIMIT).await?;
    // The API server's restart may start its watch cache past the last version the watch
    // saw: one relist is allowed there (the versions it skips were written before the kill
    // or after the restart; none while the server was down).
    let (history, both_leading, samples) = watcher.finish(1).await?;
    println!("after the API server restart: gauges (a, b) = {leaders:?}");
    assert!(samples > 20, "only {samples} samples of the gauges");
    assert_eq!(history.most, 1, "a pod was labelled active");
    assert_eq!(both_leading, 0, "both replicas reported leading at once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_hands_the_lease_over_in_under_two_seconds() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    // The default lease (15s): a handover must not wait for it.
    let mut p = pair("lead-sigterm", "15s").await?;
    let stopped = Instant::now();
    p.a.operator.terminate();
    let took_over = wait_holder(&p.client, &p.ns, LEASE_NAME, "b", LIMIT).await?;
    println!("leader SIGTERMed: b took over after {took_over:?}");
    assert!(
        took_over < Duration::from_secs(2),
        "handover took {took_over:?}"
    );
    let status = tokio::task::block_in_place(|| p.a.operator.wait_exit(Duration::from_secs(10)));
    assert!(
        status.is_some_and(|s| s.success()),
        "a did not exit cleanly: {status:?}"
    );
    assert!(stopped.elapsed() < Duration::from_secs(10));
    p.fail_over(0, 1).await;
    p.wait_active(1, LIMIT).await?;
    let takeover = p.takeover_at().await.expect("b wrote");
    assert_eq!(
        p.writes_of_a_since(takeover).await,
        Vec::<String>::new(),
        "a wrote after the handover"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_that_never_answers_leaves_the_replica_unready_and_not_live()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    install_crd().await?;
    create_namespace(&shared().client().await?, "lead-silent").await?;
    let relay = Relay::start(server_addr(&shared().server)?).await?;
    relay.blackhole();
    let args = [
        "--leader-elect",
        "--lease-namespace=lead-silent",
        "--namespace=lead-silent",
        "--leader-elect-lease-duration=4s",
        "--startup-timeout=3s",
    ];
    let mut r = Replica::start_with(
        shared(),
        bin(),
        &shared().kubeconfig,
        "silent",
        &args,
        relay,
    )?;
    let started = Instant::now();
    let live_failed = wait::until("/healthz failing", LIMIT, || async {
        Ok((r.health("/healthz").await == Some(503)).then_some(started.elapsed()))
    })
    .await?;
    println!("liveness failed {live_failed:?} after start with a silent API server");
    assert!(
        live_failed >= Duration::from_secs(3),
        "liveness failed before the start-up bound"
    );
    assert!(live_failed < Duration::from_secs(6));
    assert_eq!(
        r.health("/readyz").await,
        Some(503),
        "ready without an API server"
    );
    assert!(
        tokio::task::block_in_place(|| r.operator.running()),
        "the replica exited"
    );
    // The API server answers again: the same process recovers without a restart.
    r.relay.restore();
    wait::until("ready and live again", LIMIT, || async {
        Ok(
            (r.health("/readyz").await == Some(200) && r.health("/healthz").await == Some(200))
                .then_some(()),
        )
    })
    .await?;
    Ok(())
}

/// Another pod opens 2,000 connections to the health port and sends no request: the
/// kubelet's probe, from another address, is still answered at once. A peer holds at most
/// `MAX_CONNECTIONS_PER_PEER` connections (the rest are closed as soon as accepted), so it
/// cannot fill the server's `MAX_CONNECTIONS`; those it holds go at the header-read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_under_2000_idle_connections_of_another_pod() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    vault_registrar::fdlimit::raise_nofile()?;
    install_crd().await?;
    let client = shared().client().await?;
    create_namespace(&client, "lead-slowloris").await?;
    let args = ["--namespace", "lead-slowloris"];
    let r = Replica::start(shared(), bin(), &shared().kubeconfig, "slowloris", &args).await?;
    wait::until("replica ready", LIMIT, || async {
        Ok((r.health("/readyz").await == Some(200)).then_some(()))
    })
    .await?;
    // The other pod: another loopback address than the probe's 127.0.0.1.
    // All at once, as an attacker would, well within the header-read timeout.
    let port = r.health_port;
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..2000 {
        opening.spawn(async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(([127, 0, 0, 2], 0).into())?;
            let mut stream = socket.connect(([127, 0, 0, 1], port).into()).await?;
            // A refused write is fine: the server may have closed it already.
            let _ = stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await;
            std::io::Result::Ok(stream)
        });
    }
    let opened = Instant::now();
    let mut held = Vec::new();
    while let Some(stream) = opening.join_next().await {
        held.push(stream??);
    }
    println!("2000 connections opened in {:?}", opened.elapsed());
    let asked = Instant::now();
    let (status, _) = http_get(r.health_port, "/healthz", Duration::from_secs(1)).await?;
    let took = asked.elapsed();
    println!("/healthz under 2000 idle connections of another peer: {status} in {took:?}");
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "{took:?}");
    // The accept loop closes the extra connections one by one; well before the held ones'
    // header-read timeout, no more than the share may still be open.
    let share = vault_registrar::server::MAX_CONNECTIONS_PER_PEER;
    let deadline = opened + Duration::from_secs(3);
    let mut open = held.iter().filter(|s| still_open(s)).count();
    while open > share && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        open = held.iter().filter(|s| still_open(s)).count();
    }
    println!("connections of that peer still open: {open}");
    assert!(open <= share, "{open} connections of one peer kept");
    // The header-read timeout frees those it holds.
    tokio::time::sleep(vault_registrar::server::HEADER_READ_TIMEOUT + Duration::from_secs(2)).await;
    let open = held.iter().filter(|s| still_open(s)).count();
    assert_eq!(
        open, 0,
        "idle connections kept past the header-read timeout"
    );
    Ok(())
}

/// Whether the server has not closed the connection (nothing to read yet, no EOF).
fn still_open(stream: &tokio::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// CPU time (user + system, in clock ticks) a process has used so far.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_server_backs_off_and_recovers() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    vault_registrar::fdlimit::raise_nofile()?;
    install_crd().await?;
    let client = shared().client().await?;
    create_namespace(&client, "lead-emfile").await?;
    let health_port = vault_registrar_testkit::controlplane::free_port()?;
    let health = format!("--health-probe-bind-address=127.0.0.1:{health_port}");
    let log = shared().dir().join("operator-emfile.log");
    let args = ["--namespace", "lead-emfile", health.as_str()];
    let operator = Operator::start_limited(bin(), &shared().kubeconfig, &args, &log, Some(128))?;
    let get = || http_get(health_port, "/healthz", Duration::from_secs(1));
    wait::until("operator serving", LIMIT, || async { Ok(get().await.ok()) }).await?;
    // More connections than the operator may hold descriptors: accepting fails. From 30
    // addresses, each within its share of connections (the server closes a peer's excess).
    let mut held = Vec::new();
    for i in 0..300u16 {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(([127, 0, 0, 10 + (i % 30) as u8], 0).into())?;
        let mut stream = socket.connect(([127, 0, 0, 1], health_port).into()).await?;
        stream.write_all(b"GET /healthz HTTP/1.1\r\n").await?;
        held.push(stream);
    }
    let before = cpu_ticks(operator.pid())?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(operator.pid())? - before;
    println!("operator CPU while out of descriptors: {used} ticks in 2 s");
    assert!(
        operator
            .log_text()
            .contains("accepting a connection failed"),
        "accept never failed: the test did not exhaust descriptors"
    );
    // 100 ticks are one core for one second: a spinning accept loop would use ~200.
    assert!(used < 60, "accept loop spun: {used} ticks in 2 s");
    drop(held);
    let status = wait::until("/healthz after the flood", LIMIT, || async {
        Ok(get().await.ok().map(|(status, _)| status))
    })
    .await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_is_detected_in_each_of_two_watched_namespaces() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    install_crd().await?;
    let client = shared().client().await?;
    let namespaces = ["lead-ov-a", "lead-ov-b"];
    let mut sims = Vec::new();
    for ns in namespaces {
        create_namespace(&client, ns).await?;
        sims.push(SimCluster::start(&client, ns, "vault", &TRIO, None).await?);
        create_vc(&client, ns, "first", "").await?;
    }
    let log = shared().dir().join("operator-overlap.log");
    let _operator = Operator::start(
        bin(),
        &shared().kubeconfig,
        &["--namespace", namespaces[0], "--namespace", namespaces[1]],
        &log,
    )?;
    for vault in &sims {
        vault
            .wait_labels(
                "vault-active",
                &[Some("true"), Some("false"), Some("false")],
                LIMIT,
            )
            .await?;
    }
    // Creation timestamps have second resolution: make "second" strictly younger.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for ns in namespaces {
        create_vc(&client, ns, "second", "  labelPrefix: other\n").await?;
    }
    for ns in namespaces {
        let api: Api<VaultCluster> = Api::namespaced(client.clone(), ns);
        let message = wait::until(
            &format!("SelectorOverlap on {ns}/second"),
            LIMIT,
            || async {
                let vc = api.get("second").await?;
                Ok(vc
                    .status
                    .unwrap_or_default()
                    .conditions
                    .into_iter()
                    .find(|c| c.type_ == "SelectorOverlap" && c.status == "True")
                    .map(|c| c.message))
            },
        )
        .await?;
        assert!(message.contains("vault-0 (first)"), "{ns}: {message}");
    }
    Ok(())
}
