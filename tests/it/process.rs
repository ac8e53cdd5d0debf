//! The real `llmops serve` binary in a child process, for the tests that need
//! its own memory, its own logs, a crash, or a resource limit; and the admin
//! calls every control-plane test makes.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The admin key the tests' servers accept (`ops:admin:adm1n`).
pub const ADMIN: &str = "adm1n";

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One request with `key` as the bearer: (status, JSON body or null).
pub async fn call_as(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
    key: &str,
) -> (u16, Value) {
    let mut r = c.request(method, url).bearer_auth(key);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// [`call_as`] with the admin key.
pub async fn call(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
) -> (u16, Value) {
    call_as(c, method, url, body, ADMIN).await
}

/// A running `llmops serve` serving `model` as `tiny`, with [`ADMIN`] as an
/// admin key (`LLMOPS_API_KEYS`; remove it for an open server), on free
/// loopback ports; its stdout and stderr go to `log`. Killed on drop.
pub struct Served {
    child: Child,
    /// HTTP port.
    pub http: u16,
    /// gRPC port.
    pub grpc: u16,
    /// Where its output goes.
    pub log: PathBuf,
}

impl Served {
    /// Starts it; `tweak` adds flags, environment or a `pre_exec`. Logs at
    /// `warn` unless `tweak` sets `RUST_LOG`.
    pub fn spawn(model: &Path, data: &Path, log: &Path, tweak: impl FnOnce(&mut Command)) -> Self {
        let (http, grpc) = (free_port(), free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmops"));
        // The test runner's own settings must not leak into the server.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("LLMOPS_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(["serve", "--model-name", "tiny"])
            .env("LLMOPS_API_KEYS", format!("ops:admin:{ADMIN}"))
            .arg("--model")
            .arg(model)
            .arg("--data-dir")
            .arg(data)
            .args([
                "--http-addr",
                &format!("127.0.0.1:{http}"),
                "--grpc-addr",
                &format!("127.0.0.1:{grpc}"),
            ])
            .env("RUST_LOG", "warn")
            // A startup error reads as its message, not a backtrace.
            .env("RUST_BACKTRACE", "0");
        tweak(&mut cmd);
        let out = std::fs::File::create(log).unwrap();
        let child = cmd
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start llmops serve");
        Self {
            child,
            http,
            grpc,
            log: log.to_path_buf(),
        }
    }

    /// `http://127.0.0.1:PORT` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `/ready` answers 200; panics with the log's tail if the
    /// process exits first or a minute passes.
    pub async fn ready(&mut self) {
        let c = reqwest::Client::new();
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("llmops serve exited with {status}:\n{}", self.tail(40));
            }
            if c.get(self.url("/ready"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "llmops serve not ready after 60 s:\n{}",
                self.tail(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits up to `within` for the process to exit by itself; its status,
    /// or `None` if it still runs.
    pub async fn exited(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if t0.elapsed() >= within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last `n` lines of its output.
    pub fn tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tiny synthetic Llama with `seed`, written to `dir/name`.
pub fn tiny(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let p = dir.join(name);
    llmops::engine::synth::SynthSpec {
        seed,
        ..llmops::engine::synth::SynthSpec::tiny_llama()
    }
    .write(&p, None)
    .unwrap();
    p
}
