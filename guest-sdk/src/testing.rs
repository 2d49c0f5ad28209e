//! Native test harness: run a policy on the host target through the same entry points the
//! component uses (settings JSON text in, settings parsed and validated, verdict out), without
//! building wasm.
//!
//! ```
//! # use llmscope_sdk::prelude::*;
//! # use llmscope_sdk::testing::{request, snapshot, Harness};
//! # struct P;
//! # #[derive(serde::Deserialize)] struct S { limit: f64 }
//! # impl Policy for P {
//! #   type Settings = S; const NAME: &'static str = "p"; const VERSION: &'static str = "0";
//! #   const DESCRIPTION: &'static str = "";
//! #   fn configure(_: &S) -> Result<Vec<Aggregate>, String> { Ok(vec![]) }
//! #   fn evaluate(s: &S, _: &RequestContext, snap: &Snapshot) -> Result<Verdict, String> {
//! #     Ok(if snap.value("spent").unwrap_or(0.0) > s.limit { Verdict::deny("over") } else { Verdict::allow() })
//! #   }
//! # }
//! let h = Harness::<P>::new(serde_json::json!({"limit": 1.0})).unwrap();
//! let v = h.evaluate(&request(), &snapshot(&[("spent", Some(2.0), 3)])).unwrap();
//! assert_eq!(v.decision, Decision::Deny);
//! ```

use std::marker::PhantomData;

use crate::types::{Aggregate, AggregateValue, RequestContext, Snapshot, TierEstimate, Verdict};
use crate::Policy;

/// A configured rule of policy `P`, evaluated natively.
pub struct Harness<P: Policy> {
    settings_json: String,
    aggregates: Vec<Aggregate>,
    _policy: PhantomData<P>,
}

impl<P: Policy> Harness<P> {
    /// Configure a rule with `settings` (a JSON object), as the host does at load.
    pub fn new(settings: serde_json::Value) -> Result<Self, String> {
        Self::from_json(&settings.to_string())
    }

    /// Configure a rule from settings JSON text.
    pub fn from_json(settings_json: &str) -> Result<Self, String> {
        let aggregates = crate::configure::<P>(settings_json)?;
        Ok(Self {
            settings_json: settings_json.to_owned(),
            aggregates,
            _policy: PhantomData,
        })
    }

    /// The aggregates the rule declared.
    pub fn aggregates(&self) -> &[Aggregate] {
        &self.aggregates
    }

    /// The settings JSON text the rule was configured with.
    pub fn settings_json(&self) -> &str {
        &self.settings_json
    }

    /// Evaluate one request.
    pub fn evaluate(
        &self,
        request: &RequestContext,
        snapshot: &Snapshot,
    ) -> Result<Verdict, String> {
        crate::evaluate::<P>(&self.settings_json, request, snapshot)
    }
}

/// A plausible request to start a test from: tenant `acme`, namespace `demo`, route
/// `/answer-routed`, requested tier `expensive` (gpt-4o) with a `cheap` tier (gpt-4o-mini) on
/// offer, 100 input tokens, 500 expected output tokens.
pub fn request() -> RequestContext {
    let cheap = 100.0 * 0.15 / 1e6 + 500.0 * 0.60 / 1e6;
    let expensive = 100.0 * 2.50 / 1e6 + 500.0 * 10.0 / 1e6;
    RequestContext {
        request_id: "req-test-1".into(),
        tenant_id: "acme".into(),
        caller_id: None,
        feature_id: Some("summarize".into()),
        experiment_id: None,
        budget_namespace: "demo".into(),
        route_name: "/answer-routed".into(),
        requested_tier: "expensive".into(),
        model: "gpt-4o".into(),
        estimated_tokens_in: 100,
        estimated_tokens_out: 500,
        estimated_cost_usd: expensive,
        tiers: vec![
            TierEstimate {
                tier: "cheap".into(),
                model: "gpt-4o-mini".into(),
                estimated_cost_usd: cheap,
            },
            TierEstimate {
                tier: "expensive".into(),
                model: "gpt-4o".into(),
                estimated_cost_usd: expensive,
            },
        ],
        unix_time_ms: 1_764_000_000_000,
    }
}

/// A snapshot from `(key, value, samples)` triples.
pub fn snapshot(values: &[(&str, Option<f64>, u64)]) -> Snapshot {
    Snapshot {
        taken_at_unix_ms: 1_764_000_000_000,
        values: values
            .iter()
            .map(|(key, value, samples)| AggregateValue {
                key: (*key).to_owned(),
                value: *value,
                samples: *samples,
            })
            .collect(),
    }
}
