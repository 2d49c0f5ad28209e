//! The gateway: shared state (policies, providers, ledger, logs, engine), the refresh that
//! publishes aggregates, reload, and snapshots. The request lifecycle itself is in
//! `lifecycle.rs`, its log lines in `records.rs`, crash recovery in `recovery.rs`.
//! Transport-independent: the HTTP layer ([`crate::http`]) turns requests into [`Inference`] and
//! [`Outcome`]s into responses.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use llmscope_sdk::types::RequestContext;
use parking_lot::RwLock;

use crate::artifacts::{ArtifactWriter, WriteError};
use crate::config::GatewayConfig;
use crate::engine::{declared_aggregates, EngineError, IngestReport, SpendEngine};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::policy::{ConfigError, Evaluation, PolicyRuntime, PolicySet};
use crate::pricing;
use crate::providers::{Completion, Provider, ProviderError};
use crate::snapshots::{AggregateStore, LiveSnapshots, NoHistory};

pub use llmscope_wire::requests::Inference;

pub mod edge;
mod lifecycle;
mod records;
mod recovery;

pub use records::{CostSource, Status};

/// A served request.
#[derive(Debug, Clone)]
pub struct Served {
    /// Request id.
    pub request_id: String,
    /// The provider's answer.
    pub completion: Completion,
    /// Model that answered.
    pub model: String,
    /// Provider that answered.
    pub provider: String,
    /// Tier used.
    pub effective_tier: String,
    /// Estimate at the effective tier.
    pub estimated_cost_usd: f64,
    /// Actual cost.
    pub cost_usd: f64,
    /// Input tokens billed.
    pub tokens_in: u32,
    /// Output tokens billed.
    pub tokens_out: u32,
    /// Whether a fallback model answered.
    pub is_fallback: bool,
    /// The policy evaluation.
    pub evaluation: Evaluation,
}

/// The result of a request that was processed.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Dispatched and answered.
    Served(Box<Served>),
    /// Refused by policy; the provider was not called.
    Denied {
        /// Request id.
        request_id: String,
        /// The evaluation (reason, policy id).
        evaluation: Evaluation,
    },
}

/// Why a request could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The route is not configured.
    #[error("unknown route `{route}`; known routes: {}", .known.join(", "))]
    UnknownRoute {
        /// Asked for.
        route: String,
        /// Configured routes.
        known: Vec<String>,
    },
    /// The tier is not offered on the route.
    #[error("route {route} has no tier `{tier}`; tiers: {known}")]
    UnknownTier {
        /// Route.
        route: String,
        /// Asked for.
        tier: String,
        /// Offered tiers.
        known: String,
    },
    /// Every model in the fallback chain failed.
    #[error("all providers failed: {0}")]
    ProvidersFailed(String),
    /// The logs cannot be written and the gateway refuses to serve unlogged.
    #[error("request not served: {0}")]
    Unlogged(WriteError),
    /// The request's task failed (a bug); its decision line, if written, stands for it.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Attributes of a request whose snapshot is asked for.
#[derive(Debug, Clone)]
pub struct SnapshotQuery {
    /// Tenant.
    pub tenant_id: String,
    /// Caller.
    pub caller_id: Option<String>,
    /// Feature.
    pub feature_id: Option<String>,
    /// Experiment.
    pub experiment_id: Option<String>,
    /// Namespace asked for.
    pub budget_namespace: Option<String>,
    /// Route.
    pub route_name: String,
    /// Tier.
    pub model_tier: String,
    /// Input tokens (counted by the caller).
    pub tokens_in: u32,
    /// Output-token cap.
    pub max_tokens: Option<u32>,
}

/// One rule's settings and current snapshot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuleSnapshot {
    /// Rule id.
    pub rule_id: String,
    /// Primitive.
    pub primitive: String,
    /// The rule's settings (what `evaluate` receives).
    pub settings: serde_json::Value,
    /// Values of the rule's declared aggregates.
    pub snapshot: llmscope_sdk::types::Snapshot,
}

/// What `/v1/snapshot` answers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotAnswer {
    /// Resolved namespace (`None`: no rules apply).
    pub namespace: Option<String>,
    /// The policy file's version.
    pub policy_version: String,
    /// The priced request context.
    pub request: RequestContext,
    /// Each rule of the namespace, in order.
    pub rules: Vec<RuleSnapshot>,
}

/// A request priced for evaluation (see [`Gateway::price_request`]).
pub(crate) struct PricedRequest<'a> {
    /// The context the rules see.
    pub ctx: RequestContext,
    /// Its route.
    pub route: &'a crate::config::RouteConfig,
    /// The pricing, kept to re-price a downgrade.
    pub priced: pricing::Priced,
    /// The conversation as (role, content) pairs.
    pub pairs: Vec<(String, String)>,
}

/// Shared gateway state.
pub struct Gateway {
    config: GatewayConfig,
    runtime: Arc<PolicyRuntime>,
    policies: RwLock<Arc<PolicySet>>,
    providers: BTreeMap<String, Provider>,
    ledger: Ledger,
    store: RwLock<Arc<dyn AggregateStore>>,
    writer: ArtifactWriter,
    engine: SpendEngine,
    metrics: Metrics,
    started: Instant,
    edge: edge::EdgeState,
    /// SHA-256 of each configured API key, in `config.api_keys` order.
    key_digests: Vec<[u8; 32]>,
    /// Requests inside [`Gateway::handle`] right now.
    in_flight: std::sync::atomic::AtomicU64,
    /// Held from ingestion to the ledger drop of a refresh (and across a reload's swap), so
    /// what the ledger drops is exactly what the published aggregates gained.
    refresh_lock: parking_lot::Mutex<()>,
    /// Positions ingested by passes outside a refresh (a question's ingest), which the next
    /// refresh's ledger drop must include: a rotated file drained there is not reported again.
    ingested_elsewhere: parking_lot::Mutex<Vec<crate::artifacts::LogPosition>>,
    /// Input-token estimates corrected by what providers billed.
    calibration: pricing::Calibration,
    /// Read by snapshot assembly, written by a refresh's publish + ledger drop.
    view: RwLock<()>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The policy configuration is invalid.
    #[error(transparent)]
    Policy(#[from] ConfigError),
    /// A provider could not be set up.
    #[error("provider {name}: {source}")]
    Provider {
        /// Provider name.
        name: String,
        /// Cause.
        source: ProviderError,
    },
    /// The logs cannot be opened.
    #[error(transparent)]
    Artifacts(#[from] WriteError),
    /// The wasm runtime failed to start.
    #[error("wasm runtime: {0}")]
    Runtime(String),
    /// The analytics engine failed to open or to read the logs.
    #[error("analytics engine: {0}")]
    Engine(#[from] EngineError),
    /// Requests dispatched before a crash could not be recorded.
    #[error("recovering unanswered requests: {0}")]
    Recovery(String),
}

/// SHA-256 of an API key.
fn key_digest(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Gateway {
    /// Load policies, providers and logs.
    pub fn start(
        config: GatewayConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Arc<Self>, StartError> {
        // The BPE vocabularies take ~150 ms to build: build them while the components compile,
        // not on the first request.
        let mut vocabularies: Vec<pricing::Tokenizer> = config
            .models
            .iter()
            .map(|(name, model)| pricing::Tokenizer::for_model(name, model))
            .collect();
        vocabularies.sort_by_key(|t| *t as u8);
        vocabularies.dedup();
        let warm = std::thread::spawn(move || {
            for t in vocabularies {
                t.count("warm up");
            }
        });
        let runtime = Arc::new(
            PolicyRuntime::new(config.limits.clone())
                .map_err(|e| StartError::Runtime(format!("{e:#}")))?,
        );
        let policies = PolicySet::load(&config.policy_file, &config.policies_dir, &runtime)?;
        let mut providers = BTreeMap::new();
        for (name, cfg) in &config.providers {
            let p = Provider::from_config(cfg, env).map_err(|source| StartError::Provider {
                name: name.clone(),
                source,
            })?;
            providers.insert(name.clone(), p);
        }
        let writer = ArtifactWriter::start(&config.telemetry_path, &config.decisions_path)?;
        let engine = SpendEngine::open(
            config.duckdb_path.as_deref(),
            &config.telemetry_path,
            &config.decisions_path,
        )?;
        let key_digests = config.api_keys.iter().map(|k| key_digest(&k.key)).collect();
        let calibration = pricing::Calibration::new(config.models.keys().cloned());
        let gateway = Arc::new(Self {
            config,
            runtime,
            policies: RwLock::new(Arc::new(policies)),
            providers,
            ledger: Ledger::default(),
            store: RwLock::new(Arc::new(NoHistory)),
            writer,
            engine,
            metrics: Metrics::default(),
            started: Instant::now(),
            key_digests,
            in_flight: std::sync::atomic::AtomicU64::new(0),
            refresh_lock: parking_lot::Mutex::new(()),
            ingested_elsewhere: parking_lot::Mutex::new(Vec::new()),
            calibration,
            view: RwLock::new(()),
            edge: edge::EdgeState::default(),
        });
        // A crash leaves decisions written ahead without telemetry: record them at their
        // estimate before the first refresh, so budgets start conservative.
        gateway.recover_unanswered()?;
        // Budgets see history from the first request on.
        gateway.refresh()?;
        if warm.join().is_err() {
            tracing::warn!("warming the tokenizers failed; the first request will build them");
        }
        Ok(gateway)
    }

    /// Ingest new log lines, recompute every declared aggregate and publish them; settled
    /// ledger entries now covered by the aggregates are dropped. Blocking: call it off the
    /// async workers.
    pub fn refresh(&self) -> Result<IngestReport, EngineError> {
        let _serial = self.refresh_lock.lock();
        let policies = self.policies();
        self.refresh_locked(&policies, || {})
    }

    /// The refresh, with `refresh_lock` held: ingest → compute the aggregates of `policies`
    /// (and of the set serving now, during a reload: requests that started on it still read
    /// its aggregates) → run `swap` → publish and drop from the ledger what ingestion covered,
    /// under the `view` write lock (so no evaluation reads the old aggregates after the ledger
    /// dropped what only the new ones include) → age out old entries.
    fn refresh_locked(
        &self,
        policies: &PolicySet,
        swap: impl FnOnce(),
    ) -> Result<IngestReport, EngineError> {
        let started = Instant::now();
        let report = self.engine.ingest()?;
        // Kept until published: a failed compute must not lose a drained file's position.
        self.ingested_elsewhere
            .lock()
            .extend_from_slice(&report.telemetry_through);
        let edge = self.edge.aggregates();
        let serving = self.policies();
        let aggregates = declared_aggregates(policies.rules().chain(serving.rules()), &edge);
        let now = now_ms();
        let published = self.engine.compute(&aggregates, now)?;
        let expired = self.edge.expire(edge::EDGE_RESERVATION_TTL);
        if expired > 0 {
            tracing::warn!(
                expired,
                "edge reservations released without a report (proxy gone?)"
            );
        }
        {
            let _view = self.view.write();
            swap();
            self.publish_aggregates(Arc::new(published));
            let through = std::mem::take(&mut *self.ingested_elsewhere.lock());
            self.ledger.ingested_through(&through);
        }
        self.ledger
            .expire(now.saturating_sub(longest_window_ms(&aggregates, now)));
        self.metrics.refresh(
            started.elapsed().as_secs_f64(),
            report.telemetry_rows + report.decision_rows,
            report.malformed.len() as u64,
        );
        Ok(report)
    }

    /// Held (read) while a request's snapshots are assembled from the published aggregates and
    /// the ledger, so a refresh cannot publish and drop ledger entries in between.
    pub(crate) fn view(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.view.read()
    }

    /// Ingest new log lines for a question (serialized with refreshes). The ledger keeps what
    /// this pass covered until the next refresh publishes aggregates that include it.
    pub fn ingest(&self) -> Result<IngestReport, EngineError> {
        let _serial = self.refresh_lock.lock();
        let report = self.engine.ingest()?;
        let mut elsewhere = self.ingested_elsewhere.lock();
        for p in &report.telemetry_through {
            // The newest position of a file replaces older ones (a truncated file restarts).
            match elsewhere.iter_mut().find(|e| e.file_id == p.file_id) {
                Some(e) => e.offset = p.offset,
                None => elsewhere.push(*p),
            }
        }
        Ok(report)
    }

    /// Reopen both logs before the next write (SIGHUP after an external rotation).
    pub fn reopen_logs(&self) {
        self.writer.reopen();
    }

    /// Wait until no request is in flight, at most `timeout`; returns how many still are.
    pub async fn drained(&self, timeout: std::time::Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.in_flight();
            if n == 0 || Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// The configured API key that `presented` is, compared in constant time.
    ///
    /// Both sides are SHA-256 digests, so neither a key's content nor its length shows in the
    /// comparison's timing; every key is compared, with no early exit on a match.
    pub fn api_key(&self, presented: &str) -> Option<&crate::config::ApiKey> {
        use subtle::ConstantTimeEq;
        let presented = key_digest(presented);
        let mut matched = None;
        for (key, digest) in self.config.api_keys.iter().zip(&self.key_digests) {
            if bool::from(digest.ct_eq(&presented)) {
                matched = Some(key);
            }
        }
        matched
    }

    /// Requests being handled right now (priced, evaluated, at the provider or being logged).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The analytics engine (for the cost questions).
    pub fn engine(&self) -> &SpendEngine {
        &self.engine
    }

    /// The configuration.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// The policy set currently serving.
    pub fn policies(&self) -> Arc<PolicySet> {
        Arc::clone(&self.policies.read())
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The in-flight ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Published aggregate values.
    pub(crate) fn store(&self) -> Arc<dyn AggregateStore> {
        Arc::clone(&self.store.read())
    }

    /// The log writer.
    pub(crate) fn writer(&self) -> &ArtifactWriter {
        &self.writer
    }

    /// Edge (proxy-wasm) bookkeeping.
    pub fn edge(&self) -> &edge::EdgeState {
        &self.edge
    }

    /// Publish new aggregate values.
    pub fn publish_aggregates(&self, store: Arc<dyn AggregateStore>) {
        *self.store.write() = store;
    }

    /// Whether the logs are writable (the last write succeeded).
    pub fn logs_healthy(&self) -> bool {
        self.writer.healthy()
    }

    /// Seconds since start.
    pub fn uptime_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Reload the policy file and components; on success swap them in atomically (requests
    /// already evaluating keep the set they started with), on failure keep serving the old set.
    /// The new set's aggregates are computed before the swap, so its budgets never read an
    /// empty window.
    pub fn reload_policies(&self) -> Result<Arc<PolicySet>, ConfigError> {
        match PolicySet::load(
            &self.config.policy_file,
            &self.config.policies_dir,
            &self.runtime,
        ) {
            Ok(set) => {
                let set = Arc::new(set);
                {
                    let _serial = self.refresh_lock.lock();
                    let swap = || *self.policies.write() = Arc::clone(&set);
                    if let Err(e) = self.refresh_locked(&set, swap) {
                        // Serve the new rules anyway, on the aggregates published last.
                        tracing::error!(error = %e, "aggregate refresh for the reloaded policies failed");
                        *self.policies.write() = Arc::clone(&set);
                    }
                }
                self.metrics.reload("ok");
                tracing::info!(file = %self.config.policy_file.display(), rules = set.rules().count(), "policies reloaded");
                Ok(set)
            }
            Err(e) => {
                self.metrics.reload("failed");
                tracing::error!(error = %e, "policy reload rejected; the previous policies keep serving");
                Err(e)
            }
        }
    }

    /// Paths the hot reloader watches.
    pub fn watched_paths(&self) -> (PathBuf, PathBuf) {
        (
            self.config.policy_file.clone(),
            self.config.policies_dir.clone(),
        )
    }

    /// The route `route` and the model its tier `tier` maps to, or the error naming what is
    /// configured instead.
    pub(crate) fn route_model(
        &self,
        route: &str,
        tier: &str,
    ) -> Result<(&crate::config::RouteConfig, &String), GatewayError> {
        let cfg = &self.config;
        let r = cfg
            .routes
            .get(route)
            .ok_or_else(|| self.unknown_route(route))?;
        let model = r.tiers.get(tier).ok_or_else(|| GatewayError::UnknownTier {
            route: route.to_owned(),
            tier: tier.to_owned(),
            known: r.tiers.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        Ok((r, model))
    }

    /// The error for a route that is not configured.
    pub(crate) fn unknown_route(&self, route: &str) -> GatewayError {
        GatewayError::UnknownRoute {
            route: route.to_owned(),
            known: self.config.routes.keys().cloned().collect(),
        }
    }

    /// The context and per-rule snapshots a request with these attributes would be evaluated
    /// with right now (no reservation is made). For edge proxies that evaluate the policies
    /// themselves (the Envoy filters) and for debugging budgets.
    pub fn snapshot_for(&self, q: &SnapshotQuery) -> Result<SnapshotAnswer, GatewayError> {
        let cfg = &self.config;
        let (_, model) = self.route_model(&q.route_name, &q.model_tier)?;
        let priced = pricing::price_tokens(cfg, &q.route_name, q.tokens_in, q.max_tokens)
            .ok_or_else(|| self.unknown_route(&q.route_name))?;
        let policies = self.policies();
        let ns = policies.resolve(q.budget_namespace.as_deref());
        let ctx = RequestContext {
            request_id: format!("snap-{}", uuid::Uuid::now_v7().simple()),
            tenant_id: q.tenant_id.clone(),
            caller_id: q.caller_id.clone(),
            feature_id: q.feature_id.clone(),
            experiment_id: q.experiment_id.clone(),
            budget_namespace: policies.namespace_name(q.budget_namespace.as_deref()),
            route_name: q.route_name.clone(),
            requested_tier: q.model_tier.clone(),
            model: model.clone(),
            estimated_tokens_in: q.tokens_in,
            estimated_tokens_out: priced.tokens_out,
            estimated_cost_usd: priced
                .tier(&q.model_tier)
                .map_or(0.0, |t| t.estimated_cost_usd),
            tiers: priced.tiers.clone(),
            unix_time_ms: now_ms(),
        };
        let _view = self.view();
        let store = Arc::clone(&self.store.read());
        let source = LiveSnapshots {
            store: store.as_ref(),
            ledger: &self.ledger,
            own: None,
        };
        let rules = ns
            .map(|ns| {
                ns.rules()
                    .iter()
                    .map(|r| RuleSnapshot {
                        rule_id: r.id().to_owned(),
                        primitive: r.primitive().to_owned(),
                        settings: serde_json::from_str(r.settings_json())
                            .unwrap_or(serde_json::Value::Null),
                        snapshot: crate::policy::SnapshotSource::snapshot(&source, r, &ctx),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(SnapshotAnswer {
            namespace: ns.map(|n| n.name().to_owned()),
            policy_version: policies.version().to_owned(),
            request: ctx,
            rules,
        })
    }

    /// Price `inf` for evaluation: its route, every tier priced (input tokens counted with the
    /// requested model's tokenizer), the namespace it resolves to in `policies`, stamped now.
    pub(crate) fn price_request(
        &self,
        inf: &Inference,
        policies: &PolicySet,
        request_id: String,
    ) -> Result<PricedRequest<'_>, GatewayError> {
        let cfg = &self.config;
        let (route, model) = self.route_model(&inf.route_name, &inf.model_tier)?;
        let pairs: Vec<(String, String)> = inf
            .messages
            .iter()
            .map(|m| (m.role.clone(), m.content.clone()))
            .collect();
        let mut priced = pricing::price(cfg, &inf.route_name, &pairs, inf.max_tokens)
            .ok_or_else(|| self.unknown_route(&inf.route_name))?;
        self.calibrate(&mut priced, &pairs);
        let ctx = RequestContext {
            request_id,
            tenant_id: inf.tenant_id.clone(),
            caller_id: inf.caller_id.clone(),
            feature_id: inf.feature_id.clone(),
            experiment_id: inf.experiment_id.clone(),
            budget_namespace: policies.namespace_name(inf.budget_namespace.as_deref()),
            route_name: inf.route_name.clone(),
            requested_tier: inf.model_tier.clone(),
            model: model.clone(),
            estimated_tokens_in: self.tokens_in_estimate(&mut priced, model, &pairs),
            estimated_tokens_out: priced.tokens_out,
            estimated_cost_usd: priced
                .tier(&inf.model_tier)
                .map_or(0.0, |t| t.estimated_cost_usd),
            tiers: priced.tiers.clone(),
            unix_time_ms: now_ms(),
        };
        Ok(PricedRequest {
            ctx,
            route,
            priced,
            pairs,
        })
    }

    /// Input tokens `model` is expected to bill for `pairs`: the BPE count, corrected by what
    /// its provider billed before ([`pricing::Calibration`]).
    pub(crate) fn tokens_in_estimate(
        &self,
        priced: &mut pricing::Priced,
        model: &str,
        pairs: &[(String, String)],
    ) -> u32 {
        let counted = priced.tokens_in(&self.config, model, pairs);
        self.calibration.scale(model, counted)
    }

    /// Re-price every tier at its corrected input tokens (a no-op while no provider has
    /// billed more than was counted).
    fn calibrate(&self, priced: &mut pricing::Priced, pairs: &[(String, String)]) {
        let models: Vec<String> = priced.tiers.iter().map(|t| t.model.clone()).collect();
        if models.iter().all(|m| self.calibration.factor(m) <= 1.0) {
            return;
        }
        for (i, model) in models.iter().enumerate() {
            let tokens_in = self.tokens_in_estimate(priced, model, pairs);
            if let (Some(cfg), Some(t)) = (self.config.models.get(model), priced.tiers.get_mut(i)) {
                t.estimated_cost_usd = pricing::cost_usd(cfg, tokens_in, priced.tokens_out);
            }
        }
        priced
            .tiers
            .sort_by(|a, b| a.estimated_cost_usd.total_cmp(&b.estimated_cost_usd));
    }

    /// Learn from a provider's usage: it billed `billed` input tokens where `counted` were
    /// counted for `model`.
    pub(crate) fn observe_usage(&self, model: &str, billed: u32, counted: u32) {
        self.calibration.observe(model, billed, counted);
    }

    /// Write everything queued and close the logs. Requests after this fail as unlogged.
    pub fn shutdown(&self) {
        self.writer.shutdown();
    }
}

/// The longest window among `aggregates`, ms (at least a day), measured at `now_ms`: ledger
/// entries older than it count in no sum.
fn longest_window_ms(aggregates: &[llmscope_sdk::types::Aggregate], now_ms: u64) -> u64 {
    let now_us = i64::try_from(now_ms)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000);
    aggregates
        .iter()
        .map(|a| {
            let start = crate::engine::window_start_us(a.window, now_ms).0;
            u64::try_from(now_us.saturating_sub(start) / 1000).unwrap_or(0)
        })
        .fold(86_400_000, u64::max)
}
