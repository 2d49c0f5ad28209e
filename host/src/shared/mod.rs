//! Budgets shared by gateway replicas through Redis (`budgets: {backend: redis}`).
//!
//! Each replica keeps a mirror of its own contribution to every budget sum the loaded rules
//! declare: per key ([`keys`]: scope, window, scope values, time bucket), what it settled and
//! what it holds in flight. The mirror follows the ledger (every reserve, move, settle and
//! release updates it under the ledger's lock) and is rebuilt from DuckDB over the replica's
//! own logs plus the ledger at start and whenever the declared sums change. Redis holds, per
//! key and replica, the mirror's values, written absolutely with a sequence number
//! (`script.lua`), never incremented: a write repeated, reordered or replayed after Redis lost
//! everything cannot double a dollar, and a replica rewrites all it holds when Redis comes
//! back empty ([`SharedBudgets::heartbeat`]).
//!
//! A request writes its own reservation and reads the sums its rules need in one round trip
//! ([`SharedBudgets::exchange`]) before its rules run, so its reservation is visible to every
//! replica first; everything else (settlements, moves, releases) is written by a background
//! flusher within milliseconds. In-flight money of a replica counts as in flight while its
//! lease runs (renewed every third of `lease_ms`); once a replica's lease ends (killed, or cut
//! off from Redis) what it held in flight counts as settled at the reservation, as its restart
//! records those requests (`unanswered`, at their estimates): a crash leaves the shared books
//! conservative, never short of what the provider may have billed. Its restart on its logs
//! replaces those values with its logs' figures.

mod keys;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llmscope_sdk::types::{Aggregate, RequestContext};
use parking_lot::Mutex;

pub use keys::Spec;

use crate::artifacts::LogPosition;
use crate::ledger::{Dims, Sums};
use llmscope_wire::budgets::RedisBudgets;

const TARGET: &str = "llmscope::shared";

/// How often the flusher writes what changed when nothing wakes it.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// The most time between two heartbeats (a replica notices Redis lost its data within it).
const HEARTBEAT_AT_MOST: Duration = Duration::from_millis(250);
/// After Redis lost its data, how long every replica is given to rewrite its contribution
/// (several heartbeats) before sums are answered again.
const RECOVERY_GRACE_MS: u64 = 1_000;

/// A replica's contribution to one key.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Contribution {
    settled: Sums,
    in_flight: Sums,
    expires_at_ms: u64,
}

#[derive(Debug, Default)]
struct State {
    /// The sums kept, from the loaded rules' summable aggregates.
    specs: Vec<Spec>,
    /// Whether the mirror was built for `specs` (from DuckDB and the ledger).
    built: bool,
    mirror: HashMap<String, Contribution>,
    /// Keys changed since last written.
    dirty: HashSet<String>,
    /// How far each telemetry file was ingested when the mirror was built: a settlement whose
    /// line is at or before it is in the seed already.
    seeded_through: HashMap<u64, u64>,
    /// Sequence number of the last values taken for writing.
    seq: u64,
    /// When everything was last marked for rewriting (ms since the epoch).
    rewritten_at_ms: u64,
    /// Refreshes since the last rebuild.
    seed_refreshes: u32,
    /// After a rebuild, until this boot has marked itself as the one that rewrote this
    /// replica's share (what an older boot left elsewhere is then stale): the rebuild's keys
    /// that no call has confirmed written yet (a key taken for a write stays until Redis
    /// answered that write). The mark is written once it is empty.
    unconfirmed: Option<HashSet<String>>,
}

/// The sums one read returned per key: settled by every replica (with what a dead one held in
/// flight), and in flight at the live ones (this one included).
pub type Read = HashMap<String, (Sums, Sums)>;

/// The outcome of a read: the sums, or why Redis could not answer (each rule's
/// `failure_mode` then decides).
pub type SharedRead = Result<Read, String>;

/// One seed row: a spec, its scope values, a bucket start, the replica's settled sums there.
pub type SeedRow = (Spec, Vec<Option<String>>, u64, Sums);

/// A ledger entry, for rebuilding the mirror: its dimensions, time, sums, settled or not.
pub type LedgerEntry = (Dims, u64, Sums, bool);

/// A change of this replica's money (see [`SharedBudgets::changes`]).
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// The request's dimensions.
    pub dims: &'a Dims,
    /// When the request arrived.
    pub at_ms: u64,
    /// Settled money added.
    pub settled: &'a Sums,
    /// In-flight money added.
    pub in_flight: &'a Sums,
    /// +1 or -1.
    pub sign: f64,
    /// Where a settlement's telemetry line ended.
    pub line: Option<LogPosition>,
}

/// The shared budget store of one replica.
pub struct SharedBudgets {
    cfg: RedisBudgets,
    /// This process's boot: `{replica}/{uuid}`.
    boot: String,
    conn: redis::aio::ConnectionManager,
    exchange: redis::Script,
    lease: redis::Script,
    state: Mutex<State>,
    up: AtomicBool,
    errors: AtomicU64,
    /// Wakes the flusher.
    wake: tokio::sync::Notify,
    /// The Redis server's `run_id` last seen (a restart changes it).
    run_id: Mutex<Option<String>>,
    /// The store's epoch last seen (`script.lua`: another one means Redis lost its data).
    epoch: Mutex<Option<String>>,
}

impl std::fmt::Debug for SharedBudgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBudgets")
            .field("boot", &self.boot)
            .field("up", &self.up.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// What `/readyz` and `/metrics` say about the store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// `redis`.
    pub backend: &'static str,
    /// The last call succeeded.
    pub reachable: bool,
    /// Calls that failed or timed out since start.
    pub errors: u64,
    /// Keys this replica holds money in.
    pub keys: usize,
    /// This replica's name.
    pub replica_id: String,
}

impl SharedBudgets {
    /// A store for `cfg`; connects lazily (a Redis down at start is a store that is not
    /// reachable yet, not a failed start).
    pub fn new(cfg: &RedisBudgets) -> Result<Arc<Self>, String> {
        let client =
            redis::Client::open(cfg.url.as_str()).map_err(|e| format!("budgets.url: {e}"))?;
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(500))))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = redis::aio::ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("budgets: {e}"))?;
        Ok(Arc::new(Self {
            boot: format!("{}/{}", cfg.replica_id, uuid::Uuid::now_v7().simple()),
            cfg: cfg.clone(),
            conn,
            exchange: redis::Script::new(include_str!("script.lua")),
            lease: redis::Script::new(include_str!("lease.lua")),
            state: Mutex::new(State::default()),
            up: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            run_id: Mutex::new(None),
            epoch: Mutex::new(None),
        }))
    }

    /// Start the heartbeat (lease, Redis-restart detection) and the flusher.
    pub fn spawn(self: &Arc<Self>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let every = Duration::from_millis((me.cfg.lease_ms / 3).max(30)).min(HEARTBEAT_AT_MOST);
            loop {
                me.heartbeat().await;
                tokio::time::sleep(every).await;
            }
        });
        let me = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let _ = tokio::time::timeout(FLUSH_EVERY, me.wake.notified()).await;
                me.flush().await;
            }
        });
    }

    /// Whether the last call succeeded, and counts.
    pub fn status(&self) -> Status {
        Status {
            backend: "redis",
            reachable: self.up.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            keys: self.state.lock().mirror.len(),
            replica_id: self.cfg.replica_id.clone(),
        }
    }

    /// The sums kept for `aggregates` differ from the ones the mirror was built for.
    pub fn needs_rebuild(&self, aggregates: &[Aggregate]) -> bool {
        let st = self.state.lock();
        !st.built || st.specs != Spec::all(aggregates)
    }

    /// The specs kept for `aggregates` (what [`Self::rebuild`] is to be seeded with).
    pub fn specs_of(aggregates: &[Aggregate]) -> Vec<Spec> {
        Spec::all(aggregates)
    }

    /// Rebuild the mirror for `specs`: `seed` (the replica's settled sums from DuckDB, every
    /// line of its logs the refresh ingested) plus `entries` (the ledger: settled but not yet
    /// ingested, and in flight). Called under the ledger's lock, right after the ledger let go
    /// of what the seed includes, so nothing is counted twice or missed. Everything is then
    /// rewritten.
    pub fn rebuild(
        &self,
        specs: Vec<Spec>,
        seed: Vec<SeedRow>,
        entries: Vec<LedgerEntry>,
        seeded_through: Vec<LogPosition>,
    ) {
        let mut st = self.state.lock();
        st.mirror.clear();
        st.specs = specs;
        st.built = true;
        st.seed_refreshes = 0;
        st.seeded_through = seeded_through
            .into_iter()
            .map(|p| (p.file_id, p.offset))
            .collect();
        for (spec, values, bucket, sums) in seed {
            let key = spec.key(&self.cfg.key_prefix, &values, bucket);
            let expires = spec.bucket(bucket).1;
            let c = st.mirror.entry(key).or_default();
            add(&mut c.settled, &sums, 1.0);
            c.expires_at_ms = expires;
        }
        for (dims, at_ms, sums, settled) in entries {
            let (settled_sums, in_flight) = if settled {
                (sums, Sums::default())
            } else {
                (Sums::default(), sums)
            };
            apply(
                &mut st,
                &self.cfg.key_prefix,
                &dims,
                at_ms,
                &settled_sums,
                &in_flight,
                1.0,
            );
        }
        let keys: Vec<String> = st.mirror.keys().cloned().collect();
        st.unconfirmed = Some(keys.iter().cloned().collect());
        st.dirty.extend(keys);
        drop(st);
        self.wake.notify_one();
    }

    /// Record changes of this replica's money, all at once (no write sees half of them):
    /// each for `dims` at `at_ms`, `settled` and `in_flight` added with `sign`; `line`: where
    /// a settlement's telemetry line ended (a line the seed already counted adds nothing).
    /// Called by the ledger under its lock.
    pub(crate) fn changes(&self, changes: &[Change<'_>]) {
        let mut st = self.state.lock();
        if !st.built {
            return;
        }
        for c in changes {
            let seeded = c.line.is_some_and(|p| {
                st.seeded_through
                    .get(&p.file_id)
                    .is_some_and(|&through| p.offset <= through)
            });
            let none = Sums::default();
            let settled = if seeded { &none } else { c.settled };
            apply(
                &mut st,
                &self.cfg.key_prefix,
                c.dims,
                c.at_ms,
                settled,
                c.in_flight,
                c.sign,
            );
        }
        drop(st);
        self.wake.notify_one();
    }

    /// One change (see [`Self::changes`]).
    #[cfg(test)]
    pub(crate) fn change(
        &self,
        dims: &Dims,
        at_ms: u64,
        settled: &Sums,
        in_flight: &Sums,
        sign: f64,
        line: Option<LogPosition>,
    ) {
        self.changes(&[Change {
            dims,
            at_ms,
            settled,
            in_flight,
            sign,
            line,
        }]);
    }

    /// The keys money of `dims` at `at_ms` lands in.
    pub fn keys_of(&self, dims: &Dims, at_ms: u64) -> Vec<String> {
        let st = self.state.lock();
        st.specs
            .iter()
            .map(|s| s.key(&self.cfg.key_prefix, &s.values_of(dims), s.bucket(at_ms).0))
            .collect()
    }

    /// The keys a read of `a` for `request` sums (none when Redis does not keep `a`).
    pub fn keys_for(&self, a: &Aggregate, request: &RequestContext) -> Vec<String> {
        let Some(spec) = Spec::of(a) else {
            return Vec::new();
        };
        let values = spec.values_for(request);
        spec.buckets(request.unix_time_ms)
            .into_iter()
            .map(|b| spec.key(&self.cfg.key_prefix, &values, b))
            .collect()
    }

    /// Write `writes` (this replica's values of those keys, now) and read `reads`, in one
    /// round trip. An error says why Redis did not answer in time.
    pub async fn exchange(&self, writes: &[String], reads: &[String]) -> SharedRead {
        let (seq, values) = self.take(writes);
        let result = self.call(seq, &values, reads).await;
        let mut st = self.state.lock();
        if result.is_ok() {
            if let Some(unconfirmed) = &mut st.unconfirmed {
                for (k, _) in &values {
                    unconfirmed.remove(k);
                }
            }
        } else {
            // What was not written is written by the flusher once Redis answers again.
            st.dirty.extend(values.into_iter().map(|(k, _)| k));
        }
        result
    }

    /// The current values of `keys`, under a new sequence number.
    fn take(&self, keys: &[String]) -> (u64, Vec<(String, Contribution)>) {
        let mut st = self.state.lock();
        st.seq += 1;
        let values = keys
            .iter()
            .filter_map(|k| {
                st.dirty.remove(k);
                st.mirror.get(k).map(|c| (k.clone(), *c))
            })
            .collect();
        (st.seq, values)
    }

    async fn call(
        &self,
        seq: u64,
        writes: &[(String, Contribution)],
        reads: &[String],
    ) -> SharedRead {
        let mut inv = self.exchange.prepare_invoke();
        let prefix = &self.cfg.key_prefix;
        inv.key(format!("{prefix}:alive"))
            .key(format!("{prefix}:epoch"))
            .key(format!("{prefix}:recovering"))
            .key(format!("{prefix}:rebuilt"));
        for (k, _) in writes {
            inv.key(k);
        }
        for k in reads {
            inv.key(k);
        }
        inv.arg(writes.len())
            .arg(&self.cfg.replica_id)
            .arg(&self.boot)
            .arg(seq)
            .arg(RECOVERY_GRACE_MS)
            .arg(self.epoch.lock().clone().unwrap_or_default());
        for (_, c) in writes {
            for s in [&c.settled, &c.in_flight] {
                inv.arg(s.cost_usd.to_string())
                    .arg(s.tokens_in.to_string())
                    .arg(s.tokens_out.to_string())
                    .arg(s.requests.to_string());
            }
            inv.arg(c.expires_at_ms);
        }
        let mut conn = self.conn.clone();
        let result: Result<Vec<String>, String> = bounded(
            Duration::from_millis(self.cfg.timeout_ms),
            inv.invoke_async(&mut conn),
            || format!("did not answer within {} ms", self.cfg.timeout_ms),
        )
        .await;
        let out = self.note(result)?;
        if let Some(epoch) = out.get(1) {
            *self.epoch.lock() = Some(epoch.clone());
        }
        if out.first().map(String::as_str) != Some("ok") {
            // Redis lost its data: rewrite everything this replica holds, and let the rules
            // fail as if it were unreachable until every replica had the time to. (The
            // writes of this call went through: a write-only call succeeded.)
            self.rewrite_all();
            if reads.is_empty() {
                return Ok(Read::new());
            }
            return Err(
                "shared budget store (Redis) lost its data and is being rewritten by the replicas"
                    .into(),
            );
        }
        let mut read = Read::with_capacity(reads.len());
        for (i, k) in reads.iter().enumerate() {
            let n = |j: usize| {
                out.get(2 + i * 8 + j)
                    .and_then(|s| s.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            let sums = |o: usize| Sums {
                cost_usd: n(o),
                tokens_in: n(o + 1),
                tokens_out: n(o + 2),
                requests: n(o + 3),
            };
            read.insert(k.clone(), (sums(0), sums(4)));
        }
        Ok(read)
    }

    /// Count the outcome of a call; log the first failure after a success and the recovery.
    fn note<T>(&self, result: Result<T, String>) -> Result<T, String> {
        match &result {
            Ok(_) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(target: TARGET, url = %self.cfg.url, "shared budget store reachable");
                }
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::error!(target: TARGET, error = %e, "shared budget store unreachable: rules with failure_mode closed deny, open ones use this replica's own sums");
                }
            }
        }
        result
    }

    /// Write every changed key (the background flusher's step; also called at shutdown, so a
    /// drained replica leaves no reservation behind); whether everything was written.
    pub async fn flush(&self) -> bool {
        let keys: Vec<String> = {
            let st = self.state.lock();
            st.dirty.iter().cloned().collect()
        };
        // Bounded batches, so one call never holds Redis long.
        for chunk in keys.chunks(256) {
            if self.exchange(chunk, &[]).await.is_err() {
                return false;
            }
        }
        self.mark_rebuilt().await
    }

    /// After a rebuild, once everything it produced is written: record this boot as the one
    /// that rewrote this replica's share, so what an older boot (killed) left in keys this one
    /// holds nothing in stops counting (`script.lua`). Whether nothing is left to mark.
    async fn mark_rebuilt(&self) -> bool {
        {
            let mut st = self.state.lock();
            let State {
                unconfirmed,
                mirror,
                dirty,
                ..
            } = &mut *st;
            let Some(unconfirmed) = unconfirmed else {
                return dirty.is_empty();
            };
            // Keys that left the mirror (expired) need no write.
            unconfirmed.retain(|k| mirror.contains_key(k));
            if !unconfirmed.is_empty() {
                return false;
            }
        }
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("HSET");
        cmd.arg(format!("{}:rebuilt", self.cfg.key_prefix))
            .arg(&self.cfg.replica_id)
            .arg(&self.boot);
        let done: Result<i64, String> = bounded(
            Duration::from_millis(self.cfg.timeout_ms),
            cmd.query_async(&mut conn),
            || "did not answer in time".into(),
        )
        .await;
        if self.note(done).is_err() {
            return false;
        }
        let mut st = self.state.lock();
        // A rebuild in between asks for its own mark.
        if st.unconfirmed.as_ref().is_some_and(HashSet::is_empty) {
            st.unconfirmed = None;
        }
        st.unconfirmed.is_none() && st.dirty.is_empty()
    }

    /// Renew the lease; when Redis lost this replica's contribution (restarted, flushed),
    /// rewrite all of it.
    async fn heartbeat(&self) {
        let mut conn = self.conn.clone();
        let timeout = Duration::from_millis(self.cfg.timeout_ms.max(200));
        let mut inv = self.lease.prepare_invoke();
        inv.key(format!("{}:alive", self.cfg.key_prefix))
            .key(format!("{}:seeded:{}", self.cfg.key_prefix, self.boot))
            .arg(&self.boot)
            .arg(self.cfg.lease_ms)
            .arg(&self.cfg.replica_id);
        let lease: Result<(i64, i64), String> =
            bounded(timeout, inv.invoke_async(&mut conn), || {
                "did not answer the heartbeat".into()
            })
            .await;
        let Ok((seeded, others)) = self.note(lease) else {
            return;
        };
        if others > 0 {
            tracing::warn!(target: TARGET, replica_id = %self.cfg.replica_id, others, "another live gateway uses this replica_id: each must have its own");
        }
        let info: Result<String, String> = match tokio::time::timeout(
            timeout,
            redis::cmd("INFO").arg("server").query_async(&mut conn),
        )
        .await
        {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("timeout".into()),
        };
        let run_id = info.ok().and_then(|i| {
            i.lines()
                .find_map(|l| l.strip_prefix("run_id:").map(|s| s.trim().to_owned()))
        });
        let restarted = {
            let mut last = self.run_id.lock();
            let changed = last.is_some() && run_id.is_some() && *last != run_id;
            if run_id.is_some() {
                *last = run_id;
            }
            changed
        };
        if seeded == 0 || restarted {
            self.rewrite_all();
        }
    }

    /// Mark every key this replica holds for rewriting, at most once a second.
    fn rewrite_all(&self) {
        let now = crate::gateway::now_ms();
        let mut st = self.state.lock();
        if now < st.rewritten_at_ms + 1_000 {
            return;
        }
        st.rewritten_at_ms = now;
        let keys: Vec<String> = st.mirror.keys().cloned().collect();
        if !keys.is_empty() {
            tracing::warn!(target: TARGET, keys = keys.len(), "shared budget store lost this replica's sums (Redis restarted or flushed): rewriting them");
        }
        st.dirty.extend(keys);
        drop(st);
        self.wake.notify_one();
    }

    /// Drop keys whose buckets no window reads any more (as of `now_ms`). Called every
    /// refresh; the rebuild's ingestion marks are dropped at the second call after it (every
    /// settlement whose line the seed counted has settled by then), so a log truncated or an
    /// inode reused later cannot make a new line look seeded.
    pub fn expire(&self, now_ms: u64) {
        let mut st = self.state.lock();
        st.mirror.retain(|_, c| c.expires_at_ms > now_ms);
        st.seed_refreshes += 1;
        if st.seed_refreshes > 2 {
            st.seeded_through.clear();
        }
    }
}

/// `call` answered within `timeout`, or why not: Redis's error, or `late()` (what it did not
/// do in time, built only then), each as "shared budget store (Redis) ...".
async fn bounded<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
    late: impl FnOnce() -> String,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r.map_err(|e| format!("shared budget store (Redis) failed: {e}")),
        Err(_) => Err(format!("shared budget store (Redis) {}", late())),
    }
}

fn add(into: &mut Sums, s: &Sums, sign: f64) {
    into.cost_usd += sign * s.cost_usd;
    into.tokens_in += sign * s.tokens_in;
    into.tokens_out += sign * s.tokens_out;
    into.requests += sign * s.requests;
}

/// Add `settled` and `in_flight` (times `sign`) for `dims` at `at_ms` to every spec's key,
/// marking them changed.
fn apply(
    st: &mut State,
    prefix: &str,
    dims: &Dims,
    at_ms: u64,
    settled: &Sums,
    in_flight: &Sums,
    sign: f64,
) {
    for i in 0..st.specs.len() {
        let spec = &st.specs[i];
        let (bucket, expires) = spec.bucket(at_ms);
        let key = spec.key(prefix, &spec.values_of(dims), bucket);
        let c = st.mirror.entry(key.clone()).or_default();
        add(&mut c.settled, settled, sign);
        add(&mut c.in_flight, in_flight, sign);
        // Float residue of a reservation given back is not money.
        for s in [&mut c.settled, &mut c.in_flight] {
            for v in [
                &mut s.cost_usd,
                &mut s.tokens_in,
                &mut s.tokens_out,
                &mut s.requests,
            ] {
                if v.abs() < 1e-12 {
                    *v = 0.0;
                }
            }
        }
        c.expires_at_ms = expires;
        st.dirty.insert(key);
    }
}

/// The value of a summable aggregate `a` for `request` from `read`: settled spend of every
/// replica, plus (when `a` includes in-flight money) what the live replicas hold, minus this
/// request's own reservation `own` when it matches. `(value, samples)`; `None` when Redis
/// does not keep `a`.
pub fn value_of(
    a: &Aggregate,
    request: &RequestContext,
    keys: &[String],
    read: &Read,
    own: Option<(&Dims, Sums)>,
) -> Option<(f64, f64)> {
    Spec::of(a)?;
    let mut total = Sums::default();
    for k in keys {
        let (settled, in_flight) = read.get(k).copied().unwrap_or_default();
        add(&mut total, &settled, 1.0);
        if a.include_in_flight {
            add(&mut total, &in_flight, 1.0);
        }
    }
    if a.include_in_flight {
        if let Some((dims, amount)) = own {
            if dims.matches(&a.scope, request) {
                add(&mut total, &amount, -1.0);
            }
        }
    }
    let requests = total.requests.max(0.0);
    let value = match a.aggregation {
        llmscope_sdk::types::Aggregation::Count => requests,
        _ => total.get(a.metric).unwrap_or(0.0).max(0.0),
    };
    Some((value, requests))
}

#[cfg(test)]
mod tests {
    use llmscope_sdk::types::{Aggregation, Metric, Scope, Window};

    use super::*;

    fn aggregate(include_in_flight: bool) -> Aggregate {
        Aggregate {
            key: "spent".into(),
            metric: Metric::CostUsd,
            aggregation: Aggregation::Sum,
            window: Window::CalendarDay,
            scope: vec![Scope::Tenant],
            include_in_flight,
        }
    }

    fn dims(tenant: &str) -> Dims {
        Dims {
            tenant: tenant.into(),
            feature: None,
            route: "/r".into(),
            namespace: "default".into(),
            experiment: None,
            model: "m".into(),
        }
    }

    fn usd(cost_usd: f64) -> Sums {
        Sums {
            cost_usd,
            tokens_in: 1.0,
            tokens_out: 1.0,
            requests: 1.0,
        }
    }

    fn store() -> Arc<SharedBudgets> {
        SharedBudgets::new(&RedisBudgets {
            url: "redis://127.0.0.1:1/".into(),
            key_prefix: "t".into(),
            replica_id: "r1".into(),
            timeout_ms: 10,
            lease_ms: 1000,
        })
        .unwrap()
    }

    fn held(s: &SharedBudgets, key: &str) -> (f64, f64) {
        let st = s.state.lock();
        st.mirror
            .get(key)
            .map_or((0.0, 0.0), |c| (c.settled.cost_usd, c.in_flight.cost_usd))
    }

    #[tokio::test]
    async fn the_mirror_follows_the_ledger_and_never_counts_a_seeded_line_twice() {
        let s = store();
        let at = 1_764_643_800_000;
        let specs = Spec::all(&[aggregate(true)]);
        let key = specs[0].key("t", &[Some("acme".into())], specs[0].bucket(at).0);
        // Seed: 1.0 settled from DuckDB (lines of file 7 through offset 100), plus a
        // reservation of 0.5 in the ledger.
        s.rebuild(
            specs.clone(),
            vec![(
                specs[0].clone(),
                vec![Some("acme".into())],
                specs[0].bucket(at).0,
                usd(1.0),
            )],
            vec![(dims("acme"), at, usd(0.5), false)],
            vec![LogPosition {
                file_id: 7,
                offset: 100,
            }],
        );
        assert_eq!(held(&s, &key), (1.0, 0.5));
        assert!(s.state.lock().dirty.contains(&key), "everything rewritten");
        // That reservation settles at 0.4 with a line the seed already counted: it leaves the
        // in-flight sum and adds nothing settled.
        let none = Sums::default();
        s.change(&dims("acme"), at, &none, &usd(0.5), -1.0, None);
        s.change(
            &dims("acme"),
            at,
            &usd(0.4),
            &none,
            1.0,
            Some(LogPosition {
                file_id: 7,
                offset: 90,
            }),
        );
        assert_eq!(held(&s, &key), (1.0, 0.0));
        // A later line is new money.
        s.change(
            &dims("acme"),
            at,
            &usd(0.25),
            &none,
            1.0,
            Some(LogPosition {
                file_id: 7,
                offset: 150,
            }),
        );
        assert_eq!(held(&s, &key), (1.25, 0.0));
        // Taking values for a write gives each its own, increasing sequence number.
        let (first, _) = s.take(std::slice::from_ref(&key));
        let (second, values) = s.take(std::slice::from_ref(&key));
        assert!(second > first);
        assert_eq!(values[0].1.settled.cost_usd, 1.25);
        s.expire(u64::MAX);
        assert_eq!(s.status().keys, 0);
    }

    #[test]
    fn a_shared_sum_adds_the_live_in_flight_money_less_the_requests_own() {
        let a = aggregate(true);
        let request = RequestContext {
            tenant_id: "acme".into(),
            ..llmscope_sdk::testing::request()
        };
        let keys = vec!["k".to_owned()];
        let read: Read = [("k".to_owned(), (usd(2.0), usd(0.75)))].into();
        let own = dims("acme");
        let (value, samples) =
            value_of(&a, &request, &keys, &read, Some((&own, usd(0.25)))).unwrap();
        assert!((value - 2.5).abs() < 1e-12, "{value}");
        assert!((samples - 1.0).abs() < 1e-12, "{samples}");
        let (settled_only, _) = value_of(
            &aggregate(false),
            &request,
            &keys,
            &read,
            Some((&own, usd(0.25))),
        )
        .unwrap();
        assert!((settled_only - 2.0).abs() < 1e-12);
    }
}
