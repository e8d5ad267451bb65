//! The checkpoint signing key (Ed25519, via `ring`) and its exportable public half.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use zeroize::Zeroizing;

use crate::AuditError;

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID
/// 1.3.101.112 }, BIT STRING (32 bytes) }.
const ED25519_SPKI_PREFIX: [u8; 12] =
    [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// Generates a fresh Ed25519 checkpoint signing key as PKCS#8 v2 DER (what
/// [`crate::AuditConfig::signing_key_pkcs8`] takes). The caller keeps it wrapped at rest.
pub fn generate_signing_key() -> Result<Zeroizing<Vec<u8>>, AuditError> {
    let rng = ring::rand::SystemRandom::new();
    let doc = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| AuditError::Config("could not generate an Ed25519 key".into()))?;
    Ok(Zeroizing::new(doc.as_ref().to_vec()))
}

/// The PEM `PUBLIC KEY` (SubjectPublicKeyInfo) of a PKCS#8 Ed25519 signing key, for export
/// without opening a log.
pub fn public_key_pem_from_pkcs8(pkcs8: &[u8]) -> Result<String, AuditError> {
    Ok(Signer::from_pkcs8(pkcs8)?.pem)
}

pub(crate) struct Signer {
    pair: Ed25519KeyPair,
    pub(crate) key_id: String,
    pub(crate) pem: String,
}

impl Signer {
    /// Accepts PKCS#8 v2 (ring's, with the public key) and v1 (`openssl genpkey -algorithm
    /// ed25519`).
    pub(crate) fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, AuditError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).map_err(|e| {
            AuditError::Config(format!("the audit signing key is not an Ed25519 PKCS#8 key: {e}"))
        })?;
        let public = pair.public_key().as_ref();
        Ok(Self { key_id: key_id(public), pem: pem(public), pair })
    }

    /// Base64 of the Ed25519 signature of `msg`.
    pub(crate) fn sign(&self, msg: &[u8]) -> String {
        B64.encode(self.pair.sign(msg).as_ref())
    }

    pub(crate) fn verifier(&self) -> Verifier {
        Verifier { keys: vec![(self.key_id.clone(), self.pair.public_key().as_ref().to_vec())] }
    }
}

/// `ed25519:` and the first 16 hex digits of SHA-256 of the raw public key.
fn key_id(public: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, public);
    format!("ed25519:{}", hex::encode(&digest.as_ref()[..8]))
}

fn pem(public: &[u8]) -> String {
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(public);
    format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", B64.encode(der))
}

/// Public keys by key id.
pub(crate) struct Verifier {
    keys: Vec<(String, Vec<u8>)>,
}

impl Verifier {
    /// Parses PEM `PUBLIC KEY` blocks (Ed25519 SubjectPublicKeyInfo).
    pub(crate) fn from_pems(pems: &[&str]) -> Result<Self, String> {
        let mut keys = Vec::new();
        for pem in pems {
            let b64: String =
                pem.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("-----")).collect();
            let der =
                B64.decode(b64.as_bytes()).map_err(|_| "the public key is not valid PEM".to_string())?;
            let raw = der
                .strip_prefix(&ED25519_SPKI_PREFIX[..])
                .filter(|raw| raw.len() == 32)
                .ok_or_else(|| "the public key is not an Ed25519 SubjectPublicKeyInfo".to_string())?;
            keys.push((key_id(raw), raw.to_vec()));
        }
        Ok(Self { keys })
    }

    pub(crate) fn knows(&self, key_id: &str) -> bool {
        self.keys.iter().any(|(id, _)| id == key_id)
    }

    /// Checks a base64 signature by the key named `key_id`.
    pub(crate) fn verify(&self, key_id: &str, msg: &[u8], signature_b64: &str) -> Result<(), String> {
        let (_, raw) = self
            .keys
            .iter()
            .find(|(id, _)| id == key_id)
            .ok_or_else(|| format!("signed by key {key_id}, which is not among the given public keys"))?;
        let sig =
            B64.decode(signature_b64.as_bytes()).map_err(|_| "the signature is not base64".to_string())?;
        UnparsedPublicKey::new(&ED25519, raw)
            .verify(msg, &sig)
            .map_err(|_| "the signature does not match (forged or modified)".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_pem_round_trip() {
        let pkcs8 = generate_signing_key().unwrap();
        let signer = Signer::from_pkcs8(&pkcs8).unwrap();
        assert!(signer.pem.starts_with("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA"));
        let v = Verifier::from_pems(&[&signer.pem]).unwrap();
        assert!(v.knows(&signer.key_id));
        let sig = signer.sign(b"hello");
        v.verify(&signer.key_id, b"hello", &sig).unwrap();
        assert!(v.verify(&signer.key_id, b"hellO", &sig).is_err());
        assert!(v.verify("ed25519:0000000000000000", b"hello", &sig).is_err());
        assert_eq!(public_key_pem_from_pkcs8(&pkcs8).unwrap(), signer.pem);
        assert!(Signer::from_pkcs8(b"not a key").is_err());
        assert!(Verifier::from_pems(&["-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"]).is_err());
    }
}
