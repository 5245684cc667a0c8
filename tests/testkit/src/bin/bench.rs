//! `make bench`: failover convergence latency at interval 1s, from a simulated pod's change
//! to the active Service's EndpointSlice change, over 20 flips; and the write requests the
//! API server received during 60 s of steady state, from its own /metrics; the writes over
//! 10 s once every pod is sealed, and once every pod is unreachable while Kubernetes reports
//! it Ready (the operator holds the labels); the leader takeover time after SIGKILL,
//! blackhole and SIGTERM of the leader, with leases of 15s and 4s; and failover at Vault's
//! speed: real Vault (20 step-downs per interval, timed by the audit log and Vault's own log)
//! and the simulator (polled) side by side at intervals 2s and 5s, from the moment
//! the new active node first answers 200 to the moment its pod is labelled active and is the
//! only endpoint of the active Service. Prints figures; asserts nothing about time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;

use vault_registrar_testkit::cluster::{SimCluster, endpoint_ips};
use vault_registrar_testkit::netns::PathCut;
use vault_registrar_testkit::pods::pod_labels;
use vault_registrar_testkit::real_vault::{HealthLog, RaftCluster, VAULT_VERSION};
use vault_registrar_testkit::stage::Stage;
use vault_registrar_testkit::takeover::{self, Fault};
use vault_registrar_testkit::vault_sim::Role;

/// How much is measured: in full, or with `--smoke` a few samples of each figure, so that
/// `make test` runs every part and the bench cannot rot unnoticed.
#[derive(Clone, Copy)]
struct Sizes {
    flips: usize,
    steady: Duration,
    sim_samples: usize,
    real_samples: usize,
    leases: &'static [&'static str],
}

fn sizes() -> Sizes {
    static SIZES: std::sync::OnceLock<Sizes> = std::sync::OnceLock::new();
    *SIZES.get_or_init(|| {
        if std::env::args().any(|a| a == "--smoke") {
            Sizes {
                flips: 3,
                steady: Duration::from_secs(10),
                sim_samples: 2,
                real_samples: 2,
                leases: &["4s"],
            }
        } else {
            // 20 real step-downs per interval, so that p99 is read off 20 samples.
            Sizes {
                flips: 20,
                steady: Duration::from_secs(60),
                sim_samples: 5,
                real_samples: 20,
                leases: &["15s", "4s"],
            }
        }
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let stage = Stage::start("bench", &[Role::Active, Role::Standby, Role::Standby], "1s").await?;
    stage.wait_ready().await?;
    let mut latencies = Vec::new();
    let mut label_latencies = Vec::new();
    let flips = sizes().flips;
    for flip in 0..flips {
        let (from, to) = if flip % 2 == 0 { (0, 1) } else { (1, 0) };
        tokio::time::sleep(Duration::from_millis(300 + (flip as u64 * 137) % 700)).await;
        let start = Instant::now();
        stage
            .vault
            .sim(from)
            .update(|s| s.role = Role::Standby)
            .await;
        stage.vault.sim(to).update(|s| s.role = Role::Active).await;
        let want = vec![stage.vault.ip(to)];
        let mut labelled = None;
        loop {
            if labelled.is_none()
                && stage
                    .vault
                    .labels(to)
                    .await?
                    .get("vault-active")
                    .map(String::as_str)
                    == Some("true")
            {
                labelled = Some(start.elapsed());
            }
            if endpoint_ips(&stage.client, "bench", "vault-active").await? == want {
                break;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "flip {flip} did not converge"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        label_latencies.push(labelled.unwrap_or_else(|| start.elapsed()));
        latencies.push(start.elapsed());
    }
    let millis = |v: &[Duration]| v.iter().map(|d| d.as_millis()).collect::<Vec<_>>();
    println!(
        "each flip, ms to the new pod's label: {:?}",
        millis(&label_latencies)
    );
    println!(
        "each flip, ms to the EndpointSlice:   {:?}",
        millis(&latencies)
    );
    label_latencies.sort();
    let p = |v: &[Duration], q: f64| v[((v.len() as f64 * q).ceil() as usize).saturating_sub(1)];
    println!(
        "label written over {flips} flips: p50 {:?}, p99 {:?}",
        p(&label_latencies, 0.5),
        p(&label_latencies, 0.99)
    );
    latencies.sort();
    let pct = |q: f64| p(&latencies, q);
    println!(
        "failover convergence over {flips} flips at interval 1s: p50 {:?}, p99 {:?}, max {:?} (target p99 <= 1.3s)",
        pct(0.50),
        pct(0.99),
        latencies.last().unwrap()
    );

    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = writes(&stage)?;
    tokio::time::sleep(sizes().steady).await;
    let after = writes(&stage)?;
    let total = ours(&before, &after);
    println!(
        "write requests to pods, services, vaultclusters and events during {} s of steady state: {total} (target 0)",
        sizes().steady.as_secs()
    );

    for i in 0..3 {
        stage.vault.sim(i).update(|s| s.role = Role::Sealed).await;
    }
    let sealed = quiet_writes(&stage).await?;
    println!(
        "write requests during 10 s with every pod sealed (after 5 s to settle): {sealed} (target 0)"
    );
    let roles = [Role::Active, Role::Standby, Role::Standby];
    for (i, role) in roles.into_iter().enumerate() {
        stage.vault.sim(i).update(|s| s.role = role).await;
    }
    let active = vec![stage.vault.ip(0)];
    while endpoint_ips(&stage.client, "bench", "vault-active").await? != active {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ips: Vec<_> = stage.vault.members.iter().map(|m| m.pod.ip).collect();
    let cut = PathCut::new(&ips)?;
    let unreachable = quiet_writes(&stage).await?;
    let held = endpoint_ips(&stage.client, "bench", "vault-active").await? == active;
    drop(cut);
    println!(
        "write requests during 10 s with every pod unreachable but Ready (after 5 s to settle): {unreachable} (target 0); active Service kept its endpoint: {held}"
    );
    takeovers(&stage).await?;
    vault_speed(&stage).await
}

/// Real Vault (step-downs, timed by the audit log and Vault's own log) and the simulator
/// (role switches, timed by polling), side by side.
async fn vault_speed(stage: &Stage) -> anyhow::Result<()> {
    let Sizes {
        real_samples,
        sim_samples,
        ..
    } = sizes();
    println!(
        "\nfailover at Vault's speed, real Vault {VAULT_VERSION}, {real_samples} step-downs per interval; times from the API server's audit log (stageTimestamp) and Vault's log (\"post-unseal setup complete\", after which it answers 200); with fewer than 100 samples p99 is the highest"
    );
    for interval in ["2s", "5s"] {
        let spans = real_vault_speed(stage, interval).await?;
        println!("  interval {interval}:");
        println!(
            "    step-down asked -> sole endpoint of the active Service (what a client waits): {}",
            percentiles(spans.iter().map(|s| s.client))
        );
        println!(
            "    Vault active -> sole endpoint of the active Service (our share, target <= 300 ms): {}",
            percentiles(spans.iter().map(|s| s.ours))
        );
        println!(
            "    Vault active -> its pod labelled active: {}",
            percentiles(spans.iter().map(|s| s.label))
        );
    }
    println!(
        "\nfailover, simulator: ms from the new active node's first 200 (polled every 10 ms) to its pod labelled active and sole endpoint of the active Service, {sim_samples} failovers each"
    );
    for interval in ["2s", "5s"] {
        let sim = simulator_speed(stage, interval).await?;
        println!("  interval {interval}: {}", summary(&sim));
    }
    Ok(())
}

fn summary(samples: &[Duration]) -> String {
    let mut ms: Vec<u128> = samples.iter().map(Duration::as_millis).collect();
    let each = format!("{ms:?}");
    ms.sort();
    format!(
        "p50 {} ms, max {} ms, each {each}",
        ms[ms.len() / 2],
        ms.last().copied().unwrap_or_default()
    )
}

/// p50, p99 and every sample, in ms.
fn percentiles(ms: impl Iterator<Item = i64>) -> String {
    let each: Vec<i64> = ms.collect();
    let mut sorted = each.clone();
    sorted.sort();
    let at = |q: f64| sorted[((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1)];
    format!("p50 {} ms, p99 {} ms, each {each:?}", at(0.5), at(0.99))
}

/// The three pods of one measured cluster.
struct Pods {
    ns: String,
    names: Vec<String>,
    ips: Vec<String>,
}

impl Pods {
    fn new(ns: &str, names: Vec<String>, ips: &[std::net::Ipv4Addr]) -> Self {
        let ips = ips.iter().map(ToString::to_string).collect();
        Self {
            ns: ns.to_owned(),
            names,
            ips,
        }
    }
}

/// One step-down: when it was asked, the node that took over, and when the bench saw that
/// node's pod routed (an upper bound for the audit log's search).
struct StepDown {
    asked: Timestamp,
    to: usize,
    seen: Timestamp,
}

/// What one step-down took, in ms.
struct Spans {
    client: i64,
    ours: i64,
    label: i64,
}

async fn real_vault_speed(stage: &Stage, interval: &str) -> anyhow::Result<Vec<Spans>> {
    let ns = format!("speed-real-{interval}");
    let _operator = stage.watched_namespace(&ns, interval).await?;
    let vault = RaftCluster::start(&stage.client, &ns, "vault", 3).await?;
    let ips: Vec<_> = vault.nodes.iter().map(|n| n.ip()).collect();
    let pods = Pods::new(
        &ns,
        (0..3).map(|i| vault.pod_name(i).to_owned()).collect(),
        &ips,
    );
    let mut steps = Vec::new();
    for k in 0..sizes().real_samples {
        let from = vault.wait_active(Duration::from_secs(60)).await?;
        settle(stage, &pods, from, k).await?;
        let asked = Timestamp::now();
        vault.step_down(from).await?;
        let to = loop {
            match vault.active().await {
                Some(to) if to != from => break to,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        routed_to(stage, &pods, to).await?;
        steps.push(StepDown {
            asked,
            to,
            seen: Timestamp::now(),
        });
    }
    let writes = stage.plane.completed_writes_in(&ns);
    steps
        .iter()
        .map(|step| spans(step, &writes, &vault.became_active_at(step.to), &pods))
        .collect()
}

/// The spans of one step-down: from the audit log, the new active pod's first label patch
/// and the last write of the active Service's EndpointSlice before the bench saw it routed;
/// from Vault's log, the moment the new node began to serve as active.
fn spans(
    step: &StepDown,
    writes: &[(Timestamp, String, String, String)],
    became_active: &[Timestamp],
    pods: &Pods,
) -> anyhow::Result<Spans> {
    let after = |at: &Timestamp| *at > step.asked && *at <= step.seen;
    let active = became_active
        .iter()
        .copied()
        .find(|at| after(at))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} logged no takeover after {}",
                pods.names[step.to],
                step.asked
            )
        })?;
    let labelled = writes
        .iter()
        .find(|(at, verb, resource, name)| {
            after(at) && verb == "patch" && resource == "pods" && *name == pods.names[step.to]
        })
        .map(|w| w.0)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no label patch of {} after {}",
                pods.names[step.to],
                step.asked
            )
        })?;
    let routed = writes
        .iter()
        .rev()
        .filter(|(at, _, resource, name)| {
            after(at) && resource == "endpointslices" && name.starts_with("vault-active-")
        })
        .map(|w| w.0)
        .next()
        .ok_or_else(|| anyhow::anyhow!("no EndpointSlice write after {}", step.asked))?;
    let ms = |from: Timestamp, to: Timestamp| to.duration_since(from).as_millis() as i64;
    Ok(Spans {
        client: ms(step.asked, routed),
        ours: ms(active, routed),
        label: ms(active, labelled),
    })
}

async fn simulator_speed(stage: &Stage, interval: &str) -> anyhow::Result<Vec<Duration>> {
    let ns = format!("speed-sim-{interval}");
    let _operator = stage.watched_namespace(&ns, interval).await?;
    let roles = [Role::Active, Role::Standby, Role::Standby];
    let vault = SimCluster::start(&stage.client, &ns, "vault", &roles, None).await?;
    let ips: Vec<_> = vault.members.iter().map(|m| m.pod.ip).collect();
    let pods = Pods::new(
        &ns,
        (0..3).map(|i| vault.pod_name(i).to_owned()).collect(),
        &ips,
    );
    let log = HealthLog::start(&ips, Duration::from_millis(10));
    let mut samples = Vec::new();
    for k in 0..sizes().sim_samples {
        let (from, to) = (k % 3, (k + 1) % 3);
        settle(stage, &pods, from, k).await?;
        let asked = Instant::now();
        vault.sim(from).update(|s| s.role = Role::Standby).await;
        vault.sim(to).update(|s| s.role = Role::Active).await;
        samples.push(time_to_route(stage, &pods, &log, from, asked).await?);
    }
    Ok(samples)
}

/// Waits until pod `i` is routed as the active one, then a while longer, varied per sample
/// so that failovers fall at different points of the probe cycle.
async fn settle(stage: &Stage, pods: &Pods, i: usize, k: usize) -> anyhow::Result<()> {
    routed_to(stage, pods, i).await?;
    tokio::time::sleep(Duration::from_millis(1_500 + (k as u64 * 1_130) % 3_000)).await;
    Ok(())
}

/// From the first 200 of a node other than `from` after `asked`, to its pod being labelled
/// active and the only endpoint of the active Service.
async fn time_to_route(
    stage: &Stage,
    pods: &Pods,
    log: &HealthLog,
    from: usize,
    asked: Instant,
) -> anyhow::Result<Duration> {
    let (to, answered) = loop {
        let fresh = (0..pods.names.len()).filter(|i| *i != from).find_map(|i| {
            let at = log.node(i).became_active?;
            (at > asked).then_some((i, at))
        });
        if let Some(found) = fresh {
            break found;
        }
        anyhow::ensure!(
            asked.elapsed() < Duration::from_secs(60),
            "no new active node in {}",
            pods.ns
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    routed_to(stage, pods, to).await?;
    Ok(answered.elapsed())
}

/// Polls every 10 ms until pod `i` carries vault-active=true and is the active Service's
/// only endpoint.
async fn routed_to(stage: &Stage, pods: &Pods, i: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    let want = vec![pods.ips[i].clone()];
    loop {
        let labels = pod_labels(&stage.client, &pods.ns, &pods.names[i]).await?;
        if labels.get("vault-active").map(String::as_str) == Some("true")
            && endpoint_ips(&stage.client, &pods.ns, "vault-active").await? == want
        {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "{} never routed as active in {}",
            pods.names[i],
            pods.ns
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits 5 s for the operator to settle, then counts our write requests over 10 s.
async fn quiet_writes(stage: &Stage) -> anyhow::Result<u64> {
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = writes(stage)?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    Ok(ours(&before, &writes(stage)?))
}

/// Write requests to the objects the operator writes, between two readings; each resource
/// with any is printed.
fn ours(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> u64 {
    let mut total = 0;
    for (resource, n) in after {
        let delta = n - before.get(resource).copied().unwrap_or(0.0);
        if delta > 0.0 {
            println!("  writes to {resource}: {delta}");
        }
        if ["pods", "services", "vaultclusters", "events"].contains(&resource.as_str()) {
            total += delta as u64;
        }
    }
    total
}

/// Leader takeover after each fault, with the default lease and a short one.
async fn takeovers(stage: &Stage) -> anyhow::Result<()> {
    let bin = std::env::var_os("VAULT_REGISTRAR_BIN")
        .map(std::path::PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("VAULT_REGISTRAR_BIN is not set"))?;
    for &lease in sizes().leases {
        for (n, fault) in [Fault::Kill, Fault::Blackhole, Fault::Terminate]
            .into_iter()
            .enumerate()
        {
            let ns = format!("takeover-{}-{n}", lease.trim_end_matches('s'));
            let took = takeover::measure(&stage.plane, &bin, &ns, lease, fault).await?;
            println!("takeover after {fault:?} of the leader, lease {lease}: {took:?}");
        }
    }
    Ok(())
}

/// apiserver_request_total for write verbs, summed by resource.
fn writes(stage: &Stage) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for ((verb, resource), n) in stage.plane.requests()? {
        if ["POST", "PUT", "PATCH", "DELETE", "APPLY"].contains(&verb.as_str()) {
            *out.entry(resource).or_insert(0.0) += n;
        }
    }
    Ok(out)
}
