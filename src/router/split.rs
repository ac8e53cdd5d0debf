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

/// A route key's 64-bit hash under a salt: FNV-1a over the salt's bytes
/// and the key's, then a finaliser so that keys differing in one
/// character spread over the whole range. Never 0 (0 means "no key").
pub fn key_hash(salt: u64, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in salt.to_le_bytes().iter().chain(key.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    h.max(1)
}

/// The bucket of a key hash.
pub fn bucket_of(hash: u64) -> u32 {
    (hash % u64::from(BUCKETS)) as u32
}

/// The bucket of a route key, unsalted.
pub fn bucket(key: &str) -> u32 {
    bucket_of(key_hash(0, key))
}

/// Salt for a rollout's split, from its id: each rollout draws its own
/// canary cohort.
pub fn salt_of(rollout_id: &str) -> u64 {
    key_hash(0, rollout_id)
}

/// Whether a key of hash `hash` goes to a canary holding `weight_bp` basis
/// points.
pub fn to_canary(hash: u64, weight_bp: u32) -> bool {
    bucket_of(hash) < weight_bp.min(BUCKETS)
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
        fn the_same_key_and_weight_always_pick_the_same_variant(key in ".{0,40}", salt in any::<u64>(), w in 0u32..=BUCKETS) {
            prop_assert_eq!(to_canary(key_hash(salt, &key), w), to_canary(key_hash(salt, &key), w));
        }

        #[test]
        fn raising_the_weight_never_moves_a_key_back_to_stable(key in ".{0,40}", salt in any::<u64>(), a in 0u32..=BUCKETS, b in 0u32..=BUCKETS) {
            let (lo, hi) = (a.min(b), a.max(b));
            let h = key_hash(salt, &key);
            prop_assert!(!to_canary(h, lo) || to_canary(h, hi));
        }

        #[test]
        fn the_share_over_two_thousand_keys_is_within_five_points_of_the_weight(
            w in 0u32..=BUCKETS,
            seed in any::<u64>(),
        ) {
            let n = 2000;
            let hits = (0..n)
                .filter(|i| to_canary(key_hash(seed, &format!("key-{i}")), w))
                .count();
            let share = hits as f64 / n as f64;
            let want = f64::from(w) / f64::from(BUCKETS);
            prop_assert!((share - want).abs() <= 0.05, "share {share} for weight {want}");
        }
    }

    #[test]
    fn weight_zero_sends_nothing_and_full_weight_everything() {
        for i in 0..1000 {
            let h = key_hash(7, &format!("user-{i}"));
            assert!(!to_canary(h, 0));
            assert!(to_canary(h, BUCKETS));
        }
    }

    #[test]
    fn the_shadow_sample_is_independent_of_the_canary_split() {
        let n = 4000;
        let both = (0..n)
            .filter(|i| {
                let k = format!("k{i}");
                to_canary(key_hash(0, &k), 5000) && to_shadow(&k, 5000)
            })
            .count();
        let share = both as f64 / n as f64;
        assert!((share - 0.25).abs() < 0.04, "{share}");
    }

    #[test]
    fn each_rollout_draws_its_own_cohort() {
        // At 20%, two rollouts' canaries share about 4% of the keys (20% of
        // 20%), not 20%: the same users are not the canary every time.
        let n = 10_000;
        let (a, b) = (salt_of("rollout-a"), salt_of("rollout-b"));
        let both = (0..n)
            .filter(|i| {
                let k = format!("user-{i}");
                to_canary(key_hash(a, &k), 2000) && to_canary(key_hash(b, &k), 2000)
            })
            .count();
        let share = both as f64 / n as f64;
        assert!((share - 0.04).abs() < 0.015, "{share}");
        assert_ne!(key_hash(a, "x"), 0);
    }
}
