//! Text ⇄ tokens: the model's tokenizer (from `tokenizer.json` or rebuilt
//! from GGUF metadata), the streaming detokenizer, and stop-string matching.

use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::config::GgufMeta;
use super::grammar::GrammarEnv;
use super::{Error, Result};

/// The model's tokenizer plus the special ids generation needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer with special-token strings read as plain text,
    /// for text a user wrote (chat message content). Made on first use:
    /// most conversations never need it, and a large vocabulary costs
    /// memory twice.
    plain: std::sync::Arc<std::sync::OnceLock<tokenizers::Tokenizer>>,
    /// The text of every special added token (`<start_of_turn>`, …).
    specials: Vec<String>,
    /// Bytes one token can cover at most (its text's characters × 4, as
    /// UTF-8 allows): text longer than this × N holds more than N tokens.
    max_token_bytes: usize,
    bos: Option<u32>,
    eos: Vec<u32>,
    /// The constrained-decoding environment, built on first use and shared
    /// by every clone (one per engine).
    grammar: GrammarCache,
}

type GrammarCache =
    std::sync::Arc<std::sync::OnceLock<std::result::Result<std::sync::Arc<GrammarEnv>, String>>>;

impl Tokenizer {
    /// Wraps a loaded `tokenizers` tokenizer.
    pub fn new(inner: tokenizers::Tokenizer, bos: Option<u32>, eos: Vec<u32>) -> Self {
        let mut specials: Vec<String> = inner
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content)
            .collect();
        specials.sort();
        let max_token_bytes = inner
            .get_vocab(true)
            .keys()
            .map(|k| k.chars().count() * 4)
            .max()
            .unwrap_or(4)
            .max(4);
        Self {
            inner,
            plain: Default::default(),
            specials,
            max_token_bytes,
            bos,
            eos,
            grammar: Default::default(),
        }
    }

    /// A digest of what the ids mean: every token's text by id, the special
    /// tokens, BOS and EOS. Two models compare token by token (a shadow, a
    /// canary of the same prompts) only when theirs are equal: Llama 2 and
    /// Mistral share a vocabulary size and an EOS id, not their tokens.
    /// Computed on demand (an admin action, not a request).
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut vocab: Vec<(u32, String)> = self
            .inner
            .get_vocab(true)
            .into_iter()
            .map(|(t, id)| (id, t))
            .collect();
        vocab.sort_unstable();
        let mut h = Sha256::new();
        for (id, t) in &vocab {
            h.update(id.to_le_bytes());
            h.update(t.as_bytes());
            h.update([0u8]);
        }
        h.update(b"specials");
        for s in &self.specials {
            h.update(s.as_bytes());
            h.update([0u8]);
        }
        h.update(b"bos");
        h.update(self.bos.unwrap_or(u32::MAX).to_le_bytes());
        h.update(b"eos");
        for e in &self.eos {
            h.update(e.to_le_bytes());
        }
        hex::encode(h.finalize())
    }

    /// The constrained-decoding environment for this vocabulary and a model
    /// with `rows` logits per row: built once (the first structured request
    /// pays for it, on the blocking pool), then shared.
    pub fn grammar_env(
        &self,
        rows: usize,
    ) -> std::result::Result<std::sync::Arc<GrammarEnv>, String> {
        self.grammar
            .get_or_init(|| GrammarEnv::new(self, rows).map(std::sync::Arc::new))
            .clone()
    }

    /// A lower bound on the tokens `bytes` bytes of text encode to, without
    /// encoding them (0 when the tokenizer normalizes, which may drop text).
    pub fn min_tokens_for(&self, bytes: usize) -> usize {
        if self.inner.get_normalizer().is_some() {
            return 0;
        }
        bytes / self.max_token_bytes
    }

    /// Encodes text a user wrote: special-token strings in it are plain
    /// text, never control tokens, and nothing is added.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let plain = self.plain.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            t
        });
        let enc = plain
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The first special-token string found in `text`, if any.
    pub fn special_in<'a>(&'a self, text: &str) -> Option<&'a str> {
        self.specials
            .iter()
            .find(|s| text.contains(s.as_str()))
            .map(String::as_str)
    }

    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path, bos: Option<u32>, eos: Vec<u32>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Load {
            path: path.to_path_buf(),
            message: format!("cannot read tokenizer: {e}"),
        })?;
        Ok(Self::new(inner, bos, eos))
    }

    /// Loads a tokenizer serialised in memory.
    pub fn from_bytes(bytes: &[u8], name: &str, bos: Option<u32>, eos: Vec<u32>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| Error::Load {
            path: name.into(),
            message: format!("cannot read tokenizer: {e}"),
        })?;
        Ok(Self::new(inner, bos, eos))
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Encodes text; `add_special` adds what the tokenizer's post-processor
    /// adds (BOS for Llama and Gemma). Special tokens written in the text are
    /// recognised.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The text of one token as the vocabulary spells it.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Beginning-of-sequence id.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// Ids that end generation.
    pub fn eos(&self) -> &[u32] {
        &self.eos
    }

    /// Adds an end-of-generation id (e.g. Gemma's `<end_of_turn>`).
    pub fn add_eos(&mut self, id: u32) {
        if !self.eos.contains(&id) {
            self.eos.push(id);
        }
    }

    /// Builds the tokenizer described by GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(content: &gguf_file::Content, source: &Path) -> Result<Self> {
        let md = GgufMeta {
            metadata: &content.metadata,
            source,
        };
        let model = md.string("tokenizer.ggml.model")?;
        let tokens: Vec<String> = string_array(&md, "tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|_| md.missing("tokenizer.ggml.token_type"))?
                .iter()
                .map(|x| x.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let bos = md
            .opt_usize("tokenizer.ggml.bos_token_id")?
            .map(|v| v as u32);
        let mut eos: Vec<u32> = md
            .opt_usize("tokenizer.ggml.eos_token_id")?
            .map(|v| vec![v as u32])
            .unwrap_or_default();
        if let Some(eot) = md.opt_usize("tokenizer.ggml.eot_token_id")? {
            eos.push(eot as u32);
        }
        let add_bos = md
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(bos.is_some());
        let arch = md.opt_string("general.architecture")?.unwrap_or_default();

        let mut vocab = tokenizers::models::bpe::Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            vocab.entry(t.clone()).or_insert(i as u32);
        }
        let mut tok = match model.as_str() {
            "llama" | "gemma" => {
                let scores: Vec<f32> = match content.metadata.get("tokenizer.ggml.scores") {
                    Some(v) => v
                        .to_vec()
                        .map_err(|_| md.missing("tokenizer.ggml.scores"))?
                        .iter()
                        .map(|x| x.to_f32().unwrap_or(0.0))
                        .collect(),
                    None => (0..tokens.len()).map(|i| -(i as f32)).collect(),
                };
                let merges = merges_from_scores(&tokens, &scores, &vocab);
                let unk = md
                    .opt_usize("tokenizer.ggml.unknown_token_id")?
                    .and_then(|i| tokens.get(i).cloned());
                let mut bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .byte_fallback(true)
                    .fuse_unk(true);
                if let Some(unk) = unk {
                    bpe = bpe.unk_token(unk);
                }
                let bpe = bpe.build().map_err(|e| Error::Tokenizer(e.to_string()))?;
                let mut tok = tokenizers::Tokenizer::new(bpe);
                let space_prefix = md
                    .opt_bool("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(arch != "gemma3" && arch != "gemma" && arch != "gemma2");
                let replace =
                    Replace::new(" ", "▁").map_err(|e| Error::Tokenizer(e.to_string()))?;
                let norm: NormalizerWrapper = if space_prefix {
                    NormSequence::new(vec![Prepend::new("▁".into()).into(), replace.into()]).into()
                } else {
                    replace.into()
                };
                tok.with_normalizer(Some(norm))
                    .map_err(|e| Error::Tokenizer(e.to_string()))?;
                let mut decoders: Vec<DecoderWrapper> = vec![
                    tokenizers::decoders::DecoderWrapper::Replace(
                        Replace::new("▁", " ").map_err(|e| Error::Tokenizer(e.to_string()))?,
                    ),
                    ByteFallback::new().into(),
                    Fuse::new().into(),
                ];
                if space_prefix {
                    decoders.push(Strip::new(' ', 1, 0).into());
                }
                tok.with_decoder(Some(DecoderSequence::new(decoders)));
                tok
            }
            "gpt2" => {
                // A merge whose parts or result are not tokens can never fire
                // (llama.cpp skips it too); `tokenizers` would refuse it.
                let merges: Vec<(String, String)> = string_array(&md, "tokenizer.ggml.merges")?
                    .into_iter()
                    .filter_map(|m| {
                        let (a, b) = m.split_once(' ')?;
                        let ok = vocab.contains_key(a)
                            && vocab.contains_key(b)
                            && vocab.contains_key(&format!("{a}{b}"));
                        ok.then(|| (a.to_string(), b.to_string()))
                    })
                    .collect();
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .build()
                    .map_err(|e| Error::Tokenizer(e.to_string()))?;
                let mut tok = tokenizers::Tokenizer::new(bpe);
                let pre = md.opt_string("tokenizer.ggml.pre")?.unwrap_or_default();
                let regex = match pre.as_str() {
                    "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => Some(LLAMA3_SPLIT),
                    "qwen2" => Some(QWEN2_SPLIT),
                    _ => None,
                };
                match regex {
                    Some(r) => {
                        let split = Split::new(
                            SplitPattern::Regex(r.into()),
                            SplitDelimiterBehavior::Isolated,
                            false,
                        )
                        .map_err(|e| Error::Tokenizer(e.to_string()))?;
                        tok.with_pre_tokenizer(Some(PreSequence::new(vec![
                            split.into(),
                            ByteLevel::new(false, true, false).into(),
                        ])));
                    }
                    None => {
                        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
                    }
                }
                tok.with_decoder(Some(ByteLevel::default()));
                tok
            }
            other => {
                return Err(Error::Config {
                    path: source.to_path_buf(),
                    field: "tokenizer.ggml.model".into(),
                    message: format!(
                        "unsupported tokenizer model `{other}` (supported: llama, gemma, gpt2)"
                    ),
                });
            }
        };
        // Control tokens (3) are special; user-defined ones (4) are matched whole
        // in text but kept in decoded output.
        let mut special = vec![];
        let mut user = vec![];
        for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
            match ty {
                3 => special.push(AddedToken::from(t.clone(), true)),
                4 => user.push(AddedToken::from(t.clone(), false).normalized(false)),
                _ => {}
            }
            let _ = i;
        }
        tok.add_special_tokens(special)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        tok.add_tokens(user)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        if let (true, Some(b)) = (add_bos, bos) {
            let name = tokens.get(b as usize).cloned().unwrap_or_default();
            let post = TemplateProcessing::builder()
                .try_single(format!("{name} $A"))
                .and_then(|t| t.try_pair(format!("{name} $A {name} $B")))
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .special_tokens(vec![(name, b)])
                .build()
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            tok.with_post_processor(Some(post));
        }
        Ok(Self::new(tok, bos, eos))
    }
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn string_array(md: &GgufMeta<'_>, key: &str) -> Result<Vec<String>> {
    let v = md.metadata.get(key).ok_or_else(|| md.missing(key))?;
    let arr = v.to_vec().map_err(|_| md.missing(key))?;
    arr.iter()
        .map(|x| {
            x.to_string().cloned().map_err(|_| Error::Config {
                path: md.source.to_path_buf(),
                field: key.to_string(),
                message: "expected an array of strings".into(),
            })
        })
        .collect()
}

/// SentencePiece BPE merges derived from piece scores: every way of splitting
/// a piece into two pieces is a merge, ranked by the merged piece's score.
/// Applying merges lowest rank first then reproduces SentencePiece's
/// "merge the best-scoring adjacent pair" loop.
fn merges_from_scores(
    tokens: &[String],
    scores: &[f32],
    vocab: &tokenizers::models::bpe::Vocab,
) -> Vec<(String, String)> {
    let mut merges: Vec<(f32, u32, u32, &str, &str)> = vec![];
    for (id, piece) in tokens.iter().enumerate() {
        if vocab.get(piece) != Some(&(id as u32)) {
            continue;
        }
        let score = scores.get(id).copied().unwrap_or(0.0);
        let mut local = vec![];
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((score, li, ri, l, r));
            }
        }
        local.sort_by_key(|m| (m.1, m.2));
        merges.extend(local);
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect()
}

/// Turns generated ids into text pieces that never split a UTF-8 character.
///
/// It decodes a sliding window of tokens and emits only what the newest token
/// added, once that no longer ends in an incomplete character (U+FFFD); the
/// window keeps a little context so leading spaces come out right.
#[derive(Debug, Clone)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

/// How many context tokens the window keeps.
const CONTEXT_TOKENS: usize = 4;

impl TextStream {
    /// A stream for text generated after the `context` tokens (the prompt).
    pub fn new(context: &[u32]) -> Self {
        let ctx = &context[context.len().saturating_sub(CONTEXT_TOKENS)..];
        Self {
            ids: ctx.to_vec(),
            prefix_offset: 0,
            read_offset: ctx.len(),
        }
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if text.len() > prefix.len()
            && !text.ends_with('\u{FFFD}')
            && let Some(delta) = text.strip_prefix(prefix.as_str())
        {
            let delta = delta.to_string();
            self.advance();
            return Ok(Some(delta));
        }
        // Keep the window short when tokens add no text.
        if self.ids.len() - self.prefix_offset > 64 {
            let out = self.flush(tokenizer)?;
            return Ok((!out.is_empty()).then_some(out));
        }
        Ok(None)
    }

    fn advance(&mut self) {
        // Drop consumed ids so the buffer stays small.
        let keep_from = self.read_offset.min(self.ids.len());
        self.ids.drain(..keep_from);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
    }

    /// Emits whatever is still held back (at the end of generation).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        let delta = match text.strip_prefix(prefix.as_str()) {
            Some(d) => d.to_string(),
            None => {
                // Decoding the window differently from its prefix should not
                // happen; fall back to the tail past the common prefix.
                let common = text
                    .char_indices()
                    .zip(prefix.chars())
                    .take_while(|((_, a), b)| a == b)
                    .last()
                    .map(|((i, c), _)| i + c.len_utf8())
                    .unwrap_or(0);
                text[common..].to_string()
            }
        };
        self.advance();
        Ok(delta)
    }
}

/// Holds back text that might be the start of a stop string, so a stop string
/// split across tokens is caught and never emitted.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What [`StopMatcher::push`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text safe to emit now.
    Continue(String),
    /// A stop string was found; the text before it, then generation ends.
    Stopped(String),
}

impl StopMatcher {
    /// A matcher for these stop strings (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(text.to_string());
        }
        self.pending.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return StopOutcome::Stopped(out);
        }
        // Longest suffix of pending that is a proper prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let suffix = &self.pending[i..];
                if suffix.len() < s.len() && s.starts_with(suffix) {
                    hold = hold.max(suffix.len());
                    break;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// Text still held back (emit it when generation ends for another reason).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_stop_string_split_across_pieces_is_caught_and_not_emitted() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), StopOutcome::Continue("hello ".into()));
        assert_eq!(m.push("N"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("D and more"), StopOutcome::Stopped(String::new()));
    }

    #[test]
    fn a_false_start_is_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("EN"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("x"), StopOutcome::Continue("ENx".into()));
        assert_eq!(m.flush(), "");
    }

    proptest! {
        #[test]
        fn stop_matching_emits_exactly_the_text_before_the_first_stop(
            pieces in proptest::collection::vec("[abc]{0,3}", 1..12),
            stop in "[abc]{1,3}",
        ) {
            let full: String = pieces.concat();
            let mut m = StopMatcher::new(vec![stop.clone()]);
            let mut out = String::new();
            let mut stopped = false;
            for p in &pieces {
                match m.push(p) {
                    StopOutcome::Continue(s) => out.push_str(&s),
                    StopOutcome::Stopped(s) => { out.push_str(&s); stopped = true; break; }
                }
            }
            if !stopped { out.push_str(&m.flush()); }
            match full.find(&stop) {
                Some(at) => { prop_assert!(stopped); prop_assert_eq!(out, &full[..at]); }
                None => { prop_assert!(!stopped); prop_assert_eq!(out, full); }
            }
        }
    }
}
