//! The refresh that ingests the logs and publishes aggregates (dropping from the ledger what
//! they now count) under the refresh critical section, a question's ingestion, and policy
//! reload, which swaps the new set in inside that same section.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use llmscope_sdk::types::Aggregate;

use crate::engine::{declared_aggregates, EngineError, IngestReport};
use crate::policy::{ConfigError, PolicySet};

use super::{now_ms, Gateway};

/// Diagnostics keep the target they had before this file was split out of `gateway`.
const TARGET: &str = "llmscope::gateway";

/// How long an idle gateway keeps its computed aggregates before computing them again.
pub(crate) const IDLE_COMPUTE: std::time::Duration = std::time::Duration::from_secs(5);

impl Gateway {
    /// Ingest new log lines, recompute every declared aggregate and publish them; settled
    /// ledger entries now covered by the aggregates are dropped. Blocking: call it off the
    /// async workers.
    pub fn refresh(&self) -> Result<IngestReport, EngineError> {
        let _serial = self.refresh_lock.lock();
        let policies = self.policies();
        self.refresh_locked(&policies, true, || {})
    }

    /// The refresh, with `refresh_lock` held: ingest → compute the aggregates of `policies`
    /// (and of the set serving now, during a reload: requests that started on it still read
    /// its aggregates) → run `swap` → publish and drop from the ledger what ingestion covered,
    /// under the `view` write lock (so no evaluation reads the old aggregates after the ledger
    /// dropped what only the new ones include) → age out old entries.
    fn refresh_locked(
        &self,
        policies: &PolicySet,
        may_idle: bool,
        swap: impl FnOnce(),
    ) -> Result<IngestReport, EngineError> {
        let started = Instant::now();
        let report = self.engine.ingest()?;
        // Kept until published: a failed compute must not lose a drained file's position.
        self.ingested_elsewhere
            .lock()
            .extend_from_slice(&report.telemetry_through);
        let edge = self.edge.aggregates();
        let serving = self.policies();
        let aggregates = declared_aggregates(policies.rules().chain(serving.rules()), &edge);
        let now = now_ms();
        // Idle: nothing logged since the last computation and no row has left or entered a
        // rolling window since, so every published value is still exact.
        if may_idle && self.idle(&report, &aggregates, now) {
            if let Some(s) = &self.shared {
                s.expire(now);
            }
            self.metrics.refresh(started.elapsed().as_secs_f64(), 0, 0);
            return Ok(report);
        }
        self.unpublished_rows.store(false, Ordering::SeqCst);
        let published = Arc::new(self.engine.compute(&aggregates, now)?);
        *self.last_compute.lock() = Some((Instant::now(), Arc::clone(&published)));
        // The shared store's mirror, rebuilt from the same DuckDB state when the sums it keeps
        // change (and at start).
        let seed = match &self.shared {
            Some(s) if s.needs_rebuild(&aggregates) => {
                let specs = crate::shared::SharedBudgets::specs_of(&aggregates);
                let rows = self.engine.shared_seed(&specs, now)?;
                Some((Arc::clone(s), specs, rows))
            }
            _ => None,
        };
        let expired = self.edge.expire(self.edge_ttl);
        if expired > 0 {
            tracing::warn!(
                target: TARGET,
                expired,
                "edge requests without a report (proxy gone?): counted at their estimate"
            );
        }
        {
            let _view = self.view.write();
            swap();
            self.publish_aggregates(published);
            let through = std::mem::take(&mut *self.ingested_elsewhere.lock());
            self.ledger.ingested_through(&through);
            if let Some((shared, specs, rows)) = seed {
                self.ledger.with_entries(|entries, published| {
                    shared.rebuild(specs, rows, entries, published);
                });
            }
        }
        if let Some(s) = &self.shared {
            s.expire(now);
        }
        self.ledger
            .expire(now.saturating_sub(longest_window_ms(&aggregates, now)));
        self.metrics.refresh(
            started.elapsed().as_secs_f64(),
            report.telemetry_rows + report.decision_rows,
            report.malformed.len() as u64,
        );
        Ok(report)
    }

    /// Whether this pass may keep the last computation instead of computing: nothing was
    /// ingested (by this pass or a question's since), nothing is malformed or rotated, no money
    /// is in flight or unpublished (ledger, edge reservations), it holds every aggregate
    /// declared now (a new edge aggregate or rule is computed at once), it is less than
    /// [`IDLE_COMPUTE`] old, and no row has left one of its rolling windows since — so every
    /// value, sums and averages alike, is what a computation now would give.
    fn idle(&self, report: &IngestReport, aggregates: &[Aggregate], now_ms: u64) -> bool {
        let quiet = report.telemetry_rows + report.decision_rows == 0
            && report.rotated.is_empty()
            && report.malformed.is_empty()
            && !self.unpublished_rows.load(Ordering::SeqCst)
            && self.ledger.len() == (0, 0)
            && self.edge.pending() == 0;
        quiet
            && self
                .last_compute
                .lock()
                .as_ref()
                .is_some_and(|(at, published)| {
                    at.elapsed() < IDLE_COMPUTE
                        && published.unchanged_at(now_ms)
                        && aggregates.iter().all(|a| published.holds(a))
                })
    }

    /// Held (read) while a request's snapshots are assembled from the published aggregates and
    /// the ledger, so a refresh cannot publish and drop ledger entries in between.
    pub(crate) fn view(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.view.read()
    }

    /// Ingest new log lines for a question (serialized with refreshes). The ledger keeps what
    /// this pass covered until the next refresh publishes aggregates that include it.
    pub fn ingest(&self) -> Result<IngestReport, EngineError> {
        let _serial = self.refresh_lock.lock();
        let report = self.engine.ingest()?;
        if report.telemetry_rows + report.decision_rows > 0 || !report.rotated.is_empty() {
            // In DuckDB but not yet in the published aggregates: the next refresh computes.
            self.unpublished_rows.store(true, Ordering::SeqCst);
        }
        let mut elsewhere = self.ingested_elsewhere.lock();
        for p in &report.telemetry_through {
            // The newest position of a file replaces older ones (a truncated file restarts).
            match elsewhere.iter_mut().find(|e| e.file_id == p.file_id) {
                Some(e) => e.offset = p.offset,
                None => elsewhere.push(*p),
            }
        }
        Ok(report)
    }

    /// Reload the policy file and components; on success swap them in atomically (requests
    /// already evaluating keep the set they started with), on failure keep serving the old set.
    /// The new set's aggregates are computed before the swap, so its budgets never read an
    /// empty window.
    pub fn reload_policies(&self) -> Result<Arc<PolicySet>, ConfigError> {
        match PolicySet::load(
            &self.config.policy_file,
            &self.config.policies_dir,
            &self.runtime,
        ) {
            Ok(set) => {
                let set = Arc::new(set);
                {
                    let _serial = self.refresh_lock.lock();
                    let swap = || *self.policies.write() = Arc::clone(&set);
                    if let Err(e) = self.refresh_locked(&set, false, swap) {
                        // Serve the new rules anyway, on the aggregates published last.
                        tracing::error!(target: TARGET, error = %e, "aggregate refresh for the reloaded policies failed");
                        *self.policies.write() = Arc::clone(&set);
                    }
                }
                self.metrics.reload("ok");
                tracing::info!(target: TARGET, file = %self.config.policy_file.display(), rules = set.rules().count(), "policies reloaded");
                Ok(set)
            }
            Err(e) => {
                self.metrics.reload("failed");
                tracing::error!(target: TARGET, error = %e, "policy reload rejected; the previous policies keep serving");
                Err(e)
            }
        }
    }

    /// Paths the hot reloader watches.
    pub fn watched_paths(&self) -> (PathBuf, PathBuf) {
        (
            self.config.policy_file.clone(),
            self.config.policies_dir.clone(),
        )
    }
}

/// The longest window among `aggregates`, ms (at least a day), measured at `now_ms`: ledger
/// entries older than it count in no sum.
fn longest_window_ms(aggregates: &[Aggregate], now_ms: u64) -> u64 {
    let now_us = i64::try_from(now_ms)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000);
    aggregates
        .iter()
        .map(|a| {
            let start = crate::windows::window_start_us(a.window, now_ms).0;
            u64::try_from(now_us.saturating_sub(start) / 1000).unwrap_or(0)
        })
        .fold(86_400_000, u64::max)
}
