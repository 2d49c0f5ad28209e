//! OpenTelemetry over OTLP — traces and metrics, HTTP/protobuf or gRPC — off unless
//! configured with the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (both signals; for
//! HTTP `/v1/traces` and `/v1/metrics` are appended) or the per-signal
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` (used as given),
//! `OTEL_EXPORTER_OTLP_PROTOCOL` (and `_TRACES_` / `_METRICS_`): `http/protobuf` (default) or
//! `grpc`; `OTEL_TRACES_EXPORTER=none` / `OTEL_METRICS_EXPORTER=none` turn one signal off,
//! `OTEL_SDK_DISABLED=true` both; `OTEL_SERVICE_NAME` (default `llmscope`), the batch
//! processor's `OTEL_BSP_*`, `OTEL_METRIC_EXPORT_INTERVAL` (ms, default 60 000).
//!
//! One trace per request: a `llmscope.request` server span (continuing an incoming W3C
//! `traceparent`, its sampled flag included unless `OTEL_TRACES_SAMPLER=always_on`) with children `llmscope.price`, `llmscope.evaluate` (one `llmscope.rule`
//! child per rule), one `llmscope.dispatch` per provider attempt (its `traceparent` sent to
//! the provider) and `llmscope.settle`; attributes follow the GenAI semantic conventions
//! (`gen_ai.request.model`, `gen_ai.usage.input_tokens`, ...) plus `llmscope.*` (tenant,
//! namespace, decision, policy id, estimated and actual cost). Spans are exported by the SDK's
//! batch processor on its own thread: its queue is bounded and drops spans when full, so a
//! collector that is down or slow never slows or fails a request.
//!
//! Metrics: every family of `/metrics` ([`crate::metrics::Family`]) as an observable counter
//! or gauge (counters without the `_total` suffix, which Prometheus adds back), read when the
//! SDK's periodic reader collects, and the policy-evaluation histogram with the same bounds.
//! gRPC connections run on a one-thread runtime of their own, never on the request path's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::SystemTime;

use opentelemetry::metrics::{Histogram, MeterProvider as _};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithHttpConfig as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanData};

use crate::gateway::Gateway;
use crate::metrics::{Family, Kind};

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

static METERS: OnceLock<Meters> = OnceLock::new();

/// The metrics export: the provider (flushed at shutdown), the evaluation histogram recorded
/// as evaluations happen, and the observable instruments (kept: dropping one unregisters it).
struct Meters {
    provider: SdkMeterProvider,
    evaluation: Histogram<f64>,
    _observed: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

/// Spans this process started, and spans the exporter was handed (sent or failed): started
/// minus handed is queued or dropped by the bounded batch queue.
static SPANS_STARTED: AtomicU64 = AtomicU64::new(0);
static SPANS_EXPORTED: AtomicU64 = AtomicU64::new(0);
static SPANS_FAILED: AtomicU64 = AtomicU64::new(0);

/// The wire protocol of one signal's export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    HttpProtobuf,
    Grpc,
}

/// `OTEL_EXPORTER_OTLP_<SIGNAL>_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`, else HTTP.
fn protocol(env: &dyn Fn(&str) -> Option<String>, signal: &str) -> Result<Protocol, String> {
    let var = format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL");
    let (name, value) = match env(&var) {
        Some(v) => (var, v),
        None => match env("OTEL_EXPORTER_OTLP_PROTOCOL") {
            Some(v) => ("OTEL_EXPORTER_OTLP_PROTOCOL".to_owned(), v),
            None => return Ok(Protocol::HttpProtobuf),
        },
    };
    match value.trim() {
        "http/protobuf" => Ok(Protocol::HttpProtobuf),
        "grpc" => Ok(Protocol::Grpc),
        other => Err(format!(
            "{name}={other:?} is not supported: use `http/protobuf` or `grpc`"
        )),
    }
}

/// Whether `signal` (`TRACES`, `METRICS`) is to be exported: an endpoint configured, the SDK
/// not disabled, the signal's exporter not `none`.
fn configured(env: &dyn Fn(&str) -> Option<String>, signal: &str) -> bool {
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let exporter_off = env(&format!("OTEL_{signal}_EXPORTER"))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    let endpoint = env(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .is_some();
    endpoint && !disabled && !exporter_off
}

/// The runtime gRPC exports run on: one thread of its own, so a slow collector's connection
/// work never lands on a request worker.
fn grpc_runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RT: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("llmscope-otlp-grpc")
            .on_thread_start(yield_to_requests)
            .enable_all()
            .build()
            .map_err(|e| format!("no runtime for gRPC exports: {e}"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// reqwest's blocking client for HTTP exports (used on the SDK's own threads), each attempt
/// bounded by `OTEL_EXPORTER_OTLP_<SIGNAL>_TIMEOUT` / `OTEL_EXPORTER_OTLP_TIMEOUT` (ms,
/// default 10 000, as the specification says).
fn http_client(env: &dyn Fn(&str) -> Option<String>, signal: &str) -> Result<Blocking, String> {
    let timeout_ms = env(&format!("OTEL_EXPORTER_OTLP_{signal}_TIMEOUT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(10_000);
    // The blocking client does its I/O on a thread it starts when built; built on a thread
    // that lowered itself first, that thread inherits the lowest priority too.
    std::thread::Builder::new()
        .name("llmscope-otlp-http".into())
        .spawn(move || {
            yield_to_requests();
            reqwest::blocking::Client::builder()
                .timeout(std::time::Duration::from_millis(timeout_ms))
                .build()
        })
        .map_err(|e| format!("no thread for the HTTP client: {e}"))?
        .join()
        .map_err(|_| "the HTTP client's set-up panicked".to_owned())?
        .map(Blocking)
        .map_err(|e| format!("no HTTP client: {e}"))
}

fn resource(env: &dyn Fn(&str) -> Option<String>) -> opentelemetry_sdk::Resource {
    let service = env("OTEL_SERVICE_NAME").unwrap_or_else(|| "llmscope".into());
    opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build()
}

/// A span exporter that counts what it was handed.
#[derive(Debug)]
struct Counted(opentelemetry_otlp::SpanExporter);

/// Lower the calling thread to the lowest CPU priority (nice 19), once per thread (threads it
/// starts later inherit it): the export threads — the batch processor's, which encodes spans,
/// the HTTP client's and the gRPC runtime's, which send them — must never take a core from
/// requests. Under a load that leaves no CPU to spare the queue fills and spans are dropped
/// (counted in `llmscope_otel_spans_*`), rather than requests slowed. Called only from
/// threads of the exporters' own (the batch exporter, never a simple one that would run on a
/// request's thread).
fn yield_to_requests() {
    thread_local! {
        static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if LOWERED.with(|l| l.replace(true)) {
        return;
    }
    // On Linux the nice value is a per-thread attribute, and `who = 0` is the calling thread.
    #[cfg(target_os = "linux")]
    #[allow(
        unsafe_code,
        reason = "setpriority(2) takes plain integers and touches no memory of ours"
    )]
    // SAFETY: see the reason above.
    let lowered = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } == 0;
    #[cfg(not(target_os = "linux"))]
    let lowered = false;
    if !lowered {
        tracing::debug!(target: TARGET, "an OpenTelemetry export thread runs at normal priority");
    }
}

impl opentelemetry_sdk::trace::SpanExporter for Counted {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        yield_to_requests();
        let n = batch.len() as u64;
        let result = self.0.export(batch).await;
        if result.is_ok() {
            SPANS_EXPORTED.fetch_add(n, Ordering::Relaxed);
        } else {
            SPANS_FAILED.fetch_add(n, Ordering::Relaxed);
        }
        result
    }
    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.0.set_resource(resource);
    }
}

fn span_exporter(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let built = match protocol(env, "TRACES")? {
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(http_client(env, "TRACES")?)
            .build(),
        Protocol::Grpc => {
            let _rt = grpc_runtime()?.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
        }
    };
    built.map_err(|e| format!("{e}; check OTEL_EXPORTER_OTLP_*"))
}

fn metric_exporter(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<opentelemetry_otlp::MetricExporter, String> {
    let built = match protocol(env, "METRICS")? {
        Protocol::HttpProtobuf => opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_http_client(http_client(env, "METRICS")?)
            .build(),
        Protocol::Grpc => {
            let _rt = grpc_runtime()?.enter();
            opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .build()
        }
    };
    built.map_err(|e| format!("{e}; check OTEL_EXPORTER_OTLP_*"))
}

/// Start exporting traces when `env` configures them (see the module docs); returns whether
/// traces are on. Call once, at start; the exporter reads the `OTEL_*` variables.
pub fn init(env: &dyn Fn(&str) -> Option<String>) -> bool {
    if !configured(env, "TRACES") {
        return false;
    }
    let exporter = match span_exporter(env) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(target: TARGET, error = %e, "OpenTelemetry traces not exported");
            return false;
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(Counted(exporter))
        .with_resource(resource(env))
        .build();
    let tracer = provider.tracer("llmscope");
    let on = TRACER.set((provider, tracer)).is_ok();
    if on {
        tracing::info!(target: TARGET, "OpenTelemetry traces exported over OTLP");
    }
    on
}

/// Start exporting `gateway`'s metrics when `env` configures them (see the module docs);
/// returns whether metrics are exported. Call once, at start, with the serving gateway.
pub fn init_metrics(env: &dyn Fn(&str) -> Option<String>, gateway: Weak<Gateway>) -> bool {
    if !configured(env, "METRICS") {
        return false;
    }
    let exporter = match metric_exporter(env) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(target: TARGET, error = %e, "OpenTelemetry metrics not exported");
            return false;
        }
    };
    let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build();
    let provider = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource(env))
        .build();
    let meter = provider.meter("llmscope");
    let Some(gw) = gateway.upgrade() else {
        return false;
    };
    let families = every_family(&gw);
    drop(gw);
    let mut observed: Vec<Box<dyn std::any::Any + Send + Sync>> = Vec::new();
    for f in families.iter() {
        let name = f.name;
        let weak = gateway.clone();
        // Each collection reads the family afresh.
        let observe = move |observer: &dyn opentelemetry::metrics::AsyncInstrument<f64>| {
            let Some(gw) = weak.upgrade() else { return };
            for family in every_family(&gw).iter().filter(|f| f.name == name) {
                for (labels, value) in &family.samples {
                    let attrs: Vec<KeyValue> = labels
                        .iter()
                        .map(|(k, v)| KeyValue::new(*k, v.clone()))
                        .collect();
                    observer.observe(*value, &attrs);
                }
            }
        };
        match f.kind {
            Kind::Counter => observed.push(Box::new(
                meter
                    .f64_observable_counter(name.strip_suffix("_total").unwrap_or(name))
                    .with_description(f.help)
                    .with_callback(move |o| observe(o))
                    .build(),
            )),
            Kind::Gauge => observed.push(Box::new(
                meter
                    .f64_observable_gauge(name)
                    .with_description(f.help)
                    .with_callback(move |o| observe(o))
                    .build(),
            )),
        }
    }
    let evaluation = meter
        .f64_histogram(crate::metrics::EVALUATION)
        .with_description("Time to evaluate a namespace's rules.")
        .with_unit("s")
        .with_boundaries(crate::metrics::evaluation_bounds().to_vec())
        .build();
    let on = METERS
        .set(Meters {
            provider,
            evaluation,
            _observed: observed,
        })
        .is_ok();
    if on {
        tracing::info!(target: TARGET, "OpenTelemetry metrics exported over OTLP");
    }
    on
}

/// Every family `/metrics` shows (the histogram aside), read once per collection: the
/// callbacks of one collection (one per family) share a snapshot taken at most 100 ms before,
/// so the values of one export are of one instant and the ledger is read once.
fn every_family(gw: &Gateway) -> Arc<Vec<Family>> {
    static TAKEN: parking_lot::Mutex<Option<(std::time::Instant, Arc<Vec<Family>>)>> =
        parking_lot::Mutex::new(None);
    let mut taken = TAKEN.lock();
    if let Some((at, families)) = taken.as_ref() {
        if at.elapsed() < std::time::Duration::from_millis(100) {
            return Arc::clone(families);
        }
    }
    let mut all = gw.metrics().families();
    all.extend(gw.status_families());
    let all = Arc::new(all);
    *taken = Some((std::time::Instant::now(), Arc::clone(&all)));
    all
}

/// Record one namespace evaluation in the exported histogram (nothing when metrics are off).
pub fn record_evaluation(seconds: f64) {
    if let Some(m) = METERS.get() {
        m.evaluation.record(seconds, &[]);
    }
}

/// The export's own families for `/metrics` (none when traces are off).
pub fn families() -> Vec<Family> {
    if !enabled() {
        return Vec::new();
    }
    let mut exported = Family::new(
        "llmscope_otel_spans_exported_total",
        Kind::Counter,
        "Spans handed to the OTLP exporter, by result (started minus these: queued or dropped).",
    );
    exported.push(
        vec![("result", "ok".to_owned())],
        SPANS_EXPORTED.load(Ordering::Relaxed) as f64,
    );
    exported.push(
        vec![("result", "failed".to_owned())],
        SPANS_FAILED.load(Ordering::Relaxed) as f64,
    );
    vec![
        Family::one(
            "llmscope_otel_spans_started_total",
            Kind::Counter,
            "Spans started for export.",
            SPANS_STARTED.load(Ordering::Relaxed) as f64,
        ),
        exported,
    ]
}

/// Flush what is queued (at shutdown), waiting at most two seconds for the collector.
pub fn shutdown() {
    if let Some((provider, _)) = TRACER.get() {
        let _ = provider.shutdown_with_timeout(std::time::Duration::from_secs(2));
    }
    if let Some(m) = METERS.get() {
        let _ = m
            .provider
            .shutdown_with_timeout(std::time::Duration::from_secs(2));
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
    SPANS_STARTED.fetch_add(1, Ordering::Relaxed);
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
    SPANS_STARTED.fetch_add(1, Ordering::Relaxed);
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
        SPANS_STARTED.fetch_add(1, Ordering::Relaxed);
        opentelemetry::trace::Span::end_with_timestamp(&mut { span }, end);
    }
}

/// Mark the current request's span failed with `message` (nothing when traces are off).
pub fn fail(message: &str) {
    if enabled() {
        Context::current()
            .span()
            .set_status(opentelemetry::trace::Status::error(message.to_owned()));
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
