//! The HTTP layer. One listener serves every host of the zone; the `Host` header picks the
//! handler:
//!
//! * `<vault>.<zone>`: the Key Vault secrets data plane ([`keyvault`]),
//! * `<zone>`: Coffer's admin API and health check ([`admin`]),
//! * `login.<zone>`: reserved for the token service.
//!
//! Every request runs the same pipeline: authenticate (401 + challenge before anything else is
//! looked at, including the body), authorize (one call to `coffer_core::authz::authorize`),
//! execute, respond. Every response carries `x-ms-request-id`.

mod admin;
mod directory;
mod error;
mod identity;
mod keyvault;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use coffer_core::authz::Principal;
use coffer_store::Store;
pub use error::ApiError;
pub use identity::FederationKeys;

use crate::directory::Directory;
use crate::keyring::Keyring;
use crate::tokens::TokenAuthority;
use crate::vaults::VaultService;

/// Shared state of the HTTP layer.
pub struct AppState {
    pub zone: String,
    /// The port clients use (part of the audience and of every URL the server writes).
    pub public_port: u16,
    pub challenge: HeaderValue,
    pub tokens: TokenAuthority,
    pub vaults: VaultService,
    pub directory: Directory,
    pub federation_keys: FederationKeys,
    pub keyring: Arc<Keyring>,
    pub store: Arc<dyn Store>,
}

impl AppState {
    /// `https://<zone>[:port]`, the audience of access tokens and the challenge's resource.
    pub fn resource(zone: &str, port: u16) -> String {
        with_port(format!("https://{zone}"), port)
    }

    /// `https://login.<zone>[:port]/<tenant>`, the authority named in the challenge.
    pub fn authority(zone: &str, port: u16, tenant: &str) -> String {
        format!("{}/{tenant}", with_port(format!("https://login.{zone}"), port))
    }

    pub fn challenge_header(zone: &str, port: u16, tenant: &str) -> HeaderValue {
        let value = format!(
            "Bearer authorization=\"{}\", resource=\"{}\"",
            Self::authority(zone, port, tenant),
            Self::resource(zone, port)
        );
        // Invariant: zone and tenant are validated DNS labels / UUIDs, so the value is ASCII.
        HeaderValue::from_str(&value).expect("challenge header is ASCII")
    }

    /// The URL of a vault as clients address it.
    pub fn vault_url(zone: &str, port: u16, vault: &str) -> String {
        with_port(format!("https://{vault}.{zone}"), port)
    }
}

fn with_port(base: String, port: u16) -> String {
    if port == 443 {
        base
    } else {
        format!("{base}:{port}")
    }
}

/// Which part of the server a request is for.
enum Target {
    Vault(String),
    Root,
    Login,
    Unknown,
}

/// The authority the client used: `Host` (HTTP/1.1) or the URI authority (HTTP/2).
fn request_host(req: &Request) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
}

fn target(zone: &str, host: Option<&str>) -> Target {
    let Some(host) = host else { return Target::Unknown };
    let name = host
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h);
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == zone || name == "127.0.0.1" || name == "[::1]" {
        return Target::Root;
    }
    match name.strip_suffix(zone).and_then(|p| p.strip_suffix('.')) {
        Some("login") => Target::Login,
        Some(label) if !label.is_empty() && !label.contains('.') => Target::Vault(label.to_owned()),
        _ => Target::Unknown,
    }
}

/// Peer address of the connection, put into request extensions by the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

pub fn router(state: Arc<AppState>) -> Router {
    Router::new().fallback(dispatch).with_state(state).layer(middleware::from_fn(request_id))
}

async fn dispatch(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let host = request_host(&req);
    match target(&state.zone, host.as_deref()) {
        Target::Vault(vault) => keyvault::handle(&state, vault, host.unwrap_or_default(), req).await,
        Target::Root => admin::handle(&state, req).await,
        Target::Login => identity::handle(&state, &host.unwrap_or_default(), req).await,
        Target::Unknown => {
            ApiError::not_found("NotFound", "No service is served at this host name.").into_response()
        }
    }
}

async fn request_id(req: Request, next: Next) -> Response {
    let id = uuid::Uuid::new_v4().to_string();
    let mut response = next.run(req).await;
    // Invariant: a UUID is a valid header value.
    response.headers_mut().insert("x-ms-request-id", HeaderValue::from_str(&id).expect("uuid header"));
    response
}

/// Authentication: a valid Coffer access token naming an existing, enabled principal.
/// Anything else is a 401 with the challenge the SDKs need.
async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let unauthorized = |message: &str| ApiError::unauthorized(message, state.challenge.clone());
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized("Request is missing a Bearer or PoP token."));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| unauthorized("The Authorization header is not a Bearer token."))?;
    let claims = state
        .tokens
        .verify(token)
        .map_err(|e| unauthorized(&format!("The access token is not valid: {e}.")))?;
    // The directory snapshot is current: a disabled or deleted principal fails here on the
    // very next request, whatever its token's expiry.
    let snapshot = state.directory.snapshot();
    let principal = snapshot
        .principal(&claims.oid)
        .ok_or_else(|| unauthorized("The access token's principal does not exist."))?;
    if !principal.enabled || principal.kind == coffer_core::authz::PrincipalKind::Group {
        return Err(unauthorized("The access token's principal is disabled."));
    }
    Ok(principal.clone())
}

/// Turns a denial into Key Vault's RBAC error.
pub(crate) fn forbidden_by_rbac(denial: coffer_core::authz::Denial) -> ApiError {
    ApiError::forbidden(denial.to_string()).with_inner("ForbiddenByRbac")
}

/// Reads the request body up to `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLarge",
            format!("The request body exceeds {limit} bytes."),
        )
    })
}

/// Parses the query string (keys and values percent-decoded; the JS SDK encodes `api%2Dversion`).
fn query_pairs(req: &Request) -> Vec<(String, String)> {
    req.uri().query().map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

fn query_value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// JSON response with Key Vault's content type.
fn json_response(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_map_to_targets() {
        assert!(matches!(target("localhost", Some("dev.localhost:8443")), Target::Vault(v) if v == "dev"));
        assert!(matches!(target("localhost", Some("DEV.localhost")), Target::Vault(v) if v == "dev"));
        assert!(matches!(target("localhost", Some("localhost:8443")), Target::Root));
        assert!(matches!(target("localhost", Some("login.localhost:8443")), Target::Login));
        assert!(matches!(target("localhost", Some("a.b.localhost")), Target::Unknown));
        assert!(matches!(target("localhost", Some("evil.com")), Target::Unknown));
        assert!(matches!(target("localhost", Some("xlocalhost")), Target::Unknown));
        assert!(matches!(target("localhost", None), Target::Unknown));
        assert!(
            matches!(target("vault.example.com", Some("kv1.vault.example.com")), Target::Vault(v) if v == "kv1")
        );
    }

    #[test]
    fn challenge_matches_what_the_sdks_parse() {
        let c = AppState::challenge_header("localhost", 8443, "t1");
        assert_eq!(
            c.to_str().unwrap(),
            "Bearer authorization=\"https://login.localhost:8443/t1\", resource=\"https://localhost:8443\""
        );
        let c = AppState::challenge_header("vault.example.com", 443, "t1");
        assert_eq!(
            c.to_str().unwrap(),
            "Bearer authorization=\"https://login.vault.example.com/t1\", resource=\"https://vault.example.com\""
        );
    }
}
