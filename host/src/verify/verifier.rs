//! The streaming [`Verifier`]: what it remembers per request id, the bounded list of problems,
//! and the summary it finishes with. The per-line checks are in `checks`.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::io::{self, BufRead};

use super::lines::each_line;
use super::{
    FileSummary, Log, Options, Problem, ProblemKind, StatusCounts, Summary, UnansweredSummary,
    VerdictCounts, SHOWN_PROBLEMS,
};

/// Telemetry status, as kept per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    Ok,
    Error,
    Denied,
    Cancelled,
    Unanswered,
    Unknown,
}

impl Status {
    pub(super) fn of(s: &str) -> Self {
        match s {
            "ok" => Self::Ok,
            "error" => Self::Error,
            "denied" => Self::Denied,
            "cancelled" => Self::Cancelled,
            "unanswered" => Self::Unanswered,
            _ => Self::Unknown,
        }
    }

    pub(super) fn name(self) -> &'static str {
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
pub(super) struct Entry {
    pub(super) telemetry_line: u64,
    pub(super) telemetry_offset: u64,
    pub(super) status: Status,
    pub(super) decision_line: u64,
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
pub(super) struct At {
    pub(super) log: Log,
    pub(super) line: u64,
    pub(super) offset: u64,
}

/// Streaming verifier: feed it the telemetry log, then the decisions log, then
/// [`finish`](Verifier::finish). [`verify_files`](super::verify_files) does all three.
#[derive(Debug)]
pub struct Verifier {
    pub(super) options: Options,
    pub(super) seen: HashMap<Box<str>, Entry>,
    pub(super) telemetry: FileSummary,
    pub(super) decisions: FileSummary,
    pub(super) statuses: StatusCounts,
    pub(super) verdicts: VerdictCounts,
    pub(super) total_cost_usd: f64,
    pub(super) unanswered: UnansweredSummary,
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
    pub(super) fn problem(&mut self, at: At, kind: ProblemKind, message: impl FnOnce() -> String) {
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
    pub(super) fn check_cost(&mut self, at: At, field: &str, value: f64) {
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

    /// Store `entry` for `id`, allocating the key only for an id not seen before.
    pub(super) fn remember(&mut self, id: String, entry: Entry) {
        match self.seen.get_mut(id.as_str()) {
            Some(slot) => *slot = entry,
            None => {
                self.seen.insert(id.into_boxed_str(), entry);
            }
        }
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
