//! The engine's tables: `telemetry` and `decisions`, one row per log line, and
//! `llmscope_ingest`, each log's cursor. Each table column is declared here (SQL) and in
//! `batch.rs` (Arrow, filled from [`llmscope_wire::records::read`]'s rows), and comes from a key
//! the writer serializes ([`llmscope_wire::records::write`]): the tests below check that the
//! three agree, column for column.
//!
//! Every column is the writer key of the same name, except `ts_us` (both tables): `timestamp`
//! as µs since the epoch, UTC. Telemetry's `route_name` falls back to the older `route` key when
//! a line has no `route_name`.

/// The tables, created when missing.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS telemetry (
    ts_us BIGINT NOT NULL, request_id VARCHAR, tenant_id VARCHAR, caller_id VARCHAR,
    feature_id VARCHAR, experiment_id VARCHAR, budget_namespace VARCHAR, route_name VARCHAR,
    requested_model_tier VARCHAR, model_tier VARCHAR, provider VARCHAR, model VARCHAR,
    tokens_in BIGINT, tokens_out BIGINT, estimated_cost_usd DOUBLE, cost_usd DOUBLE,
    latency_ms DOUBLE, status VARCHAR, finish_reason VARCHAR, is_fallback BOOLEAN,
    policy_decision VARCHAR, policy_id VARCHAR);
CREATE TABLE IF NOT EXISTS decisions (
    ts_us BIGINT NOT NULL, request_id VARCHAR, tenant_id VARCHAR, feature_id VARCHAR,
    experiment_id VARCHAR, budget_namespace VARCHAR, route_name VARCHAR, decision VARCHAR,
    policy_id VARCHAR, primitive VARCHAR, estimated_cost_usd DOUBLE,
    requested_model_tier VARCHAR, effective_model_tier VARCHAR);
CREATE TABLE IF NOT EXISTS llmscope_ingest (
    file VARCHAR PRIMARY KEY, offset_bytes BIGINT NOT NULL, head VARCHAR NOT NULL, malformed BIGINT NOT NULL);
";

/// Which log a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `telemetry.jsonl`.
    Telemetry,
    /// `policy_decisions.jsonl`.
    Decisions,
}

impl Kind {
    /// The log's table, and its row in `llmscope_ingest`.
    pub(super) fn key(self) -> &'static str {
        match self {
            Self::Telemetry => "telemetry",
            Self::Decisions => "decisions",
        }
    }
}
