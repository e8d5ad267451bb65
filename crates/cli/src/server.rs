//! `coffer server` and `coffer admin …`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use coffer_server::config::{FileConfig, Mode, ServerConfig};
use coffer_server::keyring::{self, RootKeySource};
use tokio::sync::watch;
use zeroize::Zeroizing;

/// Every server setting; each also a config-file key (same name with `_`) and an environment
/// variable. Flags and environment win over the file.
#[derive(Args, Clone, Default)]
pub struct ServerSettings {
    /// TOML config file (production mode).
    #[arg(long, env = "COFFER_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (database, keys; dev mode default ./coffer-data).
    #[arg(long, env = "COFFER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:8443).
    #[arg(long, env = "COFFER_LISTEN")]
    listen: Option<String>,
    /// DNS zone: vaults are served at https://<vault>.<zone> (default localhost).
    #[arg(long, env = "COFFER_ZONE")]
    zone: Option<String>,
    /// Port clients use, when it differs from the listening port (e.g. behind a forwarder).
    #[arg(long, env = "COFFER_PUBLIC_PORT")]
    public_port: Option<u16>,
    /// Tenant id named in the authentication challenge (default: generated once).
    #[arg(long, env = "COFFER_TENANT_ID")]
    tenant_id: Option<String>,
    /// PEM certificate chain (production).
    #[arg(long, env = "COFFER_TLS_CERT_FILE")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key (production).
    #[arg(long, env = "COFFER_TLS_KEY_FILE")]
    tls_key_file: Option<PathBuf>,
    /// Root key file: 32 bytes, or 64 hex characters.
    #[arg(long, env = "COFFER_ROOT_KEY_FILE")]
    root_key_file: Option<PathBuf>,
    /// File holding the root-key passphrase (never the passphrase itself in a variable).
    #[arg(long, env = "COFFER_ROOT_KEY_PASSPHRASE_FILE")]
    root_key_passphrase_file: Option<PathBuf>,
    /// Lifetime of issued access tokens, in seconds (default 3600).
    #[arg(long, env = "COFFER_TOKEN_LIFETIME_SECS")]
    token_lifetime_secs: Option<u64>,
    /// Longest accepted life of a federated token from an outside issuer, in seconds (default
    /// 3600; at most 86400).
    #[arg(long, env = "COFFER_FEDERATED_TOKEN_MAX_LIFETIME_SECS")]
    federated_token_max_lifetime_secs: Option<u64>,
    /// Dev mode: loopback address of the built-in managed-identity endpoint (default: the
    /// listening port + 1).
    #[arg(long, env = "COFFER_AGENT_LISTEN")]
    agent_listen: Option<String>,
    /// Audit every request (default on). `off` is for benchmarks only.
    #[arg(long, env = "COFFER_AUDIT", value_parser = parse_on_off)]
    audit: Option<bool>,
    /// Audit log directory (default DATA_DIR/audit).
    #[arg(long, env = "COFFER_AUDIT_DIR")]
    audit_dir: Option<PathBuf>,
    /// Also print audit records to stdout (container logs).
    #[arg(long, env = "COFFER_AUDIT_STDOUT")]
    audit_stdout: Option<bool>,
    /// Prune audit files older than this many days (default: keep all).
    #[arg(long, env = "COFFER_AUDIT_RETENTION_DAYS")]
    audit_retention_days: Option<u64>,
    /// Rotate the audit file beyond this size (default 4 MiB).
    #[arg(long, env = "COFFER_AUDIT_MAX_FILE_MIB")]
    audit_max_file_mib: Option<u64>,
    /// Prune the oldest rotated audit files while they together exceed this many MiB (default:
    /// no size bound); pruning is signed, `coffer audit verify` still passes.
    #[arg(long, env = "COFFER_AUDIT_MAX_TOTAL_MIB")]
    audit_max_total_mib: Option<u64>,
    /// Warn (once a minute) and answer /readyz with 503 when the audit filesystem has less
    /// free space than this many MiB (default 256).
    #[arg(long, env = "COFFER_AUDIT_MIN_FREE_MIB")]
    audit_min_free_mib: Option<u64>,
    /// Size of the audit commit journal, a preallocated file that makes each group commit
    /// durable with one fsync (default 8 MiB; 0 turns it off).
    #[arg(long, env = "COFFER_AUDIT_JOURNAL_MIB")]
    audit_journal_mib: Option<u64>,
    /// Seconds a client has to send a request's headers (default 10).
    #[arg(long, env = "COFFER_HEADER_TIMEOUT_SECS")]
    header_timeout_secs: Option<u64>,
    /// Seconds a client has to send a request's body (default 30).
    #[arg(long, env = "COFFER_BODY_TIMEOUT_SECS")]
    body_timeout_secs: Option<u64>,
    /// Seconds a connection may stay open with no request in progress (default 60).
    #[arg(long, env = "COFFER_IDLE_TIMEOUT_SECS")]
    idle_timeout_secs: Option<u64>,
    /// Connections open at once (default 4096, or fewer under a lower descriptor limit).
    #[arg(long, env = "COFFER_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Connections open at once from one IP address (default 256).
    #[arg(long, env = "COFFER_MAX_CONNECTIONS_PER_ADDRESS")]
    max_connections_per_address: Option<usize>,
    /// Requests failing authentication allowed per client address and second (default 50);
    /// past that they get 429 and are audited as one record per burst.
    #[arg(long, env = "COFFER_FAILED_REQUESTS_PER_SEC")]
    failed_requests_per_sec: Option<u32>,
    /// How many failing requests a client address may make at once (default 200).
    #[arg(long, env = "COFFER_FAILED_REQUESTS_BURST")]
    failed_requests_burst: Option<u32>,
    /// Requests one authenticated principal may make per second (default 2000; 0: no limit);
    /// past that, Key Vault's 429 with Retry-After.
    #[arg(long, env = "COFFER_PRINCIPAL_REQUESTS_PER_SEC")]
    principal_requests_per_sec: Option<u32>,
    /// How many requests one principal may make at once (default 4000).
    #[arg(long, env = "COFFER_PRINCIPAL_REQUESTS_BURST")]
    principal_requests_burst: Option<u32>,
    /// Internal addresses webhooks and federation JWKS URLs may reach (comma-separated ranges,
    /// addresses or host names, e.g. 127.0.0.1,10.0.0.0/8,hooks.internal); by default loopback,
    /// private and link-local addresses are refused.
    #[arg(long, env = "COFFER_OUTBOUND_ALLOW", value_delimiter = ',')]
    outbound_allow: Vec<String>,
}

fn parse_on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err("expected on or off".into()),
    }
}

#[derive(Args)]
pub struct ServerArgs {
    /// Development mode: local CA, key file and a `dev` vault, created on first start.
    #[arg(long)]
    dev: bool,
    #[command(flatten)]
    settings: ServerSettings,
}

impl ServerSettings {
    fn resolve(&self, mode: Mode) -> Result<ServerConfig> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let flags = FileConfig {
            data_dir: self.data_dir.clone(),
            listen: self.listen.clone(),
            zone: self.zone.clone(),
            public_port: self.public_port,
            tenant_id: self.tenant_id.clone(),
            tls_cert_file: self.tls_cert_file.clone(),
            tls_key_file: self.tls_key_file.clone(),
            root_key_file: self.root_key_file.clone(),
            root_key_passphrase_file: self.root_key_passphrase_file.clone(),
            token_lifetime_secs: self.token_lifetime_secs,
            federated_token_max_lifetime_secs: self.federated_token_max_lifetime_secs,
            agent_listen: self.agent_listen.clone(),
            audit: self.audit,
            audit_dir: self.audit_dir.clone(),
            audit_stdout: self.audit_stdout,
            audit_retention_days: self.audit_retention_days,
            audit_max_file_mib: self.audit_max_file_mib,
            audit_max_total_mib: self.audit_max_total_mib,
            audit_min_free_mib: self.audit_min_free_mib,
            audit_journal_mib: self.audit_journal_mib,
            header_timeout_secs: self.header_timeout_secs,
            body_timeout_secs: self.body_timeout_secs,
            idle_timeout_secs: self.idle_timeout_secs,
            max_connections: self.max_connections,
            max_connections_per_address: self.max_connections_per_address,
            failed_requests_per_sec: self.failed_requests_per_sec,
            failed_requests_burst: self.failed_requests_burst,
            principal_requests_per_sec: self.principal_requests_per_sec,
            principal_requests_burst: self.principal_requests_burst,
            outbound_allow: (!self.outbound_allow.is_empty()).then(|| self.outbound_allow.clone()),
        };
        Ok(ServerConfig::resolve(mode, file.overlay(flags), prompt_passphrase)?)
    }

    /// Offline tools work on either kind of data directory: dev if no config file is given.
    fn resolve_for_tools(&self) -> Result<ServerConfig> {
        let mode =
            if self.config.is_some() || self.tls_cert_file.is_some() { Mode::Production } else { Mode::Dev };
        self.resolve(mode)
    }
}

fn prompt_passphrase() -> Option<Zeroizing<String>> {
    if !std::io::stdin().is_terminal() {
        return None;
    }
    rpassword::prompt_password("Root key passphrase: ").ok().map(Zeroizing::new)
}

pub async fn run_server(args: ServerArgs) -> Result<()> {
    let mode = if args.dev { Mode::Dev } else { Mode::Production };
    let config = args.settings.resolve(mode).context("refusing to start")?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    coffer_server::run(config, rx).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Print an administrator access token, minted from the data directory.
    Token {
        #[command(flatten)]
        settings: ServerSettings,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
    /// Re-wrap every stored key under a new root key (stop the server first).
    RewrapRootKey {
        #[command(flatten)]
        settings: ServerSettings,
        /// The new root key file (created with a random key if --generate is given).
        #[arg(long, conflicts_with = "new_passphrase_file")]
        new_root_key_file: Option<PathBuf>,
        /// Switch to a passphrase-derived root key read from this file.
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
        /// Generate a random new root key into --new-root-key-file.
        #[arg(long, requires = "new_root_key_file")]
        generate: bool,
    },
}

pub async fn run_admin(cmd: AdminCommand) -> Result<()> {
    match cmd {
        AdminCommand::Token { settings, ttl_secs } => {
            if !(60..=7 * 86_400).contains(&ttl_secs) {
                bail!("--ttl-secs must be between 60 and 604800");
            }
            let token = Zeroizing::new(
                coffer_server::mint_admin_token(settings.resolve_for_tools()?, ttl_secs).await?,
            );
            println!("{}", &*token);
        }
        AdminCommand::RewrapRootKey { settings, new_root_key_file, new_passphrase_file, generate } => {
            let new_source = match (new_root_key_file, new_passphrase_file) {
                (Some(path), None) => {
                    if generate {
                        keyring::create_root_key_file(&path).with_context(|| {
                            format!("cannot create {} (it must not exist yet)", path.display())
                        })?;
                    }
                    RootKeySource::KeyFile(path)
                }
                (None, Some(path)) => RootKeySource::PassphraseFile(path),
                _ => bail!("give --new-root-key-file or --new-passphrase-file"),
            };
            let config = settings.resolve_for_tools()?;
            let n = coffer_server::rewrap_root_key(config, new_source).await?;
            eprintln!(
                "re-wrapped {n} keys under the new root key; start the server with the new root-key source"
            );
        }
    }
    Ok(())
}
