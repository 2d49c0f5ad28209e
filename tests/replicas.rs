//! Several gateway replicas sharing their budgets through Redis (`budgets.backend: redis`):
//! real `llmscope serve` processes, each with its own logs and `replica_id`, and a real
//! `redis-server` on a free port (`llmscope_tests::redis_server`).
//!
//! - a: three replicas under 64 concurrent clients keep one per-tenant cap (spend ≤ limit + 3 ×
//!   the largest request), where three `backend: local` replicas overshoot it;
//! - b: a replica killed with `kill -9` mid-run: the cap still holds, and once its lease has run
//!   out the survivors count its settled spend and, as spent, what it had in flight (never less
//!   than its restart records);
//! - c: Redis restarted empty mid-run (and later flushed): each replica writes its contribution
//!   again, so the shared value equals the telemetry of all three, nothing lost or doubled;
//! - d: Redis down: a fail-closed rule denies naming the shared budget store, a fail-open one
//!   serves; `/readyz` and `/metrics` say so; both recover by themselves when Redis is back;
//! - e: the store emptied (FLUSHALL, then a restart) with the cap spent, and a wave sent at
//!   once: the cap stays closed;
//! - f: the same when the replica that spent the cap is idle, so only its heartbeat can write
//!   its share again (fails against the first backend: README, "Running several replicas");
//! - g: a reservation a dead boot left in Redis counts as spent until a new boot of its replica
//!   has rewritten its share, then not at all.
//!
//! Nothing here asserts a duration: "eventually" is polling with generous deadlines. The
//! numbers of each run are printed (`--nocapture`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::await_holding_lock,
    reason = "integration tests: a failure is a panic with the numbers; each scenario holds \
              SERIAL for its whole run"
)]
#![allow(missing_docs, reason = "integration tests")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llmscope_tests::gateway::{read_jsonl, Gateway, Options};
use llmscope_tests::redis_server::RedisServer;
use serde_json::{json, Value};

/// Tenant of every request.
const TENANT: &str = "acme";
/// Namespace of the capped requests.
const NAMESPACE: &str = "capped";
/// The cap's rule id.
const RULE: &str = "cap";
/// `analytics.refresh_interval_ms` of every replica.
const REFRESH_MS: u64 = 200;
/// `budgets.lease_ms` of every replica.
const LEASE_MS: u64 = 1_500;
/// Mock provider latency: long enough for requests to overlap across replicas.
const MOCK_LATENCY_MS: u64 = 50;
/// Concurrent clients of the load runs.
const CLIENTS: usize = 64;
/// How long each load run sends: long enough to exhaust the cap many times over.
const LOAD_FOR: Duration = Duration::from_secs(3);
/// Agreement between the shared aggregate and the telemetry.
const TOLERANCE_USD: f64 = 1e-9;
/// The cap. A request is estimated at ~$0.0003 (500 output tokens reserved) and billed at
/// ~$0.000075 (the mock's 120 output tokens): some 30 requests fit, at most 8 in flight at once.
const LIMIT_USD: f64 = 0.0025;
/// How long "eventually" may take.
const EVENTUALLY: Duration = Duration::from_secs(30);

/// The scenarios share two cores: one at a time, so the replicas' rule deadline never
/// competes with another scenario's load.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The policy: the per-tenant cap in `capped` (fail closed, the default) and the same rule
/// failing open in `open`.
fn policy_yaml(limit_usd: f64) -> String {
    format!(
        r#"version: "replicas"
namespaces:
  {NAMESPACE}:
    rules:
      - {{id: {RULE}, primitive: budget_threshold, period: hourly, limit_usd: {limit_usd}, scope: [tenant, budget_namespace], deny_reason: "replica cap"}}
  open:
    rules:
      - {{id: cap-open, primitive: budget_threshold, period: hourly, limit_usd: {limit_usd}, scope: [tenant, budget_namespace], failure_mode: open}}
"#
    )
}

/// The `budgets:` section of replica `replica` on `redis` (`None`: `backend: local`).
fn budgets_yaml(
    redis: Option<&RedisServer>,
    prefix: &str,
    replica: usize,
    timeout_ms: u64,
) -> String {
    match redis {
        None => "budgets:\n  backend: local\n".to_owned(),
        Some(r) => format!(
            "budgets:\n  backend: redis\n  url: \"{}\"\n  key_prefix: \"{prefix}\"\n  replica_id: \"gw-{replica}\"\n  timeout_ms: {timeout_ms}\n  lease_ms: {LEASE_MS}\n",
            r.url()
        ),
    }
}

/// Options of replica `replica`: own temp dir and logs, fast refresh, the mock at
/// [`MOCK_LATENCY_MS`].
fn replica_options(
    redis: Option<&RedisServer>,
    prefix: &str,
    replica: usize,
    limit_usd: f64,
    timeout_ms: u64,
) -> Options {
    let mut opts = Options::new(&policy_yaml(limit_usd));
    opts.mock_latency_ms = MOCK_LATENCY_MS;
    opts.extra_yaml = format!(
        "analytics:\n  refresh_interval_ms: {REFRESH_MS}\n{}",
        budgets_yaml(redis, prefix, replica, timeout_ms)
    );
    opts
}

/// Start replica `replica` (see [`replica_options`]).
fn start_replica(
    redis: Option<&RedisServer>,
    prefix: &str,
    replica: usize,
    limit_usd: f64,
    timeout_ms: u64,
) -> Gateway {
    Gateway::start(&replica_options(
        redis, prefix, replica, limit_usd, timeout_ms,
    ))
}

/// `n` replicas sharing `redis` under key prefix `prefix`.
fn start_replicas(redis: Option<&RedisServer>, prefix: &str, n: usize) -> Vec<Gateway> {
    // A generous Redis timeout: on two shared cores a round trip under load can take tens of
    // milliseconds, and these scenarios are about the budget, not about a slow store.
    (1..=n)
        .map(|i| start_replica(redis, prefix, i, LIMIT_USD, 2_000))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Load.
// ---------------------------------------------------------------------------------------------

/// `CLIENTS` clients sending requests for [`LOAD_FOR`] to the replicas, round-robin (client
/// `c`'s request `i` goes to replica `(c + i) % n`).
struct Load {
    handles: Vec<tokio::task::JoinHandle<BTreeMap<String, u64>>>,
    /// Requests answered 200 so far.
    served: Arc<AtomicU64>,
}

fn body(namespace: &str, c: usize, i: usize) -> Value {
    json!({
        "prompt": format!("replica client {c} request {i}: summarize the quarterly report"),
        "tenant_id": TENANT, "budget_namespace": namespace, "feature_id": "summarize",
        "route_name": "/answer-routed", "model_tier": "cheap",
    })
}

impl Load {
    fn start(gateways: &[Gateway]) -> Self {
        Self::start_to(&gateways.iter().collect::<Vec<_>>())
    }

    /// The load on `targets` only.
    fn start_to(targets: &[&Gateway]) -> Self {
        let urls: Arc<Vec<String>> = Arc::new(targets.iter().map(|g| g.at("/infer")).collect());
        let served = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::new();
        let until = Instant::now() + LOAD_FOR;
        for c in 0..CLIENTS {
            let (urls, served) = (Arc::clone(&urls), Arc::clone(&served));
            handles.push(tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .build()
                    .unwrap();
                let mut tally = BTreeMap::new();
                for i in 0.. {
                    if Instant::now() >= until {
                        break;
                    }
                    let url = &urls[(c + i) % urls.len()];
                    let outcome = match client.post(url).json(&body(NAMESPACE, c, i)).send().await {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            let text = resp.text().await.unwrap_or_default();
                            if status == 200 {
                                served.fetch_add(1, Ordering::Relaxed);
                                "200".to_owned()
                            } else if status == 402 && text.contains("shared budget store") {
                                "402 (store unreachable)".to_owned()
                            } else {
                                status.to_string()
                            }
                        }
                        Err(_) => "connection-error".to_owned(),
                    };
                    // Refusals come back at once: pace them.
                    if outcome != "200" {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    *tally.entry(outcome).or_insert(0) += 1;
                }
                tally
            }));
        }
        Self { handles, served }
    }

    /// Wait until at least `n` requests were served (or the load ended).
    async fn served_at_least(&self, n: u64) {
        let deadline = Instant::now() + EVENTUALLY;
        while self.served.load(Ordering::Relaxed) < n
            && !self
                .handles
                .iter()
                .all(tokio::task::JoinHandle::is_finished)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn join(self) -> BTreeMap<String, u64> {
        let mut total = BTreeMap::new();
        for h in self.handles {
            for (k, v) in h.await.unwrap() {
                *total.entry(k).or_insert(0) += v;
            }
        }
        total
    }
}

// ---------------------------------------------------------------------------------------------
// What the replicas recorded and what they see.
// ---------------------------------------------------------------------------------------------

/// Spend of [`TENANT`] in `namespace` in the telemetry of `gateways`: (total, largest single
/// request, requests billed).
fn spend(gateways: &[Gateway], namespace: &str) -> (f64, f64, usize) {
    let (mut total, mut largest, mut billed) = (0.0_f64, 0.0_f64, 0);
    for g in gateways {
        for line in read_jsonl(&g.telemetry) {
            if line["tenant_id"] != TENANT || line["budget_namespace"] != namespace {
                continue;
            }
            let cost = line["cost_usd"].as_f64().unwrap_or(0.0);
            total += cost;
            largest = largest.max(cost);
            if cost > 0.0 {
                billed += 1;
            }
        }
    }
    (total, largest, billed)
}

/// Spend per replica, for the messages.
fn spend_by_replica(gateways: &[Gateway], namespace: &str) -> Vec<String> {
    gateways
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let (t, _, n) = spend(std::slice::from_ref(g), namespace);
            format!("gw-{}: ${t:.6} ({n} billed)", i + 1)
        })
        .collect()
}

/// The value of the `window_cost_usd` aggregate the cap ([`RULE`] in `namespace`) would see
/// now on `gw`
/// (`GET /v1/snapshot`).
async fn window_cost(gw: &Gateway, namespace: &str) -> Result<f64, String> {
    let url = gw.at(&format!(
        "/v1/snapshot?tenant_id={TENANT}&budget_namespace={namespace}&route_name=%2Fanswer-routed&model_tier=cheap&tokens_in=10"
    ));
    let resp = reqwest::get(&url)
        .await
        .map_err(|e| format!("GET /v1/snapshot: {e}"))?;
    let status = resp.status();
    let snap: Value = resp
        .json()
        .await
        .map_err(|e| format!("snapshot body: {e}"))?;
    if !status.is_success() {
        return Err(format!("GET /v1/snapshot: {status} {snap}"));
    }
    snap["rules"]
        .as_array()
        .and_then(|rules| rules.iter().find(|r| r["rule_id"] == RULE))
        .and_then(|r| r["snapshot"]["values"].as_array())
        .and_then(|vals| vals.iter().find(|x| x["key"] == "window_cost_usd"))
        .and_then(|x| x["value"].as_f64())
        .ok_or_else(|| format!("no window_cost_usd in the snapshot: {snap}"))
}

/// Poll `check` every 100 ms until it passes: how long it took, or its last complaint after
/// `within`.
async fn poll<F, Fut>(what: &str, within: Duration, mut check: F) -> Result<Duration, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let started = Instant::now();
    loop {
        match check().await {
            Ok(()) => return Ok(started.elapsed()),
            Err(e) if started.elapsed() > within => {
                return Err(format!("{what}: still not so after {within:?}: {e}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// [`poll`], panicking with the complaint.
async fn eventually<F, Fut>(what: &str, within: Duration, check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    poll(what, within, check)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// How the replicas' figure is to compare with the telemetry.
#[derive(Clone, Copy)]
enum Expect {
    /// Exactly the telemetry of all replicas.
    Telemetry,
    /// At least the telemetry plus this much (reserved and unrecorded by a dead replica).
    AtLeast(f64),
}

/// Whether, eventually, every replica of `live` sees, as the cap's aggregate, what `expect`
/// says of the spend in the telemetry of all of `all`.
async fn try_shared_value(
    what: &str,
    all: &[Gateway],
    live: &[&Gateway],
    expect: Expect,
) -> Result<(), String> {
    let took = poll(what, EVENTUALLY, || async {
        let (total, _, _) = spend(all, NAMESPACE);
        let mut seen = Vec::new();
        for gw in live {
            seen.push(window_cost(gw, NAMESPACE).await?);
        }
        let (holds, wanted) = match expect {
            Expect::Telemetry => (
                seen.iter().all(|s| (s - total).abs() <= TOLERANCE_USD),
                "exactly".to_owned(),
            ),
            Expect::AtLeast(extra) => (
                seen.iter().all(|s| *s >= total + extra - TOLERANCE_USD),
                format!("at least ${extra:.9} (reserved and unrecorded) more than"),
            ),
        };
        if holds {
            Ok(())
        } else {
            Err(format!(
                "the replicas see {seen:?}, not {wanted} the telemetry of all replicas, ${total:.9} ({})",
                spend_by_replica(all, NAMESPACE).join(", ")
            ))
        }
    })
    .await;
    match took {
        Ok(took) => {
            println!("{what}: after {took:?}");
            Ok(())
        }
        Err(e) => {
            println!("{e}");
            Err(e)
        }
    }
}

/// [`try_shared_value`] expecting exactly the telemetry.
async fn try_shared_value_matches_telemetry(
    what: &str,
    all: &[Gateway],
    live: &[&Gateway],
) -> Result<(), String> {
    try_shared_value(what, all, live, Expect::Telemetry).await
}

/// What `gw` reserved in `namespace` for the requests it dispatched (a decision line with a
/// reservation) and never wrote a telemetry line for: (USD, requests). A restart on its logs
/// records each of them as `unanswered` at that reservation.
fn unrecorded_reservations(gw: &Gateway, namespace: &str) -> (f64, usize) {
    // Decisions first: a request that settles between the two reads is then recorded.
    let decisions = read_jsonl(&gw.decisions);
    let recorded: std::collections::HashSet<String> = read_jsonl(&gw.telemetry)
        .iter()
        .filter_map(|l| l["request_id"].as_str().map(str::to_owned))
        .collect();
    let (mut usd, mut n) = (0.0, 0);
    for d in decisions {
        if d["tenant_id"] != TENANT || d["budget_namespace"] != namespace {
            continue;
        }
        let Some(reserved) = d["reservation"]["cost_usd"].as_f64().filter(|r| *r > 0.0) else {
            continue;
        };
        if !recorded.contains(d["request_id"].as_str().unwrap_or_default()) {
            usd += reserved;
            n += 1;
        }
    }
    (usd, n)
}

/// [`try_shared_value_matches_telemetry`], panicking with the complaint.
async fn shared_value_matches_telemetry(what: &str, all: &[Gateway], live: &[&Gateway]) {
    if let Err(e) = try_shared_value_matches_telemetry(what, all, live).await {
        panic!("{e}");
    }
}

/// The bound: spend ≤ limit + replicas × the largest single request.
fn assert_budget_held(what: &str, gateways: &[Gateway], tally: &BTreeMap<String, u64>) {
    let (total, largest, billed) = spend(gateways, NAMESPACE);
    let bound = LIMIT_USD + gateways.len() as f64 * largest;
    println!(
        "{what}: spent ${total:.6} over {billed} requests (limit ${LIMIT_USD}, bound ${bound:.6}, largest ${largest:.6}); {}; outcomes {tally:?}",
        spend_by_replica(gateways, NAMESPACE).join(", ")
    );
    assert!(billed > 0, "{what}: nothing was served: {tally:?}");
    assert!(
        total <= bound + TOLERANCE_USD,
        "{what}: spent ${total:.6} > limit ${LIMIT_USD} + {} × ${largest:.6} = ${bound:.6} ({}); {tally:?}",
        gateways.len(),
        spend_by_replica(gateways, NAMESPACE).join(", ")
    );
    assert!(
        tally.get("402").copied().unwrap_or(0) > 0,
        "{what}: no request was refused with 402 by the cap: {tally:?}"
    );
}

/// `name VALUE` of a Prometheus text line without labels.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

async fn readyz(gw: &Gateway) -> Value {
    match reqwest::get(gw.at("/readyz")).await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// One request to `namespace` on `gw`: (status, body).
async fn infer(gw: &Gateway, namespace: &str, i: usize) -> (u16, String) {
    let client = reqwest::Client::new();
    match client
        .post(gw.at("/infer"))
        .json(&body(namespace, 999, i))
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// The scenarios.
// ---------------------------------------------------------------------------------------------

#[test]
fn redis_harness_starts_flushes_stops_and_starts_again_empty_on_the_same_port() {
    let mut redis = RedisServer::start();
    assert!(redis.is_up());
    assert_eq!(redis.cli(&["SET", "k", "v"]), "OK");
    assert_eq!(redis.dbsize(), 1);
    redis.flushall();
    assert_eq!(redis.dbsize(), 0);
    redis.cli(&["SET", "k", "v"]);
    let port = redis.port();
    redis.stop();
    assert!(!redis.is_up(), "still answering after stop");
    redis.start_again();
    assert_eq!(redis.port(), port);
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/"));
    assert_eq!(
        redis.dbsize(),
        0,
        "a restart comes back empty (no persistence)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_replicas_keep_one_cap_where_local_budgets_overshoot_it() {
    let _serial = serial();
    let redis = RedisServer::start();
    let gateways = start_replicas(Some(&redis), "replicas-a", 3);
    let tally = Load::start(&gateways).join().await;
    assert_budget_held("a (redis)", &gateways, &tally);
    let live: Vec<&Gateway> = gateways.iter().collect();
    shared_value_matches_telemetry(
        "a: the shared value is the telemetry of all three",
        &gateways,
        &live,
    )
    .await;
    assert!(redis.dbsize() > 0, "nothing was written to Redis");
    drop(gateways);

    // The control: the same run on three replicas keeping their budgets locally overshoots the
    // bound (each admits up to the whole limit), so the bound above is not met by accident.
    let local = start_replicas(None, "unused", 3);
    let tally = Load::start(&local).join().await;
    let (total, largest, billed) = spend(&local, NAMESPACE);
    let bound = LIMIT_USD + 3.0 * largest;
    println!(
        "a (local control): spent ${total:.6} over {billed} requests, bound ${bound:.6}; {}; outcomes {tally:?}",
        spend_by_replica(&local, NAMESPACE).join(", ")
    );
    assert!(
        total > bound,
        "three `backend: local` replicas were expected to overshoot the shared bound (each keeps \
         its own budget): spent ${total:.6} ≤ ${bound:.6}; {tally:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_a_replica_killed_mid_run_leaves_its_spend_and_its_reservations_as_spent() {
    let _serial = serial();
    let redis = RedisServer::start();
    // gw-3's provider answers slowly, so it is killed with calls in flight: the cap bounds how
    // many requests are in flight at once across the replicas (their reservations count), so
    // at the mock's usual latency gw-3 may hold none at a given instant.
    let mut gateways: Vec<Gateway> = (1..=2)
        .map(|i| start_replica(Some(&redis), "replicas-b", i, LIMIT_USD, 2_000))
        .collect();
    let mut slow = replica_options(Some(&redis), "replicas-b", 3, LIMIT_USD, 2_000);
    slow.mock_latency_ms = 6 * MOCK_LATENCY_MS;
    gateways.push(Gateway::start(&slow));
    let load = Load::start(&gateways);
    // Once gw-3 has settled a few requests and has more in flight (dispatched, no telemetry
    // line yet), while the cap is still far.
    let deadline = Instant::now() + EVENTUALLY;
    while (spend(&gateways[2..], NAMESPACE).2 < 3
        || unrecorded_reservations(&gateways[2], NAMESPACE).1 == 0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    gateways[2].child.kill().unwrap();
    let _ = gateways[2].child.wait();
    let killed_at = Instant::now();
    let (settled, _, _) = spend(&gateways, NAMESPACE);
    // Informative only (no timing is asserted): right after the kill the survivors still count
    // gw-3's reservations, its lease has not run out yet.
    if let Ok(seen) = window_cost(&gateways[0], NAMESPACE).await {
        println!(
            "b: just after the kill gw-1 sees ${seen:.6}, the telemetry says ${settled:.6} settled"
        );
    }
    let tally = load.join().await;
    assert_budget_held("b (gw-3 killed)", &gateways, &tally);
    println!("b: load over {:?} after the kill", killed_at.elapsed());
    // What gw-3 dispatched and never recorded (killed mid-call) may well have been billed: the
    // survivors keep counting it at its reservation, also once gw-3's lease has run out, as
    // gw-3's restart records it. Their figure is never below the telemetry of all three plus
    // those reservations (it is above by what gw-3 had reserved for a request it had recorded
    // but not yet shared when it died, or released but not yet written).
    let (unrecorded_usd, unrecorded) = unrecorded_reservations(&gateways[2], NAMESPACE);
    println!("b: gw-3 died with {unrecorded} dispatched requests unrecorded, ${unrecorded_usd:.6} reserved");
    assert!(
        unrecorded > 0,
        "b: gw-3 had no request in flight when it was killed: the scenario did not happen"
    );
    let lease_over = Duration::from_millis(LEASE_MS + 500);
    if let Some(left) = lease_over.checked_sub(killed_at.elapsed()) {
        tokio::time::sleep(left).await;
    }
    let live: Vec<&Gateway> = gateways[..2].iter().collect();
    let mut failures = Vec::new();
    failures.extend(
        try_shared_value(
            "b: once gw-3's lease ran out the survivors still count its settled spend and what it \
             had in flight",
            &gateways,
            &live,
            Expect::AtLeast(unrecorded_usd),
        )
        .await
        .err(),
    );
    println!(
        "b: {:?} after the kill (lease {LEASE_MS} ms)",
        killed_at.elapsed()
    );

    // gw-3 restarted on its logs, same replica_id: it records its requests that were in flight
    // at the kill as `unanswered` (at their estimates) and writes its share again from its
    // logs; every replica then sees exactly the telemetry of all three.
    let mut opts = replica_options(Some(&redis), "replicas-b", 3, LIMIT_USD, 2_000);
    opts.logs = Some((gateways[2].telemetry.clone(), gateways[2].decisions.clone()));
    let again = Gateway::start(&opts);
    let unanswered = read_jsonl(&again.telemetry)
        .iter()
        .filter(|l| l["status"] == "unanswered")
        .count();
    println!("b: gw-3 restarted on its logs ({unanswered} requests recorded as unanswered)");
    if unanswered != unrecorded {
        failures.push(format!(
            "b: gw-3's restart recorded {unanswered} requests as unanswered, it had dispatched \
             {unrecorded} without a telemetry line"
        ));
    }
    let live = [&gateways[0], &gateways[1], &again];
    failures.extend(
        try_shared_value_matches_telemetry(
            "b: after gw-3's restart every replica sees the telemetry of all three",
            &gateways,
            &live,
        )
        .await
        .err(),
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_redis_restarted_empty_or_flushed_loses_and_doubles_nothing() {
    let _serial = serial();
    let mut redis = RedisServer::start();
    let gateways = start_replicas(Some(&redis), "replicas-c", 3);
    let load = Load::start(&gateways);
    load.served_at_least(8).await;
    redis.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.start_again();
    let tally = load.join().await;
    assert_budget_held("c (Redis restarted)", &gateways, &tally);
    let live: Vec<&Gateway> = gateways.iter().collect();
    shared_value_matches_telemetry(
        "c: after the restart every replica sees the telemetry of all three",
        &gateways,
        &live,
    )
    .await;

    // FLUSHALL with nothing in flight: each replica writes its contribution again.
    redis.flushall();
    shared_value_matches_telemetry(
        "c: after FLUSHALL every replica sees the telemetry of all three",
        &gateways,
        &live,
    )
    .await;
    assert!(
        redis.dbsize() > 0,
        "nothing was written again after FLUSHALL"
    );

    // And the cap still holds after all that: a second wave is refused once it is reached.
    let tally = Load::start(&gateways).join().await;
    let (total, largest, _) = spend(&gateways, NAMESPACE);
    println!("c: second wave {tally:?}, total ${total:.6}");
    assert!(
        total <= LIMIT_USD + 3.0 * largest + TOLERANCE_USD,
        "c: after the second wave ${total:.6} was spent against a limit of ${LIMIT_USD}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_a_store_emptied_at_the_cap_does_not_reopen_it() {
    let _serial = serial();
    let mut redis = RedisServer::start();
    let gateways = start_replicas(Some(&redis), "replicas-e", 3);
    let live: Vec<&Gateway> = gateways.iter().collect();
    let tally = Load::start(&gateways).join().await;
    assert_budget_held("e (the cap reached)", &gateways, &tally);
    shared_value_matches_telemetry("e: the cap reached and settled", &gateways, &live).await;

    // The cap is spent. Empty the store and send the next wave at once, before the replicas
    // had a chance to write their shares again: it must not find the budget open.
    for (how, empty) in [
        (
            "FLUSHALL",
            &mut (|r: &mut RedisServer| r.flushall()) as &mut dyn FnMut(&mut RedisServer),
        ),
        (
            "a restart",
            &mut (|r: &mut RedisServer| r.start_again()) as &mut dyn FnMut(&mut RedisServer),
        ),
    ] {
        let before = spend(&gateways, NAMESPACE).0;
        empty(&mut redis);
        let tally = Load::start(&gateways).join().await;
        let (total, largest, _) = spend(&gateways, NAMESPACE);
        println!(
            "e: wave right after {how}: {tally:?}, spent ${:.6} more, total ${total:.6} (limit ${LIMIT_USD}; {})",
            total - before,
            spend_by_replica(&gateways, NAMESPACE).join(", ")
        );
        assert!(
            total <= LIMIT_USD + 3.0 * largest + TOLERANCE_USD,
            "e: a wave sent right after {how} spent ${:.6} more on a spent cap: total ${total:.6} > limit ${LIMIT_USD} + 3 × ${largest:.6}; {tally:?}",
            total - before
        );
        shared_value_matches_telemetry(
            &format!("e: after {how} and its wave every replica sees the telemetry of all three"),
            &gateways,
            &live,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_an_idle_replicas_share_counts_right_after_the_store_is_emptied() {
    let _serial = serial();
    let redis = RedisServer::start();
    let gateways = start_replicas(Some(&redis), "replicas-f", 3);
    let live: Vec<&Gateway> = gateways.iter().collect();
    // gw-3 alone spends the cap, then goes idle.
    let tally = Load::start_to(&[&gateways[2]]).join().await;
    assert_budget_held("f (the cap spent through gw-3)", &gateways, &tally);
    shared_value_matches_telemetry("f: the cap spent and settled", &gateways, &live).await;

    // The store loses everything; the next wave goes to gw-1 and gw-2 only. gw-3's share must
    // keep the cap closed although gw-3 serves nothing that would write it again.
    let before = spend(&gateways, NAMESPACE).0;
    redis.flushall();
    let tally = Load::start_to(&[&gateways[0], &gateways[1]]).join().await;
    let (total, largest, _) = spend(&gateways, NAMESPACE);
    println!(
        "f: wave on gw-1 and gw-2 right after FLUSHALL: {tally:?}, spent ${:.6} more, total ${total:.6} (limit ${LIMIT_USD}; {})",
        total - before,
        spend_by_replica(&gateways, NAMESPACE).join(", ")
    );
    assert!(
        total <= LIMIT_USD + 3.0 * largest + TOLERANCE_USD,
        "f: right after FLUSHALL gw-1 and gw-2 spent ${:.6} more on a cap gw-3 had spent: total ${total:.6} > limit ${LIMIT_USD} + 3 × ${largest:.6}; {tally:?}",
        total - before
    );
    shared_value_matches_telemetry(
        "f: after FLUSHALL every replica sees the telemetry of all three",
        &gateways,
        &live,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_redis_down_fails_closed_or_open_per_rule_and_recovers_by_itself() {
    let _serial = serial();
    let mut redis = RedisServer::start();
    let gw = start_replica(Some(&redis), "replicas-d", 1, 1.0, 200);

    // Healthy: both namespaces serve, the store is up.
    let (status, text) = infer(&gw, NAMESPACE, 0).await;
    assert_eq!(
        status, 200,
        "with Redis up the closed namespace serves: {text}"
    );
    let (status, text) = infer(&gw, "open", 0).await;
    assert_eq!(
        status, 200,
        "with Redis up the open namespace serves: {text}"
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "llmscope_shared_budgets_up"),
        Some(1.0),
        "llmscope_shared_budgets_up with Redis up:\n{metrics}"
    );
    let ready = readyz(&gw).await;
    assert_eq!(ready["budgets"]["backend"], "redis", "/readyz: {ready}");
    assert_eq!(ready["budgets"]["reachable"], true, "/readyz: {ready}");

    redis.stop();
    let mut i = 1;
    eventually(
        "d: with Redis down the closed namespace refuses",
        EVENTUALLY,
        || {
            i += 1;
            let i = i;
            let gw = &gw;
            async move {
                let (status, text) = infer(gw, NAMESPACE, i).await;
                if status == 402 && text.contains("shared budget store") {
                    Ok(())
                } else {
                    Err(format!("{status}: {text}"))
                }
            }
        },
    )
    .await;
    let (status, text) = infer(&gw, "open", 1).await;
    assert_eq!(
        status, 200,
        "with Redis down the fail-open namespace serves on the local figures: {text}"
    );
    let ready = readyz(&gw).await;
    assert_eq!(ready["budgets"]["backend"], "redis", "/readyz: {ready}");
    assert_eq!(
        ready["budgets"]["reachable"], false,
        "/readyz with Redis down: {ready}"
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "llmscope_shared_budgets_up"),
        Some(0.0),
        "llmscope_shared_budgets_up with Redis down:\n{metrics}"
    );
    let errors = metric(&metrics, "llmscope_shared_budgets_errors_total");
    assert!(
        errors.is_some_and(|e| e > 0.0),
        "llmscope_shared_budgets_errors_total with Redis down: {errors:?}\n{metrics}"
    );

    redis.start_again();
    let took = eventually(
        "d: with Redis back the closed namespace serves and the gauge is 1",
        EVENTUALLY,
        || {
            i += 1;
            let i = i;
            let gw = &gw;
            async move {
                let (status, text) = infer(gw, NAMESPACE, i).await;
                if status != 200 {
                    return Err(format!("closed namespace: {status}: {text}"));
                }
                let metrics = gw.metrics().await;
                let up = metric(&metrics, "llmscope_shared_budgets_up");
                if up != Some(1.0) {
                    return Err(format!("llmscope_shared_budgets_up {up:?}"));
                }
                let ready = readyz(gw).await;
                if ready["budgets"]["reachable"] != true {
                    return Err(format!("/readyz: {ready}"));
                }
                Ok(())
            }
        },
    )
    .await;
    println!("d: recovered {took:?} after Redis came back");
}

/// g: what a dead boot left in a key (a reservation it never released: killed before its
/// release was written, or before its decision line) counts as spent while nothing of that
/// replica has rewritten its share; once a new boot of that replica has written all it holds
/// — nothing in that key — it stops counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_dead_boots_leftover_counts_until_its_replica_rebuilt_its_share() {
    let _serial = serial();
    let redis = RedisServer::start();
    let gw1 = start_replica(Some(&redis), "replicas-g", 1, LIMIT_USD, 2_000);
    let (status, text) = infer(&gw1, NAMESPACE, 0).await;
    assert_eq!(status, 200, "{text}");
    let gateways = [gw1];
    let live: Vec<&Gateway> = gateways.iter().collect();
    shared_value_matches_telemetry("g: gw-1 alone", &gateways, &live).await;
    // A dead boot of gw-3 (never in the live set; its id sorts before any real boot's) left
    // $0.001 in flight in the cap's key.
    let keys = redis.cli(&["--scan", "--pattern", "replicas-g:b:*"]);
    let capped: Vec<&str> = keys
        .lines()
        .filter(|k| k.contains(&format!("\"{NAMESPACE}\"")))
        .collect();
    assert!(!capped.is_empty(), "no key of the cap in Redis: {keys}");
    let leave = |boot: &str| {
        for key in &capped {
            leftover(&redis, key, boot);
        }
    };
    leave("gw-3/00000000000000000000000000000000");
    let left_usd = 0.001 * capped.len() as f64;
    let (total, _, _) = spend(&gateways, NAMESPACE);
    let seen = window_cost(&gateways[0], NAMESPACE).await.unwrap();
    assert!(
        (seen - (total + left_usd)).abs() <= TOLERANCE_USD,
        "g: a dead boot's reservation counts as spent: gw-1 sees ${seen:.9}, the telemetry says ${total:.9} plus ${left_usd} left in flight"
    );
    // gw-3 starts again (its logs hold nothing of that money): once it has written its share,
    // the leftover no longer counts.
    let gw3 = start_replica(Some(&redis), "replicas-g", 3, LIMIT_USD, 2_000);
    let all = [&gateways[0], &gw3];
    shared_value_matches_telemetry(
        "g: after gw-3's new boot rewrote its share the dead boot's leftover is gone",
        &gateways,
        &all,
    )
    .await;
    // What a boot after the one that marked left (killed before its own mark) still counts.
    leave("gw-3/ffffffffffffffffffffffffffffffff");
    let seen = window_cost(&gateways[0], NAMESPACE).await.unwrap();
    assert!(
        (seen - (total + left_usd)).abs() <= TOLERANCE_USD,
        "g: a later dead boot's reservation counts as spent: gw-1 sees ${seen:.9}, the telemetry says ${total:.9} plus ${left_usd} left in flight"
    );
}

/// Write into `key` the fields of replica gw-3 as boot `boot` left them: $0.001 (one request,
/// 10 + 500 tokens) in flight, nothing settled.
fn leftover(redis: &RedisServer, key: &str, boot: &str) {
    let mut args: Vec<String> = ["HSET", key, "gw-3|b", boot, "gw-3|q", "1"]
        .map(str::to_owned)
        .to_vec();
    for (field, value) in [
        ("c", "0"),
        ("i", "0"),
        ("o", "0"),
        ("n", "0"),
        ("fc", "0.001"),
        ("fi", "10"),
        ("fo", "500"),
        ("fn", "1"),
    ] {
        args.push(format!("gw-3|{field}"));
        args.push(value.to_owned());
    }
    redis.cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
}
