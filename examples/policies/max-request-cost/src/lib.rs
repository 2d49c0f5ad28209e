//! `max_request_cost`: an example of a policy written outside the llmscope core, using the SDK
//! alone. It denies any single request whose estimated cost exceeds `max_usd`.
//!
//! Build it with `cargo xtask build-policies` (or alone with `llmscope policy build
//! examples/policies/max-request-cost`; `llmscope policy test` on the same directory also runs its
//! `cases.yaml`), copy `max_request_cost.wasm` into the gateway's policies directory, and name its
//! primitive in the policy YAML; the host needs no change:
//!
//! ```yaml
//! - id: "demo-max-request"
//!   primitive: max_request_cost
//!   max_usd: 0.01
//! ```

use llmscope_sdk::prelude::*;
use serde::Deserialize;

/// The `max_request_cost` primitive.
pub struct MaxRequestCost;

/// Settings of a `max_request_cost` rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Largest estimated cost allowed for one request, in US dollars.
    pub max_usd: f64,
}

impl Policy for MaxRequestCost {
    type Settings = Settings;
    const NAME: &'static str = "max_request_cost";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Denies any single request whose estimate exceeds max_usd";

    fn configure(s: &Settings) -> Result<Vec<Aggregate>, String> {
        if !(s.max_usd.is_finite() && s.max_usd > 0.0) {
            return Err(format!(
                "max_usd: must be a positive number of US dollars, got {}",
                s.max_usd
            ));
        }
        Ok(Vec::new())
    }

    fn evaluate(s: &Settings, req: &RequestContext, _: &Snapshot) -> Result<Verdict, String> {
        let verdict = if req.estimated_cost_usd > s.max_usd {
            Verdict::deny(format!(
                "request estimated at ${:.6} exceeds the per-request maximum ${:.6}",
                req.estimated_cost_usd, s.max_usd
            ))
        } else {
            Verdict::allow()
        };
        Ok(verdict.with_fact("max_usd", s.max_usd))
    }
}

export_policy!(MaxRequestCost);

#[cfg(test)]
mod tests {
    use super::*;
    use llmscope_sdk::testing::{request, Harness};

    #[test]
    fn denies_above_and_allows_at_the_maximum() {
        let h = Harness::<MaxRequestCost>::new(serde_json::json!({"max_usd": 0.01})).unwrap();
        let mut req = request();
        req.estimated_cost_usd = 0.0100001;
        assert_eq!(
            h.evaluate(&req, &Snapshot::default()).unwrap().decision,
            Decision::Deny
        );
        req.estimated_cost_usd = 0.01;
        assert_eq!(
            h.evaluate(&req, &Snapshot::default()).unwrap().decision,
            Decision::Allow
        );
    }

    #[test]
    fn rejects_non_positive_maximum() {
        let err = Harness::<MaxRequestCost>::new(serde_json::json!({"max_usd": 0}))
            .err()
            .unwrap();
        assert!(err.starts_with("max_usd:"), "{err}");
    }
}
