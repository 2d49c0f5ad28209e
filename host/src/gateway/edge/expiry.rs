//! Edge requests whose report never came. The host reserved their estimate at the context
//! call; after [`EDGE_RESERVATION_TTL`](super::EDGE_RESERVATION_TTL) without a report the
//! proxy is presumed gone — possibly after the upstream billed the call — so each gets a
//! telemetry line with status `unanswered` at its estimate (error `edge_report_missing`) and
//! its id counts as reported: a report arriving later is a duplicate. The books stay
//! conservative, as for a gateway request dispatched before a crash.

use crate::gateway::records::{provider_of, Records, Status, Upstream, Verdict};
use crate::gateway::Gateway;
use crate::policy::DecisionKind;

use super::state::ReportState;

/// The decision reason of such a request.
const REASON: &str = "no report from the edge proxy within the reservation's lifetime; counted \
                      at its estimate";

impl Gateway {
    /// Record the edge requests that expired unreported since the last call (the refresh
    /// moves them aside); those the log refuses are kept for the next call. Returns how many
    /// were recorded.
    pub async fn record_unreported(&self) -> usize {
        let mut recorded = 0;
        let mut back = Vec::new();
        for u in self.edge.take_unreported() {
            let ctx = &u.issued;
            match self.edge.begin_report(&ctx.request_id) {
                ReportState::Fresh => {}
                // Reported meanwhile: that report records it (its reservation goes with it).
                ReportState::Done | ReportState::InProgress => continue,
            }
            let verdict = Verdict {
                decision: DecisionKind::Allow,
                policy_id: None,
                primitive: None,
                reason: Some(REASON.into()),
                window_cost_usd: None,
                window_limit_usd: None,
                alerts: &[],
                rules: &[],
            };
            // At what the reservation holds now: a later filter of the chain may have moved
            // it to the tier an earlier one downgraded to.
            let held = u.reservation.amount();
            let model = u.reservation.dims().model.clone();
            let tier = ctx
                .tiers
                .iter()
                .find(|t| t.model == model)
                .map_or(ctx.requested_tier.as_str(), |t| t.tier.as_str());
            let upstream = Upstream {
                tier,
                model: &model,
                provider: provider_of(self.config(), &model),
                estimate: held.cost_usd,
                latency_ms: 0.0,
                finish_reason: None,
            };
            let mut records = Records::reported(ctx, &verdict, upstream, 0.0);
            records.unanswered(Status::Unanswered, held.cost_usd, &model);
            records.telemetry.error_type = Some("edge_report_missing".into());
            records.held();
            let written = self
                .writer()
                .append(&records.telemetry, Some(&records.decision(verdict)))
                .await;
            match written {
                Ok(w) => {
                    self.edge.finish_report(&ctx.request_id, true);
                    self.metrics().request(
                        &ctx.route_name,
                        "unanswered",
                        held.cost_usd,
                        held.cost_usd,
                    );
                    u.reservation.settle(held, w.telemetry);
                    recorded += 1;
                }
                Err(e) => {
                    tracing::error!(error = %e, request_id = %ctx.request_id, "cannot record an unreported edge request; retrying at the next refresh");
                    self.edge.finish_report(&ctx.request_id, false);
                    back.push(u);
                }
            }
        }
        if !back.is_empty() {
            self.edge.put_back_unreported(back);
        }
        recorded
    }
}
