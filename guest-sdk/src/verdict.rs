//! The rule vocabulary shared by the host and the edge filters: a rule's [`Mode`] and
//! [`FailureMode`], the [`DecisionKind`] it amounts to, its recorded [`RuleOutcome`], and how the
//! outcomes of several rules combine into one decision ([`Combination`]).
//!
//! # Combining verdicts
//!
//! Deny beats downgrade beats allow; alerts never block; `monitor` rules never act. Which rule
//! decides depends on when the rules act, so there are two variants, both stated here:
//!
//! - [`Combination::Evaluated`] — the host: every rule of the namespace is evaluated against the
//!   same request before anything happens, and only the deciding rule is applied. The first
//!   enforced deny wins, else the *first* enforced downgrade: rule order is priority, and the
//!   request is dispatched once, at that tier.
//! - [`Combination::Applied`] — an Envoy filter chain: each filter acts as the request passes
//!   (a deny answers at once and stops the chain; a downgrade rewrites the request), and a later
//!   filter sees the tier an earlier one downgraded to. The rule that decided is the first
//!   applied enforced deny, else the *last* applied downgrade: the request went out at the tier
//!   the last downgrading filter chose.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::types::{Decision, Snapshot, Verdict};

/// Whether a rule's verdict is applied or only recorded (`mode:` of a rule).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The verdict is applied.
    #[default]
    Enforce,
    /// The verdict is recorded as what the rule would have done; the request is unaffected.
    Monitor,
}

/// What a failure amounts to (`failure_mode:` of a rule; `on_unavailable:` of a filter's
/// host): a trap, deadline, memory cap, error value or invalid verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Refuse the request.
    #[default]
    Closed,
    /// Let it through.
    Open,
}

/// The kind of a decision, without its tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    /// Allowed.
    Allow,
    /// Downgraded.
    Downgrade,
    /// Denied.
    Deny,
}

impl DecisionKind {
    /// `allow`, `downgrade` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Downgrade => "downgrade",
            Self::Deny => "deny",
        }
    }
}

impl From<&Decision> for DecisionKind {
    fn from(d: &Decision) -> Self {
        match d {
            Decision::Allow => Self::Allow,
            Decision::Downgrade(_) => Self::Downgrade,
            Decision::Deny => Self::Deny,
        }
    }
}

/// What one rule did for one request: the `rules` entries of `policy_decisions.jsonl`, written
/// by the host for its own evaluations and reported back in this same shape by edge filters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Unknown fields are ignored, not refused: a newer filter's report or a newer gateway's
// decision line still reads (this record only ever gains fields).
pub struct RuleOutcome {
    /// Rule id.
    pub rule_id: String,
    /// Primitive.
    pub primitive: String,
    /// Enforce or monitor.
    pub mode: Mode,
    /// Closed or open.
    pub failure_mode: FailureMode,
    /// What the rule amounts to (after the failure mode when it failed).
    pub decision: DecisionKind,
    /// Tier of a downgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downgrade_to: Option<String>,
    /// The rule's reason.
    #[serde(default)]
    pub reason: Option<String>,
    /// The rule's alert.
    #[serde(default)]
    pub alert: Option<String>,
    /// Facts the rule reported.
    #[serde(default)]
    pub facts: BTreeMap<String, f64>,
    /// The failure, when the rule failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Whether the decision was applied to the request.
    #[serde(default)]
    pub applied: bool,
    /// Evaluation time, µs.
    #[serde(default)]
    pub eval_us: f64,
    /// Provenance: SHA-256 (hex, 64 digits) of the `.wasm` component that evaluated the rule,
    /// as `llmscope policy list` shows it. Absent on lines written before provenance was
    /// recorded and on edge filters' reports (the host never sees a filter's bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component_sha256: Option<String>,
    /// Provenance: hash of the rule's settings — SHA-256 of their canonical JSON (object keys
    /// sorted at every level, no whitespace), hex, its first 16 digits. Absent as
    /// `component_sha256` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings_sha256: Option<String>,
    /// Provenance: the value of every aggregate the rule was given, by key (absent: the rule
    /// declared none, or the line predates provenance).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub aggregates: BTreeMap<String, LoggedAggregate>,
    /// Provenance: the snapshot's `taken_at_unix_ms` (absent: the rule was given no snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_taken_at_ms: Option<u64>,
}

/// One aggregate value as a decision line records it: what the rule's snapshot held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LoggedAggregate {
    /// The value (`null`: no samples in the window).
    pub value: Option<f64>,
    /// Contributing samples.
    #[serde(default)]
    pub samples: u64,
}

impl LoggedAggregate {
    /// Every value of `snapshot`, by key.
    pub fn of_snapshot(snapshot: &Snapshot) -> BTreeMap<String, Self> {
        snapshot
            .values
            .iter()
            .map(|v| {
                (
                    v.key.clone(),
                    Self {
                        value: v.value,
                        samples: v.samples,
                    },
                )
            })
            .collect()
    }
}

impl RuleOutcome {
    /// The outcome of one rule's checked result (see [`Verdict::checked`]): the verdict's
    /// decision, reason, alert and facts; or, when the rule failed, the error with the failure
    /// mode applied (`closed`: deny, with a reason naming the rule; `open`: allow). `applied`
    /// starts false: whether the rule acts depends on its mode and on the other rules.
    pub fn of(
        rule_id: &str,
        primitive: &str,
        mode: Mode,
        failure_mode: FailureMode,
        checked: Result<Verdict, String>,
        eval_us: f64,
    ) -> Self {
        let base = Self {
            rule_id: rule_id.to_owned(),
            primitive: primitive.to_owned(),
            mode,
            failure_mode,
            decision: DecisionKind::Allow,
            downgrade_to: None,
            reason: None,
            alert: None,
            facts: BTreeMap::new(),
            error: None,
            applied: false,
            eval_us,
            component_sha256: None,
            settings_sha256: None,
            aggregates: BTreeMap::new(),
            snapshot_taken_at_ms: None,
        };
        match checked {
            Ok(verdict) => {
                let decision = verdict.decision;
                Self {
                    decision: DecisionKind::from(&decision),
                    downgrade_to: match decision {
                        Decision::Downgrade(tier) => Some(tier),
                        _ => None,
                    },
                    reason: verdict.reason,
                    alert: verdict.alert,
                    facts: verdict.facts.into_iter().collect(),
                    ..base
                }
            }
            Err(error) => {
                let (decision, reason) = match failure_mode {
                    FailureMode::Closed => (
                        DecisionKind::Deny,
                        Some(format!("policy rule {rule_id} failed and fails closed")),
                    ),
                    FailureMode::Open => (DecisionKind::Allow, None),
                };
                Self {
                    decision,
                    reason,
                    error: Some(error),
                    ..base
                }
            }
        }
    }
}

/// How rule outcomes combine into one decision (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    /// The host's rules: all evaluated first, nothing applied yet; the first enforced deny,
    /// else the first enforced downgrade decides.
    Evaluated,
    /// An edge chain's rules: each applied as the request passed; the first applied enforced
    /// deny, else the last applied downgrade decides.
    Applied,
}

impl Combination {
    /// Index of the rule of `rules` (in evaluation order) that decides the request, if any
    /// (none: the request is allowed as asked).
    pub fn deciding(self, rules: &[RuleOutcome]) -> Option<usize> {
        match self {
            Self::Evaluated => {
                let enforced = |kind: DecisionKind| {
                    rules
                        .iter()
                        .position(|r| r.mode == Mode::Enforce && r.decision == kind)
                };
                enforced(DecisionKind::Deny).or_else(|| enforced(DecisionKind::Downgrade))
            }
            Self::Applied => rules
                .iter()
                .position(|r| {
                    r.applied && r.decision == DecisionKind::Deny && r.mode == Mode::Enforce
                })
                .or_else(|| {
                    rules
                        .iter()
                        .rposition(|r| r.applied && r.decision == DecisionKind::Downgrade)
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: &str, mode: Mode, decision: DecisionKind, applied: bool) -> RuleOutcome {
        RuleOutcome {
            applied,
            decision,
            ..RuleOutcome::of(
                id,
                "p",
                mode,
                FailureMode::Closed,
                Ok(Verdict::allow()),
                0.0,
            )
        }
    }

    #[test]
    fn evaluated_rules_first_deny_else_first_downgrade() {
        use DecisionKind::*;
        let rules = [
            rule("m", Mode::Monitor, Deny, false),
            rule("d1", Mode::Enforce, Downgrade, false),
            rule("d2", Mode::Enforce, Downgrade, false),
        ];
        assert_eq!(Combination::Evaluated.deciding(&rules), Some(1));
        let mut with_deny = rules.to_vec();
        with_deny.push(rule("x", Mode::Enforce, Deny, false));
        assert_eq!(Combination::Evaluated.deciding(&with_deny), Some(3));
        assert_eq!(Combination::Evaluated.deciding(&rules[..1]), None);
    }

    #[test]
    fn applied_rules_first_deny_else_last_downgrade() {
        use DecisionKind::*;
        let rules = [
            rule("d1", Mode::Enforce, Downgrade, true),
            rule("d2", Mode::Enforce, Downgrade, true),
            rule("n", Mode::Enforce, Downgrade, false),
        ];
        assert_eq!(Combination::Applied.deciding(&rules), Some(1));
        let mut with_deny = rules.to_vec();
        with_deny.push(rule("x", Mode::Enforce, Deny, true));
        assert_eq!(Combination::Applied.deciding(&with_deny), Some(3));
    }
}
