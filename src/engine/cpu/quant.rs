//! `out = x · wᵀ` on the GGUF file's own blocks (Q4_0, Q5_0, Q8_0, Q4_K,
//! Q5_K, Q6_K), with activations quantized to int8 per block as llama.cpp
//! does: a single stream reads 4.5–8.5 bits per weight instead of 16.
//!
//! [`QuantWeight`] keeps the file's bytes, row-major per output feature (Q8_0
//! interleaved by 16 rows where the CPU has AVX512-VNNI).
//! Each call quantizes every activation row once (Q8_0-style blocks of 32
//! with an f16-rounded scale for the 32-wide weight types, Q8_K blocks of
//! 256 with an f32 scale and 16 partial sums for the k-quants). Rayon splits
//! the output features; a task unpacks each weight row once into a small
//! buffer (int8 values, sub-block scales as i16 lanes, the block's float
//! scales) and dots that buffer with every activation row, so a batch
//! converts each block once per pass, not once per row.
//!
//! **The arithmetic** (the same in every kernel and in [`dot_scalar`], bit
//! for bit). 32-wide types (Q4_0, Q5_0, Q8_0): per weight block and
//! activation row, the exact i32 dot product of the 32 int8 pairs, converted
//! to f32 and added with one fused multiply-add by `d_w · d_x` (an f32
//! product), in block order (llama.cpp's scalar `vec_dot_q8_0_q8_0`, fused).
//! How the integer sum is formed does not matter (it is exact): the AVX2
//! kernel uses `maddubs` + `madd` and a horizontal add; on AVX512-VNNI,
//! Q8_0 rows are interleaved by 16 at load ([`QuantWeight::new`]) so that
//! each `vpdpbusd` lane accumulates one row's block and 16 rows share one
//! conversion and one FMA per block.
//!
//! K-quants: per weight block and activation row, integer products are
//! summed exactly into 8 i32 lanes, lane `l` holding elements `4l..4l+3`
//! of each 32-element group (what `maddubs` + `madd` produce), sub-block
//! scales multiplied in as i16 (`madd`). Each lane is then converted to f32
//! and accumulated with one fused multiply-add by `d_w · d_x` per block, in
//! block order. The corrections (Q4_K/Q5_K mins, Q6_K's offset of 32) come
//! from the activation's per-16 sums, as a second 8-lane accumulator
//! subtracted at the end. The 8 lanes are summed in a fixed tree order.
//!
//! Nothing depends on which other rows are in the batch, so results are
//! batch-invariant.

use half::f16;
use rayon::prelude::*;

use super::OutPtr;
use super::gemm::Isa;

/// A GGUF block type this kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    /// 32 weights: f16 scale, 4-bit values offset by 8.
    Q4_0,
    /// 32 weights: f16 scale, 5-bit values offset by 16.
    Q5_0,
    /// 32 weights: f16 scale, int8 values.
    Q8_0,
    /// 256 weights: f16 scale and min, 8 sub-blocks with 6-bit scales/mins, 4-bit values.
    Q4K,
    /// As Q4_K with a fifth bit per value.
    Q5K,
    /// 256 weights: f16 scale, 16 int8 sub-block scales, 6-bit values offset by 32.
    Q6K,
}

impl QuantType {
    /// Weights per block.
    pub fn block_elems(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => 32,
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
        }
    }

    /// Bytes per block (the GGUF layout).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q5_0 => 22,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Whether activations are Q8_K blocks of 256 (else Q8_0 blocks of 32).
    fn is_k(self) -> bool {
        self.block_elems() == 256
    }

    /// The type of a candle/GGUF dtype, if this kernel reads it.
    pub fn from_ggml(t: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        Some(match t {
            G::Q4_0 => Self::Q4_0,
            G::Q5_0 => Self::Q5_0,
            G::Q8_0 => Self::Q8_0,
            G::Q4K => Self::Q4K,
            G::Q5K => Self::Q5K,
            G::Q6K => Self::Q6K,
            _ => return None,
        })
    }
}

/// A weight `[n, k]` as the file's blocks: row-major per output feature, or
/// (Q8_0 where the CPU has AVX512-VNNI) interleaved by 16 rows, see
/// [`QuantWeight::new`].
#[derive(Debug, Clone)]
pub struct QuantWeight {
    ty: QuantType,
    data: Vec<u8>,
    /// `data` holds groups of [`GROUP`] rows interleaved (Q8_0 only).
    interleaved: bool,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
}

impl QuantWeight {
    /// Wraps `n` rows of `k` weights as GGUF blocks of `ty`; `None` if `k`
    /// is not a whole number of blocks or `data` has the wrong length.
    ///
    /// Q8_0 weights are interleaved by 16 rows when the kernels run on
    /// AVX512-VNNI ([`Path::detect`]): per group of 16 rows and block, the
    /// 16 f16 scales, then for each 4 consecutive values the 16 rows' 4
    /// bytes (64 bytes, one `vpdpbusd` operand). The same bytes as the file
    /// (a last partial group is padded with zero rows).
    pub fn new(ty: QuantType, data: Vec<u8>, n: usize, k: usize) -> Option<Self> {
        Self::with_layout(ty, data, n, k, Path::detect() == Path::Vnni512)
    }

    /// As [`QuantWeight::new`], interleaving Q8_0 if `interleave`.
    fn with_layout(
        ty: QuantType,
        data: Vec<u8>,
        n: usize,
        k: usize,
        interleave: bool,
    ) -> Option<Self> {
        let be = ty.block_elems();
        let len = n.checked_mul(k / be)?.checked_mul(ty.block_bytes())?;
        if !(k > 0 && k.is_multiple_of(be) && data.len() == len) {
            return None;
        }
        let mut w = Self {
            ty,
            data,
            interleaved: false,
            n,
            k,
        };
        if interleave && !ty.is_k() {
            w.data = interleave_32(ty, &w.data, n, k);
            w.interleaved = true;
        }
        Some(w)
    }

    /// The block type.
    pub fn ty(&self) -> QuantType {
        self.ty
    }

    fn row_bytes(&self) -> usize {
        self.k / self.ty.block_elems() * self.ty.block_bytes()
    }

    /// Row `j`'s blocks as the file has them: a slice of the weight, or
    /// (interleaved) gathered into `buf`.
    fn row<'a>(&'a self, j: usize, buf: &'a mut Vec<u8>) -> &'a [u8] {
        let rb = self.row_bytes();
        if !self.interleaved {
            return &self.data[j * rb..(j + 1) * rb];
        }
        buf.resize(rb, 0);
        let (nb, bb) = (self.k / 32, self.ty.block_bytes());
        let (g, c) = (j / GROUP, j % GROUP);
        for (b, blk) in buf.chunks_exact_mut(bb).enumerate() {
            let at = (g * nb + b) * GROUP * bb;
            blk[..2].copy_from_slice(&self.data[at + 2 * c..at + 2 * c + 2]);
            for t in 0..(bb - 2) / 4 {
                let v = at + 32 + 64 * t + 4 * c;
                blk[2 + 4 * t..6 + 4 * t].copy_from_slice(&self.data[v..v + 4]);
            }
        }
        buf
    }

    /// Row `j` dequantized to f32 (an embedding lookup), appended to `out`.
    pub fn row_into(&self, j: usize, out: &mut Vec<f32>) {
        let mut u = Unpacked::new(self.ty, self.k);
        let mut buf = vec![];
        u.unpack(self.ty, self.row(j, &mut buf), false);
        u.dequantize_into(self.ty, out);
    }

    /// Bytes of storage.
    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    /// Stacks weights with the same type and `k` (their rows, in order) into one.
    pub fn stack(parts: &[&QuantWeight]) -> Option<QuantWeight> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.k != first.k || p.ty != first.ty) {
            return None;
        }
        let mut data = vec![];
        let mut buf = vec![];
        for p in parts {
            for j in 0..p.n {
                data.extend_from_slice(p.row(j, &mut buf));
            }
        }
        let n = parts.iter().map(|p| p.n).sum();
        QuantWeight::with_layout(first.ty, data, n, first.k, first.interleaved)
    }
}

/// Rows per interleaved group (one AVX-512 lane each).
const GROUP: usize = 16;

/// The file's rows `[n, k]` of a 32-wide type interleaved by [`GROUP`]:
/// per group and block, the 16 rows' f16 scales, then each 4-byte word of
/// the rest of the block (Q5_0's high bits, then the values or nibbles) as
/// 16 rows × 4 bytes. A last partial group is padded with zero rows.
fn interleave_32(ty: QuantType, data: &[u8], n: usize, k: usize) -> Vec<u8> {
    let (nb, bb) = (k / 32, ty.block_bytes());
    let groups = n.div_ceil(GROUP);
    let mut out = vec![0u8; groups * nb * GROUP * bb];
    for j in 0..n {
        let (g, c) = (j / GROUP, j % GROUP);
        for b in 0..nb {
            let blk = &data[(j * nb + b) * bb..(j * nb + b + 1) * bb];
            let at = (g * nb + b) * GROUP * bb;
            out[at + 2 * c..at + 2 * c + 2].copy_from_slice(&blk[..2]);
            for t in 0..(bb - 2) / 4 {
                let v = at + 32 + 64 * t + 4 * c;
                out[v..v + 4].copy_from_slice(&blk[2 + 4 * t..6 + 4 * t]);
            }
        }
    }
    out
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Activation rows quantized for one weight type.
struct Acts {
    /// `[m, k]` int8 values.
    q: Vec<i8>,
    /// `[m, k / block]` scales.
    d: Vec<f32>,
    /// `[m, k / 16]` sums of 16 consecutive values.
    bsums: Vec<i16>,
    k: usize,
    block: usize,
}

impl Acts {
    /// Quantizes `m` rows of `k` for weights of type `ty`: Q8_0 blocks
    /// (scale `max|x| / 127` rounded to f16, values `x · 127 / max|x|`
    /// rounded to nearest-even, as llama.cpp's AVX2 `quantize_row_q8_0`) or
    /// Q8_K blocks (scale `max / -127` with `max` the signed extreme, as
    /// `quantize_row_q8_K`).
    fn quantize(x: &[f32], m: usize, k: usize, ty: QuantType) -> Self {
        let block = ty.block_elems();
        let nb = k / block;
        let mut q = vec![0i8; m * k];
        let mut d = vec![0f32; m * nb];
        let mut bsums = vec![0i16; m * k / 16];
        for (b, (xs, qs)) in x[..m * k]
            .chunks_exact(block)
            .zip(q.chunks_exact_mut(block))
            .enumerate()
        {
            if ty.is_k() {
                let (mut max, mut amax) = (0f32, 0f32);
                for &v in xs {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                if amax == 0.0 {
                    continue;
                }
                let iscale = -127f32 / max;
                for (o, &v) in qs.iter_mut().zip(xs) {
                    *o = (iscale * v).round_ties_even().clamp(-127.0, 127.0) as i8;
                }
                for (s, g) in bsums[b * 16..(b + 1) * 16]
                    .iter_mut()
                    .zip(qs.chunks_exact(16))
                {
                    *s = g.iter().map(|&v| v as i16).sum();
                }
                d[b] = 1.0 / iscale;
            } else {
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                for (o, &v) in qs.iter_mut().zip(xs) {
                    *o = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
                }
                d[b] = f16::from_f32(amax / 127.0).to_f32();
                for (s, g) in bsums[b * 2..b * 2 + 2].iter_mut().zip(qs.chunks_exact(16)) {
                    *s = g.iter().map(|&v| v as i16).sum();
                }
            }
        }
        Self {
            q,
            d,
            bsums,
            k,
            block,
        }
    }

    fn row(&self, i: usize) -> ActRow<'_> {
        let nb = self.k / self.block;
        ActRow {
            q: &self.q[i * self.k..(i + 1) * self.k],
            d: &self.d[i * nb..(i + 1) * nb],
            bsums: &self.bsums[i * self.k / 16..(i + 1) * self.k / 16],
        }
    }
}

/// One quantized activation row.
#[derive(Clone, Copy)]
struct ActRow<'a> {
    q: &'a [i8],
    d: &'a [f32],
    bsums: &'a [i16],
}

/// One weight row unpacked for the dot products (see the module docs).
struct Unpacked {
    /// 32-wide types: signed values. k-quants: unsigned values (as i8 bits).
    q: Vec<i8>,
    /// 32-wide types: `|q|` for `maddubs`.
    aq: Vec<u8>,
    /// k-quants: per 32 values, 16 i16 scales (one per pair of values).
    sc: Vec<i16>,
    /// k-quants: per block, 16 i16 multipliers of the activation's per-16 sums.
    cm: Vec<i16>,
    /// Per block: the main scale.
    dm: Vec<f32>,
    /// k-quants, per block: the correction's scale (Q4_K/Q5_K `dmin`, Q6_K `d`).
    dc: Vec<f32>,
}

impl Unpacked {
    fn new(ty: QuantType, k: usize) -> Self {
        let nb = k / ty.block_elems();
        let kq = ty.is_k();
        Self {
            q: vec![0; k],
            aq: if kq { vec![] } else { vec![0; k] },
            sc: if kq { vec![0; k / 2] } else { vec![] },
            cm: if kq { vec![0; nb * 16] } else { vec![] },
            dm: vec![0.0; nb],
            dc: if kq { vec![0.0; nb] } else { vec![] },
        }
    }

    /// Unpacks one row of blocks; with `simd` (only when the CPU has AVX2)
    /// the values are unpacked by the AVX2 code, to the same bytes.
    fn unpack(&mut self, ty: QuantType, row: &[u8], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd && !ty.is_k() {
            // SAFETY: `simd` is only set when the CPU has AVX2 (`Path::Avx2` or above).
            unsafe { avx2::unpack_row_32(ty, row, self) };
            return;
        }
        let (be, bb) = (ty.block_elems(), ty.block_bytes());
        for (b, blk) in row.chunks_exact(bb).enumerate() {
            let q = &mut self.q[b * be..(b + 1) * be];
            #[cfg(target_arch = "x86_64")]
            if simd {
                let aq: &mut [u8] = if ty.is_k() {
                    &mut []
                } else {
                    &mut self.aq[b * be..(b + 1) * be]
                };
                // SAFETY: `simd` is only set when the CPU has AVX2
                // (`Path::Avx2` or above); `q` (and `aq`) hold one block's values.
                unsafe { avx2::unpack_values(ty, blk, q, aq) };
            }
            let values = !(simd && cfg!(target_arch = "x86_64"));
            match ty {
                QuantType::Q8_0 => {
                    self.dm[b] = f16_at(blk, 0);
                    if values {
                        for (o, &v) in q.iter_mut().zip(&blk[2..34]) {
                            *o = v as i8;
                        }
                    }
                }
                QuantType::Q4_0 => {
                    self.dm[b] = f16_at(blk, 0);
                    let qs = &blk[2..18];
                    let (lo, hi) = q.split_at_mut(16);
                    for j in (0..16).filter(|_| values) {
                        lo[j] = (qs[j] & 0xF) as i8 - 8;
                        hi[j] = (qs[j] >> 4) as i8 - 8;
                    }
                }
                QuantType::Q5_0 => {
                    self.dm[b] = f16_at(blk, 0);
                    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                    let qs = &blk[6..22];
                    let (lo, hi) = q.split_at_mut(16);
                    for j in (0..16).filter(|_| values) {
                        let h0 = ((qh >> j) & 1) as u8;
                        let h1 = ((qh >> (j + 16)) & 1) as u8;
                        lo[j] = ((qs[j] & 0xF) | (h0 << 4)) as i8 - 16;
                        hi[j] = ((qs[j] >> 4) | (h1 << 4)) as i8 - 16;
                    }
                }
                QuantType::Q4K | QuantType::Q5K => {
                    self.dm[b] = f16_at(blk, 0);
                    self.dc[b] = f16_at(blk, 2);
                    let scales = &blk[4..16];
                    let (qh, qs) = if ty == QuantType::Q5K {
                        (Some(&blk[16..48]), &blk[48..176])
                    } else {
                        (None, &blk[16..144])
                    };
                    for s in 0..8 {
                        let (sc, mn) = scale_min_k4(s, scales);
                        self.sc[(b * 8 + s) * 16..(b * 8 + s + 1) * 16].fill(sc as i16);
                        self.cm[b * 16 + 2 * s] = mn as i16;
                        self.cm[b * 16 + 2 * s + 1] = mn as i16;
                        if !values {
                            continue;
                        }
                        let bytes = &qs[32 * (s / 2)..32 * (s / 2) + 32];
                        let out = &mut q[32 * s..32 * s + 32];
                        let shift = 4 * (s % 2);
                        for (l, o) in out.iter_mut().enumerate() {
                            let mut v = (bytes[l] >> shift) & 0xF;
                            if let Some(qh) = qh {
                                v |= ((qh[l] >> s) & 1) << 4;
                            }
                            *o = v as i8;
                        }
                    }
                }
                QuantType::Q6K => {
                    let (ql, qh, scales) = (&blk[0..128], &blk[128..192], &blk[192..208]);
                    self.dm[b] = f16_at(blk, 208);
                    self.dc[b] = self.dm[b];
                    for (s, &sc) in scales.iter().enumerate() {
                        let sc = sc as i8 as i16;
                        self.cm[b * 16 + s] = 32 * sc;
                        // Per 32 values: lanes 0..8 cover the first 16, 8..16 the next.
                        let v = s / 2;
                        let half = (s % 2) * 8;
                        self.sc[(b * 8 + v) * 16 + half..(b * 8 + v) * 16 + half + 8].fill(sc);
                    }
                    for h in (0..2).filter(|_| values) {
                        let (ql, qh) = (&ql[64 * h..64 * h + 64], &qh[32 * h..32 * h + 32]);
                        let q = &mut q[128 * h..128 * h + 128];
                        for l in 0..32 {
                            q[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8;
                            q[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8;
                            q[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8;
                            q[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8;
                        }
                    }
                }
            }
        }
        if !(ty.is_k() || simd && cfg!(target_arch = "x86_64")) {
            for (a, &v) in self.aq.iter_mut().zip(&self.q) {
                *a = v.unsigned_abs();
            }
        }
    }

    /// The unpacked row as f32 weights (what the file's values mean).
    fn dequantize_into(&self, ty: QuantType, out: &mut Vec<f32>) {
        let be = ty.block_elems();
        match ty {
            QuantType::Q4_0 | QuantType::Q5_0 | QuantType::Q8_0 => {
                for (b, q) in self.q.chunks_exact(be).enumerate() {
                    out.extend(q.iter().map(|&v| v as f32 * self.dm[b]));
                }
            }
            QuantType::Q4K | QuantType::Q5K => {
                for (g, q) in self.q.chunks_exact(32).enumerate() {
                    let b = g / 8;
                    let d = self.dm[b] * self.sc[g * 16] as f32;
                    let m = self.dc[b] * self.cm[b * 16 + 2 * (g % 8)] as f32;
                    out.extend(q.iter().map(|&v| d * v as u8 as f32 - m));
                }
            }
            QuantType::Q6K => {
                for (s, q) in self.q.chunks_exact(16).enumerate() {
                    let b = s / 16;
                    let sc = self.cm[s] / 32;
                    out.extend(
                        q.iter()
                            .map(|&v| self.dm[b] * sc as f32 * (v as i32 - 32) as f32),
                    );
                }
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 8 lanes summed in a fixed order.
#[inline]
fn hsum8(l: [f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

/// The dot product of an unpacked weight row and a quantized activation row:
/// the reference arithmetic (see the module docs) in portable code.
fn dot_scalar(ty: QuantType, w: &Unpacked, x: ActRow<'_>) -> f32 {
    if !ty.is_k() {
        let mut acc = 0f32;
        for (b, (wq, xq)) in w.q.chunks_exact(32).zip(x.q.chunks_exact(32)).enumerate() {
            let p: i32 = wq.iter().zip(xq).map(|(&a, &b)| a as i32 * b as i32).sum();
            acc = (w.dm[b] * x.d[b]).mul_add(p as f32, acc);
        }
        return acc;
    }
    let mut acc = [0f32; 8];
    let mut accc = [0f32; 8];
    for b in 0..w.dm.len() {
        let mut isum = [0i32; 8];
        for v in 0..8 {
            let g = b * 8 + v;
            let (wq, xq) = (&w.q[g * 32..g * 32 + 32], &x.q[g * 32..g * 32 + 32]);
            let sc = &w.sc[g * 16..g * 16 + 16];
            for (l, s) in isum.iter_mut().enumerate() {
                for t in 0..2 {
                    let e = 4 * l + 2 * t;
                    let pair = wq[e] as u8 as i32 * xq[e] as i32
                        + wq[e + 1] as u8 as i32 * xq[e + 1] as i32;
                    *s += sc[2 * l + t] as i32 * pair;
                }
            }
        }
        let cm = &w.cm[b * 16..b * 16 + 16];
        let bs = &x.bsums[b * 16..b * 16 + 16];
        let (dm, dc) = (w.dm[b] * x.d[b], w.dc[b] * x.d[b]);
        for l in 0..8 {
            let c =
                cm[2 * l] as i32 * bs[2 * l] as i32 + cm[2 * l + 1] as i32 * bs[2 * l + 1] as i32;
            acc[l] = dm.mul_add(isum[l] as f32, acc[l]);
            accc[l] = dc.mul_add(c as f32, accc[l]);
        }
    }
    hsum8(acc) - hsum8(accc)
}

/// Output features per parallel task.
const COLS_PER_TASK: usize = 64;

/// The kernels this module runs on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Path {
    /// [`dot_scalar`] (any CPU).
    Portable,
    /// AVX2 + FMA: `maddubs` + `madd`.
    Avx2,
    /// AVX2 + FMA, and AVX-512 (F, BW) with VNNI: `vpdpbusd` on 16
    /// interleaved Q8_0 rows at once (the other types as `Avx2`).
    Vnni512,
}

impl Path {
    /// What this CPU supports, capped like the GEMM by `LLMOPS_CPU_ISA`
    /// ([`Isa::detect`]: `avx2` or `portable`). Decided once per process.
    pub fn detect() -> Path {
        static PATH: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
        *PATH.get_or_init(|| {
            let cap = match Isa::detect() {
                Isa::Portable => Path::Portable,
                Isa::Avx2 => Path::Avx2,
                Isa::Avx512 => Path::Vnni512,
            };
            Self::supported().min(cap)
        })
    }

    /// The widest path the CPU supports.
    pub fn supported() -> Path {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
                return Path::Vnni512;
            }
            if avx2 {
                return Path::Avx2;
            }
        }
        Path::Portable
    }
}

/// `out[m, n] = x[m, k] · wᵀ + bias[n]`.
pub fn matmul_xwt(x: &[f32], m: usize, w: &QuantWeight, bias: Option<&[f32]>, out: &mut [f32]) {
    matmul_with(x, m, w, bias, out, Path::detect());
}

/// As [`matmul_xwt`] on the kernels of `path` (capped at what the CPU has):
/// every path gives the same bits.
pub fn matmul_xwt_on(
    path: Path,
    x: &[f32],
    m: usize,
    w: &QuantWeight,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    matmul_with(x, m, w, bias, out, path.min(Path::supported()));
}

fn matmul_with(
    x: &[f32],
    m: usize,
    w: &QuantWeight,
    bias: Option<&[f32]>,
    out: &mut [f32],
    path: Path,
) {
    let (n, k, ty) = (w.n, w.k, w.ty);
    assert!(x.len() >= m * k && out.len() >= m * n, "matmul shapes");
    if m == 0 || n == 0 {
        return;
    }
    let acts = Acts::quantize(x, m, k, ty);
    let ptr = OutPtr(out.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    if path == Path::Vnni512 && w.interleaved {
        vnni::matmul_interleaved(w, &acts, m, bias, ptr);
        return;
    }
    let simd = path >= Path::Avx2;
    // Enough tasks to balance the threads, few enough that each amortizes its buffers.
    let per_task = (n / 256).next_multiple_of(COLS).max(COLS_PER_TASK);
    let tasks = n.div_ceil(per_task);
    let run = |t: usize| {
        let mut us: [Unpacked; COLS] = std::array::from_fn(|_| Unpacked::new(ty, k));
        let mut bufs: [Vec<u8>; COLS] = Default::default();
        let mut cols = vec![0f32; m * COLS];
        let end = ((t + 1) * per_task).min(n);
        for j0 in (t * per_task..end).step_by(COLS) {
            let c = (end - j0).min(COLS);
            #[cfg(target_arch = "x86_64")]
            let direct = simd && m <= 4 && !ty.is_k();
            #[cfg(not(target_arch = "x86_64"))]
            let direct = false;
            if direct {
                #[cfg(target_arch = "x86_64")]
                dot_direct(ty, w, j0, c, &acts, m, &mut cols, &mut bufs);
            } else {
                for (jj, u) in us.iter_mut().enumerate().take(c) {
                    u.unpack(ty, w.row(j0 + jj, &mut bufs[jj]), simd);
                }
                dot_rows(ty, &us[..c], &acts, m, simd, &mut cols);
            }
            for (jj, col) in cols.chunks_exact(m).enumerate().take(c) {
                let j = j0 + jj;
                let b = bias.map_or(0.0, |b| b[j]);
                for (i, v) in col.iter().enumerate() {
                    // SAFETY: i < m and j < n (asserted above); this task alone
                    // writes column j.
                    unsafe { *ptr.get().add(i * n + j) = v + b };
                }
            }
        }
    };
    if m * n * k < 1 << 15 || tasks == 1 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// Small batches (m ≤ 4) on 32-wide blocks: `c` weight rows from `j0`
/// dotted with all `m` activation rows straight from the file's bytes.
#[cfg(target_arch = "x86_64")]
fn dot_direct(
    ty: QuantType,
    w: &QuantWeight,
    j0: usize,
    c: usize,
    acts: &Acts,
    m: usize,
    out: &mut [f32],
    bufs: &mut [Vec<u8>; COLS],
) {
    macro_rules! go {
        ($r:literal, $c:literal, $j:expr) => {{
            let [b0, b1, b2, b3] = &mut *bufs;
            let mut bs = [b0, b1, b2, b3].into_iter();
            let wrows: [&[u8]; $c] = std::array::from_fn(|i| {
                let buf = bs.next().expect("COLS buffers");
                w.row($j + i, buf)
            });
            // SAFETY: only called with `simd` set (the CPU has AVX2 and FMA);
            // the rows are whole rows of this weight; m == $r rows exist.
            unsafe { avx2::dot_direct_32::<$r, $c>(ty, wrows, acts, &mut out[($j - j0) * m..], m) }
        }};
    }
    let wide = if m <= 2 { 4 } else { 2 };
    let mut j = j0;
    while j < j0 + c {
        let left = j0 + c - j;
        let step = if left >= wide { wide } else { 1 };
        match (m, step) {
            (1, 4) => go!(1, 4, j),
            (1, _) => go!(1, 1, j),
            (2, 4) => go!(2, 4, j),
            (2, _) => go!(2, 1, j),
            (3, 2) => go!(3, 2, j),
            (3, _) => go!(3, 1, j),
            (_, 2) => go!(4, 2, j),
            _ => go!(4, 1, j),
        }
        j += step;
    }
}

/// Weight rows unpacked and dotted together (independent accumulator
/// chains for one or two activation rows).
const COLS: usize = 4;

/// The dot products of unpacked weight rows `ws` with every activation row:
/// `out[c * m + i]` for row `c` of `ws` and activation row `i`.
fn dot_rows(ty: QuantType, ws: &[Unpacked], acts: &Acts, m: usize, simd: bool, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY (every call below): `simd` is only set when the CPU has
        // AVX2 and FMA (`Path::Avx2` or above); the rows and columns passed exist.
        let mut i = 0;
        while i < m {
            let r = (m - i).min(4);
            match r {
                4 | 3 => {
                    for (c, w) in ws.iter().enumerate() {
                        let o = &mut out[c * m + i..];
                        // SAFETY: see above.
                        unsafe {
                            if r == 4 {
                                avx2::dot::<4, 1>(ty, [w], acts, i, o, m)
                            } else {
                                avx2::dot::<3, 1>(ty, [w], acts, i, o, m)
                            }
                        }
                    }
                }
                2 => {
                    let mut c = 0;
                    while c + 2 <= ws.len() {
                        let o = &mut out[c * m + i..];
                        // SAFETY: see above.
                        unsafe { avx2::dot::<2, 2>(ty, [&ws[c], &ws[c + 1]], acts, i, o, m) };
                        c += 2;
                    }
                    if c < ws.len() {
                        let o = &mut out[c * m + i..];
                        // SAFETY: see above.
                        unsafe { avx2::dot::<2, 1>(ty, [&ws[c]], acts, i, o, m) };
                    }
                }
                _ => {
                    let mut c = 0;
                    while c + 4 <= ws.len() {
                        let o = &mut out[c * m + i..];
                        let w4 = [&ws[c], &ws[c + 1], &ws[c + 2], &ws[c + 3]];
                        // SAFETY: see above.
                        unsafe { avx2::dot::<1, 4>(ty, w4, acts, i, o, m) };
                        c += 4;
                    }
                    for c in c..ws.len() {
                        let o = &mut out[c * m + i..];
                        // SAFETY: see above.
                        unsafe { avx2::dot::<1, 1>(ty, [&ws[c]], acts, i, o, m) };
                    }
                }
            }
            i += r;
        }
        return;
    }
    let _ = simd;
    for (c, w) in ws.iter().enumerate() {
        for i in 0..m {
            out[c * m + i] = dot_scalar(ty, w, acts.row(i));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Acts, QuantType, Unpacked, hsum8};

    /// One 32-wide block (Q4_0, Q5_0, Q8_0) at `blk`: its scale and its
    /// 32 signed values (what `Unpacked::unpack` writes).
    ///
    /// # Safety
    /// The CPU must have AVX2; `blk` points to a whole block of `ty`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn decode32(ty: QuantType, blk: *const u8) -> (f32, __m256i) {
        let low = _mm256_set1_epi8(0xF);
        // SAFETY: every read lies inside the block (the GGUF layouts).
        unsafe {
            let d = half::f16::from_bits(u16::from_le_bytes([*blk, *blk.add(1)])).to_f32();
            let v = match ty {
                QuantType::Q8_0 => _mm256_loadu_si256(blk.add(2) as *const __m256i),
                QuantType::Q4_0 => {
                    let qs = _mm_loadu_si128(blk.add(2) as *const __m128i);
                    let b = _mm256_set_m128i(_mm_srli_epi16(qs, 4), qs);
                    _mm256_sub_epi8(_mm256_and_si256(b, low), _mm256_set1_epi8(8))
                }
                _ => {
                    let qs = _mm_loadu_si128(blk.add(6) as *const __m128i);
                    let b = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), low);
                    let qh = (blk.add(2) as *const u32).read_unaligned();
                    // Byte j gets bit j of qh (llama.cpp's bytes_from_bits_32).
                    let shuf = _mm256_set_epi64x(
                        0x0303030303030303,
                        0x0202020202020202,
                        0x0101010101010101,
                        0,
                    );
                    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
                    let bits = _mm256_cmpeq_epi8(
                        _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
                        _mm256_set1_epi64x(-1),
                    );
                    let h = _mm256_and_si256(bits, _mm256_set1_epi8(0x10));
                    _mm256_sub_epi8(_mm256_or_si256(b, h), _mm256_set1_epi8(16))
                }
            };
            (d, v)
        }
    }

    /// Unpacks a row of 32-wide blocks (Q4_0, Q5_0, Q8_0): the bytes and
    /// scales `Unpacked::unpack` writes without SIMD.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn unpack_row_32(ty: QuantType, row: &[u8], u: &mut Unpacked) {
        let bb = ty.block_bytes();
        let nb = row.len() / bb;
        assert!(u.q.len() == nb * 32 && u.aq.len() == nb * 32 && u.dm.len() == nb);
        let (q, aq, dm, row) = (u.q.as_mut_ptr(), u.aq.as_mut_ptr(), &mut u.dm, row.as_ptr());
        for (b, d) in dm.iter_mut().enumerate() {
            // SAFETY: block b lies inside the row (nb whole blocks); the
            // buffers hold nb * 32 values (asserted).
            unsafe {
                let (dw, v) = decode32(ty, row.add(b * bb));
                *d = dw;
                _mm256_storeu_si256(q.add(b * 32) as *mut __m256i, v);
                _mm256_storeu_si256(aq.add(b * 32) as *mut __m256i, _mm256_abs_epi8(v));
            }
        }
    }

    /// `R` activation rows (all of a small batch) against `C` weight rows
    /// of 32-wide blocks read straight from the file's bytes (no unpacking
    /// pass), into `out[c * stride + r]`: the arithmetic of `dot` and
    /// `super::dot_scalar`, bit for bit.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `wrows` are whole rows of `ty`
    /// blocks matching the activations' `k`; rows `0..R` exist.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_direct_32<const R: usize, const C: usize>(
        ty: QuantType,
        wrows: [&[u8]; C],
        acts: &Acts,
        out: &mut [f32],
        stride: usize,
    ) {
        let rows: [_; R] = std::array::from_fn(|r| acts.row(r));
        let bb = ty.block_bytes();
        let nb = acts.k / 32;
        for w in &wrows {
            assert_eq!(w.len(), nb * bb);
        }
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[0f32; C]; R];
        let mut acc4 = [_mm_setzero_ps(); R];
        for b in 0..nb {
            // SAFETY: block b of each weight row is inside it (asserted);
            // each activation row holds nb * 32 values.
            unsafe {
                let mut dw = [0f32; C];
                let mut wq = [_mm256_setzero_si256(); C];
                let mut aq = [_mm256_setzero_si256(); C];
                for c in 0..C {
                    let (d, v) = decode32(ty, wrows[c].as_ptr().add(b * bb));
                    dw[c] = d;
                    wq[c] = v;
                    aq[c] = _mm256_abs_epi8(v);
                }
                for (r, x) in rows.iter().enumerate() {
                    let xq = _mm256_loadu_si256(x.q.as_ptr().add(b * 32) as *const __m256i);
                    let dx = x.d[b];
                    let p: [__m256i; C] = std::array::from_fn(|c| {
                        _mm256_madd_epi16(
                            _mm256_maddubs_epi16(aq[c], _mm256_sign_epi8(xq, wq[c])),
                            ones,
                        )
                    });
                    if C == 4 {
                        // Four columns' lanes reduced together, one conversion.
                        let s = _mm256_hadd_epi32(
                            _mm256_hadd_epi32(p[0], p[1]),
                            _mm256_hadd_epi32(p[2], p[3]),
                        );
                        let s = _mm_add_epi32(
                            _mm256_castsi256_si128(s),
                            _mm256_extracti128_si256(s, 1),
                        );
                        let d = _mm_mul_ps(_mm_loadu_ps(dw.as_ptr()), _mm_set1_ps(dx));
                        acc4[r] = _mm_fmadd_ps(d, _mm_cvtepi32_ps(s), acc4[r]);
                    } else {
                        for c in 0..C {
                            acc[r][c] = (dw[c] * dx).mul_add(hsum_i32(p[c]) as f32, acc[r][c]);
                        }
                    }
                }
            }
        }
        for r in 0..R {
            if C == 4 {
                let mut l = [0f32; 4];
                // SAFETY: l holds 4 f32.
                unsafe { _mm_storeu_ps(l.as_mut_ptr(), acc4[r]) };
                acc[r].copy_from_slice(&l[..C]);
            }
            for c in 0..C {
                out[c * stride + r] = acc[r][c];
            }
        }
    }

    /// The sum of 8 i32 lanes (exact).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// Unpacks one block's values into `q` (and `|q|` into `aq` for the
    /// 32-wide types): the bytes `Unpacked::unpack` writes without SIMD.
    ///
    /// # Safety
    /// The CPU must have AVX2; `blk` is one whole block of `ty`, `q` holds
    /// its values and `aq` as many (32-wide types) or nothing.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn unpack_values(ty: QuantType, blk: &[u8], q: &mut [i8], aq: &mut [u8]) {
        assert!(blk.len() == ty.block_bytes() && q.len() == ty.block_elems());
        let store = |q: &mut [i8], at: usize, v: __m256i| {
            // SAFETY: callers pass at + 32 <= q.len().
            unsafe { _mm256_storeu_si256(q.as_mut_ptr().add(at) as *mut __m256i, v) }
        };
        let low = _mm256_set1_epi8(0xF);
        // SAFETY: every load reads inside `blk` (offsets from the block layouts).
        unsafe {
            let ld = |at: usize| _mm256_loadu_si256(blk.as_ptr().add(at) as *const __m256i);
            match ty {
                QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q5_0 => {
                    let (_, v) = decode32(ty, blk.as_ptr());
                    store(q, 0, v);
                    _mm256_storeu_si256(aq.as_mut_ptr() as *mut __m256i, _mm256_abs_epi8(v));
                }
                QuantType::Q4K | QuantType::Q5K => {
                    let (qs, qh) = if ty == QuantType::Q5K {
                        (48, Some(ld(16)))
                    } else {
                        (16, None)
                    };
                    for t in 0..4 {
                        let bytes = ld(qs + 32 * t);
                        let mut lo = _mm256_and_si256(bytes, low);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
                        if let Some(qh) = qh {
                            let bit = |s: usize| {
                                let m = _mm256_set1_epi8(1 << s);
                                let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, m), m);
                                _mm256_and_si256(set, _mm256_set1_epi8(0x10))
                            };
                            lo = _mm256_or_si256(lo, bit(2 * t));
                            hi = _mm256_or_si256(hi, bit(2 * t + 1));
                        }
                        store(q, 64 * t, lo);
                        store(q, 64 * t + 32, hi);
                    }
                }
                QuantType::Q6K => {
                    let three = _mm256_set1_epi8(3);
                    for h in 0..2 {
                        let (ql0, ql1, qh) = (ld(64 * h), ld(64 * h + 32), ld(128 + 32 * h));
                        let hb = |shift: i32| {
                            let v = match shift {
                                0 => qh,
                                2 => _mm256_srli_epi16(qh, 2),
                                4 => _mm256_srli_epi16(qh, 4),
                                _ => _mm256_srli_epi16(qh, 6),
                            };
                            _mm256_slli_epi16(_mm256_and_si256(v, three), 4)
                        };
                        let hi4 = |v: __m256i| _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                        store(
                            q,
                            128 * h,
                            _mm256_or_si256(_mm256_and_si256(ql0, low), hb(0)),
                        );
                        store(
                            q,
                            128 * h + 32,
                            _mm256_or_si256(_mm256_and_si256(ql1, low), hb(2)),
                        );
                        store(q, 128 * h + 64, _mm256_or_si256(hi4(ql0), hb(4)));
                        store(q, 128 * h + 96, _mm256_or_si256(hi4(ql1), hb(6)));
                    }
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lanes(v: __m256) -> [f32; 8] {
        let mut l = [0f32; 8];
        // SAFETY: l holds 8 f32.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), v) };
        l
    }

    /// `R` activation rows from `row0` against `C` unpacked weight rows,
    /// into `out[c * stride + r]`: the arithmetic of `super::dot_scalar`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; rows `row0..row0 + R` must exist.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot<const R: usize, const C: usize>(
        ty: QuantType,
        ws: [&Unpacked; C],
        acts: &Acts,
        row0: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        let rows: [_; R] = std::array::from_fn(|r| acts.row(row0 + r));
        let nb = ws[0].dm.len();
        if !ty.is_k() {
            let mut acc = [[0f32; C]; R];
            let ones = _mm256_set1_epi16(1);
            for b in 0..nb {
                // SAFETY: every weight row holds nb * 32 values; every
                // activation row too.
                unsafe {
                    let wq: [__m256i; C] = std::array::from_fn(|c| {
                        _mm256_loadu_si256(ws[c].q.as_ptr().add(b * 32) as *const __m256i)
                    });
                    let aq: [__m256i; C] = std::array::from_fn(|c| {
                        _mm256_loadu_si256(ws[c].aq.as_ptr().add(b * 32) as *const __m256i)
                    });
                    for (a, x) in acc.iter_mut().zip(&rows) {
                        let xq = _mm256_loadu_si256(x.q.as_ptr().add(b * 32) as *const __m256i);
                        for c in 0..C {
                            let p = _mm256_madd_epi16(
                                _mm256_maddubs_epi16(aq[c], _mm256_sign_epi8(xq, wq[c])),
                                ones,
                            );
                            let d = ws[c].dm[b] * x.d[b];
                            a[c] = d.mul_add(hsum_i32(p) as f32, a[c]);
                        }
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                for (c, a) in a.iter().enumerate() {
                    out[c * stride + r] = *a;
                }
            }
            return;
        }
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut accc = [[_mm256_setzero_ps(); C]; R];
        for b in 0..nb {
            // SAFETY: every weight row holds nb * 256 values, nb * 128 scales
            // and nb * 16 multipliers; every activation row holds nb * 256
            // values and nb * 16 sums.
            unsafe {
                for r in 0..R {
                    let x = &rows[r];
                    let bs = _mm256_loadu_si256(x.bsums.as_ptr().add(b * 16) as *const __m256i);
                    let mut isum = [_mm256_setzero_si256(); C];
                    for v in 0..8 {
                        let g = b * 8 + v;
                        let xq = _mm256_loadu_si256(x.q.as_ptr().add(g * 32) as *const __m256i);
                        for c in 0..C {
                            let w = ws[c];
                            let wq = _mm256_loadu_si256(w.q.as_ptr().add(g * 32) as *const __m256i);
                            let sc =
                                _mm256_loadu_si256(w.sc.as_ptr().add(g * 16) as *const __m256i);
                            isum[c] = _mm256_add_epi32(
                                isum[c],
                                _mm256_madd_epi16(_mm256_maddubs_epi16(wq, xq), sc),
                            );
                        }
                    }
                    for c in 0..C {
                        let w = ws[c];
                        let cm = _mm256_loadu_si256(w.cm.as_ptr().add(b * 16) as *const __m256i);
                        let corr = _mm256_madd_epi16(cm, bs);
                        let dm = _mm256_set1_ps(w.dm[b] * x.d[b]);
                        let dc = _mm256_set1_ps(w.dc[b] * x.d[b]);
                        acc[r][c] = _mm256_fmadd_ps(dm, _mm256_cvtepi32_ps(isum[c]), acc[r][c]);
                        accc[r][c] = _mm256_fmadd_ps(dc, _mm256_cvtepi32_ps(corr), accc[r][c]);
                    }
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                out[c * stride + r] = hsum8(lanes(acc[r][c])) - hsum8(lanes(accc[r][c]));
            }
        }
    }
}

/// AVX512-VNNI on Q8_0 interleaved by 16 rows (see [`QuantWeight::new`]).
#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{Acts, GROUP, OutPtr, QuantType, QuantWeight};

    /// `out[i, j] = x_i · w_j + bias[j]` over the interleaved groups;
    /// the caller checked the CPU (`Path::Vnni512`).
    pub fn matmul_interleaved(
        w: &QuantWeight,
        acts: &Acts,
        m: usize,
        bias: Option<&[f32]>,
        out: OutPtr,
    ) {
        let (n, nb) = (w.n, w.k / 32);
        let gb = GROUP * w.ty.block_bytes();
        let groups = n.div_ceil(GROUP);
        // Enough tasks to balance the threads, few enough to amortize them.
        let per_task = groups.div_ceil(64).max(4);
        let tasks = groups.div_ceil(per_task);
        let run = |t: usize| {
            let mut res = [[0f32; GROUP]; 4];
            for g in t * per_task..((t + 1) * per_task).min(groups) {
                let grp = &w.data[g * nb * gb..(g + 1) * nb * gb];
                let cols = (n - g * GROUP).min(GROUP);
                let mut i = 0;
                while i < m {
                    let r = (m - i).min(4);
                    // SAFETY: `Path::Vnni512` means the CPU has AVX-512 F/BW,
                    // VNNI, AVX2, FMA and F16C; the group holds nb blocks;
                    // rows i..i + r exist.
                    unsafe {
                        match (w.ty, r) {
                            (QuantType::Q8_0, 4) => dot16::<4>(grp, nb, acts, i, &mut res),
                            (QuantType::Q8_0, 3) => dot16::<3>(grp, nb, acts, i, &mut res),
                            (QuantType::Q8_0, 2) => dot16::<2>(grp, nb, acts, i, &mut res),
                            (QuantType::Q8_0, _) => dot16::<1>(grp, nb, acts, i, &mut res),
                            (QuantType::Q5_0, 4) => nib16::<4, true>(grp, nb, acts, i, &mut res),
                            (QuantType::Q5_0, 3) => nib16::<3, true>(grp, nb, acts, i, &mut res),
                            (QuantType::Q5_0, 2) => nib16::<2, true>(grp, nb, acts, i, &mut res),
                            (QuantType::Q5_0, _) => nib16::<1, true>(grp, nb, acts, i, &mut res),
                            (_, 4) => nib16::<4, false>(grp, nb, acts, i, &mut res),
                            (_, 3) => nib16::<3, false>(grp, nb, acts, i, &mut res),
                            (_, 2) => nib16::<2, false>(grp, nb, acts, i, &mut res),
                            _ => nib16::<1, false>(grp, nb, acts, i, &mut res),
                        }
                    }
                    for (rr, res) in res.iter().enumerate().take(r) {
                        for (c, v) in res.iter().enumerate().take(cols) {
                            let j = g * GROUP + c;
                            let b = bias.map_or(0.0, |b| b[j]);
                            // SAFETY: i + rr < m and j < n (the caller checked
                            // `out` holds m * n); this task alone writes column j.
                            unsafe { *out.get().add((i + rr) * n + j) = v + b };
                        }
                    }
                    i += r;
                }
            }
        };
        if m * n * w.k < 1 << 15 || tasks == 1 {
            (0..tasks).for_each(run);
        } else {
            (0..tasks).into_par_iter().for_each(run);
        }
    }

    /// `R` activation rows from `row0` against one group of 16 rows, into
    /// `out[r][c]`: per block, the exact integer dot product of each row
    /// (`vpdpbusd` of `x + 128` with the weights, less `vpdpbusd` of 128
    /// with them), then one FMA by `d_w · d_x` per block in block order,
    /// the arithmetic of `super::dot_scalar` in 16 lanes.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW, VNNI and F16C; `grp` holds `nb`
    /// interleaved blocks; rows `row0..row0 + R` exist with `nb` blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn dot16<const R: usize>(
        grp: &[u8],
        nb: usize,
        acts: &Acts,
        row0: usize,
        out: &mut [[f32; 16]; 4],
    ) {
        assert!(grp.len() >= nb * GROUP * 34 && acts.block == 32);
        let rows: [_; R] = std::array::from_fn(|r| acts.row(row0 + r));
        for x in &rows {
            assert!(x.q.len() >= nb * 32 && x.d.len() >= nb);
        }
        let bias = _mm512_set1_epi8(-128);
        let mut acc = [_mm512_setzero_ps(); R];
        let p = grp.as_ptr();
        for b in 0..nb {
            // SAFETY: block b of the group and of each row lies inside them (asserted).
            unsafe {
                let blk = p.add(b * GROUP * 34);
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
                let mut sw = _mm512_setzero_si512();
                let mut s = [_mm512_setzero_si512(); R];
                for t in 0..8 {
                    let wv = _mm512_loadu_si512(blk.add(32 + 64 * t) as *const _);
                    sw = _mm512_dpbusd_epi32(sw, bias, wv);
                    for r in 0..R {
                        let xq =
                            (rows[r].q.as_ptr().add(b * 32 + 4 * t) as *const i32).read_unaligned();
                        let xu = _mm512_xor_si512(_mm512_set1_epi32(xq), bias);
                        s[r] = _mm512_dpbusd_epi32(s[r], xu, wv);
                    }
                }
                for r in 0..R {
                    let d = _mm512_mul_ps(dw, _mm512_set1_ps(*rows[r].d.get_unchecked(b)));
                    let si = _mm512_sub_epi32(s[r], sw);
                    acc[r] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(si), acc[r]);
                }
            }
        }
        for r in 0..R {
            // SAFETY: out[r] holds 16 f32.
            unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
        }
    }

    /// As [`dot16`] for Q4_0 (`Q5` false) and Q5_0 (`Q5` true): the
    /// nibbles (and Q5_0's fifth bits) widened to unsigned bytes `u` in
    /// registers, `vpdpbusd` of `u` with `x`, less the offset (8 or 16)
    /// times the activation block's sum: the exact `Σ (u - offset) · x`.
    ///
    /// # Safety
    /// As [`dot16`], with Q4_0/Q5_0 groups.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn nib16<const R: usize, const Q5: bool>(
        grp: &[u8],
        nb: usize,
        acts: &Acts,
        row0: usize,
        out: &mut [[f32; 16]; 4],
    ) {
        let (bb, hoff, off) = if Q5 { (22, 64, 16) } else { (18, 0, 8) };
        assert!(grp.len() >= nb * GROUP * bb && acts.block == 32);
        let rows: [_; R] = std::array::from_fn(|r| acts.row(row0 + r));
        for x in &rows {
            assert!(x.q.len() >= nb * 32 && x.d.len() >= nb && x.bsums.len() >= 2 * nb);
        }
        let low = _mm512_set1_epi8(0xF);
        let five = _mm512_set1_epi8(0x10);
        // Per 32-bit lane, its byte 0 four times, then (the next lanes) 4, 8, 12.
        let lane_byte0 = _mm512_set1_epi64(0x0404_0404_0000_0000);
        let lane_byte0 = _mm512_add_epi8(
            lane_byte0,
            _mm512_broadcast_i32x4(_mm_set_epi64x(0x0808_0808_0808_0808, 0)),
        );
        let mut acc = [_mm512_setzero_ps(); R];
        let p = grp.as_ptr();
        for b in 0..nb {
            // SAFETY: block b of the group and of each row lies inside them (asserted).
            unsafe {
                let blk = p.add(b * GROUP * bb);
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
                let qh = if Q5 {
                    _mm512_loadu_si512(blk.add(32) as *const _)
                } else {
                    _mm512_setzero_si512()
                };
                // Quad q (values 4q..4q+3) gets bits 4q..4q+3 of qh at bit 4.
                let high = |v: __m512i, q: i32| {
                    if !Q5 {
                        return v;
                    }
                    let idx = _mm512_add_epi8(lane_byte0, _mm512_set1_epi8((q / 2) as i8));
                    let bytes = _mm512_shuffle_epi8(qh, idx);
                    let sel = _mm512_set1_epi32((0x0804_0201u32 << (4 * (q % 2))) as i32);
                    let k = _mm512_test_epi8_mask(bytes, sel);
                    _mm512_or_si512(v, _mm512_maskz_mov_epi8(k, five))
                };
                let mut s = [_mm512_setzero_si512(); R];
                for t in 0..4 {
                    let qs = _mm512_loadu_si512(blk.add(32 + hoff + 64 * t) as *const _);
                    let lo = high(_mm512_and_si512(qs, low), t as i32);
                    let hi = high(
                        _mm512_and_si512(_mm512_srli_epi16(qs, 4), low),
                        t as i32 + 4,
                    );
                    for r in 0..R {
                        let xq = rows[r].q.as_ptr().add(b * 32);
                        let xlo = (xq.add(4 * t) as *const i32).read_unaligned();
                        let xhi = (xq.add(16 + 4 * t) as *const i32).read_unaligned();
                        s[r] = _mm512_dpbusd_epi32(s[r], lo, _mm512_set1_epi32(xlo));
                        s[r] = _mm512_dpbusd_epi32(s[r], hi, _mm512_set1_epi32(xhi));
                    }
                }
                for r in 0..R {
                    let x = &rows[r];
                    let sum = *x.bsums.get_unchecked(2 * b) as i32
                        + *x.bsums.get_unchecked(2 * b + 1) as i32;
                    let si = _mm512_sub_epi32(s[r], _mm512_set1_epi32(off * sum));
                    let d = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.get_unchecked(b)));
                    acc[r] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(si), acc[r]);
                }
            }
        }
        for r in 0..R {
            // SAFETY: out[r] holds 16 f32.
            unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random byte stream.
    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 33) as u8
            })
            .collect()
    }

    /// Random blocks of `ty` with sane (finite, small) f16 scales.
    fn random_weight(ty: QuantType, n: usize, k: usize, seed: u64) -> QuantWeight {
        let mut data = bytes(n * k / ty.block_elems() * ty.block_bytes(), seed);
        let bb = ty.block_bytes();
        for (i, blk) in data.chunks_exact_mut(bb).enumerate() {
            let s = |v: f32| f16::from_f32(v).to_le_bytes();
            let a = 0.002 + (i % 7) as f32 * 0.001;
            match ty {
                QuantType::Q4_0 | QuantType::Q5_0 | QuantType::Q8_0 => {
                    blk[..2].copy_from_slice(&s(a))
                }
                QuantType::Q4K | QuantType::Q5K => {
                    blk[..2].copy_from_slice(&s(a / 8.0));
                    blk[2..4].copy_from_slice(&s(a / 16.0));
                }
                QuantType::Q6K => blk[208..210].copy_from_slice(&s(a / 16.0)),
            }
        }
        QuantWeight::new(ty, data, n, k).unwrap()
    }

    fn acts(m: usize, k: usize) -> Vec<f32> {
        (0..m * k)
            .map(|i| (i as f32 * 0.37).sin() * (1.0 + (i % 5) as f32))
            .collect()
    }

    const TYPES: [QuantType; 6] = [
        QuantType::Q4_0,
        QuantType::Q5_0,
        QuantType::Q8_0,
        QuantType::Q4K,
        QuantType::Q5K,
        QuantType::Q6K,
    ];

    /// Our dequantization equals candle's (llama.cpp's) for every type.
    #[test]
    fn rows_dequantize_like_candle() {
        use candle_core::Device;
        use candle_core::quantized::GgmlDType;
        for ty in TYPES {
            let (n, k) = (3, 512);
            let w = random_weight(ty, n, k, 7);
            let g = match ty {
                QuantType::Q4_0 => GgmlDType::Q4_0,
                QuantType::Q5_0 => GgmlDType::Q5_0,
                QuantType::Q8_0 => GgmlDType::Q8_0,
                QuantType::Q4K => GgmlDType::Q4K,
                QuantType::Q5K => GgmlDType::Q5K,
                QuantType::Q6K => GgmlDType::Q6K,
            };
            let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                g,
                &w.data,
                vec![n, k],
                &Device::Cpu,
            )
            .unwrap();
            let want = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (j, want) in want.iter().enumerate() {
                let mut row = vec![];
                w.row_into(j, &mut row);
                for (e, (a, b)) in row.iter().zip(want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                        "{ty:?} row {j} elem {e}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Against the f64 product of the dequantized weights and the
    /// unquantized activations: the only error is the activations' int8
    /// rounding (half a step, `max|x|/254`, per value) plus f32 sums.
    #[test]
    fn matches_the_dequantized_product_within_the_activation_rounding() {
        for ty in TYPES {
            for &(m, n) in &[(1, 5), (2, 70), (5, 33), (33, 3)] {
                let k = 512;
                let w = random_weight(ty, n, k, 11);
                let x = acts(m, k);
                let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01).collect();
                let mut out = vec![0f32; m * n];
                matmul_xwt(&x, m, &w, Some(&bias), &mut out);
                let mut deq = vec![];
                for j in 0..n {
                    w.row_into(j, &mut deq);
                }
                for i in 0..m {
                    let xr = &x[i * k..(i + 1) * k];
                    for j in 0..n {
                        let wr = &deq[j * k..(j + 1) * k];
                        let exact: f64 = xr
                            .iter()
                            .zip(wr)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            + bias[j] as f64;
                        // Per activation block: half a step times Σ|w|.
                        let be = ty.block_elems();
                        let bound: f64 = xr
                            .chunks(be)
                            .zip(wr.chunks(be))
                            .map(|(xb, wb)| {
                                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                                // Q8_0's f16-rounded scale adds a relative 2^-11.
                                let step = amax / 127.0 * (1.0 + 1.0 / 1024.0);
                                let sw: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                                step * 0.5 * sw + amax / 1024.0 * sw / 127.0
                            })
                            .sum::<f64>()
                            + 1e-4 * exact.abs()
                            + 1e-5;
                        let got = out[i * n + j] as f64;
                        assert!(
                            (got - exact).abs() <= bound,
                            "{ty:?} m={m} n={n} ({i},{j}): {got} vs {exact} (bound {bound})"
                        );
                    }
                }
            }
        }
    }

    /// Every kernel path this CPU has (AVX2, AVX512-VNNI on interleaved
    /// Q8_0) computes the scalar reference's arithmetic bit for bit, on
    /// both layouts, for every type, batch sizes around the 4-row blocks
    /// and row counts around the 16-row groups.
    #[test]
    fn every_kernel_path_equals_the_scalar_reference_bit_for_bit() {
        let paths: Vec<Path> = [Path::Portable, Path::Avx2, Path::Vnni512]
            .into_iter()
            .filter(|&p| p <= Path::supported())
            .collect();
        eprintln!("quant kernel paths on this CPU: {paths:?}");
        for ty in TYPES {
            for &(m, n, k) in &[
                (1usize, 3usize, 768usize),
                (1, 9, 32 * 7),
                (1, 48, 640),
                (2, 65, 768),
                (3, 7, 768),
                (4, 33, 256 * 3),
                (5, 17, 768),
                (6, 10, 768),
                (7, 5, 768),
                (33, 9, 768),
                (9, 130, 512),
            ] {
                if !k.is_multiple_of(ty.block_elems()) {
                    continue;
                }
                let file = random_weight(ty, n, k, 3);
                let x = acts(m, k);
                let mut want = vec![0f32; m * n];
                matmul_with(&x, m, &file, None, &mut want, Path::Portable);
                for interleave in [false, true] {
                    let w =
                        QuantWeight::with_layout(ty, file.data.clone(), n, k, interleave).unwrap();
                    for &path in &paths {
                        let mut got = vec![f32::NAN; m * n];
                        matmul_xwt_on(path, &x, m, &w, None, &mut got);
                        for (idx, (p, q)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                p.to_bits(),
                                q.to_bits(),
                                "{ty:?} {path:?} interleaved {interleave} m={m} n={n} k={k} \
                                 at {idx}: {p} vs {q}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The 32-wide types' reference is one exact integer dot product per
    /// block, scaled by `d_w · d_x` and added in block order with one FMA.
    #[test]
    fn a_32_wide_block_is_one_integer_dot_product_scaled_once() {
        let (n, k) = (2, 64);
        let w = random_weight(QuantType::Q8_0, n, k, 9);
        let x = acts(1, k);
        let a = Acts::quantize(&x, 1, k, QuantType::Q8_0);
        let mut out = vec![0f32; n];
        matmul_with(&x, 1, &w, None, &mut out, Path::Portable);
        let mut buf = vec![];
        for (j, &got) in out.iter().enumerate() {
            let row = w.row(j, &mut buf);
            let mut want = 0f32;
            for b in 0..2 {
                let blk = &row[b * 34..(b + 1) * 34];
                let s: i32 = (0..32)
                    .map(|e| blk[2 + e] as i8 as i32 * a.q[b * 32 + e] as i32)
                    .sum();
                want = (f16_at(blk, 0) * a.d[b]).mul_add(s as f32, want);
            }
            assert_eq!(got.to_bits(), want.to_bits(), "row {j}");
        }
    }

    /// Interleaving keeps every row's bytes: lookups and stacking see the file.
    #[test]
    fn interleaved_rows_read_back_as_the_file_has_them() {
        let (n, k) = (21, 96);
        let file = random_weight(QuantType::Q8_0, n, k, 4);
        let w = QuantWeight::with_layout(QuantType::Q8_0, file.data.clone(), n, k, true).unwrap();
        assert!(w.interleaved);
        assert_eq!(w.size_in_bytes(), 2 * 16 * 3 * 34);
        let (mut a, mut b) = (vec![], vec![]);
        for j in 0..n {
            assert_eq!(w.row(j, &mut a), file.row(j, &mut b), "row {j}");
            let (mut x, mut y) = (vec![], vec![]);
            w.row_into(j, &mut x);
            file.row_into(j, &mut y);
            assert_eq!(x, y);
        }
        let s = QuantWeight::stack(&[&w, &w]).unwrap();
        assert!(s.interleaved);
        assert_eq!(s.n, 2 * n);
        assert_eq!(s.row(n + 5, &mut a), file.row(5, &mut b));
    }

    /// Row i of an m-row product equals the 1-row product bit for bit.
    #[test]
    fn a_row_gets_the_same_bits_alone_or_in_a_batch() {
        for ty in TYPES {
            let (m, n, k) = (9, 130, 512);
            let w = random_weight(ty, n, k, 5);
            let x = acts(m, k);
            let mut all = vec![0f32; m * n];
            matmul_xwt(&x, m, &w, None, &mut all);
            for i in 0..m {
                let mut one = vec![0f32; n];
                matmul_xwt(&x[i * k..(i + 1) * k], 1, &w, None, &mut one);
                assert_eq!(&all[i * n..(i + 1) * n], &one[..], "{ty:?} row {i}");
            }
        }
    }

    #[test]
    fn stacking_concatenates_rows() {
        let a = random_weight(QuantType::Q5_0, 3, 64, 1);
        let b = random_weight(QuantType::Q5_0, 2, 64, 2);
        let s = QuantWeight::stack(&[&a, &b]).unwrap();
        assert_eq!(s.n, 5);
        let (mut x, mut y) = (vec![], vec![]);
        s.row_into(4, &mut x);
        b.row_into(1, &mut y);
        assert_eq!(x, y);
        let c = random_weight(QuantType::Q8_0, 2, 64, 2);
        assert!(QuantWeight::stack(&[&a, &c]).is_none());
        assert!(QuantWeight::new(QuantType::Q4K, vec![0; 144], 1, 128).is_none());
    }
}
