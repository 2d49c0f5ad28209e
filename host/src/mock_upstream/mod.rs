//! `llmscope mock-upstream`: a stand-in LLM provider speaking OpenAI's chat-completions and
//! Anthropic's Messages wire formats, with token usage, for trying the Envoy filters (and load
//! tests) without keys or network. Deterministic: the answer echoes the model and the prompt;
//! input tokens are estimated at 4 bytes per token, output tokens are `min(max_tokens, 120)`.
//! A body with `stream: true` is answered as server-sent events in the API's own format
//! ([`stream`]), so the gateway's providers and the Envoy filters meet a real streaming
//! upstream. `POST /v1/embeddings` answers with deterministic unit vectors
//! ([`crate::providers::mock_vector`], 8 dimensions unless `dimensions` says otherwise, floats or
//! base64 as `encoding_format` asks) and `usage.prompt_tokens` counted with the BPE vocabulary
//! the model's name implies. `GET /stats` counts calls served and streams completed or aborted
//! by the client.

mod stream;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// Output tokens the mock writes unless `max_tokens` is lower.
const OUTPUT_TOKENS: u64 = 120;
/// Largest request body accepted.
const MAX_BODY: usize = 8 << 20;

/// How the stand-in answers.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Delay before each answer (before the first event of a stream), ms.
    #[arg(long = "latency-ms", default_value = "0", value_parser = parse_ms)]
    pub latency: Duration,
    /// Text chunks of a streamed answer (one word each; at most the output tokens unless
    /// --ignore-max-tokens).
    #[arg(long, default_value_t = 8)]
    pub stream_chunks: u32,
    /// Delay between two chunks of a stream, ms.
    #[arg(long = "chunk-delay-ms", default_value = "0", value_parser = parse_ms)]
    pub chunk_delay: Duration,
    /// Send no usage in streams, even when asked (`stream_options.include_usage`), like some
    /// OpenAI-compatible servers.
    #[arg(long)]
    pub no_stream_usage: bool,
    /// Stream every chunk whatever `max_tokens` says, like a provider that ignores it.
    #[arg(long)]
    pub ignore_max_tokens: bool,
    /// End every stream after this many text chunks, without its end event (a provider whose
    /// stream breaks mid-way).
    #[arg(long)]
    pub stream_break_after: Option<u32>,
}

fn parse_ms(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|e| format!("milliseconds: {e}"))
}

impl Default for Options {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            stream_chunks: 8,
            chunk_delay: Duration::ZERO,
            no_stream_usage: false,
            ignore_max_tokens: false,
            stream_break_after: None,
        }
    }
}

/// What the stand-in has done, for `GET /stats`.
#[derive(Debug, Default)]
struct Stats {
    served: AtomicU64,
    streams_completed: AtomicU64,
    streams_aborted: AtomicU64,
    /// The body of the last call, as it arrived: what the gateway forwarded.
    last_request: parking_lot::Mutex<Value>,
}

/// Serve on `listener` until the process ends, answering as `options` say.
pub async fn serve(listener: TcpListener, options: Options) -> std::io::Result<()> {
    let stats = Arc::new(Stats::default());
    let options = Arc::new(options);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let stats = Arc::clone(&stats);
        let options = Arc::clone(&options);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let stats = Arc::clone(&stats);
                let options = Arc::clone(&options);
                async move { Ok::<_, Infallible>(handle(req, &options, &stats).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A response of the stand-in: whole, or streamed.
type Reply = Response<http_body_util::Either<Full<Bytes>, stream::ChannelBody>>;

fn respond(status: StatusCode, v: &Value) -> Reply {
    let mut r = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(
        v.to_string(),
    ))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    options: &Options,
    stats: &Arc<Stats>,
) -> Reply {
    let path = req.uri().path().to_owned();
    if req.method() == Method::GET && path == "/stats" {
        return respond(
            StatusCode::OK,
            &json!({
                "served": stats.served.load(Ordering::Relaxed),
                "streams_completed": stats.streams_completed.load(Ordering::Relaxed),
                "streams_aborted": stats.streams_aborted.load(Ordering::Relaxed),
                "last_request": *stats.last_request.lock(),
            }),
        );
    }
    if req.method() != Method::POST {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": {"message": "POST /v1/chat/completions, /v1/messages or /v1/embeddings"}}),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return respond(
                StatusCode::BAD_REQUEST,
                &json!({"error": {"message": format!("cannot read body: {e}")}}),
            )
        }
    };
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return respond(
            StatusCode::BAD_REQUEST,
            &json!({"error": {"message": "body is not JSON"}}),
        );
    };
    if !options.latency.is_zero() {
        tokio::time::sleep(options.latency).await;
    }
    stats.served.fetch_add(1, Ordering::Relaxed);
    *stats.last_request.lock() = v.clone();
    let model = v["model"].as_str().unwrap_or("unknown").to_owned();
    if path == "/v1/embeddings" {
        return embeddings(&model, &v);
    }
    let tokens_in = (body.len() as u64).div_ceil(4);
    let tokens_out = v["max_tokens"]
        .as_u64()
        .or_else(|| v["max_completion_tokens"].as_u64())
        .map_or(OUTPUT_TOKENS, |m| m.min(OUTPUT_TOKENS));
    let prompt: String = v["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .chars()
        .take(60)
        .collect();
    let text = format!("[mock {model}] answer to: {prompt}");
    let params = v.as_object().cloned().unwrap_or_default();
    let anthropic = path == "/v1/messages";
    let tool = if anthropic {
        anthropic_tool(&v)
    } else {
        crate::providers::mock_choices(&text, &params, "stop")[0]["message"]["tool_calls"][0]
            ["function"]["name"]
            .as_str()
            .map(str::to_owned)
    };
    if v["stream"].as_bool() == Some(true) {
        let answer = stream::Answer {
            model,
            tool,
            text,
            tokens_in,
            tokens_out,
            include_usage: v["stream_options"]["include_usage"].as_bool() == Some(true),
        };
        return match path.as_str() {
            "/v1/chat/completions" => {
                stream::reply(stream::Dialect::OpenAi, answer, options, stats)
            }
            "/v1/messages" => stream::reply(stream::Dialect::Anthropic, answer, options, stats),
            _ => not_found(&path),
        };
    }
    match path.as_str() {
        "/v1/chat/completions" => {
            let choices = crate::providers::mock_choices(&text, &params, "stop");
            let tokens_out = tokens_out * choices.len() as u64;
            respond(
                StatusCode::OK,
                &json!({
                    "id": "chatcmpl-mock", "object": "chat.completion", "model": model,
                    "choices": choices,
                    "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out, "total_tokens": tokens_in + tokens_out}
                }),
            )
        }
        "/v1/messages" => {
            let (content, stop) = match &tool {
                Some(name) => (
                    json!([{"type": "tool_use", "id": "toolu_mock", "name": name, "input": {}}]),
                    "tool_use",
                ),
                None => (json!([{"type": "text", "text": text}]), "end_turn"),
            };
            respond(
                StatusCode::OK,
                &json!({
                    "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                    "content": content, "stop_reason": stop,
                    "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out}
                }),
            )
        }
        _ => not_found(&path),
    }
}

/// The tool a Messages body's answer calls: the one `tool_choice` names, else the first
/// tool, unless `tool_choice` is `none`.
fn anthropic_tool(v: &Value) -> Option<String> {
    let choice = &v["tool_choice"];
    match choice["type"].as_str() {
        Some("none") => None,
        Some("tool") => choice["name"].as_str().map(str::to_owned),
        _ => v["tools"][0]["name"].as_str().map(str::to_owned),
    }
}

/// An embeddings `list` for body `v`: one vector per input, usage counted with the vocabulary
/// `model`'s name implies; 400 in OpenAI's error shape for an input it cannot read.
fn embeddings(model: &str, v: &Value) -> Reply {
    use crate::providers::{encode_vector, mock_vector, EncodingFormat, MOCK_DIMENSIONS};
    let input = match llmscope_wire::embeddings::parse_input(v.get("input")) {
        Ok(i) => i,
        Err(e) => {
            return respond(
                StatusCode::BAD_REQUEST,
                &json!({"error": {"message": e.message, "type": "invalid_request_error", "param": e.param, "code": null}}),
            )
        }
    };
    let format =
        (v["encoding_format"].as_str() == Some("base64")).then_some(EncodingFormat::Base64);
    let dimensions = v["dimensions"]
        .as_u64()
        .and_then(|d| u32::try_from(d).ok())
        .filter(|d| (1..=llmscope_wire::embeddings::MAX_DIMENSIONS).contains(d))
        .unwrap_or(MOCK_DIMENSIONS);
    let prompt = crate::pricing::Prompt::Embedding {
        texts: input.texts().into_iter().map(str::to_owned).collect(),
        pretokenized: input.pretokenized(),
    };
    let tokens = prompt.count(crate::pricing::Tokenizer::by_model_name(model));
    let data: Vec<Value> = (0..input.len())
        .map(|i| {
            let vector = encode_vector(mock_vector(&input.bytes_of(i), dimensions), format);
            json!({"object": "embedding", "index": i, "embedding": vector})
        })
        .collect();
    respond(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
}

fn not_found(path: &str) -> Reply {
    respond(
        StatusCode::NOT_FOUND,
        &json!({"error": {"message": format!("no endpoint {path}; POST /v1/chat/completions, /v1/messages or /v1/embeddings")}}),
    )
}
