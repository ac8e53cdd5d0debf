//! The retrain action on a real server: a tiny parent trained by
//! `llmops train` is fine-tuned in the server's process on captured pairs
//! plus a replay share of its own data (found through its model card), the
//! result is registered with its card and serves after a hot swap; a
//! candidate trained with an absurd learning rate is registered but fails
//! the offline gate; a cancelled job leaves no version and no files; a
//! second job for the same model is refused while one runs; progress is
//! reported while it runs. Every step is in the audit log, in order.

use std::path::Path;
use std::time::{Duration, Instant};

use llmops::train::{TrainArgs, run};
use serde_json::{Value, json};

use crate::process::{ADMIN, call};
use crate::server::TestServer;

pub(crate) const LINES: [&str; 12] = [
    "The whale swam under the grey sea at dawn.",
    "All the ships sailed home before the storm.",
    "A quiet bell rang over the old town.",
    "The captain read the map by the lamp.",
    "Cold wind came down from the north hills.",
    "The old sailor sang of the long voyage.",
    "Rain fell on the harbour all the night.",
    "The boy watched the gulls above the pier.",
    "A lantern burned in the window of the inn.",
    "The tide carried the boat past the rocks.",
    "Fishermen mended their nets on the shore.",
    "The lighthouse kept its watch over the bay.",
];

pub(crate) fn parent(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("corpus.txt");
    let mut text = String::new();
    for i in 0..6 {
        for (j, l) in LINES.iter().enumerate() {
            text.push_str(LINES[(j + i) % LINES.len()]);
            text.push(if l.len() % 2 == 0 { '\n' } else { ' ' });
        }
    }
    std::fs::write(&data, text).unwrap();
    let out = dir.join("parent");
    let mut args = TrainArgs::new(vec![data], out.clone()).unwrap();
    args.preset = "nano".into();
    args.vocab_size = Some(300);
    args.seq_len = 48;
    args.batch_size = 4;
    args.steps = 40;
    args.lr = 1e-2;
    args.warmup = 5;
    args.weight_decay = 0.0;
    args.eval_every = 0;
    args.eval_fraction = 0.2;
    args.seed = 3;
    args.quiet = true;
    run(&args).unwrap();
    out
}

/// Captured traffic: prompt/completion pairs cut from the same sentences.
fn captured(dir: &Path) -> std::path::PathBuf {
    let mut jsonl = String::new();
    for (i, l) in LINES.iter().cycle().take(40).enumerate() {
        let words: Vec<&str> = l.split(' ').collect();
        let cut = 2 + i % 3;
        jsonl.push_str(
            &json!({
                "prompt": words[..cut].join(" "),
                "completion": format!(" {}", words[cut..].join(" ")),
                "time": format!("2026-11-29T10:{:02}:00Z", i),
            })
            .to_string(),
        );
        jsonl.push('\n');
    }
    let p = dir.join("captured.jsonl");
    std::fs::write(&p, jsonl).unwrap();
    p
}

/// Polls the job until it has an outcome; returns the last status and
/// the highest step seen while it was running.
async fn until_done(c: &reqwest::Client, s: &TestServer) -> (Value, u64) {
    let t0 = Instant::now();
    let mut seen = 0;
    loop {
        let (st, v) = call(
            c,
            reqwest::Method::GET,
            s.url("/admin/v1/models/tiny/retrain"),
            None,
        )
        .await;
        assert_eq!(st, 200, "{v}");
        if !v["running"].as_bool().unwrap() {
            assert!(!v["outcome"].is_null(), "{v}");
            return (v, seen);
        }
        seen = seen.max(v["progress"]["step"].as_u64().unwrap());
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "retrain did not end: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `llmops retrain` against the server's gRPC port; its JSON output.
async fn cli(s: &TestServer, args: Vec<String>) -> Result<Value, String> {
    let url = format!("http://{}", s.grpc);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_llmops"))
            .arg("retrain")
            .args(["--url", &url, "--api-key", ADMIN])
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

fn budget() -> Value {
    json!({"threads": 1, "duty": 1.0, "nice": 0})
}

/// A server for the tiny parent trained in `dir`, with an admin key and
/// `dir` (the parent's data and the captured window) as its model root;
/// the captured window's path.
async fn serve_parent(dir: &Path) -> (TestServer, std::path::PathBuf) {
    let parent = parent(dir);
    let window = captured(dir);
    let root = dir.to_path_buf();
    let s = TestServer::start_in(&parent, &dir.join("registry"), move |a| {
        a.api_keys = vec![format!("ops:admin:{ADMIN}")];
        a.model_roots = vec![root];
    })
    .await;
    (s, window)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrain_registers_a_gated_version_that_serves_and_cancels_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, window) = serve_parent(tmp.path()).await;
    let c = reqwest::Client::new();
    let url = s.url("/admin/v1/models/tiny/retrain");

    // Nothing has run yet; a bad spec is refused by field.
    let (st, _) = call(&c, reqwest::Method::GET, url.clone(), None).await;
    assert_eq!(st, 404);
    let (st, v) = call(
        &c,
        reqwest::Method::POST,
        url.clone(),
        Some(json!({"data": [window], "replay_share": 1.5})),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = call(
        &c,
        reqwest::Method::POST,
        url.clone(),
        Some(json!({"data": [window], "stepz": 3})),
    )
    .await;
    assert_eq!(st, 400, "{v}");

    // 1. A sensible fine-tune, started with `llmops retrain … --wait` over
    // gRPC: registered, gate passed, card complete.
    let args: Vec<String> = [
        "tiny",
        "--data",
        window.to_str().unwrap(),
        "--steps",
        "12",
        "--lr",
        "3e-3",
        "--batch-size",
        "4",
        "--replay",
        "0.5",
        "--max-regression",
        "0.1",
        "--threads",
        "1",
        "--duty",
        "1",
        "--reason",
        "test",
        "--wait",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let printed = cli(&s, args).await.unwrap();
    assert_eq!(printed["parent"], "v1", "{printed}");
    assert!(
        !printed["running"].as_bool().unwrap(),
        "--wait waits: {printed}"
    );
    let (done, _) = until_done(&c, &s).await;
    let o = &done["outcome"];
    assert_eq!(o["result"], "registered", "{done}");
    assert_eq!(o["version"], "v2");
    let gate = &o["gate"];
    assert_eq!(gate["passed"], true);
    let sets: Vec<&str> = gate["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["set"].as_str().unwrap())
        .collect();
    assert_eq!(sets, ["window", "reference"], "{gate}");
    // The reference set is held out of the replay data: text the parent
    // did not write, and enough of it.
    assert_eq!(gate["reference"]["source"], "replay", "{gate}");
    assert!(
        gate["checks"][1]["tokens"].as_u64().unwrap() >= 256,
        "{gate}"
    );
    for check in gate["checks"].as_array().unwrap() {
        let (p, c) = (
            check["parent_perplexity"].as_f64().unwrap(),
            check["candidate_perplexity"].as_f64().unwrap(),
        );
        assert!(c <= p * 1.1, "{check}");
        assert!(check["examples"].as_u64().unwrap() > 0);
    }
    let p = &done["progress"];
    assert_eq!(p["phase"], "done");
    assert_eq!(p["step"], 12);
    assert!(p["tokens_per_second"].as_f64().unwrap() > 0.0);

    let (st, rec) = call(
        &c,
        reqwest::Method::GET,
        s.url("/admin/v1/models/tiny/versions/v2"),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let card = &rec["metadata"]["model_card"];
    assert_eq!(card["parent"]["version"], "v1");
    assert_eq!(card["window"]["from_files"]["records"], 40);
    assert_eq!(
        card["window"]["from_files"]["first"],
        "2026-11-29T10:00:00Z"
    );
    assert_eq!(card["window"]["from_files"]["last"], "2026-11-29T10:39:00Z");
    assert_eq!(card["replay_share"], 0.5);
    assert!(card["replay"]["examples"].as_u64().unwrap() > 0, "{card}");
    assert!(card["losses"]["held_out_final"].is_number());
    assert!(card["tokenizer"]["sha256"].is_string());
    assert!(card["created_at"].is_string());
    let source = rec["source"].as_str().unwrap();
    let on_disk = std::fs::read(Path::new(source).join("model_card.json")).unwrap();
    use sha2::Digest;
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&on_disk)),
        o["card_sha256"].as_str().unwrap()
    );

    // The new version loads and serves through the real server.
    let (st, v) = call(
        &c,
        reqwest::Method::PUT,
        s.url("/admin/v1/models/tiny/aliases/stable"),
        Some(json!({"version": "v2"})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = call(
        &c,
        reqwest::Method::POST,
        s.url("/v1/completions"),
        Some(json!({"model": "tiny", "prompt": "The whale", "max_tokens": 8, "temperature": 0})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert!(!v["choices"][0]["text"].as_str().unwrap().is_empty());
    let (_, serving) = call(&c, reqwest::Method::GET, s.url("/admin/v1/serving"), None).await;
    assert_eq!(
        serving["models"][0]["serving"]["version"], "v2",
        "{serving}"
    );

    // 2. An absurd learning rate: registered for inspection, gate failed.
    let (st, v) = call(
        &c,
        reqwest::Method::POST,
        url.clone(),
        Some(json!({"data": [window], "steps": 6, "lr": 3.0, "warmup": 0, "batch_size": 4, "eval_fraction": 0.2, "budget": budget()})),
    )
    .await;
    assert_eq!(st, 202, "{v}");
    assert_eq!(v["parent"], "v2");
    let (done, _) = until_done(&c, &s).await;
    let o = &done["outcome"];
    assert_eq!(o["result"], "gate_failed", "{done}");
    assert_eq!(o["version"], "v3");
    assert_eq!(o["gate"]["passed"], false);
    assert!(
        o["gate"]["reason"].as_str().unwrap().contains("perplexity"),
        "{o}"
    );
    let (_, rec) = call(
        &c,
        reqwest::Method::GET,
        s.url("/admin/v1/models/tiny/versions/v3"),
        None,
    )
    .await;
    let status = cli(&s, vec!["tiny".into(), "--status".into()])
        .await
        .unwrap();
    assert_eq!(status["outcome"]["result"], "gate_failed", "{status}");
    let refused = cli(&s, vec!["tiny".into(), "--cancel".into()])
        .await
        .unwrap_err();
    assert!(refused.contains("already ended"), "{refused}");
    assert_eq!(rec["metadata"]["retrain"]["gate"]["passed"], false);

    // 3. A long job under a duty cycle: progress while it runs, one job per
    // model, and cancelling leaves nothing behind.
    let (st, v) = call(
        &c,
        reqwest::Method::POST,
        url.clone(),
        Some(json!({"data": [window], "steps": 100000, "batch_size": 4, "eval_fraction": 0.2, "budget": {"threads": 1, "duty": 0.5, "nice": 5}})),
    )
    .await;
    assert_eq!(st, 202, "{v}");
    let job = v["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    loop {
        let (_, v) = call(&c, reqwest::Method::GET, url.clone(), None).await;
        let p = &v["progress"];
        if p["step"].as_u64().unwrap() >= 2 {
            assert_eq!(p["phase"], "training", "{v}");
            assert!(p["loss"].as_f64().unwrap().is_finite());
            assert!(p["eta_seconds"].as_f64().unwrap() > 0.0, "{v}");
            assert_eq!(p["steps"], 100000);
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (st, v) = call(
        &c,
        reqwest::Method::POST,
        url.clone(),
        Some(json!({"data": [window], "steps": 3})),
    )
    .await;
    assert_eq!(st, 409, "{v}");
    let (st, v) = call(
        &c,
        reqwest::Method::DELETE,
        format!("{url}?reason=enough"),
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (done, _) = until_done(&c, &s).await;
    assert_eq!(done["outcome"]["result"], "cancelled", "{done}");
    assert_eq!(done["progress"]["phase"], "cancelled");
    let (st, _) = call(&c, reqwest::Method::DELETE, url.clone(), None).await;
    assert_eq!(st, 409, "nothing runs any more");
    let (_, m) = call(
        &c,
        reqwest::Method::GET,
        s.url("/admin/v1/models/tiny"),
        None,
    )
    .await;
    assert_eq!(
        m["versions"].as_array().unwrap().len(),
        3,
        "no version from the cancelled job"
    );
    let mut left: Vec<String> = std::fs::read_dir(tmp.path().join("registry/trained/tiny"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left.iter()
            .all(|d| !d.contains(&job) && !d.ends_with(".partial")),
        "{left:?}"
    );

    // The audit log tells the story in order.
    let (_, audit) = call(&c, reqwest::Method::GET, s.url("/admin/v1/audit"), None).await;
    let steps: Vec<String> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["action"].as_str().unwrap().starts_with("training")
                || (e["action"] == "register_version"
                    && e["model"] == "tiny"
                    && e["record"]["version"] != "v1")
        })
        .map(|e| match e["action"].as_str().unwrap() {
            "training_finished" => format!(
                "training_finished:{}:{}",
                e["version"].as_str().unwrap(),
                e["gate_passed"]
            ),
            "training_failed" => format!(
                "training_failed:cancelled={}:{}",
                e["cancelled"], e["reason"]
            ),
            other => other.to_string(),
        })
        .collect();
    assert_eq!(
        steps,
        [
            "training_started",
            "register_version",
            "training_finished:v2:true",
            "training_started",
            "register_version",
            "training_finished:v3:false",
            "training_started",
            "training_failed:cancelled=true:\"enough\"",
        ],
        "{audit}"
    );
    s.stop().await;
}

/// Starts a retrain over HTTP and waits for its outcome.
async fn retrain(c: &reqwest::Client, s: &TestServer, spec: Value) -> Value {
    let url = s.url("/admin/v1/models/tiny/retrain");
    let (st, v) = call(c, reqwest::Method::POST, url, Some(spec)).await;
    assert_eq!(st, 202, "{v}");
    until_done(c, s).await.0["outcome"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_needs_a_reference_set_the_parent_did_not_write() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, window) = serve_parent(tmp.path()).await;
    let c = reqwest::Client::new();
    let spec = |extra: Value| {
        let mut v = json!({"data": [window], "steps": 6, "lr": 3e-3, "batch_size": 4,
                           "eval_fraction": 0.2, "max_regression": 0.5,
                           "replay_share": 0, "budget": budget()});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };

    // 1. No replay: the reference set is held out of the parent's own
    // data, which its card names (read for the gate only).
    let o = retrain(&c, &s, spec(json!({"seed": 1}))).await;
    let gate = &o["gate"];
    assert_eq!(o["result"], "registered", "{o}");
    assert_eq!(gate["reference"]["source"], "parent_data", "{gate}");
    assert_eq!(
        gate["reference"]["passed_over"],
        json!(["replay: replay_share is 0"]),
        "{gate}"
    );
    let reference = gate["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["set"] == "reference")
        .unwrap();
    assert!(reference["tokens"].as_u64().unwrap() >= 256, "{gate}");

    // 2. Without the parent's data, the reference is the held-out window's
    // prompts (what clients wrote, never what the parent answered): here
    // too few tokens to count as evidence, so the gate fails and says why.
    std::fs::remove_file(tmp.path().join("corpus.txt")).unwrap();
    let o = retrain(&c, &s, spec(json!({"seed": 2}))).await;
    let gate = &o["gate"];
    assert_eq!(o["result"], "gate_failed", "{o}");
    assert_eq!(gate["reference"]["source"], "captured_prompts", "{gate}");
    let passed_over = gate["reference"]["passed_over"].as_array().unwrap();
    assert!(
        passed_over[1]
            .as_str()
            .unwrap()
            .starts_with("parent_data: "),
        "{gate}"
    );
    let reason = gate["reason"].as_str().unwrap();
    assert!(
        reason.contains("captured_prompts") && reason.contains("min_reference_tokens 256"),
        "{reason}"
    );
    // The window check alone passed: it is not evidence enough.
    let window_check = gate["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["set"] == "window")
        .unwrap();
    assert_eq!(window_check["passed"], true, "{gate}");

    // 3. An operator who accepts a smaller reference set says so, and the
    // card records the minimum it was judged against. (Fine-tuning on the
    // completions alone costs this tiny parent about half again of its
    // perplexity on the prompts: the reference check sees the forgetting
    // that the window check cannot, so the limit is loosened here.)
    let o = retrain(
        &c,
        &s,
        spec(json!({"seed": 3, "min_reference_tokens": 8, "max_regression": 1.5})),
    )
    .await;
    assert_eq!(o["result"], "registered", "{o}");
    assert_eq!(o["gate"]["reference"]["source"], "captured_prompts");
    assert_eq!(o["gate"]["reference"]["min_tokens"], 8);
    let version = o["version"].as_str().unwrap();
    let (_, rec) = call(
        &c,
        reqwest::Method::GET,
        s.url(&format!("/admin/v1/models/tiny/versions/{version}")),
        None,
    )
    .await;
    assert_eq!(
        rec["metadata"]["model_card"]["gate"]["reference"]["source"], "captured_prompts",
        "{rec}"
    );
    s.stop().await;
}
