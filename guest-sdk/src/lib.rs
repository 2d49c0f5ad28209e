//! # llmscope-sdk — write llmscope cost policies in Rust
//!
//! A policy is a type that implements [`Policy`]: typed settings (deserialized from the rule's
//! YAML keys, with unknown fields rejected), a `configure` step that validates them and declares
//! the aggregates of live spend the rule needs, and a pure `evaluate` step that turns a request
//! plus those aggregates into a [`Verdict`]. One macro, [`export_policy!`], turns the type into a
//! WebAssembly component implementing `wit/policy.wit`; policy crates contain no ABI code and do
//! not depend on `wit-bindgen` themselves.
//!
//! ```
//! use llmscope_sdk::prelude::*;
//!
//! /// Deny any request estimated above `max_usd`.
//! pub struct MaxRequestCost;
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! pub struct Settings { max_usd: f64 }
//!
//! impl Policy for MaxRequestCost {
//!     type Settings = Settings;
//!     const NAME: &'static str = "max_request_cost";
//!     const VERSION: &'static str = "0.1.0";
//!     const DESCRIPTION: &'static str = "Deny single requests above a cost ceiling";
//!
//!     fn configure(s: &Settings) -> Result<Vec<Aggregate>, String> {
//!         if !(s.max_usd > 0.0) { return Err("max_usd: must be a positive dollar amount".into()); }
//!         Ok(Vec::new())
//!     }
//!
//!     fn evaluate(s: &Settings, req: &RequestContext, _: &Snapshot) -> Result<Verdict, String> {
//!         Ok(if req.estimated_cost_usd > s.max_usd {
//!             Verdict::deny("request too expensive")
//!         } else {
//!             Verdict::allow()
//!         })
//!     }
//! }
//!
//! export_policy!(MaxRequestCost);
//!
//! // The same code path the component runs, natively:
//! let h = llmscope_sdk::testing::Harness::<MaxRequestCost>::new(serde_json::json!({"max_usd": 0.01})).unwrap();
//! let mut req = llmscope_sdk::testing::request();
//! req.estimated_cost_usd = 0.02;
//! assert_eq!(h.evaluate(&req, &Snapshot::default()).unwrap().decision, Decision::Deny);
//! ```
//!
//! Build components with `cargo xtask build-policies` from the llmscope workspace, or any policy
//! crate with `llmscope policy build <dir>` (`llmscope policy new <name>` starts one); both compile
//! for `wasm32-unknown-unknown`, wrap the module into a component and refuse any import beyond the
//! contract. `llmscope policy test` runs a crate's `cases.yaml` against the built component.

extern crate self as llmscope_sdk;

pub mod edge;
pub mod http;
pub mod testing;
pub mod types;
pub mod verdict;

use std::any::Any;
use std::cell::RefCell;
use std::rc::Rc;

use serde::de::DeserializeOwned;

pub use types::{
    Aggregate, AggregateValue, Aggregation, Decision, Info, Metric, RequestContext, Scope,
    Snapshot, TierEstimate, Verdict, Window,
};

/// Name of the only import a policy component may have: the contract's type-only interface
/// (`wit/policy.wit`). The host refuses components importing anything else at load, and
/// `cargo xtask build-policies` at build.
pub const TYPES_INTERFACE: &str = "llmscope:policy/types@0.1.0";
/// Name of the interface every policy component must export.
pub const POLICY_INTERFACE: &str = "llmscope:policy/policy@0.1.0";

/// Everything a policy crate usually needs.
pub mod prelude {
    pub use crate::export_policy;
    pub use crate::types::{
        Aggregate, AggregateValue, Aggregation, Decision, Info, Metric, RequestContext, Scope,
        Snapshot, TierEstimate, Verdict, Window,
    };
    pub use crate::Policy;
}

/// A cost policy.
///
/// Implementations must be pure: the same settings, request and snapshot give the same verdict.
/// There is no clock (use [`RequestContext::unix_time_ms`]), no I/O and no randomness.
pub trait Policy: 'static {
    /// Typed settings: the rule's YAML keys other than the host's own (`id`, `primitive`,
    /// `mode`, `failure_mode`). Use `#[serde(deny_unknown_fields)]` so typos are caught at load.
    type Settings: DeserializeOwned + 'static;

    /// Primitive name operators write in YAML, e.g. `budget_threshold`.
    const NAME: &'static str;
    /// Implementation version (usually `env!("CARGO_PKG_VERSION")`).
    const VERSION: &'static str;
    /// One-line description shown by `llmscope policy list`.
    const DESCRIPTION: &'static str;

    /// Validate settings beyond their shape and declare the aggregates the rule needs. Runs once
    /// per rule at load; an error stops the host from loading the configuration, so name the
    /// field and say what a valid value looks like.
    fn configure(settings: &Self::Settings) -> Result<Vec<Aggregate>, String>;

    /// Decide one request. An `Err` is a rule error: the host applies the rule's failure mode.
    fn evaluate(
        settings: &Self::Settings,
        request: &RequestContext,
        snapshot: &Snapshot,
    ) -> Result<Verdict, String>;
}

/// The self-description of `P`.
pub fn info<P: Policy>() -> Info {
    Info {
        name: P::NAME.to_owned(),
        version: P::VERSION.to_owned(),
        description: P::DESCRIPTION.to_owned(),
    }
}

/// Parse a rule's settings JSON into `P::Settings`, with an error naming the offending field
/// path (`settings.limit_usd: invalid type: ...`).
pub fn parse_settings<P: Policy>(json: &str) -> Result<P::Settings, String> {
    let mut de = serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // The settings text is generated from the rule's YAML, so a JSON line/column would only
        // mislead; the field path says where.
        let inner = match inner.rfind(" at line ") {
            Some(at) => inner[..at].to_owned(),
            None => inner,
        };
        if path == "." || path.is_empty() {
            format!("settings: {inner}")
        } else {
            format!("settings.{path}: {inner}")
        }
    })
}

/// The `configure` entry point exactly as a component runs it: parse, then validate.
pub fn configure<P: Policy>(settings_json: &str) -> Result<Vec<Aggregate>, String> {
    let settings = parse_settings::<P>(settings_json)?;
    P::configure(&settings)
}

/// How many distinct settings strings one instance keeps parsed.
const SETTINGS_CACHE_ENTRIES: usize = 8;

thread_local! {
    /// Parsed settings keyed by their JSON text. The host hands the same settings string to every
    /// evaluation of a rule, so a warm instance parses them once instead of on every request.
    static SETTINGS_CACHE: RefCell<Vec<(String, Rc<dyn Any>)>> = const { RefCell::new(Vec::new()) };
}

fn cached_settings<P: Policy>(json: &str) -> Result<Rc<P::Settings>, String> {
    let hit = SETTINGS_CACHE.with(|cache| {
        cache
            .borrow()
            .iter()
            .find(|(text, _)| text == json)
            .and_then(|(_, parsed)| Rc::clone(parsed).downcast::<P::Settings>().ok())
    });
    if let Some(settings) = hit {
        return Ok(settings);
    }
    let parsed = Rc::new(parse_settings::<P>(json)?);
    SETTINGS_CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.len() >= SETTINGS_CACHE_ENTRIES {
            cache.remove(0);
        }
        cache.push((json.to_owned(), Rc::clone(&parsed) as Rc<dyn Any>));
    });
    Ok(parsed)
}

/// The `evaluate` entry point exactly as a component runs it: settings parsed once per distinct
/// settings text, then [`Policy::evaluate`].
pub fn evaluate<P: Policy>(
    settings_json: &str,
    request: &RequestContext,
    snapshot: &Snapshot,
) -> Result<Verdict, String> {
    let settings = cached_settings::<P>(settings_json)?;
    P::evaluate(&settings, request, snapshot)
}

/// Export a [`Policy`] implementation: as the component's `llmscope:policy/policy` interface,
/// or — when the SDK's `proxy-wasm` feature is on (build for `wasm32-wasip1`) — as a proxy-wasm
/// HTTP filter for Envoy (see [`edge`]).
///
/// Use it once per policy crate, at the crate root. On non-wasm targets it only checks that the
/// type implements [`Policy`], so the crate's native tests build and run normally.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        $crate::__export_target!($policy);
        const _: fn() = || {
            fn assert_policy<P: $crate::Policy>() {}
            assert_policy::<$policy>();
        };
    };
}

#[cfg(all(target_arch = "wasm32", not(feature = "proxy-wasm")))]
#[doc(hidden)]
#[macro_export]
macro_rules! __export_target {
    ($policy:ty) => {
        const _: () = {
            type __LlmscopePolicyAdapter = $crate::__private::component::Adapter<$policy>;
            $crate::__private::component::export_component!(
                __LlmscopePolicyAdapter with_types_in $crate::__private::component
            );
        };
    };
}

#[cfg(all(target_arch = "wasm32", feature = "proxy-wasm"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __export_target {
    ($policy:ty) => {
        fn __llmscope_proxy_start() {
            $crate::proxy::start::<$policy>();
        }
        #[allow(
            unsafe_code,
            reason = "the proxy-wasm ABI entry point is an exported C function"
        )]
        mod __llmscope_proxy_entry {
            $crate::__private::proxy_wasm::main! {{
                super::__llmscope_proxy_start();
            }}
        }
    };
}

#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __export_target {
    ($policy:ty) => {};
}

#[cfg(all(target_arch = "wasm32", not(feature = "proxy-wasm")))]
#[doc(hidden)]
pub mod component;

#[cfg(all(target_arch = "wasm32", feature = "proxy-wasm"))]
pub mod proxy;

#[doc(hidden)]
pub mod __private {
    #[cfg(all(target_arch = "wasm32", not(feature = "proxy-wasm")))]
    pub use crate::component;
    #[cfg(all(target_arch = "wasm32", feature = "proxy-wasm"))]
    pub use proxy_wasm;
    #[cfg(all(target_arch = "wasm32", not(feature = "proxy-wasm")))]
    pub use wit_bindgen;
}
