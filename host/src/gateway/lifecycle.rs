//! The request lifecycle, one stage a function: price (`price.rs`) → reserve → evaluate →
//! (deny | write the decision ahead) → dispatch along the fallback chain (`dispatch.rs`) →
//! settle and record (`settle.rs`).
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

use crate::ledger::{Dims, Reservation};
use crate::policy::{DecisionKind, Evaluation, PolicySet};
use crate::snapshots::LiveSnapshots;

use super::dispatch::Mode;
use super::records::{reservation_record, Records, Status};
use super::{Gateway, GatewayError, Inference, Outcome, PricedRequest};

/// Set when the client stopped waiting for the answer (its request future was dropped).
#[derive(Debug, Default, Clone)]
pub(super) struct ClientGone(Arc<AtomicBool>);

impl ClientGone {
    /// Whether the client is gone.
    pub(super) fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// The client is gone (a stream's body was dropped).
    pub(super) fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Sets [`ClientGone`] when dropped before [`Watch::answered`]: the client is gone.
pub(super) struct Watch(pub(super) Option<ClientGone>);

impl Watch {
    /// The client received its answer (or, for a stream, its head).
    pub(super) fn answered(mut self) {
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
pub(super) struct InFlight<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> InFlight<'a> {
    pub(super) fn enter(counter: &'a std::sync::atomic::AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request admitted for dispatch: priced, reserved (at its target), evaluated, its decision
/// line written ahead.
pub(super) struct Admitted<'g> {
    /// The priced request.
    pub(super) req: PricedRequest<'g>,
    /// Its lines so far.
    pub(super) records: Records,
    /// The verdict (allow or downgrade).
    pub(super) evaluation: Evaluation,
    /// Where it goes.
    pub(super) target: Target,
    /// Its reservation, at the target.
    pub(super) reservation: Reservation,
}

/// What [`Gateway::admit`] decided.
pub(super) enum Admission<'g> {
    /// Dispatch this request.
    Dispatch(Box<Admitted<'g>>),
    /// Answered already (denied), its lines written.
    Done(Outcome),
}

/// Where the request goes after evaluation: the tier, model and estimate it is reserved at.
pub(super) struct Target {
    /// Tier dispatched at (the requested one, or the downgrade's).
    pub(super) tier: String,
    /// Its model (the first of the fallback chain).
    pub(super) model: String,
    /// The estimate at that tier.
    pub(super) estimate: f64,
    /// Input tokens expected for that model.
    pub(super) tokens_in: u32,
}

impl Gateway {
    /// Process one request through the whole lifecycle. The lifecycle runs on its own task:
    /// if the caller stops waiting (the client hung up), it still runs to its end and records
    /// the request as `cancelled`.
    pub async fn handle(self: &Arc<Self>, inf: Inference) -> Result<Outcome, GatewayError> {
        let gone = ClientGone::default();
        let watch = Watch(Some(gone.clone()));
        let gw = Arc::clone(self);
        // The request's trace (when exported) is the task's current context.
        let task = if crate::otel::enabled() {
            let cx = crate::otel::request_context(&inf.trace_context, &inf.route_name);
            tokio::spawn(opentelemetry::context::FutureExt::with_context(
                async move { gw.run(inf, &gone).await },
                cx,
            ))
        } else {
            tokio::spawn(async move { gw.run(inf, &gone).await })
        };
        let result = task.await;
        watch.answered();
        result.unwrap_or_else(|e| Err(GatewayError::Internal(e.to_string())))
    }

    async fn run(&self, inf: Inference, gone: &ClientGone) -> Result<Outcome, GatewayError> {
        let _in_flight = InFlight::enter(&self.in_flight);
        let Admitted {
            mut req,
            records,
            evaluation,
            target,
            mut reservation,
        } = match self.admit(&inf).await? {
            Admission::Dispatch(admitted) => *admitted,
            Admission::Done(outcome) => return Ok(outcome),
        };
        let dispatched = self
            .dispatch(
                &inf,
                &mut req,
                &target,
                &mut reservation,
                gone,
                Mode::Complete,
            )
            .await;
        let span = crate::otel::child("llmscope.settle", Vec::new());
        let outcome = self
            .settle(
                req,
                target,
                records,
                evaluation,
                dispatched,
                reservation,
                gone,
            )
            .await;
        drop(span);
        trace_outcome(&outcome);
        outcome
    }

    /// Price, reserve and evaluate `inf`; a denial is answered here, an allowed request gets
    /// its decision line written ahead and is returned to be dispatched.
    pub(super) async fn admit(&self, inf: &Inference) -> Result<Admission<'_>, GatewayError> {
        let request_id = format!("req-{}", uuid::Uuid::now_v7().simple());
        let policies = self.policies();
        let span = crate::otel::child("llmscope.price", Vec::new());
        let mut req = self.price_request(inf, &policies, request_id)?;
        drop(span);
        crate::otel::annotate(request_attributes(&req.ctx, inf));
        // Reserve first, so concurrent requests see each other; evaluate against aggregates +
        // ledger minus this request's own reservation.
        let mut reservation = self.reserve(&req);
        // With the redis backend: the reservation written and the replicas' sums read, in one
        // round trip, before the rules run.
        let shared = self
            .shared_read(&policies, &req.ctx, Some(&reservation))
            .await;
        let eval_started = std::time::SystemTime::now();
        let (evaluation, policy_ms) =
            self.evaluate(&policies, &req.ctx, &reservation, shared.as_ref());
        trace_evaluation(eval_started, &evaluation);
        self.alerts.raise(&policies, &req.ctx, &evaluation);
        let mut records = Records::new(&req.ctx, &evaluation, &policies, policy_ms, &self.config);
        if matches!(inf.call, crate::requests::Call::Embeddings(_)) {
            // Every line of an embeddings call says so: served, denied or failed.
            records.embedded();
        }
        drop(policies);
        if evaluation.decision == DecisionKind::Deny {
            drop(reservation);
            return self
                .deny(&req, records, evaluation)
                .await
                .map(Admission::Done);
        }
        if self.config.reject_unlogged && !self.writer.telemetry_healthy() {
            drop(reservation);
            return self
                .refuse_unlogged(&req, records, &evaluation)
                .await
                .map(Admission::Done);
        }
        let target = self.target(&mut req, &evaluation, &mut reservation);
        if let Err(e) = self
            .write_ahead(&req, &target, &mut records, &evaluation)
            .await
        {
            drop(reservation);
            return Err(e);
        }
        Ok(Admission::Dispatch(Box::new(Admitted {
            req,
            records,
            evaluation,
            target,
            reservation,
        })))
    }

    /// Reserve `req`'s estimate at the requested tier in the ledger.
    fn reserve(&self, req: &PricedRequest<'_>) -> Reservation {
        self.ledger.reserve(
            Dims::of(&req.ctx),
            req.ctx.unix_time_ms,
            req.ctx.estimated_cost_usd,
            req.ctx.estimated_tokens_in,
            req.priced.tokens_out,
        )
    }

    /// With the redis backend: write `own` (this request's reservation) and read the sums the
    /// rules of `ctx`'s namespace need, in one round trip; `None` with the local backend.
    pub(crate) async fn shared_read(
        &self,
        policies: &PolicySet,
        ctx: &llmscope_sdk::types::RequestContext,
        own: Option<&Reservation>,
    ) -> Option<crate::shared::SharedRead> {
        let shared = self.shared.as_ref()?;
        let writes = own.map_or_else(Vec::new, |r| shared.keys_of(r.dims(), r.at_ms()));
        let mut reads: Vec<String> = policies
            .resolve(Some(ctx.budget_namespace.as_str()).filter(|n| !n.is_empty()))
            .map(|ns| {
                ns.rules()
                    .iter()
                    .flat_map(|r| r.aggregates())
                    .flat_map(|a| shared.keys_for(a, ctx))
                    .collect()
            })
            .unwrap_or_default();
        reads.sort();
        reads.dedup();
        if writes.is_empty() && reads.is_empty() {
            return Some(Ok(Default::default()));
        }
        Some(shared.exchange(&writes, &reads).await)
    }

    /// With the redis backend: write this replica's current values of the keys money of
    /// `dims` at `at_ms` lands in (a settlement), now rather than by the flusher. A failure
    /// leaves them to the flusher.
    pub(crate) async fn share_now(&self, dims: &Dims, at_ms: u64) {
        if let Some(shared) = &self.shared {
            let keys = shared.keys_of(dims, at_ms);
            let _ = shared.exchange(&keys, &[]).await;
        }
    }

    /// Evaluate the namespace's rules for `ctx` with this request's own reservation left out
    /// of its snapshots; returns the evaluation and the time it took, ms.
    pub(super) fn evaluate(
        &self,
        policies: &PolicySet,
        ctx: &llmscope_sdk::types::RequestContext,
        reservation: &Reservation,
        shared: Option<&crate::shared::SharedRead>,
    ) -> (Evaluation, f64) {
        let started = Instant::now();
        let evaluation = {
            let _view = self.view();
            let store = self.store();
            let source = LiveSnapshots {
                store: store.as_ref(),
                ledger: &self.ledger,
                own: Some((reservation.dims(), reservation.amount())),
                shared: self.shared.as_deref().zip(shared),
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
            reservation_record(&self.config, &req.ctx.model, 0.0, 0, 0),
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
        let tokens_in = self.tokens_in_estimate(&mut req.priced, &model, &req.prompt);
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

    /// Write the decision ahead, with the reservation `target` holds: on disk before any money
    /// is spent. When it cannot be written the request is refused if unlogged requests are
    /// (`Err`), else dispatched anyway.
    async fn write_ahead(
        &self,
        req: &PricedRequest<'_>,
        target: &Target,
        records: &mut Records,
        evaluation: &Evaluation,
    ) -> Result<(), GatewayError> {
        records.dispatching(
            &target.tier,
            reservation_record(
                &self.config,
                &target.model,
                target.estimate,
                target.tokens_in,
                req.priced.tokens_out,
            ),
        );
        if let Err(e) = self
            .writer
            .append_decision(&records.decision(evaluation))
            .await
        {
            if self.config.reject_unlogged {
                self.metrics
                    .request(&req.ctx.route_name, "unlogged", target.estimate, 0.0);
                return Err(GatewayError::Unlogged(e));
            }
            tracing::error!(error = %e, "request dispatched without its decision line");
        }
        Ok(())
    }
}

/// The GenAI and llmscope attributes of a priced request (on its trace's root span).
fn request_attributes(
    ctx: &llmscope_sdk::types::RequestContext,
    inf: &Inference,
) -> Vec<opentelemetry::KeyValue> {
    use opentelemetry::KeyValue;
    if !crate::otel::enabled() {
        return Vec::new();
    }
    vec![
        KeyValue::new("llmscope.request_id", ctx.request_id.clone()),
        KeyValue::new("llmscope.tenant_id", ctx.tenant_id.clone()),
        KeyValue::new("llmscope.budget_namespace", ctx.budget_namespace.clone()),
        KeyValue::new("llmscope.requested_tier", ctx.requested_tier.clone()),
        KeyValue::new("llmscope.estimated_cost_usd", ctx.estimated_cost_usd),
        KeyValue::new(
            "gen_ai.operation.name",
            match inf.call {
                crate::requests::Call::Embeddings(_) => "embeddings",
                crate::requests::Call::Completion => "chat",
            },
        ),
        KeyValue::new("gen_ai.request.model", ctx.model.clone()),
        KeyValue::new(
            "llmscope.reserved_tokens_out",
            i64::from(ctx.estimated_tokens_out),
        ),
    ]
}

/// What a served request cost, on its trace's root span.
/// On the request's root span: what a served request was billed (model, usage, cost, tier),
/// or an error status for one that failed.
pub(super) fn trace_outcome(outcome: &Result<Outcome, GatewayError>) {
    match outcome {
        Ok(Outcome::Served(s)) => crate::otel::annotate(served_attributes(s)),
        Ok(_) => {}
        Err(e) => crate::otel::fail(&e.to_string()),
    }
}

fn served_attributes(s: &super::Served) -> Vec<opentelemetry::KeyValue> {
    use opentelemetry::KeyValue;
    if !crate::otel::enabled() {
        return Vec::new();
    }
    vec![
        KeyValue::new("gen_ai.response.model", s.model.clone()),
        KeyValue::new("gen_ai.usage.input_tokens", i64::from(s.tokens_in)),
        KeyValue::new("gen_ai.usage.output_tokens", i64::from(s.tokens_out)),
        KeyValue::new("llmscope.cost_usd", s.cost_usd),
        KeyValue::new("llmscope.effective_tier", s.effective_tier.clone()),
    ]
}

/// The evaluation's span (started at `started`) and one finished child per rule, laid out in
/// evaluation order with each rule's measured time; its decision on the root span.
fn trace_evaluation(started: std::time::SystemTime, evaluation: &Evaluation) {
    use opentelemetry::KeyValue;
    if !crate::otel::enabled() {
        return;
    }
    let Some(cx) = crate::otel::child_since("llmscope.evaluate", started, Vec::new()) else {
        return;
    };
    let mut at = started;
    for r in &evaluation.rules {
        let end = at + std::time::Duration::from_secs_f64(r.eval_us.max(0.0) / 1e6);
        crate::otel::finished(
            &cx,
            "llmscope.rule",
            at,
            end,
            vec![
                KeyValue::new("llmscope.rule_id", r.rule_id.clone()),
                KeyValue::new("llmscope.primitive", r.primitive.clone()),
                KeyValue::new("llmscope.rule_decision", r.decision.as_str().to_owned()),
            ],
        );
        at = end;
    }
    {
        use opentelemetry::trace::TraceContextExt as _;
        cx.span()
            .end_with_timestamp(at.max(std::time::SystemTime::now()));
    }
    drop(cx);
    let mut attrs = vec![KeyValue::new(
        "llmscope.decision",
        evaluation.decision.as_str().to_owned(),
    )];
    if let Some(id) = &evaluation.policy_id {
        attrs.push(KeyValue::new("llmscope.policy_id", id.clone()));
    }
    if let Some(ns) = &evaluation.namespace {
        attrs.push(KeyValue::new("llmscope.namespace", ns.clone()));
    }
    crate::otel::annotate(attrs);
}
