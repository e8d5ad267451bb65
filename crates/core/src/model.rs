//! Secret metadata and the rules that apply to it. Values never live in these types: a value is a
//! [`crate::crypto::SecretValue`] and only ever crosses layers encrypted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::names::{
    MAX_CONTENT_TYPE_CHARS, MAX_TAGS, MAX_TAG_NAME_CHARS, MAX_TAG_VALUE_CHARS, MAX_VALUE_BYTES,
};

/// Tags are a small string map; a BTreeMap keeps their order stable in responses and backups.
pub type Tags = BTreeMap<String, String>;

/// Unix seconds.
pub type Timestamp = i64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("The secret value is {0} bytes; Key Vault allows at most {MAX_VALUE_BYTES} bytes.")]
    ValueTooLarge(usize),
    #[error("contentType is {0} characters; at most {MAX_CONTENT_TYPE_CHARS} are allowed.")]
    ContentTypeTooLong(usize),
    #[error("{0} tags were given; at most {MAX_TAGS} are allowed.")]
    TooManyTags(usize),
    #[error("A tag name is empty or longer than {MAX_TAG_NAME_CHARS} characters.")]
    TagName,
    #[error("The value of tag '{0}' is longer than {MAX_TAG_VALUE_CHARS} characters.")]
    TagValue(String),
    #[error("Soft-delete retention must be between 7 and 90 days, not {0}.")]
    RetentionDays(i64),
    #[error("nbf ({nbf}) must not be later than exp ({exp}).")]
    NotBeforeAfterExpiry { nbf: Timestamp, exp: Timestamp },
}

pub fn validate_value_len(len: usize) -> Result<(), ValidationError> {
    if len > MAX_VALUE_BYTES {
        return Err(ValidationError::ValueTooLarge(len));
    }
    Ok(())
}

pub fn validate_content_type(content_type: Option<&str>) -> Result<(), ValidationError> {
    match content_type {
        Some(ct) if ct.chars().count() > MAX_CONTENT_TYPE_CHARS => {
            Err(ValidationError::ContentTypeTooLong(ct.chars().count()))
        }
        _ => Ok(()),
    }
}

pub fn validate_tags(tags: &Tags) -> Result<(), ValidationError> {
    if tags.len() > MAX_TAGS {
        return Err(ValidationError::TooManyTags(tags.len()));
    }
    for (name, value) in tags {
        if name.is_empty() || name.chars().count() > MAX_TAG_NAME_CHARS {
            return Err(ValidationError::TagName);
        }
        if value.chars().count() > MAX_TAG_VALUE_CHARS {
            let shown: String = name.chars().take(64).collect();
            return Err(ValidationError::TagValue(shown));
        }
    }
    Ok(())
}

/// The attributes of one secret version, as Key Vault models them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionAttributes {
    pub enabled: bool,
    pub not_before: Option<Timestamp>,
    pub expires: Option<Timestamp>,
    pub created: Timestamp,
    pub updated: Timestamp,
}

impl VersionAttributes {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if let (Some(nbf), Some(exp)) = (self.not_before, self.expires) {
            if nbf > exp {
                return Err(ValidationError::NotBeforeAfterExpiry { nbf, exp });
            }
        }
        Ok(())
    }
}

/// Everything about a secret version except its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionProperties {
    pub version: String,
    pub attributes: VersionAttributes,
    pub content_type: Option<String>,
    pub tags: Tags,
}

/// A change to a version's properties; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PropertiesPatch {
    pub enabled: Option<bool>,
    pub not_before: Option<Timestamp>,
    pub expires: Option<Timestamp>,
    pub content_type: Option<String>,
    pub tags: Option<Tags>,
}

impl PropertiesPatch {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_content_type(self.content_type.as_deref())?;
        if let Some(tags) = &self.tags {
            validate_tags(tags)?;
        }
        Ok(())
    }

    /// Applies the patch, returning the updated properties (validated as a whole).
    pub fn apply(
        &self,
        mut props: VersionProperties,
        now: Timestamp,
    ) -> Result<VersionProperties, ValidationError> {
        if let Some(enabled) = self.enabled {
            props.attributes.enabled = enabled;
        }
        if let Some(nbf) = self.not_before {
            props.attributes.not_before = Some(nbf);
        }
        if let Some(exp) = self.expires {
            props.attributes.expires = Some(exp);
        }
        if let Some(ct) = &self.content_type {
            props.content_type = Some(ct.clone());
        }
        if let Some(tags) = &self.tags {
            props.tags = tags.clone();
        }
        props.attributes.updated = now;
        props.attributes.validate()?;
        Ok(props)
    }
}

/// Per-vault soft-delete policy, fixed at vault creation as in Key Vault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    pub retention_days: i64,
    pub purge_protection: bool,
}

impl RetentionPolicy {
    pub const DEFAULT_DAYS: i64 = 90;

    pub fn new(retention_days: i64, purge_protection: bool) -> Result<Self, ValidationError> {
        if !(7..=90).contains(&retention_days) {
            return Err(ValidationError::RetentionDays(retention_days));
        }
        Ok(Self { retention_days, purge_protection })
    }

    /// Key Vault's `recoveryLevel` string for this policy.
    pub fn recovery_level(&self) -> &'static str {
        match (self.retention_days == 90, self.purge_protection) {
            (true, false) => "Recoverable+Purgeable",
            (true, true) => "Recoverable",
            (false, false) => "CustomizedRecoverable+Purgeable",
            (false, true) => "CustomizedRecoverable",
        }
    }

    /// When a secret deleted at `deleted_at` is purged automatically.
    pub fn scheduled_purge(&self, deleted_at: Timestamp) -> Timestamp {
        deleted_at + self.retention_days * 86_400
    }
}

/// The soft-delete facts of a deleted secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deletion {
    pub deleted_at: Timestamp,
    pub scheduled_purge: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_levels_match_key_vault() {
        assert_eq!(RetentionPolicy::new(90, false).unwrap().recovery_level(), "Recoverable+Purgeable");
        assert_eq!(RetentionPolicy::new(90, true).unwrap().recovery_level(), "Recoverable");
        assert_eq!(
            RetentionPolicy::new(7, false).unwrap().recovery_level(),
            "CustomizedRecoverable+Purgeable"
        );
        assert_eq!(RetentionPolicy::new(30, true).unwrap().recovery_level(), "CustomizedRecoverable");
        assert!(RetentionPolicy::new(6, false).is_err());
        assert!(RetentionPolicy::new(91, false).is_err());
    }

    #[test]
    fn value_and_tag_limits() {
        assert!(validate_value_len(MAX_VALUE_BYTES).is_ok());
        assert_eq!(
            validate_value_len(MAX_VALUE_BYTES + 1),
            Err(ValidationError::ValueTooLarge(MAX_VALUE_BYTES + 1))
        );
        let tags: Tags = (0..15).map(|i| (format!("t{i}"), "v".into())).collect();
        assert!(validate_tags(&tags).is_ok());
        let too_many: Tags = (0..16).map(|i| (format!("t{i}"), "v".into())).collect();
        assert_eq!(validate_tags(&too_many), Err(ValidationError::TooManyTags(16)));
        let long_value: Tags = [("k".to_string(), "v".repeat(257))].into();
        assert!(validate_tags(&long_value).is_err());
        assert!(validate_content_type(Some(&"c".repeat(256))).is_err());
        assert!(validate_content_type(Some(&"c".repeat(255))).is_ok());
    }

    #[test]
    fn patch_applies_only_given_fields_and_checks_dates() {
        let props = VersionProperties {
            version: "v".into(),
            attributes: VersionAttributes {
                enabled: true,
                not_before: None,
                expires: Some(100),
                created: 1,
                updated: 1,
            },
            content_type: Some("text/plain".into()),
            tags: [("a".to_string(), "b".to_string())].into(),
        };
        let patch = PropertiesPatch { enabled: Some(false), ..Default::default() };
        let out = patch.apply(props.clone(), 5).unwrap();
        assert!(!out.attributes.enabled);
        assert_eq!(out.attributes.expires, Some(100));
        assert_eq!(out.content_type.as_deref(), Some("text/plain"));
        assert_eq!(out.attributes.updated, 5);
        let bad = PropertiesPatch { not_before: Some(200), ..Default::default() };
        assert!(bad.apply(props, 5).is_err());
    }
}
