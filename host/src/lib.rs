//! llmscope: a cost-governance gateway for LLM inference.
//!
//! Every request is priced before dispatch; cost policies — WebAssembly components built against
//! `wit/policy.wit` — decide allow, downgrade or deny from live spend aggregates, and the host
//! enforces the verdict. This crate is the native host: the [`policy`] runtime (loading,
//! validating, bounding and evaluating components), the [`gateway`] request lifecycle and its
//! HTTP [`server`], and the `llmscope` command-line tool ([`cli`]).

pub mod artifacts;
pub mod cli;
pub mod engine;
pub mod gateway;
pub mod ledger;
pub mod metrics;
pub mod mock_upstream;
pub mod policy;
pub mod pricing;
pub mod providers;
pub mod queries;
pub mod reload;
pub mod report;
pub mod server;
pub mod snapshots;
pub mod verify;

/// The gateway configuration (parsed by `llmscope-wire`).
pub use llmscope_wire::config;
/// Request-body parsing shared by the HTTP API and the edge control plane (`llmscope-wire`).
pub use llmscope_wire::requests;
