//! The policy loop with the real binary: `policy new` in an empty directory outside the
//! repository, `policy build`, `policy test`, then the component dropped into a gateway's policies
//! directory decides a request. Also: `policy test` on every shipped policy's `cases.yaml`, a
//! failing case's diff, and the errors of the case file, `policy build` and `policy new`.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "integration tests: a failed unwrap or panic is a failed test"
)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use llmscope_tests::gateway::{Gateway, Options};
use llmscope_tests::{component, llmscope, root};
use serde_json::{json, Value};

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The target directory this test was built in: a policy crate built from a test shares it, so
/// its dependencies (the same versions: `policy new --sdk` seeds the lock file from the
/// workspace's) are compiled once, not per run. CI exports `CARGO_TARGET_DIR`; a plain
/// `cargo test` has `<exe>/../..` (`target/release/deps/policy_loop-*`).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || {
            let exe = std::env::current_exe().unwrap();
            exe.ancestors().nth(3).unwrap().to_path_buf()
        },
        PathBuf::from,
    )
}

/// `llmscope policy <args>` in `dir`, building into the shared target directory.
fn policy_in(dir: &Path, args: &[&OsStr]) -> Output {
    llmscope()
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target_dir())
        .arg("policy")
        .args(args)
        .output()
        .unwrap()
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_started_outside_the_repository_builds_passes_its_cases_and_decides() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path().canonicalize().unwrap();
    assert!(
        !work.starts_with(root().canonicalize().unwrap()),
        "{} must be outside the repository",
        work.display()
    );
    let sdk = root().join("guest-sdk");

    // new
    let out = policy_in(
        &work,
        &[os("new"), os("spend-cap"), os("--sdk"), sdk.as_os_str()],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("created policy crate `spend-cap` (primitive `spend_cap`) in spend-cap"),
        "{stdout}"
    );
    let krate = work.join("spend-cap");
    for file in [
        "Cargo.toml",
        "src/lib.rs",
        "cases.yaml",
        "README.md",
        "Cargo.lock",
    ] {
        assert!(krate.join(file).is_file(), "{file} missing: {stdout}");
    }
    let again = policy_in(
        &work,
        &[os("new"), os("spend_cap"), os("--sdk"), sdk.as_os_str()],
    );
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again)
            .1
            .contains("is not empty; refusing to overwrite it"),
        "{}",
        text(&again).1
    );

    // build
    let out = policy_in(&work, &[os("build"), os("spend-cap")]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.starts_with("built spend-cap/spend_cap.wasm (spend_cap 0.1.0, "),
        "{stdout}"
    );
    let built = krate.join("spend_cap.wasm");
    assert!(built.is_file());

    // its native tests, as generated
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let native = Command::new(cargo)
        .current_dir(&krate)
        .env("CARGO_TARGET_DIR", target_dir())
        .args(["test", "--release", "--quiet"])
        .output()
        .unwrap();
    assert!(native.status.success(), "cargo test: {}", text(&native).1);

    // test: the directory (built again, as `policy build` does) against its cases.yaml
    let out = policy_in(&work, &[os("test"), os("spend-cap")]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("testing spend_cap 0.1.0 (spend-cap/spend_cap.wasm) with 10 case(s)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok      denies a request just above the maximum"),
        "{stdout}"
    );
    assert!(stdout.ends_with("10 passed, 0 failed\n"), "{stdout}");

    // drop it into a policies directory and let a gateway use it
    let policies = tempfile::tempdir().unwrap();
    std::fs::copy(&built, policies.path().join("spend_cap.wasm")).unwrap();
    let mut opts = Options::new(
        "version: \"0.1.0\"\nnamespaces:\n  demo:\n    rules:\n      - id: \"demo-spend-cap\"\n        primitive: spend_cap\n        max_usd: 0.001\n",
    );
    opts.policies_dir = policies.path().to_path_buf();
    let mut gw = Gateway::start(&opts);
    let request = |tier: &str| {
        json!({"prompt": "Summarize this document", "tenant_id": "acme-corp",
               "budget_namespace": "demo", "model_tier": tier})
    };
    // expensive: 500 output tokens at $10/M alone are $0.005, over the $0.001 cap
    let (status, denied) = post(&gw.at("/infer"), request("expensive")).await;
    assert_eq!(status, 402, "{denied}");
    assert_eq!(denied["error"], "policy_denied");
    assert_eq!(denied["policy_id"], "demo-spend-cap");
    assert!(
        denied["reason"]
            .as_str()
            .unwrap()
            .contains("exceeds the per-request maximum $0.001000"),
        "{denied}"
    );
    let (status, allowed) = post(&gw.at("/infer"), request("cheap")).await;
    assert_eq!(status, 200, "{allowed}");
    assert_eq!(allowed["policy_decision"], "allow");
    let (status, stderr) = gw.stop();
    assert!(status.success(), "{stderr}");
}

/// The shipped policies' cases run against the components `cargo xtask build-policies` built.
#[test]
fn every_shipped_policy_passes_its_cases() {
    for (wasm, cases, at_least) in [
        (
            "policies/budget_threshold.wasm",
            "policies/budget-threshold/cases.yaml",
            15,
        ),
        (
            "policies/route_preference.wasm",
            "policies/route-preference/cases.yaml",
            10,
        ),
        (
            "policies/cost_anomaly.wasm",
            "policies/cost-anomaly/cases.yaml",
            10,
        ),
        (
            "examples/policies/max-request-cost/max_request_cost.wasm",
            "examples/policies/max-request-cost/cases.yaml",
            8,
        ),
    ] {
        let out = llmscope()
            .args(["policy", "test", wasm, "--cases", cases])
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{wasm}:\n{stdout}\n{stderr}");
        let summary = stdout.lines().last().unwrap_or_default();
        let passed: usize = summary
            .strip_suffix(" passed, 0 failed")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{wasm}: summary {summary:?}"));
        assert!(passed >= at_least, "{wasm}: {summary}");
        assert!(!stdout.contains("FAILED"), "{stdout}");
    }
}

#[test]
fn a_failing_case_prints_expected_and_got_per_field_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("cases.yaml");
    std::fs::write(
        &cases,
        "settings: {max_usd: 0.01}\ncases:\n  - name: passes\n    expect: {decision: allow}\n  \
         - name: expects the wrong decision\n    request: {estimated_cost_usd: 0.02}\n    \
         expect: {decision: allow, facts: {max_usd: 0.01}}\n",
    )
    .unwrap();
    let wasm = component("examples/policies/max-request-cost/max_request_cost.wasm");
    let out = llmscope()
        .args([
            os("policy"),
            os("test"),
            wasm.as_os_str(),
            os("--cases"),
            cases.as_os_str(),
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("ok      passes\n"), "{stdout}");
    assert!(
        stdout.contains(
            "FAILED  expects the wrong decision\n        decision\n          expected: allow\n          got:      deny\n        verdict: deny, reason \"request estimated at $0.020000 exceeds the per-request maximum $0.010000\""
        ),
        "{stdout}"
    );
    assert!(stdout.ends_with("1 passed, 1 failed\n"), "{stdout}");
}

#[test]
fn unusable_case_files_and_components_exit_2_saying_where() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = component("examples/policies/max-request-cost/max_request_cost.wasm");
    let run = |cases: &str| {
        let file = dir.path().join("cases.yaml");
        std::fs::write(&file, cases).unwrap();
        llmscope()
            .args([
                os("policy"),
                os("test"),
                wasm.as_os_str(),
                os("--cases"),
                file.as_os_str(),
            ])
            .output()
            .unwrap()
    };
    let out = run("cases:\n  - name: fine\n    expect: {decision: allow}\n  - name: typo\n    expect: {decison: deny}\n");
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out).1;
    assert!(
        stderr.contains(
            "cases.yaml: case \"typo\" (cases[1]), expect.decison: unknown field `decison`"
        ),
        "{stderr}"
    );
    let out = run(
        "cases:\n  - name: r\n    request: {estimated_cost: 1}\n    expect: {decision: deny}\n",
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out).1;
    assert!(
        stderr.contains(
            "case \"r\" (cases[0]), request.estimated_cost: unknown field `estimated_cost`"
        ),
        "{stderr}"
    );

    // Not a component; no case file beside it.
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm").unwrap();
    let out = llmscope()
        .args([
            os("policy"),
            os("test"),
            junk.as_os_str(),
            os("--cases"),
            dir.path().join("cases.yaml").as_os_str(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out)
            .1
            .contains("is not a valid WebAssembly component"),
        "{}",
        text(&out).1
    );
    let lone = tempfile::tempdir().unwrap();
    let copy = lone.path().join("max_request_cost.wasm");
    std::fs::copy(&wasm, &copy).unwrap();
    let out = llmscope()
        .args([os("policy"), os("test"), copy.as_os_str()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out)
            .1
            .contains("cases.yaml does not exist; name one with --cases"),
        "{}",
        text(&out).1
    );
}

/// A crate cargo cannot build, one without `export_policy!`, a directory without a crate: each
/// fails with what to do. These crates have no dependencies, so they build in a moment.
#[test]
fn build_failures_say_what_is_wrong() {
    let work = tempfile::tempdir().unwrap();
    let krate = |name: &str, lib_rs: &str| {
        let dir = work.path().join(name);
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(
            dir.join("Cargo.toml"),
            format!("[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n\n[lib]\ncrate-type = [\"cdylib\", \"rlib\"]\n"),
        )
        .unwrap();
        std::fs::write(dir.join("src/lib.rs"), lib_rs).unwrap();
    };
    krate(
        "not-a-policy",
        "//! No export_policy! here.\npub fn answer() -> u32 { 42 }\n",
    );
    krate(
        "does-not-compile",
        "pub fn broken() -> u32 { \"forty-two\" }\n",
    );

    let out = policy_in(work.path(), &[os("build"), os("not-a-policy")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out).1;
    assert!(
        stderr.contains("not-a-policy: ") && stderr.contains("is not a policy"),
        "{stderr}"
    );
    assert!(stderr.contains("export_policy!"), "{stderr}");

    let out = policy_in(work.path(), &[os("build"), os("does-not-compile")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out).1;
    assert!(
        stderr.contains("error[E0308]: mismatched types"),
        "cargo's output is shown: {stderr}"
    );
    assert!(
        stderr.contains("cargo build failed in does-not-compile"),
        "{stderr}"
    );

    let out = policy_in(work.path(), &[os("build"), os(".")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("no Cargo.toml"), "{}", text(&out).1);

    let out = policy_in(work.path(), &[os("new"), os("Spend Cap")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).1.contains("invalid policy name \"Spend Cap\""),
        "{}",
        text(&out).1
    );
}
