//! Shadow evaluation end to end on a real server: a candidate with the
//! primary's weights agrees exactly, a different one does not and its
//! published cross log-likelihood is the one computed here through the
//! engine, shadow failures never reach a client under streaming load, and
//! planted personal data never reaches stored samples or logs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use llmops::engine::synth::SynthSpec;
use llmops::proto as pb;
use serde_json::{Value, json};

use crate::process::{ADMIN, Served, call};
use crate::server::TestServer;
use crate::support;

const APP: &str = "1nf";

fn keys(a: &mut llmops::config::ServeArgs) {
    a.api_keys = vec![format!("ops:admin:{ADMIN}"), format!("app:inference:{APP}")];
}

/// The weights of `spec` under another digest: the same tensors, with
/// metadata in the safetensors header (the registry refuses the same
/// digest twice, and a twin must be a version of its own).
fn write_twin(dir: &Path, name: &str, spec: SynthSpec) -> PathBuf {
    let p = dir.join(name);
    spec.write(&p, None).unwrap();
    let file = std::fs::read_dir(&p)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|f| f.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
    let meta = std::collections::HashMap::from([("copy".to_string(), name.to_string())]);
    let out = safetensors::serialize(views, Some(meta)).unwrap();
    std::fs::write(&file, out).unwrap();
    p
}

fn write(dir: &Path, name: &str, spec: SynthSpec) -> PathBuf {
    let p = dir.join(name);
    spec.write(&p, None).unwrap();
    p
}

async fn register(c: &reqwest::Client, base: &str, path: &Path, version: &str) {
    let (st, v) = call(
        c,
        reqwest::Method::POST,
        format!("{base}/admin/v1/models/tiny/versions"),
        Some(json!({"path": path, "version": version})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
}

async fn set_shadow(c: &reqwest::Client, base: &str, spec: Value) -> Value {
    let (st, v) = call(
        c,
        reqwest::Method::PUT,
        format!("{base}/admin/v1/models/tiny/shadow"),
        Some(spec),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    v
}

async fn shadow_status(c: &reqwest::Client, base: &str) -> Value {
    let (st, v) = call(
        c,
        reqwest::Method::GET,
        format!("{base}/admin/v1/models/tiny/shadow"),
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    v
}

/// Waits until the shadow has compared `n` copies in `mode` for the stable
/// version `v1`; returns that mode's summary.
async fn until_compared(c: &reqwest::Client, base: &str, mode: &str, n: u64) -> Value {
    let t0 = Instant::now();
    loop {
        let v = shadow_status(c, base).await;
        let m = &v["by_primary_version"]["v1"];
        if m[mode]["compared"].as_u64().unwrap_or(0) >= n {
            return m.clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{n} {mode} comparisons not reached: {v}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn complete(c: &reqwest::Client, base: &str, prompt: &str, extra: Value) -> Value {
    let mut body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let resp = c
        .post(format!("{base}/v1/completions"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

async fn grpc_generate(s: &TestServer, prompt: Vec<u32>, max_tokens: u32) -> Vec<u32> {
    let mut g = s.grpc_client().await;
    let mut req = tonic::Request::new(pb::GenerateRequest {
        model: "tiny".into(),
        input: Some(pb::generate_request::Input::PromptTokens(pb::TokenIds {
            ids: prompt,
        })),
        max_tokens,
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ignore_eos: true,
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {APP}").parse().unwrap());
    g.generate(req).await.unwrap().into_inner().token_ids
}

const PROMPTS: [&str; 6] = [
    "shadow one",
    "a second prompt, longer than the first by a few words",
    "3",
    "the quick brown fox",
    "jumps over",
    "the lazy dog, twice: the lazy dog",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_candidate_with_the_primarys_weights_matches_exactly_and_scores_no_gap() {
    let tmp = tempfile::tempdir().unwrap();
    // TestServer::start serves seed 9 as `v1`.
    let twin = write_twin(
        tmp.path(),
        "twin",
        SynthSpec {
            seed: 9,
            ..SynthSpec::tiny_llama()
        },
    );
    let s = TestServer::start(keys).await;
    let base = s.url("");
    let c = reqwest::Client::new();
    register(&c, &base, &twin, "twin").await;

    set_shadow(
        &c,
        &base,
        json!({"version": "twin", "mode": "generate", "reason": "twin check"}),
    )
    .await;
    for p in PROMPTS {
        complete(&c, &base, p, json!({})).await;
    }
    // gRPC requests are mirrored too (the tee sits below both front ends).
    grpc_generate(&s, vec![1, 50, 60, 70], 10).await;
    let g = until_compared(&c, &base, "generate", 7).await;
    assert_eq!(g["mirrored"], 7, "{g}");
    assert_eq!(g["generate"]["greedy_compared"], 7, "{g}");
    assert_eq!(g["generate"]["exact_match_rate"], 1.0, "{g}");
    assert_eq!(g["generate"]["prefix_agreement"], 1.0, "{g}");
    assert_eq!(g["generate"]["finish_agreement"], 1.0, "{g}");

    set_shadow(&c, &base, json!({"version": "twin", "mode": "score"})).await;
    for p in PROMPTS {
        // The client asked for no log-probabilities: the ones the primary
        // reports for the shadow never reach it.
        let v = complete(&c, &base, p, json!({})).await;
        assert!(v["choices"][0]["logprobs"].is_null(), "{v}");
    }
    // One asked for 2 alternatives and gets 2 (fewer keys where two
    // tokens print alike), not the shadow's 8.
    let v = complete(&c, &base, "with logprobs", json!({"logprobs": 2})).await;
    for top in v["choices"][0]["logprobs"]["top_logprobs"]
        .as_array()
        .unwrap()
    {
        assert!((1..=2).contains(&top.as_object().unwrap().len()), "{v}");
    }
    let sc = until_compared(&c, &base, "score", 7).await;
    let score = &sc["score"];
    assert!(score["tokens"].as_u64().unwrap() >= 7 * 12, "{sc}");
    assert!(score["logprob_gap"].as_f64().unwrap().abs() < 1e-3, "{sc}");
    assert_eq!(score["top1_agreement"], 1.0, "{sc}");
    assert!(score["kl_divergence"].as_f64().unwrap() < 1e-4, "{sc}");

    // Shadow first, then canary: a rollout gated on these comparisons starts.
    let (st, ro) = call(
        &c,
        reqwest::Method::POST,
        format!("{base}/admin/v1/rollouts"),
        Some(
            json!({"model": "tiny", "candidate": "twin", "interval_secs": 60.0,
            "analysis": {"min_samples": 5},
            "shadow_gates": ["top1_agreement >= 0.95", "logprob_gap <= 0.01"]}),
        ),
    )
    .await;
    assert_eq!(st, 200, "{ro}");
    let id = ro["id"].as_str().unwrap();
    let (st, _) = call(
        &c,
        reqwest::Method::POST,
        format!("{base}/admin/v1/rollouts/{id}/abort"),
        None,
    )
    .await;
    assert_eq!(st, 200);

    // Published, labelled, audited.
    let m = s.metrics_text().await;
    for needle in [
        "llmops_shadow_compared_total{model=\"tiny\",version=\"v1\",candidate=\"twin\",mode=\"generate\"} 7",
        "llmops_shadow_exact_matches_total{model=\"tiny\",version=\"v1\",candidate=\"twin\"} 7",
        "llmops_shadow_top1_agreement_bucket",
    ] {
        assert!(m.contains(needle), "{needle} missing from /metrics");
    }
    assert!(
        m.lines()
            .any(|l| l.starts_with("llmops_request_success_total")
                && l.contains("version=\"twin\"")
                && l.contains("protocol=\"internal\"")
                && l.contains("variant=\"shadow\"")),
        "the candidate's requests carry protocol=internal, variant=shadow"
    );
    let (_, audit) = call(&c, reqwest::Method::GET, s.url("/admin/v1/audit"), None).await;
    let shadows: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "shadow")
        .collect();
    assert_eq!(shadows.len(), 2, "{audit}");
    assert_eq!(shadows[0]["reason"], "twin check");
    let (st, _) = call(
        &c,
        reqwest::Method::DELETE,
        s.url("/admin/v1/models/tiny/shadow"),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let (st, _) = call(
        &c,
        reqwest::Method::GET,
        s.url("/admin/v1/models/tiny/shadow"),
        None,
    )
    .await;
    assert_eq!(st, 404);
    s.stop().await;
}

/// log softmax of `row` at `token`, in f64.
fn logprob(row: &[f32], token: u32) -> f64 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + row
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row[token as usize] as f64 - lse
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_different_candidate_disagrees_and_its_cross_log_likelihood_is_the_engines() {
    let tmp = tempfile::tempdir().unwrap();
    let other = write(
        tmp.path(),
        "other",
        SynthSpec {
            seed: 778,
            ..SynthSpec::tiny_llama()
        },
    );
    let s = TestServer::start(keys).await;
    let base = s.url("");
    let c = reqwest::Client::new();
    register(&c, &base, &other, "other").await;
    set_shadow(
        &c,
        &base,
        json!({"version": "other", "mode": "score", "top_k": 5}),
    )
    .await;

    let prompt = vec![1u32, 72, 101, 108, 108, 111, 33];
    let out = grpc_generate(&s, prompt.clone(), 16).await;
    assert_eq!(out.len(), 16);
    let sc = until_compared(&c, &base, "score", 1).await;
    let published = sc["score"]["candidate_mean_logprob"].as_f64().unwrap();

    // The same quantity, computed here: the candidate's log-probabilities
    // of the primary's tokens through the engine's batched forward pass.
    let model = support::load(&other);
    let tokens: Vec<u32> = prompt.iter().chain(&out).copied().collect();
    let logits = support::run_teacher_forced(
        &model,
        &[support::Plan {
            tokens: tokens.clone(),
            join_step: 0,
            chunk: 5,
            prompt_len: tokens.len(),
        }],
        16,
    );
    let rows = &logits[0];
    let direct: f64 = out
        .iter()
        .enumerate()
        .map(|(k, &t)| logprob(&rows[prompt.len() - 1 + k], t))
        .sum::<f64>()
        / out.len() as f64;
    assert!(
        (published - direct).abs() < 1e-4,
        "published {published} vs direct {direct}"
    );
    let top1 = sc["score"]["top1_agreement"].as_f64().unwrap();
    assert!(top1 < 0.8, "random weights rarely agree: {sc}");
    assert!(sc["score"]["logprob_gap"].as_f64().unwrap() > 0.1, "{sc}");

    // A rollout gated on agreement does not start on these comparisons.
    let (st, v) = call(
        &c,
        reqwest::Method::POST,
        format!("{base}/admin/v1/rollouts"),
        Some(
            json!({"model": "tiny", "candidate": "other", "analysis": {"min_samples": 1},
            "shadow_gates": ["top1_agreement >= 0.95"]}),
        ),
    )
    .await;
    assert_eq!(st, 409, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("top1_agreement >= 0.95") && msg.contains("measured"),
        "{msg}"
    );

    set_shadow(&c, &base, json!({"version": "other", "mode": "generate"})).await;
    for p in PROMPTS {
        complete(&c, &base, p, json!({"ignore_eos": true})).await;
    }
    let g = until_compared(&c, &base, "generate", 6).await;
    assert!(
        g["generate"]["exact_match_rate"].as_f64().unwrap() < 0.5,
        "{g}"
    );
    assert!(
        g["generate"]["prefix_agreement"].as_f64().unwrap() < 0.5,
        "{g}"
    );
    s.stop().await;
}

/// One streamed completion; Err says why it was not a clean stream.
async fn stream(c: &reqwest::Client, base: &str, prompt: &str) -> Result<(), String> {
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0.8, "stream": true});
    let resp = c
        .post(format!("{base}/v1/completions"))
        .bearer_auth(APP)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    let mut text = String::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.map_err(|e| e.to_string())?));
    }
    if text.contains("\"error\"") || !text.trim_end().ends_with("data: [DONE]") {
        return Err(text);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shadow_failures_never_reach_clients_under_streaming_load() {
    let tmp = tempfile::tempdir().unwrap();
    let other = write(
        tmp.path(),
        "other",
        SynthSpec {
            seed: 31,
            ..SynthSpec::tiny_llama()
        },
    );
    let s = TestServer::start(keys).await;
    let base = s.url("");
    let c = reqwest::Client::new();
    register(&c, &base, &other, "other").await;
    // A short timeout: under 16 clients the primary keeps the cores busy,
    // so the governor holds the copies back and many time out.
    set_shadow(
        &c,
        &base,
        json!({"version": "other", "rate": 1.0, "timeout_secs": 0.3, "max_concurrent": 64}),
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|w| {
            let (c, stop, base) = (c.clone(), stop.clone(), base.clone());
            tokio::spawn(async move {
                let (mut n, mut fails) = (0, vec![]);
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    if let Err(e) = stream(&c, &base, &format!("client {w} request {n}")).await {
                        fails.push(e);
                    }
                }
                (n, fails)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The candidate goes away mid-traffic: the shadow is cleared with it.
    let (st, v) = call(
        &c,
        reqwest::Method::POST,
        s.url("/admin/v1/models/tiny/versions/other/unload"),
        Some(json!({})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut sent, mut fails) = (0, vec![]);
    for t in clients {
        let (n, f) = t.await.unwrap();
        sent += n;
        fails.extend(f);
    }
    assert!(sent > 50, "only {sent} requests");
    assert!(
        fails.is_empty(),
        "{} of {sent} failed: {:?}",
        fails.len(),
        &fails[..fails.len().min(3)]
    );
    let m = s.metrics_text().await;
    let mirrored: f64 = m
        .lines()
        .filter(|l| l.starts_with("llmops_shadow_mirrored_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let dropped: f64 = m
        .lines()
        .filter(|l| l.starts_with("llmops_shadow_dropped_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        mirrored > 0.0 && dropped > 0.0,
        "mirrored {mirrored}, dropped {dropped}"
    );
    let (_, audit) = call(&c, reqwest::Method::GET, s.url("/admin/v1/audit"), None).await;
    let cleared = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "shadow" && e["spec"].is_null() && e["result"] == "ok");
    assert!(
        cleared,
        "unloading the candidate clears the shadow: {audit}"
    );
    let (st, _) = call(
        &c,
        reqwest::Method::GET,
        s.url("/admin/v1/models/tiny/shadow"),
        None,
    )
    .await;
    assert_eq!(st, 404);
    s.stop().await;
}

/// The port of a fresh listener, released for the server to bind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planted_personal_data_never_reaches_samples_or_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = write(
        tmp.path(),
        "primary",
        SynthSpec {
            seed: 9,
            ..SynthSpec::tiny_llama()
        },
    );
    let other = write(
        tmp.path(),
        "other",
        SynthSpec {
            seed: 4242,
            ..SynthSpec::tiny_llama()
        },
    );
    // The real binary, logging everything at debug to a file.
    let log_path = tmp.path().join("server.log");
    let mut server = Served::spawn(&primary, &tmp.path().join("registry"), &log_path, |cmd| {
        cmd.env("RUST_LOG", "debug");
    });
    server.ready().await;
    let base = server.url("");
    let c = reqwest::Client::new();
    register(&c, &base, &other, "other").await;
    set_shadow(
        &c,
        &base,
        json!({"version": "other", "samples": {"enabled": true, "capacity": 50, "redact": ["(?i)codename \\w+"]}}),
    )
    .await;
    let planted = [
        (
            "write to jane.doe@example.com today",
            "jane.doe@example.com",
        ),
        ("my number is +1 415-555-0132", "415-555-0132"),
        ("card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
        ("server at 10.20.30.40 is down", "10.20.30.40"),
        (
            "use key sk-live_4eC39HqLyjWDarjtT1zdp7dc",
            "4eC39HqLyjWDarjtT1zdp7dc",
        ),
        ("the codename Nightjar is secret", "Nightjar"),
    ];
    for (p, _) in planted {
        complete(&c, &base, p, json!({"ignore_eos": true})).await;
    }
    until_compared(&c, &base, "generate", planted.len() as u64).await;
    let (st, v) = call(
        &c,
        reqwest::Method::GET,
        format!("{base}/admin/v1/models/tiny/shadow/samples"),
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let samples = v["samples"].as_array().unwrap();
    assert_eq!(samples.len(), planted.len(), "every copy disagreed: {v}");
    let stored = v.to_string();
    for tag in [
        "[EMAIL]",
        "[PHONE]",
        "[CARD]",
        "[IP]",
        "[SECRET]",
        "[REDACTED]",
    ] {
        assert!(stored.contains(tag), "{tag} missing: {stored}");
    }
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logged.contains("shadow set"),
        "the server logged at debug: {logged}"
    );
    for (_, secret) in planted {
        assert!(!stored.contains(secret), "{secret} stored: {stored}");
        assert!(!logged.contains(secret), "{secret} logged");
    }
}

/// Runs `llmops shadow …` against `s`'s gRPC admin service; returns its JSON.
fn cli(s: &TestServer, args: &[&str]) -> Result<Value, String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmops"))
        .arg("shadow")
        .args(["--url", &format!("http://{}", s.grpc), "--api-key", ADMIN])
        .args(args)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_sets_reads_and_clears_a_shadow_over_grpc() {
    let tmp = tempfile::tempdir().unwrap();
    let other = write(
        tmp.path(),
        "other",
        SynthSpec {
            seed: 5,
            ..SynthSpec::tiny_llama()
        },
    );
    let s = TestServer::start(keys).await;
    let base = s.url("");
    let c = reqwest::Client::new();
    register(&c, &base, &other, "other").await;
    let set = cli(
        &s,
        &[
            "set",
            "tiny",
            "other",
            "--mode",
            "score",
            "--rate",
            "0.5",
            "--max-concurrent",
            "64",
            "--reason",
            "cli",
        ],
    )
    .unwrap();
    assert_eq!(set["spec"]["mode"], "score", "{set}");
    assert_eq!(set["spec"]["rate"], 0.5, "{set}");
    // Refusals come back as gRPC statuses with the reason.
    let e = cli(&s, &["set", "tiny", "v1"]).unwrap_err();
    assert!(e.contains("stable version"), "{e}");
    let e = cli(&s, &["set", "tiny", "other", "--mode", "loud"]).unwrap_err();
    assert!(e.contains("InvalidArgument") && e.contains("loud"), "{e}");
    let e = cli(&s, &["samples", "tiny"]).unwrap_err();
    assert!(e.contains("samples.enabled"), "{e}");
    // The rate samples requests by id: about half of 40 are copied.
    for i in 0..40 {
        complete(&c, &base, &format!("request {i}"), json!({"max_tokens": 2})).await;
    }
    let t0 = Instant::now();
    let status = loop {
        let st = cli(&s, &["status", "tiny"]).unwrap();
        let v1 = &st["by_primary_version"]["v1"];
        if v1["score"]["compared"].as_u64().unwrap_or(0)
            + v1["dropped"]
                .as_object()
                .map_or(0, |d| d.values().filter_map(Value::as_u64).sum())
            >= v1["mirrored"].as_u64().unwrap_or(u64::MAX)
        {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Sampled = started or dropped (copies wait behind the primaries, so
    // some may meet the cap); the rate decides how many are sampled.
    let v1 = &status["by_primary_version"]["v1"];
    let dropped: u64 = v1["dropped"]
        .as_object()
        .map_or(0, |d| d.values().filter_map(Value::as_u64).sum());
    let sampled = v1["mirrored"].as_u64().unwrap() + dropped;
    assert!(
        (8..=32).contains(&sampled),
        "{sampled} of 40 sampled at rate 0.5: {status}"
    );
    let cleared = cli(&s, &["clear", "tiny", "--reason", "done"]).unwrap();
    assert!(
        cleared["message"].as_str().unwrap().contains("cleared"),
        "{cleared}"
    );
    assert!(
        cli(&s, &["status", "tiny"])
            .unwrap_err()
            .contains("NotFound")
    );
    s.stop().await;
}
