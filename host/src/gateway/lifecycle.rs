//! The request lifecycle, one stage a function: price → reserve → evaluate → (deny | write the
//! decision ahead) → dispatch along the fallback chain → settle → record.
//!
//! Once admitted, a request runs to its end on its own task, detached from the connection: a
//! client that hangs up mid-call cannot undo the reservation or skip the telemetry line of a
//! call the provider bills. The decision line (with the reservation) is on disk before the
//! provider is called, so a crash leaves a record a restart counts at its estimate
//! ([`super::recovery`]); when it cannot be written the request is refused (503) and the
//! provider never called.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::artifacts::{ReservationRecord, TelemetryRecord};
use crate::ledger::{Dims, Reservation, Sums};
use crate::policy::{DecisionKind, Evaluation, PolicySet};
use crate::pricing;
use crate::providers::{Completion, CompletionRequest};
use crate::snapshots::LiveSnapshots;

use super::records::{CostSource, Records, Status};
use super::{Gateway, GatewayError, Inference, Outcome, PricedRequest, Served};

/// Set when the client stopped waiting for the answer (its request future was dropped).
#[derive(Debug, Default, Clone)]
struct ClientGone(Arc<AtomicBool>);

impl ClientGone {
    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Sets [`ClientGone`] when dropped before [`Watch::answered`]: the client is gone.
struct Watch(Option<ClientGone>);

impl Watch {
    fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(gone) = self.0.take() {
            gone.0.store(true, Ordering::Relaxed);
        }
    }
}

/// Counts a request in flight until dropped.
struct InFlight<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a std::sync::atomic::AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where the request goes after evaluation: the tier, model and estimate it is reserved at.
struct Target {
    tier: String,
    model: String,
    estimate: f64,
    tokens_in: u32,
}

/// What dispatching along the chain produced.
struct Dispatched {
    /// Chain index, model and completion of the attempt that answered.
    answered: Option<(usize, String, Completion)>,
    /// Failed candidates: model, provider, error.
    failures: Vec<(String, String, String)>,
    /// Last provider error class.
    last_error: Option<&'static str>,
    /// Estimates of attempts that timed out (a provider usually bills those).
    timed_out_usd: f64,
    /// Set when a pricier fallback was refused by the namespace's rules.
    over_budget: Option<Evaluation>,
    /// Set when the client was gone before an attempt, which was then not made.
    abandoned: bool,
    /// Time spent dispatching, ms.
    latency_ms: f64,
}

impl Gateway {
    /// Process one request through the whole lifecycle. The lifecycle runs on its own task:
    /// if the caller stops waiting (the client hung up), it still runs to its end and records
    /// the request as `cancelled`.
    pub async fn handle(self: &Arc<Self>, inf: Inference) -> Result<Outcome, GatewayError> {
        let gone = ClientGone::default();
        let watch = Watch(Some(gone.clone()));
        let gw = Arc::clone(self);
        let task = tokio::spawn(async move { gw.run(inf, &gone).await });
        let result = task.await;
        watch.answered();
        result.unwrap_or_else(|e| Err(GatewayError::Internal(e.to_string())))
    }

    async fn run(&self, inf: Inference, gone: &ClientGone) -> Result<Outcome, GatewayError> {
        let _in_flight = InFlight::enter(&self.in_flight);
        let request_id = format!("req-{}", uuid::Uuid::now_v7().simple());
        let policies = self.policies();
        let mut req = self.price_request(&inf, &policies, request_id)?;
        // Reserve first, so concurrent requests see each other; evaluate against aggregates +
        // ledger minus this request's own reservation.
        let mut reservation = self.ledger.reserve(
            Dims::of(&req.ctx),
            req.ctx.unix_time_ms,
            req.ctx.estimated_cost_usd,
            req.ctx.estimated_tokens_in,
            req.priced.tokens_out,
        );
        let (evaluation, policy_ms) = self.evaluate(&policies, &req.ctx, &reservation);
        let mut records = Records::new(&req.ctx, &evaluation, &policies, policy_ms, &self.config);
        drop(policies);
        if evaluation.decision == DecisionKind::Deny {
            drop(reservation);
            return self.deny(&req, records, evaluation).await;
        }
        if self.config.reject_unlogged && !self.writer.telemetry_healthy() {
            drop(reservation);
            return self.refuse_unlogged(&req, records, &evaluation).await;
        }
        let target = self.target(&mut req, &evaluation, &mut reservation);
        records.dispatching(
            &target.tier,
            ReservationRecord {
                provider: self.provider_of(&target.model),
                model: target.model.clone(),
                cost_usd: target.estimate,
                tokens_in: u64::from(target.tokens_in),
                tokens_out: u64::from(req.priced.tokens_out),
            },
        );
        // Write ahead: the decision and its reservation are on disk before any money is spent.
        if let Err(e) = self
            .writer
            .append_decision(&records.decision(&evaluation))
            .await
        {
            if self.config.reject_unlogged {
                drop(reservation);
                self.metrics
                    .request(&req.ctx.route_name, "unlogged", target.estimate, 0.0);
                return Err(GatewayError::Unlogged(e));
            }
            tracing::error!(error = %e, "request dispatched without its decision line");
        }
        let dispatched = self
            .dispatch(&inf, &mut req, &target, &mut reservation, gone)
            .await;
        self.settle(
            req,
            target,
            records,
            evaluation,
            dispatched,
            reservation,
            gone,
        )
        .await
    }

    /// Evaluate the namespace's rules for `ctx` with this request's own reservation left out
    /// of its snapshots; returns the evaluation and the time it took, ms.
    fn evaluate(
        &self,
        policies: &PolicySet,
        ctx: &llmscope_sdk::types::RequestContext,
        reservation: &Reservation,
    ) -> (Evaluation, f64) {
        let started = Instant::now();
        let evaluation = {
            let _view = self.view();
            let store = self.store();
            let source = LiveSnapshots {
                store: store.as_ref(),
                ledger: &self.ledger,
                own: Some((reservation.dims(), reservation.amount())),
            };
            policies.evaluate(ctx, &source)
        };
        let policy_ms = started.elapsed().as_secs_f64() * 1e3;
        let errors: Vec<&str> = evaluation
            .rules
            .iter()
            .filter(|r| r.error.is_some())
            .map(|r| r.rule_id.as_str())
            .collect();
        self.metrics.policy_eval(policy_ms / 1e3, &errors);
        (evaluation, policy_ms)
    }

    /// A denial: no dispatch; its telemetry and decision lines together.
    async fn deny(
        &self,
        req: &PricedRequest<'_>,
        mut records: Records,
        evaluation: Evaluation,
    ) -> Result<Outcome, GatewayError> {
        records.denied();
        self.metrics
            .request(&req.ctx.route_name, "deny", req.ctx.estimated_cost_usd, 0.0);
        match self
            .writer
            .append(&records.telemetry, Some(&records.decision(&evaluation)))
            .await
        {
            Ok(_) => {}
            Err(e) if self.config.reject_unlogged => return Err(GatewayError::Unlogged(e)),
            Err(e) => tracing::error!(error = %e, "denial served unlogged"),
        }
        Ok(Outcome::Denied {
            request_id: req.ctx.request_id.clone(),
            evaluation,
        })
    }

    /// The telemetry log failed its last write: nothing is dispatched until it takes a line
    /// again, since a billed answer might then go unrecorded. This request is refused (503) and
    /// its own two lines (status `error`, `logs_unavailable`, nothing spent, no reservation) are
    /// the probe: once they are written the next request is served.
    async fn refuse_unlogged(
        &self,
        req: &PricedRequest<'_>,
        mut records: Records,
        evaluation: &Evaluation,
    ) -> Result<Outcome, GatewayError> {
        records.unanswered(Status::Error, 0.0, &req.ctx.model);
        records.telemetry.error_type = Some("logs_unavailable".into());
        // Nothing reserved, nothing dispatched: if only the decision line lands, a restart
        // records this request at 0.
        records.dispatching(
            &req.ctx.requested_tier,
            ReservationRecord {
                provider: self.provider_of(&req.ctx.model),
                model: req.ctx.model.clone(),
                cost_usd: 0.0,
                tokens_in: 0,
                tokens_out: 0,
            },
        );
        records.telemetry.estimated_cost_usd = req.ctx.estimated_cost_usd;
        self.metrics.request(
            &req.ctx.route_name,
            "unlogged",
            req.ctx.estimated_cost_usd,
            0.0,
        );
        let written = self
            .writer
            .append(&records.telemetry, Some(&records.decision(evaluation)))
            .await;
        Err(GatewayError::Unlogged(written.err().unwrap_or_else(|| {
            crate::artifacts::WriteError {
                path: self.config.telemetry_path.clone(),
                message: "the previous telemetry write failed; retry (this probe succeeded)".into(),
            }
        })))
    }

    /// The tier and model the verdict sends the request to, re-priced; the reservation moves
    /// there.
    fn target(
        &self,
        req: &mut PricedRequest<'_>,
        evaluation: &Evaluation,
        reservation: &mut Reservation,
    ) -> Target {
        let tier = match (&evaluation.decision, &evaluation.downgrade_to) {
            (DecisionKind::Downgrade, Some(tier)) => tier.clone(),
            _ => req.ctx.requested_tier.clone(),
        };
        let model = req.route.tiers.get(&tier).unwrap_or(&req.ctx.model).clone();
        let tokens_in = self.tokens_in_estimate(&mut req.priced, &model, &req.pairs);
        let estimate = req
            .priced
            .tier(&tier)
            .map_or(req.ctx.estimated_cost_usd, |t| t.estimated_cost_usd);
        if model != req.ctx.model {
            let mut moved = reservation.dims().clone();
            moved.model = model.clone();
            reservation.update(moved, estimate, tokens_in, req.priced.tokens_out);
        }
        Target {
            tier,
            model,
            estimate,
            tokens_in,
        }
    }

    /// The provider serving `model` (empty when not configured).
    fn provider_of(&self, model: &str) -> String {
        self.config
            .models
            .get(model)
            .map(|m| m.provider.clone())
            .unwrap_or_default()
    }

    /// Try the target model, then its fallbacks. A fallback is re-priced and re-checked
    /// first: the reservation moves to its estimate and the namespace's rules run again; a
    /// deny skips it. No attempt is made once the client is
    /// gone. Timed-out attempts are charged at their estimate (configurable).
    async fn dispatch(
        &self,
        inf: &Inference,
        req: &mut PricedRequest<'_>,
        target: &Target,
        reservation: &mut Reservation,
        gone: &ClientGone,
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
        let mut out = Dispatched {
            answered: None,
            failures: Vec::new(),
            last_error: None,
            timed_out_usd: 0.0,
            over_budget: None,
            abandoned: false,
            latency_ms: 0.0,
        };
        let started = Instant::now();
        for (i, candidate) in chain.iter().enumerate() {
            if gone.is_set() {
                out.abandoned = true;
                break;
            }
            let Some(model_cfg) = cfg.models.get(candidate) else {
                continue;
            };
            let Some(provider) = self.providers.get(&model_cfg.provider) else {
                continue;
            };
            let estimate = if i == 0 {
                target.estimate
            } else {
                let tokens_in = self.tokens_in_estimate(&mut req.priced, candidate, &req.pairs);
                let estimate = pricing::cost_usd(model_cfg, tokens_in, req.priced.tokens_out);
                match self.recheck(
                    req,
                    candidate,
                    estimate,
                    tokens_in,
                    out.timed_out_usd,
                    reservation,
                ) {
                    None => estimate,
                    Some(evaluation) => {
                        out.failures.push((
                            candidate.clone(),
                            model_cfg.provider.clone(),
                            format!(
                                "over budget at its estimate of {estimate:.6} USD ({})",
                                evaluation.reason.as_deref().unwrap_or("denied by policy")
                            ),
                        ));
                        out.over_budget = Some(evaluation);
                        continue;
                    }
                }
            };
            let creq = CompletionRequest {
                request_id: req.ctx.request_id.clone(),
                model: model_cfg
                    .provider_model
                    .clone()
                    .unwrap_or_else(|| candidate.clone()),
                messages: inf.messages.clone(),
                max_tokens: req.priced.tokens_out,
                temperature: inf.temperature,
            };
            let mut timed_out = 0u32;
            let result = provider.complete(&creq, &mut timed_out).await;
            if cfg.charge_timed_out_attempts {
                out.timed_out_usd += f64::from(timed_out) * estimate;
            }
            match result {
                Ok((completion, _attempts)) => {
                    out.answered = Some((i, candidate.clone(), completion));
                    break;
                }
                Err(e) => {
                    self.metrics.provider_error(&model_cfg.provider, e.kind());
                    tracing::warn!(model = %candidate, provider = %model_cfg.provider, error = %e, "provider call failed");
                    out.last_error = Some(e.kind());
                    out.failures.push((
                        candidate.clone(),
                        model_cfg.provider.clone(),
                        e.to_string(),
                    ));
                }
            }
        }
        out.latency_ms = (started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        out
    }

    /// Before a fallback: move the reservation to `model` at `estimate` (plus what timed-out
    /// attempts already cost) and run the namespace's rules again for that model at that
    /// estimate (a model-scoped rule may refuse even a cheaper one). Returns the evaluation
    /// when it denies.
    fn recheck(
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
        let (evaluation, _) = self.evaluate(&policies, &ctx, reservation);
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

    /// Settle the reservation at what the request cost, write its telemetry line, answer.
    #[allow(
        clippy::too_many_arguments,
        reason = "the stages' products, each consumed once here"
    )]
    async fn settle(
        &self,
        mut req: PricedRequest<'_>,
        target: Target,
        mut records: Records,
        evaluation: Evaluation,
        d: Dispatched,
        reservation: Reservation,
        gone: &ClientGone,
    ) -> Result<Outcome, GatewayError> {
        let cfg = &self.config;
        let route = req.ctx.route_name.clone();
        let t: &mut TelemetryRecord = &mut records.telemetry;
        t.latency_ms = d.latency_ms;
        t.fallback_reason = (!d.failures.is_empty()).then(|| {
            d.failures
                .iter()
                .map(|(m, _, e)| format!("{m}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        });
        t.timed_out_cost_usd = d.timed_out_usd;
        let cancelled = gone.is_set();
        let Some((index, model, completion)) = d.answered else {
            let status = if cancelled || d.abandoned {
                Status::Cancelled
            } else {
                Status::Error
            };
            records.unanswered(status, d.timed_out_usd, &target.model);
            let t = &mut records.telemetry;
            t.error_type = match (&d.over_budget, d.abandoned) {
                (_, true) => Some("client_gone".into()),
                (Some(_), _) => Some("fallback_over_budget".into()),
                (None, _) => d.last_error.map(str::to_owned),
            };
            self.metrics
                .request(&route, status.as_str(), target.estimate, d.timed_out_usd);
            let written = self.writer.append(&records.telemetry, None).await;
            self.settle_ledger(reservation, d.timed_out_usd, 0, 0, written);
            if let (Some(evaluation), false) = (d.over_budget, d.abandoned) {
                return Ok(Outcome::Denied {
                    request_id: req.ctx.request_id.clone(),
                    evaluation,
                });
            }
            let summary = records
                .telemetry
                .fallback_reason
                .clone()
                .unwrap_or_else(|| "no provider configured for the model".into());
            return Err(GatewayError::ProvidersFailed(summary));
        };
        let Some(model_cfg) = cfg.models.get(&model) else {
            return Err(GatewayError::Internal(format!("model {model} vanished")));
        };
        // Settle at the provider's usage when reported, else at our counts.
        let counted = req.priced.tokens_in(cfg, &model, &req.pairs);
        let tokens_in = completion.tokens_in.unwrap_or(counted);
        if completion.tokens_in.is_some() {
            self.observe_usage(&model, tokens_in, counted);
        }
        let tokens_out = completion.tokens_out.unwrap_or(req.priced.tokens_out);
        let call_cost = pricing::cost_usd(model_cfg, tokens_in, tokens_out);
        let cost = call_cost + d.timed_out_usd;
        let source = if completion.tokens_in.is_some() && completion.tokens_out.is_some() {
            CostSource::ProviderUsage
        } else {
            CostSource::Tokenizer
        };
        let status = if cancelled {
            Status::Cancelled
        } else {
            Status::Ok
        };
        records.answered(
            status,
            source,
            &model_cfg.provider,
            &model,
            tokens_in,
            tokens_out,
            cost,
            &completion.finish_reason,
            index > 0,
        );
        if index > 0 {
            self.metrics.fallback(&route);
        }
        let decision = if cancelled {
            "cancelled"
        } else {
            evaluation.decision.as_str()
        };
        self.metrics
            .request(&route, decision, target.estimate, cost);
        let written = self.writer.append(&records.telemetry, None).await;
        self.settle_ledger(reservation, cost, tokens_in, tokens_out, written);
        Ok(Outcome::Served(Box::new(Served {
            request_id: req.ctx.request_id.clone(),
            completion,
            model,
            provider: model_cfg.provider.clone(),
            effective_tier: target.tier,
            estimated_cost_usd: target.estimate,
            cost_usd: cost,
            tokens_in,
            tokens_out,
            is_fallback: index > 0,
            evaluation,
        })))
    }

    /// Turn the reservation into a settled entry at `cost`, kept until ingestion passes the
    /// telemetry line (or, unwritten, until it ages out: the decision line is on disk, so a
    /// restart counts it at its estimate). A request that cost nothing gives its reservation
    /// back.
    fn settle_ledger(
        &self,
        reservation: Reservation,
        cost: f64,
        tokens_in: u32,
        tokens_out: u32,
        written: Result<crate::artifacts::Written, crate::artifacts::WriteError>,
    ) {
        let position = match written {
            Ok(w) => w.telemetry,
            Err(e) => {
                tracing::error!(error = %e, "telemetry line not written; the decision line stands for it and a restart counts it at its estimate");
                None
            }
        };
        if cost <= 0.0 && tokens_in == 0 && tokens_out == 0 {
            drop(reservation);
            return;
        }
        reservation.settle(
            Sums {
                cost_usd: cost,
                tokens_in: f64::from(tokens_in),
                tokens_out: f64::from(tokens_out),
                requests: 1.0,
            },
            position,
        );
    }
}
