//! The `llmops` command: parse arguments, then hand over to the library.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use llmops::engine::{self, GgufWeights, LoadOptions, Message, SamplingParams};
use llmops::scheduler::{Engine, EngineLabels, Event, Request, SchedulerConfig};

/// Serve large language models and run their operations.
#[derive(Parser)]
#[command(name = "llmops", version, about)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "LLMOPS_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models over HTTP (OpenAI API) and gRPC.
    Serve(llmops::config::ServeArgs),
    /// Print the SHA-256 of an API key secret, for `[[auth.keys]] sha256`.
    HashKey {
        /// The secret.
        secret: String,
    },
    /// Generate text from a prompt and print it as it streams.
    Generate(GenerateArgs),
    /// Write a random-weight checkpoint (tests, benchmarks, peer comparisons).
    Synth(SynthArgs),
    /// Convert a Llama-family Hugging Face folder to GGUF.
    ExportGguf(ExportArgs),
    /// Train a model from scratch or fine-tune one.
    Train(llmops::train::TrainArgs),
    /// Measure engine-only decode throughput at several batch sizes.
    BenchEngine(BenchArgs),
    /// Manage a running server's registry (admin API client over gRPC).
    Models(llmops::registry::client::ModelsArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Model folder or GGUF file; the embedded model when absent.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batch: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Decode steps timed.
    #[arg(long, default_value_t = 64)]
    steps: usize,
    /// How GGUF block-quantized matrices are held on the CPU.
    #[arg(long, value_enum, default_value_t = GgufWeights::F16)]
    gguf_weights: GgufWeights,
    /// Also report milliseconds per step in each part of the forward pass (CPU).
    #[arg(long)]
    profile: bool,
    /// Measure the machine's read bandwidth and FMA throughput before each
    /// batch and report the fractions of them reached.
    #[arg(long)]
    limits: bool,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model folder (config.json + safetensors) or GGUF file; the embedded model when absent.
    #[arg(long, env = "LLMOPS_MODEL")]
    model: Option<PathBuf>,
    /// The prompt (or the user message with --chat).
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed of the sampler.
    #[arg(long)]
    seed: Option<u64>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// Where to run: cpu, cuda[:N] or metal.
    #[arg(long, default_value = "cpu", env = "LLMOPS_DEVICE")]
    device: String,
    /// How GGUF block-quantized weights are held on the CPU.
    #[arg(long, value_enum, default_value_t = GgufWeights::F16, env = "LLMOPS_GGUF_WEIGHTS")]
    gguf_weights: GgufWeights,
}

#[derive(clap::Args)]
struct SynthArgs {
    /// Preset: tiny, 26m, 116m.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the weights.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A tokenizer.json to ship instead of the byte-level one.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    /// Output .gguf file.
    #[arg(long)]
    out: PathBuf,
    /// Element type of the matrices.
    #[arg(long, value_enum, default_value = "f32")]
    r#type: llmops::export::GgufType,
}

fn init_tracing(format: LogFormat, default_level: &str) {
    // RUST_LOG-style filtering; prompts and outputs are never logged.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

fn main() -> anyhow::Result<()> {
    llmops::init_process();
    let cli = Cli::parse();
    // A server narrates its life at `info`; one-shot commands print their
    // result and only speak up when something is wrong.
    let level = match cli.command {
        Command::Serve(_) | Command::Train(_) => "info",
        _ => "warn",
    };
    init_tracing(cli.log_format, level);
    match cli.command {
        Command::Serve(args) => {
            let cfg = llmops::config::Config::load(&args)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listeners = llmops::app::Listeners::bind(&cfg).await?;
                llmops::app::run(cfg, listeners, llmops::app::shutdown_signal()).await
            })
        }
        Command::HashKey { secret } => {
            println!("{}", llmops::api::auth::hash_secret(&secret));
            Ok(())
        }
        Command::Generate(args) => generate(args),
        Command::Synth(args) => {
            let mut spec = llmops::synth::SynthSpec::preset(&args.preset).with_context(|| {
                format!("unknown preset `{}` (micro, tiny, 26m, 116m)", args.preset)
            })?;
            spec.seed = args.seed;
            let tok = match &args.tokenizer {
                Some(p) => {
                    Some(std::fs::read_to_string(p).with_context(|| p.display().to_string())?)
                }
                None => None,
            };
            spec.write(&args.out, tok.as_deref())?;
            println!("{}", args.out.display());
            Ok(())
        }
        Command::BenchEngine(args) => {
            llmops::engine::cpu::profile::enable(args.profile);
            let opts = LoadOptions {
                gguf_weights: args.gguf_weights,
                ..Default::default()
            };
            let m = match &args.model {
                Some(p) => engine::load(p, &opts)?,
                None => llmops::embedded::load(&opts)?,
            };
            let rss = llmops::monitor::exporter::process_stats()
                .map(|p| p.rss_bytes)
                .unwrap_or(0);
            eprintln!(
                "{}: {} parameters, {:.1} MB of matrix weights, resident {:.0} MiB",
                m.info.source,
                m.info.parameters,
                m.model.weight_bytes() as f64 / 1e6,
                rss as f64 / (1 << 20) as f64
            );
            for b in args.batch {
                let measured = args.limits.then(llmops::engine::cpu::limits::measure);
                let mut r =
                    llmops::engine::bench::decode_throughput(&m, b, args.prompt_len, args.steps)?;
                if let Some(l) = measured {
                    r.against(l, m.model.weight_bytes(), m.info.parameters);
                }
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(())
        }
        Command::Train(args) => {
            let report = llmops::train::run(&args)?;
            if let Some(e) = report.final_eval_loss() {
                eprintln!("held-out loss {e:.4}, perplexity {:.2}", (e as f64).exp());
            }
            println!("{}", args.out.display());
            Ok(())
        }
        Command::Models(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(llmops::registry::client::run(args)),
        Command::ExportGguf(args) => {
            llmops::export::export_gguf(&args.model, &args.out, args.r#type)?;
            println!("{}", args.out.display());
            Ok(())
        }
    }
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let opts = LoadOptions {
        device: engine::parse_device(&args.device)?,
        gguf_weights: args.gguf_weights,
        ..Default::default()
    };
    let loaded = match &args.model {
        Some(path) => engine::load(path, &opts)?,
        None => llmops::embedded::load(&opts)?,
    };
    let name = loaded.info.source.clone();
    let engine = Engine::spawn(
        loaded,
        SchedulerConfig::default(),
        EngineLabels {
            model: name,
            version: "cli".into(),
            variant: "stable".into(),
        },
    )?;
    let prompt = if args.chat {
        let text = engine.chat_template().render(
            &[Message {
                role: "user".into(),
                content: args.prompt.clone(),
            }],
            true,
        )?;
        engine.tokenizer().encode(&text, false)?
    } else {
        engine.tokenizer().encode(&args.prompt, true)?
    };
    let max_tokens = args
        .max_tokens
        .min(engine.context_length().saturating_sub(prompt.len()));
    let request = Request {
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            ..Default::default()
        },
        ..Request::greedy(prompt, max_tokens)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let started = Instant::now();
        let mut rx = engine.submit(request)?;
        let mut out = std::io::stdout().lock();
        if !args.chat {
            write!(out, "{}", args.prompt)?;
        }
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Token { text, .. } => {
                    write!(out, "{text}")?;
                    out.flush()?;
                }
                Event::Done(c) => {
                    writeln!(out, "{}", c.tail)?;
                    let decode_tps = if c.completion_tokens > 1 && c.timings.decode > Duration::ZERO {
                        (c.completion_tokens - 1) as f64 / c.timings.decode.as_secs_f64()
                    } else {
                        0.0
                    };
                    eprintln!(
                        "\nprompt tokens: {}  generated tokens: {}  finish: {}  time to first token: {:.1} ms  decode: {:.1} tok/s  total: {:.2} s",
                        c.prompt_tokens,
                        c.completion_tokens,
                        c.reason.as_str(),
                        c.timings.ttft.as_secs_f64() * 1e3,
                        decode_tps,
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
                Event::Failed(e) => anyhow::bail!("generation failed: {e}"),
            }
        }
        anyhow::bail!("the engine stopped before finishing")
    })
}
