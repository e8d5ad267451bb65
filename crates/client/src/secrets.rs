//! `SecretClient`: what a service uses to read its secrets at runtime, like the Azure SDKs'
//! `SecretClient`, plus [`WatchedSecret`], a cached secret that follows new versions.
//!
//! The client discovers the token resource from the vault's 401 challenge, so it works
//! against Coffer and against Azure Key Vault alike. Watching uses Coffer's change feed
//! (`GET /coffer/changes`, long poll) when the vault has one, and re-reads on a TTL otherwise
//! (Azure Key Vault) — and also on the TTL as a safety net.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use crate::credential::TokenCredential;
use crate::{ClientError, Result, Secret, SecretString, API_VERSION};

pub struct SecretClient {
    http: reqwest::Client,
    vault_url: String,
    credential: Arc<dyn TokenCredential>,
    resource: Mutex<Option<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Page {
    value: Vec<Secret>,
    next_link: Option<String>,
}

/// The `resource` (or `scope` minus `/.default`) of a Key Vault bearer challenge.
fn challenge_resource(header: &str) -> Option<String> {
    let value = |key: &str| {
        header
            .split([',', ' '])
            .find_map(|part| part.trim().strip_prefix(key))
            .map(|v| v.trim_matches('"').to_owned())
    };
    value("resource=").or_else(|| value("scope=").map(|s| s.trim_end_matches("/.default").to_owned()))
}

impl SecretClient {
    /// A client for the vault at `vault_url` (`https://<vault>.<zone>[:port]`). Trusts the
    /// system's CAs plus the one in `SSL_CERT_FILE`, if set.
    pub fn new(vault_url: &str, credential: Arc<dyn TokenCredential>) -> Result<Self> {
        let vault_url = vault_url.trim_end_matches('/').to_owned();
        if !vault_url.starts_with("https://") {
            return Err(ClientError::Config("the vault URL must be https://".into()));
        }
        Ok(Self {
            http: crate::app_http_client(Some(&vault_url))?,
            vault_url,
            credential,
            resource: Mutex::new(None),
        })
    }

    pub fn vault_url(&self) -> &str {
        &self.vault_url
    }

    /// The token audience, learned once from the vault's challenge.
    async fn resource(&self) -> Result<String> {
        let mut cached = self.resource.lock().await;
        if let Some(r) = cached.as_ref() {
            return Ok(r.clone());
        }
        let response = self
            .http
            .get(format!("{}/secrets?api-version={API_VERSION}&maxresults=1", self.vault_url))
            .send()
            .await
            .map_err(|e| ClientError::Transport(crate::error_chain(&e)))?;
        let header = response
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(challenge_resource)
            .ok_or_else(|| ClientError::Decode("the vault sent no bearer challenge".into()))?;
        *cached = Some(header.clone());
        Ok(header)
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<reqwest::Response> {
        let resource = self.resource().await?;
        let token = self.credential.token(&resource).await?;
        let mut request = self.http.request(method, url).bearer_auth(token.token.as_str());
        if let Some(b) = body {
            request = request.json(b);
        }
        let response = request.send().await.map_err(|e| ClientError::Transport(crate::error_chain(&e)))?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(crate::api_error(response).await)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}?api-version={API_VERSION}", self.vault_url)
    }

    async fn json<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        url: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T> {
        let response = self.send(method, url, body).await?;
        let bytes = Zeroizing::new(
            response.bytes().await.map_err(|e| ClientError::Transport(e.to_string()))?.to_vec(),
        );
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Decode(format!("line {} column {}", e.line(), e.column())))
    }

    /// The latest version, or the given one.
    pub async fn get_secret(&self, name: &str, version: Option<&str>) -> Result<Secret> {
        self.json(Method::GET, &self.url(&format!("secrets/{name}/{}", version.unwrap_or(""))), None).await
    }

    /// Sets a new version.
    pub async fn set_secret(&self, name: &str, value: &str) -> Result<Secret> {
        let body = serde_json::json!({ "value": value });
        let result = self.json(Method::PUT, &self.url(&format!("secrets/{name}")), Some(&body)).await;
        drop(body);
        result
    }

    /// Properties of every secret (no values), following `nextLink`.
    pub async fn list_secrets(&self) -> Result<Vec<Secret>> {
        let mut out = Vec::new();
        let mut next = Some(self.url("secrets"));
        while let Some(url) = next {
            let page: Page = self.json(Method::GET, &url, None).await?;
            out.extend(page.value);
            next = page.next_link.filter(|l| !l.is_empty());
        }
        Ok(out)
    }

    /// Keeps `name` cached and current: see [`WatchedSecret`].
    pub async fn watch(self: &Arc<Self>, name: &str, options: WatchOptions) -> Result<WatchedSecret> {
        WatchedSecret::start(self.clone(), name.to_owned(), options).await
    }
}

/// How a [`WatchedSecret`] stays current.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Re-read at least this often, whatever the change feed says (and the only mechanism
    /// against a vault without a change feed, such as Azure Key Vault).
    pub ttl: Duration,
    /// Long-poll wait per change-feed request.
    pub poll_wait: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self { ttl: Duration::from_secs(60), poll_wait: Duration::from_secs(25) }
    }
}

/// A secret held in memory and refreshed in the background when a new version appears.
/// Dropping it stops the refresh task.
pub struct WatchedSecret {
    current: Arc<RwLock<Secret>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Deserialize)]
struct ChangeFeed {
    epoch: String,
    head: u64,
    reset: bool,
    changes: Vec<serde_json::Value>,
}

impl WatchedSecret {
    async fn start(client: Arc<SecretClient>, name: String, options: WatchOptions) -> Result<Self> {
        // Learn the feed position before the first read, so no change can fall in between.
        let feed = poll(&client, &name, None, None, Duration::ZERO).await;
        let first = client.get_secret(&name, None).await?;
        let current = Arc::new(RwLock::new(first));
        let task = tokio::spawn(refresh_loop(client, name, options, current.clone(), feed.ok().flatten()));
        Ok(Self { current, task })
    }

    /// The current value.
    pub fn value(&self) -> Option<SecretString> {
        self.current.read().expect("watched secret lock poisoned").value.clone()
    }

    /// The current version id.
    pub fn version(&self) -> Option<String> {
        self.current.read().expect("watched secret lock poisoned").version().map(str::to_owned)
    }
}

impl Drop for WatchedSecret {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for WatchedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedSecret").field("version", &self.version()).finish_non_exhaustive()
    }
}

/// One change-feed request. `Ok(None)`: the vault has no change feed (Azure Key Vault).
async fn poll(
    client: &SecretClient,
    name: &str,
    after: Option<u64>,
    epoch: Option<&str>,
    wait: Duration,
) -> Result<Option<ChangeFeed>> {
    let mut url = format!("{}&secret={name}&wait={}", client.url("coffer/changes"), wait.as_secs());
    if let Some(a) = after {
        url.push_str(&format!("&after={a}"));
    }
    if let Some(e) = epoch {
        url.push_str(&format!("&epoch={e}"));
    }
    match client.json::<ChangeFeed>(Method::GET, &url, None).await {
        Ok(feed) => Ok(Some(feed)),
        Err(ClientError::Api { status, .. })
            if status == StatusCode::NOT_FOUND.as_u16() || status == 405 || status == 400 =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

async fn refresh_loop(
    client: Arc<SecretClient>,
    name: String,
    options: WatchOptions,
    current: Arc<RwLock<Secret>>,
    mut feed: Option<ChangeFeed>,
) {
    let mut last_read = Instant::now();
    let mut has_feed = feed.is_some();
    loop {
        let mut reread = last_read.elapsed() >= options.ttl;
        if has_feed && !reread {
            let (after, epoch) =
                feed.as_ref().map_or((None, None), |f| (Some(f.head), Some(f.epoch.clone())));
            let wait = options.poll_wait.min(options.ttl.saturating_sub(last_read.elapsed()));
            match poll(&client, &name, after, epoch.as_deref(), wait).await {
                Ok(Some(next)) => {
                    reread = next.reset || !next.changes.is_empty();
                    feed = Some(next);
                }
                Ok(None) => has_feed = false,
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        } else if !reread {
            tokio::time::sleep(options.ttl.saturating_sub(last_read.elapsed())).await;
            reread = true;
        }
        if reread {
            match client.get_secret(&name, None).await {
                Ok(secret) => {
                    *current.write().expect("watched secret lock poisoned") = secret;
                    last_read = Instant::now();
                }
                // Keep serving the last good value; try again shortly.
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_from_challenges() {
        assert_eq!(
            challenge_resource(
                r#"Bearer authorization="https://login.localhost:8443/adfs", resource="https://localhost:8443""#
            ),
            Some("https://localhost:8443".into())
        );
        assert_eq!(
            challenge_resource(
                r#"Bearer authorization="https://login.microsoftonline.com/t", scope="https://vault.azure.net/.default""#
            ),
            Some("https://vault.azure.net".into())
        );
        assert_eq!(challenge_resource("Basic realm=x"), None);
    }

    #[test]
    fn watched_values_are_not_debug_printed() {
        let current = Arc::new(RwLock::new(Secret {
            value: Some(SecretString::new("hunter2".into())),
            ..Default::default()
        }));
        let w = WatchedSecret { current, task: tokio::runtime::Runtime::new().unwrap().spawn(async {}) };
        assert!(!format!("{w:?}").contains("hunter2"));
    }
}
