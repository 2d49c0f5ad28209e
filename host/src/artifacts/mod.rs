//! The JSONL artifacts: `telemetry.jsonl` (one line per provider call or denial) and
//! `policy_decisions.jsonl` (one line per request). The record types are `llmscope-wire`'s
//! ([`llmscope_wire::records::write`]), beside the rows the engine reads them back as;
//! re-exported here.
//!
//! Appends go through one writer thread: each batch of lines is written to each file with a
//! single `write` under an fs2 exclusive lock (O_APPEND), so several processes can share the
//! files and no line is ever interleaved with another. Every request waits for its lines to be
//! on disk (in the page cache) before it is answered.

use std::path::{Path, PathBuf};

use serde::Serialize;

mod log_file;
#[cfg(test)]
mod tests;
mod writer;

pub use llmscope_wire::records::{
    rfc3339, AuditTags, DecisionRecord, PolicyInput, ReservationRecord, RuleRecord,
    TelemetryRecord, TELEMETRY_SCHEMA_VERSION,
};
pub use log_file::append_lines_now;
pub use writer::ArtifactWriter;

/// Where a line ends in a log: the file (its inode, which a rename rotation changes) and the
/// byte offset just past the line. The ledger keeps a settled entry until ingestion has read
/// through this position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LogPosition {
    /// The file's inode number.
    pub file_id: u64,
    /// Byte offset just past the line.
    pub offset: u64,
}

/// What the writer reports back for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Where this request's telemetry line ended (`None`: the job had no telemetry line).
    pub telemetry: Option<LogPosition>,
}

/// A write failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot append to {path}: {message}")]
pub struct WriteError {
    /// File.
    pub path: PathBuf,
    /// Cause.
    pub message: String,
}

/// One record as a JSON line.
pub(crate) fn encode(path: &Path, record: &impl Serialize) -> Result<String, WriteError> {
    serde_json::to_string(record)
        .map(|mut line| {
            line.push('\n');
            line
        })
        .map_err(|e| WriteError {
            path: path.into(),
            message: format!("cannot encode record: {e}"),
        })
}
