//! What the operator costs the API server, as a user sees it in `/metrics`: every request
//! its Kubernetes clients send, counted by verb, resource and status code, and timed until
//! the answer's headers. A tower layer around kube's HTTP stack, so no call site can forget.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Method, Request, Response, Uri};
use prometheus::{HistogramVec, IntCounterVec};

/// The two series a request lands in.
#[derive(Clone)]
pub struct ApiMetrics {
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
}

impl ApiMetrics {
    fn observe(&self, call: &Call, code: &str, seconds: f64) {
        self.requests
            .with_label_values(&[call.verb, &call.resource, code])
            .inc();
        self.latency
            .with_label_values(&[call.verb, &call.resource])
            .observe(seconds);
    }
}

/// A request in Kubernetes' terms: `list` and `watch` are GETs of a collection, `get` of one
/// object; the resource keeps its subresource (`pods/status`, `pods/eviction`).
#[derive(Debug, PartialEq, Eq)]
pub struct Call {
    pub verb: &'static str,
    pub resource: String,
}

/// Names the request from its method and path, as the API server's audit log would.
pub fn call_of(method: &Method, uri: &Uri) -> Call {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let rest = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        // /version, /healthz, /openapi/...: not a resource.
        other => {
            return Call {
                verb: verb(method, true, false),
                resource: other.first().copied().unwrap_or("/").to_string(),
            };
        }
    };
    let object = match rest {
        ["namespaces", _ns, tail @ ..] if !tail.is_empty() => tail,
        _ => rest,
    };
    let (resource, named) = match object {
        [] => (String::new(), false),
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub, ..] => (format!("{resource}/{sub}"), true),
    };
    let watch = uri.query().is_some_and(is_watch);
    Call {
        verb: verb(method, named, watch),
        resource,
    }
}

fn is_watch(query: &str) -> bool {
    query
        .split('&')
        .any(|pair| matches!(pair, "watch=true" | "watch=1"))
}

fn verb(method: &Method, named: bool, watch: bool) -> &'static str {
    match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => "other",
    }
}

/// The label value of an answer: its status code, or `error` when none came (refused,
/// reset, timed out).
fn code_of<B, E>(result: &Result<Response<B>, E>) -> String {
    match result {
        Ok(response) => response.status().as_u16().to_string(),
        Err(_) => "error".to_string(),
    }
}

/// The layer kube's client builder stacks on its HTTP service.
#[derive(Clone)]
pub struct CountRequests(pub ApiMetrics);

impl<S> tower::Layer<S> for CountRequests {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            metrics: self.0.clone(),
        }
    }
}

pub struct Counted<S> {
    inner: S,
    metrics: ApiMetrics,
}

pub(crate) type Answer<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for Counted<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Answer<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let call = call_of(request.method(), request.uri());
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let result = answer.await;
            metrics.observe(&call, &code_of(&result), started.elapsed().as_secs_f64());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_named_as_the_api_server_names_them() {
        let cases = [
            ("GET", "/api/v1/pods?labelSelector=a", "list", "pods"),
            (
                "GET",
                "/api/v1/pods?watch=true&resourceVersion=5",
                "watch",
                "pods",
            ),
            ("GET", "/api/v1/namespaces/ns/pods/vault-0", "get", "pods"),
            (
                "PATCH",
                "/api/v1/namespaces/ns/pods/vault-0",
                "patch",
                "pods",
            ),
            (
                "PATCH",
                "/apis/vault-registrar.dev/v1alpha1/namespaces/ns/vaultclusters/v/status",
                "patch",
                "vaultclusters/status",
            ),
            (
                "POST",
                "/api/v1/namespaces/ns/pods/vault-0/eviction",
                "create",
                "pods/eviction",
            ),
            (
                "POST",
                "/apis/events.k8s.io/v1/namespaces/ns/events",
                "create",
                "events",
            ),
            (
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l",
                "update",
                "leases",
            ),
            (
                "DELETE",
                "/api/v1/namespaces/ns/services/s",
                "delete",
                "services",
            ),
            (
                "DELETE",
                "/api/v1/namespaces/ns/services",
                "deletecollection",
                "services",
            ),
            // The namespaces resource itself, not a namespaced one.
            ("GET", "/api/v1/namespaces/ns", "get", "namespaces"),
            ("GET", "/api/v1/namespaces", "list", "namespaces"),
            ("GET", "/version", "get", "version"),
            (
                "GET",
                "/apis/discovery.k8s.io/v1/endpointslices?watch=1",
                "watch",
                "endpointslices",
            ),
        ];
        for (method, uri, verb, resource) in cases {
            let call = call_of(&method.parse().unwrap(), &uri.parse().unwrap());
            assert_eq!(
                call,
                Call {
                    verb,
                    resource: resource.to_string()
                },
                "{method} {uri}"
            );
        }
    }
}
