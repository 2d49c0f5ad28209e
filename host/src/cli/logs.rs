//! The commands that read the JSONL logs: `query`, `report` and `logs verify`, and the log
//! arguments they share.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};

use super::eprintln_safe;

#[derive(Debug, Subcommand)]
pub(super) enum LogsCommand {
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
pub(super) enum VerifyFormat {
    Text,
    Json,
}

/// The telemetry log when none is named (the example config's).
const DEFAULT_TELEMETRY: &str = "artifacts/logs/telemetry.jsonl";
/// The decisions log when none is named.
const DEFAULT_DECISIONS: &str = "artifacts/logs/policy_decisions.jsonl";

/// Where the two logs are: shared by `query`, `report` and `logs verify`.
#[derive(Debug, Args)]
pub(super) struct LogPaths {
    /// Telemetry log.
    #[arg(
        long,
        env = "TELEMETRY_PATH",
        default_value = DEFAULT_TELEMETRY
    )]
    telemetry: PathBuf,
    /// Decisions log.
    #[arg(
        long,
        env = "DECISIONS_PATH",
        default_value = DEFAULT_DECISIONS
    )]
    decisions: PathBuf,
}

/// Log locations and filters shared by `query` and `report`.
#[derive(Debug, Args)]
pub(super) struct LogArgs {
    /// Telemetry logs: a path or a glob (`'logs/*/telemetry.jsonl'`, quoted), repeatable —
    /// every replica's log, so the answers cover the fleet.
    #[arg(
        long,
        env = "TELEMETRY_PATH",
        default_value = DEFAULT_TELEMETRY,
        action = clap::ArgAction::Append
    )]
    telemetry: Vec<String>,
    /// Decisions logs: a path or a glob, repeatable.
    #[arg(
        long,
        env = "DECISIONS_PATH",
        default_value = DEFAULT_DECISIONS,
        action = clap::ArgAction::Append
    )]
    decisions: Vec<String>,
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
    /// Ingest every log named into a fresh in-memory engine, noting missing, empty and
    /// malformed input.
    fn engine(&self) -> Result<crate::engine::SpendEngine> {
        let telemetry = expand("telemetry", &self.telemetry)?;
        let decisions = expand("decisions", &self.decisions)?;
        let first = |files: &[PathBuf], fallback: &str| {
            files
                .first()
                .cloned()
                .unwrap_or_else(|| PathBuf::from(fallback))
        };
        // The engine's own pair is the first of each; the others are appended whole.
        let engine = crate::engine::SpendEngine::open(
            None,
            &first(&telemetry, DEFAULT_TELEMETRY),
            &first(&decisions, DEFAULT_DECISIONS),
        )?;
        let report = engine.ingest()?;
        let rest = |files: &[PathBuf]| files.get(1..).unwrap_or_default().to_vec();
        let (_, more_malformed) = engine.append_files(&rest(&telemetry), &rest(&decisions))?;
        for line in report.malformed.iter().chain(&more_malformed) {
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

/// The files `patterns` name (`what`: which log, for the notes): a path as is, a glob's
/// matches in order (an error when it matches nothing); missing and empty files noted.
fn expand(what: &str, patterns: &[String]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for pattern in patterns {
        if !pattern.contains(['*', '?', '[']) {
            files.push(PathBuf::from(pattern));
            continue;
        }
        let matched: Vec<PathBuf> = glob::glob(pattern)
            .with_context(|| format!("--{what} {pattern}: not a valid glob"))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("--{what} {pattern}: cannot read a matching path"))?;
        anyhow::ensure!(
            !matched.is_empty(),
            "--{what} {pattern} matches no file; check the pattern (quote it so the shell does \
             not expand it)"
        );
        files.extend(matched);
    }
    files.sort();
    files.dedup();
    for path in &files {
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
    Ok(files)
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum QueryFormat {
    Table,
    Json,
    Csv,
}

/// Answer question `name` from the logs, printed in `format`.
pub(super) fn query(
    name: crate::queries::Question,
    logs: &LogArgs,
    format: QueryFormat,
) -> Result<ExitCode> {
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

/// Write the HTML report of the logs to `out`.
pub(super) fn report(out: &Path, logs: &LogArgs) -> Result<ExitCode> {
    let engine = logs.engine()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let html = crate::report::render(&engine, &logs.params(), &crate::artifacts::rfc3339(now))?;
    std::fs::write(out, html).with_context(|| format!("cannot write {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// Check the two logs against each other; failure when they are inconsistent.
pub(super) fn verify(
    paths: &LogPaths,
    allow_unanswered: bool,
    format: VerifyFormat,
) -> Result<ExitCode> {
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
