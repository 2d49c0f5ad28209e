//! The real provider clients against a local server speaking their wire formats (not a mocked
//! client), and the official `openai` Python package as a client of the gateway.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "integration tests: a failed unwrap or panic is a failed test"
)]

use llmscope_tests::gateway::{read_jsonl, Gateway, Options};
use llmscope_tests::upstream::Upstream;
use serde_json::{json, Value};

const CONFIG: &str = r#"
server: {listen: "127.0.0.1:0", max_body_bytes: 65536}
artifacts: {telemetry_path: "{telemetry}", decisions_path: "{decisions}"}
policy: {file: "{policy_file}", policies_dir: "{policies_dir}"}
models:
  local-small: {provider: local-openai, provider_model: small-v1, input_per_1m: 1.0, output_per_1m: 2.0}
  claude-local: {provider: local-anthropic, provider_model: claude-test, input_per_1m: 3.0, output_per_1m: 15.0}
routes:
  /answer-routed: {max_output_tokens: 300, tiers: {cheap: local-small, expensive: claude-local}}
providers:
  local-openai: {kind: openai, base_url: "http://{upstream}/v1", api_key_env: TEST_OPENAI_KEY, timeout_ms: 5000, max_retries: 2}
  local-anthropic: {kind: anthropic, base_url: "http://{upstream}", api_key_env: TEST_ANTHROPIC_KEY, timeout_ms: 5000, max_retries: 0}
"#;

fn start(upstream: &Upstream) -> Gateway {
    let mut opts = Options::new(
        "version: \"1\"\nnamespaces:\n  default:\n    rules: []\n  tight:\n    rules:\n      - {id: tight-cap, primitive: budget_threshold, period: hourly, limit_usd: 0.000001, deny_reason: \"Tight budget exceeded\"}\n",
    );
    opts.config_template = Some(CONFIG.replace("{upstream}", &upstream.addr.to_string()));
    opts.env = vec![
        ("TEST_OPENAI_KEY".into(), "sk-test-openai".into()),
        ("TEST_ANTHROPIC_KEY".into(), "sk-ant-test".into()),
    ];
    Gateway::start(&opts)
}

async fn infer(gw: &Gateway, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(gw.at("/infer"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_compatible_client_speaks_the_wire_format_and_settles_on_usage() {
    let upstream = Upstream::start().await;
    let mut gw = start(&upstream);
    let (s, b) = infer(&gw, json!({"prompt": "What is 2+2?", "tenant_id": "acme"})).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["answer"], "openai-compatible answer from small-v1");
    assert_eq!(
        (b["tokens_in"].as_u64(), b["tokens_out"].as_u64()),
        (Some(42), Some(7))
    );
    assert_eq!(upstream.calls(), 1);
    {
        let seen = upstream.state.seen.lock().unwrap();
        let (path, headers, body) = &seen[0];
        assert_eq!(path, "/v1/chat/completions");
        assert!(
            headers.contains("authorization: Bearer sk-test-openai"),
            "{headers}"
        );
        assert_eq!(body["model"], "small-v1");
        assert_eq!(body["max_tokens"], 300);
        assert_eq!(
            body["messages"],
            json!([{"role": "user", "content": "What is 2+2?"}])
        );
    }
    gw.stop();
    let t = &read_jsonl(&gw.telemetry)[0];
    assert_eq!(
        (
            t["provider"].as_str(),
            t["model"].as_str(),
            t["cost_source"].as_str()
        ),
        (
            Some("local-openai"),
            Some("local-small"),
            Some("provider_usage")
        )
    );
    assert!((t["cost_usd"].as_f64().unwrap() - (42.0 * 1.0 + 7.0 * 2.0) / 1e6).abs() < 1e-12);
}

#[tokio::test(flavor = "multi_thread")]
async fn anthropic_client_speaks_the_messages_api() {
    let upstream = Upstream::start().await;
    let gw = start(&upstream);
    let (s, b) = infer(
        &gw,
        json!({"prompt": "Hello Claude", "tenant_id": "acme", "model_tier": "expensive"}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["answer"], "anthropic answer from claude-test");
    assert_eq!(
        (b["tokens_in"].as_u64(), b["tokens_out"].as_u64()),
        (Some(31), Some(9))
    );
    let seen = upstream.state.seen.lock().unwrap();
    let (path, headers, body) = &seen[0];
    assert_eq!(path, "/v1/messages");
    assert!(headers.contains("x-api-key: sk-ant-test"), "{headers}");
    assert!(
        headers.contains("anthropic-version: 2023-06-01"),
        "{headers}"
    );
    assert_eq!(body["model"], "claude-test");
    assert_eq!(body["max_tokens"], 300);
}

#[tokio::test(flavor = "multi_thread")]
async fn retryable_failures_are_retried_and_denials_never_reach_the_provider() {
    let upstream = Upstream::start().await;
    let gw = start(&upstream);
    upstream
        .state
        .fail_next
        .store(2, std::sync::atomic::Ordering::SeqCst);
    let (s, b) = infer(&gw, json!({"prompt": "retry me", "tenant_id": "acme"})).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(upstream.calls(), 3, "two 503s, then success");

    let before = upstream.calls();
    let (s, b) = infer(
        &gw,
        json!({"prompt": "deny me", "tenant_id": "acme", "budget_namespace": "tight"}),
    )
    .await;
    assert_eq!(s, 402, "{b}");
    assert_eq!(
        upstream.calls(),
        before,
        "a denied request never calls the provider"
    );

    // Anthropic is configured with no retries: one 503 fails the request (no fallback set).
    upstream
        .state
        .fail_next
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let (s, _) = infer(
        &gw,
        json!({"prompt": "x", "tenant_id": "acme", "model_tier": "expensive"}),
    )
    .await;
    assert_eq!(s, 502);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_openai_python_client_works_against_the_gateway() {
    let mut opts = Options::new(
        "version: \"1\"\nnamespaces:\n  default:\n    rules: []\n  tight:\n    rules:\n      - {id: tight-cap, primitive: budget_threshold, period: hourly, limit_usd: 0.000001, deny_reason: \"Tight budget exceeded\"}\n",
    );
    opts.policies_dir = llmscope_tests::policies_dir();
    let gw = Gateway::start(&opts);
    let script = llmscope_tests::root().join("tests/clients/openai_client.py");
    let base = gw.at("/v1");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(&script)
            .arg(base)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "openai client failed (pip install openai):\n{stdout}\n{stderr}"
    );
    assert_eq!(stdout.trim(), "OK");
    let t = read_jsonl(&gw.telemetry);
    assert_eq!(
        t.len(),
        11,
        "two served, one denied, three with tools or JSON mode, three streamed, two embeddings"
    );
    assert_eq!(t[0]["feature_id"], "chat");
    assert_eq!(t[2]["status"], "denied");
    assert_eq!(
        (t[3]["tokens_out"].as_u64(), t[3]["finish_reason"].as_str()),
        (Some(60), Some("tool_calls")),
        "two choices of 30 tokens"
    );
    let streamed: Vec<bool> = t[6..9]
        .iter()
        .map(|l| l["streamed"].as_bool() == Some(true))
        .collect();
    assert_eq!(streamed, [true, true, true]);
    assert_eq!(t[7]["tokens_out"], 40);
    assert_eq!(
        (t[9]["embeddings"].as_bool(), t[9]["tokens_out"].as_u64()),
        (Some(true), Some(0))
    );
}
