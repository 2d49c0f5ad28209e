//! `cargo xtask`: developer and CI tasks for the llmscope workspace.
//!
//! - `build-policies`: compile every guest crate for `wasm32-unknown-unknown`, wrap each module
//!   into a component, refuse any import beyond the llmscope contract, and write the components
//!   where the host and the tests look for them.
//! - `test`: `build-policies`, then the whole test suite (release profile, like everything).
//! - `demo`: `build-policies`, then the main job from the README.
//! - `bench`: every benchmark, then one markdown table of metric, goal, measured, command.
//! - `envoy-demo`, `bench-envoy`: the policies as proxy-wasm filters in a real Envoy.
//! - `bench-streams`: streamed chat through the gateway vs straight to the mock upstream.
//! - `bench-replicas`: the gateway with budgets shared through Redis vs kept locally.
//! - `root`: print the workspace xtask works on, found at run time (see [`workspace_root`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod envoy;
mod gen;
mod load;
mod otel;
mod replay_bench;
mod replicas;
mod streams;
mod suite;

#[derive(Parser)]
#[command(about = "llmscope developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build all policy components (and the test fixtures) from source.
    BuildPolicies,
    /// Build the components, then run every test in the workspace.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the components and serve the demo gateway (mock provider) on 127.0.0.1:8080.
    Demo,
    /// Run every benchmark and print one markdown table (metric, goal, measured, command).
    Bench {
        /// Largest telemetry size for the engine benchmarks (also run at 1k and 1M rows).
        #[arg(long, default_value_t = 10_000_000)]
        rows: u64,
        /// Seconds per load measurement.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Request rate of the Envoy comparison.
        #[arg(long, default_value_t = 500.0)]
        envoy_rate: f64,
        /// New streams per second of the streaming first-byte measurement.
        #[arg(long, default_value_t = 1000.0)]
        stream_rate: f64,
    },
    /// Write synthetic telemetry and decision logs.
    GenTelemetry {
        /// Rows to write (each log).
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// Output directory.
        #[arg(long, default_value = "artifacts/bench")]
        out: PathBuf,
    },
    /// Benchmark the DuckDB engine at 1k rows and at `--rows`.
    BenchEngine {
        /// Rows of the large run.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
    },
    /// Build everything and run the Envoy example: host on :8080, mock upstream on :9000,
    /// Envoy with the seed demo namespace as three proxy-wasm filters on :10000.
    EnvoyDemo,
    /// Added latency of the Envoy filter chain: the same Envoy with and without the filters.
    BenchEnvoy {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Requests per second (open loop).
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
    },
    /// `llmscope policy replay` of `--rows` synthetic logged requests with the seed's rules.
    BenchReplay {
        /// Logged requests to replay.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
    },
    /// Streamed chat through the gateway vs straight to `llmscope mock-upstream`: time to first
    /// byte (p50/p99, open loop) and chunks per second through one connection.
    BenchStreams {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// New streams per second (open loop).
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Benchmark this `llmscope` binary instead of building the tree's (no build).
        #[arg(long)]
        bin: Option<PathBuf>,
    },
    /// The gateway with `budgets.backend: redis` (a redis-server started on a free port) vs
    /// `local`, in the same run: latency at a fixed rate (open loop) and max rps (closed loop).
    BenchReplicas {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Requests per second of the latency measurement (open loop).
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Benchmark this `llmscope` binary instead of building the tree's (no build).
        #[arg(long)]
        bin: Option<PathBuf>,
    },
    /// The gateway's throughput with OpenTelemetry traces and metrics exported over OTLP/HTTP
    /// (to a local sink) vs off, in the same run.
    BenchOtel {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Keep-alive connections.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Benchmark this `llmscope` binary instead of building the tree's (no build).
        #[arg(long)]
        bin: Option<PathBuf>,
    },
    /// Load-test the gateway (`/infer`, mock provider, 3 rules): max rps and latency at 1k/5k rps.
    BenchGateway {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Keep-alive connections.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Also load-test this `llmscope` binary (e.g. a build of an earlier commit), in the
        /// same run and on the same config, and print both tables.
        #[arg(long)]
        compare: Option<PathBuf>,
    },
    /// Print the workspace root xtask works on (CI checks it is the clone xtask runs in).
    Root,
}

/// Where each guest crate's component goes, relative to the workspace root.
struct Guest {
    package: &'static str,
    dest_dir: &'static str,
    /// File stem of the component: the primitive name the YAML uses.
    primitive: &'static str,
}

/// Guests built for `wasm32-unknown-unknown` and componentized here.
const GUESTS: &[Guest] = &[
    Guest {
        package: "budget-threshold",
        dest_dir: "policies",
        primitive: "budget_threshold",
    },
    Guest {
        package: "route-preference",
        dest_dir: "policies",
        primitive: "route_preference",
    },
    Guest {
        package: "cost-anomaly",
        dest_dir: "policies",
        primitive: "cost_anomaly",
    },
    Guest {
        package: "max-request-cost",
        dest_dir: "examples/policies/max-request-cost",
        primitive: "max_request_cost",
    },
    Guest {
        package: "hostile-policy",
        dest_dir: "tests/fixtures/components",
        primitive: "hostile",
    },
];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.task {
        Task::Root => {
            println!("{}", root.display());
            Ok(())
        }
        Task::BuildPolicies => build_policies(&root),
        Task::Test { args } => {
            // The integration tests drive the real binary; `cargo test` alone would not rebuild it.
            build_all(&root)?;
            let mut cmd = cargo(&root);
            cmd.args(["test", "--release", "--workspace", "--no-fail-fast"]);
            if !args.is_empty() {
                cmd.arg("--").args(args);
            }
            run(cmd)
        }
        Task::Demo => {
            build_all(&root)?;
            demo(&root)
        }
        Task::Bench {
            rows,
            seconds,
            envoy_rate,
            stream_rate,
        } => {
            build_all(&root)?;
            suite::run(
                &root,
                &target_dir(&root).join("release/llmscope"),
                &suite::Options {
                    rows,
                    seconds,
                    envoy_rate,
                    stream_rate,
                },
            )
        }
        Task::GenTelemetry { rows, out } => {
            let out = if out.is_absolute() {
                out
            } else {
                root.join(out)
            };
            gen::generate(&out, rows)?;
            println!(
                "wrote {rows} telemetry and decision lines to {}",
                out.display()
            );
            Ok(())
        }
        Task::BenchEngine { rows } => {
            build_policies(&root)?;
            let mut results = Vec::new();
            for n in [1_000, rows] {
                let dir = std::env::temp_dir().join(format!("llmscope-bench-{n}"));
                gen::generate(&dir, n)?;
                let r = suite::bench(&root, "engine", &[("LLMSCOPE_BENCH_DATA", &dir)]);
                let _ = std::fs::remove_dir_all(&dir);
                results.push((n, r?.get("decision_p99_us").copied()));
            }
            if let [(small, Some(a)), (large, Some(b))] = results[..] {
                println!(
                    "
decision p99 at {large} rows / at {small} rows: {:.2} (goal <= 1.2)",
                    b / a
                );
            }
            Ok(())
        }
        Task::EnvoyDemo => {
            build_all(&root)?;
            envoy::demo(&root, &target_dir(&root).join("release/llmscope"))
        }
        Task::BenchEnvoy { seconds, rate } => {
            build_all(&root)?;
            envoy::bench(
                &root,
                &target_dir(&root).join("release/llmscope"),
                seconds,
                rate,
            )
        }
        Task::BenchReplay { rows } => {
            build_all(&root)?;
            let r = replay_bench::run(&root, &target_dir(&root).join("release/llmscope"), rows)?;
            println!(
                "policy replay of {} logged requests (seed rules): {:.1} s (goal for 1M: <= {} s)",
                r.replayed,
                r.seconds,
                replay_bench::GOAL_S
            );
            Ok(())
        }
        Task::BenchStreams { seconds, rate, bin } => {
            let bin = bench_binary(&root, bin)?;
            streams::bench_streams(&root, &bin, seconds, rate)
        }
        Task::BenchReplicas { seconds, rate, bin } => {
            let bin = bench_binary(&root, bin)?;
            replicas::bench_replicas(&root, &bin, seconds, rate)
        }
        Task::BenchOtel {
            seconds,
            connections,
            bin,
        } => {
            let bin = bench_binary(&root, bin)?;
            otel::bench_otel(&root, &bin, seconds, connections)
        }
        Task::BenchGateway {
            seconds,
            connections,
            compare,
        } => {
            build_all(&root)?;
            if let Some(other) = compare {
                println!("== {}", other.display());
                load::bench_gateway(&root, &other, seconds, connections)?;
                println!("\n== this tree's build");
            }
            load::bench_gateway(
                &root,
                &target_dir(&root).join("release/llmscope"),
                seconds,
                connections,
            )
        }
    }
}

/// The policies (components and filters) and the release binaries.
fn build_all(root: &Path) -> Result<()> {
    build_policies(root)?;
    let mut build = cargo(root);
    build.args(["build", "--release", "--workspace", "--bins"]);
    run(build)
}

/// The workspace xtask runs in, found at run time.
///
/// Never the compile-time value of `CARGO_MANIFEST_DIR` (the `env!` macro): with a target
/// directory shared between clones, cargo may reuse an xtask built in another clone, which would
/// then build and test that other clone.
fn workspace_root() -> Result<PathBuf> {
    let root = root_from(|name| std::env::var_os(name), locate_workspace)?;
    if !root.join("Cargo.toml").is_file() {
        bail!(
            "{}: no Cargo.toml; not the llmscope workspace",
            root.display()
        );
    }
    Ok(root)
}

/// [`workspace_root`] over an environment lookup and a fallback: `cargo run` (what `cargo xtask`
/// is) sets `CARGO_PKG_NAME` and `CARGO_MANIFEST_DIR` for the process it starts, so when they
/// name xtask the workspace is the parent of xtask's directory; otherwise (the binary started
/// some other way) ask `locate`.
fn root_from(
    env: impl Fn(&str) -> Option<OsString>,
    locate: impl FnOnce() -> Result<PathBuf>,
) -> Result<PathBuf> {
    let from_cargo_run = env("CARGO_PKG_NAME").is_some_and(|name| name == "xtask");
    if let (true, Some(dir)) = (from_cargo_run, env("CARGO_MANIFEST_DIR")) {
        let dir = PathBuf::from(dir);
        return dir.parent().map(Path::to_path_buf).with_context(|| {
            format!(
                "CARGO_MANIFEST_DIR={}: xtask must live one level below the workspace root",
                dir.display()
            )
        });
    }
    locate().context(
        "cannot find the llmscope workspace: run xtask as `cargo xtask ...` from inside the \
         repository (CARGO_MANIFEST_DIR is not set, and `cargo locate-project --workspace` \
         failed)",
    )
}

/// The workspace around the current directory, from `cargo locate-project --workspace`.
fn locate_workspace() -> Result<PathBuf> {
    let mut cmd = llmscope_componentize::cargo_command();
    cmd.args(["locate-project", "--workspace", "--message-format", "plain"]);
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let manifest = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    manifest
        .parent()
        .filter(|_| manifest.is_absolute())
        .map(Path::to_path_buf)
        .with_context(|| {
            format!(
                "{cmd:?} printed {}, not a Cargo.toml path",
                manifest.display()
            )
        })
}

/// `cargo` in `root`, with the caller's environment (see [`cargo_command`]).
pub(crate) fn cargo(root: &Path) -> Command {
    let mut cmd = llmscope_componentize::cargo_command();
    cmd.current_dir(root);
    cmd
}

/// The binary a benchmark runs: `bin` as given (the policies built for it), else the tree's
/// own, built first.
fn bench_binary(root: &Path, bin: Option<PathBuf>) -> Result<PathBuf> {
    match bin {
        Some(bin) => {
            build_policies(root)?;
            Ok(bin)
        }
        None => {
            build_all(root)?;
            Ok(target_dir(root).join("release/llmscope"))
        }
    }
}

fn run(mut cmd: Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

/// Every host-target cargo invocation selects the whole workspace: features are unified over
/// the selected packages, so `-p llmscope` and `--workspace` would resolve different feature sets
/// and rebuild the bundled DuckDB (20 minutes) for each.
///
/// Wasm targets the guests are built for.
const WASM_TARGETS: &[&str] = &["wasm32-unknown-unknown", "wasm32-wasip1", "wasm32-wasip2"];

/// Make sure the wasm targets are installed (a no-op when they are).
fn ensure_targets() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    let Ok(out) = installed else {
        // No rustup: assume a toolchain that ships the targets; the build will say if not.
        return Ok(());
    };
    let have = String::from_utf8_lossy(&out.stdout).into_owned();
    let missing: Vec<&str> = WASM_TARGETS
        .iter()
        .copied()
        .filter(|t| !have.lines().any(|l| l.trim() == *t))
        .collect();
    if !missing.is_empty() {
        let mut cmd = Command::new("rustup");
        cmd.args(["target", "add"]).args(&missing);
        run(cmd).context("installing the wasm targets with rustup")?;
    }
    Ok(())
}

fn build_policies(root: &Path) -> Result<()> {
    ensure_targets()?;
    let packages: Vec<&str> = GUESTS.iter().map(|g| g.package).collect();
    cargo_build_guests(root, "wasm32-unknown-unknown", &packages)?;

    let out = target_dir(root).join("wasm32-unknown-unknown/release");
    for guest in GUESTS {
        let artifact = guest.package.replace('-', "_");
        let module_path = out.join(format!("{artifact}.wasm"));
        let module = std::fs::read(&module_path)
            .with_context(|| format!("reading {}", module_path.display()))?;
        // The same componentize-and-check as `llmscope policy build` (llmscope-componentize).
        let component = llmscope_componentize::build(&module)
            .with_context(|| format!("{}: building the component", guest.package))?;
        let dest_dir = root.join(guest.dest_dir);
        std::fs::create_dir_all(&dest_dir)?;
        let dest = dest_dir.join(format!("{}.wasm", guest.primitive));
        std::fs::write(&dest, &component).with_context(|| format!("writing {}", dest.display()))?;
        println!(
            "built {} ({} KiB)",
            dest.strip_prefix(root).unwrap_or(&dest).display(),
            component.len() / 1024
        );
    }

    build_proxy_filters(root)?;

    // A fixture that must be rejected: the hostile policy built for wasm32-wasip2 imports WASI.
    cargo_build_guests(root, "wasm32-wasip2", &["hostile-policy"])?;
    let wasi = target_dir(root).join("wasm32-wasip2/release/hostile_policy.wasm");
    let dest = root.join("tests/fixtures/components/hostile_wasi.wasm");
    std::fs::copy(&wasi, &dest).with_context(|| format!("copying {}", wasi.display()))?;
    println!(
        "built {} (imports WASI on purpose)",
        dest.strip_prefix(root).unwrap_or(&dest).display()
    );
    Ok(())
}

/// The same policy crates as Envoy filters: `wasm32-wasip1` core modules with the SDK's
/// `proxy-wasm` feature, written as `<primitive>.proxy.wasm` beside the components.
fn build_proxy_filters(root: &Path) -> Result<()> {
    let guests: Vec<&Guest> = GUESTS
        .iter()
        .filter(|g| g.package != "hostile-policy")
        .collect();
    let packages: Vec<&str> = guests.iter().map(|g| g.package).collect();
    cargo_build_guests_with(
        root,
        "wasm32-wasip1",
        &packages,
        &[
            "--features",
            "llmscope-sdk/proxy-wasm",
            "--config",
            "profile.release.strip=true",
        ],
    )?;
    let out = target_dir(root).join("wasm32-wasip1/release");
    for guest in guests {
        let artifact = guest.package.replace('-', "_");
        let module_path = out.join(format!("{artifact}.wasm"));
        let module = std::fs::read(&module_path)
            .with_context(|| format!("reading {}", module_path.display()))?;
        check_proxy_module(guest.package, &module)?;
        let dest = root
            .join(guest.dest_dir)
            .join(format!("{}.proxy.wasm", guest.primitive));
        std::fs::write(&dest, &module).with_context(|| format!("writing {}", dest.display()))?;
        println!(
            "built {} ({} KiB, proxy-wasm 0.2.1 filter)",
            dest.strip_prefix(root).unwrap_or(&dest).display(),
            module.len() / 1024
        );
    }
    Ok(())
}

/// Fail unless `module` is a proxy-wasm 0.2.1 filter importing only the proxy ABI (`env`) and
/// the WASI preview 1 functions proxies provide.
fn check_proxy_module(package: &str, module: &[u8]) -> Result<()> {
    let mut abi = false;
    let mut bad = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(module) {
        match payload.with_context(|| format!("{package}: parsing the proxy-wasm module"))? {
            wasmparser::Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import?;
                    let ok = match import.module {
                        "env" => import.name.starts_with("proxy_"),
                        "wasi_snapshot_preview1" => true,
                        _ => false,
                    };
                    if !ok {
                        bad.push(format!("{}::{}", import.module, import.name));
                    }
                }
            }
            wasmparser::Payload::ExportSection(reader) => {
                for export in reader {
                    abi |= export?.name == "proxy_abi_version_0_2_1";
                }
            }
            _ => {}
        }
    }
    if !abi {
        bail!("{package}: the proxy-wasm build does not export proxy_abi_version_0_2_1");
    }
    if !bad.is_empty() {
        bail!(
            "{package}: the proxy-wasm build imports {}, which Envoy does not provide",
            bad.join(", ")
        );
    }
    Ok(())
}

/// `cargo build` guest crates for a wasm target, in the shared release profile but without debug
/// info (the workspace profile keeps line tables for the host).
fn cargo_build_guests(root: &Path, target: &str, packages: &[&str]) -> Result<()> {
    cargo_build_guests_with(root, target, packages, &[])
}

/// [`cargo_build_guests`] with extra cargo arguments.
fn cargo_build_guests_with(
    root: &Path,
    target: &str,
    packages: &[&str],
    extra: &[&str],
) -> Result<()> {
    let mut cmd = cargo(root);
    cmd.args([
        "build",
        "--release",
        "--config",
        "profile.release.debug=false",
        "--target",
        target,
    ]);
    cmd.args(extra);
    for package in packages {
        cmd.args(["--package", package]);
    }
    run(cmd).with_context(|| {
        format!(
            "building {} for {target} (is the target installed? `rustup target add {target}`)",
            packages.join(", ")
        )
    })
}

/// The main job: the gateway serving the demo config with the built-in mock provider.
fn demo(root: &Path) -> Result<()> {
    let bin = target_dir(root).join("release/llmscope");
    let config = root.join("examples/llmscope.yaml");
    let mut check = Command::new(&bin);
    check
        .args(["policy", "check"])
        .arg(root.join("examples/policy.yaml"))
        .current_dir(root);
    run(check)?;
    println!("\nTry it from another terminal:");
    println!("  curl -s localhost:8080/infer -H 'content-type: application/json' \\");
    println!(
        "    -d '{{\"prompt\": \"Summarize this document\", \"tenant_id\": \"acme-corp\", \"feature_id\": \"summarize\", \"budget_namespace\": \"demo\", \"model_tier\": \"expensive\"}}'"
    );
    println!("  curl -s localhost:8080/v1/queries/budget_pressure_by_namespace");
    println!("Logs: artifacts/logs/*.jsonl. Stop with Ctrl-C.\n");
    let mut serve = Command::new(&bin);
    serve
        .args(["serve", "--config"])
        .arg(&config)
        .current_dir(root);
    run(serve)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An environment holding only `vars`.
    fn env<'a>(vars: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    fn unreachable_locate() -> Result<PathBuf> {
        bail!("locate-project must not run when cargo run named xtask")
    }

    #[test]
    fn root_is_the_parent_of_the_run_time_manifest_dir() {
        let vars = [
            ("CARGO_PKG_NAME", "xtask"),
            ("CARGO_MANIFEST_DIR", "/elsewhere/clone-b/xtask"),
        ];
        let root = root_from(env(&vars), unreachable_locate).unwrap();
        assert_eq!(root, Path::new("/elsewhere/clone-b"));
        // Not the clone this test binary was compiled in.
        let compiled_in = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        assert_ne!(root, compiled_in);
    }

    #[test]
    fn without_cargo_run_the_root_comes_from_locate_project() {
        let located = || Ok(PathBuf::from("/located/workspace"));
        assert_eq!(
            root_from(env(&[]), located).unwrap(),
            Path::new("/located/workspace")
        );
        // Another package's manifest dir (xtask started by some other `cargo run`) is ignored.
        let other = [
            ("CARGO_PKG_NAME", "llmscope"),
            ("CARGO_MANIFEST_DIR", "/elsewhere/host"),
        ];
        assert_eq!(
            root_from(env(&other), located).unwrap(),
            Path::new("/located/workspace")
        );
    }

    #[test]
    fn no_root_is_a_clear_error() {
        let err = root_from(env(&[]), || bail!("not in a cargo project")).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("cannot find the llmscope workspace"),
            "{text}"
        );
        assert!(text.contains("not in a cargo project"), "{text}");
    }

    #[test]
    fn locate_project_finds_this_workspace() {
        // Run from this crate's directory, as `cargo test` does.
        let root = locate_workspace().unwrap();
        assert!(
            root.join("xtask/Cargo.toml").is_file(),
            "{}",
            root.display()
        );
    }

    /// No source file of xtask may take a repository path from compile time again.
    #[test]
    fn no_compile_time_paths() {
        let src = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("src");
        let banned = concat!("env!(\"CARGO_", "MANIFEST_DIR\")");
        let mut checked = 0;
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Tests may use it, to check the root is not the compile-time one.
            let code = text.split("#[cfg(test)]").next().unwrap_or(&text);
            assert!(!code.contains(banned), "{} uses {banned}", path.display());
            checked += 1;
        }
        assert!(
            checked >= 5,
            "found only {checked} sources in {}",
            src.display()
        );
    }
}
