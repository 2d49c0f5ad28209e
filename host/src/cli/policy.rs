//! `llmscope policy list | check | eval`: inspect, validate and try out cost policies;
//! `llmscope policy new | build | test`: write one (`policy/new.rs`, `build.rs`, `test.rs`);
//! `llmscope policy explain | replay`: hold one against history (`explain.rs`, `replay.rs`).

mod build;
mod explain;
mod new;
mod replay;
mod sources;
mod test;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use llmscope_sdk::types::RequestContext;

use super::eprintln_safe;
use crate::policy::{
    Limits, NoSnapshots, PolicyRuntime, PolicySet, SnapshotSource, StaticSnapshots,
};

#[derive(Debug, Subcommand)]
pub(super) enum PolicyCommand {
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
    /// Start a policy crate: Cargo.toml, src/lib.rs (a Policy with validated settings and native
    /// tests), cases.yaml and a README; it builds and passes its tests as generated.
    New(new::NewArgs),
    /// Build a policy crate into its component, `<primitive>.wasm`, checked as the gateway
    /// loads it.
    Build(build::BuildArgs),
    /// Run a policy's cases (cases.yaml) against its built component in the gateway's runtime;
    /// exit 0 when all pass, 1 when one fails, 2 when the component or the cases cannot be used.
    Test(test::TestArgs),
    /// Re-run a logged request's rules on the components and settings in place now and show,
    /// rule by rule, logged against now; exit 0 when all the same, 1 when something differs,
    /// 2 when the request is not found or cannot be re-run.
    Explain(explain::ExplainArgs),
    /// Re-evaluate every logged request with a candidate policy file, each rule given its
    /// aggregates as of the request's time, and report per namespace and rule what changes.
    Replay(replay::ReplayArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum Format {
    Table,
    Json,
}

/// Where components live and how they are bounded.
#[derive(Debug, Args)]
pub(super) struct RuntimeArgs {
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

/// Run one `policy` subcommand.
pub(super) fn run(command: PolicyCommand) -> Result<ExitCode> {
    match command {
        PolicyCommand::List { runtime, format } => list(&runtime, format),
        PolicyCommand::Check { config, runtime } => check(&config, &runtime),
        PolicyCommand::Eval {
            config,
            namespace,
            request,
            snapshot,
            runtime,
        } => eval(&config, namespace, &request, snapshot.as_deref(), &runtime),
        PolicyCommand::New(args) => new::run(&args),
        PolicyCommand::Build(args) => build::run(&args),
        PolicyCommand::Test(args) => test::run(&args),
        PolicyCommand::Explain(args) => explain::run(&args),
        PolicyCommand::Replay(args) => replay::run(&args),
    }
}

/// Load `config`; print what it holds, or its errors and fail.
fn check(config: &Path, runtime: &RuntimeArgs) -> Result<ExitCode> {
    let rt = runtime.runtime()?;
    match PolicySet::load(config, &runtime.policies_dir, &rt) {
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

/// Evaluate the request in `request` (in `namespace` if given) and print the verdict as JSON.
fn eval(
    config: &Path,
    namespace: Option<String>,
    request: &Path,
    snapshot: Option<&Path>,
    runtime: &RuntimeArgs,
) -> Result<ExitCode> {
    let rt = runtime.runtime()?;
    let set = PolicySet::load(config, &runtime.policies_dir, &rt)?;
    let mut req = read_request(request)?;
    if let Some(ns) = namespace {
        req.budget_namespace = ns;
    }
    let snapshots: Box<dyn SnapshotSource> = match snapshot {
        Some(path) => Box::new(StaticSnapshots::from_file(path)?),
        None => Box::new(NoSnapshots),
    };
    let evaluation = set.evaluate(&req, snapshots.as_ref());
    println!("{}", serde_json::to_string_pretty(&evaluation)?);
    Ok(ExitCode::SUCCESS)
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
