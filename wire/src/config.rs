//! The gateway configuration (`llmscope serve --config llmscope.yaml`): listener, artifact paths,
//! the policy file, model prices, routes, providers and API keys. Raw serde structures reject
//! unknown keys; validation collects every problem with its field path before failing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::{Limits, Problem};

/// A validated gateway configuration. Relative paths are resolved against the config file's
/// directory.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// File the configuration was read from.
    pub source: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Time a client has to send a request body once its headers are in (`server.
    /// body_read_timeout_ms`, default 10 s; 408 after it).
    pub body_read_timeout: Duration,
    /// Most connections served at once (`server.max_connections`, default 1024); further
    /// connections are answered 503 and closed.
    pub max_connections: usize,
    /// Largest prompt, in bytes of message text summed over the conversation
    /// (`server.max_prompt_bytes`, default 512 KiB or `max_body_bytes` if smaller; 413 above).
    pub max_prompt_bytes: usize,
    /// Where telemetry lines go (`TELEMETRY_PATH` overrides).
    pub telemetry_path: PathBuf,
    /// Where decision lines go (`DECISIONS_PATH` overrides).
    pub decisions_path: PathBuf,
    /// Refuse requests (503) when the logs cannot be written, instead of serving them unlogged.
    pub reject_unlogged: bool,
    /// Charge a provider attempt that timed out at its estimate (`artifacts.
    /// charge_timed_out_attempts`, default true): the provider usually finishes, and bills, a
    /// call the gateway stopped waiting for.
    pub charge_timed_out_attempts: bool,
    /// The policy YAML.
    pub policy_file: PathBuf,
    /// Directory of `<primitive>.wasm` components.
    pub policies_dir: PathBuf,
    /// Bounds for policy execution.
    pub limits: Limits,
    /// Watch the policy file and directory and reload on change.
    pub hot_reload: bool,
    /// Models by name.
    pub models: BTreeMap<String, ModelConfig>,
    /// Routes by name (e.g. `/answer-routed`).
    pub routes: BTreeMap<String, RouteConfig>,
    /// Providers by name.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// API keys; empty means no authentication.
    pub api_keys: Vec<ApiKey>,
    /// Show tenant keys the full reasons, alerts and aggregate values of rules whose budgets
    /// are shared beyond one tenant (`auth.detailed_reasons`, default false: withheld, since
    /// they carry other tenants' spend).
    pub detailed_reasons: bool,
    /// With authentication off, whether the edge endpoints (`/v1/edge/*`) answer anyone
    /// (`auth.unauthenticated_edge: true`: a trusted network). Off by default: without keys
    /// the edge endpoints refuse every call, since whoever reached them could reserve and
    /// report spend for any tenant.
    pub unauthenticated_edge: bool,
    /// Route used when a request names none.
    pub default_route: String,
    /// Tier used when a request names none.
    pub default_tier: String,
    /// Persisted DuckDB file (None: in memory, rebuilt from the logs at start).
    pub duckdb_path: Option<PathBuf>,
    /// How often logs are ingested and aggregates recomputed.
    pub refresh_interval: Duration,
    /// Where budget sums live: this process, or Redis shared by the replicas.
    pub budgets: crate::budgets::BudgetsConfig,
    /// The alerts log (resolved: `alerts.jsonl` beside the telemetry log unless configured).
    pub alerts_path: PathBuf,
    /// Webhooks every alert is delivered to.
    pub webhooks: Vec<crate::alerts::WebhookConfig>,
}

/// A priced model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `provider`, `input_per_1m` and `output_per_1m`"
)]
pub struct ModelConfig {
    /// Provider (a key of `providers`) that serves it.
    pub provider: String,
    /// Name to send to the provider (default: the model's key).
    #[serde(default)]
    pub provider_model: Option<String>,
    /// US dollars per million input tokens.
    pub input_per_1m: f64,
    /// US dollars per million output tokens.
    pub output_per_1m: f64,
    /// Models to try, in order, when this one fails.
    #[serde(default)]
    pub fallback: Vec<String>,
    /// Tokenizer: `o200k_base` (GPT-4o family), `cl100k_base`; default chosen from the name.
    #[serde(default)]
    pub tokenizer: Option<String>,
}

/// A route: tiers mapped to models, and the output-token budget.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with `tiers`")]
pub struct RouteConfig {
    /// Tier name → model name.
    pub tiers: BTreeMap<String, String>,
    /// Output tokens requested from the provider and used for the estimate.
    #[serde(default = "default_max_output_tokens")]
    pub max_output_tokens: u32,
}

fn default_max_output_tokens() -> u32 {
    500
}

/// How to reach a provider.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "snake_case",
    deny_unknown_fields,
    expecting = "a mapping with `kind: mock`, `kind: openai` or `kind: anthropic`"
)]
pub enum ProviderConfig {
    /// Built-in deterministic provider: no network, no keys.
    Mock {
        /// Simulated latency.
        #[serde(default)]
        latency_ms: u64,
        /// Output tokens reported (capped by the request's max tokens).
        #[serde(default = "default_mock_output")]
        output_tokens: u32,
        /// Models for which the mock fails with a 503, to exercise fallbacks.
        #[serde(default)]
        fail_models: Vec<String>,
        /// Chunks a streamed answer (`stream: true`) is cut into.
        #[serde(default = "default_mock_chunks")]
        stream_chunks: u32,
        /// Delay between two chunks of a streamed answer, ms.
        #[serde(default)]
        stream_chunk_delay_ms: u64,
    },
    /// Any OpenAI-compatible chat-completions API (OpenAI, vLLM, Ollama, llama.cpp).
    Openai {
        /// Base URL including `/v1`, e.g. `https://api.openai.com/v1`.
        base_url: String,
        /// Environment variable holding the API key (none: no Authorization header).
        #[serde(default)]
        api_key_env: Option<String>,
        /// Per-attempt timeout.
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
        /// Retries after a retryable failure (429, 5xx, timeout, connection error).
        #[serde(default = "default_retries")]
        max_retries: u32,
    },
    /// Anthropic's Messages API.
    Anthropic {
        /// Base URL, e.g. `https://api.anthropic.com`.
        base_url: String,
        /// Environment variable holding the API key.
        #[serde(default)]
        api_key_env: Option<String>,
        /// Per-attempt timeout.
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
        /// Retries after a retryable failure.
        #[serde(default = "default_retries")]
        max_retries: u32,
    },
}

fn default_mock_output() -> u32 {
    120
}
fn default_mock_chunks() -> u32 {
    8
}
fn default_timeout_ms() -> u64 {
    30_000
}
fn default_retries() -> u32 {
    2
}

/// Namespace a key that sets neither `namespaces` nor `default_namespace` is bound to.
pub const DEFAULT_NAMESPACE: &str = "default";

/// An API key: the tenants it may act for and the budget scopes it may draw on. Who pays is
/// decided here, not by the client: the key's tenants bound `tenant_id`, its namespaces bound
/// `budget_namespace` (a request naming none is put in `default_namespace`), and a fixed
/// `feature_id` / `experiment_id` replaces whatever the client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// The secret.
    pub key: String,
    /// How errors name the key: its `name`, else `auth.api_keys[<i>]` (never the secret).
    pub label: String,
    /// Allowed tenants; `*` allows every tenant.
    pub tenants: Vec<String>,
    /// Budget namespaces the key may use; `*` allows every namespace the policy defines.
    /// Default: `["*"]` for a key with tenant `*`, else only `default_namespace`.
    pub namespaces: Vec<String>,
    /// Namespace of a request that names none (default: the first of `namespaces`, else
    /// `default`).
    pub default_namespace: String,
    /// Feature every request with this key is attributed to, whatever the client sends.
    pub feature_id: Option<String>,
    /// Experiment every request with this key is attributed to, whatever the client sends.
    pub experiment_id: Option<String>,
    /// Client or edge key.
    pub kind: KeyKind,
}

impl ApiKey {
    /// Whether this key may act for `tenant`.
    pub fn allows(&self, tenant: &str) -> bool {
        self.tenants.iter().any(|t| t == "*" || t == tenant)
    }

    /// Whether this key may act for every tenant (admin endpoints, full figures).
    pub fn is_admin(&self) -> bool {
        self.tenants.iter().any(|t| t == "*")
    }

    /// Whether this key may draw on budget namespace `namespace`.
    pub fn allows_namespace(&self, namespace: &str) -> bool {
        self.namespaces.iter().any(|n| n == "*" || n == namespace)
    }
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of sections (`policy`, `models`, `routes`, `providers`, ...)"
)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    artifacts: RawArtifacts,
    policy: RawPolicy,
    models: BTreeMap<String, ModelConfig>,
    routes: BTreeMap<String, RouteConfig>,
    providers: BTreeMap<String, ProviderConfig>,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    analytics: RawAnalytics,
    #[serde(default)]
    budgets: crate::budgets::BudgetsConfig,
    #[serde(default)]
    alerts: crate::alerts::AlertsConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
struct RawAnalytics {
    #[serde(default)]
    duckdb_path: Option<PathBuf>,
    #[serde(default = "default_refresh")]
    refresh_interval_ms: u64,
}

impl Default for RawAnalytics {
    fn default() -> Self {
        Self {
            duckdb_path: None,
            refresh_interval_ms: default_refresh(),
        }
    }
}

fn default_refresh() -> u64 {
    250
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
struct RawServer {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default = "default_body")]
    max_body_bytes: usize,
    #[serde(default = "default_body_read_timeout")]
    body_read_timeout_ms: u64,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default)]
    max_prompt_bytes: Option<usize>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_body_bytes: default_body(),
            body_read_timeout_ms: default_body_read_timeout(),
            max_connections: default_max_connections(),
            max_prompt_bytes: None,
        }
    }
}

fn default_body_read_timeout() -> u64 {
    10_000
}
fn default_max_connections() -> usize {
    1024
}
/// Default `server.max_prompt_bytes` (capped by `max_body_bytes`).
const DEFAULT_MAX_PROMPT_BYTES: usize = 512 << 10;

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_body() -> usize {
    1 << 20
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
struct RawArtifacts {
    #[serde(default = "default_telemetry")]
    telemetry_path: PathBuf,
    #[serde(default = "default_decisions")]
    decisions_path: PathBuf,
    #[serde(default = "default_true")]
    reject_unlogged: bool,
    #[serde(default = "default_true")]
    charge_timed_out_attempts: bool,
}

impl Default for RawArtifacts {
    fn default() -> Self {
        Self {
            telemetry_path: default_telemetry(),
            decisions_path: default_decisions(),
            reject_unlogged: true,
            charge_timed_out_attempts: true,
        }
    }
}

fn default_telemetry() -> PathBuf {
    "artifacts/logs/telemetry.jsonl".into()
}
fn default_decisions() -> PathBuf {
    "artifacts/logs/policy_decisions.jsonl".into()
}
fn default_true() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `file` and `policies_dir`"
)]
struct RawPolicy {
    file: PathBuf,
    policies_dir: PathBuf,
    #[serde(default = "default_deadline")]
    deadline_ms: u64,
    #[serde(default = "default_memory")]
    memory_mib: usize,
    #[serde(default = "default_true")]
    hot_reload: bool,
    /// Compiled-component cache directory (optional).
    #[serde(default)]
    compile_cache_dir: Option<PathBuf>,
}

fn default_deadline() -> u64 {
    20
}
fn default_memory() -> usize {
    32
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with `api_keys`")]
struct RawAuth {
    #[serde(default)]
    api_keys: Vec<RawApiKey>,
    #[serde(default)]
    detailed_reasons: bool,
    #[serde(default)]
    unauthenticated_edge: bool,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `key_env` (or `key`) and `tenants`"
)]
struct RawApiKey {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    key_env: Option<String>,
    #[serde(default)]
    name: Option<String>,
    tenants: Vec<String>,
    #[serde(default)]
    namespaces: Option<Vec<String>>,
    #[serde(default)]
    default_namespace: Option<String>,
    #[serde(default)]
    feature_id: Option<String>,
    #[serde(default)]
    experiment_id: Option<String>,
    #[serde(default)]
    kind: KeyKind,
}

/// What a key is for: clients calling the inference and admin APIs, or an edge proxy (the
/// Envoy filters) calling `/v1/edge/*`. Neither kind may call the other's endpoints, so a
/// leaked tenant key cannot reserve or report spend, and a filter's key cannot serve
/// requests or read figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// `/infer`, `/v1/chat/completions` and (with tenant `*`) the admin endpoints.
    #[default]
    Client,
    /// Only `/v1/edge/context` and `/v1/edge/report`, for the tenants it lists.
    Edge,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
struct RawDefaults {
    #[serde(default = "default_route")]
    route: String,
    #[serde(default = "default_tier")]
    tier: String,
}

impl Default for RawDefaults {
    fn default() -> Self {
        Self {
            route: default_route(),
            tier: default_tier(),
        }
    }
}

fn default_route() -> String {
    "/answer-routed".into()
}
fn default_tier() -> String {
    "cheap".into()
}

/// A gateway configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{}", render(path, problems))]
pub struct GatewayConfigError {
    /// File.
    pub path: PathBuf,
    /// Every problem found.
    pub problems: Vec<Problem>,
}

fn render(path: &Path, problems: &[Problem]) -> String {
    let mut out = format!("gateway config {} is invalid:", path.display());
    for p in problems {
        out.push_str(&format!("\n  - {p}"));
    }
    out
}

impl GatewayConfig {
    /// Read and validate `path`. `env` supplies environment variables (`TELEMETRY_PATH`,
    /// `DECISIONS_PATH`, API keys named by `key_env`).
    pub fn load(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, GatewayConfigError> {
        let fail = |at: &str, message: String| GatewayConfigError {
            path: path.into(),
            problems: vec![Problem {
                at: at.into(),
                message,
            }],
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail("(file)", format!("cannot read: {e}")))?;
        Self::parse(&text, path, env)
    }

    /// Validate configuration `text` as if read from `path` (relative paths resolve against its
    /// directory; messages name it).
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, GatewayConfigError> {
        let mut raw: RawConfig =
            crate::yaml::from_str(text).map_err(|problem| GatewayConfigError {
                path: path.into(),
                problems: vec![problem],
            })?;
        let mut problems = Problems::default();
        let listen = parse_listen(&raw.server.listen, &mut problems);
        check_models(&raw, &mut problems);
        check_routes(&raw, &mut problems);
        check_providers(&raw, &mut problems);
        let api_keys = api_keys(std::mem::take(&mut raw.auth.api_keys), env, &mut problems);
        if raw.auth.unauthenticated_edge && !api_keys.is_empty() {
            problems.add(
                "auth.unauthenticated_edge".into(),
                "API keys are configured, so the edge endpoints need a key of `kind: edge`; \
                 remove `unauthenticated_edge` (it only opens them when authentication is off)"
                    .into(),
            );
        }
        let max_prompt_bytes = check_server_limits(&raw, &mut problems);
        check_intervals(&raw, &mut problems);
        for (at, message) in crate::budgets::problems(&raw.budgets)
            .into_iter()
            .chain(crate::alerts::problems(&raw.alerts))
        {
            problems.add(at, message);
        }
        if !problems.0.is_empty() {
            return Err(GatewayConfigError {
                path: path.into(),
                problems: problems.0,
            });
        }
        Ok(Self::build(
            raw,
            path,
            env,
            listen,
            api_keys,
            max_prompt_bytes,
        ))
    }

    /// The configuration of a validated `raw` read from `path`, `env` overriding the log paths.
    fn build(
        raw: RawConfig,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        listen: SocketAddr,
        api_keys: Vec<ApiKey>,
        max_prompt_bytes: usize,
    ) -> Self {
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        Self {
            source: path.into(),
            listen,
            max_body_bytes: raw.server.max_body_bytes,
            body_read_timeout: Duration::from_millis(raw.server.body_read_timeout_ms),
            max_connections: raw.server.max_connections,
            max_prompt_bytes,
            telemetry_path: env("TELEMETRY_PATH")
                .map_or_else(|| resolve(&raw.artifacts.telemetry_path), PathBuf::from),
            decisions_path: env("DECISIONS_PATH")
                .map_or_else(|| resolve(&raw.artifacts.decisions_path), PathBuf::from),
            reject_unlogged: raw.artifacts.reject_unlogged,
            charge_timed_out_attempts: raw.artifacts.charge_timed_out_attempts,
            policy_file: resolve(&raw.policy.file),
            policies_dir: resolve(&raw.policy.policies_dir),
            limits: Limits {
                deadline: Duration::from_millis(raw.policy.deadline_ms),
                memory_bytes: raw.policy.memory_mib << 20,
                compile_cache: raw.policy.compile_cache_dir.as_deref().map(resolve),
                ..Limits::default()
            },
            hot_reload: raw.policy.hot_reload,
            models: raw.models,
            routes: raw.routes,
            providers: raw.providers,
            api_keys,
            detailed_reasons: raw.auth.detailed_reasons,
            unauthenticated_edge: raw.auth.unauthenticated_edge,
            default_route: raw.defaults.route,
            default_tier: raw.defaults.tier,
            duckdb_path: raw.analytics.duckdb_path.as_deref().map(resolve),
            refresh_interval: Duration::from_millis(raw.analytics.refresh_interval_ms),
            budgets: raw.budgets,
            alerts_path: raw.alerts.path.as_deref().map_or_else(
                || {
                    let telemetry = env("TELEMETRY_PATH")
                        .map_or_else(|| resolve(&raw.artifacts.telemetry_path), PathBuf::from);
                    telemetry.with_file_name("alerts.jsonl")
                },
                resolve,
            ),
            webhooks: raw.alerts.webhooks,
        }
    }
}

/// Problems found in a configuration, in the order found.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    /// Note what is wrong `at` a field path.
    fn add(&mut self, at: String, message: String) {
        self.0.push(Problem { at, message });
    }
}

/// `server.listen` as an address (a placeholder when it is not one, with the problem noted).
fn parse_listen(listen: &str, problems: &mut Problems) -> SocketAddr {
    match listen.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(e) => {
            problems.add(
                "server.listen".into(),
                format!(
                    "{:?} is not an IP address and port ({e}): use e.g. 127.0.0.1:8080, \
                     0.0.0.0:8080 or [::1]:8080 (host names such as localhost are not \
                     resolved)",
                    listen
                ),
            );
            SocketAddr::from(([127, 0, 0, 1], 8080))
        }
    }
}

/// Every model names a known provider, valid prices, known fallbacks and tokenizer.
fn check_models(raw: &RawConfig, problems: &mut Problems) {
    for (name, model) in &raw.models {
        let at = format!("models.{name}");
        if !raw.providers.contains_key(&model.provider) {
            problems.add(
                format!("{at}.provider"),
                format!(
                    "unknown provider `{}`; defined: {}",
                    model.provider,
                    keys(&raw.providers)
                ),
            );
        }
        for (field, price) in [
            ("input_per_1m", model.input_per_1m),
            ("output_per_1m", model.output_per_1m),
        ] {
            if !(price.is_finite() && price >= 0.0) {
                problems.add(
                    format!("{at}.{field}"),
                    format!("must be a non-negative price in USD per 1M tokens, got {price}"),
                );
            }
        }
        for (i, fb) in model.fallback.iter().enumerate() {
            if fb == name {
                problems.add(
                    format!("{at}.fallback[{i}]"),
                    format!("`{fb}` cannot fall back to itself; remove it from the list"),
                );
            } else if !raw.models.contains_key(fb) {
                problems.add(
                    format!("{at}.fallback[{i}]"),
                    format!("unknown model `{fb}`; defined: {}", keys(&raw.models)),
                );
            }
        }
        if let Some(t) = &model.tokenizer {
            if !crate::TOKENIZERS.contains(&t.as_str()) {
                problems.add(
                    format!("{at}.tokenizer"),
                    format!("unknown tokenizer `{t}`; use o200k_base or cl100k_base"),
                );
            }
        }
    }
}

/// There are routes, each a path mapping tiers to known models, and the default route is one.
fn check_routes(raw: &RawConfig, problems: &mut Problems) {
    if raw.routes.is_empty() {
        problems.add("routes".into(), "define at least one route".into());
    }
    for (name, route) in &raw.routes {
        let at = format!("routes.{name}");
        if !name.starts_with('/') {
            problems.add(
                at.clone(),
                "route names are paths starting with `/`, e.g. /answer-routed".into(),
            );
        }
        if route.tiers.is_empty() {
            problems.add(
                format!("{at}.tiers"),
                "map at least one tier to a model, e.g. `cheap: gpt-4o-mini`".into(),
            );
        }
        for (tier, model) in &route.tiers {
            if !raw.models.contains_key(model) {
                problems.add(
                    format!("{at}.tiers.{tier}"),
                    format!("unknown model `{model}`; defined: {}", keys(&raw.models)),
                );
            }
        }
        if route.max_output_tokens == 0 {
            problems.add(
                format!("{at}.max_output_tokens"),
                "must be at least 1".into(),
            );
        }
    }
    if !raw.routes.contains_key(&raw.defaults.route) {
        problems.add(
            "defaults.route".into(),
            format!(
                "`{}`{} is not a configured route; defined: {}",
                raw.defaults.route,
                if raw.defaults.route == default_route() {
                    " (the default when `defaults.route` is not set)"
                } else {
                    ""
                },
                keys(&raw.routes)
            ),
        );
    }
}

/// Every HTTP provider's base URL is an http(s) URL.
fn check_providers(raw: &RawConfig, problems: &mut Problems) {
    for (name, provider) in &raw.providers {
        if let ProviderConfig::Openai { base_url, .. }
        | ProviderConfig::Anthropic { base_url, .. } = provider
        {
            if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
                problems.add(
                    format!("providers.{name}.base_url"),
                    format!("{base_url:?} must start with http:// or https://"),
                );
            }
        }
    }
}

/// The API keys, each read from the file or its environment variable and at least 16
/// characters; the invalid ones are left out, with their problems noted.
fn api_keys(
    raw: Vec<RawApiKey>,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Vec<ApiKey> {
    let mut api_keys = Vec::new();
    for (i, k) in raw.into_iter().enumerate() {
        let at = format!("auth.api_keys[{i}]");
        let (namespaces, default_namespace) =
            key_scopes(&k, &at, &mut |at, message| problems.add(at, message));
        if k.kind == KeyKind::Edge {
            edge_key_scopes(&k, &at, problems);
        }
        let key = match (k.key, k.key_env) {
            (Some(key), None) => Some((key, format!("{at}.key"), "the key".to_owned())),
            (None, Some(var)) => match env(&var) {
                Some(v) if !v.is_empty() => {
                    Some((v, format!("{at}.key_env"), format!("the key in {var}")))
                }
                set => {
                    problems.add(
                        format!("{at}.key_env"),
                        format!(
                            "environment variable {var} is {}; export the key in it",
                            if set.is_some() { "empty" } else { "not set" }
                        ),
                    );
                    None
                }
            },
            (Some(_), Some(_)) => {
                problems.add(
                    at.clone(),
                    "set only one of `key` and `key_env` (prefer `key_env`: no secret in the \
                     file)"
                        .into(),
                );
                None
            }
            (None, None) => {
                problems.add(
                    at.clone(),
                    "set `key_env` to the environment variable holding the key (or `key` to \
                     the key itself)"
                        .into(),
                );
                None
            }
        };
        if k.tenants.is_empty() {
            problems.add(
                format!("{at}.tenants"),
                "list the tenants this key may act for, or `*`".into(),
            );
        }
        if let Some((key, key_at, what)) = key {
            if key.len() < 16 {
                problems.add(
                    key_at,
                    format!(
                        "{what} is {} characters; API keys must be at least 16 (e.g. \
                         `openssl rand -hex 24`)",
                        key.len()
                    ),
                );
            } else if let Some(first) = api_keys.iter().find(|k: &&ApiKey| k.key == key) {
                problems.add(
                    key_at,
                    format!(
                        "{what} is also {}'s; give every key its own secret (one secret, one \
                         set of scopes and one kind)",
                        first.label
                    ),
                );
            } else {
                api_keys.push(ApiKey {
                    key,
                    label: k.name.clone().unwrap_or_else(|| at.clone()),
                    tenants: k.tenants,
                    namespaces,
                    default_namespace,
                    feature_id: k.feature_id,
                    experiment_id: k.experiment_id,
                    kind: k.kind,
                });
            }
        }
    }
    api_keys
}

/// An edge key proxies requests whose attribution comes from Envoy: client scopes
/// (namespaces, fixed feature or experiment) do not apply to it.
fn edge_key_scopes(k: &RawApiKey, at: &str, problems: &mut Problems) {
    for (field, set) in [
        ("namespaces", k.namespaces.is_some()),
        ("default_namespace", k.default_namespace.is_some()),
        ("feature_id", k.feature_id.is_some()),
        ("experiment_id", k.experiment_id.is_some()),
    ] {
        if set {
            problems.add(
                format!("{at}.{field}"),
                format!(
                    "an edge key (`kind: edge`) only reserves and reports for the Envoy \
                     filters, whose requests' attribution Envoy sets; remove `{field}`, or \
                     make this a client key"
                ),
            );
        }
    }
}

/// The server's limits are at least 1; returns `server.max_prompt_bytes` with its default
/// (512 KiB, capped by `max_body_bytes`), which may not exceed `max_body_bytes`.
fn check_server_limits(raw: &RawConfig, problems: &mut Problems) -> usize {
    let server = &raw.server;
    if server.body_read_timeout_ms == 0 {
        problems.add(
            "server.body_read_timeout_ms".into(),
            "must be at least 1 (milliseconds a client has to send its body; default 10000)".into(),
        );
    }
    if server.max_connections == 0 {
        problems.add(
            "server.max_connections".into(),
            "must be at least 1 (connections served at once; default 1024)".into(),
        );
    }
    match server.max_prompt_bytes {
        None => DEFAULT_MAX_PROMPT_BYTES.min(server.max_body_bytes),
        Some(0) => {
            problems.add(
                "server.max_prompt_bytes".into(),
                "must be at least 1 (bytes of prompt text; default 524288)".into(),
            );
            0
        }
        Some(n) if n > server.max_body_bytes => {
            problems.add(
                "server.max_prompt_bytes".into(),
                format!(
                    "{n} is above server.max_body_bytes ({}), so no prompt that big could \
                     arrive; lower it or raise max_body_bytes",
                    server.max_body_bytes
                ),
            );
            n
        }
        Some(n) => n,
    }
}

/// The refresh interval and the policy deadline are at least 1 ms.
fn check_intervals(raw: &RawConfig, problems: &mut Problems) {
    if raw.analytics.refresh_interval_ms == 0 {
        problems.add(
            "analytics.refresh_interval_ms".into(),
            "must be at least 1".into(),
        );
    }
    if raw.policy.deadline_ms == 0 {
        problems.add("policy.deadline_ms".into(), "must be at least 1".into());
    }
}

/// A key's namespaces and default namespace, defaults applied, problems reported at `at`.
fn key_scopes(
    k: &RawApiKey,
    at: &str,
    problem: &mut impl FnMut(String, String),
) -> (Vec<String>, String) {
    let admin = k.tenants.iter().any(|t| t == "*");
    if let Some(name) = &k.name {
        if name.trim().is_empty() {
            problem(
                format!("{at}.name"),
                "must not be empty; it names the key in error messages (or remove it)".into(),
            );
        }
    }
    for (field, value) in [
        ("feature_id", &k.feature_id),
        ("experiment_id", &k.experiment_id),
    ] {
        if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
            problem(
                format!("{at}.{field}"),
                format!(
                    "must not be empty; set the {field} every request with this key is \
                     attributed to, or remove it to let clients name it"
                ),
            );
        }
    }
    if let Some(d) = &k.default_namespace {
        if d.trim().is_empty() || d == "*" {
            problem(
                format!("{at}.default_namespace"),
                format!(
                    "{d:?} is not a namespace; name the policy namespace requests without \
                     `budget_namespace` go to (default: the first of `namespaces`, else \
                     `{DEFAULT_NAMESPACE}`)"
                ),
            );
        }
    }
    match &k.namespaces {
        Some(list) => {
            if list.is_empty() {
                problem(
                    format!("{at}.namespaces"),
                    format!(
                        "list the budget namespaces this key may use, or `*` for every \
                         namespace of the policy; remove it to allow only `default_namespace` \
                         (default `{DEFAULT_NAMESPACE}`)"
                    ),
                );
            }
            for (i, n) in list.iter().enumerate() {
                if n.trim().is_empty() {
                    problem(
                        format!("{at}.namespaces[{i}]"),
                        "must name a policy namespace (or `*`)".into(),
                    );
                }
            }
            let any = list.iter().any(|n| n == "*");
            let default = k.default_namespace.clone().unwrap_or_else(|| {
                list.iter()
                    .find(|n| *n != "*")
                    .cloned()
                    .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
            });
            if let Some(d) = &k.default_namespace {
                if !any && !list.contains(d) && !list.is_empty() {
                    problem(
                        format!("{at}.default_namespace"),
                        format!(
                            "`{d}` is not in {at}.namespaces {list:?}; add it there or pick one \
                             of them"
                        ),
                    );
                }
            }
            (list.clone(), default)
        }
        None => {
            let default = k
                .default_namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
            let namespaces = if admin {
                vec!["*".to_owned()]
            } else {
                vec![default.clone()]
            };
            (namespaces, default)
        }
    }
}

fn keys<V>(map: &BTreeMap<String, V>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.keys().cloned().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test")]
    use super::*;

    const BASE: &str = r#"
policy: {file: policy.yaml, policies_dir: .}
models:
  m: {provider: mock, input_per_1m: 0.15, output_per_1m: 0.60}
routes:
  /answer-routed: {tiers: {cheap: m}}
providers:
  mock: {kind: mock}
"#;

    fn load(extra: &str) -> GatewayConfig {
        GatewayConfig::parse(
            &format!("{BASE}{extra}"),
            Path::new("/x/llmscope.yaml"),
            &|_| None,
        )
        .unwrap()
    }

    #[test]
    fn keys_without_scopes_keep_loading_with_narrow_defaults() {
        let cfg = load(
            "auth:\n  api_keys:\n    - {key: acme-key-0123456789, tenants: [acme]}\n    - {key: admin-key-0123456789, tenants: [\"*\"]}\n",
        );
        let (acme, admin) = (&cfg.api_keys[0], &cfg.api_keys[1]);
        assert_eq!(acme.label, "auth.api_keys[0]");
        assert_eq!(acme.namespaces, ["default"]);
        assert_eq!(acme.default_namespace, "default");
        assert!(acme.allows_namespace("default") && !acme.allows_namespace("demo"));
        assert!(!acme.is_admin());
        assert_eq!(admin.namespaces, ["*"]);
        assert!(admin.allows_namespace("demo") && admin.is_admin());
        assert!(!cfg.detailed_reasons);
        assert_eq!(cfg.body_read_timeout, Duration::from_secs(10));
        assert_eq!(cfg.max_connections, 1024);
        assert_eq!(cfg.max_prompt_bytes, 512 << 10);
    }

    #[test]
    fn a_key_binds_its_namespaces_and_fixed_attribution() {
        let cfg = load(
            "server: {max_body_bytes: 1000}\nauth:\n  detailed_reasons: true\n  api_keys:\n    - {key: acme-key-0123456789, name: acme-batch, tenants: [acme], namespaces: [batch, demo], feature_id: nightly}\n",
        );
        let k = &cfg.api_keys[0];
        assert_eq!(k.label, "acme-batch");
        assert_eq!(k.default_namespace, "batch");
        assert_eq!(k.feature_id.as_deref(), Some("nightly"));
        assert!(k.experiment_id.is_none());
        assert!(cfg.detailed_reasons);
        assert_eq!(
            cfg.max_prompt_bytes, 1000,
            "the default is capped by the body limit"
        );
    }

    #[test]
    fn edge_keys_carry_no_client_scopes_and_unauthenticated_edge_needs_auth_off() {
        let cfg = load(
            "auth:\n  api_keys:\n    - {key: edge-key-0123456789, kind: edge, tenants: [\"*\"]}\n",
        );
        assert_eq!(cfg.api_keys[0].kind, KeyKind::Edge);
        assert!(!cfg.unauthenticated_edge);
        assert!(load("auth: {unauthenticated_edge: true}\n").unauthenticated_edge);
        let problems = |extra: &str| {
            GatewayConfig::parse(
                &format!("{BASE}{extra}"),
                Path::new("/x/llmscope.yaml"),
                &|_| None,
            )
            .unwrap_err()
            .problems
            .into_iter()
            .map(|p| p.at)
            .collect::<Vec<_>>()
        };
        assert_eq!(
            problems("auth:\n  api_keys:\n    - {key: edge-key-0123456789, kind: edge, tenants: [acme], namespaces: [demo], feature_id: f}\n"),
            ["auth.api_keys[0].namespaces", "auth.api_keys[0].feature_id"]
        );
        assert_eq!(
            problems("auth:\n  api_keys:\n    - {key: same-key-0123456789, tenants: [a]}\n    - {key: same-key-0123456789, kind: edge, tenants: [\"*\"]}\n"),
            ["auth.api_keys[1].key"]
        );
        assert_eq!(
            problems("auth:\n  unauthenticated_edge: true\n  api_keys:\n    - {key: edge-key-0123456789, kind: edge, tenants: [\"*\"]}\n"),
            ["auth.unauthenticated_edge"]
        );
    }
}
