//! `llmops train`: training from scratch or fine-tuning with candle's
//! autodiff, producing a Hugging Face folder the engine serves like any other
//! model, with a model card.
//!
//! Determinism: initial weights, the data split and the batch order are pure
//! functions of the seed, and checkpoints hold the weights, the optimizer
//! moments and the step, so a resumed run repeats the uninterrupted one.

pub mod data;
pub mod job;
pub mod model;
pub mod optim;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use tokenizers::AddedToken;

use crate::engine::chat::DEFAULT_CHAT_TEMPLATE;
use crate::engine::synth::SynthSpec;
use crate::engine::{Arch, ModelConfig, Tokenizer};
use data::{Corpus, Example, Specials};
use model::TrainModel;
use optim::{AdamW, AdamWConfig};

/// Special tokens of tokenizers trained here, in id order.
pub const SPECIAL_TOKENS: [&str; 5] = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"];

/// Arguments of `llmops train`.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct TrainArgs {
    /// Text files, folders, or JSONL (`text`, `prompt`/`completion`, `messages`).
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Output folder (config.json, model.safetensors, tokenizer, model card).
    #[arg(long)]
    pub out: PathBuf,
    /// Fine-tune this Hugging Face Llama-family folder (or `embedded`, the
    /// built-in model) instead of starting from scratch.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Replay data mixed into the training set (the base's original data,
    /// to limit forgetting); its held-out split is the reference set.
    #[arg(long = "replay-data", num_args = 1..)]
    pub replay: Vec<PathBuf>,
    /// Share of the training examples drawn from the replay data, in [0, 1).
    #[arg(long, default_value_t = 0.2)]
    pub replay_share: f64,
    /// Fraction of the replay data held out as the reference set (default:
    /// --eval-fraction); use the base's own to hold out what it held out.
    #[arg(long)]
    pub replay_eval_fraction: Option<f64>,
    /// The base's own data, for the reference set only (never trained on):
    /// used when there is no replay data; its held-out split (by
    /// --replay-eval-fraction) is the reference set. Without either, the
    /// reference set is the prompts of the held-out window (what clients
    /// wrote, never what the base answered).
    #[arg(long = "reference-data", num_args = 1..)]
    pub reference: Vec<PathBuf>,
    /// Shape preset when training from scratch: nano, small.
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// Override the preset's layer count.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Override the preset's width.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Override the preset's attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Override the preset's key/value heads.
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Override the preset's MLP width.
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Override the preset's context length.
    #[arg(long)]
    pub context: Option<usize>,
    /// Vocabulary size of the BPE tokenizer trained from the data.
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Use this tokenizer.json instead of training one.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 50)]
    pub warmup: u64,
    /// Final learning rate as a fraction of the peak.
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// Clip gradients to this global norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Evaluate every N steps.
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    /// Fraction of examples held out for evaluation.
    #[arg(long, default_value_t = 0.02)]
    pub eval_fraction: f64,
    /// Batches per evaluation.
    #[arg(long, default_value_t = 8)]
    pub eval_batches: usize,
    /// Write a checkpoint every N steps (0 = only at the end).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u64,
    /// Resume from this checkpoint folder.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Seed of weights, split and batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop after this step (the schedule still spans --steps); for tests of resuming.
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl TrainArgs {
    /// The command line's defaults for `data` and `out`, for callers that
    /// train as a library call (one source of defaults: the flags').
    pub fn new(data: Vec<PathBuf>, out: PathBuf) -> anyhow::Result<Self> {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: TrainArgs,
        }
        let mut argv: Vec<std::ffi::OsString> = vec!["train".into(), "--data".into()];
        argv.extend(data.iter().map(|d| d.clone().into_os_string()));
        argv.push("--out".into());
        argv.push(out.into_os_string());
        Ok(Wrap::try_parse_from(argv)?.args)
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainReport {
    /// (step, training loss).
    pub losses: Vec<(u64, f32)>,
    /// (step, held-out loss).
    pub eval_losses: Vec<(u64, f32)>,
    /// Training tokens per second (targets counted).
    pub tokens_per_second: f64,
    /// Trainable parameters.
    pub parameters: usize,
    /// Steps completed.
    pub steps: u64,
    /// Training examples (replay included) and how many came from replay.
    #[serde(default)]
    pub train_examples: usize,
    /// Training examples drawn from the replay data.
    #[serde(default)]
    pub replay_examples: usize,
    /// Held-out sets when fine-tuning: the loss of the base (before the
    /// first step) and of the result on each.
    #[serde(default)]
    pub held_out: Vec<HeldOut>,
    /// Where the reference set came from: `replay` (held out of the replay
    /// data), `parent_data` (held out of the base's own data) or
    /// `captured_prompts` (the prompts of the held-out window).
    #[serde(default)]
    pub reference_source: Option<String>,
}

/// One held-out set's loss before and after fine-tuning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldOut {
    /// `window` (held out of the training data) or `reference` (held out of
    /// the replay data).
    pub name: String,
    /// Examples evaluated.
    pub examples: usize,
    /// Target tokens evaluated (the loss's denominator).
    #[serde(default)]
    pub tokens: usize,
    /// Mean loss of the starting weights (the parent).
    pub base_loss: f32,
    /// Mean loss of the trained weights.
    pub loss: f32,
}

impl HeldOut {
    /// Perplexity of the parent.
    pub fn base_perplexity(&self) -> f64 {
        (self.base_loss as f64).exp()
    }

    /// Perplexity of the result.
    pub fn perplexity(&self) -> f64 {
        (self.loss as f64).exp()
    }
}

impl TrainReport {
    /// Last held-out loss.
    pub fn final_eval_loss(&self) -> Option<f32> {
        self.eval_losses.last().map(|e| e.1)
    }
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    adam_t: u64,
    report: TrainReport,
}

fn preset(name: &str) -> anyhow::Result<SynthSpec> {
    let base = SynthSpec {
        std: 0.02,
        embed_std: 0.02,
        norm_std: 0.0,
        tie_embeddings: true,
        ..SynthSpec::tiny_llama()
    };
    Ok(match name {
        "nano" => SynthSpec {
            vocab: 512,
            hidden: 64,
            intermediate: 192,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            max_position_embeddings: 256,
            ..base
        },
        "small" => SynthSpec {
            vocab: 4096,
            hidden: 192,
            intermediate: 512,
            layers: 6,
            heads: 6,
            kv_heads: 2,
            head_dim: 32,
            max_position_embeddings: 512,
            ..base
        },
        other => bail!("unknown preset `{other}` (nano, small)"),
    })
}

/// Trains a byte-level BPE tokenizer on `texts` with the project's specials.
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> anyhow::Result<String> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{
        DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
        TokenizerBuilder,
    };

    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(|e| anyhow::anyhow!(e))?
        .special_tokens(vec![("<s>", 0)])
        .build()?;
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(Some(post.into()))
    .with_decoder(Some(ByteLevelDecoder::default().into()))
    .build()
    .map_err(|e| anyhow::anyhow!(e))?;
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| anyhow::anyhow!(e))?;
    tok.to_string(false).map_err(|e| anyhow::anyhow!(e))
}

fn batch_tensors(
    examples: &[&Example],
    pad: u32,
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let len = examples
        .iter()
        .map(|e| e.tokens.len() - 1)
        .max()
        .unwrap_or(1);
    let b = examples.len();
    let (mut ids, mut tg, mut mask) = (vec![pad; b * len], vec![pad; b * len], vec![0f32; b * len]);
    for (r, e) in examples.iter().enumerate() {
        let n = e.tokens.len() - 1;
        ids[r * len..r * len + n].copy_from_slice(&e.tokens[..n]);
        tg[r * len..r * len + n].copy_from_slice(&e.tokens[1..]);
        mask[r * len..r * len + n].copy_from_slice(&e.mask);
    }
    Ok((
        Tensor::from_vec(ids, (b, len), dev)?,
        Tensor::from_vec(tg, (b, len), dev)?,
        Tensor::from_vec(mask, (b, len), dev)?,
    ))
}

fn evaluate(
    m: &TrainModel,
    eval: &[Example],
    args: &TrainArgs,
    pad: u32,
    dev: &Device,
) -> anyhow::Result<f32> {
    let (mut total, mut count) = (0f64, 0f64);
    for chunk in eval.chunks(args.batch_size).take(args.eval_batches.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let (ids, tg, mask) = batch_tensors(&refs, pad, dev)?;
        let (loss, n) = m.loss(&ids, &tg, &mask)?;
        total += loss.to_scalar::<f32>()? as f64 * n as f64;
        count += n as f64;
    }
    Ok((total / count.max(1.0)) as f32)
}

fn load_vars(path: &Path) -> anyhow::Result<Vec<(String, Var)>> {
    let mut t: Vec<(String, Tensor)> = candle_core::safetensors::load(path, &Device::Cpu)?
        .into_iter()
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t.into_iter()
        .map(|(n, t)| Ok((n, Var::from_tensor(&t.to_dtype(DType::F32)?)?)))
        .collect()
}

fn save_vars(vars: &[(String, Var)], path: &Path) -> anyhow::Result<()> {
    let map: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&map, path)?;
    Ok(())
}

/// Runs `llmops train` on the calling thread with no budget.
pub fn run(args: &TrainArgs) -> anyhow::Result<TrainReport> {
    run_with(args, &job::Control::unlimited())
}

/// The training loop, reporting to and stopped by `ctl` (see
/// [`job::TrainJob`]): cancellation is checked before every step and every
/// evaluation, and returns [`job::Cancelled`].
pub fn run_with(args: &TrainArgs, ctl: &job::Control) -> anyhow::Result<TrainReport> {
    let dev = Device::Cpu;
    let check = || -> anyhow::Result<()> {
        match ctl.shared.cancelled() {
            true => Err(job::Cancelled.into()),
            false => Ok(()),
        }
    };
    if !(0.0..1.0).contains(&args.replay_share) {
        bail!(
            "--replay-share must be in [0, 1), got {}",
            args.replay_share
        );
    }
    let corpus = Corpus::load(&args.data)?;
    let replay = match args.replay.is_empty() {
        true => None,
        false => Some(Corpus::load(&args.replay)?),
    };
    let reference = match (replay.is_some(), args.reference.is_empty()) {
        (false, false) => Some(Corpus::load(&args.reference)?),
        _ => None,
    };
    let mut start = match &args.base {
        Some(base) if base.as_os_str() == "embedded" => Start::embedded()?,
        Some(base) => Start::from_base(base)?,
        None => Start::from_scratch(args, &corpus)?,
    };
    start.vars.sort_by(|a, b| a.0.cmp(&b.0));
    let cfg = ModelConfig::from_hf_json(&start.config.to_string(), Path::new("config.json"))?;
    let sets = examples(
        &start.tokenizer,
        &cfg,
        &corpus,
        Extra {
            replay: replay.as_ref(),
            reference: reference.as_ref(),
        },
        args,
    )?;
    let (train, eval, eos) = (&sets.train, &sets.eval, sets.eos);
    let parameters: usize = start.vars.iter().map(|(_, v)| v.elem_count()).sum();
    if !args.quiet {
        let targets: usize = train
            .iter()
            .map(|e| e.mask.iter().filter(|m| **m > 0.0).count())
            .sum();
        eprintln!(
            "training {parameters} parameters on {} examples ({targets} target tokens, {} replayed), {} held out",
            train.len(),
            sets.replayed,
            eval.len()
        );
    }

    let adamw = AdamWConfig {
        weight_decay: args.weight_decay,
        ..Default::default()
    };
    let mut opt = AdamW::new(adamw, &start.vars)?;
    let (start_step, mut report) = match &args.resume {
        Some(ck) => resume(ck, &start.vars, &mut opt, &dev)?,
        None => (0, TrainReport::default()),
    };
    report.parameters = parameters;
    report.train_examples = train.len();
    report.replay_examples = sets.replayed;
    report.reference_source = (args.base.is_some() && !sets.reference.is_empty())
        .then(|| sets.reference_source.to_string());
    let model = TrainModel::new(cfg.clone(), start.vars.clone(), &dev)?;
    // The starting weights are the parent's: their held-out losses are the
    // baseline the result is compared with.
    let held_out_sets: Vec<(&str, &Vec<Example>)> =
        [("window", eval), ("reference", &sets.reference)]
            .into_iter()
            .filter(|(_, s)| !s.is_empty())
            .collect();
    let mut baseline = vec![];
    if args.base.is_some() && args.resume.is_none() {
        ctl.shared.set_phase(job::Phase::Evaluating);
        for (name, set) in &held_out_sets {
            check()?;
            baseline.push((*name, evaluate(&model, set, args, eos, &dev)?));
        }
    }
    std::fs::create_dir_all(&args.out)?;
    // Everything but the weights is known now; writing it first makes every
    // checkpoint a servable folder.
    let meta = Metadata {
        config: serde_json::to_string_pretty(&start.config)?,
        tokenizer: start.tokenizer,
        tokenizer_config: start.tokenizer_config,
    };
    meta.write(&args.out)?;

    let bar = progress_bar(args, start_step);
    let last = args.stop_after.unwrap_or(args.steps).min(args.steps);
    ctl.shared.begin(start_step, last);
    let started = Instant::now();
    let mut tokens_seen = 0usize;
    for step in start_step..last {
        check()?;
        let step_started = Instant::now();
        let lr = optim::cosine_lr(step, args.lr, args.warmup, args.steps, args.min_lr_ratio);
        let (step_loss, mut grads, tokens) = gradients(&model, train, args, step, eos, &dev)?;
        tokens_seen += tokens;
        optim::clip_grad_norm(&mut grads, args.clip)?;
        opt.step(model.vars(), &grads, lr)?;
        report.losses.push((step + 1, step_loss));
        report.steps = step + 1;
        let busy = step_started.elapsed();
        ctl.rest(busy);
        let tps = tokens_seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
        ctl.shared.stepped(step + 1, step_loss, tps);
        bar.set_position(step + 1);
        bar.set_message(format!("loss {step_loss:.3} lr {lr:.2e} {tps:.0} tok/s"));
        if ((args.eval_every > 0 && (step + 1) % args.eval_every == 0) || step + 1 == args.steps)
            && !eval.is_empty()
        {
            check()?;
            let el = evaluate(&model, eval, args, eos, &dev)?;
            report.eval_losses.push((step + 1, el));
            let line = format!(
                "step {}: train loss {step_loss:.4}, eval loss {el:.4}, perplexity {:.2}, {tps:.0} tok/s",
                step + 1,
                (el as f64).exp()
            );
            // A bar drawn to a terminal prints above itself; in a log file it is hidden.
            match (bar.is_hidden(), args.quiet) {
                (false, _) => bar.println(line),
                (true, false) => eprintln!("{line}"),
                (true, true) => {}
            }
        }
        if args.checkpoint_every > 0 && (step + 1) % args.checkpoint_every == 0 {
            checkpoint(&args.out, step + 1, model.vars(), &opt, &report, &meta)?;
        }
    }
    bar.finish_and_clear();
    check()?;
    ctl.shared.set_phase(job::Phase::Evaluating);
    if !eval.is_empty() && report.eval_losses.last().map(|e| e.0) != Some(report.steps) {
        let el = evaluate(&model, eval, args, eos, &dev)?;
        report.eval_losses.push((report.steps, el));
    }
    for ((name, set), (_, base_loss)) in held_out_sets.iter().zip(&baseline) {
        check()?;
        let loss = match (*name, report.eval_losses.last()) {
            ("window", Some(&(s, l))) if s == report.steps => l,
            _ => evaluate(&model, set, args, eos, &dev)?,
        };
        let evaluated = &set[..set.len().min(args.batch_size * args.eval_batches.max(1))];
        report.held_out.push(HeldOut {
            name: name.to_string(),
            examples: evaluated.len(),
            tokens: evaluated
                .iter()
                .map(|e| e.mask.iter().filter(|m| **m > 0.0).count())
                .sum(),
            base_loss: *base_loss,
            loss,
        });
    }
    report.tokens_per_second = tokens_seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
    if args.stop_after.is_some_and(|s| s < args.steps) {
        checkpoint(&args.out, report.steps, model.vars(), &opt, &report, &meta)?;
    }
    check()?;
    ctl.shared.set_phase(job::Phase::Writing);
    write_servable(args, &model, &cfg, &corpus, &report, &meta.tokenizer)?;
    Ok(report)
}

/// The tokenized data: training examples (replay mixed in), the held-out
/// window, the reference set and where it came from, and the
/// end-of-sequence id (also the padding).
struct Sets {
    train: Vec<Example>,
    eval: Vec<Example>,
    reference: Vec<Example>,
    reference_source: &'static str,
    replayed: usize,
    eos: u32,
}

/// The data beside the training corpus: replay data (trained on in part,
/// its held-out split the reference set), or the base's own data (for the
/// reference set only).
struct Extra<'a> {
    replay: Option<&'a Corpus>,
    reference: Option<&'a Corpus>,
}

/// Tokenizes the corpus into training examples and splits off the held-out
/// ones; with replay data, holds out its reference set and mixes in enough
/// of the rest that it makes `replay_share` of the training examples.
/// Without replay data the reference set is held out of the base's own
/// data, or else it is the held-out window's prompts: never text the base
/// wrote, so a candidate cannot pass by agreeing with its parent.
fn examples(
    tokenizer_json: &str,
    cfg: &ModelConfig,
    corpus: &Corpus,
    extra: Extra<'_>,
    args: &TrainArgs,
) -> anyhow::Result<Sets> {
    let bos = cfg.bos_token_id.context("config has no bos_token_id")?;
    let eos = *cfg
        .eos_token_ids
        .first()
        .context("config has no eos_token_id")?;
    let tokenizer = Tokenizer::from_bytes(
        tokenizer_json.as_bytes(),
        "tokenizer.json",
        Some(bos),
        vec![eos],
    )?;
    let sp = Specials { bos, eos };
    let all = data::examples(corpus, &tokenizer, sp, args.seq_len)?;
    let (mut train, eval) = data::split(all, args.eval_fraction, args.seed);
    if train.is_empty() {
        bail!("no training examples");
    }
    let fraction = args.replay_eval_fraction.unwrap_or(args.eval_fraction);
    let mut replayed = 0;
    let (reference, reference_source) = if let Some(replay) = extra.replay {
        let all = data::examples(replay, &tokenizer, sp, args.seq_len)?;
        let (pool, held) = data::split(all, fraction, args.seed);
        let want =
            (train.len() as f64 * args.replay_share / (1.0 - args.replay_share)).round() as usize;
        if want > 0 && pool.is_empty() {
            bail!("the replay data has no examples to train on");
        }
        let picks = data::batch_indices(pool.len(), want, 0, args.seed ^ 0x007e_91a7);
        replayed = picks.len();
        train.extend(picks.into_iter().map(|i| pool[i].clone()));
        (held, "replay")
    } else if let Some(parent) = extra.reference {
        let all = data::examples(parent, &tokenizer, sp, args.seq_len)?;
        (data::split(all, fraction, args.seed).1, "parent_data")
    } else {
        let prompts = eval.iter().filter_map(data::prompt_only).collect();
        (prompts, "captured_prompts")
    };
    Ok(Sets {
        train,
        eval,
        reference,
        reference_source,
        replayed,
        eos,
    })
}

/// The servable folder's weights, model cards (README.md for people,
/// `model_card.json` for machines) and report (the metadata is written
/// before training starts).
fn write_servable(
    args: &TrainArgs,
    model: &TrainModel,
    cfg: &ModelConfig,
    corpus: &Corpus,
    report: &TrainReport,
    tokenizer_json: &str,
) -> anyhow::Result<()> {
    save_vars(model.vars(), &args.out.join("model.safetensors"))?;
    std::fs::write(
        args.out.join("README.md"),
        model_card(args, cfg, corpus, report),
    )?;
    std::fs::write(
        args.out.join(CARD_FILE),
        serde_json::to_string_pretty(&card_json(args, corpus, report, tokenizer_json))?,
    )?;
    std::fs::write(
        args.out.join("train_report.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    Ok(())
}

/// The machine-readable model card's file name, beside the weights.
pub const CARD_FILE: &str = "model_card.json";

fn absolute(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .map(|p| {
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string()
        })
        .collect()
}

/// What `llmops train` knows about its result: the data (absolute paths,
/// so a fine-tune can replay it), the settings that decide the held-out
/// split, the tokenizer's digest, the losses. A retrain adds its parent,
/// window and gate to it.
fn card_json(
    args: &TrainArgs,
    corpus: &Corpus,
    r: &TrainReport,
    tokenizer_json: &str,
) -> serde_json::Value {
    use sha2::Digest;
    serde_json::json!({
        "created_at": crate::registry::now_rfc3339(),
        "trainer": "llmops train",
        "base": args.base.as_ref().map(|b| b.display().to_string()),
        "data": {
            "files": absolute(&args.data),
            "records": corpus.records.len(),
            "bytes": corpus.bytes,
            "eval_fraction": args.eval_fraction,
            "seq_len": args.seq_len,
            "seed": args.seed,
        },
        "replay": (!args.replay.is_empty()).then(|| serde_json::json!({
            "files": absolute(&args.replay),
            "share": args.replay_share,
            "eval_fraction": args.replay_eval_fraction.unwrap_or(args.eval_fraction),
            "examples": r.replay_examples,
        })),
        "tokenizer": {
            "sha256": hex::encode(sha2::Sha256::digest(tokenizer_json.as_bytes())),
        },
        "training": {
            "steps": r.steps,
            "train_examples": r.train_examples,
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "lr": args.lr,
            "warmup": args.warmup,
            "weight_decay": args.weight_decay,
            "tokens_per_second": r.tokens_per_second,
            "parameters": r.parameters,
        },
        "losses": {
            "train_final": r.losses.last().map(|l| l.1),
            "held_out_final": r.final_eval_loss(),
            "train": r.losses,
            "held_out": r.eval_losses,
        },
        "held_out": r.held_out,
    })
}

/// What training starts from: the model's shape, its tokenizer and its
/// initial weights.
struct Start {
    /// `config.json`.
    config: serde_json::Value,
    /// `tokenizer.json`.
    tokenizer: String,
    /// `tokenizer_config.json`.
    tokenizer_config: String,
    vars: Vec<(String, Var)>,
}

impl Start {
    /// A Hugging Face Llama-family folder to fine-tune.
    fn from_base(base: &Path) -> anyhow::Result<Self> {
        if base.is_file() {
            bail!(
                "{}: fine-tuning starts from a Hugging Face folder (safetensors) or the embedded model, not a single file such as a GGUF",
                base.display()
            );
        }
        let cfg_text =
            std::fs::read_to_string(base.join("config.json")).context("base config.json")?;
        let cfg = ModelConfig::from_hf_json(&cfg_text, &base.join("config.json"))?;
        if cfg.arch != Arch::Llama {
            bail!("fine-tuning supports Llama-family models");
        }
        let tokenizer =
            std::fs::read_to_string(base.join("tokenizer.json")).context("base tokenizer.json")?;
        let tokenizer_config = std::fs::read_to_string(base.join("tokenizer_config.json"))
            .unwrap_or_else(|_| "{}".into());
        let mut vars = vec![];
        for f in crate::engine::safetensors_files(base)? {
            vars.extend(load_vars(&f)?);
        }
        Ok(Self {
            config: serde_json::from_str(&cfg_text)?,
            tokenizer,
            tokenizer_config,
            vars,
        })
    }

    /// The model compiled into the binary (`--base embedded`).
    fn embedded() -> anyhow::Result<Self> {
        let f = crate::engine::embedded::files()
            .context("this build has no embedded model to fine-tune")?;
        let mut vars: Vec<(String, Var)> =
            candle_core::safetensors::load_buffer(f.weights, &Device::Cpu)?
                .into_iter()
                .map(|(n, t)| Ok((n, Var::from_tensor(&t.to_dtype(DType::F32)?)?)))
                .collect::<candle_core::Result<_>>()?;
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self {
            config: serde_json::from_str(f.config)?,
            tokenizer: String::from_utf8(f.tokenizer.to_vec())?,
            tokenizer_config: f.tokenizer_config.to_string(),
            vars,
        })
    }

    /// The preset's shape with the flags' overrides, seeded weights, and a
    /// BPE tokenizer trained on the corpus unless one is given.
    fn from_scratch(args: &TrainArgs, corpus: &Corpus) -> anyhow::Result<Self> {
        let mut spec = preset(&args.preset)?;
        spec.layers = args.layers.unwrap_or(spec.layers);
        spec.hidden = args.hidden.unwrap_or(spec.hidden);
        spec.heads = args.heads.unwrap_or(spec.heads);
        spec.kv_heads = args.kv_heads.unwrap_or(spec.kv_heads);
        spec.head_dim = spec.hidden / spec.heads;
        spec.intermediate = args.intermediate.unwrap_or(spec.intermediate);
        spec.max_position_embeddings = args.context.unwrap_or(spec.max_position_embeddings);
        spec.vocab = args.vocab_size.unwrap_or(spec.vocab);
        spec.seed = args.seed;
        let tokenizer = match &args.tokenizer {
            Some(p) => std::fs::read_to_string(p).with_context(|| p.display().to_string())?,
            None => train_tokenizer(&corpus.texts(), spec.vocab)?,
        };
        let probe = tokenizers::Tokenizer::from_bytes(tokenizer.as_bytes())
            .map_err(|e| anyhow::anyhow!(e))?;
        spec.vocab = spec.vocab.max(probe.get_vocab_size(true));
        spec.bos_token_id = probe.token_to_id("<s>").context("tokenizer has no <s>")?;
        spec.eos_token_id = probe.token_to_id("</s>").context("tokenizer has no </s>")?;
        let vars = spec
            .tensors()?
            .into_iter()
            .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let tokenizer_config = serde_json::json!({
            "bos_token": "<s>",
            "eos_token": "</s>",
            "add_bos_token": true,
            "chat_template": DEFAULT_CHAT_TEMPLATE,
        })
        .to_string();
        Ok(Self {
            config: spec.config_json(),
            tokenizer,
            tokenizer_config,
            vars,
        })
    }
}

/// Loads a checkpoint's weights into `vars` and its moments into `opt`;
/// returns the step to continue from and the report so far.
fn resume(
    ck: &Path,
    vars: &[(String, Var)],
    opt: &mut AdamW,
    dev: &Device,
) -> anyhow::Result<(u64, TrainReport)> {
    let state: CheckpointState = serde_json::from_str(
        &std::fs::read_to_string(ck.join("state.json")).context("checkpoint state.json")?,
    )?;
    let saved: HashMap<String, Var> = load_vars(&ck.join("model.safetensors"))?
        .into_iter()
        .collect();
    for (n, v) in vars {
        let s = saved
            .get(n)
            .with_context(|| format!("checkpoint lacks {n}"))?;
        v.set(s.as_tensor())?;
    }
    let moments = candle_core::safetensors::load(ck.join("optimizer.safetensors"), dev)?;
    let moment = |kind: &str, n: &str| {
        moments
            .get(&format!("{kind}.{n}"))
            .cloned()
            .context("checkpoint moments")
    };
    for (n, (m, v)) in opt.moments.iter_mut() {
        (*m, *v) = (moment("m", n)?, moment("v", n)?);
    }
    opt.t = state.adam_t;
    Ok((state.step, state.report))
}

/// One optimizer step's gradients, summed over its micro-batches: returns
/// the step's mean loss, the gradients by name, and the target tokens seen.
fn gradients(
    model: &TrainModel,
    train: &[Example],
    args: &TrainArgs,
    step: u64,
    pad: u32,
    dev: &Device,
) -> anyhow::Result<(f32, HashMap<String, Tensor>, usize)> {
    let accum = args.grad_accum.max(1);
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    let (mut step_loss, mut tokens) = (0f32, 0usize);
    for micro in 0..accum {
        let ms = step * accum as u64 + micro as u64;
        let idx = data::batch_indices(train.len(), args.batch_size, ms, args.seed);
        let batch: Vec<&Example> = idx.iter().map(|&i| &train[i]).collect();
        let (ids, tg, mask) = batch_tensors(&batch, pad, dev)?;
        let (loss, n) = model.loss(&ids, &tg, &mask)?;
        tokens += n as usize;
        step_loss += loss.to_scalar::<f32>()? / accum as f32;
        let g = (loss / accum as f64)?.backward()?;
        for (name, var) in model.vars() {
            if let Some(gv) = g.get(var.as_tensor()) {
                let acc = match grads.remove(name) {
                    Some(prev) => (prev + gv)?,
                    None => gv.clone(),
                };
                grads.insert(name.clone(), acc);
            }
        }
    }
    Ok((step_loss, grads, tokens))
}

/// A progress bar on a terminal, hidden when quiet.
fn progress_bar(args: &TrainArgs, start_step: u64) -> indicatif::ProgressBar {
    if args.quiet {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(args.steps);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_position(start_step);
    b
}

/// The non-weight files of a model folder.
struct Metadata {
    config: String,
    tokenizer: String,
    tokenizer_config: String,
}

impl Metadata {
    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::write(dir.join("config.json"), &self.config)?;
        std::fs::write(dir.join("tokenizer.json"), &self.tokenizer)?;
        std::fs::write(dir.join("tokenizer_config.json"), &self.tokenizer_config)?;
        Ok(())
    }
}

fn checkpoint(
    out: &Path,
    step: u64,
    vars: &[(String, Var)],
    opt: &AdamW,
    report: &TrainReport,
    meta: &Metadata,
) -> anyhow::Result<()> {
    let dir = out.join("checkpoints").join(format!("step-{step}"));
    std::fs::create_dir_all(&dir)?;
    meta.write(&dir)?;
    save_vars(vars, &dir.join("model.safetensors"))?;
    let mut m: HashMap<String, Tensor> = HashMap::new();
    for (n, (a, b)) in &opt.moments {
        m.insert(format!("m.{n}"), a.clone());
        m.insert(format!("v.{n}"), b.clone());
    }
    candle_core::safetensors::save(&m, dir.join("optimizer.safetensors"))?;
    let state = CheckpointState {
        step,
        adam_t: opt.t,
        report: report.clone(),
    };
    std::fs::write(
        dir.join("state.json"),
        serde_json::to_string_pretty(&state)?,
    )?;
    Ok(())
}

/// One data source named in a corpus manifest (from `scripts/fetch-corpus`).
struct Source {
    name: String,
    license: String,
}

/// Reads `manifest.json` beside or inside the data paths.
fn manifest_sources(data: &[PathBuf]) -> Vec<Source> {
    let text_of = |v: Option<&serde_json::Value>| -> String {
        match v {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Object(o)) => o
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k}: {}",
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            Some(other) => other.to_string(),
            None => String::new(),
        }
    };
    for d in data {
        for c in [d.join("manifest.json"), d.with_file_name("manifest.json")] {
            let Ok(text) = std::fs::read_to_string(&c) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let Some(files) = v.get("files").and_then(|f| f.as_array()) else {
                continue;
            };
            return files
                .iter()
                .map(|f| {
                    let src = f.get("source");
                    let name = match src {
                        Some(s) => format!(
                            "{} `{}` {} ({})",
                            s.get("registry").and_then(|x| x.as_str()).unwrap_or(""),
                            s.get("package").and_then(|x| x.as_str()).unwrap_or(""),
                            s.get("version").and_then(|x| x.as_str()).unwrap_or(""),
                            f.get("file").and_then(|x| x.as_str()).unwrap_or("")
                        ),
                        None => f
                            .get("file")
                            .and_then(|x| x.as_str())
                            .unwrap_or("")
                            .to_string(),
                    };
                    Source {
                        name,
                        license: text_of(f.get("license")),
                    }
                })
                .collect();
        }
    }
    vec![]
}

fn model_card(args: &TrainArgs, cfg: &ModelConfig, corpus: &Corpus, r: &TrainReport) -> String {
    let mut s = String::new();
    let final_eval = r.final_eval_loss();
    s.push_str("# Model card\n\n");
    s.push_str(&format!(
        "A Llama-architecture language model trained by `llmops train`{}.\n\n",
        if args.base.is_some() {
            " (fine-tuned)"
        } else {
            " from scratch"
        }
    ));
    s.push_str("## Architecture\n\n");
    s.push_str(&format!(
        "- parameters: {}\n- layers: {}, width: {}, heads: {} (key/value heads: {}), MLP width: {}\n- vocabulary: {}, context: {} tokens, tied embeddings: {}\n\n",
        r.parameters, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
        cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings, cfg.tie_word_embeddings
    ));
    s.push_str("## Data\n\n");
    let sources = manifest_sources(&args.data);
    if sources.is_empty() {
        for f in &corpus.files {
            s.push_str(&format!("- `{}`\n", f.display()));
        }
    } else {
        s.push_str("| source | license |\n|---|---|\n");
        for src in &sources {
            s.push_str(&format!("| {} | {} |\n", src.name, src.license));
        }
    }
    s.push_str(&format!(
        "\n{} bytes of text in {} files.\n\n",
        corpus.bytes,
        corpus.files.len()
    ));
    s.push_str("## Training\n\n");
    s.push_str(&format!(
        "- steps: {}, batch: {} × {} tokens, gradient accumulation: {}\n- AdamW, peak learning rate {}, warm-up {} steps, cosine decay to {}×, weight decay {}, clipping {}\n- seed: {}\n- throughput: {:.0} tokens/s on the CPU\n",
        r.steps, args.batch_size, args.seq_len, args.grad_accum, args.lr, args.warmup,
        args.min_lr_ratio, args.weight_decay, args.clip, args.seed, r.tokens_per_second
    ));
    if let Some(l) = r.losses.last() {
        s.push_str(&format!("- final training loss: {:.4}\n", l.1));
    }
    if let Some(e) = final_eval {
        s.push_str(&format!(
            "- final held-out loss: {:.4} (perplexity {:.2})\n",
            e,
            (e as f64).exp()
        ));
    }
    let cmd: Vec<String> = std::env::args().collect();
    s.push_str(&format!("\n## Reproduce\n\n```\n{}\n```\n", cmd.join(" ")));
    s
}
