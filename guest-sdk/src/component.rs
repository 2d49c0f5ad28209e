//! The component glue (wasm32 only): the generated `wit-bindgen` bindings for
//! `llmscope:policy/policy-plugin` and an adapter that implements the generated export trait for
//! any [`Policy`]. Policy crates reach this only through [`export_policy!`](crate::export_policy).

use std::marker::PhantomData;

use crate::types as sdk;
use crate::Policy;

wit_bindgen::generate!({
    path: "../wit",
    world: "policy-plugin",
    pub_export_macro: true,
    export_macro_name: "export_component",
    runtime_path: "::llmscope_sdk::__private::wit_bindgen::rt",
});

use exports::llmscope::policy::policy::Guest;
use llmscope::policy::types as wit;

/// Implements the component's exports for the policy `P`.
pub struct Adapter<P>(PhantomData<P>);

impl<P: Policy> Guest for Adapter<P> {
    fn describe() -> wit::Info {
        let info = crate::info::<P>();
        wit::Info {
            name: info.name,
            version: info.version,
            description: info.description,
        }
    }

    fn configure(settings: String) -> Result<Vec<wit::Aggregate>, String> {
        crate::configure::<P>(&settings)
            .map(|aggs| aggs.into_iter().map(aggregate_to_wit).collect())
    }

    fn evaluate(
        settings: String,
        request: wit::RequestContext,
        snapshot: wit::Snapshot,
    ) -> Result<wit::Verdict, String> {
        let request = request_from_wit(request);
        let snapshot = sdk::Snapshot {
            taken_at_unix_ms: snapshot.taken_at_unix_ms,
            values: snapshot
                .values
                .into_iter()
                .map(|v| sdk::AggregateValue {
                    key: v.key,
                    value: v.value,
                    samples: v.samples,
                })
                .collect(),
        };
        crate::evaluate::<P>(&settings, &request, &snapshot).map(verdict_to_wit)
    }
}

fn request_from_wit(r: wit::RequestContext) -> sdk::RequestContext {
    sdk::RequestContext {
        request_id: r.request_id,
        tenant_id: r.tenant_id,
        caller_id: r.caller_id,
        feature_id: r.feature_id,
        experiment_id: r.experiment_id,
        budget_namespace: r.budget_namespace,
        route_name: r.route_name,
        requested_tier: r.requested_tier,
        model: r.model,
        estimated_tokens_in: r.estimated_tokens_in,
        estimated_tokens_out: r.estimated_tokens_out,
        estimated_cost_usd: r.estimated_cost_usd,
        tiers: r
            .tiers
            .into_iter()
            .map(|t| sdk::TierEstimate {
                tier: t.tier,
                model: t.model,
                estimated_cost_usd: t.estimated_cost_usd,
            })
            .collect(),
        unix_time_ms: r.unix_time_ms,
    }
}

fn aggregate_to_wit(a: sdk::Aggregate) -> wit::Aggregate {
    wit::Aggregate {
        key: a.key,
        metric: match a.metric {
            sdk::Metric::CostUsd => wit::Metric::CostUsd,
            sdk::Metric::TokensIn => wit::Metric::TokensIn,
            sdk::Metric::TokensOut => wit::Metric::TokensOut,
            sdk::Metric::Requests => wit::Metric::Requests,
            sdk::Metric::LatencyMs => wit::Metric::LatencyMs,
        },
        aggregation: match a.aggregation {
            sdk::Aggregation::Sum => wit::Aggregation::Sum,
            sdk::Aggregation::Avg => wit::Aggregation::Avg,
            sdk::Aggregation::Max => wit::Aggregation::Max,
            sdk::Aggregation::P95 => wit::Aggregation::P95,
            sdk::Aggregation::Count => wit::Aggregation::Count,
        },
        window: match a.window {
            sdk::Window::RollingSeconds(s) => wit::Window::RollingSeconds(s),
            sdk::Window::CalendarHour => wit::Window::CalendarHour,
            sdk::Window::CalendarDay => wit::Window::CalendarDay,
            sdk::Window::CalendarMonth => wit::Window::CalendarMonth,
        },
        scope: a
            .scope
            .into_iter()
            .map(|s| match s {
                sdk::Scope::Tenant => wit::Scope::Tenant,
                sdk::Scope::Feature => wit::Scope::Feature,
                sdk::Scope::Route => wit::Scope::Route,
                sdk::Scope::BudgetNamespace => wit::Scope::BudgetNamespace,
                sdk::Scope::Experiment => wit::Scope::Experiment,
                sdk::Scope::Model => wit::Scope::Model,
            })
            .collect(),
        include_in_flight: a.include_in_flight,
    }
}

fn verdict_to_wit(v: sdk::Verdict) -> wit::Verdict {
    wit::Verdict {
        decision: match v.decision {
            sdk::Decision::Allow => wit::Decision::Allow,
            sdk::Decision::Downgrade(tier) => wit::Decision::Downgrade(tier),
            sdk::Decision::Deny => wit::Decision::Deny,
        },
        reason: v.reason,
        alert: v.alert,
        facts: v.facts,
    }
}
