//! Analytics over several gateways' logs (`llmscope query` / `report` with several
//! `--telemetry` / `--decisions` files or globs): every replica writes its own pair of logs,
//! and the five questions must cover the whole fleet. Extra files are appended whole to a
//! one-shot engine, beside the pair it was opened on.

use std::path::PathBuf;

use super::ingest::append_whole;
use super::read::{Skipped, MALFORMED_LISTED};
use super::schema::Kind;
use super::{EngineError, SpendEngine};

impl SpendEngine {
    /// Append every line of `telemetry` and `decisions` (each file read once, whole; the
    /// engine's own pair is ingested by [`Self::ingest`]). Returns the rows appended and the
    /// first malformed lines skipped (file and offset), at most [`MALFORMED_LISTED`].
    pub fn append_files(
        &self,
        telemetry: &[PathBuf],
        decisions: &[PathBuf],
    ) -> Result<(u64, Vec<String>), EngineError> {
        let mut rows = 0u64;
        let mut skipped = Skipped::default();
        let conn = self.conn.lock();
        for (kind, files) in [(Kind::Telemetry, telemetry), (Kind::Decisions, decisions)] {
            for path in files {
                rows = rows.saturating_add(append_whole(&conn, kind, path, &mut skipped)?);
            }
        }
        self.uncompacted_rows
            .fetch_add(rows, std::sync::atomic::Ordering::Relaxed);
        skipped.listed.truncate(MALFORMED_LISTED);
        Ok((rows, skipped.listed))
    }
}
