//! What the end-to-end test binaries share: a namespace with simulated Vault pods and the
//! operator watching it, and waits on labels, endpoints, conditions and events.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use tokio::sync::OnceCell;
use vault_registrar::crd::VaultCluster;
use vault_registrar_testkit::certs::Authority;
use vault_registrar_testkit::cluster::{Operator, SimCluster, wait_endpoints};
use vault_registrar_testkit::pods::create_namespace;
use vault_registrar_testkit::stage::install_crd as install_crd_file;
use vault_registrar_testkit::vault_sim::{Behavior, Role, SimTls};
use vault_registrar_testkit::{shared, wait};

pub const LIMIT: Duration = Duration::from_secs(30);
pub const FAST: &str = "health: {interval: 500ms, timeout: 300ms, failureThreshold: 2}";

pub struct Fixture {
    pub client: kube::Client,
    pub ns: String,
    pub vault: SimCluster,
    pub operator: Operator,
}

pub async fn install_crd() -> anyhow::Result<()> {
    static DONE: OnceCell<()> = OnceCell::const_new();
    let crd =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/vaultclusters.vault-registrar.dev.yaml");
    DONE.get_or_try_init(|| install_crd_file(shared(), &crd))
        .await
        .map(|_| ())
}

/// A new namespace on the shared plane, with the CRD installed; the admin client.
pub async fn namespace(ns: &str) -> anyhow::Result<kube::Client> {
    install_crd().await?;
    let client = shared().client().await?;
    create_namespace(&client, ns).await?;
    Ok(client)
}

/// The operator binary watching `ns` with `kubeconfig` (the admin's when None), and more
/// arguments; its log goes next to the plane's.
pub fn operator(ns: &str, kubeconfig: Option<&Path>, extra: &[&str]) -> anyhow::Result<Operator> {
    let plane = shared();
    let mut args = vec!["--namespace", ns];
    args.extend_from_slice(extra);
    Operator::start(
        &operator_bin(),
        kubeconfig.unwrap_or(&plane.kubeconfig),
        &args,
        &plane.dir().join(format!("operator-{ns}.log")),
    )
}

/// The operator binary under test: this build's, or the one `VAULT_REGISTRAR_OPERATOR_BIN`
/// names (an older release, to check that a test fails on it).
pub fn operator_bin() -> std::path::PathBuf {
    std::env::var_os("VAULT_REGISTRAR_OPERATOR_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_vault-registrar").into())
}

/// A namespace with the operator watching it and Vault pods `vault-N` answering as `roles`.
pub async fn fixture(name: &str, roles: &[Role], tls: Option<SimTls>) -> anyhow::Result<Fixture> {
    let ns = format!("e2e-{name}");
    let client = namespace(&ns).await?;
    let vault = SimCluster::start(&client, &ns, "vault", roles, tls).await?;
    let operator = operator(&ns, None, &[])?;
    Ok(Fixture {
        client,
        ns,
        vault,
        operator,
    })
}

impl Fixture {
    pub fn clusters(&self) -> Api<VaultCluster> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn create(&self, name: &str, extra_yaml: &str) -> anyhow::Result<VaultCluster> {
        let yaml = format!(
            "apiVersion: vault-registrar.dev/v1alpha1\nkind: VaultCluster\nmetadata: {{name: {name}}}\nspec:\n  selector: {{matchLabels: {{app.kubernetes.io/name: vault}}}}\n  {}\n",
            extra_yaml.replace('\n', "\n  ")
        );
        let vc: VaultCluster = serde_yaml::from_str(&yaml)?;
        Ok(self.clusters().create(&PostParams::default(), &vc).await?)
    }

    pub async fn labels(&self, key: &str, want: &[Option<&str>]) -> anyhow::Result<()> {
        self.vault.wait_labels(key, want, LIMIT).await
    }

    pub async fn endpoints(&self, service: &str, pods: &[usize]) -> anyhow::Result<()> {
        let ips: Vec<String> = pods.iter().map(|i| self.vault.ip(*i)).collect();
        wait_endpoints(&self.client, &self.ns, service, &ips, LIMIT).await
    }

    pub async fn condition(
        &self,
        vc: &str,
        kind: &str,
        status: &str,
        reason: &str,
    ) -> anyhow::Result<String> {
        let api = self.clusters();
        wait::until(
            &format!("{vc} condition {kind}={status} ({reason})"),
            LIMIT,
            || async {
                let vc = api.get(vc).await?;
                let found = vc
                    .status
                    .unwrap_or_default()
                    .conditions
                    .into_iter()
                    .find(|c| c.type_ == kind);
                Ok(found
                    .filter(|c| c.status == status && c.reason == reason)
                    .map(|c| c.message))
            },
        )
        .await
    }

    pub async fn event(&self, reason: &str) -> anyhow::Result<String> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        wait::until(&format!("event {reason}"), LIMIT, || async {
            let list = events.list(&ListParams::default()).await?;
            Ok(list
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some(reason))
                .and_then(|e| e.note))
        })
        .await
    }

    /// The last probe error the status reports for a pod.
    pub async fn probe_error(&self, pod: &str) -> anyhow::Result<String> {
        let status = self
            .clusters()
            .get("vault")
            .await?
            .status
            .unwrap_or_default();
        let member = status.members.into_iter().find(|m| m.name == pod);
        Ok(member.map(|m| m.last_probe_error).unwrap_or_default())
    }

    pub async fn converged(&self) -> anyhow::Result<()> {
        self.converged_as("vault").await
    }

    /// As `converged`, for VaultCluster `vc` (its Services are `<vc>-active`, ...).
    pub async fn converged_as(&self, vc: &str) -> anyhow::Result<()> {
        self.labels(
            "vault-active",
            &[Some("true"), Some("false"), Some("false")],
        )
        .await?;
        self.endpoints(&format!("{vc}-active"), &[0]).await?;
        self.endpoints(&format!("{vc}-standby"), &[1, 2]).await
    }

    /// Makes pod `to` the active one and every other a standby, and waits for the labels.
    pub async fn fail_over_to(&self, to: usize) -> anyhow::Result<()> {
        let n = self.vault.members.len();
        for i in 0..n {
            self.set(i, if i == to { Role::Active } else { Role::Standby })
                .await;
        }
        let want: Vec<Option<&str>> = (0..n)
            .map(|i| Some(if i == to { "true" } else { "false" }))
            .collect();
        self.labels("vault-active", &want).await
    }

    /// Checks every 50 ms for `window` that the active Service's only endpoint is pod `i`
    /// and that pod `i` keeps `vault-active=true`.
    pub async fn active_holds(&self, i: usize, window: Duration) -> anyhow::Result<()> {
        let ip = self.vault.ip(i);
        let end = Instant::now() + window;
        while Instant::now() < end {
            let endpoints = vault_registrar_testkit::cluster::endpoint_ips(
                &self.client,
                &self.ns,
                "vault-active",
            )
            .await?;
            anyhow::ensure!(
                endpoints == [ip.clone()],
                "active Service endpoints {endpoints:?}"
            );
            let active = self.vault.labels(i).await?.get("vault-active").cloned();
            anyhow::ensure!(
                active.as_deref() == Some("true"),
                "vault-{i} vault-active {active:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    pub async fn set(&self, i: usize, role: Role) {
        self.vault.sim(i).update(|s| s.role = role).await;
    }

    pub async fn behave(&self, i: usize, behavior: Behavior) {
        self.vault.sim(i).update(|s| s.behavior = behavior).await;
    }
}

pub const TRIO: [Role; 3] = [Role::Active, Role::Standby, Role::Standby];

/// The common start: one active and two standbys under VaultCluster `vault`, converged.
pub async fn converged_trio(name: &str) -> anyhow::Result<Fixture> {
    let f = fixture(name, &TRIO, None).await?;
    f.create("vault", FAST).await?;
    f.converged().await?;
    Ok(f)
}

/// Probing over https with the CA in Secret `vault-ca`, verifying `<pod>.vault-internal`.
pub const HTTPS: &str = "health: {scheme: https, interval: 500ms, timeout: 300ms, tls: {caSecretRef: {name: vault-ca}, serverName: '{pod}.vault-internal'}}";

/// A fresh CA and a serving certificate from it for `names`.
pub fn tls_for(names: &[&str]) -> anyhow::Result<(Authority, SimTls)> {
    let ca = Authority::new("vault-test-ca")?;
    let cert = ca.serving(names)?;
    let tls = SimTls {
        cert_pem: cert.cert,
        key_pem: cert.key,
    };
    Ok((ca, tls))
}

/// The names `HTTPS` verifies for the three pods of `TRIO`.
pub const TRIO_NAMES: [&str; 3] = [
    "vault-0.vault-internal",
    "vault-1.vault-internal",
    "vault-2.vault-internal",
];

impl Fixture {
    /// Creates Secret `vault-ca` holding the CA bundle; the Secrets of the namespace.
    pub async fn ca_secret(&self, ca: &Authority) -> anyhow::Result<Api<Secret>> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let secret: Secret = serde_json::from_value(serde_json::json!(
            {"metadata": {"name": "vault-ca"}, "stringData": {"ca.crt": ca.cert_pem()}}
        ))?;
        secrets.create(&PostParams::default(), &secret).await?;
        Ok(secrets)
    }
}
