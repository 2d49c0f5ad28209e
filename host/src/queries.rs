//! The five cost questions of the reference system, with its names, output columns, filters and
//! orderings, on the DuckDB engine. Where the reference's order leaves ties, a tie-breaker after
//! it keeps answers deterministic.
//!
//! Telemetry questions count provider calls: every status but `denied` (denied requests never
//! reached a provider; the reference's telemetry only had calls), so `error` and any later status
//! count too. Budget pressure counts decisions.

use std::fmt::Write as _;

use clap::ValueEnum;
use duckdb::types::Value as DbValue;
use serde::Serialize;
use serde_json::Value;

use crate::engine::{EngineError, SpendEngine};

/// A question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Question {
    /// Which tenant or feature is burning the most margin per request? Per tenant and feature,
    /// highest total cost first (then tenant, feature).
    CostByTenantAndFeature,
    /// Which experiment increased cost without improving outcome? Calls with an experiment, per
    /// experiment, highest average cost first (then experiment); success is `finish_reason`
    /// `stop`.
    ExperimentCostVsOutcome,
    /// Which budget namespaces are triggering downgrades or denials? Decisions with a namespace,
    /// per namespace, most downgrades plus denials first (then denials, namespace).
    BudgetPressureByNamespace,
    /// Which fallbacks or routing choices are masking latency? Calls with a route and a latency,
    /// per route and `is_fallback`, highest p95 latency first (then route, `is_fallback`).
    FallbackLatencyMasking,
    /// Which routes or features are no longer margin-safe? Calls with a route, per route, those
    /// whose average cost is above the threshold, highest average first (then route).
    UnsafeRoutes,
}

impl Question {
    /// Every question, in the reference's order.
    pub const ALL: [Self; 5] = [
        Self::CostByTenantAndFeature,
        Self::ExperimentCostVsOutcome,
        Self::BudgetPressureByNamespace,
        Self::FallbackLatencyMasking,
        Self::UnsafeRoutes,
    ];

    /// The snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::CostByTenantAndFeature => "cost_by_tenant_and_feature",
            Self::ExperimentCostVsOutcome => "experiment_cost_vs_outcome",
            Self::BudgetPressureByNamespace => "budget_pressure_by_namespace",
            Self::FallbackLatencyMasking => "fallback_latency_masking",
            Self::UnsafeRoutes => "unsafe_routes",
        }
    }

    /// Parse a name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|q| q.name() == name)
    }

    /// Output columns.
    pub fn columns(self) -> &'static [&'static str] {
        match self {
            Self::CostByTenantAndFeature => &[
                "tenant_id",
                "feature_id",
                "total_cost_usd",
                "avg_cost_usd",
                "request_count",
            ],
            Self::ExperimentCostVsOutcome => &[
                "experiment_id",
                "avg_tokens_in",
                "avg_tokens_out",
                "avg_cost_usd",
                "success_rate",
                "request_count",
            ],
            Self::BudgetPressureByNamespace => &[
                "budget_namespace",
                "allow_count",
                "downgrade_count",
                "deny_count",
                "total_count",
            ],
            Self::FallbackLatencyMasking => &[
                "route_name",
                "is_fallback",
                "p95_latency_ms",
                "avg_latency_ms",
                "request_count",
            ],
            Self::UnsafeRoutes => &[
                "route_name",
                "avg_cost_usd",
                "max_cost_usd",
                "request_count",
            ],
        }
    }

    fn sql(self) -> &'static str {
        // `?1` since (µs), `?2` until (µs), `?3` threshold (USD).
        match self {
            Self::CostByTenantAndFeature => "
                SELECT tenant_id, feature_id, sum(cost_usd) AS total_cost_usd, avg(cost_usd) AS avg_cost_usd,
                       count(*) AS request_count
                FROM telemetry WHERE status <> 'denied' AND ts_us >= ?1 AND ts_us < ?2
                GROUP BY tenant_id, feature_id
                ORDER BY total_cost_usd DESC, tenant_id, feature_id NULLS LAST",
            Self::ExperimentCostVsOutcome => "
                SELECT experiment_id, avg(tokens_in)::DOUBLE AS avg_tokens_in, avg(tokens_out)::DOUBLE AS avg_tokens_out,
                       avg(cost_usd) AS avg_cost_usd,
                       avg(CASE WHEN finish_reason = 'stop' THEN 1.0 ELSE 0.0 END) AS success_rate,
                       count(*) AS request_count
                FROM telemetry WHERE status <> 'denied' AND experiment_id IS NOT NULL AND ts_us >= ?1 AND ts_us < ?2
                GROUP BY experiment_id
                ORDER BY avg_cost_usd DESC, experiment_id",
            Self::BudgetPressureByNamespace => "
                SELECT budget_namespace,
                       count(*) FILTER (WHERE decision = 'allow') AS allow_count,
                       count(*) FILTER (WHERE decision = 'downgrade') AS downgrade_count,
                       count(*) FILTER (WHERE decision = 'deny') AS deny_count,
                       count(*) AS total_count
                FROM decisions WHERE budget_namespace IS NOT NULL AND ts_us >= ?1 AND ts_us < ?2
                GROUP BY budget_namespace
                ORDER BY deny_count + downgrade_count DESC, deny_count DESC, budget_namespace",
            Self::FallbackLatencyMasking => "
                SELECT route_name, is_fallback, quantile_cont(latency_ms, 0.95) AS p95_latency_ms,
                       avg(latency_ms) AS avg_latency_ms, count(*) AS request_count
                FROM telemetry
                WHERE status <> 'denied' AND route_name IS NOT NULL AND latency_ms IS NOT NULL
                      AND ts_us >= ?1 AND ts_us < ?2
                GROUP BY route_name, is_fallback
                ORDER BY p95_latency_ms DESC, route_name, is_fallback",
            Self::UnsafeRoutes => "
                SELECT route_name, avg(cost_usd) AS avg_cost_usd, max(cost_usd) AS max_cost_usd, count(*) AS request_count
                FROM telemetry WHERE status <> 'denied' AND route_name IS NOT NULL AND ts_us >= ?1 AND ts_us < ?2
                GROUP BY route_name
                HAVING avg(cost_usd) > ?3
                ORDER BY avg_cost_usd DESC, route_name",
        }
    }
}

/// Parameters of a question.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueryParams {
    /// Only rows at or after this time (µs since epoch).
    pub since_us: Option<i64>,
    /// Only rows before this time (µs since epoch).
    pub until_us: Option<i64>,
    /// `unsafe_routes`: average cost per request above which a route is unsafe, USD.
    pub threshold_usd: f64,
}

impl Default for QueryParams {
    fn default() -> Self {
        Self {
            since_us: None,
            until_us: None,
            threshold_usd: DEFAULT_THRESHOLD_USD,
        }
    }
}

/// The reference's default for `unsafe_routes`.
pub const DEFAULT_THRESHOLD_USD: f64 = 0.05;

/// An answer: named columns and rows of JSON values.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer {
    /// The question.
    pub query: &'static str,
    /// Column names.
    pub columns: Vec<&'static str>,
    /// Rows, one value per column.
    pub rows: Vec<Vec<Value>>,
}

/// Answer `q` from what the engine has ingested.
pub fn run(engine: &SpendEngine, q: Question, p: &QueryParams) -> Result<Answer, EngineError> {
    let since = p.since_us.unwrap_or(i64::MIN);
    let until = p.until_us.unwrap_or(i64::MAX);
    let columns = q.columns();
    let rows = engine.with_conn(|conn| {
        let mut stmt = conn.prepare(q.sql())?;
        let mut out = Vec::new();
        let mut rows = if q == Question::UnsafeRoutes {
            stmt.query(duckdb::params![since, until, p.threshold_usd])?
        } else {
            stmt.query(duckdb::params![since, until])?
        };
        while let Some(row) = rows.next()? {
            let mut values = Vec::with_capacity(columns.len());
            for i in 0..columns.len() {
                values.push(to_json(row.get::<_, DbValue>(i)?));
            }
            out.push(values);
        }
        Ok(out)
    })?;
    Ok(Answer {
        query: q.name(),
        columns: columns.to_vec(),
        rows,
    })
}

fn to_json(v: DbValue) -> Value {
    match v {
        DbValue::Null => Value::Null,
        DbValue::Boolean(b) => Value::Bool(b),
        DbValue::TinyInt(n) => n.into(),
        DbValue::SmallInt(n) => n.into(),
        DbValue::Int(n) => n.into(),
        DbValue::BigInt(n) => n.into(),
        DbValue::HugeInt(n) => {
            i64::try_from(n).map_or_else(|_| Value::String(n.to_string()), Value::from)
        }
        DbValue::UTinyInt(n) => n.into(),
        DbValue::USmallInt(n) => n.into(),
        DbValue::UInt(n) => n.into(),
        DbValue::UBigInt(n) => n.into(),
        DbValue::Float(f) => round(f64::from(f)),
        DbValue::Double(f) => round(f),
        DbValue::Text(s) => Value::String(s),
        other => Value::String(format!("{other:?}")),
    }
}

/// Round to 12 significant decimals so sums of binary fractions print cleanly.
fn round(f: f64) -> Value {
    if !f.is_finite() {
        return Value::Null;
    }
    let r = (f * 1e12).round() / 1e12;
    serde_json::Number::from_f64(r).map_or(Value::Null, Value::Number)
}

/// Render as an aligned text table.
pub fn to_table(a: &Answer) -> String {
    let cells: Vec<Vec<String>> = a
        .rows
        .iter()
        .map(|r| r.iter().map(cell).collect())
        .collect();
    let widths: Vec<usize> = a
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain(std::iter::once(c.len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, vals: &[String]| {
        let joined: Vec<String> = vals
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", joined.join("  ").trim_end());
    };
    line(
        &mut out,
        &a.columns
            .iter()
            .map(|c| (*c).to_owned())
            .collect::<Vec<_>>(),
    );
    line(
        &mut out,
        &widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>(),
    );
    for r in &cells {
        line(&mut out, r);
    }
    out
}

/// Render as CSV (RFC 4180 quoting).
pub fn to_csv(a: &Answer) -> String {
    let mut out = a.columns.join(",");
    out.push('\n');
    for r in &a.rows {
        let fields: Vec<String> = r
            .iter()
            .map(|v| {
                let s = cell(v);
                if s.contains([',', '"', '\n']) {
                    format!("\"{}\"", s.replace('"', "\"\""))
                } else {
                    s
                }
            })
            .collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Parse `--since` / `--until`: RFC 3339 (`2025-11-24T16:00:00Z`, any offset) or a date
/// (`2025-11-24`, midnight UTC).
pub fn parse_time(s: &str) -> Result<i64, String> {
    crate::engine::parse_ts_us(s).or_else(|_| {
        let date = time::Date::parse(
            s,
            &time::macros::format_description!("[year]-[month]-[day]"),
        )
        .map_err(|_| {
            format!(
                "`{s}` is neither an RFC 3339 time (2025-11-24T16:00:00Z) nor a date (2025-11-24)"
            )
        })?;
        Ok((date.midnight().assume_utc().unix_timestamp_nanos() / 1000) as i64)
    })
}
