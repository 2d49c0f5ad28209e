//! `/infer` and chat-completions bodies (and the `x-llmscope-*` headers beside them) against the
//! demo routes: every body is either an `Inference` or errors naming fields, never a panic.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use llmscope_wire::config::GatewayConfig;
use llmscope_wire::requests::{parse_chat, parse_infer};

const CONFIG: &str = r#"
policy: {file: policy.yaml, policies_dir: .}
defaults: {route: /answer-routed, tier: cheap}
models:
  gpt-4o-mini: {provider: mock, input_per_1m: 0.15, output_per_1m: 0.60}
  gpt-4o: {provider: mock, input_per_1m: 2.50, output_per_1m: 10.00}
routes:
  /answer-routed: {max_output_tokens: 500, tiers: {cheap: gpt-4o-mini, expensive: gpt-4o}}
providers:
  mock: {kind: mock}
"#;

fn config() -> &'static GatewayConfig {
    static CFG: OnceLock<GatewayConfig> = OnceLock::new();
    CFG.get_or_init(|| {
        GatewayConfig::parse(CONFIG, Path::new("/fuzz/llmscope.yaml"), &|_| None)
            .unwrap_or_else(|e| panic!("fuzz config: {e}"))
    })
}

fuzz_target!(|data: &[u8]| {
    // First line: `name: value` headers separated by `;`; the rest: the JSON body.
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(0);
    let (head, body) = data.split_at(split);
    let headers: BTreeMap<String, String> = String::from_utf8_lossy(head)
        .split(';')
        .filter_map(|h| {
            let (k, v) = h.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect();
    let header = |name: &str| headers.get(name).cloned();
    let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice(body) else {
        return;
    };
    let cfg = config();
    match parse_infer(&obj, &header, cfg) {
        Ok(inf) => {
            assert!(!inf.tenant_id.trim().is_empty());
            assert_eq!(inf.messages.len(), 1);
        }
        Err(fields) => assert!(!fields.is_empty()),
    }
    match parse_chat(&obj, &header, cfg) {
        Ok(inf) => {
            assert!(!inf.tenant_id.is_empty());
            assert!(!inf.messages.is_empty());
        }
        Err(e) => assert!(e.status >= 400 && !e.message.is_empty()),
    }
});
