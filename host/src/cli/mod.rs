//! The `llmscope` command line: the argument types of the top-level commands and [`run`], which
//! hands each one to its module (`serve`, `logs`, `policy`, `budgets`).

mod budgets;
mod logs;
mod policy;
mod serve;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use self::logs::{LogArgs, LogsCommand, QueryFormat};
use self::policy::PolicyCommand;

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
        /// How it answers (latency, streams).
        #[command(flatten)]
        options: crate::mock_upstream::Options,
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
    /// How much of each budget is left: asks a running gateway (`GET /v1/budgets`).
    Budgets(budgets::BudgetsArgs),
}

/// Run the CLI; returns the process exit code.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve { config, listen } => serve::serve(&config, listen),
        Command::MockUpstream { listen, options } => serve::mock_upstream(listen, options),
        Command::Query { name, logs, format } => logs::query(name, &logs, format),
        Command::Report { out, logs } => logs::report(&out, &logs),
        Command::Logs(LogsCommand::Verify {
            paths,
            allow_unanswered,
            format,
        }) => logs::verify(&paths, allow_unanswered, format),
        Command::Policy(command) => policy::run(command),
        Command::Budgets(args) => budgets::run(&args),
    }
}

fn eprintln_safe(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{message}");
}
