//! `budget_threshold`: cap spend per budget namespace (or any other scope) over an hour, a day or a
//! month.
//!
//! The rule declares one aggregate, `window_cost_usd`: the sum of actual cost in the window for
//! this request's scope, including what other in-flight requests have reserved. The request is
//! over budget when `window_cost_usd + estimated_cost_usd > limit_usd`; exactly reaching the limit
//! is allowed. Over budget, `action: deny` refuses the request and `action: downgrade` sends it to
//! `downgrade_to_tier` (default `cheap`).
//!
//! ```yaml
//! - id: demo-hourly-cap
//!   primitive: budget_threshold
//!   period: hourly            # hourly | daily | monthly
//!   window: rolling           # rolling (default: last 1 h / 24 h / 30 d) | calendar (UTC)
//!   limit_usd: 1.00
//!   action: deny              # deny (default) | downgrade
//!   deny_reason: "Hourly budget exceeded for demo namespace"
//!   scope: [budget_namespace] # default; e.g. [budget_namespace, tenant] for per-tenant caps
//!   alert_at: [0.5, 0.8, 1.0] # optional: alert when spend reaches these fractions of the limit
//! ```
//!
//! With `alert_at`, a request that brings the window's spend (what it holds, plus this request
//! when it is let through) to or past a level carries the alert `<period> budget <pct>% used
//! (limit $<limit>)` for the highest level reached; a request refused for the budget reaches
//! 100%. The text is the same for every request past a level, so the host delivers it once per
//! rule, scope and window period.

use llmscope_sdk::prelude::*;
use serde::Deserialize;

/// The `budget_threshold` primitive.
pub struct BudgetThreshold;

/// Length of the budget window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// One hour.
    Hourly,
    /// One day.
    Daily,
    /// One month (30 days when rolling).
    Monthly,
}

/// Whether the window trails the request or follows the UTC calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    /// The last hour / 24 hours / 30 days.
    #[default]
    Rolling,
    /// The current UTC hour / day / month.
    Calendar,
}

/// What happens over budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Refuse the request (HTTP 402).
    #[default]
    Deny,
    /// Dispatch it at a cheaper tier.
    Downgrade,
}

/// Settings of a `budget_threshold` rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Window length.
    pub period: Period,
    /// Rolling or calendar window.
    #[serde(default)]
    pub window: WindowKind,
    /// Budget for the window, in US dollars.
    pub limit_usd: f64,
    /// What to do over budget.
    #[serde(default)]
    pub action: Action,
    /// Tier to downgrade to (only with `action: downgrade`; default `cheap`).
    #[serde(default)]
    pub downgrade_to_tier: Option<String>,
    /// Reason returned to the client on deny (only with `action: deny`).
    #[serde(default)]
    pub deny_reason: Option<String>,
    /// Dimensions the budget is kept per (default: the budget namespace).
    #[serde(default = "default_scope")]
    pub scope: Vec<Scope>,
    /// Fractions of the limit to alert at (e.g. `[0.5, 0.8, 1.0]`), ascending.
    #[serde(default)]
    pub alert_at: Vec<f64>,
}

fn default_scope() -> Vec<Scope> {
    vec![Scope::BudgetNamespace]
}

/// Key of the declared aggregate.
pub const WINDOW_COST: &str = "window_cost_usd";

impl Settings {
    fn window(&self) -> Window {
        match (self.window, self.period) {
            (WindowKind::Rolling, Period::Hourly) => Window::RollingSeconds(3_600),
            (WindowKind::Rolling, Period::Daily) => Window::RollingSeconds(86_400),
            (WindowKind::Rolling, Period::Monthly) => Window::RollingSeconds(30 * 86_400),
            (WindowKind::Calendar, Period::Hourly) => Window::CalendarHour,
            (WindowKind::Calendar, Period::Daily) => Window::CalendarDay,
            (WindowKind::Calendar, Period::Monthly) => Window::CalendarMonth,
        }
    }

    fn period_name(&self) -> &'static str {
        match self.period {
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Monthly => "monthly",
        }
    }

    /// The alert for the highest `alert_at` level `spend` reaches, if any.
    fn level_reached(&self, spend: f64) -> Option<String> {
        let level = self
            .alert_at
            .iter()
            .rev()
            .find(|l| spend >= **l * self.limit_usd && self.limit_usd > 0.0)?;
        Some(format!(
            "{} budget {}% used (limit ${:.4})",
            self.period_name(),
            (level * 100.0).round(),
            self.limit_usd
        ))
    }

    fn downgrade_tier(&self) -> &str {
        self.downgrade_to_tier.as_deref().unwrap_or("cheap")
    }
}

impl Policy for BudgetThreshold {
    type Settings = Settings;
    const NAME: &'static str = "budget_threshold";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Caps spend per budget namespace over an hourly, daily or monthly window (deny or downgrade)";

    fn configure(s: &Settings) -> Result<Vec<Aggregate>, String> {
        if !s.limit_usd.is_finite() || s.limit_usd < 0.0 {
            return Err(format!(
                "limit_usd: must be a non-negative number of US dollars, got {}",
                s.limit_usd
            ));
        }
        match s.action {
            Action::Deny if s.downgrade_to_tier.is_some() => {
                return Err(
                    "downgrade_to_tier: only used with `action: downgrade`; remove it or \
                            set action to downgrade"
                        .into(),
                );
            }
            Action::Downgrade if s.deny_reason.is_some() => {
                return Err(
                    "deny_reason: only used with `action: deny`; remove it or set action \
                            to deny"
                        .into(),
                );
            }
            _ => {}
        }
        if s.downgrade_to_tier
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err("downgrade_to_tier: must name a tier, e.g. `cheap`".into());
        }
        for (i, scope) in s.scope.iter().enumerate() {
            if s.scope[..i].contains(scope) {
                return Err(format!("scope[{i}]: {scope:?} is listed twice"));
            }
        }
        for (i, level) in s.alert_at.iter().enumerate() {
            if !level.is_finite() || *level <= 0.0 || *level > 10.0 {
                return Err(format!(
                    "alert_at[{i}]: must be a fraction of the limit above 0 (1.0 = 100%), got {level}"
                ));
            }
            if i > 0 && *level <= s.alert_at[i - 1] {
                return Err(format!(
                    "alert_at[{i}]: levels must ascend, {level} follows {}",
                    s.alert_at[i - 1]
                ));
            }
        }
        Ok(vec![Aggregate {
            key: WINDOW_COST.into(),
            metric: Metric::CostUsd,
            aggregation: Aggregation::Sum,
            window: s.window(),
            scope: s.scope.clone(),
            include_in_flight: true,
        }])
    }

    fn evaluate(s: &Settings, req: &RequestContext, snap: &Snapshot) -> Result<Verdict, String> {
        let spent = snap.value(WINDOW_COST).unwrap_or(0.0);
        let projected = spent + req.estimated_cost_usd;
        let facts = |v: Verdict| {
            v.with_fact("window_cost_usd", spent)
                .with_fact("window_limit_usd", s.limit_usd)
                .with_fact("projected_cost_usd", projected)
        };
        if projected <= s.limit_usd {
            let verdict = facts(Verdict::allow());
            return Ok(match s.level_reached(projected) {
                Some(alert) => verdict.with_alert(alert),
                None => verdict,
            });
        }
        // Over budget: the request is refused or moved, so the window holds `spent`; the
        // budget itself is used up.
        let used = s.level_reached(spent.max(s.limit_usd));
        let over = format!(
            "{} budget ${:.4} exceeded: ${:.6} spent + ${:.6} this request",
            s.period_name(),
            s.limit_usd,
            spent,
            req.estimated_cost_usd
        );
        let verdict = match s.action {
            Action::Deny => Verdict::deny(s.deny_reason.clone().unwrap_or(over)),
            Action::Downgrade => {
                let tier = s.downgrade_tier();
                if req.requested_tier == tier {
                    Verdict::allow()
                        .with_reason(format!("{over}; already at tier `{tier}`"))
                        .with_alert(format!("{over} at the downgrade tier `{tier}`"))
                } else if !req.tiers.is_empty() && req.tier(tier).is_none() {
                    Verdict::allow().with_alert(format!(
                        "{over}, but route {} has no tier `{tier}` to downgrade to",
                        req.route_name
                    ))
                } else {
                    Verdict::downgrade(tier, over)
                }
            }
        };
        // A verdict that already alerts (no tier to move to) keeps its own alert.
        Ok(facts(match used {
            Some(alert) if verdict.alert.is_none() => verdict.with_alert(alert),
            _ => verdict,
        }))
    }
}

export_policy!(BudgetThreshold);

#[cfg(test)]
mod tests {
    use super::*;
    use llmscope_sdk::testing::{request, snapshot, Harness};
    use serde_json::json;

    fn deny_rule() -> Harness<BudgetThreshold> {
        Harness::new(json!({
            "period": "hourly", "limit_usd": 1.0, "action": "deny",
            "deny_reason": "Hourly budget exceeded for demo namespace"
        }))
        .unwrap()
    }

    #[test]
    fn declares_one_rolling_sum_with_in_flight() {
        let h = deny_rule();
        assert_eq!(
            h.aggregates(),
            &[Aggregate {
                key: WINDOW_COST.into(),
                metric: Metric::CostUsd,
                aggregation: Aggregation::Sum,
                window: Window::RollingSeconds(3600),
                scope: vec![Scope::BudgetNamespace],
                include_in_flight: true,
            }]
        );
        let cal = Harness::<BudgetThreshold>::new(
            json!({"period": "monthly", "window": "calendar", "limit_usd": 5, "scope": ["tenant"]}),
        )
        .unwrap();
        assert_eq!(cal.aggregates()[0].window, Window::CalendarMonth);
        assert_eq!(cal.aggregates()[0].scope, vec![Scope::Tenant]);
    }

    #[test]
    fn alerts_name_the_highest_level_reached_in_the_same_words_every_time() {
        let h = Harness::<BudgetThreshold>::new(
            json!({"period": "hourly", "limit_usd": 1.0, "alert_at": [0.5, 0.8, 1.0]}),
        )
        .unwrap();
        let mut req = request();
        req.estimated_cost_usd = 0.1;
        let alert = |spent: f64| {
            h.evaluate(&req, &snapshot(&[(WINDOW_COST, Some(spent), 1)]))
                .unwrap()
                .alert
        };
        assert_eq!(alert(0.3), None);
        assert_eq!(
            alert(0.4).as_deref(),
            Some("hourly budget 50% used (limit $1.0000)")
        );
        assert_eq!(alert(0.45), alert(0.4), "the same text past a level");
        assert_eq!(
            alert(0.75).as_deref(),
            Some("hourly budget 80% used (limit $1.0000)")
        );
        // Refused: the budget is used up, whatever this request would have added.
        let refused = h
            .evaluate(&req, &snapshot(&[(WINDOW_COST, Some(0.95), 1)]))
            .unwrap();
        assert_eq!(refused.decision, Decision::Deny);
        assert_eq!(
            refused.alert.as_deref(),
            Some("hourly budget 100% used (limit $1.0000)")
        );
        for bad in [json!([0.8, 0.5]), json!([0]), json!([11])] {
            let e = Harness::<BudgetThreshold>::new(
                json!({"period": "hourly", "limit_usd": 1.0, "alert_at": bad}),
            )
            .err()
            .unwrap();
            assert!(e.contains("alert_at["), "{e}");
        }
    }

    #[test]
    fn allows_under_budget_and_reports_facts() {
        let v = deny_rule()
            .evaluate(&request(), &snapshot(&[(WINDOW_COST, Some(0.5), 10)]))
            .unwrap();
        assert_eq!(v.decision, Decision::Allow);
        assert_eq!(v.fact("window_cost_usd"), Some(0.5));
        assert_eq!(v.fact("window_limit_usd"), Some(1.0));
    }

    #[test]
    fn denies_when_estimate_would_cross_the_limit() {
        let mut req = request();
        req.estimated_cost_usd = 0.2;
        let v = deny_rule()
            .evaluate(&req, &snapshot(&[(WINDOW_COST, Some(0.9), 10)]))
            .unwrap();
        assert_eq!(v.decision, Decision::Deny);
        assert_eq!(
            v.reason.as_deref(),
            Some("Hourly budget exceeded for demo namespace")
        );
    }

    #[test]
    fn exactly_at_the_limit_is_allowed_one_cent_over_is_not() {
        let mut req = request();
        req.estimated_cost_usd = 0.25;
        let at = deny_rule()
            .evaluate(&req, &snapshot(&[(WINDOW_COST, Some(0.75), 3)]))
            .unwrap();
        assert_eq!(at.decision, Decision::Allow);
        req.estimated_cost_usd = 0.26;
        let over = deny_rule()
            .evaluate(&req, &snapshot(&[(WINDOW_COST, Some(0.75), 3)]))
            .unwrap();
        assert_eq!(over.decision, Decision::Deny);
    }

    #[test]
    fn missing_or_empty_window_counts_as_zero_spent() {
        let mut req = request();
        req.estimated_cost_usd = 1.5;
        let v = deny_rule().evaluate(&req, &Snapshot::default()).unwrap();
        assert_eq!(
            v.decision,
            Decision::Deny,
            "a single request above the cap is denied"
        );
        req.estimated_cost_usd = 0.1;
        let v = deny_rule()
            .evaluate(&req, &snapshot(&[(WINDOW_COST, None, 0)]))
            .unwrap();
        assert_eq!(v.decision, Decision::Allow);
    }

    #[test]
    fn downgrades_to_configured_tier_and_default_cheap() {
        let h = Harness::<BudgetThreshold>::new(json!({
            "period": "daily", "limit_usd": 10.0, "action": "downgrade", "downgrade_to_tier": "cheap"
        }))
        .unwrap();
        let v = h
            .evaluate(&request(), &snapshot(&[(WINDOW_COST, Some(10.0), 99)]))
            .unwrap();
        assert_eq!(v.decision, Decision::Downgrade("cheap".into()));
        assert!(v.reason.unwrap().contains("daily budget $10.0000 exceeded"));

        let default_tier = Harness::<BudgetThreshold>::new(
            json!({"period": "daily", "limit_usd": 1, "action": "downgrade"}),
        )
        .unwrap();
        let v = default_tier
            .evaluate(&request(), &snapshot(&[(WINDOW_COST, Some(2.0), 1)]))
            .unwrap();
        assert_eq!(v.decision, Decision::Downgrade("cheap".into()));
    }

    #[test]
    fn downgrade_when_already_cheap_allows_with_alert() {
        let h = Harness::<BudgetThreshold>::new(json!({
            "period": "daily", "limit_usd": 1.0, "action": "downgrade"
        }))
        .unwrap();
        let mut req = request();
        req.requested_tier = "cheap".into();
        let v = h
            .evaluate(&req, &snapshot(&[(WINDOW_COST, Some(2.0), 1)]))
            .unwrap();
        assert_eq!(v.decision, Decision::Allow);
        assert!(v.alert.unwrap().contains("downgrade tier `cheap`"));
    }

    #[test]
    fn rejects_bad_settings_with_the_field_named() {
        let err = |v| Harness::<BudgetThreshold>::new(v).err().unwrap();
        assert!(err(json!({"period": "hourly", "limit_usd": -1})).starts_with("limit_usd:"));
        assert!(err(json!({"period": "weekly", "limit_usd": 1})).starts_with("settings.period:"));
        assert!(err(json!({"period": "hourly", "limit_usd": "lots"}))
            .starts_with("settings.limit_usd:"));
        assert!(err(json!({"period": "hourly"})).contains("missing field `limit_usd`"));
        assert!(err(json!({"period": "hourly", "limit_usd": 1, "limit": 2}))
            .contains("unknown field `limit`"));
        assert!(
            err(json!({"period": "hourly", "limit_usd": 1, "downgrade_to_tier": "cheap"}))
                .starts_with("downgrade_to_tier:")
        );
        assert!(err(
            json!({"period": "hourly", "limit_usd": 1, "action": "downgrade", "deny_reason": "x"})
        )
        .starts_with("deny_reason:"));
        assert!(
            err(json!({"period": "hourly", "limit_usd": 1, "scope": ["tenant", "tenant"]}))
                .starts_with("scope[1]:")
        );
    }
}
