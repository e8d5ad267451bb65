//! Coffer compatibility test for the official Rust Key Vault secrets crate
//! (`azure_security_keyvault_secrets` 1.x on `azure_core` 1.x).
//!
//! Drives an already running Coffer server through the unmodified `SecretClient`:
//! `SecretClient::new(AZURE_KEYVAULT_URL, credential, None)`, so the crate goes through its own
//! challenge flow (unauthenticated first request, 401 + `WWW-Authenticate`, domain check, retry with a
//! bearer token) and its own default reqwest + rustls-platform-verifier HTTP client.
//!
//! Environment:
//! * `AZURE_KEYVAULT_URL`     vault URL, e.g. `https://rustcompat.localhost:18600` (required)
//! * `COFFER_TOKEN`           bearer token the server accepts for the vault (required; never printed)
//! * `SSL_CERT_FILE`          CA bundle that signs the server certificate (read by
//!   rustls-platform-verifier through rustls-native-certs; it replaces the system store)
//! * `COFFER_RETENTION_DAYS`  soft-delete retention the vault was created with (default 7)
//! * `COMPAT_FILTER`          optional substring: run only the tests whose name contains it
//!
//! Prints one `PASS name` / `FAIL name: reason` line per test and, as its last line, `N passed, N failed`.
//! Exits 0 only if every test passed.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Instant,
};

use async_trait::async_trait;
use azure_core::{
    credentials::{AccessToken, TokenCredential, TokenRequestOptions},
    error::ErrorKind,
    http::Url,
    time::{Duration, OffsetDateTime},
};
use azure_security_keyvault_secrets::{
    models::{
        KeyVaultError, RestoreSecretParameters, Secret, SecretAttributes, SecretClientGetSecretOptions,
        SecretClientListSecretPropertiesOptions, SecretClientUpdateSecretPropertiesOptions,
        SetSecretParameters, UpdateSecretPropertiesParameters,
    },
    ResourceExt, SecretClient,
};
use futures::TryStreamExt;

mod identity;

type TestResult = Result<(), String>;

/// A test that returns `Err` starting with this was skipped (it cannot run here), not failed.
const SKIP_PREFIX: &str = "SKIP: ";

macro_rules! check {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

macro_rules! check_eq {
    ($left:expr, $right:expr, $what:expr) => {{
        let (l, r) = (&$left, &$right);
        if l != r {
            return Err(format!("{}: got {:?}, expected {:?}", $what, l, r));
        }
    }};
}

/// Turn an SDK error from an operation that was expected to succeed into a readable failure.
fn op_err(op: &str) -> impl FnOnce(azure_core::Error) -> String + '_ {
    move |e| format!("{op} failed: {}", describe(&e))
}

/// Readable description of an SDK error, including the HTTP status and body when there is one.
fn describe(e: &azure_core::Error) -> String {
    match e.kind() {
        ErrorKind::HttpResponse { status, error_code, raw_response } => {
            let body = raw_response
                .as_ref()
                .map(|r| String::from_utf8_lossy(r.body().as_ref()).into_owned())
                .unwrap_or_default();
            format!(
                "HTTP {} (error code {:?}), body {:?}",
                u16::from(*status),
                error_code,
                truncate(&body, 400)
            )
        }
        kind => {
            // Display plus the source chain (Debug would print a full backtrace).
            let mut out = format!("{kind:?} error: {e}");
            let mut src = std::error::Error::source(e);
            while let Some(s) = src {
                out.push_str(&format!(": {s}"));
                src = s.source();
            }
            out
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        let mut end = n;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    }
}

/// What an HTTP error response carried.
#[derive(Debug)]
struct HttpError {
    status: u16,
    code: Option<String>,
    inner_code: Option<String>,
    message: Option<String>,
}

/// Expect `res` to be an HTTP error with `status` (and, if given, `error.code` == `code`).
fn expect_http_error<T>(
    res: azure_core::Result<T>,
    op: &str,
    status: u16,
    code: Option<&str>,
) -> Result<HttpError, String> {
    let e = match res {
        Ok(_) => return Err(format!("{op}: succeeded, expected HTTP {status}{}", code_suffix(code))),
        Err(e) => e,
    };
    let ErrorKind::HttpResponse { status: got, error_code, raw_response } = e.kind() else {
        return Err(format!(
            "{op}: expected HTTP {status}{}, got a non-HTTP error: {}",
            code_suffix(code),
            describe(&e)
        ));
    };
    let body = raw_response.as_ref().map(|r| r.body().as_ref().to_vec()).unwrap_or_default();
    let parsed: Option<KeyVaultError> = azure_core::json::from_json(&body).ok();
    let err = parsed.and_then(|p| p.error);
    let info = HttpError {
        status: u16::from(*got),
        code: error_code.clone().or_else(|| err.as_ref().and_then(|e| e.code.clone())),
        inner_code: err.as_ref().and_then(|e| e.inner_error.as_ref()).and_then(|i| i.code.clone()),
        message: err.as_ref().and_then(|e| e.message.clone()),
    };
    if info.status != status || code.is_some_and(|c| info.code.as_deref() != Some(c)) {
        return Err(format!("{op}: expected HTTP {status}{}, got {}", code_suffix(code), describe(&e)));
    }
    Ok(info)
}

fn code_suffix(code: Option<&str>) -> String {
    code.map(|c| format!(" with error code {c}")).unwrap_or_default()
}

fn is_version(v: &str) -> bool {
    v.len() == 32 && v.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

// ------------------------------------------------------------------------------------------------
// Credential
// ------------------------------------------------------------------------------------------------

/// `TokenCredential` that returns COFFER_TOKEN (valid for one hour) and records the scopes it was asked for.
struct StaticTokenCredential {
    token: String,
    scopes: Mutex<Vec<Vec<String>>>,
}

impl std::fmt::Debug for StaticTokenCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticTokenCredential").field("token", &"<hidden>").finish()
    }
}

#[async_trait]
impl TokenCredential for StaticTokenCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        self.scopes.lock().unwrap().push(scopes.iter().map(|s| s.to_string()).collect());
        Ok(AccessToken::new(self.token.clone(), OffsetDateTime::now_utc() + Duration::hours(1)))
    }
}

// ------------------------------------------------------------------------------------------------
// Test context
// ------------------------------------------------------------------------------------------------

struct Ctx {
    client: SecretClient,
    credential: Arc<StaticTokenCredential>,
    /// Vault base URL without a trailing slash, e.g. `https://rustcompat.localhost:18600`.
    vault: String,
    /// Scope the challenge should make the client ask for, e.g. `https://localhost:18600/.default`.
    expected_scope: String,
    retention_days: i64,
    /// Unique per run, so the program can run repeatedly against the same vault.
    run: String,
}

impl Ctx {
    fn name(&self, what: &str) -> String {
        format!("rs-{what}-{}", self.run)
    }

    async fn set(&self, name: &str, value: &str) -> Result<Secret, String> {
        let params = SetSecretParameters { value: Some(value.to_string()), ..Default::default() };
        self.client
            .set_secret(name, params.try_into().map_err(op_err("serialise"))?, None)
            .await
            .map_err(op_err(&format!("set_secret({name})")))?
            .into_model()
            .map_err(op_err(&format!("set_secret({name}) body")))
    }

    async fn get(&self, name: &str, version: Option<&str>) -> azure_core::Result<Secret> {
        let opts = SecretClientGetSecretOptions {
            secret_version: version.map(str::to_string),
            ..Default::default()
        };
        self.client.get_secret(name, Some(opts)).await?.into_model()
    }

    async fn set_enabled(&self, name: &str, enabled: bool) -> Result<Secret, String> {
        let params = UpdateSecretPropertiesParameters {
            secret_attributes: Some(SecretAttributes { enabled: Some(enabled), ..Default::default() }),
            ..Default::default()
        };
        self.client
            .update_secret_properties(name, params.try_into().map_err(op_err("serialise"))?, None)
            .await
            .map_err(op_err(&format!("update_secret_properties({name}, enabled={enabled})")))?
            .into_model()
            .map_err(op_err("update_secret_properties body"))
    }

    /// Checks an id is `{vault}/secrets/{name}/{32-hex version}` and returns the version.
    fn check_versioned_id(&self, secret: &Secret, name: &str, what: &str) -> Result<String, String> {
        let id = secret.id.clone().ok_or_else(|| format!("{what}: response has no id"))?;
        let rid = secret.resource_id().map_err(|e| format!("{what}: id {id:?} does not parse: {e}"))?;
        check_eq!(rid.vault_url, self.vault, format!("{what}: vault part of id {id:?}"));
        check_eq!(rid.name, name, format!("{what}: name part of id {id:?}"));
        let version = rid.version.ok_or_else(|| format!("{what}: id {id:?} has no version"))?;
        check!(
            is_version(&version),
            "{what}: version {version:?} in id {id:?} is not 32 lowercase hex characters"
        );
        check_eq!(id, format!("{}/secrets/{name}/{version}", self.vault), format!("{what}: id"));
        Ok(version)
    }

    /// Best-effort delete + purge, for cleanup (errors ignored).
    async fn destroy(&self, name: &str) {
        let _ = self.client.delete_secret(name, None).await;
        let _ = self.client.purge_deleted_secret(name, None).await;
    }

    async fn list_all_names(&self, maxresults: Option<i32>) -> Result<(Vec<String>, Vec<usize>), String> {
        let opts = SecretClientListSecretPropertiesOptions { maxresults, ..Default::default() };
        let mut pages = self
            .client
            .list_secret_properties(Some(opts))
            .map_err(op_err("list_secret_properties"))?
            .into_pages();
        let mut names = Vec::new();
        let mut sizes = Vec::new();
        while let Some(page) = pages.try_next().await.map_err(op_err("list_secret_properties page"))? {
            let page = page.into_model().map_err(op_err("list_secret_properties page body"))?;
            sizes.push(page.value.len());
            for item in page.value {
                let id = item.id.clone().ok_or("list item without id")?;
                let rid = item.resource_id().map_err(|e| format!("list item id {id:?}: {e}"))?;
                check!(
                    rid.version.is_none(),
                    "list item id {id:?} carries a version; list ids are {{vault}}/secrets/{{name}}"
                );
                check_eq!(id, format!("{}/secrets/{}", self.vault, rid.name), "list item id");
                names.push(rid.name);
            }
            check!(sizes.len() <= 100, "more than 100 pages: the nextLink probably never ends");
        }
        Ok((names, sizes))
    }
}

// ------------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------------

async fn test_set_and_get(ctx: &Ctx) -> TestResult {
    let name = ctx.name("basic");
    let params = SetSecretParameters {
        value: Some("value-1".into()),
        content_type: Some("text/plain".into()),
        tags: Some(HashMap::from([("env".to_string(), "compat".to_string())])),
        ..Default::default()
    };
    let set = ctx
        .client
        .set_secret(&name, params.try_into().map_err(op_err("serialise"))?, None)
        .await
        .map_err(op_err("set_secret"))?
        .into_model()
        .map_err(op_err("set_secret body"))?;
    let version = ctx.check_versioned_id(&set, &name, "set_secret")?;
    check_eq!(set.value.as_deref(), Some("value-1"), "set_secret value");
    check_eq!(set.content_type.as_deref(), Some("text/plain"), "set_secret contentType");
    check_eq!(
        set.tags.as_ref().and_then(|t| t.get("env")).map(String::as_str),
        Some("compat"),
        "set_secret tags[env]"
    );
    let attrs = set.attributes.clone().ok_or("set_secret: no attributes")?;
    check_eq!(attrs.enabled, Some(true), "set_secret attributes.enabled");
    check!(
        attrs.created.is_some() && attrs.updated.is_some(),
        "set_secret: attributes.created/updated missing: {attrs:?}"
    );
    let now = OffsetDateTime::now_utc();
    let created = attrs.created.unwrap();
    check!(
        (created - now).abs() < Duration::minutes(5),
        "set_secret attributes.created {created} is not close to now ({now})"
    );
    check_eq!(
        attrs.recoverable_days,
        Some(ctx.retention_days as i32),
        "set_secret attributes.recoverableDays"
    );
    let want_level =
        if ctx.retention_days >= 90 { "Recoverable+Purgeable" } else { "CustomizedRecoverable+Purgeable" };
    check_eq!(
        attrs.recovery_level.as_ref().map(|l| l.to_string()),
        Some(want_level.to_string()),
        "set_secret attributes.recoveryLevel"
    );

    let latest = ctx.get(&name, None).await.map_err(op_err("get_secret(latest)"))?;
    check_eq!(latest.value.as_deref(), Some("value-1"), "get_secret(latest) value");
    check_eq!(latest.id, set.id, "get_secret(latest) id");
    check_eq!(latest.content_type.as_deref(), Some("text/plain"), "get_secret(latest) contentType");

    let by_version = ctx.get(&name, Some(&version)).await.map_err(op_err("get_secret(version)"))?;
    check_eq!(by_version.value.as_deref(), Some("value-1"), "get_secret(version) value");
    check_eq!(by_version.id, set.id, "get_secret(version) id");
    ctx.destroy(&name).await;
    Ok(())
}

async fn test_new_version(ctx: &Ctx) -> TestResult {
    let name = ctx.name("versions");
    let s1 = ctx.set(&name, "first").await?;
    let v1 = ctx.check_versioned_id(&s1, &name, "set_secret #1")?;
    let s2 = ctx.set(&name, "second").await?;
    let v2 = ctx.check_versioned_id(&s2, &name, "set_secret #2")?;
    check!(v1 != v2, "second set_secret returned the same version {v1}");
    let latest = ctx.get(&name, None).await.map_err(op_err("get_secret(latest)"))?;
    check_eq!(latest.value.as_deref(), Some("second"), "get_secret(latest) value after 2nd set");
    check_eq!(latest.id, s2.id, "get_secret(latest) id after 2nd set");
    let old = ctx.get(&name, Some(&v1)).await.map_err(op_err("get_secret(v1)"))?;
    check_eq!(old.value.as_deref(), Some("first"), "get_secret(v1) value");
    ctx.destroy(&name).await;
    Ok(())
}

async fn test_update_disable_enable(ctx: &Ctx) -> TestResult {
    let name = ctx.name("disable");
    let s1 = ctx.set(&name, "v1").await?;
    let v1 = ctx.check_versioned_id(&s1, &name, "set_secret")?;

    // Content type + tags through update (latest version, i.e. PATCH /secrets/{name}/).
    let params = UpdateSecretPropertiesParameters {
        content_type: Some("application/x-compat".into()),
        tags: Some(HashMap::from([("k".to_string(), "v".to_string())])),
        ..Default::default()
    };
    let upd = ctx
        .client
        .update_secret_properties(&name, params.try_into().map_err(op_err("serialise"))?, None)
        .await
        .map_err(op_err("update_secret_properties(contentType, tags)"))?
        .into_model()
        .map_err(op_err("update body"))?;
    check_eq!(upd.id, s1.id, "update_secret_properties id");
    check_eq!(
        upd.content_type.as_deref(),
        Some("application/x-compat"),
        "update_secret_properties contentType"
    );
    check_eq!(upd.tags.as_ref().and_then(|t| t.get("k")).map(String::as_str), Some("v"), "update tags[k]");
    check_eq!(upd.attributes.as_ref().and_then(|a| a.enabled), Some(true), "update: enabled untouched");

    // Disable the latest version.
    let dis = ctx.set_enabled(&name, false).await?;
    check_eq!(
        dis.attributes.as_ref().and_then(|a| a.enabled),
        Some(false),
        "update(enabled=false) attributes.enabled"
    );
    check_eq!(
        dis.content_type.as_deref(),
        Some("application/x-compat"),
        "update(enabled=false) kept contentType"
    );

    let err = expect_http_error(ctx.get(&name, None).await, "get_secret on a disabled secret", 403, None)?;
    check_eq!(err.code.as_deref(), Some("Forbidden"), "get_secret on a disabled secret: error.code");
    check_eq!(
        err.inner_code.as_deref(),
        Some("SecretDisabled"),
        "get_secret on a disabled secret: error.innererror.code"
    );
    expect_http_error(
        ctx.get(&name, Some(&v1)).await,
        "get_secret(version) on a disabled version",
        403,
        Some("Forbidden"),
    )?;

    // Re-enable through the version-specific PATCH.
    let params = UpdateSecretPropertiesParameters {
        secret_attributes: Some(SecretAttributes { enabled: Some(true), ..Default::default() }),
        ..Default::default()
    };
    let opts =
        SecretClientUpdateSecretPropertiesOptions { secret_version: Some(v1.clone()), ..Default::default() };
    let en = ctx
        .client
        .update_secret_properties(&name, params.try_into().map_err(op_err("serialise"))?, Some(opts))
        .await
        .map_err(op_err("update_secret_properties(version, enabled=true)"))?
        .into_model()
        .map_err(op_err("update body"))?;
    check_eq!(en.attributes.as_ref().and_then(|a| a.enabled), Some(true), "re-enable attributes.enabled");
    let got = ctx.get(&name, None).await.map_err(op_err("get_secret after re-enable"))?;
    check_eq!(got.value.as_deref(), Some("v1"), "get_secret after re-enable value");
    ctx.destroy(&name).await;
    Ok(())
}

async fn test_list_paging(ctx: &Ctx) -> TestResult {
    const N: usize = 30;
    let prefix = format!("rs-page-{}-", ctx.run);
    let want: BTreeSet<String> = (0..N).map(|i| format!("{prefix}{i:02}")).collect();
    for n in &want {
        ctx.set(n, "paged").await?;
    }
    let result = async {
        // Default page size (no maxresults): the service returns at most 25 per page.
        let (names, sizes) = ctx.list_all_names(None).await?;
        check!(sizes.len() >= 2, "list_secret_properties returned {} page(s) of sizes {sizes:?} for >= {N} secrets; expected >= 2 (25 per page)", sizes.len());
        check!(sizes.iter().all(|&s| s <= 25), "a page exceeded 25 items: {sizes:?}");
        let set: BTreeSet<String> = names.iter().cloned().collect();
        check!(set.len() == names.len(), "list_secret_properties returned duplicate names across pages (page sizes {sizes:?})");
        let missing: Vec<_> = want.difference(&set).collect();
        check!(missing.is_empty(), "list_secret_properties is missing {} of {N} secrets: {missing:?} (page sizes {sizes:?})", missing.len());

        // Explicit small page size.
        let (names, sizes) = ctx.list_all_names(Some(7)).await?;
        check!(sizes.iter().all(|&s| s <= 7), "maxresults=7: a page exceeded 7 items: {sizes:?}");
        check!(sizes.len() >= N.div_ceil(7), "maxresults=7: only {} pages for >= {N} secrets", sizes.len());
        let set: BTreeSet<String> = names.iter().cloned().collect();
        check!(set.len() == names.len(), "maxresults=7: duplicate names across pages");
        let missing: Vec<_> = want.difference(&set).collect();
        check!(missing.is_empty(), "maxresults=7: missing {} of {N}: {missing:?}", missing.len());

        // Item iteration (the crate's usual way) gives the same set.
        let mut pager = ctx.client.list_secret_properties(None).map_err(op_err("list_secret_properties"))?;
        let mut count = 0;
        while let Some(item) = pager.try_next().await.map_err(op_err("list_secret_properties item"))? {
            if item.resource_id().map(|r| r.name.starts_with(&prefix)).unwrap_or(false) {
                count += 1;
                check_eq!(item.attributes.as_ref().and_then(|a| a.enabled), Some(true), "list item attributes.enabled");
            }
        }
        check_eq!(count, N, "item iterator: number of test secrets listed");
        Ok(())
    }
    .await;
    for n in &want {
        ctx.destroy(n).await;
    }
    result
}

async fn test_list_versions(ctx: &Ctx) -> TestResult {
    let name = ctx.name("listver");
    let mut versions = BTreeSet::new();
    for i in 0..3 {
        let s = ctx.set(&name, &format!("value-{i}")).await?;
        versions.insert(ctx.check_versioned_id(&s, &name, "set_secret")?);
    }
    let mut pager = ctx
        .client
        .list_secret_properties_versions(&name, None)
        .map_err(op_err("list_secret_properties_versions"))?;
    let mut listed = BTreeSet::new();
    while let Some(item) = pager.try_next().await.map_err(op_err("list_secret_properties_versions item"))? {
        let id = item.id.clone().ok_or("version item without id")?;
        let rid = item.resource_id().map_err(|e| format!("version item id {id:?}: {e}"))?;
        check_eq!(rid.name, name, "version item name");
        let v = rid.version.ok_or_else(|| format!("version item id {id:?} has no version"))?;
        check!(listed.insert(v.clone()), "version {v} listed twice");
    }
    check_eq!(listed, versions, "list_secret_properties_versions versions");
    ctx.destroy(&name).await;
    Ok(())
}

/// Key Vault answers `GET /secrets/{missing}/versions` with `200 {"value":[],"nextLink":null}`, not 404
/// (real-service recording: Azure/azure-sdk-for-js, sdk/keyvault/keyvault-secrets/recordings/node/
/// secret_client__list_secrets_in_various_ways/recording_can_list_secret_versions_non_existing.json).
async fn test_list_versions_missing(ctx: &Ctx) -> TestResult {
    let missing = ctx.name("listver-missing");
    let mut pager = ctx
        .client
        .list_secret_properties_versions(&missing, None)
        .map_err(op_err("list_secret_properties_versions"))?;
    let mut n = 0;
    while let Some(_item) = pager.try_next().await.map_err(op_err("list versions of a missing secret"))? {
        n += 1;
    }
    check_eq!(n, 0, "list versions of a missing secret: item count");
    Ok(())
}

async fn test_delete_recover(ctx: &Ctx) -> TestResult {
    let name = ctx.name("recover");
    let s = ctx.set(&name, "keep-me").await?;
    let version = ctx.check_versioned_id(&s, &name, "set_secret")?;

    let del = ctx
        .client
        .delete_secret(&name, None)
        .await
        .map_err(op_err("delete_secret"))?
        .into_model()
        .map_err(op_err("delete_secret body"))?;
    check_eq!(
        del.recovery_id,
        Some(format!("{}/deletedsecrets/{name}", ctx.vault)),
        "delete_secret recoveryId"
    );
    check_eq!(del.id, Some(format!("{}/secrets/{name}/{version}", ctx.vault)), "delete_secret id");
    check!(del.value.is_none(), "delete_secret returned the secret value");
    let deleted = del.deleted_date.ok_or("delete_secret: no deletedDate")?;
    let purge = del.scheduled_purge_date.ok_or("delete_secret: no scheduledPurgeDate")?;
    check!(
        (purge - deleted - Duration::days(ctx.retention_days)).abs() <= Duration::minutes(1),
        "scheduledPurgeDate {purge} - deletedDate {deleted} is not {} days",
        ctx.retention_days
    );

    expect_http_error(ctx.get(&name, None).await, "get_secret after delete", 404, Some("SecretNotFound"))?;

    let gd = ctx
        .client
        .get_deleted_secret(&name, None)
        .await
        .map_err(op_err("get_deleted_secret"))?
        .into_model()
        .map_err(op_err("get_deleted_secret body"))?;
    check_eq!(gd.recovery_id, del.recovery_id, "get_deleted_secret recoveryId");
    check_eq!(gd.id, del.id, "get_deleted_secret id");
    check!(gd.value.is_none(), "get_deleted_secret returned the secret value");

    // list_deleted_secret_properties shows it.
    let mut pager =
        ctx.client.list_deleted_secret_properties(None).map_err(op_err("list_deleted_secret_properties"))?;
    let mut found = false;
    while let Some(item) = pager.try_next().await.map_err(op_err("list_deleted_secret_properties item"))? {
        if item.recovery_id.as_deref() == del.recovery_id.as_deref() {
            found = true;
            check_eq!(item.id, Some(format!("{}/secrets/{name}", ctx.vault)), "deleted list item id");
            check!(
                item.deleted_date.is_some() && item.scheduled_purge_date.is_some(),
                "deleted list item lacks dates"
            );
        }
    }
    check!(found, "list_deleted_secret_properties does not list {name}");

    // The name cannot be reused while the secret is deleted but recoverable.
    let params = SetSecretParameters { value: Some("x".into()), ..Default::default() };
    expect_http_error(
        ctx.client.set_secret(&name, params.try_into().map_err(op_err("serialise"))?, None).await,
        "set_secret on a deleted (recoverable) name",
        409,
        Some("Conflict"),
    )?;

    let rec = ctx
        .client
        .recover_deleted_secret(&name, None)
        .await
        .map_err(op_err("recover_deleted_secret"))?
        .into_model()
        .map_err(op_err("recover_deleted_secret body"))?;
    check_eq!(rec.id, del.id, "recover_deleted_secret id");
    let got = ctx.get(&name, None).await.map_err(op_err("get_secret after recover"))?;
    check_eq!(got.value.as_deref(), Some("keep-me"), "get_secret after recover value");
    expect_http_error(
        ctx.client.get_deleted_secret(&name, None).await,
        "get_deleted_secret after recover",
        404,
        Some("SecretNotFound"),
    )?;
    ctx.destroy(&name).await;
    Ok(())
}

async fn test_delete_purge(ctx: &Ctx) -> TestResult {
    let name = ctx.name("purge");
    ctx.set(&name, "gone").await?;
    ctx.client.delete_secret(&name, None).await.map_err(op_err("delete_secret"))?;
    let rsp = ctx.client.purge_deleted_secret(&name, None).await.map_err(op_err("purge_deleted_secret"))?;
    check_eq!(u16::from(rsp.status()), 204, "purge_deleted_secret status");
    expect_http_error(
        ctx.client.get_deleted_secret(&name, None).await,
        "get_deleted_secret after purge",
        404,
        Some("SecretNotFound"),
    )?;
    expect_http_error(ctx.get(&name, None).await, "get_secret after purge", 404, Some("SecretNotFound"))?;
    expect_http_error(
        ctx.client.purge_deleted_secret(&name, None).await,
        "purge_deleted_secret twice",
        404,
        Some("SecretNotFound"),
    )?;
    // The name is free again.
    let s = ctx.set(&name, "reborn").await?;
    ctx.check_versioned_id(&s, &name, "set_secret after purge")?;
    let got = ctx.get(&name, None).await.map_err(op_err("get_secret after re-create"))?;
    check_eq!(got.value.as_deref(), Some("reborn"), "value after re-create");
    ctx.destroy(&name).await;
    Ok(())
}

async fn test_backup_restore(ctx: &Ctx) -> TestResult {
    let name = ctx.name("backup");
    let s1 = ctx.set(&name, "old-value").await?;
    let v1 = ctx.check_versioned_id(&s1, &name, "set_secret #1")?;
    let s2 = ctx.set(&name, "new-value").await?;
    let v2 = ctx.check_versioned_id(&s2, &name, "set_secret #2")?;

    let backup = ctx
        .client
        .backup_secret(&name, None)
        .await
        .map_err(op_err("backup_secret"))?
        .into_model()
        .map_err(op_err("backup_secret body (base64url)"))?;
    let blob = backup.value.ok_or("backup_secret: no value")?;
    check!(!blob.is_empty(), "backup_secret: empty blob");

    ctx.client.delete_secret(&name, None).await.map_err(op_err("delete_secret"))?;
    ctx.client.purge_deleted_secret(&name, None).await.map_err(op_err("purge_deleted_secret"))?;
    expect_http_error(
        ctx.get(&name, None).await,
        "get_secret after delete+purge",
        404,
        Some("SecretNotFound"),
    )?;

    let params = RestoreSecretParameters { secret_backup: Some(blob.clone()) };
    let restored = ctx
        .client
        .restore_secret(params.try_into().map_err(op_err("serialise"))?, None)
        .await
        .map_err(op_err("restore_secret"))?
        .into_model()
        .map_err(op_err("restore_secret body"))?;
    let rv = ctx.check_versioned_id(&restored, &name, "restore_secret")?;
    check_eq!(rv, v2, "restore_secret: version of the restored latest secret");

    let got = ctx.get(&name, None).await.map_err(op_err("get_secret after restore"))?;
    check_eq!(got.value.as_deref(), Some("new-value"), "get_secret(latest) after restore value");
    let old = ctx.get(&name, Some(&v1)).await.map_err(op_err("get_secret(v1) after restore"))?;
    check_eq!(old.value.as_deref(), Some("old-value"), "get_secret(v1) after restore value");
    ctx.destroy(&name).await;
    Ok(())
}

async fn test_error_cases(ctx: &Ctx) -> TestResult {
    let missing = ctx.name("missing");
    let e =
        expect_http_error(ctx.get(&missing, None).await, "get_secret(missing)", 404, Some("SecretNotFound"))?;
    check!(
        e.message.as_deref().is_some_and(|m| !m.is_empty()),
        "get_secret(missing): error.message is empty: {e:?}"
    );
    expect_http_error(
        ctx.get(&missing, Some("00000000000000000000000000000000")).await,
        "get_secret(missing, version)",
        404,
        Some("SecretNotFound"),
    )?;
    expect_http_error(
        ctx.client.get_deleted_secret(&missing, None).await,
        "get_deleted_secret(missing)",
        404,
        Some("SecretNotFound"),
    )?;
    expect_http_error(
        ctx.client.delete_secret(&missing, None).await,
        "delete_secret(missing)",
        404,
        Some("SecretNotFound"),
    )?;

    // A missing version of an existing secret.
    let name = ctx.name("errs");
    ctx.set(&name, "x").await?;
    expect_http_error(
        ctx.get(&name, Some("0123456789abcdef0123456789abcdef")).await,
        "get_secret(existing name, missing version)",
        404,
        Some("SecretNotFound"),
    )?;
    ctx.destroy(&name).await;

    // Invalid names: only [0-9A-Za-z-], 1..=127 characters.
    for (label, bad) in [("underscore", "bad_name".to_string()), ("128 characters", "a".repeat(128))] {
        let params = SetSecretParameters { value: Some("x".into()), ..Default::default() };
        let e = expect_http_error(
            ctx.client.set_secret(&bad, params.try_into().map_err(op_err("serialise"))?, None).await,
            &format!("set_secret with an invalid name ({label})"),
            400,
            None,
        )?;
        check!(e.code.is_some(), "set_secret invalid name ({label}): 400 without error.code");
        println!("  note: invalid name ({label}) -> 400 {:?}", e.code);
    }
    // 127 characters is the maximum and is accepted.
    let longest = format!("{}-{}", ctx.run, "b".repeat(126 - ctx.run.len()));
    check_eq!(longest.len(), 127, "test bug: name length");
    ctx.set(&longest, "long").await?;
    ctx.destroy(&longest).await;
    Ok(())
}

async fn test_challenge_scope(ctx: &Ctx) -> TestResult {
    let calls = ctx.credential.scopes.lock().unwrap().clone();
    check!(!calls.is_empty(), "the credential was never asked for a token");
    for c in &calls {
        check_eq!(c, &vec![ctx.expected_scope.clone()], "scopes the SDK asked the credential for");
    }
    println!("  note: {} token request(s), scope {:?}", calls.len(), ctx.expected_scope);
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Main
// ------------------------------------------------------------------------------------------------

fn env_required(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => {
            eprintln!("error: environment variable {name} is required");
            println!("0 passed, 1 failed");
            std::process::exit(2);
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // reqwest is built with `rustls-no-provider` (to avoid compiling aws-lc-rs); use rustls' ring provider.
    let _ = rustls::crypto::ring::default_provider().install_default();

    // `coffer-compat-rust identity-client KIND`: the workload of the identity tests (see identity.rs).
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(identity::CLIENT_ARG) {
        let kind = args.get(2).cloned().unwrap_or_default();
        std::process::exit(identity::client_main(&kind).await);
    }

    let vault = env_required("AZURE_KEYVAULT_URL").trim_end_matches('/').to_string();
    let token = env_required("COFFER_TOKEN");
    let retention_days: i64 =
        std::env::var("COFFER_RETENTION_DAYS").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    if std::env::var_os("SSL_CERT_FILE").is_none() && std::env::var_os("SSL_CERT_DIR").is_none() {
        eprintln!(
            "warning: neither SSL_CERT_FILE nor SSL_CERT_DIR is set; relying on the system trust store"
        );
    }

    let url = match Url::parse(&vault) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("error: AZURE_KEYVAULT_URL {vault:?} is not a URL: {e}");
            println!("0 passed, 1 failed");
            std::process::exit(2);
        }
    };
    // The challenge resource is the parent zone with the same port: https://<zone>:<port>/.default.
    let host = url.host_str().unwrap_or_default();
    let zone = host.split_once('.').map(|(_, z)| z).unwrap_or(host);
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let expected_scope = format!("https://{zone}{port}/.default");

    let credential = Arc::new(StaticTokenCredential { token, scopes: Mutex::new(Vec::new()) });
    let client = match SecretClient::new(&vault, credential.clone(), None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: SecretClient::new failed: {}", describe(&e));
            println!("0 passed, 1 failed");
            std::process::exit(1);
        }
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let run = format!("{:08x}", (nanos as u64 ^ ((std::process::id() as u64) << 32)) & 0xffff_ffff);
    let ctx = Ctx { client, credential, vault: vault.clone(), expected_scope, retention_days, run };
    println!("coffer-compat-rust: azure_security_keyvault_secrets 1.x against {vault} (run {})", ctx.run);

    let filter = std::env::var("COMPAT_FILTER").unwrap_or_default();
    let (mut passed, mut failed, mut skipped) = (0usize, 0usize, 0usize);

    // Connectivity first: TLS trust, name resolution, challenge and token. On a transport-level failure the
    // SDK's default retry policy backs off for over a minute per call, so stop here instead of timing out
    // every test.
    match ctx.get(&ctx.name("preflight"), None).await {
        Err(e) if e.http_status().is_some_and(|s| u16::from(s) == 404) => {
            passed += 1;
            println!("PASS connect (TLS + challenge + token; get of a missing secret -> 404)");
        }
        Err(e) => {
            println!("FAIL connect: get_secret of a missing secret: {}", describe(&e));
            if e.http_status().is_none() {
                println!("(transport error: not running the other tests; check SSL_CERT_FILE and that the vault host resolves)");
                println!("{passed} passed, {} failed", failed + 1);
                std::process::exit(1);
            }
            failed += 1;
        }
        Ok(_) => {
            println!("FAIL connect: get_secret of a secret that was never created succeeded");
            failed += 1;
        }
    }
    let mut ran = 0usize;
    macro_rules! run {
        ($name:literal, $f:path) => {
            if filter.is_empty() || $name.contains(filter.as_str()) {
                ran += 1;
                let start = Instant::now();
                match $f(&ctx).await {
                    Ok(()) => {
                        passed += 1;
                        println!("PASS {} ({:.2}s)", $name, start.elapsed().as_secs_f64());
                    }
                    Err(e) if e.starts_with(SKIP_PREFIX) => {
                        skipped += 1;
                        println!("SKIP {}: {}", $name, &e[SKIP_PREFIX.len()..]);
                    }
                    Err(e) => {
                        failed += 1;
                        println!("FAIL {}: {}", $name, e);
                    }
                }
            }
        };
    }
    run!("set_and_get", test_set_and_get);
    run!("new_version", test_new_version);
    run!("update_disable_enable", test_update_disable_enable);
    run!("list_paging", test_list_paging);
    run!("list_versions", test_list_versions);
    run!("list_versions_missing_secret", test_list_versions_missing);
    run!("delete_recover", test_delete_recover);
    run!("delete_purge", test_delete_purge);
    run!("backup_restore", test_backup_restore);
    run!("error_cases", test_error_cases);
    run!("challenge_scope", test_challenge_scope);
    // Identity: official azure_identity credentials in child processes (identity.rs).
    run!("identity_managed_identity_bound_uid", identity::test_mi_bound_uid);
    run!("identity_managed_identity_unbound_uid_refused", identity::test_mi_unbound_uid);
    run!("identity_managed_identity_bound_uid_and_exe", identity::test_mi_bound_uid_exe);
    run!("identity_managed_identity_other_exe_refused", identity::test_mi_bound_uid_other_exe);
    run!("identity_client_secret", identity::test_client_secret);
    run!("identity_client_secret_wrong_refused", identity::test_client_secret_wrong);
    run!("identity_workload_identity", identity::test_workload_identity);
    run!("identity_workload_identity_untrusted_refused", identity::test_workload_identity_untrusted);
    run!("identity_revoke_managed_identity_role_removed_403", identity::test_mi_role_removed);
    run!("identity_revoke_managed_identity_disabled_401", identity::test_mi_disabled);
    run!("identity_revoke_client_secret_role_removed_403", identity::test_client_secret_role_removed);
    run!("identity_revoke_workload_identity_disabled_401", identity::test_workload_identity_disabled);

    if ran == 0 {
        println!("no test matched COMPAT_FILTER={filter:?}");
        failed += 1;
    }
    if skipped > 0 {
        println!("{passed} passed, {failed} failed, {skipped} skipped");
    } else {
        println!("{passed} passed, {failed} failed");
    }
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
