//! The HTTP surface (hyper 1): `/infer` (the reference API), `/v1/chat/completions`
//! (OpenAI-compatible), health, readiness, metrics, the loaded policies and reload. Errors map to
//! status codes by exhaustive match; bodies never leak internals.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

use crate::gateway::edge::{ContextRequest, EdgeError, Report};
use crate::gateway::{Gateway, GatewayError, Outcome, Served};
use crate::queries::{parse_time, QueryParams, Question};
use crate::requests::{parse_chat, parse_infer, FieldErrors, H_TIER};

type Body = Full<Bytes>;
/// A response that ends request handling early.
type Reject = Response<Body>;

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
    let gw = Arc::clone(&gateway);
    let _ = tokio::task::spawn_blocking(move || gw.shutdown()).await;
    Ok(())
}

/// Bind `addr` (port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, code: &str, detail: Value) -> Response<Body> {
    json_response(status, &json!({"error": code, "detail": detail}))
}

/// An OpenAI-shaped error body.
fn openai_error(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: &str,
    param: Option<&str>,
) -> Response<Body> {
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
    )
}

async fn route(gw: &Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (Method::GET, "/readyz") => readyz(gw),
        (Method::GET, "/metrics") => metrics(gw),
        (Method::POST, "/infer") => infer(gw, req).await,
        (Method::POST, "/v1/chat/completions") => chat(gw, req).await,
        (Method::GET, "/v1/policies") => match authorize(gw, req.headers(), None) {
            Ok(()) => json_response(StatusCode::OK, &policies_json(gw)),
            Err(resp) => resp,
        },
        (Method::POST, "/v1/admin/reload") => match authorize(gw, req.headers(), Some("*")) {
            Ok(()) => reload(gw).await,
            Err(resp) => resp,
        },
        (Method::POST, "/v1/edge/context") => match authorize(gw, req.headers(), Some("*")) {
            Ok(()) => {
                gw.metrics().edge_call("context");
                edge_context(gw, req).await
            }
            Err(resp) => resp,
        },
        (Method::POST, "/v1/edge/report") => match authorize(gw, req.headers(), Some("*")) {
            Ok(()) => {
                gw.metrics().edge_call("report");
                edge_report(gw, req).await
            }
            Err(resp) => resp,
        },
        (Method::GET, "/v1/snapshot") => {
            snapshot(gw, req.headers(), req.uri().query().unwrap_or(""))
        }
        (Method::GET, p) if p.starts_with("/v1/queries/") => {
            match authorize(gw, req.headers(), Some("*")) {
                Ok(()) => query(
                    gw,
                    &p["/v1/queries/".len()..],
                    req.uri().query().unwrap_or(""),
                ),
                Err(resp) => resp,
            }
        }
        (
            _,
            "/healthz"
            | "/readyz"
            | "/metrics"
            | "/infer"
            | "/v1/chat/completions"
            | "/v1/policies"
            | "/v1/admin/reload"
            | "/v1/edge/context"
            | "/v1/edge/report",
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            json!(format!("{} is not supported on {path}", req.method())),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            json!({"message": format!("no endpoint {path}"), "endpoints": ["POST /infer", "POST /v1/chat/completions", "GET /healthz", "GET /readyz", "GET /metrics", "GET /v1/policies", "POST /v1/admin/reload", "GET /v1/queries/<name>", "GET /v1/snapshot", "POST /v1/edge/context", "POST /v1/edge/report"]}),
        ),
    }
}

fn readyz(gw: &Gateway) -> Response<Body> {
    let logs = gw.logs_healthy();
    let set = gw.policies();
    let body = json!({
        "ready": logs,
        "logs_writable": logs,
        "policy_file": set.source().display().to_string(),
        "rules": set.rules().count(),
    });
    json_response(
        if logs {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &body,
    )
}

fn metrics(gw: &Gateway) -> Response<Body> {
    let (buckets, settled) = gw.ledger().len();
    let text = gw.metrics().render(&[
        (
            "llmscope_logs_writable",
            "1 when the last log write succeeded.",
            if gw.logs_healthy() { 1.0 } else { 0.0 },
        ),
        (
            "llmscope_requests_in_flight",
            "Requests being handled (policy, provider call, logging).",
            gw.in_flight() as f64,
        ),
        (
            "llmscope_ledger_buckets",
            "Dimension tuples with in-flight or unsettled money.",
            buckets as f64,
        ),
        (
            "llmscope_ledger_settled_pending",
            "Settled requests not yet ingested.",
            settled as f64,
        ),
        (
            "llmscope_policy_rules",
            "Rules loaded.",
            gw.policies().rules().count() as f64,
        ),
        (
            "llmscope_edge_reservations_pending",
            "Envoy-filter requests reserved and waiting for their report.",
            gw.edge().pending() as f64,
        ),
        (
            "llmscope_uptime_seconds",
            "Seconds since start.",
            gw.uptime_s(),
        ),
    ]);
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

fn policies_json(gw: &Gateway) -> Value {
    let set = gw.policies();
    let components: Vec<Value> = set
        .components()
        .map(|c| json!({"name": c.info().name, "version": c.info().version, "description": c.info().description, "sha256": c.sha256(), "path": c.path().display().to_string()}))
        .collect();
    let namespaces: Map<String, Value> = set
        .namespaces()
        .map(|ns| {
            let rules: Vec<Value> = ns
                .rules()
                .iter()
                .map(|r| json!({"id": r.id(), "primitive": r.primitive(), "mode": r.mode(), "failure_mode": r.failure_mode(), "settings": serde_json::from_str::<Value>(r.settings_json()).unwrap_or(Value::Null), "aggregates": r.aggregates()}))
                .collect();
            (ns.name().to_owned(), json!({"rules": rules}))
        })
        .collect();
    json!({"source": set.source().display().to_string(), "version": set.version(), "components": components, "namespaces": namespaces})
}

/// `GET /v1/snapshot?tenant_id=..&route_name=..&model_tier=..&tokens_in=..[&feature_id..]`: the
/// priced context and each rule's current aggregate values for such a request.
fn snapshot(gw: &Gateway, headers: &HeaderMap, query_string: &str) -> Response<Body> {
    let params: std::collections::BTreeMap<String, String> =
        form_urlencoded::parse(query_string.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    let obj: Map<String, Value> = params
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let mut errs = FieldErrors::default();
    let tenant_id = errs.required(&obj, "tenant_id");
    let tokens_in = match params.get("tokens_in").map(|v| v.parse::<u32>()) {
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            errs.push("tokens_in", "must be a non-negative integer");
            0
        }
        None => {
            errs.push("tokens_in", "is required (input tokens of the request)");
            0
        }
    };
    let max_tokens = match params.get("max_tokens").map(|v| v.parse::<u32>()) {
        Some(Ok(n)) if n > 0 => Some(n),
        Some(_) => {
            errs.push("max_tokens", "must be a positive integer");
            None
        }
        None => None,
    };
    for key in params.keys() {
        if ![
            "tenant_id",
            "caller_id",
            "feature_id",
            "experiment_id",
            "budget_namespace",
            "route_name",
            "model_tier",
            "tokens_in",
            "max_tokens",
        ]
        .contains(&key.as_str())
        {
            errs.push(key, "unknown parameter");
        }
    }
    let q = crate::gateway::SnapshotQuery {
        caller_id: errs.optional(&obj, "caller_id"),
        feature_id: errs.optional(&obj, "feature_id"),
        experiment_id: errs.optional(&obj, "experiment_id"),
        budget_namespace: errs.optional(&obj, "budget_namespace"),
        route_name: errs
            .optional(&obj, "route_name")
            .unwrap_or_else(|| gw.config().default_route.clone()),
        model_tier: errs
            .optional(&obj, "model_tier")
            .unwrap_or_else(|| gw.config().default_tier.clone()),
        tenant_id,
        tokens_in,
        max_tokens,
    };
    if !errs.0.is_empty() {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            Value::Array(errs.0),
        );
    }
    if let Err(resp) = authorize(gw, headers, Some(&q.tenant_id)) {
        return resp;
    }
    match gw.snapshot_for(&q) {
        Ok(answer) => json_response(StatusCode::OK, &json!(answer)),
        Err(e) => gateway_error(&e),
    }
}

/// Header marking an edge-call error caused by the client's request (the filter relays it to
/// the client as is); any other failure of an edge call is the host's, and the filter applies
/// its host failure mode.
pub const CLIENT_ERROR_HEADER: &str = "x-llmscope-client-error";

/// Decode an edge call's JSON body into `T`, naming the field path on failure.
#[allow(
    clippy::result_large_err,
    reason = "the error is the HTTP response itself, built only for rejected requests"
)]
async fn read_edge<T: serde::de::DeserializeOwned>(
    gw: &Gateway,
    req: Request<Incoming>,
) -> Result<T, Reject> {
    let (_, body) = read_json(gw, req).await?;
    serde_path_to_error::deserialize(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_edge_call",
            json!(format!("{}: {}", e.path(), e.inner())),
        )
    })
}

fn edge_error(e: &EdgeError, chat: bool) -> Response<Body> {
    let mut resp = match e {
        EdgeError::InvalidInfer(fields) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            Value::Array(fields.clone()),
        ),
        EdgeError::InvalidChat(c) => openai_error(
            StatusCode::from_u16(c.status).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY),
            &c.message,
            "invalid_request_error",
            c.code,
            c.param.as_deref(),
        ),
        EdgeError::Gateway(g) if chat => {
            let code = match g {
                GatewayError::UnknownRoute { .. } => "unknown_route",
                GatewayError::UnknownTier { .. } => "unknown_tier",
                _ => "invalid_request",
            };
            openai_error(
                gateway_error(g).status(),
                &g.to_string(),
                "invalid_request_error",
                code,
                None,
            )
        }
        EdgeError::Gateway(g) => gateway_error(g),
        EdgeError::BadCall { .. } => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_edge_call",
                json!(e.to_string()),
            )
        }
        EdgeError::Unlogged(_) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "logs_unavailable",
                json!("the report could not be recorded; retry later (see /readyz)"),
            )
        }
        EdgeError::Overloaded(_) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "edge_overloaded",
                json!(e.to_string()),
            )
        }
    };
    resp.headers_mut()
        .insert(CLIENT_ERROR_HEADER, HeaderValue::from_static("true"));
    resp
}

/// `POST /v1/edge/context`: price a proxied request and snapshot a filter's aggregates.
async fn edge_context(gw: &Gateway, req: Request<Incoming>) -> Response<Body> {
    let call: ContextRequest = match read_edge(gw, req).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    match gw.edge().register(&call.aggregates) {
        // New aggregates: compute them before answering, so the first request already sees
        // the spend in the logs.
        Ok(true) => {
            if let Err(e) = tokio::task::block_in_place(|| gw.refresh()) {
                tracing::error!(error = %e, "aggregate refresh for new edge aggregates failed");
            }
        }
        Ok(false) => {}
        Err(e) => return edge_error(&e, false),
    }
    let chat = call.body.get("messages").is_some();
    match gw.edge_context(&call) {
        Ok(answer) => json_response(StatusCode::OK, &json!(answer)),
        Err(e) => edge_error(&e, chat),
    }
}

/// `POST /v1/edge/report`: record a proxied request's outcome.
async fn edge_report(gw: &Gateway, req: Request<Incoming>) -> Response<Body> {
    let report: Report = match read_edge(gw, req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match gw.edge_report(&report).await {
        Ok(first) => json_response(
            StatusCode::OK,
            &json!({"recorded": first, "duplicate": !first}),
        ),
        Err(e) => {
            let mut resp = edge_error(&e, false);
            // A report is never the client's fault from the filter's point of view.
            resp.headers_mut().remove(CLIENT_ERROR_HEADER);
            resp
        }
    }
}

/// `GET /v1/queries/<name>?threshold=0.05&since=2025-11-24&until=...`: one of the five
/// questions, answered from the logs ingested up to now.
fn query(gw: &Gateway, name: &str, query_string: &str) -> Response<Body> {
    let Some(question) = Question::from_name(name) else {
        let names: Vec<&str> = Question::ALL.iter().map(|q| q.name()).collect();
        return error(
            StatusCode::NOT_FOUND,
            "unknown_query",
            json!({"message": format!("no query `{name}`"), "queries": names}),
        );
    };
    let mut params = QueryParams::default();
    let mut errs = Vec::new();
    for (key, value) in form_urlencoded::parse(query_string.as_bytes()) {
        match key.as_ref() {
            "threshold" => match value.parse::<f64>() {
                Ok(t) if t.is_finite() && t >= 0.0 => params.threshold_usd = t,
                _ => errs.push(json!({"field": "threshold", "message": "must be a non-negative number of USD"})),
            },
            "since" | "until" => match parse_time(&value) {
                Ok(us) if key == "since" => params.since_us = Some(us),
                Ok(us) => params.until_us = Some(us),
                Err(message) => errs.push(json!({"field": key, "message": message})),
            },
            other => errs.push(json!({"field": other, "message": "unknown parameter; use threshold, since, until"})),
        }
    }
    if !errs.is_empty() {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            Value::Array(errs),
        );
    }
    let answer = tokio::task::block_in_place(|| {
        gw.ingest()?;
        crate::queries::run(gw.engine(), question, &params)
    });
    match answer {
        Ok(a) => json_response(StatusCode::OK, &json!(a)),
        Err(e) => {
            tracing::error!(error = %e, query = name, "query failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "query_failed",
                json!("the query failed; see the gateway log"),
            )
        }
    }
}

async fn reload(gw: &Gateway) -> Response<Body> {
    // Compiling components is CPU work; keep it off the async workers.
    let result = tokio::task::block_in_place(|| gw.reload_policies());
    match result {
        Ok(set) => json_response(
            StatusCode::OK,
            &json!({"reloaded": true, "rules": set.rules().count(), "version": set.version()}),
        ),
        Err(e) => {
            let problems: Vec<Value> = e
                .problems()
                .iter()
                .map(|p| json!({"at": p.at, "message": p.message}))
                .collect();
            json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({"reloaded": false, "error": "invalid_policy_config", "detail": e.to_string(), "problems": problems, "serving": "previous policy set"}),
            )
        }
    }
}

/// Check the API key (when keys are configured) and that it may act for `tenant`.
#[allow(
    clippy::result_large_err,
    reason = "the error is the HTTP response itself, built only for rejected requests"
)]
fn authorize(gw: &Gateway, headers: &HeaderMap, tenant: Option<&str>) -> Result<(), Reject> {
    let keys = &gw.config().api_keys;
    if keys.is_empty() {
        return Ok(());
    }
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    let Some(presented) = presented else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            json!("missing API key: send `Authorization: Bearer <key>` or `x-api-key`"),
        ));
    };
    let Some(key) = gw.api_key(presented) else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            json!("invalid API key"),
        ));
    };
    match tenant {
        Some(t) if !key.allows(t) => Err(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            json!(format!("this API key may not act for tenant `{t}`")),
        )),
        _ => Ok(()),
    }
}

/// Read a JSON body: 415 unless `application/json`, 413 over the limit, 400 if malformed.
#[allow(
    clippy::result_large_err,
    reason = "the error is the HTTP response itself, built only for rejected requests"
)]
async fn read_json(gw: &Gateway, req: Request<Incoming>) -> Result<(HeaderMap, Value), Reject> {
    let (parts, body) = req.into_parts();
    let is_json = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
    if !is_json {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            json!("send the body as JSON with `Content-Type: application/json`"),
        ));
    }
    let limit = gw.config().max_body_bytes;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            json!(format!("request body exceeds {limit} bytes")),
        )
    };
    if parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > limit)
    {
        return Err(too_large());
    }
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(too_large())
        }
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                json!(format!("cannot read body: {e}")),
            ))
        }
    };
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            json!(format!("body is not valid JSON: {e}")),
        )
    })?;
    if !value.is_object() {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            json!([{"field": "(body)", "message": "must be a JSON object"}]),
        ));
    }
    Ok((parts.headers, value))
}

async fn infer(gw: &Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let (headers, body) = match read_json(gw, req).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let obj = body.as_object().cloned().unwrap_or_default();
    let inf = match parse_infer(&obj, &|h| header(&headers, h), gw.config()) {
        Ok(inf) => inf,
        Err(fields) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                Value::Array(fields),
            )
        }
    };
    if let Err(resp) = authorize(gw, &headers, Some(&inf.tenant_id)) {
        return resp;
    }
    match gw.handle(inf).await {
        Ok(Outcome::Served(s)) => json_response(StatusCode::OK, &infer_body(&s)),
        Ok(Outcome::Denied {
            request_id,
            evaluation,
        }) => {
            let reason = evaluation
                .reason
                .clone()
                .unwrap_or_else(|| "denied by policy".into());
            json_response(
                StatusCode::PAYMENT_REQUIRED,
                &json!({
                    "error": "policy_denied",
                    "reason": reason,
                    "policy_id": evaluation.policy_id,
                    "request_id": request_id,
                    "detail": format!("Request denied by policy: {reason}"),
                }),
            )
        }
        Err(e) => gateway_error(&e),
    }
}

fn infer_body(s: &Served) -> Value {
    json!({
        "request_id": s.request_id,
        "answer": s.completion.text,
        "selected_model": s.model,
        "estimated_cost_usd": s.estimated_cost_usd,
        "cost_usd": s.cost_usd,
        "tokens_in": s.tokens_in,
        "tokens_out": s.tokens_out,
        "policy_decision": s.evaluation.decision.as_str(),
        "policy_reason": s.evaluation.reason,
        "policy_id": s.evaluation.policy_id,
        "effective_model_tier": s.effective_tier,
        "provider": s.provider,
        "is_fallback": s.is_fallback,
        "alerts": s.evaluation.alerts,
    })
}

fn gateway_error(e: &GatewayError) -> Response<Body> {
    match e {
        GatewayError::UnknownRoute { route, known } => error(
            StatusCode::NOT_FOUND,
            "unknown_route",
            json!({"message": format!("unknown route `{route}`"), "known_routes": known.split(", ").collect::<Vec<_>>()}),
        ),
        GatewayError::UnknownTier { route, tier, known } => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            json!([{"field": "model_tier", "message": format!("route {route} has no tier `{tier}`; tiers: {known}")}]),
        ),
        GatewayError::ProvidersFailed(_) => error(
            StatusCode::BAD_GATEWAY,
            "provider_error",
            json!("every model in the fallback chain failed; see telemetry for details"),
        ),
        GatewayError::Unlogged(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "logs_unavailable",
            json!("the request could not be recorded, so it was not served; see /readyz"),
        ),
        GatewayError::Internal(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            json!("the request failed inside the gateway; see the gateway log"),
        ),
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

async fn chat(gw: &Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let (headers, body) = match read_json(gw, req).await {
        Ok(v) => v,
        Err(resp) => {
            // Re-shape the generic error into OpenAI's error object, keeping the status.
            let status = resp.status();
            return openai_error(
                status,
                status.canonical_reason().unwrap_or("bad request"),
                "invalid_request_error",
                "invalid_request",
                None,
            );
        }
    };
    let obj = body.as_object().cloned().unwrap_or_default();
    if obj.get("stream").and_then(Value::as_bool) == Some(true) {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "streaming is not supported by this gateway yet; send stream: false",
            "invalid_request_error",
            "unsupported_stream",
            Some("stream"),
        );
    }
    let inf = match parse_chat(&obj, &|h| header(&headers, h), gw.config()) {
        Ok(inf) => inf,
        Err(e) => {
            return openai_error(
                StatusCode::from_u16(e.status).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY),
                &e.message,
                "invalid_request_error",
                e.code,
                e.param.as_deref(),
            )
        }
    };
    if let Err(resp) = authorize(gw, &headers, Some(&inf.tenant_id)) {
        let status = resp.status();
        return openai_error(
            status,
            if status == StatusCode::FORBIDDEN {
                "this API key may not act for the tenant"
            } else {
                "missing or invalid API key"
            },
            "authentication_error",
            "invalid_api_key",
            None,
        );
    }
    match gw.handle(inf).await {
        Ok(Outcome::Served(s)) => {
            let created = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let body = json!({
                "id": format!("chatcmpl-{}", s.request_id),
                "object": "chat.completion",
                "created": created,
                "model": s.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": s.completion.text}, "finish_reason": s.completion.finish_reason}],
                "usage": {"prompt_tokens": s.tokens_in, "completion_tokens": s.tokens_out, "total_tokens": s.tokens_in + s.tokens_out},
            });
            let mut resp = json_response(StatusCode::OK, &body);
            let h = resp.headers_mut();
            for (name, value) in [
                ("x-llmscope-request-id", s.request_id.clone()),
                (
                    "x-llmscope-policy-decision",
                    s.evaluation.decision.as_str().to_owned(),
                ),
                (H_TIER, s.effective_tier.clone()),
                ("x-llmscope-cost-usd", format!("{:.8}", s.cost_usd)),
            ] {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    h.insert(name, v);
                }
            }
            resp
        }
        Ok(Outcome::Denied {
            request_id,
            evaluation,
        }) => {
            let reason = evaluation
                .reason
                .clone()
                .unwrap_or_else(|| "denied by policy".into());
            let mut resp = json_response(
                StatusCode::PAYMENT_REQUIRED,
                &json!({"error": {
                    "message": format!("Request denied by policy: {reason}"),
                    "type": "insufficient_quota",
                    "param": null,
                    "code": "policy_denied",
                    "policy_id": evaluation.policy_id,
                    "reason": reason,
                    "request_id": request_id,
                }}),
            );
            if let Ok(v) = HeaderValue::from_str(&request_id) {
                resp.headers_mut().insert("x-llmscope-request-id", v);
            }
            resp
        }
        Err(e) => {
            let status = gateway_error(&e).status();
            let (kind, code) = match &e {
                GatewayError::UnknownRoute { .. } => ("invalid_request_error", "unknown_route"),
                GatewayError::UnknownTier { .. } => ("invalid_request_error", "unknown_tier"),
                GatewayError::ProvidersFailed(_) => ("api_error", "provider_error"),
                GatewayError::Unlogged(_) => ("api_error", "logs_unavailable"),
                GatewayError::Internal(_) => ("api_error", "internal_error"),
            };
            let message = match &e {
                GatewayError::UnknownRoute { .. } | GatewayError::UnknownTier { .. } => {
                    e.to_string()
                }
                GatewayError::ProvidersFailed(_) => {
                    "every model in the fallback chain failed".to_owned()
                }
                GatewayError::Unlogged(_) => {
                    "the request could not be recorded, so it was not served".to_owned()
                }
                GatewayError::Internal(_) => "the request failed inside the gateway".to_owned(),
            };
            openai_error(status, &message, kind, code, None)
        }
    }
}
