//! Validated names, following Azure Key Vault's rules. Parse, don't validate: once a value is a
//! [`SecretName`] or a [`VaultName`] it is known to be well-formed.

use std::fmt;

use thiserror::Error;

/// Largest secret value Key Vault accepts (25 KiB, counted in bytes of UTF-8).
pub const MAX_VALUE_BYTES: usize = 25 * 1024;
/// Largest `contentType`.
pub const MAX_CONTENT_TYPE_CHARS: usize = 255;
/// Most tags one secret version may carry.
pub const MAX_TAGS: usize = 15;
/// Longest tag name.
pub const MAX_TAG_NAME_CHARS: usize = 512;
/// Longest tag value.
pub const MAX_TAG_VALUE_CHARS: usize = 256;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("The secret name '{0}' is invalid: it must be 1-127 characters of 0-9, a-z, A-Z and '-'.")]
    Secret(String),
    #[error(
        "The vault name '{0}' is invalid: it must be 3-24 characters of a-z, 0-9 and '-', \
         start with a letter, end with a letter or digit and not contain '--'."
    )]
    Vault(String),
    #[error("The version '{0}' is invalid: a version is 32 lowercase hexadecimal characters.")]
    Version(String),
    #[error(
        "The scope '{0}' is invalid: a scope is exactly '/', '/vaults/VAULT' or \
         '/vaults/VAULT/secrets/SECRET', with a valid vault and secret name and no trailing '/'."
    )]
    Scope(String),
    #[error("In the scope '{0}': {1}")]
    ScopeName(String, Box<NameError>),
}

/// A secret name: `^[0-9a-zA-Z-]{1,127}$`. Key Vault treats names case-insensitively; the
/// [`SecretName::key`] form is what lookups use, the original spelling is kept for display.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SecretName(String);

impl SecretName {
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        let valid =
            (1..=127).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if valid {
            Ok(Self(raw.to_owned()))
        } else {
            Err(NameError::Secret(truncate_for_message(raw)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The case-folded form used for uniqueness and lookups.
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretName({})", self.0)
    }
}

/// A vault name, with Azure's rules (3-24 characters, lowercase here because it is a DNS label
/// and hosts compare case-insensitively).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct VaultName(String);

impl VaultName {
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        let lower = raw.to_ascii_lowercase();
        let bytes = lower.as_bytes();
        let valid = (3..=24).contains(&bytes.len())
            && bytes[0].is_ascii_lowercase()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            && !lower.contains("--");
        if valid {
            Ok(Self(lower))
        } else {
            Err(NameError::Vault(truncate_for_message(raw)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VaultName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for VaultName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VaultName({})", self.0)
    }
}

/// A secret version id: 32 lowercase hex characters, as the real service issues.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct VersionId(String);

impl VersionId {
    /// A fresh random version id (a v4 UUID without dashes).
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string())
    }

    pub fn parse(raw: &str) -> Result<Self, NameError> {
        let valid = raw.len() == 32 && raw.bytes().all(|b| b.is_ascii_hexdigit());
        if valid {
            Ok(Self(raw.to_ascii_lowercase()))
        } else {
            Err(NameError::Version(truncate_for_message(raw)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Names (and scopes) come from requests: keep what we echo into error messages short and
/// printable.
pub(crate) fn truncate_for_message(raw: &str) -> String {
    raw.chars().take(140).map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_follow_key_vault_rules() {
        for ok in ["a", "A-1", "demo-api-key", &"x".repeat(127), "0", "-"] {
            assert!(SecretName::parse(ok).is_ok(), "{ok} should be valid");
        }
        for bad in ["", "bad_name", "a b", "é", "a.b", "a/b", &"x".repeat(128), "name!"] {
            assert!(SecretName::parse(bad).is_err(), "{bad} should be invalid");
        }
    }

    #[test]
    fn secret_names_compare_case_insensitively_by_key() {
        let a = SecretName::parse("Demo-Key").unwrap();
        let b = SecretName::parse("demo-key").unwrap();
        assert_eq!(a.key(), b.key());
        assert_eq!(a.as_str(), "Demo-Key");
    }

    #[test]
    fn vault_names_follow_azure_rules() {
        for ok in ["dev", "kv-sherpa-camp1-x1", "abc", &"a".repeat(24), "DEV"] {
            assert!(VaultName::parse(ok).is_ok(), "{ok} should be valid");
        }
        for bad in ["ab", "1abc", "abc-", "a--b", "a_b", &"a".repeat(25), "a.b", ""] {
            assert!(VaultName::parse(bad).is_err(), "{bad} should be invalid");
        }
        assert_eq!(VaultName::parse("DEV").unwrap().as_str(), "dev");
    }

    #[test]
    fn version_ids_are_32_lowercase_hex() {
        let v = VersionId::generate();
        assert_eq!(v.as_str().len(), 32);
        assert!(v.as_str().bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert!(VersionId::parse(v.as_str()).is_ok());
        assert!(VersionId::parse("xyz").is_err());
        assert!(VersionId::parse(&"g".repeat(32)).is_err());
    }

    #[test]
    fn error_messages_do_not_echo_control_characters() {
        let err = SecretName::parse("a\nb").unwrap_err().to_string();
        assert!(!err.contains('\n'));
    }
}
