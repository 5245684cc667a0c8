//! Test kit for vault-registrar: a real local control plane (etcd, kube-apiserver,
//! kube-controller-manager), simulated pods without a kubelet, a Vault health simulator, and
//! real Vault raft clusters whose nodes are those pods.

pub mod api_relay;
pub mod certs;
pub mod cluster;
pub mod controlplane;
pub mod downtime;
pub mod election;
pub mod evictions;
pub mod history;
pub mod image;
pub mod machine;
pub mod netns;
pub mod node;
pub mod pods;
pub mod real_vault;
pub mod relay;
pub mod release;
pub mod stage;
pub mod takeover;
pub mod tools;
pub mod vault_pods;
pub mod vault_sim;
pub mod wait;

pub use controlplane::{ControlPlane, shared};
