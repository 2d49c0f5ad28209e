//! The built-in deterministic `mock` provider.

use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Map, Value};
use sha2::Digest as _;

use super::stream::CompletionStream;
use super::{
    Completion, CompletionRequest, EmbeddingRequest, Embeddings, EncodingFormat, ProviderError,
    Vector,
};

/// Dimensions of the mock's vectors unless a request asks for others.
pub const MOCK_DIMENSIONS: u32 = 8;

/// The mock's settings.
#[derive(Debug, Clone)]
pub struct MockSettings {
    /// Simulated latency (before the answer, or before the first chunk of a stream).
    pub latency: Duration,
    /// Output tokens to report (capped by the request's max tokens).
    pub output_tokens: u32,
    /// Models that fail.
    pub fail_models: Vec<String>,
    /// Chunks a streamed answer is cut into.
    pub stream_chunks: u32,
    /// Delay between two chunks of a stream.
    pub chunk_delay: Duration,
}

/// Answer `req` after the latency, or fail it (503) when its model is one of `fail_models`.
pub(super) async fn complete(
    req: &CompletionRequest,
    m: &MockSettings,
) -> Result<(Completion, u32), ProviderError> {
    fail_or_wait(&req.model, m).await?;
    Ok((mock_completion(req, m.output_tokens), 1))
}

/// Stream the answer [`complete`] would give in `stream_chunks` chunks, `chunk_delay` apart.
pub(super) async fn stream(
    req: &CompletionRequest,
    m: &MockSettings,
) -> Result<(CompletionStream, u32), ProviderError> {
    fail_or_wait(&req.model, m).await?;
    let c = mock_completion(req, m.output_tokens);
    let tokens_out = c.tokens_out.unwrap_or_default();
    let first = c.choices.first().cloned().unwrap_or_default();
    let s = CompletionStream::mock(
        &first["message"],
        m.stream_chunks,
        m.chunk_delay,
        tokens_out,
        c.finish_reason,
    )
    .await?;
    Ok((s, 1))
}

/// Embed `req`'s inputs after the latency (or fail as [`complete`] does): each input's
/// [`mock_vector`], encoded as asked. No usage is reported: the gateway settles at its count.
pub(super) async fn embed(
    req: &EmbeddingRequest,
    m: &MockSettings,
) -> Result<(Embeddings, u32), ProviderError> {
    fail_or_wait(&req.model, m).await?;
    let dimensions = req.dimensions.unwrap_or(MOCK_DIMENSIONS);
    let vectors = (0..req.input.len())
        .map(|i| {
            let v = mock_vector(&req.input.bytes_of(i), dimensions);
            encode_vector(v, req.encoding_format)
        })
        .collect();
    Ok((
        Embeddings {
            vectors,
            tokens_in: None,
        },
        1,
    ))
}

/// A vector in the encoding asked for (`None`: floats).
pub fn encode_vector(v: Vec<f32>, format: Option<EncodingFormat>) -> Vector {
    match format {
        None | Some(EncodingFormat::Float) => Vector::Floats(v),
        Some(EncodingFormat::Base64) => {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

/// A deterministic unit vector of `dimensions` floats for `input`: SHA-256 of the input and
/// the block number, four bytes a component mapped to [-1, 1], then normalised (as real
/// embeddings are). The mock provider and `llmscope mock-upstream` answer with it.
pub fn mock_vector(input: &[u8], dimensions: u32) -> Vec<f32> {
    let mut v = Vec::with_capacity(dimensions as usize);
    let mut block = 0u32;
    while v.len() < dimensions as usize {
        let digest = sha2::Sha256::new()
            .chain_update(input)
            .chain_update(block.to_le_bytes())
            .finalize();
        for word in digest.chunks_exact(4) {
            if v.len() == dimensions as usize {
                break;
            }
            let n = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            v.push((f64::from(n) / f64::from(u32::MAX) * 2.0 - 1.0) as f32);
        }
        block += 1;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

async fn fail_or_wait(model: &str, m: &MockSettings) -> Result<(), ProviderError> {
    if !m.latency.is_zero() {
        tokio::time::sleep(m.latency).await;
    }
    if m.fail_models.iter().any(|f| f == model) {
        return Err(ProviderError::status(
            503,
            &format!(
                r#"{{"error": {{"message": "mock provider configured to fail {}", "type": "server_error"}}}}"#,
                model
            ),
        ));
    }
    Ok(())
}

fn mock_completion(req: &CompletionRequest, output_tokens: u32) -> Completion {
    let prompt = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map_or("", |m| m.content.as_str());
    let preview: String = prompt.chars().take(60).collect();
    let per_choice = output_tokens.min(req.max_tokens);
    let finish_reason = if per_choice < output_tokens {
        "length"
    } else {
        "stop"
    };
    let text = format!("[mock {}] answer to: {preview}", req.model);
    let choices = choices(&text, &req.forwarded.params, finish_reason);
    Completion {
        text: super::generated_text(&choices),
        tokens_in: None,
        tokens_out: Some(per_choice.saturating_mul(choices.len() as u32)),
        finish_reason: choices[0]["finish_reason"]
            .as_str()
            .unwrap_or(finish_reason)
            .to_owned(),
        choices,
    }
}

/// The mock's answer `text` shaped by a chat body's forwarded `params`, as OpenAI `choices`
/// entries: `n` of them (at least one); each a call of the tool `tool_choice` names (else
/// the first tool, arguments `{}`) when tools are offered and `tool_choice` is not `none`;
/// else the text, as the JSON object `{"answer": text}` when `response_format` asks for JSON.
/// Shared with `llmscope mock-upstream`, so both stand-ins answer alike.
pub fn choices(text: &str, params: &Map<String, Value>, finish_reason: &str) -> Vec<Value> {
    let n = params
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 128);
    let tools = params.get("tools").and_then(Value::as_array);
    let choice = params.get("tool_choice");
    let tool = match choice {
        Some(Value::String(c)) if c == "none" => None,
        Some(Value::Object(c)) => c
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str),
        _ => tools
            .and_then(|t| t.first())
            .and_then(|t| t["function"]["name"].as_str()),
    };
    let json_answer = matches!(
        params
            .get("response_format")
            .and_then(|r| r.get("type"))
            .and_then(Value::as_str),
        Some("json_object" | "json_schema")
    );
    (0..n)
        .map(|i| match tool {
            Some(name) => json!({"index": i, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null,
                "tool_calls": [{"id": format!("call_mock_{i}"), "type": "function",
                    "function": {"name": name, "arguments": "{}"}}]}}),
            None => {
                let content = if json_answer {
                    json!({ "answer": text }).to_string()
                } else {
                    text.to_owned()
                };
                json!({"index": i, "finish_reason": finish_reason,
                    "message": {"role": "assistant", "content": content}})
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{
        CompletionRequest, EmbeddingInput, EmbeddingRequest, EncodingFormat, Message, Provider,
        Vector,
    };
    use super::{mock_vector, MockSettings};
    use base64::Engine as _;

    fn mock() -> Provider {
        Provider::Mock(MockSettings {
            latency: Duration::ZERO,
            output_tokens: 120,
            fail_models: vec!["bad".into()],
            stream_chunks: 4,
            chunk_delay: Duration::ZERO,
        })
    }

    #[tokio::test]
    async fn mock_embeds_deterministically_in_the_encoding_asked_for() {
        let req = EmbeddingRequest {
            request_id: "req-1".into(),
            model: "embed".into(),
            input: EmbeddingInput::Texts(vec!["a".into(), "b".into(), "a".into()]),
            encoding_format: None,
            dimensions: None,
        };
        let (e, _) = mock().embed(&req, &mut 0).await.unwrap();
        assert_eq!(e.tokens_in, None, "the gateway settles at its own count");
        let Vector::Floats(a) = &e.vectors[0] else {
            panic!("floats by default")
        };
        assert_eq!(a.len(), 8);
        assert_eq!(e.vectors[0], e.vectors[2], "same input, same vector");
        assert_ne!(e.vectors[0], e.vectors[1]);
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        let b64 = EmbeddingRequest {
            encoding_format: Some(EncodingFormat::Base64),
            dimensions: Some(20),
            input: EmbeddingInput::Tokens(vec![1, 2, 3]),
            ..req.clone()
        };
        let (e, _) = mock().embed(&b64, &mut 0).await.unwrap();
        let Vector::Base64(text) = &e.vectors[0] else {
            panic!("base64 when asked")
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap();
        let floats: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let tokens: Vec<u8> = [1u32, 2, 3].iter().flat_map(|t| t.to_le_bytes()).collect();
        assert_eq!(floats, mock_vector(&tokens, 20));
        let failing = EmbeddingRequest {
            model: "bad".into(),
            ..req
        };
        assert_eq!(
            mock().embed(&failing, &mut 0).await.unwrap_err().kind(),
            "provider_5xx"
        );
    }

    #[tokio::test]
    async fn mock_is_deterministic_and_caps_output() {
        let p = Provider::Mock(MockSettings {
            latency: Duration::ZERO,
            output_tokens: 120,
            fail_models: vec!["bad".into()],
            stream_chunks: 4,
            chunk_delay: Duration::ZERO,
        });
        let req = CompletionRequest {
            request_id: "req-1".into(),
            model: "gpt-4o".into(),
            messages: vec![Message {
                role: "user".into(),
                content: "hello".into(),
            }],
            max_tokens: 50,
            temperature: None,
            forwarded: Default::default(),
        };
        let (c, attempts) = p.complete(&req, &mut 0).await.unwrap();
        assert_eq!(
            (c.tokens_out, c.finish_reason.as_str(), attempts),
            (Some(50), "length", 1)
        );
        assert_eq!(c.text, "[mock gpt-4o] answer to: hello");
        let forwarded = super::super::Forwarded {
            params: serde_json::json!({"n": 2, "tools": [{"type": "function", "function": {"name": "lookup"}}]})
                .as_object()
                .cloned()
                .unwrap(),
            ..Default::default()
        };
        let tools = CompletionRequest {
            forwarded: forwarded.into(),
            ..req.clone()
        };
        let (c, _) = p.complete(&tools, &mut 0).await.unwrap();
        assert_eq!(
            (c.choices.len(), c.finish_reason.as_str(), c.tokens_out),
            (2, "tool_calls", Some(100))
        );
        assert_eq!(
            c.choices[1]["message"]["tool_calls"][0]["function"]["name"],
            "lookup"
        );
        assert_eq!(c.text, "lookup{}lookup{}");
        let failing = CompletionRequest {
            model: "bad".into(),
            ..req
        };
        assert_eq!(
            p.complete(&failing, &mut 0).await.unwrap_err().kind(),
            "provider_5xx"
        );
    }
}
