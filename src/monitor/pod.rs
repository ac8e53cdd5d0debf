//! Totals over every engine of this process, without labels: what a load
//! balancer that keeps one series per metric reads to pick a pod. The
//! Gateway API inference extension's endpoint picker takes the first
//! series of a metric it finds, so the per-engine gauges (labelled by model
//! and version) would show it one engine of a pod serving a stable and a
//! canary; these add them up.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::names;

/// One engine's part of the pod's load.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Share {
    /// Client requests waiting (preempted ones included; background work
    /// is not counted).
    pub waiting: usize,
    /// Sequences running.
    pub running: usize,
    /// KV blocks in use.
    pub kv_used: usize,
    /// KV blocks in all.
    pub kv_total: usize,
}

static SHARES: Mutex<BTreeMap<u64, Share>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

/// An engine's entry in the pod totals; leaving them when dropped.
#[derive(Debug)]
pub struct PodShare {
    id: u64,
    /// What was last published, so that a step that changed nothing takes
    /// no lock (the engine thread calls [`PodShare::set`] every step).
    last: Share,
}

impl Default for PodShare {
    fn default() -> Self {
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            last: Share::default(),
        }
    }
}

impl PodShare {
    /// Sets this engine's share and republishes the totals when it changed.
    pub fn set(&mut self, share: Share) {
        if share == self.last {
            return;
        }
        self.last = share;
        let mut m = SHARES.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(self.id, share);
        publish(&m);
    }
}

impl Drop for PodShare {
    fn drop(&mut self) {
        let mut m = SHARES.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&self.id);
        publish(&m);
    }
}

/// The totals of `m`.
pub fn total(m: &BTreeMap<u64, Share>) -> Share {
    m.values().fold(Share::default(), |a, s| Share {
        waiting: a.waiting + s.waiting,
        running: a.running + s.running,
        kv_used: a.kv_used + s.kv_used,
        kv_total: a.kv_total + s.kv_total,
    })
}

fn publish(m: &BTreeMap<u64, Share>) {
    let t = total(m);
    metrics::gauge!(names::POD_WAITING).set(t.waiting as f64);
    metrics::gauge!(names::POD_RUNNING).set(t.running as f64);
    let usage = if t.kv_total == 0 {
        0.0
    } else {
        t.kv_used as f64 / t.kv_total as f64
    };
    metrics::gauge!(names::POD_KV_USAGE).set(usage);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_every_engine_and_kv_usage_is_blocks_over_blocks() {
        let m = BTreeMap::from([
            (
                1,
                Share {
                    waiting: 2,
                    running: 3,
                    kv_used: 10,
                    kv_total: 100,
                },
            ),
            (
                2,
                Share {
                    waiting: 1,
                    running: 0,
                    kv_used: 90,
                    kv_total: 100,
                },
            ),
        ]);
        assert_eq!(
            total(&m),
            Share {
                waiting: 3,
                running: 3,
                kv_used: 100,
                kv_total: 200
            }
        );
        assert_eq!(total(&BTreeMap::new()), Share::default());
    }
}
