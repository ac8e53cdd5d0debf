//! Training data: plain text files and folders, or JSONL with `text`,
//! `prompt`/`completion` or chat `messages`, turned into token windows with a
//! loss mask (completions and assistant turns only, for the latter two).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::engine::{Message, Tokenizer};

/// One unit of training data before tokenization.
#[derive(Debug, Clone)]
pub enum Record {
    /// Free text: every token is a target.
    Text(String),
    /// Loss on the completion only.
    PromptCompletion {
        /// Context.
        prompt: String,
        /// Target.
        completion: String,
    },
    /// Loss on assistant turns only.
    Chat(Vec<Message>),
}

/// Everything read from the data paths.
#[derive(Debug, Default)]
pub struct Corpus {
    /// Records in file order.
    pub records: Vec<Record>,
    /// Files read.
    pub files: Vec<PathBuf>,
    /// Bytes of text.
    pub bytes: usize,
}

impl Corpus {
    /// Reads files and folders (recursively, sorted, hidden files skipped).
    pub fn load(paths: &[PathBuf]) -> anyhow::Result<Self> {
        let mut files = vec![];
        for p in paths {
            collect(p, &mut files)?;
        }
        if files.is_empty() {
            bail!("no data files found in {paths:?}");
        }
        let mut corpus = Corpus::default();
        for f in &files {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?;
            corpus.bytes += text.len();
            if f.extension().and_then(|e| e.to_str()) == Some("jsonl") {
                for (i, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_str(line)
                        .with_context(|| format!("{}:{}: not JSON", f.display(), i + 1))?;
                    corpus.records.push(
                        parse_record(&v).with_context(|| format!("{}:{}", f.display(), i + 1))?,
                    );
                }
            } else {
                corpus.records.push(Record::Text(text));
            }
        }
        corpus.files = files;
        Ok(corpus)
    }

    /// All text, for training a tokenizer.
    pub fn texts(&self) -> Vec<String> {
        let mut out = vec![];
        for r in &self.records {
            match r {
                Record::Text(t) => out.push(t.clone()),
                Record::PromptCompletion { prompt, completion } => {
                    out.push(format!("{prompt}{completion}"))
                }
                Record::Chat(ms) => out.extend(ms.iter().map(|m| m.content.clone())),
            }
        }
        out
    }
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| p.display().to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|e| {
                !e.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
            })
            .collect();
        entries.sort();
        for e in entries {
            collect(&e, out)?;
        }
    } else if let Ok(meta) = std::fs::metadata(p) {
        // Reading a FIFO blocks and `/dev/zero` never ends: regular files
        // only, at every level, and none past the size a data file may have.
        if !meta.is_file() {
            bail!(
                "{}: not a regular file (devices, FIFOs and sockets are refused)",
                p.display()
            );
        }
        if crate::registry::paths::is_data_file_name(p) {
            let max = crate::registry::paths::MAX_DATA_FILE_BYTES;
            if meta.len() > max {
                bail!(
                    "{}: {} bytes; a data file may hold at most {max}",
                    p.display(),
                    meta.len()
                );
            }
            out.push(p.to_path_buf());
        }
    } else {
        bail!("{}: no such file or directory", p.display());
    }
    Ok(())
}

fn parse_record(v: &serde_json::Value) -> anyhow::Result<Record> {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    if let Some(t) = s("text") {
        return Ok(Record::Text(t));
    }
    if let (Some(prompt), Some(completion)) = (s("prompt"), s("completion")) {
        return Ok(Record::PromptCompletion { prompt, completion });
    }
    if let Some(ms) = v.get("messages").and_then(|m| m.as_array()) {
        let mut out = vec![];
        for m in ms {
            let role = m
                .get("role")
                .and_then(|r| r.as_str())
                .context("message without role")?;
            let content = m
                .get("content")
                .and_then(|c| c.as_str())
                .context("message without string content")?;
            out.push(Message {
                role: role.into(),
                content: content.into(),
                ..Default::default()
            });
        }
        return Ok(Record::Chat(out));
    }
    bail!("expected `text`, `prompt`+`completion` or `messages`")
}

/// A tokenized example: `tokens[i + 1]` is the target at position `i`, and
/// `mask[i]` says whether it counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Tokens, starting with BOS.
    pub tokens: Vec<u32>,
    /// One per target (len − 1).
    pub mask: Vec<f32>,
}

/// Special ids the examples use.
#[derive(Debug, Clone, Copy)]
pub struct Specials {
    /// Beginning of sequence.
    pub bos: u32,
    /// End of sequence / turn.
    pub eos: u32,
}

/// Turns records into examples of at most `seq_len + 1` tokens. Free text is
/// concatenated (documents separated by EOS) and cut into windows that each
/// start with BOS.
pub fn examples(
    corpus: &Corpus,
    tok: &Tokenizer,
    sp: Specials,
    seq_len: usize,
) -> anyhow::Result<Vec<Example>> {
    let mut out = vec![];
    let mut stream: Vec<u32> = vec![];
    let enc = |t: &str| tok.encode(t, false).map_err(|e| anyhow::anyhow!("{e}"));
    for r in &corpus.records {
        match r {
            Record::Text(t) => {
                stream.extend(enc(t)?);
                stream.push(sp.eos);
            }
            Record::PromptCompletion { prompt, completion } => {
                let mut tokens = vec![sp.bos];
                tokens.extend(enc(prompt)?);
                let cut = tokens.len();
                tokens.extend(enc(completion)?);
                tokens.push(sp.eos);
                let mask = (1..tokens.len())
                    .map(|i| if i >= cut { 1.0 } else { 0.0 })
                    .collect();
                out.push(truncate(Example { tokens, mask }, seq_len));
            }
            Record::Chat(ms) => {
                let mut tokens = vec![sp.bos];
                let mut counts = vec![];
                for m in ms {
                    let head = enc(&format!("<|{}|>\n", m.role))?;
                    counts.extend(std::iter::repeat_n(0.0, head.len()));
                    tokens.extend(head);
                    let mut body = enc(&m.content)?;
                    body.push(sp.eos);
                    body.extend(enc("\n")?);
                    let w = if m.role == "assistant" { 1.0 } else { 0.0 };
                    counts.extend(std::iter::repeat_n(w, body.len()));
                    tokens.extend(body);
                }
                // counts[i] belongs to tokens[i + 1].
                out.push(truncate(
                    Example {
                        tokens,
                        mask: counts,
                    },
                    seq_len,
                ));
            }
        }
    }
    for chunk in stream.chunks(seq_len) {
        if chunk.len() < 2 {
            continue;
        }
        let mut tokens = Vec::with_capacity(chunk.len() + 1);
        tokens.push(sp.bos);
        tokens.extend_from_slice(chunk);
        let mask = vec![1.0; tokens.len() - 1];
        out.push(Example { tokens, mask });
    }
    Ok(out)
}

fn truncate(mut e: Example, seq_len: usize) -> Example {
    e.tokens.truncate(seq_len + 1);
    e.mask.truncate(e.tokens.len() - 1);
    e
}

/// The example with its loss moved to what the client wrote: the prompt of
/// a prompt/completion pair, the non-assistant turns of a chat (role
/// headers included). `None` for free text (all of it is a target) and for
/// an example with no prompt tokens.
pub fn prompt_only(e: &Example) -> Option<Example> {
    let mask: Vec<f32> = e
        .mask
        .iter()
        .map(|m| if *m > 0.0 { 0.0 } else { 1.0 })
        .collect();
    let last = mask.iter().rposition(|m| *m > 0.0)?;
    // The example ends at the last prompt token: nothing after it counts.
    Some(Example {
        tokens: e.tokens[..last + 2].to_vec(),
        mask: mask[..=last].to_vec(),
    })
}

/// Splits examples into training and held-out sets, deterministically.
pub fn split(
    examples: Vec<Example>,
    eval_fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let mut idx: Vec<usize> = (0..examples.len()).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_e7a1));
    let n_eval = ((examples.len() as f64 * eval_fraction).round() as usize)
        .min(examples.len().saturating_sub(1));
    let eval_set: std::collections::HashSet<usize> = idx[..n_eval].iter().copied().collect();
    let (mut train, mut eval) = (vec![], vec![]);
    for (i, e) in examples.into_iter().enumerate() {
        if eval_set.contains(&i) {
            eval.push(e);
        } else {
            train.push(e);
        }
    }
    (train, eval)
}

/// Indices of the micro-batch at `micro_step`: epochs are seeded shuffles, so
/// the order is a pure function of the seed and the step (exact resume).
pub fn batch_indices(n: usize, batch: usize, micro_step: u64, seed: u64) -> Vec<usize> {
    let per_epoch = (n / batch.max(1)).max(1) as u64;
    let epoch = micro_step / per_epoch;
    let within = (micro_step % per_epoch) as usize;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(
        seed.wrapping_add(epoch.wrapping_mul(0x9e37_79b9)),
    ));
    order
        .into_iter()
        .cycle()
        .skip(within * batch)
        .take(batch)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_only_counts_what_the_client_wrote_and_nothing_after_it() {
        // BOS, 3 prompt tokens, 2 completion tokens and EOS.
        let pair = Example {
            tokens: vec![1, 10, 11, 12, 20, 21, 2],
            mask: vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0],
        };
        let p = prompt_only(&pair).unwrap();
        // Targets 10, 11 and 12 count; the completion is cut off.
        assert_eq!(p.tokens, [1, 10, 11, 12]);
        assert_eq!(p.mask, [1.0, 1.0, 1.0]);
        // Free text is all target: no prompt to score.
        let text = Example {
            tokens: vec![1, 5, 6],
            mask: vec![1.0, 1.0],
        };
        assert!(prompt_only(&text).is_none());
    }
}
