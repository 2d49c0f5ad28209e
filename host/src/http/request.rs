//! Reading requests — JSON bodies (media type, size limit, syntax), API keys, headers — and
//! writing JSON responses.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use llmscope_sdk::http::API_KEY_HEADER;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use crate::gateway::Gateway;

/// Response body.
pub type Body = Full<Bytes>;

/// A JSON response.
pub fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Check the API key (when keys are configured) and that it may act for `tenant`.
pub fn authorize(gw: &Gateway, headers: &HeaderMap, tenant: Option<&str>) -> Result<(), ApiError> {
    let keys = &gw.config().api_keys;
    if keys.is_empty() {
        return Ok(());
    }
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get(API_KEY_HEADER).and_then(|v| v.to_str().ok()));
    let Some(presented) = presented else {
        return Err(ApiError::MissingApiKey);
    };
    let Some(key) = gw.api_key(presented) else {
        return Err(ApiError::InvalidApiKey);
    };
    match tenant {
        Some(t) if !key.allows(t) => Err(ApiError::Forbidden {
            tenant: t.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// Read a JSON object body: 415 unless `application/json`, 413 over the limit, 400 if
/// malformed, 422 if not an object.
pub async fn read_json(
    gw: &Gateway,
    req: Request<Incoming>,
) -> Result<(HeaderMap, Map<String, Value>), ApiError> {
    let (parts, body) = req.into_parts();
    let is_json = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let limit = gw.config().max_body_bytes;
    if parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > limit)
    {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(ApiError::PayloadTooLarge { limit })
        }
        Err(e) => return Err(ApiError::UnreadableBody(e.to_string())),
    };
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(obj)) => Ok((parts.headers, obj)),
        Ok(_) => Err(ApiError::InvalidFields(vec![
            json!({"field": "(body)", "message": "must be a JSON object"}),
        ])),
        Err(e) => Err(ApiError::InvalidJson(e.to_string())),
    }
}

/// A request header's trimmed value, if present and not empty.
pub fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}
