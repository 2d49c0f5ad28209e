//! `llmscope policy replay --config candidate.yaml`: re-evaluate every logged request with a
//! candidate policy file, aggregates as of each request's time ([`crate::replay`]), and report
//! per namespace and rule what would have changed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use super::explain::EXIT_BAD_INPUT;
use super::sources::Sources;
use crate::replay::{replay, with_rotated, Counts, ReplayOptions, ReplayReport, Tally};

/// Output format of `policy replay`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum ReplayFormat {
    Table,
    Json,
    Csv,
}

/// Arguments of `policy replay`.
#[derive(Debug, clap::Args)]
pub(crate) struct ReplayArgs {
    /// The candidate policy YAML.
    #[arg(long)]
    config: PathBuf,
    #[command(flatten)]
    sources: Sources,
    /// Only requests at or after this time (RFC 3339 or YYYY-MM-DD, UTC); earlier ones still
    /// count in the aggregates.
    #[arg(long, value_parser = crate::queries::parse_time)]
    since: Option<i64>,
    /// Only requests before this time.
    #[arg(long, value_parser = crate::queries::parse_time)]
    until: Option<i64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReplayFormat::Table)]
    format: ReplayFormat,
}

/// Run `policy replay`: exit 0 with the report, 2 when the inputs are bad.
pub(crate) fn run(args: &ReplayArgs) -> Result<ExitCode> {
    let report = match run_replay(args) {
        Ok(r) => r,
        Err(e) => {
            super::super::eprintln_safe(&format!("error: {e:#}"));
            return Ok(ExitCode::from(EXIT_BAD_INPUT));
        }
    };
    let mut out = std::io::stdout().lock();
    match args.format {
        ReplayFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?,
        ReplayFormat::Csv => write_csv(&mut out, &report)?,
        ReplayFormat::Table => write_table(&mut out, &report)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn run_replay(args: &ReplayArgs) -> Result<ReplayReport> {
    let resolved = args.sources.resolve()?;
    if !resolved.decisions.is_file() {
        anyhow::bail!(
            "no decisions log at {}; name the logs directory with --logs DIR or the gateway's \
             configuration with --gateway-config",
            resolved.decisions.display()
        );
    }
    let (_runtime, set) = resolved.load(&args.config)?;
    replay(
        &set,
        &with_rotated(&resolved.decisions),
        &with_rotated(&resolved.telemetry),
        &ReplayOptions {
            since_us: args.since,
            until_us: args.until,
        },
    )
}

fn counts(c: &Counts) -> String {
    format!("{}/{}/{}", c.allow, c.downgrade, c.deny)
}

fn write_tallies(out: &mut impl Write, title: &str, rows: &[Tally]) -> std::io::Result<()> {
    writeln!(
        out,
        "\n{title:<24} {:>9} {:>16} {:>16} {:>8} {:>12} {:>12} {:>12} {:>12}",
        "requests",
        "logged a/d/x",
        "candidate a/d/x",
        "changed",
        "denied$ was",
        "denied$ now",
        "moved$ was",
        "moved$ now"
    )?;
    for t in rows {
        writeln!(
            out,
            "{:<24} {:>9} {:>16} {:>16} {:>8} {:>12.4} {:>12.4} {:>12.4} {:>12.4}",
            t.name,
            t.requests,
            counts(&t.logged),
            counts(&t.candidate),
            t.changed,
            t.denied_usd_logged,
            t.denied_usd_candidate,
            t.moved_usd_logged,
            t.moved_usd_candidate
        )?;
    }
    Ok(())
}

fn write_table(out: &mut impl Write, r: &ReplayReport) -> std::io::Result<()> {
    writeln!(
        out,
        "replayed {} of {} decision lines ({} without provenance, {} edge): {} match ({:.2}%)",
        r.replayed,
        r.lines,
        r.skipped_no_provenance,
        r.skipped_edge,
        r.matched,
        r.match_rate * 100.0
    )?;
    write_tallies(out, "namespace", &r.namespaces)?;
    writeln!(
        out,
        "\n{:<28} {:<14} {:<18} {:>16} {:>16}",
        "rule", "namespace", "primitive", "logged a/d/x", "candidate a/d/x"
    )?;
    for t in &r.rules {
        writeln!(
            out,
            "{:<28} {:<14} {:<18} {:>16} {:>16}",
            t.rule_id,
            t.namespace,
            t.primitive,
            counts(&t.logged),
            counts(&t.candidate)
        )?;
    }
    if !r.tenants.is_empty() {
        write_tallies(out, "most affected tenants", &r.tenants)?;
        write_tallies(out, "most affected features", &r.features)?;
    }
    if !r.mismatches.is_empty() {
        writeln!(
            out,
            "\nchanged decisions (first {}; {} of them had requests of their namespace in flight):",
            r.mismatches.len(),
            r.mismatches_with_in_flight
        )?;
        for m in &r.mismatches {
            writeln!(
                out,
                "  {}  {}  logged {}  candidate {}  in flight {} (±{:.6} USD)",
                m.request_id,
                m.namespace,
                m.logged,
                m.candidate,
                m.in_flight,
                m.in_flight_slack_usd
            )?;
        }
    }
    Ok(())
}

fn write_csv(out: &mut impl Write, r: &ReplayReport) -> std::io::Result<()> {
    writeln!(
        out,
        "kind,name,requests,logged_allow,logged_downgrade,logged_deny,candidate_allow,candidate_downgrade,candidate_deny,changed,denied_usd_logged,denied_usd_candidate,moved_usd_logged,moved_usd_candidate"
    )?;
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    for (kind, rows) in [
        ("namespace", &r.namespaces),
        ("tenant", &r.tenants),
        ("feature", &r.features),
    ] {
        for t in rows {
            writeln!(
                out,
                "{kind},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                quote(&t.name),
                t.requests,
                t.logged.allow,
                t.logged.downgrade,
                t.logged.deny,
                t.candidate.allow,
                t.candidate.downgrade,
                t.candidate.deny,
                t.changed,
                t.denied_usd_logged,
                t.denied_usd_candidate,
                t.moved_usd_logged,
                t.moved_usd_candidate
            )?;
        }
    }
    for t in &r.rules {
        writeln!(
            out,
            "rule,{},,{},{},{},{},{},{},,,,,",
            quote(&t.rule_id),
            t.logged.allow,
            t.logged.downgrade,
            t.logged.deny,
            t.candidate.allow,
            t.candidate.downgrade,
            t.candidate.deny
        )?;
    }
    Ok(())
}
