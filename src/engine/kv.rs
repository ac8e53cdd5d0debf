//! The paged KV cache: a preallocated pool of fixed-size blocks, a free list,
//! and attention that reads each sequence's keys and values through its block
//! table.
//!
//! Layout of one layer's keys (values alike): `[block][kv_head][slot][dim]`, so
//! the keys one head reads within a block are contiguous.

use rayon::prelude::*;

use super::cpu::attn;
#[cfg(target_arch = "x86_64")]
use super::cpu::attn::Run;
use super::{Error, Result};

/// Hands out block ids. Knows nothing of tensors, so the scheduler can plan
/// admissions with it in unit tests.
///
/// Invariant: every id in `0..total` is either in `free` or owned by exactly
/// one sequence's block table.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    total: usize,
    free: Vec<u32>,
}

impl BlockAllocator {
    /// A pool of `total` blocks of `block_size` tokens.
    pub fn new(total: usize, block_size: usize) -> Self {
        // Pop from the end hands out low ids first, which keeps tests readable.
        let free = (0..total as u32).rev().collect();
        Self {
            block_size,
            total,
            free,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks not owned by any sequence.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `table` until it holds `tokens` positions; all or nothing.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return false;
        }
        let at = self.free.len() - need;
        table.extend(self.free.drain(at..));
        true
    }

    /// Returns every block of `table` to the pool and empties it.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.append(table);
    }

    /// Fraction of blocks in use, 0.0 to 1.0.
    pub fn usage(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            1.0 - self.free.len() as f64 / self.total as f64
        }
    }
}

/// The shape of the cache.
#[derive(Debug, Clone, Copy)]
pub struct KvShape {
    /// Decoder layers.
    pub layers: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
}

impl KvShape {
    /// Bytes one block takes across all layers, keys and values.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.layers
            * self.kv_heads
            * self.block_size
            * self.head_dim
            * std::mem::size_of::<f32>()
    }

    /// How many blocks fit in `bytes`.
    pub fn blocks_in(&self, bytes: usize) -> usize {
        bytes / self.bytes_per_block().max(1)
    }

    fn block_stride(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }
}

/// Keys and values of one layer.
pub struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The engine's mutable state: the block pool's memory (one [`LayerKv`] per
/// layer) and the CPU forward pass's reusable buffers.
pub struct KvCache {
    shape: KvShape,
    blocks: usize,
    layers: Vec<LayerKv>,
    /// Activation buffers reused across steps (no allocation per op).
    pub(crate) scratch: super::cpu::Scratch,
}

impl KvCache {
    /// Preallocates `blocks` blocks. The pages are zeroed lazily by the OS, so
    /// resident memory grows only as blocks are first written.
    pub fn new(shape: KvShape, blocks: usize) -> Self {
        let per_layer = blocks * shape.block_stride();
        let layers = (0..shape.layers)
            .map(|_| LayerKv {
                k: vec![0.0; per_layer],
                v: vec![0.0; per_layer],
            })
            .collect();
        Self {
            shape,
            blocks,
            layers,
            scratch: Default::default(),
        }
    }

    /// The cache's shape.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Blocks in the pool.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// One layer's storage.
    pub fn layer_mut(&mut self, layer: usize) -> Result<&mut LayerKv> {
        self.layers
            .get_mut(layer)
            .ok_or_else(|| Error::Internal(format!("no KV layer {layer}")))
    }

    /// One layer's storage and the scratch buffers, borrowed together.
    pub(crate) fn split(
        &mut self,
        layer: usize,
    ) -> Result<(&mut LayerKv, &mut super::cpu::Scratch)> {
        let l = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::Internal(format!("no KV layer {layer}")))?;
        Ok((l, &mut self.scratch))
    }
}

/// One sequence's slice of a step: which rows of the flattened batch are its
/// new tokens, where they sit in the sequence, and its block table.
#[derive(Debug, Clone, Copy)]
pub struct SeqView<'a> {
    /// First row in the flattened batch.
    pub offset: usize,
    /// New tokens this step.
    pub len: usize,
    /// Position of the first new token.
    pub start_pos: usize,
    /// The sequence's blocks, covering at least `start_pos + len` positions.
    pub blocks: &'a [u32],
}

/// Attention hyper-parameters of one layer.
#[derive(Debug, Clone, Copy)]
pub struct AttnParams {
    /// Query heads.
    pub heads: usize,
    /// Score multiplier.
    pub scale: f32,
    /// Tokens visible to each query, itself included (sliding window).
    pub window: Option<usize>,
    /// `tanh` soft cap on scores.
    pub softcap: Option<f32>,
}

impl LayerKv {
    /// Stores the new tokens' keys and values (`[tokens, kv_heads, head_dim]`).
    pub fn write(
        &mut self,
        shape: &KvShape,
        seqs: &[SeqView<'_>],
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let (hk, d, bs) = (shape.kv_heads, shape.head_dim, shape.block_size);
        let row = hk * d;
        for s in seqs {
            if s.blocks.len() * bs < s.start_pos + s.len {
                return Err(Error::Internal(format!(
                    "block table of {} blocks cannot hold position {}",
                    s.blocks.len(),
                    s.start_pos + s.len - 1
                )));
            }
            for i in 0..s.len {
                let pos = s.start_pos + i;
                let block = s.blocks[pos / bs] as usize;
                let slot = pos % bs;
                let src = (s.offset + i) * row;
                for g in 0..hk {
                    let dst = ((block * hk + g) * bs + slot) * d;
                    self.k[dst..dst + d].copy_from_slice(&k[src + g * d..src + (g + 1) * d]);
                    self.v[dst..dst + d].copy_from_slice(&v[src + g * d..src + (g + 1) * d]);
                }
            }
        }
        Ok(())
    }

    /// Causal (optionally windowed) attention of every new token over its own
    /// sequence's cached keys and values, which must already include the new
    /// tokens. `q` is `[tokens, heads, head_dim]`; `out` gets the same shape.
    /// `owner[row]` is the row's (sequence index, position): see [`row_owners`].
    pub fn attend(
        &self,
        shape: &KvShape,
        seqs: &[SeqView<'_>],
        owner: &[(u32, u32)],
        q: &[f32],
        params: AttnParams,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let (hk, d, bs) = (shape.kv_heads, shape.head_dim, shape.block_size);
        let heads = params.heads;
        if hk == 0 || !heads.is_multiple_of(hk) {
            return Err(Error::Internal(format!("{heads} heads over {hk} kv heads")));
        }
        let group = heads / hk;
        out.clear();
        out.resize(q.len(), 0.0);
        let stride = shape.block_stride();
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
        let fast = attn::supported(d);
        out.par_chunks_mut(group * d)
            .enumerate()
            .with_min_len(4)
            .for_each(|(task, out)| {
                let (t, g) = (task / hk, task % hk);
                let (si, pos) = owner[t];
                let seq = &seqs[si as usize];
                let pos = pos as usize;
                let lo = params.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let n = pos + 1 - lo;
                let q = &q[(t * heads + g * group) * d..(t * heads + (g + 1) * group) * d];
                SCRATCH.with(|cell| {
                    let mut buf = cell.borrow_mut();
                    buf.clear();
                    buf.resize(group * d + group * n, 0.0);
                    let (qs, scores) = buf.split_at_mut(group * d);
                    // Fold the score scale into the query once.
                    for (o, &v) in qs.iter_mut().zip(q) {
                        *o = v * params.scale;
                    }
                    // Walk the visible positions block by block: one table
                    // lookup per block, contiguous keys within it.
                    let for_each_pos = |f: &mut dyn FnMut(usize, usize)| {
                        let mut j = lo;
                        while j <= pos {
                            let (b, slot) = (j / bs, j % bs);
                            let end = (pos + 1).min((b + 1) * bs);
                            let base = seq.blocks[b] as usize * stride + (g * bs + slot) * d;
                            for (i, jj) in (j..end).enumerate() {
                                f(jj - lo, base + i * d);
                            }
                            j = end;
                        }
                    };
                    #[cfg(target_arch = "x86_64")]
                    if fast {
                        RUNS.with(|cell| {
                            let mut runs = cell.borrow_mut();
                            runs.clear();
                            let mut j = lo;
                            while j <= pos {
                                let (b, slot) = (j / bs, j % bs);
                                let end = (pos + 1).min((b + 1) * bs);
                                let block = seq.blocks[b] as usize;
                                // The kernels read whole runs unchecked.
                                assert!((block + 1) * stride <= self.k.len(), "block id");
                                runs.push(Run {
                                    base: block * stride + (g * bs + slot) * d,
                                    len: end - j,
                                    first: j - lo,
                                });
                                j = end;
                            }
                            for h in 0..group {
                                let (q, s) =
                                    (&qs[h * d..(h + 1) * d], &mut scores[h * n..(h + 1) * n]);
                                // SAFETY: `fast` checked the CPU and d; every run lies
                                // inside its block, which lies inside `k` (asserted).
                                unsafe { attn::scores(q, &self.k, &runs, d, s) };
                            }
                            finish_scores(scores, n, group, params.softcap);
                            // SAFETY: as above, for `v` (same layout and length).
                            unsafe {
                                attn::weighted_values(scores, n, &self.v, &runs, d, group, out)
                            };
                        });
                        return;
                    }
                    for_each_pos(&mut |idx, base| {
                        let kj = &self.k[base..base + d];
                        for h in 0..group {
                            scores[h * n + idx] = dot(&qs[h * d..(h + 1) * d], kj);
                        }
                    });
                    finish_scores(scores, n, group, params.softcap);
                    for_each_pos(&mut |idx, base| {
                        let vj = &self.v[base..base + d];
                        for h in 0..group {
                            axpy(&mut out[h * d..(h + 1) * d], scores[h * n + idx], vj);
                        }
                    });
                });
            });
        Ok(())
    }
}

/// Each row's (sequence index, position), computed once per step and shared
/// by every layer's attention.
pub fn row_owners(seqs: &[SeqView<'_>], rows: usize, out: &mut Vec<(u32, u32)>) {
    out.clear();
    out.resize(rows, (0, 0));
    for (si, s) in seqs.iter().enumerate() {
        for i in 0..s.len {
            out[s.offset + i] = (si as u32, (s.start_pos + i) as u32);
        }
    }
}

thread_local! {
    /// Per-worker score buffer, reused across tasks and steps.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per-worker list of contiguous position runs, reused likewise.
    #[cfg(target_arch = "x86_64")]
    static RUNS: std::cell::RefCell<Vec<Run>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Soft-caps (when asked) and normalises each head's `n` scores.
fn finish_scores(scores: &mut [f32], n: usize, group: usize, softcap: Option<f32>) {
    if let Some(cap) = softcap {
        scores.iter_mut().for_each(|s| *s = cap * (*s / cap).tanh());
    }
    for h in 0..group {
        softmax_in_place(&mut scores[h * n..(h + 1) * n]);
    }
}

/// Dot product with eight independent accumulators, which the compiler turns
/// into SIMD lanes.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `eˣ` to about 2 ulp: range reduction by ln 2 and a degree-6
/// polynomial, written so loops over slices vectorize (libm's `expf` does
/// not). Inputs below −87 give 0.
#[inline]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    // Taylor coefficients of eʳ on |r| ≤ ln2/2.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // SAFETY: x is clamped to [-87, 88], so n is an integer in [-126, 127].
    let n_i = unsafe { n.to_int_unchecked::<i32>() };
    let bits = ((n_i + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

#[inline]
fn axpy(acc: &mut [f32], a: f32, x: &[f32]) {
    for (o, v) in acc.iter_mut().zip(x) {
        *o += a * v;
    }
}

fn softmax_in_place(xs: &mut [f32]) {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for x in xs.iter_mut() {
        *x = exp_fast(*x - max);
    }
    let sum: f32 = xs.iter().sum();
    let inv = 1.0 / sum;
    for x in xs.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_fast(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 1e-6, "max relative error {worst}");
    }

    #[test]
    fn allocator_grows_all_or_nothing_and_releases_everything() {
        let mut a = BlockAllocator::new(4, 16);
        let mut t1 = vec![];
        assert!(a.grow(&mut t1, 33));
        assert_eq!(t1.len(), 3);
        let mut t2 = vec![];
        assert!(!a.grow(&mut t2, 17), "needs 2 blocks, 1 free");
        assert!(t2.is_empty());
        assert!(a.grow(&mut t2, 16));
        assert_eq!(a.free(), 0);
        a.release(&mut t1);
        a.release(&mut t2);
        assert_eq!(a.free(), 4);
        assert!(t1.is_empty());
    }

    #[test]
    fn attention_matches_a_dense_reference() {
        // Two sequences, GQA with 2 query heads per kv head, blocks of 2.
        let shape = KvShape {
            layers: 1,
            kv_heads: 2,
            head_dim: 4,
            block_size: 2,
        };
        let mut cache = KvCache::new(shape, 8);
        let blocks_a = [5u32, 1, 6];
        let blocks_b = [0u32, 3];
        let seqs = [
            SeqView {
                offset: 0,
                len: 5,
                start_pos: 0,
                blocks: &blocks_a,
            },
            SeqView {
                offset: 5,
                len: 3,
                start_pos: 0,
                blocks: &blocks_b,
            },
        ];
        let t = 8;
        let val = |i: usize| ((i * 37 % 17) as f32 - 8.0) / 8.0;
        let k: Vec<f32> = (0..t * 8).map(val).collect();
        let v: Vec<f32> = (0..t * 8).map(|i| val(i + 5)).collect();
        let q: Vec<f32> = (0..t * 16).map(|i| val(i + 11)).collect();
        let layer = cache.layer_mut(0).unwrap();
        layer.write(&shape, &seqs, &k, &v).unwrap();
        let params = AttnParams {
            heads: 4,
            scale: 0.5,
            window: Some(3),
            softcap: None,
        };
        let mut owner = vec![];
        row_owners(&seqs, t, &mut owner);
        let mut out = vec![];
        layer
            .attend(&shape, &seqs, &owner, &q, params, &mut out)
            .unwrap();
        for s in &seqs {
            for i in 0..s.len {
                let row = s.offset + i;
                for h in 0..4 {
                    let g = h / 2;
                    let lo = (i + 1).saturating_sub(3);
                    let scores: Vec<f32> = (lo..=i)
                        .map(|j| {
                            let kr = &k[(s.offset + j) * 8 + g * 4..][..4];
                            let qr = &q[row * 16 + h * 4..][..4];
                            qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * 0.5
                        })
                        .collect();
                    let m = scores.iter().copied().fold(f32::MIN, f32::max);
                    let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for dd in 0..4 {
                        let want: f32 = (lo..=i)
                            .map(|j| e[j - lo] / z * v[(s.offset + j) * 8 + g * 4 + dd])
                            .sum();
                        let got = out[row * 16 + h * 4 + dd];
                        assert!(
                            (want - got).abs() < 1e-5,
                            "row {row} head {h}: {want} vs {got}"
                        );
                    }
                }
            }
        }
    }
}
