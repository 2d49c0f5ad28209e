//! `cargo xtask bench-gateway`: load-test `/infer` on the real binary with the mock provider at
//! zero latency, through the seed's three demo rules (budget made unreachable so every request
//! is served). Reports max throughput (closed loop) and latency at fixed rates (open loop: each
//! connection sends on a fixed schedule whether or not the gateway keeps up).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Policy used for the load test: the seed's demo rules, with a budget no test run can reach.
pub(crate) const BENCH_POLICY: &str = r#"version: "bench"
namespaces:
  default:
    rules:
      - id: "bench-hourly-cap"
        primitive: budget_threshold
        period: hourly
        limit_usd: 1000000000
        action: deny
      - id: "bench-route-preference"
        primitive: route_preference
        route_name: "/answer-routed"
        prefer_tier: cheap
      - id: "bench-cost-anomaly"
        primitive: cost_anomaly
        feature_id: "summarize"
        baseline_window_hours: 24
        threshold_multiplier: 3.0
"#;

/// Results of one load run.
pub struct Stats {
    /// Successful requests.
    pub requests: usize,
    /// Failed requests (non-2xx or transport error).
    pub errors: usize,
    /// Wall time.
    pub seconds: f64,
    /// Median latency of successful requests.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

/// The `q` quantile of `sorted` (NaN when empty).
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// The `/infer` body of request `i` (16 tenants, the expensive tier).
pub(crate) fn body(i: usize) -> String {
    format!(
        r#"{{"prompt": "Summarize this document, number {i}: quarterly revenue grew while costs held flat.", "tenant_id": "bench-{}", "feature_id": "summarize", "model_tier": "expensive"}}"#,
        i % 16
    )
}

/// What the load generator sends: one URL, fixed headers, a body per request index.
#[derive(Clone)]
pub struct Target {
    /// Full URL.
    pub url: String,
    /// Extra headers (content-type is always JSON).
    pub headers: Vec<(&'static str, &'static str)>,
    /// Body of request `i`.
    pub body: fn(usize) -> String,
}

impl Target {
    fn request(&self, client: &reqwest::Client, i: usize) -> reqwest::RequestBuilder {
        let mut req = client
            .post(&self.url)
            .header("content-type", "application/json");
        for (k, v) in &self.headers {
            req = req.header(*k, *v);
        }
        req.body((self.body)(i))
    }
}

/// An OpenAI chat body for the Envoy benchmark.
pub fn chat_body(i: usize) -> String {
    format!(
        r#"{{"model": "gpt-4o", "messages": [{{"role": "user", "content": "Summarize this document, number {i}: quarterly revenue grew while costs held flat."}}], "metadata": {{"tenant_id": "bench-{}", "feature_id": "summarize"}}}}"#,
        i % 16
    )
}

async fn closed_loop(url: &str, connections: usize, duration: Duration) -> Stats {
    let target = Target {
        url: url.to_owned(),
        headers: Vec::new(),
        body,
    };
    closed_loop_to(&target, connections, duration).await
}

/// Closed loop: each connection sends its next request when the previous one is answered.
pub async fn closed_loop_to(target: &Target, connections: usize, duration: Duration) -> Stats {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()
        .unwrap_or_default();
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (client, target) = (client.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let mut i = c;
            while Instant::now() < deadline {
                let t = Instant::now();
                let ok = target
                    .request(&client, i)
                    .send()
                    .await
                    .map(|r| r.status().is_success());
                match ok {
                    Ok(true) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    _ => errors += 1,
                }
                i += connections;
            }
            (lat, errors)
        }));
    }
    collect(tasks, started).await
}

async fn open_loop(url: &str, connections: usize, rate: f64, duration: Duration) -> Stats {
    let target = Target {
        url: url.to_owned(),
        headers: Vec::new(),
        body,
    };
    open_loop_to(&target, connections, rate, duration).await
}

/// Open loop: `rate` requests per second spread over `connections`, each sent on schedule.
pub async fn open_loop_to(
    target: &Target,
    connections: usize,
    rate: f64,
    duration: Duration,
) -> Stats {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()
        .unwrap_or_default();
    let per_conn = Duration::from_secs_f64(connections as f64 / rate);
    let total = (rate * duration.as_secs_f64()) as usize / connections;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (client, target) = (client.clone(), target.clone());
        let offset = per_conn.mul_f64(c as f64 / connections as f64);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(total);
            let mut errors = 0;
            for k in 0..total {
                let scheduled = started + offset + per_conn.mul_f64(k as f64);
                tokio::time::sleep_until(scheduled.into()).await;
                // Measured from the send, not the schedule: tokio's timer wheel fires up to 1 ms
                // late, which is the load generator's jitter, not the gateway's latency.
                let sent = Instant::now();
                let ok = target
                    .request(&client, k * connections + c)
                    .send()
                    .await
                    .map(|r| r.status().is_success());
                match ok {
                    Ok(true) => lat.push(sent.elapsed().as_secs_f64() * 1e3),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    collect(tasks, started).await
}

async fn collect(
    tasks: Vec<tokio::task::JoinHandle<(Vec<f64>, usize)>>,
    started: Instant,
) -> Stats {
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((lat, e)) = t.await {
            all.extend(lat);
            errors += e;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    Stats {
        requests: all.len(),
        errors,
        seconds,
        p50_ms: percentile(&all, 0.50),
        p99_ms: percentile(&all, 0.99),
    }
}

/// What the gateway load test measured.
pub struct GatewayResults {
    /// Closed loop.
    pub max: Stats,
    /// Open loop at 1k rps.
    pub r1k: Stats,
    /// Open loop at 5k rps.
    pub r5k: Stats,
    /// Peak resident memory of the gateway over the whole test (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// Telemetry lines written.
    pub lines: usize,
}

/// Write a gateway config serving the bench policy from `dir`; returns its path.
pub fn bench_config(root: &Path, dir: &Path) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, BENCH_POLICY)?;
    gateway_config(root, dir, &policy, false)
}

/// Write `dir/llmscope.yaml`: the example gateway config with `policy` as its policy file, the
/// repository's components and no hot reload (`edge`: keep `/v1/edge/*` open for Envoy, as
/// the example does); returns its path.
pub fn gateway_config(
    root: &Path,
    dir: &Path,
    policy: &Path,
    edge: bool,
) -> Result<std::path::PathBuf> {
    let example = std::fs::read_to_string(root.join("examples/llmscope.yaml"))?;
    let config = example
        .replace("file: policy.yaml", &format!("file: {}", policy.display()))
        .replace(
            "policies_dir: ../policies",
            &format!("policies_dir: {}", root.join("policies").display()),
        )
        .replace("hot_reload: true", "hot_reload: false");
    let config = if edge {
        config
    } else {
        config.replace("auth:\n  unauthenticated_edge: true\n", "")
    };
    // These server limits are spelled out at their defaults in the example; without them the
    // config also loads in builds that predate them (`bench-gateway --compare`). The edge
    // endpoints stay open only where Envoy calls them (`envoy-demo`, `bench-envoy`).
    let config: String = config
        .lines()
        .filter(|l| {
            ![
                "max_prompt_bytes:",
                "body_read_timeout_ms:",
                "max_connections:",
            ]
            .iter()
            .any(|k| l.trim_start().starts_with(k))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let config_path = dir.join("llmscope.yaml");
    std::fs::write(&config_path, config)?;
    Ok(config_path)
}

/// Start `llmscope serve` on a free port with `config_path` and logs in `dir`; returns the
/// process and its base URL once it listens.
pub fn spawn_gateway(
    bin: &Path,
    config_path: &Path,
    dir: &Path,
) -> Result<(std::process::Child, String)> {
    spawn_gateway_with(bin, config_path, dir, &[])
}

/// [`spawn_gateway`] with extra environment variables (e.g. `OTEL_*`).
pub fn spawn_gateway_with(
    bin: &Path,
    config_path: &Path,
    dir: &Path,
    env: &[(&str, String)],
) -> Result<(std::process::Child, String)> {
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config_path)
        .env("TELEMETRY_PATH", dir.join("telemetry.jsonl"))
        .env("DECISIONS_PATH", dir.join("policy_decisions.jsonl"))
        .env("LLMSCOPE_LOG", "error")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .spawn()
        .context("starting llmscope serve")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    match line.trim().strip_prefix("llmscope listening on ") {
        Some(base) => Ok((child, base.to_owned())),
        None => {
            let _ = child.kill();
            bail!("the gateway did not start: {line:?}")
        }
    }
}

/// Peak resident set (VmHWM) of `pid`, MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Run the load test against a freshly started gateway.
pub fn run_gateway(
    root: &Path,
    bin: &Path,
    seconds: u64,
    connections: usize,
) -> Result<GatewayResults> {
    let dir = std::env::temp_dir().join(format!("llmscope-bench-{}", std::process::id()));
    let config_path = bench_config(root, &dir)?;
    let (mut child, base) = spawn_gateway(bin, &config_path, &dir)?;
    let url = format!("{base}/infer");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let duration = Duration::from_secs(seconds);
    let (max, r1k, r5k) = runtime.block_on(async {
        let _ = closed_loop(&url, connections, Duration::from_secs(2)).await; // warm-up
        let max = closed_loop(&url, connections, duration).await;
        let r1k = open_loop(&url, connections, 1_000.0, duration).await;
        let r5k = open_loop(&url, connections, 5_000.0, duration).await;
        (max, r1k, r5k)
    });
    let peak_rss_mib = peak_rss_mib(child.id());
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let lines = std::fs::read_to_string(dir.join("telemetry.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(GatewayResults {
        max,
        r1k,
        r5k,
        peak_rss_mib,
        lines,
    })
}

/// Run the load test and print its table.
pub fn bench_gateway(root: &Path, bin: &Path, seconds: u64, connections: usize) -> Result<()> {
    let r = run_gateway(root, bin, seconds, connections)?;
    println!("\nGateway load test: POST /infer, mock provider at 0 ms, 3 wasm rules, 2 JSONL lines per request,");
    println!("{connections} keep-alive connections, {seconds} s per row, load generator on the same 2 cores.\n");
    println!("| load | requests | errors | throughput (rps) | p50 (ms) | p99 (ms) |");
    println!("|---|---|---|---|---|---|");
    for (name, s) in [
        ("max (closed loop)", &r.max),
        ("1k rps (open loop)", &r.r1k),
        ("5k rps (open loop)", &r.r5k),
    ] {
        println!(
            "| {name} | {} | {} | {:.0} | {:.3} | {:.3} |",
            s.requests,
            s.errors,
            s.requests as f64 / s.seconds,
            s.p50_ms,
            s.p99_ms
        );
    }
    println!(
        "\ntelemetry lines written: {}; peak RSS {:.1} MiB",
        r.lines, r.peak_rss_mib
    );
    Ok(())
}
