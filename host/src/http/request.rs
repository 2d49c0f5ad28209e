//! Reading requests — who is calling (API keys, and the budget scopes a key binds), JSON bodies
//! (media type, size limit, read timeout, syntax), prompt size, headers — and writing JSON
//! responses.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use llmscope_sdk::http::API_KEY_HEADER;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use crate::config::{ApiKey, KeyKind, DEFAULT_NAMESPACE};
use crate::gateway::Gateway;
use crate::requests::Inference;

/// Response body.
pub type Body = Full<Bytes>;

/// A JSON response.
pub fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Who is calling: the API key presented, checked against the configured ones. `key` is `None`
/// only when authentication is off (no `auth.api_keys`); then clients are trusted to name
/// who pays, as before keys existed.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The key, when authentication is on.
    pub key: Option<&'a ApiKey>,
}

/// Identify the caller from its headers alone (`Authorization: Bearer <key>` or `x-api-key`),
/// before any body is read: 401 when keys are configured and none, or an unknown one, is sent.
pub fn authenticate<'a>(gw: &'a Gateway, headers: &HeaderMap) -> Result<Caller<'a>, ApiError> {
    if gw.config().api_keys.is_empty() {
        return Ok(Caller { key: None });
    }
    key_of_kind(gw, headers, KeyKind::Client)
}

/// Identify an edge proxy (`/v1/edge/*`): an API key of `kind: edge`, from its headers alone.
/// With authentication off the edge endpoints answer only when `auth.unauthenticated_edge`
/// says the network is trusted (403 otherwise); a client key is refused (403).
pub fn authenticate_edge<'a>(gw: &'a Gateway, headers: &HeaderMap) -> Result<Caller<'a>, ApiError> {
    let cfg = gw.config();
    if cfg.api_keys.is_empty() {
        return if cfg.unauthenticated_edge {
            Ok(Caller { key: None })
        } else {
            Err(ApiError::EdgeClosed)
        };
    }
    key_of_kind(gw, headers, KeyKind::Edge)
}

/// The configured key the headers present, which must be of kind `kind`: 401 when none or an
/// unknown one is sent, 403 when it is of the other kind.
fn key_of_kind<'a>(
    gw: &'a Gateway,
    headers: &HeaderMap,
    kind: KeyKind,
) -> Result<Caller<'a>, ApiError> {
    let presented = presented_key(headers).ok_or(ApiError::MissingApiKey)?;
    match gw.api_key(presented) {
        Some(key) if key.kind == kind => Ok(Caller { key: Some(key) }),
        Some(key) => Err(ApiError::WrongKeyKind {
            key: key.label.clone(),
            kind: key.kind,
        }),
        None => Err(ApiError::InvalidApiKey),
    }
}

/// The key a request presents: `Authorization: Bearer <key>`, else `x-api-key`.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get(API_KEY_HEADER).and_then(|v| v.to_str().ok()))
}

impl Caller<'_> {
    /// 403 unless the key may act for `tenant` (`*`: admin endpoints).
    pub fn may_act_for(&self, tenant: &str) -> Result<(), ApiError> {
        match self.key {
            Some(key) if !key.allows(tenant) => Err(ApiError::Forbidden {
                tenant: tenant.to_owned(),
            }),
            _ => Ok(()),
        }
    }

    /// Whether this caller may see figures that span more than one tenant: authentication is
    /// off, the key acts for every tenant, or `auth.detailed_reasons` is on.
    pub fn sees_every_tenant(&self, gw: &Gateway) -> bool {
        self.key.is_none_or(ApiKey::is_admin) || gw.config().detailed_reasons
    }

    /// Bind a request's payer to the key: the tenant must be one of the key's, the namespace
    /// (the key's `default_namespace` when the request names none) one the key may use and one
    /// the policy defines, and a key's fixed feature / experiment replace the client's. With
    /// authentication off the request is left as the client sent it (an unknown namespace then
    /// falls back to `default`, as it always has).
    pub fn bind(&self, gw: &Gateway, scope: Scope<'_>) -> Result<(), ApiError> {
        let Some(key) = self.key else {
            return Ok(());
        };
        self.may_act_for(scope.tenant)?;
        let named = scope.namespace.is_some();
        let namespace = scope
            .namespace
            .clone()
            .unwrap_or_else(|| key.default_namespace.clone());
        if !key.allows_namespace(&namespace) {
            return Err(ApiError::NamespaceForbidden {
                key: key.label.clone(),
                namespace,
                allowed: key.namespaces.clone(),
            });
        }
        let policies = gw.policies();
        let defined = |n: &str| policies.namespaces().any(|ns| ns.name() == n);
        // `default` is where requests have always gone when they name nothing; a policy
        // without it simply has no rules for them — when the key puts the request there (it
        // lists `default`, or it is the key's default and the request names none), never
        // because a client named it through `*`.
        let bound_to_default = namespace == DEFAULT_NAMESPACE
            && (key.namespaces.iter().any(|n| n == DEFAULT_NAMESPACE)
                || (!named && key.default_namespace == DEFAULT_NAMESPACE));
        if !defined(&namespace) && !bound_to_default {
            let usable = policies
                .namespaces()
                .map(|ns| ns.name().to_owned())
                .filter(|n| key.allows_namespace(n))
                .collect();
            return Err(ApiError::UnknownNamespace {
                key: key.label.clone(),
                namespace,
                usable,
            });
        }
        *scope.namespace = Some(namespace);
        if let Some(f) = &key.feature_id {
            *scope.feature = Some(f.clone());
        }
        if let Some(e) = &key.experiment_id {
            *scope.experiment = Some(e.clone());
        }
        Ok(())
    }
}

/// The attributes of a request that decide who pays, as [`Caller::bind`] checks and fixes them.
pub struct Scope<'a> {
    /// Tenant named.
    pub tenant: &'a str,
    /// Budget namespace named (set to the key's default when `None`).
    pub namespace: &'a mut Option<String>,
    /// Feature named (replaced by the key's fixed one).
    pub feature: &'a mut Option<String>,
    /// Experiment named (replaced by the key's fixed one).
    pub experiment: &'a mut Option<String>,
}

impl<'a> Scope<'a> {
    /// The scope of an inference request.
    pub fn of(inf: &'a mut Inference) -> Self {
        Self {
            tenant: &inf.tenant_id,
            namespace: &mut inf.budget_namespace,
            feature: &mut inf.feature_id,
            experiment: &mut inf.experiment_id,
        }
    }
}

/// Check the API key (when keys are configured) and that it may act for `tenant`.
pub fn authorize(gw: &Gateway, headers: &HeaderMap, tenant: Option<&str>) -> Result<(), ApiError> {
    let caller = authenticate(gw, headers)?;
    match tenant {
        Some(t) => caller.may_act_for(t),
        None => Ok(()),
    }
}

/// 413 when the conversation's text (or the texts to embed) exceeds `server.max_prompt_bytes`.
pub fn check_prompt(gw: &Gateway, inf: &Inference) -> Result<(), ApiError> {
    let limit = gw.config().max_prompt_bytes;
    let size = inf.prompt_bytes();
    if size > limit {
        return Err(ApiError::PromptTooLarge { size, limit });
    }
    Ok(())
}

/// Read a JSON object body: 415 unless `application/json`, 413 over the limit, 408 when it
/// does not arrive within `server.body_read_timeout_ms`, 400 if malformed, 422 if not an
/// object.
pub async fn read_json(
    gw: &Gateway,
    req: Request<Incoming>,
) -> Result<(HeaderMap, Map<String, Value>), ApiError> {
    let (parts, body) = req.into_parts();
    let is_json = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let limit = gw.config().max_body_bytes;
    if parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > limit)
    {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let timeout = gw.config().body_read_timeout;
    let Ok(collected) = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await
    else {
        return Err(ApiError::BodyTimeout {
            ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        });
    };
    let bytes = match collected {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(ApiError::PayloadTooLarge { limit })
        }
        Err(e) => return Err(ApiError::UnreadableBody(e.to_string())),
    };
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(obj)) => Ok((parts.headers, obj)),
        Ok(_) => Err(ApiError::InvalidFields(vec![
            json!({"field": "(body)", "message": "must be a JSON object"}),
        ])),
        Err(e) => Err(ApiError::InvalidJson(e.to_string())),
    }
}

/// A request header's trimmed value, if present and not empty.
pub fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}
