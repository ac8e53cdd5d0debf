//! The process-wide compute governor: background work (shadow copies) runs
//! only while no engine has foreground work.
//!
//! Priorities inside one engine are not enough: a shadow candidate runs on
//! its own engine thread over the same cores as the version it shadows, so
//! each of its steps would take cores from the primary's. Every engine says
//! here whether it holds foreground (normal-priority) sequences; an engine
//! holding only background sequences steps only while that count is zero,
//! and its sequences otherwise wait until their deadline ends them.
//!
//! One atomic counter, read once per step: nothing on the request path.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Counts the engines with foreground work.
#[derive(Debug, Default)]
pub struct Governor {
    foreground: AtomicUsize,
}

impl Governor {
    /// A governor with no claims.
    pub const fn new() -> Self {
        Self {
            foreground: AtomicUsize::new(0),
        }
    }

    /// A claim for one engine, not yet held.
    pub fn claim(&'static self) -> Claim {
        Claim {
            governor: self,
            held: false,
        }
    }
}

/// The process's governor: every engine claims from it.
pub static GLOBAL: Governor = Governor::new();

/// How long a background engine waits between looks at the governor.
pub const BACKGROUND_POLL: Duration = Duration::from_millis(2);

/// One engine's claim on the cores: counted while it has foreground work,
/// released when dropped (also when its thread panics), so a dead engine
/// never starves the background forever.
#[derive(Debug)]
pub struct Claim {
    governor: &'static Governor,
    held: bool,
}

impl Claim {
    /// Records whether this engine has foreground work now.
    pub fn set(&mut self, foreground: bool) {
        if foreground != self.held {
            self.held = foreground;
            if foreground {
                self.governor.foreground.fetch_add(1, Ordering::AcqRel);
            } else {
                self.governor.foreground.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Whether an engine other than this one has foreground work: a step
    /// of background work would take cores from it.
    pub fn others_busy(&self) -> bool {
        self.governor.foreground.load(Ordering::Acquire) > usize::from(self.held)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.set(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_count_foreground_engines_and_release_on_drop() {
        static G: Governor = Governor::new();
        let mut a = G.claim();
        let mut b = G.claim();
        assert!(!b.others_busy());
        a.set(true);
        a.set(true);
        assert!(b.others_busy(), "a holds foreground work");
        assert!(!a.others_busy(), "an engine does not wait for itself");
        b.set(true);
        assert!(a.others_busy());
        drop(b);
        assert!(!a.others_busy());
        drop(a);
        assert_eq!(G.foreground.load(Ordering::Acquire), 0);
    }
}
