//! Fault injection: the system under the failures production will bring. Eight processes
//! appending to the same logs; `kill -9` under load and a restart on the surviving logs; a full
//! disk; hostile rules under sustained load; components that escape the policies directory or do
//! not match their pinned digest.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "integration tests: a failed unwrap or panic is a failed test"
)]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmscope::policy::{PolicyRuntime, PolicySet};
use llmscope_tests::gateway::{read_jsonl, Gateway, Options};
use llmscope_tests::{builtin, hostile, policies_with};
use serde_json::{json, Value};

/// Complete lines of `path` (each must parse) and whether a torn tail follows the last newline.
fn whole_lines(path: &Path) -> (Vec<Value>, bool) {
    let bytes = std::fs::read(path).unwrap_or_default();
    let torn = !bytes.is_empty() && !bytes.ends_with(b"\n");
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.split('\n').collect();
    lines.pop(); // after the last newline: empty, or the torn tail
    let parsed = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!(
                    "{}: line {} is torn or corrupt ({e}): {l:?}",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect();
    (parsed, torn)
}

#[test]
fn eight_processes_append_ten_thousand_pairs_each_to_the_same_logs() {
    let dir = tempfile::tempdir().unwrap();
    let (telemetry, decisions) = (dir.path().join("t.jsonl"), dir.path().join("d.jsonl"));
    let children: Vec<_> = (0..8)
        .map(|p| {
            Command::new(env!("CARGO_BIN_EXE_append_load"))
                .arg(&telemetry)
                .arg(&decisions)
                .arg("10000")
                .arg(format!("p{p}"))
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "an appender failed");
    }
    for path in [&telemetry, &decisions] {
        let (lines, torn) = whole_lines(path);
        assert!(!torn, "{} ends mid-line", path.display());
        assert_eq!(lines.len(), 80_000, "{}", path.display());
        let ids: HashSet<&str> = lines
            .iter()
            .map(|l| l["request_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 80_000, "every request id exactly once");
        let mut per_process: HashMap<&str, usize> = HashMap::new();
        for l in &lines {
            *per_process
                .entry(l["tenant_id"].as_str().unwrap())
                .or_default() += 1;
        }
        assert!(
            per_process.values().all(|n| *n == 10_000),
            "{per_process:?}"
        );
    }
}

/// The seed policies plus namespace `capped`: deny beyond $0.002 an hour (~25 mock requests).
fn capped_policy() -> String {
    let seed = std::fs::read_to_string(llmscope_tests::seed_config()).unwrap();
    format!(
        "{seed}\n  capped:\n    rules:\n      - id: \"capped-hourly\"\n        primitive: budget_threshold\n        period: hourly\n        limit_usd: 0.002\n        action: deny\n        deny_reason: \"capped\"\n"
    )
}

fn capped_request() -> Value {
    json!({"prompt": "Summarize this document", "tenant_id": "acme", "budget_namespace": "capped",
           "route_name": "/conversation-turn"})
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_under_load_leaves_whole_lines_and_the_restarted_gateway_keeps_the_budget() {
    let logs_dir = tempfile::tempdir().unwrap();
    let logs = (
        logs_dir.path().join("telemetry.jsonl"),
        logs_dir.path().join("policy_decisions.jsonl"),
    );
    let mut opts = Options::new(&capped_policy());
    opts.logs = Some(logs.clone());
    let mut gw = Gateway::start(&opts);
    let url = gw.at("/infer");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..16 {
        let (url, stop) = (url.clone(), Arc::clone(&stop));
        load.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = client.post(&url).json(&capped_request()).send().await;
            }
        }));
    }
    // Let it serve past the cap and deny for a while, then kill it mid-flight. "Past the cap"
    // means the *written* spend leaves no room for another request: while it still does, the
    // gateway may have a last allowed request in flight, whose spend dies with the process
    // (it is logged when the provider answers), and a restart would rightly allow one more.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut exhausted = false;
    while !exhausted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (written, _) = whole_lines(&logs.0);
        exhausted = written.len() >= 200 && written_spend(&written) > CAP_USD;
    }
    assert!(exhausted, "the load never exhausted the budget within 30 s");
    gw.child.kill().unwrap(); // SIGKILL
    gw.child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in load {
        let _ = t.await;
    }

    let (telemetry, _) = whole_lines(&logs.0);
    let (decisions, _) = whole_lines(&logs.1);
    assert!(
        telemetry.len() >= 200,
        "the load ran: {} lines",
        telemetry.len()
    );
    assert!(!decisions.is_empty());
    let served = served_usd(&telemetry);
    let largest_estimate = largest_estimate_usd(&telemetry);
    assert!(
        served <= CAP_USD + largest_estimate,
        "the cap held under load: served ${served}"
    );
    assert!(
        telemetry.iter().any(|l| l["status"] == "denied"),
        "the cap was reached"
    );

    // Restart on the same logs: the budget comes back from the surviving records.
    let mut again = Options::new(&capped_policy());
    again.logs = Some(logs.clone());
    let gw2 = Gateway::start(&again);
    let resp = reqwest::Client::new()
        .post(gw2.at("/infer"))
        .json(&capped_request())
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        402,
        "still over budget after the restart"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["policy_id"], "capped-hourly");
}

/// `limit_usd` of the `capped-hourly` rule.
const CAP_USD: f64 = 0.002;

/// Dollars spent on provider calls in these telemetry lines.
fn served_usd(telemetry: &[Value]) -> f64 {
    telemetry
        .iter()
        .filter(|l| l["status"] == "ok")
        .map(|l| l["cost_usd"].as_f64().unwrap())
        .sum()
}

/// The largest pre-dispatch estimate in these telemetry lines.
fn largest_estimate_usd(telemetry: &[Value]) -> f64 {
    telemetry
        .iter()
        .map(|l| l["estimated_cost_usd"].as_f64().unwrap())
        .fold(0.0, f64::max)
}

/// Spend the budget rule sees from these lines plus a request like the largest one seen.
fn written_spend(telemetry: &[Value]) -> f64 {
    served_usd(telemetry) + largest_estimate_usd(telemetry)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_refuses_requests_with_503_and_shows_in_readyz_and_metrics() {
    // /dev/full accepts the open and fails every write with ENOSPC.
    assert!(
        Path::new("/dev/full").exists(),
        "this test needs Linux's /dev/full"
    );
    let dir = tempfile::tempdir().unwrap();
    let telemetry = dir.path().join("telemetry.jsonl");
    std::os::unix::fs::symlink("/dev/full", &telemetry).unwrap();
    let mut opts = Options::new(&capped_policy());
    opts.logs = Some((telemetry, dir.path().join("policy_decisions.jsonl")));
    let gw = Gateway::start(&opts);
    let client = reqwest::Client::new();
    // The decision log is writable, so the first request is written ahead and served; its
    // telemetry line fails, and from then on nothing is dispatched while the telemetry log
    // cannot take a line.
    let first = client
        .post(gw.at("/infer"))
        .json(&json!({"prompt": "hi", "tenant_id": "acme"}))
        .send()
        .await
        .unwrap();
    assert!(
        [200, 503].contains(&first.status().as_u16()),
        "{}",
        first.status()
    );
    let resp = client
        .post(gw.at("/infer"))
        .json(&json!({"prompt": "hi", "tenant_id": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "logs_unavailable", "{body}");
    let ready = client.get(gw.at("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["logs_writable"], false);
    let metrics = gw.metrics().await;
    assert!(metrics.contains("llmscope_logs_writable 0"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_rules_under_sustained_load_are_contained_and_memory_settles() {
    let (h, route) = (hostile(false), builtin("route_preference"));
    let dir = policies_with(&[("hostile", &h), ("route_preference", &route)]);
    let policy = "version: \"hostile\"\nnamespaces:\n  default:\n    rules:\n      - {id: spin, primitive: hostile, behaviour: loop, failure_mode: open}\n      - {id: bomb, primitive: hostile, behaviour: memory, failure_mode: open}\n      - {id: deep, primitive: hostile, behaviour: recursion, failure_mode: open}\n      - {id: crash, primitive: hostile, behaviour: panic, failure_mode: open}\n      - {id: flood, primitive: hostile, behaviour: huge_reason, mode: monitor}\n      - {id: prefer-cheap, primitive: route_preference, prefer_tier: cheap}\n";
    let mut opts = Options::new(policy);
    opts.policies_dir = dir.path().to_path_buf();
    opts.deadline_ms = 50; // 160 requests each spin to the deadline
    let gw = Gateway::start(&opts);
    let pid = gw.child.id();
    let url = gw.at("/infer");
    let fire = |n: usize| {
        let url = url.clone();
        async move {
            let client = reqwest::Client::new();
            let mut handles = Vec::new();
            for c in 0..8 {
                let (client, url) = (client.clone(), url.clone());
                handles.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    for i in (c..n).step_by(8) {
                        let resp = client
                            .post(&url)
                            .json(&json!({"prompt": format!("request {i}"), "tenant_id": "acme", "model_tier": "expensive"}))
                            .send()
                            .await
                            .unwrap();
                        out.push((resp.status().as_u16(), resp.json::<Value>().await.unwrap()));
                    }
                    out
                }));
            }
            let mut all = Vec::new();
            for h in handles {
                all.extend(h.await.unwrap());
            }
            all
        }
    };
    let _ = fire(16).await; // warm the instance pools
    let baseline = rss_kib(pid);
    let answers = fire(160).await;
    assert_eq!(answers.len(), 160);
    for (status, body) in &answers {
        // `flood` denies with a 10 MiB reason, in monitor mode: recorded (truncated), not applied.
        assert_eq!(*status, 200, "{body}");
        assert_eq!(
            body["policy_decision"], "downgrade",
            "the healthy rule still acts: {body}"
        );
        assert_eq!(body["effective_model_tier"], "cheap");
    }
    let after = rss_kib(pid);
    assert!(
        after < baseline + 96 * 1024,
        "resident memory settles: {baseline} KiB before, {after} KiB after 160 hostile requests"
    );
    // Every failure is on record, per rule.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let decisions = read_jsonl(&gw.decisions);
    let last = decisions.last().unwrap();
    let errors: HashMap<&str, &str> = last["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| Some((r["rule_id"].as_str()?, r["error"].as_str()?)))
        .collect();
    assert!(errors["spin"].contains("deadline"), "{errors:?}");
    assert!(errors["bomb"].contains("memory"), "{errors:?}");
    assert!(
        errors.contains_key("deep") && errors.contains_key("crash"),
        "{errors:?}"
    );
    let flood = last["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule_id"] == "flood")
        .unwrap();
    assert!(
        flood["reason"].as_str().unwrap().len() <= 4096 + 64,
        "reasons are truncated"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn runtime() -> Arc<PolicyRuntime> {
    Arc::new(PolicyRuntime::new(llmscope::policy::Limits::default()).unwrap())
}

fn load(yaml: &str, dir: &Path) -> Result<PolicySet, String> {
    let file = dir.join("policy.yaml");
    std::fs::write(&file, yaml).unwrap();
    PolicySet::load(&file, dir, &runtime()).map_err(|e| e.to_string())
}

#[test]
fn components_linked_from_outside_the_policies_directory_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    let real = outside.path().join("elsewhere.wasm");
    std::fs::copy(builtin("route_preference"), &real).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&real, dir.path().join("route_preference.wasm")).unwrap();
    let yaml = "version: '1'\nnamespaces:\n  default:\n    rules:\n      - {id: r, primitive: route_preference, prefer_tier: cheap}\n";
    let err = load(yaml, dir.path()).unwrap_err();
    assert!(
        err.contains("outside the policies directory") && err.contains("(id \"r\")"),
        "{err}"
    );
    // A link that stays inside the directory is fine.
    let inner = dir.path().join("builds");
    std::fs::create_dir(&inner).unwrap();
    std::fs::copy(builtin("route_preference"), inner.join("rp.wasm")).unwrap();
    std::fs::remove_file(dir.path().join("route_preference.wasm")).unwrap();
    std::os::unix::fs::symlink(
        inner.join("rp.wasm"),
        dir.path().join("route_preference.wasm"),
    )
    .unwrap();
    load(yaml, dir.path()).unwrap();
}

#[test]
fn pinned_digests_are_enforced() {
    let route = builtin("route_preference");
    let dir = policies_with(&[("route_preference", &route)]);
    let digest = {
        use std::io::Read;
        let mut bytes = Vec::new();
        std::fs::File::open(&route)
            .unwrap()
            .read_to_end(&mut bytes)
            .unwrap();
        let set = load(
            "version: '1'\nnamespaces:\n  default:\n    rules:\n      - {id: r, primitive: route_preference, prefer_tier: cheap}\n",
            dir.path(),
        )
        .unwrap();
        let c = set.components().next().unwrap();
        c.sha256().to_owned()
    };
    let with_pin = |pin: &str| {
        format!("version: '1'\ncomponents:\n  route_preference: {{sha256: \"{pin}\"}}\nnamespaces:\n  default:\n    rules:\n      - {{id: r, primitive: route_preference, prefer_tier: cheap}}\n")
    };
    load(&with_pin(&digest), dir.path()).unwrap();
    load(&with_pin(&digest.to_uppercase()), dir.path()).unwrap();
    let wrong = "0".repeat(64);
    let err = load(&with_pin(&wrong), dir.path()).unwrap_err();
    assert!(
        err.contains(&format!("has sha256 {digest}"))
            && err.contains("components.route_preference.sha256 pins"),
        "{err}"
    );
    let err = load(&with_pin("abc"), dir.path()).unwrap_err();
    assert!(
        err.contains("components.route_preference.sha256: must be 64 hex digits"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_and_too_many_headers_are_refused_before_any_work() {
    let gw = Gateway::start(&Options::new(&capped_policy()));
    let client = reqwest::Client::new();
    let big = "x".repeat(100 << 10);
    let resp = client
        .post(gw.at("/infer"))
        .header("x-padding", big)
        .json(&json!({"prompt": "hi", "tenant_id": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 431);
    let mut req = client.post(gw.at("/infer"));
    for i in 0..150 {
        req = req.header(format!("x-h{i}"), "1");
    }
    let resp = req
        .json(&json!({"prompt": "hi", "tenant_id": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 431);
    // Nothing was served or logged for them; a normal request still is.
    assert!(read_jsonl(&gw.telemetry).is_empty());
    let ok = client
        .post(gw.at("/infer"))
        .json(&json!({"prompt": "hi", "tenant_id": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_and_prompts_never_reach_the_logs_even_at_debug_level() {
    let mut opts = Options::new(&capped_policy());
    opts.extra_yaml =
        "auth:\n  api_keys:\n    - {key: secret-key-7f3a9c2e51, tenants: [acme]}\n".into();
    // Everything llmscope logs, at its most verbose (the stderr pipe is read only at the end,
    // so other crates' debug chatter is left out to keep it from filling).
    opts.env
        .push(("LLMSCOPE_LOG".into(), "llmscope=debug".into()));
    let mut gw = Gateway::start(&opts);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let prompt = "confidential-prompt-zq81 about the merger";
    for key in ["secret-key-7f3a9c2e51", "wrong-key-secret-0000"] {
        let resp = client
            .post(gw.at("/infer"))
            .bearer_auth(key)
            .json(&json!({"prompt": prompt, "tenant_id": "acme"}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().as_u16() == 200 || resp.status().as_u16() == 401);
    }
    let (_, stderr) = gw.stop();
    for (what, text) in [
        ("telemetry", std::fs::read_to_string(&gw.telemetry).unwrap()),
        ("decisions", std::fs::read_to_string(&gw.decisions).unwrap()),
        ("stderr", stderr),
    ] {
        for secret in [
            "secret-key-7f3a9c2e51",
            "wrong-key-secret-0000",
            "confidential-prompt-zq81",
        ] {
            assert!(!text.contains(secret), "{what} contains {secret}:\n{text}");
        }
    }
    assert_eq!(
        read_jsonl(&gw.telemetry).len(),
        1,
        "the authorized request was served and logged"
    );
}

#[test]
fn compiled_components_are_cached_privately_and_bad_cache_files_are_recompiled() {
    use std::os::unix::fs::PermissionsExt;
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("compile-cache");
    let limits = llmscope::policy::Limits {
        compile_cache: Some(dir.clone()),
        ..llmscope::policy::Limits::default()
    };
    let rt = Arc::new(PolicyRuntime::new(limits).unwrap());
    let source = builtin("route_preference");
    let first = rt.load(&source).unwrap();
    let cached = dir.join(format!("{}.cwasm", first.sha256()));
    assert!(cached.is_file(), "the compiled component is cached");
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the cache directory is private");
    let again = rt.load(&source).unwrap();
    assert_eq!(again.info().name, "route_preference");

    // A damaged cache file is not trusted: the component is compiled again and re-cached.
    std::fs::write(&cached, b"not a compiled component").unwrap();
    let recompiled = rt.load(&source).unwrap();
    assert_eq!(recompiled.info().name, "route_preference");
    assert!(std::fs::metadata(&cached).unwrap().len() > 10_000);

    // A directory others can write to is never used.
    let open = base.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let rt = Arc::new(
        PolicyRuntime::new(llmscope::policy::Limits {
            compile_cache: Some(open.clone()),
            ..llmscope::policy::Limits::default()
        })
        .unwrap(),
    );
    rt.load(&source).unwrap();
    assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0);
}

/// Digests are public, so anyone who can write into the compile cache's path can plant native
/// code under a component's digest. Planted here: the compiled form of another component,
/// under route_preference's digest. Loaded from a cache the running user does not own alone,
/// it would report itself as that other component.
#[test]
fn a_planted_compiled_component_is_not_run_unless_the_whole_path_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let base = tempfile::tempdir().unwrap();
    let donor_cache = base.path().join("donor");
    let rt = Arc::new(
        PolicyRuntime::new(llmscope::policy::Limits {
            compile_cache: Some(donor_cache.clone()),
            ..llmscope::policy::Limits::default()
        })
        .unwrap(),
    );
    let donor = rt.load(&builtin("budget_threshold")).unwrap();
    let planted = std::fs::read(donor_cache.join(format!("{}.cwasm", donor.sha256()))).unwrap();
    let target = builtin("route_preference");
    let digest = rt.load(&target).unwrap().sha256().to_owned();
    let plant_and_load = |cache: &Path| {
        std::fs::write(cache.join(format!("{digest}.cwasm")), &planted).unwrap();
        let rt = Arc::new(
            PolicyRuntime::new(llmscope::policy::Limits {
                compile_cache: Some(cache.to_owned()),
                ..llmscope::policy::Limits::default()
            })
            .unwrap(),
        );
        rt.load(&target).unwrap().info().name.clone()
    };

    // Control: in the user's own private directory the cache is trusted (that is its point).
    let own = base.path().join("own");
    std::fs::create_dir(&own).unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(
        plant_and_load(&own),
        "budget_threshold",
        "the control plant is used"
    );

    // A private directory below one that others can write to (no sticky bit): whoever can
    // write there can replace the directory itself.
    let open = base.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let below = open.join("cache");
    std::fs::create_dir(&below).unwrap();
    std::fs::set_permissions(&below, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(plant_and_load(&below), "route_preference");

    // Owned by someone else (needs root to arrange: skipped otherwise).
    let foreign = base.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o700)).unwrap();
    if std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).is_ok() {
        assert_eq!(plant_and_load(&foreign), "route_preference");
        // A file owned by someone else in the user's own directory.
        let file = own.join(format!("{digest}.cwasm"));
        std::fs::write(&file, &planted).unwrap();
        std::os::unix::fs::chown(&file, Some(65534), Some(65534)).unwrap();
        let rt = Arc::new(
            PolicyRuntime::new(llmscope::policy::Limits {
                compile_cache: Some(own.clone()),
                ..llmscope::policy::Limits::default()
            })
            .unwrap(),
        );
        assert_eq!(rt.load(&target).unwrap().info().name, "route_preference");
    }
}

async fn edge_call(client: &reqwest::Client, url: String, body: &Value) -> (u16, Value) {
    let resp = client.post(url).json(body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// An edge report that could not be written used to be remembered as seen anyway: the
/// filter's retry was answered "duplicate" and the billed call never reached the logs. And the
/// host recorded whatever context the report carried, so a report could move spend to
/// another tenant or date it out of every window.
#[tokio::test(flavor = "multi_thread")]
async fn edge_reports_are_recorded_once_after_a_failed_write_and_with_the_issued_context() {
    let dir = tempfile::tempdir().unwrap();
    let telemetry = dir.path().join("telemetry.jsonl");
    std::os::unix::fs::symlink("/dev/full", &telemetry).unwrap();
    let mut opts = Options::new(&capped_policy());
    opts.logs = Some((telemetry.clone(), dir.path().join("policy_decisions.jsonl")));
    opts.extra_yaml = "auth: {unauthenticated_edge: true}\n".into();
    let gw = Gateway::start(&opts);
    let client = reqwest::Client::new();
    let context = |id: &str| {
        json!({"request_id": id, "path": "/infer", "aggregates": [],
               "body": {"prompt": "Summarize this document", "tenant_id": "acme"}})
    };
    let (status, answer) = edge_call(
        &client,
        gw.at("/v1/edge/context"),
        &context("req-edge-retry"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let report = |ctx: &Value| {
        json!({"request": ctx, "effective_tier": ctx["requested_tier"], "status": 200,
               "latency_ms": 5.0, "usage": {"tokens_in": 1000, "tokens_out": 500}, "rules": []})
    };
    let (status, body) = edge_call(
        &client,
        gw.at("/v1/edge/report"),
        &report(&answer["request"]),
    )
    .await;
    assert_eq!(status, 503, "the disk is full: {body}");

    // The disk has room again (the writer follows the path to the new file).
    std::fs::remove_file(&telemetry).unwrap();
    std::fs::write(&telemetry, "").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = edge_call(
        &client,
        gw.at("/v1/edge/report"),
        &report(&answer["request"]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["recorded"], true, "the retry records it: {body}");
    let (_, body) = edge_call(
        &client,
        gw.at("/v1/edge/report"),
        &report(&answer["request"]),
    )
    .await;
    assert_eq!(body["duplicate"], true, "{body}");

    // A report claiming another tenant and a time long ago, for a context this host issued.
    let (_, answer) = edge_call(
        &client,
        gw.at("/v1/edge/context"),
        &context("req-edge-forged"),
    )
    .await;
    let mut forged = answer["request"].clone();
    forged["tenant_id"] = json!("victim");
    forged["unix_time_ms"] = json!(0);
    let (status, body) = edge_call(&client, gw.at("/v1/edge/report"), &report(&forged)).await;
    assert_eq!(status, 200, "{body}");

    let lines = read_jsonl(&telemetry);
    let retry: Vec<&Value> = lines
        .iter()
        .filter(|l| l["request_id"] == "req-edge-retry")
        .collect();
    assert_eq!(retry.len(), 1, "recorded exactly once: {lines:?}");
    assert!(retry[0]["cost_usd"].as_f64().unwrap() > 0.0);
    let forged = lines
        .iter()
        .find(|l| l["request_id"] == "req-edge-forged")
        .unwrap();
    assert_eq!(forged["tenant_id"], "acme", "{forged}");
    assert!(
        !forged["timestamp"].as_str().unwrap().starts_with("1970"),
        "{forged}"
    );
}

/// Reports are idempotent per request id, but the host remembered ids in memory only: a
/// filter retrying a report whose answer it lost, after the host restarted, had it recorded a
/// second time. A restarted host now reads what was recorded from its logs.
#[tokio::test(flavor = "multi_thread")]
async fn an_edge_report_retried_after_a_host_restart_is_recorded_once() {
    let dir = tempfile::tempdir().unwrap();
    let telemetry = dir.path().join("telemetry.jsonl");
    let mut opts = Options::new(&capped_policy());
    opts.logs = Some((telemetry.clone(), dir.path().join("policy_decisions.jsonl")));
    opts.extra_yaml = "auth: {unauthenticated_edge: true}\n".into();
    let client = reqwest::Client::new();
    let gw = Gateway::start(&opts);
    let call = json!({"request_id": "req-edge-restart", "path": "/infer", "aggregates": [],
                      "body": {"prompt": "Summarize this document", "tenant_id": "acme"}});
    let (status, answer) = edge_call(&client, gw.at("/v1/edge/context"), &call).await;
    assert_eq!(status, 200, "{answer}");
    let report = json!({"request": answer["request"], "effective_tier": answer["request"]["requested_tier"],
                        "status": 200, "usage": {"tokens_in": 1000, "tokens_out": 500}, "rules": []});
    let (status, body) = edge_call(&client, gw.at("/v1/edge/report"), &report).await;
    assert_eq!(
        (status, body["recorded"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    drop(gw);

    let gw = Gateway::start(&opts);
    let (status, body) = edge_call(&client, gw.at("/v1/edge/report"), &report).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["duplicate"], true, "{body}");
    let lines: Vec<Value> = read_jsonl(&telemetry)
        .into_iter()
        .filter(|l| l["request_id"] == "req-edge-restart")
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
}

/// An edge request whose report never comes (Envoy died after the upstream billed it) used to
/// be released after the reservation's TTL: spent, and counted nowhere. It is now recorded at
/// its estimate, and a report arriving after that is a duplicate.
#[tokio::test(flavor = "multi_thread")]
async fn an_edge_request_without_a_report_is_counted_at_its_estimate() {
    let mut opts = Options::new(&capped_policy());
    opts.extra_yaml = "auth: {unauthenticated_edge: true}\n".into();
    opts.env = vec![("LLMSCOPE_EDGE_RESERVATION_TTL_MS".into(), "300".into())];
    let gw = Gateway::start(&opts);
    let client = reqwest::Client::new();
    let call = json!({"request_id": "req-edge-lost", "path": "/infer", "aggregates": [],
                      "body": {"prompt": "Summarize this document", "tenant_id": "acme"}});
    let (status, answer) = edge_call(&client, gw.at("/v1/edge/context"), &call).await;
    assert_eq!(status, 200, "{answer}");
    let estimate = answer["request"]["estimated_cost_usd"].as_f64().unwrap();
    let mut line = None;
    for _ in 0..100 {
        line = read_jsonl(&gw.telemetry)
            .into_iter()
            .find(|l| l["request_id"] == "req-edge-lost");
        if line.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = line.expect("an unreported edge request is recorded");
    assert_eq!(line["status"], "unanswered", "{line}");
    assert_eq!(line["cost_source"], "estimate", "{line}");
    assert_eq!(line["error_type"], "edge_report_missing", "{line}");
    assert!(
        (line["cost_usd"].as_f64().unwrap() - estimate).abs() < 1e-12,
        "{line}"
    );
    let report = json!({"request": answer["request"], "effective_tier": answer["request"]["requested_tier"],
                        "status": 200, "usage": {"tokens_in": 10, "tokens_out": 5}, "rules": []});
    let (status, body) = edge_call(&client, gw.at("/v1/edge/report"), &report).await;
    assert_eq!(
        (status, body["duplicate"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    let n = read_jsonl(&gw.telemetry)
        .iter()
        .filter(|l| l["request_id"] == "req-edge-lost")
        .count();
    assert_eq!(n, 1);
}

/// A filter's new aggregate is computed before its first context answer, so the first edge
/// request already sees the spend in the logs. An idle gateway (nothing new logged, aggregates
/// computed a moment ago) used to skip that computation and answer the new aggregate as $0.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_edge_aggregate_on_an_idle_gateway_sees_the_spend_already_logged() {
    let dir = tempfile::tempdir().unwrap();
    let telemetry = dir.path().join("telemetry.jsonl");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    std::fs::write(
        &telemetry,
        format!(
            "{{\"timestamp\":\"{}\",\"request_id\":\"req-before\",\"tenant_id\":\"acme\",\"budget_namespace\":\"default\",\"route_name\":\"/answer-routed\",\"model\":\"gpt-4o\",\"cost_usd\":0.5,\"status\":\"ok\"}}\n",
            llmscope::artifacts::rfc3339(now_ms - 60_000)
        ),
    )
    .unwrap();
    let mut opts = Options::new(&capped_policy());
    opts.logs = Some((telemetry, dir.path().join("policy_decisions.jsonl")));
    opts.extra_yaml = "auth: {unauthenticated_edge: true}\n".into();
    let gw = Gateway::start(&opts);
    // Idle for a while: every refresh pass since start found nothing new.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let client = reqwest::Client::new();
    let call = json!({"request_id": "req-edge-new-aggregate", "path": "/infer",
                      "body": {"prompt": "hi", "tenant_id": "acme"},
                      "aggregates": [{"key": "tenant_hour", "metric": "cost_usd", "aggregation": "sum",
                                      "scope": ["tenant"], "window": {"rolling_seconds": 3600},
                                      "include_in_flight": false}]});
    let (status, answer) = edge_call(&client, gw.at("/v1/edge/context"), &call).await;
    assert_eq!(status, 200, "{answer}");
    let text = answer.to_string();
    assert!(
        text.contains("\"tenant_hour\"") && text.contains("0.5"),
        "the logged $0.50 is in the new aggregate: {answer}"
    );
}
