//! Operator replicas that reach the API server through their own `Relay`, with their
//! metrics and health ports known, for leader-election tests and the takeover benchmark.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::Operator;
use crate::controlplane::{ControlPlane, free_port};
use crate::relay::{Relay, server_addr};

pub struct Replica {
    pub id: String,
    pub operator: Operator,
    pub relay: Relay,
    pub metrics_port: u16,
    pub health_port: u16,
}

impl Replica {
    /// Starts the operator binary as `id` with `kubeconfig` (which names `plane.server`)
    /// rewritten to go through a fresh relay.
    pub async fn start(
        plane: &ControlPlane,
        bin: &Path,
        kubeconfig: &Path,
        id: &str,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let relay = Relay::start(server_addr(&plane.server)?).await?;
        Self::start_with(plane, bin, kubeconfig, id, args, relay)
    }

    /// As `start`, with a relay the caller prepared (e.g. already blackholed).
    pub fn start_with(
        plane: &ControlPlane,
        bin: &Path,
        kubeconfig: &Path,
        id: &str,
        args: &[&str],
        relay: Relay,
    ) -> anyhow::Result<Self> {
        Self::start_via(plane, bin, (kubeconfig, &plane.server), id, args, relay)
    }

    /// As `start_with`, `kubeconfig` naming `server` (the API server, or a relay in front
    /// of it) that `relay` forwards to.
    pub fn start_via(
        plane: &ControlPlane,
        bin: &Path,
        (kubeconfig, server): (&Path, &str),
        id: &str,
        args: &[&str],
        relay: Relay,
    ) -> anyhow::Result<Self> {
        let via = plane.dir().join(format!("kubeconfig-relay-{id}"));
        relay.kubeconfig(kubeconfig, server, &via)?;
        let (metrics_port, health_port) = (free_port()?, free_port()?);
        let mut all = vec![
            format!("--identity={id}"),
            format!("--metrics-bind-address=127.0.0.1:{metrics_port}"),
            format!("--health-probe-bind-address=127.0.0.1:{health_port}"),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let log = plane.dir().join(format!("operator-{id}.log"));
        let operator = Operator::start(bin, &via, &all, &log)?;
        Ok(Self {
            id: id.into(),
            operator,
            relay,
            metrics_port,
            health_port,
        })
    }

    /// How many per-VaultCluster series /metrics shows; None when unreadable.
    pub async fn cluster_series(&self) -> Option<usize> {
        let (_, body) = http_get(self.metrics_port, "/metrics", Duration::from_secs(1))
            .await
            .ok()?;
        Some(
            body.lines()
                .filter(|l| !l.starts_with('#') && l.contains("cluster=\""))
                .count(),
        )
    }

    /// The value of `vault_registrar_leader` on /metrics; None when unreadable.
    pub async fn leader_gauge(&self) -> Option<f64> {
        let (_, body) = http_get(self.metrics_port, "/metrics", Duration::from_secs(1))
            .await
            .ok()?;
        metric(&body, "vault_registrar_leader")
    }

    /// The HTTP status of a health endpoint; None when it did not answer within 1 s.
    pub async fn health(&self, path: &str) -> Option<u16> {
        http_get(self.health_port, path, Duration::from_secs(1))
            .await
            .ok()
            .map(|(status, _)| status)
    }
}

/// One GET over a fresh connection: the status code and the body.
pub async fn http_get(port: u16, path: &str, limit: Duration) -> anyhow::Result<(u16, String)> {
    http_get_at(([127, 0, 0, 1], port).into(), path, limit).await
}

/// As `http_get`, to any address (a pod's, a Service's).
pub async fn http_get_at(
    addr: std::net::SocketAddr,
    path: &str,
    limit: Duration,
) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(limit, async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("not an HTTP response: {text:?}"))?;
        let body = text
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        Ok((status, body))
    })
    .await?
}

/// The value of the first metric line that starts with `name` followed by a space.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ')))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The holder of a Lease, if anyone holds it.
pub async fn lease_holder(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Option<String>> {
    let lease = Api::<Lease>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await?;
    Ok(lease
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

/// Polls the Lease every 20 ms until `id` holds it; the time that took.
pub async fn wait_holder(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    id: &str,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if lease_holder(client, namespace, name)
            .await
            .ok()
            .flatten()
            .as_deref()
            == Some(id)
        {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "{id} did not take Lease {namespace}/{name} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls a replica's leader gauge every 20 ms until it reads `want`; the time that took.
pub async fn wait_gauge(replica: &Replica, want: f64, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if replica.leader_gauge().await == Some(want) {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "{}: vault_registrar_leader did not read {want} within {limit:?}",
            replica.id
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
