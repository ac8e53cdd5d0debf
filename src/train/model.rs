//! The trainable Llama: whole sequences, causal mask, every op differentiable.
//!
//! Parameters are candle `Var`s named as in Hugging Face checkpoints, so the
//! trained weights are saved as-is and loaded by the serving engine.

use std::collections::HashMap;

use candle_core::{D, DType, Device, Tensor, Var};

use crate::engine::ModelConfig;

/// A Llama whose parameters are trainable variables.
pub struct TrainModel {
    cfg: ModelConfig,
    vars: Vec<(String, Var)>,
    index: HashMap<String, usize>,
    inv_freq: Tensor,
}

impl TrainModel {
    /// Wraps named variables (Hugging Face names) for `cfg`.
    pub fn new(
        cfg: ModelConfig,
        vars: Vec<(String, Var)>,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let index = vars
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        let inv = cfg.rope.inv_freq(cfg.head_dim);
        let len = inv.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv, (1, len), device)?,
            cfg,
            vars,
            index,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Every variable with its name, in a stable order.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    fn w(&self, name: &str) -> candle_core::Result<&Tensor> {
        self.index
            .get(name)
            .map(|&i| self.vars[i].1.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg(format!("missing parameter {name}")))
    }

    fn linear(&self, x: &Tensor, name: &str) -> candle_core::Result<Tensor> {
        let y = x.broadcast_matmul(&self.w(&format!("{name}.weight"))?.t()?)?;
        match self.index.contains_key(&format!("{name}.bias")) {
            true => y.broadcast_add(self.w(&format!("{name}.bias"))?),
            false => Ok(y),
        }
    }

    /// Logits `[batch, time, vocab]` for token ids `[batch, time]`.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = ids.dims2()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;
        let dev = ids.device();
        let pos = Tensor::arange(0u32, t as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((t, 1))?;
        let freqs = pos.matmul(&self.inv_freq)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), dev)?;
        let scale = cfg.attn_scale;

        let mut x = self
            .w("model.embed_tokens.weight")?
            .embedding(&ids.flatten_all()?)?
            .reshape((b, t, cfg.hidden_size))?;
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let h = candle_nn::ops::rms_norm_slow(
                &x,
                self.w(&format!("{p}.input_layernorm.weight"))?,
                eps,
            )?;
            let heads = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
                y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = heads(self.linear(&h, &format!("{p}.self_attn.q_proj"))?, nh)?;
            let k = heads(self.linear(&h, &format!("{p}.self_attn.k_proj"))?, nkv)?;
            let v = heads(self.linear(&h, &format!("{p}.self_attn.v_proj"))?, nkv)?;
            let q = candle_nn::rotary_emb::rope_slow(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_slow(&k, &cos, &sin)?;
            let (k, v) = if nh != nkv {
                let rep = nh / nkv;
                let expand = |x: Tensor| -> candle_core::Result<Tensor> {
                    x.unsqueeze(2)?
                        .broadcast_as((b, nkv, rep, t, hd))?
                        .reshape((b, nh, t, hd))
                };
                (expand(k)?, expand(v)?)
            } else {
                (k, v)
            };
            let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?;
            let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
            x = (x + self.linear(&y, &format!("{p}.self_attn.o_proj"))?)?;
            let h = candle_nn::ops::rms_norm_slow(
                &x,
                self.w(&format!("{p}.post_attention_layernorm.weight"))?,
                eps,
            )?;
            let gate = self.linear(&h, &format!("{p}.mlp.gate_proj"))?.silu()?;
            let up = self.linear(&h, &format!("{p}.mlp.up_proj"))?;
            x = (x + self.linear(&(gate * up)?, &format!("{p}.mlp.down_proj"))?)?;
        }
        let x = candle_nn::ops::rms_norm_slow(&x, self.w("model.norm.weight")?, eps)?;
        let head = if self.index.contains_key("lm_head.weight") {
            self.w("lm_head.weight")?
        } else {
            self.w("model.embed_tokens.weight")?
        };
        x.broadcast_matmul(&head.t()?)
    }

    /// Mean cross-entropy over positions where `mask` is 1, and the number of
    /// such positions.
    pub fn loss(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<(Tensor, f32)> {
        let logits = self.forward(ids)?;
        let (b, t, v) = logits.dims3()?;
        let logp = candle_nn::ops::log_softmax(&logits.reshape((b * t, v))?, D::Minus1)?;
        let picked = logp
            .gather(&targets.reshape((b * t, 1))?, 1)?
            .reshape(b * t)?;
        let mask = mask.reshape(b * t)?;
        let n = mask.sum_all()?.to_scalar::<f32>()?;
        let loss = ((picked * &mask)?.sum_all()? * (-1.0 / n.max(1.0) as f64))?;
        Ok((loss, n))
    }
}
