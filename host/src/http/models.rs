//! `GET /v1/models`: the tiers and models a chat request may name, in OpenAI's list shape —
//! for the route of `x-llmscope-route` (default: the configured default route). Each tier is
//! listed (its id is what `model` may say to pick it), then each model of the route's tiers
//! (`owned_by`: its provider); `llmscope` says which tier and model an entry stands for.

use hyper::header::HeaderMap;
use hyper::{Response, StatusCode};
use llmscope_sdk::http::ROUTE_HEADER;
use serde_json::{json, Value};

use super::error::ApiError;
use super::request::{authenticate, header, json_response, Body};
use crate::gateway::Gateway;

/// The model list of the route `headers` name; 401 without a valid key when auth is on, the
/// unknown-route error (listing the known ones) for a route that is not configured.
pub fn models(gw: &Gateway, headers: &HeaderMap) -> Result<Response<Body>, ApiError> {
    authenticate(gw, headers)?;
    let cfg = gw.config();
    let route_name = header(headers, ROUTE_HEADER).unwrap_or_else(|| cfg.default_route.clone());
    let Some(route) = cfg.routes.get(&route_name) else {
        return Err(ApiError::Gateway(gw.unknown_route(&route_name)));
    };
    let provider = |model: &str| cfg.models.get(model).map(|m| m.provider.clone());
    let mut data: Vec<Value> = route
        .tiers
        .iter()
        .map(|(tier, model)| {
            json!({"id": tier, "object": "model", "created": 0, "owned_by": "llmscope",
                   "llmscope": {"route": route_name, "tier": tier, "model": model}})
        })
        .collect();
    let mut listed: Vec<&String> = Vec::new();
    for (tier, model) in &route.tiers {
        if listed.contains(&model) {
            continue;
        }
        listed.push(model);
        data.push(json!({"id": model, "object": "model", "created": 0,
                         "owned_by": provider(model).unwrap_or_default(),
                         "llmscope": {"route": route_name, "tier": tier, "model": model}}));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data}),
    ))
}
