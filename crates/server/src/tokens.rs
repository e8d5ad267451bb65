//! Access tokens: ES256-signed JWTs minted by this server's authority and verified on every
//! request. Verification checks the signature, `alg` (only ES256), `kid` (only our keys), `iss`,
//! `aud`, `exp` and `nbf`, and requires `sub`.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use coffer_store::Store;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::keyring::{Keyring, KeyringError};

const ACTIVE_KID_META: &str = "active-signing-kid";
const CLOCK_SKEW_SECS: u64 = 60;

#[derive(Debug, Error, PartialEq, Eq)]
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
}

struct VerifyingKey {
    key: DecodingKey,
}

/// Mints and verifies tokens for one issuer and audience.
pub struct TokenAuthority {
    issuer: String,
    audience: String,
    tenant: String,
    active_kid: String,
    signing_key: EncodingKey,
    verifying: HashMap<String, VerifyingKey>,
    validation: Validation,
}

fn signing_key_name(kid: &str) -> String {
    format!("token-signing:{kid}")
}

impl TokenAuthority {
    /// Loads the signing keys from the store, creating the first one on a fresh store.
    pub async fn load(
        store: &dyn Store,
        keyring: &Keyring,
        issuer: String,
        audience: String,
        tenant: String,
    ) -> Result<Self, KeyringError> {
        let active_kid = match store.meta(ACTIVE_KID_META).await? {
            Some(kid) => String::from_utf8(kid).map_err(|_| KeyringError::Corrupt(ACTIVE_KID_META.into()))?,
            None => {
                let kid = uuid::Uuid::new_v4().simple().to_string();
                let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
                    .map_err(|e| KeyringError::Corrupt(format!("generating a signing key: {e}")))?;
                let der = zeroize::Zeroizing::new(pair.serialize_der());
                store
                    .put_wrapped_key(
                        &signing_key_name(&kid),
                        keyring.wrap_material(&signing_key_name(&kid), &der),
                    )
                    .await?;
                String::from_utf8(store.init_meta(ACTIVE_KID_META, kid.into_bytes()).await?)
                    .map_err(|_| KeyringError::Corrupt(ACTIVE_KID_META.into()))?
            }
        };
        let mut verifying = HashMap::new();
        let mut signing_key = None;
        for (name, blob) in store.wrapped_keys().await? {
            let Some(kid) = name.strip_prefix("token-signing:") else { continue };
            let der = keyring.unwrap_material(&name, &blob)?;
            let pair = KeyPair::try_from(der.as_slice()).map_err(|_| KeyringError::Corrupt(name.clone()))?;
            verifying.insert(
                kid.to_owned(),
                VerifyingKey { key: DecodingKey::from_ec_der(pair.public_key_raw()) },
            );
            if kid == active_kid {
                signing_key = Some(EncodingKey::from_ec_der(&der));
            }
        }
        let signing_key = signing_key.ok_or_else(|| KeyringError::Corrupt(signing_key_name(&active_kid)))?;

        let mut validation = Validation::new(Algorithm::ES256);
        validation.algorithms = vec![Algorithm::ES256];
        validation.set_issuer(&[&issuer]);
        validation.set_audience(&[&audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = CLOCK_SKEW_SECS;
        Ok(Self { issuer, audience, tenant, active_kid, signing_key, verifying, validation })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Issues a token for `object_id`, valid for `lifetime_secs` from now.
    pub fn issue(&self, object_id: &str, lifetime_secs: u64) -> (String, Claims) {
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
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.active_kid.clone());
        // Invariant: ES256 signing with a key we generated cannot fail.
        let token = jsonwebtoken::encode(&header, &claims, &self.signing_key).expect("ES256 signing");
        (token, claims)
    }

    /// Verifies every field of `token` and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::ES256 {
            return Err(TokenError::Algorithm);
        }
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let key = self.verifying.get(&kid).ok_or(TokenError::UnknownKey)?;
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &self.validation).map_err(|e| {
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
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
