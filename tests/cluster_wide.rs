//! The operator without `--namespace`: one process serving VaultClusters in every
//! namespace, with JSON logs and its /metrics read over HTTP. Its own test binary, so its
//! own control plane: no other operator may watch these namespaces.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vault_registrar::crd::VaultCluster;
use vault_registrar_testkit::cluster::{Operator, SimCluster, wait_endpoints};
use vault_registrar_testkit::controlplane::free_port;
use vault_registrar_testkit::pods::create_namespace;
use vault_registrar_testkit::stage::install_crd;
use vault_registrar_testkit::tools::promtool;
use vault_registrar_testkit::vault_sim::Role;
use vault_registrar_testkit::{shared, wait};

const LIMIT: Duration = Duration::from_secs(30);

async fn get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}

/// The value of a metric line that starts with `prefix`.
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `promtool check metrics` on a /metrics response: it must find no problem at all.
fn lint_metrics(response: &str) -> anyhow::Result<()> {
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .ok_or_else(|| anyhow::anyhow!("not an HTTP response: {response}"))?;
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut lint = Command::new(promtool()?)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    lint.stdin.take().unwrap().write_all(body.as_bytes())?;
    let out = lint.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{body}"
    );
    assert!(
        body.contains("# HELP vault_registrar_cluster_pods "),
        "{body}"
    );
    Ok(())
}

#[tokio::test]
async fn one_operator_serves_every_namespace_with_metrics_and_json_logs() -> anyhow::Result<()> {
    let plane = shared();
    let crd = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crds/vaultclusters.vault-registrar.dev.yaml");
    install_crd(plane, &crd).await?;
    let client = plane.client().await?;
    let mut clusters = Vec::new();
    for ns in ["wide-a", "wide-b"] {
        create_namespace(&client, ns).await?;
        let vault =
            SimCluster::start(&client, ns, "vault", &[Role::Standby, Role::Active], None).await?;
        let vc: VaultCluster = serde_yaml::from_str(&format!(
            "apiVersion: vault-registrar.dev/v1alpha1\nkind: VaultCluster\nmetadata: {{name: vault, namespace: {ns}}}\nspec:\n  selector: {{matchLabels: {{app.kubernetes.io/name: vault}}}}\n  health: {{interval: 500ms, timeout: 300ms}}\n"
        ))?;
        kube::Api::<VaultCluster>::namespaced(client.clone(), ns)
            .create(&Default::default(), &vc)
            .await?;
        clusters.push((ns, vault));
    }
    let (port, health_port) = (free_port()?, free_port()?);
    let log = plane.dir().join("operator-wide.log");
    let args = [
        format!("--metrics-bind-address=127.0.0.1:{port}"),
        format!("--health-probe-bind-address=127.0.0.1:{health_port}"),
        "--log-format=json".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let operator = Operator::start(
        env!("CARGO_BIN_EXE_vault-registrar").as_ref(),
        &plane.kubeconfig,
        &args,
        &log,
    )?;
    for (ns, vault) in &clusters {
        vault
            .wait_labels("vault-active", &[Some("false"), Some("true")], LIMIT)
            .await?;
        wait_endpoints(&client, ns, "vault-active", &[vault.ip(1)], LIMIT).await?;
    }

    let health = get(health_port, "/healthz").await?;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let ready = get(health_port, "/readyz").await?;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let elsewhere = get(port, "/healthz").await?;
    assert!(elsewhere.starts_with("HTTP/1.1 404"), "{elsewhere}");
    // A round sets its gauges before it sends the status they come from, so the scrape
    // waits for the status patches too (CI once scraped between the two).
    let text = wait::until(
        "metrics with both clusters ready and their status written",
        LIMIT,
        || async {
            let text = get(port, "/metrics").await?;
            let ready = |ns: &str| {
                metric(
                    &text,
                    &format!(
                        "vault_registrar_cluster_condition{{cluster=\"vault\",condition=\"Ready\",namespace=\"{ns}\"}}"
                    ),
                )
            };
            let statuses = metric(&text, "vault_registrar_status_writes_total").unwrap_or(0.0);
            Ok((ready("wide-a") == Some(1.0) && ready("wide-b") == Some(1.0) && statuses >= 2.0)
                .then_some(text))
        },
    )
    .await?;
    assert!(
        metric(&text, "vault_registrar_pod_label_writes_total").unwrap_or(0.0) >= 4.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "vault_registrar_probes_total{cluster=\"vault\",namespace=\"wide-a\",outcome=\"active\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "vault_registrar_probe_duration_seconds_count{result=\"ok\"}"
        )
        .unwrap_or(0.0)
            >= 4.0,
        "{text}"
    );
    // What it cost the API server, counted by its own clients: the label patches among
    // them, the pod watch, and no request answered with an error status.
    let api = |labels: &str| {
        metric(
            &text,
            &format!("vault_registrar_rest_client_requests_total{{{labels}}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(
        api("code=\"200\",resource=\"pods\",verb=\"patch\"") >= 4.0,
        "{text}"
    );
    assert!(
        api("code=\"200\",resource=\"pods\",verb=\"watch\"") >= 1.0,
        "{text}"
    );
    assert!(
        api("code=\"201\",resource=\"vaultclusters/status\",verb=\"patch\"")
            + api("code=\"200\",resource=\"vaultclusters/status\",verb=\"patch\"")
            >= 2.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "vault_registrar_rest_client_request_duration_seconds_count{resource=\"pods\",verb=\"patch\"}"
        )
        .unwrap_or(0.0)
            >= 4.0,
        "{text}"
    );
    assert_eq!(metric(&text, "vault_registrar_leader"), Some(1.0));
    assert_eq!(
        metric(
            &text,
            "vault_registrar_cluster_pods{cluster=\"vault\",namespace=\"wide-a\",role=\"standby\"}"
        ),
        Some(1.0)
    );

    assert!(
        metric(&text, "vault_registrar_build_info{version=").is_some(),
        "{text}"
    );
    assert!(
        metric(&text, "process_resident_memory_bytes").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    lint_metrics(&text)?;

    // A deleted VaultCluster takes its series with it; the other keeps its own.
    kube::Api::<VaultCluster>::namespaced(client.clone(), "wide-b")
        .delete("vault", &Default::default())
        .await?;
    wait::until("wide-b's series gone", LIMIT, || async {
        let text = get(port, "/metrics").await?;
        Ok((!text.contains("namespace=\"wide-b\"")).then_some(()))
    })
    .await?;
    let text = get(port, "/metrics").await?;
    assert!(
        metric(
            &text,
            "vault_registrar_cluster_active_pod{cluster=\"vault\",namespace=\"wide-a\",pod=\"vault-1\"}"
        ) == Some(1.0),
        "{text}"
    );
    lint_metrics(&text)?;

    let logs = operator.log_text();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        // Flat, as zap's production encoder writes: what log pipelines for operators parse.
        for key in ["ts", "level", "msg", "logger"] {
            assert!(
                parsed.get(key).is_some_and(|v| v.is_string()),
                "{key}: {line}"
            );
        }
        assert!(parsed.get("fields").is_none(), "{line}");
    }
    assert!(logs.contains("labels written"), "{logs}");
    Ok(())
}

/// `--metrics-secure`: /metrics over HTTPS with the certificate given, answered only to a
/// token the API server authenticates and authorises for get on /metrics: 401 without one,
/// 403 for a ServiceAccount without the right, the metrics for one bound to a reader role.
#[tokio::test]
async fn secure_metrics_answer_only_authorised_scrapers() -> anyhow::Result<()> {
    use rustls::pki_types::pem::PemObject;
    use std::sync::Arc;
    use vault_registrar_testkit::certs::Authority;
    use vault_registrar_testkit::stage::run;

    let plane = shared();
    let ns = "wide-secure";
    let client = plane.client().await?;
    create_namespace(&client, ns).await?;
    let manifest = plane.dir().join("metrics-reader.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: prometheus, namespace: {ns}}}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: nobody, namespace: {ns}}}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: wide-metrics-reader}}\nrules: [{{nonResourceURLs: [/metrics], verbs: [get]}}]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: wide-metrics-reader}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: wide-metrics-reader}}\nsubjects: [{{kind: ServiceAccount, name: prometheus, namespace: {ns}}}]\n"
        ),
    )?;
    run(plane.kubectl().args(["apply", "-f"]).arg(&manifest))?;
    let token = |sa: &str| run(plane.kubectl().args(["create", "token", sa, "-n", ns]));
    let (reader, nobody) = (token("prometheus")?, token("nobody")?);

    let authority = Authority::new("metrics-ca")?;
    let pem = authority.serving(&["localhost", "127.0.0.1"])?;
    let certs = plane.dir().join("metrics-tls");
    std::fs::create_dir_all(&certs)?;
    std::fs::write(certs.join("tls.crt"), &pem.cert)?;
    std::fs::write(certs.join("tls.key"), &pem.key)?;
    let (port, health_port) = (free_port()?, free_port()?);
    let args = [
        format!("--metrics-bind-address=127.0.0.1:{port}"),
        format!("--health-probe-bind-address=127.0.0.1:{health_port}"),
        format!("--namespace={ns}"),
        "--metrics-secure".to_string(),
        format!("--metrics-cert-dir={}", certs.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _operator = Operator::start(
        env!("CARGO_BIN_EXE_vault-registrar").as_ref(),
        &plane.kubeconfig,
        &args,
        &plane.dir().join("operator-secure.log"),
    )?;

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(authority.cert_pem().as_bytes()) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let scrape = |token: Option<String>| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost")?;
            let mut tls = connector.connect(name, tcp).await?;
            let auth = token
                .map(|t| format!("Authorization: Bearer {}\r\n", t.trim()))
                .unwrap_or_default();
            tls.write_all(
                format!(
                    "GET /metrics HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?;
            let mut text = String::new();
            tls.read_to_string(&mut text).await?;
            anyhow::Ok(text)
        }
    };
    let anonymous = wait::until("the secure metrics server", LIMIT, || async {
        Ok(scrape(None).await.ok())
    })
    .await?;
    assert!(anonymous.starts_with("HTTP/1.1 401"), "{anonymous}");
    let refused = scrape(Some(nobody)).await?;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    let bogus = scrape(Some("not-a-token".into())).await?;
    assert!(bogus.starts_with("HTTP/1.1 401"), "{bogus}");
    let allowed = scrape(Some(reader)).await?;
    assert!(allowed.starts_with("HTTP/1.1 200"), "{allowed}");
    assert!(allowed.contains("vault_registrar_build_info"), "{allowed}");
    // Plain HTTP on that port gets no metrics.
    let plain = get(port, "/metrics").await.unwrap_or_default();
    assert!(!plain.contains("vault_registrar_build_info"), "{plain}");
    Ok(())
}
