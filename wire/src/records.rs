//! The JSONL log records, side by side: as the gateway writes them ([`write`]: the telemetry
//! and decision lines) and as the analytics engine reads them back ([`read`]: lenient where
//! older records lack a field, strict about what every record must carry). The tables the
//! engine fills from them are the host's (`engine/schema.rs`), whose tests check that the
//! writer's keys, the SQL columns and the Arrow columns agree column for column.

pub mod read;
pub mod write;

pub use read::{
    parse_decision, parse_telemetry, parse_ts_us, DecisionLine, DecisionRow, TelemetryRow,
};
pub use write::{
    rfc3339, AuditTags, DecisionRecord, PolicyInput, ReservationRecord, RuleRecord,
    TelemetryRecord, TELEMETRY_SCHEMA_VERSION,
};
