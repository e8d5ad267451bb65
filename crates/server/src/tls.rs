//! TLS: rustls server configuration (TLS 1.2+ with the ring provider), certificate loading for
//! production, and the dev-mode private CA.
//!
//! Dev mode mints a leaf certificate per vault host on demand (signed by the dev CA) because
//! OpenSSL and webpki both refuse a wildcard directly under a one-label zone such as
//! `*.localhost`: the SDKs would otherwise reject `https://dev.localhost`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::ring as provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

use crate::files;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read TLS {what} from {path}: {reason}")]
    Read { what: &'static str, path: PathBuf, reason: String },
    #[error("cannot create the dev certificates: {0}")]
    Generate(String),
    #[error("TLS configuration failed: {0}")]
    Config(String),
}

/// Builds the rustls server configuration: TLS 1.3 and 1.2, ALPN h2 and http/1.1.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Loads a PEM certificate chain and private key (production mode).
pub fn load_certified_key(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let read_err =
        |what, path: &Path, reason: String| TlsError::Read { what, path: path.to_path_buf(), reason };
    let chain = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| read_err("certificate", cert_path, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err("certificate", cert_path, e.to_string()))?;
    if chain.is_empty() {
        return Err(read_err("certificate", cert_path, "no PEM certificate found".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| read_err("private key", key_path, e.to_string()))?;
    certified(chain, &key).map_err(|reason| read_err("private key", key_path, reason))
}

fn certified(chain: Vec<CertificateDer<'static>>, key: &PrivateKeyDer<'_>) -> Result<CertifiedKey, String> {
    let signing = provider::sign::any_supported_type(key).map_err(|e| e.to_string())?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| format!("the key does not match the certificate: {e}"))?;
    Ok(certified)
}

/// Serves one fixed certificate (production).
#[derive(Debug)]
pub struct FixedCert(pub Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The dev-mode CA and server certificate, kept in the data directory.
pub struct DevPki {
    pub ca_file: PathBuf,
    ca_key: KeyPair,
    ca_cert: rcgen::Certificate,
    default_cert: Arc<CertifiedKey>,
}

const DEV_CA_NAME: &str = "Coffer dev CA";

fn dev_ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, DEV_CA_NAME);
    dn.push(DnType::OrganizationName, "Coffer (development only)");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2035, 1, 1);
    Ok(params)
}

fn leaf_params(names: &[String], ips: &[IpAddr]) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(names.to_vec())?;
    params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(365);
    Ok(params)
}

impl DevPki {
    /// Loads the dev CA from `dir`, creating it and the server certificate on first start.
    pub fn ensure(dir: &Path, zone: &str) -> Result<Self, TlsError> {
        let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
        let io = |e: std::io::Error| TlsError::Generate(e.to_string());
        let tls_dir = dir.join("tls");
        files::create_private_dir(&tls_dir).map_err(io)?;
        let ca_file = dir.join("ca.pem");
        let ca_key_file = tls_dir.join("ca-key.pem");
        let ca_key = if ca_key_file.exists() {
            let pem = std::fs::read_to_string(&ca_key_file).map_err(io)?;
            KeyPair::from_pem(&pem).map_err(gen)?
        } else {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen)?;
            files::write_private_new(&ca_key_file, key.serialize_pem().as_bytes()).map_err(io)?;
            key
        };
        // Re-signing the same parameters with the same key yields an issuer identical for
        // verification purposes (same subject, same key), so the CA key alone is the state.
        let ca_cert = dev_ca_params().map_err(gen)?.self_signed(&ca_key).map_err(gen)?;
        if !ca_file.exists() {
            files::replace_file(&ca_file, ca_cert.pem().as_bytes(), 0o644).map_err(io)?;
        }
        let names = vec![zone.to_owned(), format!("*.{zone}"), format!("login.{zone}")];
        let ips = [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];
        let mut pki = Self {
            ca_file,
            ca_key,
            ca_cert,
            default_cert: Arc::new(CertifiedKey::new(vec![], Arc::new(NoKey))),
        };
        let (cert_pem, key_pem, certified) = pki.issue(&names, &ips)?;
        files::replace_file(&tls_dir.join("server.pem"), cert_pem.as_bytes(), 0o644).map_err(io)?;
        files::replace_file(&tls_dir.join("server-key.pem"), key_pem.as_bytes(), 0o600).map_err(io)?;
        pki.default_cert = Arc::new(certified);
        Ok(pki)
    }

    fn issue(&self, names: &[String], ips: &[IpAddr]) -> Result<(String, String, CertifiedKey), TlsError> {
        let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen)?;
        let cert = leaf_params(names, ips)
            .map_err(gen)?
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .map_err(gen)?;
        let key_der =
            PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| TlsError::Generate(e.to_string()))?;
        let certified = certified(vec![cert.der().clone()], &key_der).map_err(TlsError::Generate)?;
        Ok((cert.pem(), key.serialize_pem(), certified))
    }

    /// A certificate resolver that serves the server certificate, and mints a certificate for
    /// each `<label>.<zone>` host name asked for by SNI.
    pub fn resolver(self, zone: &str) -> Arc<DevCertResolver> {
        Arc::new(DevCertResolver {
            pki: self,
            zone_suffix: format!(".{zone}"),
            minted: RwLock::new(HashMap::new()),
        })
    }
}

/// Placeholder signer used only while [`DevPki::ensure`] builds the real default certificate.
#[derive(Debug)]
struct NoKey;

impl rustls::sign::SigningKey for NoKey {
    fn choose_scheme(&self, _offered: &[rustls::SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        None
    }
    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::ECDSA
    }
}

/// Cap on minted certificates, so SNI values cannot grow memory without bound.
const MAX_MINTED: usize = 1024;

pub struct DevCertResolver {
    pki: DevPki,
    zone_suffix: String,
    minted: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for DevCertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCertResolver").field("zone_suffix", &self.zone_suffix).finish_non_exhaustive()
    }
}

impl ResolvesServerCert for DevCertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(sni) = hello.server_name().map(str::to_ascii_lowercase) else {
            return Some(self.pki.default_cert.clone());
        };
        let Some(label) = sni.strip_suffix(&self.zone_suffix) else {
            return Some(self.pki.default_cert.clone());
        };
        if label.is_empty() || label.contains('.') || label == "login" {
            return Some(self.pki.default_cert.clone());
        }
        if let Some(found) = self.minted.read().ok()?.get(&sni) {
            return Some(found.clone());
        }
        let mut minted = self.minted.write().ok()?;
        if minted.len() >= MAX_MINTED {
            return Some(self.pki.default_cert.clone());
        }
        match self.pki.issue(std::slice::from_ref(&sni), &[]) {
            Ok((_, _, certified)) => {
                let certified = Arc::new(certified);
                minted.insert(sni, certified.clone());
                Some(certified)
            }
            Err(e) => {
                tracing::error!(error = %e, "minting a dev certificate failed");
                Some(self.pki.default_cert.clone())
            }
        }
    }
}
