//! Running a step: the CPU path (host kernels over packed weights) or the
//! tensor path (candle ops on the model's device), chosen by the device.

use candle_core::{Device, Tensor};

use super::batch::Batch;
use super::host::{self, Scratch};
use super::kv::KvCache;
use super::model::Model;
use super::tensor;
use super::{Error, Result};

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
        if self.device.is_cpu() {
            // Inside the pool the calling thread is a worker: parallel regions
            // split between it and a warm sibling instead of waking sleepers.
            rayon::scope(|_| host::forward(self, batch, kv, scratch, logits))
        } else {
            let t = tensor::forward(self, batch, kv)?;
            logits.clear();
            logits.extend(t.flatten_all()?.to_vec1::<f32>()?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    //! The tensor path (the device path: `forward_into` takes it on any
    //! device but the CPU, so no CPU server ever runs it) on candle's CPU
    //! device, against the host path, step by step over the same batches.

    use super::*;
    use crate::engine::export_gguf::{GgufType, export_gguf};
    use crate::engine::synth::SynthSpec;
    use crate::engine::{BlockAllocator, GgufWeights, LoadOptions, Logits};

    /// Largest difference allowed between the two paths' f32 logits. They
    /// differ in summation order (candle's GEMM against our FMA chains) and
    /// in the rotary tables (candle's `cos`/`sin` against the host's), which
    /// moves a logit of these models (|logit| < 20) by about 1e-6 (measured);
    /// 1e-4, the bound the engine keeps against candle-transformers, still
    /// catches a wrong mask, position, window or norm, each of which moves
    /// logits by 0.01 or more.
    const F32_TOLERANCE: f32 = 1e-4;

    /// The same for Q8_0 blocks: candle's quantized matmul rounds each
    /// block of 32 activations to 8 bits, so the paths' 1e-6 differences
    /// in activations can move one rounding step, which moves an output by
    /// a step times its weights (0.021 measured on the tiny Llama).
    const Q8_TOLERANCE: f32 = 0.05;

    /// Tokens per prefill chunk: prompts take several steps, so chunks and
    /// decodes of different sequences share a batch.
    const CHUNK: usize = 5;

    /// Runs `prompts` on both paths in shared batches (chunked prefill, then
    /// greedy decoding of `new_tokens` each, the host path's token fed to
    /// both); returns the largest logit difference, and each path's greedy
    /// tokens.
    fn both_paths(
        m: &Model,
        prompts: &[Vec<u32>],
        new_tokens: usize,
    ) -> (f32, Vec<Vec<u32>>, Vec<Vec<u32>>) {
        let block = 4;
        let mut alloc = BlockAllocator::new(128, block);
        let mut kv_host = KvCache::new(m.kv_shape(block), 128);
        let mut kv_tensor = KvCache::new(m.kv_shape(block), 128);
        let mut scratch = Scratch::default();
        let n = prompts.len();
        let mut seqs = prompts.to_vec();
        let mut tables: Vec<Vec<u32>> = vec![vec![]; n];
        let mut fed = vec![0; n];
        let (mut host_tokens, mut tensor_tokens) = (vec![vec![]; n], vec![vec![]; n]);
        let (mut worst, mut host_logits) = (0f32, vec![]);
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
            host::forward(m, &batch, &mut kv_host, &mut scratch, &mut host_logits).unwrap();
            let tensor_logits = tensor::forward(m, &batch, &mut kv_tensor)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(tensor_logits.len(), host_logits.len());
            for (a, b) in host_logits.iter().zip(&tensor_logits) {
                assert!(a.is_finite() && b.is_finite());
                worst = worst.max((a - b).abs());
            }
            let vocab = m.cfg.vocab_size;
            let argmax = |row: &[f32]| {
                (0..row.len()).fold(0, |best, j| if row[j] > row[best] { j } else { best }) as u32
            };
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

    fn assert_paths_agree(case: &str, m: &Model, tolerance: f32) {
        let (worst, host, tensor) = both_paths(m, &prompts(), 12);
        eprintln!("{case}: largest logit difference {worst:e}");
        assert!(worst < tolerance, "{case}: logits differ by {worst}");
        assert_eq!(host, tensor, "{case}: greedy tokens");
        // The model is not degenerate: the prompts lead somewhere different.
        assert!(host.iter().any(|t| t != &host[0]), "{case}: {host:?}");
    }

    #[test]
    fn the_tensor_path_agrees_with_the_host_path_on_synthetic_models() {
        let cases = [
            ("llama (GQA)", SynthSpec::tiny_llama()),
            (
                "gemma 3 (windows, norms, softcaps)",
                SynthSpec::tiny_gemma3(),
            ),
        ];
        for (case, spec) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("model");
            spec.write(&path, None).unwrap();
            let m = crate::engine::load(&path, &Default::default()).unwrap();
            assert_paths_agree(case, &m.model, F32_TOLERANCE);
        }
    }

    #[test]
    fn the_tensor_path_agrees_with_the_host_path_on_quantized_blocks() {
        // Q8_0 blocks held as candle's quantized matmul: the weights a GPU
        // would run, on both paths.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model");
        SynthSpec::tiny_llama().write(&path, None).unwrap();
        let gguf = dir.path().join("tiny-q8_0.gguf");
        export_gguf(&path, &gguf, GgufType::Q8_0).unwrap();
        let opts = LoadOptions {
            gguf_weights: GgufWeights::Blocks,
            ..Default::default()
        };
        let m = crate::engine::load(&gguf, &opts).unwrap();
        assert_paths_agree("llama Q8_0 blocks", &m.model, Q8_TOLERANCE);
    }
}
