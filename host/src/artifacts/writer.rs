//! The log writer: requests write their encoded lines themselves, in group commits (every
//! decision line of a batch in one write, then every telemetry line in one write; see
//! [`ArtifactWriter`]), and each learns where its telemetry line ended.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::log_file::LogFile;
use super::{encode, DecisionRecord, LogPosition, TelemetryRecord, WriteError, Written};

/// Diagnostics keep the target they had before this file was split out of `artifacts`.
const TARGET: &str = "llmscope::artifacts";

/// One request's encoded lines, and where to answer it.
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

/// Steps a leader down when it unwinds: lines queued meanwhile get a new leader (a thread), so
/// no request waits for a write nobody will make.
struct StepDown<'a>(&'a Arc<Shared>);

impl Drop for StepDown<'_> {
    fn drop(&mut self) {
        let mut q = self.0.queue.lock();
        if !q.jobs.is_empty() {
            drop(q);
            if self.0.hand_off() {
                return;
            }
            q = self.0.queue.lock();
            // No thread: fail what is queued rather than leave it waiting.
            q.jobs.clear();
        }
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
    /// Make a thread of its own the leader (unbounded: it writes until the queue is empty);
    /// false when no thread could be started.
    fn hand_off(self: &Arc<Self>) -> bool {
        let this = Arc::clone(self);
        std::thread::Builder::new()
            .name("llmscope-artifacts".into())
            .spawn(move || this.lead(false))
            .is_ok()
    }

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
                    if self.hand_off() {
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

/// What each job of a batch gets back, in batch order.
type Results = Vec<Result<Written, WriteError>>;

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
    let mut results: Results = vec![Ok(Written { telemetry: None }); batch.len()];
    write_decisions(decisions, force_reopen, batch, &mut results, &healthy[1]);
    write_telemetry(telemetry, force_reopen, batch, &mut results, &healthy[0]);
    let failed = results.iter().any(Result::is_err);
    if failed {
        failures.fetch_add(1, Ordering::Relaxed);
    }
    for (job, reply) in batch.drain(..).zip(results) {
        let _ = job.done.send(reply);
    }
}

/// The batch's decision lines in one write; a failure fails every job that has one. With no
/// decision line, a forced reopen still reopens the log.
fn write_decisions(
    decisions: &mut LogFile,
    force_reopen: bool,
    batch: &[Job],
    results: &mut Results,
    healthy: &AtomicBool,
) {
    let d_buf: String = batch.iter().filter_map(|j| j.decision.as_deref()).collect();
    if !d_buf.is_empty() {
        let written = decisions
            .follow(force_reopen)
            .and_then(|()| decisions.append_locked(d_buf.as_bytes()));
        healthy.store(written.is_ok(), Ordering::Relaxed);
        if let Err(e) = written {
            for (job, r) in batch.iter().zip(results) {
                if job.decision.is_some() {
                    *r = Err(e.clone());
                }
            }
        }
    } else if force_reopen {
        if let Err(e) = decisions.follow(true) {
            tracing::error!(target: TARGET, error = %e, "cannot reopen the decision log");
        }
    }
}

/// The telemetry lines of the jobs not failed yet, in one write; each such job gets where its
/// line ended, or the failure.
fn write_telemetry(
    telemetry: &mut LogFile,
    force_reopen: bool,
    batch: &[Job],
    results: &mut Results,
    healthy: &AtomicBool,
) {
    let (t_buf, ends) = telemetry_lines(batch, results);
    if t_buf.is_empty() && !force_reopen {
        return;
    }
    match telemetry.follow(force_reopen).and_then(|()| {
        if t_buf.is_empty() {
            Ok(0)
        } else {
            telemetry.append_locked(t_buf.as_bytes())
        }
    }) {
        Ok(_) if t_buf.is_empty() => {}
        Ok(before) => {
            healthy.store(true, Ordering::Relaxed);
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
            healthy.store(false, Ordering::Relaxed);
            for (r, end) in results.iter_mut().zip(&ends) {
                if end.is_some() {
                    *r = Err(e.clone());
                }
            }
        }
    }
}

/// The telemetry lines to write (of the jobs not failed yet, in batch order) and, per job,
/// where its line ends in them (`None`: no line written for it).
fn telemetry_lines(batch: &[Job], results: &Results) -> (String, Vec<Option<u64>>) {
    let mut t_buf = String::new();
    let mut ends = Vec::with_capacity(batch.len());
    for (job, r) in batch.iter().zip(results) {
        match (&job.telemetry, r) {
            (Some(t), Ok(_)) => {
                t_buf.push_str(t);
                ends.push(Some(t_buf.len() as u64));
            }
            _ => ends.push(None),
        }
    }
    (t_buf, ends)
}
