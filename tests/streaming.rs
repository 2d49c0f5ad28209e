//! Streamed chat completions (`stream: true`) through the real binary: server-sent events read
//! as they arrive from a real `llmscope mock-upstream` (OpenAI and Anthropic dialects) and from
//! the built-in mock provider; settlement on the provider's usage or the BPE count; the cut at
//! the reserved output; a client that leaves mid-stream; a stream that breaks; a denial before
//! any byte; fallback before the first byte.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "integration tests: a failed unwrap or panic is a failed test"
)]

use std::time::{Duration, Instant};

use llmscope::pricing::Tokenizer;
use llmscope_tests::gateway::{read_jsonl, Gateway, Options};
use llmscope_tests::streaming::{Events, MockUpstream};
use serde_json::{json, Value};

const CONFIG: &str = r#"
server: {listen: "127.0.0.1:0", max_body_bytes: 65536}
artifacts: {telemetry_path: "{telemetry}", decisions_path: "{decisions}"}
policy: {file: "{policy_file}", policies_dir: "{policies_dir}"}
models:
  oa-small: {provider: upstream-openai, provider_model: small-v1, input_per_1m: 1.0, output_per_1m: 2.0}
  claude-local: {provider: upstream-anthropic, provider_model: claude-test, input_per_1m: 3.0, output_per_1m: 15.0}
  mock-failing: {provider: mock, input_per_1m: 1.0, output_per_1m: 2.0, fallback: [mock-small]}
  mock-small: {provider: mock, input_per_1m: 1.0, output_per_1m: 2.0}
routes:
  /answer-routed: {max_output_tokens: 300, tiers: {cheap: oa-small, expensive: claude-local}}
  /mock: {max_output_tokens: 300, tiers: {cheap: mock-failing}}
providers:
  upstream-openai: {kind: openai, base_url: "http://{upstream}/v1", timeout_ms: 5000, max_retries: 0}
  upstream-anthropic: {kind: anthropic, base_url: "http://{upstream}", api_key_env: TEST_ANTHROPIC_KEY, timeout_ms: 5000, max_retries: 0}
  mock: {kind: mock, stream_chunks: 6, stream_chunk_delay_ms: 100, fail_models: [mock-failing]}
"#;

const POLICY: &str = "version: \"1\"\nnamespaces:\n  default:\n    rules: []\n  tight:\n    rules:\n      - {id: tight-cap, primitive: budget_threshold, period: hourly, limit_usd: 0.000001, deny_reason: \"Tight budget exceeded\"}\n";

fn start(upstream: &MockUpstream) -> Gateway {
    let mut opts = Options::new(POLICY);
    opts.config_template = Some(CONFIG.replace("{upstream}", &upstream.addr));
    opts.env = vec![("TEST_ANTHROPIC_KEY".into(), "sk-ant-test".into())];
    Gateway::start(&opts)
}

/// POST a streamed chat body (tenant `acme`, extra headers `headers`).
async fn stream(gw: &Gateway, body: Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(gw.at("/v1/chat/completions"))
        .header("x-llmscope-tenant-id", "acme");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.json(&body).send().await.unwrap()
}

fn chat(model: &str, extra: Value) -> Value {
    let mut body = json!({"model": model, "stream": true,
                          "messages": [{"role": "user", "content": "Say hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The text of every content chunk.
fn text_of(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// The telemetry lines, once `n` are there (at most 10 s).
async fn telemetry(gw: &Gateway, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = read_jsonl(&gw.telemetry);
        if lines.len() >= n || Instant::now() >= deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_openai_stream_arrives_chunk_by_chunk_and_settles_on_the_providers_usage() {
    let upstream = MockUpstream::start(&["--stream-chunks", "6", "--chunk-delay-ms", "150"]);
    let gw = start(&upstream);
    let resp = stream(&gw, chat("cheap", json!({})), &[]).await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(h["x-llmscope-policy-decision"], "allow");
    assert_eq!(h["x-llmscope-model-tier"], "cheap");
    let request_id = h["x-llmscope-request-id"].to_str().unwrap().to_owned();
    assert!(
        h.get("x-llmscope-cost-usd").is_none(),
        "cost is known only at the end"
    );
    let mut events = Events::new(resp);
    let role = events.next_json().await.unwrap();
    assert_eq!(role["object"], "chat.completion.chunk");
    assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
    let first = events.next_json().await.unwrap();
    assert_eq!(first["choices"][0]["delta"]["content"], "[mock");
    // The first words are here while the upstream still has five chunks to send: nothing
    // is settled yet, so the stream was not buffered.
    assert!(
        read_jsonl(&gw.telemetry).is_empty(),
        "settled before the end"
    );
    let rest = events.rest().await;
    assert_eq!(
        format!("[mock{}", text_of(&rest)),
        "[mock small-v1] answer to: Say hi"
    );
    let n = rest.len();
    assert_eq!(rest[n - 1], "[DONE]");
    assert_eq!(rest[n - 2]["choices"][0]["finish_reason"], "stop");
    assert!(
        rest.iter()
            .all(|e| e.get("usage").is_none_or(Value::is_null)),
        "the usage chunk is stripped for a client that did not ask: {rest:?}"
    );
    let t = telemetry(&gw, 1).await;
    assert_eq!(t.len(), 1);
    let t = &t[0];
    assert_eq!(t["request_id"], request_id.as_str());
    assert_eq!(
        (t["status"].as_str(), t["cost_source"].as_str()),
        (Some("ok"), Some("provider_usage"))
    );
    assert_eq!(t["streamed"], true);
    assert!(t.get("stream_cut_at_tokens").is_none());
    // The upstream reports min(max_tokens, 120) output tokens: only in the usage chunk the
    // gateway asked for (the BPE count of the text is a handful).
    assert_eq!(t["tokens_out"], 120);
    let tokens_in = t["tokens_in"].as_f64().unwrap();
    let cost = t["cost_usd"].as_f64().unwrap();
    assert!(
        (cost - (tokens_in * 1.0 + 120.0 * 2.0) / 1e6).abs() < 1e-12,
        "{t}"
    );
    assert_eq!(
        upstream
            .wait_stat("streams_completed", 1, Duration::from_secs(5))
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_asking_for_usage_gets_the_billed_usage_and_cost_in_the_last_chunk() {
    let upstream = MockUpstream::start(&["--stream-chunks", "3"]);
    let gw = start(&upstream);
    let resp = stream(
        &gw,
        chat("cheap", json!({"stream_options": {"include_usage": true}})),
        &[],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let events = Events::new(resp).rest().await;
    let n = events.len();
    assert_eq!(events[n - 1], "[DONE]");
    let usage = &events[n - 2];
    assert_eq!(usage["choices"], json!([]));
    let t = &telemetry(&gw, 1).await[0];
    assert_eq!(usage["usage"]["completion_tokens"], t["tokens_out"]);
    assert_eq!(usage["usage"]["prompt_tokens"], t["tokens_in"]);
    assert_eq!(usage["usage"]["cost_usd"], t["cost_usd"]);
    assert_eq!(events[n - 3]["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn anthropic_events_are_translated_to_openai_chunks_and_settled_on_usage() {
    let upstream = MockUpstream::start(&["--stream-chunks", "6"]);
    let gw = start(&upstream);
    let resp = stream(
        &gw,
        chat(
            "expensive",
            json!({"stream_options": {"include_usage": true}}),
        ),
        &[],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-llmscope-model-tier"], "expensive");
    let events = Events::new(resp).rest().await;
    assert_eq!(text_of(&events), "[mock claude-test] answer to: Say hi");
    let n = events.len();
    assert_eq!(events[n - 3]["choices"][0]["finish_reason"], "stop");
    assert_eq!(events[n - 2]["usage"]["completion_tokens"], 120);
    let t = &telemetry(&gw, 1).await[0];
    assert_eq!(
        (t["provider"].as_str(), t["model"].as_str()),
        (Some("upstream-anthropic"), Some("claude-local"))
    );
    assert_eq!(t["cost_source"], "provider_usage");
    assert_eq!(t["tokens_out"], 120);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_without_usage_is_billed_at_the_bpe_count_of_its_text() {
    let upstream = MockUpstream::start(&["--stream-chunks", "6", "--no-stream-usage"]);
    let gw = start(&upstream);
    for (i, model) in ["cheap", "expensive"].into_iter().enumerate() {
        let resp = stream(&gw, chat(model, json!({})), &[]).await;
        assert_eq!(resp.status(), 200);
        let events = Events::new(resp).rest().await;
        let text = text_of(&events);
        assert!(text.ends_with("answer to: Say hi"), "{text}");
        let lines = telemetry(&gw, i + 1).await;
        let t = &lines[i];
        assert_eq!(t["status"], "ok");
        assert_eq!(t["cost_source"], "tokenizer", "{t}");
        assert_eq!(
            t["tokens_out"].as_u64().unwrap(),
            u64::from(Tokenizer::Cl100kBase.count(&text)),
            "{t}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_streaming_past_max_tokens_is_cut_at_the_reservation() {
    // 20 ms apart, so the upstream is still streaming when the gateway cuts.
    let upstream = MockUpstream::start(&[
        "--stream-chunks",
        "40",
        "--chunk-delay-ms",
        "20",
        "--ignore-max-tokens",
    ]);
    let gw = start(&upstream);
    let resp = stream(&gw, chat("cheap", json!({"max_tokens": 5})), &[]).await;
    assert_eq!(resp.status(), 200);
    let events = Events::new(resp).rest().await;
    let text = text_of(&events);
    assert!(Tokenizer::Cl100kBase.count(&text) <= 5, "{text:?}");
    let full = format!("[mock small-v1] answer to: Say hi{}", " more".repeat(34));
    assert!(!text.is_empty() && full.starts_with(&text), "{text:?}");
    let n = events.len();
    assert_eq!(events[n - 1], "[DONE]");
    assert_eq!(events[n - 2]["choices"][0]["finish_reason"], "length");
    let t = &telemetry(&gw, 1).await[0];
    assert_eq!(t["stream_cut_at_tokens"], 5, "{t}");
    assert_eq!(t["finish_reason"], "length");
    // Billed at what the upstream generated, not only what was forwarded: at least the cap
    // (it went on past it), and the whole delta that crossed it (a word or two more).
    let billed = t["tokens_out"].as_u64().unwrap();
    assert!((5..=8).contains(&billed), "{t}");
    let d = &read_jsonl(&gw.decisions)[0];
    assert_eq!(d["reservation"]["tokens_out"], 5);
    // The gateway closed the upstream's stream at the cut.
    assert_eq!(
        upstream
            .wait_stat("streams_aborted", 1, Duration::from_secs(5))
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_mid_stream_is_settled_as_cancelled_exactly_once() {
    let upstream = MockUpstream::start(&["--stream-chunks", "30", "--chunk-delay-ms", "100"]);
    let gw = start(&upstream);
    let resp = stream(
        &gw,
        chat("cheap", json!({"stream_options": {"include_usage": true}})),
        &[],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut events = Events::new(resp);
    let mut received = Vec::new();
    while received.len() < 4 {
        received.push(events.next_json().await.unwrap());
    }
    assert_eq!(text_of(&received), "[mock small-v1] answer");
    drop(events);
    let lines = telemetry(&gw, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let t = &lines[0];
    assert_eq!(t["status"], "cancelled", "{t}");
    assert_eq!(t["cost_source"], "tokenizer", "no usage arrived: {t}");
    assert!(t["tokens_out"].as_u64().unwrap() >= 1, "{t}");
    assert!(t["cost_usd"].as_f64().unwrap() > 0.0, "{t}");
    // The upstream's stream was closed, long before its 30 chunks.
    assert_eq!(
        upstream
            .wait_stat("streams_aborted", 1, Duration::from_secs(5))
            .await,
        1
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read_jsonl(&gw.telemetry).len(), 1, "one line, not two");
    assert_eq!(read_jsonl(&gw.decisions).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_breaks_mid_way_is_settled_at_what_was_generated() {
    let upstream = MockUpstream::start(&["--stream-chunks", "6", "--stream-break-after", "2"]);
    let gw = start(&upstream);
    let resp = stream(&gw, chat("cheap", json!({})), &[]).await;
    assert_eq!(resp.status(), 200);
    let events = Events::new(resp).rest().await;
    assert_eq!(text_of(&events), "[mock small-v1]");
    let last = events.last().unwrap();
    assert_eq!(last["error"]["code"], "stream_broken", "{events:?}");
    let t = &telemetry(&gw, 1).await[0];
    assert_eq!(t["status"], "error", "{t}");
    assert_eq!(t["error_type"], "stream_connection", "{t}");
    assert!(t["cost_usd"].as_f64().unwrap() > 0.0, "{t}");
    assert!(
        !t["is_fallback"].as_bool().unwrap(),
        "no fallback after the first byte"
    );
    assert_eq!(upstream.stats().await["served"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_stream_is_a_402_before_any_byte_and_never_reaches_the_provider() {
    let upstream = MockUpstream::start(&[]);
    let gw = start(&upstream);
    let resp = stream(
        &gw,
        chat("cheap", json!({})),
        &[("x-llmscope-budget-namespace", "tight")],
    )
    .await;
    assert_eq!(resp.status(), 402);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "policy_denied");
    assert_eq!(upstream.stats().await["served"], 0);
    assert_eq!(read_jsonl(&gw.telemetry)[0]["status"], "denied");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mock_provider_streams_its_chunks_after_falling_back_before_the_first_byte() {
    let upstream = MockUpstream::start(&[]);
    let gw = start(&upstream);
    let resp = stream(
        &gw,
        chat("cheap", json!({})),
        &[("x-llmscope-route", "/mock")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut events = Events::new(resp);
    events.next_json().await.unwrap();
    let first = events.next_json().await.unwrap();
    assert!(first["choices"][0]["delta"]["content"].is_string());
    assert!(
        read_jsonl(&gw.telemetry).is_empty(),
        "five chunks 100 ms apart are still to come"
    );
    let rest = events.rest().await;
    let content = rest
        .iter()
        .filter(|e| e["choices"][0]["delta"]["content"].is_string())
        .count();
    assert_eq!(content + 1, 6, "the mock's configured chunk count");
    assert_eq!(rest.last().unwrap(), "[DONE]");
    let t = &telemetry(&gw, 1).await[0];
    assert_eq!(t["model"], "mock-small");
    assert_eq!(t["is_fallback"], true);
    assert_eq!(t["status"], "ok");
    assert_eq!(t["streamed"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_parameters_must_be_booleans() {
    let upstream = MockUpstream::start(&[]);
    let gw = start(&upstream);
    for (body, param) in [
        (json!({"stream": "yes"}), "stream"),
        (
            json!({"stream": true, "stream_options": {"include_usage": "no"}}),
            "stream_options.include_usage",
        ),
        (
            json!({"stream": false, "stream_options": {"include_usage": true}}),
            "stream_options",
        ),
    ] {
        let resp = stream(&gw, chat("cheap", body), &[]).await;
        assert_eq!(resp.status(), 422);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    assert!(read_jsonl(&gw.telemetry).is_empty());
}
