//! `cargo xtask bench-otel`: the gateway's closed-loop throughput with OpenTelemetry traces and
//! metrics exported over OTLP/HTTP vs off, in the same run (goal: at most 10% lower), each on a
//! freshly started gateway with the bench policy, the mock provider at 0 ms, and a local OTLP
//! sink that answers every export 200 (so the exporter does all of its work, encoding and
//! sending included).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::load::{self, Stats};

/// Both runs.
pub struct OtelResults {
    /// Tracing off.
    pub off: Stats,
    /// Traces and metrics exported.
    pub on: Stats,
    /// Export requests the sink answered during the traced run.
    pub exports: u64,
}

/// An HTTP/1.1 sink on a loopback port: reads each request (headers, `content-length` body)
/// and answers 200 with an empty body, on keep-alive connections; counts the requests.
async fn sink() -> Result<(u16, std::sync::Arc<std::sync::atomic::AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = std::sync::Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let seen = std::sync::Arc::clone(&seen);
            tokio::spawn(async move {
                let mut conn = BufReader::new(conn);
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match conn.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = l.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                length = v.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    if conn.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if conn.get_mut().write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((port, count))
}

fn measure(
    root: &Path,
    bin: &Path,
    seconds: u64,
    connections: usize,
    env: &[(&str, String)],
    runtime: &tokio::runtime::Runtime,
) -> Result<Stats> {
    let dir = std::env::temp_dir().join(format!(
        "llmscope-bench-otel-{}-{}",
        std::process::id(),
        env.len()
    ));
    let config_path = load::bench_config(root, &dir)?;
    let (mut child, base) = load::spawn_gateway_with(bin, &config_path, &dir, env)?;
    let target = load::Target {
        url: format!("{base}/infer"),
        headers: Vec::new(),
        body: load::body,
    };
    let stats = runtime.block_on(async {
        let _ = load::closed_loop_to(&target, connections, Duration::from_secs(2)).await;
        load::closed_loop_to(&target, connections, Duration::from_secs(seconds)).await
    });
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(stats)
}

/// Tracing off, then on, `seconds` each with `connections` keep-alive connections.
pub fn run(root: &Path, bin: &Path, seconds: u64, connections: usize) -> Result<OtelResults> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (port, exports) = runtime.block_on(sink())?;
    let off = measure(root, bin, seconds, connections, &[], &runtime)?;
    let env = [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        ),
        ("OTEL_METRIC_EXPORT_INTERVAL", "1000".to_owned()),
    ];
    let on = measure(root, bin, seconds, connections, &env, &runtime)?;
    Ok(OtelResults {
        off,
        on,
        exports: exports.load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// Run and print the comparison.
pub fn bench_otel(root: &Path, bin: &Path, seconds: u64, connections: usize) -> Result<()> {
    let r = run(root, bin, seconds, connections)?;
    let rps = |s: &Stats| s.requests as f64 / s.seconds;
    let lower = 100.0 * (1.0 - rps(&r.on) / rps(&r.off));
    println!(
        "| gateway `POST /infer`, {connections} conns, closed loop | rps | p50 | p99 | errors |"
    );
    println!("|---|---|---|---|---|");
    for (name, s) in [
        ("tracing off", &r.off),
        ("traces + metrics exported (OTLP/HTTP)", &r.on),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} ms | {:.2} ms | {} |",
            rps(s),
            s.p50_ms,
            s.p99_ms,
            s.errors
        );
    }
    println!(
        "\nexported: {lower:.1}% lower (goal ≤ 10%); the sink answered {} export requests",
        r.exports
    );
    Ok(())
}
