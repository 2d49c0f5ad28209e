//! Ingestion passes: which file of a log to read (following rotations; see the module doc of
//! [`super`]), reading it on from the cursor, and committing the rows with the new cursor in
//! one transaction. Also the rotated files' history read at start.

use std::fs::File;
use std::path::{Path, PathBuf};

use duckdb::{params, Connection};

use super::read::{append_from, Cursor, Skipped, MALFORMED_LISTED};
use super::rotation::{open_log, pick_file, plan_pass, Drain, Held, Plan};
use super::schema::Kind;
use super::{EngineError, IngestReport, LogPosition, SpendEngine};

/// Diagnostics keep the target they had before this file was split out of `engine`.
const TARGET: &str = "llmscope::engine";

/// Most rotated files (`<log>.1` … `<log>.N`) read at start.
const MAX_ROTATED: usize = 400;

/// Reading state of one log.
#[derive(Debug, Default)]
struct Log {
    cursor: Cursor,
    /// The file last read, kept open so that after a rename rotation it can be read to its end.
    held: Option<Held>,
}

impl Log {
    /// Take the cursor of a pass, and the file it read when that is another than the one held.
    fn advance(&mut self, cursor: Cursor, next: Option<Held>) {
        self.cursor = cursor;
        if let Some(next) = next {
            self.held = Some(next);
        }
    }

    /// Where ingestion of the held file stands.
    fn position(&self) -> Option<LogPosition> {
        self.held.as_ref().map(|h| LogPosition {
            file_id: h.ino,
            offset: self.cursor.offset,
        })
    }
}

/// Everything an ingestion pass reads and writes besides the tables; one pass holds it.
#[derive(Debug, Default)]
pub(super) struct IngestState {
    telemetry: Log,
    decisions: Log,
    /// Telemetry files drained by passes whose report has not been returned yet.
    unreported: Vec<LogPosition>,
}

impl IngestState {
    /// The cursors persisted in `llmscope_ingest` (none for a new database), no file held yet.
    pub(super) fn load(conn: &Connection) -> Result<Self, duckdb::Error> {
        let mut state = Self::default();
        let mut stmt =
            conn.prepare_cached("SELECT file, offset_bytes, head, malformed FROM llmscope_ingest")?;
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
        Ok(state)
    }

    /// What readers may see before the first pass: the persisted malformed counts.
    pub(super) fn progress(&self) -> Progress {
        Progress {
            malformed: (
                self.telemetry.cursor.malformed,
                self.decisions.cursor.malformed,
            ),
            telemetry: None,
        }
    }
}

/// What readers outside a pass may see, published after each log's pass so that they do not
/// wait for a long one.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Progress {
    /// Malformed lines skipped so far, per log (telemetry, decisions).
    pub(super) malformed: (u64, u64),
    /// Where ingestion of the current telemetry file stands.
    pub(super) telemetry: Option<LogPosition>,
}

impl SpendEngine {
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
            let rotated = rotated_siblings(path);
            let conn = self.conn.lock();
            for p in rotated.iter().rev() {
                let label = p.display().to_string();
                let mut skipped = Skipped::default();
                let rows = append_whole(&conn, kind, p, &mut skipped)?;
                total = total.saturating_add(rows);
                if skipped.count > 0 {
                    tracing::warn!(target: TARGET, file = %label, skipped = skipped.count, first = ?skipped.listed.first(), "malformed lines skipped in a rotated log");
                }
                tracing::info!(target: TARGET, file = %label, "rotated log ingested");
            }
        }
        self.uncompacted_rows
            .fetch_add(total, std::sync::atomic::Ordering::Relaxed);
        Ok(total)
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

    /// Publish what readers outside a pass may see.
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
        let (next, drain_old) = pick_file(log.held.as_ref(), open_log(path)?);
        let Some(current) = next.as_ref().or(log.held.as_ref()) else {
            return Ok(0);
        };
        let old = if drain_old { log.held.as_ref() } else { None };
        let label = path.display().to_string();
        let mut plan = plan_pass(path, &label, current, old, &log.cursor)?;
        if plan.rotated {
            report.rotated.push(label.clone());
        }
        if plan.drain.is_none() && plan.len == plan.cursor.offset {
            log.advance(plan.cursor, next);
            return Ok(0);
        }

        let mut skipped = Skipped::default();
        let conn = self.conn.lock();
        let (rows, drained_at) = append_pass(&conn, kind, &label, &mut plan, &mut skipped)?;
        drop(conn);
        if let Some(first) = skipped.listed.first() {
            tracing::warn!(target: TARGET, file = %label, skipped = skipped.count, first = %first, "malformed log lines skipped");
        }
        let room = MALFORMED_LISTED.saturating_sub(report.malformed.len());
        report
            .malformed
            .extend(skipped.listed.into_iter().take(room));
        drained.extend(drained_at);
        log.advance(plan.cursor, next);
        self.uncompacted_rows
            .fetch_add(rows, std::sync::atomic::Ordering::Relaxed);
        Ok(rows)
    }
}

/// Append every complete line of the file at `path` to `kind`'s table, in one transaction;
/// returns the rows appended (malformed lines counted in `skipped`).
pub(super) fn append_whole(
    conn: &Connection,
    kind: Kind,
    path: &Path,
    skipped: &mut Skipped,
) -> Result<u64, EngineError> {
    let io = |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let label = path.display().to_string();
    let (rows, _) = in_transaction(conn, || {
        append_from(conn, kind, &file, 0, len, &label, skipped)
    })?;
    Ok(rows)
}

/// Run `plan`: append the lines of its files and store its new cursor, in one transaction, so
/// a failure (or a crash with `duckdb_path`) never ingests a line twice. Returns the rows
/// appended and where the drained file, if any, was read through.
fn append_pass(
    conn: &Connection,
    kind: Kind,
    label: &str,
    plan: &mut Plan<'_>,
    skipped: &mut Skipped,
) -> Result<(u64, Option<LogPosition>), EngineError> {
    in_transaction(conn, || {
        let mut rows = 0;
        let mut drained_at = None;
        if let Some(drain) = &plan.drain {
            let (n, at) = drain_rotated(conn, kind, drain, skipped)?;
            rows += n;
            drained_at = Some(at);
        }
        let cursor = &mut plan.cursor;
        let pending = plan.len.saturating_sub(cursor.offset);
        let (n, end) = append_from(
            conn,
            kind,
            &plan.current.file,
            cursor.offset,
            pending,
            label,
            skipped,
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
    })
}

/// Append a rotated-away file's lines to its end; a last line without a newline will never be
/// completed and is counted as malformed. Returns the rows and where the file was read through.
fn drain_rotated(
    conn: &Connection,
    kind: Kind,
    drain: &Drain<'_>,
    skipped: &mut Skipped,
) -> Result<(u64, LogPosition), EngineError> {
    let pending = drain.len.saturating_sub(drain.start);
    let (rows, end) = append_from(
        conn,
        kind,
        &drain.held.file,
        drain.start,
        pending,
        &drain.label,
        skipped,
    )?;
    if let Some(at) = end.fragment {
        skipped.add(format!(
            "{}:{at}: an incomplete last line in a rotated-away file, never completed",
            drain.label
        ));
    }
    Ok((
        rows,
        LogPosition {
            file_id: drain.held.ino,
            offset: end.eof,
        },
    ))
}

/// `path`'s rotated siblings `<path>.1`, `<path>.2`, … up to the first missing one (at most
/// [`MAX_ROTATED`]), newest first.
fn rotated_siblings(path: &Path) -> Vec<PathBuf> {
    (1..=MAX_ROTATED)
        .map(|n| {
            let mut p = path.as_os_str().to_owned();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        })
        .take_while(|p| p.is_file())
        .collect()
}

/// Run `f` in one DuckDB transaction: committed when it succeeds, rolled back when it (or the
/// commit) fails, so rows and the cursor stored with them land together or not at all.
pub(super) fn in_transaction<T>(
    conn: &Connection,
    f: impl FnOnce() -> Result<T, EngineError>,
) -> Result<T, EngineError> {
    conn.execute_batch("BEGIN TRANSACTION")?;
    match f().and_then(|v| conn.execute_batch("COMMIT").map(|()| v).map_err(Into::into)) {
        Ok(v) => Ok(v),
        Err(e) => {
            if let Err(rollback) = conn.execute_batch("ROLLBACK") {
                tracing::warn!(target: TARGET, error = %rollback, "rolling back a failed ingestion");
            }
            Err(e)
        }
    }
}
