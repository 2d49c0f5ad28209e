//! Model providers: the built-in deterministic `mock`, any OpenAI-compatible chat-completions
//! API, and Anthropic's Messages API. Each attempt has a timeout; retryable failures (timeouts,
//! connection errors, 429, 5xx) are retried with exponential backoff; the gateway then falls back
//! along the model's fallback chain.

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;

use crate::config::ProviderConfig;

pub use llmscope_wire::requests::Message;

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
    /// Output-token cap.
    pub max_tokens: u32,
    /// Sampling temperature, if the client set one.
    pub temperature: Option<f64>,
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
    /// `stop`, `length`, ...
    pub finish_reason: String,
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
    /// Non-success HTTP status.
    #[error("HTTP {status}: {body}")]
    Status {
        /// Status code.
        status: u16,
        /// Start of the response body.
        body: String,
    },
    /// The response was not in the expected shape.
    #[error("unexpected response: {0}")]
    Decode(String),
    /// Configuration problem (e.g. missing API key).
    #[error("{0}")]
    Config(String),
}

impl ProviderError {
    /// Worth retrying on the same provider.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Timeout(_) | Self::Connect(_) => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            Self::Decode(_) | Self::Config(_) => false,
        }
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
        }
    }
}

/// A configured provider.
#[derive(Debug, Clone)]
pub enum Provider {
    /// Deterministic, local.
    Mock {
        /// Simulated latency.
        latency: Duration,
        /// Output tokens to report.
        output_tokens: u32,
        /// Models that fail.
        fail_models: Vec<String>,
    },
    /// OpenAI-compatible.
    OpenAi(HttpProvider),
    /// Anthropic Messages.
    Anthropic(HttpProvider),
}

/// Shared settings of the HTTP providers.
#[derive(Debug, Clone)]
pub struct HttpProvider {
    client: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
    timeout: Duration,
    max_retries: u32,
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
            } => Self::Mock {
                latency: Duration::from_millis(*latency_ms),
                output_tokens: *output_tokens,
                fail_models: fail_models.clone(),
            },
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
            Self::Mock {
                latency,
                output_tokens,
                fail_models,
            } => {
                if !latency.is_zero() {
                    tokio::time::sleep(*latency).await;
                }
                if fail_models.contains(&req.model) {
                    return Err(ProviderError::Status {
                        status: 503,
                        body: format!("mock provider configured to fail {}", req.model),
                    });
                }
                Ok((mock_completion(req, *output_tokens), 1))
            }
            Self::OpenAi(http) => {
                http.with_retries(timed_out, || openai_call(http, req))
                    .await
            }
            Self::Anthropic(http) => {
                http.with_retries(timed_out, || anthropic_call(http, req))
                    .await
            }
        }
    }
}

fn mock_completion(req: &CompletionRequest, output_tokens: u32) -> Completion {
    let prompt = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map_or("", |m| m.content.as_str());
    let preview: String = prompt.chars().take(60).collect();
    let tokens_out = output_tokens.min(req.max_tokens);
    Completion {
        text: format!("[mock {}] answer to: {preview}", req.model),
        tokens_in: None,
        tokens_out: Some(tokens_out),
        finish_reason: if tokens_out < output_tokens {
            "length".into()
        } else {
            "stop".into()
        },
    }
}

impl HttpProvider {
    async fn with_retries<F, Fut>(
        &self,
        timed_out: &mut u32,
        mut call: F,
    ) -> Result<(Completion, u32), ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Completion, ProviderError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = Instant::now();
            let result = match tokio::time::timeout(self.timeout, call()).await {
                Ok(r) => r,
                Err(_) => Err(ProviderError::Timeout(self.timeout)),
            };
            if matches!(result, Err(ProviderError::Timeout(_))) {
                *timed_out += 1;
            }
            match result {
                Ok(c) => return Ok((c, attempt)),
                // A timed-out attempt may still be answered, and billed, by the provider:
                // it is not retried on the same model unpriced; the fallback chain (re-priced
                // and re-checked by the gateway) takes over.
                Err(e)
                    if e.retryable()
                        && !matches!(e, ProviderError::Timeout(_))
                        && attempt <= self.max_retries =>
                {
                    let backoff = Duration::from_millis(100 * (1 << (attempt - 1).min(5)));
                    tracing::warn!(error = %e, attempt, elapsed_ms = started.elapsed().as_millis() as u64, "provider call failed; retrying");
                    tokio::time::sleep(backoff).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn post(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: serde_json::Value,
    ) -> Result<serde_json::Value, ProviderError> {
        let mut req = self.client.post(url).json(&body);
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                ProviderError::Timeout(self.timeout)
            } else {
                ProviderError::Connect(e.to_string())
            }
        })?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| ProviderError::Connect(e.to_string()))?;
        if !(200..300).contains(&status) {
            return Err(ProviderError::Status {
                status,
                body: text.chars().take(300).collect(),
            });
        }
        serde_json::from_str(&text).map_err(|e| {
            ProviderError::Decode(format!(
                "{e}: {}",
                text.chars().take(200).collect::<String>()
            ))
        })
    }
}

#[derive(Deserialize)]
struct OpenAiResponse {
    choices: Vec<OpenAiChoice>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
struct OpenAiChoice {
    message: OpenAiMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct OpenAiMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct OpenAiUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
}

async fn openai_call(
    http: &HttpProvider,
    req: &CompletionRequest,
) -> Result<Completion, ProviderError> {
    let messages: Vec<_> = req
        .messages
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect();
    let mut body = json!({"model": req.model, "messages": messages, "max_tokens": req.max_tokens});
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    let mut headers: Vec<(&str, String)> = http
        .api_key
        .iter()
        .map(|k| ("authorization", format!("Bearer {k}")))
        .collect();
    headers.push((CLIENT_REQUEST_ID_HEADER, req.request_id.clone()));
    let value = http
        .post(
            &format!("{}/chat/completions", http.base_url),
            &headers,
            body,
        )
        .await?;
    let parsed: OpenAiResponse =
        serde_json::from_value(value).map_err(|e| ProviderError::Decode(e.to_string()))?;
    let choice = parsed
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| ProviderError::Decode("no choices".into()))?;
    Ok(Completion {
        text: choice.message.content.unwrap_or_default(),
        tokens_in: parsed.usage.as_ref().map(|u| u.prompt_tokens),
        tokens_out: parsed.usage.as_ref().map(|u| u.completion_tokens),
        finish_reason: choice.finish_reason.unwrap_or_else(|| "stop".into()),
    })
}

#[derive(Deserialize)]
struct AnthropicResponse {
    content: Vec<AnthropicBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    usage: AnthropicUsage,
}

#[derive(Deserialize)]
struct AnthropicBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct AnthropicUsage {
    input_tokens: u32,
    output_tokens: u32,
}

/// Anthropic's API version header value.
const ANTHROPIC_VERSION: &str = "2023-06-01";

async fn anthropic_call(
    http: &HttpProvider,
    req: &CompletionRequest,
) -> Result<Completion, ProviderError> {
    let system: Vec<&str> = req
        .messages
        .iter()
        .filter(|m| m.role == "system")
        .map(|m| m.content.as_str())
        .collect();
    let messages: Vec<_> = req
        .messages
        .iter()
        .filter(|m| m.role != "system")
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect();
    let mut body = json!({"model": req.model, "messages": messages, "max_tokens": req.max_tokens});
    if !system.is_empty() {
        body["system"] = json!(system.join("\n\n"));
    }
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    let mut headers = vec![
        ("anthropic-version", ANTHROPIC_VERSION.to_owned()),
        (CLIENT_REQUEST_ID_HEADER, req.request_id.clone()),
    ];
    match &http.api_key {
        Some(k) => headers.push(("x-api-key", k.clone())),
        None => {
            return Err(ProviderError::Config(
                "anthropic provider has no API key (set api_key_env)".into(),
            ))
        }
    }
    let value = http
        .post(&format!("{}/v1/messages", http.base_url), &headers, body)
        .await?;
    let parsed: AnthropicResponse =
        serde_json::from_value(value).map_err(|e| ProviderError::Decode(e.to_string()))?;
    let text = parsed
        .content
        .into_iter()
        .filter(|b| b.kind == "text")
        .filter_map(|b| b.text)
        .collect::<Vec<_>>()
        .join("");
    let finish_reason = match parsed.stop_reason.as_deref() {
        Some("end_turn") | Some("stop_sequence") | None => "stop".to_owned(),
        Some("max_tokens") => "length".to_owned(),
        Some(other) => other.to_owned(),
    };
    Ok(Completion {
        text,
        tokens_in: Some(parsed.usage.input_tokens),
        tokens_out: Some(parsed.usage.output_tokens),
        finish_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_classification() {
        assert!(ProviderError::Status {
            status: 429,
            body: String::new()
        }
        .retryable());
        assert!(ProviderError::Status {
            status: 503,
            body: String::new()
        }
        .retryable());
        assert!(!ProviderError::Status {
            status: 400,
            body: String::new()
        }
        .retryable());
        assert!(ProviderError::Timeout(Duration::from_secs(1)).retryable());
        assert_eq!(
            ProviderError::Status {
                status: 502,
                body: String::new()
            }
            .kind(),
            "provider_5xx"
        );
    }

    #[tokio::test]
    async fn mock_is_deterministic_and_caps_output() {
        let p = Provider::Mock {
            latency: Duration::ZERO,
            output_tokens: 120,
            fail_models: vec!["bad".into()],
        };
        let req = CompletionRequest {
            request_id: "req-1".into(),
            model: "gpt-4o".into(),
            messages: vec![Message {
                role: "user".into(),
                content: "hello".into(),
            }],
            max_tokens: 50,
            temperature: None,
        };
        let (c, attempts) = p.complete(&req, &mut 0).await.unwrap();
        assert_eq!(
            (c.tokens_out, c.finish_reason.as_str(), attempts),
            (Some(50), "length", 1)
        );
        assert_eq!(c.text, "[mock gpt-4o] answer to: hello");
        let failing = CompletionRequest {
            model: "bad".into(),
            ..req
        };
        assert_eq!(
            p.complete(&failing, &mut 0).await.unwrap_err().kind(),
            "provider_5xx"
        );
    }
}
