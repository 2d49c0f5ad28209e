//! The policies directory: which of its files are components, and a rule's primitive resolved to
//! its component there.

use std::path::Path;
use std::sync::Arc;

use super::component::{LoadedComponent, PolicyRuntime};

/// Whether `path` is a policy component (`<primitive>.wasm`), not an Envoy filter build
/// (`<primitive>.proxy.wasm`, a core module the host does not load).
pub fn is_component_file(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "wasm")
        && !path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".proxy.wasm"))
}

/// Names of the `.wasm` components in `dir`, sorted, for "did you mean" messages.
fn available_components(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let path = e.path();
            is_component_file(&path).then(|| path.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    names.sort();
    names
}

/// `primitive`'s component from `dir`: `<primitive>.wasm`, inside `dir` (no link out of it),
/// matching `pin` when there is one, and describing itself as `primitive`. The error is the
/// rule's problem message.
pub(super) fn load_primitive(
    primitive: &str,
    dir: &Path,
    runtime: &Arc<PolicyRuntime>,
    pin: Option<&str>,
) -> Result<Arc<LoadedComponent>, String> {
    let file = dir.join(format!("{primitive}.wasm"));
    if !file.exists() {
        let available = available_components(dir);
        return Err(format!(
            "primitive: unknown primitive `{primitive}`: no {} (components in {}: {}); build the \
             built-in ones with `cargo xtask build-policies` or copy the policy's .wasm there",
            file.display(),
            dir.display(),
            if available.is_empty() {
                "none".to_owned()
            } else {
                available.join(", ")
            }
        ));
    }
    // A link may not lead out of the policies directory: what runs is what the operator put
    // there.
    let inside = match (file.canonicalize(), dir.canonicalize()) {
        (Ok(real), Ok(root)) => real.starts_with(&root).then_some(()).ok_or(real),
        (Err(e), _) | (_, Err(e)) => {
            return Err(format!("primitive: cannot resolve {}: {e}", file.display()))
        }
    };
    if let Err(real) = inside {
        return Err(format!(
            "primitive: {} resolves to {}, outside the policies directory {}; copy the component \
             into the directory instead of linking to it",
            file.display(),
            real.display(),
            dir.display()
        ));
    }
    let component = runtime.load(&file).map_err(|e| format!("primitive: {e}"))?;
    if let Some(pin) = pin {
        if component.sha256() != pin {
            return Err(format!(
                "primitive: {} has sha256 {}, but components.{primitive}.sha256 pins {pin}; \
                 restore the pinned build or update the pin",
                file.display(),
                component.sha256()
            ));
        }
    }
    if component.info().name != primitive {
        return Err(format!(
            "primitive: {} describes itself as `{}`, not `{primitive}`; rename the file to {}.wasm \
             or use `primitive: {}`",
            file.display(),
            component.info().name,
            component.info().name,
            component.info().name
        ));
    }
    Ok(component)
}
