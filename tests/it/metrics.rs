//! `/metrics` against real traffic: counters equal what was sent, histogram
//! counts match the requests, gauges return to zero, and `promtool` accepts
//! the exposition.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use llmops::proto as pb;
use serde_json::{Value, json};

use crate::server::TestServer;

/// The model name this test owns, so that other tests running in the same
/// process (the recorder is process-global) never touch its series.
const MODEL: &str = "metered";

/// One scraped sample: name, labels, value.
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    let mut out = vec![];
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split("\",")
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        out.push(Sample {
            name: name.to_string(),
            labels,
            value: value.parse().unwrap(),
        });
    }
    out
}

/// Sum of `name` over series whose labels include every pair in `with`.
fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// [`sum`] over client traffic (HTTP and gRPC); the engine's own warm-up
/// request at load time is counted under `protocol="internal"`.
fn traffic(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    ["http", "grpc"]
        .iter()
        .map(|p| {
            let mut w = with.to_vec();
            w.push(("protocol", p));
            sum(samples, name, &w)
        })
        .sum()
}

/// What a scraped sum must be.
enum Want {
    /// Exactly this, over client traffic (see [`traffic`]).
    Traffic(f64),
    /// Exactly this, over every series with the labels.
    Exactly(f64),
    /// At least this (other tests add to the series).
    AtLeast(f64),
}

async fn scrape(s: &TestServer) -> (String, Vec<Sample>) {
    let text = s.metrics_text().await;
    let samples = parse(&text);
    (text, samples)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_metrics_equal_the_traffic_that_was_sent() {
    let s = TestServer::start(|a| a.model_names = vec![MODEL.into()]).await;
    let client = reqwest::Client::new();
    let (mut requests, mut prompt, mut generated, mut with_tokens) = (0u64, 0u64, 0u64, 0u64);
    let mut count = |usage: (u64, u64)| {
        requests += 1;
        prompt += usage.0;
        generated += usage.1;
        with_tokens += (usage.1 > 0) as u64;
    };

    // HTTP completions, non-streaming, various lengths.
    for (i, max) in [1u64, 4, 9, 16].into_iter().enumerate() {
        let body = json!({"model": MODEL, "prompt": "tell me a story ".repeat(i + 1),
                          "max_tokens": max, "temperature": 0, "ignore_eos": true});
        let v: Value = client
            .post(s.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let u = &v["usage"];
        assert_eq!(u["completion_tokens"], max, "{v}");
        count((
            u["prompt_tokens"].as_u64().unwrap(),
            u["completion_tokens"].as_u64().unwrap(),
        ));
    }
    // HTTP chat, streaming with usage in the last chunk.
    for max in [3u64, 7] {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi there"}],
                          "max_tokens": max, "stream": true, "ignore_eos": true,
                          "stream_options": {"include_usage": true}});
        let text = client
            .post(s.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let usage = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .find(|c| c["usage"].is_object())
            .unwrap()["usage"]
            .clone();
        count((
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["completion_tokens"].as_u64().unwrap(),
        ));
    }
    // gRPC, unary and streaming.
    let mut g = s.grpc_client().await;
    for max in [2u32, 5] {
        let r = g
            .generate(pb::GenerateRequest {
                model: MODEL.into(),
                input: Some(pb::generate_request::Input::Prompt("once upon".into())),
                max_tokens: max,
                ignore_eos: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let u = r.usage.unwrap();
        count((u.prompt_tokens as u64, u.completion_tokens as u64));
    }
    let mut stream = g
        .generate_stream(pb::GenerateRequest {
            model: MODEL.into(),
            input: Some(pb::generate_request::Input::Prompt("the sea".into())),
            max_tokens: 6,
            ignore_eos: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(m) = stream.next().await {
        last = m.unwrap().usage.or(last);
    }
    let u = last.unwrap();
    count((u.prompt_tokens as u64, u.completion_tokens as u64));

    // One request refused by validation is a failure, not a success.
    let bad = client
        .post(s.url("/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "x", "max_tokens": 1, "temperature": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // Idle: running and waiting back to zero.
    let mut samples = vec![];
    let mut text = String::new();
    for _ in 0..300 {
        (text, samples) = scrape(&s).await;
        let busy = sum(&samples, "llmops_num_requests_running", &[("model", MODEL)])
            + sum(&samples, "llmops_num_requests_waiting", &[("model", MODEL)]);
        if busy == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let m = [("model", MODEL)];
    assert_eq!(sum(&samples, "llmops_num_requests_running", &m), 0.0);
    assert_eq!(sum(&samples, "llmops_num_requests_waiting", &m), 0.0);
    assert!(
        samples
            .iter()
            .any(|x| x.name == "llmops_num_requests_running"
                && x.labels.get("model").map(String::as_str) == Some(MODEL)),
        "no running gauge for {MODEL}:\n{text}"
    );

    let n = requests as f64;
    let report = |what: &str| format!("{what}\n--- scrape ---\n{text}");
    // Counters, histogram counts and sums: what each must read after the
    // traffic above. Front-end failures happen before a version is chosen,
    // so they carry no model label, and other tests in this process add to
    // them and to the route counts: at least ours is there.
    #[rustfmt::skip] // one row a check
    let mut checks: Vec<(String, Vec<(&str, &str)>, Want)> = vec![
        ("llmops_request_success_total".into(), vec![m[0]], Want::Traffic(n)),
        ("llmops_request_success_total".into(), vec![m[0], ("finished_reason", "length")], Want::Traffic(n)),
        ("llmops_prompt_tokens_total".into(), vec![m[0]], Want::Traffic(prompt as f64)),
        ("llmops_generation_tokens_total".into(), vec![m[0]], Want::Traffic(generated as f64)),
        ("llmops_request_success_total".into(), vec![m[0], ("protocol", "http")], Want::Exactly(6.0)),
        ("llmops_request_success_total".into(), vec![m[0], ("protocol", "grpc")], Want::Exactly(3.0)),
        ("llmops_request_prompt_tokens_sum".into(), vec![m[0]], Want::Traffic(prompt as f64)),
        ("llmops_request_generation_tokens_sum".into(), vec![m[0]], Want::Traffic(generated as f64)),
        // One observation per token after each first one.
        ("llmops_inter_token_latency_seconds_count".into(), vec![m[0]], Want::Traffic((generated - with_tokens) as f64)),
        ("llmops_request_failure_total".into(), vec![("protocol", "http"), ("error_type", "invalid_request")], Want::AtLeast(1.0)),
        ("llmops_api_requests_total".into(), vec![("route", "/v1/completions"), ("status", "200")], Want::AtLeast(4.0)),
    ];
    // Histograms: one observation per request.
    for h in [
        "llmops_e2e_request_latency_seconds",
        "llmops_time_to_first_token_seconds",
        "llmops_request_queue_time_seconds",
        "llmops_request_prefill_time_seconds",
        "llmops_request_decode_time_seconds",
        "llmops_request_prompt_tokens",
        "llmops_request_generation_tokens",
    ] {
        checks.push((format!("{h}_count"), vec![m[0]], Want::Traffic(n)));
        checks.push((
            format!("{h}_bucket"),
            vec![m[0], ("le", "+Inf")],
            Want::Traffic(n),
        ));
    }
    for (metric, labels, want) in &checks {
        let what = report(&format!("{metric} {labels:?}"));
        match *want {
            Want::Traffic(v) => assert_eq!(traffic(&samples, metric, labels), v, "{what}"),
            Want::Exactly(v) => assert_eq!(sum(&samples, metric, labels), v, "{what}"),
            Want::AtLeast(v) => assert!(sum(&samples, metric, labels) >= v, "{what}"),
        }
    }
    // Never request ids or prompt text in labels.
    assert!(
        !text.contains("request_id"),
        "{}",
        report("request ids in labels")
    );
    assert!(
        !text.contains("tell me a story"),
        "{}",
        report("prompt text in metrics")
    );
    // Every metric family has HELP.
    for family in samples.iter().map(|x| {
        x.name
            .trim_end_matches("_bucket")
            .trim_end_matches("_count")
            .trim_end_matches("_sum")
    }) {
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{}",
            report(&format!("HELP for {family}"))
        );
    }

    // promtool lints the exposition.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    promtool(&["check", "metrics"], Some(&file));
    s.stop().await;
}

/// Runs promtool (Debian `prometheus`, installed by .ci/run) in `deploy/`,
/// with `stdin` as its input if given; panics with its output unless it
/// succeeds. Returns its stdout.
fn promtool(args: &[&str], stdin: Option<&std::path::Path>) -> String {
    let mut cmd = std::process::Command::new("promtool");
    cmd.args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy"));
    if let Some(f) = stdin {
        cmd.stdin(std::fs::File::open(f).unwrap());
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("promtool not runnable ({e}); .ci/run installs Debian `prometheus`")
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "promtool {} failed:\n{stdout}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn shipped_alert_rules_pass_promtool_check_and_unit_tests() {
    // The config loads both rule files (check config also checks them).
    let config = promtool(&["check", "config", "prometheus.yml"], None);
    for file in ["llmops-rules.yml", "llmops-alerts.yml"] {
        assert!(config.contains(&format!("Checking {file}")), "{config}");
    }
    promtool(
        &["check", "rules", "llmops-rules.yml", "llmops-alerts.yml"],
        None,
    );
    // Firing and silent cases for every alert.
    promtool(&["test", "rules", "llmops-alerts.test.yml"], None);

    // The unit tests feed the same names the rules use, so a misspelt metric
    // would pass them: check every llmops_ name against what llmops exports.
    use llmops::monitor::names::*;
    let exported = [
        TTFT,
        ENGINE_TTFT,
        ITL,
        E2E,
        QUEUE,
        PREFILL,
        DECODE,
        PROMPT_TOKENS_HIST,
        GENERATION_TOKENS_HIST,
        RUNNING,
        WAITING,
        KV_USAGE,
        PROMPT_TOKENS,
        GENERATION_TOKENS,
        SUCCESS,
        FAILURE,
        PREEMPTIONS,
        STEP_BATCH,
        STEP_TOKENS,
        STEP_TIME,
        API_REQUESTS,
        API_DURATION,
        MODEL_LOAD_FAILURES,
        MODEL_SERVING,
        llmops::monitor::drift::names::STATE,
    ];
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/llmops-alerts.yml"
    ))
    .unwrap();
    let mut used = std::collections::BTreeSet::new();
    for (i, _) in rules.match_indices("llmops_") {
        let name: String = rules[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_string();
        used.insert(family);
    }
    assert!(used.len() >= 6, "{used:?}");
    for name in &used {
        assert!(
            exported.contains(&name.as_str()),
            "llmops-alerts.yml uses `{name}`, which llmops does not export"
        );
    }
    // Every alert the issue asks for is there.
    for alert in [
        "LlmopsTargetDown",
        "LlmopsModelNotServing",
        "LlmopsHighErrorRatio",
        "LlmopsTTFTP99High",
        "LlmopsQueueRejecting",
        "LlmopsKVCacheSaturated",
        "LlmopsPreemptionStorm",
        "LlmopsDrift",
    ] {
        assert!(rules.contains(&format!("alert: {alert}\n")), "{alert}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_cache_hits_are_exported_in_prompt_tokens_per_model_and_version() {
    const CACHED: &str = "prefixed";
    let s = TestServer::start(|a| a.model_names = vec![CACHED.into()]).await;
    let client = reqwest::Client::new();
    let (_, before) = scrape(&s).await;
    let m = [("model", CACHED)];
    let queries0 = sum(&before, "llmops_prefix_cache_queries_total", &m);
    let hits0 = sum(&before, "llmops_prefix_cache_hits_total", &m);
    // One request with three choices of the same long prompt: the first
    // choice computes it, the others take its full blocks.
    let body = json!({"model": CACHED, "prompt": "tell me a story ".repeat(6),
                      "max_tokens": 4, "n": 3, "temperature": 0.8, "seed": 1, "ignore_eos": true});
    let v: Value = client
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(3), "{v}");
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap() as f64;
    let (text, after) = scrape(&s).await;
    let queries = sum(&after, "llmops_prefix_cache_queries_total", &m) - queries0;
    let hits = sum(&after, "llmops_prefix_cache_hits_total", &m) - hits0;
    assert_eq!(queries, 3.0 * prompt, "{text}");
    // Two choices take every full block before the prompt's last token
    // from the cache and copy the rest of its block: all but the last token.
    assert_eq!(hits, 2.0 * (prompt - 1.0), "{text}");
    for family in [
        "llmops_prefix_cache_queries_total",
        "llmops_prefix_cache_hits_total",
    ] {
        assert!(text.contains(&format!("# HELP {family} ")), "{text}");
        assert!(
            after
                .iter()
                .any(|x| x.name == family && x.labels.contains_key("version")),
            "{text}"
        );
    }
    s.stop().await;
}
