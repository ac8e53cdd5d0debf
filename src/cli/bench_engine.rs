//! `llmops bench-engine`: engine-only decode throughput at several batch
//! sizes, optionally against the machine's measured limits.

use std::path::PathBuf;

use crate::engine::bench::Pick;
use crate::engine::{self, EnginePath, GgufWeights, LoadOptions};

/// Arguments of `llmops bench-engine`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Model folder or GGUF file; the embedded model when absent.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Decode steps timed.
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    /// Where to run: cpu, cuda[:N] or metal (not cpu: candle's tensor path,
    /// weights in bf16).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// How GGUF block-quantized matrices are held on the CPU.
    #[arg(long, value_enum, default_value_t = GgufWeights::F16)]
    pub gguf_weights: GgufWeights,
    /// Which implementation runs the steps: host (our CPU kernels) or
    /// tensor (candle ops, KV cache and attention on the device) [default:
    /// host on the CPU].
    #[arg(long, value_enum)]
    pub engine_path: Option<EnginePath>,
    /// How tokens are picked: argmax (greedy; on the device on the tensor
    /// path), top-k (each row's best 40 logits, selected on the device on
    /// the tensor path) or row (whole rows of logits to the host).
    #[arg(long, value_enum, default_value_t = Pick::Argmax)]
    pub pick: Pick,
    /// Also report milliseconds per step in each part of the forward pass (CPU).
    #[arg(long)]
    pub profile: bool,
    /// Measure the machine's read bandwidth and FMA throughput before each
    /// batch and report the fractions of them reached.
    #[arg(long)]
    pub limits: bool,
}

/// Loads the model and prints one JSON line per batch size.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    crate::engine::cpu::profile::enable(args.profile);
    let opts = LoadOptions {
        device: engine::parse_device(&args.device)?,
        gguf_weights: args.gguf_weights,
        engine_path: args.engine_path,
        ..Default::default()
    };
    let m = match &args.model {
        Some(p) => engine::load(p, &opts)?,
        None => crate::engine::embedded::load(&opts)?,
    };
    let rss = crate::monitor::exporter::process_stats()
        .map(|p| p.rss_bytes)
        .unwrap_or(0);
    eprintln!(
        "{} on {}: {} parameters, {:.1} MB of matrix weights, resident {:.0} MiB, {} path",
        m.info.source,
        args.device,
        m.info.parameters,
        m.model.weight_bytes() as f64 / 1e6,
        rss as f64 / (1 << 20) as f64,
        m.model.engine_path()
    );
    for b in args.batch {
        let measured = args.limits.then(crate::engine::cpu::limits::measure);
        let mut r =
            crate::engine::bench::decode_throughput(&m, b, args.prompt_len, args.steps, args.pick)?;
        if let Some(l) = measured {
            r.against(l, m.model.weight_bytes(), m.info.parameters);
        }
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}
