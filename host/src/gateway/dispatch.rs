//! Dispatch along the fallback chain: the target model, then its fallbacks, each re-priced and
//! re-checked against the namespace's rules before it is tried; no attempt once the client is
//! gone; timed-out attempts charged at their estimate (configurable).

use std::time::Instant;

use crate::config::ModelConfig;
use crate::ledger::Reservation;
use crate::policy::{DecisionKind, Evaluation};
use crate::pricing;
use crate::providers::{
    Completion, CompletionRequest, CompletionStream, EmbeddingRequest, Provider, Vector,
};
use crate::requests::Call;

use super::lifecycle::{ClientGone, Target};
use super::{Gateway, Inference, PricedRequest};

/// Diagnostics keep the target they had before this file was split out of `lifecycle`.
const TARGET: &str = "llmscope::gateway::lifecycle";

/// How the provider is asked to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// One answer: a completion, or the embeddings of an embeddings call.
    Complete,
    /// A stream; an attempt answers once the provider's first event arrived (completions only:
    /// an embeddings call is always answered in one piece).
    Stream,
}

/// What dispatching along the chain produced.
#[derive(Default)]
pub(super) struct Dispatched {
    /// Chain index, model and completion of the attempt that answered (a stream's, once it
    /// has been forwarded).
    pub(super) answered: Option<(usize, String, Completion)>,
    /// Chain index, model and stream of the attempt whose stream started.
    pub(super) streamed: Option<(usize, String, CompletionStream)>,
    /// How a forwarded stream went (how much was counted, a cut, a break).
    pub(super) stream: Option<super::pump::StreamSettlement>,
    /// The vectors of an embeddings call that answered (its usage is in `answered`).
    pub(super) embeddings: Option<Vec<Vector>>,
    /// Failed candidates: model, provider, error.
    pub(super) failures: Vec<(String, String, String)>,
    /// Last provider error class.
    pub(super) last_error: Option<&'static str>,
    /// Estimates of attempts that timed out (a provider usually bills those).
    pub(super) timed_out_usd: f64,
    /// Set when a fallback was refused by the namespace's rules.
    pub(super) over_budget: Option<Evaluation>,
    /// Set when the client was gone before an attempt, which was then not made.
    pub(super) abandoned: bool,
    /// Time spent dispatching, ms.
    pub(super) latency_ms: f64,
}

/// One model of the chain about to be tried.
struct Candidate<'a> {
    /// Position in the chain (0: the target).
    index: usize,
    /// Model name.
    model: &'a String,
    /// Its configuration.
    cfg: &'a ModelConfig,
    /// Its provider.
    provider: &'a Provider,
}

impl Gateway {
    /// Try the target model, then its fallbacks. A fallback is re-priced and re-checked
    /// first: the reservation moves to its estimate and the namespace's rules run again; a
    /// deny skips it. No attempt is made once the client is gone. Timed-out attempts are
    /// charged at their estimate (configurable).
    pub(super) async fn dispatch(
        &self,
        inf: &Inference,
        req: &mut PricedRequest<'_>,
        target: &Target,
        reservation: &mut Reservation,
        gone: &ClientGone,
        mode: Mode,
    ) -> Dispatched {
        let cfg = &self.config;
        let chain: Vec<String> = std::iter::once(target.model.clone())
            .chain(
                cfg.models
                    .get(&target.model)
                    .map(|m| m.fallback.clone())
                    .unwrap_or_default(),
            )
            .collect();
        let mut out = Dispatched::default();
        let started = Instant::now();
        for (index, model) in chain.iter().enumerate() {
            if gone.is_set() {
                out.abandoned = true;
                break;
            }
            let Some(model_cfg) = cfg.models.get(model) else {
                continue;
            };
            let Some(provider) = self.providers.get(&model_cfg.provider) else {
                continue;
            };
            if let Some((param, why)) = provider.refuses(&req.forwarded) {
                out.failures.push((
                    model.clone(),
                    model_cfg.provider.clone(),
                    format!("cannot honour `{param}`: {why}"),
                ));
                out.last_error = Some("unsupported_parameter");
                continue;
            }
            let candidate = Candidate {
                index,
                model,
                cfg: model_cfg,
                provider,
            };
            let Some(estimate) = self
                .estimate(&candidate, req, target, reservation, &mut out)
                .await
            else {
                continue;
            };
            if self
                .attempt(inf, req, &candidate, estimate, mode, &mut out)
                .await
            {
                break;
            }
        }
        out.latency_ms = (started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        out
    }

    /// What `candidate` is tried at: the target's estimate, or a fallback's own once
    /// [`Self::recheck`] let it through (`None`: over budget, recorded in `out`).
    async fn estimate(
        &self,
        candidate: &Candidate<'_>,
        req: &mut PricedRequest<'_>,
        target: &Target,
        reservation: &mut Reservation,
        out: &mut Dispatched,
    ) -> Option<f64> {
        if candidate.index == 0 {
            return Some(target.estimate);
        }
        let tokens_in = self.tokens_in_estimate(&mut req.priced, candidate.model, &req.prompt);
        let estimate = pricing::cost_usd(candidate.cfg, tokens_in, req.priced.tokens_out);
        let Some(evaluation) = self
            .recheck(
                req,
                candidate.model,
                estimate,
                tokens_in,
                out.timed_out_usd,
                reservation,
            )
            .await
        else {
            return Some(estimate);
        };
        out.failures.push((
            candidate.model.clone(),
            candidate.cfg.provider.clone(),
            format!(
                "over budget at its estimate of {estimate:.6} USD ({})",
                evaluation.reason.as_deref().unwrap_or("denied by policy")
            ),
        ));
        out.over_budget = Some(evaluation);
        None
    }

    /// Call `candidate`'s provider; returns whether it answered (recorded in `out`, as is a
    /// failure and what its timed-out attempts cost at `estimate`).
    async fn attempt(
        &self,
        inf: &Inference,
        req: &PricedRequest<'_>,
        candidate: &Candidate<'_>,
        estimate: f64,
        mode: Mode,
        out: &mut Dispatched,
    ) -> bool {
        let model_cfg = candidate.cfg;
        let request_id = req.ctx.request_id.clone();
        let model = model_cfg
            .provider_model
            .clone()
            .unwrap_or_else(|| candidate.model.clone());
        let mut timed_out = 0u32;
        let provider = candidate.provider;
        let span = crate::otel::child(
            "llmscope.dispatch",
            vec![
                opentelemetry::KeyValue::new("gen_ai.request.model", model.clone()),
                opentelemetry::KeyValue::new("gen_ai.provider.name", model_cfg.provider.clone()),
                opentelemetry::KeyValue::new("llmscope.attempt", candidate.index as i64),
            ],
        );
        let answered = |c| Some((candidate.index, candidate.model.clone(), c));
        let call = async {
            match (&inf.call, mode) {
                (Call::Embeddings(e), _) => {
                    let ereq = EmbeddingRequest {
                        request_id,
                        model,
                        input: e.input.clone(),
                        encoding_format: e.encoding_format,
                        dimensions: e.dimensions,
                    };
                    provider.embed(&ereq, &mut timed_out).await.map(|(e, _)| {
                        out.answered = answered(e.as_completion());
                        out.embeddings = Some(e.vectors);
                    })
                }
                (Call::Completion, _) => {
                    let creq = CompletionRequest {
                        request_id,
                        model,
                        messages: inf.messages.clone(),
                        max_tokens: req.priced.max_tokens,
                        temperature: inf.temperature,
                        forwarded: std::sync::Arc::clone(&req.forwarded),
                    };
                    match mode {
                        Mode::Complete => provider
                            .complete(&creq, &mut timed_out)
                            .await
                            .map(|(c, _)| out.answered = answered(c)),
                        Mode::Stream => {
                            provider
                                .open_stream(&creq, &mut timed_out)
                                .await
                                .map(|(s, _)| {
                                    out.streamed =
                                        Some((candidate.index, candidate.model.clone(), s));
                                })
                        }
                    }
                }
            }
        };
        // The attempt runs in its span, so the provider is sent its traceparent.
        let result = match &span {
            Some(cx) => opentelemetry::context::FutureExt::with_context(call, cx.clone()).await,
            None => call.await,
        };
        if let (Some(cx), Err(e)) = (&span, &result) {
            use opentelemetry::trace::TraceContextExt as _;
            cx.span()
                .set_status(opentelemetry::trace::Status::error(e.to_string()));
        }
        drop(span);
        if self.config.charge_timed_out_attempts {
            out.timed_out_usd += f64::from(timed_out) * estimate;
        }
        match result {
            Ok(()) => true,
            Err(e) => {
                self.metrics.provider_error(&model_cfg.provider, e.kind());
                tracing::warn!(target: TARGET, model = %candidate.model, provider = %model_cfg.provider, error = %e, "provider call failed");
                out.last_error = Some(e.kind());
                out.failures.push((
                    candidate.model.clone(),
                    model_cfg.provider.clone(),
                    e.to_string(),
                ));
                false
            }
        }
    }

    /// Before a fallback: move the reservation to `model` at `estimate` (plus what timed-out
    /// attempts already cost) and run the namespace's rules again for that model at that
    /// estimate (a model-scoped rule may refuse even a cheaper one). Returns the evaluation
    /// when it denies.
    async fn recheck(
        &self,
        req: &PricedRequest<'_>,
        model: &str,
        estimate: f64,
        tokens_in: u32,
        spent: f64,
        reservation: &mut Reservation,
    ) -> Option<Evaluation> {
        let previous = (reservation.dims().clone(), reservation.amount());
        let mut moved = previous.0.clone();
        moved.model = model.to_owned();
        reservation.update(moved, spent + estimate, tokens_in, req.priced.tokens_out);
        let mut ctx = req.ctx.clone();
        ctx.model = model.to_owned();
        // What this request may cost now: the fallback's estimate plus the timed-out attempts
        // already charged.
        ctx.estimated_cost_usd = spent + estimate;
        ctx.estimated_tokens_in = tokens_in;
        let policies = self.policies();
        // With the redis backend the moved reservation is written and the replicas' sums read
        // again, as for the first attempt.
        let shared = self.shared_read(&policies, &ctx, Some(reservation)).await;
        let (evaluation, _) = self.evaluate(&policies, &ctx, reservation, shared.as_ref());
        self.alerts.raise(&policies, &ctx, &evaluation);
        if evaluation.decision == DecisionKind::Deny {
            let (dims, amount) = previous;
            reservation.update(
                dims,
                amount.cost_usd,
                amount.tokens_in as u32,
                amount.tokens_out as u32,
            );
            return Some(evaluation);
        }
        None
    }
}
