//! The `llmops` command line: one subcommand per module here, each parsing
//! its arguments and calling into the library. `main.rs` only calls [`main`].

pub mod bench_engine;
pub mod drift;
pub mod generate;
pub mod models;
pub mod retrain;
pub mod rollout;
pub mod shadow;
pub mod tools;

use clap::{Parser, Subcommand};

/// Serve large language models and run their operations.
#[derive(Parser)]
#[command(name = "llmops", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "LLMOPS_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    /// What to do.
    pub command: Command,
}

/// How log lines are written (stderr).
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Serve models over HTTP (OpenAI API) and gRPC.
    Serve(Box<crate::config::ServeArgs>),
    /// Print the SHA-256 of an API key secret, for `[[auth.keys]] sha256`.
    HashKey {
        /// The secret.
        secret: String,
    },
    /// Generate text from a prompt and print it as it streams.
    Generate(generate::GenerateArgs),
    /// Write a random-weight checkpoint (tests, benchmarks, peer comparisons).
    Synth(tools::SynthArgs),
    /// Convert a Llama-family Hugging Face folder to GGUF.
    ExportGguf(tools::ExportArgs),
    /// Train a model from scratch or fine-tune one.
    Train(crate::train::TrainArgs),
    /// Measure engine-only decode throughput at several batch sizes.
    BenchEngine(bench_engine::BenchArgs),
    /// Manage a running server's registry (admin API client over gRPC).
    Models(models::ModelsArgs),
    /// Start and steer canary rollouts on a running server.
    Rollout(rollout::RolloutArgs),
    /// Mirror live traffic to a candidate and compare (shadow evaluation).
    Shadow(shadow::ShadowArgs),
    /// Fine-tune a model's stable version on captured traffic, gate it and
    /// register it (on a running server).
    Retrain(retrain::RetrainArgs),
    /// Read a running server's drift detection.
    Drift(drift::DriftArgs),
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

/// Parses the command line and runs the command.
pub fn main() -> anyhow::Result<()> {
    crate::init_process();
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
            let cfg = crate::config::Config::load(&args)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listeners = crate::app::Listeners::bind(&cfg).await?;
                crate::app::run(cfg, listeners, crate::app::shutdown_signal()).await
            })
        }
        Command::HashKey { secret } => {
            println!("{}", crate::config::hash_secret(&secret));
            Ok(())
        }
        Command::Generate(args) => generate::run(args),
        Command::Synth(args) => tools::synth(args),
        Command::BenchEngine(args) => bench_engine::run(args),
        Command::Train(args) => {
            let report = crate::train::run(&args)?;
            if let Some(e) = report.final_eval_loss() {
                eprintln!("held-out loss {e:.4}, perplexity {:.2}", (e as f64).exp());
            }
            println!("{}", args.out.display());
            Ok(())
        }
        Command::Models(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(models::run(args)),
        Command::Rollout(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(rollout::run(args)),
        Command::Shadow(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(shadow::run(args)),
        Command::Retrain(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(retrain::run(args)),
        Command::Drift(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(drift::run(args)),
        Command::ExportGguf(args) => tools::export_gguf(args),
    }
}
