//! Any OpenAI-compatible chat-completions API.

use serde::Deserialize;
use serde_json::json;

use super::{Completion, CompletionRequest, HttpProvider, ProviderError};

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

/// The chat-completions body for `req` (not streamed).
pub(super) fn body(req: &CompletionRequest) -> serde_json::Value {
    let messages: Vec<_> = req
        .messages
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect();
    let mut body = json!({"model": req.model, "messages": messages, "max_tokens": req.max_tokens});
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    body
}

/// The headers of a call for `req`: the key, when configured, and the request id.
pub(super) fn headers(http: &HttpProvider, req: &CompletionRequest) -> Vec<(&'static str, String)> {
    let mut headers: Vec<(&str, String)> = http
        .api_key
        .iter()
        .map(|k| ("authorization", format!("Bearer {k}")))
        .collect();
    headers.push((super::CLIENT_REQUEST_ID_HEADER, req.request_id.clone()));
    headers
}

pub(super) async fn call(
    http: &HttpProvider,
    req: &CompletionRequest,
) -> Result<Completion, ProviderError> {
    let headers = headers(http, req);
    let value = http
        .post(
            &format!("{}/chat/completions", http.base_url),
            &headers,
            body(req),
        )
        .await?;
    let parsed: OpenAiResponse =
        serde_json::from_value(value).map_err(|e| ProviderError::decode(&e))?;
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
