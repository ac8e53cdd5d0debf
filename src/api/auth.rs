//! API keys (stored as SHA-256 hashes), roles, and per-key rate limits.
//!
//! Limits are token buckets implemented as GCRA on one atomic per bucket:
//! no lock on the request path.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::ApiError;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Generation, tokenization, model listing.
    Inference,
    /// Everything, including the admin API.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "inference" => Ok(Role::Inference),
            "admin" => Ok(Role::Admin),
            other => anyhow::bail!("unknown role `{other}` (inference, admin)"),
        }
    }
}

/// One key as configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Name of the key (logged and audited; never the secret).
    pub id: String,
    /// Its role.
    pub role: Role,
    /// Hex SHA-256 of the secret (`llmops hash-key` prints it).
    pub sha256: String,
    /// Requests per minute (absent: unlimited).
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Prompt + completion tokens per minute (absent: unlimited).
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
}

/// Hex SHA-256 of a secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl KeyConfig {
    /// A key from a plaintext secret, hashed at once.
    pub fn from_secret(id: &str, role: Role, secret: &str) -> Self {
        Self {
            id: id.to_string(),
            role,
            sha256: hash_secret(secret),
            requests_per_minute: None,
            tokens_per_minute: None,
        }
    }

    /// Checks the hash looks like one.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.sha256.len() != 64 || !self.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            anyhow::bail!("key `{}`: sha256 must be 64 hex digits", self.id);
        }
        Ok(())
    }
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

/// An authenticated caller.
#[derive(Debug)]
pub struct Principal {
    /// Key id (`anonymous` when the server runs open).
    pub key_id: String,
    /// Role.
    pub role: Role,
    /// Request limiter.
    pub requests: Option<RateLimiter>,
    /// Token limiter.
    pub tokens: Option<RateLimiter>,
}

impl Principal {
    /// Fails with 403 unless the caller is an admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Admin => Ok(()),
            Role::Inference => Err(ApiError::Forbidden(
                "this API key has the inference role; the admin role is required".into(),
            )),
        }
    }

    /// Charges one request and `tokens` tokens against the key's limits.
    pub fn charge(&self, tokens: u64) -> Result<(), ApiError> {
        if let Some(r) = &self.requests {
            r.take(1).map_err(|wait| ApiError::RateLimited {
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
            return Err(ApiError::RateLimited {
                message: format!(
                    "rate limit of key `{}` reached (tokens per minute)",
                    self.key_id
                ),
                retry_after: wait,
            });
        }
        Ok(())
    }

    /// Returns tokens reserved but not generated.
    pub fn refund_tokens(&self, tokens: u64) {
        if let Some(t) = &self.tokens {
            t.refund(tokens);
        }
    }
}

/// Looks up keys by hash.
#[derive(Debug, Clone)]
pub struct Authenticator {
    keys: Arc<HashMap<String, Arc<Principal>>>,
    open: Arc<Principal>,
}

impl Authenticator {
    /// Builds the key table.
    pub fn new(keys: &[KeyConfig]) -> Self {
        let keys = keys
            .iter()
            .map(|k| {
                (
                    k.sha256.to_ascii_lowercase(),
                    Arc::new(Principal {
                        key_id: k.id.clone(),
                        role: k.role,
                        requests: k.requests_per_minute.map(RateLimiter::per_minute),
                        tokens: k.tokens_per_minute.map(RateLimiter::per_minute),
                    }),
                )
            })
            .collect();
        Self {
            keys: Arc::new(keys),
            open: Arc::new(Principal {
                key_id: "anonymous".into(),
                role: Role::Admin,
                requests: None,
                tokens: None,
            }),
        }
    }

    /// Whether any key is configured.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Resolves an `Authorization` header value (`Bearer <secret>`).
    pub fn authenticate(&self, header: Option<&str>) -> Result<Arc<Principal>, ApiError> {
        if self.is_open() {
            return Ok(self.open.clone());
        }
        let Some(h) = header else {
            return Err(ApiError::Unauthenticated(
                "missing API key: send `Authorization: Bearer <key>`".into(),
            ));
        };
        let secret = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .unwrap_or(h)
            .trim();
        self.keys
            .get(&hash_secret(secret))
            .cloned()
            .ok_or_else(|| ApiError::Unauthenticated("invalid API key".into()))
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

    #[test]
    fn keys_are_matched_by_hash_and_roles_kept() {
        let a = Authenticator::new(&[KeyConfig::from_secret("ops", Role::Admin, "s3cret")]);
        assert!(a.authenticate(None).is_err());
        assert!(a.authenticate(Some("Bearer nope")).is_err());
        let p = a.authenticate(Some("Bearer s3cret")).unwrap();
        assert_eq!((p.key_id.as_str(), p.role), ("ops", Role::Admin));
    }
}
