//! Hooks end to end: a real server on loopback delivering to a real
//! receiver (an axum server on 127.0.0.1:0 in this test) and to real
//! commands. The signature is recomputed here with the `hmac` crate; a
//! receiver answering 500 is retried until it answers 200; a repeat within
//! the cooldown is not sent; a receiver that hangs does not hold up
//! serving; a command gets the event on stdin and in its environment and
//! its exit code decides.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use llmops::engine::synth::SynthSpec;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::process::ADMIN;
use crate::server::TestServer;

fn keys(a: &mut llmops::config::ServeArgs) {
    a.api_keys = vec![format!("ops:admin:{ADMIN}")];
}

/// What the receiver saw, and how it answers.
#[derive(Default)]
struct Receiver {
    hits: Mutex<Vec<(HeaderMap, Vec<u8>)>>,
    /// Answer 500 to this many requests first.
    fail_first: AtomicUsize,
    /// Hold every answer this long.
    hang: Mutex<Option<Duration>>,
}

impl Receiver {
    fn hits(&self) -> Vec<(HeaderMap, Vec<u8>)> {
        self.hits.lock().unwrap().clone()
    }
}

/// Serves `rx` at `http://127.0.0.1:PORT/hook`.
async fn receive(rx: Arc<Receiver>) -> String {
    async fn handle(
        axum::extract::State(rx): axum::extract::State<Arc<Receiver>>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> StatusCode {
        rx.hits.lock().unwrap().push((headers, body.to_vec()));
        let hang = *rx.hang.lock().unwrap();
        if let Some(d) = hang {
            tokio::time::sleep(d).await;
        }
        if rx
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
        StatusCode::OK
    }
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(handle))
        .with_state(rx);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    format!("http://{addr}/hook")
}

async fn call(
    s: &TestServer,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    crate::process::call(&reqwest::Client::new(), method, s.url(path), body).await
}

async fn set_hook(s: &TestServer, name: &str, spec: Value) -> Value {
    let (st, v) = call(
        s,
        reqwest::Method::PUT,
        &format!("/admin/v1/hooks/{name}"),
        Some(spec),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    v
}

/// Registers a fresh synthetic model as a version of `tiny` (a
/// `version_registered` event).
async fn register(s: &TestServer, dir: &Path, version: &str, seed: u64) -> PathBuf {
    let p = dir.join(version);
    SynthSpec {
        seed,
        ..SynthSpec::tiny_llama()
    }
    .write(&p, None)
    .unwrap();
    let (st, v) = call(
        s,
        reqwest::Method::POST,
        "/admin/v1/models/tiny/versions",
        Some(json!({"path": p, "version": version})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    p
}

/// The hook delivery entries of the audit log for `hook`.
async fn deliveries(s: &TestServer, hook: &str) -> Vec<Value> {
    let (st, v) = call(s, reqwest::Method::GET, "/admin/v1/audit", None).await;
    assert_eq!(st, 200, "{v}");
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "hook_delivery" && e["hook"] == hook)
        .cloned()
        .collect()
}

/// Waits until the audit log holds `n` outcomes for `hook`.
async fn until_outcomes(s: &TestServer, hook: &str, n: usize, within: Duration) -> Vec<Value> {
    let t0 = Instant::now();
    loop {
        let d = deliveries(s, hook).await;
        if d.len() >= n {
            return d;
        }
        assert!(
            t0.elapsed() < within,
            "{n} outcomes of `{hook}` not audited: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signed_webhook_answering_500_is_retried_until_it_succeeds() {
    let s = TestServer::start(keys).await;
    let tmp = tempfile::tempdir().unwrap();
    let rx = Arc::new(Receiver::default());
    rx.fail_first.store(2, Ordering::SeqCst);
    let url = receive(rx.clone()).await;
    let secret = "whsec-test-0123456789";
    let shown = set_hook(
        &s,
        "signed",
        json!({"url": url, "events": ["version_registered"], "secret": secret,
               "retries": 3, "backoff_ms": 20, "timeout_secs": 5, "reason": "test"}),
    )
    .await;
    assert_eq!(shown["signed"], true);
    register(&s, tmp.path(), "v2", 77).await;
    let outcomes = until_outcomes(&s, "signed", 1, Duration::from_secs(30)).await;
    assert_eq!(outcomes[0]["outcome"], "delivered", "{outcomes:?}");
    assert_eq!(outcomes[0]["new"]["attempts"], 3, "{outcomes:?}");
    assert_eq!(outcomes[0]["event"], "version_registered");
    assert_eq!(outcomes[0]["new"]["version"], "v2");

    let hits = rx.hits();
    assert_eq!(hits.len(), 3, "two 500s, then the 200");
    let id = header(&hits[0].0, "idempotency-key").to_string();
    assert!(id.starts_with("ev-"), "{id}");
    for (h, body) in &hits {
        assert_eq!(
            header(h, "idempotency-key"),
            id,
            "the same key on every retry"
        );
        assert_eq!(header(h, "x-llmops-event"), "version_registered");
        assert_eq!(header(h, "content-type"), "application/json");
        // Verify as a receiver would: t and v1 from the header, HMAC-SHA256
        // over "t.body" with the shared secret, compared in constant time.
        let sig = header(h, "x-llmops-signature");
        let mut t = None;
        let mut v1 = None;
        for part in sig.split(',') {
            match part.split_once('=') {
                Some(("t", x)) => t = Some(x.to_string()),
                Some(("v1", x)) => v1 = Some(x.to_string()),
                _ => {}
            }
        }
        let (t, v1) = (t.unwrap(), v1.unwrap());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            now.abs_diff(t.parse::<u64>().unwrap()) < 300,
            "fresh timestamp"
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(t.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(&hex::decode(&v1).unwrap())
            .expect("the signature verifies");
        // A tampered body does not.
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(&[body.as_slice(), b" "].concat());
        assert!(mac.verify_slice(&hex::decode(&v1).unwrap()).is_err());
        let ev: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(ev["type"], "version_registered");
        assert_eq!(ev["id"], id);
        assert_eq!(ev["model"], "tiny");
        assert_eq!(ev["version"], "v2");
        assert_eq!(ev["sha256"].as_str().unwrap().len(), 64);
    }

    // The secret is never shown back: not by the API, not in the audit log.
    let (_, listed) = call(&s, reqwest::Method::GET, "/admin/v1/hooks", None).await;
    let (_, one) = call(&s, reqwest::Method::GET, "/admin/v1/hooks/signed", None).await;
    let (_, audit) = call(&s, reqwest::Method::GET, "/admin/v1/audit", None).await;
    for text in [listed.to_string(), one.to_string(), audit.to_string()] {
        assert!(!text.contains(secret), "{text}");
    }
    assert_eq!(one["url"], url);
    let m = s.metrics_text().await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("llmops_hook_deliveries_total")
                && l.contains("hook=\"signed\"")
                && l.contains("outcome=\"delivered\"")
                && l.ends_with(" 1")),
        "{m}"
    );
    assert!(m.contains("llmops_hook_delivery_duration_seconds_count{hook=\"signed\"} 1"));

    // A 4xx other than 429 is not retried.
    let (st, _) = call(&s, reqwest::Method::DELETE, "/admin/v1/hooks/signed", None).await;
    assert_eq!(st, 200);
    let (st, _) = call(&s, reqwest::Method::GET, "/admin/v1/hooks/signed", None).await;
    assert_eq!(st, 404);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_error_is_not_retried_and_bad_settings_are_refused_by_field() {
    let s = TestServer::start(keys).await;
    let tmp = tempfile::tempdir().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                StatusCode::BAD_REQUEST
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    set_hook(
        &s,
        "picky",
        json!({"url": url, "retries": 5, "backoff_ms": 10}),
    )
    .await;
    register(&s, tmp.path(), "v2", 78).await;
    let d = until_outcomes(&s, "picky", 1, Duration::from_secs(30)).await;
    assert_eq!(d[0]["outcome"], "failed");
    assert_eq!(d[0]["result"], "HTTP 400");
    assert_eq!(d[0]["new"]["attempts"], 1);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    for (body, field) in [
        (json!({"url": "ftp://x/"}), "url"),
        (json!({"url": "http://x/", "events": ["nope"]}), "events"),
        (
            json!({"url": "http://x/", "secret_env": "HOME"}),
            "secret_env",
        ),
    ] {
        let (st, v) = call(&s, reqwest::Method::PUT, "/admin/v1/hooks/bad", Some(body)).await;
        assert_eq!(st, 400, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{v}"
        );
    }
    // A program is the config file's to name, never an admin key's.
    for body in [
        json!({"command": ["true"]}),
        json!({"url": "http://x/", "command": ["true"]}),
    ] {
        let (st, v) = call(&s, reqwest::Method::PUT, "/admin/v1/hooks/bad", Some(body)).await;
        assert_eq!(st, 403, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("llmops.toml"),
            "{v}"
        );
    }
    let (st, v) = call(
        &s,
        reqwest::Method::PUT,
        "/admin/v1/hooks/bad",
        Some(json!({"url": "http://x/", "colour": 1})),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeat_within_the_cooldown_is_not_sent() {
    let s = TestServer::start(keys).await;
    let tmp = tempfile::tempdir().unwrap();
    let rx = Arc::new(Receiver::default());
    let url = receive(rx.clone()).await;
    set_hook(
        &s,
        "cool",
        json!({"url": url, "events": ["shadow_report"], "cooldown_secs": 3600}),
    )
    .await;
    register(&s, tmp.path(), "v2", 79).await;
    // Two shadows of v2, each cleared: two final reports for (tiny, v2).
    for _ in 0..2 {
        let (st, v) = call(
            &s,
            reqwest::Method::PUT,
            "/admin/v1/models/tiny/shadow",
            Some(json!({"version": "v2"})),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        let (st, v) = call(
            &s,
            reqwest::Method::DELETE,
            "/admin/v1/models/tiny/shadow",
            None,
        )
        .await;
        assert_eq!(st, 200, "{v}");
    }
    let d = until_outcomes(&s, "cool", 2, Duration::from_secs(30)).await;
    let outcomes: Vec<&str> = d.iter().map(|e| e["outcome"].as_str().unwrap()).collect();
    assert!(
        outcomes.contains(&"delivered") && outcomes.contains(&"suppressed"),
        "{d:?}"
    );
    let suppressed = d.iter().find(|e| e["outcome"] == "suppressed").unwrap();
    assert_eq!(suppressed["new"]["why"], "cooldown");
    // Give a wrongly sent second request time to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hits = rx.hits();
    assert_eq!(hits.len(), 1, "one delivery within the cooldown");
    let ev: Value = serde_json::from_slice(&hits[0].1).unwrap();
    assert_eq!(ev["type"], "shadow_report");
    assert_eq!(ev["final"], true);
    assert_eq!(ev["version"], "v2");
    assert!(ev["report"]["by_primary_version"].is_object(), "{ev}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_that_hangs_does_not_delay_serving() {
    let s = TestServer::start(keys).await;
    let tmp = tempfile::tempdir().unwrap();
    let rx = Arc::new(Receiver::default());
    *rx.hang.lock().unwrap() = Some(Duration::from_secs(3600));
    let url = receive(rx.clone()).await;
    set_hook(
        &s,
        "stuck",
        json!({"url": url, "timeout_secs": 5, "retries": 1, "backoff_ms": 10}),
    )
    .await;
    // The admin call that emits the event returns while its delivery hangs.
    register(&s, tmp.path(), "v2", 80).await;
    let t0 = Instant::now();
    while rx.hits().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no delivery started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Serve while the receiver holds the hook's request open.
    let c = reqwest::Client::new();
    let mut tasks = vec![];
    for i in 0..8 {
        let (c, url) = (c.clone(), s.url("/v1/completions"));
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(url)
                .bearer_auth(ADMIN)
                .json(&json!({"model": "tiny", "prompt": format!("hello {i}"), "max_tokens": 8, "stream": i % 2 == 0}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body = r.text().await.unwrap();
            (status, body)
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(!body.contains("\"error\""), "{body}");
    }
    // Every request was answered before the hook's delivery ended.
    assert!(
        deliveries(&s, "stuck").await.is_empty(),
        "the hook had already given up: requests were not served during the hang"
    );
    let d = until_outcomes(&s, "stuck", 1, Duration::from_secs(60)).await;
    assert_eq!(d[0]["outcome"], "failed", "{d:?}");
    assert_eq!(d[0]["new"]["attempts"], 2);
    assert!(
        d[0]["result"].as_str().unwrap().contains("timed out"),
        "{d:?}"
    );
    assert_eq!(rx.hits().len(), 2, "the first try and one retry");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_hook_gets_the_event_on_stdin_and_its_exit_code_decides() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    // `sh` is the program here, named in argv; the server starts no shell
    // of its own. It saves stdin and the environment, counts its runs,
    // and exits with the given code.
    let script = |code: u8, tag: &str| {
        format!(
            "cat > {d}/{tag}-stdin.json; printf '%s' \"$LLMOPS_EVENT\" > {d}/{tag}-env.json; \
             printf '%s' \"$LLMOPS_EVENT_TYPE\" > {d}/{tag}-type; echo run >> {d}/{tag}-runs; exit {code}",
            d = out.display()
        )
    };
    // Command hooks come from the config file only.
    let hooks = json!({"hooks": [
        {"name": "cmd-ok", "command": ["sh", "-c", script(0, "ok")],
         "events": ["version_registered"]},
        {"name": "cmd-bad", "command": ["sh", "-c", script(3, "bad")],
         "events": ["version_registered"], "retries": 2, "backoff_ms": 10},
        {"name": "cmd-slow", "command": ["sleep", "30"], "events": ["version_registered"],
         "retries": 0, "timeout_secs": 0.5},
    ]});
    let cfg = tmp.path().join("llmops.toml");
    std::fs::write(&cfg, toml::to_string(&hooks).unwrap()).unwrap();
    let s = TestServer::start(|a| {
        keys(a);
        a.config = Some(cfg);
    })
    .await;
    // The configured hooks are there before the server registers its
    // model at start: that `version_registered` (v1) is the event.
    let ok = until_outcomes(&s, "cmd-ok", 1, Duration::from_secs(30)).await;
    assert_eq!(ok[0]["outcome"], "delivered", "{ok:?}");
    let stdin: Value =
        serde_json::from_slice(&std::fs::read(out.join("ok-stdin.json")).unwrap()).unwrap();
    let env: Value =
        serde_json::from_slice(&std::fs::read(out.join("ok-env.json")).unwrap()).unwrap();
    assert_eq!(stdin, env, "the same event on stdin and in LLMOPS_EVENT");
    assert_eq!(stdin["type"], "version_registered");
    assert_eq!(stdin["version"], "v1");
    assert_eq!(
        std::fs::read_to_string(out.join("ok-type")).unwrap(),
        "version_registered"
    );
    let bad = until_outcomes(&s, "cmd-bad", 1, Duration::from_secs(30)).await;
    assert_eq!(bad[0]["outcome"], "failed", "{bad:?}");
    assert_eq!(bad[0]["result"], "exit 3");
    assert_eq!(bad[0]["new"]["attempts"], 3);
    assert_eq!(
        std::fs::read_to_string(out.join("bad-runs"))
            .unwrap()
            .lines()
            .count(),
        3,
        "a non-zero exit is retried"
    );
    let slow = until_outcomes(&s, "cmd-slow", 1, Duration::from_secs(30)).await;
    assert_eq!(slow[0]["outcome"], "failed", "{slow:?}");
    assert!(
        slow[0]["result"].as_str().unwrap().contains("killed"),
        "{slow:?}"
    );
    s.stop().await;
}
