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

use std::path::{Path, PathBuf};

use duckdb::Connection;
use parking_lot::Mutex;

pub use crate::windows::window_start_us;
pub use aggregates::{declared_aggregates, PublishedAggregates, SpecKey};
pub(crate) use aggregates::{metric_expr, scope_column, COUNTED_ROWS};
use ingest::{IngestState, Progress};
pub use llmscope_wire::records::parse_ts_us;
use schema::SCHEMA;

mod aggregates;
mod batch;
mod fleet;
mod ingest;
mod read;
mod rotation;
mod schema;
mod shared_seed;
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

/// Where ingestion stands in one telemetry file (defined with the writer, which reports the
/// same positions for the lines it appends).
pub use crate::artifacts::LogPosition;

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

impl SpendEngine {
    /// Open an engine over the two logs; `db_path` persists tables and offsets.
    pub fn open(
        db_path: Option<&Path>,
        telemetry_path: &Path,
        decisions_path: &Path,
    ) -> Result<Self, EngineError> {
        let conn = connect(db_path)?;
        conn.execute_batch(SCHEMA)?;
        let state = IngestState::load(&conn)?;
        let progress = state.progress();
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

    /// Run `f` with the connection (after the caller ingested as needed).
    pub fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, duckdb::Error>,
    ) -> Result<T, EngineError> {
        Ok(f(&self.conn.lock())?)
    }
}

/// The database at `db_path` (its directory created as needed), or compressed in-memory
/// storage: a checkpoint ([`SpendEngine::compact`]) shrinks the tables about tenfold and speeds
/// up the scans behind the questions.
fn connect(db_path: Option<&Path>) -> Result<Connection, EngineError> {
    Ok(match db_path {
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
            let c = Connection::open_in_memory()?;
            c.execute_batch("ATTACH ':memory:' AS spend (COMPRESS); USE spend;")?;
            c
        }
    })
}
