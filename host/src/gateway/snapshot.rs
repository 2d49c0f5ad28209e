//! `/v1/snapshot`: the context and per-rule snapshots a request with given attributes would be
//! evaluated with right now.

use llmscope_sdk::types::RequestContext;

use crate::snapshots::LiveSnapshots;

use super::{Gateway, GatewayError};

/// Attributes of a request whose snapshot is asked for.
#[derive(Debug, Clone)]
pub struct SnapshotQuery {
    /// Tenant.
    pub tenant_id: String,
    /// Caller.
    pub caller_id: Option<String>,
    /// Feature.
    pub feature_id: Option<String>,
    /// Experiment.
    pub experiment_id: Option<String>,
    /// Namespace asked for.
    pub budget_namespace: Option<String>,
    /// Route.
    pub route_name: String,
    /// Tier.
    pub model_tier: String,
    /// Input tokens (counted by the caller).
    pub tokens_in: u32,
    /// Output-token cap.
    pub max_tokens: Option<u32>,
}

/// One rule's settings and current snapshot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuleSnapshot {
    /// Rule id.
    pub rule_id: String,
    /// Primitive.
    pub primitive: String,
    /// The rule's settings (what `evaluate` receives).
    pub settings: serde_json::Value,
    /// Values of the rule's declared aggregates.
    pub snapshot: llmscope_sdk::types::Snapshot,
}

/// What `/v1/snapshot` answers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotAnswer {
    /// Resolved namespace (`None`: no rules apply).
    pub namespace: Option<String>,
    /// The policy file's version.
    pub policy_version: String,
    /// The priced request context.
    pub request: RequestContext,
    /// Each rule of the namespace, in order.
    pub rules: Vec<RuleSnapshot>,
}

impl Gateway {
    /// The context and per-rule snapshots a request with these attributes would be evaluated
    /// with right now (no reservation is made). For edge proxies that evaluate the policies
    /// themselves (the Envoy filters) and for debugging budgets.
    ///
    /// With the redis backend the sums are the replicas' (one read); when Redis does not
    /// answer they are this replica's own.
    pub async fn snapshot_for(&self, q: &SnapshotQuery) -> Result<SnapshotAnswer, GatewayError> {
        let policies = self.policies();
        let ctx = self.price_query(q, &policies)?;
        let ns = policies.resolve(q.budget_namespace.as_deref());
        let shared = self.shared_read(&policies, &ctx, None).await;
        let _view = self.view();
        let store = self.store();
        let source = LiveSnapshots {
            store: store.as_ref(),
            ledger: &self.ledger,
            own: None,
            shared: self.shared.as_deref().zip(shared.as_ref()),
        };
        let rules = ns
            .map(|ns| {
                ns.rules()
                    .iter()
                    .map(|r| RuleSnapshot {
                        rule_id: r.id().to_owned(),
                        primitive: r.primitive().to_owned(),
                        settings: serde_json::from_str(r.settings_json())
                            .unwrap_or(serde_json::Value::Null),
                        snapshot: crate::policy::SnapshotSource::snapshot(&source, r, &ctx),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(SnapshotAnswer {
            namespace: ns.map(|n| n.name().to_owned()),
            policy_version: policies.version().to_owned(),
            request: ctx,
            rules,
        })
    }
}
