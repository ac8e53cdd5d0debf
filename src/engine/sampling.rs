//! Choosing the next token from a row of logits.
//!
//! Order, as in vLLM: penalties → temperature → top-k → top-p → min-p → draw.
//! Each sequence owns its random generator, seeded per request, so the same
//! seed gives the same tokens whatever else shares the batch.

use std::collections::HashMap;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Error, Result};

/// How to pick tokens. The defaults are greedy decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one.
    pub min_p: f32,
    /// Divides positive / multiplies negative logits of tokens already seen
    /// in the prompt or output; 1 is off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of generated tokens.
    pub frequency_penalty: f32,
    /// Seed of this request's generator; random when absent.
    pub seed: Option<u64>,
    /// Return the chosen token's log-probability with this many alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
        }
    }
}

/// Largest number of alternatives a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

impl SamplingParams {
    /// Checks ranges; the message names the parameter.
    pub fn validate(&self) -> Result<()> {
        let bad = |p: &str, m: String| {
            Err(Error::InvalidParam {
                param: p.into(),
                message: m,
            })
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                format!("must be ≥ 0, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!("must be > 0, got {}", self.repetition_penalty),
            );
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(name, format!("must be in [-2, 2], got {v}"));
            }
        }
        if let Some(n) = self.logprobs
            && n > MAX_TOP_LOGPROBS
        {
            return bad(
                "top_logprobs",
                format!("must be at most {MAX_TOP_LOGPROBS}, got {n}"),
            );
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// Log-probability of a sampled token and its best alternatives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    /// The chosen token.
    pub token: u32,
    /// Its log-probability under the model.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

/// Per-sequence sampling state.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Occurrences of each generated token (presence/frequency penalties).
    generated: HashMap<u32, u32>,
    /// Tokens of the prompt (repetition penalty).
    prompt: Vec<u32>,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler for a sequence whose prompt is `prompt`.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        let prompt = if params.repetition_penalty != 1.0 {
            let mut p = prompt.to_vec();
            p.sort_unstable();
            p.dedup();
            p
        } else {
            vec![]
        };
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            generated: HashMap::new(),
            prompt,
            scratch: vec![],
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records a token that was generated without being sampled here (e.g.
    /// replayed after preemption), so penalties see it.
    pub fn observe(&mut self, token: u32) {
        *self.generated.entry(token).or_default() += 1;
    }

    /// Picks the next token from `logits` (modified in place) and records it.
    pub fn sample(&mut self, logits: &mut [f32]) -> Result<(u32, Option<TokenLogprob>)> {
        if logits.is_empty() {
            return Err(Error::Internal("empty logits".into()));
        }
        // Reported log-probabilities are the model's own, before penalties and
        // temperature; keep the raw row only when they are asked for.
        let raw = self.params.logprobs.map(|n| (logits.to_vec(), n));
        self.apply_penalties(logits);
        let token = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        self.observe(token);
        let logprob = raw.map(|(raw, n)| {
            let (lse, top) = top_logprobs(&raw, n);
            TokenLogprob {
                token,
                logprob: raw[token as usize] - lse,
                top,
            }
        });
        Ok((token, logprob))
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let rp = p.repetition_penalty;
            let seen = self.prompt.iter().chain(self.generated.keys());
            for &t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
                }
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let cands = &mut self.scratch;
        cands.clear();
        cands.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l * inv_t)),
        );
        // Most likely first, ties by id, so the cut is deterministic.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, order);
            cands.truncate(p.top_k);
        }
        // Sorting 262k candidates per token is slow; the nucleus almost always
        // lies in the best few hundred, so sort a prefix first and widen only
        // when its mass falls short.
        let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = cands.iter().map(|c| (c.1 - max).exp()).sum();
        let mut sorted = cands.len().min(256);
        loop {
            if sorted < cands.len() {
                cands.select_nth_unstable_by(sorted - 1, order);
            }
            cands[..sorted].sort_unstable_by(order);
            let mass: f32 = cands[..sorted]
                .iter()
                .map(|c| (c.1 - max).exp())
                .sum::<f32>()
                / total;
            if sorted == cands.len() || mass >= p.top_p {
                break;
            }
            sorted = (sorted * 8).min(cands.len());
        }
        // Probabilities of the sorted prefix, then the top-p and min-p cuts.
        let mut keep = 0;
        let mut cum = 0.0;
        let pmax = 1.0 / total; // (max - max).exp() / total
        for c in cands[..sorted].iter() {
            let prob = (c.1 - max).exp() / total;
            if keep > 0 && (cum >= p.top_p || prob < p.min_p * pmax) {
                break;
            }
            cum += prob;
            keep += 1;
        }
        let kept = &cands[..keep.max(1)];
        let z: f32 = kept.iter().map(|c| (c.1 - max).exp()).sum();
        let mut u: f32 = self.rng.random::<f32>() * z;
        for c in kept {
            u -= (c.1 - max).exp();
            if u <= 0.0 {
                return c.0;
            }
        }
        kept[kept.len() - 1].0
    }
}

/// Index of the largest logit (lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// Log-sum-exp of the logits and the `n` most likely tokens' log-probabilities.
fn top_logprobs(logits: &[f32], n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let n = n.min(logits.len());
    if n == 0 {
        return (lse, vec![]);
    }
    let mut idx: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, order);
        idx.truncate(n);
    }
    idx.sort_unstable_by(order);
    (lse, idx.into_iter().map(|(t, l)| (t, l - lse)).collect())
}
