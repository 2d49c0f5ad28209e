//! The edge bookkeeping the gateway holds, below it: reservations waiting for their reports,
//! the aggregates edge rules registered, and the request ids already reported. Nothing here
//! reads the gateway, so its refresh can register and expire without a cycle.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use llmscope_sdk::types::{Aggregate, RequestContext};
use parking_lot::{Mutex, RwLock};

use crate::engine::SpecKey;
use crate::ledger::{Dims, Ledger, Reservation, Sums};

use crate::gateway::error::EdgeError;

/// How long a reservation made for an edge request waits for its report (the filters retry
/// a report for as long).
pub const EDGE_RESERVATION_TTL: Duration = llmscope_sdk::edge::RESERVATION_TTL;
/// Most aggregates one context call may declare.
pub const MAX_AGGREGATES_PER_CALL: usize = 32;
/// Most distinct aggregates edge rules may register (beyond the host's own).
pub const MAX_EDGE_AGGREGATES: usize = 256;
/// Most reservations waiting for a report; beyond it context calls are refused (503), so a
/// flood of context calls cannot grow memory or hold budgets without bound.
pub const MAX_PENDING: usize = 100_000;
/// Most reservations one tenant may have waiting for reports: a flood of context calls for one
/// tenant (a broken or hostile filter, a client Envoy forwards unchecked) cannot take the
/// room every other tenant's requests need, nor pin their shared budgets with phantom holds.
pub const MAX_PENDING_PER_TENANT: usize = 10_000;
/// Most reported request ids remembered at once (16 bytes each); within it every id is kept
/// for [`EDGE_RESERVATION_TTL`], the longest a filter retries a report.
pub(crate) const REPORTED_MEMORY: usize = 2_000_000;

struct Entry {
    reservation: Reservation,
    /// The context the host issued first for this id: a report is recorded with it, not with
    /// what the report claims.
    issued: RequestContext,
    created: Instant,
}

/// Reservations waiting for reports, by request id, and how many each tenant holds.
#[derive(Default)]
struct Pending {
    map: HashMap<String, Entry>,
    per_tenant: HashMap<String, usize>,
}

impl Pending {
    fn insert(&mut self, id: String, entry: Entry) {
        *self
            .per_tenant
            .entry(entry.issued.tenant_id.clone())
            .or_default() += 1;
        if let Some(old) = self.map.insert(id, entry) {
            self.uncount(&old.issued.tenant_id);
        }
    }

    fn remove(&mut self, id: &str) -> Option<Entry> {
        let entry = self.map.remove(id)?;
        self.uncount(&entry.issued.tenant_id);
        Some(entry)
    }

    fn uncount(&mut self, tenant: &str) {
        if let Some(n) = self.per_tenant.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_tenant.remove(tenant);
            }
        }
    }

    fn of_tenant(&self, tenant: &str) -> usize {
        self.per_tenant.get(tenant).copied().unwrap_or(0)
    }
}

/// Where a report of a request id stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReportState {
    /// Not reported yet: this delivery records it (and must [`EdgeState::finish_report`]).
    Fresh,
    /// Another delivery is being written right now.
    InProgress,
    /// Already recorded.
    Done,
}

/// Reported ids (as keyed hashes) with when they were reported, oldest first.
#[derive(Default)]
struct Reported {
    hasher: RandomState,
    state: HashMap<u64, bool>,
    order: VecDeque<(Instant, u64)>,
}

/// Edge bookkeeping inside the gateway.
#[derive(Default)]
pub struct EdgeState {
    entries: Mutex<Pending>,
    aggregates: RwLock<Vec<Aggregate>>,
    keys: Mutex<HashSet<SpecKey>>,
    reported: Mutex<Reported>,
    unreported: Mutex<Vec<Unreported>>,
}

/// An edge request whose report did not arrive within the reservation TTL: the proxy may have
/// died after the upstream billed it, so it is recorded at its estimate (conservative), like
/// a gateway request dispatched before a crash.
pub(crate) struct Unreported {
    /// The context issued for it.
    pub(crate) issued: RequestContext,
    /// Its reservation, settled once the line is written.
    pub(crate) reservation: Reservation,
}

impl EdgeState {
    /// Aggregates registered by edge rules.
    pub fn aggregates(&self) -> Vec<Aggregate> {
        self.aggregates.read().clone()
    }

    /// Reservations waiting for a report.
    pub fn pending(&self) -> usize {
        self.entries.lock().map.len()
    }

    /// Register `aggregates`; `Ok(true)` when any was new (compute before answering).
    pub fn register(&self, aggregates: &[Aggregate]) -> Result<bool, EdgeError> {
        if aggregates.len() > MAX_AGGREGATES_PER_CALL {
            return Err(EdgeError::BadCall {
                field: "aggregates",
                message: format!(
                    "{} aggregates declared; at most {MAX_AGGREGATES_PER_CALL} per rule",
                    aggregates.len()
                ),
            });
        }
        let mut keys = self.keys.lock();
        let fresh: Vec<&Aggregate> = aggregates
            .iter()
            .filter(|a| !keys.contains(&SpecKey::of(a)))
            .collect();
        if fresh.is_empty() {
            return Ok(false);
        }
        if keys.len() + fresh.len() > MAX_EDGE_AGGREGATES {
            return Err(EdgeError::BadCall {
                field: "aggregates",
                message: format!("edge rules declared more than {MAX_EDGE_AGGREGATES} distinct aggregates; the host refuses more"),
            });
        }
        let mut list = self.aggregates.write();
        for a in fresh {
            if keys.insert(SpecKey::of(a)) {
                list.push(a.clone());
            }
        }
        Ok(true)
    }

    /// Move reservations older than `ttl` to the requests whose report never came
    /// ([`EdgeState::take_unreported`]); returns how many.
    pub fn expire(&self, ttl: Duration) -> usize {
        let mut entries = self.entries.lock();
        let old: Vec<String> = entries
            .map
            .iter()
            .filter(|(_, e)| e.created.elapsed() >= ttl)
            .map(|(id, _)| id.clone())
            .collect();
        let mut unreported = self.unreported.lock();
        for id in &old {
            if let Some(e) = entries.remove(id) {
                unreported.push(Unreported {
                    issued: e.issued,
                    reservation: e.reservation,
                });
            }
        }
        old.len()
    }

    /// The expired requests still to be recorded (at their estimate).
    pub(crate) fn take_unreported(&self) -> Vec<Unreported> {
        std::mem::take(&mut *self.unreported.lock())
    }

    /// Put back requests that could not be recorded, for the next try.
    pub(crate) fn put_back_unreported(&self, back: Vec<Unreported>) {
        self.unreported.lock().extend(back);
    }

    /// The reservation `ctx`'s request holds in `ledger` at `dims` (its [`Dims::of`]): made by
    /// the first context call for its id (refused beyond [`MAX_PENDING`]), moved to `dims` at
    /// `ctx`'s estimate when a later filter of the chain sees the tier an earlier one
    /// downgraded to. Returns what it holds.
    pub(crate) fn hold(
        &self,
        ledger: &Ledger,
        ctx: &RequestContext,
        dims: &Dims,
    ) -> Result<Sums, EdgeError> {
        let (estimate, tokens_in, tokens_out) = (
            ctx.estimated_cost_usd,
            ctx.estimated_tokens_in,
            ctx.estimated_tokens_out,
        );
        let mut entries = self.entries.lock();
        if !entries.map.contains_key(&ctx.request_id) {
            if entries.map.len() >= MAX_PENDING {
                return Err(EdgeError::Overloaded(entries.map.len()));
            }
            let held = entries.of_tenant(&ctx.tenant_id);
            if held >= MAX_PENDING_PER_TENANT {
                return Err(EdgeError::TenantOverloaded {
                    tenant: ctx.tenant_id.clone(),
                    pending: held,
                });
            }
            let entry = Entry {
                reservation: ledger.reserve(
                    dims.clone(),
                    ctx.unix_time_ms,
                    estimate,
                    tokens_in,
                    tokens_out,
                ),
                issued: ctx.clone(),
                created: Instant::now(),
            };
            entries.insert(ctx.request_id.clone(), entry);
        }
        let Some(entry) = entries.map.get_mut(&ctx.request_id) else {
            return Err(EdgeError::Overloaded(0));
        };
        // A later filter of the chain sees the same request at another tier: same payer.
        // Another payer under the same id would move the hold to its budget while the report
        // is charged to the first one.
        let first = &entry.issued;
        if (
            &first.tenant_id,
            &first.budget_namespace,
            &first.feature_id,
            &first.experiment_id,
            &first.caller_id,
        ) != (
            &ctx.tenant_id,
            &ctx.budget_namespace,
            &ctx.feature_id,
            &ctx.experiment_id,
            &ctx.caller_id,
        ) {
            return Err(EdgeError::BadCall {
                field: "request_id",
                message: format!(
                    "{} is held for another tenant, namespace, feature, experiment or caller; \
                     every filter of a chain must send the same request",
                    ctx.request_id
                ),
            });
        }
        if entry.reservation.dims() != dims {
            entry
                .reservation
                .update(dims.clone(), estimate, tokens_in, tokens_out);
        }
        Ok(entry.reservation.amount())
    }

    /// The context first issued for `request_id`, while its reservation waits.
    pub(crate) fn issued(&self, request_id: &str) -> Option<RequestContext> {
        self.entries
            .lock()
            .map
            .get(request_id)
            .map(|e| e.issued.clone())
    }

    /// The reservation `request_id` held and its issued context, handed over to be settled
    /// (`None`: it expired, or the context call went to another process).
    pub(crate) fn take(&self, request_id: &str) -> Option<(Reservation, RequestContext)> {
        self.entries
            .lock()
            .remove(request_id)
            .map(|e| (e.reservation, e.issued))
    }

    /// Put back what [`Self::take`] handed over, when the report could not be recorded: its
    /// retry settles it.
    pub(crate) fn restore(&self, request_id: &str, held: (Reservation, RequestContext)) {
        let (reservation, issued) = held;
        let mut entries = self.entries.lock();
        // A context call for the id since then holds a newer reservation: keep that one (the
        // one handed back is released when dropped here).
        if entries.map.contains_key(request_id) {
            return;
        }
        entries.insert(
            request_id.to_owned(),
            Entry {
                reservation,
                issued,
                created: Instant::now(),
            },
        );
    }

    /// Remember `ids` as reported (their lines are in the logs), for a full TTL from now: a
    /// restarted host answers a filter's retry of a report it recorded before "duplicate"
    /// instead of recording it again.
    pub(crate) fn remember_reported(&self, ids: impl IntoIterator<Item = String>) {
        let mut r = self.reported.lock();
        let now = Instant::now();
        for id in ids {
            if r.order.len() >= REPORTED_MEMORY {
                break;
            }
            let key = r.hasher.hash_one(id.as_str());
            if r.state.insert(key, true).is_none() {
                r.order.push_back((now, key));
            }
        }
    }

    /// Start recording the report of `id`: [`ReportState::Fresh`] marks it in progress.
    pub(crate) fn begin_report(&self, id: &str) -> ReportState {
        let mut r = self.reported.lock();
        let key = r.hasher.hash_one(id);
        let now = Instant::now();
        while let Some(&(at, old)) = r.order.front() {
            if now.duration_since(at) < EDGE_RESERVATION_TTL && r.order.len() < REPORTED_MEMORY {
                break;
            }
            r.order.pop_front();
            r.state.remove(&old);
        }
        match r.state.get(&key) {
            Some(true) => ReportState::Done,
            Some(false) => ReportState::InProgress,
            None => {
                r.state.insert(key, false);
                r.order.push_back((now, key));
                ReportState::Fresh
            }
        }
    }

    /// Finish what [`Self::begin_report`] started: `recorded` keeps `id` as reported; else it
    /// is forgotten, so a retry records it.
    pub(crate) fn finish_report(&self, id: &str, recorded: bool) {
        let mut r = self.reported.lock();
        let key = r.hasher.hash_one(id);
        if recorded {
            if let Some(done) = r.state.get_mut(&key) {
                *done = true;
            }
        } else {
            r.state.remove(&key);
            r.order.retain(|&(_, k)| k != key);
        }
    }
}

/// Whether `id` may name an edge request: 1-128 characters of `[A-Za-z0-9._-]`.
pub(crate) fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmscope_sdk::types::{Aggregation, Metric, Scope, Window};

    fn agg(key: &str, window: u64) -> Aggregate {
        Aggregate {
            key: key.into(),
            metric: Metric::CostUsd,
            aggregation: Aggregation::Sum,
            scope: vec![Scope::Tenant],
            window: Window::RollingSeconds(window),
            include_in_flight: true,
        }
    }

    #[test]
    fn aggregates_register_once_by_identity_and_are_bounded() {
        let state = EdgeState::default();
        assert!(state.register(&[agg("a", 3600)]).unwrap());
        // Same identity under another key: nothing new to compute.
        assert!(!state.register(&[agg("b", 3600)]).unwrap());
        assert!(state.register(&[agg("c", 60)]).unwrap());
        assert_eq!(state.aggregates().len(), 2);
        let many: Vec<Aggregate> = (0..40).map(|i| agg("x", 10 + i)).collect();
        let err = state.register(&many).unwrap_err().to_string();
        assert!(err.contains("at most 32"), "{err}");
    }

    #[test]
    fn reports_are_idempotent_once_recorded_and_retryable_when_not() {
        let state = EdgeState::default();
        assert_eq!(state.begin_report("req-1"), ReportState::Fresh);
        assert_eq!(state.begin_report("req-1"), ReportState::InProgress);
        state.finish_report("req-1", false);
        assert_eq!(
            state.begin_report("req-1"),
            ReportState::Fresh,
            "a failed write is retried"
        );
        state.finish_report("req-1", true);
        assert_eq!(state.begin_report("req-1"), ReportState::Done);
        assert_eq!(state.begin_report("req-2"), ReportState::Fresh);
        // Far more ids than the old 16k memory: the first is still known.
        for i in 0..20_000 {
            state.begin_report(&format!("bulk-{i}"));
        }
        assert_eq!(state.begin_report("req-1"), ReportState::Done);
    }

    #[test]
    fn one_tenant_cannot_hold_every_pending_reservation() {
        let state = EdgeState::default();
        let ledger = Ledger::default();
        let ctx = |tenant: &str, i: usize| RequestContext {
            request_id: format!("req-{tenant}-{i}"),
            tenant_id: tenant.into(),
            caller_id: None,
            feature_id: None,
            experiment_id: None,
            budget_namespace: "default".into(),
            route_name: "/answer-routed".into(),
            requested_tier: "cheap".into(),
            model: "gpt-4o-mini".into(),
            estimated_tokens_in: 10,
            estimated_tokens_out: 10,
            estimated_cost_usd: 0.001,
            tiers: Vec::new(),
            unix_time_ms: 1,
        };
        for i in 0..MAX_PENDING_PER_TENANT {
            let c = ctx("flood", i);
            state.hold(&ledger, &c, &Dims::of(&c)).unwrap();
        }
        let c = ctx("flood", MAX_PENDING_PER_TENANT);
        let err = state
            .hold(&ledger, &c, &Dims::of(&c))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tenant flood"), "{err}");
        // The same id again is not a new reservation; other tenants are served.
        let again = ctx("flood", 0);
        assert!(state.hold(&ledger, &again, &Dims::of(&again)).is_ok());
        let other = ctx("acme", 0);
        assert!(state.hold(&ledger, &other, &Dims::of(&other)).is_ok());
        // The same id for another payer is refused, and the hold stays where it was.
        let mut thief = ctx("acme", 0);
        thief.request_id = "req-flood-0".into();
        let err = state
            .hold(&ledger, &thief, &Dims::of(&thief))
            .unwrap_err()
            .to_string();
        assert!(err.contains("request_id"), "{err}");
        assert_eq!(state.issued("req-flood-0").unwrap().tenant_id, "flood");
        // A report frees room for its tenant.
        let (r, issued) = state.take("req-flood-1").unwrap();
        assert_eq!(issued.tenant_id, "flood");
        drop(r);
        assert!(state.hold(&ledger, &c, &Dims::of(&c)).is_ok());
        assert_eq!(state.pending(), MAX_PENDING_PER_TENANT + 1);
    }

    #[test]
    fn request_ids_are_restricted() {
        assert!(valid_request_id("req-0193abc.def_1"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("a b"));
        assert!(!valid_request_id(&"x".repeat(129)));
    }
}
