//! Golden tests for gateway-config errors, one case per file: every
//! `tests/config-errors/<case>.yaml` is loaded with [`GatewayConfig::load`] and the full error
//! text must equal `<case>.err`. The cases directory is written `$DIR` in the expected files, so
//! they do not depend on where the tree is checked out.
//!
//! After changing a message (or adding a case), regenerate the expected files and review the
//! diff like any other change:
//!
//! ```text
//! LLMSCOPE_BLESS=1 cargo test --release -p llmscope-wire --test config_errors
//! ```
//!
//! Blessing writes every `.err` whose text changed and deletes `.err` files whose `.yaml` is gone.
//! Without it, a changed message, a `.yaml` without its `.err` or a stray `.err` fails the test,
//! listing every mismatching case. A case that loads without error fails either way. The harness
//! is `tests/src/golden.rs`, shared with the policy-config cases.
//!
//! Environment seen by the cases: `LLMSCOPE_TEST_KEY` holds a usable key, `LLMSCOPE_SHORT_KEY` a
//! key that is too short, `LLMSCOPE_EMPTY_KEY` is set but empty; nothing else is set.
#![allow(
    clippy::unwrap_used,
    reason = "test harness: a failed unwrap is a failed test"
)]

#[path = "../../tests/src/golden.rs"]
mod golden;

use std::path::{Path, PathBuf};

use llmscope_wire::config::GatewayConfig;

fn env(name: &str) -> Option<String> {
    match name {
        "LLMSCOPE_TEST_KEY" => Some("test-key-0123456789abcdef".into()),
        "LLMSCOPE_SHORT_KEY" => Some("short".into()),
        "LLMSCOPE_EMPTY_KEY" => Some(String::new()),
        _ => None,
    }
}

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config-errors")
}

/// The error text for one case, with the cases directory replaced by `$DIR`; `None` if the
/// config loads.
fn actual(dir: &Path, yaml: &Path) -> Option<String> {
    let err = GatewayConfig::load(yaml, &env).err()?;
    Some(golden::error_text(dir, &err))
}

#[test]
fn config_errors_match_the_golden_files() {
    let dir = cases_dir();
    golden::check_cases(&dir, "config-error", |yaml| actual(&dir, yaml));
}

#[test]
fn a_missing_file_is_named() {
    let dir = cases_dir();
    let got = actual(&dir, &dir.join("no-such-file.yml"));
    assert_eq!(
        got.as_deref().unwrap(),
        "gateway config $DIR/no-such-file.yml is invalid:\n  - (file): cannot read: No such file or directory (os error 2)\n"
    );
}
