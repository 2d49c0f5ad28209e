//! Plain Rust mirrors of the types in `wit/policy.wit`.
//!
//! Policies, the native test harness and the llmscope host all use these types; inside a
//! component the SDK converts them to and from the generated bindings, so policy code never sees
//! the ABI. Field and variant names serialize in `snake_case`, which is the form fixture files use.

use serde::{Deserialize, Serialize};

/// What a request will cost at one tier of its route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierEstimate {
    /// Tier name, e.g. `cheap`.
    pub tier: String,
    /// Model the tier maps to on the request's route.
    pub model: String,
    /// Estimated cost of the request at this tier, in US dollars.
    pub estimated_cost_usd: f64,
}

/// Everything the host knows about a request before it is dispatched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestContext {
    /// Unique request id.
    pub request_id: String,
    /// Tenant the request is billed to.
    pub tenant_id: String,
    /// Calling service or user.
    #[serde(default)]
    pub caller_id: Option<String>,
    /// Product feature the request serves.
    #[serde(default)]
    pub feature_id: Option<String>,
    /// Experiment or variant id.
    #[serde(default)]
    pub experiment_id: Option<String>,
    /// Resolved budget namespace.
    pub budget_namespace: String,
    /// Route name, e.g. `/answer-routed`.
    pub route_name: String,
    /// Tier the client asked for.
    pub requested_tier: String,
    /// Model of the requested tier.
    pub model: String,
    /// Input tokens counted by the host's tokenizer.
    pub estimated_tokens_in: u32,
    /// Output tokens the host expects.
    pub estimated_tokens_out: u32,
    /// Estimated cost at the requested tier, in US dollars.
    pub estimated_cost_usd: f64,
    /// Every tier of the route, priced for this request, cheapest first.
    #[serde(default)]
    pub tiers: Vec<TierEstimate>,
    /// Request time, milliseconds since the Unix epoch (UTC).
    pub unix_time_ms: u64,
}

impl RequestContext {
    /// The priced estimate for `tier` on this request's route, if the route offers it.
    pub fn tier(&self, tier: &str) -> Option<&TierEstimate> {
        self.tiers.iter().find(|t| t.tier == tier)
    }
}

/// A per-request quantity recorded in telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Cost in US dollars.
    CostUsd,
    /// Input tokens.
    TokensIn,
    /// Output tokens.
    TokensOut,
    /// One per request.
    Requests,
    /// Provider latency in milliseconds.
    LatencyMs,
}

/// How a metric's values in a window are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Sum.
    Sum,
    /// Arithmetic mean.
    Avg,
    /// Maximum.
    Max,
    /// 95th percentile.
    P95,
    /// Number of values.
    Count,
}

/// A dimension an aggregate is filtered to, using the current request's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Tenant id.
    Tenant,
    /// Feature id.
    Feature,
    /// Route name.
    Route,
    /// Budget namespace.
    BudgetNamespace,
    /// Experiment id.
    Experiment,
    /// Model.
    Model,
}

/// Time window of an aggregate, relative to the request time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    /// The last N seconds.
    RollingSeconds(u64),
    /// The current UTC calendar hour.
    CalendarHour,
    /// The current UTC calendar day.
    CalendarDay,
    /// The current UTC calendar month.
    CalendarMonth,
}

/// An aggregate a rule asks the host to compute.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aggregate {
    /// Name of the aggregate within the rule.
    pub key: String,
    /// What is measured.
    pub metric: Metric,
    /// How values are combined.
    pub aggregation: Aggregation,
    /// Which window.
    pub window: Window,
    /// Which dimensions must match the request.
    pub scope: Vec<Scope>,
    /// Whether committed-but-unrecorded costs of other requests are added.
    pub include_in_flight: bool,
}

/// The value of one declared aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateValue {
    /// Key from the declaration.
    pub key: String,
    /// The value, `None` when the window holds no samples.
    pub value: Option<f64>,
    /// Number of contributing samples.
    pub samples: u64,
}

/// Values of a rule's aggregates for the current request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// When the values were computed, ms since the Unix epoch.
    #[serde(default)]
    pub taken_at_unix_ms: u64,
    /// One entry per declared aggregate.
    #[serde(default)]
    pub values: Vec<AggregateValue>,
}

impl Snapshot {
    /// The entry for `key`, if the host supplied one.
    pub fn get(&self, key: &str) -> Option<&AggregateValue> {
        self.values.iter().find(|v| v.key == key)
    }

    /// The value for `key`; `None` when absent or when the window held no samples.
    pub fn value(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(|v| v.value)
    }

    /// The sample count for `key` (0 when absent).
    pub fn samples(&self, key: &str) -> u64 {
        self.get(key).map_or(0, |v| v.samples)
    }
}

/// What a rule wants done with a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Let it through.
    Allow,
    /// Dispatch at the named cheaper tier.
    Downgrade(String),
    /// Refuse it.
    Deny,
}

/// A rule's answer for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verdict {
    /// The decision.
    pub decision: Decision,
    /// Why, in words.
    #[serde(default)]
    pub reason: Option<String>,
    /// An alert to record (never blocks).
    #[serde(default)]
    pub alert: Option<String>,
    /// Named numbers explaining the verdict.
    #[serde(default)]
    pub facts: Vec<(String, f64)>,
}

impl Verdict {
    /// Allow, with no reason.
    pub fn allow() -> Self {
        Self {
            decision: Decision::Allow,
            reason: None,
            alert: None,
            facts: Vec::new(),
        }
    }

    /// Deny, with a reason shown to the client.
    pub fn deny(reason: impl Into<String>) -> Self {
        Self {
            decision: Decision::Deny,
            reason: Some(reason.into()),
            alert: None,
            facts: Vec::new(),
        }
    }

    /// Downgrade to `tier`, with a reason.
    pub fn downgrade(tier: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            decision: Decision::Downgrade(tier.into()),
            reason: Some(reason.into()),
            alert: None,
            facts: Vec::new(),
        }
    }

    /// Set the reason.
    #[must_use]
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Attach an alert.
    #[must_use]
    pub fn with_alert(mut self, alert: impl Into<String>) -> Self {
        self.alert = Some(alert.into());
        self
    }

    /// Attach a named fact.
    #[must_use]
    pub fn with_fact(mut self, name: impl Into<String>, value: f64) -> Self {
        self.facts.push((name.into(), value));
        self
    }

    /// The value of fact `name`, if present.
    pub fn fact(&self, name: &str) -> Option<f64> {
        self.facts.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// The verdict as hosts apply it to `request`: a downgrade to a tier the route does not
    /// offer is an error (the rule failed), a downgrade to the requested tier is an allow.
    pub fn checked(mut self, request: &RequestContext) -> Result<Self, String> {
        match &self.decision {
            Decision::Downgrade(tier)
                if !request.tiers.is_empty() && request.tier(tier).is_none() =>
            {
                Err(format!(
                    "invalid verdict: downgrade to `{tier}`, which route {} does not offer (tiers: {})",
                    request.route_name,
                    request
                        .tiers
                        .iter()
                        .map(|t| t.tier.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
            Decision::Downgrade(tier) if *tier == request.requested_tier => {
                self.decision = Decision::Allow;
                Ok(self)
            }
            _ => Ok(self),
        }
    }
}

/// Self-description of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// Primitive name, e.g. `budget_threshold`.
    pub name: String,
    /// Implementation version.
    pub version: String,
    /// One-line description.
    pub description: String,
}
