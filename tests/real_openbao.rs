//! End-to-end tests against real OpenBao: a 3-node raft HA cluster of OpenBao 2.7.2 processes
//! (the official static `bao`, fetched by `tests/openbao/build.sh`), one per pod of the test
//! plane, probed by the real operator with `labelPrefix: openbao`. They drive OpenBao as its
//! operator would (init, unseal, step-down, seal, SIGKILL, loss of quorum and its return) and
//! assert the `openbao-*` labels and the Services that follow. Each health answer seen is
//! compared with `tests/testkit/openbao-2.7.2-health.json`, which the simulator's OpenBao
//! flavour answers as.

mod common;

use std::time::Duration;

use common::{namespace, operator};
use kube::api::{Api, PostParams};
use vault_registrar::crd::VaultCluster;
use vault_registrar_testkit::cluster::{Operator, wait_endpoints};
use vault_registrar_testkit::real_vault::{Flavour, OPENBAO_VERSION, RaftCluster};
use vault_registrar_testkit::wait;

/// Raft elections and joins take seconds; this bounds every wait.
const LIMIT: Duration = Duration::from_secs(60);

struct Bao {
    client: kube::Client,
    ns: String,
    nodes: RaftCluster,
    _operator: Operator,
}

impl Bao {
    async fn start(name: &str) -> anyhow::Result<Self> {
        let ns = format!("bao-{name}");
        let client = namespace(&ns).await?;
        let nodes = RaftCluster::start_flavour(&client, &ns, "bao", 3, Flavour::OpenBao).await?;
        let op = operator(&ns, None, &[])?;
        let yaml = "apiVersion: vault-registrar.dev/v1alpha1\nkind: VaultCluster\nmetadata: {name: bao}\nspec:\n  selector: {matchLabels: {app.kubernetes.io/name: vault}}\n  labelPrefix: openbao\n  health: {interval: 1s, timeout: 800ms, failureThreshold: 2}\n";
        let vc: VaultCluster = serde_yaml::from_str(yaml)?;
        Api::<VaultCluster>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &vc)
            .await?;
        Ok(Self {
            client,
            ns,
            nodes,
            _operator: op,
        })
    }

    /// Waits until every listed pod carries the given `openbao-<key>` values.
    async fn labels(&self, key: &str, want: &[(usize, &str)]) -> anyhow::Result<()> {
        let label = format!("openbao-{key}");
        wait::until(&format!("{label} {want:?}"), LIMIT, || async {
            for (i, value) in want {
                let labels = self.nodes.labels(*i).await?;
                if labels.get(&label).map(String::as_str) != Some(*value) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
        .await
    }

    async fn endpoints(&self, service: &str, pods: &[usize]) -> anyhow::Result<()> {
        let ips: Vec<String> = pods.iter().map(|i| self.nodes.ip(*i)).collect();
        wait_endpoints(&self.client, &self.ns, service, &ips, LIMIT).await
    }

    /// Pod `active` is the only one labelled active and behind `bao-active`; `standbys` are
    /// labelled unsealed standbys and are what `bao-standby` routes to.
    async fn routed(&self, active: usize, standbys: &[usize]) -> anyhow::Result<()> {
        let mut want = vec![(active, "true")];
        want.extend(standbys.iter().map(|s| (*s, "false")));
        self.labels("active", &want).await?;
        self.endpoints("bao-active", &[active]).await?;
        self.endpoints("bao-standby", standbys).await
    }

    /// Prints node `i`'s health answer as OpenBao gave it.
    async fn show(&self, i: usize, when: &str) {
        match self.nodes.health(i).await {
            Ok(a) => eprintln!("OpenBao {when}: {} {}", a.code, a.body),
            Err(e) => eprintln!("OpenBao {when}: no answer: {e}"),
        }
    }

    /// Node `i` answers as recorded for `state` in the test kit's
    /// `openbao-2.7.2-health.json`, which the simulator's OpenBao flavour is checked against:
    /// a new OpenBao that answers otherwise fails here, not silently in the simulator.
    async fn answers_as_recorded(&self, i: usize, state: &str) -> anyhow::Result<()> {
        let recorded: serde_json::Value =
            serde_json::from_str(include_str!("testkit/openbao-2.7.2-health.json"))?;
        let want = &recorded["answers"][state];
        let answer = self.nodes.health(i).await?;
        eprintln!("OpenBao {state}: {} {}", answer.code, answer.body);
        let mut body = answer.body;
        if let Some(fields) = body.as_object_mut() {
            fields.remove("server_time_utc");
            fields.remove("cluster_id");
        }
        anyhow::ensure!(
            i64::from(answer.code) == want["code"] && body == want["body"],
            "OpenBao {state} answered {} {body}, recorded {want}",
            answer.code
        );
        Ok(())
    }
}

fn others(except: &[usize]) -> Vec<usize> {
    (0..3).filter(|i| !except.contains(i)).collect()
}

/// The node answering 200 that is not `old`.
async fn new_active(nodes: &RaftCluster, old: Option<usize>) -> anyhow::Result<usize> {
    wait::until("a new active OpenBao node", LIMIT, || async {
        Ok(nodes.active().await.filter(|a| Some(*a) != old))
    })
    .await
}

#[tokio::test]
async fn real_openbao_labels_follow_step_down_seal_kill_and_quorum() -> anyhow::Result<()> {
    let mut bao = Bao::start("life").await?;
    let a = bao.nodes.wait_active(LIMIT).await?;
    bao.routed(a, &others(&[a])).await?;
    bao.labels("version", &[(a, OPENBAO_VERSION)]).await?;
    bao.labels("initialized", &[(0, "true"), (1, "true"), (2, "true")])
        .await?;
    assert!(
        !bao.nodes.labels(a).await?.contains_key("vault-active"),
        "only the openbao prefix is written"
    );
    bao.answers_as_recorded(a, "active").await?;
    bao.answers_as_recorded(others(&[a])[0], "standby").await?;

    // Step-down: another node takes over, the labels and Services follow.
    bao.nodes.step_down(a).await?;
    let b = new_active(&bao.nodes, Some(a)).await?;
    bao.routed(b, &others(&[b])).await?;

    // Seal the active node: it is labelled sealed and leaves both Services.
    bao.nodes.seal(b).await?;
    bao.answers_as_recorded(b, "sealed").await?;
    let c = new_active(&bao.nodes, Some(b)).await?;
    bao.routed(c, &others(&[b, c])).await?;
    bao.labels("sealed", &[(b, "true")]).await?;

    // SIGKILL of the active node with the third sealed: one unsealed voter of three has no
    // quorum, so nobody is active. The killed pod is held (Running and Ready in the API,
    // fail static) until corroborated, so -active may keep it; the survivor stays a
    // standby and is never promoted by the operator on a guess.
    bao.nodes.kill(c);
    let survivor = others(&[b, c])[0];
    tokio::time::sleep(Duration::from_secs(5)).await;
    bao.show(survivor, "standby without quorum").await;
    assert!(
        bao.nodes.active().await.is_none(),
        "no OpenBao node can be active without quorum"
    );
    bao.labels("active", &[(survivor, "false")]).await?;

    // Quorum back: unseal the sealed node; one of the two becomes active and is routed.
    bao.nodes.unseal(b).await?;
    let d = new_active(&bao.nodes, Some(c)).await?;
    let standby = if d == b { survivor } else { b };
    // The killed pod is demoted now that another answers active.
    bao.labels("active", &[(d, "true"), (standby, "false"), (c, "false")])
        .await?;
    bao.endpoints("bao-active", &[d]).await?;

    // A node that is never initialised answers 501 and is labelled so.
    let fresh = bao.nodes.add_uninitialized().await?;
    bao.answers_as_recorded(fresh, "uninitialized").await?;
    bao.labels("initialized", &[(fresh, "false")]).await?;
    bao.labels("active", &[(fresh, "false")]).await
}
