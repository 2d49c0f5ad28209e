//! Golden tests for policy-config errors, one case per file: every
//! `tests/policy-config-errors/<case>.yaml` is loaded with [`PolicySet::load`], with the cases
//! directory as the policies directory (it holds no components, so a rule that gets as far as
//! loading its primitive fails there), and the full error text must equal `<case>.err`. The
//! cases directory is written `$DIR` in the expected files.
//!
//! These cases cover the YAML structure and its validation. A rule's own settings are checked by
//! its component (`configure`), so they are tested with the built components in
//! `tests/policy_runtime.rs`, not here.
//!
//! After changing a message (or adding a case), regenerate the expected files and review the
//! diff like any other change:
//!
//! ```text
//! LLMSCOPE_BLESS=1 cargo test --release -p llmscope --test policy_config_errors
//! ```
//!
//! Blessing writes every `.err` whose text changed and deletes `.err` files whose `.yaml` is gone.
//! Without it, a changed message, a `.yaml` without its `.err` or a stray `.err` fails the test,
//! listing every mismatching case. A case that loads without error fails either way. The harness
//! is `tests/src/golden.rs`, shared with the gateway-config cases.
#![allow(
    clippy::unwrap_used,
    reason = "test harness: a failed unwrap is a failed test"
)]

#[path = "../../tests/src/golden.rs"]
mod golden;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use llmscope::policy::{Limits, PolicyRuntime, PolicySet};

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy-config-errors")
}

#[test]
fn policy_config_errors_match_the_golden_files() {
    let dir = cases_dir();
    let runtime = Arc::new(PolicyRuntime::new(Limits::default()).unwrap());
    golden::check_cases(&dir, "policy-config-error", |yaml| {
        let err = PolicySet::load(yaml, &dir, &runtime).err()?;
        Some(golden::error_text(&dir, &err))
    });
}
