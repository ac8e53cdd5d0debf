//! The CPU path of a step: host slices through our own kernels (`cpu/`),
//! fused elementwise loops, and buffers reused from step to step. candle is
//! used here only for quantized (GGUF) matmuls kept as blocks and for
//! embedding rows.
//!
//! Invariant: every per-row computation (norms, matmul outputs, attention)
//! depends only on that row and its own sequence's cache, never on what else
//! is in the batch.

use super::batch::Batch;
use super::config::{Activation, RopeStyle};
use super::cpu::attn::{AttnParams, attend, row_owners};
use super::cpu::math::{dot, exp_fast};
use super::cpu::profile::{Laps, Op};
use super::kv::KvCache;
use super::model::{GateUp, Model, Qkv};
use super::{Error, Result};

/// Activation buffers of one step, kept between steps by whoever owns the
/// KV cache (the engine thread), so no op allocates once shapes are warm.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    y: Vec<f32>,
    gate_up: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    logits: Vec<f32>,
    /// Final-normed hidden states of the step's `hidden_rows`.
    hidden: Vec<f32>,
    owner: Vec<(u32, u32)>,
    /// cos then sin, `[rows, head_dim / 2]` each, per rotary table.
    rope: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Scratch {
    /// The last host step's final-normed hidden states of its logits rows
    /// (row-major `[rows, hidden]`): the LM head's input, which drift
    /// detection mean-pools into a prompt embedding. Empty on the tensor
    /// path, which keeps them on the device.
    pub fn head_input(&self) -> &[f32] {
        &self.h
    }

    /// The last step's final-normed hidden states of its batch's
    /// `hidden_rows` (row-major `[rows, hidden]`), on either path: what
    /// embedding jobs mean-pool. Empty when the step asked none.
    pub fn hidden_rows(&self) -> &[f32] {
        &self.hidden
    }

    /// The buffer the tensor path fills with those states.
    pub(crate) fn hidden_rows_mut(&mut self) -> &mut Vec<f32> {
        &mut self.hidden
    }
}

/// RMSNorm of each `width`-wide row of `x` into `out`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    let width = w.len();
    out.resize(x.len(), 0.0);
    for (xr, or) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let ss = dot(xr, xr);
        let inv = 1.0 / (ss / width as f32 + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// RMSNorm in place.
fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let width = w.len();
    for xr in x.chunks_exact_mut(width) {
        let ss = dot(xr, xr);
        let inv = 1.0 / (ss / width as f32 + eps).sqrt();
        for (v, &g) in xr.iter_mut().zip(w) {
            *v = *v * inv * g;
        }
    }
}

/// Rotates every head of every row by its row's angles.
fn rope(x: &mut [f32], heads: usize, d: usize, cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = d / 2;
    for (r, row) in x.chunks_exact_mut(heads * d).enumerate() {
        let (c, s) = (
            &cos[r * half..(r + 1) * half],
            &sin[r * half..(r + 1) * half],
        );
        for head in row.chunks_exact_mut(d) {
            match style {
                RopeStyle::Half => {
                    let (a, b) = head.split_at_mut(half);
                    for i in 0..half {
                        let (x0, x1) = (a[i], b[i]);
                        a[i] = x0 * c[i] - x1 * s[i];
                        b[i] = x0 * s[i] + x1 * c[i];
                    }
                }
                RopeStyle::Interleaved => {
                    for i in 0..half {
                        let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = x0 * c[i] - x1 * s[i];
                        head[2 * i + 1] = x0 * s[i] + x1 * c[i];
                    }
                }
            }
        }
    }
}

/// GELU, tanh approximation (as `gelu_pytorch_tanh`), with
/// `1 + tanh(u) = 2 / (1 + e^(−2u))`.
#[inline]
fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/π)
    let u = C * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp_fast(-2.0 * u))
}

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp_fast(-x))
}

/// `out = act(gate) · up`, monomorphised per activation so it vectorizes.
#[inline]
fn gated(g: &[f32], u: &[f32], out: &mut [f32], act: impl Fn(f32) -> f32) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = act(g) * u;
    }
}

/// Copies columns `[at, at + width)` of each `stride`-wide row.
fn columns(src: &[f32], stride: usize, at: usize, width: usize, out: &mut Vec<f32>) {
    out.clear();
    for row in src.chunks_exact(stride) {
        out.extend_from_slice(&row[at..at + width]);
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// One step on the CPU. See [`Model::forward`].
pub(crate) fn forward(
    m: &Model,
    batch: &Batch<'_>,
    kv: &mut KvCache,
    s: &mut Scratch,
    logits: &mut Vec<f32>,
) -> Result<()> {
    let cfg = &m.cfg;
    let t = batch.len();
    let (d, hq, hk, hidden) = (
        cfg.head_dim,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.hidden_size,
    );
    let eps = cfg.rms_norm_eps as f32;
    let shape = kv.shape();
    let mut laps = Laps::start();
    {
        m.embed.gather_host(&batch.tokens, &mut s.x)?;
        if s.x.len() != t * hidden {
            return Err(Error::Internal(
                "embedding rows have the wrong width".into(),
            ));
        }
        if cfg.scale_embeddings {
            // As Hugging Face: the scale is rounded to the activation dtype first.
            let scale = (hidden as f32).sqrt();
            s.x.iter_mut().for_each(|v| *v *= scale);
        }
        row_owners(&batch.seqs, t, &mut s.owner);
        s.rope.resize_with(m.ropes.len(), Default::default);
        let half = d / 2;
        for (inv, (cos, sin)) in m.ropes.iter().zip(s.rope.iter_mut()) {
            cos.clear();
            sin.clear();
            for &p in &batch.positions {
                for &f in inv {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
            debug_assert_eq!(cos.len(), t * half);
        }
    }
    laps.lap(Op::Setup);
    for (li, layer) in m.layers.iter().enumerate() {
        let (group, cache) = kv.layer_mut(li)?;
        rms_norm(&s.x, &layer.attn_norm.host, eps, &mut s.h);
        laps.lap(Op::Norm);
        match &layer.qkv {
            Qkv::Fused(f) => {
                f.forward_host(&s.h, t, &mut s.qkv)?;
                let w = f.out_features();
                columns(&s.qkv, w, 0, hq * d, &mut s.q);
                columns(&s.qkv, w, hq * d, hk * d, &mut s.k);
                columns(&s.qkv, w, (hq + hk) * d, hk * d, &mut s.v);
            }
            Qkv::Split(q, k, v) => {
                q.forward_host(&s.h, t, &mut s.q)?;
                k.forward_host(&s.h, t, &mut s.k)?;
                v.forward_host(&s.h, t, &mut s.v)?;
            }
        }
        laps.lap(Op::Qkv);
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            rms_norm_in_place(&mut s.q, &qn.host, eps);
            rms_norm_in_place(&mut s.k, &kn.host, eps);
            laps.lap(Op::Norm);
        }
        let (cos, sin) = &s.rope[layer.rope];
        rope(&mut s.q, hq, d, cos, sin, cfg.rope_style);
        rope(&mut s.k, hk, d, cos, sin, cfg.rope_style);
        laps.lap(Op::Rope);
        cache.write(&shape, group, &batch.seqs, &s.k, &s.v)?;
        laps.lap(Op::KvWrite);
        let params = AttnParams {
            heads: hq,
            scale: cfg.attn_scale as f32,
            window: layer.window,
            softcap: cfg.attn_logit_softcapping.map(|c| c as f32),
        };
        attend(
            cache,
            &shape,
            group,
            &batch.seqs,
            &s.owner,
            &s.q,
            params,
            &mut s.attn,
        )?;
        laps.lap(Op::Attention);
        layer.o.forward_host(&s.attn, t, &mut s.y)?;
        laps.lap(Op::O);
        if let Some(n) = &layer.post_attn_norm {
            rms_norm_in_place(&mut s.y, &n.host, eps);
        }
        laps.lap(Op::Norm);
        add_in_place(&mut s.x, &s.y);
        laps.lap(Op::Residual);

        rms_norm(&s.x, &layer.ffn_norm.host, eps, &mut s.h);
        laps.lap(Op::Norm);
        let inter = cfg.intermediate_size;
        s.act.clear();
        s.act.resize(t * inter, 0.0);
        let gate_and_up = match &layer.gate_up {
            GateUp::Fused(f) => {
                f.forward_host(&s.h, t, &mut s.gate_up)?;
                None
            }
            GateUp::Split(g, u) => {
                g.forward_host(&s.h, t, &mut s.gate_up)?;
                u.forward_host(&s.h, t, &mut s.up)?;
                Some(())
            }
        };
        laps.lap(Op::GateUp);
        // Rows of (gate, up) pairs, fused or from two buffers.
        for r in 0..t {
            let (g, u) = match gate_and_up {
                None => s.gate_up[r * 2 * inter..(r + 1) * 2 * inter].split_at(inter),
                Some(()) => (
                    &s.gate_up[r * inter..(r + 1) * inter],
                    &s.up[r * inter..(r + 1) * inter],
                ),
            };
            let out = &mut s.act[r * inter..(r + 1) * inter];
            match cfg.activation {
                Activation::Silu => gated(g, u, out, silu),
                Activation::GeluTanh => gated(g, u, out, gelu_tanh),
            }
        }
        laps.lap(Op::Activation);
        layer.down.forward_host(&s.act, t, &mut s.y)?;
        laps.lap(Op::Down);
        if let Some(n) = &layer.post_ffn_norm {
            rms_norm_in_place(&mut s.y, &n.host, eps);
        }
        laps.lap(Op::Norm);
        add_in_place(&mut s.x, &s.y);
        laps.lap(Op::Residual);
    }
    // Embedding rows: the LM head's input, without the head.
    s.hidden.clear();
    for &r in &batch.hidden_rows {
        s.hidden
            .extend_from_slice(&s.x[r as usize * hidden..(r as usize + 1) * hidden]);
    }
    rms_norm_in_place(&mut s.hidden, &m.final_norm.host, eps);
    let rows = batch.logit_rows.len();
    if rows == 0 {
        logits.clear();
        return Ok(());
    }
    s.h.clear();
    for &r in &batch.logit_rows {
        s.h.extend_from_slice(&s.x[r as usize * hidden..(r as usize + 1) * hidden]);
    }
    rms_norm_in_place(&mut s.h, &m.final_norm.host, eps);
    m.lm_head.forward_host(&s.h, rows, &mut s.logits)?;
    if let Some(cap) = cfg.final_logit_softcapping {
        let cap = cap as f32;
        s.logits
            .iter_mut()
            .for_each(|l| *l = cap * (*l / cap).tanh());
    }
    laps.lap(Op::Head);
    std::mem::swap(logits, &mut s.logits);
    Ok(())
}
