//! The HTTP side of the edge control plane (`POST /v1/edge/context`, `POST /v1/edge/report`;
//! the bookkeeping is [`crate::gateway::edge`]). Errors about the client's request (invalid
//! body, unknown route or tier) are rendered in the client's dialect and, from a context call,
//! marked with [`CLIENT_ERROR_HEADER`](llmscope_sdk::http::CLIENT_ERROR_HEADER) for the filter
//! to relay; any other error is the host's, and the filter applies its host failure mode.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use super::error::{ApiError, Dialect};
use super::request::{authenticate_edge, json_response, read_json, Body};
use crate::gateway::edge::{ContextRequest, EdgeError, Report};
use crate::gateway::{Gateway, GatewayError};

/// `POST /v1/edge/context`: price a proxied request and snapshot a filter's aggregates.
pub async fn context(gw: &Gateway, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let key = authenticate_edge(gw, req.headers())?.key;
    gw.metrics().edge_call("context");
    let call: ContextRequest = read_edge(gw, req).await?;
    match gw.edge().register(&call.aggregates) {
        // New aggregates: compute them before answering, so the first request already sees
        // the spend in the logs.
        Ok(true) => {
            if let Err(e) = tokio::task::block_in_place(|| gw.refresh()) {
                tracing::error!(error = %e, "aggregate refresh for new edge aggregates failed");
            }
        }
        Ok(false) => {}
        Err(e) => return Err(edge_error(e, false, true)),
    }
    let chat = call.body.get("messages").is_some();
    let answer = gw
        .edge_context(&call, key)
        .await
        .map_err(|e| edge_error(e, chat, true))?;
    Ok(json_response(StatusCode::OK, &json!(answer)))
}

/// `POST /v1/edge/report`: record a proxied request's outcome.
/// Recording runs on its own task: a filter that gives up waiting (its call timed out) cannot
/// cut it off between taking the reservation and writing the lines.
pub async fn report(gw: &Arc<Gateway>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let key = authenticate_edge(gw, req.headers())?.key.cloned();
    gw.metrics().edge_call("report");
    let report: Report = read_edge(gw, req).await?;
    let detached = Arc::clone(gw);
    let recorded = tokio::spawn(async move { detached.edge_report(&report, key.as_ref()).await })
        .await
        .map_err(|e| {
            ApiError::Gateway(GatewayError::Internal(format!(
                "edge report task failed: {e}"
            )))
        })?;
    // A report is never the client's fault from the filter's point of view: nothing is relayed.
    let first = recorded.map_err(|e| edge_error(e, false, false))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"recorded": first, "duplicate": !first}),
    ))
}

/// Decode an edge call's JSON body into `T`, naming the field path on failure.
async fn read_edge<T: serde::de::DeserializeOwned>(
    gw: &Gateway,
    req: Request<Incoming>,
) -> Result<T, ApiError> {
    let (_, body) = read_json(gw, req).await?;
    serde_path_to_error::deserialize(Value::Object(body))
        .map_err(|e| ApiError::BadEdgeCall(format!("{}: {}", e.path(), e.inner())))
}

/// The API error of an edge error. `chat`: the client's request is a chat-completions one
/// (route and tier errors then take OpenAI's shape); `relay`: mark client errors for relaying.
fn edge_error(e: EdgeError, chat: bool, relay: bool) -> ApiError {
    let dialect = |chat: bool| {
        if chat {
            Dialect::OpenAi
        } else {
            Dialect::Reference
        }
    };
    let client = |error: ApiError, dialect| ApiError::ClientRequest {
        error: Box::new(error),
        dialect,
        relay,
    };
    match e {
        EdgeError::InvalidInfer(fields) => {
            client(ApiError::InvalidFields(fields), Dialect::Reference)
        }
        EdgeError::InvalidChat(c) => client(ApiError::InvalidChat(c), Dialect::OpenAi),
        EdgeError::Gateway(g) => client(ApiError::Gateway(g), dialect(chat)),
        EdgeError::BadCall { .. } => ApiError::BadEdgeCall(e.to_string()),
        EdgeError::Unlogged(_) => ApiError::EdgeReportUnlogged,
        // The client's request names a tenant the edge key may not act for: the filter
        // answers the client 403 (never fails open on it).
        EdgeError::TenantForbidden { tenant } => {
            client(ApiError::Forbidden { tenant }, dialect(chat))
        }
        EdgeError::PromptTooLarge { size, limit, chat } => {
            client(ApiError::PromptTooLarge { size, limit }, dialect(chat))
        }
        EdgeError::Overloaded(_)
        | EdgeError::TenantOverloaded { .. }
        | EdgeError::SharedUnavailable(_) => ApiError::EdgeOverloaded(e.to_string()),
    }
}
