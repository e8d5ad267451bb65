//! `coffer server`: the Key Vault secrets API, Coffer's admin API and (later) the token
//! service, over HTTPS only.
//!
//! Start-up order matters and is the same in every mode: check TLS material and the root-key
//! source, open the store, unlock the keyring, load token keys and vaults, bind, then print
//! `ready`.

pub mod api;
pub mod argon;
pub mod broker;
pub mod config;
pub mod directory;
pub mod events;
pub mod files;
pub mod health;
/// Entry points for the fuzz targets in `fuzz/` (see `fuzz/README.md`): the parsers the server
/// runs on untrusted input, unchanged. Not an API; nothing else calls them.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::api::fuzzing::*;
    pub use crate::vaults::backup_fuzzing;
}
pub mod keyring;
pub mod outbound;
pub mod replay;
pub mod rotation;
pub mod serve;
pub mod throttle;
pub mod tls;
pub mod tokens;
pub mod vaults;

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use coffer_core::authz::{self, Principal, PrincipalKind};
use coffer_core::identity::CredentialKind;
use coffer_core::model::RetentionPolicy;
use coffer_core::names::VaultName;
use coffer_store::{SqliteStore, Store};
use tokio::sync::watch;

use crate::api::AppState;
use crate::config::{Mode, ServerConfig, TlsSource};
use crate::directory::Directory;
use crate::keyring::{Keyring, RootKeySource};
use crate::tokens::TokenAuthority;
use crate::vaults::VaultService;

pub const DEV_VAULT: &str = "dev";
const TENANT_META: &str = "tenant-id";
const ADMIN_META: &str = "admin-object-id";
/// Lifetime of the dev administrator token written to `admin.env`.
pub const DEV_ADMIN_TOKEN_SECS: u64 = 24 * 3600;

/// Everything that runs behind the listener, opened and unlocked.
pub struct Core {
    pub config: ServerConfig,
    pub store: Arc<dyn Store>,
    pub keyring: Arc<Keyring>,
    pub tenant_id: String,
    pub tokens: TokenAuthority,
    pub vaults: VaultService,
    pub directory: Directory,
}

pub fn database_path(data_dir: &Path) -> PathBuf {
    data_dir.join("coffer.db")
}

pub const ADMIN_NAME: &str = "coffer-admin";
pub const DEV_AGENT_NAME: &str = "dev-agent";
/// Where the dev agent's `IDENTITY_HEADER` is kept: an anti-SSRF marker that the SDKs echo back,
/// not a credential (the agent attests the caller). Random per data directory, like App Service's
/// per instance, and kept across restarts so that a workload's copy of `dev.env` stays valid.
const DEV_IDENTITY_HEADER_FILE: &str = "identity-header";

/// The data directory's `IDENTITY_HEADER`, made on first use.
fn dev_identity_header(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(DEV_IDENTITY_HEADER_FILE);
    match std::fs::read_to_string(&path) {
        Ok(kept) if kept.len() == 64 && kept.bytes().all(|b| b.is_ascii_hexdigit()) => return Ok(kept),
        Ok(_) => tracing::warn!(path = %path.display(), "replacing a malformed IDENTITY_HEADER file"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let fresh = coffer_agent::endpoint::random_identity_header();
    files::replace_file(&path, fresh.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(fresh)
}

/// The Argon2id budget: one computation per core (at most four), 19 MiB each, so credential
/// checks can never hold more than 76 MiB however many sign-ins arrive at once; a check that
/// waits longer than two seconds for its turn is refused with 429 (see `argon.rs`).
fn argon_pool() -> argon::Argon2Pool {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    argon::Argon2Pool::new(cores.min(4), std::time::Duration::from_secs(2))
}

impl Core {
    /// Opens the data directory (creating it in dev mode) and unlocks the keys.
    pub async fn open(config: ServerConfig) -> anyhow::Result<Self> {
        if config.mode == Mode::Dev {
            files::create_data_dir(&config.data_dir)
                .with_context(|| format!("cannot create the data directory {}", config.data_dir.display()))?;
            if let RootKeySource::KeyFile(path) = &config.root_key {
                if !path.exists() && !database_path(&config.data_dir).exists() {
                    keyring::create_root_key_file(path)
                        .with_context(|| format!("cannot create the root key file {}", path.display()))?;
                }
            }
        } else if !config.data_dir.is_dir() {
            files::create_private_dir(&config.data_dir).with_context(|| {
                format!(
                    "the data directory {} does not exist and cannot be created",
                    config.data_dir.display()
                )
            })?;
        }
        let db = database_path(&config.data_dir);
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&db).with_context(|| format!("cannot open the database {}", db.display()))?,
        );
        restrict_database_files(&db)?;
        let root = config.root_key.load(store.as_ref()).await.context("cannot load the root key")?;
        let keyring =
            Arc::new(Keyring::open(store.as_ref(), root).await.context("cannot unlock the keyring")?);
        let generated = uuid::Uuid::new_v4().to_string().into_bytes();
        let stored_tenant = String::from_utf8(store.init_meta(TENANT_META, generated).await?)
            .context("the stored tenant id is not UTF-8")?;
        let tenant_id = config.tenant_id.clone().unwrap_or(stored_tenant);
        let issuer = format!("{}/v2.0", AppState::authority(&config.zone, config.public_port, &tenant_id));
        let audience = AppState::resource(&config.zone, config.public_port);
        let tokens = TokenAuthority::load(
            store.as_ref(),
            &keyring,
            issuer,
            audience,
            tenant_id.clone(),
            config.token_lifetime_secs,
        )
        .await
        .context("cannot load the token-signing keys")?;
        let vaults =
            VaultService::load(store.clone(), keyring.clone()).await.context("cannot load the vaults")?;
        let directory = Directory::load(store.clone(), argon_pool())
            .await
            .context("cannot load the identity directory")?;
        let core = Self { config, store, keyring, tenant_id, tokens, vaults, directory };
        core.ensure_admin().await?;
        Ok(core)
    }

    /// The built-in administrator, a service principal holding `Coffer Administrator` on `/`,
    /// created on first start.
    pub async fn ensure_admin(&self) -> anyhow::Result<Principal> {
        let oid = String::from_utf8(
            self.store.init_meta(ADMIN_META, uuid::Uuid::new_v4().to_string().into_bytes()).await?,
        )?;
        let snapshot = self.directory.snapshot();
        let existing = snapshot.principal(&oid).cloned();
        let principal = Principal {
            object_id: oid.clone(),
            client_id: existing
                .as_ref()
                .map_or_else(|| uuid::Uuid::new_v4().to_string(), |p| p.client_id.clone()),
            display_name: ADMIN_NAME.into(),
            kind: PrincipalKind::ServicePrincipal,
            enabled: true,
        };
        if existing.as_ref() != Some(&principal) {
            self.store.put_principal(&principal).await?;
        }
        let has_role = snapshot.assignments.iter().any(|a| {
            a.principal_id == oid
                && a.role_id == authz::COFFER_ADMINISTRATOR
                && a.scope == authz::Scope::Server
        });
        if !has_role {
            self.store
                .add_role_assignment(&authz::RoleAssignment {
                    id: uuid::Uuid::new_v4().to_string(),
                    principal_id: oid,
                    role_id: authz::COFFER_ADMINISTRATOR.into(),
                    scope: authz::Scope::Server,
                })
                .await?;
        }
        self.directory.reload().await?;
        Ok(principal)
    }

    /// Mints an access token for the administrator.
    pub async fn admin_token(&self, lifetime_secs: u64) -> anyhow::Result<String> {
        let admin = self.ensure_admin().await?;
        Ok(self.tokens.issue(&admin.object_id, lifetime_secs).0)
    }

    pub fn server_url(&self) -> String {
        AppState::resource(&self.config.zone, self.config.public_port)
    }

    /// The dev agent principal, created on first use.
    async fn ensure_dev_agent(&self) -> anyhow::Result<Principal> {
        if let Some(p) = self.directory.snapshot().resolve(DEV_AGENT_NAME) {
            return Ok(p.clone());
        }
        Ok(self.directory.create_principal(DEV_AGENT_NAME, PrincipalKind::Agent).await?)
    }
}

/// The database holds only ciphertext and wrapped keys, but its metadata (names, tags) is
/// still nobody else's business: owner-only, like the key files. SQLite gives the WAL and
/// shared-memory files the database file's mode.
fn restrict_database_files(db: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{suffix}", db.display()));
        if path.exists() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot restrict the permissions of {}", path.display()))?;
        }
    }
    Ok(())
}

/// Runs the server until `shutdown` turns true. Prints a line containing `ready` once the
/// listener accepts connections.
pub async fn run(config: ServerConfig, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    // TLS first: production refuses to start without readable certificate and key.
    let prod_cert = match &config.tls {
        TlsSource::Files { cert, key } => Some(tls::load_certified_key(cert, key)?),
        TlsSource::DevCa => None,
    };
    let core = Core::open(config).await?;
    let config = core.config.clone();
    let resolver: Arc<dyn rustls::server::ResolvesServerCert> = match prod_cert {
        Some(certified) => Arc::new(tls::FixedCert(Arc::new(certified))),
        None => {
            let pki = tls::DevPki::ensure(&config.data_dir, &config.zone)?;
            pki.resolver(&config.zone)
        }
    };
    let tls_config = tls::server_config(resolver)?;

    // Dev mode: the in-process agent's loopback endpoint, bound before the env files name it.
    let agent_listener = match (config.mode, config.agent_listen) {
        (Mode::Dev, Some(addr)) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} for the managed-identity endpoint (pass --agent-listen)")
        })?),
        _ => None,
    };
    // The audit log opens (reading its active file) on a blocking thread while dev mode
    // bootstraps (hashing the fresh admin secret with Argon2id): the two slow start-up steps.
    let audit_opening = if config.audit.enabled {
        let (audit_config, dir) = audit_config(&core).await?;
        Some(tokio::task::spawn_blocking(move || open_audit(audit_config, &dir)))
    } else {
        tracing::warn!("AUDITING IS OFF: requests are not recorded (for benchmarks only)");
        None
    };
    let identity_header =
        agent_listener.as_ref().map(|_| dev_identity_header(&config.data_dir)).transpose()?;
    if config.mode == Mode::Dev {
        let agent_addr = agent_listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let agent = agent_addr.zip(identity_header.as_deref());
        dev_bootstrap(&core, agent).await?;
    }

    let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| {
        format!("cannot listen on {} (is another server using the port? pass --listen)", config.listen)
    })?;
    let audit = match audit_opening {
        Some(opening) => Some(opening.await.context("opening the audit log panicked")??),
        None => None,
    };
    let challenge = AppState::challenge_header(&config.zone, config.public_port, &core.tenant_id);
    let dev_agent = if config.mode == Mode::Dev { Some(core.ensure_dev_agent().await?) } else { None };
    let Core { store, tokens, vaults, directory, keyring, .. } = core;
    let state = Arc::new(AppState {
        zone: config.zone.clone(),
        public_port: config.public_port,
        public_host: AppState::public_host(&config.zone, config.public_port),
        challenge,
        tokens,
        vaults,
        directory,
        federation_keys: Default::default(),
        assertion_ids: Default::default(),
        outbound: config.outbound.clone(),
        federated_token_max_lifetime_secs: config.federated_token_max_lifetime_secs,
        keyring,
        store,
        audit,
        sign_in_delays: Default::default(),
        failures: throttle::FailureThrottle::new(
            config.connections.failed_requests.0,
            config.connections.failed_requests.1,
        ),
        principal_limits: throttle::PrincipalThrottle::new(
            config.connections.principal_requests.0,
            config.connections.principal_requests.1,
        ),
        health: health::Health::new(
            config.audit.min_free_mib * 1024 * 1024,
            config.audit.max_total_mib.map(|m| m * 1024 * 1024),
        ),
    });
    if let (Some(agent), Some(listener), Some(identity_header)) = (dev_agent, agent_listener, identity_header)
    {
        let broker = Arc::new(broker::LocalBroker { state: state.clone(), agent_id: agent.object_id });
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stop.changed().await;
            };
            if let Err(e) = coffer_agent::endpoint::serve(listener, identity_header, broker, stopped).await {
                tracing::error!(error = %e, "the dev managed-identity endpoint failed");
            }
        });
    }
    spawn_purger(state.clone(), shutdown.clone());
    spawn_burst_recorder(state.clone(), shutdown.clone());
    health::spawn_disk_alarm(state.clone(), shutdown.clone());
    events::spawn_dispatcher(state.clone(), &config.data_dir, shutdown.clone());
    rotation::spawn_rotator(state.clone(), shutdown.clone());
    let app = api::router(state.clone());
    println!(
        "coffer ready: listening on https://{} (zone {}, {} mode)",
        config.listen,
        config.zone,
        if config.mode == Mode::Dev { "dev" } else { "production" }
    );
    let served = serve::serve(listener, tls_config, app, config.connections.clone(), shutdown.clone());
    tokio::select! {
        r = served => r.context("the listener failed")?,
        _ = shutdown.changed() => {}
    }
    record_refused_bursts(&state, Duration::ZERO, Duration::ZERO).await;
    if let Some(audit) = &state.audit {
        if let Err(e) = audit.shutdown().await {
            tracing::error!(error = %e, "closing the audit log failed");
        }
    }
    Ok(())
}

/// Writes the audit records of refused bursts once a second: a burst is recorded when its
/// client has been quiet for 2 s, or every 10 s while it goes on.
fn spawn_burst_recorder(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
            record_refused_bursts(&state, Duration::from_secs(2), Duration::from_secs(10)).await;
        }
    });
}

async fn record_refused_bursts(state: &AppState, quiet: Duration, max_age: Duration) {
    let bursts = state.failures.take_bursts(std::time::Instant::now(), quiet, max_age);
    let Some(audit) = &state.audit else { return };
    for (ip, burst) in bursts {
        if let Err(e) = audit.record(api::refused_burst_event(ip, &burst)).await {
            tracing::error!(error = %e, %ip, count = burst.count, "a refused burst could not be audited");
        }
    }
}

const AUDIT_HMAC_KEY: &str = "audit-hmac";
const AUDIT_SIGNING_KEY: &str = "audit-signing";
pub const AUDIT_PUBLIC_KEY_FILE: &str = "audit-public-key.pem";

/// The audit log's keys (kept wrapped under the root key), created on first use.
async fn audit_keys(
    core: &Core,
) -> anyhow::Result<(zeroize::Zeroizing<[u8; 32]>, zeroize::Zeroizing<Vec<u8>>)> {
    let load = |name: &'static str, make: fn() -> anyhow::Result<zeroize::Zeroizing<Vec<u8>>>| async move {
        if let Some(blob) = core.store.wrapped_key(name).await? {
            return Ok::<_, anyhow::Error>(core.keyring.unwrap_material(name, &blob)?);
        }
        let material = make()?;
        core.store.put_wrapped_key(name, core.keyring.wrap_material(name, &material)).await?;
        Ok(material)
    };
    let hmac = load(AUDIT_HMAC_KEY, || {
        let key = coffer_core::crypto::Key::generate();
        Ok(zeroize::Zeroizing::new(hex_to_bytes(&key.to_hex())))
    })
    .await?;
    let signing = load(AUDIT_SIGNING_KEY, || Ok(coffer_audit::generate_signing_key()?)).await?;
    let hmac: [u8; 32] = hmac.as_slice().try_into().context("the stored audit HMAC key is not 32 bytes")?;
    Ok((zeroize::Zeroizing::new(hmac), signing))
}

fn hex_to_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).filter_map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok()).collect()
}

/// The audit log's configuration: its directory (`<data dir>/audit` unless configured), keys and
/// settings.
async fn audit_config(core: &Core) -> anyhow::Result<(coffer_audit::AuditConfig, std::path::PathBuf)> {
    let settings = &core.config.audit;
    let dir = settings.dir.clone().unwrap_or_else(|| core.config.data_dir.join("audit"));
    let (hmac, signing) = audit_keys(core).await?;
    let mut config = coffer_audit::AuditConfig::new(&dir, hmac, signing);
    config.stdout = settings.stdout;
    config.max_file_bytes = settings.max_file_mib * 1024 * 1024;
    config.journal_bytes = settings.journal_mib * 1024 * 1024;
    config.retention = settings.retention_days.map(|d| Duration::from_secs(d * 86_400));
    config.max_total_bytes = settings.max_total_mib.map(|m| m * 1024 * 1024);
    Ok((config, dir))
}

/// Opens the audit log (blocking I/O) and publishes its public key.
fn open_audit(
    config: coffer_audit::AuditConfig,
    dir: &std::path::Path,
) -> anyhow::Result<coffer_audit::AuditLog> {
    let log = coffer_audit::AuditLog::open(config).with_context(|| {
        format!("cannot open the audit log in {} (the server refuses to run unaudited)", dir.display())
    })?;
    files::replace_file(&dir.join(AUDIT_PUBLIC_KEY_FILE), log.public_key_pem().as_bytes(), 0o644)
        .context("cannot write the audit public key")?;
    Ok(log)
}

/// Purges soft-deleted secrets past their retention period, once a minute.
fn spawn_purger(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            match state.vaults.purge_due().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(purged = n, "purged soft-deleted secrets past retention"),
                Err(e) => tracing::warn!(error = %e, "purging expired soft-deleted secrets failed"),
            }
            if let Err(e) = state.tokens.retire_old_keys(state.store.as_ref(), &state.keyring).await {
                tracing::warn!(error = %e, "retiring old token-signing keys failed");
            }
        }
    });
}

/// Dev mode: the `dev` vault, the administrator, `dev.env`, `admin.env` and a short how-to.
/// `agent`: the dev agent's address and `IDENTITY_HEADER`, for `dev.env`.
async fn dev_bootstrap(core: &Core, agent: Option<(std::net::SocketAddr, &str)>) -> anyhow::Result<()> {
    let config = &core.config;
    let dev = VaultName::parse(DEV_VAULT).expect("valid vault name");
    if core.vaults.vault(DEV_VAULT).is_none() {
        core.vaults
            .create_vault(dev, RetentionPolicy::new(RetentionPolicy::DEFAULT_DAYS, false)?)
            .await
            .context("cannot create the dev vault")?;
    }
    let token = zeroize::Zeroizing::new(core.admin_token(DEV_ADMIN_TOKEN_SECS).await?);
    // A fresh client secret per start (only its hash is stored), replacing the previous one.
    let admin = core.ensure_admin().await?;
    let secret = core.directory.add_secret(&admin.object_id, CredentialKind::ClientSecret, None).await?;
    core.store
        .delete_credentials(&admin.object_id, CredentialKind::ClientSecret, Some(&secret.credential_id))
        .await?;
    let authority = AppState::resource(&format!("login.{}", config.zone), config.public_port);
    let dir = std::fs::canonicalize(&config.data_dir)?;
    let ca = dir.join("ca.pem");
    let ca = ca.display();
    let vault_url = AppState::vault_url(&config.zone, config.public_port, DEV_VAULT);
    let server_url = core.server_url();
    let ca_lines = format!(
        "export SSL_CERT_FILE='{ca}'\nexport REQUESTS_CA_BUNDLE='{ca}'\nexport NODE_EXTRA_CA_CERTS='{ca}'\n"
    );
    let identity_lines = agent
        .map(|(a, header)| {
            format!(
                "export IDENTITY_ENDPOINT='http://{a}{}'\nexport IDENTITY_HEADER='{header}'\n\
                 export AZURE_POD_IDENTITY_AUTHORITY_HOST='http://{a}'\n",
                coffer_agent::endpoint::APP_SERVICE_PATH
            )
        })
        .unwrap_or_default();
    let dev_env = format!(
        "# Coffer dev server: what a workload needs. No credential: the managed-identity endpoint\n\
         # attests the calling process (bind it with `coffer identity bind`).\n\
         export AZURE_KEYVAULT_URL='{vault_url}'\n{identity_lines}{ca_lines}"
    );
    files::replace_file(&dir.join("dev.env"), dev_env.as_bytes(), 0o644)?;
    let admin_env = zeroize::Zeroizing::new(format!(
        "# Coffer dev administrator: a bearer token valid for {} hours. Keep this file private.\n\
         export COFFER_URL='{server_url}'\nexport COFFER_TOKEN='{}'\nexport COFFER_VAULT='{DEV_VAULT}'\n\
         export COFFER_CA_FILE='{ca}'\n{ca_lines}\
         export AZURE_TENANT_ID='{}'\nexport AZURE_CLIENT_ID='{}'\nexport AZURE_CLIENT_SECRET='{}'\n\
         export AZURE_AUTHORITY_HOST='{authority}'\n",
        DEV_ADMIN_TOKEN_SECS / 3600,
        &*token,
        core.tenant_id,
        admin.client_id,
        &*secret.secret,
    ));
    files::replace_file(&dir.join("admin.env"), admin_env.as_bytes(), 0o600)?;

    let vault_host = format!("{DEV_VAULT}.{}", config.zone);
    println!("Coffer dev server (data in {})", dir.display());
    println!("  vault:      {vault_url}");
    println!("  workload:   source {}/dev.env   (AZURE_KEYVAULT_URL and CA trust)", dir.display());
    println!("  admin CLI:  source {}/admin.env && coffer secret list", dir.display());
    if (vault_host.as_str(), config.public_port)
        .to_socket_addrs()
        .map(|mut a| a.next().is_none())
        .unwrap_or(true)
    {
        println!(
            "  note: {vault_host} does not resolve here; the SDKs need it to. Add this line to /etc/hosts:"
        );
        println!("    {} {vault_host} login.{}", config.listen.ip(), config.zone);
    }
    Ok(())
}

/// `coffer admin token`: an administrator token minted offline from the data directory.
pub async fn mint_admin_token(config: ServerConfig, lifetime_secs: u64) -> anyhow::Result<String> {
    let core = Core::open(config).await?;
    core.admin_token(lifetime_secs).await
}

/// `coffer admin rewrap-root-key`: re-wraps every stored key under a new root key.
pub async fn rewrap_root_key(config: ServerConfig, new_root: RootKeySource) -> anyhow::Result<usize> {
    let db = database_path(&config.data_dir);
    if !db.exists() {
        bail!("no database at {}: point --data-dir at an initialised data directory", db.display());
    }
    let store = SqliteStore::open(&db)?;
    let old = config.root_key.load(&store).await.context("cannot load the current root key")?;
    Keyring::open(&store, old.clone())
        .await
        .context("the current root key does not open this data directory")?;
    let new = new_root.load(&store).await.context("cannot load the new root key")?;
    Ok(keyring::rewrap_root(&store, &old, &new).await?)
}
