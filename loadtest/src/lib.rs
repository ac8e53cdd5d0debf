//! A load generator for LLM servers: any OpenAI-compatible HTTP server
//! (streaming `/v1/completions` or `/v1/chat/completions`) and llmops's gRPC
//! `GenerateStream`.
//!
//! Closed loop (N clients, each sending its next request when the last one
//! ends) or open loop (Poisson arrivals at a rate); synthetic prompts of exact
//! token lengths or prompts from a file; TTFT, inter-token and end-to-end
//! latency percentiles, throughput, errors by kind, and a per-second timeline
//! around an optional command run under load (`during`).
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let cfg = llmops_loadtest::Config {
//!     url: "http://127.0.0.1:8080".into(),
//!     model: "tiny".into(),
//!     load: llmops_loadtest::Load::Closed { concurrency: 4 },
//!     requests: Some(100),
//!     ..Default::default()
//! };
//! let report = llmops_loadtest::run(cfg).await?;
//! println!("{}", report.table());
//! # Ok(()) }
//! ```

pub mod client;
pub mod dist;
pub mod keys;
mod report;
pub mod sse;
pub mod stats;
pub mod workload;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use client::{Client, Outcome};
pub use dist::Dist;
pub use keys::Header;
pub use report::{DuringReport, Report};
pub use stats::{Latency, Second};
pub use workload::{Prompts, Workload};

/// Which API to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// OpenAI-compatible HTTP with SSE streaming.
    #[default]
    Http,
    /// llmops `llmops.v1.Inference/GenerateStream`.
    Grpc,
}

/// The HTTP endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `/v1/completions` (synthetic prompts go as token-id lists).
    #[default]
    Completions,
    /// `/v1/chat/completions` (synthetic prompts go as words, about one token each).
    Chat,
}

/// How requests are issued.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Load {
    /// `concurrency` clients, each sending its next request as soon as the
    /// previous one ends.
    Closed {
        /// Clients.
        concurrency: usize,
    },
    /// Requests arrive as a Poisson process, whatever is in flight.
    Open {
        /// Mean arrivals per second.
        rate: f64,
    },
}

/// A load test.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Base URL: `http://host:port` (or `.../v1`) for HTTP, `http://host:port` for gRPC.
    pub url: String,
    /// HTTP or gRPC.
    pub protocol: Protocol,
    /// HTTP endpoint.
    pub endpoint: Endpoint,
    /// Sent as `Authorization: Bearer ...` (never written to reports).
    #[serde(skip)]
    pub api_key: Option<String>,
    /// Model name in requests.
    pub model: String,
    /// Closed or open loop.
    pub load: Load,
    /// Measure for this long after warm-up (in-flight requests then finish).
    pub duration_s: Option<f64>,
    /// Or until this many requests have been sent after warm-up.
    pub requests: Option<u64>,
    /// Warm-up: requests started in the first seconds are not measured.
    pub warmup_s: f64,
    /// Warm-up: the first requests are not measured (instead of `warmup_s`).
    pub warmup_requests: u64,
    /// Prompts.
    pub prompts: Prompts,
    /// Completion lengths.
    pub max_tokens: Dist,
    /// Send `ignore_eos: true` so completions run to `max_tokens`.
    pub ignore_eos: bool,
    /// Sampling temperature (server default when absent).
    pub temperature: Option<f32>,
    /// Nucleus mass `top_p` (server default when absent).
    pub top_p: Option<f32>,
    /// Seed of prompts, lengths and arrivals.
    pub seed: u64,
    /// Per-request limit.
    pub timeout_s: f64,
    /// Shell command run (with `sh -c`) after warm-up while the load goes on;
    /// a duration-bound run continues until it exits.
    pub during: Option<String>,
    /// Seconds after warm-up to start `during`.
    pub during_at_s: f64,
    /// Show a progress bar on stderr.
    #[serde(skip)]
    pub progress: bool,
    /// Each request names a session `s-<k>`, k uniform over this many, in the
    /// `x-llmops-route-key` header (gRPC metadata); none sends no key.
    pub sessions: Option<u64>,
    /// Each request names an end user `u-<k>`, k uniform over this many, in
    /// the OpenAI `user` field (gRPC `user`); none sends no user.
    pub users: Option<u64>,
    /// Extra headers (gRPC metadata) on every request; reports list their
    /// names only, since values may be credentials.
    #[serde(serialize_with = "keys::header_names")]
    pub headers: Vec<Header>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".into(),
            protocol: Protocol::Http,
            endpoint: Endpoint::Completions,
            api_key: None,
            model: String::new(),
            load: Load::Closed { concurrency: 1 },
            duration_s: None,
            requests: None,
            warmup_s: 0.0,
            warmup_requests: 0,
            prompts: Prompts::Synthetic {
                tokens: Dist::Fixed(128),
                vocab: (10, 250),
            },
            max_tokens: Dist::Fixed(64),
            ignore_eos: false,
            temperature: None,
            top_p: None,
            seed: 0,
            timeout_s: 300.0,
            during: None,
            during_at_s: 0.0,
            progress: false,
            sessions: None,
            users: None,
            headers: vec![],
        }
    }
}

impl Config {
    /// Checks the settings fit together.
    pub fn validate(&self) -> anyhow::Result<()> {
        match self.load {
            Load::Closed { concurrency: 0 } => {
                anyhow::bail!("concurrency must be at least 1")
            }
            Load::Open { rate } if !(rate.is_finite() && rate > 0.0) => {
                anyhow::bail!("the rate must be a positive number")
            }
            _ => {}
        }
        if self.duration_s.is_none() && self.requests.is_none() {
            anyhow::bail!("give a duration or a request count");
        }
        if let Some(d) = self.duration_s
            && !(d.is_finite() && d > 0.0)
        {
            anyhow::bail!("the duration must be positive");
        }
        if self.requests == Some(0) {
            anyhow::bail!("the request count must be at least 1");
        }
        if !(self.warmup_s.is_finite() && self.warmup_s >= 0.0) {
            anyhow::bail!("the warm-up must be zero or more seconds");
        }
        if self.warmup_s > 0.0 && self.warmup_requests > 0 {
            anyhow::bail!("give warm-up in seconds or in requests, not both");
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0) {
            anyhow::bail!("the timeout must be positive");
        }
        if !(self.during_at_s.is_finite() && self.during_at_s >= 0.0) {
            anyhow::bail!("the during start must be zero or more seconds");
        }
        if let Some(t) = self.temperature
            && !(t.is_finite() && t >= 0.0)
        {
            anyhow::bail!("the temperature must be zero or more");
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            anyhow::bail!("top_p must be in (0, 1]");
        }
        if self.model.is_empty() {
            anyhow::bail!("the model name is empty");
        }
        if self.sessions == Some(0) {
            anyhow::bail!("the session count must be at least 1");
        }
        if self.users == Some(0) {
            anyhow::bail!("the user count must be at least 1");
        }
        for h in &self.headers {
            if self.sessions.is_some() && h.name() == keys::ROUTE_KEY_HEADER {
                anyhow::bail!(
                    "give the route key with the sessions or a `{}` header, not both",
                    keys::ROUTE_KEY_HEADER
                );
            }
            if self.api_key.as_deref().is_some_and(|k| !k.is_empty()) && h.name() == "authorization"
            {
                anyhow::bail!("give the API key or an `authorization` header, not both");
            }
        }
        if let Prompts::Synthetic { tokens, vocab } = &self.prompts {
            if vocab.0 >= vocab.1 {
                anyhow::bail!("the vocabulary range {}:{} is empty", vocab.0, vocab.1);
            }
            if self.protocol == Protocol::Http
                && self.endpoint == Endpoint::Chat
                && matches!(tokens, Dist::Fixed(0))
            {
                anyhow::bail!("prompts need at least one token");
            }
        }
        if self.protocol == Protocol::Http && self.endpoint == Endpoint::Completions {
            let chat_lines = matches!(&self.prompts, Prompts::File { items, .. }
                if items.iter().any(|i| matches!(i, workload::FilePrompt::Chat(_))));
            if chat_lines {
                anyhow::bail!(
                    "the prompts file has `messages` lines: use the chat endpoint (or gRPC)"
                );
            }
        }
        Ok(())
    }
}

/// How long a closed-loop client waits after a refused connection before
/// its next request (so a dead server is not hammered in a tight loop).
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// A request's place in the run.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    index: u64,
    /// Start offset from the end of warm-up; `None` for warm-up requests.
    offset: Option<Duration>,
}

struct IssueState {
    next_index: u64,
    measured: u64,
}

struct Shared {
    cfg: Config,
    client: Client,
    workload: Workload,
    chat: bool,
    started: Instant,
    issue: Mutex<IssueState>,
    collector: Mutex<stats::Collector>,
    /// Set when measurement starts (end of warm-up).
    measure_tx: watch::Sender<Option<Instant>>,
    /// Stop issuing (in-flight requests finish).
    stop_tx: watch::Sender<bool>,
    /// The `during` command has exited (or there is none).
    during_done_tx: watch::Sender<bool>,
    during: Mutex<Option<DuringReport>>,
    finished: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn stopped(&self) -> bool {
        *self.stop_tx.borrow()
    }

    fn stop(&self) {
        self.stop_tx.send_replace(true);
    }

    fn measure_start(&self) -> Option<Instant> {
        *self.measure_tx.borrow()
    }

    /// The next request to send, or `None` when the run should stop issuing.
    fn next_ticket(&self) -> Option<Ticket> {
        if self.stopped() {
            return None;
        }
        let now = Instant::now();
        let mut st = lock(&self.issue);
        let warm = if self.cfg.warmup_requests > 0 {
            st.next_index < self.cfg.warmup_requests
        } else {
            now < self.started + Duration::from_secs_f64(self.cfg.warmup_s)
        };
        let offset = if warm {
            None
        } else {
            let ms = match self.measure_start() {
                Some(ms) => ms,
                None => {
                    let ms = if self.cfg.warmup_requests > 0 {
                        now
                    } else {
                        self.started + Duration::from_secs_f64(self.cfg.warmup_s)
                    };
                    self.measure_tx.send_replace(Some(ms));
                    ms
                }
            };
            if self.cfg.requests.is_some_and(|n| st.measured >= n) {
                drop(st);
                self.stop();
                return None;
            }
            st.measured += 1;
            Some(now.saturating_duration_since(ms))
        };
        let index = st.next_index;
        st.next_index += 1;
        drop(st);
        if let Some(o) = offset {
            lock(&self.collector).started(o);
        }
        Some(Ticket { index, offset })
    }

    /// Sends one request and records it; true when the connection was refused.
    async fn one(self: &Arc<Self>, t: Ticket) -> bool {
        let spec = self.workload.request(t.index, self.chat);
        let sent = Instant::now();
        let outcome = self.client.send(&spec).await;
        let refused = matches!(&outcome, Err(f) if f.kind == "connect");
        let mut c = lock(&self.collector);
        if let (Some(ms), Some(window)) = (self.measure_start(), self.cfg.duration_s) {
            let sent_s = if sent >= ms {
                (sent - ms).as_secs_f64()
            } else {
                -(ms - sent).as_secs_f64()
            };
            c.window(sent_s, window, &outcome);
        }
        match (t.offset, self.measure_start()) {
            (Some(offset), Some(ms)) => c.record(
                offset,
                Instant::now().saturating_duration_since(ms),
                &outcome,
            ),
            _ => c.warmup(&outcome),
        }
        refused
    }
}

/// Runs a load test to its end.
pub async fn run(cfg: Config) -> anyhow::Result<Report> {
    run_until(cfg, std::future::pending()).await
}

/// Runs a load test; when `interrupt` resolves first, in-flight requests are
/// abandoned and the report covers what finished.
pub async fn run_until(cfg: Config, interrupt: impl Future<Output = ()>) -> anyhow::Result<Report> {
    cfg.validate()?;
    let client = Client::new(&cfg)?;
    let workload = Workload::new(cfg.prompts.clone(), cfg.max_tokens.clone(), cfg.seed)?
        .with_keys(cfg.sessions, cfg.users);
    let chat = client.is_chat();
    let sh = Arc::new(Shared {
        client,
        workload,
        chat,
        started: Instant::now(),
        issue: Mutex::new(IssueState {
            next_index: 0,
            measured: 0,
        }),
        collector: Mutex::new(stats::Collector::default()),
        measure_tx: watch::channel(None).0,
        stop_tx: watch::channel(false).0,
        during_done_tx: watch::channel(cfg.during.is_none()).0,
        during: Mutex::new(None),
        finished: AtomicBool::new(false),
        cfg,
    });

    let mut helpers = JoinSet::new();
    if let Some(d) = sh.cfg.duration_s {
        let sh = sh.clone();
        helpers.spawn(async move {
            let ms = wait_measure_start(&sh).await;
            tokio::time::sleep_until((ms + Duration::from_secs_f64(d)).into()).await;
            let _ = sh.during_done_tx.subscribe().wait_for(|d| *d).await;
            sh.stop();
        });
    }
    let during = sh.cfg.during.clone().map(|cmd| {
        let sh = sh.clone();
        tokio::spawn(async move { run_during(&sh, &cmd).await })
    });
    let progress = sh.cfg.progress.then(|| {
        let sh = sh.clone();
        tokio::spawn(async move { show_progress(&sh).await })
    });

    let mut load = JoinSet::new();
    match sh.cfg.load {
        Load::Closed { concurrency } => {
            for _ in 0..concurrency {
                let sh = sh.clone();
                load.spawn(async move {
                    while let Some(t) = sh.next_ticket() {
                        if sh.one(t).await {
                            // Nothing listens: pause rather than spin.
                            tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
                        }
                    }
                });
            }
        }
        Load::Open { rate } => {
            let sh = sh.clone();
            load.spawn(async move { open_loop(sh, rate).await });
        }
    }
    let mut panicked = None;
    let interrupted = {
        let drain = async {
            while let Some(r) = load.join_next().await {
                if let Err(e) = r
                    && e.is_panic()
                {
                    panicked = Some(e.to_string());
                }
            }
        };
        tokio::select! {
            _ = drain => false,
            _ = interrupt => true,
        }
    };
    sh.stop();
    if interrupted {
        load.shutdown().await;
    }
    if let Some(d) = during {
        if interrupted || sh.measure_start().is_none() {
            d.abort();
        }
        let _ = d.await;
    }
    helpers.shutdown().await;
    sh.finished.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.await;
    }
    if let Some(p) = panicked {
        anyhow::bail!("a load task panicked: {p}");
    }
    let during = lock(&sh.during).clone();
    let c = lock(&sh.collector);
    Ok(Report::build(&sh.cfg, &c, during, interrupted))
}

async fn wait_measure_start(sh: &Shared) -> Instant {
    let mut rx = sh.measure_tx.subscribe();
    loop {
        if let Some(ms) = *rx.borrow_and_update() {
            return ms;
        }
        if rx.changed().await.is_err() {
            // The sender lives in `sh`; this cannot happen while we hold it.
            std::future::pending::<()>().await;
        }
    }
}

/// Poisson arrivals: each request is its own task; dropping this future
/// (interrupt) aborts them.
async fn open_loop(sh: Arc<Shared>, rate: f64) {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sh.cfg.seed ^ 0x6f70_656e_6c6f_6f70);
    let mut inflight = JoinSet::new();
    let mut stop = sh.stop_tx.subscribe();
    let mut next = tokio::time::Instant::now();
    loop {
        next += Duration::from_secs_f64(dist::exp_interval(&mut rng, rate));
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let Some(t) = sh.next_ticket() else { break };
        let sh = sh.clone();
        inflight.spawn(async move {
            sh.one(t).await;
        });
        // Reap finished tasks so the set stays small.
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
}

/// Runs the `during` command once warm-up is over.
async fn run_during(sh: &Shared, cmd: &str) {
    let ms = wait_measure_start(sh).await;
    tokio::time::sleep_until((ms + Duration::from_secs_f64(sh.cfg.during_at_s)).into()).await;
    let start = Instant::now();
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    let end = Instant::now();
    let (exit_code, success, output, error) = match out {
        Ok(o) => {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            (o.status.code(), o.status.success(), tail(&text, 4000), None)
        }
        Err(e) => (None, false, String::new(), Some(e.to_string())),
    };
    *lock(&sh.during) = Some(DuringReport {
        command: cmd.to_string(),
        start_s: (start - ms).as_secs_f64(),
        end_s: (end - ms).as_secs_f64(),
        exit_code,
        success,
        output,
        error,
    });
    sh.during_done_tx.send_replace(true);
}

fn tail(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut start = s.len() - n;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}

async fn show_progress(sh: &Shared) {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let (len, unit) = match (sh.cfg.requests, sh.cfg.duration_s) {
        (Some(n), _) => (n, "req"),
        (None, Some(d)) => (d.ceil() as u64, "s"),
        (None, None) => (0, ""),
    };
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(&format!(
        "{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit}  {{msg}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    while !sh.finished.load(Ordering::Relaxed) {
        let (ok, failed, tokens) = {
            let c = lock(&sh.collector);
            (c.tally.ok, c.tally.failed, c.tally.output_tokens)
        };
        match sh.measure_start() {
            None => pb.set_message("warming up"),
            Some(ms) => {
                let el = ms.elapsed().as_secs_f64().max(1e-3);
                pb.set_position(if sh.cfg.requests.is_some() {
                    ok + failed
                } else {
                    (el as u64).min(len)
                });
                let during = if *sh.during_done_tx.borrow() {
                    ""
                } else {
                    "  [during running]"
                };
                let stopping = if sh.stopped() { "  [finishing]" } else { "" };
                pb.set_message(format!(
                    "ok {ok}  err {failed}  {:.1} req/s  {:.0} tok/s{during}{stopping}",
                    ok as f64 / el,
                    tokens as f64 / el
                ));
            }
        }
        pb.tick();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pb.finish_and_clear();
}
