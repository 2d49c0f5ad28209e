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
        crate::otel::record_evaluation(seconds);
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

    /// Every counter family (requests, costs, errors, reloads, edge calls, ingestion) and the
    /// last refresh's duration; the evaluation histogram is [`Metrics::evaluation`].
    pub fn families(&self) -> Vec<Family> {
        let m = self.inner.lock();
        let mut out = Vec::with_capacity(16);
        let mut requests = Family::new(
            "llmscope_requests_total",
            Kind::Counter,
            "Requests by route and policy decision.",
        );
        for ((route, decision), n) in &m.requests {
            requests.push(
                vec![("route", route.clone()), ("decision", decision.clone())],
                *n as f64,
            );
        }
        out.push(requests);
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
            let mut f = Family::new(name, Kind::Counter, help);
            for (route, v) in values {
                f.push(vec![("route", route.clone())], *v);
            }
            out.push(f);
        }
        let mut errors = Family::new(
            "llmscope_provider_errors_total",
            Kind::Counter,
            "Failed provider calls by provider and error type.",
        );
        for ((provider, kind), n) in &m.provider_errors {
            errors.push(
                vec![("provider", provider.clone()), ("type", kind.clone())],
                *n as f64,
            );
        }
        out.push(errors);
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
            let mut f = Family::new(name, Kind::Counter, help);
            for (key, n) in values {
                f.push(vec![(label, key.clone())], *n as f64);
            }
            out.push(f);
        }
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
            out.push(Family::one(name, Kind::Counter, help, value));
        }
        out.push(Family::one(
            "llmscope_aggregate_refresh_last_seconds",
            Kind::Gauge,
            "Duration of the last refresh pass.",
            m.last_refresh_seconds,
        ));
        out
    }

    /// The policy-evaluation histogram as it stands.
    pub fn evaluation(&self) -> Histogram {
        let m = self.inner.lock();
        Histogram {
            name: EVALUATION,
            help: EVALUATION_HELP,
            bounds: &EVAL_BUCKETS,
            cumulative: m.eval_buckets.to_vec(),
            count: m.eval_count,
            sum: m.eval_sum,
        }
    }

    /// Render in the Prometheus text format: these metrics, then `extra` (the gateway's
    /// gauges and the alert and shared-budget families).
    pub fn render(&self, extra: &[Family]) -> String {
        let mut out = String::with_capacity(4096);
        for f in self.families() {
            f.render(&mut out);
        }
        self.evaluation().render(&mut out);
        for f in extra {
            f.render(&mut out);
        }
        out
    }
}

/// The policy-evaluation histogram's name.
pub const EVALUATION: &str = "llmscope_policy_evaluation_seconds";
const EVALUATION_HELP: &str = "Time to evaluate a namespace's rules.";

/// Whether a family's values only grow (a counter) or go up and down (a gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic since start.
    Counter,
    /// A current value.
    Gauge,
}

/// One metric family: a name, its help text and kind, and one value per label set. The
/// Prometheus text (`/metrics`) and the OTLP export are both rendered from these.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// Prometheus name (counters end in `_total`; the OTLP export drops that suffix).
    pub name: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// `(labels, value)` pairs.
    pub samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Family {
    /// A family without samples yet.
    pub fn new(name: &'static str, kind: Kind, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    /// A family of one unlabelled value.
    pub fn one(name: &'static str, kind: Kind, help: &'static str, value: f64) -> Self {
        let mut f = Self::new(name, kind, help);
        f.push(Vec::new(), value);
        f
    }

    /// Add the value of one label set.
    pub fn push(&mut self, labels: Vec<(&'static str, String)>, value: f64) {
        self.samples.push((labels, value));
    }

    fn render(&self, out: &mut String) {
        let kind = match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        family(out, self.name, kind, self.help);
        for (labels, value) in &self.samples {
            out.push_str(self.name);
            if !labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{k}=\"{}\"", esc(v));
                }
                out.push('}');
            }
            let _ = writeln!(out, " {value}");
        }
    }
}

/// A histogram's state: cumulative counts per upper bound (Prometheus `le` buckets), the
/// count and the sum.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Prometheus name.
    pub name: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Upper bounds.
    pub bounds: &'static [f64],
    /// Observations at or below each bound.
    pub cumulative: Vec<u64>,
    /// Observations.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
}

impl Histogram {
    fn render(&self, out: &mut String) {
        let name = self.name;
        family(out, name, "histogram", self.help);
        for (bound, n) in self.bounds.iter().zip(&self.cumulative) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// The upper bounds of the policy-evaluation histogram, in seconds.
pub fn evaluation_bounds() -> &'static [f64] {
    &EVAL_BUCKETS
}

/// A metric family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
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
        let text = m.render(&[Family::one(
            "llmscope_ready",
            Kind::Gauge,
            "1 when ready.",
            1.0,
        )]);
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
