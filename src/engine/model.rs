//! The batched decoder: one forward pass over the flattened tokens of many
//! sequences (selective batching).
//!
//! Every linear layer is one matmul over all rows of the step; only attention
//! looks at sequence boundaries, through [`super::SeqView`]s and the paged
//! cache. The model takes `&self`: all per-sequence state lives in the
//! [`super::KvCache`]. Running a step is `forward.rs`.

use candle_core::{DType, Device, Tensor};

use super::config::{ModelConfig, Rope};
use super::kv::{KvCache, KvDtype, KvGroups, KvShape};
use super::weights::{Embedding, Linear, Role, WeightSource};
use super::{EnginePath, Result};

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
    pub(crate) device: Device,
    /// Which implementation runs its steps (its weights are laid out for it).
    pub(crate) path: EnginePath,
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
            path: if src.is_host() {
                EnginePath::Host
            } else {
                EnginePath::Tensor
            },
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

    /// Which implementation runs its steps.
    pub fn engine_path(&self) -> EnginePath {
        self.path
    }

    /// A KV cache of `blocks` blocks for this model: host memory for the
    /// host path, tensors on the model's device for the tensor path
    /// (allocated by the first step, so an allocation failure is that
    /// step's error).
    pub fn kv_cache(&self, block_size: usize, blocks: usize) -> KvCache {
        let shape = self.kv_shape(block_size);
        self.kv_cache_of(shape, KvGroups::single(shape.layers), blocks)
    }

    /// As [`Model::kv_cache`], of a given shape (e.g. f16) and grouping
    /// of layers (e.g. [`Model::kv_groups`]).
    pub fn kv_cache_of(&self, shape: KvShape, groups: KvGroups, blocks: usize) -> KvCache {
        match self.path {
            EnginePath::Host => KvCache::with_groups(shape, groups, blocks),
            EnginePath::Tensor => KvCache::on_device(shape, groups, blocks, &self.device),
        }
    }

    /// The KV cache shape this model needs, storing f32 (exact; the
    /// scheduler picks its configured dtype with [`KvShape::with_dtype`]).
    pub fn kv_shape(&self, block_size: usize) -> KvShape {
        KvShape {
            layers: self.cfg.num_layers,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            block_size,
            dtype: KvDtype::F32,
            groups: 1,
        }
    }

    /// How this model's layers share KV blocks: grouped by attention
    /// window, so sliding-window layers give back what their window left.
    pub fn kv_groups(&self) -> KvGroups {
        KvGroups::by_window(&self.layers.iter().map(|l| l.window).collect::<Vec<_>>())
    }
}
