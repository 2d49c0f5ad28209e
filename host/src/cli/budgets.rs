//! `llmscope budgets`: the budget status of a running gateway (`GET /v1/budgets`), as a table
//! or JSON. The in-flight spend lives in the gateway's memory, so the answer comes from it,
//! not from the logs.

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::Value;

#[derive(Debug, Args)]
pub(super) struct BudgetsArgs {
    /// The gateway's base URL.
    #[arg(long, env = "LLMSCOPE_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Environment variable holding the API key to present (a `*` key sees every budget, a
    /// tenant key its own tenants'); none when the gateway has auth off.
    #[arg(long)]
    api_key_env: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

/// Fetch and print the budgets.
pub(super) fn run(args: &BudgetsArgs) -> Result<std::process::ExitCode> {
    let key = match &args.api_key_env {
        Some(var) => Some(
            std::env::var(var)
                .with_context(|| format!("--api-key-env {var}: the variable is not set"))?,
        ),
        None => None,
    };
    let url = format!("{}/v1/budgets", args.url.trim_end_matches('/'));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, body) = runtime.block_on(async {
        let mut req = reqwest::Client::new().get(&url);
        if let Some(k) = &key {
            req = req.bearer_auth(k);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach {url}; is the gateway running there?"))?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .with_context(|| format!("{url} answered {status} with a body that is not JSON"))?;
        anyhow::Ok((status, body))
    })?;
    if !status.is_success() {
        bail!("{url} answered {status}: {body}");
    }
    let text = match args.format {
        Format::Json => format!("{}\n", serde_json::to_string_pretty(&body)?),
        Format::Table => table(&body),
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// One line per budget row: rule, scope, spent + in flight of the limit, percent, reset.
fn table(body: &Value) -> String {
    let rows = body["budgets"].as_array().cloned().unwrap_or_default();
    let mut lines = vec![[
        "rule".to_owned(),
        "scope".to_owned(),
        "spent_usd".to_owned(),
        "in_flight_usd".to_owned(),
        "limit_usd".to_owned(),
        "used".to_owned(),
        "resets_at".to_owned(),
        "exhausted_at".to_owned(),
    ]];
    for r in &rows {
        let scope = r["scope"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("-")))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let money = |k: &str| format!("{:.6}", r[k].as_f64().unwrap_or(0.0));
        let when = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
        lines.push([
            format!(
                "{}/{}",
                r["namespace"].as_str().unwrap_or(""),
                r["rule_id"].as_str().unwrap_or("")
            ),
            scope,
            money("spent_usd"),
            money("in_flight_usd"),
            money("limit_usd"),
            format!("{:.1}%", r["percent_used"].as_f64().unwrap_or(0.0)),
            when("resets_at"),
            when("exhausted_at"),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|i| lines.iter().map(|l| l[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no budget has spend in its window)\n");
    }
    out
}
