//! Any [`Policy`] as a proxy-wasm (ABI 0.2.1) HTTP filter for Envoy (feature `proxy-wasm`,
//! target `wasm32-wasip1`). [`crate::export_policy!`] calls [`start`] when the feature is on;
//! policy crates contain no proxy code.
//!
//! Per request (only requests with a body are evaluated; others pass through):
//! 1. headers: every filter removes client-sent llmscope control headers
//!    ([`CONTROL_HEADERS`]: the tier above all; no llmscope filter sets one on the request, the
//!    tier travels in filter state). The first llmscope filter of the chain (the *owner*) draws
//!    a request id, stores it in Envoy filter state and the `x-llmscope-request-id` header
//!    (replacing a client's); later filters reuse it.
//! 2. body (buffered): what the host cannot price (`n` > 1, tools, non-text parts) is refused
//!    with a 400; else `POST /v1/edge/context` to the host cluster with the attribution
//!    headers, the JSON body and the rule's aggregates; the answer is the priced context and
//!    snapshot. The body's `model` decides the tier it is priced at.
//! 3. evaluate locally; deny → local 402 (the host's JSON), downgrade → the tier in filter state
//!    and the body's `model` / `model_tier` rewritten, allow → continue. Whatever goes on, the
//!    body is made to ask for what was priced: `max_tokens` / `max_completion_tokens` set to the
//!    priced output, `stream_options.include_usage` on OpenAI streams. Host unreachable, slow
//!    (`host.timeout_ms`) or failing → 503 (`on_unavailable: closed`) or continue (`open`).
//! 4. every filter appends its rule outcome to filter state; after the response the owner
//!    queues one report (status, usage parsed from the response, latency, all outcomes) that
//!    the root context sends to `POST /v1/edge/report`, retrying failures with exponential
//!    backoff for as long as the host holds the reservation; a report given up on is counted
//!    in Envoy's stats (`llmscope_reports_dropped`).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::marker::PhantomData;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use serde_json::Value;

use crate::edge::{self, ContextAnswer, ContextRequest, FilterConfig, Report};
use crate::http::{
    self, CLIENT_ERROR_HEADER, CONTROL_HEADERS, HEADER_PREFIX, POLICY_DECISION_HEADER,
    REQUEST_ID_HEADER, TIER_HEADER,
};
use crate::types::{RequestContext, Snapshot};
use crate::verdict::{DecisionKind, FailureMode, RuleOutcome};
use crate::Policy;

/// Filter-state key holding the chain's request id.
const REQUEST_ID_PROPERTY: &str = "llmscope_request_id";
/// Filter-state key holding the tier the request is dispatched at (`wasm.llmscope_tier` to
/// Envoy's `%FILTER_STATE%` formatter).
const TIER_PROPERTY: &str = "llmscope_tier";
/// Filter-state key holding the JSON array of rule outcomes.
const OUTCOMES_PROPERTY: &str = "llmscope_outcomes";
/// Filter-state key holding the last host answer of the chain (the JSON as received): a later
/// filter whose rule declares no aggregates evaluates on its priced request instead of calling
/// the host again, as long as the tier it was priced at is still the tier.
const CONTEXT_PROPERTY: &str = "llmscope_context";
/// Response bytes kept for usage extraction (the tail is kept when longer).
const MAX_RESPONSE_CAPTURE: usize = 1 << 20;
/// Reports waiting to be sent, per worker; the oldest is dropped beyond this.
const MAX_QUEUED_REPORTS: usize = 10_000;
/// How often the root context sends queued reports.
const REPORT_TICK: Duration = Duration::from_millis(20);
/// Wait before the first retry of a report; doubled after each failure up to
/// [`MAX_RETRY_DELAY`], for as long as the host keeps the reservation
/// ([`edge::RESERVATION_TTL`]): a host restart or a long outage loses no report.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Longest wait between two attempts of a report.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// Envoy counter of reports given up on (queue full, refused as malformed, or not accepted
/// within [`edge::RESERVATION_TTL`]): `wasmcustom.llmscope_reports_dropped` in `/stats`,
/// `envoy_wasmcustom_llmscope_reports_dropped` in `/stats/prometheus`.
const DROPPED_METRIC: &str = "llmscope_reports_dropped";

/// Register `P` as this module's root context. Called from `_initialize` by
/// [`crate::export_policy!`].
pub fn start<P: Policy>() {
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(Root::<P>::default()));
}

struct Queued {
    body: Vec<u8>,
    attempts: u32,
    /// When the host's reservation for it started (the context it issued; else when the
    /// report was first tried): it is retried until [`edge::RESERVATION_TTL`] after, while the
    /// host still holds the reservation and remembers reported ids.
    since: Option<SystemTime>,
}

/// The reports of one worker: new ones in `queue`, failed ones in `waiting` until their
/// retry is due (keyed by due time, then a sequence number), sent ones in `in_flight`.
#[derive(Default)]
struct Reports {
    queue: VecDeque<Queued>,
    waiting: BTreeMap<(SystemTime, u64), Queued>,
    in_flight: HashMap<u32, Queued>,
    seq: u64,
    /// The Envoy counter [`DROPPED_METRIC`], once defined.
    dropped_metric: Option<u32>,
}

impl Reports {
    /// Queue `body`; `since`: when the host's reservation for it started, if known.
    fn push(&mut self, body: Vec<u8>, since: Option<SystemTime>) {
        if self.queue.len() + self.waiting.len() + self.in_flight.len() >= MAX_QUEUED_REPORTS {
            // A report waiting for its retry (the host failed it), else the longest queued.
            if self.waiting.pop_first().is_none() {
                self.queue.pop_front();
            }
            self.dropped();
            log::error!("llmscope: report queue full ({MAX_QUEUED_REPORTS}); dropped a queued report (is the host down?)");
        }
        self.queue.push_back(Queued {
            body,
            attempts: 0,
            since,
        });
    }

    /// Define [`DROPPED_METRIC`] (at configuration, so it shows as 0 before any drop).
    fn define_metric(&mut self) {
        if self.dropped_metric.is_none() {
            self.dropped_metric =
                proxy_wasm::hostcalls::define_metric(MetricType::Counter, DROPPED_METRIC).ok();
        }
    }

    /// Count a report given up on.
    fn dropped(&mut self) {
        self.define_metric();
        if let Some(id) = self.dropped_metric {
            let _ = proxy_wasm::hostcalls::increment_metric(id, 1);
        }
    }

    /// Retry `q` after its backoff, or drop it (counted) when the host would no longer hold
    /// its reservation by then. `what`: the failure, for the log.
    fn retry(&mut self, mut q: Queued, now: SystemTime, what: &str) {
        q.attempts += 1;
        let due = now + retry_delay(q.attempts);
        let since = *q.since.get_or_insert(now);
        if due.duration_since(since).unwrap_or_default() > edge::RESERVATION_TTL {
            self.dropped();
            log::error!(
                "llmscope: report dropped after {} attempt(s) over {:?} (the host no longer \
                 holds its reservation); last failure: {what}",
                q.attempts,
                edge::RESERVATION_TTL
            );
            return;
        }
        log::warn!(
            "llmscope: report not accepted ({what}); retry {} in {:?}",
            q.attempts,
            retry_delay(q.attempts)
        );
        self.seq += 1;
        self.waiting.insert((due, self.seq), q);
    }

    /// Move the reports whose retry is due to the front of the queue.
    fn due(&mut self, now: SystemTime) {
        while let Some(entry) = self.waiting.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.queue.push_front(entry.remove());
        }
    }
}

/// The wait before attempt `attempts + 1`: [`FIRST_RETRY_DELAY`] doubled per failure, at most
/// [`MAX_RETRY_DELAY`].
fn retry_delay(attempts: u32) -> Duration {
    FIRST_RETRY_DELAY
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(MAX_RETRY_DELAY)
}

struct Configured<P: Policy> {
    cfg: Rc<FilterConfig>,
    settings: Rc<P::Settings>,
}

struct Root<P: Policy> {
    configured: Option<Configured<P>>,
    reports: Rc<RefCell<Reports>>,
}

impl<P: Policy> Default for Root<P> {
    fn default() -> Self {
        Self {
            configured: None,
            reports: Rc::default(),
        }
    }
}

impl<P: Policy> Root<P> {
    fn flush(&mut self) {
        let Some(c) = &self.configured else { return };
        let host = &c.cfg.host;
        let mut reports = self.reports.borrow_mut();
        let now = self.get_current_time();
        reports.due(now);
        while let Some(q) = reports.queue.pop_front() {
            match self.dispatch_http_call(
                &host.cluster,
                edge::host_headers(host, "/v1/edge/report"),
                Some(&q.body),
                vec![],
                Duration::from_millis(host.timeout_ms.max(1000)),
            ) {
                Ok(token) => {
                    reports.in_flight.insert(token, q);
                }
                Err(status) => {
                    let what = format!("cannot dispatch to cluster {}: {status:?}", host.cluster);
                    reports.retry(q, now, &what);
                }
            }
        }
    }
}

impl<P: Policy> Context for Root<P> {
    fn on_http_call_response(&mut self, token: u32, _: usize, body_size: usize, _: usize) {
        let Some(q) = self.reports.borrow_mut().in_flight.remove(&token) else {
            return;
        };
        let status = self.get_http_call_response_header(":status");
        if status.as_deref() == Some("200") {
            return;
        }
        let body = self
            .get_http_call_response_body(0, body_size.min(512))
            .unwrap_or_default();
        let what = format!(
            "status {}: {}",
            status
                .as_deref()
                .unwrap_or("none (timeout or connection failure)"),
            String::from_utf8_lossy(&body)
        );
        let mut reports = self.reports.borrow_mut();
        // 400 means the host refuses this report as malformed: retrying cannot help.
        if status.as_deref() == Some("400") {
            reports.dropped();
            log::error!(
                "llmscope: report dropped after {} attempt(s), host answered {what}",
                q.attempts + 1
            );
        } else {
            reports.retry(q, self.get_current_time(), &what);
        }
    }
}

impl<P: Policy> RootContext for Root<P> {
    fn on_configure(&mut self, _: usize) -> bool {
        // Follow the proxy's log level (`--component-log-level wasm:debug` shows per-request
        // lines); the host call is not allowed before the VM has started.
        if let Ok(level) = proxy_wasm::hostcalls::get_log_level() {
            proxy_wasm::set_log_level(level);
        }
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match edge::parse_config::<P>(&bytes) {
            Ok((cfg, settings)) => {
                log::info!(
                    "llmscope: rule {} ({} {}) configured, {} aggregate(s), host cluster {}",
                    cfg.rule_id,
                    P::NAME,
                    P::VERSION,
                    cfg.aggregates.len(),
                    cfg.host.cluster
                );
                self.configured = Some(Configured {
                    cfg: Rc::new(cfg),
                    settings: Rc::new(settings),
                });
                self.reports.borrow_mut().define_metric();
                self.set_tick_period(REPORT_TICK);
                true
            }
            Err(e) => {
                log::error!("llmscope: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        self.flush();
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter::<P> {
            configured: self.configured.as_ref().map(|c| Configured {
                cfg: Rc::clone(&c.cfg),
                settings: Rc::clone(&c.settings),
            }),
            reports: Rc::clone(&self.reports),
            state: State::default(),
            _policy: PhantomData,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

#[derive(Default)]
struct State {
    path: String,
    headers: BTreeMap<String, String>,
    body: Option<Value>,
    body_len: usize,
    chat: bool,
    /// The path is OpenAI's chat-completions API (streams report usage only when asked).
    openai: bool,
    request_id: String,
    owner: bool,
    evaluated: bool,
    ctx: Option<RequestContext>,
    host_error: Option<String>,
    local_reply: bool,
    dispatched_at: Option<SystemTime>,
    finished_at: Option<SystemTime>,
    status: Option<u16>,
    response: Vec<u8>,
}

struct Filter<P: Policy> {
    configured: Option<Configured<P>>,
    reports: Rc<RefCell<Reports>>,
    state: State,
    _policy: PhantomData<P>,
}

fn new_request_id(context_seed: u64) -> String {
    let mut bytes = [0u8; 16];
    if getrandom::getrandom(&mut bytes).is_err() {
        // No entropy source: time and context id still make ids unique per proxy.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes[..8].copy_from_slice(&(nanos as u64).to_le_bytes());
        bytes[8..].copy_from_slice(&context_seed.to_le_bytes());
    }
    let mut id = String::with_capacity(36);
    id.push_str("req-");
    for b in bytes {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

fn ms_between(a: SystemTime, b: SystemTime) -> f64 {
    b.duration_since(a)
        .map_or(0.0, |d| (d.as_secs_f64() * 1e6).round() / 1e3)
}

impl<P: Policy> Filter<P> {
    fn cfg(&self) -> Option<&Rc<FilterConfig>> {
        self.configured.as_ref().map(|c| &c.cfg)
    }

    fn json_reply(&mut self, status: u32, body: &str, extra: &[(&str, &str)]) {
        let mut headers = vec![("content-type", "application/json")];
        headers.extend_from_slice(extra);
        let id = self.state.request_id.clone();
        if !id.is_empty() {
            headers.push((REQUEST_ID_HEADER, id.as_str()));
        }
        self.send_http_response(status, headers, Some(body.as_bytes()));
        self.state.local_reply = true;
    }

    fn record(&self, outcome: &RuleOutcome) {
        let mut list: Vec<Value> = self
            .get_property(vec![OUTCOMES_PROPERTY])
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if let Ok(v) = serde_json::to_value(outcome) {
            list.push(v);
        }
        if let Ok(bytes) = serde_json::to_vec(&list) {
            self.set_property(vec![OUTCOMES_PROPERTY], Some(&bytes));
        }
    }

    /// The host could not give a context: apply `on_unavailable`. Returns whether the request
    /// continues.
    fn host_unavailable(&mut self, detail: String) -> bool {
        let Some(cfg) = self.cfg().cloned() else {
            return false;
        };
        let open = cfg.host.on_unavailable == FailureMode::Open;
        log::warn!(
            "llmscope: rule {}: policy host unavailable ({detail}); failing {}",
            cfg.rule_id,
            if open { "open" } else { "closed" }
        );
        let outcome = RuleOutcome {
            rule_id: cfg.rule_id.clone(),
            primitive: cfg.primitive.clone(),
            mode: cfg.mode,
            failure_mode: cfg.host.on_unavailable,
            decision: if open {
                DecisionKind::Allow
            } else {
                DecisionKind::Deny
            },
            downgrade_to: None,
            reason: (!open).then(|| format!("policy host unavailable for rule {}", cfg.rule_id)),
            alert: None,
            facts: BTreeMap::new(),
            error: Some(format!("policy host unavailable: {detail}")),
            applied: !open,
            eval_us: 0.0,
            component_sha256: None,
            settings_sha256: None,
            aggregates: BTreeMap::new(),
            snapshot_taken_at_ms: None,
        };
        self.record(&outcome);
        self.state.host_error = Some(detail.clone());
        self.state.evaluated = true;
        if open {
            // Unpriced (no context): no output cap to set, but a stream still asks for its
            // usage, which prices the report.
            let openai = self.state.openai;
            if let Some(body) = self.state.body.as_mut() {
                if edge::enforce_priced(body, None, openai) {
                    let bytes = body.to_string().into_bytes();
                    self.set_http_request_body(0, self.state.body_len, &bytes);
                    self.state.body_len = bytes.len();
                }
            }
            self.mark_dispatch();
            true
        } else {
            let body = http::unavailable_body(self.state.chat, &cfg.rule_id, &detail);
            self.json_reply(503, &body.to_string(), &[]);
            false
        }
    }

    /// Record the tier the request goes out at; the upstream cluster's `header_mutation` filter
    /// copies it into `x-llmscope-model-tier` (request headers have left this filter by now).
    fn set_tier(&self, tier: &str) {
        self.set_property(vec![TIER_PROPERTY], Some(tier.as_bytes()));
    }

    /// An earlier filter's host answer (kept as received, see [`CONTEXT_PROPERTY`]), when this
    /// rule needs no aggregates and the request is still at the tier that answer priced. The
    /// earlier rule's aggregate values are dropped: this rule declared none.
    fn shared_context(&self, cfg: &FilterConfig, tier: Option<&str>) -> Option<ContextAnswer> {
        if !cfg.aggregates.is_empty() {
            return None;
        }
        let mut answer: ContextAnswer =
            serde_json::from_slice(&self.get_property(vec![CONTEXT_PROPERTY])?).ok()?;
        answer.snapshot = Snapshot::default();
        (Some(answer.request.requested_tier.as_str()) == tier).then_some(answer)
    }

    fn mark_dispatch(&mut self) {
        if self.state.owner {
            self.state.dispatched_at = Some(self.get_current_time());
        }
    }

    /// Evaluate with the host's answer and act. Returns whether the request continues.
    fn apply(&mut self, answer: ContextAnswer) -> bool {
        let Some(c) = &self.configured else {
            return false;
        };
        let cfg = Rc::clone(&c.cfg);
        let settings = Rc::clone(&c.settings);
        let started = self.get_current_time();
        let result = P::evaluate(&settings, &answer.request, &answer.snapshot);
        let eval_us = self
            .get_current_time()
            .duration_since(started)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6);
        let (mut outcome, action) = edge::decide(&cfg, &answer.request, result, eval_us);
        // Provenance: the values the rule was given (the host logs them with the decision).
        outcome.aggregates = crate::verdict::LoggedAggregate::of_snapshot(&answer.snapshot);
        outcome.snapshot_taken_at_ms = Some(answer.snapshot.taken_at_unix_ms);
        self.record(&outcome);
        self.state.evaluated = true;
        if self.state.owner {
            self.state.ctx = Some(answer.request.clone());
        }
        match action {
            edge::Action::Continue => {
                if self.state.owner {
                    self.set_tier(&answer.request.requested_tier);
                }
                self.forward_priced(None, Some(answer.request.estimated_tokens_out), &answer);
                self.mark_dispatch();
                true
            }
            edge::Action::Downgrade { tier } => {
                self.set_tier(&tier);
                self.forward_priced(
                    Some(&tier),
                    Some(answer.request.estimated_tokens_out),
                    &answer,
                );
                self.mark_dispatch();
                true
            }
            edge::Action::Deny { reason } => {
                let body = http::deny_body(
                    self.state.chat,
                    &reason,
                    Some(&cfg.rule_id),
                    &answer.request.request_id,
                );
                self.json_reply(402, &body.to_string(), &[(POLICY_DECISION_HEADER, "deny")]);
                false
            }
        }
    }

    /// Rewrite the body that goes on (once, whatever changed): the tier's model on a downgrade,
    /// the output cap at `max_out` (the priced output) and the usage asked for on an OpenAI
    /// stream ([`edge::enforce_priced`]).
    fn forward_priced(&mut self, tier: Option<&str>, max_out: Option<u32>, answer: &ContextAnswer) {
        let openai = self.state.openai;
        let Some(body) = self.state.body.as_mut() else {
            return;
        };
        let mut changed = false;
        if let Some(tier) = tier {
            changed |= edge::rewrite_tier(body, tier, &answer.tier_models);
        }
        changed |= edge::enforce_priced(body, max_out, openai);
        if changed {
            let bytes = body.to_string().into_bytes();
            self.set_http_request_body(0, self.state.body_len, &bytes);
            self.state.body_len = bytes.len();
        }
    }

    fn report(&mut self) {
        let outcomes: Vec<RuleOutcome> = self
            .get_property(vec![OUTCOMES_PROPERTY])
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let status = self.state.status.or_else(|| {
            self.get_http_response_header(":status")
                .and_then(|s| s.parse().ok())
        });
        let downgraded = outcomes
            .iter()
            .rev()
            .find(|o| o.applied && o.downgrade_to.is_some())
            .and_then(|o| o.downgrade_to.clone());
        let local_reply = self.state.local_reply
            || outcomes
                .iter()
                .any(|o| o.applied && o.decision == DecisionKind::Deny);
        let (usage, finish_reason) = if local_reply {
            (None, None)
        } else {
            edge::parse_usage(&self.state.response)
        };
        let model = if local_reply {
            None
        } else {
            edge::model_of_response(&self.state.response)
        };
        let latency_ms = match (self.state.dispatched_at, self.state.finished_at) {
            (Some(a), Some(b)) => ms_between(a, b),
            _ => 0.0,
        };
        let original = if self.state.ctx.is_none() {
            Some(ContextRequest {
                request_id: Some(self.state.request_id.clone()),
                path: std::mem::take(&mut self.state.path),
                headers: std::mem::take(&mut self.state.headers),
                body: self.state.body.take().unwrap_or(Value::Null),
                aggregates: Vec::new(),
                attribution: self
                    .cfg()
                    .map_or(edge::Attribution::Any, |c| c.host.attribution),
            })
        } else {
            None
        };
        let effective_tier = downgraded
            .or_else(|| self.state.ctx.as_ref().map(|c| c.requested_tier.clone()))
            .unwrap_or_default();
        let report = Report {
            request: self.state.ctx.take(),
            original,
            effective_tier,
            status: status.unwrap_or(0),
            local_reply,
            latency_ms,
            usage,
            finish_reason,
            model,
            rules: outcomes,
            host_error: self.state.host_error.take(),
        };
        let since = report
            .request
            .as_ref()
            .map(|c| UNIX_EPOCH + Duration::from_millis(c.unix_time_ms));
        match serde_json::to_vec(&report) {
            Ok(bytes) => self.reports.borrow_mut().push(bytes, since),
            Err(e) => log::error!("llmscope: cannot encode a report: {e}"),
        }
    }
}

impl<P: Policy> Context for Filter<P> {
    fn on_http_call_response(&mut self, _: u32, _: usize, body_size: usize, _: usize) {
        let status = self
            .get_http_call_response_header(":status")
            .and_then(|s| s.parse::<u16>().ok());
        log::debug!("llmscope: context answer status {status:?}, {body_size} bytes");
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        let timeout = self.cfg().map_or(0, |c| c.host.timeout_ms);
        let proceed = match status {
            None => self.host_unavailable(format!(
                "no answer within {timeout} ms or the connection failed"
            )),
            Some(200) => match serde_json::from_slice::<ContextAnswer>(&body) {
                Ok(answer) => {
                    // For the chain's later filters: the answer as received, no re-encoding.
                    self.set_property(vec![CONTEXT_PROPERTY], Some(&body));
                    self.apply(answer)
                }
                Err(e) => self.host_unavailable(format!("unreadable context answer: {e}")),
            },
            Some(s)
                if self
                    .get_http_call_response_header(CLIENT_ERROR_HEADER)
                    .is_some() =>
            {
                // The client's request is invalid (bad field, unknown route): answer as the
                // host would, and do not report a request that never was one.
                let text = String::from_utf8_lossy(&body).into_owned();
                self.json_reply(u32::from(s), &text, &[]);
                self.state.owner = false;
                false
            }
            Some(s) => {
                let excerpt: String = String::from_utf8_lossy(&body).chars().take(300).collect();
                // Envoy answers 504 itself when the call outlives its timeout.
                self.host_unavailable(if s == 504 {
                    format!("no answer within {timeout} ms ({excerpt})")
                } else {
                    format!("host answered {s}: {excerpt}")
                })
            }
        };
        if proceed {
            self.resume_http_request();
        }
    }
}

impl<P: Policy> HttpContext for Filter<P> {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        // Control headers are llmscope's: a client's (say a cheaper `x-llmscope-model-tier`
        // than its body's model) is dropped before anything reads it or it reaches the upstream.
        // No llmscope filter sets one on the request (the tier goes through filter state to the
        // upstream cluster's `header_mutation`), so every filter may drop them.
        let headers = self.get_http_request_headers();
        for (name, _) in &headers {
            if CONTROL_HEADERS.contains(&name.as_str()) {
                self.set_http_request_header(name, None);
            }
        }
        if end_of_stream {
            // No body: not an inference call.
            return Action::Continue;
        }
        self.state.path = self.get_http_request_header(":path").unwrap_or_default();
        self.state.openai = self.state.path.contains("/chat/completions");
        for (name, value) in headers {
            if name.starts_with(HEADER_PREFIX)
                && name != REQUEST_ID_HEADER
                && !CONTROL_HEADERS.contains(&name.as_str())
            {
                self.state.headers.insert(name, value);
            }
        }
        match self
            .get_property(vec![REQUEST_ID_PROPERTY])
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|s| !s.is_empty())
        {
            Some(id) => self.state.request_id = id,
            None => {
                let seed = u64::from(self.reports.borrow().queue.len() as u32);
                let id = new_request_id(seed);
                self.set_property(vec![REQUEST_ID_PROPERTY], Some(id.as_bytes()));
                self.set_http_request_header(REQUEST_ID_HEADER, Some(&id));
                // Usage is read from the response: ask for it uncompressed.
                self.set_http_request_header("accept-encoding", None);
                self.state.request_id = id;
                self.state.owner = true;
            }
        }
        // Envoy's proxy-wasm host cannot hold headers while a filter reads the body, so the
        // headers go on now and the upstream cluster's `buffer` filter holds the request until
        // the body is released (see examples/envoy). The body may be rewritten: its length is
        // set again by that buffer filter.
        self.set_http_request_header("content-length", None);
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        let Some(cfg) = self.cfg().cloned() else {
            self.json_reply(
                503,
                &http::unavailable_body(false, "(unconfigured)", "filter not configured")
                    .to_string(),
                &[],
            );
            return Action::Pause;
        };
        let bytes = self.get_http_request_body(0, body_size).unwrap_or_default();
        self.state.body_len = bytes.len();
        let body: Value = match serde_json::from_slice(&bytes) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                self.state.owner = false;
                self.json_reply(
                    400,
                    &http::invalid_json_body(false, "body must be a JSON object").to_string(),
                    &[],
                );
                return Action::Pause;
            }
            Err(e) => {
                self.state.owner = false;
                let chat = self.state.path.contains("/chat/completions");
                let msg = format!("body is not valid JSON: {e}");
                self.json_reply(400, &http::invalid_json_body(chat, &msg).to_string(), &[]);
                return Action::Pause;
            }
        };
        self.state.chat = edge::is_chat(&body);
        if let Err(refusal) = edge::check_priceable(&body) {
            log::info!(
                "llmscope: rule {}: refused unpriced request ({})",
                cfg.rule_id,
                refusal.message
            );
            self.state.owner = false;
            let reply = http::unpriced_body(
                self.state.chat,
                &refusal.message,
                refusal.code,
                &refusal.param,
            );
            self.json_reply(400, &reply.to_string(), &[]);
            return Action::Pause;
        }
        // An earlier filter of the chain may have downgraded the request.
        let tier = self
            .get_property(vec![TIER_PROPERTY])
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|t| !t.is_empty());
        if let Some(answer) = self.shared_context(&cfg, tier.as_deref()) {
            self.state.body = Some(body);
            return if self.apply(answer) {
                Action::Continue
            } else {
                Action::Pause
            };
        }
        if let Some(tier) = tier {
            self.state.headers.insert(TIER_HEADER.to_owned(), tier);
        }
        // Moved into the call and back out: the body and headers are not copied.
        let call = ContextRequest {
            request_id: Some(self.state.request_id.clone()),
            path: std::mem::take(&mut self.state.path),
            headers: std::mem::take(&mut self.state.headers),
            body,
            aggregates: cfg.aggregates.clone(),
            attribution: cfg.host.attribution,
        };
        let encoded = serde_json::to_vec(&call).unwrap_or_default();
        self.state.path = call.path;
        self.state.headers = call.headers;
        self.state.body = Some(call.body);
        match self.dispatch_http_call(
            &cfg.host.cluster,
            edge::host_headers(&cfg.host, "/v1/edge/context"),
            Some(&encoded),
            vec![],
            Duration::from_millis(cfg.host.timeout_ms),
        ) {
            Ok(_) => Action::Pause,
            Err(status) => {
                let detail = format!(
                    "cannot call cluster `{}` ({status:?}); is it defined in the Envoy config?",
                    cfg.host.cluster
                );
                if self.host_unavailable(detail) {
                    Action::Continue
                } else {
                    Action::Pause
                }
            }
        }
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        if self.state.owner {
            self.state.status = self
                .get_http_response_header(":status")
                .and_then(|s| s.parse().ok());
            if end_of_stream {
                self.state.finished_at = Some(self.get_current_time());
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.state.owner && !self.state.local_reply {
            if let Some(chunk) = self.get_http_response_body(0, body_size) {
                self.state.response.extend_from_slice(&chunk);
                if self.state.response.len() > MAX_RESPONSE_CAPTURE {
                    let cut = self.state.response.len() - MAX_RESPONSE_CAPTURE / 4;
                    self.state.response.drain(..cut);
                }
            }
            if end_of_stream {
                self.state.finished_at = Some(self.get_current_time());
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if self.state.owner && self.state.evaluated {
            if self.state.finished_at.is_none() {
                self.state.finished_at = Some(self.get_current_time());
            }
            self.report();
        }
    }
}
