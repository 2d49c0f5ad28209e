//! The Envoy filter's parsers, which run inside Envoy on bytes from operators, clients, the host
//! and upstreams: the plugin configuration, the host's context answer (then the verdict logic),
//! request bodies being rewritten, and usage extraction from upstream responses (JSON or SSE).
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use llmscope_sdk::edge::{self, ContextAnswer};
use llmscope_sdk::Policy;

fn config() -> Option<edge::FilterConfig> {
    edge::parse_config::<budget_threshold::BudgetThreshold>(
        br#"{"rule": {"id": "cap", "period": "hourly", "limit_usd": 1.0, "action": "deny"},
             "host": {"cluster": "llmscope"}}"#,
    )
    .ok()
    .map(|(c, _)| c)
}

fuzz_target!(|data: &[u8]| {
    let _ = edge::parse_config::<budget_threshold::BudgetThreshold>(data);
    let _ = edge::parse_config::<route_preference::RoutePreference>(data);
    let _ = edge::parse_usage(data);
    let _ = edge::model_of_response(data);
    if let Ok(answer) = serde_json::from_slice::<ContextAnswer>(data) {
        if let (Some(cfg), Ok((_, settings))) = (
            config(),
            edge::parse_config::<budget_threshold::BudgetThreshold>(
                br#"{"rule": {"id": "cap", "period": "hourly", "limit_usd": 1.0, "action": "deny"},
                     "host": {"cluster": "llmscope"}}"#,
            ),
        ) {
            let result = budget_threshold::BudgetThreshold::evaluate(
                &settings,
                &answer.request,
                &answer.snapshot,
            );
            let (_, action) = edge::decide(&cfg, &answer.request, result, 0.0);
            if let edge::Action::Downgrade { tier } = action {
                let mut body = serde_json::json!({"model": "m", "messages": []});
                edge::rewrite_tier(&mut body, &tier, &answer.tier_models);
            }
        }
    }
    if let Ok(mut body) = serde_json::from_slice::<serde_json::Value>(data) {
        let models: BTreeMap<String, String> =
            [("cheap".to_owned(), "gpt-4o-mini".to_owned())].into();
        let chat = edge::is_chat(&body);
        edge::rewrite_tier(&mut body, "cheap", &models);
        let _ = llmscope_sdk::http::deny_body(chat, "reason", Some("rule"), "req-1");
    }
});
