//! The engine's time: the points a request's life is measured by (submitted,
//! admitted, first token, finished) and the deadlines it is held to (its own,
//! and a drain's).
//!
//! Served engines read the system clock. Tests give an engine a manual clock
//! that stands still until they advance it, so deadlines and drains are
//! tested by moving time rather than by waiting for it, and a test passes or
//! fails on what the engine does, not on how busy the machine is. (A step's
//! compute time, which feeds the throughput behind `retry-after`, is measured
//! on the system clock either way: it is a cost, not a point in time.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where an engine reads the time. Cheap to clone; clones share a manual
/// clock's position.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    manual: Option<Arc<Manual>>,
}

#[derive(Debug)]
struct Manual {
    origin: Instant,
    /// Nanoseconds advanced since `origin`.
    offset: AtomicU64,
}

impl Clock {
    /// The system's monotonic clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that reads the same instant until [`Clock::advance`] moves it.
    pub fn manual() -> Self {
        Self {
            manual: Some(Arc::new(Manual {
                origin: Instant::now(),
                offset: AtomicU64::new(0),
            })),
        }
    }

    /// The current instant.
    pub fn now(&self) -> Instant {
        match &self.manual {
            None => Instant::now(),
            Some(m) => m.origin + Duration::from_nanos(m.offset.load(Ordering::Acquire)),
        }
    }

    /// Moves a manual clock forward by `by`. The system clock cannot be
    /// moved: there it does nothing.
    pub fn advance(&self, by: Duration) {
        if let Some(m) = &self.manual {
            let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
            m.offset.fetch_add(nanos, Ordering::AcqRel);
        }
    }

    /// Whether this is a manual clock.
    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_stands_still_until_advanced_and_its_clones_move_with_it() {
        let clock = Clock::manual();
        let t0 = clock.now();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(clock.now(), t0, "no wall time reaches a manual clock");
        let other = clock.clone();
        other.advance(Duration::from_secs(30));
        assert_eq!(clock.now() - t0, Duration::from_secs(30));
    }

    #[test]
    fn the_system_clock_moves_on_its_own_and_ignores_advance() {
        let clock = Clock::system();
        let t0 = clock.now();
        clock.advance(Duration::from_secs(3600));
        assert!(clock.now() - t0 < Duration::from_secs(60));
        assert!(!clock.is_manual());
    }
}
