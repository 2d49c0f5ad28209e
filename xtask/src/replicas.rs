//! `cargo xtask bench-replicas` (and the shared-budget rows of `cargo xtask bench`): the gateway
//! load test of `bench-gateway` (`/infer`, mock provider at 0 ms, the bench policy's three wasm
//! rules) on one gateway keeping its budgets locally and on one sharing them through a Redis
//! (`budgets.backend: redis`, a `redis-server` started here on a free port), in the same run and
//! on the same config otherwise. Two measurements each:
//!
//! - request latency at a fixed rate (open loop, measured from each send): the gateway is far
//!   from saturated, so redis minus local is what the Redis round trips (reserve before the
//!   rules run, settle after the answer) add to a request's decision;
//! - max throughput (closed loop): the CPU the shared store costs, with Redis on the same cores.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::load::{self, Stats, Target};

/// One backend's measurements.
pub struct Variant {
    /// Open loop at [`ReplicaResults::rate`].
    pub at_rate: Stats,
    /// Closed loop.
    pub max: Stats,
}

/// What the shared-budget benchmark measured.
pub struct ReplicaResults {
    /// Requests per second of the latency measurement.
    pub rate: f64,
    /// Keep-alive connections.
    pub connections: usize,
    /// `budgets.backend: local`.
    pub local: Variant,
    /// `budgets.backend: redis`.
    pub redis: Variant,
}

/// A child process killed (by its id) when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `redis-server` on `PATH`.
fn redis_binary() -> Result<PathBuf> {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
        .context("redis-server is not on PATH: install redis-server (Debian package redis-server)")
}

/// Start `redis-server` on a free loopback port, persistence off, in `dir`; the process and
/// its port once it answers `PING`.
fn start_redis(dir: &Path) -> Result<(Process, u16)> {
    use std::io::{Read, Write};
    let bin = redis_binary()?;
    std::fs::create_dir_all(dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server")?;
    let mut process = Process(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = process.0.try_wait() {
            bail!("redis-server exited at start: {status}");
        }
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let mut buf = [0u8; 7];
            if s.write_all(b"PING\r\n").is_ok()
                && s.read_exact(&mut buf).is_ok()
                && &buf == b"+PONG\r\n"
            {
                return Ok((process, port));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("redis-server did not answer PING on port {port} within 10 s")
}

/// Load-test one gateway on the bench config (plus `budgets`, if any) from `dir`.
fn measure(
    root: &Path,
    bin: &Path,
    dir: &Path,
    budgets: &str,
    seconds: u64,
    rate: f64,
    connections: usize,
) -> Result<Variant> {
    let config = load::bench_config(root, dir)?;
    let mut text = std::fs::read_to_string(&config)?;
    text.push_str(budgets);
    std::fs::write(&config, text)?;
    let (child, base) = load::spawn_gateway(bin, &config, dir)?;
    let gateway = Process(child);
    let target = Target {
        url: format!("{base}/infer"),
        headers: Vec::new(),
        body: load::body,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let duration = Duration::from_secs(seconds);
    let (at_rate, max) = runtime.block_on(async {
        let _ = load::closed_loop_to(&target, connections, Duration::from_secs(2)).await; // warm-up
        let at_rate = load::open_loop_to(&target, connections, rate, duration).await;
        let max = load::closed_loop_to(&target, connections, duration).await;
        (at_rate, max)
    });
    let _ = Command::new("kill")
        .args(["-TERM", &gateway.0.id().to_string()])
        .status();
    drop(gateway);
    Ok(Variant { at_rate, max })
}

/// Run both variants: local first, then redis, each on a fresh gateway.
pub fn run(root: &Path, bin: &Path, seconds: u64, rate: f64) -> Result<ReplicaResults> {
    let connections = 32;
    let base = std::env::temp_dir().join(format!("llmscope-bench-replicas-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (redis, port) = start_redis(&base.join("redis"))?;
    let local = measure(
        root,
        bin,
        &base.join("local"),
        "\nbudgets:\n  backend: local\n",
        seconds,
        rate,
        connections,
    );
    let redis_budgets = format!(
        "\nbudgets:\n  backend: redis\n  url: redis://127.0.0.1:{port}/\n  key_prefix: bench\n  replica_id: bench-1\n  timeout_ms: 100\n"
    );
    let shared = measure(
        root,
        bin,
        &base.join("redis-gw"),
        &redis_budgets,
        seconds,
        rate,
        connections,
    );
    drop(redis);
    let _ = std::fs::remove_dir_all(&base);
    Ok(ReplicaResults {
        rate,
        connections,
        local: local?,
        redis: shared?,
    })
}

/// Run the benchmark and print its table.
pub fn bench_replicas(root: &Path, bin: &Path, seconds: u64, rate: f64) -> Result<()> {
    let r = run(root, bin, seconds, rate)?;
    println!(
        "\nShared budgets: POST /infer, mock provider at 0 ms, 3 wasm rules, one gateway with \
         `budgets.backend: local` and one with `redis` (redis-server on the same 2 cores), \
         {} keep-alive connections, {seconds} s per row.\n",
        r.connections
    );
    println!("| backend | load | requests | errors | throughput (rps) | p50 (ms) | p99 (ms) |");
    println!("|---|---|---|---|---|---|---|");
    for (name, v) in [("local", &r.local), ("redis", &r.redis)] {
        for (load, s) in [
            (format!("{:.0} rps (open loop)", r.rate), &v.at_rate),
            ("max (closed loop)".to_owned(), &v.max),
        ] {
            println!(
                "| {name} | {load} | {} | {} | {:.0} | {:.3} | {:.3} |",
                s.requests,
                s.errors,
                s.requests as f64 / s.seconds,
                s.p50_ms,
                s.p99_ms
            );
        }
    }
    println!(
        "\nadded by redis at {:.0} rps: p50 {:+.3} ms, p99 {:+.3} ms (goal: p99 ≤ 0.5 ms added); \
         throughput {:.0} → {:.0} rps",
        r.rate,
        r.redis.at_rate.p50_ms - r.local.at_rate.p50_ms,
        r.redis.at_rate.p99_ms - r.local.at_rate.p99_ms,
        r.local.max.requests as f64 / r.local.max.seconds,
        r.redis.max.requests as f64 / r.redis.max.seconds,
    );
    Ok(())
}
