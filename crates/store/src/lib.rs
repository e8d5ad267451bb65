//! Storage for Coffer: the [`Store`] trait and its embedded SQLite implementation.
//!
//! Architecture invariant: the store never sees a plaintext secret value or an unwrapped key.
//! Values arrive as [`SealedValue`]s and keys as wrapped blobs; the store persists bytes and
//! enforces the lifecycle rules that need atomicity (a name in the soft-deleted state cannot be
//! reused, restore never overwrites, a patch is read-modify-write in one transaction).
//!
//! Every method that returns `Ok` after a write has committed it durably.

mod events;
mod sqlite;

use async_trait::async_trait;
use coffer_core::authz::{Principal, RoleAssignment, RoleDefinition};
use coffer_core::crypto::SealedValue;
use coffer_core::identity::{Binding, CredentialKind, CredentialRecord, FederatedCredential};
use coffer_core::model::{
    Deletion, PropertiesPatch, RetentionPolicy, Timestamp, ValidationError, VersionProperties,
};
use coffer_core::names::{SecretName, VaultName};
use thiserror::Error;

pub use events::*;
pub use sqlite::SqliteStore;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// The secret name is in the deleted-but-recoverable state.
    #[error("the name is held by a soft-deleted secret")]
    NameDeleted,
    /// The name is in use (restore never overwrites).
    #[error("the name is already in use")]
    NameExists,
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("storage backend failure: {0}")]
    Backend(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A vault as stored. `id` is a stable UUID bound into every ciphertext of the vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultRecord {
    pub id: String,
    pub name: VaultName,
    pub policy: RetentionPolicy,
    pub created: Timestamp,
}

/// One version of a secret, value still sealed.
#[derive(Debug, Clone)]
pub struct StoredVersion {
    /// The secret's name as first spelled.
    pub name: String,
    pub props: VersionProperties,
    pub sealed: SealedValue,
}

/// A secret in a listing: its name and the properties of its latest version.
#[derive(Debug, Clone)]
pub struct SecretSummary {
    pub name: String,
    pub latest: VersionProperties,
}

/// A soft-deleted secret.
#[derive(Debug, Clone)]
pub struct DeletedSecret {
    pub name: String,
    pub deletion: Deletion,
    pub latest: VersionProperties,
}

/// Principals, credentials, group memberships, role definitions and assignments, bindings and
/// federated credentials. The server keeps an in-memory snapshot of everything but credentials
/// and rebuilds it after each change.
#[async_trait]
pub trait DirectoryStore: Send + Sync + 'static {
    async fn principals(&self) -> Result<Vec<Principal>>;
    /// Inserts or replaces a principal. `NameExists` if another principal has its name.
    async fn put_principal(&self, principal: &Principal) -> Result<()>;
    /// Deletes a principal with its credentials, memberships, assignments and bindings.
    async fn delete_principal(&self, object_id: &str) -> Result<()>;
    /// (group id, member id) pairs.
    async fn memberships(&self) -> Result<Vec<(String, String)>>;
    async fn add_member(&self, group_id: &str, member_id: &str) -> Result<()>;
    async fn remove_member(&self, group_id: &str, member_id: &str) -> Result<bool>;
    async fn credentials(&self, principal_id: &str, kind: CredentialKind) -> Result<Vec<CredentialRecord>>;
    async fn credential(&self, id: &str) -> Result<Option<CredentialRecord>>;
    async fn add_credential(&self, credential: &CredentialRecord) -> Result<()>;
    /// Deletes credentials of a kind, keeping `keep` (used to replace dev credentials).
    async fn delete_credentials(
        &self,
        principal_id: &str,
        kind: CredentialKind,
        keep: Option<&str>,
    ) -> Result<u64>;
    /// Deletes one credential; true if it existed. Consuming a one-time token relies on this
    /// being atomic: only one caller gets `true`.
    async fn take_credential(&self, id: &str) -> Result<bool>;
    async fn custom_roles(&self) -> Result<Vec<RoleDefinition>>;
    async fn put_custom_role(&self, role: &RoleDefinition) -> Result<()>;
    async fn delete_custom_role(&self, id: &str) -> Result<bool>;
    async fn role_assignments(&self) -> Result<Vec<RoleAssignment>>;
    /// `NameExists` if the same principal, role and scope are already assigned.
    async fn add_role_assignment(&self, assignment: &RoleAssignment) -> Result<()>;
    async fn delete_role_assignment(&self, id: &str) -> Result<bool>;
    async fn bindings(&self) -> Result<Vec<Binding>>;
    async fn add_binding(&self, binding: &Binding) -> Result<()>;
    async fn delete_binding(&self, id: &str) -> Result<bool>;
    async fn federated_credentials(&self) -> Result<Vec<FederatedCredential>>;
    async fn add_federated_credential(&self, credential: &FederatedCredential) -> Result<()>;
    async fn delete_federated_credential(&self, id: &str) -> Result<bool>;
}

/// The persistence seam. Implementations: [`SqliteStore`] (embedded default).
#[async_trait]
pub trait Store: DirectoryStore + EventStore {
    // -- server metadata and wrapped keys --------------------------------------------------
    async fn meta(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Sets `key` unless it is set already; returns the value now stored.
    async fn init_meta(&self, key: &str, value: Vec<u8>) -> Result<Vec<u8>>;
    async fn put_meta(&self, key: &str, value: Vec<u8>) -> Result<()>;
    async fn wrapped_key(&self, name: &str) -> Result<Option<Vec<u8>>>;
    async fn delete_wrapped_key(&self, name: &str) -> Result<()>;
    async fn wrapped_keys(&self) -> Result<Vec<(String, Vec<u8>)>>;
    async fn put_wrapped_key(&self, name: &str, blob: Vec<u8>) -> Result<()>;
    /// Replaces every wrapped key in one transaction (root-key rotation).
    async fn replace_wrapped_keys(&self, keys: Vec<(String, Vec<u8>)>) -> Result<()>;

    // -- vaults -----------------------------------------------------------------------------
    /// Creates a vault and stores its wrapped KEK atomically. `NameExists` if taken.
    async fn create_vault(&self, vault: &VaultRecord, wrapped_kek: (String, Vec<u8>)) -> Result<()>;
    async fn vaults(&self) -> Result<Vec<VaultRecord>>;
    /// Number of (active, soft-deleted) secrets in a vault.
    async fn vault_secret_counts(&self, vault_id: &str) -> Result<(u64, u64)>;
    /// Deletes a vault with all its secrets and its KEK.
    async fn delete_vault(&self, vault_id: &str, kek_name: &str) -> Result<()>;

    // -- secrets ----------------------------------------------------------------------------
    /// Adds a version (creating the secret if new). `NameDeleted` if the name is soft-deleted.
    async fn add_version(
        &self,
        vault_id: &str,
        name: &SecretName,
        props: &VersionProperties,
        sealed: &SealedValue,
    ) -> Result<()>;
    /// The given version, or the latest when `version` is `None`, of an active secret.
    async fn version(
        &self,
        vault_id: &str,
        name_key: &str,
        version: Option<&str>,
    ) -> Result<Option<StoredVersion>>;
    /// Active secrets ordered by name key, after the `after` name key.
    async fn list_secrets(
        &self,
        vault_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SecretSummary>>;
    /// Versions of an active secret in creation order, after sequence number `after`.
    /// `NotFound` when the secret does not exist. Items are (sequence number, secret name as
    /// stored, properties).
    async fn list_versions(
        &self,
        vault_id: &str,
        name_key: &str,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, String, VersionProperties)>>;
    /// Applies a patch to one version (latest when `None`), atomically.
    async fn update_version(
        &self,
        vault_id: &str,
        name_key: &str,
        version: Option<&str>,
        patch: PropertiesPatch,
        now: Timestamp,
    ) -> Result<StoredVersion>;
    /// Soft-deletes an active secret (all its versions).
    async fn delete_secret(
        &self,
        vault_id: &str,
        name_key: &str,
        deletion: Deletion,
    ) -> Result<DeletedSecret>;
    async fn deleted_secret(&self, vault_id: &str, name_key: &str) -> Result<Option<DeletedSecret>>;
    async fn list_deleted(
        &self,
        vault_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeletedSecret>>;
    /// Brings a soft-deleted secret back; returns its latest version.
    async fn recover(&self, vault_id: &str, name_key: &str) -> Result<StoredVersion>;
    /// Permanently removes a soft-deleted secret.
    async fn purge(&self, vault_id: &str, name_key: &str) -> Result<()>;
    /// Every version of an active secret, oldest first (for backup).
    async fn all_versions(&self, vault_id: &str, name_key: &str) -> Result<Vec<StoredVersion>>;
    /// Recreates a secret with the given versions (oldest first). `NameExists`/`NameDeleted` if
    /// the name is taken in any state.
    async fn restore(
        &self,
        vault_id: &str,
        name: &SecretName,
        versions: Vec<(VersionProperties, SealedValue)>,
    ) -> Result<()>;
    /// Purges soft-deleted secrets whose scheduled purge date has passed; returns how many.
    async fn purge_due(&self, now: Timestamp) -> Result<u64>;
}
