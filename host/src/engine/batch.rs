//! Log lines → Arrow record batches for the DuckDB appender.
//!
//! A read of complete lines is split at line boundaries into one part per core; each part is
//! parsed on its own thread into columns, and the parts come back in file order, so rows are
//! appended in the order they were written and every malformed line keeps its byte offset.
//! JSON parsing is most of ingestion's cost; the columnar append is a fraction of the row-wise one.

use std::sync::{Arc, LazyLock};

use duckdb::arrow::array::{ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder};
use duckdb::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use duckdb::arrow::error::ArrowError;
use duckdb::arrow::record_batch::RecordBatch;
use llmscope_wire::records::{parse_decision, parse_telemetry};

use super::schema::Kind;

/// Below this many bytes a read is parsed on the calling thread: spawning costs more.
const PARALLEL_MIN_BYTES: usize = 256 << 10;

/// A line that is not a record of its log.
#[derive(Debug)]
pub(super) struct Malformed {
    /// Byte offset of the line in its file.
    pub offset: u64,
    /// Why it was skipped.
    pub why: String,
}

/// One part of a read, parsed.
pub(super) struct Parsed {
    /// The part's records, in file order, columns in table order.
    pub batch: RecordBatch,
    /// The part's malformed lines, in file order.
    pub malformed: Vec<Malformed>,
}

/// Parse the complete lines in `data`, which starts at byte `offset` of its file, into batches
/// in file order, on up to `threads` threads.
pub(super) fn parse(kind: Kind, data: &[u8], offset: u64, threads: usize) -> Vec<Parsed> {
    let parts = split(data, threads);
    if parts.len() == 1 {
        return vec![parse_part(kind, data, offset)];
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .iter()
            .map(|&(start, part)| s.spawn(move || parse_part(kind, part, offset + start as u64)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// Worker threads for ingestion: the machine's cores, at most 8.
pub(super) fn threads() -> usize {
    static THREADS: LazyLock<usize> =
        LazyLock::new(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(8)));
    *THREADS
}

/// `data` (complete lines) cut into up to `n` parts of similar size at line ends, with each
/// part's start index.
fn split(data: &[u8], n: usize) -> Vec<(usize, &[u8])> {
    if n <= 1 || data.len() < PARALLEL_MIN_BYTES {
        return vec![(0, data)];
    }
    let mut parts = Vec::with_capacity(n);
    let mut start = 0;
    for i in 1..n {
        let target = (data.len() * i / n).max(start);
        let Some(nl) = data[target..].iter().position(|b| *b == b'\n') else {
            break;
        };
        let end = target + nl + 1;
        if end > start && end < data.len() {
            parts.push((start, &data[start..end]));
            start = end;
        }
    }
    parts.push((start, &data[start..]));
    parts
}

fn parse_part(kind: Kind, data: &[u8], offset: u64) -> Parsed {
    let mut columns = match kind {
        Kind::Telemetry => Columns::Telemetry(Box::default()),
        Kind::Decisions => Columns::Decisions(Box::default()),
    };
    let mut malformed = Vec::new();
    let mut at = offset;
    for piece in data.split_inclusive(|b| *b == b'\n') {
        let this = at;
        at += piece.len() as u64;
        let line = piece.strip_suffix(b"\n").unwrap_or(piece);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Err(why) = columns.push(line) {
            malformed.push(Malformed { offset: this, why });
        }
    }
    Parsed {
        batch: columns.finish(),
        malformed,
    }
}

enum Columns {
    Telemetry(Box<TelemetryColumns>),
    Decisions(Box<DecisionColumns>),
}

impl Columns {
    fn push(&mut self, line: &[u8]) -> Result<(), String> {
        match self {
            Self::Telemetry(c) => c.push(line),
            Self::Decisions(c) => c.push(line),
        }
    }

    fn finish(self) -> RecordBatch {
        let (schema, columns) = match self {
            Self::Telemetry(mut c) => (&*TELEMETRY_SCHEMA, c.finish()),
            Self::Decisions(mut c) => (&*DECISION_SCHEMA, c.finish()),
        };
        RecordBatch::try_new(Arc::clone(schema), columns)
            .unwrap_or_else(|e: ArrowError| unreachable!("columns match their schema: {e}"))
    }
}

fn schema(columns: &[(&str, DataType)]) -> SchemaRef {
    Arc::new(Schema::new(
        columns
            .iter()
            .map(|(name, ty)| Field::new(*name, ty.clone(), true))
            .collect::<Vec<_>>(),
    ))
}

/// A table's column builders, their Arrow schema and `finish`, from one list in table order.
macro_rules! columns {
    ($(#[$doc:meta])* $name:ident, $schema:ident {
        $($column:ident: $builder:ident => $ty:ident),* $(,)?
    }) => {
        $(#[$doc])*
        #[derive(Default)]
        struct $name {
            $($column: $builder,)*
        }

        impl $name {
            fn finish(&mut self) -> Vec<ArrayRef> {
                vec![$(Arc::new(self.$column.finish()) as ArrayRef),*]
            }
        }

        /// The Arrow schema of the batches, in table order.
        pub(super) static $schema: LazyLock<SchemaRef> =
            LazyLock::new(|| schema(&[$((stringify!($column), DataType::$ty)),*]));
    };
}

columns!(
    /// The `telemetry` table's columns.
    TelemetryColumns, TELEMETRY_SCHEMA {
    ts_us: Int64Builder => Int64,
    request_id: StringBuilder => Utf8,
    tenant_id: StringBuilder => Utf8,
    caller_id: StringBuilder => Utf8,
    feature_id: StringBuilder => Utf8,
    experiment_id: StringBuilder => Utf8,
    budget_namespace: StringBuilder => Utf8,
    route_name: StringBuilder => Utf8,
    requested_model_tier: StringBuilder => Utf8,
    model_tier: StringBuilder => Utf8,
    provider: StringBuilder => Utf8,
    model: StringBuilder => Utf8,
    tokens_in: Int64Builder => Int64,
    tokens_out: Int64Builder => Int64,
    estimated_cost_usd: Float64Builder => Float64,
    cost_usd: Float64Builder => Float64,
    latency_ms: Float64Builder => Float64,
    status: StringBuilder => Utf8,
    finish_reason: StringBuilder => Utf8,
    is_fallback: BooleanBuilder => Boolean,
    policy_decision: StringBuilder => Utf8,
    policy_id: StringBuilder => Utf8,
    held_ms: Float64Builder => Float64,
});

columns!(
    /// The `decisions` table's columns.
    DecisionColumns, DECISION_SCHEMA {
    ts_us: Int64Builder => Int64,
    request_id: StringBuilder => Utf8,
    tenant_id: StringBuilder => Utf8,
    feature_id: StringBuilder => Utf8,
    experiment_id: StringBuilder => Utf8,
    budget_namespace: StringBuilder => Utf8,
    route_name: StringBuilder => Utf8,
    decision: StringBuilder => Utf8,
    policy_id: StringBuilder => Utf8,
    primitive: StringBuilder => Utf8,
    estimated_cost_usd: Float64Builder => Float64,
    requested_model_tier: StringBuilder => Utf8,
    effective_model_tier: StringBuilder => Utf8,
});

impl TelemetryColumns {
    fn push(&mut self, line: &[u8]) -> Result<(), String> {
        let (ts_us, r) = parse_telemetry(line)?;
        self.ts_us.append_value(ts_us);
        self.request_id.append_option(r.request_id);
        self.tenant_id.append_value(r.tenant_id);
        self.caller_id.append_option(r.caller_id);
        self.feature_id.append_option(r.feature_id);
        self.experiment_id.append_option(r.experiment_id);
        self.budget_namespace.append_option(r.budget_namespace);
        self.route_name.append_option(r.route_name);
        self.requested_model_tier
            .append_option(r.requested_model_tier);
        self.model_tier.append_option(r.model_tier);
        self.provider.append_option(r.provider);
        self.model.append_option(r.model);
        self.tokens_in.append_option(r.tokens_in);
        self.tokens_out.append_option(r.tokens_out);
        self.estimated_cost_usd.append_option(r.estimated_cost_usd);
        self.cost_usd.append_value(r.cost_usd);
        self.latency_ms.append_option(r.latency_ms);
        self.status.append_value(r.status);
        self.finish_reason.append_option(r.finish_reason);
        self.is_fallback.append_value(r.is_fallback);
        self.policy_decision.append_option(r.policy_decision);
        self.policy_id.append_option(r.policy_id);
        self.held_ms.append_option(r.held_ms);
        Ok(())
    }
}

impl DecisionColumns {
    fn push(&mut self, line: &[u8]) -> Result<(), String> {
        let (ts_us, r) = parse_decision(line)?;
        self.ts_us.append_value(ts_us);
        self.request_id.append_option(r.request_id);
        self.tenant_id.append_option(r.tenant_id);
        self.feature_id.append_option(r.feature_id);
        self.experiment_id.append_option(r.experiment_id);
        self.budget_namespace.append_option(r.budget_namespace);
        self.route_name.append_option(r.route_name);
        self.decision.append_value(r.decision);
        self.policy_id.append_option(r.policy_id);
        self.primitive.append_option(r.primitive);
        self.estimated_cost_usd.append_option(r.estimated_cost_usd);
        self.requested_model_tier
            .append_option(r.requested_model_tier);
        self.effective_model_tier
            .append_option(r.effective_model_tier);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cuts_at_line_ends_and_covers_everything() {
        let line = b"{\"a\":1}\n";
        let data: Vec<u8> = line.repeat(PARALLEL_MIN_BYTES / line.len() * 3);
        for n in [1, 2, 3, 7] {
            let parts = split(&data, n);
            assert!(parts.len() <= n.max(1));
            let mut next = 0;
            for (start, part) in &parts {
                assert_eq!(*start, next, "parts are contiguous");
                assert!(part.ends_with(b"\n"), "a part ends at a line end");
                next = start + part.len();
            }
            assert_eq!(next, data.len(), "nothing left out");
        }
        assert_eq!(
            split(b"{}\n{}\n", 4).len(),
            1,
            "small reads stay on one thread"
        );
    }

    #[test]
    fn parts_keep_file_order_and_offsets_of_malformed_lines() {
        let good = br#"{"timestamp":"2026-01-01T00:00:00Z","tenant_id":"t","cost_usd":0.5}"#;
        let mut data = Vec::new();
        let mut bad_offsets = Vec::new();
        let mut i = 0u64;
        while data.len() < PARALLEL_MIN_BYTES * 2 {
            if i % 1000 == 7 {
                bad_offsets.push(100 + data.len() as u64);
                data.extend_from_slice(b"{not json\n");
            } else {
                data.extend_from_slice(good);
                data.push(b'\n');
            }
            i += 1;
        }
        let parsed = parse(Kind::Telemetry, &data, 100, 2);
        assert_eq!(parsed.len(), 2, "split across two threads");
        let rows: usize = parsed.iter().map(|p| p.batch.num_rows()).sum();
        let offsets: Vec<u64> = parsed
            .iter()
            .flat_map(|p| p.malformed.iter().map(|m| m.offset))
            .collect();
        assert_eq!(
            offsets, bad_offsets,
            "malformed lines named by their offsets, in order"
        );
        assert_eq!(rows as u64 + offsets.len() as u64, i);
        assert_eq!(parsed[0].batch.num_columns(), 23);
        assert!(parsed[0].malformed[0]
            .why
            .contains("not a telemetry record"));
    }
}
