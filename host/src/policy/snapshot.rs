//! Where a rule's aggregate values come from. The gateway computes them from live spend; the
//! CLI and tests supply them directly.

use std::collections::BTreeMap;
use std::path::Path;

use llmscope_sdk::types::{AggregateValue, RequestContext, Snapshot};
use serde::Deserialize;

use super::Rule;

/// Supplies the values of a rule's declared aggregates for one request.
pub trait SnapshotSource {
    /// One entry per aggregate the rule declared, in declaration order.
    fn snapshot(&self, rule: &Rule, request: &RequestContext) -> Snapshot;

    /// Why `rule` cannot be given a snapshot now (the store of its sums is unreachable and
    /// the rule fails closed); the rule then fails with it, as if it had failed. `None` by
    /// default.
    fn unavailable(&self, rule: &Rule) -> Option<String> {
        let _ = rule;
        None
    }
}

/// No data: every declared aggregate has no value and no samples.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSnapshots;

impl SnapshotSource for NoSnapshots {
    fn snapshot(&self, rule: &Rule, request: &RequestContext) -> Snapshot {
        Snapshot {
            taken_at_unix_ms: request.unix_time_ms,
            values: rule
                .aggregates()
                .iter()
                .map(|a| AggregateValue {
                    key: a.key.clone(),
                    value: None,
                    samples: 0,
                })
                .collect(),
        }
    }
}

/// Fixed values per rule id and aggregate key, e.g. read from a JSON file:
///
/// ```json
/// {"taken_at_unix_ms": 1764000000000,
///  "rules": {"demo-hourly-cap": {"window_cost_usd": {"value": 0.95, "samples": 12}}}}
/// ```
///
/// Aggregates not listed have no value and no samples.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticSnapshots {
    /// Reported as the snapshot time (defaults to the request time).
    #[serde(default)]
    pub taken_at_unix_ms: Option<u64>,
    /// Values by rule id, then aggregate key.
    #[serde(default)]
    pub rules: BTreeMap<String, BTreeMap<String, StaticValue>>,
}

/// One supplied aggregate value.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticValue {
    /// The value (`null`: no samples in the window).
    pub value: Option<f64>,
    /// Contributing samples.
    #[serde(default)]
    pub samples: u64,
}

impl StaticSnapshots {
    /// Read from a JSON file, naming the file and field path on error.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read snapshot file {}: {e}", path.display()))?;
        let mut de = serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(&mut de).map_err(|e| {
            anyhow::anyhow!(
                "snapshot file {}: at {}: {}",
                path.display(),
                e.path(),
                e.inner()
            )
        })
    }
}

impl SnapshotSource for StaticSnapshots {
    fn snapshot(&self, rule: &Rule, request: &RequestContext) -> Snapshot {
        let supplied = self.rules.get(rule.id());
        Snapshot {
            taken_at_unix_ms: self.taken_at_unix_ms.unwrap_or(request.unix_time_ms),
            values: rule
                .aggregates()
                .iter()
                .map(|a| {
                    let v = supplied
                        .and_then(|m| m.get(&a.key))
                        .copied()
                        .unwrap_or_default();
                    AggregateValue {
                        key: a.key.clone(),
                        value: v.value,
                        samples: v.samples,
                    }
                })
                .collect(),
        }
    }
}
