//! One step's work, flattened: the tokens of many sequences in one list of
//! rows, and where each sequence sits in it (selective batching). The
//! scheduler builds it; the forward pass reads it.

/// The tokens of one step, flattened, with each sequence's place in them.
#[derive(Debug, Default)]
pub struct Batch<'a> {
    /// Token ids of every row.
    pub tokens: Vec<u32>,
    /// Position of every row within its sequence.
    pub positions: Vec<u32>,
    /// Sequences, in row order.
    pub seqs: Vec<SeqView<'a>>,
    /// Rows whose logits the caller wants, in the order they are returned.
    pub logit_rows: Vec<u32>,
    /// Rows whose final-normed hidden states (the LM head's input) the
    /// caller wants instead of logits (embedding jobs), in row order; the
    /// step leaves them in its scratch ([`super::Scratch::hidden_rows`]).
    pub hidden_rows: Vec<u32>,
}

/// Which logits a sequence needs from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (a prefill chunk that does not reach the end of the prompt).
    None,
    /// The last row's (the next-token distribution).
    Last,
    /// Every row's (tests).
    All,
    /// Rows `from..to` of the tokens pushed (teacher-forced scoring).
    Span {
        /// First row, relative to the sequence's tokens in this step.
        from: usize,
        /// One past the last.
        to: usize,
    },
}

impl<'a> Batch<'a> {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `tokens` of a sequence whose first new token sits at `start_pos`.
    pub fn push(&mut self, tokens: &[u32], start_pos: usize, blocks: &'a [u32], logits: Logits) {
        let offset = self.tokens.len();
        self.tokens.extend_from_slice(tokens);
        self.positions
            .extend((start_pos..start_pos + tokens.len()).map(|p| p as u32));
        self.seqs.push(SeqView {
            offset,
            len: tokens.len(),
            start_pos,
            blocks,
        });
        match logits {
            Logits::None => {}
            Logits::Last if !tokens.is_empty() => {
                self.logit_rows.push((offset + tokens.len() - 1) as u32)
            }
            Logits::Last => {}
            Logits::All => self
                .logit_rows
                .extend((offset..offset + tokens.len()).map(|r| r as u32)),
            Logits::Span { from, to } => self.logit_rows.extend(
                (offset + from.min(tokens.len())..offset + to.min(tokens.len())).map(|r| r as u32),
            ),
        }
    }

    /// Appends `tokens` of a sequence whose final hidden states are wanted
    /// for every row (an embedding job): no logits.
    pub fn push_hidden(&mut self, tokens: &[u32], start_pos: usize, blocks: &'a [u32]) {
        let offset = self.tokens.len();
        self.push(tokens, start_pos, blocks, Logits::None);
        self.hidden_rows
            .extend((offset..offset + tokens.len()).map(|r| r as u32));
    }

    /// Rows in the step.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the step has no rows.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// One sequence's slice of a step: which rows of the flattened batch are its
/// new tokens, where they sit in the sequence, and its block table.
#[derive(Debug, Clone, Copy)]
pub struct SeqView<'a> {
    /// First row in the flattened batch.
    pub offset: usize,
    /// New tokens this step.
    pub len: usize,
    /// Position of the first new token.
    pub start_pos: usize,
    /// The sequence's blocks, covering at least `start_pos + len` positions.
    pub blocks: &'a [u32],
}
