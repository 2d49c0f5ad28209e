//! `llmscope policy test <dir|component.wasm> [--cases cases.yaml]`: a policy's table of cases,
//! run against the built component in the gateway's runtime.
//!
//! A case file (`cases.yaml`):
//!
//! ```yaml
//! settings: {max_usd: 0.01}          # optional: settings every case starts from
//! request: {tenant_id: acme}         # optional: request fields every case starts from
//! cases:
//!   - name: denies above the cap     # unique
//!     settings: {deny_reason: "Too expensive"}    # the rule's keys; a key set to ~ is removed
//!     request: {estimated_cost_usd: 0.02}         # RequestContext fields, snake_case
//!     snapshot: {tenant_hour_cost_usd: {value: 0.4, samples: 12}}   # declared aggregates
//!     expect:
//!       decision: deny               # allow | downgrade | deny
//!       tier: cheap                  # with downgrade: the tier
//!       reason: "Too expensive"      # substring; ~: no reason
//!       alert: ~                     # substring; ~: no alert
//!       facts: {max_usd: 0.01}       # named numbers of the verdict
//!       aggregates: [...]            # what configure declares, exactly
//!       error: "..."                 # evaluate must fail with this substring
//!       configure_error: "max_usd:"  # configure must refuse the settings with this substring
//! ```
//!
//! The request starts from `llmscope_sdk::testing::request()` (tenant `acme`, namespace `demo`,
//! route `/answer-routed`, tier `expensive` with `cheap` on offer, 100 tokens in, 500 out) and
//! stays consistent: `model` and `estimated_cost_usd` follow the requested tier's entry in
//! `tiers`, and a stated `estimated_cost_usd` becomes that entry's price (unless the case states
//! `tiers`). An aggregate the case gives no value is what the gateway gives for an empty window
//! (0 for sums and counts, none otherwise, 0 samples).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use llmscope_sdk::types::{
    Aggregate, AggregateValue, Aggregation, Decision, Metric, RequestContext, Snapshot, Verdict,
};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use super::build;
use crate::cli::eprintln_safe;
use crate::policy::{CallError, Limits, LoadedComponent, PolicyRuntime};

#[derive(Debug, Args)]
pub(in crate::cli) struct TestArgs {
    /// A policy crate's directory (built first, as `policy build` builds it, to
    /// `<dir>/<primitive>.wasm`) or a built component (`.wasm`).
    target: PathBuf,
    /// The case file. Default: `cases.yaml` in the crate's directory, or beside the component.
    #[arg(long)]
    cases: Option<PathBuf>,
    /// Deadline of one policy call, in milliseconds. The gateway's default is 20; this one is
    /// generous so that a busy machine does not fail a case.
    #[arg(long, default_value_t = 1000)]
    deadline_ms: u64,
    /// Memory cap of one policy instance, in MiB (the gateway's default).
    #[arg(long, default_value_t = 32)]
    memory_mib: usize,
}

/// Run `llmscope policy test`: exit 0 when every case passes, 1 when one fails, 2 when the
/// component or the case file cannot be used.
pub(in crate::cli) fn run(args: &TestArgs) -> Result<ExitCode> {
    let (component, shown, cases_path, cases) = match prepare(args) {
        Ok(ready) => ready,
        Err(e) => {
            eprintln_safe(&format!("error: {e:#}"));
            return Ok(ExitCode::from(2));
        }
    };
    let info = component.info();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "testing {} {} ({}) with {} case(s) from {}",
        info.name,
        info.version,
        shown.display(),
        cases.len(),
        cases_path.display()
    )?;
    let mut failed = 0;
    for case in &cases {
        let result = run_case(&component, case);
        write!(out, "{}", render(&case.name, &result))?;
        if !result.mismatches.is_empty() {
            failed += 1;
        }
    }
    writeln!(out, "{} passed, {failed} failed", cases.len() - failed)?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The component (built first when `target` is a crate directory) with the file it is in, and
/// the case file with its parsed cases.
fn prepare(args: &TestArgs) -> Result<(Arc<LoadedComponent>, PathBuf, PathBuf, Vec<Case>)> {
    let limits = Limits {
        deadline: Duration::from_millis(args.deadline_ms),
        memory_bytes: args.memory_mib << 20,
        ..Limits::default()
    };
    let rt = Arc::new(PolicyRuntime::new(limits).context("starting the wasm runtime")?);
    let (component, shown, beside) = if args.target.is_dir() {
        let built = build::build(&args.target, None, &rt)?;
        eprintln_safe(&built.summary());
        (built.component, built.path, args.target.clone())
    } else {
        // The error's text already names its cause.
        let component = rt.load(&args.target).map_err(|e| anyhow!("{e}"))?;
        let dir = args
            .target
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        (component, args.target.clone(), dir)
    };
    let cases_path = match &args.cases {
        Some(path) => path.clone(),
        None => {
            let default = beside.join("cases.yaml");
            if !default.is_file() {
                bail!(
                    "no case file: {} does not exist; name one with --cases",
                    default.display()
                );
            }
            default
        }
    };
    let text = std::fs::read_to_string(&cases_path)
        .with_context(|| format!("cannot read case file {}", cases_path.display()))?;
    let cases = parse(&text, &cases_path)?;
    Ok((component, shown, cases_path, cases))
}

// ---- The case file ---------------------------------------------------------------------------

/// A case file as written.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `cases` (and optional `settings` and `request` for every case)"
)]
struct RawCaseFile {
    #[serde(default)]
    settings: Map<String, Value>,
    #[serde(default)]
    request: Map<String, Value>,
    cases: Vec<RawCase>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a case: a mapping with `name`, `expect` and optional `settings`, `request`, `snapshot`"
)]
struct RawCase {
    name: String,
    #[serde(default)]
    settings: Map<String, Value>,
    #[serde(default)]
    request: Map<String, Value>,
    #[serde(default)]
    snapshot: BTreeMap<String, RawValue>,
    expect: Expect,
}

/// One aggregate's value in a case's snapshot.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an aggregate value: a mapping like `{value: 0.5, samples: 3}` (value ~: no samples)"
)]
struct RawValue {
    value: Option<f64>,
    /// Default: 1 with a value, 0 without.
    #[serde(default)]
    samples: Option<u64>,
}

/// What a case expects.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "expectations: a mapping of decision, tier, reason, alert, facts, aggregates, error, configure_error"
)]
struct Expect {
    #[serde(default)]
    decision: Option<ExpectedDecision>,
    #[serde(default)]
    tier: Option<String>,
    /// Absent: not checked; `~`: no reason; text: a substring of the reason.
    #[serde(default, deserialize_with = "stated")]
    reason: Option<Option<String>>,
    /// Absent: not checked; `~`: no alert; text: a substring of the alert.
    #[serde(default, deserialize_with = "stated")]
    alert: Option<Option<String>>,
    #[serde(default)]
    facts: BTreeMap<String, f64>,
    #[serde(default, deserialize_with = "aggregates")]
    aggregates: Option<Vec<Aggregate>>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    configure_error: Option<String>,
}

impl Expect {
    /// The expectations about the verdict, by field name.
    fn verdict_fields(&self) -> Vec<&'static str> {
        let mut fields = Vec::new();
        if self.decision.is_some() {
            fields.push("decision");
        }
        if self.tier.is_some() {
            fields.push("tier");
        }
        if self.reason.is_some() {
            fields.push("reason");
        }
        if self.alert.is_some() {
            fields.push("alert");
        }
        if !self.facts.is_empty() {
            fields.push("facts");
        }
        fields
    }

    /// Whether the case evaluates a request (rather than only configuring the rule).
    fn evaluates(&self) -> bool {
        self.error.is_some() || !self.verdict_fields().is_empty()
    }
}

/// A present key, `~` included (absent keys are `None` through `#[serde(default)]`).
fn stated<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Aggregates as their JSON form reads them (`window: {rolling_seconds: 3600}`, the form the
/// diff shows), which YAML's enum tags (`!rolling_seconds 3600`) would not accept.
fn aggregates<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Aggregate>>, D::Error> {
    let Some(list) = Option::<Vec<Value>>::deserialize(d)? else {
        return Ok(None);
    };
    list.into_iter()
        .enumerate()
        .map(|(i, v)| {
            serde_path_to_error::deserialize(v).map_err(|e| {
                let path = e.path().to_string();
                let at = if path == "." {
                    format!("[{i}]")
                } else {
                    format!("[{i}].{path}")
                };
                serde::de::Error::custom(format!("{at}: {}", e.inner()))
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ExpectedDecision {
    Allow,
    Downgrade,
    Deny,
}

impl ExpectedDecision {
    fn of(decision: &Decision) -> Self {
        match decision {
            Decision::Allow => Self::Allow,
            Decision::Downgrade(_) => Self::Downgrade,
            Decision::Deny => Self::Deny,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Downgrade => "downgrade",
            Self::Deny => "deny",
        }
    }
}

/// A case ready to run.
#[derive(Debug)]
pub(super) struct Case {
    name: String,
    settings_json: String,
    request: RequestContext,
    snapshot: BTreeMap<String, AggregateValue>,
    expect: Expect,
}

/// Parse and check a case file; every error names the file, the case and the field path.
pub(super) fn parse(text: &str, path: &Path) -> Result<Vec<Case>> {
    let raw: RawCaseFile = llmscope_wire::yaml::from_str(text)
        .map_err(|p| anyhow!("{}", locate(path, text, &p.at, &p.message)))?;
    if raw.cases.is_empty() {
        bail!("{}: cases: no cases; add at least one", path.display());
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut cases = Vec::with_capacity(raw.cases.len());
    for (index, case) in raw.cases.into_iter().enumerate() {
        let fail = |field: &str, message: &str| {
            anyhow!(
                "{}: case {:?} (cases[{index}]), {field}: {message}",
                path.display(),
                case.name
            )
        };
        if case.name.trim().is_empty() {
            return Err(fail("name", "must not be empty"));
        }
        if let Some(first) = seen.insert(case.name.clone(), index) {
            return Err(fail(
                "name",
                &format!("already the name of cases[{first}]; names must be unique"),
            ));
        }
        check_expect(&case).map_err(|(field, message)| fail(&field, &message))?;
        let request = build_request(&raw.request, &case.request)
            .map_err(|(field, message)| fail(&field, &message))?;
        let snapshot = case
            .snapshot
            .iter()
            .map(|(key, v)| {
                let value = AggregateValue {
                    key: key.clone(),
                    value: v.value,
                    samples: v.samples.unwrap_or(u64::from(v.value.is_some())),
                };
                (key.clone(), value)
            })
            .collect();
        let mut settings = raw.settings.clone();
        for (key, value) in &case.settings {
            if value.is_null() {
                settings.remove(key);
            } else {
                settings.insert(key.clone(), value.clone());
            }
        }
        cases.push(Case {
            name: case.name,
            settings_json: Value::Object(settings).to_string(),
            request,
            snapshot,
            expect: case.expect,
        });
    }
    Ok(cases)
}

/// A serde problem at `at` (a path like `cases[2].expect`), named by its case when in one.
fn locate(path: &Path, text: &str, at: &str, message: &str) -> String {
    let case = at.strip_prefix("cases[").and_then(|rest| {
        let (index, rest) = rest.split_once(']')?;
        let index: usize = index.parse().ok()?;
        let field = rest.strip_prefix('.').unwrap_or(rest);
        let doc: serde_yaml::Value = serde_yaml::from_str(text).ok()?;
        let name = doc
            .get("cases")?
            .get(index)?
            .get("name")?
            .as_str()?
            .to_owned();
        Some((index, name, field.to_owned()))
    });
    match case {
        Some((index, name, field)) => format!(
            "{}: case {name:?} (cases[{index}]), {}: {message}",
            path.display(),
            if field.is_empty() {
                "(the case)"
            } else {
                &field
            }
        ),
        None => format!("{}: {at}: {message}", path.display()),
    }
}

/// Expectations that contradict each other, as `(field, message)`.
fn check_expect(case: &RawCase) -> Result<(), (String, String)> {
    let e = &case.expect;
    let field = |f: &str| format!("expect.{f}");
    for (name, text) in [
        ("reason", e.reason.as_ref().and_then(Option::as_deref)),
        ("alert", e.alert.as_ref().and_then(Option::as_deref)),
        ("error", e.error.as_deref()),
        ("configure_error", e.configure_error.as_deref()),
    ] {
        if text.is_some_and(|t| t.trim().is_empty()) {
            return Err((
                field(name),
                "an empty substring matches anything: give some of the text expected (or ~ \
                 for none, where allowed)"
                    .into(),
            ));
        }
    }
    if e.configure_error.is_some() {
        let mut others = e.verdict_fields();
        if e.error.is_some() {
            others.push("error");
        }
        if e.aggregates.is_some() {
            others.push("aggregates");
        }
        if let Some(other) = others.first() {
            return Err((
                field(other),
                "a case whose settings must be refused (configure_error) checks nothing else; \
                 move it to a case of its own"
                    .into(),
            ));
        }
        if !case.request.is_empty() || !case.snapshot.is_empty() {
            let which = if case.request.is_empty() {
                "snapshot"
            } else {
                "request"
            };
            return Err((
                which.into(),
                "unused: a case whose settings must be refused (configure_error) evaluates no request"
                    .into(),
            ));
        }
        return Ok(());
    }
    if e.error.is_some() {
        if let Some(other) = e.verdict_fields().first() {
            return Err((
                field(other),
                "a case whose evaluation must fail (error) has no verdict to check".into(),
            ));
        }
    }
    if e.tier.is_some() && e.decision != Some(ExpectedDecision::Downgrade) {
        return Err((
            field("tier"),
            "only with `decision: downgrade` (the tier downgraded to)".into(),
        ));
    }
    if !e.evaluates() && e.aggregates.is_none() {
        return Err((
            "expect".into(),
            "checks nothing: state a decision (allow | downgrade | deny), an error, a \
             configure_error or the aggregates"
                .into(),
        ));
    }
    if !e.evaluates() && !case.snapshot.is_empty() {
        return Err((
            "snapshot".into(),
            "unused: the case checks only what configure declares".into(),
        ));
    }
    Ok(())
}

/// The default request with the file's and then the case's fields over it, kept consistent
/// (see the module docs). The error is `(field path, message)`.
fn build_request(
    shared: &Map<String, Value>,
    own: &Map<String, Value>,
) -> Result<RequestContext, (String, String)> {
    let internal = |e: serde_json::Error| ("request".to_owned(), e.to_string());
    let Value::Object(mut request) =
        serde_json::to_value(llmscope_sdk::testing::request()).map_err(internal)?
    else {
        return Err((
            "request".into(),
            "the default request is not a mapping".into(),
        ));
    };
    let stated = |key: &str| shared.contains_key(key) || own.contains_key(key);
    for (key, value) in shared.iter().chain(own) {
        request.insert(key.clone(), value.clone());
    }
    let requested = request
        .get("requested_tier")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let tiers_stated = stated("tiers");
    let cost_stated = stated("estimated_cost_usd");
    let stated_cost = request.get("estimated_cost_usd").cloned();
    let mut followed = None;
    if let (Some(tier), Some(Value::Array(tiers))) = (requested, request.get_mut("tiers")) {
        let entry = tiers
            .iter_mut()
            .filter_map(Value::as_object_mut)
            .find(|t| t.get("tier").and_then(Value::as_str) == Some(tier.as_str()));
        if let Some(entry) = entry {
            if cost_stated && !tiers_stated {
                if let Some(cost) = stated_cost {
                    entry.insert("estimated_cost_usd".into(), cost);
                }
            }
            followed = Some((
                entry.get("model").cloned(),
                entry.get("estimated_cost_usd").cloned(),
            ));
        }
    }
    if let Some((model, cost)) = followed {
        if let (false, Some(model)) = (stated("model"), model) {
            request.insert("model".into(), model);
        }
        if let (false, Some(cost)) = (cost_stated, cost) {
            request.insert("estimated_cost_usd".into(), cost);
        }
    }
    serde_path_to_error::deserialize(Value::Object(request)).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() {
            "request".to_owned()
        } else {
            format!("request.{path}")
        };
        (field, e.inner().to_string())
    })
}

// ---- Running and comparing ---------------------------------------------------------------------

/// One field that differs from what the case expects.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mismatch {
    field: String,
    expected: String,
    got: String,
}

impl Mismatch {
    fn new(field: impl Into<String>, expected: impl Into<String>, got: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }
}

/// What running a case gave.
#[derive(Debug, Default)]
struct CaseResult {
    mismatches: Vec<Mismatch>,
    /// The verdict (or error) got, for context under a failure.
    got: Option<String>,
}

fn run_case(component: &LoadedComponent, case: &Case) -> CaseResult {
    let expect = &case.expect;
    let aggregates = match (
        component.configure(&case.settings_json),
        &expect.configure_error,
    ) {
        (Err(e), Some(want)) => {
            let got = refusal(&e);
            let mismatches = if got.contains(want.as_str()) {
                Vec::new()
            } else {
                vec![Mismatch::new(
                    "configure_error",
                    format!("contains {want:?}"),
                    format!("{got:?}"),
                )]
            };
            return CaseResult {
                mismatches,
                got: None,
            };
        }
        (Ok(aggregates), Some(want)) => {
            return CaseResult {
                mismatches: vec![Mismatch::new(
                    "configure_error",
                    format!("settings refused with an error containing {want:?}"),
                    format!(
                        "settings accepted ({} aggregate(s) declared)",
                        aggregates.len()
                    ),
                )],
                got: None,
            };
        }
        (Err(e), None) => {
            return CaseResult {
                mismatches: vec![Mismatch::new(
                    "configure",
                    "settings accepted",
                    format!("refused: {}", refusal(&e)),
                )],
                got: None,
            };
        }
        (Ok(aggregates), None) => aggregates,
    };
    let mut result = CaseResult::default();
    if let Some(want) = &expect.aggregates {
        result
            .mismatches
            .extend(compare_aggregates(want, &aggregates));
    }
    if !expect.evaluates() {
        return result;
    }
    let snapshot = match snapshot_for(&aggregates, &case.snapshot, case.request.unix_time_ms) {
        Ok(snapshot) => snapshot,
        Err(mismatch) => {
            result.mismatches.push(mismatch);
            return result;
        }
    };
    match (
        component.evaluate_once(&case.settings_json, &case.request, &snapshot),
        &expect.error,
    ) {
        (Err(e), Some(want)) => {
            if !e.contains(want.as_str()) {
                result.mismatches.push(Mismatch::new(
                    "error",
                    format!("contains {want:?}"),
                    format!("{e:?}"),
                ));
            }
        }
        (Ok(verdict), Some(want)) => {
            result.mismatches.push(Mismatch::new(
                "error",
                format!("evaluation fails with an error containing {want:?}"),
                format!("a verdict: {}", describe(&verdict)),
            ));
        }
        (Err(e), None) => {
            result.mismatches.push(Mismatch::new(
                "evaluate",
                "a verdict",
                format!("error: {e}"),
            ));
        }
        (Ok(verdict), None) => {
            result.mismatches.extend(compare(expect, &verdict));
            result.got = Some(describe(&verdict));
        }
    }
    result
}

/// A configure failure as `policy check` words it: the policy's own message, or what failed.
fn refusal(e: &CallError) -> String {
    match e {
        CallError::Policy(message) => message.clone(),
        other => format!("configure failed: {other}"),
    }
}

/// The snapshot the gateway would hand the rule: one value per declared aggregate, the case's
/// where it gives one, an empty window's otherwise. A value for an undeclared key is a mistake.
fn snapshot_for(
    declared: &[Aggregate],
    given: &BTreeMap<String, AggregateValue>,
    taken_at_unix_ms: u64,
) -> Result<Snapshot, Mismatch> {
    if let Some(key) = given
        .keys()
        .find(|k| !declared.iter().any(|a| a.key == **k))
    {
        let keys: Vec<&str> = declared.iter().map(|a| a.key.as_str()).collect();
        return Err(Mismatch::new(
            format!("snapshot.{key}"),
            format!(
                "a key the rule declares ({})",
                if keys.is_empty() {
                    "it declares none".to_owned()
                } else {
                    keys.join(", ")
                }
            ),
            "a key it does not declare",
        ));
    }
    let values = declared
        .iter()
        .map(|a| {
            given.get(&a.key).cloned().unwrap_or_else(|| {
                let summable = matches!(a.aggregation, Aggregation::Sum | Aggregation::Count)
                    && a.metric != Metric::LatencyMs;
                AggregateValue {
                    key: a.key.clone(),
                    value: summable.then_some(0.0),
                    samples: 0,
                }
            })
        })
        .collect();
    Ok(Snapshot {
        taken_at_unix_ms,
        values,
    })
}

/// The verdict's fields against the expectations.
fn compare(expect: &Expect, got: &Verdict) -> Vec<Mismatch> {
    let mut out = Vec::new();
    let decision = ExpectedDecision::of(&got.decision);
    let decision_ok = expect.decision.is_none_or(|want| want == decision);
    if let Some(want) = expect.decision.filter(|_| !decision_ok) {
        out.push(Mismatch::new("decision", want.name(), decision_name(got)));
    }
    if let (Some(want), true) = (&expect.tier, decision_ok) {
        if let Decision::Downgrade(tier) = &got.decision {
            if tier != want {
                out.push(Mismatch::new("tier", want, tier));
            }
        }
    }
    for (field, want, text) in [
        ("reason", &expect.reason, &got.reason),
        ("alert", &expect.alert, &got.alert),
    ] {
        match (want, text) {
            (None, _) | (Some(None), None) => {}
            (Some(Some(want)), Some(text)) if text.contains(want.as_str()) => {}
            (Some(Some(want)), text) => out.push(Mismatch::new(
                field,
                format!("contains {want:?}"),
                quoted(text.as_deref()),
            )),
            (Some(None), text) => {
                out.push(Mismatch::new(field, "(none)", quoted(text.as_deref())));
            }
        }
    }
    for (name, want) in &expect.facts {
        match got.fact(name) {
            Some(v) if close(v, *want) => {}
            Some(v) => out.push(Mismatch::new(
                format!("facts.{name}"),
                want.to_string(),
                v.to_string(),
            )),
            None => out.push(Mismatch::new(
                format!("facts.{name}"),
                want.to_string(),
                format!("(absent; the verdict's facts: {})", fact_names(got)),
            )),
        }
    }
    out
}

/// Declared aggregates against the expected ones, position by position.
fn compare_aggregates(want: &[Aggregate], got: &[Aggregate]) -> Vec<Mismatch> {
    let show = |a: Option<&Aggregate>| {
        a.map_or_else(
            || "(none)".to_owned(),
            |a| serde_json::to_string(a).unwrap_or_else(|e| e.to_string()),
        )
    };
    (0..want.len().max(got.len()))
        .filter(|i| want.get(*i) != got.get(*i))
        .map(|i| {
            Mismatch::new(
                format!("aggregates[{i}]"),
                show(want.get(i)),
                show(got.get(i)),
            )
        })
        .collect()
}

/// Equal up to float noise.
fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn decision_name(v: &Verdict) -> String {
    match &v.decision {
        Decision::Downgrade(tier) => format!("downgrade (to `{tier}`)"),
        other => ExpectedDecision::of(other).name().to_owned(),
    }
}

fn quoted(text: Option<&str>) -> String {
    text.map_or_else(|| "(none)".to_owned(), |t| format!("{t:?}"))
}

fn fact_names(v: &Verdict) -> String {
    if v.facts.is_empty() {
        return "none".to_owned();
    }
    v.facts
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A verdict on one line: decision, reason, alert, facts.
fn describe(v: &Verdict) -> String {
    let facts = v
        .facts
        .iter()
        .map(|(n, x)| format!("{n}={x}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{}, reason {}, alert {}, facts {{{facts}}}",
        decision_name(v),
        quoted(v.reason.as_deref()),
        quoted(v.alert.as_deref())
    )
}

/// A case's lines: `ok  name`, or `FAILED  name` and, per field, what was expected and got.
fn render(name: &str, result: &CaseResult) -> String {
    if result.mismatches.is_empty() {
        return format!("ok      {name}\n");
    }
    let mut out = format!("FAILED  {name}\n");
    for m in &result.mismatches {
        out.push_str(&format!(
            "        {}\n          expected: {}\n          got:      {}\n",
            m.field, m.expected, m.got
        ));
    }
    if let Some(got) = &result.got {
        out.push_str(&format!("        verdict: {got}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Vec<Case> {
        parse(text, Path::new("cases.yaml")).unwrap()
    }

    fn parse_err(text: &str) -> String {
        parse(text, Path::new("cases.yaml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn cases_merge_the_shared_settings_and_request() {
        let cases = parse_ok(
            "settings: {max_usd: 0.01, deny_reason: x}\nrequest: {tenant_id: globex}\ncases:\n  \
             - name: a\n    settings: {deny_reason: ~, extra: 1}\n    request: {caller_id: svc}\n    \
             snapshot: {spent: {value: 0.5}, empty: {value: ~}}\n    expect: {decision: allow}\n",
        );
        let case = &cases[0];
        assert_eq!(case.settings_json, r#"{"max_usd":0.01,"extra":1}"#);
        assert_eq!(case.request.tenant_id, "globex");
        assert_eq!(case.request.caller_id.as_deref(), Some("svc"));
        assert_eq!(case.request.budget_namespace, "demo");
        assert_eq!(
            (case.snapshot["spent"].value, case.snapshot["spent"].samples),
            (Some(0.5), 1)
        );
        assert_eq!(
            (case.snapshot["empty"].value, case.snapshot["empty"].samples),
            (None, 0)
        );
    }

    #[test]
    fn the_request_stays_consistent_with_its_tier() {
        let cases = parse_ok(
            "cases:\n  - {name: cheap, request: {requested_tier: cheap}, expect: {decision: allow}}\n  \
             - {name: priced, request: {estimated_cost_usd: 0.5}, expect: {decision: deny}}\n",
        );
        let cheap = &cases[0].request;
        assert_eq!(cheap.model, "gpt-4o-mini");
        assert_eq!(
            Some(cheap.estimated_cost_usd),
            cheap.tier("cheap").map(|t| t.estimated_cost_usd)
        );
        let priced = &cases[1].request;
        assert_eq!(priced.estimated_cost_usd, 0.5);
        assert_eq!(
            priced.tier("expensive").map(|t| t.estimated_cost_usd),
            Some(0.5)
        );
        assert_eq!(priced.model, "gpt-4o");
    }

    #[test]
    fn errors_name_the_file_the_case_and_the_field() {
        let err = parse_err(
            "cases:\n  - {name: fine, expect: {decision: allow}}\n  - name: typo\n    expect: {decison: deny}\n",
        );
        assert!(
            err.starts_with("cases.yaml: case \"typo\" (cases[1]), expect"),
            "{err}"
        );
        assert!(err.contains("unknown field `decison`"), "{err}");

        let err = parse_err("cases:\n  - {name: r, request: {estimated_cost_usd: cheap}, expect: {decision: allow}}\n");
        assert!(
            err.starts_with(
                "cases.yaml: case \"r\" (cases[0]), request.estimated_cost_usd: invalid type"
            ),
            "{err}"
        );
        let err =
            parse_err("cases:\n  - {name: r, request: {tenant: x}, expect: {decision: allow}}\n");
        assert!(
            err.contains("request.tenant: unknown field `tenant`"),
            "{err}"
        );

        let err = parse_err("cases: []\n");
        assert_eq!(err, "cases.yaml: cases: no cases; add at least one");
        let err = parse_err("case: []\n");
        assert!(err.starts_with("cases.yaml: "), "{err}");
        assert!(err.contains("unknown field `case`"), "{err}");
    }

    #[test]
    fn contradictory_or_empty_expectations_are_refused() {
        let one = |expect: &str| parse_err(&format!("cases:\n  - {{name: c, expect: {expect}}}\n"));
        assert!(one("{}").contains("expect: checks nothing"));
        assert!(one("{configure_error: x, decision: deny}")
            .contains("expect.decision: a case whose settings must be refused"));
        assert!(one("{error: x, reason: y}")
            .contains("expect.reason: a case whose evaluation must fail"));
        assert!(one("{decision: deny, tier: cheap}")
            .contains("expect.tier: only with `decision: downgrade`"));
        assert!(one("{decision: maybe}").contains("unknown variant `maybe`"));
        let dup = parse_err("cases:\n  - {name: c, expect: {decision: allow}}\n  - {name: c, expect: {decision: deny}}\n");
        assert!(
            dup.contains("case \"c\" (cases[1]), name: already the name of cases[0]"),
            "{dup}"
        );
        let unused = parse_err(
            "cases:\n  - {name: c, request: {tenant_id: x}, expect: {configure_error: x}}\n",
        );
        assert!(unused.contains("request: unused"), "{unused}");
    }

    fn verdict(decision: Decision, reason: Option<&str>, alert: Option<&str>) -> Verdict {
        Verdict {
            decision,
            reason: reason.map(str::to_owned),
            alert: alert.map(str::to_owned),
            facts: vec![("max_usd".into(), 0.01)],
        }
    }

    #[test]
    fn compare_checks_substrings_absence_tiers_and_facts() {
        let expect = |yaml: &str| -> Expect { serde_yaml::from_str(yaml).unwrap() };
        let deny = verdict(Decision::Deny, Some("over the cap of $0.01"), None);
        assert!(compare(&expect("{decision: deny, reason: cap, alert: ~}"), &deny).is_empty());
        assert_eq!(
            compare(
                &expect("{decision: allow, reason: budget, facts: {max_usd: 0.02, x: 1}}"),
                &deny
            ),
            vec![
                Mismatch::new("decision", "allow", "deny"),
                Mismatch::new("reason", "contains \"budget\"", "\"over the cap of $0.01\""),
                Mismatch::new("facts.max_usd", "0.02", "0.01"),
                Mismatch::new("facts.x", "1", "(absent; the verdict's facts: max_usd)"),
            ]
        );
        let down = verdict(Decision::Downgrade("mid".into()), None, Some("alerted"));
        assert_eq!(
            compare(
                &expect("{decision: downgrade, tier: cheap, reason: x, alert: ~}"),
                &down
            ),
            vec![
                Mismatch::new("tier", "cheap", "mid"),
                Mismatch::new("reason", "contains \"x\"", "(none)"),
                Mismatch::new("alert", "(none)", "\"alerted\""),
            ]
        );
        // A wrong decision is one mismatch, not a second one about the tier.
        assert_eq!(
            compare(&expect("{decision: downgrade, tier: cheap}"), &deny),
            vec![Mismatch::new("decision", "downgrade", "deny")]
        );
        assert!(close(0.1 + 0.2, 0.3));
    }

    #[test]
    fn aggregates_compare_position_by_position() {
        let agg = |key: &str| Aggregate {
            key: key.into(),
            metric: Metric::CostUsd,
            aggregation: Aggregation::Sum,
            window: llmscope_sdk::types::Window::RollingSeconds(3600),
            scope: vec![],
            include_in_flight: true,
        };
        assert!(compare_aggregates(&[agg("a")], &[agg("a")]).is_empty());
        let diff = compare_aggregates(&[agg("a")], &[agg("b"), agg("c")]);
        assert_eq!(diff.len(), 2);
        assert_eq!(diff[0].field, "aggregates[0]");
        assert!(diff[0].expected.contains(r#""key":"a""#), "{diff:?}");
        assert!(
            diff[0]
                .expected
                .contains(r#""window":{"rolling_seconds":3600}"#),
            "{diff:?}"
        );
        assert_eq!(diff[1].expected, "(none)");
        // The YAML form of an aggregate in a case file.
        let expect: Expect = serde_yaml::from_str(
            "aggregates: [{key: a, metric: cost_usd, aggregation: sum, window: {rolling_seconds: 3600}, scope: [], include_in_flight: true}]",
        )
        .unwrap();
        assert_eq!(expect.aggregates.unwrap(), [agg("a")]);
        let err = parse_err(
            "cases:\n  - name: a\n    expect: {aggregates: [{key: a, metric: cost_usd, aggregation: sum, window: weekly, scope: [], include_in_flight: true}]}\n",
        );
        assert!(
            err.contains(
                "case \"a\" (cases[0]), expect.aggregates: [0].window: unknown variant `weekly`"
            ),
            "{err}"
        );
    }

    #[test]
    fn undeclared_snapshot_keys_are_a_mistake_and_missing_ones_an_empty_window() {
        let declared = [Aggregate {
            key: "spent".into(),
            metric: Metric::CostUsd,
            aggregation: Aggregation::Sum,
            window: llmscope_sdk::types::Window::CalendarDay,
            scope: vec![],
            include_in_flight: false,
        }];
        let snap = snapshot_for(&declared, &BTreeMap::new(), 7).unwrap();
        assert_eq!(snap.values[0].value, Some(0.0));
        assert_eq!(snap.values[0].samples, 0);
        let typo = BTreeMap::from([(
            "spend".to_owned(),
            AggregateValue {
                key: "spend".into(),
                value: Some(1.0),
                samples: 1,
            },
        )]);
        let err = snapshot_for(&declared, &typo, 7).unwrap_err();
        assert_eq!(err.field, "snapshot.spend");
        assert_eq!(err.expected, "a key the rule declares (spent)");
    }

    #[test]
    fn a_failure_renders_expected_and_got_per_field() {
        let result = CaseResult {
            mismatches: vec![
                Mismatch::new("decision", "deny", "allow"),
                Mismatch::new("reason", "contains \"cap\"", "(none)"),
            ],
            got: Some(describe(&verdict(Decision::Allow, None, None))),
        };
        assert_eq!(
            render("denies above the cap", &result),
            "FAILED  denies above the cap\n\
             \x20       decision\n\
             \x20         expected: deny\n\
             \x20         got:      allow\n\
             \x20       reason\n\
             \x20         expected: contains \"cap\"\n\
             \x20         got:      (none)\n\
             \x20       verdict: allow, reason (none), alert (none), facts {max_usd=0.01}\n"
        );
        assert_eq!(render("fine", &CaseResult::default()), "ok      fine\n");
    }
}
