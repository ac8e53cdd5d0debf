//! Running a step: the CPU path (host kernels over packed weights) or the
//! tensor path (candle ops on the model's device), chosen by the device.

use candle_core::{Device, Tensor};

use super::batch::Batch;
use super::host::{self, Scratch};
use super::kv::KvCache;
use super::model::Model;
use super::tensor;
use super::{Error, Result};

impl Model {
    /// Runs one step: writes the new tokens' keys and values into `kv` and
    /// returns `[batch.logit_rows.len(), vocab]` f32 logits.
    pub fn forward(
        &self,
        batch: &Batch<'_>,
        kv: &mut KvCache,
        scratch: &mut Scratch,
    ) -> Result<Tensor> {
        let mut logits = vec![];
        self.forward_into(batch, kv, scratch, &mut logits)?;
        let rows = batch.logit_rows.len();
        Ok(Tensor::from_vec(
            logits,
            (rows, self.cfg.vocab_size),
            &Device::Cpu,
        )?)
    }

    /// As [`Model::forward`], with the logits (row-major
    /// `[batch.logit_rows.len(), vocab]`) left in `logits`. The buffer is
    /// exchanged with one the engine keeps, so a caller that passes the same
    /// `Vec` every step reuses memory instead of mapping fresh pages for
    /// every step's logits (33 MB at batch 32 over Gemma's 262k vocabulary).
    pub fn forward_into(
        &self,
        batch: &Batch<'_>,
        kv: &mut KvCache,
        scratch: &mut Scratch,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        if batch.is_empty() {
            return Err(Error::Internal("empty batch".into()));
        }
        if self.device.is_cpu() {
            // Inside the pool the calling thread is a worker: parallel regions
            // split between it and a warm sibling instead of waking sleepers.
            rayon::scope(|_| host::forward(self, batch, kv, scratch, logits))
        } else {
            let t = tensor::forward(self, batch, kv)?;
            logits.clear();
            logits.extend(t.flatten_all()?.to_vec1::<f32>()?);
            Ok(())
        }
    }
}
