//! `coffer agent`: the host's managed-identity endpoint.
//!
//! A workload asks for a token the way it would on Azure (App Service `IDENTITY_ENDPOINT` or
//! IMDS), over loopback. The agent does not trust anything the caller says about itself: it
//! looks up the process on the other end of the TCP connection in the kernel's tables
//! ([`attest`]) and hands those facts to a [`TokenBroker`], which issues a token only for an
//! identity bound to matching facts. The `IDENTITY_HEADER` value is an anti-SSRF marker, not a
//! credential: knowing it without being a bound process gives nothing.

pub mod attest;
pub mod endpoint;
pub mod remote;

use async_trait::async_trait;
use coffer_core::identity::ProcessFacts;
use thiserror::Error;
use zeroize::Zeroizing;

/// What the agent asks of the server for one workload request.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BrokerRequest {
    pub resource: String,
    pub client_id: Option<String>,
    pub object_id: Option<String>,
    pub process: ProcessFacts,
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct BrokeredToken {
    pub access_token: Zeroizing<String>,
    pub expires_on: u64,
    pub resource: String,
    pub client_id: String,
}

impl std::fmt::Debug for BrokeredToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokeredToken")
            .field("expires_on", &self.expires_on)
            .field("resource", &self.resource)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Error)]
pub enum BrokerError {
    /// No identity is bound to the calling process (or the requested one is not).
    #[error("{0}")]
    NotBound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("the identity service is unavailable: {0}")]
    Unavailable(String),
}

/// Issues tokens for attested processes. Implemented in-process by the dev server and over
/// HTTPS by [`remote::RemoteBroker`].
#[async_trait]
pub trait TokenBroker: Send + Sync + 'static {
    async fn token(&self, request: BrokerRequest) -> Result<BrokeredToken, BrokerError>;
}
