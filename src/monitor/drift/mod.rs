//! Drift detection per (model, version), label-free, from what the server
//! computes anyway.
//!
//! Each engine owns a [`Recorder`]. The engine thread feeds it one
//! [`Observation`] per finished request (stable traffic from clients only:
//! no shadow copies, canary requests, warm-ups or scoring jobs), updating
//! fixed-size histograms and preallocated sample buffers in place: per
//! request O(prompt tokens), no allocation. The first
//! [`DriftConfig::reference_requests`] requests a version serves as stable
//! become its frozen **reference** (or a reference built from a file of
//! prompts replaces them); after that, requests fill **live windows**
//! closed by count or by time, whichever comes first. Each closed window is
//! compared with the reference signal by signal ([`Signal`]: PSI for binned
//! distributions, Jensen–Shannon for mixes, Kolmogorov–Smirnov for
//! latencies, a NannyML-style band over reference chunks for scalar
//! means), the scores go to `llmops_drift_score`, and a state machine with
//! hysteresis (K windows to fire, K to clear) publishes
//! [`DriftTransition`]s on a broadcast channel for hooks and retraining.

pub mod embed;
pub mod stats;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Label};
use serde::{Deserialize, Serialize};

use stats::{
    Band, bin_counts, js_beyond_noise, ks_critical, ks_statistic, psi_beyond_noise, quantile_edges,
};
pub use stats::{CHAR_CLASSES, TOKEN_BUCKETS, TextProfile};

/// Metric names.
pub mod names {
    /// Gauge: the last closed window's score per signal.
    pub const SCORE: &str = "llmops_drift_score";
    /// Gauge: 0 ok, 1 warn, 2 drift.
    pub const STATE: &str = "llmops_drift_state";
    /// Counter: live windows evaluated.
    pub const WINDOWS: &str = "llmops_drift_windows_total";
    /// Gauge: requests (or prompts) in the frozen reference; 0 while it is
    /// being collected.
    pub const REFERENCE: &str = "llmops_drift_reference_requests";
}

/// HELP lines.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_gauge!(
        names::SCORE,
        Unit::Count,
        "Drift score of the last closed live window against the version's reference, by model, version and signal (PSI, Jensen-Shannon distance, KS statistic or sigmas, per signal)."
    );
    describe_gauge!(
        names::STATE,
        Unit::Count,
        "Drift state of a version after hysteresis: 0 ok, 1 warn, 2 drift."
    );
    describe_counter!(
        names::WINDOWS,
        Unit::Count,
        "Live drift windows evaluated, by model and version."
    );
    describe_gauge!(
        names::REFERENCE,
        Unit::Count,
        "Requests in a version's frozen drift reference (0 while it is collected)."
    );
}

/// The test a signal is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Test {
    /// Population stability index over bins (quantiles of the reference, or
    /// hashed token buckets), less what sampling noise alone reads at these
    /// sample sizes ([`stats::noise_floor`]).
    Psi,
    /// Jensen–Shannon distance between categorical mixes, likewise less
    /// the noise floor.
    Js,
    /// Two-sample Kolmogorov–Smirnov statistic.
    Ks,
    /// Distance of the window's mean from the reference's, in standard
    /// deviations of reference chunk means (NannyML's band).
    Sigma,
    /// Maximum mean discrepancy between embedding samples, against
    /// critical values from a permutation test ([`embed::mmd_test`]).
    Mmd,
}

/// What is compared between the reference and a live window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Prompt tokens per request.
    PromptLength,
    /// Generated tokens per request.
    OutputLength,
    /// Mix of finish reasons (stop, length, timeout, abort).
    FinishReason,
    /// Prompt tokens in 64 hashed buckets of ids.
    PromptTokens,
    /// Prompt characters by class (latin, digit, punct, space, CJK,
    /// Cyrillic, other).
    PromptScript,
    /// Mean per-token log-prob of the prompt under the model (sampled
    /// requests, scored at low priority).
    PromptLogprob,
    /// Mean entropy of the model's distribution at each generated token.
    OutputEntropy,
    /// The prompt's meaning: its final hidden states, mean-pooled
    /// (sampled with the prompt log-prob), projected ([`embed`]).
    PromptEmbedding,
    /// Arrival to first token.
    Ttft,
    /// Arrival to last token.
    E2e,
    /// Share of requests that failed or timed out.
    ErrorRate,
}

/// Signals, in gauge order.
const N: usize = 11;

impl Signal {
    /// Every signal.
    pub const ALL: [Signal; N] = [
        Signal::PromptLength,
        Signal::OutputLength,
        Signal::FinishReason,
        Signal::PromptTokens,
        Signal::PromptScript,
        Signal::PromptLogprob,
        Signal::OutputEntropy,
        Signal::PromptEmbedding,
        Signal::Ttft,
        Signal::E2e,
        Signal::ErrorRate,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::PromptLength => "prompt_length",
            Signal::OutputLength => "output_length",
            Signal::FinishReason => "finish_reason",
            Signal::PromptTokens => "prompt_tokens",
            Signal::PromptScript => "prompt_script",
            Signal::PromptLogprob => "prompt_logprob",
            Signal::OutputEntropy => "output_entropy",
            Signal::PromptEmbedding => "prompt_embedding",
            Signal::Ttft => "ttft",
            Signal::E2e => "e2e",
            Signal::ErrorRate => "error_rate",
        }
    }

    /// The test it is judged by.
    pub fn test(self) -> Test {
        match self {
            Signal::PromptLength | Signal::OutputLength | Signal::PromptTokens => Test::Psi,
            Signal::FinishReason | Signal::PromptScript => Test::Js,
            Signal::Ttft | Signal::E2e => Test::Ks,
            Signal::PromptLogprob | Signal::OutputEntropy | Signal::ErrorRate => Test::Sigma,
            Signal::PromptEmbedding => Test::Mmd,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A drift level: a window's, or a version's state after hysteresis.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Within every threshold.
    #[default]
    Ok,
    /// A gating signal past its warning threshold.
    Warn,
    /// A gating signal past its drift threshold.
    Drift,
}

impl Level {
    /// The gauge value (0, 1, 2).
    pub fn value(self) -> f64 {
        self as u8 as f64
    }
}

/// Drift settings (`[drift]` in llmops.toml; per model under
/// `[drift.models.NAME]`, key by key over these). Thresholds default to the
/// anchors': PSI 0.1 / 0.25, Jensen–Shannon 0.1 (Evidently), mean ± 3σ of
/// reference chunks (NannyML), KS at p 0.05.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DriftConfig {
    /// Off: nothing is recorded.
    pub enabled: bool,
    /// Stable requests frozen as the reference when no reference file is
    /// given.
    pub reference_requests: usize,
    /// A live window closes after this many requests…
    pub window_requests: usize,
    /// …or after this many seconds, if it holds `min_window_requests`.
    pub window_secs: f64,
    /// Fewest requests a window closed by time must hold (else it stays
    /// open).
    pub min_window_requests: usize,
    /// Consecutive windows a level must hold before the state enters it,
    /// and consecutive windows below it before the state leaves it.
    pub consecutive: usize,
    /// Chunks the reference is cut into for the σ bands.
    pub reference_chunks: usize,
    /// Quantile bins of the length distributions.
    pub length_bins: usize,
    /// PSI warning threshold.
    pub psi_warn: f64,
    /// PSI drift threshold.
    pub psi_drift: f64,
    /// Jensen–Shannon distance warning threshold.
    pub js_warn: f64,
    /// Jensen–Shannon distance drift threshold.
    pub js_drift: f64,
    /// KS: warn when p falls below this.
    pub ks_p_warn: f64,
    /// KS: drift when p falls below this.
    pub ks_p_drift: f64,
    /// σ band: warn beyond this many σ.
    pub sigma_warn: f64,
    /// σ band: drift beyond this many σ.
    pub sigma_drift: f64,
    /// Embeddings (MMD): warn when the permutation p falls below this.
    pub mmd_p_warn: f64,
    /// Embeddings (MMD): drift when it falls below this.
    pub mmd_p_drift: f64,
    /// Permutations of the MMD test (its cost: each is a pass over the
    /// kernel matrix of at most 128 reference plus the window's embeddings).
    pub mmd_permutations: usize,
    /// Share of requests whose generated tokens' entropy is measured (one
    /// extra pass over the logits row per token).
    pub entropy_rate: f64,
    /// Share of requests whose prompt is scored by the model (a
    /// low-priority prefill of the prompt: a forward pass, so sampled).
    pub prompt_logprob_rate: f64,
    /// Signals that decide the state; the others are scored and exported
    /// only. Latency and errors move with load and faults rather than with
    /// the data, so they do not gate by default.
    pub signals: Vec<Signal>,
}

impl Default for DriftConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            reference_requests: 500,
            window_requests: 200,
            window_secs: 60.0,
            min_window_requests: 50,
            consecutive: 3,
            reference_chunks: 10,
            length_bins: 10,
            psi_warn: 0.1,
            psi_drift: 0.25,
            js_warn: 0.05,
            js_drift: 0.1,
            ks_p_warn: 0.05,
            ks_p_drift: 0.01,
            sigma_warn: 2.0,
            sigma_drift: 3.0,
            mmd_p_warn: 0.05,
            mmd_p_drift: 0.01,
            mmd_permutations: 100,
            // A vectorized pass over the row per token: ~0.7 ms on Gemma's
            // 262k vocabulary on the loaded 2-core VM (BENCHMARKS.md), a few
            // percent of a step, so a sample of requests by default.
            entropy_rate: 0.1,
            prompt_logprob_rate: 0.1,
            signals: vec![
                Signal::PromptLength,
                Signal::OutputLength,
                Signal::FinishReason,
                Signal::PromptTokens,
                Signal::PromptScript,
                Signal::PromptLogprob,
                Signal::OutputEntropy,
                Signal::PromptEmbedding,
            ],
        }
    }
}

impl DriftConfig {
    /// Checks ranges; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let pos = |k: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("drift.{k} must be a positive number, got {v}"))
            }
        };
        let rate = |k: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("drift.{k} must be between 0 and 1, got {v}"))
            }
        };
        let at_least = |k: &str, v: usize, min: usize| {
            if v >= min {
                Ok(())
            } else {
                Err(format!("drift.{k} must be at least {min}, got {v}"))
            }
        };
        at_least("reference_requests", self.reference_requests, 20)?;
        at_least("window_requests", self.window_requests, 10)?;
        at_least("min_window_requests", self.min_window_requests, 5)?;
        at_least("consecutive", self.consecutive, 1)?;
        at_least("reference_chunks", self.reference_chunks, 2)?;
        at_least("length_bins", self.length_bins, 2)?;
        if self.min_window_requests > self.window_requests {
            return Err("drift.min_window_requests must not exceed drift.window_requests".into());
        }
        pos("window_secs", self.window_secs)?;
        for (k, w, d) in [
            ("psi", self.psi_warn, self.psi_drift),
            ("js", self.js_warn, self.js_drift),
            ("sigma", self.sigma_warn, self.sigma_drift),
        ] {
            pos(&format!("{k}_warn"), w)?;
            pos(&format!("{k}_drift"), d)?;
            if w > d {
                return Err(format!("drift.{k}_warn must not exceed drift.{k}_drift"));
            }
        }
        rate("ks_p_warn", self.ks_p_warn)?;
        rate("ks_p_drift", self.ks_p_drift)?;
        if self.ks_p_drift > self.ks_p_warn || self.ks_p_drift <= 0.0 {
            return Err("drift.ks_p_drift must be positive and at most drift.ks_p_warn".into());
        }
        rate("mmd_p_warn", self.mmd_p_warn)?;
        rate("mmd_p_drift", self.mmd_p_drift)?;
        if self.mmd_p_drift > self.mmd_p_warn || self.mmd_p_drift <= 0.0 {
            return Err("drift.mmd_p_drift must be positive and at most drift.mmd_p_warn".into());
        }
        if !(20..=10_000).contains(&self.mmd_permutations) {
            return Err(format!(
                "drift.mmd_permutations must be between 20 and 10000, got {}",
                self.mmd_permutations
            ));
        }
        rate("entropy_rate", self.entropy_rate)?;
        rate("prompt_logprob_rate", self.prompt_logprob_rate)?;
        Ok(())
    }

    fn thresholds(&self, test: Test, n_ref: usize, n_live: usize) -> (f64, f64) {
        match test {
            Test::Psi => (self.psi_warn, self.psi_drift),
            Test::Js => (self.js_warn, self.js_drift),
            Test::Sigma => (self.sigma_warn, self.sigma_drift),
            Test::Ks => (
                ks_critical(self.ks_p_warn, n_ref, n_live),
                ks_critical(self.ks_p_drift, n_ref, n_live),
            ),
            // Data-dependent: the permutation test gives them.
            Test::Mmd => (f64::INFINITY, f64::INFINITY),
        }
    }
}

/// The server's drift settings: `[drift]` and its per-model overrides.
#[derive(Debug, Clone, Default)]
pub struct DriftSettings {
    /// `[drift]`.
    pub global: DriftConfig,
    /// `[drift.models.NAME]`: keys that replace the global ones.
    pub models: BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
}

impl DriftSettings {
    /// Parses `[drift]` (as JSON): its keys, and `models` of overrides.
    pub fn from_value(mut v: serde_json::Value) -> Result<Self, String> {
        let models = match v.as_object_mut().and_then(|o| o.remove("models")) {
            None => BTreeMap::new(),
            Some(m) => serde_json::from_value(m)
                .map_err(|e| format!("drift.models: expected tables of settings: {e}"))?,
        };
        let global: DriftConfig = serde_json::from_value(v).map_err(|e| format!("[drift]: {e}"))?;
        global.validate()?;
        let s = Self { global, models };
        for m in s.models.keys() {
            s.for_model(m)?;
        }
        Ok(s)
    }

    /// The settings of `model`: the global ones with its overrides.
    pub fn for_model(&self, model: &str) -> Result<DriftConfig, String> {
        let Some(over) = self.models.get(model) else {
            return Ok(self.global.clone());
        };
        merge(&self.global, over).map_err(|e| format!("drift.models.{model}: {e}"))
    }
}

/// `base` with the keys of `over` replaced.
pub fn merge(
    base: &DriftConfig,
    over: &serde_json::Map<String, serde_json::Value>,
) -> Result<DriftConfig, String> {
    let mut v = serde_json::to_value(base).map_err(|e| e.to_string())?;
    if let Some(o) = v.as_object_mut() {
        for (k, x) in over {
            o.insert(k.clone(), x.clone());
        }
    }
    let c: DriftConfig = serde_json::from_value(v).map_err(|e| e.to_string())?;
    c.validate()?;
    Ok(c)
}

/// What the engine measured of one finished request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observation {
    /// Prompt tokens.
    pub prompt_len: u32,
    /// Generated tokens.
    pub output_len: u32,
    /// [`crate::scheduler::FinishReason`] index (stop, length, timeout,
    /// abort); `None` when the engine failed the request.
    pub finish: Option<usize>,
    /// Whether it counts as an error (failed, timed out, aborted).
    pub error: bool,
    /// Arrival to first token (NaN without one).
    pub ttft_s: f64,
    /// Arrival to the end.
    pub e2e_s: f64,
    /// Mean entropy (nats) over its generated tokens, when measured.
    pub entropy: Option<f64>,
}

/// What the engine should measure of a request it takes in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admission {
    /// Record the request at all.
    pub record: bool,
    /// Measure the entropy of its generated tokens.
    pub entropy: bool,
    /// Score its prompt (a low-priority scoring job).
    pub prompt_logprob: bool,
}

/// Scalar values of one request per signal, in arrival order, in buffers
/// reserved once; plus the categorical histograms.
#[derive(Debug, Clone)]
struct Acc {
    requests: usize,
    opened: Option<Instant>,
    cap: usize,
    values: [Vec<f32>; N],
    finish: [f64; 4],
    tokens: [f64; TOKEN_BUCKETS],
    script: [f64; CHAR_CLASSES.len()],
    embeddings: Vec<embed::Embedding>,
}

impl Acc {
    fn new(cap: usize) -> Self {
        Self {
            requests: 0,
            opened: None,
            cap,
            values: std::array::from_fn(|i| match Signal::ALL[i].test() {
                Test::Js | Test::Mmd => vec![],
                _ if Signal::ALL[i] == Signal::PromptTokens => vec![],
                _ => Vec::with_capacity(cap),
            }),
            finish: [0.0; 4],
            tokens: [0.0; TOKEN_BUCKETS],
            script: [0.0; CHAR_CLASSES.len()],
            embeddings: Vec::with_capacity(cap),
        }
    }

    fn push_embedding(&mut self, e: embed::Embedding) {
        if self.embeddings.len() < self.cap {
            self.embeddings.push(e);
        }
    }

    fn push(&mut self, s: Signal, v: f64) {
        let b = &mut self.values[s.index()];
        // Never past the reservation: no allocation on the engine thread.
        if v.is_finite() && b.len() < self.cap {
            b.push(v as f32);
        }
    }

    fn record(&mut self, o: &Observation, prompt: &[u32], profile: &TextProfile, now: Instant) {
        self.opened.get_or_insert(now);
        self.requests += 1;
        self.push(Signal::PromptLength, f64::from(o.prompt_len));
        self.push(Signal::OutputLength, f64::from(o.output_len));
        self.push(Signal::Ttft, o.ttft_s);
        self.push(Signal::E2e, o.e2e_s);
        self.push(Signal::ErrorRate, if o.error { 1.0 } else { 0.0 });
        if let Some(h) = o.entropy {
            self.push(Signal::OutputEntropy, h);
        }
        if let Some(f) = o.finish.filter(|f| *f < 4) {
            self.finish[f] += 1.0;
        }
        for &t in prompt {
            self.tokens[stats::token_bucket(t)] += 1.0;
        }
        for (s, &c) in self.script.iter_mut().zip(profile) {
            *s += f64::from(c);
        }
    }

    fn clear(&mut self, now: Option<Instant>) {
        self.requests = 0;
        self.opened = now;
        for v in &mut self.values {
            v.clear();
        }
        self.finish = [0.0; 4];
        self.tokens = [0.0; TOKEN_BUCKETS];
        self.script = [0.0; CHAR_CLASSES.len()];
        self.embeddings.clear();
    }
}

/// A version's frozen reference, as persisted beside the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    /// `live` (its first stable requests) or `file:PATH`.
    pub source: String,
    /// Requests (or prompts) it summarises.
    pub requests: usize,
    /// When it was frozen (Unix seconds).
    pub frozen_at: f64,
    /// Per scalar signal, its values in arrival order (absent: not known,
    /// e.g. output signals of a reference built from prompts).
    pub values: BTreeMap<Signal, Vec<f32>>,
    /// Finish-reason counts (empty when unknown).
    #[serde(default)]
    pub finish: Vec<f64>,
    /// Hashed token-bucket counts.
    #[serde(default)]
    pub tokens: Vec<f64>,
    /// Character-class counts.
    #[serde(default)]
    pub script: Vec<f64>,
    /// Projected prompt embeddings of the scored requests.
    #[serde(default)]
    pub embeddings: Vec<embed::Embedding>,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Reference {
    fn from_acc(acc: &Acc, source: &str) -> Self {
        let values = Signal::ALL
            .iter()
            .filter(|s| !acc.values[s.index()].is_empty())
            .map(|s| (*s, acc.values[s.index()].clone()))
            .collect();
        Self {
            source: source.into(),
            requests: acc.requests,
            frozen_at: unix_now(),
            values,
            finish: acc.finish.to_vec(),
            tokens: acc.tokens.to_vec(),
            script: acc.script.to_vec(),
            embeddings: acc.embeddings.clone(),
        }
    }

    /// A prompt-side reference from tokenized prompts and their text
    /// profiles (a held-out split given at registration): prompt length,
    /// token buckets and script mix; the other signals stay unknown.
    pub fn from_prompts<'a>(
        prompts: impl IntoIterator<Item = (&'a [u32], TextProfile)>,
        source: &str,
    ) -> Self {
        let mut lengths = vec![];
        let mut tokens = [0.0; TOKEN_BUCKETS];
        let mut script = [0.0; CHAR_CLASSES.len()];
        for (p, prof) in prompts {
            lengths.push(p.len() as f32);
            for &t in p {
                tokens[stats::token_bucket(t)] += 1.0;
            }
            for (s, &c) in script.iter_mut().zip(&prof) {
                *s += f64::from(c);
            }
        }
        Self {
            source: source.into(),
            requests: lengths.len(),
            frozen_at: unix_now(),
            values: BTreeMap::from([(Signal::PromptLength, lengths)]),
            finish: vec![],
            tokens: tokens.to_vec(),
            script: script.to_vec(),
            embeddings: vec![],
        }
    }
}

/// A reference with what each test needs precomputed.
#[derive(Debug, Clone)]
struct Frozen {
    reference: Reference,
    /// Quantile edges and the reference's counts, per PSI scalar signal.
    bins: [Option<(Vec<f32>, Vec<f64>)>; N],
    /// Sorted values, per KS signal.
    sorted: [Vec<f32>; N],
    /// Bands, per σ signal.
    bands: [Option<Band>; N],
}

impl Frozen {
    fn new(reference: Reference, cfg: &DriftConfig) -> Self {
        let mut bins: [Option<(Vec<f32>, Vec<f64>)>; N] = Default::default();
        let mut sorted: [Vec<f32>; N] = Default::default();
        let mut bands: [Option<Band>; N] = Default::default();
        for (s, v) in &reference.values {
            let i = s.index();
            let mut sv = v.clone();
            sv.sort_unstable_by(f32::total_cmp);
            match s.test() {
                Test::Psi => {
                    let edges = quantile_edges(&sv, cfg.length_bins);
                    let mut counts = vec![];
                    bin_counts(&edges, &sv, &mut counts);
                    bins[i] = Some((edges, counts));
                }
                Test::Ks => sorted[i] = sv,
                Test::Sigma => bands[i] = Band::of(v, cfg.reference_chunks),
                Test::Js | Test::Mmd => {}
            }
        }
        Self {
            reference,
            bins,
            sorted,
            bands,
        }
    }
}

/// One signal's result in one window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Score {
    /// The signal.
    pub signal: Signal,
    /// Its test.
    pub test: Test,
    /// The statistic.
    pub score: f64,
    /// Its warning threshold.
    pub warn: f64,
    /// Its drift threshold.
    pub threshold: f64,
    /// Where the score falls.
    pub level: Level,
    /// Whether it decides the state.
    pub gating: bool,
    /// Live values it was computed from.
    pub live: usize,
}

/// Fewest live values a scalar signal needs in a window to be judged.
const MIN_VALUES: usize = 5;

/// Compares a live window with the reference, signal by signal. Signals
/// the reference lacks, or with too few live values, are left out.
fn evaluate(
    f: &Frozen,
    live: &Acc,
    cfg: &DriftConfig,
    scratch: &mut Vec<f32>,
    seed: u64,
) -> Vec<Score> {
    let mut out = Vec::with_capacity(N);
    let mut counts = vec![];
    for s in Signal::ALL {
        let i = s.index();
        let lv = &live.values[i];
        if s == Signal::PromptEmbedding {
            let Some(m) = embed::mmd_test(
                &f.reference.embeddings,
                &live.embeddings,
                cfg.mmd_permutations,
                cfg.mmd_p_warn,
                cfg.mmd_p_drift,
                seed,
            ) else {
                continue;
            };
            out.push(Score::judged(
                s,
                m.mmd2,
                m.warn,
                m.drift,
                cfg,
                live.embeddings.len(),
            ));
            continue;
        }
        let (score, n_ref, n_live) = match s {
            Signal::FinishReason | Signal::PromptScript | Signal::PromptTokens => {
                let (r, l): (&[f64], &[f64]) = match s {
                    Signal::FinishReason => (&f.reference.finish, &live.finish),
                    Signal::PromptScript => (&f.reference.script, &live.script),
                    _ => (&f.reference.tokens, &live.tokens),
                };
                if r.len() != l.len() || r.iter().sum::<f64>() <= 0.0 || live.requests == 0 {
                    continue;
                }
                if l.iter().sum::<f64>() <= 0.0 {
                    // Nothing of the kind live (e.g. token-only prompts have
                    // no text): no evidence either way.
                    continue;
                }
                let v = if s.test() == Test::Psi {
                    psi_beyond_noise(r, l)
                } else {
                    js_beyond_noise(r, l)
                };
                (v, f.reference.requests, live.requests)
            }
            _ => {
                if lv.len() < MIN_VALUES {
                    continue;
                }
                match s.test() {
                    Test::Psi => {
                        let Some((edges, rc)) = &f.bins[i] else {
                            continue;
                        };
                        bin_counts(edges, lv, &mut counts);
                        (psi_beyond_noise(rc, &counts), rc.len(), lv.len())
                    }
                    Test::Ks => {
                        let r = &f.sorted[i];
                        if r.len() < MIN_VALUES {
                            continue;
                        }
                        scratch.clear();
                        scratch.extend_from_slice(lv);
                        scratch.sort_unstable_by(f32::total_cmp);
                        (ks_statistic(r, scratch), r.len(), lv.len())
                    }
                    Test::Sigma => {
                        let Some(b) = &f.bands[i] else { continue };
                        let mean = lv.iter().map(|&v| f64::from(v)).sum::<f64>() / lv.len() as f64;
                        // A band with no spread (a constant reference, e.g.
                        // no errors) is floored at a binomial σ or 1e-6.
                        let floor = if s == Signal::ErrorRate {
                            let p = b.mean.max(1.0 / b.n);
                            (p * (1.0 - p) / lv.len() as f64).sqrt()
                        } else {
                            1e-6 * b.mean.abs().max(1.0)
                        };
                        (b.sigmas(mean, lv.len(), floor), b.n as usize, lv.len())
                    }
                    Test::Js | Test::Mmd => continue,
                }
            }
        };
        let (warn, threshold) = cfg.thresholds(s.test(), n_ref, n_live);
        out.push(Score::judged(s, score, warn, threshold, cfg, n_live));
    }
    out
}

impl Score {
    fn judged(
        signal: Signal,
        score: f64,
        warn: f64,
        threshold: f64,
        cfg: &DriftConfig,
        live: usize,
    ) -> Self {
        let level = if score >= threshold {
            Level::Drift
        } else if score >= warn {
            Level::Warn
        } else {
            Level::Ok
        };
        Self {
            signal,
            test: signal.test(),
            score,
            warn,
            threshold,
            level,
            gating: cfg.signals.contains(&signal),
            live,
        }
    }
}

/// The state machine: a level is entered after `k` consecutive windows at
/// or above it, and left after `k` consecutive windows below it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Hysteresis {
    /// The current state.
    pub state: Level,
    up_drift: usize,
    up_warn: usize,
    below: usize,
}

impl Hysteresis {
    /// Takes one window's level; returns `(from, to)` when the state moves.
    pub fn step(&mut self, level: Level, k: usize) -> Option<(Level, Level)> {
        let k = k.max(1);
        self.up_drift = if level >= Level::Drift {
            self.up_drift + 1
        } else {
            0
        };
        self.up_warn = if level >= Level::Warn {
            self.up_warn + 1
        } else {
            0
        };
        self.below = if level < self.state {
            self.below + 1
        } else {
            0
        };
        let from = self.state;
        let to = if from < Level::Drift && self.up_drift >= k {
            Level::Drift
        } else if from < Level::Warn && self.up_warn >= k {
            Level::Warn
        } else if from > level && self.below >= k {
            if from > Level::Warn && self.up_warn >= k {
                Level::Warn
            } else {
                Level::Ok
            }
        } else {
            from
        };
        if to == from {
            return None;
        }
        self.state = to;
        self.below = 0;
        Some((from, to))
    }
}

/// A change of a version's drift state, for hooks and the retrain
/// controller.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftTransition {
    /// Model.
    pub model: String,
    /// Version.
    pub version: String,
    /// State before.
    pub from: Level,
    /// State after.
    pub to: Level,
    /// The window's signals at warn or beyond: score and thresholds.
    pub signals: Vec<Score>,
    /// The window that moved it (1-based, per version).
    pub window_index: u64,
    /// When (Unix seconds).
    pub at: f64,
}

/// One closed window.
#[derive(Debug, Clone, Serialize)]
pub struct WindowReport {
    /// 1-based, per version.
    pub index: u64,
    /// Requests in it.
    pub requests: usize,
    /// Seconds it was open.
    pub seconds: f64,
    /// The gating signals' highest level.
    pub level: Level,
    /// The state after it.
    pub state: Level,
    /// When it closed (Unix seconds).
    pub at: f64,
    /// Per signal.
    pub scores: Vec<Score>,
}

/// Windows kept for the admin API.
const HISTORY: usize = 64;

struct Inner {
    cfg: DriftConfig,
    reference: Option<Frozen>,
    /// The reference being collected while there is none.
    collecting: Acc,
    live: Acc,
    hysteresis: Hysteresis,
    windows: u64,
    history: VecDeque<WindowReport>,
    events: Option<tokio::sync::broadcast::Sender<DriftTransition>>,
    /// A reference frozen here and not yet written to disk.
    unsaved: bool,
    /// Requests admitted so far: the sampled ones are those where
    /// ⌊n · rate⌋ steps up (exact rates, deterministic).
    admitted: u64,
    scratch: Vec<f32>,
}

/// The drift recorder of one engine (one model version).
///
/// Written by the engine thread once per finished request and read by the
/// admin API and the controller's ticker; the mutex is held for an update
/// (or, once per window, an evaluation of a few microseconds), never across
/// I/O, and never on a tokio request path.
pub struct Recorder {
    model: String,
    version: String,
    inner: Mutex<Inner>,
    scores: [Gauge; N],
    state: Gauge,
    windows: Counter,
    reference_size: Gauge,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("model", &self.model)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// A recorder with the default settings; [`Recorder::configure`] sets
    /// the model's own and where transitions go.
    pub fn new(model: &str, version: &str) -> Self {
        describe();
        let base = vec![
            Label::new("model", model.to_string()),
            Label::new("version", version.to_string()),
        ];
        let scores = Signal::ALL.map(|s| {
            let mut l = base.clone();
            l.push(Label::new("signal", s.as_str()));
            metrics::gauge!(names::SCORE, l)
        });
        let cfg = DriftConfig::default();
        let cap = cfg.reference_requests.max(cfg.window_requests);
        Self {
            model: model.into(),
            version: version.into(),
            inner: Mutex::new(Inner {
                collecting: Acc::new(cfg.reference_requests),
                live: Acc::new(cap),
                cfg,
                reference: None,
                hysteresis: Hysteresis::default(),
                windows: 0,
                history: VecDeque::new(),
                events: None,
                unsaved: false,
                admitted: 0,
                scratch: vec![],
            }),
            scores,
            state: metrics::gauge!(names::STATE, base.clone()),
            windows: metrics::counter!(names::WINDOWS, base.clone()),
            reference_size: metrics::gauge!(names::REFERENCE, base),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update leaves the state consistent; a poisoned lock is
        // still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The model and version it watches.
    pub fn labels(&self) -> (&str, &str) {
        (&self.model, &self.version)
    }

    /// Applies settings and the channel transitions go to. Buffers are
    /// resized to the new window and reference sizes (the open window and a
    /// reference still being collected start over).
    pub fn configure(
        &self,
        cfg: DriftConfig,
        events: Option<tokio::sync::broadcast::Sender<DriftTransition>>,
    ) {
        let mut g = self.lock();
        if events.is_some() {
            g.events = events;
        }
        let cap = cfg.reference_requests.max(cfg.window_requests);
        if cap != g.live.cap {
            g.live = Acc::new(cap);
        }
        if g.reference.is_none() && cfg.reference_requests != g.collecting.cap {
            g.collecting = Acc::new(cfg.reference_requests);
        }
        if let Some(f) = g.reference.take() {
            g.reference = Some(Frozen::new(f.reference, &cfg));
        }
        g.cfg = cfg;
    }

    /// The settings in force.
    pub fn config(&self) -> DriftConfig {
        self.lock().cfg.clone()
    }

    /// Replaces the reference (loaded from disk, or built from a file of
    /// prompts: `unsaved` says whether it still needs writing). The live
    /// window starts over; the state is kept.
    pub fn set_reference(&self, reference: Reference, unsaved: bool) {
        let mut g = self.lock();
        self.reference_size.set(reference.requests as f64);
        let f = Frozen::new(reference, &g.cfg);
        g.reference = Some(f);
        g.unsaved = unsaved;
        g.live.clear(None);
        g.collecting = Acc::new(0);
    }

    /// Drops the reference: the next stable requests become the new one.
    pub fn reset_reference(&self) {
        let mut g = self.lock();
        g.reference = None;
        g.collecting = Acc::new(g.cfg.reference_requests);
        g.live.clear(None);
        g.hysteresis = Hysteresis::default();
        self.state.set(0.0);
        self.reference_size.set(0.0);
    }

    /// The frozen reference, once, if it has not been written yet.
    pub fn take_unsaved_reference(&self) -> Option<Reference> {
        let mut g = self.lock();
        if !g.unsaved {
            return None;
        }
        g.unsaved = false;
        g.reference.as_ref().map(|f| f.reference.clone())
    }

    /// Decides what to measure of a request the engine takes in.
    pub fn admit(&self) -> Admission {
        let mut g = self.lock();
        if !g.cfg.enabled {
            return Admission::default();
        }
        let n = g.admitted as f64;
        g.admitted += 1;
        let draw = |rate: f64| ((n + 1.0) * rate).floor() > (n * rate).floor();
        let entropy = draw(g.cfg.entropy_rate);
        let prompt_logprob = draw(g.cfg.prompt_logprob_rate);
        Admission {
            record: true,
            entropy,
            prompt_logprob,
        }
    }

    /// Records a finished request; closes the live window when it is full.
    pub fn record(&self, o: &Observation, prompt: &[u32], profile: &TextProfile) {
        self.record_at(o, prompt, profile, Instant::now())
    }

    /// [`Recorder::record`] at a given time (tests, benches).
    pub fn record_at(&self, o: &Observation, prompt: &[u32], profile: &TextProfile, now: Instant) {
        let mut g = self.lock();
        if !g.cfg.enabled {
            return;
        }
        let g = &mut *g;
        if g.reference.is_none() {
            g.collecting.record(o, prompt, profile, now);
            if g.collecting.requests >= g.cfg.reference_requests {
                let r = Reference::from_acc(&g.collecting, "live");
                self.reference_size.set(r.requests as f64);
                g.reference = Some(Frozen::new(r, &g.cfg));
                g.unsaved = true;
                // The reference's buffers are not needed again until a reset.
                g.collecting = Acc::new(0);
                g.live.clear(None);
            }
            return;
        }
        g.live.record(o, prompt, profile, now);
        if g.live.requests >= g.cfg.window_requests {
            self.close(g, now);
        }
    }

    /// Records a scored prompt's mean-pooled final hidden state (any
    /// width; projected here).
    pub fn record_prompt_embedding(&self, pooled: &[f32]) {
        let Some(e) = embed::project(pooled) else {
            return;
        };
        let mut g = self.lock();
        if !g.cfg.enabled {
            return;
        }
        if g.reference.is_none() {
            g.collecting.push_embedding(e);
        } else {
            g.live.push_embedding(e);
        }
    }

    /// Records the mean per-token log-prob of a sampled request's prompt.
    pub fn record_prompt_logprob(&self, mean: f64) {
        let mut g = self.lock();
        if !g.cfg.enabled {
            return;
        }
        if g.reference.is_none() {
            g.collecting.push(Signal::PromptLogprob, mean);
        } else {
            g.live.push(Signal::PromptLogprob, mean);
        }
    }

    /// Closes the live window if it has been open `window_secs` and holds
    /// `min_window_requests`. The controller calls it about once a second.
    pub fn tick(&self, now: Instant) {
        let mut g = self.lock();
        let g = &mut *g;
        let due = g.live.opened.is_some_and(|o| {
            now.saturating_duration_since(o) >= Duration::from_secs_f64(g.cfg.window_secs)
        });
        if g.reference.is_some() && due && g.live.requests >= g.cfg.min_window_requests {
            self.close(g, now);
        }
    }

    fn close(&self, g: &mut Inner, now: Instant) {
        let Some(f) = &g.reference else { return };
        let scores = evaluate(f, &g.live, &g.cfg, &mut g.scratch, g.windows);
        let level = scores
            .iter()
            .filter(|s| s.gating)
            .map(|s| s.level)
            .max()
            .unwrap_or_default();
        for s in &scores {
            self.scores[s.signal.index()].set(s.score);
        }
        g.windows += 1;
        self.windows.increment(1);
        let moved = g.hysteresis.step(level, g.cfg.consecutive);
        let at = unix_now();
        if let Some((from, to)) = moved {
            self.state.set(to.value());
            tracing::info!(
                model = %self.model,
                version = %self.version,
                from = ?from,
                to = ?to,
                window = g.windows,
                "drift state changed"
            );
            if let Some(tx) = &g.events {
                // No subscriber is not an error.
                let _ = tx.send(DriftTransition {
                    model: self.model.clone(),
                    version: self.version.clone(),
                    from,
                    to,
                    signals: scores
                        .iter()
                        .filter(|s| s.level > Level::Ok)
                        .copied()
                        .collect(),
                    window_index: g.windows,
                    at,
                });
            }
        }
        if g.history.len() == HISTORY {
            g.history.pop_front();
        }
        g.history.push_back(WindowReport {
            index: g.windows,
            requests: g.live.requests,
            seconds: g
                .live
                .opened
                .map_or(0.0, |o| now.saturating_duration_since(o).as_secs_f64()),
            level,
            state: g.hysteresis.state,
            at,
            scores,
        });
        g.live.clear(None);
    }

    /// The state after hysteresis.
    pub fn state(&self) -> Level {
        self.lock().hysteresis.state
    }

    /// Live windows judged against the reference so far.
    pub fn windows(&self) -> u64 {
        self.lock().windows
    }

    /// Everything the admin API shows.
    pub fn status(&self) -> serde_json::Value {
        let g = self.lock();
        let reference = g.reference.as_ref().map(|f| {
            serde_json::json!({
                "source": f.reference.source,
                "requests": f.reference.requests,
                "frozen_at": f.reference.frozen_at,
                "signals": f.reference.values.keys().map(|s| s.as_str()).collect::<Vec<_>>(),
            })
        });
        serde_json::json!({
            "model": self.model,
            "version": self.version,
            "enabled": g.cfg.enabled,
            "state": g.hysteresis.state,
            "reference": reference,
            "collecting_reference": if g.reference.is_none() { g.collecting.requests } else { 0 },
            "live_window": {
                "requests": g.live.requests,
                "open_seconds": g.live.opened.map_or(0.0, |o| o.elapsed().as_secs_f64()),
            },
            "windows": g.windows,
            "last_window": g.history.back(),
            "history": g.history.iter().map(|w| serde_json::json!({
                "index": w.index, "level": w.level, "state": w.state, "requests": w.requests, "at": w.at,
            })).collect::<Vec<_>>(),
            "config": g.cfg,
        })
    }
}

#[cfg(test)]
mod tests;
