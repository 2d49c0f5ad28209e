//! Delivering alerts to a webhook: `alerts.jsonl` is the queue, read from a cursor (the byte
//! offset delivered through, in `<alerts.jsonl>.<name>.cursor`, rewritten after each accepted
//! alert), so an alert is POSTed until the webhook accepts it (a 2xx) or it is older than
//! `max_age_s`, in order, across restarts. A webhook that is down delays its own deliveries
//! only (retries back off from 0.5 s to 60 s); nothing waits for it on the request path.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llmscope_wire::alerts::{WebhookConfig, WebhookFormat};

use super::AlertRecord;

const TARGET: &str = "llmscope::alerts";

/// One webhook and its delivery state.
pub struct Webhook {
    cfg: WebhookConfig,
    alerts: PathBuf,
    cursor: PathBuf,
    client: reqwest::Client,
    delivered: AtomicU64,
    failed: AtomicU64,
    expired: AtomicU64,
    rejected: AtomicU64,
}

impl Webhook {
    /// The webhook `cfg`, fed from the alerts log `alerts`.
    pub fn new(cfg: &WebhookConfig, alerts: &Path) -> Self {
        let mut cursor = alerts.as_os_str().to_owned();
        cursor.push(format!(".{}.cursor", cfg.name));
        Self {
            cfg: cfg.clone(),
            alerts: alerts.to_owned(),
            cursor: PathBuf::from(cursor),
            client: reqwest::Client::builder()
                .timeout(Duration::from_millis(cfg.timeout_ms))
                .build()
                .unwrap_or_default(),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// (outcome, count) for metrics.
    pub fn counts(&self) -> [(&'static str, u64); 4] {
        [
            ("delivered", self.delivered.load(Ordering::Relaxed)),
            ("failed", self.failed.load(Ordering::Relaxed)),
            ("expired", self.expired.load(Ordering::Relaxed)),
            ("rejected", self.rejected.load(Ordering::Relaxed)),
        ]
    }

    /// Deliver forever: whatever is past the cursor, then wait for `wake` (or a second).
    pub async fn run(self: Arc<Self>, wake: Arc<tokio::sync::Notify>) {
        loop {
            let notified = wake.notified();
            self.deliver_pending().await;
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
    }

    fn read_cursor(&self) -> u64 {
        std::fs::read_to_string(&self.cursor)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn write_cursor(&self, offset: u64) {
        let tmp = self.cursor.with_extension("cursor.tmp");
        let ok = std::fs::write(&tmp, offset.to_string())
            .and_then(|()| std::fs::rename(&tmp, &self.cursor));
        if let Err(e) = ok {
            tracing::error!(target: TARGET, webhook = %self.cfg.name, path = %self.cursor.display(), error = %e, "delivery cursor not saved: alerts may be delivered again after a restart");
        }
    }

    /// Deliver every whole line after the cursor, in order.
    async fn deliver_pending(&self) {
        let Ok(bytes) = std::fs::read(&self.alerts) else {
            return;
        };
        let mut offset = self.read_cursor();
        if offset > bytes.len() as u64 {
            // The log was replaced (rotated by hand): start over on the new one.
            offset = 0;
        }
        while let Some(len) = bytes[offset as usize..].iter().position(|b| *b == b'\n') {
            let line = &bytes[offset as usize..offset as usize + len];
            let next = offset + len as u64 + 1;
            match serde_json::from_slice::<AlertRecord>(line) {
                Ok(record) => {
                    if !self.deliver(&record).await {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(target: TARGET, webhook = %self.cfg.name, offset, error = %e, "skipping a malformed line of the alerts log");
                }
            }
            offset = next;
            self.write_cursor(offset);
        }
    }

    /// POST `record` until it is accepted or too old (counted as expired), backing off
    /// between attempts; true once it is done with.
    async fn deliver(&self, record: &AlertRecord) -> bool {
        let mut delay = Duration::from_millis(500);
        loop {
            let age_ms = crate::gateway::now_ms().saturating_sub(raised_ms(record));
            if age_ms > self.cfg.max_age_s * 1000 {
                self.expired.fetch_add(1, Ordering::Relaxed);
                tracing::error!(target: TARGET, webhook = %self.cfg.name, alert_id = %record.alert_id, "alert not delivered within max_age_s: given up");
                return true;
            }
            let body = match self.cfg.format {
                WebhookFormat::Json => serde_json::to_value(record).unwrap_or_default(),
                WebhookFormat::Slack => serde_json::json!({"text": slack_text(record)}),
            };
            match self.client.post(&self.cfg.url).json(&body).send().await {
                Ok(r) if r.status().is_success() => {
                    self.delivered.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                // Refused for good (a 4xx other than timeout and rate limit): retrying the
                // same body cannot help; the next alerts go on.
                Ok(r)
                    if r.status().is_client_error()
                        && !matches!(r.status().as_u16(), 408 | 429) =>
                {
                    self.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(target: TARGET, webhook = %self.cfg.name, alert_id = %record.alert_id, status = r.status().as_u16(), "webhook refused the alert: given up");
                    return true;
                }
                outcome => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    let why = match outcome {
                        Ok(r) => format!("HTTP {}", r.status().as_u16()),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(target: TARGET, webhook = %self.cfg.name, alert_id = %record.alert_id, error = %why, retry_in_ms = delay.as_millis() as u64, "alert delivery failed");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(60));
        }
    }
}

/// `s` safe in a Slack message: `&`, `<`, `>` escaped (no mentions or links from a client's
/// attribution values), at most 200 characters.
fn slack_safe(s: &str) -> String {
    s.chars()
        .take(200)
        .map(|c| match c {
            '&' => "&amp;".to_owned(),
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

/// The text of a Slack message for `r`.
fn slack_text(r: &AlertRecord) -> String {
    let scope: Vec<String> = r
        .scope
        .iter()
        .map(|(k, v)| format!("{k}={}", slack_safe(v.as_deref().unwrap_or("-"))))
        .collect();
    format!(
        ":warning: llmscope: {} (rule `{}`, namespace `{}`{})",
        slack_safe(&r.message),
        slack_safe(&r.rule_id),
        slack_safe(&r.namespace),
        if scope.is_empty() {
            String::new()
        } else {
            format!(", {}", scope.join(", "))
        }
    )
}

/// When `r` was raised, from its timestamp (now when unreadable: never expired by mistake).
fn raised_ms(r: &AlertRecord) -> u64 {
    time::OffsetDateTime::parse(&r.timestamp, &time::format_description::well_known::Rfc3339)
        .map_or_else(
            |_| crate::gateway::now_ms(),
            |t| (t.unix_timestamp_nanos() / 1_000_000) as u64,
        )
}

#[cfg(test)]
mod tests {
    #[test]
    fn slack_text_cannot_mention_or_link() {
        assert_eq!(
            super::slack_safe("<!channel> <https://evil|x> & co"),
            "&lt;!channel&gt; &lt;https://evil|x&gt; &amp; co"
        );
    }
}
