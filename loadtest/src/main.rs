//! `llmops-loadtest`: the command line over [`llmops_loadtest::run`].

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{ArgGroup, Parser, ValueEnum};
use llmops_loadtest::{Config, Dist, Endpoint, Header, Load, Prompts, Protocol};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Proto {
    Http,
    Grpc,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Api {
    Completions,
    Chat,
}

/// Load generator for OpenAI-compatible HTTP servers and llmops gRPC.
///
/// Examples:
///   llmops-loadtest --model tiny --concurrency 8 --duration 30 --prompt-tokens uniform:16:256 --max-tokens 128 --ignore-eos
///   llmops-loadtest --protocol grpc --url http://127.0.0.1:50051 --model tiny --rate 20 --requests 500
///   llmops-loadtest --model tiny --concurrency 4 --duration 20 --warmup 3 --during-at 5 --during "./hot-swap.sh" --json out.json
///   llmops-loadtest --model tiny --concurrency 8 --duration 60 --sessions 200 --users 50 --header "x-tenant: blue"
#[derive(Debug, Parser)]
#[command(name = "llmops-loadtest", version, verbatim_doc_comment)]
#[command(group(ArgGroup::new("mode").required(true).args(["concurrency", "rate"])))]
#[command(group(ArgGroup::new("warm").args(["warmup", "warmup_requests"])))]
struct Args {
    /// Server base URL [default: http://127.0.0.1:8080 for HTTP, http://127.0.0.1:50051 for gRPC].
    #[arg(long)]
    url: Option<String>,
    /// API to load.
    #[arg(long, value_enum, default_value = "http")]
    protocol: Proto,
    /// HTTP endpoint.
    #[arg(long, value_enum, default_value = "completions")]
    endpoint: Api,
    /// API key, sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "LLMOPS_LOADTEST_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Model name.
    #[arg(long)]
    model: String,
    /// Closed loop: this many clients, each sending its next request when the last ends.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Measure for this many seconds after warm-up [default: 10 unless --requests].
    #[arg(long)]
    duration: Option<f64>,
    /// Stop after sending this many measured requests.
    #[arg(long)]
    requests: Option<u64>,
    /// Seconds of warm-up, not measured.
    #[arg(long)]
    warmup: Option<f64>,
    /// Requests of warm-up, not measured.
    #[arg(long)]
    warmup_requests: Option<u64>,
    /// Prompt length in tokens: N, uniform:LO:HI, normal:MEAN:SD or
    /// mix:SPEC@WEIGHT,SPEC@WEIGHT (synthetic prompts, sent as token ids).
    #[arg(long, default_value = "128")]
    prompt_tokens: Dist,
    /// Token id range LO:HI (HI exclusive) of synthetic prompts; the default fits
    /// byte-level vocabularies, widen it for real models (e.g. 1000:30000).
    #[arg(long, default_value = "10:250", value_parser = parse_vocab)]
    vocab: (u32, u32),
    /// JSONL prompts, one `{"prompt": "..."}` or `{"messages": [...]}` per line
    /// (instead of synthetic ones).
    #[arg(long, conflicts_with = "prompt_tokens")]
    prompts: Option<PathBuf>,
    /// Completion length: N or a distribution like --prompt-tokens.
    #[arg(long, default_value = "64")]
    max_tokens: Dist,
    /// Send `ignore_eos: true`, so completions run to max tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Sampling temperature [default: the server's].
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling mass top_p [default: the server's].
    #[arg(long)]
    top_p: Option<f32>,
    /// Seed of prompts, lengths and arrivals.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Shell command to run after warm-up while the load continues (the run
    /// lasts at least until it exits); adds a per-second timeline.
    #[arg(long)]
    during: Option<String>,
    /// Seconds after warm-up to start --during.
    #[arg(long, default_value_t = 0.0)]
    during_at: f64,
    /// Print the per-second timeline even without --during.
    #[arg(long)]
    timeline: bool,
    /// Each request names a session `s-K`, K uniform over N sessions (drawn
    /// from --seed), in the `x-llmops-route-key` header (gRPC metadata): a
    /// canary split keeps a session on one side. Without it no key is sent.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    sessions: Option<u64>,
    /// Each request names an end user `u-K`, K uniform over N users (drawn
    /// from --seed), in the OpenAI `user` field (gRPC `user`). Without it no
    /// user is sent.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    users: Option<u64>,
    /// An extra HTTP header (gRPC metadata) on every request, NAME:VALUE;
    /// repeatable. Reports list the names only.
    #[arg(long = "header", short = 'H', value_name = "NAME:VALUE")]
    headers: Vec<Header>,
    /// Write the report as JSON here (`-` for stdout, replacing the table).
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

fn parse_vocab(s: &str) -> Result<(u32, u32), String> {
    let (lo, hi) = s.split_once(':').ok_or("expected LO:HI")?;
    let lo: u32 = lo
        .trim()
        .parse()
        .map_err(|_| format!("bad lower bound `{lo}`"))?;
    let hi: u32 = hi
        .trim()
        .parse()
        .map_err(|_| format!("bad upper bound `{hi}`"))?;
    if lo >= hi {
        return Err(format!("empty range {lo}:{hi}"));
    }
    Ok((lo, hi))
}

fn config(a: Args) -> anyhow::Result<(Config, bool, Option<PathBuf>)> {
    let protocol = match a.protocol {
        Proto::Http => Protocol::Http,
        Proto::Grpc => Protocol::Grpc,
    };
    let url = a.url.unwrap_or_else(|| match protocol {
        Protocol::Http => "http://127.0.0.1:8080".into(),
        Protocol::Grpc => "http://127.0.0.1:50051".into(),
    });
    let load = match (a.concurrency, a.rate) {
        (Some(c), None) => Load::Closed { concurrency: c },
        (None, Some(r)) => Load::Open { rate: r },
        _ => anyhow::bail!("give --concurrency or --rate"),
    };
    let prompts = match &a.prompts {
        Some(p) => Prompts::from_file(p)?,
        None => Prompts::Synthetic {
            tokens: a.prompt_tokens,
            vocab: a.vocab,
        },
    };
    let duration_s = match (a.duration, a.requests) {
        (None, None) => Some(10.0),
        (d, _) => d,
    };
    let cfg = Config {
        url,
        protocol,
        endpoint: match a.endpoint {
            Api::Completions => Endpoint::Completions,
            Api::Chat => Endpoint::Chat,
        },
        api_key: a.api_key,
        model: a.model,
        load,
        duration_s,
        requests: a.requests,
        warmup_s: a.warmup.unwrap_or(0.0),
        warmup_requests: a.warmup_requests.unwrap_or(0),
        prompts,
        max_tokens: a.max_tokens,
        ignore_eos: a.ignore_eos,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        timeout_s: a.timeout,
        during: a.during,
        during_at_s: a.during_at,
        progress: !a.quiet && std::io::stderr().is_terminal(),
        sessions: a.sessions,
        users: a.users,
        headers: a.headers,
    };
    cfg.validate()?;
    Ok((cfg, a.timeline, a.json))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmops-loadtest: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (cfg, timeline, json) = config(args)?;
    let show_timeline = timeline || cfg.during.is_some();
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let report = llmops_loadtest::run_until(cfg, interrupt).await?;
    let to_stdout = json.as_deref().is_some_and(|p| p.as_os_str() == "-");
    if !to_stdout {
        if show_timeline {
            println!("{}", report.timeline_table());
        }
        print!("{}", report.table());
    }
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report)?;
        if to_stdout {
            println!("{text}");
        } else {
            std::fs::write(&path, text + "\n")
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        }
    }
    if let Some(d) = &report.during
        && !d.output.trim().is_empty()
        && !to_stdout
    {
        println!("during output:\n{}", d.output.trim_end());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> anyhow::Result<Config> {
        let mut argv = vec!["llmops-loadtest", "--model", "m", "--concurrency", "1"];
        argv.extend_from_slice(extra);
        Ok(config(Args::try_parse_from(argv)?)?.0)
    }

    #[test]
    fn sessions_users_and_headers_reach_the_config() {
        let c = parse(&[
            "--sessions",
            "16",
            "--users",
            "3",
            "--header",
            "X-Tenant: blue",
            "-H",
            "x-trace:1",
        ])
        .unwrap();
        assert_eq!((c.sessions, c.users), (Some(16), Some(3)));
        let h: Vec<(&str, &str)> = c.headers.iter().map(|h| (h.name(), h.value())).collect();
        assert_eq!(h, [("x-tenant", "blue"), ("x-trace", "1")]);
        let c = parse(&[]).unwrap();
        assert_eq!((c.sessions, c.users, c.headers.len()), (None, None, 0));
    }

    #[test]
    fn zero_sessions_bad_headers_and_a_second_route_key_are_refused() {
        for bad in [
            &["--sessions", "0"][..],
            &["--users", "0"],
            &["--header", "nocolon"],
            &["--sessions", "2", "--header", "x-llmops-route-key: a"],
            &["--api-key", "k", "--header", "Authorization: Bearer j"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse(&["--header", "x-llmops-route-key: a"]).is_ok());
    }
}
