//! Attention over the paged KV cache: every new token attends to its own
//! sequence's cached keys and values, read through the block table.
//!
//! On x86-64 with AVX2 and FMA, the inner loops are kernels over *runs*:
//! the driver walks a sequence's visible positions as *runs*: positions
//! whose keys (and values) are contiguous in one cache block, `head_dim`
//! floats apart. Scores are computed eight positions at a time (eight FMA
//! chains over the head dimension, then one transposing horizontal sum), so
//! no per-score horizontal reduction is paid; the value sum keeps its
//! accumulators in registers across every position of the sequence.
//!
//! Both kernels only read this sequence's cache and write this row's output,
//! so a row's result does not depend on what else is in the batch.

use rayon::prelude::*;

use half::f16;

use super::math::{axpy, dot, softmax_in_place};
use crate::engine::batch::SeqView;
use crate::engine::kv::{KvElem, KvShape, Lanes, LayerKv};
use crate::engine::{Error, Result};

/// The portable loops over a cached row of either storage type.
trait Elem: KvElem {
    fn dot(q: &[f32], k: &[Self]) -> f32;
    fn axpy(out: &mut [f32], a: f32, v: &[Self]);
}

impl Elem for f32 {
    fn dot(q: &[f32], k: &[Self]) -> f32 {
        dot(q, k)
    }

    fn axpy(out: &mut [f32], a: f32, v: &[Self]) {
        axpy(out, a, v)
    }
}

impl Elem for f16 {
    fn dot(q: &[f32], k: &[Self]) -> f32 {
        q.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum()
    }

    fn axpy(out: &mut [f32], a: f32, v: &[Self]) {
        for (o, x) in out.iter_mut().zip(v) {
            *o += a * x.to_f32();
        }
    }
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

/// Causal (optionally windowed) attention of every new token over its own
/// sequence's cached keys and values, which must already include the new
/// tokens. `q` is `[tokens, heads, head_dim]`; `out` gets the same shape.
/// `owner[row]` is the row's (sequence index, position): see [`row_owners`].
/// The layer's blocks are the tables' entries for layer group `group`.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    cache: &LayerKv,
    shape: &KvShape,
    group: usize,
    seqs: &[SeqView<'_>],
    owner: &[(u32, u32)],
    q: &[f32],
    params: AttnParams,
    out: &mut Vec<f32>,
) -> Result<()> {
    match cache.lanes() {
        (Lanes::F32(k), Lanes::F32(v)) => {
            attend_in(k, v, shape, group, seqs, owner, q, params, out)
        }
        (Lanes::F16(k), Lanes::F16(v)) => {
            attend_in(k, v, shape, group, seqs, owner, q, params, out)
        }
        _ => Err(Error::Internal("keys and values stored apart".into())),
    }
}

#[allow(clippy::too_many_arguments)]
fn attend_in<T: Elem>(
    keys: &[T],
    values: &[T],
    shape: &KvShape,
    group_index: usize,
    seqs: &[SeqView<'_>],
    owner: &[(u32, u32)],
    q: &[f32],
    params: AttnParams,
    out: &mut Vec<f32>,
) -> Result<()> {
    let (hk, d, bs) = (shape.kv_heads, shape.head_dim, shape.block_size);
    let entry = |b: usize| b * shape.groups + group_index;
    let heads = params.heads;
    if hk == 0 || !heads.is_multiple_of(hk) {
        return Err(Error::Internal(format!("{heads} heads over {hk} kv heads")));
    }
    let group = heads / hk;
    out.clear();
    out.resize(q.len(), 0.0);
    let stride = shape.block_stride();
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    let fast = supported(d);
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
                        let base = seq.blocks[entry(b)] as usize * stride + (g * bs + slot) * d;
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
                            let block = seq.blocks[entry(b)] as usize;
                            // The kernels read whole runs unchecked.
                            assert!((block + 1) * stride <= keys.len(), "block id");
                            runs.push(Run {
                                base: block * stride + (g * bs + slot) * d,
                                len: end - j,
                                first: j - lo,
                            });
                            j = end;
                        }
                        for h in 0..group {
                            let (q, s) = (&qs[h * d..(h + 1) * d], &mut scores[h * n..(h + 1) * n]);
                            // SAFETY: `fast` checked the CPU and d; every run lies
                            // inside its block, which lies inside `k` (asserted).
                            unsafe { self::scores(q, keys, &runs, d, s) };
                        }
                        finish_scores(scores, n, group, params.softcap);
                        // SAFETY: as above, for `v` (same layout and length).
                        unsafe { weighted_values(scores, n, values, &runs, d, group, out) };
                    });
                    return;
                }
                for_each_pos(&mut |idx, base| {
                    let kj = &keys[base..base + d];
                    for h in 0..group {
                        scores[h * n + idx] = T::dot(&qs[h * d..(h + 1) * d], kj);
                    }
                });
                finish_scores(scores, n, group, params.softcap);
                for_each_pos(&mut |idx, base| {
                    let vj = &values[base..base + d];
                    for h in 0..group {
                        T::axpy(&mut out[h * d..(h + 1) * d], scores[h * n + idx], vj);
                    }
                });
            });
        });
    Ok(())
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

/// Contiguous visible positions: cache offset of the first one's key/value
/// row, how many, and the index of the first one's score.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Offset of the first position's row in the layer's key/value arrays.
    pub base: usize,
    /// Positions in the run.
    pub len: usize,
    /// Index of the first position among the row's visible positions.
    pub first: usize,
}

/// Whether these kernels can run here for `head_dim`.
pub fn supported(head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        head_dim.is_multiple_of(8)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = head_dim;
        false
    }
}

/// `scores[idx] = q · k[idx]` for every visible position.
///
/// # Safety
/// [`supported`] must hold for `d`; every run's rows must lie in `keys`;
/// `q` holds `d` values and `scores` one slot per visible position.
#[cfg(target_arch = "x86_64")]
pub unsafe fn scores<T: KvElem>(q: &[f32], keys: &[T], runs: &[Run], d: usize, scores: &mut [f32]) {
    // SAFETY: forwarded from the caller.
    unsafe { avx2::scores(q, keys, runs, d, scores) }
}

/// `out[h] = Σ p[h][idx] · v[idx]` for `heads` heads whose probabilities are
/// `n` apart in `p` and whose outputs are `d` apart in `out`.
///
/// # Safety
/// As [`scores`], for `values`; `p` holds `heads * n` and `out` `heads * d`.
#[cfg(target_arch = "x86_64")]
pub unsafe fn weighted_values<T: KvElem>(
    p: &[f32],
    n: usize,
    values: &[T],
    runs: &[Run],
    d: usize,
    heads: usize,
    out: &mut [f32],
) {
    // SAFETY: forwarded from the caller.
    unsafe { avx2::weighted_values(p, n, values, runs, d, heads, out) }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Run;
    use crate::engine::kv::KvElem;

    /// Lane `i` of the result is the sum of the lanes of `a[i]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum8(a: [__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
        let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
        _mm256_add_ps(lo, hi)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scores<T: KvElem>(
        q: &[f32],
        keys: &[T],
        runs: &[Run],
        d: usize,
        out: &mut [f32],
    ) {
        let kp = keys.as_ptr();
        let qp = q.as_ptr();
        for run in runs {
            let mut i = 0;
            while i < run.len {
                let take = (run.len - i).min(8);
                // Lanes past the run's end re-read its first row; their sums are dropped.
                let rows: [*const T; 8] = std::array::from_fn(|j| {
                    let j = if j < take { i + j } else { i };
                    // SAFETY: the run's rows lie in `keys` (caller).
                    unsafe { kp.add(run.base + j * d) }
                });
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut c = 0;
                while c < d {
                    // SAFETY: c + 8 <= d (d is a multiple of 8); rows hold d values.
                    unsafe {
                        let qv = _mm256_loadu_ps(qp.add(c));
                        for (a, r) in acc.iter_mut().zip(rows) {
                            *a = _mm256_fmadd_ps(qv, T::load8(r.add(c)), *a);
                        }
                    }
                    c += 8;
                }
                let mut lanes = [0f32; 8];
                // SAFETY: lanes holds 8 values.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), hsum8(acc)) };
                let at = run.first + i;
                out[at..at + take].copy_from_slice(&lanes[..take]);
                i += take;
            }
        }
    }

    /// `G` heads × `W` vectors of one `8W`-wide slice of the head dimension,
    /// accumulated in registers over every visible position.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn slice<T: KvElem, const G: usize, const W: usize>(
        p: &[f32],
        n: usize,
        values: *const T,
        runs: &[Run],
        d: usize,
        c0: usize,
        out: &mut [f32],
    ) {
        let mut acc = [[_mm256_setzero_ps(); W]; G];
        for run in runs {
            for i in 0..run.len {
                // SAFETY: the run's rows lie in `values` and c0 + 8W <= d (caller).
                let row = unsafe { values.add(run.base + i * d + c0) };
                let v: [__m256; W] = std::array::from_fn(|w| {
                    // SAFETY: lane `w * 8 .. w * 8 + 8` lies within the row's
                    // `d` values, since c0 + 8W <= d.
                    unsafe { T::load8(row.add(w * 8)) }
                });
                let idx = run.first + i;
                for (g, a) in acc.iter_mut().enumerate() {
                    let pb = _mm256_set1_ps(p[g * n + idx]);
                    for (aw, vw) in a.iter_mut().zip(v) {
                        *aw = _mm256_fmadd_ps(pb, vw, *aw);
                    }
                }
            }
        }
        for (g, a) in acc.iter().enumerate() {
            let o = &mut out[g * d + c0..g * d + c0 + 8 * W];
            for (w, aw) in a.iter().enumerate() {
                // SAFETY: o holds 8W values.
                unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(w * 8), *aw) };
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn weighted_values<T: KvElem>(
        p: &[f32],
        n: usize,
        values: &[T],
        runs: &[Run],
        d: usize,
        heads: usize,
        out: &mut [f32],
    ) {
        let vp = values.as_ptr();
        let mut h = 0;
        while h < heads {
            // Heads in groups of 4, 2, 1; each group's slice as wide as 8
            // accumulators allow and the head dimension divides.
            let g = match heads - h {
                4.. => 4,
                2 | 3 => 2,
                _ => 1,
            };
            let lanes = d / 8;
            let w = [8usize, 4, 2, 1]
                .into_iter()
                .find(|&w| w * g <= 8 && lanes.is_multiple_of(w))
                .unwrap_or(1);
            let (p, out) = (&p[h * n..], &mut out[h * d..]);
            let mut c0 = 0;
            while c0 < d {
                // SAFETY: c0 + 8w <= d because w divides d / 8; the rest is the caller's.
                unsafe {
                    match (g, w) {
                        (4, 2) => slice::<T, 4, 2>(p, n, vp, runs, d, c0, out),
                        (4, _) => slice::<T, 4, 1>(p, n, vp, runs, d, c0, out),
                        (2, 4) => slice::<T, 2, 4>(p, n, vp, runs, d, c0, out),
                        (2, 2) => slice::<T, 2, 2>(p, n, vp, runs, d, c0, out),
                        (2, _) => slice::<T, 2, 1>(p, n, vp, runs, d, c0, out),
                        (_, 8) => slice::<T, 1, 8>(p, n, vp, runs, d, c0, out),
                        (_, 4) => slice::<T, 1, 4>(p, n, vp, runs, d, c0, out),
                        (_, 2) => slice::<T, 1, 2>(p, n, vp, runs, d, c0, out),
                        _ => slice::<T, 1, 1>(p, n, vp, runs, d, c0, out),
                    }
                }
                c0 += 8 * w;
            }
            h += g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kv::{KvCache, KvDtype};

    #[cfg(target_arch = "x86_64")]
    /// Runs over a flat key/value array: lengths that cross 8-lane blocks,
    /// and gaps between runs (as between cache blocks).
    fn layout(lens: &[usize], d: usize) -> (Vec<Run>, usize) {
        let (mut runs, mut base, mut first) = (vec![], d * 3, 0);
        for &len in lens {
            runs.push(Run { base, len, first });
            base += (len + 5) * d;
            first += len;
        }
        (runs, base)
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn kernels_match_plain_loops() {
        for d in [8, 32, 64, 256] {
            if !supported(d) {
                return;
            }
            for heads in 1..=7 {
                let (runs, size) = layout(&[1, 7, 16, 3, 9], d);
                let n: usize = runs.iter().map(|r| r.len).sum();
                let keys: Vec<f32> = (0..size).map(|i| (i as f32 * 0.37).sin()).collect();
                let values: Vec<f32> = (0..size).map(|i| (i as f32 * 0.11).cos()).collect();
                let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.7).cos()).collect();
                let mut got = vec![0f32; n];
                // SAFETY: the CPU supports the kernels and every run lies in `keys`.
                unsafe { scores(&q, &keys, &runs, d, &mut got) };
                let rows = || {
                    runs.iter()
                        .flat_map(|r| (0..r.len).map(move |i| (r.first + i, r.base + i * d)))
                };
                for (idx, base) in rows() {
                    let want: f32 = (0..d).map(|c| q[c] * keys[base + c]).sum();
                    assert!(
                        (got[idx] - want).abs() < 1e-4,
                        "d {d}: {} vs {want}",
                        got[idx]
                    );
                }
                let p: Vec<f32> = (0..heads * n).map(|i| (i as f32 * 0.3).sin()).collect();
                let mut out = vec![0f32; heads * d];
                // SAFETY: as above, for `values`; p and out have the documented sizes.
                unsafe { weighted_values(&p, n, &values, &runs, d, heads, &mut out) };
                for h in 0..heads {
                    for c in 0..d {
                        let want: f32 = rows()
                            .map(|(idx, base)| p[h * n + idx] * values[base + c])
                            .sum();
                        let got = out[h * d + c];
                        assert!(
                            (got - want).abs() < 1e-4,
                            "d {d} heads {heads}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn kernels_read_f16_keys_and_values_as_their_f32_widening() {
        let d = 32;
        if !supported(d) {
            return;
        }
        let (runs, size) = layout(&[3, 8, 13], d);
        let n: usize = runs.iter().map(|r| r.len).sum();
        let keys: Vec<f16> = (0..size)
            .map(|i| f16::from_f32((i as f32 * 0.37).sin()))
            .collect();
        let values: Vec<f16> = (0..size)
            .map(|i| f16::from_f32((i as f32 * 0.11).cos()))
            .collect();
        let wide = |x: &[f16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
        let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.7).cos()).collect();
        let (mut half, mut full) = (vec![0f32; n], vec![0f32; n]);
        // SAFETY: the CPU supports the kernels and every run lies in the arrays.
        unsafe {
            scores(&q, &keys, &runs, d, &mut half);
            scores(&q, &wide(&keys), &runs, d, &mut full);
        }
        assert_eq!(half, full, "same f32 arithmetic on the widened values");
        let p: Vec<f32> = (0..3 * n).map(|i| (i as f32 * 0.3).sin()).collect();
        let (mut half, mut full) = (vec![0f32; 3 * d], vec![0f32; 3 * d]);
        // SAFETY: as above; p and out have the documented sizes.
        unsafe {
            weighted_values(&p, n, &values, &runs, d, 3, &mut half);
            weighted_values(&p, n, &wide(&values), &runs, d, 3, &mut full);
        }
        assert_eq!(half, full);
    }

    #[test]
    fn attention_matches_a_dense_reference() {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            attention_matches_a_dense_reference_in(dtype);
        }
    }

    fn attention_matches_a_dense_reference_in(dtype: KvDtype) {
        // Two sequences, GQA with 2 query heads per kv head, blocks of 2;
        // keys and values are multiples of 1/8, exact in f16 too.
        let shape = KvShape {
            layers: 1,
            kv_heads: 2,
            head_dim: 4,
            block_size: 2,
            dtype,
            groups: 1,
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
        let (_, layer) = cache.layer_mut(0).unwrap();
        layer.write(&shape, 0, &seqs, &k, &v).unwrap();
        let params = AttnParams {
            heads: 4,
            scale: 0.5,
            window: Some(3),
            softcap: None,
        };
        let mut owner = vec![];
        row_owners(&seqs, t, &mut owner);
        let mut out = vec![];
        attend(layer, &shape, 0, &seqs, &owner, &q, params, &mut out).unwrap();
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
