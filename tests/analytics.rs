//! The DuckDB engine: ingestion (torn, malformed, rotated, missing, persisted), aggregate
//! snapshots for each primitive's declarations and window boundaries, and the five questions
//! against fixtures with hand-computed rows, in-process and through `llmscope query`.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "integration tests: a failed unwrap or panic is a failed test"
)]

use std::io::Write;
use std::path::{Path, PathBuf};

use llmscope::engine::{parse_ts_us, SpendEngine};
use llmscope::queries::{run, QueryParams, Question};
use llmscope::snapshots::AggregateStore;
use llmscope_sdk::testing::request;
use llmscope_sdk::types::{Aggregate, Aggregation, Metric, Scope, Window};
use serde_json::{json, Value};

fn fixtures() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let src = llmscope_tests::root().join("tests/fixtures/logs");
    let (t, d) = (
        dir.path().join("telemetry.jsonl"),
        dir.path().join("policy_decisions.jsonl"),
    );
    std::fs::copy(src.join("telemetry.jsonl"), &t).unwrap();
    std::fs::copy(src.join("policy_decisions.jsonl"), &d).unwrap();
    (dir, t, d)
}

fn engine(t: &Path, d: &Path) -> SpendEngine {
    let e = SpendEngine::open(None, t, d).unwrap();
    e.ingest().unwrap();
    e
}

fn rows(e: &SpendEngine, q: Question, p: QueryParams) -> Vec<Vec<Value>> {
    run(e, q, &p).unwrap().rows
}

fn close(a: &Value, b: f64) -> bool {
    (a.as_f64().unwrap() - b).abs() < 1e-9
}

#[test]
fn ingestion_skips_malformed_lines_and_leaves_the_torn_tail() {
    let (_dir, t, d) = fixtures();
    let e = SpendEngine::open(None, &t, &d).unwrap();
    let report = e.ingest().unwrap();
    assert_eq!(report.telemetry_rows, 6);
    assert_eq!(report.decision_rows, 6);
    assert_eq!(report.malformed.len(), 2, "{:?}", report.malformed);
    assert!(
        report.malformed[0].contains("telemetry.jsonl:")
            && report.malformed[0].contains("not a time"),
        "{:?}",
        report.malformed
    );
    assert!(
        report.malformed[1].contains("not a telemetry record"),
        "{:?}",
        report.malformed
    );
    let text = std::fs::read(&t).unwrap();
    let torn_start = text.iter().rposition(|b| *b == b'\n').unwrap() as u64 + 1;
    assert_eq!(
        report.telemetry_offset, torn_start,
        "the torn line is not consumed"
    );

    // Completing the torn line makes it ingestible; nothing is read twice.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&t)
        .unwrap()
        .write_all(b"}\n")
        .unwrap();
    let again = e.ingest().unwrap();
    assert_eq!((again.telemetry_rows, again.malformed.len()), (1, 0));
    assert_eq!(e.malformed_total(), (2, 0));
    // The decisions log's torn tail is still incomplete, so it still waits.
    assert_eq!(again.decision_rows, 0);
}

#[test]
fn a_log_of_many_reads_is_ingested_whole_in_parallel_and_names_each_bad_line() {
    // ~40 MiB, a backlog large enough to go parallel: several 8 MiB reads, each parsed in parts
    // on every core while the previous one is appended. Every good line lands once, every bad
    // one is reported at its offset.
    let dir = tempfile::tempdir().unwrap();
    let (t, d) = (dir.path().join("t.jsonl"), dir.path().join("d.jsonl"));
    let mut text = Vec::new();
    let (mut good, mut bad_at) = (0u64, Vec::new());
    while text.len() < 40 << 20 {
        let i = good + bad_at.len() as u64;
        if i % 9_973 == 5 {
            bad_at.push(text.len());
            text.extend_from_slice(b"{\"timestamp\": \"not a time\", \"tenant_id\": \"x\"}\n");
            continue;
        }
        let line = json!({"timestamp": "2025-11-25T10:00:00Z", "request_id": format!("r{i}"),
            "tenant_id": format!("t{}", i % 7), "feature_id": "f", "route_name": "/r",
            "cost_usd": 0.01, "status": "ok", "padding": "x".repeat(300)});
        text.extend_from_slice(line.to_string().as_bytes());
        text.push(b'\n');
        good += 1;
    }
    text.extend_from_slice(b"{\"timestamp\": \"2025-11-25T10:00:00Z\", \"ten"); // torn
    std::fs::write(&t, &text).unwrap();
    let e = SpendEngine::open(None, &t, &d).unwrap();
    let report = e.ingest().unwrap();
    assert_eq!(report.telemetry_rows, good);
    let offsets: Vec<String> = bad_at.iter().map(|at| format!("t.jsonl:{at}: ")).collect();
    assert_eq!(report.malformed.len(), bad_at.len());
    for (line, offset) in report.malformed.iter().zip(&offsets) {
        assert!(line.contains(offset), "{line} should name {offset}");
    }
    let torn_start = text.iter().rposition(|b| *b == b'\n').unwrap() as u64 + 1;
    assert_eq!(report.telemetry_offset, torn_start);
    let (rows, distinct, total): (i64, i64, f64) = e
        .with_conn(|c| {
            c.query_row(
                "SELECT count(*), count(DISTINCT request_id), sum(cost_usd) FROM telemetry",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
        })
        .unwrap();
    assert_eq!(
        (rows as u64, distinct as u64),
        (good, good),
        "each line once"
    );
    assert!((total - good as f64 * 0.01).abs() < 1e-6, "{total}");
}

#[test]
fn compaction_shrinks_the_tables_and_keeps_every_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (t, d) = (dir.path().join("t.jsonl"), dir.path().join("d.jsonl"));
    let rows = llmscope::engine::COMPACT_MIN_ROWS + 1_000;
    let mut text = String::new();
    for i in 0..rows {
        text.push_str(&format!(
            "{{\"timestamp\":\"2025-11-25T10:{:02}:00Z\",\"request_id\":\"r{i}\",\"tenant_id\":\"t{}\",\"feature_id\":\"f{}\",\"route_name\":\"/r\",\"model\":\"gpt-4o\",\"cost_usd\":0.25,\"latency_ms\":{}.5,\"status\":\"ok\"}}\n",
            i % 60,
            i % 7,
            i % 3,
            i % 1000
        ));
    }
    std::fs::write(&t, text).unwrap();
    let e = SpendEngine::open(None, &t, &d).unwrap();
    assert!(
        !e.compact().unwrap(),
        "nothing ingested yet: nothing to compact"
    );
    e.ingest().unwrap();
    let memory = |e: &SpendEngine| -> i64 {
        e.with_conn(|c| {
            c.query_row(
                "SELECT sum(memory_usage_bytes)::BIGINT FROM duckdb_memory()",
                [],
                |r| r.get(0),
            )
        })
        .unwrap()
    };
    let before = rows_of_every_question(&e);
    assert_eq!(
        before[0].len(),
        7 * 3,
        "cost by tenant and feature has every pair"
    );
    let raw = memory(&e);
    assert!(e.compact().unwrap(), "{rows} rows waiting: compacted");
    let compacted = memory(&e);
    assert!(
        compacted * 3 < raw,
        "tables shrink: {raw} bytes -> {compacted} bytes"
    );
    assert_eq!(rows_of_every_question(&e), before, "same answers");
    e.ingest().unwrap();
    assert!(!e.compact().unwrap(), "nothing new: no second compaction");
}

fn rows_of_every_question(e: &SpendEngine) -> Vec<Vec<Vec<Value>>> {
    Question::ALL
        .iter()
        .map(|q| rows(e, *q, QueryParams::default()))
        .collect()
}

#[test]
fn missing_and_empty_logs_are_empty_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (t, d) = (
        dir.path().join("none.jsonl"),
        dir.path().join("empty.jsonl"),
    );
    std::fs::write(&d, "").unwrap();
    let e = engine(&t, &d);
    for q in Question::ALL {
        assert!(
            rows(&e, q, QueryParams::default()).is_empty(),
            "{}",
            q.name()
        );
    }
}

#[test]
fn rotated_logs_are_read_from_the_start() {
    let (_dir, t, d) = fixtures();
    let e = engine(&t, &d);
    std::fs::write(&t, "{\"timestamp\":\"2025-11-25T00:00:00Z\",\"tenant_id\":\"new\",\"cost_usd\":1.0,\"route_name\":\"/r\"}\n").unwrap();
    let report = e.ingest().unwrap();
    assert_eq!(report.telemetry_rows, 1);
    assert_eq!(report.rotated.len(), 1);
    let r = rows(&e, Question::CostByTenantAndFeature, QueryParams::default());
    assert_eq!(
        r[0][0], "new",
        "new rows are added and old history kept: {r:?}"
    );
    assert_eq!(r.len(), 5);
}

#[test]
fn a_persisted_database_resumes_with_the_same_answers() {
    let (dir, t, d) = fixtures();
    let db = dir.path().join("state/llmscope.duckdb");
    let first = {
        let e = SpendEngine::open(Some(&db), &t, &d).unwrap();
        e.ingest().unwrap();
        Question::ALL.map(|q| {
            rows(
                &e,
                q,
                QueryParams {
                    threshold_usd: 0.01,
                    ..QueryParams::default()
                },
            )
        })
    };
    let e = SpendEngine::open(Some(&db), &t, &d).unwrap();
    let report = e.ingest().unwrap();
    assert_eq!(
        (report.telemetry_rows, report.decision_rows),
        (0, 0),
        "nothing is re-read after a restart"
    );
    let second = Question::ALL.map(|q| {
        rows(
            &e,
            q,
            QueryParams {
                threshold_usd: 0.01,
                ..QueryParams::default()
            },
        )
    });
    assert_eq!(first, second);
}

#[test]
fn cost_by_tenant_and_feature() {
    let (_dir, t, d) = fixtures();
    let e = engine(&t, &d);
    let a = run(
        &e,
        Question::CostByTenantAndFeature,
        &QueryParams::default(),
    )
    .unwrap();
    assert_eq!(
        a.columns,
        [
            "tenant_id",
            "feature_id",
            "total_cost_usd",
            "avg_cost_usd",
            "request_count"
        ]
    );
    let expected = [
        ("globex", "chat", 0.08, 0.08, 1),
        ("globex", "summarize", 0.06, 0.06, 1),
        ("acme", "chat", 0.01, 0.01, 1),
        ("acme", "summarize", 0.006, 0.003, 2),
    ];
    assert_eq!(a.rows.len(), expected.len(), "{:?}", a.rows);
    for (row, (tenant, feature, total, avg, n)) in a.rows.iter().zip(expected) {
        assert_eq!(
            (row[0].as_str(), row[1].as_str(), row[4].as_i64()),
            (Some(tenant), Some(feature), Some(n)),
            "{row:?}"
        );
        assert!(close(&row[2], total) && close(&row[3], avg), "{row:?}");
    }
}

#[test]
fn experiment_cost_vs_outcome() {
    let (_dir, t, d) = fixtures();
    let e = engine(&t, &d);
    let r = rows(
        &e,
        Question::ExperimentCostVsOutcome,
        QueryParams::default(),
    );
    assert_eq!(r.len(), 2);
    // exp-b: r3 + r5; exp-a: r1 + r2 (the denied r6 is not a provider call).
    assert_eq!(r[0][0], "exp-b");
    assert!(
        close(&r[0][1], 350.0)
            && close(&r[0][2], 175.0)
            && close(&r[0][3], 0.045)
            && close(&r[0][4], 1.0)
    );
    assert_eq!(r[0][5], 2);
    assert_eq!(r[1][0], "exp-a");
    assert!(
        close(&r[1][1], 150.0)
            && close(&r[1][2], 75.0)
            && close(&r[1][3], 0.003)
            && close(&r[1][4], 0.5)
    );
}

#[test]
fn budget_pressure_by_namespace() {
    let (_dir, t, d) = fixtures();
    let e = engine(&t, &d);
    let r = rows(
        &e,
        Question::BudgetPressureByNamespace,
        QueryParams::default(),
    );
    assert_eq!(
        r,
        vec![
            vec![json!("demo"), json!(1), json!(1), json!(2), json!(4)],
            vec![json!("default"), json!(2), json!(0), json!(0), json!(2)]
        ]
    );
}

#[test]
fn fallback_latency_masking() {
    let (_dir, t, d) = fixtures();
    let e = engine(&t, &d);
    let r = rows(&e, Question::FallbackLatencyMasking, QueryParams::default());
    // Highest p95 first, as the reference orders them.
    let expected = [
        ("/answer-routed", true, 1000.0, 1000.0, 1),
        ("/conversation-turn", false, 400.0, 400.0, 1),
        ("/answer-routed", false, 290.0, 200.0, 2),
        ("/conversation-turn", true, 200.0, 200.0, 1),
    ];
    assert_eq!(r.len(), 4, "{r:?}");
    for (row, (route, fb, p95, avg, n)) in r.iter().zip(expected) {
        assert_eq!(
            (row[0].as_str(), row[1].as_bool(), row[4].as_i64()),
            (Some(route), Some(fb), Some(n)),
            "{row:?}"
        );
        assert!(close(&row[2], p95) && close(&row[3], avg), "{row:?}");
    }
}

#[test]
fn unsafe_routes_with_thresholds() {
    let (_dir, t, d) = fixtures();
    let e = engine(&t, &d);
    assert!(
        rows(&e, Question::UnsafeRoutes, QueryParams::default()).is_empty(),
        "nothing above $0.05 on average"
    );
    let r = rows(
        &e,
        Question::UnsafeRoutes,
        QueryParams {
            threshold_usd: 0.03,
            ..QueryParams::default()
        },
    );
    assert_eq!(r.len(), 1);
    assert_eq!(r[0][0], "/conversation-turn");
    assert!(close(&r[0][1], 0.045) && close(&r[0][2], 0.08));
    let r = rows(
        &e,
        Question::UnsafeRoutes,
        QueryParams {
            threshold_usd: 0.01,
            ..QueryParams::default()
        },
    );
    assert_eq!(
        r.iter().map(|r| r[0].as_str().unwrap()).collect::<Vec<_>>(),
        ["/conversation-turn", "/answer-routed"]
    );
    assert!(close(&r[1][1], 0.022));
}

/// An engine over logs of `telemetry` and `decisions` lines.
fn engine_of(telemetry: &[Value], decisions: &[Value]) -> (tempfile::TempDir, SpendEngine) {
    let dir = tempfile::tempdir().unwrap();
    let (t, d) = (
        dir.path().join("telemetry.jsonl"),
        dir.path().join("policy_decisions.jsonl"),
    );
    let jsonl = |lines: &[Value]| lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    std::fs::write(&t, jsonl(telemetry)).unwrap();
    std::fs::write(&d, jsonl(decisions)).unwrap();
    let e = engine(&t, &d);
    (dir, e)
}

fn call(
    tenant: &str,
    feature: &str,
    route: Option<&str>,
    cost: f64,
    latency: Option<f64>,
) -> Value {
    let mut v = json!({
        "timestamp": "2025-11-24T10:00:00Z", "tenant_id": tenant, "feature_id": feature,
        "cost_usd": cost, "status": "ok", "is_fallback": false,
    });
    if let Some(r) = route {
        v["route_name"] = json!(r);
    }
    if let Some(l) = latency {
        v["latency_ms"] = json!(l);
    }
    v
}

#[test]
fn cost_by_tenant_and_feature_ranks_by_total_cost() {
    // acme/chat: 10 cheap calls, $0.10 in all ($0.01 each); globex/summarize: one $0.05 call.
    // The reference ranks by total cost, so acme/chat comes first despite its lower average.
    let mut telemetry: Vec<Value> = (0..10)
        .map(|_| call("acme", "chat", Some("/r"), 0.01, Some(10.0)))
        .collect();
    telemetry.push(call("globex", "summarize", Some("/r"), 0.05, Some(10.0)));
    let (_dir, e) = engine_of(&telemetry, &[]);
    let r = rows(&e, Question::CostByTenantAndFeature, QueryParams::default());
    assert_eq!(
        r.iter()
            .map(|row| (row[0].as_str().unwrap(), row[1].as_str().unwrap()))
            .collect::<Vec<_>>(),
        [("acme", "chat"), ("globex", "summarize")],
        "{r:?}"
    );
    assert!(
        close(&r[0][2], 0.1) && close(&r[0][3], 0.01) && r[0][4] == 10,
        "{r:?}"
    );
}

#[test]
fn fallback_latency_masking_ranks_by_p95_latency() {
    let mut fallback = call("acme", "chat", Some("/a"), 0.01, Some(50.0));
    fallback["is_fallback"] = json!(true);
    let telemetry = [
        call("acme", "chat", Some("/a"), 0.01, Some(900.0)),
        fallback,
        call("acme", "chat", Some("/b"), 0.01, Some(100.0)),
    ];
    let (_dir, e) = engine_of(&telemetry, &[]);
    let r = rows(&e, Question::FallbackLatencyMasking, QueryParams::default());
    assert_eq!(
        r.iter()
            .map(|row| (row[0].as_str().unwrap(), row[1].as_bool().unwrap()))
            .collect::<Vec<_>>(),
        [("/a", false), ("/b", false), ("/a", true)],
        "slowest p95 first: {r:?}"
    );
}

#[test]
fn fallback_latency_masking_leaves_out_calls_without_route_or_latency() {
    let telemetry = [
        call("acme", "chat", Some("/a"), 0.01, Some(100.0)),
        call("acme", "chat", Some("/a"), 0.01, None),
        call("acme", "chat", None, 0.01, Some(5000.0)),
    ];
    let (_dir, e) = engine_of(&telemetry, &[]);
    let r = rows(&e, Question::FallbackLatencyMasking, QueryParams::default());
    assert_eq!(
        r,
        vec![vec![
            json!("/a"),
            json!(false),
            json!(100.0),
            json!(100.0),
            json!(1)
        ]]
    );
}

#[test]
fn budget_pressure_leaves_out_decisions_without_a_namespace() {
    let decision = |ns: Option<&str>, decision: &str| {
        let mut v =
            json!({"timestamp": "2025-11-24T10:00:00Z", "tenant_id": "acme", "decision": decision});
        if let Some(ns) = ns {
            v["budget_namespace"] = json!(ns);
        }
        v
    };
    let decisions = [
        decision(None, "deny"),
        decision(None, "deny"),
        decision(Some("demo"), "deny"),
        decision(Some("demo"), "allow"),
        decision(Some("default"), "allow"),
    ];
    let (_dir, e) = engine_of(&[], &decisions);
    let r = rows(
        &e,
        Question::BudgetPressureByNamespace,
        QueryParams::default(),
    );
    assert_eq!(
        r,
        vec![
            vec![json!("demo"), json!(1), json!(0), json!(1), json!(2)],
            vec![json!("default"), json!(1), json!(0), json!(0), json!(1)]
        ]
    );
}

#[test]
fn unsafe_routes_leaves_out_calls_without_a_route() {
    let telemetry = [
        call("acme", "chat", Some("/a"), 0.10, Some(10.0)),
        call("acme", "chat", None, 0.50, Some(10.0)),
    ];
    let (_dir, e) = engine_of(&telemetry, &[]);
    let r = rows(&e, Question::UnsafeRoutes, QueryParams::default());
    assert_eq!(r, vec![vec![json!("/a"), json!(0.1), json!(0.1), json!(1)]]);
}

#[test]
fn time_filters_respect_utc_offsets() {
    let (_dir, t, d) = fixtures();
    let e = engine(&t, &d);
    // r4 is 13:15+02:00 = 11:15Z, inside [.., 11:30Z); read as 13:15Z it would be outside.
    let until = QueryParams {
        until_us: Some(parse_ts_us("2025-11-24T11:30:00Z").unwrap()),
        ..QueryParams::default()
    };
    let r = rows(&e, Question::CostByTenantAndFeature, until);
    assert!(
        r.iter()
            .any(|row| row[0] == "globex" && row[1] == "summarize"),
        "{r:?}"
    );
    assert!(
        !r.iter().any(|row| row[1] == "chat" && row[0] == "globex"),
        "r5 at 12:00Z is excluded: {r:?}"
    );
    let since = QueryParams {
        since_us: Some(parse_ts_us("2025-11-24T10:12:00+00:00").unwrap()),
        ..QueryParams::default()
    };
    // d3 is 10:10-05:00 = 15:10Z: after 10:12Z.
    let r = rows(&e, Question::BudgetPressureByNamespace, since);
    assert_eq!(
        r[0],
        vec![json!("demo"), json!(0), json!(0), json!(2), json!(2)]
    );
}

fn agg(metric: Metric, aggregation: Aggregation, window: Window, scope: Vec<Scope>) -> Aggregate {
    Aggregate {
        key: "k".into(),
        metric,
        aggregation,
        window,
        scope,
        include_in_flight: false,
    }
}

#[test]
fn snapshots_for_each_primitives_aggregates_and_window_boundaries() {
    let (_dir, t, d) = fixtures();
    let e = engine(&t, &d);
    let now = u64::try_from(parse_ts_us("2025-11-24T12:10:00Z").unwrap() / 1000).unwrap();
    let rolling_hour = agg(
        Metric::CostUsd,
        Aggregation::Sum,
        Window::RollingSeconds(3600),
        vec![Scope::BudgetNamespace],
    );
    let cal_hour = agg(
        Metric::CostUsd,
        Aggregation::Sum,
        Window::CalendarHour,
        vec![Scope::BudgetNamespace],
    );
    let cal_day = agg(
        Metric::CostUsd,
        Aggregation::Sum,
        Window::CalendarDay,
        vec![Scope::BudgetNamespace],
    );
    let cal_month = agg(
        Metric::CostUsd,
        Aggregation::Sum,
        Window::CalendarMonth,
        vec![Scope::BudgetNamespace],
    );
    let baseline = agg(
        Metric::CostUsd,
        Aggregation::Avg,
        Window::RollingSeconds(86_400),
        vec![Scope::Feature],
    );
    let p95 = agg(
        Metric::LatencyMs,
        Aggregation::P95,
        Window::CalendarDay,
        vec![],
    );
    let count = agg(
        Metric::Requests,
        Aggregation::Count,
        Window::CalendarDay,
        vec![Scope::Tenant, Scope::Feature],
    );
    let published = e
        .compute(
            &[
                rolling_hour.clone(),
                cal_hour.clone(),
                cal_day.clone(),
                cal_month.clone(),
                baseline.clone(),
                p95.clone(),
                count.clone(),
            ],
            now,
        )
        .unwrap();
    assert_eq!(published.len(), 7);

    let mut req = request();
    req.unix_time_ms = now;
    req.budget_namespace = "default".into();
    let v = |a: &Aggregate, r: &llmscope_sdk::types::RequestContext| {
        published
            .lookup(a, r)
            .map(|v| (v.value.unwrap(), v.samples))
    };
    // default: r4 (11:15Z, $0.06) and r5 (12:00Z, $0.08).
    let (sum, n) = v(&rolling_hour, &req).unwrap();
    assert!((sum - 0.14).abs() < 1e-12 && n == 2);
    let (sum, n) = v(&cal_hour, &req).unwrap();
    assert!((sum - 0.08).abs() < 1e-12 && n == 1, "only 12:00-12:10");
    req.budget_namespace = "demo".into();
    assert_eq!(
        v(&rolling_hour, &req),
        None,
        "no demo spend in the last hour"
    );
    let (sum, n) = v(&cal_day, &req).unwrap();
    assert!(
        (sum - 0.016).abs() < 1e-12 && n == 3,
        "denied r6 does not count"
    );
    assert!(v(&cal_month, &req).is_some());
    // cost_anomaly's baseline: per-feature average.
    req.feature_id = Some("summarize".into());
    let (avg, n) = v(&baseline, &req).unwrap();
    assert!((avg - 0.022).abs() < 1e-12 && n == 3);
    let (p, n) = v(&p95, &req).unwrap();
    assert!(n == 5 && p > 400.0 && p <= 1000.0, "{p}");
    req.tenant_id = "acme".into();
    assert_eq!(v(&count, &req), Some((2.0, 2)));
    // A request in the next calendar day (or month) sees a fresh window, not yesterday's spend.
    req.unix_time_ms = u64::try_from(parse_ts_us("2025-11-25T00:00:01Z").unwrap() / 1000).unwrap();
    assert_eq!(v(&cal_day, &req), None);
    req.unix_time_ms = u64::try_from(parse_ts_us("2025-12-01T00:00:00Z").unwrap() / 1000).unwrap();
    assert_eq!(v(&cal_month, &req), None);
}

#[test]
fn query_cli_formats_errors_and_notes() {
    let (_dir, t, d) = fixtures();
    let out = llmscope_tests::llmscope()
        .args([
            "query",
            "budget_pressure_by_namespace",
            "--format",
            "csv",
            "--telemetry",
        ])
        .arg(&t)
        .arg("--decisions")
        .arg(&d)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "budget_namespace,allow_count,downgrade_count,deny_count,total_count\ndemo,1,1,2,4\ndefault,2,0,0,2\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("skipped malformed line"),
        "malformed lines are reported"
    );

    let out = llmscope_tests::llmscope()
        .args([
            "query",
            "unsafe_routes",
            "--threshold",
            "0.03",
            "--format",
            "json",
            "--telemetry",
        ])
        .arg(&t)
        .arg("--decisions")
        .arg(&d)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["columns"],
        json!([
            "route_name",
            "avg_cost_usd",
            "max_cost_usd",
            "request_count"
        ])
    );
    assert_eq!(v["rows"][0][0], "/conversation-turn");

    let out = llmscope_tests::llmscope()
        .args(["query", "cost_by_tenant_and_feature", "--telemetry"])
        .arg(&t)
        .arg("--decisions")
        .arg(&d)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with("tenant_id  feature_id  total_cost_usd"),
        "{table}"
    );
    assert!(
        table.lines().nth(2).unwrap().starts_with("globex     chat"),
        "{table}"
    );

    let out = llmscope_tests::llmscope()
        .args(["query", "cost_by_tenant", "--telemetry", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cost_by_tenant_and_feature") && stderr.contains("unsafe_routes"),
        "{stderr}"
    );

    let out = llmscope_tests::llmscope()
        .args([
            "query",
            "unsafe_routes",
            "--telemetry",
            "/nonexistent/t.jsonl",
            "--decisions",
            "/nonexistent/d.jsonl",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("note: telemetry log /nonexistent/t.jsonl does not exist"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        2,
        "header and rule only"
    );

    let out = llmscope_tests::llmscope()
        .args(["query", "unsafe_routes", "--since", "yesterday"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither an RFC 3339 time"));
}

/// Replicas each write their own logs; `query` read one pair only, so the fleet's answers
/// were one replica's. Several `--telemetry` / `--decisions` files or globs now count them all.
#[test]
fn query_covers_every_replica_given_as_globs_or_repeated_files() {
    let src = llmscope_tests::root().join("tests/fixtures/logs");
    let dir = tempfile::tempdir().unwrap();
    for (replica, tenant) in [("a", "acme"), ("b", "initech")] {
        let at = dir.path().join(replica);
        std::fs::create_dir_all(&at).unwrap();
        for log in ["telemetry.jsonl", "policy_decisions.jsonl"] {
            // Replica b served other requests (its own ids) for another tenant.
            let text = std::fs::read_to_string(src.join(log))
                .unwrap()
                .replace(
                    "\"request_id\":\"r",
                    &format!("\"request_id\":\"{replica}-r"),
                )
                .replace(
                    "\"tenant_id\":\"acme\"",
                    &format!("\"tenant_id\":\"{tenant}\""),
                );
            std::fs::write(at.join(log), text).unwrap();
        }
    }
    let total = |args: &[String]| -> (f64, Vec<String>) {
        let out = llmscope_tests::llmscope()
            .args(["query", "cost_by_tenant_and_feature", "--format", "json"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let rows = v["rows"].as_array().unwrap();
        let mut tenants: Vec<String> = rows
            .iter()
            .map(|r| r[0].as_str().unwrap().to_owned())
            .collect();
        tenants.sort();
        tenants.dedup();
        (rows.iter().map(|r| r[2].as_f64().unwrap()).sum(), tenants)
    };
    let at = |p: &str| dir.path().join(p).display().to_string();
    let (one, _) = total(&[
        "--telemetry".into(),
        at("a/telemetry.jsonl"),
        "--decisions".into(),
        at("a/policy_decisions.jsonl"),
    ]);
    let (globbed, tenants) = total(&[
        "--telemetry".into(),
        at("*/telemetry.jsonl"),
        "--decisions".into(),
        at("*/policy_decisions.jsonl"),
    ]);
    assert!(one > 0.0);
    assert!(
        (globbed - 2.0 * one).abs() < 1e-9,
        "both replicas: {globbed} vs one {one}"
    );
    assert_eq!(tenants, ["acme", "globex", "initech"]);
    let (repeated, _) = total(&[
        "--telemetry".into(),
        at("a/telemetry.jsonl"),
        "--telemetry".into(),
        at("b/telemetry.jsonl"),
        "--decisions".into(),
        at("a/policy_decisions.jsonl"),
        "--decisions".into(),
        at("b/policy_decisions.jsonl"),
    ]);
    assert!((repeated - globbed).abs() < 1e-12);

    let out = llmscope_tests::llmscope()
        .args(["query", "cost_by_tenant_and_feature", "--telemetry"])
        .arg(at("*/nothing.jsonl"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("matches no file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn report_is_one_self_contained_html_file() {
    let (dir, t, d) = fixtures();
    let out = dir.path().join("report.html");
    let status = llmscope_tests::llmscope()
        .args(["report", "--threshold", "0.03", "--out"])
        .arg(&out)
        .arg("--telemetry")
        .arg(&t)
        .arg("--decisions")
        .arg(&d)
        .status()
        .unwrap();
    assert!(status.success());
    let html = std::fs::read_to_string(&out).unwrap();
    assert!(html.starts_with("<!doctype html>") && html.trim_end().ends_with("</html>"));
    assert_eq!(html.matches("<svg").count(), 4, "four charts");
    for needle in [
        "Daily cost by tenant and feature",
        "Budget pressure per namespace",
        "p95 latency: primary vs fallback",
        "(1 unsafe)",
        "globex / chat",
        "cost_by_tenant_and_feature",
        "threshold $0.0300",
    ] {
        assert!(html.contains(needle), "missing {needle}");
    }
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("<script"),
        "no network, no scripts"
    );
}
