//! Scalar helpers the CPU kernels share, written so that loops over slices
//! vectorize.

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
/// not). Inputs are clamped to [−87, 88] (below −87 gives about 1.6e−38);
/// NaN gives NaN.
#[inline]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // `max`/`min` return the other operand for NaN (unlike `clamp`, which
    // passes NaN through), so `xc` is always a number in [−87, 88].
    #[allow(clippy::manual_clamp)] // `clamp` would keep NaN, which the cast below must not see
    let xc = x.max(-87.0).min(88.0);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    // Taylor coefficients of eʳ on |r| ≤ ln2/2.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // SAFETY: `xc` is a number in [−87, 88], so `n` is a finite integer in
    // [−126, 127], which `i32` represents.
    let n_i = unsafe { n.to_int_unchecked::<i32>() };
    let bits = ((n_i + 127) as u32) << 23;
    let y = p * f32::from_bits(bits);
    // A select, not a branch: loops over slices still vectorize.
    if x.is_nan() { x } else { y }
}

/// `acc += a · x`.
#[inline]
pub fn axpy(acc: &mut [f32], a: f32, x: &[f32]) {
    for (o, v) in acc.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// Softmax of `xs` in place.
pub fn softmax_in_place(xs: &mut [f32]) {
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
    fn fast_exp_of_nan_is_nan_and_of_infinities_is_bounded() {
        assert!(exp_fast(f32::NAN).is_nan());
        assert!(exp_fast(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_fast(f32::INFINITY).is_finite());
        assert!(exp_fast(-1e30) < 1e-37);
    }
}
