//! The result of a run: JSON (serde) and text tables.

use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::{Collector, Latency, Second, Tally, Warmup};
use crate::{Config, Endpoint, Load, Protocol};

/// What the `during` command did.
#[derive(Debug, Clone, Serialize)]
pub struct DuringReport {
    /// The command line.
    pub command: String,
    /// Start, in seconds after warm-up.
    pub start_s: f64,
    /// End, in seconds after warm-up.
    pub end_s: f64,
    /// Exit code (`None` when killed by a signal or not started).
    pub exit_code: Option<i32>,
    /// Exited with status 0.
    pub success: bool,
    /// The end of its stdout then stderr.
    pub output: String,
    /// Why it could not be started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The result of a run. Everything but `warmup` covers measured requests only.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The settings (without the API key).
    pub config: Config,
    /// From the end of warm-up to the end of the last measured request.
    pub duration_s: f64,
    /// Measured requests that ended (ok + failed).
    pub requests: u64,
    /// How measured requests ended (flattened into the report's JSON).
    #[serde(flatten)]
    pub tally: Tally,
    /// Finished requests per second.
    pub requests_per_s: f64,
    /// Generated tokens per second.
    pub output_tokens_per_s: f64,
    /// Steady-state throughput of a duration-bound run: generated tokens
    /// that reached the client during the measured window (any request's,
    /// warm-up ones included) per second of the window. Unlike
    /// `output_tokens_per_s` it does not count the drain at the end, when
    /// concurrency falls, so it is the figure to compare servers by when a
    /// request lasts a fair part of the window.
    pub window_output_tokens_per_s: Option<f64>,
    /// Time to first token.
    pub ttft: Latency,
    /// Between consecutive token chunks (HTTP) or token messages (gRPC).
    pub itl: Latency,
    /// Per output token after the first: (last − first token) / (tokens − 1).
    pub tpot: Latency,
    /// End to end, finished requests.
    pub e2e: Latency,
    /// Warm-up requests (excluded from everything else).
    pub warmup: Warmup,
    /// Per second after warm-up, by the second requests started in.
    pub timeline: Vec<Second>,
    /// The `during` command.
    pub during: Option<DuringReport>,
    /// The run was interrupted (in-flight requests abandoned).
    pub interrupted: bool,
}

/// What identifies the requests to the server: sessions, users, extra headers.
fn keys_line(cfg: &Config) -> String {
    let mut parts = vec![];
    match cfg.sessions {
        Some(n) => parts.push(format!(
            "{n} sessions ({}: s-0..s-{})",
            crate::keys::ROUTE_KEY_HEADER,
            n - 1
        )),
        None => parts.push("no session key".to_string()),
    }
    match cfg.users {
        Some(n) => parts.push(format!("{n} users (user: u-0..u-{})", n - 1)),
        None => parts.push("no user".to_string()),
    }
    if !cfg.headers.is_empty() {
        let names: Vec<&str> = cfg.headers.iter().map(|h| h.name()).collect();
        parts.push(format!("headers {}", names.join(", ")));
    }
    parts.join("; ")
}

fn per_s(n: u64, s: f64) -> f64 {
    per_s_f(n as f64, s)
}

fn per_s_f(n: f64, s: f64) -> f64 {
    if s > 0.0 { n / s } else { 0.0 }
}

impl Report {
    /// Assembles the report from what was collected.
    pub(crate) fn build(
        cfg: &Config,
        c: &Collector,
        during: Option<DuringReport>,
        interrupted: bool,
    ) -> Self {
        let duration_s = c.last_end.map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let timeline = c.timeline(during.as_ref().map(|d| (d.start_s, d.end_s)));
        Report {
            config: cfg.clone(),
            duration_s,
            requests: c.tally.ok + c.tally.failed,
            requests_per_s: per_s(c.tally.ok, duration_s),
            output_tokens_per_s: per_s(c.tally.output_tokens, duration_s),
            window_output_tokens_per_s: cfg.duration_s.map(|w| per_s_f(c.window_tokens, w)),
            tally: c.tally.clone(),
            ttft: Latency::from_hist(&c.ttft),
            itl: Latency::from_hist(&c.itl),
            tpot: Latency::from_hist(&c.tpot),
            e2e: Latency::from_hist(&c.e2e),
            warmup: c.warmup,
            timeline,
            during,
            interrupted,
        }
    }

    /// The summary table.
    pub fn table(&self) -> String {
        let cfg = &self.config;
        let mut s = String::new();
        let target = match (cfg.protocol, cfg.endpoint) {
            (Protocol::Grpc, _) => "gRPC GenerateStream",
            (Protocol::Http, Endpoint::Completions) => "HTTP /v1/completions",
            (Protocol::Http, Endpoint::Chat) => "HTTP /v1/chat/completions",
        };
        let _ = writeln!(s, "target    {} {target}, model {}", cfg.url, cfg.model);
        let load = match cfg.load {
            Load::Closed { concurrency } => format!("closed loop, {concurrency} clients"),
            Load::Open { rate } => format!("open loop, Poisson {rate} req/s"),
        };
        let warm = if cfg.warmup_requests > 0 {
            format!(", warm-up {} requests", cfg.warmup_requests)
        } else if cfg.warmup_s > 0.0 {
            format!(", warm-up {} s", cfg.warmup_s)
        } else {
            String::new()
        };
        let prompts = match &cfg.prompts {
            crate::Prompts::Synthetic { tokens, .. } => format!("prompt tokens {tokens}"),
            crate::Prompts::File { path, items } => format!("{} prompts from {path}", items.len()),
        };
        let _ = writeln!(
            s,
            "load      {load}{warm}; {prompts}, max tokens {}{}",
            cfg.max_tokens,
            if cfg.ignore_eos { ", ignore_eos" } else { "" }
        );
        let _ = writeln!(s, "keys      {}", keys_line(cfg));
        let _ = writeln!(
            s,
            "requests  {} ok, {} failed in {:.2} s: {:.2} req/s{}",
            self.tally.ok,
            self.tally.failed,
            self.duration_s,
            self.requests_per_s,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "tokens    {} prompt, {} output: {:.1} output tok/s{}",
            self.tally.prompt_tokens,
            self.tally.output_tokens,
            self.output_tokens_per_s,
            if self.tally.usage_missing > 0 {
                format!(
                    " ({} requests without usage, counted from chunks)",
                    self.tally.usage_missing
                )
            } else {
                String::new()
            }
        );
        if let Some(w) = self.window_output_tokens_per_s {
            let _ = writeln!(
                s,
                "steady    {w:.1} output tok/s inside the measured window (any request's tokens)"
            );
        }
        let _ = writeln!(
            s,
            "{:<12}{:>10}{:>10}{:>10}{:>10}{:>10}{:>9}",
            "latency ms", "p50", "p90", "p99", "max", "mean", "n"
        );
        for (name, l) in [
            ("TTFT", &self.ttft),
            ("ITL", &self.itl),
            ("TPOT", &self.tpot),
            ("E2E", &self.e2e),
        ] {
            let _ = writeln!(
                s,
                "{name:<12}{:>10.3}{:>10.3}{:>10.3}{:>10.3}{:>10.3}{:>9}",
                l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.mean_ms, l.count
            );
        }
        if self.tally.errors.is_empty() {
            let _ = writeln!(s, "errors    none");
        } else {
            let list: Vec<String> = self
                .tally
                .errors
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(s, "errors    {}", list.join(", "));
            for (k, m) in &self.tally.error_examples {
                let _ = writeln!(s, "          {k}: {m}");
            }
        }
        if self.warmup.ok + self.warmup.failed > 0 {
            let _ = writeln!(
                s,
                "warm-up   {} ok, {} failed (not measured)",
                self.warmup.ok, self.warmup.failed
            );
        }
        if let Some(d) = &self.during {
            let status = match (&d.error, d.exit_code) {
                (Some(e), _) => format!("could not start: {e}"),
                (None, Some(c)) => format!("exit {c}"),
                (None, None) => "killed by a signal".into(),
            };
            let _ = writeln!(
                s,
                "during    `{}` ran {:.2}–{:.2} s, {status}",
                d.command, d.start_s, d.end_s
            );
        }
        s
    }

    /// The per-second timeline (`*` marks seconds the `during` command ran in).
    pub fn timeline_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:>5}{:>7}{:>7}{:>7}{:>11}{:>11}{:>11}{:>11}  errors",
            "s", "start", "ok", "err", "e2e p50", "e2e p99", "ttft p50", "ttft p99"
        );
        let f = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
        for r in &self.timeline {
            let errs: Vec<String> = r.errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let _ = writeln!(
                s,
                "{:>4}{}{:>7}{:>7}{:>7}{:>11}{:>11}{:>11}{:>11}  {}",
                r.t,
                if r.during { "*" } else { " " },
                r.started,
                r.ok,
                r.failed,
                f(r.e2e_p50_ms),
                f(r.e2e_p99_ms),
                f(r.ttft_p50_ms),
                f(r.ttft_p99_ms),
                errs.join(", ")
            );
        }
        s
    }
}
