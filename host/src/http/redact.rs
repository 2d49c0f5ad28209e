//! What a tenant key may be shown of a rule's view of spend. A rule whose aggregates are not
//! all kept per tenant (a namespace-, feature- or experiment-wide budget) sees money other
//! tenants spent; its reasons ("$0.93 spent"), alerts and snapshot values would tell one tenant
//! about the others. For a caller that does not see every tenant ([`Caller::sees_every_tenant`]:
//! authentication on, a key without `*`, `auth.detailed_reasons` off) such text is replaced by
//! a note naming the rule, unless it is text the operator wrote into the rule's settings (a
//! `deny_reason`), which carries no figures. Logs always keep the full text.

use llmscope_sdk::types::Scope;
use serde_json::Value;

use super::request::Caller;
use crate::gateway::{Gateway, SnapshotAnswer};
use crate::policy::{DecisionKind, Evaluation, PolicySet, Rule};

/// Whether what `rule` reports is about the requesting tenant alone: every aggregate it
/// declares is scoped by tenant (a rule with no aggregates sees no spend).
pub fn tenant_bound(rule: &Rule) -> bool {
    rule.aggregates()
        .iter()
        .all(|a| a.scope.contains(&Scope::Tenant))
}

fn find_rule<'a>(set: &'a PolicySet, namespace: Option<&str>, id: &str) -> Option<&'a Rule> {
    let in_ns = namespace.and_then(|n| {
        set.namespaces()
            .find(|ns| ns.name() == n)
            .and_then(|ns| ns.rules().iter().find(|r| r.id() == id))
    });
    in_ns.or_else(|| set.rules().find(|r| r.id() == id))
}

/// Whether `text` is a string the operator wrote in the rule's settings.
fn operator_text(rule: &Rule, text: &str) -> bool {
    match serde_json::from_str::<Value>(rule.settings_json()) {
        Ok(Value::Object(map)) => map.values().any(|v| v.as_str() == Some(text)),
        _ => false,
    }
}

/// The shown form of the rule reasons and alerts of one evaluation.
pub struct Shown {
    /// The deciding rule's reason.
    pub reason: Option<String>,
    /// Every alert, as `rule-id: text`.
    pub alerts: Vec<String>,
}

/// What `caller` is shown of `evaluation`.
pub fn evaluation(gw: &Gateway, caller: &Caller<'_>, evaluation: &Evaluation) -> Shown {
    if caller.sees_every_tenant(gw) {
        return Shown {
            reason: evaluation.reason.clone(),
            alerts: evaluation.alerts.clone(),
        };
    }
    let set = gw.policies();
    let ns = evaluation.namespace.as_deref();
    // A rule that cannot be found (reloaded away since) is treated as shared.
    let private = |id: &str, text: &str| {
        find_rule(&set, ns, id).is_some_and(|r| tenant_bound(r) || operator_text(r, text))
    };
    let reason = match (&evaluation.reason, &evaluation.policy_id) {
        (Some(text), Some(id)) if !private(id, text) => Some(format!(
            "{} by rule `{id}`; details withheld: the rule's budget is shared beyond this \
             tenant (an operator key or the decision log shows them)",
            match evaluation.decision {
                DecisionKind::Deny => "denied",
                DecisionKind::Downgrade => "downgraded",
                DecisionKind::Allow => "noted",
            }
        )),
        (reason, _) => reason.clone(),
    };
    let alerts = evaluation
        .alerts
        .iter()
        .map(|alert| match alert.split_once(": ") {
            Some((id, text)) if private(id, text) => alert.clone(),
            Some((id, _)) => {
                format!("{id}: alert withheld: the rule's aggregates are shared beyond this tenant")
            }
            None => "alert withheld: its rule is shared beyond this tenant".to_owned(),
        })
        .collect();
    Shown { reason, alerts }
}

/// `/v1/snapshot`'s answer as `caller` may see it: for a rule not kept per tenant, the
/// aggregate values are replaced by `"snapshot": null` and a `withheld` note.
pub fn snapshot(gw: &Gateway, caller: &Caller<'_>, answer: &SnapshotAnswer) -> Value {
    let mut value = serde_json::json!(answer);
    if caller.sees_every_tenant(gw) {
        return value;
    }
    let set = gw.policies();
    let shared: Vec<bool> = answer
        .rules
        .iter()
        .map(|r| {
            !find_rule(&set, answer.namespace.as_deref(), &r.rule_id).is_some_and(tenant_bound)
        })
        .collect();
    if let Some(rules) = value.get_mut("rules").and_then(Value::as_array_mut) {
        for (rule, shared) in rules.iter_mut().zip(shared) {
            if let (true, Some(obj)) = (shared, rule.as_object_mut()) {
                obj.insert("snapshot".into(), Value::Null);
                obj.insert(
                    "withheld".into(),
                    Value::String(
                        "this rule's aggregates are not scoped by tenant, so they include other \
                         tenants' spend; a `*` key sees them"
                            .into(),
                    ),
                );
            }
        }
    }
    value
}
