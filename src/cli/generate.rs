//! `llmops generate`: one prompt through a real engine (scheduler included),
//! streamed to stdout, with timings on stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::engine::{self, GgufWeights, LoadOptions, Message, SamplingParams};
use crate::scheduler::{EngineHandle, EngineLabels, Event, Request, SchedulerConfig};

/// Arguments of `llmops generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Model folder (config.json + safetensors) or GGUF file; the embedded model when absent.
    #[arg(long, env = "LLMOPS_MODEL")]
    pub model: Option<PathBuf>,
    /// The prompt (or the user message with --chat).
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampler.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// Where to run: cpu, cuda[:N] or metal.
    #[arg(long, default_value = "cpu", env = "LLMOPS_DEVICE")]
    pub device: String,
    /// How GGUF block-quantized weights are held on the CPU.
    #[arg(long, value_enum, default_value_t = GgufWeights::F16, env = "LLMOPS_GGUF_WEIGHTS")]
    pub gguf_weights: GgufWeights,
}

/// Loads the model, generates, and streams the text to stdout.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let opts = LoadOptions {
        device: engine::parse_device(&args.device)?,
        gguf_weights: args.gguf_weights,
        ..Default::default()
    };
    let loaded = match &args.model {
        Some(path) => engine::load(path, &opts)?,
        None => crate::engine::embedded::load(&opts)?,
    };
    let name = loaded.info.source.clone();
    let engine = EngineHandle::spawn(
        loaded,
        SchedulerConfig::default(),
        EngineLabels {
            model: name,
            version: "cli".into(),
        },
    )?;
    let prompt = if args.chat {
        let text = engine.chat_template().render(
            &[Message {
                role: "user".into(),
                content: args.prompt.clone(),
                ..Default::default()
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
