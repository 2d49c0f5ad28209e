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
-- Added after the first release: a database written before it gains the column (NULL in its rows).
ALTER TABLE telemetry ADD COLUMN IF NOT EXISTS held_ms DOUBLE;
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use duckdb::arrow::array::{
        Array, ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray,
    };
    use duckdb::arrow::datatypes::{DataType, SchemaRef};
    use llmscope_wire::records::{parse_ts_us, DecisionRecord, ReservationRecord, TelemetryRecord};
    use serde_json::{Map, Value};

    use super::super::batch::{self, DECISION_SCHEMA, TELEMETRY_SCHEMA};
    use super::*;

    /// Columns named otherwise than the writer key they come from: (column, key).
    const DERIVED: [(&str, &str); 1] = [("ts_us", "timestamp")];
    /// Keys of a telemetry line that no column holds (`route` is read into `route_name` when
    /// that is absent).
    const TELEMETRY_NOT_INGESTED: [&str; 12] = [
        "audit_tags",
        "cost_source",
        "embeddings",
        "error_type",
        "fallback_reason",
        "route",
        "schema_version",
        "stream_cut_at_tokens",
        "streamed",
        "timed_out_cost_usd",
        "tokens_total",
        "use_case",
    ];
    /// Keys of a decision line that no column holds.
    const DECISION_NOT_INGESTED: [&str; 10] = [
        "alerts",
        "caller_id",
        "latency_ms",
        "policy_input",
        "policy_version",
        "reason",
        "reservation",
        "rules",
        "window_cost_usd",
        "window_limit_usd",
    ];

    /// A telemetry line with every key present and a distinct value in each.
    fn telemetry_line() -> String {
        let record = TelemetryRecord {
            schema_version: "schema_version".into(),
            timestamp: "2026-01-02T03:04:05.678Z".into(),
            request_id: "request_id".into(),
            tenant_id: "tenant_id".into(),
            caller_id: Some("caller_id".into()),
            feature_id: Some("feature_id".into()),
            use_case: Some("use_case".into()),
            experiment_id: Some("experiment_id".into()),
            budget_namespace: "budget_namespace".into(),
            audit_tags: Default::default(),
            route_name: "route_name".into(),
            route: "route".into(),
            requested_model_tier: "requested_model_tier".into(),
            model_tier: "model_tier".into(),
            provider: "provider".into(),
            model: "model".into(),
            tokens_in: 11,
            tokens_out: 12,
            tokens_total: 23,
            estimated_cost_usd: 0.25,
            cost_usd: 0.5,
            cost_source: "cost_source".into(),
            latency_ms: 7.5,
            held_ms: Some(8.5),
            status: "status".into(),
            finish_reason: Some("finish_reason".into()),
            is_fallback: true,
            fallback_reason: Some("fallback_reason".into()),
            error_type: Some("error_type".into()),
            policy_decision: "policy_decision".into(),
            policy_id: Some("policy_id".into()),
            timed_out_cost_usd: 0.125,
            streamed: true,
            stream_cut_at_tokens: Some(13),
            embeddings: true,
        };
        serde_json::to_string(&record).unwrap()
    }

    /// A decision line with every key present and a distinct value in each.
    fn decision_line() -> String {
        let record = DecisionRecord {
            timestamp: "2026-01-02T03:04:05.678Z".into(),
            request_id: "request_id".into(),
            tenant_id: "tenant_id".into(),
            caller_id: Some("caller_id".into()),
            feature_id: Some("feature_id".into()),
            experiment_id: Some("experiment_id".into()),
            budget_namespace: Some("budget_namespace".into()),
            route_name: "route_name".into(),
            requested_model_tier: "requested_model_tier".into(),
            effective_model_tier: "effective_model_tier".into(),
            primitive: Some("primitive".into()),
            decision: "decision".into(),
            reason: Some("reason".into()),
            policy_id: Some("policy_id".into()),
            estimated_cost_usd: 0.25,
            latency_ms: 7.5,
            window_cost_usd: Some(1.5),
            window_limit_usd: Some(2.5),
            policy_version: "policy_version".into(),
            reservation: Some(ReservationRecord {
                model: "m".into(),
                provider: "p".into(),
                cost_usd: 0.75,
                tokens_in: 1,
                tokens_out: 2,
            }),
            alerts: &[],
            rules: &[],
            policy_input: Some(llmscope_wire::records::PolicyInput {
                model: "m".into(),
                estimated_tokens_in: 3,
                estimated_tokens_out: 4,
                tiers: Vec::new(),
            }),
        };
        serde_json::to_string(&record).unwrap()
    }

    fn cell(column: &ArrayRef) -> Value {
        if column.is_null(0) {
            return Value::Null;
        }
        let any = column.as_any();
        match column.data_type() {
            DataType::Int64 => any.downcast_ref::<Int64Array>().unwrap().value(0).into(),
            DataType::Float64 => any.downcast_ref::<Float64Array>().unwrap().value(0).into(),
            DataType::Boolean => any.downcast_ref::<BooleanArray>().unwrap().value(0).into(),
            DataType::Utf8 => any.downcast_ref::<StringArray>().unwrap().value(0).into(),
            other => panic!("no test for Arrow type {other}"),
        }
    }

    #[test]
    fn arrow_schemas_match_the_tables_column_for_column() {
        let conn = duckdb::Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        for (table, schema) in [
            ("telemetry", &*TELEMETRY_SCHEMA),
            ("decisions", &*DECISION_SCHEMA),
        ] {
            let mut stmt = conn
                .prepare(
                    "SELECT column_name, data_type FROM information_schema.columns \
                     WHERE table_name = ? ORDER BY ordinal_position",
                )
                .unwrap();
            let columns: Vec<(String, String)> = stmt
                .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let arrow: Vec<(String, String)> = schema
                .fields()
                .iter()
                .map(|f| {
                    let sql = match f.data_type() {
                        DataType::Int64 => "BIGINT",
                        DataType::Float64 => "DOUBLE",
                        DataType::Boolean => "BOOLEAN",
                        _ => "VARCHAR",
                    };
                    (f.name().clone(), sql.to_owned())
                })
                .collect();
            assert_eq!(arrow, columns, "{table}");
        }
    }

    /// Write a record, read it back into a row of its table: every column holds the value of
    /// the writer key it comes from, and every writer key is a column or listed as not
    /// ingested.
    #[test]
    fn every_column_comes_from_a_writer_key() {
        let cases: [(Kind, String, &SchemaRef, &[&str]); 2] = [
            (
                Kind::Telemetry,
                telemetry_line(),
                &*TELEMETRY_SCHEMA,
                &TELEMETRY_NOT_INGESTED,
            ),
            (
                Kind::Decisions,
                decision_line(),
                &*DECISION_SCHEMA,
                &DECISION_NOT_INGESTED,
            ),
        ];
        for (kind, line, schema, not_ingested) in cases {
            let table = kind.key();
            let written: Map<String, Value> = serde_json::from_str(&line).unwrap();
            let parsed = batch::parse(kind, format!("{line}\n").as_bytes(), 0, 1);
            let [part] = parsed.as_slice() else {
                panic!("{table}: one part expected");
            };
            assert!(part.malformed.is_empty(), "{table}: {:?}", part.malformed);
            assert_eq!(part.batch.num_rows(), 1, "{table}");
            assert_eq!(part.batch.schema(), *schema, "{table}");
            let mut mapped = BTreeSet::new();
            for (field, column) in schema.fields().iter().zip(part.batch.columns()) {
                let name = field.name().as_str();
                let key = DERIVED
                    .iter()
                    .find(|(c, _)| *c == name)
                    .map_or(name, |(_, k)| *k);
                let Some(value) = written.get(key) else {
                    panic!("{table}.{name}: the writer has no key `{key}`");
                };
                let expected = match name {
                    "ts_us" => parse_ts_us(value.as_str().unwrap()).unwrap().into(),
                    _ => value.clone(),
                };
                assert_eq!(cell(column), expected, "{table}.{name} from `{key}`");
                mapped.insert(key);
            }
            for key in not_ingested {
                assert!(
                    !mapped.contains(key),
                    "{table}: `{key}` is a column; take it off the not-ingested list"
                );
            }
            let keys: BTreeSet<&str> = written.keys().map(String::as_str).collect();
            let expected: BTreeSet<&str> = mapped.iter().chain(not_ingested).copied().collect();
            assert_eq!(
                keys, expected,
                "{table}: each writer key is a column or listed as not ingested"
            );
        }
    }
}
