//! Streaming helpers: a real `llmscope mock-upstream` process (the streaming stand-in provider)
//! and a reader of server-sent events that yields each event's data as it arrives.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running `llmscope mock-upstream` on a free port; killed on drop.
pub struct MockUpstream {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl MockUpstream {
    /// Start it with `args` (e.g. `--stream-chunks 6 --chunk-delay-ms 100`).
    pub fn start(args: &[&str]) -> Self {
        let mut child = super::llmscope()
            .args(["mock-upstream", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| fail(&format!("spawning llmscope mock-upstream: {e}")));
        let stdout = child.stdout.take().unwrap_or_else(|| fail("no stdout"));
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let Some(addr) = line
            .trim()
            .strip_prefix("mock upstream listening on http://")
        else {
            let _ = child.kill();
            fail(&format!("mock-upstream did not start: {line:?}"));
        };
        Self {
            addr: addr.to_owned(),
            child,
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| fail(&format!("no port in {}", self.addr)))
    }

    /// `GET /stats`: calls served, streams completed and aborted.
    pub async fn stats(&self) -> Value {
        let resp = reqwest::get(format!("http://{}/stats", self.addr))
            .await
            .unwrap_or_else(|e| fail(&format!("GET /stats: {e}")));
        resp.json()
            .await
            .unwrap_or_else(|e| fail(&format!("GET /stats body: {e}")))
    }

    /// Wait (at most `timeout`) until stat `key` is at least `n`; returns its last value.
    pub async fn wait_stat(&self, key: &str, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.stats().await[key].as_u64().unwrap_or(0);
            if v >= n || Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Server-sent events read off a response body as its chunks arrive.
pub struct Events {
    resp: reqwest::Response,
    buf: String,
}

impl Events {
    /// Read `resp`'s body as events.
    pub fn new(resp: reqwest::Response) -> Self {
        Self {
            resp,
            buf: String::new(),
        }
    }

    /// The next event's `data:` payload; `None` once the body ended.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                if !data.is_empty() {
                    return Some(data.join("\n"));
                }
                continue;
            }
            let chunk = self
                .resp
                .chunk()
                .await
                .unwrap_or_else(|e| fail(&format!("reading the stream: {e}")))?;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// The next event as JSON (`None` at the end; `[DONE]` as a JSON string).
    pub async fn next_json(&mut self) -> Option<Value> {
        let data = self.next().await?;
        Some(serde_json::from_str(&data).unwrap_or(Value::String(data)))
    }

    /// Every remaining event, as JSON (`[DONE]` as a JSON string).
    pub async fn rest(mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(v) = self.next_json().await {
            out.push(v);
        }
        out
    }
}

fn fail(message: &str) -> ! {
    #[allow(clippy::panic, reason = "test helper: fail the test")]
    {
        panic!("{message}")
    }
}
