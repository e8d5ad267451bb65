//! `coffer`: the server, the admin tools and the CLI client in one binary.

mod audit;
mod events;
mod identity;
mod migrate;
mod output;
mod secret;
mod server;
mod vault;

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use coffer_client::{ClientConfig, CofferClient};
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(name = "coffer", version, about = "A self-hosted secrets vault speaking the Azure Key Vault API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (HTTPS only). `--dev` runs a local development server.
    Server(server::ServerArgs),
    /// Manage vaults (admin API).
    #[command(subcommand)]
    Vault(vault::VaultCommand),
    /// Manage secrets in a vault (Key Vault API), like `az keyvault secret`.
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// Move secrets out of .env files, stdin or docker-compose files into a vault.
    Migrate(migrate::MigrateArgs),
    /// Offline administration of a data directory (run where the server's files are).
    #[command(subcommand)]
    Admin(server::AdminCommand),
    /// Managed identities, and principals of every kind (list, show, disable, delete, bind).
    #[command(subcommand)]
    Identity(identity::IdentityCommand),
    /// Service principals (client secrets) for CI and automation.
    #[command(subcommand)]
    Sp(identity::SpCommand),
    /// Users (people; password sign-in).
    #[command(subcommand)]
    User(identity::UserCommand),
    /// Groups of principals.
    #[command(subcommand)]
    Group(identity::GroupCommand),
    /// Role assignments and definitions (Key Vault's built-in roles and custom ones).
    #[command(subcommand)]
    Role(identity::RoleCommand),
    /// Trust outside OIDC issuers (Kubernetes, CI) for a principal.
    #[command(subcommand)]
    Federation(identity::FederationCommand),
    /// The host agent: create/join/run the managed-identity endpoint.
    #[command(subcommand)]
    Agent(identity::AgentCommand),
    /// The audit log: query, verify the hash chain and signatures, export the public key.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// `coffer event …` (webhook subscriptions) and `coffer rotation …` (rotation policies).
    #[command(flatten)]
    Events(events::EventsCommand),
}

/// How the CLI reaches a server; read from the environment written to `admin.env`.
#[derive(Args, Clone)]
pub struct Connection {
    /// Server root URL, e.g. https://localhost:8443.
    #[arg(long, env = "COFFER_URL", global = true)]
    url: Option<String>,
    /// Bearer token. Prefer the environment variable over the flag (flags show in `ps`).
    #[arg(long, env = "COFFER_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// PEM file of the CA to trust (the dev CA is DATA_DIR/ca.pem). Falls back to SSL_CERT_FILE.
    #[arg(long, env = "COFFER_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = output::Format::Table, global = true)]
    output: output::Format,
}

impl Connection {
    pub fn client(&self) -> Result<CofferClient> {
        let url = self
            .url
            .clone()
            .context("no server URL: set COFFER_URL (source DATA_DIR/admin.env) or pass --url")?;
        let token = Zeroizing::new(
            self.token
                .clone()
                .context("no token: set COFFER_TOKEN (source DATA_DIR/admin.env) or pass --token")?,
        );
        let ca_file = self.ca_file.clone().or_else(|| std::env::var_os("SSL_CERT_FILE").map(PathBuf::from));
        let ca_pem = ca_file
            .map(|path| {
                std::fs::read(&path).with_context(|| format!("cannot read the CA file {}", path.display()))
            })
            .transpose()?;
        Ok(CofferClient::new(ClientConfig { server_url: url, token, ca_pem })?)
    }
}

fn main() {
    let cli = Cli::parse();
    let is_server =
        matches!(cli.command, Command::Server(_) | Command::Agent(identity::AgentCommand::Run { .. }));
    init_tracing(is_server);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Server(args) => server::run_server(args).await,
            Command::Vault(cmd) => vault::run(cmd).await,
            Command::Secret(cmd) => secret::run(cmd).await,
            Command::Migrate(args) => migrate::run(args).await,
            Command::Admin(cmd) => server::run_admin(cmd).await,
            Command::Identity(cmd) => identity::identity(cmd).await,
            Command::Sp(cmd) => identity::sp(cmd).await,
            Command::User(cmd) => identity::user(cmd).await,
            Command::Group(cmd) => identity::group(cmd).await,
            Command::Role(cmd) => identity::role(cmd).await,
            Command::Federation(cmd) => identity::federation(cmd).await,
            Command::Agent(cmd) => identity::agent(cmd).await,
            Command::Audit(cmd) => audit::run(cmd).await,
            Command::Events(cmd) => events::run(cmd).await,
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn init_tracing(server: bool) {
    let default = if server { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("COFFER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
