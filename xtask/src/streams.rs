//! `cargo xtask bench-streams` (and the streaming rows of `cargo xtask bench`): streamed chat
//! completions through the gateway (`openai` provider, the bench policy's three wasm rules)
//! against `llmscope mock-upstream`, compared with the same streams sent straight to the
//! upstream. Two measurements:
//!
//! - time to first byte (the first body chunk of the server-sent events), open loop at a fixed
//!   rate of new streams, each stream 8 chunks 5 ms apart, so streams overlap as in production;
//!   measured from each send;
//! - chunks per second through one keep-alive connection: back-to-back streams of 20 000
//!   chunks with no delay, every SSE event counted.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::load::{self, Stats};

/// Chunks of a stream in the first-byte measurement, and the delay between two of them.
const TTFB_CHUNKS: &str = "8";
const TTFB_CHUNK_DELAY_MS: &str = "5";
/// Chunks of a stream in the throughput measurement (sent without delay).
const BULK_CHUNKS: u32 = 20_000;

/// What the streaming benchmark measured.
pub struct StreamResults {
    /// Streams opened per second.
    pub rate: f64,
    /// First byte through the gateway.
    pub gateway: Stats,
    /// First byte straight from the upstream.
    pub direct: Stats,
    /// SSE events per second through the gateway on one connection.
    pub gateway_chunks_per_s: f64,
    /// SSE events per second straight from the upstream on one connection.
    pub direct_chunks_per_s: f64,
}

/// A child process killed (by its id) when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `llmscope mock-upstream` on a free port with `args`; the process and `host:port`.
fn upstream(bin: &Path, args: &[&str]) -> Result<(Process, String)> {
    let mut child = Command::new(bin)
        .args(["mock-upstream", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting llmscope mock-upstream")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    let process = Process(child);
    match line
        .trim()
        .strip_prefix("mock upstream listening on http://")
    {
        Some(addr) => Ok((process, addr.to_owned())),
        None => bail!("mock-upstream did not start: {line:?}"),
    }
}

/// The gateway config: the bench policy, `/answer-routed` on upstream `ttfb`, `/bulk` (room
/// for every chunk of a bulk stream) on upstream `bulk`.
fn config(root: &Path, dir: &Path, ttfb: &str, bulk: &str) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, load::BENCH_POLICY)?;
    let text = format!(
        r#"server: {{listen: "127.0.0.1:0"}}
artifacts: {{telemetry_path: {dir}/telemetry.jsonl, decisions_path: {dir}/policy_decisions.jsonl}}
policy: {{file: {policy}, policies_dir: {policies}, hot_reload: false}}
models:
  gpt-4o-mini: {{provider: upstream, input_per_1m: 0.15, output_per_1m: 0.60}}
  gpt-4o: {{provider: upstream, input_per_1m: 2.50, output_per_1m: 10.00}}
  bulk: {{provider: bulk-upstream, input_per_1m: 0.15, output_per_1m: 0.60}}
routes:
  /answer-routed: {{max_output_tokens: 500, tiers: {{cheap: gpt-4o-mini, expensive: gpt-4o}}}}
  /bulk: {{max_output_tokens: {max_out}, tiers: {{cheap: bulk}}}}
providers:
  upstream: {{kind: openai, base_url: "http://{ttfb}/v1", timeout_ms: 10000, max_retries: 0}}
  bulk-upstream: {{kind: openai, base_url: "http://{bulk}/v1", timeout_ms: 60000, max_retries: 0}}
"#,
        dir = dir.display(),
        policy = policy.display(),
        policies = root.join("policies").display(),
        max_out = BULK_CHUNKS * 2,
    );
    let path = dir.join("llmscope.yaml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// A streamed chat body: the Envoy benchmark's request, `stream: true`.
fn stream_body(i: usize) -> String {
    format!(
        r#"{{"model": "gpt-4o", "stream": true, "messages": [{{"role": "user", "content": "Summarize this document, number {i}: quarterly revenue grew while costs held flat."}}], "metadata": {{"tenant_id": "bench-{}", "feature_id": "summarize"}}}}"#,
        i % 16
    )
}

/// A streamed chat body on `/bulk`.
fn bulk_body() -> String {
    r#"{"model": "bulk", "stream": true, "messages": [{"role": "user", "content": "Stream a lot"}], "metadata": {"tenant_id": "bench-bulk", "route": "/bulk"}}"#.to_owned()
}

/// Send one stream to `url`; the time from the send to its first body chunk, after reading
/// it to its end. `None` when it failed (status, transport, or no body).
async fn first_byte(client: &reqwest::Client, url: &str, body: String) -> Option<f64> {
    let sent = Instant::now();
    let mut resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.chunk().await.ok()??;
    let ttfb = sent.elapsed().as_secs_f64() * 1e3;
    while resp.chunk().await.ok()?.is_some() {}
    Some(ttfb)
}

/// Open loop: a new stream every `1 / rate` s for `duration`, each on its own task (the pool
/// opens connections as streams overlap); first-byte times of those that succeeded.
async fn ttfb_open_loop(url: &str, rate: f64, duration: Duration) -> Stats {
    let client = reqwest::Client::new();
    let total = (rate * duration.as_secs_f64()) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until((started + interval.mul_f64(i as f64)).into()).await;
        let (client, url) = (client.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            first_byte(&client, &url, stream_body(i)).await
        }));
    }
    let mut lat = Vec::with_capacity(total);
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok(Some(ms)) => lat.push(ms),
            _ => errors += 1,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Stats {
        requests: lat.len(),
        errors,
        seconds,
        p50_ms: load::percentile(&lat, 0.50),
        p99_ms: load::percentile(&lat, 0.99),
    }
}

/// Back-to-back streams of `body` on one keep-alive connection for at least `duration` (and
/// at least one stream): SSE events per second.
async fn chunks_per_s(url: &str, body: String, duration: Duration) -> Result<f64> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()?;
    let started = Instant::now();
    let mut events = 0usize;
    loop {
        let mut resp = client
            .post(url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("{url} answered {}", resp.status());
        }
        let mut text = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            text.extend_from_slice(&chunk);
        }
        events += String::from_utf8_lossy(&text).matches("data: ").count();
        if started.elapsed() >= duration {
            break;
        }
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

/// Run both measurements against freshly started upstreams and gateway.
pub fn run(root: &Path, bin: &Path, seconds: u64, rate: f64) -> Result<StreamResults> {
    let (_ttfb_up, ttfb_addr) = upstream(
        bin,
        &[
            "--stream-chunks",
            TTFB_CHUNKS,
            "--chunk-delay-ms",
            TTFB_CHUNK_DELAY_MS,
        ],
    )?;
    let bulk_chunks = BULK_CHUNKS.to_string();
    let (_bulk_up, bulk_addr) = upstream(
        bin,
        &["--stream-chunks", &bulk_chunks, "--ignore-max-tokens"],
    )?;
    let dir = std::env::temp_dir().join(format!("llmscope-bench-streams-{}", std::process::id()));
    let config_path = config(root, &dir, &ttfb_addr, &bulk_addr)?;
    let (child, base) = load::spawn_gateway(bin, &config_path, &dir)?;
    let gateway = Process(child);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let duration = Duration::from_secs(seconds);
    let chat = format!("{base}/v1/chat/completions");
    let direct = format!("http://{ttfb_addr}/v1/chat/completions");
    let results = runtime.block_on(async {
        let warm = Duration::from_secs(1);
        let _ = ttfb_open_loop(&direct, rate, warm).await;
        let _ = ttfb_open_loop(&chat, rate, warm).await;
        let direct_stats = ttfb_open_loop(&direct, rate, duration).await;
        let gateway_stats = ttfb_open_loop(&chat, rate, duration).await;
        let bulk = duration.min(Duration::from_secs(5));
        let direct_chunks = chunks_per_s(
            &format!("http://{bulk_addr}/v1/chat/completions"),
            bulk_body(),
            bulk,
        )
        .await?;
        let gateway_chunks = chunks_per_s(&chat, bulk_body(), bulk).await?;
        Ok::<_, anyhow::Error>(StreamResults {
            rate,
            gateway: gateway_stats,
            direct: direct_stats,
            gateway_chunks_per_s: gateway_chunks,
            direct_chunks_per_s: direct_chunks,
        })
    });
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
    results
}

/// Run the streaming benchmark and print its table.
pub fn bench_streams(root: &Path, bin: &Path, seconds: u64, rate: f64) -> Result<()> {
    let r = run(root, bin, seconds, rate)?;
    println!(
        "\nStreamed chat: {rate:.0} new streams/s (open loop), {TTFB_CHUNKS} chunks {TTFB_CHUNK_DELAY_MS} ms apart, {seconds} s per row;"
    );
    println!("gateway: openai provider → llmscope mock-upstream, 3 wasm rules; all processes on the same cores.\n");
    println!("| path | streams | errors | first byte p50 (ms) | first byte p99 (ms) |");
    println!("|---|---|---|---|---|");
    for (name, s) in [
        ("mock upstream alone", &r.direct),
        ("through the gateway", &r.gateway),
    ] {
        println!(
            "| {name} | {} | {} | {:.3} | {:.3} |",
            s.requests, s.errors, s.p50_ms, s.p99_ms
        );
    }
    println!(
        "| **added by the gateway** | | | **{:.3}** | **{:.3}** |",
        r.gateway.p50_ms - r.direct.p50_ms,
        r.gateway.p99_ms - r.direct.p99_ms
    );
    println!(
        "\nChunks through one connection ({BULK_CHUNKS}-chunk streams, no delay): {:.0} SSE events/s through the gateway, {:.0} from the upstream alone.",
        r.gateway_chunks_per_s, r.direct_chunks_per_s
    );
    Ok(())
}
