//! The DuckDB engine: a derived, rebuildable view of the JSONL logs.
//!
//! - **Ingestion** tails `telemetry.jsonl` and `policy_decisions.jsonl` by byte offset into typed
//!   tables: lines are parsed into Arrow columns (`batch.rs`) and the Appender takes them in
//!   file order; a backlog of 32 MiB or more is read and parsed on every core while the
//!   previous read is appended. The rows and the new offset commit in one transaction. A torn
//!   last line (no newline yet) is left for the next pass; a malformed line is skipped, counted
//!   and reported, never fatal. A file that shrank or whose first line changed was rotated or
//!   truncated: it is read again from the start (rows already ingested stay — they are still
//!   history).
//! - **Aggregates** for policies are computed as grouped SQL, one query per distinct aggregate
//!   across the loaded rules, and published as hash tables: a request's lookup never touches SQL.
//! - **The five questions** run on the same tables ([`crate::queries`]).
//!
//! With `duckdb_path` set, tables and offsets persist, so a restart resumes instead of
//! re-reading; delete the file to rebuild it from the logs.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use duckdb::{params, Connection};
use llmscope_sdk::types::{
    Aggregate, AggregateValue, Aggregation, Metric, RequestContext, Scope, Window,
};
use parking_lot::Mutex;

use crate::snapshots::AggregateStore;
pub use llmscope_wire::records::parse_ts_us;

mod batch;

/// An engine failure.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// DuckDB reported an error.
    #[error("duckdb: {0}")]
    Db(#[from] duckdb::Error),
    /// A log could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS telemetry (
    ts_us BIGINT NOT NULL, request_id VARCHAR, tenant_id VARCHAR, caller_id VARCHAR,
    feature_id VARCHAR, experiment_id VARCHAR, budget_namespace VARCHAR, route_name VARCHAR,
    requested_model_tier VARCHAR, model_tier VARCHAR, provider VARCHAR, model VARCHAR,
    tokens_in BIGINT, tokens_out BIGINT, estimated_cost_usd DOUBLE, cost_usd DOUBLE,
    latency_ms DOUBLE, status VARCHAR, finish_reason VARCHAR, is_fallback BOOLEAN,
    policy_decision VARCHAR, policy_id VARCHAR);
CREATE TABLE IF NOT EXISTS decisions (
    ts_us BIGINT NOT NULL, request_id VARCHAR, tenant_id VARCHAR, feature_id VARCHAR,
    experiment_id VARCHAR, budget_namespace VARCHAR, route_name VARCHAR, decision VARCHAR,
    policy_id VARCHAR, primitive VARCHAR, estimated_cost_usd DOUBLE,
    requested_model_tier VARCHAR, effective_model_tier VARCHAR);
CREATE TABLE IF NOT EXISTS llmscope_ingest (
    file VARCHAR PRIMARY KEY, offset_bytes BIGINT NOT NULL, head VARCHAR NOT NULL, malformed BIGINT NOT NULL);
";

/// Which log a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Telemetry,
    Decisions,
}

impl Kind {
    fn key(self) -> &'static str {
        match self {
            Self::Telemetry => "telemetry",
            Self::Decisions => "decisions",
        }
    }
}

/// Where ingestion stands for one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Cursor {
    offset: u64,
    head: String,
    malformed: u64,
}

/// What one ingestion pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestReport {
    /// Telemetry rows added.
    pub telemetry_rows: u64,
    /// Decision rows added.
    pub decision_rows: u64,
    /// Malformed lines skipped in this pass, with file and byte offset.
    pub malformed: Vec<String>,
    /// Telemetry bytes ingested so far (the ledger drops settled entries up to here).
    pub telemetry_offset: u64,
    /// Every telemetry file this pass read, with the offset ingested through.
    pub telemetry_through: Vec<crate::artifacts::LogPosition>,
    /// Files that were found rotated or truncated and re-read from the start.
    pub rotated: Vec<String>,
}

/// The engine. All methods block; call them off the async workers.
pub struct SpendEngine {
    conn: Mutex<Connection>,
    telemetry_path: PathBuf,
    decisions_path: PathBuf,
    cursors: Mutex<HashMap<&'static str, Cursor>>,
    /// Rows appended since the last [`Self::compact`].
    uncompacted_rows: std::sync::atomic::AtomicU64,
    /// When [`Self::compact`] last ran.
    compacted_at: Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for SpendEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpendEngine")
            .field("telemetry", &self.telemetry_path)
            .field("decisions", &self.decisions_path)
            .finish()
    }
}

/// Rows that make a compaction worthwhile: one DuckDB row group.
pub const COMPACT_MIN_ROWS: u64 = 122_880;
/// Least time between compactions, which bounds their cost under sustained load.
pub const COMPACT_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// Bytes read per chunk while ingesting.
const CHUNK: usize = 8 << 20;
/// Backlogs from this size on (a start on existing logs, a query after a quiet period) are
/// read and parsed on other threads while this one appends. Smaller ones, such as a serving
/// gateway's refresh, stay on the calling thread: spawning threads for every refresh made glibc
/// keep a heap per short-lived thread, which cost over 100 MiB of RSS under load.
const PARALLEL_MIN_BYTES: u64 = 32 << 20;
/// Bytes of the first line kept to recognise a file.
const HEAD_BYTES: usize = 128;

impl SpendEngine {
    /// Open an engine over the two logs; `db_path` persists tables and offsets.
    pub fn open(
        db_path: Option<&Path>,
        telemetry_path: &Path,
        decisions_path: &Path,
    ) -> Result<Self, EngineError> {
        let conn = match db_path {
            Some(p) => {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|source| EngineError::Io {
                        path: dir.into(),
                        source,
                    })?;
                }
                Connection::open(p)?
            }
            None => {
                // Compressed in-memory storage: a checkpoint ([`Self::compact`]) shrinks the
                // tables about tenfold and speeds up the scans behind the questions.
                let c = Connection::open_in_memory()?;
                c.execute_batch("ATTACH ':memory:' AS spend (COMPRESS); USE spend;")?;
                c
            }
        };
        conn.execute_batch(SCHEMA)?;
        let mut cursors = HashMap::new();
        {
            let mut stmt =
                conn.prepare("SELECT file, offset_bytes, head, malformed FROM llmscope_ingest")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            for row in rows {
                let (file, offset, head, malformed) = row?;
                let key = if file == Kind::Telemetry.key() {
                    Kind::Telemetry.key()
                } else {
                    Kind::Decisions.key()
                };
                cursors.insert(
                    key,
                    Cursor {
                        offset: offset.max(0) as u64,
                        head,
                        malformed: malformed.max(0) as u64,
                    },
                );
            }
        }
        Ok(Self {
            conn: Mutex::new(conn),
            telemetry_path: telemetry_path.into(),
            decisions_path: decisions_path.into(),
            cursors: Mutex::new(cursors),
            uncompacted_rows: std::sync::atomic::AtomicU64::new(0),
            compacted_at: Mutex::new(None),
        })
    }

    /// Compress what was ingested since the last compaction (a DuckDB checkpoint), once at
    /// least [`COMPACT_MIN_ROWS`] rows are waiting and [`COMPACT_MIN_INTERVAL`] has passed;
    /// returns whether it ran. Freshly appended rows sit uncompressed (~200 bytes a row);
    /// compressed they take about a tenth and scan two to three times faster. It holds the
    /// connection for ~0.5 s per million rows at first, then ~0.1–0.5 s per increment, so
    /// callers run it after publishing a refresh, not inside one.
    pub fn compact(&self) -> Result<bool, EngineError> {
        use std::sync::atomic::Ordering;
        if self.uncompacted_rows.load(Ordering::Relaxed) < COMPACT_MIN_ROWS {
            return Ok(false);
        }
        let mut compacted_at = self.compacted_at.lock();
        if compacted_at.is_some_and(|at| at.elapsed() < COMPACT_MIN_INTERVAL) {
            return Ok(false);
        }
        *compacted_at = Some(std::time::Instant::now());
        let conn = self.conn.lock();
        let waiting = self.uncompacted_rows.swap(0, Ordering::Relaxed);
        if let Err(e) = conn.execute_batch("CHECKPOINT") {
            self.uncompacted_rows.fetch_add(waiting, Ordering::Relaxed);
            return Err(e.into());
        }
        Ok(true)
    }

    /// The telemetry log.
    pub fn telemetry_path(&self) -> &Path {
        &self.telemetry_path
    }

    /// Malformed lines skipped so far, per log.
    pub fn malformed_total(&self) -> (u64, u64) {
        let c = self.cursors.lock();
        (
            c.get("telemetry").map_or(0, |c| c.malformed),
            c.get("decisions").map_or(0, |c| c.malformed),
        )
    }

    /// Ingest whatever was appended to both logs since the last pass.
    pub fn ingest(&self) -> Result<IngestReport, EngineError> {
        let mut report = IngestReport::default();
        for kind in [Kind::Telemetry, Kind::Decisions] {
            let path = match kind {
                Kind::Telemetry => self.telemetry_path.clone(),
                Kind::Decisions => self.decisions_path.clone(),
            };
            let rows = self.ingest_file(kind, &path, &mut report)?;
            match kind {
                Kind::Telemetry => report.telemetry_rows = rows,
                Kind::Decisions => report.decision_rows = rows,
            }
        }
        report.telemetry_offset = self.cursors.lock().get("telemetry").map_or(0, |c| c.offset);
        if let Ok(m) = std::fs::metadata(&self.telemetry_path) {
            use std::os::unix::fs::MetadataExt;
            report
                .telemetry_through
                .push(crate::artifacts::LogPosition {
                    file_id: m.ino(),
                    offset: report.telemetry_offset,
                });
        }
        self.uncompacted_rows.fetch_add(
            report.telemetry_rows + report.decision_rows,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(report)
    }

    fn ingest_file(
        &self,
        kind: Kind,
        path: &Path,
        report: &mut IngestReport,
    ) -> Result<u64, EngineError> {
        let io = |source| EngineError::Io {
            path: path.into(),
            source,
        };
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(e)),
        };
        let len = file.metadata().map_err(io)?.len();
        let mut cursor = self
            .cursors
            .lock()
            .get(kind.key())
            .cloned()
            .unwrap_or_default();
        let head = read_head(&mut file).map_err(io)?;
        if cursor.offset > 0 && (len < cursor.offset || head != cursor.head) {
            tracing::warn!(file = %path.display(), previous_offset = cursor.offset, len, "log was rotated or truncated; reading it from the start");
            report.rotated.push(path.display().to_string());
            cursor.offset = 0;
        }
        cursor.head = head;
        if len == cursor.offset {
            self.cursors.lock().insert(kind.key(), cursor);
            return Ok(0);
        }
        file.seek(SeekFrom::Start(cursor.offset)).map_err(io)?;
        let conn = self.conn.lock();
        // One transaction: the rows and the new offset are stored together or not at all, so
        // a failure (or a crash with `duckdb_path`) never ingests a line twice.
        conn.execute_batch("BEGIN TRANSACTION")?;
        let pending = len - cursor.offset;
        let appended = append_from(&conn, kind, file, pending, path, &mut cursor, report);
        match appended {
            Ok(_) => conn.execute_batch("COMMIT")?,
            Err(_) => {
                if let Err(e) = conn.execute_batch("ROLLBACK") {
                    tracing::warn!(error = %e, "rolling back a failed ingestion");
                }
            }
        }
        let rows = appended?;
        drop(conn);
        if !report.malformed.is_empty() {
            tracing::warn!(file = %path.display(), skipped = report.malformed.len(), first = %report.malformed[0], "malformed log lines skipped");
        }
        self.cursors.lock().insert(kind.key(), cursor);
        Ok(rows)
    }

    /// Run `f` with the connection (after the caller ingested as needed).
    pub fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, duckdb::Error>,
    ) -> Result<T, EngineError> {
        Ok(f(&self.conn.lock())?)
    }

    /// Compute every distinct aggregate in `aggregates` as of `now_ms`.
    pub fn compute(
        &self,
        aggregates: &[Aggregate],
        now_ms: u64,
    ) -> Result<PublishedAggregates, EngineError> {
        let mut tables = HashMap::new();
        let conn = self.conn.lock();
        for a in aggregates {
            let key = SpecKey::of(a);
            if tables.contains_key(&key) {
                continue;
            }
            let (start_us, period) = window_start_us(a.window, now_ms);
            let cols: Vec<&str> = key.scope.iter().map(|s| scope_column(*s)).collect();
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
            let sql = format!(
                "SELECT {select_cols}{agg}, count(*) FROM telemetry WHERE (status = 'ok' OR cost_usd > 0) AND ts_us >= ? AND ts_us <= ?{group}"
            );
            let now_us = i64::try_from(now_ms)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000);
            let mut stmt = conn.prepare(&sql)?;
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
            tables.insert(
                key,
                Table {
                    period_start_us: period,
                    values,
                },
            );
        }
        Ok(PublishedAggregates {
            taken_at_ms: now_ms,
            tables,
        })
    }
}

/// Append the lines of `file` from `cursor.offset` on (about `pending` bytes). For a large
/// backlog a thread reads and parses (on every core) while this one appends, so parsing the
/// next read overlaps appending this one; a smaller increment (the usual refresh) is read
/// and parsed here. Advances `cursor` past the last complete line and stores it with the rows.
fn append_from(
    conn: &Connection,
    kind: Kind,
    file: File,
    pending: u64,
    path: &Path,
    cursor: &mut Cursor,
    report: &mut IngestReport,
) -> Result<u64, EngineError> {
    let table = kind.key();
    let mut appender = conn.appender(table)?;
    let mut rows = 0u64;
    let mut append = |parts: std::io::Result<Vec<batch::Parsed>>| -> Result<(), EngineError> {
        let parts = parts.map_err(|source| EngineError::Io {
            path: path.into(),
            source,
        })?;
        for parsed in parts {
            let n = parsed.batch.num_rows();
            if n > 0 {
                appender.append_record_batch(parsed.batch)?;
                rows += n as u64;
            }
            for m in parsed.malformed {
                cursor.malformed += 1;
                if report.malformed.len() < 100 {
                    report
                        .malformed
                        .push(format!("{}:{}: {}", path.display(), m.offset, m.why));
                }
            }
        }
        Ok(())
    };
    let start = cursor.offset;
    let end = if pending < PARALLEL_MIN_BYTES {
        let mut failed = None;
        let end = read_and_parse(file, kind, start, pending, 1, |parts| match append(parts) {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        end
    } else {
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        std::thread::scope(|s| -> Result<u64, EngineError> {
            let reader = s.spawn(move || {
                let threads = batch::threads();
                read_and_parse(file, kind, start, pending, threads, |parts| {
                    tx.send(parts).is_ok()
                })
            });
            for parts in &rx {
                append(parts)?;
            }
            Ok(reader
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        })?
    };
    appender.flush()?;
    drop(appender);
    cursor.offset = end;
    conn.execute(
        "INSERT OR REPLACE INTO llmscope_ingest VALUES (?, ?, ?, ?)",
        params![
            table,
            i64::try_from(cursor.offset).unwrap_or(i64::MAX),
            cursor.head,
            i64::try_from(cursor.malformed).unwrap_or(i64::MAX)
        ],
    )?;
    Ok(rows)
}

/// Read `file` to its end in reads of up to [`CHUNK`] (sized for the `pending` bytes expected)
/// and hand the complete lines of each, parsed on up to `threads` threads, to `sink`, which
/// returns whether to go on;
/// returns the offset after the last complete line. A torn last line is left for the next pass;
/// a read error is handed on and ends the reading.
fn read_and_parse(
    mut file: File,
    kind: Kind,
    mut line_start: u64,
    pending: u64,
    threads: usize,
    mut sink: impl FnMut(std::io::Result<Vec<batch::Parsed>>) -> bool,
) -> u64 {
    let mut carry: Vec<u8> = Vec::new();
    let size = usize::try_from(pending).map_or(CHUNK, |p| p.clamp(64 << 10, CHUNK));
    let mut buf = vec![0u8; size];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                sink(Err(e));
                break;
            }
        };
        carry.extend_from_slice(&buf[..n]);
        let Some(last_newline) = carry.iter().rposition(|b| *b == b'\n') else {
            continue;
        };
        let parts = batch::parse(kind, &carry[..=last_newline], line_start, threads);
        line_start += last_newline as u64 + 1;
        carry.drain(..=last_newline);
        if !sink(Ok(parts)) {
            break;
        }
    }
    line_start
}

fn read_head(file: &mut File) -> std::io::Result<String> {
    let mut head = vec![0u8; HEAD_BYTES];
    file.seek(SeekFrom::Start(0))?;
    let mut filled = 0;
    while filled < HEAD_BYTES {
        let n = file.read(&mut head[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    head.truncate(filled);
    if let Some(nl) = head.iter().position(|b| *b == b'\n') {
        head.truncate(nl);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn scope_column(s: Scope) -> &'static str {
    match s {
        Scope::Tenant => "tenant_id",
        Scope::Feature => "feature_id",
        Scope::Route => "route_name",
        Scope::BudgetNamespace => "budget_namespace",
        Scope::Experiment => "experiment_id",
        Scope::Model => "model",
    }
}

fn metric_expr(m: Metric) -> &'static str {
    match m {
        Metric::CostUsd => "cost_usd",
        Metric::TokensIn => "tokens_in",
        Metric::TokensOut => "tokens_out",
        Metric::Requests => "1",
        Metric::LatencyMs => "latency_ms",
    }
}

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

/// Start of `window` ending at `now_ms`, in µs, and the calendar period start when calendar.
pub fn window_start_us(window: Window, now_ms: u64) -> (i64, Option<i64>) {
    let now_us = i64::try_from(now_ms)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000);
    match window {
        Window::RollingSeconds(s) => (
            now_us.saturating_sub(
                i64::try_from(s)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1_000_000),
            ),
            None,
        ),
        cal => {
            let start = calendar_start_us(cal, now_ms);
            (start, Some(start))
        }
    }
}

fn calendar_start_us(window: Window, now_ms: u64) -> i64 {
    let now = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let date = now.date();
    let start = match window {
        Window::CalendarHour => date.with_hms(now.hour(), 0, 0),
        Window::CalendarDay => date.with_hms(0, 0, 0),
        Window::CalendarMonth => date.replace_day(1).and_then(|d| d.with_hms(0, 0, 0)),
        Window::RollingSeconds(_) => date.with_hms(0, 0, 0),
    };
    start.map_or(0, |s| (s.assume_utc().unix_timestamp_nanos() / 1000) as i64)
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

#[derive(Debug, Clone, Default)]
struct Table {
    period_start_us: Option<i64>,
    values: HashMap<Vec<Option<String>>, (Option<f64>, u64)>,
}

/// Aggregate values published after a refresh; lookups are hash probes.
#[derive(Debug, Clone, Default)]
pub struct PublishedAggregates {
    taken_at_ms: u64,
    tables: HashMap<SpecKey, Table>,
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
