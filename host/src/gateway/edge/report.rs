//! Recording an edge proxy's report (`POST /v1/edge/report`, see [`super`]): settle the
//! reservation at the actual cost and append the telemetry and decision lines through the
//! same builder as the gateway's own requests ([`Records`]).

use std::borrow::Cow;

use llmscope_sdk::types::RequestContext;

use crate::artifacts::{WriteError, Written};
use crate::config::ApiKey;
use crate::gateway::records::{provider_of, CostSource, Records, Status, Upstream, Verdict};
use crate::gateway::Gateway;
use crate::ledger::{Dims, Reservation, Sums};
use crate::policy::{Combination, DecisionKind};
use crate::pricing;

use super::state::ReportState;
use super::{valid_request_id, EdgeError, Report};

impl Gateway {
    /// Record a filter's report: settle the reservation, append telemetry and decision lines.
    /// Returns false when the request id was already reported (nothing written again).
    /// `key`: the edge key the report came with (`None`: authentication is off); the
    /// request's tenant must be one of its tenants.
    pub async fn edge_report(
        &self,
        report: &Report,
        key: Option<&ApiKey>,
    ) -> Result<bool, EdgeError> {
        // Counted with the gateway's own requests: shutdown waits for it to record.
        let _in_flight = crate::gateway::lifecycle::InFlight::enter(&self.in_flight);
        let ctx = self.reported_context(report)?;
        let ctx = ctx.as_ref();
        super::may_act_for(key, &ctx.tenant_id)?;
        // A filter that never reached the host (fail-open) knows no tier: the request went
        // out at the one its body asked for, as priced now.
        let report = if report.effective_tier.is_empty() {
            let mut at_requested = report.clone();
            at_requested.effective_tier.clone_from(&ctx.requested_tier);
            Cow::Owned(at_requested)
        } else {
            Cow::Borrowed(report)
        };
        let report = report.as_ref();
        let tier_model = self.reported_model(ctx, &report.effective_tier)?;
        let model = self.answered_model(tier_model, report.model.as_deref());
        match self.edge.begin_report(&ctx.request_id) {
            ReportState::Fresh => {}
            ReportState::Done => return Ok(false),
            ReportState::InProgress => {
                return Err(EdgeError::Unlogged(WriteError {
                    path: self.writer().paths().0.to_path_buf(),
                    message: "another delivery of this report is being written; retry".into(),
                }))
            }
        }
        let held = self.edge.take(&ctx.request_id);
        let alerts: Vec<String> = report
            .rules
            .iter()
            .filter_map(|r| r.alert.as_ref().map(|a| format!("{}: {a}", r.rule_id)))
            .collect();
        let verdict = reported_verdict(report, ctx, &alerts);
        let decision = verdict.decision;
        let (mut records, actual) = self.reported_records(report, ctx, model, &verdict);
        if records.telemetry.status != Status::Denied.as_str() {
            records.held();
        }
        let written = self
            .writer()
            .append(&records.telemetry, Some(&records.decision(verdict)))
            .await;
        let written = match written {
            Ok(w) => w,
            Err(e) => {
                // Nothing recorded: the report stays unseen and its reservation waits, so the
                // filter's retry records it once.
                // Put the reservation back before the id is free again, so a concurrent
                // delivery that then records it finds and settles it.
                if let Some(held) = held {
                    self.edge.restore(&ctx.request_id, held);
                }
                self.edge.finish_report(&ctx.request_id, false);
                return Err(EdgeError::Unlogged(e));
            }
        };
        self.edge.finish_report(&ctx.request_id, true);
        let telemetry = &records.telemetry;
        self.metrics().request(
            &ctx.route_name,
            if telemetry.status == Status::Error.as_str() {
                "error"
            } else {
                decision.as_str()
            },
            telemetry.estimated_cost_usd,
            telemetry.cost_usd,
        );
        let held = held.map(|(r, _)| r);
        // Spend at another model than reserved is kept under that model (as ingestion will).
        let held = held.filter(|_| model == tier_model);
        self.settle_reported(ctx, model, held, actual, written);
        // With the redis backend the settlement is in Redis before the filter is answered.
        let mut settled_at = Dims::of(ctx);
        settled_at.model = model.to_owned();
        self.share_now(&settled_at, ctx.unix_time_ms).await;
        Ok(true)
    }

    /// The context a report is about: the one this host issued for its id (whatever the report
    /// claims of tenant, time or tiers), else the one the report carries — timed now, so no
    /// report can date spend out of the windows — else its `original` request priced now (the
    /// filter could not reach the host before dispatch).
    fn reported_context<'r>(
        &self,
        report: &'r Report,
    ) -> Result<Cow<'r, RequestContext>, EdgeError> {
        let ctx = match (&report.request, &report.original) {
            (Some(ctx), _) => match self.edge.issued(&ctx.request_id) {
                Some(issued) => Cow::<RequestContext>::Owned(issued),
                None => {
                    let mut ctx = ctx.clone();
                    ctx.unix_time_ms = crate::gateway::now_ms();
                    Cow::Owned(ctx)
                }
            },
            // An id this host issued a context for is that context's, whoever reports it.
            (None, Some(call)) => match call
                .request_id
                .as_deref()
                .and_then(|id| self.edge.issued(id))
            {
                Some(issued) => Cow::Owned(issued),
                None => {
                    let id = call
                        .request_id
                        .clone()
                        .unwrap_or_else(|| format!("req-{}", uuid::Uuid::now_v7().simple()));
                    Cow::Owned(self.price_call(call, id, false)?.0)
                }
            },
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
        Ok(ctx)
    }

    /// The model `tier` of the reported request's route maps to.
    fn reported_model(&self, ctx: &RequestContext, tier: &str) -> Result<&str, EdgeError> {
        let route = self
            .config()
            .routes
            .get(&ctx.route_name)
            .ok_or_else(|| self.unknown_route(&ctx.route_name))?;
        let Some(model) = route.tiers.get(tier) else {
            return Err(EdgeError::BadCall {
                field: "effective_tier",
                message: format!(
                    "route {} has no tier `{tier}`; tiers: {}",
                    ctx.route_name,
                    route.tiers.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        };
        Ok(model)
    }

    /// The configured model a request was answered by: the one the upstream names in its
    /// answer (`reported`: exactly a model's name or `provider_model`, else a dated snapshot
    /// of one, as OpenAI answers `gpt-4o-2024-08-06` for `gpt-4o`), priced at its rates;
    /// `tier_model` when the answer names none or one this gateway does not price.
    fn answered_model<'a>(&'a self, tier_model: &'a str, reported: Option<&str>) -> &'a str {
        let Some(reported) = reported else {
            return tier_model;
        };
        let models = &self.config().models;
        let upstream = |name: &'a String| {
            let m = &models[name];
            m.provider_model.as_deref().unwrap_or(name.as_str())
        };
        // Only models of the tier model's provider answer at its endpoint; among equal
        // matches the tier's own model wins (an answer that fits it is the expected one).
        let provider = models.get(tier_model).map(|m| m.provider.as_str());
        let names = models
            .iter()
            .filter(|(_, m)| provider.is_none_or(|p| m.provider == p))
            .map(|(n, _)| n);
        let rank = |n: &String| n.as_str() == tier_model;
        let exact = names
            .clone()
            .filter(|n| upstream(n) == reported)
            .max_by_key(|n| rank(n));
        let snapshot = || {
            names
                .filter(|n| {
                    reported
                        .strip_prefix(upstream(n))
                        .is_some_and(|rest| rest.starts_with('-'))
                })
                .max_by_key(|n| (upstream(n).len(), rank(n)))
        };
        match exact.or_else(snapshot) {
            Some(name) => name.as_str(),
            None => {
                tracing::warn!(
                    reported,
                    priced_at = tier_model,
                    "an edge report names a model this gateway does not price; priced at the \
                     tier's model"
                );
                tier_model
            }
        }
    }

    /// A report's lines, and what the request spent when the upstream served it: denied
    /// (by a rule, or answered locally without the host), served (at the upstream's usage,
    /// else our counts) or failed (the upstream's HTTP status).
    fn reported_records(
        &self,
        report: &Report,
        ctx: &RequestContext,
        model: &str,
        verdict: &Verdict<'_>,
    ) -> (Records, Option<Sums>) {
        let model_cfg = self.config().models.get(model);
        let upstream = Upstream {
            tier: &report.effective_tier,
            model,
            provider: provider_of(self.config(), model),
            estimate: ctx
                .tier(&report.effective_tier)
                .map_or(ctx.estimated_cost_usd, |t| t.estimated_cost_usd),
            latency_ms: report.latency_ms,
            finish_reason: report.finish_reason.clone(),
        };
        let eval_ms: f64 = report.rules.iter().map(|r| r.eval_us).sum::<f64>() / 1e3;
        let mut records = Records::reported(ctx, verdict, upstream, eval_ms);
        let served = !report.local_reply && (200..300).contains(&report.status);
        let denied = verdict.decision == DecisionKind::Deny;
        if denied || (report.local_reply && !served) {
            records.denied();
            if !denied {
                records.telemetry.error_type = Some("policy_host_unavailable".into());
            }
            return (records, None);
        }
        if !served {
            records.unanswered(Status::Error, 0.0, model);
            records.telemetry.error_type = Some(format!("upstream_http_{}", report.status));
            return (records, None);
        }
        let (tokens_in, tokens_out, source) = match report.usage {
            Some(u) => (u.tokens_in, u.tokens_out, CostSource::ProviderUsage),
            None => (
                ctx.estimated_tokens_in,
                ctx.estimated_tokens_out,
                CostSource::Tokenizer,
            ),
        };
        let cost = model_cfg.map_or(0.0, |m| pricing::cost_usd(m, tokens_in, tokens_out));
        records.upstream_answered(source, tokens_in, tokens_out, cost);
        let actual = Sums {
            cost_usd: cost,
            tokens_in: f64::from(tokens_in),
            tokens_out: f64::from(tokens_out),
            requests: 1.0,
        };
        (records, Some(actual))
    }

    /// Settle what a served edge request spent (`actual`) on its reservation, kept until
    /// ingestion passes the telemetry line; with none left (it expired, or the host restarted)
    /// the spend still counts, at `model`. Without spend the reservation is released.
    fn settle_reported(
        &self,
        ctx: &RequestContext,
        model: &str,
        reservation: Option<Reservation>,
        actual: Option<Sums>,
        written: Written,
    ) {
        let position = written.telemetry;
        match (reservation, actual) {
            (Some(r), Some(actual)) => r.settle(actual, position),
            (None, Some(actual)) => {
                let mut moved = Dims::of(ctx);
                moved.model = model.to_owned();
                let r = self.ledger().reserve(moved, ctx.unix_time_ms, 0.0, 0, 0);
                r.settle(actual, position);
            }
            (r, None) => drop(r),
        }
    }
}

/// The verdict an edge chain reached, from its rules' outcomes: the deciding rule's deny, or
/// its downgrade when the request really went out at another tier, else allow; `alerts` are
/// the rules' alerts. Without a deciding rule the reason is the filter's host error, if any.
fn reported_verdict<'r>(
    report: &'r Report,
    ctx: &RequestContext,
    alerts: &'r [String],
) -> Verdict<'r> {
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
    let fact = |name: &str| {
        deciding
            .and_then(|r| r.facts.get(name))
            .or_else(|| report.rules.iter().find_map(|r| r.facts.get(name)))
            .copied()
    };
    Verdict {
        decision,
        policy_id: deciding.map(|r| r.rule_id.clone()),
        primitive: deciding.map(|r| r.primitive.clone()),
        reason: deciding
            .and_then(|r| r.reason.clone())
            .or_else(|| report.host_error.clone()),
        window_cost_usd: fact("window_cost_usd"),
        window_limit_usd: fact("window_limit_usd"),
        alerts,
        rules: &report.rules,
    }
}
