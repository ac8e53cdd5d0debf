//! Model-file tools: `llmops synth` (random-weight checkpoints for tests and
//! benchmarks) and `llmops export-gguf` (for peer comparisons).

use std::path::PathBuf;

use anyhow::Context;

/// Arguments of `llmops synth`.
#[derive(clap::Args)]
pub struct SynthArgs {
    /// Preset: tiny, 26m, 116m.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the weights.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A tokenizer.json to ship instead of the byte-level one.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// Arguments of `llmops export-gguf`.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Output .gguf file.
    #[arg(long)]
    pub out: PathBuf,
    /// Element type of the matrices.
    #[arg(long, value_enum, default_value = "f32")]
    pub r#type: crate::engine::export_gguf::GgufType,
}

/// Writes a random-weight checkpoint and prints its folder.
pub fn synth(args: SynthArgs) -> anyhow::Result<()> {
    let mut spec = crate::engine::synth::SynthSpec::preset(&args.preset)
        .with_context(|| format!("unknown preset `{}` (micro, tiny, 26m, 116m)", args.preset))?;
    spec.seed = args.seed;
    let tok = match &args.tokenizer {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| p.display().to_string())?),
        None => None,
    };
    spec.write(&args.out, tok.as_deref())?;
    println!("{}", args.out.display());
    Ok(())
}

/// Converts a Hugging Face folder to GGUF and prints the file's path.
pub fn export_gguf(args: ExportArgs) -> anyhow::Result<()> {
    crate::engine::export_gguf::export_gguf(&args.model, &args.out, args.r#type)?;
    println!("{}", args.out.display());
    Ok(())
}
