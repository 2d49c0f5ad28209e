//! `llmscope mock-upstream`: a stand-in LLM provider speaking OpenAI's chat-completions and
//! Anthropic's Messages wire formats, with token usage, for trying the Envoy filters (and load
//! tests) without keys or network. Deterministic: the answer echoes the model and the prompt;
//! input tokens are estimated at 4 bytes per token, output tokens are `min(max_tokens, 120)`.

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

/// Serve on `listener` until the process ends, answering after `latency`.
pub async fn serve(listener: TcpListener, latency: Duration) -> std::io::Result<()> {
    let served = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let served = Arc::clone(&served);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let served = Arc::clone(&served);
                async move { Ok::<_, Infallible>(handle(req, latency, &served).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn respond(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    latency: Duration,
    served: &AtomicU64,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    if req.method() == Method::GET && path == "/stats" {
        return respond(
            StatusCode::OK,
            &json!({"served": served.load(Ordering::Relaxed)}),
        );
    }
    if req.method() != Method::POST {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": {"message": "POST /v1/chat/completions or /v1/messages"}}),
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
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    served.fetch_add(1, Ordering::Relaxed);
    let model = v["model"].as_str().unwrap_or("unknown").to_owned();
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
    match path.as_str() {
        "/v1/chat/completions" => respond(
            StatusCode::OK,
            &json!({
                "id": "chatcmpl-mock", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out, "total_tokens": tokens_in + tokens_out}
            }),
        ),
        "/v1/messages" => respond(
            StatusCode::OK,
            &json!({
                "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out}
            }),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            &json!({"error": {"message": format!("no endpoint {path}; POST /v1/chat/completions or /v1/messages")}}),
        ),
    }
}
