//! vault-registrar: labels Vault and OpenBao pods with their HA role from outside, and keeps
//! the active and standby Services pointing at the right pods.

pub mod apiclient;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod decide;
pub mod error;
pub mod fail_static;
pub mod fdlimit;
pub mod health;
pub mod health_state;
pub mod index;
pub mod keepalive;
pub mod labels;
pub mod leader;
pub mod lease;
pub mod metrics;
pub mod probe;
pub mod rhythm;
pub mod selector;
pub mod server;
pub mod services;
pub mod status;
pub mod tracker;

/// The CRD as YAML, as `vault-registrar crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&crd::VaultCluster::crd()).expect("CRD serialises")
}
