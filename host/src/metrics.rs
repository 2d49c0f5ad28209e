//! Prometheus text exposition of the gateway's counters and the policy-evaluation histogram.

use std::collections::BTreeMap;
use std::fmt::Write;

use parking_lot::Mutex;

/// Upper bounds of the policy-evaluation histogram, in seconds.
const EVAL_BUCKETS: [f64; 10] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 5e-3, 20e-3, 100e-3,
];

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, String), u64>,
    cost_usd: BTreeMap<String, f64>,
    estimated_cost_usd: BTreeMap<String, f64>,
    provider_errors: BTreeMap<(String, String), u64>,
    fallbacks: BTreeMap<String, u64>,
    rule_errors: BTreeMap<String, u64>,
    reloads: BTreeMap<String, u64>,
    edge_calls: BTreeMap<String, u64>,
    eval_buckets: [u64; EVAL_BUCKETS.len()],
    eval_count: u64,
    eval_sum: f64,
    refreshes: u64,
    refresh_seconds_sum: f64,
    last_refresh_seconds: f64,
    ingested_rows: u64,
    malformed_lines: u64,
}

/// Add one to the counter of `key`.
fn bump(counters: &mut BTreeMap<String, u64>, key: &str) {
    *counters.entry(key.to_owned()).or_default() += 1;
}

/// The gateway's metrics.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    /// Count a finished request.
    pub fn request(&self, route: &str, decision: &str, estimated_usd: f64, cost_usd: f64) {
        let mut m = self.inner.lock();
        *m.requests
            .entry((route.to_owned(), decision.to_owned()))
            .or_default() += 1;
        *m.cost_usd.entry(route.to_owned()).or_default() += cost_usd;
        *m.estimated_cost_usd.entry(route.to_owned()).or_default() += estimated_usd;
    }

    /// Observe one namespace evaluation.
    pub fn policy_eval(&self, seconds: f64, rule_errors: &[&str]) {
        let mut m = self.inner.lock();
        for (i, bound) in EVAL_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                m.eval_buckets[i] += 1;
            }
        }
        m.eval_count += 1;
        m.eval_sum += seconds;
        for rule in rule_errors {
            bump(&mut m.rule_errors, rule);
        }
    }

    /// Count a provider failure.
    pub fn provider_error(&self, provider: &str, kind: &str) {
        *self
            .inner
            .lock()
            .provider_errors
            .entry((provider.to_owned(), kind.to_owned()))
            .or_default() += 1;
    }

    /// Count a request answered by a fallback model.
    pub fn fallback(&self, route: &str) {
        bump(&mut self.inner.lock().fallbacks, route);
    }

    /// Observe one ingest + aggregate refresh.
    pub fn refresh(&self, seconds: f64, rows: u64, malformed: u64) {
        let mut m = self.inner.lock();
        m.refreshes += 1;
        m.refresh_seconds_sum += seconds;
        m.last_refresh_seconds = seconds;
        m.ingested_rows += rows;
        m.malformed_lines += malformed;
    }

    /// Count a call from an Envoy filter (`context` or `report`).
    pub fn edge_call(&self, endpoint: &str) {
        bump(&mut self.inner.lock().edge_calls, endpoint);
    }

    /// Count a policy reload attempt (`ok` or `failed`).
    pub fn reload(&self, result: &str) {
        bump(&mut self.inner.lock().reloads, result);
    }

    /// Render in the Prometheus text format; `gauges` (name, help, value) are appended.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let m = self.inner.lock();
        let mut out = String::with_capacity(4096);
        request_counters(&mut out, &m);
        error_counters(&mut out, &m);
        evaluation_histogram(&mut out, &m);
        refresh_metrics(&mut out, &m);
        for (name, help, value) in gauges {
            family(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

/// A metric family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Requests, actual and estimated cost, by route.
fn request_counters(out: &mut String, m: &Inner) {
    family(
        out,
        "llmscope_requests_total",
        "counter",
        "Requests by route and policy decision.",
    );
    for ((route, decision), n) in &m.requests {
        let _ = writeln!(
            out,
            "llmscope_requests_total{{route=\"{}\",decision=\"{decision}\"}} {n}",
            esc(route)
        );
    }
    for (name, help, values) in [
        (
            "llmscope_cost_usd_total",
            "Actual cost of served requests, USD.",
            &m.cost_usd,
        ),
        (
            "llmscope_estimated_cost_usd_total",
            "Pre-dispatch estimates, USD.",
            &m.estimated_cost_usd,
        ),
    ] {
        family(out, name, "counter", help);
        for (route, v) in values {
            let _ = writeln!(out, "{name}{{route=\"{}\"}} {v}", esc(route));
        }
    }
}

/// Provider errors, fallbacks, rule errors, reloads and edge calls.
fn error_counters(out: &mut String, m: &Inner) {
    family(
        out,
        "llmscope_provider_errors_total",
        "counter",
        "Failed provider calls by provider and error type.",
    );
    for ((p, kind), n) in &m.provider_errors {
        let _ = writeln!(
            out,
            "llmscope_provider_errors_total{{provider=\"{}\",type=\"{kind}\"}} {n}",
            esc(p)
        );
    }
    for (name, label, help, values) in [
        (
            "llmscope_fallbacks_total",
            "route",
            "Requests answered by a fallback model.",
            &m.fallbacks,
        ),
        (
            "llmscope_policy_rule_errors_total",
            "rule",
            "Policy rules that failed (trap, deadline, error).",
            &m.rule_errors,
        ),
        (
            "llmscope_policy_reloads_total",
            "result",
            "Policy reload attempts by result.",
            &m.reloads,
        ),
        (
            "llmscope_edge_calls_total",
            "endpoint",
            "Calls from Envoy filters by endpoint (context, report).",
            &m.edge_calls,
        ),
    ] {
        family(out, name, "counter", help);
        for (key, n) in values {
            let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {n}", esc(key));
        }
    }
}

/// Policy evaluation time.
fn evaluation_histogram(out: &mut String, m: &Inner) {
    family(
        out,
        "llmscope_policy_evaluation_seconds",
        "histogram",
        "Time to evaluate a namespace's rules.",
    );
    for (bound, n) in EVAL_BUCKETS.iter().zip(m.eval_buckets) {
        let _ = writeln!(
            out,
            "llmscope_policy_evaluation_seconds_bucket{{le=\"{bound}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "llmscope_policy_evaluation_seconds_bucket{{le=\"+Inf\"}} {}",
        m.eval_count
    );
    let _ = writeln!(out, "llmscope_policy_evaluation_seconds_sum {}", m.eval_sum);
    let _ = writeln!(
        out,
        "llmscope_policy_evaluation_seconds_count {}",
        m.eval_count
    );
}

/// Ingestion and refresh counters, and the last refresh's duration.
fn refresh_metrics(out: &mut String, m: &Inner) {
    for (name, help, value) in [
        (
            "llmscope_ingested_rows_total",
            "Log rows ingested into DuckDB.",
            m.ingested_rows as f64,
        ),
        (
            "llmscope_malformed_log_lines_total",
            "Malformed log lines skipped by ingestion.",
            m.malformed_lines as f64,
        ),
        (
            "llmscope_aggregate_refreshes_total",
            "Ingest + aggregate refresh passes.",
            m.refreshes as f64,
        ),
        (
            "llmscope_aggregate_refresh_seconds_total",
            "Time spent in refresh passes.",
            m.refresh_seconds_sum,
        ),
    ] {
        family(out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(
        out,
        "llmscope_aggregate_refresh_last_seconds",
        "gauge",
        "Duration of the last refresh pass.",
    );
    let _ = writeln!(
        out,
        "llmscope_aggregate_refresh_last_seconds {}",
        m.last_refresh_seconds
    );
}

fn esc(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_gauges_grouped_by_family() {
        let m = Metrics::default();
        m.request("/answer-routed", "deny", 0.01, 0.0);
        m.request("/answer-routed", "allow", 0.01, 0.002);
        m.policy_eval(30e-6, &["bad"]);
        let text = m.render(&[("llmscope_ready", "1 when ready.", 1.0)]);
        assert!(
            text.contains("llmscope_requests_total{route=\"/answer-routed\",decision=\"deny\"} 1")
        );
        assert!(text.contains("llmscope_policy_evaluation_seconds_bucket{le=\"0.00005\"} 1"));
        assert!(text.contains("llmscope_policy_evaluation_seconds_bucket{le=\"0.000025\"} 0"));
        assert!(text.contains("llmscope_policy_rule_errors_total{rule=\"bad\"} 1"));
        let type_line = text.find("# TYPE llmscope_requests_total counter").unwrap();
        let sample = text.find("llmscope_requests_total{").unwrap();
        let next_family = text.find("# HELP llmscope_cost_usd_total").unwrap();
        assert!(type_line < sample && sample < next_family);
        assert!(text.ends_with("llmscope_ready 1\n"));
    }
}
