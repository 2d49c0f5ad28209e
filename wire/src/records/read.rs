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
