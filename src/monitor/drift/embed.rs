//! The prompt-embedding signal: each scored prompt's final hidden states,
//! mean-pooled by the engine, projected to [`DIM`] dimensions and compared
//! between the reference and a live window by the maximum mean discrepancy
//! (MMD) with a Gaussian kernel, judged by a permutation test.
//!
//! The projection is a fixed random ±1/√DIM matrix (Achlioptas), derived
//! from a hash of each entry's position, so it needs no storage, is the same
//! in every process and for every version of a width, and keeps distances
//! within a few tens of percent (Johnson–Lindenstrauss) — enough for a
//! two-sample test. Vectors are L2-normalised first, so the test sees
//! directions (what the prompts are about), not the hidden states' scale.

/// Dimensions of a projected embedding.
pub const DIM: usize = 32;

/// One projected embedding.
pub type Embedding = [f32; DIM];

/// Reference embeddings a test uses at most (the first ones): bounds the
/// kernel matrix, and so the time a window's evaluation holds the engine.
pub const MAX_REFERENCE: usize = 128;

/// Fewest embeddings on each side for a test.
pub const MIN_SAMPLES: usize = 8;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Projects a pooled hidden state (any width) to [`DIM`] dimensions, unit
/// length. `None` for an empty or all-zero (or non-finite) input.
pub fn project(hidden: &[f32]) -> Option<Embedding> {
    let norm = hidden
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    if !(norm.is_finite() && norm > 0.0) {
        return None;
    }
    let mut out = [0.0f64; DIM];
    for (i, &v) in hidden.iter().enumerate() {
        // 64 signs per hash: one hash per input element covers DIM ≤ 64.
        let bits = splitmix(i as u64);
        let v = f64::from(v);
        for (j, o) in out.iter_mut().enumerate() {
            if bits >> j & 1 == 1 {
                *o += v;
            } else {
                *o -= v;
            }
        }
    }
    let len = out.iter().map(|v| v * v).sum::<f64>().sqrt();
    if !(len.is_finite() && len > 0.0) {
        return None;
    }
    Some(out.map(|v| (v / len) as f32))
}

fn dist2(a: &Embedding, b: &Embedding) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = f64::from(x - y);
            d * d
        })
        .sum()
}

/// The test's outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MmdTest {
    /// Unbiased MMD² between the two samples.
    pub mmd2: f64,
    /// The permutation distribution's `1 - p_warn` quantile.
    pub warn: f64,
    /// Its `1 - p_drift` quantile.
    pub drift: f64,
}

/// Unbiased MMD² of `x` against `y` under a Gaussian kernel whose bandwidth
/// is the median pairwise distance of the pooled sample (the usual
/// heuristic), with critical values from `permutations` random
/// re-splittings of the pool (seeded: the same windows give the same
/// answer). `None` when a side has fewer than [`MIN_SAMPLES`].
pub fn mmd_test(
    x: &[Embedding],
    y: &[Embedding],
    permutations: usize,
    p_warn: f64,
    p_drift: f64,
    seed: u64,
) -> Option<MmdTest> {
    let x = &x[..x.len().min(MAX_REFERENCE)];
    if x.len() < MIN_SAMPLES || y.len() < MIN_SAMPLES {
        return None;
    }
    let pool: Vec<&Embedding> = x.iter().chain(y).collect();
    let n = pool.len();
    let mut d = vec![0.0f64; n * n];
    let mut off = Vec::with_capacity(n * (n - 1) / 2);
    for i in 0..n {
        for j in i + 1..n {
            let v = dist2(pool[i], pool[j]);
            d[i * n + j] = v;
            d[j * n + i] = v;
            off.push(v);
        }
    }
    off.sort_unstable_by(f64::total_cmp);
    let median = off[off.len() / 2];
    // Identical points everywhere: no evidence either way.
    let bw = if median > 0.0 { median } else { 1.0 };
    let k: Vec<f64> = d.iter().map(|&v| (-v / bw).exp()).collect();
    let stat = |side: &[bool]| -> f64 {
        let (mut xx, mut yy, mut xy) = (0.0, 0.0, 0.0);
        let (mut nx, mut ny) = (0usize, 0usize);
        for i in 0..n {
            if side[i] {
                nx += 1;
            } else {
                ny += 1;
            }
            for j in i + 1..n {
                let v = k[i * n + j];
                match (side[i], side[j]) {
                    (true, true) => xx += v,
                    (false, false) => yy += v,
                    _ => xy += v,
                }
            }
        }
        let (nx, ny) = (nx as f64, ny as f64);
        2.0 * xx / (nx * (nx - 1.0)) + 2.0 * yy / (ny * (ny - 1.0)) - 2.0 * xy / (nx * ny)
    };
    let mut side: Vec<bool> = (0..n).map(|i| i < x.len()).collect();
    let mmd2 = stat(&side);
    let mut null = Vec::with_capacity(permutations);
    let mut state = seed;
    for _ in 0..permutations {
        // Fisher–Yates on the side labels.
        for i in (1..n).rev() {
            state = splitmix(state);
            let j = (state % (i as u64 + 1)) as usize;
            side.swap(i, j);
        }
        null.push(stat(&side));
    }
    null.sort_unstable_by(f64::total_cmp);
    let q = |p: f64| {
        let idx =
            (((1.0 - p) * null.len() as f64).ceil() as usize).min(null.len().saturating_sub(1));
        null.get(idx).copied().unwrap_or(f64::INFINITY)
    };
    Some(MmdTest {
        mmd2,
        warn: q(p_warn),
        drift: q(p_drift),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` embeddings around direction `center` (a hidden width of 64),
    /// with noise of scale `spread`.
    fn cloud(n: usize, center: usize, spread: f32, seed: u64) -> Vec<Embedding> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                let h: Vec<f32> = (0..64)
                    .map(|i| {
                        s = splitmix(s);
                        let noise = (s % 2001) as f32 / 1000.0 - 1.0;
                        let base = if i % 8 == center { 1.0 } else { 0.0 };
                        base + spread * noise
                    })
                    .collect();
                project(&h).unwrap()
            })
            .collect()
    }

    #[test]
    fn projection_is_fixed_unit_length_and_keeps_near_things_near() {
        let a: Vec<f32> = (0..640).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = a.iter().map(|v| v * 3.0 + 1e-4).collect();
        let c: Vec<f32> = (0..640).map(|i| (i as f32 * 1.91).cos()).collect();
        let (pa, pb, pc) = (
            project(&a).unwrap(),
            project(&b).unwrap(),
            project(&c).unwrap(),
        );
        assert_eq!(pa, project(&a).unwrap());
        let len = pa.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((len - 1.0).abs() < 1e-5, "{len}");
        assert!(dist2(&pa, &pb) < 1e-6, "scale is not a difference");
        assert!(dist2(&pa, &pc) > 0.5, "unrelated directions stay apart");
        assert!(project(&[0.0; 16]).is_none());
        assert!(project(&[f32::NAN; 16]).is_none());
    }

    #[test]
    fn same_distribution_rarely_passes_the_warning_and_a_shift_passes_the_drift_line() {
        let mut warned = 0;
        for t in 0..40 {
            let r = cloud(60, 0, 0.8, 100 + t);
            let l = cloud(20, 0, 0.8, 900 + t);
            let m = mmd_test(&r, &l, 100, 0.05, 0.01, t).unwrap();
            assert!(m.warn <= m.drift);
            if m.mmd2 >= m.warn {
                warned += 1;
            }
        }
        // 5% expected; 8 of 40 would be a broken test statistic.
        assert!(
            warned <= 8,
            "{warned} of 40 same-distribution windows warned"
        );
        let r = cloud(60, 0, 0.8, 1);
        let l = cloud(20, 3, 0.8, 2);
        let m = mmd_test(&r, &l, 100, 0.05, 0.01, 7).unwrap();
        assert!(m.mmd2 >= m.drift, "{m:?}");
        assert!(mmd_test(&r, &l[..MIN_SAMPLES - 1], 100, 0.05, 0.01, 7).is_none());
    }
}
