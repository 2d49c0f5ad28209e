//! The edge bookkeeping the gateway holds, below it: reservations waiting for their reports,
//! the aggregates edge rules registered, and the request ids already reported. Nothing here
//! reads the gateway, so its refresh can register and expire without a cycle.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use llmscope_sdk::types::{Aggregate, RequestContext};
use parking_lot::{Mutex, RwLock};

use crate::engine::SpecKey;
use crate::ledger::{Dims, Ledger, Reservation, Sums};

use crate::gateway::error::EdgeError;

/// How long a reservation made for an edge request waits for its report.
pub const EDGE_RESERVATION_TTL: Duration = Duration::from_secs(600);
/// Most aggregates one context call may declare.
pub const MAX_AGGREGATES_PER_CALL: usize = 32;
/// Most distinct aggregates edge rules may register (beyond the host's own).
pub const MAX_EDGE_AGGREGATES: usize = 256;
/// Most reservations waiting for a report; beyond it context calls are refused (503), so a
/// flood of context calls cannot grow memory or hold budgets without bound.
pub const MAX_PENDING: usize = 100_000;
/// How many reported request ids are remembered to make reports idempotent.
const REPORTED_MEMORY: usize = 16_384;

struct Entry {
    reservation: Reservation,
    created: Instant,
}

/// Edge bookkeeping inside the gateway.
#[derive(Default)]
pub struct EdgeState {
    entries: Mutex<HashMap<String, Entry>>,
    aggregates: RwLock<Vec<Aggregate>>,
    keys: Mutex<HashSet<SpecKey>>,
    reported: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl EdgeState {
    /// Aggregates registered by edge rules.
    pub fn aggregates(&self) -> Vec<Aggregate> {
        self.aggregates.read().clone()
    }

    /// Reservations waiting for a report.
    pub fn pending(&self) -> usize {
        self.entries.lock().len()
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

    /// Release reservations older than `ttl`; returns how many.
    pub fn expire(&self, ttl: Duration) -> usize {
        let mut entries = self.entries.lock();
        let before = entries.len();
        entries.retain(|_, e| e.created.elapsed() < ttl);
        before - entries.len()
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
        if entries.len() >= MAX_PENDING && !entries.contains_key(&ctx.request_id) {
            return Err(EdgeError::Overloaded(entries.len()));
        }
        let entry = entries
            .entry(ctx.request_id.clone())
            .or_insert_with(|| Entry {
                reservation: ledger.reserve(
                    dims.clone(),
                    ctx.unix_time_ms,
                    estimate,
                    tokens_in,
                    tokens_out,
                ),
                created: Instant::now(),
            });
        if entry.reservation.dims() != dims {
            entry
                .reservation
                .update(dims.clone(), estimate, tokens_in, tokens_out);
        }
        Ok(entry.reservation.amount())
    }

    /// The reservation `request_id` held, handed over to be settled (`None`: it expired, or
    /// the context call went to another process).
    pub(crate) fn take(&self, request_id: &str) -> Option<Reservation> {
        self.entries
            .lock()
            .remove(request_id)
            .map(|e| e.reservation)
    }

    /// Mark `id` reported; false if it already was.
    pub(crate) fn first_report(&self, id: &str) -> bool {
        let mut guard = self.reported.lock();
        let (set, order) = &mut *guard;
        if !set.insert(id.to_owned()) {
            return false;
        }
        order.push_back(id.to_owned());
        while order.len() > REPORTED_MEMORY {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
        true
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
    fn reports_are_idempotent_per_request_id() {
        let state = EdgeState::default();
        assert!(state.first_report("req-1"));
        assert!(!state.first_report("req-1"));
        assert!(state.first_report("req-2"));
    }

    #[test]
    fn request_ids_are_restricted() {
        assert!(valid_request_id("req-0193abc.def_1"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("a b"));
        assert!(!valid_request_id(&"x".repeat(129)));
    }
}
