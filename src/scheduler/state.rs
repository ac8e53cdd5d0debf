//! The scheduling state: who waits, who runs, which blocks they own, and the
//! plan of each step. A plain struct with no I/O, so tests drive it directly.
//!
//! Every step: decodes first (one token each, growing block tables and
//! preempting the youngest, lowest-priority sequence when the pool runs dry),
//! then prefill chunks of running sequences, then admissions in FCFS order
//! while the token budget, the running cap and the KV pool allow.

use std::collections::VecDeque;

use crate::engine::BlockAllocator;

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
            admitted: 0,
            preemptions: 0,
            payload,
        }
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
        }
    }

    /// The block allocator (free blocks, usage).
    pub fn allocator(&self) -> &BlockAllocator {
        &self.alloc
    }

    /// Queues a sequence.
    pub fn enqueue(&mut self, seq: Seq<T>) {
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
            let need = self.alloc.blocks_for(head.tokens.len());
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
        // Admissions: normal class first, FCFS; the head of the queue blocks the
        // rest, so a large request is never overtaken forever.
        while budget > 0 && self.running.len() < self.limits.max_running {
            let queue = if self.waiting_normal.is_empty() {
                &mut self.waiting_low
            } else {
                &mut self.waiting_normal
            };
            let Some(head) = queue.front() else {
                break;
            };
            let reserve = match head.priority {
                Priority::Low => self.alloc.total() / LOW_PRIORITY_KV_RESERVE,
                Priority::Normal => 0,
            };
            if self.alloc.blocks_for(head.tokens.len()) + reserve > self.alloc.free() {
                break;
            }
            let Some(mut s) = queue.pop_front() else {
                break;
            };
            if !self.alloc.grow(&mut s.blocks, s.tokens.len()) {
                queue.push_front(s);
                break;
            }
            self.admissions += 1;
            s.admitted = self.admissions;
            let len = budget.min(s.tokens.len()).min(s.chunk_cap());
            plan.entries.push(PlanEntry {
                index: self.running.len(),
                start: 0,
                len,
                sample: len == s.tokens.len(),
            });
            plan.prefill_tokens += len;
            budget -= len;
            self.running.push(s);
        }
        plan
    }

    /// Records that a step ran: `computed` advances by what each entry fed.
    pub fn advance(&mut self, plan: &Plan) {
        for e in &plan.entries {
            if let Some(s) = self.running.get_mut(e.index) {
                s.computed = e.start + e.len;
            }
        }
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
    }

    /// Drives the state to completion, checking the step invariants.
    fn drive(
        limits: Limits,
        blocks: usize,
        arrivals: &[(usize, usize, usize, Priority)],
    ) -> Outcome {
        let mut st: State<()> = State::new(limits, BlockAllocator::new(blocks, 4));
        let mut outputs = vec![];
        let mut steps = 0;
        let mut pending: Vec<_> = arrivals.iter().enumerate().collect();
        pending.sort_by_key(|(_, a)| a.0);
        let mut pending = std::collections::VecDeque::from(pending);
        while !(pending.is_empty() && st.is_idle()) {
            while pending.front().is_some_and(|(_, a)| a.0 <= steps) {
                let Some((i, &(_, prompt, max_new, prio))) = pending.pop_front() else {
                    break;
                };
                let prompt: Vec<u32> = (0..prompt as u32).map(|t| t + i as u32).collect();
                st.enqueue(Seq::new(i as u64, prio, prompt, max_new, ()));
            }
            let plan = st.plan();
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
                    s.blocks.len() * 4 >= e.start + e.len,
                    "blocks cover what is fed"
                );
            }
            st.advance(&plan);
            for e in &plan.entries {
                if e.sample {
                    let s = &mut st.running[e.index];
                    let t = next_token(&s.tokens);
                    s.tokens.push(t);
                }
            }
            for s in st.remove_where(|s| s.generated() >= s.max_new_tokens) {
                outputs.push((s.id, s.tokens[s.prompt_len..].to_vec()));
            }
            steps += 1;
            assert!(steps < 100_000, "no progress");
        }
        assert_eq!(st.allocator().free(), blocks, "pool back to full when idle");
        outputs.sort();
        Outcome {
            outputs,
            preemptions: st.preemptions_total,
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
