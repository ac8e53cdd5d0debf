//! Shadow evaluation: a candidate version receives copies of a sample of a
//! model's live requests; its answers never reach a client; they are
//! compared with the primary's and the comparison is published.
//!
//! The request path (`infer`) asks the route's [`Mirror`] for a [`Ticket`]
//! before it submits the primary: the ticket is refused (and the refusal
//! counted) when the copy would exceed the shadow's concurrency cap or its
//! token budget. Once the primary is admitted the ticket starts a [`Tee`],
//! which sees the primary's tokens as they stream and, when the primary
//! finishes, hands them to a task that runs the copy and compares:
//!
//! - `generate`: the candidate generates with the same parameters, started
//!   as soon as the primary is admitted;
//! - `score`: the candidate scores the primary's output in one
//!   teacher-forced prefill (the cheap mode); the primary records its own
//!   log-probabilities and top-k for it.
//!
//! Copies are low-priority sequences with a deadline: admitted only with
//! spare KV cache, preempted first, stepped only while no engine has
//! foreground work (`scheduler::governor`). A copy that cannot run in time
//! ends at its deadline and is counted as dropped; nothing of it reaches
//! the client, whose token budget it is not charged to.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::engine::TokenLogprob;
use crate::monitor::shadow::{self as compare, Aggregate, Answer, names};
use crate::monitor::{Protocol, Variant};
use crate::quota::RateLimiter;
use crate::redact::Redactor;
use crate::scheduler::{
    Completion, EngineHandle, Event, FinishReason, Priority, Request, ScoreJob, SubmitError,
};

/// What the candidate does with a copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Generates its own answer with the same parameters.
    #[default]
    Generate,
    /// Scores the primary's answer (teacher-forced, one prefill).
    Score,
}

impl Mode {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Generate => "generate",
            Mode::Score => "score",
        }
    }
}

/// Stored disagreements (off unless enabled).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleSpec {
    /// Whether disagreements are kept.
    pub enabled: bool,
    /// Most samples kept (the oldest go first).
    pub capacity: usize,
    /// Samples older than this are forgotten.
    pub retention_secs: u64,
    /// Extra regular expressions redacted besides the built-in ones
    /// (e-mail, phone, card, IP, API-key-like).
    pub redact: Vec<String>,
}

impl Default for SampleSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            capacity: 100,
            retention_secs: 24 * 3600,
            redact: vec![],
        }
    }
}

/// Most samples a shadow may keep.
pub const MAX_SAMPLES: usize = 10_000;

/// A shadow route's settings, as set through the admin API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowSpec {
    /// The candidate version.
    pub version: String,
    /// Share of requests copied, 0–1 (a hash of the request id decides,
    /// so a rerun with the same id is sampled alike).
    #[serde(default = "full")]
    pub rate: f64,
    /// Generate or score.
    #[serde(default)]
    pub mode: Mode,
    /// Copies in flight at once; beyond it copies are dropped.
    #[serde(default = "default_concurrency")]
    pub max_concurrent: usize,
    /// Tokens (prompt plus most generated) per second the copies may take;
    /// none: unlimited.
    #[serde(default)]
    pub tokens_per_second: Option<u32>,
    /// A copy not finished this long after the primary's admission is
    /// dropped.
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
    /// Alternatives per position compared in score mode (the KL's support).
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Stored disagreements.
    #[serde(default)]
    pub samples: SampleSpec,
}

fn full() -> f64 {
    1.0
}
fn default_concurrency() -> usize {
    8
}
fn default_timeout() -> f64 {
    60.0
}
fn default_top_k() -> usize {
    8
}

impl ShadowSpec {
    /// Checks ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.rate) {
            return Err(format!("rate: must be in [0, 1], got {}", self.rate));
        }
        if self.max_concurrent == 0 {
            return Err("max_concurrent: must be at least 1".into());
        }
        if self.tokens_per_second == Some(0) {
            return Err("tokens_per_second: must be at least 1 (omit it for no limit)".into());
        }
        if !(self.timeout_secs.is_finite()
            && self.timeout_secs > 0.0
            && self.timeout_secs <= 3600.0)
        {
            return Err(format!(
                "timeout_secs: must be in (0, 3600], got {}",
                self.timeout_secs
            ));
        }
        if !(1..=crate::engine::sampling::MAX_TOP_LOGPROBS).contains(&self.top_k) {
            return Err(format!(
                "top_k: must be in [1, {}], got {}",
                crate::engine::sampling::MAX_TOP_LOGPROBS,
                self.top_k
            ));
        }
        if self.samples.capacity > MAX_SAMPLES {
            return Err(format!(
                "samples.capacity: at most {MAX_SAMPLES}, got {}",
                self.samples.capacity
            ));
        }
        Redactor::new(&self.samples.redact).map(|_| ())
    }

    /// The sample rate in basis points, as the router keeps it.
    pub fn rate_bp(&self) -> u32 {
        (self.rate * 10_000.0).round() as u32
    }
}

/// A condition on a shadow's comparisons that a rollout of its candidate
/// needs before it starts, written `metric op value`: e.g.
/// `exact_match >= 0.9`, `top1_agreement >= 0.95`, `logprob_gap <= 0.1`.
/// Generate-mode metrics: `exact_match`, `prefix_agreement`, `token_f1`,
/// `length_ratio`, `finish_agreement`; score-mode: `top1_agreement`,
/// `logprob_gap`, `kl_divergence`, `candidate_mean_logprob`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ShadowGate {
    /// The metric.
    pub metric: String,
    /// How the value compares with the limit.
    pub op: crate::monitor::canary::Op,
    /// The limit.
    pub value: f64,
}

/// Metric name → (mode section, key in [`Aggregate::summary`]).
const GATE_METRICS: &[(&str, &str, &str)] = &[
    ("exact_match", "generate", "exact_match_rate"),
    ("prefix_agreement", "generate", "prefix_agreement"),
    ("token_f1", "generate", "token_f1"),
    ("length_ratio", "generate", "length_ratio"),
    ("finish_agreement", "generate", "finish_agreement"),
    ("top1_agreement", "score", "top1_agreement"),
    ("logprob_gap", "score", "logprob_gap"),
    ("kl_divergence", "score", "kl_divergence"),
    ("candidate_mean_logprob", "score", "candidate_mean_logprob"),
];

impl TryFrom<String> for ShadowGate {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<ShadowGate> for String {
    fn from(g: ShadowGate) -> String {
        format!("{} {} {}", g.metric, g.op, g.value)
    }
}

impl std::str::FromStr for ShadowGate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split_whitespace().collect();
        let [metric, op, value] = parts[..] else {
            return Err(format!(
                "shadow gate `{s}`: expected `metric op value`, e.g. `top1_agreement >= 0.95`"
            ));
        };
        if !GATE_METRICS.iter().any(|m| m.0 == metric) {
            let known: Vec<&str> = GATE_METRICS.iter().map(|m| m.0).collect();
            return Err(format!(
                "shadow gate `{s}`: unknown metric `{metric}`, expected one of {}",
                known.join(", ")
            ));
        }
        Ok(Self {
            metric: metric.to_string(),
            op: op.parse().map_err(|e| format!("shadow gate `{s}`: {e}"))?,
            value: value
                .parse()
                .map_err(|_| format!("shadow gate `{s}`: `{value}` is not a number"))?,
        })
    }
}

impl ShadowGate {
    /// Checks the gate against a shadow's totals, which must hold at least
    /// `min_compared` comparisons of the gate's mode. Returns the value.
    pub fn check(&self, totals: &Aggregate, min_compared: u64) -> Result<f64, String> {
        let Some(&(_, mode, key)) = GATE_METRICS.iter().find(|m| m.0 == self.metric) else {
            return Err(format!("unknown metric `{}`", self.metric));
        };
        let summary = totals.summary();
        let compared = summary[mode]["compared"].as_u64().unwrap_or(0);
        if compared < min_compared {
            return Err(format!(
                "{}: {compared} {mode}-mode comparisons, {min_compared} needed",
                String::from(self.clone())
            ));
        }
        let Some(v) = summary[mode][key].as_f64() else {
            return Err(format!(
                "{}: no value yet (for exact_match, greedy requests are needed)",
                String::from(self.clone())
            ));
        };
        if self.op.holds(v, self.value) {
            Ok(v)
        } else {
            Err(format!(
                "{}: the shadow measured {v:.4}",
                String::from(self.clone())
            ))
        }
    }
}

/// A stored disagreement, redacted.
#[derive(Debug, Clone, Serialize)]
pub struct StoredSample {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// The primary's version.
    pub primary_version: String,
    /// The mode that compared.
    pub mode: Mode,
    /// The prompt as text.
    pub prompt: String,
    /// The primary's answer.
    pub primary: String,
    /// The candidate's answer (generate mode).
    pub candidate: Option<String>,
    /// The comparison.
    pub scores: Value,
    #[serde(skip)]
    stored: Instant,
}

/// One shadow route's runtime: its settings, the candidate's engine, what
/// is in flight, and what was compared.
pub struct Mirror {
    model: String,
    spec: ShadowSpec,
    engine: EngineHandle,
    inflight: AtomicUsize,
    budget: Option<RateLimiter>,
    stats: Mutex<BTreeMap<String, Aggregate>>,
    samples: Mutex<VecDeque<StoredSample>>,
    redactor: Redactor,
}

impl Mirror {
    /// A mirror of `model`'s traffic to `engine` (the candidate's).
    pub fn new(model: &str, spec: ShadowSpec, engine: EngineHandle) -> Result<Self, String> {
        spec.validate()?;
        let redactor = Redactor::new(&spec.samples.redact)?;
        Ok(Self {
            model: model.to_string(),
            budget: spec
                .tokens_per_second
                .map(|t| RateLimiter::per_second(t, Duration::from_secs(10))),
            spec,
            engine,
            inflight: AtomicUsize::new(0),
            stats: Mutex::new(BTreeMap::new()),
            samples: Mutex::new(VecDeque::new()),
            redactor,
        })
    }

    /// The settings.
    pub fn spec(&self) -> &ShadowSpec {
        &self.spec
    }

    /// The candidate's engine.
    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// Copies in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Settings, copies in flight, and per primary version what was
    /// mirrored, dropped and compared.
    pub fn status(&self) -> Value {
        let stats: BTreeMap<String, Value> = lock(&self.stats)
            .iter()
            .map(|(v, a)| (v.clone(), a.summary()))
            .collect();
        json!({
            "model": self.model,
            "spec": self.spec,
            "inflight": self.inflight(),
            "by_primary_version": stats,
        })
    }

    /// The totals for one primary version.
    pub fn aggregate(&self, primary_version: &str) -> Option<Aggregate> {
        lock(&self.stats).get(primary_version).cloned()
    }

    /// Stored disagreements, newest last, within the retention.
    pub fn samples(&self) -> Vec<StoredSample> {
        let mut s = lock(&self.samples);
        self.expire(&mut s);
        s.iter().cloned().collect()
    }

    fn expire(&self, s: &mut VecDeque<StoredSample>) {
        let keep = Duration::from_secs(self.spec.samples.retention_secs);
        while s.front().is_some_and(|x| x.stored.elapsed() > keep) {
            s.pop_front();
        }
    }

    fn labels(&self, primary: &str) -> [(&'static str, String); 3] {
        [
            ("model", self.model.clone()),
            ("version", primary.to_string()),
            ("candidate", self.engine.labels().version.clone()),
        ]
    }

    fn dropped(&self, primary: &str, reason: &str) {
        let mut labels = self.labels(primary).to_vec();
        labels.push(("reason", reason.to_string()));
        metrics::counter!(names::DROPPED, &labels).increment(1);
        *lock(&self.stats)
            .entry(primary.to_string())
            .or_default()
            .dropped
            .entry(reason.to_string())
            .or_default() += 1;
        tracing::debug!(model = %self.model, primary, reason, "shadow copy dropped");
    }

    /// Whether `first` (the first choice of a request about to be submitted
    /// to `primary_version`) gets a copy: refused, and counted, when the
    /// copies in flight are at the cap or the token budget is spent.
    pub fn ticket(self: &Arc<Self>, primary_version: &str, first: &Request) -> Option<Ticket> {
        let slot = Slot::take(self).or_else(|| {
            self.dropped(primary_version, "concurrency");
            None
        })?;
        if let Some(b) = &self.budget {
            let cost = (first.prompt.len() + first.max_tokens) as u64;
            if b.take(cost.min(b.capacity())).is_err() {
                self.dropped(primary_version, "budget");
                return None;
            }
        }
        Some(Ticket {
            slot,
            primary_version: primary_version.to_string(),
            request: first.clone(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A place among the copies in flight, given back when dropped.
struct Slot(Arc<Mirror>);

impl Slot {
    fn take(mirror: &Arc<Mirror>) -> Option<Self> {
        let cap = mirror.spec.max_concurrent;
        mirror
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()?;
        metrics::gauge!(names::INFLIGHT, "model" => mirror.model.clone()).increment(1.0);
        Some(Self(mirror.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(names::INFLIGHT, "model" => self.0.model.clone()).decrement(1.0);
    }
}

/// A copy allowed, not yet started (the primary is being submitted).
pub struct Ticket {
    slot: Slot,
    primary_version: String,
    request: Request,
}

impl Ticket {
    /// Top alternatives the primary must report with each token (score
    /// mode compares the two distributions), or none.
    pub fn primary_logprobs(&self) -> Option<usize> {
        (self.slot.0.spec.mode == Mode::Score).then_some(self.slot.0.spec.top_k)
    }

    /// Starts the copy now that the primary is admitted. The client asked
    /// for `client_logprobs` alternatives (none: no log-probabilities);
    /// the tee trims what the primary reports for the shadow back to that.
    pub fn start(self, client_logprobs: Option<usize>) -> Tee {
        let Ticket {
            slot,
            primary_version,
            request,
        } = self;
        let mirror = slot.0.clone();
        let mode = mirror.spec.mode;
        let mut labels = mirror.labels(&primary_version).to_vec();
        labels.push(("mode", mode.as_str().to_string()));
        metrics::counter!(names::MIRRORED, &labels).increment(1);
        lock(&mirror.stats)
            .entry(primary_version.clone())
            .or_default()
            .mirrored += 1;
        let deadline = Instant::now() + Duration::from_secs_f64(mirror.spec.timeout_secs);
        // Generate mode starts at once; score mode needs the primary's answer.
        let candidate = match mode {
            Mode::Generate => Some(mirror.engine.submit(Request {
                sampling: crate::engine::SamplingParams {
                    logprobs: None,
                    ..request.sampling.clone()
                },
                ..background(&request, deadline)
            })),
            Mode::Score => None,
        };
        let (tx, rx) = oneshot::channel();
        tokio::spawn(run_copy(
            slot,
            primary_version,
            request,
            deadline,
            candidate,
            rx,
        ));
        Tee {
            tx: Some(tx),
            tokens: vec![],
            logprobs: vec![],
            record_logprobs: mode == Mode::Score,
            client_logprobs,
        }
    }
}

/// A copy of `r` for the candidate: lowest priority, internal, labelled
/// shadow, ending at `deadline`, timed from the primary's arrival.
fn background(r: &Request, deadline: Instant) -> Request {
    Request {
        priority: Priority::Low,
        deadline: Some(deadline),
        protocol: Protocol::Internal,
        variant: Variant::Shadow,
        score: None,
        ..r.clone()
    }
}

/// The primary's finished answer, as the tee saw it.
struct PrimaryOutput {
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    completion: Completion,
}

/// Sees the primary's first choice as it streams to the client.
pub struct Tee {
    tx: Option<oneshot::Sender<PrimaryOutput>>,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    record_logprobs: bool,
    client_logprobs: Option<usize>,
}

impl Tee {
    /// Records a primary token; returns the log-probability the client
    /// should see (trimmed to what it asked for).
    pub fn token(&mut self, id: u32, logprob: Option<TokenLogprob>) -> Option<TokenLogprob> {
        self.tokens.push(id);
        let logprob = logprob?;
        if self.record_logprobs {
            self.logprobs.push(logprob.clone());
        }
        let n = self.client_logprobs?;
        let mut l = logprob;
        l.top.truncate(n);
        Some(l)
    }

    /// The primary finished: the copy can be compared.
    pub fn done(&mut self, completion: &Completion) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(PrimaryOutput {
                tokens: std::mem::take(&mut self.tokens),
                logprobs: std::mem::take(&mut self.logprobs),
                completion: completion.clone(),
            });
        }
    }
}

/// Why a copy produced no comparison.
fn submit_reason(e: &SubmitError) -> &'static str {
    match e {
        SubmitError::Overloaded { .. } => "overloaded",
        SubmitError::Unavailable => "unavailable",
        SubmitError::ContextLength { .. } | SubmitError::Invalid { .. } => "invalid",
    }
}

/// A candidate's answer as its events tell it.
struct CandidateOutput {
    tokens: Vec<u32>,
    completion: Completion,
}

async fn collect(
    mut rx: tokio::sync::mpsc::Receiver<Event>,
) -> Result<CandidateOutput, &'static str> {
    let mut tokens = vec![];
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { id, .. } => tokens.push(id),
            Event::Done(completion) => {
                return match completion.reason {
                    FinishReason::Timeout => Err("timeout"),
                    FinishReason::Aborted => Err("aborted"),
                    _ => Ok(CandidateOutput { tokens, completion }),
                };
            }
            Event::Failed(_) => return Err("failed"),
        }
    }
    Err("aborted")
}

fn answer(tokens: Vec<u32>, c: &Completion) -> Answer {
    Answer {
        tokens,
        finish: c.reason.as_str(),
        ttft_s: c.timings.ttft.as_secs_f64(),
        e2e_s: (c.timings.ttft + c.timings.decode).as_secs_f64(),
    }
}

/// Runs one copy to its comparison (or its drop), then gives back its slot.
async fn run_copy(
    slot: Slot,
    primary_version: String,
    request: Request,
    deadline: Instant,
    candidate: Option<Result<tokio::sync::mpsc::Receiver<Event>, SubmitError>>,
    primary: oneshot::Receiver<PrimaryOutput>,
) {
    let mirror = slot.0.clone();
    let drop_as = |reason: &str| mirror.dropped(&primary_version, reason);
    let candidate = match candidate.transpose() {
        Ok(c) => c,
        Err(e) => return drop_as(submit_reason(&e)),
    };
    // The primary's answer; gone when the client left or it failed.
    let Ok(primary) = primary.await else {
        return drop_as("primary_incomplete");
    };
    if matches!(
        primary.completion.reason,
        FinishReason::Aborted | FinishReason::Timeout
    ) || primary.tokens.is_empty()
    {
        return drop_as("primary_incomplete");
    }
    let rx = match candidate {
        Some(rx) => rx,
        None => {
            let top_k = mirror.spec.top_k;
            let job = ScoreJob {
                probes: primary
                    .logprobs
                    .iter()
                    .map(|l| l.top.iter().take(top_k).map(|t| t.0).collect())
                    .collect(),
                tokens: primary.tokens.clone(),
            };
            if job.probes.len() != job.tokens.len() {
                return drop_as("primary_incomplete");
            }
            let r = Request {
                max_tokens: job.tokens.len(),
                sampling: Default::default(),
                stop: vec![],
                stop_token_ids: vec![],
                score: Some(Arc::new(job)),
                ..background(&request, deadline)
            };
            match mirror.engine.submit(r) {
                Ok(rx) => rx,
                Err(e) => return drop_as(submit_reason(&e)),
            }
        }
    };
    let cand = match collect(rx).await {
        Ok(c) => c,
        Err(reason) => return drop_as(reason),
    };
    let labels = mirror.labels(&primary_version).to_vec();
    let greedy = request.sampling.is_greedy();
    let compared = match mirror.spec.mode {
        Mode::Generate => Compared::Generated(compare::compare_generated(
            &answer(primary.tokens.clone(), &primary.completion),
            &answer(cand.tokens.clone(), &cand.completion),
            greedy,
        )),
        Mode::Score => {
            let Some(scores) = cand.completion.scores.as_deref() else {
                return drop_as("failed");
            };
            Compared::Scored(compare::compare_scored(&primary.logprobs, scores))
        }
    };
    // The sample first, then the counts: whoever sees a comparison counted
    // finds its sample stored.
    if compared.disagrees() && mirror.spec.samples.enabled {
        let m = mirror.clone();
        let prompt = request.prompt;
        let primary_tokens = primary.tokens;
        let candidate_tokens = match compared {
            Compared::Generated(_) => Some(cand.tokens),
            Compared::Scored(_) => None,
        };
        let scores = compared.scores();
        let version = primary_version.clone();
        // Detokenizing and redacting are CPU work: off the async workers.
        let _ = tokio::task::spawn_blocking(move || {
            m.store_sample(
                version,
                &prompt,
                &primary_tokens,
                candidate_tokens.as_deref(),
                scores,
            )
        })
        .await;
    }
    match &compared {
        Compared::Generated(g) => {
            record_generated(&labels, g);
            lock(&mirror.stats)
                .entry(primary_version)
                .or_default()
                .add_generated(g);
        }
        Compared::Scored(s) => {
            record_scored(&labels, s);
            lock(&mirror.stats)
                .entry(primary_version)
                .or_default()
                .add_scored(s);
        }
    }
    let mut compared_labels = labels;
    compared_labels.push(("mode", mirror.spec.mode.as_str().to_string()));
    metrics::counter!(names::COMPARED, &compared_labels).increment(1);
    drop(slot);
}

/// One comparison of a copy with its primary.
enum Compared {
    Generated(compare::Generated),
    Scored(compare::Scored),
}

impl Compared {
    /// Whether the candidate's answer differs from the primary's: such
    /// comparisons keep a sample.
    fn disagrees(&self) -> bool {
        match self {
            Compared::Generated(g) => !g.exact,
            Compared::Scored(s) => s.top1_agreements < s.tokens,
        }
    }

    /// The scores a stored sample shows.
    fn scores(&self) -> Value {
        match self {
            Compared::Generated(g) => serde_json::to_value(g).unwrap_or_default(),
            Compared::Scored(s) => json!({
                "tokens": s.tokens,
                "candidate_mean_logprob": s.candidate_mean(),
                "primary_mean_logprob": s.primary_mean(),
                "logprob_gap": s.gap(),
                "top1_agreement": s.top1_share(),
                "kl_divergence": s.kl_mean(),
            }),
        }
    }
}

fn record_generated(labels: &[(&'static str, String)], g: &compare::Generated) {
    if g.greedy {
        metrics::counter!(names::GREEDY_COMPARED, labels).increment(1);
        if g.exact {
            metrics::counter!(names::EXACT_MATCHES, labels).increment(1);
        }
    }
    if g.finish_agrees {
        metrics::counter!(names::FINISH_AGREEMENTS, labels).increment(1);
    }
    let with_kind = |k: &str| {
        let mut l = labels.to_vec();
        l.push(("kind", k.to_string()));
        l
    };
    metrics::histogram!(names::AGREEMENT, &with_kind("prefix")).record(g.prefix_share);
    metrics::histogram!(names::AGREEMENT, &with_kind("f1")).record(g.f1);
    metrics::histogram!(names::LENGTH_RATIO, labels).record(g.length_ratio);
    metrics::histogram!(names::TTFT_DELTA, labels).record(g.ttft_delta_s);
    metrics::histogram!(names::E2E_DELTA, labels).record(g.e2e_delta_s);
}

fn record_scored(labels: &[(&'static str, String)], s: &compare::Scored) {
    metrics::counter!(names::SCORED_TOKENS, labels).increment(s.tokens as u64);
    // Counters only grow: the sums are kept as negative log-likelihoods,
    // rounded to micro-nats.
    let micro = |lp: f64| ((-lp).max(0.0) * 1e6).round() as u64;
    metrics::counter!(names::CANDIDATE_NLL, labels).increment(micro(s.candidate_logprob_sum));
    metrics::counter!(names::PRIMARY_NLL, labels).increment(micro(s.primary_logprob_sum));
    metrics::histogram!(names::LOGPROB_GAP, labels).record(s.gap());
    metrics::histogram!(names::TOP1_AGREEMENT, labels).record(s.top1_share());
    metrics::histogram!(names::KL, labels).record(s.kl_mean());
}

impl Mirror {
    /// Stores a redacted disagreement, within the capacity and retention.
    fn store_sample(
        &self,
        primary_version: String,
        prompt: &[u32],
        primary: &[u32],
        candidate: Option<&[u32]>,
        scores: Value,
    ) {
        let tok = self.engine.tokenizer();
        let text = |ids: &[u32]| self.redactor.redact(&tok.decode(ids).unwrap_or_default());
        let sample = StoredSample {
            at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            primary_version,
            mode: self.spec.mode,
            prompt: text(prompt),
            primary: text(primary),
            candidate: candidate.map(text),
            scores,
            stored: Instant::now(),
        };
        let mut s = lock(&self.samples);
        self.expire(&mut s);
        s.push_back(sample);
        while s.len() > self.spec.samples.capacity {
            s.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::shadow::{Generated, Scored};

    #[test]
    fn shadow_gates_parse_and_judge_the_totals() {
        let mut totals = Aggregate::default();
        for exact in [true, true, true, false] {
            totals.add_generated(&Generated {
                greedy: true,
                exact,
                prefix_share: if exact { 1.0 } else { 0.5 },
                f1: 1.0,
                length_ratio: 1.0,
                finish_agrees: true,
                ttft_delta_s: 0.0,
                e2e_delta_s: 0.0,
            });
        }
        totals.add_scored(&Scored {
            tokens: 10,
            candidate_logprob_sum: -12.0,
            primary_logprob_sum: -10.0,
            top1_agreements: 9,
            kl_sum: 0.5,
        });
        let cases = [
            ("exact_match >= 0.75", 4, Ok(0.75)),
            ("exact_match > 0.75", 4, Err("measured 0.7500")),
            ("prefix_agreement >= 0.8", 4, Ok(0.875)),
            ("top1_agreement >= 0.9", 1, Ok(0.9)),
            ("logprob_gap <= 0.1", 1, Err("measured 0.2000")),
            ("logprob_gap <= 0.25", 1, Ok(0.2)),
            (
                "top1_agreement >= 0.5",
                2,
                Err("1 score-mode comparisons, 2 needed"),
            ),
        ];
        for (text, min, want) in cases {
            let gate: ShadowGate = text.parse().unwrap();
            assert_eq!(String::from(gate.clone()), text);
            match (gate.check(&totals, min), want) {
                (Ok(v), Ok(w)) => assert!((v - w).abs() < 1e-9, "{text}: {v}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{text}: {e}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
        for bad in [
            "agreement >= 1",
            "top1_agreement => 1",
            "top1_agreement >= x",
            "top1_agreement",
        ] {
            assert!(bad.parse::<ShadowGate>().is_err(), "{bad}");
        }
    }
}
