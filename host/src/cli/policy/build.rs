//! `llmscope policy build <dir> [--out FILE]`: any policy crate to `<primitive>.wasm`, outside
//! the repository's xtask.
//!
//! `cargo build --release --target wasm32-unknown-unknown` in the crate (no debug info, like
//! `cargo xtask build-policies`), the module found through `cargo metadata`, wrapped into a
//! component and checked by `llmscope-componentize` (the code xtask uses), then loaded by the
//! gateway's own runtime: the loader's import check and `describe()` give the primitive name,
//! which names the file, because the host loads `primitive: x` from `<policies-dir>/x.wasm`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;

use crate::cli::eprintln_safe;
use crate::policy::{valid_primitive, Limits, LoadedComponent, PolicyRuntime};

/// The target policy components are built for: no WASI, so nothing to import but the contract.
pub(super) const WASM_TARGET: &str = "wasm32-unknown-unknown";

#[derive(Debug, Args)]
pub(in crate::cli) struct BuildArgs {
    /// The policy crate's directory (the one holding its Cargo.toml).
    dir: PathBuf,
    /// Where to write the component: a file, or an existing directory to write
    /// `<primitive>.wasm` into (e.g. the gateway's policies directory). Default:
    /// `<dir>/<primitive>.wasm`.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// A built and loaded component.
pub(super) struct Built {
    /// Where it was written.
    pub(super) path: PathBuf,
    /// Loaded by the gateway's runtime: `info()` names the primitive.
    pub(super) component: Arc<LoadedComponent>,
}

impl Built {
    /// `built <path> (<primitive> <version>, N KiB, sha256 <first 16>)`.
    pub(super) fn summary(&self) -> String {
        let info = self.component.info();
        format!(
            "built {} ({} {}, {} KiB, sha256 {})",
            self.path.display(),
            info.name,
            info.version,
            self.component.size().div_ceil(1024),
            &self.component.sha256()[..16]
        )
    }
}

/// Run `llmscope policy build`.
pub(in crate::cli) fn run(args: &BuildArgs) -> Result<ExitCode> {
    let rt = Arc::new(PolicyRuntime::new(Limits::default()).context("starting the wasm runtime")?);
    let built = build(&args.dir, args.out.as_deref(), &rt)?;
    println!("{}", built.summary());
    Ok(ExitCode::SUCCESS)
}

/// Build the policy crate in `dir` and write its component to `out` (see [`BuildArgs::out`]).
/// Cargo's output goes to stderr as it comes.
pub(super) fn build(dir: &Path, out: Option<&Path>, rt: &Arc<PolicyRuntime>) -> Result<Built> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        bail!(
            "{}: no Cargo.toml; `llmscope policy build` takes a policy crate's directory (start \
             one with `llmscope policy new <name>`)",
            dir.display()
        );
    }
    // Absolute: cargo runs in `dir`, and messages should say which crate wherever we ran.
    let manifest = manifest
        .canonicalize()
        .with_context(|| format!("resolving {}", manifest.display()))?;
    let krate = PolicyCrate::of(&manifest)?;
    ensure_wasm_target(dir)?;
    eprintln_safe(&format!(
        "building {} ({}) for {WASM_TARGET}: cargo build --release",
        krate.package,
        dir.display()
    ));
    cargo_build(dir, &manifest)?;
    let module_path = krate.module_path();
    let module = std::fs::read(&module_path).with_context(|| {
        format!(
            "cargo built {} but left no {}",
            krate.package,
            module_path.display()
        )
    })?;
    let component = llmscope_componentize::build(&module).map_err(|e| {
        anyhow!(
            "{}: {} is not a policy: {e}",
            krate.package,
            module_path.display()
        )
    })?;
    // What the gateway will do with the file: the same loader (import check, contract, describe).
    let loaded = rt
        .load_bytes(&module_path, &component)
        .map_err(|e| anyhow!("{}: the gateway's loader refuses it: {e}", krate.package))?;
    let primitive = loaded.info().name.clone();
    if !valid_primitive(&primitive) {
        bail!(
            "{}: the policy's NAME is {primitive:?}, not a valid primitive name (lowercase letters, \
             digits and `_`, e.g. max_request_cost): the gateway loads `primitive: <NAME>` from \
             <NAME>.wasm",
            krate.package
        );
    }
    let file_name = format!("{primitive}.wasm");
    let dest = match out {
        None => dir.join(&file_name),
        // `--out policies/` names a directory even before it exists.
        Some(out) if out.is_dir() || out.as_os_str().to_string_lossy().ends_with('/') => {
            out.join(&file_name)
        }
        Some(out) => out.to_owned(),
    };
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&dest, &component).with_context(|| format!("writing {}", dest.display()))?;
    if dest.file_name().is_some_and(|n| *n != *file_name) {
        eprintln_safe(&format!(
            "note: the gateway loads `primitive: {primitive}` from {file_name} in its policies \
             directory; {} will not be found under its name",
            dest.display()
        ));
    }
    Ok(Built {
        path: dest,
        component: loaded,
    })
}

/// What `cargo metadata` says about the policy crate.
#[derive(Debug)]
struct PolicyCrate {
    package: String,
    /// The cdylib's name (`-` already `_`): the module is `<lib>.wasm`.
    lib: String,
    target_dir: PathBuf,
}

impl PolicyCrate {
    fn of(manifest: &Path) -> Result<Self> {
        let mut cmd = llmscope_componentize::cargo_command();
        cmd.args(["metadata", "--format-version", "1", "--no-deps"])
            .arg("--manifest-path")
            .arg(manifest);
        // From the crate's directory, as the build runs: a `.cargo/config.toml` there (its
        // `build.target-dir`, say) must apply to both, or the module is looked for elsewhere.
        if let Some(dir) = manifest.parent().filter(|d| !d.as_os_str().is_empty()) {
            cmd.current_dir(dir);
        }
        let out = cmd
            .output()
            .with_context(|| format!("running {cmd:?} (is cargo installed?)"))?;
        if !out.status.success() {
            bail!(
                "cargo metadata failed for {} ({}):\n{}",
                manifest.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        let metadata: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parsing `cargo metadata` output")?;
        Self::from_metadata(&metadata, manifest)
    }

    /// The package whose manifest is `manifest`, from `cargo metadata --no-deps` JSON.
    fn from_metadata(metadata: &serde_json::Value, manifest: &Path) -> Result<Self> {
        let wanted = manifest
            .canonicalize()
            .with_context(|| format!("resolving {}", manifest.display()))?;
        let same = |p: &str| Path::new(p).canonicalize().is_ok_and(|p| p == wanted);
        let package = metadata["packages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["manifest_path"].as_str().is_some_and(same))
            .with_context(|| {
                format!(
                    "{} declares no package (a workspace?); pass the policy crate's own directory",
                    manifest.display()
                )
            })?;
        let name = package["name"].as_str().unwrap_or_default().to_owned();
        let lib = package["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| {
                t["crate_types"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "cdylib"))
            })
            .and_then(|t| t["name"].as_str())
            .with_context(|| {
                format!(
                    "{name}: no cdylib; a policy crate's Cargo.toml needs `[lib] crate-type = \
                     [\"cdylib\", \"rlib\"]` (cdylib: the wasm module; rlib: its native tests)"
                )
            })?
            .replace('-', "_");
        let target_dir = metadata["target_directory"]
            .as_str()
            .map(PathBuf::from)
            .context("cargo metadata gave no target_directory")?;
        Ok(Self {
            package: name,
            lib,
            target_dir,
        })
    }

    fn module_path(&self) -> PathBuf {
        self.target_dir
            .join(WASM_TARGET)
            .join("release")
            .join(format!("{}.wasm", self.lib))
    }
}

/// `cargo build` for the wasm target in `dir`, its stderr passed through (and kept, to recognise
/// a missing target).
fn cargo_build(dir: &Path, manifest: &Path) -> Result<()> {
    let mut cmd = llmscope_componentize::cargo_command();
    cmd.current_dir(dir)
        .args(["build", "--release", "--lib", "--target", WASM_TARGET])
        // As `cargo xtask build-policies` builds the repository's policies: no debug info in
        // the component, whatever the crate's profile says.
        .args(["--config", "profile.release.debug=false"])
        .arg("--manifest-path")
        .arg(manifest)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {cmd:?} (is cargo installed?)"))?;
    let mut output = String::new();
    if let Some(stderr) = child.stderr.take() {
        let mut err = std::io::stderr();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(err, "{line}");
            output.push_str(&line);
            output.push('\n');
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {cmd:?}"))?;
    if status.success() {
        return Ok(());
    }
    if missing_target(&output) {
        bail!("{}", missing_target_message());
    }
    bail!(
        "cargo build failed in {} ({status}); its output is above",
        dir.display()
    );
}

/// Fail early, with the fix, when the toolchain that builds in `dir` has no wasm32 target.
fn ensure_wasm_target(dir: &Path) -> Result<()> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc)
        .current_dir(dir)
        .args(["--print", "target-libdir", "--target", WASM_TARGET])
        .output();
    // No rustc to ask: cargo will say what is wrong (see `missing_target`).
    let Some(out) = out.ok().filter(|o| o.status.success()) else {
        return Ok(());
    };
    let libdir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if libdir.is_dir() {
        return Ok(());
    }
    bail!("{}", missing_target_message());
}

fn missing_target_message() -> String {
    format!(
        "the {WASM_TARGET} target is not installed for this toolchain; install it with \
         `rustup target add {WASM_TARGET}` (in the policy crate's directory, if it pins a toolchain)"
    )
}

/// Whether cargo's output says the wasm target's standard library is missing.
fn missing_target(output: &str) -> bool {
    output.contains(&format!("the `{WASM_TARGET}` target may not be installed"))
        || (output.contains("can't find crate for `core`") && output.contains(WASM_TARGET))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_crate_is_the_package_of_the_manifest_with_its_cdylib() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("Cargo.toml");
        std::fs::write(&manifest, "").unwrap();
        let metadata = serde_json::json!({
            "target_directory": "/t",
            "packages": [
                {"name": "other", "manifest_path": "/nowhere/Cargo.toml", "targets": []},
                {"name": "spend-cap", "manifest_path": manifest.display().to_string(), "targets": [
                    {"name": "spend_cap", "kind": ["cdylib", "rlib"], "crate_types": ["cdylib", "rlib"]}
                ]}
            ]
        });
        let krate = PolicyCrate::from_metadata(&metadata, &manifest).unwrap();
        assert_eq!(krate.package, "spend-cap");
        assert_eq!(
            krate.module_path(),
            Path::new("/t/wasm32-unknown-unknown/release/spend_cap.wasm")
        );
    }

    #[test]
    fn a_crate_without_cdylib_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("Cargo.toml");
        std::fs::write(&manifest, "").unwrap();
        let metadata = serde_json::json!({
            "target_directory": "/t",
            "packages": [{"name": "p", "manifest_path": manifest.display().to_string(), "targets": [
                {"name": "p", "kind": ["lib"], "crate_types": ["lib"]}
            ]}]
        });
        let err = PolicyCrate::from_metadata(&metadata, &manifest).unwrap_err();
        assert!(
            err.to_string()
                .contains("crate-type = [\"cdylib\", \"rlib\"]"),
            "{err}"
        );
        let none = serde_json::json!({"target_directory": "/t", "packages": []});
        let err = PolicyCrate::from_metadata(&none, &manifest).unwrap_err();
        assert!(err.to_string().contains("declares no package"), "{err}");
    }

    #[test]
    fn a_missing_wasm_target_is_recognised_in_cargo_output() {
        let rustc = "error[E0463]: can't find crate for `core`\n  |\n  = note: the \
                     `wasm32-unknown-unknown` target may not be installed\n  = help: consider \
                     downloading the target with `rustup target add wasm32-unknown-unknown`";
        assert!(missing_target(rustc));
        assert!(!missing_target(
            "error[E0425]: cannot find value `x` in this scope"
        ));
        assert!(missing_target_message().contains("rustup target add wasm32-unknown-unknown"));
    }
}
