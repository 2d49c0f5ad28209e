//! `llmscope policy new <name> [--dir D] [--sdk PATH | GIT-URL[#REF]]`: scaffold a policy crate
//! that builds (`llmscope policy build`) and passes its own tests (`cargo test`, `llmscope policy
//! test`) as generated.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;

/// The SDK's git source when `--sdk` is not given: this project's repository at this version's
/// tag.
const REPOSITORY: &str = env!("CARGO_PKG_REPOSITORY");
const VERSION: &str = env!("CARGO_PKG_VERSION");

const CARGO_TOML: &str = include_str!("scaffold/Cargo.toml.tmpl");
const LIB_RS: &str = include_str!("scaffold/lib.rs.tmpl");
const CASES_YAML: &str = include_str!("scaffold/cases.yaml.tmpl");
const README_MD: &str = include_str!("scaffold/README.md.tmpl");
const GITIGNORE: &str = include_str!("scaffold/gitignore.tmpl");

#[derive(Debug, Args)]
pub(in crate::cli) struct NewArgs {
    /// The policy's name, which is its primitive name in the policy YAML: lowercase letters,
    /// digits and `_` or `-`, starting with a letter (`max_request_cost` or `max-request-cost`:
    /// primitive `max_request_cost`, crate `max-request-cost`).
    name: String,
    /// Directory to create the crate in (it may exist if empty). Default: `./<crate name>`.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The llmscope-sdk dependency: a path to the SDK (the repository's `guest-sdk/`, or the
    /// repository itself), or a git URL with an optional `#tag=T`, `#branch=B`, `#rev=R` (a bare
    /// `#T` is a tag). Default: this project's repository at tag v<version>.
    #[arg(long, value_name = "PATH | GIT-URL[#REF]")]
    sdk: Option<String>,
}

/// Run `llmscope policy new`.
pub(in crate::cli) fn run(args: &NewArgs) -> Result<ExitCode> {
    let names = Names::parse(&args.name)?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&names.krate));
    let sdk = match &args.sdk {
        Some(spec) => Sdk::parse(spec)?,
        None => Sdk::default_git(),
    };
    let written = scaffold(&names, &dir, &sdk)?;
    let shown = dir.display();
    println!(
        "created policy crate `{}` (primitive `{}`) in {shown}: {}",
        names.krate,
        names.primitive,
        written.join(", ")
    );
    println!("next:");
    println!("  (cd {shown} && cargo test)        # the native tests");
    println!(
        "  llmscope policy build {shown}     # -> {shown}/{}.wasm",
        names.primitive
    );
    println!("  llmscope policy test {shown}      # its cases.yaml against the built component");
    Ok(ExitCode::SUCCESS)
}

/// A policy's names, from the one the user gave.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Names {
    /// The primitive (`NAME`, the file stem, the YAML's `primitive:`): `max_request_cost`.
    primitive: String,
    /// The package: `max-request-cost`.
    krate: String,
    /// The Rust type implementing `Policy`: `MaxRequestCost`.
    type_name: String,
}

/// Names that cannot be a crate (Rust keywords, the standard crates, the policy's own
/// dependencies).
const RESERVED: &[&str] = &[
    "abstract",
    "alloc",
    "as",
    "async",
    "await",
    "become",
    "box",
    "break",
    "const",
    "continue",
    "core",
    "crate",
    "do",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "final",
    "fn",
    "for",
    "gen",
    "if",
    "impl",
    "in",
    "let",
    "llmscope_sdk",
    "loop",
    "macro",
    "match",
    "mod",
    "move",
    "mut",
    "override",
    "priv",
    "proc_macro",
    "pub",
    "ref",
    "return",
    "self",
    "serde",
    "serde_json",
    "static",
    "std",
    "struct",
    "super",
    "test",
    "trait",
    "true",
    "try",
    "type",
    "typeof",
    "unsafe",
    "unsized",
    "use",
    "virtual",
    "where",
    "while",
    "yield",
];

/// Type names the generated code already uses (the SDK's prelude, `Settings`): the policy's type
/// gets a `Policy` suffix instead of shadowing one.
const TAKEN_TYPES: &[&str] = &[
    "Aggregate",
    "AggregateValue",
    "Aggregation",
    "Decision",
    "Deserialize",
    "Harness",
    "Info",
    "Metric",
    "Policy",
    "RequestContext",
    "Scope",
    "Settings",
    "Snapshot",
    "TierEstimate",
    "Verdict",
    "Window",
];

impl Names {
    fn parse(name: &str) -> Result<Self> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
            && !name.ends_with(['_', '-'])
            && !name.contains("--")
            && !name.contains("__")
            && !name.contains("_-")
            && !name.contains("-_");
        if !valid {
            bail!(
                "invalid policy name {name:?}: use lowercase letters, digits and single `_` or \
                 `-` between them, starting with a letter and at most 64 characters, e.g. \
                 `max_request_cost` (the primitive name policy YAML names; the crate is then \
                 `max-request-cost`)"
            );
        }
        let primitive = name.replace('-', "_");
        if RESERVED.contains(&primitive.as_str()) {
            bail!(
                "invalid policy name {name:?}: `{primitive}` is reserved in Rust or taken by a \
                 dependency; pick another, e.g. `{primitive}_policy`"
            );
        }
        let mut type_name: String = primitive
            .split('_')
            .map(|part| {
                let mut chars = part.chars();
                chars.next().map_or_else(String::new, |first| {
                    first.to_ascii_uppercase().to_string() + chars.as_str()
                })
            })
            .collect();
        if TAKEN_TYPES.contains(&type_name.as_str()) {
            type_name.push_str("Policy");
        }
        Ok(Self {
            krate: primitive.replace('_', "-"),
            primitive,
            type_name,
        })
    }
}

/// Where the scaffold's llmscope-sdk comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sdk {
    /// A local checkout: the SDK crate's directory (absolute).
    Path(PathBuf),
    /// A git repository, at a reference (`tag`, `branch` or `rev`), or its default branch.
    Git {
        url: String,
        reference: Option<(&'static str, String)>,
    },
}

impl Sdk {
    fn default_git() -> Self {
        Self::Git {
            url: REPOSITORY.to_owned(),
            reference: Some(("tag", format!("v{VERSION}"))),
        }
    }

    fn parse(spec: &str) -> Result<Self> {
        let spec = spec.trim();
        let is_url = [
            "https://", "http://", "ssh://", "git://", "file://", "git@", "git+",
        ]
        .iter()
        .any(|p| spec.starts_with(p));
        if is_url {
            let spec = spec.strip_prefix("git+").unwrap_or(spec);
            let (url, reference) = match spec.split_once('#') {
                None => (spec, None),
                Some((url, reference)) => {
                    let (kind, value) = match reference.split_once('=') {
                        Some(("tag", v)) => ("tag", v),
                        Some(("branch", v)) => ("branch", v),
                        Some(("rev", v)) => ("rev", v),
                        Some((other, _)) => bail!(
                            "--sdk {spec}: unknown git reference kind `{other}`; use #tag=T, \
                             #branch=B or #rev=R"
                        ),
                        None => ("tag", reference),
                    };
                    if value.is_empty() {
                        bail!("--sdk {spec}: empty git reference after `#`");
                    }
                    (url, Some((kind, value.to_owned())))
                }
            };
            return Ok(Self::Git {
                url: url.to_owned(),
                reference,
            });
        }
        let path = Path::new(spec);
        let crate_dir = [path.join("guest-sdk"), path.to_owned()]
            .into_iter()
            .find(|dir| is_sdk(dir))
            .with_context(|| {
                format!(
                    "--sdk {spec}: no llmscope-sdk crate there (nor in {spec}/guest-sdk); give \
                     the path of the repository's guest-sdk/ or a git URL"
                )
            })?;
        let crate_dir = crate_dir
            .canonicalize()
            .with_context(|| format!("resolving {}", crate_dir.display()))?;
        Ok(Self::Path(crate_dir))
    }

    /// The dependency's TOML value.
    fn toml(&self) -> String {
        match self {
            Self::Path(dir) => format!("{{ path = {} }}", toml_string(&dir.to_string_lossy())),
            Self::Git { url, reference } => {
                let mut out = format!("{{ git = {}", toml_string(url));
                if let Some((kind, value)) = reference {
                    out.push_str(&format!(", {kind} = {}", toml_string(value)));
                }
                out.push_str(" }");
                out
            }
        }
    }

    /// The lock file of the workspace a local SDK belongs to: the versions it is built and tested
    /// with, so the new crate resolves the same (and needs no registry index to start).
    fn lock_file(&self) -> Option<PathBuf> {
        let Self::Path(dir) = self else { return None };
        dir.ancestors()
            .map(|d| d.join("Cargo.lock"))
            .find(|f| f.is_file())
    }
}

/// Whether `dir` holds the llmscope-sdk crate.
fn is_sdk(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|text| {
        text.lines()
            .map(|l| l.split_whitespace().collect::<String>())
            .any(|l| l == "name=\"llmscope-sdk\"")
    })
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The files of the crate, by path relative to its directory.
fn files(names: &Names, sdk: &Sdk) -> Vec<(&'static str, String)> {
    let fill = |template: &str| {
        template
            .replace("{{crate}}", &names.krate)
            .replace("{{primitive}}", &names.primitive)
            .replace("{{Type}}", &names.type_name)
            .replace("{{sdk}}", &sdk.toml())
    };
    vec![
        ("Cargo.toml", fill(CARGO_TOML)),
        ("src/lib.rs", fill(LIB_RS)),
        ("cases.yaml", fill(CASES_YAML)),
        ("README.md", fill(README_MD)),
        (".gitignore", fill(GITIGNORE)),
    ]
}

/// Write the crate into `dir` (created; refused when it exists and is not empty). Returns the
/// files written.
fn scaffold(names: &Names, dir: &Path, sdk: &Sdk) -> Result<Vec<String>> {
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir)
            .with_context(|| format!("{} exists and cannot be read", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} exists and is not empty; refusing to overwrite it (pick another --dir, or \
                 remove it)",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for (path, text) in files(names, sdk) {
        let file = dir.join(path);
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        written.push(path.to_owned());
    }
    if let Some(lock) = sdk.lock_file() {
        let file = dir.join("Cargo.lock");
        std::fs::copy(&lock, &file)
            .with_context(|| format!("copying {} to {}", lock.display(), file.display()))?;
        written.push(format!("Cargo.lock (from {})", lock.display()));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_either_separator_and_derive_the_rest() {
        let n = Names::parse("max-request-cost").unwrap();
        assert_eq!(
            n,
            Names {
                primitive: "max_request_cost".into(),
                krate: "max-request-cost".into(),
                type_name: "MaxRequestCost".into(),
            }
        );
        assert_eq!(Names::parse("max_request_cost").unwrap(), n);
        assert_eq!(Names::parse("cap2").unwrap().type_name, "Cap2");
        assert_eq!(Names::parse("v2_cap").unwrap().type_name, "V2Cap");
        // A type name the generated code uses gets a suffix.
        assert_eq!(
            Names::parse("settings").unwrap().type_name,
            "SettingsPolicy"
        );
        assert_eq!(Names::parse("verdict").unwrap().type_name, "VerdictPolicy");
    }

    #[test]
    fn bad_names_are_refused_with_what_a_name_is() {
        for bad in [
            "",
            "Max",
            "2cap",
            "_cap",
            "cap_",
            "a--b",
            "a__b",
            "a-_b",
            "max request",
            "a/b",
            "a.b",
            "ünï",
        ] {
            let err = Names::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with("invalid policy name"), "{bad:?}: {err}");
            assert!(err.contains("e.g. `max_request_cost`"), "{err}");
        }
        assert!(Names::parse(&"a".repeat(65)).is_err());
        let err = Names::parse("match").unwrap_err().to_string();
        assert!(err.contains("reserved"), "{err}");
        assert!(Names::parse("serde-json").is_err());
    }

    #[test]
    fn the_sdk_is_a_git_spec_or_a_local_checkout() {
        assert_eq!(
            Sdk::default_git().toml(),
            format!("{{ git = \"{REPOSITORY}\", tag = \"v{VERSION}\" }}")
        );
        assert!(REPOSITORY.starts_with("https://"));
        let git = |s: &str| Sdk::parse(s).unwrap().toml();
        assert_eq!(
            git("https://example.org/x.git"),
            "{ git = \"https://example.org/x.git\" }"
        );
        assert_eq!(
            git("https://example.org/x#v1.2.0"),
            "{ git = \"https://example.org/x\", tag = \"v1.2.0\" }"
        );
        assert_eq!(
            git("git+ssh://git@example.org/x#branch=main"),
            "{ git = \"ssh://git@example.org/x\", branch = \"main\" }"
        );
        assert_eq!(
            git("https://example.org/x#rev=abc123"),
            "{ git = \"https://example.org/x\", rev = \"abc123\" }"
        );
        assert!(Sdk::parse("https://example.org/x#sha=1").is_err());

        // This repository: the checkout itself or its guest-sdk/.
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let sdk = repo.join("guest-sdk").canonicalize().unwrap();
        for spec in [repo.to_path_buf(), repo.join("guest-sdk")] {
            assert_eq!(
                Sdk::parse(&spec.to_string_lossy()).unwrap(),
                Sdk::Path(sdk.clone())
            );
        }
        assert_eq!(
            Sdk::Path(sdk.clone()).lock_file(),
            Some(repo.canonicalize().unwrap().join("Cargo.lock"))
        );
        let err = Sdk::parse("/nonexistent/sdk").unwrap_err().to_string();
        assert!(err.contains("no llmscope-sdk crate there"), "{err}");
        assert_eq!(toml_string("a\"b\\c"), r#""a\"b\\c""#);
    }

    #[test]
    fn the_scaffold_is_filled_in_and_never_overwrites() {
        let names = Names::parse("spend_cap").unwrap();
        let sdk = Sdk::default_git();
        let files = files(&names, &sdk);
        let text = |path: &str| &files.iter().find(|(p, _)| *p == path).unwrap().1;
        assert!(text("Cargo.toml").contains("name = \"spend-cap\""));
        assert!(text("Cargo.toml").contains("\n[workspace]\n"));
        assert!(text("Cargo.toml").contains("crate-type = [\"cdylib\", \"rlib\"]"));
        assert!(text("Cargo.toml").contains(&format!("llmscope-sdk = {}", sdk.toml())));
        assert!(text("src/lib.rs").contains("pub struct SpendCap;"));
        assert!(text("src/lib.rs").contains("const NAME: &'static str = \"spend_cap\";"));
        assert!(text("src/lib.rs").contains("export_policy!(SpendCap);"));
        for (path, body) in &files {
            assert!(!body.contains("{{"), "{path} has an unfilled placeholder");
        }

        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("spend-cap");
        let written = scaffold(&names, &target, &sdk).unwrap();
        assert_eq!(
            written,
            [
                "Cargo.toml",
                "src/lib.rs",
                "cases.yaml",
                "README.md",
                ".gitignore"
            ]
        );
        let err = scaffold(&names, &target, &sdk).unwrap_err().to_string();
        assert!(
            err.contains("exists and is not empty; refusing to overwrite"),
            "{err}"
        );
        // An empty directory is fine.
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        scaffold(&names, &empty, &sdk).unwrap();
    }

    #[test]
    fn the_case_file_of_the_scaffold_parses() {
        let names = Names::parse("spend_cap").unwrap();
        let files = files(&names, &Sdk::default_git());
        let cases = &files.iter().find(|(p, _)| *p == "cases.yaml").unwrap().1;
        let parsed = super::super::test::parse(cases, Path::new("cases.yaml")).unwrap();
        assert_eq!(parsed.len(), 10);
    }
}
