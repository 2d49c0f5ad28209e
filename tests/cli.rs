//! The real `llmscope` binary: `policy check`, `policy list`, `policy eval`, and the drop-in
//! path for a policy written outside the core.
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
