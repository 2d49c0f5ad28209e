//! Error rendering per dialect: the bytes clients and filters rely on.

use http_body_util::BodyExt;
use serde_json::{json, Value};

use super::error::{ApiError, Dialect};
use crate::gateway::GatewayError;

async fn render(e: ApiError, dialect: Dialect) -> (u16, Option<String>, Option<String>, Value) {
    let resp = e.render(dialect);
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (request_id, relay) = (
        header("x-llmscope-request-id"),
        header("x-llmscope-client-error"),
    );
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        request_id,
        relay,
        serde_json::from_slice(&bytes).unwrap(),
    )
}

fn denied() -> ApiError {
    ApiError::Denied {
        reason: "over".into(),
        policy_id: Some("cap".into()),
        request_id: "req-1".into(),
    }
}

#[tokio::test]
async fn denials_in_both_dialects() {
    let (s, id, _, body) = render(denied(), Dialect::Reference).await;
    assert_eq!((s, id), (402, None));
    assert_eq!(
        body,
        llmscope_sdk::http::deny_body(false, "over", Some("cap"), "req-1")
    );
    let (s, id, _, body) = render(denied(), Dialect::OpenAi).await;
    assert_eq!((s, id.as_deref()), (402, Some("req-1")));
    assert_eq!(body["error"]["type"], "insufficient_quota");
}

#[tokio::test]
async fn request_errors_in_openai_keep_the_status() {
    let (s, _, _, body) = render(ApiError::InvalidJson("eof".into()), Dialect::OpenAi).await;
    assert_eq!(s, 400);
    assert_eq!(
        body,
        json!({"error": {"message": "Bad Request", "type": "invalid_request_error", "param": null, "code": "invalid_request"}})
    );
    let (s, _, _, body) = render(ApiError::InvalidJson("eof".into()), Dialect::Reference).await;
    assert_eq!(s, 400);
    assert_eq!(
        body,
        json!({"error": "invalid_json", "detail": "body is not valid JSON: eof"})
    );
    let (s, _, _, body) = render(ApiError::Forbidden { tenant: "t".into() }, Dialect::OpenAi).await;
    assert_eq!(
        (s, &body["error"]["code"]),
        (403, &json!("invalid_api_key"))
    );
}

#[tokio::test]
async fn client_errors_of_edge_calls_are_relayed_in_the_client_dialect() {
    let unknown = || {
        ApiError::Gateway(GatewayError::UnknownRoute {
            route: "x".into(),
            known: vec!["a".into(), "b".into()],
        })
    };
    let relayed = ApiError::ClientRequest {
        error: Box::new(unknown()),
        dialect: Dialect::OpenAi,
        relay: true,
    };
    let (s, _, relay, body) = render(relayed, Dialect::Reference).await;
    assert_eq!((s, relay.as_deref()), (404, Some("true")));
    assert_eq!(
        body["error"]["message"],
        "unknown route `x`; known routes: a, b"
    );
    let (_, _, relay, body) = render(unknown(), Dialect::Reference).await;
    assert_eq!(relay, None);
    assert_eq!(body["detail"]["known_routes"], json!(["a", "b"]));
}

#[tokio::test]
async fn scope_and_limit_errors_name_the_setting_in_both_dialects() {
    let forbidden = || ApiError::NamespaceForbidden {
        key: "acme-app".into(),
        namespace: "secret".into(),
        allowed: vec!["default".into(), "team".into()],
    };
    let (s, _, _, body) = render(forbidden(), Dialect::Reference).await;
    assert_eq!(s, 403);
    assert_eq!(body["error"], "namespace_forbidden");
    assert_eq!(
        body["detail"],
        "API key acme-app may not use budget namespace `secret`; it may use: `default`, `team` (auth.api_keys namespaces)"
    );
    let (s, _, _, body) = render(forbidden(), Dialect::OpenAi).await;
    assert_eq!(s, 403);
    assert_eq!(body["error"]["type"], "permission_error");
    assert_eq!(body["error"]["param"], "budget_namespace");
    let unknown = ApiError::UnknownNamespace {
        key: "k".into(),
        namespace: "sceret".into(),
        usable: vec![],
    };
    let (s, _, _, body) = render(unknown, Dialect::Reference).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (400, Some("unknown_namespace"))
    );
    assert!(body["detail"].as_str().unwrap().ends_with("may use: none"));
    let (s, _, _, body) = render(
        ApiError::PromptTooLarge {
            size: 2000,
            limit: 1000,
        },
        Dialect::OpenAi,
    )
    .await;
    assert_eq!(s, 413);
    assert_eq!(body["error"]["code"], "prompt_too_large");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 1000 bytes"));
    let (s, _, _, body) = render(ApiError::BodyTimeout { ms: 300 }, Dialect::Reference).await;
    assert_eq!(s, 408);
    assert_eq!(
        body["detail"],
        "the request body did not arrive within 300 ms (server.body_read_timeout_ms)"
    );
}
