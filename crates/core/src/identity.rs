//! Identity domain types: what a host agent attests about a calling process, how an
//! administrator binds a managed identity to such facts, and federated credentials.

use serde::{Deserialize, Serialize};

/// Facts the agent reads from the kernel about the process on the other end of a loopback
/// connection. Nothing here comes from the process itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessFacts {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub exe: String,
    /// The process's cgroup path (cgroup v2 line, or the systemd hierarchy in v1).
    pub cgroup: Option<String>,
    /// The systemd unit (`*.service` / `*.scope`) derived from the cgroup, if any.
    pub unit: Option<String>,
}

/// Binds a managed identity to the processes of one agent's host that match every selector
/// given (AND). At least one selector is required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub id: String,
    pub identity_id: String,
    pub agent_id: String,
    pub uid: Option<u32>,
    pub exe: Option<String>,
    pub unit: Option<String>,
    pub cgroup_prefix: Option<String>,
}

impl Binding {
    pub fn has_selector(&self) -> bool {
        self.uid.is_some() || self.exe.is_some() || self.unit.is_some() || self.cgroup_prefix.is_some()
    }

    /// True when every selector given matches `facts` (and there is at least one).
    pub fn matches(&self, facts: &ProcessFacts) -> bool {
        self.has_selector()
            && self.uid.is_none_or(|uid| uid == facts.uid)
            && self.exe.as_deref().is_none_or(|exe| exe == facts.exe)
            && self.unit.as_deref().is_none_or(|unit| facts.unit.as_deref() == Some(unit))
            && self
                .cgroup_prefix
                .as_deref()
                .is_none_or(|prefix| facts.cgroup.as_deref().is_some_and(|c| c.starts_with(prefix)))
    }
}

/// Trust in an outside OIDC issuer for one principal, like Entra's federated identity
/// credentials: a token from `issuer` with subject `subject` and audience `audience` stands
/// for the principal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederatedCredential {
    pub id: String,
    pub principal_id: String,
    pub issuer: String,
    pub subject: String,
    pub audience: String,
    /// Where the issuer's keys come from: a JWKS URL, or a JWKS document given inline.
    pub jwks_url: Option<String>,
    pub jwks: Option<String>,
}

/// Entra's default audience for federated tokens.
pub const DEFAULT_FEDERATION_AUDIENCE: &str = "api://AzureADTokenExchange";

/// A stored credential of a principal. `material` is an Argon2id PHC hash (secrets, passwords,
/// join tokens) or a PEM certificate; never a usable secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRecord {
    pub id: String,
    pub principal_id: String,
    pub kind: CredentialKind,
    pub material: String,
    pub created: i64,
    pub expires: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    ClientSecret,
    Certificate,
    Password,
    JoinToken,
}

impl CredentialKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::ClientSecret => "client-secret",
            Self::Certificate => "certificate",
            Self::Password => "password",
            Self::JoinToken => "join-token",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "client-secret" => Self::ClientSecret,
            "certificate" => Self::Certificate,
            "password" => Self::Password,
            "join-token" => Self::JoinToken,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> ProcessFacts {
        ProcessFacts {
            pid: 10,
            uid: 1000,
            gid: 1000,
            exe: "/usr/bin/python3".into(),
            cgroup: Some("/system.slice/app.service".into()),
            unit: Some("app.service".into()),
        }
    }

    fn binding() -> Binding {
        Binding {
            id: "b".into(),
            identity_id: "i".into(),
            agent_id: "a".into(),
            uid: None,
            exe: None,
            unit: None,
            cgroup_prefix: None,
        }
    }

    #[test]
    fn selectors_combine_with_and() {
        assert!(!binding().matches(&facts()), "a binding without selectors matches nothing");
        assert!(Binding { uid: Some(1000), ..binding() }.matches(&facts()));
        assert!(!Binding { uid: Some(1001), ..binding() }.matches(&facts()));
        let both = Binding { uid: Some(1000), exe: Some("/usr/bin/python3".into()), ..binding() };
        assert!(both.matches(&facts()));
        let wrong_exe = Binding { uid: Some(1000), exe: Some("/usr/bin/node".into()), ..binding() };
        assert!(!wrong_exe.matches(&facts()));
        assert!(Binding { unit: Some("app.service".into()), ..binding() }.matches(&facts()));
        assert!(Binding { cgroup_prefix: Some("/system.slice/".into()), ..binding() }.matches(&facts()));
        assert!(!Binding { cgroup_prefix: Some("/user.slice/".into()), ..binding() }.matches(&facts()));
        let no_cgroup = ProcessFacts { cgroup: None, unit: None, ..facts() };
        assert!(!Binding { cgroup_prefix: Some("/".into()), ..binding() }.matches(&no_cgroup));
    }
}
