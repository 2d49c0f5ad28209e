//! [`ApiError`]: every way an API call fails, with its status and code decided by exhaustive
//! matches and rendered in the caller's [`Dialect`]: the reference `{"error", "detail"}` shape
//! or OpenAI's `{"error": {"message", "type", "param", "code"}}` (both built by
//! [`llmscope_sdk::http`], which the Envoy filters answer with too). Bodies never leak
//! internals.

use hyper::header::HeaderValue;
use hyper::{Method, Response, StatusCode};
use llmscope_sdk::http::{
    deny_body, error_body, invalid_json_body, openai_error_body, CLIENT_ERROR_HEADER,
    REQUEST_ID_HEADER,
};
use serde_json::{json, Value};

use super::request::{json_response, Body};
use super::ENDPOINTS;
use crate::gateway::GatewayError;
use crate::policy::Evaluation;
use crate::queries::Question;
use crate::requests::ChatError;

/// The error vocabulary of an API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// The reference API (`/infer`, admin and edge endpoints): `{"error": code, "detail": ..}`.
    Reference,
    /// OpenAI's (`/v1/chat/completions`): `{"error": {"message", "type", "param", "code"}}`.
    OpenAi,
}

/// Why an API call was refused or failed.
#[derive(Debug)]
pub enum ApiError {
    /// The path exists, the method does not.
    MethodNotAllowed {
        /// Method asked for.
        method: Method,
        /// Path.
        path: String,
    },
    /// No such endpoint.
    NotFound {
        /// Path asked for.
        path: String,
    },
    /// The body is not declared `application/json`.
    UnsupportedMediaType,
    /// The body exceeds `max_body_bytes`.
    PayloadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The body could not be read (the connection's error).
    UnreadableBody(String),
    /// The body is not JSON (the parser's error).
    InvalidJson(String),
    /// Fields of the request are invalid: `{"field", "message"}` objects.
    InvalidFields(Vec<Value>),
    /// No API key was presented.
    MissingApiKey,
    /// The API key presented is not configured.
    InvalidApiKey,
    /// The API key may not act for the tenant.
    Forbidden {
        /// Tenant asked for.
        tenant: String,
    },
    /// The API key may not draw on the budget namespace asked for (or its default).
    NamespaceForbidden {
        /// The key's name (never the secret).
        key: String,
        /// Namespace asked for.
        namespace: String,
        /// Namespaces the key may use.
        allowed: Vec<String>,
    },
    /// The namespace is not defined in the policy (with authentication on, an unknown
    /// namespace is refused instead of falling back to `default`).
    UnknownNamespace {
        /// The key's name.
        key: String,
        /// Namespace asked for.
        namespace: String,
        /// Namespaces of the policy the key may use.
        usable: Vec<String>,
    },
    /// The prompt exceeds `server.max_prompt_bytes`.
    PromptTooLarge {
        /// Bytes of message text sent.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The body did not arrive within `server.body_read_timeout_ms`.
    BodyTimeout {
        /// The limit.
        ms: u64,
    },
    /// The chat-completions body is invalid.
    InvalidChat(ChatError),
    /// `stream: true` was asked for.
    UnsupportedStream,
    /// A policy denied the request (402).
    Denied {
        /// The deciding rule's reason.
        reason: String,
        /// The deciding rule.
        policy_id: Option<String>,
        /// Request id.
        request_id: String,
    },
    /// The gateway could not process the request.
    Gateway(GatewayError),
    /// The edge call itself (not the client's request) is malformed.
    BadEdgeCall(String),
    /// An edge report could not be recorded.
    EdgeReportUnlogged,
    /// Too many edge reservations wait for their reports.
    EdgeOverloaded(String),
    /// An edge call carried a client request that is invalid: rendered in the client's dialect
    /// whatever the edge endpoint's; with `relay`, marked with [`CLIENT_ERROR_HEADER`] so the
    /// filter relays it to the client as is.
    ClientRequest {
        /// The error about the client's request.
        error: Box<ApiError>,
        /// The client's dialect.
        dialect: Dialect,
        /// Whether the filter should relay it.
        relay: bool,
    },
    /// No such query.
    UnknownQuery {
        /// Name asked for.
        name: String,
    },
    /// A query failed (logged).
    QueryFailed,
}

impl From<GatewayError> for ApiError {
    fn from(e: GatewayError) -> Self {
        Self::Gateway(e)
    }
}

impl ApiError {
    /// The denial of a request by `evaluation`'s deciding rule.
    pub fn denied(request_id: String, evaluation: &Evaluation) -> Self {
        Self::Denied {
            reason: evaluation
                .reason
                .clone()
                .unwrap_or_else(|| "denied by policy".into()),
            policy_id: evaluation.policy_id.clone(),
            request_id,
        }
    }

    /// The denial as `caller` may see it: a reason carrying other tenants' figures is withheld
    /// (see [`super::redact`]).
    pub fn denied_for(
        gw: &crate::gateway::Gateway,
        caller: &super::request::Caller<'_>,
        request_id: String,
        evaluation: &Evaluation,
    ) -> Self {
        let mut denied = Self::denied(request_id, evaluation);
        if let (Self::Denied { reason, .. }, Some(shown)) = (
            &mut denied,
            super::redact::evaluation(gw, caller, evaluation).reason,
        ) {
            *reason = shown;
        }
        denied
    }

    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotFound { .. } | Self::UnknownQuery { .. } => StatusCode::NOT_FOUND,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge { .. } | Self::PromptTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::UnknownNamespace { .. } => StatusCode::BAD_REQUEST,
            Self::UnreadableBody(_)
            | Self::InvalidJson(_)
            | Self::UnsupportedStream
            | Self::BadEdgeCall(_) => StatusCode::BAD_REQUEST,
            Self::InvalidFields(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::MissingApiKey | Self::InvalidApiKey => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } | Self::NamespaceForbidden { .. } => StatusCode::FORBIDDEN,
            Self::InvalidChat(c) => {
                StatusCode::from_u16(c.status).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY)
            }
            Self::Denied { .. } => StatusCode::PAYMENT_REQUIRED,
            Self::Gateway(g) => match g {
                GatewayError::UnknownRoute { .. } => StatusCode::NOT_FOUND,
                GatewayError::UnknownTier { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                GatewayError::ProvidersFailed(_) => StatusCode::BAD_GATEWAY,
                GatewayError::Unlogged(_) => StatusCode::SERVICE_UNAVAILABLE,
                GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Self::EdgeReportUnlogged | Self::EdgeOverloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::ClientRequest { error, .. } => error.status(),
            Self::QueryFailed => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The response, in `dialect`.
    pub fn render(&self, dialect: Dialect) -> Response<Body> {
        if let Self::ClientRequest {
            error,
            dialect,
            relay,
        } = self
        {
            let mut resp = error.render(*dialect);
            if *relay {
                resp.headers_mut()
                    .insert(CLIENT_ERROR_HEADER, HeaderValue::from_static("true"));
            }
            return resp;
        }
        let body = match dialect {
            Dialect::Reference => self.reference(),
            Dialect::OpenAi => self.openai(),
        };
        let mut resp = json_response(self.status(), &body);
        if let (Self::Denied { request_id, .. }, Dialect::OpenAi) = (self, dialect) {
            if let Ok(v) = HeaderValue::from_str(request_id) {
                resp.headers_mut().insert(REQUEST_ID_HEADER, v);
            }
        }
        resp
    }

    /// The reference body: `{"error": code, "detail": ..}` (a denial adds its fields).
    fn reference(&self) -> Value {
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
            Self::UnsupportedStream => ("unsupported_stream", json!(STREAM_MESSAGE)),
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
    fn openai(&self) -> Value {
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
            Self::UnsupportedStream => (
                STREAM_MESSAGE.to_owned(),
                request,
                "unsupported_stream",
                Some("stream"),
            ),
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
            other => other
                .status()
                .canonical_reason()
                .unwrap_or("error")
                .to_owned(),
        }
    }
}

const STREAM_MESSAGE: &str = "streaming is not supported by this gateway yet; send stream: false";

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
        GatewayError::ProvidersFailed(_) => (
            "provider_error",
            json!("every model in the fallback chain failed; see telemetry for details"),
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
        GatewayError::ProvidersFailed(_) => (
            "every model in the fallback chain failed".to_owned(),
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
    (message, kind, code, None)
}
