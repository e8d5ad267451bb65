//! The keyring: the root key and everything it wraps, unwrapped once at start-up and held in
//! memory (zeroized on drop). Nothing here is ever written to disk unwrapped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use coffer_core::crypto::{CryptoError, Key};
use coffer_store::{Store, StoreError};
use rand::RngCore;
use thiserror::Error;
use zeroize::Zeroizing;

/// Name of the wrapped random value that proves a root key belongs to this data directory.
const ROOT_CHECK: &str = "root-check";
const BACKUP_KEY: &str = "backup-key";
const ROOT_SALT_META: &str = "root-key-salt";

#[derive(Debug, Error)]
pub enum KeyringError {
    #[error(
        "the root key does not match this data directory (wrong key file or passphrase); \
         use the key or passphrase the directory was created with"
    )]
    WrongRootKey,
    #[error("cannot read the root key from {path}: {reason}")]
    RootKeySource { path: PathBuf, reason: String },
    #[error("the stored key '{0}' cannot be unwrapped with the root key")]
    Corrupt(String),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where the root key comes from.
#[derive(Debug, Clone)]
pub enum RootKeySource {
    /// A file holding 32 raw bytes or 64 hex characters.
    KeyFile(PathBuf),
    /// A file holding a passphrase; the key is Argon2id(passphrase, per-directory salt).
    PassphraseFile(PathBuf),
    /// A passphrase typed at a prompt.
    Passphrase(Zeroizing<String>),
}

impl RootKeySource {
    /// Produces the root key. For passphrases, the salt is created on first use and kept in the
    /// store (it is not secret).
    pub async fn load(&self, store: &dyn Store) -> Result<Key, KeyringError> {
        match self {
            Self::KeyFile(path) => {
                let bytes = Zeroizing::new(read_private_file(path)?);
                Key::from_key_file_contents(&bytes)
                    .map_err(|e| KeyringError::RootKeySource { path: path.clone(), reason: e.to_string() })
            }
            Self::PassphraseFile(path) => {
                let bytes = Zeroizing::new(read_private_file(path)?);
                let text = std::str::from_utf8(&bytes).map_err(|_| KeyringError::RootKeySource {
                    path: path.clone(),
                    reason: "the passphrase is not UTF-8".into(),
                })?;
                let passphrase = text.trim_end_matches(['\n', '\r']);
                if passphrase.is_empty() {
                    return Err(KeyringError::RootKeySource {
                        path: path.clone(),
                        reason: "the file is empty".into(),
                    });
                }
                derive(store, passphrase.as_bytes()).await
            }
            Self::Passphrase(p) => derive(store, p.as_bytes()).await,
        }
    }
}

async fn derive(store: &dyn Store, passphrase: &[u8]) -> Result<Key, KeyringError> {
    let mut salt = vec![0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let salt = store.init_meta(ROOT_SALT_META, salt).await?;
    let passphrase = Zeroizing::new(passphrase.to_vec());
    // Argon2id is deliberately slow: keep it off the async workers.
    tokio::task::spawn_blocking(move || Key::derive_from_passphrase(&passphrase, &salt))
        .await
        .map_err(|e| KeyringError::Corrupt(e.to_string()))?
        .map_err(KeyringError::from)
}

fn read_private_file(path: &Path) -> Result<Vec<u8>, KeyringError> {
    std::fs::read(path)
        .map_err(|e| KeyringError::RootKeySource { path: path.to_path_buf(), reason: e.to_string() })
}

/// Writes a new random root key file (mode 0600). Fails if the file exists.
pub fn create_root_key_file(path: &Path) -> std::io::Result<()> {
    let key = Key::generate();
    crate::files::write_private_new(path, format!("{}\n", &*key.to_hex()).as_bytes())
}

/// The unwrapped key hierarchy.
pub struct Keyring {
    root: Key,
    vault_keks: RwLock<HashMap<String, Key>>,
    backup_key: Key,
}

impl Keyring {
    /// Checks the root key against the store (or claims a fresh store for it) and unwraps the
    /// server keys.
    pub async fn open(store: &dyn Store, root: Key) -> Result<Self, KeyringError> {
        match store.wrapped_key(ROOT_CHECK).await? {
            Some(blob) => {
                root.unwrap_key(ROOT_CHECK, &blob).map_err(|_| KeyringError::WrongRootKey)?;
            }
            None => store.put_wrapped_key(ROOT_CHECK, root.wrap(ROOT_CHECK, &Key::generate())).await?,
        }
        let backup_key = match store.wrapped_key(BACKUP_KEY).await? {
            Some(blob) => {
                root.unwrap_key(BACKUP_KEY, &blob).map_err(|_| KeyringError::Corrupt(BACKUP_KEY.into()))?
            }
            None => {
                let key = Key::generate();
                store.put_wrapped_key(BACKUP_KEY, root.wrap(BACKUP_KEY, &key)).await?;
                key
            }
        };
        Ok(Self { root, vault_keks: RwLock::new(HashMap::new()), backup_key })
    }

    pub fn kek_name(vault_id: &str) -> String {
        format!("vault-kek:{vault_id}")
    }

    /// Creates a fresh KEK for a vault; returns it wrapped (name, blob) for the store to persist
    /// together with the vault row. It is usable once [`Keyring::install_kek`] is called.
    pub fn new_vault_kek(&self, vault_id: &str) -> (Key, (String, Vec<u8>)) {
        let kek = Key::generate();
        let name = Self::kek_name(vault_id);
        let wrapped = self.root.wrap(&name, &kek);
        (kek, (name, wrapped))
    }

    pub fn install_kek(&self, vault_id: &str, kek: Key) {
        self.vault_keks.write().expect("keyring lock poisoned").insert(vault_id.to_owned(), kek);
    }

    pub fn remove_kek(&self, vault_id: &str) {
        self.vault_keks.write().expect("keyring lock poisoned").remove(vault_id);
    }

    /// Unwraps the stored KEK of a vault and installs it.
    pub async fn load_kek(&self, store: &dyn Store, vault_id: &str) -> Result<Key, KeyringError> {
        let name = Self::kek_name(vault_id);
        let blob = store.wrapped_key(&name).await?.ok_or_else(|| KeyringError::Corrupt(name.clone()))?;
        let kek = self.root.unwrap_key(&name, &blob).map_err(|_| KeyringError::Corrupt(name))?;
        self.install_kek(vault_id, kek.clone());
        Ok(kek)
    }

    pub fn backup_key(&self) -> &Key {
        &self.backup_key
    }

    /// Unwraps named key material (e.g. a token-signing key) stored under the root key.
    pub fn unwrap_material(&self, name: &str, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyringError> {
        self.root.unwrap_bytes(name, blob).map_err(|_| KeyringError::Corrupt(name.into()))
    }

    pub fn wrap_material(&self, name: &str, material: &[u8]) -> Vec<u8> {
        self.root.wrap_bytes(name, material)
    }
}

/// Re-wraps every stored key under `new_root`, in one transaction. Data keys and ciphertexts
/// are untouched: they hang off the vault KEKs, which keep their value.
pub async fn rewrap_root(store: &dyn Store, old_root: &Key, new_root: &Key) -> Result<usize, KeyringError> {
    let current = store.wrapped_keys().await?;
    if current.iter().all(|(name, _)| name != ROOT_CHECK) {
        return Err(KeyringError::Corrupt(ROOT_CHECK.into()));
    }
    let mut rewrapped = Vec::with_capacity(current.len());
    for (name, blob) in &current {
        let material = old_root.unwrap_bytes(name, blob).map_err(|_| {
            if name == ROOT_CHECK {
                KeyringError::WrongRootKey
            } else {
                KeyringError::Corrupt(name.clone())
            }
        })?;
        rewrapped.push((name.clone(), new_root.wrap_bytes(name, &material)));
    }
    let count = rewrapped.len();
    store.replace_wrapped_keys(rewrapped).await?;
    Ok(count)
}
