//! The managed-identity HTTP endpoint (plain HTTP on loopback, as on Azure):
//!
//! * App Service: `GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=…[&client_id=…]`
//!   with `X-IDENTITY-HEADER` (Python, JavaScript and Rust);
//! * IMDS: `GET /metadata/identity/oauth2/token[/]?api-version=2018-02-01&resource=…` with
//!   `Metadata: true` (Python and JavaScript via `AZURE_POD_IDENTITY_AUTHORITY_HOST`).
//!
//! Response fields follow what each SDK parses (protocol doc §C): `expires_on` as a string of
//! Unix seconds everywhere, IMDS also `expires_in`, `not_before`, all strings.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::json;

use crate::attest::peer_process;
use crate::{BrokerError, BrokerRequest, TokenBroker};

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

async fn handle(
    State(state): State<Arc<EndpointState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let imds = req.uri().path().trim_end_matches('/') == "/metadata/identity/oauth2/token";
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let get = |k: &str| query.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let headers: &HeaderMap = req.headers();

    if imds {
        if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Required metadata header not specified",
            );
        }
    } else {
        let presented = headers.get("x-identity-header").and_then(|v| v.to_str().ok());
        if presented != Some(state.config.identity_header.as_str()) {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "The X-IDENTITY-HEADER header is missing or wrong.",
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
                pid = process.pid, uid = process.uid, gid = process.gid, exe = %process.exe,
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
