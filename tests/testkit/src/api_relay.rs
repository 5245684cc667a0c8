//! An HTTP relay in front of kube-apiserver that holds chosen requests back for a while:
//! the slow answer to one request (the first pod LIST of a new term, say), which the TCP
//! relay (`relay`) cannot pick out of a TLS stream. It ends TLS with a certificate of its
//! own and forwards every request, watches included, as the plane's admin: an operator
//! behind it acts as the admin.
//!
//! Run it on a multi-threaded runtime: it serves from tasks of the caller's runtime.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::certs::Authority;
use crate::controlplane::ControlPlane;

/// Which requests to hold: method, path and query.
pub type Matcher = Box<dyn Fn(&http::Method, &http::Uri) -> bool + Send + Sync>;

struct Hold {
    matches: Matcher,
    delay: Duration,
    remaining: usize,
}

#[derive(Default)]
struct Holds {
    holds: Vec<Hold>,
    /// Requests held so far.
    held: usize,
}

pub struct ApiRelay {
    addr: SocketAddr,
    ca_pem: String,
    dir: PathBuf,
    holds: Arc<Mutex<Holds>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl ApiRelay {
    /// Listens on a free loopback port and forwards to `plane`'s API server.
    pub async fn start(plane: &ControlPlane) -> anyhow::Result<Self> {
        let ca = Authority::new("api-relay-ca")?;
        let serving = ca.serving(&["127.0.0.1"])?;
        let certs = CertificateDer::pem_slice_iter(serving.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(serving.key.as_bytes())?;
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let holds = Arc::new(Mutex::new(Holds::default()));
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let upstream = plane.client().await?;
        let accept = accept_loop(
            listener,
            TlsAcceptor::from(Arc::new(tls)),
            upstream,
            holds.clone(),
            tasks.clone(),
        );
        tasks.lock().unwrap().spawn(accept);
        Ok(Self {
            addr,
            ca_pem: ca.cert_pem(),
            dir: plane.dir().to_path_buf(),
            holds,
            tasks,
        })
    }

    /// Holds the next `count` requests that `matches` picks for `delay` each, then
    /// forwards them.
    pub fn hold(
        &self,
        matches: impl Fn(&http::Method, &http::Uri) -> bool + Send + Sync + 'static,
        delay: Duration,
        count: usize,
    ) {
        self.holds.lock().unwrap().holds.push(Hold {
            matches: Box::new(matches),
            delay,
            remaining: count,
        });
    }

    /// The URL a kubeconfig names to reach the API server through this relay.
    pub fn server(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// How many requests were held so far.
    pub fn held(&self) -> usize {
        self.holds.lock().unwrap().held
    }

    /// A kubeconfig that reaches the API server through this relay.
    pub fn kubeconfig(&self, name: &str) -> anyhow::Result<PathBuf> {
        let ca = self.dir.join(format!("api-relay-{name}-ca.crt"));
        std::fs::write(&ca, &self.ca_pem)?;
        let path = self.dir.join(format!("kubeconfig-api-relay-{name}"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: relay\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: relayed\n  user: {{}}\ncontexts:\n- name: relay\n  context: {{cluster: relay, user: relayed}}\ncurrent-context: relay\n",
            self.server(),
            ca.display()
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

impl Drop for ApiRelay {
    fn drop(&mut self) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.abort_all();
        }
    }
}

/// A LIST (not a watch) of pods, in any scope.
pub fn pod_list(method: &http::Method, uri: &http::Uri) -> bool {
    list_of("pods")(method, uri)
}

/// A LIST (not a watch) of one resource (its plural), in any scope.
pub fn list_of(resource: &'static str) -> impl Fn(&http::Method, &http::Uri) -> bool {
    move |method, uri| {
        let query = uri.query().unwrap_or_default();
        method == http::Method::GET
            && uri.path().rsplit('/').next() == Some(resource)
            && !query
                .split('&')
                .any(|p| p == "watch=true" || p == "watch=1")
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: TlsAcceptor,
    upstream: kube::Client,
    holds: Arc<Mutex<Holds>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (tls, upstream, holds) = (tls.clone(), upstream.clone(), holds.clone());
        tasks.lock().unwrap().spawn(async move {
            let Ok(stream) = tls.accept(stream).await else {
                return;
            };
            let service = service_fn(move |req| forward(req, upstream.clone(), holds.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The delay of the first hold that picks this request, counting it.
fn take_hold(holds: &Mutex<Holds>, method: &http::Method, uri: &http::Uri) -> Option<Duration> {
    let mut holds = holds.lock().unwrap();
    let hold = holds
        .holds
        .iter_mut()
        .find(|h| h.remaining > 0 && (h.matches)(method, uri))?;
    hold.remaining -= 1;
    let delay = hold.delay;
    holds.held += 1;
    Some(delay)
}

async fn forward(
    req: Request<Incoming>,
    upstream: kube::Client,
    holds: Arc<Mutex<Holds>>,
) -> Result<Response<kube::client::Body>, Infallible> {
    let (mut parts, body) = req.into_parts();
    if let Some(delay) = take_hold(&holds, &parts.method, &parts.uri) {
        tokio::time::sleep(delay).await;
    }
    // The upstream client sets its own host and credentials.
    parts.headers.remove(http::header::HOST);
    parts.headers.remove(http::header::AUTHORIZATION);
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return Ok(bad_gateway(&e.to_string())),
    };
    let req = Request::from_parts(parts, kube::client::Body::from(bytes.to_vec()));
    Ok(upstream
        .send(req)
        .await
        .unwrap_or_else(|e| bad_gateway(&e.to_string())))
}

fn bad_gateway(why: &str) -> Response<kube::client::Body> {
    let mut response = Response::new(kube::client::Body::from(why.as_bytes().to_vec()));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pod_lists_are_picked() {
        let cases = [
            ("GET", "/api/v1/namespaces/a/pods?limit=500", true),
            ("GET", "/api/v1/pods?resourceVersion=0", true),
            (
                "GET",
                "/api/v1/namespaces/a/pods?watch=true&resourceVersion=5",
                false,
            ),
            ("GET", "/api/v1/namespaces/a/pods/vault-0", false),
            ("PATCH", "/api/v1/namespaces/a/pods", false),
            ("GET", "/api/v1/namespaces/a/services", false),
            ("GET", "/api/v1/namespaces/a/mypods", false),
        ];
        for (method, uri, want) in cases {
            let method: http::Method = method.parse().unwrap();
            let uri: http::Uri = uri.parse().unwrap();
            assert_eq!(pod_list(&method, &uri), want, "{method} {uri}");
        }
    }
}
