//! `POST /v1/responses` (OpenAI's Responses API) for text, plus
//! `GET` / `DELETE /v1/responses/{id}`.
//!
//! A Responses request is translated ([`translate`]) into the same
//! protocol-neutral [`GenerationSpec`] a chat completion becomes: the
//! `instructions` as a system message, the stored conversation of
//! `previous_response_id`, then `input` (a string or message items), all
//! rendered by the model's chat template. Structured output (`text.format`
//! `json_schema` / `json_object`) becomes the spec's output constraint and
//! function `tools` its tools (calls read from the output as the chat API
//! reads them; `required` and a named function enforced by the grammar).
//! A stream sends text as it comes and each call once the output is whole.
//!
//! Responses are kept in memory ([`ResponseStore`]) unless `store: false`:
//! at most [`STORE_MAX_RESPONSES`] responses and [`STORE_MAX_BYTES`] of
//! text, each for at most [`STORE_TTL`] after its last use, the least
//! recently used evicted first. A response is visible only to the API key
//! that created it. They do not survive a restart.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument;

use super::{HttpState, JsonBody, Mode, RequestId, ToolStream, deadline, random_id, unix_now};
use crate::api::auth::Principal;
use crate::api::error::ApiError;
use crate::api::openai::SamplingFields;
use crate::engine::Message;
use crate::engine::grammar::Constraint;
use crate::infer::{self, Generation};
use crate::monitor::Protocol;
use crate::scheduler::{Event, FinishReason};
use crate::tools::{Family, ToolCall, Tools};
use crate::validation::{GenerationSpec, Input, OutputConstraint};

/// How long a stored response is kept after its last use.
pub const STORE_TTL: Duration = Duration::from_secs(3600);
/// Most responses kept.
pub const STORE_MAX_RESPONSES: usize = 4096;
/// Most bytes of conversation text kept over all stored responses.
pub const STORE_MAX_BYTES: usize = 64 << 20;

/// `POST /v1/responses`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponsesRequest {
    /// Model name.
    pub model: String,
    /// A string (one user message) or a list of message items.
    pub input: ResponsesInput,
    /// A system message put first (not carried to later turns).
    pub instructions: Option<String>,
    /// Most tokens to generate.
    pub max_output_tokens: Option<u64>,
    /// Stream the Responses event sequence.
    #[serde(default)]
    pub stream: bool,
    /// Continue the conversation of a stored response.
    pub previous_response_id: Option<String>,
    /// Keep this response for `previous_response_id` (default true).
    pub store: Option<bool>,
    /// Output format: `{"format": {"type": "text" | "json_object" |
    /// "json_schema", …}}`.
    pub text: Option<Value>,
    /// Function tools (`{"type": "function", "name", "parameters", …}`).
    pub tools: Option<Vec<Value>>,
    /// `none`, `auto`, `required` or `{"type": "function", "name"}`.
    pub tool_choice: Option<Value>,
    /// Several calls in one response (default true).
    pub parallel_tool_calls: Option<bool>,
    /// Echoed back.
    pub metadata: Option<Value>,
    /// End-user id (a canary route key).
    pub user: Option<String>,
    /// Extension (as for completions): keep generating past EOS.
    #[serde(default)]
    pub ignore_eos: bool,
    /// Sampling (`temperature`, `top_p`, `seed` and the extensions).
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `input`: a string or items.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ResponsesInput {
    /// One user message.
    Text(String),
    /// Message items (`{"role", "content"}`, `type: "message"` optional).
    Items(Vec<Value>),
}

/// A stored response: its owner, the conversation so far (its input and
/// its output, without instructions) and the response object.
#[derive(Debug, Clone)]
struct Stored {
    owner: String,
    conversation: Vec<Message>,
    object: Value,
    bytes: usize,
    used: Instant,
    tick: u64,
}

#[derive(Debug, Default)]
struct StoreInner {
    by_id: HashMap<String, Stored>,
    /// Last-use order: tick → id.
    order: BTreeMap<u64, String>,
    bytes: usize,
    tick: u64,
}

/// Responses kept in memory for `previous_response_id` and `GET`: bounded
/// by count, bytes and time since last use (LRU + TTL; see the module).
#[derive(Debug, Clone, Default)]
pub struct ResponseStore {
    inner: Arc<Mutex<StoreInner>>,
}

impl ResponseStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, StoreInner> {
        // A panic while holding the lock leaves consistent maps (every
        // update is a few inserts and removes): keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, id: String, owner: &str, conversation: Vec<Message>, object: Value) {
        let bytes = conversation
            .iter()
            .map(|m| m.content.len() + m.role.len())
            .sum::<usize>()
            * 2;
        if bytes > STORE_MAX_BYTES {
            return;
        }
        let mut s = self.lock();
        s.expire(Instant::now());
        s.tick += 1;
        let tick = s.tick;
        s.order.insert(tick, id.clone());
        s.bytes += bytes;
        let old = s.by_id.insert(
            id,
            Stored {
                owner: owner.to_string(),
                conversation,
                object,
                bytes,
                used: Instant::now(),
                tick,
            },
        );
        if let Some(old) = old {
            s.order.remove(&old.tick);
            s.bytes -= old.bytes;
        }
        while s.by_id.len() > STORE_MAX_RESPONSES || s.bytes > STORE_MAX_BYTES {
            if !s.evict_oldest() {
                break;
            }
        }
    }

    /// The stored response `id` of `owner`, marked as used.
    fn get(&self, id: &str, owner: &str) -> Option<(Vec<Message>, Value)> {
        let mut s = self.lock();
        let now = Instant::now();
        s.expire(now);
        s.tick += 1;
        let tick = s.tick;
        let e = s.by_id.get_mut(id).filter(|e| e.owner == owner)?;
        let old = std::mem::replace(&mut e.tick, tick);
        e.used = now;
        let out = (e.conversation.clone(), e.object.clone());
        s.order.remove(&old);
        s.order.insert(tick, id.to_string());
        Some(out)
    }

    fn remove(&self, id: &str, owner: &str) -> bool {
        let mut s = self.lock();
        if s.by_id.get(id).is_none_or(|e| e.owner != owner) {
            return false;
        }
        if let Some(e) = s.by_id.remove(id) {
            s.order.remove(&e.tick);
            s.bytes -= e.bytes;
        }
        true
    }

    /// Responses held now.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl StoreInner {
    fn evict_oldest(&mut self) -> bool {
        let Some((_, id)) = self.order.pop_first() else {
            return false;
        };
        if let Some(e) = self.by_id.remove(&id) {
            self.bytes -= e.bytes;
        }
        true
    }

    /// Drops responses unused for [`STORE_TTL`] (the oldest come first).
    fn expire(&mut self, now: Instant) {
        while let Some((_, id)) = self.order.first_key_value() {
            let stale = self
                .by_id
                .get(id)
                .is_none_or(|e| now.duration_since(e.used) > STORE_TTL);
            if !stale || !self.evict_oldest() {
                break;
            }
        }
    }
}

/// The routes, with their store.
pub fn routes() -> axum::Router<HttpState> {
    axum::Router::new()
        .route("/v1/responses", post(create))
        .route("/v1/responses/{id}", get(retrieve).delete(remove))
        .layer(Extension(ResponseStore::default()))
}

/// The text of one content entry of an input message: a string, or parts
/// of type `input_text` / `output_text` / `text`.
fn item_text(content: &Value, at: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut s = String::new();
            for (j, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, p.get("text").and_then(Value::as_str)) {
                    ("input_text" | "output_text" | "text", Some(t)) => s.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            "input",
                            format!(
                                "{at}.content[{j}]: content type `{kind}` is not supported (input_text and output_text only)"
                            ),
                        ));
                    }
                }
            }
            Ok(s)
        }
        _ => Err(ApiError::invalid(
            "input",
            format!("{at}.content must be a string or a list of content parts"),
        )),
    }
}

/// The messages of `input`.
fn input_messages(input: &ResponsesInput) -> Result<Vec<Message>, ApiError> {
    match input {
        ResponsesInput::Text(t) => Ok(vec![Message {
            role: "user".into(),
            content: t.clone(),
            ..Default::default()
        }]),
        ResponsesInput::Items(items) => {
            if items.is_empty() {
                return Err(ApiError::invalid("input", "input must not be empty"));
            }
            let mut out: Vec<Message> = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let at = format!("input[{i}]");
                let kind = item
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("message");
                let field = |name: &str| {
                    item.get(name).and_then(Value::as_str).ok_or_else(|| {
                        ApiError::invalid("input", format!("{at}: a {kind} item needs `{name}`"))
                    })
                };
                match kind {
                    "message" => {}
                    // A call the model made earlier: the assistant's turn
                    // (calls in a row are one turn).
                    "function_call" => {
                        let call = crate::tools::history_call(&json!({
                            "id": field("call_id")?,
                            "type": "function",
                            "function": {"name": field("name")?, "arguments": field("arguments")?},
                        }))
                        .map_err(|e| ApiError::invalid("input", format!("{at}: {e}")))?;
                        match out.last_mut() {
                            Some(m) if m.role == "assistant" && !m.tool_calls.is_empty() => {
                                m.tool_calls.push(call)
                            }
                            _ => out.push(Message {
                                role: "assistant".into(),
                                tool_calls: vec![call],
                                ..Default::default()
                            }),
                        }
                        continue;
                    }
                    "function_call_output" => {
                        let output = match item.get("output") {
                            Some(Value::String(s)) => s.clone(),
                            Some(v @ Value::Array(_)) => item_text(v, &at)?,
                            _ => {
                                return Err(ApiError::invalid(
                                    "input",
                                    format!("{at}: a function_call_output item needs `output`"),
                                ));
                            }
                        };
                        out.push(Message {
                            role: "tool".into(),
                            content: output,
                            tool_call_id: Some(field("call_id")?.to_string()),
                            ..Default::default()
                        });
                        continue;
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            "input",
                            format!(
                                "{at}: item type `{kind}` is not supported (message, function_call, function_call_output)"
                            ),
                        ));
                    }
                }
                let role = item.get("role").and_then(Value::as_str).unwrap_or("");
                if !matches!(role, "user" | "assistant" | "system" | "developer") {
                    return Err(ApiError::invalid(
                        "input",
                        format!(
                            "{at}.role: `{role}` is not a role (user, assistant, system, developer)"
                        ),
                    ));
                }
                let content = item.get("content").unwrap_or(&Value::Null);
                out.push(Message {
                    role: if role == "developer" { "system" } else { role }.to_string(),
                    content: item_text(content, &at)?,
                    ..Default::default()
                });
            }
            Ok(out)
        }
    }
}

/// The request's function tools (`{"type": "function", "name", …}`, flat
/// as the Responses API has them).
fn tools(req: &ResponsesRequest) -> Result<Tools, ApiError> {
    Tools::from_wire(
        req.tools.as_deref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )
    .map_err(crate::api::structured::tool_error)
}

/// `text.format` as an output constraint: `json_schema` (`{"type":
/// "json_schema", "name", "schema", "strict"}`, flat as the Responses API
/// has it) or `json_object`; `text` is none.
fn text_format(req: &ResponsesRequest) -> Result<Option<OutputConstraint>, ApiError> {
    let Some(format) = req.text.as_ref().and_then(|t| t.get("format")) else {
        return Ok(None);
    };
    if format.is_null() {
        return Ok(None);
    }
    let kind = format.get("type").and_then(Value::as_str).unwrap_or("");
    let constraint = match kind {
        "text" => return Ok(None),
        "json_object" => Constraint::JsonObject,
        "json_schema" => match format.get("schema") {
            None | Some(Value::Null) => Constraint::JsonSchema(json!({})),
            Some(s @ (Value::Object(_) | Value::Bool(_))) => Constraint::JsonSchema(s.clone()),
            Some(_) => {
                return Err(ApiError::invalid(
                    "text.format",
                    "text.format.schema must be a JSON schema (an object)",
                ));
            }
        },
        other => {
            return Err(ApiError::invalid(
                "text.format",
                format!("text.format.type must be text, json_object or json_schema, got `{other}`"),
            ));
        }
    };
    Ok(Some(OutputConstraint {
        param: "text.format".into(),
        constraint,
    }))
}

/// A Responses request as the protocol-neutral generation it is, given the
/// conversation of its `previous_response_id` (empty when none). Returns
/// the spec and the conversation to store (history and this input, without
/// instructions).
pub fn translate(
    req: &ResponsesRequest,
    history: Vec<Message>,
    arrival: Instant,
    deadline: Instant,
) -> Result<(GenerationSpec, Vec<Message>), ApiError> {
    let constraint = text_format(req)?;
    let mut conversation = history;
    conversation.extend(input_messages(&req.input)?);
    let mut messages = Vec::with_capacity(conversation.len() + 1);
    if let Some(i) = req.instructions.as_ref().filter(|i| !i.is_empty()) {
        messages.push(Message {
            role: "system".into(),
            content: i.clone(),
            ..Default::default()
        });
    }
    messages.extend(conversation.iter().cloned());
    let max_tokens = match req.max_output_tokens {
        None => None,
        Some(0) => {
            return Err(ApiError::invalid(
                "max_output_tokens",
                "max_output_tokens must be at least 1",
            ));
        }
        Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
    };
    let spec = GenerationSpec {
        input: Input::Chat(messages),
        max_tokens,
        sampling: req.sampling.to_params(None)?,
        stop: vec![],
        stop_token_ids: vec![],
        ignore_eos: req.ignore_eos,
        n: 1,
        deadline: Some(deadline),
        arrival,
        protocol: Protocol::Http,
        constraint,
        tools: vec![],
    };
    let mut spec = spec;
    crate::api::structured::with_tools(&mut spec, &tools(req)?)?;
    Ok((spec, conversation))
}

/// What every rendering of one response repeats.
struct Head {
    id: String,
    message_id: String,
    created_at: u64,
    model: String,
    req: ResponsesRequest,
    /// The request's tools, when the model may call them, and how its
    /// family writes calls.
    tools: Option<Arc<(Tools, Family)>>,
}

/// A function call of a response, as its `function_call` output item.
fn call_item(c: &ToolCall, call_id: &str) -> Value {
    json!({
        "type": "function_call",
        "id": format!("fc_{}", random_id(16)),
        "call_id": call_id,
        "name": c.name,
        "arguments": c.arguments,
        "status": "completed",
    })
}

/// A finished output read for calls: its text (none when only calls) and
/// its calls with their ids.
struct Output {
    text: Option<String>,
    calls: Vec<(String, ToolCall)>,
}

impl Output {
    fn read(head: &Head, text: &str) -> Self {
        let Some((tools, family)) = head.tools.as_deref() else {
            return Self {
                text: Some(text.to_string()),
                calls: vec![],
            };
        };
        let p = crate::tools::parse(tools, *family, text);
        Self {
            text: p.content,
            calls: p
                .calls
                .into_iter()
                .map(|c| (format!("call_{}", random_id(12)), c))
                .collect(),
        }
    }
}

impl Head {
    fn message(&self, text: &str, status: &str) -> Value {
        json!({
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": if status == "in_progress" { json!([]) } else { json!([part(text)]) },
        })
    }

    /// The response object. `done`: the finish reason and token counts.
    fn object(&self, text: &str, done: Option<(FinishReason, usize, usize)>) -> Value {
        let out = Output {
            text: Some(text.to_string()),
            calls: vec![],
        };
        self.object_of(&out, done)
    }

    /// The response object of an output read for calls.
    fn object_of(&self, out: &Output, done: Option<(FinishReason, usize, usize)>) -> Value {
        let (status, incomplete, output, usage) = match done {
            None => ("in_progress", Value::Null, json!([]), Value::Null),
            Some((reason, input, output)) => {
                let (status, incomplete, item) = match reason {
                    FinishReason::Length => (
                        "incomplete",
                        json!({"reason": "max_output_tokens"}),
                        "incomplete",
                    ),
                    _ => ("completed", Value::Null, "completed"),
                };
                let mut items: Vec<Value> = out
                    .text
                    .iter()
                    .filter(|t| out.calls.is_empty() || !t.is_empty())
                    .map(|t| self.message(t, item))
                    .collect();
                items.extend(out.calls.iter().map(|(id, c)| call_item(c, id)));
                (
                    status,
                    incomplete,
                    Value::Array(items),
                    json!({
                        "input_tokens": input,
                        "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens": output,
                        "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": input + output,
                    }),
                )
            }
        };
        let r = &self.req;
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": done.map(|_| unix_now()),
            "status": status,
            "error": null,
            "incomplete_details": incomplete,
            "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": r.parallel_tool_calls.unwrap_or(true),
            "previous_response_id": r.previous_response_id,
            "store": r.store.unwrap_or(true),
            "temperature": r.sampling.temperature.unwrap_or(1.0),
            "top_p": r.sampling.top_p.unwrap_or(1.0),
            "text": r.text.clone().filter(|t| t.get("format").is_some()).unwrap_or_else(|| json!({"format": {"type": "text"}})),
            "tool_choice": r.tool_choice.clone().unwrap_or_else(|| json!("auto")),
            "tools": r.tools.clone().unwrap_or_default(),
            "truncation": "disabled",
            "usage": usage,
            "metadata": r.metadata.clone().unwrap_or_else(|| json!({})),
            "user": r.user,
        })
    }
}

fn part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// Handles `POST /v1/responses`.
pub async fn create(
    State(st): State<HttpState>,
    Extension(principal): Extension<Arc<Principal>>,
    Extension(rid): Extension<RequestId>,
    Extension(store): Extension<ResponseStore>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<ResponsesRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let history = match &req.previous_response_id {
        None => vec![],
        Some(prev) => {
            store
                .get(prev, &principal.key_id)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "previous_response_id",
                        format!("Previous response with id '{prev}' not found (responses are kept in memory for a limited time, and never with store: false)."),
                    )
                })?
                .0
        }
    };
    let until = deadline(&headers, &st.limits, arrival)?;
    let (spec, conversation) = translate(&req, history, arrival, until)?;
    let tools = tools(&req)?;
    let key = super::route_key(&headers, req.user.as_deref(), &principal, &rid);
    let picked = st.router.pick(&req.model, &key)?;
    let target = picked.target.clone();
    let family = Family::of_template(target.engine.chat_template().source());
    let span = tracing::info_span!("responses", request_id = %rid.0, model = %req.model, version = %target.version);
    let valid = infer::validate(&target, vec![spec], &st.limits)
        .instrument(span.clone())
        .await?;
    let generation = span.in_scope(|| infer::submit(&picked, valid, &principal.quota))?;
    let head = Head {
        id: format!("resp_{}", random_id(16)),
        message_id: format!("msg_{}", random_id(16)),
        created_at: unix_now(),
        model: req.model.clone(),
        req,
        tools: tools.active().then(|| Arc::new((tools, family))),
    };
    let keep = head.req.store.unwrap_or(true).then(|| Keep {
        store,
        owner: principal.key_id.clone(),
        conversation,
    });
    if head.req.stream {
        return Ok(stream(generation, head, keep).into_response());
    }
    let prompt_tokens = generation.prompt_tokens;
    let out = generation
        .collect()
        .instrument(span.clone())
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::Internal("the engine returned no output".into()))?;
    let reason = out.finish_reason.unwrap_or(FinishReason::Aborted);
    if reason == FinishReason::Timeout {
        return Err(ApiError::DeadlineExceeded(
            "the request's deadline passed before it finished (see x-request-timeout)".into(),
        ));
    }
    let output = Output::read(&head, &out.text);
    let object = head.object_of(
        &output,
        Some((reason, prompt_tokens, out.completion_tokens)),
    );
    if let Some(k) = keep {
        k.save(&head.id, &output, object.clone());
    }
    span.in_scope(|| {
        tracing::info!(
            prompt_tokens,
            completion_tokens = out.completion_tokens,
            elapsed_ms = arrival.elapsed().as_millis() as u64,
            "response answered"
        )
    });
    Ok(Json(object).into_response())
}

/// Where a finished response is stored (absent with `store: false`).
struct Keep {
    store: ResponseStore,
    owner: String,
    conversation: Vec<Message>,
}

impl Keep {
    fn save(mut self, id: &str, out: &Output, object: Value) {
        self.conversation.push(Message {
            role: "assistant".into(),
            content: out.text.clone().unwrap_or_default(),
            tool_calls: out
                .calls
                .iter()
                .filter_map(|(call_id, c)| {
                    crate::tools::history_call(&json!({
                        "id": call_id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments},
                    }))
                    .ok()
                })
                .collect(),
            ..Default::default()
        });
        self.store
            .insert(id.to_string(), &self.owner, self.conversation, object);
    }
}

fn event(kind: &str, seq: &mut u64, mut body: Value) -> Result<SseEvent, Infallible> {
    if let Value::Object(m) = &mut body {
        m.insert("type".into(), json!(kind));
        m.insert("sequence_number".into(), json!(*seq));
    }
    *seq += 1;
    Ok(SseEvent::default()
        .event(kind)
        .data(serde_json::to_string(&body).unwrap_or_default()))
}

/// The Responses event sequence: `response.created`, `response.in_progress`,
/// then the message item as its text comes (`response.output_item.added`,
/// `response.content_part.added`, `response.output_text.delta`…,
/// `response.output_text.done`, `response.content_part.done`,
/// `response.output_item.done`), then each function call the output made
/// (`response.output_item.added`, `response.function_call_arguments.delta`
/// and `.done`, `response.output_item.done`), then `response.completed`
/// (`response.incomplete` when `max_output_tokens` cut it short;
/// `response.failed` when the engine failed). With tools, text that cannot
/// be a call streams as it comes and a call is held until the output is
/// whole (then read exactly as the non-streamed response reads it), as the
/// chat stream does.
fn stream(
    generation: Generation,
    head: Head,
    keep: Option<Keep>,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let prompt_tokens = generation.prompt_tokens;
    let mut calls = head.tools.clone().map(|t| ToolStream {
        tools: t,
        choices: vec![Mode::Undecided(String::new())],
    });
    let s = async_stream::stream! {
        let mut seq = 0u64;
        let mid = head.message_id.clone();
        yield event("response.created", &mut seq, json!({"response": head.object("", None)}));
        yield event("response.in_progress", &mut seq, json!({"response": head.object("", None)}));
        // The message item opens with its first text (a response that only
        // calls has none).
        let mut opened = false;
        let mut text = String::new();
        let mut made = vec![];
        let mut events = generation.events();
        let mut end = None;
        while let Some((_, ev)) = events.next().await {
            let send = match ev {
                Event::Token { text: delta, .. } => match calls.as_mut() {
                    Some(c) => c.push(0, &delta),
                    None => (!delta.is_empty()).then_some(delta),
                },
                Event::Done(c) => {
                    end = Some(Ok((c.reason, c.completion_tokens)));
                    match calls.as_mut() {
                        Some(t) => {
                            let (content, found) = t.finish(0, &c.tail);
                            made = found;
                            content
                        }
                        None => (!c.tail.is_empty()).then_some(c.tail),
                    }
                }
                Event::Failed(e) => {
                    tracing::error!(error = %e, "response failed mid-stream");
                    end = Some(Err(("server_error", "the engine failed on this request".to_string())));
                    None
                }
            };
            if let Some(delta) = send.filter(|d| !d.is_empty()) {
                if !opened {
                    opened = true;
                    for e in open_message(&head, &mut seq) {
                        yield e;
                    }
                }
                text.push_str(&delta);
                yield event("response.output_text.delta", &mut seq, json!({
                    "item_id": mid, "output_index": 0, "content_index": 0,
                    "delta": delta, "logprobs": [],
                }));
            }
            if end.is_some() {
                break;
            }
        }
        let (reason, output_tokens) = match end {
            Some(Ok((FinishReason::Timeout, _))) => {
                let e = ("timeout", "the request's deadline passed before it finished (see x-request-timeout)".to_string());
                yield failed(&head, &mut seq, &text, e);
                return;
            }
            Some(Ok((FinishReason::Aborted, _))) => {
                yield failed(&head, &mut seq, &text, ("server_error", "the server stopped before the request finished".into()));
                return;
            }
            Some(Ok(done)) => done,
            Some(Err(e)) => {
                yield failed(&head, &mut seq, &text, e);
                return;
            }
            None => {
                yield failed(&head, &mut seq, &text, ("server_error", "the engine stopped before the request finished".into()));
                return;
            }
        };
        let output = Output {
            text: Some(text),
            calls: made
                .into_iter()
                .map(|c| (format!("call_{}", random_id(12)), c))
                .collect(),
        };
        // An answer with neither text nor calls is an empty message.
        if !opened && output.calls.is_empty() {
            for e in open_message(&head, &mut seq) {
                yield e;
            }
        }
        let object = head.object_of(&output, Some((reason, prompt_tokens, output_tokens)));
        let items = object["output"].as_array().cloned().unwrap_or_default();
        for (i, item) in items.iter().enumerate() {
            let id = item["id"].clone();
            if item["type"] == "message" {
                let text = item["content"][0]["text"].as_str().unwrap_or_default();
                yield event("response.output_text.done", &mut seq, json!({
                    "item_id": id, "output_index": i, "content_index": 0, "text": text, "logprobs": [],
                }));
                yield event("response.content_part.done", &mut seq, json!({
                    "item_id": id, "output_index": i, "content_index": 0, "part": part(text),
                }));
            } else {
                let mut added = item.clone();
                added["status"] = json!("in_progress");
                added["arguments"] = json!("");
                yield event("response.output_item.added", &mut seq, json!({"output_index": i, "item": added}));
                yield event("response.function_call_arguments.delta", &mut seq, json!({
                    "item_id": id, "output_index": i, "delta": item["arguments"],
                }));
                yield event("response.function_call_arguments.done", &mut seq, json!({
                    "item_id": id, "output_index": i, "arguments": item["arguments"],
                }));
            }
            yield event("response.output_item.done", &mut seq, json!({"output_index": i, "item": item}));
        }
        if let Some(k) = keep {
            k.save(&head.id, &output, object.clone());
        }
        let last = if reason == FinishReason::Length { "response.incomplete" } else { "response.completed" };
        yield event(last, &mut seq, json!({"response": object}));
    };
    Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// The message item's opening events: `response.output_item.added` and
/// `response.content_part.added`.
fn open_message(head: &Head, seq: &mut u64) -> [Result<SseEvent, Infallible>; 2] {
    [
        event(
            "response.output_item.added",
            seq,
            json!({
                "output_index": 0, "item": head.message("", "in_progress"),
            }),
        ),
        event(
            "response.content_part.added",
            seq,
            json!({
                "item_id": head.message_id, "output_index": 0, "content_index": 0, "part": part(""),
            }),
        ),
    ]
}

/// `response.failed`, with the error in the response object.
fn failed(
    head: &Head,
    seq: &mut u64,
    text: &str,
    (code, message): (&str, String),
) -> Result<SseEvent, Infallible> {
    let mut object = head.object(text, None);
    object["status"] = json!("failed");
    object["error"] = json!({"code": code, "message": message});
    event("response.failed", seq, json!({"response": object}))
}

/// Handles `GET /v1/responses/{id}`.
pub async fn retrieve(
    Extension(principal): Extension<Arc<Principal>>,
    Extension(store): Extension<ResponseStore>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match store.get(&id, &principal.key_id) {
        Some((_, object)) => Ok(Json(object).into_response()),
        None => Err(ApiError::NotFound(format!(
            "No response with id '{id}' is stored."
        ))),
    }
}

/// Handles `DELETE /v1/responses/{id}`.
pub async fn remove(
    Extension(principal): Extension<Arc<Principal>>,
    Extension(store): Extension<ResponseStore>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if store.remove(&id, &principal.key_id) {
        Ok(Json(json!({"id": id, "object": "response", "deleted": true})).into_response())
    } else {
        Err(ApiError::NotFound(format!(
            "No response with id '{id}' is stored."
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> Message {
        Message {
            role: "user".into(),
            content: text.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_store_evicts_the_least_recently_used_response_first() {
        let store = ResponseStore::default();
        for i in 0..STORE_MAX_RESPONSES {
            store.insert(format!("r{i}"), "k", vec![user("hi")], json!({}));
        }
        // r0 is used, so r1 is now the least recently used.
        assert!(store.get("r0", "k").is_some());
        store.insert("new".into(), "k", vec![user("hi")], json!({}));
        assert_eq!(store.len(), STORE_MAX_RESPONSES);
        assert!(store.get("r0", "k").is_some());
        assert!(store.get("r1", "k").is_none());
        assert!(store.get("new", "k").is_some());
    }

    #[test]
    fn a_stored_response_is_visible_only_to_its_owner() {
        let store = ResponseStore::default();
        store.insert("r".into(), "alice", vec![user("hi")], json!({}));
        assert!(store.get("r", "bob").is_none());
        assert!(!store.remove("r", "bob"));
        assert!(store.get("r", "alice").is_some());
        assert!(store.remove("r", "alice"));
        assert!(store.is_empty());
    }

    #[test]
    fn instructions_come_first_and_are_not_part_of_the_stored_conversation() {
        let req: ResponsesRequest = serde_json::from_value(json!({
            "model": "m",
            "instructions": "be brief",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "again"}]}],
        }))
        .unwrap();
        let now = Instant::now();
        let (spec, conversation) =
            translate(&req, vec![user("first"), user("reply")], now, now).unwrap();
        let Input::Chat(messages) = spec.input else {
            panic!("a chat input")
        };
        assert_eq!(messages[0].role, "system");
        assert_eq!(messages.len(), 4);
        assert_eq!(conversation.len(), 3);
        assert_eq!(conversation[2].content, "again");
    }

    fn translated(extra: Value) -> Result<GenerationSpec, ApiError> {
        let mut body = json!({"model": "m", "input": "hi"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let req: ResponsesRequest = serde_json::from_value(body).unwrap();
        let now = Instant::now();
        translate(&req, vec![], now, now).map(|(spec, _)| spec)
    }

    #[test]
    fn a_json_schema_text_format_and_function_tools_become_the_specs_constraint_and_tools() {
        let spec = translated(json!({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}})).unwrap();
        let c = spec.constraint.unwrap();
        assert_eq!(c.param, "text.format");
        assert_eq!(
            c.constraint,
            Constraint::JsonSchema(json!({"type": "object"}))
        );
        let spec = translated(json!({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}], "tool_choice": "required"})).unwrap();
        assert_eq!(spec.tools.len(), 1);
        assert_eq!(spec.tools[0]["function"]["name"], "f");
        assert!(spec.constraint.is_some());
        let err = translated(json!({"tool_choice": "required"})).unwrap_err();
        assert!(err.to_string().contains("at least one tool"), "{err}");
        let err = translated(json!({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}})).unwrap_err();
        assert!(err.to_string().contains("`g`"), "{err}");
    }

    #[test]
    fn function_call_items_and_their_outputs_are_the_assistants_calls_and_tool_turns() {
        let input = ResponsesInput::Items(vec![
            json!({"role": "user", "content": "weather?"}),
            json!({"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{\"city\": \"Oslo\"}"}),
            json!({"type": "function_call_output", "call_id": "c1", "output": "cold"}),
        ]);
        let m = input_messages(&input).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].role, "assistant");
        assert_eq!(m[1].tool_calls[0]["function"]["arguments"]["city"], "Oslo");
        assert_eq!(m[2].role, "tool");
        assert_eq!(m[2].tool_call_id.as_deref(), Some("c1"));
    }
}
