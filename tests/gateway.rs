//! The gateway end to end: the real `llmscope serve` binary on port 0 with the real policy
//! components and the built-in mock provider. Allow / downgrade / deny with their exact JSONL
//! lines, every bad-input case, auth, hot reload, the budget under 64 concurrent clients, four
//! processes appending to the same logs, fallbacks and graceful shutdown.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "integration tests: a failed unwrap or panic is a failed test"
)]

use std::time::{Duration, Instant};

use llmscope_tests::gateway::{read_jsonl, Gateway, Options};
use serde_json::{json, Value};

/// The seed's policy file plus a `tight` namespace whose hourly cap is below one request.
fn policy_yaml() -> String {
    let seed = std::fs::read_to_string(llmscope_tests::seed_config()).unwrap();
    format!(
        "{seed}\n  tight:\n    rules:\n      - id: \"tight-cap\"\n        primitive: budget_threshold\n        period: hourly\n        limit_usd: 0.0001\n        action: deny\n        deny_reason: \"Tight budget exceeded\"\n"
    )
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn approx(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_downgrade_and_deny_with_their_exact_log_lines() {
    let mut gw = Gateway::start(&Options::new(&policy_yaml()));

    // allow: demo namespace, a route without a preference, cheap tier.
    let (status, body) = post(
        &gw.at("/infer"),
        json!({"prompt": "Summarize this document", "tenant_id": "acme-corp", "feature_id": "summarize",
               "experiment_id": "exp-1", "caller_id": "svc-a", "budget_namespace": "demo", "route_name": "/conversation-turn"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["policy_decision"], "allow");
    assert_eq!(body["selected_model"], "gpt-4o-mini");
    assert_eq!(body["effective_model_tier"], "cheap");
    assert_eq!(body["tokens_out"], 120);
    assert!(body["answer"]
        .as_str()
        .unwrap()
        .contains("Summarize this document"));
    for field in [
        "request_id",
        "answer",
        "selected_model",
        "estimated_cost_usd",
        "tokens_in",
        "tokens_out",
        "policy_decision",
        "policy_reason",
        "effective_model_tier",
    ] {
        assert!(
            body.get(field).is_some(),
            "seed response field {field} missing: {body}"
        );
    }

    // downgrade: the seed's route preference sends expensive /answer-routed traffic to cheap.
    let (status, down) = post(
        &gw.at("/infer"),
        json!({"prompt": "Summarize this document", "tenant_id": "acme-corp", "feature_id": "summarize", "budget_namespace": "demo", "model_tier": "expensive"}),
    )
    .await;
    assert_eq!(status, 200, "{down}");
    assert_eq!(down["policy_decision"], "downgrade");
    assert_eq!(down["effective_model_tier"], "cheap");
    assert_eq!(down["selected_model"], "gpt-4o-mini");
    assert_eq!(down["policy_id"], "demo-route-preference");
    assert_eq!(
        down["policy_reason"],
        "route /answer-routed prefers tier `cheap`"
    );

    // deny: a cap below one request's estimate; 402 and the provider is not called.
    let (status, denied) = post(&gw.at("/infer"), json!({"prompt": "Summarize this document", "tenant_id": "acme-corp", "budget_namespace": "tight"})).await;
    assert_eq!(status, 402, "{denied}");
    assert_eq!(denied["error"], "policy_denied");
    assert_eq!(denied["reason"], "Tight budget exceeded");
    assert_eq!(denied["policy_id"], "tight-cap");
    assert_eq!(
        denied["detail"],
        "Request denied by policy: Tight budget exceeded"
    );

    let (status, stderr) = gw.stop();
    assert!(status.success(), "{stderr}");
    let telemetry = read_jsonl(&gw.telemetry);
    let decisions = read_jsonl(&gw.decisions);
    assert_eq!(telemetry.len(), 3);
    assert_eq!(decisions.len(), 3);

    let t = &telemetry[0];
    assert_eq!(t["request_id"], body["request_id"]);
    assert_eq!(t["schema_version"], "1.0");
    assert!(t["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        (
            t["tenant_id"].as_str(),
            t["caller_id"].as_str(),
            t["feature_id"].as_str(),
            t["use_case"].as_str()
        ),
        (
            Some("acme-corp"),
            Some("svc-a"),
            Some("summarize"),
            Some("summarize")
        )
    );
    assert_eq!(t["experiment_id"], "exp-1");
    assert_eq!(t["budget_namespace"], "demo");
    assert_eq!(
        t["audit_tags"],
        json!({"feature_id": "summarize", "experiment_id": "exp-1", "budget_namespace": "demo"})
    );
    assert_eq!(
        (t["route_name"].as_str(), t["route"].as_str()),
        (Some("/conversation-turn"), Some("/conversation-turn"))
    );
    assert_eq!(
        (t["requested_model_tier"].as_str(), t["model_tier"].as_str()),
        (Some("cheap"), Some("cheap"))
    );
    assert_eq!(
        (t["provider"].as_str(), t["model"].as_str()),
        (Some("mock"), Some("gpt-4o-mini"))
    );
    let tin = t["tokens_in"].as_f64().unwrap();
    assert!(tin > 0.0);
    assert_eq!(t["tokens_out"], 120);
    assert_eq!(t["tokens_total"].as_f64().unwrap(), tin + 120.0);
    assert!(approx(
        t["estimated_cost_usd"].as_f64().unwrap(),
        (tin * 0.15 + 500.0 * 0.60) / 1e6
    ));
    assert!(approx(
        t["cost_usd"].as_f64().unwrap(),
        (tin * 0.15 + 120.0 * 0.60) / 1e6
    ));
    assert_eq!(t["cost_source"], "tokenizer");
    assert_eq!(
        (t["status"].as_str(), t["finish_reason"].as_str()),
        (Some("ok"), Some("stop"))
    );
    assert_eq!(
        (
            t["is_fallback"].as_bool(),
            t["fallback_reason"].is_null(),
            t["error_type"].is_null()
        ),
        (Some(false), true, true)
    );
    assert_eq!(
        (t["policy_decision"].as_str(), t["policy_id"].is_null()),
        (Some("allow"), true)
    );
    assert!(t["latency_ms"].as_f64().unwrap() >= 0.0);

    let d = &decisions[0];
    assert_eq!(d["request_id"], body["request_id"]);
    assert_eq!(d["decision"], "allow");
    assert_eq!(d["requested_model_tier"], "cheap");
    assert_eq!(d["effective_model_tier"], "cheap");
    assert_eq!(d["policy_version"], "0.1.0");
    assert_eq!(d["window_limit_usd"], 1.0);
    assert_eq!(d["rules"].as_array().unwrap().len(), 3);
    for field in [
        "timestamp",
        "tenant_id",
        "caller_id",
        "feature_id",
        "experiment_id",
        "budget_namespace",
        "route_name",
        "primitive",
        "reason",
        "policy_id",
        "estimated_cost_usd",
        "latency_ms",
        "window_cost_usd",
    ] {
        assert!(
            d.get(field).is_some(),
            "decision field {field} missing: {d}"
        );
    }

    let t = &telemetry[1];
    assert_eq!(
        (
            t["requested_model_tier"].as_str(),
            t["model_tier"].as_str(),
            t["model"].as_str()
        ),
        (Some("expensive"), Some("cheap"), Some("gpt-4o-mini"))
    );
    assert_eq!(
        (t["policy_decision"].as_str(), t["policy_id"].as_str()),
        (Some("downgrade"), Some("demo-route-preference"))
    );
    let d = &decisions[1];
    assert_eq!(
        (
            d["decision"].as_str(),
            d["primitive"].as_str(),
            d["effective_model_tier"].as_str()
        ),
        (Some("downgrade"), Some("route_preference"), Some("cheap"))
    );

    let t = &telemetry[2];
    assert_eq!(
        (
            t["status"].as_str(),
            t["cost_usd"].as_f64(),
            t["cost_source"].as_str()
        ),
        (Some("denied"), Some(0.0), Some("none"))
    );
    assert_eq!(
        (
            t["policy_decision"].as_str(),
            t["policy_id"].as_str(),
            t["latency_ms"].as_f64()
        ),
        (Some("deny"), Some("tight-cap"), Some(0.0))
    );
    let d = &decisions[2];
    assert_eq!(
        (
            d["decision"].as_str(),
            d["reason"].as_str(),
            d["window_limit_usd"].as_f64()
        ),
        (Some("deny"), Some("Tight budget exceeded"), Some(0.0001))
    );
}

async fn raw(url: &str, content_type: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(url).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_bad_input_gets_a_specific_error() {
    let mut opts = Options::new(&policy_yaml());
    opts.max_body_bytes = 4096;
    let gw = Gateway::start(&opts);
    let infer = gw.at("/infer");

    let (s, b) = raw(&infer, Some("text/plain"), b"{}".to_vec()).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (415, Some("unsupported_media_type")),
        "{b}"
    );
    let (s, b) = raw(&infer, Some("application/json"), b"{\"prompt\": ".to_vec()).await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_json")), "{b}");
    let (s, b) = raw(&infer, Some("application/json"), b"[1, 2]".to_vec()).await;
    assert_eq!(s, 422, "{b}");
    let (s, b) = raw(&infer, Some("application/json"), vec![b' '; 10_000]).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (413, Some("payload_too_large")),
        "{b}"
    );

    // Each bad field is named.
    let (s, b) = post(
        &infer,
        json!({"prompt": "", "tenant_id": 7, "max_tokens": -1}),
    )
    .await;
    assert_eq!(s, 422, "{b}");
    let fields: Vec<&str> = b["detail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["prompt", "tenant_id", "max_tokens"], "{b}");
    let (s, b) = post(&infer, json!({})).await;
    assert_eq!(s, 422);
    assert_eq!(
        b["detail"][0],
        json!({"field": "prompt", "message": "is required"})
    );

    let (s, b) = post(
        &infer,
        json!({"prompt": "hi", "tenant_id": "t", "route_name": "/nope"}),
    )
    .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (404, Some("unknown_route")),
        "{b}"
    );
    assert_eq!(
        b["detail"]["known_routes"],
        json!(["/answer-routed", "/conversation-turn"])
    );
    let (s, b) = post(
        &infer,
        json!({"prompt": "hi", "tenant_id": "t", "model_tier": "premium"}),
    )
    .await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(b["detail"][0]["field"], "model_tier");
    assert!(b["detail"][0]["message"]
        .as_str()
        .unwrap()
        .contains("tiers: cheap, expensive"));

    let (s, b) = post(&gw.at("/v2/infer"), json!({})).await;
    assert_eq!((s, b["error"].as_str()), (404, Some("not_found")));
    let resp = reqwest::get(gw.at("/infer")).await.unwrap();
    assert_eq!(resp.status().as_u16(), 405);

    // Nothing invalid reached the logs.
    assert!(read_jsonl(&gw.telemetry).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_gate_tenants() {
    let mut opts = Options::new(&policy_yaml());
    opts.extra_yaml = "auth:\n  api_keys:\n    - {key: acme-key-0123456789, tenants: [acme-corp]}\n    - {key_env: ADMIN_KEY, tenants: [\"*\"]}\n".into();
    opts.env
        .push(("ADMIN_KEY".into(), "admin-key-0123456789".into()));
    let gw = Gateway::start(&opts);
    let client = reqwest::Client::new();
    let send = |key: Option<&'static str>, tenant: &'static str| {
        let mut req = client
            .post(gw.at("/infer"))
            .json(&json!({"prompt": "hi", "tenant_id": tenant}));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(send(None, "acme-corp").await, 401);
    assert_eq!(send(Some("acme-key-0123456789x"), "acme-corp").await, 401);
    assert_eq!(send(Some("acme-key-0123456789"), "globex").await, 403);
    assert_eq!(send(Some("acme-key-0123456789"), "acme-corp").await, 200);
    assert_eq!(send(Some("admin-key-0123456789"), "globex").await, 200);
    // Admin endpoints need a key allowed for every tenant.
    let reload = |key: &'static str| {
        client
            .post(gw.at("/v1/admin/reload"))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(
        reload("acme-key-0123456789")
            .await
            .unwrap()
            .status()
            .as_u16(),
        403
    );
    assert_eq!(
        reload("admin-key-0123456789")
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    // Health stays open for probes.
    assert_eq!(
        reqwest::get(gw.at("/healthz"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
}

/// The policy set `gw` serves (`GET /v1/policies`, auth off).
async fn served_policies(gw: &Gateway) -> Value {
    reqwest::get(gw.at("/v1/policies"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hot_reload_adds_rejects_and_fixes_policies_without_a_restart() {
    let dir = llmscope_tests::builtin_policies();
    let mut opts = Options::new("version: \"v1\"\nnamespaces:\n  default:\n    rules: []\n");
    opts.policies_dir = dir.path().to_path_buf();
    let gw = Gateway::start(&opts);
    let infer = gw.at("/infer");
    let request = json!({"prompt": "Summarize this document", "tenant_id": "acme-corp"});
    assert_eq!(post(&infer, request.clone()).await.0, 200);

    // Add a policy: drop a new component in and name it in the YAML.
    let built =
        llmscope_tests::component("examples/policies/max-request-cost/max_request_cost.wasm");
    std::fs::copy(built, dir.path().join("max_request_cost.wasm")).unwrap();
    std::fs::write(&gw.policy_file, "version: \"v2\"\nnamespaces:\n  default:\n    rules:\n      - {id: max-req, primitive: max_request_cost, max_usd: 0.00001}\n").unwrap();
    wait_for("the new policy to serve", async || {
        post(&infer, request.clone()).await.0 == 402
    })
    .await;
    let policies = served_policies(&gw).await;
    assert_eq!(policies["version"], "v2");

    // Break it: rejected, the previous set keeps serving.
    std::fs::write(&gw.policy_file, "version: \"v3\"\nnamespaces:\n  default:\n    rules:\n      - {id: max-req, primitive: max_request_cost, max_usd: -1}\n").unwrap();
    wait_for("the failed reload to be counted", async || {
        let m = gw.metrics().await;
        m.contains("llmscope_policy_reloads_total{result=\"failed\"}")
    })
    .await;
    assert_eq!(
        post(&infer, request.clone()).await.0,
        402,
        "v2 still serves"
    );
    let resp = reqwest::Client::new()
        .post(gw.at("/v1/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("max_usd: must be a positive number"),
        "{body}"
    );
    assert_eq!(body["serving"], "previous policy set");

    // Fix it.
    std::fs::write(&gw.policy_file, "version: \"v4\"\nnamespaces:\n  default:\n    rules:\n      - {id: max-req, primitive: max_request_cost, max_usd: 1.0}\n").unwrap();
    wait_for("the fixed policy to serve", async || {
        post(&infer, request.clone()).await.0 == 200
    })
    .await;
    let policies = served_policies(&gw).await;
    assert_eq!(policies["version"], "v4");
}

/// A million spaces made the tokenizer's regex give up and tiktoken panic: the request died
/// with a 500. It is priced like any other prompt now, and the gateway keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_prompt_of_a_million_spaces_is_priced_not_a_crash() {
    let mut opts = Options::new("version: \"1\"\nnamespaces:\n  default:\n    rules: []\n");
    opts.max_body_bytes = 4 << 20;
    opts.config_template = Some(llmscope_tests::gateway::BASE_CONFIG.replace(
        "max_body_bytes: {max_body}",
        "max_body_bytes: {max_body}\n  max_prompt_bytes: 4000000",
    ));
    let gw = Gateway::start(&opts);
    let infer = gw.at("/infer");
    let (status, body) = post(
        &infer,
        json!({"prompt": format!("Summarize:{}done", " ".repeat(1_000_000)), "tenant_id": "acme-corp", "model_tier": "expensive"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let lines = read_jsonl(&gw.telemetry);
    assert!(lines[0]["tokens_in"].as_u64().unwrap() > 0, "{}", lines[0]);
    let (status, _) = post(
        &infer,
        json!({"prompt": "Summarize this document", "tenant_id": "acme-corp"}),
    )
    .await;
    assert_eq!(status, 200);
}

/// A Kubernetes ConfigMap volume updates by writing a new `..<timestamp>` directory and
/// renaming a `..data` symlink over the old one; `policy.yaml -> ..data/policy.yaml` itself is
/// never touched. The reload must follow.
#[tokio::test(flavor = "multi_thread")]
async fn hot_reload_follows_a_configmap_symlink_swap() {
    let allow = "version: \"v1\"\nnamespaces:\n  default:\n    rules: []\n";
    let deny = "version: \"v2\"\nnamespaces:\n  default:\n    rules:\n      - {id: cap, primitive: budget_threshold, period: hourly, limit_usd: 0.0000001, action: deny}\n";
    let gw = Gateway::start(&Options::new(allow));
    let root = gw.policy_file.parent().unwrap().to_path_buf();
    // Turn policy.yaml into the ConfigMap layout, same content.
    std::fs::create_dir(root.join("..2026_12_01_v1")).unwrap();
    std::fs::write(root.join("..2026_12_01_v1/policy.yaml"), allow).unwrap();
    std::os::unix::fs::symlink("..2026_12_01_v1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/policy.yaml", root.join("policy.yaml.link")).unwrap();
    std::fs::rename(root.join("policy.yaml.link"), &gw.policy_file).unwrap();
    let infer = gw.at("/infer");
    let request = json!({"prompt": "Summarize this document", "tenant_id": "acme-corp"});
    // Two requests spend something, so the cap below is exceeded.
    assert_eq!(post(&infer, request.clone()).await.0, 200);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(post(&infer, request.clone()).await.0, 200);

    // The kubelet's update: new directory, new symlink renamed over ..data, old one removed.
    std::fs::create_dir(root.join("..2026_12_01_v2")).unwrap();
    std::fs::write(root.join("..2026_12_01_v2/policy.yaml"), deny).unwrap();
    std::os::unix::fs::symlink("..2026_12_01_v2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2026_12_01_v1")).unwrap();
    wait_for("the swapped-in policy to serve", async || {
        post(&infer, request.clone()).await.0 == 402
    })
    .await;
    let policies = served_policies(&gw).await;
    assert_eq!(policies["version"], "v2");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_clients_cannot_overshoot_a_budget() {
    const LIMIT: f64 = 0.01;
    let yaml = format!("version: \"1\"\nnamespaces:\n  default:\n    rules:\n      - {{id: cap, primitive: budget_threshold, period: hourly, limit_usd: {LIMIT}, action: deny}}\n");
    let mut opts = Options::new(&yaml);
    opts.mock_latency_ms = 20; // requests overlap
    let mut gw = Gateway::start(&opts);
    let url = gw.at("/infer");
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut served = 0;
            for _ in 0..20 {
                let resp = client
                    .post(&url)
                    .json(&json!({"prompt": format!("client {i}: summarize the quarterly report"), "tenant_id": "acme-corp"}))
                    .send()
                    .await
                    .unwrap();
                match resp.status().as_u16() {
                    200 => served += 1,
                    402 => break,
                    other => panic!("unexpected status {other}"),
                }
            }
            served
        }));
    }
    let mut served = 0;
    for t in tasks {
        served += t.await.unwrap();
    }
    let (status, stderr) = gw.stop();
    assert!(status.success(), "{stderr}");
    let lines = read_jsonl(&gw.telemetry);
    let ok: Vec<&Value> = lines.iter().filter(|l| l["status"] == "ok").collect();
    assert_eq!(ok.len(), served, "every served request was logged");
    assert!(
        lines.iter().any(|l| l["status"] == "denied"),
        "the budget was reached"
    );
    let spend: f64 = ok.iter().map(|l| l["cost_usd"].as_f64().unwrap()).sum();
    let largest = lines
        .iter()
        .map(|l| l["estimated_cost_usd"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(
        spend <= LIMIT + largest,
        "spent {spend} > limit {LIMIT} + largest estimate {largest}"
    );
    assert!(
        spend > LIMIT / 2.0,
        "the budget was used, not refused early: spent {spend}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn four_processes_append_to_the_same_logs_without_losing_a_line() {
    const PER_PROCESS: usize = 60;
    let shared = tempfile::tempdir().unwrap();
    let logs = (
        shared.path().join("telemetry.jsonl"),
        shared.path().join("policy_decisions.jsonl"),
    );
    let mut gateways: Vec<Gateway> = (0..4)
        .map(|_| {
            let mut opts = Options::new("version: \"1\"\nnamespaces:\n  default:\n    rules: []\n");
            opts.logs = Some(logs.clone());
            Gateway::start(&opts)
        })
        .collect();
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for gw in &gateways {
        for i in 0..PER_PROCESS {
            let (client, url) = (client.clone(), gw.at("/infer"));
            tasks.push(tokio::spawn(async move {
                let body = json!({"prompt": format!("line {i} {}", "padding ".repeat(i * 7)), "tenant_id": "acme-corp"});
                client.post(&url).json(&body).send().await.unwrap().status().as_u16()
            }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    for gw in &mut gateways {
        assert!(gw.stop().0.success());
    }
    for path in [&logs.0, &logs.1] {
        let lines = read_jsonl(path); // every line parses
        assert_eq!(lines.len(), 4 * PER_PROCESS, "{}", path.display());
        let mut ids: Vec<&str> = lines
            .iter()
            .map(|l| l["request_id"].as_str().unwrap())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 4 * PER_PROCESS, "request ids are unique");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_model_falls_back_and_says_why() {
    let mut opts = Options::new("version: \"1\"\nnamespaces:\n  default:\n    rules: []\n");
    opts.fail_models = vec!["gpt-4o-mini".into()];
    let mut gw = Gateway::start(&opts);
    let (s, b) = post(
        &gw.at("/infer"),
        json!({"prompt": "hello", "tenant_id": "acme-corp"}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["selected_model"], "claude-haiku-3-5-20241022");
    assert_eq!(b["is_fallback"], true);
    gw.stop();
    let t = &read_jsonl(&gw.telemetry)[0];
    assert_eq!(t["is_fallback"], true);
    assert_eq!(t["model"], "claude-haiku-3-5-20241022");
    assert!(
        t["fallback_reason"]
            .as_str()
            .unwrap()
            .starts_with("gpt-4o-mini: HTTP 503 (server_error)"),
        "{t}"
    );
    // The status and the provider's error code, never its error body (which may echo the
    // prompt).
    assert!(
        !t["fallback_reason"]
            .as_str()
            .unwrap()
            .contains("configured to fail"),
        "{t}"
    );
    // Priced at the model that answered.
    let tin = t["tokens_in"].as_f64().unwrap();
    assert!(approx(
        t["cost_usd"].as_f64().unwrap(),
        (tin * 0.80 + 120.0 * 4.00) / 1e6
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_model_failing_is_a_502_with_the_failure_logged() {
    let mut opts = Options::new("version: \"1\"\nnamespaces:\n  default:\n    rules: []\n");
    opts.fail_models = vec!["gpt-4o-mini".into(), "claude-haiku-3-5-20241022".into()];
    let mut gw = Gateway::start(&opts);
    let (s, b) = post(
        &gw.at("/infer"),
        json!({"prompt": "hello", "tenant_id": "acme-corp"}),
    )
    .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (502, Some("provider_error")),
        "{b}"
    );
    gw.stop();
    let t = &read_jsonl(&gw.telemetry)[0];
    assert_eq!(
        b["detail"]["request_id"], t["request_id"],
        "the answer names the request whose telemetry line has each attempt: {b}"
    );
    assert_eq!(
        (
            t["status"].as_str(),
            t["error_type"].as_str(),
            t["cost_usd"].as_f64()
        ),
        (Some("error"), Some("provider_5xx"), Some(0.0))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_and_flushes_logs() {
    let mut opts = Options::new("version: \"1\"\nnamespaces:\n  default:\n    rules: []\n");
    opts.mock_latency_ms = 1_500;
    let mut gw = Gateway::start(&opts);
    let url = gw.at("/infer");
    let inflight = tokio::spawn(async move {
        post(
            &url,
            json!({"prompt": "slow one", "tenant_id": "acme-corp"}),
        )
        .await
    });
    // SIGTERM only once the request is in flight, however slowly this machine got it there.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = gw.metrics().await;
        if metrics.contains("\nllmscope_requests_in_flight 1\n") {
            break;
        }
        assert!(Instant::now() < deadline, "the request never got in flight");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, stderr) = tokio::task::block_in_place(|| gw.stop());
    assert!(status.success(), "{stderr}");
    let (s, b) = inflight.await.unwrap();
    assert_eq!(s, 200, "the in-flight request finished: {b}");
    let lines = read_jsonl(&gw.telemetry);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["request_id"], b["request_id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_metrics_and_policies() {
    let gw = Gateway::start(&Options::new(&policy_yaml()));
    assert_eq!(
        post(
            &gw.at("/infer"),
            json!({"prompt": "hi", "tenant_id": "t", "budget_namespace": "tight"})
        )
        .await
        .0,
        402
    );
    assert_eq!(
        post(&gw.at("/infer"), json!({"prompt": "hi", "tenant_id": "t"}))
            .await
            .0,
        200
    );
    let health: Value = reqwest::get(gw.at("/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let ready = reqwest::get(gw.at("/readyz")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("llmscope_requests_total{route=\"/answer-routed\",decision=\"deny\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("llmscope_requests_total{route=\"/answer-routed\",decision=\"allow\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("llmscope_policy_evaluation_seconds_count 2"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE llmscope_cost_usd_total counter"));
    assert!(
        metrics.contains("\nllmscope_requests_in_flight 0\n"),
        "both requests finished: {metrics}"
    );
    let policies = served_policies(&gw).await;
    assert_eq!(
        policies["namespaces"]["tight"]["rules"][0]["id"],
        "tight-cap"
    );
    assert_eq!(
        policies["namespaces"]["demo"]["rules"][0]["aggregates"][0]["key"],
        "window_cost_usd"
    );
    assert_eq!(policies["components"].as_array().unwrap().len(), 3);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn spend_already_in_the_logs_counts_against_budgets_at_start() {
    let yaml = "version: \"1\"\nnamespaces:\n  default:\n    rules:\n      - {id: cap, primitive: budget_threshold, period: hourly, limit_usd: 0.01, action: deny, deny_reason: \"Hourly cap\"}\n";
    let line = |ms: u64, cost: f64| {
        format!("{{\"timestamp\":\"{}\",\"tenant_id\":\"acme-corp\",\"budget_namespace\":\"default\",\"route_name\":\"/answer-routed\",\"model\":\"gpt-4o\",\"cost_usd\":{cost},\"status\":\"ok\"}}\n", llmscope::artifacts::rfc3339(ms))
    };
    let shared = tempfile::tempdir().unwrap();
    let logs = (
        shared.path().join("telemetry.jsonl"),
        shared.path().join("policy_decisions.jsonl"),
    );

    // Two hours ago: outside the rolling hour.
    std::fs::write(&logs.0, line(now_ms() - 2 * 3_600_000, 0.05)).unwrap();
    let mut opts = Options::new(yaml);
    opts.logs = Some(logs.clone());
    let mut gw = Gateway::start(&opts);
    let request = json!({"prompt": "hello", "tenant_id": "acme-corp"});
    assert_eq!(post(&gw.at("/infer"), request.clone()).await.0, 200);
    gw.stop();

    // Ten minutes ago: inside it, and over the cap.
    let mut text = std::fs::read_to_string(&logs.0).unwrap();
    text.push_str(&line(now_ms() - 600_000, 0.02));
    std::fs::write(&logs.0, text).unwrap();
    let gw = Gateway::start(&opts);
    let (s, b) = post(&gw.at("/infer"), request).await;
    assert_eq!((s, b["reason"].as_str()), (402, Some("Hourly cap")), "{b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_five_questions_over_http() {
    let gw = Gateway::start(&Options::new(&policy_yaml()));
    for ns in ["demo", "tight", "demo"] {
        post(&gw.at("/infer"), json!({"prompt": "hi", "tenant_id": "acme-corp", "feature_id": "summarize", "budget_namespace": ns})).await;
    }
    let answer: Value = reqwest::get(gw.at("/v1/queries/budget_pressure_by_namespace"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        answer["columns"],
        json!([
            "budget_namespace",
            "allow_count",
            "downgrade_count",
            "deny_count",
            "total_count"
        ])
    );
    assert_eq!(
        answer["rows"],
        json!([["tight", 0, 0, 1, 1], ["demo", 2, 0, 0, 2]])
    );
    let answer: Value =
        reqwest::get(gw.at("/v1/queries/cost_by_tenant_and_feature?since=2020-01-01"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(answer["rows"][0][0], "acme-corp");
    assert_eq!(
        answer["rows"][0][4], 2,
        "the denied request never reached a provider"
    );
    let resp = reqwest::get(gw.at("/v1/queries/unsafe_routes?threshold=abc"))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let resp = reqwest::get(gw.at("/v1/queries/nope")).await.unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["detail"]["queries"].as_array().unwrap().len(), 5);
}

/// The report's body without its "Generated <time> from <logs>" line, which differs by run.
fn report_body(html: &str) -> String {
    let start = html.find("<p class=meta>").unwrap();
    let end = start + html[start..].find("</p>").unwrap();
    format!("{}{}", &html[..start], &html[end..])
}

#[tokio::test(flavor = "multi_thread")]
async fn the_report_over_http_is_the_cli_report_and_needs_an_admin_key() {
    let mut opts = Options::new(&policy_yaml());
    opts.extra_yaml = "auth:\n  api_keys:\n    - {key: acme-key-0123456789, tenants: [acme-corp]}\n    - {key: admin-key-0123456789, tenants: [\"*\"]}\n".into();
    let mut gw = Gateway::start(&opts);
    let client = reqwest::Client::new();
    for ns in ["demo", "tight"] {
        let resp = client
            .post(gw.at("/infer"))
            .bearer_auth("admin-key-0123456789")
            .json(&json!({"prompt": "hi", "tenant_id": "acme-corp", "feature_id": "summarize", "budget_namespace": ns}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success() || resp.status() == 402);
    }
    let resp = client
        .get(gw.at("/v1/report?threshold=0.03"))
        .bearer_auth("acme-key-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        403,
        "a tenant key does not see every tenant's spend"
    );
    let resp = client
        .get(gw.at("/v1/report?threshold=abc"))
        .bearer_auth("admin-key-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let resp = client
        .get(gw.at("/v1/report?threshold=0.03"))
        .bearer_auth("admin-key-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/html; charset=utf-8"
    );
    let served = resp.text().await.unwrap();
    gw.stop();

    let out = gw.dir.path().join("report.html");
    let status = llmscope_tests::llmscope()
        .args(["report", "--threshold", "0.03", "--out"])
        .arg(&out)
        .arg("--telemetry")
        .arg(&gw.telemetry)
        .arg("--decisions")
        .arg(&gw.decisions)
        .status()
        .unwrap();
    assert!(status.success());
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(served.contains("Budget pressure per namespace") && served.contains("tight"));
    assert_eq!(report_body(&served), report_body(&written));
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_endpoint_prices_the_request_and_reports_each_rules_aggregates() {
    let mut gw = Gateway::start(&Options::new(&policy_yaml()));
    let (s, served) = post(&gw.at("/infer"), json!({"prompt": "Summarize this document", "tenant_id": "acme-corp", "feature_id": "summarize", "budget_namespace": "demo"})).await;
    assert_eq!(s, 200);
    let url = gw.at("/v1/snapshot?tenant_id=acme-corp&feature_id=summarize&budget_namespace=demo&route_name=%2Fanswer-routed&model_tier=expensive&tokens_in=100");
    let snap: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(snap["namespace"], "demo");
    assert_eq!(snap["request"]["model"], "gpt-4o");
    assert!(
        close_f(
            &snap["request"]["estimated_cost_usd"],
            (100.0 * 2.5 + 500.0 * 10.0) / 1e6
        ),
        "{snap}"
    );
    assert_eq!(
        snap["request"]["tiers"][0]["tier"], "cheap",
        "cheapest first"
    );
    let rules = snap["rules"].as_array().unwrap();
    assert_eq!(
        rules
            .iter()
            .map(|r| r["rule_id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        [
            "demo-hourly-cap",
            "demo-route-preference",
            "demo-cost-anomaly"
        ]
    );
    // The served request's actual cost is in the hourly window (from the ledger or DuckDB).
    let spent = &rules[0]["snapshot"]["values"][0];
    assert_eq!(spent["key"], "window_cost_usd");
    let (t, _) = gw.stop();
    assert!(t.success());
    let cost = read_jsonl(&gw.telemetry)[0]["cost_usd"].as_f64().unwrap();
    assert!(
        close_f(&spent["value"], cost),
        "{spent} vs {cost} ({served})"
    );
    assert_eq!(spent["samples"], 1);
}

fn close_f(v: &Value, expected: f64) -> bool {
    v.as_f64().is_some_and(|x| (x - expected).abs() < 1e-12)
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_endpoint_rejects_bad_parameters() {
    let gw = Gateway::start(&Options::new(&policy_yaml()));
    let resp = reqwest::get(gw.at("/v1/snapshot?tokens_in=x&colour=red"))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let body: Value = resp.json().await.unwrap();
    let fields: Vec<&str> = body["detail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["tenant_id", "tokens_in", "colour"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn edge_calls_need_an_edge_key_and_name_what_is_wrong() {
    let mut opts = Options::new(&policy_yaml());
    opts.extra_yaml = "auth:\n  api_keys:\n    - {key: acme-key-0123456789, tenants: [acme-corp]}\n    - {key: admin-key-0123456789, tenants: [\"*\"]}\n    - {key: edge-key-0123456789, kind: edge, tenants: [\"*\"]}\n".into();
    let gw = Gateway::start(&opts);
    let client = reqwest::Client::new();
    let call = |key: Option<&'static str>, body: Value| {
        let mut req = client.post(gw.at("/v1/edge/context")).json(&body);
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let relay = resp.headers().contains_key("x-llmscope-client-error");
            (
                status,
                relay,
                resp.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let good = json!({"request_id": "req-edge-1", "path": "/infer",
                      "body": {"prompt": "hi", "tenant_id": "acme-corp"}, "aggregates": []});
    assert_eq!(call(None, good.clone()).await.0, 401);
    assert_eq!(
        call(Some("acme-key-0123456789"), good.clone()).await.0,
        403,
        "a tenant key is not enough"
    );
    let (status, _, body) = call(Some("admin-key-0123456789"), good.clone()).await;
    assert_eq!(status, 403, "a `*` client key is not an edge key: {body}");
    assert_eq!(body["error"], "wrong_key_kind", "{body}");
    let (status, relay, body) = call(Some("edge-key-0123456789"), good).await;
    assert_eq!((status, relay), (200, false), "{body}");
    assert_eq!(body["request"]["request_id"], "req-edge-1");
    assert_eq!(body["request"]["tenant_id"], "acme-corp");
    assert_eq!(body["tier_models"]["cheap"], "gpt-4o-mini");

    // The filter's own mistakes: 400, not relayed to the client.
    let (status, relay, body) = call(
        Some("edge-key-0123456789"),
        json!({"request_id": "bad id!", "body": {"prompt": "hi", "tenant_id": "a"}}),
    )
    .await;
    assert_eq!((status, relay), (400, false));
    assert!(
        body["detail"].as_str().unwrap().contains("request_id"),
        "{body}"
    );
    let (status, _, body) = call(
        Some("edge-key-0123456789"),
        json!({"body": {}, "aggregates": [{"key": "k", "metric": "cost_usd", "aggregation": "sum", "scope": [], "window": {"rolling_seconds": 60}, "include_in_flight": true, "extra": 1}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["detail"].as_str().unwrap().contains("aggregates[0]"),
        "{body}"
    );

    // The client's mistakes: relayed as the host would answer them.
    let (status, relay, body) = call(
        Some("edge-key-0123456789"),
        json!({"body": {"prompt": "hi"}}),
    )
    .await;
    assert_eq!((status, relay), (422, true));
    assert_eq!(body["detail"][0]["field"], "tenant_id");
    let (status, relay, body) = call(
        Some("edge-key-0123456789"),
        json!({"body": {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}], "metadata": {"tenant_id": "acme-corp"}}}),
    )
    .await;
    assert_eq!((status, relay), (422, true));
    assert_eq!(body["error"]["code"], "model_not_found");
}

/// `GET /v1/budgets` (and `llmscope budgets`): what each budget has spent, holds in flight and
/// has left, per scope value, as its rule sees it; a tenant key sees its own tenant's rows.
#[tokio::test(flavor = "multi_thread")]
async fn budgets_show_spent_and_remaining_per_scope_and_tenant_keys_see_their_own() {
    let policy = r#"version: "budgets"
namespaces:
  default:
    rules:
      - {id: per-tenant, primitive: budget_threshold, period: hourly, window: calendar, limit_usd: 1.0, action: deny, scope: [budget_namespace, tenant]}
      - {id: shared, primitive: budget_threshold, period: daily, limit_usd: 5.0, action: deny}
  other:
    rules:
      - {id: other-cap, primitive: budget_threshold, period: daily, limit_usd: 2.0, action: deny}
"#;
    let mut opts = Options::new(policy);
    opts.extra_yaml = "auth:\n  api_keys:\n    - {key: acme-key-0123456789, tenants: [acme]}\n    - {key: admin-key-0123456789, tenants: [\"*\"]}\n".into();
    let gw = Gateway::start(&opts);
    let client = reqwest::Client::new();
    for tenant in ["acme", "acme", "globex"] {
        let resp = client
            .post(gw.at("/infer"))
            .bearer_auth("admin-key-0123456789")
            .json(&json!({"prompt": "Summarize this document", "tenant_id": tenant}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
    }
    let spent_by = |tenant: &str| -> f64 {
        read_jsonl(&gw.telemetry)
            .iter()
            .filter(|l| tenant.is_empty() || l["tenant_id"] == tenant)
            .map(|l| l["cost_usd"].as_f64().unwrap())
            .sum()
    };
    let get = |key: &'static str| {
        let req = client.get(gw.at("/v1/budgets")).bearer_auth(key);
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            resp.json::<Value>().await.unwrap()
        }
    };
    let all = get("admin-key-0123456789").await;
    let rows = all["budgets"].as_array().unwrap();
    let row = |rule: &str, tenant: Option<&str>| {
        rows.iter()
            .find(|r| r["rule_id"] == rule && tenant.is_none_or(|t| r["scope"]["tenant"] == t))
            .unwrap_or_else(|| panic!("no {rule} {tenant:?} row: {all}"))
    };
    // `other`'s cap has the same shape as `shared` (one aggregate for both), but governs
    // namespace `other`, where nothing was spent: no row.
    assert_eq!(rows.len(), 3, "{all}");
    for (tenant, n) in [("acme", 2.0), ("globex", 1.0)] {
        let r = row("per-tenant", Some(tenant));
        let spent = r["spent_usd"].as_f64().unwrap() + r["in_flight_usd"].as_f64().unwrap();
        assert!((spent - spent_by(tenant)).abs() < 1e-9, "{tenant}: {r}");
        assert!(spent > 0.0 && n > 0.0);
        assert!(
            (r["remaining_usd"].as_f64().unwrap() - (1.0 - spent)).abs() < 1e-9,
            "{r}"
        );
        assert!(
            r["resets_at"].as_str().unwrap().ends_with(":00:00.000Z"),
            "calendar hour: {r}"
        );
        assert_eq!(r["scope"]["budget_namespace"], "default");
    }
    let shared = row("shared", None);
    assert!(
        (shared["spent_usd"].as_f64().unwrap() - spent_by("")).abs() < 1e-9,
        "{shared}"
    );
    assert!(shared["resets_at"].is_null(), "rolling: {shared}");
    assert!(shared["percent_used"].as_f64().unwrap() > 0.0);

    // The same figures as the five questions over the same logs.
    let answer: Value = client
        .get(gw.at("/v1/queries/cost_by_tenant_and_feature"))
        .bearer_auth("admin-key-0123456789")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let by_query = |tenant: &str| -> f64 {
        answer["rows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| tenant.is_empty() || r[0] == tenant)
            .map(|r| r[2].as_f64().unwrap())
            .sum()
    };
    for tenant in ["acme", "globex"] {
        let r = row("per-tenant", Some(tenant));
        let spent = r["spent_usd"].as_f64().unwrap() + r["in_flight_usd"].as_f64().unwrap();
        assert!(
            (spent - by_query(tenant)).abs() < 1e-9,
            "{tenant}: {r} vs {answer}"
        );
    }
    assert!((shared["spent_usd"].as_f64().unwrap() - by_query("")).abs() < 1e-9);

    // A tenant key: its own tenant's rows of budgets kept per tenant, nothing else.
    let own = get("acme-key-0123456789").await;
    let own = own["budgets"].as_array().unwrap();
    assert_eq!(own.len(), 1, "{own:?}");
    assert_eq!(own[0]["scope"]["tenant"], "acme");

    // The CLI asks the same endpoint.
    let out = llmscope_tests::llmscope()
        .args([
            "budgets",
            "--url",
            &gw.url,
            "--api-key-env",
            "LLMSCOPE_TEST_BUDGETS_KEY",
        ])
        .env("LLMSCOPE_TEST_BUDGETS_KEY", "acme-key-0123456789")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("rule"), "{table}");
    assert!(
        table.contains("default/per-tenant") && table.contains("tenant=acme"),
        "{table}"
    );
    assert!(!table.contains("globex"), "{table}");
}

/// A chat parameter the gateway would neither price nor send on is refused by name, before
/// anything is priced or dispatched: nothing a client asks for is dropped silently.
#[tokio::test(flavor = "multi_thread")]
async fn chat_parameters_the_gateway_does_not_honour_are_refused_by_name() {
    let gw = Gateway::start(&Options::new(&policy_yaml()));
    let user = json!({"role": "user", "content": "hi"});
    for (extra, param) in [
        (json!({"service_tier": "priority"}), "service_tier"),
        (json!({"audio": {"voice": "alloy"}}), "audio"),
        (json!({"functions": []}), "functions"),
        (json!({"web_search_options": {}}), "web_search_options"),
        (json!({"tools": [{"type": "web_search"}]}), "tools[0].type"),
        (json!({"n": 2, "stream": true}), "n"),
        (json!({"logprobs": true, "stream": true}), "logprobs"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}),
            "messages[0].content[0]",
        ),
        (
            json!({"messages": [user.clone(), {"role": "assistant", "content": "x", "audio": {"id": "a"}}]}),
            "messages[1].audio",
        ),
    ] {
        let mut body = json!({"model": "cheap", "messages": [user.clone()]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let resp = reqwest::Client::new()
            .post(gw.at("/v1/chat/completions"))
            .header("x-llmscope-tenant-id", "acme-corp")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 422, "{param}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{v}");
        assert_eq!(v["error"]["code"], "unsupported_parameter", "{v}");
    }
    assert!(
        read_jsonl(&gw.telemetry).is_empty(),
        "nothing priced or sent"
    );
}

/// `GET /v1/models` lists what a chat body's `model` may say for a route: its tiers, then
/// their models with their providers; an unknown route is a 404 naming the known ones.
#[tokio::test(flavor = "multi_thread")]
async fn the_models_list_names_the_routes_tiers_and_models() {
    let gw = Gateway::start(&Options::new(&policy_yaml()));
    let v: Value = reqwest::get(gw.at("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["cheap", "expensive", "gpt-4o-mini", "gpt-4o"]);
    assert_eq!(v["data"][2]["owned_by"], "mock");
    assert_eq!(v["data"][0]["llmscope"]["model"], "gpt-4o-mini");
    let resp = reqwest::Client::new()
        .get(gw.at("/v1/models"))
        .header("x-llmscope-route", "/nowhere")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert!(v.to_string().contains("/answer-routed"), "{v}");
}
