//! Operations endpoints: health, readiness, metrics, the loaded policies, reload, the canned
//! queries and budget snapshots.

use std::collections::BTreeMap;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::redact;
use super::request::{authenticate, authorize, json_response, Body, Scope};
use crate::gateway::{Gateway, SnapshotQuery};
use crate::queries::{parse_time, QueryParams, Question};
use crate::requests::FieldErrors;

/// `GET /healthz`.
pub fn healthz() -> Response<Body> {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// `GET /readyz`: 503 while the logs cannot be written.
pub fn readyz(gw: &Gateway) -> Response<Body> {
    let logs = gw.logs_healthy();
    let set = gw.policies();
    let mut body = json!({
        "ready": logs,
        "logs_writable": logs,
        "policy_file": set.source().display().to_string(),
        "rules": set.rules().count(),
    });
    // Not part of readiness: without Redis each rule's failure_mode decides, and the gateway
    // recovers by itself when it is back.
    body["budgets"] = match gw.shared() {
        Some(s) => json!(s.status()),
        None => json!({"backend": "local"}),
    };
    json_response(
        if logs {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &body,
    )
}

/// `GET /metrics`: Prometheus text.
pub fn metrics(gw: &Gateway) -> Response<Body> {
    let text = gw.metrics().render(&gw.status_families());
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

/// `GET /v1/policies`: the loaded policy set (every tenant's limits: a `*` key when auth is on).
pub fn policies(gw: &Gateway, headers: &HeaderMap) -> Result<Response<Body>, ApiError> {
    authorize(gw, headers, Some("*"))?;
    let set = gw.policies();
    let components: Vec<Value> = set
        .components()
        .map(|c| json!({"name": c.info().name, "version": c.info().version, "description": c.info().description, "sha256": c.sha256(), "path": c.path().display().to_string()}))
        .collect();
    let namespaces: Map<String, Value> = set
        .namespaces()
        .map(|ns| {
            let rules: Vec<Value> = ns
                .rules()
                .iter()
                .map(|r| json!({"id": r.id(), "primitive": r.primitive(), "mode": r.mode(), "failure_mode": r.failure_mode(), "settings": serde_json::from_str::<Value>(r.settings_json()).unwrap_or(Value::Null), "aggregates": r.aggregates()}))
                .collect();
            (ns.name().to_owned(), json!({"rules": rules}))
        })
        .collect();
    let body = json!({"source": set.source().display().to_string(), "version": set.version(), "components": components, "namespaces": namespaces});
    Ok(json_response(StatusCode::OK, &body))
}

/// `POST /v1/admin/reload`: reload the policies; a rejected set is a 422 answer naming every
/// problem while the previous set keeps serving.
pub async fn reload(gw: &Gateway, headers: &HeaderMap) -> Result<Response<Body>, ApiError> {
    authorize(gw, headers, Some("*"))?;
    // Compiling components is CPU work; keep it off the async workers.
    let result = tokio::task::block_in_place(|| gw.reload_policies());
    Ok(match result {
        Ok(set) => json_response(
            StatusCode::OK,
            &json!({"reloaded": true, "rules": set.rules().count(), "version": set.version()}),
        ),
        Err(e) => {
            let problems: Vec<Value> = e
                .problems()
                .iter()
                .map(|p| json!({"at": p.at, "message": p.message}))
                .collect();
            json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({"reloaded": false, "error": "invalid_policy_config", "detail": e.to_string(), "problems": problems, "serving": "previous policy set"}),
            )
        }
    })
}

/// Parameters `GET /v1/snapshot` accepts.
const SNAPSHOT_PARAMS: [&str; 9] = [
    "tenant_id",
    "caller_id",
    "feature_id",
    "experiment_id",
    "budget_namespace",
    "route_name",
    "model_tier",
    "tokens_in",
    "max_tokens",
];

/// `GET /v1/snapshot?tenant_id=..&route_name=..&model_tier=..&tokens_in=..[&feature_id..]`: the
/// priced context and each rule's current aggregate values for such a request. The key binds
/// the request's scope as for `/infer`; a tenant key sees only aggregates kept per tenant.
pub async fn snapshot(
    gw: &Gateway,
    headers: &HeaderMap,
    query_string: &str,
) -> Result<Response<Body>, ApiError> {
    let caller = authenticate(gw, headers)?;
    let mut q = snapshot_query(gw, query_string)?;
    caller.bind(
        gw,
        Scope {
            tenant: &q.tenant_id,
            namespace: &mut q.budget_namespace,
            feature: &mut q.feature_id,
            experiment: &mut q.experiment_id,
        },
    )?;
    let answer = gw.snapshot_for(&q).await?;
    Ok(json_response(
        StatusCode::OK,
        &redact::snapshot(gw, &caller, &answer),
    ))
}

fn snapshot_query(gw: &Gateway, query_string: &str) -> Result<SnapshotQuery, ApiError> {
    let params: BTreeMap<String, String> = form_urlencoded::parse(query_string.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let obj: Map<String, Value> = params
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let mut errs = FieldErrors::default();
    let tenant_id = errs.required(&obj, "tenant_id");
    let tokens_in = match params.get("tokens_in").map(|v| v.parse::<u32>()) {
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            errs.push("tokens_in", "must be a non-negative integer");
            0
        }
        None => {
            errs.push("tokens_in", "is required (input tokens of the request)");
            0
        }
    };
    let max_tokens = match params.get("max_tokens").map(|v| v.parse::<u32>()) {
        Some(Ok(n)) if n > 0 => Some(n),
        Some(_) => {
            errs.push("max_tokens", "must be a positive integer");
            None
        }
        None => None,
    };
    for key in params.keys() {
        if !SNAPSHOT_PARAMS.contains(&key.as_str()) {
            errs.push(key, "unknown parameter");
        }
    }
    let q = SnapshotQuery {
        caller_id: errs.optional(&obj, "caller_id"),
        feature_id: errs.optional(&obj, "feature_id"),
        experiment_id: errs.optional(&obj, "experiment_id"),
        budget_namespace: errs.optional(&obj, "budget_namespace"),
        route_name: errs
            .optional(&obj, "route_name")
            .unwrap_or_else(|| gw.config().default_route.clone()),
        model_tier: errs
            .optional(&obj, "model_tier")
            .unwrap_or_else(|| gw.config().default_tier.clone()),
        tenant_id,
        tokens_in,
        max_tokens,
    };
    if errs.0.is_empty() {
        Ok(q)
    } else {
        Err(ApiError::InvalidFields(errs.0))
    }
}

/// `GET /v1/queries/<name>?threshold=0.05&since=2025-11-24&until=...`: one of the five
/// questions, answered from the logs ingested up to now.
pub fn query(
    gw: &Gateway,
    headers: &HeaderMap,
    name: &str,
    query_string: &str,
) -> Result<Response<Body>, ApiError> {
    authorize(gw, headers, Some("*"))?;
    let Some(question) = Question::from_name(name) else {
        return Err(ApiError::UnknownQuery {
            name: name.to_owned(),
        });
    };
    let params = query_params(query_string)?;
    let answer = tokio::task::block_in_place(|| {
        gw.ingest()?;
        crate::queries::run(gw.engine(), question, &params)
    });
    match answer {
        Ok(a) => Ok(json_response(StatusCode::OK, &json!(a))),
        Err(e) => {
            tracing::error!(error = %e, query = name, "query failed");
            Err(ApiError::QueryFailed)
        }
    }
}

/// The five questions' parameters from a query string: `threshold`, `since`, `until`.
fn query_params(query_string: &str) -> Result<QueryParams, ApiError> {
    let mut params = QueryParams::default();
    let mut errs = Vec::new();
    for (key, value) in form_urlencoded::parse(query_string.as_bytes()) {
        match key.as_ref() {
            "threshold" => match value.parse::<f64>() {
                Ok(t) if t.is_finite() && t >= 0.0 => params.threshold_usd = t,
                _ => errs.push(json!({"field": "threshold", "message": "must be a non-negative number of USD"})),
            },
            "since" | "until" => match parse_time(&value) {
                Ok(us) if key == "since" => params.since_us = Some(us),
                Ok(us) => params.until_us = Some(us),
                Err(message) => errs.push(json!({"field": key, "message": message})),
            },
            other => errs.push(json!({"field": other, "message": "unknown parameter; use threshold, since, until"})),
        }
    }
    if errs.is_empty() {
        Ok(params)
    } else {
        Err(ApiError::InvalidFields(errs))
    }
}

/// `GET /v1/report`: the HTML cost report (`llmscope report`'s content) over the logs as
/// ingested now; a `*` key; the same `threshold`, `since`, `until` parameters as the queries.
pub fn report(
    gw: &Gateway,
    headers: &HeaderMap,
    query_string: &str,
) -> Result<Response<Body>, ApiError> {
    authorize(gw, headers, Some("*"))?;
    let params = query_params(query_string)?;
    let generated_at = llmscope_wire::records::rfc3339(crate::gateway::now_ms());
    let html = tokio::task::block_in_place(|| {
        gw.ingest()?;
        crate::report::render(gw.engine(), &params, &generated_at)
    });
    match html {
        Ok(html) => {
            let mut resp = Response::new(Full::new(Bytes::from(html)));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            Ok(resp)
        }
        Err(e) => {
            tracing::error!(error = %e, "report failed");
            Err(ApiError::QueryFailed)
        }
    }
}

/// `GET /v1/budgets`: every budget rule × scope value with spend in its window (see
/// [`crate::gateway::budgets`]). A tenant key sees only rows of budgets kept per tenant, for
/// its own tenants (unless `auth.detailed_reasons`); a `*` key sees all.
pub fn budgets(gw: &Gateway, headers: &HeaderMap) -> Result<Response<Body>, ApiError> {
    let caller = authenticate(gw, headers)?;
    let every = caller.sees_every_tenant(gw);
    let keep = |scope: &crate::gateway::budgets::ScopeValues| {
        every
            || scope.iter().any(|(s, v)| {
                *s == llmscope_sdk::types::Scope::Tenant
                    && v.as_deref().is_some_and(|t| caller.may_act_for(t).is_ok())
            })
    };
    let rows = gw.budgets(&keep);
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"taken_at": llmscope_wire::records::rfc3339(crate::gateway::now_ms()), "budgets": rows}),
    ))
}
