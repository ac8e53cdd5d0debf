//! Sends one streaming request and times it: OpenAI-compatible HTTP (SSE) or
//! llmops gRPC `GenerateStream`.

use std::error::Error as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use tonic::metadata::{Ascii, MetadataKey, MetadataValue};

use crate::keys::ROUTE_KEY_HEADER;
use crate::sse::{Chunk, SseParser};
use crate::workload::{Input, RequestSpec};
use crate::{Config, Endpoint, Protocol};

/// Generated protobuf types and the gRPC client.
#[allow(missing_docs, clippy::all, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("llmops.v1");
}

/// Timings and counts of a request that finished.
#[derive(Debug, Clone, Default)]
pub struct Success {
    /// Send → first generated token (none when nothing was generated).
    pub ttft: Option<Duration>,
    /// Gaps between consecutive token-bearing chunks (see `sse::Chunk::token`).
    pub itl: Vec<Duration>,
    /// (last token − first token) / (tokens − 1), when there are at least 2.
    pub tpot: Option<Duration>,
    /// Send → end of the response.
    pub e2e: Duration,
    /// Prompt tokens (server's usage, else the ids sent, else 0).
    pub prompt_tokens: u64,
    /// Generated tokens (server's usage, else counted from the stream).
    pub output_tokens: u64,
    /// Whether `output_tokens` came from the server's usage.
    pub usage_reported: bool,
}

/// A request that failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Error kind: `http_429`, `grpc_unavailable`, `timeout`, `connect`,
    /// `disconnect`, `stream_error`, `bad_response`.
    pub kind: String,
    /// What happened, for the report's examples.
    pub message: String,
    /// Send → failure.
    pub elapsed: Duration,
}

/// Result of one request.
pub type Outcome = Result<Success, Failure>;

/// Sends requests to the configured target.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    model: String,
    api_key: Option<String>,
    ignore_eos: bool,
    temperature: Option<f32>,
    top_p: Option<f32>,
    timeout: Duration,
    /// Extra HTTP headers (`Config::headers`).
    headers: reqwest::header::HeaderMap,
    /// The same as gRPC metadata.
    metadata: Vec<(MetadataKey<Ascii>, MetadataValue<Ascii>)>,
}

enum Target {
    Http {
        client: reqwest::Client,
        url: String,
        chat: bool,
    },
    Grpc {
        clients: Vec<pb::inference_client::InferenceClient<tonic::transport::Channel>>,
        next: AtomicUsize,
    },
}

/// gRPC connections (HTTP/2, many streams each) spread over.
const GRPC_CHANNELS: usize = 4;

impl Client {
    /// A client for `cfg`'s target; connects lazily (connection failures are
    /// per-request errors, not a failure here).
    pub fn new(cfg: &Config) -> anyhow::Result<Self> {
        let base = cfg.url.trim_end_matches('/').to_string();
        let target = match cfg.protocol {
            Protocol::Http => {
                let client = reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .tcp_nodelay(true)
                    .pool_max_idle_per_host(usize::MAX)
                    .build()?;
                let chat = cfg.endpoint == Endpoint::Chat;
                let path = if chat {
                    "chat/completions"
                } else {
                    "completions"
                };
                let url = if base.ends_with("/v1") {
                    format!("{base}/{path}")
                } else {
                    format!("{base}/v1/{path}")
                };
                Target::Http { client, url, chat }
            }
            Protocol::Grpc => {
                let ep = tonic::transport::Endpoint::from_shared(base.clone())
                    .map_err(|e| anyhow::anyhow!("bad gRPC URL `{base}`: {e}"))?
                    .connect_timeout(Duration::from_secs(10))
                    .tcp_nodelay(true);
                let clients = (0..GRPC_CHANNELS)
                    .map(|_| {
                        pb::inference_client::InferenceClient::new(ep.connect_lazy())
                            .max_decoding_message_size(64 << 20)
                    })
                    .collect();
                Target::Grpc {
                    clients,
                    next: AtomicUsize::new(0),
                }
            }
        };
        let mut headers = reqwest::header::HeaderMap::new();
        let mut metadata = vec![];
        for h in &cfg.headers {
            let (name, value) = h.http()?;
            headers.append(name, value);
            metadata.push(h.grpc()?);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                headers,
                metadata,
                target,
                model: cfg.model.clone(),
                api_key: cfg.api_key.clone().filter(|k| !k.is_empty()),
                ignore_eos: cfg.ignore_eos,
                temperature: cfg.temperature,
                top_p: cfg.top_p,
                timeout: Duration::from_secs_f64(cfg.timeout_s),
            }),
        })
    }

    /// Whether requests go to the chat endpoint.
    pub fn is_chat(&self) -> bool {
        matches!(self.inner.target, Target::Http { chat: true, .. })
    }

    /// Sends one request and waits for its end (or the timeout).
    pub async fn send(&self, spec: &RequestSpec) -> Outcome {
        let started = Instant::now();
        let mut t = Timer::new(started);
        let fut = async {
            match &self.inner.target {
                Target::Http { client, url, chat } => {
                    self.http(client, url, *chat, spec, &mut t).await
                }
                Target::Grpc { clients, next } => {
                    let i = next.fetch_add(1, Ordering::Relaxed) % clients.len();
                    self.grpc(clients[i].clone(), spec, &mut t).await
                }
            }
        };
        let result = match tokio::time::timeout(self.inner.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err((
                "timeout".to_string(),
                format!("no complete response within {:?}", self.inner.timeout),
            )),
        };
        let e2e = started.elapsed();
        match result {
            Ok(()) => Ok(t.finish(e2e, spec)),
            Err((kind, message)) => Err(Failure {
                kind,
                message,
                elapsed: e2e,
            }),
        }
    }

    async fn http(
        &self,
        client: &reqwest::Client,
        url: &str,
        chat: bool,
        spec: &RequestSpec,
        t: &mut Timer,
    ) -> Result<(), (String, String)> {
        let inner = &self.inner;
        let mut body = json!({
            "model": inner.model,
            "max_tokens": spec.max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        match (&spec.input, chat) {
            (Input::Chat(m), true) => body["messages"] = json!(m),
            (Input::Text(s), true) => body["messages"] = json!([{"role": "user", "content": s}]),
            (Input::Tokens(ids), false) => body["prompt"] = json!(ids),
            (Input::Text(s), false) => body["prompt"] = json!(s),
            (Input::Tokens(_), true) | (Input::Chat(_), false) => {
                return Err((
                    "bad_request".into(),
                    "this prompt does not fit the endpoint".into(),
                ));
            }
        }
        if inner.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        if let Some(temp) = inner.temperature {
            body["temperature"] = json!(temp);
        }
        if let Some(top_p) = inner.top_p {
            body["top_p"] = json!(top_p);
        }
        if let Some(user) = &spec.user {
            body["user"] = json!(user);
        }
        let mut req = client.post(url).headers(inner.headers.clone()).json(&body);
        if let Some(k) = &inner.api_key {
            req = req.bearer_auth(k);
        }
        if let Some(session) = &spec.session {
            req = req.header(ROUTE_KEY_HEADER, session);
        }
        let resp = req.send().await.map_err(reqwest_error)?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            return Err((
                format!("http_{}", status.as_u16()),
                format!("{status}: {}", truncate(&msg, 300)),
            ));
        }
        let mut parser = SseParser::new();
        let mut stream = resp.bytes_stream();
        let mut finished = false;
        while let Some(bytes) = stream.next().await {
            let bytes = bytes.map_err(reqwest_error)?;
            for data in parser.push(&bytes) {
                let c = Chunk::parse(&data).map_err(|e| {
                    (
                        "bad_response".to_string(),
                        format!("stream chunk is not JSON ({e}): {}", truncate(&data, 200)),
                    )
                })?;
                if c.done {
                    return Ok(());
                }
                if let Some(e) = c.error {
                    return Err(("stream_error".into(), truncate(&e, 300)));
                }
                if c.token {
                    t.token(1);
                }
                finished |= c.finished;
                if c.prompt_tokens.is_some() {
                    t.prompt_tokens = c.prompt_tokens;
                }
                if c.completion_tokens.is_some() {
                    t.usage_tokens = c.completion_tokens;
                }
            }
        }
        if finished {
            // Ended cleanly without `[DONE]`: some servers do.
            Ok(())
        } else {
            Err((
                "disconnect".into(),
                "the stream ended before the response finished".into(),
            ))
        }
    }

    async fn grpc(
        &self,
        mut client: pb::inference_client::InferenceClient<tonic::transport::Channel>,
        spec: &RequestSpec,
        t: &mut Timer,
    ) -> Result<(), (String, String)> {
        use pb::generate_request::Input as I;
        let inner = &self.inner;
        let input = match &spec.input {
            Input::Tokens(ids) => I::PromptTokens(pb::TokenIds { ids: ids.clone() }),
            Input::Text(s) => I::Prompt(s.clone()),
            Input::Chat(m) => I::Chat(pb::ChatMessages {
                messages: m
                    .iter()
                    .map(|m| pb::ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                        ..Default::default()
                    })
                    .collect(),
            }),
        };
        let mut req = tonic::Request::new(pb::GenerateRequest {
            model: inner.model.clone(),
            input: Some(input),
            max_tokens: spec.max_tokens,
            ignore_eos: inner.ignore_eos,
            sampling: (inner.temperature.is_some() || inner.top_p.is_some()).then(|| {
                pb::SamplingParams {
                    temperature: inner.temperature,
                    top_p: inner.top_p,
                    ..Default::default()
                }
            }),
            user: spec.user.clone().unwrap_or_default(),
            ..Default::default()
        });
        for (k, v) in &inner.metadata {
            req.metadata_mut().append(k.clone(), v.clone());
        }
        if let Some(session) = &spec.session {
            let v = session.parse().map_err(|_| {
                (
                    "bad_request".to_string(),
                    format!("the session key `{session}` is not valid metadata"),
                )
            })?;
            req.metadata_mut().insert(ROUTE_KEY_HEADER, v);
        }
        if let Some(k) = &inner.api_key {
            let v = format!("Bearer {k}").parse().map_err(|_| {
                (
                    "bad_request".to_string(),
                    "the API key is not a valid header value".to_string(),
                )
            })?;
            req.metadata_mut().insert("authorization", v);
        }
        let mut stream = client
            .generate_stream(req)
            .await
            .map_err(status_error)?
            .into_inner();
        loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    if !m.token_ids.is_empty() {
                        t.token(m.token_ids.len() as u64);
                    }
                    if let Some(u) = m.usage {
                        t.prompt_tokens = Some(u.prompt_tokens as u64);
                        t.usage_tokens = Some(u.completion_tokens as u64);
                    }
                    if m.finish_reason != 0 {
                        return Ok(());
                    }
                }
                Ok(None) => {
                    return Err((
                        "disconnect".into(),
                        "the stream ended without a final message".into(),
                    ));
                }
                Err(s) => return Err(status_error(s)),
            }
        }
    }
}

/// Token arrival times of one request.
struct Timer {
    started: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    itl: Vec<Duration>,
    counted: u64,
    usage_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
}

impl Timer {
    fn new(started: Instant) -> Self {
        Self {
            started,
            first: None,
            last: None,
            itl: vec![],
            counted: 0,
            usage_tokens: None,
            prompt_tokens: None,
        }
    }

    fn token(&mut self, n: u64) {
        let now = Instant::now();
        if let Some(last) = self.last {
            self.itl.push(now - last);
        }
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.counted += n;
    }

    fn finish(self, e2e: Duration, spec: &RequestSpec) -> Success {
        let output_tokens = self.usage_tokens.unwrap_or(self.counted);
        let tpot = match (self.first, self.last) {
            (Some(f), Some(l)) if output_tokens >= 2 => {
                Some((l - f) / (output_tokens - 1).min(u32::MAX as u64) as u32)
            }
            _ => None,
        };
        let sent = match &spec.input {
            Input::Tokens(ids) => ids.len() as u64,
            _ => 0,
        };
        Success {
            ttft: self.first.map(|f| f - self.started),
            itl: self.itl,
            tpot,
            e2e,
            prompt_tokens: self.prompt_tokens.unwrap_or(sent),
            output_tokens,
            usage_reported: self.usage_tokens.is_some(),
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The error kind an I/O failure somewhere in `e`'s source chain points to.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            return Some(match io.kind() {
                K::ConnectionRefused
                | K::AddrNotAvailable
                | K::HostUnreachable
                | K::NetworkUnreachable
                | K::NotFound => "connect",
                K::TimedOut => "timeout",
                _ => "disconnect",
            });
        }
        cur = err.source();
    }
    None
}

/// Full description of an error with its sources.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        let m = err.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = err.source();
    }
    truncate(&s, 300)
}

/// Classifies a reqwest failure: connect, timeout or disconnect.
fn reqwest_error(e: reqwest::Error) -> (String, String) {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        io_kind(&e)
            .filter(|k| *k != "connect")
            .unwrap_or("disconnect")
    };
    (kind.to_string(), chain(&e))
}

/// `ResourceExhausted` → `resource_exhausted`.
pub fn snake(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Classifies a gRPC status: a status the server sent is `grpc_<code>`; one
/// the client made from a transport failure is connect/disconnect/timeout.
fn status_error(s: tonic::Status) -> (String, String) {
    let head = format!("{:?}: {}", s.code(), s.message());
    if let Some(src) = s.source() {
        // The innermost cause says what happened on the wire.
        let mut inner = src;
        while let Some(next) = inner.source() {
            inner = next;
        }
        let msg = truncate(&format!("{head}: {inner}"), 300);
        let kind = io_kind(src).unwrap_or_else(|| {
            let lower = chain(src).to_ascii_lowercase();
            if lower.contains("connect")
                && !lower.contains("connection closed")
                && !lower.contains("connection reset")
            {
                "connect"
            } else {
                "disconnect"
            }
        });
        return (kind.to_string(), msg);
    }
    (format!("grpc_{}", snake(s.code())), truncate(&head, 300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_become_snake_case() {
        assert_eq!(snake(tonic::Code::ResourceExhausted), "resource_exhausted");
        assert_eq!(snake(tonic::Code::Unavailable), "unavailable");
        assert_eq!(snake(tonic::Code::DeadlineExceeded), "deadline_exceeded");
        assert_eq!(
            status_error(tonic::Status::resource_exhausted("full")).0,
            "grpc_resource_exhausted"
        );
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h…");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
