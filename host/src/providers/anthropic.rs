//! Anthropic's Messages API.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{Completion, CompletionRequest, Forwarded, HttpProvider, ProviderError};

#[derive(Deserialize)]
struct AnthropicResponse {
    content: Vec<Value>,
    #[serde(default)]
    stop_reason: Option<String>,
    usage: AnthropicUsage,
}

#[derive(Deserialize)]
struct AnthropicUsage {
    input_tokens: u32,
    output_tokens: u32,
}

/// Anthropic's API version header value.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Forwarded parameters the Messages API has an equivalent for (translated by [`body`]).
const MAPPED: [&str; 5] = [
    "stop",
    "top_p",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];

/// The first forwarded parameter (or message field) the Messages API has no equivalent for,
/// with why.
pub(super) fn refuses(f: &Forwarded) -> Option<(String, &'static str)> {
    let no_op_format = f
        .params
        .get("response_format")
        .is_some_and(|r| r["type"] == "text");
    if let Some(key) = f.params.keys().find(|k| {
        !(MAPPED.contains(&k.as_str()) || k.as_str() == "response_format" && no_op_format)
    }) {
        let why = match key.as_str() {
            "n" => "the Messages API answers with one choice",
            "response_format" => "the Messages API has no response format; describe the JSON in the prompt or use a tool",
            _ => "the Messages API has no equivalent",
        };
        return Some((key.clone(), why));
    }
    let tools = f.params.get("tools").and_then(Value::as_array);
    for (i, t) in tools.into_iter().flatten().enumerate() {
        if t["function"].get("strict").is_some() {
            return Some((
                format!("tools[{i}].function.strict"),
                "the Messages API has no strict schema adherence for tools",
            ));
        }
    }
    for (i, m) in f.messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or_default();
        for key in ["name", "refusal"] {
            if m.get(key).is_some_and(|v| !v.is_null()) {
                return Some((
                    format!("messages[{i}].{key}"),
                    "the Messages API has no such message field",
                ));
            }
        }
        let has_image = m["content"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["type"] == "image_url"));
        if has_image && matches!(role, "system" | "developer") {
            return Some((
                format!("messages[{i}].content"),
                "the Messages API takes no images in the system prompt",
            ));
        }
        for (j, call) in m["tool_calls"].as_array().into_iter().flatten().enumerate() {
            let args = call["function"]["arguments"].as_str().unwrap_or_default();
            let object = serde_json::from_str::<Value>(args).is_ok_and(|v| v.is_object());
            if !object {
                return Some((
                    format!("messages[{i}].tool_calls[{j}].function.arguments"),
                    "the Messages API takes tool inputs as JSON objects; these arguments are not one",
                ));
            }
        }
    }
    None
}

/// The Messages body for `req` (not streamed): system messages joined into `system`; a
/// chat body's messages translated (tool calls to `tool_use` blocks, tool results to
/// `tool_result` blocks, image parts to `image` blocks) with its `stop`, `top_p`, `tools`
/// and `tool_choice`.
pub(super) fn body(req: &CompletionRequest) -> Value {
    let f = &req.forwarded;
    let system: Vec<&str> = req
        .messages
        .iter()
        .filter(|m| m.role == "system" || m.role == "developer")
        .map(|m| m.content.as_str())
        .collect();
    let messages: Vec<Value> = if f.messages.is_empty() {
        req.messages
            .iter()
            .filter(|m| m.role != "system")
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect()
    } else {
        messages(&f.messages)
    };
    let mut body = json!({"model": req.model, "messages": messages, "max_tokens": req.max_tokens});
    if !system.is_empty() {
        body["system"] = json!(system.join("\n\n"));
    }
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    let p = &f.params;
    match p.get("stop") {
        Some(Value::String(s)) => body["stop_sequences"] = json!([s]),
        Some(list @ Value::Array(_)) => body["stop_sequences"] = list.clone(),
        _ => {}
    }
    if let Some(top_p) = p.get("top_p") {
        body["top_p"] = top_p.clone();
    }
    if let Some(tools) = p.get("tools").and_then(Value::as_array) {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                let f = &t["function"];
                let mut tool = json!({"name": f["name"],
                    "input_schema": f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}))});
                if let Some(d) = f.get("description") {
                    tool["description"] = d.clone();
                }
                tool
            })
            .collect();
        body["tools"] = json!(tools);
    }
    let mut choice = match p.get("tool_choice") {
        Some(Value::String(c)) if c == "required" => Some(json!({"type": "any"})),
        Some(Value::String(c)) if c == "none" => Some(json!({"type": "none"})),
        Some(Value::String(_)) => Some(json!({"type": "auto"})),
        Some(Value::Object(c)) => Some(json!({"type": "tool", "name": c["function"]["name"]})),
        _ => None,
    };
    if p.get("parallel_tool_calls") == Some(&Value::Bool(false)) && p.contains_key("tools") {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        c["disable_parallel_tool_use"] = json!(true);
    }
    if let Some(c) = choice {
        body["tool_choice"] = c;
    }
    body
}

/// OpenAI chat messages as Messages API turns (system messages go to `system`; consecutive
/// tool results share one user turn, as the API requires).
fn messages(openai: &[Value]) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for m in openai {
        let role = m["role"].as_str().unwrap_or_default();
        match role {
            "system" | "developer" => {}
            "tool" => {
                let content = match &m["content"] {
                    Value::Array(_) => json!(content_blocks(&m["content"])),
                    other => json!(text_of(other)),
                };
                let result = json!({"type": "tool_result", "tool_use_id": m["tool_call_id"],
                    "content": content});
                match out.last_mut() {
                    Some(last)
                        if last["role"] == "user"
                            && last["content"][0]["type"] == "tool_result" =>
                    {
                        if let Some(blocks) = last["content"].as_array_mut() {
                            blocks.push(result);
                        }
                    }
                    _ => out.push(json!({"role": "user", "content": [result]})),
                }
            }
            _ if m["content"].is_string() && m.get("tool_calls").is_none() => {
                out.push(json!({"role": role, "content": m["content"]}));
            }
            _ => {
                let mut blocks = content_blocks(&m["content"]);
                for call in m["tool_calls"].as_array().into_iter().flatten() {
                    let f = &call["function"];
                    let input: Value = f["arguments"]
                        .as_str()
                        .and_then(|a| serde_json::from_str(a).ok())
                        .unwrap_or_else(|| json!({}));
                    blocks.push(json!({"type": "tool_use", "id": call["id"], "name": f["name"], "input": input}));
                }
                out.push(json!({"role": role, "content": blocks}));
            }
        }
    }
    out
}

/// The text of a message's content (a string, or its text parts).
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}

/// A message's content as Messages API blocks: text, and images (inline `data:` URLs as
/// base64 sources, others as URL sources).
fn content_blocks(content: &Value) -> Vec<Value> {
    match content {
        Value::String(s) if !s.is_empty() => vec![json!({"type": "text", "text": s})],
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| match p["type"].as_str() {
                Some("text") => Some(json!({"type": "text", "text": p["text"]})),
                Some("image_url") => {
                    let url = p["image_url"]["url"].as_str()?;
                    let source = match url
                        .strip_prefix("data:")
                        .and_then(|d| d.split_once(";base64,"))
                    {
                        Some((media_type, data)) => {
                            json!({"type": "base64", "media_type": media_type, "data": data})
                        }
                        None => json!({"type": "url", "url": url}),
                    };
                    Some(json!({"type": "image", "source": source}))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A Messages answer's content blocks as one OpenAI choice: its text, and its `tool_use`
/// blocks as tool calls.
fn choice(content: &[Value], finish_reason: &str) -> Value {
    let text: String = content
        .iter()
        .filter(|b| b["type"] == "text")
        .filter_map(|b| b["text"].as_str())
        .collect();
    let calls: Vec<Value> = content
        .iter()
        .filter(|b| b["type"] == "tool_use")
        .map(|b| {
            json!({"id": b["id"], "type": "function",
            "function": {"name": b["name"], "arguments": b["input"].to_string()}})
        })
        .collect();
    let mut message = json!({"role": "assistant", "content": text});
    if !calls.is_empty() {
        if text.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = json!(calls);
    }
    json!({"index": 0, "message": message, "finish_reason": finish_reason})
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
    crate::otel::inject(&mut headers);
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
    let finish_reason = super::sse::anthropic_finish(parsed.stop_reason.as_deref());
    let choices = vec![choice(&parsed.content, &finish_reason)];
    Ok(Completion {
        text: super::generated_text(&choices),
        tokens_in: Some(parsed.usage.input_tokens),
        tokens_out: Some(parsed.usage.output_tokens),
        finish_reason,
        choices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_bodies_translate_to_the_messages_api() {
        let openai: Vec<Value> = serde_json::from_value(json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "what is in"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":1}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
            {"role": "tool", "tool_call_id": "c2", "content": "43"}
        ]))
        .unwrap();
        let got = messages(&openai);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0]["content"][1]["source"]["media_type"], "image/png");
        assert_eq!(got[1]["content"][0]["input"]["q"], 1);
        assert_eq!(got[2]["content"].as_array().map(Vec::len), Some(2));
        let f = Forwarded {
            params: json!({"n": 2}).as_object().cloned().unwrap_or_default(),
            ..Default::default()
        };
        assert_eq!(refuses(&f).map(|(p, _)| p).as_deref(), Some("n"));
        let c = choice(
            &[json!({"type": "tool_use", "id": "t", "name": "lookup", "input": {"q": 1}})],
            "tool_calls",
        );
        assert_eq!(
            c["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"q\":1}"
        );
        assert!(c["message"]["content"].is_null());
    }
}
