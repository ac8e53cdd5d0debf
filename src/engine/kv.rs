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

/// No block: the LRU list's sentinel and its empty links.
const NIL: u32 = u32::MAX;

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
        }
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

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
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

    /// How many leading blocks of `hashes` are cached, and how many of
    /// those no sequence holds (taking them uses up free capacity).
    pub fn lookup(&self, hashes: &[BlockHash]) -> (usize, usize) {
        if self.keys.is_none() {
            return (0, 0);
        }
        let (mut hits, mut evictable) = (0, 0);
        for h in hashes {
            let Some(&b) = self.cached.get(h) else {
                break;
            };
            hits += 1;
            if self.refs[b as usize] == 0 {
                evictable += 1;
            }
        }
        (hits, evictable)
    }

    /// Appends the cached blocks of `hashes` to `table`, one reference
    /// each; stops at the first hash that is not cached. Returns how many
    /// it took.
    pub fn share(&mut self, table: &mut Vec<u32>, hashes: &[BlockHash]) -> usize {
        let mut taken = 0;
        for h in hashes {
            let Some(&b) = self.cached.get(h) else {
                break;
            };
            if self.refs[b as usize] == 0 {
                self.unlink(b);
            }
            self.refs[b as usize] += 1;
            table.push(b);
            taken += 1;
        }
        taken
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
            for &b in t {
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

/// The shape of the cache.
#[derive(Debug, Clone, Copy)]
pub struct KvShape {
    /// Decoder layers.
    pub layers: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
}

impl KvShape {
    /// Bytes one block takes across all layers, keys and values.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.layers
            * self.kv_heads
            * self.block_size
            * self.head_dim
            * std::mem::size_of::<f32>()
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

/// Keys and values of one layer.
pub struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The block pool's memory: one [`LayerKv`] per layer in host memory, or
/// one pair of tensors per layer on a device.
pub struct KvCache {
    shape: KvShape,
    blocks: usize,
    storage: Storage,
}

enum Storage {
    Host(Vec<LayerKv>),
    /// Keys and values per layer, `[blocks * block_size, kv_heads *
    /// head_dim]` f32; empty until the first step allocates them.
    Device {
        device: Device,
        layers: Vec<(Tensor, Tensor)>,
    },
}

impl KvCache {
    /// Preallocates `blocks` blocks. The pages are zeroed lazily by the OS, so
    /// resident memory grows only as blocks are first written.
    pub fn new(shape: KvShape, blocks: usize) -> Self {
        let per_layer = blocks * shape.block_stride();
        let layers = (0..shape.layers)
            .map(|_| LayerKv {
                k: vec![0.0; per_layer],
                v: vec![0.0; per_layer],
            })
            .collect();
        Self {
            shape,
            blocks,
            storage: Storage::Host(layers),
        }
    }

    /// A cache of `blocks` blocks as tensors on `device`, for the tensor
    /// path. Nothing is allocated until the first [`KvCache::device_layer`].
    pub fn on_device(shape: KvShape, blocks: usize, device: &Device) -> Self {
        Self {
            shape,
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

    /// One layer's keys and values as device tensors, `[blocks *
    /// block_size, kv_heads * head_dim]` f32 (allocating every layer on
    /// first use). Written in place by the tensor path.
    pub fn device_layer(&mut self, layer: usize) -> Result<(&Tensor, &Tensor)> {
        let shape = self.shape;
        let rows = self.blocks * shape.block_size;
        let Storage::Device { device, layers } = &mut self.storage else {
            return Err(Error::Internal(
                "the KV cache is in host memory; the tensor path needs one on the device".into(),
            ));
        };
        if layers.is_empty() {
            let width = shape.kv_heads * shape.head_dim;
            for _ in 0..shape.layers {
                let k = Tensor::zeros((rows, width), DType::F32, device)?;
                let v = Tensor::zeros((rows, width), DType::F32, device)?;
                layers.push((k, v));
            }
        }
        let (k, v) = layers
            .get(layer)
            .ok_or_else(|| Error::Internal(format!("no KV layer {layer}")))?;
        Ok((k, v))
    }

    /// The cache's shape.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Blocks in the pool.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// One layer's host storage (the host path).
    pub fn layer_mut(&mut self, layer: usize) -> Result<&mut LayerKv> {
        let Storage::Host(layers) = &mut self.storage else {
            return Err(Error::Internal(
                "the KV cache is on the device; the host path needs one in host memory".into(),
            ));
        };
        layers
            .get_mut(layer)
            .ok_or_else(|| Error::Internal(format!("no KV layer {layer}")))
    }
}

impl LayerKv {
    /// Stores the new tokens' keys and values (`[tokens, kv_heads, head_dim]`).
    pub fn write(
        &mut self,
        shape: &KvShape,
        seqs: &[SeqView<'_>],
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let (hk, d, bs) = (shape.kv_heads, shape.head_dim, shape.block_size);
        let row = hk * d;
        for s in seqs {
            if s.blocks.len() * bs < s.start_pos + s.len {
                return Err(Error::Internal(format!(
                    "block table of {} blocks cannot hold position {}",
                    s.blocks.len(),
                    s.start_pos + s.len - 1
                )));
            }
            for i in 0..s.len {
                let pos = s.start_pos + i;
                let block = s.blocks[pos / bs] as usize;
                let slot = pos % bs;
                let src = (s.offset + i) * row;
                for g in 0..hk {
                    let dst = ((block * hk + g) * bs + slot) * d;
                    self.k[dst..dst + d].copy_from_slice(&k[src + g * d..src + (g + 1) * d]);
                    self.v[dst..dst + d].copy_from_slice(&v[src + g * d..src + (g + 1) * d]);
                }
            }
        }
        Ok(())
    }

    /// The layer's keys, `[block][kv_head][slot][dim]`.
    pub fn keys(&self) -> &[f32] {
        &self.k
    }

    /// The layer's values, laid out as the keys.
    pub fn values(&self) -> &[f32] {
        &self.v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks 0.. of `n` hashes chained from the given token blocks.
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
