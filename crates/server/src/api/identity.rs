//! The token service at `login.<zone>`: OpenID configuration, JWKS, the OAuth 2.0 token
//! endpoint (client secret, federated or certificate assertion, password), and the agent
//! endpoints (join, managed-identity token brokering).
//!
//! Paths follow Entra's (`/{tenant}/v2.0/.well-known/openid-configuration`,
//! `/{tenant}/oauth2/v2.0/token`, `/{tenant}/discovery/v2.0/keys`) and AD FS's (`/adfs/…`),
//! which MSAL uses without instance discovery (protocol doc §D.3–D.4).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use coffer_agent::{BrokerError, BrokerRequest};
use coffer_core::authz::{Principal, PrincipalKind};
use coffer_core::identity::{CredentialKind, FederatedCredential};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::json;
use zeroize::Zeroizing;

use super::{read_body, AppState, AuditNote};
use crate::argon::ArgonError;
use crate::directory::CheckError;
use crate::outbound::OutboundPolicy;
use crate::tokens::unix_now;

/// An OAuth error, in Entra's shape.
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    code: u32,
    description: String,
    /// Sent as `Retry-After` (whole seconds, rounded up) with a 429.
    retry_after: Option<Duration>,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, code: u32, description: impl Into<String>) -> Self {
        Self { status, error, code, description: description.into(), retry_after: None }
    }

    /// 429 with `Retry-After`. MSAL honours both (its throttling cache waits the time given).
    fn throttled(retry_after: Duration, description: impl Into<String>) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "temporarily_unavailable", 50196, description)
        }
    }

    /// A body that could not be read (too large, or too slow: 413 or 408), in OAuth's shape.
    fn from_body(e: super::ApiError) -> Self {
        Self::new(e.status, "invalid_request", 900144, e.message)
    }

    /// A credential check that could not run: busy (429) or broken (500, details to the log).
    fn from_check(e: CheckError) -> Self {
        match e {
            CheckError::Argon(ArgonError::Busy) => Self::throttled(
                Duration::from_secs(1),
                "Too many sign-ins are being checked at once; retry in a moment.",
            ),
            other => {
                tracing::error!(error = %other, "a credential check failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    50000,
                    "The credential could not be checked.",
                )
            }
        }
    }

    fn invalid_client(description: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_client", 7000215, description)
    }

    fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", 900144, description)
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let id = uuid::Uuid::new_v4().to_string();
        let body = json!({
            "error": self.error,
            "error_description": format!("AADSTS{}: {}", self.code, self.description),
            "error_codes": [self.code],
            "timestamp": time_text(),
            "trace_id": id,
            "correlation_id": id,
        });
        let mut response = json_ok(self.status, body);
        if let Some(wait) = self.retry_after {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(secs.max(1)));
        }
        response
    }
}

/// The token service's 429 for a client that has spent its allowance of failures.
pub(super) fn throttled(wait: Duration) -> Response {
    OAuthError::throttled(
        wait,
        "Too many requests from this address failed; retry after the time in Retry-After.",
    )
    .into_response()
}

fn time_text() -> String {
    unix_now().to_string()
}

fn json_ok(status: StatusCode, body: serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json; charset=utf-8")], body.to_string()).into_response()
}

pub(super) async fn handle(state: &Arc<AppState>, req: Request, note: &mut AuditNote) -> Response {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // Discovery documents and assertion audiences name the configured host, never `Host`.
    let base = ["https://login.", state.public_host.as_str()].concat();
    note.operation = match (req.method(), segments.as_slice()) {
        (_, [.., ".well-known", "openid-configuration"]) => "OpenIdConfiguration",
        (_, [.., "keys"]) => "Jwks",
        (_, ["common", "discovery", "instance"]) => "InstanceDiscovery",
        (_, [.., "token"]) if segments.first() != Some(&"coffer") => "TokenIssue",
        (_, ["coffer", "agents", "join"]) => "AgentJoin",
        (_, ["coffer", "agents", "token"]) => "ManagedIdentityTokenIssue",
        _ => "TokenServiceUnknownOperation",
    };
    let response = route_request(state, &base, &segments, req, note).await;
    response.unwrap_or_else(|e| {
        if note.denial.is_none() {
            note.deny(e.description.clone());
        }
        e.into_response()
    })
}

async fn route_request(
    state: &Arc<AppState>,
    base: &str,
    segments: &[&str],
    req: Request,
    note: &mut AuditNote,
) -> Result<Response, OAuthError> {
    let base = base.to_owned();
    let base = base.as_str();
    Ok(match (req.method().clone(), segments) {
        (Method::GET, ["adfs", ".well-known", "openid-configuration"]) => json_ok(
            StatusCode::OK,
            openid_configuration(state, base, "adfs", "/adfs/oauth2/token", "/adfs/discovery/keys"),
        ),
        (Method::GET, [tenant, "v2.0", ".well-known", "openid-configuration"]) => {
            let token = format!("/{tenant}/oauth2/v2.0/token");
            let keys = format!("/{tenant}/discovery/v2.0/keys");
            json_ok(StatusCode::OK, openid_configuration(state, base, tenant, &token, &keys))
        }
        (Method::GET, [_, "discovery", "v2.0", "keys"] | ["adfs", "discovery", "keys"]) => {
            json_ok(StatusCode::OK, state.tokens.jwks())
        }
        (Method::GET, ["common", "discovery", "instance"]) => json_ok(
            StatusCode::OK,
            json!({
                "tenant_discovery_endpoint": format!("{base}/{}/v2.0/.well-known/openid-configuration", state.tokens.tenant()),
                "api-version": "1.1",
                "metadata": [],
            }),
        ),
        (Method::POST, ["coffer", "agents", "join"]) => agent_join(state, req, note).await?,
        (Method::POST, ["coffer", "agents", "token"]) => agent_token(state, req, note).await?,
        (Method::POST, [tenant, "oauth2", "v2.0", "token"] | [tenant, "oauth2", "token"]) => {
            token_endpoint(state, tenant, req, note).await?
        }
        _ => {
            return Err(OAuthError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                90002,
                "No such endpoint at the token service.",
            ))
        }
    })
}

fn openid_configuration(
    state: &AppState,
    base: &str,
    tenant: &str,
    token_path: &str,
    keys_path: &str,
) -> serde_json::Value {
    let issuer = if tenant == "adfs" { format!("{base}/adfs") } else { state.tokens.issuer().to_owned() };
    json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{base}/{tenant}/oauth2/v2.0/authorize"),
        "token_endpoint": format!("{base}{token_path}"),
        "jwks_uri": format!("{base}{keys_path}"),
        "response_types_supported": ["token"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
        "grant_types_supported": ["client_credentials", "password"],
        "tenant_region_scope": null,
    })
}

async fn form(req: Request) -> Result<Vec<(String, Zeroizing<String>)>, OAuthError> {
    let body = read_body(req.into_body(), 1024 * 1024).await.map_err(OAuthError::from_body)?;
    Ok(parse_form(&Zeroizing::new(body.to_vec())))
}

/// Decodes an `application/x-www-form-urlencoded` body; values (credentials) are zeroized on drop.
pub fn parse_form(body: &[u8]) -> Vec<(String, Zeroizing<String>)> {
    form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), Zeroizing::new(v.into_owned()))).collect()
}

fn field<'a>(form: &'a [(String, Zeroizing<String>)], key: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
}

async fn token_endpoint(
    state: &Arc<AppState>,
    tenant: &str,
    req: Request,
    note: &mut AuditNote,
) -> Result<Response, OAuthError> {
    // This server is one tenant; `adfs` is the alias the SDKs use to skip instance discovery.
    if tenant != state.tokens.tenant() && tenant != "adfs" {
        return Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_tenant",
            90002,
            format!("Tenant '{tenant}' not found; this server's tenant is '{}'.", state.tokens.tenant()),
        ));
    }
    let form = form(req).await?;
    // Traceable to the credential without recording it.
    let credential =
        field(&form, "client_secret").or(field(&form, "client_assertion")).or(field(&form, "password"));
    if let (Some(audit), Some(c)) = (&state.audit, credential) {
        note.credential_hmac = Some(audit.hmac(c.as_bytes()));
    }
    let scope = field(&form, "scope").unwrap_or_default();
    let resource = scope.split_whitespace().find_map(|s| s.strip_suffix("/.default")).ok_or_else(|| {
        OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            70011,
            "The scope must be '<resource>/.default'.",
        )
    })?;
    if resource.trim_end_matches('/') != state.tokens.audience() {
        return Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            500011,
            format!(
                "The resource principal named {resource} was not found; this server serves {}.",
                state.tokens.audience()
            ),
        ));
    }
    let principal = match field(&form, "grant_type") {
        Some("client_credentials") => client_credentials(state, &form).await?,
        Some("password") => password_grant(state, &form).await?,
        Some(other) => {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                format!("The grant type '{other}' is not supported."),
            ))
        }
        None => return Err(OAuthError::invalid_request("The request body must contain 'grant_type'.")),
    };
    let lifetime = state.tokens.lifetime_secs();
    let (token, _) = state.tokens.issue(&principal.object_id, lifetime);
    tracing::info!(principal = %principal.display_name, kind = principal.kind.as_str(), "issued an access token");
    note.principal = Some(Arc::new(principal.clone()));
    Ok(json_ok(
        StatusCode::OK,
        json!({ "token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token }),
    ))
}

fn usable(principal: Option<&Principal>, kinds: &[PrincipalKind]) -> Option<Principal> {
    principal.filter(|p| p.enabled && kinds.contains(&p.kind)).cloned()
}

async fn client_credentials(
    state: &Arc<AppState>,
    form: &[(String, Zeroizing<String>)],
) -> Result<Principal, OAuthError> {
    let client_id =
        field(form, "client_id").ok_or_else(|| OAuthError::invalid_request("client_id is required."))?;
    let snapshot = state.directory.snapshot();
    let unknown = || {
        OAuthError::invalid_client(format!(
            "Application with identifier '{client_id}' was not found or is disabled."
        ))
    };
    let principal =
        usable(snapshot.by_client_id(client_id), &[PrincipalKind::ServicePrincipal, PrincipalKind::Agent])
            .ok_or_else(unknown)?;
    if let Some(secret) = field(form, "client_secret") {
        let ok = state
            .directory
            .verify_secret(&principal.object_id, CredentialKind::ClientSecret, secret)
            .await
            .map_err(OAuthError::from_check)?;
        return match ok {
            Some(_) => Ok(principal),
            None => Err(OAuthError::invalid_client("Invalid client secret provided.")),
        };
    }
    if let Some(assertion) = field(form, "client_assertion") {
        if field(form, "client_assertion_type")
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        {
            return Err(OAuthError::invalid_request("client_assertion_type must be jwt-bearer."));
        }
        return verify_assertion(state, &principal, assertion).await.map(|_| principal);
    }
    Err(OAuthError::new(
        StatusCode::BAD_REQUEST,
        "invalid_client",
        7000216,
        "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type.",
    ))
}

async fn password_grant(
    state: &Arc<AppState>,
    form: &[(String, Zeroizing<String>)],
) -> Result<Principal, OAuthError> {
    let username =
        field(form, "username").ok_or_else(|| OAuthError::invalid_request("username is required."))?;
    let password =
        field(form, "password").ok_or_else(|| OAuthError::invalid_request("password is required."))?;
    if let Err(wait) = state.sign_in_delays.check(username, Instant::now()) {
        return Err(OAuthError::throttled(
            wait,
            "Too many failed sign-ins for this name; retry after the time in Retry-After.",
        ));
    }
    let snapshot = state.directory.snapshot();
    let bad =
        || OAuthError::new(StatusCode::BAD_REQUEST, "invalid_grant", 50126, "Invalid username or password.");
    // An unknown or disabled name costs the same Argon2 work as a known one and answers alike.
    let user = usable(snapshot.resolve(username), &[PrincipalKind::User]);
    let matched = match &user {
        Some(user) => {
            state.directory.verify_secret(&user.object_id, CredentialKind::Password, password).await
        }
        None => state.directory.verify_unknown(password).await,
    }
    .map_err(OAuthError::from_check)?;
    match (user, matched) {
        (Some(user), Some(_)) => {
            state.sign_in_delays.succeeded(username);
            Ok(user)
        }
        _ => {
            if let Some(delay) = state.sign_in_delays.failed(username, Instant::now()) {
                tracing::warn!(
                    delay_secs = delay.as_secs(),
                    "repeated failed sign-ins for one name: delaying it"
                );
            }
            Err(bad())
        }
    }
}

/// Algorithms accepted for assertions: asymmetric only (never HS*, never none).
const ASSERTION_ALGORITHMS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
];

#[derive(Deserialize)]
struct UnverifiedClaims {
    iss: Option<String>,
}

/// Leeway for clock differences on `exp`, `nbf` and `iat`.
const ASSERTION_LEEWAY_SECS: u64 = 60;

/// Longest life of a certificate assertion: MSAL signs them for 10 minutes.
const CERTIFICATE_ASSERTION_MAX_LIFETIME_SECS: u64 = 600;

/// The time claims of a verified assertion. The signature check (jsonwebtoken) has validated
/// `exp` and `nbf` against the clock; the lifetime bound is checked here.
#[derive(Deserialize)]
struct TimeClaims {
    #[serde(deserialize_with = "numeric_date")]
    exp: u64,
    #[serde(default, deserialize_with = "optional_numeric_date")]
    iat: Option<u64>,
    jti: Option<String>,
}

/// A NumericDate: MSAL Python writes `exp` and `iat` as fractional seconds (`time.time()`);
/// jsonwebtoken's own `exp`/`nbf` checks truncate them the same way.
fn numeric_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    n.as_u64()
        .or_else(|| {
            n.as_f64().filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64).map(|f| f as u64)
        })
        .ok_or_else(|| serde::de::Error::custom("a date is a non-negative number of seconds"))
}

fn optional_numeric_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    numeric_date(d).map(Some)
}

impl TimeClaims {
    /// Refuses an assertion that lives longer than `max` (from now, and from its `iat`), or whose
    /// `iat` is in the future: a long-lived assertion is as good as a stored secret.
    fn check_lifetime(&self, max: u64, now: u64) -> Result<(), String> {
        let limit = max + ASSERTION_LEEWAY_SECS;
        if self.exp.saturating_sub(now) > limit {
            return Err(format!("it expires more than {max} seconds from now; sign a short-lived one"));
        }
        if let Some(iat) = self.iat {
            if iat > now + ASSERTION_LEEWAY_SECS {
                return Err("it was issued in the future ('iat'); check the signer's clock".into());
            }
            if self.exp.saturating_sub(iat) > limit {
                return Err(format!("it is valid for more than {max} seconds ('exp' - 'iat')"));
            }
        }
        Ok(())
    }
}

/// The validation every assertion gets: one algorithm, `exp` and `nbf` checked with leeway.
fn assertion_validation(alg: Algorithm, issuer: &str, audiences: &[String], subject: &str) -> Validation {
    let mut v = Validation::new(alg);
    v.algorithms = vec![alg];
    v.set_issuer(&[issuer]);
    v.set_audience(audiences);
    v.sub = Some(subject.to_owned());
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    v.validate_exp = true;
    v.validate_nbf = true;
    v.leeway = ASSERTION_LEEWAY_SECS;
    v
}

/// An assertion's header and issuer, read before any signature is checked: they pick the key to
/// check it with. `Err` says what is wrong (for "The client assertion is not valid: …").
pub fn peek_assertion(assertion: &str) -> Result<(jsonwebtoken::Header, String), &'static str> {
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| "it is not a JWT")?;
    if !ASSERTION_ALGORITHMS.contains(&header.alg) {
        return Err("its algorithm is not accepted");
    }
    let mut peek = Validation::new(header.alg);
    peek.insecure_disable_signature_validation();
    peek.validate_exp = false;
    peek.validate_aud = false;
    peek.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<UnverifiedClaims>(assertion, &DecodingKey::from_secret(&[]), &peek)
        .map_err(|_| "its claims cannot be read")?
        .claims;
    let issuer = claims.iss.ok_or("it has no issuer")?;
    Ok((header, issuer))
}

/// A client assertion: signed with a registered certificate's key (`iss` = client id), or a
/// federated token from an outside issuer trusted for this principal.
async fn verify_assertion(
    state: &Arc<AppState>,
    principal: &Principal,
    assertion: &str,
) -> Result<(), OAuthError> {
    let bad = |why: &str| OAuthError::invalid_client(format!("The client assertion is not valid: {why}."));
    let (header, issuer) = peek_assertion(assertion).map_err(bad)?;
    if issuer == principal.client_id {
        return verify_certificate_assertion(state, principal, assertion, header.alg).await;
    }
    let snapshot = state.directory.snapshot();
    let candidates: Vec<&FederatedCredential> = snapshot
        .federated
        .iter()
        .filter(|f| f.principal_id == principal.object_id && f.issuer == issuer)
        .collect();
    if candidates.is_empty() {
        return Err(bad(&format!("no federated credential trusts issuer '{issuer}' for this client")));
    }
    // Every credential trusting this issuer is tried (they differ in subject, audience or keys);
    // the first that verifies the token wins. Federated tokens are not single use: the issuer
    // writes one token to a file that the SDKs re-read until it is rotated (as Entra accepts).
    let mut last = String::from("no key of the issuer matches its key id");
    for fc in candidates {
        let jwks = match state.federation_keys.keys(fc, &state.outbound).await {
            Ok(jwks) => jwks,
            Err(e) => {
                last = e;
                continue;
            }
        };
        let jwk = match &header.kid {
            Some(kid) => jwks.find(kid),
            None if jwks.keys.len() == 1 => jwks.keys.first(),
            None => None,
        };
        let Some(jwk) = jwk else { continue };
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            last = "the issuer's key cannot be used".into();
            continue;
        };
        let v = assertion_validation(header.alg, &fc.issuer, std::slice::from_ref(&fc.audience), &fc.subject);
        match jsonwebtoken::decode::<TimeClaims>(assertion, &key, &v) {
            Ok(data) => {
                return data
                    .claims
                    .check_lifetime(state.federated_token_max_lifetime_secs, unix_now())
                    .map_err(|e| bad(&e))
            }
            Err(e) => {
                tracing::info!(issuer = %fc.issuer, credential = %fc.id, error = %e, "federated assertion rejected");
                last = e.to_string();
            }
        }
    }
    Err(bad(&last))
}

/// This server's token endpoint URLs, from its configuration (never from the request): the
/// audiences a certificate assertion may name. MSAL names the token endpoint of the OpenID
/// configuration (Entra v2 or AD FS form); other clients the v2 form of their tenant.
fn token_endpoint_urls(state: &AppState) -> Vec<String> {
    let login = AppState::resource(&format!("login.{}", state.zone), state.public_port);
    // The same base as the OpenID configuration's token_endpoint, which MSAL signs for.
    let mut urls = Vec::new();
    for tenant in [state.tokens.tenant(), "adfs"] {
        for path in ["oauth2/v2.0/token", "oauth2/token"] {
            let url = format!("{login}/{tenant}/{path}");
            if !urls.contains(&url) {
                urls.push(url);
            }
        }
    }
    urls
}

/// A client assertion signed with the key of a certificate registered for the principal:
/// `iss` = `sub` = client id, `aud` = this token endpoint, at most 10 minutes of life, and used
/// once (`jti` remembered until it expires).
async fn verify_certificate_assertion(
    state: &Arc<AppState>,
    principal: &Principal,
    assertion: &str,
    alg: Algorithm,
) -> Result<(), OAuthError> {
    let bad = |why: String| OAuthError::invalid_client(format!("The client assertion is not valid: {why}."));
    let now = unix_now();
    let certs = state
        .directory
        .store()
        .credentials(&principal.object_id, CredentialKind::Certificate)
        .await
        .map_err(|e| {
            OAuthError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", 50000, e.to_string())
        })?;
    if certs.is_empty() {
        return Err(bad("no certificate is registered for this client".into()));
    }
    let audiences = token_endpoint_urls(state);
    let v = assertion_validation(alg, &principal.client_id, &audiences, &principal.client_id);
    let mut last = String::from("no registered certificate verifies it");
    let mut verified = None;
    for cert in certs.iter().filter(|c| c.expires.is_none_or(|e| e > now as i64)) {
        let Ok((key, _)) = crate::directory::certificate_key(&cert.material) else { continue };
        match jsonwebtoken::decode::<TimeClaims>(assertion, &key, &v) {
            Ok(data) => {
                verified = Some(data.claims);
                break;
            }
            Err(e) => {
                last = match e.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidAudience => {
                        format!("its audience must be this server's token endpoint, {}", audiences[0])
                    }
                    _ => e.to_string(),
                }
            }
        }
    }
    let claims = verified.ok_or_else(|| bad(last))?;
    claims.check_lifetime(CERTIFICATE_ASSERTION_MAX_LIFETIME_SECS, now).map_err(bad)?;
    let jti = claims
        .jti
        .as_deref()
        .filter(|j| !j.is_empty())
        .ok_or_else(|| bad("it has no 'jti'; each assertion needs a unique id".into()))?;
    if jti.len() > crate::replay::MAX_JTI_LEN {
        return Err(bad("its 'jti' is too long".into()));
    }
    // Remembered past `exp` by the leeway, as long as verification would still accept it.
    match state.assertion_ids.first_use(&principal.client_id, jti, claims.exp + ASSERTION_LEEWAY_SECS, now) {
        Ok(()) => Ok(()),
        Err(crate::replay::Refusal::Replayed) => {
            Err(bad("it was used before; sign a new assertion for each token request".into()))
        }
        Err(crate::replay::Refusal::Full) => Err(OAuthError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            50001,
            "Too many client assertions are in use; retry in a minute.",
        )),
    }
}

/// The issuers' signing keys: inline JWKS documents, or fetched from a JWKS URL and cached.
#[derive(Default)]
pub struct FederationKeys {
    cache: tokio::sync::Mutex<std::collections::HashMap<String, (Instant, jsonwebtoken::jwk::JwkSet)>>,
}

const JWKS_CACHE_TTL: Duration = Duration::from_secs(300);

impl FederationKeys {
    async fn keys(
        &self,
        fc: &FederatedCredential,
        outbound: &Arc<OutboundPolicy>,
    ) -> Result<jsonwebtoken::jwk::JwkSet, String> {
        if let Some(inline) = &fc.jwks {
            return serde_json::from_str(inline).map_err(|e| format!("the configured JWKS is invalid: {e}"));
        }
        let url = fc.jwks_url.as_deref().ok_or("the federated credential has no keys configured")?;
        if let Some((at, set)) = self.cache.lock().await.get(url) {
            if at.elapsed() < JWKS_CACHE_TTL {
                return Ok(set.clone());
            }
        }
        // Only where the outbound policy allows, and no redirects: the issuer's JWKS URL is
        // exactly the one registered.
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("the JWKS URL {url} is invalid: {e}"))?;
        outbound.check_url(&parsed).map_err(|e| format!("cannot fetch the issuer's keys from {url}: {e}"))?;
        let http =
            outbound.client_builder().timeout(Duration::from_secs(10)).build().map_err(|e| e.to_string())?;
        let response = http.get(parsed).send().await.map_err(|e| {
            format!("cannot fetch the issuer's keys from {url}: {}", crate::events::error_chain(&e))
        })?;
        if response.status().is_redirection() {
            return Err(format!(
                "the issuer's JWKS URL {url} redirects ({}); register the final URL",
                response.status()
            ));
        }
        let set: jsonwebtoken::jwk::JwkSet = response
            .error_for_status()
            .map_err(|e| format!("cannot fetch the issuer's keys from {url}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("the issuer's JWKS at {url} is invalid: {e}"))?;
        self.cache.lock().await.insert(url.to_owned(), (Instant::now(), set.clone()));
        Ok(set)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JoinRequest {
    join_token: Zeroizing<String>,
}

/// Redeems a one-time join token for an agent's node credential.
async fn agent_join(
    state: &Arc<AppState>,
    req: Request,
    note: &mut AuditNote,
) -> Result<Response, OAuthError> {
    let body = read_body(req.into_body(), 64 * 1024).await.map_err(OAuthError::from_body)?;
    let join: JoinRequest = serde_json::from_slice(&body)
        .map_err(|_| OAuthError::invalid_request("expected {\"joinToken\": \"…\"}"))?;
    let refused = || OAuthError::invalid_client("The join token is invalid, expired or already used.");
    let id = join
        .join_token
        .strip_prefix("cfj_")
        .and_then(|r| r.split_once('.'))
        .map(|(id, _)| id)
        .ok_or_else(refused)?;
    let directory = &state.directory;
    let record =
        directory.store().credential(id).await.ok().flatten().filter(|r| r.kind == CredentialKind::JoinToken);
    let record = record.ok_or_else(refused)?;
    let verified = directory
        .verify_secret(&record.principal_id, CredentialKind::JoinToken, &join.join_token)
        .await
        .map_err(OAuthError::from_check)?;
    // One use only: whoever deletes the row wins.
    if verified.is_none() || !directory.store().take_credential(id).await.unwrap_or(false) {
        return Err(refused());
    }
    let snapshot = directory.snapshot();
    let agent =
        usable(snapshot.principal(&record.principal_id), &[PrincipalKind::Agent]).ok_or_else(refused)?;
    let issued =
        directory.add_secret(&agent.object_id, CredentialKind::ClientSecret, None).await.map_err(|e| {
            OAuthError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", 50000, e.to_string())
        })?;
    tracing::info!(agent = %agent.display_name, "agent joined");
    note.principal = Some(Arc::new(agent.clone()));
    Ok(json_ok(
        StatusCode::OK,
        json!({
            "agent_id": agent.object_id,
            "client_id": agent.client_id,
            "client_secret": issued.secret.as_str(),
            "tenant_id": state.tokens.tenant(),
            "resource": state.tokens.audience(),
        }),
    ))
}

/// A joined agent asks for a workload's token, with the facts it attested.
async fn agent_token(
    state: &Arc<AppState>,
    req: Request,
    note: &mut AuditNote,
) -> Result<Response, OAuthError> {
    let principal = super::authenticate(state, req.headers(), note)
        .await
        .map_err(|e| OAuthError::invalid_client(e.message))?;
    if principal.kind != PrincipalKind::Agent {
        return Err(OAuthError::new(
            StatusCode::FORBIDDEN,
            "unauthorized_client",
            700016,
            "Only agents may broker tokens.",
        ));
    }
    let body = read_body(req.into_body(), 64 * 1024).await.map_err(OAuthError::from_body)?;
    let request: BrokerRequest = serde_json::from_slice(&body)
        .map_err(|e| OAuthError::invalid_request(format!("bad request: {e}")))?;
    note.agent = Some(principal.display_name.clone());
    note.process = Some(request.process.clone());
    match crate::broker::issue_for_agent(state, &principal.object_id, &request) {
        Ok(token) => {
            note.grant = Some(format!("managed identity {} bound to this agent", token.client_id));
            Ok(json_ok(StatusCode::OK, serde_json::to_value(&token).expect("token serializes")))
        }
        Err(BrokerError::NotBound(msg)) => {
            Err(OAuthError::new(StatusCode::FORBIDDEN, "forbidden", 700017, msg))
        }
        Err(BrokerError::BadRequest(msg)) => Err(OAuthError::invalid_request(msg)),
        Err(BrokerError::Unavailable(msg)) => {
            Err(OAuthError::new(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", 50001, msg))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(text: &str) -> TimeClaims {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn assertion_lifetimes_are_bounded_from_now_and_from_iat() {
        let now = 1_000_000;
        let ok = claims(r#"{"exp": 1000600, "iat": 1000000}"#);
        assert_eq!(ok.check_lifetime(600, now), Ok(()));
        // Leeway for a signer whose clock runs a little ahead.
        assert_eq!(claims(r#"{"exp": 1000650, "iat": 1000050}"#).check_lifetime(600, now), Ok(()));
        assert!(claims(r#"{"exp": 1000700}"#).check_lifetime(600, now).is_err(), "exp - now");
        assert!(claims(r#"{"exp": 1000100, "iat": 999000}"#).check_lifetime(600, now).is_err(), "exp - iat");
        assert!(claims(r#"{"exp": 1000600, "iat": 1000100}"#).check_lifetime(600, now).is_err(), "iat ahead");
        assert_eq!(claims(r#"{"exp": 1003600, "iat": 1000000}"#).check_lifetime(3600, now), Ok(()));
    }

    #[test]
    fn dates_may_be_fractional_but_not_negative_or_text() {
        let c = claims(r#"{"exp": 1796537313.8487697, "iat": 1796536713.5}"#);
        assert_eq!((c.exp, c.iat), (1_796_537_313, Some(1_796_536_713)));
        assert!(serde_json::from_str::<TimeClaims>(r#"{"exp": -5}"#).is_err());
        assert!(serde_json::from_str::<TimeClaims>(r#"{"exp": "1796537313"}"#).is_err());
        assert!(serde_json::from_str::<TimeClaims>(r#"{"iat": 1}"#).is_err(), "exp is required");
    }
}
