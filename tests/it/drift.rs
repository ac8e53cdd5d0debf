//! Drift detection through a real server on the tiny model: traffic like
//! the reference keeps the state ok; traffic in another script and of
//! another length turns it to drift within K windows, and `/metrics`, the
//! admin API and the saved reference show it.

use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

use crate::process::ADMIN;
use crate::server::TestServer;

const ENGLISH: &[&str] = &[
    "the", "ship", "sailed", "across", "a", "quiet", "sea", "while", "old", "sailors", "sang",
    "of", "home", "and", "harbour", "light", "wind", "rose", "over", "grey", "waves", "captain",
    "watched", "stars", "night", "long", "voyage", "whale", "deck", "rope", "storm", "morning",
    "bread", "salt", "letters", "from", "far", "shore", "green", "hills", "river", "town",
];

const RUSSIAN: &[&str] = &[
    "корабль",
    "плыл",
    "через",
    "тихое",
    "море",
    "старые",
    "моряки",
    "пели",
    "о",
    "доме",
    "и",
    "гавани",
    "ветер",
    "поднялся",
    "над",
    "серыми",
    "волнами",
    "капитан",
    "смотрел",
    "на",
    "звёзды",
    "ночью",
    "долгое",
    "путешествие",
    "кит",
    "палуба",
    "буря",
    "утро",
];

/// A prompt of `words` words drawn from `pool`.
fn prompt(
    rng: &mut rand_chacha::ChaCha8Rng,
    pool: &[&str],
    words: std::ops::Range<usize>,
) -> String {
    let n = rng.random_range(words);
    (0..n)
        .map(|_| pool[rng.random_range(0..pool.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sends `prompts` (greedy) with 8 in flight; every request must succeed.
async fn send(c: &reqwest::Client, base: &str, prompts: Vec<String>) {
    let results: Vec<u16> = futures::stream::iter(prompts)
        .map(|p| {
            let c = c.clone();
            let url = format!("{base}/v1/completions");
            async move {
                c.post(url)
                    .bearer_auth(ADMIN)
                    .json(
                        &json!({"model": "drifty", "prompt": p, "max_tokens": 4, "temperature": 0}),
                    )
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(results.iter().all(|s| *s == 200), "{results:?}");
}

async fn drift(c: &reqwest::Client, base: &str) -> Value {
    let r = c
        .get(format!("{base}/admin/v1/models/drifty/drift"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn stable(d: &Value) -> &Value {
    d["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["stable"] == true)
        .unwrap()
}

/// The value of the first sample of `name` whose labels contain all of
/// `labels` (`k="v"` pairs).
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|p| l.contains(p)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shifted_traffic_turns_the_drift_state_to_drift_and_the_metric_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("llmops.toml");
    // The default reference, windows, K and thresholds (with windows of
    // 100 and K = 2, traffic like the reference warned in about one run in
    // seven). Windows close by count only, one per batch sent. Each signal
    // warns on about one window in twenty by chance, so the traffic is
    // made repeatable: greedy outputs, every prompt scored and every
    // output's entropy measured (no sampling of requests), seeded prompts.
    let defaults = llmops::monitor::drift::DriftConfig::default();
    let (reference, window, k) = (
        defaults.reference_requests,
        defaults.window_requests,
        defaults.consecutive,
    );
    std::fs::write(
        &config,
        "[drift]\nwindow_secs = 600\nprompt_logprob_rate = 1.0\nentropy_rate = 1.0\n",
    )
    .unwrap();
    let data = dir.path().join("registry");
    let model = dir.path().join("tiny");
    llmops::engine::synth::SynthSpec {
        seed: 9,
        ..llmops::engine::synth::SynthSpec::tiny_llama()
    }
    .write(&model, None)
    .unwrap();
    // Its own model name: metrics are process-wide, and every other test
    // server's first version is `tiny` `v1` too.
    let s = TestServer::start_in(&model, &data, |a| {
        a.model_names = vec!["drifty".into()];
        a.api_keys = vec![format!("ops:admin:{ADMIN}")];
        a.config = Some(config.clone());
    })
    .await;
    let (c, base) = (reqwest::Client::new(), s.url(""));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    let english = |rng: &mut rand_chacha::ChaCha8Rng, n: usize| -> Vec<String> {
        (0..n).map(|_| prompt(rng, ENGLISH, 4..12)).collect()
    };

    // The reference: the version's first stable requests.
    send(&c, &base, english(&mut rng, reference)).await;
    let d = drift(&c, &base).await;
    let v = stable(&d);
    assert_eq!(v["reference"]["requests"], reference, "{v}");
    assert_eq!(v["reference"]["source"], "live");
    let version = v["version"].as_str().unwrap().to_string();

    // In distribution: windows close, the state stays ok.
    for _ in 0..4 {
        send(&c, &base, english(&mut rng, window)).await;
    }
    let d = drift(&c, &base).await;
    let v = stable(&d);
    assert_eq!(v["windows"], 4, "{v}");
    assert_eq!(v["state"], "ok", "{v}");
    let judged: Vec<&str> = v["last_window"]["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["signal"].as_str().unwrap())
        .collect();
    for sig in [
        "prompt_length",
        "prompt_tokens",
        "prompt_script",
        "output_entropy",
        "prompt_logprob",
        "prompt_embedding",
        "ttft",
    ] {
        assert!(judged.contains(&sig), "{sig} not judged: {judged:?}");
    }
    let m = s.metrics_text().await;
    let lv = format!("version=\"{version}\"");
    let labels = ["model=\"drifty\"", lv.as_str()];
    assert_eq!(sample(&m, "llmops_drift_state", &labels), Some(0.0));
    assert_eq!(sample(&m, "llmops_drift_windows_total", &labels), Some(4.0));

    // Shifted: Russian, longer. Drift after K windows.
    let onset = Instant::now();
    let mut windows = 0;
    while stable(&drift(&c, &base).await)["state"] != "drift" {
        assert!(windows < k, "no drift after {windows} shifted windows");
        let shifted: Vec<String> = (0..window)
            .map(|_| prompt(&mut rng, RUSSIAN, 8..20))
            .collect();
        send(&c, &base, shifted).await;
        windows += 1;
    }
    let took = onset.elapsed();
    eprintln!("drift detected {windows} windows ({took:?}) after the shift began");
    assert_eq!(windows, k);
    let d = drift(&c, &base).await;
    let v = stable(&d);
    let last = &v["last_window"]["scores"];
    let script = last
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["signal"] == "prompt_script")
        .unwrap();
    assert_eq!(script["level"], "drift", "{script}");
    let embedding = last
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["signal"] == "prompt_embedding")
        .unwrap();
    eprintln!("prompt_embedding in the shifted window: {embedding}");
    assert_eq!(embedding["level"], "drift", "{embedding}");
    let m = s.metrics_text().await;
    assert_eq!(sample(&m, "llmops_drift_state", &labels), Some(2.0));
    let score = sample(
        &m,
        "llmops_drift_score",
        &[labels[0], labels[1], "signal=\"prompt_script\""],
    )
    .unwrap();
    assert!(score > 0.1, "{score}");

    // The frozen reference was written beside the registry.
    let saved = data
        .join("drift")
        .join("drifty")
        .join(format!("{version}.json"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !saved.exists() {
        assert!(Instant::now() < deadline, "{} not written", saved.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r: Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    assert_eq!(r["requests"], reference);

    // Overrides through the admin API are checked by name.
    let r = c
        .put(format!("{base}/admin/v1/models/drifty/drift"))
        .bearer_auth(ADMIN)
        .json(&json!({"settings": {"psi_warn": 0.9}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("psi_warn"),
        "{body}"
    );

    // A restart keeps the frozen reference.
    drop(s);
    let s = TestServer::start_in(&model, &data, |a| {
        a.model_names = vec!["drifty".into()];
        a.api_keys = vec![format!("ops:admin:{ADMIN}")];
        a.config = Some(config.clone());
    })
    .await;
    let d = drift(&c, &s.url("")).await;
    let v = stable(&d);
    assert_eq!(v["reference"]["requests"], reference, "{v}");
    assert_eq!(v["collecting_reference"], 0);
}
