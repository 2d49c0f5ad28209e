//! Spend integrity: every dollar a provider bills is on record exactly once, at what it was
//! billed, and the budgets see it — under client aborts, log rotation, concurrent queries,
//! `kill -9`, policy reloads, a full disk, failing primaries with pricier fallbacks and provider
//! usage above the estimate.
//!
//! Each scenario runs the real binary against [`BillingProvider`], an OpenAI-compatible provider
//! that bills every call it answers (after its latency, whether or not the gateway is still
//! connected), then restarts the gateway on the same logs and checks the invariants of
//! [`check_invariants`]. The tests are written to the target semantics (issue 11):
//!
//! - telemetry `status`: `ok | error | denied | cancelled | unanswered`; `cancelled` (client
//!   gone) is recorded at the provider's usage when the provider answered, else at the estimate;
//!   `unanswered` is written at startup, at the estimate, for decisions without telemetry;
//! - `cost_source`: `provider_usage | tokenizer | estimate | none`;
//! - the decision line is written before dispatch; when the logs cannot be written the gateway
//!   answers 503 before calling the provider.
//!
//! The numbers of each run are printed (`--nocapture`) and included in a failure's message.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    clippy::print_stderr,
    clippy::await_holding_lock,
    reason = "integration tests: a failed unwrap or panic is a failed test; runs print their \
              numbers; each scenario holds SERIAL for its whole run"
)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use llmscope_tests::billing::{Bill, BillingProvider, Usage};
use llmscope_tests::gateway::{read_jsonl, Gateway, Options};
use llmscope_tests::upstream::Upstream;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Configuration: one price table for the gateway's config and the bill.
// ---------------------------------------------------------------------------------------------

/// A priced model: name, USD per 1M input and output tokens, fallbacks.
struct Model {
    name: &'static str,
    input_per_1m: f64,
    output_per_1m: f64,
    fallback: &'static [&'static str],
}

/// The seed's models and prices, all served by the billing provider.
const MODELS: [Model; 4] = [
    Model {
        name: "gpt-4o-mini",
        input_per_1m: 0.15,
        output_per_1m: 0.60,
        fallback: &["claude-haiku-3-5-20241022"],
    },
    Model {
        name: "gpt-4o",
        input_per_1m: 2.50,
        output_per_1m: 10.00,
        fallback: &["claude-sonnet-4-20250514"],
    },
    Model {
        name: "claude-sonnet-4-20250514",
        input_per_1m: 3.00,
        output_per_1m: 15.00,
        fallback: &[],
    },
    Model {
        name: "claude-haiku-3-5-20241022",
        input_per_1m: 0.80,
        output_per_1m: 4.00,
        fallback: &[],
    },
];

/// The cheap tier's model (the one the load asks for).
const PRIMARY: &str = "gpt-4o-mini";
/// Its (pricier) fallback.
const FALLBACK: &str = "claude-haiku-3-5-20241022";
/// `max_output_tokens` of the route: the output part of every estimate.
const MAX_OUTPUT_TOKENS: u32 = 200;
/// The budget rule's id.
const RULE_ID: &str = "cap";
/// Tenant of every request.
const TENANT: &str = "acme";
/// Cost agreement between the bill and telemetry.
const TOLERANCE_USD: f64 = 1e-9;

/// The gateway configuration around `provider` (placeholders as in `Gateway::start`).
fn config_template(provider: &BillingProvider) -> String {
    let mut models = String::new();
    for m in &MODELS {
        models.push_str(&format!(
            "  {}: {{provider: billing, input_per_1m: {}, output_per_1m: {}, fallback: [{}]}}\n",
            m.name,
            m.input_per_1m,
            m.output_per_1m,
            m.fallback.join(", ")
        ));
    }
    format!(
        r#"
server:
  listen: "127.0.0.1:0"
  max_body_bytes: {{max_body}}
artifacts:
  telemetry_path: "{{telemetry}}"
  decisions_path: "{{decisions}}"
policy:
  file: "{{policy_file}}"
  policies_dir: "{{policies_dir}}"
  deadline_ms: {{deadline_ms}}
models:
{models}routes:
  /answer-routed: {{max_output_tokens: {MAX_OUTPUT_TOKENS}, tiers: {{cheap: {PRIMARY}, expensive: gpt-4o}}}}
providers:
  billing: {{kind: openai, base_url: "{base}", timeout_ms: 30000, max_retries: 0}}
{{extra}}
"#,
        base = provider.base_url(),
    )
}

/// One `budget_threshold` rule on the default namespace: deny beyond `limit_usd` an hour.
fn policy_yaml(limit_usd: f64, version: u32) -> String {
    format!(
        "version: \"integrity-{version}\"\nnamespaces:\n  default:\n    rules:\n      - {{id: {RULE_ID}, primitive: budget_threshold, period: hourly, limit_usd: {limit_usd}, action: deny, deny_reason: \"integrity cap\"}}\n"
    )
}

/// What the provider charged for `bill`, at the configured prices (`pricing::cost_usd`'s formula).
fn billed_cost(bill: &Bill) -> f64 {
    let m = MODELS
        .iter()
        .find(|m| m.name == bill.model)
        .unwrap_or_else(|| panic!("billed an unknown model {}", bill.model));
    (bill.tokens_in as f64 * m.input_per_1m + bill.tokens_out as f64 * m.output_per_1m) / 1e6
}

/// Scenarios run one at a time (each loads both cores), whatever `--test-threads` says.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// A scenario's plan and rig.
// ---------------------------------------------------------------------------------------------

/// The knobs of one scenario.
#[derive(Debug, Clone)]
struct Plan {
    name: &'static str,
    /// Concurrent clients.
    clients: usize,
    /// Most requests per client.
    per_client: usize,
    /// How long the load runs at most.
    duration: Duration,
    /// Provider latency.
    latency: Duration,
    /// Percent of the clients that hang up mid-call.
    abort_pct: usize,
    /// When those clients hang up.
    abort_after: Duration,
    /// `limit_usd` of the budget rule.
    limit_usd: f64,
    /// Whether billed calls may end up as `unanswered` (a crash, a full disk).
    allow_unanswered: bool,
    /// Persist DuckDB (`analytics.duckdb_path`), as a deployment that rotates its logs does.
    duckdb_file: bool,
}

impl Plan {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            clients: 16,
            per_client: 400,
            duration: Duration::from_secs(8),
            latency: Duration::from_millis(200),
            abort_pct: 0,
            abort_after: Duration::from_millis(200),
            limit_usd: 0.01,
            allow_unanswered: false,
            duckdb_file: false,
        }
    }
}

/// A tmpfs mounted over a directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if out.status.success() {
            Ok(Self(dir.to_path_buf()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A scenario in progress: the provider, the logs, the gateway, what went wrong.
///
/// Fields drop in order: the gateway is killed before the tmpfs is unmounted and the temp dir
/// removed.
struct Rig {
    gw: Option<Gateway>,
    /// The gateway's `/infer` URL, shared with the load (it changes when the gateway restarts).
    url: Arc<RwLock<String>>,
    plan: Plan,
    provider: BillingProvider,
    telemetry: PathBuf,
    decisions: PathBuf,
    policy_version: u32,
    violations: Vec<String>,
    notes: Vec<String>,
    _mount: Option<Tmpfs>,
    dir: tempfile::TempDir,
}

impl Rig {
    async fn new(plan: Plan) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        Self::assemble(plan, None, dir, logs).await
    }

    async fn assemble(
        plan: Plan,
        mount: Option<Tmpfs>,
        dir: tempfile::TempDir,
        logs: PathBuf,
    ) -> Self {
        let provider =
            BillingProvider::start(plan.latency, Some(dir.path().join("bills.jsonl"))).await;
        let mut rig = Self {
            gw: None,
            url: Arc::new(RwLock::new(String::new())),
            plan,
            provider,
            telemetry: logs.join("telemetry.jsonl"),
            decisions: logs.join("policy_decisions.jsonl"),
            policy_version: 1,
            violations: Vec::new(),
            notes: Vec::new(),
            _mount: mount,
            dir,
        };
        rig.start_gateway();
        rig
    }

    fn options(&self) -> Options {
        let mut opts = Options::new(&policy_yaml(self.plan.limit_usd, self.policy_version));
        opts.config_template = Some(config_template(&self.provider));
        opts.logs = Some((self.telemetry.clone(), self.decisions.clone()));
        opts.max_body_bytes = 65_536;
        opts.extra_yaml = if self.plan.duckdb_file {
            format!(
                "analytics: {{refresh_interval_ms: 100, duckdb_path: \"{}\"}}\n",
                self.dir.path().join("spend.duckdb").display()
            )
        } else {
            "analytics: {refresh_interval_ms: 100}\n".into()
        };
        opts
    }

    /// Start (or restart) the gateway on the same logs.
    fn start_gateway(&mut self) {
        let gw = tokio::task::block_in_place(|| Gateway::start(&self.options()));
        *self.url.write().unwrap() = gw.at("/infer");
        self.gw = Some(gw);
    }

    fn gw(&self) -> &Gateway {
        self.gw.as_ref().unwrap()
    }

    /// How the gateway process ended, if it has (reaped then).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let gw = self.gw.as_mut()?;
        gw.child.try_wait().ok().flatten()
    }

    fn pid(&self) -> String {
        self.gw().child.id().to_string()
    }

    fn signal(&self, sig: &str) {
        let _ = std::process::Command::new("kill")
            .args([sig, &self.pid()])
            .status();
    }

    fn violation(&mut self, v: String) {
        eprintln!("[{}] VIOLATION {v}", self.plan.name);
        self.violations.push(v);
    }

    fn note(&mut self, n: String) {
        eprintln!("[{}] {n}", self.plan.name);
        self.notes.push(n);
    }

    /// `llmscope_requests_in_flight` of the gateway, if it answers.
    async fn in_flight(&self) -> Option<f64> {
        let text = reqwest::get(self.gw().at("/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("llmscope_requests_in_flight "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Send SIGHUP (logrotate's `postrotate`); a gateway that dies of it is a violation and is
    /// started again on the same logs so the scenario goes on.
    async fn sighup(&mut self, what: &str) {
        self.signal("-HUP");
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                self.violation(format!(
                    "b: the gateway exited on SIGHUP after {what} ({status}); restarted on the same logs"
                ));
                self.start_gateway();
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// End the scenario: settle, check the live gateway, stop it, restart it on the same logs,
    /// check every invariant; panics with the numbers when one fails.
    async fn finish(mut self, tally: BTreeMap<String, u64>) {
        let idle_within = self.plan.latency + Duration::from_secs(30);
        if !self.provider.wait_idle(idle_within).await {
            let pending = self.provider.pending();
            self.violation(format!(
                "setup: {pending} provider calls still running {idle_within:?} after the load"
            ));
        }
        if let Some(status) = self.exited() {
            self.note(format!("the gateway was not running at the end ({status})"));
        } else {
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.in_flight().await.unwrap_or(0.0) > 0.0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let live = read_logs(&self.telemetry, &self.decisions);
            let found = check_engine(self.gw(), &live, "live gateway").await;
            for v in found {
                self.violation(v);
            }
            let gw = self.gw.as_mut().unwrap();
            let (status, _) = tokio::task::block_in_place(|| gw.stop());
            if !status.success() {
                self.violation(format!("setup: SIGTERM ended the gateway with {status}"));
            }
        }
        let before = read_logs(&self.telemetry, &self.decisions);
        self.start_gateway();
        let bills = self.provider.bills();
        if bills.is_empty() {
            self.violation(
                "setup: the provider billed nothing; the scenario tested nothing".into(),
            );
        }
        if self.plan.allow_unanswered {
            // Startup writes `unanswered` lines for decisions without telemetry; give it time.
            let logged = before.telemetry_ids();
            let expected: HashSet<&str> = bills
                .iter()
                .map(|b| b.request_id.as_str())
                .filter(|id| !logged.contains(id))
                .collect();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let now = read_logs(&self.telemetry, &self.decisions);
                let ids = now.telemetry_ids();
                if expected.iter().all(|id| ids.contains(id)) || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let after = read_logs(&self.telemetry, &self.decisions);
        let found = check_invariants(self.gw(), &self.plan, &bills, &before, &after).await;
        for v in found {
            self.violation(v);
        }
        let gw = self.gw.as_mut().unwrap();
        let _ = tokio::task::block_in_place(|| gw.stop());
        if let Err(e) = verify_logs(&self.telemetry, &self.decisions) {
            self.violation(format!("6: `llmscope logs verify` failed: {e}"));
        }
        let summary = summary(&self.plan, &tally, &self.provider, &bills, &after);
        eprintln!("[{}] {summary}", self.plan.name);
        if !self.violations.is_empty() {
            panic!(
                "scenario {}: {} invariant violation(s)\n{summary}\nnotes: {:?}\n- {}",
                self.plan.name,
                self.violations.len(),
                self.notes,
                self.violations.join("\n- ")
            );
        }
    }
}

fn summary(
    plan: &Plan,
    tally: &BTreeMap<String, u64>,
    provider: &BillingProvider,
    bills: &[Bill],
    after: &Logs,
) -> String {
    let total: f64 = bills.iter().map(billed_cost).sum::<f64>() + 0.0;
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for l in &after.telemetry {
        *statuses
            .entry(l["status"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    format!(
        "clients {}: {tally:?}; provider received {} calls, failed {}, billed {} calls for ${total:.6} \
         (limit ${}); telemetry {} lines {statuses:?}; decisions {} lines",
        plan.clients,
        provider.received(),
        provider.failed(),
        bills.len(),
        plan.limit_usd,
        after.telemetry.len(),
        after.decisions.len(),
    )
}

// ---------------------------------------------------------------------------------------------
// Load.
// ---------------------------------------------------------------------------------------------

/// Concurrent clients posting to the gateway until stopped, their count or the plan's time is up.
struct Load {
    stop: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<BTreeMap<String, u64>>>,
}

impl Load {
    fn start(rig: &Rig) -> Self {
        Self::start_with(rig, rig.plan.clients)
    }

    fn start_with(rig: &Rig, clients: usize) -> Self {
        let plan = rig.plan.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + plan.duration;
        let mut handles = Vec::new();
        for c in 0..clients {
            let (url, stop, plan) = (Arc::clone(&rig.url), Arc::clone(&stop), plan.clone());
            // `abort_pct` percent of the clients, spread evenly.
            let aborts = (c * plan.abort_pct) % 100 + plan.abort_pct >= 100;
            handles.push(tokio::spawn(async move {
                let timeout = if aborts {
                    plan.abort_after
                } else {
                    Duration::from_secs(60)
                };
                let client = reqwest::Client::builder().timeout(timeout).build().unwrap();
                let mut tally = BTreeMap::new();
                for i in 0..plan.per_client {
                    if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                        break;
                    }
                    let target = url.read().unwrap().clone();
                    let body = json!({
                        "prompt": format!("integrity {} client {c} request {i}: summarize the quarterly report", plan.name),
                        "tenant_id": TENANT, "feature_id": "summarize",
                        "route_name": "/answer-routed", "model_tier": "cheap",
                    });
                    let outcome = match client.post(&target).json(&body).send().await {
                        Ok(resp) => {
                            let status = resp.status().as_u16().to_string();
                            match resp.bytes().await {
                                Ok(_) => status,
                                Err(_) if aborts => "aborted".to_owned(),
                                Err(_) => "body-error".to_owned(),
                            }
                        }
                        Err(e) if e.is_timeout() && aborts => "aborted".to_owned(),
                        Err(e) if e.is_timeout() => "timeout".to_owned(),
                        Err(_) => "connection-error".to_owned(),
                    };
                    // Refusals and errors come back at once: pace them.
                    if outcome != "200" && outcome != "aborted" {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    *tally.entry(outcome).or_insert(0) += 1;
                }
                tally
            }));
        }
        Self { stop, handles }
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

    async fn stop(self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.join().await
    }
}

// ---------------------------------------------------------------------------------------------
// Logs.
// ---------------------------------------------------------------------------------------------

/// `base` and its rotated siblings (`base.1`, `base.2`, ...), oldest first.
fn log_files(base: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = (1..=9)
        .rev()
        .map(|n| PathBuf::from(format!("{}.{n}", base.display())))
        .filter(|p| p.is_file())
        .collect();
    files.push(base.to_path_buf());
    files
}

/// Every line of the logs, rotated files included.
struct Logs {
    telemetry: Vec<Value>,
    decisions: Vec<Value>,
    /// Torn or unparsable lines.
    problems: Vec<String>,
}

impl Logs {
    fn telemetry_ids(&self) -> HashSet<&str> {
        self.telemetry
            .iter()
            .filter_map(|l| l["request_id"].as_str())
            .collect()
    }
}

fn read_logs(telemetry: &Path, decisions: &Path) -> Logs {
    let mut problems = Vec::new();
    let mut read = |base: &Path| {
        let mut lines = Vec::new();
        for file in log_files(base) {
            let bytes = std::fs::read(&file).unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes);
            for (i, l) in text.split_terminator('\n').enumerate() {
                match serde_json::from_str::<Value>(l) {
                    Ok(v) => lines.push(v),
                    Err(e) => problems.push(format!("{}:{}: {e}", file.display(), i + 1)),
                }
            }
            if !bytes.is_empty() && !bytes.ends_with(b"\n") {
                problems.push(format!("{} ends mid-line", file.display()));
            }
        }
        lines
    };
    let telemetry = read(telemetry);
    let decisions = read(decisions);
    Logs {
        telemetry,
        decisions,
        problems,
    }
}

/// Lines by request id.
fn by_id(lines: &[Value]) -> HashMap<&str, Vec<&Value>> {
    let mut map: HashMap<&str, Vec<&Value>> = HashMap::new();
    for l in lines {
        map.entry(l["request_id"].as_str().unwrap_or(""))
            .or_default()
            .push(l);
    }
    map
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// "N: a, b, c ..." for a violation message.
fn examples(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(3).map(String::as_str).collect();
    format!(
        "{}{}",
        shown.join("; "),
        if items.len() > 3 { "; ..." } else { "" }
    )
}

// ---------------------------------------------------------------------------------------------
// The invariants.
// ---------------------------------------------------------------------------------------------

/// Every invariant, on the logs just before the final restart (`before`), the logs after it
/// (`after`) and the restarted gateway `gw`:
///
/// 1. every billed call is in telemetry exactly once at its billed cost (`provider_usage`), and
///    has a decision line — or, where the plan allows it (crash, full disk), it has a decision
///    line but no telemetry before the restart and an `unanswered` line at its estimate after;
/// 2. no request id twice in telemetry or in decisions;
/// 3. DuckDB rows == JSONL lines (calls per `cost_by_tenant_and_feature`, decisions per
///    `budget_pressure_by_namespace`);
/// 4. after the restart the budget rule sees at least the spend billed in its scope;
/// 5. billed spend in the scope ≤ `limit_usd` + the largest single request's billed cost;
/// 6. `llmscope logs verify` passes (checked by [`Rig::finish`] after the gateway stops).
async fn check_invariants(
    gw: &Gateway,
    plan: &Plan,
    bills: &[Bill],
    before: &Logs,
    after: &Logs,
) -> Vec<String> {
    let mut v = check_spend(plan, bills, before, after);
    v.extend(check_engine(gw, after, "restarted gateway").await);
    let billed_total: f64 = bills.iter().map(billed_cost).sum();
    v.extend(check_budget_seen(gw, billed_total).await);
    v
}

/// Invariants 1, 2 and 5 (and whole lines), from the bill and the logs.
fn check_spend(plan: &Plan, bills: &[Bill], before: &Logs, after: &Logs) -> Vec<String> {
    let mut v = Vec::new();
    for (name, logs) in [("before the restart", before), ("after the restart", after)] {
        if !logs.problems.is_empty() {
            v.push(format!(
                "logs {name}: {} torn or unparsable lines: {}",
                logs.problems.len(),
                examples(&logs.problems)
            ));
        }
    }
    let unlabelled = bills.iter().filter(|b| b.request_id.is_empty()).count();
    if unlabelled > 0 {
        v.push(format!(
            "1: {unlabelled} of {} billed calls carried no X-Client-Request-Id",
            bills.len()
        ));
    }
    // Billed cost per request (a request may be billed more than once, e.g. a retried timeout).
    let mut billed: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for b in bills.iter().filter(|b| !b.request_id.is_empty()) {
        let e = billed.entry(b.request_id.as_str()).or_insert((0.0, 0));
        e.0 += billed_cost(b);
        e.1 += 1;
    }
    let (tel_after, dec_after) = (by_id(&after.telemetry), by_id(&after.decisions));
    let (tel_before, dec_before) = (by_id(&before.telemetry), by_id(&before.decisions));
    let (mut missing, mut twice, mut wrong_cost, mut wrong_source) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut no_decision, mut bad_unanswered, mut undecided_before) =
        (Vec::new(), Vec::new(), Vec::new());
    let mut unanswered_ok = 0;
    for (&id, &(cost, _)) in &billed {
        let lines = tel_after.get(id).map_or(&[][..], Vec::as_slice);
        match lines {
            [] => missing.push(id.to_owned()),
            [l] if l["status"] == "unanswered" => {
                let estimate = num(&l["estimated_cost_usd"]);
                if !plan.allow_unanswered {
                    bad_unanswered.push(format!("{id}: unanswered without a crash"));
                } else if tel_before.contains_key(id) {
                    bad_unanswered.push(format!("{id}: unanswered, yet it had telemetry"));
                } else if (num(&l["cost_usd"]) - estimate).abs() > TOLERANCE_USD {
                    bad_unanswered.push(format!(
                        "{id}: unanswered at ${} instead of its estimate ${estimate}",
                        l["cost_usd"]
                    ));
                } else {
                    unanswered_ok += 1;
                }
            }
            [l] => {
                let logged = num(&l["cost_usd"]);
                if (logged - cost).abs() > TOLERANCE_USD || logged.is_nan() {
                    wrong_cost.push(format!(
                        "{id}: billed ${cost:.9}, logged ${logged:.9} (status {}, {})",
                        l["status"], l["cost_source"]
                    ));
                }
                if l["cost_source"] != "provider_usage" {
                    wrong_source.push(format!("{id}: {}", l["cost_source"]));
                }
            }
            more => twice.push(format!("{id}: {} lines", more.len())),
        }
        if !dec_after.contains_key(id) {
            no_decision.push(id.to_owned());
        }
        if plan.allow_unanswered && !tel_before.contains_key(id) && !dec_before.contains_key(id) {
            undecided_before.push(id.to_owned());
        }
    }
    let n = billed.len();
    let mut push = |what: &str, items: &[String]| {
        if !items.is_empty() {
            v.push(format!(
                "1: {} of {n} billed calls {what}: {}",
                items.len(),
                examples(items)
            ));
        }
    };
    push("have no telemetry line", &missing);
    push("have more than one telemetry line", &twice);
    push("are logged at another cost than billed", &wrong_cost);
    push(
        "are not logged with cost_source provider_usage",
        &wrong_source,
    );
    push("have a bad `unanswered` line", &bad_unanswered);
    push("have no decision line", &no_decision);
    push(
        "had neither telemetry nor a decision line before the restart (decision not written before dispatch)",
        &undecided_before,
    );
    if plan.allow_unanswered {
        eprintln!(
            "[{}] {unanswered_ok} billed calls recorded as unanswered at their estimate",
            plan.name
        );
    }
    // Provider charges on record that the provider never billed.
    let phantom: Vec<String> = after
        .telemetry
        .iter()
        .filter(|l| l["cost_source"] == "provider_usage")
        .filter_map(|l| l["request_id"].as_str())
        .filter(|id| !billed.contains_key(id))
        .map(str::to_owned)
        .collect();
    if !phantom.is_empty() {
        v.push(format!(
            "1: {} telemetry lines charge provider usage the provider never billed: {}",
            phantom.len(),
            examples(&phantom)
        ));
    }

    // 2: no request id twice.
    for (name, index) in [("telemetry", &tel_after), ("decisions", &dec_after)] {
        let dups: Vec<String> = index
            .iter()
            .filter(|(_, lines)| lines.len() > 1)
            .map(|(id, lines)| format!("{id} ×{}", lines.len()))
            .collect();
        if !dups.is_empty() {
            v.push(format!(
                "2: {} request ids appear more than once in {name}: {}",
                dups.len(),
                examples(&dups)
            ));
        }
    }

    // 5: overshoot.
    let total: f64 = billed.values().map(|(c, _)| c).sum();
    let largest = billed.values().map(|(c, _)| *c).fold(0.0, f64::max);
    if total > plan.limit_usd + largest + 1e-12 {
        v.push(format!(
            "5: billed ${total:.6} in the budget's scope, over limit ${} + largest request ${largest:.6} \
             (overshoot ${:.6}, {:.1} requests' worth)",
            plan.limit_usd,
            total - plan.limit_usd,
            (total - plan.limit_usd) / largest.max(1e-12)
        ));
    }
    v
}

/// `GET /v1/queries/{name}`: the sum of `column` over the answer's rows.
async fn query_sum(gw: &Gateway, name: &str, column: &str) -> Result<u64, String> {
    let resp = reqwest::Client::new()
        .get(gw.at(&format!("/v1/queries/{name}")))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("HTTP {status}: {body}"));
    }
    let at = body["columns"]
        .as_array()
        .and_then(|c| c.iter().position(|c| c == column))
        .ok_or_else(|| format!("no column {column}: {body}"))?;
    Ok(body["rows"]
        .as_array()
        .map(|rows| rows.iter().filter_map(|r| r[at].as_u64()).sum())
        .unwrap_or(0))
}

/// Invariant 3: the gateway's DuckDB holds a row per JSONL line (calls: telemetry lines that
/// are not denials; decisions: every decision line).
async fn check_engine(gw: &Gateway, logs: &Logs, when: &str) -> Vec<String> {
    let mut v = Vec::new();
    let calls = logs
        .telemetry
        .iter()
        .filter(|l| l["status"] != "denied")
        .count() as u64;
    let decisions = logs.decisions.len() as u64;
    for (name, column, lines, what) in [
        (
            "cost_by_tenant_and_feature",
            "request_count",
            calls,
            "non-denied telemetry lines",
        ),
        (
            "budget_pressure_by_namespace",
            "total_count",
            decisions,
            "decision lines",
        ),
    ] {
        match query_sum(gw, name, column).await {
            Ok(rows) if rows == lines => {}
            Ok(rows) => v.push(format!(
                "3 ({when}): {name} counts {rows} rows, the logs have {lines} {what}"
            )),
            Err(e) => v.push(format!("3 ({when}): {name} failed: {e}")),
        }
    }
    v
}

/// Invariant 4: the budget rule's `window_cost_usd` for a request in its scope is at least what
/// the provider billed.
async fn check_budget_seen(gw: &Gateway, billed_total: f64) -> Vec<String> {
    let url = gw.at(&format!(
        "/v1/snapshot?tenant_id={TENANT}&route_name=%2Fanswer-routed&model_tier=cheap&tokens_in=10"
    ));
    let snap: Value = match reqwest::get(&url).await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(e) => return vec![format!("4: GET /v1/snapshot failed: {e}")],
    };
    let seen = snap["rules"]
        .as_array()
        .and_then(|rules| rules.iter().find(|r| r["rule_id"] == RULE_ID))
        .and_then(|r| r["snapshot"]["values"].as_array())
        .and_then(|vals| vals.iter().find(|x| x["key"] == "window_cost_usd"))
        .and_then(|x| x["value"].as_f64());
    match seen {
        Some(s) if s + TOLERANCE_USD >= billed_total => Vec::new(),
        Some(s) => vec![format!(
            "4: after the restart the budget sees ${s:.6}, the provider billed ${billed_total:.6} \
             (${:.6} unseen)",
            billed_total - s
        )],
        None => vec![format!("4: no window_cost_usd for rule {RULE_ID}: {snap}")],
    }
}

/// Invariant 6: `llmscope logs verify` on the surviving logs. The subcommand is being written;
/// adjust its flags here.
fn verify_logs(telemetry: &Path, decisions: &Path) -> Result<(), String> {
    let out = llmscope_tests::llmscope()
        .args(["logs", "verify", "--telemetry"])
        .arg(telemetry)
        .arg("--decisions")
        .arg(decisions)
        .output()
        .map_err(|e| format!("running llmscope: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let first: Vec<&str> = stderr.lines().chain(stdout.lines()).take(40).collect();
        Err(format!("{}: {}", out.status, first.join(" | ")))
    }
}

// ---------------------------------------------------------------------------------------------
// Log rotation, as logrotate does it.
// ---------------------------------------------------------------------------------------------

/// Shift `base.N` to `base.N+1`, newest last, so `base.1` is free.
fn shift_rotated(base: &Path) {
    for n in (1..=8).rev() {
        let from = PathBuf::from(format!("{}.{n}", base.display()));
        if from.is_file() {
            std::fs::rename(&from, format!("{}.{}", base.display(), n + 1)).unwrap();
        }
    }
}

/// `rotate` without `copytruncate`: rename the logs away (the gateway is told by SIGHUP).
fn rotate_rename(bases: &[&Path]) {
    for base in bases {
        shift_rotated(base);
        std::fs::rename(base, format!("{}.1", base.display())).unwrap();
    }
}

/// `copytruncate`: copy each log to `.1` and truncate it in place. Done under the writers'
/// exclusive lock (the gateway's appends take it), after letting the gateway ingest everything
/// written so far, so no line is lost between the copy and the truncation — the loss plain
/// copytruncate is known for is not what this tests.
async fn copytruncate(gw: &Gateway, bases: &[&Path]) {
    let files: Vec<std::fs::File> = bases
        .iter()
        .map(|b| std::fs::OpenOptions::new().write(true).open(b).unwrap())
        .collect();
    for f in &files {
        f.lock().unwrap();
    }
    // A query ingests before it answers: DuckDB catches up while the files cannot change.
    let _ = query_sum(gw, "budget_pressure_by_namespace", "total_count").await;
    for (base, f) in bases.iter().zip(&files) {
        shift_rotated(base);
        std::fs::copy(base, format!("{}.1", base.display())).unwrap();
        f.set_len(0).unwrap();
    }
    for f in &files {
        f.unlock().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// The header the bill is matched by.
// ---------------------------------------------------------------------------------------------

const HEADER_CONFIG: &str = r#"
server: {listen: "127.0.0.1:0", max_body_bytes: 65536}
artifacts: {telemetry_path: "{telemetry}", decisions_path: "{decisions}"}
policy: {file: "{policy_file}", policies_dir: "{policies_dir}"}
models:
  local-small: {provider: local-openai, input_per_1m: 1.0, output_per_1m: 2.0}
  claude-local: {provider: local-anthropic, input_per_1m: 3.0, output_per_1m: 15.0}
routes:
  /answer-routed: {max_output_tokens: 300, tiers: {cheap: local-small, expensive: claude-local}}
providers:
  local-openai: {kind: openai, base_url: "http://{upstream}/v1", timeout_ms: 5000, max_retries: 0}
  local-anthropic: {kind: anthropic, base_url: "http://{upstream}", api_key_env: TEST_ANTHROPIC_KEY, timeout_ms: 5000, max_retries: 0}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn provider_calls_carry_the_request_id_in_x_client_request_id() {
    let upstream = Upstream::start().await;
    let mut opts = Options::new("version: \"1\"\nnamespaces:\n  default:\n    rules: []\n");
    opts.config_template = Some(HEADER_CONFIG.replace("{upstream}", &upstream.addr.to_string()));
    opts.env = vec![("TEST_ANTHROPIC_KEY".into(), "sk-ant-test".into())];
    let mut gw = tokio::task::block_in_place(|| Gateway::start(&opts));
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for tier in ["cheap", "expensive"] {
        let resp = client
            .post(gw.at("/infer"))
            .json(&json!({"prompt": "which request is this?", "tenant_id": "acme", "model_tier": tier}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let body: Value = resp.json().await.unwrap();
        ids.push(body["request_id"].as_str().unwrap().to_owned());
    }
    {
        let seen = upstream.state.seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        for ((path, headers, _), (id, expected_path)) in seen
            .iter()
            .zip(ids.iter().zip(["/v1/chat/completions", "/v1/messages"]))
        {
            assert_eq!(path, expected_path);
            assert!(
                headers.contains(&format!("x-client-request-id: {id}\n")),
                "{path}: {headers}"
            );
        }
    }
    tokio::task::block_in_place(|| gw.stop());
    let logged: Vec<String> = read_jsonl(&gw.telemetry)
        .iter()
        .map(|l| l["request_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(logged, ids, "the header is the id telemetry carries");
}

// ---------------------------------------------------------------------------------------------
// The scenarios.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_clients_aborting_mid_call_are_still_charged_what_the_provider_bills() {
    let _serial = serial();
    let mut plan = Plan::new("a-aborts");
    plan.clients = 20;
    plan.latency = Duration::from_millis(1_000);
    plan.abort_pct = 30;
    plan.abort_after = Duration::from_millis(200);
    plan.limit_usd = 0.005;
    let rig = Rig::new(plan).await;
    let tally = Load::start(&rig).join().await;
    rig.finish(tally).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn b_log_rotation_by_rename_and_copytruncate_loses_and_doubles_nothing() {
    let _serial = serial();
    let mut plan = Plan::new("b-rotation");
    plan.duration = Duration::from_secs(9);
    plan.limit_usd = 0.02;
    plan.duckdb_file = true;
    let mut rig = Rig::new(plan).await;
    let load = Load::start(&rig);
    let (t, d) = (rig.telemetry.clone(), rig.decisions.clone());
    let started = Instant::now();
    for (at, step) in [(2, "rename 1"), (4, "rename 2"), (6, "copytruncate")] {
        let until = started + Duration::from_secs(at);
        tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
        if step == "copytruncate" {
            copytruncate(rig.gw(), &[&t, &d]).await;
        } else {
            rotate_rename(&[&t, &d]);
            rig.sighup(step).await;
        }
        rig.note(format!("{step} at {:?}", started.elapsed()));
    }
    let tally = load.join().await;
    rig.finish(tally).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn c_queries_running_throughout_the_load_do_not_disturb_the_books() {
    let _serial = serial();
    let plan = Plan::new("c-queries");
    let mut rig = Rig::new(plan).await;
    let load = Load::start(&rig);
    let deadline = Instant::now() + rig.plan.duration;
    let mut callers = Vec::new();
    for q in 0..8 {
        let url = rig.gw().url.clone();
        callers.push(tokio::spawn(async move {
            let names = [
                "cost_by_tenant_and_feature",
                "experiment_cost_vs_outcome",
                "budget_pressure_by_namespace",
                "fallback_latency_masking",
                "unsafe_routes",
            ];
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
            let (mut ok, mut failed) = (0u64, Vec::new());
            for i in 0..500 {
                if Instant::now() >= deadline {
                    break;
                }
                let name = names[(q + i) % names.len()];
                match client.get(format!("{url}/v1/queries/{name}")).send().await {
                    Ok(r) if r.status().is_success() => ok += 1,
                    Ok(r) => failed.push(format!("{name}: HTTP {}", r.status())),
                    Err(e) => failed.push(format!("{name}: {e}")),
                }
            }
            (ok, failed)
        }));
    }
    let tally = load.join().await;
    let (mut ok, mut failed) = (0, Vec::new());
    for c in callers {
        let (o, f) = c.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    rig.note(format!("queries answered: {ok}, failed: {}", failed.len()));
    if !failed.is_empty() {
        rig.violation(format!(
            "c: {} of {} queries failed during the load: {}",
            failed.len(),
            ok + failed.len() as u64,
            examples(&failed)
        ));
    }
    rig.finish(tally).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn d_kill_9_with_requests_in_flight_leaves_them_on_record_as_unanswered() {
    let _serial = serial();
    let mut plan = Plan::new("d-kill-9");
    plan.clients = 24;
    plan.latency = Duration::from_secs(4);
    plan.duration = Duration::from_secs(30);
    plan.limit_usd = 0.05;
    plan.allow_unanswered = true;
    let mut rig = Rig::new(plan).await;
    let load = Load::start(&rig);
    // In flight at the gateway *and* at the provider: dispatched, not yet answered.
    let deadline = Instant::now() + Duration::from_secs(25);
    let (mut in_flight, mut at_provider) = (0.0, 0);
    while Instant::now() < deadline {
        in_flight = rig.in_flight().await.unwrap_or(0.0);
        at_provider = rig.provider.pending();
        if in_flight >= 16.0 && at_provider >= 16 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        in_flight >= 16.0 && at_provider >= 16,
        "never 16 requests in flight within 25 s (last: {in_flight} at the gateway, \
         {at_provider} at the provider)"
    );
    let gw = rig.gw.as_mut().unwrap();
    gw.child.kill().unwrap(); // SIGKILL
    gw.child.wait().unwrap();
    rig.note(format!(
        "kill -9 with {in_flight} requests in flight ({at_provider} at the provider)"
    ));
    let tally = load.stop().await;
    rig.finish(tally).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn e_policy_reloads_every_200_ms_keep_the_books_and_the_budget() {
    let _serial = serial();
    let plan = Plan::new("e-reload");
    let mut rig = Rig::new(plan).await;
    let load = Load::start(&rig);
    let deadline = Instant::now() + rig.plan.duration;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (mut ok, mut failed) = (0u64, Vec::new());
    for _ in 0..100 {
        if Instant::now() >= deadline {
            break;
        }
        let next = Instant::now() + Duration::from_millis(200);
        rig.policy_version += 1;
        std::fs::write(
            &rig.gw().policy_file,
            policy_yaml(rig.plan.limit_usd, rig.policy_version),
        )
        .unwrap();
        match client.post(rig.gw().at("/v1/admin/reload")).send().await {
            Ok(r) if r.status().is_success() => ok += 1,
            Ok(r) => failed.push(format!("HTTP {}", r.status())),
            Err(e) => failed.push(e.to_string()),
        }
        tokio::time::sleep(next.saturating_duration_since(Instant::now())).await;
    }
    let tally = load.join().await;
    rig.note(format!("reloads: {ok} ok, {} failed", failed.len()));
    if !failed.is_empty() {
        rig.violation(format!(
            "e: {} reloads failed: {}",
            failed.len(),
            examples(&failed)
        ));
    }
    rig.finish(tally).await;
}

/// Fill the file system holding `dir` with `dir/filler` until writes fail.
fn fill_disk(dir: &Path) -> u64 {
    use std::io::Write;
    let mut file = std::fs::File::create(dir.join("filler")).unwrap();
    let mut written = 0u64;
    for chunk in [1 << 20, 4096, 512] {
        let buf = vec![0u8; chunk];
        for _ in 0..4096 {
            if file.write_all(&buf).is_err() {
                break;
            }
            written += chunk as u64;
        }
    }
    let _ = file.sync_all();
    written
}

#[tokio::test(flavor = "multi_thread")]
async fn f_a_full_disk_refuses_before_the_provider_is_called() {
    let _serial = serial();
    let mut plan = Plan::new("f-disk-full");
    plan.clients = 12;
    plan.latency = Duration::from_millis(100);
    plan.duration = Duration::from_secs(9);
    // Room for the calls of the whole run: the disk fills while requests are still allowed.
    plan.limit_usd = 0.04;
    plan.allow_unanswered = true;
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let mount = match Tmpfs::mount(&logs, "16m") {
        Ok(m) => m,
        Err(e) => {
            eprintln!(
                "SKIPPED f_a_full_disk_refuses_before_the_provider_is_called: cannot mount a tmpfs \
                 for the logs ({e}); run as root (or with CAP_SYS_ADMIN) to exercise a full disk"
            );
            return;
        }
    };
    let mut rig = Rig::assemble(plan, Some(mount), dir, logs.clone()).await;
    let load = Load::start(&rig);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let received_before = rig.provider.received();
    let filled = fill_disk(&logs);
    rig.note(format!(
        "disk filled with {} KiB at t≈3 s ({received_before} provider calls so far)",
        filled >> 10
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::fs::remove_file(logs.join("filler")).unwrap();
    rig.note(format!(
        "space freed at t≈5 s; {} provider calls arrived while the disk was full",
        rig.provider.received() - received_before
    ));
    let tally = load.join().await;
    rig.finish(tally).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn g_a_failing_primary_near_the_limit_falls_back_without_overshooting() {
    let _serial = serial();
    let mut plan = Plan::new("g-fallback");
    plan.latency = Duration::from_millis(300);
    plan.duration = Duration::from_secs(10);
    let mut rig = Rig::new(plan).await;
    let load = Load::start(&rig);
    let deadline = Instant::now() + Duration::from_secs(8);
    let near = 0.6 * rig.plan.limit_usd;
    let mut spent = 0.0;
    while Instant::now() < deadline {
        spent = rig.provider.bills().iter().map(billed_cost).sum::<f64>();
        if spent >= near {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rig.provider.fail_model(PRIMARY, true);
    rig.note(format!(
        "{PRIMARY} fails (503) from ${spent:.6} billed on; fallback {FALLBACK}"
    ));
    let tally = load.join().await;
    rig.finish(tally).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn h_provider_usage_above_the_estimate_is_charged_and_bounded() {
    let _serial = serial();
    let mut plan = Plan::new("h-usage-above-estimate");
    plan.latency = Duration::from_millis(300);
    plan.duration = Duration::from_secs(10);
    let rig = Rig::new(plan).await;
    // The provider counts 4000 input tokens where the gateway counted ~25 (about 5× the
    // estimate per request).
    rig.provider.set_usage(
        PRIMARY,
        Usage {
            tokens_in: Some(4_000),
            tokens_out: None,
        },
    );
    // A few requests one at a time first: the gateway has seen the provider bill above its
    // estimates before the concurrent load comes.
    let warm = Load::start_with(&rig, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.provider.bills().len() < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut tally = warm.stop().await;
    for (k, v) in Load::start(&rig).join().await {
        *tally.entry(k).or_insert(0) += v;
    }
    rig.finish(tally).await;
}
