//! The Azure Key Vault secrets data plane: translation between Key Vault's wire format and the
//! vault service. Route table and JSON shapes follow `shared/docs/azure-protocol.md` §A.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use coffer_core::authz::{Action, Resource};
use coffer_core::crypto::SecretValue;
use coffer_core::model::{PropertiesPatch, RetentionPolicy, Tags, VersionProperties};
use coffer_core::names::SecretName;
use coffer_store::DeletedSecret;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::AuditNote;
use super::{authenticate, query_pairs, query_value, read_body, ApiError, AppState};
use crate::vaults::NewSecret;

/// Page size when the client does not ask for one, and the largest it may ask for.
const PAGE_SIZE: usize = 25;
const BODY_LIMIT: usize = 256 * 1024;
const RESTORE_BODY_LIMIT: usize = 32 * 1024 * 1024;

/// A parsed data-plane route.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Set(&'a str),
    Get(&'a str, Option<&'a str>),
    List,
    ListVersions(&'a str),
    Update(&'a str, Option<&'a str>),
    Delete(&'a str),
    Backup(&'a str),
    Restore,
    GetDeleted(&'a str),
    ListDeleted,
    Recover(&'a str),
    Purge(&'a str),
    /// Coffer's change feed (long poll) beside the Key Vault API: `GET /coffer/changes`.
    Changes,
}

impl Route<'_> {
    fn action(&self) -> Action {
        match self {
            Route::Set(_) => Action::SecretSet,
            Route::Get(..) => Action::SecretGet,
            Route::List | Route::ListVersions(_) | Route::GetDeleted(_) | Route::ListDeleted => {
                Action::SecretReadMetadata
            }
            Route::Update(..) => Action::SecretUpdate,
            Route::Delete(_) => Action::SecretDelete,
            Route::Backup(_) => Action::SecretBackup,
            Route::Restore => Action::SecretRestore,
            Route::Recover(_) => Action::SecretRecover,
            Route::Purge(_) => Action::SecretPurge,
            Route::Changes => Action::SecretReadMetadata,
        }
    }

    fn secret(&self) -> Option<&str> {
        match self {
            Route::Set(n)
            | Route::Get(n, _)
            | Route::ListVersions(n)
            | Route::Update(n, _)
            | Route::Delete(n)
            | Route::Backup(n)
            | Route::GetDeleted(n)
            | Route::Recover(n)
            | Route::Purge(n) => Some(n),
            Route::List | Route::Restore | Route::ListDeleted | Route::Changes => None,
        }
    }
}

/// Routes `method path`. The SDKs address the latest version with a trailing slash
/// (`/secrets/{name}/`), so one empty trailing segment is ignored.
fn route<'a>(method: &Method, path: &'a str) -> Result<Route<'a>, ApiError> {
    let mut segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if segments.len() > 1 && segments.last() == Some(&"") {
        segments.pop();
    }
    let not_found =
        || ApiError::not_found("NotFound", "The requested path does not exist in the Key Vault API.");
    let route = match (segments.as_slice(), method) {
        (["secrets"], &Method::GET) => Route::List,
        (["secrets", "restore"], &Method::POST) => Route::Restore,
        (["secrets", name], &Method::PUT) => Route::Set(name),
        (["secrets", name], &Method::GET) => Route::Get(name, None),
        (["secrets", name], &Method::PATCH) => Route::Update(name, None),
        (["secrets", name], &Method::DELETE) => Route::Delete(name),
        (["secrets", name, "versions"], &Method::GET) => Route::ListVersions(name),
        (["secrets", name, "backup"], &Method::POST) => Route::Backup(name),
        (["secrets", name, version], &Method::GET) => Route::Get(name, Some(version)),
        (["secrets", name, version], &Method::PATCH) => Route::Update(name, Some(version)),
        (["deletedsecrets"], &Method::GET) => Route::ListDeleted,
        (["deletedsecrets", name], &Method::GET) => Route::GetDeleted(name),
        (["deletedsecrets", name], &Method::DELETE) => Route::Purge(name),
        (["deletedsecrets", name, "recover"], &Method::POST) => Route::Recover(name),
        (["coffer", "changes"], &Method::GET) => Route::Changes,
        (["secrets"] | ["secrets", ..] | ["deletedsecrets"] | ["deletedsecrets", ..], _)
            if segments.len() <= 3 =>
        {
            return Err(ApiError::method_not_allowed())
        }
        _ => return Err(not_found()),
    };
    Ok(route)
}

/// Accepts Key Vault api-versions by shape (`7.4`, `7.6-preview.2`, `2025-07-01`,
/// `2026-01-01-preview`): the secrets surface has not changed shape across them.
fn check_api_version(value: Option<&str>) -> Result<(), ApiError> {
    let Some(v) = value.filter(|v| !v.is_empty()) else {
        return Err(ApiError::bad_parameter(
            "The api-version query parameter (?api-version=) is required for all requests.",
        ));
    };
    let (base, preview) = v.split_once("-preview").map_or((v, ""), |(b, p)| (b, p));
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let dotted = base.split('.').count() == 2 && base.split('.').all(numeric);
    let dated = base.split('-').count() == 3 && base.split('-').all(numeric);
    let preview_ok = preview.is_empty() || preview.strip_prefix('.').is_some_and(numeric);
    if (dotted || dated) && preview_ok {
        Ok(())
    } else {
        Err(ApiError::bad_parameter(format!("The api-version '{v}' is not supported.")))
    }
}

pub(super) async fn handle(
    state: &Arc<AppState>,
    vault_name: String,
    req: Request,
    note: &mut AuditNote,
) -> Response {
    match handle_inner(state, vault_name, req, note).await {
        Ok(response) => response,
        Err(e) => {
            if note.denial.is_none() && matches!(e.status.as_u16(), 401 | 403) {
                note.deny(e.message.clone());
            }
            e.into_response()
        }
    }
}

impl Route<'_> {
    /// Key Vault's operation name, as its diagnostic logs spell it.
    fn operation(&self) -> &'static str {
        match self {
            Route::Set(_) => "SecretSet",
            Route::Get(..) => "SecretGet",
            Route::List => "SecretList",
            Route::ListVersions(_) => "SecretListVersions",
            Route::Update(..) => "SecretUpdate",
            Route::Delete(_) => "SecretDelete",
            Route::Backup(_) => "SecretBackup",
            Route::Restore => "SecretRestore",
            Route::GetDeleted(_) => "SecretGetDeleted",
            Route::ListDeleted => "SecretListDeleted",
            Route::Recover(_) => "SecretRecover",
            Route::Purge(_) => "SecretPurge",
            Route::Changes => "SecretChangesWatch",
        }
    }

    fn version(&self) -> Option<&str> {
        match self {
            Route::Get(_, v) | Route::Update(_, v) => *v,
            _ => None,
        }
    }
}

async fn handle_inner(
    state: &Arc<AppState>,
    vault_name: String,
    req: Request,
    note: &mut AuditNote,
) -> Result<Response, ApiError> {
    let path = req.uri().path().to_owned();
    let routed = route(req.method(), &path);
    note.vault = Some(vault_name.clone());
    note.operation = routed.as_ref().map_or("SecretUnknownOperation", Route::operation);
    if let Ok(r) = &routed {
        note.secret = r.secret().map(str::to_owned);
        note.version = r.version().map(str::to_owned);
    }
    // 1. Authenticate before looking at anything else: the SDKs' first request is bodiless.
    let principal = authenticate(state, req.headers(), note).await?;
    let pairs = query_pairs(&req);
    check_api_version(query_value(&pairs, "api-version"))?;
    let (_, body) = req.into_parts();
    let route = routed?;
    let vault = state.vaults.vault(&vault_name).ok_or_else(|| {
        ApiError::not_found(
            "VaultNotFound",
            format!("The vault '{vault_name}' does not exist on this server."),
        )
    })?;
    let watched = if route == Route::Changes { query_value(&pairs, "secret") } else { None };
    let name = route.secret().or(watched).map(secret_name).transpose()?;

    // 2. Authorize: one decision per request, before any data is read or written.
    let resource = match &name {
        Some(n) => Resource::Secret(vault.record.name.as_str(), n.as_str()),
        None => Resource::Vault(vault.record.name.as_str()),
    };
    let snapshot = state.directory.snapshot();
    match snapshot.rbac.authorize(&principal, route.action(), resource) {
        Ok(grant) => note.grant = Some(super::grant_text(&grant)),
        Err(denial) => {
            note.deny(denial.to_string());
            return Err(super::forbidden_by_rbac(denial));
        }
    }

    // 3. Execute.
    let limit = if route == Route::Restore { RESTORE_BODY_LIMIT } else { BODY_LIMIT };
    let body = read_body(body, limit).await?;
    let ctx = Ctx {
        vault: &vault_name,
        public_host: &state.public_host,
        policy: vault.record.policy,
        api_version: query_value(&pairs, "api-version").unwrap_or_default(),
    };
    let svc = &state.vaults;
    let name_ref = name.as_ref();
    let fail = |version| failure(name_ref, version);

    let response = match route {
        Route::Changes => watch_changes(state, &vault.record.name.to_string(), name_ref, &pairs).await,
        Route::Set(_) => {
            let name = name_ref.expect("set has a name");
            let parsed = parse_set_body(&body)?;
            let value =
                parsed.value.ok_or_else(|| ApiError::bad_parameter("The secret value is required."))?;
            let attributes = parsed.attributes.unwrap_or_default();
            let new = NewSecret {
                value: SecretValue::new((*value).clone()),
                content_type: parsed.content_type,
                tags: parsed.tags.unwrap_or_default(),
                enabled: attributes.enabled,
                not_before: attributes.nbf,
                expires: attributes.exp,
            };
            let props = svc.set(&vault, name, new).await.map_err(fail(None))?;
            note.version = Some(props.version.clone());
            let display = name.as_str();
            ok_json(&ctx.bundle(display, &props, Some(value.as_str())))
        }
        Route::Get(_, version) => {
            let (stored, value) =
                svc.get(&vault, name_ref.expect("named"), version).await.map_err(fail(version))?;
            note.version = Some(stored.props.version.clone());
            ok_json(&ctx.bundle(&stored.name, &stored.props, Some(value.expose())))
        }
        Route::List => {
            let (limit, after) = page_params(&pairs)?;
            let mut items = svc.list(&vault, after.as_deref(), limit + 1).await.map_err(fail(None))?;
            let next =
                more(&mut items, limit).then(|| items.last().map(|s| s.name.to_ascii_lowercase())).flatten();
            let value: Vec<_> = items.iter().map(|s| ctx.item(&s.name, &s.latest, false)).collect();
            ok_json(&Page { value, next_link: next.map(|t| ctx.next_link("/secrets", &t, limit)) })
        }
        Route::ListVersions(_) => {
            let (limit, after) = page_params(&pairs)?;
            let after = after.map(|t| t.parse::<i64>().map_err(|_| bad_skiptoken())).transpose()?;
            let name = name_ref.expect("named");
            // Key Vault answers an empty list for a secret that does not exist.
            let mut items = match svc.list_versions(&vault, name, after, limit + 1).await {
                Err(crate::vaults::ServiceError::NotFound) => Vec::new(),
                other => other.map_err(fail(None))?,
            };
            let next =
                more(&mut items, limit).then(|| items.last().map(|(seq, _, _)| seq.to_string())).flatten();
            let value: Vec<_> = items.iter().map(|(_, display, p)| ctx.item(display, p, true)).collect();
            let path = format!("/secrets/{name}/versions");
            ok_json(&Page { value, next_link: next.map(|t| ctx.next_link(&path, &t, limit)) })
        }
        Route::Update(_, version) => {
            let parsed: UpdateBody = parse_json(&body)?;
            let attributes = parsed.attributes.unwrap_or_default();
            let patch = PropertiesPatch {
                enabled: attributes.enabled,
                not_before: attributes.nbf,
                expires: attributes.exp,
                content_type: parsed.content_type,
                tags: parsed.tags,
            };
            let stored =
                svc.update(&vault, name_ref.expect("named"), version, patch).await.map_err(fail(version))?;
            ok_json(&ctx.bundle(&stored.name, &stored.props, None))
        }
        Route::Delete(_) => {
            let deleted = svc.delete(&vault, name_ref.expect("named")).await.map_err(fail(None))?;
            ok_json(&ctx.deleted_bundle(&deleted))
        }
        Route::GetDeleted(_) => {
            let name = name_ref.expect("named");
            let deleted = svc.deleted(&vault, name).await.map_err(|_| deleted_not_found(name))?;
            ok_json(&ctx.deleted_bundle(&deleted))
        }
        Route::ListDeleted => {
            let (limit, after) = page_params(&pairs)?;
            let mut items =
                svc.list_deleted(&vault, after.as_deref(), limit + 1).await.map_err(fail(None))?;
            let next =
                more(&mut items, limit).then(|| items.last().map(|d| d.name.to_ascii_lowercase())).flatten();
            let value: Vec<_> = items.iter().map(|d| ctx.deleted_item(d)).collect();
            ok_json(&Page { value, next_link: next.map(|t| ctx.next_link("/deletedsecrets", &t, limit)) })
        }
        Route::Recover(_) => {
            let name = name_ref.expect("named");
            let stored = svc.recover(&vault, name).await.map_err(|_| deleted_not_found(name))?;
            ok_json(&ctx.bundle(&stored.name, &stored.props, None))
        }
        Route::Purge(_) => {
            let name = name_ref.expect("named");
            svc.purge(&vault, name).await.map_err(|e| match e {
                crate::vaults::ServiceError::NotFound => deleted_not_found(name),
                other => ApiError::from_service(other, name.as_str()),
            })?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Route::Backup(_) => {
            let blob = svc.backup(&vault, name_ref.expect("named")).await.map_err(fail(None))?;
            ok_json(&serde_json::json!({ "value": blob }))
        }
        Route::Restore => {
            let parsed: RestoreBody = parse_json(&body)?;
            let stored = svc
                .restore(&vault, &parsed.value)
                .await
                .map_err(|e| ApiError::from_service(e, "in the backup"))?;
            note.secret = Some(stored.name.clone());
            note.version = Some(stored.props.version.clone());
            ok_json(&ctx.bundle(&stored.name, &stored.props, None))
        }
    };
    response
}

/// Longest a change-feed request waits for a change.
const MAX_WAIT_SECS: u64 = 55;

/// `GET /coffer/changes?[secret=NAME]&after=SEQ&epoch=E&wait=SECS`: the changes after `after`
/// (for one secret, or the whole vault), waiting up to `wait` seconds for one. `reset: true`
/// means the caller missed changes (server restart or fell behind): re-read what it caches.
async fn watch_changes(
    state: &Arc<AppState>,
    vault: &str,
    secret: Option<&SecretName>,
    pairs: &[(String, String)],
) -> Result<Response, ApiError> {
    let changes = state.vaults.changes();
    let after: u64 = match query_value(pairs, "after") {
        Some(a) => a.parse().map_err(|_| ApiError::bad_parameter("after must be a sequence number"))?,
        None => changes.head(),
    };
    let wait =
        query_value(pairs, "wait").and_then(|w| w.parse::<u64>().ok()).unwrap_or(25).min(MAX_WAIT_SECS);
    let same_epoch = query_value(pairs, "epoch").is_none_or(|e| e == changes.epoch);
    let key = secret.map(SecretName::key);
    let matches = |c: &crate::vaults::SecretChange| {
        c.vault == vault && key.as_deref().is_none_or(|k| c.name.eq_ignore_ascii_case(k))
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait);
    let mut rx = changes.subscribe();
    let (found, reset) = loop {
        if !same_epoch {
            break (Vec::new(), true);
        }
        match changes.since(after, &matches) {
            None => break (Vec::new(), true),
            Some(found) if !found.is_empty() => break (found, false),
            Some(_) => {}
        }
        if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
            break (Vec::new(), false);
        }
    };
    let head = found.last().map_or_else(|| changes.head().max(after), |c| c.seq);
    ok_json(&serde_json::json!({ "epoch": changes.epoch, "head": head, "reset": reset, "changes": found }))
}

fn deleted_not_found(name: &SecretName) -> ApiError {
    ApiError::not_found("SecretNotFound", format!("Deleted Secret not found: {name}"))
}

fn bad_skiptoken() -> ApiError {
    ApiError::bad_parameter("The $skiptoken is not valid; use the nextLink the server returned.")
}

/// Serde messages can quote input; keep only the position so a value never reaches a client
/// message or a log.
fn redact_serde(e: &serde_json::Error) -> String {
    format!("malformed JSON at line {} column {}", e.line(), e.column())
}

/// A set request's body; the copy serde reads from is zeroized, since it holds the value.
fn parse_set_body(body: &[u8]) -> Result<SetBody, ApiError> {
    let mut raw = body.to_vec();
    let parsed: Result<SetBody, _> = serde_json::from_slice(&raw);
    raw.zeroize();
    parsed
        .map_err(|e| ApiError::bad_parameter(format!("The request body is not valid: {}", redact_serde(&e))))
}

fn secret_name(raw: &str) -> Result<SecretName, ApiError> {
    SecretName::parse(raw).map_err(|e| ApiError::bad_parameter(e.to_string()))
}

/// The secret and version a request addresses, read as `handle_inner` reads them (the route,
/// then the name checked). For the fuzz targets (`crate::fuzzing`).
pub fn routed_secret(method: &Method, path: &str) -> Result<Option<(SecretName, Option<String>)>, ApiError> {
    let route = route(method, path)?;
    let version = route.version().map(str::to_owned);
    route.secret().map(|raw| secret_name(raw).map(|name| (name, version))).transpose()
}

/// The query checks a request passes before it runs: `api-version` (every request), then the
/// paging parameters (lists): the page size and decoded `$skiptoken`. For the fuzz targets.
pub fn checked_query(query: &str) -> Result<(usize, Option<String>), ApiError> {
    let pairs = super::parse_query(query);
    check_api_version(query_value(&pairs, "api-version"))?;
    page_params(&pairs)
}

/// Parses `body` as the set, update and restore handlers do (in that order), keeping only the
/// outcome: the error is what the client would be told. For the fuzz targets.
pub fn parse_bodies(body: &[u8]) -> [Result<(), ApiError>; 3] {
    [
        parse_set_body(body).map(drop),
        parse_json::<UpdateBody>(body).map(drop),
        parse_json::<RestoreBody>(body).map(drop),
    ]
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.is_empty() { b"{}".as_slice() } else { body };
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_parameter(format!("The request body is not valid: {}", redact_serde(&e))))
}

/// `maxresults` (1..=25, default 25) and the decoded `$skiptoken`.
fn page_params(pairs: &[(String, String)]) -> Result<(usize, Option<String>), ApiError> {
    let limit = match query_value(pairs, "maxresults") {
        None | Some("") => PAGE_SIZE,
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if (1..=PAGE_SIZE).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_parameter(format!(
                    "maxresults must be an integer from 1 to {PAGE_SIZE}."
                )))
            }
        },
    };
    let after = query_value(pairs, "$skiptoken")
        .filter(|t| !t.is_empty())
        .map(|t| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(t)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(bad_skiptoken)
        })
        .transpose()?;
    Ok((limit, after))
}

/// Trims the look-ahead item; true when there is another page.
fn more<T>(items: &mut Vec<T>, limit: usize) -> bool {
    if items.len() > limit {
        items.truncate(limit);
        true
    } else {
        false
    }
}

/// Maps a service error about `name` (and `version`) to the API's error; the subject is
/// formatted only when there is an error to report.
fn failure<'a>(
    name: Option<&'a SecretName>,
    version: Option<&'a str>,
) -> impl FnOnce(crate::vaults::ServiceError) -> ApiError + 'a {
    move |e| {
        let subject = match (name, version) {
            (Some(n), Some(v)) => format!("{n}/{v}"),
            (Some(n), None) => n.to_string(),
            _ => String::new(),
        };
        ApiError::from_service(e, &subject)
    }
}

fn ok_json<T: Serialize>(body: &T) -> Result<Response, ApiError> {
    let text = serde_json::to_string(body).map_err(|e| ApiError::internal(&e.to_string()))?;
    Ok(super::json_response(StatusCode::OK, text))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct AttributesIn {
    enabled: Option<bool>,
    nbf: Option<i64>,
    exp: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SetBody {
    value: Option<Zeroizing<String>>,
    tags: Option<Tags>,
    content_type: Option<String>,
    attributes: Option<AttributesIn>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateBody {
    content_type: Option<String>,
    attributes: Option<AttributesIn>,
    tags: Option<Tags>,
}

#[derive(Deserialize)]
struct RestoreBody {
    value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AttributesOut {
    enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<i64>,
    created: i64,
    updated: i64,
    recoverable_days: i64,
    recovery_level: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Bundle<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    attributes: AttributesOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    tags: Option<&'a Tags>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeletedBundle<'a> {
    #[serde(flatten)]
    bundle: Bundle<'a>,
    recovery_id: String,
    deleted_date: i64,
    scheduled_purge_date: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Page<T> {
    value: Vec<T>,
    next_link: Option<String>,
}

/// What every response of one request shares.
struct Ctx<'a> {
    /// The vault's name as served (lowercase) and the zone's public `host[:port]`: ids and
    /// links are built from the configuration, never from the request's `Host`, whose case,
    /// trailing dot or port a client chooses.
    vault: &'a str,
    public_host: &'a str,
    policy: RetentionPolicy,
    api_version: &'a str,
}

impl<'a> Ctx<'a> {
    fn base(&self) -> String {
        self.url(&[])
    }

    /// `https://<vault>.<public host>` followed by `parts`, in one allocation: ids are built
    /// for every secret returned, and `format!` showed in GET profiles.
    fn url(&self, parts: &[&str]) -> String {
        let head = ["https://", self.vault, ".", self.public_host];
        let len = head.iter().chain(parts).map(|p| p.len()).sum::<usize>();
        let mut url = String::with_capacity(len);
        for part in head.iter().chain(parts) {
            url.push_str(part);
        }
        url
    }

    fn attributes(&self, p: &VersionProperties) -> AttributesOut {
        let a = &p.attributes;
        AttributesOut {
            enabled: a.enabled,
            nbf: a.not_before,
            exp: a.expires,
            created: a.created,
            updated: a.updated,
            recoverable_days: self.policy.retention_days,
            recovery_level: self.policy.recovery_level(),
        }
    }

    fn bundle<'b>(&self, name: &str, p: &'b VersionProperties, value: Option<&'b str>) -> Bundle<'b> {
        Bundle {
            value,
            id: self.url(&["/secrets/", name, "/", &p.version]),
            content_type: p.content_type.as_deref(),
            attributes: self.attributes(p),
            tags: (!p.tags.is_empty()).then_some(&p.tags),
        }
    }

    fn item<'b>(&self, name: &str, p: &'b VersionProperties, with_version: bool) -> Bundle<'b> {
        let mut b = self.bundle(name, p, None);
        if !with_version {
            b.id = self.url(&["/secrets/", name]);
        }
        b
    }

    fn deleted_bundle<'b>(&self, d: &'b DeletedSecret) -> DeletedBundle<'b> {
        DeletedBundle {
            bundle: self.bundle(&d.name, &d.latest, None),
            recovery_id: self.url(&["/deletedsecrets/", &d.name]),
            deleted_date: d.deletion.deleted_at,
            scheduled_purge_date: d.deletion.scheduled_purge,
        }
    }

    fn deleted_item<'b>(&self, d: &'b DeletedSecret) -> DeletedBundle<'b> {
        let mut b = self.deleted_bundle(d);
        b.bundle.id = self.url(&["/secrets/", &d.name]);
        b
    }

    fn next_link(&self, path: &str, after: &str, limit: usize) -> String {
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(after);
        let version: String = form_urlencoded::byte_serialize(self.api_version.as_bytes()).collect();
        format!("{}{path}?api-version={version}&$skiptoken={token}&maxresults={limit}", self.base())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_follow_the_sdks() {
        let r = |m: Method, p: &'static str| route(&m, p);
        assert_eq!(r(Method::GET, "/secrets/db/").unwrap(), Route::Get("db", None));
        assert_eq!(r(Method::GET, "/secrets/db").unwrap(), Route::Get("db", None));
        assert_eq!(r(Method::GET, "/secrets/db/abc").unwrap(), Route::Get("db", Some("abc")));
        assert_eq!(r(Method::PATCH, "/secrets/db/").unwrap(), Route::Update("db", None));
        assert_eq!(r(Method::GET, "/secrets/db/versions").unwrap(), Route::ListVersions("db"));
        assert_eq!(r(Method::POST, "/secrets/restore").unwrap(), Route::Restore);
        assert_eq!(r(Method::PUT, "/secrets/restore").unwrap(), Route::Set("restore"));
        assert_eq!(r(Method::GET, "/secrets").unwrap(), Route::List);
        assert_eq!(r(Method::GET, "/secrets/").unwrap(), Route::List);
        assert_eq!(r(Method::DELETE, "/deletedsecrets/db").unwrap(), Route::Purge("db"));
        assert_eq!(r(Method::POST, "/deletedsecrets/db/recover").unwrap(), Route::Recover("db"));
        assert!(r(Method::GET, "/keys/k").is_err());
        assert_eq!(r(Method::PUT, "/secrets").unwrap_err().status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn ids_are_the_vault_url_and_the_secret_path() {
        let ctx = Ctx {
            vault: "prod",
            public_host: "localhost:8443",
            policy: RetentionPolicy { retention_days: 7, purge_protection: false },
            api_version: "7.5",
        };
        let props = VersionProperties {
            version: "0f3a".into(),
            attributes: coffer_core::model::VersionAttributes {
                enabled: true,
                not_before: None,
                expires: None,
                created: 1,
                updated: 1,
            },
            content_type: None,
            tags: Default::default(),
        };
        assert_eq!(
            ctx.bundle("Db-Pass", &props, None).id,
            "https://prod.localhost:8443/secrets/Db-Pass/0f3a"
        );
        assert_eq!(ctx.item("Db-Pass", &props, false).id, "https://prod.localhost:8443/secrets/Db-Pass");
        let deleted = DeletedSecret {
            name: "Db-Pass".into(),
            deletion: coffer_core::model::Deletion { deleted_at: 2, scheduled_purge: 3 },
            latest: props.clone(),
        };
        let d = ctx.deleted_bundle(&deleted);
        assert_eq!(d.recovery_id, "https://prod.localhost:8443/deletedsecrets/Db-Pass");
        assert_eq!(d.bundle.id, "https://prod.localhost:8443/secrets/Db-Pass/0f3a");
        assert_eq!(ctx.deleted_item(&deleted).bundle.id, "https://prod.localhost:8443/secrets/Db-Pass");
        assert_eq!(ctx.base(), "https://prod.localhost:8443");
    }

    #[test]
    fn api_versions_by_shape() {
        for ok in
            ["7.0", "7.6", "7.6-preview.2", "2016-10-01", "2025-07-01", "2026-01-01-preview", "2026-04-01"]
        {
            assert!(check_api_version(Some(ok)).is_ok(), "{ok}");
        }
        for bad in ["", "seven", "7", "2025-07", "7.6-previewx", "../../x"] {
            assert!(check_api_version(Some(bad)).is_err(), "{bad}");
        }
        assert!(check_api_version(None).is_err());
    }
}
