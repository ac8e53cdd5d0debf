//! Constrained decoding (structured outputs) on llguidance: what a request
//! may constrain its output to ([`Constraint`]), the token environment built
//! once per model from its own vocabulary ([`GrammarEnv`]), compilation with
//! size and time limits ([`Compiled`]), and the per-sequence state the engine
//! thread masks logits with and advances token by token ([`Grammar`]).
//!
//! Compilation happens at validation, off the engine thread. The engine
//! commits sampled tokens and masks logits; each sequence's next mask is
//! computed ahead on the rayon pool, in parallel with the other rows' and
//! with the forward pass (see [`Grammar`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::earley::SlicedBiasComputer;
use llguidance::{Matcher, ParserFactory, TokenParser};
use toktrie::{InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};

use super::Tokenizer;

/// The most bytes a constraint's text (schema, regex, grammar, choices) may
/// have; larger ones are refused before anything is compiled.
pub const MAX_CONSTRAINT_BYTES: usize = 128 * 1024;

/// The longest a constraint may take to compile before it is refused.
pub const COMPILE_TIMEOUT: Duration = Duration::from_secs(5);

/// The most strings `guided_choice` may list.
pub const MAX_CHOICES: usize = 1024;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid for a schema (`response_format: {"type": "json_schema"}`,
    /// `guided_json`, and a named function's arguments).
    JsonSchema(serde_json::Value),
    /// Text matching a regular expression (Rust `regex` syntax), whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
}

impl Constraint {
    /// The metrics label: json_object, json_schema, regex, choice, grammar.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JsonObject => "json_object",
            Self::JsonSchema(_) => "json_schema",
            Self::Regex(_) => "regex",
            Self::Choice(_) => "choice",
            Self::Lark(_) => "grammar",
        }
    }

    /// Bytes of its text (the schema serialized).
    pub fn size(&self) -> usize {
        match self {
            Self::JsonObject => 0,
            Self::JsonSchema(v) => serde_json::to_string(v).map_or(usize::MAX, |s| s.len()),
            Self::Regex(r) | Self::Lark(r) => r.len(),
            Self::Choice(c) => c.iter().map(|s| s.len() + 1).sum(),
        }
    }

    /// llguidance's grammar for it. JSON is compact (no whitespace between
    /// tokens, as OpenAI's strict mode writes it): a model cannot spend its
    /// tokens on blanks.
    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        let compact = |mut schema: serde_json::Value| {
            if let Some(obj) = schema.as_object_mut() {
                obj.entry("x-guidance")
                    .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
            }
            schema
        };
        Ok(match self {
            Self::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            Self::JsonSchema(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err("a JSON schema must be an object".into());
                }
                TopLevelGrammar::from_json_schema(compact(schema.clone()))
            }
            Self::Regex(rx) => {
                // Checked here so a bad pattern is named as such.
                regex::Regex::new(rx).map_err(|e| format!("invalid regex: {e}"))?;
                TopLevelGrammar::from_regex(rx)
            }
            Self::Choice(choices) => {
                if choices.is_empty() {
                    return Err("at least one choice is required".into());
                }
                if choices.len() > MAX_CHOICES {
                    return Err(format!("at most {MAX_CHOICES} choices"));
                }
                let alternatives: Vec<String> = choices.iter().map(|c| regex::escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
            }
            Self::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        })
    }
}

/// The model's vocabulary as llguidance sees it: each token's bytes in a
/// trie, and the model's tokenizer for the text llguidance must tokenize.
struct VocabEnv {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                // The trie's greedy tokenization never fails.
                .unwrap_or_else(|_| self.trie.greedy_tokenize(text.as_bytes()))
        })
    }
}

/// How the vocabulary spells bytes.
#[derive(Debug, Default)]
struct Spelling {
    /// GPT-2's byte-to-character map (`Ġ` for a space, …).
    byte_level: bool,
    /// SentencePiece pieces with `<0xAB>` byte tokens.
    byte_fallback: bool,
    /// The character standing for a space (`▁` for SentencePiece).
    space: Option<char>,
}

fn spelling_of(decoder: &serde_json::Value, out: &mut Spelling) {
    match decoder["type"].as_str() {
        Some("ByteLevel") => out.byte_level = true,
        Some("ByteFallback") => out.byte_fallback = true,
        Some("Metaspace") => {
            out.space = Some(
                decoder["replacement"]
                    .as_str()
                    .and_then(|s| s.chars().next())
                    .unwrap_or('▁'),
            )
        }
        Some("Replace") if decoder["content"].as_str() == Some(" ") => {
            let pattern = decoder["pattern"]["String"].as_str().unwrap_or("");
            let mut chars = pattern.chars();
            if let (Some(c), None) = (chars.next(), chars.next()) {
                out.space = Some(c);
            }
        }
        Some("Sequence") => {
            for d in decoder["decoders"].as_array().into_iter().flatten() {
                spelling_of(d, out);
            }
        }
        _ => {}
    }
}

/// GPT-2's byte-level alphabet: character → byte.
fn byte_level_map() -> std::collections::HashMap<char, u8> {
    let mut map = std::collections::HashMap::new();
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        let c = b as char;
        if matches!(c, '!'..='~' | '\u{A1}'..='\u{AC}' | '\u{AE}'..='\u{FF}') {
            map.insert(c, b);
        } else {
            if let Some(c) = char::from_u32(next) {
                map.insert(c, b);
            }
            next += 1;
        }
    }
    map
}

/// A token no grammar can produce: llguidance's special-token marker then
/// its name.
fn special(name: &str) -> Vec<u8> {
    let mut v = vec![TokTrie::SPECIAL_TOKEN_MARKER];
    v.extend_from_slice(name.as_bytes());
    v
}

/// The bytes of each of the first `rows` token ids (ids past the tokenizer's
/// vocabulary, rows of a padded embedding, are specials nothing produces).
fn token_bytes(tok: &tokenizers::Tokenizer, rows: usize) -> Vec<Vec<u8>> {
    let mut spelling = Spelling::default();
    if let Ok(d) = serde_json::to_value(tok.get_decoder()) {
        spelling_of(&d, &mut spelling);
    }
    let chars = byte_level_map();
    let added = tok.get_added_tokens_decoder();
    (0..rows as u32)
        .map(|id| {
            if let Some(a) = added.get(&id) {
                return if a.special {
                    special(&a.content)
                } else {
                    a.content.as_bytes().to_vec()
                };
            }
            let Some(name) = tok.id_to_token(id) else {
                return special(&format!("<[{id}]>"));
            };
            if spelling.byte_fallback
                && name.len() == 6
                && name.starts_with("<0x")
                && name.ends_with('>')
                && let Ok(b) = u8::from_str_radix(&name[3..5], 16)
            {
                return vec![b];
            }
            if spelling.byte_level {
                // A name outside the byte alphabet is no text the model can
                // write with it: never allowed.
                return name
                    .chars()
                    .map(|c| chars.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| special(&name));
            }
            match spelling.space {
                Some(sp) => name.replace(sp, " ").into_bytes(),
                None => name.into_bytes(),
            }
        })
        .collect()
}

/// One model's llguidance environment: its vocabulary's trie and the parser
/// factory (with its precomputed token slices). Built once per engine, on
/// first use (see [`Tokenizer::grammar_env`]), and shared by every request.
pub struct GrammarEnv {
    factory: ParserFactory,
    rows: usize,
}

impl std::fmt::Debug for GrammarEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarEnv")
            .field("rows", &self.rows)
            .finish()
    }
}

impl GrammarEnv {
    /// The environment for a model whose logits rows have `rows` entries.
    pub fn new(tokenizer: &Tokenizer, rows: usize) -> Result<Self, String> {
        let inner = tokenizer.inner();
        let rows = rows.max(inner.get_vocab_size(true));
        let mut words = token_bytes(inner, rows);
        let mut eos: Vec<u32> = tokenizer
            .eos()
            .iter()
            .copied()
            .filter(|&e| (e as usize) < rows)
            .collect();
        if eos.is_empty() {
            // No end token: one the model can never sample (past its rows),
            // so a grammar ends only when nothing can follow.
            words.push(special("<[eos]>"));
            eos.push(rows as u32);
        }
        let mut info = TokRxInfo::new(words.len() as u32, eos[0]);
        info.tok_bos = tokenizer.bos();
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(&eos);
        }
        let env: TokEnv = Arc::new(VocabEnv {
            trie,
            tokenizer: inner.clone(),
        });
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| format!("cannot build the grammar environment: {e}"))?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(Self { factory, rows })
    }

    /// Compiles a constraint, within [`MAX_CONSTRAINT_BYTES`] and
    /// [`COMPILE_TIMEOUT`] (on a thread of its own, so a slow grammar costs
    /// its caller the timeout and no more; llguidance's fuel limits bound
    /// the thread itself). The error says what is wrong.
    pub fn compile(self: &Arc<Self>, constraint: &Constraint) -> Result<Compiled, String> {
        let size = constraint.size();
        if size > MAX_CONSTRAINT_BYTES {
            return Err(format!(
                "the {} is {size} bytes; at most {MAX_CONSTRAINT_BYTES} are allowed",
                match constraint {
                    Constraint::JsonObject | Constraint::JsonSchema(_) => "schema",
                    Constraint::Regex(_) => "regex",
                    Constraint::Choice(_) => "list of choices",
                    Constraint::Lark(_) => "grammar",
                }
            ));
        }
        let grammar = constraint.grammar()?;
        let kind = constraint.kind();
        let env = self.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("grammar-compile".into())
            .spawn(move || {
                let started = Instant::now();
                let parser = env.factory.create_parser(grammar);
                let _ = tx.send((parser, started.elapsed()));
            })
            .map_err(|e| format!("cannot start compiling: {e}"))?;
        match rx.recv_timeout(COMPILE_TIMEOUT) {
            Ok((Ok(parser), elapsed)) => Ok(Compiled {
                parser,
                kind,
                elapsed,
            }),
            Ok((Err(e), _)) => Err(first_line(&e.to_string())),
            Err(_) => Err(format!(
                "it did not compile within {} s",
                COMPILE_TIMEOUT.as_secs()
            )),
        }
    }
}

/// llguidance's message without the grammar dump some errors append.
fn first_line(s: &str) -> String {
    let s = s.trim();
    let cut: String = s.chars().take(2000).collect();
    cut
}

/// A compiled constraint, ready for a sequence.
pub struct Compiled {
    parser: TokenParser,
    kind: &'static str,
    elapsed: Duration,
}

impl Compiled {
    /// What kind of constraint it is (the metrics label).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// How long it took to compile.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }
}

impl Clone for Compiled {
    fn clone(&self) -> Self {
        Self {
            parser: self.parser.deep_clone(),
            kind: self.kind,
            elapsed: self.elapsed,
        }
    }
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("kind", &self.kind)
            .finish()
    }
}

/// A sequence's grammar state: masks its logits before each draw, advances
/// by each sampled token. A preempted sequence keeps its tokens (and this
/// state with them), so nothing is replayed.
///
/// The mask for the next token depends only on the tokens committed so far,
/// so it is computed ahead: on the rayon pool as soon as the sequence is
/// admitted and after each commit, where it overlaps the forward pass that
/// produces the logits it will mask (and the other rows' masks). The draw
/// takes it when ready, or computes it then.
pub struct Grammar {
    ahead: Arc<Mutex<Ahead>>,
    kind: &'static str,
}

/// The parser and the mask computed for its current state.
struct Ahead {
    matcher: Matcher,
    /// The mask for the next token, once computed.
    next: Option<Result<SimpleVob, String>>,
    /// The draw took `next`: nothing to compute until the next commit.
    drawn: bool,
    /// Seconds each mask took to compute, wherever it ran.
    timer: metrics::Histogram,
}

impl Ahead {
    /// Computes the mask for the current state, unless it is there already
    /// or was drawn.
    fn compute(&mut self) {
        if self.next.is_some() || self.drawn {
            return;
        }
        let started = Instant::now();
        let matcher = &mut self.matcher;
        let mask =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| matcher.compute_mask()))
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the grammar engine panicked")));
        self.timer.record(started.elapsed().as_secs_f64());
        self.next = Some(match mask {
            Err(e) => Err(format!("the output constraint failed: {e}")),
            Ok(m) if m.is_zero() => Err("the output constraint allows no token here".into()),
            Ok(m) => Ok(m),
        });
    }
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar").field("kind", &self.kind).finish()
    }
}

impl Grammar {
    /// A fresh state for one sequence; `timer` records each mask's compute
    /// time. Its first mask starts computing at once.
    pub fn new(compiled: Compiled, timer: metrics::Histogram) -> Self {
        let g = Self {
            ahead: Arc::new(Mutex::new(Ahead {
                matcher: Matcher::new(Ok(compiled.parser)),
                next: None,
                drawn: false,
                timer,
            })),
            kind: compiled.kind,
        };
        g.prefetch();
        g
    }

    /// Its kind (the metrics label).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ahead> {
        // `compute` catches the parser's panics, so a poisoned lock still
        // guards a consistent state.
        self.ahead.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts computing the next mask on the rayon pool. A job that runs
    /// late computes for the state it finds (or nothing, if that mask is
    /// there or drawn); the lock is held by the engine only to take a mask
    /// or commit a token, so a job never waits on work that waits on it.
    fn prefetch(&self) {
        if self.lock().matcher.is_stopped() {
            return;
        }
        let ahead = Arc::clone(&self.ahead);
        rayon::spawn(move || ahead.lock().unwrap_or_else(|p| p.into_inner()).compute());
    }

    /// The mask for the next token: the one computed ahead, or computed now.
    fn mask(&mut self) -> Result<SimpleVob, String> {
        let mut ahead = self.lock();
        ahead.compute();
        ahead.drawn = true;
        ahead
            .next
            .take()
            .unwrap_or_else(|| Err("the output constraint has no mask".into()))
    }

    /// Sets every logit the grammar forbids next to −∞.
    pub fn mask_row(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let mask = self.mask()?;
        let words = mask.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = words.get(w).copied().unwrap_or(0);
            if bits == u32::MAX {
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                if bits & (1 << b) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        Ok(())
    }

    /// Keeps only the candidates the grammar allows next.
    pub fn mask_candidates(&mut self, cands: &[(u32, f32)]) -> Result<Vec<(u32, f32)>, String> {
        let mask = self.mask()?;
        Ok(cands
            .iter()
            .copied()
            .filter(|&(t, _)| (t as usize) < mask.len() && mask.is_allowed(t))
            .collect())
    }

    /// Advances by the sampled token, then starts computing the next mask.
    pub fn commit(&mut self, token: u32) -> Result<(), String> {
        {
            let mut ahead = self.lock();
            ahead.next = None;
            ahead.drawn = false;
            ahead
                .matcher
                .consume_token(token)
                .map_err(|e| format!("the output constraint refused token {token}: {e}"))?;
        }
        self.prefetch();
        Ok(())
    }

    /// Whether the grammar is complete and nothing may follow (the sequence
    /// ends with `stop`).
    pub fn is_finished(&self) -> bool {
        self.lock().matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embedded() -> Tokenizer {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default/tokenizer.json");
        Tokenizer::from_file(&path, Some(0), vec![1]).unwrap()
    }

    /// Generates greedily from a grammar alone: each step takes the
    /// allowed token with the lowest id.
    fn walk(env: &Arc<GrammarEnv>, c: &Constraint, steps: usize) -> (Vec<u32>, bool) {
        let mut g = Grammar::new(env.compile(c).unwrap(), metrics::Histogram::noop());
        let mut out = vec![];
        for _ in 0..steps {
            if g.is_finished() {
                return (out, true);
            }
            let mut row = vec![0.0f32; env.rows];
            g.mask_row(&mut row).unwrap();
            let t = row.iter().position(|x| x.is_finite()).unwrap() as u32;
            g.commit(t).unwrap();
            out.push(t);
        }
        (out, g.is_finished())
    }

    #[test]
    fn a_choice_constraint_only_ever_writes_one_of_its_choices() {
        let tok = embedded();
        let env = Arc::new(GrammarEnv::new(&tok, tok.vocab_size()).unwrap());
        let c = Constraint::Choice(vec!["yes".into(), "no".into()]);
        let (ids, done) = walk(&env, &c, 16);
        assert!(done);
        let ids: Vec<u32> = ids.into_iter().filter(|&t| t != 1).collect();
        let text = tok.decode(&ids).unwrap();
        assert!(text == "yes" || text == "no", "{text:?}");
    }

    #[test]
    fn a_schema_that_cannot_compile_is_refused_with_the_reason() {
        let tok = embedded();
        let env = Arc::new(GrammarEnv::new(&tok, tok.vocab_size()).unwrap());
        let bad = Constraint::JsonSchema(serde_json::json!({"type": "nonsense"}));
        let err = env.compile(&bad).unwrap_err();
        assert!(!err.is_empty());
        let huge = Constraint::Regex("a".repeat(MAX_CONSTRAINT_BYTES + 1));
        assert!(env.compile(&huge).unwrap_err().contains("at most"));
    }
}
