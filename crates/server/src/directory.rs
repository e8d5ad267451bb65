//! The identity directory as the server sees it: an in-memory snapshot of principals, group
//! memberships, roles, role assignments, bindings and federated credentials, rebuilt from the
//! store after every change (so disabling a principal or removing an assignment applies to the
//! very next request), plus the credential checks (Argon2id, constant-time).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::Engine;
use coffer_core::authz::{builtin_roles, Principal, PrincipalKind, Rbac, RoleAssignment};
use coffer_core::identity::{Binding, CredentialKind, CredentialRecord, FederatedCredential};
use coffer_store::{Store, StoreError};
use rand::RngCore;
use zeroize::Zeroizing;

use crate::argon::{Argon2Pool, ArgonError, Candidate};
use crate::tokens::unix_now;

/// Everything authorization and token issuance need, immutable once built.
pub struct Snapshot {
    /// Shared so that a request can keep its principal (for its audit record) without copying.
    principals: HashMap<String, Arc<Principal>>,
    by_client_id: HashMap<String, String>,
    by_name: HashMap<String, String>,
    pub rbac: Rbac,
    pub bindings: Vec<Binding>,
    pub federated: Vec<FederatedCredential>,
    pub memberships: Vec<(String, String)>,
    pub assignments: Vec<RoleAssignment>,
}

impl Snapshot {
    pub fn principal(&self, object_id: &str) -> Option<&Principal> {
        self.principals.get(object_id).map(Arc::as_ref)
    }

    /// [`Snapshot::principal`], shared.
    pub fn principal_arc(&self, object_id: &str) -> Option<&Arc<Principal>> {
        self.principals.get(object_id)
    }

    pub fn by_client_id(&self, client_id: &str) -> Option<&Principal> {
        self.by_client_id.get(client_id).and_then(|id| self.principal(id))
    }

    /// A principal by object id, client id or (case-insensitive) name.
    pub fn resolve(&self, name_or_id: &str) -> Option<&Principal> {
        self.principal(name_or_id)
            .or_else(|| self.by_client_id(name_or_id))
            .or_else(|| self.by_name.get(&name_or_id.to_ascii_lowercase()).and_then(|id| self.principal(id)))
    }

    pub fn principals(&self) -> impl Iterator<Item = &Principal> {
        self.principals.values().map(Arc::as_ref)
    }
}

pub struct Directory {
    store: Arc<dyn Store>,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Every Argon2id computation (hashing and checking credentials) runs here, within a fixed
    /// memory budget.
    argon: Argon2Pool,
}

/// Why a credential could not be checked (a wrong credential is `Ok(None)`, not an error).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Argon(#[from] ArgonError),
}

/// A freshly generated credential: shown to the caller once, stored only as a hash.
pub struct IssuedSecret {
    pub credential_id: String,
    pub secret: Zeroizing<String>,
}

impl Directory {
    pub async fn load(store: Arc<dyn Store>, argon: Argon2Pool) -> Result<Self, StoreError> {
        let snapshot = build(store.as_ref()).await?;
        Ok(Self { store, snapshot: RwLock::new(Arc::new(snapshot)), argon })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().expect("directory lock poisoned").clone()
    }

    /// Rebuilds the snapshot from the store; call after every directory change.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let snapshot = build(self.store.as_ref()).await?;
        *self.snapshot.write().expect("directory lock poisoned") = Arc::new(snapshot);
        Ok(())
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    pub async fn create_principal(&self, name: &str, kind: PrincipalKind) -> Result<Principal, StoreError> {
        let principal = Principal {
            object_id: uuid::Uuid::new_v4().to_string(),
            client_id: uuid::Uuid::new_v4().to_string(),
            display_name: name.to_owned(),
            kind,
            enabled: true,
        };
        self.store.put_principal(&principal).await?;
        self.reload().await?;
        Ok(principal)
    }

    /// Creates a random secret of `kind` for `principal_id` and stores its Argon2id hash.
    pub async fn add_secret(
        &self,
        principal_id: &str,
        kind: CredentialKind,
        expires: Option<i64>,
    ) -> Result<IssuedSecret, StoreError> {
        let mut raw = Zeroizing::new([0u8; 30]);
        rand::rngs::OsRng.fill_bytes(raw.as_mut());
        let prefix = match kind {
            CredentialKind::JoinToken => "cfj",
            _ => "cfs",
        };
        let credential_id = uuid::Uuid::new_v4().simple().to_string();
        let random = Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw.as_ref()));
        // The id travels inside the secret so verification finds its hash directly.
        let secret = Zeroizing::new(format!("{prefix}_{credential_id}.{}", &*random));
        let record = CredentialRecord {
            id: credential_id.clone(),
            principal_id: principal_id.to_owned(),
            kind,
            material: self.hash_secret(secret.as_bytes()).await?,
            created: unix_now() as i64,
            expires,
        };
        self.store.add_credential(&record).await?;
        Ok(IssuedSecret { credential_id, secret })
    }

    /// Registers a certificate (PEM) whose key may sign client assertions for the principal.
    pub async fn add_certificate(&self, principal_id: &str, pem: &str) -> Result<String, String> {
        let (_, expires) = certificate_key(pem)?;
        let record = CredentialRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            principal_id: principal_id.to_owned(),
            kind: CredentialKind::Certificate,
            material: pem.to_owned(),
            created: unix_now() as i64,
            expires: Some(expires),
        };
        self.store.add_credential(&record).await.map_err(|e| e.to_string())?;
        Ok(record.id)
    }

    /// Sets a user's password (Argon2id), replacing any previous one.
    pub async fn set_password(&self, principal_id: &str, password: &str) -> Result<(), StoreError> {
        let record = CredentialRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            principal_id: principal_id.to_owned(),
            kind: CredentialKind::Password,
            material: self.hash_secret(password.as_bytes()).await?,
            created: unix_now() as i64,
            expires: None,
        };
        self.store.add_credential(&record).await?;
        self.store.delete_credentials(principal_id, CredentialKind::Password, Some(&record.id)).await?;
        Ok(())
    }

    /// Checks `presented` against the principal's unexpired credentials of `kind`; returns the
    /// matching credential's id. Argon2 verification compares in constant time. A password
    /// check with no stored password does the same work as one with (see [`Argon2Pool`]), so
    /// callers can check unknown sign-in names through [`Directory::verify_unknown`] alike.
    pub async fn verify_secret(
        &self,
        principal_id: &str,
        kind: CredentialKind,
        presented: &str,
    ) -> Result<Option<String>, CheckError> {
        let now = unix_now() as i64;
        let wanted_id =
            presented.split_once('_').and_then(|(_, rest)| rest.split_once('.')).map(|(id, _)| id);
        let records = self.store.credentials(principal_id, kind).await?;
        let candidates: Vec<Candidate> = records
            .into_iter()
            .filter(|r| r.expires.is_none_or(|e| e > now))
            .filter(|r| kind == CredentialKind::Password || Some(r.id.as_str()) == wanted_id)
            .map(|r| Candidate { id: r.id, phc: r.material })
            .collect();
        if candidates.is_empty() && kind != CredentialKind::Password {
            // Generated secrets name their credential: no such id, nothing to compute.
            return Ok(None);
        }
        let presented = Zeroizing::new(presented.as_bytes().to_vec());
        Ok(self.argon.verify_any(candidates, presented).await?)
    }

    /// The work of a password check for a sign-in name that does not exist (always `None`),
    /// so that unknown and known names answer alike.
    pub async fn verify_unknown(&self, presented: &str) -> Result<Option<String>, CheckError> {
        let presented = Zeroizing::new(presented.as_bytes().to_vec());
        Ok(self.argon.verify_any(Vec::new(), presented).await?)
    }

    async fn hash_secret(&self, secret: &[u8]) -> Result<String, StoreError> {
        self.argon
            .hash(Zeroizing::new(secret.to_vec()))
            .await
            .map_err(|e| StoreError::Backend(format!("hashing a credential: {e}")))
    }
}

async fn build(store: &dyn Store) -> Result<Snapshot, StoreError> {
    let principals: HashMap<String, Arc<Principal>> =
        store.principals().await?.into_iter().map(|p| (p.object_id.clone(), Arc::new(p))).collect();
    let by_client_id = principals.values().map(|p| (p.client_id.clone(), p.object_id.clone())).collect();
    let by_name =
        principals.values().map(|p| (p.display_name.to_ascii_lowercase(), p.object_id.clone())).collect();
    let mut roles = builtin_roles();
    roles.extend(store.custom_roles().await?);
    let assignments = store.role_assignments().await?;
    let memberships = store.memberships().await?;
    Ok(Snapshot {
        principals,
        by_client_id,
        by_name,
        rbac: Rbac::new(roles, assignments.clone(), memberships.clone()),
        bindings: store.bindings().await?,
        federated: store.federated_credentials().await?,
        memberships,
        assignments,
    })
}

/// The public key of a PEM certificate, as a JWT verification key, and its expiry.
pub fn certificate_key(pem: &str) -> Result<(jsonwebtoken::DecodingKey, i64), String> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    let cert = parsed.parse_x509().map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let spki = cert.public_key();
    let key_bits = spki.subject_public_key.data.as_ref();
    let oid = spki.algorithm.algorithm.to_id_string();
    let key = match oid.as_str() {
        // rsaEncryption: the bit string holds a PKCS#1 RSAPublicKey.
        "1.2.840.113549.1.1.1" => jsonwebtoken::DecodingKey::from_rsa_der(key_bits),
        // id-ecPublicKey: the bit string holds the uncompressed point.
        "1.2.840.10045.2.1" => jsonwebtoken::DecodingKey::from_ec_der(key_bits),
        other => return Err(format!("unsupported certificate key algorithm {other}")),
    };
    Ok((key, cert.validity().not_after.timestamp()))
}
