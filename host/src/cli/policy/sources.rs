//! Where `policy explain` and `policy replay` find their inputs: the logs, the policies
//! directory and (for explain) the policy file, from flags, else from a gateway configuration,
//! else the defaults the example gateway configuration gives.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::policy::{Limits, PolicyRuntime, PolicySet};

/// The policy file when neither `--config` nor a gateway configuration names one (the one
/// `examples/llmscope.yaml` names).
pub(super) const DEFAULT_POLICY_FILE: &str = "examples/policy.yaml";
/// The policies directory by default (as `policy list`).
const DEFAULT_POLICIES_DIR: &str = "policies";
/// The logs directory by default (as `llmscope query`).
const DEFAULT_LOGS_DIR: &str = "artifacts/logs";
/// Deadline of one policy call when re-running: offline, so generous (a rule that timed out
/// in the gateway is reported as such from its logged error).
const RERUN_DEADLINE: Duration = Duration::from_secs(1);

/// The inputs shared by `explain` and `replay`.
#[derive(Debug, Args)]
pub(crate) struct Sources {
    /// Gateway configuration (as `llmscope serve --config` reads it) to take the policy file,
    /// the policies directory and the log paths from; the flags below override it.
    #[arg(long, env = "LLMSCOPE_CONFIG")]
    gateway_config: Option<PathBuf>,
    /// Directory holding `policy_decisions.jsonl` and `telemetry.jsonl` [default: the gateway
    /// configuration's log paths, else artifacts/logs].
    #[arg(long)]
    logs: Option<PathBuf>,
    /// Directory of `<primitive>.wasm` components [default: the gateway configuration's
    /// `policy.policies_dir`, else policies].
    #[arg(long, visible_alias = "policies-dir")]
    policies: Option<PathBuf>,
}

/// The inputs, resolved.
#[derive(Debug)]
pub(crate) struct Resolved {
    /// The gateway configuration's policy file, when one was read.
    pub(crate) gateway_policy_file: Option<PathBuf>,
    /// Components.
    pub(crate) policies_dir: PathBuf,
    /// The decisions log.
    pub(crate) decisions: PathBuf,
    /// The telemetry log.
    #[allow(
        dead_code,
        reason = "read by `policy replay`, the next command built on these sources"
    )]
    pub(crate) telemetry: PathBuf,
    /// Bounds of one policy call.
    pub(crate) limits: Limits,
}

impl Sources {
    /// Resolve flags over the gateway configuration over the defaults.
    pub(crate) fn resolve(&self) -> Result<Resolved> {
        let env = |name: &str| std::env::var(name).ok();
        let gateway = self
            .gateway_config
            .as_deref()
            .map(|path| crate::config::GatewayConfig::load(path, &env))
            .transpose()?;
        let (decisions, telemetry) = match (&self.logs, &gateway) {
            (Some(dir), _) => (
                dir.join("policy_decisions.jsonl"),
                dir.join("telemetry.jsonl"),
            ),
            (None, Some(g)) => (g.decisions_path.clone(), g.telemetry_path.clone()),
            (None, None) => (
                Path::new(DEFAULT_LOGS_DIR).join("policy_decisions.jsonl"),
                Path::new(DEFAULT_LOGS_DIR).join("telemetry.jsonl"),
            ),
        };
        let policies_dir = self
            .policies
            .clone()
            .or_else(|| gateway.as_ref().map(|g| g.policies_dir.clone()))
            .unwrap_or_else(|| DEFAULT_POLICIES_DIR.into());
        let limits = Limits {
            deadline: RERUN_DEADLINE,
            ..gateway
                .as_ref()
                .map(|g| g.limits.clone())
                .unwrap_or_default()
        };
        Ok(Resolved {
            gateway_policy_file: gateway.map(|g| g.policy_file),
            policies_dir,
            decisions,
            telemetry,
            limits,
        })
    }
}

impl Resolved {
    /// Load the policy file `path` against the resolved components.
    pub(crate) fn load(&self, path: &Path) -> Result<(Arc<PolicyRuntime>, PolicySet)> {
        let runtime =
            Arc::new(PolicyRuntime::new(self.limits.clone()).context("starting the wasm runtime")?);
        let set = PolicySet::load(path, &self.policies_dir, &runtime)?;
        Ok((runtime, set))
    }

    /// The decisions log and its rotated predecessors that exist (`<log>.1`, `.2`, …; the
    /// first missing number ends the list), newest first.
    pub(crate) fn decision_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.decisions.clone()];
        for n in 1.. {
            let mut name = self.decisions.clone().into_os_string();
            name.push(format!(".{n}"));
            let path = PathBuf::from(name);
            if !path.is_file() {
                break;
            }
            files.push(path);
        }
        files
    }
}
