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
//! Requests whose report never arrives (the proxy died) are recorded at their estimate after
//! [`EDGE_RESERVATION_TTL`] (`expiry.rs`). The bookkeeping is in `state.rs` (below the
//! gateway: it imports none of it), recording a report in `report.rs`.

use std::collections::BTreeMap;

use llmscope_sdk::edge::Attribution;
/// The edge wire bodies, defined once in the SDK: the filters serialize them, the host reads
/// them strictly.
pub use llmscope_sdk::edge::{ContextAnswer, ContextRequest, Report, Usage};
use llmscope_sdk::types::RequestContext;
use serde_json::{Map, Value};

use crate::config::ApiKey;
use crate::gateway::{Gateway, Inference, PricedRequest};
use crate::ledger::Dims;
use crate::requests::{parse_chat, parse_infer};
use crate::snapshots::LiveSnapshots;

pub use super::error::EdgeError;
pub use state::{
    EdgeState, EDGE_RESERVATION_TTL, MAX_AGGREGATES_PER_CALL, MAX_EDGE_AGGREGATES, MAX_PENDING,
    MAX_PENDING_PER_TENANT,
};

mod expiry;
mod report;
pub(super) mod state;

use state::valid_request_id;

/// Identity fields of a `/infer` body and of chat `metadata`, ignored under
/// [`Attribution::Headers`] (route and tier stay: they choose the request, not who pays).
const IDENTITY_FIELDS: [&str; 5] = [
    "tenant_id",
    "caller_id",
    "feature_id",
    "experiment_id",
    "budget_namespace",
];

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
        } else if let Some(problems) = unpriced_infer_fields(obj) {
            Err(EdgeError::InvalidInfer(problems))
        } else {
            parse_infer(obj, &header, self.config()).map_err(EdgeError::InvalidInfer)
        }
    }

    /// Price a call's request: the context the host's own rules would see, and the upstream
    /// model name of every tier of its route.
    /// `before_dispatch`: a context call (the prompt cap applies), not a report.
    fn price_call(
        &self,
        call: &ContextRequest,
        request_id: String,
        before_dispatch: bool,
    ) -> Result<(RequestContext, BTreeMap<String, String>), EdgeError> {
        let inf = self.edge_inference(call)?;
        let cfg = self.config();
        // The same cap as the gateway's own requests (tokenizing is the costly part), before
        // dispatch only: a report of a request already billed is priced whatever its size.
        let size: usize = inf.messages.iter().map(|m| m.content.len()).sum();
        if before_dispatch && size > cfg.max_prompt_bytes {
            return Err(EdgeError::PromptTooLarge {
                size,
                limit: cfg.max_prompt_bytes,
                chat: call.body.get("messages").is_some(),
            });
        }
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
    /// `key`: the edge key the call came with (`None`: authentication is off); the request's
    /// tenant must be one of its tenants.
    ///
    /// With the redis backend the reservation is written and the replicas' sums read in one
    /// round trip; when Redis does not answer, the snapshot holds this replica's own sums (the
    /// filter cannot be told a rule failed).
    pub async fn edge_context(
        &self,
        call: &ContextRequest,
        key: Option<&ApiKey>,
    ) -> Result<ContextAnswer, EdgeError> {
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
        let (ctx, tier_models) = self.price_call(call, request_id, true)?;
        may_act_for(key, &ctx.tenant_id)?;
        let dims = Dims::of(&ctx);
        let own = self.edge.hold(self.ledger(), &ctx, &dims)?;
        let shared = match self.shared() {
            Some(s) => {
                let writes = s.keys_of(&dims, ctx.unix_time_ms);
                let mut reads: Vec<String> = call
                    .aggregates
                    .iter()
                    .flat_map(|a| s.keys_for(a, &ctx))
                    .collect();
                reads.sort();
                reads.dedup();
                match s.exchange(&writes, &reads).await {
                    Ok(read) => Some(Ok(read)),
                    Err(why) => {
                        // Not held: the filter refuses or lets the request through by its own
                        // failure mode, and reports nothing for this context.
                        drop(self.edge.take(&ctx.request_id));
                        return Err(EdgeError::SharedUnavailable(why));
                    }
                }
            }
            None => None,
        };
        let snapshot = {
            let _view = self.view();
            let store = self.store();
            let source = LiveSnapshots {
                store: store.as_ref(),
                ledger: self.ledger(),
                own: Some((&dims, own)),
                shared: self.shared().zip(shared.as_ref()),
            };
            source.values(&call.aggregates, &ctx)
        };
        Ok(ContextAnswer {
            request: ctx,
            snapshot,
            tier_models,
        })
    }
}

/// Refuse a request of a tenant the edge key does not list.
fn may_act_for(key: Option<&ApiKey>, tenant: &str) -> Result<(), EdgeError> {
    match key {
        Some(k) if !k.allows(tenant) => Err(EdgeError::TenantForbidden {
            tenant: tenant.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// Fields of a body without `messages` (priced as `/infer`: a prompt at a tier) that would
/// make the upstream bill something else than what is priced: a model of the client's choice
/// (e.g. a legacy `/v1/completions` body), or several completions. `None` when there is none.
fn unpriced_infer_fields(obj: &Map<String, Value>) -> Option<Vec<Value>> {
    let mut problems = Vec::new();
    if obj.contains_key("model") {
        problems.push(serde_json::json!({"field": "model", "message": "a body without `messages` is priced as /infer, at a tier (`model_tier`), so it cannot name a model; send chat completions (`messages`) to name one"}));
    }
    for field in ["n", "best_of"] {
        if obj.get(field).is_some_and(|v| v.as_u64() != Some(1)) {
            problems.push(serde_json::json!({"field": field, "message": "only one completion per request is priced; leave it out or set it to 1"}));
        }
    }
    (!problems.is_empty()).then_some(problems)
}
