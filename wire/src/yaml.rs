//! YAML into raw configuration structures, failing with one [`Problem`] that names the field
//! path. Shared by the gateway config and the host's policy config so both word YAML errors
//! alike.

use serde::de::DeserializeOwned;

use crate::Problem;

/// Deserialize `text`. On failure the problem's `at` is the field path (`(top level)` for the
/// document itself) and its message is serde_yaml's with its line and column, without the
/// (shorter) path serde_yaml prepends; YAML syntax errors are labelled as such.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Problem> {
    serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text)).map_err(|e| {
        let path = e.path().to_string();
        problem(text, &path, e.inner())
    })
}

fn problem(text: &str, path: &str, err: &serde_yaml::Error) -> Problem {
    // serde_path_to_error writes `?` for a map key it never read (a syntax error inside a map).
    let mut at = path;
    while let Some(parent) = at.strip_suffix(".?") {
        at = parent;
    }
    let at = match at {
        "" | "." | "?" => "(top level)".to_owned(),
        p => p.to_owned(),
    };
    let full = err.to_string();
    let message = match full.split_once(": ") {
        Some((prefix, rest)) if covers(prefix, path) => rest.to_owned(),
        _ => full.clone(),
    };
    // A syntax error is one the document fails with whatever it is read into.
    let syntax =
        serde_yaml::from_str::<serde_yaml::Value>(text).is_err_and(|e| e.to_string() == full);
    if !syntax {
        return Problem { at, message };
    }
    let tab_indented = err.location().is_some_and(|l| {
        text.lines()
            .nth(l.line().saturating_sub(1))
            .is_some_and(|line| line.trim_start_matches(' ').starts_with('\t'))
    });
    let hint = if tab_indented {
        "; indent with spaces, YAML does not allow tabs"
    } else if full.contains("more than one document") {
        "; remove the `---` separator and keep one document"
    } else {
        ""
    };
    Problem {
        at,
        message: format!("invalid YAML: {message}{hint}"),
    }
}

/// Whether serde_yaml's path `prefix` is `path` or one of its parents.
fn covers(prefix: &str, path: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}
