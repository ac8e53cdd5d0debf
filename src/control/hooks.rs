//! Hooks as the admin API sees them: list, read, set, remove, and restore
//! at start. Hooks from `llmops.toml` are read-only here (the file is their
//! record); hooks set through the API are kept in the catalog (their
//! settings, without the secret, in the audit log). They never run a
//! program: command hooks come from the config file only.
//!
//! An inline secret reaches every replica sealed in the log when the
//! replicas share a `--secrets-key-file`; without one, a single server
//! keeps it in `hook-secrets.json` beside the log (mode 0600), and a fleet
//! refuses it (use `secret_env`, backed by a Kubernetes Secret). A signed
//! hook whose secret a replica cannot find is marked failed there, never
//! delivered unsigned.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use serde_json::{Value, json};

use super::{Actor, ControlError, Controller};
use crate::hooks::{HookSpec, Source, view};
use crate::registry::Action;

/// The file of inline secrets of hooks set through the admin API.
const SECRETS: &str = "hook-secrets.json";

impl Controller {
    /// Sets the hooks of `llmops.toml` (checked when the config was read).
    pub fn with_hooks(self, configured: &[HookSpec]) -> anyhow::Result<Self> {
        for h in configured {
            self.hooks
                .set(h.clone(), Source::Config)
                .map_err(|e| anyhow::anyhow!("hook `{}`: {e}", h.name))?;
        }
        Ok(self)
    }

    /// Loads the key that seals inline hook secrets in the log (every
    /// replica of a fleet mounts the same file).
    pub fn with_secrets_key(self, file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        if let Some(f) = file {
            self.hooks
                .with_secrets_key(crate::hooks::SecretsKey::load(f)?);
            tracing::info!(file = %f.display(), "hook secrets sealed with the secrets key");
        }
        Ok(self)
    }

    fn secrets_path(&self) -> PathBuf {
        self.data_dir.join(SECRETS)
    }

    fn read_secrets(&self) -> BTreeMap<String, String> {
        std::fs::read(self.secrets_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Replaces the secrets file whole (write, fsync, rename), mode 0600.
    fn write_secrets(&self, secrets: &BTreeMap<String, String>) -> Result<(), ControlError> {
        let path = self.secrets_path();
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            // A fleet's replica keeps its log in etcd: its data dir may not
            // exist yet.
            std::fs::create_dir_all(&self.data_dir)?;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&tmp)?;
            f.write_all(&serde_json::to_vec(secrets).unwrap_or_default())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.data_dir)?.sync_all()
        };
        write().map_err(|e| ControlError::Internal(format!("cannot write {}: {e}", path.display())))
    }

    /// Every hook (secrets never shown).
    pub fn list_hooks(&self) -> Value {
        json!({ "hooks": self.hooks.list() })
    }

    /// One hook.
    pub fn hook(&self, name: &str) -> Result<Value, ControlError> {
        self.hooks
            .get(name)
            .map(|(spec, source)| view(&spec, source))
            .ok_or_else(|| ControlError::NotFound(format!("no hook `{name}`")))
    }

    /// Adds or replaces a hook set through the admin API.
    pub async fn set_hook(
        &self,
        actor: &Actor,
        name: &str,
        mut spec: HookSpec,
    ) -> Result<Value, ControlError> {
        if !spec.name.is_empty() && spec.name != name {
            return Err(ControlError::invalid(
                "name",
                format!("the body names `{}`, the path `{name}`", spec.name),
            ));
        }
        spec.name = name.to_string();
        if spec.sealed_secret.is_some() {
            return Err(ControlError::invalid(
                "sealed_secret",
                "written by the server; send the secret as `secret` or `secret_env`",
            ));
        }
        if let Err(e) = crate::hooks::Hooks::admit_source(&spec, Source::Admin) {
            let rule = if spec.command.is_some() {
                ControlError::Forbidden(e)
            } else {
                ControlError::invalid("secret_env", e)
            };
            tracing::warn!(hook = name, key = %actor.key_id, error = %rule, "hook refused");
            let _write = self.write_turn().await;
            let previous = json!(self.catalog().state().hooks.get(name));
            let action = Action::Hook {
                name: name.to_string(),
                spec: None,
            };
            self.record(actor, action, previous, Value::Null, Err(rule.to_string()))
                .await?;
            return Err(rule);
        }
        spec.signed |= spec.secret.is_some() || spec.secret_env.is_some();
        if let Some(secret) = &spec.secret {
            match self.hooks.secrets_key() {
                Some(key) => {
                    spec.sealed_secret = Some(key.seal(name, secret).map_err(super::internal)?);
                }
                None if self.fleet.is_some() => {
                    return Err(ControlError::invalid(
                        "secret",
                        "an inline secret in a fleet needs the same --secrets-key-file \
                         (LLMOPS_SECRETS_KEY_FILE) on every replica, or use `secret_env` \
                         backed by a secret every replica mounts",
                    ));
                }
                None => {}
            }
        }
        let _write = self.write_turn().await;
        if let Some((_, Source::Config)) = self.hooks.get(name) {
            return Err(ControlError::Conflict(format!(
                "hook `{name}` is configured in llmops.toml; change it there"
            )));
        }
        let action = Action::Hook {
            name: name.to_string(),
            spec: Some(serde_json::to_value(&spec).map_err(super::internal)?),
        };
        let previous = json!(self.catalog().state().hooks.get(name));
        if let Err(e) = spec.resolve() {
            let err = ControlError::invalid("hook", e);
            self.record(actor, action, previous, Value::Null, Err(err.to_string()))
                .await?;
            return Err(err);
        }
        // The local file holds an inline secret only where it is not sealed
        // into the log.
        let mut secrets = self.read_secrets();
        let had = secrets.contains_key(name);
        let local = spec
            .secret
            .as_ref()
            .filter(|_| spec.sealed_secret.is_none());
        match local {
            Some(s) => {
                secrets.insert(name.to_string(), s.clone());
            }
            None => {
                secrets.remove(name);
            }
        }
        if had || local.is_some() {
            self.write_secrets(&secrets)?;
        }
        let shown = view(&spec, Source::Admin);
        self.record(actor, action, previous, shown.clone(), Ok(()))
            .await?;
        self.hooks
            .set(spec, Source::Admin)
            .map_err(|e| ControlError::invalid("hook", e))?;
        tracing::info!(hook = name, key = %actor.key_id, "hook set");
        Ok(shown)
    }

    /// Removes a hook set through the admin API.
    pub async fn delete_hook(&self, actor: &Actor, name: &str) -> Result<(), ControlError> {
        let _write = self.write_turn().await;
        let action = Action::Hook {
            name: name.to_string(),
            spec: None,
        };
        let refuse = match self.hooks.get(name) {
            None => Some(ControlError::NotFound(format!("no hook `{name}`"))),
            Some((_, Source::Config)) => Some(ControlError::Conflict(format!(
                "hook `{name}` is configured in llmops.toml; remove it there"
            ))),
            Some(_) => None,
        };
        let previous = json!(self.catalog().state().hooks.get(name));
        if let Some(e) = refuse {
            self.record(actor, action, previous, Value::Null, Err(e.to_string()))
                .await?;
            return Err(e);
        }
        self.record(actor, action, previous, Value::Null, Ok(()))
            .await?;
        self.hooks.remove(name);
        let mut secrets = self.read_secrets();
        if secrets.remove(name).is_some() {
            self.write_secrets(&secrets)?;
        }
        tracing::info!(hook = name, key = %actor.key_id, "hook removed");
        Ok(())
    }

    /// At start and as a fleet's log changes: the hooks set through the
    /// admin API, with their secrets. One that cannot run here (a command,
    /// a secret this replica cannot find) is logged and kept as failed,
    /// with why.
    pub(super) fn restore_hooks(&self) {
        let stored = self.catalog().state().hooks.clone();
        let secrets = self.read_secrets();
        for (name, v) in stored {
            if let Some((_, Source::Config)) = self.hooks.get(&name) {
                tracing::warn!(
                    hook = name,
                    "a hook of this name is now in llmops.toml; the file's wins"
                );
                continue;
            }
            let mut spec: HookSpec = match serde_json::from_value(v) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(hook = name, error = %e, "stored hook unreadable; not restored");
                    continue;
                }
            };
            spec.secret = secrets.get(&name).cloned();
            match self.hooks.set(spec.clone(), Source::Admin) {
                Ok(()) => tracing::info!(hook = name, "hook restored"),
                Err(e) => {
                    tracing::error!(hook = name, error = %e, "hook cannot run on this replica; marked failed");
                    spec.secret = None;
                    self.hooks.set_failed(spec, Source::Admin, e);
                }
            }
        }
    }
}
