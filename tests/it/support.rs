//! Shared helpers: synthetic checkpoints on disk and a synchronous driver
//! that runs sequences through the batched model.

use std::path::{Path, PathBuf};

use llmops::engine::synth::SynthSpec;
use llmops::engine::{
    Batch, BlockAllocator, KvCache, KvDtype, LoadedModel, Logits, Sampler, SamplingParams, Scratch,
};

/// Writes `spec` into a fresh temporary folder.
pub fn write_model(spec: &SynthSpec) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model");
    spec.write(&path, None).unwrap();
    (dir, path)
}

/// Loads a model folder on the CPU.
pub fn load(path: &Path) -> LoadedModel {
    llmops::engine::load(path, &Default::default()).unwrap()
}

/// One sequence's work for [`run_teacher_forced`].
pub struct Plan {
    /// Every token the sequence will consume.
    pub tokens: Vec<u32>,
    /// Step at which it joins.
    pub join_step: usize,
    /// Tokens consumed per step while prefilling; afterwards one per step.
    pub chunk: usize,
    /// How many leading tokens count as the prompt (chunked); the rest go one a step.
    pub prompt_len: usize,
}

/// Runs every plan through shared batched steps and returns each sequence's
/// logits at every position.
pub fn run_teacher_forced(
    m: &LoadedModel,
    plans: &[Plan],
    block_size: usize,
) -> Vec<Vec<Vec<f32>>> {
    run_teacher_forced_with(m, plans, block_size, KvDtype::F32)
}

/// [`run_teacher_forced`] with the KV cache storing `dtype`.
pub fn run_teacher_forced_with(
    m: &LoadedModel,
    plans: &[Plan],
    block_size: usize,
    dtype: KvDtype,
) -> Vec<Vec<Vec<f32>>> {
    let shape = m.model.kv_shape(block_size).with_dtype(dtype);
    let mut alloc = BlockAllocator::new(256, block_size);
    let mut kv = KvCache::new(shape, 256);
    let mut scratch = Scratch::default();
    let mut tables: Vec<Vec<u32>> = vec![vec![]; plans.len()];
    let mut done = vec![0usize; plans.len()];
    let mut out: Vec<Vec<Vec<f32>>> = vec![vec![]; plans.len()];
    let mut step = 0;
    while done.iter().zip(plans).any(|(d, p)| *d < p.tokens.len()) {
        let mut work = vec![];
        for (i, p) in plans.iter().enumerate() {
            if step < p.join_step || done[i] >= p.tokens.len() {
                continue;
            }
            let n = if done[i] < p.prompt_len {
                p.chunk.min(p.prompt_len - done[i])
            } else {
                1
            };
            assert!(alloc.grow(&mut tables[i], done[i] + n));
            work.push((i, n));
        }
        let mut batch = Batch::new();
        for &(i, n) in &work {
            batch.push(
                &plans[i].tokens[done[i]..done[i] + n],
                done[i],
                &tables[i],
                Logits::All,
            );
        }
        if !batch.is_empty() {
            let logits = m
                .model
                .forward(&batch, &mut kv, &mut scratch)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let mut rows = logits.into_iter();
            for &(i, n) in &work {
                for _ in 0..n {
                    out[i].push(rows.next().unwrap());
                }
                done[i] += n;
            }
        }
        step += 1;
    }
    out
}

/// A sequence to generate greedily in [`generate_greedy`].
pub struct GenPlan {
    pub prompt: Vec<u32>,
    pub join_step: usize,
    pub max_tokens: usize,
}

/// Greedy generation of several sequences sharing steps (chunked prefill of
/// `chunk` tokens); returns each one's generated tokens.
pub fn generate_greedy(
    m: &LoadedModel,
    plans: &[GenPlan],
    block_size: usize,
    chunk: usize,
) -> Vec<Vec<u32>> {
    generate_greedy_with(m, plans, block_size, chunk, KvDtype::F32)
}

/// [`generate_greedy`] with the KV cache storing `dtype`.
pub fn generate_greedy_with(
    m: &LoadedModel,
    plans: &[GenPlan],
    block_size: usize,
    chunk: usize,
    dtype: KvDtype,
) -> Vec<Vec<u32>> {
    let shape = m.model.kv_shape(block_size).with_dtype(dtype);
    let mut alloc = BlockAllocator::new(512, block_size);
    let mut kv = KvCache::new(shape, 512);
    let mut scratch = Scratch::default();
    let n = plans.len();
    let mut tables: Vec<Vec<u32>> = vec![vec![]; n];
    let mut seqs: Vec<Vec<u32>> = plans.iter().map(|p| p.prompt.clone()).collect();
    let mut fed = vec![0usize; n];
    let mut generated: Vec<Vec<u32>> = vec![vec![]; n];
    let mut samplers: Vec<Sampler> = plans
        .iter()
        .map(|p| Sampler::new(SamplingParams::default(), &p.prompt))
        .collect();
    let mut step = 0;
    while (0..n).any(|i| generated[i].len() < plans[i].max_tokens) {
        let mut work = vec![];
        for i in 0..n {
            if step < plans[i].join_step || generated[i].len() >= plans[i].max_tokens {
                continue;
            }
            let take = (seqs[i].len() - fed[i]).min(chunk);
            assert!(alloc.grow(&mut tables[i], fed[i] + take));
            let last = fed[i] + take == seqs[i].len();
            work.push((i, take, last));
        }
        let mut batch = Batch::new();
        for &(i, take, last) in &work {
            let l = if last { Logits::Last } else { Logits::None };
            batch.push(&seqs[i][fed[i]..fed[i] + take], fed[i], &tables[i], l);
        }
        if !batch.is_empty() {
            let logits = m
                .model
                .forward(&batch, &mut kv, &mut scratch)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let mut rows = logits.into_iter();
            for &(i, take, last) in &work {
                fed[i] += take;
                if last {
                    let mut row = rows.next().unwrap();
                    let (t, _) = samplers[i].sample(&mut row).unwrap();
                    generated[i].push(t);
                    seqs[i].push(t);
                }
            }
        }
        step += 1;
    }
    generated
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
