//! The `budgets:` section of the gateway config: where the budget sums live. `backend: local`
//! (the default) keeps them in the process (the embedded ledger plus DuckDB over its own logs);
//! `backend: redis` shares them between replicas through a Redis (or Valkey) server, so
//! gateways on several machines enforce one budget.

use serde::Deserialize;

/// Where budget sums live.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(
    tag = "backend",
    rename_all = "snake_case",
    deny_unknown_fields,
    expecting = "a mapping with `backend: local` or `backend: redis`"
)]
pub enum BudgetsConfig {
    /// In this process only.
    #[default]
    Local,
    /// Shared through Redis.
    Redis(RedisBudgets),
}

/// `budgets: {backend: redis, ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisBudgets {
    /// `redis://[user:password@]host:port/db` (Redis 7 or Valkey; plain TCP).
    pub url: String,
    /// Prefix of every key this deployment writes.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// This gateway's name among the replicas: unique per process, stable across restarts
    /// (its settled spend is stored under it and rewritten from its own logs).
    pub replica_id: String,
    /// A Redis call slower than this counts as Redis being unreachable.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// A replica not heard from for this long is taken as dead: the others count its in-flight
    /// reservations as spent at their estimates (as its restart on its logs records them).
    #[serde(default = "default_lease")]
    pub lease_ms: u64,
}

fn default_prefix() -> String {
    "llmscope".into()
}

fn default_timeout() -> u64 {
    100
}

fn default_lease() -> u64 {
    10_000
}

/// Problems with a `budgets` section, as (field path, message).
pub fn problems(b: &BudgetsConfig) -> Vec<(String, String)> {
    let BudgetsConfig::Redis(r) = b else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if !r.url.starts_with("redis://") {
        out.push((
            "budgets.url".into(),
            format!(
                "`{}` is not a redis:// URL (e.g. redis://127.0.0.1:6379/)",
                r.url
            ),
        ));
    }
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
    };
    if !name_ok(&r.replica_id) {
        out.push((
            "budgets.replica_id".into(),
            "must be 1 to 64 characters of A-Z, a-z, 0-9, `_`, `-`, `.`, unique per gateway process".into(),
        ));
    }
    if !name_ok(&r.key_prefix) {
        out.push((
            "budgets.key_prefix".into(),
            "must be 1 to 64 characters of A-Z, a-z, 0-9, `_`, `-`, `.`".into(),
        ));
    }
    if r.timeout_ms == 0 {
        out.push(("budgets.timeout_ms".into(), "must be at least 1".into()));
    }
    if r.lease_ms < 100 {
        out.push((
            "budgets.lease_ms".into(),
            "must be at least 100 (the lease is renewed every third of it)".into(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_settings_are_checked_by_field() {
        let b: BudgetsConfig = serde_yaml::from_str(
            "{backend: redis, url: 'http://x', replica_id: 'a b', lease_ms: 5}",
        )
        .unwrap();
        let fields: Vec<String> = problems(&b).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            ["budgets.url", "budgets.replica_id", "budgets.lease_ms"]
        );
        let ok: BudgetsConfig =
            serde_yaml::from_str("{backend: redis, url: 'redis://127.0.0.1:1/', replica_id: gw-1}")
                .unwrap();
        assert!(problems(&ok).is_empty());
        assert_eq!(
            serde_yaml::from_str::<BudgetsConfig>("{backend: local}").unwrap(),
            BudgetsConfig::Local
        );
    }
}
