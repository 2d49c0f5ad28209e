//! The two bodies of an [`ApiError`]: the reference shape and OpenAI's, and the texts both
//! share.

use llmscope_sdk::http::{deny_body, error_body, invalid_json_body, openai_error_body};
use serde_json::{json, Value};

use super::super::ENDPOINTS;
use super::ApiError;
use crate::config::KeyKind;
use crate::gateway::GatewayError;
use crate::queries::Question;

impl ApiError {
    /// The reference body: `{"error": code, "detail": ..}` (a denial adds its fields).
    pub(super) fn reference(&self) -> Value {
        let (code, detail) = match self {
            Self::MethodNotAllowed { method, path } => (
                "method_not_allowed",
                json!(format!("{method} is not supported on {path}")),
            ),
            Self::NotFound { path } => (
                "not_found",
                json!({"message": format!("no endpoint {path}"), "endpoints": ENDPOINTS}),
            ),
            Self::UnsupportedMediaType => (
                "unsupported_media_type",
                json!("send the body as JSON with `Content-Type: application/json`"),
            ),
            Self::PayloadTooLarge { limit } => (
                "payload_too_large",
                json!(format!("request body exceeds {limit} bytes")),
            ),
            Self::PromptTooLarge { .. } => ("prompt_too_large", json!(self.message())),
            Self::BodyTimeout { .. } => ("request_timeout", json!(self.message())),
            Self::NamespaceForbidden { .. } => ("namespace_forbidden", json!(self.message())),
            Self::WrongKeyKind { .. } => ("wrong_key_kind", json!(self.message())),
            Self::EdgeClosed => ("edge_closed", json!(self.message())),
            Self::UnknownNamespace { .. } => ("unknown_namespace", json!(self.message())),
            Self::UnreadableBody(e) => ("bad_request", json!(format!("cannot read body: {e}"))),
            Self::InvalidJson(e) => {
                return invalid_json_body(false, &format!("body is not valid JSON: {e}"))
            }
            Self::InvalidFields(fields) => ("invalid_request", Value::Array(fields.clone())),
            Self::MissingApiKey => (
                "unauthorized",
                json!("missing API key: send `Authorization: Bearer <key>` or `x-api-key`"),
            ),
            Self::InvalidApiKey => ("unauthorized", json!("invalid API key")),
            Self::Forbidden { tenant } => (
                "forbidden",
                json!(format!("this API key may not act for tenant `{tenant}`")),
            ),
            Self::InvalidChat(c) => (c.code, json!(c.message)),
            Self::Denied {
                reason,
                policy_id,
                request_id,
            } => return deny_body(false, reason, policy_id.as_deref(), request_id),
            Self::Gateway(g) => gateway_reference(g),
            Self::BadEdgeCall(m) => ("bad_edge_call", json!(m)),
            Self::EdgeReportUnlogged => (
                "logs_unavailable",
                json!("the report could not be recorded; retry later (see /readyz)"),
            ),
            Self::EdgeOverloaded(m) => ("edge_overloaded", json!(m)),
            Self::ClientRequest { error, .. } => return error.reference(),
            Self::UnknownQuery { name } => {
                let names: Vec<&str> = Question::ALL.iter().map(|q| q.name()).collect();
                (
                    "unknown_query",
                    json!({"message": format!("no query `{name}`"), "queries": names}),
                )
            }
            Self::QueryFailed => (
                "query_failed",
                json!("the query failed; see the gateway log"),
            ),
        };
        error_body(code, detail)
    }

    /// OpenAI's body: `{"error": {"message", "type", "param", "code"}}` (a denial adds its
    /// fields).
    pub(super) fn openai(&self) -> Value {
        let request = "invalid_request_error";
        let (message, kind, code, param) = match self {
            // Failures to read the request: the status says what is wrong.
            Self::MethodNotAllowed { .. }
            | Self::NotFound { .. }
            | Self::UnsupportedMediaType
            | Self::PayloadTooLarge { .. }
            | Self::UnreadableBody(_)
            | Self::InvalidJson(_)
            | Self::InvalidFields(_)
            | Self::BadEdgeCall(_)
            | Self::UnknownQuery { .. } => {
                let status = self.status();
                let reason = status.canonical_reason().unwrap_or("bad request");
                (reason.to_owned(), request, "invalid_request", None)
            }
            Self::MissingApiKey | Self::InvalidApiKey => (
                "missing or invalid API key".to_owned(),
                "authentication_error",
                "invalid_api_key",
                None,
            ),
            Self::WrongKeyKind { .. } | Self::EdgeClosed => {
                (self.message(), "permission_error", "wrong_key_kind", None)
            }
            Self::Forbidden { .. } => (
                "this API key may not act for the tenant".to_owned(),
                "authentication_error",
                "invalid_api_key",
                None,
            ),
            Self::PromptTooLarge { .. } => (
                self.message(),
                request,
                "prompt_too_large",
                Some("messages"),
            ),
            Self::BodyTimeout { .. } => (self.message(), request, "request_timeout", None),
            Self::NamespaceForbidden { .. } => (
                self.message(),
                "permission_error",
                "namespace_forbidden",
                Some("budget_namespace"),
            ),
            Self::UnknownNamespace { .. } => (
                self.message(),
                request,
                "unknown_namespace",
                Some("budget_namespace"),
            ),
            Self::InvalidChat(c) => (c.message.clone(), request, c.code, c.param.as_deref()),
            Self::Denied {
                reason,
                policy_id,
                request_id,
            } => return deny_body(true, reason, policy_id.as_deref(), request_id),
            Self::Gateway(g) => gateway_openai(g),
            Self::EdgeReportUnlogged => (
                "the report could not be recorded".to_owned(),
                "api_error",
                "logs_unavailable",
                None,
            ),
            Self::EdgeOverloaded(m) => (m.clone(), "api_error", "edge_overloaded", None),
            Self::ClientRequest { error, .. } => return error.openai(),
            Self::QueryFailed => (
                "the query failed".to_owned(),
                "api_error",
                "query_failed",
                None,
            ),
        };
        openai_error_body(&message, kind, code, param)
    }
}

impl ApiError {
    /// The text of the errors that read the same in both dialects.
    fn message(&self) -> String {
        let list = |names: &[String]| {
            if names.is_empty() {
                "none".to_owned()
            } else {
                names
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        match self {
            Self::PromptTooLarge { size, limit } => format!(
                "the prompt is {size} bytes; this gateway accepts at most {limit} bytes of \
                 message text (server.max_prompt_bytes)"
            ),
            Self::BodyTimeout { ms } => format!(
                "the request body did not arrive within {ms} ms (server.body_read_timeout_ms)"
            ),
            Self::NamespaceForbidden {
                key,
                namespace,
                allowed,
            } => format!(
                "API key {key} may not use budget namespace `{namespace}`; it may use: {} \
                 (auth.api_keys namespaces)",
                list(allowed)
            ),
            Self::UnknownNamespace {
                key,
                namespace,
                usable,
            } => format!(
                "budget namespace `{namespace}` is not defined in the policy; API key {key} may \
                 use: {}",
                list(usable)
            ),
            Self::WrongKeyKind { key, kind } => match kind {
                KeyKind::Edge => format!(
                    "API key {key} is an edge key (kind: edge): it may only call /v1/edge/*; \
                     use a client key here"
                ),
                KeyKind::Client => format!(
                    "API key {key} is a client key: /v1/edge/* needs a key of `kind: edge` \
                     in auth.api_keys (the one in the filters' host.api_key)"
                ),
            },
            Self::EdgeClosed => "the edge endpoints are closed: authentication is off, so \
                 anyone reaching them could reserve and report spend for any tenant; configure \
                 an API key with `kind: edge` (and set it as the filters' host.api_key), or set \
                 auth.unauthenticated_edge: true if only trusted proxies reach this port"
                .to_owned(),
            other => other
                .status()
                .canonical_reason()
                .unwrap_or("error")
                .to_owned(),
        }
    }
}

fn gateway_reference(g: &GatewayError) -> (&'static str, Value) {
    match g {
        GatewayError::UnknownRoute { route, known } => (
            "unknown_route",
            json!({"message": format!("unknown route `{route}`"), "known_routes": known}),
        ),
        GatewayError::UnknownTier { route, tier, known } => (
            "invalid_request",
            json!([{"field": "model_tier", "message": format!("route {route} has no tier `{tier}`; tiers: {known}")}]),
        ),
        GatewayError::EmbeddingsUnsupported { .. } => {
            ("embeddings_unsupported", json!(g.to_string()))
        }
        GatewayError::ProvidersFailed { request_id, .. } => (
            "provider_error",
            json!({"message": "every model in the fallback chain failed; its telemetry line has each attempt", "request_id": request_id}),
        ),
        GatewayError::Unlogged(_) => (
            "logs_unavailable",
            json!("the request could not be recorded, so it was not served; see /readyz"),
        ),
        GatewayError::Internal(_) => (
            "internal_error",
            json!("the request failed inside the gateway; see the gateway log"),
        ),
    }
}

fn gateway_openai(g: &GatewayError) -> (String, &'static str, &'static str, Option<&'static str>) {
    let (message, kind, code) = match g {
        GatewayError::UnknownRoute { .. } => {
            (g.to_string(), "invalid_request_error", "unknown_route")
        }
        GatewayError::UnknownTier { .. } => {
            (g.to_string(), "invalid_request_error", "unknown_tier")
        }
        GatewayError::EmbeddingsUnsupported { .. } => (
            g.to_string(),
            "invalid_request_error",
            "embeddings_unsupported",
        ),
        GatewayError::ProvidersFailed { request_id, .. } => (
            format!("every model in the fallback chain failed (request {request_id}: its telemetry line has each attempt)"),
            "api_error",
            "provider_error",
        ),
        GatewayError::Unlogged(_) => (
            "the request could not be recorded, so it was not served".to_owned(),
            "api_error",
            "logs_unavailable",
        ),
        GatewayError::Internal(_) => (
            "the request failed inside the gateway".to_owned(),
            "api_error",
            "internal_error",
        ),
    };
    let param = matches!(g, GatewayError::EmbeddingsUnsupported { .. }).then_some("model");
    (message, kind, code, param)
}
