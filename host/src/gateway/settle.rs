//! Settling a dispatched request: the reservation at what it cost, its telemetry line, the
//! answer — whether an attempt answered or none did.

use crate::artifacts::{TelemetryRecord, WriteError, Written};
use crate::ledger::{Reservation, Sums};
use crate::policy::Evaluation;
use crate::pricing;
use crate::providers::{Completion, Vector};

use super::dispatch::Dispatched;
use super::lifecycle::{ClientGone, Target};
use super::pump::StreamSettlement;
use super::records::{CostSource, Records, Status};
use super::{Gateway, GatewayError, Outcome, PricedRequest, Served};

/// Diagnostics keep the target they had before this file was split out of `lifecycle`.
const TARGET: &str = "llmscope::gateway::lifecycle";

/// The attempt that answered, what timed-out attempts before it cost, and whether the client
/// was gone by then.
struct Settled {
    answered: (usize, String, Completion),
    timed_out_usd: f64,
    cancelled: bool,
    stream: Option<StreamSettlement>,
    embeddings: Option<Vec<Vector>>,
}

impl Gateway {
    /// Settle the reservation at what the request cost, write its telemetry line, answer.
    #[allow(
        clippy::too_many_arguments,
        reason = "the stages' products, each consumed once here"
    )]
    pub(super) async fn settle(
        &self,
        mut req: PricedRequest<'_>,
        target: Target,
        mut records: Records,
        evaluation: Evaluation,
        mut d: Dispatched,
        reservation: Reservation,
        gone: &ClientGone,
    ) -> Result<Outcome, GatewayError> {
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
        let Some(answered) = d.answered.take() else {
            return self
                .settle_unanswered(&req, &target, records, d, reservation, cancelled)
                .await;
        };
        let settled = Settled {
            answered,
            timed_out_usd: d.timed_out_usd,
            cancelled,
            stream: d.stream,
            embeddings: d.embeddings,
        };
        self.settle_answered(&mut req, target, records, evaluation, settled, reservation)
            .await
    }

    /// No attempt answered: charged what timed-out attempts cost; the request was refused
    /// (every fallback over budget), abandoned (the client left) or failed.
    async fn settle_unanswered(
        &self,
        req: &PricedRequest<'_>,
        target: &Target,
        mut records: Records,
        d: Dispatched,
        reservation: Reservation,
        cancelled: bool,
    ) -> Result<Outcome, GatewayError> {
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
        self.metrics.request(
            &req.ctx.route_name,
            status.as_str(),
            target.estimate,
            d.timed_out_usd,
        );
        records.held();
        let written = self.writer.append(&records.telemetry, None).await;
        self.settle_ledger(reservation, d.timed_out_usd, 0, 0, written)
            .await;
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
        Err(GatewayError::ProvidersFailed {
            request_id: req.ctx.request_id.clone(),
            summary,
        })
    }

    /// An attempt answered: billed at the provider's usage when reported (which also corrects
    /// the input-token estimates), else at our counts (a stream's output: the BPE count of
    /// what it delivered), plus what timed-out attempts before it cost. A stream that broke
    /// after it started is billed likewise, with status `error`.
    async fn settle_answered(
        &self,
        req: &mut PricedRequest<'_>,
        target: Target,
        mut records: Records,
        evaluation: Evaluation,
        settled: Settled,
        reservation: Reservation,
    ) -> Result<Outcome, GatewayError> {
        let cfg = &self.config;
        let route = &req.ctx.route_name;
        let Settled {
            answered: (index, model, completion),
            timed_out_usd,
            cancelled,
            stream,
            embeddings,
        } = settled;
        let Some(model_cfg) = cfg.models.get(&model) else {
            return Err(GatewayError::Internal(format!("model {model} vanished")));
        };
        // Settle at the provider's usage when reported, else at our counts.
        let counted = req.priced.tokens_in(cfg, &model, &req.prompt);
        let tokens_in = completion.tokens_in.unwrap_or(counted);
        if completion.tokens_in.is_some() {
            self.observe_usage(&model, tokens_in, counted);
        }
        let tokens_out = completion
            .tokens_out
            .or(stream.map(|s| s.counted_out))
            .unwrap_or(req.priced.tokens_out);
        let call_cost = pricing::cost_usd(model_cfg, tokens_in, tokens_out);
        let cost = call_cost + timed_out_usd;
        let source = if completion.tokens_in.is_some() && completion.tokens_out.is_some() {
            CostSource::ProviderUsage
        } else {
            CostSource::Tokenizer
        };
        let broken = stream.and_then(|s| s.broken);
        let status = match (cancelled, broken) {
            (true, _) => Status::Cancelled,
            (false, Some(_)) => Status::Error,
            (false, None) => Status::Ok,
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
        if let Some(s) = stream {
            records.streamed(s.cut_at, broken);
        }
        if embeddings.is_some() {
            records.embedded();
        }
        if index > 0 {
            self.metrics.fallback(route);
        }
        let decision = match status {
            Status::Cancelled | Status::Error => status.as_str(),
            _ => evaluation.decision.as_str(),
        };
        self.metrics.request(route, decision, target.estimate, cost);
        records.held();
        let written = self.writer.append(&records.telemetry, None).await;
        self.settle_ledger(reservation, cost, tokens_in, tokens_out, written)
            .await;
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
            embeddings,
        })))
    }

    /// Turn the reservation into a settled entry at `cost`, kept until ingestion passes the
    /// telemetry line (or, unwritten, until it ages out: the decision line is on disk, so a
    /// restart counts it at its estimate). A request that cost nothing gives its reservation
    /// back.
    async fn settle_ledger(
        &self,
        reservation: Reservation,
        cost: f64,
        tokens_in: u32,
        tokens_out: u32,
        written: Result<Written, WriteError>,
    ) {
        let position = match written {
            Ok(w) => w.telemetry,
            Err(e) => {
                tracing::error!(target: TARGET, error = %e, "telemetry line not written; the decision line stands for it and a restart counts it at its estimate");
                None
            }
        };
        let (dims, at_ms) = (reservation.dims().clone(), reservation.at_ms());
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
        // With the redis backend the settled spend is in Redis before the client is answered:
        // a replica killed after answering leaves its spend counted.
        self.share_now(&dims, at_ms).await;
    }
}
