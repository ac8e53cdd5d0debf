//! Structured outputs (constrained decoding on llguidance) through the real
//! engine thread and the real servers: batch invariance, preemption, the
//! `length` finish of a grammar that cannot end, gRPC's `constraint`, and
//! Gemma 3 270M's vocabulary (a SentencePiece GGUF tokenizer).

use std::path::{Path, PathBuf};
use std::time::Instant;

use llmops::config::LimitsConfig;
use llmops::engine::SamplingParams;
use llmops::engine::grammar::Constraint;
use llmops::monitor::Protocol;
use llmops::proto as pb;
use llmops::scheduler::{EngineHandle, EngineLabels, Event, FinishReason, SchedulerConfig};
use llmops::validation::{GenerationSpec, Input, OutputConstraint, validate};
use serde_json::{Value, json};

use crate::server::TestServer;

/// The embedded model written out as a model folder.
fn embedded_folder(dir: &Path) -> PathBuf {
    let files = llmops::engine::embedded::files().expect("a build with the embedded model");
    let out = dir.join("embedded");
    std::fs::create_dir_all(&out).unwrap();
    for (name, bytes) in [
        ("model.safetensors", files.weights),
        ("config.json", files.config.as_bytes()),
        ("tokenizer.json", files.tokenizer),
        ("tokenizer_config.json", files.tokenizer_config.as_bytes()),
    ] {
        std::fs::write(out.join(name), bytes).unwrap();
    }
    out
}

fn embedded_engine(cfg: SchedulerConfig) -> EngineHandle {
    let m = llmops::engine::embedded::load(&Default::default()).unwrap();
    EngineHandle::spawn(
        m,
        cfg,
        EngineLabels {
            model: "embedded".into(),
            version: "v1".into(),
        },
    )
    .unwrap()
}

fn limits() -> LimitsConfig {
    LimitsConfig {
        max_body_bytes: 1 << 20,
        max_prompt_tokens: None,
        max_tokens: None,
        request_timeout: std::time::Duration::from_secs(60),
    }
}

fn spec(prompt: &str, max_tokens: usize, seed: u64, c: Option<Constraint>) -> GenerationSpec {
    GenerationSpec {
        input: Input::Text(prompt.into()),
        max_tokens: Some(max_tokens),
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..Default::default()
        },
        stop: vec![],
        stop_token_ids: vec![],
        ignore_eos: false,
        n: 1,
        deadline: None,
        arrival: Instant::now(),
        protocol: Protocol::Internal,
        constraint: c.map(|constraint| OutputConstraint {
            param: "response_format".into(),
            constraint,
        }),
        tools: vec![],
    }
}

/// Validates (compiling the constraint) and submits; the receiver.
fn submit(engine: &EngineHandle, s: GenerationSpec) -> tokio::sync::mpsc::Receiver<Event> {
    let mut v = validate(s, engine, &limits()).unwrap();
    engine.submit(v.choices.remove(0)).unwrap()
}

async fn collect(
    mut rx: tokio::sync::mpsc::Receiver<Event>,
) -> (Vec<u32>, String, FinishReason, u32) {
    let (mut ids, mut text) = (vec![], String::new());
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            Event::Done(c) => {
                text.push_str(&c.tail);
                return (ids, text, c.reason, c.preemptions);
            }
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
    panic!("event stream ended without a Done");
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "kind": {"type": "string", "enum": ["cat", "dog", "bird"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
            "names": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 2}
        },
        "required": ["kind", "age", "names"],
        "additionalProperties": false
    })
}

fn check_pet(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!(
        ["cat", "dog", "bird"].contains(&v["kind"].as_str().unwrap()),
        "{v}"
    );
    assert!(v["age"].as_u64().unwrap() <= 30, "{v}");
    let names = v["names"].as_array().unwrap();
    assert!((1..=2).contains(&names.len()), "{v}");
    assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constrained_request_gives_the_same_tokens_alone_and_inside_a_batch_of_unconstrained_ones()
 {
    let engine = embedded_engine(SchedulerConfig::default());
    let constrained = || spec("A pet:", 120, 42, Some(Constraint::JsonSchema(schema())));
    let (alone, text, reason, _) = collect(submit(&engine, constrained())).await;
    assert_eq!(reason, FinishReason::Stop, "{text:?}");
    check_pet(&text);

    // The same request in the middle of six unconstrained sampled ones.
    let mut others = vec![];
    for seed in 0..3 {
        others.push(submit(&engine, spec("Once upon a time", 60, seed, None)));
    }
    let rx = submit(&engine, constrained());
    for seed in 3..6 {
        others.push(submit(&engine, spec("The sea", 60, seed, None)));
    }
    let (batched, text_b, _, _) = collect(rx).await;
    for o in others {
        collect(o).await;
    }
    assert_eq!(alone, batched, "{text:?} vs {text_b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_constrained_sequence_keeps_its_grammar_and_its_tokens() {
    let alone = {
        let engine = embedded_engine(SchedulerConfig::default());
        let (ids, text, _, _) = collect(submit(
            &engine,
            spec("A pet:", 120, 5, Some(Constraint::JsonSchema(schema()))),
        ))
        .await;
        check_pet(&text);
        ids
    };
    // A pool of a few hundred tokens for eight sequences of ~100: the
    // youngest are preempted and recomputed.
    let engine = embedded_engine(SchedulerConfig {
        kv_cache_bytes: 20 * 16 * 6 * 2 * 2 * 32 * 2,
        ..Default::default()
    });
    let mut rxs = vec![];
    for seed in 0..7 {
        rxs.push(submit(&engine, spec("Once upon a time", 90, seed, None)));
    }
    let rx = submit(
        &engine,
        spec("A pet:", 120, 5, Some(Constraint::JsonSchema(schema()))),
    );
    let mut preemptions = 0;
    for r in rxs {
        preemptions += collect(r).await.3;
    }
    let (ids, text, reason, mine) = collect(rx).await;
    preemptions += mine;
    assert!(preemptions > 0, "the small pool must preempt");
    assert_eq!(reason, FinishReason::Stop);
    check_pet(&text);
    assert_eq!(ids, alone, "{text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grammar_that_cannot_finish_within_max_tokens_ends_with_length() {
    let engine = embedded_engine(SchedulerConfig::default());
    let rx = submit(
        &engine,
        spec("x", 12, 1, Some(Constraint::Regex("[a-z]{400}".into()))),
    );
    // Served meanwhile.
    let (_, _, other, _) = collect(submit(&engine, spec("The sea", 5, 2, None))).await;
    assert_eq!(other, FinishReason::Length);
    let (ids, text, reason, _) = collect(rx).await;
    assert_eq!(reason, FinishReason::Length);
    assert_eq!(ids.len(), 12);
    assert!(text.chars().all(|c| c.is_ascii_lowercase()), "{text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sampling_setting_draws_only_what_the_constraint_allows() {
    let engine = embedded_engine(SchedulerConfig::default());
    let settings = [
        (0.0, 0, 1.0, 0.0, 1.0),
        (1.0, 5, 1.0, 0.0, 1.0),
        (0.7, 0, 0.9, 0.0, 1.0),
        (1.3, 0, 1.0, 0.1, 1.0),
        (1.0, 40, 0.8, 0.05, 1.3),
    ];
    for (i, &(temperature, top_k, top_p, min_p, repetition_penalty)) in settings.iter().enumerate()
    {
        let mut s = spec(
            "Answer:",
            16,
            i as u64,
            Some(Constraint::Choice(vec![
                "yes".into(),
                "no".into(),
                "maybe not".into(),
            ])),
        );
        s.sampling = SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            seed: Some(i as u64),
            logprobs: Some(2),
            ..Default::default()
        };
        let (_, text, reason, _) = collect(submit(&engine, s)).await;
        assert!(
            ["yes", "no", "maybe not"].contains(&text.as_str()),
            "{i}: {text:?}"
        );
        assert_eq!(reason, FinishReason::Stop);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_takes_a_constraint_and_refuses_one_that_cannot_compile() {
    let dir = tempfile::tempdir().unwrap();
    let model = embedded_folder(dir.path());
    let s = TestServer::start_in(&model, &dir.path().join("data"), |a| {
        a.model_names = vec!["embedded".into()]
    })
    .await;
    let mut cl = s.grpc_client().await;
    let req = |c: pb::generate_request::Constraint| pb::GenerateRequest {
        model: "embedded".into(),
        input: Some(pb::generate_request::Input::Prompt("Code:".into())),
        max_tokens: 120,
        sampling: Some(pb::SamplingParams {
            temperature: Some(1.0),
            seed: Some(3),
            ..Default::default()
        }),
        constraint: Some(c),
        ..Default::default()
    };
    use pb::generate_request::Constraint as C;
    let r = cl
        .generate(req(C::Regex("[A-Z]{2}-[0-9]{3}".into())))
        .await
        .unwrap()
        .into_inner();
    assert!(
        regex::Regex::new("^[A-Z]{2}-[0-9]{3}$")
            .unwrap()
            .is_match(&r.text),
        "{:?}",
        r.text
    );
    assert_eq!(r.finish_reason, pb::FinishReason::Stop as i32);
    let r = cl
        .generate(req(C::JsonSchema(schema().to_string())))
        .await
        .unwrap()
        .into_inner();
    check_pet(&r.text);
    let r = cl
        .generate(req(C::Choice(pb::Choices {
            choices: vec!["left".into(), "right".into()],
        })))
        .await
        .unwrap()
        .into_inner();
    assert!(r.text == "left" || r.text == "right", "{:?}", r.text);
    let e = cl
        .generate(req(C::JsonSchema(
            r##"{"type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}}"##.into(),
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("nowhere"), "{}", e.message());
    let e = cl
        .generate(req(C::Grammar("start: (".into())))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_applies_response_format_on_both_endpoints_and_refuses_a_huge_schema() {
    let dir = tempfile::tempdir().unwrap();
    let model = embedded_folder(dir.path());
    let s = TestServer::start_in(&model, &dir.path().join("data"), |a| {
        a.model_names = vec!["embedded".into()]
    })
    .await;
    let c = reqwest::Client::new();
    let url = |p: &str| format!("http://{}{p}", s.http);
    let rf = json!({"type": "json_schema", "json_schema": {"name": "pet", "schema": schema(), "strict": true}});
    let v: Value = c
        .post(url("/v1/chat/completions"))
        .json(&json!({"model": "embedded", "messages": [{"role": "user", "content": "a pet"}], "max_tokens": 120, "temperature": 1.0, "seed": 1, "response_format": rf}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    check_pet(v["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let v: Value = c
        .post(url("/v1/completions"))
        .json(&json!({"model": "embedded", "prompt": "a pet", "max_tokens": 120, "temperature": 1.0, "seed": 2, "response_format": rf}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    check_pet(v["choices"][0]["text"].as_str().unwrap());
    // A 1 MB schema: a 400 naming the limit, before anything compiles.
    let props: serde_json::Map<String, Value> = (0..16_000)
        .map(|i| {
            (
                format!("field_{i:06}"),
                json!({"type": "string", "description": "x".repeat(40)}),
            )
        })
        .collect();
    let huge = json!({"type": "json_schema", "json_schema": {"name": "huge", "schema": {"type": "object", "properties": props}}});
    let r = c
        .post(url("/v1/chat/completions"))
        .json(&json!({"model": "embedded", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "response_format": huge}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "response_format", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("at most"),
        "{v}"
    );
    s.stop().await;
}

/// Gemma 3 270M's SentencePiece vocabulary from GGUF metadata (byte
/// fallback, `▁` for spaces, 262k tokens): a schema and a choice hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma3_270m_writes_json_for_a_schema_and_one_of_its_choices() {
    let path = crate::gemma::model_path();
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-gemma (the CI script does)",
        path.display()
    );
    let m = llmops::engine::load(&path, &Default::default()).unwrap();
    let engine = EngineHandle::spawn(
        m,
        SchedulerConfig::default(),
        EngineLabels {
            model: "gemma".into(),
            version: "v1".into(),
        },
    )
    .unwrap();
    for seed in 0..3 {
        let (_, text, reason, _) = collect(submit(
            &engine,
            spec(
                "A pet as JSON:",
                120,
                seed,
                Some(Constraint::JsonSchema(schema())),
            ),
        ))
        .await;
        assert_eq!(reason, FinishReason::Stop, "{text:?}");
        check_pet(&text);
        let (_, text, _, _) = collect(submit(
            &engine,
            spec(
                "Is the sky blue?",
                16,
                seed,
                Some(Constraint::Choice(vec!["Yes, it is".into(), "No".into()])),
            ),
        ))
        .await;
        assert!(text == "Yes, it is" || text == "No", "{text:?}");
    }
}
