//! Credentials for applications, found from the environment the way Azure Identity's
//! `DefaultAzureCredential` finds them, so the same program works against Coffer and against
//! Azure Key Vault:
//!
//! 1. managed identity: the host agent's App Service endpoint (`IDENTITY_ENDPOINT` +
//!    `IDENTITY_HEADER`) or IMDS (`AZURE_POD_IDENTITY_AUTHORITY_HOST`);
//! 2. a client secret (`AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET`,
//!    `AZURE_AUTHORITY_HOST`);
//! 3. a federated token file (`AZURE_FEDERATED_TOKEN_FILE` with the same tenant/client/host).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use crate::{ClientError, Result};

/// A bearer token and when it expires (Unix seconds).
#[derive(Clone)]
pub struct AccessToken {
    pub token: Zeroizing<String>,
    pub expires_on: u64,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken").field("expires_on", &self.expires_on).finish_non_exhaustive()
    }
}

/// Something that produces access tokens for a resource (`https://host[:port]`, no `/.default`).
#[async_trait]
pub trait TokenCredential: Send + Sync {
    async fn token(&self, resource: &str) -> Result<AccessToken>;
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn http() -> Result<reqwest::Client> {
    crate::app_http_client(None)
}

/// A failed token request: OAuth endpoints put the reason in `error_description`.
async fn token_error(response: reqwest::Response, code: &str) -> ClientError {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error_description"].as_str().map(str::to_owned))
        .unwrap_or(text);
    ClientError::Api { status, code: code.into(), message }
}

/// Managed identity through the host's agent (App Service protocol, else IMDS).
pub struct ManagedIdentityCredential {
    http: reqwest::Client,
    endpoint: Endpoint,
    client_id: Option<String>,
}

enum Endpoint {
    AppService { url: String, header: String },
    Imds { base: String },
}

impl ManagedIdentityCredential {
    /// From the environment; `None` when no managed-identity endpoint is configured.
    pub fn from_env() -> Option<Self> {
        let endpoint = match (env("IDENTITY_ENDPOINT"), env("IDENTITY_HEADER")) {
            (Some(url), Some(header)) => Endpoint::AppService { url, header },
            _ => Endpoint::Imds { base: env("AZURE_POD_IDENTITY_AUTHORITY_HOST")? },
        };
        Some(Self { http: reqwest::Client::new(), endpoint, client_id: env("AZURE_CLIENT_ID") })
    }
}

#[derive(Deserialize)]
struct ManagedIdentityToken {
    access_token: Zeroizing<String>,
    expires_on: serde_json::Value,
}

#[async_trait]
impl TokenCredential for ManagedIdentityCredential {
    async fn token(&self, resource: &str) -> Result<AccessToken> {
        let mut query = vec![("resource", resource.to_owned())];
        if let Some(id) = &self.client_id {
            query.push(("client_id", id.clone()));
        }
        let request = match &self.endpoint {
            Endpoint::AppService { url, header } => {
                query.push(("api-version", "2019-08-01".into()));
                self.http.get(url).query(&query).header("X-IDENTITY-HEADER", header)
            }
            Endpoint::Imds { base } => {
                query.push(("api-version", "2018-02-01".into()));
                self.http
                    .get(format!("{}/metadata/identity/oauth2/token", base.trim_end_matches('/')))
                    .query(&query)
                    .header("Metadata", "true")
            }
        };
        let response = request.send().await.map_err(|e| ClientError::Transport(e.to_string()))?;
        if !response.status().is_success() {
            return Err(token_error(response, "ManagedIdentity").await);
        }
        let body: ManagedIdentityToken =
            response.json().await.map_err(|e| ClientError::Decode(e.to_string()))?;
        let expires_on = match &body.expires_on {
            serde_json::Value::String(s) => s.parse().unwrap_or(0),
            serde_json::Value::Number(n) => n.as_u64().unwrap_or(0),
            _ => 0,
        };
        Ok(AccessToken { token: body.access_token, expires_on })
    }
}

enum ClientAuth {
    Secret(Zeroizing<String>),
    /// A federated token re-read from its file for every request (it rotates).
    FederatedTokenFile(std::path::PathBuf),
}

/// A client secret or a federated token, exchanged at the authority's token endpoint.
pub struct ClientCredential {
    http: reqwest::Client,
    authority: String,
    tenant: String,
    client_id: String,
    auth: ClientAuth,
}

#[derive(Deserialize)]
struct EntraToken {
    access_token: Zeroizing<String>,
    expires_in: u64,
}

impl ClientCredential {
    fn from_env(federated: bool) -> Option<Result<Self>> {
        let tenant = env("AZURE_TENANT_ID")?;
        let client_id = env("AZURE_CLIENT_ID")?;
        let auth = if federated {
            ClientAuth::FederatedTokenFile(env("AZURE_FEDERATED_TOKEN_FILE")?.into())
        } else {
            ClientAuth::Secret(Zeroizing::new(env("AZURE_CLIENT_SECRET")?))
        };
        let authority =
            env("AZURE_AUTHORITY_HOST").unwrap_or_else(|| "https://login.microsoftonline.com".into());
        Some(http().map(|http| Self { http, authority, tenant, client_id, auth }))
    }

    /// `AZURE_CLIENT_SECRET` and friends; `None` when not configured.
    pub fn client_secret_from_env() -> Option<Result<Self>> {
        Self::from_env(false)
    }

    /// `AZURE_FEDERATED_TOKEN_FILE` and friends; `None` when not configured.
    pub fn workload_identity_from_env() -> Option<Result<Self>> {
        Self::from_env(true)
    }
}

#[async_trait]
impl TokenCredential for ClientCredential {
    async fn token(&self, resource: &str) -> Result<AccessToken> {
        let url = format!("{}/{}/oauth2/v2.0/token", self.authority.trim_end_matches('/'), self.tenant);
        let scope = format!("{resource}/.default");
        let mut form: Vec<(&str, Zeroizing<String>)> = vec![
            ("grant_type", Zeroizing::new("client_credentials".into())),
            ("client_id", Zeroizing::new(self.client_id.clone())),
            ("scope", Zeroizing::new(scope)),
        ];
        match &self.auth {
            ClientAuth::Secret(secret) => form.push(("client_secret", secret.clone())),
            ClientAuth::FederatedTokenFile(path) => {
                let assertion = std::fs::read_to_string(path)
                    .map_err(|e| ClientError::Config(format!("cannot read {}: {e}", path.display())))?;
                form.push(("client_assertion", Zeroizing::new(assertion.trim().to_owned())));
                form.push((
                    "client_assertion_type",
                    Zeroizing::new("urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into()),
                ));
            }
        }
        let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let response = self
            .http
            .post(url)
            .form(&pairs)
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if !response.status().is_success() {
            return Err(token_error(response, "TokenRequest").await);
        }
        let body: EntraToken = response.json().await.map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok(AccessToken { token: body.access_token, expires_on: now() + body.expires_in })
    }
}

/// Tries managed identity, then a client secret, then a federated token file — the first that
/// is configured in the environment — and caches its tokens until five minutes before expiry.
pub struct DefaultCredential {
    inner: Arc<dyn TokenCredential>,
    cache: Mutex<Option<(String, AccessToken)>>,
}

const REFRESH_MARGIN: Duration = Duration::from_secs(300);

impl DefaultCredential {
    pub fn new() -> Result<Self> {
        let inner: Arc<dyn TokenCredential> = if let Some(mi) = ManagedIdentityCredential::from_env() {
            Arc::new(mi)
        } else if let Some(c) = ClientCredential::client_secret_from_env() {
            Arc::new(c?)
        } else if let Some(c) = ClientCredential::workload_identity_from_env() {
            Arc::new(c?)
        } else {
            return Err(ClientError::Config(
                "no credential in the environment: set IDENTITY_ENDPOINT/IDENTITY_HEADER (managed identity), \
                 AZURE_CLIENT_ID/AZURE_CLIENT_SECRET/AZURE_TENANT_ID, or AZURE_FEDERATED_TOKEN_FILE"
                    .into(),
            ));
        };
        Ok(Self { inner, cache: Mutex::new(None) })
    }
}

#[async_trait]
impl TokenCredential for DefaultCredential {
    async fn token(&self, resource: &str) -> Result<AccessToken> {
        let mut cache = self.cache.lock().await;
        if let Some((cached_for, token)) = cache.as_ref() {
            if cached_for == resource && token.expires_on > now() + REFRESH_MARGIN.as_secs() {
                return Ok(token.clone());
            }
        }
        let token = self.inner.token(resource).await?;
        *cache = Some((resource.to_owned(), token.clone()));
        Ok(token)
    }
}
