//! The per-line checks: what a telemetry line and a decision line must be, alone and together.

use llmscope_wire::records::{parse_decision, parse_telemetry};

use super::lines::within_line;
use super::verifier::{At, Status, Verifier};
use super::ProblemKind;

impl Verifier {
    pub(super) fn telemetry_line(&mut self, at: At, line: &[u8]) {
        let r = match parse_telemetry(line) {
            Ok((_, r)) => r,
            Err(why) => return self.problem(at, ProblemKind::Malformed, || within_line(why)),
        };
        self.telemetry.records += 1;
        let status = Status::of(&r.status);
        let count = match status {
            Status::Ok => &mut self.statuses.ok,
            Status::Error => &mut self.statuses.error,
            Status::Denied => &mut self.statuses.denied,
            Status::Cancelled => &mut self.statuses.cancelled,
            Status::Unanswered => &mut self.statuses.unanswered,
            Status::Unknown => &mut self.statuses.unknown,
        };
        *count += 1;
        if status == Status::Unknown {
            self.problem(at, ProblemKind::UnknownValue, || {
                format!(
                    "unknown status {:?} (expected ok, error, denied, cancelled or unanswered)",
                    r.status
                )
            });
        }
        self.check_cost(at, "cost_usd", r.cost_usd);
        if let Some(e) = r.estimated_cost_usd {
            self.check_cost(at, "estimated_cost_usd", e);
        }
        if r.cost_usd.is_finite() && r.cost_usd >= 0.0 {
            self.total_cost_usd += r.cost_usd;
            if status == Status::Denied && r.cost_usd != 0.0 {
                self.problem(at, ProblemKind::BadCost, || {
                    format!(
                        "status denied with cost_usd {}: a denied request costs 0",
                        r.cost_usd
                    )
                });
            }
        }
        let Some(id) = r.request_id.filter(|id| !id.is_empty()) else {
            return self.problem(at, ProblemKind::MissingRequestId, || "no request_id".into());
        };
        let mut entry = self.seen.get(id.as_str()).copied().unwrap_or_default();
        if entry.telemetry_line != 0 {
            let first = entry.telemetry_line;
            return self.problem(at, ProblemKind::DuplicateRequestId, || {
                format!("duplicate request_id {id:?} (first at line {first})")
            });
        }
        entry.telemetry_line = at.line;
        entry.telemetry_offset = at.offset;
        entry.status = status;
        self.remember(id, entry);
    }

    pub(super) fn decision_line(&mut self, at: At, line: &[u8]) {
        let r = match parse_decision(line) {
            Ok((_, r)) => r,
            Err(why) => return self.problem(at, ProblemKind::Malformed, || within_line(why)),
        };
        self.decisions.records += 1;
        let deny = match r.decision.as_str() {
            "allow" => {
                self.verdicts.allow += 1;
                false
            }
            "downgrade" => {
                self.verdicts.downgrade += 1;
                false
            }
            "deny" => {
                self.verdicts.deny += 1;
                true
            }
            other => {
                self.verdicts.unknown += 1;
                self.problem(at, ProblemKind::UnknownValue, || {
                    format!("unknown decision {other:?} (expected allow, downgrade or deny)")
                });
                false
            }
        };
        let estimate = r.estimated_cost_usd.unwrap_or(0.0);
        self.check_cost(at, "estimated_cost_usd", estimate);
        let Some(id) = r.request_id.filter(|id| !id.is_empty()) else {
            return self.problem(at, ProblemKind::MissingRequestId, || "no request_id".into());
        };
        let mut entry = self.seen.get(id.as_str()).copied().unwrap_or_default();
        if entry.decision_line != 0 {
            let first = entry.decision_line;
            return self.problem(at, ProblemKind::DuplicateRequestId, || {
                format!("duplicate request_id {id:?} (first at line {first})")
            });
        }
        entry.decision_line = at.line;
        let (t_line, status) = (entry.telemetry_line, entry.status);
        if t_line == 0 {
            self.unanswered.count += 1;
            if estimate.is_finite() && estimate >= 0.0 {
                self.unanswered.estimate_usd += estimate;
            }
            if !self.options.allow_unanswered {
                self.problem(at, ProblemKind::Unanswered, || {
                    format!(
                        "request_id {id:?} has no telemetry line: unanswered (in flight, or lost \
                         in a crash), estimate {estimate:.6} USD"
                    )
                });
            }
        } else if deny && status != Status::Denied {
            self.problem(at, ProblemKind::DecisionMismatch, || {
                format!(
                    "request_id {id:?}: decision deny, but its telemetry (line {t_line}) has \
                     status {}",
                    status.name()
                )
            });
        }
        // The other way round is consistent: a request the rules allowed can still be refused
        // without dispatch (an Envoy filter failing closed when the host is unreachable); a
        // `denied` line costs nothing, which the telemetry check enforces.
        self.remember(id, entry);
    }
}
