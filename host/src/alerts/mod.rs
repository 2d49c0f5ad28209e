//! Alerts, once per rule × scope × window period: a rule's alert (a `budget_threshold` level
//! reached, a `cost_anomaly`) is raised the first time its text is seen for the rule's scope
//! values in the current period of its window, appended to `alerts.jsonl` and handed to the
//! webhooks ([`webhook`]), never on the request path. The same alert again in the same period
//! is not raised again (also across restarts: the log is read back at start). Rules in
//! `mode: monitor` raise alerts too.
//!
//! The period is the rule's first aggregate's window: a calendar window's hour, day or month;
//! a rolling window of W seconds cut into consecutive periods of W seconds (UTC, from the
//! epoch). A rule without aggregates alerts once per UTC day.

pub mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fs2::FileExt;
use llmscope_sdk::types::{RequestContext, Window};
use llmscope_sdk::verdict::Mode;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::ledger::Dims;
use crate::policy::{Evaluation, PolicySet};
use crate::windows::calendar_period_ms;

const TARGET: &str = "llmscope::alerts";

/// One line of `alerts.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// When it was raised (RFC 3339, UTC).
    pub timestamp: String,
    /// The alert's id: a digest of rule, scope values, period and text, the same on every
    /// replica (webhook receivers deduplicate on it).
    pub alert_id: String,
    /// The rule that raised it.
    pub rule_id: String,
    /// Its primitive.
    pub primitive: String,
    /// `enforce` or `monitor`.
    pub mode: String,
    /// The namespace evaluated.
    pub namespace: String,
    /// The rule's scope and the values it was raised for.
    pub scope: BTreeMap<String, Option<String>>,
    /// The window period it is raised once in (ms since the epoch, start inclusive, end
    /// exclusive).
    pub period_start_ms: u64,
    /// See `period_start_ms`.
    pub period_end_ms: u64,
    /// The rule's alert.
    pub message: String,
    /// The request that raised it.
    pub request_id: String,
    /// Its tenant.
    pub tenant_id: String,
}

impl AlertRecord {
    /// What makes two alerts the same one: rule, scope values, period, text.
    fn dedupe_key(&self) -> String {
        format!(
            "{}\u{1f}{}\u{1f}{}\u{1f}{}",
            self.rule_id,
            serde_json::to_string(&self.scope).unwrap_or_default(),
            self.period_start_ms,
            self.message
        )
    }
}

/// Alerts of one gateway.
pub struct Alerts {
    path: PathBuf,
    /// Dedupe key → end of its period (dropped after).
    seen: Mutex<HashMap<String, u64>>,
    raised: AtomicU64,
    /// Wakes the webhook deliverers.
    pub(crate) wake: Arc<tokio::sync::Notify>,
    webhooks: Vec<Arc<webhook::Webhook>>,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Alerts {
    /// Alerts written to `path`, delivered to `webhooks`; the alerts already in `path` whose
    /// period has not ended are remembered, so they are not raised again.
    pub fn open(
        path: &Path,
        webhooks: &[llmscope_wire::alerts::WebhookConfig],
        now_ms: u64,
    ) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut seen = HashMap::new();
        match std::fs::read(path) {
            Ok(bytes) => {
                // Line by line: a torn line (a crash mid-write) is skipped, never fatal.
                for line in bytes.split(|b| *b == b'\n') {
                    if let Ok(r) = serde_json::from_slice::<AlertRecord>(line) {
                        if r.period_end_ms > now_ms {
                            seen.insert(r.dedupe_key(), r.period_end_ms);
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let wake = Arc::new(tokio::sync::Notify::new());
        Ok(Self {
            path: path.to_owned(),
            seen: Mutex::new(seen),
            raised: AtomicU64::new(0),
            webhooks: webhooks
                .iter()
                .map(|w| Arc::new(webhook::Webhook::new(w, path)))
                .collect(),
            wake,
        })
    }

    /// Start delivering to the webhooks.
    pub fn spawn(&self) {
        for w in &self.webhooks {
            let w = Arc::clone(w);
            let wake = Arc::clone(&self.wake);
            tokio::spawn(async move { w.run(wake).await });
        }
    }

    /// Raise the alerts of `evaluation` (of `ctx`, evaluated with `policies`) not yet raised
    /// in their period; returns how many were new.
    pub fn raise(
        &self,
        policies: &PolicySet,
        ctx: &RequestContext,
        evaluation: &Evaluation,
    ) -> usize {
        let mut new = Vec::new();
        for outcome in evaluation.rules.iter().filter(|o| o.alert.is_some()) {
            let Some(rule) = policies.rules().find(|r| r.id() == outcome.rule_id) else {
                continue;
            };
            let (scope, window) = rule
                .aggregates()
                .first()
                .map_or((Vec::new(), None), |a| (a.scope.clone(), Some(a.window)));
            let dims = Dims::of(ctx);
            let (period_start_ms, period_end_ms) = period(window, ctx.unix_time_ms);
            let record = AlertRecord {
                timestamp: llmscope_wire::records::write::rfc3339(ctx.unix_time_ms),
                alert_id: String::new(),
                rule_id: outcome.rule_id.clone(),
                primitive: outcome.primitive.clone(),
                mode: match outcome.mode {
                    Mode::Enforce => "enforce",
                    Mode::Monitor => "monitor",
                }
                .into(),
                namespace: evaluation.namespace.clone().unwrap_or_default(),
                scope: scope
                    .iter()
                    .map(|s| {
                        (
                            crate::gateway::budgets::scope_name(*s).to_owned(),
                            dims.value(*s),
                        )
                    })
                    .collect(),
                period_start_ms,
                period_end_ms,
                message: outcome.alert.clone().unwrap_or_default(),
                request_id: ctx.request_id.clone(),
                tenant_id: ctx.tenant_id.clone(),
            };
            let key = record.dedupe_key();
            // The same alert gets the same id on every replica and after every restart, so a
            // receiver can drop repeats.
            let mut record = record;
            record.alert_id = hex::encode(&sha2::Sha256::digest(key.as_bytes())[..16]);
            let mut seen = self.seen.lock();
            if seen.contains_key(&key) {
                continue;
            }
            seen.retain(|_, end| *end > ctx.unix_time_ms);
            seen.insert(key, period_end_ms);
            new.push(record);
        }
        if new.is_empty() {
            return 0;
        }
        if let Err(e) = self.append(&new) {
            tracing::error!(target: TARGET, path = %self.path.display(), error = %e, "alerts could not be written; they are in the decision lines only");
            // Raise them again next time rather than lose them.
            let mut seen = self.seen.lock();
            for r in &new {
                seen.remove(&r.dedupe_key());
            }
            return 0;
        }
        for r in &new {
            tracing::warn!(target: TARGET, rule = %r.rule_id, message = %r.message, "alert");
        }
        self.raised.fetch_add(new.len() as u64, Ordering::Relaxed);
        self.wake.notify_waiters();
        new.len()
    }

    /// Append `records` as whole lines under an exclusive lock.
    fn append(&self, records: &[AlertRecord]) -> std::io::Result<()> {
        let mut text = String::new();
        for r in records {
            text.push_str(&serde_json::to_string(r).map_err(std::io::Error::other)?);
            text.push('\n');
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.path)?;
        f.lock_exclusive()?;
        // After a torn write the file does not end in a newline: start on a line of our own.
        let len = f.metadata()?.len();
        if len > 0 {
            use std::io::{Read as _, Seek as _};
            let mut last = [0u8; 1];
            f.seek(std::io::SeekFrom::Start(len - 1))?;
            f.read_exact(&mut last)?;
            if last[0] != b'\n' {
                text.insert(0, '\n');
            }
        }
        let written = f.write_all(text.as_bytes()).and_then(|()| f.flush());
        let _ = FileExt::unlock(&f);
        written
    }

    /// `llmscope_alerts_raised_total`, and per webhook and outcome
    /// `llmscope_alert_deliveries_total` (when webhooks are configured).
    pub fn families(&self) -> Vec<crate::metrics::Family> {
        use crate::metrics::{Family, Kind};
        let mut out = vec![Family::one(
            "llmscope_alerts_raised_total",
            Kind::Counter,
            "Alerts raised (once per rule, scope and window period).",
            self.raised.load(Ordering::Relaxed) as f64,
        )];
        if !self.webhooks.is_empty() {
            let mut f = Family::new(
                "llmscope_alert_deliveries_total",
                Kind::Counter,
                "Alert deliveries by webhook and outcome (delivered, failed attempt, expired undelivered).",
            );
            for w in &self.webhooks {
                for (outcome, n) in w.counts() {
                    f.push(
                        vec![
                            ("webhook", w.name().to_owned()),
                            ("outcome", outcome.to_owned()),
                        ],
                        n as f64,
                    );
                }
            }
            out.push(f);
        }
        out
    }
}

/// The period of `window` holding `at_ms`: `[start, end)` — a calendar window's own period,
/// consecutive periods of a rolling window's length, a UTC day without a window.
fn period(window: Option<Window>, at_ms: u64) -> (u64, u64) {
    match window {
        Some(Window::RollingSeconds(s)) => {
            let len = s.max(1) * 1000;
            let start = at_ms - at_ms % len;
            (start, start + len)
        }
        cal => {
            calendar_period_ms(cal.unwrap_or(Window::CalendarDay), at_ms).unwrap_or((at_ms, at_ms))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_follow_the_window() {
        // 2025-12-02 02:50 UTC.
        let t = 1_764_643_800_000;
        assert_eq!(
            period(Some(Window::CalendarHour), t),
            (1_764_640_800_000, 1_764_644_400_000)
        );
        let (s, e) = period(Some(Window::RollingSeconds(3600)), t);
        assert_eq!((s % 3_600_000, e - s), (0, 3_600_000));
        assert!(s <= t && t < e);
        let (s, e) = period(Some(Window::CalendarMonth), t);
        assert_eq!((s, e), (1_764_547_200_000, 1_767_225_600_000));
        assert_eq!(period(None, t).1 - period(None, t).0, 86_400_000);
    }
}
