//! API keys (stored as SHA-256 hashes) → the caller: its role and its
//! limits ([`crate::quota`]).

use std::collections::HashMap;
use std::sync::Arc;

use super::error::ApiError;
use crate::config::{KeyConfig, Role, hash_secret};
use crate::quota::Quota;

/// An authenticated caller.
#[derive(Debug)]
pub struct Principal {
    /// Key id (`anonymous` when the server runs open).
    pub key_id: String,
    /// Role.
    pub role: Role,
    /// Its limits, shared by every request made with the key.
    pub quota: Arc<Quota>,
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
}

/// Looks up keys by hash.
#[derive(Debug, Clone)]
pub struct Authenticator {
    keys: Arc<HashMap<String, Arc<Principal>>>,
    open: Arc<Principal>,
}

impl Authenticator {
    /// Builds the key table. Without keys every caller is `anonymous` with
    /// the admin role, as on a developer's loopback-only server; see
    /// [`Authenticator::with_anonymous_role`].
    pub fn new(keys: &[KeyConfig]) -> Self {
        let keys = keys
            .iter()
            .map(|k| {
                (
                    k.sha256.to_ascii_lowercase(),
                    Arc::new(Principal {
                        key_id: k.id.clone(),
                        role: k.role,
                        quota: Arc::new(Quota::new(
                            &k.id,
                            k.requests_per_minute,
                            k.tokens_per_minute,
                        )),
                    }),
                )
            })
            .collect();
        Self {
            keys: Arc::new(keys),
            open: Arc::new(Principal {
                key_id: "anonymous".into(),
                role: Role::Admin,
                quota: Arc::new(Quota::unlimited("anonymous")),
            }),
        }
    }

    /// The role a caller gets when no key is configured
    /// ([`crate::config::anonymous_role`]): inference on a server opened
    /// beyond loopback with `--insecure-no-auth`.
    pub fn with_anonymous_role(mut self, role: Role) -> Self {
        self.open = Arc::new(Principal {
            key_id: "anonymous".into(),
            role,
            quota: Arc::new(Quota::unlimited("anonymous")),
        });
        self
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
    fn keys_are_matched_by_hash_and_roles_kept() {
        let a = Authenticator::new(&[KeyConfig::from_secret("ops", Role::Admin, "s3cret")]);
        assert!(a.authenticate(None).is_err());
        assert!(a.authenticate(Some("Bearer nope")).is_err());
        let p = a.authenticate(Some("Bearer s3cret")).unwrap();
        assert_eq!((p.key_id.as_str(), p.role), ("ops", Role::Admin));
    }

    #[test]
    fn an_open_server_opened_beyond_loopback_has_no_anonymous_admin() {
        let a = Authenticator::new(&[]);
        assert!(a.authenticate(None).unwrap().require_admin().is_ok());
        let a = a.with_anonymous_role(Role::Inference);
        let p = a.authenticate(None).unwrap();
        assert_eq!(p.role, Role::Inference);
        assert!(p.require_admin().is_err());
    }
}
