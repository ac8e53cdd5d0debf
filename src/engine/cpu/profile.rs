//! Optional per-op timing of the CPU forward pass, for `llmops bench-engine
//! --profile`: where one step's time goes. Off by default; when off, a lap is
//! one relaxed atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The parts of a step that are timed separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Embedding rows, rotary tables, row owners.
    Setup,
    /// RMSNorms (attention, MLP, Gemma's post-norms, q/k norms).
    Norm,
    /// The fused q/k/v projection (and splitting it).
    Qkv,
    /// Rotary embedding of q and k.
    Rope,
    /// Writing k and v into the paged cache.
    KvWrite,
    /// Attention over the paged cache.
    Attention,
    /// The output projection.
    O,
    /// The fused gate/up projection.
    GateUp,
    /// SiLU/GELU times up.
    Activation,
    /// The down projection.
    Down,
    /// Residual additions.
    Residual,
    /// Final norm and the output head.
    Head,
}

const OPS: [(Op, &str); 12] = [
    (Op::Setup, "setup"),
    (Op::Norm, "norms"),
    (Op::Qkv, "qkv_matmul"),
    (Op::Rope, "rope"),
    (Op::KvWrite, "kv_write"),
    (Op::Attention, "attention"),
    (Op::O, "o_matmul"),
    (Op::GateUp, "gate_up_matmul"),
    (Op::Activation, "activation"),
    (Op::Down, "down_matmul"),
    (Op::Residual, "residual"),
    (Op::Head, "head_matmul"),
];

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; OPS.len()] = [const { AtomicU64::new(0) }; OPS.len()];

/// Turns timing on or off (process-wide).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Zeroes the totals.
pub fn reset() {
    NANOS.iter().for_each(|n| n.store(0, Ordering::Relaxed));
}

/// Time spent in each part since the last reset.
pub fn totals() -> Vec<(&'static str, Duration)> {
    OPS.iter()
        .map(|&(op, name)| {
            (
                name,
                Duration::from_nanos(NANOS[op as usize].load(Ordering::Relaxed)),
            )
        })
        .collect()
}

/// Attributes the time since the previous lap to an op.
pub(crate) struct Laps(Option<Instant>);

impl Laps {
    pub(crate) fn start() -> Self {
        Self(ENABLED.load(Ordering::Relaxed).then(Instant::now))
    }

    #[inline]
    pub(crate) fn lap(&mut self, op: Op) {
        if let Some(t) = &mut self.0 {
            let now = Instant::now();
            NANOS[op as usize].fetch_add((now - *t).as_nanos() as u64, Ordering::Relaxed);
            *t = now;
        }
    }
}
