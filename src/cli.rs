//! The command line: `run` starts the operator, `crd` prints the CRD.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::controller::{self, Context};
use crate::crd::parse_duration;
use crate::health_state::{self, HealthState, Limits};
use crate::leader::{self, Clients, Leadership, LeaseSettings};
use crate::lease::Timing;
use crate::metrics::Metrics;
use crate::probe::Prober;
use crate::server::{self, Endpoints};
use crate::{apiclient, fdlimit, secure_metrics};

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
    Run(Box<RunArgs>),
    /// Print the VaultCluster CustomResourceDefinition as YAML.
    Crd {
        /// Print it as the Helm chart's template (behind crds.enabled, kept on uninstall
        /// with crds.keep), as `make crds` writes it.
        #[arg(long)]
        chart_template: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Kubeconfig file; without it KUBECONFIG, ~/.kube/config or the in-cluster config is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Watch only these namespaces (repeatable); all namespaces when absent.
    #[arg(long = "namespace", env = "WATCH_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Address of /metrics, e.g. ":8080" or "127.0.0.1:8080".
    #[arg(long = "metrics-bind-address", alias = "metrics-addr", default_value = ":8080",
          env = "METRICS_ADDR", value_parser = server::parse_bind_address)]
    pub metrics_addr: SocketAddr,
    /// Address of /healthz (liveness) and /readyz (readiness), e.g. ":8081".
    #[arg(long = "health-probe-bind-address", default_value = ":8081",
          env = "HEALTH_PROBE_ADDR", value_parser = server::parse_bind_address)]
    pub health_addr: SocketAddr,
    /// Most health probes in flight at once, over all clusters; shared fairly between
    /// namespaces, one alone taking at most half.
    #[arg(long, default_value_t = 64)]
    pub probe_concurrency: usize,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Which logs to write: a level (error, warn, info, debug, trace) or tracing filter
    /// directives such as "info,vault_registrar=debug". RUST_LOG, when set, wins.
    #[arg(long, default_value = "info,kube=warn", env = "LOG_LEVEL", value_parser = parse_log_filter)]
    pub log_level: String,
    /// Elect a leader among replicas with a Lease; only the leader writes.
    #[arg(long)]
    pub leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, default_value = "vault-registrar")]
    pub lease_name: String,
    /// Namespace of the Lease; defaults to POD_NAMESPACE, then to the client's namespace
    /// (in a pod, its ServiceAccount's; else the kubeconfig context's, else "default").
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long followers wait after the last renewal they saw before taking the Lease.
    #[arg(long = "leader-elect-lease-duration", alias = "lease-duration",
          default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// How long a leader keeps writing without a successful renewal; must be less than the
    /// lease duration. Default: 2/3 of the lease duration (10s for 15s).
    #[arg(long = "leader-elect-renew-deadline", value_parser = parse_duration)]
    pub renew_deadline: Option<Duration>,
    /// How often replicas try to acquire or renew; must be less than the renew deadline.
    /// Default: 2/15 of the lease duration (2s for 15s).
    #[arg(long = "leader-elect-retry-period", value_parser = parse_duration)]
    pub retry_period: Option<Duration>,
    /// How long the API server may stay silent at start-up before /healthz fails, so the
    /// kubelet restarts a replica that cannot start.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub startup_timeout: Duration,
    /// Serve /metrics over HTTPS, only to bearer tokens the API server authenticates and
    /// authorises for get on the non-resource URL /metrics (TokenReview, SubjectAccessReview).
    #[arg(long, env = "METRICS_SECURE")]
    pub metrics_secure: bool,
    /// Directory with tls.crt and tls.key for the secure metrics server; a self-signed
    /// certificate is made at start without it.
    #[arg(long, requires = "metrics_secure")]
    pub metrics_cert_dir: Option<PathBuf>,
    /// Test-only fault: SIGUSR1 stops the control loops (see `fault`).
    #[arg(long, hide = true)]
    pub fault_stall_on_sigusr1: bool,
    /// Service types a VaultCluster may ask for (comma-separated); others are a spec problem.
    #[arg(long, value_delimiter = ',', default_value = "ClusterIP")]
    pub allowed_service_types: Vec<crate::crd::ServiceType>,
    /// Annotation keys a VaultCluster's Services may carry (comma-separated; `prefix*` allows
    /// every key it begins); others are a spec problem. None by default.
    #[arg(long, value_delimiter = ',')]
    pub allowed_service_annotations: Vec<String>,
    /// This replica's identity in the Lease; defaults to POD_NAME, then the host name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Threads that run the operator's tasks. One keeps a thousand clusters' probes on
    /// schedule (0.24 cores); at that scale two cost more CPU (0.54-0.57 cores against
    /// 0.34-0.50 for one, measured before the probe client was rewritten), spent waking each
    /// other (see README, "Scale"). Raise it only when one core cannot keep up.
    #[arg(long, default_value_t = 1, env = "WORKER_THREADS",
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: u16,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_log_filter(text: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(text)
        .map(|_| text.to_string())
        .map_err(|e| format!("not a log level or filter: {e}"))
}

pub fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.event_format(crate::log_format::FlatJson).init(),
        LogFormat::Text => builder.init(),
    }
}

/// How long a non-elected replica waits for its controller to drain on shutdown.
const DRAIN_BOUND: Duration = Duration::from_secs(5);

/// Runs the operator until SIGINT or SIGTERM.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    // First, so a SIGTERM during start-up is a stop, not the default kill.
    let stop = stop_on_signal();
    let soft = match fdlimit::raise_nofile() {
        Ok((soft, hard)) => {
            info!(soft, hard, "open-file limit");
            soft
        }
        Err(e) => {
            warn!(error = %e, "could not raise the open-file limit; assuming 1024");
            1024
        }
    };
    let kept_connections = fdlimit::kept_connections(soft);
    let timing = Timing::new(args.lease_duration, args.renew_deadline, args.retry_period)?;
    let config = apiclient::load_config(args.kubeconfig.as_deref()).await?;
    let metrics = Metrics::new();
    let client = apiclient::controller_client(&config, &metrics.api)?;
    // Lease rounds and pings: every request bounded well inside the renew deadline.
    let quick = apiclient::client_with(
        &config,
        timing.retry_period.max(Duration::from_secs(1)),
        timing.renew_deadline,
        &metrics.api,
    )?;
    let leading = Arc::new(AtomicBool::new(false));
    let health = Arc::new(HealthState::new(
        Limits {
            api_fresh: timing.lease_duration,
            stall: timing.lease_duration * 2,
            startup: args.startup_timeout,
        },
        leading.clone(),
    ));
    start_servers(&args, &config, &metrics, &health).await?;
    if args.fault_stall_on_sigusr1 {
        crate::fault::arm_stall_on_sigusr1()?;
    }
    tokio::spawn(health_state::ping_api(
        quick.clone(),
        health.clone(),
        timing.retry_period,
    ));
    if !await_api(&health, stop.clone()).await {
        return Ok(());
    }
    let namespaces: Vec<Option<String>> = if args.namespaces.is_empty() {
        vec![None]
    } else {
        args.namespaces.iter().cloned().map(Some).collect()
    };
    let ctx = Context::new(
        client.clone(),
        Prober::new(args.probe_concurrency)
            .keeping_at_most(kept_connections)
            .reporting_to(metrics.probe_connections.clone()),
        metrics.clone(),
        leading.clone(),
        namespaces.clone(),
        crate::services::Allowed {
            types: args.allowed_service_types.clone(),
            annotations: args.allowed_service_annotations.clone(),
        },
    );
    ctx.set_eviction_client(apiclient::eviction_client(&config, &metrics.api)?);
    let work = work(ctx, namespaces, health.clone(), stop.clone());
    if !args.leader_elect {
        leading.store(true, Ordering::SeqCst);
        metrics.leader.set(1);
        return run_unelected(work(), stop).await;
    }
    let settings = LeaseSettings {
        name: args.lease_name.clone(),
        namespace: args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone()),
        identity: args.identity.clone().unwrap_or_else(default_identity),
        timing,
    };
    info!(identity = %settings.identity, ?timing, "campaigning for the lease");
    let leadership = Leadership::new(leading, metrics.clone(), timing.renew_deadline);
    let clients = Clients {
        lease: quick,
        watch: client,
    };
    leader::run(clients, settings, leadership, health, work, stopped(stop)).await?;
    Ok(())
}

/// A scraper's token review: quick, so a scrape never waits on a slow API server long.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

async fn start_servers(
    args: &RunArgs,
    config: &kube::Config,
    metrics: &Metrics,
    health: &Arc<HealthState>,
) -> anyhow::Result<()> {
    let listener = server::bind(args.metrics_addr).await?;
    let (gate, tls) = if args.metrics_secure {
        let client = apiclient::client_with(config, CONNECT_TIMEOUT, REVIEW_TIMEOUT, &metrics.api)?;
        let tls = secure_metrics::acceptor(args.metrics_cert_dir.as_deref())?;
        (Some(secure_metrics::Gate::new(client)), Some(tls))
    } else {
        (None, None)
    };
    info!(addr = %listener.local_addr()?, secure = args.metrics_secure, "serving /metrics");
    tokio::spawn(server::serve(
        listener,
        Endpoints::Metrics(metrics.clone(), gate),
        tls,
    ));
    let listener = server::bind(args.health_addr).await?;
    info!(addr = %listener.local_addr()?, "serving /healthz and /readyz");
    tokio::spawn(server::serve(
        listener,
        Endpoints::Health(health.clone()),
        None,
    ));
    Ok(())
}

/// Waits for the API server's first answer; false when asked to stop first.
async fn await_api(health: &HealthState, stop: watch::Receiver<bool>) -> bool {
    let mut stop = std::pin::pin!(stopped(stop));
    while !health.has_answered() {
        tokio::select! {
            _ = &mut stop => return false,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    true
}

/// The leader's work: one controller per watched namespace, all sharing the Context's
/// caches, and the readiness flag raised once every cache listed in this term. Each term
/// starts from nothing the previous one saw. On `stop` the controllers drain their
/// reconciles and the work ends.
fn work(
    ctx: Arc<Context>,
    namespaces: Vec<Option<String>>,
    health: Arc<HealthState>,
    stop: watch::Receiver<bool>,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
    move || {
        let (ctx, namespaces, health) = (ctx.clone(), namespaces.clone(), health.clone());
        let stop = stop.clone();
        Box::pin(async move {
            ctx.new_term();
            health.set_synced(false);
            let runs = futures::future::join_all(
                namespaces
                    .iter()
                    .cloned()
                    .map(|ns| controller::run(ctx.clone(), ns, stop_signal(stop.clone()))),
            );
            let synced = async {
                ctx.clusters_synced().await;
                health.set_synced(true);
                info!("caches synced");
                std::future::pending::<()>().await
            };
            tokio::select! {
                _ = runs => {}
                _ = synced => {}
            }
        })
    }
}

/// `stop` as a future the controller can hold (it must be `Sync`, which a borrowed
/// `watch::Receiver` wait is not).
fn stop_signal(stop: watch::Receiver<bool>) -> impl Future<Output = ()> + Send + Sync + 'static {
    let (mut tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::select! {
            _ = stopped(stop) => {}
            _ = tx.closed() => return,
        }
        let _ = tx.send(());
    });
    async move {
        let _ = rx.await;
    }
}

async fn run_unelected(
    work: impl Future<Output = ()>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut work = std::pin::pin!(work);
    tokio::select! {
        // The controllers end on the same signal, and may see it first.
        _ = &mut work => {
            if !*stop.borrow() {
                anyhow::bail!("the controller stopped unexpectedly");
            }
            return Ok(());
        }
        _ = stopped(stop.clone()) => {}
    }
    // The controller drains its reconciles on the same signal; give it a bound.
    if tokio::time::timeout(DRAIN_BOUND, work).await.is_err() {
        warn!(bound = ?DRAIN_BOUND, "reconciles still running at shutdown; dropped");
    }
    Ok(())
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

/// A flag that turns true on SIGINT or SIGTERM.
fn stop_on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        info!("shutdown requested");
        let _ = tx.send(true);
    });
    rx
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, String> {
        let mut argv = vec!["vault-registrar", "run"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv) {
            Ok(Cli {
                command: Command::Run(a),
            }) => Ok(*a),
            Ok(_) => Err("not run".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn flags_and_their_old_names() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.metrics_addr.to_string(), "[::]:8080");
        assert_eq!(a.health_addr.to_string(), "[::]:8081");
        assert_eq!(a.lease_duration, Duration::from_secs(15));
        let a = parse(&["--metrics-addr=127.0.0.1:9", "--lease-duration=4s"]).unwrap();
        assert_eq!(a.metrics_addr.to_string(), "127.0.0.1:9");
        assert_eq!(a.lease_duration, Duration::from_secs(4));
        let a = parse(&[
            "--metrics-bind-address=:7000",
            "--health-probe-bind-address=127.0.0.1:7001",
            "--leader-elect-lease-duration=6s",
            "--leader-elect-renew-deadline=4s",
            "--leader-elect-retry-period=500ms",
        ])
        .unwrap();
        assert_eq!(a.metrics_addr.to_string(), "[::]:7000");
        assert_eq!(a.health_addr.to_string(), "127.0.0.1:7001");
        assert_eq!(a.renew_deadline, Some(Duration::from_secs(4)));
        assert_eq!(a.retry_period, Some(Duration::from_millis(500)));
        let e = parse(&["--health-probe-bind-address=8081"]).unwrap_err();
        assert!(e.contains("--health-probe-bind-address"), "{e}");
    }

    #[test]
    fn invalid_timing_names_the_flags() {
        let a = parse(&[
            "--leader-elect-lease-duration=5s",
            "--leader-elect-renew-deadline=6s",
        ])
        .unwrap();
        let e = Timing::new(a.lease_duration, a.renew_deadline, a.retry_period).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("--leader-elect-renew-deadline")
                && text.contains("--leader-elect-lease-duration"),
            "{text}"
        );
    }

    #[test]
    fn old_names_stay_out_of_the_help() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let run = cmd.find_subcommand_mut("run").unwrap();
        let help = run.render_long_help().to_string();
        assert!(help.contains("--leader-elect-renew-deadline"), "{help}");
        assert!(!help.contains("--metrics-addr"), "{help}");
        assert!(!help.contains("--lease-duration "), "{help}");
    }
}
