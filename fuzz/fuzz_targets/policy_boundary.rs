//! The policy boundary: arbitrary request contexts and snapshots (NaN, infinities, negative
//! costs, missing or extra aggregates, empty or unknown tiers, extreme times) and arbitrary
//! settings into every primitive, through the same entry points a component runs. A panic here
//! is a trap in production, so none is allowed.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use llmscope_sdk::types::{AggregateValue, RequestContext, Snapshot, TierEstimate};
use llmscope_sdk::Policy;

#[derive(Arbitrary, Debug)]
struct Input {
    tenant: String,
    feature: Option<String>,
    experiment: Option<String>,
    namespace: String,
    route: String,
    requested_tier: String,
    model: String,
    tokens_in: u32,
    tokens_out: u32,
    estimate: f64,
    tiers: Vec<(String, String, f64)>,
    unix_time_ms: u64,
    taken_at: u64,
    /// Values for the declared aggregates (by position), then extra unknown keys.
    values: Vec<(Option<f64>, u64)>,
    extra: Vec<(String, Option<f64>, u64)>,
    settings_choice: u8,
    settings_text: String,
}

const BUDGET: &[&str] = &[
    r#"{"period": "hourly", "limit_usd": 1.0, "action": "deny", "deny_reason": "over"}"#,
    r#"{"period": "daily", "window": "calendar", "limit_usd": 0.000001, "action": "downgrade", "downgrade_to_tier": "cheap", "scope": ["tenant", "feature", "model"]}"#,
    r#"{"period": "monthly", "limit_usd": 1e300, "action": "deny"}"#,
];
const ROUTE: &[&str] = &[
    r#"{"route_name": "/answer-routed", "prefer_tier": "cheap"}"#,
    r#"{"prefer_tier": "expensive"}"#,
];
const ANOMALY: &[&str] = &[
    r#"{"feature_id": "summarize", "baseline_window_hours": 24, "threshold_multiplier": 3.0, "action": "alert"}"#,
    r#"{"baseline_window_hours": 1, "threshold_multiplier": 0.0001, "action": "deny"}"#,
];
const MAX_COST: &[&str] = &[r#"{"max_usd": 0.01}"#, r#"{"max_usd": 1e-12}"#];

fn exercise<P: Policy>(input: &Input, choices: &[&str]) {
    // Arbitrary settings text must be refused cleanly, never panic.
    let _ = llmscope_sdk::configure::<P>(&input.settings_text);
    let settings = choices[usize::from(input.settings_choice) % choices.len()];
    let Ok(aggregates) = llmscope_sdk::configure::<P>(settings) else {
        return;
    };
    let mut values: Vec<AggregateValue> = aggregates
        .iter()
        .zip(input.values.iter().chain(std::iter::repeat(&(None, 0))))
        .map(|(a, (value, samples))| AggregateValue {
            key: a.key.clone(),
            value: *value,
            samples: *samples,
        })
        .collect();
    values.extend(input.extra.iter().map(|(k, v, s)| AggregateValue {
        key: k.clone(),
        value: *v,
        samples: *s,
    }));
    let request = RequestContext {
        request_id: "req-fuzz".into(),
        tenant_id: input.tenant.clone(),
        caller_id: None,
        feature_id: input.feature.clone(),
        experiment_id: input.experiment.clone(),
        budget_namespace: input.namespace.clone(),
        route_name: input.route.clone(),
        requested_tier: input.requested_tier.clone(),
        model: input.model.clone(),
        estimated_tokens_in: input.tokens_in,
        estimated_tokens_out: input.tokens_out,
        estimated_cost_usd: input.estimate,
        tiers: input
            .tiers
            .iter()
            .map(|(tier, model, cost)| TierEstimate {
                tier: tier.clone(),
                model: model.clone(),
                estimated_cost_usd: *cost,
            })
            .collect(),
        unix_time_ms: input.unix_time_ms,
    };
    let snapshot = Snapshot {
        taken_at_unix_ms: input.taken_at,
        values,
    };
    let _ = llmscope_sdk::evaluate::<P>(settings, &request, &snapshot);
}

fuzz_target!(|input: Input| {
    exercise::<budget_threshold::BudgetThreshold>(&input, BUDGET);
    exercise::<route_preference::RoutePreference>(&input, ROUTE);
    exercise::<cost_anomaly::CostAnomaly>(&input, ANOMALY);
    exercise::<max_request_cost::MaxRequestCost>(&input, MAX_COST);
});
