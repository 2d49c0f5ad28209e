//! The control plane for edge proxies: the Envoy (proxy-wasm) builds of the policies evaluate
//! requests inside Envoy, and ask llmscope for what only the host knows.
//!
//! 1. `POST /v1/edge/context` — before evaluating, a filter sends the request's attribution
//!    headers and JSON body plus the aggregates its rule declared. The host parses the body with
//!    the same parsers as `/infer` and `/v1/chat/completions`, prices every tier of the route with
//!    its tokenizer, reserves the estimate in the in-flight ledger (once per request, however many
//!    filters ask) and answers with the priced [`RequestContext`], the rule's [`Snapshot`] and the
//!    upstream model name of every tier (for rewriting `model` on a downgrade). Aggregates the
//!    host's own rules do not declare are registered and computed before the answer, then kept
//!    fresh by every refresh.
//! 2. `POST /v1/edge/report` — after the response (or a denial), the first filter of the chain
//!    reports what happened: the rules' outcomes, the HTTP status, the upstream's token usage and
//!    latency. The host settles the reservation at the actual cost and appends the telemetry and
//!    decision lines, exactly as if it had served the request itself. Reports are idempotent per
//!    request id, so a filter may retry one whose answer it did not see.
//!
//! Reservations whose report never arrives (the proxy died) are released after
//! [`EDGE_RESERVATION_TTL`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use llmscope_sdk::edge::Attribution;
/// The edge wire bodies, defined once in the SDK: the filters serialize them, the host reads
/// them strictly.
pub use llmscope_sdk::edge::{ContextAnswer, ContextRequest, Report, Usage};
use llmscope_sdk::types::{Aggregate, RequestContext};
use parking_lot::{Mutex, RwLock};
use serde_json::{Map, Value};

use crate::artifacts::{rfc3339, DecisionRecord, TelemetryRecord};
use crate::engine::SpecKey;
use crate::gateway::{Gateway, Inference, PricedRequest};
use crate::ledger::{Dims, Reservation, Sums};
use crate::policy::{Combination, DecisionKind};
use crate::pricing;
use crate::requests::{parse_chat, parse_infer};
use crate::snapshots::LiveSnapshots;

pub use super::error::EdgeError;

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

/// Identity fields of a `/infer` body and of chat `metadata`, ignored under
/// [`Attribution::Headers`] (route and tier stay: they choose the request, not who pays).
const IDENTITY_FIELDS: [&str; 5] = [
    "tenant_id",
    "caller_id",
    "feature_id",
    "experiment_id",
    "budget_namespace",
];

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

    /// Mark `id` reported; false if it already was.
    fn first_report(&self, id: &str) -> bool {
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

fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Gateway {
    /// Parse an edge request's body into an [`Inference`]: a chat body when it has `messages`,
    /// else a `/infer` body.
    fn edge_inference(&self, call: &ContextRequest) -> Result<Inference, EdgeError> {
        let empty = Map::new();
        let obj = call.body.as_object().unwrap_or(&empty);
        if !call.body.is_object() {
            return Err(EdgeError::InvalidInfer(vec![
                serde_json::json!({"field": "(body)", "message": "must be a JSON object"}),
            ]));
        }
        let header = |name: &str| {
            call.headers
                .get(name)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let mut stripped;
        let obj = if call.attribution == Attribution::Headers {
            stripped = obj.clone();
            if let Some(Value::Object(meta)) = stripped.get_mut("metadata") {
                meta.retain(|k, _| !IDENTITY_FIELDS.contains(&k.as_str()));
            }
            if !stripped.contains_key("messages") {
                stripped.retain(|k, _| !IDENTITY_FIELDS.contains(&k.as_str()));
            }
            &stripped
        } else {
            obj
        };
        if obj.contains_key("messages") {
            parse_chat(obj, &header, self.config()).map_err(EdgeError::InvalidChat)
        } else {
            parse_infer(obj, &header, self.config()).map_err(EdgeError::InvalidInfer)
        }
    }

    /// Price a call's request: the context the host's own rules would see, and the upstream
    /// model name of every tier of its route.
    fn price_call(
        &self,
        call: &ContextRequest,
        request_id: String,
    ) -> Result<(RequestContext, BTreeMap<String, String>), EdgeError> {
        let inf = self.edge_inference(call)?;
        let cfg = self.config();
        let PricedRequest { ctx, route, .. } =
            self.price_request(&inf, &self.policies(), request_id)?;
        let tier_models = route
            .tiers
            .iter()
            .map(|(tier, model)| {
                let upstream = cfg
                    .models
                    .get(model)
                    .and_then(|m| m.provider_model.clone())
                    .unwrap_or_else(|| model.clone());
                (tier.clone(), upstream)
            })
            .collect();
        Ok((ctx, tier_models))
    }

    /// Answer a filter's context call (see the module docs). Register the call's aggregates
    /// with [`EdgeState::register`] and refresh first when any is new.
    pub fn edge_context(&self, call: &ContextRequest) -> Result<ContextAnswer, EdgeError> {
        if let Some(id) = &call.request_id {
            if !valid_request_id(id) {
                return Err(EdgeError::BadCall {
                    field: "request_id",
                    message: "must be 1-128 characters of [A-Za-z0-9._-]".into(),
                });
            }
        }
        let request_id = call
            .request_id
            .clone()
            .unwrap_or_else(|| format!("req-{}", uuid::Uuid::now_v7().simple()));
        let (ctx, tier_models) = self.price_call(call, request_id.clone())?;
        let (estimate, tokens_in, tokens_out) = (
            ctx.estimated_cost_usd,
            ctx.estimated_tokens_in,
            ctx.estimated_tokens_out,
        );
        let dims = Dims::of(&ctx);
        let own = {
            let mut entries = self.edge.entries.lock();
            if entries.len() >= MAX_PENDING && !entries.contains_key(&request_id) {
                return Err(EdgeError::Overloaded(entries.len()));
            }
            let entry = entries.entry(request_id).or_insert_with(|| Entry {
                reservation: self.ledger().reserve(
                    dims.clone(),
                    ctx.unix_time_ms,
                    estimate,
                    tokens_in,
                    tokens_out,
                ),
                created: Instant::now(),
            });
            // A later filter of the chain sees the tier an earlier one downgraded to.
            if *entry.reservation.dims() != dims {
                entry
                    .reservation
                    .update(dims.clone(), estimate, tokens_in, tokens_out);
            }
            entry.reservation.amount()
        };
        let snapshot = {
            let _view = self.view();
            let store = self.store();
            let source = LiveSnapshots {
                store: store.as_ref(),
                ledger: self.ledger(),
                own: Some((&dims, own)),
            };
            source.values(&call.aggregates, &ctx)
        };
        Ok(ContextAnswer {
            request: ctx,
            snapshot,
            tier_models,
        })
    }

    /// Record a filter's report: settle the reservation, append telemetry and decision lines.
    /// Returns false when the request id was already reported (nothing written again).
    pub async fn edge_report(&self, report: &Report) -> Result<bool, EdgeError> {
        let priced;
        let ctx = match (&report.request, &report.original) {
            (Some(ctx), _) => ctx,
            (None, Some(call)) => {
                let id = call
                    .request_id
                    .clone()
                    .unwrap_or_else(|| format!("req-{}", uuid::Uuid::now_v7().simple()));
                priced = self.price_call(call, id)?.0;
                &priced
            }
            (None, None) => {
                return Err(EdgeError::BadCall {
                    field: "request",
                    message: "send the context the filter received, or `original` when it got none"
                        .into(),
                })
            }
        };
        if !valid_request_id(&ctx.request_id) {
            return Err(EdgeError::BadCall {
                field: "request.request_id",
                message: "must be 1-128 characters of [A-Za-z0-9._-]".into(),
            });
        }
        let cfg = self.config();
        let route = cfg
            .routes
            .get(&ctx.route_name)
            .ok_or_else(|| self.unknown_route(&ctx.route_name))?;
        let Some(model_name) = route.tiers.get(&report.effective_tier) else {
            return Err(EdgeError::BadCall {
                field: "effective_tier",
                message: format!(
                    "route {} has no tier `{}`; tiers: {}",
                    ctx.route_name,
                    report.effective_tier,
                    route.tiers.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        };
        if !self.edge.first_report(&ctx.request_id) {
            return Ok(false);
        }
        let reservation = self
            .edge
            .entries
            .lock()
            .remove(&ctx.request_id)
            .map(|e| e.reservation);

        // A downgrade counts only if the request really went out at another tier.
        let (decision, deciding) = match Combination::Applied
            .deciding(&report.rules)
            .map(|i| &report.rules[i])
        {
            Some(d) if d.decision == DecisionKind::Deny => (DecisionKind::Deny, Some(d)),
            Some(d) if report.effective_tier != ctx.requested_tier => {
                (DecisionKind::Downgrade, Some(d))
            }
            _ => (DecisionKind::Allow, None),
        };
        let reason = deciding
            .and_then(|r| r.reason.clone())
            .or_else(|| report.host_error.clone());
        let alerts: Vec<String> = report
            .rules
            .iter()
            .filter_map(|r| r.alert.as_ref().map(|a| format!("{}: {a}", r.rule_id)))
            .collect();
        let fact = |name: &str| {
            deciding
                .and_then(|r| r.facts.get(name))
                .or_else(|| report.rules.iter().find_map(|r| r.facts.get(name)))
                .copied()
        };
        let model_cfg = cfg.models.get(model_name);
        let effective_estimate = ctx
            .tier(&report.effective_tier)
            .map_or(ctx.estimated_cost_usd, |t| t.estimated_cost_usd);
        let mut telemetry = TelemetryRecord {
            model_tier: report.effective_tier.clone(),
            provider: model_cfg.map(|m| m.provider.clone()).unwrap_or_default(),
            model: model_name.clone(),
            estimated_cost_usd: effective_estimate,
            latency_ms: report.latency_ms,
            policy_decision: decision.as_str().into(),
            policy_id: deciding.map(|r| r.rule_id.clone()),
            finish_reason: report.finish_reason.clone(),
            ..TelemetryRecord::for_request(ctx)
        };
        let served = !report.local_reply && (200..300).contains(&report.status);
        let mut actual = None;
        if decision == DecisionKind::Deny || (report.local_reply && !served) {
            telemetry.estimated_cost_usd = ctx.estimated_cost_usd;
            telemetry.model_tier = ctx.requested_tier.clone();
            telemetry.model = ctx.model.clone();
            telemetry.tokens_in = u64::from(ctx.estimated_tokens_in);
            telemetry.tokens_total = telemetry.tokens_in;
            telemetry.status = "denied".into();
            telemetry.cost_source = "none".into();
            if decision != DecisionKind::Deny {
                telemetry.error_type = Some("policy_host_unavailable".into());
            }
        } else if served {
            let (tokens_in, tokens_out, source) = match report.usage {
                Some(u) => (u.tokens_in, u.tokens_out, "provider_usage"),
                None => (
                    ctx.estimated_tokens_in,
                    ctx.estimated_tokens_out,
                    "tokenizer",
                ),
            };
            let cost = model_cfg.map_or(0.0, |m| pricing::cost_usd(m, tokens_in, tokens_out));
            telemetry.tokens_in = u64::from(tokens_in);
            telemetry.tokens_out = u64::from(tokens_out);
            telemetry.tokens_total = u64::from(tokens_in) + u64::from(tokens_out);
            telemetry.cost_usd = cost;
            telemetry.cost_source = source.into();
            telemetry.status = "ok".into();
            actual = Some(Sums {
                cost_usd: cost,
                tokens_in: f64::from(tokens_in),
                tokens_out: f64::from(tokens_out),
                requests: 1.0,
            });
        } else {
            telemetry.status = "error".into();
            telemetry.cost_source = "none".into();
            telemetry.error_type = Some(format!("upstream_http_{}", report.status));
        }
        let eval_ms: f64 = report.rules.iter().map(|r| r.eval_us).sum::<f64>() / 1e3;
        let record = DecisionRecord {
            timestamp: rfc3339(ctx.unix_time_ms),
            request_id: ctx.request_id.clone(),
            tenant_id: ctx.tenant_id.clone(),
            caller_id: ctx.caller_id.clone(),
            feature_id: ctx.feature_id.clone(),
            experiment_id: ctx.experiment_id.clone(),
            budget_namespace: Some(ctx.budget_namespace.clone()),
            route_name: ctx.route_name.clone(),
            requested_model_tier: ctx.requested_tier.clone(),
            effective_model_tier: telemetry.model_tier.clone(),
            primitive: deciding.map(|r| r.primitive.clone()),
            decision: decision.as_str().into(),
            reason,
            policy_id: deciding.map(|r| r.rule_id.clone()),
            estimated_cost_usd: ctx.estimated_cost_usd,
            latency_ms: (eval_ms * 1000.0).round() / 1000.0,
            window_cost_usd: fact("window_cost_usd"),
            window_limit_usd: fact("window_limit_usd"),
            policy_version: "edge".into(),
            reservation: None,
            alerts: &alerts,
            rules: &report.rules,
        };
        self.metrics().request(
            &ctx.route_name,
            if telemetry.status == "error" {
                "error"
            } else {
                decision.as_str()
            },
            telemetry.estimated_cost_usd,
            telemetry.cost_usd,
        );
        let written = self.writer().append(&telemetry, Some(&record)).await;
        match (reservation, actual) {
            (Some(r), Some(actual)) => {
                r.settle(actual, written.as_ref().ok().and_then(|w| w.telemetry));
            }
            (None, Some(actual)) => {
                // The reservation expired or the host restarted: the spend still counts.
                let dims = Dims::of(ctx);
                let mut moved = dims;
                moved.model = model_name.clone();
                let r = self.ledger().reserve(moved, ctx.unix_time_ms, 0.0, 0, 0);
                r.settle(actual, written.as_ref().ok().and_then(|w| w.telemetry));
            }
            (r, None) => drop(r),
        }
        written.map_err(EdgeError::Unlogged)?;
        Ok(true)
    }
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
