//! Streamed `POST /v1/chat/completions` (`stream: true`): server-sent events in OpenAI's chunk
//! format. The head carries the x-llmscope-* headers known before the body (request id,
//! decision, tier); the body is an assistant-role chunk at once, a chunk per text delta as the
//! gateway forwards it (never buffered), a last chunk with the finish reason, the usage chunk
//! (`choices: []`, with `cost_usd`) only when the client asked for it
//! (`stream_options.include_usage`), and `data: [DONE]`. A provider stream that breaks ends
//! with an `error` event instead. Dropping the body (the client left) is what tells the
//! gateway to stop the provider's stream.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;
use llmscope_sdk::http::{POLICY_DECISION_HEADER, REQUEST_ID_HEADER, TIER_HEADER};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::request::Caller;
use crate::gateway::{Gateway, StreamHead, StreamItem, StreamStart};
use crate::requests::{Inference, StreamOptions};

/// Every response body: a whole one, or a stream of server-sent events.
pub type ResponseBody = Either<Full<Bytes>, SseBody>;

/// Serve `inf` as a stream for `caller`: a denial (or a failure before any byte) is an
/// ordinary error response; once a provider streams, a `text/event-stream` response.
pub async fn chat_stream(
    gw: &Arc<Gateway>,
    caller: &Caller<'_>,
    inf: Inference,
    options: StreamOptions,
) -> Result<Response<ResponseBody>, ApiError> {
    match gw.handle_stream(inf).await? {
        StreamStart::Denied {
            request_id,
            evaluation,
        } => Err(ApiError::denied_for(gw, caller, request_id, &evaluation)),
        StreamStart::Streaming { head, items } => Ok(response(&head, items, options)),
    }
}

/// The `text/event-stream` response of `head`, its body fed by `items`.
fn response(
    head: &StreamHead,
    items: mpsc::Receiver<StreamItem>,
    options: StreamOptions,
) -> Response<ResponseBody> {
    let chunks = Chunks {
        id: format!("chatcmpl-{}", head.request_id),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: head.model.clone(),
        include_usage: options.include_usage,
    };
    let first = chunks.event(&chunks.chunk(json!({"role": "assistant", "content": ""}), None));
    let body = SseBody {
        items,
        chunks,
        first: Some(first),
        done: false,
    };
    let mut resp = Response::new(Either::Right(body));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    for (name, value) in [
        (REQUEST_ID_HEADER, &head.request_id),
        (POLICY_DECISION_HEADER, &head.decision),
        (TIER_HEADER, &head.effective_tier),
    ] {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    }
    resp
}

/// Builds one stream's `chat.completion.chunk` events.
#[derive(Debug)]
struct Chunks {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl Chunks {
    /// A chunk with `delta` and `finish_reason`.
    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        })
    }

    /// `value` as one server-sent event.
    fn event(&self, value: &Value) -> Bytes {
        Bytes::from(format!("data: {value}\n\n"))
    }

    /// The bytes of `item`.
    fn render(&self, item: StreamItem) -> Bytes {
        match item {
            StreamItem::Delta(text) => self.event(&self.chunk(json!({"content": text}), None)),
            StreamItem::Field(field, text) => self.event(&self.chunk(json!({ field: text }), None)),
            StreamItem::ToolCall(call) => {
                self.event(&self.chunk(json!({"tool_calls": [call]}), None))
            }
            StreamItem::End {
                finish_reason,
                tokens_in,
                tokens_out,
                cost_usd,
            } => {
                let mut out = String::new();
                let last = self.chunk(json!({}), Some(&finish_reason));
                out.push_str(&format!("data: {last}\n\n"));
                if self.include_usage {
                    let usage = json!({
                        "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [],
                        "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                                  "total_tokens": tokens_in + tokens_out, "cost_usd": cost_usd},
                    });
                    out.push_str(&format!("data: {usage}\n\n"));
                }
                out.push_str("data: [DONE]\n\n");
                Bytes::from(out)
            }
            StreamItem::Error(message) => self.event(&json!({"error": {
                "message": message, "type": "provider_error", "code": "stream_broken",
            }})),
        }
    }
}

/// The body of a streamed answer: events rendered from the gateway's items as they come.
#[derive(Debug)]
pub struct SseBody {
    items: mpsc::Receiver<StreamItem>,
    chunks: Chunks,
    first: Option<Bytes>,
    done: bool,
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        match self.items.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                self.done = !matches!(
                    item,
                    StreamItem::Delta(_) | StreamItem::ToolCall(_) | StreamItem::Field(..)
                );
                Poll::Ready(Some(Ok(Frame::data(self.chunks.render(item)))))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.first.is_none()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn chunks_then_usage_only_when_asked_then_done() {
        for include_usage in [false, true] {
            let (tx, items) = mpsc::channel(4);
            let head = StreamHead {
                request_id: "req-1".into(),
                model: "gpt-4o-mini".into(),
                provider: "mock".into(),
                effective_tier: "cheap".into(),
                decision: "allow".into(),
            };
            let resp = response(&head, items, StreamOptions { include_usage });
            assert_eq!(resp.headers()[TIER_HEADER], "cheap");
            assert_eq!(resp.headers()[CONTENT_TYPE], "text/event-stream");
            tx.send(StreamItem::Delta("Hi".into())).await.unwrap();
            tx.send(StreamItem::End {
                finish_reason: "stop".into(),
                tokens_in: 3,
                tokens_out: 1,
                cost_usd: 0.5,
            })
            .await
            .unwrap();
            drop(tx);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let text = String::from_utf8(body.to_vec()).unwrap();
            let events: Vec<&str> = text
                .split("\n\n")
                .filter(|e| !e.is_empty())
                .map(|e| e.strip_prefix("data: ").unwrap())
                .collect();
            assert_eq!(events.len(), if include_usage { 5 } else { 4 }, "{text}");
            let parse = |e: &str| serde_json::from_str::<Value>(e).unwrap();
            assert_eq!(parse(events[0])["choices"][0]["delta"]["role"], "assistant");
            assert_eq!(parse(events[1])["choices"][0]["delta"]["content"], "Hi");
            assert_eq!(parse(events[2])["choices"][0]["finish_reason"], "stop");
            if include_usage {
                assert_eq!(parse(events[3])["usage"]["total_tokens"], 4);
                assert_eq!(parse(events[3])["usage"]["cost_usd"], 0.5);
            }
            assert_eq!(*events.last().unwrap(), "[DONE]");
        }
    }
}
