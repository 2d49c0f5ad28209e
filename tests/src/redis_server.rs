//! A real `redis-server` on a free loopback port, in a temp directory, with persistence off (a
//! restart comes back empty). A missing `redis-server` fails the test with the install hint; it
//! never skips.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`; killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    binary: PathBuf,
}

/// `name` on `PATH`, if it is there.
fn on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The `redis-server` binary, or the install hint.
pub fn binary() -> PathBuf {
    on_path("redis-server").unwrap_or_else(|| {
        fail(
            "redis-server is not on PATH: install redis-server (Debian package redis-server: \
             `apt-get install -y redis-server`; .ci/run does)",
        )
    })
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| fail(&format!("bind: {e}")));
    listener
        .local_addr()
        .unwrap_or_else(|e| fail(&format!("local_addr: {e}")))
        .port()
}

/// Send `PING` on a fresh connection to `port`; true on `+PONG`.
pub fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while got.len() < 7 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got.starts_with(b"+PONG")
}

impl RedisServer {
    /// Start on a free port and wait until it answers `PING`.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| fail(&format!("temp dir: {e}")));
        let mut server = Self {
            child: None,
            port: 0,
            dir,
            binary: binary(),
        };
        // The port is free when picked; another process could take it before redis binds it,
        // so retry a few times with a new one.
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn().is_ok() {
                return server;
            }
        }
        fail(&format!(
            "redis-server did not start:\n{}",
            server.log_text()
        ))
    }

    /// Spawn redis-server on `self.port` and wait for `PING`; `Err` when it exits or does not
    /// answer within 10 s.
    fn spawn(&mut self) -> Result<(), ()> {
        let log = self.dir.path().join("redis.log");
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(["--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| fail(&format!("spawning {}: {e}", self.binary.display())));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ping(self.port) {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > deadline {
                self.kill();
                return Err(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port it listens on (kept across [`Self::start_again`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether it answers `PING` now.
    pub fn is_up(&self) -> bool {
        ping(self.port)
    }

    /// Kill it (SIGKILL: no save, no goodbye to clients) and wait for it to exit.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Start it again, empty, on the same port; waits for `PING`.
    pub fn start_again(&mut self) {
        self.kill();
        // The port was ours a moment ago; allow a few tries while the kernel lets go of it.
        for _ in 0..20 {
            if self.spawn().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        fail(&format!(
            "redis-server did not start again on port {}:\n{}",
            self.port,
            self.log_text()
        ))
    }

    /// `redis-cli -p PORT ARGS...`: its stdout (trimmed), failing the test on an error.
    pub fn cli(&self, args: &[&str]) -> String {
        let cli = on_path("redis-cli").unwrap_or_else(|| {
            fail("redis-cli is not on PATH: install redis-server (Debian package redis-server; it brings redis-tools)")
        });
        let out = Command::new(cli)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap_or_else(|e| fail(&format!("running redis-cli: {e}")));
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || text.starts_with("ERR") || text.starts_with("(error)") {
            fail(&format!(
                "redis-cli {args:?}: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        text
    }

    /// `FLUSHALL`: every key gone, the server stays up.
    pub fn flushall(&self) {
        let answer = self.cli(&["FLUSHALL"]);
        if answer != "OK" {
            fail(&format!("FLUSHALL answered {answer:?}"));
        }
    }

    /// Number of keys in database 0.
    pub fn dbsize(&self) -> u64 {
        let answer = self.cli(&["DBSIZE"]);
        answer
            .parse()
            .unwrap_or_else(|_| fail(&format!("DBSIZE answered {answer:?}")))
    }

    /// What redis-server logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn fail(message: &str) -> ! {
    #[allow(clippy::panic, reason = "test helper: fail the test")]
    {
        panic!("{message}")
    }
}
