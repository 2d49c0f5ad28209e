//! The `alerts:` section of the gateway config: where alerts are written and which webhooks
//! they are delivered to.

use std::path::PathBuf;

use serde::Deserialize;

/// `alerts:`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub struct AlertsConfig {
    /// The alerts log (default: `alerts.jsonl` beside the telemetry log); relative paths are
    /// resolved against the config file's directory.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Where every alert is POSTed, in order, until it is accepted or too old.
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
}

/// One webhook.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Its name (in metrics and its delivery cursor's file name).
    pub name: String,
    /// `http://` or `https://` URL.
    pub url: String,
    /// `json` (the alert record) or `slack` (`{"text": ...}`, Slack's incoming webhooks).
    #[serde(default)]
    pub format: WebhookFormat,
    /// Timeout of one delivery attempt.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// An alert not delivered within this long is given up (counted as expired).
    #[serde(default = "default_max_age")]
    pub max_age_s: u64,
}

/// The body a webhook is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// The alert record as JSON.
    #[default]
    Json,
    /// `{"text": "..."}`.
    Slack,
}

fn default_timeout() -> u64 {
    5_000
}

fn default_max_age() -> u64 {
    86_400
}

/// Problems with an `alerts` section, as (field path, message).
pub fn problems(a: &AlertsConfig) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, w) in a.webhooks.iter().enumerate() {
        let named = !w.name.is_empty()
            && w.name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'));
        if !named {
            out.push((
                format!("alerts.webhooks[{i}].name"),
                "must be letters, digits, `_` or `-` (it names the delivery cursor file)".into(),
            ));
        } else if a.webhooks[..i].iter().any(|o| o.name == w.name) {
            out.push((
                format!("alerts.webhooks[{i}].name"),
                format!("`{}` is used twice", w.name),
            ));
        }
        if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
            out.push((
                format!("alerts.webhooks[{i}].url"),
                format!("`{}` is not an http:// or https:// URL", w.url),
            ));
        }
        if w.timeout_ms == 0 || w.max_age_s == 0 {
            out.push((
                format!("alerts.webhooks[{i}]"),
                "timeout_ms and max_age_s must be at least 1".into(),
            ));
        }
    }
    out
}
