//! `POST /v1/responses` (OpenAI's Responses API) for text, plus
//! `GET` / `DELETE /v1/responses/{id}`.
//!
//! A Responses request is translated ([`translate`]) into the same
//! protocol-neutral [`GenerationSpec`] a chat completion becomes: the
//! `instructions` as a system message, the stored conversation of
//! `previous_response_id`, then `input` (a string or message items), all
//! rendered by the model's chat template. Structured output (`text.format`
//! `json_schema` / `json_object`) and function `tools` are refused with a 400
//! until the engine constrains decoding; they plug in at [`translate`].
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

use super::{HttpState, JsonBody, RequestId, deadline, random_id, unix_now};
use crate::api::auth::Principal;
use crate::api::error::ApiError;
use crate::api::openai::SamplingFields;
use crate::engine::Message;
use crate::infer::{self, Generation};
use crate::monitor::Protocol;
use crate::scheduler::{Event, FinishReason};
use crate::validation::{GenerationSpec, Input};

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
    /// Output format (`{"format": {"type": "text"}}` only, for now).
    pub text: Option<Value>,
    /// Tools (none supported yet).
    pub tools: Option<Vec<Value>>,
    /// Tool choice (`none` or `auto` without tools).
    pub tool_choice: Option<Value>,
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
        }]),
        ResponsesInput::Items(items) => {
            if items.is_empty() {
                return Err(ApiError::invalid("input", "input must not be empty"));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let at = format!("input[{i}]");
                    let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
                    if kind != "message" {
                        return Err(ApiError::invalid(
                            "input",
                            format!("{at}: item type `{kind}` is not supported yet (message items only)"),
                        ));
                    }
                    let role = item.get("role").and_then(Value::as_str).unwrap_or("");
                    if !matches!(role, "user" | "assistant" | "system" | "developer") {
                        return Err(ApiError::invalid(
                            "input",
                            format!("{at}.role: `{role}` is not a role (user, assistant, system, developer)"),
                        ));
                    }
                    let content = item.get("content").unwrap_or(&Value::Null);
                    Ok(Message {
                        role: if role == "developer" { "system" } else { role }.to_string(),
                        content: item_text(content, &at)?,
                    })
                })
                .collect()
        }
    }
}

/// Refuses what is not supported yet: structured output and tools.
/// (Constrained decoding plugs in here: a `json_schema` format or function
/// tools become constraints on the [`GenerationSpec`].)
fn refuse_unsupported(req: &ResponsesRequest) -> Result<(), ApiError> {
    if let Some(text) = &req.text
        && let Some(format) = text.get("format")
    {
        let kind = format.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "text" {
            return Err(ApiError::invalid(
                "text.format",
                format!("text.format of type `{kind}` is not supported yet (only `text`)"),
            ));
        }
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid("tools", "tools are not supported yet"));
    }
    match req.tool_choice.as_ref() {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "none" || s == "auto" => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool_choice is not supported yet (only `none` or `auto`, without tools)",
            ));
        }
    }
    Ok(())
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
    refuse_unsupported(req)?;
    let mut conversation = history;
    conversation.extend(input_messages(&req.input)?);
    let mut messages = Vec::with_capacity(conversation.len() + 1);
    if let Some(i) = req.instructions.as_ref().filter(|i| !i.is_empty()) {
        messages.push(Message {
            role: "system".into(),
            content: i.clone(),
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
    };
    Ok((spec, conversation))
}

/// What every rendering of one response repeats.
struct Head {
    id: String,
    message_id: String,
    created_at: u64,
    model: String,
    req: ResponsesRequest,
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
                (
                    status,
                    incomplete,
                    json!([self.message(text, item)]),
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
            "parallel_tool_calls": true,
            "previous_response_id": r.previous_response_id,
            "store": r.store.unwrap_or(true),
            "temperature": r.sampling.temperature.unwrap_or(1.0),
            "top_p": r.sampling.top_p.unwrap_or(1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
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
    let key = super::route_key(&headers, req.user.as_deref(), &principal, &rid);
    let picked = st.router.pick(&req.model, &key)?;
    let target = picked.target.clone();
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
    let object = head.object(
        &out.text,
        Some((reason, prompt_tokens, out.completion_tokens)),
    );
    if let Some(k) = keep {
        k.save(&head.id, &out.text, object.clone());
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
    fn save(mut self, id: &str, text: &str, object: Value) {
        self.conversation.push(Message {
            role: "assistant".into(),
            content: text.to_string(),
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
/// `response.output_item.added`, `response.content_part.added`,
/// `response.output_text.delta`…, `response.output_text.done`,
/// `response.content_part.done`, `response.output_item.done`, then
/// `response.completed` (`response.incomplete` when `max_output_tokens`
/// cut it short; `response.failed` when the engine failed).
fn stream(
    generation: Generation,
    head: Head,
    keep: Option<Keep>,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let prompt_tokens = generation.prompt_tokens;
    let s = async_stream::stream! {
        let mut seq = 0u64;
        let mid = head.message_id.clone();
        yield event("response.created", &mut seq, json!({"response": head.object("", None)}));
        yield event("response.in_progress", &mut seq, json!({"response": head.object("", None)}));
        yield event("response.output_item.added", &mut seq, json!({
            "output_index": 0, "item": head.message("", "in_progress"),
        }));
        yield event("response.content_part.added", &mut seq, json!({
            "item_id": mid, "output_index": 0, "content_index": 0, "part": part(""),
        }));
        let mut text = String::new();
        let mut events = generation.events();
        let mut end = None;
        while let Some((_, ev)) = events.next().await {
            match ev {
                Event::Token { text: delta, .. } => {
                    if delta.is_empty() {
                        continue;
                    }
                    text.push_str(&delta);
                    yield event("response.output_text.delta", &mut seq, json!({
                        "item_id": mid, "output_index": 0, "content_index": 0,
                        "delta": delta, "logprobs": [],
                    }));
                }
                Event::Done(c) => {
                    if !c.tail.is_empty() {
                        text.push_str(&c.tail);
                        yield event("response.output_text.delta", &mut seq, json!({
                            "item_id": mid, "output_index": 0, "content_index": 0,
                            "delta": c.tail, "logprobs": [],
                        }));
                    }
                    end = Some(Ok((c.reason, c.completion_tokens)));
                    break;
                }
                Event::Failed(e) => {
                    tracing::error!(error = %e, "response failed mid-stream");
                    end = Some(Err(("server_error", "the engine failed on this request".to_string())));
                    break;
                }
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
        yield event("response.output_text.done", &mut seq, json!({
            "item_id": mid, "output_index": 0, "content_index": 0, "text": text, "logprobs": [],
        }));
        yield event("response.content_part.done", &mut seq, json!({
            "item_id": mid, "output_index": 0, "content_index": 0, "part": part(&text),
        }));
        let item_status = if reason == FinishReason::Length { "incomplete" } else { "completed" };
        yield event("response.output_item.done", &mut seq, json!({
            "output_index": 0, "item": head.message(&text, item_status),
        }));
        let object = head.object(&text, Some((reason, prompt_tokens, output_tokens)));
        if let Some(k) = keep {
            k.save(&head.id, &text, object.clone());
        }
        let last = if reason == FinishReason::Length { "response.incomplete" } else { "response.completed" };
        yield event(last, &mut seq, json!({"response": object}));
    };
    Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
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

    #[test]
    fn structured_output_and_tools_are_refused_until_supported() {
        for extra in [
            json!({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}}),
            json!({"tools": [{"type": "function", "name": "f"}]}),
            json!({"tool_choice": "required"}),
        ] {
            let mut body = json!({"model": "m", "input": "hi"});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let req: ResponsesRequest = serde_json::from_value(body).unwrap();
            let now = Instant::now();
            let err = translate(&req, vec![], now, now).unwrap_err();
            assert!(err.to_string().contains("not supported yet"), "{err}");
        }
    }
}
