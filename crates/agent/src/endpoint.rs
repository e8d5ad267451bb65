//! The managed-identity HTTP endpoint (plain HTTP on loopback, as on Azure):
//!
//! * App Service: `GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=…[&client_id=…]`
//!   with `X-IDENTITY-HEADER` (Python, JavaScript and Rust);
//! * IMDS: `GET /metadata/identity/oauth2/token[/]?api-version=2018-02-01&resource=…` with
//!   `Metadata: true` (Python and JavaScript via `AZURE_POD_IDENTITY_AUTHORITY_HOST`).
//!
//! Response fields follow what each SDK parses (protocol doc §C): `expires_on` as a string of
//! Unix seconds everywhere, IMDS also `expires_in`, `not_before`, all strings.
//!
//! Like Azure's IMDS, the endpoint answers only what a local workload sends: `GET` on one of the
//! two paths, addressed to a loopback `Host`, not relayed (`X-Forwarded-For`, `Forwarded`). A
//! page that rebinds its DNS name to 127.0.0.1, or a server-side request forgery through a proxy
//! that can set `Metadata: true`, is refused before any process is attested.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use rand::RngCore;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::attest::peer_process;
use crate::{BrokerError, BrokerRequest, TokenBroker};

/// The App Service protocol's path: `IDENTITY_ENDPOINT` is `http://ADDR/msi/token`.
pub const APP_SERVICE_PATH: &str = "/msi/token";
/// Azure IMDS's token path (msal-node adds a trailing slash).
pub const IMDS_PATH: &str = "/metadata/identity/oauth2/token";

/// A fresh `IDENTITY_HEADER` value: 32 random bytes as hex. App Service gives every instance its
/// own; a value nobody can guess keeps a forged request that cannot read the workload's
/// environment from getting through.
pub fn random_identity_header() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the endpoint listens and what anti-SSRF header value it expects.
pub struct EndpointConfig {
    pub local: SocketAddr,
    pub identity_header: String,
}

struct EndpointState {
    config: EndpointConfig,
    broker: Arc<dyn TokenBroker>,
}

/// Serves the endpoint on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    identity_header: String,
    broker: Arc<dyn TokenBroker>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let state = Arc::new(EndpointState { config: EndpointConfig { local, identity_header }, broker });
    let app = Router::new().fallback(handle).with_state(state);
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
}

fn error(status: StatusCode, code: &str, description: &str) -> Response {
    let body = json!({
        "statusCode": status.as_u16(),
        "message": description,
        "error": code,
        "error_description": description,
    });
    (status, [("content-type", "application/json")], body.to_string()).into_response()
}

/// Headers a proxy adds when it relays a request: a relayed request is not from a local process
/// that asked for itself (Azure's IMDS refuses them too).
const FORWARDING_HEADERS: [&str; 3] = ["x-forwarded-for", "forwarded", "x-forwarded-host"];

/// True when the request is addressed to a loopback name or address (any port), or to the
/// endpoint's own address: the name a workload was given. A DNS-rebound page sends its own name.
fn loopback_host(host: &str, local: SocketAddr) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((v6, rest)) if rest.is_empty() || rest.starts_with(':') => v6,
            _ => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback() || ip == local.ip())
}

/// Which protocol a request speaks, by its path alone.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    AppService,
    Imds,
}

impl Protocol {
    fn of(path: &str) -> Option<Self> {
        match path.strip_suffix('/').unwrap_or(path) {
            APP_SERVICE_PATH => Some(Self::AppService),
            IMDS_PATH => Some(Self::Imds),
            _ => None,
        }
    }
}

async fn handle(
    State(state): State<Arc<EndpointState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let Some(protocol) = Protocol::of(req.uri().path()) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("No such endpoint: ask GET {APP_SERVICE_PATH} (App Service) or GET {IMDS_PATH} (IMDS)."),
        );
    };
    if req.method() != Method::GET {
        let mut refused = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "The managed-identity endpoint answers GET only.",
        );
        refused.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return refused;
    }
    let headers: &HeaderMap = req.headers();
    if FORWARDING_HEADERS.iter().any(|h| headers.contains_key(*h)) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Request contains a forwarding header (X-Forwarded-For, Forwarded or X-Forwarded-Host): \
             ask the managed-identity endpoint directly, not through a proxy.",
        );
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if !host.is_some_and(|h| loopback_host(h, state.config.local)) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The Host header must name a loopback address (127.0.0.1, [::1] or localhost): the \
             managed-identity endpoint serves local workloads only.",
        );
    }
    let imds = protocol == Protocol::Imds;
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let get = |k: &str| query.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());

    if imds {
        if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Required metadata header not specified",
            );
        }
    } else {
        let presented = headers.get("x-identity-header").map(|v| v.as_bytes()).unwrap_or_default();
        if !bool::from(presented.ct_eq(state.config.identity_header.as_bytes())) {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "The X-IDENTITY-HEADER header is missing or wrong: send the IDENTITY_HEADER value of \
                 the workload's environment.",
            );
        }
    }
    let Some(resource) = get("resource") else {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "The resource parameter is required.");
    };

    let local = state.config.local;
    let process = match tokio::task::spawn_blocking(move || peer_process(peer, local)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "managed-identity request from an unattestable caller refused");
            return error(
                StatusCode::FORBIDDEN,
                "forbidden",
                &format!("The calling process cannot be attested: {e}"),
            );
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", &e.to_string()),
    };
    let request = BrokerRequest {
        resource: resource.trim_end_matches("/.default").to_owned(),
        client_id: get("client_id"),
        object_id: get("object_id").or_else(|| get("principal_id")),
        process: process.clone(),
    };
    let token = match state.broker.token(request).await {
        Ok(t) => t,
        Err(BrokerError::NotBound(msg)) => {
            tracing::warn!(
                pid = process.pid, uid = process.uid, gid = process.gid,
                ids_consistent = process.ids_consistent, exe = %process.exe,
                exe_verified = process.exe_verified, same_namespaces = process.same_namespaces,
                cgroup = process.cgroup.as_deref().unwrap_or(""), reason = %msg,
                "managed-identity token refused: no identity is bound to the calling process"
            );
            return error(StatusCode::FORBIDDEN, "forbidden", &msg);
        }
        Err(BrokerError::BadRequest(msg)) => return error(StatusCode::BAD_REQUEST, "invalid_request", &msg),
        Err(BrokerError::Unavailable(msg)) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", &msg)
        }
    };
    tracing::info!(pid = process.pid, uid = process.uid, exe = %process.exe, client_id = %token.client_id, "issued a managed-identity token");
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut body = json!({
        "access_token": token.access_token.as_str(),
        "expires_on": token.expires_on.to_string(),
        "resource": token.resource,
        "token_type": "Bearer",
        "client_id": token.client_id,
    });
    if imds {
        body["expires_in"] = json!(token.expires_on.saturating_sub(now).to_string());
        body["not_before"] = json!(now.to_string());
        body["ext_expires_in"] = body["expires_in"].clone();
        body["refresh_token"] = json!("");
    }
    (StatusCode::OK, [("content-type", "application/json")], body.to_string()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_a_rebound_page_cannot_send() {
        let local: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        for ok in [
            "127.0.0.1:8081",
            "127.0.0.1",
            "127.0.0.2:1",
            "localhost",
            "LOCALHOST:8081",
            "[::1]:8081",
            "[::1]",
        ] {
            assert!(loopback_host(ok, local), "{ok}");
        }
        for refused in
            ["evil.example", "evil.example:8081", "169.254.169.254", "10.0.0.1:8081", "[::1", "[::1]x", ""]
        {
            assert!(!loopback_host(refused, local), "{refused}");
        }
        assert!(
            loopback_host("10.0.0.1:8081", "10.0.0.1:8081".parse().unwrap()),
            "the endpoint's own address"
        );
    }

    #[test]
    fn protocols_by_path() {
        assert!(Protocol::of("/msi/token") == Some(Protocol::AppService));
        assert!(Protocol::of("/metadata/identity/oauth2/token/") == Some(Protocol::Imds));
        assert!(Protocol::of("/metadata/identity/oauth2/token") == Some(Protocol::Imds));
        assert!(Protocol::of("/msi/token/extra").is_none());
        assert!(Protocol::of("/").is_none());
    }

    #[test]
    fn identity_headers_are_random() {
        let (a, b) = (random_identity_header(), random_identity_header());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
