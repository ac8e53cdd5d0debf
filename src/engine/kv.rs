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

use candle_core::{DType, Device, Tensor};

use super::batch::SeqView;
use super::{Error, Result};

/// Hands out block ids. Knows nothing of tensors, so the scheduler can plan
/// admissions with it in unit tests.
///
/// Invariant: every id in `0..total` is either in `free` or owned by exactly
/// one sequence's block table.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    total: usize,
    free: Vec<u32>,
}

impl BlockAllocator {
    /// A pool of `total` blocks of `block_size` tokens.
    pub fn new(total: usize, block_size: usize) -> Self {
        // Pop from the end hands out low ids first, which keeps tests readable.
        let free = (0..total as u32).rev().collect();
        Self {
            block_size,
            total,
            free,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks not owned by any sequence.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `table` until it holds `tokens` positions; all or nothing.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return false;
        }
        let at = self.free.len() - need;
        table.extend(self.free.drain(at..));
        true
    }

    /// Returns every block of `table` to the pool and empties it.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.append(table);
    }

    /// Fraction of blocks in use, 0.0 to 1.0.
    pub fn usage(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            1.0 - self.free.len() as f64 / self.total as f64
        }
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
