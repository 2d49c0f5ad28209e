//! `cost_anomaly`: alert when a request's estimated cost is far above its feature's baseline.
//!
//! The rule declares `baseline_avg_cost_usd`, the average actual cost per request of the request's
//! feature over the last `baseline_window_hours`. When the estimate exceeds
//! `baseline × threshold_multiplier` the rule raises an alert. It never blocks: the decision is
//! always allow. Fewer than `min_samples` baseline requests (default 1) means no baseline, so no
//! alert.
//!
//! ```yaml
//! - id: demo-cost-anomaly
//!   primitive: cost_anomaly
//!   feature_id: "summarize"     # optional; absent = every feature, each against its own baseline
//!   baseline_window_hours: 24
//!   threshold_multiplier: 3.0
//!   action: alert               # the only action
//! ```

use llmscope_sdk::prelude::*;
use serde::Deserialize;

/// The `cost_anomaly` primitive.
pub struct CostAnomaly;

/// What the rule does on an anomaly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Record an alert; never block.
    #[default]
    Alert,
}

/// Settings of a `cost_anomaly` rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Feature the rule watches; `None` watches every feature.
    #[serde(default)]
    pub feature_id: Option<String>,
    /// Length of the baseline window, in hours.
    pub baseline_window_hours: f64,
    /// How many times the baseline a request may cost before it is anomalous.
    pub threshold_multiplier: f64,
    /// Only `alert`.
    #[serde(default)]
    pub action: Action,
    /// Baseline requests needed before the rule judges anything (default 1).
    #[serde(default = "default_min_samples")]
    pub min_samples: u64,
}

fn default_min_samples() -> u64 {
    1
}

/// Key of the declared aggregate.
pub const BASELINE: &str = "baseline_avg_cost_usd";

/// Longest accepted baseline window: one year.
const MAX_BASELINE_HOURS: f64 = 24.0 * 366.0;

impl Policy for CostAnomaly {
    type Settings = Settings;
    const NAME: &'static str = "cost_anomaly";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Alerts (never blocks) when a request's estimate exceeds its feature's baseline by a multiplier";

    fn configure(s: &Settings) -> Result<Vec<Aggregate>, String> {
        if !(s.baseline_window_hours > 0.0 && s.baseline_window_hours <= MAX_BASELINE_HOURS) {
            return Err(format!(
                "baseline_window_hours: must be between 0 and {MAX_BASELINE_HOURS} hours, got {}",
                s.baseline_window_hours
            ));
        }
        if !(s.threshold_multiplier.is_finite() && s.threshold_multiplier > 0.0) {
            return Err(format!(
                "threshold_multiplier: must be a positive number such as 3.0, got {}",
                s.threshold_multiplier
            ));
        }
        if s.feature_id.as_deref().is_some_and(|f| f.trim().is_empty()) {
            return Err("feature_id: must be non-empty; omit it to watch every feature".into());
        }
        Ok(vec![Aggregate {
            key: BASELINE.into(),
            metric: Metric::CostUsd,
            aggregation: Aggregation::Avg,
            window: Window::RollingSeconds((s.baseline_window_hours * 3600.0).round() as u64),
            scope: vec![Scope::Feature],
            include_in_flight: false,
        }])
    }

    fn evaluate(s: &Settings, req: &RequestContext, snap: &Snapshot) -> Result<Verdict, String> {
        if s.feature_id.is_some() && s.feature_id != req.feature_id {
            return Ok(Verdict::allow());
        }
        let samples = snap.samples(BASELINE);
        let Some(baseline) = snap.value(BASELINE).filter(|_| samples >= s.min_samples) else {
            return Ok(Verdict::allow().with_fact("baseline_samples", samples as f64));
        };
        let threshold = baseline * s.threshold_multiplier;
        let mut verdict = Verdict::allow()
            .with_fact("baseline_cost_usd", baseline)
            .with_fact("threshold_cost_usd", threshold)
            .with_fact("baseline_samples", samples as f64);
        if req.estimated_cost_usd > threshold {
            let ratio = if baseline > 0.0 {
                req.estimated_cost_usd / baseline
            } else {
                f64::INFINITY
            };
            // The same words for every anomalous request of the feature (the numbers are
            // facts), so the host delivers the alert once per feature and period.
            verdict = verdict.with_fact("ratio", ratio).with_alert(format!(
                "cost anomaly: estimates above {}x the {}h average cost of feature {}",
                s.threshold_multiplier,
                s.baseline_window_hours,
                req.feature_id.as_deref().unwrap_or("<none>"),
            ));
        }
        Ok(verdict)
    }
}

export_policy!(CostAnomaly);

#[cfg(test)]
mod tests {
    use super::*;
    use llmscope_sdk::testing::{request, snapshot, Harness};
    use serde_json::json;

    fn seed_rule() -> Harness<CostAnomaly> {
        Harness::new(json!({
            "feature_id": "summarize", "baseline_window_hours": 24,
            "threshold_multiplier": 3.0, "action": "alert"
        }))
        .unwrap()
    }

    #[test]
    fn declares_feature_scoped_average_over_the_window() {
        let rule = seed_rule();
        let agg = &rule.aggregates()[0];
        assert_eq!(agg.window, Window::RollingSeconds(86_400));
        assert_eq!(agg.aggregation, Aggregation::Avg);
        assert_eq!(agg.scope, vec![Scope::Feature]);
        assert!(!agg.include_in_flight);
    }

    #[test]
    fn alerts_above_threshold_but_never_blocks() {
        let mut req = request();
        req.estimated_cost_usd = 0.031;
        let v = seed_rule()
            .evaluate(&req, &snapshot(&[(BASELINE, Some(0.01), 50)]))
            .unwrap();
        assert_eq!(v.decision, Decision::Allow);
        assert!(v
            .alert
            .as_deref()
            .unwrap()
            .contains("above 3x the 24h average"));
        assert!((v.fact("ratio").unwrap() - 3.1).abs() < 1e-9);
        assert_eq!(v.fact("threshold_cost_usd"), Some(0.03));
        // Another anomalous estimate of the feature: the same words.
        req.estimated_cost_usd = 0.5;
        let again = seed_rule()
            .evaluate(&req, &snapshot(&[(BASELINE, Some(0.01), 50)]))
            .unwrap();
        assert_eq!(again.alert, v.alert);
    }

    #[test]
    fn exactly_at_threshold_is_not_an_anomaly() {
        let mut req = request();
        req.estimated_cost_usd = 0.75;
        let v = seed_rule()
            .evaluate(&req, &snapshot(&[(BASELINE, Some(0.25), 5)]))
            .unwrap();
        assert_eq!(v.alert, None);
    }

    #[test]
    fn no_baseline_samples_no_alert() {
        let mut req = request();
        req.estimated_cost_usd = 100.0;
        let v = seed_rule()
            .evaluate(&req, &snapshot(&[(BASELINE, None, 0)]))
            .unwrap();
        assert_eq!((v.decision, v.alert), (Decision::Allow, None));
        let strict = Harness::<CostAnomaly>::new(json!({
            "baseline_window_hours": 1, "threshold_multiplier": 2, "min_samples": 10
        }))
        .unwrap();
        let v = strict
            .evaluate(&req, &snapshot(&[(BASELINE, Some(0.001), 9)]))
            .unwrap();
        assert_eq!(v.alert, None);
    }

    #[test]
    fn other_features_are_ignored_unless_unfiltered() {
        let mut req = request();
        req.feature_id = Some("chat".into());
        req.estimated_cost_usd = 1.0;
        let snap = snapshot(&[(BASELINE, Some(0.01), 5)]);
        assert_eq!(seed_rule().evaluate(&req, &snap).unwrap().alert, None);
        let every = Harness::<CostAnomaly>::new(
            json!({"baseline_window_hours": 1, "threshold_multiplier": 2}),
        )
        .unwrap();
        assert!(every.evaluate(&req, &snap).unwrap().alert.is_some());
    }

    #[test]
    fn rejects_bad_settings() {
        let err = |v| Harness::<CostAnomaly>::new(v).err().unwrap();
        assert!(
            err(json!({"baseline_window_hours": 0, "threshold_multiplier": 3}))
                .starts_with("baseline_window_hours:")
        );
        assert!(
            err(json!({"baseline_window_hours": 1, "threshold_multiplier": -3}))
                .starts_with("threshold_multiplier:")
        );
        assert!(err(
            json!({"baseline_window_hours": 1, "threshold_multiplier": 3, "action": "deny"})
        )
        .starts_with("settings.action:"));
        assert!(err(
            json!({"baseline_window_hours": 1, "threshold_multiplier": 3, "feature_id": ""})
        )
        .starts_with("feature_id:"));
    }
}
