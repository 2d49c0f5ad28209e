//! Running policy components: a pool of warm instances per rule, each call bounded by a
//! deadline and a memory cap; a trapped instance is discarded, never reused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use llmscope_sdk::types::{Aggregate, Info, Snapshot, Verdict};
use parking_lot::Mutex;
use wasmtime::{ResourceLimiter, Store, Trap};

use super::bindings::{self, Plugin, PluginPre};
use super::component::PolicyRuntime;

/// Why one call into a policy failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The call ran past [`Limits::deadline`].
    #[error("deadline of {0:?} exceeded")]
    Deadline(Duration),
    /// The instance tried to grow memory past [`Limits::memory_bytes`].
    #[error("memory cap of {cap} bytes exceeded (asked for {wanted} bytes)")]
    Memory {
        /// The cap.
        cap: usize,
        /// Requested size.
        wanted: usize,
    },
    /// The guest exhausted its stack.
    #[error("stack overflow")]
    StackOverflow,
    /// The guest trapped (a Rust panic shows up as `unreachable`).
    #[error("trapped: {0}")]
    Trap(String),
    /// The policy returned an error value.
    #[error("policy error: {0}")]
    Policy(String),
    /// The runtime failed the call for another reason (e.g. instantiation failed).
    #[error("runtime error: {0}")]
    Runtime(String),
}

/// Per-store state: the resource limiter.
pub(crate) struct StoreState {
    memory_cap: usize,
    /// Set when the limiter refused a memory growth, so the trap can be reported precisely.
    memory_refused: Option<usize>,
}

impl ResourceLimiter for StoreState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            self.memory_refused = Some(desired);
            wasmtime::bail!("policy memory cap of {} bytes exceeded", self.memory_cap);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// A compiled, validated policy component.
pub struct LoadedComponent {
    pub(super) runtime: Arc<PolicyRuntime>,
    pub(super) path: PathBuf,
    pub(super) sha256: String,
    pub(super) size: usize,
    pub(super) info: Info,
    pub(super) pre: PluginPre<StoreState>,
}

impl std::fmt::Debug for LoadedComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedComponent")
            .field("path", &self.path)
            .field("sha256", &self.sha256)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// A live instance with its store, reusable while it has not trapped.
pub(crate) struct Warm {
    store: Store<StoreState>,
    plugin: Plugin,
}

impl LoadedComponent {
    /// What the component says about itself.
    pub fn info(&self) -> &Info {
        &self.info
    }

    /// Where it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// SHA-256 of the `.wasm` bytes, hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Size of the `.wasm` file in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    fn instantiate(&self) -> Result<Warm, CallError> {
        let state = StoreState {
            memory_cap: self.runtime.limits.memory_bytes,
            memory_refused: None,
        };
        let _running = self.runtime.running();
        let mut store = Store::new(&self.runtime.engine, state);
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        store.set_epoch_deadline(self.runtime.deadline_ticks());
        store.epoch_deadline_trap();
        let plugin = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| classify(&store, e, self.runtime.limits.deadline))?;
        Ok(Warm { store, plugin })
    }

    /// Run `f` on `warm` under the deadline; classify failures.
    fn call<R>(
        &self,
        warm: &mut Warm,
        f: impl FnOnce(&Plugin, &mut Store<StoreState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let _running = self.runtime.running();
        warm.store.set_epoch_deadline(self.runtime.deadline_ticks());
        warm.store.data_mut().memory_refused = None;
        f(&warm.plugin, &mut warm.store)
            .map_err(|e| classify(&warm.store, e, self.runtime.limits.deadline))
    }

    /// Run `f` on a fresh instance that is dropped afterwards.
    pub(super) fn call_fresh<R>(
        &self,
        f: impl FnOnce(&Plugin, &mut Store<StoreState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let mut warm = self.instantiate()?;
        self.call(&mut warm, f)
    }

    /// Validate `settings_json` and get the rule's declared aggregates (fresh instance).
    pub fn configure(&self, settings_json: &str) -> Result<Vec<Aggregate>, CallError> {
        self.call_fresh(|plugin, store| {
            plugin
                .llmscope_policy_policy()
                .call_configure(store, settings_json)
        })?
        .map(|aggs| aggs.into_iter().map(bindings::aggregate_from_wit).collect())
        .map_err(CallError::Policy)
    }

    /// Evaluate on an instance from `pool` (or a new one); the instance goes back to the pool
    /// only if the call did not trap.
    pub(crate) fn evaluate(
        &self,
        pool: &InstancePool,
        settings_json: &str,
        request: &bindings::WitRequest,
        snapshot: &Snapshot,
    ) -> Result<Verdict, CallError> {
        let mut warm = match pool.take() {
            Some(warm) => warm,
            None => self.instantiate()?,
        };
        let snapshot = bindings::snapshot_to_wit(snapshot);
        let result = self.call(&mut warm, |plugin, store| {
            plugin
                .llmscope_policy_policy()
                .call_evaluate(store, settings_json, request, &snapshot)
        });
        match result {
            Ok(Ok(verdict)) => {
                pool.give_back(warm, self.runtime.limits.warm_instances_per_rule);
                Ok(truncate_texts(
                    bindings::verdict_from_wit(verdict),
                    self.runtime.limits.max_text_bytes,
                ))
            }
            Ok(Err(message)) => {
                pool.give_back(warm, self.runtime.limits.warm_instances_per_rule);
                Err(CallError::Policy(truncate(
                    message,
                    self.runtime.limits.max_text_bytes,
                )))
            }
            Err(e) => Err(e),
        }
    }
}

fn classify(store: &Store<StoreState>, e: wasmtime::Error, deadline: Duration) -> CallError {
    if let Some(wanted) = store.data().memory_refused {
        return CallError::Memory {
            cap: store.data().memory_cap,
            wanted,
        };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => CallError::Deadline(deadline),
        Some(Trap::StackOverflow) => CallError::StackOverflow,
        Some(Trap::UnreachableCodeReached) => {
            CallError::Trap("unreachable instruction (a panic or abort in the policy)".into())
        }
        Some(trap) => CallError::Trap(trap.to_string()),
        None => CallError::Runtime(format!("{e:#}")),
    }
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let dropped = text.len() - cut;
        text.truncate(cut);
        text.push_str(&format!("… [{dropped} more bytes truncated]"));
    }
    text
}

fn truncate_texts(mut v: Verdict, max: usize) -> Verdict {
    v.reason = v.reason.map(|r| truncate(r, max));
    v.alert = v.alert.map(|a| truncate(a, max));
    v
}

/// Warm instances of one rule's component.
#[derive(Default)]
pub(crate) struct InstancePool {
    idle: Mutex<Vec<Warm>>,
}

impl InstancePool {
    fn take(&self) -> Option<Warm> {
        self.idle.lock().pop()
    }

    fn give_back(&self, warm: Warm, max_idle: usize) {
        let mut idle = self.idle.lock();
        if idle.len() < max_idle {
            idle.push(warm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_keeps_short_text_and_cuts_long_text_on_a_char_boundary() {
        assert_eq!(truncate("short".into(), 10), "short");
        let cut = truncate("ééééé".into(), 3); // 2-byte chars: byte 3 is inside the second one
        assert_eq!(cut, "é… [8 more bytes truncated]");
    }
}
