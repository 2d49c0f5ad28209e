//! From a policy crate's core module to a policy component, checked against the contract.
//!
//! `cargo build --release --target wasm32-unknown-unknown` of a crate calling `export_policy!`
//! gives a core module carrying the contract's component type (wit-bindgen's custom section);
//! [`componentize`] wraps it into a component, and [`check`] refuses one that imports anything
//! but the contract's type-only interface ([`TYPES_INTERFACE`]: no WASI, clock or I/O) or that
//! does not export the policy interface ([`POLICY_INTERFACE`]). [`build`] does both.
//!
//! One implementation for both builders: `cargo xtask build-policies` (the repository's policy
//! crates) and `llmscope policy build` (any policy crate). The host loader checks the same rule
//! again, on the compiled component, when it loads a `.wasm`.

pub use llmscope_sdk::{POLICY_INTERFACE, TYPES_INTERFACE};

/// Why a module cannot become a policy component.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The module has no usable component metadata: not built from a crate calling
    /// `export_policy!`, or not a wasm module at all.
    #[error("no component metadata in the module ({0}); does the crate call export_policy!?")]
    NoMetadata(String),
    /// wit-component could not encode the component.
    #[error("componentizing: {0}")]
    Encode(String),
    /// The component's WIT could not be decoded.
    #[error("decoding the built component: {0}")]
    Decode(String),
    /// The bytes are a WIT package, not a component.
    #[error("the build produced a WIT package, not a component")]
    NotAComponent,
    /// It imports interfaces beyond the contract's types.
    #[error(
        "the component imports {}; policies may import only {TYPES_INTERFACE} (no WASI, clock or \
         I/O: build for wasm32-unknown-unknown and avoid std::time, std::fs, std::env)",
        .0.join(", ")
    )]
    ForbiddenImports(Vec<String>),
    /// It does not export the policy interface.
    #[error(
        "the component does not export {POLICY_INTERFACE}; does the crate call \
         export_policy!(YourPolicy)?"
    )]
    NoPolicyExport,
}

/// Wrap a core module into a component (validated), without checking it: see [`build`].
pub fn componentize(module: &[u8]) -> Result<Vec<u8>, Error> {
    wit_component::ComponentEncoder::default()
        .validate(true)
        .module(module)
        .map_err(|e| Error::NoMetadata(format!("{e:#}")))?
        .encode()
        .map_err(|e| Error::Encode(format!("{e:#}")))
}

/// Fail unless `component` imports nothing but [`TYPES_INTERFACE`] and exports
/// [`POLICY_INTERFACE`].
pub fn check(component: &[u8]) -> Result<(), Error> {
    let decoded =
        wit_parser::decoding::decode(component).map_err(|e| Error::Decode(format!("{e:#}")))?;
    let wit_parser::decoding::DecodedWasm::Component(resolve, world) = decoded else {
        return Err(Error::NotAComponent);
    };
    let world = &resolve.worlds[world];
    let forbidden: Vec<String> = world
        .imports
        .keys()
        .map(|key| resolve.name_world_key(key))
        .filter(|name| name != TYPES_INTERFACE)
        .collect();
    if !forbidden.is_empty() {
        return Err(Error::ForbiddenImports(forbidden));
    }
    if !world
        .exports
        .keys()
        .any(|key| resolve.name_world_key(key) == POLICY_INTERFACE)
    {
        return Err(Error::NoPolicyExport);
    }
    Ok(())
}

/// [`componentize`] then [`check`]: the component to write as `<primitive>.wasm`.
pub fn build(module: &[u8]) -> Result<Vec<u8>, Error> {
    let component = componentize(module)?;
    check(&component)?;
    Ok(component)
}

/// A command running the cargo that started us when there is one (`CARGO`), else `cargo` on
/// the PATH, without the package variables a `cargo run` or `cargo test` parent set: build
/// scripts (ring's, the bundled DuckDB's) declare `rerun-if-env-changed` on them, so a nested
/// cargo inheriting them would see "changed" values and rebuild everything above them.
pub fn cargo_command() -> std::process::Command {
    let mut cmd =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("CARGO_PKG_")
            || matches!(
                name,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
            )
            || name.starts_with("CARGO_BIN_EXE_")
        {
            cmd.env_remove(name);
        }
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_with_the_export_policy_hint() {
        let err = build(b"not wasm").unwrap_err();
        assert!(matches!(err, Error::NoMetadata(_)), "{err}");
        assert!(err.to_string().contains("export_policy!"), "{err}");
    }

    #[test]
    fn a_module_without_the_contract_exports_no_policy() {
        // The smallest valid core module: no wit-bindgen metadata, no exports.
        let empty = b"\0asm\x01\0\0\0";
        let err = build(empty).unwrap_err();
        assert_eq!(err, Error::NoPolicyExport);
        assert!(err.to_string().contains("export_policy!(YourPolicy)"));
    }
}
