//! `POST /v1/embeddings`: OpenAI's embeddings API, through the same lifecycle as a chat call
//! (priced at the inputs' tokens, reserved, evaluated, written ahead, dispatched, settled).
//! Errors render in OpenAI's shape ([`Dialect::OpenAi`](super::error::Dialect::OpenAi)).

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::json;

use super::error::ApiError;
use super::request::{authenticate, check_prompt, header, read_json, Body, Scope};
use crate::gateway::{Gateway, Outcome, Served};
use crate::requests::parse_embeddings;

/// Authenticate (from the headers, before reading the body), parse (every key honoured or
/// refused by name), bind the payer to the key, serve; a denial is a 402
/// [`ApiError::Denied`], a model whose provider has no embeddings API a 422 before anything
/// is reserved.
pub async fn embeddings(
    gw: &Arc<Gateway>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let caller = authenticate(gw, req.headers())?;
    let (headers, obj) = read_json(gw, req).await?;
    let mut inf = parse_embeddings(&obj, &|h| header(&headers, h), gw.config())
        .map_err(ApiError::InvalidChat)?;
    check_prompt(gw, &inf)?;
    caller.bind(gw, Scope::of(&mut inf))?;
    match gw.handle(inf).await? {
        Outcome::Served(s) => Ok(list(&s)),
        Outcome::Denied {
            request_id,
            evaluation,
        } => Err(ApiError::denied_for(gw, &caller, request_id, &evaluation)),
    }
}

/// OpenAI's embeddings `list`, with the llmscope headers.
fn list(s: &Served) -> Response<Body> {
    let data: Vec<_> = s
        .embeddings
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": s.model,
        "usage": {"prompt_tokens": s.tokens_in, "total_tokens": s.tokens_in},
    });
    super::openai::served_response(&body, s)
}
