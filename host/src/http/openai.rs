//! `POST /v1/chat/completions`: the OpenAI-compatible API, in one piece or streamed
//! ([`super::stream`]). Errors render in OpenAI's shape
//! ([`Dialect::OpenAi`](super::error::Dialect::OpenAi)).

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use llmscope_sdk::http::{COST_HEADER, POLICY_DECISION_HEADER, REQUEST_ID_HEADER, TIER_HEADER};
use serde_json::json;

use super::error::ApiError;
use super::request::{authenticate, check_prompt, header, json_response, read_json, Body, Scope};
use super::stream::{chat_stream, ResponseBody};
use crate::gateway::{Gateway, Outcome, Served};
use crate::requests::{chat_stream as stream_options, check_chat_params, parse_chat};

/// Authenticate (from the headers, before reading the body), refuse any parameter the gateway
/// would not honour (422 naming it), parse, bind the payer to the key, serve (streamed when
/// the body says `stream: true`); a denial is a 402
/// [`ApiError::Denied`].
pub async fn chat(
    gw: &Arc<Gateway>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    let caller = authenticate(gw, req.headers())?;
    let (headers, obj) = read_json(gw, req).await?;
    check_chat_params(&obj).map_err(ApiError::InvalidChat)?;
    let stream = stream_options(&obj).map_err(ApiError::InvalidChat)?;
    let mut inf =
        parse_chat(&obj, &|h| header(&headers, h), gw.config()).map_err(ApiError::InvalidChat)?;
    check_prompt(gw, &inf)?;
    caller.bind(gw, Scope::of(&mut inf))?;
    if let Some(refused) = gw.refused_parameter(&inf) {
        return Err(ApiError::InvalidChat(refused));
    }
    if let Some(options) = stream {
        return chat_stream(gw, &caller, inf, options).await;
    }
    match gw.handle(inf).await? {
        Outcome::Served(s) => Ok(completion(&s).map(ResponseBody::Left)),
        Outcome::Denied {
            request_id,
            evaluation,
        } => Err(ApiError::denied_for(gw, &caller, request_id, &evaluation)),
    }
}

/// A `chat.completion` object, with the llmscope headers.
fn completion(s: &Served) -> Response<Body> {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let c = &s.completion;
    let choices = if c.choices.is_empty() {
        json!([{"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}])
    } else {
        serde_json::Value::from(c.choices.clone())
    };
    let body = json!({
        "id": format!("chatcmpl-{}", s.request_id),
        "object": "chat.completion",
        "created": created,
        "model": s.model,
        "choices": choices,
        "usage": {"prompt_tokens": s.tokens_in, "completion_tokens": s.tokens_out, "total_tokens": s.tokens_in + s.tokens_out},
    });
    served_response(&body, s)
}

/// `body` as a 200 with the llmscope headers of `s` (request id, decision, tier, cost).
pub(super) fn served_response(body: &serde_json::Value, s: &Served) -> Response<Body> {
    let mut resp = json_response(StatusCode::OK, body);
    let h = resp.headers_mut();
    for (name, value) in [
        (REQUEST_ID_HEADER, s.request_id.clone()),
        (
            POLICY_DECISION_HEADER,
            s.evaluation.decision.as_str().to_owned(),
        ),
        (TIER_HEADER, s.effective_tier.clone()),
        (COST_HEADER, format!("{:.8}", s.cost_usd)),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    resp
}
