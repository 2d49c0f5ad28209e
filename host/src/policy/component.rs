//! Loading policy components: one wasmtime [`Engine`] with epoch interruption, a ticker thread
//! that drives the epoch, and compiled, validated components with their `InstancePre`
//! (optionally from a compile cache). Running them (`instance.rs`): a pool of warm instances
//! per rule; every call is bounded by a deadline and a memory cap; a trapped instance is
//! discarded, never reused.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use llmscope_sdk::types::Info;
use sha2::{Digest, Sha256};
use wasmtime::component::{types::ComponentItem, Component, Linker};
use wasmtime::{Config, Engine};

use super::bindings::{self, PluginPre};
use super::compile_cache::{current_uid, private_dir, trusted_file, write_private};

pub use llmscope_wire::Limits;

pub use super::instance::{CallError, LoadedComponent};
pub(crate) use super::instance::{InstancePool, StoreState};

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

/// The wasmtime engine shared by every component, plus the epoch ticker that enforces deadlines.
pub struct PolicyRuntime {
    pub(super) engine: Engine,
    pub(super) limits: Limits,
    ticker: Arc<Ticker>,
}

/// Epoch tick period: deadlines are enforced with this granularity.
const TICK: Duration = Duration::from_millis(1);

/// Ticks without a policy call after which the ticker sleeps until the next call.
const IDLE_TICKS: u32 = 100;

/// The epoch ticker's state. It ticks every [`TICK`] while policy code may run and sleeps
/// (no wake-ups at all) once no call has run for [`IDLE_TICKS`] ticks; a call that starts
/// while it sleeps wakes it first. `running` and `parked` are sequentially consistent: either
/// the ticker sees the call running and keeps ticking, or the call sees the ticker parked and
/// wakes it, so no call ever runs without its deadline.
struct Ticker {
    running: AtomicUsize,
    parked: AtomicBool,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Ticker {
    fn run(&self, engine: &Engine) {
        let mut idle = 0;
        while !self.stop.load(Ordering::SeqCst) {
            if self.running.load(Ordering::SeqCst) == 0 {
                idle += 1;
            } else {
                idle = 0;
            }
            if idle < IDLE_TICKS {
                std::thread::sleep(TICK);
                engine.increment_epoch();
                continue;
            }
            let mut guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.parked.store(true, Ordering::SeqCst);
            while self.parked.load(Ordering::SeqCst)
                && self.running.load(Ordering::SeqCst) == 0
                && !self.stop.load(Ordering::SeqCst)
            {
                guard = self
                    .wake
                    .wait(guard)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            self.parked.store(false, Ordering::SeqCst);
            idle = 0;
        }
    }

    fn wake(&self) {
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.parked.store(false, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// Held while policy code runs (instantiation, a call): keeps the epoch ticking.
pub(super) struct Running<'a>(&'a Ticker);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PolicyRuntime {
    /// Create the engine and start the epoch ticker.
    pub fn new(limits: Limits) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.max_wasm_stack(512 << 10);
        let engine = Engine::new(&config)?;
        let ticker = Arc::new(Ticker {
            running: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let (ticker_engine, state) = (engine.clone(), Arc::clone(&ticker));
        std::thread::Builder::new()
            .name("llmscope-epoch".into())
            .spawn(move || state.run(&ticker_engine))?;
        Ok(Self {
            engine,
            limits,
            ticker,
        })
    }

    /// Mark policy code as running until the guard drops: the epoch ticks meanwhile.
    pub(super) fn running(&self) -> Running<'_> {
        self.ticker.running.fetch_add(1, Ordering::SeqCst);
        if self.ticker.parked.load(Ordering::SeqCst) {
            self.ticker.wake();
        }
        Running(&self.ticker)
    }

    /// The limits every call runs under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub(super) fn deadline_ticks(&self) -> u64 {
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
        if let Some(file) = cached
            .as_deref()
            .filter(|f| f.is_file() && trusted_file(f, current_uid()))
        {
            // Read into memory rather than mmap the file: a cache file truncated or replaced
            // while in use must not take the process down (SIGBUS).
            let loaded = std::fs::read(file).map_err(wasmtime::Error::from).and_then(|data| {
                // SAFETY: the bytes were written by `Component::serialize` of this runtime into
                // a directory only this user can write, as a file only this user can write
                // (checked by `private_dir` and `trusted_file`), under the
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
                .and_then(|b| write_private(&file, &b));
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
        self.ticker.stop.store(true, Ordering::SeqCst);
        self.ticker.wake();
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

#[cfg(test)]
mod tests {
    use super::*;

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
