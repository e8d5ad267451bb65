//! Access tokens: ES256-signed JWTs minted by this server's authority and verified on every
//! request. Verification checks the signature, `alg` (only ES256), `kid` (only our keys), `iss`,
//! `aud`, `exp` and `nbf`, and requires `sub`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use coffer_store::Store;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::keyring::{Keyring, KeyringError};

const ACTIVE_KID_META: &str = "active-signing-kid";
const CLOCK_SKEW_SECS: u64 = 60;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's algorithm is not accepted")]
    Algorithm,
    #[error("the token was signed with an unknown key")]
    UnknownKey,
    #[error("the token's signature is invalid")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued by another authority")]
    Issuer,
    #[error("the token is for another audience")]
    Audience,
}

/// The claims Coffer puts into (and requires of) an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub oid: String,
    pub tid: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    /// For managed identities: the agent that attested the process, and what it attested,
    /// so that every request made with the token can be audited with those facts.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "xms_agent")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "xms_proc")]
    pub process: Option<coffer_core::identity::ProcessFacts>,
}

/// A verified token's claims, as the cache keeps them, with memos of what every request made
/// with the same token would compute again.
#[derive(Debug)]
pub struct Verified {
    pub claims: Claims,
    /// The audit log's keyed hash of the token (see [`Verified::credential_hmac`]).
    credential_hmac: OnceLock<String>,
}

impl Verified {
    /// The audit record's hash of this token: `compute` runs for the first request only.
    pub fn credential_hmac(&self, compute: impl FnOnce() -> String) -> String {
        self.credential_hmac.get_or_init(compute).clone()
    }
}

impl std::ops::Deref for Verified {
    type Target = Claims;
    fn deref(&self) -> &Claims {
        &self.claims
    }
}

struct KeySet {
    active_kid: String,
    signing_key: EncodingKey,
    verifying: HashMap<String, DecodingKey>,
    /// Public JWKS entries, in the order keys were loaded.
    jwks: Vec<serde_json::Value>,
}

/// Mints and verifies tokens for one issuer and audience. Signing keys rotate: the new key
/// signs, older keys keep verifying (and stay in the JWKS) for an overlap period.
pub struct TokenAuthority {
    issuer: String,
    audience: String,
    tenant: String,
    lifetime_secs: u64,
    keys: RwLock<Arc<KeySet>>,
    validation: Validation,
    /// Tokens whose signature and claims were verified already: a hit skips the ECDSA
    /// verification but still checks `exp`/`nbf` against the clock. Keyed by the whole token,
    /// hashed with aHash (randomly keyed like SipHash, so presented tokens cannot be chosen to
    /// collide): SipHash over a ~650-byte token was ~2 % of a GET's instructions.
    verified: RwLock<HashMap<Arc<str>, Arc<Verified>, ahash::RandomState>>,
}

/// Bound on the verified-token cache; it is cleared when full (tokens are cheap to re-verify).
const VERIFIED_CACHE_MAX: usize = 16_384;

fn signing_key_name(kid: &str) -> String {
    format!("token-signing:{kid}")
}

fn retired_meta(kid: &str) -> String {
    format!("signing-key-retired:{kid}")
}

async fn new_signing_key(store: &dyn Store, keyring: &Keyring) -> Result<String, KeyringError> {
    let kid = uuid::Uuid::new_v4().simple().to_string();
    let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| KeyringError::Corrupt(format!("generating a signing key: {e}")))?;
    let der = zeroize::Zeroizing::new(pair.serialize_der());
    store
        .put_wrapped_key(&signing_key_name(&kid), keyring.wrap_material(&signing_key_name(&kid), &der))
        .await?;
    Ok(kid)
}

async fn load_keys(store: &dyn Store, keyring: &Keyring) -> Result<KeySet, KeyringError> {
    let active_kid = match store.meta(ACTIVE_KID_META).await? {
        Some(kid) => String::from_utf8(kid).map_err(|_| KeyringError::Corrupt(ACTIVE_KID_META.into()))?,
        None => {
            let kid = new_signing_key(store, keyring).await?;
            String::from_utf8(store.init_meta(ACTIVE_KID_META, kid.into_bytes()).await?)
                .map_err(|_| KeyringError::Corrupt(ACTIVE_KID_META.into()))?
        }
    };
    let mut verifying = HashMap::new();
    let mut jwks = Vec::new();
    let mut signing_key = None;
    for (name, blob) in store.wrapped_keys().await? {
        let Some(kid) = name.strip_prefix("token-signing:") else { continue };
        let der = keyring.unwrap_material(&name, &blob)?;
        let pair = KeyPair::try_from(der.as_slice()).map_err(|_| KeyringError::Corrupt(name.clone()))?;
        let point = pair.public_key_raw();
        verifying.insert(kid.to_owned(), DecodingKey::from_ec_der(point));
        let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b);
        // An uncompressed P-256 point: 0x04 || x (32 bytes) || y (32 bytes).
        if point.len() == 65 {
            jwks.push(serde_json::json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                "x": b64(&point[1..33]), "y": b64(&point[33..]),
            }));
        }
        if kid == active_kid {
            signing_key = Some(EncodingKey::from_ec_der(&der));
        }
    }
    let signing_key = signing_key.ok_or_else(|| KeyringError::Corrupt(signing_key_name(&active_kid)))?;
    Ok(KeySet { active_kid, signing_key, verifying, jwks })
}

impl TokenAuthority {
    /// Loads the signing keys from the store, creating the first one on a fresh store.
    pub async fn load(
        store: &dyn Store,
        keyring: &Keyring,
        issuer: String,
        audience: String,
        tenant: String,
        lifetime_secs: u64,
    ) -> Result<Self, KeyringError> {
        let keys = load_keys(store, keyring).await?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.algorithms = vec![Algorithm::ES256];
        validation.set_issuer(&[&issuer]);
        validation.set_audience(&[&audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = CLOCK_SKEW_SECS;
        Ok(Self {
            issuer,
            audience,
            tenant,
            lifetime_secs,
            keys: RwLock::new(Arc::new(keys)),
            validation,
            verified: RwLock::new(HashMap::with_hasher(ahash::RandomState::new())),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The configured lifetime of access tokens.
    pub fn lifetime_secs(&self) -> u64 {
        self.lifetime_secs
    }

    fn keys(&self) -> Arc<KeySet> {
        self.keys.read().expect("token key lock poisoned").clone()
    }

    /// The public keys as a JWKS document.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": self.keys().jwks })
    }

    /// Issues a token for `object_id`, valid for `lifetime_secs` from now.
    pub fn issue(&self, object_id: &str, lifetime_secs: u64) -> (String, Claims) {
        self.issue_attested(object_id, lifetime_secs, None, None)
    }

    /// Issues a managed identity's token, carrying the agent and the attested process.
    pub fn issue_attested(
        &self,
        object_id: &str,
        lifetime_secs: u64,
        agent: Option<String>,
        process: Option<coffer_core::identity::ProcessFacts>,
    ) -> (String, Claims) {
        let now = unix_now();
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: object_id.to_owned(),
            oid: object_id.to_owned(),
            tid: self.tenant.clone(),
            iat: now,
            nbf: now,
            exp: now + lifetime_secs,
            agent,
            process,
        };
        let keys = self.keys();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(keys.active_kid.clone());
        // Only low-S signatures verify (see `has_low_s`), and ring signs with a random nonce, so S
        // is high half the time: sign again until it is low (two signings on average; 64 high
        // ones in a row have a chance of 2^-64).
        let mut token = String::new();
        for _ in 0..64 {
            // Invariant: ES256 signing with a key we generated cannot fail.
            token = jsonwebtoken::encode(&header, &claims, &keys.signing_key).expect("ES256 signing");
            if has_low_s(&token) {
                break;
            }
        }
        (token, claims)
    }

    /// Verifies every field of `token` and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Arc<Verified>, TokenError> {
        let cached = self.verified.read().expect("token cache lock poisoned").get(token).cloned();
        if let Some(claims) = cached {
            let now = unix_now();
            if claims.exp + CLOCK_SKEW_SECS <= now {
                return Err(TokenError::Expired);
            }
            if claims.nbf > now + CLOCK_SKEW_SECS {
                return Err(TokenError::NotYetValid);
            }
            return Ok(claims);
        }
        let claims =
            Arc::new(Verified { claims: self.verify_uncached(token)?, credential_hmac: OnceLock::new() });
        let mut cache = self.verified.write().expect("token cache lock poisoned");
        if cache.len() >= VERIFIED_CACHE_MAX {
            cache.clear();
        }
        cache.insert(Arc::from(token), claims.clone());
        Ok(claims)
    }

    fn verify_uncached(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::ES256 {
            return Err(TokenError::Algorithm);
        }
        // ECDSA signatures are malleable: (r, n − s) verifies wherever (r, s) does, so without
        // this one token would have a second spelling (its own cache entry and audit hash).
        if !has_low_s(token) {
            return Err(TokenError::Signature);
        }
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let keys = self.keys();
        let key = keys.verifying.get(&kid).ok_or(TokenError::UnknownKey)?;
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => TokenError::Signature,
                K::ExpiredSignature => TokenError::Expired,
                K::ImmatureSignature => TokenError::NotYetValid,
                K::InvalidIssuer => TokenError::Issuer,
                K::InvalidAudience => TokenError::Audience,
                K::InvalidAlgorithm => TokenError::Algorithm,
                _ => TokenError::Malformed,
            }
        })?;
        Ok(data.claims)
    }

    /// Starts signing with a new key. The previous key keeps verifying until
    /// [`TokenAuthority::retire_old_keys`] removes it after the overlap.
    pub async fn rotate(&self, store: &dyn Store, keyring: &Keyring) -> Result<String, KeyringError> {
        let old = self.keys().active_kid.clone();
        let kid = new_signing_key(store, keyring).await?;
        store.put_meta(&retired_meta(&old), unix_now().to_string().into_bytes()).await?;
        store.put_meta(ACTIVE_KID_META, kid.clone().into_bytes()).await?;
        let keys = load_keys(store, keyring).await?;
        *self.keys.write().expect("token key lock poisoned") = Arc::new(keys);
        Ok(kid)
    }

    /// Removes keys retired longer ago than the token lifetime plus clock skew: no token they
    /// signed can still be valid.
    pub async fn retire_old_keys(&self, store: &dyn Store, keyring: &Keyring) -> Result<usize, KeyringError> {
        let keys = self.keys();
        let cutoff = unix_now().saturating_sub(self.lifetime_secs.max(86_400) + CLOCK_SKEW_SECS);
        let mut removed = 0;
        for kid in keys.verifying.keys().filter(|k| **k != keys.active_kid) {
            let retired = store.meta(&retired_meta(kid)).await?;
            let retired_at =
                retired.and_then(|r| String::from_utf8(r).ok()).and_then(|t| t.parse::<u64>().ok());
            if retired_at.is_some_and(|t| t < cutoff) {
                store.delete_wrapped_key(&signing_key_name(kid)).await?;
                removed += 1;
            }
        }
        if removed > 0 {
            let keys = load_keys(store, keyring).await?;
            *self.keys.write().expect("token key lock poisoned") = Arc::new(keys);
        }
        Ok(removed)
    }
}

/// Half the order of P-256, (n − 1) / 2, big-endian: the largest S of a low-S signature.
const P256_HALF_ORDER: [u8; 32] = [
    0x7f, 0xff, 0xff, 0xff, 0x80, 0x00, 0x00, 0x00, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xde,
    0x73, 0x7d, 0x56, 0xd3, 0x8b, 0xcf, 0x42, 0x79, 0xdc, 0xe5, 0x61, 0x7e, 0x31, 0x92, 0xa8,
];

/// Whether the ES256 signature of `token` (JWS: r || s, 32 bytes each) has S ≤ n/2. Only the
/// signature's encoding is examined; verification proper is jsonwebtoken's (ring's).
fn has_low_s(token: &str) -> bool {
    let Some((_, signature)) = token.rsplit_once('.') else { return false };
    let mut sig = [0u8; 64];
    match base64::Engine::decode_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD, signature, &mut sig)
    {
        // Big-endian byte strings of equal length compare as the numbers they spell.
        Ok(64) => sig[32..] <= P256_HALF_ORDER[..],
        _ => false,
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use coffer_core::crypto::Key;
    use coffer_store::SqliteStore;

    async fn authority() -> (tempfile::TempDir, TokenAuthority) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let keyring = Keyring::open(&store, Key::generate()).await.unwrap();
        let ta = TokenAuthority::load(
            &store,
            &keyring,
            "https://login.localhost:1/t/v2.0".into(),
            "https://localhost:1".into(),
            "t".into(),
            3600,
        )
        .await
        .unwrap();
        (dir, ta)
    }

    fn forge(
        ta: &TokenAuthority,
        alg: Algorithm,
        kid: Option<&str>,
        key: &EncodingKey,
        edit: impl FnOnce(&mut Claims),
    ) -> String {
        let now = unix_now();
        let mut claims = Claims {
            iss: ta.issuer.clone(),
            aud: ta.audience.clone(),
            sub: "oid".into(),
            oid: "oid".into(),
            tid: "t".into(),
            iat: now,
            nbf: now,
            exp: now + 600,
            agent: None,
            process: None,
        };
        edit(&mut claims);
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        // Low-S like the authority's own, so that each case fails for the reason it tests.
        loop {
            let token = jsonwebtoken::encode(&header, &claims, key).unwrap();
            if alg != Algorithm::ES256 || has_low_s(&token) {
                return token;
            }
        }
    }

    fn with_s(token: &str, s: [u8; 32]) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (signed, signature) = token.rsplit_once('.').unwrap();
        let mut sig = base64::Engine::decode(&b64, signature).unwrap();
        sig[32..].copy_from_slice(&s);
        format!("{signed}.{}", base64::Engine::encode(&b64, sig))
    }

    #[tokio::test]
    async fn only_low_s_signatures_are_minted_and_accepted() {
        let (_d, ta) = authority().await;
        for _ in 0..32 {
            let (token, _) = ta.issue("oid", 600);
            assert!(has_low_s(&token), "a high-S token was minted");
            assert!(ta.verify(&token).is_ok());
        }
        let (token, _) = ta.issue("oid", 600);
        let mut above_half = P256_HALF_ORDER;
        above_half[31] += 1;
        assert!(has_low_s(&with_s(&token, P256_HALF_ORDER)));
        assert!(!has_low_s(&with_s(&token, above_half)));
        assert!(!has_low_s(&with_s(&token, [0xff; 32])));
        assert_eq!(ta.verify(&with_s(&token, above_half)).map(|_| ()), Err(TokenError::Signature));
        assert!(!has_low_s("no-signature"));
        assert!(!has_low_s("a.b.c2lnbmF0dXJlIHRvbyBzaG9ydA"));
    }

    #[tokio::test]
    async fn every_field_is_validated() {
        let (_d, ta) = authority().await;
        let (good, claims) = ta.issue("oid", 600);
        assert_eq!(ta.verify(&good).unwrap().claims, claims);
        assert_eq!(ta.verify(&good).unwrap().claims, claims, "a cached verification gives the same claims");

        let keys = ta.keys();
        let kid = keys.active_kid.clone();
        let own = &keys.signing_key;
        let foreign_pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let foreign = EncodingKey::from_ec_der(&foreign_pair.serialize_der());
        let cases: Vec<(String, TokenError)> = vec![
            (forge(&ta, Algorithm::ES256, Some(&kid), &foreign, |_| {}), TokenError::Signature),
            (
                forge(&ta, Algorithm::HS256, Some(&kid), &EncodingKey::from_secret(b"k"), |_| {}),
                TokenError::Algorithm,
            ),
            (forge(&ta, Algorithm::ES256, Some("other-kid"), own, |_| {}), TokenError::UnknownKey),
            (forge(&ta, Algorithm::ES256, None, own, |_| {}), TokenError::UnknownKey),
            (
                forge(&ta, Algorithm::ES256, Some(&kid), own, |c| c.iss = "https://evil/t/v2.0".into()),
                TokenError::Issuer,
            ),
            (
                forge(&ta, Algorithm::ES256, Some(&kid), own, |c| c.aud = "https://other:1".into()),
                TokenError::Audience,
            ),
            (
                forge(&ta, Algorithm::ES256, Some(&kid), own, |c| c.exp = unix_now() - 3600),
                TokenError::Expired,
            ),
            (
                forge(&ta, Algorithm::ES256, Some(&kid), own, |c| c.nbf = unix_now() + 3600),
                TokenError::NotYetValid,
            ),
        ];
        for (token, expected) in cases {
            assert_eq!(ta.verify(&token).map(|v| v.claims.clone()), Err(expected.clone()), "{expected:?}");
        }
        // alg "none" and garbage.
        let unsigned = format!(
            "{}.{}.",
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                br#"{"alg":"none","kid":"x"}"#
            ),
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, br#"{"sub":"oid"}"#)
        );
        assert!(ta.verify(&unsigned).is_err());
        assert_eq!(ta.verify("garbage").map(|v| v.claims.clone()), Err(TokenError::Malformed));
    }

    #[tokio::test]
    async fn keys_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let root = Key::generate();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let keyring = Keyring::open(&store, root.clone()).await.unwrap();
        let load = || TokenAuthority::load(&store, &keyring, "i".into(), "a".into(), "t".into(), 3600);
        let first = load().await.unwrap();
        let (token, _) = first.issue("oid", 600);
        let second = load().await.unwrap();
        assert!(second.verify(&token).is_ok(), "a restart keeps the signing key");
        // Rotation: new tokens use the new key, old tokens still verify during the overlap.
        let new_kid = second.rotate(&store, &keyring).await.unwrap();
        let (fresh, _) = second.issue("oid", 600);
        assert_eq!(jsonwebtoken::decode_header(&fresh).unwrap().kid.as_deref(), Some(new_kid.as_str()));
        assert!(second.verify(&token).is_ok(), "the old key keeps verifying during the overlap");
        assert_eq!(second.jwks()["keys"].as_array().unwrap().len(), 2);
        assert_eq!(second.retire_old_keys(&store, &keyring).await.unwrap(), 0, "too early to retire");
    }
}
