//! Server configuration: a TOML file whose every key can also be given as a flag or an
//! environment variable (the CLI merges them; flags win over the file). Resolving checks that
//! TLS material and the root-key source are present before anything else happens.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::keyring::RootKeySource;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
pub const DEFAULT_ZONE: &str = "localhost";
pub const DEFAULT_DEV_DATA_DIR: &str = "./coffer-data";

/// Keys of the configuration file. All optional here; [`ServerConfig::resolve`] says which are
/// required in which mode.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub zone: Option<String>,
    pub public_port: Option<u16>,
    pub tenant_id: Option<String>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub root_key_file: Option<PathBuf>,
    pub root_key_passphrase_file: Option<PathBuf>,
    pub token_lifetime_secs: Option<u64>,
    /// Longest life of a federated token from an outside issuer (default 3600, at most 86400).
    pub federated_token_max_lifetime_secs: Option<u64>,
    pub agent_listen: Option<String>,
    /// `true` (default) or `false`: auditing off is for benchmarks only.
    pub audit: Option<bool>,
    pub audit_dir: Option<PathBuf>,
    /// Also write audit records to stdout (for container logs).
    pub audit_stdout: Option<bool>,
    pub audit_retention_days: Option<u64>,
    pub audit_max_file_mib: Option<u64>,
    /// Bound on the rotated audit files together, in MiB (default: none); past it the oldest
    /// are pruned like retention does (signed, `verify` still passes).
    pub audit_max_total_mib: Option<u64>,
    /// Free space on the audit filesystem below which the server warns (once a minute) and
    /// `/readyz` answers 503, in MiB (default 256).
    pub audit_min_free_mib: Option<u64>,
    /// Size of the audit commit journal in MiB (default 8; 0 turns it off: each group commit
    /// then fsyncs the growing audit file).
    pub audit_journal_mib: Option<u64>,
    /// Seconds a client has to send a request's headers (HTTP/1.1; default 10).
    pub header_timeout_secs: Option<u64>,
    /// Seconds a client has to send a request's body once its headers arrived (default 30).
    pub body_timeout_secs: Option<u64>,
    /// Seconds a connection may stay open with no request in progress (default 60).
    pub idle_timeout_secs: Option<u64>,
    /// Connections open at once, all clients together (default: 4096, or fewer when the
    /// descriptor limit is lower).
    pub max_connections: Option<usize>,
    /// Connections open at once from one IP address (default 256).
    pub max_connections_per_address: Option<usize>,
    /// Requests failing authentication (401s, refused sign-ins) allowed per client address and
    /// second (default 50); past that, 429 and one audit record per burst.
    pub failed_requests_per_sec: Option<u32>,
    /// How many such requests a client address may make at once (default 200).
    pub failed_requests_burst: Option<u32>,
    /// Requests one authenticated principal may make per second (default 2000; 0: no limit).
    pub principal_requests_per_sec: Option<u32>,
    /// How many requests one principal may make at once (default 4000).
    pub principal_requests_burst: Option<u32>,
    /// Internal addresses (ranges like `10.0.0.0/8`, addresses, host names) that webhooks and
    /// federation JWKS URLs may reach; by default loopback, private and link-local are refused.
    pub outbound_allow: Option<Vec<String>>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::Invalid(format!("cannot read the config file {}: {e}", path.display()))
        })?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::Invalid(format!("config file {}: {e}", path.display())))
    }

    /// `other`'s keys win where set.
    pub fn overlay(self, other: FileConfig) -> FileConfig {
        FileConfig {
            data_dir: other.data_dir.or(self.data_dir),
            listen: other.listen.or(self.listen),
            zone: other.zone.or(self.zone),
            public_port: other.public_port.or(self.public_port),
            tenant_id: other.tenant_id.or(self.tenant_id),
            tls_cert_file: other.tls_cert_file.or(self.tls_cert_file),
            tls_key_file: other.tls_key_file.or(self.tls_key_file),
            root_key_file: other.root_key_file.or(self.root_key_file),
            root_key_passphrase_file: other.root_key_passphrase_file.or(self.root_key_passphrase_file),
            token_lifetime_secs: other.token_lifetime_secs.or(self.token_lifetime_secs),
            federated_token_max_lifetime_secs: other
                .federated_token_max_lifetime_secs
                .or(self.federated_token_max_lifetime_secs),
            agent_listen: other.agent_listen.or(self.agent_listen),
            audit: other.audit.or(self.audit),
            audit_dir: other.audit_dir.or(self.audit_dir),
            audit_stdout: other.audit_stdout.or(self.audit_stdout),
            audit_retention_days: other.audit_retention_days.or(self.audit_retention_days),
            audit_max_file_mib: other.audit_max_file_mib.or(self.audit_max_file_mib),
            audit_max_total_mib: other.audit_max_total_mib.or(self.audit_max_total_mib),
            audit_min_free_mib: other.audit_min_free_mib.or(self.audit_min_free_mib),
            audit_journal_mib: other.audit_journal_mib.or(self.audit_journal_mib),
            header_timeout_secs: other.header_timeout_secs.or(self.header_timeout_secs),
            body_timeout_secs: other.body_timeout_secs.or(self.body_timeout_secs),
            idle_timeout_secs: other.idle_timeout_secs.or(self.idle_timeout_secs),
            max_connections: other.max_connections.or(self.max_connections),
            max_connections_per_address: other
                .max_connections_per_address
                .or(self.max_connections_per_address),
            failed_requests_per_sec: other.failed_requests_per_sec.or(self.failed_requests_per_sec),
            failed_requests_burst: other.failed_requests_burst.or(self.failed_requests_burst),
            principal_requests_per_sec: other.principal_requests_per_sec.or(self.principal_requests_per_sec),
            principal_requests_burst: other.principal_requests_burst.or(self.principal_requests_burst),
            outbound_allow: other.outbound_allow.or(self.outbound_allow),
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what} is required in production mode: set `{key}` in the config file, or --{flag} / {env}")]
    Missing { what: &'static str, key: &'static str, flag: &'static str, env: &'static str },
    #[error("{what} {path} is not readable: {reason}")]
    Unreadable { what: &'static str, path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Local CA, key file and a `dev` vault created on first start.
    Dev,
    Production,
}

#[derive(Debug, Clone)]
pub enum TlsSource {
    /// Generated by the dev CA in the data directory.
    DevCa,
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
}

/// A resolved, checked configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub mode: Mode,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub zone: String,
    pub public_port: u16,
    pub tenant_id: Option<String>,
    pub tls: TlsSource,
    pub root_key: RootKeySource,
    pub token_lifetime_secs: u64,
    /// Federated tokens living longer (`exp` − `iat`, `exp` − now) are refused.
    pub federated_token_max_lifetime_secs: u64,
    /// Dev mode's in-process managed-identity endpoint (plain HTTP, loopback only).
    pub agent_listen: Option<SocketAddr>,
    pub audit: AuditSettings,
    /// What webhooks and JWKS fetches may connect to.
    pub outbound: std::sync::Arc<crate::outbound::OutboundPolicy>,
    pub connections: ConnectionSettings,
}

/// How long a client may take, and how many connections it may hold (see `serve.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSettings {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    /// `None`: derived from the descriptor limit at start-up.
    pub max_connections: Option<usize>,
    pub max_per_address: usize,
    /// Failing requests allowed per client address: (per second, at once).
    pub failed_requests: (u32, u32),
    /// Requests allowed per authenticated principal: (per second, 0 for no limit; at once).
    pub principal_requests: (u32, u32),
}

impl ConnectionSettings {
    fn from_file(file: &FileConfig) -> Result<Self, ConfigError> {
        let secs = |value: Option<u64>, default: u64, key: &str| match value.unwrap_or(default) {
            0 => Err(ConfigError::Invalid(format!("{key} must be at least 1 second"))),
            n if n > 3600 => Err(ConfigError::Invalid(format!("{key} is {n}: at most 3600 seconds"))),
            n => Ok(Duration::from_secs(n)),
        };
        let at_least_one = |value: Option<usize>, key: &str| match value {
            Some(0) => Err(ConfigError::Invalid(format!("{key} must be at least 1"))),
            other => Ok(other),
        };
        Ok(Self {
            header_timeout: secs(file.header_timeout_secs, 10, "header_timeout_secs")?,
            body_timeout: secs(file.body_timeout_secs, 30, "body_timeout_secs")?,
            idle_timeout: secs(file.idle_timeout_secs, 60, "idle_timeout_secs")?,
            max_connections: at_least_one(file.max_connections, "max_connections")?,
            max_per_address: at_least_one(file.max_connections_per_address, "max_connections_per_address")?
                .unwrap_or(256),
            failed_requests: match (
                file.failed_requests_per_sec.unwrap_or(50),
                file.failed_requests_burst.unwrap_or(200),
            ) {
                (0, _) | (_, 0) => {
                    return Err(ConfigError::Invalid(
                        "failed_requests_per_sec and failed_requests_burst must be at least 1".into(),
                    ))
                }
                limits => limits,
            },
            principal_requests: (
                file.principal_requests_per_sec.unwrap_or(2000),
                match file.principal_requests_burst.unwrap_or(4000) {
                    0 => {
                        return Err(ConfigError::Invalid(
                            "principal_requests_burst must be at least 1".into(),
                        ))
                    }
                    n => n,
                },
            ),
        })
    }
}

/// Where and how requests are audited.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub enabled: bool,
    /// Default: `<data dir>/audit`.
    pub dir: Option<PathBuf>,
    pub stdout: bool,
    pub retention_days: Option<u64>,
    pub max_file_mib: u64,
    /// Bound on the rotated files together; `None`: by age only.
    pub max_total_mib: Option<u64>,
    /// Warn and report not ready below this much free space on the audit filesystem.
    pub min_free_mib: u64,
    /// The commit journal's size; 0: none.
    pub journal_mib: u64,
}

impl AuditSettings {
    fn from_file(file: &FileConfig) -> Result<Self, ConfigError> {
        // Small files keep start-up fast: opening the log re-reads the active file.
        let max_file_mib = file.audit_max_file_mib.unwrap_or(4);
        if max_file_mib == 0 {
            return Err(ConfigError::Invalid("audit_max_file_mib must be at least 1".into()));
        }
        // Larger buys nothing: a commit larger than the journal bypasses it (fsyncs the file).
        let journal_mib = file.audit_journal_mib.unwrap_or(8);
        if journal_mib > 1024 {
            return Err(ConfigError::Invalid(format!(
                "audit_journal_mib is {journal_mib}: use 0 (no journal) to 1024"
            )));
        }
        if file.audit_max_total_mib == Some(0) {
            return Err(ConfigError::Invalid(
                "audit_max_total_mib must be at least 1 (leave it unset for no size bound)".into(),
            ));
        }
        // Past 2^44 MiB the byte count overflows; nobody has that disk.
        let min_free_mib = file.audit_min_free_mib.unwrap_or(256).min(1 << 44);
        Ok(Self {
            enabled: file.audit.unwrap_or(true),
            dir: file.audit_dir.clone(),
            stdout: file.audit_stdout.unwrap_or(false),
            retention_days: file.audit_retention_days,
            max_file_mib,
            max_total_mib: file.audit_max_total_mib.map(|m| m.min(1 << 44)),
            min_free_mib,
            journal_mib,
        })
    }
}

fn check_readable(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path).map(drop).map_err(|e| ConfigError::Unreadable {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn valid_zone(zone: &str) -> bool {
    !zone.is_empty()
        && zone.len() <= 200
        && zone.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl ServerConfig {
    /// Resolves `file` (already merged with flags and environment) for `mode`. In production
    /// mode a missing TLS certificate or key, or a missing root-key source, is an error here.
    /// `passphrase_prompt` is used when production mode has no root-key source configured.
    pub fn resolve(
        mode: Mode,
        file: FileConfig,
        passphrase_prompt: impl FnOnce() -> Option<zeroize::Zeroizing<String>>,
    ) -> Result<Self, ConfigError> {
        let audit = AuditSettings::from_file(&file)?;
        let connections = ConnectionSettings::from_file(&file)?;
        let outbound = std::sync::Arc::new(
            crate::outbound::OutboundPolicy::parse(file.outbound_allow.as_deref().unwrap_or_default())
                .map_err(ConfigError::Invalid)?,
        );
        let listen_text = file.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| ConfigError::Invalid(format!("listen address '{listen_text}' is not IP:PORT")))?;
        let zone = file.zone.unwrap_or_else(|| DEFAULT_ZONE.to_owned()).to_ascii_lowercase();
        if !valid_zone(&zone) {
            return Err(ConfigError::Invalid(format!("zone '{zone}' is not a valid DNS name")));
        }
        if let Some(t) = &file.tenant_id {
            if uuid::Uuid::parse_str(t).is_err() && t != "adfs" {
                return Err(ConfigError::Invalid(format!("tenant_id '{t}' is not a UUID")));
            }
        }
        let public_port = file.public_port.unwrap_or(listen.port());
        let token_lifetime_secs = file.token_lifetime_secs.unwrap_or(3600);
        let agent_listen = match &file.agent_listen {
            Some(text) => {
                let addr: SocketAddr = text.parse().map_err(|_| {
                    ConfigError::Invalid(format!("agent listen address '{text}' is not IP:PORT"))
                })?;
                if !addr.ip().is_loopback() {
                    return Err(ConfigError::Invalid(
                        "the managed-identity endpoint must listen on loopback".into(),
                    ));
                }
                Some(addr)
            }
            None => {
                Some(SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), listen.port().wrapping_add(1)))
            }
        };
        if !(60..=86_400).contains(&token_lifetime_secs) {
            return Err(ConfigError::Invalid("token_lifetime_secs must be between 60 and 86400".into()));
        }
        // One hour: what Kubernetes projects for workload identity by default. Longer-lived
        // issuers (GitLab: the job timeout plus 5 minutes; AKS up to a day) need it raised.
        let federated_token_max_lifetime_secs = file.federated_token_max_lifetime_secs.unwrap_or(3600);
        if !(60..=86_400).contains(&federated_token_max_lifetime_secs) {
            return Err(ConfigError::Invalid(
                "federated_token_max_lifetime_secs must be between 60 and 86400".into(),
            ));
        }
        match mode {
            Mode::Dev => {
                let data_dir = file.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DEV_DATA_DIR));
                let tls = match (file.tls_cert_file, file.tls_key_file) {
                    (Some(cert), Some(key)) => TlsSource::Files { cert, key },
                    _ => TlsSource::DevCa,
                };
                let root_key = match (file.root_key_file, file.root_key_passphrase_file) {
                    (_, Some(p)) => RootKeySource::PassphraseFile(p),
                    (Some(k), None) => RootKeySource::KeyFile(k),
                    (None, None) => RootKeySource::KeyFile(data_dir.join("root.key")),
                };
                // `adfs` lets unmodified EnvironmentCredential/MSAL skip instance discovery and
                // ignore the challenge tenant (protocol doc §D.4).
                let tenant_id = file.tenant_id.or_else(|| Some("adfs".into()));
                Ok(Self {
                    mode,
                    data_dir,
                    listen,
                    zone,
                    public_port,
                    tenant_id,
                    tls,
                    root_key,
                    token_lifetime_secs,
                    federated_token_max_lifetime_secs,
                    agent_listen,
                    audit,
                    connections,
                    outbound,
                })
            }
            Mode::Production => {
                let cert = file.tls_cert_file.ok_or(ConfigError::Missing {
                    what: "a TLS certificate",
                    key: "tls_cert_file",
                    flag: "tls-cert-file",
                    env: "COFFER_TLS_CERT_FILE",
                })?;
                let key = file.tls_key_file.ok_or(ConfigError::Missing {
                    what: "a TLS private key",
                    key: "tls_key_file",
                    flag: "tls-key-file",
                    env: "COFFER_TLS_KEY_FILE",
                })?;
                check_readable("TLS certificate", &cert)?;
                check_readable("TLS private key", &key)?;
                let root_key = match (file.root_key_file, file.root_key_passphrase_file) {
                    (Some(_), Some(_)) => {
                        return Err(ConfigError::Invalid(
                            "set either root_key_file or root_key_passphrase_file, not both".into(),
                        ))
                    }
                    (Some(k), None) => {
                        check_readable("root key file", &k)?;
                        RootKeySource::KeyFile(k)
                    }
                    (None, Some(p)) => {
                        check_readable("root key passphrase file", &p)?;
                        RootKeySource::PassphraseFile(p)
                    }
                    (None, None) => match passphrase_prompt() {
                        Some(p) if !p.is_empty() => RootKeySource::Passphrase(p),
                        _ => {
                            return Err(ConfigError::Missing {
                                what: "a root-key source (a key file or a passphrase file; or run interactively to be prompted)",
                                key: "root_key_file",
                                flag: "root-key-file",
                                env: "COFFER_ROOT_KEY_FILE",
                            })
                        }
                    },
                };
                let data_dir = file.data_dir.ok_or(ConfigError::Missing {
                    what: "a data directory",
                    key: "data_dir",
                    flag: "data-dir",
                    env: "COFFER_DATA_DIR",
                })?;
                Ok(Self {
                    mode,
                    data_dir,
                    listen,
                    zone,
                    public_port,
                    tenant_id: file.tenant_id,
                    tls: TlsSource::Files { cert, key },
                    root_key,
                    token_lifetime_secs,
                    federated_token_max_lifetime_secs,
                    agent_listen: None,
                    audit,
                    connections,
                    outbound,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_prompt() -> Option<zeroize::Zeroizing<String>> {
        None
    }

    #[test]
    fn production_requires_tls_and_root_key() {
        let dir = tempfile::tempdir().unwrap();
        let err = ServerConfig::resolve(Mode::Production, FileConfig::default(), no_prompt).unwrap_err();
        assert!(err.to_string().contains("tls_cert_file"), "{err}");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let mut file = FileConfig {
            tls_cert_file: Some(cert.clone()),
            tls_key_file: Some(key.clone()),
            ..Default::default()
        };
        let err = ServerConfig::resolve(Mode::Production, file.clone(), no_prompt).unwrap_err();
        assert!(err.to_string().contains("not readable"), "{err}");
        std::fs::write(&cert, "x").unwrap();
        std::fs::write(&key, "x").unwrap();
        let err = ServerConfig::resolve(Mode::Production, file.clone(), no_prompt).unwrap_err();
        assert!(err.to_string().contains("root-key source"), "{err}");
        file.root_key_file = Some(dir.path().join("missing.key"));
        let err = ServerConfig::resolve(Mode::Production, file.clone(), no_prompt).unwrap_err();
        assert!(err.to_string().contains("root key file"), "{err}");
        std::fs::write(dir.path().join("missing.key"), "x").unwrap();
        file.data_dir = Some(dir.path().join("data"));
        assert!(ServerConfig::resolve(Mode::Production, file, no_prompt).is_ok());
    }

    #[test]
    fn file_keys_parse_and_flags_win() {
        let file: FileConfig =
            toml::from_str("listen = \"0.0.0.0:9443\"\nzone = \"vault.example.com\"\n").unwrap();
        let flags = FileConfig { zone: Some("other.test".into()), ..Default::default() };
        let merged = file.overlay(flags);
        assert_eq!(merged.listen.as_deref(), Some("0.0.0.0:9443"));
        assert_eq!(merged.zone.as_deref(), Some("other.test"));
        assert!(toml::from_str::<FileConfig>("unknown_key = 1").is_err());
    }

    #[test]
    fn dev_defaults() {
        let c = ServerConfig::resolve(Mode::Dev, FileConfig::default(), no_prompt).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.zone, "localhost");
        assert_eq!(c.public_port, 8443);
        assert!(matches!(c.tls, TlsSource::DevCa));
        let bad = FileConfig { zone: Some("bad zone".into()), ..Default::default() };
        assert!(ServerConfig::resolve(Mode::Dev, bad, no_prompt).is_err());
        assert_eq!((c.audit.max_file_mib, c.audit.journal_mib), (4, 8));
    }

    #[test]
    fn federated_token_lifetime_bound_defaults_to_an_hour() {
        let c = ServerConfig::resolve(Mode::Dev, FileConfig::default(), no_prompt).unwrap();
        assert_eq!(c.federated_token_max_lifetime_secs, 3600);
        let day = FileConfig { federated_token_max_lifetime_secs: Some(86_400), ..Default::default() };
        assert_eq!(
            ServerConfig::resolve(Mode::Dev, day, no_prompt).unwrap().federated_token_max_lifetime_secs,
            86_400
        );
        let year = FileConfig { federated_token_max_lifetime_secs: Some(365 * 86_400), ..Default::default() };
        let err = ServerConfig::resolve(Mode::Dev, year, no_prompt).unwrap_err();
        assert!(err.to_string().contains("federated_token_max_lifetime_secs"), "{err}");
    }

    #[test]
    fn outbound_allow_parses_ranges_addresses_and_hosts() {
        let file: FileConfig =
            toml::from_str("outbound_allow = [\"127.0.0.0/8\", \"10.1.2.3\", \"hooks.internal\"]\n").unwrap();
        let c = ServerConfig::resolve(Mode::Dev, file, no_prompt).unwrap();
        assert!(c.outbound.ip_allowed("127.0.0.5".parse().unwrap()));
        assert!(c.outbound.ip_allowed("10.1.2.3".parse().unwrap()));
        assert!(!c.outbound.ip_allowed("10.1.2.4".parse().unwrap()));
        let default = ServerConfig::resolve(Mode::Dev, FileConfig::default(), no_prompt).unwrap();
        assert!(
            !default.outbound.ip_allowed("127.0.0.1".parse().unwrap()),
            "dev mode allows nothing by default"
        );
        let bad = FileConfig { outbound_allow: Some(vec!["10.0.0.0/99".into()]), ..Default::default() };
        let err = ServerConfig::resolve(Mode::Dev, bad, no_prompt).unwrap_err();
        assert!(err.to_string().contains("outbound_allow"), "{err}");
    }

    #[test]
    fn audit_journal_size_is_bounded_and_can_be_off() {
        let with = |mib| FileConfig { audit_journal_mib: Some(mib), ..Default::default() };
        let off = ServerConfig::resolve(Mode::Dev, with(0), no_prompt).unwrap();
        assert_eq!(off.audit.journal_mib, 0);
        let err = ServerConfig::resolve(Mode::Dev, with(4096), no_prompt).unwrap_err();
        assert!(err.to_string().contains("audit_journal_mib"), "{err}");
        let file: FileConfig = toml::from_str("audit_journal_mib = 2\n").unwrap();
        assert_eq!(ServerConfig::resolve(Mode::Dev, file, no_prompt).unwrap().audit.journal_mib, 2);
    }

    #[test]
    fn audit_disk_bounds_have_defaults_and_zero_total_is_refused() {
        let defaults = ServerConfig::resolve(Mode::Dev, FileConfig::default(), no_prompt).unwrap();
        assert_eq!((defaults.audit.max_total_mib, defaults.audit.min_free_mib), (None, 256));
        let file: FileConfig =
            toml::from_str("audit_max_total_mib = 512\naudit_min_free_mib = 1024\n").unwrap();
        let set = ServerConfig::resolve(Mode::Dev, file, no_prompt).unwrap();
        assert_eq!((set.audit.max_total_mib, set.audit.min_free_mib), (Some(512), 1024));
        let zero = FileConfig { audit_max_total_mib: Some(0), ..Default::default() };
        let err = ServerConfig::resolve(Mode::Dev, zero, no_prompt).unwrap_err();
        assert!(err.to_string().contains("audit_max_total_mib"), "{err}");
    }
}
