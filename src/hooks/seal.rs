//! Webhook secrets a whole fleet can read: an inline secret set through
//! the admin API is sealed (ChaCha20-Poly1305) under the fleet's secrets
//! key and kept, sealed, in the shared log; every replica that holds the
//! same key (`--secrets-key-file`, typically a mounted Kubernetes Secret)
//! opens it. The hook's name is the associated data, so a sealed value
//! copied onto another hook does not open.

use std::path::Path;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

/// What a sealed value starts with (the format's version).
const PREFIX: &str = "v1:";
/// Fewest bytes of key material accepted.
const MIN_KEY_BYTES: usize = 16;

/// The fleet's key for hook secrets. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct SecretsKey {
    key: [u8; 32],
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretsKey(..)")
    }
}

impl SecretsKey {
    /// The key from a file (surrounding whitespace ignored): any text of at
    /// least 16 bytes, hashed to 256 bits. Refuses a file others may read.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path)
                .map_err(|e| anyhow::anyhow!("secrets key {}: {e}", path.display()))?;
            if !meta.is_file() {
                anyhow::bail!("secrets key {}: not a regular file", path.display());
            }
            if meta.permissions().mode() & 0o007 != 0 {
                anyhow::bail!(
                    "secrets key {}: readable or writable by any user (chmod o-rwx it)",
                    path.display()
                );
            }
        }
        let text = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("secrets key {}: {e}", path.display()))?;
        Self::from_material(text.trim_ascii())
            .map_err(|e| anyhow::anyhow!("secrets key {}: {e}", path.display()))
    }

    /// The key from its material (at least 16 bytes).
    pub fn from_material(material: &[u8]) -> anyhow::Result<Self> {
        if material.len() < MIN_KEY_BYTES {
            anyhow::bail!("at least {MIN_KEY_BYTES} bytes of key material are needed");
        }
        Ok(Self {
            key: Sha256::digest(material).into(),
        })
    }

    fn aead(&self) -> LessSafeKey {
        // 32 bytes is ChaCha20-Poly1305's key length: this cannot fail.
        LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, &self.key)
                .unwrap_or_else(|_| unreachable!("a 32-byte ChaCha20 key")),
        )
    }

    /// Seals `secret` for the hook `name`: `v1:` and hex of nonce,
    /// ciphertext and tag.
    pub fn seal(&self, name: &str, secret: &str) -> anyhow::Result<String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("no randomness for a nonce"))?;
        let mut buf = secret.as_bytes().to_vec();
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut buf,
            )
            .map_err(|_| anyhow::anyhow!("cannot seal the secret"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(format!("{PREFIX}{}", hex::encode(out)))
    }

    /// Opens what [`SecretsKey::seal`] sealed for `name`; fails on another
    /// key, another name or a changed value.
    pub fn open(&self, name: &str, sealed: &str) -> Result<String, String> {
        let bytes = sealed
            .strip_prefix(PREFIX)
            .and_then(|h| hex::decode(h).ok())
            .filter(|b| b.len() > NONCE_LEN)
            .ok_or("the sealed secret is malformed")?;
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce")?;
        let mut buf = rest.to_vec();
        let plain = self
            .aead()
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut buf)
            .map_err(|_| {
                "the sealed secret does not open with this replica's secrets key \
                 (a different --secrets-key-file on this replica?)"
            })?;
        String::from_utf8(plain.to_vec()).map_err(|_| "the sealed secret is not UTF-8".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_with_the_same_key_and_name_only() {
        let k = SecretsKey::from_material(b"0123456789abcdef-fleet").unwrap();
        let s = k.seal("ci", "hunter2").unwrap();
        assert!(s.starts_with("v1:") && !s.contains("hunter2"), "{s}");
        assert_eq!(k.open("ci", &s).unwrap(), "hunter2");
        assert_ne!(
            k.seal("ci", "hunter2").unwrap(),
            s,
            "a fresh nonce each time"
        );
        assert!(k.open("other", &s).is_err(), "bound to the hook's name");
        let other = SecretsKey::from_material(b"another key, 16+ bytes").unwrap();
        assert!(other.open("ci", &s).unwrap_err().contains("secrets key"));
        let mut tampered = s.clone();
        tampered.pop();
        tampered.push(if s.ends_with('0') { '1' } else { '0' });
        assert!(k.open("ci", &tampered).is_err());
        assert!(SecretsKey::from_material(b"short").is_err());
        assert!(!format!("{k:?}").contains("0123"));
    }
}
