//! Engine-only decode throughput (`llmops bench-engine`): a batch of
//! sequences decoding in lock-step, no scheduler, no server.

use std::time::Instant;

use super::cpu::limits::Limits;
use super::{Batch, BlockAllocator, EnginePath, LoadedModel, Logits, Result, Scratch, sampling};

/// How each step's tokens are picked, which decides what the tensor path
/// copies back from the device: ids, each row's best logits, or whole rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pick {
    /// The argmax (on the device on the tensor path): greedy requests.
    #[default]
    Argmax,
    /// Each row's best [`TOP_K`] (token, logit) pairs (selected on the
    /// device on the tensor path), the argmax taken from them: top-k
    /// sampled requests.
    TopK,
    /// The whole row of logits, the argmax taken on the host: sampled
    /// requests over the whole vocabulary.
    Row,
}

/// The k of [`Pick::TopK`] (llama.cpp's default top_k).
pub const TOP_K: usize = 40;

/// One measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodeBench {
    /// Sequences per step.
    pub batch: usize,
    /// How tokens were picked.
    pub pick: Pick,
    /// Decode steps timed.
    pub steps: usize,
    /// Generated tokens per second over the timed steps.
    pub tokens_per_second: f64,
    /// Mean time per step in milliseconds.
    pub step_ms: f64,
    /// With `cpu::profile` enabled: milliseconds per step in each part of
    /// the forward pass (the rest of `step_ms` is argmax and batch building).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub profile_ms: Vec<(&'static str, f64)>,
    /// The machine's limits measured just before this run, and the
    /// fractions of them reached (see [`DecodeBench::against`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsReached>,
}

/// Throughput as fractions of the machine's limits (DESIGN.md, "Physical
/// limits"), measured in the same minute.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LimitsReached {
    /// What the machine did just before the run.
    pub measured: Limits,
    /// Tokens/s over the bandwidth bound: one step reads every matrix
    /// weight once, so a single stream can do at most read bandwidth /
    /// weight bytes tokens per second.
    pub bandwidth_bound_fraction: f64,
    /// Tokens/s over the FLOP bound, FMA throughput / (2 · parameters).
    pub flop_bound_fraction: Option<f64>,
}

impl DecodeBench {
    /// Adds the fractions of `measured` reached by a model holding
    /// `weight_bytes` of matrices and `parameters` parameters.
    pub fn against(&mut self, measured: Limits, weight_bytes: usize, parameters: usize) {
        let bandwidth_bound = measured.read_bytes_per_s / weight_bytes.max(1) as f64;
        self.limits = Some(LimitsReached {
            measured,
            bandwidth_bound_fraction: self.tokens_per_second / bandwidth_bound,
            flop_bound_fraction: measured
                .fma_flop_per_s
                .map(|f| self.tokens_per_second * 2.0 * parameters as f64 / f),
        });
    }
}

/// Prefills `batch` prompts of `prompt_len` tokens, then times `steps`
/// greedy decode steps of the whole batch (over the served default KV
/// cache, f16), each token picked as `pick` says.
pub fn decode_throughput(
    m: &LoadedModel,
    batch: usize,
    prompt_len: usize,
    steps: usize,
    pick: Pick,
) -> Result<DecodeBench> {
    let block = 16;
    let need = (prompt_len + steps + 1).div_ceil(block) * batch;
    let mut alloc = BlockAllocator::new(need, block);
    let shape = m
        .model
        .kv_shape(block)
        .with_dtype(super::KvDtype::default());
    let mut kv = m
        .model
        .kv_cache_of(shape, super::KvGroups::single(shape.layers), need);
    let mut scratch = Scratch::default();
    let vocab = m.model.config().vocab_size as u32;
    let mut seqs: Vec<Vec<u32>> = (0..batch)
        .map(|s| {
            (0..prompt_len)
                .map(|i| ((i * 7 + s * 13 + 1) as u32) % vocab)
                .collect()
        })
        .collect();
    let mut tables: Vec<Vec<u32>> = vec![vec![]; batch];
    for t in tables.iter_mut() {
        if !alloc.grow(t, prompt_len + steps + 1) {
            return Err(super::Error::Internal("KV pool too small".into()));
        }
    }
    // Prefill (not timed).
    let mut b = Batch::new();
    for (s, t) in seqs.iter().zip(&tables) {
        b.push(s, 0, t, Logits::Last);
    }
    let logits = m
        .model
        .forward(&b, &mut kv, &mut scratch)?
        .to_vec2::<f32>()?;
    drop(b);
    for (s, row) in seqs.iter_mut().zip(&logits) {
        s.push(sampling::argmax(row));
    }
    super::cpu::profile::reset();
    let started = Instant::now();
    let mut flat = vec![];
    for _ in 0..steps {
        let mut b = Batch::new();
        for (s, t) in seqs.iter().zip(&tables) {
            let pos = s.len() - 1;
            b.push(&s[pos..], pos, t, Logits::Last);
        }
        let ids: Vec<u32> = match (pick, m.model.engine_path()) {
            // As the server does for greedy rows: the argmax on the device.
            (Pick::Argmax, EnginePath::Tensor) => {
                m.model.forward_greedy(&b, &mut kv, &mut scratch)?
            }
            (Pick::TopK, _) => {
                let top = m
                    .model
                    .forward_top(&b, &mut kv, &mut scratch, TOP_K, false)?;
                (0..batch)
                    .map(|i| top.row(i).first().map_or(0, |p| p.0))
                    .collect()
            }
            (Pick::Argmax | Pick::Row, _) => {
                m.model.forward_into(&b, &mut kv, &mut scratch, &mut flat)?;
                let v = flat.len() / batch;
                flat.chunks(v).map(sampling::argmax).collect()
            }
        };
        drop(b);
        for (s, id) in seqs.iter_mut().zip(ids) {
            s.push(id);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let profile_ms = super::cpu::profile::totals()
        .into_iter()
        .filter(|(_, t)| !t.is_zero())
        .map(|(name, t)| (name, t.as_secs_f64() * 1e3 / steps as f64))
        .collect();
    Ok(DecodeBench {
        batch,
        pick,
        steps,
        tokens_per_second: (batch * steps) as f64 / secs,
        step_ms: secs * 1e3 / steps as f64,
        profile_ms,
        limits: None,
    })
}
