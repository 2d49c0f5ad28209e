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
//! listing every mismatching case. A case that loads without error fails either way.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test harness: a failed unwrap or a panic is a failed test"
)]

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use llmscope::policy::{Limits, PolicyRuntime, PolicySet};

const BLESS_VAR: &str = "LLMSCOPE_BLESS";

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy-config-errors")
}

/// The error text for one case, with the cases directory replaced by `$DIR`; `None` if the
/// policy file loads.
fn actual(runtime: &Arc<PolicyRuntime>, dir: &Path, yaml: &Path) -> Option<String> {
    let err = PolicySet::load(yaml, dir, runtime).err()?;
    let mut text = err.to_string().replace(&dir.display().to_string(), "$DIR");
    text.push('\n');
    Some(text)
}

#[test]
fn policy_config_errors_match_the_golden_files() {
    let dir = cases_dir();
    let runtime = Arc::new(PolicyRuntime::new(Limits::default()).unwrap());
    let bless = std::env::var_os(BLESS_VAR).is_some_and(|v| !v.is_empty() && v != "0");
    let mut yamls = BTreeSet::new();
    let mut errs = BTreeSet::new();
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
        match path.extension().and_then(|x| x.to_str()) {
            Some("yaml") => {
                yamls.insert(stem);
            }
            Some("err") => {
                errs.insert(stem);
            }
            _ => panic!(
                "{}: cases are <name>.yaml and <name>.err only",
                path.display()
            ),
        }
    }
    assert!(!yamls.is_empty(), "no cases in {}", dir.display());

    let mut failures = Vec::new();
    for stale in errs.difference(&yamls) {
        let err = dir.join(format!("{stale}.err"));
        if bless {
            fs::remove_file(&err).unwrap();
        } else {
            failures.push(format!("{stale}: {} has no {stale}.yaml", err.display()));
        }
    }
    for case in &yamls {
        let err = dir.join(format!("{case}.err"));
        let Some(got) = actual(&runtime, &dir, &dir.join(format!("{case}.yaml"))) else {
            failures.push(format!(
                "{case}: loads without error; a case must be invalid"
            ));
            continue;
        };
        let want = fs::read_to_string(&err).ok();
        if want.as_deref() == Some(got.as_str()) {
            continue;
        }
        if bless {
            fs::write(&err, &got).unwrap();
        } else if let Some(want) = want {
            failures.push(format!(
                "{case}: error text differs from {}\n--- expected\n{want}--- actual\n{got}",
                err.display()
            ));
        } else {
            failures.push(format!("{case}: no {} yet; actual:\n{got}", err.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} policy-config-error cases failed (if the change is intended, rerun with \
         {BLESS_VAR}=1 and review the diff):\n\n{}",
        failures.len(),
        yamls.len(),
        failures.join("\n\n")
    );
}
