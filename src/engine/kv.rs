//! The paged KV cache: a preallocated pool of fixed-size blocks, a free list,
//! and each sequence's block table. Storage only: attention over it is
//! `cpu::attn`, and the forward pass's buffers live beside it
//! ([`super::Scratch`]), not inside it.
//!
//! Layout of one layer's keys (values alike) in host memory (the host path):
//! `[block][kv_head][slot][dim]`, so the keys one head reads within a block
//! are contiguous. On a device (the tensor path): one tensor per layer of
//! `[block * block_size + slot, kv_heads * head_dim]` rows, written by a
//! scatter and read by gathering a sequence's rows (`tensor.rs`). The block
//! accounting ([`BlockAllocator`], block tables) is the same for both.
//!
//! Automatic prefix caching lives in the allocator too: a full block whose
//! keys and values are final is registered under the hash of its tokens and
//! its prefix ([`BlockHash`]); another sequence with the same prefix takes
//! it by reference instead of computing it again, and a cached block no
//! sequence holds stays for reuse until a fresh block is needed (LRU).

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

use candle_core::{DType, Device, Tensor};
use half::f16;

use super::batch::SeqView;
use super::{Error, Result};

/// A full block's identity in the prefix cache: a keyed hash of its parent
/// block's hash and its own token ids, so equal hashes mean equal prefixes
/// (128 bits from two independently keyed SipHashes: a collision, which
/// would hand one prompt another's keys and values, is not a practical
/// concern, and the random keys keep clients from crafting one).
pub type BlockHash = u128;

/// Folds a [`BlockHash`] (already uniformly random) into a map key.
#[derive(Debug, Default, Clone, Copy)]
struct Fold(u64);

impl Hasher for Fold {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.0 = (v as u64) ^ ((v >> 64) as u64);
    }
}

/// No block: the LRU list's sentinel and its empty links, and a table
/// entry whose block a sliding-window group has given back.
pub const NIL: u32 = u32::MAX;

/// Distinguishes a layer group's copy of a block in the prefix cache.
const GROUP_SALT: u128 = 0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835;

/// Hands out block ids, and with prefix caching keeps full blocks that no
/// sequence holds any more for reuse. Knows nothing of tensors, so the
/// scheduler can plan admissions with it in unit tests.
///
/// Invariant: every id in `0..total` is exactly one of
/// - *free*: in `free`, no references, no hash;
/// - *cached and evictable*: no references, a hash, in the LRU list;
/// - *referenced*: its reference count is the number of block tables that
///   hold it (more than one only for a cached block, shared read-only).
///
/// A cached block's keys and values are never written again while cached:
/// a sequence writes only positions from its `computed` on, which lie past
/// the cached blocks it took. Free and evictable blocks together are the
/// capacity admissions may use ([`BlockAllocator::free`]); an evictable
/// block is reused (its hash forgotten) only when no free one is left, the
/// least recently released first. [`BlockAllocator::audit`] checks all of
/// this.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    total: usize,
    /// Blocks holding nothing anyone can reuse.
    free: Vec<u32>,
    /// Block tables holding each block.
    refs: Vec<u32>,
    /// Each block's hash while it is in the cache.
    hash_of: Vec<Option<BlockHash>>,
    /// The cache: hash → block. Capacity for every block is reserved up
    /// front, so inserting never allocates.
    cached: HashMap<BlockHash, u32, BuildHasherDefault<Fold>>,
    /// Evictable blocks (cached, unreferenced) as a doubly linked list
    /// through these arrays, least recently released first; index `total`
    /// is the sentinel.
    prev: Vec<u32>,
    next: Vec<u32>,
    evictable: usize,
    /// The hash keys; `None` when prefix caching is off.
    keys: Option<Box<(RandomState, RandomState)>>,
    /// Each layer group's sliding window (`None`: full attention); see
    /// [`KvGroups`]. A table holds one entry per group for each logical
    /// block, `[block][group]`, and [`NIL`] where a sliding group's block
    /// fell out of its window.
    windows: Vec<Option<usize>>,
}

impl BlockAllocator {
    /// A pool of `total` blocks of `block_size` tokens, without prefix
    /// caching (see [`BlockAllocator::with_prefix_caching`]).
    pub fn new(total: usize, block_size: usize) -> Self {
        // Pop from the end hands out low ids first, which keeps tests readable.
        let free = (0..total as u32).rev().collect();
        let sentinel = total as u32;
        Self {
            block_size,
            total,
            free,
            refs: vec![0; total],
            hash_of: vec![None; total],
            cached: HashMap::default(),
            prev: vec![sentinel; total + 1],
            next: vec![sentinel; total + 1],
            evictable: 0,
            keys: None,
            windows: vec![None],
        }
    }

    /// Splits every logical block into one block per layer group, each
    /// group with its window (see [`KvGroups`]); before any block is used.
    pub fn with_windows(mut self, windows: Vec<Option<usize>>) -> Self {
        if !windows.is_empty() {
            self.windows = windows;
        }
        self
    }

    /// Layer groups: table entries per logical block.
    pub fn groups(&self) -> usize {
        self.windows.len()
    }

    /// The first logical block a sliding group must still hold once the
    /// positions before `next` are cached: the next token, at `next`,
    /// attends to `next + 1 - window ..= next`.
    fn first_live(&self, window: Option<usize>, next: usize) -> usize {
        window.map_or(0, |w| (next + 1).saturating_sub(w) / self.block_size)
    }

    /// The prefix-cache key of group `g`'s block for `hash`.
    fn key(hash: BlockHash, g: usize) -> BlockHash {
        hash ^ GROUP_SALT.wrapping_mul(g as u128)
    }

    /// Turns automatic prefix caching on or off (before any block is used).
    pub fn with_prefix_caching(mut self, on: bool) -> Self {
        if on {
            self.cached.reserve(self.total);
            self.keys = Some(Box::new((RandomState::new(), RandomState::new())));
        } else {
            self.keys = None;
        }
        self
    }

    /// Whether full blocks are cached for reuse.
    pub fn prefix_caching(&self) -> bool {
        self.keys.is_some()
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks no sequence holds: free ones plus cached ones that can be
    /// evicted. This is the capacity admission and growth may use.
    pub fn free(&self) -> usize {
        self.free.len() + self.evictable
    }

    /// Cached blocks no sequence holds (kept for reuse, evictable).
    pub fn evictable(&self) -> usize {
        self.evictable
    }

    /// Blocks in the prefix cache, held or not.
    pub fn cached(&self) -> usize {
        self.cached.len()
    }

    /// Blocks (table entries, every group's) needed to hold `tokens`
    /// positions from the first.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size) * self.groups()
    }

    /// The hash of a full block of `tokens` after the block hashed `parent`
    /// (`None` for a sequence's first block). Zero when caching is off.
    pub fn hash_block(&self, parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        let Some(keys) = &self.keys else {
            return 0;
        };
        let half = |k: &RandomState| {
            let mut h = k.build_hasher();
            parent.hash(&mut h);
            tokens.hash(&mut h);
            h.finish()
        };
        (u128::from(half(&keys.0)) << 64) | u128::from(half(&keys.1))
    }

    /// How many leading logical blocks of `hashes` the cache can stand in
    /// for, and how many blocks that takes which no sequence holds (taking
    /// them uses up free capacity). A full-attention group needs every
    /// block of the prefix; a sliding group only those the first position
    /// after it still sees.
    pub fn lookup(&self, hashes: &[BlockHash]) -> (usize, usize) {
        if self.keys.is_none() {
            return (0, 0);
        }
        let present = |b: usize, g: usize| self.cached.get(&Self::key(hashes[b], g)).copied();
        let mut hits = hashes.len();
        for (g, w) in self.windows.iter().enumerate() {
            if w.is_none() {
                hits = (0..hits).find(|&b| present(b, g).is_none()).unwrap_or(hits);
            }
        }
        while hits > 0 {
            let ok = self.windows.iter().enumerate().all(|(g, &w)| {
                w.is_none()
                    || (self.first_live(w, hits * self.block_size)..hits)
                        .all(|b| present(b, g).is_some())
            });
            if ok {
                break;
            }
            hits -= 1;
        }
        let mut evictable = 0;
        for (g, &w) in self.windows.iter().enumerate() {
            for b in self.first_live(w, hits * self.block_size)..hits {
                if present(b, g).is_some_and(|p| self.refs[p as usize] == 0) {
                    evictable += 1;
                }
            }
        }
        (hits, evictable)
    }

    /// Appends the cached blocks [`BlockAllocator::lookup`] finds for
    /// `hashes` to `table`, one reference each ([`NIL`] for those a
    /// sliding group no longer needs). Returns how many logical blocks it
    /// covered.
    pub fn share(&mut self, table: &mut Vec<u32>, hashes: &[BlockHash]) -> usize {
        let (hits, _) = self.lookup(hashes);
        let bs = self.block_size;
        for (b, &h) in hashes.iter().enumerate().take(hits) {
            for g in 0..self.groups() {
                if b < self.first_live(self.windows[g], hits * bs) {
                    table.push(NIL);
                    continue;
                }
                let Some(&p) = self.cached.get(&Self::key(h, g)) else {
                    table.push(NIL);
                    continue;
                };
                if self.refs[p as usize] == 0 {
                    self.unlink(p);
                }
                self.refs[p as usize] += 1;
                table.push(p);
            }
        }
        hits
    }

    /// Offers logical block `j` of `table` (every group's block of it),
    /// whose keys and values are final, to the cache under `hash`.
    pub fn register_logical(&mut self, table: &[u32], j: usize, hash: BlockHash) {
        let groups = self.groups();
        for g in 0..groups {
            if let Some(&p) = table.get(j * groups + g)
                && p != NIL
            {
                self.register(p, Self::key(hash, g));
            }
        }
    }

    /// Gives back the blocks of `table`'s sliding groups that no position
    /// from `next` on can see (they become free, or evictable when cached).
    /// Returns how many it gave back.
    pub fn trim(&mut self, table: &mut [u32], next: usize) -> usize {
        let groups = self.groups();
        let mut freed = 0;
        for g in 0..groups {
            let live = self.first_live(self.windows[g], next);
            // Dead blocks form a prefix, given back from its end down to
            // the first already given back.
            for b in (0..live.min(table.len() / groups)).rev() {
                let p = std::mem::replace(&mut table[b * groups + g], NIL);
                if p == NIL {
                    break;
                }
                self.drop_ref(p);
                freed += 1;
            }
        }
        freed
    }

    /// One reference fewer to block `b`: nobody holding it makes it free,
    /// or evictable when cached (the most recently released).
    fn drop_ref(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        *r = r.saturating_sub(1);
        if *r == 0 {
            if self.hash_of[b as usize].is_some() {
                self.link_last(b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// Offers a full block, whose keys and values are final, to the cache
    /// under `hash`. Kept out when caching is off, when the block is
    /// cached already, or when another block holds the same prefix (this
    /// one then stays private and is freed, not cached, when released).
    pub fn register(&mut self, block: u32, hash: BlockHash) -> bool {
        let b = block as usize;
        if self.keys.is_none() || b >= self.total || self.hash_of[b].is_some() {
            return false;
        }
        if self.cached.contains_key(&hash) {
            return false;
        }
        self.cached.insert(hash, block);
        self.hash_of[b] = Some(hash);
        true
    }

    /// Grows `table` until it holds `tokens` positions; all or nothing.
    /// Takes free blocks first, then evicts the least recently released
    /// cached ones.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.free() {
            return false;
        }
        for _ in 0..need {
            let b = match self.free.pop() {
                Some(b) => b,
                None => {
                    let b = self.next[self.total];
                    self.unlink(b);
                    if let Some(h) = self.hash_of[b as usize].take() {
                        self.cached.remove(&h);
                    }
                    b
                }
            };
            self.refs[b as usize] = 1;
            table.push(b);
        }
        true
    }

    /// Drops `table`'s reference to each of its blocks and empties it. A
    /// block nobody holds any more becomes free, or evictable when cached;
    /// the table's last blocks become the least recently used, so a
    /// prefix's tail is evicted before its head (which other prompts are
    /// likelier to share).
    pub fn release(&mut self, table: &mut Vec<u32>) {
        for &b in table.iter().rev() {
            if b != NIL {
                self.drop_ref(b);
            }
        }
        table.clear();
    }

    /// Fraction of blocks held by sequences, 0.0 to 1.0 (cached blocks no
    /// sequence holds count as free).
    pub fn usage(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            1.0 - self.free() as f64 / self.total as f64
        }
    }

    fn unlink(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        self.next[p as usize] = n;
        self.prev[n as usize] = p;
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.evictable -= 1;
    }

    fn link_last(&mut self, b: u32) {
        let s = self.total;
        let last = self.prev[s];
        self.next[last as usize] = b;
        self.prev[b as usize] = last;
        self.next[b as usize] = s as u32;
        self.prev[s] = b;
        self.evictable += 1;
    }

    /// The evictable blocks, next to be evicted first.
    pub fn eviction_order(&self) -> impl Iterator<Item = u32> + '_ {
        let s = self.total as u32;
        std::iter::successors(Some(self.next[s as usize]), move |&b| {
            Some(self.next[b as usize])
        })
        .take_while(move |&b| b != s && b != NIL)
    }

    /// Checks the invariant against every block table in use: each block is
    /// free, evictable or referenced exactly as often as tables hold it,
    /// and the cache's map, the blocks' hashes and the LRU list agree.
    pub fn audit<'a>(&self, tables: impl IntoIterator<Item = &'a [u32]>) -> Result<(), String> {
        let mut held = vec![0u32; self.total];
        for t in tables {
            for &b in t.iter().filter(|&&b| b != NIL) {
                let c = held
                    .get_mut(b as usize)
                    .ok_or_else(|| format!("block {b} is outside the pool"))?;
                *c += 1;
            }
        }
        let mut in_free = vec![false; self.total];
        for &b in &self.free {
            if std::mem::replace(&mut in_free[b as usize], true) {
                return Err(format!("block {b} is on the free list twice"));
            }
        }
        let mut in_lru = vec![false; self.total];
        let mut lru = 0;
        for b in self.eviction_order() {
            if std::mem::replace(&mut in_lru[b as usize], true) || lru > self.total {
                return Err(format!("block {b} is in the LRU list twice"));
            }
            lru += 1;
        }
        if lru != self.evictable {
            return Err(format!(
                "{lru} blocks in the LRU list, {} counted",
                self.evictable
            ));
        }
        for b in 0..self.total {
            let (r, h) = (self.refs[b], self.hash_of[b]);
            if r != held[b] {
                return Err(format!(
                    "block {b} has {r} references, {} tables hold it",
                    held[b]
                ));
            }
            let state = (r > 0, in_free[b], in_lru[b]);
            match state {
                (true, false, false) | (false, true, false) | (false, false, true) => {}
                _ => {
                    return Err(format!(
                        "block {b} is not exactly one of free, evictable, referenced \
                         (refs {r}, free {}, evictable {})",
                        in_free[b], in_lru[b]
                    ));
                }
            }
            if in_free[b] && h.is_some() {
                return Err(format!("free block {b} is still cached"));
            }
            if in_lru[b] && h.is_none() {
                return Err(format!("evictable block {b} is not cached"));
            }
            if let Some(h) = h
                && self.cached.get(&h) != Some(&(b as u32))
            {
                return Err(format!("block {b}'s hash maps elsewhere"));
            }
        }
        if self.cached.len() != self.hash_of.iter().flatten().count() {
            return Err("the cache maps hashes no block carries".into());
        }
        Ok(())
    }
}

/// How a model's layers share the cache's blocks. Layers are grouped by
/// their attention window, in groups of equal size, so every block holds
/// the same number of layers (`slots`) and one pool serves all groups: a
/// sequence holds one block per group for each `block_size` positions,
/// and a sliding-window group gives its blocks back as the window moves
/// past them (Gemma 3 270M: 3 full-attention and 15 sliding layers make 1
/// full group and 5 sliding groups of 3 layers; a model without sliding
/// windows is one group of all its layers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvGroups {
    /// Each layer's (group, slot within the group's block).
    of_layer: Vec<(usize, usize)>,
    /// Each group's window.
    windows: Vec<Option<usize>>,
    /// Layers per block.
    slots: usize,
}

impl KvGroups {
    /// One group of `layers` layers, every position kept (no recycling).
    pub fn single(layers: usize) -> Self {
        Self {
            of_layer: (0..layers).map(|l| (0, l)).collect(),
            windows: vec![None],
            slots: layers,
        }
    }

    /// Groups for layers with these windows (`None`: full attention).
    pub fn by_window(layer_windows: &[Option<usize>]) -> Self {
        let mut kinds: Vec<Option<usize>> = vec![];
        for w in layer_windows {
            if !kinds.contains(w) {
                kinds.push(*w);
            }
        }
        if kinds.len() < 2 && kinds.first().is_none_or(|w| w.is_none()) {
            return Self::single(layer_windows.len());
        }
        let count = |k: &Option<usize>| layer_windows.iter().filter(|w| *w == k).count();
        let gcd = |a: usize, b: usize| {
            let (mut a, mut b) = (a, b);
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let slots = kinds.iter().map(count).fold(0, gcd).max(1);
        let mut of_layer = vec![(0, 0); layer_windows.len()];
        let mut windows = vec![];
        for k in &kinds {
            let first = windows.len();
            let members = layer_windows.iter().enumerate().filter(|(_, w)| *w == k);
            for (i, (l, _)) in members.enumerate() {
                of_layer[l] = (first + i / slots, i % slots);
                if i % slots == 0 {
                    windows.push(*k);
                }
            }
        }
        Self {
            of_layer,
            windows,
            slots,
        }
    }

    /// Layer `l`'s (group, slot).
    pub fn of_layer(&self, l: usize) -> (usize, usize) {
        self.of_layer.get(l).copied().unwrap_or((0, l))
    }

    /// Each group's window, for [`BlockAllocator::with_windows`].
    pub fn windows(&self) -> &[Option<usize>] {
        &self.windows
    }

    /// Groups: table entries per logical block.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Never: a model has a layer.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Layers per block.
    pub fn slots(&self) -> usize {
        self.slots
    }
}

/// How the cache stores keys and values.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// Half precision (as llama.cpp's default): twice the tokens per byte;
    /// attention converts to f32 in registers (F16C) and computes in f32.
    #[default]
    F16,
    /// Single precision, exact: for reference runs.
    F32,
}

impl KvDtype {
    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
        }
    }

    /// The candle dtype of a device cache.
    pub fn dtype(self) -> DType {
        match self {
            Self::F16 => DType::F16,
            Self::F32 => DType::F32,
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F16 => "f16",
            Self::F32 => "f32",
        })
    }
}

/// A value the host cache stores: f32 or f16, written from and read as f32.
pub trait KvElem: Copy + Default + Send + Sync + 'static {
    /// Rounds an f32 to this type.
    fn from_f32(v: f32) -> Self;
    /// Widens to f32 (exactly).
    fn to_f32(self) -> f32;
    /// Loads 8 consecutive values as f32 lanes.
    ///
    /// # Safety
    /// `p` must point at 8 readable values; the CPU must have AVX (and F16C
    /// for f16).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: forwarded from the caller.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl KvElem for f16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps};
        // SAFETY: forwarded from the caller (8 halves are 16 bytes).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>())) }
    }
}

/// The shape of the cache.
#[derive(Debug, Clone, Copy)]
pub struct KvShape {
    /// Layers one block holds: every decoder layer, or one group's
    /// ([`KvGroups::slots`]).
    pub layers: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// How values are stored.
    pub dtype: KvDtype,
    /// Layer groups: a block table's entries per logical block.
    pub groups: usize,
}

impl KvShape {
    /// The same shape storing `dtype`.
    pub fn with_dtype(self, dtype: KvDtype) -> Self {
        Self { dtype, ..self }
    }

    /// The shape of blocks holding one of `groups`' groups each.
    pub fn grouped(self, groups: &KvGroups) -> Self {
        Self {
            layers: groups.slots(),
            groups: groups.len(),
            ..self
        }
    }

    /// Tokens `blocks` blocks hold for one sequence that keeps every
    /// position (each logical block takes a block per group).
    pub fn tokens_in(&self, blocks: usize) -> usize {
        blocks / self.groups.max(1) * self.block_size
    }

    /// Bytes one block takes across all layers, keys and values.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.layers * self.kv_heads * self.block_size * self.head_dim * self.dtype.size()
    }

    /// How many blocks fit in `bytes`.
    pub fn blocks_in(&self, bytes: usize) -> usize {
        bytes / self.bytes_per_block().max(1)
    }

    /// Floats of one layer's keys (or values) per block.
    pub fn block_stride(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }
}

/// One layer's keys (or values) in host memory.
pub enum Lanes {
    /// Exact.
    F32(Vec<f32>),
    /// Half precision.
    F16(Vec<f16>),
}

impl Lanes {
    fn zeros(dtype: KvDtype, len: usize) -> Self {
        match dtype {
            KvDtype::F32 => Self::F32(vec![0.0; len]),
            KvDtype::F16 => Self::F16(vec![f16::ZERO; len]),
        }
    }
}

/// Keys and values of one layer.
pub struct LayerKv {
    k: Lanes,
    v: Lanes,
}

/// The block pool's memory: one [`LayerKv`] per layer in host memory, or
/// one pair of tensors per layer on a device.
pub struct KvCache {
    shape: KvShape,
    groups: KvGroups,
    blocks: usize,
    storage: Storage,
}

enum Storage {
    Host(Vec<LayerKv>),
    /// Keys and values per layer, `[blocks * block_size, kv_heads *
    /// head_dim]` in the shape's dtype; empty until the first step
    /// allocates them.
    Device {
        device: Device,
        layers: Vec<(Tensor, Tensor)>,
    },
}

impl KvCache {
    /// Preallocates `blocks` blocks, every layer in one group. The pages
    /// are zeroed lazily by the OS, so resident memory grows only as blocks
    /// are first written.
    pub fn new(shape: KvShape, blocks: usize) -> Self {
        Self::with_groups(shape, KvGroups::single(shape.layers), blocks)
    }

    /// Preallocates `blocks` blocks of `groups`' layer groups (`shape`
    /// as [`KvShape::grouped`] makes it).
    pub fn with_groups(shape: KvShape, groups: KvGroups, blocks: usize) -> Self {
        let shape = shape.grouped(&groups);
        let per_layer = blocks * shape.block_stride();
        let layers = (0..shape.layers)
            .map(|_| LayerKv {
                k: Lanes::zeros(shape.dtype, per_layer),
                v: Lanes::zeros(shape.dtype, per_layer),
            })
            .collect();
        Self {
            shape,
            groups,
            blocks,
            storage: Storage::Host(layers),
        }
    }

    /// A cache of `blocks` blocks as tensors on `device`, for the tensor
    /// path. Nothing is allocated until the first [`KvCache::device_layer`].
    pub fn on_device(shape: KvShape, groups: KvGroups, blocks: usize, device: &Device) -> Self {
        Self {
            shape: shape.grouped(&groups),
            groups,
            blocks,
            storage: Storage::Device {
                device: device.clone(),
                layers: vec![],
            },
        }
    }

    /// Whether the cache is device tensors (the tensor path's).
    pub fn is_device(&self) -> bool {
        matches!(self.storage, Storage::Device { .. })
    }

    /// One layer's group and its keys and values as device tensors,
    /// `[blocks * block_size, kv_heads * head_dim]` in the shape's dtype
    /// (allocating every slot on first use). Written in place by the tensor
    /// path.
    pub fn device_layer(&mut self, layer: usize) -> Result<(usize, &Tensor, &Tensor)> {
        let shape = self.shape;
        let (group, slot) = self.groups.of_layer(layer);
        let rows = self.blocks * shape.block_size;
        let Storage::Device { device, layers } = &mut self.storage else {
            return Err(Error::Internal(
                "the KV cache is in host memory; the tensor path needs one on the device".into(),
            ));
        };
        if layers.is_empty() {
            let width = shape.kv_heads * shape.head_dim;
            for _ in 0..shape.layers {
                let k = Tensor::zeros((rows, width), shape.dtype.dtype(), device)?;
                let v = Tensor::zeros((rows, width), shape.dtype.dtype(), device)?;
                layers.push((k, v));
            }
        }
        let (k, v) = layers
            .get(slot)
            .ok_or_else(|| Error::Internal(format!("no KV layer {layer}")))?;
        Ok((group, k, v))
    }

    /// The cache's shape.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Blocks in the pool.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Copies block `from`'s keys and values, every layer it holds, into
    /// block `to` (copy-on-write of a partial block).
    pub fn copy_block(&mut self, from: u32, to: u32) -> Result<()> {
        let (from, to) = (from as usize, to as usize);
        if from >= self.blocks || to >= self.blocks {
            return Err(Error::Internal(format!(
                "block copy {from} → {to} outside a pool of {}",
                self.blocks
            )));
        }
        let stride = self.shape.block_stride();
        match &mut self.storage {
            Storage::Host(layers) => {
                fn copy<T: Copy>(x: &mut [T], from: usize, to: usize, n: usize) {
                    x.copy_within(from * n..(from + 1) * n, to * n);
                }
                for l in layers {
                    for lanes in [&mut l.k, &mut l.v] {
                        match lanes {
                            Lanes::F32(x) => copy(x, from, to, stride),
                            Lanes::F16(x) => copy(x, from, to, stride),
                        }
                    }
                }
            }
            Storage::Device { layers, .. } => {
                let bs = self.shape.block_size;
                for (k, v) in layers.iter() {
                    for t in [k, v] {
                        let rows = t.narrow(0, from * bs, bs)?.copy()?;
                        t.slice_set(&rows, 0, to * bs)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// How layers share blocks.
    pub fn groups(&self) -> &KvGroups {
        &self.groups
    }

    /// One layer's group and host storage (the host path).
    pub fn layer_mut(&mut self, layer: usize) -> Result<(usize, &mut LayerKv)> {
        let (group, slot) = self.groups.of_layer(layer);
        let Storage::Host(layers) = &mut self.storage else {
            return Err(Error::Internal(
                "the KV cache is on the device; the host path needs one in host memory".into(),
            ));
        };
        layers
            .get_mut(slot)
            .map(|l| (group, l))
            .ok_or_else(|| Error::Internal(format!("no KV layer {layer}")))
    }
}

impl LayerKv {
    /// Stores the new tokens' keys and values (`[tokens, kv_heads,
    /// head_dim]`) in layer group `group`'s blocks.
    pub fn write(
        &mut self,
        shape: &KvShape,
        group: usize,
        seqs: &[SeqView<'_>],
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        match (&mut self.k, &mut self.v) {
            (Lanes::F32(kc), Lanes::F32(vc)) => write_rows(kc, vc, shape, group, seqs, k, v),
            (Lanes::F16(kc), Lanes::F16(vc)) => write_rows(kc, vc, shape, group, seqs, k, v),
            _ => Err(Error::Internal("keys and values stored apart".into())),
        }
    }

    /// The layer's keys and values, each `[block][kv_head][slot][dim]`.
    pub fn lanes(&self) -> (&Lanes, &Lanes) {
        (&self.k, &self.v)
    }
}

fn write_rows<T: KvElem>(
    kc: &mut [T],
    vc: &mut [T],
    shape: &KvShape,
    group: usize,
    seqs: &[SeqView<'_>],
    k: &[f32],
    v: &[f32],
) -> Result<()> {
    let (hk, d, bs, groups) = (
        shape.kv_heads,
        shape.head_dim,
        shape.block_size,
        shape.groups,
    );
    let row = hk * d;
    let stride = shape.block_stride();
    for s in seqs {
        if s.blocks.len() / groups * bs < s.start_pos + s.len {
            return Err(Error::Internal(format!(
                "block table of {} blocks cannot hold position {}",
                s.blocks.len(),
                s.start_pos + s.len - 1
            )));
        }
        for i in 0..s.len {
            let pos = s.start_pos + i;
            let block = s.blocks[pos / bs * groups + group] as usize;
            if (block + 1) * stride > kc.len() {
                return Err(Error::Internal(format!(
                    "position {pos} has no block in layer group {group}"
                )));
            }
            let slot = pos % bs;
            let src = (s.offset + i) * row;
            for g in 0..hk {
                let dst = ((block * hk + g) * bs + slot) * d;
                let from = src + g * d..src + (g + 1) * d;
                for (o, &x) in kc[dst..dst + d].iter_mut().zip(&k[from.clone()]) {
                    *o = T::from_f32(x);
                }
                for (o, &x) in vc[dst..dst + d].iter_mut().zip(&v[from]) {
                    *o = T::from_f32(x);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks 0.. of `n` hashes chained from the given token blocks.
    fn chain_tokens(a: &BlockAllocator, tokens: &[u32]) -> Vec<BlockHash> {
        let blocks: Vec<&[u32]> = tokens.chunks_exact(a.block_size()).collect();
        chain(a, &blocks)
    }

    fn chain(a: &BlockAllocator, blocks: &[&[u32]]) -> Vec<BlockHash> {
        let mut out: Vec<BlockHash> = vec![];
        for t in blocks {
            out.push(a.hash_block(out.last().copied(), t));
        }
        out
    }

    #[test]
    fn a_cached_block_is_shared_by_reference_and_outlives_its_tables() {
        let mut a = BlockAllocator::new(6, 4).with_prefix_caching(true);
        let hs = chain(&a, &[&[1, 2, 3, 4], &[5, 6, 7, 8]]);
        let mut t1 = vec![];
        assert!(a.grow(&mut t1, 10));
        assert!(a.register(t1[0], hs[0]));
        assert!(a.register(t1[1], hs[1]));
        assert!(!a.register(t1[2], hs[1]), "one block per prefix");
        a.audit([t1.as_slice()]).unwrap();
        let mut t2 = vec![];
        assert_eq!(a.lookup(&hs), (2, 0), "held blocks cost no capacity");
        assert_eq!(a.share(&mut t2, &hs), 2);
        assert_eq!(t2, t1[..2]);
        a.audit([t1.as_slice(), t2.as_slice()]).unwrap();
        a.release(&mut t1);
        a.audit([t2.as_slice()]).unwrap();
        assert_eq!(a.free(), 4, "the third block is free, the shared two held");
        a.release(&mut t2);
        a.audit([]).unwrap();
        assert_eq!((a.free(), a.evictable(), a.cached()), (6, 2, 2));
        assert_eq!(a.lookup(&hs), (2, 2), "still cached, now evictable");
        // A different first block breaks the chain: the second does not hit.
        let other = chain(&a, &[&[9, 9, 9, 9], &[5, 6, 7, 8]]);
        assert_eq!(a.lookup(&other), (0, 0));
    }

    #[test]
    fn eviction_takes_free_blocks_first_then_the_least_recently_released() {
        let mut a = BlockAllocator::new(5, 2).with_prefix_caching(true);
        let hs = chain(&a, &[&[1, 1], &[2, 2], &[3, 3]]);
        let other = chain(&a, &[&[7, 7]]);
        let (mut t1, mut t2) = (vec![], vec![]);
        assert!(a.grow(&mut t1, 6));
        assert!(a.grow(&mut t2, 2));
        for (b, h) in t1.iter().zip(&hs) {
            assert!(a.register(*b, *h));
        }
        assert!(a.register(t2[0], other[0]));
        let (first, second, third) = (t1[0], t1[1], t1[2]);
        a.release(&mut t1);
        a.release(&mut t2);
        a.audit([]).unwrap();
        // A prefix's tail goes before its head; the later release goes last.
        let order: Vec<u32> = a.eviction_order().collect();
        assert_eq!(order, [third, second, first, 3]);
        // Taking a cached block takes it out of the LRU list.
        let mut t3 = vec![];
        assert_eq!(a.share(&mut t3, &hs[..1]), 1);
        assert_eq!(a.eviction_order().collect::<Vec<_>>(), [third, second, 3]);
        // One free block, then evictions in order, forgetting their hashes.
        let mut t4 = vec![];
        assert!(a.grow(&mut t4, 6));
        assert_eq!(t4[1..], [third, second]);
        assert_eq!(a.lookup(&hs), (1, 0), "only the held head is left");
        assert_eq!(a.cached(), 2);
        a.audit([t3.as_slice(), t4.as_slice()]).unwrap();
        assert!(!a.grow(&mut t4, 10), "two blocks asked, one evictable");
        a.release(&mut t3);
        a.release(&mut t4);
        a.audit([]).unwrap();
        assert_eq!(a.free(), 5);
    }

    #[test]
    fn layers_group_by_window_in_blocks_of_equal_size() {
        // Gemma 3 270M: five sliding layers, then one global, three times.
        let windows: Vec<Option<usize>> = (0..18)
            .map(|l| if l % 6 == 5 { None } else { Some(512) })
            .collect();
        let g = KvGroups::by_window(&windows);
        assert_eq!(g.slots(), 3);
        assert_eq!(
            g.windows(),
            &[Some(512); 5]
                .iter()
                .copied()
                .chain([None])
                .collect::<Vec<_>>()[..]
        );
        // Sliding layers fill groups 0..5 in order; the globals group 5.
        assert_eq!(g.of_layer(0), (0, 0));
        assert_eq!(g.of_layer(2), (0, 2));
        assert_eq!(g.of_layer(3), (1, 0));
        assert_eq!(g.of_layer(5), (5, 0));
        assert_eq!(g.of_layer(11), (5, 1));
        assert_eq!(g.of_layer(17), (5, 2));
        assert_eq!(g.of_layer(16), (4, 2));
        // Every (group, slot) once.
        let mut seen: Vec<_> = (0..18).map(|l| g.of_layer(l)).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 18);
        // Gemma 3 1B's 4 global and 22 sliding layers: blocks of 2 layers.
        let windows: Vec<Option<usize>> = (0..26)
            .map(|l| if l % 6 == 5 { None } else { Some(512) })
            .collect();
        let g = KvGroups::by_window(&windows);
        assert_eq!((g.slots(), g.len()), (2, 13));
        // No window, or one window for all: one group of every layer.
        assert_eq!(KvGroups::by_window(&[None; 4]), KvGroups::single(4));
        let all = KvGroups::by_window(&[Some(8); 4]);
        assert_eq!((all.slots(), all.windows()), (4, &[Some(8)][..]));
    }

    #[test]
    fn a_sliding_group_shares_only_the_window_a_cached_prefix_still_needs() {
        // Blocks of 2 tokens; a full group and a group with a window of 4.
        let mut a = BlockAllocator::new(40, 2)
            .with_windows(vec![None, Some(4)])
            .with_prefix_caching(true);
        let tokens: Vec<u32> = (0..12).collect();
        let hashes = chain_tokens(&a, &tokens);
        let mut t = vec![];
        assert!(a.grow(&mut t, 12));
        assert_eq!(t.len(), 12, "a block per group per 2 positions");
        for (j, &h) in hashes.iter().enumerate() {
            a.register_logical(&t, j, h);
        }
        // Position 12 next sees 9..=12: blocks 0..4 of the window group go back.
        assert_eq!(a.trim(&mut t, 12), 4);
        assert_eq!(a.trim(&mut t, 12), 0, "given back once");
        assert!((0..4).all(|b| t[b * 2 + 1] == NIL && t[b * 2] != NIL));
        a.audit([t.as_slice()]).unwrap();
        a.release(&mut t);
        a.audit([]).unwrap();
        assert_eq!(a.free(), 40);
        // Another prompt with the same 5 blocks then more: position 10 sees
        // 7..=10, so the window group needs blocks 3 and 4 only.
        let (hits, evictable) = a.lookup(&hashes[..5]);
        assert_eq!((hits, evictable), (5, 5 + 2));
        let mut u = vec![];
        assert_eq!(a.share(&mut u, &hashes[..5]), 5);
        assert_eq!(u.len(), 10);
        assert_eq!(u.iter().filter(|&&b| b == NIL).count(), 3);
        a.audit([u.as_slice()]).unwrap();
        a.release(&mut u);
        // Once window block 3 is gone, 5 blocks can no longer be had: the
        // longest prefix whose window is whole is 3 (position 6 sees 3..=6,
        // blocks 1 and 2).
        let b3 = a.cached[&BlockAllocator::key(hashes[3], 1)];
        a.unlink(b3);
        a.cached.remove(&a.hash_of[b3 as usize].take().unwrap());
        a.free.push(b3);
        assert_eq!(a.lookup(&hashes[..5]).0, 3);
        a.audit([]).unwrap();
    }

    #[test]
    fn without_prefix_caching_nothing_is_cached() {
        let mut a = BlockAllocator::new(4, 2);
        let h = a.hash_block(None, &[1, 2]);
        let mut t = vec![];
        assert!(a.grow(&mut t, 2));
        assert!(!a.register(t[0], h));
        a.release(&mut t);
        assert_eq!((a.free(), a.evictable(), a.lookup(&[h])), (4, 0, (0, 0)));
        a.audit([]).unwrap();
    }

    #[test]
    fn allocator_grows_all_or_nothing_and_releases_everything() {
        let mut a = BlockAllocator::new(4, 16);
        let mut t1 = vec![];
        assert!(a.grow(&mut t1, 33));
        assert_eq!(t1.len(), 3);
        let mut t2 = vec![];
        assert!(!a.grow(&mut t2, 17), "needs 2 blocks, 1 free");
        assert!(t2.is_empty());
        assert!(a.grow(&mut t2, 16));
        assert_eq!(a.free(), 0);
        a.release(&mut t1);
        a.release(&mut t2);
        assert_eq!(a.free(), 4);
        assert!(t1.is_empty());
    }
}
