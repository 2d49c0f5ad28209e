//! Loading and running policy components: one wasmtime [`Engine`] with epoch interruption, a
//! ticker thread that drives the epoch, compiled components with their `InstancePre`, and a pool
//! of warm instances per rule. Every call is bounded by a deadline and a memory cap; a trapped
//! instance is discarded, never reused.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llmscope_sdk::types::{Aggregate, Info, Snapshot, Verdict};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use wasmtime::component::{types::ComponentItem, Component, Linker};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};

use super::bindings::{self, Plugin, PluginPre};

pub use llmscope_wire::Limits;

/// Why loading a component failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is larger than [`Limits::max_component_bytes`].
    #[error("{path} is {size} bytes, over the {max}-byte limit for a policy component")]
    TooLarge {
        /// File.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Not a valid WebAssembly component.
    #[error("{path} is not a valid WebAssembly component ({cause}); rebuild it with `cargo xtask build-policies`")]
    Invalid {
        /// File.
        path: PathBuf,
        /// Cause.
        cause: String,
    },
    /// It imports something beyond the contract.
    #[error(
        "{path} imports {imports}; a policy may import only {allowed} (no WASI, clock or I/O)"
    )]
    ForbiddenImports {
        /// File.
        path: PathBuf,
        /// The offending imports.
        imports: String,
        /// The allowed import.
        allowed: &'static str,
    },
    /// It does not implement the contract.
    #[error("{path} does not implement {interface}: {cause}")]
    NotAPolicy {
        /// File.
        path: PathBuf,
        /// Interface expected.
        interface: &'static str,
        /// Cause.
        cause: String,
    },
    /// `describe` failed.
    #[error("{path}: describe() failed: {cause}")]
    Describe {
        /// File.
        path: PathBuf,
        /// Cause.
        cause: String,
    },
}

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

/// The wasmtime engine shared by every component, plus the epoch ticker that enforces deadlines.
pub struct PolicyRuntime {
    engine: Engine,
    limits: Limits,
    stop: Arc<AtomicBool>,
}

/// Epoch tick period: deadlines are enforced with this granularity.
const TICK: Duration = Duration::from_millis(1);

impl PolicyRuntime {
    /// Create the engine and start the epoch ticker.
    pub fn new(limits: Limits) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.max_wasm_stack(512 << 10);
        let engine = Engine::new(&config)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ticker_engine, ticker_stop) = (engine.clone(), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("llmscope-epoch".into())
            .spawn(move || {
                while !ticker_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    ticker_engine.increment_epoch();
                }
            })?;
        Ok(Self {
            engine,
            limits,
            stop,
        })
    }

    /// The limits every call runs under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn deadline_ticks(&self) -> u64 {
        let ticks = self.limits.deadline.as_micros().div_ceil(TICK.as_micros());
        u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
    }

    /// Compile `bytes` (validating them), or load the compiled form from the compile cache when
    /// one is configured and holds this digest; a fresh compilation is written back.
    fn compile(&self, path: &Path, bytes: &[u8], sha256: &str) -> Result<Component, LoadError> {
        let cached = self
            .limits
            .compile_cache
            .as_deref()
            .filter(|dir| private_dir(dir))
            .map(|dir| dir.join(format!("{sha256}.cwasm")));
        if let Some(file) = cached.as_deref().filter(|f| f.is_file()) {
            // Read into memory rather than mmap the file: a cache file truncated or replaced
            // while in use must not take the process down (SIGBUS).
            let loaded = std::fs::read(file).map_err(wasmtime::Error::from).and_then(|data| {
                // SAFETY: the bytes were written by `Component::serialize` of this runtime into
                // a directory only the operator can write (checked by `private_dir`), under the
                // digest of the very component being loaded; wasmtime rejects data from another
                // engine configuration or version, and then we compile afresh.
                #[allow(
                    unsafe_code,
                    reason = "loading our own compiled component from the operator's private cache"
                )]
                unsafe {
                    Component::deserialize(&self.engine, &data)
                }
            });
            match loaded {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "compiled component not reusable; compiling again");
                }
            }
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| LoadError::Invalid {
            path: path.into(),
            cause: format!("{e:#}"),
        })?;
        if let Some(file) = cached {
            let written = component
                .serialize()
                .map_err(std::io::Error::other)
                .and_then(|b| {
                    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
                    std::fs::write(&tmp, b)?;
                    std::fs::rename(&tmp, &file)
                });
            if let Err(e) = written {
                tracing::warn!(file = %file.display(), error = %e, "cannot cache the compiled component");
            }
        }
        Ok(component)
    }

    /// Compile and validate the component at `path`, then ask it to describe itself.
    pub fn load(self: &Arc<Self>, path: &Path) -> Result<Arc<LoadedComponent>, LoadError> {
        let meta = std::fs::metadata(path).map_err(|source| LoadError::Read {
            path: path.into(),
            source,
        })?;
        if meta.len() > self.limits.max_component_bytes {
            return Err(LoadError::TooLarge {
                path: path.into(),
                size: meta.len(),
                max: self.limits.max_component_bytes,
            });
        }
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.into(),
            source,
        })?;
        self.load_bytes(path, &bytes)
    }

    /// Like [`load`](Self::load), from bytes already in memory; `path` is used in messages.
    pub fn load_bytes(
        self: &Arc<Self>,
        path: &Path,
        bytes: &[u8],
    ) -> Result<Arc<LoadedComponent>, LoadError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let component = self.compile(path, bytes, &sha256)?;

        let ty = component.component_type();
        let forbidden: Vec<String> = ty
            .imports(&self.engine)
            .filter(|(name, item)| {
                !(*name == bindings::TYPES_INTERFACE && is_type_only(&self.engine, &item.ty))
            })
            .map(|(name, _)| name.to_owned())
            .collect();
        if !forbidden.is_empty() {
            return Err(LoadError::ForbiddenImports {
                path: path.into(),
                imports: forbidden.join(", "),
                allowed: bindings::TYPES_INTERFACE,
            });
        }

        let mut linker = Linker::<StoreState>::new(&self.engine);
        if ty
            .get_import(&self.engine, bindings::TYPES_INTERFACE)
            .is_some()
        {
            linker
                .instance(bindings::TYPES_INTERFACE)
                .map_err(|e| LoadError::Invalid {
                    path: path.into(),
                    cause: format!("{e:#}"),
                })?;
        }
        let not_a_policy = |e: wasmtime::Error| LoadError::NotAPolicy {
            path: path.into(),
            interface: bindings::POLICY_INTERFACE,
            cause: format!("{e:#}"),
        };
        let instance_pre = linker.instantiate_pre(&component).map_err(not_a_policy)?;
        let pre = PluginPre::new(instance_pre).map_err(not_a_policy)?;

        let mut loaded = LoadedComponent {
            runtime: Arc::clone(self),
            path: path.into(),
            sha256,
            size: bytes.len(),
            info: Info {
                name: String::new(),
                version: String::new(),
                description: String::new(),
            },
            pre,
        };
        let info = loaded
            .call_fresh(|plugin, store| {
                Ok(bindings::info_from_wit(
                    plugin.llmscope_policy_policy().call_describe(store)?,
                ))
            })
            .map_err(|e| LoadError::Describe {
                path: path.into(),
                cause: e.to_string(),
            })?;
        loaded.info = info;
        Ok(Arc::new(loaded))
    }
}

impl Drop for PolicyRuntime {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Create `dir` (mode 0700) if needed; true when it exists, is a directory and no one but its
/// owner can write to it — the compile cache holds native code.
fn private_dir(dir: &Path) -> bool {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if !dir.exists() {
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir);
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() && m.mode() & 0o022 == 0 => true,
        Ok(_) => {
            tracing::warn!(dir = %dir.display(), "compile cache is not a private directory (group/world-writable); not using it");
            false
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "compile cache unavailable");
            false
        }
    }
}

/// True when an imported item is an instance exporting only types (no functions, no resources
/// with behaviour): the contract's `types` interface.
fn is_type_only(engine: &Engine, item: &ComponentItem) -> bool {
    match item {
        ComponentItem::ComponentInstance(instance) => instance
            .exports(engine)
            .all(|(_, export)| matches!(export.ty, ComponentItem::Type(_))),
        _ => false,
    }
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
    runtime: Arc<PolicyRuntime>,
    path: PathBuf,
    sha256: String,
    size: usize,
    info: Info,
    pre: PluginPre<StoreState>,
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
        warm.store.set_epoch_deadline(self.runtime.deadline_ticks());
        warm.store.data_mut().memory_refused = None;
        f(&warm.plugin, &mut warm.store)
            .map_err(|e| classify(&warm.store, e, self.runtime.limits.deadline))
    }

    /// Run `f` on a fresh instance that is dropped afterwards.
    fn call_fresh<R>(
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

    #[test]
    fn deadline_rounds_up_to_whole_ticks() {
        let rt = |deadline| {
            PolicyRuntime::new(Limits {
                deadline,
                ..Limits::default()
            })
            .unwrap()
        };
        assert_eq!(rt(Duration::from_millis(20)).deadline_ticks(), 20);
        assert_eq!(rt(Duration::from_micros(1500)).deadline_ticks(), 2);
        assert_eq!(rt(Duration::ZERO).deadline_ticks(), 1);
    }

    #[test]
    fn policy_sets_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<crate::policy::PolicySet>();
        assert_send_sync::<LoadedComponent>();
    }

    #[test]
    fn garbage_bytes_are_an_invalid_component_not_a_crash() {
        let rt = Arc::new(PolicyRuntime::new(Limits::default()).unwrap());
        let err = rt
            .load_bytes(Path::new("x.wasm"), b"definitely not wasm")
            .unwrap_err();
        assert!(matches!(err, LoadError::Invalid { .. }), "{err}");
        assert!(err
            .to_string()
            .starts_with("x.wasm is not a valid WebAssembly component"));
    }

    #[test]
    fn missing_file_is_a_read_error_naming_the_path() {
        let rt = Arc::new(PolicyRuntime::new(Limits::default()).unwrap());
        let err = rt.load(Path::new("/nonexistent/p.wasm")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read /nonexistent/p.wasm"),
            "{err}"
        );
    }
}
