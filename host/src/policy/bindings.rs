//! The one place the host touches generated component bindings. Everything else in the host works
//! with the SDK's plain types; this module converts at the boundary.

use llmscope_sdk::types as sdk;

wasmtime::component::bindgen!({
    path: "../wit",
    world: "policy-plugin",
});

use self::llmscope::policy::types as wit;
pub(crate) use PolicyPlugin as Plugin;
/// A request context in the generated form, converted once per evaluation and shared by the
/// namespace's rules.
pub(crate) type WitRequest = wit::RequestContext;
pub(crate) use PolicyPluginPre as PluginPre;

pub(crate) use llmscope_sdk::{POLICY_INTERFACE, TYPES_INTERFACE};

pub(crate) fn info_from_wit(i: wit::Info) -> sdk::Info {
    sdk::Info {
        name: i.name,
        version: i.version,
        description: i.description,
    }
}

pub(crate) fn request_to_wit(r: &sdk::RequestContext) -> wit::RequestContext {
    wit::RequestContext {
        request_id: r.request_id.clone(),
        tenant_id: r.tenant_id.clone(),
        caller_id: r.caller_id.clone(),
        feature_id: r.feature_id.clone(),
        experiment_id: r.experiment_id.clone(),
        budget_namespace: r.budget_namespace.clone(),
        route_name: r.route_name.clone(),
        requested_tier: r.requested_tier.clone(),
        model: r.model.clone(),
        estimated_tokens_in: r.estimated_tokens_in,
        estimated_tokens_out: r.estimated_tokens_out,
        estimated_cost_usd: r.estimated_cost_usd,
        tiers: r
            .tiers
            .iter()
            .map(|t| wit::TierEstimate {
                tier: t.tier.clone(),
                model: t.model.clone(),
                estimated_cost_usd: t.estimated_cost_usd,
            })
            .collect(),
        unix_time_ms: r.unix_time_ms,
    }
}

pub(crate) fn snapshot_to_wit(s: &sdk::Snapshot) -> wit::Snapshot {
    wit::Snapshot {
        taken_at_unix_ms: s.taken_at_unix_ms,
        values: s
            .values
            .iter()
            .map(|v| wit::AggregateValue {
                key: v.key.clone(),
                value: v.value,
                samples: v.samples,
            })
            .collect(),
    }
}

pub(crate) fn verdict_from_wit(v: wit::Verdict) -> sdk::Verdict {
    sdk::Verdict {
        decision: match v.decision {
            wit::Decision::Allow => sdk::Decision::Allow,
            wit::Decision::Downgrade(tier) => sdk::Decision::Downgrade(tier),
            wit::Decision::Deny => sdk::Decision::Deny,
        },
        reason: v.reason,
        alert: v.alert,
        facts: v.facts,
    }
}

pub(crate) fn aggregate_from_wit(a: wit::Aggregate) -> sdk::Aggregate {
    sdk::Aggregate {
        key: a.key,
        metric: match a.metric {
            wit::Metric::CostUsd => sdk::Metric::CostUsd,
            wit::Metric::TokensIn => sdk::Metric::TokensIn,
            wit::Metric::TokensOut => sdk::Metric::TokensOut,
            wit::Metric::Requests => sdk::Metric::Requests,
            wit::Metric::LatencyMs => sdk::Metric::LatencyMs,
        },
        aggregation: match a.aggregation {
            wit::Aggregation::Sum => sdk::Aggregation::Sum,
            wit::Aggregation::Avg => sdk::Aggregation::Avg,
            wit::Aggregation::Max => sdk::Aggregation::Max,
            wit::Aggregation::P95 => sdk::Aggregation::P95,
            wit::Aggregation::Count => sdk::Aggregation::Count,
        },
        window: match a.window {
            wit::Window::RollingSeconds(s) => sdk::Window::RollingSeconds(s),
            wit::Window::CalendarHour => sdk::Window::CalendarHour,
            wit::Window::CalendarDay => sdk::Window::CalendarDay,
            wit::Window::CalendarMonth => sdk::Window::CalendarMonth,
        },
        scope: a
            .scope
            .into_iter()
            .map(|s| match s {
                wit::Scope::Tenant => sdk::Scope::Tenant,
                wit::Scope::Feature => sdk::Scope::Feature,
                wit::Scope::Route => sdk::Scope::Route,
                wit::Scope::BudgetNamespace => sdk::Scope::BudgetNamespace,
                wit::Scope::Experiment => sdk::Scope::Experiment,
                wit::Scope::Model => sdk::Scope::Model,
            })
            .collect(),
        include_in_flight: a.include_in_flight,
    }
}
