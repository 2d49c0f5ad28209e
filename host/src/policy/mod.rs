//! The policy runtime: load a policy YAML and its WebAssembly components, evaluate a request's
//! namespace, and combine the rules' verdicts.
//!
//! Combination: every rule of the namespace is evaluated, then the verdicts combine as
//! [`Combination::Evaluated`] states (the first enforced deny, else the first enforced
//! downgrade; the edge chain's variant differs, see [`llmscope_sdk::verdict`]); alerts never
//! block and are all recorded. A rule that fails becomes a deny (`failure_mode: closed`, the
//! default) or an allow (`open`), with the error recorded. `mode: monitor` rules are recorded
//! but never act.
//!
//! Namespace resolution follows the reference: an absent or unknown namespace resolves to
//! `default`; with no `default` the request is allowed.

mod bindings;
mod compile_cache;
mod component;
mod config;
mod instance;
mod policies_dir;
mod snapshot;
mod trial;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use llmscope_sdk::types::{Aggregate, RequestContext, Snapshot, Verdict};
use serde::Serialize;

pub use component::{CallError, Limits, LoadError, LoadedComponent, PolicyRuntime};
pub(crate) use config::valid_primitive;
pub use config::{ConfigError, FailureMode, Mode, Problem};
pub use llmscope_sdk::verdict::{Combination, DecisionKind, LoggedAggregate, RuleOutcome};
pub use policies_dir::is_component_file;
pub use snapshot::{NoSnapshots, SnapshotSource, StaticSnapshots, StaticValue};

/// The namespace used when a request names none, or one that is not configured.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A validated, loaded policy configuration.
#[derive(Debug)]
pub struct PolicySet {
    source: PathBuf,
    version: String,
    namespaces: BTreeMap<String, Namespace>,
    components: BTreeMap<String, Arc<LoadedComponent>>,
}

/// A namespace's ordered rules.
#[derive(Debug)]
pub struct Namespace {
    name: String,
    rules: Vec<Rule>,
}

/// One configured rule: a primitive's component plus validated settings.
pub struct Rule {
    id: String,
    primitive: String,
    mode: Mode,
    failure_mode: FailureMode,
    settings_json: String,
    /// [`settings_sha256`] of `settings_json`, computed once at load.
    settings_sha256: String,
    aggregates: Vec<Aggregate>,
    component: Arc<LoadedComponent>,
    pool: component::InstancePool,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule")
            .field("id", &self.id)
            .field("primitive", &self.primitive)
            .field("mode", &self.mode)
            .field("failure_mode", &self.failure_mode)
            .field("settings_json", &self.settings_json)
            .field("aggregates", &self.aggregates)
            .finish_non_exhaustive()
    }
}

impl Rule {
    /// Rule id (unique in the file).
    pub fn id(&self) -> &str {
        &self.id
    }
    /// Primitive name.
    pub fn primitive(&self) -> &str {
        &self.primitive
    }
    /// Enforce or monitor.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// Closed or open on failure.
    pub fn failure_mode(&self) -> FailureMode {
        self.failure_mode
    }
    /// The settings JSON the rule was configured with.
    pub fn settings_json(&self) -> &str {
        &self.settings_json
    }
    /// Hash of the settings, as decision lines record it ([`settings_sha256`]).
    pub fn settings_sha256(&self) -> &str {
        &self.settings_sha256
    }
    /// Aggregates the rule declared at configure time.
    pub fn aggregates(&self) -> &[Aggregate] {
        &self.aggregates
    }
    /// The component implementing the primitive.
    pub fn component(&self) -> &Arc<LoadedComponent> {
        &self.component
    }
}

impl Namespace {
    /// Namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Rules in evaluation order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

/// The combined decision for a request.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// Namespace whose rules ran (`None`: no namespace matched and there is no `default`).
    pub namespace: Option<String>,
    /// Final decision.
    pub decision: DecisionKind,
    /// Tier to dispatch at, when downgraded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downgrade_to: Option<String>,
    /// Id of the rule that decided (deny or downgrade).
    pub policy_id: Option<String>,
    /// Its primitive.
    pub primitive: Option<String>,
    /// Its reason.
    pub reason: Option<String>,
    /// Every alert raised, as `rule-id: text`.
    pub alerts: Vec<String>,
    /// Every rule's outcome, in order.
    pub rules: Vec<RuleOutcome>,
}

impl Evaluation {
    /// The first value of fact `name`, preferring the deciding rule.
    pub fn fact(&self, name: &str) -> Option<f64> {
        let deciding = self
            .rules
            .iter()
            .find(|r| Some(&r.rule_id) == self.policy_id.as_ref());
        deciding
            .and_then(|r| r.facts.get(name))
            .or_else(|| self.rules.iter().find_map(|r| r.facts.get(name)))
            .copied()
    }
}

impl PolicySet {
    /// File the set was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The file's `version`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Namespaces by name.
    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.namespaces.values()
    }

    /// Components used by the rules, by primitive.
    pub fn components(&self) -> impl Iterator<Item = &Arc<LoadedComponent>> {
        self.components.values()
    }

    /// Every rule, across namespaces.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.namespaces.values().flat_map(|n| n.rules.iter())
    }

    /// The namespace a request naming `requested` is evaluated in.
    pub fn resolve(&self, requested: Option<&str>) -> Option<&Namespace> {
        requested
            .and_then(|name| self.namespaces.get(name))
            .or_else(|| self.namespaces.get(DEFAULT_NAMESPACE))
    }

    /// The namespace name a request naming `requested` is recorded under: the resolved
    /// namespace, else (no `default` configured) the name asked for, else `default`.
    pub fn namespace_name(&self, requested: Option<&str>) -> String {
        self.resolve(requested).map_or_else(
            || requested.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
            |ns| ns.name.clone(),
        )
    }

    /// Evaluate `request` in the namespace it names (resolved as in [`resolve`](Self::resolve)).
    /// If resolution changes the namespace, rules see the resolved name in
    /// `request.budget_namespace`.
    pub fn evaluate(&self, request: &RequestContext, snapshots: &dyn SnapshotSource) -> Evaluation {
        let requested = Some(request.budget_namespace.as_str()).filter(|n| !n.is_empty());
        match self.resolve(requested) {
            None => Evaluation {
                namespace: None,
                decision: DecisionKind::Allow,
                downgrade_to: None,
                policy_id: None,
                primitive: None,
                reason: None,
                alerts: Vec::new(),
                rules: Vec::new(),
            },
            Some(ns) if ns.name == request.budget_namespace => {
                self.evaluate_in(ns, request, snapshots)
            }
            Some(ns) => {
                let mut resolved = request.clone();
                resolved.budget_namespace = ns.name.clone();
                self.evaluate_in(ns, &resolved, snapshots)
            }
        }
    }

    /// Evaluate every rule of `ns` for `request` and combine the verdicts.
    pub fn evaluate_in(
        &self,
        ns: &Namespace,
        request: &RequestContext,
        snapshots: &dyn SnapshotSource,
    ) -> Evaluation {
        let mut rules = Vec::with_capacity(ns.rules.len());
        let wit_request = bindings::request_to_wit(request);
        for rule in &ns.rules {
            if let Some(why) = snapshots.unavailable(rule) {
                tracing::warn!(rule = %rule.id, primitive = %rule.primitive, error = %why, "policy rule has no snapshot");
                let mut failed = RuleOutcome::of(
                    &rule.id,
                    &rule.primitive,
                    rule.mode,
                    rule.failure_mode,
                    Err(why.clone()),
                    0.0,
                );
                if failed.reason.is_some() {
                    failed.reason = Some(format!(
                        "policy rule {} fails closed: {why}; its budget cannot be checked",
                        rule.id
                    ));
                }
                rules.push(with_provenance(failed, rule, None));
                continue;
            }
            let snapshot = snapshots.snapshot(rule, request);
            let started = Instant::now();
            let result =
                rule.component
                    .evaluate(&rule.pool, &rule.settings_json, &wit_request, &snapshot);
            let eval_us = (started.elapsed().as_secs_f64() * 1e8).round() / 100.0;
            rules.push(with_provenance(
                outcome(rule, request, result, eval_us),
                rule,
                Some(&snapshot),
            ));
        }
        let deciding = Combination::Evaluated.deciding(&rules);
        if let Some(i) = deciding {
            rules[i].applied = true;
        }
        let alerts = rules
            .iter()
            .filter_map(|r| r.alert.as_ref().map(|a| format!("{}: {a}", r.rule_id)))
            .collect();
        let decided = deciding.map(|i| &rules[i]);
        Evaluation {
            namespace: Some(ns.name.clone()),
            decision: decided.map_or(DecisionKind::Allow, |r| r.decision),
            downgrade_to: decided.and_then(|r| r.downgrade_to.clone()),
            policy_id: decided.map(|r| r.rule_id.clone()),
            primitive: decided.map(|r| r.primitive.clone()),
            reason: decided.and_then(|r| r.reason.clone()),
            alerts,
            rules,
        }
    }
}

/// `outcome` with what a decision line records to re-run it: the component's digest and the
/// settings hash (both computed at load) and the aggregate values the rule was given.
fn with_provenance(
    mut outcome: RuleOutcome,
    rule: &Rule,
    snapshot: Option<&Snapshot>,
) -> RuleOutcome {
    outcome.component_sha256 = Some(rule.component.sha256().to_owned());
    outcome.settings_sha256 = Some(rule.settings_sha256.clone());
    if let Some(snapshot) = snapshot {
        outcome.aggregates = LoggedAggregate::of_snapshot(snapshot);
        outcome.snapshot_taken_at_ms = Some(snapshot.taken_at_unix_ms);
    }
    outcome
}

/// Length, in hex digits, of a [`settings_sha256`]: the digest's first 64 bits, ample to tell
/// one version of a rule's settings from another.
pub const SETTINGS_HASH_HEX: usize = 16;

/// The hash decision lines record of a rule's settings: SHA-256 of their canonical JSON
/// ([`canonical_json`]), hex, truncated to its first [`SETTINGS_HASH_HEX`] digits. The same
/// settings written in another key order hash alike. Settings that are not JSON (never the
/// case for a loaded rule) hash as their text.
pub fn settings_sha256(settings_json: &str) -> String {
    use sha2::{Digest, Sha256};
    let canonical = serde_json::from_str::<serde_json::Value>(settings_json)
        .map_or_else(|_| settings_json.to_owned(), |v| canonical_json(&v));
    let mut hex = hex::encode(Sha256::digest(canonical.as_bytes()));
    hex.truncate(SETTINGS_HASH_HEX);
    hex
}

/// `value` as canonical JSON: object keys sorted at every level, no whitespace, numbers as
/// `serde_json` writes them.
pub fn canonical_json(value: &serde_json::Value) -> String {
    fn sorted(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                serde_json::Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sorted(v)))
                        .collect(),
                )
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.iter().map(sorted).collect())
            }
            other => other.clone(),
        }
    }
    sorted(value).to_string()
}

/// Turn a rule's raw result into its outcome: validate downgrade targets, apply the failure mode.
fn outcome(
    rule: &Rule,
    request: &RequestContext,
    result: Result<Verdict, CallError>,
    eval_us: f64,
) -> RuleOutcome {
    let checked = result
        .map_err(|e| e.to_string())
        .and_then(|verdict| verdict.checked(request));
    if let Err(error) = &checked {
        tracing::warn!(rule = %rule.id, primitive = %rule.primitive, %error, "policy rule failed");
    }
    RuleOutcome::of(
        &rule.id,
        &rule.primitive,
        rule.mode,
        rule.failure_mode,
        checked,
        eval_us,
    )
}

#[cfg(test)]
mod provenance_tests {
    use super::*;

    #[test]
    fn settings_hash_ignores_key_order_and_whitespace_but_not_values() {
        let a = settings_sha256(r#"{"period":"daily","limit_usd":10.0,"nested":{"b":1,"a":2}}"#);
        let b = settings_sha256(
            r#"{ "nested": {"a":2, "b":1}, "limit_usd": 10.0, "period": "daily" }"#,
        );
        assert_eq!(a, b);
        assert_eq!(a.len(), SETTINGS_HASH_HEX);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        let c = settings_sha256(r#"{"period":"daily","limit_usd":5.0,"nested":{"b":1,"a":2}}"#);
        assert_ne!(a, c);
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"z":[{"y":1,"x":2}],"a":null}"#).unwrap();
        assert_eq!(canonical_json(&v), r#"{"a":null,"z":[{"x":2,"y":1}]}"#);
    }
}
