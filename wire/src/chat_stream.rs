//! The stream flags of a chat-completions body: `stream` and `stream_options`.

use serde_json::{Map, Value};

use crate::requests::ChatError;

/// What a chat body asks of a stream (`stream: true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamOptions {
    /// `stream_options.include_usage`: the client wants the usage chunk before `[DONE]`.
    pub include_usage: bool,
}

/// Whether a chat body asks for a stream (`stream: true`) and with what options; `None` for
/// an answer in one piece. `stream` must be a boolean, `stream_options` an object whose
/// `include_usage` is a boolean, and `stream_options` is refused without `stream: true`, as
/// OpenAI does (422 naming the parameter).
pub fn chat_stream(obj: &Map<String, Value>) -> Result<Option<StreamOptions>, ChatError> {
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ChatError::unprocessable(
                "stream must be a boolean",
                "invalid_parameter",
                "stream",
            ))
        }
    };
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => Some(false),
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                return Err(ChatError::unprocessable(
                    "stream_options.include_usage must be a boolean",
                    "invalid_parameter",
                    "stream_options.include_usage",
                ))
            }
        },
        Some(_) => {
            return Err(ChatError::unprocessable(
                "stream_options must be an object",
                "invalid_parameter",
                "stream_options",
            ))
        }
    };
    if !stream && include_usage.is_some() {
        return Err(ChatError::unprocessable(
            "stream_options is only allowed with stream: true",
            "invalid_parameter",
            "stream_options",
        ));
    }
    Ok(stream.then(|| StreamOptions {
        include_usage: include_usage.unwrap_or(false),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_flags_are_booleans_and_options_need_a_stream() {
        let body = |v: Value| v.as_object().unwrap().clone();
        let param = |v: Value| chat_stream(&body(v)).unwrap_err().param.unwrap();
        assert_eq!(chat_stream(&body(serde_json::json!({}))).unwrap(), None);
        assert_eq!(
            chat_stream(&body(serde_json::json!({"stream": false}))).unwrap(),
            None
        );
        assert_eq!(
            chat_stream(&body(serde_json::json!({"stream": true}))).unwrap(),
            Some(StreamOptions {
                include_usage: false
            })
        );
        assert_eq!(
            chat_stream(&body(
                serde_json::json!({"stream": true, "stream_options": {"include_usage": true}})
            ))
            .unwrap(),
            Some(StreamOptions {
                include_usage: true
            })
        );
        assert_eq!(param(serde_json::json!({"stream": "yes"})), "stream");
        assert_eq!(
            param(serde_json::json!({"stream": true, "stream_options": {"include_usage": 1}})),
            "stream_options.include_usage"
        );
        assert_eq!(
            param(serde_json::json!({"stream_options": {"include_usage": true}})),
            "stream_options"
        );
    }
}
