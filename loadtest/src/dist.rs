//! Length distributions (`32`, `uniform:16:256`, `normal:128:32`,
//! `mix:32@3,uniform:512:1024@1`) and Poisson inter-arrival times.

use std::fmt;
use std::str::FromStr;

use rand::{Rng, RngExt};
use serde::{Serialize, Serializer};

/// A distribution of positive integer lengths (tokens).
#[derive(Debug, Clone, PartialEq)]
pub enum Dist {
    /// Always this many.
    Fixed(u32),
    /// Uniform over `lo..=hi`.
    Uniform {
        /// Smallest.
        lo: u32,
        /// Largest.
        hi: u32,
    },
    /// Normal, rounded and clamped to at least 1.
    Normal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        sd: f64,
    },
    /// A weighted mixture: each draw picks a component by weight.
    Mix(Vec<(Dist, f64)>),
}

impl Dist {
    /// Draws one length (at least 1).
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u32 {
        match self {
            Dist::Fixed(n) => (*n).max(1),
            Dist::Uniform { lo, hi } => rng.random_range(*lo..=*hi).max(1),
            Dist::Normal { mean, sd } => {
                let x = mean + sd * standard_normal(rng);
                x.round().clamp(1.0, u32::MAX as f64) as u32
            }
            Dist::Mix(parts) => {
                let total: f64 = parts.iter().map(|(_, w)| w).sum();
                let mut pick = rng.random::<f64>() * total;
                for (d, w) in parts {
                    if pick < *w {
                        return d.sample(rng);
                    }
                    pick -= w;
                }
                // Rounding left `pick` just past the last weight.
                parts.last().map(|(d, _)| d.sample(rng)).unwrap_or(1)
            }
        }
    }

    /// The expected value (before clamping).
    pub fn mean(&self) -> f64 {
        match self {
            Dist::Fixed(n) => *n as f64,
            Dist::Uniform { lo, hi } => (*lo as f64 + *hi as f64) / 2.0,
            Dist::Normal { mean, .. } => *mean,
            Dist::Mix(parts) => {
                let total: f64 = parts.iter().map(|(_, w)| w).sum();
                parts.iter().map(|(d, w)| d.mean() * w / total).sum()
            }
        }
    }
}

/// A standard normal draw (Box–Muller).
fn standard_normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    // 1 - u is in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Seconds to the next arrival of a Poisson process of `rate` per second.
pub fn exp_interval<R: Rng + ?Sized>(rng: &mut R, rate: f64) -> f64 {
    let u = rng.random::<f64>();
    -(1.0 - u).ln() / rate
}

fn num<T: FromStr>(s: &str, what: &str, whole: &str) -> anyhow::Result<T> {
    s.trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("`{whole}`: {what} `{s}` is not a valid number"))
}

impl FromStr for Dist {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("mix:") {
            let mut parts = vec![];
            for part in rest.split(',') {
                let (spec, w) = match part.rsplit_once('@') {
                    Some((spec, w)) => (spec, num::<f64>(w, "weight", s)?),
                    None => (part, 1.0),
                };
                if !(w.is_finite() && w > 0.0) {
                    anyhow::bail!("`{s}`: weights must be positive");
                }
                let d: Dist = spec.parse()?;
                if matches!(d, Dist::Mix(_)) {
                    anyhow::bail!("`{s}`: a mix cannot contain a mix");
                }
                parts.push((d, w));
            }
            return Ok(Dist::Mix(parts));
        }
        let fields: Vec<&str> = s.split(':').collect();
        match fields.as_slice() {
            [n] => {
                let n: u32 = num(n, "length", s)?;
                if n == 0 {
                    anyhow::bail!("`{s}`: lengths must be at least 1");
                }
                Ok(Dist::Fixed(n))
            }
            ["uniform", lo, hi] => {
                let (lo, hi): (u32, u32) = (num(lo, "lower bound", s)?, num(hi, "upper bound", s)?);
                if lo == 0 || lo > hi {
                    anyhow::bail!("`{s}`: need 1 ≤ lo ≤ hi");
                }
                Ok(Dist::Uniform { lo, hi })
            }
            ["normal", mean, sd] => {
                let (mean, sd): (f64, f64) =
                    (num(mean, "mean", s)?, num(sd, "standard deviation", s)?);
                if !(mean.is_finite() && mean >= 1.0 && sd.is_finite() && sd >= 0.0) {
                    anyhow::bail!("`{s}`: need mean ≥ 1 and sd ≥ 0");
                }
                Ok(Dist::Normal { mean, sd })
            }
            _ => anyhow::bail!(
                "`{s}`: expected N, uniform:LO:HI, normal:MEAN:SD or mix:SPEC@WEIGHT,SPEC@WEIGHT,..."
            ),
        }
    }
}

impl fmt::Display for Dist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dist::Fixed(n) => write!(f, "{n}"),
            Dist::Uniform { lo, hi } => write!(f, "uniform:{lo}:{hi}"),
            Dist::Normal { mean, sd } => write!(f, "normal:{mean}:{sd}"),
            Dist::Mix(parts) => {
                write!(f, "mix:")?;
                for (i, (d, w)) in parts.iter().enumerate() {
                    if i > 0 {
                        write!(f, ",")?;
                    }
                    write!(f, "{d}@{w}")?;
                }
                Ok(())
            }
        }
    }
}

impl Serialize for Dist {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn parses_every_form_and_round_trips() {
        assert_eq!("32".parse::<Dist>().unwrap(), Dist::Fixed(32));
        assert_eq!(
            "uniform:16:256".parse::<Dist>().unwrap(),
            Dist::Uniform { lo: 16, hi: 256 }
        );
        assert_eq!(
            "normal:128:32".parse::<Dist>().unwrap(),
            Dist::Normal {
                mean: 128.0,
                sd: 32.0
            }
        );
        let mix: Dist = "mix:32@3,uniform:512:1024@1".parse().unwrap();
        assert_eq!(
            mix,
            Dist::Mix(vec![
                (Dist::Fixed(32), 3.0),
                (Dist::Uniform { lo: 512, hi: 1024 }, 1.0)
            ])
        );
        for s in [
            "32",
            "uniform:16:256",
            "normal:128.5:32",
            "mix:32@3,uniform:512:1024@1",
        ] {
            let d: Dist = s.parse().unwrap();
            assert_eq!(d.to_string().parse::<Dist>().unwrap(), d, "{s}");
        }
        // A weight defaults to 1.
        assert_eq!(
            "mix:8,16".parse::<Dist>().unwrap(),
            Dist::Mix(vec![(Dist::Fixed(8), 1.0), (Dist::Fixed(16), 1.0)])
        );
    }

    #[test]
    fn rejects_bad_specs() {
        for s in [
            "0",
            "-3",
            "abc",
            "uniform:10",
            "uniform:0:5",
            "uniform:9:3",
            "normal:0:1",
            "normal:10:-1",
            "poisson:3",
            "mix:8@0",
            "mix:mix:8",
            "",
        ] {
            assert!(s.parse::<Dist>().is_err(), "{s} should be rejected");
        }
    }

    #[test]
    fn samples_stay_in_range_and_match_the_mean() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let u: Dist = "uniform:16:256".parse().unwrap();
        let xs: Vec<u32> = (0..20_000).map(|_| u.sample(&mut rng)).collect();
        assert!(xs.iter().all(|&x| (16..=256).contains(&x)));
        assert!(
            xs.contains(&16) && xs.contains(&256),
            "both ends are reachable"
        );
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64;
        assert!((mean - 136.0).abs() < 3.0, "{mean}");

        let n: Dist = "normal:100:10".parse().unwrap();
        let xs: Vec<f64> = (0..20_000).map(|_| n.sample(&mut rng) as f64).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64).sqrt();
        assert!((mean - 100.0).abs() < 0.5, "{mean}");
        assert!((sd - 10.0).abs() < 0.5, "{sd}");
        // A wide normal is clamped at 1, never 0.
        let w: Dist = "normal:2:50".parse().unwrap();
        assert!((0..1000).all(|_| w.sample(&mut rng) >= 1));

        let m: Dist = "mix:10@3,1000@1".parse().unwrap();
        let xs: Vec<u32> = (0..20_000).map(|_| m.sample(&mut rng)).collect();
        let short = xs.iter().filter(|&&x| x == 10).count() as f64 / xs.len() as f64;
        assert!(xs.iter().all(|&x| x == 10 || x == 1000));
        assert!((short - 0.75).abs() < 0.02, "{short}");
        assert!((m.mean() - 257.5).abs() < 1e-9);
    }

    #[test]
    fn poisson_inter_arrivals_have_mean_one_over_rate() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for rate in [0.5, 4.0, 250.0] {
            let n = 100_000;
            let xs: Vec<f64> = (0..n).map(|_| exp_interval(&mut rng, rate)).collect();
            assert!(xs.iter().all(|x| x.is_finite() && *x >= 0.0));
            let mean = xs.iter().sum::<f64>() / n as f64;
            assert!((mean * rate - 1.0).abs() < 0.02, "rate {rate}: mean {mean}");
            // Exponential: the standard deviation equals the mean.
            let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
            assert!((sd / mean - 1.0).abs() < 0.03, "rate {rate}: sd {sd}");
        }
    }
}
