//! `coffer server`: the Key Vault secrets API, Coffer's admin API and (later) the token
//! service, over HTTPS only.
//!
//! Start-up order matters and is the same in every mode: check TLS material and the root-key
//! source, open the store, unlock the keyring, load token keys and vaults, bind, then print
//! `ready`.

pub mod api;
pub mod config;
pub mod files;
pub mod keyring;
pub mod serve;
pub mod tls;
pub mod tokens;
pub mod vaults;

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use coffer_core::authz::{Principal, PrincipalKind};
use coffer_core::model::RetentionPolicy;
use coffer_core::names::VaultName;
use coffer_store::{SqliteStore, Store};
use tokio::sync::watch;

use crate::api::AppState;
use crate::config::{Mode, ServerConfig, TlsSource};
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
}

pub fn database_path(data_dir: &Path) -> PathBuf {
    data_dir.join("coffer.db")
}

impl Core {
    /// Opens the data directory (creating it in dev mode) and unlocks the keys.
    pub async fn open(config: ServerConfig) -> anyhow::Result<Self> {
        if config.mode == Mode::Dev {
            files::create_private_dir(&config.data_dir)
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
        let tokens = TokenAuthority::load(store.as_ref(), &keyring, issuer, audience, tenant_id.clone())
            .await
            .context("cannot load the token-signing keys")?;
        let vaults =
            VaultService::load(store.clone(), keyring.clone()).await.context("cannot load the vaults")?;
        Ok(Self { config, store, keyring, tenant_id, tokens, vaults })
    }

    /// The built-in administrator principal, created on first use.
    pub async fn ensure_admin(&self) -> anyhow::Result<Principal> {
        let oid = String::from_utf8(
            self.store.init_meta(ADMIN_META, uuid::Uuid::new_v4().to_string().into_bytes()).await?,
        )?;
        if let Some(p) = self.store.principal(&oid).await? {
            return Ok(p);
        }
        let principal = Principal {
            object_id: oid,
            display_name: "Coffer administrator".into(),
            kind: PrincipalKind::User,
            enabled: true,
            administrator: true,
        };
        self.store.put_principal(&principal).await?;
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

    if config.mode == Mode::Dev {
        dev_bootstrap(&core).await?;
    }

    let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| {
        format!("cannot listen on {} (is another server using the port? pass --listen)", config.listen)
    })?;
    let challenge = AppState::challenge_header(&config.zone, config.public_port, &core.tenant_id);
    let Core { store, tokens, vaults, .. } = core;
    let state = Arc::new(AppState {
        zone: config.zone.clone(),
        public_port: config.public_port,
        challenge,
        tokens,
        vaults,
        store,
    });
    spawn_purger(state.clone(), shutdown.clone());
    let app = api::router(state);
    println!(
        "coffer ready: listening on https://{} (zone {}, {} mode)",
        config.listen,
        config.zone,
        if config.mode == Mode::Dev { "dev" } else { "production" }
    );
    let served = serve::serve(listener, tls_config, app, shutdown.clone());
    tokio::select! {
        r = served => r.context("the listener failed")?,
        _ = shutdown.changed() => {}
    }
    Ok(())
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
        }
    });
}

/// Dev mode: the `dev` vault, the administrator, `dev.env`, `admin.env` and a short how-to.
async fn dev_bootstrap(core: &Core) -> anyhow::Result<()> {
    let config = &core.config;
    let dev = VaultName::parse(DEV_VAULT).expect("valid vault name");
    if core.vaults.vault(DEV_VAULT).is_none() {
        core.vaults
            .create_vault(dev, RetentionPolicy::new(RetentionPolicy::DEFAULT_DAYS, false)?)
            .await
            .context("cannot create the dev vault")?;
    }
    let token = zeroize::Zeroizing::new(core.admin_token(DEV_ADMIN_TOKEN_SECS).await?);
    let dir = std::fs::canonicalize(&config.data_dir)?;
    let ca = dir.join("ca.pem");
    let ca = ca.display();
    let vault_url = AppState::vault_url(&config.zone, config.public_port, DEV_VAULT);
    let server_url = core.server_url();
    let ca_lines = format!(
        "export SSL_CERT_FILE='{ca}'\nexport REQUESTS_CA_BUNDLE='{ca}'\nexport NODE_EXTRA_CA_CERTS='{ca}'\n"
    );
    let dev_env = format!(
        "# Coffer dev server: what a workload needs.\nexport AZURE_KEYVAULT_URL='{vault_url}'\n{ca_lines}"
    );
    files::replace_file(&dir.join("dev.env"), dev_env.as_bytes(), 0o644)?;
    let admin_env = zeroize::Zeroizing::new(format!(
        "# Coffer dev administrator: a bearer token valid for {} hours. Keep this file private.\n\
         export COFFER_URL='{server_url}'\nexport COFFER_TOKEN='{}'\nexport COFFER_VAULT='{DEV_VAULT}'\n\
         export COFFER_CA_FILE='{ca}'\n{ca_lines}",
        DEV_ADMIN_TOKEN_SECS / 3600,
        &*token
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
