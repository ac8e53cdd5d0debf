//! The sticky weighted split: which variant a route key sees, as a pure
//! function of the key and the canary's weight.
//!
//! A key hashes to one of [`BUCKETS`] buckets; the canary takes the buckets
//! below its weight. So the same key and weight always give the same answer
//! (a user sees one version within a step), and raising the weight only
//! moves keys from stable to canary, never back: a user who saw the canary
//! at 5% still sees it at 25%.

/// Resolution of weights: basis points (1 = 0.01%).
pub const BUCKETS: u32 = 10_000;

/// The bucket of a route key: FNV-1a over the bytes, then a finaliser so
/// that keys differing in one character spread over the whole range.
pub fn bucket(key: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h % u64::from(BUCKETS)) as u32
}

/// Whether `key` goes to a canary holding `weight_bp` basis points.
pub fn to_canary(key: &str, weight_bp: u32) -> bool {
    bucket(key) < weight_bp.min(BUCKETS)
}

/// Whether `key` is mirrored to a shadow sampling `rate_bp` basis points.
/// Salted apart from [`to_canary`], so the canary's users are not also the
/// shadow's sample.
pub fn to_shadow(key: &str, rate_bp: u32) -> bool {
    let mut salted = String::with_capacity(key.len() + 7);
    salted.push_str("shadow:");
    salted.push_str(key);
    bucket(&salted) < rate_bp.min(BUCKETS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn the_same_key_and_weight_always_pick_the_same_variant(key in ".{0,40}", w in 0u32..=BUCKETS) {
            prop_assert_eq!(to_canary(&key, w), to_canary(&key, w));
        }

        #[test]
        fn raising_the_weight_never_moves_a_key_back_to_stable(key in ".{0,40}", a in 0u32..=BUCKETS, b in 0u32..=BUCKETS) {
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert!(!to_canary(&key, lo) || to_canary(&key, hi));
        }

        #[test]
        fn the_share_over_two_thousand_keys_is_within_five_points_of_the_weight(
            w in 0u32..=BUCKETS,
            seed in any::<u64>(),
        ) {
            let n = 2000;
            let hits = (0..n).filter(|i| to_canary(&format!("key-{seed}-{i}"), w)).count();
            let share = hits as f64 / n as f64;
            let want = f64::from(w) / f64::from(BUCKETS);
            prop_assert!((share - want).abs() <= 0.05, "share {share} for weight {want}");
        }
    }

    #[test]
    fn weight_zero_sends_nothing_and_full_weight_everything() {
        for i in 0..1000 {
            let k = format!("user-{i}");
            assert!(!to_canary(&k, 0));
            assert!(to_canary(&k, BUCKETS));
        }
    }

    #[test]
    fn the_shadow_sample_is_independent_of_the_canary_split() {
        let n = 4000;
        let both = (0..n)
            .filter(|i| {
                let k = format!("k{i}");
                to_canary(&k, 5000) && to_shadow(&k, 5000)
            })
            .count();
        let share = both as f64 / n as f64;
        assert!((share - 0.25).abs() < 0.04, "{share}");
    }
}
