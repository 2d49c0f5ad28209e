//! `route_preference`: send a route's traffic to a preferred (cheaper) tier.
//!
//! When the request's route matches (`route_name` absent matches every route) and the requested
//! tier is pricier than `prefer_tier` for this request, the rule downgrades to `prefer_tier`.
//! "Pricier" compares the host's per-tier estimates for this very request, so a route whose tiers
//! are named differently still works; a request already at or below the preferred tier's price is
//! allowed unchanged.
//!
//! ```yaml
//! - id: demo-route-preference
//!   primitive: route_preference
//!   route_name: "/answer-routed"   # optional; absent = every route
//!   prefer_tier: cheap
//! ```

use llmscope_sdk::prelude::*;
use serde::Deserialize;

/// The `route_preference` primitive.
pub struct RoutePreference;

/// Settings of a `route_preference` rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Route the preference applies to; `None` applies it to every route.
    #[serde(default)]
    pub route_name: Option<String>,
    /// Tier requests should use.
    pub prefer_tier: String,
}

impl Policy for RoutePreference {
    type Settings = Settings;
    const NAME: &'static str = "route_preference";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Downgrades a route's requests to a preferred tier when the requested one is pricier";

    fn configure(s: &Settings) -> Result<Vec<Aggregate>, String> {
        if s.prefer_tier.trim().is_empty() {
            return Err("prefer_tier: must name a tier of the route, e.g. `cheap`".into());
        }
        if let Some(route) = &s.route_name {
            if !route.starts_with('/') {
                return Err(format!(
                    "route_name: must be a route path starting with `/`, e.g. `/answer-routed`, got `{route}`"
                ));
            }
        }
        Ok(Vec::new())
    }

    fn evaluate(s: &Settings, req: &RequestContext, _: &Snapshot) -> Result<Verdict, String> {
        if s.route_name.as_ref().is_some_and(|r| *r != req.route_name)
            || req.requested_tier == s.prefer_tier
        {
            return Ok(Verdict::allow());
        }
        let reason = format!("route {} prefers tier `{}`", req.route_name, s.prefer_tier);
        if req.tiers.is_empty() {
            // No per-tier prices supplied: fall back to the name comparison.
            return Ok(Verdict::downgrade(&s.prefer_tier, reason));
        }
        let Some(preferred) = req.tier(&s.prefer_tier) else {
            return Ok(Verdict::allow().with_alert(format!(
                "route {} has no tier `{}`; request left at `{}`",
                req.route_name, s.prefer_tier, req.requested_tier
            )));
        };
        let requested = req
            .tier(&req.requested_tier)
            .map_or(req.estimated_cost_usd, |t| t.estimated_cost_usd);
        let verdict = if requested > preferred.estimated_cost_usd {
            Verdict::downgrade(&s.prefer_tier, reason)
        } else {
            Verdict::allow()
        };
        Ok(verdict
            .with_fact("requested_tier_cost_usd", requested)
            .with_fact("preferred_tier_cost_usd", preferred.estimated_cost_usd))
    }
}

export_policy!(RoutePreference);

#[cfg(test)]
mod tests {
    use super::*;
    use llmscope_sdk::testing::{request, Harness};
    use serde_json::json;

    fn seed_rule() -> Harness<RoutePreference> {
        Harness::new(json!({"route_name": "/answer-routed", "prefer_tier": "cheap"})).unwrap()
    }

    #[test]
    fn downgrades_expensive_requests_on_the_route() {
        let v = seed_rule()
            .evaluate(&request(), &Snapshot::default())
            .unwrap();
        assert_eq!(v.decision, Decision::Downgrade("cheap".into()));
        assert_eq!(
            v.reason.as_deref(),
            Some("route /answer-routed prefers tier `cheap`")
        );
        assert!(
            v.fact("requested_tier_cost_usd").unwrap() > v.fact("preferred_tier_cost_usd").unwrap()
        );
    }

    #[test]
    fn allows_other_routes_and_the_preferred_tier() {
        let mut other = request();
        other.route_name = "/conversation-turn".into();
        assert_eq!(
            seed_rule()
                .evaluate(&other, &Snapshot::default())
                .unwrap()
                .decision,
            Decision::Allow
        );
        let mut cheap = request();
        cheap.requested_tier = "cheap".into();
        assert_eq!(
            seed_rule()
                .evaluate(&cheap, &Snapshot::default())
                .unwrap()
                .decision,
            Decision::Allow
        );
    }

    #[test]
    fn absent_route_name_applies_everywhere() {
        let h = Harness::<RoutePreference>::new(json!({"prefer_tier": "cheap"})).unwrap();
        let mut other = request();
        other.route_name = "/conversation-turn".into();
        assert_eq!(
            h.evaluate(&other, &Snapshot::default()).unwrap().decision,
            Decision::Downgrade("cheap".into())
        );
    }

    #[test]
    fn never_downgrades_to_a_pricier_tier() {
        let h = Harness::<RoutePreference>::new(json!({"prefer_tier": "expensive"})).unwrap();
        let mut req = request();
        req.requested_tier = "cheap".into();
        req.estimated_cost_usd = req.tiers[0].estimated_cost_usd;
        assert_eq!(
            h.evaluate(&req, &Snapshot::default()).unwrap().decision,
            Decision::Allow
        );
    }

    #[test]
    fn missing_preferred_tier_allows_with_alert() {
        let h = Harness::<RoutePreference>::new(json!({"prefer_tier": "tiny"})).unwrap();
        let v = h.evaluate(&request(), &Snapshot::default()).unwrap();
        assert_eq!(v.decision, Decision::Allow);
        assert!(v.alert.unwrap().contains("no tier `tiny`"));
    }

    #[test]
    fn without_tier_prices_falls_back_to_names() {
        let mut req = request();
        req.tiers.clear();
        assert_eq!(
            seed_rule()
                .evaluate(&req, &Snapshot::default())
                .unwrap()
                .decision,
            Decision::Downgrade("cheap".into())
        );
    }

    #[test]
    fn rejects_bad_settings() {
        let err = |v| Harness::<RoutePreference>::new(v).err().unwrap();
        assert!(err(json!({"prefer_tier": " "})).starts_with("prefer_tier:"));
        assert!(
            err(json!({"prefer_tier": "cheap", "route_name": "answer"})).starts_with("route_name:")
        );
        assert!(err(json!({"route_name": "/a"})).contains("missing field `prefer_tier`"));
        assert!(
            err(json!({"prefer_tier": "cheap", "prefer": "x"})).contains("unknown field `prefer`")
        );
    }
}
