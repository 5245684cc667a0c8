//! A bound on the controller client's writes in flight. A cold start of a thousand
//! VaultClusters otherwise sends a thousand rounds' writes at once; the API server answers
//! them slower than one at a time and then with 504s, which are retried and load it more.
//! Reads and watches pass freely: a watch stays open for minutes and must never wait for a
//! permit, nor take one.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request};
use tokio::sync::Semaphore;

use crate::api_metrics::Answer;

/// Writes in flight at most, like a plain client keeping 32 clusters' writes going.
pub const WRITES_IN_FLIGHT: usize = 32;

/// The layer kube's client builder stacks on its HTTP service.
#[derive(Clone)]
pub struct LimitWrites(pub Arc<Semaphore>);

impl LimitWrites {
    pub fn new(permits: usize) -> Self {
        Self(Arc::new(Semaphore::new(permits.max(1))))
    }
}

impl<S> tower::Layer<S> for LimitWrites {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Limited<S> {
        Limited {
            inner,
            permits: self.0.clone(),
        }
    }
}

pub struct Limited<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, ReqBody> tower::Service<Request<ReqBody>> for Limited<S>
where
    S: tower::Service<Request<ReqBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Answer<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let writes = request.method() != Method::GET && request.method() != Method::HEAD;
        let permits = writes.then(|| self.permits.clone());
        // The inner future sends nothing until polled, so the request waits for its permit.
        let answer = self.inner.call(request);
        Box::pin(async move {
            let _permit = match permits {
                Some(p) => Some(p.acquire_owned().await.expect("never closed")),
                None => None,
            };
            answer.await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tower::{Layer, Service};

    /// A service that answers after 20 ms and records the most requests in flight.
    #[derive(Clone, Default)]
    struct Slow {
        now: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
    }

    impl Service<Request<()>> for Slow {
        type Response = ();
        type Error = std::convert::Infallible;
        type Future = Answer<(), Self::Error>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            let (now, most) = (self.now.clone(), self.most.clone());
            Box::pin(async move {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            })
        }
    }

    async fn most_in_flight(method: Method, permits: usize, requests: usize) -> usize {
        let slow = Slow::default();
        let service = LimitWrites::new(permits).layer(slow.clone());
        let service = Arc::new(tokio::sync::Mutex::new(service));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..requests {
            let request = Request::builder().method(method.clone()).body(()).unwrap();
            let mut service = service.lock().await;
            std::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .unwrap();
            let answer = service.call(request);
            tasks.spawn(answer);
        }
        while tasks.join_next().await.is_some() {}
        slow.most.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn writes_wait_for_a_permit_and_reads_do_not() {
        // (method, permits, requests, most in flight)
        let cases = [
            (Method::PATCH, 3, 10, 3),
            (Method::POST, 1, 5, 1),
            (Method::DELETE, 4, 2, 2),
            (Method::GET, 2, 10, 10),
        ];
        for (method, permits, requests, most) in cases {
            let got = most_in_flight(method.clone(), permits, requests).await;
            assert_eq!(got, most, "{method} with {permits} permits");
        }
    }
}
