//! The command line: `run` starts the operator, `crd` prints the CRD.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand, ValueEnum};
use tracing::info;

use crate::leader::{self, LeaseSettings};
use crate::metrics::Metrics;
use crate::probe::Prober;
use crate::reconciler::{self, Context};
use crate::{duration, server};

#[derive(Parser, Debug)]
#[command(
    name = "vault-registrar",
    version,
    about = "Labels Vault/OpenBao pods with their HA role and keeps active/standby Services on the right pods"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator.
    Run(RunArgs),
    /// Print the VaultCluster CustomResourceDefinition as YAML.
    Crd,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Kubeconfig file; without it KUBECONFIG, ~/.kube/config or the in-cluster config is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Watch only these namespaces (repeatable); all namespaces when absent.
    #[arg(long = "namespace", env = "WATCH_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080", env = "METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// Most health probes in flight at once, over all clusters.
    #[arg(long, default_value_t = 64)]
    pub probe_concurrency: usize,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Elect a leader among replicas with a Lease; only the leader writes.
    #[arg(long)]
    pub leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, default_value = "vault-registrar")]
    pub lease_name: String,
    /// Namespace of the Lease; defaults to POD_NAMESPACE.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// How long the Lease holds without renewal (a Kubernetes duration).
    #[arg(long, default_value = "15s")]
    pub lease_duration: String,
    /// This replica's identity in the Lease; defaults to POD_NAME, then the host name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn client(args: &RunArgs) -> anyhow::Result<kube::Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// Runs the operator until SIGINT or SIGTERM.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = client(&args).await?;
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let listener = server::bind(args.metrics_addr).await?;
    info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    tokio::spawn(server::serve(listener, metrics.clone(), ready.clone()));
    client.apiserver_version().await?;
    ready.store(true, Ordering::SeqCst);

    let leading = Arc::new(AtomicBool::new(!args.leader_elect));
    let ctx = Context::new(
        client.clone(),
        Prober::new(args.probe_concurrency),
        metrics.clone(),
        leading.clone(),
    );
    let namespaces: Vec<Option<String>> = if args.namespaces.is_empty() {
        vec![None]
    } else {
        args.namespaces.iter().cloned().map(Some).collect()
    };
    let work = move || {
        let (ctx, namespaces) = (ctx.clone(), namespaces.clone());
        async move {
            futures::future::join_all(
                namespaces
                    .into_iter()
                    .map(|ns| reconciler::run(ctx.clone(), ns)),
            )
            .await;
        }
    };
    if !args.leader_elect {
        metrics.leader.set(1);
        work().await;
        return Ok(());
    }
    let settings = LeaseSettings {
        name: args.lease_name.clone(),
        namespace: args.lease_namespace.clone(),
        identity: args.identity.clone().unwrap_or_else(default_identity),
        duration: duration::parse(&args.lease_duration)
            .map_err(|e| anyhow::anyhow!("--lease-duration: {e}"))?,
    };
    tokio::select! {
        _ = leader::run(client.clone(), settings.clone(), leading.clone(), metrics.leader.clone(), work) => {}
        _ = shutdown_signal() => {
            leading.store(false, Ordering::SeqCst);
            leader::release(client, &settings).await;
        }
    }
    Ok(())
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
