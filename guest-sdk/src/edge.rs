//! The policy as an edge filter, without the proxy: plugin configuration, the calls to the
//! llmscope host (the control plane), verdict → action, body rewriting, usage extraction and the
//! report. Everything here is plain Rust, unit-tested natively; [`crate::proxy`] (feature
//! `proxy-wasm`) wires it to Envoy's proxy-wasm ABI.
//!
//! Plugin configuration (Envoy's `configuration` string) is JSON:
//!
//! ```json
//! {
//!   "rule": {"id": "tenant-hourly-cap", "primitive": "budget_threshold",
//!            "mode": "enforce", "failure_mode": "closed", "limit_usd": 50, "window": "1h"},
//!   "host": {"cluster": "llmscope", "authority": "llmscope", "timeout_ms": 200,
//!            "api_key": "...", "on_unavailable": "closed"}
//! }
//! ```
//!
//! `rule` is written exactly like a rule in the host's policy YAML (settings beside `id`,
//! `primitive`, `mode`, `failure_mode`), so a rule moves between the two unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::http::API_KEY_HEADER;
use crate::types::{Aggregate, RequestContext, Snapshot, Verdict};
use crate::verdict::{DecisionKind, FailureMode, Mode, RuleOutcome};
use crate::Policy;

/// Rule-level keys that are not the primitive's settings.
const RULE_KEYS: [&str; 4] = ["id", "primitive", "mode", "failure_mode"];
/// Upper bound on the host call timeout.
const MAX_TIMEOUT_MS: u64 = 10_000;

/// Where the llmscope host is, as an Envoy cluster.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Envoy cluster name of the llmscope host.
    pub cluster: String,
    /// `:authority` sent to it (default: the cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// Timeout of each host call, ms (default 200, at most 10000).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// API key with `*` access, when the host requires keys.
    #[serde(default)]
    pub api_key: Option<String>,
    /// What to do when the host cannot be reached or answers with an error: `closed` (503,
    /// the default) or `open` (dispatch unevaluated; the report is priced later).
    #[serde(default)]
    pub on_unavailable: FailureMode,
    /// Where tenant, caller, feature, experiment and namespace may come from: `any` (headers,
    /// else the body's fields or `metadata`; the default) or `headers` (only the
    /// `x-llmscope-*` headers, which Envoy should set from the authenticated identity).
    #[serde(default)]
    pub attribution: Attribution,
}

/// Sources of a request's attribution (who is billed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attribution {
    /// Headers, else the body.
    #[default]
    Any,
    /// Headers only: body fields and `metadata` are ignored.
    Headers,
}

fn default_timeout() -> u64 {
    200
}

/// A validated filter configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterConfig {
    /// Rule id.
    pub rule_id: String,
    /// Primitive name (the policy's).
    pub primitive: String,
    /// Enforce or monitor.
    pub mode: Mode,
    /// Failure mode of the rule itself.
    pub failure_mode: FailureMode,
    /// The rule's settings as JSON text.
    pub settings_json: String,
    /// The host.
    pub host: HostConfig,
    /// Aggregates the rule declared.
    pub aggregates: Vec<Aggregate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    rule: Map<String, Value>,
    host: HostConfig,
}

/// Parse and validate a plugin configuration for policy `P`: shape, rule keys, the settings
/// (through `P`'s own `configure`), the host block. Errors name the field path.
pub fn parse_config<P: Policy>(bytes: &[u8]) -> Result<(FilterConfig, P::Settings), String> {
    let at = |m: String| format!("plugin configuration of {}: {m}", P::NAME);
    if bytes.is_empty() {
        return Err(at(
            "empty; expected JSON {\"rule\": {...}, \"host\": {\"cluster\": ...}}".into(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let raw: RawConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        at(format!("{path}: {}", e.into_inner()))
    })?;
    let mut rule = raw.rule;
    let rule_id = match rule.remove("id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        Some(_) => return Err(at("rule.id: must be a non-empty string".into())),
        None => return Err(at("rule.id: is required".into())),
    };
    let at = |m: String| format!("plugin configuration of {}, rule `{rule_id}`: {m}", P::NAME);
    match rule.remove("primitive") {
        None => {}
        Some(Value::String(p)) if p == P::NAME => {}
        Some(other) => {
            return Err(at(format!(
                "rule.primitive: is {other}, but this filter is the {} primitive; load the matching .proxy.wasm",
                P::NAME
            )))
        }
    }
    let mode = match rule.remove("mode") {
        None => Mode::default(),
        Some(v) => serde_json::from_value(v)
            .map_err(|_| at("rule.mode: must be `enforce` or `monitor`".into()))?,
    };
    let failure_mode = match rule.remove("failure_mode") {
        None => FailureMode::default(),
        Some(v) => serde_json::from_value(v)
            .map_err(|_| at("rule.failure_mode: must be `closed` or `open`".into()))?,
    };
    debug_assert!(RULE_KEYS.iter().all(|k| !rule.contains_key(*k)));
    if raw.host.cluster.trim().is_empty() {
        return Err(at(
            "host.cluster: must name the Envoy cluster of the llmscope host".into(),
        ));
    }
    if raw.host.timeout_ms == 0 || raw.host.timeout_ms > MAX_TIMEOUT_MS {
        return Err(at(format!(
            "host.timeout_ms: must be between 1 and {MAX_TIMEOUT_MS}"
        )));
    }
    let settings_json = Value::Object(rule).to_string();
    let settings =
        crate::parse_settings::<P>(&settings_json).map_err(|e| at(format!("rule.{e}")))?;
    let aggregates = P::configure(&settings).map_err(|e| at(format!("rule: {e}")))?;
    Ok((
        FilterConfig {
            rule_id,
            primitive: P::NAME.to_owned(),
            mode,
            failure_mode,
            settings_json,
            host: raw.host,
            aggregates,
        },
        settings,
    ))
}

/// The body of `POST /v1/edge/context`, and the `original` of a [`Report`] sent without a
/// context: serialized by the filter, read strictly by the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextRequest {
    /// The request id the chain's first filter drew (the filter always sends it; absent, the
    /// host draws one).
    #[serde(default)]
    pub request_id: Option<String>,
    /// The request's path (`/infer`, `/v1/chat/completions`, ...), for errors and logs.
    #[serde(default)]
    pub path: String,
    /// The request's `x-llmscope-*` headers (names lower-case).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The request's JSON body: a `/infer` body, or a chat-completions body (has `messages`).
    pub body: Value,
    /// The aggregates the calling rule declared at configure time.
    #[serde(default)]
    pub aggregates: Vec<Aggregate>,
    /// Where attribution may come from (`headers`: the body's identity fields are ignored).
    #[serde(default)]
    pub attribution: Attribution,
}

/// The host's answer to a context call (`POST /v1/edge/context`); the host serializes this type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContextAnswer {
    /// The priced request.
    pub request: RequestContext,
    /// The rule's aggregate values.
    pub snapshot: Snapshot,
    /// Upstream model name per tier.
    #[serde(default)]
    pub tier_models: BTreeMap<String, String>,
}

/// What the filter does with the request.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Pass it on unchanged.
    Continue,
    /// Pass it on at a cheaper tier.
    Downgrade {
        /// Tier.
        tier: String,
    },
    /// Answer 402 without calling the upstream.
    Deny {
        /// Reason shown to the client.
        reason: String,
    },
}

/// Turn a rule's raw result into its recorded outcome and the action to take, exactly as the
/// host does: a downgrade to a tier the route lacks is a rule failure, a downgrade to the
/// requested tier is an allow, a failure becomes deny (`closed`) or allow (`open`), and
/// `monitor` rules never act.
pub fn decide(
    cfg: &FilterConfig,
    request: &RequestContext,
    result: Result<Verdict, String>,
    eval_us: f64,
) -> (RuleOutcome, Action) {
    let mut outcome = RuleOutcome::of(
        &cfg.rule_id,
        &cfg.primitive,
        cfg.mode,
        cfg.failure_mode,
        result.and_then(|v| v.checked(request)),
        eval_us,
    );
    let action = match (outcome.decision, &outcome.downgrade_to) {
        (DecisionKind::Downgrade, Some(tier)) => Action::Downgrade { tier: tier.clone() },
        (DecisionKind::Deny, _) => Action::Deny {
            reason: outcome
                .reason
                .clone()
                .unwrap_or_else(|| "denied by policy".into()),
        },
        _ => Action::Continue,
    };
    if cfg.mode == Mode::Monitor {
        return (outcome, Action::Continue);
    }
    outcome.applied = action != Action::Continue;
    (outcome, action)
}

/// Whether a JSON body is an OpenAI chat-completions body (else a `/infer` body).
pub fn is_chat(body: &Value) -> bool {
    body.get("messages").is_some()
}

/// Point the body at `tier`: `model` of a chat body becomes the tier's upstream model name, a
/// `/infer` body's `model_tier` becomes the tier. Returns whether the body changed.
pub fn rewrite_tier(body: &mut Value, tier: &str, tier_models: &BTreeMap<String, String>) -> bool {
    let Some(obj) = body.as_object_mut() else {
        return false;
    };
    let (field, value) = if obj.contains_key("messages") {
        match tier_models.get(tier) {
            Some(model) => ("model", model.clone()),
            None => return false,
        }
    } else {
        ("model_tier", tier.to_owned())
    };
    if obj.get(field).and_then(Value::as_str) == Some(value.as_str()) {
        return false;
    }
    obj.insert(field.to_owned(), Value::String(value));
    true
}

/// Why a body cannot go out as it is: it asks for something the host does not price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpriced {
    /// Machine-readable code (`unsupported_n`, `unsupported_tools`, `unsupported_content`, ...).
    pub code: &'static str,
    /// The offending parameter, e.g. `messages[0].content[1]`.
    pub param: String,
    /// What to do instead.
    pub message: String,
}

fn unpriced(code: &'static str, param: impl Into<String>, what: &str) -> Unpriced {
    let param = param.into();
    Unpriced {
        message: format!(
            "{param}: {what}; llmscope prices text messages and one choice per request, so this request was not sent"
        ),
        code,
        param,
    }
}

/// Refuse a chat body that would be billed for more than the host prices: the host counts the
/// text of `messages` and one choice of at most the route's output tokens. So `n` other than 1,
/// `tools` / `functions`, audio output and message parts other than text (images, audio, files)
/// are refused rather than forwarded unpriced. `/infer` bodies have nothing of the kind.
pub fn check_priceable(body: &Value) -> Result<(), Unpriced> {
    let Some(obj) = body.as_object() else {
        return Ok(());
    };
    if !obj.contains_key("messages") {
        return Ok(());
    }
    match obj.get("n") {
        None | Some(Value::Null) => {}
        Some(n) if n.as_u64() == Some(1) => {}
        Some(n) => {
            return Err(unpriced(
                "unsupported_n",
                "n",
                &format!(
                    "is {n}: several choices are billed several times; send n = 1 or leave it out"
                ),
            ))
        }
    }
    for field in ["tools", "functions"] {
        let present = match obj.get(field) {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if present {
            return Err(unpriced(
                "unsupported_tools",
                field,
                "tool definitions are billed as input tokens that are not priced",
            ));
        }
    }
    if obj.get("audio").is_some_and(|a| !a.is_null()) {
        return Err(unpriced(
            "unsupported_content",
            "audio",
            "audio output is billed at audio rates that are not priced",
        ));
    }
    let messages = obj.get("messages").and_then(Value::as_array);
    for (i, m) in messages.into_iter().flatten().enumerate() {
        let Some(parts) = m.get("content").and_then(Value::as_array) else {
            continue;
        };
        for (j, part) in parts.iter().enumerate() {
            let kind = part.get("type").and_then(Value::as_str);
            let text = part.get("text").is_some_and(Value::is_string);
            if !(text && matches!(kind, None | Some("text"))) {
                return Err(unpriced(
                    "unsupported_content",
                    format!("messages[{i}].content[{j}]"),
                    &format!(
                        "a `{}` part is billed but not priced; send text parts only",
                        kind.unwrap_or("(untyped)")
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Make the forwarded body ask for no more than was priced. `max_out` is the priced output
/// (`estimated_tokens_out`: the client's cap bounded by the route's): a chat body's
/// `max_completion_tokens` and/or `max_tokens` become it (`max_tokens` is added when the body
/// has neither), a `/infer` body's `max_tokens` too. With `openai`, a streamed chat body gets
/// `stream_options.include_usage: true`, so the stream ends with the usage that is settled (an
/// OpenAI stream carries none otherwise). Returns whether the body changed.
pub fn enforce_priced(body: &mut Value, max_out: Option<u32>, openai: bool) -> bool {
    let Some(obj) = body.as_object_mut() else {
        return false;
    };
    let mut changed = false;
    let mut set = |obj: &mut Map<String, Value>, field: &str, value: Value| {
        if obj.get(field) != Some(&value) {
            obj.insert(field.to_owned(), value);
            changed = true;
        }
    };
    let chat = obj.contains_key("messages");
    if let Some(max) = max_out {
        let present = |obj: &Map<String, Value>, f: &str| obj.get(f).is_some_and(|v| !v.is_null());
        let completion = chat && present(obj, "max_completion_tokens");
        if completion {
            set(obj, "max_completion_tokens", Value::from(max));
        }
        if !completion || present(obj, "max_tokens") {
            set(obj, "max_tokens", Value::from(max));
        }
    }
    if chat && openai && obj.get("stream").and_then(Value::as_bool) == Some(true) {
        let mut options = match obj.get("stream_options") {
            Some(Value::Object(o)) => o.clone(),
            _ => Map::new(),
        };
        options.insert("include_usage".into(), Value::Bool(true));
        set(obj, "stream_options", Value::Object(options));
    }
    changed
}

/// How long the host holds an edge request's reservation for its report, and remembers a
/// reported id; the filter retries a report for as long (then drops it, counted), so a retry
/// can never be recorded twice.
pub const RESERVATION_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// Token usage found in a response; reported to the host, which reads it strictly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// Input tokens.
    pub tokens_in: u32,
    /// Output tokens.
    pub tokens_out: u32,
}

fn usage_of(v: &Value) -> Option<Usage> {
    let n = |v: Option<&Value>| {
        v.and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
    };
    let u = v.get("usage");
    // OpenAI, Anthropic, then llmscope's own /infer answer.
    let pair = u
        .and_then(|u| Some((n(u.get("prompt_tokens"))?, n(u.get("completion_tokens"))?)))
        .or_else(|| u.and_then(|u| Some((n(u.get("input_tokens"))?, n(u.get("output_tokens"))?))))
        .or_else(|| Some((n(v.get("tokens_in"))?, n(v.get("tokens_out"))?)));
    pair.map(|(tokens_in, tokens_out)| Usage {
        tokens_in,
        tokens_out,
    })
}

fn finish_of(v: &Value) -> Option<String> {
    v.pointer("/choices/0/finish_reason")
        .or_else(|| v.get("stop_reason"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// Usage and finish reason from a response body: a JSON document (OpenAI, Anthropic or
/// llmscope `/infer`), or a server-sent-event stream whose events carry them (the last wins).
pub fn parse_usage(body: &[u8]) -> (Option<Usage>, Option<String>) {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return (usage_of(&v), finish_of(&v));
    }
    let text = String::from_utf8_lossy(body);
    let mut usage = None;
    let mut finish = None;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(data.trim()) else {
            continue;
        };
        // Anthropic streams put usage under `message` (start) and at the top (delta).
        let v = v
            .get("message")
            .filter(|m| m.get("usage").is_some())
            .unwrap_or(&v);
        if let Some(u) = usage_of(v) {
            usage = Some(u);
        } else if let Some(out) = v.pointer("/usage/output_tokens").and_then(Value::as_u64) {
            if let Some(u) = usage.as_mut() {
                u.tokens_out = u32::try_from(out).unwrap_or(u32::MAX);
            }
        }
        if let Some(f) = finish_of(v).or_else(|| {
            v.pointer("/delta/stop_reason")
                .and_then(Value::as_str)
                .map(str::to_owned)
        }) {
            finish = Some(f);
        }
    }
    (usage, finish)
}

/// The model a response names (`model` of a JSON answer; of the first event of a
/// server-sent-event stream that has one, or of Anthropic's `message_start`).
pub fn model_of_response(body: &[u8]) -> Option<String> {
    let named = |v: &Value| {
        v.get("model")
            .or_else(|| v.pointer("/message/model"))
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty() && m.len() <= 256)
            .map(str::to_owned)
    };
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return named(&v);
    }
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
        .find_map(|v| named(&v))
}

/// The body of `POST /v1/edge/report`: serialized by the chain's first filter after the
/// response (or a local reply), read strictly by the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The context the first filter received (ids, attribution, estimates); absent when the
    /// host could not be reached before dispatch (fail-open), then `original` is priced now.
    #[serde(default)]
    pub request: Option<RequestContext>,
    /// The request as the filter saw it, sent when `request` is absent.
    #[serde(default, serialize_with = "through_value")]
    pub original: Option<ContextRequest>,
    /// Tier the request was dispatched at (after downgrades).
    pub effective_tier: String,
    /// HTTP status the client received.
    pub status: u16,
    /// Whether a filter answered locally (deny, host unavailable): the upstream was not called.
    #[serde(default)]
    pub local_reply: bool,
    /// Time from dispatch to the end of the upstream response, ms.
    #[serde(default)]
    pub latency_ms: f64,
    /// Usage from the upstream's response, when it reported one.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// `finish_reason` / `stop_reason` from the response.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// The model the upstream says it answered with (the response's `model`): the host prices
    /// the request at it when it differs from the tier's. Left out when the response names
    /// none, so reports stay readable by hosts that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Every rule's outcome, in chain order.
    #[serde(default)]
    pub rules: Vec<RuleOutcome>,
    /// Set when the filter could not reach the host before evaluating.
    #[serde(default)]
    pub host_error: Option<String>,
}

/// Serialize through a [`Value`], as reports always have been: the object's keys come out
/// sorted rather than in field order.
fn through_value<S: serde::Serializer>(
    original: &Option<ContextRequest>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let value = original
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(serde::ser::Error::custom)?;
    value.serialize(serializer)
}

/// Headers sent with every host call.
pub fn host_headers<'a>(host: &'a HostConfig, path: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut h = vec![
        (":method", "POST"),
        (":path", path),
        (
            ":authority",
            host.authority.as_deref().unwrap_or(host.cluster.as_str()),
        ),
        ("content-type", "application/json"),
    ];
    if let Some(key) = &host.api_key {
        h.push((API_KEY_HEADER, key.as_str()));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::request;
    use crate::types::{Aggregation, Metric, Scope, Window};
    use serde_json::json;

    struct Cap;
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct CapSettings {
        limit_usd: f64,
    }
    impl Policy for Cap {
        type Settings = CapSettings;
        const NAME: &'static str = "cap";
        const VERSION: &'static str = "0";
        const DESCRIPTION: &'static str = "";
        fn configure(s: &CapSettings) -> Result<Vec<Aggregate>, String> {
            if s.limit_usd <= 0.0 {
                return Err("limit_usd: must be positive".into());
            }
            Ok(vec![Aggregate {
                key: "spent".into(),
                metric: Metric::CostUsd,
                aggregation: Aggregation::Sum,
                scope: vec![Scope::Tenant],
                window: Window::RollingSeconds(3600),
                include_in_flight: true,
            }])
        }
        fn evaluate(_: &CapSettings, _: &RequestContext, _: &Snapshot) -> Result<Verdict, String> {
            Ok(Verdict::allow())
        }
    }

    fn config(rule: Value) -> Result<FilterConfig, String> {
        let text = json!({"rule": rule, "host": {"cluster": "llmscope"}}).to_string();
        parse_config::<Cap>(text.as_bytes()).map(|(c, _)| c)
    }

    #[test]
    fn config_splits_rule_keys_from_settings_and_declares_aggregates() {
        let c =
            config(json!({"id": "cap-1", "primitive": "cap", "mode": "monitor", "limit_usd": 5}))
                .unwrap();
        assert_eq!(c.rule_id, "cap-1");
        assert_eq!(c.mode, Mode::Monitor);
        assert_eq!(c.failure_mode, FailureMode::Closed);
        assert_eq!(c.settings_json, r#"{"limit_usd":5}"#);
        assert_eq!(c.aggregates.len(), 1);
        assert_eq!(c.host.timeout_ms, 200);
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = config(json!({"id": "cap-1", "limit_usd": "five"})).unwrap_err();
        assert!(
            e.contains("rule `cap-1`") && e.contains("rule.settings.limit_usd"),
            "{e}"
        );
        let e = config(json!({"id": "cap-1", "limit_usd": -1})).unwrap_err();
        assert!(e.contains("limit_usd: must be positive"), "{e}");
        let e = config(json!({"id": "cap-1", "primitive": "route_preference", "limit_usd": 1}))
            .unwrap_err();
        assert!(e.contains("rule.primitive"), "{e}");
        let e = config(json!({"limit_usd": 1})).unwrap_err();
        assert!(e.contains("rule.id: is required"), "{e}");
        let e = parse_config::<Cap>(
            br#"{"rule": {"id": "x", "limit_usd": 1}, "host": {"cluster": "h", "timeout_ms": 0}}"#,
        )
        .unwrap_err();
        assert!(e.contains("host.timeout_ms"), "{e}");
        let e = parse_config::<Cap>(br#"{"rule": {"id": "x", "limit_usd": 1}}"#).unwrap_err();
        assert!(e.contains("missing field `host`"), "{e}");
        let e = parse_config::<Cap>(b"").unwrap_err();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn decide_mirrors_the_host() {
        let c = config(json!({"id": "r", "limit_usd": 1})).unwrap();
        let req = request();
        let (o, a) = decide(&c, &req, Ok(Verdict::deny("over")), 1.0);
        assert_eq!(
            a,
            Action::Deny {
                reason: "over".into()
            }
        );
        assert!(o.applied);
        let (o, a) = decide(&c, &req, Ok(Verdict::downgrade("nope", "x")), 1.0);
        assert_eq!(
            a,
            Action::Deny {
                reason: "policy rule r failed and fails closed".into()
            }
        );
        assert!(o.error.unwrap().contains("does not offer"));
        let (_, a) = decide(
            &c,
            &req,
            Ok(Verdict::downgrade(req.requested_tier.clone(), "x")),
            1.0,
        );
        assert_eq!(a, Action::Continue);
        let open = config(json!({"id": "r", "failure_mode": "open", "limit_usd": 1})).unwrap();
        let (o, a) = decide(&open, &req, Err("boom".into()), 1.0);
        assert_eq!((a, o.decision), (Action::Continue, DecisionKind::Allow));
        let monitor = config(json!({"id": "r", "mode": "monitor", "limit_usd": 1})).unwrap();
        let (o, a) = decide(&monitor, &req, Ok(Verdict::deny("over")), 1.0);
        assert_eq!(
            (a, o.decision, o.applied),
            (Action::Continue, DecisionKind::Deny, false)
        );
    }

    #[test]
    fn rewrite_targets_the_right_field() {
        let models: BTreeMap<String, String> =
            [("cheap".to_owned(), "gpt-4o-mini".to_owned())].into();
        let mut chat = json!({"model": "gpt-4o", "messages": []});
        assert!(rewrite_tier(&mut chat, "cheap", &models));
        assert_eq!(chat["model"], "gpt-4o-mini");
        assert!(!rewrite_tier(&mut chat, "cheap", &models));
        let mut infer = json!({"prompt": "hi", "model_tier": "expensive"});
        assert!(rewrite_tier(&mut infer, "cheap", &models));
        assert_eq!(infer["model_tier"], "cheap");
    }

    #[test]
    fn unpriced_bodies_are_named() {
        let chat = |extra: Value| {
            let mut b = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            b
        };
        assert_eq!(check_priceable(&chat(json!({}))), Ok(()));
        assert_eq!(
            check_priceable(&chat(json!({"n": 1, "tools": [], "functions": null}))),
            Ok(())
        );
        let code = |b: Value| check_priceable(&b).map_err(|e| (e.code, e.param));
        assert_eq!(
            code(chat(json!({"n": 2}))),
            Err(("unsupported_n", "n".into()))
        );
        assert_eq!(
            code(chat(json!({"n": "1"}))),
            Err(("unsupported_n", "n".into()))
        );
        assert_eq!(
            code(chat(json!({"tools": [{"type": "function"}]}))),
            Err(("unsupported_tools", "tools".into()))
        );
        assert_eq!(
            code(chat(json!({"audio": {"voice": "alloy"}}))),
            Err(("unsupported_content", "audio".into()))
        );
        let parts = json!({"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}]});
        let e = check_priceable(&parts).unwrap_err();
        assert_eq!(e.param, "messages[1].content[1]");
        assert!(e.message.contains("`image_url`"), "{}", e.message);
        let text_parts =
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]});
        assert_eq!(check_priceable(&text_parts), Ok(()));
        // /infer bodies are priced by the llmscope gateway they go to.
        assert_eq!(check_priceable(&json!({"prompt": "x", "n": 4})), Ok(()));
    }

    #[test]
    fn the_forwarded_body_asks_for_what_was_priced() {
        let mut b = json!({"messages": [], "max_tokens": 100000});
        assert!(enforce_priced(&mut b, Some(500), true));
        assert_eq!(b["max_tokens"], 500);
        assert!(!enforce_priced(&mut b, Some(500), true), "idempotent");
        let mut b = json!({"messages": []});
        assert!(enforce_priced(&mut b, Some(500), true));
        assert_eq!(b, json!({"messages": [], "max_tokens": 500}));
        let mut b = json!({"messages": [], "max_completion_tokens": 4000});
        assert!(enforce_priced(&mut b, Some(500), true));
        assert_eq!(b, json!({"messages": [], "max_completion_tokens": 500}));
        let mut b = json!({"messages": [], "max_completion_tokens": 4000, "max_tokens": 9});
        enforce_priced(&mut b, Some(9), true);
        assert_eq!(
            (
                b["max_completion_tokens"].as_u64(),
                b["max_tokens"].as_u64()
            ),
            (Some(9), Some(9))
        );
        let mut b = json!({"messages": [], "stream": true, "stream_options": {"include_usage": false, "x": 1}});
        assert!(enforce_priced(&mut b, None, true));
        assert_eq!(b["stream_options"], json!({"include_usage": true, "x": 1}));
        // Not OpenAI (an Anthropic stream reports usage by itself): left alone.
        let mut b = json!({"messages": [], "stream": true, "max_tokens": 10});
        assert!(!enforce_priced(&mut b, Some(10), false));
        let mut infer = json!({"prompt": "x", "max_tokens": 9000});
        assert!(enforce_priced(&mut infer, Some(500), true));
        assert_eq!(infer["max_tokens"], 500);
    }

    #[test]
    fn usage_from_json_and_event_streams() {
        let openai = br#"{"choices":[{"finish_reason":"stop"}],"usage":{"prompt_tokens":42,"completion_tokens":7}}"#;
        assert_eq!(
            parse_usage(openai),
            (
                Some(Usage {
                    tokens_in: 42,
                    tokens_out: 7
                }),
                Some("stop".into())
            )
        );
        let anthropic =
            br#"{"stop_reason":"end_turn","usage":{"input_tokens":31,"output_tokens":9}}"#;
        assert_eq!(
            parse_usage(anthropic).0,
            Some(Usage {
                tokens_in: 31,
                tokens_out: 9
            })
        );
        let infer = br#"{"answer":"x","tokens_in":3,"tokens_out":4}"#;
        assert_eq!(
            parse_usage(infer).0,
            Some(Usage {
                tokens_in: 3,
                tokens_out: 4
            })
        );
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6}}\n\ndata: [DONE]\n";
        assert_eq!(
            parse_usage(sse),
            (
                Some(Usage {
                    tokens_in: 5,
                    tokens_out: 6
                }),
                Some("stop".into())
            )
        );
        assert_eq!(parse_usage(b"not json"), (None, None));
    }

    #[test]
    fn the_model_a_response_names() {
        assert_eq!(
            model_of_response(br#"{"model":"gpt-4o-2024-08-06","choices":[]}"#).as_deref(),
            Some("gpt-4o-2024-08-06")
        );
        let sse = b"data: {\"model\":\"gpt-4o-mini\",\"choices\":[]}\n\ndata: [DONE]\n";
        assert_eq!(model_of_response(sse).as_deref(), Some("gpt-4o-mini"));
        let anthropic = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\"}}\n";
        assert_eq!(model_of_response(anthropic).as_deref(), Some("claude-x"));
        assert_eq!(model_of_response(br#"{"answer":"x"}"#), None);
        assert_eq!(model_of_response(b"garbage"), None);
    }
}
