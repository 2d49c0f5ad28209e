//! The `llmscope` command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use llmscope_sdk::types::RequestContext;

use crate::policy::{
    Limits, NoSnapshots, PolicyRuntime, PolicySet, SnapshotSource, StaticSnapshots,
};

/// llmscope: cost governance for LLM inference, enforced by WebAssembly policies.
#[derive(Debug, Parser)]
#[command(name = "llmscope", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Gateway configuration (see examples/llmscope.yaml).
        #[arg(long, env = "LLMSCOPE_CONFIG")]
        config: PathBuf,
        /// Override `server.listen` (use port 0 to pick a free port; the address is printed).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Inspect, validate and try out cost policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Serve a stand-in LLM provider (OpenAI chat-completions and Anthropic Messages formats,
    /// with usage) for the Envoy example and load tests.
    MockUpstream {
        /// Address to listen on (port 0 picks a free port; the address is printed).
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
        /// Delay before each answer, ms.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
    /// Answer one of the five cost questions from the JSONL logs.
    Query {
        /// The question.
        #[arg(value_enum)]
        name: crate::queries::Question,
        #[command(flatten)]
        logs: LogArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = QueryFormat::Table)]
        format: QueryFormat,
    },
    /// Write a self-contained HTML report (charts and the five answers) from the JSONL logs.
    Report {
        /// Output file.
        #[arg(long, default_value = "report.html")]
        out: PathBuf,
        #[command(flatten)]
        logs: LogArgs,
    },
    /// Check the JSONL logs themselves.
    #[command(subcommand)]
    Logs(LogsCommand),
}

#[derive(Debug, Subcommand)]
enum LogsCommand {
    /// Check that the telemetry and decisions logs are consistent.
    ///
    /// Every line parses, no request id twice, every decision has one telemetry line and every
    /// telemetry line its decision, deny ⇔ denied, valid statuses and costs. Prints a summary;
    /// exit 0 when consistent, 1 when not (or on an I/O error).
    Verify {
        #[command(flatten)]
        paths: LogPaths,
        /// Count decisions without telemetry (requests in flight: use on a live gateway's logs)
        /// without failing on them.
        #[arg(long)]
        allow_unanswered: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = VerifyFormat::Text)]
        format: VerifyFormat,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum VerifyFormat {
    Text,
    Json,
}

/// Where the two logs are: shared by `query`, `report` and `logs verify`.
#[derive(Debug, Args)]
struct LogPaths {
    /// Telemetry log.
    #[arg(
        long,
        env = "TELEMETRY_PATH",
        default_value = "artifacts/logs/telemetry.jsonl"
    )]
    telemetry: PathBuf,
    /// Decisions log.
    #[arg(
        long,
        env = "DECISIONS_PATH",
        default_value = "artifacts/logs/policy_decisions.jsonl"
    )]
    decisions: PathBuf,
}

/// Log locations and filters shared by `query` and `report`.
#[derive(Debug, Args)]
struct LogArgs {
    #[command(flatten)]
    paths: LogPaths,
    /// unsafe_routes: average cost per request (USD) above which a route is unsafe.
    #[arg(long, default_value_t = crate::queries::DEFAULT_THRESHOLD_USD)]
    threshold: f64,
    /// Only records at or after this time (RFC 3339 or YYYY-MM-DD, UTC).
    #[arg(long, value_parser = crate::queries::parse_time)]
    since: Option<i64>,
    /// Only records before this time (RFC 3339 or YYYY-MM-DD, UTC).
    #[arg(long, value_parser = crate::queries::parse_time)]
    until: Option<i64>,
}

impl LogArgs {
    /// Ingest both logs into a fresh in-memory engine, noting missing, empty and malformed input.
    fn engine(&self) -> Result<crate::engine::SpendEngine> {
        for (what, path) in [
            ("telemetry", &self.paths.telemetry),
            ("decisions", &self.paths.decisions),
        ] {
            match std::fs::metadata(path) {
                Err(_) => eprintln_safe(&format!(
                    "note: {what} log {} does not exist; treating it as empty",
                    path.display()
                )),
                Ok(m) if m.len() == 0 => {
                    eprintln_safe(&format!("note: {what} log {} is empty", path.display()))
                }
                Ok(_) => {}
            }
        }
        let engine =
            crate::engine::SpendEngine::open(None, &self.paths.telemetry, &self.paths.decisions)?;
        let report = engine.ingest()?;
        for line in &report.malformed {
            eprintln_safe(&format!("skipped malformed line {line}"));
        }
        Ok(engine)
    }

    fn params(&self) -> crate::queries::QueryParams {
        crate::queries::QueryParams {
            since_us: self.since,
            until_us: self.until,
            threshold_usd: self.threshold,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum QueryFormat {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// List the components in the policies directory: name, version, sha256, description.
    List {
        #[command(flatten)]
        runtime: RuntimeArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Validate a policy YAML and every rule's settings; exit 0 when valid, 1 otherwise.
    Check {
        /// The policy YAML.
        config: PathBuf,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Evaluate one request against a namespace and print the combined verdict as JSON.
    Eval {
        /// The policy YAML.
        #[arg(long)]
        config: PathBuf,
        /// Namespace to evaluate (default: the request's `budget_namespace`, resolved as the
        /// gateway does: unknown or absent means `default`).
        #[arg(long)]
        namespace: Option<String>,
        /// Request context JSON (fields of `RequestContext`, snake_case).
        #[arg(long)]
        request: PathBuf,
        /// Aggregate values JSON: `{"rules": {"<rule id>": {"<key>": {"value": 1.0, "samples": 3}}}}`.
        #[arg(long)]
        snapshot: Option<PathBuf>,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

/// Where components live and how they are bounded.
#[derive(Debug, Args)]
struct RuntimeArgs {
    /// Directory holding `<primitive>.wasm` components.
    #[arg(long, env = "LLMSCOPE_POLICIES_DIR", default_value = "policies")]
    policies_dir: PathBuf,
    /// Deadline of one policy call, in milliseconds.
    #[arg(long, default_value_t = 20)]
    deadline_ms: u64,
    /// Memory cap of one policy instance, in MiB.
    #[arg(long, default_value_t = 32)]
    memory_mib: usize,
}

impl RuntimeArgs {
    fn runtime(&self) -> Result<Arc<PolicyRuntime>> {
        let limits = Limits {
            deadline: Duration::from_millis(self.deadline_ms),
            memory_bytes: self.memory_mib << 20,
            ..Limits::default()
        };
        Ok(Arc::new(
            PolicyRuntime::new(limits).context("starting the wasm runtime")?,
        ))
    }
}

/// Run the CLI; returns the process exit code.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve { config, listen } => serve(&config, listen),
        Command::MockUpstream { listen, latency_ms } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                {
                    let mut out = std::io::stdout().lock();
                    writeln!(
                        out,
                        "mock upstream listening on http://{}",
                        listener.local_addr()?
                    )?;
                    out.flush()?;
                }
                crate::mock_upstream::serve(listener, Duration::from_millis(latency_ms)).await?;
                Ok::<_, anyhow::Error>(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Query { name, logs, format } => {
            let engine = logs.engine()?;
            let answer = crate::queries::run(&engine, name, &logs.params())?;
            let text = match format {
                QueryFormat::Table => crate::queries::to_table(&answer),
                QueryFormat::Csv => crate::queries::to_csv(&answer),
                QueryFormat::Json => format!("{}\n", serde_json::to_string_pretty(&answer)?),
            };
            std::io::stdout().lock().write_all(text.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { out, logs } => {
            let engine = logs.engine()?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let html =
                crate::report::render(&engine, &logs.params(), &crate::artifacts::rfc3339(now))?;
            std::fs::write(&out, html)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("wrote {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs(LogsCommand::Verify {
            paths,
            allow_unanswered,
            format,
        }) => {
            let options = crate::verify::Options { allow_unanswered };
            let summary = crate::verify::verify_files(&paths.telemetry, &paths.decisions, options)?;
            let text = match format {
                VerifyFormat::Text => summary.to_text(),
                VerifyFormat::Json => format!("{}\n", serde_json::to_string_pretty(&summary)?),
            };
            std::io::stdout().lock().write_all(text.as_bytes())?;
            Ok(if summary.consistent {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Policy(PolicyCommand::List { runtime, format }) => list(&runtime, format),
        Command::Policy(PolicyCommand::Check { config, runtime }) => {
            let rt = runtime.runtime()?;
            match PolicySet::load(&config, &runtime.policies_dir, &rt) {
                Ok(set) => {
                    let rules = set.rules().count();
                    let namespaces = set.namespaces().count();
                    println!(
                        "{}: ok — {namespaces} namespace(s), {rules} rule(s), {} component(s) from {}",
                        config.display(),
                        set.components().count(),
                        runtime.policies_dir.display()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln_safe(&e.to_string());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Policy(PolicyCommand::Eval {
            config,
            namespace,
            request,
            snapshot,
            runtime,
        }) => {
            let rt = runtime.runtime()?;
            let set = PolicySet::load(&config, &runtime.policies_dir, &rt)?;
            let mut req = read_request(&request)?;
            if let Some(ns) = namespace {
                req.budget_namespace = ns;
            }
            let snapshots: Box<dyn SnapshotSource> = match snapshot {
                Some(path) => Box::new(StaticSnapshots::from_file(&path)?),
                None => Box::new(NoSnapshots),
            };
            let evaluation = set.evaluate(&req, snapshots.as_ref());
            println!("{}", serde_json::to_string_pretty(&evaluation)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn serve(config: &Path, listen: Option<std::net::SocketAddr>) -> Result<ExitCode> {
    let env = |name: &str| std::env::var(name).ok();
    let mut cfg = crate::config::GatewayConfig::load(config, &env)?;
    if let Some(addr) = listen {
        cfg.listen = addr;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let hot_reload = cfg.hot_reload;
        let addr = cfg.listen;
        // SIGHUP (logrotate's postrotate) must not kill a gateway that is still starting
        // (recovery, ingesting large logs): take it over before the start.
        #[cfg(unix)]
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let gateway = tokio::task::block_in_place(|| crate::gateway::Gateway::start(cfg, &env))?;
        let listener = crate::server::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let bound = listener.local_addr()?;
        let refresher = {
            let gw = Arc::clone(&gateway);
            tokio::spawn(async move {
                let interval = gw.config().refresh_interval;
                loop {
                    tokio::time::sleep(interval).await;
                    let g = Arc::clone(&gw);
                    let refreshed = tokio::task::spawn_blocking(move || {
                        let refreshed = g.refresh();
                        // After publishing: compaction holds the engine for a while.
                        if refreshed.is_ok() {
                            if let Err(e) = g.engine().compact() {
                                tracing::warn!(error = %e, "compressing the analytics tables failed; they stay uncompressed until the next try");
                            }
                        }
                        refreshed
                    });
                    match refreshed.await {
                        Ok(Err(e)) => tracing::error!(error = %e, "aggregate refresh failed; budgets use the last published values plus the ledger"),
                        Err(e) => tracing::error!(error = %e, "aggregate refresh task failed"),
                        Ok(Ok(_)) => {}
                    }
                }
            })
        };
        #[cfg(unix)]
        {
            // SIGHUP: reopen the logs (after logrotate moved them; a rename is also noticed
            // on the next write without it).
            let gw = Arc::clone(&gateway);
            if let Some(mut hup) = hup {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP: reopening the logs");
                        gw.reopen_logs();
                    }
                });
            }
        }
        let _watcher = if hot_reload { Some(crate::reload::watch(Arc::clone(&gateway)).context("watching the policy files")?) } else { None };
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "llmscope listening on http://{bound}")?;
            out.flush()?;
        }
        tracing::info!(%bound, "serving");
        crate::server::serve(gateway, listener, shutdown_signal()).await?;
        refresher.abort();
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn read_request(path: &Path) -> Result<RequestContext> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read request file {}", path.display()))?;
    let mut de = serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        anyhow::anyhow!(
            "request file {}: at {}: {}",
            path.display(),
            e.path(),
            e.inner()
        )
    })
}

fn list(args: &RuntimeArgs, format: Format) -> Result<ExitCode> {
    let rt = args.runtime()?;
    let dir = &args.policies_dir;
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read policies directory {}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| crate::policy::is_component_file(p))
        .collect();
    files.sort();
    let mut rows = Vec::new();
    let mut failed = false;
    for file in &files {
        match rt.load(file) {
            Ok(c) => rows.push(serde_json::json!({
                "name": c.info().name, "version": c.info().version,
                "description": c.info().description, "sha256": c.sha256(),
                "size_bytes": c.size(), "path": file.display().to_string(),
            })),
            Err(e) => {
                failed = true;
                rows.push(
                    serde_json::json!({"path": file.display().to_string(), "error": e.to_string()}),
                );
            }
        }
    }
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?,
        Format::Table => {
            if rows.is_empty() {
                writeln!(
                    out,
                    "no components in {} (build them with `cargo xtask build-policies`)",
                    dir.display()
                )?;
            }
            for row in &rows {
                let s = |k: &str| row[k].as_str().unwrap_or("").to_owned();
                if row.get("error").is_some() {
                    writeln!(out, "{:<20} ERROR  {}", s("path"), s("error"))?;
                } else {
                    writeln!(
                        out,
                        "{:<20} {:<8} {}  {}",
                        s("name"),
                        s("version"),
                        &s("sha256")[..16.min(s("sha256").len())],
                        s("description")
                    )?;
                }
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn eprintln_safe(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{message}");
}
