//! Which Redis keys hold a budget sum: one hash per (aggregate scope and window, the scope's
//! values, time bucket). A calendar window has one bucket per period (hour, day, month, UTC);
//! a rolling window of W seconds is cut into buckets of W/20 seconds (at least one), and a
//! read sums the buckets overlapping the window — the oldest one whole, so a rolling sum errs
//! high by at most one bucket (1/20 of the window), never low. (Finer buckets cost Redis one
//! more hash read each per request.)

use llmscope_sdk::types::{Aggregate, Aggregation, Metric, RequestContext, Scope, Window};

use crate::ledger::Dims;
use crate::windows::calendar_period_ms;

/// Buckets a rolling window is cut into.
const ROLLING_BUCKETS: u64 = 20;
/// How long a bucket key outlives the last window that reads it.
const KEEP_MS: u64 = 3_600_000;

/// The scope (sorted, deduplicated) and window of a summable aggregate: what one family of
/// keys sums. Aggregates differing only in metric or in sum/count share it (a key holds cost,
/// tokens in, tokens out and requests).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Spec {
    scope: Vec<Scope>,
    window: Window,
}

impl Spec {
    /// The spec of `a`, if Redis keeps it: sums and counts of cost, tokens and requests.
    pub fn of(a: &Aggregate) -> Option<Self> {
        let summable = matches!(a.aggregation, Aggregation::Sum | Aggregation::Count)
            && a.metric != Metric::LatencyMs;
        summable.then(|| {
            let mut scope = a.scope.clone();
            scope.sort();
            scope.dedup();
            Self {
                scope,
                window: a.window,
            }
        })
    }

    /// The distinct specs of `aggregates`, sorted.
    pub fn all<'a>(aggregates: impl IntoIterator<Item = &'a Aggregate>) -> Vec<Self> {
        let mut specs: Vec<Self> = aggregates.into_iter().filter_map(Self::of).collect();
        specs.sort();
        specs.dedup();
        specs
    }

    /// The window.
    pub fn window(&self) -> Window {
        self.window
    }

    /// The scope, sorted.
    pub fn scope(&self) -> &[Scope] {
        &self.scope
    }

    fn tag(&self) -> String {
        let scope: Vec<&str> = self
            .scope
            .iter()
            .map(|s| crate::gateway::budgets::scope_name(*s))
            .collect();
        let window = match self.window {
            Window::RollingSeconds(s) => format!("r{s}"),
            Window::CalendarHour => "hour".into(),
            Window::CalendarDay => "day".into(),
            Window::CalendarMonth => "month".into(),
        };
        format!("{}@{window}", scope.join("+"))
    }

    /// The key of the bucket starting at `bucket_ms` for scope values `values`.
    pub fn key(&self, prefix: &str, values: &[Option<String>], bucket_ms: u64) -> String {
        let values = serde_json::to_string(values).unwrap_or_default();
        format!("{prefix}:b:{}:{values}:{bucket_ms}", self.tag())
    }

    /// `dims`' values for the scope.
    pub fn values_of(&self, dims: &Dims) -> Vec<Option<String>> {
        self.scope.iter().map(|s| dims.value(*s)).collect()
    }

    /// `r`'s values for the scope.
    pub fn values_for(&self, r: &RequestContext) -> Vec<Option<String>> {
        self.values_of(&Dims::of(r))
    }

    /// Width of a rolling window's buckets, ms.
    fn width_ms(seconds: u64) -> u64 {
        seconds.div_ceil(ROLLING_BUCKETS).max(1) * 1000
    }

    /// The bucket money at `at_ms` goes to, and when its key may expire (ms since the epoch).
    pub fn bucket(&self, at_ms: u64) -> (u64, u64) {
        match self.window {
            Window::RollingSeconds(s) => {
                let w = Self::width_ms(s);
                let start = at_ms - at_ms % w;
                (start, start + w + s * 1000 + KEEP_MS)
            }
            cal => {
                let (start, end) = calendar_period_ms(cal, at_ms).unwrap_or((at_ms, at_ms));
                (start, end + KEEP_MS)
            }
        }
    }

    /// The buckets a read of the window ending at `now_ms` sums, oldest first.
    pub fn buckets(&self, now_ms: u64) -> Vec<u64> {
        match self.window {
            Window::RollingSeconds(s) => {
                let w = Self::width_ms(s);
                let from = now_ms.saturating_sub(s * 1000);
                let first = from - from % w;
                let last = now_ms - now_ms % w;
                (0..)
                    .map(|i| first + i * w)
                    .take_while(|b| *b <= last)
                    .collect()
            }
            cal => calendar_period_ms(cal, now_ms)
                .map(|(start, _)| start)
                .into_iter()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(window: Window) -> Spec {
        Spec::of(&Aggregate {
            key: "spent".into(),
            metric: Metric::CostUsd,
            aggregation: Aggregation::Sum,
            window,
            scope: vec![Scope::Tenant, Scope::BudgetNamespace, Scope::Tenant],
            include_in_flight: true,
        })
        .unwrap()
    }

    #[test]
    fn rolling_windows_read_the_buckets_overlapping_them() {
        let s = spec(Window::RollingSeconds(3600));
        // 3-min buckets: an hour ending mid-bucket reads 21 of them, the oldest partly outside.
        let now = 1_764_640_000_123;
        let b = s.buckets(now);
        assert_eq!(b.len(), 21);
        assert!(b[0] <= now - 3_600_000 && b[0] + 180_000 > now - 3_600_000);
        assert_eq!(*b.last().unwrap(), s.bucket(now).0);
        assert_eq!(s.bucket(now).0 % 180_000, 0);
        assert_eq!(spec(Window::RollingSeconds(30)).buckets(now).len(), 16);
    }

    #[test]
    fn calendar_windows_have_one_bucket_per_period() {
        // 2025-12-02 02:50 UTC.
        let now = 1_764_643_800_000;
        let hour = spec(Window::CalendarHour);
        assert_eq!(hour.buckets(now), vec![1_764_640_800_000]);
        let (start, expires) = spec(Window::CalendarMonth).bucket(now);
        assert_eq!(start, 1_764_547_200_000, "2025-12-01");
        assert_eq!(
            expires,
            1_767_225_600_000 + KEEP_MS,
            "2027-01-01, then kept an hour"
        );
    }

    #[test]
    fn keys_name_scope_window_values_and_bucket() {
        let s = spec(Window::CalendarDay);
        assert_eq!(s.scope(), [Scope::Tenant, Scope::BudgetNamespace]);
        let k = s.key("llmscope", &[Some("acme".into()), None], 42);
        assert_eq!(
            k,
            r#"llmscope:b:tenant+budget_namespace@day:["acme",null]:42"#
        );
        assert!(Spec::of(&Aggregate {
            aggregation: Aggregation::P95,
            ..Aggregate {
                key: "p".into(),
                metric: Metric::CostUsd,
                aggregation: Aggregation::Sum,
                window: Window::CalendarDay,
                scope: vec![],
                include_in_flight: false,
            }
        })
        .is_none());
    }
}
