//! The scheduling state: who waits, who runs, which blocks they own, and the
//! plan of each step. A plain struct with no I/O, so tests drive it directly.
//!
//! Every step: decodes first (one token each, growing block tables and
//! preempting the youngest, lowest-priority sequence when the pool runs dry),
//! then prefill chunks of running sequences, then admissions in FCFS order
//! while the token budget, the running cap and the KV pool allow.
//!
//! With prefix caching (the allocator's), an admitted sequence first takes
//! the longest run of cached full blocks matching its tokens and feeds only
//! what follows; after each step the blocks it filled join the cache. A
//! waiting sequence whose next block another running sequence (of its class
//! or above) is computing right now waits for it instead of computing it
//! too: that is how the `n` choices of one request, submitted together,
//! prefill their prompt once. Sequences behind it may be admitted first.

use std::collections::VecDeque;

use crate::engine::{BlockAllocator, BlockHash, NIL};

/// Scheduling class of a request.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Uses only spare capacity and is preempted first (shadow traffic).
    Low,
    /// Ordinary traffic.
    #[default]
    Normal,
}

/// Most prompt tokens a low-priority sequence feeds per step: background
/// steps stay short, so a foreground request arriving during one waits
/// little, and a scoring job's logits rows per step stay few.
pub const LOW_PRIORITY_CHUNK: usize = 16;

/// Share of the KV pool (one part in this many) a low-priority admission
/// must leave free: background work takes only spare cache.
pub const LOW_PRIORITY_KV_RESERVE: usize = 10;

/// Limits of one step and of the running set.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Tokens per step, decodes and prefill chunks together.
    pub max_batched_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
}

/// A sequence known to the scheduler, with the caller's payload.
#[derive(Debug)]
pub struct Seq<T> {
    /// Unique id.
    pub id: u64,
    /// Class.
    pub priority: Priority,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    /// Length of the prompt within `tokens`.
    pub prompt_len: usize,
    /// Most tokens it may generate.
    pub max_new_tokens: usize,
    /// Leading tokens whose keys/values are in the cache.
    pub computed: usize,
    /// Its KV blocks.
    pub blocks: Vec<u32>,
    /// The prefix-cache hash of each full block of `tokens` (empty when
    /// caching is off), extended as blocks fill.
    hashes: Vec<BlockHash>,
    /// Leading blocks of `blocks` already offered to the prefix cache.
    offered: usize,
    /// First position whose logits the caller needs before the last (a
    /// scoring job's first scored position): the cache may stand in only
    /// for positions before it.
    logits_from: usize,
    /// Order of (re-)admission; larger is younger.
    admitted: u64,
    /// Times it was preempted.
    pub preemptions: u32,
    /// The caller's per-sequence state.
    pub payload: T,
}

impl<T> Seq<T> {
    /// A new waiting sequence.
    pub fn new(
        id: u64,
        priority: Priority,
        prompt: Vec<u32>,
        max_new_tokens: usize,
        payload: T,
    ) -> Self {
        Self {
            id,
            priority,
            prompt_len: prompt.len(),
            tokens: prompt,
            max_new_tokens,
            computed: 0,
            blocks: vec![],
            hashes: vec![],
            offered: 0,
            logits_from: usize::MAX,
            admitted: 0,
            preemptions: 0,
            payload,
        }
    }

    /// Marks `position` as the first whose logits are needed (besides the
    /// last's), so prefix caching never skips it.
    pub fn needs_logits_from(mut self, position: usize) -> Self {
        self.logits_from = position;
        self
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Most tokens it feeds in one step.
    fn chunk_cap(&self) -> usize {
        match self.priority {
            Priority::Low => LOW_PRIORITY_CHUNK,
            Priority::Normal => usize::MAX,
        }
    }

    /// Most leading blocks the prefix cache may supply: at least the last
    /// token is always computed (its row gives the next token), and so is
    /// every position whose logits are wanted.
    fn reusable_blocks(&self, block_size: usize) -> usize {
        let tokens = self.tokens.len().saturating_sub(1).min(self.logits_from);
        (tokens / block_size).min(self.hashes.len())
    }

    /// Hashes the full blocks of its first `upto` tokens not hashed yet.
    fn hash_blocks(&mut self, alloc: &BlockAllocator, upto: usize) {
        if !alloc.prefix_caching() {
            return;
        }
        let bs = alloc.block_size();
        let full = upto.min(self.tokens.len()) / bs;
        while self.hashes.len() < full {
            let j = self.hashes.len();
            let h = alloc.hash_block(
                self.hashes.last().copied(),
                &self.tokens[j * bs..(j + 1) * bs],
            );
            self.hashes.push(h);
        }
    }

    /// Whether all tokens but the last sampled one are cached.
    fn is_decoding(&self) -> bool {
        self.computed + 1 == self.tokens.len() && self.generated() > 0
    }
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanEntry {
    /// Index into [`State::running`].
    pub index: usize,
    /// First token fed this step.
    pub start: usize,
    /// Tokens fed.
    pub len: usize,
    /// Whether a token is sampled from the last row.
    pub sample: bool,
}

/// The work of one step.
#[derive(Debug, Default, Clone)]
pub struct Plan {
    /// What each scheduled sequence feeds.
    pub entries: Vec<PlanEntry>,
    /// Prompt (prefill) tokens in the step.
    pub prefill_tokens: usize,
    /// Decode tokens in the step.
    pub decode_tokens: usize,
    /// Sequences preempted while planning.
    pub preempted: usize,
    /// Tokens of the sequences admitted in this step that may read the
    /// prefix cache (prefix-cache queries; 0 when caching is off).
    pub cache_queries: usize,
    /// Of those, tokens the prefix cache supplied (not fed).
    pub cache_hits: usize,
    /// Blocks to copy before the step runs, `(source, destination)`, with
    /// the index in [`State::running`] of the sequence whose table holds
    /// the destination: copy-on-write of a partial last block.
    pub copies: Vec<(usize, u32, u32)>,
}

impl Plan {
    /// Total tokens in the step.
    pub fn tokens(&self) -> usize {
        self.prefill_tokens + self.decode_tokens
    }
}

/// Waiting queues, running set and KV blocks.
#[derive(Debug)]
pub struct State<T> {
    limits: Limits,
    alloc: BlockAllocator,
    /// Waiting, FCFS per class; preempted sequences go back to the front.
    waiting_normal: VecDeque<Seq<T>>,
    waiting_low: VecDeque<Seq<T>>,
    /// Running (admitted) sequences.
    pub running: Vec<Seq<T>>,
    admissions: u64,
    /// Preemptions since start.
    pub preemptions_total: u64,
    /// Blocks sliding-window layer groups gave back as their windows
    /// moved, since start.
    pub window_freed: u64,
}

impl<T> State<T> {
    /// An empty state over a pool of blocks.
    pub fn new(limits: Limits, alloc: BlockAllocator) -> Self {
        Self {
            limits,
            alloc,
            waiting_normal: VecDeque::new(),
            waiting_low: VecDeque::new(),
            running: vec![],
            admissions: 0,
            preemptions_total: 0,
            window_freed: 0,
        }
    }

    /// The block allocator (free blocks, usage).
    pub fn allocator(&self) -> &BlockAllocator {
        &self.alloc
    }

    /// Queues a sequence (hashing its full blocks once, for the prefix cache).
    pub fn enqueue(&mut self, mut seq: Seq<T>) {
        seq.hash_blocks(&self.alloc, seq.tokens.len());
        match seq.priority {
            Priority::Normal => self.waiting_normal.push_back(seq),
            Priority::Low => self.waiting_low.push_back(seq),
        }
    }

    /// Sequences waiting.
    pub fn waiting_len(&self) -> usize {
        self.waiting_normal.len() + self.waiting_low.len()
    }

    /// Whether any normal-priority sequence waits or runs.
    pub fn has_foreground(&self) -> bool {
        !self.waiting_normal.is_empty()
            || self.running.iter().any(|s| s.priority == Priority::Normal)
    }

    /// Whether nothing waits or runs.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting_len() == 0
    }

    /// Every waiting sequence (for cancellation checks).
    pub fn waiting(&self) -> impl Iterator<Item = &Seq<T>> {
        self.waiting_normal.iter().chain(self.waiting_low.iter())
    }

    /// Removes and returns the sequences (waiting or running) for which
    /// `gone` holds, freeing their blocks.
    pub fn remove_where(&mut self, mut gone: impl FnMut(&Seq<T>) -> bool) -> Vec<Seq<T>> {
        let mut out = vec![];
        for q in [&mut self.waiting_normal, &mut self.waiting_low] {
            let mut keep = VecDeque::with_capacity(q.len());
            for mut s in q.drain(..) {
                if gone(&s) {
                    self.alloc.release(&mut s.blocks);
                    out.push(s);
                } else {
                    keep.push_back(s);
                }
            }
            *q = keep;
        }
        let mut i = 0;
        while i < self.running.len() {
            if gone(&self.running[i]) {
                let mut s = self.running.swap_remove(i);
                self.alloc.release(&mut s.blocks);
                out.push(s);
            } else {
                i += 1;
            }
        }
        out
    }

    fn preempt(&mut self, index: usize) {
        let mut s = self.running.swap_remove(index);
        self.alloc.release(&mut s.blocks);
        s.computed = 0;
        s.offered = 0;
        s.preemptions += 1;
        self.preemptions_total += 1;
        match s.priority {
            Priority::Normal => self.waiting_normal.push_front(s),
            Priority::Low => self.waiting_low.push_front(s),
        }
    }

    /// The running sequence to give up first: lowest priority, then youngest.
    fn victim(&self, below: Option<Priority>) -> Option<usize> {
        self.running
            .iter()
            .enumerate()
            .filter(|(_, s)| below.is_none_or(|p| s.priority < p))
            .min_by_key(|(_, s)| (s.priority, std::cmp::Reverse(s.admitted)))
            .map(|(i, _)| i)
    }

    /// Decides the next step.
    pub fn plan(&mut self) -> Plan {
        let mut plan = Plan::default();
        // Normal traffic may push low-priority sequences out of the pool.
        if let Some(head) = self.waiting_normal.front() {
            let need = Self::cost(&self.alloc, head);
            while need > self.alloc.free() || self.running.len() >= self.limits.max_running {
                match self.victim(Some(Priority::Normal)) {
                    Some(v) => {
                        self.preempt(v);
                        plan.preempted += 1;
                    }
                    None => break,
                }
            }
        }
        // Decodes need one more position each; preempt until the pool holds them.
        loop {
            let need: usize = self
                .running
                .iter()
                .filter(|s| s.is_decoding())
                .map(|s| {
                    self.alloc
                        .blocks_for(s.tokens.len())
                        .saturating_sub(s.blocks.len())
                })
                .sum();
            if need <= self.alloc.free() {
                break;
            }
            match self.victim(None) {
                Some(v) => {
                    self.preempt(v);
                    plan.preempted += 1;
                }
                None => break,
            }
        }
        let mut budget = self.limits.max_batched_tokens;
        for (index, s) in self.running.iter_mut().enumerate() {
            if s.is_decoding() && budget > 0 && self.alloc.grow(&mut s.blocks, s.tokens.len()) {
                plan.entries.push(PlanEntry {
                    index,
                    start: s.computed,
                    len: 1,
                    sample: true,
                });
                plan.decode_tokens += 1;
                budget -= 1;
            }
        }
        // Prefills in progress continue, oldest first.
        let mut prefilling: Vec<usize> = (0..self.running.len())
            .filter(|&i| !self.running[i].is_decoding())
            .collect();
        prefilling.sort_by_key(|&i| self.running[i].admitted);
        for index in prefilling {
            if budget == 0 {
                break;
            }
            let s = &self.running[index];
            let len = budget.min(s.tokens.len() - s.computed).min(s.chunk_cap());
            plan.entries.push(PlanEntry {
                index,
                start: s.computed,
                len,
                sample: s.computed + len == s.tokens.len(),
            });
            plan.prefill_tokens += len;
            budget -= len;
        }
        // Admissions: normal class first, FCFS; the first sequence not
        // waiting for a prefix being computed blocks the rest, so a large
        // request is never overtaken forever.
        while budget > 0 && self.running.len() < self.limits.max_running {
            let (low, at) = match self.pick(&self.waiting_normal) {
                Some(at) => (false, at),
                None => match self.pick(&self.waiting_low) {
                    Some(at) => (true, at),
                    None => break,
                },
            };
            let queue = if low {
                &mut self.waiting_low
            } else {
                &mut self.waiting_normal
            };
            let Some(candidate) = queue.get(at) else {
                break;
            };
            let reserve = match candidate.priority {
                Priority::Low => self.alloc.total() / LOW_PRIORITY_KV_RESERVE,
                Priority::Normal => 0,
            };
            if Self::cost(&self.alloc, candidate) + reserve > self.alloc.free() {
                break;
            }
            let Some(mut s) = queue.remove(at) else {
                break;
            };
            let bs = self.alloc.block_size();
            let reuse = s.reusable_blocks(bs);
            let hits = self.alloc.share(&mut s.blocks, &s.hashes[..reuse]);
            if !self.alloc.grow(&mut s.blocks, s.tokens.len()) {
                self.alloc.release(&mut s.blocks);
                queue.insert(at, s);
                break;
            }
            s.computed = hits * bs;
            s.offered = hits;
            // Copy-on-write of the partial last block: a running sequence
            // with the same prompt (another choice of the request) has
            // computed it already, so its block is copied and only the last
            // token, whose row gives this sequence's first token, is fed.
            if self.alloc.prefix_caching()
                && let Some(copies) = self.partial_block_source(&s, hits)
            {
                let index = self.running.len();
                plan.copies
                    .extend(copies.into_iter().map(|(from, to)| (index, from, to)));
                s.computed = s.tokens.len() - 1;
            }
            self.admissions += 1;
            s.admitted = self.admissions;
            // A sequence that may read nothing from the cache (a drift
            // probe scores every position) is no query, as in vLLM.
            if self.alloc.prefix_caching() && s.logits_from > 0 {
                plan.cache_queries += s.tokens.len();
                plan.cache_hits += s.computed;
            }
            let len = budget.min(s.tokens.len() - s.computed).min(s.chunk_cap());
            plan.entries.push(PlanEntry {
                index: self.running.len(),
                start: s.computed,
                len,
                sample: s.computed + len == s.tokens.len(),
            });
            plan.prefill_tokens += len;
            budget -= len;
            self.running.push(s);
        }
        plan
    }

    /// The block copies that give `s`, just admitted with `hits` cached
    /// blocks, every position of its partial last block but the last
    /// token's: from a running sequence whose tokens agree through that
    /// position and which has computed it. `None` when there is none, when
    /// the last block is not the only one left, or when a position in it
    /// needs its logits (a scoring job).
    fn partial_block_source(&self, s: &Seq<T>, hits: usize) -> Option<Vec<(u32, u32)>> {
        let bs = self.alloc.block_size();
        let groups = self.alloc.groups();
        let last = s.tokens.len().checked_sub(1)?;
        if last / bs != hits || last == hits * bs || s.logits_from < last {
            return None;
        }
        let r = self.running.iter().find(|r| {
            r.computed >= last
                && r.tokens.len() > last
                && r.tokens[hits * bs..last] == s.tokens[hits * bs..last]
                && (hits == 0 || r.hashes.get(hits - 1) == s.hashes.get(hits - 1))
        })?;
        let copies: Vec<(u32, u32)> = (0..groups)
            .map(|g| {
                let at = hits * groups + g;
                (
                    r.blocks.get(at).copied().unwrap_or(NIL),
                    s.blocks.get(at).copied().unwrap_or(NIL),
                )
            })
            .collect();
        // A sliding group the source already gave this block back in.
        if copies.iter().any(|&(a, b)| a == NIL || b == NIL) {
            return None;
        }
        Some(copies)
    }

    /// Blocks admitting `s` now would take from the free capacity: the
    /// blocks it needs, less the cached ones it shares (or, for a sliding
    /// group, no longer needs), plus those shared that no sequence holds
    /// (they stop being evictable).
    fn cost(alloc: &BlockAllocator, s: &Seq<T>) -> usize {
        let reuse = s.reusable_blocks(alloc.block_size());
        let (hits, evictable) = alloc.lookup(&s.hashes[..reuse]);
        alloc.blocks_for(s.tokens.len()) - hits * alloc.groups() + evictable
    }

    /// Whether `s` should wait: the block after its cached prefix is being
    /// computed right now by a running sequence of its class or above, which
    /// will cache it within a few steps.
    fn deferred(&self, s: &Seq<T>) -> bool {
        if !self.alloc.prefix_caching() {
            return false;
        }
        let bs = self.alloc.block_size();
        let reuse = s.reusable_blocks(bs);
        let (hits, _) = self.alloc.lookup(&s.hashes[..reuse]);
        // Its partial last block, which a running sequence with the same
        // tokens is computing, comes by copy-on-write a step later.
        let last = s.tokens.len().saturating_sub(1);
        if hits == last / bs && last > hits * bs && s.logits_from >= last {
            return self.running.iter().any(|r| {
                r.priority >= s.priority
                    && r.computed < last
                    && r.tokens.len() > last
                    && r.tokens[..last] == s.tokens[..last]
            });
        }
        if hits >= reuse {
            return false;
        }
        let next = s.hashes[hits];
        self.running.iter().any(|r| {
            r.priority >= s.priority
                && r.hashes.get(hits) == Some(&next)
                && r.computed < (hits + 1) * bs
        })
    }

    /// The position in `queue` of the first sequence not deferred.
    fn pick(&self, queue: &VecDeque<Seq<T>>) -> Option<usize> {
        queue.iter().position(|s| !self.deferred(s))
    }

    /// Records that a step ran: `computed` advances by what each entry fed,
    /// and the blocks it filled join the prefix cache.
    pub fn advance(&mut self, plan: &Plan) {
        self.advance_where(plan, |_| true);
    }

    /// [`State::advance`], caching the filled blocks only of the sequences
    /// for which `cacheable` holds (not those whose forward pass failed:
    /// their keys and values are not to be trusted).
    pub fn advance_where(&mut self, plan: &Plan, cacheable: impl Fn(&Seq<T>) -> bool) {
        let caching = self.alloc.prefix_caching();
        let bs = self.alloc.block_size();
        for e in &plan.entries {
            let Some(s) = self.running.get_mut(e.index) else {
                continue;
            };
            s.computed = e.start + e.len;
            if caching && cacheable(s) {
                let full = (s.computed / bs).min(s.blocks.len() / self.alloc.groups());
                if full > s.offered {
                    s.hash_blocks(&self.alloc, s.computed);
                    for j in s.offered..full.min(s.hashes.len()) {
                        self.alloc.register_logical(&s.blocks, j, s.hashes[j]);
                    }
                    s.offered = full;
                }
            }
            // Sliding-window layer groups give back what no later position sees.
            self.window_freed += self.alloc.trim(&mut s.blocks, s.computed) as u64;
        }
    }

    /// Checks the allocator's invariant against the running sequences'
    /// block tables (waiting sequences hold none).
    pub fn audit(&self) -> Result<(), String> {
        if let Some(s) = self.waiting().find(|s| !s.blocks.is_empty()) {
            return Err(format!("waiting sequence {} holds blocks", s.id));
        }
        self.alloc
            .audit(self.running.iter().map(|s| s.blocks.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A stand-in model whose next token depends on the whole prefix, so any
    /// mistake in what was computed changes the output.
    fn next_token(prefix: &[u32]) -> u32 {
        prefix
            .iter()
            .fold(17u32, |h, &t| h.wrapping_mul(31).wrapping_add(t))
            % 1000
    }

    struct Outcome {
        outputs: Vec<(u64, Vec<u32>)>,
        preemptions: u64,
        /// Prompt tokens fed (prefill and recomputation).
        prefilled: usize,
        /// Tokens the prefix cache supplied at admissions.
        hits: usize,
        /// Blocks copied on write.
        copies: usize,
    }

    /// How [`drive_with`] runs.
    #[derive(Clone, Copy, Default)]
    struct Opts {
        /// Prefix caching on.
        caching: bool,
        /// Leading tokens a prompt shares with its family's (arrival `i`
        /// belongs to family `i % families`); 0: every prompt unique.
        shared: usize,
        families: usize,
        /// Cancel arrival `i` from step `i * cancel_every / 2` on when
        /// `i % cancel_every == 1` (0: no cancellations).
        cancel_every: usize,
        /// A second layer group with this sliding window (the pool then
        /// needs twice the blocks for the same sequences).
        window: Option<usize>,
    }

    /// The fake KV content of position `p` of `tokens`: the token and a
    /// hash of the whole prefix through it, so a block holding another
    /// prefix's keys and values is caught.
    fn kv_entry(tokens: &[u32], p: usize) -> (u32, u64) {
        let h = tokens[..=p].iter().fold(7u64, |h, &t| {
            h.wrapping_mul(1_000_003).wrapping_add(u64::from(t))
        });
        (tokens[p], h)
    }

    /// Drives the state to completion, checking the step invariants.
    fn drive(
        limits: Limits,
        blocks: usize,
        arrivals: &[(usize, usize, usize, Priority)],
    ) -> Outcome {
        drive_with(limits, blocks, arrivals, Opts::default())
    }

    /// Drives the state to completion over a fake KV pool: each step reads
    /// every position before an entry's start from the sequence's blocks
    /// (they must hold its own prefix, whether computed or taken from the
    /// cache) and writes its fed positions, never into a block another
    /// sequence holds. After every plan and every step the allocator's
    /// invariant holds; idle, every block is free or cached.
    fn drive_with(
        limits: Limits,
        blocks: usize,
        arrivals: &[(usize, usize, usize, Priority)],
        opts: Opts,
    ) -> Outcome {
        const BS: usize = 4;
        let windows = match opts.window {
            Some(w) => vec![None, Some(w)],
            None => vec![None],
        };
        let groups = windows.len();
        let alloc = BlockAllocator::new(blocks, BS)
            .with_windows(windows.clone())
            .with_prefix_caching(opts.caching);
        let mut st: State<()> = State::new(limits, alloc);
        let mut kv: Vec<Option<(u32, u64)>> = vec![None; blocks * BS];
        let mut outputs = vec![];
        let (mut prefilled, mut hits, mut copies) = (0, 0, 0);
        let mut steps = 0;
        let mut pending: Vec<_> = arrivals.iter().enumerate().collect();
        pending.sort_by_key(|(_, a)| a.0);
        let mut pending = std::collections::VecDeque::from(pending);
        while !(pending.is_empty() && st.is_idle()) {
            while pending.front().is_some_and(|(_, a)| a.0 <= steps) {
                let Some((i, &(_, prompt, max_new, prio))) = pending.pop_front() else {
                    break;
                };
                let family = (i % opts.families.max(1)) as u32;
                let prompt: Vec<u32> = (0..prompt as u32)
                    .map(|t| {
                        if (t as usize) < opts.shared {
                            500 + (family * 131 + t * 7) % 400
                        } else {
                            t + i as u32
                        }
                    })
                    .collect();
                st.enqueue(Seq::new(i as u64, prio, prompt, max_new, ()));
            }
            if opts.cancel_every > 0 {
                let every = opts.cancel_every;
                st.remove_where(|s| {
                    let i = s.id as usize;
                    i % every == 1 && steps >= i * every / 2
                });
            }
            let plan = st.plan();
            st.audit().unwrap();
            // Copy-on-write: the engine copies these blocks before the step.
            for &(index, from, to) in &plan.copies {
                let s = &st.running[index];
                assert!(
                    s.blocks.contains(&to)
                        && st
                            .running
                            .iter()
                            .all(|o| o.id == s.id || !o.blocks.contains(&to)),
                    "a copy into a block its sequence does not own alone"
                );
                for i in 0..BS {
                    kv[to as usize * BS + i] = kv[from as usize * BS + i];
                }
            }
            hits += plan.cache_hits;
            copies += plan.copies.len();
            prefilled += plan.prefill_tokens;
            assert!(
                plan.tokens() <= limits.max_batched_tokens,
                "token budget exceeded"
            );
            assert!(
                st.running.len() <= limits.max_running,
                "running cap exceeded"
            );
            let mut seen = std::collections::HashSet::new();
            for e in &plan.entries {
                assert!(seen.insert(e.index), "a sequence scheduled twice");
                let s = &st.running[e.index];
                assert_eq!(e.start, s.computed, "feeds from where the cache ends");
                assert!(
                    s.blocks.len() / groups * BS >= e.start + e.len,
                    "blocks cover what is fed"
                );
                for (g, w) in windows.iter().enumerate() {
                    // What the fed positions see: everything before them, or
                    // their window.
                    let lo = w.map_or(0, |w| (e.start + 1).saturating_sub(w));
                    for p in lo..e.start {
                        let b = s.blocks[p / BS * groups + g];
                        assert_ne!(b, crate::engine::NIL, "group {g} lost position {p}");
                        assert_eq!(
                            kv[b as usize * BS + p % BS],
                            Some(kv_entry(&s.tokens, p)),
                            "sequence {} reads another prefix at {p} (group {g})",
                            s.id
                        );
                    }
                    for p in e.start..e.start + e.len {
                        let b = s.blocks[p / BS * groups + g];
                        assert!(
                            st.running
                                .iter()
                                .all(|o| o.id == s.id || !o.blocks.contains(&b)),
                            "sequence {} writes block {b}, which another holds",
                            s.id
                        );
                        kv[b as usize * BS + p % BS] = Some(kv_entry(&s.tokens, p));
                    }
                }
            }
            st.advance(&plan);
            st.audit().unwrap();
            for e in &plan.entries {
                if e.sample {
                    let s = &mut st.running[e.index];
                    // The next token from what the cache holds.
                    let prefix: Vec<u32> = (0..s.tokens.len())
                        .map(|p| {
                            let slot = s.blocks[p / BS * groups] as usize * BS + p % BS;
                            kv[slot].map_or(u32::MAX, |(t, _)| t)
                        })
                        .collect();
                    let t = next_token(&prefix);
                    s.tokens.push(t);
                }
            }
            for s in st.remove_where(|s| s.generated() >= s.max_new_tokens) {
                outputs.push((s.id, s.tokens[s.prompt_len..].to_vec()));
            }
            st.audit().unwrap();
            steps += 1;
            assert!(steps < 100_000, "no progress");
        }
        assert_eq!(st.allocator().free(), blocks, "pool back to full when idle");
        st.audit().unwrap();
        if !opts.caching {
            assert_eq!(st.allocator().cached(), 0);
        }
        outputs.sort();
        Outcome {
            outputs,
            preemptions: st.preemptions_total,
            prefilled,
            hits,
            copies,
        }
    }

    proptest! {
        #[test]
        fn budgets_hold_and_every_request_is_served(
            arrivals in proptest::collection::vec(
                (0usize..40, 1usize..60, 1usize..20, prop_oneof![Just(Priority::Normal), Just(Priority::Low)]),
                1..40),
            max_batched in 8usize..64,
            max_running in 1usize..8,
            blocks in 40usize..80,
        ) {
            let limits = Limits { max_batched_tokens: max_batched, max_running };
            let out = drive(limits, blocks, &arrivals);
            prop_assert_eq!(out.outputs.len(), arrivals.len());
            for (id, toks) in &out.outputs {
                prop_assert_eq!(toks.len(), arrivals[*id as usize].2);
            }
        }
    }

    proptest! {
        #[test]
        fn prefix_caching_changes_no_token_and_leaks_no_block(
            arrivals in proptest::collection::vec(
                (0usize..40, 1usize..60, 1usize..20, prop_oneof![Just(Priority::Normal), Just(Priority::Low)]),
                1..40),
            max_batched in 8usize..64,
            max_running in 1usize..8,
            blocks in 40usize..80,
            shared in 0usize..40,
            families in 1usize..4,
        ) {
            let limits = Limits { max_batched_tokens: max_batched, max_running };
            let off = Opts { caching: false, shared, families, cancel_every: 0, window: None };
            let on = Opts { caching: true, ..off };
            let plain = drive_with(limits, blocks, &arrivals, off);
            let cached = drive_with(limits, blocks, &arrivals, on);
            prop_assert_eq!(&plain.outputs, &cached.outputs);
            // Cancelling some of them (waiting or running) leaks nothing
            // either, and the others' tokens stay the same.
            let cancelled = drive_with(limits, blocks, &arrivals, Opts { cancel_every: 3, ..on });
            let kept: Vec<_> = plain
                .outputs
                .iter()
                .filter(|(id, _)| cancelled.outputs.iter().any(|(c, _)| c == id))
                .cloned()
                .collect();
            prop_assert_eq!(kept, cancelled.outputs);
            // A sliding-window group beside the full one (twice the blocks
            // for the same room): every fed position still sees its window,
            // with and without the cache, and nothing leaks.
            for caching in [false, true] {
                let windowed = Opts { window: Some(6), caching, ..off };
                let out = drive_with(limits, 2 * blocks, &arrivals, windowed);
                prop_assert_eq!(&plain.outputs, &out.outputs);
            }
        }
    }

    #[test]
    fn a_sliding_window_group_gives_its_blocks_back_as_the_window_moves() {
        const BS: usize = 4;
        let limits = Limits {
            max_batched_tokens: 64,
            max_running: 4,
        };
        let alloc = BlockAllocator::new(64, BS).with_windows(vec![None, Some(8)]);
        let mut st: State<()> = State::new(limits, alloc);
        st.enqueue(Seq::new(0, Priority::Normal, (0..10).collect(), 50, ()));
        let mut most_window_blocks = 0;
        while !st.is_idle() {
            let plan = st.plan();
            st.advance(&plan);
            st.audit().unwrap();
            let s = &st.running[0];
            let held = |g: usize| {
                s.blocks
                    .iter()
                    .skip(g)
                    .step_by(2)
                    .filter(|&&b| b != crate::engine::NIL)
                    .count()
            };
            // The full group holds every position; the window group what
            // positions from `computed` on still see: 8 positions span at
            // most 3 blocks of 4.
            assert_eq!(held(0), s.tokens.len().div_ceil(BS));
            assert!(held(1) <= 3, "{} window blocks held", held(1));
            most_window_blocks = most_window_blocks.max(held(1));
            assert_eq!(
                st.allocator().total() - st.allocator().free(),
                held(0) + held(1),
                "the pool counts exactly what the tables hold"
            );
            let s = &mut st.running[0];
            s.tokens.push(1);
            st.remove_where(|s| s.generated() >= s.max_new_tokens);
        }
        assert_eq!(most_window_blocks, 3);
        // 60 positions: 15 blocks per group; the window group gave back 13
        // (it ends holding 2) and then the rest on release.
        assert_eq!(st.window_freed, 13);
        assert_eq!(st.allocator().free(), 64);
    }

    #[test]
    fn a_shared_prompt_is_prefilled_once_and_its_last_block_copied_on_write() {
        let limits = Limits {
            max_batched_tokens: 64,
            max_running: 8,
        };
        // Four identical 22-token prompts arriving together (the choices of
        // one request): five full blocks of 4, two tokens in a sixth.
        let arrivals = [(0, 22, 5, Priority::Normal); 4];
        let opts = Opts {
            caching: true,
            shared: 22,
            families: 1,
            cancel_every: 0,
            window: None,
        };
        let out = drive_with(limits, 100, &arrivals, opts);
        // The first feeds 22; each other takes 5 blocks from the cache,
        // copies the first's partial last block into one of its own and
        // computes only its last token (whose row it samples).
        assert_eq!(out.hits, 3 * 21);
        assert_eq!(out.prefilled, 22 + 3);
        let plain = drive_with(
            limits,
            100,
            &arrivals,
            Opts {
                caching: false,
                ..opts
            },
        );
        assert_eq!(plain.prefilled, 4 * 22);
        assert_eq!(out.outputs, plain.outputs);
        assert_eq!(out.copies, 3);
        // Under preemption (13 blocks a sequence, 16 in the pool): resumed
        // sequences copy siblings' partial blocks too, and every read
        // still finds its own prefix.
        let long = [(0, 22, 30, Priority::Normal); 4];
        let tight = drive_with(limits, 16, &long, opts);
        let roomy = drive_with(
            limits,
            100,
            &long,
            Opts {
                caching: false,
                ..opts
            },
        );
        assert!(tight.preemptions > 0);
        assert!(tight.copies > 3, "{} copies", tight.copies);
        assert_eq!(tight.outputs, roomy.outputs);
        // A prompt of whole blocks never shares its last block (the last
        // token's row gives the first sampled token): it is copied too.
        let aligned = drive_with(
            limits,
            100,
            &[(0, 20, 5, Priority::Normal); 3],
            Opts { shared: 20, ..opts },
        );
        assert_eq!(aligned.hits, 2 * 19);
        assert_eq!(aligned.prefilled, 20 + 2);
        // Shorter than a block: the whole prompt but its last token is copied.
        let short = drive_with(
            limits,
            100,
            &[(0, 3, 5, Priority::Normal); 3],
            Opts { shared: 3, ..opts },
        );
        assert_eq!(short.prefilled, 3 + 2);
    }

    #[test]
    fn a_sequence_waits_for_the_prefix_another_is_computing_and_others_go_first() {
        let limits = Limits {
            max_batched_tokens: 12,
            max_running: 8,
        };
        let mut st: State<()> = State::new(
            limits,
            BlockAllocator::new(100, 4).with_prefix_caching(true),
        );
        let prompt: Vec<u32> = (0..20).collect();
        st.enqueue(Seq::new(1, Priority::Normal, prompt.clone(), 3, ()));
        st.enqueue(Seq::new(2, Priority::Normal, prompt.clone(), 3, ()));
        st.enqueue(Seq::new(3, Priority::Normal, vec![9; 5], 3, ()));
        // 1 takes the whole budget (positions 0..12).
        let p = st.plan();
        assert_eq!(st.running.len(), 1);
        st.advance(&p);
        // 1 computes 12..20. 2 finds three blocks cached, but the fourth is
        // 1's to compute this step: 2 waits, and 3 (unrelated) goes first.
        let p = st.plan();
        let ids: Vec<u64> = st.running.iter().map(|s| s.id).collect();
        assert_eq!(ids, [1, 3]);
        assert_eq!(p.cache_hits, 0);
        assert_eq!(st.waiting().map(|s| s.id).collect::<Vec<_>>(), [2]);
        st.advance(&p);
        st.running[0].tokens.push(1);
        // Now 2 takes four blocks, copies 1's fifth and computes only its
        // last token.
        let p = st.plan();
        let two = st.running.iter().position(|s| s.id == 2).unwrap();
        let e = p.entries.iter().find(|e| e.index == two).unwrap();
        assert_eq!(
            (e.start, e.len),
            (19, 1),
            "four blocks cached, the fifth copied"
        );
        assert_eq!(p.cache_hits, 19);
        let (one, own) = (st.running[0].blocks[4], st.running[two].blocks[4]);
        assert_eq!(p.copies, [(two, one, own)]);
        assert_ne!(one, own, "the copy is 2's own block");
        st.advance(&p);
        st.audit().unwrap();
    }

    #[test]
    fn a_preempted_sequence_takes_its_own_blocks_back_from_the_cache() {
        let limits = Limits {
            max_batched_tokens: 64,
            max_running: 4,
        };
        let mut st: State<()> = State::new(
            limits,
            BlockAllocator::new(100, 4).with_prefix_caching(true),
        );
        st.enqueue(Seq::new(1, Priority::Low, (0..30).collect(), 50, ()));
        let p = st.plan();
        st.advance(&p);
        st.running[0].tokens.push(7);
        let p = st.plan();
        st.advance(&p);
        st.running[0].tokens.push(8);
        // 32 tokens, 31 computed: seven full blocks are cached.
        st.preempt(0);
        st.audit().unwrap();
        assert_eq!(st.allocator().evictable(), 7);
        let p = st.plan();
        assert_eq!(
            p.cache_hits, 28,
            "seven blocks back; the last token's block recomputed"
        );
        assert_eq!(p.entries[0].start, 28);
        assert_eq!(p.entries[0].len, 4);
        assert!(p.entries[0].sample);
        st.advance(&p);
        st.audit().unwrap();
    }

    #[test]
    fn a_scoring_job_never_takes_a_scored_position_from_the_cache() {
        let limits = Limits {
            max_batched_tokens: 64,
            max_running: 4,
        };
        let mut st: State<()> = State::new(
            limits,
            BlockAllocator::new(100, 4).with_prefix_caching(true),
        );
        let tokens: Vec<u32> = (0..24).collect();
        st.enqueue(Seq::new(1, Priority::Normal, tokens.clone(), 1, ()));
        let p = st.plan();
        st.advance(&p);
        st.remove_where(|_| true);
        assert_eq!(st.allocator().evictable(), 6);
        // Scores from position 9: blocks 0 and 1 (positions 0..8) may come
        // from the cache, block 2 holds position 9.
        st.enqueue(Seq::new(2, Priority::Normal, tokens.clone(), 1, ()).needs_logits_from(9));
        // A drift probe scores every position: nothing from the cache.
        st.enqueue(Seq::new(3, Priority::Low, tokens, 1, ()).needs_logits_from(0));
        let p = st.plan();
        let start = |id| {
            let i = st.running.iter().position(|s| s.id == id).unwrap();
            p.entries.iter().find(|e| e.index == i).unwrap().start
        };
        assert_eq!(start(2), 8);
        assert_eq!(start(3), 0);
        assert_eq!(p.cache_hits, 8);
        assert_eq!(
            p.cache_queries, 24,
            "the probe, which may read nothing, is no query"
        );
    }

    #[test]
    fn preempted_sequences_produce_the_same_tokens() {
        let arrivals: Vec<_> = (0..12)
            .map(|i| (i, 10 + i * 3, 30, Priority::Normal))
            .collect();
        let limits = Limits {
            max_batched_tokens: 64,
            max_running: 12,
        };
        let roomy = drive(limits, 1000, &arrivals);
        let tight = drive(limits, 40, &arrivals);
        assert_eq!(roomy.preemptions, 0);
        assert!(
            tight.preemptions > 0,
            "the small pool must force preemption"
        );
        assert_eq!(roomy.outputs, tight.outputs);
        // With prefix caching, and prompts sharing their first 24 tokens in
        // three families: hits, preemptions, the same tokens.
        let opts = Opts {
            caching: true,
            shared: 24,
            families: 3,
            cancel_every: 0,
            window: None,
        };
        let cached_tight = drive_with(limits, 40, &arrivals, opts);
        assert!(cached_tight.preemptions > 0);
        assert!(cached_tight.hits > 0);
        let plain = drive_with(
            limits,
            1000,
            &arrivals,
            Opts {
                caching: false,
                ..opts
            },
        );
        assert_eq!(plain.outputs, cached_tight.outputs);
        let plain_tight = drive_with(
            limits,
            40,
            &arrivals,
            Opts {
                caching: false,
                ..opts
            },
        );
        assert_eq!(plain.outputs, plain_tight.outputs);
        assert!(cached_tight.prefilled < plain_tight.prefilled);
    }

    #[test]
    fn a_long_prompt_never_stalls_decodes_for_more_than_a_chunk() {
        let limits = Limits {
            max_batched_tokens: 16,
            max_running: 4,
        };
        let mut st: State<()> = State::new(limits, BlockAllocator::new(100, 4));
        st.enqueue(Seq::new(1, Priority::Normal, vec![1, 2, 3], 50, ()));
        let p = st.plan();
        st.advance(&p);
        st.running[0].tokens.push(9);
        st.enqueue(Seq::new(2, Priority::Normal, (0..200).collect(), 5, ()));
        for _ in 0..10 {
            let p = st.plan();
            assert!(
                p.entries.iter().any(|e| st.running[e.index].id == 1),
                "the decode runs every step"
            );
            assert!(p.prefill_tokens <= 15);
            st.advance(&p);
            for e in &p.entries {
                if e.sample {
                    st.running[e.index].tokens.push(1);
                }
            }
        }
    }

    #[test]
    fn low_priority_yields_to_normal_traffic() {
        let limits = Limits {
            max_batched_tokens: 64,
            max_running: 2,
        };
        let mut st: State<()> = State::new(limits, BlockAllocator::new(100, 4));
        st.enqueue(Seq::new(1, Priority::Low, vec![1; 8], 50, ()));
        st.enqueue(Seq::new(2, Priority::Low, vec![2; 8], 50, ()));
        let p = st.plan();
        st.advance(&p);
        assert_eq!(st.running.len(), 2);
        st.enqueue(Seq::new(3, Priority::Normal, vec![3; 8], 5, ()));
        let p = st.plan();
        assert_eq!(p.preempted, 1);
        assert!(st.running.iter().any(|s| s.id == 3));
        // The youngest low-priority sequence went back to wait.
        assert_eq!(st.waiting().next().map(|s| s.id), Some(2));
    }

    #[test]
    fn cancelling_frees_every_block() {
        let limits = Limits {
            max_batched_tokens: 64,
            max_running: 8,
        };
        let mut st: State<()> = State::new(limits, BlockAllocator::new(50, 4));
        for i in 0..6 {
            st.enqueue(Seq::new(
                i,
                Priority::Normal,
                vec![1; 10 + i as usize],
                9,
                (),
            ));
        }
        let p = st.plan();
        st.advance(&p);
        assert!(st.allocator().free() < 50);
        let gone = st.remove_where(|s| s.id % 2 == 0);
        assert_eq!(gone.len(), 3);
        st.remove_where(|_| true);
        assert_eq!(st.allocator().free(), 50);
        assert!(st.is_idle());
    }
}
