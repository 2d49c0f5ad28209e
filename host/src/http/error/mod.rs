//! [`ApiError`]: every way an API call fails, with its status and code decided by exhaustive
//! matches and rendered in the caller's [`Dialect`]: the reference `{"error", "detail"}` shape
//! or OpenAI's `{"error": {"message", "type", "param", "code"}}` (both built by
//! [`llmscope_sdk::http`], which the Envoy filters answer with too). Bodies never leak
//! internals.

use hyper::header::HeaderValue;
use hyper::{Method, Response, StatusCode};
use llmscope_sdk::http::{CLIENT_ERROR_HEADER, REQUEST_ID_HEADER};
use serde_json::Value;

mod bodies;

use super::request::{json_response, Body};
use crate::gateway::GatewayError;
use crate::policy::Evaluation;
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
    /// The key is of the other kind than the endpoint needs: an edge key at a client or admin
    /// endpoint, or a client key at `/v1/edge/*`.
    WrongKeyKind {
        /// The key's name.
        key: String,
        /// The key's kind.
        kind: crate::config::KeyKind,
    },
    /// Authentication is off and `auth.unauthenticated_edge` does not open the edge endpoints.
    EdgeClosed,
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
            Self::UnreadableBody(_) | Self::InvalidJson(_) | Self::BadEdgeCall(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::InvalidFields(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::MissingApiKey | Self::InvalidApiKey => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. }
            | Self::NamespaceForbidden { .. }
            | Self::WrongKeyKind { .. }
            | Self::EdgeClosed => StatusCode::FORBIDDEN,
            Self::InvalidChat(c) => {
                StatusCode::from_u16(c.status).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY)
            }
            Self::Denied { .. } => StatusCode::PAYMENT_REQUIRED,
            Self::Gateway(g) => match g {
                GatewayError::UnknownRoute { .. } => StatusCode::NOT_FOUND,
                GatewayError::UnknownTier { .. } | GatewayError::EmbeddingsUnsupported { .. } => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                GatewayError::ProvidersFailed { .. } => StatusCode::BAD_GATEWAY,
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
}
