//! The whole chat-completions surface through the real binary: every parameter the gateway
//! does not read is forwarded as it was sent (and priced where it changes the bill) or
//! refused with 422 naming it — tools and tool calls, `response_format`, `n`, sampling
//! parameters, image parts — against a real `llmscope mock-upstream` speaking OpenAI's and
//! Anthropic's wire formats.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "integration tests: a failed unwrap or panic is a failed test"
)]

use std::time::{Duration, Instant};

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
routes:
  /answer-routed: {max_output_tokens: 300, tiers: {cheap: oa-small, expensive: claude-local}}
providers:
  upstream-openai: {kind: openai, base_url: "http://{upstream}/v1", timeout_ms: 5000, max_retries: 0}
  upstream-anthropic: {kind: anthropic, base_url: "http://{upstream}", api_key_env: TEST_ANTHROPIC_KEY, timeout_ms: 5000, max_retries: 0}
"#;

fn start(upstream: &MockUpstream) -> Gateway {
    let mut opts = Options::new("version: \"1\"\nnamespaces:\n  default:\n    rules: []\n");
    opts.config_template = Some(CONFIG.replace("{upstream}", &upstream.addr));
    opts.env = vec![("TEST_ANTHROPIC_KEY".into(), "sk-ant-test".into())];
    Gateway::start(&opts)
}

async fn post(gw: &Gateway, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.at("/v1/chat/completions"))
        .header("x-llmscope-tenant-id", "acme")
        .json(body)
        .send()
        .await
        .unwrap()
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

fn tools() -> Value {
    json!([{"type": "function", "function": {"name": "lookup", "description": "Look a word up",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}}])
}

/// A conversation with a tool call and its result, and an image part.
fn history() -> Value {
    json!([
        {"role": "system", "content": "Answer with the tool."},
        {"role": "user", "content": [{"type": "text", "text": "What does this say?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/sign.png", "detail": "low"}}]},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "lookup", "arguments": "{\"word\":\"hello\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a greeting"}
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn an_openai_compatible_provider_gets_every_parameter_as_sent_and_the_bill_counts_them() {
    let upstream = MockUpstream::start(&[]);
    let gw = start(&upstream);
    let body = json!({"model": "cheap", "messages": history(), "tools": tools(),
        "tool_choice": "auto", "parallel_tool_calls": false, "seed": 7, "stop": ["\n\n"],
        "top_p": 0.9, "frequency_penalty": 0.1, "n": 2, "max_completion_tokens": 50});
    let resp = post(&gw, &body).await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    let choices = answer["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{answer}");
    for c in choices {
        assert_eq!(c["finish_reason"], "tool_calls", "{answer}");
        assert_eq!(c["message"]["tool_calls"][0]["function"]["name"], "lookup");
    }
    assert_eq!(
        answer["usage"]["completion_tokens"], 100,
        "two choices of 50"
    );

    // The upstream saw the body as the client wrote it, the cap under the client's name.
    let seen = upstream.stats().await["last_request"].clone();
    for key in [
        "messages",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "seed",
        "stop",
        "top_p",
        "frequency_penalty",
        "n",
        "max_completion_tokens",
    ] {
        assert_eq!(seen[key], body[key], "{key} forwarded as sent: {seen}");
    }
    assert!(seen.get("max_tokens").is_none(), "{seen}");

    // Priced before dispatch: two choices of 50 tokens, the image (85, low detail) and the
    // tool definitions as input. The same request without them reserves less by at least
    // that much.
    let plain = json!({"model": "cheap", "max_completion_tokens": 50, "messages": [
        {"role": "system", "content": "Answer with the tool."},
        {"role": "user", "content": "What does this say?"}]});
    assert_eq!(post(&gw, &plain).await.status(), 200);
    let t = telemetry(&gw, 2).await;
    let (rich, lean) = (&t[0], &t[1]);
    let (rich_est, lean_est) = (
        rich["estimated_cost_usd"].as_f64().unwrap(),
        lean["estimated_cost_usd"].as_f64().unwrap(),
    );
    // input 1.0 USD / 1M, output 2.0 USD / 1M.
    let at_least = (85.0 + 10.0) * 1.0 / 1e6 + 50.0 * 2.0 / 1e6;
    assert!(
        rich_est - lean_est >= at_least,
        "n=2, an image and tools reserve more: {rich_est} vs {lean_est}"
    );
    assert_eq!(rich["tokens_out"], 100);
    assert_eq!(rich["cost_source"], "provider_usage");
    assert_eq!(rich["finish_reason"], "tool_calls");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_answers_and_streamed_tool_calls_reach_the_client() {
    let upstream = MockUpstream::start(&[]);
    let gw = start(&upstream);
    let body = json!({"model": "cheap", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_object"}});
    let answer: Value = post(&gw, &body).await.json().await.unwrap();
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    let parsed: Value = serde_json::from_str(content).unwrap();
    assert!(parsed["answer"].is_string(), "{content}");
    assert_eq!(
        upstream.stats().await["last_request"]["response_format"],
        body["response_format"]
    );
    // A schema's keys reach the provider in the client's order (structured outputs answer in
    // the order of `properties`).
    let schema = json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object",
        "properties": {"reasoning": {"type": "string"}, "answer": {"type": "string"}}}}});
    let ordered = json!({"model": "cheap", "messages": [{"role": "user", "content": "hi"}],
        "response_format": schema});
    let resp = reqwest::Client::new()
        .post(gw.at("/v1/chat/completions"))
        .header("x-llmscope-tenant-id", "acme")
        .header("content-type", "application/json")
        .body(ordered.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sent = upstream.stats().await["last_request"]["response_format"].to_string();
    assert!(
        sent.find("reasoning").unwrap() < sent.find("answer").unwrap(),
        "key order kept: {sent}"
    );

    let body = json!({"model": "cheap", "stream": true, "tools": tools(),
        "messages": [{"role": "user", "content": "look hello up"}],
        "stream_options": {"include_usage": true}});
    let resp = post(&gw, &body).await;
    assert_eq!(resp.status(), 200);
    let events = Events::new(resp).rest().await;
    let calls: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(calls[0]["function"]["name"], "lookup", "{events:?}");
    let args: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(args, "{}");
    assert!(
        events
            .iter()
            .any(|e| e["choices"][0]["finish_reason"] == "tool_calls"),
        "{events:?}"
    );
    let t = &telemetry(&gw, 3).await[2];
    assert_eq!(
        (t["streamed"].as_bool(), t["finish_reason"].as_str()),
        (Some(true), Some("tool_calls"))
    );
    assert_eq!(t["cost_source"], "provider_usage");
}

#[tokio::test(flavor = "multi_thread")]
async fn anthropic_gets_the_translation_and_what_it_cannot_honour_is_refused_by_name() {
    let upstream = MockUpstream::start(&[]);
    let gw = start(&upstream);
    let body = json!({"model": "expensive", "messages": history(), "tools": tools(),
        "tool_choice": "required", "stop": "END", "top_p": 0.5});
    let resp = post(&gw, &body).await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(
        (
            call["function"]["name"].as_str(),
            call["function"]["arguments"].as_str()
        ),
        (Some("lookup"), Some("{}"))
    );
    let seen = upstream.stats().await["last_request"].clone();
    assert_eq!(seen["system"], "Answer with the tool.");
    assert_eq!(
        seen["tools"],
        json!([{"name": "lookup", "description": "Look a word up",
            "input_schema": {"type": "object", "properties": {"word": {"type": "string"}}}}])
    );
    assert_eq!(seen["tool_choice"], json!({"type": "any"}));
    assert_eq!(
        (seen["stop_sequences"].clone(), seen["top_p"].clone()),
        (json!(["END"]), json!(0.5))
    );
    let turns = seen["messages"].as_array().unwrap();
    assert_eq!(turns.len(), 3, "{seen}");
    assert_eq!(
        turns[0]["content"][1]["source"],
        json!({"type": "url", "url": "https://example.com/sign.png"})
    );
    assert_eq!(
        turns[1]["content"][0],
        json!({"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"word": "hello"}})
    );
    assert_eq!(turns[2]["content"][0]["type"], "tool_result");

    // Streamed: the tool_use block arrives as tool-call chunks.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = Events::new(post(&gw, &streamed).await).rest().await;
    let name = events
        .iter()
        .find_map(|e| e["choices"][0]["delta"]["tool_calls"][0]["function"]["name"].as_str());
    assert_eq!(name, Some("lookup"), "{events:?}");

    // What the Messages API has no equivalent for: 422 naming the parameter and the
    // provider, and the upstream never called.
    let served = upstream.stats().await["served"].as_u64();
    for (param, value) in [
        ("n", json!(2)),
        ("seed", json!(1)),
        ("response_format", json!({"type": "json_object"})),
    ] {
        let mut refused =
            json!({"model": "expensive", "messages": [{"role": "user", "content": "x"}]});
        refused[param] = value;
        let resp = post(&gw, &refused).await;
        assert_eq!(resp.status(), 422, "{param}");
        let e: Value = resp.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{e}");
        assert_eq!(e["error"]["code"], "unsupported_parameter");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("upstream-anthropic"),
            "{e}"
        );
    }
    assert_eq!(upstream.stats().await["served"].as_u64(), served);
    assert_eq!(telemetry(&gw, 2).await.len(), 2, "refusals are not calls");
}
