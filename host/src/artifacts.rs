//! The JSONL artifacts: `telemetry.jsonl` (one line per provider call or denial) and
//! `policy_decisions.jsonl` (one line per request). Field names are the reference system's;
//! other tools read them.
//!
//! Appends go through one writer thread: each batch of lines is written to each file with a
//! single `write` under an fs2 exclusive lock (O_APPEND), so several processes can share the
//! files and no line is ever interleaved with another. Every request waits for its lines to be
//! on disk (in the page cache) before it is answered.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use fs2::FileExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Version of the telemetry record layout.
pub const TELEMETRY_SCHEMA_VERSION: &str = "1.0";

/// `audit_tags` of a telemetry record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditTags {
    /// Feature id.
    pub feature_id: Option<String>,
    /// Experiment id.
    pub experiment_id: Option<String>,
    /// Budget namespace.
    pub budget_namespace: String,
}

/// One line of `telemetry.jsonl`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRecord {
    /// Layout version.
    pub schema_version: String,
    /// RFC 3339 UTC time the request arrived.
    pub timestamp: String,
    /// Request id.
    pub request_id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Caller.
    pub caller_id: Option<String>,
    /// Feature.
    pub feature_id: Option<String>,
    /// Same as `feature_id` (llmscope envelope name).
    pub use_case: Option<String>,
    /// Experiment.
    pub experiment_id: Option<String>,
    /// Resolved budget namespace.
    pub budget_namespace: String,
    /// Attribution tags.
    pub audit_tags: AuditTags,
    /// Route name.
    pub route_name: String,
    /// Same as `route_name`.
    pub route: String,
    /// Tier the client asked for.
    pub requested_model_tier: String,
    /// Tier actually used.
    pub model_tier: String,
    /// Provider that answered (or would have).
    pub provider: String,
    /// Model that answered (or would have).
    pub model: String,
    /// Input tokens (provider usage, else the estimate).
    pub tokens_in: u64,
    /// Output tokens.
    pub tokens_out: u64,
    /// Sum of both.
    pub tokens_total: u64,
    /// Estimate before dispatch, at the effective tier.
    pub estimated_cost_usd: f64,
    /// Actual cost (0 when denied or failed).
    pub cost_usd: f64,
    /// Where `cost_usd` comes from: `provider_usage` (the provider's reported usage),
    /// `tokenizer` (the provider reported none: our token counts), `estimate` (no answer to
    /// count from: timed-out attempts, or recovered after a crash), `none` (nothing spent).
    pub cost_source: String,
    /// Provider latency, ms (0 when not dispatched).
    pub latency_ms: f64,
    /// `ok`; `denied` (by policy, never dispatched); `error` (every attempt failed);
    /// `cancelled` (the client left: recorded at the provider's usage if it answered);
    /// `unanswered` (written at start for a dispatched request the previous process never
    /// recorded — a crash — at its estimate).
    pub status: String,
    /// Provider finish reason (`stop`, `length`, ...).
    pub finish_reason: Option<String>,
    /// Whether a fallback model answered.
    pub is_fallback: bool,
    /// Why the primary model was not used.
    pub fallback_reason: Option<String>,
    /// Error class when status is `error`.
    pub error_type: Option<String>,
    /// `allow`, `downgrade` or `deny`.
    pub policy_decision: String,
    /// Deciding rule.
    pub policy_id: Option<String>,
    /// Part of `cost_usd` charged for provider attempts that timed out, at their estimate
    /// (the provider usually bills a call it was still answering).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timed_out_cost_usd: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

impl TelemetryRecord {
    /// A record for `request`: its time, id, attribution, route, and requested tier and model
    /// (also as the tier used); the outcome fields are left for the caller.
    pub fn for_request(request: &llmscope_sdk::types::RequestContext) -> Self {
        Self {
            schema_version: TELEMETRY_SCHEMA_VERSION.into(),
            timestamp: rfc3339(request.unix_time_ms),
            request_id: request.request_id.clone(),
            tenant_id: request.tenant_id.clone(),
            caller_id: request.caller_id.clone(),
            feature_id: request.feature_id.clone(),
            use_case: request.feature_id.clone(),
            experiment_id: request.experiment_id.clone(),
            budget_namespace: request.budget_namespace.clone(),
            audit_tags: AuditTags {
                feature_id: request.feature_id.clone(),
                experiment_id: request.experiment_id.clone(),
                budget_namespace: request.budget_namespace.clone(),
            },
            route_name: request.route_name.clone(),
            route: request.route_name.clone(),
            requested_model_tier: request.requested_tier.clone(),
            model_tier: request.requested_tier.clone(),
            model: request.model.clone(),
            ..Self::default()
        }
    }
}

/// One rule's outcome inside a decision record.
pub type RuleRecord = crate::policy::RuleOutcome;

/// One line of `policy_decisions.jsonl`. Borrows the evaluation's alerts and rule outcomes:
/// the record is encoded once and the evaluation still answers the client.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord<'a> {
    /// RFC 3339 UTC.
    pub timestamp: String,
    /// Request id.
    pub request_id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Caller.
    pub caller_id: Option<String>,
    /// Feature.
    pub feature_id: Option<String>,
    /// Experiment.
    pub experiment_id: Option<String>,
    /// Resolved namespace (`null`: none configured and no default).
    pub budget_namespace: Option<String>,
    /// Route.
    pub route_name: String,
    /// Tier asked for.
    pub requested_model_tier: String,
    /// Tier used.
    pub effective_model_tier: String,
    /// Primitive of the deciding rule.
    pub primitive: Option<String>,
    /// `allow`, `downgrade`, `deny`.
    pub decision: String,
    /// Deciding rule's reason.
    pub reason: Option<String>,
    /// Deciding rule.
    pub policy_id: Option<String>,
    /// Estimate at the requested tier.
    pub estimated_cost_usd: f64,
    /// Time spent evaluating policies, ms.
    pub latency_ms: f64,
    /// Window spend reported by a budget rule.
    pub window_cost_usd: Option<f64>,
    /// Window limit reported by a budget rule.
    pub window_limit_usd: Option<f64>,
    /// The policy file's `version`.
    pub policy_version: String,
    /// What was reserved for the dispatch (absent on a denial): the write-ahead record a
    /// restart counts at its estimate when no telemetry line follows (a crash mid-call).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation: Option<ReservationRecord>,
    /// Every alert raised.
    pub alerts: &'a [String],
    /// Every rule's outcome.
    pub rules: &'a [RuleRecord],
}

/// The reservation a dispatched request holds, in its decision line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReservationRecord {
    /// Model the request is dispatched to.
    pub model: String,
    /// Provider of that model.
    pub provider: String,
    /// Reserved cost: the estimate at the effective tier.
    pub cost_usd: f64,
    /// Reserved input tokens.
    pub tokens_in: u64,
    /// Reserved output tokens (the output cap).
    pub tokens_out: u64,
}

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

struct Job {
    telemetry: Option<String>,
    decision: Option<String>,
    done: oneshot::Sender<Result<Written, WriteError>>,
}

/// The log writer: group commit without a writer thread. A request that finds no write in
/// progress becomes the leader and writes every line queued meanwhile (its own included) in one
/// batch per log, then the lines that arrived during that batch, and so on; the others wait
/// for their result. Lines thus reach the files without a hand-off to another thread, which on
/// a busy 2-core machine costs more than the write itself.
pub struct ArtifactWriter {
    shared: Arc<Shared>,
    telemetry_path: PathBuf,
    decisions_path: PathBuf,
}

struct Shared {
    queue: Mutex<Queue>,
    /// The two files, held by the leader while it writes; `None` once shut down.
    files: Mutex<Option<(LogFile, LogFile)>>,
    /// Signalled when a leader steps down (shutdown waits for it).
    idle: parking_lot::Condvar,
    /// Whether the last write to each log (telemetry, decisions) succeeded.
    healthy: [AtomicBool; 2],
    failures: AtomicU64,
    reopen: AtomicBool,
    telemetry_path: PathBuf,
}

/// Clears the leader flag when a leader unwinds.
struct StepDown<'a>(&'a Shared);

impl Drop for StepDown<'_> {
    fn drop(&mut self) {
        let mut q = self.0.queue.lock();
        q.writing = false;
        self.0.idle.notify_all();
    }
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// A leader is writing (and will take what is queued).
    writing: bool,
    closed: bool,
}

/// Batches a request writes as leader before it hands the rest to a thread of its own, so that a request
/// is not kept writing other requests' lines under sustained load.
const LEADER_ROUNDS: usize = 4;

impl Shared {
    /// Write queued batches until the queue is empty, then step down. A `bounded` leader (a
    /// request) hands what is still queued after [`LEADER_ROUNDS`] to a thread of its own.
    fn lead(self: &Arc<Self>, bounded: bool) {
        // Steps down if a write panics, so later lines find a leader again (the jobs of the
        // batch in hand get a closed channel: an error).
        let guard = StepDown(self);
        let mut batch = Vec::with_capacity(MAX_BATCH);
        for round in 0.. {
            {
                let mut q = self.queue.lock();
                if q.jobs.is_empty() {
                    q.writing = false;
                    self.idle.notify_all();
                    std::mem::forget(guard);
                    return;
                }
                if bounded && round >= LEADER_ROUNDS {
                    drop(q);
                    let this = Arc::clone(self);
                    let spawned = std::thread::Builder::new()
                        .name("llmscope-artifacts".into())
                        .spawn(move || this.lead(false));
                    if spawned.is_ok() {
                        std::mem::forget(guard);
                        return;
                    }
                    q = self.queue.lock();
                }
                let n = q.jobs.len().min(MAX_BATCH);
                batch.extend(q.jobs.drain(..n));
            }
            let force = self.reopen.swap(false, Ordering::Relaxed);
            let mut files = self.files.lock();
            match files.as_mut() {
                Some((telemetry, decisions)) => write_batch(
                    telemetry,
                    decisions,
                    force,
                    &mut batch,
                    &self.healthy,
                    &self.failures,
                ),
                None => {
                    for job in batch.drain(..) {
                        let _ = job.done.send(Err(WriteError {
                            path: self.telemetry_path.clone(),
                            message: "the writer has stopped".into(),
                        }));
                    }
                }
            }
        }
    }
}

/// Most lines written in one batch.
const MAX_BATCH: usize = 256;

/// One log file as the writer holds it: reopened when the path names another file (a rename
/// rotation) or on request (SIGHUP).
struct LogFile {
    path: PathBuf,
    file: File,
    ino: u64,
    /// When the path was last compared with the file held.
    checked: std::time::Instant,
}

/// How often the writer checks that a log's path still names the file it holds. Lines written
/// to a renamed file in between are not lost: the engine drains a renamed log to its end.
const FOLLOW_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

impl LogFile {
    fn open(path: &Path) -> Result<Self, WriteError> {
        let err = |e: std::io::Error| WriteError {
            path: path.into(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        let ino = file.metadata().map_err(err)?.ino();
        Ok(Self {
            path: path.into(),
            file,
            ino,
            checked: std::time::Instant::now(),
        })
    }

    /// Follow the path: reopen when it names another file than the one held (renamed away,
    /// deleted, replaced; checked at most every [`FOLLOW_INTERVAL`]) or when `force` is set.
    fn follow(&mut self, force: bool) -> Result<(), WriteError> {
        if !force && self.checked.elapsed() < FOLLOW_INTERVAL {
            return Ok(());
        }
        self.checked = std::time::Instant::now();
        let moved = match std::fs::metadata(&self.path) {
            Ok(m) => m.ino() != self.ino,
            Err(_) => true,
        };
        if moved || force {
            *self = Self::open(&self.path)?;
            tracing::info!(file = %self.path.display(), "log reopened");
        }
        Ok(())
    }

    /// Append `buf` (whole lines) in one write under an exclusive lock; returns the file length
    /// before the write. A failed or short write is rolled back (truncated to the length before
    /// it) under the same lock, so no fragment is left for the next line to be glued to.
    fn append_locked(&mut self, buf: &[u8]) -> Result<u64, WriteError> {
        let err = |e: std::io::Error| WriteError {
            path: self.path.clone(),
            message: e.to_string(),
        };
        self.file.lock_exclusive().map_err(err)?;
        let result = (|| {
            let before = self.file.seek(SeekFrom::End(0))?;
            if let Err(e) = self.file.write_all(buf) {
                if let Err(t) = self.file.set_len(before) {
                    tracing::error!(file = %self.path.display(), error = %t, "cannot roll back a partial write");
                }
                return Err(e);
            }
            Ok(before)
        })();
        let unlock = FileExt::unlock(&self.file);
        let before = result.map_err(err)?;
        unlock.map_err(err)?;
        Ok(before)
    }
}

impl ArtifactWriter {
    /// Open (creating directories and files as needed).
    pub fn start(telemetry_path: &Path, decisions_path: &Path) -> Result<Self, WriteError> {
        let telemetry = LogFile::open(telemetry_path)?;
        let decisions = LogFile::open(decisions_path)?;
        Ok(Self {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::default()),
                files: Mutex::new(Some((telemetry, decisions))),
                idle: parking_lot::Condvar::new(),
                healthy: [AtomicBool::new(true), AtomicBool::new(true)],
                failures: AtomicU64::new(0),
                reopen: AtomicBool::new(false),
                telemetry_path: telemetry_path.into(),
            }),
            telemetry_path: telemetry_path.into(),
            decisions_path: decisions_path.into(),
        })
    }

    /// Append one request's lines and wait until they are written.
    pub async fn append(
        &self,
        telemetry: &TelemetryRecord,
        decision: Option<&DecisionRecord<'_>>,
    ) -> Result<Written, WriteError> {
        let telemetry = encode(&self.telemetry_path, telemetry)?;
        let decision = decision
            .map(|d| encode(&self.decisions_path, d))
            .transpose()?;
        self.submit(Some(telemetry), decision).await
    }

    /// Append a decision line alone and wait until it is written: the write-ahead record of a
    /// request about to be dispatched (its telemetry follows when the provider answers).
    pub async fn append_decision(&self, decision: &DecisionRecord<'_>) -> Result<(), WriteError> {
        let decision = encode(&self.decisions_path, decision)?;
        self.submit(None, Some(decision)).await.map(|_| ())
    }

    async fn submit(
        &self,
        telemetry: Option<String>,
        decision: Option<String>,
    ) -> Result<Written, WriteError> {
        let (done, mut wait) = oneshot::channel();
        let closed = || WriteError {
            path: self.telemetry_path.clone(),
            message: "the writer has stopped".into(),
        };
        let lead = {
            let mut q = self.shared.queue.lock();
            if q.closed {
                return Err(closed());
            }
            q.jobs.push(Job {
                telemetry,
                decision,
                done,
            });
            !std::mem::replace(&mut q.writing, true)
        };
        if lead {
            self.shared.lead(true);
            if let Ok(result) = wait.try_recv() {
                return result;
            }
        }
        wait.await.map_err(|_| closed())?
    }

    /// Reopen both logs before the next batch (after an external rotation; SIGHUP). A rename
    /// rotation is also noticed without it: every batch checks that the paths still name the
    /// files held.
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Relaxed);
    }

    /// False after a failed write, until a later write succeeds.
    pub fn healthy(&self) -> bool {
        self.shared
            .healthy
            .iter()
            .all(|h| h.load(Ordering::Relaxed))
    }

    /// False after a failed telemetry write, until a later one succeeds.
    pub fn telemetry_healthy(&self) -> bool {
        self.shared.healthy[0].load(Ordering::Relaxed)
    }

    /// Failed batches since start.
    pub fn failures(&self) -> u64 {
        self.shared.failures.load(Ordering::Relaxed)
    }

    /// Paths written.
    pub fn paths(&self) -> (&Path, &Path) {
        (&self.telemetry_path, &self.decisions_path)
    }

    /// Stop accepting lines, let the current leader write everything queued, and close the
    /// files.
    pub fn shutdown(&self) {
        let mut q = self.shared.queue.lock();
        q.closed = true;
        while q.writing {
            self.shared.idle.wait(&mut q);
        }
        drop(q);
        self.shared.files.lock().take();
    }
}

impl Drop for ArtifactWriter {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Append `lines` (whole JSON lines) to the log at `path` now, outside the writer thread, in
/// one locked write (rolled back if it fails); returns where they end. For start-up, before
/// the gateway serves.
pub fn append_lines_now(path: &Path, lines: &str) -> Result<LogPosition, WriteError> {
    let mut log = LogFile::open(path)?;
    let before = log.append_locked(lines.as_bytes())?;
    Ok(LogPosition {
        file_id: log.ino,
        offset: before.saturating_add(lines.len() as u64),
    })
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

/// Write a batch: first every decision line (one write), then the telemetry lines of the jobs
/// whose decision, if any, was written (one write), so a telemetry line never stands without
/// its decision. A job succeeds when all its lines were written.
fn write_batch(
    telemetry: &mut LogFile,
    decisions: &mut LogFile,
    force_reopen: bool,
    batch: &mut Vec<Job>,
    healthy: &[AtomicBool; 2],
    failures: &AtomicU64,
) {
    let mut results: Vec<Result<Written, WriteError>> =
        vec![Ok(Written { telemetry: None }); batch.len()];
    let d_buf: String = batch.iter().filter_map(|j| j.decision.as_deref()).collect();
    if !d_buf.is_empty() {
        let written = decisions
            .follow(force_reopen)
            .and_then(|()| decisions.append_locked(d_buf.as_bytes()));
        healthy[1].store(written.is_ok(), Ordering::Relaxed);
        if let Err(e) = written {
            for (job, r) in batch.iter().zip(&mut results) {
                if job.decision.is_some() {
                    *r = Err(e.clone());
                }
            }
        }
    } else if force_reopen {
        if let Err(e) = decisions.follow(true) {
            tracing::error!(error = %e, "cannot reopen the decision log");
        }
    }
    let mut t_buf = String::new();
    let mut ends = Vec::with_capacity(batch.len());
    for (job, r) in batch.iter().zip(&results) {
        match (&job.telemetry, r) {
            (Some(t), Ok(_)) => {
                t_buf.push_str(t);
                ends.push(Some(t_buf.len() as u64));
            }
            _ => ends.push(None),
        }
    }
    if !t_buf.is_empty() || force_reopen {
        match telemetry.follow(force_reopen).and_then(|()| {
            if t_buf.is_empty() {
                Ok(0)
            } else {
                telemetry.append_locked(t_buf.as_bytes())
            }
        }) {
            Ok(_) if t_buf.is_empty() => {}
            Ok(before) => {
                healthy[0].store(true, Ordering::Relaxed);
                for (r, end) in results.iter_mut().zip(&ends) {
                    let Some(end) = end else { continue };
                    *r = match before.checked_add(*end) {
                        Some(offset) => Ok(Written {
                            telemetry: Some(LogPosition {
                                file_id: telemetry.ino,
                                offset,
                            }),
                        }),
                        None => Err(WriteError {
                            path: telemetry.path.clone(),
                            message: "file offset overflow".into(),
                        }),
                    };
                }
            }
            Err(e) => {
                healthy[0].store(false, Ordering::Relaxed);
                for (r, end) in results.iter_mut().zip(&ends) {
                    if end.is_some() {
                        *r = Err(e.clone());
                    }
                }
            }
        }
    }
    let failed = results.iter().any(Result::is_err);
    if failed {
        failures.fetch_add(1, Ordering::Relaxed);
    }
    for (job, reply) in batch.drain(..).zip(results) {
        let _ = job.done.send(reply);
    }
}

/// RFC 3339 UTC timestamp with millisecond precision for `unix_ms`.
pub fn rfc3339(unix_ms: u64) -> String {
    let nanos = i128::from(unix_ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            ))
            .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_millis() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_764_000_000_123), "2025-11-24T16:00:00.123Z");
    }

    #[tokio::test]
    async fn appends_whole_lines_and_reports_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let (t, d) = (
            dir.path().join("logs/t.jsonl"),
            dir.path().join("logs/d.jsonl"),
        );
        let w = ArtifactWriter::start(&t, &d).unwrap();
        let rec = TelemetryRecord {
            request_id: "r1".into(),
            ..TelemetryRecord::default()
        };
        let first = w.append(&rec, None).await.unwrap();
        let second = w.append(&rec, None).await.unwrap();
        w.shutdown();
        let text = std::fs::read_to_string(&t).unwrap();
        assert_eq!(text.lines().count(), 2);
        let (first, second) = (first.telemetry.unwrap(), second.telemetry.unwrap());
        assert_eq!(second.offset, text.len() as u64);
        assert_eq!(first.offset * 2, second.offset);
        assert_eq!(first.file_id, std::fs::metadata(&t).unwrap().ino());
        let back: TelemetryRecord = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(back.request_id, "r1");
    }

    /// Many concurrent writers on a multi-threaded runtime, enough to make leaders hand off to
    /// a thread: every line lands whole, once, at the offset its writer was told.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_each_land_once_at_their_reported_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (t, d) = (dir.path().join("t.jsonl"), dir.path().join("d.jsonl"));
        let w = Arc::new(ArtifactWriter::start(&t, &d).unwrap());
        let mut tasks = Vec::new();
        for task in 0..32 {
            let w = Arc::clone(&w);
            tasks.push(tokio::spawn(async move {
                let mut ends = Vec::new();
                for i in 0..200 {
                    let rec = TelemetryRecord {
                        request_id: format!("r-{task}-{i}"),
                        ..TelemetryRecord::default()
                    };
                    let written = w.append(&rec, None).await.unwrap();
                    ends.push((rec.request_id, written.telemetry.unwrap().offset));
                }
                ends
            }));
        }
        let mut ends = Vec::new();
        for t in tasks {
            ends.extend(t.await.unwrap());
        }
        w.shutdown();
        let text = std::fs::read_to_string(&t).unwrap();
        assert_eq!(text.lines().count(), 32 * 200);
        for (id, end) in &ends {
            let end = usize::try_from(*end).unwrap();
            let line = text[..end].lines().last().unwrap();
            let back: TelemetryRecord = serde_json::from_str(line).unwrap();
            assert_eq!(&back.request_id, id);
        }
        let rec = TelemetryRecord::default();
        assert!(
            w.append(&rec, None).await.is_err(),
            "a stopped writer refuses lines"
        );
    }

    #[tokio::test]
    async fn a_decision_is_written_ahead_alone_and_rotation_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (t, d) = (dir.path().join("t.jsonl"), dir.path().join("d.jsonl"));
        let w = ArtifactWriter::start(&t, &d).unwrap();
        let decision = DecisionRecord {
            timestamp: rfc3339(0),
            request_id: "r1".into(),
            tenant_id: "acme".into(),
            caller_id: None,
            feature_id: None,
            experiment_id: None,
            budget_namespace: None,
            route_name: "chat".into(),
            requested_model_tier: "cheap".into(),
            effective_model_tier: "cheap".into(),
            primitive: None,
            decision: "allow".into(),
            reason: None,
            policy_id: None,
            estimated_cost_usd: 0.5,
            latency_ms: 0.0,
            window_cost_usd: None,
            window_limit_usd: None,
            policy_version: "1".into(),
            reservation: Some(ReservationRecord {
                model: "gpt-4o".into(),
                provider: "mock".into(),
                cost_usd: 0.5,
                tokens_in: 10,
                tokens_out: 20,
            }),
            alerts: &[],
            rules: &[],
        };
        w.append_decision(&decision).await.unwrap();
        assert_eq!(std::fs::read_to_string(&d).unwrap().lines().count(), 1);
        assert!(std::fs::read_to_string(&t).unwrap().is_empty());
        // logrotate's default: rename, and the writer follows the path on its next batch.
        std::fs::rename(&t, dir.path().join("t.jsonl.1")).unwrap();
        std::fs::rename(&d, dir.path().join("d.jsonl.1")).unwrap();
        std::thread::sleep(FOLLOW_INTERVAL + std::time::Duration::from_millis(20));
        let rec = TelemetryRecord {
            request_id: "r1".into(),
            ..TelemetryRecord::default()
        };
        let at = w.append(&rec, None).await.unwrap().telemetry.unwrap();
        w.append_decision(&decision).await.unwrap();
        assert_eq!(std::fs::read_to_string(&t).unwrap().lines().count(), 1);
        assert_eq!(at.file_id, std::fs::metadata(&t).unwrap().ino());
        assert_eq!(std::fs::read_to_string(&d).unwrap().lines().count(), 1);
        // SIGHUP's reopen with the path unchanged keeps appending to the same file.
        w.reopen();
        w.append(&rec, None).await.unwrap();
        w.shutdown();
        assert_eq!(std::fs::read_to_string(&t).unwrap().lines().count(), 2);
    }

    #[tokio::test]
    async fn unwritable_path_is_an_error_naming_it() {
        let err = ArtifactWriter::start(Path::new("/proc/llmscope/t.jsonl"), Path::new("/proc/x"))
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .starts_with("cannot append to /proc/llmscope/t.jsonl"),
            "{err}"
        );
    }
}
