//! Crash recovery at start. Every dispatched request's decision line, with its reservation, is
//! written before the provider is called; its telemetry line after the provider answers. A
//! decision with a reservation and no telemetry line was in flight when its process died, and
//! the provider may have billed it. At start each such request gets a telemetry line with
//! status `unanswered`, `cost_source: estimate` and its reserved estimate as cost, so budgets
//! and the questions count it: a crash leaves the books conservative, never optimistic.
//!
//! A request answered in the rotated telemetry file (`<telemetry>.1`) is not an orphan: when
//! only the telemetry log was rotated, its decision is still in the current decision log.
//! The logs must not be shared with another gateway that is running: its requests in flight
//! would be counted here too (at their estimate, and again when they finish).

use std::collections::HashSet;
use std::io::BufRead;

use serde::Deserialize;

use crate::artifacts::{append_lines_now, encode, ReservationRecord, TelemetryRecord};

use super::records::{CostSource, Status};
use super::{Gateway, StartError};

/// The fields of a decision line recovery needs.
#[derive(Deserialize)]
struct Decision {
    timestamp: String,
    request_id: String,
    tenant_id: String,
    #[serde(default)]
    caller_id: Option<String>,
    #[serde(default)]
    feature_id: Option<String>,
    #[serde(default)]
    experiment_id: Option<String>,
    #[serde(default)]
    budget_namespace: Option<String>,
    route_name: String,
    requested_model_tier: String,
    effective_model_tier: String,
    decision: String,
    #[serde(default)]
    policy_id: Option<String>,
    #[serde(default)]
    estimated_cost_usd: f64,
    #[serde(default)]
    reservation: Option<ReservationRecord>,
}

impl Gateway {
    /// Remember the request ids of the telemetry lines of the last two reservation TTLs (the
    /// newest [`REPORTED_MEMORY`](super::edge::state::REPORTED_MEMORY) of them) as reported: edge idempotency
    /// survives a restart, because the logs, not the process, say what was recorded. Returns
    /// how many.
    pub(crate) fn recover_reported(&self) -> Result<usize, StartError> {
        let window_ms =
            u64::try_from(2 * super::edge::EDGE_RESERVATION_TTL.as_millis()).unwrap_or(u64::MAX);
        let since_us = i64::try_from(super::now_ms().saturating_sub(window_ms))
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        // Including the lines `recover_unanswered` just wrote.
        self.engine.ingest()?;
        let mut ids: Vec<String> = self.engine.with_conn(|conn| {
            let mut stmt = conn.prepare(
                "SELECT request_id FROM telemetry WHERE request_id IS NOT NULL AND ts_us >= ? \
                 ORDER BY ts_us DESC LIMIT ?",
            )?;
            let rows = stmt.query_map(
                duckdb::params![
                    since_us,
                    i64::try_from(super::edge::state::REPORTED_MEMORY).unwrap_or(i64::MAX)
                ],
                |r| r.get::<_, String>(0),
            )?;
            rows.collect()
        })?;
        let n = ids.len();
        // Oldest first: the memory forgets from the front.
        ids.reverse();
        self.edge.remember_reported(ids);
        Ok(n)
    }

    /// Write the missing telemetry line of every decision that has none (see [`unanswered`]
    /// for what each records): a dispatched one `unanswered` at its reserved estimate. Returns
    /// how many.
    pub(crate) fn recover_unanswered(&self) -> Result<usize, StartError> {
        self.engine.ingest_rotated()?;
        self.engine.ingest()?;
        let orphans: HashSet<String> = self.engine.with_conn(|conn| {
            let mut stmt = conn.prepare(
                // Decisions older than every telemetry line still readable may have theirs in
                // a rotated file that is compressed or gone: only newer ones are orphans.
                "SELECT d.request_id FROM decisions d WHERE d.request_id IS NOT NULL \
                 AND d.ts_us >= (SELECT coalesce(min(ts_us), 0) FROM telemetry) AND NOT EXISTS \
                 (SELECT 1 FROM telemetry t WHERE t.request_id = d.request_id)",
            )?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            rows.collect()
        })?;
        let orphans = answered_in_rotated(&self.config.telemetry_path, orphans)?;
        if orphans.is_empty() {
            return Ok(0);
        }
        let mut lines = String::new();
        let mut seen = HashSet::new();
        let mut cost = 0.0;
        // The decision may be in the current log or, rotated since, in `<decisions>.1`.
        let current = self.config.decisions_path.clone();
        let mut rotated = current.as_os_str().to_owned();
        rotated.push(".1");
        for path in [std::path::PathBuf::from(rotated), current] {
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(StartError::Recovery(format!(
                        "cannot read {}: {e}",
                        path.display()
                    )))
                }
            };
            for line in std::io::BufReader::new(file).lines() {
                let line = line.map_err(|e| {
                    StartError::Recovery(format!("cannot read {}: {e}", path.display()))
                })?;
                let Ok(d) = serde_json::from_str::<Decision>(&line) else {
                    continue;
                };
                if !orphans.contains(&d.request_id) || !seen.insert(d.request_id.clone()) {
                    continue;
                }
                let record = unanswered(d);
                cost += record.cost_usd;
                let encoded = encode(&self.config.telemetry_path, &record)?;
                lines.push_str(&encoded);
            }
        }
        if seen.is_empty() {
            return Ok(0);
        }
        append_lines_now(&self.config.telemetry_path, &lines)?;
        tracing::warn!(
            requests = seen.len(),
            cost_usd = cost,
            "recorded requests whose telemetry line was missing (a crash or a failed write): dispatched ones at their estimate"
        );
        Ok(seen.len())
    }
}

/// The request id of a telemetry line.
#[derive(Deserialize)]
struct TelemetryId {
    request_id: String,
}

/// Drop from `orphans` the requests answered in the rotated telemetry file (`<path>.1`,
/// logrotate's name): when only the telemetry log was rotated, the decisions still in the
/// current decision log have their telemetry there, not in the file the engine reads.
fn answered_in_rotated(
    telemetry: &std::path::Path,
    mut orphans: HashSet<String>,
) -> Result<HashSet<String>, StartError> {
    if orphans.is_empty() {
        return Ok(orphans);
    }
    let mut rotated = telemetry.as_os_str().to_owned();
    rotated.push(".1");
    let rotated = std::path::PathBuf::from(rotated);
    let file = match std::fs::File::open(&rotated) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(orphans),
        Err(e) => {
            return Err(StartError::Recovery(format!(
                "cannot read {}: {e}",
                rotated.display()
            )))
        }
    };
    for line in std::io::BufReader::new(file).lines() {
        let line = line
            .map_err(|e| StartError::Recovery(format!("cannot read {}: {e}", rotated.display())))?;
        if let Ok(t) = serde_json::from_str::<TelemetryId>(&line) {
            orphans.remove(&t.request_id);
        }
    }
    Ok(orphans)
}

/// The telemetry line of a request whose decision has none:
/// - written ahead of a dispatch (it carries a reservation): `unanswered` at the reservation;
/// - a denial, or a request refused before dispatch (reservation of 0), whose telemetry write
///   failed: nothing was spent (`denied` / `error`, cost 0);
/// - a decision without a reservation that is not a denial (an Envoy filter's report, or logs
///   from before write-ahead): `unanswered` at its estimate, since the upstream may have been
///   called.
fn unanswered(d: Decision) -> TelemetryRecord {
    let namespace = d.budget_namespace.unwrap_or_default();
    let (status, source, error) = match (&d.reservation, d.decision.as_str()) {
        (None, "deny") => (Status::Denied, CostSource::None, None),
        (Some(r), _) if r.cost_usd <= 0.0 => {
            (Status::Error, CostSource::None, Some("logs_unavailable"))
        }
        _ => (
            Status::Unanswered,
            CostSource::Estimate,
            Some("unanswered_before_restart"),
        ),
    };
    let r = d.reservation.unwrap_or_else(|| ReservationRecord {
        model: String::new(),
        provider: String::new(),
        cost_usd: if status == Status::Unanswered {
            d.estimated_cost_usd.max(0.0)
        } else {
            0.0
        },
        tokens_in: 0,
        tokens_out: 0,
    });
    TelemetryRecord {
        schema_version: crate::artifacts::TELEMETRY_SCHEMA_VERSION.into(),
        timestamp: d.timestamp,
        request_id: d.request_id,
        tenant_id: d.tenant_id,
        caller_id: d.caller_id,
        use_case: d.feature_id.clone(),
        audit_tags: crate::artifacts::AuditTags {
            feature_id: d.feature_id.clone(),
            experiment_id: d.experiment_id.clone(),
            budget_namespace: namespace.clone(),
        },
        feature_id: d.feature_id,
        experiment_id: d.experiment_id,
        budget_namespace: namespace,
        route: d.route_name.clone(),
        route_name: d.route_name,
        requested_model_tier: d.requested_model_tier,
        model_tier: d.effective_model_tier,
        provider: r.provider,
        model: r.model,
        tokens_in: r.tokens_in,
        tokens_out: r.tokens_out,
        tokens_total: r.tokens_in + r.tokens_out,
        estimated_cost_usd: r.cost_usd,
        cost_usd: r.cost_usd,
        cost_source: source.as_str().into(),
        latency_ms: 0.0,
        // When the crashed process would have settled it is unknown; it costs its estimate,
        // so a replay's in-flight correction for it is zero either way.
        held_ms: None,
        status: status.as_str().into(),
        finish_reason: None,
        is_fallback: false,
        fallback_reason: None,
        error_type: error.map(str::to_owned),
        policy_decision: d.decision,
        policy_id: d.policy_id,
        timed_out_cost_usd: 0.0,
        streamed: false,
        stream_cut_at_tokens: None,
        embeddings: false,
    }
}
