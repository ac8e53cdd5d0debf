//! Canary analysis: the verdict on one window of a canary rollout.
//!
//! Every interval the rollout controller takes the finished requests of the
//! stable version and of the canary over the same window and asks
//! [`analyse`] for a [`Report`]. Everything here is pure functions over plain
//! data (no I/O, no clock), so a verdict can be replayed from the recorded
//! samples and the rules are unit-testable.
//!
//! The verdicts follow Argo Rollouts' AnalysisRun (Successful, Failed,
//! Inconclusive, Error), including the lesson of argo-rollouts#3850: missing
//! data is never a pass. Besides the threshold [`Gate`]s, the latency check
//! follows Netflix/Google's Kayenta: a one-sided Mann–Whitney U test on the
//! per-request latencies, so a canary that is slower across the board fails
//! even while its p99 stays inside the gate.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Fewest ok samples per side for which the Mann–Whitney test runs: below
/// this the normal approximation of U is too coarse to trust.
pub const MANN_WHITNEY_MIN_VALUES: usize = 8;

/// How a request the router sent to a side ended, beyond ok or failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The engine ran it to its end: `ok`, or failed (engine error,
    /// aborted, timed out).
    #[default]
    Served,
    /// Refused when submitted: the side's queue was full (429) or its
    /// engine unavailable (503). A candidate too slow for its share sheds
    /// load here.
    Refused,
    /// Its client left (disconnected, cancelled, or stopped reading)
    /// before the end: impatient clients of a slow side.
    ClientCancelled,
}

impl Outcome {
    /// The snake_case name, as in JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Served => "served",
            Outcome::Refused => "refused",
            Outcome::ClientCancelled => "client_cancelled",
        }
    }
}

/// One request as the analysis sees it: finished, refused or abandoned.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// `false`: the request did not end well (failed, refused, or
    /// abandoned by its client; `outcome` says which).
    pub ok: bool,
    /// Time to first token, seconds (NaN if no token; `null` in JSON).
    #[serde(with = "nan_as_null")]
    pub ttft_s: f64,
    /// Mean inter-token latency of the request, seconds (NaN if < 2 tokens).
    #[serde(with = "nan_as_null")]
    pub itl_s: f64,
    /// Arrival to last token, seconds (NaN for a refused request).
    #[serde(with = "nan_as_null")]
    pub e2e_s: f64,
    /// Tokens generated.
    pub output_tokens: u32,
    /// The finish reason was "stop" (rather than length or timeout).
    pub stopped: bool,
    /// How it ended (samples from before outcomes were recorded: served).
    #[serde(default)]
    pub outcome: Outcome,
    /// A hash of the key the split decided on (0: unknown), so a window can
    /// tell how many distinct clients each side saw.
    #[serde(default)]
    pub key: u64,
}

/// A float that may be NaN, as JSON: NaN is `null` (JSON has no NaN, and
/// serde_json writes `null` for it but cannot read it back as an `f64`: one
/// 1-token sample made a replica's whole publication unreadable).
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_nan() {
            s.serialize_none()
        } else {
            s.serialize_f64(*v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

impl Sample {
    /// A request refused at submit.
    pub fn refused(key: u64) -> Self {
        Self {
            ok: false,
            ttft_s: f64::NAN,
            itl_s: f64::NAN,
            e2e_s: f64::NAN,
            output_tokens: 0,
            stopped: false,
            outcome: Outcome::Refused,
            key,
        }
    }

    /// A request whose client left after `e2e_s` seconds and `tokens`
    /// tokens.
    pub fn cancelled(key: u64, e2e_s: f64, tokens: u32) -> Self {
        Self {
            ok: false,
            ttft_s: f64::NAN,
            itl_s: f64::NAN,
            e2e_s,
            output_tokens: tokens,
            stopped: false,
            outcome: Outcome::ClientCancelled,
            key,
        }
    }
}

/// What a gate measures on one side's samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Served but failed / all samples.
    ErrorRate,
    /// Refused at submit / all samples.
    RefusedRate,
    /// Abandoned by their clients / all samples.
    CancelledRate,
    /// 99th percentile (nearest rank) of time to first token over ok samples, seconds.
    TtftP99,
    /// 99th percentile (nearest rank) of mean inter-token latency over ok samples, seconds.
    ItlP99,
    /// 99th percentile (nearest rank) of end-to-end latency over ok samples, seconds.
    E2eP99,
    /// sum(output_tokens) / sum(e2e_s) over ok samples: decode throughput as clients see it.
    TokensPerSecond,
    /// Mean output_tokens over ok samples.
    OutputLength,
    /// Share of ok samples that finished with "stop" (the finish-reason mix).
    StopShare,
}

impl Metric {
    /// Every metric, in declaration order.
    pub const ALL: [Metric; 9] = [
        Metric::ErrorRate,
        Metric::RefusedRate,
        Metric::CancelledRate,
        Metric::TtftP99,
        Metric::ItlP99,
        Metric::E2eP99,
        Metric::TokensPerSecond,
        Metric::OutputLength,
        Metric::StopShare,
    ];

    /// The snake_case name, as in gates, JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::ErrorRate => "error_rate",
            Metric::RefusedRate => "refused_rate",
            Metric::CancelledRate => "cancelled_rate",
            Metric::TtftP99 => "ttft_p99",
            Metric::ItlP99 => "itl_p99",
            Metric::E2eP99 => "e2e_p99",
            Metric::TokensPerSecond => "tokens_per_second",
            Metric::OutputLength => "output_length",
            Metric::StopShare => "stop_share",
        }
    }

    /// The metric's value over `samples`; `None` when no sample it needs.
    pub fn of(self, samples: &[Sample]) -> Option<f64> {
        let ok = || samples.iter().filter(|s| s.ok);
        let ok_count = ok().count();
        match self {
            Metric::ErrorRate => share(samples, |s| s.outcome == Outcome::Served && !s.ok),
            Metric::RefusedRate => share(samples, |s| s.outcome == Outcome::Refused),
            Metric::CancelledRate => share(samples, |s| s.outcome == Outcome::ClientCancelled),
            Metric::TtftP99 => p99(ok().map(|s| s.ttft_s)),
            Metric::ItlP99 => p99(ok().map(|s| s.itl_s)),
            Metric::E2eP99 => p99(ok().map(|s| s.e2e_s)),
            Metric::TokensPerSecond => {
                // Tokens and seconds are summed over the same requests, so a
                // request without a valid duration drops out of both.
                let (tokens, seconds) = ok()
                    .filter(|s| !s.e2e_s.is_nan())
                    .fold((0u64, 0.0f64), |(t, e), s| {
                        (t + u64::from(s.output_tokens), e + s.e2e_s)
                    });
                if seconds > 0.0 {
                    Some(tokens as f64 / seconds)
                } else {
                    None
                }
            }
            Metric::OutputLength => {
                if ok_count == 0 {
                    return None;
                }
                let tokens: u64 = ok().map(|s| u64::from(s.output_tokens)).sum();
                Some(tokens as f64 / ok_count as f64)
            }
            Metric::StopShare => {
                if ok_count == 0 {
                    return None;
                }
                let stopped = ok().filter(|s| s.stopped).count();
                Some(stopped as f64 / ok_count as f64)
            }
        }
    }

    /// Whether a larger value is a regression. Used to word notes and to pick
    /// the usual operator; a gate's own operator is what decides.
    pub fn higher_is_worse(self) -> bool {
        match self {
            Metric::ErrorRate
            | Metric::RefusedRate
            | Metric::CancelledRate
            | Metric::TtftP99
            | Metric::ItlP99
            | Metric::E2eP99 => true,
            // The typical output-length regression is a model that rambles or
            // loops until max_tokens: longer costs more and reads worse.
            Metric::OutputLength => true,
            // Fewer "stop" finishes means more truncated answers.
            Metric::TokensPerSecond | Metric::StopShare => false,
        }
    }

    fn is_latency(self) -> bool {
        matches!(self, Metric::TtftP99 | Metric::ItlP99 | Metric::E2eP99)
    }

    fn is_fraction(self) -> bool {
        matches!(
            self,
            Metric::ErrorRate | Metric::RefusedRate | Metric::CancelledRate | Metric::StopShare
        )
    }

    /// Why `of` can return `None`, for notes.
    fn needs(self) -> &'static str {
        match self {
            Metric::ErrorRate | Metric::RefusedRate | Metric::CancelledRate => {
                "it needs at least one sample"
            }
            Metric::TtftP99 => "it needs an ok sample with a first token",
            Metric::ItlP99 => "it needs an ok sample with at least 2 tokens",
            Metric::E2eP99 | Metric::OutputLength | Metric::StopShare => {
                "it needs at least one ok sample"
            }
            Metric::TokensPerSecond => "it needs ok samples with an e2e time above 0",
        }
    }

    /// A value in the metric's unit, for notes and reasons.
    fn format_value(self, v: f64) -> String {
        match self {
            Metric::TtftP99 | Metric::ItlP99 | Metric::E2eP99 => {
                // Inter-token latencies are a few ms: "0.004 s" would hide them.
                if v == 0.0 || v.abs() >= 0.01 {
                    format!("{v:.3} s")
                } else {
                    format!("{:.3} ms", v * 1e3)
                }
            }
            Metric::ErrorRate | Metric::RefusedRate | Metric::CancelledRate | Metric::StopShare => {
                format!("{:.2}%", v * 100.0)
            }
            Metric::TokensPerSecond => format!("{v:.1} tok/s"),
            Metric::OutputLength => format!("{v:.1} tokens"),
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Metric {
    type Err = ParseGateError;

    /// Accepts the snake_case names in any case, with `-` for `_` too,
    /// because operators type them on a command line.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase().replace('-', "_");
        Metric::ALL
            .into_iter()
            .find(|m| m.as_str() == wanted)
            .ok_or_else(|| ParseGateError::UnknownMetric(s.trim().to_owned()))
    }
}

/// The share of `samples` for which `f` holds; `None` without samples.
fn share(samples: &[Sample], f: impl Fn(&Sample) -> bool) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    Some(samples.iter().filter(|s| f(s)).count() as f64 / samples.len() as f64)
}

fn p99(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.collect();
    percentile(&mut values, 99.0)
}

/// Nearest-rank percentile, `p` in 0–100: the smallest value with at least
/// p% of the values at or below it (p = 0 gives the minimum). NaNs are
/// ignored; `None` when no value is left or `p` is outside 0–100. Sorts
/// `values` in place (NaNs last) so callers need no extra allocation.
pub fn percentile(values: &mut [f64], p: f64) -> Option<f64> {
    if !(0.0..=100.0).contains(&p) {
        return None;
    }
    values.sort_unstable_by(|a, b| a.is_nan().cmp(&b.is_nan()).then(a.total_cmp(b)));
    let n = values.iter().take_while(|v| !v.is_nan()).count();
    if n == 0 {
        return None;
    }
    // p × n first, so integer percentiles of moderate n are exact before ceil.
    let rank = (p * n as f64 / 100.0).ceil() as usize;
    values.get(rank.clamp(1, n) - 1).copied()
}

/// How the canary's value is compared with the limit: `canary op limit` passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl Op {
    /// The operator as typed in a gate: `<`, `<=`, `>`, `>=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }

    /// Whether `lhs op rhs` holds (false when either is NaN).
    pub fn holds(self, lhs: f64, rhs: f64) -> bool {
        match self {
            Op::Lt => lhs < rhs,
            Op::Le => lhs <= rhs,
            Op::Gt => lhs > rhs,
            Op::Ge => lhs >= rhs,
        }
    }

    /// The relation that holds when `holds` is false, so a failing note reads
    /// "canary 0.8 s > limit 0.6 s" rather than "not <=".
    fn negated_str(self) -> &'static str {
        match self {
            Op::Lt => ">=",
            Op::Le => ">",
            Op::Gt => "<=",
            Op::Ge => "<",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Op {
    type Err = ParseGateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "<" => Ok(Op::Lt),
            "<=" | "≤" => Ok(Op::Le),
            ">" => Ok(Op::Gt),
            ">=" | "≥" => Ok(Op::Ge),
            other => Err(ParseGateError::UnknownOp(other.to_owned())),
        }
    }
}

/// What the canary's value is compared with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Threshold {
    /// Canary value compared with a fixed number (e.g. ttft_p99 < 0.5).
    Absolute {
        /// The limit, in the metric's unit (seconds for latencies, a fraction for rates).
        value: f64,
    },
    /// Canary value compared with factor × stable's value over the same
    /// window (canary.ttft_p99 <= 1.2 × stable.ttft_p99).
    Relative {
        /// The multiple of stable's value; finite and above 0.
        factor: f64,
        /// An absolute value the canary may reach whatever stable did
        /// (`ttft_p99 <= 1.5x or <= 50ms`): on a noisy machine a few
        /// milliseconds are not a regression however large their ratio.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        floor: Option<f64>,
    },
}

/// Why a metric, operator or gate string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseGateError {
    /// The metric name is not one of [`Metric::ALL`].
    #[error(
        "unknown metric `{0}`: expected one of error_rate, refused_rate, cancelled_rate, \
         ttft_p99, itl_p99, e2e_p99, tokens_per_second, output_length, stop_share"
    )]
    UnknownMetric(String),
    /// The operator is not one of `<`, `<=`, `>`, `>=`.
    #[error("unknown operator `{0}`: expected one of <, <=, >, >=")]
    UnknownOp(String),
    /// The string does not have the shape `<metric> <op> <threshold>`.
    #[error(
        "`{0}` is not a gate: expected `<metric> <op> <threshold>`, \
         e.g. `error_rate <= 0.01`, `ttft_p99 < 500ms` or `e2e_p99 <= 1.2x`"
    )]
    Malformed(String),
    /// The threshold is not a usable number for this metric.
    #[error("bad threshold `{text}` for {metric}: {why}")]
    BadThreshold {
        /// The gate's metric.
        metric: Metric,
        /// The threshold as typed.
        text: String,
        /// What is wrong with it.
        why: String,
    },
}

/// One check on the canary: `canary.metric op threshold`.
///
/// Written and stored as a string (`"e2e_p99 <= 1.5x"`, `"ttft_p99 < 500ms"`,
/// `"error_rate <= 0.01"`) because operators type gates on a command line
/// and the durable record and the API carry them as text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Gate {
    /// What is measured.
    pub metric: Metric,
    /// How the canary's value must relate to the limit to pass.
    pub op: Op,
    /// The limit, fixed or relative to stable.
    pub threshold: Threshold,
}

const OP_CHARS: [char; 6] = ['<', '>', '=', '!', '≤', '≥'];

impl FromStr for Gate {
    type Err = ParseGateError;

    /// `<metric> <op> <threshold>`, spaces optional. Threshold forms: a
    /// number in the metric's unit; `500ms` / `0.5s` for latencies; `5%` for
    /// error_rate and stop_share; `1.5x` for a multiple of stable's value.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let malformed = || ParseGateError::Malformed(text.to_owned());
        let at = text.find(OP_CHARS).ok_or_else(malformed)?;
        let (name, rest) = text.split_at(at);
        if name.trim().is_empty() {
            return Err(malformed());
        }
        let metric: Metric = name.parse()?;
        let op_len = rest
            .find(|c: char| !OP_CHARS.contains(&c))
            .unwrap_or(rest.len());
        let (op, threshold) = rest.split_at(op_len);
        let op: Op = op.parse()?;
        let (threshold, floor) = match split_or(threshold) {
            Some((relative, floor)) => (relative, Some(floor)),
            None => (threshold, None),
        };
        let mut threshold = parse_threshold(metric, threshold.trim())?;
        if let Some(floor) = floor {
            // `<relative> or <op> <absolute>`: the same operator, an
            // absolute value the canary may reach whatever stable did.
            let floor = floor.trim();
            let at = floor
                .find(|c: char| !OP_CHARS.contains(&c))
                .unwrap_or(floor.len());
            let (op2, value) = floor.split_at(at);
            let bad = |why: &str| ParseGateError::BadThreshold {
                metric,
                text: floor.to_owned(),
                why: why.to_owned(),
            };
            if op2.trim().parse::<Op>().ok() != Some(op) {
                return Err(bad("the floor after `or` takes the gate's own operator"));
            }
            let Threshold::Absolute { value } = parse_threshold(metric, value.trim())? else {
                return Err(bad("the floor after `or` is an absolute value, e.g. 50ms"));
            };
            match &mut threshold {
                Threshold::Relative { floor, .. } => *floor = Some(value),
                Threshold::Absolute { .. } => {
                    return Err(bad("only a relative limit (e.g. 1.5x) takes a floor"));
                }
            }
        }
        Ok(Gate {
            metric,
            op,
            threshold,
        })
    }
}

/// `"1.5x or <= 50ms"` → `("1.5x", "<= 50ms")`.
fn split_or(text: &str) -> Option<(&str, &str)> {
    let lower = text.to_ascii_lowercase();
    let at = lower.find(" or ")?;
    Some((&text[..at], &text[at + 4..]))
}

fn parse_threshold(metric: Metric, text: &str) -> Result<Threshold, ParseGateError> {
    let bad = |why: &str| ParseGateError::BadThreshold {
        metric,
        text: text.to_owned(),
        why: why.to_owned(),
    };
    let number = |num: &str| {
        num.trim()
            .parse::<f64>()
            .map_err(|_| bad("not a number: expected e.g. 0.05, 500ms, 5% or 1.5x"))
    };
    if text.is_empty() {
        return Err(bad("missing: expected e.g. 0.05, 500ms, 5% or 1.5x"));
    }
    if let Some(num) = text.strip_suffix(['x', 'X', '×']) {
        let factor = number(num)?;
        if !(factor.is_finite() && factor > 0.0) {
            return Err(bad("a relative factor must be a finite number above 0"));
        }
        return Ok(Threshold::Relative {
            factor,
            floor: None,
        });
    }
    // Divide rather than multiply by 1e-3 / 1e-2: division is correctly
    // rounded, so "300ms" gives exactly the f64 nearest 0.3 and Display
    // round-trips it as "0.3s".
    let (num, divisor) = if let Some(num) = text.strip_suffix("ms") {
        (num, 1000.0)
    } else if let Some(num) = text.strip_suffix('s') {
        (num, 1.0)
    } else if let Some(num) = text.strip_suffix('%') {
        (num, 100.0)
    } else {
        (text, 0.0)
    };
    // The number first, so that "yes" reads as "not a number" rather than
    // as a misplaced duration.
    let raw = number(num)?;
    if text.ends_with('s') && !metric.is_latency() {
        return Err(bad(
            "a duration fits only latency metrics (ttft_p99, itl_p99, e2e_p99)",
        ));
    }
    if text.ends_with('%') && !metric.is_fraction() {
        return Err(bad("a percentage fits only error_rate and stop_share"));
    }
    let value = if divisor == 0.0 { raw } else { raw / divisor };
    if !(value.is_finite() && value >= 0.0) {
        return Err(bad("must be a finite number, 0 or above"));
    }
    if metric.is_fraction() && value > 1.0 {
        return Err(bad(
            "this metric is a fraction from 0 to 1: write e.g. 0.05 or 5%",
        ));
    }
    Ok(Threshold::Absolute { value })
}

impl fmt::Display for Gate {
    /// The canonical string, which parses back to an equal gate: latencies
    /// in seconds with an `s`, fractions as plain numbers, factors with `x`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (metric, op) = (self.metric, self.op);
        match self.threshold {
            Threshold::Absolute { value } if metric.is_latency() => {
                write!(f, "{metric} {op} {value}s")
            }
            Threshold::Absolute { value } => write!(f, "{metric} {op} {value}"),
            Threshold::Relative {
                factor,
                floor: None,
            } => write!(f, "{metric} {op} {factor}x"),
            Threshold::Relative {
                factor,
                floor: Some(v),
            } if metric.is_latency() => write!(f, "{metric} {op} {factor}x or {op} {v}s"),
            Threshold::Relative {
                factor,
                floor: Some(v),
            } => write!(f, "{metric} {op} {factor}x or {op} {v}"),
        }
    }
}

impl TryFrom<String> for Gate {
    type Error = ParseGateError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Gate> for String {
    fn from(gate: Gate) -> Self {
        gate.to_string()
    }
}

/// Default for [`Analysis::min_samples`].
pub const DEFAULT_MIN_SAMPLES: usize = 20;
/// Default for [`Analysis::mann_whitney_alpha`].
pub const DEFAULT_MANN_WHITNEY_ALPHA: f64 = 0.01;
/// Default for [`Analysis::mann_whitney_min_effect`].
pub const DEFAULT_MANN_WHITNEY_MIN_EFFECT: f64 = 0.2;
/// Default for [`Analysis::mann_whitney_min_delta_s`].
pub const DEFAULT_MANN_WHITNEY_MIN_DELTA_S: f64 = 0.02;
/// Default for [`Analysis::min_keys`].
pub const DEFAULT_MIN_KEYS: usize = 10;
/// Default for [`Analysis::failure_min_delta`].
pub const DEFAULT_FAILURE_MIN_DELTA: f64 = 0.01;

/// The analysis settings of a rollout.
///
/// Missing JSON fields take their defaults; unknown fields are refused so a
/// misspelt setting is an error rather than silently the default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Analysis {
    /// Every gate must pass.
    pub gates: Vec<Gate>,
    /// Fewer ok+failed samples than this on either side: Inconclusive (never a pass).
    pub min_samples: usize,
    /// Also run a one-sided Mann–Whitney U test on e2e latency (and TTFT):
    /// canary stochastically slower than stable at this significance fails
    /// the window. None disables (`null` in JSON; `false` in JSON or TOML,
    /// which has no null). Default Some(0.01).
    #[serde(deserialize_with = "alpha_or_off")]
    pub mann_whitney_alpha: Option<f64>,
    /// How much slower (canary median / stable median − 1) a significant
    /// difference must also be to fail the window: with thousands of
    /// samples a window, the rank test finds differences of a few percent
    /// that no user notices (two engines batching differently on shared
    /// cores), so significance alone is not an effect (as Kayenta pairs its
    /// test with an effect size). Default 0.2.
    pub mann_whitney_min_effect: f64,
    /// How many seconds apart the two medians must also be to fail the
    /// window: on a shared machine a 5 ms time to first token that becomes
    /// 7 ms is 40% slower and noticed by nobody. Default 0.02.
    pub mann_whitney_min_delta_s: f64,
    /// Fewest distinct split keys (sessions, users, or requests when the
    /// split is per request) either side must have seen: a window decided
    /// by a handful of clients is inconclusive, never a pass. Default 10.
    pub min_keys: usize,
    /// With the rank tests on (at their alpha), a one-sided Fisher exact
    /// test also asks whether the canary's requests end unsuccessfully
    /// (failed, refused or abandoned) more often than stable's: a window
    /// fails when they do significantly and by more than this share of the
    /// requests (absolute gates alone miss a canary failing 2% against
    /// 0%). Default 0.01.
    pub failure_min_delta: f64,
}

/// The default gates, as typed: every outcome a client can meet is
/// gated, and the relative latency gates have absolute floors, so an
/// identical candidate passes on a noisy machine.
pub const DEFAULT_GATES: [&str; 5] = [
    "error_rate <= 0.05",
    "refused_rate <= 1.5x or <= 0.02",
    "cancelled_rate <= 1.5x or <= 0.02",
    "ttft_p99 <= 1.5x or <= 50ms",
    "e2e_p99 <= 1.5x or <= 250ms",
];

impl Default for Analysis {
    /// Gates [`DEFAULT_GATES`]; 20 samples and 10 keys a side;
    /// Mann–Whitney at alpha 0.01, 20% and 20 ms slower.
    fn default() -> Self {
        // Built as values rather than parsed so that no fallible call is
        // needed here; a test checks they equal the documented strings.
        let le = |metric, threshold| Gate {
            metric,
            op: Op::Le,
            threshold,
        };
        let relative = |factor, floor| Threshold::Relative {
            factor,
            floor: Some(floor),
        };
        Analysis {
            gates: vec![
                le(Metric::ErrorRate, Threshold::Absolute { value: 0.05 }),
                le(Metric::RefusedRate, relative(1.5, 0.02)),
                le(Metric::CancelledRate, relative(1.5, 0.02)),
                le(Metric::TtftP99, relative(1.5, 0.05)),
                le(Metric::E2eP99, relative(1.5, 0.25)),
            ],
            min_samples: DEFAULT_MIN_SAMPLES,
            mann_whitney_alpha: Some(DEFAULT_MANN_WHITNEY_ALPHA),
            mann_whitney_min_effect: DEFAULT_MANN_WHITNEY_MIN_EFFECT,
            mann_whitney_min_delta_s: DEFAULT_MANN_WHITNEY_MIN_DELTA_S,
            min_keys: DEFAULT_MIN_KEYS,
            failure_min_delta: DEFAULT_FAILURE_MIN_DELTA,
        }
    }
}

/// [`Analysis::mann_whitney_alpha`] from a number, `null` or `false` (off).
fn alpha_or_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    struct Alpha;
    impl<'de> serde::de::Visitor<'de> for Alpha {
        type Value = Option<f64>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a significance level such as 0.01, or false to turn the test off")
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v as f64))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v as f64))
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
            match v {
                false => Ok(None),
                true => Err(E::invalid_value(serde::de::Unexpected::Bool(true), &self)),
            }
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }
    d.deserialize_option(Alpha)
}

/// The outcome of one window, as in Argo Rollouts' AnalysisRun.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every gate passed and no latency test found the canary slower.
    Successful,
    /// A gate failed or a latency test found the canary slower.
    Failed,
    /// Too little data to judge; never a pass.
    Inconclusive,
    /// A gate could not be evaluated or the settings are invalid; never a pass.
    Error,
}

impl Verdict {
    /// The snake_case name, as in JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Successful => "successful",
            Verdict::Failed => "failed",
            Verdict::Inconclusive => "inconclusive",
            Verdict::Error => "error",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One gate's outcome, explained (goes into the audit log, the API and metrics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateResult {
    /// Display of the gate.
    pub gate: String,
    /// The gate's metric.
    pub metric: Metric,
    /// The canary's value.
    pub canary: Option<f64>,
    /// Stable's value (always computed, also for absolute gates).
    pub stable: Option<f64>,
    /// The threshold the canary value was compared with (absolute value, or factor × stable).
    pub limit: Option<f64>,
    /// `None`: could not be evaluated.
    pub passed: Option<bool>,
    /// e.g. "canary 0.812 s > limit 0.600 s (1.5 × stable 0.400 s)".
    pub note: String,
}

/// One Mann–Whitney test of canary against stable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    /// The latency metric whose per-request samples were compared
    /// (`e2e_p99` for e2e_s, `ttft_p99` for ttft_s).
    pub metric: Metric,
    /// U statistic of canary over stable (pairs canary > stable, ties half).
    pub u: f64,
    /// Standardised U, tie- and continuity-corrected.
    pub z: f64,
    /// One-sided p-value of "canary tends to be slower".
    pub p_value: f64,
    /// Canary median over stable median.
    #[serde(default)]
    pub median_ratio: f64,
    /// False when `p_value < alpha` and `median_ratio > 1 + min_effect`.
    pub passed: bool,
}

/// A one-sided Fisher exact test of "the canary's requests end
/// unsuccessfully more often than stable's" (every outcome but a served,
/// successful request counts as a failure).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureTest {
    /// Canary requests that did not succeed, of `canary_n`.
    pub canary_failed: usize,
    /// Canary requests in the window.
    pub canary_n: usize,
    /// Stable requests that did not succeed, of `stable_n`.
    pub stable_failed: usize,
    /// Stable requests in the window.
    pub stable_n: usize,
    /// P(at least `canary_failed` of the window's failures on the canary
    /// side | as many failures overall), hypergeometric.
    pub p_value: f64,
    /// False when `p_value < alpha` and the canary's failure share exceeds
    /// stable's by more than [`Analysis::failure_min_delta`].
    pub passed: bool,
}

/// The verdict on one window, with everything that led to it.
///
/// Gates are evaluated and reported even when the verdict is Inconclusive or
/// Error, for the audit log; only `verdict` says whether the window passed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The outcome.
    pub verdict: Verdict,
    /// Canary samples in the window (ok and failed).
    pub canary_samples: usize,
    /// Stable samples in the window (ok and failed).
    pub stable_samples: usize,
    /// Each gate's outcome, in the order of [`Analysis::gates`].
    pub gates: Vec<GateResult>,
    /// Mann–Whitney results: metric, U, z, one-sided p, passed.
    pub tests: Vec<TestResult>,
    /// The failure-share test (absent when the tests are off, and in
    /// reports written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<FailureTest>,
    /// One sentence: why this verdict (names the failing gate and its value).
    pub reason: String,
}

/// The verdict on one window: `stable` and `canary` are the samples of the
/// two versions over the same interval.
///
/// In order: invalid settings → Error; fewer than `min_samples` on either
/// side → Inconclusive; any gate or latency test failed → Failed; any gate
/// not evaluable → Error; nothing could be checked → Inconclusive; else
/// Successful.
pub fn analyse(analysis: &Analysis, stable: &[Sample], canary: &[Sample]) -> Report {
    let gates: Vec<GateResult> = analysis
        .gates
        .iter()
        .map(|gate| evaluate(gate, stable, canary))
        .collect();
    let alpha = analysis.mann_whitney_alpha;
    let alpha_ok = alpha.is_none_or(|a| a > 0.0 && a < 1.0);
    let tests = match alpha {
        Some(alpha) if alpha_ok => latency_tests(stable, canary, alpha, analysis),
        _ => Vec::new(),
    };
    let failures = match alpha {
        Some(alpha) if alpha_ok => Some(failure_test(stable, canary, alpha, analysis)),
        _ => None,
    };
    let (mut verdict, mut reason) = decide(analysis, stable.len(), canary.len(), &gates, &tests);
    // A significant excess of failures fails a window the rest passed (a
    // window already failed names its first failing check).
    if let Some(f) = failures.as_ref().filter(|f| !f.passed)
        && verdict == Verdict::Successful
    {
        verdict = Verdict::Failed;
        reason = format!(
            "the canary fails more often than stable: {} of {} requests against {} of {} \
             (Fisher one-sided p = {:.2e})",
            f.canary_failed, f.canary_n, f.stable_failed, f.stable_n, f.p_value
        );
    }
    Report {
        verdict,
        canary_samples: canary.len(),
        stable_samples: stable.len(),
        gates,
        tests,
        failures,
        reason,
    }
}

/// Why a window's split cannot be trusted, or `None` when it held: the
/// canary's share of the requests outside [w/2, 2w] of its weight `w` (in
/// percent), or fewer than [`Analysis::min_keys`] (at most
/// `min_samples`) distinct split keys on a side (counted over samples that
/// carry a key). Such a window is never a
/// pass: its comparison says more about a few clients than the versions.
pub fn split_check(
    analysis: &Analysis,
    weight_pct: u32,
    stable: &[Sample],
    canary: &[Sample],
) -> Option<String> {
    let total = stable.len() + canary.len();
    if total == 0 || weight_pct == 0 || weight_pct >= 100 {
        return None;
    }
    let share = canary.len() as f64 / total as f64;
    let w = f64::from(weight_pct) / 100.0;
    if share < w / 2.0 || share > (2.0 * w).min(1.0) {
        return Some(format!(
            "the split did not hold: the canary took {:.1}% of {total} requests at weight \
             {weight_pct}% (outside [{:.1}%, {:.1}%]); few clients with sticky keys? \
             (sticky_key \"request\" splits each request)",
            share * 100.0,
            w * 50.0,
            (w * 200.0).min(100.0)
        ));
    }
    let distinct = |samples: &[Sample]| {
        let keys: std::collections::HashSet<u64> =
            samples.iter().map(|s| s.key).filter(|k| *k != 0).collect();
        keys.len()
    };
    // Never more keys than samples are asked for.
    let need = analysis.min_keys.min(analysis.min_samples.max(1));
    for (side, samples) in [("canary", canary), ("stable", stable)] {
        let n = distinct(samples);
        if n > 0 && n < need {
            return Some(format!(
                "too few clients: {side} saw {n} distinct split keys, need {need}"
            ));
        }
    }
    None
}

fn decide(
    analysis: &Analysis,
    stable_n: usize,
    canary_n: usize,
    gates: &[GateResult],
    tests: &[TestResult],
) -> (Verdict, String) {
    // Settings errors first: more data will not fix them.
    if let Some(alpha) = analysis.mann_whitney_alpha
        && !(alpha > 0.0 && alpha < 1.0)
    {
        return (
            Verdict::Error,
            format!("mann_whitney_alpha must be between 0 and 1 (exclusive), got {alpha}"),
        );
    }
    if analysis.gates.is_empty() && analysis.mann_whitney_alpha.is_none() {
        return (
            Verdict::Error,
            "nothing to judge: no gates and the Mann–Whitney test is disabled".to_owned(),
        );
    }

    let min = analysis.min_samples;
    if canary_n < min || stable_n < min {
        let counts = match (canary_n < min, stable_n < min) {
            (true, true) => format!("canary has {canary_n} and stable has {stable_n}"),
            (true, false) => format!("canary has {canary_n} (stable has {stable_n})"),
            _ => format!("stable has {stable_n} (canary has {canary_n})"),
        };
        return (
            Verdict::Inconclusive,
            format!("too few samples: {counts}, need {min} on each side"),
        );
    }

    let failed_tests: Vec<&TestResult> = tests.iter().filter(|t| !t.passed).collect();
    let failed_gates: Vec<&GateResult> = gates.iter().filter(|g| g.passed == Some(false)).collect();
    let more = match failed_gates.len() + failed_tests.len() {
        0 | 1 => String::new(),
        2 => " (and 1 more failing check)".to_owned(),
        n => format!(" (and {} more failing checks)", n - 1),
    };
    if let Some(g) = failed_gates.first() {
        return (
            Verdict::Failed,
            format!("gate `{}` failed: {}{more}", g.gate, g.note),
        );
    }
    if let Some(t) = failed_tests.first() {
        let alpha = analysis
            .mann_whitney_alpha
            .unwrap_or(DEFAULT_MANN_WHITNEY_ALPHA);
        return (
            Verdict::Failed,
            format!(
                "canary {} is stochastically greater than stable: Mann–Whitney U = {:.1}, \
                 z = {:.2}, one-sided p = {:.2e} < alpha {alpha}, median {:.2}× stable{more}",
                test_label(t.metric),
                t.u,
                t.z,
                t.p_value,
                t.median_ratio
            ),
        );
    }
    if let Some(g) = gates.iter().find(|g| g.passed.is_none()) {
        return (
            Verdict::Error,
            format!("gate `{}` could not be evaluated: {}", g.gate, g.note),
        );
    }
    if gates.is_empty() && tests.is_empty() {
        return (
            Verdict::Inconclusive,
            format!(
                "no check could run: no gates, and the latency tests need \
                 {MANN_WHITNEY_MIN_VALUES} ok samples on each side"
            ),
        );
    }

    let tested = match (analysis.mann_whitney_alpha, tests.len()) {
        (None, _) => "latency tests disabled".to_owned(),
        (Some(_), 0) => format!(
            "latency tests skipped: fewer than {MANN_WHITNEY_MIN_VALUES} ok samples on a side"
        ),
        (Some(_), _) => {
            let names: Vec<&str> = tests.iter().map(|t| test_label(t.metric)).collect();
            format!("canary not slower in {}", names.join(" or "))
        }
    };
    (
        Verdict::Successful,
        format!(
            "all {} gates passed, {tested} ({canary_n} canary, {stable_n} stable samples)",
            gates.len()
        ),
    )
}

fn test_label(metric: Metric) -> &'static str {
    match metric {
        Metric::TtftP99 => "time to first token",
        _ => "end-to-end latency",
    }
}

fn evaluate(gate: &Gate, stable: &[Sample], canary: &[Sample]) -> GateResult {
    let canary_value = gate.metric.of(canary);
    let stable_value = gate.metric.of(stable);
    let (limit, passed, note) = judge(gate, canary_value, stable_value);
    GateResult {
        gate: gate.to_string(),
        metric: gate.metric,
        canary: canary_value,
        stable: stable_value,
        limit,
        passed,
        note,
    }
}

/// (limit, passed, note) of one gate.
fn judge(
    gate: &Gate,
    canary: Option<f64>,
    stable: Option<f64>,
) -> (Option<f64>, Option<bool>, String) {
    let m = gate.metric;
    let show = |v: f64| m.format_value(v);
    // Gates built in code skip the parser's checks; a NaN limit would fail
    // every canary, which is a settings error, not a regression.
    match gate.threshold {
        Threshold::Absolute { value } if !value.is_finite() => {
            return (
                None,
                None,
                format!("threshold {value} is not a finite number"),
            );
        }
        Threshold::Relative { factor, .. } if !(factor.is_finite() && factor > 0.0) => {
            return (
                None,
                None,
                format!("factor {factor} is not a finite number above 0"),
            );
        }
        _ => {}
    }
    let Some(c) = canary else {
        return (
            None,
            None,
            format!("no canary value for {m}: {}", m.needs()),
        );
    };
    // Within the floor: no regression worth a rollback, whatever stable did.
    if let Threshold::Relative {
        floor: Some(floor), ..
    } = gate.threshold
        && gate.op.holds(c, floor)
    {
        return (
            Some(floor),
            Some(true),
            format!(
                "canary {} {} floor {}",
                show(c),
                gate.op.as_str(),
                show(floor)
            ),
        );
    }
    let (limit, basis) = match gate.threshold {
        Threshold::Absolute { value } => (value, String::new()),
        Threshold::Relative { factor, .. } => {
            let Some(s) = stable else {
                return (
                    None,
                    None,
                    format!("no stable value for {m} to compare with: {}", m.needs()),
                );
            };
            let limit = factor * s;
            // Stable at exactly 0 (typically error_rate with no errors) makes
            // every multiple 0: a single canary error would fail `<= 1.5x`
            // and the ratio says nothing. Both 0 is no change, so it passes;
            // a non-zero canary against 0 cannot be judged relatively (pair
            // the gate with an absolute one).
            if s == 0.0 {
                if let Threshold::Relative {
                    floor: Some(floor), ..
                } = gate.threshold
                {
                    // Past its floor (checked above) against a stable at 0.
                    return (
                        Some(floor),
                        Some(false),
                        format!(
                            "canary {} {} floor {} (stable {})",
                            show(c),
                            gate.op.negated_str(),
                            show(floor),
                            show(0.0)
                        ),
                    );
                }
                return if c == 0.0 {
                    (
                        Some(limit),
                        Some(true),
                        format!("canary and stable both {}: no change", show(0.0)),
                    )
                } else {
                    (
                        Some(limit),
                        None,
                        format!(
                            "stable is {}, so a relative limit cannot judge canary {}; \
                             add an absolute gate",
                            show(0.0),
                            show(c)
                        ),
                    )
                };
            }
            (limit, format!(" ({factor} × stable {})", show(s)))
        }
    };
    let passed = gate.op.holds(c, limit);
    let rel = if passed {
        gate.op.as_str()
    } else {
        gate.op.negated_str()
    };
    (
        Some(limit),
        Some(passed),
        format!("canary {} {rel} limit {}{basis}", show(c), show(limit)),
    )
}

fn failure_test(stable: &[Sample], canary: &[Sample], alpha: f64, a: &Analysis) -> FailureTest {
    let failed = |s: &[Sample]| s.iter().filter(|s| !s.ok).count();
    let (cf, cn, sf, sn) = (failed(canary), canary.len(), failed(stable), stable.len());
    let p_value = fisher_greater(cf, cn, sf, sn);
    let share = |f: usize, n: usize| f as f64 / n.max(1) as f64;
    let excess = share(cf, cn) - share(sf, sn);
    FailureTest {
        canary_failed: cf,
        canary_n: cn,
        stable_failed: sf,
        stable_n: sn,
        p_value,
        passed: !(p_value < alpha && excess > a.failure_min_delta),
    }
}

/// One-sided Fisher exact test: with `cf` of `cn` canary and `sf` of `sn`
/// stable requests failed, P(X ≥ cf) for X hypergeometric (the failures
/// spread over the two sides at random). 1 when nothing failed.
pub fn fisher_greater(cf: usize, cn: usize, sf: usize, sn: usize) -> f64 {
    let (n, k) = (cn + sn, cf + sf);
    if k == 0 || cn == 0 || sn == 0 {
        return 1.0;
    }
    let mut ln_fact = vec![0.0f64; n + 1];
    for i in 1..=n {
        ln_fact[i] = ln_fact[i - 1] + (i as f64).ln();
    }
    let ln_choose = |a: usize, b: usize| ln_fact[a] - ln_fact[b] - ln_fact[a - b];
    let total = ln_choose(n, cn);
    let p: f64 = (cf..=k.min(cn))
        .filter(|&x| k - x <= sn)
        .map(|x| (ln_choose(k, x) + ln_choose(n - k, cn - x) - total).exp())
        .sum();
    p.min(1.0)
}

fn latency_tests(
    stable: &[Sample],
    canary: &[Sample],
    alpha: f64,
    analysis: &Analysis,
) -> Vec<TestResult> {
    let (min_effect, min_delta) = (
        analysis.mann_whitney_min_effect,
        analysis.mann_whitney_min_delta_s,
    );
    type Pick = fn(&Sample) -> f64;
    let picks: [(Metric, Pick); 2] = [
        (Metric::E2eP99, |s| s.e2e_s),
        (Metric::TtftP99, |s| s.ttft_s),
    ];
    let values = |samples: &[Sample], pick: Pick| -> Vec<f64> {
        samples
            .iter()
            .filter(|s| s.ok)
            .map(pick)
            .filter(|v| !v.is_nan())
            .collect()
    };
    picks
        .into_iter()
        .filter_map(|(metric, pick)| {
            let (mut c, mut s) = (values(canary, pick), values(stable, pick));
            if c.len() < MANN_WHITNEY_MIN_VALUES || s.len() < MANN_WHITNEY_MIN_VALUES {
                return None;
            }
            let (u, z, p_value) = mann_whitney_greater(&c, &s)?;
            let (mc, ms) = (percentile(&mut c, 50.0), percentile(&mut s, 50.0));
            let median_ratio = match (mc, ms) {
                (Some(a), Some(b)) if b > 0.0 => a / b,
                (Some(a), Some(_)) if a > 0.0 => f64::INFINITY,
                _ => 1.0,
            };
            let delta = match (mc, ms) {
                (Some(a), Some(b)) => a - b,
                _ => 0.0,
            };
            Some(TestResult {
                metric,
                u,
                z,
                p_value,
                median_ratio,
                passed: !(p_value < alpha && median_ratio > 1.0 + min_effect && delta > min_delta),
            })
        })
        .collect()
}

/// One-sided Mann–Whitney U test of whether `a` tends to be greater than `b`.
///
/// Returns (U, z, p): U counts the pairs with a > b (ties count ½); z uses
/// the normal approximation with tie and continuity correction (as SciPy's
/// `mannwhitneyu(a, b, alternative="greater")`); p is the one-sided p-value.
/// NaNs are ignored; `None` when either side has no value left. When every
/// value is tied there is no evidence either way: z = 0 and p = 1.
pub fn mann_whitney_greater(a: &[f64], b: &[f64]) -> Option<(f64, f64, f64)> {
    let mut pooled: Vec<(f64, bool)> = a
        .iter()
        .map(|&v| (v, true))
        .chain(b.iter().map(|&v| (v, false)))
        .filter(|(v, _)| !v.is_nan())
        .collect();
    let n1 = pooled.iter().filter(|(_, in_a)| *in_a).count();
    let n = pooled.len();
    let n2 = n - n1;
    if n1 == 0 || n2 == 0 {
        return None;
    }
    pooled.sort_unstable_by(|x, y| x.0.total_cmp(&y.0));

    let mut rank_sum_a = 0.0;
    let mut tie_term = 0.0;
    let mut i = 0;
    while i < n {
        // `==`, not total_cmp: -0.0 and 0.0 are a tie.
        let j = i + pooled[i..]
            .iter()
            .take_while(|p| p.0 == pooled[i].0)
            .count();
        let avg_rank = (i + 1 + j) as f64 / 2.0;
        let t = (j - i) as f64;
        tie_term += t * t * t - t;
        rank_sum_a += avg_rank * pooled[i..j].iter().filter(|p| p.1).count() as f64;
        i = j;
    }

    let (n1, n2, n) = (n1 as f64, n2 as f64, n as f64);
    let u = rank_sum_a - n1 * (n1 + 1.0) / 2.0;
    let mean = n1 * n2 / 2.0;
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)));
    if variance <= 0.0 {
        return Some((u, 0.0, 1.0));
    }
    let z = (u - mean - 0.5) / variance.sqrt();
    let p = normal_sf(z).clamp(0.0, 1.0);
    Some((u, z, p))
}

/// P(Z > z) for a standard normal Z.
fn normal_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// Complementary error function, Chebyshev fit from Numerical Recipes
/// (`erfcc`): relative error below 1.2e-7 everywhere, so small p-values in
/// the tail stay accurate (Abramowitz–Stegun 7.1.26 is only absolute).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic uniform numbers in [0, 1), so windows are reproducible.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn ok(ttft: f64, e2e: f64) -> Sample {
        Sample {
            ok: true,
            ttft_s: ttft,
            itl_s: (e2e - ttft) / 63.0,
            e2e_s: e2e,
            output_tokens: 64,
            stopped: true,
            outcome: Outcome::Served,
            key: 0,
        }
    }

    fn failed() -> Sample {
        Sample {
            ok: false,
            ttft_s: f64::NAN,
            itl_s: f64::NAN,
            e2e_s: 0.1,
            output_tokens: 0,
            stopped: false,
            outcome: Outcome::Served,
            key: 0,
        }
    }

    /// `n` ok requests: TTFT ~ U(0.1, 0.2) s, e2e ~ U(1, 2) s × `e2e_scale`.
    fn window(seed: u64, n: usize, e2e_scale: f64) -> Vec<Sample> {
        let mut rng = Lcg(seed);
        (0..n)
            .map(|_| {
                let ttft = 0.1 + 0.1 * rng.next();
                ok(ttft, (1.0 + rng.next()) * e2e_scale)
            })
            .collect()
    }

    fn gate(s: &str) -> Gate {
        s.parse().unwrap()
    }

    /// The default analysis with only these gates.
    fn gated(gates: &[&str]) -> Analysis {
        Analysis {
            gates: gates.iter().map(|g| gate(g)).collect(),
            ..Analysis::default()
        }
    }

    /// Asserts that the verdict's reason says `words`, showing it if not.
    #[track_caller]
    fn assert_says(report: &Report, words: &str) {
        assert!(report.reason.contains(words), "{}", report.reason);
    }

    /// A canary window of `window(2, 100, e2e_scale)` whose requests have
    /// no inter-token latency, each answer `output_tokens` long (or as
    /// `window` makes it).
    fn without_itl(e2e_scale: f64, output_tokens: Option<u32>) -> Vec<Sample> {
        window(2, 100, e2e_scale)
            .into_iter()
            .map(|s| Sample {
                itl_s: f64::NAN,
                output_tokens: output_tokens.unwrap_or(s.output_tokens),
                ..s
            })
            .collect()
    }

    #[test]
    fn identical_distributions_are_successful() {
        let report = analyse(
            &Analysis::default(),
            &window(1, 200, 1.0),
            &window(2, 200, 1.0),
        );
        assert_eq!(report.verdict, Verdict::Successful, "{}", report.reason);
        assert_eq!(report.tests.len(), 2);
        assert!(report.gates.iter().all(|g| g.passed == Some(true)));
        assert_eq!((report.canary_samples, report.stable_samples), (200, 200));
    }

    #[test]
    fn a_canary_three_times_slower_end_to_end_fails_naming_e2e() {
        let report = analyse(
            &Analysis::default(),
            &window(1, 200, 1.0),
            &window(2, 200, 3.0),
        );
        assert_eq!(report.verdict, Verdict::Failed);
        assert_says(&report, "e2e_p99");
        let e2e = report
            .gates
            .iter()
            .find(|g| g.metric == Metric::E2eP99)
            .unwrap();
        assert_eq!(e2e.passed, Some(false));
        assert!(e2e.note.contains(" > limit "), "{}", e2e.note);
        let test = report
            .tests
            .iter()
            .find(|t| t.metric == Metric::E2eP99)
            .unwrap();
        assert!(!test.passed && test.p_value < 1e-6);
    }

    #[test]
    fn a_uniformly_slower_canary_inside_the_p99_gate_fails_the_mann_whitney_test() {
        // 1.3× slower everywhere: inside `e2e_p99 <= 1.5x`, but the rank test sees it.
        let report = analyse(
            &Analysis::default(),
            &window(1, 200, 1.0),
            &window(2, 200, 1.3),
        );
        assert!(report.gates.iter().all(|g| g.passed == Some(true)));
        assert_eq!(report.verdict, Verdict::Failed);
        assert_says(&report, "Mann–Whitney");
        assert_says(&report, "end-to-end");
    }

    #[test]
    fn a_significant_but_small_slowdown_is_not_an_effect() {
        // 1.05× slower over thousands of samples: the rank test is sure of
        // it, and nobody would notice it.
        let report = analyse(
            &Analysis::default(),
            &window(1, 4000, 1.0),
            &window(2, 4000, 1.05),
        );
        let e2e = report.tests.iter().find(|t| t.metric == Metric::E2eP99);
        assert!(
            e2e.is_some_and(|t| t.p_value < 0.01 && t.passed),
            "{report:?}"
        );
        assert_eq!(report.verdict, Verdict::Successful, "{}", report.reason);
    }

    #[test]
    fn disabling_the_test_lets_a_mildly_slower_canary_pass_its_gates() {
        let analysis = Analysis {
            mann_whitney_alpha: None,
            ..Analysis::default()
        };
        let report = analyse(&analysis, &window(1, 200, 1.0), &window(2, 200, 1.3));
        assert_eq!(report.verdict, Verdict::Successful, "{}", report.reason);
        assert!(report.tests.is_empty());
    }

    #[test]
    fn a_canary_with_twenty_percent_errors_fails_by_error_rate() {
        let mut canary = window(2, 200, 1.0);
        for s in canary.iter_mut().step_by(5) {
            *s = failed();
        }
        let report = analyse(&Analysis::default(), &window(1, 200, 1.0), &canary);
        assert_eq!(report.verdict, Verdict::Failed);
        assert!(
            report
                .reason
                .starts_with("gate `error_rate <= 0.05` failed"),
            "{}",
            report.reason
        );
        assert_says(&report, "20.00%");
        assert_eq!(report.gates[0].canary, Some(0.2));
    }

    #[test]
    fn too_few_samples_are_inconclusive_and_never_successful_even_if_perfect() {
        let stable = window(1, 200, 1.0);
        // Faster, no errors: would pass every gate with enough samples.
        let canary = window(2, 19, 0.5);
        let report = analyse(&Analysis::default(), &stable, &canary);
        assert_eq!(report.verdict, Verdict::Inconclusive);
        assert_says(&report, "canary has 19");
        assert_says(&report, "need 20");

        let report = analyse(
            &Analysis::default(),
            &window(1, 5, 1.0),
            &window(2, 200, 0.5),
        );
        assert_eq!(report.verdict, Verdict::Inconclusive);
        assert_says(&report, "stable has 5");

        let report = analyse(&Analysis::default(), &[], &[]);
        assert_eq!(report.verdict, Verdict::Inconclusive);
        assert_says(&report, "canary has 0 and stable has 0");
    }

    #[test]
    fn no_data_is_never_a_pass_even_with_min_samples_zero() {
        let analysis = Analysis {
            min_samples: 0,
            ..Analysis::default()
        };
        let report = analyse(&analysis, &[], &[]);
        assert_eq!(report.verdict, Verdict::Error, "{}", report.reason);

        let tests_only = Analysis {
            gates: vec![],
            min_samples: 0,
            mann_whitney_alpha: Some(0.01),
            ..Analysis::default()
        };
        let report = analyse(&tests_only, &window(1, 3, 1.0), &window(2, 3, 1.0));
        assert_eq!(report.verdict, Verdict::Inconclusive, "{}", report.reason);
    }

    #[test]
    fn a_relative_gate_with_both_sides_zero_passes() {
        let analysis = gated(&["error_rate <= 1.5x"]);
        let report = analyse(&analysis, &window(1, 100, 1.0), &window(2, 100, 1.0));
        assert_eq!(
            report.gates[0].passed,
            Some(true),
            "{}",
            report.gates[0].note
        );
        assert_eq!(report.gates[0].limit, Some(0.0));
        assert_eq!(report.verdict, Verdict::Successful, "{}", report.reason);
    }

    #[test]
    fn a_relative_gate_against_a_zero_stable_value_cannot_judge_a_nonzero_canary() {
        let analysis = Analysis {
            mann_whitney_alpha: None,
            ..gated(&["error_rate <= 1.5x"])
        };
        let mut canary = window(2, 100, 1.0);
        canary[0] = failed();
        let report = analyse(&analysis, &window(1, 100, 1.0), &canary);
        assert_eq!(report.gates[0].passed, None);
        assert_eq!(report.verdict, Verdict::Error);
        assert_says(&report, "error_rate <= 1.5x");
    }

    #[test]
    fn a_gate_on_a_metric_with_no_data_is_an_error() {
        let analysis = gated(&["error_rate <= 0.05", "itl_p99 <= 1.2x"]);
        // One-token answers: no inter-token latency on the canary.
        let canary = without_itl(1.0, Some(1));
        let report = analyse(&analysis, &window(1, 100, 1.0), &canary);
        assert_eq!(report.verdict, Verdict::Error);
        assert_eq!(report.gates[1].passed, None);
        assert_says(&report, "itl_p99");
        assert_says(&report, "at least 2 tokens");
    }

    #[test]
    fn a_failing_gate_outranks_a_gate_that_cannot_be_evaluated() {
        let analysis = gated(&["itl_p99 <= 1.2x", "e2e_p99 <= 1.5x"]);
        let canary = without_itl(3.0, None);
        let report = analyse(&analysis, &window(1, 100, 1.0), &canary);
        assert_eq!(report.verdict, Verdict::Failed);
        assert_says(&report, "e2e_p99");
        assert_says(&report, "more failing check");
    }

    #[test]
    fn an_alpha_outside_zero_to_one_is_an_error_and_so_is_an_analysis_without_checks() {
        for alpha in [0.0, 1.0, -0.5, f64::NAN] {
            let analysis = Analysis {
                mann_whitney_alpha: Some(alpha),
                ..Analysis::default()
            };
            let report = analyse(&analysis, &window(1, 100, 1.0), &window(2, 100, 1.0));
            assert_eq!(report.verdict, Verdict::Error, "alpha {alpha}");
            assert_says(&report, "mann_whitney_alpha");
        }
        let empty = Analysis {
            gates: vec![],
            min_samples: 20,
            mann_whitney_alpha: None,
            ..Analysis::default()
        };
        let report = analyse(&empty, &window(1, 100, 1.0), &window(2, 100, 1.0));
        assert_eq!(report.verdict, Verdict::Error);
    }

    #[test]
    fn a_gate_note_explains_the_limit_and_its_basis() {
        let stable = vec![ok(0.1, 0.4); 30];
        let canary = vec![ok(0.1, 0.812); 30];
        let analysis = Analysis {
            mann_whitney_alpha: None,
            ..gated(&["e2e_p99 <= 1.5x"])
        };
        let report = analyse(&analysis, &stable, &canary);
        let note = &report.gates[0].note;
        assert_eq!(
            note,
            "canary 0.812 s > limit 0.600 s (1.5 × stable 0.400 s)"
        );
        assert_eq!(report.gates[0].stable, Some(0.4));
        assert_says(&report, note);
    }

    #[test]
    fn absolute_gates_also_report_the_stable_value() {
        let analysis = Analysis {
            mann_whitney_alpha: None,
            ..gated(&["tokens_per_second >= 10", "stop_share >= 90%"])
        };
        let report = analyse(&analysis, &window(1, 50, 1.0), &window(2, 50, 1.0));
        assert!(
            report
                .gates
                .iter()
                .all(|g| g.stable.is_some() && g.passed == Some(true))
        );
        assert_eq!(report.verdict, Verdict::Successful, "{}", report.reason);
    }

    #[test]
    fn metrics_are_computed_over_the_samples_they_need() {
        let samples = [
            ok(0.1, 1.0),
            ok(0.2, 3.0),
            Sample {
                stopped: false,
                output_tokens: 32,
                ..ok(0.3, 1.0)
            },
            failed(),
        ];
        assert_eq!(Metric::ErrorRate.of(&samples), Some(0.25));
        assert_eq!(Metric::TtftP99.of(&samples), Some(0.3));
        assert_eq!(Metric::E2eP99.of(&samples), Some(3.0));
        assert_eq!(Metric::TokensPerSecond.of(&samples), Some(160.0 / 5.0));
        assert_eq!(Metric::OutputLength.of(&samples), Some(160.0 / 3.0));
        assert_eq!(Metric::StopShare.of(&samples), Some(2.0 / 3.0));
        for metric in Metric::ALL {
            assert_eq!(metric.of(&[]), None, "{metric}");
        }
        assert_eq!(Metric::ErrorRate.of(&[failed()]), Some(1.0));
        assert_eq!(Metric::TtftP99.of(&[failed()]), None);
    }

    #[test]
    fn metric_names_parse_in_any_case_and_with_dashes() {
        for metric in Metric::ALL {
            assert_eq!(metric.as_str().parse::<Metric>().unwrap(), metric);
            assert_eq!(
                metric.as_str().to_uppercase().parse::<Metric>().unwrap(),
                metric
            );
            let json = serde_json::to_string(&metric).unwrap();
            assert_eq!(json, format!("\"{}\"", metric.as_str()));
        }
        assert_eq!("ttft-p99".parse::<Metric>().unwrap(), Metric::TtftP99);
        let err = "latency".parse::<Metric>().unwrap_err().to_string();
        assert!(
            err.contains("unknown metric `latency`") && err.contains("ttft_p99"),
            "{err}"
        );
        assert!(Metric::E2eP99.higher_is_worse() && !Metric::TokensPerSecond.higher_is_worse());
    }

    #[test]
    fn gates_parse_in_every_form_and_display_round_trips() {
        let cases = [
            ("error_rate <= 0.01", "error_rate <= 0.01"),
            ("error_rate<=5%", "error_rate <= 0.05"),
            ("ttft_p99 < 0.5", "ttft_p99 < 0.5s"),
            ("ttft_p99 < 500ms", "ttft_p99 < 0.5s"),
            ("itl_p99 <= 30 ms", "itl_p99 <= 0.03s"),
            ("e2e_p99 <= 2s", "e2e_p99 <= 2s"),
            ("e2e_p99 <= 1.2x", "e2e_p99 <= 1.2x"),
            ("  TTFT_P99 ≤ 1.5X ", "ttft_p99 <= 1.5x"),
            ("tokens_per_second >= 0.8x", "tokens_per_second >= 0.8x"),
            ("tokens_per_second > 25", "tokens_per_second > 25"),
            ("output_length <= 1.1x", "output_length <= 1.1x"),
            ("stop_share >= 0.9", "stop_share >= 0.9"),
            ("stop_share ≥ 0.95x", "stop_share >= 0.95x"),
        ];
        for (input, canonical) in cases {
            let parsed = gate(input);
            assert_eq!(parsed.to_string(), canonical, "{input}");
            assert_eq!(gate(canonical), parsed, "{input}");
        }
        assert_eq!(
            gate("ttft_p99 < 500ms"),
            Gate {
                metric: Metric::TtftP99,
                op: Op::Lt,
                threshold: Threshold::Absolute { value: 0.5 }
            }
        );
        assert_eq!(
            gate("e2e_p99 <= 1.2x").threshold,
            Threshold::Relative {
                factor: 1.2,
                floor: None
            }
        );
        // Correctly rounded ms → s, so odd values survive the round trip.
        for ms in [1, 3, 7, 123, 300, 999, 1234] {
            let g = gate(&format!("itl_p99 < {ms}ms"));
            assert_eq!(gate(&g.to_string()), g, "{ms}ms");
        }
    }

    #[test]
    fn bad_gate_strings_are_refused_with_a_clear_error() {
        let cases = [
            ("", "is not a gate"),
            ("ttft_p99", "is not a gate"),
            ("<= 0.5", "is not a gate"),
            ("latency < 1", "unknown metric `latency`"),
            ("ttft_p99 == 1", "unknown operator `==`"),
            ("ttft_p99 =< 1", "unknown operator `=<`"),
            ("ttft_p99 <", "missing"),
            ("ttft_p99 < abc", "not a number"),
            ("ttft_p99 < 0.5 s extra", "not a number"),
            ("ttft_p99 < -0.5", "0 or above"),
            ("ttft_p99 < inf", "finite"),
            ("ttft_p99 < NaN", "finite"),
            ("e2e_p99 <= 0x", "above 0"),
            ("e2e_p99 <= -1.5x", "above 0"),
            ("e2e_p99 <= x", "not a number"),
            ("error_rate < 5ms", "only latency metrics"),
            ("tokens_per_second >= 5%", "only error_rate and stop_share"),
            ("error_rate <= 5", "fraction from 0 to 1"),
        ];
        for (input, expected) in cases {
            let err = input.parse::<Gate>().unwrap_err().to_string();
            assert!(err.contains(expected), "{input:?}: {err}");
        }
        let err = "error_rate <= 5".parse::<Gate>().unwrap_err();
        assert!(matches!(
            err,
            ParseGateError::BadThreshold {
                metric: Metric::ErrorRate,
                ..
            }
        ));
    }

    #[test]
    fn gates_serialize_as_their_string_and_refuse_bad_strings() {
        let g = gate("ttft_p99 < 500ms");
        assert_eq!(serde_json::to_string(&g).unwrap(), "\"ttft_p99 < 0.5s\"");
        let back: Gate = serde_json::from_str("\"ttft_p99 < 0.5s\"").unwrap();
        assert_eq!(back, g);
        let err = serde_json::from_str::<Gate>("\"ttft_p99 << 1\"").unwrap_err();
        assert!(err.to_string().contains("unknown operator"), "{err}");
        let threshold = serde_json::to_value(Threshold::Relative {
            factor: 1.5,
            floor: None,
        })
        .unwrap();
        assert_eq!(
            threshold,
            serde_json::json!({"kind": "relative", "factor": 1.5})
        );
    }

    #[test]
    fn the_default_analysis_is_the_documented_gates_and_survives_json() {
        let default = Analysis::default();
        let gates: Vec<Gate> = DEFAULT_GATES.into_iter().map(gate).collect();
        assert_eq!(default.gates, gates);
        assert_eq!(default.min_samples, 20);
        assert_eq!(default.min_keys, 10);
        assert_eq!(default.mann_whitney_alpha, Some(0.01));

        let json = serde_json::to_value(&default).unwrap();
        assert_eq!(json["gates"][1], "refused_rate <= 1.5x or <= 0.02");
        assert_eq!(json["gates"][3], "ttft_p99 <= 1.5x or <= 0.05s");
        assert_eq!(serde_json::from_value::<Analysis>(json).unwrap(), default);
        assert_eq!(serde_json::from_str::<Analysis>("{}").unwrap(), default);
        let off: Analysis = serde_json::from_str(r#"{"mann_whitney_alpha": null}"#).unwrap();
        assert_eq!(off.mann_whitney_alpha, None);
        // TOML has no null: `false` turns the test off there (and in JSON).
        let off: Analysis = toml::from_str("mann_whitney_alpha = false").unwrap();
        assert_eq!(off.mann_whitney_alpha, None);
        let off: Analysis = serde_json::from_str(r#"{"mann_whitney_alpha": false}"#).unwrap();
        assert_eq!(off.mann_whitney_alpha, None);
        let set: Analysis = toml::from_str("mann_whitney_alpha = 0.05").unwrap();
        assert_eq!(set.mann_whitney_alpha, Some(0.05));
        let on = toml::from_str::<Analysis>("mann_whitney_alpha = true").unwrap_err();
        assert!(
            on.to_string().contains("or false to turn the test off"),
            "{on}"
        );
        assert!(serde_json::from_str::<Analysis>(r#"{"mann_whitney_alpha": "0.01"}"#).is_err());
        assert!(serde_json::from_str::<Analysis>(r#"{"min_sample": 5}"#).is_err());
    }

    #[test]
    fn a_report_survives_json() {
        let report = analyse(
            &Analysis::default(),
            &window(1, 50, 1.0),
            &window(2, 50, 3.0),
        );
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains("\"verdict\":\"failed\""), "{json}");
        // Without serde_json's `float_roundtrip` feature a parsed f64 may
        // differ in the last bit, so compare the text-level content and the
        // numbers to within that.
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(
            (back.verdict, &back.reason),
            (report.verdict, &report.reason)
        );
        assert_eq!(back.gates.len(), report.gates.len());
        for (b, r) in back.gates.iter().zip(&report.gates) {
            assert_eq!((&b.gate, b.passed, &b.note), (&r.gate, r.passed, &r.note));
            let close = |x: Option<f64>, y: Option<f64>| match (x, y) {
                (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * y.abs().max(1.0),
                (x, y) => x == y,
            };
            assert!(
                close(b.canary, r.canary) && close(b.stable, r.stable) && close(b.limit, r.limit)
            );
        }
        let metrics = |r: &Report| {
            r.tests
                .iter()
                .map(|t| (t.metric, t.passed))
                .collect::<Vec<_>>()
        };
        assert_eq!(metrics(&back), metrics(&report));
        for v in [
            Verdict::Successful,
            Verdict::Failed,
            Verdict::Inconclusive,
            Verdict::Error,
        ] {
            assert_eq!(
                serde_json::to_string(&v).unwrap(),
                format!("\"{}\"", v.as_str())
            );
        }
    }

    #[test]
    fn percentile_is_nearest_rank_and_ignores_nan() {
        // The worked example of the nearest-rank method.
        let mut v = [15.0, 20.0, 35.0, 40.0, 50.0];
        assert_eq!(percentile(&mut v, 5.0), Some(15.0));
        assert_eq!(percentile(&mut v, 30.0), Some(20.0));
        assert_eq!(percentile(&mut v, 40.0), Some(20.0));
        assert_eq!(percentile(&mut v, 50.0), Some(35.0));
        assert_eq!(percentile(&mut v, 100.0), Some(50.0));
        assert_eq!(percentile(&mut v, 0.0), Some(15.0));
        let mut hundred: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut hundred, 99.0), Some(99.0));
        let mut with_nan = [f64::NAN, 3.0, -f64::NAN, 1.0, 2.0];
        assert_eq!(percentile(&mut with_nan, 100.0), Some(3.0));
        assert_eq!(percentile(&mut with_nan, 0.0), Some(1.0));
        assert_eq!(percentile(&mut [f64::NAN], 50.0), None);
        assert_eq!(percentile(&mut [], 50.0), None);
        assert_eq!(percentile(&mut [1.0], 101.0), None);
        assert_eq!(percentile(&mut [1.0], f64::NAN), None);
    }

    #[test]
    fn mann_whitney_matches_the_hand_computed_example() {
        let a: Vec<f64> = (1..=10).map(f64::from).collect();
        let b: Vec<f64> = (11..=20).map(f64::from).collect();
        // Every a is below every b: no pair with a > b.
        let (u, z, p) = mann_whitney_greater(&a, &b).unwrap();
        assert_eq!(u, 0.0);
        // mean 50, variance 10·10·21/12 = 175, continuity −0.5.
        assert!((z - (-50.5 / 175f64.sqrt())).abs() < 1e-12, "{z}");
        assert!((p - 0.999_932_578_5).abs() < 1e-7, "{p}");

        let (u, z, p) = mann_whitney_greater(&b, &a).unwrap();
        assert_eq!(u, 100.0);
        assert!((z - 3.741_848_282_8).abs() < 1e-9, "{z}");
        assert!(p < 0.001);
        // SciPy: mannwhitneyu(b, a, alternative="greater").pvalue = 9.1336e-05
        assert!((p / 9.133_589_555e-5 - 1.0).abs() < 1e-6, "{p}");
    }

    #[test]
    fn mann_whitney_handles_ties_nan_and_empty_sides() {
        assert_eq!(mann_whitney_greater(&[], &[1.0]), None);
        assert_eq!(mann_whitney_greater(&[f64::NAN], &[1.0]), None);
        assert_eq!(
            mann_whitney_greater(&[2.0; 5], &[2.0; 5]),
            Some((12.5, 0.0, 1.0))
        );
        let (u, ..) =
            mann_whitney_greater(&[1.0, 2.0, 2.0, 3.0, f64::NAN], &[2.0, 3.0, 4.0]).unwrap();
        assert_eq!(u, 2.5);
        let (u, ..) = mann_whitney_greater(&[0.0], &[-0.0]).unwrap();
        assert_eq!(u, 0.5);
    }

    #[test]
    fn the_normal_tail_is_accurate_to_a_few_parts_in_ten_million() {
        let cases = [
            (0.0, 0.5),
            (1.96, 0.024_997_895_148_220_435),
            (-3.0, 0.998_650_101_968_369_9),
            (5.0, 2.866_515_718_791_939e-7),
        ];
        for (z, expected) in cases {
            let got = normal_sf(z);
            assert!(
                ((got - expected) / expected).abs() < 2e-7,
                "sf({z}) = {got}"
            );
        }
    }

    proptest! {
        #[test]
        fn the_mann_whitney_p_value_is_always_a_probability(
            a in prop::collection::vec(prop::num::f64::ANY, 0..40),
            b in prop::collection::vec(prop::num::f64::ANY, 0..40),
        ) {
            if let Some((u, z, p)) = mann_whitney_greater(&a, &b) {
                prop_assert!((0.0..=1.0).contains(&p), "p = {}", p);
                prop_assert!(u.is_finite() && z.is_finite());
            }
        }

        #[test]
        fn mann_whitney_u_counts_the_pairs_where_a_is_greater(
            a in prop::collection::vec(0u8..6, 1..30),
            b in prop::collection::vec(0u8..6, 1..30),
        ) {
            let pairs: f64 = a.iter()
                .flat_map(|x| b.iter().map(move |y| match x.cmp(y) {
                    std::cmp::Ordering::Greater => 1.0,
                    std::cmp::Ordering::Equal => 0.5,
                    std::cmp::Ordering::Less => 0.0,
                }))
                .sum();
            let a: Vec<f64> = a.into_iter().map(f64::from).collect();
            let b: Vec<f64> = b.into_iter().map(f64::from).collect();
            let (u, _, _) = mann_whitney_greater(&a, &b).unwrap();
            prop_assert_eq!(u, pairs);
        }

        #[test]
        fn shifting_a_up_never_increases_the_p_value(
            a in prop::collection::vec(0.0f64..10.0, 1..40),
            b in prop::collection::vec(0.0f64..10.0, 1..40),
            shift in 0.001f64..5.0,
        ) {
            let (_, _, p) = mann_whitney_greater(&a, &b).unwrap();
            let shifted: Vec<f64> = a.iter().map(|x| x + shift).collect();
            let (_, _, p_shifted) = mann_whitney_greater(&shifted, &b).unwrap();
            // Slack for the last bits of erfc only; real changes in U move p
            // by far more.
            prop_assert!(p_shifted <= p + 1e-12, "p {} -> {}", p, p_shifted);
        }
    }

    #[test]
    fn fisher_matches_scipy_and_fails_a_canary_that_fails_more_often() {
        // The exact sums (as scipy.stats.fisher_exact(table,
        // alternative="greater")): [[3, 7], [1, 19]] → 2/21,
        // [[8, 392], [0, 1200]] → 1.4472e-5.
        assert!((fisher_greater(3, 10, 1, 20) - 2.0 / 21.0).abs() < 1e-9);
        let p = fisher_greater(8, 400, 0, 1200);
        assert!((p - 1.4472e-5).abs() < 1e-8, "{p}");
        assert_eq!(fisher_greater(0, 100, 0, 300), 1.0);
        // Fewer canary failures than stable's share: no evidence.
        assert!(fisher_greater(0, 100, 5, 300) > 0.5);

        // 2% of 400 canary requests fail, none of stable's 1,200: the
        // window fails on the test though every gate (error_rate <= 5%)
        // passes; the same at 0.5% (under the 1-point minimum) passes.
        let analysis = Analysis::default();
        let with_failures = |n: usize, failed: usize| -> Vec<Sample> {
            let mut v = window(2, n, 1.0);
            for s in v.iter_mut().take(failed) {
                s.ok = false;
            }
            v
        };
        let stable = window(1, 1200, 1.0);
        let r = analyse(&analysis, &stable, &with_failures(400, 8));
        assert_eq!(r.verdict, Verdict::Failed, "{}", r.reason);
        assert!(r.gates.iter().all(|g| g.passed == Some(true)), "{r:?}");
        assert!(r.reason.contains("fails more often"), "{}", r.reason);
        let r = analyse(&analysis, &stable, &with_failures(400, 2));
        assert_eq!(r.verdict, Verdict::Successful, "{}", r.reason);
        assert!(r.failures.as_ref().is_some_and(|f| f.passed));
    }

    #[test]
    fn refused_and_abandoned_requests_count_against_the_canary() {
        // 100 finished alike on both sides; the canary also refused 40 and
        // lost 30 clients: its survivors look fine, its clients did not.
        let stable = window(1, 100, 1.0);
        let mut canary = window(2, 100, 1.0);
        canary.extend((0..40).map(|i| Sample::refused(i + 1)));
        canary.extend((0..30).map(|i| Sample::cancelled(i + 100, 2.0, 3)));
        let report = analyse(&Analysis::default(), &stable, &canary);
        assert_eq!(report.verdict, Verdict::Failed, "{}", report.reason);
        let value = |m: Metric| report.gates.iter().find(|g| g.metric == m).unwrap();
        assert_eq!(value(Metric::ErrorRate).passed, Some(true));
        assert_eq!(value(Metric::RefusedRate).passed, Some(false));
        assert_eq!(value(Metric::CancelledRate).passed, Some(false));
        assert_eq!(Metric::RefusedRate.of(&canary), Some(40.0 / 170.0));
        assert_eq!(Metric::ErrorRate.of(&canary), Some(0.0));
        assert_says(&report, "refused_rate");
        // A refused sample is no latency: p99s are over served requests.
        assert_eq!(
            Metric::E2eP99.of(&canary),
            Metric::E2eP99.of(&canary[..100])
        );
    }

    #[test]
    fn a_floor_lets_a_few_milliseconds_pass_whatever_their_ratio() {
        let g = gate("ttft_p99 <= 1.5x or <= 50ms");
        assert_eq!(g.to_string(), "ttft_p99 <= 1.5x or <= 0.05s");
        assert_eq!(gate(&g.to_string()), g);
        let fast = |ttft: f64| -> Vec<Sample> { (0..50).map(|_| ok(ttft, 1.0)).collect() };
        let analysis = Analysis {
            mann_whitney_alpha: None,
            ..gated(&["ttft_p99 <= 1.5x or <= 50ms"])
        };
        // 8 ms against 5 ms: 1.6x, inside the floor.
        let r = analyse(&analysis, &fast(0.005), &fast(0.008));
        assert_eq!(r.verdict, Verdict::Successful, "{}", r.reason);
        assert!(r.gates[0].note.contains("floor"), "{}", r.gates[0].note);
        // 80 ms against 50 ms: past the floor and the factor.
        let r = analyse(&analysis, &fast(0.05), &fast(0.08));
        assert_eq!(r.verdict, Verdict::Failed, "{}", r.reason);
        // A floor needs a relative limit and the gate's own operator.
        assert!("ttft_p99 <= 0.1 or <= 50ms".parse::<Gate>().is_err());
        assert!("ttft_p99 <= 1.5x or >= 50ms".parse::<Gate>().is_err());
        assert!("ttft_p99 <= 1.5x or <= 2x".parse::<Gate>().is_err());
    }

    #[test]
    fn the_rank_test_ignores_a_slowdown_of_a_few_milliseconds() {
        // Medians 5 ms and 8 ms: significant and 60% slower, 3 ms apart.
        let side = |base: f64| -> Vec<Sample> {
            (0..200)
                .map(|i| ok(base + f64::from(i % 10) * 1e-4, base * 10.0))
                .collect()
        };
        let analysis = Analysis {
            gates: vec![],
            ..Analysis::default()
        };
        let r = analyse(&analysis, &side(0.005), &side(0.008));
        let t = r
            .tests
            .iter()
            .find(|t| t.metric == Metric::TtftP99)
            .unwrap();
        assert!(t.p_value < 0.01 && t.median_ratio > 1.2, "{t:?}");
        assert!(t.passed, "{t:?}");
    }

    #[test]
    fn a_split_far_from_its_weight_or_with_few_clients_is_caught() {
        let keyed = |n: usize, keys: u64, from: u64| -> Vec<Sample> {
            (0..n)
                .map(|i| Sample {
                    key: from + (i as u64 % keys),
                    ..ok(0.1, 1.0)
                })
                .collect()
        };
        let a = Analysis::default();
        // 25% of 400 at weight 25: fine.
        assert_eq!(
            split_check(&a, 25, &keyed(300, 300, 1), &keyed(100, 100, 1000)),
            None
        );
        // Everything on the canary at weight 25: one key's worth.
        let why = split_check(&a, 25, &keyed(20, 20, 1), &keyed(380, 380, 1000)).unwrap();
        assert!(why.contains("split did not hold"), "{why}");
        // Enough requests but three clients on the canary side.
        let why = split_check(&a, 25, &keyed(300, 300, 1), &keyed(100, 3, 1000)).unwrap();
        assert!(why.contains("3 distinct"), "{why}");
        // Samples without keys (older replicas) are not counted as clients.
        assert_eq!(
            split_check(&a, 25, &window(1, 300, 1.0), &window(2, 100, 1.0)),
            None
        );
    }
}
