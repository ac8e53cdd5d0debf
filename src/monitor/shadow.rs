//! Comparing a shadow candidate's answer with the primary's: per request,
//! then aggregated per (model, primary version, candidate version).
//!
//! Two kinds of comparison, one per shadow mode:
//! - **generate**: the candidate generated its own answer to the same
//!   request. Exact match (meaningful under greedy decoding), the share of
//!   the longer answer the two have in common from the start, token F1 over
//!   the two bags of tokens, the length ratio, whether they ended for the
//!   same reason, and the TTFT and end-to-end deltas.
//! - **score**: the candidate scored the primary's answer, teacher-forced,
//!   in one prefill. Its mean log-probability per token (the cross
//!   log-likelihood), the gap to the primary's own mean, how often its
//!   top-1 token is the primary's (llama.cpp's "same top" of its KL
//!   report), and the KL divergence from the primary over the primary's
//!   top-k tokens, renormalised over that set.

use std::collections::HashMap;

use serde::Serialize;

use crate::engine::{PositionScore, TokenLogprob};

/// Declares each of the shadow's metrics once: its name constant in
/// [`names`] (with its doc) and, for [`describe`], its kind and HELP line.
/// Every one is described with `Unit::Count`.
macro_rules! shadow_metrics {
    ($($(#[doc = $doc:literal])* $kind:ident $name:ident = $value:literal, $help:expr;)*) => {
        /// Metric names of the shadow.
        pub mod names {
            $($(#[doc = $doc])* pub const $name: &str = $value;)*
        }

        /// HELP lines of the shadow's metrics.
        pub(super) fn describe() {
            $(shadow_metrics!(@describe $kind, names::$name, $help);)*
        }
    };
    (@describe counter, $name:expr, $help:expr) => {
        metrics::describe_counter!($name, metrics::Unit::Count, $help)
    };
    (@describe histogram, $name:expr, $help:expr) => {
        metrics::describe_histogram!($name, metrics::Unit::Count, $help)
    };
    (@describe gauge, $name:expr, $help:expr) => {
        metrics::describe_gauge!($name, metrics::Unit::Count, $help)
    };
}

/// The HELP line of a series labelled by model, primary version and
/// candidate: what it measures, then its labels.
macro_rules! by_primary {
    ($help:literal) => {
        concat!($help, "; by model, primary version and candidate.")
    };
}

shadow_metrics! {
    /// Counter: requests mirrored (a copy was started), by mode.
    counter MIRRORED = "llmops_shadow_mirrored_total",
        by_primary!("Requests copied to a shadow candidate, by mode");
    /// Counter: copies dropped, by reason (concurrency, budget, overloaded,
    /// unavailable, timeout, failed, primary_incomplete).
    counter DROPPED = "llmops_shadow_dropped_total",
        by_primary!("Shadow copies dropped (concurrency, budget, overloaded, unavailable, timeout, aborted, failed, primary_incomplete), by reason");
    /// Counter: copies compared, by mode.
    counter COMPARED = "llmops_shadow_compared_total",
        by_primary!("Shadow copies compared with the primary's answer, by mode");
    /// Counter: generate-mode comparisons of greedy requests.
    counter GREEDY_COMPARED = "llmops_shadow_greedy_compared_total",
        by_primary!("Generate-mode comparisons of greedy requests");
    /// Counter: greedy comparisons whose tokens were identical.
    counter EXACT_MATCHES = "llmops_shadow_exact_matches_total",
        by_primary!("Greedy comparisons whose tokens were identical");
    /// Counter: generate-mode comparisons that ended for the same reason.
    counter FINISH_AGREEMENTS = "llmops_shadow_finish_agreements_total",
        by_primary!("Generate-mode comparisons that ended for the same reason");
    /// Histogram: per request, the agreement between the two answers, by
    /// kind (`prefix`: common-prefix share; `f1`: token F1).
    histogram AGREEMENT = "llmops_shadow_token_agreement",
        by_primary!("Per compared request, token agreement with the primary, by kind (prefix: common-prefix share; f1: token F1)");
    /// Histogram: candidate length over primary length.
    histogram LENGTH_RATIO = "llmops_shadow_length_ratio",
        by_primary!("Per compared request, candidate length over primary length");
    /// Histogram: candidate TTFT minus the primary's.
    histogram TTFT_DELTA = "llmops_shadow_ttft_delta_seconds",
        by_primary!("Per compared request, candidate TTFT minus the primary's (seconds)");
    /// Histogram: candidate end-to-end latency minus the primary's.
    histogram E2E_DELTA = "llmops_shadow_e2e_delta_seconds",
        by_primary!("Per compared request, candidate end-to-end latency minus the primary's (seconds)");
    /// Counter: primary tokens scored by the candidate.
    counter SCORED_TOKENS = "llmops_shadow_scored_tokens_total",
        by_primary!("Primary tokens the candidate scored (score mode)");
    /// Counter: the candidate's negative log-likelihood of the primary's
    /// tokens, summed (divide by scored tokens: the cross NLL per token).
    counter CANDIDATE_NLL = "llmops_shadow_candidate_nll_total",
        by_primary!("The candidate's negative log-likelihood of the primary's tokens, in micro-nats");
    /// Counter: the primary's own negative log-likelihood of its tokens.
    counter PRIMARY_NLL = "llmops_shadow_primary_nll_total",
        by_primary!("The primary's own negative log-likelihood of its tokens, in micro-nats");
    /// Histogram: per request, primary mean log-prob minus the candidate's.
    histogram LOGPROB_GAP = "llmops_shadow_logprob_gap",
        by_primary!("Per scored request, the primary's mean log-prob per token minus the candidate's (nats)");
    /// Histogram: per request, the share of positions whose top-1 agree.
    histogram TOP1_AGREEMENT = "llmops_shadow_top1_agreement",
        by_primary!("Per scored request, the share of positions where the candidate's top-1 token is the primary's");
    /// Histogram: per request, mean KL(primary ‖ candidate) over top-k.
    histogram KL = "llmops_shadow_kl_divergence",
        by_primary!("Per scored request, mean KL(primary || candidate) over the primary's top-k (nats)");
    /// Gauge: copies in flight.
    gauge INFLIGHT = "llmops_shadow_inflight", "Shadow copies in flight, by model.";
}

/// Buckets of shares in [0, 1].
pub const SHARE_BUCKETS: &[f64] = &[
    0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0,
];
/// Buckets of length ratios.
pub const RATIO_BUCKETS: &[f64] = &[0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0];
/// Buckets of latency deltas (seconds, either sign).
pub const DELTA_BUCKETS: &[f64] = &[
    -10.0, -2.5, -1.0, -0.5, -0.25, -0.1, -0.025, 0.0, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Buckets of log-prob gaps and KL divergences (nats per token).
pub const NATS_BUCKETS: &[f64] = &[
    -1.0, -0.1, -0.01, -0.001, 0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
];

/// One side's answer to a request.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Why it ended (the finish reason's label).
    pub finish: &'static str,
    /// Arrival to first token, seconds.
    pub ttft_s: f64,
    /// Arrival to last token, seconds.
    pub e2e_s: f64,
}

/// A generate-mode comparison.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Generated {
    /// Whether the request decoded greedily (exact match means something).
    pub greedy: bool,
    /// Identical token ids.
    pub exact: bool,
    /// Common prefix over the longer answer's length.
    pub prefix_share: f64,
    /// Token F1 over the two bags of tokens.
    pub f1: f64,
    /// Candidate length over primary length.
    pub length_ratio: f64,
    /// Ended for the same reason.
    pub finish_agrees: bool,
    /// Candidate TTFT minus the primary's, seconds.
    pub ttft_delta_s: f64,
    /// Candidate end-to-end minus the primary's, seconds.
    pub e2e_delta_s: f64,
}

/// Compares two answers to the same request.
pub fn compare_generated(primary: &Answer, candidate: &Answer, greedy: bool) -> Generated {
    let (a, b) = (&primary.tokens, &candidate.tokens);
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let longest = a.len().max(b.len());
    Generated {
        greedy,
        exact: a == b,
        prefix_share: if longest == 0 {
            1.0
        } else {
            prefix as f64 / longest as f64
        },
        f1: token_f1(a, b),
        length_ratio: b.len() as f64 / a.len().max(1) as f64,
        finish_agrees: primary.finish == candidate.finish,
        ttft_delta_s: candidate.ttft_s - primary.ttft_s,
        e2e_delta_s: candidate.e2e_s - primary.e2e_s,
    }
}

/// F1 of the two multisets of tokens (SQuAD's token F1 over ids).
pub fn token_f1(a: &[u32], b: &[u32]) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let mut counts: HashMap<u32, i64> = HashMap::new();
    for &t in a {
        *counts.entry(t).or_default() += 1;
    }
    let mut common = 0usize;
    for &t in b {
        if let Some(c) = counts.get_mut(&t)
            && *c > 0
        {
            *c -= 1;
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / b.len() as f64;
    let recall = common as f64 / a.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// A score-mode comparison: sums over the primary's tokens.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Scored {
    /// Tokens scored.
    pub tokens: usize,
    /// Sum of the candidate's log-probabilities of the primary's tokens.
    pub candidate_logprob_sum: f64,
    /// Sum of the primary's own log-probabilities of them.
    pub primary_logprob_sum: f64,
    /// Positions where the candidate's top-1 is the primary's.
    pub top1_agreements: usize,
    /// Sum over positions of KL(primary ‖ candidate) over the primary's top-k.
    pub kl_sum: f64,
}

impl Scored {
    /// The candidate's mean log-probability per token (cross log-likelihood).
    pub fn candidate_mean(&self) -> f64 {
        self.candidate_logprob_sum / self.tokens.max(1) as f64
    }

    /// The primary's own mean log-probability per token.
    pub fn primary_mean(&self) -> f64 {
        self.primary_logprob_sum / self.tokens.max(1) as f64
    }

    /// Primary mean minus candidate mean: how much less likely the
    /// candidate finds the primary's answer, in nats per token.
    pub fn gap(&self) -> f64 {
        self.primary_mean() - self.candidate_mean()
    }

    /// Share of positions whose top-1 agree.
    pub fn top1_share(&self) -> f64 {
        self.top1_agreements as f64 / self.tokens.max(1) as f64
    }

    /// Mean KL per position.
    pub fn kl_mean(&self) -> f64 {
        self.kl_sum / self.tokens.max(1) as f64
    }
}

/// Compares the primary's log-probabilities of its own tokens (with its
/// top-k alternatives) with the candidate's scores of the same tokens,
/// whose probes were the primary's top-k ids at each position.
pub fn compare_scored(primary: &[TokenLogprob], candidate: &[PositionScore]) -> Scored {
    let mut s = Scored::default();
    for (p, c) in primary.iter().zip(candidate) {
        s.tokens += 1;
        s.candidate_logprob_sum += f64::from(c.logprob);
        s.primary_logprob_sum += f64::from(p.logprob);
        let primary_top1 = p.top.first().map_or(p.token, |t| t.0);
        if c.top1 == primary_top1 {
            s.top1_agreements += 1;
        }
        s.kl_sum += kl_over(&p.top, &c.probes);
    }
    s
}

/// KL(P ‖ Q) of two distributions restricted to the same tokens and
/// renormalised there: `p` the primary's (token, log-prob) top-k, `q` the
/// candidate's log-probs of the same tokens in the same order.
fn kl_over(p: &[(u32, f32)], q: &[f32]) -> f64 {
    let n = p.len().min(q.len());
    if n == 0 {
        return 0.0;
    }
    // log Σ e^x over the first n values, without allocating per position.
    let lse = |x: &dyn Fn(usize) -> f64| {
        let m = (0..n).map(x).fold(f64::NEG_INFINITY, f64::max);
        if !m.is_finite() {
            return m;
        }
        m + (0..n).map(|i| (x(i) - m).exp()).sum::<f64>().ln()
    };
    let lp = lse(&|i| f64::from(p[i].1));
    let lq = lse(&|i| f64::from(q[i]));
    let mut kl = 0.0;
    for i in 0..n {
        let log_p = f64::from(p[i].1) - lp;
        let log_q = f64::from(q[i]) - lq;
        if log_p.is_finite() {
            kl += log_p.exp() * (log_p - log_q.max(-1e4));
        }
    }
    kl.max(0.0)
}

/// Running totals for one (primary version, candidate version).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Aggregate {
    /// Copies started.
    pub mirrored: u64,
    /// Copies dropped, by reason.
    pub dropped: std::collections::BTreeMap<String, u64>,
    /// Generate-mode comparisons.
    pub generated: u64,
    /// Of them, greedy.
    pub greedy: u64,
    /// Greedy comparisons with identical tokens.
    pub exact_matches: u64,
    /// Sum of common-prefix shares.
    pub prefix_share_sum: f64,
    /// Sum of token F1s.
    pub f1_sum: f64,
    /// Sum of length ratios.
    pub length_ratio_sum: f64,
    /// Comparisons that ended for the same reason.
    pub finish_agreements: u64,
    /// Sum of TTFT deltas, seconds.
    pub ttft_delta_sum_s: f64,
    /// Sum of end-to-end deltas, seconds.
    pub e2e_delta_sum_s: f64,
    /// Score-mode comparisons.
    pub scored: u64,
    /// Sums over every scored token.
    pub score: Scored,
}

impl Aggregate {
    /// Adds a generate-mode comparison.
    pub fn add_generated(&mut self, g: &Generated) {
        self.generated += 1;
        if g.greedy {
            self.greedy += 1;
            self.exact_matches += u64::from(g.exact);
        }
        self.prefix_share_sum += g.prefix_share;
        self.f1_sum += g.f1;
        self.length_ratio_sum += g.length_ratio;
        self.finish_agreements += u64::from(g.finish_agrees);
        self.ttft_delta_sum_s += g.ttft_delta_s;
        self.e2e_delta_sum_s += g.e2e_delta_s;
    }

    /// Adds a score-mode comparison.
    pub fn add_scored(&mut self, s: &Scored) {
        self.scored += 1;
        self.score.tokens += s.tokens;
        self.score.candidate_logprob_sum += s.candidate_logprob_sum;
        self.score.primary_logprob_sum += s.primary_logprob_sum;
        self.score.top1_agreements += s.top1_agreements;
        self.score.kl_sum += s.kl_sum;
    }

    /// The means an operator reads (`null` where nothing was compared).
    pub fn summary(&self) -> serde_json::Value {
        let per = |sum: f64, n: u64| (n > 0).then(|| sum / n as f64);
        let scored = self.score.tokens > 0;
        serde_json::json!({
            "mirrored": self.mirrored,
            "dropped": self.dropped,
            "compared": self.generated + self.scored,
            "generate": {
                "compared": self.generated,
                "greedy_compared": self.greedy,
                "exact_match_rate": per(self.exact_matches as f64, self.greedy),
                "prefix_agreement": per(self.prefix_share_sum, self.generated),
                "token_f1": per(self.f1_sum, self.generated),
                "length_ratio": per(self.length_ratio_sum, self.generated),
                "finish_agreement": per(self.finish_agreements as f64, self.generated),
                "ttft_delta_seconds": per(self.ttft_delta_sum_s, self.generated),
                "e2e_delta_seconds": per(self.e2e_delta_sum_s, self.generated),
            },
            "score": {
                "compared": self.scored,
                "tokens": self.score.tokens,
                "candidate_mean_logprob": scored.then(|| self.score.candidate_mean()),
                "primary_mean_logprob": scored.then(|| self.score.primary_mean()),
                "logprob_gap": scored.then(|| self.score.gap()),
                "top1_agreement": scored.then(|| self.score.top1_share()),
                "kl_divergence": scored.then(|| self.score.kl_mean()),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lines_name_the_labels_of_the_labelled_series() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            metrics::counter!(names::MIRRORED).increment(1);
            metrics::histogram!(names::KL).record(0.5);
            metrics::gauge!(names::INFLIGHT).set(1.0);
        });
        let text = handle.render();
        for help in [
            "# HELP llmops_shadow_mirrored_total Requests copied to a shadow candidate, by mode; by model, primary version and candidate.",
            "# HELP llmops_shadow_kl_divergence Per scored request, mean KL(primary || candidate) over the primary's top-k (nats); by model, primary version and candidate.",
            "# HELP llmops_shadow_inflight Shadow copies in flight, by model.",
        ] {
            assert!(text.lines().any(|l| l == help), "{help}\n{text}");
        }
    }

    fn answer(tokens: &[u32], finish: &'static str) -> Answer {
        Answer {
            tokens: tokens.to_vec(),
            finish,
            ttft_s: 0.1,
            e2e_s: 1.0,
        }
    }

    /// Name, primary, candidate, exact, prefix share, F1, length ratio.
    type Case = (
        &'static str,
        &'static [u32],
        &'static [u32],
        bool,
        f64,
        f64,
        f64,
    );

    #[test]
    fn generated_answers_compare_by_prefix_bag_and_length() {
        let cases: &[Case] = &[
            (
                "identical",
                &[1, 2, 3, 4],
                &[1, 2, 3, 4],
                true,
                1.0,
                1.0,
                1.0,
            ),
            (
                "diverges at 3",
                &[1, 2, 3, 4],
                &[1, 2, 9, 9],
                false,
                0.5,
                0.5,
                1.0,
            ),
            (
                "shorter",
                &[1, 2, 3, 4],
                &[1, 2],
                false,
                0.5,
                2.0 / 3.0,
                0.5,
            ),
            (
                "same bag, other order",
                &[1, 2, 3],
                &[3, 2, 1],
                false,
                0.0,
                1.0,
                1.0,
            ),
            ("nothing shared", &[1, 2], &[3, 4], false, 0.0, 0.0, 1.0),
        ];
        for &(name, a, b, exact, prefix, f1, ratio) in cases {
            let g = compare_generated(&answer(a, "stop"), &answer(b, "stop"), true);
            assert_eq!(g.exact, exact, "{name}: exact");
            assert!(
                (g.prefix_share - prefix).abs() < 1e-12,
                "{name}: prefix {g:?}"
            );
            assert!((g.f1 - f1).abs() < 1e-12, "{name}: f1 {g:?}");
            assert!(
                (g.length_ratio - ratio).abs() < 1e-12,
                "{name}: ratio {g:?}"
            );
        }
    }

    #[test]
    fn identical_distributions_score_a_zero_gap_full_agreement_and_no_divergence() {
        let top = vec![(5, -0.2), (7, -1.9), (9, -3.0)];
        let primary = vec![
            TokenLogprob {
                token: 5,
                logprob: -0.2,
                top: top.clone(),
            };
            3
        ];
        let same = vec![
            PositionScore {
                logprob: -0.2,
                top1: 5,
                probes: vec![-0.2, -1.9, -3.0],
            };
            3
        ];
        let s = compare_scored(&primary, &same);
        assert_eq!(s.tokens, 3);
        assert!(s.gap().abs() < 1e-12);
        assert_eq!(s.top1_share(), 1.0);
        assert!(s.kl_mean().abs() < 1e-12);

        let other = vec![
            PositionScore {
                logprob: -2.5,
                top1: 7,
                probes: vec![-2.5, -0.1, -3.0],
            };
            3
        ];
        let d = compare_scored(&primary, &other);
        assert!((d.gap() - 2.3).abs() < 1e-6, "{d:?}");
        assert_eq!(d.top1_share(), 0.0);
        assert!(d.kl_mean() > 0.5, "{d:?}");
    }
}
