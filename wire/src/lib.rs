//! llmscope's wire formats and their parsers, apart from the engine and the wasm runtime so they
//! can be fuzzed on their own: the gateway configuration ([`config`]), `/infer` and
//! chat-completions request bodies ([`requests`], their stream flags [`chat_stream`], the
//! parameters honoured [`chat_params`]), the JSONL
//! log records as the gateway writes
//! them and the analytics engine reads them back ([`records`]) and the YAML reader the gateway
//! and policy configs share ([`yaml`]).

pub mod alerts;
pub mod budgets;
pub mod chat_params;
pub mod chat_stream;
pub mod config;
pub mod embeddings;
pub mod images;
pub mod records;
pub mod requests;
pub mod yaml;

use std::fmt;
use std::time::Duration;

/// Tokenizer names a model may name in the gateway config (`tokenizer:`).
pub const TOKENIZERS: [&str; 2] = ["o200k_base", "cl100k_base"];

/// Resource bounds for policy execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget of one call into a policy (configure or evaluate).
    pub deadline: Duration,
    /// Largest linear memory one policy instance may grow to, in bytes.
    pub memory_bytes: usize,
    /// Largest `.wasm` file the loader accepts, in bytes.
    pub max_component_bytes: u64,
    /// Warm instances kept per rule for reuse.
    pub warm_instances_per_rule: usize,
    /// Longest reason or alert text kept from a verdict; longer text is truncated.
    pub max_text_bytes: usize,
    /// Directory for compiled components (`<sha256>.cwasm`), so a restart skips compilation.
    /// Must be private to the operator: its files are loaded as native code.
    pub compile_cache: Option<std::path::PathBuf>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline: Duration::from_millis(20),
            memory_bytes: 32 << 20,
            max_component_bytes: 32 << 20,
            warm_instances_per_rule: 8,
            max_text_bytes: 4096,
            compile_cache: None,
        }
    }
}

/// One problem in a policy configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: a field path, with the rule id when there is one.
    pub at: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}
