//! The request lifecycle: price → reserve → evaluate → deny | (downgrade →) dispatch with
//! fallbacks → settle → append telemetry and decision → answer. Transport-independent: the HTTP
//! layer (`server`) turns requests into [`Inference`] and [`Outcome`]s into responses.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use llmscope_sdk::types::RequestContext;
use parking_lot::RwLock;

use crate::artifacts::{rfc3339, ArtifactWriter, DecisionRecord, TelemetryRecord, WriteError};
use crate::config::GatewayConfig;
use crate::engine::{declared_aggregates, EngineError, IngestReport, SpendEngine};
use crate::ledger::{AggregateStore, Dims, Ledger, LiveSnapshots, NoHistory, Sums};
use crate::metrics::Metrics;
use crate::policy::{ConfigError, DecisionKind, Evaluation, PolicyRuntime, PolicySet};
use crate::pricing;
use crate::providers::{Completion, CompletionRequest, Provider, ProviderError};

pub use llmscope_wire::requests::Inference;

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
    #[error("unknown route `{route}`; known routes: {known}")]
    UnknownRoute {
        /// Asked for.
        route: String,
        /// Configured routes.
        known: String,
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
    pub(crate) edge: crate::edge::EdgeState,
    /// SHA-256 of each configured API key, in `config.api_keys` order.
    key_digests: Vec<[u8; 32]>,
    /// Requests inside [`Gateway::handle`] right now.
    in_flight: std::sync::atomic::AtomicU64,
}

/// Counts a request in [`Gateway::handle`] until dropped (also when the client goes away and
/// the request's future is dropped).
struct InFlight<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a std::sync::atomic::AtomicU64) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
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
            edge: crate::edge::EdgeState::default(),
        });
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
        let started = Instant::now();
        let report = self.engine.ingest()?;
        let edge = self.edge.aggregates();
        let aggregates = declared_aggregates(self.policies().rules(), &edge);
        let published = self.engine.compute(&aggregates, now_ms())?;
        let expired = self.edge.expire(crate::edge::EDGE_RESERVATION_TTL);
        if expired > 0 {
            tracing::warn!(
                expired,
                "edge reservations released without a report (proxy gone?)"
            );
        }
        self.publish_aggregates(Arc::new(published));
        self.ledger.ingested_through(report.telemetry_offset);
        self.metrics.refresh(
            started.elapsed().as_secs_f64(),
            report.telemetry_rows + report.decision_rows,
            report.malformed.len() as u64,
        );
        Ok(report)
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
    pub fn edge(&self) -> &crate::edge::EdgeState {
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
    pub fn reload_policies(&self) -> Result<Arc<PolicySet>, ConfigError> {
        match PolicySet::load(
            &self.config.policy_file,
            &self.config.policies_dir,
            &self.runtime,
        ) {
            Ok(set) => {
                let set = Arc::new(set);
                *self.policies.write() = Arc::clone(&set);
                self.metrics.reload("ok");
                // New rules may declare new aggregates: publish them now, not at the next tick.
                if let Err(e) = self.refresh() {
                    tracing::error!(error = %e, "aggregate refresh after reload failed");
                }
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
            known: self
                .config
                .routes
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
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
            estimated_tokens_in: priced.tokens_in(cfg, model, &pairs),
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

    /// Process one request through the whole lifecycle.
    pub async fn handle(&self, inf: Inference) -> Result<Outcome, GatewayError> {
        let _in_flight = InFlight::enter(&self.in_flight);
        let cfg = &self.config;
        let request_id = format!("req-{}", uuid::Uuid::now_v7().simple());
        let policies = self.policies();
        let PricedRequest {
            ctx,
            route,
            mut priced,
            pairs,
        } = self.price_request(&inf, &policies, request_id.clone())?;
        let requested_model = &ctx.model;
        let unix_ms = ctx.unix_time_ms;
        let requested_estimate = ctx.estimated_cost_usd;
        let tokens_in_requested = ctx.estimated_tokens_in;

        // Reserve first, so concurrent requests see each other; evaluate against aggregates +
        // ledger minus this request's own reservation.
        let dims = Dims::of(&ctx);
        let mut reservation = self.ledger.reserve(
            dims.clone(),
            requested_estimate,
            tokens_in_requested,
            priced.tokens_out,
        );
        let eval_started = Instant::now();
        let evaluation = {
            let store = Arc::clone(&self.store.read());
            let source = LiveSnapshots {
                store: store.as_ref(),
                ledger: &self.ledger,
                own: Some((&dims, reservation.amount())),
            };
            policies.evaluate(&ctx, &source)
        };
        let policy_ms = eval_started.elapsed().as_secs_f64() * 1e3;
        let errors: Vec<&str> = evaluation
            .rules
            .iter()
            .filter(|r| r.error.is_some())
            .map(|r| r.rule_id.as_str())
            .collect();
        self.metrics.policy_eval(policy_ms / 1e3, &errors);

        let effective_tier = match (&evaluation.decision, &evaluation.downgrade_to) {
            (DecisionKind::Downgrade, Some(tier)) => tier.clone(),
            _ => inf.model_tier.clone(),
        };
        let mut telemetry = TelemetryRecord {
            model_tier: effective_tier.clone(),
            provider: cfg
                .models
                .get(requested_model)
                .map(|m| m.provider.clone())
                .unwrap_or_default(),
            policy_decision: evaluation.decision.as_str().into(),
            policy_id: evaluation.policy_id.clone(),
            ..TelemetryRecord::for_request(&ctx)
        };
        let decision = DecisionRecord {
            timestamp: rfc3339(unix_ms),
            request_id: request_id.clone(),
            tenant_id: inf.tenant_id.clone(),
            caller_id: inf.caller_id.clone(),
            feature_id: inf.feature_id.clone(),
            experiment_id: inf.experiment_id.clone(),
            budget_namespace: evaluation.namespace.clone(),
            route_name: inf.route_name.clone(),
            requested_model_tier: inf.model_tier.clone(),
            effective_model_tier: effective_tier.clone(),
            primitive: evaluation.primitive.clone(),
            decision: evaluation.decision.as_str().into(),
            reason: evaluation.reason.clone(),
            policy_id: evaluation.policy_id.clone(),
            estimated_cost_usd: requested_estimate,
            latency_ms: (policy_ms * 1000.0).round() / 1000.0,
            window_cost_usd: evaluation.fact("window_cost_usd"),
            window_limit_usd: evaluation.fact("window_limit_usd"),
            policy_version: policies.version().to_owned(),
            alerts: &evaluation.alerts,
            rules: &evaluation.rules,
        };
        drop(policies);

        if evaluation.decision == DecisionKind::Deny {
            drop(reservation);
            telemetry.estimated_cost_usd = requested_estimate;
            telemetry.tokens_in = u64::from(tokens_in_requested);
            telemetry.tokens_total = telemetry.tokens_in;
            telemetry.status = "denied".into();
            telemetry.cost_source = "none".into();
            self.metrics
                .request(&inf.route_name, "deny", requested_estimate, 0.0);
            match self.writer.append(&telemetry, Some(&decision)).await {
                Ok(_) => {}
                Err(e) if cfg.reject_unlogged => return Err(GatewayError::Unlogged(e)),
                Err(e) => tracing::error!(error = %e, "denial served unlogged"),
            }
            return Ok(Outcome::Denied {
                request_id,
                evaluation,
            });
        }

        // Re-price at the effective tier.
        let model_name = route
            .tiers
            .get(&effective_tier)
            .unwrap_or(requested_model)
            .clone();
        let tokens_in_est = priced.tokens_in(cfg, &model_name, &pairs);
        let estimate = priced
            .tier(&effective_tier)
            .map_or(requested_estimate, |t| t.estimated_cost_usd);
        if model_name != *requested_model {
            let mut moved = dims.clone();
            moved.model = model_name.clone();
            reservation.update(moved, estimate, tokens_in_est, priced.tokens_out);
        }
        telemetry.estimated_cost_usd = estimate;
        telemetry.model_tier = effective_tier.clone();

        // Dispatch along the fallback chain.
        let chain: Vec<String> = std::iter::once(model_name.clone())
            .chain(
                cfg.models
                    .get(&model_name)
                    .map(|m| m.fallback.clone())
                    .unwrap_or_default(),
            )
            .collect();
        let mut failures = Vec::new();
        let mut answered = None;
        let dispatch_started = Instant::now();
        for (i, candidate) in chain.iter().enumerate() {
            let Some(model_cfg) = cfg.models.get(candidate) else {
                continue;
            };
            let Some(provider) = self.providers.get(&model_cfg.provider) else {
                continue;
            };
            let req = CompletionRequest {
                model: model_cfg
                    .provider_model
                    .clone()
                    .unwrap_or_else(|| candidate.clone()),
                messages: inf.messages.clone(),
                max_tokens: priced.tokens_out,
                temperature: inf.temperature,
                request_id: request_id.clone(),
            };
            match provider.complete(&req).await {
                Ok((completion, _attempts)) => {
                    answered = Some((i, candidate.clone(), model_cfg, completion));
                    break;
                }
                Err(e) => {
                    self.metrics.provider_error(&model_cfg.provider, e.kind());
                    tracing::warn!(model = %candidate, provider = %model_cfg.provider, error = %e, "provider call failed");
                    failures.push((candidate.clone(), model_cfg.provider.clone(), e));
                }
            }
        }
        let latency_ms = (dispatch_started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        telemetry.latency_ms = latency_ms;
        let fallback_reason = (!failures.is_empty()).then(|| {
            failures
                .iter()
                .map(|(m, _, e)| format!("{m}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        });
        telemetry.fallback_reason = fallback_reason.clone();

        let Some((index, model, model_cfg, completion)) = answered else {
            drop(reservation);
            let last = failures.last();
            telemetry.status = "error".into();
            telemetry.cost_source = "none".into();
            telemetry.model = model_name.clone();
            telemetry.error_type = last.map(|(_, _, e)| e.kind().to_owned());
            self.metrics
                .request(&inf.route_name, "error", estimate, 0.0);
            let summary =
                fallback_reason.unwrap_or_else(|| "no provider configured for the model".into());
            if let Err(e) = self.writer.append(&telemetry, Some(&decision)).await {
                tracing::error!(error = %e, "provider failure not logged");
            }
            return Err(GatewayError::ProvidersFailed(summary));
        };

        // Settle at the provider's usage when reported, else at our counts.
        let tokens_in = match completion.tokens_in {
            Some(n) => n,
            None => priced.tokens_in(cfg, &model, &pairs),
        };
        let tokens_out = completion.tokens_out.unwrap_or(priced.tokens_out);
        let cost = pricing::cost_usd(model_cfg, tokens_in, tokens_out);
        let from_provider = completion.tokens_in.is_some() && completion.tokens_out.is_some();
        telemetry.provider = model_cfg.provider.clone();
        telemetry.model = model.clone();
        telemetry.tokens_in = u64::from(tokens_in);
        telemetry.tokens_out = u64::from(tokens_out);
        telemetry.tokens_total = u64::from(tokens_in) + u64::from(tokens_out);
        telemetry.cost_usd = cost;
        telemetry.cost_source = if from_provider {
            "provider_usage"
        } else {
            "tokenizer"
        }
        .into();
        telemetry.status = "ok".into();
        telemetry.finish_reason = Some(completion.finish_reason.clone());
        telemetry.is_fallback = index > 0;
        if index > 0 {
            self.metrics.fallback(&inf.route_name);
        }
        self.metrics.request(
            &inf.route_name,
            evaluation.decision.as_str(),
            estimate,
            cost,
        );
        let actual = Sums {
            cost_usd: cost,
            tokens_in: f64::from(tokens_in),
            tokens_out: f64::from(tokens_out),
            requests: 1.0,
        };
        match self.writer.append(&telemetry, Some(&decision)).await {
            Ok(w) => reservation.settle(actual, Some(w.telemetry_end)),
            Err(e) => {
                reservation.settle(actual, None);
                if cfg.reject_unlogged {
                    return Err(GatewayError::Unlogged(e));
                }
                tracing::error!(error = %e, "request served unlogged");
            }
        }
        Ok(Outcome::Served(Box::new(Served {
            request_id,
            completion,
            model,
            provider: model_cfg.provider.clone(),
            effective_tier,
            estimated_cost_usd: estimate,
            cost_usd: cost,
            tokens_in,
            tokens_out,
            is_fallback: index > 0,
            evaluation,
        })))
    }

    /// Write everything queued and close the logs. Requests after this fail as unlogged.
    pub fn shutdown(&self) {
        self.writer.shutdown();
    }
}
