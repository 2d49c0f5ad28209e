//! Which chat-completions parameters the gateway honours. A chat body's keys are each either
//! read by the gateway — priced, and sent to the provider as they were priced — or refused
//! with 422 naming the parameter: nothing a client asks for is dropped without a word (a
//! dropped `tools` or `response_format` would give the client another answer than it asked
//! for, and bill it).

use serde_json::{Map, Value};

use crate::requests::ChatError;

/// The body keys the gateway reads (and `user`, OpenAI's end-user id for abuse monitoring,
/// accepted and not forwarded: it changes neither the answer nor the bill; most client
/// libraries send it). Everything else is refused.
pub const HONOURED: [&str; 10] = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "stream",
    "stream_options",
    "metadata",
    "n",
    "user",
];

/// The message keys the gateway reads.
const MESSAGE_KEYS: [&str; 2] = ["role", "content"];

/// 422 `unsupported_parameter` naming `param`: `what` is neither priced nor sent.
pub(crate) fn refused(param: &str, what: &str) -> ChatError {
    ChatError::unprocessable(
        format!("{param}: {what} is not supported by this gateway (it would be neither priced nor sent to the provider); remove it"),
        "unsupported_parameter",
        param,
    )
}

/// Refuse (422, naming it) the first parameter of `obj` the gateway does not honour: a key
/// outside [`HONOURED`], `n` other than 1, a `stream_options` key other than
/// `include_usage`, a message key other than `role` and `content`, a content part other than
/// text.
pub fn check_chat_params(obj: &Map<String, Value>) -> Result<(), ChatError> {
    if let Some(key) = obj.keys().find(|k| !HONOURED.contains(&k.as_str())) {
        return Err(refused(key, "this parameter"));
    }
    match obj.get("n") {
        None | Some(Value::Null) => {}
        Some(n) if n.as_u64() == Some(1) => {}
        Some(_) => return Err(refused("n", "more than one choice")),
    }
    if let Some(Value::Object(o)) = obj.get("stream_options") {
        if let Some(key) = o.keys().find(|k| k.as_str() != "include_usage") {
            return Err(refused(&format!("stream_options.{key}"), "this option"));
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
        let parts = m.get("content").and_then(Value::as_array);
        for (j, part) in parts.into_iter().flatten().enumerate() {
            if part.get("type").and_then(Value::as_str) != Some("text") {
                return Err(refused(
                    &format!("messages[{i}].content[{j}]"),
                    "a content part other than text",
                ));
            }
        }
    }
    Ok(())
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
    fn every_parameter_is_honoured_or_refused_by_name() {
        let ok = serde_json::json!({"model": "cheap", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 5, "temperature": 0.2, "stream": true, "stream_options": {"include_usage": true},
            "metadata": {"tenant_id": "acme"}, "n": 1});
        assert_eq!(param(ok), None);
        let msg =
            |m: Value| serde_json::json!({"messages": [{"role": "user", "content": "hi"}, m]});
        for (body, name) in [
            (serde_json::json!({"tools": []}), "tools"),
            (
                serde_json::json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (serde_json::json!({"top_p": 0.5}), "top_p"),
            (serde_json::json!({"n": 2}), "n"),
            (
                serde_json::json!({"stream_options": {"include_obfuscation": true}}),
                "stream_options.include_obfuscation",
            ),
            (
                msg(serde_json::json!({"role": "assistant", "content": null, "tool_calls": []})),
                "messages[1].tool_calls",
            ),
            (
                msg(
                    serde_json::json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}),
                ),
                "messages[1].content[0]",
            ),
        ] {
            assert_eq!(param(body).as_deref(), Some(name));
        }
    }
}
