//! The agent on its own host: joins the server once with a one-time join token, then brokers
//! workload tokens over HTTPS with its node credential (client id + secret, exchanged for a
//! short-lived agent token at the server's token endpoint).

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{BrokerError, BrokerRequest, BrokeredToken, TokenBroker};

/// The agent's node credential, kept in a 0600 file.
#[derive(Serialize, Deserialize)]
pub struct NodeCredential {
    pub server_url: String,
    pub tenant_id: String,
    pub agent_id: String,
    pub client_id: String,
    pub client_secret: Zeroizing<String>,
    /// The resource (audience) of the server, `https://<zone>[:port]`.
    pub resource: String,
}

impl NodeCredential {
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let text = Zeroizing::new(std::fs::read_to_string(path)?);
        serde_json::from_str(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Writes the credential file with mode 0600; refuses to overwrite.
    pub fn save_new(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let text = Zeroizing::new(serde_json::to_string_pretty(self).map_err(std::io::Error::other)?);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    }

    fn login_base(&self) -> String {
        // https://<zone>[:port] → https://login.<zone>[:port]
        self.server_url.replacen("https://", "https://login.", 1)
    }
}

/// The join endpoint's answer.
#[derive(Deserialize)]
struct JoinResponse {
    agent_id: String,
    client_id: String,
    client_secret: Zeroizing<String>,
    tenant_id: String,
    resource: String,
}

/// An HTTPS client for the server at `server_url`, trusting `ca_pem` in addition to the system.
pub fn http_client(server_url: &str, ca_pem: Option<&[u8]>) -> Result<reqwest::Client, String> {
    let resolver = coffer_client::zone_resolver(server_url).map_err(|e| e.to_string())?;
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .https_only(true)
        .timeout(Duration::from_secs(30))
        .dns_resolver(resolver);
    if let Some(pem) = ca_pem {
        for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(|e| e.to_string())? {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| e.to_string())
}

/// Redeems a join token: the server creates this agent's principal and node credential.
pub async fn join(
    server_url: &str,
    join_token: &str,
    http: &reqwest::Client,
) -> Result<NodeCredential, String> {
    let login = server_url.trim_end_matches('/').replacen("https://", "https://login.", 1);
    let response = http
        .post(format!("{login}/coffer/agents/join"))
        .json(&serde_json::json!({ "joinToken": join_token }))
        .send()
        .await
        .map_err(|e| format!("cannot reach {login}: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        return Err(format!("the server refused the join token ({status}): {text}"));
    }
    let joined: JoinResponse = response.json().await.map_err(|e| e.to_string())?;
    Ok(NodeCredential {
        server_url: server_url.trim_end_matches('/').to_owned(),
        tenant_id: joined.tenant_id,
        agent_id: joined.agent_id,
        client_id: joined.client_id,
        client_secret: joined.client_secret,
        resource: joined.resource,
    })
}

pub struct RemoteBroker {
    credential: NodeCredential,
    http: reqwest::Client,
    agent_token: Mutex<Option<(Zeroizing<String>, u64)>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Zeroizing<String>,
    expires_in: u64,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl RemoteBroker {
    pub fn new(credential: NodeCredential, http: reqwest::Client) -> Self {
        Self { credential, http, agent_token: Mutex::new(None) }
    }

    /// The agent's own access token, refreshed when less than 5 minutes remain.
    async fn agent_token(&self) -> Result<Zeroizing<String>, BrokerError> {
        if let Some((token, exp)) = self.agent_token.lock().expect("lock").as_ref() {
            if *exp > now() + 300 {
                return Ok(token.clone());
            }
        }
        let c = &self.credential;
        let url = format!("{}/{}/oauth2/v2.0/token", c.login_base(), c.tenant_id);
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", c.client_id.as_str()),
            ("client_secret", c.client_secret.as_str()),
            ("scope", &format!("{}/.default", c.resource)),
        ];
        let response = self
            .http
            .post(&url)
            .form(&form)
            .send()
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        if !response.status().is_success() {
            let status = response.status();
            return Err(BrokerError::Unavailable(format!(
                "the server refused the agent's credential ({status})"
            )));
        }
        let token: TokenResponse =
            response.json().await.map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        let exp = now() + token.expires_in;
        *self.agent_token.lock().expect("lock") = Some((token.access_token.clone(), exp));
        Ok(token.access_token)
    }
}

#[async_trait]
impl TokenBroker for RemoteBroker {
    async fn token(&self, request: BrokerRequest) -> Result<BrokeredToken, BrokerError> {
        let agent_token = self.agent_token().await?;
        let url = format!("{}/coffer/agents/token", self.credential.login_base());
        let response = self
            .http
            .post(&url)
            .bearer_auth(agent_token.as_str())
            .json(&request)
            .send()
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        let status = response.status();
        if status.is_success() {
            return response.json().await.map_err(|e| BrokerError::Unavailable(e.to_string()));
        }
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error_description"].as_str().map(str::to_owned))
            .unwrap_or(text);
        Err(match status.as_u16() {
            403 => BrokerError::NotBound(message),
            400 => BrokerError::BadRequest(message),
            _ => BrokerError::Unavailable(format!("{status}: {message}")),
        })
    }
}
