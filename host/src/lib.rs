//! llmscope: a cost-governance gateway for LLM inference.
//!
//! Every request is priced before dispatch; cost policies — WebAssembly components built against
//! `wit/policy.wit` — decide allow, downgrade or deny from live spend aggregates, and the host
//! enforces the verdict. This crate is the native host: the [`policy`] runtime (loading,
//! validating, bounding and evaluating components) and the `llmscope` command-line tool.

pub mod cli;
pub mod policy;
