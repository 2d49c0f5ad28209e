//! Anthropic's Messages API.

use serde::Deserialize;
use serde_json::json;

use super::{Completion, CompletionRequest, HttpProvider, ProviderError};

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

/// The Messages body for `req` (not streamed): system messages joined into `system`.
pub(super) fn body(req: &CompletionRequest) -> serde_json::Value {
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
    body
}

/// The headers of a call for `req`; an error when no API key is configured.
pub(super) fn headers(
    http: &HttpProvider,
    req: &CompletionRequest,
) -> Result<Vec<(&'static str, String)>, ProviderError> {
    let mut headers = vec![
        ("anthropic-version", ANTHROPIC_VERSION.to_owned()),
        (super::CLIENT_REQUEST_ID_HEADER, req.request_id.clone()),
    ];
    match &http.api_key {
        Some(k) => headers.push(("x-api-key", k.clone())),
        None => {
            return Err(ProviderError::Config(
                "anthropic provider has no API key (set api_key_env)".into(),
            ))
        }
    }
    Ok(headers)
}

pub(super) async fn call(
    http: &HttpProvider,
    req: &CompletionRequest,
) -> Result<Completion, ProviderError> {
    let headers = headers(http, req)?;
    let value = http
        .post(
            &format!("{}/v1/messages", http.base_url),
            &headers,
            body(req),
        )
        .await?;
    let parsed: AnthropicResponse =
        serde_json::from_value(value).map_err(|e| ProviderError::decode(&e))?;
    let text = parsed
        .content
        .into_iter()
        .filter(|b| b.kind == "text")
        .filter_map(|b| b.text)
        .collect::<Vec<_>>()
        .join("");
    let finish_reason = super::sse::anthropic_finish(parsed.stop_reason.as_deref());
    Ok(Completion {
        text,
        tokens_in: Some(parsed.usage.input_tokens),
        tokens_out: Some(parsed.usage.output_tokens),
        finish_reason,
    })
}
