//! Any OpenAI-compatible chat-completions API.

use serde::Deserialize;
use serde_json::json;

use super::{Completion, CompletionRequest, HttpProvider, ProviderError};

#[derive(Deserialize)]
struct OpenAiResponse {
    choices: Vec<serde_json::Value>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
struct OpenAiUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
}

/// The chat-completions body for `req` (not streamed): the client's messages and forwarded
/// parameters as it sent them, the output cap under the name it used.
pub(super) fn body(req: &CompletionRequest) -> serde_json::Value {
    let f = &req.forwarded;
    let messages: Vec<_> = if f.messages.is_empty() {
        req.messages
            .iter()
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect()
    } else {
        f.messages.clone()
    };
    let mut body = json!({"model": req.model, "messages": messages});
    let cap = if f.completion_tokens_cap {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    body[cap] = json!(req.max_tokens);
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    for (k, v) in &f.params {
        body[k] = v.clone();
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
    let first = parsed
        .choices
        .first()
        .ok_or_else(|| ProviderError::Decode("no choices".into()))?;
    let finish_reason = first["finish_reason"].as_str().unwrap_or("stop").to_owned();
    Ok(Completion {
        text: super::generated_text(&parsed.choices),
        tokens_in: parsed.usage.as_ref().map(|u| u.prompt_tokens),
        tokens_out: parsed.usage.as_ref().map(|u| u.completion_tokens),
        finish_reason,
        choices: parsed.choices,
    })
}
