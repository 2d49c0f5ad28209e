//! Policies against history, on the real binary and a real gateway run: decision lines carry
//! provenance (each rule's component digest, settings hash and aggregate values), and
//! `llmscope policy explain` re-runs a logged request on the components and settings now in
//! place.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "integration tests: a failed unwrap or panic is a failed test"
)]

use std::collections::BTreeMap;

use llmscope_tests::gateway::{read_jsonl, Gateway, Options};
use llmscope_tests::{llmscope, policies_dir, seed_config};
use serde_json::{json, Value};

/// The seed's policy file plus a `tight` namespace whose hourly cap is below one request.
fn policy_yaml() -> String {
    let seed = std::fs::read_to_string(seed_config()).unwrap();
    format!(
        "{seed}\n  tight:\n    rules:\n      - id: \"tight-cap\"\n        primitive: budget_threshold\n        period: hourly\n        limit_usd: 0.0001\n        action: deny\n        deny_reason: \"Tight budget exceeded\"\n"
    )
}

async fn post(url: &str, body: Value) -> Value {
    let resp = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    resp.json().await.unwrap_or(Value::Null)
}

/// A stopped gateway's run: two allows, a downgrade and a deny, in that order. Returns the
/// gateway (its temp dir holds the logs) and the request ids by decision.
async fn recorded_run() -> (Gateway, BTreeMap<&'static str, String>) {
    let mut gw = Gateway::start(&Options::new(&policy_yaml()));
    let allow = json!({"prompt": "Summarize this document", "tenant_id": "acme-corp",
        "feature_id": "summarize", "budget_namespace": "demo", "route_name": "/conversation-turn"});
    let mut ids = BTreeMap::new();
    for (name, body) in [
        ("allow", allow.clone()),
        ("allow2", allow),
        (
            "downgrade",
            json!({"prompt": "Summarize this document", "tenant_id": "acme-corp",
                   "feature_id": "summarize", "budget_namespace": "demo", "model_tier": "expensive"}),
        ),
        (
            "deny",
            json!({"prompt": "Summarize this document", "tenant_id": "acme-corp", "budget_namespace": "tight"}),
        ),
    ] {
        let answer = post(&gw.at("/infer"), body).await;
        let id = answer["request_id"]
            .as_str()
            .or_else(|| answer["error"]["request_id"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{name}: no request id in {answer}"));
        ids.insert(name, id);
    }
    let (status, stderr) = gw.stop();
    assert!(status.success(), "{stderr}");
    (gw, ids)
}

fn decision<'a>(lines: &'a [Value], id: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["request_id"] == id)
        .unwrap_or_else(|| panic!("no decision line for {id}"))
}

fn sha256_by_primitive() -> BTreeMap<String, String> {
    let out = llmscope()
        .args(["policy", "list", "--format", "json", "--policies-dir"])
        .arg(policies_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                r["sha256"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn decision_lines_carry_digests_settings_hashes_and_aggregate_values() {
    let (gw, ids) = recorded_run().await;
    let decisions = read_jsonl(&gw.decisions);
    let telemetry = read_jsonl(&gw.telemetry);
    let digests = sha256_by_primitive();
    assert_eq!(decision(&decisions, &ids["allow"])["decision"], "allow");
    assert_eq!(
        decision(&decisions, &ids["downgrade"])["decision"],
        "downgrade"
    );
    assert_eq!(decision(&decisions, &ids["deny"])["decision"], "deny");

    let mut demo_spend_before = 0.0;
    for line in &decisions {
        let rules = line["rules"].as_array().unwrap();
        assert!(!rules.is_empty(), "{line}");
        for rule in rules {
            let primitive = rule["primitive"].as_str().unwrap();
            assert_eq!(
                rule["component_sha256"].as_str(),
                Some(digests[primitive].as_str()),
                "{rule}"
            );
            let settings = rule["settings_sha256"].as_str().unwrap();
            assert_eq!(settings.len(), 16, "{rule}");
            assert!(settings.bytes().all(|b| b.is_ascii_hexdigit()), "{rule}");
        }
        // The request context the rules saw that the line holds nowhere else.
        let input = &line["policy_input"];
        assert_eq!(input["estimated_tokens_out"], 500, "{line}");
        assert!(input["estimated_tokens_in"].as_u64().unwrap() > 0, "{line}");
        let tiers: Vec<&str> = input["tiers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["tier"].as_str().unwrap())
            .collect();
        assert_eq!(tiers, ["cheap", "expensive"], "{line}");
        let model = if line["requested_model_tier"] == "expensive" {
            "gpt-4o"
        } else {
            "gpt-4o-mini"
        };
        assert_eq!(input["model"], model, "{line}");

        // The budget rule was given the namespace's spend so far: every earlier demo request
        // (each one settled before the next was sent).
        if line["budget_namespace"] == "demo" {
            let cap = rules
                .iter()
                .find(|r| r["rule_id"] == "demo-hourly-cap")
                .unwrap();
            let given = &cap["aggregates"]["window_cost_usd"];
            let value = given["value"].as_f64().unwrap();
            assert!(
                (value - demo_spend_before).abs() < 1e-12,
                "{given} vs {demo_spend_before}"
            );
            let id = line["request_id"].as_str().unwrap();
            let spent = telemetry.iter().find(|t| t["request_id"] == id).unwrap()["cost_usd"]
                .as_f64()
                .unwrap();
            demo_spend_before += spent;
            let anomaly = rules
                .iter()
                .find(|r| r["rule_id"] == "demo-cost-anomaly")
                .unwrap();
            assert!(
                anomaly["aggregates"].get("baseline_avg_cost_usd").is_some(),
                "{anomaly}"
            );
            let preference = rules
                .iter()
                .find(|r| r["rule_id"] == "demo-route-preference")
                .unwrap();
            assert!(
                preference.get("aggregates").is_none(),
                "declares none: {preference}"
            );
        }
    }
    let deny = decision(&decisions, &ids["deny"]);
    assert_eq!(
        deny["rules"][0]["aggregates"]["window_cost_usd"],
        json!({"value": 0.0, "samples": 0}),
        "{deny}"
    );

    // The questions still read these logs, every line ingested.
    let out = llmscope()
        .args([
            "query",
            "budget_pressure_by_namespace",
            "--format",
            "json",
            "--telemetry",
        ])
        .arg(&gw.telemetry)
        .arg("--decisions")
        .arg(&gw.decisions)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("malformed"), "{stderr}");
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(answer.to_string().contains("tight"), "{answer}");
}

/// `policy explain` on the real binary: (exit code, stdout, stderr).
fn explain(args: &[&std::ffi::OsStr]) -> (Option<i32>, String, String) {
    let out = llmscope()
        .args(["policy", "explain"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_says_same_for_a_run_and_names_a_settings_change() {
    let (gw, ids) = recorded_run().await;
    let logs = gw.decisions.parent().unwrap().to_owned();
    let gateway_config = gw.dir.path().join("llmscope.yaml");
    for name in ["allow", "downgrade", "deny"] {
        // Flags naming each input.
        let (code, stdout, stderr) = explain(&[
            ids[name].as_ref(),
            "--config".as_ref(),
            gw.policy_file.as_os_str(),
            "--logs".as_ref(),
            logs.as_os_str(),
            "--policies".as_ref(),
            policies_dir().as_os_str(),
        ]);
        assert_eq!(code, Some(0), "{name}: {stdout}{stderr}");
        assert!(stdout.trim_end().ends_with("same"), "{name}: {stdout}");
        // Everything from the gateway's configuration.
        let (code, stdout, stderr) = explain(&[
            ids[name].as_ref(),
            "--gateway-config".as_ref(),
            gateway_config.as_os_str(),
            "--format".as_ref(),
            "json".as_ref(),
        ]);
        assert_eq!(code, Some(0), "{name}: {stdout}{stderr}");
        let e: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(e["same"], true, "{e}");
        assert_eq!(e["logged_decision"], name, "{e}");
        assert!(e["rules"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "same"));
    }

    // Raise the deciding rule's cap: the deny would now be an allow, and explain says why.
    let edited = policy_yaml().replace("limit_usd: 0.0001", "limit_usd: 5.0");
    std::fs::write(&gw.policy_file, edited).unwrap();
    let (code, stdout, stderr) = explain(&[
        ids["deny"].as_ref(),
        "--gateway-config".as_ref(),
        gateway_config.as_os_str(),
        "--format".as_ref(),
        "json".as_ref(),
    ]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let e: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(e["same"], false);
    assert_eq!(e["decision_now"], "allow", "{e}");
    let rule = &e["rules"][0];
    assert_eq!(rule["rule_id"], "tight-cap");
    assert_eq!(rule["status"], "differs");
    let fields: Vec<&str> = rule["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert!(fields.contains(&"settings_sha256"), "{rule}");
    assert!(!fields.contains(&"component_sha256"), "{rule}");
    let decision = rule["differences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["field"] == "decision")
        .unwrap();
    assert_eq!(decision["logged"], "deny");
    assert_eq!(decision["now"], "allow");
    // The table names it too.
    let (code, table, _) = explain(&[
        ids["deny"].as_ref(),
        "--gateway-config".as_ref(),
        gateway_config.as_os_str(),
    ]);
    assert_eq!(code, Some(1));
    assert!(
        table.contains("settings_sha256") && table.contains("differs"),
        "{table}"
    );

    // A rule added since is reported as such; the untouched allow stays the same.
    let added = format!(
        "{}      - id: \"tight-extra\"\n        primitive: route_preference\n        prefer_tier: cheap\n",
        policy_yaml()
    );
    std::fs::write(&gw.policy_file, added).unwrap();
    let (code, stdout, _) = explain(&[
        ids["deny"].as_ref(),
        "--gateway-config".as_ref(),
        gateway_config.as_os_str(),
        "--format".as_ref(),
        "json".as_ref(),
    ]);
    assert_eq!(code, Some(1), "{stdout}");
    let e: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(e["rules"][1]["rule_id"], "tight-extra", "{e}");
    assert_eq!(e["rules"][1]["status"], "added", "{e}");
    let (code, _, _) = explain(&[
        ids["allow"].as_ref(),
        "--gateway-config".as_ref(),
        gateway_config.as_os_str(),
    ]);
    assert_eq!(code, Some(0));

    // Unknown request: exit 2 and a message naming the id and the log searched.
    let (code, _, stderr) = explain(&[
        "no-such-request".as_ref(),
        "--gateway-config".as_ref(),
        gateway_config.as_os_str(),
    ]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("request no-such-request not found in")
            && stderr.contains("policy_decisions.jsonl"),
        "{stderr}"
    );
}

/// The seed plus a `capped` namespace whose daily cap `limit` the run below crosses.
fn capped_yaml(limit: &str) -> String {
    format!(
        "{}\n  capped:\n    rules:\n      - id: \"capped-daily\"\n        primitive: budget_threshold\n        period: daily\n        limit_usd: {limit}\n        action: deny\n",
        std::fs::read_to_string(seed_config()).unwrap()
    )
}

fn replay(args: &[&std::ffi::OsStr]) -> Value {
    let out = llmscope()
        .args(["policy", "replay", "--format", "json"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_of_a_run_with_its_own_config_reproduces_it_and_a_stricter_cap_denies_more() {
    let mut gw = Gateway::start(&Options::new(&capped_yaml("0.0015")));
    for i in 0..40 {
        let body = if i % 4 == 0 {
            json!({"prompt": "Summarize this document", "tenant_id": "acme-corp",
                   "feature_id": "summarize", "budget_namespace": "demo", "model_tier": "expensive"})
        } else {
            json!({"prompt": format!("Question {i}: what is the capital of France?"),
                   "tenant_id": if i % 3 == 0 { "globex" } else { "acme-corp" },
                   "feature_id": "chat", "budget_namespace": "capped", "model_tier": "cheap"})
        };
        post(&gw.at("/infer"), body).await;
    }
    let (status, stderr) = gw.stop();
    assert!(status.success(), "{stderr}");
    let decisions = read_jsonl(&gw.decisions);
    let denied = decisions.iter().filter(|d| d["decision"] == "deny").count();
    assert!(
        denied > 0 && denied < 30,
        "the cap is crossed mid-run: {denied} denials"
    );
    let gateway_config = gw.dir.path().join("llmscope.yaml");

    let same = replay(&[
        "--config".as_ref(),
        gw.policy_file.as_os_str(),
        "--gateway-config".as_ref(),
        gateway_config.as_os_str(),
    ]);
    assert_eq!(same["replayed"], 40, "{same}");
    // The logs time requests to the millisecond: a request that settled in the same
    // millisecond as the next one's decision may be taken as still in flight then. Such a
    // difference is named by the in-flight bound; any other fails.
    let rate = same["match_rate"].as_f64().unwrap();
    let mismatches = same["mismatches"].as_array().unwrap();
    let unexplained: Vec<&Value> = mismatches
        .iter()
        .filter(|m| m["in_flight"].as_u64().unwrap_or(0) == 0)
        .collect();
    assert!(
        rate >= 0.95 && unexplained.is_empty(),
        "match rate {rate}: {}",
        same["mismatches"]
    );
    if rate < 0.99 {
        println!(
            "match rate {rate}, every difference explained by requests possibly in flight: {}",
            same["mismatches"]
        );
    }
    let capped = same["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "capped")
        .unwrap()
        .clone();
    assert_eq!(capped["logged"], capped["candidate"], "{capped}");
    assert_eq!(capped["logged"]["deny"], denied as u64);

    // A stricter candidate cap: more denials in that namespace, none elsewhere.
    let candidate = gw.dir.path().join("candidate.yaml");
    std::fs::write(&candidate, capped_yaml("0.0008")).unwrap();
    let stricter = replay(&[
        "--config".as_ref(),
        candidate.as_os_str(),
        "--logs".as_ref(),
        gw.decisions.parent().unwrap().as_os_str(),
        "--policies".as_ref(),
        policies_dir().as_os_str(),
    ]);
    let capped = stricter["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "capped")
        .unwrap();
    let (was, now) = (
        capped["logged"]["deny"].as_u64().unwrap(),
        capped["candidate"]["deny"].as_u64().unwrap(),
    );
    assert!(now > was, "{capped}");
    assert_eq!(capped["changed"].as_u64().unwrap(), now - was, "{capped}");
    assert!(
        capped["denied_usd_candidate"].as_f64().unwrap()
            > capped["denied_usd_logged"].as_f64().unwrap()
    );
    let rule = stricter["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule_id"] == "capped-daily")
        .unwrap();
    assert_eq!(rule["candidate"]["deny"].as_u64().unwrap(), now, "{rule}");
    assert_eq!(stricter["tenants"][0]["name"], "acme-corp", "{stricter}");
    let demo = stricter["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "demo")
        .unwrap();
    assert_eq!(demo["changed"], 0, "{demo}");
    assert!(demo["moved_usd_logged"].as_f64().unwrap() > 0.0, "{demo}");
}

/// Concurrent clients on a slow provider: requests decide while others are in flight. The
/// replay's differences are the ones in-flight reservations explain: every changed decision
/// had requests of its namespace in flight at its decision time.
#[tokio::test(flavor = "multi_thread")]
async fn replay_differences_under_concurrency_are_explained_by_requests_in_flight() {
    let mut opts = Options::new(&capped_yaml("0.0015"));
    opts.mock_latency_ms = 40;
    let mut gw = Gateway::start(&opts);
    let url = gw.at("/infer");
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..8 {
                post(
                    &url,
                    json!({"prompt": format!("Question {worker}-{i}: what is the capital of France?"),
                           "tenant_id": "acme-corp", "feature_id": "chat",
                           "budget_namespace": "capped", "model_tier": "cheap"}),
                )
                .await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (status, stderr) = gw.stop();
    assert!(status.success(), "{stderr}");
    // Each dispatched line says how long its reservation was held: past the provider's answer
    // (the replay takes a request as in flight until then).
    for t in read_jsonl(&gw.telemetry) {
        if t["status"] == "denied" {
            assert!(t.get("held_ms").is_none(), "{t}");
        } else {
            let held = t["held_ms"]
                .as_f64()
                .unwrap_or_else(|| panic!("no held_ms: {t}"));
            assert!(held >= t["latency_ms"].as_f64().unwrap(), "{t}");
        }
    }
    let report = replay(&[
        "--config".as_ref(),
        gw.policy_file.as_os_str(),
        "--gateway-config".as_ref(),
        gw.dir.path().join("llmscope.yaml").as_os_str(),
    ]);
    assert_eq!(report["replayed"], 64, "{report}");
    eprintln!(
        "match rate under concurrency: {} ({} of 64)",
        report["match_rate"], report["matched"]
    );
    for m in report["mismatches"].as_array().unwrap() {
        assert!(m["in_flight"].as_u64().unwrap() > 0, "unexplained: {m}");
    }
}
