//! The real `llmscope` binary: `policy check`, `policy list`, `policy eval`, the drop-in path
//! for a policy written outside the core, and `logs verify` on crafted log files.
#![allow(
    clippy::unwrap_used,
    reason = "integration tests: a failed unwrap is a failed test"
)]

use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;

use llmscope_tests::{builtin_policies, component, llmscope, policies_dir, root, seed_config};

/// `llmscope policy <args...> --policies-dir <policies>`.
fn policy(args: &[&OsStr], policies: &Path) -> Output {
    llmscope()
        .arg("policy")
        .args(args)
        .arg("--policies-dir")
        .arg(policies)
        .output()
        .unwrap()
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_seed_config() {
    let out = policy(&[os("check"), seed_config().as_os_str()], &policies_dir());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("ok — 2 namespace(s), 4 rule(s), 3 component(s)"),
        "{stdout}"
    );
}

#[test]
fn check_rejects_a_bad_config_with_exit_1_and_the_problems() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "version: '1'\nnamespaces:\n  demo:\n    rules:\n      - {id: cap, primitive: budget_threshold, period: hourly}\n      - {id: x, primitive: nope}\n",
    )
    .unwrap();
    let out = policy(&[os("check"), bad.as_os_str()], &policies_dir());
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bad.yaml is invalid (2 problems)"),
        "{stderr}"
    );
    assert!(stderr.contains("(id \"cap\"): invalid settings for budget_threshold: settings: missing field `limit_usd`"), "{stderr}");
    assert!(
        stderr.contains("(id \"x\"): primitive: unknown primitive `nope`"),
        "{stderr}"
    );
}

#[test]
fn list_shows_every_component_with_its_digest() {
    let out = policy(&[os("list"), os("--format"), os("json")], &policies_dir());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["budget_threshold", "cost_anomaly", "route_preference"]
    );
    for row in &rows {
        assert_eq!(row["sha256"].as_str().unwrap().len(), 64);
        assert_eq!(row["version"], "0.1.0");
        assert!(!row["description"].as_str().unwrap().is_empty());
    }
}

#[test]
fn list_reports_a_corrupt_component_and_fails() {
    let dir = builtin_policies();
    std::fs::write(dir.path().join("broken.wasm"), b"not wasm at all").unwrap();
    let out = policy(&[os("list")], dir.path());
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout.contains("broken.wasm") && stdout.contains("not a valid WebAssembly component"),
        "{stdout}"
    );
    assert!(
        stdout.contains("budget_threshold"),
        "healthy components are still listed: {stdout}"
    );
}

#[test]
fn eval_prints_the_combined_verdict_and_every_rule() {
    let req = root().join("examples/requests/02-demo-over-budget.json");
    let snap = root().join("examples/requests/02-demo-over-budget.snapshot.json");
    let out = policy(
        &[
            os("eval"),
            os("--config"),
            seed_config().as_os_str(),
            os("--request"),
            req.as_os_str(),
            os("--snapshot"),
            snap.as_os_str(),
        ],
        &policies_dir(),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["policy_id"], "demo-hourly-cap");
    assert_eq!(v["reason"], "Hourly budget exceeded for demo namespace");
    assert_eq!(v["rules"].as_array().unwrap().len(), 3);
    assert_eq!(v["rules"][0]["facts"]["window_cost_usd"], 0.9999);
}

#[test]
fn eval_with_namespace_override_and_bad_request_file() {
    let req = root().join("examples/requests/01-demo-expensive.json");
    let out = policy(
        &[
            os("eval"),
            os("--namespace"),
            os("nope"),
            os("--config"),
            seed_config().as_os_str(),
            os("--request"),
            req.as_os_str(),
        ],
        &policies_dir(),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["namespace"], "default");
    assert_eq!(v["decision"], "allow");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("req.json");
    std::fs::write(&bad, r#"{"request_id": "r", "tenant_id": 5}"#).unwrap();
    let out = policy(
        &[
            os("eval"),
            os("--config"),
            seed_config().as_os_str(),
            os("--request"),
            bad.as_os_str(),
        ],
        &policies_dir(),
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("req.json: at tenant_id: invalid type: integer `5`, expected a string"),
        "{stderr}"
    );
}

/// The drop-in path: a policy built with the SDK alone, copied into the policies directory and
/// named in YAML, works with no host change.
#[test]
fn drop_in_policy_needs_no_host_change() {
    let dir = builtin_policies();
    let built = component("examples/policies/max-request-cost/max_request_cost.wasm");
    std::fs::copy(&built, dir.path().join("max_request_cost.wasm")).unwrap();
    let config = dir.path().join("policy.yaml");
    std::fs::write(
        &config,
        "version: \"0.1.0\"\nnamespaces:\n  demo:\n    rules:\n      - id: \"demo-max-request\"\n        primitive: max_request_cost\n        max_usd: 0.005\n",
    )
    .unwrap();
    let out = policy(&[os("check"), config.as_os_str()], dir.path());
    assert!(out.status.success(), "{}", text(&out).1);

    let req = root().join("examples/requests/01-demo-expensive.json"); // estimated at $0.008
    let out = policy(
        &[
            os("eval"),
            os("--config"),
            config.as_os_str(),
            os("--request"),
            req.as_os_str(),
        ],
        dir.path(),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["policy_id"], "demo-max-request");
    assert_eq!(v["primitive"], "max_request_cost");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("exceeds the per-request maximum $0.005000"),
        "{stdout}"
    );
}

/// A telemetry line shaped as the gateway writes it (see `tests/gateway.rs`).
fn telemetry_line(id: &str, status: &str, cost: f64) -> String {
    let denied = status == "denied";
    let line = serde_json::json!({
        "schema_version": "1.0", "timestamp": "2025-11-24T16:00:00.123Z", "request_id": id,
        "tenant_id": "acme-corp", "caller_id": "svc-a", "feature_id": "summarize",
        "use_case": "summarize", "experiment_id": "exp-1", "budget_namespace": "demo",
        "audit_tags": {"feature_id": "summarize", "experiment_id": "exp-1", "budget_namespace": "demo"},
        "route_name": "/conversation-turn", "route": "/conversation-turn",
        "requested_model_tier": "cheap", "model_tier": "cheap", "provider": "mock",
        "model": "gpt-4o-mini", "tokens_in": 42, "tokens_out": if denied { 0 } else { 120 },
        "tokens_total": if denied { 42 } else { 162 }, "estimated_cost_usd": 0.0003063,
        "cost_usd": cost, "cost_source": if denied { "none" } else { "tokenizer" },
        "latency_ms": if denied { 0.0 } else { 12.5 }, "status": status,
        "finish_reason": if denied { None } else { Some("stop") }, "is_fallback": false,
        "fallback_reason": null, "error_type": null,
        "policy_decision": if denied { "deny" } else { "allow" },
        "policy_id": if denied { Some("tight-cap") } else { None },
    });
    format!("{line}\n")
}

/// A decision line shaped as the gateway writes it.
fn decision_line(id: &str, decision: &str, estimate: f64) -> String {
    let line = serde_json::json!({
        "timestamp": "2025-11-24T16:00:00.123Z", "request_id": id, "tenant_id": "acme-corp",
        "caller_id": "svc-a", "feature_id": "summarize", "experiment_id": "exp-1",
        "budget_namespace": "demo", "route_name": "/conversation-turn",
        "requested_model_tier": "cheap", "effective_model_tier": "cheap",
        "primitive": "budget_threshold", "decision": decision,
        "reason": if decision == "deny" { Some("Tight budget exceeded") } else { None },
        "policy_id": "tight-cap", "estimated_cost_usd": estimate, "latency_ms": 0.042,
        "window_cost_usd": 0.0, "window_limit_usd": 1.0, "policy_version": "0.1.0",
        "alerts": [], "rules": [],
    });
    format!("{line}\n")
}

/// `llmscope logs verify` on the given file contents, with `extra` arguments.
fn verify(telemetry: &str, decisions: &str, extra: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (t, d) = (
        dir.path().join("telemetry.jsonl"),
        dir.path().join("policy_decisions.jsonl"),
    );
    std::fs::write(&t, telemetry).unwrap();
    std::fs::write(&d, decisions).unwrap();
    llmscope()
        .args(["logs", "verify", "--telemetry"])
        .arg(&t)
        .arg("--decisions")
        .arg(&d)
        .args(extra)
        .output()
        .unwrap()
}

fn consistent_logs() -> (String, String) {
    (
        [
            telemetry_line("r1", "ok", 0.0000783),
            telemetry_line("r2", "denied", 0.0),
            telemetry_line("r3", "error", 0.0),
        ]
        .concat(),
        [
            decision_line("r1", "allow", 0.0003063),
            decision_line("r2", "deny", 0.0003063),
            decision_line("r3", "downgrade", 0.0003063),
        ]
        .concat(),
    )
}

#[test]
fn logs_verify_passes_a_consistent_pair_with_a_summary() {
    let (t, d) = consistent_logs();
    let out = verify(&t, &d, &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("telemetry.jsonl: 3 lines, 3 records")
            && stdout.contains("policy_decisions.jsonl: 3 lines, 3 records")
            && stdout.contains("ok 1, error 1, denied 1, cancelled 0, unanswered 0")
            && stdout.contains("0.000078 USD")
            && stdout.ends_with("problems    0\nconsistent\n"),
        "{stdout}"
    );

    let out = verify(&t, &d, &["--format", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["consistent"], true);
    assert_eq!(v["telemetry"]["records"], 3);
    assert_eq!(v["requests_by_status"]["denied"], 1);
    assert_eq!(v["problem_count"], 0);
}

#[test]
fn logs_verify_fails_on_a_duplicate_telemetry_line_naming_the_request() {
    let (t, d) = consistent_logs();
    let t = format!("{t}{}", telemetry_line("r2", "denied", 0.0));
    let out = verify(&t, &d, &[]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "telemetry.jsonl:4 (byte {}): duplicate request_id \"r2\" (first at line 2)",
            t.len() - telemetry_line("r2", "denied", 0.0).len()
        )) && stdout.ends_with("INCONSISTENT: 1 problems\n"),
        "{stdout}"
    );
}

#[test]
fn logs_verify_fails_on_an_unanswered_decision_unless_allowed() {
    let (t, d) = consistent_logs();
    let d = format!("{d}{}", decision_line("r4", "allow", 0.25));
    let out = verify(&t, &d, &[]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("policy_decisions.jsonl:4 (byte ")
            && stdout.contains("request_id \"r4\" has no telemetry line: unanswered")
            && stdout.contains("1 decisions without telemetry, estimate 0.250000 USD"),
        "{stdout}"
    );

    let out = verify(&t, &d, &["--allow-unanswered", "--format", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["unanswered"],
        serde_json::json!({"count": 1, "estimate_usd": 0.25, "allowed": true})
    );
}

#[test]
fn logs_verify_fails_on_a_malformed_line_naming_file_and_line() {
    let (t, d) = consistent_logs();
    let first = decision_line("r1", "allow", 0.0003063);
    let d = d.replacen("\"decision\":\"deny\"", "\"decision\":7", 1);
    let out = verify(&t, &d, &[]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "policy_decisions.jsonl:2 (byte {}): not a decision record: invalid type: integer `7`",
            first.len()
        )),
        "{stdout}"
    );
    // The denied telemetry line has now lost its decision too.
    assert!(
        stdout.contains("telemetry.jsonl:2 (byte ") && stdout.contains("\"r2\" has no decision"),
        "{stdout}"
    );
}

#[test]
fn logs_verify_reports_a_missing_file_and_usage_errors_apart() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.jsonl");
    let out = llmscope()
        .args(["logs", "verify", "--telemetry"])
        .arg(&missing)
        .arg("--decisions")
        .arg(&missing)
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot open telemetry log {}", missing.display())),
        "{stderr}"
    );
    let out = llmscope()
        .args(["logs", "verify", "--format", "yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
