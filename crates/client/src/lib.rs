//! A Rust client for Coffer's REST API: the Key Vault secrets data plane of each vault, and
//! Coffer's admin API. `coffer`'s CLI is built on it.
//!
//! Vaults are addressed as `https://<vault>.<zone>:<port>` like Key Vault. When such a name does
//! not resolve (glibc does not resolve `*.localhost`), the client connects to the address of
//! the zone itself and still sends the vault's name as `Host` and SNI.

pub mod credential;
pub mod secrets;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use zeroize::Zeroizing;

/// The api-version this client speaks.
pub use reqwest::Method;

pub const API_VERSION: &str = "2025-07-01";

#[derive(Debug, Error)]
pub enum ClientError {
    /// The server answered with an error body.
    #[error("{status} {code}: {message}")]
    Api { status: u16, code: String, message: String },
    #[error("cannot reach the server: {0}")]
    Transport(String),
    #[error("the server's answer was not understood: {0}")]
    Decode(String),
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// A secret value: zeroized on drop, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretAttributes {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recoverable_days: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_level: Option<String>,
}

/// A secret bundle, list item or deleted secret (fields absent where the server omits them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Secret {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<SecretString>,
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default)]
    pub attributes: SecretAttributes,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted_date: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_purge_date: Option<i64>,
}

impl Secret {
    /// The secret's name (second path segment of its id).
    pub fn name(&self) -> &str {
        self.id_segments().nth(1).unwrap_or_default()
    }

    /// The version (third path segment of its id), if the id has one.
    pub fn version(&self) -> Option<&str> {
        self.id_segments().nth(2)
    }

    fn id_segments(&self) -> impl Iterator<Item = &str> {
        let path = self.id.splitn(4, '/').nth(3).unwrap_or_default();
        path.split('/').filter(|s| !s.is_empty())
    }
}

/// Properties to send with a set or an update.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretProperties {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "attributes_empty")]
    pub attributes: SecretAttributes,
}

fn attributes_empty(a: &SecretAttributes) -> bool {
    a == &SecretAttributes::default()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SetRequest<'a> {
    value: &'a str,
    #[serde(flatten)]
    properties: &'a SecretProperties,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Page<T> {
    value: Vec<T>,
    next_link: Option<String>,
}

/// A vault as the admin API describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VaultInfo {
    pub name: String,
    pub id: String,
    pub url: String,
    pub retention_days: i64,
    pub purge_protection: bool,
    pub recovery_level: String,
    pub created: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_secrets: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

/// A resolver for `server_url`'s zone: `<name>.<zone>` resolves through the system first, then
/// falls back to the zone's own address (glibc does not resolve `*.localhost`).
pub fn zone_resolver(server_url: &str) -> Result<Arc<ZoneResolver>> {
    let server =
        Url::parse(server_url).map_err(|e| ClientError::Config(format!("server URL '{server_url}': {e}")))?;
    let zone =
        server.host_str().ok_or_else(|| ClientError::Config("the server URL has no host".into()))?.to_owned();
    Ok(Arc::new(ZoneResolver { zone_suffix: format!(".{zone}"), zone }))
}

/// Resolves `<vault>.<zone>` via the system first, then falls back to the zone's address.
pub struct ZoneResolver {
    zone_suffix: String,
    zone: String,
}

impl Resolve for ZoneResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let fallback = host.ends_with(&self.zone_suffix).then(|| self.zone.clone());
        Box::pin(async move {
            let lookup = |h: String| async move {
                tokio::net::lookup_host((h.as_str(), 0)).await.map(|a| a.collect::<Vec<SocketAddr>>())
            };
            let addrs = match lookup(host).await {
                Ok(a) if !a.is_empty() => a,
                other => match fallback {
                    Some(zone) => lookup(zone).await?,
                    None => other?,
                },
            };
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Connection settings.
pub struct ClientConfig {
    /// The server's root URL, `https://<zone>[:port]`.
    pub server_url: String,
    /// Bearer token.
    pub token: Zeroizing<String>,
    /// Extra CA certificates (PEM) to trust, e.g. the dev CA.
    pub ca_pem: Option<Vec<u8>>,
}

pub struct CofferClient {
    http: reqwest::Client,
    server: Url,
    token: Zeroizing<String>,
}

impl CofferClient {
    pub fn new(config: ClientConfig) -> Result<Self> {
        let server = Url::parse(&config.server_url)
            .map_err(|e| ClientError::Config(format!("server URL '{}': {e}", config.server_url)))?;
        if server.scheme() != "https" {
            return Err(ClientError::Config("the server URL must be https://".into()));
        }
        let zone = server
            .host_str()
            .ok_or_else(|| ClientError::Config("the server URL has no host".into()))?
            .to_owned();
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .https_only(true)
            .dns_resolver(Arc::new(ZoneResolver { zone_suffix: format!(".{zone}"), zone }))
            .user_agent(concat!("coffer-client/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &config.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ClientError::Config(format!("CA file: {e}")))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| ClientError::Config(e.to_string()))?;
        Ok(Self { http, server, token: config.token })
    }

    /// `https://<vault>.<zone>[:port]`.
    pub fn vault_url(&self, vault: &str) -> String {
        let host = self.server.host_str().unwrap_or_default();
        match self.server.port() {
            Some(port) => format!("https://{vault}.{host}:{port}"),
            None => format!("https://{vault}.{host}"),
        }
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        url: &str,
        body: Option<&B>,
    ) -> Result<reqwest::Response> {
        let mut url = Url::parse(url).map_err(|e| ClientError::Config(e.to_string()))?;
        if !url.query_pairs().any(|(k, _)| k == "api-version") {
            url.query_pairs_mut().append_pair("api-version", API_VERSION);
        }
        let mut req = self.http.request(method, url).bearer_auth(self.token.as_str());
        if let Some(body) = body {
            req = req.json(body);
        }
        let response = req.send().await.map_err(|e| ClientError::Transport(error_chain(&e)))?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(api_error(response).await)
    }

    async fn json<T: for<'de> Deserialize<'de>, B: Serialize>(
        &self,
        method: Method,
        url: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let response = self.send(method, url, body).await?;
        let bytes = Zeroizing::new(
            response.bytes().await.map_err(|e| ClientError::Transport(e.to_string()))?.to_vec(),
        );
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Decode(format!("line {} column {}", e.line(), e.column())))
    }

    async fn pages<T: for<'de> Deserialize<'de>>(&self, first: String) -> Result<Vec<T>> {
        let mut out = Vec::new();
        let mut next = Some(first);
        while let Some(url) = next {
            let page: Page<T> = self.json(Method::GET, &url, None::<&()>).await?;
            out.extend(page.value);
            next = page.next_link.filter(|l| !l.is_empty());
        }
        Ok(out)
    }

    fn secret_url(&self, vault: &str, path: &str) -> String {
        format!("{}/{path}", self.vault_url(vault))
    }

    pub async fn set_secret(
        &self,
        vault: &str,
        name: &str,
        value: &str,
        properties: &SecretProperties,
    ) -> Result<Secret> {
        let url = self.secret_url(vault, &format!("secrets/{name}"));
        self.json(Method::PUT, &url, Some(&SetRequest { value, properties })).await
    }

    pub async fn get_secret(&self, vault: &str, name: &str, version: Option<&str>) -> Result<Secret> {
        let url = self.secret_url(vault, &format!("secrets/{name}/{}", version.unwrap_or("")));
        self.json(Method::GET, &url, None::<&()>).await
    }

    pub async fn list_secrets(&self, vault: &str) -> Result<Vec<Secret>> {
        self.pages(self.secret_url(vault, "secrets")).await
    }

    pub async fn list_versions(&self, vault: &str, name: &str) -> Result<Vec<Secret>> {
        self.pages(self.secret_url(vault, &format!("secrets/{name}/versions"))).await
    }

    pub async fn update_secret(
        &self,
        vault: &str,
        name: &str,
        version: Option<&str>,
        properties: &SecretProperties,
    ) -> Result<Secret> {
        let url = self.secret_url(vault, &format!("secrets/{name}/{}", version.unwrap_or("")));
        self.json(Method::PATCH, &url, Some(properties)).await
    }

    pub async fn delete_secret(&self, vault: &str, name: &str) -> Result<Secret> {
        self.json(Method::DELETE, &self.secret_url(vault, &format!("secrets/{name}")), None::<&()>).await
    }

    pub async fn get_deleted_secret(&self, vault: &str, name: &str) -> Result<Secret> {
        self.json(Method::GET, &self.secret_url(vault, &format!("deletedsecrets/{name}")), None::<&()>).await
    }

    pub async fn list_deleted_secrets(&self, vault: &str) -> Result<Vec<Secret>> {
        self.pages(self.secret_url(vault, "deletedsecrets")).await
    }

    pub async fn recover_secret(&self, vault: &str, name: &str) -> Result<Secret> {
        self.json(
            Method::POST,
            &self.secret_url(vault, &format!("deletedsecrets/{name}/recover")),
            None::<&()>,
        )
        .await
    }

    pub async fn purge_secret(&self, vault: &str, name: &str) -> Result<()> {
        self.send(Method::DELETE, &self.secret_url(vault, &format!("deletedsecrets/{name}")), None::<&()>)
            .await?;
        Ok(())
    }

    /// Returns the opaque backup blob (base64url text).
    pub async fn backup_secret(&self, vault: &str, name: &str) -> Result<String> {
        #[derive(Deserialize)]
        struct Blob {
            value: String,
        }
        let blob: Blob = self
            .json(Method::POST, &self.secret_url(vault, &format!("secrets/{name}/backup")), None::<&()>)
            .await?;
        Ok(blob.value)
    }

    pub async fn restore_secret(&self, vault: &str, blob: &str) -> Result<Secret> {
        let body = serde_json::json!({ "value": blob });
        self.json(Method::POST, &self.secret_url(vault, "secrets/restore"), Some(&body)).await
    }

    fn admin_url(&self, path: &str) -> String {
        let mut base = self.server.to_string();
        if base.ends_with('/') {
            base.pop();
        }
        format!("{base}/admin/{path}")
    }

    pub async fn create_vault(
        &self,
        name: &str,
        retention_days: Option<i64>,
        purge_protection: bool,
    ) -> Result<VaultInfo> {
        let body = serde_json::json!({ "name": name, "retentionDays": retention_days, "purgeProtection": purge_protection });
        self.json(Method::POST, &self.admin_url("vaults"), Some(&body)).await
    }

    pub async fn list_vaults(&self) -> Result<Vec<VaultInfo>> {
        #[derive(Deserialize)]
        struct List {
            value: Vec<VaultInfo>,
        }
        let list: List = self.json(Method::GET, &self.admin_url("vaults"), None::<&()>).await?;
        Ok(list.value)
    }

    pub async fn get_vault(&self, name: &str) -> Result<VaultInfo> {
        self.json(Method::GET, &self.admin_url(&format!("vaults/{name}")), None::<&()>).await
    }

    pub async fn delete_vault(&self, name: &str, force: bool) -> Result<()> {
        let url = format!("{}?force={force}", self.admin_url(&format!("vaults/{name}")));
        self.send(Method::DELETE, &url, None::<&()>).await?;
        Ok(())
    }

    /// A call to any admin API path (`/admin/{path}`); `Null` for an empty answer.
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let response = self.send(method, &self.admin_url(path), body).await?;
        let bytes = Zeroizing::new(
            response.bytes().await.map_err(|e| ClientError::Transport(e.to_string()))?.to_vec(),
        );
        if bytes.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// True when the status says "not found" (for callers that treat absence as a state).
    pub fn is_not_found(err: &ClientError) -> bool {
        err.status() == Some(StatusCode::NOT_FOUND.as_u16())
    }
}

/// The HTTPS client applications use: system CAs plus `SSL_CERT_FILE` (like the Azure SDKs on
/// Linux), and for `<vault>.<zone>` names that do not resolve, the zone's address.
pub(crate) fn app_http_client(vault_url: Option<&str>) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().use_rustls_tls().timeout(std::time::Duration::from_secs(90));
    if let Some(path) = std::env::var_os("SSL_CERT_FILE") {
        let pem = std::fs::read(&path).map_err(|e| {
            ClientError::Config(format!("cannot read SSL_CERT_FILE {}: {e}", path.to_string_lossy()))
        })?;
        for cert in
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ClientError::Config(e.to_string()))?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let Some(url) = vault_url {
        // https://<vault>.<zone>[:port] → the zone is the parent domain.
        let parsed = Url::parse(url).map_err(|e| ClientError::Config(e.to_string()))?;
        if let Some((_, zone)) = parsed.host_str().and_then(|h| h.split_once('.')) {
            builder = builder.dns_resolver(Arc::new(ZoneResolver {
                zone_suffix: format!(".{zone}"),
                zone: zone.to_owned(),
            }));
        }
    }
    builder.build().map_err(|e| ClientError::Config(e.to_string()))
}

/// Turns an error response into [`ClientError::Api`].
pub(crate) async fn api_error(response: reqwest::Response) -> ClientError {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) => ClientError::Api { status: status.as_u16(), code: b.error.code, message: b.error.message },
        Err(_) => ClientError::Api {
            status: status.as_u16(),
            code: status.canonical_reason().unwrap_or("Error").to_owned(),
            message: "the server returned an error without a body".into(),
        },
    }
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_versions_from_ids() {
        let s = Secret { id: "https://dev.localhost:8443/secrets/db/0123".into(), ..Default::default() };
        assert_eq!(s.name(), "db");
        assert_eq!(s.version(), Some("0123"));
        let item = Secret { id: "https://dev.localhost:8443/secrets/db".into(), ..Default::default() };
        assert_eq!(item.version(), None);
    }

    #[test]
    fn values_are_redacted_in_debug() {
        let s = Secret { value: Some(SecretString::new("hunter2".into())), ..Default::default() };
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
