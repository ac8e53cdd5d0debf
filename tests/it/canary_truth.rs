//! A canary analysis that sees what clients see: a candidate that sheds
//! load and loses its impatient clients is rolled back on those outcomes
//! (not only on the requests it finished), one API key without a session is
//! split per request at the weight over HTTP and gRPC, and an identical
//! candidate under load passes rollout after rollout with the default
//! gates.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use llmops::engine::synth::SynthSpec;
use llmops::proto as pb;
use serde_json::{Value, json};

use crate::rollout::{APP, keys, load, register, start, until_finished, write};
use crate::server::TestServer;

/// `clients` clients sending one streamed completion after another with
/// one API key and no session, each giving up after `patience`; returns how
/// many they sent until `stop`.
fn impatient(
    s: &TestServer,
    clients: usize,
    patience: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    let url = s.url("/v1/completions");
    tokio::spawn(async move {
        let c = reqwest::Client::builder()
            .timeout(patience)
            .build()
            .unwrap();
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (c, url, stop) = (c.clone(), url.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut sent = 0;
                    while !stop.load(Ordering::Relaxed) {
                        sent += 1;
                        let body = json!({"model": "tiny", "prompt": "impatient clients",
                                          "max_tokens": 48, "ignore_eos": true, "stream": true});
                        let r = c.post(&url).bearer_auth(APP).json(&body).send().await;
                        match r {
                            // A 429 is an answer: back off a little, as a
                            // client honouring it would. Otherwise read to
                            // the end or to the timeout.
                            Ok(resp) if resp.status() == 429 => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Ok(resp) => {
                                let _ = resp.bytes().await;
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                        }
                    }
                    sent
                })
            })
            .collect();
        let mut n = 0;
        for t in tasks {
            n += t.await.unwrap();
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_candidate_that_sheds_load_and_loses_its_clients_is_rolled_back_on_those_outcomes() {
    let tmp = tempfile::tempdir().unwrap();
    // Many times the work per token of the tiny stable model, behind a
    // short queue: it refuses what it cannot take, and its clients leave.
    let slow = write(tmp.path(), "slow", SynthSpec::preset("26m").unwrap());
    let s = TestServer::start(|a| {
        keys(a);
        a.scheduler.max_waiting = Some(2);
    })
    .await;
    let c = reqwest::Client::new();
    register(&c, &s, &slow, "slow").await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = impatient(&s, 16, Duration::from_secs(2), stop.clone());
    let limit = 2;
    // Gated on outcomes only: the latency of what it finished is what a
    // survivor sees, and is not the point here.
    let ro = start(
        &c,
        &s,
        json!({
            "model": "tiny", "candidate": "slow", "steps": [25, 50, 100],
            "interval_secs": 2.0, "warmup_secs": 0.0, "failure_limit": limit,
            "analysis": {
                "gates": ["error_rate <= 0.05", "refused_rate <= 1.5x or <= 0.02",
                          "cancelled_rate <= 1.5x or <= 0.02"],
                "min_samples": 5, "mann_whitney_alpha": false
            }
        }),
    )
    .await;
    let id = ro["id"].as_str().unwrap().to_string();
    let (done, took) = until_finished(&c, &s, &id, Duration::from_secs(90)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = traffic.await.unwrap();
    let history = done["history"].as_array().unwrap();
    for h in history {
        eprintln!("window at {}%: {}", h["weight"], h["report"]["reason"]);
    }
    eprintln!("{sent} requests; rolled back after {took:?}");
    assert_eq!(done["phase"], "rolled_back", "{done}");
    let failed: Vec<&Value> = history
        .iter()
        .filter(|h| h["report"]["verdict"] == "failed")
        .collect();
    assert_eq!(failed.len(), limit, "{done}");
    // Each failed window failed on what the finished requests alone hide.
    for h in failed {
        let gates = h["report"]["gates"].as_array().unwrap();
        let hit: Vec<&str> = gates
            .iter()
            .filter(|g| g["passed"] == false)
            .map(|g| g["metric"].as_str().unwrap())
            .collect();
        assert!(
            hit.iter()
                .any(|m| *m == "refused_rate" || *m == "cancelled_rate"),
            "{h}"
        );
        assert!(!hit.contains(&"error_rate"), "{h}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_api_key_without_a_session_is_split_per_request_at_the_weight_over_http_and_grpc() {
    let tmp = tempfile::tempdir().unwrap();
    let other = write(
        tmp.path(),
        "other",
        SynthSpec {
            seed: 55,
            ..SynthSpec::tiny_llama()
        },
    );
    let s = TestServer::start(keys).await;
    let c = reqwest::Client::new();
    register(&c, &s, &other, "other").await;
    // An hour between analyses: the weight stays at 25% for the test.
    start(
        &c,
        &s,
        json!({"model": "tiny", "candidate": "other", "steps": [25, 100], "interval_secs": 3600.0}),
    )
    .await;
    let n = 2000;
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let url = s.url("/v1/completions");
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let (c, url, hits) = (c.clone(), url.clone(), hits.clone());
            tokio::spawn(async move {
                for _ in (w..n).step_by(16) {
                    let v: Value = c
                        .post(&url)
                        .bearer_auth(APP)
                        .json(&json!({"model": "tiny", "prompt": "one key", "max_tokens": 1}))
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    if v["system_fingerprint"] == "other" {
                        hits.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let share = hits.load(Ordering::Relaxed) as f64 / n as f64;
    assert!((share - 0.25).abs() <= 0.05, "HTTP canary share {share}");

    // gRPC without any metadata but the key: each request gets its own id.
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let grpc = format!("http://{}", s.grpc);
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let (grpc, hits) = (grpc.clone(), hits.clone());
            tokio::spawn(async move {
                let mut cl = pb::inference_client::InferenceClient::connect(grpc)
                    .await
                    .unwrap();
                for _ in (w..n).step_by(16) {
                    let mut r = tonic::Request::new(pb::GenerateRequest {
                        model: "tiny".into(),
                        input: Some(pb::generate_request::Input::Prompt("one key".into())),
                        max_tokens: 1,
                        ..Default::default()
                    });
                    r.metadata_mut()
                        .insert("authorization", format!("Bearer {APP}").parse().unwrap());
                    let v = cl.generate(r).await.unwrap().into_inner();
                    assert!(!v.request_id.is_empty(), "a request id is generated");
                    if v.version == "other" {
                        hits.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let share = hits.load(Ordering::Relaxed) as f64 / n as f64;
    assert!((share - 0.25).abs() <= 0.05, "gRPC canary share {share}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identical_candidate_under_load_passes_ten_rollouts_with_the_default_gates() {
    let tmp = tempfile::tempdir().unwrap();
    // The stable model's own weights (TestServer's seed), in a folder whose
    // config differs by a newline: another version, the same model.
    let twin = write(
        tmp.path(),
        "twin",
        SynthSpec {
            seed: 9,
            ..SynthSpec::tiny_llama()
        },
    );
    let cfg = twin.join("config.json");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push('\n');
    std::fs::write(&cfg, text).unwrap();
    let s = TestServer::start(keys).await;
    let c = reqwest::Client::new();
    register(&c, &s, &twin, "twin").await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(&s, 16, stop.clone());
    let mut candidate = "twin".to_string();
    let mut rolled_back = vec![];
    let t0 = Instant::now();
    for i in 0..10 {
        // Default gates, sample minimums and warm-up; short windows.
        let ro = start(
            &c,
            &s,
            json!({"model": "tiny", "candidate": candidate, "steps": [25, 50, 100],
                   "interval_secs": 1.5}),
        )
        .await;
        let id = ro["id"].as_str().unwrap().to_string();
        let (done, took) = until_finished(&c, &s, &id, Duration::from_secs(90)).await;
        let reasons: Vec<String> = done["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| format!("{}% {}", h["weight"], h["report"]["reason"]))
            .collect();
        eprintln!("rollout {i}: {} in {took:?}: {reasons:#?}", done["phase"]);
        if done["phase"] == "promoted" {
            // The one it replaced is the candidate next time.
            candidate = done["baseline"].as_str().unwrap().to_string();
        } else {
            rolled_back.push((i, done["reason"].clone()));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (sent, fails, _) = traffic.await.unwrap();
    eprintln!("{sent} requests in {:?}", t0.elapsed());
    assert!(rolled_back.is_empty(), "false rollbacks: {rolled_back:?}");
    assert!(fails.is_empty(), "{:?}", &fails[..fails.len().min(3)]);
    s.stop().await;
}

// ---- Measure (BENCHMARKS.md, "Rollouts"): not run by CI. ----

/// Clients as applications send: one API key, no session, prompts of mixed
/// length (32 to 384 tokens), half sampled at temperature 0.8
/// and half greedy, 16 to 64 tokens, streamed. Returns (sent, failed).
fn mixed_load(
    s: &TestServer,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, usize)> {
    let url = s.url("/v1/completions");
    tokio::spawn(async move {
        let c = reqwest::Client::new();
        let tasks: Vec<_> = (0..clients)
            .map(|w| {
                let (c, url, stop) = (c.clone(), url.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut sent, mut failed) = (0, 0);
                    while !stop.load(Ordering::Relaxed) {
                        sent += 1;
                        let i = sent * 31 + w * 7;
                        // 32 to 384 bytes (the tiny model's byte-level
                        // tokens), within its 512-token context.
                        let prompt = "the tide came in over the rocks ".repeat(1 + i % 12);
                        let temperature = if i % 2 == 0 { 0.8 } else { 0.0 };
                        let body = json!({"model": "tiny", "prompt": prompt, "stream": true,
                                          "max_tokens": 16 + i % 49, "temperature": temperature,
                                          "top_p": 1.0, "ignore_eos": true});
                        let r = c.post(&url).bearer_auth(APP).json(&body).send().await;
                        match r {
                            Ok(resp) if resp.status() == 200 => {
                                let text = resp.text().await.unwrap_or_default();
                                if !text.contains("[DONE]") {
                                    failed += 1;
                                }
                            }
                            _ => failed += 1,
                        }
                    }
                    (sent, failed)
                })
            })
            .collect();
        let (mut sent, mut failed) = (0, 0);
        for t in tasks {
            let (s, f) = t.await.unwrap();
            sent += s;
            failed += f;
        }
        (sent, failed)
    })
}

async fn stable_version(c: &reqwest::Client, s: &TestServer) -> String {
    let (st, v) = crate::process::call(
        c,
        reqwest::Method::GET,
        s.url("/admin/v1/models/tiny"),
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    v["aliases"]["stable"].as_str().unwrap().to_string()
}

/// One scenario's rollouts: how many ended rolled back, the time to each
/// verdict, and canary / stable median e2e latency over the analysed
/// windows.
#[derive(Default)]
struct Tally {
    rolled_back: usize,
    promoted: usize,
    verdict_secs: Vec<f64>,
    e2e_ratio: Vec<f64>,
}

impl Tally {
    fn line(&self, what: &str) -> String {
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let max = self.verdict_secs.iter().copied().fold(f64::NAN, f64::max);
        format!(
            "| {what} | {} | {} rolled back, {} promoted | {:.1} s (max {:.1} s) | {:.2}× |",
            self.rolled_back + self.promoted,
            self.rolled_back,
            self.promoted,
            median(&self.verdict_secs),
            max,
            median(&self.e2e_ratio),
        )
    }
}

/// Runs `n` rollouts of `candidate` against the model's stable version
/// with the default analysis (gates, minimums, rank tests, warm-up, failure
/// limit) and 1.5 s windows. A candidate that is promoted is rolled back
/// by hand to `stable` before the next rollout, unless `swap` (identical
/// candidates): then the replaced version is the next candidate.
async fn rollouts(
    c: &reqwest::Client,
    s: &TestServer,
    stable: &str,
    candidate: &str,
    n: usize,
    swap: bool,
) -> Tally {
    let mut tally = Tally::default();
    let (mut stable, mut candidate) = (stable.to_string(), candidate.to_string());
    for i in 0..n {
        let ro = start(
            c,
            s,
            json!({"model": "tiny", "candidate": candidate, "steps": [25, 50, 100],
                   "interval_secs": 1.5}),
        )
        .await;
        let id = ro["id"].as_str().unwrap().to_string();
        let (done, took) = until_finished(c, s, &id, Duration::from_secs(120)).await;
        tally.verdict_secs.push(took.as_secs_f64());
        for h in done["history"].as_array().unwrap() {
            let tests = h["report"]["tests"].as_array().unwrap();
            if let Some(r) = tests
                .iter()
                .find(|t| t["metric"] == "e2e_p99")
                .and_then(|t| t["median_ratio"].as_f64())
            {
                tally.e2e_ratio.push(r);
            }
        }
        let phase = done["phase"].as_str().unwrap().to_string();
        eprintln!(
            "  rollout {i} of {candidate}: {phase} in {took:.1?}: {}",
            done["reason"]
        );
        if phase == "promoted" {
            tally.promoted += 1;
            if swap {
                std::mem::swap(&mut stable, &mut candidate);
            } else {
                let (st, v) = crate::process::call(
                    c,
                    reqwest::Method::PUT,
                    s.url("/admin/v1/models/tiny/aliases/stable"),
                    Some(json!({"version": stable})),
                )
                .await;
                assert_eq!(st, 200, "{v}");
            }
        } else {
            tally.rolled_back += 1;
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a benchmark (minutes): cargo test --release --test it canary_truth::measure -- --ignored --nocapture"]
async fn measure_false_and_missed_rollbacks_with_the_default_analysis() {
    let n: usize = std::env::var("LLMOPS_BENCH_ROLLOUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let tmp = tempfile::tempdir().unwrap();
    let base = SynthSpec {
        seed: 9,
        ..SynthSpec::tiny_llama()
    };
    let twin = write(tmp.path(), "twin", base.clone());
    let cfg = twin.join("config.json");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push('\n');
    std::fs::write(&cfg, text).unwrap();
    // Slower candidates: the same shape with more layers (the measured
    // ratio is reported beside each).
    let layers: Vec<usize> = std::env::var("LLMOPS_BENCH_SLOW_LAYERS")
        .ok()
        .map(|v| v.split(',').filter_map(|l| l.parse().ok()).collect())
        .unwrap_or_else(|| vec![4, 6, 10]);
    let s = TestServer::start(keys).await;
    let c = reqwest::Client::new();
    register(&c, &s, &twin, "twin").await;
    for l in &layers {
        let p = write(
            tmp.path(),
            &format!("slow{l}"),
            SynthSpec {
                layers: *l,
                ..base.clone()
            },
        );
        register(&c, &s, &p, &format!("slow{l}")).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = mixed_load(&s, 16, stop.clone());
    let t0 = Instant::now();
    let mut lines = vec![];
    eprintln!("identical candidate, {n} rollouts");
    let stable = stable_version(&c, &s).await;
    let identical = rollouts(&c, &s, &stable, "twin", n, true).await;
    lines.push(identical.line("identical weights"));
    // After the swaps, stable is one of the two identical versions.
    let stable = stable_version(&c, &s).await;
    let per_slow = (n / 4).max(3);
    for l in &layers {
        eprintln!("{l} layers (stable 2), {per_slow} rollouts");
        let t = rollouts(&c, &s, &stable, &format!("slow{l}"), per_slow, false).await;
        lines.push(t.line(&format!("{l} layers (stable: 2)")));
    }
    stop.store(true, Ordering::Relaxed);
    let (sent, failed) = traffic.await.unwrap();
    eprintln!(
        "\n{sent} requests ({failed} failed) in {:.0?}\n\n| candidate | rollouts | outcome | time to verdict, median | canary/stable median e2e, median window |\n|---|---:|---|---:|---:|",
        t0.elapsed()
    );
    for l in lines {
        eprintln!("{l}");
    }
    s.stop().await;
}

/// A failing candidate, judged by the real analysis
/// ([`llmops::monitor::canary::analyse`] with the default settings) and the
/// rollout's rule (steps 25/50/100, one success per step, failure limit 2)
/// on simulated windows: the server has no switch that makes a version
/// fail a set share of its requests, so the failures are drawn here.
/// Latencies on both sides come from one log-normal (e2e median 0.5 s,
/// TTFT median 50 ms), stable fails nothing, the canary fails `p` of its
/// requests; windows are 30 s (the default interval) at `rate` requests/s.
#[test]
#[ignore = "a benchmark: cargo test --release --test it canary_truth::measure -- --ignored --nocapture"]
fn measure_missed_rollbacks_of_a_failing_candidate_in_simulation() {
    use llmops::monitor::canary::{Analysis, Outcome, Sample, Verdict, analyse};
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut sample = |fail: f64, key: u64| {
        let (u1, u2) = (uniform().max(1e-12), uniform());
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let e2e = 0.5 * (0.4 * z).exp();
        let ok = uniform() >= fail;
        Sample {
            ok,
            ttft_s: if ok { 0.05 * (0.5 * z).exp() } else { f64::NAN },
            itl_s: e2e / 40.0,
            e2e_s: e2e,
            output_tokens: 40,
            stopped: false,
            outcome: Outcome::Served,
            key,
        }
    };
    let analysis = Analysis::default();
    eprintln!(
        "\n| canary fails | requests/s | rollouts | rolled back | missed | windows to a rollback, median |\n|---:|---:|---:|---:|---:|---:|"
    );
    for p in [0.0, 0.02, 0.05, 0.10] {
        // Below ~2.7 requests/s a 25% canary has fewer than the default
        // 20 samples per 30-s window: every window is inconclusive.
        for rate in [5.0, 50.0] {
            let n = 200;
            let (mut rolled_back, mut windows) = (0, vec![]);
            let mut key = 0u64;
            for _ in 0..n {
                let (mut step, mut failures, mut w) = (0usize, 0u32, 0usize);
                let steps = [25.0, 50.0, 100.0];
                loop {
                    w += 1;
                    let total = (rate * 30.0) as usize;
                    let canary_n = (total as f64 * steps[step] / 100.0) as usize;
                    let mut draw = |k: usize, fail: f64| -> Vec<Sample> {
                        (0..k)
                            .map(|_| {
                                key += 1;
                                sample(fail, key)
                            })
                            .collect()
                    };
                    let canary = draw(canary_n, p);
                    let stable = draw(total - canary_n, 0.0);
                    match analyse(&analysis, &stable, &canary).verdict {
                        Verdict::Successful => {
                            step += 1;
                            if steps[step] >= 100.0 {
                                break;
                            }
                        }
                        Verdict::Failed | Verdict::Error => {
                            failures += 1;
                            if failures >= 2 {
                                rolled_back += 1;
                                windows.push(w);
                                break;
                            }
                        }
                        Verdict::Inconclusive => {}
                    }
                    assert!(w < 1000, "a rollout that never ends");
                }
            }
            windows.sort();
            let median = windows
                .get(windows.len() / 2)
                .map_or("–".to_string(), |w| w.to_string());
            let missed = if p > 0.0 {
                format!("{:.0}%", 100.0 * (n - rolled_back) as f64 / n as f64)
            } else {
                "–".into()
            };
            eprintln!(
                "| {:.0}% | {rate} | {n} | {rolled_back} | {missed} | {median} |",
                p * 100.0
            );
        }
    }
}
