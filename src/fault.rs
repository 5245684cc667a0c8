//! A fault a test can arm in a running replica: with the hidden flag
//! `--fault-stall-on-sigusr1`, SIGUSR1 stops the loops that must keep turning (the election
//! and the API ping) while the process and its probe servers stay up, as a deadlocked loop
//! would. It lets an end-to-end test prove that the kubelet's liveness probe restarts such a
//! replica. Off unless the flag is given; nothing else reads the signal.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::signal::unix::{SignalKind, signal};
use tracing::warn;

static STALLED: AtomicBool = AtomicBool::new(false);

/// Stalls the loops at their next turn once SIGUSR1 arrives.
pub fn arm_stall_on_sigusr1() -> std::io::Result<()> {
    let mut usr1 = signal(SignalKind::user_defined1())?;
    tokio::spawn(async move {
        if usr1.recv().await.is_some() {
            warn!("SIGUSR1 with --fault-stall-on-sigusr1: the control loops stop turning");
            STALLED.store(true, Ordering::SeqCst);
        }
    });
    Ok(())
}

/// Never returns once the fault fired; returns at once otherwise.
pub async fn stall_if_fired() {
    if STALLED.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
}
