//! `out = x · wᵀ` for f32 on the CPU, with the weight packed once at load.
//!
//! Checkpoints store `w` row-major `[n, k]`. [`PackedWeight`] regroups it
//! into panels of 16 output columns, `[n/16][k][16]`, so the kernel streams
//! each panel once per step and never repacks (gemm-style libraries repack
//! the weight on every call, which at decode batch sizes costs as much as the
//! multiply). The microkernel is an outer product: 6 activation rows × 16
//! columns in 12 AVX2 accumulators, enough independent FMA chains to keep
//! both FMA units busy. One or two rows (single streams) take two panels per
//! call instead, so they too have 4–8 chains in flight and stream weights at
//! memory speed rather than at one FMA latency per 64 bytes.
//!
//! Panels hold f32, f16 (half the memory and bandwidth; converted to f32
//! in registers with F16C) or int8 with one scale per row, the latter two
//! for weights dequantized from GGUF blocks.
//!
//! Work is split over column panels only and every output element is one
//! FMA chain over `k` in order, so a row's result is bit-identical whatever
//! else is in the batch.

use half::f16;
use rayon::prelude::*;

use super::OutPtr;

/// Output columns per panel.
pub const NR: usize = 16;
/// Activation rows per microkernel call.
const MR: usize = 6;
/// Panels per parallel task.
const PANELS_PER_TASK: usize = 4;

/// The kernel family the GEMM runs on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Scalar code (any CPU).
    Portable,
    /// 8-lane AVX2 + FMA + F16C.
    Avx2,
    /// 16-lane AVX-512 (F) for batches, AVX2 for one or two rows.
    Avx512,
}

impl Isa {
    /// The widest family this CPU supports, capped by `LLMOPS_CPU_ISA`
    /// (`avx2` or `portable`; for comparisons, never above what the CPU has).
    /// Decided once per process.
    pub fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let cap = match std::env::var("LLMOPS_CPU_ISA").as_deref() {
                Ok("portable") => Isa::Portable,
                Ok("avx2") => Isa::Avx2,
                _ => Isa::Avx512,
            };
            Self::supported().min(cap)
        })
    }

    /// The widest family the CPU supports.
    pub fn supported() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }
}

/// Panel storage.
#[derive(Debug, Clone)]
enum Panels {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// Symmetric int8 with one f32 scale per output feature (padded to whole panels).
    I8 {
        q: Vec<i8>,
        scale: Vec<f32>,
    },
}

/// How a packed weight stores its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanelFormat {
    /// f32, exact.
    F32,
    /// f16: half the bytes; converted in registers (F16C).
    F16,
    /// int8 with a per-row scale: a quarter of the bytes (plus 4 per row).
    I8,
}

/// A weight `[n, k]` regrouped into column panels (see the module docs).
#[derive(Debug, Clone)]
pub struct PackedWeight {
    data: Panels,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
}

fn pack_panels<T: Copy + Default>(
    w: &[f32],
    n: usize,
    k: usize,
    conv: impl Fn(f32) -> T,
) -> Vec<T> {
    let panels = n.div_ceil(NR);
    let mut data = vec![T::default(); panels * k * NR];
    for j in 0..n {
        let (panel, c) = (j / NR, j % NR);
        let row = &w[j * k..(j + 1) * k];
        for (p, &v) in row.iter().enumerate() {
            data[(panel * k + p) * NR + c] = conv(v);
        }
    }
    data
}

impl PackedWeight {
    /// Packs a row-major `[n, k]` weight.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        Self {
            data: Panels::F32(pack_panels(w, n, k, |v| v)),
            n,
            k,
        }
    }

    /// Packs a row-major `[n, k]` weight stored as f16.
    pub fn pack_f16(w: &[f32], n: usize, k: usize) -> Self {
        Self {
            data: Panels::F16(pack_panels(w, n, k, f16::from_f32)),
            n,
            k,
        }
    }

    /// Packs a row-major `[n, k]` weight as int8, each row scaled by its
    /// largest magnitude / 127 (round to nearest).
    pub fn pack_i8(w: &[f32], n: usize, k: usize) -> Self {
        let mut scale = vec![1f32; n.div_ceil(NR) * NR];
        let mut scaled = Vec::with_capacity(n * k);
        for (j, row) in w.chunks_exact(k).take(n).enumerate() {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            if max > 0.0 {
                scale[j] = max / 127.0;
            }
            let inv = 1.0 / scale[j];
            scaled.extend(row.iter().map(|v| v * inv));
        }
        Self {
            data: Panels::I8 {
                q: pack_panels(&scaled, n, k, |v| v.round().clamp(-127.0, 127.0) as i8),
                scale,
            },
            n,
            k,
        }
    }

    /// Packs a row-major `[n, k]` weight in `format`.
    pub fn pack_as(w: &[f32], n: usize, k: usize, format: PanelFormat) -> Self {
        match format {
            PanelFormat::F32 => Self::pack(w, n, k),
            PanelFormat::F16 => Self::pack_f16(w, n, k),
            PanelFormat::I8 => Self::pack_i8(w, n, k),
        }
    }

    /// How the panels store values.
    pub fn format(&self) -> PanelFormat {
        match self.data {
            Panels::F32(_) => PanelFormat::F32,
            Panels::F16(_) => PanelFormat::F16,
            Panels::I8 { .. } => PanelFormat::I8,
        }
    }

    /// Row `j` of the original `[n, k]` matrix (an embedding lookup).
    pub fn row_into(&self, j: usize, out: &mut Vec<f32>) {
        let (panel, c) = (j / NR, j % NR);
        let base = panel * self.k * NR + c;
        match &self.data {
            Panels::F32(d) => out.extend((0..self.k).map(|p| d[base + p * NR])),
            Panels::F16(d) => out.extend((0..self.k).map(|p| d[base + p * NR].to_f32())),
            Panels::I8 { q, scale } => {
                out.extend((0..self.k).map(|p| q[base + p * NR] as f32 * scale[j]))
            }
        }
    }

    /// Bytes of storage.
    pub fn size_in_bytes(&self) -> usize {
        match &self.data {
            Panels::F32(d) => std::mem::size_of_val(d.as_slice()),
            Panels::F16(d) => std::mem::size_of_val(d.as_slice()),
            Panels::I8 { q, scale } => q.len() + std::mem::size_of_val(scale.as_slice()),
        }
    }

    /// Stacks weights with the same `k` and storage (their rows, in order) into one.
    pub fn stack(parts: &[&PackedWeight]) -> Option<PackedWeight> {
        let k = parts.first()?.k;
        let format = parts.first()?.format();
        if parts.iter().any(|p| p.k != k || p.format() != format) {
            return None;
        }
        let mut rows = vec![];
        let mut row = vec![];
        for p in parts {
            for j in 0..p.n {
                row.clear();
                p.row_into(j, &mut row);
                rows.extend_from_slice(&row);
            }
        }
        let n = parts.iter().map(|p| p.n).sum();
        Some(PackedWeight::pack_as(&rows, n, k, format))
    }
}

/// `out[m, n] = x[m, k] · wᵀ + bias[n]`.
pub fn matmul_xwt(x: &[f32], m: usize, w: &PackedWeight, bias: Option<&[f32]>, out: &mut [f32]) {
    matmul_xwt_on(Isa::detect(), x, m, w, bias, out)
}

/// [`matmul_xwt`] on the kernels of `isa` (at most what the CPU supports):
/// every family gives the same bits, which the tests check.
pub fn matmul_xwt_on(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let isa = isa.min(Isa::supported());
    let (n, k) = (w.n, w.k);
    assert!(x.len() >= m * k && out.len() >= m * n, "matmul shapes");
    if let Some(b) = bias {
        assert!(b.len() >= n, "bias shape");
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && m >= avx512::MIN_ROWS {
        thread_local! {
            static PACKED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let mut packed = PACKED.take();
        avx512::pack_rows(x, m, k, &mut packed);
        for_panels(isa, &packed, m, w, bias, out);
        PACKED.set(packed);
        return;
    }
    for_panels(isa, x, m, w, bias, out);
}

/// Runs [`panels_range`] over tasks of a few column panels each, in
/// parallel unless the product is small; `x` as `panels_range` takes it.
fn for_panels(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let ptr = OutPtr(out.as_mut_ptr());
    let panels = w.n.div_ceil(NR);
    let tasks = panels.div_ceil(PANELS_PER_TASK);
    let run = |t: usize| {
        let lo = t * PANELS_PER_TASK;
        let hi = (lo + PANELS_PER_TASK).min(panels);
        // SAFETY: this task writes only the columns of panels lo..hi, which no
        // other task touches; the caller checked the shapes; `isa` is supported.
        unsafe { panels_range(isa, x, m, w, lo, hi, bias, ptr.get()) };
    };
    // Small products are not worth a fork-join.
    if m * w.n * w.k < 1 << 15 || tasks == 1 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// Computes the columns of panels `lo..hi` for every row, on the AVX-512
/// batch kernel (then `x` is packed by `avx512::pack_rows`), the AVX2 kernel
/// or the portable one.
///
/// # Safety
/// `out` must point to an `m × w.n` buffer whose columns in these panels
/// nobody else writes concurrently; the CPU must support `isa`.
#[allow(clippy::too_many_arguments)]
unsafe fn panels_range(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    lo: usize,
    hi: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let (n, k) = (w.n, w.k);
        // One kernel entry point over the three panel formats.
        macro_rules! on_panels {
            ($kernel:path) => {
                match &w.data {
                    Panels::F32(d) => $kernel(x, m, d.as_ptr(), n, k, lo, hi, bias, None, out),
                    Panels::F16(d) => $kernel(x, m, d.as_ptr(), n, k, lo, hi, bias, None, out),
                    Panels::I8 { q, scale } => {
                        $kernel(x, m, q.as_ptr(), n, k, lo, hi, bias, Some(scale), out)
                    }
                }
            };
        }
        if isa == Isa::Avx512 && m >= avx512::MIN_ROWS {
            // SAFETY: the CPU has AVX-512F; the caller upholds the rest.
            unsafe { on_panels!(avx512::panels_range) };
            return;
        }
        if isa >= Isa::Avx2 {
            // SAFETY: the CPU has AVX2, FMA and F16C; the caller upholds the rest.
            unsafe { on_panels!(avx2::panels_range) };
            return;
        }
    }
    let _ = isa;
    // SAFETY: forwarded from the caller.
    unsafe { portable_panels(x, m, w, lo, hi, bias, out) };
}

unsafe fn portable_panels(
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    lo: usize,
    hi: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    let (n, k) = (w.n, w.k);
    let weight = |idx: usize| match &w.data {
        Panels::F32(d) => d[idx],
        Panels::F16(d) => d[idx].to_f32(),
        Panels::I8 { q, .. } => q[idx] as f32,
    };
    let scale = |j: usize| match &w.data {
        Panels::I8 { scale, .. } => scale[j],
        _ => 1.0,
    };
    for panel in lo..hi {
        let base = panel * k * NR;
        let cols = (n - panel * NR).min(NR);
        for i in 0..m {
            let mut acc = [0f32; NR];
            for p in 0..k {
                let xv = x[i * k + p];
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = xv.mul_add(weight(base + p * NR + c), *a);
                }
            }
            for (c, v) in acc.iter().enumerate().take(cols) {
                let j = panel * NR + c;
                // SAFETY: i < m, j < n, and this task owns the panel's columns.
                unsafe { *out.add(i * n + j) = v * scale(j) + bias.map_or(0.0, |b| b[j]) };
            }
        }
    }
}

/// A panel element the x86 kernels widen to f32, 8 (AVX2) or 16 (AVX-512)
/// at a time.
#[cfg(target_arch = "x86_64")]
trait Elem: Copy {
    /// Whether the panels already hold f32 (read in place, never widened).
    const IS_F32: bool;
    /// Loads 8 values at `p` as f32.
    ///
    /// # Safety
    /// `p` must point to 8 readable values; the CPU must have AVX2 and F16C.
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Loads 16 values at `p` as f32.
    ///
    /// # Safety
    /// `p` must point to 16 readable values; the CPU must have AVX-512F.
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

#[cfg(target_arch = "x86_64")]
impl Elem for f32 {
    const IS_F32: bool = true;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: forwarded from the caller.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: forwarded from the caller.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Elem for f16 {
    const IS_F32: bool = false;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: forwarded from the caller; 8 f16 are 128 bits.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: forwarded from the caller; 16 f16 are 256 bits.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Elem for i8 {
    const IS_F32: bool = false;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const i8) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: forwarded from the caller; 8 bytes are read.
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const i8) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: forwarded from the caller; 16 bytes are read.
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))) }
    }
}

/// Where a kernel call's results go: columns from `col0` of the `m × n`
/// output, with the bias and the int8 panels' row scales.
#[cfg(target_arch = "x86_64")]
struct Dest<'a> {
    out: *mut f32,
    n: usize,
    col0: usize,
    bias: Option<&'a [f32]>,
    scale: Option<&'a [f32]>,
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Dest, Elem, MR, NR};

    /// `R` rows × one 16-column panel.
    ///
    /// # Safety
    /// `x` rows must hold `k` values each; `pw` must hold `k * 16`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn micro<const R: usize, E: Elem>(
        x: [*const f32; R],
        pw: *const E,
        k: usize,
        prefetch: Prefetch,
    ) -> [[__m256; 2]; R] {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for p in 0..k {
            if p < prefetch.steps {
                // SAFETY: a prefetch never faults; the address is in the next panel anyway.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(prefetch.at.add(p * prefetch.stride)) };
            }
            // SAFETY: p < k.
            let (w0, w1) = unsafe { (E::load8(pw.add(p * NR)), E::load8(pw.add(p * NR + 8))) };
            for r in 0..R {
                // SAFETY: p < k.
                let xb = unsafe { _mm256_broadcast_ss(&*x[r].add(p)) };
                acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
            }
        }
        acc
    }

    /// `R` rows × two panels: twice the independent FMA chains of `micro`,
    /// so one or two rows are not held to one FMA latency per 64 bytes of
    /// weights. Each output is still one chain over `k` in order: the same
    /// bits as `micro::<R>`.
    ///
    /// # Safety
    /// `x` rows must hold `k` values each; `pa` and `pb` must hold `k * 16`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn micro_pair<const R: usize, E: Elem>(
        x: [*const f32; R],
        pa: *const E,
        pb: *const E,
        k: usize,
        prefetch: [Prefetch; 2],
    ) -> [[[__m256; 2]; R]; 2] {
        let mut acc = [[[_mm256_setzero_ps(); 2]; R]; 2];
        for p in 0..k {
            for f in &prefetch {
                if p < f.steps {
                    // SAFETY: a prefetch never faults.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(f.at.add(p * f.stride)) };
                }
            }
            // SAFETY: p < k for both panels and every row.
            unsafe {
                let w = [
                    [E::load8(pa.add(p * NR)), E::load8(pa.add(p * NR + 8))],
                    [E::load8(pb.add(p * NR)), E::load8(pb.add(p * NR + 8))],
                ];
                for r in 0..R {
                    let xb = _mm256_broadcast_ss(&*x[r].add(p));
                    for (a, w) in acc.iter_mut().zip(&w) {
                        a[r][0] = _mm256_fmadd_ps(xb, w[0], a[r][0]);
                        a[r][1] = _mm256_fmadd_ps(xb, w[1], a[r][1]);
                    }
                }
            }
        }
        acc
    }

    /// Writes `R` rows of one panel, adding the bias and dropping padding columns.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn store<const R: usize>(
        acc: [[__m256; 2]; R],
        out: *mut f32,
        n: usize,
        row0: usize,
        col0: usize,
        bias: Option<&[f32]>,
        scale: Option<&[f32]>,
    ) {
        let cols = (n - col0).min(NR);
        let mut bias_v = [0f32; NR];
        if let Some(b) = bias {
            bias_v[..cols].copy_from_slice(&b[col0..col0 + cols]);
        }
        let mut scale_v = [1f32; NR];
        if let Some(s) = scale {
            scale_v.copy_from_slice(&s[col0..col0 + NR]);
        }
        for (r, a) in acc.iter().enumerate() {
            let mut tmp = [0f32; NR];
            // SAFETY: tmp holds 16 values.
            unsafe {
                _mm256_storeu_ps(tmp.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), a[1]);
            }
            for c in 0..cols {
                // SAFETY: (row0 + r) < m and col0 + c < n; the caller owns these columns.
                unsafe { *out.add((row0 + r) * n + col0 + c) = tmp[c] * scale_v[c] + bias_v[c] };
            }
        }
    }

    /// Part of the next panel to pull into cache while this one computes:
    /// one step of `k` per iteration, `steps` of them from `at`.
    #[derive(Clone, Copy)]
    struct Prefetch {
        at: *const i8,
        /// Bytes per step of `k`.
        stride: usize,
        steps: usize,
    }

    /// Row blocks covering `m` rows: blocks of 6, except that a short tail
    /// (1–3 rows, too few FMA chains to hide the FMA latency) is merged
    /// with the last full block and split in two (7 → 4 + 3, 8 → 4 + 4,
    /// 9 → 5 + 4). Every output is still one FMA chain over `k` in order,
    /// so results do not depend on the blocking.
    fn row_blocks(m: usize) -> impl Iterator<Item = (usize, usize)> {
        let full = m / MR;
        let tail = m % MR;
        let (plain, split) = if (1..4).contains(&tail) && full > 0 {
            (full - 1, MR + tail)
        } else {
            (full, tail)
        };
        let parts = if split > MR {
            [split - split / 2, split / 2]
        } else {
            [split, 0]
        };
        (0..plain)
            .map(|_| MR)
            .chain(parts.into_iter().filter(|&r| r > 0))
            .scan(0, |row, r| {
                let at = *row;
                *row += r;
                Some((at, r))
            })
    }

    /// See `super::panels_range`; `data` is the panel storage of an `[n, k]` weight.
    ///
    /// While a panel computes, the next one is prefetched, spread over the
    /// panel's row blocks: weights come from memory once per step and the
    /// hardware prefetcher does not see a panel's first pass coming.
    ///
    /// # Safety
    /// As `super::panels_range`, `data` must hold the weight's panels, and the
    /// CPU must support AVX2, FMA and F16C.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn panels_range<E: Elem>(
        x: &[f32],
        m: usize,
        data: *const E,
        n: usize,
        k: usize,
        lo: usize,
        hi: usize,
        bias: Option<&[f32]>,
        scale: Option<&[f32]>,
        out: *mut f32,
    ) {
        let blocks = row_blocks(m).count();
        let share = k.div_ceil(blocks.max(1));
        let panels = n.div_ceil(NR);
        let stride = NR * std::mem::size_of::<E>();
        let mut panel = lo;
        // One or two rows: two panels at a time (see `micro_pair`).
        while (1..=2).contains(&m) && panel + 1 < hi {
            let next = |q: usize| {
                if q < panels {
                    Prefetch {
                        // SAFETY: q < panels: the start of a panel of the weight.
                        at: unsafe { data.add(q * k * NR) } as *const i8,
                        stride,
                        steps: k,
                    }
                } else {
                    Prefetch {
                        at: data as *const i8,
                        stride,
                        steps: 0,
                    }
                }
            };
            let prefetch = [next(panel + 2), next(panel + 3)];
            // SAFETY: panel + 1 < hi <= panels.
            let (pa, pb) = unsafe { (data.add(panel * k * NR), data.add((panel + 1) * k * NR)) };
            let row = |i: usize| x[i * k..].as_ptr();
            // SAFETY: rows 0..m exist with k values; this task owns both
            // panels' columns.
            unsafe {
                if m == 1 {
                    let [a, b] = micro_pair::<1, E>([row(0)], pa, pb, k, prefetch);
                    store(a, out, n, 0, panel * NR, bias, scale);
                    store(b, out, n, 0, (panel + 1) * NR, bias, scale);
                } else {
                    let [a, b] = micro_pair::<2, E>([row(0), row(1)], pa, pb, k, prefetch);
                    store(a, out, n, 0, panel * NR, bias, scale);
                    store(b, out, n, 0, (panel + 1) * NR, bias, scale);
                }
            }
            panel += 2;
        }
        // With more than one row block, f16 and int8 panels are widened to
        // f32 once per panel rather than converted in every row block (the
        // conversions run on the FMA ports); the same values either way.
        let widen = !E::IS_F32 && blocks > 1;
        let mut wide = if widen { WIDE.take() } else { Vec::new() };
        for panel in panel..hi {
            // SAFETY: panel < panels, so the panel's k * 16 values are in bounds.
            let pw = unsafe { data.add(panel * k * NR) };
            let prefetch = |b: usize| {
                let start = (b * share).min(k);
                if panel + 1 < panels {
                    Prefetch {
                        // SAFETY: panel + 1 < panels, start <= k: inside the next panel.
                        at: unsafe { data.add(((panel + 1) * k + start) * NR) } as *const i8,
                        stride,
                        steps: share.min(k - start),
                    }
                } else {
                    Prefetch {
                        at: pw as *const i8,
                        stride,
                        steps: 0,
                    }
                }
            };
            let panel_out = Dest {
                out,
                n,
                col0: panel * NR,
                bias,
                scale,
            };
            if widen {
                wide.resize(k * NR, 0.0);
                for i in (0..k * NR).step_by(8) {
                    // SAFETY: i + 8 <= k * 16, inside the panel and `wide`.
                    unsafe { _mm256_storeu_ps(wide.as_mut_ptr().add(i), E::load8(pw.add(i))) };
                }
                // SAFETY: `wide` holds the panel's k * 16 values as f32.
                unsafe { row_blocks_of(x, m, k, wide.as_ptr(), &prefetch, &panel_out) };
            } else {
                // SAFETY: the panel holds k * 16 values.
                unsafe { row_blocks_of(x, m, k, pw, &prefetch, &panel_out) };
            }
        }
        if widen {
            WIDE.set(wide);
        }
    }

    thread_local! {
        /// The panel in flight widened to f32.
        static WIDE: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    }

    /// Every row block of `x` against one panel `pw` (`k * 16` values).
    ///
    /// # Safety
    /// As `panels_range`, for this panel.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_blocks_of<W: Elem>(
        x: &[f32],
        m: usize,
        k: usize,
        pw: *const W,
        prefetch: &dyn Fn(usize) -> Prefetch,
        o: &Dest<'_>,
    ) {
        let row = |i: usize| x[i * k..].as_ptr();
        for (b, (i, r)) in row_blocks(m).enumerate() {
            let pf = prefetch(b);
            macro_rules! block {
                ($r:literal) => {
                    // SAFETY: rows i..i+r exist; the panel holds k * 16 values.
                    unsafe {
                        store(
                            micro::<$r, W>(std::array::from_fn(|j| row(i + j)), pw, k, pf),
                            o.out,
                            o.n,
                            i,
                            o.col0,
                            o.bias,
                            o.scale,
                        )
                    }
                };
            }
            match r {
                1 => block!(1),
                2 => block!(2),
                3 => block!(3),
                4 => block!(4),
                5 => block!(5),
                _ => block!(6),
            }
        }
    }
}

/// The batch kernel on AVX-512: 16-lane vectors, one per panel row.
///
/// A task widens each pair of panels to f32 once into a thread-local
/// buffer (f16 and int8 panels; f32 panels are read in place), then runs
/// every row block over it: the conversion costs one pass per call instead
/// of one per row block and leaves the FMA ports to the FMAs. The
/// microkernel is up to 12 rows × 2 panels (32 columns) in 24 of the 32
/// vector registers: two weight loads and 12 broadcasts feed 24 FMAs per
/// step of `k`. Each output is one FMA chain over `k` in order, as in the
/// AVX2 kernel, so both give the same bits.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::cell::Cell;

    use super::{Dest, Elem, NR};

    /// Rows per microkernel call at most.
    const MR: usize = 12;
    /// Fewer rows than this take the AVX2 kernel (its two-panel paths for
    /// one or two rows keep enough FMA chains in flight; here a few rows
    /// would not pay for widening the panels).
    pub const MIN_ROWS: usize = 3;

    /// Steps of `k` per chunk: a chunk of a panel pair (32 KiB widened)
    /// stays in L1 while every row block runs over it.
    const KC: usize = 256;

    thread_local! {
        /// Widened chunks of the panel pair in flight.
        static WIDE: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
        /// Partial sums of every row across chunks of `k`, 32 per row.
        static PARTIAL: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    }

    /// Cache lines to pull in while a microkernel runs: one from each
    /// region per step of `k`, `lines` of them from `at[i]`.
    #[derive(Clone, Copy)]
    struct Prefetch {
        at: [*const i8; 2],
        lines: usize,
    }

    /// `R` rows packed `[kc][R]` × `P` panel chunks of f32 (`kc * 16`
    /// each), continuing the sums in `init` (`R × 32` partial sums) or
    /// starting from zero.
    ///
    /// # Safety
    /// `x` must hold `kc * R` values, each `w[q]` `kc * 16`, `init` `R * 32`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn micro<const R: usize, const P: usize>(
        x: *const f32,
        kc: usize,
        w: [*const f32; P],
        init: Option<*const f32>,
        prefetch: Prefetch,
    ) -> [[__m512; P]; R] {
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        if let Some(init) = init {
            for (r, a) in acc.iter_mut().enumerate() {
                for (q, a) in a.iter_mut().enumerate() {
                    // SAFETY: r < R, q < P <= 2.
                    *a = unsafe { _mm512_loadu_ps(init.add(r * 2 * NR + q * NR)) };
                }
            }
        }
        for p in 0..kc {
            if p < prefetch.lines {
                for at in prefetch.at {
                    // A prefetch never faults, whatever the address.
                    _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(p * 64));
                }
            }
            // SAFETY: p < kc in every panel chunk and row.
            unsafe {
                let wv: [__m512; P] = std::array::from_fn(|q| _mm512_loadu_ps(w[q].add(p * NR)));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xb = _mm512_set1_ps(*x.add(p * R + r));
                    for (a, &wv) in a.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(xb, wv, *a);
                    }
                }
            }
        }
        acc
    }

    /// Writes `R` rows × `P` panels: `acc · scale + bias`, dropping padding
    /// columns (the same two roundings as the AVX2 kernel's store).
    ///
    /// # Safety
    /// Rows `row0..row0 + R` exist in `out` (`m × n`); the caller owns the
    /// panels' columns.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store<const R: usize, const P: usize>(
        acc: [[__m512; P]; R],
        d: &Dest<'_>,
        row0: usize,
    ) {
        for q in 0..P {
            let c0 = d.col0 + q * NR;
            if c0 >= d.n {
                break;
            }
            let cols = (d.n - c0).min(NR);
            let mask: __mmask16 = if cols == NR { !0 } else { (1u16 << cols) - 1 };
            // SAFETY: columns c0..c0 + cols exist in bias; scale is padded to whole panels.
            let (b, s) = unsafe {
                (
                    d.bias.map_or(_mm512_setzero_ps(), |b| {
                        _mm512_maskz_loadu_ps(mask, b.as_ptr().add(c0))
                    }),
                    d.scale
                        .map_or(_mm512_set1_ps(1.0), |s| _mm512_loadu_ps(s.as_ptr().add(c0))),
                )
            };
            for (r, a) in acc.iter().enumerate() {
                let v = _mm512_add_ps(_mm512_mul_ps(a[q], s), b);
                // SAFETY: row row0 + r, columns c0..c0 + cols: see above.
                unsafe { _mm512_mask_storeu_ps(d.out.add((row0 + r) * d.n + c0), mask, v) };
            }
        }
    }

    /// Keeps `R` rows' partial sums (`R × 32` at `to`) for the next chunk.
    ///
    /// # Safety
    /// `to` must hold `R * 32` values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn keep<const R: usize, const P: usize>(acc: [[__m512; P]; R], to: *mut f32) {
        for (r, a) in acc.iter().enumerate() {
            for (q, &a) in a.iter().enumerate() {
                // SAFETY: r < R, q < P <= 2.
                unsafe { _mm512_storeu_ps(to.add(r * 2 * NR + q * NR), a) };
            }
        }
    }

    /// Row blocks covering `m` rows: as few as blocks of at most 12 allow,
    /// of nearly equal size, as `(first row, rows)`.
    fn row_blocks(m: usize) -> impl Iterator<Item = (usize, usize)> {
        let blocks = m.div_ceil(MR);
        let (base, extra) = (m / blocks.max(1), m % blocks.max(1));
        (0..blocks).map(move |b| (b * base + b.min(extra), base + usize::from(b < extra)))
    }

    /// `x` (`m × k`, row-major) regrouped for the microkernel: each row
    /// block of `row_blocks` becomes `[k][rows]` at offset `first row * k`,
    /// so a step of `k` broadcasts consecutive values from one pointer (and
    /// a chunk of `k` is one contiguous run) instead of reading rows a power
    /// of two apart, which share L1 sets.
    pub fn pack_rows(x: &[f32], m: usize, k: usize, packed: &mut Vec<f32>) {
        use rayon::prelude::*;
        /// Steps of `k` per packing task.
        const PIECE: usize = 128;
        packed.resize(m * k, 0.0);
        // (first row, rows, first step of k, the destination) per task.
        let mut tasks = Vec::with_capacity(m.div_ceil(MR) * k.div_ceil(PIECE));
        let mut rest = packed.as_mut_slice();
        for (row, rows) in row_blocks(m) {
            for p0 in (0..k).step_by(PIECE) {
                let (dst, tail) = rest.split_at_mut(rows * PIECE.min(k - p0));
                tasks.push((row, rows, p0, dst));
                rest = tail;
            }
        }
        let pack = |(row, rows, p0, dst): (usize, usize, usize, &mut [f32])| {
            let src: [&[f32]; MR] = std::array::from_fn(|r| &x[(row + r.min(rows - 1)) * k + p0..]);
            for (i, d) in dst.chunks_exact_mut(rows).enumerate() {
                for (d, s) in d.iter_mut().zip(&src) {
                    *d = s[i];
                }
            }
        };
        if m * k >= 1 << 14 {
            tasks.into_par_iter().for_each(pack);
        } else {
            tasks.into_iter().for_each(pack);
        }
    }

    /// Every row block of `x` (packed by [`pack_rows`]) against one chunk
    /// (`k0..k0 + kc`) of `P` f32 panels, continuing and keeping partial
    /// sums in `partial` unless the chunk is the first or the last. The
    /// row blocks share the prefetch of the next chunk's two regions of
    /// `next_bytes` each (the hardware prefetcher does not see a jump to
    /// the next panel coming).
    ///
    /// # Safety
    /// As [`panels_range`], for these panels; `w[q]` holds the chunk
    /// (`kc * 16`), `partial` holds `m * 32` values.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn chunk<const P: usize>(
        x: &[f32],
        m: usize,
        k: usize,
        (k0, kc): (usize, usize),
        w: [*const f32; P],
        partial: *mut f32,
        d: &Dest<'_>,
        (next, next_bytes): ([*const i8; 2], usize),
    ) {
        let (first, last) = (k0 == 0, k0 + kc == k);
        let share = next_bytes.div_ceil(64).div_ceil(m.div_ceil(MR));
        for (b, (row, rows)) in row_blocks(m).enumerate() {
            let prefetch = Prefetch {
                at: next.map(|at| at.wrapping_add(b * share * 64)),
                lines: share.min(next_bytes.div_ceil(64).saturating_sub(b * share)),
            };
            let xr = x[row * k + k0 * rows..].as_ptr();
            // SAFETY: row < m, so the row's 32 partial sums are in `partial`.
            let part = unsafe { partial.add(row * 2 * NR) };
            let init = (!first).then_some(part as *const f32);
            macro_rules! block {
                ($r:literal) => {
                    // SAFETY: rows row..row + $r exist and hold this chunk;
                    // each panel chunk holds kc * 16 values.
                    unsafe {
                        let acc = micro::<$r, P>(xr, kc, w, init, prefetch);
                        if last {
                            store(acc, d, row)
                        } else {
                            keep(acc, part)
                        }
                    }
                };
            }
            match rows {
                1 => block!(1),
                2 => block!(2),
                3 => block!(3),
                4 => block!(4),
                5 => block!(5),
                6 => block!(6),
                7 => block!(7),
                8 => block!(8),
                9 => block!(9),
                10 => block!(10),
                11 => block!(11),
                _ => block!(12),
            }
        }
    }

    /// See `super::panels_range`; `x` is packed by [`pack_rows`], `data` is
    /// the panel storage of an `[n, k]` weight.
    ///
    /// Panels go in pairs; each pair in chunks of `KC` steps of `k`,
    /// widened to f32 (unless stored as f32) and run against every row
    /// block while in L1.
    ///
    /// # Safety
    /// As `super::panels_range`; `data` must hold the weight's panels, and
    /// the CPU must support AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn panels_range<E: Elem>(
        x: &[f32],
        m: usize,
        data: *const E,
        n: usize,
        k: usize,
        lo: usize,
        hi: usize,
        bias: Option<&[f32]>,
        scale: Option<&[f32]>,
        out: *mut f32,
    ) {
        let panel_len = k * NR;
        let mut wide = WIDE.take();
        wide.resize(2 * KC * NR, 0.0);
        let mut partial = PARTIAL.take();
        if k > KC {
            partial.resize(m * 2 * NR, 0.0);
        }
        let mut panel = lo;
        while panel < hi {
            let count = (hi - panel).min(2);
            let d = Dest {
                out,
                n,
                col0: panel * NR,
                bias,
                scale,
            };
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                // SAFETY: panel + q < hi <= the weight's panels, k0 + kc <= k.
                let src = |q: usize| unsafe { data.add((panel + q) * panel_len + k0 * NR) };
                let mut w = |q: usize| -> *const f32 {
                    if E::IS_F32 {
                        src(q) as *const f32
                    } else {
                        // SAFETY: `wide` holds two chunks of KC * 16 values.
                        let dst = unsafe { wide.as_mut_ptr().add(q * KC * NR) };
                        for i in (0..kc * NR).step_by(NR) {
                            // SAFETY: i + 16 <= kc * 16: inside the chunk and `dst`.
                            unsafe { _mm512_storeu_ps(dst.add(i), E::load16(src(q).add(i))) };
                        }
                        dst
                    }
                };
                let part = partial.as_mut_ptr();
                // The next chunk of this pair, or the first of the next pair.
                let (np, nk) = if k0 + kc < k {
                    (panel, k0 + kc)
                } else {
                    (panel + count, 0)
                };
                let next_bytes = if np < hi {
                    KC.min(k - nk) * NR * std::mem::size_of::<E>()
                } else {
                    0
                };
                let region = |q: usize| {
                    data.wrapping_add((np + q).min(hi - 1) * panel_len + nk * NR) as *const i8
                };
                let next = ([region(0), region(1)], next_bytes);
                // SAFETY: `w` gives `count` chunks of kc * 16 f32; `partial`
                // holds m * 32 values when there is more than one chunk.
                unsafe {
                    if count == 2 {
                        chunk::<2>(x, m, k, (k0, kc), [w(0), w(1)], part, &d, next);
                    } else {
                        chunk::<1>(x, m, k, (k0, kc), [w(0)], part, &d, next);
                    }
                }
            }
            panel += count;
        }
        WIDE.set(wide);
        PARTIAL.set(partial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut o = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum::<f64>() as f32;
            }
        }
        o
    }

    #[test]
    fn matches_a_naive_product_for_awkward_shapes() {
        for &(m, k, n) in &[
            (1, 8, 4),
            (1, 64, 70),
            (3, 13, 7),
            (2, 256, 130),
            (33, 64, 65),
            (7, 100, 300),
            (13, 5, 17),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 9.0)
                .collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01).collect();
            let p = PackedWeight::pack(&w, n, k);
            let mut o = vec![0f32; m * n];
            matmul_xwt(&x, m, &p, Some(&bias), &mut o);
            let want = naive(&x, m, k, &w, n);
            for (idx, (a, b)) in o.iter().zip(want).enumerate() {
                let b = b + bias[idx % n];
                assert!((a - b).abs() < 1e-4, "{m}x{k}x{n}: {a} vs {b}");
            }
            let mut row = vec![];
            p.row_into(n - 1, &mut row);
            assert_eq!(row, &w[(n - 1) * k..]);
        }
    }

    #[test]
    fn f16_panels_match_a_naive_product_of_the_rounded_weights() {
        for &(m, k, n) in &[(1, 8, 4), (7, 100, 300), (13, 64, 33)] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
            let rounded: Vec<f32> = w.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
            let p = PackedWeight::pack_f16(&w, n, k);
            assert_eq!(p.size_in_bytes(), n.div_ceil(NR) * NR * k * 2);
            let mut o = vec![0f32; m * n];
            matmul_xwt(&x, m, &p, None, &mut o);
            let want = naive(&x, m, k, &rounded, n);
            for (a, b) in o.iter().zip(want) {
                assert!((a - b).abs() < 1e-4, "{m}x{k}x{n}: {a} vs {b}");
            }
            let mut row = vec![];
            p.row_into(n - 1, &mut row);
            assert_eq!(row, &rounded[(n - 1) * k..]);
            let s = PackedWeight::stack(&[&p, &p]).unwrap();
            assert!(s.format() == PanelFormat::F16 && s.n == 2 * n);
        }
    }

    #[test]
    fn int8_panels_match_a_naive_product_of_their_dequantized_rows() {
        for &(m, k, n) in &[(1, 8, 4), (8, 100, 300), (32, 64, 33)] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
            w[..k].iter_mut().for_each(|v| *v = 0.0); // an all-zero row
            let p = PackedWeight::pack_i8(&w, n, k);
            assert_eq!(p.format(), PanelFormat::I8);
            let mut deq = vec![];
            for j in 0..n {
                p.row_into(j, &mut deq);
            }
            // Within half a quantization step of the original.
            for (j, row) in w.chunks(k).enumerate() {
                let step = row.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                for (a, b) in deq[j * k..(j + 1) * k].iter().zip(row) {
                    assert!((a - b).abs() <= step * 0.5 + 1e-7);
                }
            }
            let mut o = vec![0f32; m * n];
            matmul_xwt(&x, m, &p, None, &mut o);
            let want = naive(&x, m, k, &deq, n);
            for (a, b) in o.iter().zip(want) {
                assert!((a - b).abs() < 1e-4, "{m}x{k}x{n}: {a} vs {b}");
            }
            // Alone or in the batch: the same bits.
            let mut one = vec![0f32; n];
            matmul_xwt(&x[(m - 1) * k..], 1, &p, None, &mut one);
            assert_eq!(&o[(m - 1) * n..], &one[..]);
        }
    }

    #[test]
    fn every_kernel_family_gives_the_same_bits() {
        // Portable, AVX2 and AVX-512 (those this CPU has): every output is
        // one FMA chain over k in order, then one multiply by the scale
        // and one add of the bias, whatever the blocking. Shapes cover
        // row blocks of every size, a last odd panel, padding columns,
        // and k over several AVX-512 chunks with a short last one.
        let families: Vec<Isa> = [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&isa| isa <= Isa::supported())
            .collect();
        eprintln!("kernel families on this CPU: {families:?}");
        for &(m, k, n) in &[
            (1, 5, 7),
            (2, 300, 33),
            (3, 64, 16),
            (5, 700, 70),
            (12, 256, 48),
            (13, 513, 33),
            (25, 100, 130),
            (32, 640, 96),
            (40, 37, 17),
        ] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
            let bias: Vec<f32> = (0..n).map(|j| (j as f32 * 0.7).sin()).collect();
            for format in [PanelFormat::F32, PanelFormat::F16, PanelFormat::I8] {
                let p = PackedWeight::pack_as(&w, n, k, format);
                for b in [None, Some(&bias[..])] {
                    let runs: Vec<Vec<f32>> = families
                        .iter()
                        .map(|&isa| {
                            let mut o = vec![f32::NAN; m * n];
                            matmul_xwt_on(isa, &x, m, &p, b, &mut o);
                            o
                        })
                        .collect();
                    for (isa, o) in families.iter().zip(&runs).skip(1) {
                        let same = o
                            .iter()
                            .zip(&runs[0])
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{isa:?} {format:?} {m}x{k}x{n} bias {}", b.is_some());
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_in_a_batch() {
        // 5 panels: one- and two-row products take panels in pairs, plus
        // a last single panel; batches take them one at a time (AVX2) or
        // in pairs (AVX-512, where k = 600 is three chunks).
        for (k, n) in [(96, 70), (600, 70)] {
            rows_alone_and_batched(k, n);
        }
    }

    fn rows_alone_and_batched(k: usize, n: usize) {
        let x: Vec<f32> = (0..9 * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        for format in [PanelFormat::F32, PanelFormat::F16, PanelFormat::I8] {
            let p = PackedWeight::pack_as(&w, n, k, format);
            let mut all = vec![0f32; 9 * n];
            matmul_xwt(&x, 9, &p, None, &mut all);
            for i in 0..9 {
                let mut one = vec![0f32; n];
                matmul_xwt(&x[i * k..(i + 1) * k], 1, &p, None, &mut one);
                assert_eq!(&all[i * n..(i + 1) * n], &one[..], "{format:?} row {i}");
            }
            for i in 0..8 {
                let mut two = vec![0f32; 2 * n];
                matmul_xwt(&x[i * k..(i + 2) * k], 2, &p, None, &mut two);
                assert_eq!(&all[i * n..(i + 2) * n], &two[..], "{format:?} rows {i}..");
            }
        }
    }
}
