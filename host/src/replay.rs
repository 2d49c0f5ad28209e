//! `llmscope policy replay`: re-evaluate every logged request with a candidate policy file,
//! each rule given its declared aggregates **as of that request's time**, computed from the
//! logs, and compare with what the gateway decided.
//!
//! # As of a request's time
//!
//! Every decision line is a *probe*; every counted telemetry line (the engine's own filter,
//! [`crate::engine::COUNTED_ROWS`]) is a *contribution* placed at its request's decision. Both
//! are ordered by `ord` = the request's `ts_us` plus its rank among the decisions of the same
//! millisecond in log order (logs carry millisecond times; decision lines are written at
//! decision time, so log order is decision order). For each distinct aggregate the candidate
//! rules declare (deduplicated as the engine does, [`SpecKey`]) one SQL query runs a window
//! function over the union of probes and contributions, partitioned by the aggregate's scope
//! columns (and by calendar period for calendar windows), framed `RANGE BETWEEN <window>
//! PRECEDING AND 1 PRECEDING`: a probe sees exactly the requests decided before it within its
//! window, never itself. Metric expressions, scope columns and the counted-row filter are the
//! engine's. One query per aggregate, not one per request.
//!
//! # In-flight reservations
//!
//! The gateway's `include_in_flight` cost sums added the reservations (estimates) of requests
//! still in flight at decision time; the logs hold those requests' final costs. The sums here
//! re-create that: a request counts at its estimate for every later request decided before it
//! settled (time + `held_ms`, the time its reservation was held; provider `latency_ms` on lines
//! written before that key existed), at its cost after — also a request that ended costing
//! nothing (an error, a cancellation: not counted, but its reservation was held while it was
//! dispatched). What that cannot see — which of two
//! requests came first within the logs' millisecond, token reservations, and aggregates
//! without `include_in_flight` (the gateway saw them as of its last refresh; the replay sees
//! every earlier request) — is bounded in the report: for each changed decision, the requests
//! of its namespace decided before it and possibly still in flight (settled less than
//! [`IN_FLIGHT_TOLERANCE_US`] before its logged millisecond, or later), and the sum of their
//! |estimate − cost|.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use duckdb::params;
use llmscope_sdk::types::{
    Aggregate, AggregateValue, Aggregation, Metric, RequestContext, Snapshot, Window,
};
use llmscope_wire::records::{parse_ts_us, DecisionLine};
use serde::Serialize;

use crate::engine::{metric_expr, scope_column, SpecKey, SpendEngine, COUNTED_ROWS};
use crate::policy::{DecisionKind, Evaluation, PolicySet, Rule, SnapshotSource};

/// What to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Only requests at or after this time (µs since the epoch, UTC).
    pub since_us: Option<i64>,
    /// Only requests before this time.
    pub until_us: Option<i64>,
}

/// Allow, downgrade and deny counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Allowed.
    pub allow: u64,
    /// Downgraded.
    pub downgrade: u64,
    /// Denied.
    pub deny: u64,
}

impl Counts {
    fn add(&mut self, kind: DecisionKind) {
        match kind {
            DecisionKind::Allow => self.allow += 1,
            DecisionKind::Downgrade => self.downgrade += 1,
            DecisionKind::Deny => self.deny += 1,
        }
    }
}

/// Logged against candidate, for one namespace, tenant or feature.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    /// Namespace, tenant or feature (`(none)` when the requests had none).
    pub name: String,
    /// Requests replayed.
    pub requests: u64,
    /// What the gateway decided.
    pub logged: Counts,
    /// What the candidate decides.
    pub candidate: Counts,
    /// Requests whose decision or tier changed.
    pub changed: u64,
    /// Estimated USD (at the requested tier) the gateway denied.
    pub denied_usd_logged: f64,
    /// Estimated USD the candidate denies.
    pub denied_usd_candidate: f64,
    /// Estimated USD the gateway moved to a cheaper tier (requested minus dispatched estimate).
    pub moved_usd_logged: f64,
    /// Estimated USD the candidate moves to a cheaper tier.
    pub moved_usd_candidate: f64,
}

/// One rule's own verdicts: as logged (where the logged lines ran a rule of that id) and
/// under the candidate.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RuleTally {
    /// Rule id.
    pub rule_id: String,
    /// Primitive.
    pub primitive: String,
    /// Namespace.
    pub namespace: String,
    /// The rule's logged verdicts (requests whose line has a rule of this id).
    pub logged: Counts,
    /// The rule's verdicts under the candidate.
    pub candidate: Counts,
}

/// A request whose replayed decision differs from the logged one.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    /// Request id.
    pub request_id: String,
    /// Namespace.
    pub namespace: String,
    /// Logged decision (`downgrade:cheap` style for downgrades).
    pub logged: String,
    /// Candidate decision.
    pub candidate: String,
    /// Requests of the namespace decided before it and still in flight at its decision.
    pub in_flight: u64,
    /// Their Σ |estimate − cost|, USD: how far an in-flight-inclusive sum could be off.
    pub in_flight_slack_usd: f64,
}

/// The replay's report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    /// Decision lines read (every log given).
    pub lines: u64,
    /// Requests re-evaluated (in the time range, with provenance, not edge).
    pub replayed: u64,
    /// Lines in range without provenance (`policy_input`), not re-evaluated.
    pub skipped_no_provenance: u64,
    /// Edge lines in range (their rules are Envoy filters), not re-evaluated.
    pub skipped_edge: u64,
    /// Replayed requests whose decision and tier are the logged ones.
    pub matched: u64,
    /// `matched / replayed` (1 when nothing was replayed).
    pub match_rate: f64,
    /// Of the mismatches, those with requests of their namespace in flight at decision time.
    pub mismatches_with_in_flight: u64,
    /// Per namespace.
    pub namespaces: Vec<Tally>,
    /// Per candidate rule.
    pub rules: Vec<RuleTally>,
    /// Most affected tenants (most changed decisions, then most USD), at most 10.
    pub tenants: Vec<Tally>,
    /// Most affected features, at most 10.
    pub features: Vec<Tally>,
    /// The first mismatches (at most 50), in log order.
    pub mismatches: Vec<Mismatch>,
}

/// One decision line to replay: the context its rules saw and what the gateway decided.
struct Probe {
    ctx: RequestContext,
    logged: Logged,
}

/// What a decision line says was decided.
struct Logged {
    decision: String,
    effective_model_tier: Option<String>,
    /// Each rule's id and verdict.
    rules: Vec<(String, DecisionKind)>,
}

/// Aggregate values per distinct aggregate, indexed by probe.
struct Values {
    index: HashMap<SpecKey, usize>,
    columns: Vec<Vec<(Option<f64>, u64)>>,
}

/// The snapshot source of one probe.
struct At<'a> {
    values: &'a Values,
    probe: usize,
}

impl SnapshotSource for At<'_> {
    fn snapshot(&self, rule: &Rule, request: &RequestContext) -> Snapshot {
        Snapshot {
            taken_at_unix_ms: request.unix_time_ms,
            values: rule
                .aggregates()
                .iter()
                .map(|a| {
                    let (value, samples) = self
                        .values
                        .index
                        .get(&SpecKey::of(a))
                        .map_or((None, 0), |&i| self.values.columns[i][self.probe]);
                    AggregateValue {
                        key: a.key.clone(),
                        value: as_gateway_value(a, value, samples),
                        samples,
                    }
                })
                .collect(),
        }
    }
}

/// A window's value as the gateway gives it: a sum or count over no samples is `0`, any other
/// aggregation over none has no value (as `LiveSnapshots` does).
fn as_gateway_value(a: &Aggregate, value: Option<f64>, samples: u64) -> Option<f64> {
    let summable = matches!(a.aggregation, Aggregation::Sum | Aggregation::Count)
        && a.metric != Metric::LatencyMs;
    match (samples, summable) {
        (0, true) => Some(0.0),
        (0, false) => None,
        _ => value.or(summable.then_some(0.0)),
    }
}

/// Replay the requests of `decisions` (files, oldest first) with `set`, aggregates computed
/// from `telemetry` (files, oldest first).
pub fn replay(
    set: &PolicySet,
    decisions: &[PathBuf],
    telemetry: &[PathBuf],
    options: &ReplayOptions,
) -> Result<ReplayReport> {
    let started = std::time::Instant::now();
    let phase = |name: &str| {
        tracing::info!(
            phase = name,
            elapsed_s = started.elapsed().as_secs_f64(),
            "replay"
        )
    };
    let mut report = ReplayReport::default();
    let (probes, order) = read_probes(decisions, options, &mut report)?;
    phase("decisions read");
    let engine = load_telemetry(telemetry)?;
    phase("telemetry ingested");
    engine.with_conn(|conn| create_probe_tables(conn, &order, &probes))?;
    drop(order);
    phase("probe tables");
    let aggregates = crate::engine::declared_aggregates(set.rules(), &[]);
    let values = compute_values(&engine, &aggregates, probes.len())?;
    phase("aggregates as of each request");
    let evaluations = evaluate_all(set, &probes, &values);
    phase("evaluated");
    tally(&mut report, set, &probes, &evaluations);
    bound_in_flight(&engine, &mut report)?;
    phase("reported");
    Ok(report)
}

/// Every decision line's (ts_us, in-range probe index) in log order, and the probes.
type Order = Vec<(i64, Option<usize>, String)>;

fn read_probes(
    files: &[PathBuf],
    options: &ReplayOptions,
    report: &mut ReplayReport,
) -> Result<(Vec<Probe>, Order)> {
    let mut probes = Vec::new();
    let mut order = Vec::new();
    for file in files {
        let text = match std::fs::read(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        let lines: Vec<&[u8]> = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.trim_ascii().is_empty())
            .collect();
        let parsed = parse_parallel(&lines);
        for (i, line) in parsed.into_iter().enumerate() {
            let Some(line) = line else {
                tracing::warn!(file = %file.display(), line = i + 1, "skipped a malformed decision line");
                continue;
            };
            report.lines += 1;
            let Ok(ts_us) = parse_ts_us(&line.timestamp) else {
                continue;
            };
            let in_range = options.since_us.is_none_or(|s| ts_us >= s)
                && options.until_us.is_none_or(|u| ts_us < u);
            let id = line.request_id.clone().unwrap_or_default();
            let mut index = None;
            if in_range {
                if line.policy_version.as_deref() == Some("edge") {
                    report.skipped_edge += 1;
                } else if let Some(ctx) = line.request_context() {
                    index = Some(probes.len());
                    probes.push(Probe {
                        ctx,
                        logged: Logged {
                            decision: line.decision,
                            effective_model_tier: line.effective_model_tier,
                            rules: line
                                .rules
                                .into_iter()
                                .map(|r| (r.rule_id, r.decision))
                                .collect(),
                        },
                    });
                } else {
                    report.skipped_no_provenance += 1;
                }
            }
            order.push((ts_us, index, id));
        }
    }
    Ok((probes, order))
}

/// Parse lines on every core, keeping their order.
fn parse_parallel(lines: &[&[u8]]) -> Vec<Option<DecisionLine>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = lines.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = lines
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|l| DecisionLine::parse(l).ok())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// The telemetry logs in a fresh in-memory engine (the first file as its log, the rest
/// appended), as `llmscope query` loads them.
fn load_telemetry(files: &[PathBuf]) -> Result<SpendEngine> {
    let empty = std::env::temp_dir().join(format!("llmscope-replay-none-{}", std::process::id()));
    let first = files.first().cloned().unwrap_or_else(|| empty.clone());
    let engine = SpendEngine::open(None, &first, &empty)?;
    let ingested = engine.ingest()?;
    let rest = files.get(1..).unwrap_or_default().to_vec();
    let (_, more) = engine.append_files(&rest, &[])?;
    for line in ingested.malformed.iter().chain(&more) {
        tracing::warn!(%line, "skipped a malformed telemetry line");
    }
    Ok(engine)
}

/// `order`: every decision in log order. Creates `replay_order` (request_id, ord, probe) and
/// `replay_probes` (probe, ord, the request's scope values).
fn create_probe_tables(
    conn: &duckdb::Connection,
    order: &Order,
    probes: &[Probe],
) -> Result<(), duckdb::Error> {
    conn.execute_batch(
        "CREATE TEMP TABLE replay_lines (seq BIGINT, ts_us BIGINT, request_id VARCHAR, probe BIGINT);",
    )?;
    {
        let mut app = conn.appender("replay_lines")?;
        for (seq, (ts_us, probe, id)) in order.iter().enumerate() {
            app.append_row(params![seq as i64, ts_us, id, probe.map(|p| p as i64)])?;
        }
    }
    // ord: the time plus the rank among the same millisecond's decisions, in log order.
    conn.execute_batch(
        "CREATE TEMP TABLE replay_order AS
           SELECT request_id, probe, ts_us,
                  ts_us + least(row_number() OVER (PARTITION BY ts_us ORDER BY seq) - 1, 999) AS ord
           FROM replay_lines;
         CREATE TEMP TABLE replay_probes (probe BIGINT, tenant_id VARCHAR, feature_id VARCHAR,
           route_name VARCHAR, budget_namespace VARCHAR, experiment_id VARCHAR, model VARCHAR);",
    )?;
    {
        let mut app = conn.appender("replay_probes")?;
        for (i, p) in probes.iter().enumerate() {
            let c = &p.ctx;
            app.append_row(params![
                i as i64,
                c.tenant_id,
                c.feature_id,
                c.route_name,
                c.budget_namespace,
                c.experiment_id,
                c.model
            ])?;
        }
    }
    conn.execute_batch(
        "CREATE TEMP TABLE replay_contrib AS
           SELECT t.*, coalesce(o.ord, t.ts_us + 999) AS ord
           FROM telemetry t LEFT JOIN (SELECT DISTINCT ON (request_id) request_id, ord FROM replay_order) o
             USING (request_id);",
    )
}

/// Every distinct aggregate of `aggregates`, for every probe.
fn compute_values(engine: &SpendEngine, aggregates: &[Aggregate], n: usize) -> Result<Values> {
    let mut index = HashMap::new();
    let mut columns = Vec::new();
    for a in aggregates {
        let key = SpecKey::of(a);
        if index.contains_key(&key) {
            continue;
        }
        let sql = as_of_sql(a);
        let started = std::time::Instant::now();
        let column = engine.with_conn(|conn| {
            let mut column = vec![(None, 0u64); n];
            let mut stmt = conn.prepare(&sql)?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let probe: i64 = row.get(0)?;
                let value: Option<f64> = row.get(1)?;
                let samples: i64 = row.get(2)?;
                if let Some(slot) = usize::try_from(probe).ok().and_then(|p| column.get_mut(p)) {
                    *slot = (value, u64::try_from(samples).unwrap_or(0));
                }
            }
            Ok(column)
        })?;
        tracing::info!(aggregate = ?key, elapsed_s = started.elapsed().as_secs_f64(), "replay aggregate computed");
        index.insert(key, columns.len());
        columns.push(column);
    }
    Ok(Values { index, columns })
}

/// The query of aggregate `a`: per probe, the value and sample count over the contributions
/// decided before it within its window and scope. Sums, counts and means are differences of
/// running totals (a streaming window per scope, then two ASOF joins per probe: the last
/// contribution before it and the last before its window's start); maxima and percentiles
/// are a framed window over probes and contributions together ([`framed_sql`]).
fn as_of_sql(a: &Aggregate) -> String {
    if !matches!(
        a.aggregation,
        Aggregation::Sum | Aggregation::Count | Aggregation::Avg
    ) {
        return framed_sql(a);
    }
    let scope = SpecKey::scope_order(a);
    let cols: Vec<&str> = scope.iter().map(|s| scope_column(*s)).collect();
    // ASOF joins match on equality, which NULL never satisfies: a request with no value for a
    // scoped dimension matches rows with none, as the engine's GROUP BY does.
    let keys = |table: &str| -> String {
        cols.iter()
            .enumerate()
            .map(|(i, c)| format!("coalesce({table}{c}, chr(1)) AS k{i}, "))
            .collect()
    };
    let key_names: String = (0..cols.len()).map(|i| format!("k{i}, ")).collect();
    let on = |l: &str, r: &str| -> String {
        (0..cols.len())
            .map(|i| format!("{l}.k{i} = {r}.k{i} AND "))
            .collect()
    };
    let partition = if cols.is_empty() {
        String::new()
    } else {
        format!(
            "PARTITION BY {}",
            (0..cols.len())
                .map(|i| format!("k{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let start = match a.window {
        Window::RollingSeconds(s) => format!("o.ord - {}", s.saturating_mul(1_000_000)),
        Window::CalendarHour => "epoch_us(date_trunc('hour', make_timestamp(o.ord)))".into(),
        Window::CalendarDay => "epoch_us(date_trunc('day', make_timestamp(o.ord)))".into(),
        Window::CalendarMonth => "epoch_us(date_trunc('month', make_timestamp(o.ord)))".into(),
    };
    let metric = metric_expr(a.metric);
    let value = match a.aggregation {
        Aggregation::Sum => "cs",
        Aggregation::Count => "cn::DOUBLE",
        _ => "CASE WHEN cv > 0 THEN cs / cv END",
    };
    let (c_on, f_on, b_on) = (on("p", "c"), on("e", "f"), on("g", "b"));
    // In flight at a request's decision, the gateway summed a request's reservation (its
    // estimate), not its cost: for cost sums that include in-flight spend, add, per request,
    // Σ (estimate − cost) over the requests decided before it (running total by decision)
    // less those settled by its time (running total by settlement, [`settled_at`]; the logs
    // time a request to its millisecond, so one settling within the first half of the
    // request's millisecond counts as settled).
    // A request that ended costing nothing (an error, a cancellation) is not counted, yet
    // its reservation was in flight like any other: for those sums the rows that held one
    // (`held_ms`) take part too, with no value, only for their estimate.
    let (reserved, rows) = if a.include_in_flight
        && a.metric == Metric::CostUsd
        && a.aggregation == Aggregation::Sum
    {
        (
            "estimated_cost_usd - cost_usd",
            format!("{COUNTED_ROWS} OR held_ms IS NOT NULL"),
        )
    } else {
        ("0", COUNTED_ROWS.to_owned())
    };
    let p_keys = keys("p.");
    let t_keys = keys("");
    let settled = settled_at("");
    format!(
        "WITH c AS (
           SELECT {key_names}ord,
                  sum(coalesce(v, 0)) OVER win AS cs, count(v) OVER win AS cv, (sum(n) OVER win)::BIGINT AS cn,
                  sum(dv) OVER win AS cd
           FROM (SELECT {t_keys}ord, CASE WHEN {COUNTED_ROWS} THEN ({metric})::DOUBLE END AS v,
                        CASE WHEN {COUNTED_ROWS} THEN 1 ELSE 0 END AS n, ({reserved})::DOUBLE AS dv
                 FROM replay_contrib WHERE {rows})
           WINDOW win AS ({partition} ORDER BY ord ROWS UNBOUNDED PRECEDING)
         ),
         f AS (
           SELECT {key_names}done, sum(dv) OVER win AS fd
           FROM (SELECT {t_keys}{settled} AS done, ({reserved})::DOUBLE AS dv
                 FROM replay_contrib WHERE {rows})
           WINDOW win AS ({partition} ORDER BY done ROWS UNBOUNDED PRECEDING)
         ),
         p AS (
           SELECT {p_keys}o.probe, o.ord, o.ts_us, {start} AS start
           FROM replay_order o JOIN replay_probes p ON p.probe = o.probe
         ),
         e AS (
           SELECT p.*, coalesce(c.cs, 0) AS cs, coalesce(c.cv, 0) AS cv, coalesce(c.cn, 0) AS cn,
                  coalesce(c.cd, 0) AS cd
           FROM p ASOF LEFT JOIN c ON {c_on}p.ord > c.ord
         ),
         g AS (
           SELECT e.*, coalesce(f.fd, 0) AS fd
           FROM e ASOF LEFT JOIN f ON {f_on}e.ts_us + 500 >= f.done
         ),
         d AS (
           SELECT g.probe, g.cs - coalesce(b.cs, 0) + greatest(g.cd - g.fd, 0) AS cs,
                  g.cv - coalesce(b.cv, 0) AS cv, g.cn - coalesce(b.cn, 0) AS cn
           FROM g ASOF LEFT JOIN c b ON {b_on}g.start > b.ord
         )
         SELECT probe, {value}, cn FROM d"
    )
}

/// The framed-window query of a maximum or percentile (see [`as_of_sql`]).
fn framed_sql(a: &Aggregate) -> String {
    let scope = SpecKey::scope_order(a);
    let cols: Vec<&str> = scope.iter().map(|s| scope_column(*s)).collect();
    let metric = metric_expr(a.metric);
    let agg = match a.aggregation {
        Aggregation::Sum => "sum(v)".to_owned(),
        Aggregation::Avg => "avg(v)".to_owned(),
        Aggregation::Max => "max(v)".to_owned(),
        Aggregation::P95 => "quantile_cont(v, 0.95)".to_owned(),
        Aggregation::Count => "count(c)".to_owned(),
    };
    let (period, frame) = match a.window {
        Window::RollingSeconds(s) => (
            None,
            format!(
                "RANGE BETWEEN {} PRECEDING AND 1 PRECEDING",
                s.saturating_mul(1_000_000)
            ),
        ),
        Window::CalendarHour => (Some("hour"), String::new()),
        Window::CalendarDay => (Some("day"), String::new()),
        Window::CalendarMonth => (Some("month"), String::new()),
    };
    let frame = if frame.is_empty() {
        "RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING".to_owned()
    } else {
        frame
    };
    let mut partition: Vec<String> = cols.iter().map(|c| (*c).to_owned()).collect();
    if let Some(unit) = period {
        partition.push(format!("date_trunc('{unit}', make_timestamp(ord))"));
    }
    let partition = if partition.is_empty() {
        String::new()
    } else {
        format!("PARTITION BY {}", partition.join(", "))
    };
    let select_cols: String = cols.iter().map(|c| format!(", {c}")).collect();
    let probe_cols: String = cols.iter().map(|c| format!(", p.{c}")).collect();
    format!(
        "WITH ev AS (
           SELECT o.ord, o.probe, NULL::DOUBLE AS v, NULL::INTEGER AS c{probe_cols}
             FROM replay_order o JOIN replay_probes p ON p.probe = o.probe
           UNION ALL
           SELECT ord, NULL, ({metric})::DOUBLE, 1{select_cols}
             FROM replay_contrib WHERE {COUNTED_ROWS}
         )
         SELECT probe, w_value, w_samples FROM (
           SELECT probe, ({agg} OVER w)::DOUBLE AS w_value, count(c) OVER w AS w_samples
           FROM ev WINDOW w AS ({partition} ORDER BY ord {frame})
         ) WHERE probe IS NOT NULL"
    )
}

/// Evaluate every probe with the candidate, on every core.
fn evaluate_all(set: &PolicySet, probes: &[Probe], values: &Values) -> Vec<Evaluation> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = probes.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = probes
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                s.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(i, p)| {
                            let at = At {
                                values,
                                probe: c * chunk + i,
                            };
                            set.evaluate(&p.ctx, &at)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// `decision` with its tier, as compared: `allow`, `deny`, `downgrade:<tier>`.
fn label(decision: &str, tier: Option<&str>) -> String {
    match (decision, tier) {
        ("downgrade", Some(t)) => format!("downgrade:{t}"),
        (d, _) => d.to_owned(),
    }
}

fn kind_of(decision: &str) -> DecisionKind {
    match decision {
        "deny" => DecisionKind::Deny,
        "downgrade" => DecisionKind::Downgrade,
        _ => DecisionKind::Allow,
    }
}

/// USD moved off the requested tier by dispatching at `tier`.
fn moved_usd(ctx: &RequestContext, tier: Option<&str>) -> f64 {
    tier.and_then(|t| ctx.tier(t)).map_or(0.0, |t| {
        (ctx.estimated_cost_usd - t.estimated_cost_usd).max(0.0)
    })
}

fn tally(report: &mut ReplayReport, set: &PolicySet, probes: &[Probe], evaluations: &[Evaluation]) {
    let mut namespaces: BTreeMap<String, Tally> = BTreeMap::new();
    let mut tenants: BTreeMap<String, Tally> = BTreeMap::new();
    let mut features: BTreeMap<String, Tally> = BTreeMap::new();
    let mut rules: BTreeMap<String, RuleTally> = set
        .namespaces()
        .flat_map(|ns| {
            ns.rules().iter().map(|r| {
                (
                    r.id().to_owned(),
                    RuleTally {
                        rule_id: r.id().to_owned(),
                        primitive: r.primitive().to_owned(),
                        namespace: ns.name().to_owned(),
                        ..RuleTally::default()
                    },
                )
            })
        })
        .collect();
    for (p, e) in probes.iter().zip(evaluations) {
        report.replayed += 1;
        let logged_tier = (p.logged.decision == "downgrade")
            .then_some(p.logged.effective_model_tier.as_deref())
            .flatten();
        let logged = label(&p.logged.decision, logged_tier);
        let now_tier = (e.decision == DecisionKind::Downgrade)
            .then_some(e.downgrade_to.as_deref())
            .flatten();
        let now = label(e.decision.as_str(), now_tier);
        let changed = logged != now;
        if changed {
            if report.mismatches.len() < 50 {
                report.mismatches.push(Mismatch {
                    request_id: p.ctx.request_id.clone(),
                    namespace: p.ctx.budget_namespace.clone(),
                    logged: logged.clone(),
                    candidate: now.clone(),
                    in_flight: 0,
                    in_flight_slack_usd: 0.0,
                });
            }
        } else {
            report.matched += 1;
        }
        let est = p.ctx.estimated_cost_usd;
        let ns_name = e
            .namespace
            .clone()
            .unwrap_or_else(|| p.ctx.budget_namespace.clone());
        let none = || "(none)".to_owned();
        for (map, name) in [
            (&mut namespaces, ns_name),
            (&mut tenants, p.ctx.tenant_id.clone()),
            (&mut features, p.ctx.feature_id.clone().unwrap_or_else(none)),
        ] {
            let t = map.entry(name.clone()).or_insert_with(|| Tally {
                name,
                ..Tally::default()
            });
            t.requests += 1;
            t.logged.add(kind_of(&p.logged.decision));
            t.candidate.add(e.decision);
            t.changed += u64::from(changed);
            match kind_of(&p.logged.decision) {
                DecisionKind::Deny => t.denied_usd_logged += est,
                DecisionKind::Downgrade => t.moved_usd_logged += moved_usd(&p.ctx, logged_tier),
                DecisionKind::Allow => {}
            }
            match e.decision {
                DecisionKind::Deny => t.denied_usd_candidate += est,
                DecisionKind::Downgrade => t.moved_usd_candidate += moved_usd(&p.ctx, now_tier),
                DecisionKind::Allow => {}
            }
        }
        for r in &e.rules {
            if let Some(t) = rules.get_mut(&r.rule_id) {
                t.candidate.add(r.decision);
            }
        }
        for (id, decision) in &p.logged.rules {
            if let Some(t) = rules.get_mut(id) {
                t.logged.add(*decision);
            }
        }
    }
    report.match_rate = if report.replayed == 0 {
        1.0
    } else {
        report.matched as f64 / report.replayed as f64
    };
    report.namespaces = namespaces.into_values().collect();
    report.rules = rules.into_values().collect();
    let most_affected = |map: BTreeMap<String, Tally>| {
        let mut v: Vec<Tally> = map.into_values().filter(|t| t.changed > 0).collect();
        v.sort_by(|a, b| {
            let usd = |t: &Tally| {
                (t.denied_usd_candidate - t.denied_usd_logged).abs()
                    + (t.moved_usd_candidate - t.moved_usd_logged).abs()
            };
            b.changed
                .cmp(&a.changed)
                .then(usd(b).total_cmp(&usd(a)))
                .then(a.name.cmp(&b.name))
        });
        v.truncate(10);
        v
    };
    report.tenants = most_affected(tenants);
    report.features = most_affected(features);
}

/// When a telemetry row (columns prefixed by `table`, such as `c.`, or not) settled, µs since
/// the epoch: its time plus how long its reservation was held (`held_ms`), or, on lines written
/// before that key, plus the provider's latency (which leaves out the time before dispatch and
/// the line's write).
fn settled_at(table: &str) -> String {
    format!("{table}ts_us + coalesce({table}held_ms, {table}latency_ms, 0) * 1000")
}

/// How long before a changed decision's logged millisecond a request of its namespace may have
/// settled and still been in flight when the decision's rules ran: the decision's own
/// millisecond (logs time requests to the millisecond) and one more for the write of the
/// settled request's line, which `held_ms` is measured just before.
pub const IN_FLIGHT_TOLERANCE_US: i64 = 2000;

/// For the listed mismatches: the requests of the same namespace decided before and possibly
/// still in flight at decision time (settled less than [`IN_FLIGHT_TOLERANCE_US`] before it,
/// or after), and their Σ |estimate − cost|.
fn bound_in_flight(engine: &SpendEngine, report: &mut ReplayReport) -> Result<()> {
    if report.mismatches.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = report
        .mismatches
        .iter()
        .map(|m| format!("'{}'", m.request_id.replace('\'', "''")))
        .collect();
    let sql = format!(
        "WITH m AS (
               SELECT o.request_id, o.ord, o.ts_us, p.budget_namespace
               FROM replay_order o JOIN replay_probes p ON p.probe = o.probe
               WHERE o.request_id IN ({})
             )
             SELECT m.request_id, count(*), sum(abs(c.estimated_cost_usd - c.cost_usd))
             FROM m JOIN replay_contrib c
               ON c.budget_namespace IS NOT DISTINCT FROM m.budget_namespace
              AND c.ord < m.ord AND {settled} + {IN_FLIGHT_TOLERANCE_US} > m.ts_us
             WHERE c.status = 'ok' OR c.cost_usd > 0 OR c.held_ms IS NOT NULL
             GROUP BY m.request_id",
        ids.join(", "),
        settled = settled_at("c."),
    );
    let rows = engine.with_conn(|conn| {
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<f64>>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    })?;
    let in_flight: HashMap<String, (u64, f64)> = rows
        .into_iter()
        .map(|(id, n, slack)| (id, (u64::try_from(n).unwrap_or(0), slack.unwrap_or(0.0))))
        .collect();
    for m in &mut report.mismatches {
        if let Some(&(n, slack)) = in_flight.get(&m.request_id) {
            m.in_flight = n;
            m.in_flight_slack_usd = slack;
        }
    }
    report.mismatches_with_in_flight =
        report.mismatches.iter().filter(|m| m.in_flight > 0).count() as u64;
    Ok(())
}

/// The decisions and telemetry files of a logs pair: the rotated ones (`.N` … `.1`, oldest
/// first) then the current one.
pub fn with_rotated(path: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for n in 1.. {
        let mut name = path.to_path_buf().into_os_string();
        name.push(format!(".{n}"));
        let rotated = PathBuf::from(name);
        if !rotated.is_file() {
            break;
        }
        files.push(rotated);
    }
    files.reverse();
    files.push(path.to_path_buf());
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(aggregation: Aggregation, metric: Metric) -> Aggregate {
        Aggregate {
            key: "k".into(),
            metric,
            aggregation,
            window: Window::RollingSeconds(60),
            scope: vec![],
            include_in_flight: true,
        }
    }

    #[test]
    fn empty_windows_read_as_the_gateway_gives_them() {
        let sum = agg(Aggregation::Sum, Metric::CostUsd);
        let avg = agg(Aggregation::Avg, Metric::CostUsd);
        assert_eq!(as_gateway_value(&sum, None, 0), Some(0.0));
        assert_eq!(as_gateway_value(&avg, None, 0), None);
        assert_eq!(as_gateway_value(&avg, Some(2.0), 3), Some(2.0));
        assert_eq!(
            as_gateway_value(&agg(Aggregation::Sum, Metric::LatencyMs), None, 0),
            None
        );
    }

    /// The value `as_of_sql(a)` gives the one probe of `contrib` rows (ord, ts, held ms,
    /// status, cost, estimate), decided at `probe_ts_us`.
    fn value_at(
        a: &Aggregate,
        probe_ts_us: i64,
        contrib: &[(i64, Option<f64>, &str, f64, f64)],
    ) -> (Option<f64>, i64) {
        let conn = duckdb::Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE replay_order (request_id VARCHAR, probe BIGINT, ts_us BIGINT, ord BIGINT);
             CREATE TABLE replay_probes (probe BIGINT, tenant_id VARCHAR, feature_id VARCHAR,
               route_name VARCHAR, budget_namespace VARCHAR, experiment_id VARCHAR, model VARCHAR);
             CREATE TABLE replay_contrib (ord BIGINT, ts_us BIGINT, held_ms DOUBLE,
               latency_ms DOUBLE, status VARCHAR, cost_usd DOUBLE, estimated_cost_usd DOUBLE);",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO replay_order VALUES ('p', 0, ?, ?)",
            params![probe_ts_us, probe_ts_us],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO replay_probes VALUES (0, 'acme', NULL, '/r', 'default', NULL, 'm')",
            [],
        )
        .unwrap();
        for (ts_us, held_ms, status, cost, estimate) in contrib {
            conn.execute(
                "INSERT INTO replay_contrib VALUES (?, ?, ?, 1.0, ?, ?, ?)",
                params![ts_us, ts_us, held_ms, status, cost, estimate],
            )
            .unwrap();
        }
        conn.query_row(&as_of_sql(a), [], |r| Ok((r.get(1)?, r.get(2)?)))
            .unwrap()
    }

    #[test]
    fn a_request_that_ended_at_nothing_was_in_flight_at_its_estimate() {
        let sum = agg(Aggregation::Sum, Metric::CostUsd);
        let at = 1_764_643_800_000_000_i64;
        let rows = [
            // Settled long before: its cost.
            (at - 10_000_000, Some(5.0), "ok", 0.25, 0.5),
            // Still in flight: its estimate.
            (at - 100_000, Some(200.0), "ok", 0.1, 0.3),
            // Ended in an error at $0, still in flight at the probe: its estimate, and it is
            // no sample (only counted rows are).
            (at - 50_000, Some(100.0), "error", 0.0, 0.3),
            // An error that ended before the probe: nothing.
            (at - 5_000_000, Some(10.0), "error", 0.0, 0.3),
        ];
        let (value, samples) = value_at(&sum, at, &rows);
        assert!((value.unwrap() - 0.85).abs() < 1e-9, "{value:?}");
        assert_eq!(samples, 2);
        // Without include_in_flight: the counted rows at their cost.
        let mut settled_only = sum.clone();
        settled_only.include_in_flight = false;
        let (value, samples) = value_at(&settled_only, at, &rows);
        assert!((value.unwrap() - 0.35).abs() < 1e-9, "{value:?}");
        assert_eq!(samples, 2);
    }

    #[test]
    fn windows_end_just_before_the_request() {
        // Sums: running totals, less those before the window's start.
        let sql = as_of_sql(&agg(Aggregation::Sum, Metric::CostUsd));
        assert!(sql.contains("o.ord - 60000000 AS start"), "{sql}");
        assert!(sql.contains("ASOF LEFT JOIN c ON p.ord > c.ord"), "{sql}");
        let mut daily = agg(Aggregation::Sum, Metric::CostUsd);
        daily.window = Window::CalendarDay;
        daily.scope = vec![llmscope_sdk::types::Scope::BudgetNamespace];
        let sql = as_of_sql(&daily);
        assert!(
            sql.contains("coalesce(budget_namespace, chr(1)) AS k0"),
            "{sql}"
        );
        assert!(
            sql.contains("epoch_us(date_trunc('day', make_timestamp(o.ord))) AS start"),
            "{sql}"
        );
        // Maxima and percentiles: a framed window.
        let sql = as_of_sql(&agg(Aggregation::Max, Metric::CostUsd));
        assert!(
            sql.contains("RANGE BETWEEN 60000000 PRECEDING AND 1 PRECEDING"),
            "{sql}"
        );
        daily.aggregation = Aggregation::P95;
        let sql = as_of_sql(&daily);
        assert!(
            sql.contains("PARTITION BY budget_namespace, date_trunc('day', make_timestamp(ord))"),
            "{sql}"
        );
    }
}
