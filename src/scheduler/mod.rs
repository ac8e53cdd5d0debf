//! Continuous batching: one scheduler per loaded model version, running the
//! engine on its own OS thread.
//!
//! Requests arrive on a bounded channel, each carrying its own token sender.
//! The [`Engine`] handle is cheap to clone; when the last one is dropped the
//! thread finishes what it holds, frees the model and the KV pool, and exits.
//! A closed token receiver means the client left: the sequence is removed at
//! the next step and its blocks freed.

pub mod clock;
pub mod governor;
pub mod length;
pub mod state;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::engine::{KvDtype, LoadedModel, PositionScore, SamplingParams, TokenLogprob};
pub use clock::Clock;
pub use length::{LengthCaps, LengthError};
pub use state::Priority;

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens per step (decodes plus prefill chunks).
    pub max_batched_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Client requests allowed to wait (preempted ones included); beyond
    /// it submissions are refused. Background work (`Priority::Low`: shadow
    /// copies, drift probes) has a queue of its own, as long.
    pub max_waiting: usize,
    /// Prompt tokens of client requests allowed to wait; beyond it
    /// submissions are refused. Background work has as many of its own.
    pub max_waiting_tokens: usize,
    /// Bytes of KV cache.
    pub kv_cache_bytes: usize,
    /// How the KV cache stores keys and values (f16 holds twice the tokens).
    pub kv_cache_dtype: KvDtype,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Automatic prefix caching: full KV blocks are kept, addressed by a
    /// hash of their tokens and prefix, and shared by later sequences with
    /// the same prefix.
    pub prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batched_tokens: 512,
            max_running: 64,
            max_waiting: 256,
            max_waiting_tokens: 256 * 1024,
            kv_cache_bytes: 512 << 20,
            kv_cache_dtype: KvDtype::F16,
            block_size: 16,
            prefix_caching: true,
        }
    }
}

/// Labels that name an engine in metrics and logs.
#[derive(Debug, Clone, Default)]
pub struct EngineLabels {
    /// Model name as clients address it.
    pub model: String,
    /// Version id.
    pub version: String,
}

/// A generation request, already tokenized and validated by the front end.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt tokens (BOS included where the model wants it).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Strings that end generation (not emitted).
    pub stop: Vec<String>,
    /// Extra token ids that end generation.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past EOS (benchmarks).
    pub ignore_eos: bool,
    /// Scheduling class.
    pub priority: Priority,
    /// When the request must be finished, on the engine's [`Clock`] (the
    /// system clock for every served engine).
    pub deadline: Option<Instant>,
    /// When it reached the front end (TTFT is measured from here).
    pub arrival: Instant,
    /// Which door it came in by (a metrics label).
    pub protocol: crate::monitor::Protocol,
    /// The role of this engine's version for this request (a metrics label).
    pub variant: crate::monitor::Variant,
    /// A hash of the key the router's split decided on (0: none), recorded
    /// with the request's canary sample.
    pub split_key: u64,
    /// Score these tokens after the prompt instead of generating (`max_tokens`
    /// must then be their count): one teacher-forced prefill, no decode.
    pub score: Option<Arc<ScoreJob>>,
    /// The prompt text's characters by class, counted by validation (which
    /// has the text) for drift detection; zeros for token prompts.
    pub text_profile: crate::monitor::drift::TextProfile,
    /// The output constraint, compiled by validation (structured outputs):
    /// every token is drawn from the logits it allows.
    pub grammar: Option<crate::engine::grammar::Compiled>,
}

/// A teacher-forced scoring job: the log-probability the model gives each
/// of `tokens` after the prompt and what precedes it, and its
/// log-probabilities of each position's `probes`.
#[derive(Debug, Clone, Default)]
pub struct ScoreJob {
    /// The continuation to score.
    pub tokens: Vec<u32>,
    /// Per position (same length as `tokens`, or empty): extra tokens whose
    /// log-probabilities are wanted there.
    pub probes: Vec<Vec<u32>>,
}

impl Request {
    /// A greedy request for `prompt` with defaults elsewhere.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            stop: vec![],
            stop_token_ids: vec![],
            ignore_eos: false,
            priority: Priority::Normal,
            deadline: None,
            arrival: Instant::now(),
            protocol: crate::monitor::Protocol::Internal,
            variant: crate::monitor::Variant::Stable,
            split_key: 0,
            score: None,
            text_profile: Default::default(),
            grammar: None,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the context length reached.
    Length,
    /// The deadline passed.
    Timeout,
    /// The server stopped before it finished.
    Aborted,
}

impl FinishReason {
    /// Every reason, in [`FinishReason::index`] order.
    pub const ALL: [FinishReason; 4] = [
        FinishReason::Stop,
        FinishReason::Length,
        FinishReason::Timeout,
        FinishReason::Aborted,
    ];

    /// Position in [`FinishReason::ALL`] (per-reason counters are arrays).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The label used in metrics and the OpenAI API.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Timeout => "timeout",
            FinishReason::Aborted => "abort",
        }
    }
}

/// Timings of one request, from the engine's point of view.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Timings {
    /// Waiting before admission (first admission).
    pub queue: Duration,
    /// Arrival to first token.
    pub ttft: Duration,
    /// Admission to first token.
    pub prefill: Duration,
    /// First token to the last.
    pub decode: Duration,
}

/// The end of a request.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Why it ended.
    pub reason: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (including a final EOS).
    pub completion_tokens: usize,
    /// Text held back until the end (partial stop string, incomplete bytes).
    pub tail: String,
    /// Times it was preempted and recomputed.
    pub preemptions: u32,
    /// Where the time went.
    pub timings: Timings,
    /// A scoring job's result, one entry per scored token.
    pub scores: Option<Vec<PositionScore>>,
    /// An embedding job's result: the mean of the prompt's final-normed
    /// hidden states (not normalised), `hidden_size` wide.
    pub embedding: Option<Vec<f32>>,
}

/// What a request's receiver gets.
#[derive(Debug, Clone)]
pub enum Event {
    /// A generated token and the text it completes (may be empty).
    Token {
        /// Token id.
        id: u32,
        /// Text safe to show now.
        text: String,
        /// Its log-probability, when asked.
        logprob: Option<TokenLogprob>,
    },
    /// The request finished.
    Done(Completion),
    /// The engine failed while running it.
    Failed(String),
}

/// Why a submission was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full.
    #[error("the server is overloaded: {reason}; retry after {retry_after:?}")]
    Overloaded {
        /// Which limit.
        reason: String,
        /// An estimate of when capacity frees up.
        retry_after: Duration,
    },
    /// The request cannot fit the model.
    #[error("{message}")]
    ContextLength {
        /// Human-readable reason.
        message: String,
    },
    /// An invalid request.
    #[error("{message}")]
    Invalid {
        /// The parameter.
        param: String,
        /// What is wrong, naming the parameter.
        message: String,
    },
    /// The engine is draining or gone.
    #[error("the model is not accepting requests (shutting down)")]
    Unavailable,
}

impl From<LengthError> for SubmitError {
    fn from(e: LengthError) -> Self {
        if e.is_context() {
            SubmitError::ContextLength {
                message: e.to_string(),
            }
        } else {
            SubmitError::Invalid {
                param: e.param().into(),
                message: e.to_string(),
            }
        }
    }
}

/// What could never wait in an engine's queue, even an empty one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueLimit {
    /// More requests than `max_waiting`.
    Requests {
        /// Requests asked to wait together.
        asked: usize,
        /// `max_waiting`.
        limit: usize,
    },
    /// More prompt tokens than `max_waiting_tokens`.
    PromptTokens {
        /// Prompt tokens asked to wait together.
        asked: usize,
        /// `max_waiting_tokens`.
        limit: usize,
    },
}

/// Counters and gauges shared with the handle (atomics; no locks on the hot
/// path). Client requests (`Priority::Normal`) and background work
/// (`Priority::Low`) are counted apart: each has its own queue limit, and
/// the client gauges, which autoscalers and load balancers read, count
/// client requests only.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Client requests waiting (submitted, not yet admitted).
    pub waiting: AtomicUsize,
    /// Their prompt tokens.
    pub waiting_tokens: AtomicUsize,
    /// Client sequences back in line after a preemption (set by the engine
    /// thread each step); they count toward `max_waiting` too.
    pub requeued: AtomicUsize,
    /// Background requests waiting (submitted, not yet admitted).
    pub background_waiting: AtomicUsize,
    /// Their prompt tokens.
    pub background_waiting_tokens: AtomicUsize,
    /// Background sequences in line that no submission counted: preempted
    /// ones and the engine's own drift probes (set by the engine thread).
    pub background_requeued: AtomicUsize,
    /// Sequences running.
    pub running: AtomicUsize,
    /// KV blocks held by sequences (cached blocks none holds are free).
    pub kv_blocks_used: AtomicUsize,
    /// Cached KV blocks no sequence holds (kept for prefix reuse, evictable).
    pub kv_blocks_cached: AtomicUsize,
    /// KV blocks in the pool.
    pub kv_blocks_total: AtomicUsize,
    /// Preemptions since start.
    pub preemptions: AtomicU64,
    /// Steps run.
    pub steps: AtomicU64,
    /// Prompt tokens fed to the model (prefill, recomputation included).
    pub prefill_tokens: AtomicU64,
    /// Tokens of admitted sequences looked up in the prefix cache.
    pub prefix_cache_queries: AtomicU64,
    /// Of those, tokens the prefix cache supplied.
    pub prefix_cache_hits: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Of those, tokens picked from the device's best logits (tensor path:
    /// steps that copied back ids or the best few logits, not whole rows).
    pub device_picked_tokens: AtomicU64,
    /// Recent throughput in tokens per second (f64 bits), for retry-after.
    pub tokens_per_second: AtomicU64,
}

impl EngineStats {
    fn throughput(&self) -> f64 {
        f64::from_bits(self.tokens_per_second.load(Ordering::Relaxed))
    }
}

enum Msg {
    Job(Box<Job>),
    Drain(Instant),
    /// Fault injection for tests: the engine thread panics at intake.
    Panic,
}

struct Job {
    request: Request,
    events: mpsc::Sender<Event>,
    submitted: Instant,
    /// An embedding job: prefill only, the prompt's hidden states pooled
    /// instead of a token sampled ([`EngineHandle::submit_embedding`]).
    embed: bool,
}

struct Shared {
    stats: EngineStats,
    draining: AtomicBool,
    config: SchedulerConfig,
    /// The model's context or the KV pool's capacity, the smaller: a
    /// request that fits it fits the pool.
    context_length: usize,
    /// Rows of the embedding: the ids a forward pass can take.
    embedding_rows: usize,
    /// Width of the final hidden states (an embedding's dimensions).
    hidden_size: usize,
    labels: EngineLabels,
    /// Set when the thread has exited (model memory freed).
    stopped: AtomicBool,
    /// Set when the thread panicked: the engine is down, not draining.
    panicked: AtomicBool,
    /// Finished requests, for canary analysis.
    window: crate::monitor::window::Window,
    /// Drift signals of its stable client requests.
    drift: Arc<crate::monitor::drift::Recorder>,
    /// Where deadlines, drains and a request's timings read the time.
    clock: Clock,
}

/// Marks the engine stopped when its thread ends, and failed when it ends by
/// panicking, so readiness and health tell the truth and new requests are
/// refused instead of queued for a thread that is gone.
struct ExitGuard(Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.panicked.store(true, Ordering::Relaxed);
            tracing::error!(
                model = %self.0.labels.model,
                version = %self.0.labels.version,
                "the engine thread panicked; its requests end with an error"
            );
        }
        self.0.stopped.store(true, Ordering::Relaxed);
    }
}

/// A handle to a running engine. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: std::sync::mpsc::SyncSender<Msg>,
    shared: Arc<Shared>,
    tokenizer: Arc<crate::engine::Tokenizer>,
    chat_template: crate::engine::ChatTemplate,
    info: Arc<crate::engine::ModelInfo>,
}

impl EngineHandle {
    /// Starts the engine thread for `model`, on the system clock.
    pub fn spawn(
        model: LoadedModel,
        config: SchedulerConfig,
        labels: EngineLabels,
    ) -> std::io::Result<Self> {
        Self::spawn_with_clock(model, config, labels, Clock::system())
    }

    /// Starts the engine thread for `model`, reading the time from `clock`
    /// (tests pass a manual one).
    pub fn spawn_with_clock(
        model: LoadedModel,
        config: SchedulerConfig,
        labels: EngineLabels,
        clock: Clock,
    ) -> std::io::Result<Self> {
        let kv_shape = model
            .model
            .kv_shape(config.block_size)
            .with_dtype(config.kv_cache_dtype)
            .grouped(&model.model.kv_groups());
        let blocks = kv_shape
            .blocks_in(config.kv_cache_bytes)
            .max(kv_shape.groups);
        // A sequence can never outgrow the pool, so the context this engine
        // serves (and advertises as `max_model_len`) is the smaller of the
        // two: a long-context model on a small pool serves what fits instead
        // of refusing every request that leaves `max_tokens` to the default.
        let context_length = model
            .model
            .config()
            .max_position_embeddings
            .min(kv_shape.tokens_in(blocks));
        let shared = Arc::new(Shared {
            stats: EngineStats::default(),
            draining: AtomicBool::new(false),
            context_length,
            embedding_rows: model.model.config().vocab_size,
            hidden_size: model.model.config().hidden_size,
            config: config.clone(),
            labels: labels.clone(),
            stopped: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            window: Default::default(),
            drift: Arc::new(crate::monitor::drift::Recorder::new(
                &labels.model,
                &labels.version,
            )),
            clock,
        });
        shared
            .stats
            .kv_blocks_total
            .store(blocks, Ordering::Relaxed);
        // Room for both queues: client and background submissions are
        // limited apart, so neither fills the channel for the other.
        let (tx, rx) = std::sync::mpsc::sync_channel(config.max_waiting.max(1).saturating_mul(2));
        let tokenizer = Arc::new(model.tokenizer.clone());
        let chat_template = model.chat_template.clone();
        let info = Arc::new(model.info.clone());
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("engine-{}-{}", labels.model, labels.version))
            .spawn(move || {
                let _exit = ExitGuard(thread_shared.clone());
                worker::run(model, blocks, rx, thread_shared)
            })?;
        Ok(Self {
            tx,
            shared,
            tokenizer,
            chat_template,
            info,
        })
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &crate::engine::Tokenizer {
        &self.tokenizer
    }

    /// The model's chat template.
    pub fn chat_template(&self) -> &crate::engine::ChatTemplate {
        &self.chat_template
    }

    /// What is loaded.
    pub fn info(&self) -> &crate::engine::ModelInfo {
        &self.info
    }

    /// Longest context (prompt + generation).
    pub fn context_length(&self) -> usize {
        self.shared.context_length
    }

    /// The token ids the model can take: its embedding's rows, which a
    /// tokenizer may exceed (the loader allows a larger vocabulary).
    pub fn embedding_rows(&self) -> usize {
        self.shared.embedding_rows
    }

    /// Width of the model's final hidden states: the dimensions of the
    /// embeddings it serves.
    pub fn hidden_size(&self) -> usize {
        self.shared.hidden_size
    }

    /// The labels it was started with.
    pub fn labels(&self) -> &EngineLabels {
        &self.shared.labels
    }

    /// Where it reads the time: a request's deadline is an instant on it.
    pub fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    /// Live counters.
    pub fn stats(&self) -> &EngineStats {
        &self.shared.stats
    }

    /// Whether it accepts requests.
    pub fn is_ready(&self) -> bool {
        !self.shared.draining.load(Ordering::Relaxed)
            && !self.shared.stopped.load(Ordering::Relaxed)
    }

    /// Whether the engine thread died by panicking.
    pub fn has_failed(&self) -> bool {
        self.shared.panicked.load(Ordering::Relaxed)
    }

    /// Its finished requests, for analyses over a window of time.
    pub fn window(&self) -> &crate::monitor::window::Window {
        &self.shared.window
    }

    /// Whether the engine thread has exited and freed its memory.
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Relaxed)
    }

    /// Its drift recorder (reference, live windows, state).
    pub fn drift(&self) -> &Arc<crate::monitor::drift::Recorder> {
        &self.shared.drift
    }

    /// Most client requests that may wait (and as many background ones).
    pub fn max_waiting(&self) -> usize {
        self.shared.config.max_waiting
    }

    /// Whether `requests` sequences holding `prompt_tokens` prompt tokens in
    /// all could wait together in this engine's queue when it is empty. A
    /// request that fits an emptier queue but not the present one is
    /// refused as overloaded (429, retry later); one that fits none never
    /// will be, and is refused as invalid (400) with this.
    pub fn fits_queue(&self, requests: usize, prompt_tokens: usize) -> Result<(), QueueLimit> {
        let cfg = &self.shared.config;
        if requests > cfg.max_waiting {
            return Err(QueueLimit::Requests {
                asked: requests,
                limit: cfg.max_waiting,
            });
        }
        if prompt_tokens > cfg.max_waiting_tokens {
            return Err(QueueLimit::PromptTokens {
                asked: prompt_tokens,
                limit: cfg.max_waiting_tokens,
            });
        }
        Ok(())
    }

    /// Checks a request against the model's limits without queueing it: the
    /// same rule, and the same messages, as validation (without the server's
    /// caps).
    pub fn check(&self, req: &Request) -> Result<(), SubmitError> {
        if let Some(job) = &req.score
            && (job.tokens.len() != req.max_tokens
                || !(job.probes.is_empty() || job.probes.len() == job.tokens.len()))
        {
            return Err(SubmitError::Invalid {
                param: "score".into(),
                message:
                    "score: a scoring job scores max_tokens tokens, with probes for each or none"
                        .into(),
            });
        }
        if let Err(e) = req.sampling.validate() {
            return Err(match e {
                crate::engine::Error::InvalidParam { param, message } => SubmitError::Invalid {
                    message: format!("{param}: {message}"),
                    param,
                },
                other => SubmitError::Invalid {
                    param: "sampling".into(),
                    message: other.to_string(),
                },
            });
        }
        let context = self.shared.context_length;
        length::max_new_tokens(
            context,
            LengthCaps::default(),
            "prompt",
            req.prompt.len(),
            Some(req.max_tokens),
        )?;
        Ok(())
    }

    /// Queues a request; the receiver yields its events. Fails at once when
    /// its queue (client or background, by priority) is full, the request
    /// cannot fit, or the engine is draining.
    pub fn submit(&self, request: Request) -> Result<mpsc::Receiver<Event>, SubmitError> {
        self.submit_job(request, false)
    }

    /// Queues an embedding job for `request.prompt` (`max_tokens` must be
    /// 1; sampling and stops are ignored): one prefill, nothing generated,
    /// and a [`Completion`] whose `embedding` is the mean of the prompt's
    /// final-normed hidden states (after the final norm, before the LM
    /// head). It is batched with other work like any prefill; the prefix
    /// cache is not used for it (every row's state is needed).
    pub fn submit_embedding(&self, request: Request) -> Result<mpsc::Receiver<Event>, SubmitError> {
        if request.max_tokens != 1 || request.score.is_some() {
            return Err(SubmitError::Invalid {
                param: "max_tokens".into(),
                message: "max_tokens: an embedding job generates nothing (max_tokens 1, no score)"
                    .into(),
            });
        }
        self.submit_job(request, true)
    }

    fn submit_job(
        &self,
        request: Request,
        embed: bool,
    ) -> Result<mpsc::Receiver<Event>, SubmitError> {
        self.check(&request)?;
        let (variant, key) = (request.variant, request.split_key);
        self.admit(request, embed).inspect_err(|e| {
            // A refused request is a sample too: a candidate too slow for its
            // share sheds load here, and a rollout must see it.
            let reason = match e {
                SubmitError::Overloaded { .. } => "overloaded",
                SubmitError::Unavailable => "unavailable",
                _ => return,
            };
            let l = &self.shared.labels;
            metrics::counter!(
                crate::monitor::names::REFUSED,
                "model" => l.model.clone(),
                "version" => l.version.clone(),
                "variant" => variant.as_str(),
                "reason" => reason
            )
            .increment(1);
            self.shared
                .window
                .record(variant, crate::monitor::canary::Sample::refused(key));
        })
    }

    fn admit(&self, request: Request, embed: bool) -> Result<mpsc::Receiver<Event>, SubmitError> {
        let prompt_len = request.prompt.len();
        if let Err(limit) = self.fits_queue(1, prompt_len) {
            return Err(SubmitError::Invalid {
                param: "prompt".into(),
                message: match limit {
                    QueueLimit::PromptTokens { asked, limit } => format!(
                        "the prompt has {asked} tokens, and this server lets at most {limit} prompt tokens wait per model (max_waiting_tokens): it could never be queued"
                    ),
                    QueueLimit::Requests { limit, .. } => format!(
                        "this server lets {limit} requests wait per model (max_waiting): none can be queued"
                    ),
                },
            });
        }
        if !self.is_ready() {
            return Err(SubmitError::Unavailable);
        }
        let stats = &self.shared.stats;
        let cfg = &self.shared.config;
        let (count, tokens, requeued) = match request.priority {
            Priority::Normal => (&stats.waiting, &stats.waiting_tokens, &stats.requeued),
            Priority::Low => (
                &stats.background_waiting,
                &stats.background_waiting_tokens,
                &stats.background_requeued,
            ),
        };
        let overloaded = |reason: String| SubmitError::Overloaded {
            reason,
            retry_after: self.retry_after(tokens.load(Ordering::Relaxed) + prompt_len),
        };
        // A place in line is taken only while one is free, so that
        // concurrent submissions never hold more than `max_waiting` places
        // together (with the preempted sequences already back in line).
        let requeued = requeued.load(Ordering::Relaxed);
        if let Err(waiting) = count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            (w + requeued < cfg.max_waiting).then_some(w + 1)
        }) {
            return Err(overloaded(format!(
                "{} requests are already waiting",
                waiting + requeued
            )));
        }
        if let Err(waiting_tokens) = tokens.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
            (t + prompt_len <= cfg.max_waiting_tokens).then_some(t + prompt_len)
        }) {
            count.fetch_sub(1, Ordering::AcqRel);
            return Err(overloaded(format!(
                "{waiting_tokens} prompt tokens are already waiting"
            )));
        }
        // Room for every token plus the final event: the engine never blocks on it.
        let (etx, erx) = mpsc::channel(request.max_tokens.saturating_add(2));
        let job = Job {
            request,
            events: etx,
            submitted: self.shared.clock.now(),
            embed,
        };
        match self.tx.try_send(Msg::Job(Box::new(job))) {
            Ok(()) => Ok(erx),
            Err(e) => {
                count.fetch_sub(1, Ordering::AcqRel);
                tokens.fetch_sub(prompt_len, Ordering::AcqRel);
                match e {
                    std::sync::mpsc::TrySendError::Full(_) => {
                        Err(overloaded("the request queue is full".into()))
                    }
                    std::sync::mpsc::TrySendError::Disconnected(_) => Err(SubmitError::Unavailable),
                }
            }
        }
    }

    /// How long until roughly `tokens` queued tokens have been processed.
    fn retry_after(&self, tokens: usize) -> Duration {
        let tps = self.shared.stats.throughput().max(1.0);
        Duration::from_secs_f64((tokens as f64 / tps).clamp(1.0, 60.0))
    }

    /// Stops admitting; running and queued requests get until `timeout` to
    /// finish, then end with [`FinishReason::Aborted`].
    pub fn drain(&self, timeout: Duration) {
        self.shared.draining.store(true, Ordering::Relaxed);
        // A full queue only delays the message; the flag already stops intake.
        let _ = self.tx.send(Msg::Drain(self.shared.clock.now() + timeout));
    }

    /// Makes the engine thread panic, as a bug in a kernel would: for tests
    /// of what clients, readiness, health and rollouts see when an engine
    /// dies. Not part of the API.
    #[doc(hidden)]
    pub fn inject_panic(&self) {
        let _ = self.tx.send(Msg::Panic);
    }

    /// Waits until the engine thread has exited (after [`Engine::drain`] or the
    /// last handle elsewhere is gone), polling at `interval`.
    pub async fn stopped(&self, interval: Duration) {
        self.watch().stopped(interval).await
    }

    /// An observer of the engine that does not keep it alive.
    pub fn watch(&self) -> EngineWatch {
        EngineWatch {
            shared: self.shared.clone(),
        }
    }
}

/// Watches an engine without holding it open: the engine still stops when
/// the last [`Engine`] handle is dropped.
#[derive(Clone)]
pub struct EngineWatch {
    shared: Arc<Shared>,
}

impl EngineWatch {
    /// Whether the engine thread has exited and freed its memory.
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }

    /// Waits for the thread to exit, polling at `interval`.
    pub async fn stopped(&self, interval: Duration) {
        while !self.is_stopped() {
            tokio::time::sleep(interval).await;
        }
    }
}
