//! Errors that name what failed and in which object.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listing pods for VaultCluster {cluster}: {source}")]
    ListPods {
        cluster: String,
        source: kube::Error,
    },
    #[error("patching labels of pod {pod} for VaultCluster {cluster}: {source}")]
    PatchPod {
        cluster: String,
        pod: String,
        source: kube::Error,
    },
    #[error("writing Service {service} for VaultCluster {cluster}: {source}")]
    WriteService {
        cluster: String,
        service: String,
        source: kube::Error,
    },
    #[error("reading Service {service} for VaultCluster {cluster}: {source}")]
    ReadService {
        cluster: String,
        service: String,
        source: kube::Error,
    },
    #[error("reading EndpointSlices of Service {service} for VaultCluster {cluster}: {source}")]
    ReadEndpoints {
        cluster: String,
        service: String,
        source: kube::Error,
    },
    #[error("updating status of VaultCluster {cluster}: {source}")]
    UpdateStatus {
        cluster: String,
        source: kube::Error,
    },
    /// `object`: "ConfigMap <name>" or "Secret <name>".
    #[error("reading the CA bundle in {object} for VaultCluster {cluster}: {source}")]
    ReadCa {
        cluster: String,
        object: String,
        source: kube::Error,
    },
    #[error("finalizer of VaultCluster {cluster}: {message}")]
    Finalizer { cluster: String, message: String },
    #[error("not the leader: write to {0} withheld")]
    NotLeader(String),
}

impl Error {
    /// A short label for the errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ListPods { .. } => "list_pods",
            Self::PatchPod { .. } => "patch_pod",
            Self::WriteService { .. } => "write_service",
            Self::ReadService { .. } => "read_service",
            Self::ReadEndpoints { .. } => "read_endpoints",
            Self::UpdateStatus { .. } => "update_status",
            Self::ReadCa { .. } => "read_ca",
            Self::Finalizer { .. } => "finalizer",
            Self::NotLeader(_) => "not_leader",
        }
    }
}
