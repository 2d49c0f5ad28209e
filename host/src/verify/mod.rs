//! `llmscope logs verify`: check that a `telemetry.jsonl` and its `policy_decisions.jsonl` agree.
//!
//! Both files are streamed line by line; the only state kept is one small entry per request id,
//! never a line. The checks:
//!
//! 1. every line parses as its record type (the analytics engine's readers,
//!    [`llmscope_wire::records`]) and carries a `request_id`; a last line without a trailing
//!    newline is a torn last line (a write in progress, or a crash mid-write);
//! 2. no request id appears twice in either file;
//! 3. every decision has a telemetry line; one without is *unanswered* (dispatched and never
//!    recorded: in flight right now, or lost in a crash), a problem unless
//!    [`Options::allow_unanswered`];
//! 4. every telemetry line has a decision;
//! 5. decision `deny` ⇔ telemetry status `denied`, a denied line costs 0, statuses and decisions
//!    are known values, and costs are finite and not negative.
//!
//! Telemetry is read before decisions: the gateway writes a request's decision no later than its
//! telemetry line, so on a live gateway's logs every telemetry line read has its decision on disk
//! by the time the decisions are read, and the requests still in flight show up as unanswered.
//!
//! Whitespace-only lines are skipped, as the analytics engine skips them.

mod checks;
mod lines;
#[cfg(test)]
mod tests;
mod text;
mod verifier;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

pub use self::verifier::Verifier;

/// Most problems a [`Summary`] lists; the rest are only counted.
pub const SHOWN_PROBLEMS: usize = 20;

/// What verification may tolerate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Count decisions without a telemetry line (requests in flight on a live gateway) but do not
    /// treat them as problems.
    pub allow_unanswered: bool,
}

/// Which of the two logs a line is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Log {
    /// `telemetry.jsonl`.
    Telemetry,
    /// `policy_decisions.jsonl`.
    Decisions,
}

/// The kind of a [`Problem`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// Not a record of its file's type: bad JSON, a missing or mistyped field, a bad timestamp.
    Malformed,
    /// The last line has no trailing newline: a write in progress, or a crash mid-write.
    TornLastLine,
    /// A record without a `request_id`.
    MissingRequestId,
    /// A `request_id` already seen earlier in the same file.
    DuplicateRequestId,
    /// A decision without a telemetry line (reported only without `allow_unanswered`).
    Unanswered,
    /// A telemetry line without a decision.
    NoDecision,
    /// A `deny` decision whose telemetry is not `denied`, or the other way round.
    DecisionMismatch,
    /// A telemetry `status` or a `decision` that is not one of the known values.
    UnknownValue,
    /// A cost that is negative or not finite, or a denied request that cost something.
    BadCost,
}

/// One inconsistency, located by file, line (1-based) and byte offset of the line's start.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    /// The file, as given.
    pub file: String,
    /// Which log it is.
    pub log: Log,
    /// Line number, from 1.
    pub line: u64,
    /// Byte offset of the line's first byte.
    pub offset: u64,
    /// What kind of problem.
    pub kind: ProblemKind,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} (byte {}): {}",
            self.file, self.line, self.offset, self.message
        )
    }
}

/// Lines read from one file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FileSummary {
    /// The file, as given.
    pub path: String,
    /// Lines, including blank, malformed and torn ones.
    pub lines: u64,
    /// Lines that parsed as records.
    pub records: u64,
}

/// Telemetry records by `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatusCounts {
    /// Answered by a provider.
    pub ok: u64,
    /// Failed.
    pub error: u64,
    /// Denied by policy (never dispatched).
    pub denied: u64,
    /// The client hung up; the provider billed or may have billed it.
    pub cancelled: u64,
    /// Written by the gateway at start for a decision that never got telemetry (at its estimate).
    pub unanswered: u64,
    /// Any other status (each one is also a problem).
    pub unknown: u64,
}

/// Decision records by `decision`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct VerdictCounts {
    /// Allowed as asked.
    pub allow: u64,
    /// Allowed at a cheaper tier.
    pub downgrade: u64,
    /// Denied.
    pub deny: u64,
    /// Any other decision (each one is also a problem).
    pub unknown: u64,
}

/// Decisions without a telemetry line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct UnansweredSummary {
    /// How many.
    pub count: u64,
    /// Sum of their `estimated_cost_usd`.
    pub estimate_usd: f64,
    /// Whether they were tolerated (`--allow-unanswered`) rather than counted as problems.
    pub allowed: bool,
}

/// The outcome of a verification; [`Summary::to_text`] renders it, and it serializes to the
/// `--format json` object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// No problems.
    pub consistent: bool,
    /// The telemetry log.
    pub telemetry: FileSummary,
    /// The decisions log.
    pub decisions: FileSummary,
    /// Telemetry records by status.
    pub requests_by_status: StatusCounts,
    /// Decision records by decision.
    pub decisions_by_verdict: VerdictCounts,
    /// Sum of `cost_usd` over the telemetry records (finite, non-negative ones).
    pub total_cost_usd: f64,
    /// Decisions without telemetry.
    pub unanswered: UnansweredSummary,
    /// Number of problems.
    pub problem_count: u64,
    /// Number of problems of each kind.
    pub problems_by_kind: BTreeMap<ProblemKind, u64>,
    /// The first [`SHOWN_PROBLEMS`] problems, telemetry before decisions, in line order.
    pub problems: Vec<Problem>,
    /// Problems found but not listed.
    pub more_problems: u64,
}

/// Verify the pair of logs at `telemetry` and `decisions`. An unopenable or unreadable file is
/// an error naming its path; inconsistencies are in the [`Summary`].
pub fn verify_files(telemetry: &Path, decisions: &Path, options: Options) -> Result<Summary> {
    let open = |what: &str, path: &Path| {
        File::open(path)
            .map(|f| BufReader::with_capacity(1 << 20, f))
            .with_context(|| format!("cannot open {what} log {}", path.display()))
    };
    let mut v = Verifier::new(
        &telemetry.display().to_string(),
        &decisions.display().to_string(),
        options,
    );
    v.read_telemetry(open("telemetry", telemetry)?)
        .with_context(|| format!("cannot read telemetry log {}", telemetry.display()))?;
    v.read_decisions(open("decisions", decisions)?)
        .with_context(|| format!("cannot read decisions log {}", decisions.display()))?;
    Ok(v.finish())
}
