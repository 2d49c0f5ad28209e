//! The policies as proxy-wasm filters inside a real Envoy 1.40 (V8), with a real `llmscope serve`
//! as control plane and a local upstream that counts calls: allow, deny (402, upstream never
//! called), downgrade (tier header, rewritten model), usage reported back into telemetry and the
//! budget, host down or slow (fail closed / open), invalid plugin configuration, client errors,
//! and the shipped example configuration.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "integration tests: a failed unwrap or panic is a failed test"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use llmscope_tests::envoy::{self, Envoy, Filter};
use llmscope_tests::gateway::{read_jsonl, Gateway, Options};
use llmscope_tests::streaming::{Events, MockUpstream};
use llmscope_tests::upstream::Upstream;
use serde_json::{json, Value};

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

/// The filters' key: the host takes edge calls from an edge key only.
const EDGE_KEY: &str = "edge-key-0123456789";

fn host(on_unavailable: &str, timeout_ms: u64) -> Value {
    json!({"cluster": "llmscope", "timeout_ms": timeout_ms, "on_unavailable": on_unavailable,
           "api_key": EDGE_KEY})
}

/// The host's auth: the filters' edge key.
fn edge_auth() -> String {
    format!("auth:\n  api_keys:\n    - {{key: {EDGE_KEY}, kind: edge, tenants: [\"*\"]}}\n")
}

fn budget(id: &str, limit_usd: f64) -> Value {
    json!({"id": id, "primitive": "budget_threshold", "period": "hourly", "limit_usd": limit_usd,
           "action": "deny", "deny_reason": format!("{id}: hourly budget exceeded")})
}

fn prefer_cheap() -> Value {
    json!({"id": "prefer-cheap", "primitive": "route_preference", "route_name": "/answer-routed", "prefer_tier": "cheap"})
}

/// A host (seed policies, its own logs), an upstream and an Envoy running `filters`.
struct Stack {
    gw: Gateway,
    upstream: Upstream,
    envoy: Envoy,
}

async fn start_envoy(config: String) -> Envoy {
    tokio::task::spawn_blocking(move || Envoy::start(&config))
        .await
        .unwrap()
}

async fn stack(filters: Vec<Filter>) -> Stack {
    let seed = std::fs::read_to_string(llmscope_tests::seed_config()).unwrap();
    let mut opts = Options::new(&seed);
    opts.extra_yaml = edge_auth();
    let gw = Gateway::start(&opts);
    let upstream = Upstream::start().await;
    let config = envoy::config(&filters, port_of(&gw.url), upstream.addr.port());
    let envoy = start_envoy(config).await;
    Stack {
        gw,
        upstream,
        envoy,
    }
}

async fn chat(
    envoy: &Envoy,
    tenant: &str,
    model: &str,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = reqwest::Client::new()
        .post(envoy.at("/v1/chat/completions"))
        .header("x-llmscope-tenant-id", tenant)
        .header("x-llmscope-budget-namespace", "demo")
        .header("x-llmscope-route", "/answer-routed")
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "Summarize this document for the board"}]}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

/// The lines of `path` whose `request_id` is `id`, waiting up to 15 s for at least one.
async fn lines_for(path: &Path, id: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let lines: Vec<Value> = read_jsonl(path)
            .into_iter()
            .filter(|l| l["request_id"] == id)
            .collect();
        if !lines.is_empty() || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn seen(upstream: &Upstream) -> Vec<(String, String, Value)> {
    upstream.state.seen.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_passes_through_and_the_usage_is_reported() {
    let s = stack(vec![Filter::builtin(
        "budget_threshold",
        &budget("edge-cap", 100.0),
        &host("closed", 2000),
    )])
    .await;
    let (status, headers, body) = chat(&s.envoy, "acme", "gpt-4o").await;
    assert_eq!(status, 200, "{body}\n{}", s.envoy.log());
    assert_eq!(body["model"], "gpt-4o");
    assert_eq!(s.upstream.calls(), 1);
    let calls = seen(&s.upstream);
    let (path, sent_headers, sent_body) = &calls[0];
    assert_eq!(path, "/v1/chat/completions");
    assert_eq!(
        sent_body["model"], "gpt-4o",
        "an allowed body keeps its model"
    );
    assert_eq!(
        sent_body["max_tokens"], 500,
        "and asks for no more than the priced output"
    );
    assert!(
        sent_headers.contains("x-llmscope-model-tier: expensive\n"),
        "{sent_headers}"
    );
    let id = sent_headers
        .lines()
        .find_map(|l| l.strip_prefix("x-llmscope-request-id: "))
        .unwrap()
        .to_owned();
    assert!(id.starts_with("req-") && id.len() == 36, "{id}");
    assert!(
        headers.get("x-llmscope-request-id").is_none()
            || headers["x-llmscope-request-id"] == id.as_str()
    );

    let telemetry = lines_for(&s.gw.telemetry, &id).await;
    assert_eq!(telemetry.len(), 1, "one telemetry line per request");
    let t = &telemetry[0];
    assert_eq!(t["status"], "ok");
    assert_eq!(t["tenant_id"], "acme");
    assert_eq!(t["budget_namespace"], "demo");
    assert_eq!(t["model"], "gpt-4o");
    assert_eq!(
        (t["tokens_in"].as_u64(), t["tokens_out"].as_u64()),
        (Some(42), Some(7))
    );
    assert_eq!(t["cost_source"], "provider_usage");
    // 42 × $2.50/M + 7 × $10/M.
    assert!(
        (t["cost_usd"].as_f64().unwrap() - 0.000175).abs() < 1e-12,
        "{t}"
    );
    assert_eq!(t["finish_reason"], "stop");
    assert_eq!(t["policy_decision"], "allow");
    let decisions = lines_for(&s.gw.decisions, &id).await;
    assert_eq!(decisions.len(), 1);
    let rules = decisions[0]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["rule_id"], "edge-cap");
    assert_eq!(rules[0]["decision"], "allow");
    assert_eq!(rules[0]["facts"]["window_limit_usd"], 100.0);
    // Provenance at the edge: the aggregate values the filter was answered and the request
    // context; no digests (the host never sees a filter's bytes or its Envoy settings).
    assert_eq!(
        rules[0]["aggregates"]["window_cost_usd"]["value"].as_f64(),
        Some(rules[0]["facts"]["window_cost_usd"].as_f64().unwrap()),
        "{}",
        decisions[0]
    );
    assert!(rules[0].get("component_sha256").is_none());
    assert_eq!(decisions[0]["policy_input"]["model"], "gpt-4o");
}

#[tokio::test(flavor = "multi_thread")]
async fn deny_answers_402_like_the_host_and_never_calls_the_upstream() {
    // The estimate alone (~$0.005 at gpt-4o) exceeds this cap.
    let s = stack(vec![Filter::builtin(
        "budget_threshold",
        &budget("tiny-cap", 0.001),
        &host("closed", 2000),
    )])
    .await;
    let (status, headers, body) = chat(&s.envoy, "acme", "gpt-4o").await;
    assert_eq!(status, 402, "{body}\n{}", s.envoy.log());
    assert_eq!(body["error"]["code"], "policy_denied");
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert_eq!(body["error"]["policy_id"], "tiny-cap");
    assert_eq!(body["error"]["reason"], "tiny-cap: hourly budget exceeded");
    let id = body["error"]["request_id"].as_str().unwrap().to_owned();
    assert_eq!(headers["x-llmscope-request-id"], id.as_str());
    assert_eq!(
        s.upstream.calls(),
        0,
        "a denied request must not reach the upstream"
    );

    // The /infer body shape gets the host's /infer error JSON.
    let resp = reqwest::Client::new()
        .post(s.envoy.at("/infer"))
        .json(&json!({"prompt": "hello", "tenant_id": "acme", "budget_namespace": "demo", "model_tier": "expensive"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 402);
    let infer: Value = resp.json().await.unwrap();
    assert_eq!(infer["error"], "policy_denied");
    assert_eq!(infer["policy_id"], "tiny-cap");
    assert_eq!(
        infer["detail"],
        "Request denied by policy: tiny-cap: hourly budget exceeded"
    );
    assert_eq!(s.upstream.calls(), 0);

    let t = lines_for(&s.gw.telemetry, &id).await;
    assert_eq!(t.len(), 1);
    assert_eq!(t[0]["status"], "denied");
    assert_eq!(t[0]["cost_usd"], 0.0);
    assert_eq!(t[0]["policy_id"], "tiny-cap");
    let d = lines_for(&s.gw.decisions, &id).await;
    assert_eq!(d[0]["decision"], "deny");
    assert_eq!(d[0]["reason"], "tiny-cap: hourly budget exceeded");
    assert_eq!(d[0]["rules"][0]["applied"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn downgrade_sets_the_tier_header_and_rewrites_the_model() {
    let s = stack(vec![Filter::builtin(
        "route_preference",
        &prefer_cheap(),
        &host("closed", 2000),
    )])
    .await;
    let (status, _, body) = chat(&s.envoy, "acme", "gpt-4o").await;
    assert_eq!(status, 200, "{body}\n{}", s.envoy.log());
    assert_eq!(
        body["model"], "gpt-4o-mini",
        "the upstream answered for the cheap model"
    );
    let calls = seen(&s.upstream);
    let (_, headers, sent) = &calls[0];
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert_eq!(
        sent["messages"][0]["content"],
        "Summarize this document for the board"
    );
    assert!(
        headers.contains("x-llmscope-model-tier: cheap\n"),
        "{headers}"
    );
    let declared: usize = headers
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        declared,
        serde_json::to_vec(sent).unwrap().len(),
        "content-length matches the rewritten body"
    );
    let id = headers
        .lines()
        .find_map(|l| l.strip_prefix("x-llmscope-request-id: "))
        .unwrap()
        .to_owned();
    let t = lines_for(&s.gw.telemetry, &id).await;
    assert_eq!(t[0]["requested_model_tier"], "expensive");
    assert_eq!(t[0]["model_tier"], "cheap");
    assert_eq!(t[0]["model"], "gpt-4o-mini");
    // Priced at the model that answered: 42 × $0.15/M + 7 × $0.60/M.
    assert!(
        (t[0]["cost_usd"].as_f64().unwrap() - 0.0000105).abs() < 1e-12,
        "{}",
        t[0]
    );
    let d = lines_for(&s.gw.decisions, &id).await;
    assert_eq!(d[0]["decision"], "downgrade");
    assert_eq!(d[0]["policy_id"], "prefer-cheap");
    assert_eq!(d[0]["effective_model_tier"], "cheap");

    // A /infer body gets its model_tier rewritten.
    let resp = reqwest::Client::new()
        .post(s.envoy.at("/infer"))
        .json(&json!({"prompt": "hello", "tenant_id": "acme", "route_name": "/answer-routed", "model_tier": "expensive"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let calls = seen(&s.upstream);
    assert_eq!(calls[1].0, "/infer");
    assert_eq!(calls[1].2["model_tier"], "cheap");
    assert!(calls[1].1.contains("x-llmscope-model-tier: cheap\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn one_request_spends_at_most_what_the_cap_allows_and_the_next_is_denied() {
    // The estimate at gpt-4o (~15 tokens in, the route's 500 out) is about $0.005: the first
    // request fits under the cap, a second one on top of the first's spend does not.
    let cap = 0.008;
    let s = stack(vec![Filter::builtin(
        "budget_threshold",
        &budget("small-cap", cap),
        &host("closed", 2000),
    )])
    .await;
    // The upstream would write 100k output tokens ($1.00 at gpt-4o, 125 times the cap) if the
    // body let it; like a real provider it writes no more than `max_tokens`.
    *s.upstream.state.usage.lock().unwrap() = Some((1000, 100_000));
    s.upstream
        .state
        .honour_max_tokens
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, _, body) = chat(&s.envoy, "acme", "gpt-4o").await;
    assert_eq!(status, 200, "{body}\n{}", s.envoy.log());
    let (_, sent_headers, sent) = seen(&s.upstream)[0].clone();
    assert_eq!(
        sent["max_tokens"], 500,
        "the body goes out capped at the priced output: {sent}"
    );
    let id = request_id_of(&sent_headers);
    let t = lines_for(&s.gw.telemetry, &id).await;
    let d = lines_for(&s.gw.decisions, &id).await;
    let spent = t[0]["cost_usd"].as_f64().unwrap();
    let reservation = d[0]["estimated_cost_usd"].as_f64().unwrap();
    let before = d[0]["rules"][0]["facts"]["window_cost_usd"]
        .as_f64()
        .unwrap();
    // 1000 × $2.50/M + 500 × $10/M.
    assert!((spent - 0.0075).abs() < 1e-9, "{}", t[0]);
    assert!(
        spent <= (cap - before) + reservation + 1e-12,
        "one request spent ${spent}: more than the cap left (${}) plus its reservation (${reservation})",
        cap - before
    );

    let (status, _, body) = chat(&s.envoy, "acme", "gpt-4o").await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["error"]["policy_id"], "small-cap");
    assert_eq!(s.upstream.calls(), 1);
    let id = body["error"]["request_id"].as_str().unwrap().to_owned();
    let d = lines_for(&s.gw.decisions, &id).await;
    let window = d[0]["rules"][0]["facts"]["window_cost_usd"]
        .as_f64()
        .unwrap();
    assert!(
        window >= spent - 1e-9,
        "the budget saw the reported spend: {}",
        d[0]
    );
}

fn request_id_of(upstream_headers: &str) -> String {
    upstream_headers
        .lines()
        .find_map(|l| l.strip_prefix("x-llmscope-request-id: "))
        .unwrap_or_else(|| panic!("no request id in {upstream_headers}"))
        .to_owned()
}

/// POST `body` to `path` through `envoy` with the usual attribution headers plus `extra`.
async fn post(envoy: &Envoy, path: &str, extra: &[(&str, &str)], body: &Value) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(envoy.at(path))
        .header("x-llmscope-tenant-id", "acme")
        .header("x-llmscope-budget-namespace", "demo")
        .header("x-llmscope-route", "/answer-routed");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = req.json(body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn messages() -> Value {
    json!([{"role": "user", "content": "Summarize this document for the board"}])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spoofed_tier_header_is_priced_at_the_body_model() {
    let mut h = host("closed", 2000);
    h["attribution"] = json!("headers");
    let s = stack(vec![Filter::builtin(
        "budget_threshold",
        &budget("cap", 100.0),
        &h,
    )])
    .await;
    // The body asks the upstream for gpt-4o; the header claims the cheap tier.
    let (status, body) = post(
        &s.envoy,
        "/v1/chat/completions",
        &[("x-llmscope-model-tier", "cheap")],
        &json!({"model": "gpt-4o", "messages": messages()}),
    )
    .await;
    assert_eq!(status, 200, "{body}\n{}", s.envoy.log());
    let (_, sent_headers, sent) = seen(&s.upstream)[0].clone();
    assert_eq!(sent["model"], "gpt-4o");
    assert!(
        sent_headers.contains("x-llmscope-model-tier: expensive\n"),
        "the tier sent upstream is the body model's: {sent_headers}"
    );
    let id = request_id_of(&sent_headers);
    let t = lines_for(&s.gw.telemetry, &id).await;
    assert_eq!(t[0]["model"], "gpt-4o", "{}", t[0]);
    assert_eq!(t[0]["model_tier"], "expensive", "{}", t[0]);
    // Settled at gpt-4o rates: 42 × $2.50/M + 7 × $10/M.
    assert!(
        (t[0]["cost_usd"].as_f64().unwrap() - 0.000175).abs() < 1e-12,
        "{}",
        t[0]
    );
    let d = lines_for(&s.gw.decisions, &id).await;
    assert_eq!(d[0]["requested_model_tier"], "expensive", "{}", d[0]);
    // Priced (and checked against the cap) at gpt-4o: 500 output tokens at $10/M at least.
    assert!(
        d[0]["estimated_cost_usd"].as_f64().unwrap() >= 0.005,
        "{}",
        d[0]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_forwarded_body_is_capped_at_the_priced_output() {
    let s = stack(vec![Filter::builtin(
        "budget_threshold",
        &budget("cap", 100.0),
        &host("closed", 2000),
    )])
    .await;
    let cases = [
        // (body fields, field the upstream must see, value)
        (json!({"max_tokens": 100_000}), "max_tokens", 500),
        (
            json!({"max_completion_tokens": 4000}),
            "max_completion_tokens",
            500,
        ),
        // No cap at all: the route's (the priced output) is added.
        (json!({}), "max_tokens", 500),
        // Below the route's: priced and sent as asked.
        (json!({"max_tokens": 50}), "max_tokens", 50),
    ];
    for (i, (extra, field, want)) in cases.iter().enumerate() {
        let mut body = json!({"model": "gpt-4o", "messages": messages()});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, answer) = post(&s.envoy, "/v1/chat/completions", &[], &body).await;
        assert_eq!(status, 200, "{body}: {answer}\n{}", s.envoy.log());
        let (_, sent_headers, sent) = seen(&s.upstream)[i].clone();
        assert_eq!(sent[*field], *want, "sent for {body}: {sent}");
        if *field == "max_completion_tokens" {
            assert!(sent.get("max_tokens").is_none(), "{sent}");
        }
        let id = request_id_of(&sent_headers);
        let d = lines_for(&s.gw.decisions, &id).await;
        assert!(!d.is_empty());
    }
    // A /infer body (an llmscope gateway upstream) is capped the same way.
    let (status, _) = post(
        &s.envoy,
        "/infer",
        &[],
        &json!({"prompt": "hello", "model_tier": "expensive", "max_tokens": 9000}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(seen(&s.upstream)[4].2["max_tokens"], 500);
}

#[tokio::test(flavor = "multi_thread")]
async fn unpriced_requests_are_refused_before_the_upstream() {
    let s = stack(vec![Filter::builtin(
        "budget_threshold",
        &budget("cap", 100.0),
        &host("closed", 2000),
    )])
    .await;
    let with = |extra: Value| {
        let mut body = json!({"model": "gpt-4o", "messages": messages()});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let image = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]});
    let tools =
        with(json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}));
    for (body, param) in [
        (with(json!({"n": 3})), "n"),
        (image, "messages[0].content[1]"),
        (tools, "tools"),
    ] {
        let (status, answer) = post(&s.envoy, "/v1/chat/completions", &[], &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error", "{answer}");
        assert_eq!(answer["error"]["param"], param, "{answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("llmscope"),
            "{answer}"
        );
    }
    assert_eq!(
        s.upstream.calls(),
        0,
        "nothing unpriced reached the upstream"
    );
    // n = 1 is one choice: priced and served.
    let (status, answer) = post(
        &s.envoy,
        "/v1/chat/completions",
        &[],
        &with(json!({"n": 1})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(s.upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_is_sent_asking_for_its_usage() {
    let s = stack(vec![Filter::builtin(
        "budget_threshold",
        &budget("cap", 100.0),
        &host("closed", 2000),
    )])
    .await;
    let (status, answer) = post(
        &s.envoy,
        "/v1/chat/completions",
        &[],
        &json!({"model": "gpt-4o", "messages": messages(), "stream": true,
                "stream_options": {"include_usage": false}}),
    )
    .await;
    assert_eq!(status, 200, "{answer}\n{}", s.envoy.log());
    let (_, _, sent) = seen(&s.upstream)[0].clone();
    assert_eq!(sent["stream"], true);
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "a stream without its usage would settle at the estimate: {sent}"
    );
    assert_eq!(sent["max_tokens"], 500, "{sent}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_host_fails_closed_by_default_and_open_when_configured() {
    let upstream = Upstream::start().await;
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let closed = start_envoy(envoy::config(
        &[Filter::builtin(
            "budget_threshold",
            &budget("cap", 100.0),
            &host("closed", 500),
        )],
        dead_port,
        upstream.addr.port(),
    ))
    .await;
    let (status, _, body) = chat(&closed, "acme", "gpt-4o").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "policy_host_unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rule cap"),
        "{body}"
    );
    assert_eq!(upstream.calls(), 0);

    let open = start_envoy(envoy::config(
        &[Filter::builtin(
            "budget_threshold",
            &budget("cap", 100.0),
            &host("open", 500),
        )],
        dead_port,
        upstream.addr.port(),
    ))
    .await;
    let (status, _, body) = chat(&open, "acme", "gpt-4o").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(upstream.calls(), 1);
    assert!(
        open.log().contains("policy host unavailable"),
        "{}",
        open.log()
    );
}

/// A report used to be retried 8 times, 20 ms apart: a host restart of a fraction of a second
/// lost it, and with it a call the upstream billed. Now it backs off exponentially for as long
/// as the host holds reservations, and gives-ups are counted in Envoy's stats.
#[tokio::test(flavor = "multi_thread")]
async fn a_report_waits_out_a_host_restart() {
    let upstream = Upstream::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let envoy = start_envoy(envoy::config(
        &[Filter::builtin(
            "budget_threshold",
            &budget("cap", 100.0),
            &host("open", 500),
        )],
        port,
        upstream.addr.port(),
    ))
    .await;
    let (status, _, body) = chat(&envoy, "acme", "gpt-4o").await;
    assert_eq!(status, 200, "fails open while the host is down: {body}");
    // The host is down for 2 s: far longer than the old retries lasted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seed = std::fs::read_to_string(llmscope_tests::seed_config()).unwrap();
    let mut opts = Options::new(&seed);
    opts.extra_yaml = edge_auth();
    opts.config_template = Some(
        llmscope_tests::gateway::BASE_CONFIG.replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    );
    let gw = Gateway::start(&opts);
    let mut lines = Vec::new();
    for _ in 0..200 {
        lines = read_jsonl(&gw.telemetry);
        if !lines.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        lines.len(),
        1,
        "the report arrived once: {lines:?}\n{}",
        envoy.log()
    );
    assert_eq!(lines[0]["tenant_id"], "acme");
    assert_eq!(lines[0]["status"], "ok", "{}", lines[0]);
    assert!(lines[0]["cost_usd"].as_f64().unwrap() > 0.0, "{}", lines[0]);
    let stats = reqwest::get(format!(
        "{}/stats?filter=llmscope_reports_dropped",
        envoy.admin
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(stats.contains("llmscope_reports_dropped: 0"), "{stats}");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_host_hits_the_timeout_and_fails_closed() {
    let upstream = Upstream::start().await;
    // Accepts connections and never answers.
    let slow = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_port = slow.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = slow.accept().await {
            held.push(conn);
        }
    });
    let envoy = start_envoy(envoy::config(
        &[Filter::builtin(
            "budget_threshold",
            &budget("cap", 100.0),
            &host("closed", 150),
        )],
        slow_port,
        upstream.addr.port(),
    ))
    .await;
    let started = Instant::now();
    let (status, _, body) = chat(&envoy, "acme", "gpt-4o").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no answer within 150 ms"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded by the timeout"
    );
    assert_eq!(upstream.calls(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_plugin_configuration_is_rejected_with_the_field_named() {
    let upstream = Upstream::start().await;
    let bad = Filter::builtin(
        "budget_threshold",
        &json!({"id": "broken-cap", "primitive": "budget_threshold", "period": "hourly", "limit_usd": "lots"}),
        &host("closed", 200),
    );
    let config = envoy::config(&[bad], 1, upstream.addr.port());
    let result = tokio::task::spawn_blocking(move || Envoy::try_start(&config))
        .await
        .unwrap();
    let Err(failure) = result else {
        panic!("Envoy must refuse to start with a plugin whose settings are invalid");
    };
    assert!(
        failure.exited.is_some_and(|s| !s.success()),
        "Envoy exits with an error: {:?}",
        failure.exited
    );
    let log = failure.log;
    assert!(
        log.contains("broken-cap") && log.contains("rule.settings.limit_usd"),
        "the log names the rule and the field:\n{log}"
    );
    assert_eq!(upstream.calls(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_errors_are_answered_like_the_host_and_not_forwarded() {
    let s = stack(vec![Filter::builtin(
        "budget_threshold",
        &budget("cap", 100.0),
        &host("closed", 2000),
    )])
    .await;
    // No tenant anywhere.
    let resp = reqwest::Client::new()
        .post(s.envoy.at("/v1/chat/completions"))
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_tenant");
    // Not JSON.
    let resp = reqwest::Client::new()
        .post(s.envoy.at("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{body}"
    );
    assert_eq!(s.upstream.calls(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_example_config_chains_the_seed_namespace() {
    let seed = std::fs::read_to_string(llmscope_tests::seed_config()).unwrap();
    // As examples/llmscope.yaml: no keys, the edge endpoints opened for the local Envoy.
    let mut opts = Options::new(&seed);
    opts.extra_yaml = "auth: {unauthenticated_edge: true}\n".into();
    let gw = Gateway::start(&opts);
    let upstream = Upstream::start().await;
    let root = llmscope_tests::root();
    for p in ["budget_threshold", "route_preference", "cost_anomaly"] {
        envoy::filter_wasm(p);
    }
    let example = std::fs::read_to_string(root.join("examples/envoy/envoy.yaml"))
        .unwrap()
        .replace("port_value: 10000", "port_value: 0")
        .replace("port_value: 9901", "port_value: 0")
        .replace(
            "port_value: 8080",
            &format!("port_value: {}", port_of(&gw.url)),
        )
        .replace(
            "port_value: 9000",
            &format!("port_value: {}", upstream.addr.port()),
        )
        .replace(
            "filename: policies/",
            &format!("filename: {}/policies/", root.display()),
        )
        // The example's 200 ms host timeout is a production value; a loaded test machine must
        // not turn it into a flaky 503.
        .replace("\"timeout_ms\": 200", "\"timeout_ms\": 5000");
    let envoy = start_envoy(example).await;
    let resp = reqwest::Client::new()
        .post(envoy.at("/v1/chat/completions"))
        .header("x-llmscope-tenant-id", "acme-corp")
        .header("x-llmscope-budget-namespace", "demo")
        .header("x-llmscope-feature-id", "summarize")
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Summarize this document"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{}", envoy.log());
    let calls = seen(&upstream);
    let (_, headers, sent) = &calls[0];
    // demo-route-preference sends /answer-routed (the default route) to cheap.
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert!(
        headers.contains("x-llmscope-model-tier: cheap\n"),
        "{headers}"
    );
    let id = headers
        .lines()
        .find_map(|l| l.strip_prefix("x-llmscope-request-id: "))
        .unwrap()
        .to_owned();
    let d = lines_for(&gw.decisions, &id).await;
    let ids: Vec<&str> = d[0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "demo-hourly-cap",
            "demo-route-preference",
            "demo-cost-anomaly"
        ]
    );
    assert_eq!(d[0]["decision"], "downgrade");
    // The later filters priced the request at the tier the earlier one chose.
    assert_eq!(d[0]["rules"][2]["decision"], "allow");
    // Two host round trips, not three: route_preference declares no aggregates and evaluated on
    // the budget filter's answer (same tier); cost_anomaly asked again at the downgraded tier.
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("llmscope_edge_calls_total{endpoint=\"context\"} 2\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_only_attribution_ignores_tenants_named_in_the_body() {
    let mut h = host("closed", 2000);
    h["attribution"] = json!("headers");
    let s = stack(vec![Filter::builtin(
        "budget_threshold",
        &budget("cap", 100.0),
        &h,
    )])
    .await;
    let client = reqwest::Client::new();
    // The header names the tenant; the body's metadata tries to bill someone else.
    let resp = client
        .post(s.envoy.at("/v1/chat/completions"))
        .header("x-llmscope-tenant-id", "acme")
        .json(
            &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                      "metadata": {"tenant_id": "victim", "budget_namespace": "demo"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let id = seen(&s.upstream)[0]
        .1
        .lines()
        .find_map(|l| l.strip_prefix("x-llmscope-request-id: "))
        .unwrap()
        .to_owned();
    let t = lines_for(&s.gw.telemetry, &id).await;
    assert_eq!(t[0]["tenant_id"], "acme");
    assert_eq!(
        t[0]["budget_namespace"], "default",
        "the body's namespace was ignored too"
    );
    // Without the header there is no tenant, whatever the body says.
    for body in [
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "metadata": {"tenant_id": "victim"}}),
        json!({"prompt": "hi", "tenant_id": "victim"}),
    ] {
        let path = if body.get("prompt").is_some() {
            "/infer"
        } else {
            "/v1/chat/completions"
        };
        let resp = client
            .post(s.envoy.at(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 422, "{body}");
    }
    assert_eq!(s.upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_through_envoy_is_forwarded_as_it_comes_and_settled_on_its_streamed_usage() {
    let seed = std::fs::read_to_string(llmscope_tests::seed_config()).unwrap();
    let mut opts = Options::new(&seed);
    opts.extra_yaml = edge_auth();
    let gw = Gateway::start(&opts);
    let upstream = MockUpstream::start(&["--stream-chunks", "6", "--chunk-delay-ms", "100"]);
    let filters = vec![Filter::builtin(
        "budget_threshold",
        &budget("cap", 100.0),
        &host("closed", 2000),
    )];
    let envoy = start_envoy(envoy::config(&filters, port_of(&gw.url), upstream.port())).await;
    let resp = reqwest::Client::new()
        .post(envoy.at("/v1/chat/completions"))
        .header("x-llmscope-tenant-id", "acme")
        .header("x-llmscope-budget-namespace", "demo")
        .header("x-llmscope-route", "/answer-routed")
        .json(&json!({"model": "gpt-4o", "messages": messages(), "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", envoy.log());
    let mut events = Events::new(resp);
    let role = events.next_json().await.unwrap();
    assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
    let first = events.next_json().await.unwrap();
    assert_eq!(first["choices"][0]["delta"]["content"], "[mock");
    // Envoy forwards the stream as it comes: the upstream still has words to send.
    assert_eq!(upstream.stats().await["streams_completed"], 0);
    let rest = events.rest().await;
    assert_eq!(rest.last().unwrap(), "[DONE]");
    // The filter asked for the usage, so it is in the stream.
    let usage = rest
        .iter()
        .find(|e| e["usage"].is_object())
        .unwrap_or_else(|| panic!("no usage chunk: {rest:?}"))["usage"]
        .clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut lines = read_jsonl(&gw.telemetry);
    while lines.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        lines = read_jsonl(&gw.telemetry);
    }
    assert_eq!(lines.len(), 1, "{lines:?}\n{}", envoy.log());
    let t = &lines[0];
    assert_eq!(t["status"], "ok");
    assert_eq!(t["cost_source"], "provider_usage", "{t}");
    assert_eq!(t["tokens_out"], usage["completion_tokens"], "{t}");
    assert_eq!(t["tokens_in"], usage["prompt_tokens"], "{t}");
    assert_eq!(t["tokens_out"], 120);
    assert_eq!(t["finish_reason"], "stop");
    let cost = 2.5 * usage["prompt_tokens"].as_f64().unwrap() / 1e6 + 10.0 * 120.0 / 1e6;
    assert!(
        (t["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-12,
        "{t}"
    );
}
