//! Turning request bodies into [`Inference`]s: the reference `/infer` body and OpenAI
//! chat-completions bodies, with attribution from `x-llmscope-*` headers. The HTTP server and the
//! edge control plane (the Envoy filters' `/v1/edge/context`) share these parsers, so a request
//! means the same thing whichever way it reaches llmscope.

use serde_json::{json, Map, Value};

use crate::config::GatewayConfig;

/// The attribution headers, under the names this module uses; defined once in
/// [`llmscope_sdk::http`], which the Envoy filters share.
pub use llmscope_sdk::http::{
    CALLER_HEADER as H_CALLER, EXPERIMENT_HEADER as H_EXPERIMENT, FEATURE_HEADER as H_FEATURE,
    NAMESPACE_HEADER as H_NAMESPACE, ROUTE_HEADER as H_ROUTE, TENANT_HEADER as H_TENANT,
    TIER_HEADER as H_TIER,
};

/// A request as the gateway sees it, whatever API it came through.
#[derive(Debug, Clone)]
pub struct Inference {
    /// Tenant billed (non-empty).
    pub tenant_id: String,
    /// Calling service or user.
    pub caller_id: Option<String>,
    /// Feature.
    pub feature_id: Option<String>,
    /// Experiment.
    pub experiment_id: Option<String>,
    /// Budget namespace asked for.
    pub budget_namespace: Option<String>,
    /// Route.
    pub route_name: String,
    /// Tier asked for.
    pub model_tier: String,
    /// Conversation.
    pub messages: Vec<Message>,
    /// Client's output-token cap (bounded by the route's).
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// What a chat body forwards to the provider beyond the conversation's text (empty for
    /// `/infer`).
    pub forwarded: Forwarded,
    /// What kind of call: a completion of `messages`, or embeddings.
    pub call: Call,
    /// The W3C trace-context headers it came with (`traceparent`, `tracestate`), continued
    /// by the gateway's trace.
    pub trace_context: Vec<(String, String)>,
}

/// What a request asks the provider for: it decides how it is priced (a completion's input
/// and expected output; embeddings' input only) and which provider API is called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// A completion of the conversation (`/infer`, chat completions).
    Completion,
    /// Vectors for the inputs (`/v1/embeddings`); no output tokens.
    Embeddings(EmbeddingCall),
}

impl Inference {
    /// Bytes of text sent for pricing: every message's text (with its tool calls), the tool
    /// definitions and schemas, and every embedding input text (checked against
    /// `server.max_prompt_bytes`).
    pub fn prompt_bytes(&self) -> usize {
        let messages: usize = self.messages.iter().map(|m| m.content.len()).sum();
        let inputs: usize = match &self.call {
            Call::Completion => 0,
            Call::Embeddings(e) => e.input.texts().iter().map(|t| t.len()).sum(),
        };
        messages + inputs + self.forwarded.priced_text.len()
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user`, `assistant`.
    pub role: String,
    /// Text.
    pub content: String,
}

/// `/infer` body fields and the headers that may supply them.
const INFER_HEADERS: [(&str, &str); 7] = [
    ("tenant_id", H_TENANT),
    ("caller_id", H_CALLER),
    ("feature_id", H_FEATURE),
    ("experiment_id", H_EXPERIMENT),
    ("budget_namespace", H_NAMESPACE),
    ("route_name", H_ROUTE),
    ("model_tier", H_TIER),
];

/// Collects field errors (FastAPI-style `detail` list: `{"field", "message"}` objects).
#[derive(Debug, Default)]
pub struct FieldErrors(pub Vec<Value>);

impl FieldErrors {
    /// Record a problem with `field`.
    pub fn push(&mut self, field: &str, message: impl Into<String>) {
        self.0
            .push(json!({"field": field, "message": message.into()}));
    }

    /// A required non-empty string.
    pub fn required(&mut self, obj: &Map<String, Value>, field: &str) -> String {
        match obj.get(field) {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(Value::String(_)) => {
                self.push(field, "must not be empty");
                String::new()
            }
            None | Some(Value::Null) => {
                self.push(field, "is required");
                String::new()
            }
            Some(_) => {
                self.push(field, "must be a string");
                String::new()
            }
        }
    }

    /// An optional string (empty counts as absent).
    pub fn optional(&mut self, obj: &Map<String, Value>, field: &str) -> Option<String> {
        match obj.get(field) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.push(field, "must be a string");
                None
            }
        }
    }

    /// An optional positive integer that fits in 32 bits.
    pub fn optional_u32(&mut self, obj: &Map<String, Value>, field: &str) -> Option<u32> {
        match obj.get(field) {
            None | Some(Value::Null) => None,
            Some(v) => match v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n > 0)
            {
                Some(n) => Some(n),
                None => {
                    self.push(field, "must be a positive integer");
                    None
                }
            },
        }
    }

    /// An optional number.
    pub fn optional_f64(&mut self, obj: &Map<String, Value>, field: &str) -> Option<f64> {
        match obj.get(field) {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(n) => Some(n),
                None => {
                    self.push(field, "must be a number");
                    None
                }
            },
        }
    }
}

/// Parse a reference `/infer` body. Attribution headers fill fields the body leaves out (the body
/// wins when both are present). Errors list every bad field.
pub fn parse_infer(
    obj: &Map<String, Value>,
    header: &dyn Fn(&str) -> Option<String>,
    config: &GatewayConfig,
) -> Result<Inference, Vec<Value>> {
    let mut merged;
    let obj = if INFER_HEADERS.iter().any(|(_, h)| header(h).is_some()) {
        merged = obj.clone();
        for (field, h) in INFER_HEADERS {
            let absent = matches!(merged.get(field), None | Some(Value::Null));
            if let (true, Some(v)) = (absent, header(h)) {
                merged.insert(field.to_owned(), Value::String(v));
            }
        }
        &merged
    } else {
        obj
    };
    let mut errs = FieldErrors::default();
    let prompt = errs.required(obj, "prompt");
    let tenant_id = errs.required(obj, "tenant_id");
    let inf = Inference {
        caller_id: errs.optional(obj, "caller_id"),
        feature_id: errs.optional(obj, "feature_id"),
        experiment_id: errs.optional(obj, "experiment_id"),
        budget_namespace: errs.optional(obj, "budget_namespace"),
        model_tier: errs
            .optional(obj, "model_tier")
            .unwrap_or_else(|| config.default_tier.clone()),
        route_name: errs
            .optional(obj, "route_name")
            .unwrap_or_else(|| config.default_route.clone()),
        max_tokens: errs.optional_u32(obj, "max_tokens"),
        temperature: errs.optional_f64(obj, "temperature"),
        messages: vec![Message {
            role: "user".into(),
            content: prompt,
        }],
        tenant_id,
        forwarded: Forwarded::default(),
        call: Call::Completion,
        trace_context: trace_context(header),
    };
    if errs.0.is_empty() {
        Ok(inf)
    } else {
        Err(errs.0)
    }
}

pub use crate::chat_params::{check_chat_params, forwarded, Forwarded};
pub use crate::chat_stream::{chat_stream, StreamOptions};
pub use crate::embeddings::{parse_embeddings, EmbeddingCall, EmbeddingInput, EncodingFormat};

/// Why a chat-completions body was refused, in OpenAI's error vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatError {
    /// HTTP status.
    pub status: u16,
    /// Human-readable message.
    pub message: String,
    /// Machine-readable code.
    pub code: &'static str,
    /// The offending parameter.
    pub param: Option<String>,
}

impl ChatError {
    pub(crate) fn unprocessable(
        message: impl Into<String>,
        code: &'static str,
        param: &str,
    ) -> Self {
        Self {
            status: 422,
            message: message.into(),
            code,
            param: Some(param.to_owned()),
        }
    }
}

/// The tier a chat body is priced at. The body's `model` is what the upstream bills, so it
/// decides: a tier of the route, or the model (or provider model) of one of its tiers. The tier
/// header only picks the tier of a body that names no model; one that contradicts the body's
/// model is refused (400 `model_tier_conflict`), so a request can never be priced at one model
/// while it is sent to another.
pub(crate) fn chat_tier(
    model_field: &str,
    header_tier: Option<String>,
    route_name: &str,
    config: &GatewayConfig,
) -> Result<String, ChatError> {
    let not_found = || {
        ChatError::unprocessable(
            format!("model `{model_field}` is neither a tier nor a model of route {route_name}"),
            "model_not_found",
            "model",
        )
    };
    let Some(route) = config.routes.get(route_name) else {
        // Pricing refuses the unknown route with its own error.
        return match header_tier {
            Some(t) => Ok(t),
            None if model_field.is_empty() => Ok(config.default_tier.clone()),
            None => Err(not_found()),
        };
    };
    if model_field.is_empty() {
        return Ok(header_tier.unwrap_or_else(|| config.default_tier.clone()));
    }
    let names = |tier: &str, model: &str| {
        tier == model_field
            || model == model_field
            || config
                .models
                .get(model)
                .and_then(|c| c.provider_model.as_deref())
                == Some(model_field)
    };
    // A tier named `model_field` first, then the tiers whose model it is.
    let mut tiers: Vec<&String> = route
        .tiers
        .keys()
        .filter(|t| t.as_str() == model_field)
        .collect();
    tiers.extend(
        route
            .tiers
            .iter()
            .filter(|(t, m)| t.as_str() != model_field && names(t, m))
            .map(|(t, _)| t),
    );
    match (tiers.first(), header_tier) {
        (None, _) => Err(not_found()),
        (Some(_), Some(header)) if tiers.iter().any(|t| **t == header) => Ok(header),
        (Some(body), Some(header)) => Err(ChatError {
            status: 400,
            message: format!(
                "model `{model_field}` is tier `{body}` of route {route_name}, but the {H_TIER} header asks for `{header}`; the body's model is what the upstream is sent, so it decides: drop the header or make them agree"
            ),
            code: "model_tier_conflict",
            param: Some(H_TIER.to_owned()),
        }),
        (Some(body), None) => Ok((*body).clone()),
    }
}

/// Parse an OpenAI chat-completions body. Attribution comes from `x-llmscope-*` headers, else
/// from `metadata.<field>`; the tier from `model` naming a tier of the route or one of its
/// models (see [`chat_tier`]; the tier header only for a body without `model`). The stream
/// flags are read by [`chat_stream`].
pub fn parse_chat(
    obj: &Map<String, Value>,
    header: &dyn Fn(&str) -> Option<String>,
    config: &GatewayConfig,
) -> Result<Inference, ChatError> {
    let who = attribution(obj, header)?;
    let mut messages = Vec::new();
    match obj.get("messages").and_then(Value::as_array) {
        Some(list) if !list.is_empty() => {
            for (i, m) in list.iter().enumerate() {
                messages.push(message(i, m)?);
            }
        }
        _ => {
            return Err(ChatError::unprocessable(
                "`messages` must be a non-empty array",
                "invalid_messages",
                "messages",
            ))
        }
    }
    let route_name = who
        .route_name
        .unwrap_or_else(|| config.default_route.clone());
    let model_field = obj.get("model").and_then(Value::as_str).unwrap_or_default();
    let model_tier = chat_tier(model_field, header(H_TIER), &route_name, config)?;
    let mut errs = FieldErrors::default();
    let max_tokens = errs
        .optional_u32(obj, "max_tokens")
        .or_else(|| errs.optional_u32(obj, "max_completion_tokens"));
    let temperature = errs.optional_f64(obj, "temperature");
    if let Some(first) = errs.0.first() {
        let field = first["field"].as_str().unwrap_or_default().to_owned();
        return Err(ChatError::unprocessable(
            format!("{field} {}", first["message"].as_str().unwrap_or_default()),
            "invalid_parameter",
            &field,
        ));
    }
    Ok(Inference {
        tenant_id: who.tenant_id,
        caller_id: who.caller_id,
        feature_id: who.feature_id,
        experiment_id: who.experiment_id,
        budget_namespace: who.budget_namespace,
        route_name,
        model_tier,
        messages,
        max_tokens,
        temperature,
        forwarded: forwarded(obj),
        call: Call::Completion,
        trace_context: trace_context(header),
    })
}

/// The W3C trace-context headers among a request's (`traceparent`, `tracestate`).
pub(crate) fn trace_context(header: &dyn Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|h| header(h).map(|v| (h.to_owned(), v)))
        .collect()
}

/// Who pays for an OpenAI-shaped request and the route it names, as sent.
pub(crate) struct Attribution {
    /// Tenant (required).
    pub(crate) tenant_id: String,
    /// Caller.
    pub(crate) caller_id: Option<String>,
    /// Feature.
    pub(crate) feature_id: Option<String>,
    /// Experiment.
    pub(crate) experiment_id: Option<String>,
    /// Budget namespace.
    pub(crate) budget_namespace: Option<String>,
    /// Route (`None`: the default route).
    pub(crate) route_name: Option<String>,
}

/// The attribution of an OpenAI-shaped body (chat completions, embeddings): each field from
/// its `x-llmscope-*` header, else from `metadata.<field>` (`metadata.route` for the route);
/// 422 `missing_tenant` when neither names a tenant.
pub(crate) fn attribution(
    obj: &Map<String, Value>,
    header: &dyn Fn(&str) -> Option<String>,
) -> Result<Attribution, ChatError> {
    let meta = obj.get("metadata").and_then(Value::as_object);
    let attr = |h: &str, m: &str| {
        header(h).or_else(|| {
            meta?
                .get(m)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .filter(|s| !s.is_empty())
        })
    };
    let Some(tenant_id) = attr(H_TENANT, "tenant_id") else {
        return Err(ChatError::unprocessable(
            "missing tenant: send the x-llmscope-tenant-id header or metadata.tenant_id",
            "missing_tenant",
            H_TENANT,
        ));
    };
    Ok(Attribution {
        tenant_id,
        caller_id: attr(H_CALLER, "caller_id"),
        feature_id: attr(H_FEATURE, "feature_id"),
        experiment_id: attr(H_EXPERIMENT, "experiment_id"),
        budget_namespace: attr(H_NAMESPACE, "budget_namespace"),
        route_name: attr(H_ROUTE, "route"),
    })
}

/// Message `i` of a chat body, its text as the provider counts it: the text parts of its
/// content, and the name and arguments of each tool call it makes. A message needs a string
/// `role`, and a `content` (a string or a list of parts) unless it is an assistant message
/// making tool calls.
fn message(i: usize, m: &Value) -> Result<Message, ChatError> {
    let role = m.get("role").and_then(Value::as_str);
    let mut content = match m.get("content") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(parts)) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
        ),
        None | Some(Value::Null) if m.get("tool_calls").is_some_and(Value::is_array) => {
            Some(String::new())
        }
        _ => None,
    };
    // Every string sent is input the provider counts: the name, a refusal, each tool call's
    // id, name and arguments, a tool result's call id.
    if let Some(text) = content.as_mut() {
        for key in ["name", "refusal", "tool_call_id"] {
            text.push_str(m.get(key).and_then(Value::as_str).unwrap_or_default());
        }
        let calls = m.get("tool_calls").and_then(Value::as_array);
        for call in calls.into_iter().flatten() {
            let f = &call["function"];
            for part in [&call["id"], &f["name"], &f["arguments"]] {
                text.push_str(part.as_str().unwrap_or_default());
            }
        }
    }
    match (role, content) {
        (Some(role), Some(content)) => Ok(Message {
            role: role.to_owned(),
            content,
        }),
        _ => {
            let param = format!("messages[{i}]");
            Err(ChatError::unprocessable(
                format!("{param} needs a string `role` and `content`"),
                "invalid_message",
                &param,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn config() -> GatewayConfig {
        let yaml = r#"
policy: {file: policy.yaml, policies_dir: .}
models:
  gpt-4o-mini: {provider: mock, input_per_1m: 0.15, output_per_1m: 0.60}
  gpt-4o: {provider: mock, input_per_1m: 2.50, output_per_1m: 10.00}
routes:
  /answer-routed: {max_output_tokens: 500, tiers: {cheap: gpt-4o-mini, expensive: gpt-4o}}
providers:
  mock: {kind: mock}
"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmscope.yaml");
        std::fs::write(&path, yaml).unwrap();
        GatewayConfig::load(&path, &|_| None).unwrap()
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn infer_headers_fill_missing_fields_and_the_body_wins() {
        let cfg = config();
        let headers: BTreeMap<&str, &str> = [(H_TENANT, "from-header"), (H_TIER, "cheap")].into();
        let h = |n: &str| headers.get(n).map(|v| (*v).to_owned());
        let inf = parse_infer(
            &obj(json!({"prompt": "hi", "model_tier": "expensive"})),
            &h,
            &cfg,
        )
        .unwrap();
        assert_eq!(inf.tenant_id, "from-header");
        assert_eq!(inf.model_tier, "expensive");
        assert_eq!(inf.route_name, cfg.default_route);
    }

    #[test]
    fn infer_lists_every_bad_field() {
        let cfg = config();
        let errs = parse_infer(&obj(json!({"max_tokens": -1})), &|_| None, &cfg).unwrap_err();
        let fields: Vec<&str> = errs.iter().filter_map(|e| e["field"].as_str()).collect();
        assert_eq!(fields, ["prompt", "tenant_id", "max_tokens"]);
    }

    #[test]
    fn chat_resolves_model_names_to_tiers() {
        let cfg = config();
        let body = obj(
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
            "metadata": {"tenant_id": "acme", "route": "/answer-routed"}}),
        );
        let inf = parse_chat(&body, &|_| None, &cfg).unwrap();
        assert_eq!(
            (inf.tenant_id.as_str(), inf.model_tier.as_str()),
            ("acme", "expensive")
        );
    }

    #[test]
    fn chat_body_model_decides_over_the_tier_header() {
        let cfg = config();
        let with_model = |model: Value| {
            obj(
                json!({"model": model, "messages": [{"role": "user", "content": "hi"}],
                "metadata": {"tenant_id": "acme", "route": "/answer-routed"}}),
            )
        };
        let cheap = |n: &str| (n == H_TIER).then(|| "cheap".to_owned());
        // Spoofing: gpt-4o in the body, `cheap` in the header.
        let e = parse_chat(&with_model(json!("gpt-4o")), &cheap, &cfg).unwrap_err();
        assert_eq!(
            (e.status, e.code, e.param.as_deref()),
            (400, "model_tier_conflict", Some(H_TIER))
        );
        assert!(
            e.message.contains("`expensive`") && e.message.contains("`cheap`"),
            "{}",
            e.message
        );
        // Agreeing header and body, by model or by tier name.
        for model in ["gpt-4o-mini", "cheap"] {
            let inf = parse_chat(&with_model(json!(model)), &cheap, &cfg).unwrap();
            assert_eq!(inf.model_tier, "cheap");
        }
        // A model the route does not have is not rescued by the header.
        let e = parse_chat(&with_model(json!("gpt-9")), &cheap, &cfg).unwrap_err();
        assert_eq!(e.code, "model_not_found");
        // No model in the body: the header picks the tier.
        let mut no_model = with_model(json!(null));
        no_model.remove("model");
        assert_eq!(
            parse_chat(&no_model, &cheap, &cfg).unwrap().model_tier,
            "cheap"
        );
    }

    #[test]
    fn chat_errors_name_the_parameter() {
        let cfg = config();
        let e = parse_chat(
            &obj(json!({"messages": [{"role": "user"}], "metadata": {"tenant_id": "a"}})),
            &|_| None,
            &cfg,
        )
        .unwrap_err();
        assert_eq!(
            (e.code, e.param.as_deref()),
            ("invalid_message", Some("messages[0]"))
        );
        let e = parse_chat(&obj(json!({"messages": []})), &|_| None, &cfg).unwrap_err();
        assert_eq!(e.code, "missing_tenant");
        let e = parse_chat(
            &obj(json!({"model": "nope", "messages": [{"role": "user", "content": "x"}], "metadata": {"tenant_id": "a"}})),
            &|_| None,
            &cfg,
        )
        .unwrap_err();
        assert_eq!((e.status, e.code), (422, "model_not_found"));
    }
}
