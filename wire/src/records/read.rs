//! The JSONL log records as the analytics engine reads them: lenient where older records lack a
//! field, strict about what every record must carry (a parseable time, a tenant, a decision).

use serde::Deserialize;

/// A telemetry line as ingested. Absent fields default the way records from before they
/// existed should read: no cost, not a fallback, and `status: ok` (such records were provider
/// calls).
#[derive(Deserialize)]
pub struct TelemetryRow {
    /// RFC 3339 time (any offset).
    pub timestamp: String,
    /// Request id.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Tenant.
    pub tenant_id: String,
    /// Caller.
    #[serde(default)]
    pub caller_id: Option<String>,
    /// Feature.
    #[serde(default)]
    pub feature_id: Option<String>,
    /// Experiment.
    #[serde(default)]
    pub experiment_id: Option<String>,
    /// Budget namespace.
    #[serde(default)]
    pub budget_namespace: Option<String>,
    /// Route.
    #[serde(default)]
    pub route_name: Option<String>,
    /// The reference's older name for `route_name`.
    #[serde(default)]
    pub route: Option<String>,
    /// Tier asked for.
    #[serde(default)]
    pub requested_model_tier: Option<String>,
    /// Tier used.
    #[serde(default)]
    pub model_tier: Option<String>,
    /// Provider.
    #[serde(default)]
    pub provider: Option<String>,
    /// Model.
    #[serde(default)]
    pub model: Option<String>,
    /// Input tokens.
    #[serde(default)]
    pub tokens_in: Option<i64>,
    /// Output tokens.
    #[serde(default)]
    pub tokens_out: Option<i64>,
    /// Estimate, USD.
    #[serde(default)]
    pub estimated_cost_usd: Option<f64>,
    /// Actual cost, USD.
    #[serde(default)]
    pub cost_usd: f64,
    /// Provider latency, ms.
    #[serde(default)]
    pub latency_ms: Option<f64>,
    /// How long the reservation was held, from the line's timestamp to its write, ms.
    #[serde(default)]
    pub held_ms: Option<f64>,
    /// `ok`, `denied`, `error`.
    #[serde(default = "status_ok")]
    pub status: String,
    /// Finish reason.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Whether a fallback model answered.
    #[serde(default)]
    pub is_fallback: bool,
    /// `allow`, `downgrade`, `deny`.
    #[serde(default)]
    pub policy_decision: Option<String>,
    /// Deciding rule.
    #[serde(default)]
    pub policy_id: Option<String>,
}

fn status_ok() -> String {
    "ok".into()
}

/// Parse an RFC 3339 timestamp (any offset) into µs since the epoch, UTC.
pub fn parse_ts_us(ts: &str) -> Result<i64, String> {
    let t = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("timestamp {ts:?}: {e}"))?;
    i64::try_from(t.unix_timestamp_nanos() / 1000)
        .map_err(|_| format!("timestamp {ts:?} out of range"))
}

/// A telemetry line and its time in µs (UTC), with `route` folded into `route_name`.
pub fn parse_telemetry(line: &[u8]) -> Result<(i64, TelemetryRow), String> {
    let mut r: TelemetryRow =
        serde_json::from_slice(line).map_err(|e| format!("not a telemetry record: {e}"))?;
    r.route_name = r.route_name.or(r.route.take());
    Ok((parse_ts_us(&r.timestamp)?, r))
}

/// A decision line as ingested.
#[derive(Deserialize)]
pub struct DecisionRow {
    /// RFC 3339 time (any offset).
    pub timestamp: String,
    /// Request id.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Tenant.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// Feature.
    #[serde(default)]
    pub feature_id: Option<String>,
    /// Experiment.
    #[serde(default)]
    pub experiment_id: Option<String>,
    /// Budget namespace.
    #[serde(default)]
    pub budget_namespace: Option<String>,
    /// Route.
    #[serde(default)]
    pub route_name: Option<String>,
    /// `allow`, `downgrade`, `deny`.
    pub decision: String,
    /// Deciding rule.
    #[serde(default)]
    pub policy_id: Option<String>,
    /// Primitive of the deciding rule.
    #[serde(default)]
    pub primitive: Option<String>,
    /// Estimate, USD.
    #[serde(default)]
    pub estimated_cost_usd: Option<f64>,
    /// Tier asked for.
    #[serde(default)]
    pub requested_model_tier: Option<String>,
    /// Tier used.
    #[serde(default)]
    pub effective_model_tier: Option<String>,
}

/// A decision line and its time in µs (UTC).
pub fn parse_decision(line: &[u8]) -> Result<(i64, DecisionRow), String> {
    let r: DecisionRow =
        serde_json::from_slice(line).map_err(|e| format!("not a decision record: {e}"))?;
    Ok((parse_ts_us(&r.timestamp)?, r))
}

/// A whole decision line, as `llmscope policy explain` and `replay` read it: every field the
/// gateway writes, provenance included. Lenient like [`DecisionRow`]: lines written before
/// provenance read with no `policy_input` and rules without digests or aggregate values.
#[derive(Debug, Clone, Deserialize)]
pub struct DecisionLine {
    /// RFC 3339 time (any offset).
    pub timestamp: String,
    /// Request id.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Tenant.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// Caller.
    #[serde(default)]
    pub caller_id: Option<String>,
    /// Feature.
    #[serde(default)]
    pub feature_id: Option<String>,
    /// Experiment.
    #[serde(default)]
    pub experiment_id: Option<String>,
    /// Resolved budget namespace.
    #[serde(default)]
    pub budget_namespace: Option<String>,
    /// Route.
    #[serde(default)]
    pub route_name: Option<String>,
    /// Tier asked for.
    #[serde(default)]
    pub requested_model_tier: Option<String>,
    /// Tier used.
    #[serde(default)]
    pub effective_model_tier: Option<String>,
    /// `allow`, `downgrade`, `deny`.
    pub decision: String,
    /// Deciding rule.
    #[serde(default)]
    pub policy_id: Option<String>,
    /// Deciding rule's reason.
    #[serde(default)]
    pub reason: Option<String>,
    /// Estimate at the requested tier, USD.
    #[serde(default)]
    pub estimated_cost_usd: Option<f64>,
    /// The policy file's `version` (`edge`: evaluated by Envoy filters).
    #[serde(default)]
    pub policy_version: Option<String>,
    /// Every rule's outcome.
    #[serde(default)]
    pub rules: Vec<super::write::RuleRecord>,
    /// Provenance: the rest of the request context.
    #[serde(default)]
    pub policy_input: Option<super::write::PolicyInput>,
}

impl DecisionLine {
    /// Parse one line.
    pub fn parse(line: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(line).map_err(|e| format!("not a decision record: {e}"))
    }

    /// The request context the rules were given, rebuilt from the line; `None` when the line
    /// has no `policy_input` (written before provenance was recorded) or lacks an identity.
    pub fn request_context(&self) -> Option<llmscope_sdk::types::RequestContext> {
        let input = self.policy_input.as_ref()?;
        let unix_us = parse_ts_us(&self.timestamp).ok()?;
        Some(llmscope_sdk::types::RequestContext {
            request_id: self.request_id.clone()?,
            tenant_id: self.tenant_id.clone()?,
            caller_id: self.caller_id.clone(),
            feature_id: self.feature_id.clone(),
            experiment_id: self.experiment_id.clone(),
            budget_namespace: self.budget_namespace.clone().unwrap_or_default(),
            route_name: self.route_name.clone().unwrap_or_default(),
            requested_tier: self.requested_model_tier.clone().unwrap_or_default(),
            model: input.model.clone(),
            estimated_tokens_in: input.estimated_tokens_in,
            estimated_tokens_out: input.estimated_tokens_out,
            estimated_cost_usd: self.estimated_cost_usd.unwrap_or(0.0),
            tiers: input.tiers.clone(),
            unix_time_ms: u64::try_from(unix_us.div_euclid(1000)).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use llmscope_sdk::types::{RequestContext, TierEstimate, Verdict};
    use llmscope_sdk::verdict::{FailureMode, LoggedAggregate, Mode, RuleOutcome};

    use super::*;
    use crate::records::write::{rfc3339, DecisionRecord, PolicyInput};

    fn context() -> RequestContext {
        RequestContext {
            request_id: "req-1".into(),
            tenant_id: "acme".into(),
            caller_id: Some("svc".into()),
            feature_id: Some("summarize".into()),
            experiment_id: None,
            budget_namespace: "demo".into(),
            route_name: "/answer-routed".into(),
            requested_tier: "expensive".into(),
            model: "gpt-4o".into(),
            estimated_tokens_in: 12,
            estimated_tokens_out: 500,
            estimated_cost_usd: 0.00503,
            tiers: vec![
                TierEstimate {
                    tier: "cheap".into(),
                    model: "gpt-4o-mini".into(),
                    estimated_cost_usd: 0.0003018,
                },
                TierEstimate {
                    tier: "expensive".into(),
                    model: "gpt-4o".into(),
                    estimated_cost_usd: 0.00503,
                },
            ],
            unix_time_ms: 1_764_000_000_123,
        }
    }

    /// A decision line written with provenance reads back with every rule's digests and
    /// aggregate values, and the request context the rules saw, field for field.
    #[test]
    fn provenance_round_trips_through_a_decision_line() {
        let ctx = context();
        let mut rule = RuleOutcome::of(
            "demo-hourly-cap",
            "budget_threshold",
            Mode::Enforce,
            FailureMode::Closed,
            Ok(Verdict::allow()),
            3.5,
        );
        rule.component_sha256 = Some("ab".repeat(32));
        rule.settings_sha256 = Some("0123456789abcdef".into());
        rule.snapshot_taken_at_ms = Some(1_764_000_000_000);
        rule.aggregates = BTreeMap::from([(
            "window_cost_usd".to_owned(),
            LoggedAggregate {
                value: Some(0.25),
                samples: 7,
            },
        )]);
        let rules = [rule.clone()];
        let record = DecisionRecord {
            timestamp: rfc3339(ctx.unix_time_ms),
            request_id: ctx.request_id.clone(),
            tenant_id: ctx.tenant_id.clone(),
            caller_id: ctx.caller_id.clone(),
            feature_id: ctx.feature_id.clone(),
            experiment_id: ctx.experiment_id.clone(),
            budget_namespace: Some(ctx.budget_namespace.clone()),
            route_name: ctx.route_name.clone(),
            requested_model_tier: ctx.requested_tier.clone(),
            effective_model_tier: ctx.requested_tier.clone(),
            primitive: None,
            decision: "allow".into(),
            reason: None,
            policy_id: None,
            estimated_cost_usd: ctx.estimated_cost_usd,
            latency_ms: 0.01,
            window_cost_usd: None,
            window_limit_usd: None,
            policy_version: "0.1.0".into(),
            reservation: None,
            alerts: &[],
            rules: &rules,
            policy_input: Some(PolicyInput::of(&ctx)),
        };
        let text = serde_json::to_string(&record).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value["rules"][0]["aggregates"]["window_cost_usd"],
            serde_json::json!({"value": 0.25, "samples": 7})
        );
        assert_eq!(value["rules"][0]["settings_sha256"], "0123456789abcdef");
        let line = DecisionLine::parse(text.as_bytes()).unwrap();
        assert_eq!(line.rules, [rule]);
        assert_eq!(line.request_context(), Some(ctx));
        // The engine's reader ignores the new keys.
        assert!(parse_decision(text.as_bytes()).is_ok());
    }

    /// Lines from before provenance still read: rules without digests or values, no context.
    #[test]
    fn lines_without_provenance_still_read() {
        let old = r#"{"timestamp":"2025-11-24T16:00:00.123Z","request_id":"r","tenant_id":"t","decision":"deny","policy_id":"cap","rules":[{"rule_id":"cap","primitive":"budget_threshold","mode":"enforce","failure_mode":"closed","decision":"deny","reason":"over","alert":null,"facts":{},"error":null,"applied":true,"eval_us":4.0}]}"#;
        let line = DecisionLine::parse(old.as_bytes()).unwrap();
        assert_eq!(line.rules[0].component_sha256, None);
        assert!(line.rules[0].aggregates.is_empty());
        assert_eq!(line.request_context(), None);
        assert!(parse_decision(old.as_bytes()).is_ok());
    }
}
