//! The policy YAML: raw serde structures (unknown keys rejected) turned into a validated
//! [`PolicySet`]. Every problem is collected before failing, and each names the file, the field
//! path, the namespace and the rule id.
//!
//! The format is the reference system's `policy.yaml`, unchanged, plus two optional per-rule keys:
//!
//! ```yaml
//! version: "0.1.0"
//! namespaces:
//!   demo:
//!     rules:
//!       - id: "demo-hourly-cap"        # unique across the file
//!         primitive: budget_threshold  # loads <policies-dir>/budget_threshold.wasm
//!         mode: enforce                # enforce (default) | monitor: record, never act
//!         failure_mode: closed         # closed (default): a failing rule denies | open: allows
//!         period: hourly               # every other key is the primitive's settings
//!         limit_usd: 1.00
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::component::{CallError, InstancePool, LoadedComponent, PolicyRuntime};
use super::policies_dir::load_primitive;
use super::{Namespace, PolicySet, Rule};

/// Rule modes and failure modes: the SDK's, so the host and the Envoy filters read rules alike.
pub use llmscope_sdk::verdict::{FailureMode, Mode};

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `version` and `namespaces`"
)]
struct RawPolicyFile {
    version: String,
    namespaces: BTreeMap<String, RawNamespace>,
    /// Optional pins: `components: {budget_threshold: {sha256: "..."}}`.
    #[serde(default)]
    components: BTreeMap<String, RawPin>,
}

/// A component pinned to its digest.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with `sha256`")]
struct RawPin {
    sha256: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with `rules`")]
struct RawNamespace {
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(expecting = "a rule: a mapping with `id`, `primitive` and the primitive's settings")]
struct RawRule {
    id: String,
    primitive: String,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    failure_mode: FailureMode,
    #[serde(flatten)]
    settings: serde_json::Map<String, serde_json::Value>,
}

pub use llmscope_wire::Problem;

/// A policy configuration that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read policy config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file was read but is invalid; every problem found is listed.
    #[error("{}", render_problems(path, problems))]
    Invalid {
        /// File.
        path: PathBuf,
        /// All problems found.
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The problems (empty for [`ConfigError::Read`]).
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid { problems, .. } => problems,
        }
    }
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = format!(
        "policy config {} is invalid ({} problem{}):",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str(&format!("\n  - {}: {}", p.at, p.message));
    }
    out
}

/// Primitive names map to file names, so they are restricted to a safe alphabet.
pub(crate) fn valid_primitive(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl PolicySet {
    /// Load and validate the policy file at `path`, resolving primitives to components in
    /// `policies_dir`. Every rule is configured once in its component; any problem anywhere
    /// fails the whole load.
    pub fn load(
        path: &Path,
        policies_dir: &Path,
        runtime: &Arc<PolicyRuntime>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_yaml(&text, path, policies_dir, runtime)
    }

    /// Like [`load`](Self::load), from YAML text; `path` is used in messages.
    pub fn from_yaml(
        text: &str,
        path: &Path,
        policies_dir: &Path,
        runtime: &Arc<PolicyRuntime>,
    ) -> Result<Self, ConfigError> {
        let invalid = |problems| ConfigError::Invalid {
            path: path.into(),
            problems,
        };
        let raw: RawPolicyFile =
            llmscope_wire::yaml::from_str(text).map_err(|problem| invalid(vec![problem]))?;
        let mut loader = Loader {
            pins: &raw.components,
            policies_dir,
            runtime,
            components: BTreeMap::new(),
            component_errors: BTreeMap::new(),
            seen_ids: BTreeMap::new(),
            problems: file_problems(&raw),
        };
        let mut namespaces = BTreeMap::new();
        for (ns_name, raw_ns) in raw.namespaces {
            if ns_name.trim().is_empty() {
                loader.problems.push(Problem {
                    at: "namespaces".into(),
                    message: "a namespace name is empty".into(),
                });
            }
            let rules = raw_ns
                .rules
                .into_iter()
                .enumerate()
                .filter_map(|(index, raw_rule)| loader.rule(&ns_name, index, raw_rule))
                .collect();
            namespaces.insert(
                ns_name.clone(),
                Namespace {
                    name: ns_name,
                    rules,
                },
            );
        }
        let Loader {
            components,
            problems,
            ..
        } = loader;
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        Ok(PolicySet {
            source: path.into(),
            version: raw.version,
            namespaces,
            components,
        })
    }
}

/// Problems of the file as a whole: its version, its namespaces, its component pins.
fn file_problems(raw: &RawPolicyFile) -> Vec<Problem> {
    let mut problems = Vec::new();
    if raw.version.trim().is_empty() {
        problems.push(Problem {
            at: "version".into(),
            message: "must not be empty, e.g. \"0.1.0\"".into(),
        });
    }
    if raw.namespaces.is_empty() {
        problems.push(Problem {
            at: "namespaces".into(),
            message: "no namespaces defined; add at least `default:` with its rules".into(),
        });
    }
    for (primitive, pin) in &raw.components {
        let digest = pin.sha256.trim();
        if !valid_primitive(primitive) {
            problems.push(Problem {
                at: format!("components.{primitive}"),
                message: "not a valid primitive name (lowercase letters, digits and `_`)".into(),
            });
        } else if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            problems.push(Problem {
                at: format!("components.{primitive}.sha256"),
                message: "must be 64 hex digits (`sha256sum policies/<primitive>.wasm`, or the sha256 column of `llmscope policy list`)".into(),
            });
        }
    }
    problems
}

/// The rules of a file being loaded: each primitive's component loaded once (or its error
/// remembered), rule ids checked unique across the file, every problem collected.
struct Loader<'a> {
    pins: &'a BTreeMap<String, RawPin>,
    policies_dir: &'a Path,
    runtime: &'a Arc<PolicyRuntime>,
    components: BTreeMap<String, Arc<LoadedComponent>>,
    component_errors: BTreeMap<String, String>,
    seen_ids: BTreeMap<String, String>,
    problems: Vec<Problem>,
}

impl Loader<'_> {
    /// Rule `index` of namespace `ns_name`, configured in its component; `None` (and its one
    /// problem recorded) when it cannot be.
    fn rule(&mut self, ns_name: &str, index: usize, raw_rule: RawRule) -> Option<Rule> {
        let at = format!("namespaces.{ns_name}.rules[{index}] (id {:?})", raw_rule.id);
        match self.checked_rule(ns_name, index, raw_rule) {
            Ok(rule) => Some(rule),
            Err(message) => {
                self.problems.push(Problem { at, message });
                None
            }
        }
    }

    fn checked_rule(
        &mut self,
        ns_name: &str,
        index: usize,
        raw_rule: RawRule,
    ) -> Result<Rule, String> {
        if raw_rule.id.trim().is_empty() {
            return Err("id: must not be empty".into());
        }
        if let Some(first) = self.seen_ids.get(&raw_rule.id) {
            return Err(format!("id: duplicate rule id, already used at {first}; rule ids must be unique across the file"));
        }
        self.seen_ids.insert(
            raw_rule.id.clone(),
            format!("namespaces.{ns_name}.rules[{index}]"),
        );
        if !valid_primitive(&raw_rule.primitive) {
            return Err(format!(
                "primitive: {:?} is not a valid primitive name (lowercase letters, digits and `_`, e.g. budget_threshold)",
                raw_rule.primitive
            ));
        }
        let component = self.component(&raw_rule.primitive)?;
        let settings_json = serde_json::Value::Object(raw_rule.settings).to_string();
        match component.configure(&settings_json) {
            Ok(aggregates) => Ok(Rule {
                id: raw_rule.id,
                primitive: raw_rule.primitive,
                mode: raw_rule.mode,
                failure_mode: raw_rule.failure_mode,
                settings_sha256: super::settings_sha256(&settings_json),
                settings_json,
                aggregates,
                component,
                pool: InstancePool::default(),
            }),
            Err(CallError::Policy(message)) => Err(format!(
                "invalid settings for {}: {message}",
                raw_rule.primitive
            )),
            Err(err) => Err(format!(
                "invalid settings for {}: configure failed: {err}",
                raw_rule.primitive
            )),
        }
    }

    /// `primitive`'s component, loaded (against its pin, if any) the first time it is named.
    fn component(&mut self, primitive: &str) -> Result<Arc<LoadedComponent>, String> {
        if let Some(c) = self.components.get(primitive) {
            return Ok(Arc::clone(c));
        }
        if let Some(err) = self.component_errors.get(primitive) {
            return Err(err.clone());
        }
        let pin = self
            .pins
            .get(primitive)
            .map(|p| p.sha256.trim().to_ascii_lowercase());
        match load_primitive(primitive, self.policies_dir, self.runtime, pin.as_deref()) {
            Ok(c) => {
                self.components.insert(primitive.to_owned(), Arc::clone(&c));
                Ok(c)
            }
            Err(err) => {
                self.component_errors
                    .insert(primitive.to_owned(), err.clone());
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitive_names_are_a_safe_alphabet() {
        assert!(valid_primitive("budget_threshold"));
        assert!(valid_primitive("p2"));
        for bad in ["", "../x", "a/b", "Budget", "a.b", "a-b", &"x".repeat(65)] {
            assert!(!valid_primitive(bad), "{bad:?}");
        }
    }

    #[test]
    fn problems_render_one_per_line_with_the_file() {
        let text = render_problems(
            Path::new("p.yaml"),
            &[
                Problem {
                    at: "version".into(),
                    message: "must not be empty".into(),
                },
                Problem {
                    at: "namespaces".into(),
                    message: "none".into(),
                },
            ],
        );
        assert_eq!(
            text,
            "policy config p.yaml is invalid (2 problems):\n  - version: must not be empty\n  - namespaces: none"
        );
    }

    #[test]
    fn structural_problems_are_collected_without_loading_components() {
        let rt = Arc::new(PolicyRuntime::new(super::super::Limits::default()).unwrap());
        let err = PolicySet::from_yaml(
            "version: ''\nnamespaces: {}\n",
            Path::new("p.yaml"),
            Path::new("/none"),
            &rt,
        )
        .unwrap_err();
        let at: Vec<&str> = err.problems().iter().map(|p| p.at.as_str()).collect();
        assert_eq!(at, ["version", "namespaces"]);
    }
}
