//! A TCP relay between an operator process and the API server, to play network faults:
//! `blackhole` keeps every connection open (and accepts new ones) but stops bytes in both
//! directions, as a dropped route does; `reset` sends RST on every connection; `restore`
//! lets bytes flow again. Bytes that arrive during a blackhole are lost, never delivered
//! late, so a stream that lived through one is broken and its client must reconnect.
//!
//! Run it on a multi-threaded runtime: it forwards from tasks of the caller's runtime.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub struct Relay {
    addr: SocketAddr,
    flowing: watch::Sender<bool>,
    resets: watch::Sender<u64>,
    tasks: Arc<Mutex<JoinSet<()>>>,
    accepted: Arc<AtomicUsize>,
}

impl Relay {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (flowing, _) = watch::channel(true);
        let (resets, _) = watch::channel(0u64);
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let accept = accept_loop(
            listener,
            upstream,
            flowing.clone(),
            resets.clone(),
            tasks.clone(),
            accepted.clone(),
        );
        tasks.lock().unwrap().spawn(accept);
        Ok(Self {
            addr,
            flowing,
            resets,
            tasks,
            accepted,
        })
    }

    /// Connections accepted so far: a client that reconnects after a reset raises it.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops every byte, on open and new connections alike; connections stay open.
    pub fn blackhole(&self) {
        self.flowing.send_replace(false);
    }

    /// Lets bytes flow again.
    pub fn restore(&self) {
        self.flowing.send_replace(true);
    }

    /// Resets (RST) every open connection on both sides.
    pub fn reset(&self) {
        self.resets.send_modify(|n| *n += 1);
    }

    /// A copy of `kubeconfig` whose API server is reached through this relay. The serving
    /// certificate names 127.0.0.1, so TLS verification still holds.
    pub fn kubeconfig(&self, kubeconfig: &Path, server: &str, out: &Path) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(kubeconfig)?;
        anyhow::ensure!(
            text.contains(server),
            "{} does not name {server}",
            kubeconfig.display()
        );
        let via = format!("https://{}", self.addr);
        std::fs::write(out, text.replace(server, &via))?;
        Ok(())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.abort_all();
        }
    }
}

/// The address part of an `https://host:port` URL.
pub fn server_addr(server: &str) -> anyhow::Result<SocketAddr> {
    let hostport = server
        .strip_prefix("https://")
        .unwrap_or(server)
        .trim_end_matches('/');
    Ok(hostport.parse()?)
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    flowing: watch::Sender<bool>,
    resets: watch::Sender<u64>,
    tasks: Arc<Mutex<JoinSet<()>>>,
    accepted: Arc<AtomicUsize>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let connection = relay_one(client, upstream, flowing.subscribe(), resets.subscribe());
        tasks.lock().unwrap().spawn(connection);
    }
}

async fn relay_one(
    mut client: TcpStream,
    upstream: SocketAddr,
    flowing: watch::Receiver<bool>,
    mut resets: watch::Receiver<u64>,
) {
    resets.mark_unchanged();
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let reset = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        tokio::select! {
            _ = futures::future::join(
                pump(client_read, server_write, flowing.clone()),
                pump(server_read, client_write, flowing),
            ) => false,
            _ = resets.changed() => true,
        }
    };
    if reset {
        // Linger zero turns the close into an RST, as a middlebox dropping state would.
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

/// Copies one direction; while the relay is blackholed what arrives is dropped.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut flowing: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !*flowing.borrow() {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // Not even the close passes a blackhole.
    let _ = flowing.wait_for(|f| *f).await;
    let _ = to.shutdown().await;
}
