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
