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

/// Every prompt probed by a drift scoring job (the most drift can ask),
/// more clients than the queue holds and two sequences running at a time:
/// the probes wait behind client work. The client waiting gauge, which the
/// HPA scales on, never shows more than `--max-waiting`; the probes show in
/// the background gauge, held to the same bound (plus preempted ones), which
/// empties once the traffic stops. Then a request whose `n` choices could never wait
/// together is a 400 naming `n` and the limit (not a 429 forever), and `n`
/// at the limit is served by the idle server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_drift_probes_at_their_maximum_rate_the_waiting_gauge_stays_within_max_waiting() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    const MAX_WAITING: usize = 8;
    const CLIENTS: usize = 24;
    const SERVED: usize = 240;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("llmops.toml");
    std::fs::write(
        &config,
        "[drift]\nprompt_logprob_rate = 1.0\nentropy_rate = 1.0\n",
    )
    .unwrap();
    let model = dir.path().join("tiny");
    llmops::engine::synth::SynthSpec {
        seed: 9,
        ..llmops::engine::synth::SynthSpec::tiny_llama()
    }
    .write(&model, None)
    .unwrap();
    // Its own model name: metrics are process-wide.
    let s = TestServer::start_in(&model, &dir.path().join("registry"), |a| {
        a.model_names = vec!["queued".into()];
        a.api_keys = vec![format!("ops:admin:{ADMIN}")];
        a.config = Some(config.clone());
        a.scheduler.max_waiting = Some(MAX_WAITING);
        a.scheduler.max_running = Some(2);
    })
    .await;
    let (c, base) = (reqwest::Client::new(), s.url(""));
    let labels = ["model=\"queued\""];

    // Samples both gauges while the traffic runs.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (done, url) = (done.clone(), s.url("/metrics"));
        tokio::spawn(async move {
            let (mut client, mut background, mut scrapes) = (vec![], vec![], 0usize);
            // At least ten scrapes, however fast the traffic went (later
            // ones see the queue drained, which the bounds hold for too).
            while !done.load(Ordering::Relaxed) || scrapes < 10 {
                let m = reqwest::get(&url).await.unwrap().text().await.unwrap();
                client.extend(sample(&m, "llmops_num_requests_waiting", &labels));
                background.extend(sample(
                    &m,
                    "llmops_num_background_requests_waiting",
                    &labels,
                ));
                scrapes += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (client, background, scrapes)
        })
    };
    let (served, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let t0 = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (c, url) = (c.clone(), format!("{base}/v1/completions"));
            let (served, refused) = (served.clone(), refused.clone());
            tokio::spawn(async move {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
                while served.load(Ordering::Relaxed) < SERVED {
                    assert!(t0.elapsed() < Duration::from_secs(240), "traffic too slow");
                    let p = prompt(&mut rng, ENGLISH, 6..14);
                    let r = c
                        .post(&url)
                        .bearer_auth(ADMIN)
                        .json(&json!({"model": "queued", "prompt": p, "max_tokens": 8}))
                        .send()
                        .await
                        .unwrap();
                    match r.status().as_u16() {
                        200 => served.fetch_add(1, Ordering::Relaxed),
                        429 => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                        other => panic!("{other}: {}", r.text().await.unwrap()),
                    };
                }
            })
        })
        .collect();
    for cl in clients {
        cl.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let (client, background, scrapes) = sampler.await.unwrap();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    assert!(
        scrapes >= 10 && client.len() == scrapes,
        "{scrapes} scrapes"
    );
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "the queue was full at times"
    );
    assert!(
        max(&client) <= MAX_WAITING as f64,
        "client waiting gauge reached {} with --max-waiting {MAX_WAITING}",
        max(&client)
    );
    assert!(
        max(&background) >= 1.0,
        "drift probes waited behind client work (so the test shows something)"
    );
    // Probes are skipped while the background queue is full; background
    // sequences preempted for client work go back in line on top of it
    // (at most the running ones: 2 here).
    assert!(
        max(&background) <= (MAX_WAITING + 2) as f64,
        "background waiting gauge reached {}",
        max(&background)
    );
    // Once the traffic stops, the probes run and the background queue empties.
    let t1 = Instant::now();
    loop {
        let m = s.metrics_text().await;
        if sample(&m, "llmops_num_background_requests_waiting", &labels) == Some(0.0)
            && sample(&m, "llmops_num_requests_waiting", &labels) == Some(0.0)
        {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "queues did not empty"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // `n` past the queue: never admissible, so a 400 naming n and the limit.
    let r = c
        .post(format!("{base}/v1/completions"))
        .bearer_auth(ADMIN)
        .json(&json!({"model": "queued", "prompt": "the ship", "max_tokens": 2, "n": MAX_WAITING + 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.headers().get("retry-after").is_none());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "n", "{v}");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(
        m.contains(&format!("n is {}", MAX_WAITING + 1))
            && m.contains(&format!("at most {MAX_WAITING} requests wait")),
        "{m}"
    );
    // `n` at the limit fits the idle queue.
    let r = c
        .post(format!("{base}/v1/completions"))
        .bearer_auth(ADMIN)
        .json(&json!({"model": "queued", "prompt": "the ship", "max_tokens": 2, "n": MAX_WAITING}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"].as_array().unwrap().len(), MAX_WAITING, "{v}");
}
