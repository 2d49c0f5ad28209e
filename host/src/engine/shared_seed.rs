//! The seed of the shared budget store's mirror ([`crate::shared`]): this replica's settled
//! sums per summable aggregate's scope values and time bucket, from its own logs.

use duckdb::params;

use super::{EngineError, SpendEngine};
use crate::ledger::Sums;
use crate::shared::{SeedRow, Spec};

impl SpendEngine {
    /// Per spec: the cost, tokens and requests of the rows counted by budget sums (served, or
    /// billed) inside the spec's window as of `now_ms`, by scope values and bucket.
    pub fn shared_seed(&self, specs: &[Spec], now_ms: u64) -> Result<Vec<SeedRow>, EngineError> {
        let conn = self.conn.lock();
        let mut out = Vec::new();
        for spec in specs {
            let buckets = spec.buckets(now_ms);
            let Some(&first) = buckets.first() else {
                continue;
            };
            let width_ms = match buckets.get(1) {
                Some(second) => second - first,
                // One bucket: the whole (calendar) period, or a window narrower than a bucket.
                None => u64::MAX,
            };
            let cols: Vec<&str> = spec
                .scope()
                .iter()
                .map(|s| super::aggregates::scope_column(*s))
                .collect();
            let select_cols: String = cols.iter().map(|c| format!("{c}, ")).collect();
            let bucket_expr = if width_ms == u64::MAX {
                format!("{first}::BIGINT")
            } else {
                format!("(ts_us // {0} * {1})::BIGINT", width_ms * 1000, width_ms)
            };
            let group: String = (1..=cols.len() + 1)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "SELECT {select_cols}{bucket_expr}, sum(cost_usd)::DOUBLE, sum(tokens_in)::DOUBLE, \
                 sum(tokens_out)::DOUBLE, count(*)::DOUBLE FROM telemetry \
                 WHERE (status = 'ok' OR cost_usd > 0) AND ts_us >= ? GROUP BY {group}"
            );
            let start_us = i64::try_from(first)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000);
            let mut stmt = conn.prepare(&sql)?;
            let mut rows = stmt.query(params![start_us])?;
            let n = cols.len();
            while let Some(row) = rows.next()? {
                let mut values = Vec::with_capacity(n);
                for i in 0..n {
                    values.push(row.get::<_, Option<String>>(i)?);
                }
                let bucket: i64 = row.get(n)?;
                let sums = Sums {
                    cost_usd: row.get(n + 1)?,
                    tokens_in: row.get(n + 2)?,
                    tokens_out: row.get(n + 3)?,
                    requests: row.get(n + 4)?,
                };
                out.push((
                    spec.clone(),
                    values,
                    u64::try_from(bucket).unwrap_or(0),
                    sums,
                ));
            }
        }
        Ok(out)
    }
}
