//! The envelope-encryption scheme.
//!
//! ```text
//! root key (key file, or Argon2id(passphrase))
//!   └─ wraps named server keys: one key-encryption key (KEK) per vault, token-signing keys,
//!      the backup key            (AAD = the key's name)
//!        └─ a vault KEK wraps a fresh data key (DEK) per secret version
//!             └─ the DEK encrypts the value  (AAD = vault id, secret name, version)
//! ```
//!
//! Every layer is AES-256-GCM with a random 96-bit nonce from the OS RNG. Associated data binds a
//! ciphertext to its place, so a ciphertext copied to another row, vault or version fails to
//! decrypt. All key material is zeroized on drop.

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::rngs::OsRng;
use rand::RngCore;
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Format byte in front of every sealed blob, so the scheme can evolve.
const SEAL_FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CryptoError {
    /// Wrong key, wrong associated data or modified ciphertext. Deliberately says no more.
    #[error("decryption failed: the data was modified, moved, or sealed under another key")]
    Unseal,
    #[error("a key must be exactly 32 bytes (or 64 hexadecimal characters)")]
    KeyLength,
    #[error("deriving the root key from the passphrase failed: {0}")]
    Kdf(String),
}

/// A 256-bit symmetric key. Used for the root key, vault KEKs, data keys and the backup key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Key([u8; 32]);

impl Key {
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::KeyLength)?;
        Ok(Self(arr))
    }

    /// Accepts a key file's contents: 32 raw bytes, or 64 hex characters (whitespace ignored).
    pub fn from_key_file_contents(contents: &[u8]) -> Result<Self, CryptoError> {
        let trimmed: Zeroizing<Vec<u8>> =
            Zeroizing::new(contents.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect());
        if trimmed.len() == 64 {
            let decoded = Zeroizing::new(hex::decode(&*trimmed).map_err(|_| CryptoError::KeyLength)?);
            return Self::from_bytes(&decoded);
        }
        Self::from_bytes(contents)
    }

    /// The key as 64 hex characters, for writing a key file.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0))
    }

    /// Derives a root key from a passphrase with Argon2id (64 MiB, 3 passes).
    pub fn derive_from_passphrase(passphrase: &[u8], salt: &[u8]) -> Result<Self, CryptoError> {
        let params =
            argon2::Params::new(64 * 1024, 3, 1, Some(32)).map_err(|e| CryptoError::Kdf(e.to_string()))?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = [0u8; 32];
        argon.hash_password_into(passphrase, salt, &mut out).map_err(|e| CryptoError::Kdf(e.to_string()))?;
        let key = Self(out);
        out.zeroize();
        Ok(key)
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new((&self.0).into())
    }

    /// Encrypts `plaintext` bound to `aad`. Output: format byte, nonce, ciphertext and tag.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher()
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad })
            // Invariant: AES-GCM encryption only fails for inputs over 64 GiB.
            .expect("AES-GCM encryption of a bounded input cannot fail");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        out.push(SEAL_FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// Decrypts a blob made by [`Key::seal`] with the same key and associated data.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.len() < 1 + NONCE_LEN + TAG_LEN || sealed[0] != SEAL_FORMAT_V1 {
            return Err(CryptoError::Unseal);
        }
        let (nonce, ciphertext) = sealed[1..].split_at(NONCE_LEN);
        self.cipher()
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad })
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Unseal)
    }

    /// Wraps another key under this one; `name` says what the key is for and is bound as AAD.
    pub fn wrap(&self, name: &str, key: &Key) -> Vec<u8> {
        self.wrap_bytes(name, &key.0)
    }

    pub fn unwrap_key(&self, name: &str, wrapped: &[u8]) -> Result<Key, CryptoError> {
        let bytes = self.unwrap_bytes(name, wrapped)?;
        Key::from_bytes(&bytes)
    }

    /// Wraps arbitrary key material (for example a PKCS#8 signing key) under the name `name`.
    pub fn wrap_bytes(&self, name: &str, material: &[u8]) -> Vec<u8> {
        self.seal(&wrap_aad(name), material)
    }

    pub fn unwrap_bytes(&self, name: &str, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.open(&wrap_aad(name), wrapped)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

fn wrap_aad(name: &str) -> Vec<u8> {
    let mut aad = b"coffer/v1/key\0".to_vec();
    aad.extend_from_slice(name.as_bytes());
    aad
}

/// A secret value in memory: zeroized on drop, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue(<{} bytes redacted>)", self.0.len())
    }
}

/// Where a secret version lives; bound into both layers of its envelope.
#[derive(Debug, Clone, Copy)]
pub struct ValueLocation<'a> {
    /// The vault's stable internal id (not its name, which can be reused after deletion).
    pub vault_id: &'a str,
    /// The secret's case-folded name.
    pub secret_key: &'a str,
    pub version: &'a str,
}

impl ValueLocation<'_> {
    fn aad(&self, layer: &str) -> Vec<u8> {
        [b"coffer/v1/", layer.as_bytes(), b"\0", self.vault_id.as_bytes(), b"\0"]
            .concat()
            .into_iter()
            .chain(self.secret_key.bytes())
            .chain(std::iter::once(0))
            .chain(self.version.bytes())
            .collect()
    }
}

/// A secret value as stored: the value under a fresh data key, the data key under the vault KEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedValue {
    pub wrapped_dek: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl SealedValue {
    pub fn seal(kek: &Key, at: ValueLocation<'_>, value: &SecretValue) -> Self {
        let dek = Key::generate();
        Self {
            wrapped_dek: kek.seal(&at.aad("dek"), &dek.0),
            ciphertext: dek.seal(&at.aad("value"), value.expose().as_bytes()),
        }
    }

    pub fn open(&self, kek: &Key, at: ValueLocation<'_>) -> Result<SecretValue, CryptoError> {
        let dek_bytes = kek.open(&at.aad("dek"), &self.wrapped_dek)?;
        let dek = Key::from_bytes(&dek_bytes)?;
        let mut plain = dek.open(&at.aad("value"), &self.ciphertext)?;
        // The value went in as UTF-8; a failure here means corruption that passed the tag check,
        // which cannot happen, but is still reported as a decryption failure, not a panic.
        let text = String::from_utf8(std::mem::take(&mut *plain)).map_err(|e| {
            let mut bytes = e.into_bytes();
            bytes.zeroize();
            CryptoError::Unseal
        })?;
        Ok(SecretValue(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at<'a>(vault: &'a str, name: &'a str, version: &'a str) -> ValueLocation<'a> {
        ValueLocation { vault_id: vault, secret_key: name, version }
    }

    #[test]
    fn round_trip() {
        let kek = Key::generate();
        let value = SecretValue::new("s3cr3t-value".into());
        let sealed = SealedValue::seal(&kek, at("v1", "db", "abc"), &value);
        assert_eq!(sealed.open(&kek, at("v1", "db", "abc")).unwrap(), value);
        assert!(!sealed.ciphertext.windows(6).any(|w| w == b"s3cr3t"));
    }

    #[test]
    fn tampered_ciphertext_fails() {
        let kek = Key::generate();
        let value = SecretValue::new("value".into());
        let mut sealed = SealedValue::seal(&kek, at("v1", "db", "abc"), &value);
        let last = sealed.ciphertext.len() - 1;
        sealed.ciphertext[last] ^= 1;
        assert_eq!(sealed.open(&kek, at("v1", "db", "abc")), Err(CryptoError::Unseal));
        let mut sealed = SealedValue::seal(&kek, at("v1", "db", "abc"), &value);
        sealed.wrapped_dek[5] ^= 0x80;
        assert_eq!(sealed.open(&kek, at("v1", "db", "abc")), Err(CryptoError::Unseal));
    }

    #[test]
    fn a_ciphertext_moved_to_another_row_fails() {
        let kek = Key::generate();
        let sealed = SealedValue::seal(&kek, at("v1", "db", "abc"), &SecretValue::new("x".into()));
        assert!(sealed.open(&kek, at("v1", "db", "abd")).is_err(), "other version");
        assert!(sealed.open(&kek, at("v1", "dc", "abc")).is_err(), "other secret");
        assert!(sealed.open(&kek, at("v2", "db", "abc")).is_err(), "other vault");
        // A swap of the two halves between rows must fail as well.
        let other = SealedValue::seal(&kek, at("v1", "db", "abd"), &SecretValue::new("y".into()));
        let swapped = SealedValue { wrapped_dek: other.wrapped_dek, ciphertext: sealed.ciphertext };
        assert!(swapped.open(&kek, at("v1", "db", "abc")).is_err());
        // Field separators keep ("a", "b\0c") distinct from ("a\0b", "c").
        let s = SealedValue::seal(&kek, at("a", "b", "c"), &SecretValue::new("z".into()));
        assert!(s.open(&kek, at("a", "b", "c")).is_ok());
    }

    #[test]
    fn wrong_key_fails() {
        let sealed = SealedValue::seal(&Key::generate(), at("v", "n", "1"), &SecretValue::new("x".into()));
        assert_eq!(sealed.open(&Key::generate(), at("v", "n", "1")), Err(CryptoError::Unseal));
    }

    #[test]
    fn key_wrapping_binds_the_key_name() {
        let root = Key::generate();
        let kek = Key::generate();
        let wrapped = root.wrap("vault-kek:1", &kek);
        assert_eq!(root.unwrap_key("vault-kek:1", &wrapped).unwrap().0, kek.0);
        assert!(root.unwrap_key("vault-kek:2", &wrapped).is_err());
        assert!(Key::generate().unwrap_key("vault-kek:1", &wrapped).is_err());
    }

    #[test]
    fn key_files_accept_hex_or_raw() {
        let key = Key::generate();
        let hex_text = format!("{}\n", &*key.to_hex());
        assert_eq!(Key::from_key_file_contents(hex_text.as_bytes()).unwrap().0, key.0);
        assert_eq!(Key::from_key_file_contents(&key.0).unwrap().0, key.0);
        assert!(Key::from_key_file_contents(b"short").is_err());
    }

    #[test]
    fn passphrase_derivation_is_deterministic_per_salt() {
        let a = Key::derive_from_passphrase(b"correct horse", b"0123456789abcdef").unwrap();
        let b = Key::derive_from_passphrase(b"correct horse", b"0123456789abcdef").unwrap();
        let c = Key::derive_from_passphrase(b"correct horse", b"fedcba9876543210").unwrap();
        assert_eq!(a.0, b.0);
        assert_ne!(a.0, c.0);
    }

    #[test]
    fn debug_never_shows_secrets() {
        let v = SecretValue::new("hunter2".into());
        assert!(!format!("{v:?}").contains("hunter2"));
        assert!(!format!("{:?}", Key::generate()).contains(&*Key::generate().to_hex()));
    }
}
