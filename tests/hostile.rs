//! Hostile answers, end to end: a probed pod chooses its version string and the body the
//! parser quotes. Whatever it sends, labels stay valid label values, the status and events
//! stay small and printable, and an answer that changes every probe still makes at most one
//! write of each kind per interval. Writes are counted from the API server's audit log.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use vault_registrar_testkit::shared;
use vault_registrar_testkit::vault_sim::Behavior;

const WINDOW: Duration = Duration::from_secs(8);
/// The interval of the cluster under test: at most one write of each kind per this.
const INTERVAL_S: usize = 2;

/// A version no Vault would send: escape sequences, a newline, 60 KB, and a counter so that
/// each one differs from the last.
fn hostile_version(n: u64) -> String {
    format!("{n}\u{1b}[2J\n\u{202e}{}", "9".repeat(60_000))
}

#[tokio::test]
async fn answers_chosen_by_a_pod_stay_bounded_and_write_once_per_interval() -> anyhow::Result<()> {
    let f = fixture("hostile", &TRIO, None).await?;
    // The standby's error comes and goes but never makes it unreachable: with a threshold of
    // 3, three probes that met the HTML page in a row (one in eight, or every time when the
    // probes fall in step with the 50 ms flapping) changed its role, and a role change is
    // written at once, beside the version's write of that interval (CI met 6 writes in 8 s).
    f.create(
        "vault",
        "health: {interval: 2s, activeInterval: 100ms, timeout: 300ms, failureThreshold: 100}",
    )
    .await?;
    f.converged().await?;
    // The active pod changes its version every 50 ms; a standby alternates between Vault's
    // answer and an HTML page, so its probe error comes and goes.
    let end = Instant::now() + Duration::from_secs(2) + WINDOW;
    let flapping = async {
        let mut n = 0;
        while Instant::now() < end {
            f.vault
                .sim(0)
                .update(|s| s.version = hostile_version(n))
                .await;
            let behavior = if n % 2 == 0 {
                Behavior::Garbage
            } else {
                Behavior::Serve
            };
            f.vault.sim(1).update(|s| s.behavior = behavior).await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let measured = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = shared().writes_in_async(&f.ns).await.len();
        tokio::time::sleep(WINDOW).await;
        shared().writes_in_async(&f.ns).await.split_off(before)
    };
    let ((), writes) = tokio::join!(flapping, measured);

    // Every write to the namespace, by anyone, counted by object: each pod's labels, the
    // status, each Service and EndpointSlice; Events as one kind (each has its own name).
    let mut by_object: BTreeMap<String, usize> = BTreeMap::new();
    for (_, _, resource, name, _) in &writes {
        let key = if resource.starts_with("events") {
            resource.clone()
        } else {
            format!("{resource}/{name}")
        };
        *by_object.entry(key).or_default() += 1;
    }
    let most = WINDOW.as_secs() as usize / INTERVAL_S + 1;
    println!("over {WINDOW:?}, writes by object: {by_object:?}");
    let over: Vec<_> = by_object.iter().filter(|(_, n)| **n > most).collect();
    anyhow::ensure!(
        over.is_empty(),
        "over {WINDOW:?}: {over:?} above {most} writes each (every write: {writes:?})"
    );
    let label_writes = by_object.get("pods/vault-0").copied().unwrap_or(0);
    anyhow::ensure!(
        label_writes >= 2,
        "the version label still follows the pod: {label_writes} label writes"
    );

    let version = f.vault.labels(0).await?.get("vault-version").cloned();
    let version = version.unwrap_or_default();
    anyhow::ensure!(
        version.len() <= 63
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
        "vault-version label {version:?}"
    );
    let vc = f.clusters().get("vault").await?;
    let status = serde_json::to_string(&vc.status)?;
    anyhow::ensure!(status.len() < 8 * 1024, "status is {} bytes", status.len());
    anyhow::ensure!(
        !status.contains("\\u001b") && !status.contains('\u{202e}'),
        "status carries raw control characters: {status}"
    );
    for m in vc.status.unwrap_or_default().members {
        anyhow::ensure!(
            m.version.len() <= 63 && m.last_probe_error.len() <= 256,
            "member {m:?}"
        );
    }
    let events: Api<Event> = Api::namespaced(f.client.clone(), &f.ns);
    for e in events.list(&ListParams::default()).await?.items {
        let note = e.note.unwrap_or_default();
        anyhow::ensure!(
            note.len() <= 1000 && !note.contains('\u{1b}'),
            "event note {note:?}"
        );
    }
    f.endpoints("vault-active", &[0]).await
}
