//! Snapshot assembly: the values a rule's declared aggregates have for one request — the
//! published aggregates (computed by the engine off the request path) plus, for sums and
//! counts that include in-flight spend, the ledger's entries inside each aggregate's window,
//! minus the request's own reservation.

use llmscope_sdk::types::{
    Aggregate, AggregateValue, Aggregation, Metric, RequestContext, Snapshot,
};

use crate::ledger::{Dims, Ledger, Sums};
use crate::policy::{FailureMode, Rule, SnapshotSource};
use crate::shared::{SharedBudgets, SharedRead, Spec};

/// Published aggregate values (computed off the request path, e.g. by DuckDB).
pub trait AggregateStore: Send + Sync {
    /// The value of `aggregate` for `request`'s scope, if known.
    fn lookup(&self, aggregate: &Aggregate, request: &RequestContext) -> Option<AggregateValue>;
    /// When the values were computed (ms since the epoch), 0 if never.
    fn taken_at_unix_ms(&self) -> u64;
    /// Every value of `a` held, per combination of its scope's values (in
    /// [`SpecKey`](crate::engine::SpecKey) order: sorted, deduplicated), as of `now_ms` (none
    /// once a new calendar period began). For budget status; requests use `lookup`.
    fn values_of(&self, a: &Aggregate, now_ms: u64) -> Vec<(Vec<Option<String>>, f64)> {
        let _ = (a, now_ms);
        Vec::new()
    }
}

/// No history: every aggregate starts empty.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHistory;

impl AggregateStore for NoHistory {
    fn lookup(&self, _: &Aggregate, _: &RequestContext) -> Option<AggregateValue> {
        None
    }
    fn taken_at_unix_ms(&self) -> u64 {
        0
    }
}

/// Snapshots for one request: published aggregates plus the ledger, minus the request's own
/// reservation.
pub struct LiveSnapshots<'a> {
    /// Published aggregates.
    pub store: &'a dyn AggregateStore,
    /// The ledger.
    pub ledger: &'a Ledger,
    /// The request's own reservation (excluded from its snapshot).
    pub own: Option<(&'a Dims, Sums)>,
    /// The replicas' shared sums read for this request (`budgets: {backend: redis}`): they
    /// replace the local sums and counts; `Err` when Redis did not answer, so rules with
    /// `failure_mode: closed` that need them fail and the others see the local sums.
    pub shared: Option<(&'a SharedBudgets, &'a SharedRead)>,
}

impl SnapshotSource for LiveSnapshots<'_> {
    fn snapshot(&self, rule: &Rule, request: &RequestContext) -> Snapshot {
        self.values(rule.aggregates(), request)
    }

    fn unavailable(&self, rule: &Rule) -> Option<String> {
        let (_, Err(why)) = self.shared? else {
            return None;
        };
        let needs = rule.aggregates().iter().any(|a| Spec::of(a).is_some());
        (needs && rule.failure_mode() == FailureMode::Closed).then(|| why.clone())
    }
}

impl LiveSnapshots<'_> {
    /// Current values of `aggregates` for `request`: published values plus (where asked for)
    /// in-flight and settled-but-not-ingested spend, minus the request's own reservation.
    pub fn values(&self, aggregates: &[Aggregate], request: &RequestContext) -> Snapshot {
        let values = aggregates
            .iter()
            .map(|a| {
                if let Some((store, Ok(read))) = self.shared {
                    let keys = store.keys_for(a, request);
                    if let Some((value, samples)) =
                        crate::shared::value_of(a, request, &keys, read, self.own)
                    {
                        return AggregateValue {
                            key: a.key.clone(),
                            value: Some(value),
                            samples: samples.round() as u64,
                        };
                    }
                }
                let base = self.store.lookup(a, request);
                let summable = matches!(a.aggregation, Aggregation::Sum | Aggregation::Count)
                    && a.metric != Metric::LatencyMs;
                let (mut value, mut samples) = match (&base, summable) {
                    (Some(v), _) => (v.value, v.samples as f64),
                    (None, true) => (Some(0.0), 0.0),
                    (None, false) => (None, 0.0),
                };
                if a.include_in_flight && summable {
                    let since_ms = u64::try_from(
                        crate::windows::window_start_us(a.window, request.unix_time_ms).0 / 1000,
                    )
                    .unwrap_or(0);
                    let (mut extra, mut extra_n) =
                        self.ledger.sum(a.metric, &a.scope, request, since_ms);
                    if let Some((dims, own)) = self.own {
                        if dims.matches(&a.scope, request) {
                            extra -= own.get(a.metric).unwrap_or(0.0);
                            extra_n -= own.requests;
                        }
                    }
                    let extra = if a.aggregation == Aggregation::Count {
                        extra_n
                    } else {
                        extra
                    };
                    value = Some(value.unwrap_or(0.0) + extra.max(0.0));
                    samples += extra_n.max(0.0);
                }
                AggregateValue {
                    key: a.key.clone(),
                    value,
                    samples: samples.round() as u64,
                }
            })
            .collect();
        Snapshot {
            taken_at_unix_ms: self.store.taken_at_unix_ms(),
            values,
        }
    }
}
