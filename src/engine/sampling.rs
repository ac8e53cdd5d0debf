//! Choosing the next token from a row of logits.
//!
//! Order, as in vLLM: penalties → temperature → top-k → top-p → min-p → draw.
//! Each sequence owns its random generator, seeded per request, so the same
//! seed gives the same tokens whatever else shares the batch.
//!
//! Cost: nothing here sorts the vocabulary (262,144 entries for Gemma). A
//! draw from the whole distribution reads the row once, block by block
//! (each block's max, then its weights e^((l − max)/T) summed while it is
//! in L1), then adds block masses and recomputes one block: an inverse-CDF
//! draw from one uniform number per token. Top-k selects with a bounded
//! heap; top-p looks for its nucleus among the best 64, 256, then 1,024
//! weights (sorting only those) and otherwise bisects the boundary weight
//! over the row; min-p is a threshold.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

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

/// Most candidates a row may ask of the device (`tensor::top_rows`
/// selects at most this many); a top-k draw over more copies the row.
pub const MAX_DEVICE_TOP_K: usize = 256;

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

    /// How many of the row's best logits a draw needs when no penalty
    /// changes the row: 1 for greedy, `top_k` for a top-k draw, at least the
    /// log-probabilities asked. `None` when the draw needs the whole row
    /// (penalties, or a draw over more than
    /// [`MAX_DEVICE_TOP_K`] tokens or the whole `vocab`, top_k 0
    /// included): then the tensor path copies the row back.
    pub fn device_candidates(&self, vocab: usize) -> Option<usize> {
        if self.has_penalties() || vocab == 0 {
            return None;
        }
        let draw = if self.is_greedy() {
            1
        } else if self.top_k > 0 && self.top_k < vocab {
            self.top_k
        } else {
            return None;
        };
        let want = draw.max(self.logprobs.unwrap_or(0).min(vocab));
        (want <= MAX_DEVICE_TOP_K).then_some(want)
    }

    /// Whether the draw is the argmax (temperature 0 or top-k 1).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
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
    /// Occurrences of each generated token, kept only when a penalty is on
    /// and updated as tokens are appended (one hash per token, never a
    /// rebuild). A dense count array would cost 1 MiB per sequence at
    /// Gemma's vocabulary; penalties touch only the tokens seen, so the map
    /// is the cheaper of the two.
    generated: HashMap<u32, u32>,
    /// Distinct tokens of the prompt and output for the repetition
    /// penalty: the prompt's, sorted, in the first `prompt_distinct`
    /// entries, then each output token the first time it appears outside
    /// the prompt, so that every seen token is penalised exactly once.
    seen: Vec<u32>,
    prompt_distinct: usize,
}

impl Sampler {
    /// A sampler for a sequence whose prompt is `prompt`.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        let seen = if params.repetition_penalty != 1.0 {
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
            prompt_distinct: seen.len(),
            seen,
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records a token that was generated without being sampled here (e.g.
    /// replayed after preemption), so penalties see it.
    pub fn observe(&mut self, token: u32) {
        if !self.params.has_penalties() {
            return;
        }
        let n = self.generated.entry(token).or_default();
        *n += 1;
        if *n == 1
            && self.params.repetition_penalty != 1.0
            && self.seen[..self.prompt_distinct]
                .binary_search(&token)
                .is_err()
        {
            self.seen.push(token);
        }
    }

    /// Picks the next token from `logits` and records it. Penalties are
    /// applied to `logits` in place; nothing else is written to it.
    pub fn sample(&mut self, logits: &mut [f32]) -> Result<(u32, Option<TokenLogprob>)> {
        if logits.is_empty() {
            return Err(Error::Internal("empty logits".into()));
        }
        // Reported log-probabilities are the model's own, before penalties and
        // temperature: measure them on the untouched row, and keep the
        // original values of the entries penalties change.
        let report = self.params.logprobs.map(|n| top_logprobs(logits, n));
        let mut originals = vec![];
        self.apply_penalties(logits, report.is_some().then_some(&mut originals));
        let token = if self.params.is_greedy() {
            argmax(logits)
        } else {
            let u: f64 = self.rng.random();
            SCRATCH
                .with_borrow_mut(|s| choose(logits, &self.params, u, s))
                // No token has a positive weight (every logit −∞ or NaN, or
                // a temperature so small that 1/T overflows): the limit is
                // greedy.
                .unwrap_or_else(|| argmax(logits))
        };
        self.observe(token);
        let logprob = report.map(|(lse, top)| {
            let raw = originals
                .iter()
                .find(|o: &&(u32, f32)| o.0 == token)
                .map_or(logits[token as usize], |o| o.1);
            TokenLogprob {
                token,
                logprob: raw - lse,
                top,
            }
        });
        Ok((token, logprob))
    }

    /// Picks the next token from the best logits of a row of `vocab`,
    /// chosen on the device (`tensor::top_rows`), and records it:
    /// `cands` holds the row's best [`SamplingParams::device_candidates`]
    /// (token, logit) pairs (NaN skipped), best first, and `lse` the row's
    /// log Σ exp when log-probabilities are asked. Draws the token
    /// [`Sampler::sample`] would draw from the whole row, from the same
    /// random stream.
    pub fn sample_top(
        &mut self,
        cands: &[(u32, f32)],
        vocab: usize,
        lse: Option<f32>,
    ) -> Result<(u32, Option<TokenLogprob>)> {
        if self.params.device_candidates(vocab).is_none() {
            return Err(Error::Internal(
                "these parameters need the whole row".into(),
            ));
        }
        // Fewer candidates than asked only when the row had fewer non-NaN
        // logits; none at all, and the host's argmax would give token 0.
        let best = cands.first().map_or(0, |c| c.0);
        let token = if self.params.is_greedy() {
            best
        } else {
            let u: f64 = self.rng.random();
            let k = self.params.top_k.min(cands.len());
            SCRATCH
                .with_borrow_mut(|s| {
                    s.cands.clear();
                    s.cands.extend_from_slice(&cands[..k]);
                    choose_among(&mut s.cands, &self.params, u)
                })
                .unwrap_or(best)
        };
        self.observe(token);
        let logprob = match (self.params.logprobs, lse) {
            (None, _) => None,
            (Some(n), Some(lse)) => {
                let raw = cands
                    .iter()
                    .find(|c| c.0 == token)
                    .map_or(f32::NEG_INFINITY, |c| c.1);
                Some(TokenLogprob {
                    token,
                    logprob: raw - lse,
                    top: cands[..n.min(cands.len())]
                        .iter()
                        .map(|&(t, l)| (t, l - lse))
                        .collect(),
                })
            }
            (Some(_), None) => {
                return Err(Error::Internal(
                    "log-probabilities without a normaliser".into(),
                ));
            }
        };
        Ok((token, logprob))
    }

    /// Applies the penalties; with `originals`, first records there the
    /// value of every entry it changes (the first record of a token wins).
    fn apply_penalties(&self, logits: &mut [f32], mut originals: Option<&mut Vec<(u32, f32)>>) {
        let p = &self.params;
        let mut save = |t: u32, l: f32| {
            if let Some(o) = originals.as_deref_mut() {
                o.push((t, l));
            }
        };
        if p.repetition_penalty != 1.0 {
            let rp = p.repetition_penalty;
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    save(t, *l);
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    save(t, *l);
                    *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
                }
            }
        }
    }
}

/// Buffers of one thread's draws. Per thread rather than per sequence: a
/// row of weights is 1 MiB at Gemma's vocabulary, and the engine samples on
/// a handful of threads but may run hundreds of sequences. Every draw
/// overwrites what it reads, so results do not depend on the thread.
#[derive(Default)]
struct Scratch {
    /// Weights e^((l − max)/T) of the whole row (0 for tokens cut).
    weights: Vec<f32>,
    /// Sum of each `BLOCK` of `weights`.
    blocks: Vec<f64>,
    /// Candidates (token, logit or weight) of top-k and top-p.
    cands: Vec<(u32, f32)>,
    /// Per block of the row: its largest logit and the sum of its weights
    /// relative to that logit (`draw_full`).
    peaks: Vec<(f32, f64)>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Tokens per block of the inverse-CDF scan: the scan adds block sums and
/// walks one block, about 1,300 additions for 262k tokens.
const BLOCK: usize = 1024;

/// Nucleus candidates tried before the threshold bisection (growing four
/// times at each try): most nuclei of real rows hold a few dozen to a few
/// hundred tokens.
const NUCLEUS_TRIES: [usize; 3] = [64, 256, 1024];

/// Above this k, top-k selects with `select_nth_unstable` instead of a heap.
const HEAP_MAX: usize = 4096;

/// Draws a token with `u` uniform in [0, 1): the distribution of `p` over
/// (penalised) `logits`. `None` when no token has a positive weight.
///
/// The target, over weights w = e^((l − max)/T): top-k keeps the k largest
/// logits (lower id first on ties); top-p keeps, in order of decreasing
/// weight (lower id first on ties), each token whose predecessors' mass is
/// below `top_p` of the mass left by top-k; min-p keeps weights ≥ `min_p`
/// (the best weighs 1); the draw is proportional to w over what is kept.
fn choose(logits: &[f32], p: &SamplingParams, u: f64, s: &mut Scratch) -> Option<u32> {
    // Weights are 2^((l − max)·scale), which is e^((l − max)/T).
    let scale = std::f32::consts::LOG2_E / p.temperature;
    let top_p = (p.top_p < 1.0).then_some(p.top_p as f64);
    if p.top_k > 0 && p.top_k < logits.len() {
        // Temperature does not change the order, so select on the logits.
        select_top(logits, p.top_k, &mut s.cands);
        return choose_among(&mut s.cands, p, u);
    }
    let Some(top_p) = top_p else {
        return draw_full(logits, scale, p.min_p, u, &mut s.peaks);
    };
    let max = max_of(logits);
    let total = weigh(logits, max, scale, &mut s.weights, &mut s.blocks);
    if !(total > 0.0 && total.is_finite()) {
        return None;
    }
    let target = top_p * total;
    for k in NUCLEUS_TRIES {
        let k = k.min(logits.len());
        select_top(&s.weights, k, &mut s.cands);
        let mass: f64 = s.cands.iter().map(|c| c.1 as f64).sum();
        if mass >= target || k == logits.len() {
            return cut_and_draw(&mut s.cands, Some(target), p.min_p, u);
        }
    }
    // A wide nucleus (a flat row): find its boundary weight without sorting.
    // The last try's lightest weight bounds it from above, as the best
    // 1,024 fall short.
    let hi = s.cands.iter().fold(f32::INFINITY, |m, c| m.min(c.1));
    let (tau, ties) = nucleus_boundary(&s.weights, target, hi);
    cut_dense(&mut s.weights, &mut s.blocks, tau, ties, p.min_p);
    draw_dense(&s.weights, &s.blocks, u)
}

/// The top-k draw over its candidates: `cands` holds the row's `top_k`
/// best (token, logit) pairs, in any order. They are put best first (see
/// [`best_first`]) before the draw, so the token drawn for `u` depends only
/// on the set: the host's selection and the device's
/// (`tensor::top_rows`) give the same token.
fn choose_among(cands: &mut Vec<(u32, f32)>, p: &SamplingParams, u: f64) -> Option<u32> {
    let scale = std::f32::consts::LOG2_E / p.temperature;
    cands.sort_unstable_by(best_first);
    let max = cands.first().map_or(f32::NEG_INFINITY, |c| c.1);
    for c in cands.iter_mut() {
        c.1 = pow2((c.1 - max) * scale);
    }
    let target =
        (p.top_p < 1.0).then(|| p.top_p as f64 * cands.iter().map(|c| c.1 as f64).sum::<f64>());
    cut_and_draw(cands, target, p.min_p, u)
}

/// 2^y for y ≤ 0 to about 2 ulp: `exp_fast`'s reduction and polynomial in
/// base 2, so that log₂e folds into 1/T (a fifth fewer operations per
/// token than e^x). Exactly 0 below −126 and for NaN: a masked −∞ logit
/// must never be drawn.
#[inline]
fn pow2(y: f32) -> f32 {
    use std::f32::consts::LN_2;
    let ok = y >= -126.0;
    let y = if ok { y.min(0.0) } else { -126.0 };
    let n = (y + 0.5).floor();
    // |r| ≤ ln2/2, where the Taylor polynomial of degree 6 is within 2 ulp.
    let r = (y - n) * LN_2;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // SAFETY: y is in [-126, 0], so n is an integer in [-126, 0].
    let n_i = unsafe { n.to_int_unchecked::<i32>() };
    let e = p * f32::from_bits(((n_i + 127) as u32) << 23);
    if ok { e } else { 0.0 }
}

/// Entropy (nats) of softmax(`row`): the model's own distribution, read
/// before penalties and temperature touch the row. Drift detection's
/// per-token signal, so it is cheap: two passes (the max, then Σeᵈ and
/// Σeᵈ·d in 16 lanes with `exp_fast`, which vectorize), no allocation.
pub fn row_entropy(row: &[f32]) -> f32 {
    const L: usize = 16;
    let m = max_of(row);
    if !m.is_finite() {
        return 0.0;
    }
    let (mut z, mut zd) = ([0f32; L], [0f32; L]);
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for ((z, zd), &x) in z.iter_mut().zip(&mut zd).zip(c) {
            // Masked (−∞) and NaN logits weigh e⁻⁸⁷ ≈ 0, never ∞ · 0.
            let d = (x - m).max(-87.0);
            let e = super::cpu::math::exp_fast(d);
            *z += e;
            *zd += e * d;
        }
    }
    let (mut zs, mut zds) = (0f64, 0f64);
    for &x in chunks.remainder() {
        let d = (x - m).max(-87.0);
        let e = super::cpu::math::exp_fast(d);
        zs += f64::from(e);
        zds += f64::from(e * d);
    }
    zs += z.iter().map(|&v| f64::from(v)).sum::<f64>();
    zds += zd.iter().map(|&v| f64::from(v)).sum::<f64>();
    if zs <= 0.0 {
        return 0.0;
    }
    (zs.ln() - zds / zs).max(0.0) as f32
}

/// The largest value, NaN ignored (−∞ when there is none). 64 lanes so
/// the loop vectorizes into independent chains (a plain `fold` is one
/// serial chain); `x > a` rather than `f32::max`, whose NaN rule costs
/// two more instructions per lane.
fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 64];
    let mut chunks = xs.chunks_exact(64);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    acc.iter().fold(m, |m, &x| m.max(x))
}

/// Sum of `xs` in f64, in 32 lanes so the loop vectorizes without waiting
/// on one register's additions.
fn sum_f64(xs: &[f32]) -> f64 {
    let mut acc = [0f64; 32];
    let mut chunks = xs.chunks_exact(32);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x as f64;
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&x| x as f64).sum();
    acc.iter().sum::<f64>() + tail
}

/// Sum of the weights above `t` (Σ w for w > t), 32 lanes.
fn mass_above(w: &[f32], t: f32) -> f64 {
    let mut acc = [0f64; 32];
    let mut chunks = w.chunks_exact(32);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += if x > t { x as f64 } else { 0.0 };
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .filter(|&&x| x > t)
        .map(|&x| x as f64)
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// Writes the weights 2^((l − max)·scale) of `logits` into `w` and each
/// block's sum into `blocks`; returns the total.
fn weigh(logits: &[f32], max: f32, scale: f32, w: &mut Vec<f32>, blocks: &mut Vec<f64>) -> f64 {
    // Every entry is written below; resizing only when the vocabulary
    // changes saves a pass of zeroes.
    w.resize(logits.len(), 0.0);
    blocks.clear();
    for (out, chunk) in w.chunks_mut(BLOCK).zip(logits.chunks(BLOCK)) {
        for (o, &l) in out.iter_mut().zip(chunk) {
            *o = pow2((l - max) * scale);
        }
        blocks.push(sum_f64(out));
    }
    blocks.iter().sum()
}

/// Draws from the whole distribution (no top-k or top-p; min-p allowed)
/// without storing weights: per block, its max and its weights' sum
/// relative to that max, so that the row is read once (each block is
/// still in L1 for its second look); the draw then recomputes one block.
/// min-p needs the row's max first, so then every block uses it.
fn draw_full(
    logits: &[f32],
    scale: f32,
    min_p: f32,
    u: f64,
    peaks: &mut Vec<(f32, f64)>,
) -> Option<u32> {
    let row_max = (min_p > 0.0).then(|| max_of(logits));
    let floor = if min_p > 0.0 { min_p } else { 0.0 };
    peaks.clear();
    for chunk in logits.chunks(BLOCK) {
        let m = row_max.unwrap_or_else(|| max_of(chunk));
        peaks.push((m, block_mass(chunk, m, scale, floor)));
    }
    let max = peaks
        .iter()
        .fold(f32::NEG_INFINITY, |a, &(m, _)| if m > a { m } else { a });
    // A block's weight relative to the row's max, 0 for a block of
    // nothing but −∞ or NaN.
    let factor = |m: f32, sum: f64| {
        if sum > 0.0 {
            sum * f64::from(pow2((m - max) * scale))
        } else {
            0.0
        }
    };
    let total: f64 = peaks.iter().map(|&(m, sum)| factor(m, sum)).sum();
    if !(total > 0.0 && total.is_finite()) {
        return None;
    }
    let target = u * total;
    let mut acc = 0.0;
    let mut last = None;
    for (b, &(m, sum)) in peaks.iter().enumerate() {
        let mass = factor(m, sum);
        if mass > 0.0 {
            last = Some(b);
        }
        if acc + mass > target {
            return pick_in_block(logits, b, m, scale, floor, (target - acc) / mass * sum);
        }
        acc += mass;
    }
    // Rounding: the target sits in the last bits of the total.
    let b = last?;
    let (m, sum) = peaks[b];
    pick_in_block(logits, b, m, scale, floor, sum)
}

/// Sum of a block's weights 2^((l − m)·scale), those below `floor` left out.
fn block_mass(chunk: &[f32], m: f32, scale: f32, floor: f32) -> f64 {
    let mut acc = [0f64; 32];
    let w = |l: f32| {
        let e = pow2((l - m) * scale);
        if e >= floor { e } else { 0.0 }
    };
    let mut lanes = chunk.chunks_exact(32);
    for c in &mut lanes {
        for (a, &l) in acc.iter_mut().zip(c) {
            *a += f64::from(w(l));
        }
    }
    let tail: f64 = lanes.remainder().iter().map(|&l| f64::from(w(l))).sum();
    acc.iter().sum::<f64>() + tail
}

/// In block `b` (weights relative to `m`), the token where the running sum
/// first exceeds `target`; the block's last token with weight if rounding
/// leaves the target just out of reach.
fn pick_in_block(
    logits: &[f32],
    b: usize,
    m: f32,
    scale: f32,
    floor: f32,
    target: f64,
) -> Option<u32> {
    let start = b * BLOCK;
    let chunk = &logits[start..(start + BLOCK).min(logits.len())];
    let mut acc = 0.0;
    let mut last = None;
    for (i, &l) in chunk.iter().enumerate() {
        let e = pow2((l - m) * scale);
        if e >= floor && e > 0.0 {
            acc += f64::from(e);
            last = Some(i);
            if acc > target {
                return Some((start + i) as u32);
            }
        }
    }
    last.map(|i| (start + i) as u32)
}

/// Inverse CDF over dense weights: the token where the running sum first
/// exceeds `u` times the total, found by adding block sums and then
/// walking one block.
fn draw_dense(w: &[f32], blocks: &[f64], u: f64) -> Option<u32> {
    let total: f64 = blocks.iter().sum();
    if !(total > 0.0 && total.is_finite()) {
        return None;
    }
    let target = u * total;
    let mut acc = 0.0;
    for (b, &sum) in blocks.iter().enumerate() {
        if acc + sum > target {
            let start = b * BLOCK;
            let block = &w[start..(start + BLOCK).min(w.len())];
            for (i, &x) in block.iter().enumerate() {
                acc += x as f64;
                if acc > target {
                    return Some((start + i) as u32);
                }
            }
            // The lane-ordered block sum passed the target and the running
            // sum did not (the last bits of rounding): the block's last
            // token with weight.
            return block
                .iter()
                .rposition(|&x| x > 0.0)
                .map(|i| (start + i) as u32);
        }
        acc += sum;
    }
    // Rounding again, with the target in the last bits of the total.
    let b = blocks.iter().rposition(|&sum| sum > 0.0)?;
    let start = b * BLOCK;
    w[start..(start + BLOCK).min(w.len())]
        .iter()
        .rposition(|&x| x > 0.0)
        .map(|i| (start + i) as u32)
}

/// Best first: larger value, then lower id. The values are never NaN here
/// (selection skips them), so this is a total order; ±0 are equal, as for
/// the `>` tests of the heap's fast path.
pub(crate) fn best_first(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.partial_cmp(&a.1)
        .unwrap_or(Ordering::Equal)
        .then(a.0.cmp(&b.0))
}

/// A heap entry ordered so that the heap's top is the worst candidate.
struct Worst((u32, f32));

impl PartialEq for Worst {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Worst {
    fn cmp(&self, o: &Self) -> Ordering {
        best_first(&self.0, &o.0)
    }
}

/// The `k` best entries of `xs` by [`best_first`] (NaN skipped) into
/// `out`, in no particular order (but always the same one).
fn select_top(xs: &[f32], k: usize, out: &mut Vec<(u32, f32)>) {
    count_ordered_work();
    out.clear();
    if k == 0 {
        return;
    }
    let entries = xs
        .iter()
        .enumerate()
        .filter(|(_, x)| !x.is_nan())
        .map(|(i, &x)| (i as u32, x));
    if k > HEAP_MAX {
        out.extend(entries);
        if k < out.len() {
            out.select_nth_unstable_by(k - 1, best_first);
            out.truncate(k);
        }
        return;
    }
    // The k best so far with the worst on top. Later entries come with
    // higher ids, so one only enters by being strictly larger than the worst,
    // and most chunks are passed over after one vectorized comparison.
    let mut heap = BinaryHeap::with_capacity(k);
    let mut next = xs.len();
    for (i, x) in entries {
        heap.push(Worst((i, x)));
        if heap.len() == k {
            next = i as usize + 1;
            break;
        }
    }
    if next < xs.len()
        && let Some(mut worst) = heap.peek().map(|w| w.0.1)
    {
        // Offers a chunk's entries (ids from `start`) to the heap.
        fn visit(heap: &mut BinaryHeap<Worst>, worst: &mut f32, start: usize, chunk: &[f32]) {
            for (j, &x) in chunk.iter().enumerate() {
                if x > *worst {
                    if let Some(mut top) = heap.peek_mut() {
                        *top = Worst(((start + j) as u32, x));
                    }
                    *worst = heap.peek().map_or(*worst, |w| w.0.1);
                }
            }
        }
        let mut chunks = xs[next..].chunks_exact(32);
        let mut start = next;
        for chunk in &mut chunks {
            let mut any = 0u32;
            for &x in chunk {
                any |= u32::from(x > worst);
            }
            if any != 0 {
                visit(&mut heap, &mut worst, start, chunk);
            }
            start += 32;
        }
        visit(&mut heap, &mut worst, start, chunks.remainder());
    }
    out.extend(heap.into_vec().into_iter().map(|w| w.0));
}

/// From candidates (token, weight): with `target`, sorts them and keeps the
/// top-p prefix (each token whose predecessors weigh less than `target`);
/// then drops weights below `min_p`; then draws.
fn cut_and_draw(
    cands: &mut Vec<(u32, f32)>,
    target: Option<f64>,
    min_p: f32,
    u: f64,
) -> Option<u32> {
    if let Some(target) = target {
        count_ordered_work();
        cands.sort_unstable_by(best_first);
        let mut cum = 0.0;
        let keep = cands
            .iter()
            .take_while(|c| {
                let before = cum;
                cum += c.1 as f64;
                before < target
            })
            .count();
        cands.truncate(keep.max(1));
    }
    if min_p > 0.0 {
        // The best token weighs 1 ≥ min_p, so one always stays.
        cands.retain(|c| c.1 >= min_p);
    }
    let total: f64 = cands.iter().map(|c| c.1 as f64).sum();
    if !(total > 0.0 && total.is_finite()) {
        return None;
    }
    let target = u * total;
    let mut acc = 0.0;
    for c in cands.iter() {
        acc += c.1 as f64;
        if acc > target {
            return Some(c.0);
        }
    }
    cands.iter().rev().find(|c| c.1 > 0.0).map(|c| c.0)
}

/// The boundary of a nucleus of mass `target` over dense weights, found by
/// bisection on the bits of the threshold (non-negative floats order as
/// their bits): the weight τ of its last token and how many tokens
/// weighing exactly τ it takes (the lowest ids). Every heavier token is in.
/// Needs Σ w > target > Σ_{w > hi} w.
fn nucleus_boundary(w: &[f32], target: f64, hi: f32) -> (f32, usize) {
    // The smallest t with Σ_{w > t} w < target: then every token above t
    // has predecessors lighter than the target, and since one step below t
    // the sum reaches it, t is the weight of the last token in.
    let (mut lo, mut hi) = (0u32, hi.to_bits());
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if mass_above(w, f32::from_bits(mid)) < target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let tau = f32::from_bits(hi);
    let above = mass_above(w, tau);
    let tied = w.iter().filter(|&&x| x == tau).count();
    let mut take = 0;
    while take < tied && above + take as f64 * f64::from(tau) < target {
        take += 1;
    }
    (tau, take.max(1))
}

/// Zeroes the weights outside the nucleus (below `tau`, or tied at `tau`
/// past the first `ties`) and below `min_p`, and recomputes block sums.
fn cut_dense(w: &mut [f32], blocks: &mut Vec<f64>, tau: f32, ties: usize, min_p: f32) {
    let floor = tau.max(min_p);
    for x in w.iter_mut() {
        if *x < floor {
            *x = 0.0;
        }
    }
    if tau >= min_p {
        let mut seen = 0;
        for x in w.iter_mut().filter(|x| **x == tau) {
            seen += 1;
            if seen > ties {
                *x = 0.0;
            }
        }
    }
    blocks.clear();
    blocks.extend(w.chunks(BLOCK).map(sum_f64));
}

/// Index of the largest logit (lowest index on ties, NaN ignored; 0 when
/// nothing is above −∞). The max is found in a vectorized pass, then its
/// first position.
pub fn argmax(logits: &[f32]) -> u32 {
    let max = max_of(logits);
    if max == f32::NEG_INFINITY {
        return 0;
    }
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// Log-sum-exp of the logits and the `n` most likely tokens' log-probabilities.
fn top_logprobs(logits: &[f32], n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = max_of(logits);
    let sum: f64 = logits
        .chunks(BLOCK)
        .map(|c| {
            let mut acc = [0f64; 8];
            let mut lanes = c.chunks_exact(8);
            for l in &mut lanes {
                for (a, &x) in acc.iter_mut().zip(l) {
                    *a += pow2((x - max) * std::f32::consts::LOG2_E) as f64;
                }
            }
            let tail: f64 = lanes
                .remainder()
                .iter()
                .map(|&x| pow2((x - max) * std::f32::consts::LOG2_E) as f64)
                .sum();
            acc.iter().sum::<f64>() + tail
        })
        .sum();
    let lse = max + (sum as f32).ln();
    let mut top = vec![];
    select_top(logits, n.min(logits.len()), &mut top);
    top.sort_unstable_by(best_first);
    (lse, top.into_iter().map(|(t, l)| (t, l - lse)).collect())
}

/// One position of a teacher-forced score: how likely the model found the
/// token that was actually there, what it would have picked, and its
/// log-probabilities of a few other tokens (a reference's top-k).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PositionScore {
    /// Log-probability of the given token.
    pub logprob: f32,
    /// The model's most likely token here.
    pub top1: u32,
    /// Log-probabilities of the probe tokens, in the order asked.
    pub probes: Vec<f32>,
}

/// Scores `token` (and `probes`) against one row of raw logits: the model's
/// own log-probabilities, before any penalty or temperature.
pub fn score_row(row: &[f32], token: u32, probes: &[u32]) -> PositionScore {
    let (lse, top) = top_logprobs(row, 1);
    let at = |t: u32| row.get(t as usize).map_or(f32::NEG_INFINITY, |l| l - lse);
    PositionScore {
        logprob: at(token),
        top1: top.first().map_or(0, |t| t.0),
        probes: probes.iter().map(|&t| at(t)).collect(),
    }
}

/// Counts sorts and selections in tests, to show which paths avoid them.
#[cfg(test)]
fn count_ordered_work() {
    tests::ORDERED_WORK.with(|c| c.set(c.get() + 1));
}

#[cfg(not(test))]
#[inline(always)]
fn count_ordered_work() {}

#[cfg(test)]
mod tests {

    #[test]
    fn row_entropy_is_the_softmax_entropy() {
        assert!((row_entropy(&[0.0; 100]) - 100f32.ln()).abs() < 1e-5);
        assert!(row_entropy(&[100.0, 0.0, 0.0]) < 1e-6);
        let row: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 * 0.05).collect();
        let z: f64 = row.iter().map(|&x| f64::from(x).exp()).sum();
        let want: f64 = row
            .iter()
            .map(|&x| {
                let p = f64::from(x).exp() / z;
                -p * p.ln()
            })
            .sum();
        assert!((f64::from(row_entropy(&row)) - want).abs() < 1e-4);
        let mut masked = row.clone();
        masked[3] = f32::NEG_INFINITY;
        masked[7] = f32::NAN;
        assert!(row_entropy(&masked).is_finite());
    }

    use std::cell::Cell;

    use rayon::prelude::*;

    use super::*;

    thread_local! {
        /// Sorts and selections run on this thread (see `count_ordered_work`).
        pub(super) static ORDERED_WORK: Cell<usize> = const { Cell::new(0) };
    }

    fn ordered_work() -> usize {
        ORDERED_WORK.with(Cell::get)
    }

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed: Some(7),
            ..Default::default()
        }
    }

    /// A smallest gap allowed between a cut and the quantity it compares,
    /// relative: closer than this, f32 weights and the f64 reference could
    /// disagree, and the case (not the sampler) would be wrong.
    const MARGIN: f64 = 1e-5;

    /// The target distribution of `choose`'s doc, computed independently in
    /// f64 with a full sort.
    fn target(logits: &[f32], p: &SamplingParams) -> Vec<f64> {
        let n = logits.len();
        let mut ids: Vec<usize> = (0..n).collect();
        ids.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 && p.top_k < n {
            ids.truncate(p.top_k);
        }
        let max = logits[ids[0]] as f64;
        let t = p.temperature as f64;
        let w: Vec<(usize, f64)> = ids
            .iter()
            .map(|&i| (i, ((logits[i] as f64 - max) / t).exp()))
            .collect();
        let total: f64 = w.iter().map(|x| x.1).sum();
        let mass = p.top_p as f64 * total;
        let mut kept = vec![];
        let mut cum = 0.0;
        for &(i, wi) in &w {
            if p.top_p < 1.0 {
                assert!(
                    (cum - mass).abs() > MARGIN * total,
                    "the top-p cut is borderline"
                );
                if !kept.is_empty() && cum >= mass {
                    break;
                }
            }
            cum += wi;
            kept.push((i, wi));
        }
        if p.min_p > 0.0 {
            for &(_, wi) in &kept {
                assert!((wi - p.min_p as f64).abs() > MARGIN, "min-p is borderline");
            }
            kept.retain(|&(_, wi)| wi >= p.min_p as f64);
        }
        let z: f64 = kept.iter().map(|x| x.1).sum();
        let mut probs = vec![0.0; n];
        for (i, wi) in kept {
            probs[i] = wi / z;
        }
        probs
    }

    #[test]
    fn a_draw_from_the_devices_best_logits_is_the_draw_from_the_whole_row() {
        // Rows with ties (also at the k-th place) and NaN; for each setting
        // the device can serve, two samplers with one seed: one draws from
        // the whole row, the other from the row's best (as
        // `tensor::top_rows` returns them). Same tokens, same log-probs.
        let vocab = 3_000;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let settings = [
            (0.0, 0, 1.0, 0.0, Some(5)),
            (0.8, 40, 1.0, 0.0, None),
            (1.3, 7, 0.9, 0.0, Some(2)),
            (0.5, 200, 0.95, 0.05, Some(20)),
            (1.0, 256, 1.0, 0.1, None),
            (0.7, 1, 1.0, 0.0, Some(3)),
        ];
        for (temperature, top_k, top_p, min_p, logprobs) in settings {
            let p = SamplingParams {
                logprobs,
                ..params(temperature, top_k, top_p, min_p)
            };
            let want = p.device_candidates(vocab).expect("a device draw");
            let (mut whole, mut device) =
                (Sampler::new(p.clone(), &[]), Sampler::new(p.clone(), &[]));
            for step in 0..200 {
                let row: Vec<f32> = (0..vocab)
                    .map(|_| match rng.random_range(0..200) {
                        0 => f32::NAN,
                        r => (r % 37) as f32 * 0.25,
                    })
                    .collect();
                let mut cands: Vec<(u32, f32)> = (0u32..)
                    .zip(row.iter().copied())
                    .filter(|c| !c.1.is_nan())
                    .collect();
                cands.sort_by(best_first);
                cands.truncate(want);
                let lse = logprobs.map(|_| top_logprobs(&row, 1).0);
                let a = whole.sample(&mut row.clone()).unwrap();
                let b = device.sample_top(&cands, vocab, lse).unwrap();
                assert_eq!(a, b, "{p:?}, step {step}");
            }
        }
        // What the device cannot serve: the whole row, penalties, too many.
        assert_eq!(params(0.8, 0, 1.0, 0.0).device_candidates(vocab), None);
        assert_eq!(params(0.8, 257, 1.0, 0.0).device_candidates(vocab), None);
        assert_eq!(params(0.8, 40, 1.0, 0.0).device_candidates(40), None);
        let penalised = SamplingParams {
            presence_penalty: 0.5,
            ..params(0.0, 0, 1.0, 0.0)
        };
        assert_eq!(penalised.device_candidates(vocab), None);
        assert_eq!(params(0.0, 0, 1.0, 0.0).device_candidates(vocab), Some(1));
    }

    /// Upper 0.001 point of χ² with `df` degrees of freedom
    /// (Wilson–Hilferty; slightly above the exact value for df ≤ 2).
    fn chi2_critical_001(df: usize) -> f64 {
        let d = df as f64;
        let z = 3.090_232;
        let a = 2.0 / (9.0 * d);
        d * (1.0 - a + z * a.sqrt()).powi(3)
    }

    /// Pearson's statistic and its degrees of freedom; tokens expected
    /// fewer than 5 times are pooled into one bin. A token outside the
    /// support fails at once: a cut that leaks is not a matter of chance.
    fn chi_square(counts: &[u64], probs: &[f64], draws: u64) -> (f64, usize) {
        let mut bins: Vec<(f64, f64)> = vec![];
        let (mut pool_obs, mut pool_exp) = (0.0, 0.0);
        for (i, (&c, &p)) in counts.iter().zip(probs).enumerate() {
            if p == 0.0 {
                assert_eq!(c, 0, "token {i} lies outside the kept set but was drawn");
                continue;
            }
            let e = p * draws as f64;
            if e < 5.0 {
                pool_obs += c as f64;
                pool_exp += e;
            } else {
                bins.push((c as f64, e));
            }
        }
        if pool_exp > 0.0 {
            if pool_exp >= 5.0 || bins.is_empty() {
                bins.push((pool_obs, pool_exp));
            } else {
                bins.sort_by(|a, b| a.1.total_cmp(&b.1));
                bins[0].0 += pool_obs;
                bins[0].1 += pool_exp;
            }
        }
        let stat = bins.iter().map(|(o, e)| (o - e) * (o - e) / e).sum();
        (stat, bins.len().saturating_sub(1))
    }

    /// Twelve logits with ties (ids 2 and 4 at the top, 6 and 11 in the
    /// middle) so that top-k and top-p cuts inside a tie are exercised.
    const SMALL: [f32; 12] = [
        1.3, -0.4, 2.1, 0.2, 2.1, -1.7, 0.9, -0.1, 1.6, -2.6, 0.5, 0.9,
    ];

    /// 4,096 logits on 61 levels between 0 and 2, about 67 tokens per
    /// level: a flat row whose nuclei outgrow the 1,024 best, so top-p takes
    /// the bisection, with its boundary inside a tie.
    fn flat_row() -> Vec<f32> {
        (0..4096u32)
            .map(|i| ((i * 7919) % 61) as f32 / 30.0)
            .collect()
    }

    fn check_distribution(logits: &[f32], p: &SamplingParams, draws: u64) {
        let probs = target(logits, p);
        let mut s = Sampler::new(p.clone(), &[]);
        let mut row = logits.to_vec();
        let mut counts = vec![0u64; logits.len()];
        for _ in 0..draws {
            let (t, _) = s.sample(&mut row).expect("sample");
            counts[t as usize] += 1;
        }
        let (stat, df) = chi_square(&counts, &probs, draws);
        if df == 0 {
            return; // one token kept, and `chi_square` saw no other drawn
        }
        let crit = chi2_critical_001(df);
        assert!(
            stat < crit,
            "T {} top_k {} top_p {} min_p {}: χ² {stat:.1} ≥ {crit:.1} (df {df})",
            p.temperature,
            p.top_k,
            p.top_p,
            p.min_p
        );
    }

    #[test]
    fn draws_follow_the_exact_target_for_every_combination_of_cuts() {
        // (temperature, top_k, top_p, min_p)
        let cases: [(f32, usize, f32, f32); 18] = [
            (1.0, 0, 1.0, 0.0),
            (0.8, 0, 1.0, 0.0),
            (1.5, 0, 1.0, 0.0),
            (0.5, 0, 1.0, 0.0),
            (0.8, 5, 1.0, 0.0), // the cut falls between the tied ids 6 and 11
            (0.8, 0, 0.2, 0.0), // the cut falls between the tied best, ids 2 and 4
            (0.8, 7, 1.0, 0.0),
            (0.8, 0, 0.9, 0.0),
            (0.8, 0, 0.5, 0.0),
            (1.2, 0, 0.75, 0.0),
            (0.8, 0, 1.0, 0.05),
            (0.8, 0, 1.0, 0.3),
            (0.8, 6, 0.8, 0.0),
            (0.8, 6, 1.0, 0.1),
            (0.8, 0, 0.9, 0.1),
            (1.0, 8, 0.9, 0.05),
            (0.7, 5, 0.6, 0.2),
            (2.0, 3, 0.95, 0.5),
        ];
        for (t, k, tp, mp) in cases {
            check_distribution(&SMALL, &params(t, k, tp, mp), 40_000);
        }
    }

    #[test]
    fn wide_nuclei_found_by_bisection_follow_the_exact_target() {
        let row = flat_row();
        let cases: [(f32, usize, f32, f32); 4] = [
            (0.8, 0, 0.9, 0.0),
            (0.8, 0, 0.6, 0.0),
            (0.8, 0, 0.9, 0.2),
            (1.5, 0, 0.803, 0.0),
        ];
        for (t, k, tp, mp) in cases {
            let p = params(t, k, tp, mp);
            // The best 1,024 weigh less than top_p of the row: the bisection runs.
            let mut w: Vec<f64> = row
                .iter()
                .map(|&l| ((l as f64 - 2.0) / t as f64).exp())
                .collect();
            w.sort_by(|a, b| b.total_cmp(a));
            let total: f64 = w.iter().sum();
            assert!(w[..1024].iter().sum::<f64>() < tp as f64 * total);
            check_distribution(&row, &p, 30_000);
        }
        // The full distribution over the same row, and over one whose
        // blocks (of 1,024) peak at different heights.
        check_distribution(&row, &params(0.8, 0, 1.0, 0.0), 30_000);
        let uneven: Vec<f32> = row
            .iter()
            .enumerate()
            .map(|(i, &l)| l - (i / BLOCK) as f32 * 0.7)
            .collect();
        check_distribution(&uneven, &params(0.8, 0, 1.0, 0.0), 30_000);
        check_distribution(&uneven, &params(1.3, 0, 1.0, 0.15), 30_000);
    }

    #[test]
    fn top_p_one_without_top_k_neither_sorts_nor_selects() {
        let row = flat_row();
        let cases = [
            params(0.8, 0, 1.0, 0.0),
            params(0.8, 0, 1.0, 0.05),
            SamplingParams {
                repetition_penalty: 1.2,
                presence_penalty: 0.5,
                frequency_penalty: 0.3,
                ..params(0.8, 0, 1.0, 0.0)
            },
        ];
        for p in cases {
            let before = ordered_work();
            let mut s = Sampler::new(p, &[1, 2, 3]);
            for _ in 0..100 {
                s.sample(&mut row.clone()).expect("sample");
            }
            assert_eq!(ordered_work(), before, "a sort or selection ran");
        }
        // The counter is live: top-p below 1 and top-k do select.
        for p in [params(0.8, 0, 0.95, 0.0), params(0.8, 40, 1.0, 0.0)] {
            let before = ordered_work();
            Sampler::new(p, &[])
                .sample(&mut row.clone())
                .expect("sample");
            assert!(ordered_work() > before);
        }
    }

    /// Samples `steps` tokens from rows that depend on the step, with
    /// penalties so the state carried between steps matters.
    fn run(s: &mut Sampler, step: usize) -> u32 {
        let mut row: Vec<f32> = (0..4096u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ step as u32) % 1000) as f32 / 250.0)
            .collect();
        s.sample(&mut row).expect("sample").0
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens_alone_interleaved_and_across_threads() {
        let cases = [
            params(0.8, 0, 1.0, 0.0),
            params(0.8, 40, 1.0, 0.0),
            params(0.8, 0, 0.95, 0.0),
            params(0.8, 0, 0.5, 0.0),
            params(0.8, 0, 1.0, 0.05),
        ];
        let make = |seed: u64| -> Vec<Sampler> {
            cases
                .iter()
                .map(|p| {
                    Sampler::new(
                        SamplingParams {
                            seed: Some(seed),
                            repetition_penalty: 1.1,
                            presence_penalty: 0.2,
                            ..p.clone()
                        },
                        &[1, 2, 3],
                    )
                })
                .collect()
        };
        let steps = 40;
        // Alone: one sampler at a time.
        let alone: Vec<Vec<u32>> = make(3)
            .iter_mut()
            .map(|s| (0..steps).map(|i| run(s, i)).collect())
            .collect();
        // Interleaved, as in a batch on one thread.
        let mut batch = make(3);
        let mut interleaved = vec![vec![]; batch.len()];
        for i in 0..steps {
            for (s, out) in batch.iter_mut().zip(&mut interleaved) {
                out.push(run(s, i));
            }
        }
        // In parallel, as the engine thread's rayon loop does.
        let mut batch = make(3);
        let mut parallel = vec![vec![]; batch.len()];
        for i in 0..steps {
            batch
                .par_iter_mut()
                .zip(parallel.par_iter_mut())
                .with_min_len(1)
                .for_each(|(s, out)| out.push(run(s, i)));
        }
        assert_eq!(alone, interleaved);
        assert_eq!(alone, parallel);
        let other: Vec<Vec<u32>> = make(4)
            .iter_mut()
            .map(|s| (0..steps).map(|i| run(s, i)).collect())
            .collect();
        assert_ne!(alone, other, "another seed should give other tokens");
    }

    /// The argmax of the code before the one-pass sampler.
    fn argmax_before(logits: &[f32]) -> u32 {
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

    #[test]
    fn greedy_picks_the_same_token_as_before_ties_nan_and_infinities_included() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let special = [
            f32::NAN,
            f32::NEG_INFINITY,
            f32::INFINITY,
            0.0,
            -0.0,
            3.0,
            -3.0,
        ];
        for case in 0..2000 {
            let n = 1 + case % 300;
            let row: Vec<f32> = (0..n)
                .map(|_| match rng.random_range(0..10) {
                    0..=2 => special[rng.random_range(0..special.len())],
                    _ => rng.random_range(-4..4) as f32 * 0.5,
                })
                .collect();
            assert_eq!(argmax(&row), argmax_before(&row), "row {row:?}");
        }
        assert_eq!(argmax(&[f32::NAN; 5]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NAN, 1.0, 1.0]), 2);
        // Temperature 0 and top-k 1 are greedy over the penalised row.
        let row: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let best = argmax(&row);
        for p in [params(0.0, 0, 1.0, 0.0), params(0.8, 1, 0.5, 0.1)] {
            let mut s = Sampler::new(p, &[]);
            assert_eq!(s.sample(&mut row.clone()).expect("sample").0, best);
        }
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 4.0,
                ..params(0.0, 0, 1.0, 0.0)
            },
            &[best],
        );
        let mut penalised = row.clone();
        let t = s.sample(&mut penalised).expect("sample").0;
        assert_ne!(t, best);
        assert_eq!(t, argmax_before(&penalised));
    }

    #[test]
    fn selection_matches_a_full_sort_for_every_k() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for n in [1usize, 15, 16, 17, 300, 10_000] {
            let xs: Vec<f32> = (0..n)
                .map(|_| {
                    if rng.random_range(0..50) == 0 {
                        f32::NAN
                    } else {
                        rng.random_range(-20..20) as f32 / 4.0
                    }
                })
                .collect();
            let mut all: Vec<(u32, f32)> = xs
                .iter()
                .enumerate()
                .filter(|(_, x)| !x.is_nan())
                .map(|(i, &x)| (i as u32, x))
                .collect();
            all.sort_by(best_first);
            for k in [1usize, 2, 40, 64, 512, 5000, 20_000] {
                let mut got = vec![];
                select_top(&xs, k, &mut got);
                got.sort_by(best_first);
                assert_eq!(got, all[..k.min(all.len())], "n {n} k {k}");
            }
        }
    }

    #[test]
    fn logprobs_are_the_models_own_before_penalties_and_temperature() {
        let row: Vec<f32> = (0..3000u32)
            .map(|i| ((i * 31) % 997) as f32 / 150.0)
            .collect();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let mut best: Vec<(u32, f32)> = row
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        best.sort_by(best_first);
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 1.5,
                presence_penalty: 1.0,
                logprobs: Some(3),
                ..params(0.7, 0, 0.9, 0.0)
            },
            &[best[0].0],
        );
        for _ in 0..20 {
            let (t, lp) = s.sample(&mut row.clone()).expect("sample");
            let lp = lp.expect("logprobs asked for");
            assert_eq!(lp.token, t);
            let want = row[t as usize] as f64 - lse;
            assert!(
                (lp.logprob as f64 - want).abs() < 1e-4,
                "{} vs {want}",
                lp.logprob
            );
            assert_eq!(lp.top.len(), 3);
            for ((tok, l), (want_tok, want_l)) in lp.top.iter().zip(&best) {
                assert_eq!(tok, want_tok);
                assert!((*l as f64 - (*want_l as f64 - lse)).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn a_token_in_both_prompt_and_output_is_penalised_once() {
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..params(0.0, 0, 1.0, 0.0)
            },
            &[3, 3, 5],
        );
        s.observe(3);
        s.observe(3);
        s.observe(7);
        let mut row = vec![0.0f32; 10];
        row[3] = 4.0;
        row[5] = -1.0;
        row[7] = 6.0;
        row[9] = 1.0;
        s.sample(&mut row).expect("sample");
        assert_eq!((row[3], row[5], row[7], row[9]), (2.0, -2.0, 3.0, 1.0));
    }

    #[test]
    fn presence_and_frequency_penalties_count_each_occurrence() {
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 0.5,
                frequency_penalty: 0.25,
                ..params(0.0, 0, 1.0, 0.0)
            },
            &[1],
        );
        for t in [2, 2, 2, 4] {
            s.observe(t);
        }
        let mut row = vec![1.0f32; 8];
        s.sample(&mut row).expect("sample");
        assert_eq!(
            (row[1], row[2], row[4]),
            (1.0, 1.0 - 0.75 - 0.5, 1.0 - 0.25 - 0.5)
        );
    }

    #[test]
    fn rows_without_a_finite_logit_fall_back_to_greedy() {
        for p in [
            params(0.8, 0, 1.0, 0.0),
            params(0.8, 0, 0.9, 0.0),
            params(0.8, 3, 0.9, 0.1),
        ] {
            let mut s = Sampler::new(p, &[]);
            assert_eq!(
                s.sample(&mut vec![f32::NEG_INFINITY; 700])
                    .expect("sample")
                    .0,
                0
            );
            assert_eq!(s.sample(&mut vec![f32::NAN; 700]).expect("sample").0, 0);
            let mut row = vec![f32::NEG_INFINITY; 700];
            row[600] = 1.0;
            row[3] = f32::NAN;
            assert_eq!(s.sample(&mut row).expect("sample").0, 600);
        }
        // A temperature whose inverse overflows is greedy too.
        let mut s = Sampler::new(params(1e-39, 0, 1.0, 0.0), &[]);
        let mut row = vec![0.5f32; 100];
        row[42] = 0.6;
        assert_eq!(s.sample(&mut row).expect("sample").0, 42);
        assert!(
            Sampler::new(params(0.8, 0, 1.0, 0.0), &[])
                .sample(&mut [])
                .is_err()
        );
    }
}
