//! `llmscope report --out report.html`: one self-contained HTML file (inline SVG and CSS, no
//! scripts, no network) with four charts — daily cost by tenant and feature, budget pressure per
//! namespace, p95 latency primary vs fallback, unsafe routes — and the five answers as tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use crate::engine::{EngineError, SpendEngine};
use crate::queries::{run, Answer, QueryParams, Question};

/// Series kept in the cost-over-time chart; the rest are summed as "other".
const MAX_SERIES: usize = 8;
const PALETTE: [&str; 9] = [
    "#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777",
    "#6b7280",
];
const W: f64 = 760.0;
const H: f64 = 260.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "(none)".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Named series of values, one per x position (or one per bar in a group).
type Series = Vec<(String, Vec<f64>)>;

/// Daily cost per `tenant / feature` series: (days, series name → cost per day).
fn daily_cost(engine: &SpendEngine, p: &QueryParams) -> Result<(Vec<i64>, Series), EngineError> {
    let rows: Vec<(i64, String, f64)> = engine.with_conn(|conn| {
        let mut stmt = conn.prepare(
            "SELECT ts_us // 86400000000 AS day, tenant_id || ' / ' || coalesce(feature_id, '-') AS series, sum(cost_usd)
             FROM telemetry WHERE status <> 'denied' AND ts_us >= ? AND ts_us < ?
             GROUP BY day, series ORDER BY day",
        )?;
        let mapped = stmt.query_map(duckdb::params![p.since_us.unwrap_or(i64::MIN), p.until_us.unwrap_or(i64::MAX)], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, f64>(2)?))
        })?;
        mapped.collect()
    })?;
    let mut days: Vec<i64> = rows.iter().map(|r| r.0).collect();
    days.sort_unstable();
    days.dedup();
    let mut totals: BTreeMap<String, f64> = BTreeMap::new();
    for (_, s, c) in &rows {
        *totals.entry(s.clone()).or_default() += c;
    }
    let mut ranked: Vec<(String, f64)> = totals.into_iter().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let kept: Vec<String> = ranked
        .iter()
        .take(MAX_SERIES)
        .map(|(s, _)| s.clone())
        .collect();
    let mut series: Vec<(String, Vec<f64>)> = kept
        .iter()
        .map(|s| (s.clone(), vec![0.0; days.len()]))
        .collect();
    let mut other = vec![0.0; days.len()];
    for (day, s, c) in rows {
        let i = days.binary_search(&day).unwrap_or(0);
        match kept.iter().position(|k| *k == s) {
            Some(k) => series[k].1[i] += c,
            None => other[i] += c,
        }
    }
    if other.iter().any(|c| *c > 0.0) {
        series.push(("other".into(), other));
    }
    Ok((days, series))
}

fn line_chart(days: &[i64], series: &[(String, Vec<f64>)]) -> String {
    if days.is_empty() {
        return "<p class=empty>No provider calls in the selected period.</p>".into();
    }
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let (left, bottom, plot_w, plot_h) = (70.0, H - 30.0, W - 90.0, H - 50.0);
    let x = |i: usize| {
        left + if days.len() > 1 {
            plot_w * i as f64 / (days.len() - 1) as f64
        } else {
            plot_w / 2.0
        }
    };
    let y = |v: f64| bottom - plot_h * v / max;
    let mut svg = format!(
        "<svg viewBox=\"0 0 {W} {}\" role=img aria-label=\"daily cost by tenant and feature\">",
        H + 20.0 * series.len().div_ceil(3) as f64
    );
    for k in 0..=4 {
        let v = max * f64::from(k) / 4.0;
        let _ = write!(svg, "<line x1={left} x2={} y1={:.1} y2={:.1} class=grid /><text x={} y={:.1} class=axis text-anchor=end>${v:.4}</text>", left + plot_w, y(v), y(v), left - 6.0, y(v) + 4.0);
    }
    let label_every = days.len().div_ceil(8).max(1);
    for (i, day) in days.iter().enumerate() {
        if i % label_every == 0 {
            let date = time::OffsetDateTime::from_unix_timestamp(day * 86_400)
                .map(|d| d.date().to_string())
                .unwrap_or_default();
            let _ = write!(
                svg,
                "<text x={:.1} y={} class=axis text-anchor=middle>{date}</text>",
                x(i),
                bottom + 16.0
            );
        }
    }
    for (n, (name, values)) in series.iter().enumerate() {
        let color = PALETTE[n % PALETTE.len()];
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect();
        let _ = write!(svg, "<polyline fill=none stroke=\"{color}\" stroke-width=2 points=\"{}\"><title>{}</title></polyline>", points.join(" "), esc(name));
        let (lx, ly) = (
            left + (n % 3) as f64 * 230.0,
            H + 8.0 + (n / 3) as f64 * 20.0,
        );
        let _ = write!(svg, "<rect x={lx} y={} width=12 height=12 fill=\"{color}\" /><text x={} y={ly} class=legend>{}</text>", ly - 10.0, lx + 16.0, esc(name));
    }
    svg.push_str("</svg>");
    svg
}

/// Horizontal bars: one group per label, one bar per value (with its legend name).
fn bar_chart(
    groups: &[(String, Vec<f64>)],
    legend: &[&str],
    unit: &str,
    threshold: Option<f64>,
) -> String {
    if groups.is_empty() {
        return "<p class=empty>Nothing to show.</p>".into();
    }
    let max = groups
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .chain(threshold)
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let bar_h = 14.0;
    let group_h = bar_h * legend.len() as f64 + 10.0;
    let (left, plot_w) = (190.0, W - 290.0);
    let height = 30.0 + group_h * groups.len() as f64 + 24.0;
    let mut svg = format!("<svg viewBox=\"0 0 {W} {height}\" role=img>");
    for (g, (label, values)) in groups.iter().enumerate() {
        let top = 20.0 + g as f64 * group_h;
        let _ = write!(
            svg,
            "<text x={} y={:.1} class=axis text-anchor=end>{}</text>",
            left - 8.0,
            top + group_h / 2.0,
            esc(label)
        );
        for (i, v) in values.iter().enumerate() {
            let w = plot_w * v / max;
            let yy = top + i as f64 * bar_h;
            let _ = write!(
                svg,
                "<rect x={left} y={yy:.1} width={w:.1} height={} fill=\"{}\"><title>{}: {v}</title></rect><text x={:.1} y={:.1} class=value>{}</text>",
                bar_h - 2.0,
                PALETTE[i % PALETTE.len()],
                esc(legend[i]),
                left + w + 4.0,
                yy + bar_h - 4.0,
                format_value(*v, unit)
            );
        }
    }
    if let Some(t) = threshold {
        let tx = left + plot_w * t / max;
        let _ = write!(svg, "<line x1={tx:.1} x2={tx:.1} y1=12 y2={:.1} class=threshold /><text x={tx:.1} y=10 class=axis text-anchor=middle>threshold {}</text>", height - 30.0, format_value(t, unit));
    }
    for (i, name) in legend.iter().enumerate() {
        let lx = left + i as f64 * 150.0;
        let _ = write!(svg, "<rect x={lx} y={:.1} width=12 height=12 fill=\"{}\" /><text x={} y={:.1} class=legend>{}</text>", height - 16.0, PALETTE[i % PALETTE.len()], lx + 16.0, height - 6.0, esc(name));
    }
    svg.push_str("</svg>");
    svg
}

fn format_value(v: f64, unit: &str) -> String {
    match unit {
        "usd" => format!("${v:.4}"),
        "ms" => format!("{v:.0} ms"),
        _ => format!("{v}"),
    }
}

fn table(a: &Answer) -> String {
    let mut out = String::from("<table><thead><tr>");
    for c in &a.columns {
        let _ = write!(out, "<th>{}</th>", esc(c));
    }
    out.push_str("</tr></thead><tbody>");
    if a.rows.is_empty() {
        let _ = write!(
            out,
            "<tr><td colspan={} class=empty>no rows</td></tr>",
            a.columns.len()
        );
    }
    for r in &a.rows {
        out.push_str("<tr>");
        for v in r {
            let cell = match v {
                Value::Number(n) if n.is_f64() => format!("{:.6}", n.as_f64().unwrap_or(0.0)),
                other => text(other),
            };
            let _ = write!(out, "<td>{}</td>", esc(&cell));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

/// Render the report from what `engine` has ingested.
pub fn render(
    engine: &SpendEngine,
    p: &QueryParams,
    generated_at: &str,
) -> Result<String, EngineError> {
    let answers: Vec<Answer> = Question::ALL
        .iter()
        .map(|q| run(engine, *q, p))
        .collect::<Result<_, _>>()?;
    let charts = Charts::gather(engine, p, &answers)?;
    let unsafe_count = answers[4].rows.len();

    let mut html = String::with_capacity(64 * 1024);
    write_head(&mut html, engine, p, generated_at);
    charts.write(&mut html, p, unsafe_count);
    for a in &answers {
        let _ = write!(
            html,
            "<section><h2>{}</h2>{}</section>",
            esc(a.query),
            table(a)
        );
    }
    html.push_str("</body></html>\n");
    Ok(html)
}

/// The document up to the first section: the style sheet, the title and where the data is from.
fn write_head(html: &mut String, engine: &SpendEngine, p: &QueryParams, generated_at: &str) {
    let _ = write!(
        html,
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>llmscope cost report</title><style>
body{{font:14px system-ui,sans-serif;margin:2em auto;max-width:820px;color:#111}}h1{{margin-bottom:0}}
.meta{{color:#666;margin-top:.2em}}section{{margin:2em 0}}svg{{width:100%;height:auto}}
.grid{{stroke:#e5e7eb}}.axis,.legend,.value{{font-size:11px;fill:#374151}}.threshold{{stroke:#dc2626;stroke-dasharray:4 3}}
table{{border-collapse:collapse;width:100%;font-size:12px}}th,td{{border-bottom:1px solid #e5e7eb;padding:3px 6px;text-align:left}}
.empty{{color:#888;font-style:italic}}
</style></head><body><h1>llmscope cost report</h1><p class=meta>Generated {} from {}. Unsafe-route threshold ${:.4} per request.</p>",
        esc(generated_at),
        esc(&engine.telemetry_path().display().to_string()),
        p.threshold_usd
    );
}

/// What the four charts plot, gathered before any HTML is written.
struct Charts {
    /// Days of the cost-over-time chart.
    days: Vec<i64>,
    /// Cost per day of each `tenant / feature` series.
    series: Series,
    /// Allow, downgrade and deny counts per namespace.
    pressure: Series,
    /// p95 latency per route, primary then fallback.
    latency: Series,
    /// Average and max cost per route, every route (not only the unsafe ones).
    routes: Series,
}

impl Charts {
    /// The chart data: daily cost and every route's cost are queried; pressure and latency are
    /// taken from the five `answers`.
    fn gather(
        engine: &SpendEngine,
        p: &QueryParams,
        answers: &[Answer],
    ) -> Result<Self, EngineError> {
        let (days, series) = daily_cost(engine, p)?;
        let pressure: Vec<(String, Vec<f64>)> = answers[2]
            .rows
            .iter()
            .map(|r| (text(&r[0]), vec![num(&r[1]), num(&r[2]), num(&r[3])]))
            .collect();
        let mut latency: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for r in &answers[3].rows {
            let entry = latency.entry(text(&r[0])).or_insert_with(|| vec![0.0, 0.0]);
            entry[usize::from(r[1].as_bool().unwrap_or(false))] = num(&r[2]);
        }
        let latency: Vec<(String, Vec<f64>)> = latency.into_iter().collect();
        let all_routes = run(
            engine,
            Question::UnsafeRoutes,
            &QueryParams {
                threshold_usd: -1.0,
                ..*p
            },
        )?;
        let routes: Vec<(String, Vec<f64>)> = all_routes
            .rows
            .iter()
            .map(|r| (text(&r[0]), vec![num(&r[1]), num(&r[2])]))
            .collect();
        Ok(Self {
            days,
            series,
            pressure,
            latency,
            routes,
        })
    }

    /// The four chart sections; `unsafe_count` routes are above the threshold.
    fn write(&self, html: &mut String, p: &QueryParams, unsafe_count: usize) {
        let Self {
            days,
            series,
            pressure,
            latency,
            routes,
        } = self;
        let _ = write!(
            html,
            "<section><h2>Daily cost by tenant and feature</h2>{}</section>",
            line_chart(days, series)
        );
        let _ = write!(
            html,
            "<section><h2>Budget pressure per namespace</h2>{}</section>",
            bar_chart(pressure, &["allow", "downgrade", "deny"], "count", None)
        );
        let _ = write!(
            html,
            "<section><h2>p95 latency: primary vs fallback</h2>{}</section>",
            bar_chart(latency, &["primary", "fallback"], "ms", None)
        );
        let _ =
            write!(
            html,
            "<section><h2>Routes against the margin threshold ({unsafe_count} unsafe)</h2>{}</section>",
            bar_chart(routes, &["average cost", "max cost"], "usd", Some(p.threshold_usd))
        );
    }
}
