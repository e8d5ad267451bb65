//! The authorization decision: one pure function, [`authorize`], that every request passes
//! through after authentication and before any data is touched. Deny by default.
//!
//! Today the only role is the built-in administrator; role assignments per vault and per secret
//! (Key Vault's built-in roles) extend [`authorize`] without changing its callers.

use std::fmt;

/// Who is calling, as established by authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub object_id: String,
    pub display_name: String,
    pub kind: PrincipalKind,
    pub enabled: bool,
    /// Holds the built-in `Coffer Administrator` role on every vault and on the server.
    pub administrator: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PrincipalKind {
    User,
    ServicePrincipal,
    ManagedIdentity,
}

impl PrincipalKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::User => "user",
            Self::ServicePrincipal => "service-principal",
            Self::ManagedIdentity => "managed-identity",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "user" => Some(Self::User),
            "service-principal" => Some(Self::ServicePrincipal),
            "managed-identity" => Some(Self::ManagedIdentity),
            _ => None,
        }
    }
}

/// What the caller wants to do, in Key Vault's data-action vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    SecretGet,
    SecretSet,
    SecretList,
    SecretUpdate,
    SecretDelete,
    SecretRecover,
    SecretPurge,
    SecretBackup,
    SecretRestore,
    VaultRead,
    VaultManage,
}

impl Action {
    /// The permission name used in denial messages (Key Vault's data action).
    pub fn permission(&self) -> &'static str {
        match self {
            Self::SecretGet => "Microsoft.KeyVault/vaults/secrets/getSecret/action",
            Self::SecretSet => "Microsoft.KeyVault/vaults/secrets/setSecret/action",
            Self::SecretList | Self::SecretUpdate => "Microsoft.KeyVault/vaults/secrets/readMetadata/action",
            Self::SecretDelete => "Microsoft.KeyVault/vaults/secrets/delete",
            Self::SecretRecover => "Microsoft.KeyVault/vaults/secrets/recover/action",
            Self::SecretPurge => "Microsoft.KeyVault/vaults/secrets/purge/action",
            Self::SecretBackup => "Microsoft.KeyVault/vaults/secrets/backup/action",
            Self::SecretRestore => "Microsoft.KeyVault/vaults/secrets/restore/action",
            Self::VaultRead => "Coffer/vaults/read",
            Self::VaultManage => "Coffer/vaults/write",
        }
    }
}

/// What the action is applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    Server,
    Vault { vault: &'a str },
    Secret { vault: &'a str, secret: &'a str },
}

/// Why access was granted; recorded with the request (the audit log will carry it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub role: &'static str,
}

/// Why access was denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub action: Action,
    pub reason: &'static str,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "The caller is not authorized to perform action '{}': {}.",
            self.action.permission(),
            self.reason
        )
    }
}

pub const ADMINISTRATOR_ROLE: &str = "Coffer Administrator";

/// Decides whether `principal` may perform `action` on `scope`. Pure and allocation-free.
pub fn authorize(principal: &Principal, action: Action, _scope: Scope<'_>) -> Result<Grant, Denial> {
    if !principal.enabled {
        return Err(Denial { action, reason: "the principal is disabled" });
    }
    if principal.administrator {
        return Ok(Grant { role: ADMINISTRATOR_ROLE });
    }
    Err(Denial { action, reason: "no role assignment grants it" })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(administrator: bool, enabled: bool) -> Principal {
        Principal {
            object_id: "00000000-0000-0000-0000-000000000001".into(),
            display_name: "p".into(),
            kind: PrincipalKind::User,
            enabled,
            administrator,
        }
    }

    #[test]
    fn deny_by_default() {
        let scope = Scope::Secret { vault: "dev", secret: "db" };
        assert!(authorize(&principal(false, true), Action::SecretGet, scope).is_err());
        assert!(authorize(&principal(true, true), Action::SecretGet, scope).is_ok());
        assert!(authorize(&principal(true, false), Action::SecretGet, scope).is_err());
    }
}
