//! `POST /v1/embeddings` through the real binary: the built-in mock provider and the `openai`
//! provider pointed at a real `llmscope mock-upstream`; priced at the inputs' tokens × the
//! model's input price, settled on the provider's `usage.prompt_tokens` (else the count); a
//! denial before the provider is called; every body key honoured or refused by name; a
//! provider without an embeddings API refused before anything is reserved.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "integration tests: a failed unwrap or panic is a failed test"
)]

use llmscope::pricing::Tokenizer;
use llmscope_tests::gateway::{read_jsonl, Gateway, Options};
use llmscope_tests::streaming::MockUpstream;
use serde_json::{json, Value};

const CONFIG: &str = r#"
server: {listen: "127.0.0.1:0", max_body_bytes: 65536}
artifacts: {telemetry_path: "{telemetry}", decisions_path: "{decisions}"}
policy: {file: "{policy_file}", policies_dir: "{policies_dir}"}
defaults: {route: /embed, tier: cheap}
models:
  embed-mock: {provider: mock, input_per_1m: 0.02, output_per_1m: 0.0}
  embed-oa: {provider: upstream-openai, provider_model: text-embedding-3-small, input_per_1m: 0.13, output_per_1m: 0.0}
  claude-local: {provider: upstream-anthropic, provider_model: claude-test, input_per_1m: 3.0, output_per_1m: 15.0}
routes:
  /embed: {max_output_tokens: 300, tiers: {cheap: embed-mock, expensive: embed-oa, claude: claude-local}}
providers:
  mock: {kind: mock}
  upstream-openai: {kind: openai, base_url: "http://{upstream}/v1", timeout_ms: 5000, max_retries: 0}
  upstream-anthropic: {kind: anthropic, base_url: "http://{upstream}", api_key_env: TEST_ANTHROPIC_KEY, timeout_ms: 5000, max_retries: 0}
"#;

const POLICY: &str = "version: \"1\"\nnamespaces:\n  default:\n    rules: []\n  tight:\n    rules:\n      - {id: tight-cap, primitive: budget_threshold, period: hourly, limit_usd: 0.000000001, deny_reason: \"Tight budget exceeded\"}\n";

fn start(upstream: &MockUpstream) -> Gateway {
    let mut opts = Options::new(POLICY);
    opts.config_template = Some(CONFIG.replace("{upstream}", &upstream.addr));
    opts.env = vec![("TEST_ANTHROPIC_KEY".into(), "sk-ant-test".into())];
    Gateway::start(&opts)
}

/// POST an embeddings body for tenant `acme` with extra `headers`: status, headers, body.
async fn embed(
    gw: &Gateway,
    body: Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = reqwest::Client::new()
        .post(gw.at("/v1/embeddings"))
        .header("x-llmscope-tenant-id", "acme");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap())
}

/// Tokens of `texts` with `tokenizer`, as the gateway counts embedding inputs.
fn count(tokenizer: Tokenizer, texts: &[&str]) -> u64 {
    texts.iter().map(|t| u64::from(tokenizer.count(t))).sum()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-15
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mock_provider_embeds_priced_at_input_tokens_times_the_input_price() {
    let upstream = MockUpstream::start(&[]);
    let gw = start(&upstream);
    let texts = [
        "Quarterly revenue grew while costs held flat.",
        "tokenization",
    ];
    let (s, h, b) = embed(
        &gw,
        json!({"model": "cheap", "input": texts, "user": "end-user-1",
               "metadata": {"feature_id": "search", "experiment_id": "exp-1"}}),
        &[],
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (b["object"].as_str(), b["model"].as_str()),
        (Some("list"), Some("embed-mock"))
    );
    let data = b["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(
            (d["object"].as_str(), d["index"].as_u64()),
            (Some("embedding"), Some(i as u64))
        );
        assert_eq!(d["embedding"].as_array().unwrap().len(), 8, "{d}");
    }
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);
    let n = count(Tokenizer::Cl100kBase, &texts);
    assert_eq!(
        (
            b["usage"]["prompt_tokens"].as_u64(),
            b["usage"]["total_tokens"].as_u64()
        ),
        (Some(n), Some(n))
    );
    let request_id = h["x-llmscope-request-id"].to_str().unwrap().to_owned();
    assert_eq!(h["x-llmscope-model-tier"], "cheap");

    // Base64 (what the official clients ask for): the same vector's 8 little-endian f32s.
    let (s, _, b) = embed(&gw, json!({"input": "x", "encoding_format": "base64"}), &[]).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["data"][0]["embedding"].as_str().map(str::len),
        Some(44),
        "{b}"
    );

    let t = read_jsonl(&gw.telemetry);
    assert_eq!(t.len(), 2, "one line per call");
    let t0 = &t[0];
    assert_eq!(t0["request_id"], request_id.as_str());
    assert_eq!(
        (
            t0["status"].as_str(),
            t0["cost_source"].as_str(),
            t0["model"].as_str(),
            t0["provider"].as_str()
        ),
        (
            Some("ok"),
            Some("tokenizer"),
            Some("embed-mock"),
            Some("mock")
        )
    );
    assert_eq!(
        (t0["tokens_in"].as_u64(), t0["tokens_out"].as_u64()),
        (Some(n), Some(0))
    );
    assert_eq!(t0["embeddings"], true);
    assert_eq!(
        (t0["feature_id"].as_str(), t0["experiment_id"].as_str()),
        (Some("search"), Some("exp-1"))
    );
    let price = n as f64 * 0.02 / 1e6;
    assert!(close(t0["cost_usd"].as_f64().unwrap(), price), "{t0}");
    assert!(
        close(t0["estimated_cost_usd"].as_f64().unwrap(), price),
        "{t0}"
    );
    let d = &read_jsonl(&gw.decisions)[0];
    assert_eq!(d["request_id"], request_id.as_str());
    assert_eq!(
        (
            d["reservation"]["tokens_in"].as_u64(),
            d["reservation"]["tokens_out"].as_u64()
        ),
        (Some(n), Some(0))
    );
    assert!(
        close(d["reservation"]["cost_usd"].as_f64().unwrap(), price),
        "{d}"
    );
    assert_eq!(
        upstream.stats().await["served"],
        0,
        "the mock provider is in-process"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_provider_forwards_and_settles_on_the_upstreams_usage() {
    let upstream = MockUpstream::start(&[]);
    let gw = start(&upstream);
    let texts = ["hello world", "a second, longer input to embed"];
    let (s, _, b) = embed(
        &gw,
        json!({"model": "text-embedding-3-small", "input": texts, "dimensions": 4, "encoding_format": "float"}),
        &[],
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["model"], "embed-oa");
    // The upstream's vectors, passed through: the mock upstream's deterministic ones, 4 wide.
    for (i, text) in texts.iter().enumerate() {
        let expected = llmscope::providers::mock_vector(text.as_bytes(), 4);
        assert_eq!(b["data"][i]["embedding"], json!(expected), "{b}");
    }
    let n = count(Tokenizer::by_model_name("text-embedding-3-small"), &texts);
    assert_eq!(b["usage"]["prompt_tokens"].as_u64(), Some(n));
    // Pre-tokenized input is forwarded as sent and counted as it is.
    let (s, _, b) = embed(
        &gw,
        json!({"model": "expensive", "input": [[1, 2, 3], [4, 5]]}),
        &[],
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (
            b["data"].as_array().unwrap().len(),
            b["usage"]["prompt_tokens"].as_u64()
        ),
        (2, Some(5))
    );
    assert_eq!(upstream.stats().await["served"], 2);

    let t = read_jsonl(&gw.telemetry);
    assert_eq!(t.len(), 2);
    for (line, tokens) in t.iter().zip([n, 5]) {
        assert_eq!(
            (
                line["provider"].as_str(),
                line["cost_source"].as_str(),
                line["tokens_in"].as_u64(),
                line["tokens_out"].as_u64()
            ),
            (
                Some("upstream-openai"),
                Some("provider_usage"),
                Some(tokens),
                Some(0)
            ),
            "{line}"
        );
        assert!(
            close(
                line["cost_usd"].as_f64().unwrap(),
                tokens as f64 * 0.13 / 1e6
            ),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_embedding_is_a_402_and_never_reaches_the_provider() {
    let upstream = MockUpstream::start(&[]);
    let gw = start(&upstream);
    let (s, _, b) = embed(
        &gw,
        json!({"model": "expensive", "input": "deny me"}),
        &[("x-llmscope-budget-namespace", "tight")],
    )
    .await;
    assert_eq!(s, 402, "{b}");
    assert_eq!(
        (
            b["error"]["code"].as_str(),
            b["error"]["policy_id"].as_str()
        ),
        (Some("policy_denied"), Some("tight-cap"))
    );
    assert_eq!(
        upstream.stats().await["served"],
        0,
        "a denied request never calls the provider"
    );
    let t = read_jsonl(&gw.telemetry);
    assert_eq!(t.len(), 1);
    assert_eq!(
        t[0]["embeddings"], true,
        "a denied embeddings call says so too"
    );
    let n = count(Tokenizer::by_model_name("embed-oa"), &["deny me"]);
    assert_eq!(
        (
            t[0]["status"].as_str(),
            t[0]["tokens_in"].as_u64(),
            t[0]["cost_usd"].as_f64()
        ),
        (Some("denied"), Some(n), Some(0.0))
    );
    assert!(close(
        t[0]["estimated_cost_usd"].as_f64().unwrap(),
        n as f64 * 0.13 / 1e6
    ));
    assert_eq!(read_jsonl(&gw.decisions)[0]["decision"], "deny");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_bodies_and_providers_without_embeddings_are_refused_before_anything_is_reserved() {
    let upstream = MockUpstream::start(&[]);
    let gw = start(&upstream);
    for (body, status, code, param) in [
        (
            json!({"input": "x", "tools": []}),
            422,
            "unsupported_parameter",
            "tools",
        ),
        (
            json!({"input": "x", "stream": true}),
            422,
            "unsupported_parameter",
            "stream",
        ),
        (json!({"input": []}), 422, "invalid_parameter", "input"),
        (
            json!({"input": ["ok", 3]}),
            422,
            "invalid_parameter",
            "input[1]",
        ),
        (
            json!({"input": "x", "dimensions": -1}),
            422,
            "invalid_parameter",
            "dimensions",
        ),
        (
            json!({"input": "x", "encoding_format": "int8"}),
            422,
            "invalid_parameter",
            "encoding_format",
        ),
        (
            json!({"input": "x", "model": "gpt-9"}),
            422,
            "model_not_found",
            "model",
        ),
        (
            json!({"input": "x", "model": "claude"}),
            422,
            "embeddings_unsupported",
            "model",
        ),
    ] {
        let (s, _, b) = embed(&gw, body.clone(), &[]).await;
        assert_eq!(
            (s, b["error"]["code"].as_str(), b["error"]["param"].as_str()),
            (status, Some(code), Some(param)),
            "{body}: {b}"
        );
        let message = b["error"]["message"].as_str().unwrap();
        if code == "unsupported_parameter" {
            assert!(message.starts_with(param), "{message}");
        }
        if code == "embeddings_unsupported" {
            assert!(
                message.contains("upstream-anthropic") && message.contains("claude-local"),
                "{message}"
            );
        }
    }
    assert_eq!(upstream.stats().await["served"], 0);
    assert!(
        read_jsonl(&gw.telemetry).is_empty(),
        "nothing was priced, reserved or recorded"
    );
    assert!(read_jsonl(&gw.decisions).is_empty());
    let resp = reqwest::Client::new()
        .get(gw.at("/v1/embeddings"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
}
