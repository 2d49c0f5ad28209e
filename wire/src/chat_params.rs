//! Which chat-completions parameters the gateway honours. A chat body's keys are each either
//! read by the gateway, forwarded to the provider as they were sent and priced ([`Forwarded`]),
//! or refused with 422 naming the parameter: nothing a client asks for is dropped without a
//! word (a dropped `tools` or `response_format` would give the client another answer than it
//! asked for, and bill it).

use serde_json::{Map, Value};

use crate::images;
use crate::requests::ChatError;

/// The body keys the gateway reads itself (and `user`, OpenAI's end-user id for abuse
/// monitoring, accepted and not forwarded: it changes neither the answer nor the bill; most
/// client libraries send it).
pub const HONOURED: [&str; 9] = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "stream",
    "stream_options",
    "metadata",
    "user",
];

/// The body keys forwarded to the provider as the client sent them. Each is priced where it
/// changes the bill: `n` multiplies the output reservation, `tools` and `response_format`
/// count as input tokens (their JSON, BPE-counted); the others change what is generated, not
/// how many tokens at most, which `max_tokens` bounds.
pub const FORWARDED: [&str; 17] = [
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "n",
    "parallel_tool_calls",
    "presence_penalty",
    "prompt_cache_key",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "seed",
    "stop",
    "store",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
];

/// Parameters of OpenAI's API the gateway refuses, and why (the rest of the unknown keys are
/// refused with a generic reason).
const REFUSED: [(&str, &str); 7] = [
    (
        "audio",
        "audio output is billed per audio token, which the gateway does not price",
    ),
    (
        "modalities",
        "audio output is billed per audio token, which the gateway does not price",
    ),
    (
        "prediction",
        "predicted outputs bill rejected prediction tokens beyond max_tokens",
    ),
    (
        "service_tier",
        "a service tier changes the provider's price per token",
    ),
    (
        "web_search_options",
        "web search is billed per search, not per token",
    ),
    ("functions", "`functions` is deprecated; send `tools`"),
    (
        "function_call",
        "`function_call` is deprecated; send `tool_choice`",
    ),
];

/// The message keys the gateway reads (and forwards).
const MESSAGE_KEYS: [&str; 6] = [
    "role",
    "content",
    "name",
    "tool_calls",
    "tool_call_id",
    "refusal",
];

/// Most choices (`n`) one request may ask for (OpenAI's own limit).
pub const MAX_CHOICES: u32 = 128;

/// What a chat body asks of the provider beyond the conversation's text: the parameters it
/// forwards, the messages as the client wrote them, and what they add to the bill.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Forwarded {
    /// The [`FORWARDED`] keys present in the body, verbatim (`n` only when above 1).
    pub params: Map<String, Value>,
    /// The messages as sent (tool calls, tool results, names, image parts), what a provider
    /// is sent; empty for an `/infer` body, whose prompt is one user message.
    pub messages: Vec<Value>,
    /// Text a provider counts as input besides the messages: the tool definitions and the
    /// `response_format` schema, as JSON.
    pub priced_text: String,
    /// The image parts, priced per model ([`images::ImageRule`]).
    pub images: Vec<images::Image>,
    /// The output cap goes by OpenAI's newer name, `max_completion_tokens` (reasoning models
    /// accept no other), because the client used it.
    pub completion_tokens_cap: bool,
}

impl Forwarded {
    /// Choices asked for (`n`, 1 when absent).
    pub fn choices(&self) -> u32 {
        self.params
            .get("n")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(1)
            .max(1)
    }

    /// Whether the body asked for tools to be offered.
    pub fn has_tools(&self) -> bool {
        self.params
            .get("tools")
            .and_then(Value::as_array)
            .is_some_and(|t| !t.is_empty())
    }
}

/// 422 `unsupported_parameter` naming `param`: `what` is neither priced nor sent.
pub(crate) fn refused(param: &str, what: &str) -> ChatError {
    ChatError::unprocessable(
        format!("{param}: {what} is not supported by this gateway (it would be neither priced nor sent to the provider); remove it"),
        "unsupported_parameter",
        param,
    )
}

fn invalid(param: &str, what: &str) -> ChatError {
    ChatError::unprocessable(format!("{param} {what}"), "invalid_parameter", param)
}

/// Refuse (422, naming it) the first parameter of `obj` the gateway does not honour: a key
/// neither in [`HONOURED`] nor in [`FORWARDED`], `n` out of 1..=[`MAX_CHOICES`] or above 1
/// in a stream, `logprobs` in a stream, a `stream_options` key other than `include_usage`, a
/// message key outside role, content, name, tool_calls, tool_call_id and refusal, a content
/// part other than text and image_url, a malformed tool.
pub fn check_chat_params(obj: &Map<String, Value>) -> Result<(), ChatError> {
    for key in obj.keys() {
        if HONOURED.contains(&key.as_str()) || FORWARDED.contains(&key.as_str()) {
            continue;
        }
        let why = REFUSED
            .iter()
            .find(|(k, _)| k == key)
            .map_or("this parameter", |(_, why)| *why);
        return Err(refused(key, why));
    }
    let streamed = obj.get("stream").and_then(Value::as_bool) == Some(true);
    match obj.get("n") {
        None | Some(Value::Null) => {}
        Some(n) => match n
            .as_u64()
            .filter(|n| (1..=u64::from(MAX_CHOICES)).contains(n))
        {
            None => {
                return Err(invalid(
                    "n",
                    &format!("must be an integer from 1 to {MAX_CHOICES}"),
                ))
            }
            Some(n) if n > 1 && streamed => {
                return Err(refused("n", "more than one choice in a stream"))
            }
            Some(_) => {}
        },
    }
    let set = |k: &str| obj.get(k).filter(|v| !v.is_null());
    if let (Some(a), Some(b)) = (set("max_tokens"), set("max_completion_tokens")) {
        if a != b {
            return Err(invalid(
                "max_completion_tokens",
                "and max_tokens disagree; send one output cap (max_completion_tokens is OpenAI's current name)",
            ));
        }
    }
    if streamed && obj.get("logprobs").and_then(Value::as_bool) == Some(true) {
        return Err(refused("logprobs", "log probabilities in a stream"));
    }
    if let Some(Value::Object(o)) = obj.get("stream_options") {
        if let Some(key) = o.keys().find(|k| k.as_str() != "include_usage") {
            return Err(refused(&format!("stream_options.{key}"), "this option"));
        }
    }
    check_tools(obj)?;
    match obj.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(Value::String(c)) if matches!(c.as_str(), "none" | "auto" | "required") => {}
        Some(Value::Object(c))
            if c.get("type").and_then(Value::as_str) == Some("function")
                && c.get("function").and_then(|f| f.get("name")).is_some_and(Value::is_string) => {}
        Some(_) => {
            return Err(invalid(
                "tool_choice",
                "must be `none`, `auto`, `required` or {\"type\": \"function\", \"function\": {\"name\": ...}}",
            ))
        }
    }
    if let Some(rf) = obj.get("response_format") {
        let kind = rf.get("type").and_then(Value::as_str);
        if !matches!(kind, Some("text" | "json_object" | "json_schema")) {
            return Err(invalid(
                "response_format.type",
                "must be `text`, `json_object` or `json_schema`",
            ));
        }
    }
    let messages = obj.get("messages").and_then(Value::as_array);
    for (i, m) in messages.into_iter().flatten().enumerate() {
        let Some(m) = m.as_object() else { continue };
        if let Some(key) = m.keys().find(|k| !MESSAGE_KEYS.contains(&k.as_str())) {
            return Err(refused(
                &format!("messages[{i}].{key}"),
                "this message field",
            ));
        }
        for key in ["name", "tool_call_id", "refusal"] {
            if m.get(key).is_some_and(|v| !v.is_string() && !v.is_null()) {
                return Err(invalid(&format!("messages[{i}].{key}"), "must be a string"));
            }
        }
        check_tool_calls(i, m)?;
        let parts = m.get("content").and_then(Value::as_array);
        for (j, part) in parts.into_iter().flatten().enumerate() {
            let kind = part.get("type").and_then(Value::as_str);
            let allowed: &[&str] = match kind {
                Some("text") => &["type", "text"],
                Some("image_url") => &["type", "image_url"],
                _ => &[],
            };
            if let Some(key) = part
                .as_object()
                .and_then(|p| p.keys().find(|k| !allowed.contains(&k.as_str())))
                .filter(|_| !allowed.is_empty())
            {
                return Err(refused(
                    &format!("messages[{i}].content[{j}].{key}"),
                    "this content-part field",
                ));
            }
            match kind {
                Some("text") if !part["text"].is_string() => {
                    return Err(invalid(
                        &format!("messages[{i}].content[{j}].text"),
                        "must be a string",
                    ))
                }
                Some("text") => {}
                Some("image_url") => {
                    images::check_part(part).map_err(|what| {
                        invalid(&format!("messages[{i}].content[{j}].image_url"), what)
                    })?;
                }
                _ => {
                    return Err(refused(
                        &format!("messages[{i}].content[{j}]"),
                        "a content part other than text and image_url",
                    ))
                }
            }
        }
    }
    Ok(())
}

/// A message's `tool_calls`: function calls whose name and arguments are strings (what is
/// priced is what is sent).
fn check_tool_calls(i: usize, m: &Map<String, Value>) -> Result<(), ChatError> {
    let Some(calls) = m.get("tool_calls").filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let Some(calls) = calls.as_array() else {
        return Err(invalid(
            &format!("messages[{i}].tool_calls"),
            "must be an array",
        ));
    };
    for (j, c) in calls.iter().enumerate() {
        let at = format!("messages[{i}].tool_calls[{j}]");
        let Some(c) = c.as_object() else {
            return Err(invalid(&at, "must be an object"));
        };
        if let Some(key) = c
            .keys()
            .find(|k| !["id", "type", "function"].contains(&k.as_str()))
        {
            return Err(refused(&format!("{at}.{key}"), "this tool-call field"));
        }
        let f = &c.get("function").cloned().unwrap_or_default();
        for key in ["name", "arguments"] {
            if !f[key].is_string() {
                return Err(invalid(&format!("{at}.function.{key}"), "must be a string"));
            }
        }
        if let Some(key) = f.as_object().and_then(|f| {
            f.keys()
                .find(|k| !["name", "arguments"].contains(&k.as_str()))
        }) {
            return Err(refused(&format!("{at}.function.{key}"), "this field"));
        }
    }
    Ok(())
}

/// `tools` must be a list of `{"type": "function", "function": {"name": ..}}`.
fn check_tools(obj: &Map<String, Value>) -> Result<(), ChatError> {
    let Some(tools) = obj.get("tools") else {
        return Ok(());
    };
    let Some(tools) = tools.as_array() else {
        return Err(invalid("tools", "must be an array of function tools"));
    };
    for (i, t) in tools.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(refused(
                &format!("tools[{i}].type"),
                "a tool other than `function`",
            ));
        }
        if let Some(key) = t.as_object().and_then(|t| {
            t.keys()
                .find(|k| !["type", "function"].contains(&k.as_str()))
        }) {
            return Err(refused(&format!("tools[{i}].{key}"), "this tool field"));
        }
        if let Some(key) = t["function"].as_object().and_then(|f| {
            f.keys()
                .find(|k| !["name", "description", "parameters", "strict"].contains(&k.as_str()))
        }) {
            return Err(refused(&format!("tools[{i}].function.{key}"), "this field"));
        }
        let named = t["function"]["name"]
            .as_str()
            .is_some_and(|n| !n.is_empty());
        if !named {
            return Err(invalid(
                &format!("tools[{i}].function.name"),
                "must be a non-empty string",
            ));
        }
    }
    Ok(())
}

/// The forwarded part of a checked chat body (see [`check_chat_params`]).
pub fn forwarded(obj: &Map<String, Value>) -> Forwarded {
    let mut params: Map<String, Value> = obj
        .iter()
        .filter(|(k, v)| FORWARDED.contains(&k.as_str()) && !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if params.get("n").and_then(Value::as_u64) == Some(1) {
        params.remove("n");
    }
    let mut priced_text = String::new();
    for key in ["tools", "tool_choice"] {
        if let Some(v) = params.get(key).filter(|v| !v.is_string()) {
            priced_text.push_str(&v.to_string());
        }
    }
    if let Some(schema) = params
        .get("response_format")
        .and_then(|r| r.get("json_schema"))
    {
        priced_text.push_str(&schema.to_string());
    }
    let messages: Vec<Value> = obj
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let images = messages
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_array))
        .flatten()
        .filter(|p| p.get("type").and_then(Value::as_str) == Some("image_url"))
        .map(images::image_of)
        .collect();
    Forwarded {
        params,
        messages,
        priced_text,
        images,
        completion_tokens_cap: obj
            .get("max_completion_tokens")
            .is_some_and(|v| !v.is_null())
            && obj.get("max_tokens").is_none_or(Value::is_null),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(v: Value) -> Option<String> {
        check_chat_params(v.as_object().unwrap())
            .err()
            .and_then(|e| e.param)
    }

    #[test]
    fn every_parameter_is_honoured_forwarded_or_refused_by_name() {
        let ok = serde_json::json!({"model": "cheap", "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}],
            "max_tokens": 5, "temperature": 0.2, "stream": true, "stream_options": {"include_usage": true},
            "metadata": {"tenant_id": "acme"}, "n": 1, "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "auto", "response_format": {"type": "json_object"}, "top_p": 0.5, "seed": 7, "stop": ["\n"]});
        assert_eq!(param(ok), None);
        let msg =
            |m: Value| serde_json::json!({"messages": [{"role": "user", "content": "hi"}, m]});
        for (body, name) in [
            (serde_json::json!({"audio": {}}), "audio"),
            (serde_json::json!({"functions": []}), "functions"),
            (serde_json::json!({"n": 0}), "n"),
            (serde_json::json!({"n": 2, "stream": true}), "n"),
            (
                serde_json::json!({"logprobs": true, "stream": true}),
                "logprobs",
            ),
            (
                serde_json::json!({"tools": [{"type": "web_search"}]}),
                "tools[0].type",
            ),
            (
                serde_json::json!({"tools": [{"type": "function", "function": {}}]}),
                "tools[0].function.name",
            ),
            (
                serde_json::json!({"response_format": {"type": "yaml"}}),
                "response_format.type",
            ),
            (
                serde_json::json!({"max_tokens": 10, "max_completion_tokens": 99}),
                "max_completion_tokens",
            ),
            (
                serde_json::json!({"tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                serde_json::json!({"tools": [{"type": "function", "function": {"name": "f", "cache_control": {}}}]}),
                "tools[0].function.cache_control",
            ),
            (
                msg(
                    serde_json::json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}),
                ),
                "messages[1].tool_calls[0].function.arguments",
            ),
            (
                msg(
                    serde_json::json!({"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]}),
                ),
                "messages[1].content[0].cache_control",
            ),
            (
                serde_json::json!({"stream_options": {"include_obfuscation": true}}),
                "stream_options.include_obfuscation",
            ),
            (
                msg(serde_json::json!({"role": "user", "content": "x", "audio": {}})),
                "messages[1].audio",
            ),
            (
                msg(
                    serde_json::json!({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}),
                ),
                "messages[1].content[0]",
            ),
            (
                msg(
                    serde_json::json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3}}]}),
                ),
                "messages[1].content[0].image_url",
            ),
        ] {
            assert_eq!(param(body.clone()).as_deref(), Some(name), "{body}");
        }
        let e = check_chat_params(
            serde_json::json!({"service_tier": "priority"})
                .as_object()
                .unwrap(),
        )
        .unwrap_err();
        assert!(e.message.contains("price per token"), "{}", e.message);
    }

    #[test]
    fn the_forwarded_part_is_what_the_body_sent_and_what_it_adds_to_the_bill() {
        let body = serde_json::json!({"model": "m", "n": 2, "seed": 1, "stop": null, "max_completion_tokens": 9,
            "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x", "detail": "low"}}]}]});
        let f = forwarded(body.as_object().unwrap());
        assert_eq!(f.choices(), 2);
        assert!(f.has_tools() && f.completion_tokens_cap);
        assert_eq!(
            f.params.keys().collect::<Vec<_>>(),
            ["n", "seed", "tools", "response_format"],
            "in the body's order: a schema's key order decides the order of a structured answer"
        );
        assert!(f.priced_text.contains("lookup") && f.priced_text.contains("\"schema\""));
        assert_eq!(
            f.images,
            [images::Image {
                low: true,
                size: None
            }]
        );
        assert_eq!(f.messages.len(), 1);
        let one = forwarded(
            serde_json::json!({"n": 1, "max_tokens": 3})
                .as_object()
                .unwrap(),
        );
        assert_eq!(
            (one.choices(), one.params.len(), one.completion_tokens_cap),
            (1, 0, false)
        );
    }
}
