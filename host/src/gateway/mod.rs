//! The gateway: shared state (policies, providers, ledger, logs, engine), start-up and the
//! accessors the HTTP layer reads. Each idea of the request path has its own file: pricing a
//! request (`price.rs`), the snapshot a request would see (`snapshot.rs`), the refresh that
//! publishes aggregates and reload (`refresh.rs`), the lifecycle's stages (`lifecycle.rs`, then
//! `dispatch.rs` and `settle.rs`; a streamed request's in `stream.rs`, its forwarding in
//! `pump.rs`), its log lines (`records.rs`), crash recovery
//! (`recovery.rs`), the edge control plane (`edge/`) and the error types (`error.rs`).
//! Transport-independent: the HTTP layer ([`crate::http`]) turns requests into [`Inference`] and
//! [`Outcome`]s into responses.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;

use crate::artifacts::ArtifactWriter;
use crate::config::GatewayConfig;
use crate::engine::{PublishedAggregates, SpendEngine};
use crate::ledger::Ledger;
use crate::metrics::{Family, Kind, Metrics};
use crate::policy::{Evaluation, PolicyRuntime, PolicySet};
use crate::pricing;
use crate::providers::{Completion, Provider};
use crate::shared::SharedBudgets;
use crate::snapshots::{AggregateStore, NoHistory};

pub use llmscope_wire::requests::Inference;

pub mod budgets;
mod dispatch;
pub mod edge;
mod error;
mod lifecycle;
mod price;
mod pump;
mod records;
mod recovery;
mod refresh;
mod settle;
mod snapshot;
mod stream;

pub use error::{GatewayError, StartError};
pub(crate) use price::PricedRequest;
pub use pump::StreamItem;
pub use records::{CostSource, Status};
pub use snapshot::{RuleSnapshot, SnapshotAnswer, SnapshotQuery};
pub use stream::{StreamHead, StreamStart};

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
    /// The vectors, in input order, when it was an embeddings call.
    pub embeddings: Option<Vec<crate::providers::Vector>>,
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

/// Shared gateway state.
pub struct Gateway {
    config: GatewayConfig,
    runtime: Arc<PolicyRuntime>,
    policies: RwLock<Arc<PolicySet>>,
    providers: BTreeMap<String, Provider>,
    ledger: Ledger,
    /// The replicas' shared budget store (`budgets: {backend: redis}`).
    shared: Option<Arc<SharedBudgets>>,
    /// Alerts raised once per rule, scope and period, and their webhooks.
    alerts: crate::alerts::Alerts,
    store: RwLock<Arc<dyn AggregateStore>>,
    writer: ArtifactWriter,
    engine: SpendEngine,
    metrics: Metrics,
    started: Instant,
    edge: edge::state::EdgeState,
    /// How long an edge reservation waits for its report before it is counted at its estimate
    /// ([`EDGE_RESERVATION_TTL`](edge::EDGE_RESERVATION_TTL); tests shorten it with
    /// `LLMSCOPE_EDGE_RESERVATION_TTL_MS`).
    edge_ttl: std::time::Duration,
    /// SHA-256 of each configured API key, in `config.api_keys` order.
    key_digests: Vec<[u8; 32]>,
    /// Requests inside [`Gateway::handle`] right now.
    in_flight: std::sync::atomic::AtomicU64,
    /// Held from ingestion to the ledger drop of a refresh (and across a reload's swap), so
    /// what the ledger drops is exactly what the published aggregates gained.
    refresh_lock: parking_lot::Mutex<()>,
    /// When the aggregates were last computed, and which: an idle gateway (see
    /// `Gateway::idle` in `refresh.rs`) recomputes them every [`refresh::IDLE_COMPUTE`]
    /// instead of every pass.
    last_compute: parking_lot::Mutex<Option<(Instant, Arc<PublishedAggregates>)>>,
    /// Rows a question's ingestion put into DuckDB that no published aggregate counts yet.
    unpublished_rows: std::sync::atomic::AtomicBool,
    /// Positions ingested by passes outside a refresh (a question's ingest), which the next
    /// refresh's ledger drop must include: a rotated file drained there is not reported again.
    ingested_elsewhere: parking_lot::Mutex<Vec<crate::artifacts::LogPosition>>,
    /// Input-token estimates corrected by what providers billed.
    calibration: pricing::Calibration,
    /// Read by snapshot assembly, written by a refresh's publish + ledger drop.
    view: RwLock<()>,
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

/// Milliseconds (µs precision) from `unix_time_ms` (a request's logged time) to now: how long
/// its reservation has been held, for the telemetry line's `held_ms`.
pub(crate) fn held_ms_since(unix_time_ms: u64) -> f64 {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let held_us = now_us.saturating_sub(u128::from(unix_time_ms) * 1000);
    held_us as f64 / 1e3
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
        let ledger = Ledger::default();
        let shared = match &config.budgets {
            llmscope_wire::budgets::BudgetsConfig::Local => None,
            llmscope_wire::budgets::BudgetsConfig::Redis(r) => {
                let s = SharedBudgets::new(r).map_err(StartError::SharedBudgets)?;
                ledger.share_with(Arc::clone(&s));
                Some(s)
            }
        };
        let alerts = crate::alerts::Alerts::open(&config.alerts_path, &config.webhooks, now_ms())
            .map_err(|e| {
            StartError::Alerts(format!("{}: {e}", config.alerts_path.display()))
        })?;
        let gateway = Arc::new(Self {
            config,
            runtime,
            policies: RwLock::new(Arc::new(policies)),
            providers,
            ledger,
            shared,
            alerts,
            store: RwLock::new(Arc::new(NoHistory)),
            writer,
            engine,
            metrics: Metrics::default(),
            started: Instant::now(),
            key_digests,
            in_flight: std::sync::atomic::AtomicU64::new(0),
            refresh_lock: parking_lot::Mutex::new(()),
            last_compute: parking_lot::Mutex::new(None),
            unpublished_rows: std::sync::atomic::AtomicBool::new(false),
            ingested_elsewhere: parking_lot::Mutex::new(Vec::new()),
            calibration,
            view: RwLock::new(()),
            edge: edge::state::EdgeState::default(),
            edge_ttl: env("LLMSCOPE_EDGE_RESERVATION_TTL_MS")
                .and_then(|v| v.parse().ok())
                .map_or(edge::EDGE_RESERVATION_TTL, std::time::Duration::from_millis),
        });
        // A crash leaves decisions written ahead without telemetry: record them at their
        // estimate before the first refresh, so budgets start conservative.
        gateway.recover_unanswered()?;
        gateway.recover_reported()?;
        // Budgets see history from the first request on.
        gateway.refresh()?;
        if let Some(s) = &gateway.shared {
            s.spawn();
        }
        gateway.alerts.spawn();
        if warm.join().is_err() {
            tracing::warn!("warming the tokenizers failed; the first request will build them");
        }
        Ok(gateway)
    }

    /// Alerts.
    pub fn alerts(&self) -> &crate::alerts::Alerts {
        &self.alerts
    }

    /// The replicas' shared budget store, with the redis backend.
    pub fn shared(&self) -> Option<&SharedBudgets> {
        self.shared.as_deref()
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

    /// The gateway's state as metric families beside [`Metrics`]' counters: gauges (logs
    /// writable, requests in flight, ledger, rules, pending edge reservations, uptime), the
    /// shared budget store's (when configured) and the alerts'.
    pub fn status_families(&self) -> Vec<Family> {
        let (buckets, settled) = self.ledger().len();
        let gauge = |name, help, value| Family::one(name, Kind::Gauge, help, value);
        let mut out = vec![
            gauge(
                "llmscope_logs_writable",
                "1 when the last log write succeeded.",
                if self.logs_healthy() { 1.0 } else { 0.0 },
            ),
            gauge(
                "llmscope_requests_in_flight",
                "Requests being handled (policy, provider call, logging).",
                self.in_flight() as f64,
            ),
            gauge(
                "llmscope_ledger_buckets",
                "Dimension tuples with in-flight or unsettled money.",
                buckets as f64,
            ),
            gauge(
                "llmscope_ledger_settled_pending",
                "Settled requests not yet ingested.",
                settled as f64,
            ),
            gauge(
                "llmscope_policy_rules",
                "Rules loaded.",
                self.policies().rules().count() as f64,
            ),
            gauge(
                "llmscope_edge_reservations_pending",
                "Envoy-filter requests reserved and waiting for their report.",
                self.edge().pending() as f64,
            ),
            gauge(
                "llmscope_uptime_seconds",
                "Seconds since start.",
                self.uptime_s(),
            ),
        ];
        if let Some(s) = self.shared().map(|s| s.status()) {
            out.push(gauge(
                "llmscope_shared_budgets_up",
                "1 when the last call to the shared budget store (Redis) succeeded.",
                f64::from(u8::from(s.reachable)),
            ));
            out.push(Family::one(
                "llmscope_shared_budgets_errors_total",
                Kind::Counter,
                "Calls to the shared budget store that failed or timed out.",
                s.errors as f64,
            ));
            out.push(gauge(
                "llmscope_shared_budgets_keys",
                "Budget keys this replica holds money in.",
                s.keys as f64,
            ));
        }
        out.extend(self.alerts().families());
        out.extend(crate::otel::families());
        out
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
    pub fn edge(&self) -> &edge::state::EdgeState {
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

    /// Write everything queued and close the logs. Requests after this fail as unlogged.
    pub fn shutdown(&self) {
        self.writer.shutdown();
    }
}
