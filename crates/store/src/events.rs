//! Events and rotation policies: the persistence half of "rotation without redeploy".
//!
//! **Events** reach webhook subscriptions through a durable per-subscription outbox. A
//! `SecretNewVersionCreated` row is written *by the database itself* (a trigger on the versions
//! table) in the very transaction that inserts the version, so no write path needs a hook and
//! no committed version can miss its event, whichever code path (set, restore, rotation)
//! created it. Near-expiry and expired notices are put in the same outbox by a periodic scan
//! ([`EventStore::enqueue_expiry_notices`]) that also records each notice it sent, so each
//! fires once per subscription, version and expiry time. A row leaves the outbox only when
//! the receiver has acknowledged it with a 2xx; the retry state (attempt count, next attempt)
//! is stored on the subscription, so backoff survives a restart. Events carry names, versions
//! and dates, never values.
//!
//! **Rotation policies** carry their next due time. The scheduled rotation of a due policy
//! inserts the new version and advances `next_due` in one transaction guarded by the due time
//! that was read ([`EventStore::rotate_version_if_due`]), so a due time is served exactly once:
//! a crash before the commit leaves it due, a crash after it leaves it served.

use async_trait::async_trait;
use coffer_core::crypto::SealedValue;
use coffer_core::model::{Timestamp, VersionProperties};
use coffer_core::names::SecretName;

use crate::Result;

/// The event types, with Event Grid's names (`Microsoft.KeyVault.<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    SecretNewVersionCreated,
    SecretNearExpiry,
    SecretExpired,
}

impl EventType {
    pub const ALL: [EventType; 3] =
        [EventType::SecretNewVersionCreated, EventType::SecretNearExpiry, EventType::SecretExpired];

    /// The short name, as stored and as accepted by `--type`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::SecretNewVersionCreated => "SecretNewVersionCreated",
            Self::SecretNearExpiry => "SecretNearExpiry",
            Self::SecretExpired => "SecretExpired",
        }
    }

    /// Event Grid's event type, used as the CloudEvents `type`.
    pub fn cloud_type(&self) -> &'static str {
        match self {
            Self::SecretNewVersionCreated => "Microsoft.KeyVault.SecretNewVersionCreated",
            Self::SecretNearExpiry => "Microsoft.KeyVault.SecretNearExpiry",
            Self::SecretExpired => "Microsoft.KeyVault.SecretExpired",
        }
    }

    /// Accepts the short or the full name, case-insensitively.
    pub fn parse(text: &str) -> Option<Self> {
        let lower = text.to_ascii_lowercase();
        let short = lower.strip_prefix("microsoft.keyvault.").unwrap_or(&lower);
        Self::ALL.into_iter().find(|t| t.as_str().eq_ignore_ascii_case(short))
    }
}

/// A webhook subscription to the events of one vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub id: String,
    pub vault_id: String,
    /// Filled in by the store when reading (the vault's name).
    pub vault_name: String,
    pub url: String,
    /// The event types delivered; empty means all.
    pub types: Vec<EventType>,
    /// Only this secret (matched case-insensitively), as given.
    pub secret: Option<String>,
    /// How long before `exp` a `SecretNearExpiry` fires.
    pub near_expiry_secs: i64,
    pub created: Timestamp,
}

impl Subscription {
    pub fn wants(&self, t: EventType) -> bool {
        self.types.is_empty() || self.types.contains(&t)
    }

    /// The name of its signing secret among the wrapped keys.
    pub fn secret_key_name(id: &str) -> String {
        format!("webhook-secret:{id}")
    }
}

/// A subscription with its delivery state.
#[derive(Debug, Clone)]
pub struct SubscriptionState {
    pub subscription: Subscription,
    /// Events waiting in its outbox.
    pub pending: u64,
    /// Failed attempts at the head event since the last success.
    pub attempts: u32,
    /// Not before this time is the head event tried again.
    pub next_attempt: Timestamp,
    pub last_error: Option<String>,
    pub delivered: u64,
}

/// One event waiting for one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Position in the outbox (delivery order).
    pub seq: i64,
    pub subscription_id: String,
    pub event_type: EventType,
    pub vault_id: String,
    pub vault_name: String,
    /// The secret's name as stored.
    pub secret_name: String,
    pub version: String,
    /// The version's row number (stable for the life of the database).
    pub version_seq: i64,
    pub nbf: Option<Timestamp>,
    pub exp: Option<Timestamp>,
    /// When the event happened.
    pub time: Timestamp,
}

/// A secret's rotation policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationPolicy {
    pub vault_id: String,
    /// The secret's name as given.
    pub secret_name: String,
    /// Rotate when the current version is this old.
    pub every_secs: Option<i64>,
    /// Rotate this long before the current version's `exp`.
    pub before_expiry_secs: Option<i64>,
    /// Generator spec (`password:32:upper,lower,digit,symbol`, `bytes:32:hex`, `uuid`); `None`
    /// for notify-only policies.
    pub generator: Option<String>,
    /// New versions expire this long after they are made.
    pub expires_after_secs: Option<i64>,
    /// Rotated by an outside system: Coffer never generates a value.
    pub notify_only: bool,
    /// When the next scheduled rotation is due; `None` when nothing is scheduled.
    pub next_due: Option<Timestamp>,
    pub last_rotated: Option<Timestamp>,
    pub created: Timestamp,
    pub updated: Timestamp,
}

/// Event subscriptions, the event outbox and rotation policies.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    // -- subscriptions ------------------------------------------------------------------------
    /// Creates a subscription and stores its wrapped signing secret, atomically. Events written
    /// after this commits are delivered to it.
    async fn create_subscription(&self, sub: &Subscription, wrapped_secret: (String, Vec<u8>)) -> Result<()>;
    /// Subscriptions with their delivery state, of one vault or all.
    async fn subscriptions(&self, vault_id: Option<&str>) -> Result<Vec<SubscriptionState>>;
    async fn subscription(&self, id: &str) -> Result<Option<Subscription>>;
    /// Deletes a subscription, its outbox and its signing secret; false if it did not exist.
    async fn delete_subscription(&self, id: &str) -> Result<bool>;

    // -- outbox -------------------------------------------------------------------------------
    /// Queues `SecretNearExpiry` (exp within the subscription's window) and `SecretExpired`
    /// (exp passed) for the latest version of active secrets, once per subscription, version
    /// and expiry time. Returns how many events were queued.
    async fn enqueue_expiry_notices(&self, now: Timestamp) -> Result<u64>;
    /// The oldest `limit` events of a subscription.
    async fn pending_events(&self, subscription_id: &str, limit: usize) -> Result<Vec<OutboxEvent>>;
    /// Subscriptions with events whose next attempt is due at `now`, with the number of failed
    /// attempts at their head event so far.
    async fn subscriptions_due(&self, now: Timestamp) -> Result<Vec<(Subscription, u32)>>;
    /// Removes a delivered event and resets the subscription's retry state.
    async fn ack_event(&self, subscription_id: &str, seq: i64) -> Result<()>;
    /// Records a failed attempt: the head event is tried again at `next_attempt`.
    async fn defer_events(
        &self,
        subscription_id: &str,
        attempts: u32,
        next_attempt: Timestamp,
        error: &str,
    ) -> Result<()>;

    // -- rotation policies --------------------------------------------------------------------
    /// Inserts or replaces the policy of a secret.
    async fn put_rotation_policy(&self, policy: &RotationPolicy) -> Result<()>;
    async fn rotation_policy(&self, vault_id: &str, name_key: &str) -> Result<Option<RotationPolicy>>;
    async fn rotation_policies(&self, vault_id: &str) -> Result<Vec<RotationPolicy>>;
    async fn delete_rotation_policy(&self, vault_id: &str, name_key: &str) -> Result<bool>;
    /// Policies whose `next_due` is at or before `now`, soonest first.
    async fn due_rotation_policies(&self, now: Timestamp, limit: usize) -> Result<Vec<RotationPolicy>>;
    /// Sets `next_due` to `next` if it is still `expected`; true if it was.
    async fn reschedule_rotation(
        &self,
        vault_id: &str,
        name_key: &str,
        expected: Option<Timestamp>,
        next: Option<Timestamp>,
    ) -> Result<bool>;
    /// The scheduled rotation: in one transaction, if the policy's `next_due` is still
    /// `expected_due`, adds the version (the secret must be active) and sets `next_due` to
    /// `next_due` and `last_rotated` to the version's creation time. Returns false, having
    /// written nothing, when the due time was already served or changed.
    async fn rotate_version_if_due(
        &self,
        vault_id: &str,
        name: &SecretName,
        props: &VersionProperties,
        sealed: &SealedValue,
        expected_due: Timestamp,
        next_due: Option<Timestamp>,
    ) -> Result<bool>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_type_names() {
        assert_eq!(EventType::parse("SecretNearExpiry"), Some(EventType::SecretNearExpiry));
        assert_eq!(EventType::parse("secretexpired"), Some(EventType::SecretExpired));
        assert_eq!(
            EventType::parse("Microsoft.KeyVault.SecretNewVersionCreated"),
            Some(EventType::SecretNewVersionCreated)
        );
        assert_eq!(EventType::parse("microsoft.keyvault.secretexpired"), Some(EventType::SecretExpired));
        assert_eq!(EventType::parse("CertificateExpired"), None);
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.cloud_type()), Some(t));
        }
    }
}
