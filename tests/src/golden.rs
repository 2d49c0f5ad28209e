//! Golden-file tests of error messages: a directory of `<case>.yaml` inputs, each failing with
//! the text in its `<case>.err`, the directory written `$DIR` so the expected files do not depend
//! on where the tree is checked out. `LLMSCOPE_BLESS=1` rewrites the `.err` files instead.
//!
//! The gateway-config cases (`wire/tests/config_errors.rs`) and the policy-config cases
//! (`host/tests/policy_config_errors.rs`) use it; both include this file by `#[path]` rather
//! than depending on this crate, which would pull the whole host into the wire crate's tests.
//! So it uses `std` only.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test harness: a failed unwrap or a panic is a failed test"
)]

use std::collections::BTreeSet;
use std::fmt::Display;
use std::fs;
use std::path::Path;

/// Set, and neither empty nor `0`, to write the expected files instead of comparing with them.
pub const BLESS_VAR: &str = "LLMSCOPE_BLESS";

/// `err` as an expected file holds it: `dir` replaced by `$DIR`, ending in a newline.
pub fn error_text(dir: &Path, err: &dyn Display) -> String {
    let mut text = err.to_string().replace(&dir.display().to_string(), "$DIR");
    text.push('\n');
    text
}

/// Check every case in `dir`: `actual(yaml)` is the case's error text (see [`error_text`]), or
/// `None` when it loads, which always fails. Without [`BLESS_VAR`], a changed text, a `.yaml`
/// without its `.err` or a stray `.err` fails, and the panic lists every failing case; `what`
/// names the cases there (`config-error`). With it, changed `.err` files are written and stray
/// ones deleted.
pub fn check_cases(dir: &Path, what: &str, mut actual: impl FnMut(&Path) -> Option<String>) {
    let bless = std::env::var_os(BLESS_VAR).is_some_and(|v| !v.is_empty() && v != "0");
    let (yamls, errs) = cases(dir);
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
        let Some(got) = actual(&dir.join(format!("{case}.yaml"))) else {
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
        "{} of {} {what} cases failed (if the change is intended, rerun with {BLESS_VAR}=1 and \
         review the diff):\n\n{}",
        failures.len(),
        yamls.len(),
        failures.join("\n\n")
    );
}

/// The stems of the `.yaml` and of the `.err` files in `dir`; any other file, or no `.yaml`,
/// fails.
fn cases(dir: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut yamls = BTreeSet::new();
    let mut errs = BTreeSet::new();
    for entry in fs::read_dir(dir).unwrap() {
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
    (yamls, errs)
}
