//! Running a step: the host path (our kernels over packed weights and a
//! host KV cache) or the tensor path (candle ops on the model's device, KV
//! cache included), as the model was loaded for ([`super::EnginePath`]).

use candle_core::{Device, Tensor};

use super::batch::Batch;
use super::host::{self, Scratch};
use super::kv::KvCache;
use super::model::Model;
use super::tensor;
use super::{EnginePath, Error, Result};

impl Model {
    /// Runs one step: writes the new tokens' keys and values into `kv` and
    /// returns `[batch.logit_rows.len(), vocab]` f32 logits.
    pub fn forward(
        &self,
        batch: &Batch<'_>,
        kv: &mut KvCache,
        scratch: &mut Scratch,
    ) -> Result<Tensor> {
        let mut logits = vec![];
        self.forward_into(batch, kv, scratch, &mut logits)?;
        let rows = batch.logit_rows.len();
        Ok(Tensor::from_vec(
            logits,
            (rows, self.cfg.vocab_size),
            &Device::Cpu,
        )?)
    }

    /// As [`Model::forward`], with the logits (row-major
    /// `[batch.logit_rows.len(), vocab]`) left in `logits`. The buffer is
    /// exchanged with one the engine keeps, so a caller that passes the same
    /// `Vec` every step reuses memory instead of mapping fresh pages for
    /// every step's logits (33 MB at batch 32 over Gemma's 262k vocabulary).
    pub fn forward_into(
        &self,
        batch: &Batch<'_>,
        kv: &mut KvCache,
        scratch: &mut Scratch,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        if batch.is_empty() {
            return Err(Error::Internal("empty batch".into()));
        }
        match self.path {
            // Inside the pool the calling thread is a worker: parallel regions
            // split between it and a warm sibling instead of waking sleepers.
            EnginePath::Host => rayon::scope(|_| host::forward(self, batch, kv, scratch, logits)),
            EnginePath::Tensor => {
                let t = tensor::forward_with_hidden(self, batch, kv, scratch.hidden_rows_mut())?;
                logits.clear();
                logits.extend(t.flatten_all()?.to_vec1::<f32>()?);
                Ok(())
            }
        }
    }

    /// Runs one step whose every logits row is to be chosen greedily, and
    /// returns each row's argmax (lowest id on ties, as
    /// [`super::sampling::argmax`]): on the tensor path the argmax runs on
    /// the device and only the ids come back; on the host path it runs over
    /// the host logits.
    pub fn forward_greedy(
        &self,
        batch: &Batch<'_>,
        kv: &mut KvCache,
        scratch: &mut Scratch,
    ) -> Result<Vec<u32>> {
        if batch.is_empty() {
            return Err(Error::Internal("empty batch".into()));
        }
        match self.path {
            EnginePath::Host => {
                let mut logits = vec![];
                self.forward_into(batch, kv, scratch, &mut logits)?;
                let vocab = self.cfg.vocab_size;
                Ok(logits.chunks(vocab).map(super::sampling::argmax).collect())
            }
            EnginePath::Tensor => {
                let t = tensor::forward_with_hidden(self, batch, kv, scratch.hidden_rows_mut())?;
                if t.dim(0)? == 0 {
                    return Ok(vec![]);
                }
                tensor::argmax_rows(&t)
            }
        }
    }
}

/// What a step picked on the device ([`Model::forward_top`]): each logits
/// row's `k` best (token, logit) pairs, best first, and with `lse` each
/// row's log Σ exp.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopRows {
    /// Pairs per row.
    pub k: usize,
    /// `rows × k` pairs, row-major.
    pub pairs: Vec<(u32, f32)>,
    /// One per row, when asked.
    pub lse: Option<Vec<f32>>,
}

impl TopRows {
    /// Row `i`'s pairs (its valid ones: a row with fewer than `k` non-NaN
    /// logits has fewer).
    pub fn row(&self, i: usize) -> &[(u32, f32)] {
        let row = self.pairs.get(i * self.k..(i + 1) * self.k).unwrap_or(&[]);
        let valid = row.iter().take_while(|p| p.0 != u32::MAX).count();
        &row[..valid]
    }
}

impl Model {
    /// Runs one step and returns each logits row's `k` best logits (and its
    /// log Σ exp with `lse`), selected on the device on the tensor path so
    /// that `rows × k` pairs come back instead of `rows × vocab` logits
    /// (1 MiB a row at Gemma's vocabulary); on the host path selected from
    /// the host logits.
    pub fn forward_top(
        &self,
        batch: &Batch<'_>,
        kv: &mut KvCache,
        scratch: &mut Scratch,
        k: usize,
        lse: bool,
    ) -> Result<TopRows> {
        if batch.is_empty() {
            return Err(Error::Internal("empty batch".into()));
        }
        let k = k.min(self.cfg.vocab_size).min(tensor::MAX_TOP);
        let t = match self.path {
            EnginePath::Host => self.forward(batch, kv, scratch)?,
            EnginePath::Tensor => {
                tensor::forward_with_hidden(self, batch, kv, scratch.hidden_rows_mut())?
            }
        };
        if t.dim(0)? == 0 {
            return Ok(TopRows {
                k,
                ..TopRows::default()
            });
        }
        let (ids, values) = tensor::top_rows(&t, k)?;
        Ok(TopRows {
            k,
            pairs: ids.into_iter().zip(values).collect(),
            lse: if lse {
                Some(tensor::log_sum_exp_rows(&t)?)
            } else {
                None
            },
        })
    }
}

#[cfg(test)]
mod tests {
    //! The tensor path (device KV cache, device attention) against the host
    //! path, step by step over the same batches; then the tensor path's own
    //! contracts: batch invariance and preemption equivalence. The tensor
    //! path runs on the device `LLMOPS_TEST_DEVICE` names (`cpu` when unset,
    //! which is what CI runs; `cuda:0` on a GPU machine).

    use super::*;
    use crate::engine::export_gguf::{GgufType, export_gguf};
    use crate::engine::synth::SynthSpec;
    use crate::engine::{BlockAllocator, GgufWeights, LoadOptions, Logits};

    /// Largest difference allowed between the two paths' f32 logits. They
    /// differ in summation order (candle's GEMM and batched attention
    /// matmuls against our FMA chains) and in the rotary tables (candle's
    /// `cos`/`sin` against the host's), which moves a logit of these models
    /// (|logit| < 20) by about 1e-6 (measured); 1e-4, the bound the engine
    /// keeps against candle-transformers, still catches a wrong mask,
    /// position, window or norm, each of which moves logits by 0.01 or more.
    const F32_TOLERANCE: f32 = 1e-4;

    /// The same for Q8_0 blocks: candle's quantized matmul and the host
    /// block kernel round each block of 32 activations to 8 bits, so the paths' 1e-6 differences
    /// in activations can move one rounding step, which moves an output by
    /// a step times its weights (0.021 measured on the tiny Llama).
    const Q8_TOLERANCE: f32 = 0.05;

    /// On a GPU the tensor path computes matmuls in bf16 (8 bits of
    /// mantissa) against the host path's f32: a logit of these models moves
    /// by up to a few hundredths.
    const BF16_TOLERANCE: f32 = 0.25;

    /// Tokens per prefill chunk: prompts take several steps, so chunks and
    /// decodes of different sequences share a batch.
    const CHUNK: usize = 5;

    fn test_device() -> Device {
        let spec = std::env::var("LLMOPS_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
        crate::engine::parse_device(&spec).expect("LLMOPS_TEST_DEVICE")
    }

    /// The model at `path` loaded twice: for the host path on the CPU, and
    /// for the tensor path on the test device (weights as candle tensors,
    /// GGUF blocks through `QMatMul`).
    fn load_both(path: &std::path::Path, opts: LoadOptions) -> (Model, Model) {
        let host = crate::engine::load(
            path,
            &LoadOptions {
                engine_path: Some(EnginePath::Host),
                ..opts.clone()
            },
        )
        .unwrap()
        .model;
        let tensor = crate::engine::load(
            path,
            &LoadOptions {
                device: test_device(),
                engine_path: Some(EnginePath::Tensor),
                ..opts
            },
        )
        .unwrap()
        .model;
        assert_eq!(host.engine_path(), EnginePath::Host);
        assert_eq!(tensor.engine_path(), EnginePath::Tensor);
        (host, tensor)
    }

    fn argmax(row: &[f32]) -> u32 {
        crate::engine::sampling::argmax(row)
    }

    /// Runs `prompts` on both paths in shared batches (chunked prefill, then
    /// greedy decoding of `new_tokens` each, the host path's token fed to
    /// both); returns the largest logit difference, and each path's greedy
    /// tokens.
    fn both_paths(
        host_m: &Model,
        tensor_m: &Model,
        prompts: &[Vec<u32>],
        new_tokens: usize,
    ) -> (f32, Vec<Vec<u32>>, Vec<Vec<u32>>) {
        let block = 4;
        let mut alloc = BlockAllocator::new(128, block);
        let mut kv_host = host_m.kv_cache(block, 128);
        let mut kv_tensor = tensor_m.kv_cache(block, 128);
        assert!(!kv_host.is_device() && kv_tensor.is_device());

        let mut scratch = Scratch::default();
        let n = prompts.len();
        let mut seqs = prompts.to_vec();
        let mut tables: Vec<Vec<u32>> = vec![vec![]; n];
        let mut fed = vec![0; n];
        let (mut host_tokens, mut tensor_tokens) = (vec![vec![]; n], vec![vec![]; n]);
        let (mut worst, mut host_logits, mut tensor_logits) = (0f32, vec![], vec![]);
        while (0..n).any(|i| host_tokens[i].len() < new_tokens) {
            let mut work = vec![];
            for i in (0..n).filter(|&i| host_tokens[i].len() < new_tokens) {
                let take = (seqs[i].len() - fed[i]).min(CHUNK);
                assert!(alloc.grow(&mut tables[i], fed[i] + take));
                work.push((i, take, fed[i] + take == seqs[i].len()));
            }
            let mut batch = Batch::new();
            for &(i, take, last) in &work {
                let logits = if last { Logits::Last } else { Logits::None };
                batch.push(&seqs[i][fed[i]..fed[i] + take], fed[i], &tables[i], logits);
            }
            host_m
                .forward_into(&batch, &mut kv_host, &mut scratch, &mut host_logits)
                .unwrap();
            tensor_m
                .forward_into(&batch, &mut kv_tensor, &mut scratch, &mut tensor_logits)
                .unwrap();
            assert_eq!(tensor_logits.len(), host_logits.len());
            let mut step_worst = 0f32;
            for (a, b) in host_logits.iter().zip(&tensor_logits) {
                assert!(a.is_finite() && b.is_finite());
                step_worst = step_worst.max((a - b).abs());
            }
            worst = worst.max(step_worst);
            let vocab = host_m.cfg.vocab_size;
            let mut rows = host_logits.chunks(vocab).zip(tensor_logits.chunks(vocab));
            for &(i, take, last) in &work {
                fed[i] += take;
                if last {
                    let (h, t) = rows.next().unwrap();
                    host_tokens[i].push(argmax(h));
                    tensor_tokens[i].push(argmax(t));
                    seqs[i].push(argmax(h));
                }
            }
        }
        (worst, host_tokens, tensor_tokens)
    }

    fn prompts() -> Vec<Vec<u32>> {
        [3usize, 11, 17]
            .iter()
            .enumerate()
            .map(|(s, &len)| {
                let mut p = vec![256];
                p.extend((0..len).map(|i| ((i * 37 + s * 101 + 7) % 256) as u32));
                p
            })
            .collect()
    }

    fn tolerance(f32_bound: f32) -> f32 {
        if test_device().is_cpu() {
            f32_bound
        } else {
            f32_bound.max(BF16_TOLERANCE)
        }
    }

    fn assert_paths_agree(case: &str, host: &Model, tensor: &Model, bound: f32) {
        let (worst, host_tokens, tensor_tokens) = both_paths(host, tensor, &prompts(), 12);
        eprintln!("{case}: largest logit difference {worst:e}");
        assert!(worst < tolerance(bound), "{case}: logits differ by {worst}");
        if test_device().is_cpu() {
            assert_eq!(host_tokens, tensor_tokens, "{case}: greedy tokens");
        }
        // The model is not degenerate: the prompts lead somewhere different.
        assert!(
            host_tokens.iter().any(|t| t != &host_tokens[0]),
            "{case}: {host_tokens:?}"
        );
    }

    fn synth_cases() -> Vec<(&'static str, SynthSpec)> {
        vec![
            ("llama (GQA)", SynthSpec::tiny_llama()),
            (
                "qwen2 (q/k/v biases)",
                SynthSpec {
                    qkv_bias: true,
                    seed: 3,
                    ..SynthSpec::tiny_llama()
                },
            ),
            (
                "gemma 3 (windows, norms, softcaps)",
                SynthSpec::tiny_gemma3(),
            ),
        ]
    }

    #[test]
    fn the_tensor_path_agrees_with_the_host_path_on_synthetic_models() {
        for (case, spec) in synth_cases() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("model");
            spec.write(&path, None).unwrap();
            let (host, tensor) = load_both(&path, LoadOptions::default());
            assert_paths_agree(case, &host, &tensor, F32_TOLERANCE);
        }
    }

    #[test]
    fn the_tensor_path_agrees_with_the_host_path_on_quantized_blocks() {
        // Q8_0 blocks kept as blocks: candle's quantized matmul on the
        // tensor path (the weights a GPU would run), the int8 block kernel
        // (`cpu::quant`) on the host path.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model");
        SynthSpec::tiny_llama().write(&path, None).unwrap();
        let gguf = dir.path().join("tiny-q8_0.gguf");
        export_gguf(&path, &gguf, GgufType::Q8_0).unwrap();
        let opts = LoadOptions {
            gguf_weights: GgufWeights::Blocks,
            ..Default::default()
        };
        let (host, tensor) = load_both(&gguf, opts);
        // The tensor path keeps the blocks and runs them through QMatMul.
        use crate::engine::weights::LinearWeight;
        use candle_core::quantized::QMatMul;
        let down = &tensor.layers[0].down.weight;
        assert!(
            matches!(down, LinearWeight::Candle(QMatMul::QTensor(_))),
            "{down:?}"
        );
        assert_paths_agree("llama Q8_0 blocks", &host, &tensor, Q8_TOLERANCE);
    }

    /// The Gemma 3 270M Q4_K_M file (`scripts/fetch-gemma`, which
    /// `scripts/test` runs): `LLMOPS_GEMMA` or the cache.
    fn gemma_path() -> std::path::PathBuf {
        if let Some(p) = std::env::var_os("LLMOPS_GEMMA") {
            return p.into();
        }
        let cache = std::env::var_os("LLMOPS_CACHE")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/llmops")
            });
        cache.join("gemma3-270m/gemma-3-270m-q4_k_m.gguf")
    }

    /// Largest logit difference allowed on Gemma 3 270M, both paths on the
    /// Q4_K_M weights dequantized to f32 (host f32 panels; dense f32
    /// tensors on the tensor path), so no activation is quantized and the
    /// paths differ only in summation order, over 18 layers and Gemma's
    /// larger activations (|logit| up to ~40). Measured: 7.3e-4.
    /// (With the blocks kept, candle's quantized matmul rounds activations
    /// to 8 bits and two host runs that differ only in that move logits by
    /// 5, so blocks are compared on the synthetic Q8_0 model instead.)
    const GEMMA_TOLERANCE: f32 = 1e-2;

    #[test]
    fn the_tensor_path_agrees_with_the_host_path_on_gemma3_270m() {
        let path = gemma_path();
        assert!(
            path.exists(),
            "{} is missing: run scripts/fetch-gemma",
            path.display()
        );
        let opts = LoadOptions {
            gguf_weights: GgufWeights::F32,
            ..Default::default()
        };
        let (host, tensor) = load_both(&path, opts);
        let (worst, host_tokens, tensor_tokens) = both_paths(&host, &tensor, &prompts(), 6);
        eprintln!("gemma3-270m: largest logit difference {worst:e}");
        assert!(
            worst < tolerance(GEMMA_TOLERANCE),
            "gemma3-270m: logits differ by {worst}"
        );
        if test_device().is_cpu() {
            assert_eq!(host_tokens, tensor_tokens, "gemma3-270m: greedy tokens");
        }
    }

    /// One sequence being generated greedily by hand: its tokens so far,
    /// how many are in the cache, its block table.
    struct Gen {
        tokens: Vec<u32>,
        prompt: usize,
        fed: usize,
        table: Vec<u32>,
    }

    impl Gen {
        fn new(prompt: Vec<u32>) -> Self {
            Self {
                prompt: prompt.len(),
                tokens: prompt,
                fed: 0,
                table: vec![],
            }
        }

        fn generated(&self) -> &[u32] {
            &self.tokens[self.prompt..]
        }
    }

    /// Runs one step over `gens` (a chunk of at most `chunk` tokens each)
    /// through `forward_greedy`, and appends each finished chunk's token.
    fn greedy_step(
        m: &Model,
        kv: &mut KvCache,
        alloc: &mut BlockAllocator,
        gens: &mut [&mut Gen],
        chunk: usize,
    ) {
        let mut scratch = Scratch::default();
        let mut work = vec![];
        for (i, g) in gens.iter_mut().enumerate() {
            let take = (g.tokens.len() - g.fed).min(chunk);
            assert!(alloc.grow(&mut g.table, g.fed + take));
            work.push((i, take, g.fed + take == g.tokens.len()));
        }
        let mut batch = Batch::new();
        for &(i, take, last) in &work {
            let g = &gens[i];
            let logits = if last { Logits::Last } else { Logits::None };
            batch.push(&g.tokens[g.fed..g.fed + take], g.fed, &g.table, logits);
        }
        let ids = m.forward_greedy(&batch, kv, &mut scratch).unwrap();
        drop(batch);
        let mut ids = ids.into_iter();
        for &(i, take, last) in &work {
            gens[i].fed += take;
            if last {
                gens[i].tokens.push(ids.next().unwrap());
            }
        }
        assert!(ids.next().is_none());
    }

    fn tensor_model(spec: &SynthSpec, dir: &std::path::Path) -> Model {
        let path = dir.join("model");
        spec.write(&path, None).unwrap();
        let opts = LoadOptions {
            device: test_device(),
            engine_path: Some(EnginePath::Tensor),
            ..Default::default()
        };
        crate::engine::load(&path, &opts).unwrap().model
    }

    #[test]
    fn the_tensor_path_gives_a_sequence_the_same_tokens_alone_and_in_a_busy_batch() {
        const NEW: usize = 16;
        for (case, spec) in synth_cases() {
            let dir = tempfile::tempdir().unwrap();
            let m = tensor_model(&spec, dir.path());
            let prompt = prompts()[1].clone();
            // Alone, the whole prompt in one step.
            let mut alone = Gen::new(prompt.clone());
            let mut alloc = BlockAllocator::new(256, 4);
            let mut kv = m.kv_cache(4, 256);
            while alone.generated().len() < NEW {
                greedy_step(&m, &mut kv, &mut alloc, &mut [&mut alone], 64);
            }
            // In a batch: others decoding and prefilling in chunks around
            // it, one arriving late, so its steps mix decodes and prefills.
            let mut alloc = BlockAllocator::new(256, 4);
            let mut kv = m.kv_cache(4, 256);
            let mut busy = Gen::new(prompt);
            let mut others: Vec<Gen> = [0usize, 2]
                .iter()
                .map(|&i| Gen::new(prompts()[i].clone()))
                .collect();
            let mut late = Gen::new((0..23).map(|i| (i * 13 % 250) as u32).collect());
            let mut step = 0;
            while busy.generated().len() < NEW {
                let mut gens: Vec<&mut Gen> = vec![&mut busy];
                gens.extend(others.iter_mut());
                if step >= 3 {
                    gens.push(&mut late);
                }
                greedy_step(&m, &mut kv, &mut alloc, &mut gens, 5);
                step += 1;
            }
            assert_eq!(
                alone.generated(),
                busy.generated(),
                "{case}: alone against in a batch"
            );
            assert!(late.fed > 0, "{case}: the late sequence ran");
        }
    }

    #[test]
    fn the_tensor_path_gives_a_preempted_and_recomputed_sequence_the_same_tokens() {
        const NEW: usize = 16;
        for (case, spec) in synth_cases() {
            let dir = tempfile::tempdir().unwrap();
            let m = tensor_model(&spec, dir.path());
            let prompt = prompts()[2].clone();
            let mut alloc = BlockAllocator::new(64, 4);
            let mut kv = m.kv_cache(4, 64);
            let mut straight = Gen::new(prompt.clone());
            while straight.generated().len() < NEW {
                greedy_step(&m, &mut kv, &mut alloc, &mut [&mut straight], 8);
            }
            let mut alloc = BlockAllocator::new(64, 4);
            let mut kv = m.kv_cache(4, 64);
            let mut seq = Gen::new(prompt);
            while seq.generated().len() < NEW / 2 {
                greedy_step(&m, &mut kv, &mut alloc, &mut [&mut seq], 8);
            }
            // Preempted: its blocks go back to the pool and another
            // sequence overwrites them; then it is recomputed from its
            // tokens (prompt and generated so far) in fresh blocks.
            alloc.release(&mut seq.table);
            seq.fed = 0;
            let mut intruder = Gen::new((0..40).map(|i| (i * 7 % 250) as u32).collect());
            while intruder.generated().is_empty() {
                greedy_step(&m, &mut kv, &mut alloc, &mut [&mut intruder], 16);
            }
            while seq.generated().len() < NEW {
                greedy_step(&m, &mut kv, &mut alloc, &mut [&mut seq, &mut intruder], 8);
            }
            assert_eq!(
                straight.generated(),
                seq.generated(),
                "{case}: preempted and recomputed"
            );
        }
    }

    #[test]
    fn greedy_on_the_device_picks_what_the_sampler_picks_from_the_logits() {
        let dir = tempfile::tempdir().unwrap();
        let m = tensor_model(&SynthSpec::tiny_gemma3(), dir.path());
        let mut alloc = BlockAllocator::new(64, 4);
        let mut kv = m.kv_cache(4, 64);
        let mut kv2 = m.kv_cache(4, 64);
        let mut scratch = Scratch::default();
        let ps = prompts();
        let mut tables: Vec<Vec<u32>> = vec![vec![]; ps.len()];
        let mut batch = Batch::new();
        for (p, t) in ps.iter().zip(tables.iter_mut()) {
            assert!(alloc.grow(t, p.len()));
        }
        for (p, t) in ps.iter().zip(&tables) {
            batch.push(p, 0, t, Logits::All);
        }
        let ids = m.forward_greedy(&batch, &mut kv, &mut scratch).unwrap();
        let mut logits = vec![];
        m.forward_into(&batch, &mut kv2, &mut scratch, &mut logits)
            .unwrap();
        let want: Vec<u32> = logits.chunks(m.cfg.vocab_size).map(argmax).collect();
        assert_eq!(ids.len(), batch.len());
        assert_eq!(ids, want);
    }

    /// The host sampler's candidates: the `k` best of `row` by larger
    /// value, then lower id, NaN skipped (a full sort: the reference).
    fn best(row: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut v: Vec<(u32, f32)> = (0u32..)
            .zip(row.iter().copied())
            .filter(|(_, x)| !x.is_nan())
            .collect();
        v.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
        v.truncate(k);
        v
    }

    fn log_sum_exp(row: &[f32]) -> f64 {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
    }

    #[test]
    fn top_rows_select_the_samplers_candidates_through_ties_nan_and_chunks() {
        // Coarse values (many ties, also across the k-th place), NaN and
        // −∞; rows of 5,000 (chunked once) and 300,000 (several rounds);
        // one row all ties.
        let dev = test_device();
        let mut rng = 0x9e37_79b9_u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for vocab in [5_000usize, 300_000] {
            let mut rows: Vec<Vec<f32>> = (0..3)
                .map(|_| {
                    (0..vocab)
                        .map(|_| match next() % 100 {
                            0 => f32::NAN,
                            1 => f32::NEG_INFINITY,
                            r => (r % 23) as f32 * 0.5 - 4.0,
                        })
                        .collect()
                })
                .collect();
            rows.push(vec![1.5; vocab]);
            let flat: Vec<f32> = rows.concat();
            let t = Tensor::from_vec(flat, (rows.len(), vocab), &dev).unwrap();
            for k in [1usize, 7, 40, tensor::MAX_TOP] {
                let (ids, values) = tensor::top_rows(&t, k).unwrap();
                assert_eq!(ids.len(), rows.len() * k);
                for (r, row) in rows.iter().enumerate() {
                    let got: Vec<(u32, f32)> = ids[r * k..(r + 1) * k]
                        .iter()
                        .copied()
                        .zip(values[r * k..(r + 1) * k].iter().copied())
                        .collect();
                    assert_eq!(got, best(row, k), "vocab {vocab}, k {k}, row {r}");
                }
            }
        }
        // Fewer non-NaN logits than k: the rest are marked u32::MAX.
        let t = Tensor::from_vec(vec![f32::NAN, 2.0, f32::NAN, 1.0], (1, 4), &dev).unwrap();
        let (ids, values) = tensor::top_rows(&t, 3).unwrap();
        assert_eq!(ids, vec![1, 3, u32::MAX]);
        assert_eq!(&values[..2], &[2.0, 1.0]);
    }

    #[test]
    fn top_k_on_the_device_gives_the_logits_best_and_their_normaliser() {
        let dir = tempfile::tempdir().unwrap();
        let m = tensor_model(&SynthSpec::tiny_gemma3(), dir.path());
        let mut alloc = BlockAllocator::new(64, 4);
        let (mut kv, mut kv2) = (m.kv_cache(4, 64), m.kv_cache(4, 64));
        let mut scratch = Scratch::default();
        let ps = prompts();
        let mut tables: Vec<Vec<u32>> = vec![vec![]; ps.len()];
        for (p, t) in ps.iter().zip(tables.iter_mut()) {
            assert!(alloc.grow(t, p.len()));
        }
        let mut batch = Batch::new();
        for (p, t) in ps.iter().zip(&tables) {
            batch.push(p, 0, t, Logits::All);
        }
        let top = m
            .forward_top(&batch, &mut kv, &mut scratch, 40, true)
            .unwrap();
        let mut logits = vec![];
        m.forward_into(&batch, &mut kv2, &mut scratch, &mut logits)
            .unwrap();
        let vocab = m.cfg.vocab_size;
        assert_eq!(top.k, 40);
        let lse = top.lse.as_ref().unwrap();
        assert_eq!(lse.len(), batch.len());
        for (i, row) in logits.chunks(vocab).enumerate() {
            assert_eq!(top.row(i), best(row, 40).as_slice(), "row {i}");
            let want = log_sum_exp(row);
            assert!(
                (lse[i] as f64 - want).abs() < 1e-4 * want.abs().max(1.0),
                "row {i}"
            );
        }
    }

    #[test]
    fn a_path_refuses_the_other_paths_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model");
        SynthSpec::tiny_llama().write(&path, None).unwrap();
        let (host, tensor) = load_both(&path, LoadOptions::default());
        let table = vec![0u32];
        let mut batch = Batch::new();
        batch.push(&[1, 2], 0, &table, Logits::Last);
        let mut scratch = Scratch::default();
        let mut out = vec![];
        let mut device_kv = tensor.kv_cache(4, 4);
        let mut host_kv = host.kv_cache(4, 4);
        let e = host.forward_into(&batch, &mut device_kv, &mut scratch, &mut out);
        assert!(e.unwrap_err().to_string().contains("host memory"));
        let e = tensor.forward_into(&batch, &mut host_kv, &mut scratch, &mut out);
        assert!(e.unwrap_err().to_string().contains("on the device"));
    }
}
