//! The chart and the value sets the tests install, render and upgrade it with. Every set is
//! linted with `helm lint --strict` (tests/ops.rs), and `values` refuses a set that is not
//! listed here, so no test uses values that have not been linted.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use std::time::Duration;

use vault_registrar_testkit::cluster::{SimCluster, wait_endpoints};
use vault_registrar_testkit::shared;
use vault_registrar_testkit::stage::run_blocking;

/// The real helm against the shared control plane.
pub async fn helm(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = shared().helm();
    cmd.args(args);
    run_blocking(cmd).await
}

/// The real kubectl against the shared control plane.
pub async fn kubectl(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = shared().kubectl();
    cmd.args(args);
    run_blocking(cmd).await
}

/// Waits for a trio under VaultCluster `vault` to converge: labels, the active Service's
/// endpoints and the Ready condition.
pub async fn converged(client: &kube::Client, vault: &SimCluster, ns: &str) -> anyhow::Result<()> {
    let limit = Duration::from_secs(30);
    let want = [Some("true"), Some("false"), Some("false")];
    vault.wait_labels("vault-active", &want, limit).await?;
    wait_endpoints(client, ns, "vault-active", &[vault.ip(0)], limit).await?;
    kubectl(&[
        "wait",
        "--for=condition=Ready",
        "vc/vault",
        "-n",
        ns,
        "--timeout=30s",
    ])
    .await?;
    Ok(())
}

/// The args of the first container of a Deployment as the API server holds it: what the
/// chart rendered, for running the operator as its pod would.
pub async fn deployed_args(ns: &str, deployment: &str) -> anyhow::Result<Vec<String>> {
    let args = kubectl(&[
        "get",
        &format!("deployment/{deployment}"),
        "-n",
        ns,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].args}",
    ])
    .await?;
    Ok(serde_json::from_str(&args)?)
}

pub fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/vault-registrar")
}

/// `helm template` renders offline for Kubernetes 1.20 unless told; the chart needs 1.30.
pub const KUBE_VERSION: &str = "--kube-version=1.35.0";

/// Every ServiceAccount may set the ownership label: see "shared-crd".
const SHARED_PLANE: &str = "admissionPolicy.ownershipLabelWriters.groups={system:serviceaccounts}";

pub const VALUE_SETS: &[(&str, &[&str])] = &[
    ("defaults", &[]),
    // The image built here, as tests/node.rs and `make demo` install the chart on a node.
    (
        "local-image",
        &vault_registrar_testkit::release::LOCAL_IMAGE_VALUES,
    ),
    // The same, with the test-only stall fault armed (tests/node.rs, liveness).
    (
        "local-image-stall-fault",
        &vault_registrar_testkit::release::STALL_FAULT_VALUES,
    ),
    // Beside a CRD installed with kubectl, as every test on a shared control plane does;
    // several releases share that plane, and each one's "-ownership-label" policy would
    // refuse the others' operators the ownership label: every ServiceAccount may write it.
    (
        "shared-crd",
        &["--set", "crds.enabled=false", "--set", SHARED_PLANE],
    ),
    (
        "shared-crd-three-replicas",
        &[
            "--set",
            "crds.enabled=false,replicaCount=3",
            "--set",
            SHARED_PLANE,
        ],
    ),
    (
        "shared-crd-namespaced",
        &[
            "--set",
            "crds.enabled=false,watchNamespaces={ship-ns-a,ship-ns-b}",
            "--set",
            SHARED_PLANE,
        ],
    ),
    (
        "shared-crd-secret-namespace",
        &[
            "--set",
            "crds.enabled=false,tls.secretNamespaces={ship-cs-listed},tls.secretNames={vault-ca}",
            "--set",
            SHARED_PLANE,
        ],
    ),
    // Alone on its control plane (tests/admission.rs): the policies as the defaults ship
    // them, the CRD installed with kubectl.
    ("shared-crd-fenced", &["--set", "crds.enabled=false"]),
    ("namespaces", &["--set", "watchNamespaces={a,b}"]),
    (
        "secret-namespaces",
        &["--set", "tls.secretNamespaces={a,b}"],
    ),
    ("crd-not-kept", &["--set", "crds.keep=false"]),
    (
        "monitoring",
        &[
            "--set",
            "serviceMonitor.enabled=true,prometheusRule.enabled=true,grafanaDashboard.enabled=true",
        ],
    ),
    ("network-policy", &["--set", "networkPolicy.enabled=true"]),
    (
        "exposed-services",
        &[
            "--set",
            "allowedServiceTypes={ClusterIP,LoadBalancer},allowedServiceAnnotations={prometheus.io/*,example.com/team}",
        ],
    ),
    // What a platform team sets: the image by digest, the PDB as maxUnavailable, slower
    // probes, no aggregation into the default roles.
    (
        "platform",
        &[
            "--set",
            "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "--set",
            "podDisruptionBudget.maxUnavailable=50%,livenessProbe.periodSeconds=30,readinessProbe.failureThreshold=6",
            "--set",
            "rbac.aggregateToDefaultRoles=false",
        ],
    ),
    (
        "secure-metrics",
        &["--set", "metrics.secure=true,serviceMonitor.enabled=true"],
    ),
    (
        "secure-metrics-cert",
        &[
            "--set",
            "metrics.secure=true,metrics.certSecret=metrics-tls,serviceMonitor.enabled=true",
        ],
    ),
    (
        "openshift",
        &[
            "--set",
            "podSecurityContext.runAsUser=null,podSecurityContext.runAsGroup=null",
        ],
    ),
    (
        "overrides",
        &[
            "--set",
            "logLevel=info\\,vault_registrar=debug,logFormat=text,priorityClassName=system-cluster-critical",
            "--set",
            "extraArgs={--startup-timeout=2m}",
            "--set-json",
            r#"extraEnv=[{"name":"RUST_BACKTRACE","value":"1"}]"#,
            "--set-json",
            r#"topologySpreadConstraints=[{"maxSkew":1,"topologyKey":"topology.kubernetes.io/zone","whenUnsatisfiable":"DoNotSchedule"}]"#,
            "--set",
            "serviceMonitor.enabled=true,serviceMonitor.honorLabels=false,serviceMonitor.scrapeTimeout=5s",
            "--set-json",
            r#"serviceMonitor.relabelings=[{"targetLabel":"team","replacement":"platform"}]"#,
        ],
    ),
];

/// The helm arguments of a listed value set.
pub fn values(name: &str) -> Vec<&'static str> {
    VALUE_SETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("value set {name} is not in VALUE_SETS, so it is not linted"))
        .1
        .to_vec()
}
