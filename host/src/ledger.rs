//! The in-flight ledger: money the gateway has committed but the aggregates do not show yet.
//!
//! Each request reserves its estimate before its policies run and keeps the reservation while it
//! is dispatched; at settlement the reservation becomes a settled entry with the actual cost,
//! tagged with the telemetry offset its line ended at. When ingestion has caught up to that
//! offset the aggregates include it and the entry is dropped. A snapshot adds the ledger to the
//! published aggregates for `include_in_flight` sums, so concurrent requests cannot overshoot a
//! budget between refreshes. Lookups scan ledger buckets keyed by the request's dimensions,
//! never the log.

use std::collections::HashMap;
use std::sync::Arc;

use llmscope_sdk::types::{
    Aggregate, AggregateValue, Aggregation, Metric, RequestContext, Scope, Snapshot,
};
use parking_lot::Mutex;

use crate::policy::{Rule, SnapshotSource};

/// The attribution dimensions of a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Dims {
    /// Tenant id.
    pub tenant: String,
    /// Feature id.
    pub feature: Option<String>,
    /// Route name.
    pub route: String,
    /// Resolved budget namespace.
    pub namespace: String,
    /// Experiment id.
    pub experiment: Option<String>,
    /// Model.
    pub model: String,
}

impl Dims {
    /// The dimensions of a request context.
    pub fn of(r: &RequestContext) -> Self {
        Self {
            tenant: r.tenant_id.clone(),
            feature: r.feature_id.clone(),
            route: r.route_name.clone(),
            namespace: r.budget_namespace.clone(),
            experiment: r.experiment_id.clone(),
            model: r.model.clone(),
        }
    }

    fn matches(&self, scope: &[Scope], r: &RequestContext) -> bool {
        scope.iter().all(|s| match s {
            Scope::Tenant => self.tenant == r.tenant_id,
            Scope::Feature => self.feature == r.feature_id,
            Scope::Route => self.route == r.route_name,
            Scope::BudgetNamespace => self.namespace == r.budget_namespace,
            Scope::Experiment => self.experiment == r.experiment_id,
            Scope::Model => self.model == r.model,
        })
    }
}

/// Summable quantities.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sums {
    /// US dollars.
    pub cost_usd: f64,
    /// Input tokens.
    pub tokens_in: f64,
    /// Output tokens.
    pub tokens_out: f64,
    /// Requests.
    pub requests: f64,
}

impl Sums {
    fn add(&mut self, o: &Sums, sign: f64) {
        self.cost_usd += sign * o.cost_usd;
        self.tokens_in += sign * o.tokens_in;
        self.tokens_out += sign * o.tokens_out;
        self.requests += sign * o.requests;
    }

    fn get(&self, metric: Metric) -> Option<f64> {
        match metric {
            Metric::CostUsd => Some(self.cost_usd),
            Metric::TokensIn => Some(self.tokens_in),
            Metric::TokensOut => Some(self.tokens_out),
            Metric::Requests => Some(self.requests),
            Metric::LatencyMs => None,
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Outstanding reservations plus settled-but-not-ingested amounts, per dimension tuple.
    buckets: HashMap<Dims, Sums>,
    /// Settled entries waiting for ingestion: telemetry end offset, dims, amounts.
    settled: Vec<(u64, Dims, Sums)>,
}

/// The ledger. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Ledger {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("Ledger")
            .field("buckets", &inner.buckets.len())
            .field("settled", &inner.settled.len())
            .finish()
    }
}

/// An outstanding reservation; released when dropped (a cancelled or failed request gives its
/// money back), or turned into a settled entry by [`Reservation::settle`].
#[derive(Debug)]
pub struct Reservation {
    ledger: Ledger,
    dims: Dims,
    amount: Sums,
    live: bool,
}

impl Ledger {
    /// Reserve `estimate_usd` (one request) for `dims`.
    pub fn reserve(
        &self,
        dims: Dims,
        estimate_usd: f64,
        tokens_in: u32,
        tokens_out: u32,
    ) -> Reservation {
        let amount = Sums {
            cost_usd: estimate_usd,
            tokens_in: f64::from(tokens_in),
            tokens_out: f64::from(tokens_out),
            requests: 1.0,
        };
        let mut inner = self.inner.lock();
        inner
            .buckets
            .entry(dims.clone())
            .or_default()
            .add(&amount, 1.0);
        Reservation {
            ledger: self.clone(),
            dims,
            amount,
            live: true,
        }
    }

    /// Drop settled entries whose telemetry line ended at or before `offset`: the published
    /// aggregates include them now.
    pub fn ingested_through(&self, offset: u64) {
        let mut inner = self.inner.lock();
        let Inner {
            buckets, settled, ..
        } = &mut *inner;
        settled.retain(|(end, dims, amount)| {
            if *end <= offset {
                if let Some(b) = buckets.get_mut(dims) {
                    b.add(amount, -1.0);
                }
                false
            } else {
                true
            }
        });
        buckets.retain(|_, s| s.requests.abs() > 1e-9 || s.cost_usd.abs() > 1e-12);
    }

    /// Sum of `metric` over ledger entries matching `request` on `scope`, and the number of
    /// entries (requests) that contributed.
    pub fn sum(&self, metric: Metric, scope: &[Scope], request: &RequestContext) -> (f64, f64) {
        let inner = self.inner.lock();
        let mut total = 0.0;
        let mut requests = 0.0;
        for (dims, sums) in &inner.buckets {
            if dims.matches(scope, request) {
                total += sums.get(metric).unwrap_or(0.0);
                requests += sums.requests;
            }
        }
        (total, requests)
    }

    /// Outstanding reservations plus unsettled entries, for diagnostics.
    pub fn len(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.buckets.len(), inner.settled.len())
    }
}

impl Reservation {
    /// Move the reservation to new dimensions and amount (after a downgrade re-priced it).
    pub fn update(&mut self, dims: Dims, estimate_usd: f64, tokens_in: u32, tokens_out: u32) {
        let amount = Sums {
            cost_usd: estimate_usd,
            tokens_in: f64::from(tokens_in),
            tokens_out: f64::from(tokens_out),
            requests: 1.0,
        };
        let mut inner = self.ledger.inner.lock();
        if let Some(b) = inner.buckets.get_mut(&self.dims) {
            b.add(&self.amount, -1.0);
        }
        inner
            .buckets
            .entry(dims.clone())
            .or_default()
            .add(&amount, 1.0);
        self.dims = dims;
        self.amount = amount;
    }

    /// What this reservation holds.
    pub fn amount(&self) -> Sums {
        self.amount
    }

    /// The reservation's dimensions.
    pub fn dims(&self) -> &Dims {
        &self.dims
    }

    /// Replace the reservation with the actual amounts, kept until ingestion passes
    /// `telemetry_end_offset` (`None`: the line was not written, so nothing will ingest it; the
    /// amount stays until the process ends so the budget still sees it).
    pub fn settle(mut self, actual: Sums, telemetry_end_offset: Option<u64>) {
        let mut inner = self.ledger.inner.lock();
        let bucket = inner.buckets.entry(self.dims.clone()).or_default();
        bucket.add(&self.amount, -1.0);
        bucket.add(&actual, 1.0);
        inner.settled.push((
            telemetry_end_offset.unwrap_or(u64::MAX),
            self.dims.clone(),
            actual,
        ));
        self.live = false;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.live {
            let mut inner = self.ledger.inner.lock();
            if let Some(b) = inner.buckets.get_mut(&self.dims) {
                b.add(&self.amount, -1.0);
            }
        }
    }
}

/// Published aggregate values (computed off the request path, e.g. by DuckDB).
pub trait AggregateStore: Send + Sync {
    /// The value of `aggregate` for `request`'s scope, if known.
    fn lookup(&self, aggregate: &Aggregate, request: &RequestContext) -> Option<AggregateValue>;
    /// When the values were computed (ms since the epoch), 0 if never.
    fn taken_at_unix_ms(&self) -> u64;
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
}

impl SnapshotSource for LiveSnapshots<'_> {
    fn snapshot(&self, rule: &Rule, request: &RequestContext) -> Snapshot {
        self.values(rule.aggregates(), request)
    }
}

impl LiveSnapshots<'_> {
    /// Current values of `aggregates` for `request`: published values plus (where asked for)
    /// in-flight and settled-but-not-ingested spend, minus the request's own reservation.
    pub fn values(&self, aggregates: &[Aggregate], request: &RequestContext) -> Snapshot {
        let values = aggregates
            .iter()
            .map(|a| {
                let base = self.store.lookup(a, request);
                let summable = matches!(a.aggregation, Aggregation::Sum | Aggregation::Count)
                    && a.metric != Metric::LatencyMs;
                let (mut value, mut samples) = match (&base, summable) {
                    (Some(v), _) => (v.value, v.samples as f64),
                    (None, true) => (Some(0.0), 0.0),
                    (None, false) => (None, 0.0),
                };
                if a.include_in_flight && summable {
                    let (mut extra, mut extra_n) = self.ledger.sum(a.metric, &a.scope, request);
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

#[cfg(test)]
mod tests {
    use super::*;
    use llmscope_sdk::testing::request;

    fn dims(tenant: &str) -> Dims {
        let mut r = request();
        r.tenant_id = tenant.into();
        Dims::of(&r)
    }

    #[test]
    fn reservations_are_released_on_drop_and_moved_on_settle() {
        let ledger = Ledger::default();
        let req = request();
        let scope = [Scope::BudgetNamespace];
        let a = ledger.reserve(dims("acme"), 0.5, 10, 20);
        let b = ledger.reserve(dims("globex"), 0.25, 10, 20);
        assert_eq!(ledger.sum(Metric::CostUsd, &scope, &req), (0.75, 2.0));
        assert_eq!(ledger.sum(Metric::CostUsd, &[Scope::Tenant], &req).0, 0.5);
        drop(b);
        assert_eq!(ledger.sum(Metric::CostUsd, &scope, &req).0, 0.5);
        a.settle(
            Sums {
                cost_usd: 0.2,
                tokens_in: 10.0,
                tokens_out: 5.0,
                requests: 1.0,
            },
            Some(100),
        );
        assert!((ledger.sum(Metric::CostUsd, &scope, &req).0 - 0.2).abs() < 1e-12);
        ledger.ingested_through(99);
        assert!(
            (ledger.sum(Metric::CostUsd, &scope, &req).0 - 0.2).abs() < 1e-12,
            "not yet ingested"
        );
        ledger.ingested_through(100);
        assert_eq!(ledger.sum(Metric::CostUsd, &scope, &req), (0.0, 0.0));
    }

    #[test]
    fn update_moves_the_reservation_to_the_new_model() {
        let ledger = Ledger::default();
        let req = request();
        let mut r = ledger.reserve(Dims::of(&req), 0.008, 100, 500);
        let mut cheap = Dims::of(&req);
        cheap.model = "gpt-4o-mini".into();
        r.update(cheap, 0.0004, 100, 500);
        assert_eq!(
            ledger.sum(Metric::CostUsd, &[Scope::Model], &req).0,
            0.0,
            "request's model is gpt-4o"
        );
        assert!((ledger.sum(Metric::CostUsd, &[], &req).0 - 0.0004).abs() < 1e-12);
    }
}
