//! Secret events to webhooks: `Microsoft.KeyVault.SecretNewVersionCreated`,
//! `…SecretNearExpiry` and `…SecretExpired`, as CloudEvents 1.0 in structured JSON mode, with
//! Event Grid's data fields (`Id`, `VaultName`, `ObjectType`, `ObjectName`, `Version`, `NBF`,
//! `EXP`). Events never carry values.
//!
//! **Delivery** is at-least-once from the store's durable outbox (see
//! [`coffer_store::EventStore`]): the new-version event is written in the transaction that
//! creates the version, near-expiry/expired notices by a periodic scan; a row leaves the outbox
//! only after the receiver answered 2xx. Each subscription's events go out one at a time in
//! order; a failure stops that subscription's queue and schedules the next attempt after
//! [`backoff`] (1 s, 2 s, 4 s … capped at 10 min), stored with the subscription so it survives a
//! restart. The event `id` is derived from what the event is about (type, vault, version row,
//! expiry), so it is the same on every retry and for every subscription: receivers dedupe on it.
//!
//! **Signature.** Each request carries `X-Coffer-Timestamp: <unix seconds>` and
//! `X-Coffer-Signature: sha256=<hex>`, the HMAC-SHA256 of `"<timestamp>.<body>"` under the
//! subscription's signing secret (the exact string shown once at subscribe time, as UTF-8
//! bytes). Receivers recompute it, compare in constant time, and reject stale timestamps
//! (e.g. older than 5 minutes) to stop replays. The secret is kept wrapped under the root key
//! as `webhook-secret:<id>`, so root-key rotation re-wraps it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use coffer_core::model::Timestamp;
use coffer_store::{EventType, OutboxEvent, Store, StoreError, Subscription};
use rand::RngCore;
use serde_json::json;
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::api::AppState;
use crate::keyring::Keyring;
use crate::outbound::OutboundPolicy;
use crate::tokens::unix_now;

/// Default `SecretNearExpiry` window: 30 days before `exp`, like Event Grid.
pub const DEFAULT_NEAR_EXPIRY_SECS: i64 = 30 * 86_400;
/// The longest wait between two attempts at a failing receiver.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// How often the outbox is polled for due deliveries.
const TICK: Duration = Duration::from_secs(1);
/// How often versions are scanned for near-expiry and expired notices.
const NOTICE_SCAN_EVERY_TICKS: u32 = 2;
/// Events sent to one subscription per round (the next round continues).
const BATCH: usize = 100;
/// Subscriptions served concurrently.
const PARALLEL: usize = 8;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Prefix of signing secrets (makes them recognisable to secret scanners).
pub const SECRET_PREFIX: &str = "cfwh_";

/// The delay before attempt `failures + 1`, after `failures` (≥ 1) failed attempts in a row:
/// 1 s, 2 s, 4 s, … capped at [`MAX_BACKOFF`].
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    Duration::from_secs(1u64 << exp).min(MAX_BACKOFF)
}

/// `sha256=<hex>` over `"<timestamp>.<body>"`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex(ctx.sign().as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The event's id: a UUID-shaped digest of what it is about, stable across retries.
pub fn event_id(e: &OutboxEvent) -> String {
    let exp = match e.event_type {
        EventType::SecretNewVersionCreated => String::new(),
        _ => e.exp.map(|x| x.to_string()).unwrap_or_default(),
    };
    let input = format!("coffer-event\0{}\0{}\0{}\0{exp}", e.event_type.as_str(), e.vault_id, e.version_seq);
    let d = ring::digest::digest(&ring::digest::SHA256, input.as_bytes());
    let h = hex(&d.as_ref()[..16]);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

fn rfc3339(ts: Timestamp) -> String {
    time::OffsetDateTime::from_unix_timestamp(ts)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// The CloudEvents 1.0 envelope (structured mode) of an outbox event.
pub fn cloud_event(e: &OutboxEvent, vault_url: &str) -> serde_json::Value {
    json!({
        "specversion": "1.0",
        "id": event_id(e),
        "source": vault_url,
        "type": e.event_type.cloud_type(),
        "subject": e.secret_name,
        "time": rfc3339(e.time),
        "datacontenttype": "application/json",
        "data": {
            "Id": format!("{vault_url}/secrets/{}/{}", e.secret_name, e.version),
            "VaultName": e.vault_name,
            "ObjectType": "Secret",
            "ObjectName": e.secret_name,
            "Version": e.version,
            "NBF": e.nbf,
            "EXP": e.exp,
        },
    })
}

/// A new signing secret: `cfwh_` and 32 random bytes in base64url.
pub fn new_signing_secret() -> Zeroizing<String> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(bytes.as_mut());
    let mut secret = Zeroizing::new(String::with_capacity(SECRET_PREFIX.len() + 43));
    secret.push_str(SECRET_PREFIX);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(bytes.as_ref(), &mut secret);
    secret
}

/// Creates a subscription; returns it with its signing secret (shown once, stored wrapped).
pub async fn subscribe(
    store: &dyn Store,
    keyring: &Keyring,
    mut sub: Subscription,
) -> Result<(Subscription, Zeroizing<String>), StoreError> {
    let secret = new_signing_secret();
    let key_name = Subscription::secret_key_name(&sub.id);
    let wrapped = keyring.wrap_material(&key_name, secret.as_bytes());
    sub.types.sort();
    sub.types.dedup();
    store.create_subscription(&sub, (key_name, wrapped)).await?;
    Ok((sub, secret))
}

/// Delivers outbox events until `shutdown` turns true. Every step is bounded: one round per
/// second; each due subscription gets its own worker (at most [`PARALLEL`] at a time, one per
/// subscription, so a slow receiver delays only its own events), which sends at most [`BATCH`]
/// events with 10 s per request. Workers are aborted at shutdown; an interrupted delivery is
/// simply sent again (at least once).
pub fn spawn_dispatcher(state: Arc<AppState>, data_dir: &Path, mut shutdown: watch::Receiver<bool>) {
    let data_dir = data_dir.to_path_buf();
    let outbound = state.outbound.clone();
    tokio::spawn(async move {
        // Loading the system trust roots takes milliseconds: not on the way to serving requests.
        let http = match tokio::task::spawn_blocking(move || http_client(&data_dir, &outbound)).await {
            Ok(Ok(http)) => http,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "event delivery is off: cannot build the HTTP client");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "event delivery is off: building the HTTP client failed");
                return;
            }
        };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Dropping the set (on return) aborts the workers.
        let mut workers = Workers::default();
        let mut round: u32 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            round = round.wrapping_add(1);
            let work = run_round(&state, &http, &mut workers, round % NOTICE_SCAN_EVERY_TICKS == 1);
            tokio::select! {
                _ = work => {}
                _ = shutdown.changed() => return,
            }
        }
    });
}

/// The delivery workers in flight, by subscription.
#[derive(Default)]
struct Workers {
    tasks: tokio::task::JoinSet<()>,
    busy: std::collections::HashMap<tokio::task::Id, String>,
}

impl Workers {
    fn reap(&mut self) {
        while let Some(done) = self.tasks.try_join_next_with_id() {
            let id = match done {
                Ok((id, ())) => id,
                Err(e) => {
                    tracing::error!(error = %e, "an event delivery worker failed");
                    e.id()
                }
            };
            self.busy.remove(&id);
        }
    }

    fn is_busy(&self, subscription: &str) -> bool {
        self.busy.values().any(|s| s == subscription)
    }
}

/// The webhook client: system roots (and `SSL_CERT_FILE`) plus the dev CA when there is one;
/// connects only where the outbound policy allows, follows no redirects.
fn http_client(data_dir: &Path, outbound: &Arc<OutboundPolicy>) -> Result<reqwest::Client, String> {
    let mut builder = outbound
        .client_builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("coffer-events/", env!("CARGO_PKG_VERSION")));
    let dev_ca = data_dir.join("ca.pem");
    if let Ok(pem) = std::fs::read(&dev_ca) {
        for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| e.to_string())? {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| e.to_string())
}

async fn run_round(state: &Arc<AppState>, http: &reqwest::Client, workers: &mut Workers, scan: bool) {
    let store: &dyn Store = state.store.as_ref();
    let now = unix_now() as Timestamp;
    if scan {
        match store.enqueue_expiry_notices(now).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(queued = n, "queued near-expiry/expired events"),
            Err(e) => tracing::warn!(error = %e, "scanning for expiring secrets failed"),
        }
    }
    workers.reap();
    if workers.busy.len() >= PARALLEL {
        return;
    }
    let due = match store.subscriptions_due(now).await {
        Ok(due) => due,
        Err(e) => {
            tracing::warn!(error = %e, "reading the event outbox failed");
            return;
        }
    };
    for (sub, failures) in due {
        if workers.busy.len() >= PARALLEL {
            break;
        }
        if workers.is_busy(&sub.id) {
            continue;
        }
        let (state, http, id) = (state.clone(), http.clone(), sub.id.clone());
        let handle = workers.tasks.spawn(async move { deliver(&state, &http, &sub, failures).await });
        workers.busy.insert(handle.id(), id);
    }
}

/// Sends a subscription's pending events in order until one fails.
async fn deliver(state: &AppState, http: &reqwest::Client, sub: &Subscription, failures: u32) {
    let store: &dyn Store = state.store.as_ref();
    let outcome: Result<(), String> = async {
        let key_name = Subscription::secret_key_name(&sub.id);
        let blob = store
            .wrapped_key(&key_name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the subscription's signing secret is missing")?;
        let secret = state.keyring.unwrap_material(&key_name, &blob).map_err(|e| e.to_string())?;
        let events = store.pending_events(&sub.id, BATCH).await.map_err(|e| e.to_string())?;
        // An IP literal does not go through the filtering resolver; the allow-list may also have
        // changed since the subscription was made.
        if !events.is_empty() {
            let url = reqwest::Url::parse(&sub.url).map_err(|e| e.to_string())?;
            state.outbound.check_url(&url)?;
        }
        for event in &events {
            let vault_url = AppState::vault_url(&state.zone, state.public_port, &event.vault_name);
            let body = cloud_event(event, &vault_url).to_string();
            let timestamp = unix_now() as i64;
            let response = http
                .post(&sub.url)
                .header(reqwest::header::CONTENT_TYPE, "application/cloudevents+json; charset=utf-8")
                .header("X-Coffer-Timestamp", timestamp.to_string())
                .header("X-Coffer-Signature", signature(&secret, timestamp, body.as_bytes()))
                .header("X-Coffer-Subscription", &sub.id)
                .body(body)
                .send()
                .await
                .map_err(|e| format!("{}: {}", event.event_type.as_str(), error_chain(&e)))?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("{}: the receiver answered {status}", event.event_type.as_str()));
            }
            store.ack_event(&sub.id, event.seq).await.map_err(|e| e.to_string())?;
            tracing::debug!(subscription = %sub.id, event = %event_id(event), "event delivered");
        }
        Ok(())
    }
    .await;
    if let Err(error) = outcome {
        let failures = failures.saturating_add(1);
        let next = unix_now() as Timestamp + backoff(failures).as_secs() as Timestamp;
        tracing::warn!(
            subscription = %sub.id, url = %sub.url, attempts = failures, %error,
            "event delivery failed; will retry"
        );
        if let Err(e) = store.defer_events(&sub.id, failures, next, &error).await {
            tracing::warn!(error = %e, "recording the failed delivery failed");
        }
    }
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventType, exp: Option<i64>) -> OutboxEvent {
        OutboxEvent {
            seq: 7,
            subscription_id: "s".into(),
            event_type: kind,
            vault_id: "vault-1".into(),
            vault_name: "dev".into(),
            secret_name: "Db-Password".into(),
            version: "abc123".into(),
            version_seq: 42,
            nbf: None,
            exp,
            time: 1_700_000_000,
        }
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let secs: Vec<u64> = (1..=12).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn signature_covers_timestamp_and_body() {
        let sig = signature(b"key", 1_700_000_000, b"{\"a\":1}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64, "{sig}");
        // Independent check with ring's one-shot API over the documented input.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"key");
        let expected = ring::hmac::sign(&key, b"1700000000.{\"a\":1}");
        assert_eq!(sig, format!("sha256={}", hex(expected.as_ref())));
        assert_ne!(sig, signature(b"key", 1_700_000_001, b"{\"a\":1}"));
        assert_ne!(sig, signature(b"other", 1_700_000_000, b"{\"a\":1}"));
    }

    #[test]
    fn cloud_event_has_event_grid_fields_and_a_stable_id() {
        let e = event(EventType::SecretNewVersionCreated, Some(1_800_000_000));
        let v = cloud_event(&e, "https://dev.localhost:8443");
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "Microsoft.KeyVault.SecretNewVersionCreated");
        assert_eq!(v["source"], "https://dev.localhost:8443");
        assert_eq!(v["subject"], "Db-Password");
        assert_eq!(v["time"], "2023-11-14T22:13:20Z");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["data"]["Id"], "https://dev.localhost:8443/secrets/Db-Password/abc123");
        assert_eq!(v["data"]["ObjectType"], "Secret");
        assert_eq!(v["data"]["VaultName"], "dev");
        assert_eq!(v["data"]["EXP"], 1_800_000_000);
        assert!(v["data"]["NBF"].is_null());
        assert_eq!(v["data"].as_object().unwrap().len(), 7);
        let id = v["id"].as_str().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(id, event_id(&event(EventType::SecretNewVersionCreated, None)), "same event, same id");
        assert_ne!(id, event_id(&event(EventType::SecretNearExpiry, Some(1_800_000_000))));
        assert_ne!(
            event_id(&event(EventType::SecretNearExpiry, Some(1))),
            event_id(&event(EventType::SecretNearExpiry, Some(2))),
            "a new expiry is a new event"
        );
    }

    #[test]
    fn signing_secrets_are_fresh() {
        let a = new_signing_secret();
        let b = new_signing_secret();
        assert!(a.starts_with(SECRET_PREFIX) && a.len() == SECRET_PREFIX.len() + 43);
        assert_ne!(*a, *b);
    }
}
