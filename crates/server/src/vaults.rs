//! The vault service: secret operations with encryption applied. This is the only layer that
//! sees plaintext values: it seals them before they reach the store and opens them after.
//! It knows nothing about HTTP.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::Engine;
use coffer_core::crypto::{Key, SealedValue, SecretValue, ValueLocation};
use coffer_core::model::{
    validate_content_type, validate_tags, validate_value_len, Deletion, PropertiesPatch, RetentionPolicy,
    Tags, Timestamp, ValidationError, VersionAttributes, VersionProperties,
};
use coffer_core::names::{SecretName, VaultName, VersionId};
use coffer_store::{DeletedSecret, SecretSummary, Store, StoreError, StoredVersion, VaultRecord};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::keyring::{Keyring, KeyringError};
use crate::tokens::unix_now;

const BACKUP_AAD: &[u8] = b"coffer/v1/secret-backup";
const BACKUP_MAGIC: &[u8] = b"CFBK1";

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error("not found")]
    NotFound,
    #[error("the secret is disabled")]
    Disabled,
    #[error("the name is held by a soft-deleted secret")]
    NameDeleted,
    #[error("the name is in use")]
    NameExists,
    #[error("{0}")]
    Invalid(String),
    #[error("purge protection is on for this vault")]
    PurgeProtected,
    #[error("the backup blob is malformed, was modified, or was made by another Coffer server")]
    BadBackup,
    #[error("the vault still holds {active} secrets and {deleted} soft-deleted secrets")]
    VaultNotEmpty { active: u64, deleted: u64 },
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::NotFound,
            StoreError::NameDeleted => Self::NameDeleted,
            StoreError::NameExists => Self::NameExists,
            StoreError::Invalid(v) => Self::Invalid(v.to_string()),
            StoreError::Backend(msg) => Self::Internal(msg),
        }
    }
}

impl From<ValidationError> for ServiceError {
    fn from(e: ValidationError) -> Self {
        Self::Invalid(e.to_string())
    }
}

impl From<KeyringError> for ServiceError {
    fn from(e: KeyringError) -> Self {
        Self::Internal(e.to_string())
    }
}

/// A vault and its unwrapped KEK, cached for the life of the vault.
pub struct Vault {
    pub record: VaultRecord,
    kek: coffer_core::crypto::Key,
}

impl Vault {
    fn location<'a>(&'a self, name_key: &'a str, version: &'a str) -> ValueLocation<'a> {
        ValueLocation { vault_id: &self.record.id, secret_key: name_key, version }
    }

    fn open(&self, stored: &StoredVersion) -> Result<SecretValue, ServiceError> {
        let key = stored.name.to_ascii_lowercase();
        stored
            .sealed
            .open(&self.kek, self.location(&key, &stored.props.version))
            .map_err(|_| ServiceError::Internal(format!("secret '{}' failed to decrypt", stored.name)))
    }
}

/// What a caller gives to create a version.
pub struct NewSecret {
    pub value: SecretValue,
    pub content_type: Option<String>,
    pub tags: Tags,
    pub enabled: Option<bool>,
    pub not_before: Option<Timestamp>,
    pub expires: Option<Timestamp>,
}

#[derive(Serialize, Deserialize)]
struct BackupVersion {
    props: VersionProperties,
    value: Zeroizing<String>,
}

#[derive(Serialize, Deserialize)]
struct BackupPayload {
    name: String,
    versions: Vec<BackupVersion>,
}

pub struct VaultService {
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    vaults: RwLock<HashMap<String, Arc<Vault>>>,
    changes: Changes,
}

/// What changed about a secret; published after the change is committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretChange {
    /// Position in this server's change sequence (restarts from 1 with a new `epoch`).
    pub seq: u64,
    pub vault: String,
    /// The secret's name, as stored.
    pub name: String,
    pub version: Option<String>,
    pub kind: ChangeKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ChangeKind {
    NewVersion,
    Updated,
    Deleted,
    Recovered,
    Purged,
    Restored,
}

/// The in-memory change feed behind the long-poll endpoint: a bounded ring of recent changes
/// and a notifier. Clients that fall behind the ring (or see a new epoch) re-read the secret.
pub struct Changes {
    pub epoch: String,
    ring: std::sync::Mutex<std::collections::VecDeque<SecretChange>>,
    next_seq: std::sync::atomic::AtomicU64,
    notify: tokio::sync::watch::Sender<u64>,
}

const CHANGE_RING: usize = 4096;

impl Changes {
    fn new() -> Self {
        Self {
            epoch: uuid::Uuid::new_v4().simple().to_string(),
            ring: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(CHANGE_RING)),
            next_seq: std::sync::atomic::AtomicU64::new(1),
            notify: tokio::sync::watch::channel(0).0,
        }
    }

    fn publish(&self, vault: &Vault, name: &str, version: Option<&str>, kind: ChangeKind) {
        let mut ring = self.ring.lock().expect("change ring lock poisoned");
        let seq = self.next_seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if ring.len() == CHANGE_RING {
            ring.pop_front();
        }
        ring.push_back(SecretChange {
            seq,
            vault: vault.record.name.to_string(),
            name: name.to_owned(),
            version: version.map(str::to_owned),
            kind,
        });
        drop(ring);
        self.notify.send_replace(seq);
    }

    /// Changes after `after` matching `filter`; `None` if `after` fell out of the ring.
    pub fn since(&self, after: u64, filter: &dyn Fn(&SecretChange) -> bool) -> Option<Vec<SecretChange>> {
        let ring = self.ring.lock().expect("change ring lock poisoned");
        if let Some(first) = ring.front() {
            if after + 1 < first.seq {
                return None;
            }
        }
        Some(ring.iter().filter(|c| c.seq > after && filter(c)).cloned().collect())
    }

    /// The latest sequence number published.
    pub fn head(&self) -> u64 {
        *self.notify.borrow()
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.notify.subscribe()
    }
}

fn now() -> Timestamp {
    unix_now() as Timestamp
}

/// Validates a new version, gives it a fresh version id and seals its value under the vault
/// KEK for its location. Shared by every path that creates a version from a value.
fn seal_new_version(
    vault: &Vault,
    name: &SecretName,
    new: NewSecret,
) -> Result<(VersionProperties, SealedValue), ServiceError> {
    validate_value_len(new.value.len())?;
    validate_content_type(new.content_type.as_deref())?;
    validate_tags(&new.tags)?;
    let now = now();
    let version = VersionId::generate();
    let props = VersionProperties {
        version: version.as_str().to_owned(),
        attributes: VersionAttributes {
            enabled: new.enabled.unwrap_or(true),
            not_before: new.not_before,
            expires: new.expires,
            created: now,
            updated: now,
        },
        content_type: new.content_type,
        tags: new.tags,
    };
    props.attributes.validate()?;
    let key = name.key();
    let sealed = SealedValue::seal(&vault.kek, vault.location(&key, version.as_str()), &new.value);
    Ok((props, sealed))
}

impl VaultService {
    /// Loads every vault and unwraps its KEK.
    pub async fn load(store: Arc<dyn Store>, keyring: Arc<Keyring>) -> Result<Self, ServiceError> {
        let mut vaults = HashMap::new();
        for record in store.vaults().await? {
            let kek = keyring.load_kek(store.as_ref(), &record.id).await?;
            vaults.insert(record.name.as_str().to_owned(), Arc::new(Vault { record, kek }));
        }
        Ok(Self { store, keyring, vaults: RwLock::new(vaults), changes: Changes::new() })
    }

    pub fn changes(&self) -> &Changes {
        &self.changes
    }

    pub fn vault(&self, name: &str) -> Option<Arc<Vault>> {
        self.vaults.read().expect("vault map lock poisoned").get(name).cloned()
    }

    pub fn vaults(&self) -> Vec<VaultRecord> {
        let mut out: Vec<_> =
            self.vaults.read().expect("vault map lock poisoned").values().map(|v| v.record.clone()).collect();
        out.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
        out
    }

    pub async fn create_vault(
        &self,
        name: VaultName,
        policy: RetentionPolicy,
    ) -> Result<VaultRecord, ServiceError> {
        let record = VaultRecord { id: uuid::Uuid::new_v4().to_string(), name, policy, created: now() };
        let (kek, wrapped) = self.keyring.new_vault_kek(&record.id);
        self.store.create_vault(&record, wrapped).await?;
        self.keyring.install_kek(&record.id, kek.clone());
        self.vaults
            .write()
            .expect("vault map lock poisoned")
            .insert(record.name.as_str().to_owned(), Arc::new(Vault { record: record.clone(), kek }));
        Ok(record)
    }

    pub async fn vault_counts(&self, vault: &Vault) -> Result<(u64, u64), ServiceError> {
        Ok(self.store.vault_secret_counts(&vault.record.id).await?)
    }

    /// Deletes a vault. Without `force` the vault must be empty; purge protection forbids
    /// deleting a vault that still holds soft-deleted secrets.
    pub async fn delete_vault(&self, name: &str, force: bool) -> Result<(), ServiceError> {
        let vault = self.vault(name).ok_or(ServiceError::NotFound)?;
        let (active, deleted) = self.vault_counts(&vault).await?;
        if (active > 0 || deleted > 0) && !force {
            return Err(ServiceError::VaultNotEmpty { active, deleted });
        }
        if deleted > 0 && vault.record.policy.purge_protection {
            return Err(ServiceError::PurgeProtected);
        }
        self.store.delete_vault(&vault.record.id, &Keyring::kek_name(&vault.record.id)).await?;
        self.keyring.remove_kek(&vault.record.id);
        self.vaults.write().expect("vault map lock poisoned").remove(name);
        Ok(())
    }

    pub async fn set(
        &self,
        vault: &Vault,
        name: &SecretName,
        new: NewSecret,
    ) -> Result<VersionProperties, ServiceError> {
        let (props, sealed) = seal_new_version(vault, name, new)?;
        self.store.add_version(&vault.record.id, name, &props, &sealed).await?;
        self.changes.publish(vault, name.as_str(), Some(&props.version), ChangeKind::NewVersion);
        Ok(props)
    }

    /// The scheduled rotation's write: seals `new` exactly as [`VaultService::set`] does, then
    /// in one store transaction adds the version and moves the rotation policy's due time from
    /// `expected_due` to `next_due(new version)`. `Ok(None)`, having written nothing, when that
    /// due time was already served (or changed), so a due time is served exactly once.
    pub async fn set_if_due(
        &self,
        vault: &Vault,
        name: &SecretName,
        new: NewSecret,
        expected_due: Timestamp,
        next_due: impl FnOnce(&VersionProperties) -> Option<Timestamp>,
    ) -> Result<Option<VersionProperties>, ServiceError> {
        let (props, sealed) = seal_new_version(vault, name, new)?;
        let next = next_due(&props);
        let store: &dyn Store = self.store.as_ref();
        let rotated = coffer_store::EventStore::rotate_version_if_due(
            store,
            &vault.record.id,
            name,
            &props,
            &sealed,
            expected_due,
            next,
        )
        .await?;
        if !rotated {
            return Ok(None);
        }
        self.changes.publish(vault, name.as_str(), Some(&props.version), ChangeKind::NewVersion);
        Ok(Some(props))
    }

    /// Returns a version and its value. A disabled version is refused, as in Key Vault.
    pub async fn get(
        &self,
        vault: &Vault,
        name: &SecretName,
        version: Option<&str>,
    ) -> Result<(StoredVersion, SecretValue), ServiceError> {
        let stored = self.find(vault, name, version).await?;
        if !stored.props.attributes.enabled {
            return Err(ServiceError::Disabled);
        }
        let value = vault.open(&stored)?;
        Ok((stored, value))
    }

    async fn find(
        &self,
        vault: &Vault,
        name: &SecretName,
        version: Option<&str>,
    ) -> Result<StoredVersion, ServiceError> {
        let version = match version {
            Some(v) => Some(VersionId::parse(v).map_err(|_| ServiceError::NotFound)?),
            None => None,
        };
        self.store
            .version(&vault.record.id, &name.key(), version.as_ref().map(VersionId::as_str))
            .await?
            .ok_or(ServiceError::NotFound)
    }

    pub async fn list(
        &self,
        vault: &Vault,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SecretSummary>, ServiceError> {
        Ok(self.store.list_secrets(&vault.record.id, after, limit).await?)
    }

    pub async fn list_versions(
        &self,
        vault: &Vault,
        name: &SecretName,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, String, VersionProperties)>, ServiceError> {
        Ok(self.store.list_versions(&vault.record.id, &name.key(), after, limit).await?)
    }

    pub async fn update(
        &self,
        vault: &Vault,
        name: &SecretName,
        version: Option<&str>,
        patch: PropertiesPatch,
    ) -> Result<StoredVersion, ServiceError> {
        patch.validate()?;
        let version = match version {
            Some(v) => Some(VersionId::parse(v).map_err(|_| ServiceError::NotFound)?),
            None => None,
        };
        let stored = self
            .store
            .update_version(
                &vault.record.id,
                &name.key(),
                version.as_ref().map(VersionId::as_str),
                patch,
                now(),
            )
            .await?;
        self.changes.publish(vault, &stored.name, Some(&stored.props.version), ChangeKind::Updated);
        Ok(stored)
    }

    pub async fn delete(&self, vault: &Vault, name: &SecretName) -> Result<DeletedSecret, ServiceError> {
        let now = now();
        let deletion =
            Deletion { deleted_at: now, scheduled_purge: vault.record.policy.scheduled_purge(now) };
        let deleted = self.store.delete_secret(&vault.record.id, &name.key(), deletion).await?;
        self.changes.publish(vault, &deleted.name, None, ChangeKind::Deleted);
        Ok(deleted)
    }

    pub async fn deleted(&self, vault: &Vault, name: &SecretName) -> Result<DeletedSecret, ServiceError> {
        self.store.deleted_secret(&vault.record.id, &name.key()).await?.ok_or(ServiceError::NotFound)
    }

    pub async fn list_deleted(
        &self,
        vault: &Vault,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeletedSecret>, ServiceError> {
        Ok(self.store.list_deleted(&vault.record.id, after, limit).await?)
    }

    pub async fn recover(&self, vault: &Vault, name: &SecretName) -> Result<StoredVersion, ServiceError> {
        let stored = self.store.recover(&vault.record.id, &name.key()).await?;
        self.changes.publish(vault, &stored.name, Some(&stored.props.version), ChangeKind::Recovered);
        Ok(stored)
    }

    pub async fn purge(&self, vault: &Vault, name: &SecretName) -> Result<(), ServiceError> {
        if vault.record.policy.purge_protection {
            // Still report a missing secret as missing.
            self.deleted(vault, name).await?;
            return Err(ServiceError::PurgeProtected);
        }
        self.store.purge(&vault.record.id, &name.key()).await?;
        self.changes.publish(vault, name.as_str(), None, ChangeKind::Purged);
        Ok(())
    }

    /// Every version with its value, sealed under the server's backup key.
    pub async fn backup(&self, vault: &Vault, name: &SecretName) -> Result<String, ServiceError> {
        let stored = self.store.all_versions(&vault.record.id, &name.key()).await?;
        let display = stored.first().map(|s| s.name.clone()).ok_or(ServiceError::NotFound)?;
        let mut versions = Vec::with_capacity(stored.len());
        for s in &stored {
            let value = vault.open(s)?;
            versions.push(BackupVersion {
                props: s.props.clone(),
                value: Zeroizing::new(value.expose().to_owned()),
            });
        }
        seal_backup(self.keyring.backup_key(), &BackupPayload { name: display, versions })
    }

    /// Restores a backup into `vault`, re-encrypting every version for its new location.
    pub async fn restore(&self, vault: &Vault, blob: &str) -> Result<StoredVersion, ServiceError> {
        let (name, payload) = open_backup(self.keyring.backup_key(), blob)?;
        let key = name.key();
        let versions = payload
            .versions
            .into_iter()
            .map(|v| {
                let value = SecretValue::new((*v.value).clone());
                let sealed = SealedValue::seal(&vault.kek, vault.location(&key, &v.props.version), &value);
                (v.props, sealed)
            })
            .collect();
        self.store.restore(&vault.record.id, &name, versions).await?;
        let stored = self.find(vault, &name, None).await?;
        self.changes.publish(vault, &stored.name, Some(&stored.props.version), ChangeKind::Restored);
        Ok(stored)
    }

    /// Purges soft-deleted secrets past their retention; run periodically.
    pub async fn purge_due(&self) -> Result<u64, ServiceError> {
        Ok(self.store.purge_due(now()).await?)
    }
}

/// A backup blob: `CFBK1` then the payload's JSON sealed under the backup key, in base64url.
fn seal_backup(backup_key: &Key, payload: &BackupPayload) -> Result<String, ServiceError> {
    let plain =
        Zeroizing::new(serde_json::to_vec(payload).map_err(|e| ServiceError::Internal(e.to_string()))?);
    let mut blob = BACKUP_MAGIC.to_vec();
    blob.extend(backup_key.seal(BACKUP_AAD, &plain));
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(blob))
}

/// Reads a backup blob (what a client sends to restore): `BadBackup` unless it was sealed by
/// this backup key and holds a valid secret name with at least one version.
fn open_backup(backup_key: &Key, blob: &str) -> Result<(SecretName, BackupPayload), ServiceError> {
    let raw = decode_base64_any(blob).ok_or(ServiceError::BadBackup)?;
    let sealed = raw.strip_prefix(BACKUP_MAGIC).ok_or(ServiceError::BadBackup)?;
    let plain = backup_key.open(BACKUP_AAD, sealed).map_err(|_| ServiceError::BadBackup)?;
    read_backup_payload(&plain)
}

/// The opened payload of a backup.
fn read_backup_payload(plain: &[u8]) -> Result<(SecretName, BackupPayload), ServiceError> {
    let payload: BackupPayload = serde_json::from_slice(plain).map_err(|_| ServiceError::BadBackup)?;
    let name = SecretName::parse(&payload.name).map_err(|_| ServiceError::BadBackup)?;
    if payload.versions.is_empty() {
        return Err(ServiceError::BadBackup);
    }
    Ok((name, payload))
}

/// The backup reader and writer the service uses, for the fuzz targets (`crate::fuzzing`).
#[doc(hidden)]
pub mod backup_fuzzing {
    use super::*;

    /// Seals `plain` as a backup under `key`, so a target reaches the JSON reader behind the AEAD.
    pub fn seal_raw(key: &Key, plain: &[u8]) -> String {
        let mut blob = BACKUP_MAGIC.to_vec();
        blob.extend(key.seal(BACKUP_AAD, plain));
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(blob)
    }

    /// Opens a blob as restore does: the name, the payload's JSON as read, and the payload
    /// sealed again as backup would write it.
    pub fn open(key: &Key, blob: &str) -> Result<(SecretName, String, String), ServiceError> {
        let (name, payload) = open_backup(key, blob)?;
        let json = serde_json::to_string(&payload).map_err(|e| ServiceError::Internal(e.to_string()))?;
        Ok((name, json, seal_backup(key, &payload)?))
    }
}

/// Backups travel as base64url; accept padded or standard alphabets too.
fn decode_base64_any(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let text = text.trim();
    [URL_SAFE_NO_PAD, URL_SAFE, STANDARD, STANDARD_NO_PAD].iter().find_map(|e| e.decode(text).ok())
}
