//! The registry, admin API and hot swap: zero-drop swaps under load, memory
//! returned on unload, crash safety under SIGKILL, roles and bad inputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use llmops::engine::synth::SynthSpec;
use serde_json::{Value, json};

use crate::process::{ADMIN, Served, call_as, tiny};
use crate::server::TestServer;

const APP: &str = "1nf";

fn keys(a: &mut llmops::config::ServeArgs) {
    a.api_keys = vec![format!("ops:admin:{ADMIN}"), format!("app:inference:{APP}")];
}

/// Streams one greedy completion; returns (text, fingerprints seen).
async fn stream_once(c: &reqwest::Client, s: &TestServer) -> Result<(String, Vec<String>), String> {
    let body = json!({"model": "tiny", "prompt": "swap", "max_tokens": 24, "temperature": 0, "ignore_eos": true, "stream": true});
    let resp = c
        .post(s.url("/v1/completions"))
        .bearer_auth(APP)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    let mut text = String::new();
    let mut fps = vec![];
    let mut buf = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.map_err(|e| e.to_string())?));
        while let Some(i) = buf.find("\n\n") {
            let ev: String = buf.drain(..i + 2).collect();
            let data = ev.trim().trim_start_matches("data: ");
            if data == "[DONE]" {
                return Ok((text, fps));
            }
            let v: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
            if v.get("error").is_some() {
                return Err(v.to_string());
            }
            fps.push(
                v["system_fingerprint"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
            text.push_str(v["choices"][0]["text"].as_str().unwrap_or_default());
        }
    }
    Err("stream ended without [DONE]".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switching_stable_ten_times_under_streaming_load_drops_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tiny(tmp.path(), "b", 777);
    let s = TestServer::start(keys).await;
    let c = reqwest::Client::new();
    let base = |p: &str| s.url(&format!("/admin/v1/models/tiny{p}"));
    let (st, v) = call_as(
        &c,
        reqwest::Method::POST,
        base("/versions"),
        Some(json!({"path": b, "version": "blue", "reason": "candidate"})),
        ADMIN,
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = call_as(&c, reqwest::Method::GET, base(""), None, ADMIN).await;
    assert_eq!(st, 200, "{v}");
    let green = v["aliases"]["stable"].as_str().unwrap().to_string();
    for version in [&green, &"blue".to_string()] {
        let (st, v) = call_as(
            &c,
            reqwest::Method::POST,
            base(&format!("/versions/{version}/load")),
            None,
            ADMIN,
        )
        .await;
        assert_eq!(st, 200, "{v}");
    }
    // Each version's answer, from the version itself.
    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    for version in [&green, &"blue".to_string(), &green] {
        let (st, v) = call_as(
            &c,
            reqwest::Method::PUT,
            base("/aliases/stable"),
            Some(json!({"version": version})),
            ADMIN,
        )
        .await;
        assert_eq!(st, 200, "{v}");
        let (text, fps) = stream_once(&c, &s).await.unwrap();
        assert!(fps.iter().all(|f| f == version));
        expected.insert(version.clone(), text);
    }
    assert_ne!(
        expected[&green], expected["blue"],
        "the two versions must answer differently"
    );

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (c, stop) = (c.clone(), stop.clone());
            let s = &s;
            async move {
                let mut out = vec![];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    out.push(stream_once(&c, s).await);
                }
                out
            }
        })
        .collect();
    let switcher = async {
        let mut last = green.clone();
        for i in 0..10 {
            tokio::time::sleep(Duration::from_millis(120)).await;
            let to = if i % 2 == 0 {
                "blue".to_string()
            } else {
                green.clone()
            };
            let (st, v) = call_as(
                &c,
                reqwest::Method::PUT,
                base("/aliases/stable"),
                Some(json!({"version": to, "reason": format!("swap {i}")})),
                ADMIN,
            )
            .await;
            assert_eq!(st, 200, "{v}");
            last = to;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        last
    };
    let (results, last) = tokio::join!(futures::future::join_all(clients), switcher);
    let results: Vec<_> = results.into_iter().flatten().collect();
    assert!(results.len() >= 32, "load ran ({} requests)", results.len());
    let mut seen = BTreeMap::new();
    for r in &results {
        let (text, fps) = r.as_ref().expect("no request fails during swaps");
        let first = &fps[0];
        assert!(
            fps.iter().all(|f| f == first),
            "a response mixes versions: {fps:?}"
        );
        assert_eq!(
            text, &expected[first],
            "the text comes entirely from {first}"
        );
        *seen.entry(first.clone()).or_insert(0) += 1;
    }
    assert_eq!(
        seen.len(),
        2,
        "both versions served during the run: {seen:?}"
    );
    let (_, fps) = stream_once(&c, &s).await.unwrap();
    assert!(
        fps.iter().all(|f| *f == last),
        "new requests hit the last version"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_refuse_inference_keys_and_bad_inputs_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start(keys).await;
    let c = reqwest::Client::new();
    let u = |p: &str| s.url(p);
    use reqwest::Method as M;
    let routes = [
        (M::GET, "/admin/v1/serving", None),
        (M::GET, "/admin/v1/models", None),
        (M::GET, "/admin/v1/models/tiny", None),
        (
            M::POST,
            "/admin/v1/models/tiny/versions",
            Some(json!({"path": "/nope"})),
        ),
        (M::GET, "/admin/v1/models/tiny/versions/v1", None),
        (M::POST, "/admin/v1/models/tiny/versions/v1/load", None),
        (M::POST, "/admin/v1/models/tiny/versions/v1/unload", None),
        (
            M::PUT,
            "/admin/v1/models/tiny/aliases/stable",
            Some(json!({"version": "v1"})),
        ),
        (M::DELETE, "/admin/v1/models/tiny/aliases/canary", None),
        (
            M::PUT,
            "/admin/v1/models/tiny/shadow",
            Some(json!({"version": "v1"})),
        ),
        (M::GET, "/admin/v1/models/tiny/shadow", None),
        (M::DELETE, "/admin/v1/models/tiny/shadow", None),
        (M::GET, "/admin/v1/models/tiny/shadow/samples", None),
        (M::GET, "/admin/v1/audit", None),
    ];
    for (m, path, body) in &routes {
        let (st, v) = call_as(&c, m.clone(), u(path), body.clone(), APP).await;
        assert_eq!(st, 403, "{m} {path}: {v}");
        assert_eq!(v["error"]["type"], "permission_error");
    }
    // gRPC too.
    let mut g = llmops::proto::admin_client::AdminClient::connect(format!("http://{}", s.grpc))
        .await
        .unwrap();
    let mut r = tonic::Request::new(llmops::proto::ServingRequest {});
    r.metadata_mut()
        .insert("authorization", format!("Bearer {APP}").parse().unwrap());
    assert_eq!(
        g.serving(r).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    let mut r = tonic::Request::new(llmops::proto::ReadAuditRequest {
        after: None,
        limit: 10,
    });
    r.metadata_mut()
        .insert("authorization", format!("Bearer {APP}").parse().unwrap());
    assert_eq!(
        g.read_audit(r).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );

    let models_url = s.url("/admin/v1/models");
    let state = || {
        let (c, url) = (c.clone(), models_url.clone());
        async move { call_as(&c, M::GET, url, None, ADMIN).await.1 }
    };
    let before = state().await;
    let corrupt = tiny(tmp.path(), "corrupt", 3);
    let st_path = corrupt.join("model.safetensors");
    let bytes = std::fs::read(&st_path).unwrap();
    std::fs::write(&st_path, &bytes[..bytes.len() / 3]).unwrap();
    let good = tiny(tmp.path(), "good", 4);
    let (st, v) = call_as(
        &c,
        M::POST,
        u("/admin/v1/models/tiny/versions"),
        Some(json!({"path": good, "version": "g1"})),
        ADMIN,
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let before_bad = state().await;
    assert_ne!(before, before_bad);
    let bad_rows = [
        (
            "missing path",
            M::POST,
            "/admin/v1/models/tiny/versions",
            Some(json!({"path": "/no/such/model"})),
            400,
        ),
        (
            "corrupt weights",
            M::POST,
            "/admin/v1/models/tiny/versions",
            Some(json!({"path": corrupt})),
            400,
        ),
        (
            "duplicate version",
            M::POST,
            "/admin/v1/models/tiny/versions",
            Some(json!({"path": tiny(tmp.path(), "other", 5), "version": "g1"})),
            409,
        ),
        (
            "duplicate weights",
            M::POST,
            "/admin/v1/models/tiny/versions",
            Some(json!({"path": good})),
            409,
        ),
        (
            "unknown alias",
            M::DELETE,
            "/admin/v1/models/tiny/aliases/nope",
            None,
            404,
        ),
        (
            "unknown version",
            M::PUT,
            "/admin/v1/models/tiny/aliases/stable",
            Some(json!({"version": "v404"})),
            404,
        ),
        (
            "unknown model",
            M::PUT,
            "/admin/v1/models/ghost/aliases/stable",
            Some(json!({"version": "v1"})),
            404,
        ),
        (
            "unload the serving version",
            M::POST,
            "/admin/v1/models/tiny/versions/v1/unload",
            None,
            409,
        ),
        (
            "invalid version id",
            M::POST,
            "/admin/v1/models/tiny/versions",
            Some(json!({"path": good, "version": "a b"})),
            400,
        ),
    ];
    for (name, m, path, body, want) in bad_rows {
        let (st, v) = call_as(&c, m, u(path), body, ADMIN).await;
        assert_eq!(st, want, "{name}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{name}"
        );
        assert_eq!(state().await, before_bad, "{name} changed the registry");
    }
    // Failures are audited with their reason.
    let (_, audit) = call_as(&c, M::GET, u("/admin/v1/audit"), None, ADMIN).await;
    let failed = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["result"] != "ok")
        .count();
    assert!(failed >= 7, "failed actions are audited: {audit}");
    s.stop().await;
}

// ---- the real binary, for memory and crash tests ----

/// The real binary serving `model` from `data`, ready.
async fn spawn(model: &Path, data: &Path) -> Served {
    spawn_with(model, data, None).await
}

/// [`spawn`], with files the server writes capped at `file_size_limit`
/// bytes (RLIMIT_FSIZE): a write past it fails as on a full disk.
async fn spawn_with(model: &Path, data: &Path, file_size_limit: Option<u64>) -> Served {
    use std::os::unix::process::CommandExt;
    let mut p = Served::spawn(model, data, &data.with_extension("log"), |cmd| {
        if let Some(limit) = file_size_limit {
            // SAFETY: setrlimit and signal are async-signal-safe; nothing
            // else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    // Without this, SIGXFSZ kills the server instead of the
                    // write failing with EFBIG.
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    let lim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    });
    p.ready().await;
    p
}

async fn rss(c: &reqwest::Client, p: &Served) -> f64 {
    let text = c
        .get(format!("http://127.0.0.1:{}/metrics", p.http))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("process_resident_memory_bytes"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unloading_a_version_returns_its_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let small = tiny(tmp.path(), "small", 1);
    let big = tmp.path().join("big");
    // ~60 MB of f32 weights.
    SynthSpec {
        vocab: 8000,
        hidden: 512,
        intermediate: 1024,
        layers: 6,
        heads: 8,
        kv_heads: 8,
        head_dim: 64,
        std: 0.02,
        ..SynthSpec::tiny_llama()
    }
    .write(&big, None)
    .unwrap();
    let model_bytes = std::fs::metadata(big.join("model.safetensors"))
        .unwrap()
        .len() as f64;
    let p = spawn(&small, &tmp.path().join("data")).await;
    let c = reqwest::Client::new();
    let url = |s: &str| format!("http://127.0.0.1:{}{s}", p.http);
    let (st, v) = call_as(
        &c,
        reqwest::Method::POST,
        url("/admin/v1/models/tiny/versions"),
        Some(json!({"path": big, "version": "big"})),
        ADMIN,
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let before_load = rss(&c, &p).await;
    let (st, v) = call_as(
        &c,
        reqwest::Method::POST,
        url("/admin/v1/models/tiny/versions/big/load"),
        None,
        ADMIN,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let loaded = rss(&c, &p).await;
    let (st, v) = call_as(
        &c,
        reqwest::Method::POST,
        url("/admin/v1/models/tiny/versions/big/unload"),
        None,
        ADMIN,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let after = rss(&c, &p).await;
    eprintln!(
        "model {:.0} MB; RSS before load {:.0} MB, loaded {:.0} MB, after unload {:.0} MB",
        model_bytes / 1e6,
        before_load / 1e6,
        loaded / 1e6,
        after / 1e6
    );
    assert!(
        loaded - before_load > 0.7 * model_bytes,
        "loading takes roughly the model's size"
    );
    assert!(
        loaded - after > 0.7 * model_bytes,
        "unloading returns roughly the model's size"
    );
}

/// Replays the audit log's successful entries into (versions, aliases).
fn replay(audit: &Value) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let (mut versions, mut aliases) = (BTreeMap::new(), BTreeMap::new());
    for e in audit["entries"].as_array().unwrap() {
        if e["result"] != "ok" {
            continue;
        }
        match e["action"].as_str().unwrap() {
            "register_version" => {
                versions.insert(
                    e["record"]["version"].as_str().unwrap().to_string(),
                    e["record"]["sha256"].as_str().unwrap().to_string(),
                );
            }
            "set_alias" => match e["version"].as_str() {
                Some(v) => {
                    aliases.insert(e["alias"].as_str().unwrap().to_string(), v.to_string());
                }
                None => {
                    aliases.remove(e["alias"].as_str().unwrap());
                }
            },
            _ => {}
        }
    }
    (versions, aliases)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_registrations_and_swaps_leaves_a_consistent_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny(tmp.path(), "base", 1);
    let candidates: Vec<PathBuf> = (0..24)
        .map(|i| tiny(tmp.path(), &format!("c{i}"), 100 + i))
        .collect();
    let data = tmp.path().join("data");
    let c = reqwest::Client::new();
    let mut next = 0;
    for round in 0..8u64 {
        let p = spawn(&base, &data).await;
        let url = |s: &str| format!("http://127.0.0.1:{}{s}", p.http);
        // The registry after restart equals the replay of its audit log,
        // read page by page (a page holds at most 1,000 entries).
        let mut entries = vec![];
        loop {
            let after = entries
                .last()
                .map_or(0, |e: &Value| e["seq"].as_u64().unwrap());
            let (_, page) = call_as(
                &c,
                reqwest::Method::GET,
                url(&format!("/admin/v1/audit?after={after}&limit=1000")),
                None,
                ADMIN,
            )
            .await;
            let page = page["entries"].as_array().unwrap().clone();
            if page.is_empty() {
                break;
            }
            entries.extend(page);
        }
        let audit = json!({ "entries": entries });
        let (_, model) = call_as(
            &c,
            reqwest::Method::GET,
            url("/admin/v1/models/tiny"),
            None,
            ADMIN,
        )
        .await;
        let (versions, aliases) = replay(&audit);
        let listed: BTreeMap<String, String> = model["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["version"].as_str().unwrap().to_string(),
                    v["sha256"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            listed, versions,
            "round {round}: versions match the audit log"
        );
        eprintln!(
            "round {round}: {} audit entries, {} versions, aliases {aliases:?}",
            audit["entries"].as_array().unwrap().len(),
            listed.len()
        );
        assert!(
            listed.values().all(|d| d.len() == 64),
            "no half-registered version"
        );
        let got_aliases: BTreeMap<String, String> =
            serde_json::from_value(model["aliases"].clone()).unwrap();
        assert_eq!(
            got_aliases, aliases,
            "round {round}: aliases match the audit log"
        );
        // What serves is what `stable` says.
        let (_, serving) = call_as(
            &c,
            reqwest::Method::GET,
            url("/admin/v1/serving"),
            None,
            ADMIN,
        )
        .await;
        assert_eq!(
            serving["models"][0]["serving"]["version"],
            json!(aliases["stable"]),
            "round {round}"
        );

        // Hammer the admin API, then kill at a random point.
        let work = async {
            loop {
                // Register the next candidate while any remain, and switch aliases.
                let ver = if next < candidates.len() {
                    let path = &candidates[next];
                    let (st, v) = call_as(
                        &c,
                        reqwest::Method::POST,
                        url("/admin/v1/models/tiny/versions"),
                        Some(json!({"path": path})),
                        ADMIN,
                    )
                    .await;
                    assert!(st == 201 || st == 409, "{v}");
                    if st == 201 {
                        next += 1;
                    }
                    v["version"].as_str().map(str::to_string)
                } else {
                    next += 1;
                    Some(format!("v{}", 1 + next % candidates.len()))
                };
                if let Some(ver) = ver {
                    call_as(
                        &c,
                        reqwest::Method::PUT,
                        url("/admin/v1/models/tiny/aliases/stable"),
                        Some(json!({"version": ver})),
                        ADMIN,
                    )
                    .await;
                    call_as(
                        &c,
                        reqwest::Method::PUT,
                        url("/admin/v1/models/tiny/aliases/previous"),
                        Some(json!({"version": ver})),
                        ADMIN,
                    )
                    .await;
                }
            }
        };
        let delay = Duration::from_millis(80 + (round * 97) % 400);
        let _ = tokio::time::timeout(delay, work).await;
        // SIGKILL (Child::kill) in the middle of whatever it was doing.
        drop(p);
    }
}

// ---- integrity and robustness (issue 18, item 9) ----

/// An in-process server on the registry in `data`, serving `models`
/// (name, path); `tweak` adjusts the flags further.
async fn serve_models(
    data: &Path,
    models: &[(&str, &Path)],
    tweak: impl FnOnce(&mut llmops::config::ServeArgs),
) -> TestServer {
    let (names, paths): (Vec<String>, Vec<PathBuf>) = models
        .iter()
        .map(|(n, p)| (n.to_string(), p.to_path_buf()))
        .unzip();
    let data = data.to_path_buf();
    TestServer::start(move |a| {
        keys(a);
        a.models = paths;
        a.model_names = names;
        a.data_dir = Some(data);
        tweak(a);
    })
    .await
}

async fn complete(c: &reqwest::Client, s: &TestServer, model: &str) -> u16 {
    let body = json!({"model": model, "prompt": "hi", "max_tokens": 2});
    c.post(s.url("/v1/completions"))
        .bearer_auth(APP)
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The `serving` entry of one model.
async fn serving_of(c: &reqwest::Client, s: &TestServer, model: &str) -> Value {
    let (st, v) = call_as(
        c,
        reqwest::Method::GET,
        s.url("/admin/v1/serving"),
        None,
        ADMIN,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    v["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == model)
        .cloned()
        .unwrap_or_else(|| panic!("{model} is not in {v}"))
}

/// The value of the first exported sample of `name` whose labels contain
/// every `k="v"` in `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|kv| l.contains(kv)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn replace_weights(from: &Path, to: &Path) {
    std::fs::copy(from.join("model.safetensors"), to.join("model.safetensors")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_whose_files_changed_is_refused_naming_both_digests() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny(tmp.path(), "base", 11);
    let cand = tiny(tmp.path(), "cand", 12);
    let s = serve_models(&tmp.path().join("data"), &[("tiny", &base)], |_| {}).await;
    let c = reqwest::Client::new();
    let u = |p: &str| s.url(&format!("/admin/v1/models/tiny{p}"));
    let (st, v) = call_as(
        &c,
        reqwest::Method::POST,
        u("/versions"),
        Some(json!({"path": cand, "version": "changed"})),
        ADMIN,
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let registered = v["sha256"].as_str().unwrap().to_string();
    // Other, perfectly loadable weights put in place of the registered ones.
    replace_weights(&tiny(tmp.path(), "other", 13), &cand);
    let found = llmops::registry::digest_path(&cand).unwrap();
    assert_ne!(found, registered);
    let attempts = [
        (reqwest::Method::POST, u("/versions/changed/load"), None),
        (
            reqwest::Method::PUT,
            u("/aliases/stable"),
            Some(json!({"version": "changed"})),
        ),
    ];
    for (m, url, body) in attempts {
        let (st, v) = call_as(&c, m.clone(), url, body, ADMIN).await;
        assert_eq!(st, 503, "{m}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("`changed`") && msg.contains(&registered) && msg.contains(&found),
            "{msg}"
        );
    }
    let tiny_now = serving_of(&c, &s, "tiny").await;
    assert_eq!(tiny_now["serving"]["version"], "v1", "{tiny_now}");
    assert_eq!(tiny_now["aliases"]["stable"], "v1", "{tiny_now}");
    let metrics = s.metrics_text().await;
    let failures = sample(
        &metrics,
        "llmops_model_load_failures_total",
        &["model=\"tiny\"", "version=\"changed\""],
    );
    assert_eq!(failures, Some(2.0), "both refusals are counted");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_whose_files_vanished_or_changed_do_not_stop_the_others_from_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let healthy = tiny(tmp.path(), "healthy", 21);
    let gone = tiny(tmp.path(), "gone", 22);
    let swapped = tiny(tmp.path(), "swapped", 23);
    let s = serve_models(
        &data,
        &[("tiny", &healthy), ("gone", &gone), ("swapped", &swapped)],
        |_| {},
    )
    .await;
    s.stop().await;
    std::fs::remove_dir_all(&gone).unwrap();
    replace_weights(&tiny(tmp.path(), "other", 24), &swapped);

    // `gone` is still configured (its path is missing now); `swapped` is
    // only in the registry.
    let s = serve_models(&data, &[("tiny", &healthy), ("gone", &gone)], |_| {}).await;
    let c = reqwest::Client::new();
    assert_eq!(complete(&c, &s, "tiny").await, 200);
    assert_ne!(complete(&c, &s, "gone").await, 200);
    assert_ne!(complete(&c, &s, "swapped").await, 200);
    let ready = reqwest::get(s.url("/ready")).await.unwrap().status();
    assert_eq!(ready, 200, "ready: the healthy model serves");

    let t = serving_of(&c, &s, "tiny").await;
    assert_eq!(t["serving"]["version"], "v1", "{t}");
    assert!(t["failed"].is_null(), "{t}");
    let g = serving_of(&c, &s, "gone").await;
    assert!(g["serving"].is_null(), "{g}");
    assert_eq!(g["failed"]["version"], "v1", "{g}");
    let reason = g["failed"]["reason"].as_str().unwrap();
    assert!(reason.contains("failed to load"), "{reason}");
    let w = serving_of(&c, &s, "swapped").await;
    let reason = w["failed"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("changed since it was registered"),
        "{reason}"
    );

    let metrics = s.metrics_text().await;
    for (model, want) in [("tiny", 1.0), ("gone", 0.0), ("swapped", 0.0)] {
        let label = format!("model=\"{model}\"");
        let got = sample(&metrics, "llmops_model_serving", &[&label]);
        assert_eq!(got, Some(want), "{model}");
    }
    let failures = sample(
        &metrics,
        "llmops_model_load_failures_total",
        &["model=\"gone\"", "version=\"v1\""],
    );
    assert!(failures >= Some(1.0), "{failures:?}");

    // Pointing `stable` at good weights brings the model back.
    let good = tiny(tmp.path(), "good", 25);
    let url = |p: &str| s.url(&format!("/admin/v1/models/swapped{p}"));
    let (st, v) = call_as(
        &c,
        reqwest::Method::POST,
        url("/versions"),
        Some(json!({"path": good, "version": "good"})),
        ADMIN,
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = call_as(
        &c,
        reqwest::Method::PUT,
        url("/aliases/stable"),
        Some(json!({"version": "good"})),
        ADMIN,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(complete(&c, &s, "swapped").await, 200);
    let w = serving_of(&c, &s, "swapped").await;
    assert!(w["failed"].is_null(), "{w}");
    s.stop().await;

    // When not one model can be served, the server refuses to start and
    // says why.
    std::fs::remove_dir_all(&healthy).unwrap();
    std::fs::remove_dir_all(&good).unwrap();
    let args = llmops::config::ServeArgs {
        models: vec![healthy.clone()],
        model_names: vec!["tiny".into()],
        data_dir: Some(data.clone()),
        ..Default::default()
    };
    let cfg = llmops::config::Config::load(&args).unwrap();
    let listeners = llmops::app::Listeners {
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        metrics: None,
    };
    let run = llmops::app::run(cfg, listeners, std::future::pending());
    let err = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("it gives up, not hangs")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no model can be served") && err.contains("gone") && err.contains("tiny"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_line_in_the_log_is_dropped_and_the_server_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let base = tiny(tmp.path(), "base", 41);
    serve_models(&data, &[("tiny", &base)], |_| {})
        .await
        .stop()
        .await;
    let log = data.join("audit.jsonl");
    let good = std::fs::read(&log).unwrap();
    // A crash while writing a record whose model card is not ASCII: the
    // tail ends inside a UTF-8 character.
    let mut torn = good.clone();
    torn.extend_from_slice(b"{\"seq\":99,\"time\":\"2026\",\"model_card\":\"caf\xC3");
    std::fs::write(&log, &torn).unwrap();

    let s = serve_models(&data, &[("tiny", &base)], |_| {}).await;
    let c = reqwest::Client::new();
    let (st, v) = call_as(
        &c,
        reqwest::Method::PUT,
        s.url("/admin/v1/models/tiny/aliases/canary"),
        Some(json!({"version": "v1"})),
        ADMIN,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    s.stop().await;
    let text = std::fs::read(&log).unwrap();
    assert!(text.starts_with(&good), "the good entries stay");
    assert!(
        !text.windows(8).any(|w| w == b"\"seq\":99"),
        "torn tail cut"
    );
    let r = llmops::registry::Registry::open(&data).unwrap();
    assert_eq!(r.state().alias("tiny", "canary"), Some("v1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_is_cut_back_so_the_log_stays_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny(tmp.path(), "base", 51);
    let data = tmp.path().join("data");
    let c = reqwest::Client::new();
    let p = spawn(&base, &data).await;
    let cand = tiny(tmp.path(), "cand", 52);
    let (st, v) = call_as(
        &c,
        reqwest::Method::POST,
        format!("http://127.0.0.1:{}/admin/v1/models/tiny/versions", p.http),
        Some(json!({"path": cand, "version": "v2"})),
        ADMIN,
    )
    .await;
    assert_eq!(st, 201, "{v}");
    drop(p);
    let log = data.join("audit.jsonl");
    let before = std::fs::read(&log).unwrap();

    // The log may grow by 64 bytes only: the next entry is written in part,
    // then the write fails, as on a full disk.
    let p = spawn_with(&base, &data, Some(before.len() as u64 + 64)).await;
    let url = format!(
        "http://127.0.0.1:{}/admin/v1/models/tiny/aliases/canary",
        p.http
    );
    for _ in 0..2 {
        let (st, v) = call_as(
            &c,
            reqwest::Method::PUT,
            url.clone(),
            Some(json!({"version": "v1"})),
            ADMIN,
        )
        .await;
        assert_eq!(st, 507, "{v}");
        let after = std::fs::read(&log).unwrap();
        assert_eq!(after.len(), before.len(), "the partial line is cut off");
        assert!(after == before);
    }
    // A hot swap whose audit entry cannot be written is refused to the
    // caller and changes nothing: v1 still serves, and inference goes on.
    let base_url = |s: &str| format!("http://127.0.0.1:{}{s}", p.http);
    let (st, v) = call_as(
        &c,
        reqwest::Method::PUT,
        base_url("/admin/v1/models/tiny/aliases/stable"),
        Some(json!({"version": "v2"})),
        ADMIN,
    )
    .await;
    assert_eq!(st, 507, "{v}");
    assert_eq!(v["error"]["type"], "server_error", "{v}");
    assert_eq!(v["error"]["code"], "insufficient_storage", "{v}");
    let (_, model) = call_as(
        &c,
        reqwest::Method::GET,
        base_url("/admin/v1/models/tiny"),
        None,
        ADMIN,
    )
    .await;
    assert_eq!(model["aliases"], json!({"stable": "v1"}), "{model}");
    let (_, serving) = call_as(
        &c,
        reqwest::Method::GET,
        base_url("/admin/v1/serving"),
        None,
        ADMIN,
    )
    .await;
    assert_eq!(
        serving["models"][0]["serving"]["version"], "v1",
        "{serving}"
    );
    for _ in 0..3 {
        let r = c
            .post(base_url("/v1/completions"))
            .bearer_auth(ADMIN)
            .json(&json!({"model": "tiny", "prompt": "hi", "max_tokens": 4}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "inference goes on with the disk full");
    }
    assert!(std::fs::read(&log).unwrap() == before, "no partial line");
    drop(p);

    // With room again, the next append lands on a clean line.
    let p = spawn(&base, &data).await;
    let url = format!(
        "http://127.0.0.1:{}/admin/v1/models/tiny/aliases/canary",
        p.http
    );
    let (st, v) = call_as(
        &c,
        reqwest::Method::PUT,
        url,
        Some(json!({"version": "v1"})),
        ADMIN,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    drop(p);
    let r = llmops::registry::Registry::open(&data).unwrap();
    assert_eq!(r.state().alias("tiny", "canary"), Some("v1"));
}

/// Caps the files a running process may write at `limit` bytes from now on
/// (RLIMIT_FSIZE's soft limit; the hard one stays, so it can be raised).
fn limit_file_size(pid: u32, limit: u64) {
    let lim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit reads `lim`, a valid rlimit, and writes nothing (the
    // old-limit pointer is null).
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// The versions `/admin/v1/serving` says are loaded for `tiny`.
async fn loaded(c: &reqwest::Client, p: &Served) -> Vec<String> {
    let (_, v) = call_as(
        c,
        reqwest::Method::GET,
        p.url("/admin/v1/serving"),
        None,
        ADMIN,
    )
    .await;
    v["models"][0]["loaded"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_register_load_and_unload_with_507_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny(tmp.path(), "base", 61);
    let data = tmp.path().join("data");
    let c = reqwest::Client::new();
    // No limit yet (SIGXFSZ ignored, so a limit set later fails writes).
    let p = spawn_with(&base, &data, Some(libc::RLIM_INFINITY)).await;
    let post = |path: String, body: Option<Value>| {
        let c = c.clone();
        async move { call_as(&c, reqwest::Method::POST, path, body, ADMIN).await }
    };
    for (v, seed) in [("v2", 62), ("v3", 63)] {
        let m = tiny(tmp.path(), v, seed);
        let (st, body) = post(
            p.url("/admin/v1/models/tiny/versions"),
            Some(json!({"path": m, "version": v})),
        )
        .await;
        assert_eq!(st, 201, "{body}");
    }
    let (st, body) = post(p.url("/admin/v1/models/tiny/versions/v3/load"), None).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(loaded(&c, &p).await, ["v1", "v3"]);

    // The disk fills: the log may grow by 64 bytes, less than any entry.
    let log = data.join("audit.jsonl");
    let before = std::fs::read(&log).unwrap();
    limit_file_size(p.pid(), before.len() as u64 + 64);
    let refused = |what: &str, st: u16, v: &Value| {
        assert_eq!(st, 507, "{what}: {v}");
        assert_eq!(v["error"]["type"], "server_error", "{what}: {v}");
        assert_eq!(v["error"]["code"], "insufficient_storage", "{what}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("registry log") && message.contains("not taken"),
            "{what}: the message names the failed write: {v}"
        );
        let now = std::fs::read(&log).unwrap();
        assert!(
            now == before,
            "{what}: the log is byte-identical ({} bytes, was {})",
            now.len(),
            before.len()
        );
    };
    let v4 = tiny(tmp.path(), "v4", 64);
    let (st, v) = post(
        p.url("/admin/v1/models/tiny/versions"),
        Some(json!({"path": v4, "version": "v4"})),
    )
    .await;
    refused("register", st, &v);
    let (st, v) = post(p.url("/admin/v1/models/tiny/versions/v2/load"), None).await;
    refused("load", st, &v);
    assert_eq!(
        loaded(&c, &p).await,
        ["v1", "v3"],
        "a refused load leaves nothing loaded"
    );
    let (st, v) = post(p.url("/admin/v1/models/tiny/versions/v3/unload"), None).await;
    refused("unload", st, &v);
    assert_eq!(
        loaded(&c, &p).await,
        ["v1", "v3"],
        "a refused unload leaves the version loaded"
    );
    let (_, model) = call_as(
        &c,
        reqwest::Method::GET,
        p.url("/admin/v1/models/tiny"),
        None,
        ADMIN,
    )
    .await;
    assert!(
        !model.to_string().contains("\"v4\""),
        "a refused registration is not listed: {model}"
    );
    for _ in 0..3 {
        let r = c
            .post(p.url("/v1/completions"))
            .bearer_auth(ADMIN)
            .json(&json!({"model": "tiny", "prompt": "hi", "max_tokens": 4}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "inference goes on with the disk full");
    }
    drop(p);

    // Restarted with room: the registry is the one before the disk filled,
    // and the next registration lands on a clean line.
    let r = llmops::registry::Registry::open(&data).unwrap();
    let versions = |r: &llmops::registry::Registry| {
        ["v1", "v2", "v3", "v4"].map(|v| r.state().version("tiny", v).is_some())
    };
    assert_eq!(versions(&r), [true, true, true, false]);
    drop(r);
    let p = spawn(&base, &data).await;
    let (st, body) = post(
        p.url("/admin/v1/models/tiny/versions"),
        Some(json!({"path": v4, "version": "v4"})),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let (st, body) = post(p.url("/admin/v1/models/tiny/versions/v2/load"), None).await;
    assert_eq!(st, 200, "{body}");
    drop(p);
    let r = llmops::registry::Registry::open(&data).unwrap();
    assert_eq!(versions(&r), [true, true, true, true]);
    assert!(std::fs::read(&log).unwrap().starts_with(&before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_and_fifos_are_refused_at_once_and_the_admin_plane_stays_up() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start(keys).await;
    let c = reqwest::Client::new();
    let mkfifo = |p: &Path| {
        let st = Command::new("mkfifo").arg(p).status().unwrap();
        assert!(st.success());
    };
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    // A model folder whose weights file is a FIFO.
    let folder = tiny(tmp.path(), "fifo-weights", 61);
    std::fs::remove_file(folder.join("model.safetensors")).unwrap();
    mkfifo(&folder.join("model.safetensors"));
    for path in [Path::new("/dev/zero"), &fifo, &folder] {
        let register = call_as(
            &c,
            reqwest::Method::POST,
            s.url("/admin/v1/models/tiny/versions"),
            Some(json!({"path": path})),
            ADMIN,
        );
        let (st, v) = tokio::time::timeout(Duration::from_secs(10), register)
            .await
            .unwrap_or_else(|_| panic!("registering {} hung", path.display()));
        assert_eq!(st, 400, "{}: {v}", path.display());
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("regular file"), "{msg}");
    }
    let serving = call_as(
        &c,
        reqwest::Method::GET,
        s.url("/admin/v1/serving"),
        None,
        ADMIN,
    );
    let (st, _) = tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("the admin lock is free");
    assert_eq!(st, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_model_roots_only_paths_under_them_can_be_registered() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("models");
    let base = tiny(&root, "base", 70);
    let inside = tiny(&root, "inside", 71);
    let outside = tiny(tmp.path(), "outside", 72);
    let link = root.join("link");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let r = root.clone();
    let s = serve_models(&tmp.path().join("data"), &[("tiny", &base)], move |a| {
        a.model_roots = vec![r];
    })
    .await;
    let c = reqwest::Client::new();
    let register = |path: PathBuf| {
        let (c, url) = (c.clone(), s.url("/admin/v1/models/tiny/versions"));
        async move {
            call_as(
                &c,
                reqwest::Method::POST,
                url,
                Some(json!({"path": path})),
                ADMIN,
            )
            .await
        }
    };
    let mut messages = vec![];
    for path in [
        outside.clone(),
        link,
        root.join("../outside"),
        tmp.path().join("no-such-model"),
    ] {
        let (st, v) = register(path.clone()).await;
        assert_eq!(st, 400, "{}: {v}", path.display());
        let msg = v["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains("under the model roots"), "{msg}");
        messages.push(msg.replace(&path.display().to_string(), "PATH"));
    }
    assert!(
        messages.iter().all(|m| *m == messages[0]),
        "missing and outside read the same: {messages:?}"
    );
    let (st, v) = register(inside).await;
    assert_eq!(st, 201, "{v}");
    s.stop().await;
}

// ---- crash faults during loads, unloads and rollouts (issue 18, "Faults") ----

/// Every audit entry, page by page.
async fn audit_entries(c: &reqwest::Client, http: u16) -> Vec<Value> {
    let mut entries: Vec<Value> = vec![];
    loop {
        let after = entries.last().map_or(0, |e| e["seq"].as_u64().unwrap());
        let (st, page) = call_as(
            c,
            reqwest::Method::GET,
            format!("http://127.0.0.1:{http}/admin/v1/audit?after={after}&limit=1000"),
            None,
            ADMIN,
        )
        .await;
        assert_eq!(st, 200, "{page}");
        let page = page["entries"].as_array().unwrap().clone();
        if page.is_empty() {
            return entries;
        }
        entries.extend(page);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_loads_unloads_and_rollouts_leaves_a_consistent_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny(tmp.path(), "base", 61);
    let cands: Vec<PathBuf> = (0..3)
        .map(|i| tiny(tmp.path(), &format!("k{i}"), 62 + i))
        .collect();
    let data = tmp.path().join("data");
    let c = reqwest::Client::new();
    {
        let p = spawn(&base, &data).await;
        for (i, path) in cands.iter().enumerate() {
            let (st, v) = call_as(
                &c,
                reqwest::Method::POST,
                format!("http://127.0.0.1:{}/admin/v1/models/tiny/versions", p.http),
                Some(json!({"path": path, "version": format!("k{i}")})),
                ADMIN,
            )
            .await;
            assert_eq!(st, 201, "{v}");
        }
    }
    let mut rolled_back_by_restart = std::collections::BTreeSet::new();
    for round in 0..6u64 {
        let p = spawn(&base, &data).await;
        let url = |s: &str| format!("http://127.0.0.1:{}{s}", p.http);

        // The catalog is the replay of the log: versions, aliases, rollouts.
        let entries = audit_entries(&c, p.http).await;
        let (versions, aliases) = replay(&json!({ "entries": entries }));
        let (_, model) = call_as(
            &c,
            reqwest::Method::GET,
            url("/admin/v1/models/tiny"),
            None,
            ADMIN,
        )
        .await;
        let listed: BTreeMap<String, String> = model["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["version"].as_str().unwrap().into(),
                    v["sha256"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(
            listed, versions,
            "round {round}: versions match the audit log"
        );
        let got_aliases: BTreeMap<String, String> =
            serde_json::from_value(model["aliases"].clone()).unwrap();
        assert_eq!(
            got_aliases, aliases,
            "round {round}: aliases match the audit log"
        );
        let mut last_status: BTreeMap<String, Value> = BTreeMap::new();
        for e in &entries {
            if e["action"] == "rollout" && e["result"] == "ok" {
                last_status.insert(e["id"].as_str().unwrap().into(), e["status"].clone());
            }
        }
        let (st, rollouts) = call_as(
            &c,
            reqwest::Method::GET,
            url("/admin/v1/rollouts"),
            None,
            ADMIN,
        )
        .await;
        assert_eq!(st, 200, "{rollouts}");
        for r in rollouts["rollouts"].as_array().unwrap() {
            let id = r["id"].as_str().unwrap();
            let phase = r["phase"].as_str().unwrap();
            assert!(
                !matches!(phase, "progressing" | "paused"),
                "round {round}: rollout {id} still {phase} after a restart: {r}"
            );
            assert_eq!(
                last_status.get(id).map(|s| &s["phase"]),
                Some(&r["phase"]),
                "round {round}: rollout {id} is what its last audit entry says"
            );
            if r["reason"].as_str().unwrap_or("").contains("restarted") {
                rolled_back_by_restart.insert(id.to_string());
            }
        }
        // What serves is `stable`, with no canary left, and it answers.
        let (_, serving) = call_as(
            &c,
            reqwest::Method::GET,
            url("/admin/v1/serving"),
            None,
            ADMIN,
        )
        .await;
        assert_eq!(
            serving["models"][0]["serving"]["version"],
            json!(aliases["stable"]),
            "round {round}: {serving}"
        );
        let r = c
            .post(url("/v1/completions"))
            .bearer_auth(ADMIN)
            .json(&json!({"model": "tiny", "prompt": "hi", "max_tokens": 2}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "round {round}: the restarted server serves"
        );

        // Start a rollout (it stays in progress: a long interval), then load
        // and unload the other versions until the kill.
        let cand = format!("k{}", round % 3);
        let (st, ro) = call_as(
            &c,
            reqwest::Method::POST,
            url("/admin/v1/rollouts"),
            Some(json!({"model": "tiny", "candidate": cand, "steps": [50, 100], "interval_secs": 3600.0})),
            ADMIN,
        )
        .await;
        assert_eq!(st, 200, "round {round}: {ro}");
        assert_eq!(ro["phase"], "progressing", "{ro}");
        let id = ro["id"].as_str().unwrap().to_string();
        let work = async {
            for i in 0u64.. {
                let other = format!("k{}", (round + 1 + i % 2) % 3);
                for op in ["load", "unload"] {
                    let (st, v) = call_as(
                        &c,
                        reqwest::Method::POST,
                        url(&format!("/admin/v1/models/tiny/versions/{other}/{op}")),
                        None,
                        ADMIN,
                    )
                    .await;
                    assert!(st == 200 || st == 409, "{op} {other}: {st} {v}");
                }
                // Odd rounds: abort and start again, so the kill may land
                // inside a rollout's own writes too.
                if round % 2 == 1 && i % 3 == 2 {
                    call_as(
                        &c,
                        reqwest::Method::POST,
                        url(&format!("/admin/v1/rollouts/{id}/abort")),
                        None,
                        ADMIN,
                    )
                    .await;
                    call_as(
                        &c,
                        reqwest::Method::POST,
                        url("/admin/v1/rollouts"),
                        Some(json!({"model": "tiny", "candidate": cand, "steps": [50, 100], "interval_secs": 3600.0})),
                        ADMIN,
                    )
                    .await;
                }
            }
        };
        let delay = Duration::from_millis(150 + (round * 131) % 500);
        let _ = tokio::time::timeout(delay, work).await;
        drop(p); // SIGKILL
    }
    assert!(
        rolled_back_by_restart.len() >= 3,
        "rollouts in flight at a kill are rolled back at the next start: {rolled_back_by_restart:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reads_the_newest_audit_entries_and_names_a_wrong_port() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start(keys).await;
    let c = reqwest::Client::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let path = tiny(tmp.path(), name, 20 + i as u64);
        let (st, v) = call_as(
            &c,
            reqwest::Method::POST,
            s.url("/admin/v1/models/tiny/versions"),
            Some(json!({"path": path, "version": name})),
            ADMIN,
        )
        .await;
        assert_eq!(st, 201, "{v}");
    }
    let cli = |url: String, extra: &[&str]| {
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        async move {
            tokio::task::spawn_blocking(move || {
                Command::new(env!("CARGO_BIN_EXE_llmops"))
                    .args(["models", "--url", &url, "--api-key", ADMIN, "audit"])
                    .args(extra)
                    .env_remove("LLMOPS_API_KEY")
                    .env_remove("LLMOPS_ADMIN_URL")
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let grpc = format!("http://{}", s.grpc);
    let seqs = |out: &std::process::Output| -> Vec<u64> {
        assert!(out.status.success(), "{out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect()
    };
    // The whole log, oldest first, from the start.
    let all = seqs(&cli(grpc.clone(), &["--after", "0"]).await);
    assert!(all.len() >= 3, "{all:?}");
    // By default: the newest entries (the last registration among them).
    let newest = seqs(&cli(grpc.clone(), &["--limit", "2"]).await);
    assert_eq!(newest, all[all.len() - 2..], "{all:?}");
    let (_, v) = call_as(
        &c,
        reqwest::Method::GET,
        s.url("/admin/v1/audit?limit=1"),
        None,
        ADMIN,
    )
    .await;
    assert_eq!(v["entries"][0]["seq"], *all.last().unwrap(), "{v}");
    assert_eq!(v["entries"][0]["new"]["version"], "c", "{v}");

    // The HTTP port where the gRPC one belongs: said in words.
    let wrong = cli(format!("http://{}", s.http), &[]).await;
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        err.contains("not gRPC") && err.contains("gRPC port"),
        "{err}"
    );
    s.stop().await;
}
