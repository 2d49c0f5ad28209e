//! The telemetry and decision lines of one request, built as its lifecycle goes: the decision
//! once evaluated (written ahead of dispatch), the telemetry once settled. The one builder of
//! both lines for every request the gateway records: the ones it serves (`/infer`, chat) and
//! the ones an edge proxy reports ([`Records::reported`]).

use llmscope_sdk::types::RequestContext;

use crate::artifacts::{rfc3339, DecisionRecord, PolicyInput, ReservationRecord, TelemetryRecord};
use crate::config::GatewayConfig;
use crate::policy::{DecisionKind, Evaluation, PolicySet, RuleOutcome};

/// A telemetry line's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The provider answered and the client received it.
    Ok,
    /// Refused by policy; never dispatched.
    Denied,
    /// Every attempt failed.
    Error,
    /// The client left before the answer; recorded at what the provider billed, if it answered.
    Cancelled,
    /// Dispatched by a process that died before recording it; counted at its estimate.
    Unanswered,
}

impl Status {
    /// The name in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Denied => "denied",
            Self::Error => "error",
            Self::Cancelled => "cancelled",
            Self::Unanswered => "unanswered",
        }
    }
}

/// A telemetry line's `cost_source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostSource {
    /// The provider's reported usage.
    ProviderUsage,
    /// The provider reported no usage: our token counts.
    Tokenizer,
    /// Nothing to count from: the estimate (timed-out attempts, a crash).
    Estimate,
    /// Nothing was spent.
    None,
}

impl CostSource {
    /// The name in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ProviderUsage => "provider_usage",
            Self::Tokenizer => "tokenizer",
            Self::Estimate => "estimate",
            Self::None => "none",
        }
    }
}

/// The provider serving `model` (empty when not configured).
pub(super) fn provider_of(config: &GatewayConfig, model: &str) -> String {
    config
        .models
        .get(model)
        .map(|m| m.provider.clone())
        .unwrap_or_default()
}

/// What a dispatch to `model` holds, as its decision line writes it ahead.
pub(super) fn reservation_record(
    config: &GatewayConfig,
    model: &str,
    cost_usd: f64,
    tokens_in: u32,
    tokens_out: u32,
) -> ReservationRecord {
    ReservationRecord {
        provider: provider_of(config, model),
        model: model.to_owned(),
        cost_usd,
        tokens_in: u64::from(tokens_in),
        tokens_out: u64::from(tokens_out),
    }
}

/// What a decision line says of the verdict, borrowed from where it was reached: the host's
/// [`Evaluation`], or the rule outcomes an edge proxy reported.
pub struct Verdict<'e> {
    /// `allow`, `downgrade`, `deny`.
    pub decision: DecisionKind,
    /// Deciding rule.
    pub policy_id: Option<String>,
    /// Its primitive.
    pub primitive: Option<String>,
    /// Its reason.
    pub reason: Option<String>,
    /// Window spend reported by a budget rule.
    pub window_cost_usd: Option<f64>,
    /// Window limit reported by a budget rule.
    pub window_limit_usd: Option<f64>,
    /// Every alert raised.
    pub alerts: &'e [String],
    /// Every rule's outcome.
    pub rules: &'e [RuleOutcome],
}

impl<'e> From<&'e Evaluation> for Verdict<'e> {
    fn from(evaluation: &'e Evaluation) -> Self {
        Self {
            decision: evaluation.decision,
            policy_id: evaluation.policy_id.clone(),
            primitive: evaluation.primitive.clone(),
            reason: evaluation.reason.clone(),
            window_cost_usd: evaluation.fact("window_cost_usd"),
            window_limit_usd: evaluation.fact("window_limit_usd"),
            alerts: &evaluation.alerts,
            rules: &evaluation.rules,
        }
    }
}

/// Where an edge proxy sent a request, and what of its upstream's answer it reported.
pub struct Upstream<'a> {
    /// Tier dispatched at (after downgrades).
    pub tier: &'a str,
    /// Model of that tier.
    pub model: &'a str,
    /// Its provider (empty when not configured).
    pub provider: String,
    /// Estimate at that tier.
    pub estimate: f64,
    /// Time from dispatch to the end of the upstream response, ms.
    pub latency_ms: f64,
    /// The response's finish reason.
    pub finish_reason: Option<String>,
}

/// `ms` rounded to the µs, as decision lines give policy latency.
fn round_to_us(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

/// The decision's fields that do not borrow the verdict.
struct DecisionFields {
    timestamp: String,
    budget_namespace: Option<String>,
    effective_model_tier: String,
    latency_ms: f64,
    policy_version: String,
    reservation: Option<ReservationRecord>,
    policy_input: PolicyInput,
}

/// One request's two lines.
pub struct Records {
    /// The telemetry line, filled in stage by stage.
    pub telemetry: TelemetryRecord,
    ctx: RequestContext,
    decision: DecisionFields,
}

impl Records {
    /// The lines of `ctx` as evaluated: attribution, estimates and the verdict.
    pub fn new(
        ctx: &RequestContext,
        evaluation: &Evaluation,
        policies: &PolicySet,
        policy_ms: f64,
        config: &GatewayConfig,
    ) -> Self {
        let effective_tier = match &evaluation.downgrade_to {
            Some(tier) if evaluation.decision == DecisionKind::Downgrade => tier.clone(),
            _ => ctx.requested_tier.clone(),
        };
        let telemetry = TelemetryRecord {
            model_tier: effective_tier.clone(),
            provider: provider_of(config, &ctx.model),
            policy_decision: evaluation.decision.as_str().into(),
            policy_id: evaluation.policy_id.clone(),
            ..TelemetryRecord::for_request(ctx)
        };
        Self {
            telemetry,
            ctx: ctx.clone(),
            decision: DecisionFields {
                timestamp: rfc3339(ctx.unix_time_ms),
                budget_namespace: evaluation.namespace.clone(),
                effective_model_tier: effective_tier,
                latency_ms: round_to_us(policy_ms),
                policy_version: policies.version().to_owned(),
                reservation: None,
                policy_input: PolicyInput::of(ctx),
            },
        }
    }

    /// The lines of a request an edge proxy reports: evaluated by its filters (`verdict`,
    /// taking `eval_ms`) and sent `upstream`. Recorded under policy version `edge`, in the
    /// namespace the context resolved.
    pub fn reported(
        ctx: &RequestContext,
        verdict: &Verdict<'_>,
        upstream: Upstream<'_>,
        eval_ms: f64,
    ) -> Self {
        let telemetry = TelemetryRecord {
            model_tier: upstream.tier.to_owned(),
            provider: upstream.provider,
            model: upstream.model.to_owned(),
            estimated_cost_usd: upstream.estimate,
            latency_ms: upstream.latency_ms,
            policy_decision: verdict.decision.as_str().into(),
            policy_id: verdict.policy_id.clone(),
            finish_reason: upstream.finish_reason,
            ..TelemetryRecord::for_request(ctx)
        };
        Self {
            telemetry,
            ctx: ctx.clone(),
            decision: DecisionFields {
                timestamp: rfc3339(ctx.unix_time_ms),
                budget_namespace: Some(ctx.budget_namespace.clone()),
                effective_model_tier: upstream.tier.to_owned(),
                latency_ms: round_to_us(eval_ms),
                policy_version: "edge".into(),
                reservation: None,
                policy_input: PolicyInput::of(ctx),
            },
        }
    }

    /// The decision line, borrowing the verdict's alerts and rule outcomes.
    pub fn decision<'e>(&self, verdict: impl Into<Verdict<'e>>) -> DecisionRecord<'e> {
        let verdict = verdict.into();
        let ctx = &self.ctx;
        DecisionRecord {
            timestamp: self.decision.timestamp.clone(),
            request_id: ctx.request_id.clone(),
            tenant_id: ctx.tenant_id.clone(),
            caller_id: ctx.caller_id.clone(),
            feature_id: ctx.feature_id.clone(),
            experiment_id: ctx.experiment_id.clone(),
            budget_namespace: self.decision.budget_namespace.clone(),
            route_name: ctx.route_name.clone(),
            requested_model_tier: ctx.requested_tier.clone(),
            effective_model_tier: self.decision.effective_model_tier.clone(),
            primitive: verdict.primitive,
            decision: verdict.decision.as_str().into(),
            reason: verdict.reason,
            policy_id: verdict.policy_id,
            estimated_cost_usd: ctx.estimated_cost_usd,
            latency_ms: self.decision.latency_ms,
            window_cost_usd: verdict.window_cost_usd,
            window_limit_usd: verdict.window_limit_usd,
            policy_version: self.decision.policy_version.clone(),
            reservation: self.decision.reservation.clone(),
            alerts: verdict.alerts,
            rules: verdict.rules,
            policy_input: Some(self.decision.policy_input.clone()),
        }
    }

    /// The line is about to be written and the reservation settled at its cost: how long the
    /// reservation was held, from the request's logged time to now (`held_ms`). Not for
    /// refusals: nothing is held past their decision.
    pub fn held(&mut self) {
        self.telemetry.held_ms = Some(super::held_ms_since(self.ctx.unix_time_ms));
    }

    /// Refused (by policy, or at the edge with no policy host): at the tier, model, estimate
    /// and input tokens asked for, nothing spent.
    pub fn denied(&mut self) {
        self.decision.effective_model_tier = self.ctx.requested_tier.clone();
        let t = &mut self.telemetry;
        t.model_tier = self.ctx.requested_tier.clone();
        t.model = self.ctx.model.clone();
        t.estimated_cost_usd = self.ctx.estimated_cost_usd;
        t.tokens_in = u64::from(self.ctx.estimated_tokens_in);
        t.tokens_total = t.tokens_in;
        t.status = Status::Denied.as_str().into();
        t.cost_source = CostSource::None.as_str().into();
    }

    /// About to be dispatched at `tier` with `reservation` (written ahead in the decision).
    pub fn dispatching(&mut self, tier: &str, reservation: ReservationRecord) {
        self.telemetry.estimated_cost_usd = reservation.cost_usd;
        self.telemetry.model_tier = tier.to_owned();
        self.decision.reservation = Some(reservation);
    }

    /// No attempt answered: `cost` is what timed-out attempts are charged.
    pub fn unanswered(&mut self, status: Status, cost: f64, model: &str) {
        let t = &mut self.telemetry;
        t.status = status.as_str().into();
        t.model = model.to_owned();
        t.cost_usd = cost;
        t.cost_source = if cost > 0.0 {
            CostSource::Estimate
        } else {
            CostSource::None
        }
        .as_str()
        .into();
    }

    /// `model` answered; `cost` includes any timed-out attempts before it.
    #[allow(
        clippy::too_many_arguments,
        reason = "one call sets every field of the answer"
    )]
    pub fn answered(
        &mut self,
        status: Status,
        source: CostSource,
        provider: &str,
        model: &str,
        tokens_in: u32,
        tokens_out: u32,
        cost: f64,
        finish_reason: &str,
        is_fallback: bool,
    ) {
        let t = &mut self.telemetry;
        t.provider = provider.to_owned();
        t.model = model.to_owned();
        t.finish_reason = Some(finish_reason.to_owned());
        t.is_fallback = is_fallback;
        self.billed(status, source, tokens_in, tokens_out, cost);
    }

    /// The answer was streamed: cut at `cut_at` output tokens (the reservation's) when the
    /// provider streamed past them; `broken` is the error class when the provider's stream
    /// broke after it started.
    pub fn streamed(&mut self, cut_at: Option<u32>, broken: Option<&str>) {
        let t = &mut self.telemetry;
        t.streamed = true;
        t.stream_cut_at_tokens = cut_at.map(u64::from);
        if let Some(kind) = broken {
            t.error_type = Some(format!("stream_{kind}"));
        }
    }

    /// The call was for embeddings (priced at its input alone).
    pub fn embedded(&mut self) {
        self.telemetry.embeddings = true;
    }

    /// An edge request's upstream answered: `tokens_in` and `tokens_out` from its usage report
    /// (`source`: provider usage) or our counts (tokenizer), at `cost`. Provider, model and
    /// finish reason are the report's, as [`Self::reported`] set them.
    pub fn upstream_answered(
        &mut self,
        source: CostSource,
        tokens_in: u32,
        tokens_out: u32,
        cost: f64,
    ) {
        self.billed(Status::Ok, source, tokens_in, tokens_out, cost);
    }

    /// What an answered request is billed: tokens, cost, where the cost comes from, status.
    fn billed(
        &mut self,
        status: Status,
        source: CostSource,
        tokens_in: u32,
        tokens_out: u32,
        cost: f64,
    ) {
        let t = &mut self.telemetry;
        t.tokens_in = u64::from(tokens_in);
        t.tokens_out = u64::from(tokens_out);
        t.tokens_total = u64::from(tokens_in) + u64::from(tokens_out);
        t.cost_usd = cost;
        t.cost_source = source.as_str().into();
        t.status = status.as_str().into();
    }
}
