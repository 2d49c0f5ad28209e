//! llmscope: a cost-governance gateway for LLM inference.
//!
//! Every request is priced before dispatch; cost policies — WebAssembly components built against
//! `wit/policy.wit` — decide allow, downgrade or deny from live spend aggregates, and the host
//! enforces the verdict. This crate is the native host: the [`policy`] runtime (loading,
//! validating, bounding and evaluating components), the [`gateway`] request lifecycle and its
//! HTTP surface ([`http`]: the route table, one module per API — `/infer`, OpenAI chat, the Envoy
//! control plane, admin — and one error type rendered per API dialect), and the `llmscope`
//! command-line tool ([`cli`]). The vocabulary shared with the Envoy filters (header names,
//! error bodies, edge wire bodies, rule outcomes) is defined once in `llmscope-sdk`.

pub mod alerts;
pub mod artifacts;
pub mod cli;
pub mod engine;
pub mod gateway;
pub mod http;
pub mod ledger;
pub mod metrics;
pub mod mock_upstream;
pub mod otel;
pub mod policy;
pub mod pricing;
pub mod providers;
pub mod queries;
pub mod reload;
pub mod replay;
pub mod report;
pub mod shared;
pub mod snapshots;
pub mod verify;
pub mod windows;

/// The former name of [`http`] (`server::serve`, `server::bind`).
pub use self::http as server;

/// The gateway configuration (parsed by `llmscope-wire`).
pub use llmscope_wire::config;
/// Request-body parsing shared by the HTTP API and the edge control plane (`llmscope-wire`).
pub use llmscope_wire::requests;
