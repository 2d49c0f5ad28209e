//! OpenTelemetry traces from the real binary to an OTLP/HTTP receiver in the test, decoding the
//! real protobuf (`opentelemetry-proto`): one trace per request with its pricing, evaluation
//! (one span per rule), dispatch and settlement spans and the GenAI / llmscope attributes, for
//! an allowed, a downgraded and a denied request; an incoming `traceparent` continued; a
//! collector that is down changes no response. Metrics: every `/metrics` family and the
//! evaluation histogram over OTLP/HTTP with the same values; traces and metrics over gRPC to
//! a tonic receiver.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "integration tests: a failed unwrap or panic is a failed test"
)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llmscope_tests::gateway::{Gateway, Options};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as Number;
use opentelemetry_proto::tonic::metrics::v1::Metric;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{json, Value};

/// An OTLP/HTTP receiver: every span it was sent.
struct Collector {
    port: u16,
    receiver: llmscope_tests::receiver::Receiver,
}

impl Collector {
    async fn start() -> Self {
        let receiver = llmscope_tests::receiver::Receiver::start(0).await;
        Self {
            port: receiver.port,
            receiver,
        }
    }

    /// Every span received so far, decoded from the OTLP protobuf.
    fn spans(&self) -> Vec<Span> {
        let mut spans = Vec::new();
        for (path, body) in self.receiver.received() {
            if path != "/v1/traces" {
                assert_eq!(path, "/v1/metrics");
                continue;
            }
            let export = ExportTraceServiceRequest::decode(body).unwrap();
            for rs in export.resource_spans {
                for ss in rs.scope_spans {
                    spans.extend(ss.spans);
                }
            }
        }
        spans
    }

    /// The spans of the trace whose root has `llmscope.request_id` = `id`, once its root and
    /// `names` are there (at most 20 s): (root, every span of the trace).
    async fn trace(&self, id: &str, names: &[&str]) -> (Span, Vec<Span>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.spans();
            let root = spans
                .iter()
                .find(|s| {
                    s.name == "llmscope.request"
                        && attr(s, "llmscope.request_id") == Some(json!(id))
                })
                .cloned();
            if let Some(root) = root {
                let trace: Vec<Span> = spans
                    .iter()
                    .filter(|s| s.trace_id == root.trace_id)
                    .cloned()
                    .collect();
                if names.iter().all(|n| trace.iter().any(|s| s.name == *n)) {
                    return (root, trace);
                }
            }
            assert!(
                Instant::now() < deadline,
                "no trace for {id} with {names:?}: {spans:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn attr(s: &Span, key: &str) -> Option<Value> {
    attr_of(&s.attributes, key)
}

fn attr_of(attributes: &[KeyValue], key: &str) -> Option<Value> {
    attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(v) => Some(json!(v)),
            AnyValue::IntValue(v) => Some(json!(v)),
            AnyValue::DoubleValue(v) => Some(json!(v)),
            AnyValue::BoolValue(v) => Some(json!(v)),
            _ => None,
        }
    })
}

const POLICY: &str = r#"version: "1"
namespaces:
  default:
    rules: []
  squeeze:
    rules:
      - {id: squeeze-cap, primitive: budget_threshold, period: hourly, limit_usd: 0.0000001, action: downgrade, downgrade_to_tier: cheap}
  tight:
    rules:
      - {id: tight-cap, primitive: budget_threshold, period: hourly, limit_usd: 0.0000001}
"#;

fn traced_gateway(endpoint: String) -> Gateway {
    let mut opts = Options::new(POLICY);
    opts.env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint),
        ("OTEL_SERVICE_NAME".into(), "llmscope-test".into()),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    Gateway::start(&opts)
}

async fn infer(gw: &Gateway, body: Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(gw.at("/infer"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.json(&body).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

fn children<'a>(trace: &'a [Span], parent: &Span) -> Vec<&'a str> {
    let mut names: Vec<&str> = trace
        .iter()
        .filter(|s| s.parent_span_id == parent.span_id)
        .map(|s| s.name.as_str())
        .collect();
    names.sort_unstable();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn every_request_is_a_trace_with_its_pricing_rules_dispatch_and_settlement() {
    let collector = Collector::start().await;
    let gw = traced_gateway(format!("http://127.0.0.1:{}", collector.port));
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    // Allowed, in a trace the client started.
    let (s, allowed) = infer(
        &gw,
        json!({"prompt": "hello", "tenant_id": "acme", "model_tier": "expensive"}),
        &[("traceparent", traceparent)],
    )
    .await;
    assert_eq!(s, 200, "{allowed}");
    let id = allowed["request_id"].as_str().unwrap();
    let (root, trace) = collector
        .trace(
            id,
            &[
                "llmscope.price",
                "llmscope.evaluate",
                "llmscope.dispatch",
                "llmscope.settle",
            ],
        )
        .await;
    assert_eq!(
        hex(&root.trace_id),
        "0af7651916cd43dd8448eb211c80319c",
        "the client's trace continued"
    );
    assert_eq!(hex(&root.parent_span_id), "b7ad6b7169203331");
    assert_eq!(
        children(&trace, &root),
        [
            "llmscope.dispatch",
            "llmscope.evaluate",
            "llmscope.price",
            "llmscope.settle"
        ]
    );
    assert_eq!(attr(&root, "llmscope.decision"), Some(json!("allow")));
    assert_eq!(attr(&root, "llmscope.tenant_id"), Some(json!("acme")));
    assert_eq!(attr(&root, "gen_ai.request.model"), Some(json!("gpt-4o")));
    assert_eq!(
        attr(&root, "gen_ai.usage.output_tokens"),
        allowed.get("tokens_out").cloned()
    );
    let cost = attr(&root, "llmscope.cost_usd")
        .and_then(|v| v.as_f64())
        .unwrap();
    assert!((cost - allowed["cost_usd"].as_f64().unwrap()).abs() < 1e-12);
    let dispatch = trace
        .iter()
        .find(|s| s.name == "llmscope.dispatch")
        .unwrap();
    assert_eq!(attr(dispatch, "gen_ai.provider.name"), Some(json!("mock")));

    // Downgraded: its rule's span under the evaluation, and the decision.
    let (s, down) = infer(
        &gw,
        json!({"prompt": "hello", "tenant_id": "acme", "model_tier": "expensive", "budget_namespace": "squeeze"}),
        &[],
    )
    .await;
    assert_eq!(
        (s, down["policy_decision"].as_str()),
        (200, Some("downgrade")),
        "{down}"
    );
    let (root, trace) = collector
        .trace(
            down["request_id"].as_str().unwrap(),
            &["llmscope.rule", "llmscope.dispatch"],
        )
        .await;
    assert_ne!(
        hex(&root.trace_id),
        "0af7651916cd43dd8448eb211c80319c",
        "a trace of its own"
    );
    assert_eq!(attr(&root, "llmscope.decision"), Some(json!("downgrade")));
    assert_eq!(
        attr(&root, "llmscope.policy_id"),
        Some(json!("squeeze-cap"))
    );
    let evaluate = trace
        .iter()
        .find(|s| s.name == "llmscope.evaluate")
        .unwrap();
    let rule = trace.iter().find(|s| s.name == "llmscope.rule").unwrap();
    assert_eq!(rule.parent_span_id, evaluate.span_id);
    assert_eq!(attr(rule, "llmscope.rule_id"), Some(json!("squeeze-cap")));
    assert_eq!(
        attr(rule, "llmscope.rule_decision"),
        Some(json!("downgrade"))
    );

    // Denied: priced and evaluated, never dispatched.
    let (s, denied) = infer(
        &gw,
        json!({"prompt": "hello", "tenant_id": "acme", "budget_namespace": "tight"}),
        &[],
    )
    .await;
    assert_eq!(s, 402, "{denied}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let (root, trace) = loop {
        let spans = collector.spans();
        let root = spans
            .iter()
            .find(|s| {
                s.name == "llmscope.request" && attr(s, "llmscope.decision") == Some(json!("deny"))
            })
            .cloned();
        if let Some(root) = root {
            let trace: Vec<Span> = spans
                .into_iter()
                .filter(|s| s.trace_id == root.trace_id)
                .collect();
            break (root, trace);
        }
        assert!(Instant::now() < deadline, "no trace of the denied request");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(attr(&root, "llmscope.policy_id"), Some(json!("tight-cap")));
    assert!(
        !trace.iter().any(|s| s.name == "llmscope.dispatch"),
        "a denial is never sent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_is_down_changes_no_response() {
    // A collector that takes the connection and never answers (the slow case), then one that
    // refuses it.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_port = hung.local_addr().unwrap().port();
    let _accepting = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = hung.accept().await {
            held.push(c);
        }
    });
    let gw = traced_gateway(format!("http://127.0.0.1:{hung_port}"));
    for _ in 0..20 {
        let (s, b) = infer(&gw, json!({"prompt": "hello", "tenant_id": "acme"}), &[]).await;
        assert_eq!(s, 200, "{b}");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = traced_gateway(format!("http://127.0.0.1:{port}"));
    for _ in 0..20 {
        let (s, b) = infer(&gw, json!({"prompt": "hello", "tenant_id": "acme"}), &[]).await;
        assert_eq!(s, 200, "{b}");
    }
    let (s, _) = infer(
        &gw,
        json!({"prompt": "hello", "tenant_id": "acme", "budget_namespace": "tight"}),
        &[],
    )
    .await;
    assert_eq!(s, 402);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_provider_is_sent_the_dispatch_spans_traceparent_and_never_the_clients_tracestate() {
    let collector = Collector::start().await;
    let upstream = llmscope_tests::upstream::Upstream::start().await;
    let mut opts = Options::new("version: \"1\"\nnamespaces:\n  default:\n    rules: []\n");
    opts.config_template = Some(
        r#"
server: {listen: "127.0.0.1:0"}
artifacts: {telemetry_path: "{telemetry}", decisions_path: "{decisions}"}
policy: {file: "{policy_file}", policies_dir: "{policies_dir}"}
models:
  local-small: {provider: local-openai, provider_model: small-v1, input_per_1m: 1.0, output_per_1m: 2.0}
routes:
  /answer-routed: {max_output_tokens: 300, tiers: {cheap: local-small}}
providers:
  local-openai: {kind: openai, base_url: "http://{upstream}/v1", timeout_ms: 5000, max_retries: 0}
"#
        .replace("{upstream}", &upstream.addr.to_string()),
    );
    opts.env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            format!("http://127.0.0.1:{}", collector.port),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    let gw = Gateway::start(&opts);
    let (s, b) = infer(
        &gw,
        json!({"prompt": "hello", "tenant_id": "acme"}),
        &[
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("tracestate", "tenant=secret-value"),
        ],
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (_, trace) = collector
        .trace(b["request_id"].as_str().unwrap(), &["llmscope.dispatch"])
        .await;
    let dispatch = trace
        .iter()
        .find(|s| s.name == "llmscope.dispatch")
        .unwrap();
    let headers = upstream.state.seen.lock().unwrap()[0].1.to_lowercase();
    let expected = format!(
        "traceparent: 00-0af7651916cd43dd8448eb211c80319c-{}-01",
        hex(&dispatch.span_id)
    );
    assert!(headers.contains(&expected), "{expected} in\n{headers}");
    assert!(!headers.contains("tracestate"), "{headers}");
}

/// Every metric in `exports`, the newest export of each name last.
fn metrics_of(exports: &[ExportMetricsServiceRequest]) -> Vec<Metric> {
    exports
        .iter()
        .flat_map(|e| &e.resource_metrics)
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| sm.metrics.clone())
        .collect()
}

/// The newest value of the sum or gauge `name` at the point whose attributes include `labels`.
fn newest(metrics: &[Metric], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let points = metrics.iter().rev().find_map(|m| {
        (m.name == name).then(|| match m.data.as_ref()? {
            Data::Sum(s) => Some(s.data_points.clone()),
            Data::Gauge(g) => Some(g.data_points.clone()),
            _ => None,
        })?
    })?;
    points
        .iter()
        .find(|p| {
            labels
                .iter()
                .all(|(k, v)| attr_of(&p.attributes, k) == Some(json!(v)))
        })
        .and_then(|p| match p.value? {
            Number::AsDouble(v) => Some(v),
            Number::AsInt(v) => Some(v as f64),
        })
}

/// The value of `name{labels}` in Prometheus text.
fn prometheus(text: &str, name: &str, labels: &str) -> f64 {
    let prefix = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_exported_over_otlp_http_with_the_values_of_the_metrics_endpoint() {
    let collector = Collector::start().await;
    let mut opts = Options::new(POLICY);
    opts.env = vec![
        (
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT".into(),
            format!("http://127.0.0.1:{}/v1/metrics", collector.port),
        ),
        ("OTEL_METRIC_EXPORT_INTERVAL".into(), "200".into()),
    ];
    let mut gw = Gateway::start(&opts);
    for ns in ["default", "default", "squeeze", "tight"] {
        let (s, b) = infer(
            &gw,
            json!({"prompt": "hello", "tenant_id": "acme", "budget_namespace": ns}),
            &[],
        )
        .await;
        assert!(s == 200 || s == 402, "{b}");
    }
    let text = reqwest::get(gw.at("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Wait for an export collected after the last request.
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let exports: Vec<ExportMetricsServiceRequest> = collector
            .receiver
            .received()
            .into_iter()
            .map(|(path, body)| {
                assert_eq!(
                    path, "/v1/metrics",
                    "metrics only: traces are not configured"
                );
                ExportMetricsServiceRequest::decode(body).unwrap()
            })
            .collect();
        let metrics = metrics_of(&exports);
        let served: f64 = ["allow", "downgrade", "deny"]
            .iter()
            .filter_map(|d| {
                newest(
                    &metrics,
                    "llmscope_requests",
                    &[("route", "/answer-routed"), ("decision", d)],
                )
            })
            .sum();
        if served == 4.0 {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "no export with all 4 requests: {served}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for decision in ["allow", "deny"] {
        assert_eq!(
            newest(
                &metrics,
                "llmscope_requests",
                &[("route", "/answer-routed"), ("decision", decision)]
            ),
            Some(prometheus(
                &text,
                "llmscope_requests_total",
                &format!("route=\"/answer-routed\",decision=\"{decision}\"")
            )),
            "{decision}"
        );
    }
    let cost = newest(
        &metrics,
        "llmscope_cost_usd",
        &[("route", "/answer-routed")],
    )
    .unwrap();
    let expected = prometheus(&text, "llmscope_cost_usd_total", "route=\"/answer-routed\"");
    assert!(
        cost > 0.0 && (cost - expected).abs() < 1e-12,
        "{cost} vs {expected}"
    );
    assert_eq!(newest(&metrics, "llmscope_policy_rules", &[]), Some(2.0));
    assert_eq!(
        newest(&metrics, "llmscope_policy_rules", &[]),
        Some(prometheus(&text, "llmscope_policy_rules", ""))
    );
    let histogram = metrics
        .iter()
        .rev()
        .find(|m| m.name == "llmscope_policy_evaluation_seconds")
        .and_then(|m| match m.data.as_ref()? {
            Data::Histogram(h) => h.data_points.first().cloned(),
            _ => None,
        })
        .expect("the evaluation histogram");
    assert_eq!(histogram.count, 4, "one evaluation per request");
    assert_eq!(histogram.explicit_bounds.len(), 10);
    assert_eq!(histogram.bucket_counts.iter().sum::<u64>(), 4);
    let (status, _) = gw.stop();
    assert!(status.success());
}

/// An OTLP/gRPC receiver (tonic): every trace and metrics export it was sent.
#[derive(Clone, Default)]
struct GrpcCollector {
    spans: Arc<Mutex<Vec<Span>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn traces_and_metrics_go_over_grpc_when_the_protocol_says_so() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let collector = GrpcCollector::default();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .add_service(MetricsServiceServer::new(collector.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    let _serving = tokio::spawn(server);

    let mut opts = Options::new(POLICY);
    opts.env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            format!("http://127.0.0.1:{port}"),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "grpc".into()),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ("OTEL_METRIC_EXPORT_INTERVAL".into(), "200".into()),
    ];
    let gw = Gateway::start(&opts);
    let (s, b) = infer(
        &gw,
        json!({"prompt": "hello", "tenant_id": "acme", "budget_namespace": "tight"}),
        &[],
    )
    .await;
    assert_eq!(s, 402, "{b}");
    let id = b["request_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let traced = collector.spans.lock().unwrap().iter().any(|s| {
            s.name == "llmscope.request"
                && attr(s, "llmscope.request_id") == Some(json!(id))
                && attr(s, "llmscope.decision") == Some(json!("deny"))
        });
        let metrics = metrics_of(&collector.metrics.lock().unwrap());
        let denied = newest(
            &metrics,
            "llmscope_requests",
            &[("route", "/answer-routed"), ("decision", "deny")],
        );
        if traced && denied == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "over gRPC: trace of {id} {traced}, denied count {denied:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_request_is_an_error_span_and_a_stream_is_settled_with_its_usage() {
    let collector = Collector::start().await;
    let mut opts = Options::new(POLICY);
    opts.fail_models = vec!["gpt-4o-mini".into(), "claude-haiku-3-5-20241022".into()];
    opts.env = vec![
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".into(),
            format!("http://127.0.0.1:{}/v1/traces", collector.port),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    let gw = Gateway::start(&opts);
    // Every model of the cheap tier fails: 502, and the root span says so.
    let resp = reqwest::Client::new()
        .post(gw.at("/infer"))
        .json(&json!({"prompt": "hello", "tenant_id": "acme", "model_tier": "cheap"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 502);
    let body: Value = resp.json().await.unwrap();
    let id = body["detail"]["request_id"].as_str().unwrap().to_owned();
    let (root, _) = collector.trace(&id, &["llmscope.dispatch"]).await;
    let root_status = root.status.clone().unwrap_or_default();
    assert_eq!(root_status.code, 2, "STATUS_CODE_ERROR: {root:?}");
    assert!(!root_status.message.is_empty());

    // A streamed request on the expensive tier: settled, with what it was billed.
    let resp = reqwest::Client::new()
        .post(gw.at("/v1/chat/completions"))
        .header("x-llmscope-tenant-id", "acme")
        .json(&json!({"model": "expensive", "stream": true, "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let id = resp.headers()["x-llmscope-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = resp.text().await.unwrap();
    assert!(body.contains("[DONE]"), "{body}");
    let (root, trace) = collector.trace(&id, &["llmscope.settle"]).await;
    assert!(children(&trace, &root).contains(&"llmscope.settle"));
    assert_eq!(attr(&root, "gen_ai.response.model"), Some(json!("gpt-4o")));
    assert!(attr(&root, "gen_ai.usage.output_tokens").is_some_and(|v| v.as_i64() > Some(0)));
    assert!(attr(&root, "llmscope.cost_usd").is_some_and(|v| v.as_f64() > Some(0.0)));
}
