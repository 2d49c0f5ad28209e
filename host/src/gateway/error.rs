//! Why the gateway could not start, serve a request, or take an edge call. Kept apart from
//! [`super::Gateway`] so the edge bookkeeping ([`super::edge::state`]) names its errors without
//! importing the gateway.

use serde_json::Value;

use crate::artifacts::WriteError;
use crate::engine::EngineError;
use crate::policy::ConfigError;
use crate::providers::ProviderError;
use crate::requests::ChatError;

/// Why a request could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The route is not configured.
    #[error("unknown route `{route}`; known routes: {}", .known.join(", "))]
    UnknownRoute {
        /// Asked for.
        route: String,
        /// Configured routes.
        known: Vec<String>,
    },
    /// The tier is not offered on the route.
    #[error("route {route} has no tier `{tier}`; tiers: {known}")]
    UnknownTier {
        /// Route.
        route: String,
        /// Asked for.
        tier: String,
        /// Offered tiers.
        known: String,
    },
    /// Embeddings were asked of a model whose provider has no embeddings API.
    #[error("model {model} is served by provider {provider} ({kind}), which has no embeddings API; route embeddings to an `openai` or `mock` provider's model")]
    EmbeddingsUnsupported {
        /// The model the request's tier maps to.
        model: String,
        /// Its provider's name.
        provider: String,
        /// The provider's kind (`anthropic`).
        kind: &'static str,
    },
    /// Every model in the fallback chain failed.
    #[error("all providers failed for {request_id}: {summary}")]
    ProvidersFailed {
        /// The request (its telemetry line has every attempt).
        request_id: String,
        /// What failed.
        summary: String,
    },
    /// The logs cannot be written and the gateway refuses to serve unlogged.
    #[error("request not served: {0}")]
    Unlogged(WriteError),
    /// The request's task failed (a bug); its decision line, if written, stands for it.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The policy configuration is invalid.
    #[error(transparent)]
    Policy(#[from] ConfigError),
    /// A provider could not be set up.
    #[error("provider {name}: {source}")]
    Provider {
        /// Provider name.
        name: String,
        /// Cause.
        source: ProviderError,
    },
    /// The logs cannot be opened.
    #[error(transparent)]
    Artifacts(#[from] WriteError),
    /// The wasm runtime failed to start.
    #[error("wasm runtime: {0}")]
    Runtime(String),
    /// The analytics engine failed to open or to read the logs.
    #[error("analytics engine: {0}")]
    Engine(#[from] EngineError),
    /// The alerts log cannot be opened or read.
    #[error("alerts log {0}")]
    Alerts(String),
    /// The shared budget store is misconfigured.
    #[error("shared budgets: {0}")]
    SharedBudgets(String),
    /// Requests dispatched before a crash could not be recorded.
    #[error("recovering unanswered requests: {0}")]
    Recovery(String),
}

/// Why an edge call was refused.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The `/infer` body is invalid (every bad field).
    #[error("invalid request body")]
    InvalidInfer(Vec<Value>),
    /// The chat body is invalid.
    #[error("{}", .0.message)]
    InvalidChat(ChatError),
    /// Route or tier unknown.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// Something about the edge call itself (not the client's request) is wrong.
    #[error("{field}: {message}")]
    BadCall {
        /// Field of the edge call.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The request's prompt exceeds `server.max_prompt_bytes`.
    #[error("the prompt is {size} bytes; at most {limit} are accepted (server.max_prompt_bytes)")]
    PromptTooLarge {
        /// Bytes of message text.
        size: usize,
        /// The limit.
        limit: usize,
        /// Whether the request is a chat-completions one (errors in OpenAI's shape).
        chat: bool,
    },
    /// The edge key may not reserve or report for the request's tenant.
    #[error("this edge key may not act for tenant `{tenant}`")]
    TenantForbidden {
        /// The request's tenant.
        tenant: String,
    },
    /// The lines could not be written.
    #[error("report not recorded: {0}")]
    Unlogged(WriteError),
    /// Too many reservations wait for reports.
    #[error("{0} edge requests are waiting for their reports; refusing more until some report or expire")]
    Overloaded(usize),
    /// The shared budget store (Redis) did not answer: the filter's rules cannot see the
    /// replicas' sums, so it is refused (503) and the filter's own failure mode decides.
    #[error("{0}")]
    SharedUnavailable(String),
    /// Too many reservations of one tenant wait for reports.
    #[error("tenant {tenant} has {pending} edge requests waiting for their reports (at most {max}); refusing more for it until some report or expire", max = crate::gateway::edge::MAX_PENDING_PER_TENANT)]
    TenantOverloaded {
        /// The tenant.
        tenant: String,
        /// Its reservations waiting.
        pending: usize,
    },
}
