//! The statistics drift detection uses, on plain slices: PSI over binned
//! counts, the Jensen–Shannon distance between categorical mixes, the
//! two-sample Kolmogorov–Smirnov statistic, a NannyML-style band over
//! reference chunks, and the per-request feature extractors (hashed token
//! buckets, character classes; the entropy of a logits row is
//! `engine::row_entropy`, beside the sampler). Nothing here allocates
//! except the functions that build a reference's summary.

/// Buckets of the hashed prompt-token histogram.
pub const TOKEN_BUCKETS: usize = 64;

/// Character classes of the prompt-text mix, in index order.
pub const CHAR_CLASSES: [&str; 7] = [
    "latin", "digit", "punct", "space", "cjk", "cyrillic", "other",
];

/// Counts of a text's characters by class ([`CHAR_CLASSES`] order).
pub type TextProfile = [u32; 7];

/// The bucket of a token id: Fibonacci hashing, so neighbouring ids (often
/// related pieces) spread over the buckets.
#[inline]
pub fn token_bucket(id: u32) -> usize {
    ((u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 58) as usize % TOKEN_BUCKETS
}

/// The class of one character ([`CHAR_CLASSES`] index).
#[inline]
pub fn char_class(c: char) -> usize {
    match c {
        'a'..='z' | 'A'..='Z' => 0,
        '0'..='9' => 1,
        c if c.is_ascii_punctuation() => 2,
        c if c.is_whitespace() => 3,
        // CJK ideographs, kana, hangul, CJK punctuation and full-width forms.
        '\u{3000}'..='\u{30FF}'
        | '\u{3400}'..='\u{4DBF}'
        | '\u{4E00}'..='\u{9FFF}'
        | '\u{AC00}'..='\u{D7AF}'
        | '\u{F900}'..='\u{FAFF}'
        | '\u{FF00}'..='\u{FFEF}' => 4,
        '\u{0400}'..='\u{052F}' => 5,
        // Latin letters with diacritics count as latin.
        '\u{00C0}'..='\u{024F}' => 0,
        _ => 6,
    }
}

/// Adds `text`'s characters to `profile` (one pass, no allocation).
pub fn add_text(profile: &mut TextProfile, text: &str) {
    for c in text.chars() {
        let k = char_class(c);
        profile[k] = profile[k].saturating_add(1);
    }
}

/// Additive smoothing of every bin: a bin empty on one side would make
/// PSI infinite; half a count is the Jeffreys prior.
const SMOOTHING: f64 = 0.5;

fn proportions<'a>(counts: &'a [f64]) -> impl Iterator<Item = f64> + 'a {
    let total: f64 = counts.iter().sum::<f64>() + SMOOTHING * counts.len() as f64;
    counts.iter().map(move |c| (c + SMOOTHING) / total)
}

/// Population stability index between two histograms over the same bins:
/// Σ (live − ref) · ln(live / ref) over smoothed proportions. 0.1 is a
/// moderate shift, 0.25 a large one (the usual reading, Evidently's too).
pub fn psi(reference: &[f64], live: &[f64]) -> f64 {
    proportions(reference)
        .zip(proportions(live))
        .map(|(r, l)| (l - r) * (l / r).ln())
        .sum()
}

/// Jensen–Shannon distance (the square root of the divergence, natural
/// log, as `scipy.spatial.distance.jensenshannon` and Evidently compute
/// it): 0 for equal mixes, at most √ln 2 ≈ 0.83. Zero-count bins need no
/// smoothing here.
pub fn js_distance(reference: &[f64], live: &[f64]) -> f64 {
    let (rt, lt) = (reference.iter().sum::<f64>(), live.iter().sum::<f64>());
    if rt <= 0.0 || lt <= 0.0 {
        return 0.0;
    }
    let mut d = 0.0;
    for (&r, &l) in reference.iter().zip(live) {
        let (p, q) = (r / rt, l / lt);
        let m = 0.5 * (p + q);
        if p > 0.0 {
            d += 0.5 * p * (p / m).ln();
        }
        if q > 0.0 {
            d += 0.5 * q * (q / m).ln();
        }
    }
    d.max(0.0).sqrt()
}

/// What PSI and the Jensen–Shannon divergence read between two samples of
/// the *same* distribution, by sampling noise alone: PSI ≈ χ²·(1/n + 1/m)
/// has mean (B − 1)(1/n + 1/m) over B occupied bins, and the JS divergence
/// about an eighth of that. The thresholds (PSI 0.1 / 0.25, JS 0.1) are
/// meant for samples large enough that this floor vanishes (Evidently uses
/// distances only past 1,000 rows); windows of a few hundred requests are
/// not, so the floor is subtracted before judging. It returns the PSI
/// floor; divide by 8 for the JS divergence's.
pub fn noise_floor(reference: &[f64], live: &[f64]) -> f64 {
    let occupied = reference
        .iter()
        .zip(live)
        .filter(|(r, l)| **r > 0.0 || **l > 0.0)
        .count();
    let (n, m) = (reference.iter().sum::<f64>(), live.iter().sum::<f64>());
    if n <= 0.0 || m <= 0.0 {
        return 0.0;
    }
    occupied.saturating_sub(1) as f64 * (1.0 / n + 1.0 / m)
}

/// PSI less its [`noise_floor`], at least 0.
pub fn psi_beyond_noise(reference: &[f64], live: &[f64]) -> f64 {
    (psi(reference, live) - noise_floor(reference, live)).max(0.0)
}

/// The Jensen–Shannon distance with the divergence's noise floor taken off
/// first (see [`noise_floor`]), at least 0.
pub fn js_beyond_noise(reference: &[f64], live: &[f64]) -> f64 {
    let d = js_distance(reference, live).powi(2) - noise_floor(reference, live) / 8.0;
    d.max(0.0).sqrt()
}

/// The two-sample Kolmogorov–Smirnov statistic D of two sorted samples.
pub fn ks_statistic(a: &[f32], b: &[f32]) -> f64 {
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let (n, m) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0usize, 0usize, 0.0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / n - j as f64 / m).abs());
    }
    d
}

/// The critical D of the two-sample KS test at level `alpha` (asymptotic:
/// c(α)·√((n + m) / (n·m)), c(α) = √(−ln(α/2) / 2)): D above it rejects
/// "same distribution" with p < α.
pub fn ks_critical(alpha: f64, n: usize, m: usize) -> f64 {
    let (n, m) = (n.max(1) as f64, m.max(1) as f64);
    (-(alpha.clamp(1e-12, 1.0) / 2.0).ln() / 2.0).sqrt() * ((n + m) / (n * m)).sqrt()
}

/// Quantile bin edges of a sorted sample: `bins − 1` inner edges, ties
/// merged, so a value `x` falls in bin `edges.partition_point(|e| *e <= x)`
/// (a value equal to an edge opens the bin above it).
pub fn quantile_edges(sorted: &[f32], bins: usize) -> Vec<f32> {
    let mut edges = Vec::with_capacity(bins);
    if sorted.is_empty() {
        return edges;
    }
    for k in 1..bins {
        let i = (k * sorted.len() / bins).min(sorted.len() - 1);
        let e = sorted[i];
        if edges.last() != Some(&e) {
            edges.push(e);
        }
    }
    edges
}

/// Counts of `values` in the bins `edges` define (`edges.len() + 1` bins).
pub fn bin_counts(edges: &[f32], values: &[f32], out: &mut Vec<f64>) {
    out.clear();
    out.resize(edges.len() + 1, 0.0);
    for &v in values {
        out[edges.partition_point(|e| *e <= v)] += 1.0;
    }
}

/// A NannyML-style band for a scalar signal: the reference's mean and the
/// spread of its chunk means, in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Band {
    /// Mean over the whole reference.
    pub mean: f64,
    /// Standard deviation of the chunk means.
    pub chunk_sigma: f64,
    /// Values per chunk.
    pub chunk_size: f64,
    /// Values in the reference.
    pub n: f64,
    /// Variance of the values themselves.
    pub value_var: f64,
}

impl Band {
    /// The band of `values` cut into `chunks` consecutive chunks (fewer when
    /// there are fewer than two values a chunk). `None` under 4 values.
    pub fn of(values: &[f32], chunks: usize) -> Option<Band> {
        if values.len() < 4 {
            return None;
        }
        let chunks = chunks.clamp(2, values.len() / 2);
        let size = values.len() / chunks;
        let means: Vec<f64> = values
            .chunks_exact(size)
            .take(chunks)
            .map(|c| c.iter().map(|&v| f64::from(v)).sum::<f64>() / c.len() as f64)
            .collect();
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len() as f64;
        let cm = means.iter().sum::<f64>() / means.len() as f64;
        let var = means.iter().map(|m| (m - cm).powi(2)).sum::<f64>() / (means.len() - 1) as f64;
        let value_var = values
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / (values.len() - 1) as f64;
        Some(Band {
            mean,
            chunk_sigma: var.sqrt(),
            chunk_size: size as f64,
            n: values.len() as f64,
            value_var,
        })
    }

    /// How many standard deviations a live window's mean over `n` values
    /// lies from the reference mean. The chunks' spread is scaled to the
    /// window's size (σ of a mean falls as 1/√n) and the reference mean's
    /// own uncertainty is added, so a short reference does not alarm on its
    /// own noise. `floor` bounds σ below (a constant reference).
    pub fn sigmas(&self, live_mean: f64, n: usize, floor: f64) -> f64 {
        // The chunks' spread, per value; or the values' own spread when
        // that is larger (ten chunk means estimate a σ loosely, and an
        // underestimate would alarm on noise).
        let per_value = (self.chunk_sigma.powi(2) * self.chunk_size).max(self.value_var);
        let var = per_value / n.max(1) as f64 + per_value / self.n.max(1.0);
        let sigma = var.sqrt().max(floor);
        (live_mean - self.mean).abs() / sigma
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_is_zero_for_equal_histograms_and_grows_with_the_shift() {
        let a = [100.0, 200.0, 300.0, 400.0];
        assert!(psi(&a, &a).abs() < 1e-12);
        let small = psi(&a, &[110.0, 200.0, 290.0, 400.0]);
        let large = psi(&a, &[400.0, 300.0, 200.0, 100.0]);
        assert!(small > 0.0 && small < 0.01, "{small}");
        assert!(large > 0.25, "{large}");
    }

    #[test]
    fn the_noise_floor_is_what_equal_distributions_read_by_chance() {
        // Two samples of 200 and 500 from the same 10 equiprobable bins:
        // the mean PSI over many draws is near the floor 9·(1/200 + 1/500).
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut draw = |n: usize| {
            let mut c = vec![0.0; 10];
            for _ in 0..n {
                c[rng.random_range(0..10)] += 1.0;
            }
            c
        };
        let (mut raw, mut beyond) = (0.0, 0.0);
        for _ in 0..400 {
            let (a, b) = (draw(500), draw(200));
            raw += psi(&a, &b) / 400.0;
            beyond += psi_beyond_noise(&a, &b) / 400.0;
        }
        let floor = 9.0 * (1.0 / 200.0 + 1.0 / 500.0);
        assert!((raw - floor).abs() < 0.2 * floor, "{raw} {floor}");
        assert!(beyond < 0.3 * raw, "{beyond}");
        // A real shift stays: the floor is small against it.
        let a = [500.0, 0.0, 500.0];
        let b = [0.0, 200.0, 200.0];
        assert!(psi_beyond_noise(&a, &b) > 1.0);
        assert!(js_beyond_noise(&a, &b) > 0.5);
    }

    #[test]
    fn js_distance_matches_its_closed_form() {
        // Disjoint supports: the divergence is ln 2.
        let d = js_distance(&[1.0, 0.0], &[0.0, 1.0]);
        assert!((d - 2f64.ln().sqrt()).abs() < 1e-12, "{d}");
        assert_eq!(js_distance(&[3.0, 1.0], &[6.0, 2.0]), 0.0);
        // p = (0.5, 0.5), q = (0.9, 0.1), m = (0.7, 0.3).
        let want = (0.5 * (0.5 * (0.5f64 / 0.7).ln() + 0.5 * (0.5f64 / 0.3).ln())
            + 0.5 * (0.9 * (0.9f64 / 0.7).ln() + 0.1 * (0.1f64 / 0.3).ln()))
        .sqrt();
        let got = js_distance(&[1.0, 1.0], &[9.0, 1.0]);
        assert!((got - want).abs() < 1e-12, "{got} {want}");
    }

    #[test]
    fn ks_statistic_is_the_largest_gap_between_the_empirical_cdfs() {
        assert_eq!(ks_statistic(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]), 0.0);
        assert_eq!(ks_statistic(&[1.0, 2.0], &[3.0, 4.0]), 1.0);
        // a = {1,2,3,4}, b = {3,4,5,6}: at x = 2, F_a = 0.5, F_b = 0.
        assert!((ks_statistic(&[1.0, 2.0, 3.0, 4.0], &[3.0, 4.0, 5.0, 6.0]) - 0.5).abs() < 1e-12);
        // c(0.05) = 1.358.
        assert!((ks_critical(0.05, 100, 100) - 1.358 * 0.02f64.sqrt()).abs() < 1e-3);
    }

    #[test]
    fn quantile_edges_merge_ties_and_bin_every_value() {
        let v: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let e = quantile_edges(&v, 10);
        assert_eq!(e.len(), 9);
        let mut c = vec![];
        bin_counts(&e, &v, &mut c);
        assert_eq!(c, vec![10.0; 10]);
        assert_eq!(quantile_edges(&[5.0; 50], 10), vec![5.0]);
    }

    #[test]
    fn band_counts_sigmas_of_a_window_mean() {
        let v: Vec<f32> = (0..1000).map(|i| (i % 2) as f32).collect();
        let b = Band::of(&v, 10).unwrap();
        assert!((b.mean - 0.5).abs() < 1e-12);
        // Alternating values: every chunk mean is exactly 0.5, so the
        // values' own spread (σ 0.5) decides: a window of 100 has σ 0.05.
        assert_eq!(b.chunk_sigma, 0.0);
        assert_eq!(b.sigmas(0.5, 100, 1e-3), 0.0);
        let s = b.sigmas(0.6, 100, 1e-3);
        let want = 0.1 / (0.25f64 * 1000.0 / 999.0 * (1.0 / 100.0 + 1.0 / 1000.0)).sqrt();
        assert!((s - want).abs() < 1e-9, "{s} {want}");
        // Chunks that wander more than the values explain widen the band.
        let drifting: Vec<f32> = (0..1000)
            .map(|i| (i % 2) as f32 + (i / 100) as f32)
            .collect();
        let d = Band::of(&drifting, 10).unwrap();
        assert!(d.chunk_sigma.powi(2) * d.chunk_size > d.value_var);
    }

    #[test]
    fn characters_fall_in_their_script() {
        let mut p = TextProfile::default();
        add_text(&mut p, "Hé 42, Привет 你好!");
        assert_eq!(p, [2, 2, 2, 3, 2, 6, 0]);
        assert!((0..10_000).all(|i| token_bucket(i) < TOKEN_BUCKETS));
    }
}
