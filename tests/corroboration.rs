//! Labels move on Vault's word or on corroboration, never on a guess, end to end: a pod that
//! answers active beside the incumbent does not empty the active Service; pods that stop
//! giving Vault's answer (a cut path, a 404 from something else) keep their labels while
//! Kubernetes reports them Ready; Vault's own answers (sealed) still act at once; and a
//! crashed active pod is demoted once the kubelet marks it not Ready.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use vault_registrar_testkit::cluster::APP_LABEL;
use vault_registrar_testkit::netns::PathCut;
use vault_registrar_testkit::pods::{SimPod, next_pod_ip, pod_labels, set_running, start_pod};
use vault_registrar_testkit::vault_sim::{Behavior, Role, SimState, VaultSim};
use vault_registrar_testkit::wait;

/// Three times failureThreshold × interval of `FAST` (2 × 500 ms), and more: long enough
/// for the old rule to have moved the labels several times over.
const HOLD: Duration = Duration::from_secs(4);

/// A pod with Vault's labels, Running and Ready, whose address answers as an active Vault:
/// what anyone allowed to run a pod with the selected labels can make.
async fn impostor(f: &Fixture) -> anyhow::Result<(SimPod, VaultSim)> {
    let ip = next_pod_ip();
    let sim = VaultSim::start(
        SocketAddr::new(ip.into(), 8200),
        None,
        SimState::new(Role::Active),
    )
    .await?;
    let pod = SimPod {
        name: "impostor".into(),
        labels: [(APP_LABEL.0.to_string(), APP_LABEL.1.to_string())].into(),
        ip,
    };
    start_pod(&f.client, &f.ns, &pod).await?;
    Ok((pod, sim))
}

#[tokio::test]
async fn an_impostor_answering_active_does_not_take_or_empty_the_active_service()
-> anyhow::Result<()> {
    let f = converged_trio("co-impostor").await?;
    let (pod, sim) = impostor(&f).await?;
    f.active_holds(0, HOLD).await?;
    anyhow::ensure!(sim.health_requests() > 0, "the impostor was never probed");
    let message = f
        .condition("vault", "Degraded", "True", "MultipleActive")
        .await?;
    assert!(
        message.contains("vault-0") && message.contains("impostor"),
        "{message}"
    );
    let note = f.event("MultipleActive").await?;
    assert!(
        note.contains("vault-0") && note.contains("impostor"),
        "{note}"
    );
    f.endpoints("vault-standby", &[1, 2]).await?;
    f.condition("vault", "Available", "True", "ActivePod")
        .await?;
    // The impostor is in neither Service. (Seen before it ran, with no IP, it may carry
    // the after-shutdown labels, which keep it out of both.)
    let labels = pod_labels(&f.client, &f.ns, &pod.name).await?;
    let active = labels.get("vault-active").map(String::as_str);
    assert_ne!(active, Some("true"), "impostor labelled active: {labels:?}");
    let unsealed_standby =
        labels.get("vault-sealed").map(String::as_str) == Some("false") && active == Some("false");
    assert!(!unsealed_standby, "impostor labelled a standby: {labels:?}");
    Ok(())
}

#[tokio::test]
async fn answers_that_are_not_vaults_hold_the_labels() -> anyhow::Result<()> {
    let f = converged_trio("co-404").await?;
    for i in 0..3 {
        f.behave(i, Behavior::NotFound).await;
    }
    f.active_holds(0, HOLD).await?;
    let message = f
        .condition("vault", "Degraded", "True", "ProbesFailing")
        .await?;
    assert!(message.contains("status 404"), "{message}");
    f.condition("vault", "Available", "True", "ActiveHeld")
        .await?;
    f.labels(
        "vault-sealed",
        &[Some("false"), Some("false"), Some("false")],
    )
    .await?;
    f.endpoints("vault-standby", &[1, 2]).await?;
    for i in 0..3 {
        f.behave(i, Behavior::Serve).await;
    }
    f.event("ProbesAnswered").await?;
    f.condition("vault", "Degraded", "False", "AllPodsHealthy")
        .await?;
    Ok(())
}

/// The operator loses its path to the active pod and one standby, but reaches the third
/// pod, just restarted and sealed. That answer is Vault's and acts at once; it says nothing
/// about the pods the operator cannot reach, which Kubernetes still reports Ready.
#[tokio::test]
async fn a_partial_partition_demotes_nothing_but_the_sealed_answer_acts() -> anyhow::Result<()> {
    let f = converged_trio("co-partition").await?;
    let cut = PathCut::new(&[f.vault.members[0].pod.ip, f.vault.members[1].pod.ip])?;
    f.behave(2, Behavior::Crash).await;
    f.vault
        .sim(2)
        .update(|s| {
            s.role = Role::Sealed;
            s.behavior = Behavior::Serve;
        })
        .await;
    f.labels(
        "vault-sealed",
        &[Some("false"), Some("false"), Some("true")],
    )
    .await?;
    f.active_holds(0, HOLD).await?;
    f.endpoints("vault-standby", &[1]).await?;
    let message = f
        .condition("vault", "Degraded", "True", "ProbesFailing")
        .await?;
    assert!(
        message.contains("vault-0") && message.contains("vault-1"),
        "{message}"
    );
    drop(cut);
    f.condition("vault", "Available", "True", "ActivePod")
        .await?;
    Ok(())
}

/// A crashed active pod: until the kubelet sees it nothing corroborates the failed probes,
/// so the label stays (no other pod could serve); once the pod is marked not Ready, it is
/// demoted within failureThreshold × interval.
#[tokio::test]
async fn a_crashed_active_is_demoted_when_the_kubelet_marks_it_not_ready() -> anyhow::Result<()> {
    let f = converged_trio("co-crash").await?;
    f.behave(0, Behavior::Crash).await;
    f.active_holds(0, Duration::from_secs(2)).await?;
    let marked = Instant::now();
    set_running(&f.client, &f.ns, &f.vault.members[0].pod, false).await?;
    wait::until("vault-0 demoted", LIMIT, || async {
        let labels = f.vault.labels(0).await?;
        let get = |k: &str| labels.get(k).map(String::as_str);
        Ok(
            (get("vault-active") == Some("false") && get("vault-sealed") == Some("true"))
                .then_some(()),
        )
    })
    .await?;
    let took = marked.elapsed();
    // The next full round after the watch delivers the change: one interval, plus slack
    // for a loaded machine.
    assert!(
        took < Duration::from_secs(5),
        "demoted {took:?} after not Ready"
    );
    f.condition("vault", "Available", "False", "NoActivePod")
        .await?;
    Ok(())
}
