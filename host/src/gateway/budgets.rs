//! Budget status (`GET /v1/budgets`, `llmscope budgets`): for every `budget_threshold` rule and
//! every combination of its scope's values with spend in the current window — spent (ingested
//! plus settled since the last refresh), in flight (reserved), the limit, what remains, the
//! share used, when a calendar window resets, and when the budget runs out at the window's
//! pace so far. The figures are the ones the rule itself sees: published aggregates plus the
//! ledger.

use std::collections::{BTreeMap, HashMap};

use llmscope_sdk::types::{Aggregate, Aggregation, Metric, Scope, Window};
use llmscope_wire::records::rfc3339;
use serde::Serialize;
use serde_json::Value;

use crate::engine::SpecKey;
use crate::policy::Rule;
use crate::windows::window_start_us;

use super::{now_ms, Gateway};

/// The primitive whose rules are budgets.
const BUDGET_PRIMITIVE: &str = "budget_threshold";

/// A row's scope values: each scope of the rule's budget with its value.
pub type ScopeValues = [(Scope, Option<String>)];

/// One budget rule × scope value.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetStatus {
    /// Policy namespace of the rule.
    pub namespace: String,
    /// Rule id.
    pub rule_id: String,
    /// `enforce` or `monitor`.
    pub mode: String,
    /// The rule's window: `hourly|daily|monthly` and `rolling|calendar`.
    pub period: String,
    /// `rolling` or `calendar`.
    pub window: String,
    /// The value of each scope (`tenant`, `budget_namespace`, ...) this row is for.
    pub scope: BTreeMap<String, Option<String>>,
    /// The limit, USD.
    pub limit_usd: f64,
    /// Spent in the window (settled), USD.
    pub spent_usd: f64,
    /// Reserved by requests in flight, USD.
    pub in_flight_usd: f64,
    /// `limit - spent - in flight`, at least 0.
    pub remaining_usd: f64,
    /// `(spent + in flight) / limit`, percent.
    pub percent_used: f64,
    /// Start of the window (RFC 3339).
    pub window_start: String,
    /// When a calendar window starts afresh; `null` for rolling windows (spend leaves them
    /// continuously).
    pub resets_at: Option<String>,
    /// Spend (settled and in flight) per hour over the window so far.
    pub burn_usd_per_hour: f64,
    /// When the budget runs out at that pace; `null` when it does not before the window
    /// resets, or nothing is spent.
    pub exhausted_at: Option<String>,
}

impl Gateway {
    /// The status of every budget rule × scope value with spend in its window, `keep`
    /// choosing which rows a caller may see (by the row's scope values).
    pub fn budgets(&self, keep: &dyn Fn(&ScopeValues) -> bool) -> Vec<BudgetStatus> {
        let now = now_ms();
        let policies = self.policies();
        let _view = self.view();
        let store = self.store();
        let mut out = Vec::new();
        for ns in policies.namespaces() {
            for rule in ns
                .rules()
                .iter()
                .filter(|r| r.primitive() == BUDGET_PRIMITIVE)
            {
                let Some((a, limit, period, window)) = budget_of(rule) else {
                    continue;
                };
                let scope = SpecKey::scope_order(a);
                let (start_us, _) = window_start_us(a.window, now);
                let since_ms = u64::try_from(start_us / 1000).unwrap_or(0);
                let mut rows: HashMap<Vec<Option<String>>, (f64, f64)> = store
                    .values_of(a, now)
                    .into_iter()
                    .map(|(k, v)| (k, (v, 0.0)))
                    .collect();
                for (k, (settled, reserved)) in self.ledger().cost_by_scope(&scope, since_ms) {
                    let row = rows.entry(k).or_default();
                    row.0 += settled;
                    row.1 += reserved;
                }
                for (values, (spent, in_flight)) in rows {
                    let pairs: Vec<(Scope, Option<String>)> =
                        scope.iter().copied().zip(values).collect();
                    // A rule kept per namespace governs its own namespace only (the aggregate
                    // is shared by every namespace's rule of the same shape).
                    let other_namespace = pairs.iter().any(|(s, v)| {
                        *s == Scope::BudgetNamespace && v.as_deref() != Some(ns.name())
                    });
                    if other_namespace || !keep(&pairs) || spent + in_flight <= 0.0 {
                        continue;
                    }
                    out.push(status(
                        ns.name(),
                        rule,
                        (&period, &window),
                        &pairs,
                        (limit, spent, in_flight),
                        (a.window, start_us, now),
                    ));
                }
            }
        }
        out.sort_by(|x, y| {
            (&x.namespace, &x.rule_id, &x.scope).cmp(&(&y.namespace, &y.rule_id, &y.scope))
        });
        out
    }
}

/// A budget rule's spend aggregate (sum of cost), limit, period and window, from its
/// declarations and settings.
fn budget_of(rule: &Rule) -> Option<(&Aggregate, f64, String, String)> {
    let a = rule
        .aggregates()
        .iter()
        .find(|a| a.metric == Metric::CostUsd && a.aggregation == Aggregation::Sum)?;
    let settings: Value = serde_json::from_str(rule.settings_json()).ok()?;
    let limit = settings.get("limit_usd")?.as_f64()?;
    let text = |k: &str, default: &str| {
        settings
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_owned()
    };
    Some((
        a,
        limit,
        text("period", "hourly"),
        text("window", "rolling"),
    ))
}

/// One row's figures; `money`: (limit, spent, in flight); `at`: (window, its start µs, now ms).
fn status(
    namespace: &str,
    rule: &Rule,
    (period, window): (&str, &str),
    scope: &[(Scope, Option<String>)],
    (limit, spent, in_flight): (f64, f64, f64),
    (w, start_us, now): (Window, i64, u64),
) -> BudgetStatus {
    let used = spent + in_flight;
    let remaining = (limit - used).max(0.0);
    let resets_us = next_period_us(w, start_us);
    let now_us = i64::try_from(now).unwrap_or(i64::MAX).saturating_mul(1000);
    let elapsed_h = ((now_us - start_us).max(1) as f64) / 3.6e9;
    let burn = used / elapsed_h;
    let exhausted_us = (burn > 0.0 && remaining > 0.0)
        .then(|| now_us.saturating_add((remaining / burn * 3.6e9) as i64))
        .filter(|at| resets_us.is_none_or(|r| *at < r));
    let to_rfc = |us: i64| rfc3339(u64::try_from(us / 1000).unwrap_or(0));
    BudgetStatus {
        namespace: namespace.to_owned(),
        rule_id: rule.id().to_owned(),
        mode: format!("{:?}", rule.mode()).to_lowercase(),
        period: period.to_owned(),
        window: window.to_owned(),
        scope: scope
            .iter()
            .map(|(s, v)| (scope_name(*s).to_owned(), v.clone()))
            .collect(),
        limit_usd: limit,
        spent_usd: spent,
        in_flight_usd: in_flight,
        remaining_usd: remaining,
        percent_used: if limit > 0.0 {
            used / limit * 100.0
        } else {
            100.0
        },
        window_start: to_rfc(start_us),
        resets_at: resets_us.map(to_rfc),
        burn_usd_per_hour: burn,
        exhausted_at: if remaining <= 0.0 {
            Some(to_rfc(now_us))
        } else {
            exhausted_us.map(to_rfc)
        },
    }
}

/// Start of the calendar period after the one starting at `start_us`; `None` for rolling.
fn next_period_us(w: Window, start_us: i64) -> Option<i64> {
    let start_ms = u64::try_from(start_us / 1000).ok()?;
    let (_, end_ms) = crate::windows::calendar_period_ms(w, start_ms)?;
    i64::try_from(end_ms).ok().map(|ms| ms * 1000)
}

/// A scope's name as policies write it.
pub fn scope_name(s: Scope) -> &'static str {
    match s {
        Scope::Tenant => "tenant",
        Scope::Feature => "feature",
        Scope::Route => "route",
        Scope::BudgetNamespace => "budget_namespace",
        Scope::Experiment => "experiment",
        Scope::Model => "model",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_windows_reset_at_the_next_period_and_rolling_ones_never() {
        let at = |s: &str| crate::engine::parse_ts_us(s).unwrap_or_default();
        let start = at("2026-01-31T00:00:00Z");
        assert_eq!(
            next_period_us(Window::CalendarDay, start),
            Some(at("2026-02-01T00:00:00Z"))
        );
        let month = at("2026-01-01T00:00:00Z");
        assert_eq!(
            next_period_us(Window::CalendarMonth, month),
            Some(at("2026-02-01T00:00:00Z"))
        );
        assert_eq!(next_period_us(Window::RollingSeconds(3600), start), None);
    }
}
