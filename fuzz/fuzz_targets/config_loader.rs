//! The gateway configuration loader on arbitrary text: every input is either a configuration or
//! a list of problems with field paths, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use llmscope_wire::config::GatewayConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |name: &str| (name == "LLMSCOPE_FUZZ_KEY").then(|| "k".to_owned());
    match GatewayConfig::parse(text, Path::new("/fuzz/llmscope.yaml"), &env) {
        Ok(cfg) => {
            // A valid config's default route exists, and every tier maps to a priced model.
            assert!(cfg.routes.contains_key(&cfg.default_route));
            for route in cfg.routes.values() {
                assert!(route.tiers.values().all(|m| cfg.models.contains_key(m)));
            }
        }
        Err(e) => assert!(!e.problems.is_empty()),
    }
});
