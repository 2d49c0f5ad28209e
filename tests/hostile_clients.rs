//! Clients that lie about who pays, pry into other tenants' spend, or try to tie the gateway
//! up — against the real `llmscope serve` binary. The product's invariant: the tenant, budget
//! namespace and (when fixed) feature and experiment a request is charged to come from the API
//! key that authenticated it, never from what the client asserts.
//!
//! - keys bind scopes: a namespace the key may not use → 403 naming the key and what it may use
//!   (a key configured with tenants only may use `default`);
//!   a namespace the policy does not define → 400 instead of falling back to `default`; a key's
//!   fixed feature / experiment replace the client's; on `/infer`, chat and `/v1/snapshot`;
//! - leaks: a tenant key gets no other tenants' figures from a 402, a downgrade reason or
//!   `/v1/snapshot`, and `/v1/policies` needs a `*` key;
//! - denial of service: the key is checked before the body is read (401 at once for a huge or
//!   endless body), a body that dribbles in gets 408, connections beyond
//!   `server.max_connections` are turned away, a prompt above `server.max_prompt_bytes` gets
//!   413 naming the limit.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "integration tests: a failed unwrap or panic is a failed test"
)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use llmscope_tests::gateway::{read_jsonl, Gateway, Options, BASE_CONFIG};
use serde_json::{json, Value};

const ACME: &str = "acme-key-0123456789";
const ADMIN: &str = "admin-key-0123456789";

/// `default` with a namespace-wide cap a single expensive request exceeds and a generous
/// per-tenant cap; `team` (no rules); `secret` (someone else's, no rules).
const POLICY: &str = r#"version: "hostile-1"
namespaces:
  default:
    rules:
      - id: "shared-cap"
        primitive: budget_threshold
        period: hourly
        limit_usd: 0.004
        action: deny
      - id: "per-tenant-cap"
        primitive: budget_threshold
        period: hourly
        limit_usd: 5.0
        action: deny
        scope: [budget_namespace, tenant]
  team:
    rules: []
  secret:
    rules: []
"#;

/// With authentication off, what opens the edge endpoints to whoever reaches the port.
const OPEN_EDGE: &str = "auth: {unauthenticated_edge: true}\n";

const EDGE: &str = "edge-key-0123456789";
const EDGE_ALL: &str = "edge-all-key-0123456789";

/// A policy that allows everything.
const NO_RULES: &str = "version: \"open\"\nnamespaces:\n  default:\n    rules: []\n";

/// Keys as configs wrote them before scopes existed: a tenant key and an operator key.
fn legacy_auth() -> String {
    format!(
        "auth:\n  api_keys:\n    - {{key: {ACME}, tenants: [acme]}}\n    - {{key: {ADMIN}, tenants: [\"*\"]}}\n"
    )
}

fn gateway_with(auth: &str) -> Gateway {
    let mut opts = Options::new(POLICY);
    opts.extra_yaml = auth.to_owned();
    Gateway::start(&opts)
}

async fn send(
    gw: &Gateway,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: Value,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(gw.at(path)).json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn infer(gw: &Gateway, key: Option<&str>, body: Value) -> (u16, Value) {
    send(gw, "/infer", key, &[], body).await
}

async fn get(gw: &Gateway, path: &str, key: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .get(gw.at(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The telemetry line of `request_id` (written before the answer; polled to be safe).
async fn telemetry_of(gw: &Gateway, request_id: &str) -> Value {
    for _ in 0..100 {
        if let Some(line) = read_jsonl(&gw.telemetry)
            .into_iter()
            .find(|l| l["request_id"] == request_id)
        {
            return line;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no telemetry line for {request_id}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_without_namespaces_may_use_only_default_and_no_namespace_is_invented() {
    let gw = gateway_with(&legacy_auth());

    // A tenant key configured before scopes existed may use only `default`: naming another
    // namespace (to escape its budget) is refused, naming the key and what it may use.
    let (status, body) = infer(
        &gw,
        Some(ACME),
        json!({"prompt": "hi", "tenant_id": "acme", "budget_namespace": "secret"}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "namespace_forbidden", "{body}");
    let detail = body["detail"].as_str().unwrap();
    for part in ["auth.api_keys[0]", "`secret`", "may use: `default`"] {
        assert!(detail.contains(part), "{part} not in {detail}");
    }
    let (status, body) = infer(
        &gw,
        Some(ACME),
        json!({"prompt": "hi", "tenant_id": "acme"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let line = telemetry_of(&gw, body["request_id"].as_str().unwrap()).await;
    assert_eq!(line["budget_namespace"], "default", "{line}");

    // The same on the OpenAI endpoint, with the namespace in a header, in OpenAI's shape.
    let chat = json!({"model": "cheap", "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = send(
        &gw,
        "/v1/chat/completions",
        Some(ACME),
        &[
            ("x-llmscope-tenant-id", "acme"),
            ("x-llmscope-budget-namespace", "secret"),
        ],
        chat,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "namespace_forbidden", "{body}");
    assert_eq!(body["error"]["param"], "budget_namespace", "{body}");

    // And on the snapshot endpoint.
    let (status, body) = get(
        &gw,
        "/v1/snapshot?tenant_id=acme&budget_namespace=secret&tokens_in=10",
        ACME,
    )
    .await;
    assert_eq!(status, 403, "{body}");

    // A `*` key may use every namespace the policy defines, but a namespace the policy does
    // not define is refused instead of silently charged to `default`.
    let (status, body) = infer(
        &gw,
        Some(ADMIN),
        json!({"prompt": "hi", "tenant_id": "globex", "budget_namespace": "secret"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = infer(
        &gw,
        Some(ADMIN),
        json!({"prompt": "hi", "tenant_id": "globex", "budget_namespace": "sceret"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "unknown_namespace", "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("`sceret`"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_binds_its_namespaces_and_fixed_attribution() {
    let gw = gateway_with(&format!(
        "auth:\n  api_keys:\n    - {{key: {ACME}, name: acme-app, tenants: [acme], namespaces: [team, default], feature_id: acme-chat}}\n"
    ));
    let (status, body) = infer(
        &gw,
        Some(ACME),
        json!({"prompt": "hi", "tenant_id": "acme", "budget_namespace": "secret"}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let detail = body["detail"].as_str().unwrap();
    for part in ["acme-app", "`secret`", "`team`, `default`"] {
        assert!(detail.contains(part), "{part} not in {detail}");
    }

    // The key's fixed feature wins over the client's; no namespace → the key's default (the
    // first it lists); the experiment, not fixed, is the client's.
    let (status, body) = infer(
        &gw,
        Some(ACME),
        json!({"prompt": "hi", "tenant_id": "acme", "feature_id": "someone-elses-feature",
               "experiment_id": "exp-7"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let line = telemetry_of(&gw, body["request_id"].as_str().unwrap()).await;
    assert_eq!(line["feature_id"], "acme-chat", "{line}");
    assert_eq!(line["experiment_id"], "exp-7", "{line}");
    assert_eq!(line["budget_namespace"], "team", "{line}");

    // Chat: attribution headers are overridden the same way.
    let (status, body) = send(
        &gw,
        "/v1/chat/completions",
        Some(ACME),
        &[
            ("x-llmscope-tenant-id", "acme"),
            ("x-llmscope-feature-id", "someone-elses-feature"),
            ("x-llmscope-budget-namespace", "default"),
        ],
        json!({"model": "cheap", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap().trim_start_matches("chatcmpl-");
    let line = telemetry_of(&gw, id).await;
    assert_eq!(line["feature_id"], "acme-chat", "{line}");
    assert_eq!(line["budget_namespace"], "default", "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_keys_see_no_other_tenants_figures() {
    let gw = gateway_with(&legacy_auth());

    // Another tenant spends in the shared namespace.
    let (status, body) = infer(
        &gw,
        Some(ADMIN),
        json!({"prompt": "globex's secret project", "tenant_id": "globex"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // acme's request is over the namespace-wide cap: 402, but the reason does not tell acme
    // what the namespace (globex included) has spent.
    let expensive = json!({"prompt": "hi", "tenant_id": "acme", "model_tier": "expensive"});
    let (status, body) = infer(&gw, Some(ACME), expensive.clone()).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["policy_id"], "shared-cap", "{body}");
    for field in ["reason", "detail"] {
        let text = body[field].as_str().unwrap();
        assert!(
            !text.contains("spent") && !text.contains('$'),
            "{field} leaks figures: {text}"
        );
        assert!(text.contains("withheld"), "{field}: {text}");
    }
    // An operator key sees the figures.
    let (status, body) = infer(&gw, Some(ADMIN), expensive).await;
    assert_eq!(status, 402);
    assert!(body["reason"].as_str().unwrap().contains("spent"), "{body}");

    // The snapshot shows acme its own per-tenant budget, not the namespace-wide one.
    let (status, body) = get(&gw, "/v1/snapshot?tenant_id=acme&tokens_in=10", ACME).await;
    assert_eq!(status, 200, "{body}");
    let rules = body["rules"].as_array().unwrap();
    let rule = |id: &str| rules.iter().find(|r| r["rule_id"] == id).unwrap().clone();
    let shared = rule("shared-cap");
    assert!(shared["snapshot"].is_null(), "{shared}");
    assert!(shared["withheld"].is_string(), "{shared}");
    assert!(
        rule("per-tenant-cap")["snapshot"]["values"].is_array(),
        "{body}"
    );
    let (_, body) = get(&gw, "/v1/snapshot?tenant_id=acme&tokens_in=10", ADMIN).await;
    let rules = body["rules"].as_array().unwrap();
    assert!(
        rules.iter().all(|r| r["snapshot"]["values"].is_array()),
        "{body}"
    );

    // The loaded policies (every tenant's limits) are for operators.
    assert_eq!(get(&gw, "/v1/policies", ACME).await.0, 403);
    assert_eq!(get(&gw, "/v1/policies", ADMIN).await.0, 200);
}

/// Write `head` (and `body`, if any) to the gateway on a raw socket, then read until the
/// server answers or closes, for at most `wait`. Returns what was read and how long it took.
fn raw_exchange(gw: &Gateway, head: &str, body: &[u8], wait: Duration) -> (String, Duration) {
    let addr = gw.url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let start = Instant::now();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    read_answer(&mut s, start, wait)
}

fn read_answer(s: &mut TcpStream, start: Instant, wait: Duration) -> (String, Duration) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < wait {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&got).contains("\r\n\r\n{") && got.ends_with(b"}") {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
}

#[test]
fn the_key_is_checked_before_a_huge_or_endless_body_is_read() {
    let gw = gateway_with(&legacy_auth());
    // A body that never ends (chunked, one chunk sent): answered 401 without waiting for it.
    let head = "POST /infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    let chunk = format!("400\r\n{}\r\n", "x".repeat(0x400));
    let (answer, took) = raw_exchange(&gw, head, chunk.as_bytes(), Duration::from_secs(3));
    assert!(
        answer.starts_with("HTTP/1.1 401"),
        "after {took:?}: {answer:?}"
    );
    // A declared 1 GiB body with a wrong key: 401 (not 413: who asks comes first).
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-api-key: not-a-key-0000000000\r\ncontent-length: 1073741824\r\n\r\n";
    let (answer, took) = raw_exchange(&gw, head, &[b'{'; 1024], Duration::from_secs(3));
    assert!(
        answer.starts_with("HTTP/1.1 401"),
        "after {took:?}: {answer:?}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn a_body_that_dribbles_in_gets_408() {
    // The default timeout (10 s), on a gateway configured as before the setting existed.
    let gw = Gateway::start(&Options::new(POLICY));
    let addr = gw.url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let start = Instant::now();
    s.write_all(b"POST /infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{\"prompt\": \"")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // One byte every 250 ms: the 200 bytes would take 50 s. Look for the answer right before
    // each write (a write after the server closed would reset the connection).
    while start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(200));
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                break;
            }
            Err(_) => {}
        }
        if s.write_all(b"x").is_err() {
            break;
        }
    }
    let (rest, _) = read_answer(&mut s, Instant::now(), Duration::from_secs(1));
    let answer = format!("{}{rest}", String::from_utf8_lossy(&got));
    let took = start.elapsed();
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "after {took:?}: {answer:?}"
    );
    assert!(answer.contains("10000 ms"), "{answer}");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(14),
        "{took:?}"
    );

    // Configured shorter.
    let mut opts = Options::new(POLICY);
    opts.config_template = Some(BASE_CONFIG.replace(
        "  max_body_bytes: {max_body}\n",
        "  max_body_bytes: {max_body}\n  body_read_timeout_ms: 300\n",
    ));
    let gw = Gateway::start(&opts);
    let head = "POST /infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n";
    let (answer, took) = raw_exchange(&gw, head, b"{\"pro", Duration::from_secs(3));
    assert!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("server.body_read_timeout_ms"),
        "after {took:?}: {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prompt_above_the_cap_gets_413_naming_the_limit() {
    // The default cap (512 KiB) is below the default body limit (1 MiB).
    let mut opts = Options::new(NO_RULES);
    opts.extra_yaml = OPEN_EDGE.into();
    let gw = Gateway::start(&opts);
    let big = "word ".repeat(120_000);
    let (status, body) = infer(&gw, None, json!({"prompt": big, "tenant_id": "acme"})).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"], "prompt_too_large", "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("524288") && detail.contains("server.max_prompt_bytes"),
        "{detail}"
    );
    // Chat: the conversation's messages count together.
    let half = "word ".repeat(60_000);
    let (status, body) = send(
        &gw,
        "/v1/chat/completions",
        None,
        &[("x-llmscope-tenant-id", "acme")],
        json!({"model": "cheap", "messages": [{"role": "system", "content": half}, {"role": "user", "content": half}]}),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "prompt_too_large", "{body}");
    // Through Envoy (`/v1/edge/context`): the same cap, relayed to the client in its dialect.
    let call = json!({"request_id": "req-big", "path": "/v1/chat/completions", "aggregates": [],
                      "headers": {"x-llmscope-tenant-id": "acme"},
                      "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": big}]}});
    let (status, body) = send(&gw, "/v1/edge/context", None, &[], call).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "prompt_too_large", "{body}");
    assert!(read_jsonl(&gw.telemetry).is_empty(), "nothing was priced");
    // But a report of one that went out (its filter failed open) is priced: it was billed.
    let report = json!({"original": {"request_id": "req-big-billed", "path": "/v1/chat/completions",
                        "headers": {"x-llmscope-tenant-id": "acme"}, "aggregates": [],
                        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": big}]}},
                        "effective_tier": "", "status": 200, "usage": {"tokens_in": 120000, "tokens_out": 10}, "rules": []});
    let (status, body) = send(&gw, "/v1/edge/report", None, &[], report).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        telemetry_of(&gw, "req-big-billed").await["cost_usd"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // Under the cap: served.
    let (status, _) = infer(
        &gw,
        None,
        json!({"prompt": "word ".repeat(1000), "tenant_id": "acme"}),
    )
    .await;
    assert_eq!(status, 200);
}

#[test]
fn connections_beyond_the_cap_are_turned_away() {
    let mut opts = Options::new(POLICY);
    opts.config_template = Some(BASE_CONFIG.replace(
        "  max_body_bytes: {max_body}\n",
        "  max_body_bytes: {max_body}\n  max_connections: 4\n",
    ));
    let gw = Gateway::start(&opts);
    let addr = gw.url.trim_start_matches("http://").to_owned();
    // Four idle connections hold every slot.
    let mut idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let health = "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut extra = TcpStream::connect(&addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let _ = extra.write_all(health.as_bytes());
    let (answer, took) = read_answer(&mut extra, Instant::now(), Duration::from_secs(3));
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 503"),
        "the fifth connection was served: {answer:?}"
    );
    assert!(
        answer.is_empty() || answer.contains("server.max_connections"),
        "{answer}"
    );
    assert!(
        took < Duration::from_secs(2),
        "refused at once, not held: {took:?}"
    );
    // The admitted ones are served.
    let first = &mut idle[0];
    first
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    first.write_all(health.as_bytes()).unwrap();
    let (answer, _) = read_answer(first, Instant::now(), Duration::from_secs(3));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    // A slot freed is a slot for the next client.
    drop(idle.pop());
    let mut served = false;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(50));
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let _ = s.write_all(health.as_bytes());
        let (answer, _) = read_answer(&mut s, Instant::now(), Duration::from_secs(1));
        if answer.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
    }
    assert!(served, "a freed slot was never reused");
}

/// A policy without `default`: a key allowed every namespace (`*`) used to name `default` and
/// run no rules at all. Only a key bound to `default` by name may use an undefined `default`.
#[tokio::test(flavor = "multi_thread")]
async fn a_star_namespace_key_cannot_escape_every_rule_through_an_undefined_default() {
    let capped = "version: \"no-default\"\nnamespaces:\n  team:\n    rules:\n      - {id: cap, primitive: budget_threshold, period: hourly, limit_usd: 0.0000001, action: deny}\n";
    let mut opts = Options::new(capped);
    opts.extra_yaml = format!(
        "auth:\n  api_keys:\n    - {{key: {ACME}, tenants: [acme], namespaces: [\"*\"], default_namespace: team}}\n"
    );
    let gw = Gateway::start(&opts);
    let body = json!({"prompt": "Summarize this document", "tenant_id": "acme", "budget_namespace": "default"});
    let (status, answer) = send(&gw, "/infer", Some(ACME), &[], body).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"], "unknown_namespace", "{answer}");
}

/// Through Envoy a body without `messages` is priced as `/infer` (a prompt at a tier): one
/// naming its own model or several completions (a legacy `/v1/completions` body) would go out
/// billed at another model, n times, than what was priced.
#[tokio::test(flavor = "multi_thread")]
async fn an_edge_body_without_messages_cannot_name_a_model_or_many_completions() {
    let mut opts = Options::new(NO_RULES);
    opts.extra_yaml = OPEN_EDGE.into();
    let gw = Gateway::start(&opts);
    for (extra, field) in [
        (json!({"model": "gpt-4o"}), "model"),
        (json!({"n": 64}), "n"),
        (json!({"best_of": 64}), "best_of"),
    ] {
        let mut body = json!({"prompt": "Summarize this document", "tenant_id": "acme"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let call = json!({"request_id": format!("req-unpriced-{field}"), "path": "/v1/completions", "aggregates": [], "body": body});
        let (status, answer) = send(&gw, "/v1/edge/context", None, &[], call).await;
        assert!((400..500).contains(&status), "{field}: {status} {answer}");
        assert!(answer.to_string().contains(field), "{answer}");
    }
}

/// The edge endpoints reserve and record spend for any tenant. They used to answer anyone when
/// authentication was off, and any `*` client key when it was on; a filter's key could also
/// serve requests. Now: closed without keys unless `auth.unauthenticated_edge` opens them, an
/// edge key (`kind: edge`) only, for its tenants, and good for nothing else.
#[tokio::test(flavor = "multi_thread")]
async fn the_edge_endpoints_need_an_edge_key_for_the_tenant() {
    let context = |tenant: &str, id: &str| {
        json!({"request_id": id, "path": "/infer", "aggregates": [],
               "body": {"prompt": "Summarize this document", "tenant_id": tenant}})
    };
    let closed = Gateway::start(&Options::new(NO_RULES));
    let (status, answer) = send(
        &closed,
        "/v1/edge/context",
        None,
        &[],
        context("acme", "req-e0"),
    )
    .await;
    assert_eq!(status, 403, "auth off, edge not opened: {answer}");
    assert_eq!(answer["error"], "edge_closed", "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .unwrap()
            .contains("unauthenticated_edge"),
        "{answer}"
    );
    let forged =
        json!({"request": {"request_id": "req-forged"}, "effective_tier": "cheap", "status": 200});
    let (status, answer) = send(&closed, "/v1/edge/report", None, &[], forged).await;
    assert_eq!(status, 403, "{answer}");
    assert!(read_jsonl(&closed.telemetry).is_empty());

    let gw = gateway_with(&format!(
        "{}    - {{key: {EDGE}, kind: edge, tenants: [acme]}}\n    - {{key: {EDGE_ALL}, kind: edge, tenants: [\"*\"]}}\n",
        legacy_auth()
    ));
    let (status, answer) = send(
        &gw,
        "/v1/edge/context",
        Some(ADMIN),
        &[],
        context("acme", "req-e1"),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (403, Some("wrong_key_kind")),
        "{answer}"
    );
    let (status, answer) = send(
        &gw,
        "/v1/edge/context",
        Some(EDGE),
        &[],
        context("victim", "req-e2"),
    )
    .await;
    assert_eq!(status, 403, "the edge key does not list `victim`: {answer}");
    let (status, answer) = send(
        &gw,
        "/v1/edge/context",
        Some(EDGE),
        &[],
        context("acme", "req-e3"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let report = json!({"request": answer["request"], "effective_tier": answer["request"]["requested_tier"],
                        "status": 200, "usage": {"tokens_in": 10, "tokens_out": 5}, "rules": []});
    let (status, answer) = send(&gw, "/v1/edge/report", Some(ACME), &[], report.clone()).await;
    assert_eq!(status, 403, "a tenant key cannot report spend: {answer}");
    let (status, answer) = send(&gw, "/v1/edge/report", Some(EDGE), &[], report).await;
    assert_eq!(
        (status, answer["recorded"].as_bool()),
        (200, Some(true)),
        "{answer}"
    );
    assert_eq!(telemetry_of(&gw, "req-e3").await["tenant_id"], "acme");

    // Forbidden tenants are the client's error: relayed, so the filter answers 403 rather
    // than failing open.
    let resp = reqwest::Client::new()
        .post(gw.at("/v1/edge/context"))
        .bearer_auth(EDGE)
        .json(&context("victim", "req-e4"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    assert!(resp.headers().contains_key("x-llmscope-client-error"));

    // Another edge key's pending request cannot be taken over by a report that names only
    // `original` (the request as the filter saw it) for the key's own tenant.
    let (status, held) = send(
        &gw,
        "/v1/edge/context",
        Some(EDGE_ALL),
        &[],
        context("victim", "req-e5"),
    )
    .await;
    assert_eq!(status, 200, "{held}");
    let hijack = json!({"original": context("acme", "req-e5"), "effective_tier": "cheap",
                        "status": 200, "usage": {"tokens_in": 1, "tokens_out": 1}, "rules": []});
    let (status, answer) = send(&gw, "/v1/edge/report", Some(EDGE), &[], hijack).await;
    assert_eq!(status, 403, "req-e5 is victim's: {answer}");
    let real = json!({"request": held["request"], "effective_tier": "cheap", "status": 200,
                      "usage": {"tokens_in": 1000, "tokens_out": 500}, "rules": []});
    let (status, answer) = send(&gw, "/v1/edge/report", Some(EDGE_ALL), &[], real).await;
    assert_eq!(
        (status, answer["recorded"].as_bool()),
        (200, Some(true)),
        "{answer}"
    );
    assert_eq!(telemetry_of(&gw, "req-e5").await["tenant_id"], "victim");

    // An edge key serves no requests and reads nothing.
    let body = json!({"prompt": "Summarize this document", "tenant_id": "acme"});
    let (status, answer) = infer(&gw, Some(EDGE), body).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (403, Some("wrong_key_kind")),
        "{answer}"
    );
    let (status, _) = get(&gw, "/v1/policies", EDGE).await;
    assert_eq!(status, 403);
}

/// The Envoy path priced a request at the tier's model whatever the upstream answered with: an
/// upstream (or a route rewrite) serving gpt-4o for a request priced at gpt-4o-mini was billed
/// at 1/17 of its cost. The filter now reports the model the answer names, and the host
/// prices at it (a dated snapshot name resolves to its model).
#[tokio::test(flavor = "multi_thread")]
async fn an_edge_report_is_priced_at_the_model_the_upstream_answered_with() {
    let mut opts = Options::new(NO_RULES);
    opts.extra_yaml = OPEN_EDGE.into();
    let gw = Gateway::start(&opts);
    for (id, answered, model, cost) in [
        (
            "req-m1",
            "gpt-4o-2024-08-06",
            "gpt-4o",
            1000.0 * 2.5e-6 + 500.0 * 10e-6,
        ),
        (
            "req-m2",
            "gpt-4o-mini",
            "gpt-4o-mini",
            1000.0 * 0.15e-6 + 500.0 * 0.6e-6,
        ),
        (
            "req-m3",
            "some-unpriced-model",
            "gpt-4o-mini",
            1000.0 * 0.15e-6 + 500.0 * 0.6e-6,
        ),
    ] {
        let call = json!({"request_id": id, "path": "/infer", "aggregates": [],
                          "body": {"prompt": "Summarize this document", "tenant_id": "acme"}});
        let (status, answer) = send(&gw, "/v1/edge/context", None, &[], call).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["request"]["model"], "gpt-4o-mini");
        let report = json!({"request": answer["request"], "effective_tier": "cheap", "status": 200,
                            "model": answered, "usage": {"tokens_in": 1000, "tokens_out": 500}, "rules": []});
        let (status, answer) = send(&gw, "/v1/edge/report", None, &[], report).await;
        assert_eq!(status, 200, "{answer}");
        let t = telemetry_of(&gw, id).await;
        assert_eq!(t["model"], model, "{answered}: {t}");
        let billed = t["cost_usd"].as_f64().unwrap();
        assert!(
            (billed - cost).abs() < 1e-9,
            "{answered}: {billed} vs {cost}: {t}"
        );
    }
}
