//! `POST /infer`: the reference API.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use super::error::ApiError;
use super::redact;
use super::request::{
    authenticate, check_prompt, header, json_response, read_json, Body, Caller, Scope,
};
use crate::gateway::{Gateway, Outcome, Served};
use crate::requests::parse_infer;

/// Authenticate (from the headers, before reading the body), parse, bind the payer to the
/// key, serve; a denial is a 402 [`ApiError::Denied`].
pub async fn infer(gw: &Arc<Gateway>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let caller = authenticate(gw, req.headers())?;
    let (headers, obj) = read_json(gw, req).await?;
    let mut inf = parse_infer(&obj, &|h| header(&headers, h), gw.config())
        .map_err(ApiError::InvalidFields)?;
    check_prompt(gw, &inf)?;
    caller.bind(gw, Scope::of(&mut inf))?;
    match gw.handle(inf).await? {
        Outcome::Served(s) => Ok(json_response(StatusCode::OK, &infer_body(gw, &caller, &s))),
        Outcome::Denied {
            request_id,
            evaluation,
        } => Err(ApiError::denied_for(gw, &caller, request_id, &evaluation)),
    }
}

fn infer_body(gw: &Gateway, caller: &Caller<'_>, s: &Served) -> Value {
    let shown = redact::evaluation(gw, caller, &s.evaluation);
    json!({
        "request_id": s.request_id,
        "answer": s.completion.text,
        "selected_model": s.model,
        "estimated_cost_usd": s.estimated_cost_usd,
        "cost_usd": s.cost_usd,
        "tokens_in": s.tokens_in,
        "tokens_out": s.tokens_out,
        "policy_decision": s.evaluation.decision.as_str(),
        "policy_reason": shown.reason,
        "policy_id": s.evaluation.policy_id,
        "effective_model_tier": s.effective_tier,
        "provider": s.provider,
        "is_fallback": s.is_fallback,
        "alerts": shown.alerts,
    })
}
