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
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

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
    /// `provider_usage`, `estimate` (provider reported no usage), or `none` (not dispatched).
    pub cost_source: String,
    /// Provider latency, ms (0 when not dispatched).
    pub latency_ms: f64,
    /// `ok`, `denied`, or `error`.
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
    /// Every alert raised.
    pub alerts: &'a [String],
    /// Every rule's outcome.
    pub rules: &'a [RuleRecord],
}

/// What the writer reports back for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Byte offset just past this request's telemetry line.
    pub telemetry_end: u64,
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
    telemetry: String,
    decision: Option<String>,
    done: oneshot::Sender<Result<Written, WriteError>>,
}

/// Handle to the writer thread.
pub struct ArtifactWriter {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    healthy: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    telemetry_path: PathBuf,
    decisions_path: PathBuf,
}

/// Most lines written in one batch.
const MAX_BATCH: usize = 256;

fn open_append(path: &Path) -> Result<File, WriteError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| WriteError {
            path: path.into(),
            message: e.to_string(),
        })?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| WriteError {
            path: path.into(),
            message: e.to_string(),
        })
}

/// Append `buf` (whole lines) to `file` in one write under an exclusive lock; returns the file
/// length after the write.
fn append_locked(file: &mut File, path: &Path, buf: &[u8]) -> Result<u64, WriteError> {
    let err = |e: std::io::Error| WriteError {
        path: path.into(),
        message: e.to_string(),
    };
    file.lock_exclusive().map_err(err)?;
    let result = file
        .write_all(buf)
        .and_then(|()| file.seek(SeekFrom::End(0)));
    let unlock = FileExt::unlock(file);
    let end = result.map_err(err)?;
    unlock.map_err(err)?;
    Ok(end)
}

impl ArtifactWriter {
    /// Open (creating directories and files as needed) and start the writer thread.
    pub fn start(telemetry_path: &Path, decisions_path: &Path) -> Result<Self, WriteError> {
        let mut telemetry = open_append(telemetry_path)?;
        let mut decisions = open_append(decisions_path)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let healthy = Arc::new(AtomicBool::new(true));
        let failures = Arc::new(AtomicU64::new(0));
        let (t_path, d_path) = (telemetry_path.to_path_buf(), decisions_path.to_path_buf());
        let (h, f) = (Arc::clone(&healthy), Arc::clone(&failures));
        let thread = std::thread::Builder::new()
            .name("llmscope-artifacts".into())
            .spawn(move || {
                let mut batch = Vec::with_capacity(MAX_BATCH);
                while let Ok(job) = rx.recv() {
                    batch.push(job);
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    write_batch(
                        &mut telemetry,
                        &t_path,
                        &mut decisions,
                        &d_path,
                        &mut batch,
                        &h,
                        &f,
                    );
                }
            })
            .map_err(|e| WriteError {
                path: telemetry_path.into(),
                message: format!("cannot start writer: {e}"),
            })?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            healthy,
            failures,
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
        let encode = |path: &Path, r: Result<String, serde_json::Error>| {
            r.map(|mut line| {
                line.push('\n');
                line
            })
            .map_err(|e| WriteError {
                path: path.into(),
                message: format!("cannot encode record: {e}"),
            })
        };
        let telemetry = encode(&self.telemetry_path, serde_json::to_string(telemetry))?;
        let decision = decision
            .map(|d| encode(&self.decisions_path, serde_json::to_string(d)))
            .transpose()?;
        let (done, wait) = oneshot::channel();
        let closed = || WriteError {
            path: self.telemetry_path.clone(),
            message: "the writer has stopped".into(),
        };
        {
            let tx = self.tx.lock();
            tx.as_ref()
                .ok_or_else(closed)?
                .send(Job {
                    telemetry,
                    decision,
                    done,
                })
                .map_err(|_| closed())?;
        }
        wait.await.map_err(|_| closed())?
    }

    /// False after a failed write, until a later write succeeds.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Failed batches since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Paths written.
    pub fn paths(&self) -> (&Path, &Path) {
        (&self.telemetry_path, &self.decisions_path)
    }

    /// Stop accepting lines, write everything queued, and wait for the thread.
    pub fn shutdown(&self) {
        self.tx.lock().take();
        let thread = self.thread.lock().take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for ArtifactWriter {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn write_batch(
    telemetry: &mut File,
    t_path: &Path,
    decisions: &mut File,
    d_path: &Path,
    batch: &mut Vec<Job>,
    healthy: &AtomicBool,
    failures: &AtomicU64,
) {
    let mut t_buf = String::new();
    let mut d_buf = String::new();
    let mut ends = Vec::with_capacity(batch.len());
    for job in batch.iter() {
        t_buf.push_str(&job.telemetry);
        ends.push(t_buf.len() as u64);
        if let Some(d) = &job.decision {
            d_buf.push_str(d);
        }
    }
    let result = (|| {
        let t_end = append_locked(telemetry, t_path, t_buf.as_bytes())?;
        if !d_buf.is_empty() {
            append_locked(decisions, d_path, d_buf.as_bytes())?;
        }
        Ok::<u64, WriteError>(t_end)
    })();
    healthy.store(result.is_ok(), Ordering::Relaxed);
    if result.is_err() {
        failures.fetch_add(1, Ordering::Relaxed);
    }
    let start = result.as_ref().map(|end| end - t_buf.len() as u64);
    for (job, end) in batch.drain(..).zip(ends) {
        let reply = match &start {
            Ok(start) => Ok(Written {
                telemetry_end: start + end,
            }),
            Err(e) => Err((*e).clone()),
        };
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
        assert_eq!(second.telemetry_end, text.len() as u64);
        assert_eq!(first.telemetry_end * 2, second.telemetry_end);
        let back: TelemetryRecord = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(back.request_id, "r1");
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
