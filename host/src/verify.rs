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

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::Path;

use anyhow::{Context, Result};
use llmscope_wire::records::{parse_decision, parse_telemetry};
use serde::Serialize;

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

impl Summary {
    /// The human-readable summary: counts, then the listed problems, then the verdict.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_text(&mut s);
        s
    }

    fn write_text(&self, s: &mut String) -> fmt::Result {
        for (name, file) in [
            ("telemetry", &self.telemetry),
            ("decisions", &self.decisions),
        ] {
            writeln!(
                s,
                "{name:<11} {}: {} lines, {} records",
                file.path, file.lines, file.records
            )?;
        }
        let st = &self.requests_by_status;
        write!(
            s,
            "{:<11} ok {}, error {}, denied {}, cancelled {}, unanswered {}",
            "requests", st.ok, st.error, st.denied, st.cancelled, st.unanswered
        )?;
        if st.unknown > 0 {
            write!(s, ", unknown {}", st.unknown)?;
        }
        writeln!(s)?;
        let v = &self.decisions_by_verdict;
        write!(
            s,
            "{:<11} allow {}, downgrade {}, deny {}",
            "verdicts", v.allow, v.downgrade, v.deny
        )?;
        if v.unknown > 0 {
            write!(s, ", unknown {}", v.unknown)?;
        }
        writeln!(s)?;
        writeln!(s, "{:<11} {:.6} USD", "cost", self.total_cost_usd)?;
        let u = &self.unanswered;
        writeln!(
            s,
            "{:<11} {} decisions without telemetry, estimate {:.6} USD{}",
            "unanswered",
            u.count,
            u.estimate_usd,
            if u.allowed && u.count > 0 {
                " (allowed)"
            } else {
                ""
            }
        )?;
        writeln!(s, "{:<11} {}", "problems", self.problem_count)?;
        for p in &self.problems {
            writeln!(s, "  {p}")?;
        }
        if self.more_problems > 0 {
            writeln!(s, "  ... {} more", self.more_problems)?;
        }
        if self.consistent {
            writeln!(s, "consistent")
        } else {
            writeln!(s, "INCONSISTENT: {} problems", self.problem_count)
        }
    }
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

/// Telemetry status, as kept per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Error,
    Denied,
    Cancelled,
    Unanswered,
    Unknown,
}

impl Status {
    fn of(s: &str) -> Self {
        match s {
            "ok" => Self::Ok,
            "error" => Self::Error,
            "denied" => Self::Denied,
            "cancelled" => Self::Cancelled,
            "unanswered" => Self::Unanswered,
            _ => Self::Unknown,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Denied => "denied",
            Self::Cancelled => "cancelled",
            Self::Unanswered => "unanswered",
            Self::Unknown => "unknown",
        }
    }
}

/// What is remembered of one request id: where its telemetry line is (line 0: none yet) and
/// its status, and the line of its decision (0: none yet).
#[derive(Debug, Clone, Copy)]
struct Entry {
    telemetry_line: u64,
    telemetry_offset: u64,
    status: Status,
    decision_line: u64,
}

impl Default for Entry {
    fn default() -> Self {
        Self {
            telemetry_line: 0,
            telemetry_offset: 0,
            status: Status::Unknown,
            decision_line: 0,
        }
    }
}

/// A problem in the bounded list, ordered by where it is (then by when it was found).
#[derive(Debug)]
struct Ranked {
    key: (Log, u64, u64),
    problem: Problem,
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key.cmp(&other.key)
    }
}

/// Where a line is.
#[derive(Debug, Clone, Copy)]
struct At {
    log: Log,
    line: u64,
    offset: u64,
}

/// Streaming verifier: feed it the telemetry log, then the decisions log, then
/// [`finish`](Verifier::finish). [`verify_files`] does all three.
#[derive(Debug)]
pub struct Verifier {
    options: Options,
    seen: HashMap<Box<str>, Entry>,
    telemetry: FileSummary,
    decisions: FileSummary,
    statuses: StatusCounts,
    verdicts: VerdictCounts,
    total_cost_usd: f64,
    unanswered: UnansweredSummary,
    problem_count: u64,
    by_kind: BTreeMap<ProblemKind, u64>,
    /// The first [`SHOWN_PROBLEMS`] problems by position (a max-heap: the last one is on top).
    shown: BinaryHeap<Ranked>,
}

impl Verifier {
    /// A verifier for logs named `telemetry_path` and `decisions_path` in its problems.
    pub fn new(telemetry_path: &str, decisions_path: &str, options: Options) -> Self {
        Self {
            options,
            seen: HashMap::new(),
            telemetry: FileSummary {
                path: telemetry_path.to_owned(),
                ..FileSummary::default()
            },
            decisions: FileSummary {
                path: decisions_path.to_owned(),
                ..FileSummary::default()
            },
            statuses: StatusCounts::default(),
            verdicts: VerdictCounts::default(),
            total_cost_usd: 0.0,
            unanswered: UnansweredSummary {
                allowed: options.allow_unanswered,
                ..UnansweredSummary::default()
            },
            problem_count: 0,
            by_kind: BTreeMap::new(),
            shown: BinaryHeap::with_capacity(SHOWN_PROBLEMS + 1),
        }
    }

    /// Count a problem; build its message only if it is among the first [`SHOWN_PROBLEMS`].
    fn problem(&mut self, at: At, kind: ProblemKind, message: impl FnOnce() -> String) {
        self.problem_count += 1;
        *self.by_kind.entry(kind).or_insert(0) += 1;
        let key = (at.log, at.line, self.problem_count);
        if self.shown.len() >= SHOWN_PROBLEMS && self.shown.peek().is_some_and(|r| r.key <= key) {
            return;
        }
        let file = match at.log {
            Log::Telemetry => self.telemetry.path.clone(),
            Log::Decisions => self.decisions.path.clone(),
        };
        self.shown.push(Ranked {
            key,
            problem: Problem {
                file,
                log: at.log,
                line: at.line,
                offset: at.offset,
                kind,
                message: message(),
            },
        });
        if self.shown.len() > SHOWN_PROBLEMS {
            self.shown.pop();
        }
    }

    /// A cost field that must be finite and not negative.
    fn check_cost(&mut self, at: At, field: &str, value: f64) {
        if !value.is_finite() || value < 0.0 {
            self.problem(at, ProblemKind::BadCost, || {
                format!("{field} is {value}: must be finite and >= 0")
            });
        }
    }

    /// Read the whole telemetry log (before the decisions log).
    pub fn read_telemetry(&mut self, reader: impl BufRead) -> io::Result<()> {
        each_line(reader, |line, at, complete| {
            self.telemetry.lines += 1;
            let at = At {
                log: Log::Telemetry,
                line: at.0,
                offset: at.1,
            };
            if !self.usable(at, line, complete) {
                return;
            }
            self.telemetry_line(at, line);
        })
    }

    /// Read the whole decisions log (after the telemetry log).
    pub fn read_decisions(&mut self, reader: impl BufRead) -> io::Result<()> {
        each_line(reader, |line, at, complete| {
            self.decisions.lines += 1;
            let at = At {
                log: Log::Decisions,
                line: at.0,
                offset: at.1,
            };
            if !self.usable(at, line, complete) {
                return;
            }
            self.decision_line(at, line);
        })
    }

    /// Whether a line is worth parsing: not blank, and not a torn last line (reported).
    fn usable(&mut self, at: At, line: &[u8], complete: bool) -> bool {
        if line.iter().all(u8::is_ascii_whitespace) {
            return false;
        }
        if !complete {
            self.problem(at, ProblemKind::TornLastLine, || {
                "torn last line: no trailing newline (a write in progress, or a crash mid-write)"
                    .into()
            });
            return false;
        }
        true
    }

    fn telemetry_line(&mut self, at: At, line: &[u8]) {
        let r = match parse_telemetry(line) {
            Ok((_, r)) => r,
            Err(why) => return self.problem(at, ProblemKind::Malformed, || within_line(why)),
        };
        self.telemetry.records += 1;
        let status = Status::of(&r.status);
        let count = match status {
            Status::Ok => &mut self.statuses.ok,
            Status::Error => &mut self.statuses.error,
            Status::Denied => &mut self.statuses.denied,
            Status::Cancelled => &mut self.statuses.cancelled,
            Status::Unanswered => &mut self.statuses.unanswered,
            Status::Unknown => &mut self.statuses.unknown,
        };
        *count += 1;
        if status == Status::Unknown {
            self.problem(at, ProblemKind::UnknownValue, || {
                format!(
                    "unknown status {:?} (expected ok, error, denied, cancelled or unanswered)",
                    r.status
                )
            });
        }
        self.check_cost(at, "cost_usd", r.cost_usd);
        if let Some(e) = r.estimated_cost_usd {
            self.check_cost(at, "estimated_cost_usd", e);
        }
        if r.cost_usd.is_finite() && r.cost_usd >= 0.0 {
            self.total_cost_usd += r.cost_usd;
            if status == Status::Denied && r.cost_usd != 0.0 {
                self.problem(at, ProblemKind::BadCost, || {
                    format!(
                        "status denied with cost_usd {}: a denied request costs 0",
                        r.cost_usd
                    )
                });
            }
        }
        let Some(id) = r.request_id.filter(|id| !id.is_empty()) else {
            return self.problem(at, ProblemKind::MissingRequestId, || "no request_id".into());
        };
        let mut entry = self.seen.get(id.as_str()).copied().unwrap_or_default();
        if entry.telemetry_line != 0 {
            let first = entry.telemetry_line;
            return self.problem(at, ProblemKind::DuplicateRequestId, || {
                format!("duplicate request_id {id:?} (first at line {first})")
            });
        }
        entry.telemetry_line = at.line;
        entry.telemetry_offset = at.offset;
        entry.status = status;
        self.remember(id, entry);
    }

    /// Store `entry` for `id`, allocating the key only for an id not seen before.
    fn remember(&mut self, id: String, entry: Entry) {
        match self.seen.get_mut(id.as_str()) {
            Some(slot) => *slot = entry,
            None => {
                self.seen.insert(id.into_boxed_str(), entry);
            }
        }
    }

    fn decision_line(&mut self, at: At, line: &[u8]) {
        let r = match parse_decision(line) {
            Ok((_, r)) => r,
            Err(why) => return self.problem(at, ProblemKind::Malformed, || within_line(why)),
        };
        self.decisions.records += 1;
        let deny = match r.decision.as_str() {
            "allow" => {
                self.verdicts.allow += 1;
                false
            }
            "downgrade" => {
                self.verdicts.downgrade += 1;
                false
            }
            "deny" => {
                self.verdicts.deny += 1;
                true
            }
            other => {
                self.verdicts.unknown += 1;
                self.problem(at, ProblemKind::UnknownValue, || {
                    format!("unknown decision {other:?} (expected allow, downgrade or deny)")
                });
                false
            }
        };
        let estimate = r.estimated_cost_usd.unwrap_or(0.0);
        self.check_cost(at, "estimated_cost_usd", estimate);
        let Some(id) = r.request_id.filter(|id| !id.is_empty()) else {
            return self.problem(at, ProblemKind::MissingRequestId, || "no request_id".into());
        };
        let mut entry = self.seen.get(id.as_str()).copied().unwrap_or_default();
        if entry.decision_line != 0 {
            let first = entry.decision_line;
            return self.problem(at, ProblemKind::DuplicateRequestId, || {
                format!("duplicate request_id {id:?} (first at line {first})")
            });
        }
        entry.decision_line = at.line;
        let (t_line, status) = (entry.telemetry_line, entry.status);
        if t_line == 0 {
            self.unanswered.count += 1;
            if estimate.is_finite() && estimate >= 0.0 {
                self.unanswered.estimate_usd += estimate;
            }
            if !self.options.allow_unanswered {
                self.problem(at, ProblemKind::Unanswered, || {
                    format!(
                        "request_id {id:?} has no telemetry line: unanswered (in flight, or lost \
                         in a crash), estimate {estimate:.6} USD"
                    )
                });
            }
        } else if deny && status != Status::Denied {
            self.problem(at, ProblemKind::DecisionMismatch, || {
                format!(
                    "request_id {id:?}: decision deny, but its telemetry (line {t_line}) has \
                     status {}",
                    status.name()
                )
            });
        }
        // The other way round is consistent: a request the rules allowed can still be refused
        // without dispatch (an Envoy filter failing closed when the host is unreachable); a
        // `denied` line costs nothing, which the telemetry check enforces.
        self.remember(id, entry);
    }

    /// Report telemetry lines that never met their decision, and summarize.
    pub fn finish(mut self) -> Summary {
        let seen = std::mem::take(&mut self.seen);
        for (id, e) in seen {
            if e.telemetry_line != 0 && e.decision_line == 0 {
                let at = At {
                    log: Log::Telemetry,
                    line: e.telemetry_line,
                    offset: e.telemetry_offset,
                };
                self.problem(at, ProblemKind::NoDecision, || {
                    format!("request_id {id:?} has no decision")
                });
            }
        }
        let problems: Vec<Problem> = std::mem::take(&mut self.shown)
            .into_sorted_vec()
            .into_iter()
            .map(|r| r.problem)
            .collect();
        Summary {
            consistent: self.problem_count == 0,
            more_problems: self.problem_count - problems.len() as u64,
            telemetry: self.telemetry,
            decisions: self.decisions,
            requests_by_status: self.statuses,
            decisions_by_verdict: self.verdicts,
            total_cost_usd: self.total_cost_usd,
            unanswered: self.unanswered,
            problem_count: self.problem_count,
            problems_by_kind: self.by_kind,
            problems,
        }
    }
}

/// A parse error located the way serde_json locates it in a one-line document (`at line 1
/// column N`) says `at column N`: the file's line number is already in the problem.
fn within_line(why: String) -> String {
    match why.rsplit_once(" at line 1 column ") {
        Some((head, column)) if column.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{head} at column {column}")
        }
        _ => why,
    }
}

/// Call `f(line, (number, offset), complete)` for each line of `reader`, without its `\n` (and
/// `\r`); `complete` is false for a last line without a newline. Holds one line at a time.
fn each_line(
    mut reader: impl BufRead,
    mut f: impl FnMut(&[u8], (u64, u64), bool),
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let (mut number, mut offset) = (0u64, 0u64);
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        let complete = buf.last() == Some(&b'\n');
        let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        f(line, (number, offset), complete);
        offset += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::{AuditTags, DecisionRecord, TelemetryRecord};

    /// A telemetry line as the gateway writes it.
    fn tel(id: &str, status: &str, cost: f64) -> String {
        let denied = status == "denied";
        let rec = TelemetryRecord {
            schema_version: "1.0".into(),
            timestamp: "2025-11-24T16:00:00.123Z".into(),
            request_id: id.into(),
            tenant_id: "acme-corp".into(),
            caller_id: Some("svc-a".into()),
            feature_id: Some("summarize".into()),
            use_case: Some("summarize".into()),
            experiment_id: Some("exp-1".into()),
            budget_namespace: "demo".into(),
            audit_tags: AuditTags {
                feature_id: Some("summarize".into()),
                experiment_id: Some("exp-1".into()),
                budget_namespace: "demo".into(),
            },
            route_name: "/conversation-turn".into(),
            route: "/conversation-turn".into(),
            requested_model_tier: "cheap".into(),
            model_tier: "cheap".into(),
            provider: "mock".into(),
            model: "gpt-4o-mini".into(),
            tokens_in: 42,
            tokens_out: if denied { 0 } else { 120 },
            tokens_total: if denied { 42 } else { 162 },
            estimated_cost_usd: 0.000_306_3,
            cost_usd: cost,
            cost_source: if denied { "none" } else { "tokenizer" }.into(),
            latency_ms: if denied { 0.0 } else { 12.5 },
            status: status.into(),
            finish_reason: (!denied).then(|| "stop".into()),
            is_fallback: false,
            fallback_reason: None,
            error_type: (status == "error").then(|| "upstream_error".into()),
            policy_decision: if denied { "deny" } else { "allow" }.into(),
            policy_id: denied.then(|| "tight-cap".into()),
            timed_out_cost_usd: 0.0,
        };
        format!("{}\n", serde_json::to_string(&rec).unwrap())
    }

    /// A decision line as the gateway writes it.
    fn dec(id: &str, decision: &str, estimate: f64) -> String {
        let rec = DecisionRecord {
            timestamp: "2025-11-24T16:00:00.123Z".into(),
            request_id: id.into(),
            tenant_id: "acme-corp".into(),
            caller_id: Some("svc-a".into()),
            feature_id: Some("summarize".into()),
            experiment_id: Some("exp-1".into()),
            budget_namespace: Some("demo".into()),
            route_name: "/conversation-turn".into(),
            requested_model_tier: "cheap".into(),
            effective_model_tier: "cheap".into(),
            primitive: Some("budget_threshold".into()),
            decision: decision.into(),
            reason: (decision == "deny").then(|| "Tight budget exceeded".into()),
            policy_id: Some("tight-cap".into()),
            estimated_cost_usd: estimate,
            latency_ms: 0.042,
            window_cost_usd: Some(0.0),
            window_limit_usd: Some(1.0),
            policy_version: "0.1.0".into(),
            reservation: None,
            alerts: &[],
            rules: &[],
        };
        format!("{}\n", serde_json::to_string(&rec).unwrap())
    }

    fn check(telemetry: &str, decisions: &str, options: Options) -> Summary {
        let mut v = Verifier::new("t.jsonl", "d.jsonl", options);
        v.read_telemetry(telemetry.as_bytes()).unwrap();
        v.read_decisions(decisions.as_bytes()).unwrap();
        v.finish()
    }

    fn strict(telemetry: &str, decisions: &str) -> Summary {
        check(telemetry, decisions, Options::default())
    }

    /// The listed problems as text.
    fn problems(s: &Summary) -> Vec<String> {
        s.problems.iter().map(ToString::to_string).collect()
    }

    /// Exactly one problem, of `kind`, whose text is returned.
    fn only(s: &Summary, kind: ProblemKind) -> String {
        assert_eq!(s.problem_count, 1, "{}", s.to_text());
        assert_eq!(s.problems[0].kind, kind, "{}", s.to_text());
        assert!(!s.consistent);
        s.problems[0].to_string()
    }

    fn consistent_pair() -> (String, String) {
        let t = [
            tel("r1", "ok", 0.000_078_3),
            tel("r2", "denied", 0.0),
            tel("r3", "error", 0.0),
            tel("r4", "cancelled", 0.000_1),
            tel("r5", "unanswered", 0.000_306_3),
        ]
        .concat();
        let d = [
            dec("r1", "allow", 0.000_306_3),
            dec("r2", "deny", 0.000_306_3),
            dec("r3", "downgrade", 0.000_306_3),
            dec("r4", "allow", 0.000_306_3),
            dec("r5", "allow", 0.000_306_3),
        ]
        .concat();
        (t, d)
    }

    #[test]
    fn a_consistent_pair_passes_with_its_counts() {
        let (t, d) = consistent_pair();
        let s = strict(&t, &d);
        assert!(s.consistent, "{}", s.to_text());
        assert_eq!((s.telemetry.lines, s.telemetry.records), (5, 5));
        assert_eq!((s.decisions.lines, s.decisions.records), (5, 5));
        assert_eq!(
            s.requests_by_status,
            StatusCounts {
                ok: 1,
                error: 1,
                denied: 1,
                cancelled: 1,
                unanswered: 1,
                unknown: 0
            }
        );
        assert_eq!(
            s.decisions_by_verdict,
            VerdictCounts {
                allow: 3,
                downgrade: 1,
                deny: 1,
                unknown: 0
            }
        );
        assert!((s.total_cost_usd - 0.000_484_6).abs() < 1e-12);
        assert_eq!(s.unanswered.count, 0);
        assert!(s.problems.is_empty() && s.problems_by_kind.is_empty());
        let text = s.to_text();
        assert!(
            text.contains("t.jsonl: 5 lines, 5 records")
                && text.contains("ok 1, error 1, denied 1, cancelled 1, unanswered 1")
                && text.contains("cost        0.000485 USD")
                && text.ends_with("problems    0\nconsistent\n"),
            "{text}"
        );
    }

    #[test]
    fn empty_logs_are_consistent() {
        let s = strict("", "");
        assert!(s.consistent);
        assert_eq!(s.telemetry.lines + s.decisions.lines, 0);
    }

    #[test]
    fn blank_lines_are_skipped_and_crlf_is_accepted() {
        let t = format!("\n{}  \n", tel("r1", "ok", 0.1).replace('\n', "\r\n"));
        let s = strict(&t, &dec("r1", "allow", 0.2));
        assert!(s.consistent, "{}", s.to_text());
        assert_eq!((s.telemetry.lines, s.telemetry.records), (3, 1));
    }

    #[test]
    fn a_malformed_line_is_named_by_file_line_and_offset() {
        let first = tel("r1", "ok", 0.1);
        let t = format!("{first}{{\"timestamp\": \"yesterday\"\n");
        let s = strict(&t, &dec("r1", "allow", 0.2));
        let p = only(&s, ProblemKind::Malformed);
        assert!(
            p.starts_with(&format!(
                "t.jsonl:2 (byte {}): not a telemetry record: ",
                first.len()
            )),
            "{p}"
        );
        assert_eq!((s.telemetry.lines, s.telemetry.records), (2, 1));

        let s = strict(
            &first,
            &format!(
                "{}{}",
                dec("r1", "allow", 0.2),
                dec("r2", "allow", 0.2).replace("2025-11-24T16:00:00.123Z", "yesterday")
            ),
        );
        let p = only(&s, ProblemKind::Malformed);
        assert!(p.starts_with("d.jsonl:2 (byte "), "{p}");
        assert!(p.contains("timestamp \"yesterday\""), "{p}");
    }

    #[test]
    fn a_missing_field_is_malformed() {
        let t = tel("r1", "ok", 0.1).replace("\"tenant_id\":\"acme-corp\",", "");
        let p = only(&strict(&t, ""), ProblemKind::Malformed);
        assert!(
            p.ends_with("missing field `tenant_id` at column 726"),
            "{p}"
        );
    }

    #[test]
    fn a_last_line_without_newline_is_torn() {
        let whole = tel("r1", "ok", 0.1);
        let partial = &tel("r2", "ok", 0.1)[..40];
        let s = strict(&format!("{whole}{partial}"), &dec("r1", "allow", 0.2));
        let p = only(&s, ProblemKind::TornLastLine);
        assert_eq!(
            p,
            format!(
                "t.jsonl:2 (byte {}): torn last line: no trailing newline (a write in progress, \
                 or a crash mid-write)",
                whole.len()
            )
        );
        // Even a complete record is torn without its newline: it is not in the log yet.
        let d = dec("r1", "allow", 0.2);
        let s = strict(&whole, d.trim_end());
        assert_eq!(s.problem_count, 2, "{}", s.to_text());
        assert_eq!(
            s.problems_by_kind.keys().copied().collect::<Vec<_>>(),
            [ProblemKind::TornLastLine, ProblemKind::NoDecision]
        );
    }

    #[test]
    fn a_record_without_request_id_is_a_problem() {
        let t = tel("", "ok", 0.1);
        let p = only(&strict(&t, ""), ProblemKind::MissingRequestId);
        assert_eq!(p, "t.jsonl:1 (byte 0): no request_id");
    }

    #[test]
    fn duplicate_request_ids_are_reported_in_either_file() {
        let t1 = tel("r1", "ok", 0.1);
        let t = format!("{t1}{}", tel("r1", "ok", 0.1));
        let s = strict(&t, &dec("r1", "allow", 0.2));
        assert_eq!(
            only(&s, ProblemKind::DuplicateRequestId),
            format!(
                "t.jsonl:2 (byte {}): duplicate request_id \"r1\" (first at line 1)",
                t1.len()
            )
        );
        let d = format!("{}{}", dec("r1", "allow", 0.2), dec("r1", "allow", 0.2));
        let s = strict(&t1, &d);
        let p = only(&s, ProblemKind::DuplicateRequestId);
        assert!(
            p.starts_with("d.jsonl:2 ")
                && p.ends_with("duplicate request_id \"r1\" (first at line 1)"),
            "{p}"
        );
    }

    #[test]
    fn an_unanswered_decision_fails_unless_allowed() {
        let t = tel("r1", "ok", 0.1);
        let d = [
            dec("r1", "allow", 0.2),
            dec("r2", "allow", 0.25),
            dec("r3", "downgrade", 0.5),
        ]
        .concat();
        let s = strict(&t, &d);
        assert_eq!(s.problem_count, 2);
        assert_eq!(s.problems_by_kind[&ProblemKind::Unanswered], 2);
        assert!(problems(&s)[0].ends_with(
            "request_id \"r2\" has no telemetry line: unanswered (in flight, or lost in a \
             crash), estimate 0.250000 USD"
        ));
        assert!(problems(&s)[1].starts_with("d.jsonl:3 "));
        assert_eq!(s.unanswered.count, 2);
        assert!((s.unanswered.estimate_usd - 0.75).abs() < 1e-12);
        assert!(!s.unanswered.allowed);

        let s = check(
            &t,
            &d,
            Options {
                allow_unanswered: true,
            },
        );
        assert!(s.consistent, "{}", s.to_text());
        assert_eq!(s.unanswered.count, 2);
        assert!((s.unanswered.estimate_usd - 0.75).abs() < 1e-12);
        assert!(
            s.to_text().contains(
                "unanswered  2 decisions without telemetry, estimate 0.750000 USD (allowed)"
            ),
            "{}",
            s.to_text()
        );
    }

    #[test]
    fn a_telemetry_line_without_decision_is_a_problem() {
        let t = [tel("r1", "ok", 0.1), tel("r2", "ok", 0.1)].concat();
        let s = strict(&t, &dec("r1", "allow", 0.2));
        assert_eq!(
            only(&s, ProblemKind::NoDecision),
            format!(
                "t.jsonl:2 (byte {}): request_id \"r2\" has no decision",
                tel("r1", "ok", 0.1).len()
            )
        );
    }

    #[test]
    fn deny_and_denied_go_together() {
        let s = strict(&tel("r1", "ok", 0.1), &dec("r1", "deny", 0.2));
        assert_eq!(
            only(&s, ProblemKind::DecisionMismatch),
            "d.jsonl:1 (byte 0): request_id \"r1\": decision deny, but its telemetry (line 1) \
             has status ok"
        );
        // Allowed by the rules, refused locally (an Envoy filter failing closed): consistent.
        let s = strict(&tel("r1", "denied", 0.0), &dec("r1", "downgrade", 0.2));
        assert!(s.consistent, "{}", s.to_text());
    }

    #[test]
    fn a_denied_request_costs_nothing() {
        let s = strict(&tel("r1", "denied", 0.01), &dec("r1", "deny", 0.2));
        assert_eq!(
            only(&s, ProblemKind::BadCost),
            "t.jsonl:1 (byte 0): status denied with cost_usd 0.01: a denied request costs 0"
        );
    }

    #[test]
    fn unknown_statuses_and_decisions_are_problems() {
        let s = strict(&tel("r1", "timeout", 0.0), &dec("r1", "allow", 0.2));
        assert!(only(&s, ProblemKind::UnknownValue).ends_with(
            "unknown status \"timeout\" (expected ok, error, denied, cancelled or unanswered)"
        ));
        assert_eq!(s.requests_by_status.unknown, 1);
        assert!(s.to_text().contains(", unknown 1\n"));
        let s = strict(&tel("r1", "ok", 0.0), &dec("r1", "maybe", 0.2));
        assert!(only(&s, ProblemKind::UnknownValue)
            .ends_with("unknown decision \"maybe\" (expected allow, downgrade or deny)"));
        assert_eq!(s.decisions_by_verdict.unknown, 1);
    }

    #[test]
    fn costs_must_be_finite_and_not_negative() {
        let s = strict(&tel("r1", "ok", -0.5), &dec("r1", "allow", 0.2));
        assert!(
            only(&s, ProblemKind::BadCost).ends_with("cost_usd is -0.5: must be finite and >= 0")
        );
        assert_eq!(s.total_cost_usd, 0.0, "a bad cost is not summed");
        let t = tel("r1", "ok", 0.1).replace(
            "\"estimated_cost_usd\":0.0003063",
            "\"estimated_cost_usd\":-1.0",
        );
        let s = strict(&t, &dec("r1", "allow", 0.2));
        assert!(only(&s, ProblemKind::BadCost)
            .ends_with("estimated_cost_usd is -1: must be finite and >= 0"));
        let s = strict(&tel("r1", "ok", 0.1), &dec("r1", "allow", -0.2));
        assert!(only(&s, ProblemKind::BadCost)
            .starts_with("d.jsonl:1 (byte 0): estimated_cost_usd is -0.2"));
    }

    #[test]
    fn twenty_problems_are_listed_in_file_order_and_the_rest_counted() {
        // 15 telemetry lines without decision (found last, listed first) and 10 unanswered.
        let t: String = (0..15).map(|i| tel(&format!("t{i}"), "ok", 0.1)).collect();
        let d: String = (0..10)
            .map(|i| dec(&format!("d{i}"), "allow", 0.1))
            .collect();
        let s = strict(&t, &d);
        assert_eq!(
            (s.problem_count, s.problems.len(), s.more_problems),
            (25, 20, 5)
        );
        let lines: Vec<(Log, u64)> = s.problems.iter().map(|p| (p.log, p.line)).collect();
        let expected: Vec<(Log, u64)> = (1..=15)
            .map(|l| (Log::Telemetry, l))
            .chain((1..=5).map(|l| (Log::Decisions, l)))
            .collect();
        assert_eq!(lines, expected);
        let text = s.to_text();
        assert!(
            text.contains("  ... 5 more\nINCONSISTENT: 25 problems\n"),
            "{text}"
        );
    }

    #[test]
    fn the_json_summary_has_every_part() {
        let s = strict(&tel("r1", "ok", 0.1), "");
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["consistent"], false);
        assert_eq!(v["telemetry"]["path"], "t.jsonl");
        assert_eq!(v["requests_by_status"]["ok"], 1);
        assert_eq!(v["problems_by_kind"]["no_decision"], 1);
        assert_eq!(v["problems"][0]["kind"], "no_decision");
        assert_eq!(v["problems"][0]["line"], 1);
        assert_eq!(v["problems"][0]["file"], "t.jsonl");
        assert_eq!(v["unanswered"]["count"], 0);
        assert_eq!(v["more_problems"], 0);
    }

    #[test]
    fn verify_files_names_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("telemetry.jsonl");
        std::fs::write(&t, tel("r1", "ok", 0.1)).unwrap();
        let d = dir.path().join("nope.jsonl");
        let err = verify_files(&t, &d, Options::default()).unwrap_err();
        assert!(
            format!("{err:#}").starts_with(&format!("cannot open decisions log {}", d.display())),
            "{err:#}"
        );
        std::fs::write(&d, dec("r1", "allow", 0.1)).unwrap();
        assert!(verify_files(&t, &d, Options::default()).unwrap().consistent);
    }
}
