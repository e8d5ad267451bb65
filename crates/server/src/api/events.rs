//! Admin API for events and rotation (at the zone's root host):
//!
//! * `/admin/event-subscriptions` (GET `?vault=`, POST), `/admin/event-subscriptions/{id}`
//!   (GET, DELETE): webhook subscriptions. The signing secret is in the POST's answer only.
//!   Creating and deleting need `vaults/write` on the vault, reading `vaults/read`.
//! * `/admin/vaults/{vault}/rotation-policies` (GET) and `…/rotation-policies/{name}` (GET,
//!   PUT, DELETE): a secret's rotation policy. Reading needs `readMetadata` on the secret,
//!   changing it `setSecret` (a policy writes new versions).
//! * `POST /admin/vaults/{vault}/secrets/{name}/rotate`: rotate now (`setSecret` on the secret).
//!   The answer names the new version; it never holds the value.

use axum::body::Body;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use coffer_core::authz::{Action, Principal, Resource};
use coffer_core::names::SecretName;
use coffer_store::{EventType, RotationPolicy, Store, StoreError, Subscription, SubscriptionState};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{allow, ok_value as ok, query_value, read_body, ApiError, AppState, AuditNote};
use crate::events::DEFAULT_NEAR_EXPIRY_SECS;
use crate::rotation::{self, Generator, RotateError};
use crate::tokens::unix_now;
use crate::vaults::Vault;

/// Longest near-expiry window and policy interval accepted: ten years.
const MAX_SECS: i64 = 10 * 366 * 86_400;

/// True for the paths this module serves.
pub(super) fn owns(segments: &[&str]) -> bool {
    matches!(
        segments,
        ["admin", "event-subscriptions", ..]
            | ["admin", "vaults", _, "rotation-policies", ..]
            | ["admin", "vaults", _, "secrets", _, "rotate"]
    )
}

/// Audit operation names for these paths.
pub(super) fn operation(segments: &[&str], method: &Method) -> Option<&'static str> {
    Some(match (segments, method.as_str()) {
        (["admin", "event-subscriptions"], "POST") => "EventSubscriptionCreate",
        (["admin", "event-subscriptions"], _) => "EventSubscriptionList",
        (["admin", "event-subscriptions", _], "DELETE") => "EventSubscriptionDelete",
        (["admin", "event-subscriptions", ..], _) => "EventSubscriptionGet",
        (["admin", "vaults", _, "rotation-policies"], _) => "RotationPolicyList",
        (["admin", "vaults", _, "rotation-policies", _], "PUT") => "RotationPolicySet",
        (["admin", "vaults", _, "rotation-policies", _], "DELETE") => "RotationPolicyDelete",
        (["admin", "vaults", _, "rotation-policies", ..], _) => "RotationPolicyGet",
        (["admin", "vaults", _, "secrets", _, "rotate"], _) => "SecretRotate",
        _ => return None,
    })
}

fn store_error(e: StoreError) -> ApiError {
    ApiError::internal(&e.to_string())
}

async fn parse<T: for<'de> Deserialize<'de>>(body: Body) -> Result<T, ApiError> {
    let bytes = read_body(body, 64 * 1024).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_parameter(format!(
            "The request body is not valid: line {} column {}: {e}",
            e.line(),
            e.column()
        ))
    })
}

fn vault_not_found(name: &str) -> ApiError {
    ApiError::not_found("VaultNotFound", format!("The vault '{name}' does not exist on this server."))
}

fn find_vault(state: &AppState, name: &str) -> Result<std::sync::Arc<Vault>, ApiError> {
    state.vaults.vault(&name.to_ascii_lowercase()).ok_or_else(|| vault_not_found(name))
}

fn secret_name(name: &str) -> Result<SecretName, ApiError> {
    SecretName::parse(name).map_err(|e| ApiError::bad_parameter(e.to_string()))
}

/// Handles the paths [`owns`] claims.
pub(super) async fn handle(
    state: &AppState,
    caller: &Principal,
    method: &Method,
    segments: &[&str],
    pairs: &[(String, String)],
    body: Body,
    note: &mut AuditNote,
) -> Result<Response, ApiError> {
    match (segments, method) {
        (["admin", "event-subscriptions"], &Method::GET) => {
            list_subscriptions(state, caller, query_value(pairs, "vault").filter(|v| !v.is_empty())).await
        }
        (["admin", "event-subscriptions"], &Method::POST) => create_subscription(state, caller, body).await,
        (["admin", "event-subscriptions", id], &Method::GET) => {
            let sub = find_subscription(state, id).await?;
            allow(state, caller, Action::VaultRead, Resource::Vault(&sub.vault_name))?;
            let all = state.store.subscriptions(Some(&sub.vault_id)).await.map_err(store_error)?;
            let found =
                all.iter().find(|s| s.subscription.id == sub.id).ok_or_else(|| subscription_not_found(id))?;
            ok(StatusCode::OK, state_json(state, found))
        }
        (["admin", "event-subscriptions", id], &Method::DELETE) => {
            let sub = find_subscription(state, id).await?;
            note.vault = Some(sub.vault_name.clone());
            allow(state, caller, Action::VaultWrite, Resource::Vault(&sub.vault_name))?;
            if !state.store.delete_subscription(&sub.id).await.map_err(store_error)? {
                return Err(subscription_not_found(id));
            }
            tracing::info!(subscription = %sub.id, vault = %sub.vault_name, "event subscription deleted");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (["admin", "vaults", vault, "rotation-policies"], &Method::GET) => {
            allow(state, caller, Action::VaultRead, Resource::Vault(vault))?;
            let v = find_vault(state, vault)?;
            let all = state.store.rotation_policies(&v.record.id).await.map_err(store_error)?;
            ok(StatusCode::OK, json!({ "value": all.iter().map(|p| policy_json(&v, p)).collect::<Vec<_>>() }))
        }
        (["admin", "vaults", vault, "rotation-policies", name], m) => {
            note.secret = Some(name.to_string());
            match *m {
                Method::GET => {
                    allow(state, caller, Action::SecretReadMetadata, Resource::Secret(vault, name))?;
                    let v = find_vault(state, vault)?;
                    let policy = state
                        .store
                        .rotation_policy(&v.record.id, &secret_name(name)?.key())
                        .await
                        .map_err(store_error)?
                        .ok_or_else(|| policy_not_found(name))?;
                    ok(StatusCode::OK, policy_json(&v, &policy))
                }
                Method::PUT => put_policy(state, caller, vault, name, body).await,
                Method::DELETE => {
                    allow(state, caller, Action::SecretSet, Resource::Secret(vault, name))?;
                    let v = find_vault(state, vault)?;
                    if !state
                        .store
                        .delete_rotation_policy(&v.record.id, &secret_name(name)?.key())
                        .await
                        .map_err(store_error)?
                    {
                        return Err(policy_not_found(name));
                    }
                    tracing::info!(vault = %vault, secret = %name, "rotation policy removed");
                    Ok(StatusCode::NO_CONTENT.into_response())
                }
                _ => Err(ApiError::method_not_allowed()),
            }
        }
        (["admin", "vaults", vault, "secrets", name, "rotate"], &Method::POST) => {
            note.secret = Some(name.to_string());
            allow(state, caller, Action::SecretSet, Resource::Secret(vault, name))?;
            let v = find_vault(state, vault)?;
            let rotated = rotation::rotate_now(state, &v, &secret_name(name)?)
                .await
                .map_err(|e| rotate_error(e, name))?;
            note.version = Some(rotated.props.version.clone());
            let url = AppState::vault_url(&state.zone, state.public_port, v.record.name.as_str());
            let a = &rotated.props.attributes;
            ok(
                StatusCode::OK,
                json!({
                    "id": format!("{url}/secrets/{}/{}", rotated.name, rotated.props.version),
                    "name": rotated.name,
                    "version": rotated.props.version,
                    "generator": rotated.generator,
                    "attributes": {
                        "enabled": a.enabled, "nbf": a.not_before, "exp": a.expires,
                        "created": a.created, "updated": a.updated,
                    },
                }),
            )
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn rotate_error(e: RotateError, name: &str) -> ApiError {
    match e {
        RotateError::NotifyOnly => ApiError::conflict(format!(
            "The secret '{name}' has a notify-only rotation policy: an outside system rotates it. \
             Set a new value with `coffer secret set`, or change the policy."
        )),
        RotateError::Invalid(msg) => ApiError::bad_parameter(msg),
        RotateError::Service(e) => ApiError::from_service(e, name),
    }
}

fn subscription_not_found(id: &str) -> ApiError {
    ApiError::not_found("NotFound", format!("No event subscription has the id '{id}'."))
}

fn policy_not_found(name: &str) -> ApiError {
    ApiError::not_found("NotFound", format!("The secret '{name}' has no rotation policy."))
}

async fn find_subscription(state: &AppState, id: &str) -> Result<Subscription, ApiError> {
    state.store.subscription(id).await.map_err(store_error)?.ok_or_else(|| subscription_not_found(id))
}

fn subscription_json(sub: &Subscription) -> Value {
    let types: Vec<&str> = if sub.types.is_empty() {
        EventType::ALL.iter().map(EventType::cloud_type).collect()
    } else {
        sub.types.iter().map(EventType::cloud_type).collect()
    };
    json!({
        "id": sub.id, "vault": sub.vault_name, "url": sub.url, "types": types, "secret": sub.secret,
        "nearExpirySecs": sub.near_expiry_secs, "created": sub.created,
    })
}

fn state_json(_state: &AppState, s: &SubscriptionState) -> Value {
    let mut out = subscription_json(&s.subscription);
    out["pending"] = json!(s.pending);
    out["delivered"] = json!(s.delivered);
    out["failedAttempts"] = json!(s.attempts);
    out["nextAttempt"] = json!(if s.attempts > 0 { Some(s.next_attempt) } else { None });
    out["lastError"] = json!(s.last_error);
    out
}

async fn list_subscriptions(
    state: &AppState,
    caller: &Principal,
    vault: Option<&str>,
) -> Result<Response, ApiError> {
    let vault_id = match vault {
        Some(name) => {
            allow(state, caller, Action::VaultRead, Resource::Vault(name))?;
            Some(find_vault(state, name)?.record.id.clone())
        }
        None => None,
    };
    let all = state.store.subscriptions(vault_id.as_deref()).await.map_err(store_error)?;
    let snapshot = state.directory.snapshot();
    // Without a vault named, the caller sees the subscriptions of the vaults it may read.
    let value: Vec<Value> = all
        .iter()
        .filter(|s| {
            snapshot
                .rbac
                .authorize(caller, Action::VaultRead, Resource::Vault(&s.subscription.vault_name))
                .is_ok()
        })
        .map(|s| state_json(state, s))
        .collect();
    ok(StatusCode::OK, json!({ "value": value }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateSubscription {
    vault: String,
    url: String,
    #[serde(default)]
    types: Vec<String>,
    secret: Option<String>,
    near_expiry_secs: Option<i64>,
}

async fn create_subscription(state: &AppState, caller: &Principal, body: Body) -> Result<Response, ApiError> {
    let req: CreateSubscription = parse(body).await?;
    allow(state, caller, Action::VaultWrite, Resource::Vault(&req.vault))?;
    let vault = find_vault(state, &req.vault)?;
    let url = reqwest::Url::parse(&req.url)
        .map_err(|e| ApiError::bad_parameter(format!("The webhook URL is not valid: {e}.")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ApiError::bad_parameter("The webhook URL must be an http:// or https:// URL."));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ApiError::bad_parameter(
            "The webhook URL must not hold credentials; receivers verify the signature instead.",
        ));
    }
    state
        .outbound
        .check_url_now(&url)
        .await
        .map_err(|e| ApiError::bad_parameter(format!("The webhook URL is refused: {e}.")))?;
    let types = req
        .types
        .iter()
        .map(|t| {
            EventType::parse(t).ok_or_else(|| {
                ApiError::bad_parameter(format!(
                    "Unknown event type '{t}': use SecretNewVersionCreated, SecretNearExpiry or \
                     SecretExpired."
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let secret = req.secret.as_deref().map(secret_name).transpose()?.map(|n| n.as_str().to_owned());
    let window = req.near_expiry_secs.unwrap_or(DEFAULT_NEAR_EXPIRY_SECS);
    if !(0..=MAX_SECS).contains(&window) {
        return Err(ApiError::bad_parameter("nearExpirySecs must be between 0 and ten years."));
    }
    let sub = Subscription {
        id: uuid::Uuid::new_v4().to_string(),
        vault_id: vault.record.id.clone(),
        vault_name: vault.record.name.to_string(),
        url: url.to_string(),
        types,
        secret,
        near_expiry_secs: window,
        created: unix_now() as i64,
    };
    let store: &dyn Store = state.store.as_ref();
    let (sub, signing_secret) =
        crate::events::subscribe(store, &state.keyring, sub).await.map_err(|e| match e {
            StoreError::NotFound => vault_not_found(&req.vault),
            other => store_error(other),
        })?;
    tracing::info!(
        subscription = %sub.id, vault = %sub.vault_name, url = %sub.url,
        "event subscription created"
    );
    let mut out = subscription_json(&sub);
    out["signingSecret"] = json!(signing_secret.as_str());
    ok(StatusCode::CREATED, out)
}

fn policy_json(vault: &Vault, p: &RotationPolicy) -> Value {
    json!({
        "vault": vault.record.name.as_str(), "name": p.secret_name, "everySecs": p.every_secs,
        "beforeExpirySecs": p.before_expiry_secs, "generator": p.generator,
        "expiresAfterSecs": p.expires_after_secs,
        "notifyOnly": p.notify_only, "nextDue": p.next_due, "lastRotated": p.last_rotated,
        "created": p.created, "updated": p.updated,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PutPolicy {
    every_secs: Option<i64>,
    before_expiry_secs: Option<i64>,
    generator: Option<String>,
    expires_after_secs: Option<i64>,
    #[serde(default)]
    notify_only: bool,
}

async fn put_policy(
    state: &AppState,
    caller: &Principal,
    vault: &str,
    name: &str,
    body: Body,
) -> Result<Response, ApiError> {
    allow(state, caller, Action::SecretSet, Resource::Secret(vault, name))?;
    let req: PutPolicy = parse(body).await?;
    let v = find_vault(state, vault)?;
    let name = secret_name(name)?;
    for (field, value) in [
        ("everySecs", req.every_secs),
        ("beforeExpirySecs", req.before_expiry_secs),
        ("expiresAfterSecs", req.expires_after_secs),
    ] {
        if value.is_some_and(|s| !(1..=MAX_SECS).contains(&s)) {
            return Err(ApiError::bad_parameter(format!("{field} must be between 1 second and ten years.")));
        }
    }
    let generator = if req.notify_only {
        if req.generator.is_some() || req.expires_after_secs.is_some() {
            return Err(ApiError::bad_parameter(
                "A notify-only policy never generates a value: it takes no generator and no \
                 expiresAfterSecs.",
            ));
        }
        None
    } else {
        let spec = req.generator.as_deref().unwrap_or(rotation::DEFAULT_GENERATOR);
        Some(Generator::parse(spec).map_err(ApiError::bad_parameter)?.spec())
    };
    let store: &dyn Store = state.store.as_ref();
    let current = store
        .version(&v.record.id, &name.key(), None)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::from_service(crate::vaults::ServiceError::NotFound, name.as_str()))?;
    let now = unix_now() as i64;
    let existing = store.rotation_policy(&v.record.id, &name.key()).await.map_err(store_error)?;
    let mut policy = RotationPolicy {
        vault_id: v.record.id.clone(),
        secret_name: current.name.clone(),
        every_secs: req.every_secs,
        before_expiry_secs: req.before_expiry_secs,
        generator,
        expires_after_secs: req.expires_after_secs,
        notify_only: req.notify_only,
        next_due: None,
        last_rotated: existing.as_ref().and_then(|p| p.last_rotated),
        created: existing.as_ref().map_or(now, |p| p.created),
        updated: now,
    };
    policy.next_due =
        rotation::next_due(&policy, current.props.attributes.created, current.props.attributes.expires);
    store.put_rotation_policy(&policy).await.map_err(store_error)?;
    tracing::info!(
        vault = %vault, secret = %current.name, next_due = ?policy.next_due,
        "rotation policy set"
    );
    ok(StatusCode::OK, policy_json(&v, &policy))
}
