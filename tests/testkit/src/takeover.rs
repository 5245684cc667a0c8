//! Takeover time of a standing-by replica, after the leader is SIGKILLed, blackholed from the
//! API server, or stopped with SIGTERM: from the fault to the moment the Lease names the
//! other replica. For `make bench`.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::controlplane::ControlPlane;
use crate::election::{Replica, wait_holder};
use crate::pods::create_namespace;
use crate::wait;

#[derive(Clone, Copy, Debug)]
pub enum Fault {
    Kill,
    Blackhole,
    Terminate,
}

/// One measurement in namespace `ns` (created here) with the given lease duration.
pub async fn measure(
    plane: &ControlPlane,
    bin: &Path,
    ns: &str,
    lease: &str,
    fault: Fault,
) -> anyhow::Result<Duration> {
    let client = plane.client().await?;
    create_namespace(&client, ns).await?;
    let lease_arg = format!("--leader-elect-lease-duration={lease}");
    let args = [
        "--leader-elect",
        &lease_arg,
        "--lease-namespace",
        ns,
        "--namespace",
        ns,
    ];
    let limit = Duration::from_secs(60);
    let mut a = Replica::start(plane, bin, &plane.kubeconfig, &format!("{ns}-a"), &args).await?;
    wait_holder(&client, ns, "vault-registrar", &a.id, limit).await?;
    let b = Replica::start(plane, bin, &plane.kubeconfig, &format!("{ns}-b"), &args).await?;
    wait::until("b standing by", limit, || async {
        Ok(
            (b.health("/readyz").await == Some(200) && b.leader_gauge().await == Some(0.0))
                .then_some(()),
        )
    })
    .await?;
    // A moment into the leader's renewal cycle, as a fault would strike at any time.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let struck = Instant::now();
    match fault {
        Fault::Kill => a.operator.kill(),
        Fault::Blackhole => a.relay.blackhole(),
        Fault::Terminate => a.operator.terminate(),
    }
    wait_holder(&client, ns, "vault-registrar", &b.id, limit).await?;
    Ok(struck.elapsed())
}
