//! The batched decoder: one forward pass over the flattened tokens of many
//! sequences (selective batching).
//!
//! Every linear layer is one matmul over all rows of the step; only attention
//! looks at sequence boundaries, through [`SeqView`]s and the paged cache.
//! The model takes `&self`: all per-sequence state lives in the [`KvCache`].

use candle_core::{DType, Device, Tensor};

use super::config::{Activation, ModelConfig, Rope, RopeStyle};
use super::kv::{AttnParams, KvCache, KvShape, SeqView};
use super::weights::{Embedding, Linear, Role, WeightSource};
use super::{Error, Result};

/// The tokens of one step, flattened, with each sequence's place in them.
#[derive(Debug, Default)]
pub struct Batch<'a> {
    /// Token ids of every row.
    pub tokens: Vec<u32>,
    /// Position of every row within its sequence.
    pub positions: Vec<u32>,
    /// Sequences, in row order.
    pub seqs: Vec<SeqView<'a>>,
    /// Rows whose logits the caller wants, in the order they are returned.
    pub logit_rows: Vec<u32>,
}

/// Which logits a sequence needs from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (a prefill chunk that does not reach the end of the prompt).
    None,
    /// The last row's (the next-token distribution).
    Last,
    /// Every row's (scoring, tests).
    All,
}

impl<'a> Batch<'a> {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `tokens` of a sequence whose first new token sits at `start_pos`.
    pub fn push(&mut self, tokens: &[u32], start_pos: usize, blocks: &'a [u32], logits: Logits) {
        let offset = self.tokens.len();
        self.tokens.extend_from_slice(tokens);
        self.positions
            .extend((start_pos..start_pos + tokens.len()).map(|p| p as u32));
        self.seqs.push(SeqView {
            offset,
            len: tokens.len(),
            start_pos,
            blocks,
        });
        match logits {
            Logits::None => {}
            Logits::Last if !tokens.is_empty() => {
                self.logit_rows.push((offset + tokens.len() - 1) as u32)
            }
            Logits::Last => {}
            Logits::All => self
                .logit_rows
                .extend((offset..offset + tokens.len()).map(|r| r as u32)),
        }
    }

    /// Rows in the step.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the step has no rows.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// A norm weight, as a tensor (device path) and host values (CPU path).
pub(crate) struct Norm {
    pub(crate) t: Tensor,
    pub(crate) host: Vec<f32>,
}

impl Norm {
    fn new(t: Tensor) -> Result<Self> {
        let host = t
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec1::<f32>()?;
        Ok(Self { t, host })
    }
}

/// Query/key/value projections: one stacked matmul when the weights allow.
pub(crate) enum Qkv {
    /// `[q; k; v]` rows in one weight.
    Fused(Linear),
    /// Separate (quantized types differ, or a device path).
    Split(Linear, Linear, Linear),
}

/// MLP gate and up projections, stacked when the weights allow.
pub(crate) enum GateUp {
    /// `[gate; up]` rows in one weight.
    Fused(Linear),
    /// Separate.
    Split(Linear, Linear),
}

pub(crate) struct Layer {
    pub(crate) attn_norm: Norm,
    pub(crate) qkv: Qkv,
    pub(crate) o: Linear,
    pub(crate) q_norm: Option<Norm>,
    pub(crate) k_norm: Option<Norm>,
    pub(crate) post_attn_norm: Option<Norm>,
    pub(crate) ffn_norm: Norm,
    pub(crate) post_ffn_norm: Option<Norm>,
    pub(crate) gate_up: GateUp,
    pub(crate) down: Linear,
    pub(crate) window: Option<usize>,
    /// Index into `Model::ropes`.
    pub(crate) rope: usize,
}

/// A loaded model, ready to run steps.
pub struct Model {
    pub(crate) cfg: ModelConfig,
    pub(crate) embed: Embedding,
    pub(crate) layers: Vec<Layer>,
    pub(crate) final_norm: Norm,
    pub(crate) lm_head: Linear,
    /// Inverse frequencies of the distinct rotary tables (Gemma has two);
    /// layers refer to them by index.
    pub(crate) ropes: Vec<Vec<f32>>,
    device: Device,
    weight_bytes: usize,
}

impl Model {
    /// Builds the model from a checkpoint.
    pub fn load(cfg: ModelConfig, src: &WeightSource, device: &Device) -> Result<Self> {
        let n = src.naming().clone();
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_heads * d, cfg.num_kv_heads * d);
        let embed = src.embedding(&n.embed(), cfg.vocab_size, h)?;
        let lm_head = if src.contains(&n.lm_head()) && !cfg.tie_word_embeddings {
            src.linear(n.lm_head().trim_end_matches(".weight"), cfg.vocab_size, h)?
        } else if src.contains(&n.lm_head()) {
            // Some checkpoints say "tied" and still ship the head; trust the file.
            src.linear(n.lm_head().trim_end_matches(".weight"), cfg.vocab_size, h)?
        } else {
            embed.tied_head()?
        };
        let final_norm = Norm::new(src.norm(&n.final_norm(), h)?)?;

        let mut ropes: Vec<(Rope, Vec<f32>)> = vec![];
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let rope = *cfg.rope_for_layer(i);
            let rope_idx = match ropes.iter().position(|(r, _)| *r == rope) {
                Some(idx) => idx,
                None => {
                    ropes.push((rope, rope.inv_freq(d)));
                    ropes.len() - 1
                }
            };
            let norm = |role| Norm::new(src.norm(&format!("{}.weight", n.layer(i, role)), h)?);
            let head_norm = |role| Norm::new(src.norm(&format!("{}.weight", n.layer(i, role)), d)?);
            let gemma = cfg.has_gemma_norms();
            let q = src.linear(&n.layer(i, Role::Q), q_out, h)?;
            let k = src.linear(&n.layer(i, Role::K), kv_out, h)?;
            let v = src.linear(&n.layer(i, Role::V), kv_out, h)?;
            let qkv = match Linear::stack(&[&q, &k, &v]) {
                Some(f) => Qkv::Fused(f),
                None => Qkv::Split(q, k, v),
            };
            let gate = src.linear(&n.layer(i, Role::Gate), cfg.intermediate_size, h)?;
            let up = src.linear(&n.layer(i, Role::Up), cfg.intermediate_size, h)?;
            let gate_up = match Linear::stack(&[&gate, &up]) {
                Some(f) => GateUp::Fused(f),
                None => GateUp::Split(gate, up),
            };
            layers.push(Layer {
                attn_norm: norm(Role::AttnNorm)?,
                qkv,
                o: src.linear(&n.layer(i, Role::O), h, q_out)?,
                q_norm: gemma.then(|| head_norm(Role::QNorm)).transpose()?,
                k_norm: gemma.then(|| head_norm(Role::KNorm)).transpose()?,
                post_attn_norm: gemma.then(|| norm(Role::PostAttnNorm)).transpose()?,
                ffn_norm: norm(Role::FfnNorm)?,
                post_ffn_norm: gemma.then(|| norm(Role::PostFfnNorm)).transpose()?,
                gate_up,
                down: src.linear(&n.layer(i, Role::Down), h, cfg.intermediate_size)?,
                window: cfg.layer_windows.get(i).copied().flatten(),
                rope: rope_idx,
            });
        }
        let weight_bytes = layers
            .iter()
            .map(|l| {
                let qkv = match &l.qkv {
                    Qkv::Fused(f) => f.size_in_bytes(),
                    Qkv::Split(q, k, v) => {
                        q.size_in_bytes() + k.size_in_bytes() + v.size_in_bytes()
                    }
                };
                let gu = match &l.gate_up {
                    GateUp::Fused(f) => f.size_in_bytes(),
                    GateUp::Split(g, u) => g.size_in_bytes() + u.size_in_bytes(),
                };
                qkv + gu + l.o.size_in_bytes() + l.down.size_in_bytes()
            })
            .sum::<usize>()
            + lm_head.size_in_bytes();
        Ok(Self {
            cfg,
            embed,
            layers,
            final_norm,
            lm_head,
            ropes: ropes.into_iter().map(|(_, f)| f).collect(),
            device: device.clone(),
            weight_bytes,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of matrix weights read by one decode step.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// The KV cache shape this model needs.
    pub fn kv_shape(&self, block_size: usize) -> KvShape {
        KvShape {
            layers: self.cfg.num_layers,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            block_size,
        }
    }

    /// Runs one step: writes the new tokens' keys and values into `kv` and
    /// returns `[batch.logit_rows.len(), vocab]` f32 logits.
    pub fn forward(&self, batch: &Batch<'_>, kv: &mut KvCache) -> Result<Tensor> {
        let mut logits = vec![];
        self.forward_into(batch, kv, &mut logits)?;
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
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        if batch.is_empty() {
            return Err(Error::Internal("empty batch".into()));
        }
        if self.device.is_cpu() {
            // Inside the pool the calling thread is a worker: parallel regions
            // split between it and a warm sibling instead of waking sleepers.
            rayon::scope(|_| super::cpu::forward(self, batch, kv, logits))
        } else {
            let t = self.forward_tensors(batch, kv)?;
            logits.clear();
            logits.extend(t.flatten_all()?.to_vec1::<f32>()?);
            Ok(())
        }
    }

    /// The device path: candle tensor ops for everything but attention.
    fn forward_tensors(&self, batch: &Batch<'_>, kv: &mut KvCache) -> Result<Tensor> {
        let t = batch.len();
        let cfg = &self.cfg;
        let (d, hq, hk) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let ids = Tensor::from_slice(&batch.tokens, t, &self.device)?;
        let mut x = self.embed.forward(&ids)?.to_dtype(DType::F32)?;
        if cfg.scale_embeddings {
            x = (x * (cfg.hidden_size as f64).sqrt())?;
        }
        // cos/sin per row for each distinct rotary table: [t, 1, d/2].
        let pos: Vec<f32> = batch.positions.iter().map(|&p| p as f32).collect();
        let pos = Tensor::from_vec(pos, (t, 1), &self.device)?;
        let mut tables = Vec::with_capacity(self.ropes.len());
        for inv in &self.ropes {
            let inv = Tensor::from_slice(inv, (1, inv.len()), &self.device)?;
            let freqs = pos.matmul(&inv)?;
            tables.push((
                freqs.cos()?.reshape((t, 1, d / 2))?,
                freqs.sin()?.reshape((t, 1, d / 2))?,
            ));
        }
        let eps = cfg.rms_norm_eps as f32;
        let kv_shape = kv.shape();
        for (li, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let hs = candle_nn::ops::rms_norm(&x, &layer.attn_norm.t, eps)?;
            let (mut q, mut k, v) = match &layer.qkv {
                Qkv::Split(q, k, v) => (q.forward(&hs)?, k.forward(&hs)?, v.forward(&hs)?),
                Qkv::Fused(f) => {
                    let all = f.forward(&hs)?;
                    (
                        all.narrow(1, 0, hq * d)?,
                        all.narrow(1, hq * d, hk * d)?,
                        all.narrow(1, (hq + hk) * d, hk * d)?,
                    )
                }
            };
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = candle_nn::ops::rms_norm(&q.contiguous()?.reshape((t * hq, d))?, &qn.t, eps)?;
                k = candle_nn::ops::rms_norm(&k.contiguous()?.reshape((t * hk, d))?, &kn.t, eps)?;
            }
            let (cos, sin) = &tables[layer.rope];
            let q = rope(
                &q.contiguous()?.reshape((t, hq, 1, d))?,
                cos,
                sin,
                cfg.rope_style,
            )?;
            let k = rope(
                &k.contiguous()?.reshape((t, hk, 1, d))?,
                cos,
                sin,
                cfg.rope_style,
            )?;
            let v = v.contiguous()?;
            let params = AttnParams {
                heads: hq,
                scale: cfg.attn_scale as f32,
                window: layer.window,
                softcap: cfg.attn_logit_softcapping.map(|c| c as f32),
            };
            let attn = attention(kv, li, &kv_shape, &batch.seqs, &q, &k, &v, params)?;
            let mut y = layer.o.forward(&attn.reshape((t, hq * d))?)?;
            if let Some(n) = &layer.post_attn_norm {
                y = candle_nn::ops::rms_norm(&y, &n.t, eps)?;
            }
            x = (residual + y)?;
            let residual = &x;
            let hs = candle_nn::ops::rms_norm(&x, &layer.ffn_norm.t, eps)?;
            let (gate, up) = match &layer.gate_up {
                GateUp::Split(g, u) => (g.forward(&hs)?, u.forward(&hs)?),
                GateUp::Fused(f) => {
                    let all = f.forward(&hs)?;
                    let i = cfg.intermediate_size;
                    (all.narrow(1, 0, i)?, all.narrow(1, i, i)?)
                }
            };
            let act = match cfg.activation {
                Activation::Silu => candle_nn::ops::silu(&gate.contiguous()?)?,
                Activation::GeluTanh => gate.contiguous()?.gelu()?,
            };
            let mut y = layer.down.forward(&(act * up)?)?;
            if let Some(n) = &layer.post_ffn_norm {
                y = candle_nn::ops::rms_norm(&y, &n.t, eps)?;
            }
            x = (residual + y)?;
        }
        if batch.logit_rows.is_empty() {
            return Ok(Tensor::zeros(
                (0, cfg.vocab_size),
                DType::F32,
                &self.device,
            )?);
        }
        let x = if batch.logit_rows.len() == t {
            x
        } else {
            let rows = Tensor::from_slice(&batch.logit_rows, batch.logit_rows.len(), &self.device)?;
            x.index_select(&rows, 0)?
        };
        let x = candle_nn::ops::rms_norm(&x, &self.final_norm.t, eps)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        Ok(match cfg.final_logit_softcapping {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }
}

fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, style: RopeStyle) -> Result<Tensor> {
    let x = x.contiguous()?;
    Ok(match style {
        RopeStyle::Half => candle_nn::rotary_emb::rope(&x, cos, sin)?,
        RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
    })
}

/// Writes `k`/`v` into the cache and attends. On the CPU this runs the fused
/// paged kernel over the cache's memory directly.
#[allow(clippy::too_many_arguments)] // one call site; the arguments are the layer's state
fn attention(
    kv: &mut KvCache,
    layer: usize,
    shape: &KvShape,
    seqs: &[SeqView<'_>],
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    params: AttnParams,
) -> Result<Tensor> {
    let dims = q.dims().to_vec();
    let qv = cpu_f32(q)?;
    let kv_ = kv.layer_mut(layer)?;
    kv_.write(shape, seqs, &cpu_f32(k)?, &cpu_f32(v)?)?;
    let mut owner = vec![];
    super::kv::row_owners(seqs, dims[0], &mut owner);
    let mut out = vec![];
    kv_.attend(shape, seqs, &owner, &qv, params, &mut out)?;
    Ok(Tensor::from_vec(out, dims, q.device())?)
}

fn cpu_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}
