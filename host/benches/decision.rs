#![allow(
    clippy::print_stderr,
    reason = "a benchmark reports failures on stderr"
)]

//! One policy decision for the seed's `demo` namespace (3 rules), measured call by call:
//! wasm components with warm instances, wasm with a fresh instance per call, and the same three
//! policies compiled natively through the SDK harness. Prints p50 / p99 / p99.9 / mean.
//!
//! Run: `cargo xtask bench` (or `cargo bench -p llmscope --bench decision` after
//! `cargo xtask build-policies`).

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use budget_threshold::BudgetThreshold;
use cost_anomaly::CostAnomaly;
use llmscope::policy::{
    DecisionKind, Limits, PolicyRuntime, PolicySet, StaticSnapshots, StaticValue,
};
use llmscope_sdk::testing::{request, snapshot, Harness};
use llmscope_sdk::types::Decision;
use route_preference::RoutePreference;

const WARMUP: usize = 20_000;
const SAMPLES: usize = 200_000;

struct Stats {
    p50: f64,
    p99: f64,
    p999: f64,
    mean: f64,
}

fn measure(mut f: impl FnMut()) -> Stats {
    for _ in 0..WARMUP {
        f();
    }
    let mut ns: Vec<u64> = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let t = Instant::now();
        f();
        ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)] as f64 / 1000.0;
    Stats {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        mean: ns.iter().sum::<u64>() as f64 / ns.len() as f64 / 1000.0,
    }
}

fn row(name: &str, s: &Stats) {
    println!(
        "| {name:<44} | {:>8.2} | {:>8.2} | {:>8.2} | {:>8.2} |",
        s.p50, s.p99, s.p999, s.mean
    );
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = root.join("examples/policy.yaml");
    let policies = root.join("policies");

    let mut req = request();
    req.estimated_cost_usd = 0.008;
    let mut snaps = StaticSnapshots::default();
    snaps
        .rules
        .entry("demo-hourly-cap".into())
        .or_default()
        .insert(
            "window_cost_usd".into(),
            StaticValue {
                value: Some(0.42),
                samples: 120,
            },
        );
    snaps
        .rules
        .entry("demo-cost-anomaly".into())
        .or_default()
        .insert(
            "baseline_avg_cost_usd".into(),
            StaticValue {
                value: Some(0.0009),
                samples: 800,
            },
        );

    let load = |warm: usize| {
        let limits = Limits {
            warm_instances_per_rule: warm,
            ..Limits::default()
        };
        let rt = Arc::new(PolicyRuntime::new(limits).unwrap_or_else(|e| fail(&e.to_string())));
        PolicySet::load(&config, &policies, &rt)
            .unwrap_or_else(|e| fail(&format!("{e}\n(run `cargo xtask build-policies`)")))
    };

    let started = Instant::now();
    let warm_set = load(8);
    let cold_start = started.elapsed();
    let check = warm_set.evaluate(&req, &snaps);
    assert_eq!(
        check.decision,
        DecisionKind::Downgrade,
        "sanity: the demo request is downgraded"
    );
    assert_eq!(check.alerts.len(), 1, "sanity: the anomaly alert fires");

    println!("\nDecision latency, seed `demo` namespace (3 rules), {SAMPLES} samples after {WARMUP} warm-up, µs:\n");
    println!(
        "| {:<44} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "path", "p50", "p99", "p99.9", "mean"
    );
    println!(
        "|{:-<46}|{:->10}|{:->10}|{:->10}|{:->10}|",
        "", "", "", "", ""
    );

    let wasm = measure(|| {
        black_box(warm_set.evaluate(black_box(&req), &snaps));
    });
    row("wasm, warm instance pool (host path)", &wasm);

    let budget = Harness::<BudgetThreshold>::new(serde_json::json!({
        "period": "hourly", "limit_usd": 1.0, "action": "deny",
        "deny_reason": "Hourly budget exceeded for demo namespace"
    }))
    .unwrap_or_else(|e| fail(&e));
    let route = Harness::<RoutePreference>::new(
        serde_json::json!({"route_name": "/answer-routed", "prefer_tier": "cheap"}),
    )
    .unwrap_or_else(|e| fail(&e));
    let anomaly = Harness::<CostAnomaly>::new(serde_json::json!({
        "feature_id": "summarize", "baseline_window_hours": 24, "threshold_multiplier": 3.0, "action": "alert"
    }))
    .unwrap_or_else(|e| fail(&e));
    let budget_snap = snapshot(&[("window_cost_usd", Some(0.42), 120)]);
    let anomaly_snap = snapshot(&[("baseline_avg_cost_usd", Some(0.0009), 800)]);
    let empty = snapshot(&[]);
    let native = measure(|| {
        let a = budget
            .evaluate(black_box(&req), &budget_snap)
            .map(|v| v.decision);
        let b = route.evaluate(black_box(&req), &empty).map(|v| v.decision);
        let c = anomaly
            .evaluate(black_box(&req), &anomaly_snap)
            .map(|v| v.decision);
        let _ = black_box((a, b == Ok(Decision::Deny), c));
    });
    row("native, same 3 policies via the SDK harness", &native);

    let cold_set = load(0);
    let fresh = measure(|| {
        black_box(cold_set.evaluate(black_box(&req), &snaps));
    });
    row("wasm, fresh instance per call (no pool)", &fresh);

    println!(
        "\nwasm/native ratio at p50: {:.1}x, at p99: {:.1}x; goal p99 <= 20 µs, ratio <= 3x",
        wasm.p50 / native.p50,
        wasm.p99 / native.p99
    );
    println!(
        "load + compile + configure of the seed config (3 components, 4 rules): {:.1} ms",
        ms(cold_start)
    );
    println!(
        "\nbench-result wasm_p50_us={:.3} wasm_p99_us={:.3} native_p50_us={:.3} native_p99_us={:.3} fresh_p99_us={:.3} load_ms={:.1}",
        wasm.p50,
        wasm.p99,
        native.p50,
        native.p99,
        fresh.p99,
        ms(cold_start)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn fail(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(1)
}
