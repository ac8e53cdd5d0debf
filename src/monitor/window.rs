//! Recent finished requests of one engine, for analyses that compare
//! versions over the same stretch of time (canary rollouts).
//!
//! The engine thread records one sample per finished request (not per
//! token); the controller reads the samples since a point in time. The
//! mutex is held for a push or a copy, on the engine thread and the
//! controller's task, never on a tokio request path.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::Variant;
use super::canary::Sample;

/// Samples kept per engine: a bound on memory, far above what one analysis
/// interval of one engine produces on this class of machine.
pub const CAPACITY: usize = 16_384;

/// The wall-clock time of a monotonic instant, in Unix milliseconds: how
/// samples are stamped for other processes (a fleet's leader) to compare.
pub fn wall_ms(at: Instant) -> u64 {
    let now = SystemTime::now();
    now.checked_sub(Instant::now().saturating_duration_since(at))
        .unwrap_or(now)
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A bounded ring of `(when, variant, sample)`.
pub struct Window {
    samples: Mutex<VecDeque<(Instant, Variant, Sample)>>,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            samples: Mutex::new(VecDeque::with_capacity(256)),
        }
    }
}

impl Window {
    /// Records a finished request; the oldest sample goes when full.
    pub fn record(&self, variant: Variant, sample: Sample) {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() == CAPACITY {
            s.pop_front();
        }
        s.push_back((Instant::now(), variant, sample));
    }

    /// The samples of `variant` recorded in `[from, to)`.
    pub fn between(&self, variant: Variant, from: Instant, to: Instant) -> Vec<Sample> {
        self.between_at(variant, from, to)
            .into_iter()
            .map(|(_, x)| x)
            .collect()
    }

    /// As [`Window::between`], with when each was recorded.
    pub fn between_at(
        &self,
        variant: Variant,
        from: Instant,
        to: Instant,
    ) -> Vec<(Instant, Sample)> {
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.iter()
            .filter(|(at, v, _)| *v == variant && *at >= from && *at < to)
            .map(|(at, _, x)| (*at, *x))
            .collect()
    }
}
