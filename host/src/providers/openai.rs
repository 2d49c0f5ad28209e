//! Any OpenAI-compatible chat-completions and embeddings API.

use serde::Deserialize;
use serde_json::json;

use super::{
    Completion, CompletionRequest, EmbeddingRequest, Embeddings, HttpProvider, ProviderError,
    Vector,
};

#[derive(Deserialize)]
struct OpenAiResponse {
    choices: Vec<serde_json::Value>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
struct OpenAiUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
}

/// The chat-completions body for `req` (not streamed): the client's messages and forwarded
/// parameters as it sent them, the output cap under the name it used.
pub(super) fn body(req: &CompletionRequest) -> serde_json::Value {
    let f = &req.forwarded;
    let messages: Vec<_> = if f.messages.is_empty() {
        req.messages
            .iter()
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect()
    } else {
        f.messages.clone()
    };
    let mut body = json!({"model": req.model, "messages": messages});
    let cap = if f.completion_tokens_cap {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    body[cap] = json!(req.max_tokens);
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    for (k, v) in &f.params {
        body[k] = v.clone();
    }
    body
}

/// The headers of a call for `req`: the key, when configured, and the request id.
pub(super) fn headers(http: &HttpProvider, req: &CompletionRequest) -> Vec<(&'static str, String)> {
    headers_for(http, &req.request_id)
}

fn headers_for(http: &HttpProvider, request_id: &str) -> Vec<(&'static str, String)> {
    let mut headers: Vec<(&str, String)> = http
        .api_key
        .iter()
        .map(|k| ("authorization", format!("Bearer {k}")))
        .collect();
    headers.push((super::CLIENT_REQUEST_ID_HEADER, request_id.to_owned()));
    crate::otel::inject(&mut headers);
    headers
}

pub(super) async fn call(
    http: &HttpProvider,
    req: &CompletionRequest,
) -> Result<Completion, ProviderError> {
    let headers = headers(http, req);
    let value = http
        .post(
            &format!("{}/chat/completions", http.base_url),
            &headers,
            body(req),
        )
        .await?;
    let parsed: OpenAiResponse =
        serde_json::from_value(value).map_err(|e| ProviderError::decode(&e))?;
    let first = parsed
        .choices
        .first()
        .ok_or_else(|| ProviderError::Decode("no choices".into()))?;
    let finish_reason = first["finish_reason"].as_str().unwrap_or("stop").to_owned();
    Ok(Completion {
        text: super::generated_text(&parsed.choices),
        tokens_in: parsed.usage.as_ref().map(|u| u.prompt_tokens),
        tokens_out: parsed.usage.as_ref().map(|u| u.completion_tokens),
        finish_reason,
        choices: parsed.choices,
    })
}

#[derive(Deserialize)]
struct EmbeddingsResponse {
    data: Vec<EmbeddingItem>,
    #[serde(default)]
    usage: Option<EmbeddingsUsage>,
}

#[derive(Deserialize)]
struct EmbeddingItem {
    index: usize,
    embedding: Vector,
}

#[derive(Deserialize)]
struct EmbeddingsUsage {
    prompt_tokens: u32,
}

/// The embeddings body for `req`: model, input (as the client shaped it), and the encoding
/// and dimensions when the client set them.
pub(super) fn embeddings_body(req: &EmbeddingRequest) -> serde_json::Value {
    let mut body = json!({"model": req.model, "input": req.input});
    if let Some(f) = req.encoding_format {
        body["encoding_format"] = json!(f.as_str());
    }
    if let Some(d) = req.dimensions {
        body["dimensions"] = json!(d);
    }
    body
}

/// `POST {base_url}/embeddings`: one vector per input, put in input order by `index`; an
/// answer without exactly one vector for each input is a decode error.
pub(super) async fn embed(
    http: &HttpProvider,
    req: &EmbeddingRequest,
) -> Result<Embeddings, ProviderError> {
    let headers = headers_for(http, &req.request_id);
    let value = http
        .post(
            &format!("{}/embeddings", http.base_url),
            &headers,
            embeddings_body(req),
        )
        .await?;
    let parsed: EmbeddingsResponse =
        serde_json::from_value(value).map_err(|e| ProviderError::decode(&e))?;
    in_order(parsed, req.input.len())
}

fn in_order(parsed: EmbeddingsResponse, inputs: usize) -> Result<Embeddings, ProviderError> {
    if parsed.data.len() != inputs {
        return Err(ProviderError::Decode(format!(
            "{} embeddings for {inputs} inputs",
            parsed.data.len()
        )));
    }
    let mut slots: Vec<Option<Vector>> = vec![None; inputs];
    for item in parsed.data {
        match slots.get_mut(item.index) {
            Some(slot @ None) => *slot = Some(item.embedding),
            _ => {
                return Err(ProviderError::Decode(format!(
                    "embedding index {} is out of range or repeated",
                    item.index
                )))
            }
        }
    }
    Ok(Embeddings {
        vectors: slots.into_iter().flatten().collect(),
        tokens_in: parsed.usage.map(|u| u.prompt_tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::{EmbeddingInput, EncodingFormat};

    #[test]
    fn embeddings_are_sent_as_asked_and_read_back_in_input_order() {
        let req = EmbeddingRequest {
            request_id: "req-1".into(),
            model: "text-embedding-3-small".into(),
            input: EmbeddingInput::TokenArrays(vec![vec![1, 2], vec![3]]),
            encoding_format: Some(EncodingFormat::Base64),
            dimensions: Some(64),
        };
        assert_eq!(
            embeddings_body(&req),
            json!({"model": "text-embedding-3-small", "input": [[1, 2], [3]],
                   "encoding_format": "base64", "dimensions": 64})
        );
        let answer = |v: serde_json::Value| {
            in_order(serde_json::from_value(v).unwrap(), 2).map(|e| (e.vectors, e.tokens_in))
        };
        let (vectors, tokens) = answer(json!({"data": [
            {"object": "embedding", "index": 1, "embedding": "AAAAAA=="},
            {"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}],
            "usage": {"prompt_tokens": 3, "total_tokens": 3}}))
        .unwrap();
        assert_eq!(
            vectors,
            [
                Vector::Floats(vec![0.5, -0.25]),
                Vector::Base64("AAAAAA==".into())
            ]
        );
        assert_eq!(tokens, Some(3));
        for bad in [
            json!({"data": [{"index": 0, "embedding": [1.0]}]}),
            json!({"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]}),
            json!({"data": [{"index": 0, "embedding": [1.0]}, {"index": 2, "embedding": [1.0]}]}),
        ] {
            assert_eq!(answer(bad).unwrap_err().kind(), "decode");
        }
    }
}
