//! `POST /infer`: the reference API.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use super::error::ApiError;
use super::request::{authorize, header, json_response, read_json, Body};
use crate::gateway::{Gateway, Outcome, Served};
use crate::requests::parse_infer;

/// Parse, authorize, serve; a denial is a 402 [`ApiError::Denied`].
pub async fn infer(gw: &Arc<Gateway>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (headers, obj) = read_json(gw, req).await?;
    let inf = parse_infer(&obj, &|h| header(&headers, h), gw.config())
        .map_err(ApiError::InvalidFields)?;
    authorize(gw, &headers, Some(&inf.tenant_id))?;
    match gw.handle(inf).await? {
        Outcome::Served(s) => Ok(json_response(StatusCode::OK, &infer_body(&s))),
        Outcome::Denied {
            request_id,
            evaluation,
        } => Err(ApiError::denied(request_id, &evaluation)),
    }
}

fn infer_body(s: &Served) -> Value {
    json!({
        "request_id": s.request_id,
        "answer": s.completion.text,
        "selected_model": s.model,
        "estimated_cost_usd": s.estimated_cost_usd,
        "cost_usd": s.cost_usd,
        "tokens_in": s.tokens_in,
        "tokens_out": s.tokens_out,
        "policy_decision": s.evaluation.decision.as_str(),
        "policy_reason": s.evaluation.reason,
        "policy_id": s.evaluation.policy_id,
        "effective_model_tier": s.effective_tier,
        "provider": s.provider,
        "is_fallback": s.is_fallback,
        "alerts": s.evaluation.alerts,
    })
}
