//! An HTTP receiver for what the gateway sends out (webhook alerts, OTLP exports): the path
//! and body of every request, each answered 200 with an empty body.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::BodyExt;

use super::unreachable_io;

/// What was received, in order: (path, body).
type Received = Arc<Mutex<Vec<(String, Bytes)>>>;

/// A receiver on a loopback port; stops when dropped.
pub struct Receiver {
    /// Its port.
    pub port: u16,
    got: Received,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Listen on `port` (0: a free one).
    pub async fn start(port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| unreachable_io(&format!("receiver on port {port}"), e));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| unreachable_io("receiver address", e))
            .port();
        let got: Received = Arc::default();
        let store = Arc::clone(&got);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let store = Arc::clone(&store);
                            async move {
                                let path = req.uri().path().to_owned();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(http_body_util::Collected::to_bytes)
                                    .unwrap_or_default();
                                store
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .push((path, body));
                                Ok::<_, Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(Bytes::new()),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { port, got, task }
    }

    /// Everything received so far: (path, body), in order.
    pub fn received(&self) -> Vec<(String, Bytes)> {
        self.got
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
