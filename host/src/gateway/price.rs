//! Pricing a request before evaluation: its route and the model its tier maps to, every tier
//! priced (input tokens corrected by what providers billed before), and the one builder of the
//! [`RequestContext`] the rules see, shared by requests and `/v1/snapshot`.

use llmscope_sdk::types::RequestContext;

use crate::config::RouteConfig;
use crate::policy::PolicySet;
use crate::pricing;
use crate::requests::Call;

use super::{now_ms, Gateway, GatewayError, Inference, SnapshotQuery};

/// A request priced for evaluation (see [`Gateway::price_request`]).
pub(crate) struct PricedRequest<'a> {
    /// The context the rules see.
    pub ctx: RequestContext,
    /// Its route.
    pub route: &'a RouteConfig,
    /// The pricing, kept to re-price a downgrade.
    pub priced: pricing::Priced,
    /// What the body forwards to the provider, shared by every attempt.
    pub forwarded: std::sync::Arc<crate::providers::Forwarded>,
    /// What its input tokens are counted from.
    pub prompt: pricing::Prompt,
}

/// Who a request is for and what it asks for, borrowed from an [`Inference`] or a
/// [`SnapshotQuery`]: the caller's part of a [`RequestContext`].
struct Attributes<'a> {
    tenant_id: &'a String,
    caller_id: &'a Option<String>,
    feature_id: &'a Option<String>,
    experiment_id: &'a Option<String>,
    budget_namespace: Option<&'a str>,
    route_name: &'a String,
    model_tier: &'a String,
}

impl<'a> From<&'a Inference> for Attributes<'a> {
    fn from(inf: &'a Inference) -> Self {
        Self {
            tenant_id: &inf.tenant_id,
            caller_id: &inf.caller_id,
            feature_id: &inf.feature_id,
            experiment_id: &inf.experiment_id,
            budget_namespace: inf.budget_namespace.as_deref(),
            route_name: &inf.route_name,
            model_tier: &inf.model_tier,
        }
    }
}

impl<'a> From<&'a SnapshotQuery> for Attributes<'a> {
    fn from(q: &'a SnapshotQuery) -> Self {
        Self {
            tenant_id: &q.tenant_id,
            caller_id: &q.caller_id,
            feature_id: &q.feature_id,
            experiment_id: &q.experiment_id,
            budget_namespace: q.budget_namespace.as_deref(),
            route_name: &q.route_name,
            model_tier: &q.model_tier,
        }
    }
}

/// The context the rules see for `asked`, sent to `model` with `tokens_in` input tokens and
/// priced `priced`, its namespace resolved in `policies`, stamped now.
fn context(
    asked: Attributes<'_>,
    policies: &PolicySet,
    request_id: String,
    model: &str,
    tokens_in: u32,
    priced: &pricing::Priced,
) -> RequestContext {
    RequestContext {
        request_id,
        tenant_id: asked.tenant_id.clone(),
        caller_id: asked.caller_id.clone(),
        feature_id: asked.feature_id.clone(),
        experiment_id: asked.experiment_id.clone(),
        budget_namespace: policies.namespace_name(asked.budget_namespace),
        route_name: asked.route_name.clone(),
        requested_tier: asked.model_tier.clone(),
        model: model.to_owned(),
        estimated_tokens_in: tokens_in,
        estimated_tokens_out: priced.tokens_out,
        estimated_cost_usd: priced
            .tier(asked.model_tier)
            .map_or(0.0, |t| t.estimated_cost_usd),
        tiers: priced.tiers.clone(),
        unix_time_ms: now_ms(),
    }
}

impl Gateway {
    /// The route `route` and the model its tier `tier` maps to, or the error naming what is
    /// configured instead.
    pub(crate) fn route_model(
        &self,
        route: &str,
        tier: &str,
    ) -> Result<(&RouteConfig, &String), GatewayError> {
        let cfg = &self.config;
        let r = cfg
            .routes
            .get(route)
            .ok_or_else(|| self.unknown_route(route))?;
        let model = r.tiers.get(tier).ok_or_else(|| GatewayError::UnknownTier {
            route: route.to_owned(),
            tier: tier.to_owned(),
            known: r.tiers.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        Ok((r, model))
    }

    /// The 422 for a chat body forwarding a parameter the provider of the model its tier
    /// maps to cannot honour (e.g. `n` on Anthropic), naming the parameter and the provider;
    /// `None` when it honours them all or the route or tier is unknown (pricing names those).
    pub fn refused_parameter(&self, inf: &Inference) -> Option<crate::requests::ChatError> {
        let (_, model) = self.route_model(&inf.route_name, &inf.model_tier).ok()?;
        let provider_name = &self.config.models.get(model)?.provider;
        let (param, why) = self.providers.get(provider_name)?.refuses(&inf.forwarded)?;
        Some(crate::requests::ChatError {
            status: 422,
            message: format!(
                "{param}: {why}; model {model} (tier {}) is served by provider {provider_name}, which cannot honour it: remove it or ask for a tier served by an OpenAI-compatible provider",
                inf.model_tier
            ),
            code: "unsupported_parameter",
            param: Some(param),
        })
    }

    /// The error for a route that is not configured.
    pub(crate) fn unknown_route(&self, route: &str) -> GatewayError {
        GatewayError::UnknownRoute {
            route: route.to_owned(),
            known: self.config.routes.keys().cloned().collect(),
        }
    }

    /// Price `inf` for evaluation: its route, every tier priced (input tokens counted with the
    /// requested model's tokenizer; embeddings at their input tokens alone), the namespace it
    /// resolves to in `policies`, stamped now. Embeddings for a model whose provider has no
    /// embeddings API are refused here, before anything is reserved.
    pub(crate) fn price_request(
        &self,
        inf: &Inference,
        policies: &PolicySet,
        request_id: String,
    ) -> Result<PricedRequest<'_>, GatewayError> {
        let cfg = &self.config;
        let (route, model) = self.route_model(&inf.route_name, &inf.model_tier)?;
        let fwd = &inf.forwarded;
        let prompt = match &inf.call {
            Call::Completion => {
                let mut pairs: Vec<(String, String)> = inf
                    .messages
                    .iter()
                    .map(|m| (m.role.clone(), m.content.clone()))
                    .collect();
                if !fwd.priced_text.is_empty() {
                    // Tool definitions and schemas are input the provider counts, priced as
                    // one more message (its overhead makes the estimate err high, never low).
                    pairs.push(("tools".to_owned(), fwd.priced_text.clone()));
                }
                pricing::Prompt::Chat(pairs)
            }
            Call::Embeddings(e) => {
                self.check_embeds(model)?;
                pricing::Prompt::Embedding {
                    texts: e.input.texts().into_iter().map(str::to_owned).collect(),
                    pretokenized: e.input.pretokenized(),
                }
            }
        };
        let output = pricing::Output {
            max_tokens: inf.max_tokens,
            choices: fwd.choices(),
        };
        let extra = pricing::ExtraInput {
            images: fwd.images.clone(),
            tools: fwd.has_tools(),
        };
        let mut priced = pricing::price(cfg, &inf.route_name, &prompt, output, extra)
            .ok_or_else(|| self.unknown_route(&inf.route_name))?;
        self.calibrate(&mut priced, &prompt);
        let tokens_in = self.tokens_in_estimate(&mut priced, model, &prompt);
        let ctx = context(inf.into(), policies, request_id, model, tokens_in, &priced);
        Ok(PricedRequest {
            ctx,
            route,
            priced,
            forwarded: std::sync::Arc::new(inf.forwarded.clone()),
            prompt,
        })
    }

    /// 422 unless `model`'s provider has an embeddings API.
    fn check_embeds(&self, model: &str) -> Result<(), GatewayError> {
        let provider = super::records::provider_of(&self.config, model);
        match self.providers.get(&provider) {
            Some(p) if !p.embeds() => Err(GatewayError::EmbeddingsUnsupported {
                model: model.to_owned(),
                provider,
                kind: p.kind(),
            }),
            _ => Ok(()),
        }
    }

    /// The context of a `/v1/snapshot` query: priced at the caller's own input-token count
    /// (no calibration), with a `snap-` request id.
    pub(crate) fn price_query(
        &self,
        q: &SnapshotQuery,
        policies: &PolicySet,
    ) -> Result<RequestContext, GatewayError> {
        let (_, model) = self.route_model(&q.route_name, &q.model_tier)?;
        let priced = pricing::price_tokens(&self.config, &q.route_name, q.tokens_in, q.max_tokens)
            .ok_or_else(|| self.unknown_route(&q.route_name))?;
        let request_id = format!("snap-{}", uuid::Uuid::now_v7().simple());
        Ok(context(
            q.into(),
            policies,
            request_id,
            model,
            q.tokens_in,
            &priced,
        ))
    }

    /// Input tokens `model` is expected to bill for `prompt`: the BPE count, corrected by what
    /// its provider billed before ([`pricing::Calibration`]).
    pub(crate) fn tokens_in_estimate(
        &self,
        priced: &mut pricing::Priced,
        model: &str,
        prompt: &pricing::Prompt,
    ) -> u32 {
        let counted = priced.tokens_in(&self.config, model, prompt);
        self.calibration.scale(model, counted)
    }

    /// Re-price every tier at its corrected input tokens (a no-op while no provider has
    /// billed more than was counted).
    fn calibrate(&self, priced: &mut pricing::Priced, prompt: &pricing::Prompt) {
        let models: Vec<String> = priced.tiers.iter().map(|t| t.model.clone()).collect();
        if models.iter().all(|m| self.calibration.factor(m) <= 1.0) {
            return;
        }
        for (i, model) in models.iter().enumerate() {
            let tokens_in = self.tokens_in_estimate(priced, model, prompt);
            if let (Some(cfg), Some(t)) = (self.config.models.get(model), priced.tiers.get_mut(i)) {
                t.estimated_cost_usd = pricing::cost_usd(cfg, tokens_in, priced.tokens_out);
            }
        }
        priced
            .tiers
            .sort_by(|a, b| a.estimated_cost_usd.total_cmp(&b.estimated_cost_usd));
    }

    /// Learn from a provider's usage: it billed `billed` input tokens where `counted` were
    /// counted for `model`.
    pub(crate) fn observe_usage(&self, model: &str, billed: u32, counted: u32) {
        self.calibration.observe(model, billed, counted);
    }
}
