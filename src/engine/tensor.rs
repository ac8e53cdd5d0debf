//! The tensor path: one step as candle ops on the model's device (CUDA,
//! Metal, or candle's CPU device), for every op but attention, which runs
//! on the host over the paged cache.

use candle_core::{DType, Tensor};

use super::Result;
use super::batch::{Batch, SeqView};
use super::config::{Activation, RopeStyle};
use super::cpu::attn::{AttnParams, attend, row_owners};
use super::kv::{KvCache, KvShape};
use super::model::{GateUp, Model, Qkv};

/// One step as candle tensor ops on the model's device, for everything but
/// attention. See [`Model::forward`].
pub(crate) fn forward(m: &Model, batch: &Batch<'_>, kv: &mut KvCache) -> Result<Tensor> {
    let t = batch.len();
    let cfg = &m.cfg;
    let (d, hq, hk) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
    let ids = Tensor::from_slice(&batch.tokens, t, &m.device)?;
    let mut x = m.embed.forward(&ids)?.to_dtype(DType::F32)?;
    if cfg.scale_embeddings {
        x = (x * (cfg.hidden_size as f64).sqrt())?;
    }
    // cos/sin per row for each distinct rotary table: [t, 1, d/2].
    let pos: Vec<f32> = batch.positions.iter().map(|&p| p as f32).collect();
    let pos = Tensor::from_vec(pos, (t, 1), &m.device)?;
    let mut tables = Vec::with_capacity(m.ropes.len());
    for inv in &m.ropes {
        let inv = Tensor::from_slice(inv, (1, inv.len()), &m.device)?;
        let freqs = pos.matmul(&inv)?;
        tables.push((
            freqs.cos()?.reshape((t, 1, d / 2))?,
            freqs.sin()?.reshape((t, 1, d / 2))?,
        ));
    }
    let eps = cfg.rms_norm_eps as f32;
    let kv_shape = kv.shape();
    for (li, layer) in m.layers.iter().enumerate() {
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
        return Ok(Tensor::zeros((0, cfg.vocab_size), DType::F32, &m.device)?);
    }
    let x = if batch.logit_rows.len() == t {
        x
    } else {
        let rows = Tensor::from_slice(&batch.logit_rows, batch.logit_rows.len(), &m.device)?;
        x.index_select(&rows, 0)?
    };
    let x = candle_nn::ops::rms_norm(&x, &m.final_norm.t, eps)?;
    let logits = m.lm_head.forward(&x)?.to_dtype(DType::F32)?;
    Ok(match cfg.final_logit_softcapping {
        Some(cap) => ((logits / cap)?.tanh()? * cap)?,
        None => logits,
    })
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
    row_owners(seqs, dims[0], &mut owner);
    let mut out = vec![];
    attend(kv_, shape, seqs, &owner, &qv, params, &mut out)?;
    Ok(Tensor::from_vec(out, dims, q.device())?)
}

fn cpu_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}
