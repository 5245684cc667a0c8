//! Connection reuse for probes: an idle HTTP/1.1 connection to a pod is kept after an answer
//! and used for the next probe of the same pod with the same settings, so a steady probe
//! costs one request, not a TCP (and TLS) handshake. A connection the pod closed is never
//! handed out; a reused connection that breaks before a whole answer (closed, reset, cut
//! off) is replaced by a fresh one within the same probe, so reuse never turns into a probe
//! failure.
//!
//! A kept connection is closed once it has been idle for the pool's expiry: a pod that is no
//! longer probed (deleted, unselected, its cluster gone, or this replica no longer leading)
//! would otherwise hold a socket for good, and one whose node vanished sends no FIN to tell.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::time::Instant;

use crate::http1::Stream;

/// How long a kept connection may sit unused. A pod in a settled cluster is probed at least
/// every `interval` (2s by default, at most 5m by the schema), so a minute keeps every
/// connection of the usual intervals (up to 30s) in use; a cluster probed more rarely pays a
/// handshake per round, which at that rate costs nothing worth a socket. A fixed bound, not a
/// multiple of the interval, because a connection outlives the cluster whose interval it
/// would use: the pod may have left it.
pub const IDLE_EXPIRY: Duration = Duration::from_secs(60);

/// Connections are shared only between probes with the same address and TLS settings.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    pub ip: IpAddr,
    pub port: u16,
    /// For https: the TLS settings' identity and the name verified.
    pub tls: Option<(u64, String)>,
}

/// One idle connection and when it was last used.
struct Kept {
    stream: Stream,
    since: Instant,
}

#[derive(Default)]
struct Idle {
    kept: HashMap<Key, Kept>,
    /// Told the number kept after every change.
    gauge: Option<IntGauge>,
    /// At most this many kept (None: no bound).
    limit: Option<usize>,
}

impl Idle {
    fn report(&self) {
        if let Some(gauge) = &self.gauge {
            gauge.set(self.kept.len() as i64);
        }
    }

    /// Drops what the pod closed and what sat unused too long; dropping a stream closes its
    /// socket.
    fn sweep(&mut self, expiry: Duration) {
        let now = Instant::now();
        self.kept
            .retain(|_, k| k.stream.idle_and_open() && now - k.since < expiry);
        self.report();
    }
}

/// Idle connections by key.
#[derive(Clone)]
pub struct Pool {
    idle: Arc<Mutex<Idle>>,
    expiry: Duration,
    sweeping: Arc<AtomicBool>,
}

impl Default for Pool {
    fn default() -> Self {
        Self::new(IDLE_EXPIRY)
    }
}

impl Pool {
    /// A pool whose connections are closed after `expiry` unused.
    pub fn new(expiry: Duration) -> Self {
        Self {
            idle: Arc::default(),
            expiry,
            sweeping: Arc::default(),
        }
    }

    /// Keeps at most `limit` connections from now on; a connection offered past it is
    /// closed.
    pub fn limit_to(&self, limit: usize) {
        self.idle.lock().unwrap().limit = Some(limit);
    }

    /// Reports the number of kept connections to `gauge` from now on.
    pub fn report_to(&self, gauge: IntGauge) {
        let mut idle = self.idle.lock().unwrap();
        idle.gauge = Some(gauge);
        idle.report();
    }

    /// An idle connection for `key` that is still open and not expired.
    pub fn take(&self, key: &Key) -> Option<Stream> {
        let mut idle = self.idle.lock().unwrap();
        let kept = idle.kept.remove(key);
        idle.report();
        kept.filter(|k| k.stream.idle_and_open() && k.since.elapsed() < self.expiry)
            .map(|k| k.stream)
    }

    /// Keeps a connection after a complete answer.
    pub fn put(&self, key: Key, stream: Stream) {
        self.start_sweeping();
        let mut idle = self.idle.lock().unwrap();
        let full = idle.limit.is_some_and(|limit| idle.kept.len() >= limit);
        if full && !idle.kept.contains_key(&key) {
            return;
        }
        let since = Instant::now();
        idle.kept.insert(key, Kept { stream, since });
        idle.report();
    }

    /// Connections kept now.
    pub fn len(&self) -> usize {
        self.idle.lock().unwrap().kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts, once, the task that expires connections even when no probe runs (a follower,
    /// every cluster deleted). Started from the first `put`, which runs on the runtime, so
    /// that a Prober can be built outside one.
    fn start_sweeping(&self) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        tokio::spawn(sweep(Arc::downgrade(&self.idle), self.expiry));
    }
}

/// Sweeps every quarter expiry, so a connection lives at most 1.25 expiries unused; ends
/// when the pool is dropped.
async fn sweep(idle: Weak<Mutex<Idle>>, expiry: Duration) {
    // A zero period would panic; a zero expiry keeps nothing anyway.
    let mut tick = tokio::time::interval((expiry / 4).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(idle) = idle.upgrade() else { return };
        idle.lock().unwrap().sweep(expiry);
    }
}
