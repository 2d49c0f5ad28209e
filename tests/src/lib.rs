//! Shared helpers for the workspace integration tests: where the workspace, the built components
//! and the `llmscope` binary are. Components come from `cargo xtask build-policies`; a missing one
//! fails the test with that hint instead of skipping it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The built-in policies directory (`policies/`).
pub fn policies_dir() -> PathBuf {
    root().join("policies")
}

/// The seed policy configuration, as copied to `examples/policy.yaml`.
pub fn seed_config() -> PathBuf {
    root().join("examples/policy.yaml")
}

/// A built component, failing with a hint when it has not been built.
pub fn component(relative: &str) -> PathBuf {
    let path = root().join(relative);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask build-policies` (or `cargo xtask test`) first",
        path.display()
    );
    path
}

/// A built-in primitive's component, e.g. `budget_threshold`.
pub fn builtin(primitive: &str) -> PathBuf {
    component(&format!("policies/{primitive}.wasm"))
}

/// The hostile test fixture (`wasi`: its WASI-importing wasm32-wasip2 build).
pub fn hostile(wasi: bool) -> PathBuf {
    component(if wasi {
        "tests/fixtures/components/hostile_wasi.wasm"
    } else {
        "tests/fixtures/components/hostile.wasm"
    })
}

/// A fresh policies directory holding copies of `files` (renamed to `name.wasm` for each
/// `(name, source)` pair).
pub fn policies_with(files: &[(&str, &Path)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable_io("creating a temp dir", e));
    for (name, source) in files {
        let dest = dir.path().join(format!("{name}.wasm"));
        std::fs::copy(source, &dest).unwrap_or_else(|e| unreachable_io("copying a component", e));
    }
    dir
}

/// The three built-in primitives, copied into a fresh directory.
pub fn builtin_policies() -> tempfile::TempDir {
    let (b, r, c) = (
        builtin("budget_threshold"),
        builtin("route_preference"),
        builtin("cost_anomaly"),
    );
    policies_with(&[
        ("budget_threshold", &b),
        ("route_preference", &r),
        ("cost_anomaly", &c),
    ])
}

/// The `llmscope` binary built alongside the tests (`cargo test --workspace` builds it).
pub fn llmscope() -> Command {
    let exe =
        std::env::current_exe().unwrap_or_else(|e| unreachable_io("locating the test binary", e));
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("llmscope"))
        .unwrap_or_default();
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build --release -p llmscope` (cargo xtask test does)",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    cmd.current_dir(root()).env("LLMSCOPE_LOG", "error");
    cmd
}

fn unreachable_io(what: &str, e: std::io::Error) -> ! {
    #[allow(
        clippy::panic,
        reason = "test helper: fail the test with the I/O error"
    )]
    {
        panic!("{what}: {e}")
    }
}
