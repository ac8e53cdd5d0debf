//! What each request asks for: its prompt and its `max_tokens`, drawn from the
//! seed and the request's index so a run is reproducible whatever the timing.

use std::path::Path;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::dist::Dist;

/// A chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// system, user or assistant.
    pub role: String,
    /// The text.
    pub content: String,
}

/// One prompt of a prompts file.
#[derive(Debug, Clone, PartialEq)]
pub enum FilePrompt {
    /// `{"prompt": "..."}`.
    Text(String),
    /// `{"messages": [...]}`.
    Chat(Vec<Message>),
}

/// Where prompts come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompts {
    /// Random token ids with lengths from `tokens`, ids in `vocab.0..vocab.1`.
    Synthetic {
        /// Prompt length distribution.
        tokens: Dist,
        /// Token id range (end exclusive).
        vocab: (u32, u32),
    },
    /// Prompts read from a JSONL file, picked at random.
    File {
        /// The file.
        path: String,
        /// Its prompts.
        items: Vec<FilePrompt>,
    },
}

impl Prompts {
    /// Reads a JSONL file of `{"prompt": "..."}` or `{"messages": [...]}` lines
    /// (blank lines are skipped).
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Ok(Prompts::File {
            path: path.display().to_string(),
            items: parse_jsonl(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<Message>>,
}

/// Parses JSONL prompts.
pub fn parse_jsonl(text: &str) -> anyhow::Result<Vec<FilePrompt>> {
    let mut items = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: Line =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1))?;
        items.push(match (l.prompt, l.messages) {
            (Some(p), None) => FilePrompt::Text(p),
            (None, Some(m)) if !m.is_empty() => FilePrompt::Chat(m),
            _ => anyhow::bail!(
                "line {}: give exactly one of `prompt` or a non-empty `messages`",
                i + 1
            ),
        });
    }
    if items.is_empty() {
        anyhow::bail!("no prompts");
    }
    Ok(items)
}

impl Serialize for Prompts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        match self {
            Prompts::Synthetic { tokens, vocab } => {
                m.serialize_entry("kind", "synthetic")?;
                m.serialize_entry("tokens", tokens)?;
                m.serialize_entry("vocab", &format!("{}:{}", vocab.0, vocab.1))?;
            }
            Prompts::File { path, items } => {
                m.serialize_entry("kind", "file")?;
                m.serialize_entry("path", path)?;
                m.serialize_entry("count", &items.len())?;
            }
        }
        m.end()
    }
}

/// The input of one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Token ids, sent as they are.
    Tokens(Vec<u32>),
    /// Text.
    Text(String),
    /// A conversation.
    Chat(Vec<Message>),
}

/// One request's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    /// Its index in the run (warm-up included).
    pub index: u64,
    /// The prompt.
    pub input: Input,
    /// Completion length asked for.
    pub max_tokens: u32,
    /// Its session key (`s-<k>`), with `Workload::with_keys`' sessions.
    pub session: Option<String>,
    /// Its end-user id (`u-<k>`), with `Workload::with_keys`' users.
    pub user: Option<String>,
}

/// Short common words, mostly one token each in BPE vocabularies: the text of
/// synthetic prompts where token ids cannot be sent (chat).
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "at", "by",
    "it", "from", "he", "she", "we", "they", "this", "an", "be", "or", "are", "but", "not", "all",
    "one", "two", "new", "time", "year", "day", "way", "man", "world", "life", "hand", "part",
    "place", "case", "week", "house", "water", "city", "name", "night", "home",
];

/// Draws request parameters.
#[derive(Debug, Clone)]
pub struct Workload {
    prompts: Prompts,
    max_tokens: Dist,
    seed: u64,
    sessions: Option<u64>,
    users: Option<u64>,
}

/// Salt of the key stream, so drawing keys leaves prompts and lengths as they were.
const KEYS_SALT: u64 = 0x6b65_7973_6b65_7973;

/// SplitMix64: decorrelates (seed, index) pairs into RNG seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Workload {
    /// A workload.
    pub fn new(prompts: Prompts, max_tokens: Dist, seed: u64) -> anyhow::Result<Self> {
        if let Prompts::Synthetic {
            vocab: (lo, hi), ..
        } = prompts
            && lo >= hi
        {
            anyhow::bail!("the vocabulary range {lo}:{hi} is empty");
        }
        Ok(Self {
            prompts,
            max_tokens,
            seed,
            sessions: None,
            users: None,
        })
    }

    /// Gives each request a session key drawn uniformly from `sessions`
    /// sessions and an end-user id drawn from `users` users (independently,
    /// from the seed and the request's index); `None` (or 0) sends none.
    pub fn with_keys(mut self, sessions: Option<u64>, users: Option<u64>) -> Self {
        self.sessions = sessions.filter(|n| *n > 0);
        self.users = users.filter(|n| *n > 0);
        self
    }

    /// The RNG of request `index` (independent of every other request's).
    pub fn rng(&self, index: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(mix(self.seed ^ mix(index)))
    }

    /// The parameters of request `index`; `chat` asks for text rather than token ids.
    pub fn request(&self, index: u64, chat: bool) -> RequestSpec {
        let mut rng = self.rng(index);
        let input = match &self.prompts {
            Prompts::Synthetic { tokens, vocab } => {
                let n = tokens.sample(&mut rng);
                if chat {
                    let words: Vec<&str> = (0..n)
                        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                        .collect();
                    Input::Chat(vec![Message {
                        role: "user".into(),
                        content: words.join(" "),
                    }])
                } else {
                    Input::Tokens((0..n).map(|_| rng.random_range(vocab.0..vocab.1)).collect())
                }
            }
            Prompts::File { items, .. } => match &items[rng.random_range(0..items.len())] {
                FilePrompt::Text(t) if chat => Input::Chat(vec![Message {
                    role: "user".into(),
                    content: t.clone(),
                }]),
                FilePrompt::Text(t) => Input::Text(t.clone()),
                FilePrompt::Chat(m) => Input::Chat(m.clone()),
            },
        };
        let max_tokens = self.max_tokens.sample(&mut rng);
        let mut keys = ChaCha8Rng::seed_from_u64(mix(self.seed ^ mix(index)) ^ KEYS_SALT);
        let session = self
            .sessions
            .map(|n| crate::keys::session_key(keys.random_range(0..n)));
        let user = self
            .users
            .map(|n| crate::keys::user_id(keys.random_range(0..n)));
        RequestSpec {
            index,
            input,
            max_tokens,
            session,
            user,
        }
    }

    /// Whether some prompt is a conversation (needs the chat endpoint over HTTP).
    pub fn has_chat(&self) -> bool {
        matches!(&self.prompts, Prompts::File { items, .. } if items.iter().any(|i| matches!(i, FilePrompt::Chat(_))))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_prompts_have_exact_lengths_in_the_vocab_and_are_reproducible() {
        let w = Workload::new(
            Prompts::Synthetic {
                tokens: "uniform:5:9".parse().unwrap(),
                vocab: (10, 20),
            },
            "mix:3@1,7@1".parse().unwrap(),
            42,
        )
        .unwrap();
        let mut lens = std::collections::BTreeSet::new();
        for i in 0..200 {
            let r = w.request(i, false);
            let Input::Tokens(ids) = &r.input else {
                panic!("token ids")
            };
            assert!((5..=9).contains(&ids.len()));
            assert!(ids.iter().all(|&t| (10..20).contains(&t)));
            assert!(r.max_tokens == 3 || r.max_tokens == 7);
            lens.insert(ids.len());
            assert_eq!(w.request(i, false), r, "same index, same request");
        }
        assert_eq!(lens.len(), 5, "every length occurs");
        assert_ne!(w.request(0, false), w.request(1, false));
        let Input::Chat(m) = w.request(3, true).input else {
            panic!("chat")
        };
        assert!((5..=9).contains(&m[0].content.split(' ').count()));
    }

    #[test]
    fn session_and_user_keys_are_uniform_reproducible_and_leave_prompts_alone() {
        let prompts = Prompts::Synthetic {
            tokens: "uniform:5:9".parse().unwrap(),
            vocab: (10, 20),
        };
        let plain = Workload::new(prompts.clone(), "4".parse().unwrap(), 7).unwrap();
        let keyed = plain.clone().with_keys(Some(4), Some(3));
        let mut sessions = std::collections::BTreeMap::<String, u32>::new();
        let mut users = std::collections::BTreeMap::<String, u32>::new();
        for i in 0..400 {
            let (p, k) = (plain.request(i, false), keyed.request(i, false));
            assert_eq!(
                (&p.session, &p.user),
                (&None, &None),
                "no keys unless asked"
            );
            assert_eq!((&p.input, p.max_tokens), (&k.input, k.max_tokens));
            assert_eq!(keyed.request(i, false), k, "same index, same keys");
            *sessions.entry(k.session.unwrap()).or_default() += 1;
            *users.entry(k.user.unwrap()).or_default() += 1;
        }
        assert_eq!(
            sessions.keys().collect::<Vec<_>>(),
            ["s-0", "s-1", "s-2", "s-3"]
        );
        assert_eq!(users.keys().collect::<Vec<_>>(), ["u-0", "u-1", "u-2"]);
        // Uniform: each of 4 sessions near 100 of 400, each of 3 users near 133.
        assert!(
            sessions.values().all(|n| (60..140).contains(n)),
            "{sessions:?}"
        );
        assert!(users.values().all(|n| (90..180).contains(n)), "{users:?}");
        let other = Workload::new(prompts, "4".parse().unwrap(), 8)
            .unwrap()
            .with_keys(Some(4), Some(3));
        assert!(
            (0..20).any(|i| other.request(i, false).session != keyed.request(i, false).session),
            "another seed, other keys"
        );
    }

    #[test]
    fn jsonl_prompts_parse() {
        let items = parse_jsonl(
            "{\"prompt\": \"hi\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"yo\"}]}\n",
        )
        .unwrap();
        assert_eq!(items[0], FilePrompt::Text("hi".into()));
        assert_eq!(
            items[1],
            FilePrompt::Chat(vec![Message {
                role: "user".into(),
                content: "yo".into()
            }])
        );
        assert!(parse_jsonl("{\"prompt\": 3}").is_err());
        assert!(parse_jsonl("{}").is_err());
        assert!(parse_jsonl("{\"messages\": []}").is_err());
        assert!(parse_jsonl("\n").is_err());
    }
}
