//! Connection reuse for probes: an idle HTTP/1.1 connection to a pod is kept after an answer
//! and used for the next probe of the same pod with the same settings, so a steady probe
//! costs one request, not a TCP (and TLS) handshake. A connection the pod closed is never
//! handed out; a request that fails on a reused connection before any answer is retried on
//! a fresh one, so reuse never turns into a probe failure.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Empty;

/// The sending half of one HTTP/1.1 connection.
pub type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// Connections are shared only between probes with the same address and TLS settings.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    pub ip: IpAddr,
    pub port: u16,
    /// For https: the TLS settings' identity and the name verified.
    pub tls: Option<(u64, String)>,
}

/// Beyond this many idle connections, closed ones are swept out before another is kept.
const SWEEP_ABOVE: usize = 4096;

/// Idle connections by key.
#[derive(Clone, Default)]
pub struct Pool(Arc<Mutex<HashMap<Key, Sender>>>);

impl Pool {
    /// An idle connection for `key` that is still open.
    pub fn take(&self, key: &Key) -> Option<Sender> {
        self.0
            .lock()
            .unwrap()
            .remove(key)
            .filter(|sender| !sender.is_closed())
    }

    /// Keeps a connection after a complete answer.
    pub fn put(&self, key: Key, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.0.lock().unwrap();
        if idle.len() >= SWEEP_ABOVE {
            idle.retain(|_, s| !s.is_closed());
        }
        idle.insert(key, sender);
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
