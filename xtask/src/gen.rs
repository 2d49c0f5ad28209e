//! `cargo xtask gen-telemetry --rows N --out DIR`: realistic synthetic logs in the gateway's
//! record format — 50 tenants, 8 features, 2 routes, 3 namespaces, 5 experiments, 4 models with
//! the seed's prices, 5% fallbacks, 4% denials, spread over the 30 days before now. A fixed seed
//! makes runs comparable.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// A tiny deterministic PRNG (xorshift64*), enough for synthetic data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const FEATURES: [&str; 8] = [
    "summarize",
    "chat",
    "search",
    "classify",
    "extract",
    "translate",
    "draft",
    "review",
];
const ROUTES: [&str; 2] = ["/answer-routed", "/conversation-turn"];
const NAMESPACES: [&str; 3] = ["default", "demo", "enterprise"];
/// (model, tier, input $/1M, output $/1M)
const MODELS: [(&str, &str, f64, f64); 4] = [
    ("gpt-4o-mini", "cheap", 0.15, 0.60),
    ("gpt-4o", "expensive", 2.50, 10.00),
    ("claude-haiku-3-5-20241022", "cheap", 0.80, 4.00),
    ("claude-sonnet-4-20250514", "expensive", 3.00, 15.00),
];

fn rfc3339(ms: u64) -> String {
    // Civil-from-days (Howard Hinnant), UTC.
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Write `rows` telemetry lines and as many decision lines into `dir`.
pub fn generate(dir: &Path, rows: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let span_ms = 30 * 86_400_000u64;
    let mut t =
        BufWriter::with_capacity(1 << 20, std::fs::File::create(dir.join("telemetry.jsonl"))?);
    let mut d = BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(dir.join("policy_decisions.jsonl"))?,
    );
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for i in 0..rows {
        // Time increases with i, so the file is in arrival order like a real log.
        let ts = now_ms - span_ms + span_ms * i / rows.max(1) + rng.below(1000);
        let tenant = format!("tenant-{:02}", rng.below(50));
        let feature = FEATURES[rng.below(FEATURES.len() as u64) as usize];
        let route = ROUTES[rng.below(2) as usize];
        let ns = NAMESPACES[rng.below(3) as usize];
        let exp = if rng.below(3) == 0 {
            format!("\"exp-{}\"", rng.below(5))
        } else {
            "null".into()
        };
        let (model, tier, pin, pout) = MODELS[rng.below(4) as usize];
        let tin = 50 + rng.below(2000);
        let tout = 20 + rng.below(480);
        let denied = rng.below(25) == 0;
        let fallback = !denied && rng.below(20) == 0;
        let est = (tin as f64 * pin + 500.0 * pout) / 1e6;
        let cost = if denied {
            0.0
        } else {
            (tin as f64 * pin + tout as f64 * pout) / 1e6
        };
        let latency = if denied {
            0.0
        } else {
            200.0 + rng.unit() * 1800.0 + if fallback { 1500.0 } else { 0.0 }
        };
        let finish = if denied {
            "null"
        } else if tout >= 480 {
            "\"length\""
        } else {
            "\"stop\""
        };
        let decision = if denied {
            "deny"
        } else if rng.below(6) == 0 {
            "downgrade"
        } else {
            "allow"
        };
        let status = if denied { "denied" } else { "ok" };
        // The seed's route tiers (cheap: gpt-4o-mini, expensive: gpt-4o), priced as the host
        // prices them: input tokens plus the 500-token output budget.
        let tier_est = |i: f64, o: f64| (tin as f64 * i + 500.0 * o) / 1e6;
        let (cheap_est, expensive_est) = (tier_est(0.15, 0.60), tier_est(2.50, 10.00));
        let requested_model = if tier == "cheap" {
            "gpt-4o-mini"
        } else {
            "gpt-4o"
        };
        let ts = rfc3339(ts);
        writeln!(
            t,
            r#"{{"schema_version":"1.0","timestamp":"{ts}","request_id":"req-{i:012}","tenant_id":"{tenant}","caller_id":null,"feature_id":"{feature}","use_case":"{feature}","experiment_id":{exp},"budget_namespace":"{ns}","audit_tags":{{"feature_id":"{feature}","experiment_id":{exp},"budget_namespace":"{ns}"}},"route_name":"{route}","route":"{route}","requested_model_tier":"{tier}","model_tier":"{tier}","provider":"mock","model":"{model}","tokens_in":{tin},"tokens_out":{tout},"tokens_total":{},"estimated_cost_usd":{est},"cost_usd":{cost},"cost_source":"provider_usage","latency_ms":{latency:.3},"status":"{status}","finish_reason":{finish},"is_fallback":{fallback},"fallback_reason":null,"error_type":null,"policy_decision":"{decision}","policy_id":null}}"#,
            tin + tout
        )?;
        writeln!(
            d,
            r#"{{"timestamp":"{ts}","request_id":"req-{i:012}","tenant_id":"{tenant}","caller_id":null,"feature_id":"{feature}","experiment_id":{exp},"budget_namespace":"{ns}","route_name":"{route}","requested_model_tier":"{tier}","effective_model_tier":"{tier}","primitive":null,"decision":"{decision}","reason":null,"policy_id":null,"estimated_cost_usd":{est},"latency_ms":0.02,"window_cost_usd":null,"window_limit_usd":null,"policy_version":"bench","alerts":[],"rules":[],"policy_input":{{"model":"{requested_model}","estimated_tokens_in":{tin},"estimated_tokens_out":500,"tiers":[{{"tier":"cheap","model":"gpt-4o-mini","estimated_cost_usd":{cheap_est}}},{{"tier":"expensive","model":"gpt-4o","estimated_cost_usd":{expensive_est}}}]}}}}"#
        )?;
    }
    t.flush()?;
    d.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_764_000_000_123), "2025-11-24T16:00:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
