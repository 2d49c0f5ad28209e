//! The host policy runtime with the real built components: the seed configuration, every bad
//! configuration the loader must refuse, and hostile components that must be contained.
#![allow(
    clippy::unwrap_used,
    reason = "integration tests: a failed unwrap is a failed test"
)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use llmscope::policy::{
    DecisionKind, Limits, NoSnapshots, PolicyRuntime, PolicySet, StaticSnapshots, StaticValue,
};
use llmscope_sdk::testing::request;
use llmscope_sdk::types::RequestContext;
use llmscope_tests::{
    builtin, builtin_policies, hostile, policies_dir, policies_with, seed_config,
};

/// The rule deadline in these tests. It is wall-clock time: on two shared cores a rule that
/// allocates megabytes (the memory bomb, the huge reason) can take tens of milliseconds, so it
/// is far above any honest rule's time and the spinning rule still meets it quickly.
const DEADLINE: Duration = Duration::from_millis(1_000);

fn runtime() -> Arc<PolicyRuntime> {
    Arc::new(
        PolicyRuntime::new(Limits {
            deadline: DEADLINE,
            memory_bytes: 16 << 20,
            ..Limits::default()
        })
        .unwrap(),
    )
}

fn seed() -> PolicySet {
    PolicySet::load(&seed_config(), &policies_dir(), &runtime()).unwrap()
}

fn snapshots(values: &[(&str, &str, f64, u64)]) -> StaticSnapshots {
    let mut s = StaticSnapshots::default();
    for (rule, key, value, samples) in values {
        s.rules.entry((*rule).to_owned()).or_default().insert(
            (*key).to_owned(),
            StaticValue {
                value: Some(*value),
                samples: *samples,
            },
        );
    }
    s
}

fn load_yaml(yaml: &str, dir: &Path) -> Result<PolicySet, String> {
    PolicySet::from_yaml(yaml, Path::new("test.yaml"), dir, &runtime()).map_err(|e| e.to_string())
}

#[test]
fn seed_config_loads_unchanged() {
    let text = std::fs::read_to_string(seed_config()).unwrap();
    let shared = llmscope_tests::root().join("../shared/seed/policy.yaml");
    if let Ok(original) = std::fs::read_to_string(shared) {
        assert_eq!(
            text, original,
            "examples/policy.yaml must be the seed file, byte for byte"
        );
    }
    let set = seed();
    assert_eq!(set.version(), "0.1.0");
    let ids: Vec<_> = set.rules().map(|r| r.id().to_owned()).collect();
    assert_eq!(
        ids,
        [
            "default-daily-cap",
            "demo-hourly-cap",
            "demo-route-preference",
            "demo-cost-anomaly"
        ]
    );
    let names: Vec<_> = set.components().map(|c| c.info().name.clone()).collect();
    assert_eq!(
        names,
        ["budget_threshold", "cost_anomaly", "route_preference"]
    );
}

#[test]
fn demo_namespace_downgrades_expensive_requests_and_alerts_on_anomalies() {
    let set = seed();
    let mut req = request();
    req.estimated_cost_usd = 0.008;
    let eval = set.evaluate(
        &req,
        &snapshots(&[
            ("demo-hourly-cap", "window_cost_usd", 0.42, 120),
            ("demo-cost-anomaly", "baseline_avg_cost_usd", 0.0009, 800),
        ]),
    );
    assert_eq!(eval.namespace.as_deref(), Some("demo"));
    assert_eq!(eval.decision, DecisionKind::Downgrade);
    assert_eq!(eval.downgrade_to.as_deref(), Some("cheap"));
    assert_eq!(eval.policy_id.as_deref(), Some("demo-route-preference"));
    assert_eq!(eval.primitive.as_deref(), Some("route_preference"));
    assert_eq!(eval.rules.len(), 3);
    assert_eq!(eval.alerts.len(), 1);
    assert!(
        eval.alerts[0].starts_with("demo-cost-anomaly: cost anomaly"),
        "{:?}",
        eval.alerts
    );
    assert_eq!(eval.fact("window_cost_usd"), Some(0.42));
    assert_eq!(eval.fact("window_limit_usd"), Some(1.0));
    assert!(eval.rules.iter().all(|r| r.error.is_none()));
}

#[test]
fn demo_namespace_denies_over_the_hourly_cap_even_when_downgrading() {
    let set = seed();
    let eval = set.evaluate(
        &request(),
        &snapshots(&[("demo-hourly-cap", "window_cost_usd", 0.9999, 4100)]),
    );
    assert_eq!(eval.decision, DecisionKind::Deny);
    assert_eq!(eval.policy_id.as_deref(), Some("demo-hourly-cap"));
    assert_eq!(
        eval.reason.as_deref(),
        Some("Hourly budget exceeded for demo namespace")
    );
    // Every rule still ran and was recorded; only the deny was applied.
    assert_eq!(eval.rules.iter().filter(|r| r.applied).count(), 1);
    assert_eq!(eval.rules[1].decision, DecisionKind::Downgrade);
}

#[test]
fn unknown_and_absent_namespaces_resolve_to_default() {
    let set = seed();
    for ns in ["marketing", ""] {
        let mut req = request();
        req.budget_namespace = ns.into();
        let eval = set.evaluate(
            &req,
            &snapshots(&[("default-daily-cap", "window_cost_usd", 9.999, 20000)]),
        );
        assert_eq!(
            eval.namespace.as_deref(),
            Some("default"),
            "namespace {ns:?}"
        );
        assert_eq!(eval.decision, DecisionKind::Downgrade);
        assert_eq!(eval.policy_id.as_deref(), Some("default-daily-cap"));
        let under = set.evaluate(
            &req,
            &snapshots(&[("default-daily-cap", "window_cost_usd", 1.0, 5)]),
        );
        assert_eq!(under.decision, DecisionKind::Allow);
    }
}

#[test]
fn no_default_namespace_allows() {
    let dir = builtin_policies();
    let set = load_yaml(
        "version: '1'\nnamespaces:\n  demo:\n    rules:\n      - {id: d, primitive: route_preference, prefer_tier: cheap}\n",
        dir.path(),
    )
    .unwrap();
    let mut req = request();
    req.budget_namespace = "other".into();
    let eval = set.evaluate(&req, &NoSnapshots);
    assert_eq!((eval.namespace, eval.decision), (None, DecisionKind::Allow));
}

#[test]
fn monitor_mode_records_but_never_acts() {
    let dir = builtin_policies();
    let set = load_yaml(
        "version: '1'\nnamespaces:\n  demo:\n    rules:\n      - {id: cap, primitive: budget_threshold, mode: monitor, period: hourly, limit_usd: 0.0001}\n",
        dir.path(),
    )
    .unwrap();
    let eval = set.evaluate(&request(), &NoSnapshots);
    assert_eq!(eval.decision, DecisionKind::Allow);
    assert_eq!(
        eval.rules[0].decision,
        DecisionKind::Deny,
        "the would-be decision is recorded"
    );
    assert!(!eval.rules[0].applied);
}

// ---- bad configurations -------------------------------------------------------------------

#[test]
fn unknown_primitive_names_the_rule_and_lists_components() {
    let dir = builtin_policies();
    let err = load_yaml("version: '1'\nnamespaces:\n  demo:\n    rules:\n      - {id: r1, primitive: budget_thresold}\n", dir.path())
        .unwrap_err();
    assert!(err.contains("test.yaml"), "{err}");
    assert!(
        err.contains("namespaces.demo.rules[0] (id \"r1\")"),
        "{err}"
    );
    assert!(err.contains("unknown primitive `budget_thresold`"), "{err}");
    assert!(
        err.contains("budget_threshold, cost_anomaly, route_preference"),
        "{err}"
    );
}

#[test]
fn primitive_names_cannot_escape_the_directory() {
    let dir = builtin_policies();
    let err = load_yaml("version: '1'\nnamespaces:\n  d:\n    rules:\n      - {id: r, primitive: ../budget_threshold}\n", dir.path())
        .unwrap_err();
    assert!(err.contains("not a valid primitive name"), "{err}");
}

#[test]
fn corrupt_wasm_is_rejected_with_its_path() {
    let dir = builtin_policies();
    std::fs::write(
        dir.path().join("budget_threshold.wasm"),
        b"\0asm\x0d\0\x01\0garbage",
    )
    .unwrap();
    let err = load_yaml(
        "version: '1'\nnamespaces:\n  d:\n    rules:\n      - {id: cap, primitive: budget_threshold, period: daily, limit_usd: 1}\n",
        dir.path(),
    )
    .unwrap_err();
    assert!(
        err.contains("budget_threshold.wasm is not a valid WebAssembly component"),
        "{err}"
    );
    assert!(err.contains("(id \"cap\")"), "{err}");
}

#[test]
fn a_plain_core_module_is_not_a_policy() {
    let dir = builtin_policies();
    // A valid core wasm module (magic + version, no sections): valid wasm, not a component.
    std::fs::write(dir.path().join("cost_anomaly.wasm"), b"\0asm\x01\0\0\0").unwrap();
    let err = load_yaml(
        "version: '1'\nnamespaces:\n  d:\n    rules:\n      - {id: a, primitive: cost_anomaly, baseline_window_hours: 1, threshold_multiplier: 2}\n",
        dir.path(),
    )
    .unwrap_err();
    assert!(
        err.contains("cost_anomaly.wasm is not a valid WebAssembly component"),
        "{err}"
    );
}

#[test]
fn component_that_describes_itself_differently_is_rejected() {
    let route = builtin("route_preference");
    let dir = policies_with(&[("budget_threshold", &route)]);
    let err = load_yaml(
        "version: '1'\nnamespaces:\n  d:\n    rules:\n      - {id: cap, primitive: budget_threshold, period: daily, limit_usd: 1}\n",
        dir.path(),
    )
    .unwrap_err();
    assert!(
        err.contains("describes itself as `route_preference`"),
        "{err}"
    );
}

#[test]
fn oversized_wasm_is_refused() {
    let dir = builtin_policies();
    let rt = Arc::new(
        PolicyRuntime::new(Limits {
            max_component_bytes: 1024,
            ..Limits::default()
        })
        .unwrap(),
    );
    let err = PolicySet::from_yaml(
        "version: '1'\nnamespaces:\n  d:\n    rules:\n      - {id: p, primitive: route_preference, prefer_tier: cheap}\n",
        Path::new("t.yaml"),
        dir.path(),
        &rt,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("over the 1024-byte limit"), "{err}");
}

#[test]
fn invalid_settings_name_the_field() {
    let dir = builtin_policies();
    let err = load_yaml(
        "version: '1'\nnamespaces:\n  demo:\n    rules:\n      - {id: cap, primitive: budget_threshold, period: hourly, limit_usd: -5}\n      - {id: cap2, primitive: budget_threshold, period: fortnightly, limit_usd: 5}\n",
        dir.path(),
    )
    .unwrap_err();
    assert!(
        err.contains("2 problems"),
        "all problems are collected: {err}"
    );
    assert!(err.contains("(id \"cap\"): invalid settings for budget_threshold: limit_usd: must be a non-negative"), "{err}");
    assert!(err.contains("(id \"cap2\"): invalid settings for budget_threshold: settings.period: unknown variant `fortnightly`"), "{err}");
}

#[test]
fn unknown_fields_are_rejected_at_every_level() {
    let dir = builtin_policies();
    let err = load_yaml("version: '1'\nnamespace: {}\n", dir.path()).unwrap_err();
    assert!(err.contains("unknown field `namespace`"), "{err}");
    let err = load_yaml(
        "version: '1'\nnamespaces:\n  d:\n    rule: []\n",
        dir.path(),
    )
    .unwrap_err();
    assert!(
        err.contains("namespaces.d") && err.contains("unknown field `rule`"),
        "{err}"
    );
    let err = load_yaml(
        "version: '1'\nnamespaces:\n  d:\n    rules:\n      - {id: p, primitive: route_preference, prefer_tier: cheap, prefered: x}\n",
        dir.path(),
    )
    .unwrap_err();
    assert!(
        err.contains("(id \"p\")") && err.contains("unknown field `prefered`"),
        "{err}"
    );
    let err = load_yaml(
        "version: '1'\nnamespaces:\n  d:\n    rules:\n      - {id: p, primitive: route_preference, prefer_tier: cheap, mode: shadow}\n",
        dir.path(),
    )
    .unwrap_err();
    assert!(err.contains("unknown variant `shadow`"), "{err}");
}

#[test]
fn duplicate_rule_ids_are_rejected() {
    let dir = builtin_policies();
    let err = load_yaml(
        "version: '1'\nnamespaces:\n  a:\n    rules:\n      - {id: same, primitive: route_preference, prefer_tier: cheap}\n  b:\n    rules:\n      - {id: same, primitive: route_preference, prefer_tier: cheap}\n",
        dir.path(),
    )
    .unwrap_err();
    assert!(err.contains("namespaces.b.rules[0] (id \"same\"): id: duplicate rule id, already used at namespaces.a.rules[0]"), "{err}");
}

#[test]
fn malformed_yaml_and_missing_file_are_reported() {
    let dir = builtin_policies();
    let err = load_yaml("version: '1'\nnamespaces: [unclosed\n", dir.path()).unwrap_err();
    assert!(err.contains("test.yaml") && err.contains("line"), "{err}");
    let err = PolicySet::load(
        Path::new("/nonexistent/policy.yaml"),
        dir.path(),
        &runtime(),
    )
    .err()
    .unwrap();
    assert!(
        err.to_string()
            .contains("cannot read policy config /nonexistent/policy.yaml"),
        "{err}"
    );
}

// ---- hostile components ------------------------------------------------------------------

fn hostile_set(rules: &str) -> PolicySet {
    let h = hostile(false);
    let route = builtin("route_preference");
    let dir = policies_with(&[("hostile", &h), ("route_preference", &route)]);
    load_yaml(
        &format!("version: '1'\nnamespaces:\n  demo:\n    rules:\n{rules}"),
        dir.path(),
    )
    .unwrap()
}

fn with_healthy_rule(bad: &str) -> String {
    format!("      - {{id: bad, primitive: hostile, {bad}}}\n      - {{id: good, primitive: route_preference, prefer_tier: cheap}}\n")
}

#[test]
fn hostile_components_are_contained_and_the_host_keeps_serving() {
    let cases = [
        ("loop", "deadline of 1s exceeded"),
        ("memory", "memory cap of 16777216 bytes exceeded"),
        ("recursion", "stack overflow"),
        (
            "panic",
            "unreachable instruction (a panic or abort in the policy)",
        ),
        ("clock", "unreachable instruction"),
        (
            "error",
            "policy error: hostile policy returned an error on purpose",
        ),
    ];
    for (behaviour, expected) in cases {
        for (failure_mode, contained_as) in [
            ("closed", DecisionKind::Deny),
            ("open", DecisionKind::Downgrade),
        ] {
            let set = hostile_set(&with_healthy_rule(&format!(
                "behaviour: {behaviour}, failure_mode: {failure_mode}"
            )));
            // Twice: the second call must not reuse a trapped instance and must fail the same way.
            for round in 0..2 {
                let eval = set.evaluate(&request(), &NoSnapshots);
                let bad = &eval.rules[0];
                let error = bad.error.as_deref().unwrap_or_default();
                assert!(
                    error.contains(expected),
                    "{behaviour}/{failure_mode} round {round}: {error}"
                );
                assert_eq!(eval.decision, contained_as, "{behaviour}/{failure_mode}");
                // The healthy rule after it was evaluated correctly.
                assert_eq!(
                    eval.rules[1].decision,
                    DecisionKind::Downgrade,
                    "{behaviour}"
                );
                assert_eq!(eval.rules[1].error, None);
                if failure_mode == "closed" {
                    assert_eq!(eval.policy_id.as_deref(), Some("bad"));
                    assert_eq!(
                        eval.reason.as_deref(),
                        Some("policy rule bad failed and fails closed")
                    );
                }
            }
        }
    }
}

#[test]
fn a_looping_policy_meets_its_deadline_after_the_ticker_went_idle() {
    // The epoch ticker sleeps once no policy code has run for 100 ms; a call must wake it,
    // or a looping policy would never be stopped (the test would hang).
    let set = hostile_set(&with_healthy_rule("behaviour: loop"));
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        let eval = set.evaluate(&request(), &NoSnapshots);
        let error = eval.rules[0].error.as_deref().unwrap_or_default();
        assert!(error.contains("deadline of 1s exceeded"), "{error}");
    }
}

#[test]
fn huge_reasons_are_truncated() {
    let set = hostile_set("      - {id: flood, primitive: hostile, behaviour: huge_reason}\n");
    let eval = set.evaluate(&request(), &NoSnapshots);
    assert_eq!(eval.decision, DecisionKind::Deny);
    let reason = eval.reason.unwrap();
    assert!(reason.len() < 5000, "reason kept at {} bytes", reason.len());
    assert!(
        reason.ends_with("more bytes truncated]"),
        "{}",
        &reason[reason.len() - 60..]
    );
}

#[test]
fn a_healthy_instance_is_reused_after_a_trap_elsewhere() {
    let set = hostile_set(&with_healthy_rule("behaviour: panic, failure_mode: open"));
    let mut req: RequestContext = request();
    for i in 0..50 {
        req.request_id = format!("req-{i}");
        let eval = set.evaluate(&req, &NoSnapshots);
        assert_eq!(eval.decision, DecisionKind::Downgrade, "call {i}");
    }
}

#[test]
fn hostile_configure_fails_the_load_with_the_cause() {
    let h = hostile(false);
    let dir = policies_with(&[("hostile", &h)]);
    for (behaviour, expected) in [
        ("loop", "deadline of 1s exceeded"),
        ("error", "hostile policy returned an error"),
    ] {
        let err = load_yaml(
            &format!("version: '1'\nnamespaces:\n  d:\n    rules:\n      - {{id: h, primitive: hostile, behaviour: {behaviour}, phase: configure}}\n"),
            dir.path(),
        )
        .unwrap_err();
        assert!(
            err.contains("(id \"h\"): invalid settings for hostile") && err.contains(expected),
            "{err}"
        );
    }
}

#[test]
fn components_importing_wasi_are_rejected_at_load() {
    let wasi = hostile(true);
    let dir = policies_with(&[("hostile", &wasi)]);
    let err = load_yaml(
        "version: '1'\nnamespaces:\n  d:\n    rules:\n      - {id: h, primitive: hostile, behaviour: allow}\n",
        dir.path(),
    )
    .unwrap_err();
    assert!(err.contains("hostile.wasm imports wasi:"), "{err}");
    assert!(
        err.contains("a policy may import only llmscope:policy/types@0.1.0"),
        "{err}"
    );
}
