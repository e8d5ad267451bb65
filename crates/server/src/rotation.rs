//! Rotation policies: when a secret is due (every interval and/or some time before `exp`),
//! what makes its next value (a built-in [`Generator`]), and the background task that rotates
//! due secrets.
//!
//! A policy's `next_due` is stored. The scheduler reads due policies and, for each, re-derives
//! the due time from the secret's current version (someone may have set a new version since);
//! if it is still due it generates a value and calls [`VaultService::set_if_due`], which adds
//! the version and advances `next_due` in one transaction guarded by the due time it read.
//! A crash before that commit leaves the policy due (it runs after the restart); a crash after
//! it leaves the due time served (it does not run again). "Notify only" policies never
//! generate: the secret is rotated by an outside system and subscribers get the near-expiry
//! and expired events.
//!
//! Generated values live in [`SecretValue`] (zeroized on drop, redacted in `Debug`) and go
//! straight to the vault service, which seals them; they are never logged or returned.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use coffer_core::crypto::SecretValue;
use coffer_core::model::Timestamp;
use coffer_core::names::SecretName;
use coffer_store::{RotationPolicy, Store};
use rand::rngs::OsRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore};
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::api::AppState;
use crate::tokens::unix_now;
use crate::vaults::{NewSecret, ServiceError, Vault};

/// What `coffer secret rotate` generates for a secret without a policy: 32 characters,
/// letters and digits (safe in headers, URLs and shells).
pub const DEFAULT_GENERATOR: &str = "password:32:upper,lower,digit";
const TICK: Duration = Duration::from_secs(1);
/// Policies rotated per round (the next round continues).
const BATCH: usize = 50;
/// After a failed scheduled rotation, the next try.
const RETRY_SECS: Timestamp = 60;

const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const LOWER: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const DIGIT: &[u8] = b"0123456789";
/// Printable symbols without quotes, backslash, backtick or space.
const SYMBOL: &[u8] = b"!#$%&()*+,-./:;<=>?@[]^_{|}~";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CharClass {
    Upper,
    Lower,
    Digit,
    Symbol,
}

impl CharClass {
    const ALL: [CharClass; 4] = [CharClass::Upper, CharClass::Lower, CharClass::Digit, CharClass::Symbol];

    fn name(self) -> &'static str {
        match self {
            Self::Upper => "upper",
            Self::Lower => "lower",
            Self::Digit => "digit",
            Self::Symbol => "symbol",
        }
    }

    fn chars(self) -> &'static [u8] {
        match self {
            Self::Upper => UPPER,
            Self::Lower => LOWER,
            Self::Digit => DIGIT,
            Self::Symbol => SYMBOL,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Base64,
    Hex,
}

/// A built-in value generator, written as a spec: `password:LEN[:CLASSES]` (classes from
/// `upper,lower,digit,symbol`, default all; at least one character of each), `bytes:LEN[:base64|hex]`
/// (LEN random bytes, default base64) or `uuid` (a random UUID).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Generator {
    Password { length: usize, classes: Vec<CharClass> },
    Bytes { length: usize, encoding: Encoding },
    Uuid,
}

pub const MAX_PASSWORD_LEN: usize = 4096;
pub const MAX_BYTES_LEN: usize = 4096;

impl Generator {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let parts: Vec<&str> = spec.trim().split(':').collect();
        let length = |text: &str, max: usize| -> Result<usize, String> {
            let n: usize = text.parse().map_err(|_| format!("'{text}' is not a length"))?;
            if n == 0 || n > max {
                return Err(format!("the length must be 1 to {max}"));
            }
            Ok(n)
        };
        match parts.as_slice() {
            ["uuid"] => Ok(Self::Uuid),
            ["password", len] | ["password", len, ""] => Ok(Self::Password {
                length: length(len, MAX_PASSWORD_LEN)?,
                classes: CharClass::ALL.to_vec(),
            }),
            ["password", len, classes] => {
                let mut parsed = Vec::new();
                for c in classes.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                    let class = CharClass::ALL
                        .into_iter()
                        .find(|k| {
                            let plural = format!("{}s", k.name());
                            k.name().eq_ignore_ascii_case(c) || plural.eq_ignore_ascii_case(c)
                        })
                        .ok_or_else(|| {
                            format!("unknown character class '{c}': use upper, lower, digit, symbol")
                        })?;
                    parsed.push(class);
                }
                parsed.sort();
                parsed.dedup();
                if parsed.is_empty() {
                    return Err("name at least one character class".into());
                }
                let length = length(len, MAX_PASSWORD_LEN)?;
                let n = parsed.len();
                if length < n {
                    return Err(format!("a password of {n} character classes is at least {n} long"));
                }
                Ok(Self::Password { length, classes: parsed })
            }
            ["bytes", len] => {
                Ok(Self::Bytes { length: length(len, MAX_BYTES_LEN)?, encoding: Encoding::Base64 })
            }
            ["bytes", len, enc] => {
                let encoding = match enc.to_ascii_lowercase().as_str() {
                    "base64" => Encoding::Base64,
                    "hex" => Encoding::Hex,
                    _ => return Err(format!("unknown encoding '{enc}' (use base64 or hex)")),
                };
                Ok(Self::Bytes { length: length(len, MAX_BYTES_LEN)?, encoding })
            }
            _ => Err(format!(
                "'{spec}' is not a generator: use password:LEN[:upper,lower,digit,symbol], \
                 bytes:LEN[:base64|hex] or uuid"
            )),
        }
    }

    /// The canonical spec (what is stored and shown).
    pub fn spec(&self) -> String {
        match self {
            Self::Uuid => "uuid".into(),
            Self::Password { length, classes } => {
                let names: Vec<&str> = classes.iter().map(|c| c.name()).collect();
                format!("password:{length}:{}", names.join(","))
            }
            Self::Bytes { length, encoding } => {
                format!("bytes:{length}:{}", if *encoding == Encoding::Hex { "hex" } else { "base64" })
            }
        }
    }

    /// A fresh value from the OS random number generator.
    pub fn generate(&self) -> SecretValue {
        match self {
            Self::Uuid => SecretValue::new(uuid::Uuid::new_v4().to_string()),
            Self::Bytes { length, encoding } => {
                let mut bytes = Zeroizing::new(vec![0u8; *length]);
                OsRng.fill_bytes(&mut bytes);
                SecretValue::new(match encoding {
                    Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(&*bytes),
                    Encoding::Hex => {
                        const HEX: &[u8; 16] = b"0123456789abcdef";
                        let mut text = String::with_capacity(bytes.len() * 2);
                        for b in bytes.iter() {
                            text.push(HEX[usize::from(b >> 4)] as char);
                            text.push(HEX[usize::from(b & 0xf)] as char);
                        }
                        text
                    }
                })
            }
            Self::Password { length, classes } => {
                let pool: Vec<u8> = classes.iter().flat_map(|c| c.chars().iter().copied()).collect();
                let mut out = Zeroizing::new(Vec::with_capacity(*length));
                // One of each class, the rest from all of them, then shuffled.
                for class in classes {
                    let chars = class.chars();
                    out.push(chars[OsRng.gen_range(0..chars.len())]);
                }
                while out.len() < *length {
                    out.push(pool[OsRng.gen_range(0..pool.len())]);
                }
                out.shuffle(&mut OsRng);
                // Invariant: every pool character is ASCII.
                SecretValue::new(String::from_utf8(out.to_vec()).expect("ASCII password"))
            }
        }
    }
}

/// When a policy wants the secret rotated next, given its current version's creation time
/// and expiry: the earlier of `created + every` and `exp - before_expiry`; `None` if neither
/// applies or the policy is notify-only.
pub fn next_due(policy: &RotationPolicy, created: Timestamp, exp: Option<Timestamp>) -> Option<Timestamp> {
    if policy.notify_only {
        return None;
    }
    let by_age = policy.every_secs.map(|every| created.saturating_add(every));
    let by_expiry = policy.before_expiry_secs.zip(exp).map(|(before, exp)| exp.saturating_sub(before));
    by_age.into_iter().chain(by_expiry).min()
}

/// Why a rotation did not happen.
#[derive(Debug)]
pub enum RotateError {
    /// The policy is notify-only: an outside system rotates this secret.
    NotifyOnly,
    Invalid(String),
    Service(ServiceError),
}

impl From<ServiceError> for RotateError {
    fn from(e: ServiceError) -> Self {
        Self::Service(e)
    }
}

impl From<coffer_store::StoreError> for RotateError {
    fn from(e: coffer_store::StoreError) -> Self {
        Self::Service(e.into())
    }
}

/// The new version of a rotated secret (never its value).
pub struct Rotated {
    pub name: String,
    pub props: coffer_core::model::VersionProperties,
    pub generator: String,
}

fn now() -> Timestamp {
    unix_now() as Timestamp
}

/// The version a rotation makes: a generated value, the current version's content type and
/// tags, and `exp` from the policy's `expires_after`.
fn new_version(
    policy: Option<&RotationPolicy>,
    current: &coffer_store::StoredVersion,
) -> Result<(NewSecret, String), RotateError> {
    let spec = policy.and_then(|p| p.generator.as_deref()).unwrap_or(DEFAULT_GENERATOR);
    let generator = Generator::parse(spec).map_err(RotateError::Invalid)?;
    let expires = policy.and_then(|p| p.expires_after_secs).map(|after| now().saturating_add(after));
    Ok((
        NewSecret {
            value: generator.generate(),
            content_type: current.props.content_type.clone(),
            tags: current.props.tags.clone(),
            enabled: None,
            not_before: None,
            expires,
        },
        generator.spec(),
    ))
}

/// `coffer secret rotate`: a new version now, from the secret's policy (or the default
/// generator when it has none). The policy's schedule restarts from the new version.
pub async fn rotate_now(state: &AppState, vault: &Vault, name: &SecretName) -> Result<Rotated, RotateError> {
    let store: &dyn Store = state.store.as_ref();
    let vault_id = vault.record.id.as_str();
    let policy = store.rotation_policy(vault_id, &name.key()).await?;
    if policy.as_ref().is_some_and(|p| p.notify_only) {
        return Err(RotateError::NotifyOnly);
    }
    let current = store.version(vault_id, &name.key(), None).await?.ok_or(ServiceError::NotFound)?;
    let (new, generator) = new_version(policy.as_ref(), &current)?;
    let props = state.vaults.set(vault, name, new).await?;
    if let Some(p) = &policy {
        let next = next_due(p, props.attributes.created, props.attributes.expires);
        // Guarded: if the scheduler moved it meanwhile, it re-derives the due time itself.
        store.reschedule_rotation(vault_id, &name.key(), p.next_due, next).await?;
    }
    tracing::info!(
        vault = %vault.record.name, secret = %current.name, version = %props.version,
        "secret rotated"
    );
    Ok(Rotated { name: current.name, props, generator })
}

/// Rotates due secrets until `shutdown` turns true: one round per second, at most [`BATCH`]
/// policies per round.
pub fn spawn_rotator(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                _ = rotate_due(&state) => {}
                _ = shutdown.changed() => return,
            }
        }
    });
}

async fn rotate_due(state: &AppState) {
    let store: &dyn Store = state.store.as_ref();
    let now = now();
    let due = match store.due_rotation_policies(now, BATCH).await {
        Ok(due) => due,
        Err(e) => {
            tracing::warn!(error = %e, "reading due rotation policies failed");
            return;
        }
    };
    for policy in due {
        let Some(expected) = policy.next_due else { continue };
        if let Err(e) = rotate_one(state, &policy, expected, now).await {
            tracing::warn!(
                secret = %policy.secret_name, error = ?e,
                "scheduled rotation failed; retrying in a minute"
            );
            let key = policy.secret_name.to_ascii_lowercase();
            let retry = Some(now + RETRY_SECS);
            if let Err(e) = store.reschedule_rotation(&policy.vault_id, &key, Some(expected), retry).await {
                tracing::warn!(error = %e, "rescheduling the failed rotation failed");
            }
        }
    }
}

async fn rotate_one(
    state: &AppState,
    policy: &RotationPolicy,
    expected: Timestamp,
    now: Timestamp,
) -> Result<(), RotateError> {
    let store: &dyn Store = state.store.as_ref();
    let vault_name = state
        .vaults
        .vaults()
        .into_iter()
        .find(|v| v.id == policy.vault_id)
        .map(|v| v.name)
        .ok_or(ServiceError::NotFound)?;
    let vault = state.vaults.vault(vault_name.as_str()).ok_or(ServiceError::NotFound)?;
    let name = SecretName::parse(&policy.secret_name).map_err(|e| RotateError::Invalid(e.to_string()))?;
    let current = store.version(&policy.vault_id, &name.key(), None).await?.ok_or(ServiceError::NotFound)?;
    // Re-derive from the current version: a version set since the due time was stored moves it.
    let effective = next_due(policy, current.props.attributes.created, current.props.attributes.expires);
    if effective.is_none_or(|due| due > now) {
        store.reschedule_rotation(&policy.vault_id, &name.key(), Some(expected), effective).await?;
        return Ok(());
    }
    let (new, _) = new_version(Some(policy), &current)?;
    let rotated = state
        .vaults
        .set_if_due(&vault, &name, new, expected, |props| {
            next_due(policy, props.attributes.created, props.attributes.expires)
        })
        .await?;
    match rotated {
        Some(props) => tracing::info!(
            vault = %vault_name, secret = %current.name, version = %props.version, due = expected,
            "scheduled rotation made a new version"
        ),
        None => tracing::debug!(secret = %current.name, due = expected, "due time already served"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(every: Option<i64>, before: Option<i64>) -> RotationPolicy {
        RotationPolicy {
            vault_id: "v".into(),
            secret_name: "s".into(),
            every_secs: every,
            before_expiry_secs: before,
            generator: None,
            expires_after_secs: None,
            notify_only: false,
            next_due: None,
            last_rotated: None,
            created: 0,
            updated: 0,
        }
    }

    #[test]
    fn passwords_have_the_requested_shape() {
        let g = Generator::parse("password:32:upper,lower,digit,symbol").unwrap();
        for _ in 0..50 {
            let v = g.generate();
            let s = v.expose();
            assert_eq!(s.len(), 32);
            assert!(s.bytes().any(|b| UPPER.contains(&b)));
            assert!(s.bytes().any(|b| LOWER.contains(&b)));
            assert!(s.bytes().any(|b| DIGIT.contains(&b)));
            assert!(s.bytes().any(|b| SYMBOL.contains(&b)));
        }
        let digits = Generator::parse("password:12:digit").unwrap().generate();
        assert!(digits.expose().len() == 12 && digits.expose().bytes().all(|b| b.is_ascii_digit()));
        let alnum = Generator::parse(DEFAULT_GENERATOR).unwrap().generate();
        assert!(alnum.expose().bytes().all(|b| b.is_ascii_alphanumeric()));
        // Exactly the classes: 4 characters, 4 classes.
        let tight = Generator::parse("password:4:symbol,digit,lower,upper").unwrap().generate();
        assert_eq!(tight.expose().len(), 4);
        assert_ne!(
            Generator::parse("password:64").unwrap().generate(),
            Generator::parse("password:64").unwrap().generate()
        );
    }

    #[test]
    fn bytes_and_uuids() {
        let hex = Generator::parse("bytes:32:hex").unwrap().generate();
        assert!(hex.expose().len() == 64 && hex.expose().bytes().all(|b| b.is_ascii_hexdigit()));
        let b64 = Generator::parse("bytes:32:base64").unwrap().generate();
        let decoded = base64::engine::general_purpose::STANDARD.decode(b64.expose()).unwrap();
        assert_eq!(decoded.len(), 32);
        assert_eq!(
            Generator::parse("bytes:16").unwrap(),
            Generator::Bytes { length: 16, encoding: Encoding::Base64 }
        );
        let id = Generator::parse("uuid").unwrap().generate();
        let parsed = uuid::Uuid::parse_str(id.expose()).unwrap();
        assert_eq!(parsed.get_version_num(), 4);
        assert!(format!("{id:?}").contains("redacted"), "generated values never show in Debug");
    }

    #[test]
    fn specs_parse_canonically_and_refuse_nonsense() {
        assert_eq!(Generator::parse("password:20:DIGITS,upper").unwrap().spec(), "password:20:upper,digit");
        assert_eq!(Generator::parse("password:20").unwrap().spec(), "password:20:upper,lower,digit,symbol");
        assert_eq!(Generator::parse("bytes:8:HEX").unwrap().spec(), "bytes:8:hex");
        assert_eq!(Generator::parse(" uuid ").unwrap().spec(), "uuid");
        for bad in [
            "",
            "password",
            "password:0",
            "password:x",
            "password:3:upper,lower,digit,symbol",
            "password:8:emoji",
            "password:5000",
            "bytes:0",
            "bytes:8:base32",
            "uuid:4",
            "random:8",
        ] {
            assert!(Generator::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn due_time_is_the_earlier_of_age_and_expiry() {
        assert_eq!(next_due(&policy(Some(100), None), 1_000, Some(5_000)), Some(1_100));
        assert_eq!(next_due(&policy(None, Some(100)), 1_000, Some(5_000)), Some(4_900));
        assert_eq!(next_due(&policy(None, Some(100)), 1_000, None), None);
        assert_eq!(next_due(&policy(Some(10_000), Some(100)), 1_000, Some(5_000)), Some(4_900));
        assert_eq!(next_due(&policy(Some(100), Some(100)), 1_000, Some(5_000)), Some(1_100));
        assert_eq!(next_due(&policy(None, None), 1_000, Some(5_000)), None);
        let notify = RotationPolicy { notify_only: true, ..policy(Some(100), Some(100)) };
        assert_eq!(next_due(&notify, 1_000, Some(5_000)), None);
    }
}
