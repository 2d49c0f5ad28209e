//! The HTTP surface (hyper 1): [`serve`] and the route table. Each endpoint's handler lives
//! with its API: [`infer`] (`/infer`, the reference API), [`openai`] (`/v1/chat/completions`,
//! streamed by [`stream`]), [`embeddings`] (`/v1/embeddings`), [`models`] (`/v1/models`),
//! [`edge`] (the Envoy filters' control plane, `/v1/edge/*`) and [`admin`] (health, readiness,
//! metrics, policies, reload, queries, snapshots); [`request`] reads bodies and API keys. Handlers
//! return [`ApiError`]s, which the route table renders in the endpoint's [`Dialect`].

mod admin;
mod edge;
mod embeddings;
mod error;
mod infer;
mod models;
mod openai;
mod redact;
mod request;
mod stream;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub use error::{ApiError, Dialect};
pub use llmscope_sdk::http::CLIENT_ERROR_HEADER;
use request::Body;
pub use stream::{ResponseBody, SseBody};

use crate::gateway::Gateway;

/// Most bytes of request headers (HTTP/1 read buffer, HTTP/2 header list).
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// Most request header fields (HTTP/1).
pub const MAX_HEADERS: usize = 100;
/// How long shutdown waits for requests in flight.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a client has to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve `gateway` on `listener` until `shutdown` resolves; then stop accepting, let in-flight
/// requests finish (up to 30 s), and flush the logs.
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Bounded headers (431 beyond them) and no slow-header connections held forever.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // One permit per connection served: beyond `server.max_connections`, a connection is
    // answered 503 and closed at once, so idle or slow clients cannot exhaust the process.
    let max_connections = gateway.config().max_connections;
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                    refuse_connection(&stream, max_connections);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let gw = Arc::clone(&gateway);
                let service = hyper::service::service_fn(move |req| {
                    let gw = Arc::clone(&gw);
                    async move { Ok::<_, Infallible>(route(&gw, req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests");
    let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections did not finish within the drain timeout");
    }
    // Requests whose client left run on: wait for them to record what they spent. Those
    // still running at the deadline have their decision lines on disk, which the next start
    // counts at their estimate.
    let left = gateway
        .drained(deadline.saturating_duration_since(std::time::Instant::now()))
        .await;
    if left > 0 {
        tracing::warn!(
            requests = left,
            "requests still in flight at shutdown; the next start counts them at their estimate"
        );
    }
    // With the redis backend, write what the drain released before the lease stops being
    // renewed: a reservation left in Redis by a replica that is gone counts as spent. A few
    // tries, for a Redis that is slow for a moment; what is still unwritten counts as spent
    // until this replica starts again (conservative).
    if let Some(shared) = gateway.shared() {
        let mut written = false;
        for _ in 0..5 {
            written = shared.flush().await;
            if written {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !written {
            tracing::warn!("shared budget store: releases not written at shutdown; they count as spent until this replica starts again");
        }
    }
    let gw = Arc::clone(&gateway);
    let _ = tokio::task::spawn_blocking(move || gw.shutdown()).await;
    Ok(())
}

/// Answer a connection over the cap with a 503 (best effort, never waiting) and close it.
fn refuse_connection(stream: &tokio::net::TcpStream, max: usize) {
    tracing::warn!(
        max_connections = max,
        "connection refused: server.max_connections reached"
    );
    let body = format!(
        "{{\"error\":\"too_many_connections\",\"detail\":\"this gateway serves at most {max} \
         connections at once (server.max_connections); retry later\"}}"
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: \
         {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(response.as_bytes());
}

/// Bind `addr` (port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Every endpoint, as listed in a 404's body.
const ENDPOINTS: [&str; 15] = [
    "POST /infer",
    "POST /v1/chat/completions",
    "POST /v1/embeddings",
    "GET /v1/models",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /v1/policies",
    "POST /v1/admin/reload",
    "GET /v1/queries/<name>",
    "GET /v1/snapshot",
    "GET /v1/budgets",
    "GET /v1/report",
    "POST /v1/edge/context",
    "POST /v1/edge/report",
];

async fn route(gw: &Arc<Gateway>, req: Request<Incoming>) -> Response<ResponseBody> {
    if req.method() == Method::POST && req.uri().path() == "/v1/chat/completions" {
        return openai::chat(gw, req)
            .await
            .unwrap_or_else(|e| e.render(Dialect::OpenAi).map(ResponseBody::Left));
    }
    route_whole(gw, req).await.map(ResponseBody::Left)
}

/// Every endpoint answering in one piece.
async fn route_whole(gw: &Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().clone();
    let (dialect, result) = match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => (Dialect::Reference, Ok(admin::healthz())),
        (&Method::GET, "/readyz") => (Dialect::Reference, Ok(admin::readyz(gw))),
        (&Method::GET, "/metrics") => (Dialect::Reference, Ok(admin::metrics(gw))),
        (&Method::POST, "/infer") => (Dialect::Reference, infer::infer(gw, req).await),
        (&Method::POST, "/v1/embeddings") => {
            (Dialect::OpenAi, embeddings::embeddings(gw, req).await)
        }
        (&Method::GET, "/v1/models") => (Dialect::OpenAi, models::models(gw, req.headers())),
        (&Method::GET, "/v1/policies") => (Dialect::Reference, admin::policies(gw, req.headers())),
        (&Method::POST, "/v1/admin/reload") => {
            (Dialect::Reference, admin::reload(gw, req.headers()).await)
        }
        (&Method::POST, "/v1/edge/context") => (Dialect::Reference, edge::context(gw, req).await),
        (&Method::POST, "/v1/edge/report") => (Dialect::Reference, edge::report(gw, req).await),
        (&Method::GET, "/v1/budgets") => (Dialect::Reference, admin::budgets(gw, req.headers())),
        (&Method::GET, "/v1/report") => {
            (Dialect::Reference, admin::report(gw, req.headers(), &query))
        }
        (&Method::GET, "/v1/snapshot") => (
            Dialect::Reference,
            admin::snapshot(gw, req.headers(), &query).await,
        ),
        (&Method::GET, p) if p.starts_with("/v1/queries/") => (
            Dialect::Reference,
            admin::query(gw, req.headers(), &p["/v1/queries/".len()..], &query),
        ),
        (
            _,
            "/healthz"
            | "/readyz"
            | "/metrics"
            | "/infer"
            | "/v1/chat/completions"
            | "/v1/embeddings"
            | "/v1/models"
            | "/v1/policies"
            | "/v1/admin/reload"
            | "/v1/budgets"
            | "/v1/report"
            | "/v1/edge/context"
            | "/v1/edge/report",
        ) => (
            Dialect::Reference,
            Err(ApiError::MethodNotAllowed {
                method: method.clone(),
                path: path.clone(),
            }),
        ),
        _ => (
            Dialect::Reference,
            Err(ApiError::NotFound { path: path.clone() }),
        ),
    };
    result.unwrap_or_else(|e| e.render(dialect))
}
