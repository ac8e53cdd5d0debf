//! The tensor path: one step as candle ops on the model's device (CUDA,
//! Metal, or candle's CPU device), attention over the device-resident paged
//! KV cache included, so a step moves only token ids, positions, slot
//! indices and masks to the device and logits (or sampled ids) back.
//!
//! Attention: the new rows' keys and values are scattered into their slots
//! of the layer's cache tensor (`scatter_set`); each sequence then gathers
//! the slots it can see (`index_select` through its block table) and attends
//! with batched matmuls and a masked softmax, in f32. Sequences decoding one
//! token are attended together as one padded batch; a prefill chunk is
//! attended alone. What a row computes depends only on its own sequence
//! (padding is masked out), so a row's result does not depend on the batch.
//! The indices and masks are built once per step on the host, one set per
//! distinct attention window, and shared by every layer.

use candle_core::{D, DType, Device, Tensor};

use super::batch::{Batch, SeqView};
use super::config::{Activation, RopeStyle};
use super::kv::{KvCache, KvShape};
use super::model::{GateUp, Model, Qkv};
use super::{Error, Result};

/// One step as candle tensor ops on the model's device. Returns
/// `[batch.logit_rows.len(), vocab]` f32 logits on the device, and copies
/// the final-normed hidden states of the batch's `hidden_rows` (embedding
/// jobs) back into `hidden` as f32.
pub(crate) fn forward_with_hidden(
    m: &Model,
    batch: &Batch<'_>,
    kv: &mut KvCache,
    hidden: &mut Vec<f32>,
) -> Result<Tensor> {
    hidden.clear();
    let t = batch.len();
    let cfg = &m.cfg;
    let (d, hq, hk) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
    if hk == 0 || !hq.is_multiple_of(hk) {
        return Err(Error::Internal(format!("{hq} heads over {hk} kv heads")));
    }
    let dev = &m.device;
    let ids = Tensor::from_slice(&batch.tokens, t, dev)?;
    let mut x = m.embed.forward(&ids)?.to_dtype(DType::F32)?;
    if cfg.scale_embeddings {
        x = (x * (cfg.hidden_size as f64).sqrt())?;
    }
    // cos/sin per row for each distinct rotary table: [t, 1, d/2].
    let pos: Vec<f32> = batch.positions.iter().map(|&p| p as f32).collect();
    let pos = Tensor::from_vec(pos, (t, 1), dev)?;
    let mut tables = Vec::with_capacity(m.ropes.len());
    for inv in &m.ropes {
        let inv = Tensor::from_slice(inv, (1, inv.len()), dev)?;
        let freqs = pos.matmul(&inv)?;
        tables.push((
            freqs.cos()?.reshape((t, 1, d / 2))?,
            freqs.sin()?.reshape((t, 1, d / 2))?,
        ));
    }
    let kv_shape = kv.shape();
    // Each distinct (layer group, window) among the layers gets a plan.
    let mut kinds: Vec<LayerKind> = vec![];
    for (li, l) in m.layers.iter().enumerate() {
        let kind = (kv.groups().of_layer(li).0, l.window);
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    let plan = AttnPlan::new(batch, &kv_shape, &kinds, dev)?;
    let eps = cfg.rms_norm_eps as f32;
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
        let (group, kc, vc) = kv.device_layer(li)?;
        let width = hk * d;
        let k = k.reshape((t, width))?.to_dtype(kc.dtype())?.contiguous()?;
        let v = v.to_dtype(vc.dtype())?.contiguous()?;
        kc.scatter_set(&plan.write[group], &k, 0)?;
        vc.scatter_set(&plan.write[group], &v, 0)?;
        let q = q.reshape((t, hq, d))?.to_dtype(DType::F32)?;
        let q = (q * cfg.attn_scale)?;
        let softcap = cfg.attn_logit_softcapping;
        let attn = plan.attend((group, layer.window), &q, kc, vc, (hk, d), softcap)?;
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
    if !batch.hidden_rows.is_empty() {
        let rows = Tensor::from_slice(&batch.hidden_rows, batch.hidden_rows.len(), dev)?;
        let h = candle_nn::ops::rms_norm(&x.index_select(&rows, 0)?, &m.final_norm.t, eps)?;
        hidden.extend(h.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    if batch.logit_rows.is_empty() {
        return Ok(Tensor::zeros((0, cfg.vocab_size), DType::F32, dev)?);
    }
    let x = if batch.logit_rows.len() == t {
        x
    } else {
        let rows = Tensor::from_slice(&batch.logit_rows, batch.logit_rows.len(), dev)?;
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

/// The device-side indices of one step's attention, built once and shared
/// by every layer.
struct AttnPlan {
    /// Where each new row's keys and values go: the row's cache slot,
    /// repeated across the row's `kv_heads * head_dim` columns (the shape
    /// `scatter_set` wants), `[rows, width]` u32, per layer group.
    write: Vec<Tensor>,
    /// Groups of rows attended together, per (layer group, window).
    windows: Vec<(LayerKind, Vec<Group>)>,
    /// Maps the groups' concatenated output back to row order (`None` when
    /// the groups already are in row order).
    order: Option<Tensor>,
}

/// A layer's (KV group, attention window): layers alike share a plan.
type LayerKind = (usize, Option<usize>);

/// Rows attended in one padded batch: `b` sequences of `l` new rows each,
/// over `n` gathered cache slots each.
struct Group {
    b: usize,
    l: usize,
    n: usize,
    /// Which rows of the step's queries (`[b * l]`), or a contiguous run.
    rows: Rows,
    /// Cache slots to gather, `[b * n]` u32 (padding repeats a real slot).
    slots: Tensor,
    /// Additive mask, 0 or −∞, `[b, 1, 1, l, n]` f32.
    mask: Tensor,
}

enum Rows {
    Run { offset: usize, len: usize },
    Pick(Tensor),
}

impl AttnPlan {
    fn new(batch: &Batch<'_>, shape: &KvShape, kinds: &[LayerKind], dev: &Device) -> Result<Self> {
        let (bs, groups) = (shape.block_size, shape.groups);
        let width = shape.kv_heads * shape.head_dim;
        let t = batch.len();
        let slot = |s: &SeqView<'_>, p: usize, g: usize| {
            s.blocks[p / bs * groups + g] * bs as u32 + (p % bs) as u32
        };
        for s in &batch.seqs {
            if s.blocks.len() / groups * bs < s.start_pos + s.len {
                return Err(Error::Internal(format!(
                    "block table of {} blocks cannot hold position {}",
                    s.blocks.len(),
                    s.start_pos + s.len - 1
                )));
            }
        }
        let mut write = Vec::with_capacity(groups);
        for g in 0..groups {
            let mut rows = Vec::with_capacity(t * width);
            for s in &batch.seqs {
                for p in s.start_pos..s.start_pos + s.len {
                    rows.extend(std::iter::repeat_n(slot(s, p, g), width));
                }
            }
            if rows.len() != t * width {
                return Err(Error::Internal("sequences do not cover the step".into()));
            }
            write.push(Tensor::from_vec(rows, (t, width), dev)?);
        }
        // Sequences decoding one token share a padded group; each longer
        // chunk is a group of its own. Groups keep their rows in row order.
        let decodes: Vec<usize> = (0..batch.seqs.len())
            .filter(|&i| batch.seqs[i].len == 1)
            .collect();
        let mut members: Vec<Vec<usize>> = vec![];
        if !decodes.is_empty() {
            members.push(decodes);
        }
        members.extend(
            (0..batch.seqs.len())
                .filter(|&i| batch.seqs[i].len > 1)
                .map(|i| vec![i]),
        );
        let row_order: Vec<u32> = members
            .iter()
            .flatten()
            .flat_map(|&i| {
                let s = &batch.seqs[i];
                (s.offset..s.offset + s.len).map(|r| r as u32)
            })
            .collect();
        let order = if row_order.iter().enumerate().all(|(i, &r)| i == r as usize) {
            None
        } else {
            let mut inverse = vec![0u32; t];
            for (i, &r) in row_order.iter().enumerate() {
                inverse[r as usize] = i as u32;
            }
            Some(Tensor::from_vec(inverse, t, dev)?)
        };
        let mut windows = Vec::with_capacity(kinds.len());
        for &(g, w) in kinds {
            let mut groups = Vec::with_capacity(members.len());
            for ids in &members {
                let seqs: Vec<&SeqView<'_>> = ids.iter().map(|&i| &batch.seqs[i]).collect();
                // Visible positions of a sequence: from what its first new
                // row can see to its last new row.
                let lo = |s: &SeqView<'_>| w.map_or(0, |w| (s.start_pos + 1).saturating_sub(w));
                let n = seqs
                    .iter()
                    .map(|s| s.start_pos + s.len - lo(s))
                    .max()
                    .unwrap_or(0);
                let (b, l) = (seqs.len(), seqs[0].len);
                let mut slots = Vec::with_capacity(b * n);
                let mut mask = Vec::with_capacity(b * l * n);
                for s in &seqs {
                    let lo = lo(s);
                    let end = s.start_pos + s.len;
                    for j in 0..n {
                        slots.push(slot(s, (lo + j).min(end - 1), g));
                    }
                    for i in 0..l {
                        let p = s.start_pos + i;
                        let first = w.map_or(0, |w| (p + 1).saturating_sub(w));
                        for j in 0..n {
                            let kp = lo + j;
                            let visible = kp <= p && kp >= first;
                            mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
                        }
                    }
                }
                let rows = if b == 1 {
                    Rows::Run {
                        offset: seqs[0].offset,
                        len: l,
                    }
                } else {
                    let pick: Vec<u32> = seqs.iter().map(|s| s.offset as u32).collect();
                    Rows::Pick(Tensor::from_vec(pick, b, dev)?)
                };
                groups.push(Group {
                    b,
                    l,
                    n,
                    rows,
                    slots: Tensor::from_vec(slots, b * n, dev)?,
                    mask: Tensor::from_vec(mask, (b, 1, 1, l, n), dev)?,
                });
            }
            windows.push(((g, w), groups));
        }
        Ok(Self {
            write,
            windows,
            order,
        })
    }

    /// Attention of every row (`q`: `[rows, heads, head_dim]` f32, already
    /// scaled) over the layer's cache, which holds the new rows already.
    fn attend(
        &self,
        kind: LayerKind,
        q: &Tensor,
        kc: &Tensor,
        vc: &Tensor,
        (hk, d): (usize, usize),
        softcap: Option<f64>,
    ) -> Result<Tensor> {
        let (_, groups) = self
            .windows
            .iter()
            .find(|(k, _)| *k == kind)
            .ok_or_else(|| Error::Internal("no attention plan for this layer".into()))?;
        let hq = q.dim(1)?;
        let group = hq / hk;
        let mut outs = Vec::with_capacity(groups.len());
        for g in groups {
            let (b, l, n) = (g.b, g.l, g.n);
            let q = match &g.rows {
                Rows::Run { offset, len } => q.narrow(0, *offset, *len)?,
                Rows::Pick(rows) => q.index_select(rows, 0)?,
            };
            // [b, l, hk, group, d] → [b, hk, group · l, d]
            let q = q
                .reshape((b, l, hk, group, d))?
                .permute((0, 2, 3, 1, 4))?
                .contiguous()?
                .reshape((b, hk, group * l, d))?;
            let gather = |c: &Tensor| -> Result<Tensor> {
                Ok(c.index_select(&g.slots, 0)?
                    .to_dtype(DType::F32)?
                    .reshape((b, n, hk, d))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let (k, v) = (gather(kc)?, gather(vc)?);
            let mut scores = q.matmul(&k.t()?)?;
            if let Some(cap) = softcap {
                scores = ((scores / cap)?.tanh()? * cap)?;
            }
            let scores = scores
                .reshape((b, hk, group, l, n))?
                .broadcast_add(&g.mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let out = probs.reshape((b, hk, group * l, n))?.matmul(&v)?;
            // [b, hk, group, l, d] → [b · l, hq, d]
            let out = out
                .reshape((b, hk, group, l, d))?
                .permute((0, 3, 1, 2, 4))?
                .contiguous()?
                .reshape((b * l, hq, d))?;
            outs.push(out);
        }
        let out = Tensor::cat(&outs, 0)?;
        Ok(match &self.order {
            Some(order) => out.index_select(order, 0)?,
            None => out,
        })
    }
}

/// The greedy choice of each row of `logits` (`[rows, vocab]` on the
/// device): the index of the largest logit, lowest index on ties (as the
/// host sampler). Only the ids come back.
pub(crate) fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// Columns per device sort. candle's CUDA sort keeps a row in shared memory
/// (4 KiB at 1,024 indices), so longer rows are sorted in chunks of this
/// many and the best of each chunk sorted again.
const SORT_COLS: usize = 1024;

/// The most candidates per row [`top_rows`] selects, the sampler's bound:
/// at most half a chunk, so each round of chunked sorting at least halves a
/// row.
pub(crate) const MAX_TOP: usize = super::sampling::MAX_DEVICE_TOP_K;
const _: () = assert!(MAX_TOP <= SORT_COLS / 2);

/// Each row's `k` best logits (`logits`: `[rows, vocab]` on the device),
/// chosen on the device so that only `rows × k` ids and logits come back.
/// The set is the host sampler's: every logit above the k-th largest, then
/// the lowest ids among those equal to it (NaN never chosen). Rows come back
/// best first (larger logit, then lower id), `k` entries each (fewer only
/// when a row has fewer than `k` non-NaN logits: the rest are `u32::MAX`).
///
/// Device sorts are not stable, so the k-th largest value is found first
/// (its value does not depend on how ties are ordered), then a second
/// selection over a key that puts every larger logit first and orders the
/// logits equal to it by id.
pub(crate) fn top_rows(logits: &Tensor, k: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    let (rows, vocab) = logits.dims2()?;
    let k = k.min(vocab).min(MAX_TOP);
    if rows == 0 || k == 0 {
        return Ok((vec![], vec![]));
    }
    let dev = logits.device();
    // Constants broadcast over the rows (stride 0: nothing allocated per
    // element).
    let fill = |v: f32| -> Result<Tensor> { Ok(Tensor::new(v, dev)?.broadcast_as((rows, vocab))?) };
    let neg_inf = fill(f32::NEG_INFINITY)?;
    // NaN sorts anywhere: it becomes −∞ (and is dropped below by its key).
    let x = logits.eq(logits)?.where_cond(logits, &neg_inf)?;
    let ids = Tensor::arange(0u32, vocab as u32, dev)?
        .reshape((1, vocab))?
        .broadcast_as((rows, vocab))?
        .contiguous()?;
    let (best, _) = best_unordered(&x, &ids, k)?;
    let kth = best.narrow(1, k - 1, 1)?;
    // The key: above the k-th value first (any order: all of them are in),
    // then ties by increasing id (−id as f32 is exact below 2²⁴), then
    // nothing (smaller, NaN).
    let by_id = Tensor::arange(0f32, vocab as f32, dev)?
        .neg()?
        .reshape((1, vocab))?
        .broadcast_as((rows, vocab))?;
    let key = logits.broadcast_gt(&kth)?.where_cond(
        &fill(f32::MAX)?,
        &logits.broadcast_eq(&kth)?.where_cond(&by_id, &neg_inf)?,
    )?;
    let (key, chosen) = best_unordered(&key, &ids, k)?;
    // Places whose key is −∞ hold no candidate (a row with fewer than k
    // non-NaN logits, or chunk padding): id u32::MAX, value −∞.
    let valid = key.ne(f32::NEG_INFINITY)?;
    let values = x.gather(&chosen.minimum(vocab as u32 - 1)?.contiguous()?, 1)?;
    let values = valid.where_cond(
        &values,
        &Tensor::new(f32::NEG_INFINITY, dev)?.broadcast_as((rows, k))?,
    )?;
    let chosen = valid.where_cond(
        &chosen,
        &Tensor::new(u32::MAX, dev)?.broadcast_as((rows, k))?,
    )?;
    let (ids, values) = (
        chosen.flatten_all()?.to_vec1::<u32>()?,
        values.flatten_all()?.to_vec1::<f32>()?,
    );
    // Best first within each row, as the host orders candidates.
    let mut pairs: Vec<(u32, f32)> = ids.into_iter().zip(values).collect();
    for row in pairs.chunks_mut(k) {
        row.sort_unstable_by(super::sampling::best_first);
    }
    Ok(pairs.into_iter().unzip())
}

/// The `k` largest of each row of `x` (`[rows, n]`, no NaN) with their
/// `ids` (`[rows, n]` u32), largest first, ties in any order: rows longer
/// than [`SORT_COLS`] are cut into chunks padded with −∞ (id `u32::MAX`),
/// each chunk's best `k` kept, until a row fits one sort.
fn best_unordered(x: &Tensor, ids: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let (rows, _) = x.dims2()?;
    let dev = x.device();
    let (mut x, mut ids) = (x.clone(), ids.clone());
    loop {
        let n = x.dim(1)?;
        if n <= SORT_COLS {
            let order = x.arg_sort_last_dim(false)?.narrow(1, 0, k)?.contiguous()?;
            return Ok((x.gather(&order, 1)?, ids.gather(&order, 1)?));
        }
        let chunks = n.div_ceil(SORT_COLS);
        let pad = chunks * SORT_COLS - n;
        if pad > 0 {
            x = Tensor::cat(
                &[&x, &Tensor::full(f32::NEG_INFINITY, (rows, pad), dev)?],
                1,
            )?;
            ids = Tensor::cat(&[&ids, &Tensor::full(u32::MAX, (rows, pad), dev)?], 1)?;
        }
        let x_c = x.reshape((rows * chunks, SORT_COLS))?;
        let ids_c = ids.reshape((rows * chunks, SORT_COLS))?;
        let order = x_c
            .arg_sort_last_dim(false)?
            .narrow(1, 0, k)?
            .contiguous()?;
        x = x_c.gather(&order, 1)?.reshape((rows, chunks * k))?;
        ids = ids_c.gather(&order, 1)?.reshape((rows, chunks * k))?;
    }
}

/// log Σ exp of each row of `logits` (`[rows, vocab]` on the device): the
/// normaliser of the model's log-probabilities, one number per row.
pub(crate) fn log_sum_exp_rows(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(logits.log_sum_exp(D::Minus1)?.to_vec1::<f32>()?)
}
