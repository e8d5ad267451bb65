//! Coffer's admin API at the zone's root host: vault management and health. Same
//! authenticate → authorize → execute pipeline and the same error format as the data plane.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use coffer_core::authz::Principal;
use coffer_core::authz::{Action, Resource};
use coffer_core::model::RetentionPolicy;
use coffer_core::names::VaultName;
use coffer_store::VaultRecord;
use serde::{Deserialize, Serialize};

use super::{
    allow, authenticate, json_response, query_pairs, query_value, read_body, ApiError, AppState, AuditNote,
};
use crate::vaults::ServiceError;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateVault {
    name: String,
    retention_days: Option<i64>,
    purge_protection: Option<bool>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VaultOut {
    name: String,
    id: String,
    url: String,
    retention_days: i64,
    purge_protection: bool,
    recovery_level: &'static str,
    created: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    secrets: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deleted_secrets: Option<u64>,
}

fn vault_out(state: &AppState, v: &VaultRecord, counts: Option<(u64, u64)>) -> VaultOut {
    VaultOut {
        name: v.name.to_string(),
        id: v.id.clone(),
        url: AppState::vault_url(&state.zone, state.public_port, v.name.as_str()),
        retention_days: v.policy.retention_days,
        purge_protection: v.policy.purge_protection,
        recovery_level: v.policy.recovery_level(),
        created: v.created,
        secrets: counts.map(|c| c.0),
        deleted_secrets: counts.map(|c| c.1),
    }
}

fn vault_error(e: ServiceError, name: &str) -> ApiError {
    match e {
        ServiceError::NotFound => vault_not_found(name),
        ServiceError::NameExists => ApiError::conflict(format!("A vault named '{name}' already exists.")),
        ServiceError::PurgeProtected => ApiError::forbidden(format!(
            "The vault '{name}' has purge protection and still holds soft-deleted secrets; it can be deleted once \
             their retention period has passed."
        )),
        other => ApiError::from_service(other, name),
    }
}

fn vault_not_found(name: &str) -> ApiError {
    ApiError::not_found("VaultNotFound", format!("The vault '{name}' does not exist on this server."))
}

fn ok<T: Serialize>(status: StatusCode, body: &T) -> Result<Response, ApiError> {
    let text = serde_json::to_string(body).map_err(|e| ApiError::internal(&e.to_string()))?;
    Ok(json_response(status, text))
}

pub(super) async fn handle(state: &Arc<AppState>, req: Request, note: &mut AuditNote) -> Response {
    // The admin handlers authorize at many places (`allow`); each records what allowed it here,
    // and the audit record takes the last one.
    let (result, grant) = super::ADMIN_GRANT
        .scope(std::cell::RefCell::new(None), async {
            let result = handle_inner(state, req, note).await;
            (result, super::ADMIN_GRANT.with(|g| g.take()))
        })
        .await;
    if grant.is_some() {
        note.grant = grant;
    }
    match result {
        Ok(response) => response,
        Err(e) => {
            if note.denial.is_none() && matches!(e.status.as_u16(), 401 | 403) {
                note.deny(e.message.clone());
            }
            e.into_response()
        }
    }
}

/// Coffer's operation names for the admin API.
fn operation(segments: &[&str], method: &Method) -> &'static str {
    if let Some(op) = super::events::operation(segments, method) {
        return op;
    }
    let m = method.as_str();
    match (segments, m) {
        (["admin", "vaults"], "GET") => "VaultList",
        (["admin", "vaults"], "POST") => "VaultCreate",
        (["admin", "vaults", _], "GET") => "VaultGet",
        (["admin", "vaults", _], "DELETE") => "VaultDelete",
        (["admin", "principals"], "GET") => "PrincipalList",
        (["admin", "principals"], "POST") => "PrincipalCreate",
        (["admin", "principals", _], "GET") => "PrincipalGet",
        (["admin", "principals", _], "PATCH") => "PrincipalUpdate",
        (["admin", "principals", _], "DELETE") => "PrincipalDelete",
        (["admin", "principals", _, "secrets"], _) => "ClientSecretCreate",
        (["admin", "principals", _, "members", ..], "POST") => "GroupMemberAdd",
        (["admin", "principals", _, "members", ..], _) => "GroupMemberRemove",
        (["admin", "agents"], _) => "AgentCreate",
        (["admin", "bindings"], "GET") => "BindingList",
        (["admin", "bindings"], "POST") => "BindingCreate",
        (["admin", "bindings", _], _) => "BindingDelete",
        (["admin", "federated-credentials"], "GET") => "FederatedCredentialList",
        (["admin", "federated-credentials"], "POST") => "FederatedCredentialCreate",
        (["admin", "federated-credentials", _], _) => "FederatedCredentialDelete",
        (["admin", "role-definitions"], "GET") => "RoleDefinitionList",
        (["admin", "role-definitions"], "POST") => "RoleDefinitionCreate",
        (["admin", "role-definitions", _], _) => "RoleDefinitionDelete",
        (["admin", "role-assignments"], "GET") => "RoleAssignmentList",
        (["admin", "role-assignments"], "POST") => "RoleAssignmentCreate",
        (["admin", "role-assignments", _], _) => "RoleAssignmentDelete",
        (["admin", "signing-keys", "rotate"], _) => "SigningKeyRotate",
        (["admin", "audit"], _) => "AuditQuery",
        (["admin", "audit", "public-key"], _) => "AuditPublicKey",
        _ => "AdminUnknownOperation",
    }
}

async fn handle_inner(
    state: &Arc<AppState>,
    req: Request,
    note: &mut AuditNote,
) -> Result<Response, ApiError> {
    if req.uri().path() == "/healthz" {
        note.operation = "HealthCheck";
        return ok(StatusCode::OK, &serde_json::json!({ "status": "ok" }));
    }
    if req.uri().path() == "/readyz" {
        note.operation = "ReadinessCheck";
        let r = crate::health::readiness(state).await;
        let status = if r.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        return ok(status, &r.body);
    }
    if req.uri().path() == "/metrics" {
        // Audit readers only: the audit disk's headroom tells a flooding client how close it is
        // to making the fail-closed audit refuse everyone. Prometheus authenticates with the
        // client-credentials grant (its `oauth2` scrape setting) against the token service.
        note.operation = "MetricsRead";
        let principal = authenticate(state, req.headers(), note).await?;
        allow(state, &principal, Action::AuditRead, Resource::Server)?;
        if req.method() != Method::GET {
            return Err(ApiError::method_not_allowed());
        }
        let mut response = crate::health::metrics_text(state).await.into_response();
        response.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return Ok(response);
    }
    {
        let path = req.uri().path().trim_end_matches('/');
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        note.operation = operation(&segments, req.method());
        if let (["admin", "vaults", name, ..], true) = (segments.as_slice(), segments.len() >= 3) {
            note.vault = Some(name.to_ascii_lowercase());
        }
    }
    let principal = authenticate(state, req.headers(), note).await?;
    let pairs = query_pairs(&req);
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().trim_end_matches('/');
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if segments.get(1) == Some(&"audit") {
        return audit_api(state, &principal, &segments, &pairs).await;
    }
    if super::events::owns(&segments) {
        return super::events::handle(state, &principal, &parts.method, &segments, &pairs, body, note).await;
    }
    if segments.get(1).is_some_and(|s| *s != "vaults") {
        let handled = super::directory::handle(state, &principal, &parts.method, &segments, body).await;
        return handled.unwrap_or_else(|| {
            Err(ApiError::not_found("NotFound", "The requested path does not exist in the admin API."))
        });
    }
    match (segments.as_slice(), &parts.method) {
        (["admin", "vaults"], &Method::GET) => {
            allow(state, &principal, Action::VaultRead, Resource::Server)?;
            let value: Vec<_> = state.vaults.vaults().iter().map(|v| vault_out(state, v, None)).collect();
            ok(StatusCode::OK, &serde_json::json!({ "value": value }))
        }
        (["admin", "vaults"], &Method::POST) => {
            allow(state, &principal, Action::VaultWrite, Resource::Server)?;
            let body = read_body(body, 64 * 1024).await?;
            let req: CreateVault = serde_json::from_slice(&body)
                .map_err(|e| ApiError::bad_parameter(format!("The request body is not valid: {e}")))?;
            let name = VaultName::parse(&req.name).map_err(|e| ApiError::bad_parameter(e.to_string()))?;
            let policy = RetentionPolicy::new(
                req.retention_days.unwrap_or(RetentionPolicy::DEFAULT_DAYS),
                req.purge_protection.unwrap_or(false),
            )
            .map_err(|e| ApiError::bad_parameter(e.to_string()))?;
            let record =
                state.vaults.create_vault(name, policy).await.map_err(|e| vault_error(e, &req.name))?;
            tracing::info!(vault = %record.name, "vault created");
            ok(StatusCode::CREATED, &vault_out(state, &record, Some((0, 0))))
        }
        (["admin", "vaults", name], &Method::GET) => {
            allow(state, &principal, Action::VaultRead, Resource::Vault(name))?;
            let vault =
                state.vaults.vault(&name.to_ascii_lowercase()).ok_or_else(|| vault_not_found(name))?;
            let counts = state.vaults.vault_counts(&vault).await.map_err(|e| vault_error(e, name))?;
            ok(StatusCode::OK, &vault_out(state, &vault.record, Some(counts)))
        }
        (["admin", "vaults", name], &Method::DELETE) => {
            allow(state, &principal, Action::VaultDelete, Resource::Vault(name))?;
            let force = query_value(&pairs, "force") == Some("true");
            state
                .vaults
                .delete_vault(&name.to_ascii_lowercase(), force)
                .await
                .map_err(|e| vault_error(e, name))?;
            tracing::info!(vault = %name, force, "vault deleted");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (["admin", "vaults"] | ["admin", "vaults", _], _) => Err(ApiError::method_not_allowed()),
        _ => Err(ApiError::not_found("NotFound", "The requested path does not exist in the admin API.")),
    }
}

fn parse_time(text: &str) -> Result<std::time::SystemTime, ApiError> {
    let secs = text.parse::<i64>().ok().or_else(|| {
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .ok()
            .map(|t| t.unix_timestamp())
    });
    let secs = secs.ok_or_else(|| {
        ApiError::bad_parameter(format!("'{text}' is not Unix seconds or an RFC 3339 time."))
    })?;
    Ok(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64))
}

/// `GET /admin/audit?…` (query the audit index) and `GET /admin/audit/public-key`.
async fn audit_api(
    state: &Arc<AppState>,
    principal: &Principal,
    segments: &[&str],
    pairs: &[(String, String)],
) -> Result<Response, ApiError> {
    allow(state, principal, Action::AuditRead, Resource::Server)?;
    let audit = state.audit.as_ref().ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "AuditDisabled", "Auditing is switched off on this server.")
    })?;
    match segments {
        ["admin", "audit", "public-key"] => ok(
            StatusCode::OK,
            &serde_json::json!({ "publicKey": audit.public_key_pem(), "keyId": audit.key_id() }),
        ),
        ["admin", "audit"] => {
            let get = |k: &str| query_value(pairs, k).filter(|v| !v.is_empty());
            let number = |k: &str| -> Result<Option<u64>, ApiError> {
                get(k)
                    .map(|v| v.parse::<u64>())
                    .transpose()
                    .map_err(|_| ApiError::bad_parameter(format!("{k} is a number")))
            };
            let q = coffer_audit::AuditQuery {
                since: get("since").map(parse_time).transpose()?,
                until: get("until").map(parse_time).transpose()?,
                principal: get("principal").map(str::to_owned),
                secret: get("secret").map(str::to_owned),
                vault: get("vault").map(str::to_owned),
                operation: get("operation").map(str::to_owned),
                result: get("result").map(str::parse).transpose().map_err(ApiError::bad_parameter)?,
                limit: number("limit")?.map_or(100, |l| l as usize),
                after: number("after")?,
            };
            let page = audit.query(q).await.map_err(|e| ApiError::internal(&e.to_string()))?;
            ok(StatusCode::OK, &serde_json::json!({ "value": page.records, "next": page.next }))
        }
        _ => Err(ApiError::not_found("NotFound", "The requested path does not exist in the admin API.")),
    }
}
