//! AdamW with decoupled weight decay, a cosine schedule with warm-up, and
//! global-norm gradient clipping. The moments are plain tensors so a
//! checkpoint can save them and a resumed run continues exactly.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (not applied to norms and biases).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// AdamW over named variables.
pub struct AdamW {
    cfg: AdamWConfig,
    /// First and second moments per variable name.
    pub moments: HashMap<String, (Tensor, Tensor)>,
    /// Updates applied so far.
    pub t: u64,
}

impl AdamW {
    /// Zeroed moments for `vars`.
    pub fn new(cfg: AdamWConfig, vars: &[(String, Var)]) -> candle_core::Result<Self> {
        let mut moments = HashMap::new();
        for (n, v) in vars {
            moments.insert(n.clone(), (v.zeros_like()?, v.zeros_like()?));
        }
        Ok(Self { cfg, moments, t: 0 })
    }

    /// One update with learning rate `lr` from `grads` (by name).
    pub fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &HashMap<String, Tensor>,
        lr: f64,
    ) -> candle_core::Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (name, var) in vars {
            let Some(g) = grads.get(name) else { continue };
            let Some((m, v)) = self.moments.get_mut(name) else {
                continue;
            };
            let m_new = ((&*m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v_new = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m_new / bc1)? / ((&v_new / bc2)?.sqrt()? + c.eps)?)?;
            let decay = if var.rank() >= 2 { c.weight_decay } else { 0.0 };
            let w = var.as_tensor();
            let next = ((w * (1.0 - lr * decay))? - (update * lr)?)?;
            var.set(&next)?;
            *m = m_new;
            *v = v_new;
        }
        Ok(())
    }
}

/// Learning rate at `step`: linear warm-up, then cosine decay to `min_ratio·peak`.
pub fn cosine_lr(step: u64, peak: f64, warmup: u64, total: u64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let min = peak * min_ratio;
    min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Scales gradients so their global L2 norm is at most `max_norm`; returns the
/// norm before clipping.
pub fn clip_grad_norm(
    grads: &mut HashMap<String, Tensor>,
    max_norm: f64,
) -> candle_core::Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_warms_up_then_decays_to_the_floor() {
        assert!(cosine_lr(0, 1.0, 10, 100, 0.1) < 0.2);
        assert!((cosine_lr(9, 1.0, 10, 100, 0.1) - 1.0).abs() < 1e-9);
        assert!((cosine_lr(100, 1.0, 10, 100, 0.1) - 0.1).abs() < 1e-9);
        assert!(cosine_lr(50, 1.0, 10, 100, 0.1) < cosine_lr(20, 1.0, 10, 100, 0.1));
    }
}
