//! OpenTelemetry traces over OTLP (HTTP/protobuf), off unless configured with the standard
//! variables: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the full URL) or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` appended), `OTEL_SERVICE_NAME` (default
//! `llmscope`), `OTEL_SDK_DISABLED=true`, and the batch processor's `OTEL_BSP_*`.
//!
//! One trace per request: a `llmscope.request` server span (continuing an incoming W3C
//! `traceparent`, its sampled flag included unless `OTEL_TRACES_SAMPLER=always_on`) with children `llmscope.price`, `llmscope.evaluate` (one `llmscope.rule`
//! child per rule), one `llmscope.dispatch` per provider attempt (its `traceparent` sent to
//! the provider) and `llmscope.settle`; attributes follow the GenAI semantic conventions
//! (`gen_ai.request.model`, `gen_ai.usage.input_tokens`, ...) plus `llmscope.*` (tenant,
//! namespace, decision, policy id, estimated and actual cost). Spans are exported by the SDK's
//! batch processor on its own thread: its queue is bounded and drops spans when full, so a
//! collector that is down or slow never slows or fails a request.

use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithHttpConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

const TARGET: &str = "llmscope::otel";

static TRACER: OnceLock<(SdkTracerProvider, SdkTracer)> = OnceLock::new();

/// The HTTP client the exporter uses: reqwest's blocking client, on the batch processor's own
/// thread (never a runtime worker).
#[derive(Debug)]
struct Blocking(reqwest::blocking::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Blocking {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let resp = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body.to_vec())
            .send()?;
        let status = resp.status();
        let body = resp.bytes()?;
        Ok(http::Response::builder().status(status).body(body)?)
    }
}

/// Start exporting when `env` configures an endpoint (and does not disable the SDK); returns
/// whether traces are on. Call once, at start; the exporter reads the `OTEL_*` variables.
pub fn init(env: &dyn Fn(&str) -> Option<String>) -> bool {
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let configured = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .is_some();
    if disabled || !configured {
        return false;
    }
    let client = match reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(target: TARGET, error = %e, "OpenTelemetry export not started: no HTTP client");
            return false;
        }
    };
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(Blocking(client))
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(target: TARGET, error = %e, "OpenTelemetry export not started: check OTEL_EXPORTER_OTLP_*");
            return false;
        }
    };
    let service = env("OTEL_SERVICE_NAME").unwrap_or_else(|| "llmscope".into());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    let tracer = provider.tracer("llmscope");
    let on = TRACER.set((provider, tracer)).is_ok();
    if on {
        tracing::info!(target: TARGET, "OpenTelemetry traces exported over OTLP");
    }
    on
}

/// Flush what is queued (at shutdown), waiting at most two seconds for the collector.
pub fn shutdown() {
    if let Some((provider, _)) = TRACER.get() {
        let _ = provider.shutdown_with_timeout(std::time::Duration::from_secs(2));
    }
}

fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get().map(|(_, t)| t)
}

/// Whether traces are exported.
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

struct Headers<'a>(&'a [(String, String)]);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// The context of a request's trace: a `llmscope.request` server span, child of the
/// `traceparent` in `headers` (W3C trace context) when there is one. An empty context when
/// traces are off.
pub fn request_context(headers: &[(String, String)], route: &str) -> Context {
    let Some(tracer) = tracer() else {
        return Context::new();
    };
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    let span = tracer
        .span_builder("llmscope.request")
        .with_kind(SpanKind::Server)
        .with_attributes([KeyValue::new("llmscope.route", route.to_owned())])
        .start_with_context(tracer, &parent);
    parent.with_span(span)
}

/// Start `name` as a child of the current span (nothing when traces are off), with
/// `attributes`; ends when dropped.
pub fn child(name: &'static str, attributes: Vec<KeyValue>) -> Option<Context> {
    child_since(name, SystemTime::now(), attributes)
}

/// [`child`], started at `start`.
pub fn child_since(
    name: &'static str,
    start: SystemTime,
    attributes: Vec<KeyValue>,
) -> Option<Context> {
    let tracer = tracer()?;
    let cx = Context::current();
    let span = tracer
        .span_builder(name)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(tracer, &cx);
    Some(cx.with_span(span))
}

/// A finished child of `parent` that ran from `start` to `end` (e.g. one rule's evaluation,
/// timed by the runtime).
pub fn finished(
    parent: &Context,
    name: &'static str,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
) {
    if let Some(tracer) = tracer() {
        let span = tracer
            .span_builder(name)
            .with_start_time(start)
            .with_attributes(attributes)
            .start_with_context(tracer, parent);
        opentelemetry::trace::Span::end_with_timestamp(&mut { span }, end);
    }
}

/// Set `attributes` on the current request's span.
pub fn annotate(attributes: Vec<KeyValue>) {
    if enabled() {
        Context::current().span().set_attributes(attributes);
    }
}

struct HeaderVec<'a>(&'a mut Vec<(&'static str, String)>);

impl Injector for HeaderVec<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Only `traceparent`: a client's `tracestate` is its own data, not the provider's.
        let key: &'static str = match key {
            "traceparent" => "traceparent",
            _ => return,
        };
        self.0.push((key, value));
    }
}

/// Add the current span's `traceparent` to a provider call's headers.
pub fn inject(headers: &mut Vec<(&'static str, String)>) {
    if enabled() {
        TraceContextPropagator::new().inject_context(&Context::current(), &mut HeaderVec(headers));
    }
}
