//! vault-registrar: labels Vault and OpenBao pods with their HA role from outside, and keeps
//! the active and standby Services pointing at the right pods.

pub mod api_metrics;
pub mod apiclient;
pub mod cli;
pub mod cluster_metrics;
pub mod controller;
pub mod crd;
pub mod decide;
pub mod error;
pub mod fail_static;
pub mod fair;
pub mod fault;
pub mod fdlimit;
pub mod health;
pub mod health_state;
pub mod http1;
pub mod index;
pub mod keepalive;
pub mod labels;
pub mod leader;
pub mod lease;
pub mod log_format;
pub mod metrics;
pub mod pod_view;
pub mod probe;
pub mod recorder;
pub mod rhythm;
pub mod secure_metrics;
pub mod selector;
pub mod server;
pub mod services;
pub mod status;
pub mod text;
pub mod tracker;
pub mod upgrade;
pub mod write_limit;

/// The CRD as YAML, as `vault-registrar crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&crd::VaultCluster::crd()).expect("CRD serialises")
}

/// A CRD's YAML (as `crd_yaml` gives it) as the chart's template: rendered when
/// crds.enabled, so `helm upgrade` updates it, with the release's labels, and kept on
/// uninstall when crds.keep, so uninstalling never deletes every VaultCluster with it.
pub fn crd_chart_template(crd_yaml: &str) -> String {
    let spec = crd_yaml
        .find("\nspec:\n")
        .expect("a CRD has a spec after its metadata");
    assert!(
        !crd_yaml.contains("{{"),
        "Helm would read the CRD's text as a template"
    );
    let head = &crd_yaml[..spec];
    assert!(
        head.ends_with("\nmetadata:\n  name: vaultclusters.vault-registrar.dev"),
        "the CRD's metadata holds only its name: {head}"
    );
    format!(
        r#"{{{{- /* Generated from src/crd.rs by `make crds`; edit the Rust types, not this file. */}}}}
{{{{- if .Values.crds.enabled }}}}
{head}
  labels:
    {{{{- include "vault-registrar.labels" . | nindent 4 }}}}
    app.kubernetes.io/component: crd
  {{{{- if .Values.crds.keep }}}}
  annotations:
    helm.sh/resource-policy: keep
  {{{{- end }}}}{spec_onward}{{{{- end }}}}
"#,
        spec_onward = &crd_yaml[spec..],
    )
}
