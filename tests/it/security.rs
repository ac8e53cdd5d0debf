//! An admin key is not a shell on the host, and no key is not an admin
//! beyond loopback: the real server refuses to start open on a public
//! address, `--insecure-no-auth` opens inference only, a command hook's
//! child sees none of the server's secrets, and the paths an admin names
//! (training data, replay data, a drift reference, model and version
//! names) stay under the roots.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use llmops::engine::synth::SynthSpec;
use reqwest::Method;
use serde_json::{Value, json};

use crate::process::{ADMIN, Served, call, call_as};
use crate::server::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_the_server_refuses_a_public_address_and_names_the_flag_that_opens_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking({
        let data = tmp.path().join("data");
        move || {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmops"));
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("LLMOPS_") {
                    cmd.env_remove(k);
                }
            }
            cmd.args([
                "serve",
                "--http-addr",
                "0.0.0.0:0",
                "--grpc-addr",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(data)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!out.status.success(), "it started open on 0.0.0.0");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure-no-auth"), "{err}");
    assert!(err.contains("0.0.0.0:0"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_insecure_no_auth_anonymous_callers_may_generate_but_not_administer() {
    let s = TestServer::start(|a| a.insecure_no_auth = true).await;
    let c = reqwest::Client::new();
    let r = c
        .post(s.url("/v1/completions"))
        .json(&json!({"model": "tiny", "prompt": "a b", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for (method, path, body) in [
        (
            Method::PUT,
            "/admin/v1/hooks/x",
            Some(json!({"url": "http://127.0.0.1:9/x"})),
        ),
        (
            Method::POST,
            "/admin/v1/models/tiny/versions",
            Some(json!({"path": "/tmp", "version": "v9"})),
        ),
        (Method::GET, "/admin/v1/serving", None),
    ] {
        let mut req = c.request(method.clone(), s.url(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let st = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(st, 403, "{method} {path}: {v}");
        assert_eq!(v["error"]["type"], "permission_error", "{v}");
    }
    s.stop().await;
}

/// A server process with an admin key in its environment
/// (`LLMOPS_API_KEYS`, as the manifests set it) and `hooks` in its config
/// file.
fn serve_with_hooks(tmp: &Path, hooks: Value) -> Served {
    let model = tmp.join("m");
    SynthSpec::tiny_llama().write(&model, None).unwrap();
    let cfg = tmp.join("llmops.toml");
    std::fs::write(&cfg, toml::to_string(&json!({ "hooks": hooks })).unwrap()).unwrap();
    Served::spawn(&model, &tmp.join("data"), &tmp.join("log"), |cmd| {
        cmd.arg("--config").arg(&cfg);
    })
}

/// Registers a fresh synthetic version of `tiny` (a `version_registered`
/// event).
async fn register(c: &reqwest::Client, s: &Served, dir: &Path, version: &str, seed: u64) {
    let p = dir.join(version);
    SynthSpec {
        seed,
        ..SynthSpec::tiny_llama()
    }
    .write(&p, None)
    .unwrap();
    let (st, v) = call(
        c,
        Method::POST,
        s.url("/admin/v1/models/tiny/versions"),
        Some(json!({"path": p, "version": version})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
}

async fn until_file(p: &Path, within: Duration) -> String {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(p)
            && !s.is_empty()
        {
            return s;
        }
        assert!(t0.elapsed() < within, "{} never written", p.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_hook_from_the_config_runs_without_the_servers_secrets_and_an_admin_cannot_add_one()
 {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("env.txt");
    let mut s = serve_with_hooks(
        tmp.path(),
        json!([{
            "name": "dump-env",
            "command": ["sh", "-c", format!("env > {}.tmp && mv {0}.tmp {0}", out.display())],
            "events": ["version_registered"],
        }]),
    );
    s.ready().await;
    let c = reqwest::Client::new();

    // Through the admin API a command hook is refused, naming the rule,
    // and so is a secret_env outside the hook-secret names.
    let (st, v) = call(
        &c,
        Method::PUT,
        s.url("/admin/v1/hooks/x"),
        Some(json!({"command": ["/bin/sh", "-c", "id > /tmp/pwned"]})),
    )
    .await;
    assert_eq!(st, 403, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("llmops.toml"), "{v}");
    let (st, v) = call(
        &c,
        Method::PUT,
        s.url("/admin/v1/hooks/x"),
        Some(json!({"url": "http://127.0.0.1:9/", "secret_env": "LLMOPS_API_KEYS"})),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "secret_env", "{v}");
    let (st, v) = call(&c, Method::GET, s.url("/admin/v1/hooks"), None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["hooks"].as_array().unwrap().len(), 1, "{v}");

    register(&c, &s, tmp.path(), "v2", 5).await;
    let env = until_file(&out, Duration::from_secs(30)).await;
    let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
    assert!(names.contains(&"LLMOPS_EVENT_TYPE"), "{env}");
    assert!(names.contains(&"PATH"), "{env}");
    for n in &names {
        assert!(
            !n.starts_with("LLMOPS_") || n.starts_with("LLMOPS_EVENT"),
            "the hook's child sees {n}:\n{env}"
        );
    }
    assert!(!env.contains(ADMIN), "the admin key leaked:\n{env}");
    assert!(!names.contains(&"CARGO_MANIFEST_DIR"), "{env}");
}

/// Whether a process is gone (or a zombie waiting for a reaper).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_hook_that_forks_a_sleeper_leaves_no_process_after_its_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let pid_file = tmp.path().join("sleeper.pid");
    let mut s = serve_with_hooks(
        tmp.path(),
        json!([{
            "name": "forks",
            "command": ["sh", "-c", format!("sleep 300 & echo $! > {}; wait", pid_file.display())],
            "events": ["version_registered"],
            "timeout_secs": 1.0,
            "retries": 0,
        }]),
    );
    s.ready().await;
    let c = reqwest::Client::new();
    register(&c, &s, tmp.path(), "v2", 6).await;
    let pid: u32 = until_file(&pid_file, Duration::from_secs(30))
        .await
        .trim()
        .parse()
        .unwrap();
    // The hook times out after 1 s; its whole group goes with it.
    let t0 = Instant::now();
    while !gone(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the hook's sleeper {pid} outlived the hook"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the server says why the delivery failed.
    let t0 = Instant::now();
    loop {
        let (_, v) = call(&c, Method::GET, s.url("/admin/v1/audit"), None).await;
        let failed = v["entries"].as_array().unwrap().iter().any(|e| {
            e["action"] == "hook_delivery"
                && e["hook"] == "forks"
                && e["result"].as_str().is_some_and(|r| r.contains("killed"))
        });
        if failed {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server whose only model root is `root`, serving a trainable parent.
async fn rooted(tmp: &Path, root: &Path) -> TestServer {
    let parent = crate::retrain::parent(root);
    let root = root.to_path_buf();
    TestServer::start_in(&parent, &tmp.join("registry"), move |a| {
        a.api_keys = vec![format!("ops:admin:{ADMIN}")];
        a.model_roots = vec![root];
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_an_admin_names_stay_under_the_roots_and_nothing_outside_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let s = rooted(tmp.path(), &root).await;
    let c = reqwest::Client::new();
    let outside = tmp.path().join("outside.txt");
    std::fs::write(&outside, "the server's own secret text. ".repeat(50)).unwrap();
    let link = root.join("link.txt");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let dir_with_link = root.join("mixed");
    std::fs::create_dir_all(&dir_with_link).unwrap();
    std::fs::write(dir_with_link.join("ok.txt"), "fine. ".repeat(50)).unwrap();
    std::os::unix::fs::symlink(&outside, dir_with_link.join("out.txt")).unwrap();

    let retrain = s.url("/admin/v1/models/tiny/retrain");
    let cases: Vec<(Value, &str)> = vec![
        (json!({"data": ["/proc/self/environ"], "steps": 1}), "data"),
        (json!({"data": ["/"], "steps": 1}), "data"),
        (json!({"data": [outside], "steps": 1}), "data"),
        (json!({"data": [link], "steps": 1}), "data"),
        (json!({"data": [dir_with_link], "steps": 1}), "data"),
        (
            json!({"data": [root.join("../outside.txt")], "steps": 1}),
            "data",
        ),
        (
            json!({"data": [root.join("mixed/ok.txt")], "steps": 1,
                   "replay_data": ["/etc/passwd"], "replay_share": 0.5}),
            "replay_data",
        ),
    ];
    for (body, param) in cases {
        let (st, v) = call(&c, Method::POST, retrain.clone(), Some(body.clone())).await;
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("under") || m.contains("regular")),
            "{body}: {v}"
        );
    }
    // Nothing was started, so nothing was read.
    let (st, v) = call(&c, Method::GET, retrain, None).await;
    assert_eq!(st, 404, "no retrain ran: {v}");

    // A drift reference outside the roots, and names that would be paths.
    let version = root.join("v2");
    SynthSpec {
        seed: 4,
        ..SynthSpec::tiny_llama()
    }
    .write(&version, None)
    .unwrap();
    let versions = |model: &str| s.url(&format!("/admin/v1/models/{model}/versions"));
    let (st, v) = call(
        &c,
        Method::POST,
        versions("tiny"),
        Some(json!({"path": version, "version": "v2",
                    "metadata": {"drift_reference": "/etc/passwd"}})),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "metadata.drift_reference", "{v}");
    for (model, ver) in [("tiny", ".."), ("tiny", "."), ("..", "v2"), ("...", "v2")] {
        let (st, v) = call(
            &c,
            Method::POST,
            versions(model),
            Some(json!({"path": version, "version": ver})),
        )
        .await;
        assert!(
            st == 400 || st == 404,
            "model {model:?} version {ver:?}: {st} {v}"
        );
    }
    // The same version, well named and without the reference, registers.
    let (st, v) = call(
        &c,
        Method::POST,
        versions("tiny"),
        Some(json!({"path": version, "version": "v2"})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_model_roots_training_data_comes_only_from_the_capture_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = crate::retrain::parent(tmp.path());
    let s = TestServer::start_in(&parent, &tmp.path().join("registry"), |a| {
        a.api_keys = vec![format!("ops:admin:{ADMIN}")];
    })
    .await;
    let c = reqwest::Client::new();
    let corpus: PathBuf = tmp.path().join("corpus.txt");
    let (st, v) = call_as(
        &c,
        Method::POST,
        s.url("/admin/v1/models/tiny/retrain"),
        Some(json!({"data": [corpus], "steps": 1})),
        ADMIN,
    )
    .await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--model-root")),
        "{v}"
    );
    s.stop().await;
}
