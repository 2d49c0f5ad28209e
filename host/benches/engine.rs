//! The DuckDB engine on synthetic logs (`cargo xtask bench-engine --rows N` generates them and
//! runs this with `LLMSCOPE_BENCH_DATA=<dir>`): ingestion rows/s, snapshot refresh for the seed's
//! rules, each of the five questions, and decision latency with the published aggregates.
#![allow(
    clippy::print_stderr,
    reason = "a benchmark reports failures on stderr"
)]

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use llmscope::engine::{declared_aggregates, SpendEngine};
use llmscope::ledger::Ledger;
use llmscope::policy::{Limits, PolicyRuntime, PolicySet};
use llmscope::queries::{run, QueryParams, Question};
use llmscope::snapshots::LiveSnapshots;
use llmscope_sdk::testing::request;

fn fail(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(1)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn median_of(v: &[f64]) -> f64 {
    median(v.to_vec())
}

fn main() {
    let Some(dir) = std::env::var_os("LLMSCOPE_BENCH_DATA").map(PathBuf::from) else {
        fail("set LLMSCOPE_BENCH_DATA to a directory made by `cargo xtask gen-telemetry` (or run `cargo xtask bench-engine`)");
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let (t, d) = (
        dir.join("telemetry.jsonl"),
        dir.join("policy_decisions.jsonl"),
    );
    let bytes = std::fs::metadata(&t).map(|m| m.len()).unwrap_or(0);

    let engine = SpendEngine::open(None, &t, &d).unwrap_or_else(|e| fail(&e.to_string()));
    let started = Instant::now();
    let report = engine.ingest().unwrap_or_else(|e| fail(&e.to_string()));
    let ingest_s = started.elapsed().as_secs_f64();
    let rows = report.telemetry_rows + report.decision_rows;
    let table_mib = || {
        engine
            .with_conn(|c| {
                c.query_row(
                    "SELECT sum(memory_usage_bytes) FROM duckdb_memory()",
                    [],
                    |r| r.get::<_, f64>(0),
                )
            })
            .unwrap_or_else(|e| fail(&e.to_string()))
            / f64::from(1 << 20)
    };
    let raw_mib = table_mib();
    let started = Instant::now();
    engine.compact().unwrap_or_else(|e| fail(&e.to_string()));
    let compact_s = started.elapsed().as_secs_f64();
    let compact_mib = table_mib();

    let rt =
        Arc::new(PolicyRuntime::new(Limits::default()).unwrap_or_else(|e| fail(&e.to_string())));
    let set = PolicySet::load(
        &root.join("examples/policy.yaml"),
        &root.join("policies"),
        &rt,
    )
    .unwrap_or_else(|e| fail(&format!("{e}\n(run `cargo xtask build-policies`)")));
    let aggregates = declared_aggregates(set.rules(), &[]);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut refresh = Vec::new();
    let mut published = None;
    for _ in 0..5 {
        let s = Instant::now();
        published = Some(
            engine
                .compute(&aggregates, now)
                .unwrap_or_else(|e| fail(&e.to_string())),
        );
        refresh.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let published = published.unwrap_or_default();

    let mut questions = Vec::new();
    for q in Question::ALL {
        let mut times = Vec::new();
        for _ in 0..3 {
            let s = Instant::now();
            black_box(
                run(&engine, q, &QueryParams::default()).unwrap_or_else(|e| fail(&e.to_string())),
            );
            times.push(s.elapsed().as_secs_f64() * 1e3);
        }
        questions.push((q.name(), median(times)));
    }

    let ledger = Ledger::default();
    let mut req = request();
    req.unix_time_ms = now;
    req.tenant_id = "tenant-07".into();
    let mut ns = Vec::with_capacity(100_000);
    for i in 0..120_000 {
        let s = Instant::now();
        let source = LiveSnapshots {
            store: &published,
            ledger: &ledger,
            own: None,
            shared: None,
        };
        black_box(set.evaluate(black_box(&req), &source));
        if i >= 20_000 {
            ns.push(s.elapsed().as_nanos() as f64 / 1e3);
        }
    }
    ns.sort_by(f64::total_cmp);
    let p50 = ns[ns.len() / 2];
    let p99 = ns[ns.len() * 99 / 100];

    println!(
        "\nDuckDB engine on {} telemetry rows ({:.0} MiB) + {} decision rows:\n",
        report.telemetry_rows,
        bytes as f64 / (1 << 20) as f64,
        report.decision_rows
    );
    println!("| metric | measured |");
    println!("|---|---|");
    println!(
        "| ingestion (both logs) | {:.0} rows/s ({rows} rows in {ingest_s:.2} s) |",
        rows as f64 / ingest_s
    );
    println!(
        "| compaction (checkpoint) after ingestion | {compact_s:.2} s: tables {raw_mib:.0} MiB -> {compact_mib:.0} MiB |"
    );
    println!(
        "| snapshot refresh, seed rules ({} aggregates), median of 5 | {:.1} ms |",
        aggregates.len(),
        median_of(&refresh)
    );
    for (name, ms) in &questions {
        println!("| {name}, median of 3 | {ms:.1} ms |");
    }
    println!("| decision latency, seed demo namespace, p50 / p99 | {p50:.2} / {p99:.2} µs |");
    let slowest = questions.iter().map(|(_, ms)| *ms).fold(0.0, f64::max);
    println!(
        "\nbench-result rows={} decision_p50_us={p50:.3} decision_p99_us={p99:.3} ingest_rows_per_s={:.0} refresh_ms={:.2} slowest_question_ms={slowest:.1} compact_s={compact_s:.3} raw_mib={raw_mib:.1} compact_mib={compact_mib:.1}",
        report.telemetry_rows,
        rows as f64 / ingest_s,
        median_of(&refresh)
    );
}
