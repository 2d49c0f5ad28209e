//! Aggregates for policies: each distinct aggregate the loaded rules declare is one grouped
//! query over `telemetry`, published as a hash table from scope values to the value, so a
//! request's lookup never touches SQL.

use std::collections::{HashMap, HashSet};

use duckdb::{params, Connection};
use llmscope_sdk::types::{
    Aggregate, AggregateValue, Aggregation, Metric, RequestContext, Scope, Window,
};

use super::{EngineError, SpendEngine};
use crate::snapshots::AggregateStore;
use crate::windows::{calendar_start_us, window_start_us};

impl SpendEngine {
    /// Compute every distinct aggregate in `aggregates` as of `now_ms`.
    pub fn compute(
        &self,
        aggregates: &[Aggregate],
        now_ms: u64,
    ) -> Result<PublishedAggregates, EngineError> {
        let mut tables = HashMap::new();
        let conn = self.conn.lock();
        // A row stamped after now (another writer's clock ahead) enters the windows later
        // without being logged anew: the values change then too.
        let mut unchanged_until_ms: Option<u64> = first_entry_ms(&conn, now_ms)?;
        let mut windows_seen = HashSet::new();
        for a in aggregates {
            if let Window::RollingSeconds(w) = a.window {
                if windows_seen.insert(w) {
                    if let Some(exit) = first_exit_ms(&conn, w, now_ms)? {
                        unchanged_until_ms = Some(unchanged_until_ms.map_or(exit, |u| u.min(exit)));
                    }
                }
            }
            let key = SpecKey::of(a);
            if tables.contains_key(&key) {
                continue;
            }
            let table = compute_one(&conn, a, &key, now_ms)?;
            tables.insert(key, table);
        }
        Ok(PublishedAggregates {
            taken_at_ms: now_ms,
            tables,
            unchanged_until_ms,
        })
    }
}

/// When the oldest row inside a rolling window of `window_s` seconds (as of `now_ms`) leaves
/// it: until then, with no new rows, every aggregate over that window keeps its value. Over
/// every telemetry row, a superset of any aggregate's rows, so never later than the truth.
fn first_exit_ms(
    conn: &Connection,
    window_s: u64,
    now_ms: u64,
) -> Result<Option<u64>, EngineError> {
    let (start_us, _) = window_start_us(Window::RollingSeconds(window_s), now_ms);
    let now_us = i64::try_from(now_ms)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000);
    let mut stmt =
        conn.prepare_cached("SELECT min(ts_us) FROM telemetry WHERE ts_us >= ? AND ts_us <= ?")?;
    let oldest: Option<i64> = stmt.query_row(params![start_us, now_us], |r| r.get(0))?;
    Ok(oldest.map(|ts| {
        let exit_us = ts.saturating_add(
            i64::try_from(window_s)
                .unwrap_or(i64::MAX)
                .saturating_mul(1_000_000),
        );
        u64::try_from(exit_us / 1000).unwrap_or(0)
    }))
}

/// The earliest telemetry row stamped after `now_ms`, if any (ms).
fn first_entry_ms(conn: &Connection, now_ms: u64) -> Result<Option<u64>, EngineError> {
    let now_us = i64::try_from(now_ms)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000);
    let mut stmt = conn.prepare_cached("SELECT min(ts_us) FROM telemetry WHERE ts_us > ?")?;
    let next: Option<i64> = stmt.query_row(params![now_us], |r| r.get(0))?;
    Ok(next.map(|ts| u64::try_from(ts / 1000).unwrap_or(0)))
}

/// One aggregate's values as of `now_ms`, one per combination of its scope's values.
fn compute_one(
    conn: &Connection,
    a: &Aggregate,
    key: &SpecKey,
    now_ms: u64,
) -> Result<Table, EngineError> {
    let (start_us, period) = window_start_us(a.window, now_ms);
    let cols: Vec<&str> = key.scope.iter().map(|s| scope_column(*s)).collect();
    let sql = aggregate_sql(a, &cols);
    let now_us = i64::try_from(now_ms)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000);
    // Cached: the same few statements run every refresh pass; parsing and planning them
    // again each time was most of an idle gateway's CPU.
    let mut stmt = conn.prepare_cached(&sql)?;
    let n = cols.len();
    let mut values = HashMap::new();
    let mut rows = stmt.query(params![start_us, now_us])?;
    while let Some(row) = rows.next()? {
        let mut dims = Vec::with_capacity(n);
        for i in 0..n {
            dims.push(row.get::<_, Option<String>>(i)?);
        }
        let value: Option<f64> = row.get(n)?;
        let samples: i64 = row.get(n + 1)?;
        if samples > 0 {
            values.insert(dims, (value, samples as u64));
        }
    }
    Ok(Table {
        period_start_us: period,
        values,
    })
}

/// The grouped query for `a` over the scope columns `cols`: the scope values, the aggregate
/// and the sample count per group, for rows between two `ts_us` bounds (parameters).
fn aggregate_sql(a: &Aggregate, cols: &[&str]) -> String {
    let metric = metric_expr(a.metric);
    let agg = match a.aggregation {
        Aggregation::Sum => format!("sum({metric})::DOUBLE"),
        Aggregation::Avg => format!("avg({metric})::DOUBLE"),
        Aggregation::Max => format!("max({metric})::DOUBLE"),
        Aggregation::P95 => format!("quantile_cont({metric}, 0.95)::DOUBLE"),
        Aggregation::Count => "count(*)::DOUBLE".to_owned(),
    };
    let select_cols = cols.iter().map(|c| format!("{c}, ")).collect::<String>();
    let group = if cols.is_empty() {
        String::new()
    } else {
        format!(" GROUP BY {}", cols.join(", "))
    };
    format!(
        "SELECT {select_cols}{agg}, count(*) FROM telemetry WHERE {COUNTED_ROWS} AND ts_us >= ? AND ts_us <= ?{group}"
    )
}

/// The telemetry rows an aggregate counts: answered calls, and any call that cost something
/// (denials and free failures are not spend).
pub(crate) const COUNTED_ROWS: &str = "(status = 'ok' OR cost_usd > 0)";

/// The `telemetry` column holding scope `s`.
pub(crate) fn scope_column(s: Scope) -> &'static str {
    match s {
        Scope::Tenant => "tenant_id",
        Scope::Feature => "feature_id",
        Scope::Route => "route_name",
        Scope::BudgetNamespace => "budget_namespace",
        Scope::Experiment => "experiment_id",
        Scope::Model => "model",
    }
}

/// The SQL expression of metric `m` over a `telemetry` row.
pub(crate) fn metric_expr(m: Metric) -> &'static str {
    match m {
        Metric::CostUsd => "cost_usd",
        Metric::TokensIn => "tokens_in",
        Metric::TokensOut => "tokens_out",
        Metric::Requests => "1",
        Metric::LatencyMs => "latency_ms",
    }
}

/// `r`'s value for scope `s`, as [`scope_column`] holds it.
fn scope_value(s: Scope, r: &RequestContext) -> Option<String> {
    match s {
        Scope::Tenant => Some(r.tenant_id.clone()),
        Scope::Feature => r.feature_id.clone(),
        Scope::Route => Some(r.route_name.clone()),
        Scope::BudgetNamespace => Some(r.budget_namespace.clone()),
        Scope::Experiment => r.experiment_id.clone(),
        Scope::Model => Some(r.model.clone()),
    }
}

/// Identity of an aggregate for deduplication: scope order does not matter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpecKey {
    metric: Metric,
    aggregation: Aggregation,
    window: Window,
    scope: Vec<Scope>,
}

impl SpecKey {
    /// `a`'s scope in the order values are keyed by: sorted, deduplicated.
    pub fn scope_order(a: &Aggregate) -> Vec<Scope> {
        Self::of(a).scope
    }

    /// The key of `a`.
    pub fn of(a: &Aggregate) -> Self {
        let mut scope = a.scope.clone();
        scope.sort();
        scope.dedup();
        Self {
            metric: a.metric,
            aggregation: a.aggregation,
            window: a.window,
            scope,
        }
    }
}

/// One aggregate's values: per combination of scope values, the value and its sample count.
#[derive(Debug, Clone, Default)]
struct Table {
    /// Start of the calendar period the values are for (`None`: a rolling window).
    period_start_us: Option<i64>,
    values: HashMap<Vec<Option<String>>, (Option<f64>, u64)>,
}

/// Aggregate values published after a refresh; lookups are hash probes.
#[derive(Debug, Clone, Default)]
pub struct PublishedAggregates {
    taken_at_ms: u64,
    tables: HashMap<SpecKey, Table>,
    /// Until when (ms) every value stays the same if no row is added: the first moment a row
    /// leaves one of the rolling windows; `None` when no rolling window holds a row (calendar
    /// windows keep their values to the period's end, where lookups start the new period at
    /// nothing).
    unchanged_until_ms: Option<u64>,
}

impl PublishedAggregates {
    /// Number of distinct aggregates computed.
    pub fn len(&self) -> usize {
        self.tables.len()
    }

    /// Whether nothing was computed.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Whether `a` was computed.
    pub fn holds(&self, a: &Aggregate) -> bool {
        self.tables.contains_key(&SpecKey::of(a))
    }

    /// Whether, with no row added since, every value is still exact at `now_ms`.
    pub fn unchanged_at(&self, now_ms: u64) -> bool {
        self.unchanged_until_ms.is_none_or(|until| now_ms < until)
    }
}

impl AggregateStore for PublishedAggregates {
    fn lookup(&self, a: &Aggregate, request: &RequestContext) -> Option<AggregateValue> {
        let key = SpecKey::of(a);
        let table = self.tables.get(&key)?;
        if let Some(start) = table.period_start_us {
            // A new calendar period began since the refresh: nothing recorded in it yet.
            if calendar_start_us(a.window, request.unix_time_ms) != start {
                return None;
            }
        }
        let dims: Vec<Option<String>> =
            key.scope.iter().map(|s| scope_value(*s, request)).collect();
        table
            .values
            .get(&dims)
            .map(|(value, samples)| AggregateValue {
                key: a.key.clone(),
                value: *value,
                samples: *samples,
            })
    }

    fn taken_at_unix_ms(&self) -> u64 {
        self.taken_at_ms
    }

    fn values_of(&self, a: &Aggregate, now_ms: u64) -> Vec<(Vec<Option<String>>, f64)> {
        let Some(table) = self.tables.get(&SpecKey::of(a)) else {
            return Vec::new();
        };
        if table
            .period_start_us
            .is_some_and(|start| calendar_start_us(a.window, now_ms) != start)
        {
            return Vec::new();
        }
        table
            .values
            .iter()
            .filter_map(|(dims, (value, _))| Some((dims.clone(), (*value)?)))
            .collect()
    }
}

/// The distinct aggregates declared by `rules`, then `extra` (edge rules' declarations).
pub fn declared_aggregates<'a>(
    rules: impl Iterator<Item = &'a crate::policy::Rule>,
    extra: &'a [Aggregate],
) -> Vec<Aggregate> {
    let mut seen = HashSet::new();
    rules
        .flat_map(|rule| rule.aggregates())
        .chain(extra)
        .filter(|a| seen.insert(SpecKey::of(a)))
        .cloned()
        .collect()
}
