//! Streamed completions: a provider's answer as [`StreamEvent`]s, read as they arrive. Opening a
//! stream ([`super::Provider::open_stream`]) waits for the provider's first event, so a provider
//! that fails before its first byte can still be retried or fallen back from; after that, the
//! caller reads [`CompletionStream::next`] until [`StreamEvent::Done`] or an error, and dropping
//! the stream closes the provider's connection (the provider stops generating).

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::json;

use super::sse::{self, AnthropicState, SseParser};
use super::{CompletionRequest, HttpProvider, ProviderError};
pub use sse::StreamEvent;

/// The wire dialect of an HTTP stream.
#[derive(Debug)]
enum Dialect {
    OpenAi,
    Anthropic(AnthropicState),
}

/// Where a stream's events come from.
enum Source {
    /// A provider's HTTP response body, as server-sent events.
    Http {
        response: reqwest::Response,
        parser: SseParser,
        dialect: Dialect,
        idle: Duration,
    },
    /// The mock: its text (or tool call) in chunks, one every `delay`.
    Mock {
        chunks: VecDeque<StreamEvent>,
        delay: Duration,
        tokens_out: u32,
        finish_reason: String,
    },
}

/// A provider's answer being streamed.
pub struct CompletionStream {
    source: Source,
    pending: VecDeque<StreamEvent>,
    done: bool,
}

impl std::fmt::Debug for CompletionStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionStream")
            .field("pending", &self.pending)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl CompletionStream {
    /// The next event; `Ok(None)` once the provider ended the stream. A provider that goes
    /// silent for longer than its timeout is an error ([`ProviderError::Timeout`]), as is a
    /// body that ends without the dialect's end event.
    pub async fn next(&mut self) -> Result<Option<StreamEvent>, ProviderError> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                if e == StreamEvent::Done {
                    self.done = true;
                }
                return Ok(Some(e));
            }
            if self.done {
                return Ok(None);
            }
            self.fill().await?;
        }
    }

    /// The events already received and not yet taken, without reading further: what a
    /// stream that stops early (the client left, it was cut) still has to be counted.
    pub fn take_buffered(&mut self) -> Vec<StreamEvent> {
        self.pending.drain(..).collect()
    }

    /// Read from the source until at least one event is pending.
    async fn fill(&mut self) -> Result<(), ProviderError> {
        match &mut self.source {
            Source::Http {
                response,
                parser,
                dialect,
                idle,
            } => {
                let chunk = tokio::time::timeout(*idle, response.chunk())
                    .await
                    .map_err(|_| ProviderError::Timeout(*idle))?
                    .map_err(|e| ProviderError::Connect(e.to_string()))?;
                let Some(bytes) = chunk else {
                    return Err(ProviderError::Connect(
                        "the stream ended before its end event".into(),
                    ));
                };
                for event in parser.feed(&bytes)? {
                    let events = match dialect {
                        Dialect::OpenAi => sse::openai_events(&event)?,
                        Dialect::Anthropic(state) => sse::anthropic_events(&event, state)?,
                    };
                    self.pending.extend(events);
                }
            }
            Source::Mock {
                chunks,
                delay,
                tokens_out,
                finish_reason,
            } => match chunks.pop_front() {
                Some(event) => {
                    if !delay.is_zero() {
                        tokio::time::sleep(*delay).await;
                    }
                    self.pending.push_back(event);
                }
                None => self.pending.extend([
                    StreamEvent::Finish(std::mem::take(finish_reason)),
                    StreamEvent::Usage {
                        tokens_in: None,
                        tokens_out: Some(*tokens_out),
                    },
                    StreamEvent::Done,
                ]),
            },
        }
        Ok(())
    }

    /// Wait for the first event, so the stream is known to have started.
    async fn started(mut self) -> Result<Self, ProviderError> {
        match self.next().await? {
            Some(first) => {
                self.done = false;
                self.pending.push_front(first);
                Ok(self)
            }
            None => Err(ProviderError::Decode("the stream ended empty".into())),
        }
    }

    /// The mock's answer `message` (an OpenAI message) in `chunks` pieces (at least one), one
    /// every `delay`, then its finish reason and output usage: its text, or the name of its
    /// first tool call and then its arguments.
    pub(super) async fn mock(
        message: &serde_json::Value,
        chunks: u32,
        delay: Duration,
        tokens_out: u32,
        finish_reason: String,
    ) -> Result<Self, ProviderError> {
        let pieces = |text: &str| -> Vec<String> {
            let chars: Vec<char> = text.chars().collect();
            let n = chunks.max(1) as usize;
            let per = chars.len().div_ceil(n).max(1);
            (0..n)
                .map(|i| chars.iter().skip(i * per).take(per).collect::<String>())
                .filter(|p| !p.is_empty())
                .collect()
        };
        let call = &message["tool_calls"][0];
        let events: VecDeque<StreamEvent> = if call.is_object() {
            let f = &call["function"];
            std::iter::once(StreamEvent::ToolCall(json!({"index": 0, "id": call["id"],
                "type": "function", "function": {"name": f["name"], "arguments": ""}})))
            .chain(
                pieces(f["arguments"].as_str().unwrap_or_default())
                    .into_iter()
                    .map(|a| {
                        StreamEvent::ToolCall(json!({"index": 0, "function": {"arguments": a}}))
                    }),
            )
            .collect()
        } else {
            let text = message["content"].as_str().unwrap_or_default();
            let mut p: VecDeque<StreamEvent> =
                pieces(text).into_iter().map(StreamEvent::Delta).collect();
            if p.is_empty() {
                p.push_back(StreamEvent::Delta(String::new()));
            }
            p
        };
        let stream = Self {
            source: Source::Mock {
                chunks: events,
                delay,
                tokens_out,
                finish_reason,
            },
            pending: VecDeque::new(),
            done: false,
        };
        stream.started().await
    }
}

/// Open an OpenAI-compatible stream: the request asks for usage in the last chunk.
pub(super) async fn openai(
    http: &HttpProvider,
    req: &CompletionRequest,
) -> Result<CompletionStream, ProviderError> {
    let mut body = super::openai::body(req);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let headers = super::openai::headers(http, req);
    let url = format!("{}/chat/completions", http.base_url);
    open(http, &url, &headers, body, Dialect::OpenAi).await
}

/// Open an Anthropic Messages stream.
pub(super) async fn anthropic(
    http: &HttpProvider,
    req: &CompletionRequest,
) -> Result<CompletionStream, ProviderError> {
    let mut body = super::anthropic::body(req);
    body["stream"] = json!(true);
    let headers = super::anthropic::headers(http, req)?;
    let url = format!("{}/v1/messages", http.base_url);
    open(
        http,
        &url,
        &headers,
        body,
        Dialect::Anthropic(AnthropicState::default()),
    )
    .await
}

async fn open(
    http: &HttpProvider,
    url: &str,
    headers: &[(&str, String)],
    body: serde_json::Value,
    dialect: Dialect,
) -> Result<CompletionStream, ProviderError> {
    let response = http.send(url, headers, body).await?;
    let stream = CompletionStream {
        source: Source::Http {
            response,
            parser: SseParser::default(),
            dialect,
            idle: http.timeout,
        },
        pending: VecDeque::new(),
        done: false,
    };
    // The provider accepted the call: a failure before the first event may still be billed
    // (never retried on the same model, charged like a timed-out attempt).
    stream.started().await.map_err(|e| match e {
        ProviderError::Timeout(_) | ProviderError::Interrupted(_) => e,
        other => ProviderError::Interrupted(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_mock_streams_its_text_in_chunks_then_usage() {
        let message = json!({"role": "assistant", "content": "abcdefg"});
        let mut s = CompletionStream::mock(&message, 3, Duration::ZERO, 9, "stop".into())
            .await
            .unwrap();
        let mut events = Vec::new();
        while let Some(e) = s.next().await.unwrap() {
            events.push(e);
        }
        assert_eq!(
            events,
            vec![
                StreamEvent::Delta("abc".into()),
                StreamEvent::Delta("def".into()),
                StreamEvent::Delta("g".into()),
                StreamEvent::Finish("stop".into()),
                StreamEvent::Usage {
                    tokens_in: None,
                    tokens_out: Some(9)
                },
                StreamEvent::Done,
            ]
        );
        assert_eq!(s.next().await.unwrap(), None);
    }
}
