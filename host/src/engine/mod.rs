//! The DuckDB engine: a derived, rebuildable view of the JSONL logs.
//!
//! - **Ingestion** tails `telemetry.jsonl` and `policy_decisions.jsonl` by byte offset into typed
//!   tables: lines are parsed into Arrow columns (`batch.rs`) and the Appender takes them in
//!   file order; a backlog of 32 MiB or more is read and parsed on every core while the
//!   previous read is appended.
//! - **One pass at a time.** [`SpendEngine::ingest`] is serialized per engine (concurrent
//!   callers — the refresh loop, a query, a reload — wait for each other): a log's cursor is
//!   read, its lines appended and the new cursor committed and stored under one lock, so the
//!   same bytes are never appended twice. The rows and the new cursor commit in one DuckDB
//!   transaction; a failed pass rolls both back and leaves the cursor and the held file as they
//!   were, so the next pass reads the same lines again, once.
//! - **Lines.** Every line of a log becomes one row or one malformed count (blank lines are
//!   neither). A torn last line (no newline yet) is left for the next pass; a malformed line is
//!   skipped, counted ([`SpendEngine::malformed_total`]) and reported with its file and byte
//!   offset, never fatal.
//! - **Rotation.** The engine keeps each log's file open between passes and knows it by
//!   (device, inode). Each pass opens the path and compares:
//!   - *The same file*, no shorter than the cursor and with the same first line: read on from
//!     the cursor.
//!   - *The same file, shorter than the cursor or with another first line* (copytruncate, or a
//!     truncate and rewrite): read again from the start; rows already ingested stay (they are
//!     still history). Lines written between logrotate's copy and its truncate that no pass read
//!     are only in the copy: they are not ingested.
//!   - *Another file* (a rename rotation: `mv telemetry.jsonl telemetry.jsonl.1`, then the
//!     writer reopens the path), once it holds data: the held old file is first read from the
//!     cursor to its end — lines the writer appended after the rename included — then the new
//!     file from offset 0, both in one transaction. A fragment without a newline at the old
//!     file's end will never be completed: it is counted and reported as malformed, named
//!     `<path> (rotated, inode N):<offset>`. While the new file is still empty (logrotate
//!     created it, the writer has not reopened yet) or the path is missing, the held file is
//!     still the log and is tailed as before. A line written to the old file after a pass has
//!     switched to the new one is not read (a writer that reopens writes the new file only
//!     after its last write to the old one).
//!   - *No file held yet* (the first pass, or an engine restarted with a persisted
//!     `duckdb_path`): the persisted cursor's first line recognises the file. One shorter than
//!     the cursor or with another first line was rotated or truncated: it is read from offset 0.
//!     Lines written to the old file after the persisted cursor are not recoverable (the engine
//!     never learns the old file's new name).
//!
//!   [`IngestReport::telemetry_through`] says, per telemetry file, how far it was ingested
//!   ([`LogPosition`]: inode and offset), so the ledger can drop the in-memory entries the
//!   tables now count; plain offsets are ambiguous once a log rotates.
//! - **Aggregates** for policies are computed as grouped SQL, one query per distinct aggregate
//!   across the loaded rules, and published as hash tables: a request's lookup never touches SQL.
//! - **The five questions** run on the same tables ([`crate::queries`]).
//!
//! With `duckdb_path` set, tables and offsets persist, so a restart resumes instead of
//! re-reading; delete the file to rebuild it from the logs.

use std::collections::{HashMap, HashSet};
use std::fs::{File, Metadata};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use duckdb::{params, Connection};
use llmscope_sdk::types::{
    Aggregate, AggregateValue, Aggregation, Metric, RequestContext, Scope, Window,
};
use parking_lot::Mutex;

use crate::snapshots::AggregateStore;
pub use llmscope_wire::records::parse_ts_us;

mod batch;
#[cfg(test)]
mod tests;

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

/// Where ingestion stands in one telemetry file (defined with the writer, which reports the
/// same positions for the lines it appends).
pub use crate::artifacts::LogPosition;

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
    /// Malformed lines skipped in this pass (at most 100), with file and byte offset.
    pub malformed: Vec<String>,
    /// Telemetry bytes ingested so far in the current telemetry file. After a rotation this is
    /// an offset in the new file: prefer [`Self::telemetry_through`].
    pub telemetry_offset: u64,
    /// Every telemetry file this pass read or drained, in reading order, each with the offset
    /// it was ingested through: a rotated-away file at its end, then the current file at its
    /// cursor (listed even when nothing new was read; absent only while no telemetry file has
    /// been seen). Files drained by an earlier pass whose report was lost to an error come
    /// first.
    pub telemetry_through: Vec<LogPosition>,
    /// Files that were found rotated or truncated and read from the start.
    pub rotated: Vec<String>,
}

/// A log file held open between passes, and its identity.
#[derive(Debug)]
struct Held {
    file: File,
    dev: u64,
    ino: u64,
}

impl Held {
    fn new(file: File, meta: &Metadata) -> Self {
        Self {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    fn same_file(&self, other: &Self) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// Reading state of one log.
#[derive(Debug, Default)]
struct Log {
    cursor: Cursor,
    /// The file last read, kept open so that after a rename rotation it can be read to its end.
    held: Option<Held>,
}

impl Log {
    fn position(&self) -> Option<LogPosition> {
        self.held.as_ref().map(|h| LogPosition {
            file_id: h.ino,
            offset: self.cursor.offset,
        })
    }
}

/// Everything an ingestion pass reads and writes besides the tables; one pass holds it.
#[derive(Debug, Default)]
struct IngestState {
    telemetry: Log,
    decisions: Log,
    /// Telemetry files drained by passes whose report has not been returned yet.
    unreported: Vec<LogPosition>,
}

/// What readers outside a pass may see, published after each log's pass so that they do not
/// wait for a long one.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    malformed: (u64, u64),
    telemetry: Option<LogPosition>,
}

/// The engine. All methods block; call them off the async workers.
pub struct SpendEngine {
    conn: Mutex<Connection>,
    telemetry_path: PathBuf,
    decisions_path: PathBuf,
    /// Held for a whole [`Self::ingest`] pass, then `conn` inside it (never the other order).
    ingest: Mutex<IngestState>,
    progress: Mutex<Progress>,
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
/// Malformed lines listed in one report.
const MALFORMED_LISTED: usize = 100;
/// Most rotated files (`<log>.1` … `<log>.N`) read at start.
const MAX_ROTATED: usize = 400;

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
        let mut state = IngestState::default();
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
                let log = if file == Kind::Telemetry.key() {
                    &mut state.telemetry
                } else {
                    &mut state.decisions
                };
                log.cursor = Cursor {
                    offset: u64::try_from(offset).unwrap_or(0),
                    head,
                    malformed: u64::try_from(malformed).unwrap_or(0),
                };
            }
        }
        let progress = Progress {
            malformed: (
                state.telemetry.cursor.malformed,
                state.decisions.cursor.malformed,
            ),
            telemetry: None,
        };
        Ok(Self {
            conn: Mutex::new(conn),
            telemetry_path: telemetry_path.into(),
            decisions_path: decisions_path.into(),
            ingest: Mutex::new(state),
            progress: Mutex::new(progress),
            uncompacted_rows: std::sync::atomic::AtomicU64::new(0),
            compacted_at: Mutex::new(None),
        })
    }

    /// Append the rotated logs' history: `<log>.1`, `<log>.2`, … (logrotate's rename rotation,
    /// uncompressed; the first missing number ends the list), oldest first. Only for a log with
    /// nothing ingested yet (an in-memory engine at start, or a new `duckdb_path`): without it a
    /// restart after a rotation would start the windows from the current file alone, and
    /// budgets would forget what the rotated files hold. Call before the first
    /// [`Self::ingest`]. Returns the rows appended; malformed lines are logged and skipped.
    pub fn ingest_rotated(&self) -> Result<u64, EngineError> {
        let state = self.ingest.lock();
        let mut total = 0u64;
        for (kind, path, log) in [
            (Kind::Telemetry, &self.telemetry_path, &state.telemetry),
            (Kind::Decisions, &self.decisions_path, &state.decisions),
        ] {
            if log.cursor.offset > 0 || !log.cursor.head.is_empty() || log.held.is_some() {
                continue;
            }
            let rotated: Vec<PathBuf> = (1..=MAX_ROTATED)
                .map(|n| {
                    let mut p = path.as_os_str().to_owned();
                    p.push(format!(".{n}"));
                    PathBuf::from(p)
                })
                .take_while(|p| p.is_file())
                .collect();
            let conn = self.conn.lock();
            for p in rotated.iter().rev() {
                let io = |source| EngineError::Io {
                    path: p.clone(),
                    source,
                };
                let file = File::open(p).map_err(io)?;
                let len = file.metadata().map_err(io)?.len();
                let label = p.display().to_string();
                let mut skipped = Skipped::default();
                let (rows, _) = in_transaction(&conn, || {
                    append_from(&conn, kind, &file, 0, len, &label, &mut skipped)
                })?;
                total = total.saturating_add(rows);
                if skipped.count > 0 {
                    tracing::warn!(file = %label, skipped = skipped.count, first = ?skipped.listed.first(), "malformed lines skipped in a rotated log");
                }
                tracing::info!(file = %label, "rotated log ingested");
            }
        }
        self.uncompacted_rows
            .fetch_add(total, std::sync::atomic::Ordering::Relaxed);
        Ok(total)
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

    /// Malformed lines skipped so far, per log (telemetry, decisions).
    pub fn malformed_total(&self) -> (u64, u64) {
        self.progress.lock().malformed
    }

    /// Where ingestion of the current telemetry file stands: the file (inode) read last and
    /// the offset after its last ingested line; `None` until a pass has found a telemetry file.
    /// It does not wait for a pass under way.
    pub fn telemetry_position(&self) -> Option<LogPosition> {
        self.progress.lock().telemetry
    }

    /// Ingest whatever was appended to both logs since the last pass. One pass runs at a time;
    /// a concurrent call waits for the one under way, then ingests what is left.
    pub fn ingest(&self) -> Result<IngestReport, EngineError> {
        let mut state = self.ingest.lock();
        let IngestState {
            telemetry,
            decisions,
            unreported,
        } = &mut *state;
        let mut report = IngestReport::default();
        let telemetry_rows = self.ingest_log(
            Kind::Telemetry,
            &self.telemetry_path,
            telemetry,
            &mut report,
            unreported,
        );
        self.publish(telemetry, decisions);
        report.telemetry_rows = telemetry_rows?;
        let decision_rows = self.ingest_log(
            Kind::Decisions,
            &self.decisions_path,
            decisions,
            &mut report,
            &mut Vec::new(),
        );
        self.publish(telemetry, decisions);
        report.decision_rows = decision_rows?;
        report.telemetry_offset = telemetry.cursor.offset;
        report.telemetry_through = std::mem::take(unreported);
        report.telemetry_through.extend(telemetry.position());
        Ok(report)
    }

    fn publish(&self, telemetry: &Log, decisions: &Log) {
        *self.progress.lock() = Progress {
            malformed: (telemetry.cursor.malformed, decisions.cursor.malformed),
            telemetry: telemetry.position(),
        };
    }

    /// One log's pass: pick the file to read (see the module doc on rotation), append its new
    /// lines and commit them with the new cursor; `log` changes only once that committed. A
    /// rotated-away file read to its end is added to `drained`.
    fn ingest_log(
        &self,
        kind: Kind,
        path: &Path,
        log: &mut Log,
        report: &mut IngestReport,
        drained: &mut Vec<LogPosition>,
    ) -> Result<u64, EngineError> {
        let io = |source| EngineError::Io {
            path: path.into(),
            source,
        };
        // Open first, then ask the open file who it is: a rotation between the two cannot
        // mix one file's identity with another's content.
        let opened = match File::open(path) {
            Ok(file) => {
                let meta = file.metadata().map_err(io)?;
                Some((Held::new(file, &meta), meta.len()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(e)),
        };
        let (next, drain_old) = match (&log.held, opened) {
            // The path is gone (renamed, not yet recreated): the held file is still the log.
            (_, None) => (None, false),
            (None, Some((new, _))) => (Some(new), false),
            // Same file, or a new one nobody has written yet: keep reading the held one.
            (Some(held), Some((new, len))) if held.same_file(&new) || len == 0 => (None, false),
            (Some(_), Some((new, _))) => (Some(new), true),
        };
        let Some(current) = next.as_ref().or(log.held.as_ref()) else {
            return Ok(0);
        };
        let old = if drain_old { log.held.as_ref() } else { None };
        let label = path.display().to_string();
        let mut cursor = log.cursor.clone();
        let mut rotated = false;
        // The held old file, from where to read it and how long it is.
        let mut drain = None;
        if let Some(old) = old {
            let old_label = format!("{label} (rotated, inode {})", old.ino);
            let (start, reset, _) = resume_at(&old.file, &cursor).map_err(io)?;
            if reset {
                tracing::warn!(file = %old_label, previous_offset = cursor.offset, "rotated-away log was truncated before it was read to its end; reading it from the start");
            }
            let len = old.file.metadata().map_err(io)?.len();
            drain = Some((old, old_label, start, len));
            rotated = true;
            tracing::info!(file = %label, old_inode = old.ino, new_inode = current.ino, "log was rotated (renamed): reading the old file to its end, then the new one from the start");
            cursor.offset = 0;
        }
        let (start, reset, head) = resume_at(&current.file, &cursor).map_err(io)?;
        if reset {
            tracing::warn!(file = %label, previous_offset = cursor.offset, "log was rotated or truncated; reading it from the start");
            rotated = true;
        }
        cursor.offset = start;
        cursor.head = head;
        let len = current.file.metadata().map_err(io)?.len();
        if rotated {
            report.rotated.push(label.clone());
        }
        if drain.is_none() && len == cursor.offset {
            log.cursor = cursor;
            if let Some(next) = next {
                log.held = Some(next);
            }
            return Ok(0);
        }

        let mut skipped = Skipped::default();
        let conn = self.conn.lock();
        // One transaction: the rows and the new cursor are stored together or not at all, so
        // a failure (or a crash with `duckdb_path`) never ingests a line twice.
        let (rows, drained_at) = in_transaction(&conn, || {
            let mut rows = 0;
            let mut drained_at = None;
            if let Some((old, old_label, start, len)) = &drain {
                let pending = len.saturating_sub(*start);
                let (n, end) = append_from(
                    &conn,
                    kind,
                    &old.file,
                    *start,
                    pending,
                    old_label,
                    &mut skipped,
                )?;
                rows += n;
                if let Some(at) = end.fragment {
                    skipped.add(format!(
                        "{old_label}:{at}: an incomplete last line in a rotated-away file, never completed"
                    ));
                }
                drained_at = Some(LogPosition {
                    file_id: old.ino,
                    offset: end.eof,
                });
            }
            let pending = len.saturating_sub(cursor.offset);
            let (n, end) = append_from(
                &conn,
                kind,
                &current.file,
                cursor.offset,
                pending,
                &label,
                &mut skipped,
            )?;
            rows += n;
            cursor.offset = end.lines_end;
            cursor.malformed = cursor.malformed.saturating_add(skipped.count);
            conn.execute(
                "INSERT OR REPLACE INTO llmscope_ingest VALUES (?, ?, ?, ?)",
                params![
                    kind.key(),
                    i64::try_from(cursor.offset).unwrap_or(i64::MAX),
                    cursor.head,
                    i64::try_from(cursor.malformed).unwrap_or(i64::MAX)
                ],
            )?;
            Ok((rows, drained_at))
        })?;
        drop(conn);
        if let Some(first) = skipped.listed.first() {
            tracing::warn!(file = %label, skipped = skipped.count, first = %first, "malformed log lines skipped");
        }
        let room = MALFORMED_LISTED.saturating_sub(report.malformed.len());
        report
            .malformed
            .extend(skipped.listed.into_iter().take(room));
        drained.extend(drained_at);
        log.cursor = cursor;
        if let Some(next) = next {
            log.held = Some(next);
        }
        self.uncompacted_rows
            .fetch_add(rows, std::sync::atomic::Ordering::Relaxed);
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

/// Malformed lines met in one log's pass: all counted, the first [`MALFORMED_LISTED`] listed.
#[derive(Debug, Default)]
struct Skipped {
    count: u64,
    listed: Vec<String>,
}

impl Skipped {
    fn add(&mut self, line: String) {
        self.count = self.count.saturating_add(1);
        if self.listed.len() < MALFORMED_LISTED {
            self.listed.push(line);
        }
    }
}

/// Where a read to the end of a file stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReadEnd {
    /// The offset after the last complete line.
    lines_end: u64,
    /// The offset after the last byte read.
    eof: u64,
    /// Where a last line without a newline starts (not blank), if there is one.
    fragment: Option<u64>,
}

/// Run `f` in one DuckDB transaction: committed when it succeeds, rolled back when it (or the
/// commit) fails, so rows and the cursor stored with them land together or not at all.
fn in_transaction<T>(
    conn: &Connection,
    f: impl FnOnce() -> Result<T, EngineError>,
) -> Result<T, EngineError> {
    conn.execute_batch("BEGIN TRANSACTION")?;
    match f().and_then(|v| conn.execute_batch("COMMIT").map(|()| v).map_err(Into::into)) {
        Ok(v) => Ok(v),
        Err(e) => {
            if let Err(rollback) = conn.execute_batch("ROLLBACK") {
                tracing::warn!(error = %rollback, "rolling back a failed ingestion");
            }
            Err(e)
        }
    }
}

/// Append the complete lines of `file` from byte `start` on (about `pending` bytes) to
/// `kind`'s table, counting malformed ones in `skipped` named by `label` and offset. For a
/// large backlog a thread reads and parses (on every core) while this one appends, so parsing
/// the next read overlaps appending this one; a smaller increment (the usual refresh) is read
/// and parsed here. Returns the rows appended and where the read stopped.
fn append_from(
    conn: &Connection,
    kind: Kind,
    file: &File,
    start: u64,
    pending: u64,
    label: &str,
    skipped: &mut Skipped,
) -> Result<(u64, ReadEnd), EngineError> {
    let mut appender = conn.appender(kind.key())?;
    let mut rows = 0u64;
    let mut append = |parts: std::io::Result<Vec<batch::Parsed>>| -> Result<(), EngineError> {
        let parts = parts.map_err(|source| EngineError::Io {
            path: label.into(),
            source,
        })?;
        for parsed in parts {
            let n = parsed.batch.num_rows();
            if n > 0 {
                appender.append_record_batch(parsed.batch)?;
                rows += n as u64;
            }
            for m in parsed.malformed {
                skipped.add(format!("{label}:{}: {}", m.offset, m.why));
            }
        }
        Ok(())
    };
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
        std::thread::scope(|s| -> Result<ReadEnd, EngineError> {
            // Owned here, so that a failed append drops it before the scope joins the reader:
            // the reader's next send then fails and it stops instead of blocking forever.
            let rx = rx;
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
    Ok((rows, end))
}

/// Read `file` from byte `start` to its end in reads of up to [`CHUNK`] (sized for the
/// `pending` bytes expected) and hand the complete lines of each, parsed on up to `threads`
/// threads, to `sink`, which returns whether to go on. Reads are positioned (`pread`): the
/// handle's own offset is neither used nor moved. A torn last line is not handed on; a read
/// error is, and ends the reading.
fn read_and_parse(
    file: &File,
    kind: Kind,
    start: u64,
    pending: u64,
    threads: usize,
    mut sink: impl FnMut(std::io::Result<Vec<batch::Parsed>>) -> bool,
) -> ReadEnd {
    let mut carry: Vec<u8> = Vec::new();
    let mut line_start = start;
    let mut at = start;
    let size = usize::try_from(pending).map_or(CHUNK, |p| p.clamp(64 << 10, CHUNK));
    let mut buf = vec![0u8; size];
    loop {
        let n = match file.read_at(&mut buf, at) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                sink(Err(e));
                break;
            }
        };
        at = at.saturating_add(n as u64);
        carry.extend_from_slice(&buf[..n]);
        let Some(last_newline) = carry.iter().rposition(|b| *b == b'\n') else {
            continue;
        };
        let parts = batch::parse(kind, &carry[..=last_newline], line_start, threads);
        line_start = line_start.saturating_add(last_newline as u64 + 1);
        carry.drain(..=last_newline);
        if !sink(Ok(parts)) {
            break;
        }
    }
    ReadEnd {
        lines_end: line_start,
        eof: at,
        fragment: (!carry.iter().all(u8::is_ascii_whitespace)).then_some(line_start),
    }
}

/// Where to go on reading `file` for `cursor`, whether that is a restart from 0 because the
/// file is shorter than the cursor or starts with another line than the one the cursor was
/// taken on (rotated or truncated), and the file's head now.
fn resume_at(file: &File, cursor: &Cursor) -> std::io::Result<(u64, bool, String)> {
    let head = read_head(file)?;
    if cursor.offset == 0 {
        return Ok((0, false, head));
    }
    let len = file.metadata()?.len();
    // A head taken while the first line was still being written is a prefix of the whole
    // one: that is the same file, not a rotation (reading it again would double its rows).
    let same_head = head.starts_with(&cursor.head) || cursor.head.starts_with(&head);
    if len < cursor.offset || !same_head {
        Ok((0, true, head))
    } else {
        Ok((cursor.offset, false, head))
    }
}

/// The file's first line, at most [`HEAD_BYTES`] of it.
fn read_head(file: &File) -> std::io::Result<String> {
    let mut head = vec![0u8; HEAD_BYTES];
    let mut filled = 0;
    while filled < HEAD_BYTES {
        let n = match file.read_at(&mut head[filled..], filled as u64) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
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
