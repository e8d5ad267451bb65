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
mod events;
mod identity;
mod keyvault;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use coffer_core::authz::Principal;
use coffer_store::Store;
pub use error::ApiError;
pub use identity::FederationKeys;

/// The parsers the handlers run on what the network sends, for the fuzz targets in `fuzz/`
/// (re-exported by `crate::fuzzing`). Not an API: nothing else calls them.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::identity::{parse_form, peek_assertion};
    pub use super::keyvault::{checked_query, parse_bodies, routed_secret};
}

use crate::directory::Directory;
use crate::keyring::Keyring;
use crate::tokens::TokenAuthority;
use crate::vaults::VaultService;

/// Shared state of the HTTP layer.
pub struct AppState {
    pub zone: String,
    /// The port clients use (part of the audience and of every URL the server writes).
    pub public_port: u16,
    /// `<zone>[:<public port>]`: every URL the server writes ends its host with this, whatever
    /// `Host` the request carried.
    pub public_host: String,
    pub challenge: HeaderValue,
    pub tokens: TokenAuthority,
    pub vaults: VaultService,
    pub directory: Directory,
    pub federation_keys: FederationKeys,
    /// The `jti`s of certificate assertions already used.
    pub assertion_ids: crate::replay::AssertionIds,
    /// Where webhooks and JWKS fetches may connect.
    pub outbound: Arc<crate::outbound::OutboundPolicy>,
    /// Longest accepted life of a federated token.
    pub federated_token_max_lifetime_secs: u64,
    pub keyring: Arc<Keyring>,
    pub store: Arc<dyn Store>,
    /// `None` only when auditing was switched off (benchmarks).
    pub audit: Option<coffer_audit::AuditLog>,
    /// Delays after repeated failed password sign-ins, per name.
    pub sign_in_delays: crate::throttle::SignInDelays,
    /// The allowance of failing requests per client address.
    pub failures: crate::throttle::FailureThrottle,
    /// The allowance of requests per authenticated principal.
    pub principal_limits: crate::throttle::PrincipalThrottle,
    /// The audit disk's bounds and alarm, for `/readyz` and `/metrics`.
    pub health: crate::health::Health,
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

    /// `<zone>[:port]`, what [`AppState::public_host`] holds.
    pub fn public_host(zone: &str, port: u16) -> String {
        with_port(zone.to_owned(), port)
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
    Router::new().fallback(dispatch).with_state(state)
}

/// What a handler learned about its request, for the request's audit record.
#[derive(Default)]
pub struct AuditNote {
    /// Key Vault's operation name where one exists, else Coffer's (`VaultCreate`, `TokenIssue`…).
    pub operation: &'static str,
    pub principal: Option<Arc<Principal>>,
    pub vault: Option<String>,
    pub secret: Option<String>,
    pub version: Option<String>,
    /// The role and assignment that allowed the request.
    pub grant: Option<String>,
    /// Why it was refused.
    pub denial: Option<String>,
    /// HMAC of the bearer token or client credential used.
    pub credential_hmac: Option<String>,
    /// For managed identities: the agent and attested process (from the token, or from the
    /// agent's request).
    pub agent: Option<String>,
    pub process: Option<coffer_core::identity::ProcessFacts>,
}

impl AuditNote {
    pub fn deny(&mut self, reason: impl Into<String>) {
        self.denial = Some(reason.into());
    }
}

/// Every request: route by host, run the handler, write the audit record, then respond. A
/// request whose record cannot be written durably gets a 503 instead of its response (fail
/// closed: no secret leaves without its audit record).
async fn dispatch(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let started = std::time::Instant::now();
    let time = std::time::SystemTime::now();
    // A request id must be unique, not secret: a thread-local generator (seeded from the OS)
    // instead of a getrandom call per request.
    let request_id =
        uuid::Builder::from_random_bytes(rand::Rng::gen(&mut rand::thread_rng())).into_uuid().to_string();
    let client_ip = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
    let user_agent = req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let host = request_host(&req);
    let mut note = AuditNote::default();
    let target = target(&state.zone, host.as_deref());
    // Probes are not audited (a load balancer asks every few seconds); only on the zone's own
    // host, so that no path makes a request to a vault or the token service unaudited.
    let health_check = matches!(target, Target::Root) && matches!(req.uri().path(), "/healthz" | "/readyz");
    let login = matches!(target, Target::Login);
    // The token service reads bodies and runs Argon2 before it can tell a failure: a client
    // that has spent its allowance of failures is refused before any of that.
    if let (true, Some(ip)) = (login, client_ip) {
        if let Err(wait) = state.failures.check(ip, std::time::Instant::now()) {
            return with_request_id(throttled(wait, login), &request_id);
        }
    }
    let charged = matches!(target, Target::Login | Target::Unknown);
    let (req, unread) = keep_unread_body(req);
    let mut response = match target {
        Target::Vault(vault) => keyvault::handle(&state, vault, req, &mut note).await,
        Target::Root => admin::handle(&state, req, &mut note).await,
        Target::Login => identity::handle(&state, req, &mut note).await,
        Target::Unknown => {
            note.operation = "UnknownHost";
            ApiError::not_found("NotFound", "No service is served at this host name.").into_response()
        }
    };
    if let (Some(unread), true) = (unread, response.status().is_client_error()) {
        unread.drain().await;
    }
    // A failing request spends the client's allowance; past it, the answer is 429 and the
    // request is counted into the client's refused burst (one audit record for all of them)
    // instead of a record of its own.
    let status = response.status();
    if let (true, Some(ip)) =
        (status == StatusCode::UNAUTHORIZED || (charged && status.is_client_error()), client_ip)
    {
        if let Err(wait) = state.failures.charge(ip, std::time::Instant::now()) {
            return with_request_id(throttled(wait, login), &request_id);
        }
    }
    if let (Some(audit), false) = (&state.audit, health_check) {
        let event = audit_event(note, &response, time, started, &request_id, client_ip, user_agent);
        if let Err(e) = audit.record(event).await {
            tracing::error!(request_id = %request_id, error = %e, "audit record not durable: request refused (fail closed)");
            response = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "AuditUnavailable",
                "The request could not be recorded in the audit log, so its result is withheld. Free space or fix \
                 the audit directory, then retry.",
            )
            .into_response();
        }
    }
    with_request_id(response, &request_id)
}

/// What a refused request's client may still be sending when its answer is ready (an
/// unauthenticated PUT is answered 401 before its body is read). Left unread, HTTP/2 resets
/// the stream and clients report a framing error instead of the 401 (5 of 10 unauthenticated
/// 200 KB PUTs); so after a 4xx the rest is read and dropped, up to [`DRAIN_LIMIT`] for at
/// most [`DRAIN_TIME`].
#[derive(Clone)]
struct UnreadBody(Arc<std::sync::Mutex<Option<Body>>>);

const DRAIN_LIMIT: usize = 512 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// Gives the handler a body that reads through an [`UnreadBody`] the dispatcher keeps, unless
/// the request has no body (every GET: nothing is added to that path).
fn keep_unread_body(req: Request) -> (Request, Option<UnreadBody>) {
    use axum::body::HttpBody;
    if req.body().is_end_stream() {
        return (req, None);
    }
    let (parts, body) = req.into_parts();
    let unread = UnreadBody(Arc::new(std::sync::Mutex::new(Some(body))));
    (Request::from_parts(parts, Body::new(unread.clone())), Some(unread))
}

impl UnreadBody {
    async fn drain(self) {
        let body = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(body) = body {
            let _ = tokio::time::timeout(DRAIN_TIME, axum::body::to_bytes(body, DRAIN_LIMIT)).await;
        }
    }
}

impl axum::body::HttpBody for UnreadBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let mut slot = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match slot.as_mut() {
            Some(body) => std::pin::Pin::new(body).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }
}

fn with_request_id(mut response: Response, request_id: &str) -> Response {
    // Invariant: a UUID is a valid header value.
    response.headers_mut().insert("x-ms-request-id", HeaderValue::from_str(request_id).expect("uuid header"));
    response
}

/// 429 with `Retry-After`: Key Vault's `Throttled` error, or OAuth's shape at the token service.
fn throttled(wait: std::time::Duration, oauth: bool) -> Response {
    if oauth {
        return identity::throttled(wait);
    }
    ApiError::throttled(wait, |secs| {
        format!("Too many requests from this address failed authentication; retry after {secs} seconds.")
    })
    .into_response()
}

/// The audit record of a client's refused burst: how many requests were refused, from when to
/// when (the record's time is the first refusal's).
pub(crate) fn refused_burst_event(
    ip: std::net::IpAddr,
    burst: &crate::throttle::RefusedBurst,
) -> coffer_audit::AuditEvent {
    let rfc3339 = |t: std::time::SystemTime| {
        time::OffsetDateTime::from(t)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| "?".into())
    };
    coffer_audit::AuditEvent {
        time: burst.first,
        request_id: uuid::Uuid::new_v4().to_string(),
        operation: "ThrottledRequests".into(),
        result: coffer_audit::AuditResult::Denied,
        status: 429,
        duration_ms: burst.last.duration_since(burst.first).unwrap_or_default().as_secs_f64() * 1000.0,
        client_ip: Some(ip),
        user_agent: None,
        principal: None,
        resource: Default::default(),
        grant: None,
        denial_reason: Some(format!(
            "{} requests refused with 429 from {} to {}: too many failed authentications from this address",
            burst.count,
            rfc3339(burst.first),
            rfc3339(burst.last)
        )),
        credential_hmac: None,
    }
}

fn audit_event(
    note: AuditNote,
    response: &Response,
    time: std::time::SystemTime,
    started: std::time::Instant,
    request_id: &str,
    client_ip: Option<std::net::IpAddr>,
    user_agent: Option<String>,
) -> coffer_audit::AuditEvent {
    let status = response.status();
    let result = if status.is_success() || status.is_redirection() {
        coffer_audit::AuditResult::Allowed
    } else if matches!(status.as_u16(), 401 | 403 | 429) {
        coffer_audit::AuditResult::Denied
    } else {
        coffer_audit::AuditResult::Failed
    };
    let process = note.process.map(|p| coffer_audit::ProcessFacts {
        pid: p.pid,
        uid: p.uid,
        gid: p.gid,
        exe: p.exe,
        cgroup: p.cgroup,
    });
    let principal = note.principal.map(|p| coffer_audit::AuditPrincipal {
        id: p.object_id.clone(),
        display_name: p.display_name.clone(),
        kind: p.kind.as_str().to_owned(),
        agent: note.agent,
        process,
    });
    coffer_audit::AuditEvent {
        time,
        request_id: request_id.to_owned(),
        operation: if note.operation.is_empty() { "Unknown".into() } else { note.operation.into() },
        result,
        status: status.as_u16(),
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        client_ip,
        user_agent,
        principal,
        resource: coffer_audit::AuditResource {
            vault: note.vault,
            secret: note.secret,
            version: note.version,
        },
        grant: note.grant,
        denial_reason: note.denial,
        credential_hmac: note.credential_hmac,
    }
}

/// Authentication: a valid Coffer access token naming an existing, enabled principal.
/// Anything else is a 401 with the challenge the SDKs need.
async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    note: &mut AuditNote,
) -> Result<Arc<Principal>, ApiError> {
    let result = authenticate_inner(state, headers, note);
    match &result {
        Ok(p) => note.principal = Some(p.clone()),
        Err(e) => note.deny(e.message.clone()),
    }
    result
}

fn authenticate_inner(
    state: &AppState,
    headers: &HeaderMap,
    note: &mut AuditNote,
) -> Result<Arc<Principal>, ApiError> {
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
    let verified = state.tokens.verify(token);
    if let Some(audit) = &state.audit {
        let hmac = || audit.hmac(token.as_bytes());
        note.credential_hmac = Some(match &verified {
            // Once per token, not per request.
            Ok(claims) => claims.credential_hmac(hmac),
            Err(_) => hmac(),
        });
    }
    let claims = verified.map_err(|e| unauthorized(&format!("The access token is not valid: {e}.")))?;
    note.agent = claims.agent.clone();
    note.process = claims.process.clone();
    // The directory snapshot is current: a disabled or deleted principal fails here on the
    // very next request, whatever its token's expiry.
    let snapshot = state.directory.snapshot();
    let principal = snapshot
        .principal_arc(&claims.oid)
        .ok_or_else(|| unauthorized("The access token's principal does not exist."))?;
    if !principal.enabled || principal.kind == coffer_core::authz::PrincipalKind::Group {
        return Err(unauthorized("The access token's principal is disabled."));
    }
    if let Err(wait) = state.principal_limits.take(&principal.object_id, std::time::Instant::now()) {
        return Err(ApiError::throttled(wait, |secs| {
            format!("Too many requests from this principal; retry after {secs} seconds.")
        }));
    }
    Ok(principal.clone())
}

tokio::task_local! {
    /// The role assignment that allowed the current admin request (set by [`allow`], read into
    /// its audit record by `admin::handle`), so the admin handlers need not carry the audit note
    /// to each of their authorization points.
    static ADMIN_GRANT: std::cell::RefCell<Option<String>>;
}

/// The audit record's `grant` text for a role assignment that allowed a request.
pub(crate) fn grant_text(grant: &coffer_core::authz::Grant) -> String {
    // Not `format!`: it cost a GET ~1,400 instructions here (bench/callgrind.sh).
    [grant.role, " (", grant.assignment_id, ")"].concat()
}

/// The admin API's authorization step: one RBAC decision on the current directory snapshot.
pub(crate) fn allow(
    state: &AppState,
    principal: &Principal,
    action: coffer_core::authz::Action,
    resource: coffer_core::authz::Resource<'_>,
) -> Result<(), ApiError> {
    let snapshot = state.directory.snapshot();
    let grant = snapshot.rbac.authorize(principal, action, resource).map_err(forbidden_by_rbac)?;
    record_grant(&grant);
    Ok(())
}

/// Notes the grant that allowed an admin request, for its audit record.
pub(crate) fn record_grant(grant: &coffer_core::authz::Grant) {
    // Outside an admin request (no scope) there is no record to carry it.
    let _ = ADMIN_GRANT.try_with(|g| *g.borrow_mut() = Some(grant_text(grant)));
}

/// A JSON value as a response.
pub(crate) fn ok_value(status: StatusCode, body: serde_json::Value) -> Result<Response, ApiError> {
    Ok(json_response(status, body.to_string()))
}

/// Turns a denial into Key Vault's RBAC error.
pub(crate) fn forbidden_by_rbac(denial: coffer_core::authz::Denial) -> ApiError {
    ApiError::forbidden(denial.to_string()).with_inner("ForbiddenByRbac")
}

/// Reads the request body up to `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(c) = cause {
            if c.is::<crate::serve::BodyTimedOut>() {
                return ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "RequestTimeout",
                    "The request body did not arrive in time; send the whole body without pausing.",
                );
            }
            cause = c.source();
        }
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLarge",
            format!("The request body exceeds {limit} bytes."),
        )
    })
}

/// Parses the query string (keys and values percent-decoded; the JS SDK encodes `api%2Dversion`).
fn query_pairs(req: &Request) -> Vec<(String, String)> {
    req.uri().query().map(parse_query).unwrap_or_default()
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes()).into_owned().collect()
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
