//! The HTTP vocabulary the host and the edge filters share: every `x-llmscope-*` header name and
//! the error bodies both of them answer with. Defined once here, where the host (and
//! `llmscope-wire`) and the wasm filters can all reach them, so a filter's local 402 or 400 is
//! byte for byte what the host would have sent.
//!
//! Two body shapes: the reference API's `{"error": code, "detail": ...}` ([`error_body`]) and
//! OpenAI's `{"error": {"message", "type", "param", "code"}}` ([`openai_error_body`]), used for
//! chat-completions requests.

use serde_json::{json, Value};

/// Prefix of every llmscope header.
pub const HEADER_PREFIX: &str = "x-llmscope-";
/// Request header: tenant billed.
pub const TENANT_HEADER: &str = "x-llmscope-tenant-id";
/// Request header: calling service.
pub const CALLER_HEADER: &str = "x-llmscope-caller-id";
/// Request header: product feature.
pub const FEATURE_HEADER: &str = "x-llmscope-feature-id";
/// Request header: experiment.
pub const EXPERIMENT_HEADER: &str = "x-llmscope-experiment-id";
/// Request header: budget namespace.
pub const NAMESPACE_HEADER: &str = "x-llmscope-budget-namespace";
/// Request header: route.
pub const ROUTE_HEADER: &str = "x-llmscope-route";
/// Request header: model tier asked for (set by a filter on downgrades); response header: tier
/// served.
pub const TIER_HEADER: &str = "x-llmscope-model-tier";
/// Request header carrying the chain's request id (set by the first filter); response header
/// naming the request.
pub const REQUEST_ID_HEADER: &str = "x-llmscope-request-id";
/// Response header: `allow`, `downgrade` or `deny`.
pub const POLICY_DECISION_HEADER: &str = "x-llmscope-policy-decision";
/// Response header: the request's actual cost in USD.
pub const COST_HEADER: &str = "x-llmscope-cost-usd";
/// Header marking an edge-call error caused by the client's request (the filter relays it to
/// the client as is); any other failure of an edge call is the host's, and the filter applies
/// its host failure mode.
pub const CLIENT_ERROR_HEADER: &str = "x-llmscope-client-error";
/// Request header carrying an API key (besides `Authorization: Bearer`).
pub const API_KEY_HEADER: &str = "x-api-key";
/// The `x-llmscope-*` headers only llmscope itself sets (the tier, and the answer's decision,
/// cost and client-error marks). An edge filter removes client-sent ones from the request on
/// entry and never reads them: the tier a request goes out at travels between the filters of a
/// chain in filter state (see `proxy`), so no client can claim one. The request id is not
/// listed: the chain's first filter overwrites it.
pub const CONTROL_HEADERS: [&str; 4] = [
    TIER_HEADER,
    POLICY_DECISION_HEADER,
    COST_HEADER,
    CLIENT_ERROR_HEADER,
];

/// The 400 body of a request whose content llmscope cannot price (`n > 1`, tools, images, ...):
/// OpenAI's shape for chat bodies, the reference shape otherwise.
pub fn unpriced_body(chat: bool, message: &str, code: &str, param: &str) -> Value {
    if chat {
        openai_error_body(message, "invalid_request_error", code, Some(param))
    } else {
        error_body(code, json!([{"field": param, "message": message}]))
    }
}

/// The reference API's error body: `{"error": code, "detail": detail}`.
pub fn error_body(code: &str, detail: Value) -> Value {
    json!({"error": code, "detail": detail})
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
pub fn openai_error_body(message: &str, kind: &str, code: &str, param: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

/// The 402 body of a request denied by policy: OpenAI's error shape (with the policy's fields
/// added) for chat bodies, the reference shape otherwise.
pub fn deny_body(chat: bool, reason: &str, policy_id: Option<&str>, request_id: &str) -> Value {
    if chat {
        json!({"error": {
            "message": format!("Request denied by policy: {reason}"),
            "type": "insufficient_quota",
            "param": null,
            "code": "policy_denied",
            "policy_id": policy_id,
            "reason": reason,
            "request_id": request_id,
        }})
    } else {
        json!({
            "error": "policy_denied",
            "reason": reason,
            "policy_id": policy_id,
            "request_id": request_id,
            "detail": format!("Request denied by policy: {reason}"),
        })
    }
}

/// The 503 body when a filter cannot reach the host and fails closed.
pub fn unavailable_body(chat: bool, rule_id: &str, detail: &str) -> Value {
    let message = format!(
        "llmscope policy host unavailable for rule {rule_id} ({detail}); the request was not sent"
    );
    if chat {
        openai_error_body(&message, "api_error", "policy_host_unavailable", None)
    } else {
        error_body("policy_host_unavailable", Value::String(message))
    }
}

/// The 400 body of a request body that is not JSON (or, from a filter, not a JSON object).
pub fn invalid_json_body(chat: bool, message: &str) -> Value {
    if chat {
        openai_error_body(message, "invalid_request_error", "invalid_json", None)
    } else {
        error_body("invalid_json", Value::String(message.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_bodies_in_both_shapes() {
        let chat = deny_body(true, "over", Some("cap"), "req-1");
        assert_eq!(chat["error"]["code"], "policy_denied");
        assert_eq!(chat["error"]["type"], "insufficient_quota");
        let infer = deny_body(false, "over", Some("cap"), "req-1");
        assert_eq!(infer["error"], "policy_denied");
        assert_eq!(infer["detail"], "Request denied by policy: over");
    }

    #[test]
    fn error_shapes() {
        let parsed = |s: &str| serde_json::from_str::<Value>(s).ok();
        assert_eq!(
            Some(invalid_json_body(false, "bad")),
            parsed(r#"{"detail":"bad","error":"invalid_json"}"#)
        );
        assert_eq!(
            Some(invalid_json_body(true, "bad")),
            parsed(
                r#"{"error":{"code":"invalid_json","message":"bad","param":null,"type":"invalid_request_error"}}"#
            )
        );
    }
}
