//! `cargo xtask bench-replay --rows N`: `llmscope policy replay` of N synthetic logged requests
//! (`gen.rs`, with provenance) with the seed's three rules (`examples/policy.yaml`), timed end
//! to end: reading the logs, the as-of aggregates in DuckDB, re-evaluating every request.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// Goal for 1M requests, seconds.
pub(crate) const GOAL_S: f64 = 60.0;

/// What one replay took.
pub(crate) struct ReplayResult {
    /// Requests replayed.
    pub replayed: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Generate `rows` requests and replay them with `bin`.
pub(crate) fn run(root: &Path, bin: &Path, rows: u64) -> Result<ReplayResult> {
    let dir = std::env::temp_dir().join(format!("llmscope-bench-replay-{}", std::process::id()));
    crate::gen::generate(&dir, rows)?;
    let started = Instant::now();
    let out = Command::new(bin)
        .current_dir(root)
        .env("LLMSCOPE_LOG", "error")
        .args(["policy", "replay", "--config"])
        .arg(root.join("examples/policy.yaml"))
        .arg("--logs")
        .arg(&dir)
        .arg("--policies")
        .arg(root.join("policies"))
        .output()
        .context("running llmscope policy replay")?;
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!(
            "policy replay failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The table's first line: "replayed N of M decision lines ...".
    let text = String::from_utf8_lossy(&out.stdout);
    let replayed = text
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .context("policy replay printed no summary line")?;
    Ok(ReplayResult { replayed, seconds })
}
