//! Admin API for the identity directory and access control (at the zone's root host):
//!
//! * `/admin/principals` (managed identities, service principals, users, groups, agents),
//!   `/admin/principals/{p}` (GET, PATCH `enabled`, DELETE), `/admin/principals/{p}/secrets`,
//!   `/admin/principals/{group}/members[/{member}]`;
//! * `/admin/agents` (POST: create an agent and a one-time join token);
//! * `/admin/bindings`, `/admin/federated-credentials`;
//! * `/admin/role-definitions`, `/admin/role-assignments`;
//! * `/admin/signing-keys/rotate`.
//!
//! Principals are named by object id, client id or name wherever they appear.

use axum::body::Body;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use coffer_core::authz::{Action, Principal, PrincipalKind, Resource, RoleAssignment, RoleDefinition, Scope};
use coffer_core::identity::{Binding, CredentialKind, FederatedCredential, DEFAULT_FEDERATION_AUDIENCE};
use coffer_store::StoreError;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{allow, forbidden_by_rbac, ok_value as ok, read_body, record_grant, ApiError, AppState};
use crate::directory::Snapshot;
use crate::tokens::unix_now;

/// Join tokens are short-lived: an hour to run `coffer agent join` on the new host.
const JOIN_TOKEN_SECS: i64 = 3600;

fn store_error(e: StoreError, what: &str) -> ApiError {
    match e {
        StoreError::NameExists => ApiError::conflict(format!("{what} already exists or is in use.")),
        StoreError::NotFound => ApiError::not_found("NotFound", format!("{what} was not found.")),
        other => ApiError::internal(&other.to_string()),
    }
}

async fn parse<T: for<'de> Deserialize<'de>>(body: Body) -> Result<T, ApiError> {
    let bytes = read_body(body, 256 * 1024).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_parameter(format!("The request body is not valid: {e}")))
}

fn find<'a>(snapshot: &'a Snapshot, name_or_id: &str) -> Result<&'a Principal, ApiError> {
    snapshot.resolve(name_or_id).ok_or_else(|| {
        ApiError::not_found("PrincipalNotFound", format!("No principal is named '{name_or_id}'."))
    })
}

/// The authorization of every change to a principal's credentials, federation, memberships,
/// bindings, enabled state or existence: the caller must already hold everything `target`
/// confers (for an agent, also every identity bound to it, whose tokens it can get), so that
/// managing principals is never a way to become a more privileged one.
fn allow_principal_change(caller: &Principal, snapshot: &Snapshot, target: &str) -> Result<(), ApiError> {
    let mut conferring = vec![target];
    conferring
        .extend(snapshot.bindings.iter().filter(|b| b.agent_id == target).map(|b| b.identity_id.as_str()));
    let grant = snapshot.rbac.authorize_principal_change(caller, &conferring).map_err(forbidden_by_rbac)?;
    record_grant(&grant);
    Ok(())
}

fn principal_json(p: &Principal) -> Value {
    json!({
        "objectId": p.object_id, "clientId": p.client_id, "name": p.display_name,
        "type": p.kind.as_str(), "enabled": p.enabled,
    })
}

fn role_json(r: &RoleDefinition) -> Value {
    json!({
        "id": r.id, "roleName": r.name, "description": r.description, "type": if r.builtin { "BuiltInRole" } else { "CustomRole" },
        "permissions": [{ "actions": r.actions, "dataActions": r.data_actions }],
        "assignableRoles": r.assignable_roles,
    })
}

fn assignment_json(snapshot: &Snapshot, a: &RoleAssignment) -> Value {
    json!({
        "id": a.id, "principalId": a.principal_id,
        "principalName": snapshot.principal(&a.principal_id).map(|p| p.display_name.as_str()),
        "roleDefinitionId": a.role_id,
        "roleName": snapshot.rbac.role(&a.role_id).map(|r| r.name.as_str()),
        "scope": a.scope.to_string(),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreatePrincipal {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    password: Option<zeroize::Zeroizing<String>>,
    /// PEM certificate whose key may sign client assertions (service principals).
    certificate: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PatchPrincipal {
    enabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateBinding {
    identity: String,
    agent: String,
    uid: Option<u32>,
    exe: Option<String>,
    unit: Option<String>,
    cgroup_prefix: Option<String>,
    #[serde(default)]
    allow_namespaced: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateFederated {
    principal: String,
    issuer: String,
    subject: String,
    audience: Option<String>,
    jwks_url: Option<String>,
    jwks: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateAssignment {
    principal: String,
    role: String,
    scope: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateRole {
    role_name: String,
    description: Option<String>,
    #[serde(default)]
    actions: Vec<String>,
    #[serde(default)]
    data_actions: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AddMember {
    member: String,
}

/// Handles `/admin/{principals,agents,bindings,federated-credentials,role-definitions,
/// role-assignments,signing-keys}…`; `None` when the path is not one of these.
pub(super) async fn handle(
    state: &AppState,
    caller: &Principal,
    method: &Method,
    segments: &[&str],
    body: Body,
) -> Option<Result<Response, ApiError>> {
    let result = match (segments, method) {
        (["admin", "principals"], &Method::GET) => list_principals(state, caller),
        (["admin", "principals"], &Method::POST) => create_principal(state, caller, body).await,
        (["admin", "principals", p], &Method::GET) => {
            allow(state, caller, Action::PrincipalRead, Resource::Server).and_then(|_| {
                let snapshot = state.directory.snapshot();
                let principal = find(&snapshot, p)?;
                let mut out = principal_json(principal);
                out["memberOf"] = json!(snapshot
                    .memberships
                    .iter()
                    .filter(|(_, m)| *m == principal.object_id)
                    .filter_map(|(g, _)| snapshot.principal(g).map(|g| g.display_name.clone()))
                    .collect::<Vec<_>>());
                ok(StatusCode::OK, out)
            })
        }
        (["admin", "principals", p], &Method::PATCH) => patch_principal(state, caller, p, body).await,
        (["admin", "principals", p], &Method::DELETE) => delete_principal(state, caller, p).await,
        (["admin", "principals", p, "secrets"], &Method::POST) => new_client_secret(state, caller, p).await,
        (["admin", "principals", g, "members"], &Method::POST) => add_member(state, caller, g, body).await,
        (["admin", "principals", g, "members", m], &Method::DELETE) => {
            remove_member(state, caller, g, m).await
        }
        (["admin", "agents"], &Method::POST) => create_agent(state, caller, body).await,
        (["admin", "bindings"], &Method::GET) => {
            allow(state, caller, Action::PrincipalRead, Resource::Server)
                .and_then(|_| ok(StatusCode::OK, json!({ "value": state.directory.snapshot().bindings })))
        }
        (["admin", "bindings"], &Method::POST) => create_binding(state, caller, body).await,
        (["admin", "bindings", id], &Method::DELETE) => delete_binding(state, caller, id).await,
        (["admin", "federated-credentials"], &Method::GET) => {
            allow(state, caller, Action::PrincipalRead, Resource::Server)
                .and_then(|_| ok(StatusCode::OK, json!({ "value": state.directory.snapshot().federated })))
        }
        (["admin", "federated-credentials"], &Method::POST) => create_federated(state, caller, body).await,
        (["admin", "federated-credentials", id], &Method::DELETE) => {
            delete_federated(state, caller, id).await
        }
        (["admin", "role-definitions"], &Method::GET) => {
            allow(state, caller, Action::RoleDefinitionRead, Resource::Server).and_then(|_| {
                let snapshot = state.directory.snapshot();
                let mut roles: Vec<&RoleDefinition> = snapshot.rbac.roles().collect();
                roles.sort_by(|a, b| a.name.cmp(&b.name));
                ok(StatusCode::OK, json!({ "value": roles.into_iter().map(role_json).collect::<Vec<_>>() }))
            })
        }
        (["admin", "role-definitions"], &Method::POST) => create_role(state, caller, body).await,
        (["admin", "role-definitions", id], &Method::DELETE) => delete_role(state, caller, id).await,
        (["admin", "role-assignments"], &Method::GET) => {
            allow(state, caller, Action::RoleAssignmentRead, Resource::Server).and_then(|_| {
                let snapshot = state.directory.snapshot();
                let value: Vec<Value> =
                    snapshot.assignments.iter().map(|a| assignment_json(&snapshot, a)).collect();
                ok(StatusCode::OK, json!({ "value": value }))
            })
        }
        (["admin", "role-assignments"], &Method::POST) => create_assignment(state, caller, body).await,
        (["admin", "role-assignments", id], &Method::DELETE) => delete_assignment(state, caller, id).await,
        (["admin", "signing-keys", "rotate"], &Method::POST) => rotate_signing_key(state, caller).await,
        (
            ["admin", "principals"
            | "agents"
            | "bindings"
            | "federated-credentials"
            | "role-definitions"
            | "role-assignments"
            | "signing-keys", ..],
            _,
        ) => Err(ApiError::method_not_allowed()),
        _ => return None,
    };
    Some(result)
}

fn list_principals(state: &AppState, caller: &Principal) -> Result<Response, ApiError> {
    allow(state, caller, Action::PrincipalRead, Resource::Server)?;
    let snapshot = state.directory.snapshot();
    let mut all: Vec<&Principal> = snapshot.principals().collect();
    all.sort_by(|a, b| a.display_name.cmp(&b.display_name));
    ok(StatusCode::OK, json!({ "value": all.into_iter().map(principal_json).collect::<Vec<_>>() }))
}

fn valid_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=128).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
        && uuid::Uuid::parse_str(name).is_err();
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_parameter(
            "A principal name is 1-128 characters of letters, digits, '-', '_', '.', '@', and not a UUID.",
        ))
    }
}

async fn create_principal(state: &AppState, caller: &Principal, body: Body) -> Result<Response, ApiError> {
    allow(state, caller, Action::PrincipalWrite, Resource::Server)?;
    let req: CreatePrincipal = parse(body).await?;
    valid_name(&req.name)?;
    let kind = match PrincipalKind::parse(&req.kind) {
        Some(
            k @ (PrincipalKind::ManagedIdentity
            | PrincipalKind::ServicePrincipal
            | PrincipalKind::User
            | PrincipalKind::Group),
        ) => k,
        _ => return Err(ApiError::bad_parameter(
            "type must be managed-identity, service-principal, user or group (agents: POST /admin/agents).",
        )),
    };
    if kind == PrincipalKind::User && req.password.as_ref().is_none_or(|p| p.len() < 12) {
        return Err(ApiError::bad_parameter("A user needs a password of at least 12 characters."));
    }
    if req.certificate.is_some() && kind != PrincipalKind::ServicePrincipal {
        return Err(ApiError::bad_parameter("Only service principals have certificates."));
    }
    if let Some(pem) = &req.certificate {
        crate::directory::certificate_key(pem)
            .map_err(|e| ApiError::bad_parameter(format!("The certificate: {e}")))?;
    }
    let principal = state
        .directory
        .create_principal(&req.name, kind)
        .await
        .map_err(|e| store_error(e, "The principal"))?;
    let mut out = principal_json(&principal);
    if let Some(pem) = &req.certificate {
        let id = state
            .directory
            .add_certificate(&principal.object_id, pem)
            .await
            .map_err(|e| ApiError::internal(&e))?;
        out["certificateId"] = json!(id);
    } else if kind == PrincipalKind::ServicePrincipal {
        let issued = state
            .directory
            .add_secret(&principal.object_id, CredentialKind::ClientSecret, None)
            .await
            .map_err(|e| store_error(e, "The secret"))?;
        out["clientSecret"] = json!(issued.secret.as_str());
    }
    if let Some(password) = &req.password {
        state
            .directory
            .set_password(&principal.object_id, password)
            .await
            .map_err(|e| store_error(e, "The password"))?;
    }
    tracing::info!(principal = %principal.display_name, kind = kind.as_str(), "principal created");
    ok(StatusCode::CREATED, out)
}

async fn patch_principal(
    state: &AppState,
    caller: &Principal,
    name: &str,
    body: Body,
) -> Result<Response, ApiError> {
    allow(state, caller, Action::PrincipalWrite, Resource::Server)?;
    let req: PatchPrincipal = parse(body).await?;
    let snapshot = state.directory.snapshot();
    let mut principal = find(&snapshot, name)?.clone();
    allow_principal_change(caller, &snapshot, &principal.object_id)?;
    if let Some(enabled) = req.enabled {
        principal.enabled = enabled;
    }
    state.directory.store().put_principal(&principal).await.map_err(|e| store_error(e, "The principal"))?;
    state.directory.reload().await.map_err(|e| store_error(e, "The directory"))?;
    tracing::info!(principal = %principal.display_name, enabled = principal.enabled, "principal updated");
    ok(StatusCode::OK, principal_json(&principal))
}

async fn delete_principal(state: &AppState, caller: &Principal, name: &str) -> Result<Response, ApiError> {
    allow(state, caller, Action::PrincipalWrite, Resource::Server)?;
    let snapshot = state.directory.snapshot();
    let principal = find(&snapshot, name)?.clone();
    allow_principal_change(caller, &snapshot, &principal.object_id)?;
    if principal.object_id == caller.object_id {
        return Err(ApiError::bad_parameter("A principal cannot delete itself."));
    }
    state
        .directory
        .store()
        .delete_principal(&principal.object_id)
        .await
        .map_err(|e| store_error(e, "The principal"))?;
    state.directory.reload().await.map_err(|e| store_error(e, "The directory"))?;
    tracing::info!(principal = %principal.display_name, "principal deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn new_client_secret(state: &AppState, caller: &Principal, name: &str) -> Result<Response, ApiError> {
    allow(state, caller, Action::PrincipalWrite, Resource::Server)?;
    let snapshot = state.directory.snapshot();
    let principal = find(&snapshot, name)?.clone();
    allow_principal_change(caller, &snapshot, &principal.object_id)?;
    if principal.kind != PrincipalKind::ServicePrincipal {
        return Err(ApiError::bad_parameter("Only service principals have client secrets."));
    }
    let issued = state
        .directory
        .add_secret(&principal.object_id, CredentialKind::ClientSecret, None)
        .await
        .map_err(|e| store_error(e, "The secret"))?;
    ok(
        StatusCode::CREATED,
        json!({ "clientId": principal.client_id, "clientSecret": issued.secret.as_str(), "id": issued.credential_id }),
    )
}

async fn add_member(
    state: &AppState,
    caller: &Principal,
    group: &str,
    body: Body,
) -> Result<Response, ApiError> {
    allow(state, caller, Action::PrincipalWrite, Resource::Server)?;
    let req: AddMember = parse(body).await?;
    let snapshot = state.directory.snapshot();
    let group = find(&snapshot, group)?;
    if group.kind != PrincipalKind::Group {
        return Err(ApiError::bad_parameter(format!("'{}' is not a group.", group.display_name)));
    }
    // The new member gets everything the group holds.
    allow_principal_change(caller, &snapshot, &group.object_id)?;
    let member = find(&snapshot, &req.member)?;
    if member.kind == PrincipalKind::Group {
        return Err(ApiError::bad_parameter("Groups do not nest."));
    }
    state
        .directory
        .store()
        .add_member(&group.object_id, &member.object_id)
        .await
        .map_err(|e| store_error(e, "The membership"))?;
    state.directory.reload().await.map_err(|e| store_error(e, "The directory"))?;
    ok(StatusCode::OK, json!({ "group": group.display_name, "member": member.display_name }))
}

async fn remove_member(
    state: &AppState,
    caller: &Principal,
    group: &str,
    member: &str,
) -> Result<Response, ApiError> {
    allow(state, caller, Action::PrincipalWrite, Resource::Server)?;
    let snapshot = state.directory.snapshot();
    let (group, member) = (find(&snapshot, group)?, find(&snapshot, member)?);
    allow_principal_change(caller, &snapshot, &group.object_id)?;
    let removed = state
        .directory
        .store()
        .remove_member(&group.object_id, &member.object_id)
        .await
        .map_err(|e| store_error(e, "The membership"))?;
    state.directory.reload().await.map_err(|e| store_error(e, "The directory"))?;
    if removed {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found("NotFound", "The membership was not found."))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAgent {
    name: String,
}

async fn create_agent(state: &AppState, caller: &Principal, body: Body) -> Result<Response, ApiError> {
    allow(state, caller, Action::PrincipalWrite, Resource::Server)?;
    let req: CreateAgent = parse(body).await?;
    valid_name(&req.name)?;
    let snapshot = state.directory.snapshot();
    let agent = match snapshot.resolve(&req.name) {
        Some(p) if p.kind == PrincipalKind::Agent => {
            // A new join token for an existing agent gets the tokens of its bound identities.
            allow_principal_change(caller, &snapshot, &p.object_id)?;
            p.clone()
        }
        Some(_) => {
            return Err(ApiError::conflict(format!("'{}' names a principal that is not an agent.", req.name)))
        }
        None => state
            .directory
            .create_principal(&req.name, PrincipalKind::Agent)
            .await
            .map_err(|e| store_error(e, "The agent"))?,
    };
    let expires = unix_now() as i64 + JOIN_TOKEN_SECS;
    let issued = state
        .directory
        .add_secret(&agent.object_id, CredentialKind::JoinToken, Some(expires))
        .await
        .map_err(|e| store_error(e, "The join token"))?;
    let mut out = principal_json(&agent);
    out["joinToken"] = json!(issued.secret.as_str());
    out["joinTokenExpires"] = json!(expires);
    ok(StatusCode::CREATED, out)
}

async fn create_binding(state: &AppState, caller: &Principal, body: Body) -> Result<Response, ApiError> {
    allow(state, caller, Action::PrincipalWrite, Resource::Server)?;
    let req: CreateBinding = parse(body).await?;
    let snapshot = state.directory.snapshot();
    let identity = find(&snapshot, &req.identity)?;
    if identity.kind != PrincipalKind::ManagedIdentity {
        return Err(ApiError::bad_parameter(format!(
            "'{}' is not a managed identity.",
            identity.display_name
        )));
    }
    // The agent's host gets the identity's tokens.
    allow_principal_change(caller, &snapshot, &identity.object_id)?;
    let agent = find(&snapshot, &req.agent)?;
    if agent.kind != PrincipalKind::Agent {
        return Err(ApiError::bad_parameter(format!("'{}' is not an agent.", agent.display_name)));
    }
    let binding = Binding {
        id: uuid::Uuid::new_v4().to_string(),
        identity_id: identity.object_id.clone(),
        agent_id: agent.object_id.clone(),
        uid: req.uid,
        exe: req.exe,
        unit: req.unit,
        cgroup_prefix: req.cgroup_prefix,
        allow_namespaced: req.allow_namespaced,
    };
    if !binding.has_selector() {
        return Err(ApiError::bad_parameter(
            "A binding needs at least one selector: uid, exe, unit or cgroup prefix.",
        ));
    }
    state.directory.store().add_binding(&binding).await.map_err(|e| store_error(e, "The binding"))?;
    state.directory.reload().await.map_err(|e| store_error(e, "The directory"))?;
    ok(StatusCode::CREATED, json!(binding))
}

async fn delete_binding(state: &AppState, caller: &Principal, id: &str) -> Result<Response, ApiError> {
    allow(state, caller, Action::PrincipalWrite, Resource::Server)?;
    let snapshot = state.directory.snapshot();
    let binding = snapshot
        .bindings
        .iter()
        .find(|b| b.id == id)
        .ok_or_else(|| ApiError::not_found("NotFound", "The binding was not found."))?;
    allow_principal_change(caller, &snapshot, &binding.identity_id)?;
    let removed =
        state.directory.store().delete_binding(id).await.map_err(|e| store_error(e, "The binding"))?;
    state.directory.reload().await.map_err(|e| store_error(e, "The directory"))?;
    if removed {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found("NotFound", "The binding was not found."))
    }
}

async fn create_federated(state: &AppState, caller: &Principal, body: Body) -> Result<Response, ApiError> {
    allow(state, caller, Action::PrincipalWrite, Resource::Server)?;
    let req: CreateFederated = parse(body).await?;
    let snapshot = state.directory.snapshot();
    let principal = find(&snapshot, &req.principal)?;
    allow_principal_change(caller, &snapshot, &principal.object_id)?;
    if !matches!(principal.kind, PrincipalKind::ServicePrincipal | PrincipalKind::ManagedIdentity) {
        return Err(ApiError::bad_parameter(
            "Federated credentials belong to service principals or managed identities.",
        ));
    }
    if principal.kind == PrincipalKind::ManagedIdentity {
        // Token requests name the client id of a service principal; keep the model simple.
        return Err(ApiError::bad_parameter(
            "Federate a service principal (coffer sp create) for workload identity.",
        ));
    }
    let jwks = match req.jwks {
        Some(doc) => {
            serde_json::from_value::<jsonwebtoken::jwk::JwkSet>(doc.clone())
                .map_err(|e| ApiError::bad_parameter(format!("The JWKS document is not valid: {e}")))?;
            Some(doc.to_string())
        }
        None => None,
    };
    if jwks.is_none() && req.jwks_url.as_deref().is_none_or(|u| !u.starts_with("https://")) {
        return Err(ApiError::bad_parameter(
            "Give the issuer's keys: jwksUrl (https://…) or a jwks document.",
        ));
    }
    if !req.issuer.starts_with("https://") {
        return Err(ApiError::bad_parameter(
            "The issuer must be an https:// URL, as in its tokens' iss claim.",
        ));
    }
    if let (None, Some(url)) = (&jwks, &req.jwks_url) {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| ApiError::bad_parameter(format!("The JWKS URL is not valid: {e}.")))?;
        state
            .outbound
            .check_url_now(&parsed)
            .await
            .map_err(|e| ApiError::bad_parameter(format!("The JWKS URL is refused: {e}.")))?;
    }
    let credential = FederatedCredential {
        id: uuid::Uuid::new_v4().to_string(),
        principal_id: principal.object_id.clone(),
        issuer: req.issuer,
        subject: req.subject,
        audience: req.audience.unwrap_or_else(|| DEFAULT_FEDERATION_AUDIENCE.into()),
        jwks_url: req.jwks_url,
        jwks,
    };
    state
        .directory
        .store()
        .add_federated_credential(&credential)
        .await
        .map_err(|e| store_error(e, "The federated credential"))?;
    state.directory.reload().await.map_err(|e| store_error(e, "The directory"))?;
    ok(StatusCode::CREATED, json!(credential))
}

async fn delete_federated(state: &AppState, caller: &Principal, id: &str) -> Result<Response, ApiError> {
    allow(state, caller, Action::PrincipalWrite, Resource::Server)?;
    let snapshot = state.directory.snapshot();
    let credential = snapshot
        .federated
        .iter()
        .find(|f| f.id == id)
        .ok_or_else(|| ApiError::not_found("NotFound", "The federated credential was not found."))?;
    allow_principal_change(caller, &snapshot, &credential.principal_id)?;
    let removed = state
        .directory
        .store()
        .delete_federated_credential(id)
        .await
        .map_err(|e| store_error(e, "The credential"))?;
    state.directory.reload().await.map_err(|e| store_error(e, "The directory"))?;
    if removed {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found("NotFound", "The federated credential was not found."))
    }
}

fn find_role<'a>(snapshot: &'a Snapshot, name_or_id: &str) -> Result<&'a RoleDefinition, ApiError> {
    snapshot
        .rbac
        .role(name_or_id)
        .or_else(|| snapshot.rbac.roles().find(|r| r.name.eq_ignore_ascii_case(name_or_id)))
        .ok_or_else(|| {
            ApiError::not_found("RoleDefinitionNotFound", format!("No role is named '{name_or_id}'."))
        })
}

async fn create_assignment(state: &AppState, caller: &Principal, body: Body) -> Result<Response, ApiError> {
    let req: CreateAssignment = parse(body).await?;
    let scope = Scope::parse(&req.scope).map_err(|e| ApiError::bad_parameter(e.to_string()))?;
    let snapshot = state.directory.snapshot();
    let role = find_role(&snapshot, &req.role)?;
    snapshot
        .rbac
        .authorize_assignment(caller, Action::RoleAssignmentWrite, scope.as_resource(), &role.id)
        .map_err(forbidden_by_rbac)?;
    let principal = find(&snapshot, &req.principal)?;
    let grant = snapshot
        .rbac
        .authorize_role_assignment(
            caller,
            Action::RoleAssignmentWrite,
            &scope,
            &role.id,
            &principal.object_id,
        )
        .map_err(forbidden_by_rbac)?;
    record_grant(&grant);
    if principal.kind == PrincipalKind::Agent {
        return Err(ApiError::bad_parameter("Agents hold no roles; bind identities to them instead."));
    }
    let assignment = RoleAssignment {
        id: uuid::Uuid::new_v4().to_string(),
        principal_id: principal.object_id.clone(),
        role_id: role.id.clone(),
        scope,
    };
    state
        .directory
        .store()
        .add_role_assignment(&assignment)
        .await
        .map_err(|e| store_error(e, "The role assignment"))?;
    state.directory.reload().await.map_err(|e| store_error(e, "The directory"))?;
    tracing::info!(principal = %principal.display_name, role = %role.name, scope = %assignment.scope, "role assigned");
    ok(StatusCode::CREATED, assignment_json(&state.directory.snapshot(), &assignment))
}

async fn delete_assignment(state: &AppState, caller: &Principal, id: &str) -> Result<Response, ApiError> {
    let snapshot = state.directory.snapshot();
    let assignment =
        snapshot.assignments.iter().find(|a| a.id == id).ok_or_else(|| {
            ApiError::not_found("RoleAssignmentNotFound", "The role assignment was not found.")
        })?;
    let grant = snapshot
        .rbac
        .authorize_role_assignment(
            caller,
            Action::RoleAssignmentDelete,
            &assignment.scope,
            &assignment.role_id,
            &assignment.principal_id,
        )
        .map_err(forbidden_by_rbac)?;
    record_grant(&grant);
    state
        .directory
        .store()
        .delete_role_assignment(id)
        .await
        .map_err(|e| store_error(e, "The role assignment"))?;
    state.directory.reload().await.map_err(|e| store_error(e, "The directory"))?;
    tracing::info!(assignment = %id, "role assignment removed");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn create_role(state: &AppState, caller: &Principal, body: Body) -> Result<Response, ApiError> {
    allow(state, caller, Action::RoleDefinitionWrite, Resource::Server)?;
    let req: CreateRole = parse(body).await?;
    if req.role_name.trim().is_empty() || (req.actions.is_empty() && req.data_actions.is_empty()) {
        return Err(ApiError::bad_parameter(
            "A custom role needs a roleName and at least one action or data action.",
        ));
    }
    let snapshot = state.directory.snapshot();
    if snapshot.rbac.roles().any(|r| r.name.eq_ignore_ascii_case(&req.role_name)) {
        return Err(ApiError::conflict(format!("A role named '{}' exists.", req.role_name)));
    }
    let role = RoleDefinition {
        id: uuid::Uuid::new_v4().to_string(),
        name: req.role_name,
        description: req.description.unwrap_or_default(),
        actions: req.actions,
        data_actions: req.data_actions,
        assignable_roles: None,
        builtin: false,
    };
    state.directory.store().put_custom_role(&role).await.map_err(|e| store_error(e, "The role"))?;
    state.directory.reload().await.map_err(|e| store_error(e, "The directory"))?;
    ok(StatusCode::CREATED, role_json(&role))
}

async fn delete_role(state: &AppState, caller: &Principal, id: &str) -> Result<Response, ApiError> {
    allow(state, caller, Action::RoleDefinitionWrite, Resource::Server)?;
    let snapshot = state.directory.snapshot();
    let role = find_role(&snapshot, id)?;
    if role.builtin {
        return Err(ApiError::bad_parameter("Built-in roles cannot be deleted."));
    }
    state
        .directory
        .store()
        .delete_custom_role(&role.id)
        .await
        .map_err(|e| store_error(e, "The role (it is assigned)"))?;
    state.directory.reload().await.map_err(|e| store_error(e, "The directory"))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn rotate_signing_key(state: &AppState, caller: &Principal) -> Result<Response, ApiError> {
    allow(state, caller, Action::SigningKeyRotate, Resource::Server)?;
    let kid = state
        .tokens
        .rotate(state.store.as_ref(), &state.keyring)
        .await
        .map_err(|e| ApiError::internal(&e.to_string()))?;
    tracing::info!(kid = %kid, "token-signing key rotated");
    ok(StatusCode::OK, json!({ "activeKid": kid }))
}
