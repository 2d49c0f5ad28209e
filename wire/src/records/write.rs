//! The JSONL log records as the gateway writes them: `telemetry.jsonl` (one line per provider
//! call or denial) and `policy_decisions.jsonl` (one line per request). Field names are the
//! reference system's; other tools read them. The analytics engine reads them back as the rows
//! of [`super::read`]; the host's engine tests check that its table columns and the keys
//! written here agree.

use serde::{Deserialize, Serialize};

/// Version of the telemetry record layout.
pub const TELEMETRY_SCHEMA_VERSION: &str = "1.0";

/// `audit_tags` of a telemetry record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditTags {
    /// Feature id.
    pub feature_id: Option<String>,
    /// Experiment id.
    pub experiment_id: Option<String>,
    /// Budget namespace.
    pub budget_namespace: String,
}

/// One line of `telemetry.jsonl`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRecord {
    /// Layout version.
    pub schema_version: String,
    /// RFC 3339 UTC time the request arrived.
    pub timestamp: String,
    /// Request id.
    pub request_id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Caller.
    pub caller_id: Option<String>,
    /// Feature.
    pub feature_id: Option<String>,
    /// Same as `feature_id` (llmscope envelope name).
    pub use_case: Option<String>,
    /// Experiment.
    pub experiment_id: Option<String>,
    /// Resolved budget namespace.
    pub budget_namespace: String,
    /// Attribution tags.
    pub audit_tags: AuditTags,
    /// Route name.
    pub route_name: String,
    /// Same as `route_name`.
    pub route: String,
    /// Tier the client asked for.
    pub requested_model_tier: String,
    /// Tier actually used.
    pub model_tier: String,
    /// Provider that answered (or would have).
    pub provider: String,
    /// Model that answered (or would have).
    pub model: String,
    /// Input tokens (provider usage, else the estimate).
    pub tokens_in: u64,
    /// Output tokens.
    pub tokens_out: u64,
    /// Sum of both.
    pub tokens_total: u64,
    /// Estimate before dispatch, at the effective tier.
    pub estimated_cost_usd: f64,
    /// Actual cost (0 when denied or failed).
    pub cost_usd: f64,
    /// Where `cost_usd` comes from: `provider_usage` (the provider's reported usage),
    /// `tokenizer` (the provider reported none: our token counts), `estimate` (no answer to
    /// count from: timed-out attempts, or recovered after a crash), `none` (nothing spent).
    pub cost_source: String,
    /// Provider latency, ms (0 when not dispatched).
    pub latency_ms: f64,
    /// How long the request's reservation was held: from `timestamp` (its millisecond) to the
    /// writing of this line, ms with µs precision; the reservation turns into this line's
    /// cost right after. Absent on denials (nothing is held past the decision) and on lines
    /// written before this key existed. `llmscope policy replay` uses it to know which
    /// requests were still in flight when a later one was decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_ms: Option<f64>,
    /// `ok`; `denied` (by policy, never dispatched); `error` (every attempt failed);
    /// `cancelled` (the client left: recorded at the provider's usage if it answered);
    /// `unanswered` (written at start for a dispatched request the previous process never
    /// recorded — a crash — at its estimate).
    pub status: String,
    /// Provider finish reason (`stop`, `length`, ...).
    pub finish_reason: Option<String>,
    /// Whether a fallback model answered.
    pub is_fallback: bool,
    /// Why the primary model was not used.
    pub fallback_reason: Option<String>,
    /// Error class when status is `error`.
    pub error_type: Option<String>,
    /// `allow`, `downgrade` or `deny`.
    pub policy_decision: String,
    /// Deciding rule.
    pub policy_id: Option<String>,
    /// Part of `cost_usd` charged for provider attempts that timed out, at their estimate
    /// (the provider usually bills a call it was still answering).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timed_out_cost_usd: f64,
    /// Whether the answer was streamed to the client (absent: it was not).
    #[serde(default, skip_serializing_if = "is_false")]
    pub streamed: bool,
    /// The output tokens a stream was cut at because the provider streamed past the output
    /// its reservation covers (the final chunk then says `finish_reason: "length"`); absent
    /// when the stream was not cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_cut_at_tokens: Option<u64>,
    /// Whether the call was for embeddings (`/v1/embeddings`: priced at its input tokens,
    /// no output; absent: it was not).
    #[serde(default, skip_serializing_if = "is_false")]
    pub embeddings: bool,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

fn is_false(v: &bool) -> bool {
    !*v
}

impl TelemetryRecord {
    /// A record for `request`: its time, id, attribution, route, and requested tier and model
    /// (also as the tier used); the outcome fields are left for the caller.
    pub fn for_request(request: &llmscope_sdk::types::RequestContext) -> Self {
        Self {
            schema_version: TELEMETRY_SCHEMA_VERSION.into(),
            timestamp: rfc3339(request.unix_time_ms),
            request_id: request.request_id.clone(),
            tenant_id: request.tenant_id.clone(),
            caller_id: request.caller_id.clone(),
            feature_id: request.feature_id.clone(),
            use_case: request.feature_id.clone(),
            experiment_id: request.experiment_id.clone(),
            budget_namespace: request.budget_namespace.clone(),
            audit_tags: AuditTags {
                feature_id: request.feature_id.clone(),
                experiment_id: request.experiment_id.clone(),
                budget_namespace: request.budget_namespace.clone(),
            },
            route_name: request.route_name.clone(),
            route: request.route_name.clone(),
            requested_model_tier: request.requested_tier.clone(),
            model_tier: request.requested_tier.clone(),
            model: request.model.clone(),
            ..Self::default()
        }
    }
}

/// One rule's outcome inside a decision record.
pub type RuleRecord = llmscope_sdk::verdict::RuleOutcome;

/// One line of `policy_decisions.jsonl`. Borrows the evaluation's alerts and rule outcomes:
/// the record is encoded once and the evaluation still answers the client.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord<'a> {
    /// RFC 3339 UTC.
    pub timestamp: String,
    /// Request id.
    pub request_id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Caller.
    pub caller_id: Option<String>,
    /// Feature.
    pub feature_id: Option<String>,
    /// Experiment.
    pub experiment_id: Option<String>,
    /// Resolved namespace (`null`: none configured and no default).
    pub budget_namespace: Option<String>,
    /// Route.
    pub route_name: String,
    /// Tier asked for.
    pub requested_model_tier: String,
    /// Tier used.
    pub effective_model_tier: String,
    /// Primitive of the deciding rule.
    pub primitive: Option<String>,
    /// `allow`, `downgrade`, `deny`.
    pub decision: String,
    /// Deciding rule's reason.
    pub reason: Option<String>,
    /// Deciding rule.
    pub policy_id: Option<String>,
    /// Estimate at the requested tier.
    pub estimated_cost_usd: f64,
    /// Time spent evaluating policies, ms.
    pub latency_ms: f64,
    /// Window spend reported by a budget rule.
    pub window_cost_usd: Option<f64>,
    /// Window limit reported by a budget rule.
    pub window_limit_usd: Option<f64>,
    /// The policy file's `version`.
    pub policy_version: String,
    /// What was reserved for the dispatch (absent on a denial): the write-ahead record a
    /// restart counts at its estimate when no telemetry line follows (a crash mid-call).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation: Option<ReservationRecord>,
    /// Every alert raised.
    pub alerts: &'a [String],
    /// Every rule's outcome; with provenance, each carries its component's digest, its
    /// settings hash and the aggregate values it was given.
    pub rules: &'a [RuleRecord],
    /// Provenance: the parts of the request context the rules saw that the line's other
    /// fields do not hold (absent on lines written before provenance was recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_input: Option<PolicyInput>,
}

/// What a decision line adds so that its rules can be re-run exactly: with the line's
/// `request_id`, `tenant_id`, `caller_id`, `feature_id`, `experiment_id`, `budget_namespace`
/// (as resolved), `route_name`, `requested_model_tier`, `estimated_cost_usd` and `timestamp`
/// (the request's `unix_time_ms`, to the millisecond) it is the whole
/// [`RequestContext`](llmscope_sdk::types::RequestContext) the rules were given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyInput {
    /// Model of the requested tier.
    pub model: String,
    /// Input tokens counted by the host's tokenizer.
    pub estimated_tokens_in: u32,
    /// Output tokens the host expected.
    pub estimated_tokens_out: u32,
    /// Every tier of the route, priced for the request, cheapest first.
    pub tiers: Vec<llmscope_sdk::types::TierEstimate>,
}

impl PolicyInput {
    /// The parts of `request` a decision line holds nowhere else.
    pub fn of(request: &llmscope_sdk::types::RequestContext) -> Self {
        Self {
            model: request.model.clone(),
            estimated_tokens_in: request.estimated_tokens_in,
            estimated_tokens_out: request.estimated_tokens_out,
            tiers: request.tiers.clone(),
        }
    }
}

/// The reservation a dispatched request holds, in its decision line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReservationRecord {
    /// Model the request is dispatched to.
    pub model: String,
    /// Provider of that model.
    pub provider: String,
    /// Reserved cost: the estimate at the effective tier.
    pub cost_usd: f64,
    /// Reserved input tokens.
    pub tokens_in: u64,
    /// Reserved output tokens (the output cap).
    pub tokens_out: u64,
}

/// RFC 3339 UTC timestamp with millisecond precision for `unix_ms`.
pub fn rfc3339(unix_ms: u64) -> String {
    let nanos = i128::from(unix_ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            ))
            .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_millis() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_764_000_000_123), "2025-11-24T16:00:00.123Z");
    }
}
