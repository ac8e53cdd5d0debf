//! Tool calls through the real servers on the embedded model: `required`
//! and a named function enforced by the grammar (arguments valid for the
//! schema), streamed `tool_calls` that match the whole answer, a history
//! with calls and results rendered by the fallback prompt, an unknown
//! function refused, the same over gRPC, and the Responses API's
//! `text.format` and function tools.

use std::path::{Path, PathBuf};

use llmops::proto as pb;
use serde_json::{Value, json};

use crate::server::TestServer;

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

async fn server(dir: &Path) -> TestServer {
    let model = embedded_folder(dir);
    TestServer::start_in(&model, &dir.join("data"), |a| {
        a.model_names = vec!["embedded".into()]
    })
    .await
}

fn weather() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"], "additionalProperties": false}}})
}

fn time() -> Value {
    json!({"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
        "properties": {"tz": {"type": "string", "maxLength": 12}}, "required": ["tz"], "additionalProperties": false}}})
}

fn check_args(name: &str, args: &str) {
    let v: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let o = v.as_object().unwrap();
    match name {
        "get_weather" => {
            assert_eq!(o.len(), 2, "{v}");
            assert!(
                o["city"].as_str().is_some_and(|c| c.chars().count() <= 10),
                "{v}"
            );
            assert!((1..=7).contains(&o["days"].as_i64().unwrap()), "{v}");
        }
        "get_time" => {
            assert_eq!(o.len(), 1, "{v}");
            assert!(o["tz"].is_string(), "{v}");
        }
        other => panic!("called {other}"),
    }
}

/// Reassembles a chat stream's content and tool calls.
fn reassemble(sse: &str) -> (String, Vec<(String, String)>, String) {
    let (mut content, mut calls, mut reason) = (String::new(), vec![], String::new());
    for line in sse.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        if let Some(t) = c["delta"]["content"].as_str() {
            content.push_str(t);
        }
        for call in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            calls.push((
                call["function"]["name"].as_str().unwrap().to_string(),
                call["function"]["arguments"].as_str().unwrap().to_string(),
            ));
        }
        if let Some(r) = c["finish_reason"].as_str() {
            reason = r.to_string();
        }
    }
    (content, calls, reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_and_named_tool_choices_return_arguments_valid_for_the_schema_streamed_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    let c = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", s.http);
    for seed in 0..8 {
        let choice = if seed % 2 == 0 {
            json!("required")
        } else {
            json!({"type": "function", "function": {"name": "get_time"}})
        };
        let body = json!({"model": "embedded", "messages": [{"role": "user", "content": "weather in Oslo?"}],
            "tools": [weather(), time()], "tool_choice": choice, "parallel_tool_calls": false,
            "max_tokens": 80, "temperature": 1.0, "seed": seed});
        let v: Value = c
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ch = &v["choices"][0];
        assert_eq!(ch["finish_reason"], "tool_calls", "{v}");
        assert!(ch["message"]["content"].is_null(), "{v}");
        let calls = ch["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{v}");
        let name = calls[0]["function"]["name"].as_str().unwrap();
        if seed % 2 == 1 {
            assert_eq!(name, "get_time");
        }
        assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
        check_args(name, calls[0]["function"]["arguments"].as_str().unwrap());
        // The same seed streamed: the same calls.
        let mut stream = body.clone();
        stream["stream"] = json!(true);
        let text = c
            .post(&url)
            .json(&stream)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let (content, streamed, reason) = reassemble(&text);
        assert_eq!(reason, "tool_calls", "{text}");
        assert!(content.is_empty(), "{text}");
        let whole: Vec<(String, String)> = calls
            .iter()
            .map(|c| {
                (
                    c["function"]["name"].as_str().unwrap().to_string(),
                    c["function"]["arguments"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(streamed, whole);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_with_calls_and_results_renders_and_bad_tool_requests_are_400s() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    let c = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", s.http);
    let history = json!([
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"days\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 3}"},
    ]);
    let r = c
        .post(&url)
        .json(&json!({"model": "embedded", "messages": history, "tools": [weather()], "max_tokens": 8, "seed": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 20, "{v}");
    for (body, param, says) in [
        (
            json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
            "`nope`",
        ),
        (
            json!({"tool_choice": "required"}),
            "tool_choice",
            "at least one tool",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "has space"}}]}),
            "tools",
            "has space",
        ),
        (
            json!({"tools": [weather()], "tool_choice": "required", "response_format": {"type": "json_object"}}),
            "tool_choice",
            "response_format",
        ),
    ] {
        let mut b = json!({"model": "embedded", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4});
        for (k, v) in body.as_object().unwrap() {
            b[k] = v.clone();
        }
        let r = c.post(&url).json(&b).send().await.unwrap();
        assert_eq!(r.status(), 400, "{b}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{v}"
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_returns_tool_calls_whole_and_on_the_last_stream_message() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    let mut cl = s.grpc_client().await;
    let req = pb::GenerateRequest {
        model: "embedded".into(),
        input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: "time in Tokyo?".into(),
                ..Default::default()
            }],
        })),
        max_tokens: 80,
        sampling: Some(pb::SamplingParams {
            temperature: Some(1.0),
            seed: Some(4),
            ..Default::default()
        }),
        tools: vec![pb::Tool {
            name: "get_time".into(),
            description: "The time.".into(),
            parameters: time()["function"]["parameters"].to_string(),
        }],
        tool_choice: Some(pb::ToolChoice {
            choice: Some(pb::tool_choice::Choice::Function("get_time".into())),
        }),
        ..Default::default()
    };
    let r = cl.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(r.finish_reason, pb::FinishReason::ToolCalls as i32, "{r:?}");
    assert_eq!(r.tool_calls.len(), 1);
    assert_eq!(r.tool_calls[0].name, "get_time");
    check_args("get_time", &r.tool_calls[0].arguments);
    let mut stream = cl.generate_stream(req.clone()).await.unwrap().into_inner();
    let mut last = None;
    while let Some(m) = stream.message().await.unwrap() {
        last = Some(m);
    }
    let last = last.unwrap();
    assert_eq!(last.finish_reason, pb::FinishReason::ToolCalls as i32);
    assert_eq!(last.tool_calls[0].arguments, r.tool_calls[0].arguments);
    let mut bad = req;
    bad.tool_choice = Some(pb::ToolChoice {
        choice: Some(pb::tool_choice::Choice::Function("nope".into())),
    });
    let e = cl.generate(bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("nope"), "{}", e.message());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_take_a_json_schema_text_format_and_function_tools() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    let c = reqwest::Client::new();
    let url = format!("http://{}/v1/responses", s.http);
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false});
    let v: Value = c
        .post(&url)
        .json(&json!({"model": "embedded", "input": "ok?", "max_output_tokens": 40, "temperature": 1.0, "seed": 2,
            "text": {"format": {"type": "json_schema", "name": "ok", "schema": schema, "strict": true}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "completed", "{v}");
    let text = v["output"][0]["content"][0]["text"].as_str().unwrap();
    let parsed: Value = serde_json::from_str(text).unwrap();
    assert!(parsed["ok"].is_boolean(), "{text}");
    assert_eq!(v["text"]["format"]["type"], "json_schema");
    let tool = json!({"type": "function", "name": "get_time", "parameters": time()["function"]["parameters"]});
    let v: Value = c
        .post(&url)
        .json(&json!({"model": "embedded", "input": "time?", "max_output_tokens": 60, "temperature": 1.0, "seed": 3,
            "tools": [tool], "tool_choice": "required", "parallel_tool_calls": false}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let call = v["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["type"] == "function_call")
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(call["name"], "get_time");
    check_args("get_time", call["arguments"].as_str().unwrap());
    // The call's output continues the stored conversation.
    let r = c
        .post(&url)
        .json(&json!({"model": "embedded", "previous_response_id": v["id"], "max_output_tokens": 4,
            "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "noon"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    s.stop().await;
}
