//! API keys (`keel keys`, `keel serve`) and what a key's scope may see of the home's plugins.
//!
//! A key is `keel_<id>_<secret>`: `id` is 12 public hex characters (shown in `keel keys list`,
//! safe to log), `secret` is 32 random bytes in hex. Only the sha256 of the secret is stored; the
//! key text is shown once, at creation. Verification looks the row up by id and compares the
//! hashes in constant time, so neither a wrong secret nor a near miss leaks through timing.
//!
//! Plugins and tenants: the plugin registry is one namespace per Keel home. A plugin installed
//! through the HTTP API is **owned** by the installing key's scope and invisible to every other
//! scope (404, as if it did not exist). A plugin installed from the CLI is **home-wide**: every
//! scope sees and calls it, but only an admin of [`DEFAULT_SCOPE`] may change it (grant, revoke,
//! remove, replace). The one thing another scope can learn is that a *name* is taken: installing
//! under a name another scope owns is refused without saying by whom.

use keel_store::Database;
use keel_store::api_keys::ApiKeyRow;
use rand::RngCore as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;

use crate::caller::{Caller, Role};
use crate::error::AppError;
pub use crate::kernel::DEFAULT_SCOPE;

/// Prefix of every key text.
const PREFIX: &str = "keel_";

/// Hex characters of the public id.
const ID_HEX: usize = 12;

/// Bytes of the secret.
const SECRET_BYTES: usize = 32;

/// A stored key as shown to an operator (never the secret or its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// Public id (the prefix of the key text).
    pub id: String,
    /// Name for humans.
    pub name: String,
    /// The scope the key is confined to.
    pub scope: String,
    /// What the key may do there.
    pub role: Role,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339, when revoked.
    pub revoked_at: Option<String>,
}

/// A key just created: the only time its text exists outside the caller's hands.
pub struct CreatedKey {
    /// What was stored.
    pub info: KeyInfo,
    /// The key text (`keel_<id>_<secret>`); print once, never log.
    pub key: String,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey")
            .field("info", &self.info)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The public id of the API key a request was authenticated with (an HTTP request extension):
/// what an MCP session is bound to, and what rate limits count by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyId(pub String);

/// An authenticated key: who is asking, and the key's public id (for rate limits and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The key's public id.
    pub key_id: String,
    /// The caller it stands for.
    pub caller: Caller,
}

/// Parse `read`, `write` or `admin`.
pub fn parse_role(s: &str) -> Result<Role, AppError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "read" => Ok(Role::Read),
        "write" => Ok(Role::Write),
        "admin" => Ok(Role::Admin),
        other => Err(AppError::user(format!(
            "unknown role {other:?} (one of read, write, admin)"
        ))),
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Read => "read",
        Role::Write => "write",
        Role::Admin => "admin",
    }
}

/// Check a scope name: 1–64 characters of `[A-Za-z0-9._-]`.
pub fn check_scope(scope: &str) -> Result<(), AppError> {
    let ok = !scope.is_empty()
        && scope.len() <= 64
        && scope
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(AppError::user(format!(
            "invalid scope {scope:?}: use 1 to 64 letters, digits, '.', '_' or '-'"
        )))
    }
}

fn info_of(row: ApiKeyRow) -> Result<KeyInfo, AppError> {
    Ok(KeyInfo {
        role: parse_role(&row.role).map_err(|_| AppError::internal(format!("key {} has an invalid role", row.id)))?,
        id: row.id,
        name: row.name,
        scope: row.scope,
        created_at: row.created_at,
        revoked_at: row.revoked_at,
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Create a key for `scope` with `role`; `name` defaults to the id.
pub async fn create_key(db: &Database, scope: &str, role: Role, name: Option<&str>) -> Result<CreatedKey, AppError> {
    check_scope(scope)?;
    let mut id = [0u8; ID_HEX / 2];
    let mut secret = [0u8; SECRET_BYTES];
    rand::rng().fill_bytes(&mut id);
    rand::rng().fill_bytes(&mut secret);
    let id = hex::encode(id);
    let secret = hex::encode(secret);
    let name = name.map(str::trim).filter(|n| !n.is_empty()).unwrap_or(&id).to_string();
    let row = ApiKeyRow {
        id: id.clone(),
        secret_sha256: sha256_hex(secret.as_bytes()),
        name,
        scope: scope.to_string(),
        role: role_name(role).to_string(),
        created_at: String::new(),
        revoked_at: None,
    };
    db.insert_api_key(&row).await?;
    let stored = db
        .get_api_key(&id)
        .await?
        .ok_or_else(|| AppError::internal("the new key cannot be read back"))?;
    Ok(CreatedKey {
        info: info_of(stored)?,
        key: format!("{PREFIX}{id}_{secret}"),
    })
}

/// Every key (revoked ones too), oldest first.
pub async fn list_keys(db: &Database) -> Result<Vec<KeyInfo>, AppError> {
    db.list_api_keys().await?.into_iter().map(info_of).collect()
}

/// Revoke key `id` (its public id); a user error when there is no such live key.
pub async fn revoke_key(db: &Database, id: &str) -> Result<KeyInfo, AppError> {
    let id = id.trim();
    if !db.revoke_api_key(id).await? {
        return Err(match db.get_api_key(id).await? {
            Some(_) => AppError::user(format!("key {id} is already revoked")),
            None => AppError::user(format!("no key with id {id} (see `keel keys list`)")),
        });
    }
    let row = db
        .get_api_key(id)
        .await?
        .ok_or_else(|| AppError::internal(format!("key {id} vanished")))?;
    info_of(row)
}

/// Split a key text into its id and secret, or `None` when it is not shaped like a key.
fn split_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == ID_HEX && secret.len() == SECRET_BYTES * 2).then_some((id, secret))
}

/// The caller `key` stands for, or `None` for a malformed, unknown, wrong or revoked key (one
/// answer for all, so a client cannot tell which).
pub async fn authenticate(db: &Database, key: &str) -> Result<Option<Authenticated>, AppError> {
    let Some((id, secret)) = split_key(key.trim()) else {
        return Ok(None);
    };
    let Some(row) = db.get_api_key(id).await? else {
        return Ok(None);
    };
    let presented = sha256_hex(secret.as_bytes());
    let matches: bool = presented.as_bytes().ct_eq(row.secret_sha256.as_bytes()).into();
    if !matches || row.revoked_at.is_some() {
        return Ok(None);
    }
    let info = info_of(row)?;
    Ok(Some(Authenticated {
        key_id: info.id,
        caller: Caller {
            scope: info.scope,
            principal: Some(format!("key:{}", info.name)),
            role: info.role,
        },
    }))
}

/// The caller of a live key by its public id (a browser session re-checks its key with this, so
/// revoking a key also ends the sessions opened with it).
pub async fn caller_of_key(db: &Database, id: &str) -> Result<Option<Caller>, AppError> {
    match db.get_api_key(id).await? {
        Some(row) if row.revoked_at.is_none() => {
            let info = info_of(row)?;
            Ok(Some(Caller {
                scope: info.scope,
                principal: Some(format!("key:{}", info.name)),
                role: info.role,
            }))
        }
        _ => Ok(None),
    }
}

/// Who owns plugin `name` in this home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginOwner {
    /// Installed from the CLI: visible to every scope.
    Home,
    /// Installed through the API by this scope: visible to it alone.
    Scope(String),
}

/// The owner of the installed plugin `name`.
pub async fn plugin_owner(db: &Database, name: &str) -> Result<PluginOwner, AppError> {
    Ok(match db.plugin_owner(name).await? {
        Some(scope) => PluginOwner::Scope(scope),
        None => PluginOwner::Home,
    })
}

/// Whether `caller` may see (list, show, call) a plugin with this owner.
pub fn may_see(caller: &Caller, owner: &PluginOwner) -> bool {
    match owner {
        PluginOwner::Home => true,
        PluginOwner::Scope(scope) => *scope == caller.scope,
    }
}

/// Whether `caller` may change (grant, revoke, remove, replace) a plugin with this owner: an
/// admin of the owning scope; for a home-wide plugin, an admin of [`DEFAULT_SCOPE`].
pub fn may_change(caller: &Caller, owner: &PluginOwner) -> bool {
    caller.role.allows(Role::Admin)
        && match owner {
            PluginOwner::Home => caller.scope == DEFAULT_SCOPE,
            PluginOwner::Scope(scope) => *scope == caller.scope,
        }
}

/// Names of the installed plugins `caller` may see, sorted.
pub async fn visible_plugins(db: &Database, caller: &Caller) -> Result<Vec<String>, AppError> {
    plugins_visible_in(db, &caller.scope).await
}

/// Names of the installed plugins visible in `scope` (the home's and its own), sorted.
pub async fn plugins_visible_in(db: &Database, scope: &str) -> Result<Vec<String>, AppError> {
    use keel_kernel::registry::PluginRegistry as _;
    let owners: std::collections::HashMap<String, String> = db.plugin_owners().await?.into_iter().collect();
    let mut names: Vec<String> = db
        .list_plugins()
        .await?
        .into_iter()
        .map(|p| p.name)
        .filter(|name| owners.get(name).is_none_or(|owner| owner == scope))
        .collect();
    names.sort();
    Ok(names)
}

/// Record that `scope` owns the plugin `name` it just installed.
pub async fn set_plugin_owner(db: &Database, name: &str, scope: &str) -> Result<(), AppError> {
    Ok(db.set_plugin_owner(name, scope).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_authenticates_until_revoked_and_only_exactly() {
        let db = Database::in_memory().await.unwrap();
        let created = create_key(&db, "acme", Role::Write, Some("ci")).await.unwrap();
        assert!(created.key.starts_with("keel_"));
        assert!(
            !format!("{created:?}").contains(&created.key[20..]),
            "Debug redacts the key"
        );
        let auth = authenticate(&db, &created.key).await.unwrap().expect("valid key");
        assert_eq!(auth.caller.scope, "acme");
        assert_eq!(auth.caller.role, Role::Write);
        assert_eq!(auth.key_id, created.info.id);

        // One character off in the secret, a bare id, junk: all rejected alike.
        let mut wrong = created.key.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        for bad in [wrong.as_str(), "keel_", "nonsense", &created.key[..30]] {
            assert!(authenticate(&db, bad).await.unwrap().is_none(), "{bad}");
        }
        // The secret is not stored.
        let row = db.get_api_key(&created.info.id).await.unwrap().unwrap();
        assert!(!created.key.contains(&row.secret_sha256));

        revoke_key(&db, &created.info.id).await.unwrap();
        assert!(authenticate(&db, &created.key).await.unwrap().is_none());
        assert!(caller_of_key(&db, &created.info.id).await.unwrap().is_none());
        assert!(revoke_key(&db, &created.info.id).await.is_err());
        assert!(create_key(&db, "bad scope", Role::Read, None).await.is_err());
    }

    #[test]
    fn who_may_see_and_change_plugins() {
        let admin_a = Caller {
            scope: "a".into(),
            principal: None,
            role: Role::Admin,
        };
        let writer_a = Caller {
            role: Role::Write,
            ..admin_a.clone()
        };
        let home_admin = Caller::local_admin(DEFAULT_SCOPE);
        let owned_a = PluginOwner::Scope("a".into());
        let owned_b = PluginOwner::Scope("b".into());
        assert!(may_see(&admin_a, &PluginOwner::Home));
        assert!(may_see(&admin_a, &owned_a));
        assert!(!may_see(&admin_a, &owned_b));
        assert!(may_change(&admin_a, &owned_a));
        assert!(!may_change(&writer_a, &owned_a));
        assert!(!may_change(&admin_a, &PluginOwner::Home));
        assert!(may_change(&home_admin, &PluginOwner::Home));
        assert!(!may_change(&home_admin, &owned_a));
    }
}
