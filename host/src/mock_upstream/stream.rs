//! The stand-in's streamed answers: OpenAI `chat.completion.chunk` events ending with
//! `data: [DONE]` (a usage chunk first when the request asked for it), or Anthropic's
//! `message_start` … `content_block_delta` … `message_delta` (with usage) … `message_stop`.
//! One word of the answer per chunk, `--chunk-delay-ms` apart; a client that goes away ends
//! the stream (counted as aborted in `/stats`).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{Options, Reply, Stats};

/// Which API's events to send.
#[derive(Debug, Clone, Copy)]
pub(super) enum Dialect {
    OpenAi,
    Anthropic,
}

/// What to stream.
pub(super) struct Answer {
    pub(super) model: String,
    /// The tool the answer calls (arguments `{}`) instead of its text.
    pub(super) tool: Option<String>,
    pub(super) text: String,
    pub(super) tokens_in: u64,
    pub(super) tokens_out: u64,
    pub(super) include_usage: bool,
}

/// A body fed by a channel: each message one frame.
#[derive(Debug)]
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// The words streamed: the answer's, one per chunk, padded with ` more` or with the rest
/// joined into the last, so there are exactly `n`.
fn words(text: &str, n: usize) -> Vec<String> {
    let mut words: Vec<String> = text
        .split(' ')
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect();
    if words.len() > n && n > 0 {
        let rest = words.split_off(n - 1).concat();
        words.push(rest);
    }
    while words.len() < n {
        words.push(" more".into());
    }
    words
}

fn event(dialect: Dialect, name: &str, v: &Value) -> Bytes {
    match dialect {
        Dialect::OpenAi => Bytes::from(format!("data: {v}\n\n")),
        Dialect::Anthropic => Bytes::from(format!("event: {name}\ndata: {v}\n\n")),
    }
}

/// Every event of `answer`'s stream in `dialect`, the text cut into `chunks` words.
fn events(dialect: Dialect, a: &Answer, chunks: usize, usage: bool) -> Vec<Bytes> {
    let words = words(&a.text, chunks);
    let out_tokens = a.tokens_out;
    let m = &a.model;
    let chunk = |delta: Value, finish: Option<&str>| {
        json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": m,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut out = Vec::new();
    match dialect {
        Dialect::OpenAi => {
            out.push(chunk(json!({"role": "assistant", "content": ""}), None));
            match &a.tool {
                Some(name) => {
                    out.push(chunk(json!({"tool_calls": [{"index": 0, "id": "call_mock", "type": "function", "function": {"name": name, "arguments": ""}}]}), None));
                    out.push(chunk(
                        json!({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
                        None,
                    ));
                    out.push(chunk(json!({}), Some("tool_calls")));
                }
                None => {
                    out.extend(words.iter().map(|w| chunk(json!({"content": w}), None)));
                    out.push(chunk(json!({}), Some("stop")));
                }
            }
            if usage && a.include_usage {
                out.push(json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": m, "choices": [],
                    "usage": {"prompt_tokens": a.tokens_in, "completion_tokens": out_tokens, "total_tokens": a.tokens_in + out_tokens}}));
            }
            let mut bytes: Vec<Bytes> = out.iter().map(|v| event(dialect, "", v)).collect();
            bytes.push(Bytes::from_static(b"data: [DONE]\n\n"));
            bytes
        }
        Dialect::Anthropic => {
            let start_usage = if usage {
                json!({"input_tokens": a.tokens_in, "output_tokens": 1})
            } else {
                json!({})
            };
            let mut named = vec![
                (
                    "message_start",
                    json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant", "model": m, "content": [], "stop_reason": null, "usage": start_usage}}),
                ),
                (
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                ),
                ("ping", json!({"type": "ping"})),
            ];
            named.extend(words.iter().map(|w| ("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}))));
            named.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ));
            let mut stop = "end_turn";
            if let Some(name) = &a.tool {
                stop = "tool_use";
                named.push(("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_mock", "name": name, "input": {}}})));
                named.push(("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}})));
                named.push((
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 1}),
                ));
            }
            let mut delta = json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}});
            if usage {
                delta["usage"] = json!({"output_tokens": out_tokens});
            }
            named.push(("message_delta", delta));
            named.push(("message_stop", json!({"type": "message_stop"})));
            named.iter().map(|(n, v)| event(dialect, n, v)).collect()
        }
    }
}

/// A `text/event-stream` response streaming `answer` as `options` say.
pub(super) fn reply(
    dialect: Dialect,
    mut a: Answer,
    options: &Options,
    stats: &Arc<Stats>,
) -> Reply {
    let chunks = if options.ignore_max_tokens {
        a.tokens_out = u64::from(options.stream_chunks);
        options.stream_chunks
    } else {
        options
            .stream_chunks
            .min(u32::try_from(a.tokens_out).unwrap_or(u32::MAX))
    };
    let mut events = events(
        dialect,
        &a,
        chunks.max(1) as usize,
        !options.no_stream_usage,
    );
    if let Some(n) = options.stream_break_after {
        // The events before the first text chunk, then `n` text chunks.
        let before_text = match dialect {
            Dialect::OpenAi => 1,
            Dialect::Anthropic => 3,
        };
        events.truncate(before_text + n as usize);
    }
    let (tx, rx) = mpsc::channel(4);
    let delay = options.chunk_delay;
    let stats = Arc::clone(stats);
    tokio::spawn(async move {
        let mut aborted = false;
        for (i, e) in events.into_iter().enumerate() {
            if i > 0 && !delay.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = tx.closed() => {
                        aborted = true;
                        break;
                    }
                }
            }
            if tx.send(e).await.is_err() {
                aborted = true;
                break;
            }
        }
        let counter = if aborted {
            &stats.streams_aborted
        } else {
            &stats.streams_completed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    });
    let mut r = Response::new(http_body_util::Either::Right(ChannelBody(rx)));
    *r.status_mut() = StatusCode::OK;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_exactly_n() {
        assert_eq!(words("a b c", 2), vec!["a", " b c"]);
        assert_eq!(words("a b", 4), vec!["a", " b", " more", " more"]);
    }
}
