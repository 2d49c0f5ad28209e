//! Model providers: the built-in deterministic `mock`, any OpenAI-compatible chat-completions
//! (and embeddings) API, and Anthropic's Messages API (which has no embeddings). Each attempt has a timeout; retryable failures (timeouts,
//! connection errors, 429, 5xx) are retried with exponential backoff; the gateway then falls back
//! along the model's fallback chain. One file each: `mock.rs`, `openai.rs`, `anthropic.rs`, and
//! `http.rs` for what the two HTTP providers share (the client, retries, the POST). Streamed
//! answers: `stream.rs` (opening a stream, reading its events) and `sse.rs` (server-sent
//! events and each dialect's translation into [`StreamEvent`]s).

use std::time::Duration;

use crate::config::ProviderConfig;

mod anthropic;
mod http;
mod mock;
mod openai;
mod sse;
mod stream;

pub use http::HttpProvider;
pub use llmscope_wire::requests::{EmbeddingInput, EncodingFormat, Forwarded, Message};
pub use mock::{choices as mock_choices, MockSettings};
pub use mock::{encode_vector, mock_vector, MOCK_DIMENSIONS};
pub use stream::{CompletionStream, StreamEvent};

/// What the gateway asks a provider for.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    /// The gateway's request id, sent as [`CLIENT_REQUEST_ID_HEADER`] so a provider's bill can
    /// be matched to the telemetry line.
    pub request_id: String,
    /// Model name as the provider knows it.
    pub model: String,
    /// Conversation.
    pub messages: Vec<Message>,
    /// Output-token cap of one choice.
    pub max_tokens: u32,
    /// Sampling temperature, if the client set one.
    pub temperature: Option<f64>,
    /// The parameters and messages a chat body forwards (empty for `/infer`): an
    /// OpenAI-compatible provider is sent them as they are, Anthropic their translation
    /// ([`Provider::refuses`] names what a provider cannot honour).
    pub forwarded: std::sync::Arc<Forwarded>,
}

/// What the gateway asks a provider to embed.
#[derive(Debug, Clone)]
pub struct EmbeddingRequest {
    /// The gateway's request id (sent as [`CLIENT_REQUEST_ID_HEADER`]).
    pub request_id: String,
    /// Model name as the provider knows it.
    pub model: String,
    /// The inputs, in the shape the client sent them.
    pub input: EmbeddingInput,
    /// How the vectors are asked for (`None`: the provider's default, floats).
    pub encoding_format: Option<EncodingFormat>,
    /// Dimensions asked for (`None`: the model's).
    pub dimensions: Option<u32>,
}

/// One embedding vector, as the provider encoded it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Vector {
    /// Numbers (`encoding_format: float`).
    Floats(Vec<f32>),
    /// Base64 of the little-endian `f32`s (`encoding_format: base64`).
    Base64(String),
}

/// A provider's embeddings: one vector per input, in input order.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// The vectors.
    pub vectors: Vec<Vector>,
    /// Input tokens the provider billed (`usage.prompt_tokens`), if reported.
    pub tokens_in: Option<u32>,
}

impl Embeddings {
    /// The answer as the lifecycle settles it: the billed input, no output, finished.
    pub fn as_completion(&self) -> Completion {
        Completion {
            text: String::new(),
            tokens_in: self.tokens_in,
            tokens_out: Some(0),
            finish_reason: "stop".into(),
            choices: Vec::new(),
        }
    }
}

/// Header carrying the gateway's request id on every provider call (OpenAI accepts it as the
/// caller's request id; other providers ignore or log it).
pub const CLIENT_REQUEST_ID_HEADER: &str = "x-client-request-id";

/// A provider's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Generated text.
    pub text: String,
    /// Input tokens the provider billed, if reported.
    pub tokens_in: Option<u32>,
    /// Output tokens the provider billed, if reported.
    pub tokens_out: Option<u32>,
    /// `stop`, `length`, `tool_calls`, ...
    pub finish_reason: String,
    /// The answer's choices as OpenAI `choices` entries (`index`, `message` with its tool
    /// calls, `finish_reason`, `logprobs`), when it is more than one text message; `text`
    /// then holds what all of them generated (their text, and the name and arguments of
    /// each tool call), which is what output is counted from.
    pub choices: Vec<serde_json::Value>,
}

/// What `choices` (OpenAI `choices` entries) generated, as output is counted: each message's
/// text, refusal and reasoning text, and the name and arguments of each of its tool calls.
pub fn generated_text(choices: &[serde_json::Value]) -> String {
    let mut text = String::new();
    for c in choices {
        let m = &c["message"];
        text.push_str(m["content"].as_str().unwrap_or_default());
        for field in sse::DELTA_FIELDS {
            text.push_str(m[field].as_str().unwrap_or_default());
        }
        for call in m["tool_calls"].as_array().into_iter().flatten() {
            let f = &call["function"];
            text.push_str(f["name"].as_str().unwrap_or_default());
            text.push_str(f["arguments"].as_str().unwrap_or_default());
        }
    }
    text
}

/// A failed call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// No answer within the timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Could not connect or the connection broke.
    #[error("connection error: {0}")]
    Connect(String),
    /// Non-success HTTP status. Only the status and the provider's error code reach messages
    /// and logs: an error body may echo the prompt.
    #[error("HTTP {status}{}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status {
        /// Status code.
        status: u16,
        /// The provider's error code or type (`error.code`, else `error.type`, as in OpenAI's
        /// and Anthropic's error bodies), when it is a short identifier.
        code: Option<String>,
    },
    /// The response was not in the expected shape. The text says where, never what: the
    /// response may hold model output.
    #[error("unexpected response: {0}")]
    Decode(String),
    /// Configuration problem (e.g. missing API key).
    #[error("{0}")]
    Config(String),
    /// The provider accepted the call (a 2xx) and its answer broke off before it started (a
    /// stream that failed before its first event): like a timed-out attempt it may be billed,
    /// so it is not retried on the same model, and it is charged as one.
    #[error("answer broke off after the call was accepted: {0}")]
    Interrupted(String),
}

impl ProviderError {
    /// A non-success status with the error code of `body` (if it names one).
    pub fn status(status: u16, body: &str) -> Self {
        let code = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                let e = v.get("error")?;
                ["code", "type"]
                    .iter()
                    .find_map(|k| e.get(*k).and_then(serde_json::Value::as_str))
                    .map(str::to_owned)
            })
            .filter(|c| {
                !c.is_empty()
                    && c.len() <= 64
                    && c.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            });
        Self::Status { status, code }
    }

    /// A response that does not decode: the kind of error and where, without the text.
    pub fn decode(e: &serde_json::Error) -> Self {
        let place = if e.line() > 0 {
            format!(" at line {}, column {}", e.line(), e.column())
        } else {
            String::new()
        };
        Self::Decode(format!("{:?} error{place}", e.classify()).to_lowercase())
    }

    /// Worth retrying on the same provider.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Timeout(_) | Self::Connect(_) => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            Self::Decode(_) | Self::Config(_) | Self::Interrupted(_) => false,
        }
    }

    /// Whether the provider may bill the failed attempt: it timed out, broke off after
    /// accepting the call, or answered (a 2xx) in a shape that does not decode — its usage
    /// is lost with it, so the attempt is charged at its estimate.
    pub fn may_have_billed(&self) -> bool {
        matches!(
            self,
            Self::Timeout(_) | Self::Interrupted(_) | Self::Decode(_)
        )
    }

    /// Short class for telemetry's `error_type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Connect(_) => "connection",
            Self::Status { status: 429, .. } => "rate_limited",
            Self::Status { status, .. } if *status >= 500 => "provider_5xx",
            Self::Status { .. } => "provider_4xx",
            Self::Decode(_) => "decode",
            Self::Config(_) => "config",
            Self::Interrupted(_) => "interrupted",
        }
    }
}

/// A configured provider.
#[derive(Debug, Clone)]
pub enum Provider {
    /// Deterministic, local.
    Mock(MockSettings),
    /// OpenAI-compatible.
    OpenAi(HttpProvider),
    /// Anthropic Messages.
    Anthropic(HttpProvider),
}

impl Provider {
    /// Build from configuration; `env` resolves `api_key_env`.
    pub fn from_config(
        cfg: &ProviderConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ProviderError> {
        let http =
            |base_url: &str, api_key_env: &Option<String>, timeout_ms: u64, max_retries: u32| {
                let client = reqwest::Client::builder()
                    .pool_idle_timeout(Duration::from_secs(90))
                    .build()
                    .map_err(|e| ProviderError::Config(format!("cannot build HTTP client: {e}")))?;
                Ok::<_, ProviderError>(HttpProvider {
                    client,
                    base_url: base_url.trim_end_matches('/').to_owned(),
                    api_key: api_key_env.as_deref().and_then(env),
                    timeout: Duration::from_millis(timeout_ms),
                    max_retries,
                })
            };
        Ok(match cfg {
            ProviderConfig::Mock {
                latency_ms,
                output_tokens,
                fail_models,
                stream_chunks,
                stream_chunk_delay_ms,
            } => Self::Mock(MockSettings {
                latency: Duration::from_millis(*latency_ms),
                output_tokens: *output_tokens,
                fail_models: fail_models.clone(),
                stream_chunks: *stream_chunks,
                chunk_delay: Duration::from_millis(*stream_chunk_delay_ms),
            }),
            ProviderConfig::Openai {
                base_url,
                api_key_env,
                timeout_ms,
                max_retries,
            } => Self::OpenAi(http(base_url, api_key_env, *timeout_ms, *max_retries)?),
            ProviderConfig::Anthropic {
                base_url,
                api_key_env,
                timeout_ms,
                max_retries,
            } => Self::Anthropic(http(base_url, api_key_env, *timeout_ms, *max_retries)?),
        })
    }

    /// The first forwarded parameter this provider cannot honour, with why; `None` when it
    /// honours them all. (The mock and OpenAI-compatible providers honour every one.)
    pub fn refuses(&self, f: &Forwarded) -> Option<(String, &'static str)> {
        match self {
            Self::Mock(_) | Self::OpenAi(_) => None,
            Self::Anthropic(_) => anthropic::refuses(f),
        }
    }

    /// Complete `req`, retrying retryable failures. Returns the completion and how many attempts
    /// it took.
    /// Attempts that timed out (the provider may still have answered, and billed, them) are
    /// added to `timed_out`.
    pub async fn complete(
        &self,
        req: &CompletionRequest,
        timed_out: &mut u32,
    ) -> Result<(Completion, u32), ProviderError> {
        match self {
            Self::Mock(m) => mock::complete(req, m).await,
            Self::OpenAi(http) => {
                http.with_retries(timed_out, || openai::call(http, req))
                    .await
            }
            Self::Anthropic(http) => {
                http.with_retries(timed_out, || anthropic::call(http, req))
                    .await
            }
        }
    }

    /// Whether the provider has an embeddings API (Anthropic's has none).
    pub fn embeds(&self) -> bool {
        !matches!(self, Self::Anthropic(_))
    }

    /// The provider's kind, as configured (`mock`, `openai`, `anthropic`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Mock(_) => "mock",
            Self::OpenAi(_) => "openai",
            Self::Anthropic(_) => "anthropic",
        }
    }

    /// Embed `req`'s inputs, retrying retryable failures as [`Self::complete`] does (timed-out
    /// attempts counted in `timed_out`). Returns the embeddings and how many attempts it took;
    /// a provider without an embeddings API fails at once, before any call.
    pub async fn embed(
        &self,
        req: &EmbeddingRequest,
        timed_out: &mut u32,
    ) -> Result<(Embeddings, u32), ProviderError> {
        match self {
            Self::Mock(m) => mock::embed(req, m).await,
            Self::OpenAi(http) => {
                http.with_retries(timed_out, || openai::embed(http, req))
                    .await
            }
            Self::Anthropic(_) => Err(ProviderError::Config(
                "the anthropic provider has no embeddings API".into(),
            )),
        }
    }

    /// Open a stream for `req` and wait for its first event, retrying retryable failures
    /// (each attempt bounded by the provider's timeout, counted in `timed_out` when it ran
    /// out) as [`Self::complete`] does. Returns the stream and how many attempts it took.
    pub async fn open_stream(
        &self,
        req: &CompletionRequest,
        timed_out: &mut u32,
    ) -> Result<(CompletionStream, u32), ProviderError> {
        match self {
            Self::Mock(m) => mock::stream(req, m).await,
            Self::OpenAi(http) => {
                http.with_retries(timed_out, || stream::openai(http, req))
                    .await
            }
            Self::Anthropic(http) => {
                http.with_retries(timed_out, || stream::anthropic(http, req))
                    .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_classification() {
        assert!(ProviderError::Status {
            status: 429,
            code: None
        }
        .retryable());
        assert!(ProviderError::Status {
            status: 503,
            code: None
        }
        .retryable());
        assert!(!ProviderError::Status {
            status: 400,
            code: None
        }
        .retryable());
        assert!(ProviderError::Timeout(Duration::from_secs(1)).retryable());
        assert_eq!(
            ProviderError::Status {
                status: 502,
                code: None
            }
            .kind(),
            "provider_5xx"
        );
    }

    #[test]
    fn errors_name_status_and_code_never_the_body() {
        let e = ProviderError::status(
            400,
            r#"{"error": {"message": "your prompt 'secret plan' is too long", "type": "invalid_request_error", "code": "context_length_exceeded"}}"#,
        );
        assert_eq!(e.to_string(), "HTTP 400 (context_length_exceeded)");
        let e = ProviderError::status(502, "<html>upstream said: secret plan</html>");
        assert_eq!(e.to_string(), "HTTP 502");
        let bad =
            serde_json::from_str::<serde_json::Value>("{\"answer\": secret plan}").unwrap_err();
        let e = ProviderError::decode(&bad);
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(e.to_string().contains("line 1"), "{e}");
    }
}
