//! The `llmscope` binary: see `llmscope --help`.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

/// mimalloc rather than glibc's malloc: a serving gateway allocates from many threads (tokio
/// workers, the blocking pool, the log writer, wasm calls), where glibc spends ~12% of the CPU
/// in malloc/free and keeps a heap per thread.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LLMSCOPE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match llmscope::cli::run(llmscope::cli::Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr().lock(), "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
