//! What this machine can do right now, measured in-process: memory read
//! bandwidth and f32 fused-multiply-add throughput on every core of the
//! compute pool. Benchmarks report their figures as fractions of these,
//! taken in the same minute, because a shared VM's speed drifts.

use std::time::Instant;

use rayon::prelude::*;

/// The measured limits (best of three runs each).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Limits {
    /// Bytes per second read from memory by every pool thread at once.
    pub read_bytes_per_s: f64,
    /// f32 FLOP/s (2 per lane per FMA) on every pool thread at once, with
    /// the vectors the GEMM uses on this CPU (`fma_isa`); `None` where the
    /// CPU has no AVX2 + FMA.
    pub fma_flop_per_s: Option<f64>,
    /// The instruction set of that figure: `avx512`, `avx2` or `none`.
    pub fma_isa: &'static str,
}

/// Measures both limits (about half a second).
pub fn measure() -> Limits {
    let (fma_flop_per_s, fma_isa) = match fma_throughput(3) {
        Some((f, isa)) => (Some(f), isa),
        None => (None, "none"),
    };
    Limits {
        read_bytes_per_s: read_bandwidth(),
        fma_flop_per_s,
        fma_isa,
    }
}

/// Sums a buffer far larger than any cache, split across the pool.
fn read_bandwidth() -> f64 {
    const BYTES: usize = 512 << 20;
    // Filled with a non-zero value so every page is really backed.
    let buf = vec![1.0f32; BYTES / 4];
    let chunk = buf.len().div_ceil(rayon::current_num_threads().max(1));
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let s: f32 = buf.par_chunks(chunk).map(sum).sum();
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max(BYTES as f64 / dt);
    }
    best
}

/// A sum with 32 independent lanes, so loads, not adds, set the pace.
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let mut chunks = xs.chunks_exact(32);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Independent FMA chains in registers on every pool thread, with the
/// widest vectors the GEMM kernels use here: FLOP/s (best of `runs` of
/// ~10 ms) and the instruction set.
pub fn fma_throughput(runs: usize) -> Option<(f64, &'static str)> {
    #[cfg(target_arch = "x86_64")]
    {
        use super::gemm::Isa;
        const ITERS: usize = 4_000_000;
        let (chains, lanes, isa): (unsafe fn(usize) -> f32, usize, _) = match Isa::detect() {
            Isa::Avx512 => (x86::fma_chains_512, 16, "avx512"),
            Isa::Avx2 => (x86::fma_chains, 8, "avx2"),
            Isa::Portable => return None,
        };
        let threads = rayon::current_num_threads().max(1);
        let mut best = 0f64;
        for _ in 0..runs.max(1) {
            let t = Instant::now();
            // SAFETY: `Isa::detect` found the CPU features the chains need.
            let s: f32 = rayon::broadcast(|_| unsafe { chains(ITERS) })
                .into_iter()
                .sum();
            let dt = t.elapsed().as_secs_f64();
            std::hint::black_box(s);
            let flops = (threads * ITERS * x86::CHAINS * lanes * 2) as f64;
            best = best.max(flops / dt);
        }
        return Some((best, isa));
    }
    #[allow(unreachable_code)]
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Chains per iteration: enough to cover the FMA latency on two ports.
    pub const CHAINS: usize = 12;

    /// `iters` rounds of `CHAINS` independent FMAs; returns a value that
    /// depends on all of them.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_chains(iters: usize) -> f32 {
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut lanes = [0f32; 8];
        let total = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, &x| _mm256_add_ps(s, x));
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
        lanes.iter().sum()
    }

    /// As [`fma_chains`] with 16-lane vectors.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_chains_512(iters: usize) -> f32 {
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let total = acc
            .iter()
            .fold(_mm512_setzero_ps(), |s, &x| _mm512_add_ps(s, x));
        _mm512_reduce_add_ps(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lane_sum_adds_every_element() {
        let xs: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
        assert_eq!(sum(&xs), xs.iter().sum::<f32>());
    }
}
