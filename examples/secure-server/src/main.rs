//! `secure-server --listen ADDR`: an HTTP API whose `GET /` answers 200 only with
//! `Authorization: Bearer <the vault secret demo-api-key>`.
//!
//! Nothing secret is in its environment, arguments or disk: it reads `AZURE_KEYVAULT_URL`,
//! authenticates with the host's managed identity (`IDENTITY_ENDPOINT`, attested by the Coffer
//! agent), and keeps the key in memory, following new versions without a restart.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::get;
use axum::Router;
use clap::Parser;
use coffer_client::credential::DefaultCredential;
use coffer_client::secrets::{SecretClient, WatchOptions, WatchedSecret};
use subtle::ConstantTimeEq;

#[derive(Parser)]
struct Args {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The vault secret holding the API key.
    #[arg(long, default_value = "demo-api-key")]
    secret_name: String,
}

async fn index(State(key): State<Arc<WatchedSecret>>, headers: HeaderMap) -> (StatusCode, &'static str) {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let Some(expected) = key.value() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "{\"error\":\"the API key is not available\"}\n");
    };
    // Constant time: the comparison must not reveal how much of the key matched.
    let lengths_match = presented.len() == expected.expose().len();
    let bytes_match = presented.as_bytes().ct_eq(expected.expose().as_bytes()).unwrap_u8() == 1;
    if lengths_match && bytes_match {
        (StatusCode::OK, "{\"status\":\"ok\",\"message\":\"Hello from the secure server\"}\n")
    } else {
        (StatusCode::UNAUTHORIZED, "{\"error\":\"missing or invalid bearer token\"}\n")
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let vault_url =
        std::env::var("AZURE_KEYVAULT_URL").context("set AZURE_KEYVAULT_URL to the vault's URL")?;
    let credential = Arc::new(DefaultCredential::new()?);
    let client = Arc::new(SecretClient::new(&vault_url, credential)?);
    let key = client
        .watch(&args.secret_name, WatchOptions::default())
        .await
        .with_context(|| format!("cannot read the secret '{}' from {vault_url}", args.secret_name))?;
    let version = key.version().unwrap_or_default();
    let app = Router::new().route("/", get(index)).with_state(Arc::new(key));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    println!("secure-server ready on http://{} (API key version {version})", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
