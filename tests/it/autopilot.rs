//! The closed loop on a real server, end to end on a tiny model trained by
//! `llmops train`: in-distribution traffic freezes the stable version's
//! drift reference; shifted traffic (another script, longer prompts) turns
//! its state to drift; the `drift_detected` hook reaches a receiver; the
//! autopilot fine-tunes the stable version on the captured traffic,
//! registers the result, shadows it, canaries it and promotes it. With a
//! canary gate the candidate cannot meet, the same loop rolls it back.
//! Clients send requests throughout and none fails; the audit log lists
//! every step in order.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::process::{ADMIN, call};
use crate::retrain::{LINES, parent};
use crate::server::TestServer;

/// Prompts unlike the reference: Cyrillic and CJK, three times as long.
const SHIFTED: [&str; 4] = [
    "Старый моряк пел о долгом путешествии, пока ветер гнал волны к берегу и чайки кричали над мачтой.",
    "灯塔在海湾上守望，渔夫在岸边修补渔网，潮水把小船带过礁石，雨整夜落在港口。",
    "Капитан читал карту при свете лампы, а колокол звонил над старым городом до самого утра.",
    "冷风从北方的山上吹下来，所有的船在暴风雨之前驶回家，鲸鱼在灰色的海下游动。",
];

/// Drift on small windows, the full loop, a canary with `gates`, and a
/// webhook to the test's receiver. The canary's windows are 1 s of a few
/// dozen requests a side, and its default rank test on latency also runs:
/// on two cores shared with other tests one such window can find a
/// same-sized candidate slower by chance, so two failed windows roll back.
fn config(dir: &Path, gates: &str, hook: &str) -> PathBuf {
    let text = format!(
        r#"
[drift]
reference_requests = 24
window_requests = 12
min_window_requests = 6
window_secs = 600
consecutive = 2
prompt_logprob_rate = 0.0
signals = ["prompt_length", "prompt_script", "prompt_tokens"]

[autopilot]
policy = "full"
cooldown_secs = 3600

[autopilot.retrain]
steps = 8
lr = 3e-3
batch_size = 4
replay_share = 0.5
eval_fraction = 0.2
max_regression = 0.5
budget = {{ threads = 1, duty = 1.0, nice = 0 }}

[autopilot.shadow]
rate = 1.0
mode = "score"
min_samples = 6
wait_secs = 120

[autopilot.rollout]
steps = [50]
interval_secs = 1.0
failure_limit = 2
analysis = {{ min_samples = 3, gates = [{gates}] }}

[[hooks]]
name = "receiver"
url = "{hook}"
events = ["drift_detected", "training_finished", "rollout_promoted", "rollout_rolled_back"]
retries = 0
"#
    );
    let p = dir.join("llmops.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// A webhook receiver: the types of the events it got, in order.
async fn receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::Json<Value>| {
            let sink = sink.clone();
            async move {
                let kind = body["type"].as_str().unwrap_or_default().to_string();
                sink.lock().unwrap().push(kind);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

/// One completion; whether it succeeded.
async fn complete(c: &reqwest::Client, s: &TestServer, prompt: &str) -> bool {
    let r = c
        .post(s.url("/v1/completions"))
        .bearer_auth(ADMIN)
        .json(&json!({"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0}))
        .send()
        .await;
    matches!(r, Ok(r) if r.status().is_success())
}

/// Runs the loop until the autopilot has no loop running and its last
/// audited step is one of the ends; returns the autopilot steps audited,
/// the webhook events received, the serving table and the last step's
/// audit entry (with the rollout's reason).
async fn run_loop(gates: &str) -> (Vec<String>, Vec<String>, Value, Value) {
    let tmp = tempfile::tempdir().unwrap();
    let parent = parent(tmp.path());
    let (hook, events) = receiver().await;
    let cfg = config(tmp.path(), gates, &hook);
    let root = tmp.path().to_path_buf();
    let s = TestServer::start_in(&parent, &tmp.path().join("registry"), move |a| {
        a.api_keys = vec![format!("ops:admin:{ADMIN}")];
        // The parent's card names its training data here (replay).
        a.model_roots = vec![root];
        a.config = Some(cfg);
    })
    .await;
    let c = reqwest::Client::new();
    let (st, v) = call(
        &c,
        reqwest::Method::PUT,
        s.url("/admin/v1/models/tiny/capture"),
        Some(json!({})),
    )
    .await;
    assert_eq!(st, 200, "{v}");

    // The reference: 24 requests like the parent's corpus.
    for l in LINES.iter().cycle().take(24) {
        assert!(complete(&c, &s, l).await);
    }
    // Shifted traffic from two clients until the loop ends; none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = vec![];
    for k in 0..3 {
        let (c, stop, sent, failed, url) = (
            c.clone(),
            stop.clone(),
            sent.clone(),
            failed.clone(),
            s.url("/v1/completions"),
        );
        clients.push(tokio::spawn(async move {
            let mut i = k;
            while !stop.load(Ordering::Relaxed) {
                // A route key per request, so the canary's split sees
                // both sides (one API key would keep every request on one).
                let ok = c
                    .post(&url)
                    .bearer_auth(ADMIN)
                    .header("x-llmops-route-key", format!("client-{k}-{i}"))
                    .json(&json!({"model": "tiny", "prompt": SHIFTED[i % SHIFTED.len()], "max_tokens": 6, "temperature": 0}))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                sent.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                i += 3;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let t0 = Instant::now();
    let ends = [
        "promoted",
        "rolled_back",
        "stopped",
        "gate_failed",
        "awaiting_operator",
    ];
    let (steps, last_entry) = loop {
        let (_, audit) = call(
            &c,
            reqwest::Method::GET,
            s.url("/admin/v1/audit?limit=100000"),
            None,
        )
        .await;
        let entries: Vec<&Value> = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "autopilot")
            .collect();
        let steps: Vec<String> = entries
            .iter()
            .map(|e| e["step"].as_str().unwrap().to_string())
            .collect();
        let last = entries.last().map(|e| (*e).clone()).unwrap_or_default();
        let (_, status) = call(&c, reqwest::Method::GET, s.url("/admin/v1/autopilot"), None).await;
        let idle = status["running"].as_object().is_some_and(|r| r.is_empty());
        if idle && steps.last().is_some_and(|l| ends.contains(&l.as_str())) {
            break (steps, last);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "the loop did not end: {steps:?} {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop.store(true, Ordering::Relaxed);
    for h in clients {
        h.await.unwrap();
    }
    assert!(sent.load(Ordering::Relaxed) > 30);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "client requests failed during the loop"
    );
    // The receiver got its events (deliveries are asynchronous).
    for _ in 0..50 {
        if events.lock().unwrap().len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = events.lock().unwrap().clone();
    let (_, serving) = call(&c, reqwest::Method::GET, s.url("/admin/v1/serving"), None).await;
    s.stop().await;
    (steps, got, serving, last_entry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_retrains_shadows_canaries_and_promotes_by_itself() {
    let (steps, events, serving, last) = run_loop(r#""error_rate <= 5%""#).await;
    assert_eq!(
        steps,
        [
            "started",
            "training",
            "trained",
            "shadowing",
            "shadowed",
            "canary",
            "promoted"
        ],
        "the last step: {last}"
    );
    assert_eq!(
        serving["models"][0]["serving"]["version"], "v2",
        "{serving}"
    );
    for e in ["drift_detected", "training_finished", "rollout_promoted"] {
        assert!(
            events.iter().any(|g| g == e),
            "{e} not received: {events:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_failing_the_canary_gate_is_rolled_back() {
    // The canary would have to be a hundred times faster than stable.
    let (steps, events, serving, last) =
        run_loop(r#""error_rate <= 5%", "e2e_p99 <= 0.01x""#).await;
    assert_eq!(
        steps,
        [
            "started",
            "training",
            "trained",
            "shadowing",
            "shadowed",
            "canary",
            "rolled_back"
        ],
        "the last step: {last}"
    );
    assert_eq!(
        serving["models"][0]["serving"]["version"], "v1",
        "{serving}"
    );
    assert!(
        events.iter().any(|g| g == "rollout_rolled_back"),
        "{events:?}"
    );
}

/// The autopilot's policy and a model's drift overrides, changed through
/// the admin API: checked by field, audited with the key and reason, kept
/// across a restart, and cleared back to what the file says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_and_drift_overrides_set_through_the_admin_api_are_audited_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    llmops::engine::synth::SynthSpec {
        seed: 9,
        ..llmops::engine::synth::SynthSpec::tiny_llama()
    }
    .write(&model, None)
    .unwrap();
    let cfg = tmp.path().join("llmops.toml");
    std::fs::write(
        &cfg,
        "[drift]\nconsecutive = 2\n\n[autopilot]\npolicy = \"notify\"\n",
    )
    .unwrap();
    let data = tmp.path().join("registry");
    let start = || {
        TestServer::start_in(&model, &data, |a| {
            a.api_keys = vec![format!("ops:admin:{ADMIN}")];
            a.config = Some(cfg.clone());
        })
    };
    let c = reqwest::Client::new();
    let s = start().await;
    let autopilot = s.url("/admin/v1/autopilot");
    let drift = s.url("/admin/v1/models/tiny/drift");
    let (st, v) = call(&c, reqwest::Method::GET, autopilot.clone(), None).await;
    assert_eq!(
        (st, &v["source"], &v["settings"]["policy"]),
        (200, &json!("config"), &json!("notify")),
        "{v}"
    );

    // Refused by field, nothing changes.
    let (st, v) = call(
        &c,
        reqwest::Method::PUT,
        autopilot.clone(),
        Some(json!({"policy": "everything"})),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("policy"),
        "{v}"
    );
    let (st, v) = call(
        &c,
        reqwest::Method::PUT,
        drift.clone(),
        Some(json!({"settings": {"consecutive": 0}})),
    )
    .await;
    assert_eq!(st, 400, "{v}");

    // Accepted.
    let (st, v) = call(
        &c,
        reqwest::Method::PUT,
        autopilot.clone(),
        Some(json!({"policy": "train_and_shadow", "cooldown_secs": 60, "reason": "ops review"})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (&v["source"], &v["settings"]["policy"]),
        (&json!("admin"), &json!("train_and_shadow"))
    );
    let (st, v) = call(
        &c,
        reqwest::Method::PUT,
        drift.clone(),
        Some(json!({"settings": {"consecutive": 4}, "reason": "noisy traffic"})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["settings"]["consecutive"], 4, "{v}");

    // A restart keeps both.
    drop(s);
    let s = start().await;
    let (_, v) = call(&c, reqwest::Method::GET, s.url("/admin/v1/autopilot"), None).await;
    assert_eq!(
        (&v["source"], &v["settings"]["policy"]),
        (&json!("admin"), &json!("train_and_shadow")),
        "{v}"
    );
    assert_eq!(v["settings"]["cooldown_secs"], 60.0);
    let drift = s.url("/admin/v1/models/tiny/drift");
    let (_, v) = call(&c, reqwest::Method::GET, drift.clone(), None).await;
    assert_eq!(v["settings"]["consecutive"], 4, "{v}");

    // Cleared: the file's settings again.
    let (st, v) = call(
        &c,
        reqwest::Method::DELETE,
        s.url("/admin/v1/autopilot"),
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (&v["source"], &v["settings"]["policy"]),
        (&json!("config"), &json!("notify")),
        "{v}"
    );
    let (st, v) = call(&c, reqwest::Method::DELETE, drift.clone(), None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["settings"]["consecutive"], 2, "{v}");

    // Every change is in the audit log, in order, with who and why.
    let (_, audit) = call(&c, reqwest::Method::GET, s.url("/admin/v1/audit"), None).await;
    let seen: Vec<(String, String, String)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "autopilot_settings" || e["action"] == "drift_settings")
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                if e["result"] == "ok" { "ok" } else { "error" }.to_string(),
                e["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let want = [
        ("autopilot_settings", "error", ""),
        ("drift_settings", "error", ""),
        ("autopilot_settings", "ok", "ops review"),
        ("drift_settings", "ok", "noisy traffic"),
        ("autopilot_settings", "ok", ""),
        ("drift_settings", "ok", ""),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, r, w)| (a.to_string(), r.to_string(), w.to_string()))
        .collect();
    assert_eq!(seen, want, "{audit}");
    for e in audit["entries"].as_array().unwrap() {
        if e["action"] == "autopilot_settings" {
            assert_eq!(e["key_id"], "ops", "{e}");
        }
    }
}
