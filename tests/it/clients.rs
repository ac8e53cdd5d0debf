//! Real clients against the real binary: the official `openai` Python SDK,
//! and `grpcio` with reflection and health checking, run by pytest
//! (`tests/python`) against `llmops serve` on loopback.
//!
//! Needs Python 3 with `openai grpcio grpcio-reflection grpcio-health-checking
//! pytest` (`.ci/run` installs them); `LLMOPS_TEST_PYTHON` picks the
//! interpreter [default: python3].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llmops::config::hash_secret;
use llmops::engine::synth::SynthSpec;

const PACKAGES: &str = "openai pydantic grpcio grpcio-reflection grpcio-health-checking pytest";
const MODULES: &str = "import openai, pydantic, grpc, grpc_reflection, grpc_health, pytest";
const ADMIN_KEY: &str = "sk-clients-admin";
const INFERENCE_KEY: &str = "sk-clients-inference";
const LIMITED_KEY: &str = "sk-clients-limited";
const LIMITED_RPM: u32 = 2;
const MAX_RUNNING: usize = 2;
const MAX_WAITING: usize = 2;
/// Whole-suite limit; about three minutes when all is well (Gemma 3 270M
/// samples the structured-output and tool-call tests on the CPU).
const PYTEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Text the tiny model learns, so greedy output is words (for `stop`).
const CORPUS: &str = "\
The whale swam under the grey sea at dawn. All the ships sailed home before the storm. A quiet bell rang over the old town, and the children ran down to the harbour to watch the boats come in.
The baker opened his shop at six every morning. He made bread, cakes and small sweet buns, and the whole street smelled of warm butter. People came from the next village to buy his bread.
In the spring the river rose and covered the low fields. The farmers moved their sheep to the hills and waited for the water to go down. When it did, the grass grew green and tall.
The old lighthouse keeper wrote a letter to his daughter every week. He told her about the weather, the birds, the ships that passed, and the long nights when the lamp turned and turned.
";

fn python() -> String {
    std::env::var("LLMOPS_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Fails (never skips) when the Python clients are missing.
fn require_python_clients() {
    let py = python();
    let out = Command::new(&py).args(["-c", MODULES]).output();
    let problem = match out {
        Err(e) => format!("`{py}` could not be started: {e}"),
        Ok(o) if !o.status.success() => format!(
            "`{py} -c \"{MODULES}\"` failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Ok(_) => return,
    };
    panic!(
        "the client-compatibility tests need Python 3 with the official clients.\n{problem}\n\
         Run `.ci/run` (which installs them), or `{py} -m pip install {PACKAGES}` \
         (set LLMOPS_TEST_PYTHON to use another interpreter)."
    );
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal blocking HTTP GET: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {raw:?}")))?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `llmops` with no `LLMOPS_*` settings inherited from the caller.
fn llmops() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmops"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("LLMOPS_") {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null()).env("NO_COLOR", "1");
    cmd
}

/// A `llmops serve` child, killed when dropped (also on panic).
struct Server {
    child: Child,
    http: SocketAddr,
    grpc: SocketAddr,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(dir: &Path, models: &[(&str, &Path)]) -> Server {
        let config = dir.join("llmops.toml");
        let key = |id: &str, role: &str, secret: &str, rpm: Option<u32>| {
            let rpm = rpm
                .map(|r| format!("requests_per_minute = {r}\n"))
                .unwrap_or_default();
            format!(
                "[[auth.keys]]\nid = \"{id}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n{rpm}\n",
                hash_secret(secret)
            )
        };
        let toml = [
            key("ci-admin", "admin", ADMIN_KEY, None),
            key("ci-inference", "inference", INFERENCE_KEY, None),
            key("ci-limited", "inference", LIMITED_KEY, Some(LIMITED_RPM)),
        ]
        .concat();
        std::fs::write(&config, toml).unwrap();
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = dir.join("server.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let paths: Vec<String> = models
            .iter()
            .map(|(_, p)| p.display().to_string())
            .collect();
        let names: Vec<&str> = models.iter().map(|(n, _)| *n).collect();
        let child = llmops()
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(["--model", &paths.join(",")])
            .args(["--model-name", &names.join(",")])
            .args(["--http-addr", &http.to_string()])
            .args(["--grpc-addr", &grpc.to_string()])
            .args(["--max-running", &MAX_RUNNING.to_string()])
            .args(["--max-waiting", &MAX_WAITING.to_string()])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("start llmops serve");
        let mut s = Server {
            child,
            http,
            grpc,
            log,
        };
        s.wait_ready(Duration::from_secs(120));
        s
    }

    fn wait_ready(&mut self, limit: Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "llmops serve exited with {status} before it was ready; its log:\n{}",
                    tail(&self.log, 50)
                );
            }
            if let Ok((200, _)) = http_get(self.http, "/ready") {
                return;
            }
            if started.elapsed() > limit {
                panic!(
                    "llmops serve was not ready after {limit:?}; its log:\n{}",
                    tail(&self.log, 50)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Trains the text model with the real binary (a few seconds).
fn train_text_model(dir: &Path) -> PathBuf {
    let data = dir.join("corpus.txt");
    std::fs::write(&data, CORPUS).unwrap();
    let out = dir.join("text-model");
    let log = dir.join("train.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let status = llmops()
        .arg("train")
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args([
            "--preset",
            "nano",
            "--vocab-size",
            "400",
            "--seq-len",
            "64",
            "--batch-size",
            "8",
        ])
        .args([
            "--steps",
            "80",
            "--lr",
            "1e-2",
            "--eval-fraction",
            "0",
            "--seed",
            "0",
            "--quiet",
        ])
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .status()
        .expect("start llmops train");
    assert!(
        status.success(),
        "llmops train failed ({status}):\n{}",
        tail(&log, 50)
    );
    out
}

#[test]
fn official_python_clients_work_against_a_running_server() {
    require_python_clients();
    let tmp = tempfile::tempdir().unwrap();
    let text_model = train_text_model(tmp.path());
    // Random weights but a long context: a long generation outlasts a
    // client's cancel by seconds (the cancel and queue tests need that).
    let slow_model = tmp.path().join("slow-model");
    SynthSpec {
        max_position_embeddings: 16384,
        ..SynthSpec::tiny_llama()
    }
    .write(&slow_model, None)
    .unwrap();
    // The embedded model, written out as a model folder: the structured
    // outputs tests sample it.
    let embedded = tmp.path().join("embedded");
    let files = llmops::engine::embedded::files().expect("a build with the embedded model");
    std::fs::create_dir_all(&embedded).unwrap();
    for (name, bytes) in [
        ("model.safetensors", files.weights),
        ("config.json", files.config.as_bytes()),
        ("tokenizer.json", files.tokenizer),
        ("tokenizer_config.json", files.tokenizer_config.as_bytes()),
    ] {
        std::fs::write(embedded.join(name), bytes).unwrap();
    }
    // Gemma 3 270M (scripts/fetch-gemma): the structured-output and
    // tool-call tests sample it too.
    let gemma = crate::gemma::model_path();
    assert!(
        gemma.exists(),
        "{} is missing: run scripts/fetch-gemma",
        gemma.display()
    );
    let server = Server::start(
        tmp.path(),
        &[
            ("tiny", &text_model),
            ("slow", &slow_model),
            ("embedded", &embedded),
            ("gemma", &gemma),
        ],
    );

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_path = tmp.path().join("pytest.log");
    let out_file = std::fs::File::create(&out_path).unwrap();
    let mut pytest = Command::new(python())
        .args([
            "-m",
            "pytest",
            "-q",
            "--tb=short",
            "-p",
            "no:cacheprovider",
            "tests/python",
        ])
        .current_dir(root)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("LLMOPS_TEST_HTTP", server.http.to_string())
        .env("LLMOPS_TEST_GRPC", server.grpc.to_string())
        .env("LLMOPS_TEST_MODEL", "tiny")
        .env("LLMOPS_TEST_SLOW_MODEL", "slow")
        .env("LLMOPS_TEST_STRUCTURED_MODEL", "embedded")
        .env("LLMOPS_TEST_GEMMA_MODEL", "gemma")
        .env("LLMOPS_TEST_ADMIN_KEY", ADMIN_KEY)
        .env("LLMOPS_TEST_INFERENCE_KEY", INFERENCE_KEY)
        .env("LLMOPS_TEST_LIMITED_KEY", LIMITED_KEY)
        .env("LLMOPS_TEST_LIMITED_RPM", LIMITED_RPM.to_string())
        .env("LLMOPS_TEST_MAX_RUNNING", MAX_RUNNING.to_string())
        .env("LLMOPS_TEST_MAX_WAITING", MAX_WAITING.to_string())
        // The SDK must not pick up a real account or proxy.
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .stdin(Stdio::null())
        .stdout(out_file.try_clone().unwrap())
        .stderr(out_file)
        .spawn()
        .expect("start pytest");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = pytest.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > PYTEST_TIMEOUT {
            let _ = pytest.kill();
            let _ = pytest.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    match status {
        Some(s) if s.success() => println!("{output}"),
        Some(s) => panic!(
            "pytest tests/python failed ({s}):\n{output}\n--- server log (last lines) ---\n{}",
            tail(&server.log, 40)
        ),
        None => panic!(
            "pytest tests/python did not finish within {PYTEST_TIMEOUT:?}:\n{output}\n--- server log (last lines) ---\n{}",
            tail(&server.log, 40)
        ),
    }
    // The server survived the whole suite.
    assert_eq!(http_get(server.http, "/health").unwrap().0, 200);
}
