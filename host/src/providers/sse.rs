//! Server-sent events from the HTTP providers: the framing (`event:` / `data:` lines, events
//! ended by a blank line) and the translation of each dialect's events into [`StreamEvent`]s —
//! OpenAI's `chat.completion.chunk` objects (ended by `data: [DONE]`) and Anthropic's Messages
//! events (`message_start` with the input usage, `content_block_delta` with text,
//! `message_delta` with the stop reason and output usage, `message_stop`).

use serde_json::Value;

use super::ProviderError;

/// One normalized event of a provider's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// Generated text.
    Delta(String),
    /// Generated text of another delta field: `refusal` (structured outputs), or
    /// `reasoning_content` / `reasoning` (reasoning models behind vLLM, DeepSeek, OpenRouter).
    Field(&'static str, String),
    /// A piece of a tool call, as an element of an OpenAI chunk's `delta.tool_calls`
    /// (`index`; `id`, `type` and `function.name` in its first piece; `function.arguments`
    /// in pieces).
    ToolCall(Value),
    /// The provider's finish reason, in OpenAI's vocabulary (`stop`, `length`, ...).
    Finish(String),
    /// Usage the provider reported; a field it did not report in this event is `None`.
    Usage {
        /// Input tokens billed.
        tokens_in: Option<u32>,
        /// Output tokens billed.
        tokens_out: Option<u32>,
    },
    /// The provider ended the stream.
    Done,
}

/// One server-sent event: its `event:` name and its `data:` lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field, when present.
    pub event: Option<String>,
    /// The `data:` payload.
    pub data: String,
}

/// Cuts a byte stream into [`SseEvent`]s, whatever the chunk boundaries.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

/// Most bytes one event may hold before the stream is refused (a provider never sends this).
const MAX_EVENT_BYTES: usize = 4 << 20;

impl SseParser {
    /// Feed `bytes`; returns the events they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, ProviderError> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some((end, sep)) = event_end(&self.buf) {
            let raw: Vec<u8> = self.buf.drain(..end + sep).take(end).collect();
            let text = String::from_utf8_lossy(&raw);
            if let Some(event) = parse_event(&text) {
                events.push(event);
            }
        }
        if self.buf.len() > MAX_EVENT_BYTES {
            return Err(ProviderError::Decode(format!(
                "a server-sent event longer than {MAX_EVENT_BYTES} bytes"
            )));
        }
        Ok(events)
    }
}

/// Where the first complete event of `buf` ends, and the length of the blank line ending it.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    (0..buf.len()).find_map(|i| {
        let rest = &buf[i..];
        if rest.starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else if rest.starts_with(b"\n\n") || rest.starts_with(b"\r\r") {
            Some((i, 2))
        } else {
            None
        }
    })
}

/// The fields of one event's lines (comments and unknown fields ignored); `None` without data.
fn parse_event(text: &str) -> Option<SseEvent> {
    let mut event = SseEvent::default();
    let mut data: Vec<&str> = Vec::new();
    for line in text.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event.event = Some(value.to_owned()),
            "data" => data.push(value),
            _ => {}
        }
    }
    if data.is_empty() {
        return None;
    }
    event.data = data.join("\n");
    Some(event)
}

/// The provider's error code in an error event, or a placeholder: never its message, which
/// may echo the prompt.
fn stream_error(v: &Value) -> ProviderError {
    ProviderError::status(502, &serde_json::json!({ "error": v["error"] }).to_string())
}

fn as_u32(v: &Value) -> Option<u32> {
    v.as_u64().map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// Delta fields besides `content` whose text is generated output, forwarded and counted.
pub const DELTA_FIELDS: [&str; 3] = ["refusal", "reasoning_content", "reasoning"];

/// An OpenAI `chat.completion.chunk` event as [`StreamEvent`]s.
pub fn openai_events(e: &SseEvent) -> Result<Vec<StreamEvent>, ProviderError> {
    if e.data.trim() == "[DONE]" {
        return Ok(vec![StreamEvent::Done]);
    }
    let v: Value = serde_json::from_str(&e.data).map_err(|e| ProviderError::decode(&e))?;
    if v.get("error").is_some() {
        return Err(stream_error(&v));
    }
    let mut out = Vec::new();
    if let Some(choice) = v["choices"].as_array().and_then(|c| c.first()) {
        if let Some(text) = choice["delta"]["content"].as_str() {
            out.push(StreamEvent::Delta(text.to_owned()));
        }
        for field in DELTA_FIELDS {
            if let Some(text) = choice["delta"][field].as_str() {
                out.push(StreamEvent::Field(field, text.to_owned()));
            }
        }
        for call in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            out.push(StreamEvent::ToolCall(call.clone()));
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            out.push(StreamEvent::Finish(reason.to_owned()));
        }
    }
    if let Some(usage) = v.get("usage").filter(|u| u.is_object()) {
        out.push(StreamEvent::Usage {
            tokens_in: as_u32(&usage["prompt_tokens"]),
            tokens_out: as_u32(&usage["completion_tokens"]),
        });
    }
    Ok(out)
}

/// Anthropic's stop reason in OpenAI's vocabulary.
pub fn anthropic_finish(reason: Option<&str>) -> String {
    match reason {
        Some("end_turn" | "stop_sequence") | None => "stop".to_owned(),
        Some("max_tokens") => "length".to_owned(),
        Some("tool_use") => "tool_calls".to_owned(),
        Some(other) => other.to_owned(),
    }
}

/// What translating an Anthropic stream remembers between events: the content blocks that
/// are tool calls, in order (a block's position there is its OpenAI tool-call `index`).
#[derive(Debug, Default)]
pub struct AnthropicState {
    tool_blocks: Vec<u64>,
}

/// An Anthropic Messages stream event as [`StreamEvent`]s: text deltas as text, `tool_use`
/// blocks (their start, then their `input_json_delta`s) as tool-call pieces.
pub fn anthropic_events(
    e: &SseEvent,
    state: &mut AnthropicState,
) -> Result<Vec<StreamEvent>, ProviderError> {
    let v: Value = serde_json::from_str(&e.data).map_err(|e| ProviderError::decode(&e))?;
    let kind = e.event.as_deref().or_else(|| v["type"].as_str());
    let block = v["index"].as_u64().unwrap_or_default();
    Ok(match kind {
        Some("message_start") => vec![StreamEvent::Usage {
            tokens_in: as_u32(&v["message"]["usage"]["input_tokens"]),
            // The start's output count is a placeholder; message_delta has the real one.
            tokens_out: None,
        }],
        Some("content_block_start") if v["content_block"]["type"] == "tool_use" => {
            let index = state.tool_blocks.len();
            state.tool_blocks.push(block);
            let b = &v["content_block"];
            vec![StreamEvent::ToolCall(serde_json::json!({
                "index": index, "id": b["id"], "type": "function",
                "function": {"name": b["name"], "arguments": ""}}))]
        }
        Some("content_block_delta") => {
            let d = &v["delta"];
            match (d["text"].as_str(), d["partial_json"].as_str()) {
                (Some(t), _) => vec![StreamEvent::Delta(t.to_owned())],
                (None, Some(json)) => state
                    .tool_blocks
                    .iter()
                    .position(|b| *b == block)
                    .map(|index| {
                        StreamEvent::ToolCall(serde_json::json!({
                            "index": index, "function": {"arguments": json}}))
                    })
                    .into_iter()
                    .collect(),
                _ => Vec::new(),
            }
        }
        Some("message_delta") => {
            let mut out = Vec::new();
            if let Some(reason) = v["delta"]["stop_reason"].as_str() {
                out.push(StreamEvent::Finish(anthropic_finish(Some(reason))));
            }
            if let Some(n) = as_u32(&v["usage"]["output_tokens"]) {
                out.push(StreamEvent::Usage {
                    tokens_in: as_u32(&v["usage"]["input_tokens"]),
                    tokens_out: Some(n),
                });
            }
            out
        }
        Some("message_stop") => vec![StreamEvent::Done],
        Some("error") => return Err(stream_error(&v)),
        _ => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_cut_at_blank_lines_whatever_the_chunks() {
        let text =
            b"data: {\"a\":1}\n\n: comment\n\nevent: x\r\ndata: one\r\ndata: two\r\n\r\ndata: tail";
        let mut p = SseParser::default();
        let mut got = Vec::new();
        for b in text.chunks(3) {
            got.extend(p.feed(b).unwrap());
        }
        assert_eq!(
            got,
            vec![
                SseEvent {
                    event: None,
                    data: "{\"a\":1}".into()
                },
                SseEvent {
                    event: Some("x".into()),
                    data: "one\ntwo".into()
                },
            ]
        );
        assert_eq!(p.feed(b"\n\n").unwrap()[0].data, "tail");
    }

    #[test]
    fn openai_chunks_give_text_finish_usage_and_done() {
        let ev = |d: &str| SseEvent {
            event: None,
            data: d.into(),
        };
        assert_eq!(
            openai_events(&ev(
                r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#
            ))
            .unwrap(),
            vec![StreamEvent::Delta("Hi".into())]
        );
        // Refusals and reasoning text are output too: forwarded and counted, never dropped.
        assert_eq!(
            openai_events(&ev(
                r#"{"choices":[{"index":0,"delta":{"reasoning_content":"think","refusal":"no"}}]}"#
            ))
            .unwrap(),
            vec![
                StreamEvent::Field("refusal", "no".into()),
                StreamEvent::Field("reasoning_content", "think".into())
            ]
        );
        assert_eq!(
            openai_events(&ev(
                r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}],"usage":null}"#
            ))
            .unwrap(),
            vec![StreamEvent::Finish("length".into())]
        );
        assert_eq!(
            openai_events(&ev(
                r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5}}"#
            ))
            .unwrap(),
            vec![StreamEvent::Usage {
                tokens_in: Some(12),
                tokens_out: Some(5)
            }]
        );
        assert_eq!(
            openai_events(&ev("[DONE]")).unwrap(),
            vec![StreamEvent::Done]
        );
        let e = openai_events(&ev(
            r#"{"error":{"message":"secret prompt","type":"server_error"}}"#,
        ))
        .unwrap_err();
        assert_eq!(e.to_string(), "HTTP 502 (server_error)");
        assert!(openai_events(&ev("{not json")).is_err());
    }

    #[test]
    fn anthropic_events_translate_to_openai_vocabulary() {
        let mut state = AnthropicState::default();
        let mut anthropic_events = |e: &SseEvent| anthropic_events(e, &mut state);
        let ev = |kind: &str, d: &str| SseEvent {
            event: Some(kind.into()),
            data: d.into(),
        };
        assert_eq!(
            anthropic_events(&ev(
                "message_start",
                r#"{"type":"message_start","message":{"usage":{"input_tokens":25,"output_tokens":1}}}"#
            ))
            .unwrap(),
            vec![StreamEvent::Usage {
                tokens_in: Some(25),
                tokens_out: None
            }]
        );
        assert_eq!(
            anthropic_events(&ev(
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#
            ))
            .unwrap(),
            vec![StreamEvent::Delta("Hello".into())]
        );
        assert_eq!(
            anthropic_events(&ev(
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":15}}"#
            ))
            .unwrap(),
            vec![
                StreamEvent::Finish("length".into()),
                StreamEvent::Usage {
                    tokens_in: None,
                    tokens_out: Some(15)
                }
            ]
        );
        assert_eq!(
            anthropic_events(&ev("message_stop", r#"{"type":"message_stop"}"#)).unwrap(),
            vec![StreamEvent::Done]
        );
        // A tool_use block: its start names the call, its JSON deltas are the arguments.
        assert_eq!(
            anthropic_events(&ev(
                "content_block_start",
                r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"lookup","input":{}}}"#
            ))
            .unwrap(),
            vec![StreamEvent::ToolCall(serde_json::json!({"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": ""}}))]
        );
        assert_eq!(
            anthropic_events(&ev(
                "content_block_delta",
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"q\": 1}"}}"#
            ))
            .unwrap(),
            vec![StreamEvent::ToolCall(serde_json::json!({"index": 0, "function": {"arguments": "{\"q\": 1}"}}))]
        );
        assert!(anthropic_events(&ev("ping", r#"{"type":"ping"}"#))
            .unwrap()
            .is_empty());
        assert!(anthropic_events(&ev(
            "error",
            r#"{"type":"error","error":{"type":"overloaded_error","message":"x"}}"#
        ))
        .is_err());
    }
}
