//! Per-key limits: requests and tokens per minute, and the token
//! [`Reservation`] a request holds while it runs.
//!
//! Limits are token buckets implemented as GCRA on one atomic per bucket: no
//! lock on the request path. A request reserves its worst case (prompt plus
//! `max_tokens` for every choice) before it is queued; the reservation
//! settles when it is dropped, so a finished request, a failed one and a
//! client that disconnected mid-stream all give back what they did not use at
//! once, on both protocols, with no refund code in the front ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

// tokio's clock (the system's unless a test pauses it).
use tokio::time::Instant;

/// Why a reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// The bucket is empty for now; `retry_after` says when it will not be.
    #[error("{message}")]
    RateLimited {
        /// Which limit.
        message: String,
        /// When the same request would pass.
        retry_after: Duration,
    },
    /// The request is larger than a full bucket: it can never pass, so no
    /// Retry-After is offered.
    #[error("{message}")]
    NeverFits {
        /// What to lower.
        message: String,
    },
}

/// A token bucket as GCRA: `tat` is the theoretical arrival time of the next
/// unit, in nanoseconds since `origin`.
#[derive(Debug)]
pub struct RateLimiter {
    /// Nanoseconds per unit.
    interval: u64,
    /// How far ahead of now `tat` may run: the bucket's capacity.
    burst: u64,
    tat: AtomicU64,
    origin: Instant,
}

impl RateLimiter {
    /// `per_minute` units per minute, bursting up to a minute's worth.
    pub fn per_minute(per_minute: u32) -> Self {
        let interval = 60_000_000_000 / u64::from(per_minute.max(1));
        Self {
            interval,
            burst: interval * u64::from(per_minute.max(1)),
            tat: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    /// `per_second` units per second, bursting up to `burst` worth of them.
    pub fn per_second(per_second: u32, burst: Duration) -> Self {
        let interval = 1_000_000_000 / u64::from(per_second.max(1));
        Self {
            interval: interval.max(1),
            burst: (burst.as_nanos() as u64).max(interval),
            tat: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    /// The most units one take can ask for (a full bucket).
    pub fn capacity(&self) -> u64 {
        self.burst / self.interval.max(1)
    }

    /// Takes `units`, or says how long until they would be available.
    pub fn take(&self, units: u64) -> Result<(), Duration> {
        let now = self.origin.elapsed().as_nanos() as u64;
        let cost = units.saturating_mul(self.interval);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let new_tat = tat.max(now).saturating_add(cost);
            if new_tat.saturating_sub(now) > self.burst {
                return Err(Duration::from_nanos(new_tat - now - self.burst));
            }
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }

    /// Gives back `units` taken but not used.
    pub fn refund(&self, units: u64) {
        let cost = units.saturating_mul(self.interval);
        let _ = self
            .tat
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(cost))
            });
    }
}

/// One key's limits.
#[derive(Debug)]
pub struct Quota {
    /// The key's id, named in refusals.
    pub key_id: String,
    requests: Option<RateLimiter>,
    tokens: Option<RateLimiter>,
}

impl Quota {
    /// Limits of `key_id`; `None` is unlimited.
    pub fn new(
        key_id: &str,
        requests_per_minute: Option<u32>,
        tokens_per_minute: Option<u32>,
    ) -> Self {
        Self {
            key_id: key_id.to_string(),
            requests: requests_per_minute.map(RateLimiter::per_minute),
            tokens: tokens_per_minute.map(RateLimiter::per_minute),
        }
    }

    /// No limits.
    pub fn unlimited(key_id: &str) -> Self {
        Self::new(key_id, None, None)
    }

    /// Charges one request and reserves `tokens` tokens (all or nothing).
    pub fn reserve(self: &Arc<Self>, tokens: u64) -> Result<Reservation, QuotaError> {
        if let Some(t) = &self.tokens
            && tokens > t.capacity()
        {
            return Err(QuotaError::NeverFits {
                message: format!(
                    "this request needs up to {tokens} tokens (prompt plus max_tokens for every choice); key `{}` allows {} tokens per minute: lower max_tokens or n",
                    self.key_id,
                    t.capacity()
                ),
            });
        }
        if let Some(r) = &self.requests {
            r.take(1).map_err(|wait| QuotaError::RateLimited {
                message: format!(
                    "rate limit of key `{}` reached (requests per minute)",
                    self.key_id
                ),
                retry_after: wait,
            })?;
        }
        if let Some(t) = &self.tokens
            && let Err(wait) = t.take(tokens)
        {
            if let Some(r) = &self.requests {
                r.refund(1);
            }
            return Err(QuotaError::RateLimited {
                message: format!(
                    "rate limit of key `{}` reached (tokens per minute)",
                    self.key_id
                ),
                retry_after: wait,
            });
        }
        Ok(Reservation {
            quota: self.clone(),
            reserved: tokens,
            used: 0,
        })
    }

    /// Charges one request of no tokens (tokenization and other light calls).
    pub fn charge_request(&self) -> Result<(), QuotaError> {
        match &self.requests {
            Some(r) => r.take(1).map_err(|wait| QuotaError::RateLimited {
                message: format!(
                    "rate limit of key `{}` reached (requests per minute)",
                    self.key_id
                ),
                retry_after: wait,
            }),
            None => Ok(()),
        }
    }
}

/// Tokens held for one request. Dropping it gives back what was reserved and
/// not [used](Reservation::use_tokens).
#[derive(Debug)]
pub struct Reservation {
    quota: Arc<Quota>,
    reserved: u64,
    used: u64,
}

impl Reservation {
    /// Counts `n` more tokens as used (never beyond the reservation).
    pub fn use_tokens(&mut self, n: u64) {
        self.used = self.used.saturating_add(n).min(self.reserved);
    }

    /// Tokens reserved.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Tokens counted as used so far.
    pub fn used(&self) -> u64 {
        self.used
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(t) = &self.quota.tokens {
            t.refund(self.reserved - self.used);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refuses_with_a_wait() {
        let l = RateLimiter::per_minute(60);
        for _ in 0..60 {
            assert!(l.take(1).is_ok());
        }
        let wait = l.take(1).unwrap_err();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        l.refund(1);
        assert!(l.take(1).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_a_refusal_names_is_when_the_next_unit_is_admitted() {
        let l = RateLimiter::per_second(10, Duration::from_secs(1));
        for _ in 0..10 {
            assert!(l.take(1).is_ok());
        }
        let wait = l.take(1).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        tokio::time::advance(wait - Duration::from_millis(1)).await;
        assert!(l.take(1).is_err(), "admitted before its Retry-After");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(l.take(1).is_ok(), "refused after its Retry-After");
        // An idle minute refills the bucket to its burst, not beyond.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..10 {
            assert!(l.take(1).is_ok());
        }
        assert!(l.take(1).is_err());
    }

    #[test]
    fn a_dropped_reservation_gives_back_what_it_did_not_use() {
        let q = Arc::new(Quota::new("k", None, Some(100)));
        let mut r = q.reserve(100).unwrap();
        assert!(matches!(q.reserve(1), Err(QuotaError::RateLimited { .. })));
        r.use_tokens(30);
        drop(r);
        // 70 came back; 30 stay charged.
        let again = q.reserve(70).unwrap();
        assert!(matches!(q.reserve(1), Err(QuotaError::RateLimited { .. })));
        drop(again);
    }

    #[test]
    fn a_request_larger_than_a_full_bucket_is_refused_as_never_fitting() {
        let q = Arc::new(Quota::new("k", Some(10), Some(100)));
        let e = q.reserve(101).unwrap_err();
        assert!(matches!(e, QuotaError::NeverFits { .. }), "{e:?}");
        // Nothing was charged: the request budget is intact.
        for _ in 0..10 {
            drop(q.reserve(1).unwrap());
        }
    }

    #[test]
    fn a_refused_token_reservation_does_not_charge_the_request() {
        let q = Arc::new(Quota::new("k", Some(2), Some(10)));
        let held = q.reserve(10).unwrap();
        assert!(q.reserve(5).is_err());
        drop(held);
        // The refused attempt gave its request back: one more still fits.
        assert!(q.reserve(5).is_ok());
    }

    #[test]
    fn use_never_exceeds_the_reservation() {
        let q = Arc::new(Quota::new("k", None, Some(50)));
        let mut r = q.reserve(10).unwrap();
        r.use_tokens(25);
        assert_eq!(r.used(), 10);
    }
}
