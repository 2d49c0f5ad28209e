//! `llmscope policy explain <request_id>`: find a request's decision line, re-run each of its
//! rules with the logged request context and aggregate values on the components and settings
//! in place now, and print logged against now, rule by rule.
//!
//! Exit codes: 0 everything is the same, 1 something differs, 2 the request is not found or
//! the inputs are bad (the message says which and what to do).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::sources::{Sources, DEFAULT_POLICY_FILE};
use super::Format;
use crate::policy::{DecisionKind, RuleOutcome, StaticSnapshots, StaticValue};
use llmscope_wire::records::DecisionLine;

/// Exit code of a request that cannot be explained (not found, no provenance, bad inputs).
pub(crate) const EXIT_BAD_INPUT: u8 = 2;

/// Arguments of `policy explain`.
#[derive(Debug, clap::Args)]
pub(crate) struct ExplainArgs {
    /// The request id, as the client was answered and the logs hold it.
    request_id: String,
    /// The policy YAML to re-run with [default: the gateway configuration's `policy.file`,
    /// else examples/policy.yaml].
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    sources: Sources,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// One field of a rule (or of the request's outcome) that differs: logged, then now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Difference {
    /// Field name: `component_sha256`, `settings_sha256`, `mode`, `failure_mode`, `decision`,
    /// `tier`, `reason`, `error`, `deciding_rule`, `effective_tier`.
    pub field: &'static str,
    /// As logged (`null`: absent).
    pub logged: Option<String>,
    /// As re-run now.
    pub now: Option<String>,
}

/// How a rule compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Status {
    /// Re-run alike: same component, settings and verdict.
    Same,
    /// Something differs (listed).
    Differs,
    /// Logged, but the namespace has no such rule now.
    Removed,
    /// In the namespace now, not logged (re-run with no aggregate values).
    Added,
}

/// One rule, logged against now.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RuleComparison {
    /// Rule id.
    pub rule_id: String,
    /// Primitive (now, else as logged).
    pub primitive: String,
    /// Same, differs, removed, added.
    pub status: Status,
    /// What differs.
    pub differences: Vec<Difference>,
    /// The logged outcome.
    pub logged: Option<RuleOutcome>,
    /// The outcome now.
    pub now: Option<RuleOutcome>,
    /// Remarks (e.g. an aggregate the rule now declares that the line holds no value for).
    pub notes: Vec<String>,
}

/// The whole explanation.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Explanation {
    /// Request id.
    pub request_id: String,
    /// File the decision line was found in.
    pub file: String,
    /// Request time.
    pub timestamp: String,
    /// Tenant.
    pub tenant_id: String,
    /// Namespace the rules ran in (logged).
    pub namespace: Option<String>,
    /// Namespace the request resolves to now.
    pub namespace_now: Option<String>,
    /// Policy file re-run with.
    pub policy_file: String,
    /// Whether everything is the same.
    pub same: bool,
    /// Differences of the request's outcome (decision, deciding rule, tier).
    pub outcome: Vec<Difference>,
    /// The logged decision.
    pub logged_decision: String,
    /// The decision now.
    pub decision_now: String,
    /// Rule by rule, in logged order, then rules added since.
    pub rules: Vec<RuleComparison>,
}

/// Run `policy explain`.
pub(crate) fn run(args: &ExplainArgs) -> Result<ExitCode> {
    match explain(args) {
        Ok(explanation) => {
            let mut out = std::io::stdout().lock();
            match args.format {
                Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&explanation)?)?,
                Format::Table => write_table(&mut out, &explanation)?,
            }
            Ok(if explanation.same {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Err(e) => {
            super::super::eprintln_safe(&format!("error: {e:#}"));
            Ok(ExitCode::from(EXIT_BAD_INPUT))
        }
    }
}

fn explain(args: &ExplainArgs) -> Result<Explanation> {
    let resolved = args.sources.resolve()?;
    let policy_file = args
        .config
        .clone()
        .or_else(|| resolved.gateway_policy_file.clone())
        .unwrap_or_else(|| DEFAULT_POLICY_FILE.into());
    let files = resolved.decision_files();
    let (file, line) = find_decision(&files, &args.request_id)?;
    let Some(ctx) = line.request_context() else {
        bail!(
            "the decision line of request {} in {} has no provenance (no `policy_input`: it was \
             written before llmscope recorded it), so its rules cannot be re-run",
            args.request_id,
            file.display()
        );
    };
    if line.policy_version.as_deref() == Some("edge") {
        bail!(
            "request {} (in {}) was evaluated by Envoy filters, whose components and settings \
             are in the Envoy configuration, not in a policy file; explain re-runs the host's \
             rules only",
            args.request_id,
            file.display()
        );
    }
    let (_runtime, set) = resolved.load(&policy_file)?;
    let snapshots = logged_snapshots(&line);
    let evaluation = set.evaluate(&ctx, &snapshots);
    let now_ns = set.resolve(Some(ctx.budget_namespace.as_str()).filter(|n| !n.is_empty()));

    let mut rules = Vec::new();
    let now_by_id: BTreeMap<&str, &RuleOutcome> = evaluation
        .rules
        .iter()
        .map(|r| (r.rule_id.as_str(), r))
        .collect();
    let logged_ids: Vec<&str> = line.rules.iter().map(|r| r.rule_id.as_str()).collect();
    for logged in &line.rules {
        let now = now_by_id.get(logged.rule_id.as_str()).copied();
        rules.push(compare_rule(Some(logged), now, now_ns));
    }
    for now in evaluation
        .rules
        .iter()
        .filter(|r| !logged_ids.contains(&r.rule_id.as_str()))
    {
        rules.push(compare_rule(None, Some(now), now_ns));
    }

    let now_tier = match evaluation.decision {
        DecisionKind::Downgrade => evaluation
            .downgrade_to
            .clone()
            .unwrap_or_else(|| ctx.requested_tier.clone()),
        _ => ctx.requested_tier.clone(),
    };
    let mut outcome = Vec::new();
    let logged_decision = line.decision.clone();
    let decision_now = evaluation.decision.as_str().to_owned();
    differ(
        &mut outcome,
        "decision",
        Some(logged_decision.clone()),
        Some(decision_now.clone()),
    );
    differ(
        &mut outcome,
        "deciding_rule",
        line.policy_id.clone(),
        evaluation.policy_id.clone(),
    );
    differ(
        &mut outcome,
        "effective_tier",
        line.effective_model_tier.clone(),
        Some(now_tier),
    );
    // Rules of the same ids in another namespace are not the same rules.
    differ(
        &mut outcome,
        "namespace",
        line.budget_namespace.clone(),
        evaluation.namespace.clone(),
    );
    let same = outcome.is_empty() && rules.iter().all(|r| r.status == Status::Same);
    Ok(Explanation {
        request_id: args.request_id.clone(),
        file: file.display().to_string(),
        timestamp: line.timestamp.clone(),
        tenant_id: ctx.tenant_id.clone(),
        namespace: line.budget_namespace.clone(),
        namespace_now: evaluation.namespace.clone(),
        policy_file: policy_file.display().to_string(),
        same,
        outcome,
        logged_decision,
        decision_now,
        rules,
    })
}

/// The first decision line of `request_id` in `files` (searched in order), with its file.
fn find_decision(files: &[PathBuf], request_id: &str) -> Result<(PathBuf, DecisionLine)> {
    let mut searched = Vec::new();
    for file in files {
        let Ok(f) = std::fs::File::open(file) else {
            continue;
        };
        searched.push(file.display().to_string());
        let mut reader = BufReader::new(f);
        let mut buf = Vec::new();
        let mut offset = 0u64;
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .with_context(|| format!("reading {}", file.display()))?;
            if n == 0 {
                break;
            }
            let at = offset;
            offset += n as u64;
            if !contains(&buf, request_id.as_bytes()) {
                continue;
            }
            let Ok(line) = DecisionLine::parse(buf.trim_ascii_end()) else {
                super::super::eprintln_safe(&format!(
                    "note: skipped malformed line {}:{at}",
                    file.display()
                ));
                continue;
            };
            if line.request_id.as_deref() == Some(request_id) {
                return Ok((file.clone(), line));
            }
        }
    }
    if searched.is_empty() {
        bail!(
            "no decisions log at {}; name the logs directory with --logs DIR or the gateway's \
             configuration with --gateway-config",
            files
                .first()
                .map_or_else(String::new, |f| f.display().to_string())
        );
    }
    bail!(
        "request {request_id} not found in {}; check the id, or name the logs it is in with \
         --logs DIR",
        searched.join(", ")
    )
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The logged aggregate values of every rule of `line`, as a snapshot source; a rule or key
/// the line has no value for gets none.
pub(crate) fn logged_snapshots(line: &DecisionLine) -> StaticSnapshots {
    StaticSnapshots {
        taken_at_unix_ms: line.rules.iter().find_map(|r| r.snapshot_taken_at_ms),
        rules: line
            .rules
            .iter()
            .map(|r| {
                (
                    r.rule_id.clone(),
                    r.aggregates
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                StaticValue {
                                    value: v.value,
                                    samples: v.samples,
                                },
                            )
                        })
                        .collect(),
                )
            })
            .collect(),
    }
}

fn differ(
    out: &mut Vec<Difference>,
    field: &'static str,
    logged: Option<String>,
    now: Option<String>,
) {
    if logged != now {
        out.push(Difference { field, logged, now });
    }
}

fn compare_rule(
    logged: Option<&RuleOutcome>,
    now: Option<&RuleOutcome>,
    now_ns: Option<&crate::policy::Namespace>,
) -> RuleComparison {
    let either = now.or(logged).map_or_else(Default::default, |r| {
        (r.rule_id.clone(), r.primitive.clone())
    });
    let mut notes = Vec::new();
    let (status, differences) = match (logged, now) {
        (Some(l), Some(n)) => {
            let mut d = Vec::new();
            differ(
                &mut d,
                "component_sha256",
                l.component_sha256.clone(),
                n.component_sha256.clone(),
            );
            differ(
                &mut d,
                "settings_sha256",
                l.settings_sha256.clone(),
                n.settings_sha256.clone(),
            );
            differ(
                &mut d,
                "mode",
                Some(format!("{:?}", l.mode).to_lowercase()),
                Some(format!("{:?}", n.mode).to_lowercase()),
            );
            differ(
                &mut d,
                "failure_mode",
                Some(format!("{:?}", l.failure_mode).to_lowercase()),
                Some(format!("{:?}", n.failure_mode).to_lowercase()),
            );
            differ(
                &mut d,
                "decision",
                Some(l.decision.as_str().into()),
                Some(n.decision.as_str().into()),
            );
            differ(
                &mut d,
                "tier",
                l.downgrade_to.clone(),
                n.downgrade_to.clone(),
            );
            differ(&mut d, "reason", l.reason.clone(), n.reason.clone());
            differ(&mut d, "error", l.error.clone(), n.error.clone());
            if let Some(rule) =
                now_ns.and_then(|ns| ns.rules().iter().find(|r| r.id() == n.rule_id))
            {
                for a in rule.aggregates() {
                    if !l.aggregates.contains_key(&a.key) {
                        notes.push(format!(
                            "aggregate `{}` is declared now but the line holds no value for it; re-run with none",
                            a.key
                        ));
                    }
                }
                if l.settings_sha256 != n.settings_sha256 && !rule.aggregates().is_empty() {
                    notes.push(
                        "the settings changed: the aggregate values are the logged ones, computed for the settings then"
                            .into(),
                    );
                }
            }
            (
                if d.is_empty() {
                    Status::Same
                } else {
                    Status::Differs
                },
                d,
            )
        }
        (Some(_), None) => (Status::Removed, Vec::new()),
        (None, Some(_)) => {
            notes.push("not logged for this request: re-run with no aggregate values".into());
            (Status::Added, Vec::new())
        }
        (None, None) => (Status::Same, Vec::new()),
    };
    RuleComparison {
        rule_id: either.0,
        primitive: either.1,
        status,
        differences,
        logged: logged.cloned(),
        now: now.cloned(),
        notes,
    }
}

fn verdict_text(r: &RuleOutcome) -> String {
    match &r.downgrade_to {
        Some(tier) => format!("{} to {tier}", r.decision.as_str()),
        None => r.decision.as_str().to_owned(),
    }
}

fn show(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "—".into())
}

fn write_table(out: &mut impl Write, e: &Explanation) -> std::io::Result<()> {
    writeln!(
        out,
        "request {} at {} (tenant {}, namespace {}), from {}",
        e.request_id,
        e.timestamp,
        e.tenant_id,
        e.namespace.as_deref().unwrap_or("none"),
        e.file
    )?;
    writeln!(out, "re-run with {}", e.policy_file)?;
    if e.namespace != e.namespace_now {
        writeln!(
            out,
            "namespace now: {} (was {})",
            e.namespace_now.as_deref().unwrap_or("none"),
            e.namespace.as_deref().unwrap_or("none")
        )?;
    }
    writeln!(out)?;
    writeln!(out, "{:<28} {:<10} {:<24} now", "rule", "status", "logged")?;
    for r in &e.rules {
        let status = match r.status {
            Status::Same => "same",
            Status::Differs => "differs",
            Status::Removed => "removed",
            Status::Added => "added",
        };
        let logged = r.logged.as_ref().map_or_else(|| "—".into(), verdict_text);
        let now = r.now.as_ref().map_or_else(|| "—".into(), verdict_text);
        writeln!(
            out,
            "{:<28} {:<10} {:<24} {}",
            r.rule_id, status, logged, now
        )?;
        for d in &r.differences {
            writeln!(
                out,
                "  {:<26} {:<10} {:<24} {}",
                d.field,
                "",
                show(&d.logged),
                show(&d.now)
            )?;
        }
        for n in &r.notes {
            writeln!(out, "  note: {n}")?;
        }
    }
    writeln!(out)?;
    if e.outcome.is_empty() {
        writeln!(out, "decision: {} (same)", e.logged_decision)?;
    } else {
        writeln!(
            out,
            "decision: logged {}, now {}",
            e.logged_decision, e.decision_now
        )?;
        for d in &e.outcome {
            writeln!(
                out,
                "  {:<26} {:<10} {:<24} {}",
                d.field,
                "",
                show(&d.logged),
                show(&d.now)
            )?;
        }
    }
    writeln!(out, "{}", if e.same { "same" } else { "differs" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_field_is_listed_with_both_values() {
        let mut d = Vec::new();
        differ(&mut d, "decision", Some("deny".into()), Some("deny".into()));
        assert!(d.is_empty());
        differ(&mut d, "tier", None, Some("cheap".into()));
        assert_eq!(
            d,
            [Difference {
                field: "tier",
                logged: None,
                now: Some("cheap".into())
            }]
        );
    }

    #[test]
    fn an_unknown_request_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("policy_decisions.jsonl");
        std::fs::write(&log, "{\"timestamp\":\"2026-01-01T00:00:00Z\",\"request_id\":\"a\",\"decision\":\"allow\"}\n").unwrap();
        let err = find_decision(std::slice::from_ref(&log), "b")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("request b not found in"), "{err}");
        let (_, line) = find_decision(&[log], "a").unwrap();
        assert_eq!(line.decision, "allow");
    }
}
