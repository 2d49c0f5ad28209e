//! The in-flight ledger: money the gateway has committed but the aggregates do not show yet.
//!
//! Each request reserves its estimate before its policies run and keeps the reservation while it
//! is dispatched; at settlement the reservation becomes a settled entry with the actual cost,
//! tagged with the telemetry offset its line ended at. When ingestion has caught up to that
//! offset the aggregates include it and the entry is dropped. A snapshot adds the ledger to the
//! published aggregates for `include_in_flight` sums, so concurrent requests cannot overshoot a
//! budget between refreshes ([`crate::snapshots`] adds it). Lookups scan ledger buckets keyed
//! by the request's dimensions, never the log.

use std::collections::HashMap;
use std::sync::Arc;

use llmscope_sdk::types::{Metric, RequestContext, Scope};
use parking_lot::Mutex;

use crate::artifacts::LogPosition;
use crate::shared::{Change, LedgerEntry, SharedBudgets};

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

    /// The value of scope `s` (as the telemetry column holding it has it).
    pub fn value(&self, s: Scope) -> Option<String> {
        match s {
            Scope::Tenant => Some(self.tenant.clone()),
            Scope::Feature => self.feature.clone(),
            Scope::Route => Some(self.route.clone()),
            Scope::BudgetNamespace => Some(self.namespace.clone()),
            Scope::Experiment => self.experiment.clone(),
            Scope::Model => Some(self.model.clone()),
        }
    }

    pub(crate) fn matches(&self, scope: &[Scope], r: &RequestContext) -> bool {
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

    pub(crate) fn get(&self, metric: Metric) -> Option<f64> {
        match metric {
            Metric::CostUsd => Some(self.cost_usd),
            Metric::TokensIn => Some(self.tokens_in),
            Metric::TokensOut => Some(self.tokens_out),
            Metric::Requests => Some(self.requests),
            Metric::LatencyMs => None,
        }
    }
}

/// One request's money in the ledger.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When the request arrived (its telemetry timestamp): windows count it from here.
    at_ms: u64,
    /// Reserved, or settled at the actual amounts.
    sums: Sums,
    /// `None` while reserved; settled: where its telemetry line ended (`Some(None)`: the line
    /// was not written, so no ingestion will cover it and it stays until it ages out).
    settled: Option<Option<LogPosition>>,
}

/// The entries of one dimension tuple, with their total.
#[derive(Debug, Default)]
struct Bucket {
    entries: HashMap<u64, Entry>,
    total: Sums,
    /// No entry is older than this (it may be older than the oldest entry left: it is only
    /// recomputed when entries are dropped in bulk). A window starting at or before it counts
    /// the whole bucket without looking at the entries.
    oldest_ms: u64,
}

impl Bucket {
    fn insert(&mut self, id: u64, entry: Entry) {
        if self.entries.is_empty() || entry.at_ms < self.oldest_ms {
            self.oldest_ms = entry.at_ms;
        }
        self.total.add(&entry.sums, 1.0);
        self.entries.insert(id, entry);
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.entries.remove(&id)?;
        self.total.add(&e.sums, -1.0);
        Some(e)
    }

    /// Drop the entries `drop` selects; recompute the total and the oldest time exactly.
    fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) {
        self.entries.retain(|_, e| keep(e));
        self.total = Sums::default();
        self.oldest_ms = u64::MAX;
        for e in self.entries.values() {
            self.total.add(&e.sums, 1.0);
            self.oldest_ms = self.oldest_ms.min(e.at_ms);
        }
    }

    /// The bucket's sums over entries at or after `since_ms`.
    fn since(&self, since_ms: u64) -> Sums {
        if since_ms <= self.oldest_ms {
            return self.total;
        }
        let mut s = Sums::default();
        for e in self.entries.values().filter(|e| e.at_ms >= since_ms) {
            s.add(&e.sums, 1.0);
        }
        s
    }
}

#[derive(Default)]
struct Inner {
    /// Outstanding reservations plus settled-but-not-ingested amounts, per dimension tuple.
    buckets: HashMap<Dims, Bucket>,
    next_id: u64,
    /// How far each telemetry file (by inode) is ingested and published: a request settled
    /// at or before it is already in the aggregates.
    published: HashMap<u64, u64>,
    /// The replicas' shared store, told of every change (`budgets: {backend: redis}`).
    shared: Option<Arc<SharedBudgets>>,
}

impl Inner {
    /// Remove entry `id` of `dims`, and the bucket when it is left empty.
    fn release(&mut self, dims: &Dims, id: u64) {
        if let Some(b) = self.buckets.get_mut(dims) {
            b.remove(id);
            if b.entries.is_empty() {
                self.buckets.remove(dims);
            }
        }
    }

    /// Tell the shared store of `changes`, all at once: (dims, time, settled, in flight,
    /// sign, telemetry line of a settlement).
    fn share(&self, changes: &[ShareChange<'_>]) {
        if let Some(s) = &self.shared {
            let changes: Vec<Change<'_>> = changes
                .iter()
                .map(|&(dims, at_ms, settled, in_flight, sign, line)| Change {
                    dims,
                    at_ms,
                    settled,
                    in_flight,
                    sign,
                    line,
                })
                .collect();
            s.changes(&changes);
        }
    }
}

/// A change told to the shared store: (dims, time, settled, in flight, sign, telemetry line).
type ShareChange<'a> = (&'a Dims, u64, &'a Sums, &'a Sums, f64, Option<LogPosition>);

/// The ledger. Cheap to clone (shared).
///
/// Every entry carries its request's time, so a sum counts only the entries inside the asking
/// aggregate's window; settled entries leave when ingestion has read past their telemetry line
/// ([`Ledger::ingested_through`]) or when older than the longest window ([`Ledger::expire`]).
#[derive(Clone, Default)]
pub struct Ledger {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (buckets, settled) = self.len();
        f.debug_struct("Ledger")
            .field("buckets", &buckets)
            .field("settled", &settled)
            .finish()
    }
}

/// An outstanding reservation; released when dropped (a request refused before dispatch gives
/// its money back), or turned into a settled entry by [`Reservation::settle`].
#[derive(Debug)]
pub struct Reservation {
    ledger: Ledger,
    dims: Dims,
    id: u64,
    amount: Sums,
    at_ms: u64,
    live: bool,
}

impl Ledger {
    /// Reserve `estimate_usd` (one request, arrived at `at_ms`) for `dims`.
    pub fn reserve(
        &self,
        dims: Dims,
        at_ms: u64,
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
        let id = inner.next_id;
        inner.next_id += 1;
        inner.buckets.entry(dims.clone()).or_default().insert(
            id,
            Entry {
                at_ms,
                sums: amount,
                settled: None,
            },
        );
        inner.share(&[(&dims, at_ms, &Sums::default(), &amount, 1.0, None)]);
        Reservation {
            ledger: self.clone(),
            dims,
            id,
            amount,
            at_ms,
            live: true,
        }
    }

    /// Drop settled entries whose telemetry line ended at or before where `positions` say its
    /// file is ingested now (the last position given per file): the published aggregates
    /// include them.
    pub fn ingested_through(&self, positions: &[LogPosition]) {
        if positions.is_empty() {
            return;
        }
        // The last position of each file is where it stands now: within one life of a file
        // offsets only grow, and a lower one after a higher one means the file was truncated
        // (copytruncate) or its inode reused by a new file, so older marks no longer hold.
        let mut latest: HashMap<u64, u64> = HashMap::new();
        for p in positions {
            latest.insert(p.file_id, p.offset);
        }
        let mut inner = self.inner.lock();
        for (file, offset) in &latest {
            inner.published.insert(*file, *offset);
        }
        for bucket in inner.buckets.values_mut() {
            bucket.retain(|e| match e.settled {
                Some(Some(at)) => latest
                    .get(&at.file_id)
                    .is_none_or(|offset| at.offset > *offset),
                _ => true,
            });
        }
        inner.buckets.retain(|_, b| !b.entries.is_empty());
    }

    /// Drop settled entries of requests that arrived before `before_ms` (older than every
    /// window, so no sum counts them any more; or never to be ingested).
    pub fn expire(&self, before_ms: u64) {
        let mut inner = self.inner.lock();
        for bucket in inner.buckets.values_mut() {
            if bucket.oldest_ms < before_ms {
                bucket.retain(|e| e.settled.is_none() || e.at_ms >= before_ms);
            }
        }
        inner.buckets.retain(|_, b| !b.entries.is_empty());
    }

    /// Sum of `metric` over ledger entries matching `request` on `scope` that arrived at or
    /// after `since_ms`, and the number of entries (requests) that contributed.
    pub fn sum(
        &self,
        metric: Metric,
        scope: &[Scope],
        request: &RequestContext,
        since_ms: u64,
    ) -> (f64, f64) {
        let inner = self.inner.lock();
        let mut total = 0.0;
        let mut requests = 0.0;
        for (dims, bucket) in &inner.buckets {
            if dims.matches(scope, request) {
                let sums = bucket.since(since_ms);
                total += sums.get(metric).unwrap_or(0.0);
                requests += sums.requests;
            }
        }
        (total, requests)
    }

    /// Per combination of `scope`'s values (in `scope`'s order, as [`Dims::value`] gives
    /// them): the cost of the entries at or after `since_ms`, as (settled but not yet
    /// ingested, still reserved). For budget status; requests use [`Ledger::sum`].
    pub fn cost_by_scope(
        &self,
        scope: &[Scope],
        since_ms: u64,
    ) -> HashMap<Vec<Option<String>>, (f64, f64)> {
        let inner = self.inner.lock();
        let mut out: HashMap<Vec<Option<String>>, (f64, f64)> = HashMap::new();
        for (dims, bucket) in &inner.buckets {
            let key: Vec<Option<String>> = scope.iter().map(|s| dims.value(*s)).collect();
            for e in bucket.entries.values().filter(|e| e.at_ms >= since_ms) {
                let (settled, reserved) = out.entry(key.clone()).or_default();
                if e.settled.is_some() {
                    *settled += e.sums.cost_usd;
                } else {
                    *reserved += e.sums.cost_usd;
                }
            }
        }
        out
    }

    /// Tell `shared` of every change from now on (the redis budget backend).
    pub fn share_with(&self, shared: Arc<SharedBudgets>) {
        self.inner.lock().shared = Some(shared);
    }

    /// Run `f` with every entry (dimensions, time, sums, settled or not) and the published
    /// positions, under the ledger's lock: no change interleaves, so what `f` builds from them
    /// is exact as of this instant (the shared store's mirror rebuild).
    pub fn with_entries<T>(&self, f: impl FnOnce(Vec<LedgerEntry>, Vec<LogPosition>) -> T) -> T {
        let inner = self.inner.lock();
        let entries = inner
            .buckets
            .iter()
            .flat_map(|(dims, b)| {
                b.entries
                    .values()
                    .map(|e| (dims.clone(), e.at_ms, e.sums, e.settled.is_some()))
            })
            .collect();
        let published = inner
            .published
            .iter()
            .map(|(file_id, offset)| LogPosition {
                file_id: *file_id,
                offset: *offset,
            })
            .collect();
        f(entries, published)
    }

    /// Dimension tuples with entries, and settled entries waiting for ingestion (diagnostics).
    pub fn len(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        let settled = inner
            .buckets
            .values()
            .map(|b| b.entries.values().filter(|e| e.settled.is_some()).count())
            .sum();
        (inner.buckets.len(), settled)
    }
}

impl Reservation {
    /// Move the reservation to new dimensions and amount (after a downgrade or a fallback
    /// re-priced it).
    pub fn update(&mut self, dims: Dims, estimate_usd: f64, tokens_in: u32, tokens_out: u32) {
        let amount = Sums {
            cost_usd: estimate_usd,
            tokens_in: f64::from(tokens_in),
            tokens_out: f64::from(tokens_out),
            requests: 1.0,
        };
        let mut inner = self.ledger.inner.lock();
        if let Some(b) = inner.buckets.get_mut(&self.dims) {
            b.remove(self.id);
        }
        inner.buckets.entry(dims.clone()).or_default().insert(
            self.id,
            Entry {
                at_ms: self.at_ms,
                sums: amount,
                settled: None,
            },
        );
        let none = Sums::default();
        inner.share(&[
            (&self.dims, self.at_ms, &none, &self.amount, -1.0, None),
            (&dims, self.at_ms, &none, &amount, 1.0, None),
        ]);
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

    /// When its request arrived (ms since the epoch).
    pub fn at_ms(&self) -> u64 {
        self.at_ms
    }

    /// Replace the reservation with the actual amounts, kept until ingestion passes
    /// `telemetry` (`None`: the line was not written, so nothing will ingest it; the amount
    /// stays until it is older than every window, so the budget still sees it).
    pub fn settle(mut self, actual: Sums, telemetry: Option<LogPosition>) {
        let mut inner = self.ledger.inner.lock();
        self.live = false;
        let none = Sums::default();
        inner.share(&[
            (&self.dims, self.at_ms, &none, &self.amount, -1.0, None),
            (&self.dims, self.at_ms, &actual, &none, 1.0, telemetry),
        ]);
        // Already ingested and published (a refresh ran between the write and this call):
        // the aggregates count it, so the ledger must not count it again.
        let published = telemetry.is_some_and(|at| {
            inner
                .published
                .get(&at.file_id)
                .is_some_and(|&mark| at.offset <= mark)
        });
        if published {
            inner.release(&self.dims, self.id);
            return;
        }
        let bucket = inner.buckets.entry(self.dims.clone()).or_default();
        bucket.remove(self.id);
        bucket.insert(
            self.id,
            Entry {
                at_ms: self.at_ms,
                sums: actual,
                settled: Some(telemetry),
            },
        );
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.live {
            let mut inner = self.ledger.inner.lock();
            inner.release(&self.dims, self.id);
            let none = Sums::default();
            inner.share(&[(&self.dims, self.at_ms, &none, &self.amount, -1.0, None)]);
        }
    }
}

#[cfg(test)]
mod tests;
