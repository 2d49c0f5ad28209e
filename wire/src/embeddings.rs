//! OpenAI embeddings bodies (`POST /v1/embeddings`): what is embedded ([`EmbeddingInput`]) and
//! how the vectors are asked for ([`EmbeddingCall`]), parsed into an [`Inference`] with the same
//! attribution and tier rules as a chat body ([`crate::requests::parse_chat`]). Every body key
//! is honoured or refused with 422 naming it, as for chat ([`crate::chat_params`]).

use serde::Serialize;
use serde_json::{Map, Value};

use crate::chat_params::refused;
use crate::config::GatewayConfig;
use crate::requests::{attribution, chat_tier, Call, ChatError, Inference, H_TIER};

/// The body keys an embeddings request may carry: `model`, `input`, `encoding_format` and
/// `dimensions` are priced and forwarded, `metadata` is attribution (not forwarded), `user`
/// (OpenAI's end-user id for abuse monitoring) is accepted and not forwarded, as for chat.
pub const HONOURED: [&str; 6] = [
    "model",
    "input",
    "encoding_format",
    "dimensions",
    "metadata",
    "user",
];

/// Most inputs one request may embed (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// Largest `dimensions` accepted (OpenAI's largest model has 3072).
pub const MAX_DIMENSIONS: u32 = 4096;

/// What an embeddings request embeds, in the shape the client sent it (and the provider is
/// sent): one vector per string or per token array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    Text(String),
    /// Several texts.
    Texts(Vec<String>),
    /// One pre-tokenized input (token ids of the model's vocabulary).
    Tokens(Vec<u32>),
    /// Several pre-tokenized inputs.
    TokenArrays(Vec<Vec<u32>>),
}

impl EmbeddingInput {
    /// How many vectors the answer holds.
    pub fn len(&self) -> usize {
        match self {
            Self::Text(_) | Self::Tokens(_) => 1,
            Self::Texts(t) => t.len(),
            Self::TokenArrays(t) => t.len(),
        }
    }

    /// Whether there is nothing to embed (never for a parsed body).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The texts to embed (none for token inputs).
    pub fn texts(&self) -> Vec<&str> {
        match self {
            Self::Text(t) => vec![t.as_str()],
            Self::Texts(t) => t.iter().map(String::as_str).collect(),
            Self::Tokens(_) | Self::TokenArrays(_) => Vec::new(),
        }
    }

    /// Tokens sent already tokenized (0 for texts): they are counted as they are.
    pub fn pretokenized(&self) -> u32 {
        let n = match self {
            Self::Text(_) | Self::Texts(_) => 0,
            Self::Tokens(t) => t.len(),
            Self::TokenArrays(t) => t.iter().map(Vec::len).sum(),
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Input `i` as bytes (UTF-8 text, or the token ids little-endian), e.g. to derive a
    /// deterministic vector from it.
    pub fn bytes_of(&self, i: usize) -> Vec<u8> {
        let tokens = |t: &[u32]| t.iter().flat_map(|x| x.to_le_bytes()).collect();
        match self {
            Self::Text(t) if i == 0 => t.as_bytes().to_vec(),
            Self::Texts(t) => t.get(i).map(|s| s.as_bytes().to_vec()).unwrap_or_default(),
            Self::Tokens(t) if i == 0 => tokens(t),
            Self::TokenArrays(t) => t.get(i).map(|a| tokens(a)).unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}

/// How the vectors are returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    /// JSON arrays of numbers.
    Float,
    /// Base64 of the little-endian `f32`s (what the official clients ask for by default).
    Base64,
}

impl EncodingFormat {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Float => "float",
            Self::Base64 => "base64",
        }
    }
}

/// An embeddings call: its inputs and how the vectors are asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingCall {
    /// What to embed.
    pub input: EmbeddingInput,
    /// `encoding_format`, when the client set it (the provider's default is `float`).
    pub encoding_format: Option<EncodingFormat>,
    /// `dimensions`, when the client set it.
    pub dimensions: Option<u32>,
}

fn invalid(message: impl Into<String>, param: &str) -> ChatError {
    ChatError::unprocessable(message, "invalid_parameter", param)
}

/// A token id: an integer in `0..=u32::MAX`.
fn token(v: &Value, param: &str) -> Result<u32, ChatError> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            invalid(
                format!("{param} must be a token id (a non-negative integer)"),
                param,
            )
        })
}

/// An array of token ids, not empty.
fn tokens(list: &[Value], param: &str) -> Result<Vec<u32>, ChatError> {
    if list.is_empty() {
        return Err(invalid(format!("{param} must not be empty"), param));
    }
    list.iter()
        .enumerate()
        .map(|(j, v)| token(v, &format!("{param}[{j}]")))
        .collect()
}

/// `input`: a non-empty string, or a non-empty array (at most [`MAX_INPUTS`]) of non-empty
/// strings, of token ids, or of non-empty token-id arrays; errors name the element.
pub fn parse_input(v: Option<&Value>) -> Result<EmbeddingInput, ChatError> {
    const SHAPES: &str =
        "a string, an array of strings, an array of token ids, or an array of token-id arrays";
    let list = match v {
        None | Some(Value::Null) => {
            return Err(invalid(format!("input is required: {SHAPES}"), "input"))
        }
        Some(Value::String(s)) if s.is_empty() => {
            return Err(invalid("input must not be an empty string", "input"))
        }
        Some(Value::String(s)) => return Ok(EmbeddingInput::Text(s.clone())),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(invalid(format!("input must be {SHAPES}"), "input")),
    };
    if list.is_empty() {
        return Err(invalid("input must not be an empty array", "input"));
    }
    if list.len() > MAX_INPUTS {
        return Err(invalid(
            format!(
                "input has {} elements; at most {MAX_INPUTS} may be embedded in one request",
                list.len()
            ),
            "input",
        ));
    }
    match &list[0] {
        Value::String(_) => list
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                Value::String(_) => Err(invalid(
                    format!("input[{i}] must not be an empty string"),
                    &format!("input[{i}]"),
                )),
                _ => Err(invalid(
                    format!("input[{i}] must be a string, like input[0]"),
                    &format!("input[{i}]"),
                )),
            })
            .collect::<Result<_, _>>()
            .map(EmbeddingInput::Texts),
        Value::Number(_) => tokens(list, "input").map(EmbeddingInput::Tokens),
        Value::Array(_) => list
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let param = format!("input[{i}]");
                match v {
                    Value::Array(a) => tokens(a, &param),
                    _ => Err(invalid(
                        format!("{param} must be an array of token ids, like input[0]"),
                        &param,
                    )),
                }
            })
            .collect::<Result<_, _>>()
            .map(EmbeddingInput::TokenArrays),
        _ => Err(invalid(format!("input[0] must be {SHAPES}"), "input[0]")),
    }
}

/// Parse an OpenAI embeddings body: every key honoured or refused (422
/// `unsupported_parameter` naming it), attribution from `x-llmscope-*` headers else
/// `metadata`, the tier from `model` as for chat, then `input`, `encoding_format`
/// (`float` | `base64`), `dimensions` (1..=[`MAX_DIMENSIONS`]) and `user` (a string).
pub fn parse_embeddings(
    obj: &Map<String, Value>,
    header: &dyn Fn(&str) -> Option<String>,
    config: &GatewayConfig,
) -> Result<Inference, ChatError> {
    if let Some(key) = obj.keys().find(|k| !HONOURED.contains(&k.as_str())) {
        return Err(refused(key, "this parameter"));
    }
    let who = attribution(obj, header)?;
    let route_name = who
        .route_name
        .unwrap_or_else(|| config.default_route.clone());
    let model_field = match obj.get("model") {
        None | Some(Value::Null) => "",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(invalid("model must be a string", "model")),
    };
    let model_tier = chat_tier(model_field, header(H_TIER), &route_name, config)?;
    let input = parse_input(obj.get("input"))?;
    let encoding_format = match obj.get("encoding_format") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "float" => Some(EncodingFormat::Float),
        Some(Value::String(s)) if s == "base64" => Some(EncodingFormat::Base64),
        Some(_) => {
            return Err(invalid(
                "encoding_format must be \"float\" or \"base64\"",
                "encoding_format",
            ))
        }
    };
    let dimensions = match obj.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| (1..=MAX_DIMENSIONS).contains(n))
                .ok_or_else(|| {
                    invalid(
                        format!("dimensions must be an integer from 1 to {MAX_DIMENSIONS}"),
                        "dimensions",
                    )
                })?,
        ),
    };
    if obj
        .get("user")
        .is_some_and(|u| !u.is_string() && !u.is_null())
    {
        return Err(invalid("user must be a string", "user"));
    }
    Ok(Inference {
        tenant_id: who.tenant_id,
        caller_id: who.caller_id,
        feature_id: who.feature_id,
        experiment_id: who.experiment_id,
        budget_namespace: who.budget_namespace,
        route_name,
        model_tier,
        messages: Vec::new(),
        max_tokens: None,
        temperature: None,
        forwarded: crate::chat_params::Forwarded::default(),
        trace_context: crate::requests::trace_context(header),
        call: Call::Embeddings(EmbeddingCall {
            input,
            encoding_format,
            dimensions,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> GatewayConfig {
        let yaml = r#"
policy: {file: policy.yaml, policies_dir: .}
defaults: {route: /embed}
models:
  embed-small: {provider: mock, input_per_1m: 0.02, output_per_1m: 0.0}
  embed-large: {provider: mock, input_per_1m: 0.13, output_per_1m: 0.0}
routes:
  /embed: {max_output_tokens: 1, tiers: {cheap: embed-small, expensive: embed-large}}
providers:
  mock: {kind: mock}
"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmscope.yaml");
        std::fs::write(&path, yaml).unwrap();
        GatewayConfig::load(&path, &|_| None).unwrap()
    }

    fn parse(body: Value) -> Result<Inference, ChatError> {
        let mut body = body;
        body["metadata"]["tenant_id"] = json!("acme");
        body["metadata"]["route"] = json!("/embed");
        parse_embeddings(body.as_object().unwrap(), &|_| None, &config())
    }

    fn call(inf: &Inference) -> &EmbeddingCall {
        match &inf.call {
            Call::Embeddings(e) => e,
            Call::Completion => panic!("not an embeddings call"),
        }
    }

    #[test]
    fn every_input_shape_parses_and_keeps_its_shape() {
        for (input, len, pretokenized) in [
            (json!("hello"), 1, 0),
            (json!(["a", "b", "c"]), 3, 0),
            (json!([1, 2, 3]), 1, 3),
            (json!([[1, 2], [3]]), 2, 3),
        ] {
            let inf = parse(json!({"model": "embed-large", "input": input.clone()})).unwrap();
            let e = call(&inf);
            assert_eq!(serde_json::to_value(&e.input).unwrap(), input);
            assert_eq!((e.input.len(), e.input.pretokenized()), (len, pretokenized));
            assert_eq!(inf.model_tier, "expensive");
            assert_eq!(inf.tenant_id, "acme");
        }
        let inf = parse(
            json!({"model": "cheap", "input": "x", "encoding_format": "base64",
                               "dimensions": 256, "user": "u-1"}),
        )
        .unwrap();
        let e = call(&inf);
        assert_eq!(
            (e.encoding_format, e.dimensions),
            (Some(EncodingFormat::Base64), Some(256))
        );
        assert_eq!(e.input.texts(), ["x"]);
        assert_eq!(e.input.bytes_of(0), b"x");
    }

    #[test]
    fn bad_bodies_are_refused_naming_the_parameter() {
        for (body, code, param) in [
            (
                json!({"input": "x", "tools": []}),
                "unsupported_parameter",
                "tools",
            ),
            (
                json!({"input": "x", "stream": true}),
                "unsupported_parameter",
                "stream",
            ),
            (json!({}), "invalid_parameter", "input"),
            (json!({"input": ""}), "invalid_parameter", "input"),
            (json!({"input": []}), "invalid_parameter", "input"),
            (json!({"input": 5}), "invalid_parameter", "input"),
            (json!({"input": ["a", ""]}), "invalid_parameter", "input[1]"),
            (json!({"input": ["a", 1]}), "invalid_parameter", "input[1]"),
            (json!({"input": [1, -2]}), "invalid_parameter", "input[1]"),
            (json!({"input": [[1], []]}), "invalid_parameter", "input[1]"),
            (
                json!({"input": [[1], [2, "x"]]}),
                "invalid_parameter",
                "input[1][1]",
            ),
            (
                json!({"input": [{"a": 1}]}),
                "invalid_parameter",
                "input[0]",
            ),
            (
                json!({"input": "x", "encoding_format": "int8"}),
                "invalid_parameter",
                "encoding_format",
            ),
            (
                json!({"input": "x", "dimensions": 0}),
                "invalid_parameter",
                "dimensions",
            ),
            (
                json!({"input": "x", "dimensions": 5000}),
                "invalid_parameter",
                "dimensions",
            ),
            (
                json!({"input": "x", "user": 7}),
                "invalid_parameter",
                "user",
            ),
            (
                json!({"input": "x", "model": 7}),
                "invalid_parameter",
                "model",
            ),
            (
                json!({"input": "x", "model": "gpt-9"}),
                "model_not_found",
                "model",
            ),
        ] {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!(
                (e.status, e.code, e.param.as_deref()),
                (422, code, Some(param)),
                "{body}: {}",
                e.message
            );
        }
        let many: Vec<Value> = (0..=MAX_INPUTS).map(|_| json!("x")).collect();
        assert_eq!(
            parse(json!({"input": many})).unwrap_err().param.as_deref(),
            Some("input")
        );
        let e = parse_embeddings(
            json!({"input": "x"}).as_object().unwrap(),
            &|_| None,
            &config(),
        )
        .unwrap_err();
        assert_eq!(e.code, "missing_tenant");
    }
}
